import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  createLlmProvider,
  estimateTokens,
  fitHistory,
  GeminiProvider,
  LlmError,
  type LlmEvent,
  type LlmProvider,
  type LlmRequest,
  type LlmTurn,
  OfflineProvider,
} from '../src/llm/index.js';
import { type FakeGemini, startFakeGemini } from './helpers/fake-gemini.js';

const MODEL = 'gemini-2.5-flash';

function request(overrides: Partial<LlmRequest> = {}): LlmRequest {
  return { history: [], prompt: 'Hello', signal: new AbortController().signal, ...overrides };
}

async function collect(provider: LlmProvider, req: LlmRequest): Promise<LlmEvent[]> {
  const events: LlmEvent[] = [];
  for await (const event of provider.stream(req)) events.push(event);
  return events;
}

/** Runs the stream to its end and returns the deltas seen and the LlmError it threw. */
async function failure(
  provider: LlmProvider,
  req: LlmRequest,
): Promise<{ deltas: string[]; error: LlmError }> {
  const deltas: string[] = [];
  try {
    for await (const event of provider.stream(req)) {
      if (event.type === 'delta') deltas.push(event.text);
    }
  } catch (error) {
    expect(error).toBeInstanceOf(LlmError);
    return { deltas, error: error as LlmError };
  }
  throw new Error('the stream did not fail');
}

function deltasOf(events: LlmEvent[]): string[] {
  return events.flatMap((event) => (event.type === 'delta' ? [event.text] : []));
}

