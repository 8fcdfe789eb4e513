import { randomUUID } from 'node:crypto';
import type { InjectOptions } from 'light-my-request';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OfflineProvider } from '../src/llm/index.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import {
  fetchOpenApi,
  fillPath,
  isErrorBody,
  OpenApiContract,
  type Operation,
  pathParams,
} from './helpers/openapi.js';
import {
  badTokenCases,
  type SignedInUser,
  sessionIdOf,
  signAccessToken,
  signIn,
} from './helpers/users.js';

/**
 * Access: every route that takes an id answers 404 for another user's ids, for every method, the
 * same 404 as for an id that does not exist, and changes nothing; every protected route refuses
 * expired, forged, unsigned and revoked tokens with 401. Both lists come from /openapi.json, so a
 * new route is covered without editing this file.
 */

/** A valid body for each route that takes one, so that a 404 is not a 400 in disguise. */
const VALID_BODIES: Record<string, unknown> = {
  'POST /auth/signup': { mobile: '+919876500001' },
  'POST /auth/send-otp': { mobile: '+919876500001' },
  'POST /auth/verify-otp': { mobile: '+919876500001', otp: '123456' },
  'POST /auth/forgot-password': { mobile: '+919876500001' },
  'POST /auth/reset-password': {
    mobile: '+919876500001',
    otp: '123456',
    newPassword: 'long enough',
  },
  'POST /auth/change-password': { newPassword: 'a new password' },
  'POST /auth/login': { mobile: '+919876500001', password: 'whatever' },
  'POST /auth/refresh': { refreshToken: 'x' },
  'POST /auth/logout': {},
  'PATCH /user/me': { name: 'Mallory' },
  'POST /chatroom': { name: 'Room' },
  'PATCH /chatroom/{id}': { name: 'Taken over' },
  'POST /chatroom/{id}/message': { content: 'Hello from someone else' },
};

let ctx: TestContext;
let contract: OpenApiContract;
/** Bob owns the data; Mallory is signed in and tries to reach it. */
let bob: SignedInUser;
let mallory: SignedInUser;
const ids = {
  bobRoom: '',
  bobPrompt: '',
  bobReply: '',
  malloryRoom: '',
  malloryReply: '',
};

beforeAll(async () => {
  ctx = await createTestContext({
    worker: true,
    llm: new OfflineProvider({ delayMs: 0 }),
    env: { BASIC_DAILY_LIMIT: '1000' },
  });
  contract = new OpenApiContract(await fetchOpenApi(ctx.app));
  [bob, mallory] = await Promise.all([signIn(ctx.app), signIn(ctx.app)]);
  const [bobRoom, malloryRoom] = await Promise.all([
    createRoom(ctx.app, bob, 'Private', 'Secret instruction'),
    createRoom(ctx.app, mallory),
  ]);
  ids.bobRoom = bobRoom.id;
  ids.malloryRoom = malloryRoom.id;
  const bobSent = (await sendMessage(ctx.app, bob, bobRoom.id, 'My secret')).json();
  const mallorySent = (await sendMessage(ctx.app, mallory, malloryRoom.id, 'Hi')).json();
  ids.bobPrompt = bobSent.userMessage.id;
  ids.bobReply = bobSent.assistantMessage.id;
  ids.malloryReply = mallorySent.assistantMessage.id;
  // Final replies: nothing moves in the background while the checks compare Bob's data.
  await waitForReply(ctx.app, bob, ids.bobRoom, ids.bobReply);
  await waitForReply(ctx.app, mallory, ids.malloryRoom, ids.malloryReply);
}, 60_000);

afterAll(async () => {
  await ctx?.close();
});

/** Everything of Bob's, every column, plus both users' prompt quotas. */
async function ownerState(): Promise<string> {
  const { pool } = ctx.container.database;
  const [users, rooms, messages, sessions] = await Promise.all([
    pool.query('select * from users where id = $1', [bob.id]),
    pool.query('select * from chatrooms where user_id = $1 order by id', [bob.id]),
    pool.query(
      'select * from messages where user_id = $1 or chatroom_id in (select id from chatrooms where user_id = $1) order by id',
      [bob.id],
    ),
    pool.query('select id, revoked_at, last_used_at from sessions where user_id = $1 order by id', [
      bob.id,
    ]),
  ]);
  const [bobQuota, malloryQuota] = await Promise.all([
    ctx.container.quota.current(bob.id, null),
    ctx.container.quota.current(mallory.id, null),
  ]);
  return JSON.stringify({
    users: users.rows,
    rooms: rooms.rows,
    messages: messages.rows,
    sessions: sessions.rows,
    quota: [bobQuota.used, malloryQuota.used],
  });
}

/** Every row count: a refused request writes nothing anywhere. */
async function rowCounts(): Promise<Record<string, number>> {
  const { rows } = await ctx.container.database.pool.query(`
    select (select count(*) from users)::int as users, (select count(*) from chatrooms)::int as chatrooms,
      (select count(*) from messages)::int as messages, (select count(*) from sessions)::int as sessions,
      (select count(*) from refresh_tokens)::int as refresh_tokens,
      (select count(*) from subscriptions)::int as subscriptions`);
  return rows[0] as Record<string, number>;
}

