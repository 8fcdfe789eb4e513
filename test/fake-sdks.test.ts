import { ApiError, GoogleGenAI } from '@google/genai';
import Stripe from 'stripe';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type FakeGemini, startFakeGemini } from './helpers/fake-gemini.js';
import { type FakeStripe, parseStripeForm, startFakeStripe } from './helpers/fake-stripe.js';

const MODEL = 'gemini-2.5-flash';

describe('fake Gemini behind the real @google/genai SDK', () => {
  let fake: FakeGemini;
  let ai: GoogleGenAI;

  beforeAll(async () => {
    fake = await startFakeGemini();
    ai = new GoogleGenAI({
      apiKey: 'test-key',
      apiVersion: 'v1beta',
      httpOptions: { baseUrl: fake.url },
    });
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.reset();
  });

  it('generateContent returns the scripted text and the request is recorded', async () => {
    fake.enqueue({
      kind: 'text',
      text: 'Bonjour!',
      usage: { promptTokenCount: 3, candidatesTokenCount: 2, totalTokenCount: 5 },
    });

    const response = await ai.models.generateContent({
      model: MODEL,
      contents: [{ role: 'user', parts: [{ text: 'Say hi in French' }] }],
      config: { systemInstruction: 'Be brief', temperature: 0.2 },
    });

    expect(response.text).toBe('Bonjour!');
    expect(response.candidates?.[0]?.finishReason).toBe('STOP');
    expect(response.usageMetadata?.totalTokenCount).toBe(5);
    expect(response.modelVersion).toBe(MODEL);
    expect(fake.requests).toHaveLength(1);
    const [request] = fake.requests;
    expect(request).toMatchObject({
      method: 'POST',
      path: `/v1beta/models/${MODEL}:generateContent`,
      model: MODEL,
      stream: false,
      aborted: false,
    });
    expect(request?.headers['x-goog-api-key']).toBe('test-key');
    expect(request?.body?.contents).toEqual([
      { role: 'user', parts: [{ text: 'Say hi in French' }] },
    ]);
    expect(request?.body?.systemInstruction).toEqual({
      parts: [{ text: 'Be brief' }],
      role: 'user',
    });
    expect(request?.body?.generationConfig).toEqual({ temperature: 0.2 });
  });

  it('answers with the default behaviour when the queue is empty', async () => {
    const response = await ai.models.generateContent({ model: MODEL, contents: 'hi' });
    expect(response.text).toBe('Hello from fake Gemini');
  });

  it('generateContentStream yields the scripted chunks in order', async () => {
    fake.enqueue({
      kind: 'text',
      text: '',
      chunks: ['Once ', 'upon ', 'a time.'],
      chunkDelayMs: 5,
    });

    const stream = await ai.models.generateContentStream({
      model: MODEL,
      contents: 'Tell a story',
    });
    const texts: string[] = [];
    const finishReasons: (string | undefined)[] = [];
    for await (const chunk of stream) {
      texts.push(chunk.text ?? '');
      finishReasons.push(chunk.candidates?.[0]?.finishReason);
    }

    expect(texts).toEqual(['Once ', 'upon ', 'a time.']);
    expect(finishReasons).toEqual([undefined, undefined, 'STOP']);
    expect(fake.requests[0]).toMatchObject({
      path: `/v1beta/models/${MODEL}:streamGenerateContent`,
      url: `/v1beta/models/${MODEL}:streamGenerateContent?alt=sse`,
      stream: true,
    });
  });

  it('splits text into the requested number of chunks', async () => {
    fake.enqueue({ kind: 'text', text: 'abcdefgh', chunks: 4 });
    const stream = await ai.models.generateContentStream({ model: MODEL, contents: 'x' });
    const texts: string[] = [];
    for await (const chunk of stream) texts.push(chunk.text ?? '');
    expect(texts).toEqual(['ab', 'cd', 'ef', 'gh']);
  });

  it('surfaces a 429 as ApiError with status 429 and a readable retry delay', async () => {
    fake.enqueue({ kind: 'rateLimit', retryAfterSeconds: 17 });

    const error = await ai.models.generateContent({ model: MODEL, contents: 'hi' }).then(
      () => undefined,
      (e: unknown) => e,
    );

    expect(error).toBeInstanceOf(ApiError);
    const apiError = error as ApiError;
    expect(apiError.status).toBe(429);
    const body = JSON.parse(apiError.message) as {
      error: { status: string; details: { '@type': string; retryDelay?: string }[] };
    };
    expect(body.error.status).toBe('RESOURCE_EXHAUSTED');
    const retryInfo = body.error.details.find(
      (d) => d['@type'] === 'type.googleapis.com/google.rpc.RetryInfo',
    );
    expect(retryInfo?.retryDelay).toBe('17s');
  });

  it('surfaces a 429 on the streaming endpoint before any chunk', async () => {
    fake.enqueue({ kind: 'rateLimit', retryAfterSeconds: 3 });
    await expect(
      ai.models.generateContentStream({ model: MODEL, contents: 'hi' }),
    ).rejects.toMatchObject({ status: 429 });
  });

  it('surfaces server and client errors with their status', async () => {
    fake.enqueue({ kind: 'serverError', status: 503 }, { kind: 'clientError', status: 400 });
    await expect(ai.models.generateContent({ model: MODEL, contents: 'a' })).rejects.toMatchObject({
      status: 503,
    });
    await expect(ai.models.generateContent({ model: MODEL, contents: 'b' })).rejects.toMatchObject({
      status: 400,
    });
  });

  it('reports a blocked prompt through promptFeedback with no candidates', async () => {
    fake.enqueue({ kind: 'promptBlocked' });
    const response = await ai.models.generateContent({ model: MODEL, contents: 'bad' });
    expect(response.promptFeedback?.blockReason).toBe('SAFETY');
    expect(response.candidates).toBeUndefined();
    expect(response.text).toBeUndefined();
  });

  it('streams partial text then a SAFETY finish for a blocked response', async () => {
    fake.enqueue({ kind: 'responseBlocked', partialText: 'Sure, here is' });
    const stream = await ai.models.generateContentStream({ model: MODEL, contents: 'x' });
    let text = '';
    let finishReason: string | undefined;
    for await (const chunk of stream) {
      text += chunk.text ?? '';
      finishReason = chunk.candidates?.[0]?.finishReason ?? finishReason;
    }
    expect(text).toBe('Sure, here is');
    expect(finishReason).toBe('SAFETY');
  });

  it('drops the connection mid-stream after the given chunks', async () => {
    fake.enqueue({ kind: 'dropMidStream', text: 'one two three four', afterChunks: 2 });
    const stream = await ai.models.generateContentStream({ model: MODEL, contents: 'x' });
    const texts: string[] = [];
    const consume = async () => {
      for await (const chunk of stream) texts.push(chunk.text ?? '');
    };
    await expect(consume()).rejects.toThrow();
    expect(texts).toHaveLength(2);
    expect(fake.requests).toHaveLength(1);
    expect(fake.requests[0]?.aborted).toBe(false);
  });

  it('config.abortSignal closes the connection of a hanging request', async () => {
    fake.enqueue({ kind: 'hang' });
    const controller = new AbortController();

    const pending = ai.models.generateContent({
      model: MODEL,
      contents: 'hello?',
      config: { abortSignal: controller.signal },
    });
    const outcome = pending.then(
      () => undefined,
      (e: unknown) => e,
    );
    await fake.waitFor((requests) => requests.length === 1);
    controller.abort();

    const error = await outcome;
    expect((error as Error).name).toBe('AbortError');
    await fake.waitFor((requests) => requests[0]?.closedAt !== undefined);
    const [request] = fake.requests;
    expect(request?.aborted).toBe(true);
    expect(request?.closedAt).toBeGreaterThanOrEqual(
      request?.receivedAt ?? Number.POSITIVE_INFINITY,
    );
  });

  it('answers unknown paths with a 404 in Google error JSON', async () => {
    const response = await fetch(`${fake.url}/v1beta/nothing-here`, { method: 'POST' });
    expect(response.status).toBe(404);
    expect(((await response.json()) as { error: { status: string } }).error.status).toBe(
      'NOT_FOUND',
    );
  });
});

