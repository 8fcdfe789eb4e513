import { randomBytes } from 'node:crypto';
import { z } from 'zod';

const emptyToUndefined = (value: unknown) =>
  typeof value === 'string' && value.trim() === '' ? undefined : value;

const optionalString = z.preprocess(emptyToUndefined, z.string().optional());

const port = z.coerce
  .number({ error: 'must be a port number' })
  .int('must be a port number')
  .min(0, 'must be a port number')
  .max(65535, 'must be a port number');

const positiveInt = z.coerce.number({ error: 'must be a positive whole number' }).int().positive();

/** A positive whole number, or empty / `unlimited` for no limit (`null`). */
const optionalLimit = z.preprocess((value) => {
  const v = emptyToUndefined(value);
  return typeof v === 'string' && v.toLowerCase() === 'unlimited' ? undefined : v;
}, z.coerce.number({ error: 'must be a whole number or "unlimited"' }).int().min(0).optional());

const url = (protocols: string[]) =>
  z.string().refine(
    (value) => {
      try {
        return protocols.includes(new URL(value).protocol);
      } catch {
        return false;
      }
    },
    `must be a URL (${protocols.join(' or ')})`,
  );

const boolean = z.preprocess(
  (value) => (typeof value === 'string' ? value.trim().toLowerCase() : value),
  z
    .enum(['true', 'false', '1', '0', 'yes', 'no'])
    .transform((v) => ['true', '1', 'yes'].includes(v)),
);

export const envSchema = z
  .object({
    PORT: port.default(3000),
    HOST: z.string().min(1).default('0.0.0.0'),
    DATABASE_URL: url(['postgres:', 'postgresql:']).default(
      'postgres://postgres@127.0.0.1:5432/gemini_chat',
    ),
    REDIS_URL: url(['redis:', 'rediss:']).default('redis://127.0.0.1:6379'),
    /** `development` allows a generated JWT secret; anything else requires JWT_SECRET. */
    APP_ENV: z.enum(['development', 'production', 'test']).default('development'),
    JWT_SECRET: z.preprocess(
      emptyToUndefined,
      z.string().min(32, 'must be at least 32 characters').optional(),
    ),
    JWT_ISSUER: z.string().min(1).default('gemini-chat'),
    JWT_AUDIENCE: z.string().min(1).default('gemini-chat-api'),
    ACCESS_TOKEN_TTL_SECONDS: positiveInt.default(15 * 60),
    REFRESH_TOKEN_TTL_DAYS: positiveInt.default(30),
    OTP_DELIVERY: z.enum(['response', 'log']).default('response'),
    LLM_PROVIDER: z.preprocess(emptyToUndefined, z.enum(['gemini', 'offline']).optional()),
    GEMINI_API_KEY: optionalString,
    GEMINI_MODEL: z.string().min(1).default('gemini-2.5-flash'),
    GEMINI_BASE_URL: z.preprocess(emptyToUndefined, url(['http:', 'https:']).optional()),
    LLM_HISTORY_TOKEN_BUDGET: positiveInt.default(8000),
    LLM_TIMEOUT_SECONDS: positiveInt.default(120),
    LLM_RETRY_BASE_MS: positiveInt.default(1000),
    STRIPE_SECRET_KEY: optionalString,
    STRIPE_WEBHOOK_SECRET: optionalString,
    STRIPE_PRICE_ID: optionalString,
    STRIPE_API_BASE: z.preprocess(emptyToUndefined, url(['http:', 'https:']).optional()),
    CHECKOUT_SUCCESS_URL: url(['http:', 'https:']).default(
      'http://localhost:3000/?checkout=success&session_id={CHECKOUT_SESSION_ID}',
    ),
    CHECKOUT_CANCEL_URL: url(['http:', 'https:']).default('http://localhost:3000/?checkout=cancel'),
    PORTAL_RETURN_URL: url(['http:', 'https:']).default('http://localhost:3000/'),
    PAST_DUE_GRACE_DAYS: z.coerce.number().int().min(0).default(3),
    BASIC_DAILY_LIMIT: z.coerce.number().int().min(0).default(5),
    PRO_DAILY_LIMIT: optionalLimit,
    RATE_LIMIT_PUBLIC_PER_MINUTE: positiveInt.default(60),
    RATE_LIMIT_USER_PER_MINUTE: positiveInt.default(300),
    LOCAL_CACHE_SECONDS: z.coerce.number().int().min(0).max(3600).default(60),
    ROLE: z.enum(['all', 'api', 'worker']).default('all'),
    WORKER_CONCURRENCY: positiveInt.default(50),
    WORKER_LOCK_SECONDS: positiveInt.default(30),
    REPLY_STALE_SECONDS: positiveInt.default(300),
    SWEEP_INTERVAL_SECONDS: positiveInt.default(30),
    REDIS_PREFIX: z.string().min(1).default('gc:'),
    DEFAULT_PHONE_REGION: z
      .string()
      .regex(/^[A-Z]{2}$/, 'must be a two-letter region code such as IN')
      .default('IN'),
    CORS_ORIGINS: z.preprocess(emptyToUndefined, z.string().optional()).transform((value) =>
      value
        ? value
            .split(',')
            .map((o) => o.trim())
            .filter(Boolean)
        : [],
    ),
    TRUST_PROXY: boolean.default(false),
    LOG_LEVEL: z
      .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('info'),
    ADMIN_TOKEN: z.preprocess(
      emptyToUndefined,
      z.string().min(16, 'must be at least 16 characters').optional(),
    ),
    SHUTDOWN_TIMEOUT_SECONDS: positiveInt.default(25),
  })
  .superRefine((env, ctx) => {
    if (!env.JWT_SECRET && env.APP_ENV !== 'development') {
      ctx.addIssue({
        code: 'custom',
        path: ['JWT_SECRET'],
        message: `is required when APP_ENV is ${env.APP_ENV}`,
      });
    }
    if (env.LLM_PROVIDER === 'gemini' && !env.GEMINI_API_KEY) {
      ctx.addIssue({
        code: 'custom',
        path: ['GEMINI_API_KEY'],
        message: 'is required when LLM_PROVIDER is gemini',
      });
    }
  });

