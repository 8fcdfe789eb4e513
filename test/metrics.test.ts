import { afterAll, beforeAll, expect, it } from 'vitest';
import { createRoom, sendMessage, waitForReply } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeGemini, startFakeGemini } from './helpers/fake-gemini.js';
import { type FakeStripe, startFakeStripe } from './helpers/fake-stripe.js';
import { signIn } from './helpers/users.js';

const SECRET = 'whsec_metrics_test_secret';
let ctx: TestContext;
let gemini: FakeGemini;
let stripe: FakeStripe;

beforeAll(async () => {
  gemini = await startFakeGemini();
  stripe = await startFakeStripe();
  ctx = await createTestContext({
    worker: true,
    env: {
      LLM_PROVIDER: 'gemini',
      GEMINI_API_KEY: 'k',
      GEMINI_BASE_URL: gemini.url,
      GEMINI_MODEL: 'gemini-test-model',
      BASIC_DAILY_LIMIT: '1',
      STRIPE_SECRET_KEY: 'sk_test_metrics',
      STRIPE_WEBHOOK_SECRET: SECRET,
      STRIPE_PRICE_ID: 'price_metrics',
      STRIPE_API_BASE: stripe.url,
    },
  });
});

afterAll(async () => {
  await ctx?.close();
  await gemini?.close();
  await stripe?.close();
});

function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const body = line.slice(name.length + 1, line.lastIndexOf('}'));
    const found = Object.fromEntries(
      [...body.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]] as [string, string]),
    );
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) {
      return Number(line.slice(line.lastIndexOf(' ') + 1));
    }
  }
  return undefined;
}

it('reports queue, reply, model, quota and webhook figures after a reply', async () => {
  gemini.enqueue({
    kind: 'text',
    text: 'four words of reply',
    chunks: 2,
    // Far enough apart that the second chunk comes measurably after the first on a busy machine.
    chunkDelayMs: 80,
    usage: { promptTokenCount: 11, candidatesTokenCount: 7, totalTokenCount: 18 },
    modelVersion: 'gemini-test-model',
  });
  const user = await signIn(ctx.app);
  const room = await createRoom(ctx.app, user);
  const accepted = await sendMessage(ctx.app, user, room.id, 'count me');
  expect(accepted.statusCode).toBe(202);
  await waitForReply(ctx.app, user, room.id, accepted.json().assistantMessage.id);
  const refused = await sendMessage(ctx.app, user, room.id, 'one too many');
  expect(refused.statusCode).toBe(429);

  const event = stripe.event('customer.created', { id: 'cus_metrics', object: 'customer' });
  const signed = stripe.signEvent(event, SECRET);
  const hook = await ctx.app.inject({
    method: 'POST',
    url: '/webhook/stripe',
    headers: signed.headers,
    payload: signed.payload,
  });
  expect(hook.statusCode, hook.body).toBe(200);

  const text = (await ctx.app.inject({ method: 'GET', url: '/metrics' })).body;
  const model = { model: 'gemini-test-model' };
  expect(sample(text, 'llm_time_to_first_token_seconds_count', model)).toBe(1);
  const ttft = sample(text, 'llm_time_to_first_token_seconds_sum', model)!;
  const total = sample(text, 'llm_response_seconds_sum', model)!;
  expect(ttft).toBeGreaterThan(0);
  expect(total).toBeGreaterThanOrEqual(ttft + 0.02);
  expect(sample(text, 'llm_tokens_total', { ...model, kind: 'prompt' })).toBe(11);
  expect(sample(text, 'llm_tokens_total', { ...model, kind: 'completion' })).toBe(7);
  expect(sample(text, 'reply_job_duration_seconds_count', { ...model, outcome: 'completed' })).toBe(
    1,
  );
  expect(sample(text, 'queue_jobs', { queue: 'replies', state: 'waiting' })).toBe(0);
  expect(sample(text, 'queue_jobs', { queue: 'replies', state: 'completed' })).toBe(1);
  expect(sample(text, 'quota_refusals_total', { tier: 'basic' })).toBe(1);
  expect(sample(text, 'api_errors_total', { code: 'QUOTA_EXCEEDED' })).toBe(1);
  expect(
    sample(text, 'stripe_webhook_events_total', { type: 'customer.created', outcome: 'processed' }),
  ).toBe(1);
});
