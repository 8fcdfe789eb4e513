import type { Response } from 'light-my-request';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { nextUtcMidnight } from '../src/lib/clock.js';
import { isConnectionError } from '../src/lib/errors.js';
import { controlledClock, expectError } from './helpers/assertions.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeGemini, startFakeGemini } from './helpers/fake-gemini.js';
import { type RedisInstance, startRedisInstance } from './helpers/redis-instance.js';
import { type SignedInUser, signIn } from './helpers/users.js';

const HOUR_MS = 3_600_000;

/** Noon UTC of today: far from midnight, so the quota day cannot roll over during a test. */
function todayNoonUtc(): Date {
  const now = new Date();
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate(), 12));
}

async function usage(ctx: TestContext, user: SignedInUser) {
  const res = await ctx.app.inject({
    method: 'GET',
    url: '/subscription/status',
    headers: user.headers,
  });
  expect(res.statusCode, res.body).toBe(200);
  return res.json().usage as {
    used: number;
    limit: number | null;
    remaining: number | null;
    resetsAt: string;
  };
}

describe('daily prompt quota', () => {
  let ctx: TestContext;
  const time = controlledClock(todayNoonUtc());

  beforeAll(async () => {
    ctx = await createTestContext({ clock: time.clock });
  });
  afterAll(async () => ctx?.close());
  afterEach(() => time.set(todayNoonUtc()));

  it('accepts exactly 5 of 50 concurrent prompts from a Basic user and refuses 45 with Retry-After', async () => {
    const noon = todayNoonUtc();
    const midnight = nextUtcMidnight(noon);
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);

    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) => sendMessage(ctx.app, user, room.id, `prompt ${i}`)),
    );

    const accepted = results.filter((r) => r.statusCode === 202);
    const refused = results.filter((r) => r.statusCode === 429);
    expect(accepted).toHaveLength(5);
    expect(refused).toHaveLength(45);
    for (const res of accepted) {
      expect(res.headers['x-ratelimit-limit']).toBe('5');
      expect(res.headers['x-ratelimit-reset']).toBe(String(midnight.getTime() / 1000));
    }
    expect(accepted.map((r) => r.headers['x-ratelimit-remaining']).sort()).toEqual([
      '0',
      '1',
      '2',
      '3',
      '4',
    ]);
    for (const res of refused) {
      expectError(res, 429, 'QUOTA_EXCEEDED');
      expect(res.headers['retry-after']).toBe(String((midnight.getTime() - noon.getTime()) / 1000));
      expect(res.headers['x-ratelimit-remaining']).toBe('0');
      expect(res.json().error.details).toMatchObject({ limit: 5, upgrade: '/subscribe/pro' });
    }

    const messages = await ctx.app.inject({
      method: 'GET',
      url: `/chatroom/${room.id}/messages?limit=100`,
      headers: user.headers,
    });
    expect(messages.json().messages).toHaveLength(10);
    expect(await usage(ctx, user)).toMatchObject({ used: 5, limit: 5, remaining: 0 });
  });

  it('resets at 00:00 UTC', async () => {
    const midnight = nextUtcMidnight(todayNoonUtc());
    time.set(new Date(midnight.getTime() - 60_000));
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    for (let i = 0; i < 5; i++) {
      expect((await sendMessage(ctx.app, user, room.id, `late ${i}`)).statusCode).toBe(202);
    }
    const refused = await sendMessage(ctx.app, user, room.id, 'one too many');
    expectError(refused, 429, 'QUOTA_EXCEEDED');
    expect(refused.headers['retry-after']).toBe('60');
    expect(await usage(ctx, user)).toEqual({
      used: 5,
      limit: 5,
      remaining: 0,
      resetsAt: midnight.toISOString(),
    });

    time.set(new Date(midnight.getTime() - 1));
    expectError(await sendMessage(ctx.app, user, room.id, 'still today'), 429, 'QUOTA_EXCEEDED');

    time.set(new Date(midnight.getTime() + 500));
    expect(await usage(ctx, user)).toEqual({
      used: 0,
      limit: 5,
      remaining: 5,
      resetsAt: new Date(midnight.getTime() + 24 * HOUR_MS).toISOString(),
    });
    const next = await sendMessage(ctx.app, user, room.id, 'a new day');
    expect(next.statusCode, next.body).toBe(202);
    expect(next.headers['x-ratelimit-remaining']).toBe('4');
  });

  it('counts a regenerate as a prompt', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    let last: Response | undefined;
    for (let i = 0; i < 4; i++) last = await sendMessage(ctx.app, user, room.id, `p${i}`);
    const replyId = last?.json().assistantMessage.id as string;
    const regenerate = await ctx.app.inject({
      method: 'POST',
      url: `/chatroom/${room.id}/messages/${replyId}/regenerate`,
      headers: user.headers,
    });
    expect(regenerate.statusCode, regenerate.body).toBe(202);
    expect(regenerate.headers['x-ratelimit-remaining']).toBe('0');
    expectError(await sendMessage(ctx.app, user, room.id, 'sixth'), 429, 'QUOTA_EXCEEDED');
  });

  it('rebuilds the count from PostgreSQL when the Redis counter is gone', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    for (let i = 0; i < 3; i++) await sendMessage(ctx.app, user, room.id, `p${i}`);
    const keys = await ctx.container.redis.keys(ctx.container.keys.key('quota', user.id, '*'));
    expect(keys).toHaveLength(1);
    await ctx.container.redis.del(...keys);
    expect(await usage(ctx, user)).toMatchObject({ used: 3, remaining: 2 });
    const fourth = await sendMessage(ctx.app, user, room.id, 'p3');
    expect(fourth.headers['x-ratelimit-remaining']).toBe('1');
  });
});

