import { afterAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/api/app.js';
import { loadConfig } from '../src/config.js';
import { createContainer } from '../src/container.js';
import { createLogger } from '../src/lib/logger.js';
import {
  createTestContext,
  type TestContext,
  testEnv,
  testRedisPrefix,
} from './helpers/context.js';
import { type PostgresInstance, startPostgresInstance } from './helpers/postgres-instance.js';
import { type RedisInstance, startRedisInstance } from './helpers/redis-instance.js';
import { signIn } from './helpers/users.js';

const cleanups: Array<() => Promise<void>> = [];
afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

async function readyz(ctx: Pick<TestContext, 'app'>) {
  const started = performance.now();
  const res = await ctx.app.inject({ method: 'GET', url: '/readyz' });
  return { res, ms: performance.now() - started };
}

async function eventually(probe: () => Promise<boolean>, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await probe()) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error('condition not reached in time');
}

describe('readiness follows the backing services', () => {
  it('answers 503 quickly while Redis is down and 200 again once it is back', async () => {
    const redis: RedisInstance = await startRedisInstance();
    cleanups.push(redis.destroy);
    const ctx = await createTestContext({ env: { REDIS_URL: redis.url } });
    cleanups.push(ctx.close);
    expect((await readyz(ctx)).res.statusCode).toBe(200);

    await redis.stop();
    const down = await readyz(ctx);
    expect(down.res.statusCode).toBe(503);
    expect(down.ms).toBeLessThan(2000);
    expect(down.res.headers['retry-after']).toBeDefined();
    expect(down.res.json()).toMatchObject({
      error: {
        code: 'UNAVAILABLE',
        requestId: expect.any(String),
        details: { checks: { postgres: 'ok', redis: 'unavailable' } },
      },
    });

    await redis.start();
    await eventually(async () => (await readyz(ctx)).res.statusCode === 200);
  });

  it('answers 503 quickly while PostgreSQL is down and 200 again once it is back', async () => {
    const postgres: PostgresInstance = await startPostgresInstance();
    cleanups.push(postgres.destroy);
    const config = loadConfig(
      testEnv({ DATABASE_URL: postgres.url('app'), REDIS_PREFIX: testRedisPrefix() }),
    );
    const container = await createContainer(config, createLogger('silent'));
    const app = await buildApp(container);
    cleanups.push(async () => {
      await app.close();
      await container.close();
    });
    expect((await readyz({ app })).res.statusCode).toBe(200);
    const user = await signIn(app);

    await postgres.stop();
    const down = await readyz({ app });
    expect(down.res.statusCode).toBe(503);
    expect(down.ms).toBeLessThan(2000);
    expect(down.res.json()).toMatchObject({
      error: { code: 'UNAVAILABLE', details: { checks: { postgres: 'unavailable', redis: 'ok' } } },
    });
    // A route that needs the database answers 503 too, never a 500.
    const started = performance.now();
    const rooms = await app.inject({ method: 'GET', url: '/chatroom', headers: user.headers });
    expect(rooms.statusCode, rooms.body).toBe(503);
    expect(rooms.json().error.code).toBe('UNAVAILABLE');
    expect(rooms.headers['retry-after']).toBeDefined();
    expect(performance.now() - started).toBeLessThan(2000);

    await postgres.start();
    await eventually(async () => (await readyz({ app })).res.statusCode === 200);
  });
});
