// The committed Postman collection: regenerating it changes nothing, and newman runs it green
// against a live instance (offline model), without Stripe settings and with a fake Stripe.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/api/app.js';
import { loadConfig } from '../src/config.js';
import { createContainer } from '../src/container.js';
import { createLogger } from '../src/lib/logger.js';
import { OfflineProvider } from '../src/llm/index.js';
import {
  createTestContext,
  createTestDatabase,
  type EnvOverrides,
  type TestContext,
  testRedisPrefix,
} from './helpers/context.js';
import { REDIS_URL } from './helpers/env.js';
import { type FakeStripe, startFakeStripe } from './helpers/fake-stripe.js';

/** What this test uses of scripts/postman.mjs (plain JavaScript, no type declarations). */
interface PostmanScript {
  COLLECTION_FILE: string;
  documentEnv(source?: Record<string, string | undefined>): Record<string, string>;
  generate(options: {
    env: Record<string, string>;
    modules: {
      buildApp: typeof buildApp;
      loadConfig: typeof loadConfig;
      createContainer: typeof createContainer;
      createLogger: typeof createLogger;
    };
  }): Promise<string>;
}

/** The part of newman's run summary this test reads. */
interface NewmanSummary {
  run: {
    failures: Array<{
      error: { name?: string; test?: string; message: string };
      source?: { name?: string };
    }>;
    executions: Array<{ item: { id: string; name: string }; response?: { code: number } }>;
    stats: {
      requests: { total: number; failed: number };
      assertions: { total: number; failed: number };
    };
  };
}

interface Newman {
  run(
    options: {
      collection: unknown;
      envVar?: Array<{ key: string; value: string }>;
      timeoutRequest?: number;
      reporters?: string[];
    },
    callback: (error: Error | null, summary: NewmanSummary) => void,
  ): void;
}

const newman = createRequire(import.meta.url)('newman') as Newman;
const scriptUrl = new URL('../scripts/postman.mjs', import.meta.url).href;
const loadScript = async () => (await import(scriptUrl)) as PostmanScript;

interface Item {
  id: string;
  name: string;
  item?: Item[];
}

function requestsOf(collection: { item: Item[] }): Item[] {
  return collection.item.flatMap((node) => (node.item ? requestsOf({ item: node.item }) : [node]));
}

/** The first line where two texts differ, with its neighbours; null when they are equal. */
function firstDifference(actual: string, expected: string): string | null {
  if (actual === expected) return null;
  const a = actual.split('\n');
  const b = expected.split('\n');
  let line = 0;
  while (line < a.length && a[line] === b[line]) line++;
  const around = (lines: string[]) => lines.slice(Math.max(0, line - 3), line + 3).join('\n');
  return `line ${line + 1}\n--- generated\n${around(a)}\n--- committed\n${around(b)}`;
}

it('regenerating the collection gives exactly the committed file', async () => {
  const script = await loadScript();
  const committed = readFileSync(script.COLLECTION_FILE, 'utf8');
  const database = await createTestDatabase();
  try {
    const text = await script.generate({
      env: {
        ...script.documentEnv({}),
        DATABASE_URL: database.url,
        REDIS_URL,
        REDIS_PREFIX: testRedisPrefix(),
      },
      modules: { buildApp, loadConfig, createContainer, createLogger },
    });
    // On a difference: run `npm run postman` and commit the collection.
    expect(firstDifference(text, committed), 'run `npm run postman`: the collection is stale').toBe(
      null,
    );
  } finally {
    await database.drop();
  }
});

