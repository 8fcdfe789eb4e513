import { batched } from '../lib/batch.js';
import type { Clock } from '../lib/clock.js';
import { nextUtcMidnight, utcDay } from '../lib/clock.js';
import { AppError } from '../lib/errors.js';
import { type Redis, type RedisKeys, scriptCommand } from '../lib/redis.js';

export interface Usage {
  used: number;
  /** null: unlimited. */
  limit: number | null;
  remaining: number | null;
  resetsAt: Date;
}

export interface Reservation extends Usage {
  day: string;
}

// KEYS[1] counter. ARGV: limit (-1 unlimited), ttl seconds, seed (-1: none).
// Returns {status, used}: status 0 reserved, 1 over the limit, 2 counter missing (caller seeds).
const RESERVE_SCRIPT = `
local used = redis.call('GET', KEYS[1])
if not used then
  if ARGV[3] == '-1' then return {2, 0} end
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[2], 'NX')
  used = redis.call('GET', KEYS[1])
end
used = tonumber(used)
local limit = tonumber(ARGV[1])
if limit >= 0 and used >= limit then return {1, used} end
used = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {0, used}
`;

const RELEASE_SCRIPT = `
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 0 then return redis.call('DECR', KEYS[1]) end
return 0
`;

export interface QuotaServiceOptions {
  redis: Redis;
  keys: RedisKeys;
  clock: Clock;
  /** Rebuilds a day's count from PostgreSQL when the Redis counter is gone (flush, restart). */
  countFromDatabase(userId: string, day: string): Promise<number>;
}

/**
 * Daily prompt quota per user and UTC day. Reservation is one atomic Redis script, so concurrent
 * requests can never overshoot the limit; PostgreSQL (each reply's quota day) is the record the
 * counter is rebuilt from.
 */
type ReserveResult = [status: number, used: number];
interface ReserveCall {
  key: string;
  limit: number;
  ttl: number;
  seed: number;
}
type ReserveCommand = (
  key: string,
  limit: number,
  ttl: number,
  seed: number,
) => Promise<ReserveResult>;

export class QuotaService {
  /**
   * The reservations of the moment, sent to Redis in one pipeline (`batched`), each as EVALSHA
   * of the script ioredis loaded once.
   */
  private readonly reserveBatch: (call: ReserveCall) => Promise<ReserveResult>;
  private readonly counting = new Map<string, Promise<number>>();

  constructor(private readonly o: QuotaServiceOptions) {
    // Defined on the client, then called through the pipelines below.
    scriptCommand<ReserveCommand>(o.redis, 'quotaReserve', RESERVE_SCRIPT, 1);
    this.reserveBatch = batched(async (calls: readonly ReserveCall[]) => {
      const pipeline = o.redis.pipeline() as unknown as {
        quotaReserve: (...args: Parameters<ReserveCommand>) => void;
        exec(): Promise<Array<[Error | null, unknown]> | null>;
      };
      for (const c of calls) pipeline.quotaReserve(c.key, c.limit, c.ttl, c.seed);
      const results = (await pipeline.exec()) ?? [];
      return calls.map((_, i) => {
        const [error, result] = results[i] ?? [new Error('no reply from Redis'), null];
        return error ?? (result as ReserveResult);
      });
    });
  }

  private key(userId: string, day: string) {
    return this.o.keys.key('quota', userId, day);
  }

  private window(now: Date) {
    const day = utcDay(now);
    const resetsAt = nextUtcMidnight(now);
    // Kept a day past the reset so a late give-back still finds its counter.
    const ttl = Math.ceil((resetsAt.getTime() - now.getTime()) / 1000) + 86_400;
    return { day, resetsAt, ttl };
  }

  private usage(used: number, limit: number | null, resetsAt: Date): Usage {
    return {
      used,
      limit,
      remaining: limit === null ? null : Math.max(0, limit - used),
      resetsAt,
    };
  }

  /** Counts one prompt, or throws QUOTA_EXCEEDED (429 with Retry-After until the reset). */
  async reserve(userId: string, limit: number | null): Promise<Reservation> {
    const now = this.o.clock.now();
    const { day, resetsAt, ttl } = this.window(now);
    const key = this.key(userId, day);
    const run = (seed: number) => this.reserveBatch({ key, limit: limit ?? -1, ttl, seed });
    let [status, used] = await run(-1);
    if (status === 2) {
      [status, used] = await run(await this.countOnce(userId, day));
    }
    if (status === 1) {
      const retryAfter = Math.ceil((resetsAt.getTime() - now.getTime()) / 1000);
      throw new AppError({
        code: 'QUOTA_EXCEEDED',
        message: `Daily limit of ${limit} prompts reached; it resets at ${resetsAt.toISOString()}. Upgrade to Pro for more.`,
        retryAfter,
        details: { limit, used, resetsAt: resetsAt.toISOString(), upgrade: '/subscribe/pro' },
        headers: rateLimitHeaders(this.usage(used, limit, resetsAt)),
      });
    }
    return { day, ...this.usage(used, limit, resetsAt) };
  }

  /**
   * A day's count from PostgreSQL, shared by the concurrent callers that found the counter gone
   * (after a flush, a user's burst would otherwise run one count per prompt). The count is only
   * a seed: the script sets it only if the counter is still missing.
   */
  private countOnce(userId: string, day: string): Promise<number> {
    const key = `${userId}:${day}`;
    let running = this.counting.get(key);
    if (!running) {
      running = this.o.countFromDatabase(userId, day).finally(() => this.counting.delete(key));
      this.counting.set(key, running);
    }
    return running;
  }

  /** Gives one prompt of `day` back. */
  async release(userId: string, day: string): Promise<void> {
    await this.o.redis.eval(RELEASE_SCRIPT, 1, this.key(userId, day));
  }

  async current(userId: string, limit: number | null): Promise<Usage> {
    const now = this.o.clock.now();
    const { day, resetsAt } = this.window(now);
    const raw = await this.o.redis.get(this.key(userId, day));
    const used = raw === null ? await this.countOnce(userId, day) : Number(raw);
    return this.usage(used, limit, resetsAt);
  }
}

/** `X-RateLimit-*` headers describing the daily prompt quota. */
export function rateLimitHeaders(usage: Usage): Record<string, string> {
  const reset = String(Math.floor(usage.resetsAt.getTime() / 1000));
  if (usage.limit === null) {
    return {
      'x-ratelimit-limit': 'unlimited',
      'x-ratelimit-remaining': 'unlimited',
      'x-ratelimit-reset': reset,
    };
  }
  return {
    'x-ratelimit-limit': String(usage.limit),
    'x-ratelimit-remaining': String(usage.remaining),
    'x-ratelimit-reset': reset,
  };
}
