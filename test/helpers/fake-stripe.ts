import { randomBytes } from 'node:crypto';
import {
  createServer,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import Stripe from 'stripe';

export type PeriodEndLocation = 'item' | 'subscription' | 'both';

export interface FakeStripeOptions {
  /** Where `current_period_start`/`current_period_end` appear on subscriptions. Default 'item'. */
  periodEndLocation?: PeriodEndLocation;
}

export interface StripeRecordedRequest {
  method: string;
  /** Path without the query string, e.g. `/v1/checkout/sessions`. */
  path: string;
  /** Parsed query string (GET and DELETE carry their params here). */
  query: Record<string, unknown>;
  /** Parsed form body, nested (`line_items[0][price]` becomes `line_items: [{ price }]`); values stay strings. */
  body: Record<string, unknown>;
  rawBody: string;
  headers: IncomingHttpHeaders;
  receivedAt: number;
  status?: number;
}

export interface SeedSubscription {
  customer: string;
  status?: Stripe.Subscription.Status;
  priceId?: string;
  quantity?: number;
  /** Unix seconds. Default: 30 days from now. */
  currentPeriodEnd?: number;
  /** Unix seconds. Default: 30 days before currentPeriodEnd. */
  currentPeriodStart?: number;
  cancelAtPeriodEnd?: boolean;
  metadata?: Record<string, string>;
  id?: string;
}

/** Shallow patch; `current_period_*` are applied wherever `periodEndLocation` renders them. */
export type SubscriptionPatch = Partial<Omit<Stripe.Subscription, 'items' | 'id' | 'object'>> & {
  current_period_start?: number;
  current_period_end?: number;
  priceId?: string;
};

export interface InjectedError {
  status: number;
  type?: string;
  message?: string;
  code?: string;
  /** Sent as `Stripe-Should-Retry`; the SDK retries 5xx/409 by default (maxNetworkRetries 2). */
  shouldRetry?: boolean;
}

export interface FakeStripe {
  url: string;
  host: string;
  port: number;
  /** Pass to `new Stripe(key, { ...fake.stripeOptions })`. */
  stripeOptions: { host: string; port: number; protocol: 'http' };
  requests: StripeRecordedRequest[];
  setPeriodEndLocation(location: PeriodEndLocation): void;
  createCustomer(params?: {
    email?: string;
    name?: string;
    metadata?: Record<string, string>;
    id?: string;
  }): Stripe.Customer;
  createSubscription(seed: SeedSubscription): Stripe.Subscription;
  setSubscription(id: string, patch: SubscriptionPatch): Stripe.Subscription;
  getSubscription(id: string): Stripe.Subscription | undefined;
  getCustomer(id: string): Stripe.Customer | undefined;
  getCheckoutSession(id: string): Stripe.Checkout.Session | undefined;
  getInvoice(id: string): Stripe.Invoice | undefined;
  /** Completes a subscription-mode Checkout Session as if the customer paid. */
  completeCheckout(
    sessionId: string,
    opts?: { status?: Stripe.Subscription.Status; email?: string },
  ): { session: Stripe.Checkout.Session; subscription: Stripe.Subscription };
  expireCheckout(sessionId: string): Stripe.Checkout.Session;
  event(
    type: Stripe.Event.Type,
    object: object,
    opts?: { previousAttributes?: Record<string, unknown>; id?: string; created?: number },
  ): Stripe.Event;
  /** Serialises and signs an event as Stripe's webhook delivery would. */
  signEvent(
    event: Stripe.Event,
    secret: string,
  ): { payload: string; headers: { 'content-type': string; 'stripe-signature': string } };
  /** The next matching HTTP request fails with this error instead of being handled. */
  failNext(error: InjectedError, match?: { method?: string; path?: string | RegExp }): void;
  reset(): void;
  close(): Promise<void>;
}

type Obj = Record<string, unknown>;

class StripeHttpError extends Error {
  constructor(
    readonly status: number,
    readonly payload: Obj,
  ) {
    super(String(payload.message));
  }
}

const ALNUM = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

function randomAlnum(length: number): string {
  const bytes = randomBytes(length);
  let out = '';
  for (const byte of bytes) out += ALNUM[byte % ALNUM.length];
  return out;
}

const ids = {
  customer: () => `cus_${randomAlnum(14)}`,
  subscription: () => `sub_1${randomAlnum(23)}`,
  subscriptionItem: () => `si_${randomAlnum(14)}`,
  checkoutSession: () => `cs_test_a1${randomAlnum(56)}`,
  portalSession: () => `bps_1${randomAlnum(23)}`,
  portalConfiguration: () => `bpc_1${randomAlnum(23)}`,
  invoice: () => `in_1${randomAlnum(23)}`,
  invoiceLine: () => `il_1${randomAlnum(23)}`,
  lineItem: () => `li_1${randomAlnum(23)}`,
  product: () => `prod_${randomAlnum(14)}`,
  paymentMethod: () => `pm_1${randomAlnum(23)}`,
  event: () => `evt_1${randomAlnum(23)}`,
  request: () => `req_${randomAlnum(14)}`,
};

const now = () => Math.floor(Date.now() / 1000);
const DAY = 24 * 60 * 60;

/**
 * Parses Stripe's form encoding (`a[b][0][c]=v`, `expand[]=x`, `expand[0]=x`) into nested objects
 * and arrays. Values stay strings, as on the wire; `metadata` children are never turned into arrays.
 */
export function parseStripeForm(input: string): Record<string, unknown> {
  const root: Obj = {};
  for (const [key, value] of new URLSearchParams(input)) {
    const head = /^([^[\]]+)((?:\[[^\]]*\])*)$/.exec(key);
    const segments = head
      ? [head[1] ?? key, ...[...(head[2] ?? '').matchAll(/\[([^\]]*)\]/g)].map((m) => m[1] ?? '')]
      : [key];
    let cursor = root;
    segments.forEach((raw, i) => {
      const segment = raw === '' ? String(Object.keys(cursor).length) : raw;
      if (i === segments.length - 1) {
        cursor[segment] = value;
        return;
      }
      const next = cursor[segment];
      if (typeof next !== 'object' || next === null) cursor[segment] = {};
      cursor = cursor[segment] as Obj;
    });
  }
  const arrayify = (value: unknown, keepObject: boolean): unknown => {
    if (typeof value !== 'object' || value === null) return value;
    const obj = value as Obj;
    const keys = Object.keys(obj);
    const converted: Obj = {};
    for (const k of keys) converted[k] = arrayify(obj[k], k === 'metadata');
    if (!keepObject && keys.length > 0 && keys.every((k) => /^\d+$/.test(k))) {
      return keys.sort((a, b) => Number(a) - Number(b)).map((k) => converted[k]);
    }
    return converted;
  };
  return arrayify(root, true) as Obj;
}

