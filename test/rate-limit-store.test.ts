import type { Response } from 'light-my-request';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { App } from '../src/api/app.js';
import { LeasedRateLimitStore } from '../src/api/plugins/rate-limit-store.js';
import { connectRedis, createRedis, type Redis } from '../src/lib/redis.js';
import { expectError } from './helpers/assertions.js';
import {
  createTestContext,
  type TestContext,
  type TestContextOptions,
  testRedisPrefix,
} from './helpers/context.js';
import { REDIS_URL } from './helpers/env.js';
import { type SignedInUser, signIn } from './helpers/users.js';

const MINUTE = 60_000;

type Taken = { current: number; ttl: number };

/** One request number from the store, the way @fastify/rate-limit asks for it. */
function take(store: LeasedRateLimitStore, key: string, max: number, windowMs = MINUTE) {
  return new Promise<Taken>((resolve, reject) => {
    store.incr(key, (error, result) => (error ? reject(error) : resolve(result!)), windowMs, max);
  });
}

/** A second API instance on the first one's database and Redis prefix. */
function sibling(first: TestContext, options: TestContextOptions = {}) {
  return createTestContext({
    ...options,
    databaseUrl: first.config.databaseUrl,
    redisPrefix: first.config.redisPrefix,
  });
}

function me(app: App, user: SignedInUser) {
  return app.inject({ method: 'GET', url: '/user/me', headers: user.headers });
}

/** The Redis counter of a user's current window. */
function counterKey(ctx: TestContext, user: SignedInUser) {
  return ctx.container.keys.key('rate', `u:${user.id}`);
}

function expectRateLimited(res: Response, limit: number) {
  const error = expectError(res, 429, 'RATE_LIMITED');
  expect(error.details).toMatchObject({ limit });
  const retryAfter = Number(res.headers['retry-after']);
  expect(Number.isInteger(retryAfter), `Retry-After: ${res.headers['retry-after']}`).toBe(true);
  expect(retryAfter).toBeGreaterThanOrEqual(1);
  expect(retryAfter).toBeLessThanOrEqual(60);
}

afterEach(() => {
  vi.restoreAllMocks();
});

// ---------------------------------------------------------------------------------------------

