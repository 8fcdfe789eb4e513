import type { InjectOptions, Response } from 'light-my-request';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OfflineProvider } from '../src/llm/index.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeStripe, startFakeStripe } from './helpers/fake-stripe.js';
import { fetchOpenApi, isErrorBody, OpenApiContract } from './helpers/openapi.js';
import { randomMobile, type SignedInUser, signIn } from './helpers/users.js';

/**
 * Drives a realistic flow through every route of the OpenAPI document and validates each real
 * response (status, content type, JSON body, error bodies included) against the schema the
 * document declares for that route and status.
 */

const hits = new Map<string, Set<number>>();
let documentedKeys: string[] = [];
let firstContract: OpenApiContract;

/** Injects a request and checks its response against the document; returns the response. */
async function call(
  ctx: TestContext,
  contract: OpenApiContract,
  options: InjectOptions & { method: string; url: string },
  expected?: number,
): Promise<Response> {
  const res = await ctx.app.inject(options);
  const operation = contract.find(options.method, options.url);
  expect(operation, `${options.method} ${options.url} is in the document`).toBeDefined();
  const statuses = hits.get(operation!.key) ?? new Set<number>();
  statuses.add(res.statusCode);
  hits.set(operation!.key, statuses);
  if (expected !== undefined)
    expect(res.statusCode, `${operation!.key}: ${res.body}`).toBe(expected);
  expect(contract.check(operation!, res)).toEqual([]);
  if (res.statusCode >= 400) {
    expect(isErrorBody(res.json()), `${operation!.key} error shape: ${res.body}`).toBe(true);
    expect(res.json().error.requestId).toBe(res.headers['x-request-id']);
  }
  return res;
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

describe('responses match the OpenAPI document (billing off)', () => {
  let ctx: TestContext;
  let contract: OpenApiContract;
  const request = (options: InjectOptions & { method: string; url: string }, expected?: number) =>
    call(ctx, contract, options, expected);

  beforeAll(async () => {
    ctx = await createTestContext({
      worker: true,
      // Slow enough that a reply can be cancelled while it is generated.
      llm: new OfflineProvider({ delayMs: 10 }),
      env: { BASIC_DAILY_LIMIT: '8' },
    });
    contract = new OpenApiContract(await fetchOpenApi(ctx.app));
    firstContract = contract;
    documentedKeys = contract.operations.map((o) => o.key);
  });
  afterAll(async () => {
    await ctx?.close();
  });

  const mobile = randomMobile();
  const password = 'correct horse battery';
  let tokens: { accessToken: string; refreshToken: string };
  let user: { headers: { authorization: string } };
  let roomId: string;
  let messageId: string;
  let other: SignedInUser;

  it('operations: healthz and readyz', async () => {
    await request({ method: 'GET', url: '/healthz' }, 200);
    await request({ method: 'GET', url: '/readyz' }, 200);
  });

  it('auth: signup, OTP, verify, login, refresh', async () => {
    await request({ method: 'POST', url: '/auth/signup', payload: { mobile: 'nope' } }, 400);
    await request(
      { method: 'POST', url: '/auth/signup', payload: { mobile, name: 'Asha', password } },
      201,
    );
    await request({ method: 'POST', url: '/auth/send-otp', payload: { mobile: {} } }, 400);
    await request(
      { method: 'POST', url: '/auth/send-otp', payload: { mobile: randomMobile() } },
      404,
    );
    const sent = await request({ method: 'POST', url: '/auth/send-otp', payload: { mobile } }, 200);
    // A second code within the cooldown.
    await request({ method: 'POST', url: '/auth/send-otp', payload: { mobile } }, 429);
    const otp = sent.json().otp as string;
    const wrong = otp === '000000' ? '111111' : '000000';
    await request(
      { method: 'POST', url: '/auth/verify-otp', payload: { mobile, otp: wrong } },
      400,
    );
    await request({ method: 'POST', url: '/auth/verify-otp', payload: { mobile } }, 400);
    const verified = await request(
      { method: 'POST', url: '/auth/verify-otp', payload: { mobile, otp } },
      200,
    );
    expect(verified.json().user.verified).toBe(true);
    // The number is now verified: registering it again conflicts.
    await request({ method: 'POST', url: '/auth/signup', payload: { mobile } }, 409);

    await request(
      { method: 'POST', url: '/auth/login', payload: { mobile, password: 'wrong password' } },
      401,
    );
    await request({ method: 'POST', url: '/auth/login', payload: { mobile } }, 400);
    const login = await request(
      { method: 'POST', url: '/auth/login', payload: { mobile, password } },
      200,
    );
    await request({ method: 'POST', url: '/auth/refresh', payload: { refreshToken: 'nope' } }, 401);
    await request({ method: 'POST', url: '/auth/refresh', payload: {} }, 400);
    const refreshed = await request(
      {
        method: 'POST',
        url: '/auth/refresh',
        payload: { refreshToken: login.json().refreshToken },
      },
      200,
    );
    tokens = refreshed.json();
    user = { headers: bearer(tokens.accessToken) };
    other = await signIn(ctx.app);
  });

  it('user: me and patch me', async () => {
    await request({ method: 'GET', url: '/user/me' }, 401);
    await request({ method: 'GET', url: '/user/me', headers: user.headers }, 200);
    await request(
      { method: 'PATCH', url: '/user/me', headers: user.headers, payload: { email: 'not-mail' } },
      400,
    );
    await request({ method: 'PATCH', url: '/user/me', payload: { name: 'X' } }, 401);
    const patched = await request(
      {
        method: 'PATCH',
        url: '/user/me',
        headers: user.headers,
        payload: { name: 'Asha R', email: 'asha@example.com' },
      },
      200,
    );
    expect(patched.json().email).toBe('asha@example.com');
    await request(
      { method: 'PATCH', url: '/user/me', headers: user.headers, payload: { email: null } },
      200,
    );
  });

  it('chatrooms: create, list (miss and hit), get, rename', async () => {
    await request(
      { method: 'POST', url: '/chatroom', headers: user.headers, payload: { name: '' } },
      400,
    );
    await request({ method: 'POST', url: '/chatroom', payload: { name: 'x' } }, 401);
    const created = await request(
      {
        method: 'POST',
        url: '/chatroom',
        headers: user.headers,
        payload: { name: 'Trip', systemInstruction: 'Be brief.' },
      },
      201,
    );
    roomId = created.json().id;
    await request({ method: 'GET', url: '/chatroom', headers: user.headers }, 200);
    await request({ method: 'GET', url: '/chatroom', headers: user.headers }, 200);
    await request({ method: 'GET', url: '/chatroom' }, 401);
    await request({ method: 'GET', url: `/chatroom/${roomId}`, headers: user.headers }, 200);
    await request(
      { method: 'GET', url: `/chatroom/${roomId}?limit=0`, headers: user.headers },
      400,
    );
    await request({ method: 'GET', url: '/chatroom/not-a-uuid', headers: user.headers }, 400);
    await request(
      { method: 'GET', url: `/chatroom/${roomId}`, headers: bearer(other.accessToken) },
      404,
    );
    await request(
      {
        method: 'PATCH',
        url: `/chatroom/${roomId}`,
        headers: user.headers,
        payload: { name: 'Trip to Goa', systemInstruction: null },
      },
      200,
    );
    await request(
      { method: 'PATCH', url: `/chatroom/${roomId}`, headers: user.headers, payload: {} },
      400,
    );
    await request(
      {
        method: 'PATCH',
        url: `/chatroom/${roomId}`,
        headers: bearer(other.accessToken),
        payload: { name: 'mine now' },
      },
      404,
    );
  });

  it('messages: send (202, wait 200, SSE), list, get, stream, cancel, regenerate, quota', async () => {
    const url = `/chatroom/${roomId}/message`;
    await request({ method: 'POST', url, headers: user.headers, payload: { content: '  ' } }, 400);
    await request({ method: 'POST', url, payload: { content: 'hi' } }, 401);
    const accepted = await request(
      { method: 'POST', url, headers: user.headers, payload: { content: 'Hello there' } },
      202,
    );
    messageId = accepted.json().assistantMessage.id;
    expect(accepted.headers.location).toBe(`/chatroom/${roomId}/messages/${messageId}`);

    const waited = await request(
      {
        method: 'POST',
        url: `${url}?wait=20`,
        headers: user.headers,
        payload: { content: 'Wait' },
      },
      200,
    );
    expect(waited.json().assistantMessage.status).toBe('completed');
    await request(
      { method: 'POST', url: `${url}?wait=61`, headers: user.headers, payload: { content: 'x' } },
      400,
    );

    const streamed = await request(
      {
        method: 'POST',
        url,
        headers: { ...user.headers, accept: 'text/event-stream' },
        payload: { content: 'Stream it' },
      },
      200,
    );
    expect(streamed.headers['content-type']).toMatch(/^text\/event-stream/);
    expect(streamed.body).toContain('event: done');

    // Idempotent retry: the first result again, same status and schema.
    const key = { 'idempotency-key': 'retry-1' };
    const first = await request(
      { method: 'POST', url, headers: { ...user.headers, ...key }, payload: { content: 'Once' } },
      202,
    );
    const again = await request(
      { method: 'POST', url, headers: { ...user.headers, ...key }, payload: { content: 'Once' } },
      202,
    );
    expect(again.json().userMessage.id).toBe(first.json().userMessage.id);
    await request(
      { method: 'POST', url, headers: { ...user.headers, ...key }, payload: { content: 'Other' } },
      409,
    );

    const page = await request(
      { method: 'GET', url: `/chatroom/${roomId}/messages?limit=2`, headers: user.headers },
      200,
    );
    const cursor = page.json().nextCursor as string;
    expect(cursor).toEqual(expect.any(String));
    await request(
      {
        method: 'GET',
        url: `/chatroom/${roomId}/messages?limit=2&before=${encodeURIComponent(cursor)}`,
        headers: user.headers,
      },
      200,
    );
    await request(
      { method: 'GET', url: `/chatroom/${roomId}/messages?before=nope`, headers: user.headers },
      400,
    );
    await request(
      { method: 'GET', url: `/chatroom/${roomId}/messages`, headers: bearer(other.accessToken) },
      404,
    );

    const messageUrl = `/chatroom/${roomId}/messages/${messageId}`;
    // Poll until the first reply is final.
    for (let i = 0; i < 200; i++) {
      const res = await request({ method: 'GET', url: messageUrl, headers: user.headers }, 200);
      if (!['queued', 'streaming'].includes(res.json().status)) break;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    await request({ method: 'GET', url: `${messageUrl}x`, headers: user.headers }, 400);

    const stream = await request(
      { method: 'GET', url: `${messageUrl}/stream`, headers: user.headers },
      200,
    );
    expect(stream.headers['content-type']).toMatch(/^text\/event-stream/);
    await request({ method: 'GET', url: `${messageUrl}/stream` }, 401);
    await request(
      { method: 'GET', url: `${messageUrl}/stream`, headers: bearer(other.accessToken) },
      404,
    );

    // Cancelling a finished reply answers it as it is; a prompt cannot be cancelled at all.
    const finished = await request(
      { method: 'POST', url: `${messageUrl}/cancel`, headers: user.headers },
      200,
    );
    expect(finished.json().status).toBe('completed');
    await request(
      {
        method: 'POST',
        url: `/chatroom/${roomId}/messages/${accepted.json().userMessage.id}/cancel`,
        headers: user.headers,
      },
      409,
    );
    const fresh = await request(
      { method: 'POST', url, headers: user.headers, payload: { content: 'Cancel me' } },
      202,
    );
    const cancelled = await request(
      {
        method: 'POST',
        url: `/chatroom/${roomId}/messages/${fresh.json().assistantMessage.id}/cancel`,
        headers: user.headers,
      },
      200,
    );
    expect(['cancelled', 'streaming']).toContain(cancelled.json().status);

    await request({ method: 'POST', url: `${messageUrl}/regenerate`, headers: user.headers }, 202);
    await request(
      { method: 'POST', url: `${messageUrl}/regenerate`, headers: bearer(other.accessToken) },
      404,
    );

    // Spend the rest of the day's prompts: the refusal is a documented 429.
    let refused: Response | undefined;
    for (let i = 0; i < 10 && !refused; i++) {
      const res = await request({
        method: 'POST',
        url,
        headers: user.headers,
        payload: { content: `more ${i}` },
      });
      if (res.statusCode === 429) refused = res;
      else expect(res.statusCode).toBe(202);
    }
    expect(refused?.json().error.code).toBe('QUOTA_EXCEEDED');
    expect(refused?.headers['retry-after']).toBeDefined();
    await request({ method: 'POST', url: `${messageUrl}/regenerate`, headers: user.headers }, 429);
  });

  it('subscription: status; billing routes answer 503 without Stripe settings', async () => {
    const status = await request(
      { method: 'GET', url: '/subscription/status', headers: user.headers },
      200,
    );
    expect(status.json().usage.remaining).toBe(0);
    await request({ method: 'GET', url: '/subscription/status' }, 401);
    await request({ method: 'POST', url: '/subscribe/pro', headers: user.headers }, 503);
    await request({ method: 'POST', url: '/subscribe/pro' }, 401);
    await request({ method: 'POST', url: '/subscription/portal', headers: user.headers }, 503);
    await request({ method: 'POST', url: '/subscription/portal' }, 401);
    await request(
      {
        method: 'POST',
        url: '/webhook/stripe',
        headers: { 'content-type': 'application/json', 'stripe-signature': 't=1,v1=00' },
        payload: '{}',
      },
      503,
    );
    await request(
      {
        method: 'POST',
        url: '/webhook/stripe',
        headers: { 'content-type': 'text/plain' },
        payload: 'hi',
      },
      415,
    );
  });

  it('passwords: forgot, reset, change', async () => {
    await request({ method: 'POST', url: '/auth/forgot-password', payload: {} }, 400);
    await request(
      { method: 'POST', url: '/auth/forgot-password', payload: { mobile: randomMobile() } },
      404,
    );
    const sent = await request(
      { method: 'POST', url: '/auth/forgot-password', payload: { mobile: other.mobile } },
      200,
    );
    const otp = sent.json().otp as string;
    const newPassword = 'a brand new secret';
    await request(
      {
        method: 'POST',
        url: '/auth/reset-password',
        payload: { mobile: other.mobile, otp: otp === '000000' ? '111111' : '000000', newPassword },
      },
      400,
    );
    await request(
      { method: 'POST', url: '/auth/reset-password', payload: { mobile: other.mobile, otp } },
      400,
    );
    await request(
      {
        method: 'POST',
        url: '/auth/reset-password',
        payload: { mobile: other.mobile, otp, newPassword },
      },
      204,
    );
    // Reset signs out every session of the user.
    await request({ method: 'GET', url: '/user/me', headers: bearer(other.accessToken) }, 401);

    await request(
      {
        method: 'POST',
        url: '/auth/change-password',
        headers: user.headers,
        payload: { currentPassword: 'not it at all', newPassword: 'yet another secret' },
      },
      403,
    );
    await request(
      {
        method: 'POST',
        url: '/auth/change-password',
        headers: user.headers,
        payload: { newPassword: 'short' },
      },
      400,
    );
    await request(
      { method: 'POST', url: '/auth/change-password', payload: { newPassword: 'long enough' } },
      401,
    );
    await request(
      {
        method: 'POST',
        url: '/auth/change-password',
        headers: user.headers,
        payload: { currentPassword: password, newPassword: 'yet another secret' },
      },
      204,
    );
  });

  it('chatroom delete and logout', async () => {
    await request({ method: 'DELETE', url: `/chatroom/${roomId}` }, 401);
    await request({ method: 'DELETE', url: `/chatroom/${roomId}`, headers: user.headers }, 204);
    await request({ method: 'DELETE', url: `/chatroom/${roomId}`, headers: user.headers }, 404);
    await request({ method: 'DELETE', url: '/chatroom/123', headers: user.headers }, 400);

    await request(
      {
        method: 'POST',
        url: '/auth/logout',
        headers: user.headers,
        payload: { refreshToken: 'not one of mine' },
      },
      404,
    );
    await request(
      { method: 'POST', url: '/auth/logout', headers: user.headers, payload: { all: 'yes' } },
      400,
    );
    await request({ method: 'POST', url: '/auth/logout', headers: user.headers }, 204);
    await request({ method: 'POST', url: '/auth/logout', headers: user.headers }, 401);
    await request({ method: 'GET', url: '/user/me', headers: user.headers }, 401);
  });
});

describe('responses match the OpenAPI document (billing on, fake Stripe)', () => {
  const WEBHOOK_SECRET = 'whsec_test_0123456789abcdefghijklmnopqrstuv';
  let fake: FakeStripe;
  let ctx: TestContext;
  let contract: OpenApiContract;
  const request = (options: InjectOptions & { method: string; url: string }, expected?: number) =>
    call(ctx, contract, options, expected);

  beforeAll(async () => {
    fake = await startFakeStripe();
    ctx = await createTestContext({
      env: {
        STRIPE_SECRET_KEY: 'sk_test_fake_key',
        STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
        STRIPE_PRICE_ID: 'price_pro_monthly',
        STRIPE_API_BASE: fake.url,
      },
    });
    contract = new OpenApiContract(await fetchOpenApi(ctx.app));
  });
  afterAll(async () => {
    await ctx?.close();
    await fake?.close();
  });

  it('checkout, portal, webhook and status', async () => {
    const user = await signIn(ctx.app);
    await request({ method: 'POST', url: '/subscription/portal', headers: user.headers }, 409);
    const checkout = await request(
      { method: 'POST', url: '/subscribe/pro', headers: user.headers },
      201,
    );
    await request({ method: 'POST', url: '/subscription/portal', headers: user.headers }, 200);

    const { subscription } = fake.completeCheckout(checkout.json().sessionId);
    const event = fake.event('customer.subscription.created', subscription);
    const signed = fake.signEvent(event, WEBHOOK_SECRET);
    await request(
      { method: 'POST', url: '/webhook/stripe', headers: signed.headers, payload: signed.payload },
      200,
    );
    await request(
      {
        method: 'POST',
        url: '/webhook/stripe',
        headers: { ...signed.headers, 'stripe-signature': 't=1,v1=00' },
        payload: signed.payload,
      },
      400,
    );
    const status = await request(
      { method: 'GET', url: '/subscription/status', headers: user.headers },
      200,
    );
    expect(status.json().tier).toBe('pro');
    expect(status.json().usage.limit).toBeNull();
    await request({ method: 'POST', url: '/subscribe/pro', headers: user.headers }, 409);
  });
});

describe('coverage', () => {
  it('every route of the document was exercised and validated', () => {
    const documented = documentedKeys.sort();
    const missing = documented.filter((key) => !hits.has(key));
    expect(missing, 'routes never exercised').toEqual([]);
    expect(documented.length).toBeGreaterThanOrEqual(26);
  });

  it('the validator itself refuses what breaks the document', () => {
    const contract = firstContract;
    const me = contract.find('GET', '/user/me')!;
    const fake = (statusCode: number, body: unknown, contentType = 'application/json') =>
      ({
        statusCode,
        headers: { 'content-type': contentType },
        body: typeof body === 'string' ? body : JSON.stringify(body),
      }) as unknown as Response;
    expect(contract.check(me, fake(200, { id: 'not-a-uuid' }))).toHaveLength(1);
    expect(contract.check(me, fake(418, {}))[0]).toMatch(/not documented/);
    expect(contract.check(me, fake(200, 'hi', 'text/plain'))[0]).toMatch(/content type/);
    const error = { code: 'UNAUTHENTICATED', message: 'x', requestId: 'r', details: {} };
    expect(contract.check(me, fake(401, { error }))).toEqual([]);
    expect(contract.check(me, fake(401, { error: { ...error, stack: 'at …' } }))).toHaveLength(1);
    expect(contract.check(me, fake(401, { error: { ...error, code: 'OOPS' } }))).toHaveLength(1);
    const room = contract.find('GET', '/chatroom/0190d5c6-1d8e-7c3a-9f00-000000000000')!;
    expect(room.path).toBe('/chatroom/{id}');
    expect(contract.find('GET', '/chatroom')!.path).toBe('/chatroom');
  });
});