const idRoutes = () => contract.operations.filter((o) => pathParams(o.path).length > 0);

/** Request variants of a route: each way a client can call it (wait, SSE, resume, …). */
function variants(operation: Operation): Array<{ query: string; headers: Record<string, string> }> {
  const out = [{ query: '', headers: {} as Record<string, string> }];
  const params = operation.operation.parameters ?? [];
  if (params.some((p) => p.in === 'query' && p.name === 'wait'))
    out.push({ query: '?wait=2', headers: {} });
  if (params.some((p) => p.in === 'query' && p.name === 'limit'))
    out.push({ query: '?limit=100', headers: {} });
  if (params.some((p) => p.in === 'header' && p.name === 'idempotency-key')) {
    out.push({ query: '', headers: { 'idempotency-key': 'bobs-key' } });
  }
  if (params.some((p) => p.in === 'header' && p.name === 'last-event-id')) {
    out.push({ query: '', headers: { 'last-event-id': '0-0' } });
  }
  if (operation.method === 'POST' && operation.path.endsWith('/message')) {
    out.push({ query: '', headers: { accept: 'text/event-stream' } });
  }
  return out;
}

function request(
  operation: Operation,
  values: Record<string, string>,
  variant = variants(operation)[0]!,
) {
  const body = VALID_BODIES[operation.key];
  const options: InjectOptions = {
    method: operation.method as 'GET',
    url: fillPath(operation.path, values) + variant.query,
    headers: { ...mallory.headers, ...variant.headers },
  };
  if (body !== undefined) options.payload = body as object;
  return options;
}

describe('another user’s ids answer 404 and change nothing', () => {
  it('the document has the id routes this suite must cover', () => {
    const keys = idRoutes().map((o) => o.key);
    expect(keys).toEqual(
      expect.arrayContaining([
        'GET /chatroom/{id}',
        'PATCH /chatroom/{id}',
        'DELETE /chatroom/{id}',
        'GET /chatroom/{id}/messages',
        'POST /chatroom/{id}/message',
        'GET /chatroom/{id}/messages/{messageId}',
        'GET /chatroom/{id}/messages/{messageId}/stream',
        'POST /chatroom/{id}/messages/{messageId}/cancel',
        'POST /chatroom/{id}/messages/{messageId}/regenerate',
      ]),
    );
    for (const operation of contract.operations) {
      const takesBody = !!operation.operation.requestBody?.content['application/json'];
      if (takesBody)
        expect(VALID_BODIES, `a valid body for ${operation.key}`).toHaveProperty([operation.key]);
    }
  });

  it('every id route, every method and variant: Bob’s ids (alone or mixed with Mallory’s) are 404', async () => {
    const checked: string[] = [];
    for (const operation of idRoutes()) {
      const names = pathParams(operation.path);
      const hasMessage = names.includes('messageId');
      // Bob's room, Bob's message in Bob's room, Bob's message under Mallory's room, Mallory's
      // message under Bob's room, and Bob's prompt (not only his reply).
      const combos: Array<Record<string, string>> = hasMessage
        ? [
            { id: ids.bobRoom, messageId: ids.bobReply },
            { id: ids.bobRoom, messageId: ids.bobPrompt },
            { id: ids.malloryRoom, messageId: ids.bobReply },
            { id: ids.bobRoom, messageId: ids.malloryReply },
          ]
        : [{ id: ids.bobRoom }];
      for (const variant of variants(operation)) {
        // The answer for ids that exist nowhere: Bob's must be indistinguishable from it.
        const missing = await ctx.app.inject(
          request(operation, Object.fromEntries(names.map((n) => [n, randomUUID()])), variant),
        );
        expect(missing.statusCode, `${operation.key} with unknown ids: ${missing.body}`).toBe(404);
        for (const values of combos) {
          const before = await ownerState();
          const options = request(operation, values, variant);
          const res = await ctx.app.inject(options);
          const label = `${options.method} ${options.url} ${JSON.stringify(variant.headers)}`;
          expect(res.statusCode, `${label}: ${res.body}`).toBe(404);
          expect(isErrorBody(res.json()), label).toBe(true);
          const { requestId: _a, ...error } = res.json().error;
          const { requestId: _b, ...expected } = missing.json().error;
          expect(error, `${label} looks like an unknown id`).toEqual(expected);
          expect(res.body, label).not.toContain('My secret');
          expect(contract.check(operation, res), label).toEqual([]);
          expect(await ownerState(), `${label} changed Bob's data`).toBe(before);
          checked.push(operation.key);
        }
      }
    }
    expect(new Set(checked)).toEqual(new Set(idRoutes().map((o) => o.key)));
  });

  it('Bob still sees all of it, unchanged', async () => {
    const res = await ctx.app.inject({ url: `/chatroom/${ids.bobRoom}`, headers: bob.headers });
    expect(res.statusCode).toBe(200);
    expect(res.json().chatroom.name).toBe('Private');
    expect(
      res
        .json()
        .messages.map((m: { id: string }) => m.id)
        .sort(),
    ).toEqual([ids.bobPrompt, ids.bobReply].sort());
    const list = await ctx.app.inject({ url: '/chatroom', headers: mallory.headers });
    expect(list.json().chatrooms.map((r: { id: string }) => r.id)).not.toContain(ids.bobRoom);
  });
});

