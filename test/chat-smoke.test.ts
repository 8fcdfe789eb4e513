import { afterAll, beforeAll, expect, it } from 'vitest';
import { OfflineProvider } from '../src/llm/index.js';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { signIn } from './helpers/users.js';

let ctx: TestContext;
beforeAll(async () => {
  ctx = await createTestContext({ worker: true, llm: new OfflineProvider({ delayMs: 0 }) });
});
afterAll(async () => ctx?.close());

it('answers a message with the offline model', async () => {
  const user = await signIn(ctx.app);
  const room = await createRoom(ctx.app, user);
  const res = await sendMessage(ctx.app, user, room.id, 'Hello there');
  expect(res.statusCode, res.body).toBe(202);
  const { assistantMessage } = res.json();
  expect(res.headers.location).toBe(`/chatroom/${room.id}/messages/${assistantMessage.id}`);
  expect(res.headers['x-ratelimit-remaining']).toBe('4');
  const reply = await waitForReply(ctx.app, user, room.id, assistantMessage.id);
  expect(reply.status).toBe('completed');
  expect(reply.content).toContain('offline');
  expect(reply.model).toBe('offline-echo-1');
});