describe('fake Stripe behind the real stripe SDK', () => {
  let fake: FakeStripe;
  let stripe: Stripe;

  beforeAll(async () => {
    fake = await startFakeStripe();
    stripe = new Stripe('sk_test_fake', { ...fake.stripeOptions, maxNetworkRetries: 0 });
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.reset();
  });

  it('parses bracket-notation form bodies into nested objects', () => {
    expect(
      parseStripeForm(
        'metadata[userId]=u1&line_items[0][price]=price_1&line_items[0][quantity]=2&expand[]=a&expand[]=b&mode=subscription',
      ),
    ).toEqual({
      metadata: { userId: 'u1' },
      line_items: [{ price: 'price_1', quantity: '2' }],
      expand: ['a', 'b'],
      mode: 'subscription',
    });
  });

  it('customers.create reaches the fake and returns a Stripe customer', async () => {
    const customer = await stripe.customers.create({
      email: 'ada@example.com',
      metadata: { userId: 'user-1' },
    });

    expect(customer.id).toMatch(/^cus_/);
    expect(customer).toMatchObject({
      object: 'customer',
      email: 'ada@example.com',
      livemode: false,
      metadata: { userId: 'user-1' },
    });
    expect(customer.lastResponse.requestId).toMatch(/^req_/);
    const [request] = fake.requests;
    expect(request).toMatchObject({
      method: 'POST',
      path: '/v1/customers',
      body: { email: 'ada@example.com', metadata: { userId: 'user-1' } },
    });
    expect(request?.headers.authorization).toBe('Bearer sk_test_fake');
    expect(request?.headers['content-type']).toBe('application/x-www-form-urlencoded');
    expect(request?.headers['idempotency-key']).toBeTruthy();

    const fetched = await stripe.customers.retrieve(customer.id);
    expect(fetched.id).toBe(customer.id);
  });

  it('checkout.sessions.create in subscription mode records the nested body', async () => {
    const customer = await stripe.customers.create({ email: 'b@example.com' });
    const session = await stripe.checkout.sessions.create({
      mode: 'subscription',
      customer: customer.id,
      client_reference_id: 'user-2',
      line_items: [{ price: 'price_pro_monthly', quantity: 1 }],
      metadata: { userId: 'user-2' },
      success_url: 'https://app.test/billing/success?session_id={CHECKOUT_SESSION_ID}',
      cancel_url: 'https://app.test/billing/cancel',
    });

    expect(session.id).toMatch(/^cs_test_/);
    expect(session.url).toMatch(/^https:\/\/checkout\.stripe\.com\/c\/pay\/cs_test_/);
    expect(session).toMatchObject({
      object: 'checkout.session',
      mode: 'subscription',
      status: 'open',
      customer: customer.id,
      client_reference_id: 'user-2',
      subscription: null,
    });
    const request = fake.requests.find((r) => r.path === '/v1/checkout/sessions');
    expect(request?.body).toEqual({
      mode: 'subscription',
      customer: customer.id,
      client_reference_id: 'user-2',
      line_items: [{ price: 'price_pro_monthly', quantity: '1' }],
      metadata: { userId: 'user-2' },
      success_url: 'https://app.test/billing/success?session_id={CHECKOUT_SESSION_ID}',
      cancel_url: 'https://app.test/billing/cancel',
    });

    const { subscription } = fake.completeCheckout(session.id);
    const completed = await stripe.checkout.sessions.retrieve(session.id, {
      expand: ['subscription'],
    });
    expect(completed.status).toBe('complete');
    expect((completed.subscription as Stripe.Subscription).id).toBe(subscription.id);
  });

  it('rejects an unknown customer with a Stripe invalid_request_error', async () => {
    const error = await stripe.customers.retrieve('cus_missing').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(Stripe.errors.StripeInvalidRequestError);
    expect(error).toMatchObject({ statusCode: 404, code: 'resource_missing' });
  });

  it('subscriptions.retrieve returns a seeded subscription with the period on the item', async () => {
    const customer = fake.createCustomer({ email: 'c@example.com' });
    const periodEnd = Math.floor(Date.now() / 1000) + 7 * 24 * 3600;
    const seeded = fake.createSubscription({
      customer: customer.id,
      status: 'active',
      priceId: 'price_pro_monthly',
      currentPeriodEnd: periodEnd,
    });

    const sub = await stripe.subscriptions.retrieve(seeded.id);

    expect(sub.id).toMatch(/^sub_/);
    expect(sub).toMatchObject({ object: 'subscription', status: 'active', customer: customer.id });
    expect(sub.items.data[0]?.current_period_end).toBe(periodEnd);
    expect(sub.items.data[0]?.price.id).toBe('price_pro_monthly');
    expect('current_period_end' in sub).toBe(false);

    const updated = await stripe.subscriptions.update(seeded.id, { cancel_at_period_end: true });
    expect(updated.cancel_at_period_end).toBe(true);
    expect(updated.cancel_at).toBe(periodEnd);

    const listed = await stripe.subscriptions.list({ customer: customer.id });
    expect(listed.data.map((s) => s.id)).toEqual([seeded.id]);

    const canceled = await stripe.subscriptions.cancel(seeded.id);
    expect(canceled.status).toBe('canceled');
    expect((await stripe.subscriptions.list({ customer: customer.id })).data).toHaveLength(0);
  });

  it('billingPortal.sessions.create returns a portal URL', async () => {
    const customer = fake.createCustomer();
    const portal = await stripe.billingPortal.sessions.create({
      customer: customer.id,
      return_url: 'https://app.test/settings',
    });
    expect(portal.id).toMatch(/^bps_/);
    expect(portal.url).toMatch(/^https:\/\/billing\.stripe\.com\/p\/session\//);
    expect(portal).toMatchObject({
      object: 'billing_portal.session',
      customer: customer.id,
      return_url: 'https://app.test/settings',
    });
  });

  it('replays the same response for a repeated Idempotency-Key', async () => {
    const first = await stripe.customers.create(
      { email: 'i@example.com' },
      { idempotencyKey: 'k1' },
    );
    const second = await stripe.customers.create(
      { email: 'i@example.com' },
      { idempotencyKey: 'k1' },
    );
    expect(second.id).toBe(first.id);
    await expect(
      stripe.customers.create({ email: 'other@example.com' }, { idempotencyKey: 'k1' }),
    ).rejects.toBeInstanceOf(Stripe.errors.StripeIdempotencyError);
  });

  it('fake.event round-trips through webhooks.generateTestHeaderString + constructEvent', () => {
    const customer = fake.createCustomer();
    const subscription = fake.createSubscription({ customer: customer.id, status: 'active' });
    const event = fake.event('customer.subscription.updated', subscription, {
      previousAttributes: { status: 'incomplete' },
    });
    const secret = 'whsec_test_secret';
    const payload = JSON.stringify(event);
    const header = stripe.webhooks.generateTestHeaderString({ payload, secret });

    const parsed = stripe.webhooks.constructEvent(payload, header, secret);

    expect(parsed.id).toMatch(/^evt_/);
    expect(parsed).toMatchObject({
      object: 'event',
      type: 'customer.subscription.updated',
      livemode: false,
      pending_webhooks: 1,
      request: { id: null, idempotency_key: null },
      data: { object: { id: subscription.id, object: 'subscription' } },
    });
    const signed = fake.signEvent(event, secret);
    expect(
      stripe.webhooks.constructEvent(signed.payload, signed.headers['stripe-signature'], secret).id,
    ).toBe(event.id);
    expect(() => stripe.webhooks.constructEvent(payload, header, 'whsec_wrong')).toThrow(
      Stripe.errors.StripeSignatureVerificationError,
    );
  });
});
