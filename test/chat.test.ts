import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { expectError } from './helpers/assertions.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeGemini, type RecordedRequest, startFakeGemini } from './helpers/fake-gemini.js';
import { itRejectsBadTokens, type SignedInUser, signIn } from './helpers/users.js';

const DEFAULT_REPLY = 'Hello from fake Gemini';

let fake: FakeGemini;
let ctx: TestContext;

beforeAll(async () => {
  fake = await startFakeGemini({ apiKey: 'test-key' });
  ctx = await createTestContext({
    worker: true,
    env: {
      LLM_PROVIDER: 'gemini',
      GEMINI_API_KEY: 'test-key',
      GEMINI_BASE_URL: fake.url,
      BASIC_DAILY_LIMIT: '1000',
    },
  });
});

afterAll(async () => {
  await ctx?.close();
  await fake?.close();
});

beforeEach(() => {
  fake.reset();
  fake.setDefault({ kind: 'text', text: DEFAULT_REPLY });
});

// ---------------------------------------------------------------------------------------------
// helpers

/** The generation requests the fake received (the SDK only streams). */
function generations(): RecordedRequest[] {
  return fake.requests.filter((r) => r.action === 'streamGenerateContent');
}

/** A request's `contents` as `{ role, text }`. */
function turns(request: RecordedRequest) {
  return (request.body?.contents ?? []).map((content) => ({
    role: content.role,
    text: (content.parts ?? []).map((part) => part.text ?? '').join(''),
  }));
}

function requestFor(prompt: string): RecordedRequest {
  const found = generations().filter((r) => turns(r).at(-1)?.text === prompt);
  expect(found, `requests whose prompt is ${JSON.stringify(prompt)}`).toHaveLength(1);
  return found[0]!;
}

async function eventually(probe: () => Promise<boolean> | boolean, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await probe()) return;
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

async function query<T = Record<string, unknown>>(text: string, params: unknown[] = []) {
  return (await ctx.container.database.pool.query(text, params)).rows as T[];
}

/** Sends a prompt and expects it accepted. */
async function send(
  user: SignedInUser,
  roomId: string,
  content: string,
  headers: Record<string, string> = {},
) {
  const res = await sendMessage(ctx.app, user, roomId, content, headers);
  expect(res.statusCode, res.body).toBe(202);
  const body = res.json() as {
    userMessage: { id: string; content: string; role: string };
    assistantMessage: { id: string; status: string; role: string };
  };
  return { res, ...body };
}

async function ask(user: SignedInUser, roomId: string, content: string) {
  const { assistantMessage } = await send(user, roomId, content);
  return waitForReply(ctx.app, user, roomId, assistantMessage.id);
}

/** Waits until BullMQ is done with a reply's job, so no further attempt can reach the fake. */
async function jobSettled(messageId: string) {
  await eventually(async () => {
    const job = await ctx.container.replyQueue.getJob(messageId);
    const state = job ? await job.getState() : 'missing';
    return state === 'completed' || state === 'failed' || state === 'missing';
  });
}

async function remaining(user: SignedInUser) {
  const usage = await ctx.container.quota.current(user.id, ctx.config.basicDailyLimit);
  return usage.remaining;
}

function get(user: SignedInUser, url: string) {
  return ctx.app.inject({ method: 'GET', url, headers: user.headers });
}

async function listRooms(user: SignedInUser) {
  const res = await get(user, '/chatroom');
  expect(res.statusCode, res.body).toBe(200);
  return {
    cache: res.headers['x-cache'],
    rooms: (res.json() as { chatrooms: Array<{ id: string; name: string }> }).chatrooms,
  };
}

// ---------------------------------------------------------------------------------------------

