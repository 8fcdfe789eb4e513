import { once } from 'node:events';
import { connect } from 'node:net';
import { createParser } from 'eventsource-parser';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { compareStreamIds } from '../src/chat/reply-hub.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeGemini, type RecordedRequest, startFakeGemini } from './helpers/fake-gemini.js';
import { openSse, type SseEvent } from './helpers/sse.js';
import { itRejectsBadTokens, type SignedInUser, signIn } from './helpers/users.js';

let fake: FakeGemini;
let ctx: TestContext;
let base: string;
let env: Record<string, string>;

beforeAll(async () => {
  fake = await startFakeGemini();
  env = {
    LLM_PROVIDER: 'gemini',
    GEMINI_API_KEY: 'k',
    GEMINI_BASE_URL: fake.url,
    BASIC_DAILY_LIMIT: '1000',
  };
  ctx = await createTestContext({ worker: true, env });
  base = await ctx.app.listen({ port: 0, host: '127.0.0.1' });
});

afterAll(async () => {
  await ctx?.close();
  await fake?.close();
});

interface Message {
  id: string;
  role: 'user' | 'assistant';
  content: string;
  status: string;
  replyToId: string | null;
  createdAt: string;
  completedAt: string | null;
}

const streamUrl = (roomId: string, messageId: string, at = base) =>
  `${at}/chatroom/${roomId}/messages/${messageId}/stream`;

/** The events after `ready` (the ones with ids, that a client resumes from). */
const replyEventsOf = (events: SseEvent[]) => events.filter((e) => e.event !== 'ready');

const deltaText = (events: SseEvent[]) =>
  events
    .filter((e) => e.event === 'delta')
    .map((e) => (e.data as { text: string }).text)
    .join('');

/** The last user turn of a request to the fake: the prompt it answers. */
const promptOf = (request: RecordedRequest) =>
  request.body?.contents
    ?.at(-1)
    ?.parts?.map((p) => p.text ?? '')
    .join('');

const requestFor = (prompt: string) => fake.requests.find((r) => promptOf(r) === prompt);

async function poll<T>(
  read: () => Promise<T> | T,
  done: (value: T) => boolean,
  timeoutMs = 5000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (done(value)) return value;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs}ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Opens a reply's stream and waits for its first `atLeast` deltas; `deltas()` counts on. */
async function followUntil(user: SignedInUser, roomId: string, messageId: string, atLeast: number) {
  let count = 0;
  const sse = await openSse(streamUrl(roomId, messageId), {
    headers: user.headers,
    onEvent: (e) => {
      if (e.event === 'delta') count++;
    },
  });
  await poll(
    () => count,
    (n) => n >= atLeast,
  );
  return { sse, deltas: () => count };
}

async function getMessage(user: SignedInUser, roomId: string, messageId: string, app = ctx.app) {
  const res = await app.inject({
    method: 'GET',
    url: `/chatroom/${roomId}/messages/${messageId}`,
    headers: user.headers,
  });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as Message;
}

async function cancel(user: SignedInUser, roomId: string, messageId: string, app = ctx.app) {
  return app.inject({
    method: 'POST',
    url: `/chatroom/${roomId}/messages/${messageId}/cancel`,
    headers: user.headers,
  });
}

/** Sends a prompt and returns the queued reply. */
async function send(user: SignedInUser, roomId: string, content: string, app = ctx.app) {
  const res = await sendMessage(app, user, roomId, content);
  expect(res.statusCode, res.body).toBe(202);
  return res.json() as { userMessage: Message; assistantMessage: Message };
}

/** Subscribers of a pub/sub channel (the hubs following a reply). */
async function subscribers(channel: string): Promise<number> {
  const reply = (await ctx.container.redis.call('PUBSUB', 'NUMSUB', channel)) as [string, number];
  return Number(reply[1]);
}

async function newRoom(app = ctx.app) {
  const user = await signIn(app);
  const room = await createRoom(app, user);
  return { user, room };
}

