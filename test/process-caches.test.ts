import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { App } from '../src/api/app.js';
import { InvalidationBus, LocalCache } from '../src/lib/local-cache.js';
import { createLogger } from '../src/lib/logger.js';
import { connectRedis, createRedis, type Redis } from '../src/lib/redis.js';
import { expectError } from './helpers/assertions.js';
import { createRoom, sendMessage } from './helpers/chat.js';
import {
  createTestContext,
  LogCapture,
  type TestContext,
  type TestContextOptions,
  testRedisPrefix,
} from './helpers/context.js';
import { REDIS_URL } from './helpers/env.js';
import { type RedisInstance, redisCommand, startRedisInstance } from './helpers/redis-instance.js';
import { type SignedInUser, sessionIdOf, signIn } from './helpers/users.js';
import { sleep, until } from './helpers/wait.js';

const PASSWORD = 'cache-pass-123';

function deferred<T = void>() {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** A write with triggers off (`session_replication_role = replica`): the database announces nothing. */
async function unannounced(ctx: TestContext, text: string, values: unknown[]) {
  const client = await ctx.container.database.pool.connect();
  try {
    await client.query('begin');
    await client.query('set local session_replication_role = replica');
    await client.query(text, values);
    await client.query('commit');
  } finally {
    client.release();
  }
}

/** A second API instance on the first one's database and Redis prefix. */
function sibling(first: TestContext, options: TestContextOptions = {}) {
  return createTestContext({
    ...options,
    databaseUrl: first.config.databaseUrl,
    redisPrefix: first.config.redisPrefix,
  });
}

function me(app: App, headers: { authorization: string }) {
  return app.inject({ method: 'GET', url: '/user/me', headers });
}

async function listRooms(app: App, user: { headers: { authorization: string } }) {
  const res = await app.inject({ method: 'GET', url: '/chatroom', headers: user.headers });
  expect(res.statusCode, res.body).toBe(200);
  return {
    cache: res.headers['x-cache'],
    names: (res.json() as { chatrooms: Array<{ name: string }> }).chatrooms.map((r) => r.name),
  };
}

/** A second session of the user (password sign-in), as a SignedInUser. */
async function secondSession(app: App, user: SignedInUser): Promise<SignedInUser> {
  const res = await app.inject({
    method: 'POST',
    url: '/auth/login',
    payload: { mobile: user.mobile, password: PASSWORD },
  });
  expect(res.statusCode, res.body).toBe(200);
  const { accessToken, refreshToken } = res.json();
  return {
    ...user,
    accessToken,
    refreshToken,
    headers: { authorization: `Bearer ${accessToken}` },
  };
}

async function rename(app: App, user: SignedInUser, roomId: string, name: string) {
  const renamed = await app.inject({
    method: 'PATCH',
    url: `/chatroom/${roomId}`,
    headers: user.headers,
    payload: { name },
  });
  expect(renamed.statusCode, renamed.body).toBe(200);
}

function logout(app: App, user: SignedInUser, payload: object = {}) {
  return app.inject({ method: 'POST', url: '/auth/logout', headers: user.headers, payload });
}

function claimsOf(user: SignedInUser) {
  return { userId: user.id, sessionId: sessionIdOf(user.accessToken) };
}

/** Counts the calls of a Redis command method of `redis` whose first key is `key`. */
function countCalls(redis: Redis, method: 'get' | 'mget', key: string) {
  const spy = vi.spyOn(redis, method as 'get');
  return {
    count: () => spy.mock.calls.filter((args) => args[0] === key).length,
    restore: () => spy.mockRestore(),
  };
}

afterEach(() => {
  vi.restoreAllMocks();
  vi.useRealTimers();
});

// ---------------------------------------------------------------------------------------------

describe('LocalCache', () => {
  const cache = (options: { ttlMs?: number; maxEntries?: number; live?: () => boolean } = {}) =>
    new LocalCache<string>('test', {
      ttlMs: options.ttlMs ?? 60_000,
      maxEntries: options.maxEntries ?? 100,
      live: options.live ?? (() => true),
    });

  it('stores what a load read and serves it until dropped', () => {
    const c = cache();
    expect(c.set('k', 'v', c.begin())).toBe(true);
    expect(c.get('k')).toBe('v');
    c.drop('k');
    expect(c.get('k')).toBeUndefined();
    expect(c.size).toBe(0);
  });

  it('refuses a load that began before a drop of its key, and keeps loads of other keys', () => {
    const c = cache();
    const stale = c.begin();
    const other = c.begin();
    c.drop('k');
    expect(c.set('k', 'stale', stale)).toBe(false);
    expect(c.get('k')).toBeUndefined();
    expect(c.set('other', 'fine', other)).toBe(true);
    // A load that began after the drop is stored.
    expect(c.set('k', 'fresh', c.begin())).toBe(true);
    expect(c.get('k')).toBe('fresh');
  });

  it('refuses every load that began before a clear', () => {
    const c = cache();
    c.set('a', 'old', c.begin());
    const before = c.begin();
    c.clear();
    expect(c.get('a')).toBeUndefined();
    expect(c.set('a', 'stale', before)).toBe(false);
    expect(c.set('b', 'stale', before)).toBe(false);
    expect(c.size).toBe(0);
    expect(c.set('b', 'fresh', c.begin())).toBe(true);
    expect(c.get('b')).toBe('fresh');
  });

  it('still refuses a load from before a drop after many other keys were dropped', () => {
    const c = cache();
    const stale = c.begin();
    c.drop('k');
    // Past its bound the record of dropped keys is pruned; what it forgot must still refuse.
    for (let i = 0; i < 10_050; i++) c.drop(`other-${i}`);
    expect(c.set('k', 'stale', stale)).toBe(false);
  });

  it('evicts the oldest entry beyond max entries, and replacing a key evicts nothing', () => {
    const c = cache({ maxEntries: 3 });
    for (const key of ['a', 'b', 'c']) c.set(key, key, c.begin());
    expect(c.set('b', 'b2', c.begin())).toBe(true);
    expect(c.size).toBe(3);
    expect(c.set('d', 'd', c.begin())).toBe(true);
    expect(c.size).toBe(3);
    expect(c.get('a')).toBeUndefined();
    expect([c.get('b'), c.get('c'), c.get('d')]).toEqual(['b2', 'c', 'd']);
  });

  it('expires entries after the TTL', () => {
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(new Date('2026-01-01T00:00:00Z'));
    const c = cache({ ttlMs: 1000 });
    c.set('k', 'v', c.begin());
    vi.setSystemTime(new Date('2026-01-01T00:00:00.999Z'));
    expect(c.get('k')).toBe('v');
    vi.setSystemTime(new Date('2026-01-01T00:00:01Z'));
    expect(c.get('k')).toBeUndefined();
    expect(c.size).toBe(0);
  });

  it('never lets a shorter per-entry TTL be stretched past the cache TTL', () => {
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(new Date('2026-01-01T00:00:00Z'));
    const c = cache({ ttlMs: 1000 });
    c.set('short', 'v', c.begin(), 100);
    c.set('long', 'v', c.begin(), 10_000);
    vi.setSystemTime(new Date('2026-01-01T00:00:00.100Z'));
    expect(c.get('short')).toBeUndefined();
    expect(c.get('long')).toBe('v');
    vi.setSystemTime(new Date('2026-01-01T00:00:01Z'));
    expect(c.get('long')).toBeUndefined();
  });

  it('serves and stores nothing while not live, nor with a TTL of 0', () => {
    let live = false;
    const c = cache({ live: () => live });
    expect(c.set('k', 'v', c.begin())).toBe(false);
    live = true;
    expect(c.set('k', 'v', c.begin())).toBe(true);
    live = false;
    expect(c.get('k')).toBeUndefined();

    const off = cache({ ttlMs: 0 });
    expect(off.set('k', 'v', off.begin())).toBe(false);
    expect(off.get('k')).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------------------------

describe('InvalidationBus', () => {
  const channel = `${testRedisPrefix()}invalidate`;
  const opened: Array<{ bus: InvalidationBus; redis: Redis }> = [];

  async function openBus(ttlMs = 60_000, heartbeatMs?: number) {
    const redis = createRedis(REDIS_URL);
    await connectRedis(redis, REDIS_URL);
    const bus = new InvalidationBus({
      redisUrl: REDIS_URL,
      channel,
      redis,
      ttlMs,
      logger: createLogger('silent', new LogCapture()),
      ...(heartbeatMs ? { heartbeatMs } : {}),
    });
    opened.push({ bus, redis });
    return bus;
  }

  afterAll(async () => {
    for (const { bus, redis } of opened) {
      await bus.close();
      redis.disconnect();
    }
  });

  it('serves nothing before start() has confirmed the subscription, and nothing after close()', async () => {
    const bus = await openBus();
    const cache = bus.cache<string>('c', 10);
    expect(bus.isLive).toBe(false);
    expect(cache.set('k', 'v', cache.begin())).toBe(false);

    await bus.start();
    await until(
      () => bus.isLive,
      (live) => live,
    );
    expect(cache.set('k', 'v', cache.begin())).toBe(true);
    expect(cache.get('k')).toBe('v');

    await bus.close();
    expect(bus.isLive).toBe(false);
    expect(cache.get('k')).toBeUndefined();
    expect(cache.set('k', 'v', cache.begin())).toBe(false);
  });

  it('drops keys in another process’s cache, and refuses its load that began before', async () => {
    const here = await openBus();
    const there = await openBus();
    const local = here.cache<string>('c', 10);
    const remote = there.cache<string>('c', 10);
    await Promise.all([here.start(), there.start()]);
    await until(
      () => here.isLive && there.isLive,
      (live) => live,
    );

    remote.set('canary', 'v', remote.begin());
    remote.set('kept', 'v', remote.begin());
    local.set('k', 'v', local.begin());
    const loading = remote.begin();

    await here.invalidate('c', ['k', 'canary']);
    // Dropped here at once, before the publish is even delivered.
    expect(local.get('k')).toBeUndefined();
    await until(
      () => remote.get('canary'),
      (value) => value === undefined,
    );
    // The load that began before the invalidation reached the other process is not kept.
    expect(remote.set('k', 'stale', loading)).toBe(false);
    expect(remote.get('kept')).toBe('v');
    expect(remote.set('k', 'fresh', remote.begin())).toBe(true);
  });

  it('notices a subscription that went deaf without its connection closing, and subscribes again', async () => {
    const bus = await openBus(60_000, 100);
    const cache = bus.cache<string>('c', 10);
    await bus.start();
    await until(
      () => bus.isLive,
      (live) => live,
    );
    cache.set('k', 'v', cache.begin());
    // Heartbeats come back while the subscription hears: it stays live across several beats.
    await sleep(450);
    expect(bus.isLive).toBe(true);
    expect(cache.get('k')).toBe('v');

    // The subscription is gone but the socket stays open, as with a half-open connection.
    const subscriber = (bus as unknown as { subscriber: Redis }).subscriber;
    await subscriber.unsubscribe(channel);
    await until(
      () => cache.get('k'),
      (value) => value === undefined,
      3000,
    );
    // It reconnects and hears again.
    await until(
      () => bus.isLive,
      (live) => live,
      3000,
    );
    expect(cache.set('k2', 'v', cache.begin())).toBe(true);
    const other = await openBus();
    await other.invalidate('c', ['k2']);
    await until(
      () => cache.get('k2'),
      (value) => value === undefined,
      3000,
    );
    expect(bus.isLive).toBe(true);
  });

  it('with a TTL of 0 never subscribes and never caches', async () => {
    const bus = await openBus(0);
    const cache = bus.cache<string>('c', 10);
    await bus.start();
    expect(bus.enabled).toBe(false);
    expect(bus.isLive).toBe(false);
    expect(cache.set('k', 'v', cache.begin())).toBe(false);
    await bus.invalidate('c', ['k']);
  });
});

// ---------------------------------------------------------------------------------------------

describe('two API instances on the same data', () => {
  let a: TestContext;
  let b: TestContext;

  beforeAll(async () => {
    a = await createTestContext();
    b = await sibling(a);
    await until(
      () => a.container.invalidation.isLive && b.container.invalidation.isLive,
      (live) => live,
      5000,
    );
  });
  afterAll(async () => {
    await b?.close();
    await a?.close();
  });

  /** B answers `user` from its process cache: its claims are known without any lookup. */
  async function cachedOnB(user: SignedInUser) {
    expect((await me(b.app, user.headers)).statusCode).toBe(200);
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toEqual(claimsOf(user));
    const lookups = countCalls(
      b.container.redis,
      'get',
      b.container.keys.key('session', sessionIdOf(user.accessToken)),
    );
    expect((await me(b.app, user.headers)).statusCode).toBe(200);
    expect(lookups.count()).toBe(0);
    lookups.restore();
  }

  /** Waits until B refuses the session, then checks the refusal and that it is now cached. */
  async function refusedByB(user: SignedInUser) {
    await until(
      () => b.container.sessions.authenticateKnown(user.accessToken),
      (known) => known === undefined || known instanceof Error,
    );
    expectError(await me(b.app, user.headers), 401, 'UNAUTHENTICATED');
    // The refusal is remembered too: B does not look the session up again, and still refuses.
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toMatchObject({
      code: 'UNAUTHENTICATED',
    });
    const lookups = countCalls(
      b.container.redis,
      'get',
      b.container.keys.key('session', sessionIdOf(user.accessToken)),
    );
    expectError(await me(b.app, user.headers), 401, 'UNAUTHENTICATED');
    const rooms = await b.app.inject({ method: 'GET', url: '/chatroom', headers: user.headers });
    expectError(rooms, 401, 'UNAUTHENTICATED');
    expect(lookups.count()).toBe(0);
    lookups.restore();
  }

  it('refuses on B a session signed out on A, which B had cached', async () => {
    const user = await signIn(a.app);
    await cachedOnB(user);

    expect((await logout(a.app, user)).statusCode).toBe(204);
    await refusedByB(user);
  });

  it('refuses on B every session of a user signed out with all: true on A', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const other = await secondSession(b.app, user);
    await cachedOnB(user);
    await cachedOnB(other);

    expect((await logout(a.app, user, { all: true })).statusCode).toBe(204);
    await refusedByB(user);
    await refusedByB(other);
  });

  it('refuses on B the session of a refresh token signed out on A from another session', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const other = await secondSession(a.app, user);
    await cachedOnB(other);

    const res = await logout(a.app, user, { refreshToken: other.refreshToken });
    expect(res.statusCode, res.body).toBe(204);
    await refusedByB(other);
    // The session that signed the other out still works on B.
    expect((await me(b.app, user.headers)).statusCode).toBe(200);
  });

  it('does not keep a session B was checking while A signed it out', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const canary = await secondSession(a.app, user);
    await cachedOnB(canary);
    // A checks the session first: that leaves "live" in Redis, which B then reads.
    expect((await me(a.app, user.headers)).statusCode).toBe(200);

    const redis = b.container.redis;
    const sessionKey = b.container.keys.key('session', sessionIdOf(user.accessToken));
    const get = redis.get.bind(redis);
    const read = deferred();
    const release = deferred();
    let held = false;
    vi.spyOn(redis, 'get').mockImplementation((async (key: string) => {
      const value = await get(key);
      if (key === sessionKey && !held) {
        held = true;
        read.resolve();
        await release.promise;
      }
      return value;
    }) as never);
    const pending = me(b.app, user.headers);
    await read.promise;

    expect((await logout(a.app, user)).statusCode).toBe(204);
    // Published after the first sign-out: once B has dropped it, B has dropped both.
    expect((await logout(a.app, canary)).statusCode).toBe(204);
    await until(
      () => b.container.sessions.authenticateKnown(canary.accessToken),
      (known) => known === undefined,
    );
    release.resolve();
    // The request under way answers what it read before the sign-out; the next one is refused.
    expect((await pending).statusCode).toBe(200);
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toBeUndefined();
    expectError(await me(b.app, user.headers), 401, 'UNAUTHENTICATED');
  });

  it('serves B’s cached room list from process memory, then fresh after A creates, renames, deletes or prompts', async () => {
    const user = await signIn(a.app);
    const first = await createRoom(a.app, user, 'First');
    const listKey = b.container.keys.key('rooms', user.id);

    expect(await listRooms(b.app, user)).toEqual({ cache: 'MISS', names: ['First'] });
    const reads = countCalls(b.container.redis, 'mget', listKey);
    const loads = vi.spyOn(b.container.chatRepository, 'listRooms');
    expect(await listRooms(b.app, user)).toEqual({ cache: 'HIT', names: ['First'] });
    // Neither PostgreSQL nor Redis was asked.
    expect(reads.count()).toBe(0);
    expect(loads).not.toHaveBeenCalled();
    reads.restore();
    loads.mockRestore();

    /** B's next list after a change on A: a MISS with the new content, within the deadline. */
    async function freshOnB(expected: string[]) {
      const fresh = await until(
        () => listRooms(b.app, user),
        (list) => JSON.stringify(list.names) === JSON.stringify(expected),
      );
      expect(fresh.cache).toBe('MISS');
      expect(await listRooms(b.app, user)).toEqual({ cache: 'HIT', names: expected });
    }

    const second = await createRoom(a.app, user, 'Second');
    await freshOnB(['Second', 'First']);

    await rename(a.app, user, second.id, 'Second renamed');
    await freshOnB(['Second renamed', 'First']);

    const prompted = await sendMessage(a.app, user, first.id, 'Move this room to the top');
    expect(prompted.statusCode, prompted.body).toBe(202);
    await freshOnB(['First', 'Second renamed']);

    const deleted = await a.app.inject({
      method: 'DELETE',
      url: `/chatroom/${first.id}`,
      headers: user.headers,
    });
    expect(deleted.statusCode, deleted.body).toBe(204);
    await freshOnB(['Second renamed']);
  });

  /**
   * B loads the list from PostgreSQL, then A renames the room before B's load is done. The
   * second session is a canary: its sign-out is published after the rename on the same channel,
   * so once B has dropped it, B has dropped the list too.
   */
  async function loadAcrossRename(user: SignedInUser) {
    const canary = await secondSession(b.app, user);
    const room = await createRoom(a.app, user, 'Before');
    await cachedOnB(canary);

    const repo = b.container.chatRepository;
    const original = repo.listRooms.bind(repo);
    const read = deferred();
    const release = deferred();
    vi.spyOn(repo, 'listRooms').mockImplementationOnce(async (...args) => {
      const rows = await original(...args);
      read.resolve();
      await release.promise;
      return rows;
    });
    const pending = listRooms(b.app, user);
    await read.promise;

    await rename(a.app, user, room.id, 'After');
    expect((await logout(a.app, canary)).statusCode).toBe(204);
    await until(
      () => b.container.sessions.authenticateKnown(canary.accessToken),
      (known) => known === undefined,
    );
    return { pending, release };
  }

  it('serves B’s cached account from process memory, then fresh after A changes the profile', async () => {
    const user = await signIn(a.app, { name: 'Before' });
    expect((await me(b.app, user.headers)).json().name).toBe('Before');
    // A write the database does not announce (triggers off): B keeps what it read.
    await unannounced(b, `update users set name = 'Unannounced' where id = $1`, [user.id]);
    expect((await me(b.app, user.headers)).json().name).toBe('Before');

    const patched = await a.app.inject({
      method: 'PATCH',
      url: '/user/me',
      headers: user.headers,
      payload: { name: 'Through A' },
    });
    expect(patched.statusCode, patched.body).toBe(200);
    // A's own next request reads it at once; B's once the database's announcement arrives.
    expect((await me(a.app, user.headers)).json().name).toBe('Through A');
    await until(
      async () => (await me(b.app, user.headers)).json().name,
      (name) => name === 'Through A',
    );
  });

  it('drops an account on every instance when its subscriptions change by hand in the database', async () => {
    const user = await signIn(a.app);
    expect((await me(a.app, user.headers)).json().tier).toBe('basic');
    expect((await me(b.app, user.headers)).json().tier).toBe('basic');
    await a.container.database.pool.query(
      `insert into subscriptions (id, user_id, customer_id, status) values ($1, $2, $3, 'active')`,
      [`sub_hand_${user.id}`, user.id, `cus_hand_${user.id}`],
    );
    for (const app of [a.app, b.app]) {
      await until(
        async () => (await me(app, user.headers)).json().tier,
        (tier) => tier === 'pro',
      );
    }
    await a.container.database.pool.query(`delete from subscriptions where user_id = $1`, [
      user.id,
    ]);
    await until(
      async () => (await me(b.app, user.headers)).json().tier,
      (tier) => tier === 'basic',
    );
  });

  it('does not keep a list that B was loading while A renamed the room', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const { pending, release } = await loadAcrossRename(user);
    release.resolve();
    // The request that was under way answers what it read.
    expect(await pending).toEqual({ cache: 'MISS', names: ['Before'] });

    expect(await listRooms(b.app, user)).toEqual({ cache: 'MISS', names: ['After'] });
    expect(await listRooms(b.app, user)).toEqual({ cache: 'HIT', names: ['After'] });
  });

  it('does not hand B’s requests that arrive after A’s rename the list B was loading before it', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const { pending, release } = await loadAcrossRename(user);
    // This request starts after B has dropped the list: it must not share the stale load.
    const later = listRooms(b.app, user);
    release.resolve();
    await pending;
    expect((await later).names).toEqual(['After']);
  });
});

