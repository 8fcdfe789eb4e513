import { eq } from 'drizzle-orm';
import type { Response } from 'light-my-request';
import Stripe from 'stripe';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { stripeEvents, subscriptions, users } from '../src/db/schema/index.js';
import { controlledClock, expectError } from './helpers/assertions.js';
import { createRoom, sendMessage } from './helpers/chat.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { type FakeStripe, startFakeStripe } from './helpers/fake-stripe.js';
import { itRejectsBadTokens, type SignedInUser, signIn } from './helpers/users.js';

const WEBHOOK_SECRET = 'whsec_test_0123456789abcdefghijklmnopqrstuv';
const PRICE_ID = 'price_pro_monthly';
const GRACE_DAYS = 3;
const DAY_MS = 86_400_000;

describe('billing with Stripe', () => {
  let fake: FakeStripe;
  let ctx: TestContext;
  const time = controlledClock(new Date());

  beforeAll(async () => {
    fake = await startFakeStripe();
    ctx = await createTestContext({
      clock: time.clock,
      env: {
        STRIPE_SECRET_KEY: 'sk_test_fake_key',
        STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
        STRIPE_PRICE_ID: PRICE_ID,
        STRIPE_API_BASE: fake.url,
        PAST_DUE_GRACE_DAYS: String(GRACE_DAYS),
      },
    });
  });
  afterAll(async () => {
    await ctx?.close();
    await fake?.close();
  });
  afterEach(() => {
    time.set(new Date());
    fake.setPeriodEndLocation('item');
  });

  const db = () => ctx.container.database.db;

  const deliver = (event: Stripe.Event, secret = WEBHOOK_SECRET) => {
    const signed = fake.signEvent(event, secret);
    return ctx.app.inject({
      method: 'POST',
      url: '/webhook/stripe',
      headers: signed.headers,
      payload: signed.payload,
    });
  };

  const status = async (user: SignedInUser) => {
    const res = await ctx.app.inject({
      method: 'GET',
      url: '/subscription/status',
      headers: user.headers,
    });
    expect(res.statusCode, res.body).toBe(200);
    return res.json();
  };

  const subscribe = (user: SignedInUser) =>
    ctx.app.inject({ method: 'POST', url: '/subscribe/pro', headers: user.headers });

  const storedCustomer = async (userId: string) => {
    const [row] = await db()
      .select({ customer: users.stripeCustomerId })
      .from(users)
      .where(eq(users.id, userId));
    return row?.customer ?? null;
  };

  const eventRows = (id: string) => db().select().from(stripeEvents).where(eq(stripeEvents.id, id));
  const subscriptionRows = (userId: string) =>
    db().select().from(subscriptions).where(eq(subscriptions.userId, userId));
  const retrievals = (subscriptionId: string) =>
    fake.requests.filter(
      (r) => r.method === 'GET' && r.path === `/v1/subscriptions/${subscriptionId}`,
    ).length;

  /** Checkout through our API, paid in the fake, confirmed by a signed webhook. */
  const upgrade = async (user: SignedInUser) => {
    const res = await subscribe(user);
    expect(res.statusCode, res.body).toBe(201);
    const { session, subscription } = fake.completeCheckout(res.json().sessionId);
    const delivered = await deliver(fake.event('checkout.session.completed', session));
    expect(delivered.statusCode, delivered.body).toBe(200);
    return subscription;
  };

  /** A user with a Stripe customer of ours (through a checkout that is left open). */
  const customerOf = async (user: SignedInUser) => {
    expect((await subscribe(user)).statusCode).toBe(201);
    const customer = await storedCustomer(user.id);
    expect(customer).toMatch(/^cus_/);
    return customer as string;
  };

  const itemPeriodEnd = (subscription: Stripe.Subscription) =>
    new Date((subscription.items.data[0]?.current_period_end ?? 0) * 1000);

  describe('POST /subscribe/pro', () => {
    it('creates the customer once and a subscription-mode Checkout Session for the price', async () => {
      const user = await signIn(ctx.app);
      const res = await subscribe(user);
      expect(res.statusCode, res.body).toBe(201);
      const body = res.json();
      expect(body).toEqual({
        url: expect.stringMatching(/^https:\/\/checkout\.stripe\.com\//),
        sessionId: expect.stringMatching(/^cs_test_/),
      });

      const customer = await storedCustomer(user.id);
      expect(customer).toMatch(/^cus_/);
      const created = fake.requests.find(
        (r) =>
          r.method === 'POST' &&
          r.path === '/v1/checkout/sessions' &&
          r.body.client_reference_id === user.id,
      );
      expect(created?.body).toMatchObject({
        mode: 'subscription',
        customer,
        line_items: [{ price: PRICE_ID, quantity: '1' }],
        client_reference_id: user.id,
        metadata: { userId: user.id },
        subscription_data: { metadata: { userId: user.id } },
      });
      expect(fake.getCheckoutSession(body.sessionId)).toMatchObject({
        mode: 'subscription',
        customer,
        status: 'open',
      });
      expect(fake.getCustomer(customer as string)?.metadata).toEqual({ userId: user.id });

      const again = await subscribe(user);
      expect(again.statusCode).toBe(201);
      expect(again.json().sessionId).not.toBe(body.sessionId);
      expect(await storedCustomer(user.id)).toBe(customer);
      const customerCreates = fake.requests.filter(
        (r) =>
          r.method === 'POST' &&
          r.path === '/v1/customers' &&
          (r.body.metadata as { userId?: string } | undefined)?.userId === user.id,
      );
      expect(customerCreates).toHaveLength(1);
    });

    it('makes one Stripe customer when first checkouts run concurrently', async () => {
      const user = await signIn(ctx.app);
      const results = await Promise.all(Array.from({ length: 6 }, () => subscribe(user)));
      for (const res of results) expect(res.statusCode, res.body).toBe(201);
      const customer = await storedCustomer(user.id);
      const sessions = fake.requests.filter(
        (r) =>
          r.method === 'POST' &&
          r.path === '/v1/checkout/sessions' &&
          r.body.client_reference_id === user.id,
      );
      expect(sessions).toHaveLength(6);
      expect(new Set(sessions.map((r) => r.body.customer))).toEqual(new Set([customer]));
    });

    it('answers 409 to a user who is already Pro', async () => {
      const user = await signIn(ctx.app);
      await upgrade(user);
      expectError(await subscribe(user), 409, 'CONFLICT');
    });

    it('answers 502 when Stripe fails, and nothing is stored', async () => {
      const user = await signIn(ctx.app);
      fake.failNext(
        { status: 500, shouldRetry: false, message: 'boom' },
        { method: 'POST', path: '/v1/customers' },
      );
      expectError(await subscribe(user), 502, 'BAD_GATEWAY');
      expect(await storedCustomer(user.id)).toBeNull();
    });
  });

  describe('upgrade', () => {
    it('turns a Basic user who used up the day into Pro, so a 6th prompt is accepted', async () => {
      const user = await signIn(ctx.app);
      const room = await createRoom(ctx.app, user);
      for (let i = 0; i < 5; i++) {
        expect((await sendMessage(ctx.app, user, room.id, `prompt ${i}`)).statusCode).toBe(202);
      }
      expectError(await sendMessage(ctx.app, user, room.id, 'sixth'), 429, 'QUOTA_EXCEEDED');
      expect(await status(user)).toMatchObject({
        tier: 'basic',
        status: null,
        usage: { used: 5, limit: 5, remaining: 0 },
      });

      const subscription = await upgrade(user);

      expect(await status(user)).toEqual({
        tier: 'pro',
        status: 'active',
        currentPeriodEnd: itemPeriodEnd(subscription).toISOString(),
        cancelAtPeriodEnd: false,
        usage: { used: 5, limit: null, remaining: null, resetsAt: expect.any(String) },
      });
      const sixth = await sendMessage(ctx.app, user, room.id, 'sixth');
      expect(sixth.statusCode, sixth.body).toBe(202);
      expect(sixth.headers['x-ratelimit-limit']).toBe('unlimited');
      const me = await ctx.app.inject({ method: 'GET', url: '/user/me', headers: user.headers });
      expect(me.json().tier).toBe('pro');

      const [row] = await subscriptionRows(user.id);
      expect(row).toMatchObject({
        id: subscription.id,
        customerId: await storedCustomer(user.id),
        status: 'active',
        priceId: PRICE_ID,
        pastDueSince: null,
      });
      expect(row?.stripeUpdatedAt).toBeInstanceOf(Date);
    });
  });

  describe('POST /webhook/stripe', () => {
    it('processes an event delivered three times once', async () => {
      const user = await signIn(ctx.app);
      const res = await subscribe(user);
      const { session, subscription } = fake.completeCheckout(res.json().sessionId);
      const event = fake.event('checkout.session.completed', session);

      const concurrent = await Promise.all([deliver(event), deliver(event)]);
      const late = await deliver(event);
      for (const delivery of [...concurrent, late]) {
        expect(delivery.statusCode, delivery.body).toBe(200);
        expect(delivery.json()).toEqual({ received: true });
      }
      expect(await eventRows(event.id)).toHaveLength(1);
      expect(retrievals(subscription.id)).toBe(1);
      expect(await subscriptionRows(user.id)).toHaveLength(1);
      expect((await status(user)).tier).toBe('pro');
    });

    it('ends in the right state when `deleted` arrives before `created`', async () => {
      const user = await signIn(ctx.app);
      const customer = await customerOf(user);
      const created = fake.createSubscription({
        customer,
        priceId: PRICE_ID,
        metadata: { userId: user.id },
      });
      const at = Math.floor(Date.now() / 1000);
      const canceled = fake.setSubscription(created.id, {
        status: 'canceled',
        canceled_at: at,
        ended_at: at,
      });
      const createdEvent = fake.event('customer.subscription.created', created, {
        created: at - 60,
      });
      const deletedEvent = fake.event('customer.subscription.deleted', canceled, { created: at });

      expect((await deliver(deletedEvent)).statusCode).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'basic', status: 'canceled' });
      expect((await deliver(createdEvent)).statusCode).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'basic', status: 'canceled' });
      expect(await subscriptionRows(user.id)).toHaveLength(1);
    });

    it('trusts the re-read from Stripe over a stale event snapshot', async () => {
      const user = await signIn(ctx.app);
      const subscription = await upgrade(user);
      // An old `updated` event saying canceled, while Stripe says the subscription is active.
      const stale = fake.event('customer.subscription.updated', {
        ...subscription,
        status: 'canceled',
      });
      expect((await deliver(stale)).statusCode).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'pro', status: 'active' });
    });

    it('ignores a Stripe read older than the state already stored', async () => {
      const user = await signIn(ctx.app);
      const subscription = await upgrade(user);
      // A write from a later read (e.g. by another instance) is already stored.
      const later = new Date(Date.now() + 3_600_000);
      await db()
        .update(subscriptions)
        .set({ stripeUpdatedAt: later })
        .where(eq(subscriptions.id, subscription.id));
      const canceled = fake.setSubscription(subscription.id, { status: 'canceled' });
      expect(
        (await deliver(fake.event('customer.subscription.deleted', canceled))).statusCode,
      ).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'pro', status: 'active' });
      const [row] = await subscriptionRows(user.id);
      expect(row?.stripeUpdatedAt?.getTime()).toBe(later.getTime());
    });

    it('refuses a tampered body, a wrong secret and a 10-minute-old timestamp, changing nothing', async () => {
      const user = await signIn(ctx.app);
      const res = await subscribe(user);
      const { session, subscription } = fake.completeCheckout(res.json().sessionId);
      const event = fake.event('checkout.session.completed', session);
      const genuine = fake.signEvent(event, WEBHOOK_SECRET);
      const post = (payload: string, headers: Record<string, string>) =>
        ctx.app.inject({ method: 'POST', url: '/webhook/stripe', headers, payload });

      const tampered = genuine.payload.replace('"livemode": false', '"livemode": true');
      expect(tampered).not.toBe(genuine.payload);
      const wrongSecret = fake.signEvent(event, 'whsec_someone_elses_secret_0123456789');
      const old = Stripe.webhooks.generateTestHeaderString({
        payload: genuine.payload,
        secret: WEBHOOK_SECRET,
        timestamp: Math.floor(Date.now() / 1000) - 600,
      });
      const attempts: Array<[string, Promise<Response>]> = [
        ['tampered body', post(tampered, genuine.headers)],
        ['wrong secret', post(wrongSecret.payload, wrongSecret.headers)],
        [
          '10-minute-old timestamp',
          post(genuine.payload, { ...genuine.headers, 'stripe-signature': old }),
        ],
        ['no signature', post(genuine.payload, { 'content-type': 'application/json' })],
      ];
      for (const [name, attempt] of attempts) {
        const refused = await attempt;
        expect(refused.statusCode, name).toBe(400);
        expectError(refused, 400, 'VALIDATION_FAILED');
      }

      expect(await eventRows(event.id)).toHaveLength(0);
      expect(await subscriptionRows(user.id)).toHaveLength(0);
      expect(retrievals(subscription.id)).toBe(0);
      expect(await status(user)).toMatchObject({ tier: 'basic', status: null });

      // The genuine delivery of the same event still goes through.
      expect((await post(genuine.payload, genuine.headers)).statusCode).toBe(200);
      expect((await status(user)).tier).toBe('pro');
    });

    it('acknowledges and records an event type it does not handle', async () => {
      const event = fake.event('customer.created', fake.createCustomer({ email: 'x@example.com' }));
      const before = fake.requests.length;
      const res = await deliver(event);
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json()).toEqual({ received: true });
      expect(await eventRows(event.id)).toMatchObject([{ type: 'customer.created' }]);
      expect(fake.requests.length).toBe(before);
    });

    it('acknowledges a subscription that belongs to no user of ours', async () => {
      const stranger = fake.createSubscription({
        customer: 'cus_NotOneOfOurs1',
        priceId: PRICE_ID,
      });
      const res = await deliver(fake.event('customer.subscription.created', stranger));
      expect(res.statusCode).toBe(200);
      const rows = await db().select().from(subscriptions).where(eq(subscriptions.id, stranger.id));
      expect(rows).toHaveLength(0);
    });

    it('answers 5xx and rolls the event back when Stripe cannot be read, so a retry applies it', async () => {
      const user = await signIn(ctx.app);
      const customer = await customerOf(user);
      const subscription = fake.createSubscription({ customer, priceId: PRICE_ID });
      const event = fake.event('customer.subscription.created', subscription);
      fake.failNext(
        { status: 500, shouldRetry: false, message: 'Stripe is having a bad day' },
        { method: 'GET', path: `/v1/subscriptions/${subscription.id}` },
      );

      const failed = await deliver(event);
      expect(failed.statusCode).toBeGreaterThanOrEqual(500);
      expectError(failed, 502, 'BAD_GATEWAY');
      expect(await eventRows(event.id)).toHaveLength(0);
      expect(await subscriptionRows(user.id)).toHaveLength(0);

      const retried = await deliver(event);
      expect(retried.statusCode, retried.body).toBe(200);
      expect(await eventRows(event.id)).toHaveLength(1);
      expect(await status(user)).toMatchObject({ tier: 'pro', status: 'active' });
    });

    for (const location of ['item', 'subscription', 'both'] as const) {
      it(`reads the period end from the ${location === 'both' ? 'subscription and its items' : location}`, async () => {
        fake.setPeriodEndLocation(location);
        const user = await signIn(ctx.app);
        const periodEnd = Math.floor(Date.now() / 1000) + 17 * 86_400 + 1234;
        const subscription = fake.createSubscription({
          customer: `cus_Loc${location}${Math.floor(Math.random() * 1e9)}`,
          priceId: PRICE_ID,
          currentPeriodEnd: periodEnd,
          metadata: { userId: user.id },
        });
        const rendered = fake.getSubscription(subscription.id) as unknown as Record<
          string,
          unknown
        > & { items: { data: Array<Record<string, unknown>> } };
        expect('current_period_end' in rendered).toBe(location !== 'item');
        expect('current_period_end' in (rendered.items.data[0] ?? {})).toBe(
          location !== 'subscription',
        );

        expect(
          (await deliver(fake.event('customer.subscription.created', subscription))).statusCode,
        ).toBe(200);
        expect(await status(user)).toMatchObject({
          tier: 'pro',
          currentPeriodEnd: new Date(periodEnd * 1000).toISOString(),
        });
      });
    }
  });

  describe('cancellation and failed payments', () => {
    it('keeps Pro until the end of a period cancelled at period end, then Basic', async () => {
      const user = await signIn(ctx.app);
      const subscription = await upgrade(user);
      const periodEnd = itemPeriodEnd(subscription);
      const updated = fake.setSubscription(subscription.id, {
        cancel_at_period_end: true,
        cancel_at: Math.floor(periodEnd.getTime() / 1000),
      });
      const res = await deliver(
        fake.event('customer.subscription.updated', updated, {
          previousAttributes: { cancel_at_period_end: false },
        }),
      );
      expect(res.statusCode).toBe(200);
      expect(await status(user)).toMatchObject({
        tier: 'pro',
        status: 'active',
        cancelAtPeriodEnd: true,
        currentPeriodEnd: periodEnd.toISOString(),
      });

      time.set(new Date(periodEnd.getTime() - 60_000));
      expect((await status(user)).tier).toBe('pro');

      // The period is over: Basic even before Stripe's `deleted` event arrives.
      time.set(new Date(periodEnd.getTime() + 1000));
      expect((await status(user)).tier).toBe('basic');

      const at = Math.floor(periodEnd.getTime() / 1000);
      const ended = fake.setSubscription(subscription.id, {
        status: 'canceled',
        cancel_at_period_end: false,
        ended_at: at,
      });
      expect((await deliver(fake.event('customer.subscription.deleted', ended))).statusCode).toBe(
        200,
      );
      expect(await status(user)).toMatchObject({
        tier: 'basic',
        status: 'canceled',
        cancelAtPeriodEnd: false,
      });
      time.set(new Date());
      expect((await status(user)).tier).toBe('basic');
    });

    it('moves to past_due on invoice.payment_failed and keeps Pro only within the grace period', async () => {
      const start = new Date();
      time.set(start);
      const user = await signIn(ctx.app);
      const subscription = await upgrade(user);
      const pastDue = fake.setSubscription(subscription.id, { status: 'past_due' });
      const invoice = fake.getInvoice(pastDue.latest_invoice as string);
      expect(invoice).toBeDefined();
      const failed = { ...invoice, status: 'open', amount_paid: 0 } as Stripe.Invoice;

      expect((await deliver(fake.event('invoice.payment_failed', failed))).statusCode).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'pro', status: 'past_due' });
      const [row] = await subscriptionRows(user.id);
      expect(row?.pastDueSince?.getTime()).toBe(start.getTime());

      // Stripe's retry fails again two days later: the grace period still counts from the first.
      time.set(new Date(start.getTime() + 2 * DAY_MS));
      expect((await deliver(fake.event('invoice.payment_failed', failed))).statusCode).toBe(200);
      expect((await status(user)).tier).toBe('pro');
      const [kept] = await subscriptionRows(user.id);
      expect(kept?.pastDueSince?.getTime()).toBe(start.getTime());

      time.set(new Date(start.getTime() + GRACE_DAYS * DAY_MS - 60_000));
      expect((await status(user)).tier).toBe('pro');
      time.set(new Date(start.getTime() + GRACE_DAYS * DAY_MS + 60_000));
      expect(await status(user)).toMatchObject({ tier: 'basic', status: 'past_due' });

      // The customer pays; this invoice names its subscription the pre-2025 way.
      fake.setSubscription(subscription.id, { status: 'active' });
      const { parent: _parent, ...legacy } = { ...invoice, status: 'paid' };
      const paid = { ...legacy, subscription: subscription.id } as unknown as Stripe.Invoice;
      expect((await deliver(fake.event('invoice.paid', paid))).statusCode).toBe(200);
      expect(await status(user)).toMatchObject({ tier: 'pro', status: 'active' });
      const [recovered] = await subscriptionRows(user.id);
      expect(recovered?.pastDueSince).toBeNull();
    });
  });

  describe('POST /subscription/portal', () => {
    it('answers 409 before the first checkout, then a portal URL for the customer', async () => {
      const user = await signIn(ctx.app);
      const portal = () =>
        ctx.app.inject({ method: 'POST', url: '/subscription/portal', headers: user.headers });
      expectError(await portal(), 409, 'CONFLICT');

      await upgrade(user);
      const res = await portal();
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json()).toEqual({
        url: expect.stringMatching(/^https:\/\/billing\.stripe\.com\//),
      });
      const request = fake.requests.findLast((r) => r.path === '/v1/billing_portal/sessions');
      expect(request?.body).toMatchObject({
        customer: await storedCustomer(user.id),
        return_url: ctx.config.portalReturnUrl,
      });
    });
  });

  describe('authentication', () => {
    let user: SignedInUser;
    beforeAll(async () => {
      user = await signIn(ctx.app);
    });
    itRejectsBadTokens(
      () => ({ app: ctx.app, config: ctx.config, user }),
      [
        { method: 'POST', url: '/subscribe/pro' },
        { method: 'POST', url: '/subscription/portal' },
        { method: 'GET', url: '/subscription/status' },
      ],
    );
  });
});