describe('a reply that fails', () => {
  let gemini: FakeGemini;
  let ctx: TestContext;

  beforeAll(async () => {
    gemini = await startFakeGemini();
    ctx = await createTestContext({
      worker: true,
      env: {
        LLM_PROVIDER: 'gemini',
        GEMINI_API_KEY: 'test-gemini-key',
        GEMINI_BASE_URL: gemini.url,
        LLM_RETRY_BASE_MS: '5',
      },
    });
  });
  afterAll(async () => {
    await ctx?.close();
    await gemini?.close();
  });

  it('gives its prompt back, visible in /subscription/status', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    gemini.enqueue(
      ...Array.from({ length: 5 }, () => ({ kind: 'serverError' as const, status: 503 })),
    );

    const sent = await sendMessage(ctx.app, user, room.id, 'this one will fail');
    expect(sent.statusCode, sent.body).toBe(202);
    expect(sent.headers['x-ratelimit-remaining']).toBe('4');
    const reply = await waitForReply(ctx.app, user, room.id, sent.json().assistantMessage.id);
    expect(reply.status).toBe('failed');
    expect(gemini.pending()).toBe(0);
    expect(await usage(ctx, user)).toMatchObject({ used: 0, limit: 5, remaining: 5 });

    // A reply that succeeds keeps its prompt counted.
    const ok = await sendMessage(ctx.app, user, room.id, 'this one works');
    expect(ok.statusCode).toBe(202);
    const done = await waitForReply(ctx.app, user, room.id, ok.json().assistantMessage.id);
    expect(done.status).toBe('completed');
    expect(await usage(ctx, user)).toMatchObject({ used: 1, remaining: 4 });
  });
});

describe('Redis unreachable', () => {
  let redis: RedisInstance;
  let ctx: TestContext;

  beforeAll(async () => {
    redis = await startRedisInstance();
    ctx = await createTestContext({ env: { REDIS_URL: redis.url } });
  });
  afterAll(async () => {
    await redis?.start().catch(() => {});
    await ctx?.close();
    await redis?.destroy();
  });

  it('answers 503 to a prompt instead of letting it through uncounted', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    await redis.stop();

    const sent = await sendMessage(ctx.app, user, room.id, 'while redis is down');
    expectError(sent, 503, 'UNAVAILABLE');
    expect(sent.headers['retry-after']).toBeDefined();
    // The reservation itself fails closed with a connection error (rendered as 503 UNAVAILABLE).
    await expect(ctx.container.quota.reserve(user.id, 5)).rejects.toSatisfy(isConnectionError);

    await redis.start();
    await expect.poll(() => ctx.container.redis.ping().catch(() => 'down')).toBe('PONG');
    const messages = await ctx.app.inject({
      method: 'GET',
      url: `/chatroom/${room.id}/messages`,
      headers: user.headers,
    });
    expect(messages.statusCode, messages.body).toBe(200);
    expect(messages.json().messages).toHaveLength(0);
    expect(await usage(ctx, user)).toMatchObject({ used: 0 });
  });
});

describe('request rate limits', () => {
  let ctx: TestContext;

  beforeAll(async () => {
    ctx = await createTestContext({
      env: {
        RATE_LIMIT_USER_PER_MINUTE: '3',
        RATE_LIMIT_PUBLIC_PER_MINUTE: '8',
        // Billing on, pointing nowhere: refused signatures never reach Stripe.
        STRIPE_SECRET_KEY: 'sk_test_unused',
        STRIPE_WEBHOOK_SECRET: 'whsec_unused_0123456789',
        STRIPE_PRICE_ID: 'price_unused',
        STRIPE_API_BASE: 'http://127.0.0.1:9',
      },
    });
  });
  afterAll(async () => ctx?.close());

  it('limits each user apart and answers 429 RATE_LIMITED with Retry-After', async () => {
    const user = await signIn(ctx.app);
    const other = await signIn(ctx.app);
    const list = (who: SignedInUser) =>
      ctx.app.inject({ method: 'GET', url: '/chatroom', headers: who.headers });
    for (let i = 0; i < 3; i++) expect((await list(user)).statusCode).toBe(200);

    const limited = await list(user);
    expectError(limited, 429, 'RATE_LIMITED');
    expect(Number(limited.headers['retry-after'])).toBeGreaterThan(0);
    expect(Number(limited.headers['retry-after'])).toBeLessThanOrEqual(60);
    expect(limited.json().error.details).toMatchObject({ limit: 3 });

    expect((await list(other)).statusCode).toBe(200);
  });

  it('never rate-limits the Stripe webhook', async () => {
    // Two sign-ins above used 6 of the 8 requests per minute this IP may make.
    for (let i = 0; i < 12; i++) {
      const res = await ctx.app.inject({
        method: 'POST',
        url: '/webhook/stripe',
        headers: { 'content-type': 'application/json', 'stripe-signature': 't=1,v1=bad' },
        payload: JSON.stringify({ id: `evt_${i}`, object: 'event' }),
      });
      expectError(res, 400, 'VALIDATION_FAILED');
    }
    // Public routes are still limited per IP: 2 more requests, then 429.
    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await ctx.app.inject({
        method: 'POST',
        url: '/auth/send-otp',
        payload: { mobile: `+91981234567${i}` },
      });
      statuses.push(res.statusCode);
    }
    expect(statuses[0]).not.toBe(429);
    expect(statuses[1]).not.toBe(429);
    expect(statuses[2]).toBe(429);
  });
});