describe('a conversation answered by Gemini', () => {
  it('stores the fake Gemini reply with its model, usage and finish reason; no system instruction when the room has none', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Plain room');
    fake.enqueue({
      kind: 'text',
      text: 'Paris is the capital of France.',
      chunks: 3,
      usage: { promptTokenCount: 7, candidatesTokenCount: 8, totalTokenCount: 15 },
      modelVersion: 'gemini-2.5-flash-001',
    });

    const reply = await ask(user, room.id, 'What is the capital of France?');

    expect(reply).toMatchObject({
      role: 'assistant',
      status: 'completed',
      content: 'Paris is the capital of France.',
      model: 'gemini-2.5-flash-001',
      usage: { promptTokens: 7, completionTokens: 8, totalTokens: 15 },
      finishReason: 'STOP',
      error: null,
    });
    expect(reply.completedAt).toEqual(expect.any(String));
    const [request] = generations();
    expect(generations()).toHaveLength(1);
    expect(turns(request!)).toEqual([{ role: 'user', text: 'What is the capital of France?' }]);
    expect(request!.body?.systemInstruction).toBeUndefined();
  });

  it('sends every earlier turn in order as user/model contents, with the room’s system instruction', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Pirate room', 'Answer like a pirate.');
    fake.enqueue(
      { kind: 'text', text: 'Arr, one.' },
      { kind: 'text', text: 'Arr, two.' },
      { kind: 'text', text: 'Arr, three.' },
    );

    expect((await ask(user, room.id, 'First question')).content).toBe('Arr, one.');
    expect((await ask(user, room.id, 'Second question')).content).toBe('Arr, two.');
    expect((await ask(user, room.id, 'Third question')).content).toBe('Arr, three.');

    const requests = generations();
    expect(requests).toHaveLength(3);
    expect(turns(requests[0]!)).toEqual([{ role: 'user', text: 'First question' }]);
    expect(turns(requests[2]!)).toEqual([
      { role: 'user', text: 'First question' },
      { role: 'model', text: 'Arr, one.' },
      { role: 'user', text: 'Second question' },
      { role: 'model', text: 'Arr, two.' },
      { role: 'user', text: 'Third question' },
    ]);
    for (const request of requests) {
      const instruction = request.body?.systemInstruction;
      expect(instruction?.parts?.map((p) => p.text).join('')).toBe('Answer like a pirate.');
    }
  });

  it('answers two prompts sent back to back in one room, the second with the first in its history', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const first = await send(user, room.id, 'Back to back one');
    const second = await send(user, room.id, 'Back to back two');

    const replies = await Promise.all([
      waitForReply(ctx.app, user, room.id, first.assistantMessage.id),
      waitForReply(ctx.app, user, room.id, second.assistantMessage.id),
    ]);
    expect(replies.map((r) => r.status)).toEqual(['completed', 'completed']);
    expect(replies.map((r) => r.content)).toEqual([DEFAULT_REPLY, DEFAULT_REPLY]);

    expect(generations()).toHaveLength(2);
    const secondTurns = turns(requestFor('Back to back two'));
    expect(secondTurns[0]).toEqual({ role: 'user', text: 'Back to back one' });
    expect(secondTurns.at(-1)).toEqual({ role: 'user', text: 'Back to back two' });
  });
});

