import { Redis } from 'ioredis';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type PostgresInstance, startPostgresInstance } from './helpers/postgres-instance.js';
import { type RedisInstance, redisCommand, startRedisInstance } from './helpers/redis-instance.js';

describe('redis instance', () => {
  let redis: RedisInstance;

  beforeAll(async () => {
    redis = await startRedisInstance();
  });

  afterAll(async () => {
    await redis?.destroy();
  });

  it('answers PING on its own port, not the shared one', async () => {
    expect(redis.port).not.toBe(6379);
    expect(redis.url).toBe(`redis://127.0.0.1:${redis.port}`);
    expect(await redisCommand(redis.port, ['PING'])).toBe('PONG');
  });

  it('works with ioredis through its url', async () => {
    const client = new Redis(redis.url, { maxRetriesPerRequest: 1 });
    try {
      await client.set('ioredis-key', 'value');
      expect(await client.get('ioredis-key')).toBe('value');
    } finally {
      client.disconnect();
    }
  });

  it('flushAll removes every key', async () => {
    await redisCommand(redis.port, ['SET', 'a', '1']);
    await redisCommand(redis.port, ['SET', 'b', '2']);
    expect(await redisCommand(redis.port, ['DBSIZE'])).toBeGreaterThanOrEqual(2);
    await redis.flushAll();
    expect(await redisCommand(redis.port, ['DBSIZE'])).toBe(0);
  });

  it('stop refuses connections and start serves again on the same port', async () => {
    const port = redis.port;
    await redis.stop();
    await expect(redisCommand(port, ['PING'])).rejects.toThrow(/ECONNREFUSED/);
    await redis.start();
    expect(redis.port).toBe(port);
    expect(await redisCommand(port, ['PING'])).toBe('PONG');
  });

  it('restart and kill leave a usable instance', async () => {
    await redis.restart();
    expect(await redisCommand(redis.port, ['PING'])).toBe('PONG');
    await redis.kill();
    await expect(redisCommand(redis.port, ['PING'])).rejects.toThrow(/ECONNREFUSED/);
    await redis.start();
    expect(await redisCommand(redis.port, ['PING'])).toBe('PONG');
  });

  it('destroy is idempotent', async () => {
    const other = await startRedisInstance();
    await other.destroy();
    await other.destroy();
    await expect(redisCommand(other.port, ['PING'])).rejects.toThrow(/ECONNREFUSED/);
  });
});

describe('persistent redis instance', () => {
  it('keeps its data across a restart, and wipe() makes the next start empty', async () => {
    const redis = await startRedisInstance({ persistent: true });
    try {
      await redisCommand(redis.port, ['SET', 'kept', 'yes']);
      await redis.restart();
      expect(await redisCommand(redis.port, ['GET', 'kept'])).toBe('yes');
      await expect(redis.wipe()).rejects.toThrow(/stopped/);
      await redis.stop();
      expect(redis.running()).toBe(false);
      await redis.wipe();
      await redis.start();
      expect(await redis.dbSize()).toBe(0);
    } finally {
      await redis.destroy();
    }
  });
});

describe('postgres instance', () => {
  let postgres: PostgresInstance;

  beforeAll(async () => {
    postgres = await startPostgresInstance();
  });

  afterAll(async () => {
    await postgres?.destroy();
  });

  async function query<T extends pg.QueryResultRow>(sql: string): Promise<T[]> {
    const client = new pg.Client({ connectionString: postgres.url() });
    await client.connect();
    try {
      return (await client.query<T>(sql)).rows;
    } finally {
      await client.end();
    }
  }

  it('accepts a pg connection on its own port', async () => {
    expect(postgres.port).not.toBe(5432);
    expect(postgres.url()).toBe(`postgres://postgres@127.0.0.1:${postgres.port}/postgres`);
    expect(postgres.url('other')).toBe(`postgres://postgres@127.0.0.1:${postgres.port}/other`);
    const rows = await query<{ answer: number }>('select 1 as answer');
    expect(rows).toEqual([{ answer: 1 }]);
  });

  it('stop refuses connections and start keeps the data', async () => {
    await query('create table kept (value text)');
    await query("insert into kept values ('before stop')");

    await postgres.stop();
    await expect(query('select 1')).rejects.toThrow(/ECONNREFUSED/);

    await postgres.start();
    expect(await query<{ value: string }>('select value from kept')).toEqual([
      { value: 'before stop' },
    ]);

    await postgres.restart();
    expect(await query<{ value: string }>('select value from kept')).toEqual([
      { value: 'before stop' },
    ]);
  });

  it('destroy is idempotent and removes the instance', async () => {
    const other = await startPostgresInstance();
    await other.destroy();
    await other.destroy();
    const client = new pg.Client({ connectionString: other.url() });
    await expect(client.connect()).rejects.toThrow(/ECONNREFUSED/);
  });
});
