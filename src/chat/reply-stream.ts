import { type Redis, type RedisKeys, scriptCommand } from '../lib/redis.js';

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

/** One entry of a reply's stream. */
export interface ReplyEntry {
  /** The Redis Stream id ("<ms>-<seq>"), which clients resume from. */
  id: string;
  event: ReplyEvent;
}

/**
 * The Redis Stream of one reply's events, written by the worker and read by any API instance.
 * Each entry is also published on the reply's channel (`<id>\n<type>\n<data>`), so API instances
 * following the reply get it pushed instead of reading the stream on every entry; the stream stays
 * the record they catch up from (see ReplyHub).
 */
// KEYS[1] the stream. ARGV: max length, event type, event data (JSON), TTL in seconds, channel,
// the id this writer appended last ('' if none).
// XADD and PUBLISH in one script: a subscriber never sees an entry the stream lacks, and sees the
// entries in stream order. A stream that vanished under its writer (Redis flushed or restarted)
// starts again after the writer's last id, not at the current time: within the same millisecond
// that id would be lower, and readers that saw the old entries would drop the new ones as repeats.
const APPEND_SCRIPT = `
local id = '*'
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then
  local lastMs = tonumber(string.match(ARGV[6], '^(%d+)-'))
  local time = redis.call('TIME')
  local nowMs = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if lastMs and nowMs <= lastMs then id = string.format('%.0f-0', lastMs + 1) end
end
id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, 'e', ARGV[2], 'd', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[3])
return id
`;

/** Replies whose last appended id a process remembers at most (a writer forgets at the end). */
const LAST_IDS_MAX = 50_000;

type AppendCommand = (
  key: string,
  maxLength: number,
  type: string,
  data: string,
  ttlSeconds: number,
  channel: string,
  lastId: string,
) => Promise<string>;

export class ReplyStreams {
  /**
   * XADD and EXPIRE as one atomic script: one command per event instead of MULTI, XADD, EXPIRE
   * and EXEC (a streaming reply appends dozens of events, a busy worker thousands a second).
   */
  private readonly appendEvent: AppendCommand;
  /** The id this process appended last to each reply it is writing (see APPEND_SCRIPT). */
  private readonly lastIds = new Map<string, string>();

  constructor(
    private readonly redis: Redis,
    readonly keys: RedisKeys,
  ) {
    this.appendEvent = scriptCommand<AppendCommand>(redis, 'replyStreamAppend', APPEND_SCRIPT, 1);
  }

  key(messageId: string) {
    return this.keys.key('reply', messageId);
  }

  /** The pub/sub channel on which the entries of a reply's stream are published as appended. */
  channel(messageId: string) {
    return this.keys.key('reply-events', messageId);
  }

  async append(messageId: string, event: ReplyEvent): Promise<string> {
    const final = event.type === 'done' || event.type === 'error';
    const id = await this.appendEvent(
      this.key(messageId),
      MAX_LENGTH,
      event.type,
      JSON.stringify(event.data),
      final ? FINISHED_STREAM_TTL_SECONDS : ACTIVE_STREAM_TTL_SECONDS,
      this.channel(messageId),
      this.lastIds.get(messageId) ?? '',
    );
    this.lastIds.delete(messageId);
    if (!final) {
      if (this.lastIds.size >= LAST_IDS_MAX) this.lastIds.clear();
      this.lastIds.set(messageId, id);
    }
    return id;
  }

  /** Entries after `afterId` (exclusive), waiting up to `blockMs` for new ones when none. */
  async read(
    messageId: string,
    afterId: string,
    options: { blockMs?: number; count?: number; connection?: Redis } = {},
  ): Promise<ReplyEntry[]> {
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

  /**
   * The entries after `afterId` (exclusive) of several replies' streams, at most `count` each,
   * in one XREAD. A reply may appear only once.
   */
  async readMany(
    requests: ReadonlyArray<{ messageId: string; afterId: string }>,
    options: { count: number; connection?: Redis },
  ): Promise<ReplyEntry[][]> {
    const redis = options.connection ?? this.redis;
    const keys = requests.map((r) => this.key(r.messageId));
    const result = await redis.xread(
      'COUNT',
      options.count,
      'STREAMS',
      ...keys,
      ...requests.map((r) => r.afterId),
    );
    const byKey = new Map(result ?? []);
    return keys.map((key) =>
      (byKey.get(key) ?? []).map(([id, fields]) => ({ id, event: parseFields(fields) })),
    );
  }

  /** The text a client following the stream has now: the deltas since the last `reset`. */
  async textSoFar(messageId: string): Promise<string> {
    const entries = await this.redis.xrange(this.key(messageId), '-', '+');
    let text = '';
    for (const [, fields] of entries) {
      const event = parseFields(fields);
      if (event.type === 'reset') text = '';
      else if (event.type === 'delta') text += event.data.text;
    }
    return text;
  }

  async exists(messageId: string): Promise<boolean> {
    return (await this.redis.exists(this.key(messageId))) === 1;
  }
}

/** An entry as published by APPEND_SCRIPT: `<id>\n<type>\n<data>`. */
export function parsePublished(message: string): ReplyEntry {
  const a = message.indexOf('\n');
  const b = message.indexOf('\n', a + 1);
  if (a < 0 || b < 0) throw new Error('not a reply stream entry');
  const event = { type: message.slice(a + 1, b), data: JSON.parse(message.slice(b + 1)) };
  return { id: message.slice(0, a), event: event as ReplyEvent };
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
