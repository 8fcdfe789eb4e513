import { describe, expect, it, type TestContext as TestContextHooks } from 'vitest';
import { startWorker } from '../src/worker.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import {
  createTestContext,
  createTestDatabase,
  type TestContext,
  testEnv,
  testRedisPrefix,
} from './helpers/context.js';
import { type FakeGemini, type RecordedRequest, startFakeGemini } from './helpers/fake-gemini.js';
import { type ServiceProcess, spawnService } from './helpers/process.js';
import { startRedisInstance } from './helpers/redis-instance.js';
import { signIn } from './helpers/users.js';

type Cleanups = Array<() => Promise<unknown>>;

/** Per-test cleanups (the tests run concurrently, so a shared afterEach would not do). */
function cleanupsOf(onTestFinished: TestContextHooks['onTestFinished']): Cleanups {
  const cleanups: Cleanups = [];
  onTestFinished(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => {});
  });
  return cleanups;
}

async function fakeGemini(cleanups: Cleanups): Promise<FakeGemini> {
  const fake = await startFakeGemini({ apiKey: 'test-key' });
  cleanups.push(() => fake.close());
  return fake;
}

function geminiEnv(fake: FakeGemini) {
  return { LLM_PROVIDER: 'gemini', GEMINI_API_KEY: 'test-key', GEMINI_BASE_URL: fake.url };
}

async function context(
  cleanups: Cleanups,
  options: Parameters<typeof createTestContext>[0],
): Promise<TestContext> {
  const ctx = await createTestContext(options);
  cleanups.push(() => ctx.close());
  return ctx;
}

function lastPrompt(request: RecordedRequest): string | undefined {
  return request.body?.contents
    ?.at(-1)
    ?.parts?.map((p) => p.text ?? '')
    .join('');
}