describe('streaming a reply', () => {
  it('sends deltas whose concatenation is the stored content, for a reply of 200 chunks', async () => {
    const { user, room } = await newRoom();
    // Pieces that would break hand-rolled SSE framing: newlines, CRLF, field-like text, emoji.
    const pieces = Array.from({ length: 200 }, (_, i) =>
      i % 4 === 0
        ? `line ${i}\n`
        : i % 4 === 1
          ? `data: ${i}\r\n`
          : i % 4 === 2
            ? `id: 🧪${i}`
            : ' ',
    );
    fake.enqueue({ kind: 'text', text: '', chunks: pieces });
    const { assistantMessage } = await send(user, room.id, 'two hundred chunks');
    const sse = await openSse(streamUrl(room.id, assistantMessage.id), { headers: user.headers });
    expect(sse.status).toBe(200);
    expect(sse.headers.get('content-type')).toContain('text/event-stream');
    const events = await sse.events;
    const final = await waitForReply(ctx.app, user, room.id, assistantMessage.id);

    expect(events[0]?.event).toBe('ready');
    const deltas = events.filter((e) => e.event === 'delta');
    expect(deltas).toHaveLength(200);
    expect(deltas.map((e) => (e.data as { text: string }).text)).toEqual(pieces);
    expect(final.status).toBe('completed');
    expect(final.content).toBe(pieces.join(''));
    expect(deltaText(events)).toBe(final.content);
    expect(events.at(-1)).toMatchObject({
      event: 'done',
      data: { id: assistantMessage.id, status: 'completed', content: final.content },
    });
    // Every event after `ready` has a Redis stream id, strictly increasing.
    const ids = replyEventsOf(events).map((e) => e.id ?? '');
    for (const id of ids) expect(id).toMatch(/^\d+-\d+$/);
    for (let i = 1; i < ids.length; i++) {
      expect(compareStreamIds(ids[i]!, ids[i - 1]!)).toBeGreaterThan(0);
    }
  });

  it('resumes after Last-Event-ID with exactly the remaining events, no gaps and no repeats', async () => {
    const { user, room } = await newRoom();
    const pieces = Array.from({ length: 100 }, (_, i) => `p${i};`);
    fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 10 });
    const { assistantMessage } = await send(user, room.id, 'resume me');
    const url = streamUrl(room.id, assistantMessage.id);

    const first = await openSse(url, { headers: user.headers, stopAfter: 50 });
    const firstEvents = await first.events;
    expect(firstEvents).toHaveLength(50);
    // The client dropped off while the reply was still being generated.
    expect((await getMessage(user, room.id, assistantMessage.id)).status).toBe('streaming');
    const lastId = firstEvents.at(-1)?.id;
    expect(lastId).toMatch(/^\d+-\d+$/);

    const second = await openSse(url, {
      headers: { ...user.headers, 'last-event-id': lastId! },
    });
    const secondEvents = await second.events;
    expect(secondEvents[0]?.event).toBe('ready');
    expect(secondEvents.at(-1)?.event).toBe('done');

    // A full read from the start, once the reply is finished, is the reference.
    const full = replyEventsOf(await (await openSse(url, { headers: user.headers })).events);
    expect(full).toHaveLength(101);
    const resumed = [...replyEventsOf(firstEvents), ...replyEventsOf(secondEvents)];
    expect(resumed.map((e) => e.id)).toEqual(full.map((e) => e.id));
    expect(resumed).toEqual(full);
    expect(deltaText(resumed)).toBe(pieces.join(''));
  });

  it('serves a reply posted to one app instance from another instance, live', async () => {
    const other = await createTestContext({
      env,
      databaseUrl: ctx.config.databaseUrl,
      redisPrefix: ctx.config.redisPrefix,
    });
    try {
      const otherBase = await other.app.listen({ port: 0, host: '127.0.0.1' });
      const { user, room } = await newRoom();
      const pieces = Array.from({ length: 20 }, (_, i) => `x${i} `);
      fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 25 });
      const { assistantMessage } = await send(user, room.id, 'cross instance');
      let firstDeltaAt = 0;
      const sse = await openSse(streamUrl(room.id, assistantMessage.id, otherBase), {
        headers: user.headers,
        onEvent: (e) => {
          if (e.event === 'delta' && !firstDeltaAt) firstDeltaAt = Date.now();
        },
      });
      expect(sse.status).toBe(200);
      const events = await sse.events;
      const final = await waitForReply(other.app, user, room.id, assistantMessage.id);
      expect(final.content).toBe(pieces.join(''));
      expect(deltaText(events)).toBe(final.content);
      expect(events.filter((e) => e.event === 'delta')).toHaveLength(20);
      expect(events.at(-1)).toMatchObject({ event: 'done', data: { status: 'completed' } });
      // Followed live from Redis, not served from PostgreSQL after the fact.
      for (const e of replyEventsOf(events)) expect(e.id).toMatch(/^\d+-\d+$/);
      expect(firstDeltaAt).toBeGreaterThan(0);
      expect(firstDeltaAt).toBeLessThan(Date.parse(final.completedAt!));
    } finally {
      await other.close();
    }
  });

  it('streams one reply to many clients at once, each getting every event once and in order', async () => {
    const { user, room } = await newRoom();
    const pieces = Array.from({ length: 60 }, (_, i) => `f${i} `);
    fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 10 });
    const { assistantMessage } = await send(user, room.id, 'many clients');
    const url = streamUrl(room.id, assistantMessage.id);
    // Clients join one after another while the reply streams: early ones follow it live, later
    // ones catch up from the stream first.
    const clients: Array<Promise<SseEvent[]>> = [];
    for (let i = 0; i < 12; i++) {
      clients.push(openSse(url, { headers: user.headers }).then((sse) => sse.events));
      await new Promise((resolve) => setTimeout(resolve, 40));
    }
    const all = await Promise.all(clients);
    const reference = replyEventsOf(await (await openSse(url, { headers: user.headers })).events);
    expect(reference.filter((e) => e.event === 'delta')).toHaveLength(60);
    for (const events of all) expect(replyEventsOf(events)).toEqual(reference);
    expect(deltaText(reference)).toBe(pieces.join(''));
  });

  it("keeps streaming without a gap when the API's subscriber connection to Redis is killed", async () => {
    const { user, room } = await newRoom();
    const pieces = Array.from({ length: 80 }, (_, i) => `k${i} `);
    fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 15 });
    const { assistantMessage } = await send(user, room.id, 'kill the subscriber');
    const { sse, deltas } = await followUntil(user, room.id, assistantMessage.id, 10);
    const list = (await ctx.container.redis.call('CLIENT', 'LIST', 'TYPE', 'pubsub')) as string;
    const hubs = list
      .split('\n')
      .filter((line) => line.includes(` name=${ctx.config.redisPrefix}reply-hub `))
      .map((line) => line.match(/^id=(\d+)/)![1]!);
    expect(hubs.length).toBeGreaterThan(0);
    for (const id of hubs) await ctx.container.redis.call('CLIENT', 'KILL', 'ID', id);
    const killedAt = deltas();

    const events = await sse.events;
    const final = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    expect(killedAt).toBeLessThan(80);
    expect(final.content).toBe(pieces.join(''));
    expect(events.filter((e) => e.event === 'delta')).toHaveLength(80);
    expect(deltaText(events)).toBe(final.content);
    expect(events.at(-1)).toMatchObject({ event: 'done', data: { status: 'completed' } });
    const ids = replyEventsOf(events).map((e) => e.id!);
    for (let i = 1; i < ids.length; i++) {
      expect(compareStreamIds(ids[i]!, ids[i - 1]!)).toBeGreaterThan(0);
    }
  });

  it('keeps generating and stores the reply when the client disconnects mid-reply', async () => {
    const { user, room } = await newRoom();
    const pieces = Array.from({ length: 40 }, (_, i) => `d${i} `);
    fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 20 });
    const { assistantMessage } = await send(user, room.id, 'leave early');
    const sse = await openSse(streamUrl(room.id, assistantMessage.id), {
      headers: user.headers,
      stopAfter: 5,
    });
    const events = await sse.events;
    expect(events).toHaveLength(5);
    expect((await getMessage(user, room.id, assistantMessage.id)).status).toBe('streaming');

    const final = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    expect(final.status).toBe('completed');
    expect(final.content).toBe(pieces.join(''));
    const upstream = requestFor('leave early');
    expect(upstream?.aborted).toBe(false);
    expect(upstream?.finishedAt).toBeDefined();
  });

  it('streams the new reply on the POST response with Accept: text/event-stream', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'text', text: 'streamed on the post', chunks: 4, chunkDelayMs: 5 });
    const sse = await openSse(`${base}/chatroom/${room.id}/message`, {
      method: 'POST',
      headers: { ...user.headers, 'content-type': 'application/json' },
      body: JSON.stringify({ content: 'stream it here' }),
    });
    expect(sse.status).toBe(200);
    expect(sse.headers.get('content-type')).toContain('text/event-stream');
    expect(sse.headers.get('x-ratelimit-remaining')).toMatch(/^\d+$/);
    const events = await sse.events;
    expect(events.map((e) => e.event)).toEqual([
      'ready',
      'accepted',
      'delta',
      'delta',
      'delta',
      'delta',
      'done',
    ]);
    const accepted = events[1]?.data as { userMessage: Message; assistantMessage: Message };
    expect(accepted.userMessage).toMatchObject({ role: 'user', content: 'stream it here' });
    expect(accepted.assistantMessage).toMatchObject({ role: 'assistant', status: 'queued' });
    expect(deltaText(events)).toBe('streamed on the post');
    expect(events.at(-1)?.data).toMatchObject({
      id: accepted.assistantMessage.id,
      status: 'completed',
      content: 'streamed on the post',
    });
    const stored = await getMessage(user, room.id, accepted.assistantMessage.id);
    expect(stored.content).toBe('streamed on the post');
  });

  it('serves a finished reply whose stream expired from PostgreSQL as one delta and done', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'text', text: 'from the database', chunks: 5 });
    const { assistantMessage } = await send(user, room.id, 'expire');
    const final = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    const url = streamUrl(room.id, assistantMessage.id);
    const live = replyEventsOf(await (await openSse(url, { headers: user.headers })).events);
    expect(live.filter((e) => e.event === 'delta')).toHaveLength(5);

    await ctx.container.redis.del(ctx.container.streams.key(assistantMessage.id));
    const events = replyEventsOf(await (await openSse(url, { headers: user.headers })).events);
    expect(events).toEqual([
      { id: 'db-1', event: 'delta', data: { text: 'from the database' } },
      {
        id: 'db-2',
        event: 'done',
        data: expect.objectContaining({ id: final.id, status: 'completed' }),
      },
    ]);

    // A client resuming from an id of the expired stream is told to start over.
    const resumed = replyEventsOf(
      await (await openSse(url, { headers: { ...user.headers, 'last-event-id': live[1]!.id! } }))
        .events,
    );
    expect(resumed.map((e) => e.event)).toEqual(['reset', 'delta', 'done']);
    expect(deltaText(resumed)).toBe('from the database');
  });
});