// ---------------------------------------------------------------------------------------------

describe('the invalidation bus down', () => {
  let redis: RedisInstance;
  let a: TestContext;
  let b: TestContext;

  const command = (...args: string[]) => redisCommand(redis.port, args);

  /** Ids of the connections whose last command was SUBSCRIBE (the buses' subscribers). */
  async function subscriberIds(): Promise<string[]> {
    const list = String(await command('CLIENT', 'LIST'));
    return list
      .split('\n')
      .filter((line) => / cmd=subscribe( |$)/.test(line))
      .map((line) => /(?:^|\s)id=(\d+)/.exec(line)?.[1])
      .filter((id): id is string => id !== undefined);
  }

  const live = () => a.container.invalidation.isLive && b.container.invalidation.isLive;

  beforeAll(async () => {
    redis = await startRedisInstance();
    a = await createTestContext({ env: { REDIS_URL: redis.url } });
    b = await sibling(a, { env: { REDIS_URL: redis.url } });
    await until(live, Boolean, 5000);
  });
  afterAll(async () => {
    await command('ACL', 'SETUSER', 'default', '+subscribe').catch(() => {});
    await b?.close();
    await a?.close();
    await redis?.destroy();
  });

  it('serves nothing from process memory while unsubscribed, so changes made meanwhile are seen; caches again once resubscribed', async () => {
    const user = await signIn(a.app, { password: PASSWORD });
    const later = await secondSession(a.app, user);
    const room = await createRoom(a.app, user, 'Before');
    await listRooms(b.app, user);
    expect(await listRooms(b.app, user)).toEqual({ cache: 'HIT', names: ['Before'] });
    await me(b.app, user.headers);
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toEqual(claimsOf(user));

    // Subscribing is refused from now on, and the subscribers are cut off: they reconnect, but
    // cannot subscribe again.
    await command('ACL', 'SETUSER', 'default', '-subscribe');
    await command('CLIENT', 'KILL', 'TYPE', 'pubsub');
    await until(
      () => a.container.invalidation.isLive || b.container.invalidation.isLive,
      (anyLive) => !anyLive,
    );
    // Both reconnected and were refused SUBSCRIBE; still down.
    const refused = 'cache invalidation subscribe failed';
    await until(
      () => a.logs.text.includes(refused) && b.logs.text.includes(refused),
      Boolean,
      5000,
    );
    expect(live()).toBe(false);

    // What B had cached is gone, and nothing it reads now is kept.
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toBeUndefined();
    const listKey = b.container.keys.key('rooms', user.id);
    const reads = countCalls(b.container.redis, 'mget', listKey);
    expect((await listRooms(b.app, user)).names).toEqual(['Before']);
    expect((await listRooms(b.app, user)).names).toEqual(['Before']);
    expect(reads.count()).toBe(2);
    reads.restore();
    expect((await me(b.app, user.headers)).statusCode).toBe(200);
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toBeUndefined();

    // Changes on A while B cannot hear of them: B still answers them at once.
    await rename(a.app, user, room.id, 'After');
    expect(await listRooms(b.app, user)).toEqual({ cache: 'MISS', names: ['After'] });
    expect((await logout(a.app, user)).statusCode).toBe(204);
    expectError(await me(b.app, user.headers), 401, 'UNAUTHENTICATED');

    // Subscribing allowed again; the refused connections are cut so they reconnect.
    await command('ACL', 'SETUSER', 'default', '+subscribe');
    for (const id of await subscriberIds()) await command('CLIENT', 'KILL', 'ID', id);
    await until(live, Boolean, 5000);

    await listRooms(b.app, later);
    const cachedReads = countCalls(b.container.redis, 'mget', listKey);
    expect(await listRooms(b.app, later)).toEqual({ cache: 'HIT', names: ['After'] });
    expect(cachedReads.count()).toBe(0);
    cachedReads.restore();
    expect((await me(b.app, later.headers)).statusCode).toBe(200);
    expect(b.container.sessions.authenticateKnown(later.accessToken)).toEqual(claimsOf(later));
    // And invalidations flow again.
    expect((await logout(a.app, later)).statusCode).toBe(204);
    await until(
      () => b.container.sessions.authenticateKnown(later.accessToken),
      (known) => known === undefined,
    );
    expectError(await me(b.app, later.headers), 401, 'UNAUTHENTICATED');
  });

  it('empties the caches when the subscriber connection drops, even if it resubscribes at once', async () => {
    await until(live, Boolean, 5000);
    const user = await signIn(a.app);
    await createRoom(a.app, user, 'Room');
    await listRooms(b.app, user);
    await me(b.app, user.headers);
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toEqual(claimsOf(user));

    await command('CLIENT', 'KILL', 'TYPE', 'pubsub');
    // The client waits before it reconnects, so the drop is seen.
    await until(
      () => b.container.invalidation.isLive,
      (isLive) => !isLive,
    );
    await until(live, Boolean, 5000);
    // Back live, B serves nothing it held from before the drop.
    expect(b.container.sessions.authenticateKnown(user.accessToken)).toBeUndefined();
    const reads = countCalls(b.container.redis, 'mget', b.container.keys.key('rooms', user.id));
    await listRooms(b.app, user);
    expect(reads.count()).toBe(1);
    reads.restore();
  });
});

