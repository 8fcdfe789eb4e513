import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { compareStreamIds, QUEUE_ENTRIES, ReplyHub } from '../src/chat/reply-hub.js';
import { type ReplyEntry, type ReplyEvent, ReplyStreams } from '../src/chat/reply-stream.js';
import { RedisKeys } from '../src/lib/redis.js';
import { testRedisPrefix } from './helpers/context.js';
import { REDIS_URL } from './helpers/env.js';
import { startRedisInstance } from './helpers/redis-instance.js';

interface Setup {
  hub: ReplyHub;
  streams: ReplyStreams;
  redis: Redis;
  prefix: string;
}

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => {});
});

/** A hub and a stream writer of their own, under a key prefix of their own. */
async function setup(url = REDIS_URL): Promise<Setup> {
  const prefix = testRedisPrefix();
  const redis = new Redis(url, { maxRetriesPerRequest: 1 });
  const streams = new ReplyStreams(redis, new RedisKeys(prefix));
  const hub = new ReplyHub(streams, url, redis);
  hub.start();
  cleanups.push(async () => {
    await hub.close();
    const keys = await redis.keys(`${prefix}*`);
    if (keys.length > 0) await redis.del(...keys);
    redis.disconnect();
  });
  return { hub, streams, redis, prefix };
}

const delta = (text: string): ReplyEvent => ({ type: 'delta', data: { text } });
const done: ReplyEvent = { type: 'done', data: { status: 'completed' } };

/** Follows a reply until `done`, recording every entry and the size of every batch. */
function collect(
  hub: ReplyHub,
  messageId: string,
  fromId = '0-0',
  options: { signal?: AbortSignal; onEntry?: (entry: ReplyEntry) => void } = {},
) {
  const entries: ReplyEntry[] = [];
  const batches: number[] = [];
  const finished = (async () => {
    for await (const batch of hub.follow(messageId, fromId, { signal: options.signal })) {
      if (batch === null) continue;
      batches.push(batch.length);
      for (const entry of batch) {
        entries.push(entry);
        options.onEntry?.(entry);
      }
    }
    return entries;
  })();
  return { entries, batches, finished };
}

async function until(condition: () => Promise<boolean> | boolean, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(10);
  }
}

async function subscribers(redis: Redis, channel: string): Promise<number> {
  const reply = (await redis.call('PUBSUB', 'NUMSUB', channel)) as [string, number];
  return Number(reply[1]);
}

/** The stream's ids and events, as Redis holds them. */
async function streamContents(setup: Setup, messageId: string) {
  const entries = await setup.redis.xrange(setup.streams.key(messageId), '-', '+');
  return {
    ids: entries.map(([id]) => id),
    events: entries.map(([, fields]) => ({ type: fields[1], data: JSON.parse(fields[3]!) })),
  };
}

/** The id of the hub's subscriber connection, found by its name (which carries the prefix). */
async function hubConnectionId(redis: Redis, prefix: string): Promise<string | undefined> {
  const list = (await redis.call('CLIENT', 'LIST', 'TYPE', 'pubsub')) as string;
  const line = list.split('\n').find((l) => l.includes(` name=${prefix}reply-hub `));
  return line?.match(/^id=(\d+)/)?.[1];
}