describe('when Gemini fails', () => {
  it('waits for the 429 retry hint, then stores exactly one reply', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue(
      { kind: 'rateLimit', retryAfterSeconds: 2 },
      { kind: 'text', text: 'Answer after the wait' },
    );

    const { userMessage, assistantMessage } = await send(user, room.id, 'Rate limited prompt');
    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id, 15_000);
    await jobSettled(assistantMessage.id);

    expect(reply.status).toBe('completed');
    expect(reply.content).toBe('Answer after the wait');
    const [limited, retried] = generations();
    expect(generations()).toHaveLength(2);
    expect(retried!.receivedAt - limited!.receivedAt).toBeGreaterThanOrEqual(2000);
    const assistants = await query('select id from messages where reply_to_id = $1', [
      userMessage.id,
    ]);
    expect(assistants).toHaveLength(1);
  });

  it('marks the reply failed with LLM_UNAVAILABLE after five 500s and gives the prompt back', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue(...Array.from({ length: 5 }, () => ({ kind: 'serverError' as const })));

    const accepted = await send(user, room.id, 'Doomed prompt');
    const remainingAfterSend = Number(accepted.res.headers['x-ratelimit-remaining']);
    expect(remainingAfterSend).toBe(ctx.config.basicDailyLimit - 1);
    const reply = await waitForReply(ctx.app, user, room.id, accepted.assistantMessage.id, 15_000);
    await jobSettled(accepted.assistantMessage.id);

    expect(reply.status).toBe('failed');
    expect(reply.error).toEqual({ code: 'LLM_UNAVAILABLE', message: expect.any(String) });
    expect(reply.completedAt).toEqual(expect.any(String));
    expect(generations()).toHaveLength(5);
    // The failed prompt no longer counts: the counter is back where it was before the send.
    expect(await remaining(user)).toBe(ctx.config.basicDailyLimit);
    const next = await send(user, room.id, 'Try again');
    expect(Number(next.res.headers['x-ratelimit-remaining'])).toBe(remainingAfterSend);
    await waitForReply(ctx.app, user, room.id, next.assistantMessage.id);
  });

  it('retries a dropped stream and stores only the new attempt’s text', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue(
      { kind: 'dropMidStream', text: 'PARTIAL-ONE PARTIAL-TWO PARTIAL-THREE', afterChunks: 1 },
      { kind: 'text', text: 'A clean second attempt' },
    );

    const reply = await ask(user, room.id, 'Flaky connection');

    expect(reply.status).toBe('completed');
    expect(reply.content).toBe('A clean second attempt');
    expect(generations()).toHaveLength(2);
  });

  it('keeps the partial text of a reply whose last attempt failed', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue(...Array.from({ length: 4 }, () => ({ kind: 'serverError' as const })), {
      kind: 'dropMidStream',
      text: 'Kept words then lost words',
      afterChunks: 1,
    });

    const reply = await ask(user, room.id, 'Fails at the end');

    expect(reply.status).toBe('failed');
    expect(reply.error.code).toBe('LLM_UNAVAILABLE');
    expect(reply.content.length).toBeGreaterThan(0);
    expect('Kept words then lost words'.startsWith(reply.content)).toBe(true);
    expect(reply.content).not.toBe('Kept words then lost words');
  });

  it('marks a reply stopped by the safety filter blocked and asks Gemini only once', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue({ kind: 'responseBlocked', reason: 'SAFETY', partialText: 'Some text' });

    const { assistantMessage } = await send(user, room.id, 'Something unsafe');
    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    await jobSettled(assistantMessage.id);

    expect(reply.status).toBe('blocked');
    expect(reply.finishReason).toBe('SAFETY');
    expect(reply.error.code).toBe('BLOCKED');
    expect(generations()).toHaveLength(1);
  });

  it('marks a blocked prompt blocked and asks Gemini only once', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue({ kind: 'promptBlocked', reason: 'PROHIBITED_CONTENT' });

    const { assistantMessage } = await send(user, room.id, 'Something forbidden');
    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    await jobSettled(assistantMessage.id);

    expect(reply.status).toBe('blocked');
    expect(reply.finishReason).toBe('PROHIBITED_CONTENT');
    expect(generations()).toHaveLength(1);
  });

  it('fails a reply Gemini rejects with 400 without retrying it', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    fake.enqueue({ kind: 'clientError', status: 400 });

    const { assistantMessage } = await send(user, room.id, 'Rejected prompt');
    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    await jobSettled(assistantMessage.id);

    expect(reply.status).toBe('failed');
    expect(reply.error).toEqual({ code: 'LLM_REJECTED', message: expect.any(String) });
    expect(generations()).toHaveLength(1);
  });
});

describe('Idempotency-Key', () => {
  it('returns the first answer to a retried request: one user message, one reply', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const headers = { 'idempotency-key': 'retry-me-1' };

    const first = await send(user, room.id, 'Only once please', headers);
    const second = await send(user, room.id, 'Only once please', headers);

    expect(first.res.headers['idempotent-replayed']).toBeUndefined();
    expect(second.res.headers['idempotent-replayed']).toBe('true');
    expect(second.userMessage.id).toBe(first.userMessage.id);
    expect(second.assistantMessage.id).toBe(first.assistantMessage.id);
    expect(second.res.headers.location).toBe(first.res.headers.location);
    await waitForReply(ctx.app, user, room.id, first.assistantMessage.id);
    await jobSettled(first.assistantMessage.id);

    const rows = await query<{ role: string }>('select role from messages where chatroom_id = $1', [
      room.id,
    ]);
    expect(rows.map((r) => r.role).sort()).toEqual(['assistant', 'user']);
    expect(generations()).toHaveLength(1);
    expect(await remaining(user)).toBe(ctx.config.basicDailyLimit - 1);
  });

  it('returns one result to concurrent requests with the same key', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const headers = { 'idempotency-key': 'racing-key' };

    const results = await Promise.all(
      Array.from({ length: 5 }, () => send(user, room.id, 'Racing prompt', headers)),
    );

    expect(new Set(results.map((r) => r.userMessage.id)).size).toBe(1);
    expect(new Set(results.map((r) => r.assistantMessage.id)).size).toBe(1);
    await waitForReply(ctx.app, user, room.id, results[0]!.assistantMessage.id);
    const rows = await query('select id from messages where chatroom_id = $1', [room.id]);
    expect(rows).toHaveLength(2);
    expect(await remaining(user)).toBe(ctx.config.basicDailyLimit - 1);
  });

  it('answers 409 when the key is reused with different content, and stores nothing', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const headers = { 'idempotency-key': 'reused-key' };
    const first = await send(user, room.id, 'Original content', headers);

    const res = await sendMessage(ctx.app, user, room.id, 'Different content', headers);

    expect(res.statusCode, res.body).toBe(409);
    expect(res.json().error.code).toBe('CONFLICT');
    await waitForReply(ctx.app, user, room.id, first.assistantMessage.id);
    const rows = await query('select id from messages where chatroom_id = $1', [room.id]);
    expect(rows).toHaveLength(2);
    expect(await remaining(user)).toBe(ctx.config.basicDailyLimit - 1);
  });
});