// ---------------------------------------------------------------------------------------------

describe('the database change feed down', () => {
  let ctx: TestContext;
  beforeAll(async () => {
    ctx = await createTestContext();
    await until(
      () => ctx.container.accountChanges.isLive,
      (live) => live,
      5000,
    );
  });
  afterAll(async () => ctx?.close());

  /** Ends the feed's connection from the server's side, as a restart or a failover would. */
  async function terminateListener() {
    const { rows } = await ctx.container.database.pool.query<{ ended: boolean }>(
      `select pg_terminate_backend(pid) as ended from pg_stat_activity
       where application_name = 'gemini-chat change feed' and datname = current_database()`,
    );
    expect(rows.map((r) => r.ended)).toEqual([true]);
  }

  it('serves accounts from the database while not listening, and caches again once it listens', async () => {
    const user = await signIn(ctx.app, { name: 'First' });
    expect((await me(ctx.app, user.headers)).json().name).toBe('First');
    await unannounced(ctx, `update users set name = 'Second' where id = $1`, [user.id]);
    expect((await me(ctx.app, user.headers)).json().name).toBe('First');

    await terminateListener();
    await until(
      () => ctx.container.accountChanges.isLive,
      (live) => !live,
    );
    // Not listening: whatever changed may have been missed, so every read goes to the database.
    expect((await me(ctx.app, user.headers)).json().name).toBe('Second');
    await unannounced(ctx, `update users set name = 'Third' where id = $1`, [user.id]);
    expect((await me(ctx.app, user.headers)).json().name).toBe('Third');

    // It reconnects by itself, starts empty, and caches again.
    await until(
      () => ctx.container.accountChanges.isLive,
      (live) => live,
      5000,
    );
    expect((await me(ctx.app, user.headers)).json().name).toBe('Third');
    await unannounced(ctx, `update users set name = 'Fourth' where id = $1`, [user.id]);
    expect((await me(ctx.app, user.headers)).json().name).toBe('Third');
  });
});