describe('GeminiProvider against the fake Gemini server', () => {
  let fake: FakeGemini;
  let gemini: GeminiProvider;

  beforeAll(async () => {
    fake = await startFakeGemini({ apiKey: 'test-key' });
    gemini = new GeminiProvider({
      apiKey: 'test-key',
      model: MODEL,
      baseUrl: fake.url,
      timeoutMs: 10_000,
    });
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.reset();
  });

  it('streams the text as ordered deltas, then done with usage and model', async () => {
    fake.enqueue({
      kind: 'text',
      text: '',
      chunks: ['Once ', 'upon ', 'a ', 'time.'],
      chunkDelayMs: 5,
      usage: { promptTokenCount: 11, candidatesTokenCount: 4, totalTokenCount: 15 },
      modelVersion: 'gemini-2.5-flash-001',
    });

    const events = await collect(gemini, request({ prompt: 'Tell a story' }));

    expect(deltasOf(events)).toEqual(['Once ', 'upon ', 'a ', 'time.']);
    expect(events.at(-1)).toEqual({
      type: 'done',
      finishReason: 'STOP',
      usage: { promptTokens: 11, completionTokens: 4, totalTokens: 15 },
      model: 'gemini-2.5-flash-001',
    });
    expect(events.filter((event) => event.type === 'done')).toHaveLength(1);
    expect(fake.requests[0]).toMatchObject({ model: MODEL, stream: true, apiVersion: 'v1beta' });
  });

  it('passes a non-STOP finish reason such as LANGUAGE through as done', async () => {
    fake.enqueue({ kind: 'text', text: 'partial', finishReason: 'LANGUAGE' });
    const events = await collect(gemini, request());
    expect(deltasOf(events).join('')).toBe('partial');
    expect(events.at(-1)).toMatchObject({ type: 'done', finishReason: 'LANGUAGE', model: MODEL });
  });

  it('sends the history with user/model roles, the prompt last, and the system instruction', async () => {
    const history: LlmTurn[] = [
      { role: 'user', text: 'My name is Asha.' },
      { role: 'model', text: 'Nice to meet you, Asha.' },
    ];

    await collect(
      gemini,
      request({ history, prompt: 'What is my name?', systemInstruction: 'Answer in one line.' }),
    );

    const body = fake.requests[0]?.body;
    expect(body?.contents).toEqual([
      { role: 'user', parts: [{ text: 'My name is Asha.' }] },
      { role: 'model', parts: [{ text: 'Nice to meet you, Asha.' }] },
      { role: 'user', parts: [{ text: 'What is my name?' }] },
    ]);
    expect(body?.systemInstruction?.parts).toEqual([{ text: 'Answer in one line.' }]);
  });

  it('sends no system instruction when none is given', async () => {
    await collect(gemini, request({ systemInstruction: null }));
    expect(fake.requests[0]?.body?.systemInstruction).toBeUndefined();
    expect(fake.requests[0]?.body?.contents).toEqual([
      { role: 'user', parts: [{ text: 'Hello' }] },
    ]);
  });

  it('maps a 429 to rate_limited with the RetryInfo delay', async () => {
    fake.enqueue({ kind: 'rateLimit', retryAfterSeconds: 7 });
    const { error } = await failure(gemini, request());
    expect(error).toMatchObject({ kind: 'rate_limited', status: 429, retryAfterMs: 7000 });
    expect(error.retryable).toBe(true);
  });

  it('maps a 500 to server, retryable', async () => {
    fake.enqueue({ kind: 'serverError', status: 500 });
    const { error } = await failure(gemini, request());
    expect(error).toMatchObject({ kind: 'server', status: 500 });
    expect(error.retryable).toBe(true);
  });

  it('maps a 400 to client, not retryable', async () => {
    fake.enqueue({ kind: 'clientError', status: 400, message: 'Bad contents.' });
    const { error } = await failure(gemini, request());
    expect(error).toMatchObject({ kind: 'client', status: 400 });
    expect(error.message).toContain('Bad contents.');
    expect(error.retryable).toBe(false);
  });

  it('reports a blocked prompt with its block reason', async () => {
    fake.enqueue({ kind: 'promptBlocked', reason: 'SAFETY' });
    const { deltas, error } = await failure(gemini, request());
    expect(deltas).toEqual([]);
    expect(error).toMatchObject({ kind: 'blocked', blockReason: 'SAFETY' });
    expect(error.retryable).toBe(false);
  });

  it('yields the partial text of a blocked reply, then reports the block', async () => {
    fake.enqueue({
      kind: 'responseBlocked',
      reason: 'RECITATION',
      partialText: 'The first lines are',
    });
    const { deltas, error } = await failure(gemini, request());
    expect(deltas.length).toBeGreaterThan(0);
    expect(deltas.join('')).toBe('The first lines are');
    expect(error).toMatchObject({ kind: 'blocked', blockReason: 'RECITATION' });
  });

  it('maps a connection dropped mid-stream to network', async () => {
    fake.enqueue({ kind: 'dropMidStream', text: 'This will be cut short', afterChunks: 1 });
    const { deltas, error } = await failure(gemini, request());
    expect(deltas.length).toBeGreaterThan(0);
    expect(error.kind).toBe('network');
    expect(error.retryable).toBe(true);
  });

  it('maps a refused connection to network', async () => {
    const closed = await startFakeGemini();
    const url = closed.url;
    await closed.close();
    const unreachable = new GeminiProvider({
      apiKey: 'k',
      model: MODEL,
      baseUrl: url,
      timeoutMs: 5000,
    });
    const { error } = await failure(unreachable, request());
    expect(error.kind).toBe('network');
  });

  it('stops on a caller abort mid-stream and closes the connection', async () => {
    fake.enqueue({ kind: 'text', text: 'a b c d e f g h', chunks: 8, chunkDelayMs: 200 });
    const controller = new AbortController();
    const stream = gemini.stream(request({ signal: controller.signal }))[Symbol.asyncIterator]();

    const first = await stream.next();
    expect(first.value).toMatchObject({ type: 'delta' });
    const abortedAt = Date.now();
    controller.abort();

    await expect(stream.next()).rejects.toMatchObject({ name: 'LlmError', kind: 'aborted' });
    await fake.waitFor((requests) => requests[0]?.closedAt !== undefined, 1000);
    expect((fake.requests[0]?.closedAt ?? Infinity) - abortedAt).toBeLessThan(1000);
  });

  it('closes the connection when the consumer stops reading early', async () => {
    fake.enqueue({ kind: 'text', text: 'a b c d e f', chunks: 6, chunkDelayMs: 200 });
    for await (const event of gemini.stream(request())) {
      expect(event.type).toBe('delta');
      break;
    }
    await fake.waitFor((requests) => requests[0]?.closedAt !== undefined, 1000);
  });

  it('rejects at once when the signal is already aborted', async () => {
    const controller = new AbortController();
    controller.abort();
    const { error } = await failure(gemini, request({ signal: controller.signal }));
    expect(error.kind).toBe('aborted');
    expect(fake.requests).toHaveLength(0);
  });

  it('reports a hung request as timeout after timeoutMs', async () => {
    fake.enqueue({ kind: 'hang' });
    const impatient = new GeminiProvider({
      apiKey: 'test-key',
      model: MODEL,
      baseUrl: fake.url,
      timeoutMs: 300,
    });
    const started = Date.now();
    const { error } = await failure(impatient, request());
    expect(error.kind).toBe('timeout');
    expect(error.retryable).toBe(true);
    expect(Date.now() - started).toBeLessThan(3000);
    await fake.waitFor((requests) => requests[0]?.closedAt !== undefined, 1000);
  });
});

