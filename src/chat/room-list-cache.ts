import { batched } from '../lib/batch.js';
import type { InvalidationBus, LocalCache } from '../lib/local-cache.js';
import { type Redis, type RedisKeys, scriptCommand } from '../lib/redis.js';
import type { ChatroomDto } from './message-dto.js';

/** Five minutes: a bound on staleness if an invalidation is ever missed. */
const TTL_SECONDS = 300;
const LOCK_MS = 3000;
const WAIT_STEP_MS = 25;
const WAIT_STEPS = 40;
/** The process cache's name on the invalidation bus. */
const LOCAL_CACHE = 'rooms';
/** Lists longer than this (characters of JSON) are not kept in the process. */
const LOCAL_MAX_CHARS = 64 * 1024;

// KEYS: pairs of (version counter, cached list) of each user. ARGV: bus channel, bus message.
// Bumps each version, deletes each list, and publishes the invalidation, atomically.
const INVALIDATE_SCRIPT = `
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], 86400)
  redis.call('DEL', KEYS[i + 1])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return #KEYS / 2
`;

type InvalidateCommand = (numberOfKeys: number, ...keysAndArgs: string[]) => Promise<number>;

/** `json` is the JSON array of the rooms, ready to be sent as it is. */
export type CacheResult = { json: string; hit: boolean };

/**
 * Each user's chatroom list, cached as the JSON it is sent as: in this process (dropped through
 * the invalidation bus) in front of Redis (shared by every instance). A version counter makes
 * the Redis copy race-free (a list loaded before an invalidation is never served after it), and
 * a short lock lets one request load a missing list while concurrent ones, on any instance, wait
 * for it instead of all hitting PostgreSQL. Redis holds `<version>:<json>`.
 */
export class RoomListCache {
  private readonly local: LocalCache<string>;
  private readonly invalidateBatch: (userId: string) => Promise<undefined>;
  private readonly invalidateLists: InvalidateCommand;

  constructor(
    private readonly redis: Redis,
    private readonly keys: RedisKeys,
    private readonly invalidation: InvalidationBus,
  ) {
    this.local = invalidation.cache<string>(LOCAL_CACHE, 50_000);
    this.invalidateBatch = batched((userIds: readonly string[]) => this.invalidateAll(userIds));
    this.invalidateLists = scriptCommand<InvalidateCommand>(
      redis,
      'roomListInvalidate',
      INVALIDATE_SCRIPT,
    );
  }

  private listKey(userId: string) {
    return this.keys.key('rooms', userId);
  }

  private versionKey(userId: string) {
    return this.keys.key('rooms-v', userId);
  }

  private async lookup(userId: string): Promise<{ json: string | null; version: number }> {
    const [raw, rawVersion] = await this.redis.mget(this.listKey(userId), this.versionKey(userId));
    const version = Number(rawVersion ?? 0);
    if (raw) {
      const colon = raw.indexOf(':');
      if (colon > 0 && Number(raw.slice(0, colon)) === version) {
        return { json: raw.slice(colon + 1), version };
      }
    }
    return { json: null, version };
  }

  async get(userId: string, load: () => Promise<ChatroomDto[]>): Promise<CacheResult> {
    // A hit unless this very request loaded the list from PostgreSQL (a request that joins
    // another's load did not).
    let hit = true;
    const json = await this.local.load(
      userId,
      async () => {
        const fetched = await this.fetch(userId, load);
        hit = fetched.hit;
        return fetched.json;
      },
      // A very long list (hundreds of rooms with long instructions) stays in Redis only: the
      // process cache is bounded by entries, and these would make its memory unbounded.
      (fetched) => fetched.length <= LOCAL_MAX_CHARS,
    );
    return { json, hit };
  }

  private async fetch(userId: string, load: () => Promise<ChatroomDto[]>): Promise<CacheResult> {
    const first = await this.lookup(userId);
    if (first.json !== null) return { json: first.json, hit: true };

    const lockKey = this.keys.key('rooms-lock', userId);
    const locked = await this.redis.set(lockKey, '1', 'PX', LOCK_MS, 'NX');
    if (!locked) {
      for (let i = 0; i < WAIT_STEPS; i++) {
        await new Promise((resolve) => setTimeout(resolve, WAIT_STEP_MS));
        const again = await this.lookup(userId);
        if (again.json !== null) return { json: again.json, hit: true };
      }
      return { json: JSON.stringify(await load()), hit: false };
    }
    try {
      const json = JSON.stringify(await load());
      await this.redis.set(this.listKey(userId), `${first.version}:${json}`, 'EX', TTL_SECONDS);
      return { json, hit: false };
    } finally {
      await this.redis.del(lockKey).catch(() => {});
    }
  }

  /**
   * Call after any change to the user's list (create, rename, delete, new activity). The
   * invalidations of the moment go to Redis as one script call (`batched`), with one message on
   * the bus.
   */
  async invalidate(userId: string): Promise<void> {
    this.invalidation.dropLocal(LOCAL_CACHE, [userId]);
    await this.invalidateBatch(userId);
  }

  private async invalidateAll(userIds: readonly string[]): Promise<undefined[]> {
    const bus = this.invalidation;
    const unique = [...new Set(userIds)];
    const keys = unique.flatMap((userId) => [this.versionKey(userId), this.listKey(userId)]);
    await this.invalidateLists(keys.length, ...keys, bus.channel, bus.message(LOCAL_CACHE, unique));
    return userIds.map(() => undefined);
  }
}