export type Env = z.infer<typeof envSchema>;

export interface Config {
  port: number;
  host: string;
  databaseUrl: string;
  redisUrl: string;
  appEnv: Env['APP_ENV'];
  jwt: {
    secret: Uint8Array;
    /** True when no JWT_SECRET was given and one was generated for this process. */
    generated: boolean;
    issuer: string;
    audience: string;
    accessTtlSeconds: number;
    refreshTtlDays: number;
  };
  otpDelivery: Env['OTP_DELIVERY'];
  llm: {
    provider: 'gemini' | 'offline';
    geminiApiKey: string | undefined;
    geminiModel: string;
    geminiBaseUrl: string | undefined;
    historyTokenBudget: number;
    timeoutMs: number;
    /** First retry delay after a transient provider failure; doubles per attempt. */
    retryBaseMs: number;
  };
  stripe:
    | {
        secretKey: string;
        webhookSecret: string;
        priceId: string;
        apiBase: string | undefined;
      }
    | undefined;
  checkoutSuccessUrl: string;
  checkoutCancelUrl: string;
  portalReturnUrl: string;
  pastDueGraceDays: number;
  basicDailyLimit: number;
  /** `null` means unlimited. */
  proDailyLimit: number | null;
  rateLimit: { publicPerMinute: number; userPerMinute: number };
  /** TTL of the API process caches (sessions, room lists); 0 turns them off. */
  localCacheSeconds: number;
  role: Env['ROLE'];
  workerConcurrency: number;
  /** How long a worker's claim on a reply lasts without renewal (a killed worker's replies wait this long). */
  workerLockSeconds: number;
  replyStaleSeconds: number;
  sweepIntervalSeconds: number;
  redisPrefix: string;
  defaultPhoneRegion: string;
  corsOrigins: string[];
  trustProxy: boolean;
  logLevel: Env['LOG_LEVEL'];
  adminToken: string | undefined;
  shutdownTimeoutMs: number;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Parses the environment once; throws a ConfigError whose message names each bad variable. */
export function loadConfig(source: NodeJS.ProcessEnv = process.env): Config {
  const parsed = envSchema.safeParse(source);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => {
      const name = issue.path.join('.') || 'environment';
      return `${name} ${issue.message}`;
    });
    throw new ConfigError(`Invalid configuration: ${problems.join('; ')}`);
  }
  const env = parsed.data;
  const stripeParts = [env.STRIPE_SECRET_KEY, env.STRIPE_WEBHOOK_SECRET, env.STRIPE_PRICE_ID];
  return {
    port: env.PORT,
    host: env.HOST,
    databaseUrl: env.DATABASE_URL,
    redisUrl: env.REDIS_URL,
    appEnv: env.APP_ENV,
    jwt: {
      secret: env.JWT_SECRET
        ? new TextEncoder().encode(env.JWT_SECRET)
        : new Uint8Array(randomBytes(32)),
      generated: !env.JWT_SECRET,
      issuer: env.JWT_ISSUER,
      audience: env.JWT_AUDIENCE,
      accessTtlSeconds: env.ACCESS_TOKEN_TTL_SECONDS,
      refreshTtlDays: env.REFRESH_TOKEN_TTL_DAYS,
    },
    otpDelivery: env.OTP_DELIVERY,
    llm: {
      provider: env.LLM_PROVIDER ?? (env.GEMINI_API_KEY ? 'gemini' : 'offline'),
      geminiApiKey: env.GEMINI_API_KEY,
      geminiModel: env.GEMINI_MODEL,
      geminiBaseUrl: env.GEMINI_BASE_URL,
      historyTokenBudget: env.LLM_HISTORY_TOKEN_BUDGET,
      timeoutMs: env.LLM_TIMEOUT_SECONDS * 1000,
      retryBaseMs: env.LLM_RETRY_BASE_MS,
    },
    stripe: stripeParts.every(Boolean)
      ? {
          secretKey: env.STRIPE_SECRET_KEY as string,
          webhookSecret: env.STRIPE_WEBHOOK_SECRET as string,
          priceId: env.STRIPE_PRICE_ID as string,
          apiBase: env.STRIPE_API_BASE,
        }
      : undefined,
    checkoutSuccessUrl: env.CHECKOUT_SUCCESS_URL,
    checkoutCancelUrl: env.CHECKOUT_CANCEL_URL,
    portalReturnUrl: env.PORTAL_RETURN_URL,
    pastDueGraceDays: env.PAST_DUE_GRACE_DAYS,
    basicDailyLimit: env.BASIC_DAILY_LIMIT,
    proDailyLimit: env.PRO_DAILY_LIMIT ?? null,
    rateLimit: {
      publicPerMinute: env.RATE_LIMIT_PUBLIC_PER_MINUTE,
      userPerMinute: env.RATE_LIMIT_USER_PER_MINUTE,
    },
    localCacheSeconds: env.LOCAL_CACHE_SECONDS,
    role: env.ROLE,
    workerConcurrency: env.WORKER_CONCURRENCY,
    workerLockSeconds: env.WORKER_LOCK_SECONDS,
    replyStaleSeconds: env.REPLY_STALE_SECONDS,
    sweepIntervalSeconds: env.SWEEP_INTERVAL_SECONDS,
    redisPrefix: env.REDIS_PREFIX,
    defaultPhoneRegion: env.DEFAULT_PHONE_REGION,
    corsOrigins: env.CORS_ORIGINS,
    trustProxy: env.TRUST_PROXY,
    logLevel: env.LOG_LEVEL,
    adminToken: env.ADMIN_TOKEN,
    shutdownTimeoutMs: env.SHUTDOWN_TIMEOUT_SECONDS * 1000,
  };
}
