import { expect } from 'vitest';
import type { App } from '../../src/api/app.js';
import type { SignedInUser } from './users.js';

export async function createRoom(
  app: App,
  user: SignedInUser,
  name = 'Room',
  systemInstruction?: string,
) {
  const res = await app.inject({
    method: 'POST',
    url: '/chatroom',
    headers: user.headers,
    payload: { name, ...(systemInstruction ? { systemInstruction } : {}) },
  });
  expect(res.statusCode, res.body).toBe(201);
  return res.json() as { id: string; name: string };
}

export async function sendMessage(
  app: App,
  user: SignedInUser,
  roomId: string,
  content: string,
  headers: Record<string, string> = {},
) {
  return app.inject({
    method: 'POST',
    url: `/chatroom/${roomId}/message`,
    headers: { ...user.headers, ...headers },
    payload: { content },
  });
}

const FINAL = new Set(['completed', 'failed', 'cancelled', 'blocked']);

/** Polls a reply until it reaches a final status. */
export async function waitForReply(
  app: App,
  user: SignedInUser,
  roomId: string,
  messageId: string,
  timeoutMs = 20_000,
) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await app.inject({
      method: 'GET',
      url: `/chatroom/${roomId}/messages/${messageId}`,
      headers: user.headers,
    });
    expect(res.statusCode, res.body).toBe(200);
    const message = res.json();
    if (FINAL.has(message.status)) return message;
    if (Date.now() > deadline) throw new Error(`reply ${messageId} still ${message.status}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
