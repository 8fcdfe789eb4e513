import type { Queue } from 'bullmq';
import { AuthService } from './auth/auth-service.js';
import { OtpService } from './auth/otp-service.js';
import { SessionService } from './auth/session-service.js';
import { TokenService } from './auth/token-service.js';
import { QuotaService } from './billing/quota-service.js';
import { type Tier, tierOf as tierFromRows } from './billing/tier.js';
import { CancelBus } from './chat/cancel-bus.js';
import { ChatRepository } from './chat/chat-repository.js';
import { ChatService } from './chat/chat-service.js';
import { ReplyStreams } from './chat/reply-stream.js';
import { RoomListCache } from './chat/room-list-cache.js';
import type { Config } from './config.js';
import { ChangeFeed } from './db/change-feed.js';
import { createDatabase, type DatabaseHandle, ensureDatabase } from './db/client.js';
import { runMigrations } from './db/migrate.js';
import { type Clock, systemClock } from './lib/clock.js';
import { InvalidationBus } from './lib/local-cache.js';
import type { Logger } from './lib/logger.js';
import { Metrics } from './lib/metrics.js';
import { connectRedis, createRedis, type Redis, RedisKeys } from './lib/redis.js';
import { createLlmProvider, type LlmProvider } from './llm/index.js';
import { createMaintenanceQueue, createReplyQueue, type ReplyJob } from './queue/queues.js';
import { type TierFacts, UserRepository } from './users/user-repository.js';

/** Everything the API and the worker share; `close()` closes what it opened. */
export interface Container {
  config: Config;
  logger: Logger;
  clock: Clock;
  metrics: Metrics;
  database: DatabaseHandle;
  redis: Redis;
  keys: RedisKeys;
  /** Invalidations of the API process caches; `start()` it where requests are served. */
  invalidation: InvalidationBus;
  /** Process caches the database keeps true (accounts); started by the API. */
  accountChanges: ChangeFeed;
  users: UserRepository;
  tokens: TokenService;
  sessions: SessionService;
  otps: OtpService;
  auth: AuthService;
  chatRepository: ChatRepository;
  chat: ChatService;
  quota: QuotaService;
  streams: ReplyStreams;
  cancelBus: CancelBus;
  replyQueue: Queue<ReplyJob>;
  maintenanceQueue: Queue;
  llm: LlmProvider;
  /** The user's tier, from their subscriptions in the database (see findWithSubscriptions). */
  tierOf(userId: string): Promise<Tier>;
  /** The tier that subscriptions just read from the database give (see `tierOf`). */
  tierFrom(subscriptions: TierFacts[]): Tier;
  /** Daily prompt limit of a tier; null is unlimited. */
  limitFor(tier: Tier): number | null;
  close(): Promise<void>;
}

export interface ContainerOptions {
  clock?: Clock;
  /** Skip database creation and migrations (tests prepare their database once per run). */
  skipMigrations?: boolean;
  /** Replace the configured model (tests, benchmarks). */
  llm?: LlmProvider;
}

export async function createContainer(
  config: Config,
  logger: Logger,
  options: ContainerOptions = {},
): Promise<Container> {
  if (!options.skipMigrations) await ensureDatabase(config.databaseUrl);
  const database = createDatabase(config.databaseUrl);
  const redis = createRedis(config.redisUrl);
  // The queues' own connection: BullMQ defines its forty-odd scripts on the client it is given,
  // and ioredis copies every defined script onto each pipeline and MULTI it creates, which had
  // made the service's own small pipelines cost more than the commands in them.
  const queueRedis = createRedis(config.redisUrl);
  watchRedis(redis, logger);
  watchRedis(queueRedis, logger);
  try {
    if (!options.skipMigrations) await runMigrations(database.pool);
    await connectRedis(redis, config.redisUrl);
    await connectRedis(queueRedis, config.redisUrl);
  } catch (error) {
    await database.close();
    redis.disconnect();
    queueRedis.disconnect();
    throw error;
  }

  const clock = options.clock ?? systemClock;
  const keys = new RedisKeys(config.redisPrefix);
  const db = database.db;
  const invalidation = new InvalidationBus({
    redisUrl: config.redisUrl,
    channel: keys.key('invalidate'),
    redis,
    ttlMs: config.localCacheSeconds * 1000,
    logger,
  });
  const accountChanges = new ChangeFeed({
    databaseUrl: config.databaseUrl,
    pool: database.pool,
    channel: 'account_changed',
    ttlMs: config.localCacheSeconds * 1000,
    logger,
  });
  const users = new UserRepository(db, database.pool, accountChanges);
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
    invalidation,
  });
  const otps = new OtpService({ redis, keys, secret: config.jwt.secret });
  const auth = new AuthService({ config, db, users, otps, sessions, clock, logger });

  const chatRepository = new ChatRepository(db);
  const quota = new QuotaService({
    redis,
    keys,
    clock,
    countFromDatabase: (userId, day) => chatRepository.countQuotaDay(userId, day),
  });
  const streams = new ReplyStreams(redis, keys);
  const cancelBus = new CancelBus(redis, keys);
  const replyQueue = createReplyQueue(queueRedis, config.redisPrefix);
  const maintenanceQueue = createMaintenanceQueue(queueRedis, config.redisPrefix);
  const tierFrom = (rows: TierFacts[]) => tierFromRows(rows, clock.now(), config.pastDueGraceDays);
  // Through the batched account read: one query for the tiers of many concurrent prompts.
  const tierOf = async (userId: string) =>
    tierFrom((await users.findWithSubscriptions(userId))?.subscriptions ?? []);
  const limitFor = (tier: Tier) => (tier === 'pro' ? config.proDailyLimit : config.basicDailyLimit);
  const metrics = new Metrics();
  const chat = new ChatService({
    db,
    chat: chatRepository,
    cache: new RoomListCache(redis, keys, invalidation),
    quota,
    replyQueue,
    streams,
    cancelBus,
    clock,
    logger,
    metrics,
    tierOf,
    limitFor,
  });
  const llm = options.llm ?? createLlmProvider(config.llm);

  return {
    config,
    logger,
    clock,
    metrics,
    database,
    redis,
    keys,
    invalidation,
    accountChanges,
    users,
    tokens,
    sessions,
    otps,
    auth,
    chatRepository,
    chat,
    quota,
    streams,
    cancelBus,
    replyQueue,
    maintenanceQueue,
    llm,
    tierOf,
    tierFrom,
    limitFor,
    close: async () => {
      await invalidation.close();
      await accountChanges.close();
      await replyQueue.close().catch(() => {});
      await maintenanceQueue.close().catch(() => {});
      await database.close();
      redis.disconnect();
      queueRedis.disconnect();
    },
  };
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
