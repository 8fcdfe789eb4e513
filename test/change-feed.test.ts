import net from 'node:net';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ChangeFeed, type ChangeFeedOptions } from '../src/db/change-feed.js';
import { runMigrations } from '../src/db/migrate.js';
import type { LocalCache } from '../src/lib/local-cache.js';
import { createLogger } from '../src/lib/logger.js';
import { LogCapture } from './helpers/context.js';
import { type PostgresInstance, startPostgresInstance } from './helpers/postgres-instance.js';
import { sleep, until } from './helpers/wait.js';

// A PostgreSQL of its own: one test freezes the feed's backend process.
describe('ChangeFeed (the accounts cache’s feed of database changes)', () => {
  let instance: PostgresInstance;
  let pool: pg.Pool;
  const feeds: ChangeFeed[] = [];

  beforeAll(async () => {
    instance = await startPostgresInstance();
    pool = new pg.Pool({ connectionString: instance.url(), max: 2 });
    await runMigrations(pool);
  }, 60_000);

  afterEach(async () => {
    for (const feed of feeds.splice(0)) await feed.close();
  });

  afterAll(async () => {
    await pool?.end();
    await instance?.destroy();
  });

  /** A feed on the instance (closed after the test); `options` override the defaults. */
  function newFeed(options: Partial<ChangeFeedOptions> = {}) {
    const feed = new ChangeFeed({
      databaseUrl: instance.url(),
      pool,
      channel: 'account_changed',
      ttlMs: 60_000,
      logger: createLogger('silent', new LogCapture()),
      ...options,
    });
    feeds.push(feed);
    return feed;
  }

  async function openFeed(heartbeatMs = 5000) {
    const feed = newFeed({ heartbeatMs });
    await feed.start();
    await until(
      () => feed.isLive,
      (live) => live,
      5000,
    );
    return feed;
  }

  async function insertUser(): Promise<string> {
    const mobile = `+9199${String(Math.floor(Math.random() * 1e8)).padStart(8, '0')}`;
    const { rows } = await pool.query<{ id: string }>(
      'insert into users (id, mobile) values (gen_random_uuid(), $1) returning id',
      [mobile],
    );
    return rows[0]!.id;
  }

  /** A change to a user reaches `cache`: the user's entry is dropped. */
  async function expectHears(cache: LocalCache<string>) {
    const userId = await insertUser();
    expect(cache.set(userId, 'cached', cache.begin())).toBe(true);
    await pool.query(`update users set name = 'Changed' where id = $1`, [userId]);
    await until(
      () => cache.get(userId),
      (value) => value === undefined,
    );
  }

  /** The feed's backend process on the server, found by its application name. */
  async function feedBackendPid(): Promise<number> {
    const { rows } = await pool.query<{ pid: number }>(
      `select pid from pg_stat_activity where application_name = 'gemini-chat change feed'`,
    );
    expect(rows).toHaveLength(1);
    return rows[0]!.pid;
  }

  it('drops a key when a user or one of their subscriptions changes, and not on a rollback', async () => {
    const feed = await openFeed();
    const cache = feed.cache<string>('accounts', 10);
    const userId = await insertUser();
    const put = () => expect(cache.set(userId, 'cached', cache.begin())).toBe(true);

    put();
    await pool.query(`update users set name = 'New' where id = $1`, [userId]);
    await until(
      () => cache.get(userId),
      (value) => value === undefined,
    );

    put();
    await pool.query(
      `insert into subscriptions (id, user_id, customer_id, status) values ($1, $2, 'cus_f', 'active')`,
      [`sub_f_${userId}`, userId],
    );
    await until(
      () => cache.get(userId),
      (value) => value === undefined,
    );

    put();
    await pool.query('delete from subscriptions where user_id = $1', [userId]);
    await until(
      () => cache.get(userId),
      (value) => value === undefined,
    );

    // A change that is rolled back is not announced: the entry stays.
    put();
    const client = await pool.connect();
    try {
      await client.query('begin');
      await client.query(`update users set name = 'Never' where id = $1`, [userId]);
      await client.query('rollback');
    } finally {
      client.release();
    }
    // A notification takes about a millisecond; none comes.
    await sleep(200);
    expect(cache.get(userId)).toBe('cached');
  });

  it('notices a connection that stops answering without closing, serves nothing meanwhile, and listens again', async () => {
    const feed = await openFeed(500);
    const cache = feed.cache<string>('accounts', 10);
    expect(cache.set('k', 'v', cache.begin())).toBe(true);
    // The heartbeat keeps coming back while the connection answers.
    await sleep(1200);
    expect(feed.isLive).toBe(true);
    expect(cache.get('k')).toBe('v');

    // Frozen, the backend neither answers nor closes the socket: a half-open connection.
    const pid = await feedBackendPid();
    process.kill(pid, 'SIGSTOP');
    try {
      await until(
        () => feed.isLive,
        (live) => !live,
        4000,
      );
      expect(cache.get('k')).toBeUndefined();
      expect(cache.set('k', 'v', cache.begin())).toBe(false);
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    // A new connection listens, and the cache is in use again (empty: changes may have been missed).
    await until(
      () => feed.isLive,
      (live) => live,
      5000,
    );
    expect(cache.get('k')).toBeUndefined();
    expect(cache.set('k', 'v', cache.begin())).toBe(true);
    await expectHears(cache);
  });

  it('empties the whole cache when a table is truncated', async () => {
    const feed = await openFeed();
    const cache = feed.cache<string>('accounts', 10);
    expect(cache.set('a', '1', cache.begin())).toBe(true);
    expect(cache.set('b', '2', cache.begin())).toBe(true);
    await pool.query('truncate subscriptions');
    await until(
      () => [cache.get('a'), cache.get('b')],
      (values) => values.every((v) => v === undefined),
    );
    expect(feed.isLive).toBe(true);
  });

  it('notices a listener that answers queries but no longer hears notifications, and listens again', async () => {
    const feed = await openFeed(300);
    const cache = feed.cache<string>('accounts', 10);
    expect(cache.set('k', 'v', cache.begin())).toBe(true);
    // Deaf behind the feed's back, as behind a pooler that hands LISTEN to another connection.
    const listener = (feed as unknown as { client: pg.Client }).client;
    await listener.query('UNLISTEN *');
    await until(
      () => feed.isLive,
      (live) => !live,
      3000,
    );
    expect(cache.get('k')).toBeUndefined();
    await until(
      () => feed.isLive,
      (live) => live,
      5000,
    );
    await expectHears(cache);
  });

  it('gives up on a server that accepts the connection and never answers, and tries again', async () => {
    const sockets: net.Socket[] = [];
    const silent = net.createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const { port } = silent.address() as net.AddressInfo;
    const feed = newFeed({
      databaseUrl: `postgres://postgres@127.0.0.1:${port}/postgres`,
      heartbeatMs: 200,
    });
    try {
      await feed.start();
      await until(
        () => sockets.length,
        (n) => n >= 2,
        5000,
      );
      expect(feed.isLive).toBe(false);
    } finally {
      await feed.close();
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  it('with a TTL of 0 never listens and never caches', async () => {
    const feed = newFeed({ ttlMs: 0 });
    const cache = feed.cache<string>('accounts', 10);
    await feed.start();
    expect(feed.enabled).toBe(false);
    expect(feed.isLive).toBe(false);
    expect(cache.set('k', 'v', cache.begin())).toBe(false);
  });
});