describe('LeasedRateLimitStore', () => {
  let redis: Redis;
  const prefix = `${testRedisPrefix()}rate:`;
  let n = 0;
  const freshKey = () => `k${n++}`;

  beforeAll(async () => {
    redis = createRedis(REDIS_URL);
    await connectRedis(redis, REDIS_URL);
  });
  afterAll(() => redis?.disconnect());

  it('takes numbers from Redis in runs of 1% of the limit, at least 1 and at most 1,000', async () => {
    const store = new LeasedRateLimitStore(redis, prefix);
    for (const [max, run] of [
      [5, 1],
      [199, 1],
      [200, 2],
      [300, 3],
      [100_000, 1000],
      [5_000_000, 1000],
    ] as const) {
      const key = freshKey();
      expect(await take(store, key, max)).toMatchObject({ current: 1 });
      expect(Number(await redis.get(prefix + key)), `limit ${max}`).toBe(run);
      // The rest of the run is handed out without Redis; the next number takes a new run.
      for (let i = 2; i <= run; i++) expect((await take(store, key, max)).current).toBe(i);
      expect(Number(await redis.get(prefix + key))).toBe(run);
      expect((await take(store, key, max)).current).toBe(run + 1);
      expect(Number(await redis.get(prefix + key))).toBe(2 * run);
    }
  });

  it('hands every number of a window out once across stores, so no more than the limit pass', async () => {
    const stores = [
      new LeasedRateLimitStore(redis, prefix),
      new LeasedRateLimitStore(redis, prefix),
      new LeasedRateLimitStore(redis, prefix),
    ];
    const key = freshKey();
    const max = 500;
    const taken = await Promise.all(
      Array.from({ length: 900 }, (_, i) => take(stores[i % stores.length]!, key, max)),
    );
    const numbers = taken.map((t) => t.current);
    const allowedNumbers = numbers.filter((current) => current <= max);
    expect(new Set(allowedNumbers).size).toBe(allowedNumbers.length);
    const allowed = allowedNumbers.length;
    expect(allowed).toBeLessThanOrEqual(max);
    // Each store may still hold an unused part of its last run (runs of 5 here).
    expect(allowed).toBeGreaterThanOrEqual(max - stores.length * 4);
    // Every run was taken whole: the counter moved in steps of 5; and once a store's run had
    // passed the limit, it refused the rest without Redis: the 400 refusals moved it by at most
    // one run per store.
    const counter = Number(await redis.get(prefix + key));
    expect(counter % 5).toBe(0);
    expect(counter).toBeLessThanOrEqual(max + stores.length * 5);
  });

  it('shares one Redis round trip among concurrent requests that find the run used up', async () => {
    const store = new LeasedRateLimitStore(redis, prefix);
    const key = freshKey();
    const sent = vi.spyOn(redis, 'sendCommand');
    const taken = await Promise.all(Array.from({ length: 250 }, () => take(store, key, 100_000)));
    expect(taken.map((t) => t.current).sort((x, y) => x - y)).toEqual(
      Array.from({ length: 250 }, (_, i) => i + 1),
    );
    expect(sent.mock.calls.filter(([c]) => c.args.includes(prefix + key))).toHaveLength(1);
    expect(Number(await redis.get(prefix + key))).toBe(1000);
  });

  it('reports the time left in the window, and starts again from 1 in the next window', async () => {
    const store = new LeasedRateLimitStore(redis, prefix);
    const key = freshKey();
    const first = await take(store, key, 100_000, 150);
    expect(first.current).toBe(1);
    expect(first.ttl).toBeGreaterThan(0);
    expect(first.ttl).toBeLessThanOrEqual(150);
    const pttl = await redis.pttl(prefix + key);
    expect(pttl).toBeGreaterThan(0);
    expect(pttl).toBeLessThanOrEqual(150);
    // Once the window is over, the rest of the run is not used: numbering starts again.
    await expect.poll(() => redis.exists(prefix + key), { timeout: 2000, interval: 20 }).toBe(0);
    await new Promise((resolve) => setTimeout(resolve, first.ttl));
    expect((await take(store, key, 100_000, 150)).current).toBe(1);
  });
});

// ---------------------------------------------------------------------------------------------

