import { AuthService } from './auth/auth-service.js';
import { OtpService } from './auth/otp-service.js';
import { SessionService } from './auth/session-service.js';
import { TokenService } from './auth/token-service.js';
import { currentTier, type Tier } from './billing/tier.js';
import type { Config } from './config.js';
import { createDatabase, type DatabaseHandle, ensureDatabase } from './db/client.js';
import { runMigrations } from './db/migrate.js';
import { type Clock, systemClock } from './lib/clock.js';
import type { Logger } from './lib/logger.js';
import { Metrics } from './lib/metrics.js';
import { connectRedis, createRedis, type Redis, RedisKeys } from './lib/redis.js';
import { UserRepository } from './users/user-repository.js';

/** Everything the API and the worker share; each piece closes itself in `close()`. */
export interface Container {
  config: Config;
  logger: Logger;
  clock: Clock;
  metrics: Metrics;
  database: DatabaseHandle;
  redis: Redis;
  keys: RedisKeys;
  users: UserRepository;
  tokens: TokenService;
  sessions: SessionService;
  otps: OtpService;
  auth: AuthService;
  /** The user's tier, read fresh from the database. */
  tierOf(userId: string): Promise<Tier>;
  close(): Promise<void>;
}

export interface ContainerOptions {
  clock?: Clock;
  /** Skip database creation and migrations (tests prepare their database once per run). */
  skipMigrations?: boolean;
}

export async function createContainer(
  config: Config,
  logger: Logger,
  options: ContainerOptions = {},
): Promise<Container> {
  if (!options.skipMigrations) await ensureDatabase(config.databaseUrl);
  const database = createDatabase(config.databaseUrl);
  const redis = createRedis(config.redisUrl);
  watchRedis(redis, logger);
  try {
    if (!options.skipMigrations) await runMigrations(database.pool);
    await connectRedis(redis, config.redisUrl);
  } catch (error) {
    await database.close();
    redis.disconnect();
    throw error;
  }

  const closers: Array<() => Promise<void>> = [];
  const clock = options.clock ?? systemClock;
  const keys = new RedisKeys(config.redisPrefix);
  const db = database.db;
  const users = new UserRepository(db);
  const tokens = new TokenService({
    secret: config.jwt.secret,
    issuer: config.jwt.issuer,
    audience: config.jwt.audience,
    ttlSeconds: config.jwt.accessTtlSeconds,
  });
  const sessions = new SessionService({
    db,
    redis,
    keys,
    tokens,
    clock,
    logger,
    refreshTtlDays: config.jwt.refreshTtlDays,
  });
  const otps = new OtpService({ redis, keys, secret: config.jwt.secret });
  const auth = new AuthService({ config, db, users, otps, sessions, clock, logger });

  const container: Container = {
    config,
    logger,
    clock,
    metrics: new Metrics(),
    database,
    redis,
    keys,
    users,
    tokens,
    sessions,
    otps,
    auth,
    tierOf: (userId) => currentTier(db, userId, clock.now(), config.pastDueGraceDays),
    close: async () => {
      for (const close of closers.reverse()) await close().catch(() => {});
      await database.close();
      redis.disconnect();
    },
  };
  return container;
}

/** Logs a lost and a regained Redis link once each, not once per reconnect attempt. */
function watchRedis(redis: Redis, logger: Logger) {
  let down = false;
  redis.on('error', (error: Error) => {
    if (down) return;
    down = true;
    logger.warn({ err: error.message }, 'redis unreachable; reconnecting');
  });
  redis.on('ready', () => {
    if (!down) return;
    down = false;
    logger.info('redis reconnected');
  });
}