describe('the chatroom list', () => {
  it('answers MISS then HIT, and MISS again after a room is created, renamed or deleted', async () => {
    const user = await signIn(ctx.app);
    const a = await createRoom(ctx.app, user, 'Alpha');

    expect(await listRooms(user)).toMatchObject({ cache: 'MISS', rooms: [{ name: 'Alpha' }] });
    expect(await listRooms(user)).toMatchObject({ cache: 'HIT', rooms: [{ name: 'Alpha' }] });

    const b = await createRoom(ctx.app, user, 'Beta');
    expect(await listRooms(user)).toMatchObject({
      cache: 'MISS',
      rooms: [{ id: b.id }, { id: a.id }],
    });
    expect((await listRooms(user)).cache).toBe('HIT');

    const renamed = await ctx.app.inject({
      method: 'PATCH',
      url: `/chatroom/${a.id}`,
      headers: user.headers,
      payload: { name: 'Alpha renamed' },
    });
    expect(renamed.statusCode, renamed.body).toBe(200);
    expect(renamed.json().name).toBe('Alpha renamed');
    const afterRename = await listRooms(user);
    expect(afterRename.cache).toBe('MISS');
    expect(afterRename.rooms.find((r) => r.id === a.id)?.name).toBe('Alpha renamed');
    expect((await listRooms(user)).cache).toBe('HIT');

    const deleted = await ctx.app.inject({
      method: 'DELETE',
      url: `/chatroom/${b.id}`,
      headers: user.headers,
    });
    expect(deleted.statusCode, deleted.body).toBe(204);
    expect(await listRooms(user)).toMatchObject({ cache: 'MISS', rooms: [{ id: a.id }] });
    expect((await listRooms(user)).cache).toBe('HIT');
  });

  it('keeps each user’s list to their own rooms', async () => {
    const alice = await signIn(ctx.app);
    const bob = await signIn(ctx.app);
    await createRoom(ctx.app, alice, 'Alice room');
    await createRoom(ctx.app, bob, 'Bob room');
    await listRooms(alice);
    expect((await listRooms(alice)).rooms.map((r) => r.name)).toEqual(['Alice room']);
    expect((await listRooms(bob)).rooms.map((r) => r.name)).toEqual(['Bob room']);
  });

  it('loads a cold list once for 20 concurrent misses, and all of them answer the same list', async () => {
    const user = await signIn(ctx.app);
    for (const name of ['One', 'Two', 'Three']) await createRoom(ctx.app, user, name);
    const load = vi.spyOn(ctx.container.chatRepository, 'listRooms');
    try {
      const responses = await Promise.all(Array.from({ length: 20 }, () => get(user, '/chatroom')));
      for (const res of responses) expect(res.statusCode, res.body).toBe(200);
      const bodies = responses.map((res) => res.json());
      for (const body of bodies) expect(body).toEqual(bodies[0]);
      expect(bodies[0].chatrooms.map((r: { name: string }) => r.name)).toEqual([
        'Three',
        'Two',
        'One',
      ]);
      expect(load.mock.calls.filter(([userId]) => userId === user.id)).toHaveLength(1);
      expect(responses.filter((res) => res.headers['x-cache'] === 'MISS')).toHaveLength(1);
    } finally {
      load.mockRestore();
    }
  });

  it('lists rooms most recently active first', async () => {
    const user = await signIn(ctx.app);
    const first = await createRoom(ctx.app, user, 'First');
    const second = await createRoom(ctx.app, user, 'Second');
    const third = await createRoom(ctx.app, user, 'Third');
    expect((await listRooms(user)).rooms.map((r) => r.id)).toEqual([third.id, second.id, first.id]);

    await ask(user, first.id, 'Wake the first room');

    const after = await listRooms(user);
    expect(after.cache).toBe('MISS');
    expect(after.rooms.map((r) => r.id)).toEqual([first.id, third.id, second.id]);
  });
});