function str(value: unknown): string | undefined {
  return typeof value === 'string' ? value : undefined;
}

function bool(value: unknown): boolean | undefined {
  if (value === 'true' || value === true) return true;
  if (value === 'false' || value === false) return false;
  return undefined;
}

function int(value: unknown): number | undefined {
  const n = typeof value === 'number' ? value : Number(str(value));
  return Number.isInteger(n) ? n : undefined;
}

function record(value: unknown): Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Obj) : {};
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function invalid(message: string, extra: Obj = {}, status = 400): StripeHttpError {
  return new StripeHttpError(status, { type: 'invalid_request_error', message, ...extra });
}

function missingParam(param: string): StripeHttpError {
  return invalid(`Missing required param: ${param}.`, {
    code: 'parameter_missing',
    param,
    doc_url: 'https://stripe.com/docs/error-codes/parameter-missing',
  });
}

function noSuch(kind: string, id: string, param = 'id', status = 404): StripeHttpError {
  return invalid(
    `No such ${kind}: '${id}'`,
    {
      code: 'resource_missing',
      param,
      doc_url: 'https://stripe.com/docs/error-codes/resource-missing',
    },
    status,
  );
}

function applyMetadata(target: Obj, patch: unknown) {
  if (patch === '') {
    target.metadata = {};
    return;
  }
  const metadata = { ...record(target.metadata) };
  for (const [k, v] of Object.entries(record(patch))) {
    if (v === '') delete metadata[k];
    else metadata[k] = String(v);
  }
  target.metadata = metadata;
}

function apiList(data: unknown[], url: string, hasMore = false): Obj {
  return { object: 'list', data, has_more: hasMore, url };
}