describe('cancel', () => {
  it('aborts the upstream request within a second, keeps the partial text and ends open streams with done', async () => {
    const { user, room } = await newRoom();
    const pieces = Array.from({ length: 100 }, (_, i) => `c${i} `);
    const full = pieces.join('');
    fake.enqueue({ kind: 'text', text: '', chunks: pieces, chunkDelayMs: 50 });
    const { assistantMessage } = await send(user, room.id, 'stop me');
    const { sse } = await followUntil(user, room.id, assistantMessage.id, 5);

    const cancelledAt = Date.now();
    const res = await cancel(user, room.id, assistantMessage.id);
    expect(res.statusCode, res.body).toBe(200);
    await fake.waitFor(() => requestFor('stop me')?.closedAt !== undefined, 2000);
    const upstream = requestFor('stop me')!;
    expect(upstream.aborted).toBe(true);
    expect(upstream.closedAt! - cancelledAt).toBeLessThan(1000);

    const events = await sse.events;
    const endedAt = Date.now();
    expect(endedAt - cancelledAt).toBeLessThan(2000);
    const done = events.at(-1);
    expect(done?.event).toBe('done');
    const stored = await getMessage(user, room.id, assistantMessage.id);
    expect(stored.status).toBe('cancelled');
    expect(stored.content.length).toBeGreaterThan(0);
    expect(stored.content.length).toBeLessThan(full.length);
    expect(full.startsWith(stored.content)).toBe(true);
    expect(done?.data).toMatchObject({ status: 'cancelled', content: stored.content });
    expect(deltaText(events)).toBe(stored.content);
  });

  it('cancels a queued reply at once when no worker has taken it', async () => {
    const solo = await createTestContext({ env });
    try {
      const soloBase = await solo.app.listen({ port: 0, host: '127.0.0.1' });
      const { user, room } = await newRoom(solo.app);
      const { assistantMessage } = await send(user, room.id, 'never generated', solo.app);
      expect(assistantMessage.status).toBe('queued');
      const sse = await openSse(streamUrl(room.id, assistantMessage.id, soloBase), {
        headers: user.headers,
      });
      const res = await cancel(user, room.id, assistantMessage.id, solo.app);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json()).toMatchObject({ id: assistantMessage.id, status: 'cancelled' });
      expect((await getMessage(user, room.id, assistantMessage.id, solo.app)).status).toBe(
        'cancelled',
      );
      const events = await sse.events;
      expect(events.at(-1)).toMatchObject({
        event: 'done',
        data: { id: assistantMessage.id, status: 'cancelled' },
      });
      // Its job left the queue: nothing will generate it later.
      expect(await solo.container.replyQueue.getJob(assistantMessage.id)).toBeUndefined();
    } finally {
      await solo.close();
    }
  });

  it('leaves a finished reply as it was', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'text', text: 'already done' });
    const { assistantMessage } = await send(user, room.id, 'finish first');
    const before = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    const res = await cancel(user, room.id, assistantMessage.id);
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json()).toEqual(before);
    expect(await getMessage(user, room.id, assistantMessage.id)).toEqual(before);
  });

  it('refuses to cancel a user message with 409', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'text', text: 'fine' });
    const { userMessage, assistantMessage } = await send(user, room.id, 'my prompt');
    const res = await cancel(user, room.id, userMessage.id);
    expect(res.statusCode, res.body).toBe(409);
    expect(res.json().error.code).toBe('CONFLICT');
    await waitForReply(ctx.app, user, room.id, assistantMessage.id);
  });
});

