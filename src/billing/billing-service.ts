import { and, eq, isNull, sql } from 'drizzle-orm';
import Stripe from 'stripe';
import type { Config } from '../config.js';
import type { Database, Tx } from '../db/client.js';
import { type SubscriptionRow, stripeEvents, subscriptions, users } from '../db/schema/index.js';
import type { Clock } from '../lib/clock.js';
import { AppError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { UserRepository } from '../users/user-repository.js';
import type { QuotaService, Usage } from './quota-service.js';
import { createStripeClient, type StripeSettings } from './stripe-client.js';
import { loadSubscriptions, type Tier } from './tier.js';

/** Stripe's webhook timestamp tolerance: older signatures are refused (replay protection). */
export const WEBHOOK_TOLERANCE_SECONDS = 300;

/** Statuses under which a subscription can still grant Pro (see tierOf). */
const LIVE_STATUSES = new Set(['active', 'trialing', 'past_due']);

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export interface BillingServiceOptions {
  /** Stripe settings; undefined turns billing off (BILLING_NOT_CONFIGURED). */
  stripe: StripeSettings | undefined;
  /** The SDK client; default: one made from `stripe` (see createStripeClient). */
  client?: Stripe;
  urls: Pick<Config, 'checkoutSuccessUrl' | 'checkoutCancelUrl' | 'portalReturnUrl'>;
  db: Database;
  users: UserRepository;
  quota: QuotaService;
  clock: Clock;
  logger: Logger;
  /** The user's tier, from their subscriptions in the database (see findWithSubscriptions). */
  tierOf(userId: string): Promise<Tier>;
  /** The tier that subscription rows give now (see `tierOf` in tier.ts). */
  tierFrom(rows: SubscriptionRow[]): Tier;
  /** Daily prompt limit of a tier; null is unlimited. */
  limitFor(tier: Tier): number | null;
}

export interface CheckoutStarted {
  url: string;
  sessionId: string;
}

export interface SubscriptionStatus {
  tier: Tier;
  /** Stripe's status of the user's current subscription; null when they never subscribed. */
  status: string | null;
  currentPeriodEnd: Date | null;
  cancelAtPeriodEnd: boolean;
  usage: Usage;
}

/** A webhook's outcome, and whose account it changed. */
type Applied = WebhookOutcome & { userId?: string };

export interface WebhookOutcome {
  eventId: string;
  type: string;
  /** The event id was already recorded: nothing was done. */
  duplicate: boolean;
  /** The subscription written, when the event named one that belongs to a user of ours. */
  subscriptionId?: string;
}

/** Where an event points: the subscription to re-read, and hints naming its user. */
interface SubscriptionRef {
  id: string;
  userHints: Array<string | null | undefined>;
  /** The event's own copy, used only if Stripe no longer knows the subscription. */
  snapshot?: Stripe.Subscription;
}

/**
 * Stripe Checkout subscriptions and the webhook that mirrors them into PostgreSQL. Every event is
 * verified against the raw body, recorded once in `stripe_events` in the same transaction as its
 * effects, and the subscription is re-read from Stripe rather than taken from the event, so events
 * arriving late, twice or out of order all converge on Stripe's current state.
 */
export class BillingService {
  private readonly client: Stripe | undefined;

  constructor(private readonly o: BillingServiceOptions) {
    this.client = o.client ?? (o.stripe ? createStripeClient(o.stripe) : undefined);
  }

  get configured(): boolean {
    return this.client !== undefined && this.o.stripe !== undefined;
  }

  /**
   * Starts a Stripe Checkout for Pro. Creates the user's Stripe customer on first use (at most
   * one, even under concurrent calls). CONFLICT when the user is already Pro.
   */
  async startCheckout(userId: string): Promise<CheckoutStarted> {
    const { client, settings } = this.stripe();
    if ((await this.o.tierOf(userId)) === 'pro') {
      throw new AppError({
        code: 'CONFLICT',
        message: 'You are already subscribed to Pro; manage it through /subscription/portal',
        details: { tier: 'pro', manage: '/subscription/portal' },
      });
    }
    const customer = await this.ensureCustomer(client, userId);
    const session = await this.call('start a checkout', () =>
      client.checkout.sessions.create({
        mode: 'subscription',
        customer,
        line_items: [{ price: settings.priceId, quantity: 1 }],
        client_reference_id: userId,
        metadata: { userId },
        subscription_data: { metadata: { userId } },
        success_url: this.o.urls.checkoutSuccessUrl,
        cancel_url: this.o.urls.checkoutCancelUrl,
      }),
    );
    if (!session.url) {
      throw new AppError({ code: 'BAD_GATEWAY', message: 'Stripe returned no checkout URL' });
    }
    return { url: session.url, sessionId: session.id };
  }

  /** A Stripe customer-portal URL (manage payment, cancel). CONFLICT before the first checkout. */
  async portal(userId: string): Promise<{ url: string }> {
    const { client } = this.stripe();
    const user = await this.o.users.findById(userId);
    if (!user) throw accountGone();
    if (!user.stripeCustomerId) {
      throw new AppError({
        code: 'CONFLICT',
        message: 'There is no billing account to manage yet; subscribe through /subscribe/pro',
        details: { subscribe: '/subscribe/pro' },
      });
    }
    const customer = user.stripeCustomerId;
    const session = await this.call('open the customer portal', () =>
      client.billingPortal.sessions.create({ customer, return_url: this.o.urls.portalReturnUrl }),
    );
    return { url: session.url };
  }

  /**
   * Verifies and applies one webhook delivery. A bad signature (or a timestamp older than 300 s)
   * is VALIDATION_FAILED and changes nothing; any failure while applying rolls the whole event
   * back (its id included) and throws, so the 5xx makes Stripe deliver it again.
   */
  async handleWebhook(
    rawBody: Buffer,
    signatureHeader: string | undefined,
  ): Promise<WebhookOutcome> {
    const { client, settings } = this.stripe();
    const event = this.verify(client, settings, rawBody, signatureHeader);
    const applied = await this.o.db.transaction(async (tx): Promise<Applied> => {
      const recorded = await tx
        .insert(stripeEvents)
        .values({ id: event.id, type: event.type, stripeCreatedAt: new Date(event.created * 1000) })
        .onConflictDoNothing({ target: stripeEvents.id })
        .returning({ id: stripeEvents.id });
      const outcome: WebhookOutcome = { eventId: event.id, type: event.type, duplicate: false };
      if (recorded.length === 0) return { ...outcome, duplicate: true };
      const ref = subscriptionRefOf(event);
      if (!ref) return outcome;
      const written = await this.sync(tx, client, ref, event);
      return written ? { ...outcome, ...written } : outcome;
    });
    const { userId, ...outcome } = applied;
    // The tier changes on the user's next request, whichever instance serves it.
    if (userId) this.o.users.accountChanged(userId);
    return outcome;
  }

  /** Tier, the current subscription as Stripe last told us, and today's prompt usage. */
  async status(userId: string): Promise<SubscriptionStatus> {
    // The tier from the very rows shown beside it, so the two always agree.
    const rows = await loadSubscriptions(this.o.db, userId);
    const tier = this.o.tierFrom(rows);
    const current = rows.find((row) => LIVE_STATUSES.has(row.status)) ?? rows[0];
    return {
      tier,
      status: current?.status ?? null,
      currentPeriodEnd: current?.currentPeriodEnd ?? null,
      cancelAtPeriodEnd: current?.cancelAtPeriodEnd ?? false,
      usage: await this.o.quota.current(userId, this.o.limitFor(tier)),
    };
  }

  private stripe(): { client: Stripe; settings: StripeSettings } {
    if (!this.client || !this.o.stripe) {
      throw new AppError({
        code: 'BILLING_NOT_CONFIGURED',
        message:
          'Billing is not set up on this server (STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET and STRIPE_PRICE_ID)',
      });
    }
    return { client: this.client, settings: this.o.stripe };
  }

  private verify(
    client: Stripe,
    settings: StripeSettings,
    rawBody: Buffer,
    signatureHeader: string | undefined,
  ): Stripe.Event {
    const refuse = (reason: string) =>
      new AppError({
        code: 'VALIDATION_FAILED',
        message: `Stripe webhook refused: ${reason}`,
        details: { issues: [{ field: 'headers.stripe-signature', message: reason }] },
      });
    if (!signatureHeader) throw refuse('no Stripe-Signature header');
    try {
      return client.webhooks.constructEvent(
        rawBody,
        signatureHeader,
        settings.webhookSecret,
        WEBHOOK_TOLERANCE_SECONDS,
      );
    } catch (error) {
      this.o.logger.warn({ err: (error as Error).message }, 'stripe webhook signature refused');
      throw refuse('the signature does not match the body, or its timestamp is too old');
    }
  }

  /**
   * Re-reads the subscription from Stripe and upserts it. Returns its id, or undefined when it
   * belongs to no user of ours (acknowledged: no retry could change that).
   */
  private async sync(
    tx: Tx,
    client: Stripe,
    ref: SubscriptionRef,
    event: Stripe.Event,
  ): Promise<{ subscriptionId: string; userId?: string } | undefined> {
    // Serialises deliveries about one subscription, so the last writer holds the latest read.
    await tx.execute(
      sql`select pg_advisory_xact_lock(hashtextextended(${`stripe-subscription:${ref.id}`}, 0))`,
    );
    const read = await this.retrieve(client, ref);
    if (!read) return undefined;
    const { subscription, readAt } = read;
    const customerId = idOf(subscription.customer);
    const userId = await this.resolveUser(tx, customerId, [
      subscription.metadata?.userId,
      ...ref.userHints,
    ]);
    if (!userId) {
      this.o.logger.warn(
        { eventId: event.id, subscriptionId: subscription.id },
        'stripe subscription belongs to no known user; ignored',
      );
      return undefined;
    }

    const [existing] = await tx
      .select()
      .from(subscriptions)
      .where(eq(subscriptions.id, subscription.id));
    if (existing?.stripeUpdatedAt && existing.stripeUpdatedAt > readAt) {
      this.o.logger.info(
        { eventId: event.id, subscriptionId: subscription.id },
        'stripe read older than the stored state; ignored',
      );
      return { subscriptionId: subscription.id };
    }

    const now = this.o.clock.now();
    const currentPeriodEnd = periodEndOf(subscription);
    const values = {
      userId: existing?.userId ?? userId,
      customerId,
      status: subscription.status,
      priceId: subscription.items?.data?.[0]?.price?.id ?? null,
      currentPeriodEnd,
      cancelAtPeriodEnd: cancelsAtPeriodEnd(subscription, currentPeriodEnd),
      pastDueSince: pastDueSince(subscription.status, existing, now),
      stripeUpdatedAt: readAt,
      updatedAt: now,
    };
    await tx
      .insert(subscriptions)
      .values({ id: subscription.id, ...values })
      .onConflictDoUpdate({
        target: subscriptions.id,
        set: values,
        setWhere: sql`${subscriptions.stripeUpdatedAt} is null or ${subscriptions.stripeUpdatedAt} <= ${readAt}`,
      });
    this.o.logger.info(
      {
        eventId: event.id,
        type: event.type,
        subscriptionId: subscription.id,
        userId: values.userId,
        status: subscription.status,
      },
      'stripe subscription synced',
    );
    return { subscriptionId: subscription.id, userId: values.userId };
  }

  private async retrieve(
    client: Stripe,
    ref: SubscriptionRef,
  ): Promise<{ subscription: Stripe.Subscription; readAt: Date } | undefined> {
    try {
      const subscription = await client.subscriptions.retrieve(ref.id);
      // Stripe's own clock dates the read, so reads made by different API instances compare.
      const date = subscription.lastResponse?.headers?.date;
      const parsed = date ? new Date(date) : undefined;
      const readAt = parsed && !Number.isNaN(parsed.getTime()) ? parsed : new Date();
      return { subscription, readAt };
    } catch (error) {
      if (error instanceof Stripe.errors.StripeError && error.statusCode === 404) {
        if (ref.snapshot) {
          return { subscription: ref.snapshot, readAt: new Date(0) };
        }
        this.o.logger.warn({ subscriptionId: ref.id }, 'stripe does not know this subscription');
        return undefined;
      }
      throw upstream('read the subscription', error);
    }
  }

  /** Our user for a subscription: the customer we stored, else the ids our metadata carries. */
  private async resolveUser(
    tx: Tx,
    customerId: string,
    hints: Array<string | null | undefined>,
  ): Promise<string | undefined> {
    const [owner] = await tx
      .select({ id: users.id })
      .from(users)
      .where(eq(users.stripeCustomerId, customerId));
    if (owner) return owner.id;
    for (const hint of hints) {
      if (!hint || !UUID.test(hint)) continue;
      const user = await this.o.users.findById(hint, tx);
      if (user) return user.id;
    }
    return undefined;
  }

  /** The user's Stripe customer, created once: an idempotency key and a conditional update. */
  private async ensureCustomer(client: Stripe, userId: string): Promise<string> {
    const user = await this.o.users.findById(userId);
    if (!user) throw accountGone();
    if (user.stripeCustomerId) return user.stripeCustomerId;
    // Concurrent first checkouts send the same key, so Stripe creates one customer (keys live
    // 24 hours; the conditional update below settles anything later).
    const customer = await this.call('create the customer', () =>
      client.customers.create(
        { phone: user.mobile, metadata: { userId } },
        { idempotencyKey: `gemini-chat-customer-${userId}` },
      ),
    );
    const [stored] = await this.o.db
      .update(users)
      .set({ stripeCustomerId: customer.id, updatedAt: new Date() })
      .where(and(eq(users.id, userId), isNull(users.stripeCustomerId)))
      .returning({ stripeCustomerId: users.stripeCustomerId });
    if (stored?.stripeCustomerId) return stored.stripeCustomerId;
    const winner = await this.o.users.findById(userId);
    if (!winner) throw accountGone();
    return winner.stripeCustomerId ?? customer.id;
  }

  private async call<T>(what: string, run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (error) {
      this.o.logger.error({ err: error }, `stripe: could not ${what}`);
      throw upstream(what, error);
    }
  }
}

function upstream(what: string, error: unknown): AppError {
  return new AppError({
    code: 'BAD_GATEWAY',
    message: `Stripe could not ${what}; try again shortly`,
    retryAfter: 5,
    cause: error,
  });
}

const accountGone = () =>
  new AppError({ code: 'UNAUTHENTICATED', message: 'The account no longer exists' });

function idOf(value: string | { id: string } | null | undefined): string {
  if (!value) return '';
  return typeof value === 'string' ? value : value.id;
}

/** The subscription an event is about, or undefined for events we only acknowledge. */
export function subscriptionRefOf(event: Stripe.Event): SubscriptionRef | undefined {
  switch (event.type) {
    case 'checkout.session.completed': {
      const session = event.data.object;
      if (session.mode !== 'subscription' || !session.subscription) return undefined;
      return {
        id: idOf(session.subscription),
        userHints: [session.metadata?.userId, session.client_reference_id],
      };
    }
    case 'customer.subscription.created':
    case 'customer.subscription.updated':
    case 'customer.subscription.deleted': {
      const subscription = event.data.object;
      return { id: subscription.id, userHints: [], snapshot: subscription };
    }
    case 'invoice.paid':
    case 'invoice.payment_failed': {
      const id = invoiceSubscriptionId(event.data.object);
      return id ? { id, userHints: [] } : undefined;
    }
    default:
      return undefined;
  }
}

/**
 * The invoice's subscription: `parent.subscription_details.subscription` in current API
 * versions, `subscription` on the invoice itself before 2025-03-31.
 */
export function invoiceSubscriptionId(invoice: Stripe.Invoice): string | undefined {
  const current = invoice.parent?.subscription_details?.subscription;
  const legacy = (invoice as { subscription?: string | { id: string } | null }).subscription;
  return idOf(current ?? legacy) || undefined;
}

/**
 * The end of the paid period: on the subscription before API version 2025-03-31, on its items
 * since (the latest item end when items differ).
 */
export function periodEndOf(subscription: Stripe.Subscription): Date | null {
  const legacy = (subscription as { current_period_end?: number | null }).current_period_end;
  if (typeof legacy === 'number') return new Date(legacy * 1000);
  const ends = (subscription.items?.data ?? [])
    .map((item) => (item as { current_period_end?: number | null }).current_period_end)
    .filter((end): end is number => typeof end === 'number');
  return ends.length > 0 ? new Date(Math.max(...ends) * 1000) : null;
}

/** Set to cancel at period end, either by the flag or by a `cancel_at` within the period. */
function cancelsAtPeriodEnd(subscription: Stripe.Subscription, periodEnd: Date | null): boolean {
  if (subscription.cancel_at_period_end) return true;
  const cancelAt = subscription.cancel_at;
  return (
    subscription.status !== 'canceled' &&
    typeof cancelAt === 'number' &&
    periodEnd !== null &&
    cancelAt * 1000 <= periodEnd.getTime()
  );
}

/**
 * Start of the past-due grace period: the moment we first saw the subscription past due (kept
 * across later reads), cleared when it is anything else.
 */
function pastDueSince(
  status: string,
  existing: Pick<SubscriptionRow, 'status' | 'pastDueSince'> | undefined,
  now: Date,
): Date | null {
  if (status !== 'past_due') return null;
  if (existing?.status === 'past_due' && existing.pastDueSince) {
    return existing.pastDueSince < now ? existing.pastDueSince : now;
  }
  return now;
}