describe('protected routes refuse bad tokens with 401', () => {
  const protectedRoutes = () =>
    contract.operations.filter((o) => (o.operation.security ?? []).length > 0);

  /** A URL with Mallory's own ids: with a good token, each of these requests would succeed. */
  const ownRequest = (operation: Operation, headers: Record<string, string>): InjectOptions => {
    const options = request(operation, { id: ids.malloryRoom, messageId: ids.malloryReply });
    return { ...options, headers };
  };

  it('the document marks the signed-in routes as protected', () => {
    const keys = protectedRoutes().map((o) => o.key);
    expect(keys.length).toBeGreaterThanOrEqual(18);
    for (const open of [
      'POST /auth/signup',
      'POST /auth/verify-otp',
      'GET /healthz',
      'POST /webhook/stripe',
    ]) {
      expect(keys).not.toContain(open);
    }
  });

  it('expired, forged, unsigned, revoked and otherwise bad tokens are refused everywhere, with nothing written', async () => {
    // Revoked sessions of Mallory's: one by logout, one by "logout all" from another device.
    const loggedOut = await ctx.container.sessions.create(mallory.id, {});
    const out = await ctx.app.inject({
      method: 'POST',
      url: '/auth/logout',
      headers: { authorization: `Bearer ${loggedOut.accessToken}` },
    });
    expect(out.statusCode).toBe(204);
    const device = await ctx.container.sessions.create(mallory.id, {});
    const other = await ctx.container.sessions.create(mallory.id, {});
    const all = await ctx.app.inject({
      method: 'POST',
      url: '/auth/logout',
      headers: { authorization: `Bearer ${other.accessToken}` },
      payload: { all: true },
    });
    expect(all.statusCode).toBe(204);
    // Mallory's main session went with "all": sign her in again for the checks that follow.
    const fresh = await ctx.container.sessions.create(mallory.id, {});
    mallory = {
      ...mallory,
      accessToken: fresh.accessToken,
      refreshToken: fresh.refreshToken,
      headers: { authorization: `Bearer ${fresh.accessToken}` },
    };

    const cases = await badTokenCases(ctx.config, mallory, [
      ['revoked (logout)', loggedOut.accessToken],
      ['revoked (logout all)', device.accessToken],
      // Properly signed, but naming Bob's session: a session belongs to one user.
      [
        'another user’s session',
        await signAccessToken(ctx.config, mallory.id, sessionIdOf(bob.accessToken)),
      ],
      ['unknown session', await signAccessToken(ctx.config, mallory.id, randomUUID())],
    ]);
    const before = await rowCounts();
    const bobBefore = await ownerState();
    let checked = 0;
    for (const operation of protectedRoutes()) {
      for (const [name, headers] of cases) {
        const options = ownRequest(operation, headers);
        const res = await ctx.app.inject(options);
        const label = `${name} on ${operation.key}`;
        expect(res.statusCode, `${label}: ${res.body}`).toBe(401);
        expect(res.json().error.code, label).toBe('UNAUTHENTICATED');
        expect(res.headers['www-authenticate'], label).toMatch(/^Bearer/);
        expect(contract.check(operation, res), label).toEqual([]);
        checked++;
      }
    }
    expect(await rowCounts()).toEqual(before);
    expect(await ownerState()).toBe(bobBefore);
    expect(checked).toBe(protectedRoutes().length * cases.length);

    // The refresh tokens of revoked sessions are dead too.
    for (const refreshToken of [loggedOut.refreshToken, device.refreshToken]) {
      const res = await ctx.app.inject({
        method: 'POST',
        url: '/auth/refresh',
        payload: { refreshToken },
      });
      expect(res.statusCode).toBe(401);
    }
    // The same requests with Mallory's good token get past authentication: the 401s above were
    // about the token, not the request. (Session-ending routes last, deletion just before.)
    const order = (o: Operation) =>
      o.key === 'POST /auth/logout'
        ? 3
        : o.key === 'POST /auth/change-password'
          ? 2
          : o.method === 'DELETE'
            ? 1
            : 0;
    for (const operation of [...protectedRoutes()].sort((a, b) => order(a) - order(b))) {
      const res = await ctx.app.inject(ownRequest(operation, mallory.headers));
      expect(res.statusCode, `${operation.key} with a good token: ${res.body}`).not.toBe(401);
      // Billing is off in this context: its routes answer 503 BILLING_NOT_CONFIGURED.
      if (res.statusCode >= 300) expect(res.json().error.code).toBe('BILLING_NOT_CONFIGURED');
    }
  });
});