describe('a per-user limit of 5 a minute over two instances', () => {
  let a: TestContext;
  let b: TestContext;
  beforeAll(async () => {
    const env = { RATE_LIMIT_USER_PER_MINUTE: '5' };
    a = await createTestContext({ env });
    b = await sibling(a, { env });
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  it('lets exactly 5 requests through across both, then answers 429 RATE_LIMITED with Retry-After on each', async () => {
    const user = await signIn(a.app);
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) {
      const res = await me(i % 2 === 0 ? a.app : b.app, user);
      statuses.push(res.statusCode);
    }
    expect(statuses).toEqual([200, 200, 200, 200, 200]);
    expectRateLimited(await me(b.app, user), 5);
    expectRateLimited(await me(a.app, user), 5);
    expectRateLimited(await me(a.app, user), 5);
    // Under 200 a minute every request takes its own number from Redis (B's 6th did), until an
    // instance has seen the window pass the limit: A (which took the 5th) refuses from then on
    // without asking.
    expect(Number(await a.container.redis.get(counterKey(a, user)))).toBe(6);
    const pttl = await a.container.redis.pttl(counterKey(a, user));
    expect(pttl).toBeGreaterThan(0);
    expect(pttl).toBeLessThanOrEqual(MINUTE);

    // Another user is counted apart.
    const other = await signIn(b.app);
    expect((await me(a.app, other)).statusCode).toBe(200);
    expect((await me(b.app, other)).statusCode).toBe(200);
  });
});

describe('a per-user limit of 300 a minute over two instances', () => {
  let a: TestContext;
  let b: TestContext;
  beforeAll(async () => {
    const env = { RATE_LIMIT_USER_PER_MINUTE: '300' };
    a = await createTestContext({ env });
    b = await sibling(a, { env });
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  it('never lets more than 300 concurrent requests through, and exactly 300 once each instance has used its numbers', async () => {
    const user = await signIn(a.app);
    const list = (app: App) =>
      app.inject({ method: 'GET', url: '/chatroom', headers: user.headers });
    // One request each first, so that the burst finds the session and the list in each
    // instance's memory instead of opening a PostgreSQL connection per request.
    for (const app of [a.app, b.app]) expect((await list(app)).statusCode).toBe(200);

    const burst = await Promise.all(
      Array.from({ length: 400 }, (_, i) => list(i % 2 === 0 ? a.app : b.app)),
    );
    const unexpected = burst.filter((res) => res.statusCode !== 200 && res.statusCode !== 429);
    expect(unexpected.map((res) => res.body)).toEqual([]);
    const burstAllowed = 2 + burst.filter((res) => res.statusCode === 200).length;
    expect(burstAllowed).toBeLessThanOrEqual(300);
    // Runs of 3: each instance may still hold up to 2 numbers it took but did not hand out.
    expect(burstAllowed).toBeGreaterThanOrEqual(296);
    expectRateLimited(burst.find((res) => res.statusCode === 429)!, 300);

    // Each instance hands out what it still holds, then refuses for good.
    let allowed = burstAllowed;
    for (const app of [a.app, b.app]) {
      for (;;) {
        const res = await list(app);
        if (res.statusCode === 429) break;
        expect(res.statusCode, res.body).toBe(200);
        allowed++;
      }
    }
    expect(allowed).toBe(300);
    expect((await list(a.app)).statusCode).toBe(429);
    expect((await list(b.app)).statusCode).toBe(429);
    expect(Number(await a.container.redis.get(counterKey(a, user))) % 3).toBe(0);
  });
});

describe('the default per-user limit (100,000 a minute in tests) over two instances', () => {
  let a: TestContext;
  let b: TestContext;
  beforeAll(async () => {
    a = await createTestContext();
    b = await sibling(a);
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  it('counts 1,000 requests with one Redis round trip, and the next run only when it is used up', async () => {
    const user = await signIn(a.app);
    const key = counterKey(a, user);
    const sentA = vi.spyOn(a.container.redis, 'sendCommand');
    const sentB = vi.spyOn(b.container.redis, 'sendCommand');
    // The lease script (the test's own GETs of the counter go through here too).
    const leases = (sent: typeof sentA) =>
      sent.mock.calls.filter(
        ([command]) => command.name.startsWith('eval') && command.args.includes(key),
      ).length;

    const list = (app: App) =>
      app.inject({ method: 'GET', url: '/chatroom', headers: user.headers });
    // 1 + 9 × 111 = 1,000 requests; the first one loads the session and the list.
    expect((await list(a.app)).statusCode).toBe(200);
    for (let batch = 0; batch < 9; batch++) {
      const responses = await Promise.all(Array.from({ length: 111 }, () => list(a.app)));
      expect(responses.map((res) => res.statusCode)).toEqual(Array(111).fill(200));
    }
    expect(leases(sentA)).toBe(1);
    expect(Number(await a.container.redis.get(key))).toBe(1000);

    expect((await list(b.app)).statusCode).toBe(200);
    expect(leases(sentB)).toBe(1);
    expect(Number(await a.container.redis.get(key))).toBe(2000);

    // A's run is used up: its 1,001st request takes the next one.
    expect((await list(a.app)).statusCode).toBe(200);
    expect(leases(sentA)).toBe(2);
    expect(Number(await a.container.redis.get(key))).toBe(3000);
  });
});