describe('deleting a room', () => {
  it('stops its reply in flight: the upstream request is closed within a second', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({
      kind: 'text',
      text: '',
      chunks: Array.from({ length: 100 }, (_, i) => `r${i} `),
      chunkDelayMs: 50,
    });
    await send(user, room.id, 'delete my room');
    await fake.waitFor(() => requestFor('delete my room') !== undefined);
    const deletedAt = Date.now();
    const res = await ctx.app.inject({
      method: 'DELETE',
      url: `/chatroom/${room.id}`,
      headers: user.headers,
    });
    expect(res.statusCode, res.body).toBe(204);
    await fake.waitFor(() => requestFor('delete my room')?.closedAt !== undefined, 2000);
    expect(requestFor('delete my room')!.closedAt! - deletedAt).toBeLessThan(1000);
  });
});

describe('?wait', () => {
  it('answers 200 with the finished reply when it is fast', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'text', text: 'quick answer', chunks: 2 });
    const res = await ctx.app.inject({
      method: 'POST',
      url: `/chatroom/${room.id}/message?wait=5`,
      headers: user.headers,
      payload: { content: 'be quick' },
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().assistantMessage).toMatchObject({
      status: 'completed',
      content: 'quick answer',
    });
    expect(res.json().userMessage).toMatchObject({ role: 'user', content: 'be quick' });
  });

  it('answers 202 after about 5 s when the reply takes 10 s', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({
      kind: 'text',
      text: '',
      chunks: Array.from({ length: 100 }, (_, i) => `s${i} `),
      chunkDelayMs: 100,
    });
    const startedAt = Date.now();
    const res = await ctx.app.inject({
      method: 'POST',
      url: `/chatroom/${room.id}/message?wait=5`,
      headers: user.headers,
      payload: { content: 'take your time' },
    });
    const elapsed = Date.now() - startedAt;
    expect(res.statusCode, res.body).toBe(202);
    expect(elapsed).toBeGreaterThanOrEqual(4900);
    expect(elapsed).toBeLessThan(7000);
    const { assistantMessage } = res.json() as { assistantMessage: Message };
    expect(res.headers.location).toBe(`/chatroom/${room.id}/messages/${assistantMessage.id}`);
    expect(['queued', 'streaming']).toContain(assistantMessage.status);
    // Stop the long reply rather than wait for it.
    expect((await cancel(user, room.id, assistantMessage.id)).statusCode).toBe(200);
    expect((await waitForReply(ctx.app, user, room.id, assistantMessage.id)).status).toBe(
      'cancelled',
    );
  });
});