describe('reading a chatroom', () => {
  it('returns the newest page of messages and a cursor that walks through /messages?before=', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Paged');
    fake.enqueue(
      { kind: 'text', text: 'Reply 1' },
      { kind: 'text', text: 'Reply 2' },
      { kind: 'text', text: 'Reply 3' },
    );
    for (const n of [1, 2, 3]) await ask(user, room.id, `Prompt ${n}`);
    const expected = ['Reply 3', 'Prompt 3', 'Reply 2', 'Prompt 2', 'Reply 1', 'Prompt 1'];

    const whole = await get(user, `/chatroom/${room.id}`);
    expect(whole.statusCode, whole.body).toBe(200);
    expect(whole.json().chatroom).toMatchObject({ id: room.id, name: 'Paged' });
    expect(whole.json().messages.map((m: { content: string }) => m.content)).toEqual(expected);
    expect(whole.json().nextCursor).toBeNull();

    const firstPage = await get(user, `/chatroom/${room.id}?limit=4`);
    expect(firstPage.statusCode, firstPage.body).toBe(200);
    const page1 = firstPage.json();
    expect(page1.messages.map((m: { content: string }) => m.content)).toEqual(expected.slice(0, 4));
    expect(page1.messages.map((m: { role: string }) => m.role)).toEqual([
      'assistant',
      'user',
      'assistant',
      'user',
    ]);
    expect(page1.nextCursor).toEqual(expect.any(String));

    const secondPage = await get(
      user,
      `/chatroom/${room.id}/messages?limit=4&before=${encodeURIComponent(page1.nextCursor)}`,
    );
    expect(secondPage.statusCode, secondPage.body).toBe(200);
    const page2 = secondPage.json();
    expect(page2.messages.map((m: { content: string }) => m.content)).toEqual(expected.slice(4));
    expect(page2.nextCursor).toBeNull();

    const byTwo: string[] = [];
    let cursor: string | null = null;
    do {
      const url: string = `/chatroom/${room.id}/messages?limit=2${cursor ? `&before=${encodeURIComponent(cursor)}` : ''}`;
      const res = await get(user, url);
      expect(res.statusCode, res.body).toBe(200);
      byTwo.push(...res.json().messages.map((m: { content: string }) => m.content));
      cursor = res.json().nextCursor;
    } while (cursor);
    expect(byTwo).toEqual(expected);

    const bad = await get(user, `/chatroom/${room.id}/messages?before=not-a-cursor`);
    expect(bad.statusCode).toBe(400);
    expect(bad.json().error.code).toBe('VALIDATION_FAILED');
  });

  it('serves one message for polling', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user);
    const { userMessage, assistantMessage } = await send(user, room.id, 'Poll me');
    expect(assistantMessage.status).toBe('queued');

    const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
    expect(reply).toMatchObject({
      id: assistantMessage.id,
      chatroomId: room.id,
      role: 'assistant',
      replyToId: userMessage.id,
    });
    const prompt = await get(user, `/chatroom/${room.id}/messages/${userMessage.id}`);
    expect(prompt.json()).toMatchObject({ role: 'user', content: 'Poll me', status: 'completed' });
  });
});