it('has the folders and variables integrators look for', () => {
  const collection = JSON.parse(
    readFileSync('postman/gemini-chat.postman_collection.json', 'utf8'),
  );
  const folders = (collection.item as Item[]).map((folder) => folder.name);
  expect(folders).toEqual(
    expect.arrayContaining(['Auth', 'User', 'Chatroom', 'Subscription', 'Webhook']),
  );
  const variables = (collection.variable as Array<{ key: string; value: string }>).map(
    (v) => v.key,
  );
  expect(variables).toEqual(
    expect.arrayContaining([
      'baseUrl',
      'mobile',
      'otp',
      'accessToken',
      'refreshToken',
      'chatroomId',
      'messageId',
    ]),
  );
  expect(collection.auth).toEqual({
    type: 'bearer',
    bearer: [{ key: 'token', type: 'string', value: '{{accessToken}}' }],
  });
  // No id made up at random: every id is unique and derived from the operation.
  const ids = requestsOf(collection).map((item) => item.id);
  expect(new Set(ids).size).toBe(ids.length);
});

async function runCollection(base: string): Promise<NewmanSummary> {
  const collection = JSON.parse(
    readFileSync('postman/gemini-chat.postman_collection.json', 'utf8'),
  );
  return new Promise((resolve, reject) => {
    newman.run(
      {
        collection,
        envVar: [{ key: 'baseUrl', value: base }],
        timeoutRequest: 20_000,
        reporters: [],
      },
      (error, summary) => (error ? reject(error) : resolve(summary)),
    );
  });
}

function checkRun(summary: NewmanSummary) {
  const collection = JSON.parse(
    readFileSync('postman/gemini-chat.postman_collection.json', 'utf8'),
  );
  const failures = summary.run.failures.map(
    (f) =>
      `${f.source?.name ?? '?'}: ${f.error.test ? `[${f.error.test}] ` : ''}${f.error.message}`,
  );
  expect(failures).toEqual([]);

  const items = requestsOf(collection);
  const executed = summary.run.executions.map((e) => e.item.id);
  // Every request ran; only the reply poll may repeat.
  expect(new Set(executed)).toEqual(new Set(items.map((item) => item.id)));
  const poll = items.find((item) => item.name.startsWith('One message'))!;
  const polls = executed.filter((id) => id === poll.id).length;
  expect(polls).toBeGreaterThanOrEqual(1);
  expect(polls).toBeLessThanOrEqual(20);
  expect(executed.length).toBe(items.length + polls - 1);
  expect(summary.run.stats.requests.total).toBe(executed.length);
  expect(summary.run.stats.assertions.failed).toBe(0);
  expect(summary.run.stats.assertions.total).toBeGreaterThan(items.length * 2);

  // Run order: health first, sign-out last.
  expect(summary.run.executions[0]!.item.name).toMatch(/^Liveness/);
  expect(summary.run.executions.at(-1)!.item.name).toMatch(/^Sign out/);
  return summary.run.executions.map((e) => `${e.item.name} ${e.response?.code}`);
}

describe('newman against a live instance without Stripe', () => {
  let ctx: TestContext;
  let base: string;
  beforeAll(async () => {
    ctx = await createTestContext({ worker: true, llm: new OfflineProvider({ delayMs: 0 }) });
    base = await ctx.app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    await ctx?.close();
  });

  it('runs every request and every test green', async () => {
    const lines = checkRun(await runCollection(base));
    expect(lines).toContain('Start a Stripe Checkout for the Pro subscription 503');
    expect(lines).toContain('Stripe webhook endpoint 503');
  }, 60_000);
});

describe('newman against a live instance with a fake Stripe', () => {
  let ctx: TestContext;
  let fake: FakeStripe;
  let base: string;
  beforeAll(async () => {
    fake = await startFakeStripe();
    const env: EnvOverrides = {
      STRIPE_SECRET_KEY: 'sk_test_fake_key',
      STRIPE_WEBHOOK_SECRET: 'whsec_postman_test_secret',
      STRIPE_PRICE_ID: 'price_pro_monthly',
      STRIPE_API_BASE: fake.url,
    };
    ctx = await createTestContext({ worker: true, llm: new OfflineProvider({ delayMs: 0 }), env });
    base = await ctx.app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    await ctx?.close();
    await fake?.close();
  });

  it('runs every request and every test green', async () => {
    const lines = checkRun(await runCollection(base));
    expect(lines).toContain('Start a Stripe Checkout for the Pro subscription 201');
    expect(lines).toContain('Stripe webhook endpoint 400');
  }, 60_000);
});