describe('billing without Stripe settings', () => {
  let ctx: TestContext;
  beforeAll(async () => {
    ctx = await createTestContext();
  });
  afterAll(async () => ctx?.close());

  it('answers 503 BILLING_NOT_CONFIGURED on billing routes while the rest works', async () => {
    expect(ctx.config.stripe).toBeUndefined();
    const user = await signIn(ctx.app);
    for (const url of ['/subscribe/pro', '/subscription/portal']) {
      expectError(
        await ctx.app.inject({ method: 'POST', url, headers: user.headers }),
        503,
        'BILLING_NOT_CONFIGURED',
      );
    }
    const webhook = await ctx.app.inject({
      method: 'POST',
      url: '/webhook/stripe',
      headers: { 'content-type': 'application/json', 'stripe-signature': 't=1,v1=abc' },
      payload: JSON.stringify({ id: 'evt_1', type: 'customer.created' }),
    });
    expectError(webhook, 503, 'BILLING_NOT_CONFIGURED');

    const room = await createRoom(ctx.app, user);
    const sent = await sendMessage(ctx.app, user, room.id, 'hello without billing');
    expect(sent.statusCode, sent.body).toBe(202);

    const res = await ctx.app.inject({
      method: 'GET',
      url: '/subscription/status',
      headers: user.headers,
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json()).toEqual({
      tier: 'basic',
      status: null,
      currentPeriodEnd: null,
      cancelAtPeriodEnd: false,
      usage: { used: 1, limit: 5, remaining: 4, resetsAt: expect.any(String) },
    });
    expect(res.headers['x-ratelimit-remaining']).toBe('4');
  });

  it('keeps JSON parsing on other routes (the raw parser is the webhook’s alone)', async () => {
    const bad = await ctx.app.inject({
      method: 'POST',
      url: '/auth/send-otp',
      headers: { 'content-type': 'application/json' },
      payload: '{not json',
    });
    expectError(bad, 400, 'MALFORMED_REQUEST');
  });
});