describe('under load', () => {
  it('accepts at most 32 prompts at once in one process, and every one of a burst of 100', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Burst');
    const chat = ctx.container.chatRepository;
    const original = chat.findRoom.bind(chat);
    let inFlight = 0;
    let most = 0;
    // Every accepted prompt checks its room first: counting those checks counts the accepts
    // under way (the check is the first step after a prompt is let in).
    const spy = vi.spyOn(chat, 'findRoom').mockImplementation(async (...args) => {
      inFlight++;
      most = Math.max(most, inFlight);
      try {
        return await original(...args);
      } finally {
        inFlight--;
      }
    });
    try {
      const responses = await Promise.all(
        Array.from({ length: 100 }, (_, i) => sendMessage(ctx.app, user, room.id, `burst ${i}`)),
      );
      for (const res of responses) expect(res.statusCode, res.body).toBe(202);
      expect(spy).toHaveBeenCalledTimes(100);
      expect(most).toBeGreaterThan(1);
      expect(most).toBeLessThanOrEqual(32);
    } finally {
      spy.mockRestore();
      // The replies are generated after the test; the next tests count the model's requests.
      await eventually(async () => {
        const [row] = await query<{ n: number }>(
          `select count(*)::int as n from messages
           where chatroom_id = $1 and role = 'assistant' and status in ('queued', 'streaming')`,
          [room.id],
        );
        return row!.n === 0;
      }, 30_000);
    }
  });

  it('answers 503 UNAVAILABLE with Retry-After once 2,000 prompts wait their turn in one process', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Overload');
    const chat = ctx.container.chatRepository;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    // The room checks hang: 32 prompts are being accepted, the rest wait for a turn.
    const spy = vi.spyOn(chat, 'findRoom').mockImplementation(async () => {
      await gate;
      return undefined;
    });
    try {
      const waiting = Array.from({ length: 32 + 2000 }, (_, i) =>
        sendMessage(ctx.app, user, room.id, `waiting ${i}`),
      );
      let refused: Awaited<ReturnType<typeof sendMessage>> | undefined;
      for (let probe = 0; probe < 50 && !refused; probe++) {
        const res = await Promise.race([
          sendMessage(ctx.app, user, room.id, `probe ${probe}`),
          new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 100)),
        ]);
        if (res?.statusCode === 503) refused = res;
      }
      expect(spy.mock.calls.length).toBe(32);
      expect(refused, 'no probe was refused').toBeDefined();
      expectError(refused!, 503, 'UNAVAILABLE');
      expect(refused!.headers['retry-after']).toBe('1');
      release();
      // The ones that waited are served in turn (here: the room is gone, 404).
      for (const res of await Promise.all(waiting)) expect(res.statusCode).toBe(404);
    } finally {
      release();
      spy.mockRestore();
    }
  });

  it('completes 200 prompts sent at once across 20 rooms, each with its own room’s history', async () => {
    const user = await signIn(ctx.app);
    const rooms = await Promise.all(
      Array.from({ length: 20 }, (_, r) => createRoom(ctx.app, user, `Load room ${r}`)),
    );
    const prompts = rooms.flatMap((room, r) =>
      Array.from({ length: 10 }, (_, m) => ({ room, content: `room-${r} msg-${m}` })),
    );

    // A well-behaved client: on a 503 (the API sheds load when its connection pool stays
    // saturated, which a starved CI machine can cause) it waits Retry-After and retries with the
    // same Idempotency-Key, which can never store a prompt twice.
    const sendOnce = async (roomId: string, content: string) => {
      const headers = { 'idempotency-key': `load ${content}` };
      for (let attempt = 1; ; attempt++) {
        const res = await sendMessage(ctx.app, user, roomId, content, headers);
        if (res.statusCode !== 503 || attempt === 5) return res;
        await new Promise((resolve) =>
          setTimeout(resolve, Number(res.headers['retry-after'] ?? 1) * 1000),
        );
      }
    };
    const responses = await Promise.all(
      prompts.map(({ room, content }) => sendOnce(room.id, content)),
    );
    const accepted = responses.filter((res) => res.statusCode === 202).length;

    const settled = async () => {
      const [row] = await query<{ n: number }>(
        `select count(*)::int as n from messages
         where user_id = $1 and role = 'assistant' and status not in ('queued', 'streaming')`,
        [user.id],
      );
      return row!.n;
    };
    // Let whatever was accepted finish before judging, so a failure leaves nothing running.
    await eventually(async () => (await settled()) === accepted, 45_000);
    for (const res of responses) expect(res.statusCode, res.body).toBe(202);
    const users = await query(`select id from messages where user_id = $1 and role = 'user'`, [
      user.id,
    ]);
    expect(users).toHaveLength(200);
    const replies = await query<{ status: string; content: string; chatroom_id: string }>(
      `select a.status, a.content, a.chatroom_id, p.chatroom_id as prompt_room
       from messages a join messages p on p.id = a.reply_to_id
       where a.user_id = $1 and a.role = 'assistant' and a.chatroom_id = p.chatroom_id`,
      [user.id],
    );
    expect(replies).toHaveLength(200);
    expect(replies.filter((r) => r.status !== 'completed')).toEqual([]);

    const requests = generations();
    expect(requests).toHaveLength(200);
    const roomOf = (text: string) => /^room-(\d+) msg-\d+$/.exec(text)?.[1];
    for (const request of requests) {
      const contents = turns(request);
      const last = contents.at(-1)!;
      expect(last.role).toBe('user');
      const own = roomOf(last.text);
      expect(own, last.text).toBeDefined();
      for (const turn of contents) {
        if (turn.role === 'user') expect(roomOf(turn.text), JSON.stringify(contents)).toBe(own);
        else expect(turn).toEqual({ role: 'model', text: DEFAULT_REPLY });
      }
    }
    expect(new Set(requests.map((r) => turns(r).at(-1)!.text))).toEqual(
      new Set(prompts.map((p) => p.content)),
    );
  }, 60_000);
});