describe('OfflineProvider', () => {
  const offline = new OfflineProvider({ delayMs: 0 });
  const history: LlmTurn[] = [
    { role: 'user', text: 'Hi' },
    { role: 'model', text: 'Hello!' },
  ];

  it('answers the same request with the same reply, saying it is the offline model', async () => {
    const first = await collect(offline, request({ history, prompt: 'Plan a trip to Goa' }));
    const second = await collect(offline, request({ history, prompt: 'Plan a trip to Goa' }));

    expect(second).toEqual(first);
    const text = deltasOf(first).join('');
    expect(text).toMatch(/offline model/);
    expect(text).toMatch(/no Gemini API key/);
    expect(text).toContain('Plan a trip to Goa');
    expect(text).toContain('2 earlier turns');
    expect(deltasOf(first).length).toBeGreaterThan(5);
    expect(first.at(-1)).toMatchObject({
      type: 'done',
      finishReason: 'STOP',
      model: 'offline-echo-1',
      usage: { completionTokens: estimateTokens(text) },
    });
  });

  it('answers a different prompt differently', async () => {
    const a = deltasOf(await collect(offline, request({ prompt: 'one' }))).join('');
    const b = deltasOf(await collect(offline, request({ prompt: 'two' }))).join('');
    expect(a).not.toBe(b);
  });

  it('stops promptly with aborted when the signal is aborted', async () => {
    const slow = new OfflineProvider({ delayMs: 1000 });
    const controller = new AbortController();
    const stream = slow.stream(request({ signal: controller.signal }))[Symbol.asyncIterator]();
    const next = stream.next();
    await new Promise((resolve) => setTimeout(resolve, 20));
    const abortedAt = Date.now();
    controller.abort();
    await expect(next).rejects.toMatchObject({ name: 'LlmError', kind: 'aborted' });
    expect(Date.now() - abortedAt).toBeLessThan(500);
  });
});

describe('createLlmProvider', () => {
  it('builds the configured provider', () => {
    const base = { geminiModel: MODEL, timeoutMs: 1000 };
    expect(createLlmProvider({ ...base, provider: 'offline' }).name).toBe('offline');
    const gemini = createLlmProvider({ ...base, provider: 'gemini', geminiApiKey: 'k' });
    expect(gemini).toMatchObject({ name: 'gemini', model: MODEL });
    expect(() => createLlmProvider({ ...base, provider: 'gemini' })).toThrow(/GEMINI_API_KEY/);
  });
});

describe('fitHistory', () => {
  const turn = (role: LlmTurn['role'], text: string): LlmTurn => ({ role, text });
  const byLength = (text: string) => text.length;

  it('keeps the newest turns that fit, oldest first', () => {
    const turns = [
      turn('user', 'aaaa'),
      turn('model', 'bbbb'),
      turn('user', 'cccc'),
      turn('model', 'dddd'),
    ];
    expect(fitHistory(turns, 8, byLength)).toEqual([turn('user', 'cccc'), turn('model', 'dddd')]);
    expect(fitHistory(turns, 100, byLength)).toEqual(turns);
  });

  it('never starts with a model turn', () => {
    const turns = [turn('user', 'aaaa'), turn('model', 'bbbb'), turn('user', 'cccc')];
    expect(fitHistory(turns, 8, byLength)).toEqual([turn('user', 'cccc')]);
    expect(fitHistory([turn('model', 'x'), turn('user', 'y')], 100, byLength)).toEqual([
      turn('user', 'y'),
    ]);
  });

  it('does not skip over a turn that is too large to keep older ones', () => {
    const turns = [turn('user', 'a'), turn('model', 'b'.repeat(50)), turn('user', 'c')];
    expect(fitHistory(turns, 10, byLength)).toEqual([turn('user', 'c')]);
  });

  it('respects the budget with the default estimate', () => {
    const turns = Array.from({ length: 20 }, (_, i) =>
      turn(i % 2 === 0 ? 'user' : 'model', 'x'.repeat(40)),
    );
    const kept = fitHistory(turns, 35);
    const used = kept.reduce((sum, t) => sum + estimateTokens(t.text), 0);
    expect(used).toBeLessThanOrEqual(35);
    expect(kept[0]?.role).toBe('user');
    expect(kept.at(-1)).toBe(turns.at(-1));
    expect(fitHistory(turns, 0)).toEqual([]);
  });

  it('estimates about four characters per token, at least one', () => {
    expect(estimateTokens('')).toBe(1);
    expect(estimateTokens('abcd')).toBe(1);
    expect(estimateTokens('abcde')).toBe(2);
  });
});
