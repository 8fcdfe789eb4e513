import Stripe from 'stripe';
import type { Config } from '../config.js';

/**
 * The API version our code and webhook handling are written against (the one stripe 23.x pins).
 * In this version the period end lives on subscription items and an invoice names its
 * subscription under `parent.subscription_details`; billing-service reads the older places too.
 */
export const STRIPE_API_VERSION = '2026-10-28.endive';

/** Per-request timeout; the SDK retries network errors, 409 and 5xx answers on top of it. */
const TIMEOUT_MS = 10_000;

export type StripeSettings = NonNullable<Config['stripe']>;

/** The Stripe SDK client for our account; `apiBase` points it at a stand-in (tests, local mocks). */
export function createStripeClient(settings: StripeSettings): Stripe {
  return new Stripe(settings.secretKey, {
    apiVersion: STRIPE_API_VERSION,
    maxNetworkRetries: 2,
    timeout: TIMEOUT_MS,
    telemetry: false,
    appInfo: { name: 'gemini-chat' },
    ...(settings.apiBase ? endpoint(settings.apiBase) : {}),
  });
}

function endpoint(apiBase: string): { host: string; port: number; protocol: 'http' | 'https' } {
  const url = new URL(apiBase);
  const protocol = url.protocol === 'http:' ? 'http' : 'https';
  return {
    // `[::1]` in a URL is `::1` to the HTTP client.
    host: url.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: url.port ? Number(url.port) : protocol === 'http' ? 80 : 443,
    protocol,
  };
}