export async function startFakeStripe(options: FakeStripeOptions = {}): Promise<FakeStripe> {
  let periodEndLocation: PeriodEndLocation = options.periodEndLocation ?? 'item';
  const requests: StripeRecordedRequest[] = [];
  const customers = new Map<string, Obj>();
  const subscriptions = new Map<string, Obj>();
  const sessions = new Map<string, Obj>();
  const sessionLineItems = new Map<string, Obj[]>();
  const sessionSubscriptionData = new Map<string, Obj>();
  const invoices = new Map<string, Obj>();
  const prices = new Map<string, Obj>();
  const idempotency = new Map<
    string,
    { method: string; path: string; rawBody: string; status: number; payload: unknown }
  >();
  const injected: { error: InjectedError; method?: string; path?: string | RegExp }[] = [];
  const sockets = new Set<Socket>();
  let invoiceNumber = 1;

  const price = (id: string): Obj => {
    const existing = prices.get(id);
    if (existing) return existing;
    const created = now();
    const product = ids.product();
    const made: Obj = {
      id,
      object: 'price',
      active: true,
      billing_scheme: 'per_unit',
      created,
      currency: 'usd',
      custom_unit_amount: null,
      livemode: false,
      lookup_key: null,
      metadata: {},
      nickname: null,
      product,
      recurring: {
        interval: 'month',
        interval_count: 1,
        meter: null,
        trial_period_days: null,
        usage_type: 'licensed',
      },
      tax_behavior: 'unspecified',
      tiers_mode: null,
      transform_quantity: null,
      type: 'recurring',
      unit_amount: 999,
      unit_amount_decimal: '999',
    };
    prices.set(id, made);
    return made;
  };

  const planFor = (p: Obj): Obj => ({
    id: p.id,
    object: 'plan',
    active: true,
    amount: p.unit_amount,
    amount_decimal: p.unit_amount_decimal,
    billing_scheme: 'per_unit',
    created: p.created,
    currency: p.currency,
    interval: 'month',
    interval_count: 1,
    livemode: false,
    metadata: {},
    meter: null,
    nickname: null,
    product: p.product,
    tiers_mode: null,
    transform_usage: null,
    trial_period_days: null,
    usage_type: 'licensed',
  });

  const newCustomer = (params: Obj, id = ids.customer()): Obj => {
    const customer: Obj = {
      id,
      object: 'customer',
      address: null,
      balance: 0,
      created: now(),
      currency: null,
      default_source: null,
      delinquent: false,
      description: str(params.description) ?? null,
      discount: null,
      email: str(params.email) ?? null,
      invoice_prefix: randomBytes(4).toString('hex').toUpperCase(),
      invoice_settings: {
        custom_fields: null,
        default_payment_method: null,
        footer: null,
        rendering_options: null,
      },
      livemode: false,
      metadata: {},
      name: str(params.name) ?? null,
      next_invoice_sequence: 1,
      phone: str(params.phone) ?? null,
      preferred_locales: list(params.preferred_locales),
      shipping: null,
      tax_exempt: 'none',
      test_clock: null,
    };
    applyMetadata(customer, params.metadata);
    customers.set(id, customer);
    return customer;
  };

  const liveCustomer = (id: string, param = 'id', status = 404): Obj => {
    const customer = customers.get(id);
    if (!customer || customer.deleted) throw noSuch('customer', id, param, status);
    return customer;
  };

  const itemsOf = (sub: Obj): Obj[] => list(record(sub.items).data) as Obj[];

  const newInvoice = (sub: Obj, billingReason: string): Obj => {
    const id = ids.invoice();
    const item = itemsOf(sub)[0] ?? {};
    const p = record(item.price);
    const quantity = int(item.quantity) ?? 1;
    const amount = (int(p.unit_amount) ?? 0) * quantity;
    const customer = customers.get(String(sub.customer));
    const paid = sub.status === 'active' || sub.status === 'trialing';
    const created = now();
    const invoice: Obj = {
      id,
      object: 'invoice',
      account_country: 'US',
      account_name: 'Fake Stripe Account',
      amount_due: amount,
      amount_overpaid: 0,
      amount_paid: paid ? amount : 0,
      amount_remaining: paid ? 0 : amount,
      amount_shipping: 0,
      attempt_count: 1,
      attempted: true,
      billing_reason: billingReason,
      collection_method: 'charge_automatically',
      created,
      currency: p.currency ?? 'usd',
      customer: sub.customer,
      customer_email: customer?.email ?? null,
      customer_name: customer?.name ?? null,
      description: null,
      discounts: [],
      hosted_invoice_url: `https://invoice.stripe.com/i/acct_fake/test_${randomAlnum(40)}`,
      invoice_pdf: `https://pay.stripe.com/invoice/acct_fake/test_${randomAlnum(40)}/pdf`,
      lines: apiList(
        [
          {
            id: ids.invoiceLine(),
            object: 'line_item',
            amount,
            currency: p.currency ?? 'usd',
            description: `${quantity} × Fake product (at $${((int(p.unit_amount) ?? 0) / 100).toFixed(2)} / month)`,
            discount_amounts: [],
            discountable: true,
            discounts: [],
            invoice: id,
            livemode: false,
            metadata: {},
            parent: {
              type: 'subscription_item_details',
              invoice_item_details: null,
              subscription_item_details: {
                invoice_item: null,
                proration: false,
                proration_details: { credited_items: null },
                subscription: sub.id,
                subscription_item: item.id,
              },
            },
            period: { start: item.current_period_start, end: item.current_period_end },
            pricing: {
              type: 'price_details',
              price_details: { price: p.id, product: p.product },
              unit_amount_decimal: p.unit_amount_decimal,
            },
            quantity,
            taxes: [],
          },
        ],
        `/v1/invoices/${id}/lines`,
      ),
      livemode: false,
      metadata: {},
      number: `${String(customer?.invoice_prefix ?? 'FAKE')}-${String(invoiceNumber++).padStart(4, '0')}`,
      parent: {
        type: 'subscription_details',
        quote_details: null,
        subscription_details: { metadata: { ...record(sub.metadata) }, subscription: sub.id },
      },
      period_end: item.current_period_start,
      period_start: item.current_period_start,
      status: paid ? 'paid' : 'open',
      status_transitions: {
        finalized_at: created,
        marked_uncollectible_at: null,
        paid_at: paid ? created : null,
        voided_at: null,
      },
      subtotal: amount,
      total: amount,
      webhooks_delivered_at: created,
    };
    invoices.set(id, invoice);
    return invoice;
  };

  const setPeriod = (sub: Obj, start: number | undefined, end: number | undefined) => {
    for (const item of itemsOf(sub)) {
      if (start !== undefined) item.current_period_start = start;
      if (end !== undefined) item.current_period_end = end;
    }
  };

  const newSubscription = (seed: SeedSubscription): Obj => {
    const id = seed.id ?? ids.subscription();
    const end = seed.currentPeriodEnd ?? now() + 30 * DAY;
    const start = seed.currentPeriodStart ?? end - 30 * DAY;
    const p = price(seed.priceId ?? 'price_fake_default');
    const created = Math.min(start, now());
    const status = seed.status ?? 'active';
    const quantity = seed.quantity ?? 1;
    const sub: Obj = {
      id,
      object: 'subscription',
      application: null,
      application_fee_percent: null,
      automatic_tax: { disabled_reason: null, enabled: false, liability: null },
      billing_cycle_anchor: start,
      billing_cycle_anchor_config: null,
      billing_mode: { flexible: null, type: 'classic' },
      billing_thresholds: null,
      cancel_at: null,
      cancel_at_period_end: false,
      canceled_at: null,
      cancellation_details: { comment: null, feedback: null, reason: null },
      collection_method: 'charge_automatically',
      created,
      currency: p.currency,
      customer: seed.customer,
      customer_account: null,
      days_until_due: null,
      default_payment_method: status === 'incomplete' ? null : ids.paymentMethod(),
      default_source: null,
      default_tax_rates: [],
      description: null,
      discounts: [],
      ended_at: null,
      invoice_settings: { account_tax_ids: null, issuer: { type: 'self' } },
      items: {
        ...apiList(
          [
            {
              id: ids.subscriptionItem(),
              object: 'subscription_item',
              billing_thresholds: null,
              created,
              current_period_end: end,
              current_period_start: start,
              discounts: [],
              metadata: {},
              plan: planFor(p),
              price: p,
              quantity,
              subscription: id,
              tax_rates: [],
            },
          ],
          `/v1/subscription_items?subscription=${id}`,
        ),
        total_count: 1,
      },
      latest_invoice: null,
      livemode: false,
      metadata: { ...(seed.metadata ?? {}) },
      next_pending_invoice_item_invoice: null,
      on_behalf_of: null,
      pause_collection: null,
      payment_settings: {
        payment_method_options: null,
        payment_method_types: null,
        save_default_payment_method: 'off',
      },
      pending_invoice_item_interval: null,
      pending_setup_intent: null,
      pending_update: null,
      plan: planFor(p),
      quantity,
      schedule: null,
      start_date: created,
      status,
      test_clock: null,
      transfer_data: null,
      trial_end: status === 'trialing' ? end : null,
      trial_settings: { end_behavior: { missing_payment_method: 'create_invoice' } },
      trial_start: status === 'trialing' ? start : null,
    };
    if (status === 'canceled' || status === 'incomplete_expired') {
      sub.canceled_at = now();
      sub.ended_at = now();
    }
    if (seed.cancelAtPeriodEnd) setCancelAtPeriodEnd(sub, true);
    if (!customers.has(seed.customer)) newCustomer({}, seed.customer);
    subscriptions.set(id, sub);
    sub.latest_invoice = newInvoice(sub, 'subscription_create').id;
    return sub;
  };

  function setCancelAtPeriodEnd(sub: Obj, value: boolean) {
    sub.cancel_at_period_end = value;
    if (value) {
      sub.cancel_at = itemsOf(sub)[0]?.current_period_end ?? null;
      sub.canceled_at = now();
      sub.cancellation_details = {
        comment: null,
        feedback: null,
        reason: 'cancellation_requested',
      };
    } else {
      sub.cancel_at = null;
      sub.canceled_at = null;
      sub.cancellation_details = { comment: null, feedback: null, reason: null };
    }
  }

  const render = (obj: Obj): Obj => {
    const copy = structuredClone(obj);
    if (copy.object === 'subscription') {
      const first = itemsOf(copy)[0];
      if (periodEndLocation !== 'item' && first) {
        copy.current_period_start = first.current_period_start;
        copy.current_period_end = first.current_period_end;
      }
      if (periodEndLocation === 'subscription') {
        for (const item of itemsOf(copy)) {
          delete item.current_period_start;
          delete item.current_period_end;
        }
      }
    }
    return copy;
  };

  const lookup = (id: string): Obj | undefined => {
    if (id.startsWith('cus_')) return customers.get(id);
    if (id.startsWith('sub_')) return subscriptions.get(id);
    if (id.startsWith('in_')) return invoices.get(id);
    if (id.startsWith('cs_')) return sessions.get(id);
    if (id.startsWith('price_')) return prices.get(id);
    if (id.startsWith('prod_')) {
      return {
        id,
        object: 'product',
        active: true,
        created: now(),
        default_price: null,
        description: null,
        images: [],
        livemode: false,
        marketing_features: [],
        metadata: {},
        name: 'Fake product',
        package_dimensions: null,
        shippable: null,
        statement_descriptor: null,
        tax_code: null,
        type: 'service',
        unit_label: null,
        updated: now(),
        url: null,
      };
    }
    return undefined;
  };

  const lineItemsList = (sessionId: string): Obj =>
    apiList(
      (sessionLineItems.get(sessionId) ?? []).map((li) => structuredClone(li)),
      `/v1/checkout/sessions/${sessionId}/line_items`,
    );

  const expand = (obj: Obj, paths: unknown): Obj => {
    const walk = (target: unknown, segments: string[]) => {
      if (Array.isArray(target)) {
        for (const element of target) walk(element, segments);
        return;
      }
      if (typeof target !== 'object' || target === null) return;
      const t = target as Obj;
      const [field, ...rest] = segments;
      if (field === undefined) return;
      if (rest.length === 0) {
        if (field === 'line_items' && t.object === 'checkout.session') {
          t.line_items = lineItemsList(String(t.id));
          return;
        }
        const value = t[field];
        if (typeof value === 'string') {
          const found = lookup(value);
          if (found) t[field] = render(found);
        }
        return;
      }
      walk(t[field], rest);
    };
    for (const path of list(paths)) {
      if (typeof path === 'string') walk(obj, path.split('.'));
    }
    return obj;
  };

  const newCheckoutSession = (params: Obj): Obj => {
    const mode = str(params.mode);
    if (!mode) throw missingParam('mode');
    if (!['payment', 'setup', 'subscription'].includes(mode)) {
      throw invalid(`Invalid mode: must be one of payment, setup, or subscription`, {
        param: 'mode',
      });
    }
    const customerId = str(params.customer);
    if (customerId && params.customer_email !== undefined) {
      throw invalid('You may only specify one of these parameters: customer, customer_email.');
    }
    if (customerId) liveCustomer(customerId, 'customer', 400);
    const rawItems = list(params.line_items).map(record);
    if (mode !== 'setup' && rawItems.length === 0) {
      throw invalid(
        mode === 'subscription'
          ? 'You must provide at least one recurring price in `subscription` mode when using prices.'
          : 'You must specify either `line_items` or `price_data` in `payment` mode.',
        { param: 'line_items' },
      );
    }
    const id = ids.checkoutSession();
    const lineItems = rawItems.map((raw, i) => {
      const priceId = str(raw.price);
      if (!priceId) throw missingParam(`line_items[${i}][price]`);
      const p = price(priceId);
      const quantity = int(raw.quantity) ?? 1;
      const amount = (int(p.unit_amount) ?? 0) * quantity;
      return {
        id: ids.lineItem(),
        object: 'item',
        amount_discount: 0,
        amount_subtotal: amount,
        amount_tax: 0,
        amount_total: amount,
        currency: p.currency,
        description: 'Fake product',
        price: p,
        quantity,
      } as Obj;
    });
    const total = lineItems.reduce((sum, li) => sum + (int(li.amount_total) ?? 0), 0);
    const created = now();
    const customerEmail = str(params.customer_email) ?? null;
    const session: Obj = {
      id,
      object: 'checkout.session',
      adaptive_pricing: { enabled: mode === 'payment' },
      after_expiration: null,
      allow_promotion_codes: bool(params.allow_promotion_codes) ?? null,
      amount_subtotal: mode === 'setup' ? null : total,
      amount_total: mode === 'setup' ? null : total,
      automatic_tax: { enabled: false, liability: null, provider: null, status: null },
      billing_address_collection: str(params.billing_address_collection) ?? null,
      cancel_url: str(params.cancel_url) ?? null,
      client_reference_id: str(params.client_reference_id) ?? null,
      client_secret: null,
      collected_information: null,
      consent: null,
      consent_collection: null,
      created,
      currency: mode === 'setup' ? null : 'usd',
      currency_conversion: null,
      custom_fields: [],
      custom_text: {
        after_submit: null,
        shipping_address: null,
        submit: null,
        terms_of_service_acceptance: null,
      },
      customer: customerId ?? null,
      customer_account: null,
      customer_creation: customerId ? null : mode === 'payment' ? 'if_required' : 'always',
      customer_details: customerEmail
        ? {
            address: null,
            email: customerEmail,
            name: null,
            phone: null,
            tax_exempt: 'none',
            tax_ids: null,
          }
        : null,
      customer_email: customerEmail,
      discounts: [],
      expires_at: int(params.expires_at) ?? created + DAY,
      invoice: null,
      invoice_creation: null,
      livemode: false,
      locale: str(params.locale) ?? null,
      metadata: {},
      mode,
      origin_context: null,
      payment_intent: null,
      payment_link: null,
      payment_method_collection: mode === 'subscription' ? 'always' : null,
      payment_method_configuration_details: null,
      payment_method_options: { card: { request_three_d_secure: 'automatic' } },
      payment_method_types: ['card'],
      payment_status: mode === 'setup' ? 'no_payment_required' : 'unpaid',
      permissions: null,
      phone_number_collection: { enabled: false },
      recovered_from: null,
      saved_payment_method_options: customerId
        ? {
            allow_redisplay_filters: ['always'],
            payment_method_remove: 'disabled',
            payment_method_save: null,
          }
        : null,
      setup_intent: null,
      shipping_address_collection: null,
      shipping_cost: null,
      shipping_options: [],
      status: 'open',
      submit_type: null,
      subscription: null,
      success_url: str(params.success_url) ?? null,
      total_details: { amount_discount: 0, amount_shipping: 0, amount_tax: 0 },
      ui_mode: str(params.ui_mode) ?? 'hosted',
      url: `https://checkout.stripe.com/c/pay/${id}#fid${randomAlnum(40)}`,
      wallet_options: null,
    };
    applyMetadata(session, params.metadata);
    sessions.set(id, session);
    sessionLineItems.set(id, lineItems);
    sessionSubscriptionData.set(id, record(params.subscription_data));
    return session;
  };

  const updateSubscription = (sub: Obj, params: Obj) => {
    if (sub.status === 'canceled') {
      const allowed = ['metadata', 'cancellation_details', 'expand'];
      if (Object.keys(params).some((k) => !allowed.includes(k))) {
        throw invalid(
          'A canceled subscription can only update its cancellation_details and metadata.',
        );
      }
    }
    const cancelAtPeriodEnd = bool(params.cancel_at_period_end);
    if (cancelAtPeriodEnd !== undefined) setCancelAtPeriodEnd(sub, cancelAtPeriodEnd);
    if (params.cancel_at !== undefined) {
      const at = params.cancel_at === '' ? null : int(params.cancel_at);
      sub.cancel_at = at ?? null;
      sub.cancel_at_period_end = false;
      sub.canceled_at = at ? now() : null;
    }
    if (params.metadata !== undefined) applyMetadata(sub, params.metadata);
    if (params.cancellation_details !== undefined) {
      sub.cancellation_details = {
        ...record(sub.cancellation_details),
        ...record(params.cancellation_details),
      };
    }
    for (const key of ['default_payment_method', 'description'] as const) {
      if (params[key] !== undefined) sub[key] = params[key] === '' ? null : params[key];
    }
    if (params.pause_collection !== undefined) {
      sub.pause_collection = params.pause_collection === '' ? null : params.pause_collection;
    }
    const items = list(params.items).map(record);
    for (const change of items) {
      const current = itemsOf(sub).find((it) => it.id === change.id) ?? itemsOf(sub)[0];
      if (!current) continue;
      const priceId = str(change.price);
      if (priceId) {
        const p = price(priceId);
        current.price = p;
        current.plan = planFor(p);
        sub.plan = planFor(p);
      }
      const quantity = int(change.quantity);
      if (quantity !== undefined) {
        current.quantity = quantity;
        sub.quantity = quantity;
      }
    }
  };

  const cancelSubscription = (sub: Obj, params: Obj) => {
    if (sub.status === 'canceled') {
      throw invalid(
        'A canceled subscription can only update its cancellation_details and metadata.',
      );
    }
    const at = now();
    sub.status = 'canceled';
    sub.canceled_at = at;
    sub.ended_at = at;
    sub.cancel_at = null;
    sub.cancel_at_period_end = false;
    sub.cancellation_details = {
      comment: null,
      feedback: null,
      ...record(params.cancellation_details),
      reason: 'cancellation_requested',
    };
  };

  const listSubscriptions = (query: Obj): Obj => {
    const customer = str(query.customer);
    const status = str(query.status);
    const priceId = str(query.price);
    const limit = Math.min(Math.max(int(query.limit) ?? 10, 1), 100);
    let all = [...subscriptions.values()].reverse();
    all.sort((a, b) => (int(b.created) ?? 0) - (int(a.created) ?? 0));
    all = all.filter((s) => {
      if (customer && s.customer !== customer) return false;
      if (priceId && !itemsOf(s).some((it) => record(it.price).id === priceId)) return false;
      if (status === 'all') return true;
      if (status === 'ended') return s.status === 'canceled' || s.status === 'incomplete_expired';
      if (status) return s.status === status;
      return s.status !== 'canceled' && s.status !== 'incomplete_expired';
    });
    const after = str(query.starting_after);
    if (after) all = all.slice(all.findIndex((s) => s.id === after) + 1);
    const page = all.slice(0, limit);
    return apiList(page.map(render), '/v1/subscriptions', all.length > page.length);
  };

  const completeCheckout = (sessionId: string, opts: { status?: string; email?: string } = {}) => {
    const session = sessions.get(sessionId);
    if (!session) throw new Error(`fake-stripe: no checkout session ${sessionId}`);
    if (session.mode !== 'subscription') {
      throw new Error(
        `fake-stripe: completeCheckout supports subscription mode, got ${String(session.mode)}`,
      );
    }
    if (session.status !== 'open') {
      throw new Error(`fake-stripe: checkout session ${sessionId} is ${String(session.status)}`);
    }
    const email = opts.email ?? str(session.customer_email) ?? 'customer@example.com';
    const customerId = str(session.customer) ?? String(newCustomer({ email }).id);
    const firstItem = sessionLineItems.get(sessionId)?.[0];
    const subscriptionData = sessionSubscriptionData.get(sessionId) ?? {};
    const sub = newSubscription({
      customer: customerId,
      status: opts.status ?? 'active',
      priceId: str(record(firstItem?.price).id),
      quantity: int(firstItem?.quantity),
      metadata: record(subscriptionData.metadata) as Record<string, string>,
    });
    const paid = sub.status === 'active' || sub.status === 'trialing';
    Object.assign(session, {
      customer: customerId,
      customer_details: {
        address: null,
        email: customers.get(customerId)?.email ?? email,
        name: customers.get(customerId)?.name ?? null,
        phone: null,
        tax_exempt: 'none',
        tax_ids: [],
      },
      invoice: sub.latest_invoice,
      payment_status: paid ? 'paid' : 'unpaid',
      status: 'complete',
      subscription: sub.id,
      url: null,
    });
    return { session, sub };
  };

  type Handler = (ctx: { params: string[]; body: Obj; query: Obj }) => {
    status?: number;
    payload: Obj;
  };

  const routes: { method: string; pattern: RegExp; handler: Handler }[] = [
    {
      method: 'POST',
      pattern: /^\/v1\/customers$/,
      handler: ({ body }) => ({ payload: newCustomer(body) }),
    },
    {
      method: 'GET',
      pattern: /^\/v1\/customers$/,
      handler: ({ query }) => {
        const email = str(query.email);
        const limit = int(query.limit) ?? 10;
        const all = [...customers.values()]
          .filter((c) => !c.deleted && (!email || c.email === email))
          .reverse();
        return {
          payload: apiList(all.slice(0, limit), '/v1/customers', all.length > limit),
        };
      },
    },
    {
      method: 'GET',
      pattern: /^\/v1\/customers\/([^/]+)$/,
      handler: ({ params: [id = ''] }) => {
        const customer = customers.get(id);
        if (!customer) throw noSuch('customer', id);
        return { payload: customer };
      },
    },
    {
      method: 'POST',
      pattern: /^\/v1\/customers\/([^/]+)$/,
      handler: ({ params: [id = ''], body }) => {
        const customer = liveCustomer(id);
        for (const key of ['email', 'name', 'phone', 'description'] as const) {
          if (body[key] !== undefined) customer[key] = body[key] === '' ? null : body[key];
        }
        if (body.metadata !== undefined) applyMetadata(customer, body.metadata);
        return { payload: customer };
      },
    },
    {
      method: 'DELETE',
      pattern: /^\/v1\/customers\/([^/]+)$/,
      handler: ({ params: [id = ''] }) => {
        liveCustomer(id);
        const stub = { id, object: 'customer', deleted: true };
        customers.set(id, stub);
        return { payload: stub };
      },
    },
    {
      method: 'POST',
      pattern: /^\/v1\/checkout\/sessions$/,
      handler: ({ body }) => ({ payload: newCheckoutSession(body) }),
    },
    {
      method: 'GET',
      pattern: /^\/v1\/checkout\/sessions\/([^/]+)$/,
      handler: ({ params: [id = ''] }) => {
        const session = sessions.get(id);
        if (!session) throw noSuch('checkout.session', id);
        return { payload: session };
      },
    },
    {
      method: 'GET',
      pattern: /^\/v1\/checkout\/sessions\/([^/]+)\/line_items$/,
      handler: ({ params: [id = ''] }) => {
        if (!sessions.has(id)) throw noSuch('checkout.session', id);
        return { payload: lineItemsList(id) };
      },
    },
    {
      method: 'POST',
      pattern: /^\/v1\/checkout\/sessions\/([^/]+)\/expire$/,
      handler: ({ params: [id = ''] }) => {
        const session = sessions.get(id);
        if (!session) throw noSuch('checkout.session', id);
        if (session.status !== 'open') {
          throw invalid('Only Checkout Sessions with a status in ["open"] can be expired.');
        }
        Object.assign(session, { status: 'expired', url: null });
        return { payload: session };
      },
    },
    {
      method: 'GET',
      pattern: /^\/v1\/subscriptions$/,
      handler: ({ query }) => ({ payload: listSubscriptions(query) }),
    },
    {
      method: 'GET',
      pattern: /^\/v1\/subscriptions\/([^/]+)$/,
      handler: ({ params: [id = ''] }) => {
        const sub = subscriptions.get(id);
        if (!sub) throw noSuch('subscription', id);
        return { payload: sub };
      },
    },
    {
      method: 'POST',
      pattern: /^\/v1\/subscriptions\/([^/]+)$/,
      handler: ({ params: [id = ''], body }) => {
        const sub = subscriptions.get(id);
        if (!sub) throw noSuch('subscription', id);
        updateSubscription(sub, body);
        return { payload: sub };
      },
    },
    {
      method: 'DELETE',
      pattern: /^\/v1\/subscriptions\/([^/]+)$/,
      handler: ({ params: [id = ''], query }) => {
        const sub = subscriptions.get(id);
        if (!sub) throw noSuch('subscription', id);
        cancelSubscription(sub, query);
        return { payload: sub };
      },
    },
    {
      method: 'GET',
      pattern: /^\/v1\/invoices\/([^/]+)$/,
      handler: ({ params: [id = ''] }) => {
        const invoice = invoices.get(id);
        if (!invoice) throw noSuch('invoice', id);
        return { payload: invoice };
      },
    },
    {
      method: 'POST',
      pattern: /^\/v1\/billing_portal\/sessions$/,
      handler: ({ body }) => {
        const customer = str(body.customer);
        if (!customer) throw missingParam('customer');
        liveCustomer(customer, 'customer', 400);
        return {
          payload: {
            id: ids.portalSession(),
            object: 'billing_portal.session',
            configuration: str(body.configuration) ?? ids.portalConfiguration(),
            created: now(),
            customer,
            customer_account: null,
            flow: null,
            livemode: false,
            locale: str(body.locale) ?? null,
            on_behalf_of: null,
            return_url: str(body.return_url) ?? null,
            url: `https://billing.stripe.com/p/session/test_${randomAlnum(48)}`,
          },
        };
      },
    },
  ];

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) {
        send(
          res,
          500,
          { error: { type: 'api_error', message: `fake-stripe: ${String(err)}` } },
          {},
        );
      } else {
        res.destroy();
      }
    });
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  function send(
    res: ServerResponse,
    status: number,
    payload: unknown,
    extra: Record<string, string>,
  ) {
    const body = JSON.stringify(payload, null, 2);
    res.writeHead(status, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(body),
      'cache-control': 'no-cache, no-store',
      ...extra,
    });
    res.end(body);
  }

  async function handle(req: IncomingMessage, res: ServerResponse) {
    const parts: Buffer[] = [];
    for await (const chunk of req) parts.push(chunk as Buffer);
    const rawBody = Buffer.concat(parts).toString('utf8');
    const url = new URL(req.url ?? '/', 'http://fake-stripe');
    const method = req.method ?? 'GET';
    const entry: StripeRecordedRequest = {
      method,
      path: url.pathname,
      query: parseStripeForm(url.search.slice(1)),
      body: rawBody ? parseStripeForm(rawBody) : {},
      rawBody,
      headers: req.headers,
      receivedAt: Date.now(),
    };
    requests.push(entry);

    const requestId = ids.request();
    const headers: Record<string, string> = {
      'request-id': requestId,
      'original-request': requestId,
      'stripe-version': String(req.headers['stripe-version'] ?? Stripe.API_VERSION),
    };
    const idempotencyKey = str(req.headers['idempotency-key']);
    if (idempotencyKey) headers['idempotency-key'] = idempotencyKey;
    const reply = (status: number, payload: unknown) => {
      entry.status = status;
      send(res, status, payload, headers);
    };

    const auth = str(req.headers.authorization);
    if (!auth || !/^Bearer (sk|rk)_\w+/.test(auth)) {
      reply(401, {
        error: {
          type: 'invalid_request_error',
          message: auth
            ? `Invalid API Key provided: ${auth.replace(/^Bearer /, '').slice(0, 8)}***`
            : "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.",
        },
      });
      return;
    }

    const injectedIndex = injected.findIndex(
      (inj) =>
        (!inj.method || inj.method.toUpperCase() === method) &&
        (!inj.path ||
          (typeof inj.path === 'string' ? inj.path === url.pathname : inj.path.test(url.pathname))),
    );
    if (injectedIndex >= 0) {
      const [{ error }] = injected.splice(injectedIndex, 1) as [{ error: InjectedError }];
      if (error.shouldRetry !== undefined)
        headers['stripe-should-retry'] = String(error.shouldRetry);
      const payload: Obj = {
        type: error.type ?? (error.status >= 500 ? 'api_error' : 'invalid_request_error'),
        message: error.message ?? 'Injected error from fake-stripe.',
      };
      if (error.code) payload.code = error.code;
      reply(error.status, { error: payload });
      return;
    }

    if (method === 'POST' && idempotencyKey) {
      const previous = idempotency.get(idempotencyKey);
      if (previous) {
        if (
          previous.method !== method ||
          previous.path !== url.pathname ||
          previous.rawBody !== rawBody
        ) {
          reply(400, {
            error: {
              type: 'idempotency_error',
              message: `Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '${idempotencyKey}' if you meant to execute a different request.`,
            },
          });
          return;
        }
        headers['idempotent-replayed'] = 'true';
        reply(previous.status, previous.payload);
        return;
      }
    }

    let matched: { handler: Handler; params: string[] } | undefined;
    for (const route of routes) {
      const m = route.pattern.exec(url.pathname);
      if (m && route.method === method) {
        matched = { handler: route.handler, params: m.slice(1).map(decodeURIComponent) };
        break;
      }
    }
    if (!matched) {
      reply(404, {
        error: {
          type: 'invalid_request_error',
          message: `Unrecognized request URL (${method}: ${url.pathname}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.`,
        },
      });
      return;
    }

    try {
      const { status = 200, payload } = matched.handler({
        params: matched.params,
        body: entry.body,
        query: entry.query,
      });
      const expandPaths = method === 'POST' ? entry.body.expand : entry.query.expand;
      const rendered = expand(render(payload), expandPaths);
      if (method === 'POST' && idempotencyKey) {
        idempotency.set(idempotencyKey, {
          method,
          path: url.pathname,
          rawBody,
          status,
          payload: rendered,
        });
      }
      reply(status, rendered);
    } catch (err) {
      if (!(err instanceof StripeHttpError)) throw err;
      reply(err.status, {
        error: {
          ...err.payload,
          request_log_url: `https://dashboard.stripe.com/test/logs/${requestId}?t=${now()}`,
        },
      });
    }
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const host = '127.0.0.1';

  const asSubscription = (sub: Obj) => render(sub) as unknown as Stripe.Subscription;
  const asSession = (session: Obj) => render(session) as unknown as Stripe.Checkout.Session;

  return {
    url: `http://${host}:${port}`,
    host,
    port,
    stripeOptions: { host, port, protocol: 'http' },
    requests,
    setPeriodEndLocation(location) {
      periodEndLocation = location;
    },
    createCustomer(params = {}) {
      return render(newCustomer(params, params.id)) as unknown as Stripe.Customer;
    },
    createSubscription(seed) {
      return asSubscription(newSubscription(seed));
    },
    setSubscription(id, patch) {
      const sub = subscriptions.get(id);
      if (!sub) throw new Error(`fake-stripe: no subscription ${id}`);
      const { current_period_start, current_period_end, priceId, ...rest } = patch;
      Object.assign(sub, rest);
      setPeriod(sub, current_period_start, current_period_end);
      if (priceId) updateSubscription(sub, { items: [{ price: priceId }] });
      return asSubscription(sub);
    },
    getSubscription(id) {
      const sub = subscriptions.get(id);
      return sub ? asSubscription(sub) : undefined;
    },
    getCustomer(id) {
      const customer = customers.get(id);
      return customer ? (render(customer) as unknown as Stripe.Customer) : undefined;
    },
    getCheckoutSession(id) {
      const session = sessions.get(id);
      return session ? asSession(session) : undefined;
    },
    getInvoice(id) {
      const invoice = invoices.get(id);
      return invoice ? (render(invoice) as unknown as Stripe.Invoice) : undefined;
    },
    completeCheckout(sessionId, opts) {
      const { session, sub } = completeCheckout(sessionId, opts);
      return { session: asSession(session), subscription: asSubscription(sub) };
    },
    expireCheckout(sessionId) {
      const session = sessions.get(sessionId);
      if (!session) throw new Error(`fake-stripe: no checkout session ${sessionId}`);
      Object.assign(session, { status: 'expired', url: null });
      return asSession(session);
    },
    event(type, object, opts = {}) {
      const data: Obj = { object: structuredClone(object) };
      if (opts.previousAttributes) data.previous_attributes = opts.previousAttributes;
      return {
        id: opts.id ?? ids.event(),
        object: 'event',
        api_version: Stripe.API_VERSION,
        created: opts.created ?? now(),
        data,
        livemode: false,
        pending_webhooks: 1,
        request: { id: null, idempotency_key: null },
        type,
      } as unknown as Stripe.Event;
    },
    signEvent(event, secret) {
      const payload = JSON.stringify(event, null, 2);
      const signature = Stripe.webhooks.generateTestHeaderString({ payload, secret });
      return {
        payload,
        headers: {
          'content-type': 'application/json; charset=utf-8',
          'stripe-signature': signature,
        },
      };
    },
    failNext(error, match = {}) {
      injected.push({ error, ...match });
    },
    reset() {
      requests.length = 0;
      for (const map of [
        customers,
        subscriptions,
        sessions,
        sessionLineItems,
        sessionSubscriptionData,
        invoices,
        prices,
        idempotency,
      ]) {
        map.clear();
      }
      injected.length = 0;
    },
    close() {
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
        server.closeAllConnections();
      });
    },
  };
}
