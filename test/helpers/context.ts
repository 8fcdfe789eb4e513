import { randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import pg from 'pg';
import { inject } from 'vitest';
import { type App, type BuildAppOptions, buildApp } from '../../src/api/app.js';
import { type Config, type Env, loadConfig } from '../../src/config.js';
import { type Container, createContainer } from '../../src/container.js';
import type { Clock } from '../../src/lib/clock.js';
import { createLogger } from '../../src/lib/logger.js';
import type { LlmProvider } from '../../src/llm/index.js';
import { type RunningWorker, startWorker, type WorkerTuning } from '../../src/worker.js';
import { ADMIN_URL, PG_BASE_URL, REDIS_URL } from './env.js';

export type EnvOverrides = Partial<Record<keyof Env, string>>;

/** Captures every log line of a test's app, parsed. */
export class LogCapture extends Writable {
  readonly lines: string[] = [];

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: () => void) {
    this.lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
    callback();
  }

  get text(): string {
    return this.lines.join('\n');
  }

  records(): Array<Record<string, unknown>> {
    return this.lines.map((line) => JSON.parse(line) as Record<string, unknown>);
  }
}

let counter = 0;

/** A database of the test's own, cloned from the run's migrated template. */
export async function createTestDatabase(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `gct_${inject('runId')}_${process.pid}_${counter++}_${randomBytes(2).toString('hex')}`;
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        await admin.query(`create database "${name}" template "${inject('templateDatabase')}"`);
        break;
      } catch (error) {
        // Two files cloning the template at the same instant: PostgreSQL refuses one; retry.
        if (attempt >= 20 || (error as { code?: string }).code !== '55006') throw error;
        await new Promise((resolve) => setTimeout(resolve, 50 + Math.random() * 100));
      }
    }
  } finally {
    await admin.end();
  }
  return {
    url: `${PG_BASE_URL}/${name}`,
    drop: async () => {
      const client = new pg.Client({ connectionString: ADMIN_URL });
      await client.connect();
      await client.query(`drop database if exists "${name}" with (force)`);
      await client.end();
    },
  };
}

export function testRedisPrefix(): string {
  return `gct:${inject('runId')}:${process.pid}:${counter++}:`;
}

export function testEnv(overrides: EnvOverrides = {}): Record<string, string> {
  return {
    APP_ENV: 'test',
    JWT_SECRET: 'test-secret-that-is-long-enough-for-hs256-0123456789',
    LOG_LEVEL: 'info',
    LLM_PROVIDER: 'offline',
    RATE_LIMIT_PUBLIC_PER_MINUTE: '100000',
    RATE_LIMIT_USER_PER_MINUTE: '100000',
    LLM_RETRY_BASE_MS: '50',
    SWEEP_INTERVAL_SECONDS: '1',
    REDIS_URL,
    ...overrides,
  };
}

export interface TestContext {
  config: Config;
  container: Container;
  app: App;
  logs: LogCapture;
  worker: RunningWorker | undefined;
  close(): Promise<void>;
}

export interface TestContextOptions extends BuildAppOptions {
  env?: EnvOverrides;
  clock?: Clock;
  /** Use this database instead of a fresh clone (e.g. a second app instance on the same data). */
  databaseUrl?: string;
  redisPrefix?: string;
  /** Run the reply worker and sweeper in-process too. */
  worker?: boolean | WorkerTuning;
  llm?: LlmProvider;
}

/** Builds the app in-process against a database and Redis prefix of its own. */
export async function createTestContext(options: TestContextOptions = {}): Promise<TestContext> {
  const database = options.databaseUrl ? undefined : await createTestDatabase();
  const prefix = options.redisPrefix ?? testRedisPrefix();
  const config = loadConfig(
    testEnv({
      DATABASE_URL: options.databaseUrl ?? database?.url,
      REDIS_PREFIX: prefix,
      ...options.env,
    }),
  );
  const logs = new LogCapture();
  const logger = createLogger(config.logLevel, logs);
  const container = await createContainer(config, logger, {
    skipMigrations: true,
    ...(options.clock ? { clock: options.clock } : {}),
    ...(options.llm ? { llm: options.llm } : {}),
  });
  const app = await buildApp(container, options);
  await app.ready();
  const worker = options.worker
    ? await startWorker(container, {
        lockDurationMs: 5000,
        stalledIntervalMs: 1000,
        ...(typeof options.worker === 'object' ? options.worker : {}),
      })
    : undefined;
  return {
    config,
    container,
    app,
    logs,
    worker,
    close: async () => {
      await worker?.close(2000);
      await app.close();
      await container.close();
      await database?.drop();
    },
  };
}