describe('regenerate', () => {
  it('adds a second reply to the same prompt, counts a prompt, and keeps history in order', async () => {
    const { user, room } = await newRoom();
    fake.enqueue(
      { kind: 'text', text: 'first answer' },
      { kind: 'text', text: 'second answer' },
      { kind: 'text', text: 'follow-up answer' },
    );
    const sent = await sendMessage(ctx.app, user, room.id, 'the question');
    expect(sent.statusCode).toBe(202);
    const remainingAfterSend = Number(sent.headers['x-ratelimit-remaining']);
    const { userMessage: prompt, assistantMessage: firstReply } = sent.json() as {
      userMessage: Message;
      assistantMessage: Message;
    };
    const first = await waitForReply(ctx.app, user, room.id, firstReply.id);
    expect(first.content).toBe('first answer');

    const regen = await ctx.app.inject({
      method: 'POST',
      url: `/chatroom/${room.id}/messages/${firstReply.id}/regenerate`,
      headers: user.headers,
    });
    expect(regen.statusCode, regen.body).toBe(202);
    expect(Number(regen.headers['x-ratelimit-remaining'])).toBe(remainingAfterSend - 1);
    const { assistantMessage: secondReply } = regen.json() as { assistantMessage: Message };
    expect(secondReply.id).not.toBe(firstReply.id);
    expect(secondReply.replyToId).toBe(prompt.id);
    const second = await waitForReply(ctx.app, user, room.id, secondReply.id);
    expect(second).toMatchObject({ status: 'completed', content: 'second answer' });
    // The earlier reply stays as it was.
    expect(await getMessage(user, room.id, firstReply.id)).toEqual(first);
    // The regenerated reply answered the prompt alone, not in the light of the first answer.
    const regenRequests = fake.requests.filter((r) => promptOf(r) === 'the question');
    expect(regenRequests).toHaveLength(2);
    expect(regenRequests[1]?.body?.contents).toHaveLength(1);

    const list = await ctx.app.inject({
      method: 'GET',
      url: `/chatroom/${room.id}/messages`,
      headers: user.headers,
    });
    expect(list.statusCode).toBe(200);
    const messages = [...(list.json().messages as Message[])].reverse();
    expect(messages.map((m) => [m.id, m.role, m.replyToId])).toEqual([
      [prompt.id, 'user', null],
      [firstReply.id, 'assistant', prompt.id],
      [secondReply.id, 'assistant', prompt.id],
    ]);
    for (let i = 1; i < messages.length; i++) {
      expect(Date.parse(messages[i]!.createdAt)).toBeGreaterThan(
        Date.parse(messages[i - 1]!.createdAt),
      );
    }

    const followUp = await send(user, room.id, 'and then?');
    await waitForReply(ctx.app, user, room.id, followUp.assistantMessage.id);
    const contents = requestFor('and then?')?.body?.contents?.map((c) => [
      c.role,
      c.parts?.map((p) => p.text).join(''),
    ]);
    // The conversation continues from the newest answer; turns alternate as Gemini expects.
    expect(contents).toEqual([
      ['user', 'the question'],
      ['model', 'second answer'],
      ['user', 'and then?'],
    ]);
  });
});

