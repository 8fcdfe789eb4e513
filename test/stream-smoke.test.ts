import { afterAll, beforeAll, expect, it } from 'vitest';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeGemini, startFakeGemini } from './helpers/fake-gemini.js';
import { openSse } from './helpers/sse.js';
import { signIn } from './helpers/users.js';

let ctx: TestContext;
let fake: FakeGemini;
let base: string;
beforeAll(async () => {
  fake = await startFakeGemini();
  ctx = await createTestContext({
    worker: true,
    env: { LLM_PROVIDER: 'gemini', GEMINI_API_KEY: 'k', GEMINI_BASE_URL: fake.url },
  });
  base = await ctx.app.listen({ port: 0, host: '127.0.0.1' });
});
afterAll(async () => {
  await ctx?.close();
  await fake?.close();
});

it('streams a reply whose deltas add up to the stored content', async () => {
  const user = await signIn(ctx.app);
  const room = await createRoom(ctx.app, user);
  const pieces = Array.from({ length: 200 }, (_, i) => `w${i} `);
  fake.enqueue({ kind: 'text', text: pieces.join(''), chunks: pieces, chunkDelayMs: 2 });
  const res = await sendMessage(ctx.app, user, room.id, 'go');
  const { assistantMessage } = res.json();
  const sse = await openSse(`${base}/chatroom/${room.id}/messages/${assistantMessage.id}/stream`, {
    headers: user.headers,
  });
  expect(sse.status).toBe(200);
  const events = await sse.events;
  const text = events
    .filter((e) => e.event === 'delta')
    .map((e) => (e.data as { text: string }).text)
    .join('');
  const final = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
  expect(events.at(-1)?.event).toBe('done');
  expect(text).toBe(final.content);
  expect(events.filter((e) => e.event === 'delta')).toHaveLength(200);
});

it('answers ?wait with 200 when the reply is fast', async () => {
  const user = await signIn(ctx.app);
  const room = await createRoom(ctx.app, user);
  fake.enqueue({ kind: 'text', text: 'quick answer' });
  const res = await ctx.app.inject({
    method: 'POST',
    url: `/chatroom/${room.id}/message?wait=5`,
    headers: user.headers,
    payload: { content: 'hi' },
  });
  expect(res.statusCode, res.body).toBe(200);
  expect(res.json().assistantMessage).toMatchObject({
    status: 'completed',
    content: 'quick answer',
  });
});

it('streams on the POST response with Accept: text/event-stream', async () => {
  const user = await signIn(ctx.app);
  const room = await createRoom(ctx.app, user);
  fake.enqueue({ kind: 'text', text: 'streamed here', chunks: 3 });
  const sse = await openSse(`${base}/chatroom/${room.id}/message`, {
    method: 'POST',
    headers: { ...user.headers, 'content-type': 'application/json' },
    body: JSON.stringify({ content: 'hello' }),
  });
  const events = await sse.events;
  expect(events[0]?.event).toBe('ready');
  expect(events[1]?.event).toBe('accepted');
  expect(events.at(-1)).toMatchObject({
    event: 'done',
    data: { status: 'completed', content: 'streamed here' },
  });
});