async function eventually(probe: () => Promise<boolean> | boolean, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await probe()) return;
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// The two scenarios use separate databases, Redis prefixes (or servers) and fakes, so they run
// side by side: the first has to outwait the killed worker's 30-second BullMQ lock.
describe.concurrent('nothing accepted is lost', () => {
  it('completes a reply exactly once after its worker process is killed mid-stream', async ({
    onTestFinished,
  }) => {
    const cleanups = cleanupsOf(onTestFinished);
    const fake = await fakeGemini(cleanups);
    const database = await createTestDatabase();
    cleanups.push(database.drop);
    const redisPrefix = testRedisPrefix();
    const env = { ...geminiEnv(fake), REPLY_STALE_SECONDS: '1' };

    // The API alone, in-process; the first worker is a real service process of its own.
    const api = await context(cleanups, { databaseUrl: database.url, redisPrefix, env });
    const worker: ServiceProcess = spawnService(
      'src/main.ts',
      testEnv({
        ...env,
        ROLE: 'worker',
        WORKER_LOCK_SECONDS: '3',
        DATABASE_URL: database.url,
        REDIS_PREFIX: redisPrefix,
      }),
    );
    cleanups.push(() => worker.stop('SIGKILL'));
    await worker.waitForOutput(/service started/);

    fake.enqueue(
      { kind: 'text', text: 'slow '.repeat(100), chunks: 100, chunkDelayMs: 100 },
      { kind: 'text', text: 'The answer from the second worker' },
    );
    const user = await signIn(api.app);
    const room = await createRoom(api.app, user);
    const res = await sendMessage(api.app, user, room.id, 'Survive a crash');
    expect(res.statusCode, res.body).toBe(202);
    const { userMessage, assistantMessage } = res.json();

    // Mid-reply: the worker has streamed some text when it dies.
    await eventually(
      async () => (await api.container.streams.read(assistantMessage.id, '0')).length >= 3,
    );
    worker.child.kill('SIGKILL');
    await worker.exited;
    expect(worker.child.signalCode).toBe('SIGKILL');
    await fake.waitFor((requests) => requests[0]?.closedAt !== undefined);
    const [first] = fake.requests;
    expect(first!.aborted).toBe(true);
    const stuck = await api.app.inject({
      method: 'GET',
      url: `/chatroom/${room.id}/messages/${assistantMessage.id}`,
      headers: user.headers,
    });
    expect(stuck.json().status).toBe('streaming');

    // A second worker (with an eager sweeper) takes the job over once the dead one's lock lapses.
    const second = await context(cleanups, {
      databaseUrl: database.url,
      redisPrefix,
      env,
      worker: { lockDurationMs: 2000, stalledIntervalMs: 500 },
    });
    const reply = await waitForReply(second.app, user, room.id, assistantMessage.id, 45_000);

    expect(reply.status).toBe('completed');
    expect(reply.content).toBe('The answer from the second worker');
    await eventually(async () => {
      const job = await second.container.replyQueue.getJob(assistantMessage.id);
      return (await job?.getState()) === 'completed';
    });
    expect(fake.requests).toHaveLength(2);
    const { rows } = await second.container.database.pool.query(
      `select id, status, content from messages where reply_to_id = $1`,
      [userMessage.id],
    );
    expect(rows).toEqual([
      {
        id: assistantMessage.id,
        status: 'completed',
        content: 'The answer from the second worker',
      },
    ]);
    const events = await second.container.streams.read(assistantMessage.id, '0');
    expect(events.filter((e) => e.event.type === 'done')).toHaveLength(1);
    expect(events.filter((e) => e.event.type === 'reset')).toHaveLength(1);
  }, 90_000);

  it('queues a reply again from PostgreSQL after Redis is flushed, and the worker keeps working', async ({
    onTestFinished,
  }) => {
    const cleanups = cleanupsOf(onTestFinished);
    const fake = await fakeGemini(cleanups);
    const redis = await startRedisInstance();
    cleanups.push(() => redis.destroy());
    const ctx = await context(cleanups, {
      worker: true,
      env: {
        ...geminiEnv(fake),
        REDIS_URL: redis.url,
        REPLY_STALE_SECONDS: '1',
        SWEEP_INTERVAL_SECONDS: '1',
        WORKER_CONCURRENCY: '1',
      },
    });

    // The single worker slot is busy with a slow reply, so the next job waits in Redis.
    fake.enqueue({ kind: 'text', text: 'First answer', delayMs: 1500 });
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const busy = await sendMessage(ctx.app, user, room.id, 'Occupy the worker');
    expect(busy.statusCode, busy.body).toBe(202);
    await fake.waitFor((requests) => requests.length === 1);
    const res = await sendMessage(ctx.app, user, room.id, 'Accepted before the flush');
    expect(res.statusCode, res.body).toBe(202);
    const { assistantMessage } = res.json();
    const job = await ctx.container.replyQueue.getJob(assistantMessage.id);
    expect(await job?.getState()).toBe('waiting');

    await redis.flushAll();
    expect(await ctx.container.replyQueue.getJob(assistantMessage.id)).toBeUndefined();

    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id, 15_000);
    expect(reply.status).toBe('completed');
    expect(reply.content).toBe('Hello from fake Gemini');
    expect(
      fake.requests.filter((r) => lastPrompt(r) === 'Accepted before the flush').length,
    ).toBeGreaterThanOrEqual(1);
    const first = await waitForReply(ctx.app, user, room.id, busy.json().assistantMessage.id);
    expect(first).toMatchObject({ status: 'completed', content: 'First answer' });
    const { rows } = await ctx.container.database.pool.query(
      `select count(*)::int as n from messages where chatroom_id = $1 and role = 'assistant'`,
      [room.id],
    );
    expect(rows[0].n).toBe(2);

    // Messages accepted after the flush are answered too.
    const after = await sendMessage(ctx.app, user, room.id, 'After the flush');
    expect(after.statusCode, after.body).toBe(202);
    const afterReply = await waitForReply(
      ctx.app,
      user,
      room.id,
      after.json().assistantMessage.id,
      10_000,
    );
    expect(afterReply.status).toBe('completed');
  }, 30_000);
});

describe('a reply cancelled after its worker died', () => {
  it('keeps the text its stream had shown, and ends the stream with done', async ({
    onTestFinished,
  }) => {
    const cleanups = cleanupsOf(onTestFinished);
    const fake = await fakeGemini(cleanups);
    // No worker yet: the reply waits in the queue while we stage a crashed attempt.
    const ctx = await context(cleanups, { env: geminiEnv(fake) });
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const res = await sendMessage(ctx.app, user, room.id, 'Cancel me after a crash');
    expect(res.statusCode, res.body).toBe(202);
    const id: string = res.json().assistantMessage.id;

    // What a killed worker leaves behind: streamed text, a reset before a retry, more text.
    const { streams, database } = ctx.container;
    await streams.append(id, { type: 'delta', data: { text: 'first try' } });
    await streams.append(id, { type: 'reset', data: {} });
    await streams.append(id, { type: 'delta', data: { text: 'Hello ' } });
    await streams.append(id, { type: 'delta', data: { text: 'wor' } });
    await database.pool.query(
      `update messages set status = 'streaming', attempts = 2, cancel_requested_at = now() where id = $1`,
      [id],
    );

    const worker = await startWorker(ctx.container, {
      lockDurationMs: 2000,
      stalledIntervalMs: 500,
    });
    cleanups.push(() => worker.close(2000));
    const reply = await waitForReply(ctx.app, user, room.id, id);
    expect(reply.status).toBe('cancelled');
    expect(reply.content).toBe('Hello wor');
    expect(fake.requests).toHaveLength(0);
    const entries = await streams.read(id, '0-0');
    expect(entries.at(-1)?.event).toMatchObject({
      type: 'done',
      data: { status: 'cancelled', content: 'Hello wor' },
    });
  });
});