describe('slow readers', () => {
  /**
   * A reply that is streaming (its worker waits on a hanging upstream) and whose Redis stream
   * already holds `count` big deltas and `done`, written straight to Redis to keep this fast.
   */
  async function bigStreamingReply(prompt: string, count: number) {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'hang' });
    const { assistantMessage } = await send(user, room.id, prompt);
    await poll(
      () => getMessage(user, room.id, assistantMessage.id),
      (m) => m.status === 'streaming',
    );
    const pieces = Array.from(
      { length: count },
      (_, i) => `${String(i).padStart(6, '0')}${'z'.repeat(8000)}`,
    );
    const key = ctx.container.streams.key(assistantMessage.id);
    for (let i = 0; i < count; i += 500) {
      const pipeline = ctx.container.redis.pipeline();
      for (const text of pieces.slice(i, i + 500)) {
        pipeline.xadd(key, '*', 'e', 'delta', 'd', JSON.stringify({ text }));
      }
      await pipeline.exec();
    }
    await ctx.container.redis.xadd(key, '*', 'e', 'done', 'd', JSON.stringify({ status: 'x' }));
    const cleanup = async () => {
      await cancel(user, room.id, assistantMessage.id);
      await waitForReply(ctx.app, user, room.id, assistantMessage.id);
      await ctx.container.redis.del(key);
    };
    return { user, room, id: assistantMessage.id, pieces, cleanup };
  }

  /** Reads an SSE body with fetch's reader; returns the delta texts and whether `done` came. */
  async function readAll(body: ReadableStream<Uint8Array>) {
    const texts: string[] = [];
    const parser = createParser({
      onEvent: (message) => {
        if (message.event === 'delta') texts.push(JSON.parse(message.data).text);
        if (message.event === 'done') done = true;
      },
    });
    let done = false;
    const reader = body.getReader();
    const decoder = new TextDecoder();
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      parser.feed(decoder.decode(chunk.value, { stream: true }));
    }
    await reader.cancel();
    return { texts, done };
  }

  it('reads a big reply from Redis in bounded batches, only as fast as the client takes it', async () => {
    const count = 3000; // ~24 MB, several times what the sockets in between can hold
    const reply = await bigStreamingReply('a very long answer', count);
    const reads: number[] = [];
    const counts: Array<number | undefined> = [];
    const streams = ctx.container.streams;
    const original = streams.readMany.bind(streams);
    const spy = vi.spyOn(streams, 'readMany').mockImplementation(async (requests, options) => {
      const results = await original(requests, options);
      requests.forEach((request, i) => {
        if (request.messageId === reply.id) {
          reads.push(results[i]!.length);
          counts.push(options.count);
        }
      });
      return results;
    });
    const readSoFar = () => reads.reduce((a, b) => a + b, 0);
    try {
      const res = await fetch(streamUrl(reply.room.id, reply.id), {
        headers: { ...reply.user.headers, accept: 'text/event-stream' },
      });
      expect(res.status).toBe(200);
      // The client reads nothing: let the server go as far as it will.
      let previous = -1;
      await poll(
        async () => {
          await new Promise((resolve) => setTimeout(resolve, 250));
          const now = readSoFar();
          const settled = now > 0 && now === previous;
          previous = now;
          return settled;
        },
        (settled) => settled,
      );
      expect(readSoFar()).toBeLessThan(count / 2);
      expect(Math.max(...reads)).toBeLessThanOrEqual(200);
      for (const c of counts) expect(c).toBeLessThanOrEqual(200);

      // Once the client reads, it gets every delta, in order.
      const { texts, done } = await readAll(res.body!);
      expect(done).toBe(true);
      expect(texts).toHaveLength(count);
      expect(texts).toEqual(reply.pieces);
    } finally {
      spy.mockRestore();
      await reply.cleanup();
    }
  });

  it('lets go of a stalled client that disconnects while the server waits for it to drain', async () => {
    const reply = await bigStreamingReply('stalled then gone', 2000);
    // The hub subscribes to a reply's channel while a client of this process follows it.
    const followed = () => subscribers(ctx.container.streams.channel(reply.id));
    const reads: number[] = [];
    const streams = ctx.container.streams;
    const read = streams.readMany.bind(streams);
    const readSpy = vi.spyOn(streams, 'readMany').mockImplementation(async (requests, options) => {
      const results = await read(requests, options);
      requests.forEach((request, i) => {
        if (request.messageId === reply.id) reads.push(results[i]!.length);
      });
      return results;
    });
    try {
      // A raw socket that never reads: the kernel's receive buffer does not grow for a reader
      // that takes nothing, so the server's writes stall after a few MB whatever the machine's
      // buffer settings (fetch's reader could buffer the whole 16 MB reply on some).
      const url = new URL(streamUrl(reply.room.id, reply.id));
      const socket = connect(Number(url.port), url.hostname);
      await once(socket, 'connect');
      socket.pause();
      socket.write(
        `GET ${url.pathname} HTTP/1.1\r\nHost: ${url.host}\r\n` +
          `Authorization: ${reply.user.headers.authorization}\r\nAccept: text/event-stream\r\n\r\n`,
      );
      // The server fills the sockets and then waits for the client, which reads nothing.
      let previous = -1;
      await poll(
        async () => {
          await new Promise((resolve) => setTimeout(resolve, 200));
          const now = reads.length;
          const settled = now > 0 && now === previous;
          previous = now;
          return settled;
        },
        (settled) => settled,
      );
      // Stalled before the end of the reply, with its follower still in the hub.
      expect(reads.reduce((a, b) => a + b, 0)).toBeLessThan(2000);
      expect(await followed()).toBe(1);
      socket.destroy();
      await poll(followed, (n) => n === 0, 2000);
    } finally {
      readSpy.mockRestore();
      await reply.cleanup();
    }
  });
});

