import type { Response } from 'light-my-request';
import { expect } from 'vitest';
import type { Clock } from '../../src/lib/clock.js';

/** Asserts the status, the error code and the documented error shape (with this request's id). */
export function expectError(res: Response, status: number, code: string) {
  expect(res.statusCode, res.body).toBe(status);
  const body = res.json();
  expect(body).toEqual({
    error: {
      code,
      message: expect.any(String),
      requestId: expect.any(String),
      details: expect.any(Object),
    },
  });
  expect(body.error.requestId).toBe(res.headers['x-request-id']);
  return body.error as {
    code: string;
    message: string;
    requestId: string;
    details: Record<string, unknown>;
  };
}

/** A clock the test moves by hand; frozen between moves. */
export function controlledClock(start: Date): {
  state: { now: Date };
  clock: Clock;
  set(date: Date): void;
} {
  const state = { now: start };
  return {
    state,
    clock: { now: () => new Date(state.now.getTime()) },
    set(date: Date) {
      state.now = date;
    },
  };
}
