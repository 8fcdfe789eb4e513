import { Redis, type RedisOptions } from 'ioredis';

export type { Redis };

const retryStrategy = (times: number) => Math.min(100 * 2 ** Math.min(times, 5), 2000);

/**
 * The client for our own commands. Without an offline queue a command fails at once while Redis
 * is down, so requests answer 503 instead of hanging; the client reconnects by itself.
 */
export function createRedis(url: string, overrides: RedisOptions = {}): Redis {
  return new Redis(url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    commandTimeout: 2000,
    retryStrategy,
    ...overrides,
  });
}

/** BullMQ workers block on Redis and must retry forever (`maxRetriesPerRequest: null`). */
export function createWorkerRedis(url: string): Redis {
  return new Redis(url, {
    maxRetriesPerRequest: null,
    enableReadyCheck: false,
    connectTimeout: 2000,
    retryStrategy,
  });
}

/** Namespaces every key of ours under REDIS_PREFIX. */
export class RedisKeys {
  constructor(readonly prefix: string) {}

  key(...parts: Array<string | number>): string {
    return this.prefix + parts.join(':');
  }
}

export async function connectRedis(redis: Redis, url: string): Promise<void> {
  try {
    if (redis.status === 'wait') await redis.connect();
    await redis.ping();
  } catch (error) {
    redis.disconnect();
    throw new Error(
      `Cannot reach Redis at ${safeUrl(url)} (${(error as Error).message}). Start Redis (for example: redis-server --daemonize yes) or set REDIS_URL.`,
    );
  }
}

/** A URL without its password, for messages and logs. */
export function safeUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return '<invalid url>';
  }
}

/**
 * A Lua script as a command of `redis` (EVALSHA, with ioredis loading the script when Redis
 * does not know it), defined once per client however many services ask for it. Without
 * `numberOfKeys`, the caller passes the key count first.
 */
export function scriptCommand<F extends (...args: never[]) => Promise<unknown>>(
  redis: Redis,
  name: string,
  lua: string,
  numberOfKeys?: number,
): F {
  const commands = redis as unknown as Record<string, F | undefined>;
  if (!commands[name]) {
    redis.defineCommand(name, numberOfKeys === undefined ? { lua } : { numberOfKeys, lua });
  }
  return (commands[name] as F).bind(redis) as F;
}
