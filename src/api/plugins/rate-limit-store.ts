import { type Redis, scriptCommand } from '../../lib/redis.js';

// KEYS[1] the window's counter. ARGV: numbers to take, window length in ms.
// Returns {the last number taken, ms left in the window}.
const LEASE_SCRIPT = `
local last = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {last, ttl}
`;

/** A run of request numbers of one window, taken from Redis at once. */
interface Lease {
  next: number;
  last: number;
  expiresAt: number;
}

type Callback = (error: Error | null, result?: { current: number; ttl: number }) => void;
type LeaseCommand = (key: string, count: number, windowMs: number) => Promise<[number, number]>;

/** Beyond this many keys, expired leases are swept. */
const MAX_KEYS = 50_000;

/**
 * A store for @fastify/rate-limit that counts in Redis (shared by every instance) without a
 * round trip per request: each request gets the next number of its key's fixed window, and an
 * instance takes numbers from Redis in runs of 1% of the limit (at most 1,000). A number above
 * the limit is refused, so the limit is never exceeded across instances; numbers another
 * instance holds but has not handed out can make a caller be refused up to 1% of the limit per
 * instance early. Limits under 200 take one number at a time: a round trip per request, as
 * exact as a plain counter. Once a window's count has passed the limit, the instance refuses the
 * rest of that window without asking Redis.
 */
export class LeasedRateLimitStore {
  private readonly leases = new Map<string, Lease>();
  private readonly refills = new Map<string, Promise<void>>();
  private readonly lease: LeaseCommand;

  constructor(
    redis: Redis,
    private readonly prefix: string,
  ) {
    this.lease = scriptCommand<LeaseCommand>(redis, 'rateLimitLease', LEASE_SCRIPT, 1);
  }

  /** The store as a class of no arguments, the way @fastify/rate-limit's `store` option takes it. */
  static on(redis: Redis, prefix: string) {
    return class extends LeasedRateLimitStore {
      constructor() {
        super(redis, prefix);
      }
    };
  }

  incr(key: string, callback: Callback, timeWindow: number, max: number): void {
    const now = Date.now();
    const lease = this.leases.get(key);
    if (lease && lease.expiresAt > now) {
      if (lease.next <= lease.last) {
        const current = lease.next++;
        callback(null, { current, ttl: lease.expiresAt - now });
        return;
      }
      // The window's count has passed the limit: every later request of it is refused, so say
      // so here, without a round trip (a flood of refused requests costs Redis nothing).
      if (lease.last >= max) {
        callback(null, { current: max + 1, ttl: lease.expiresAt - now });
        return;
      }
    }
    this.refill(key, timeWindow, max).then(
      () => this.incr(key, callback, timeWindow, max),
      (error: Error) => callback(error),
    );
  }

  /** Shared by every route: keys already say whose limit they count. */
  child(): this {
    return this;
  }

  private refill(key: string, timeWindow: number, max: number): Promise<void> {
    let running = this.refills.get(key);
    if (running) return running;
    const size = Math.max(1, Math.min(1000, Math.floor(max / 100)));
    // The window's end is counted from before the request: a lease never outlives its window.
    const sentAt = Date.now();
    running = this.lease(this.prefix + key, size, timeWindow)
      .then(([last, ttl]) => {
        if (this.leases.size >= MAX_KEYS) this.sweep();
        this.leases.set(key, { next: last - size + 1, last, expiresAt: sentAt + ttl });
      })
      .finally(() => this.refills.delete(key));
    this.refills.set(key, running);
    return running;
  }

  private sweep() {
    const now = Date.now();
    for (const [key, lease] of this.leases) if (lease.expiresAt <= now) this.leases.delete(key);
    if (this.leases.size >= MAX_KEYS) this.leases.clear();
  }
}