describe('reply hub', () => {
  it('gives each of many followers of one reply every entry once, in order, without reading the stream per entry', async () => {
    const s = await setup();
    const id = randomUUID();
    const reads = vi.spyOn(s.streams, 'readMany');
    const followers = Array.from({ length: 20 }, () => collect(s.hub, id));
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    for (let i = 0; i < 300; i++) await s.streams.append(id, delta(`t${i} `));
    await s.streams.append(id, done);
    const results = await Promise.all(followers.map((f) => f.finished));

    const stream = await streamContents(s, id);
    expect(stream.ids).toHaveLength(301);
    for (const entries of results) {
      expect(entries.map((e) => e.id)).toEqual(stream.ids);
      expect(entries.map((e) => e.event)).toEqual(stream.events);
    }
    // Catch-up reads only as they joined (together: one for all); the entries were pushed.
    const readsOf = reads.mock.calls.filter(([requests]) =>
      requests.some((r) => r.messageId === id),
    );
    expect(readsOf.length).toBeGreaterThan(0);
    expect(readsOf.length).toBeLessThanOrEqual(2);
    // The last follower gone, the hub leaves the channel.
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 0);
  });

  it('gives a follower that joins mid-stream the backlog, then live entries, without gaps or repeats', async () => {
    const s = await setup();
    const id = randomUUID();
    const joiners: Array<{ from: string; follower: ReturnType<typeof collect> }> = [];
    // Followers join while entries are being appended, so their catch-up read races the
    // entries published around their SUBSCRIBE.
    for (let i = 0; i < 400; i++) {
      if (i % 40 === 5) {
        joiners.push({ from: '0-0', follower: collect(s.hub, id) });
        const [latest] = await s.redis.xrevrange(s.streams.key(id), '+', '-', 'COUNT', 1);
        const from = latest![0];
        joiners.push({ from, follower: collect(s.hub, id, from) });
      }
      await s.streams.append(id, delta(`m${i} `));
      if (i % 25 === 0) await sleep(2);
    }
    await s.streams.append(id, done);
    const stream = await streamContents(s, id);
    for (const { from, follower } of joiners) {
      const entries = await follower.finished;
      const expected = stream.ids.filter((e) => compareStreamIds(e, from) > 0);
      expect(entries.map((e) => e.id)).toEqual(expected);
    }
  });

  it('gives a follower resuming from an id past the end only the entries after that id', async () => {
    const s = await setup();
    const id = randomUUID();
    await s.streams.append(id, delta('old'));
    const future = `${Date.now() + 60_000}-0`;
    const controller = new AbortController();
    const follower = collect(s.hub, id, future, { signal: controller.signal });
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    for (let i = 0; i < 10; i++) await s.streams.append(id, delta(`${i}`));
    // Entries of the future id's millisecond come after it; written straight to the stream and
    // published as the worker's script would.
    const later = await s.redis.xadd(
      s.streams.key(id),
      `${future.split('-')[0]}-5`,
      'e',
      'done',
      'd',
      '{}',
    );
    await s.redis.publish(s.streams.channel(id), `${later}\ndone\n{}`);
    const entries = await follower.finished;
    expect(entries.map((e) => e.id)).toEqual([later]);
    controller.abort();
  });

  it('writes entries that arrive together as one batch', async () => {
    const s = await setup();
    const id = randomUUID();
    const follower = collect(s.hub, id);
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    await s.streams.append(id, delta('first'));
    await until(() => follower.entries.length === 1);
    await Promise.all(Array.from({ length: 200 }, (_, i) => s.streams.append(id, delta(`${i}`))));
    await s.streams.append(id, done);
    await follower.finished;
    expect(follower.entries).toHaveLength(202);
    expect(follower.batches.length).toBeLessThan(20);
  });

  it('holds a bounded queue for a reader that takes nothing, then serves it everything from the stream', async () => {
    const s = await setup();
    const id = randomUUID();
    const reads = vi.spyOn(s.streams, 'readMany');
    const follow = s.hub.follow(id, '0-0');
    const firstBatch = follow.next();
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    await s.streams.append(id, delta('first'));
    expect((await firstBatch).value).toHaveLength(1);

    // The reader now takes nothing while 3,000 entries of 2 KB are published.
    const total = 3000;
    let most = 0;
    for (let i = 0; i < total; i += 100) {
      await Promise.all(
        Array.from({ length: 100 }, (_, k) =>
          s.streams.append(id, delta(`${String(i + k).padStart(5, '0')}${'x'.repeat(2000)}`)),
        ),
      );
      most = Math.max(most, s.hub.held(id));
    }
    await s.streams.append(id, done);
    await sleep(100);
    most = Math.max(most, s.hub.held(id));
    expect(most).toBeGreaterThan(0);
    expect(most).toBeLessThanOrEqual(QUEUE_ENTRIES);

    const rest: ReplyEntry[] = [];
    for await (const batch of { [Symbol.asyncIterator]: () => follow }) {
      if (batch !== null) rest.push(...batch);
    }
    const stream = await streamContents(s, id);
    expect(rest.map((e) => e.id)).toEqual(stream.ids.slice(1));
    expect(rest.at(-1)?.event.type).toBe('done');
    // Past the bound it read the stream, in bounded batches.
    const catchUp = reads.mock.calls.filter(([requests]) =>
      requests.some((r) => r.messageId === id),
    );
    expect(catchUp.length).toBeGreaterThan(1);
    for (const [, options] of catchUp) expect(options.count).toBeLessThanOrEqual(200);
  });

  it('misses nothing when its subscriber connection is killed mid-reply', async () => {
    const s = await setup();
    const id = randomUUID();
    const follower = collect(s.hub, id);
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    for (let i = 0; i < 30; i++) await s.streams.append(id, delta(`a${i} `));
    await until(() => follower.entries.length === 30);

    const killed = await hubConnectionId(s.redis, s.prefix);
    expect(killed).toBeDefined();
    await s.redis.call('CLIENT', 'KILL', 'ID', killed!);
    // Published while the hub is reconnecting: nobody receives these.
    for (let i = 0; i < 30; i++) await s.streams.append(id, delta(`b${i} `));
    await until(async () => {
      const now = await hubConnectionId(s.redis, s.prefix);
      return now !== undefined && now !== killed;
    });
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    for (let i = 0; i < 30; i++) await s.streams.append(id, delta(`c${i} `));
    await s.streams.append(id, done);

    const entries = await follower.finished;
    const stream = await streamContents(s, id);
    expect(stream.ids).toHaveLength(91);
    expect(entries.map((e) => e.id)).toEqual(stream.ids);
  });

  it('restarts a flushed stream after its writer’s last id, so readers do not drop it as repeats', async () => {
    const server = await startRedisInstance();
    cleanups.push(() => server.destroy());
    const s = await setup(server.url);
    const id = randomUUID();
    // An entry a minute ahead of the clock stands for "appended earlier in this millisecond":
    // the writer's next ids follow it.
    const ahead = Date.now() + 60_000;
    await s.redis.xadd(s.streams.key(id), `${ahead}-0`, 'e', 'delta', 'd', '{"text":"x"}');
    const last = await s.streams.append(id, delta('before the flush'));
    expect(compareStreamIds(last, `${ahead}-0`)).toBeGreaterThan(0);

    await server.flushAll();
    const next = await s.streams.append(id, delta('after the flush'));
    expect(compareStreamIds(next, last)).toBeGreaterThan(0);
    const final = await s.streams.append(id, done);
    expect(compareStreamIds(final, next)).toBeGreaterThan(0);
    // A writer that knows no earlier id (another process) lets Redis choose as usual.
    const other = new ReplyStreams(s.redis, new RedisKeys(s.prefix));
    await server.flushAll();
    const fresh = await other.append(id, delta('fresh'));
    expect(Number(fresh.split('-')[0])).toBeLessThan(ahead);
  });

  it('keeps delivering across a flush and a restart of Redis', async () => {
    const server = await startRedisInstance();
    cleanups.push(() => server.destroy());
    const s = await setup(server.url);
    const id = randomUUID();
    const follower = collect(s.hub, id);
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    const texts: string[] = [];
    const append = async (text: string) => {
      // The writer retries while Redis is down, as the worker's job would.
      for (;;) {
        try {
          await s.streams.append(id, delta(text));
          texts.push(text);
          return;
        } catch {
          await sleep(50);
        }
      }
    };
    for (let i = 0; i < 20; i++) await append(`before ${i}`);
    await until(() => follower.entries.length === 20);

    await server.flushAll();
    for (let i = 0; i < 20; i++) await append(`flushed ${i}`);
    await until(() => follower.entries.length === 40);

    await server.restart();
    for (let i = 0; i < 20; i++) await append(`restarted ${i}`);
    await s.streams.append(id, done);

    const entries = await follower.finished;
    expect(entries.slice(0, -1).map((e) => (e.event.data as { text: string }).text)).toEqual(texts);
    expect(entries.at(-1)?.event.type).toBe('done');
    for (let i = 1; i < entries.length; i++) {
      expect(compareStreamIds(entries[i]!.id, entries[i - 1]!.id)).toBeGreaterThan(0);
    }
  }, 30_000);

  it('keeps its channels and connection name under the Redis prefix', async () => {
    const s = await setup();
    const id = randomUUID();
    const controller = new AbortController();
    const follower = collect(s.hub, id, '0-0', { signal: controller.signal });
    expect(s.streams.channel(id).startsWith(s.prefix)).toBe(true);
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 1);
    const channels = (await s.redis.call('PUBSUB', 'CHANNELS', `${s.prefix}*`)) as string[];
    expect(channels).toEqual([s.streams.channel(id)]);
    expect(await hubConnectionId(s.redis, s.prefix)).toBeDefined();
    controller.abort();
    await follower.finished;
    await until(async () => (await subscribers(s.redis, s.streams.channel(id))) === 0);
    expect(s.hub.followers(id)).toBe(0);
  });

  it('orders stream ids numerically, not as text', () => {
    expect(compareStreamIds('2-0', '10-0')).toBeLessThan(0);
    expect(compareStreamIds('10-0', '9-99')).toBeGreaterThan(0);
    expect(compareStreamIds('5-10', '5-9')).toBeGreaterThan(0);
    expect(compareStreamIds('5-1', '5-1')).toBe(0);
    expect(compareStreamIds('5', '5-0')).toBe(0);
    expect(compareStreamIds('18446744073709551615-1', '18446744073709551615-0')).toBeGreaterThan(0);
    expect(compareStreamIds('18446744073709551614-0', '18446744073709551615-0')).toBeLessThan(0);
  });
});
