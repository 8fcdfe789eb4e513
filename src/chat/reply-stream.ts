import type { Redis, RedisKeys } from '../lib/redis.js';

/** Events of one reply, in the order a client sees them. */
export type ReplyEvent =
  | { type: 'delta'; data: { text: string } }
  /** The attempt so far is void (a retry starts over): drop the text received until now. */
  | { type: 'reset'; data: Record<string, never> }
  | { type: 'done'; data: Record<string, unknown> }
  | { type: 'error'; data: { code: string; message: string } };

/** Entries kept per reply; a reply of more deltas keeps its newest ones. */
const MAX_LENGTH = 20_000;
/** A finished reply's stream stays this long; after that it is served from PostgreSQL. */
export const FINISHED_STREAM_TTL_SECONDS = 600;
/** An unfinished stream expires if nothing is written for this long (a dead worker). */
const ACTIVE_STREAM_TTL_SECONDS = 3600;

/**
 * The Redis Stream of one reply's events, written by the worker and read by any API instance.
 */
export class ReplyStreams {
  constructor(
    private readonly redis: Redis,
    private readonly keys: RedisKeys,
  ) {}

  key(messageId: string) {
    return this.keys.key('reply', messageId);
  }

  async append(messageId: string, event: ReplyEvent): Promise<string> {
    const key = this.key(messageId);
    const final = event.type === 'done' || event.type === 'error';
    const [[, id] = [], ...rest] =
      (await this.redis
        .multi()
        .xadd(key, 'MAXLEN', '~', MAX_LENGTH, '*', 'e', event.type, 'd', JSON.stringify(event.data))
        .expire(key, final ? FINISHED_STREAM_TTL_SECONDS : ACTIVE_STREAM_TTL_SECONDS)
        .exec()) ?? [];
    void rest;
    return id as string;
  }

  /** Entries after `afterId` (exclusive), waiting up to `blockMs` for new ones when none. */
  async read(
    messageId: string,
    afterId: string,
    options: { blockMs?: number; count?: number; connection?: Redis } = {},
  ): Promise<Array<{ id: string; event: ReplyEvent }>> {
    const redis = options.connection ?? this.redis;
    const count = options.count ?? 500;
    const key = this.key(messageId);
    const result =
      options.blockMs !== undefined
        ? await redis.xread('COUNT', count, 'BLOCK', options.blockMs, 'STREAMS', key, afterId)
        : await redis.xread('COUNT', count, 'STREAMS', key, afterId);
    const entries = result?.[0]?.[1] ?? [];
    return entries.map(([id, fields]) => ({ id, event: parseFields(fields) }));
  }

  async exists(messageId: string): Promise<boolean> {
    return (await this.redis.exists(this.key(messageId))) === 1;
  }
}

function parseFields(fields: string[]): ReplyEvent {
  let type = 'delta';
  let data = '{}';
  for (let i = 0; i < fields.length; i += 2) {
    if (fields[i] === 'e') type = fields[i + 1] ?? type;
    if (fields[i] === 'd') data = fields[i + 1] ?? data;
  }
  return { type, data: JSON.parse(data) } as ReplyEvent;
}