describe('GET /chatroom/:id/messages/:messageId/stream', () => {
  let owner: SignedInUser;
  let roomId: string;
  let messageId: string;
  beforeAll(async () => {
    const created = await newRoom();
    owner = created.user;
    roomId = created.room.id;
    fake.enqueue({ kind: 'text', text: 'private' });
    messageId = (await send(owner, roomId, 'mine')).assistantMessage.id;
    await waitForReply(ctx.app, owner, roomId, messageId);
  });

  itRejectsBadTokens(
    () => ({ app: ctx.app, config: ctx.config, user: owner }),
    [{ method: 'GET', url: () => `/chatroom/${roomId}/messages/${messageId}/stream` }],
  );

  it("answers 404 for another user's message", async () => {
    const { user: intruder, room: intruderRoom } = await newRoom();
    for (const url of [
      `/chatroom/${roomId}/messages/${messageId}/stream`,
      `/chatroom/${intruderRoom.id}/messages/${messageId}/stream`,
    ]) {
      const res = await ctx.app.inject({ method: 'GET', url, headers: intruder.headers });
      expect(res.statusCode, url).toBe(404);
      expect(res.json().error.code).toBe('NOT_FOUND');
    }
    const sse = await openSse(streamUrl(roomId, messageId), { headers: intruder.headers });
    expect(sse.status).toBe(404);
    expect(await sse.events).toEqual([]);
  });
});

