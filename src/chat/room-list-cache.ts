import type { Redis, RedisKeys } from '../lib/redis.js';
import type { ChatroomDto } from './message-dto.js';

/** Five minutes: a bound on staleness if an invalidation is ever missed. */
const TTL_SECONDS = 300;
const LOCK_MS = 3000;
const WAIT_STEP_MS = 25;
const WAIT_STEPS = 40;

interface Cached {
  v: number;
  rooms: ChatroomDto[];
}

export type CacheResult = { rooms: ChatroomDto[]; hit: boolean };

/**
 * Each user's chatroom list, cached in Redis. A version counter makes invalidation race-free (a
 * list loaded before an invalidation is never served after it), and a short lock lets one
 * request load a missing list while concurrent ones wait for it instead of all hitting
 * PostgreSQL.
 */
export class RoomListCache {
  constructor(
    private readonly redis: Redis,
    private readonly keys: RedisKeys,
  ) {}

  private listKey(userId: string) {
    return this.keys.key('rooms', userId);
  }

  private versionKey(userId: string) {
    return this.keys.key('rooms-v', userId);
  }

  private async lookup(userId: string): Promise<{ cached: ChatroomDto[] | null; version: number }> {
    const [raw, rawVersion] = await this.redis.mget(this.listKey(userId), this.versionKey(userId));
    const version = Number(rawVersion ?? 0);
    if (raw) {
      const parsed = JSON.parse(raw) as Cached;
      if (parsed.v === version) return { cached: parsed.rooms, version };
    }
    return { cached: null, version };
  }

  async get(userId: string, load: () => Promise<ChatroomDto[]>): Promise<CacheResult> {
    const first = await this.lookup(userId);
    if (first.cached) return { rooms: first.cached, hit: true };

    const lockKey = this.keys.key('rooms-lock', userId);
    const locked = await this.redis.set(lockKey, '1', 'PX', LOCK_MS, 'NX');
    if (!locked) {
      for (let i = 0; i < WAIT_STEPS; i++) {
        await new Promise((resolve) => setTimeout(resolve, WAIT_STEP_MS));
        const again = await this.lookup(userId);
        if (again.cached) return { rooms: again.cached, hit: true };
      }
      return { rooms: await load(), hit: false };
    }
    try {
      const rooms = await load();
      const value: Cached = { v: first.version, rooms };
      await this.redis.set(this.listKey(userId), JSON.stringify(value), 'EX', TTL_SECONDS);
      return { rooms, hit: false };
    } finally {
      await this.redis.del(lockKey).catch(() => {});
    }
  }

  /** Call after any change to the user's list (create, rename, delete, new activity). */
  async invalidate(userId: string): Promise<void> {
    await this.redis
      .multi()
      .incr(this.versionKey(userId))
      .expire(this.versionKey(userId), 86_400)
      .del(this.listKey(userId))
      .exec();
  }
}