describe('LOCAL_CACHE_SECONDS=0', () => {
  let ctx: TestContext;
  beforeAll(async () => {
    ctx = await createTestContext({ env: { LOCAL_CACHE_SECONDS: '0' } });
  });
  afterAll(async () => ctx?.close());

  it('turns the process caches off: every list is read from Redis, every session is checked', async () => {
    expect(ctx.container.invalidation.enabled).toBe(false);
    expect(ctx.container.invalidation.isLive).toBe(false);
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Only');

    const reads = countCalls(ctx.container.redis, 'mget', ctx.container.keys.key('rooms', user.id));
    const sessionKey = ctx.container.keys.key('session', sessionIdOf(user.accessToken));
    const lookups = countCalls(ctx.container.redis, 'get', sessionKey);
    const lists = [];
    for (let i = 0; i < 3; i++) lists.push(await listRooms(ctx.app, user));
    expect(lists).toEqual([
      { cache: 'MISS', names: ['Only'] },
      { cache: 'HIT', names: ['Only'] },
      { cache: 'HIT', names: ['Only'] },
    ]);
    expect(reads.count()).toBe(3);
    expect(lookups.count()).toBe(3);
    expect(ctx.container.sessions.authenticateKnown(user.accessToken)).toBeUndefined();

    await rename(ctx.app, user, room.id, 'Renamed');
    expect(await listRooms(ctx.app, user)).toEqual({ cache: 'MISS', names: ['Renamed'] });

    expect(ctx.container.accountChanges.isLive).toBe(false);
    await unannounced(ctx, `update users set name = 'By hand' where id = $1`, [user.id]);
    expect((await me(ctx.app, user.headers)).json().name).toBe('By hand');

    expect((await logout(ctx.app, user)).statusCode).toBe(204);
    expectError(await me(ctx.app, user.headers), 401, 'UNAUTHENTICATED');
  });
});