describe('deleting a chatroom', () => {
  it('answers 204 for a room with a reply in flight, removes it and its messages, and closes the Gemini connection', async () => {
    const user = await signIn(ctx.app);
    const room = await createRoom(ctx.app, user, 'Doomed');
    fake.enqueue({ kind: 'text', text: 'word '.repeat(60), chunks: 60, chunkDelayMs: 100 });
    const { assistantMessage } = await send(user, room.id, 'Tell me a long story');
    await eventually(
      async () => (await ctx.container.streams.read(assistantMessage.id, '0')).length > 0,
    );

    const res = await ctx.app.inject({
      method: 'DELETE',
      url: `/chatroom/${room.id}`,
      headers: user.headers,
    });

    expect(res.statusCode, res.body).toBe(204);
    expect(res.body).toBe('');
    const request = requestFor('Tell me a long story');
    await fake.waitFor(() => request.closedAt !== undefined, 10_000);
    expect(request.aborted).toBe(true);
    expect(request.finishedAt).toBeUndefined();
    expect((await get(user, `/chatroom/${room.id}`)).statusCode).toBe(404);
    expect(
      (await get(user, `/chatroom/${room.id}/messages/${assistantMessage.id}`)).statusCode,
    ).toBe(404);
    expect(await query('select id from messages where chatroom_id = $1', [room.id])).toEqual([]);
    expect(await query('select id from chatrooms where id = $1', [room.id])).toEqual([]);
    await jobSettled(assistantMessage.id);
    expect(generations()).toHaveLength(1);
  });
});

describe('access to chat routes', () => {
  let owner: SignedInUser;
  let intruder: SignedInUser;
  let room: { id: string; name: string };
  let prompt: { id: string };
  let reply: { id: string };

  beforeAll(async () => {
    owner = await signIn(ctx.app);
    intruder = await signIn(ctx.app);
    room = await createRoom(ctx.app, owner, 'Private room');
    const accepted = await sendMessage(ctx.app, owner, room.id, 'Private prompt');
    expect(accepted.statusCode, accepted.body).toBe(202);
    prompt = accepted.json().userMessage;
    reply = accepted.json().assistantMessage;
    await waitForReply(ctx.app, owner, room.id, reply.id);
  });

  itRejectsBadTokens(
    () => ({ app: ctx.app, config: ctx.config, user: owner }),
    [
      { method: 'POST', url: '/chatroom', payload: { name: 'Nope' } },
      { method: 'GET', url: '/chatroom' },
      { method: 'GET', url: () => `/chatroom/${room.id}` },
      { method: 'PATCH', url: () => `/chatroom/${room.id}`, payload: { name: 'Nope' } },
      { method: 'DELETE', url: () => `/chatroom/${room.id}` },
      { method: 'GET', url: () => `/chatroom/${room.id}/messages` },
      { method: 'GET', url: () => `/chatroom/${room.id}/messages/${reply.id}` },
      { method: 'POST', url: () => `/chatroom/${room.id}/message`, payload: { content: 'Nope' } },
      { method: 'POST', url: () => `/chatroom/${room.id}/messages/${reply.id}/cancel` },
      { method: 'POST', url: () => `/chatroom/${room.id}/messages/${reply.id}/regenerate` },
    ],
  );

  it('answers 404 to another user for every route on the room and its messages, and changes nothing', async () => {
    const snapshot = async () => ({
      room: await query('select * from chatrooms where id = $1', [room.id]),
      messages: await query('select * from messages where chatroom_id = $1 order by id', [room.id]),
      ownerRemaining: await remaining(owner),
      intruderRemaining: await remaining(intruder),
    });
    const before = await snapshot();
    const requestsBefore = generations().length;
    const intruderRoom = await createRoom(ctx.app, intruder, 'Intruder room');

    const attempts: Array<{
      method: 'GET' | 'POST' | 'PATCH' | 'DELETE';
      url: string;
      payload?: object;
    }> = [
      { method: 'GET', url: `/chatroom/${room.id}` },
      { method: 'PATCH', url: `/chatroom/${room.id}`, payload: { name: 'Hijacked' } },
      { method: 'DELETE', url: `/chatroom/${room.id}` },
      { method: 'GET', url: `/chatroom/${room.id}/messages` },
      { method: 'GET', url: `/chatroom/${room.id}/messages/${prompt.id}` },
      { method: 'GET', url: `/chatroom/${room.id}/messages/${reply.id}` },
      { method: 'POST', url: `/chatroom/${room.id}/message`, payload: { content: 'Injected' } },
      { method: 'POST', url: `/chatroom/${room.id}/messages/${reply.id}/cancel` },
      { method: 'POST', url: `/chatroom/${room.id}/messages/${reply.id}/regenerate` },
      { method: 'POST', url: `/chatroom/${room.id}/messages/${prompt.id}/regenerate` },
      // The intruder's own room with the owner's message ids.
      { method: 'GET', url: `/chatroom/${intruderRoom.id}/messages/${reply.id}` },
      { method: 'POST', url: `/chatroom/${intruderRoom.id}/messages/${reply.id}/cancel` },
      { method: 'POST', url: `/chatroom/${intruderRoom.id}/messages/${prompt.id}/regenerate` },
    ];
    for (const attempt of attempts) {
      const res = await ctx.app.inject({ ...attempt, headers: intruder.headers });
      const label = `${attempt.method} ${attempt.url}`;
      expect(res.statusCode, `${label}: ${res.body}`).toBe(404);
      expect(res.json().error.code, label).toBe('NOT_FOUND');
    }

    expect(await snapshot()).toEqual(before);
    expect(before.room).toHaveLength(1);
    expect(before.messages).toHaveLength(2);
    expect((await listRooms(intruder)).rooms.map((r) => r.id)).toEqual([intruderRoom.id]);
    expect(generations()).toHaveLength(requestsBefore);
  });

  it('does not let another user cancel a reply in flight', async () => {
    fake.enqueue({ kind: 'text', text: 'slow and steady', chunks: 5, chunkDelayMs: 100 });
    const { assistantMessage } = await send(owner, room.id, 'Slow one');
    const res = await ctx.app.inject({
      method: 'POST',
      url: `/chatroom/${room.id}/messages/${assistantMessage.id}/cancel`,
      headers: intruder.headers,
    });
    expect(res.statusCode).toBe(404);
    const done = await waitForReply(ctx.app, owner, room.id, assistantMessage.id);
    expect(done).toMatchObject({ status: 'completed', content: 'slow and steady' });
  });
});