describe('keep-alive', () => {
  it('sends a keep-alive comment every 15 s on an open stream, after a ready event with retry', async () => {
    const { user, room } = await newRoom();
    fake.enqueue({ kind: 'hang' });
    const { assistantMessage } = await send(user, room.id, 'keep me alive');
    // Only intervals are faked (the heartbeat timer), for as short a time as possible.
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    const controller = new AbortController();
    try {
      const res = await fetch(streamUrl(room.id, assistantMessage.id), {
        headers: { ...user.headers, accept: 'text/event-stream' },
        signal: controller.signal,
      });
      expect(res.status).toBe(200);
      const reader = res.body!.getReader();
      const decoder = new TextDecoder();
      let text = '';
      const readUntil = async (needle: string) => {
        let timer: NodeJS.Timeout | undefined;
        const timeout = new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`no ${JSON.stringify(needle)} in ${text}`)),
            2000,
          );
        });
        try {
          while (!text.includes(needle)) {
            const chunk = await Promise.race([reader.read(), timeout]);
            if (chunk.done) throw new Error(`stream ended before ${JSON.stringify(needle)}`);
            text += decoder.decode(chunk.value, { stream: true });
          }
        } finally {
          clearTimeout(timer);
        }
      };
      await readUntil('event: ready');
      await readUntil('\n\n');
      expect(text).toMatch(/retry: \d+/);
      expect(text).not.toMatch(/^:/m);
      vi.advanceTimersByTime(15_000);
      await readUntil('\n: ');
    } finally {
      vi.useRealTimers();
      controller.abort();
      await cancel(user, room.id, assistantMessage.id);
      await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    }
  });
});
