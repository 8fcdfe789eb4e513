// End to end in a real browser: the playground at `/` signs in, creates a chatroom, sends a message
// and shows the reply streaming in. Drives Debian's `chromium` package with playwright-core.
import { existsSync, mkdirSync } from 'node:fs';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { OfflineProvider } from '../src/llm/index.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { randomMobile } from './helpers/users.js';

const CHROMIUM = '/usr/bin/chromium';
const SCREENSHOT = 'test-output/playground.png';
const available = existsSync(CHROMIUM);
const inCi = Boolean(process.env.CI) && !['0', 'false'].includes(process.env.CI ?? '');
const delayMs = 5;

let ctx: TestContext | undefined;
let base: string;
let browser: Browser | undefined;

beforeAll(async () => {
  if (!available) return;
  ctx = await createTestContext({ worker: true, llm: new OfflineProvider({ delayMs }) });
  base = await ctx.app.listen({ port: 0, host: '127.0.0.1' });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

afterAll(async () => {
  await browser?.close();
  await ctx?.close();
});

it.runIf(!available && inCi)('has Debian chromium installed in CI', () => {
  throw new Error(
    `${CHROMIUM} is missing: the browser test needs Debian's chromium package in CI (apt-get install -y chromium).`,
  );
});

/** The reply the offline model gives to a first message, as it streams it. */
async function offlineReply(prompt: string): Promise<string> {
  let text = '';
  const model = new OfflineProvider({ delayMs: 0 });
  for await (const event of model.stream({
    prompt,
    history: [],
    signal: new AbortController().signal,
  } as Parameters<OfflineProvider['stream']>[0])) {
    if (event.type === 'delta') text += event.text;
  }
  return text;
}

interface Recorded {
  texts: string[];
  stopEnabled: boolean;
}

/** Installed in the page before sending: records what the reply bubble and Stop button go through. */
const RECORDER = `(() => {
  const recorded = { texts: [], stopEnabled: false };
  window.recorded = recorded;
  const stop = document.querySelector('[data-testid="stop"]');
  new MutationObserver(() => {
    if (!stop.disabled) recorded.stopEnabled = true;
  }).observe(stop, { attributes: true, attributeFilter: ['disabled'] });
  new MutationObserver((records) => {
    for (const record of records) {
      const target = record.target;
      if (!target.matches('[data-role="assistant"] [data-testid="message-content"]')) continue;
      for (const node of record.addedNodes) recorded.texts.push(node.textContent);
    }
  }).observe(document.querySelector('[data-testid="messages"]'), { childList: true, subtree: true });
})()`;

const byTestId = (page: Page, id: string) => page.locator(`[data-testid="${id}"]`);

it.skipIf(!available)(
  'signs in, creates a chatroom, sends a message and streams the reply',
  async () => {
    const page = await browser!.newPage({ viewport: { width: 1280, height: 800 } });
    const problems: string[] = [];
    page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    page.on('console', (message) => {
      // A refused request (e.g. 409) is logged by the browser too; those are checked below.
      if (message.type() === 'error' && !message.text().startsWith('Failed to load resource'))
        problems.push(`console: ${message.text()}`);
    });

    await page.goto(base);
    await expect(page.title()).resolves.toBe('Gemini Chat playground');

    // Sign in with the mocked OTP, which the page fills in.
    const mobile = randomMobile();
    await byTestId(page, 'mobile-input').fill(mobile);
    await byTestId(page, 'name-input').fill('Browser Test');
    await byTestId(page, 'send-otp').click();
    await expect
      .poll(() => byTestId(page, 'otp-input').inputValue(), { timeout: 10_000 })
      .toMatch(/^\d{6}$/);
    await byTestId(page, 'verify-otp').click();
    await byTestId(page, 'workspace').waitFor({ state: 'visible' });
    await expect(byTestId(page, 'who').textContent()).resolves.toContain(mobile);
    // The workspace shows before the account status arrives: wait for it.
    await expect.poll(() => byTestId(page, 'tier').textContent()).toBe('Basic');
    await expect.poll(() => byTestId(page, 'usage').textContent()).toContain('0 of 5');
    const stored = await page.evaluate<string | null>(
      "sessionStorage.getItem('gemini-chat.tokens')",
    );
    expect(JSON.parse(stored ?? '{}')).toHaveProperty('refreshToken');

    // Create a chatroom; it opens.
    await byTestId(page, 'room-name-input').fill('Browser test room');
    await byTestId(page, 'create-room').click();
    await expect.poll(() => byTestId(page, 'room-title').textContent()).toBe('Browser test room');
    await expect(
      page.locator('[data-testid="room-item"][aria-current="true"]').count(),
    ).resolves.toBe(1);

    // Record every text the assistant's bubble shows while the reply streams in, and whether the
    // Stop button was usable meanwhile. (Runs in the page; a string, as the project has no DOM types.)
    await page.evaluate(RECORDER);

    const prompt = 'Hello from the browser test';
    await byTestId(page, 'composer-input').fill(prompt);
    await byTestId(page, 'send-message').click();

    const assistant = page.locator('[data-testid="message"][data-role="assistant"]');
    await assistant.waitFor({ state: 'attached' });
    await page.waitForSelector(
      '[data-testid="message"][data-role="assistant"][data-status="completed"]',
      {
        timeout: 20_000,
      },
    );

    const expected = (await offlineReply(prompt)).trim();
    const shown = (await assistant.locator('[data-testid="message-content"]').textContent()) ?? '';
    expect(shown.trim()).toBe(expected);
    expect(shown).toContain('offline');

    // The text grew piece by piece, each step extending the one before.
    const recorded = await page.evaluate<Recorded>('window.recorded');
    const steps = recorded.texts.filter((text) => text.length > 0);
    expect(steps.length).toBeGreaterThanOrEqual(5);
    for (let i = 1; i < steps.length; i++) {
      expect(steps[i]!.startsWith(steps[i - 1]!), `step ${i} extends step ${i - 1}`).toBe(true);
    }
    expect(steps.at(-1)!.trim()).toBe(expected);

    // Conversation order: the prompt first, then the reply; usage counts the prompt.
    const roles = await Promise.all(
      (await page.locator('[data-testid="message"]').all()).map((m) => m.getAttribute('data-role')),
    );
    expect(roles).toEqual(['user', 'assistant']);
    // Stop was offered while the reply streamed, and is off again once it is done.
    expect(recorded.stopEnabled).toBe(true);
    await expect(byTestId(page, 'stop').isDisabled()).resolves.toBe(true);
    await expect.poll(() => byTestId(page, 'usage').textContent()).toContain('1 of 5');

    mkdirSync('test-output', { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    expect(existsSync(SCREENSHOT)).toBe(true);

    // A reload keeps the session (sessionStorage) and shows the conversation oldest first.
    await page.reload();
    await page.waitForSelector(
      '[data-testid="message"][data-role="assistant"][data-status="completed"]',
    );
    const afterReload = await page.locator('[data-testid="message-content"]').allTextContents();
    expect(afterReload).toEqual([prompt, expected]);

    // Without Stripe settings, upgrading explains itself instead of failing silently.
    await byTestId(page, 'upgrade').click();
    await byTestId(page, 'error').waitFor({ state: 'visible' });
    await expect(byTestId(page, 'error').textContent()).resolves.toContain(
      'BILLING_NOT_CONFIGURED',
    );

    expect(problems).toEqual([]);
    await page.close();
  },
  60_000,
);