describe('validation', () => {
  let user: SignedInUser;
  let room: { id: string };

  beforeAll(async () => {
    user = await signIn(ctx.app);
    room = await createRoom(ctx.app, user, 'Validation');
  });

  async function expectInvalid(
    method: 'GET' | 'POST' | 'PATCH' | 'DELETE',
    url: string,
    payload?: object,
  ) {
    const res = await ctx.app.inject({
      method,
      url,
      headers: user.headers,
      ...(payload ? { payload } : {}),
    });
    expect(res.statusCode, `${method} ${url}: ${res.body}`).toBe(400);
    expect(res.json().error.code).toBe('VALIDATION_FAILED');
  }

  it('refuses empty, blank, missing and over-long message content, and stores nothing', async () => {
    const url = `/chatroom/${room.id}/message`;
    await expectInvalid('POST', url, { content: '' });
    await expectInvalid('POST', url, { content: '   \n\t ' });
    await expectInvalid('POST', url, {});
    await expectInvalid('POST', url, { content: 'x'.repeat(32_001) });
    expect(await query('select id from messages where chatroom_id = $1', [room.id])).toEqual([]);
    expect(await remaining(user)).toBe(ctx.config.basicDailyLimit);
  });

  it('accepts content of exactly 32,000 characters', async () => {
    const content = 'y'.repeat(32_000);
    const { assistantMessage, userMessage } = await send(user, room.id, content);
    expect(userMessage.content).toBe(content);
    await waitForReply(ctx.app, user, room.id, assistantMessage.id);
  });

  it('refuses room names that are blank or over 100 characters, and trims them', async () => {
    await expectInvalid('POST', '/chatroom', { name: '' });
    await expectInvalid('POST', '/chatroom', { name: '    ' });
    await expectInvalid('POST', '/chatroom', { name: 'n'.repeat(101) });
    await expectInvalid('POST', '/chatroom', {});
    await expectInvalid('PATCH', `/chatroom/${room.id}`, { name: 'n'.repeat(101) });
    await expectInvalid('PATCH', `/chatroom/${room.id}`, { name: ' ' });

    const longest = await createRoom(ctx.app, user, 'n'.repeat(100));
    expect(longest.name).toHaveLength(100);
    const trimmed = await createRoom(ctx.app, user, '  Padded name  ');
    expect(trimmed.name).toBe('Padded name');
  });

  it('refuses ids that are not UUIDs', async () => {
    const id = room.id;
    const messageId = '0190a6f0-0000-7000-8000-000000000000';
    await expectInvalid('GET', '/chatroom/not-a-uuid');
    await expectInvalid('PATCH', '/chatroom/not-a-uuid', { name: 'x' });
    await expectInvalid('DELETE', '/chatroom/not-a-uuid');
    await expectInvalid('GET', '/chatroom/not-a-uuid/messages');
    await expectInvalid('POST', '/chatroom/not-a-uuid/message', { content: 'hi' });
    await expectInvalid('GET', `/chatroom/not-a-uuid/messages/${messageId}`);
    await expectInvalid('GET', `/chatroom/${id}/messages/not-a-uuid`);
    await expectInvalid('POST', `/chatroom/${id}/messages/not-a-uuid/cancel`);
    await expectInvalid('POST', `/chatroom/${id}/messages/not-a-uuid/regenerate`);
  });
});
