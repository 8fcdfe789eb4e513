import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { BillingService } from '../../billing/billing-service.js';
import { rateLimitHeaders } from '../../billing/quota-service.js';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';
import { caller, type Protected } from '../plugins/auth.js';
import { bearer, errorResponses, isoDate, toIso, toIsoOrNull } from '../schemas.js';

/** Stripe events are usually a few KB; a subscription with many items can reach a few hundred. */
const WEBHOOK_BODY_LIMIT = 1024 * 1024;

const checkoutSchema = z
  .object({
    url: z.string().describe('Stripe Checkout page to send the user to'),
    sessionId: z.string().describe('Checkout Session id (`cs_…`)'),
  })
  .meta({ id: 'CheckoutSession' });

const usageSchema = z
  .object({
    used: z.number().int().describe('Prompts counted today (UTC)'),
    limit: z.number().int().nullable().describe('Prompts allowed per UTC day; null is unlimited'),
    remaining: z.number().int().nullable().describe('null when unlimited'),
    resetsAt: isoDate.describe('Next 00:00 UTC'),
  })
  .meta({ id: 'PromptUsage' });

const statusSchema = z
  .object({
    tier: z.enum(['basic', 'pro']),
    status: z
      .string()
      .nullable()
      .describe(
        "Stripe's status of the current subscription (active, trialing, past_due, canceled, …); null without one",
      ),
    currentPeriodEnd: isoDate.nullable(),
    cancelAtPeriodEnd: z.boolean(),
    usage: usageSchema,
  })
  .meta({ id: 'SubscriptionStatus' });

export const billingRoutes =
  (container: Container, authenticated: Protected): FastifyPluginAsyncZod =>
  async (app) => {
    const { config } = container;
    const billing = new BillingService({
      stripe: config.stripe,
      urls: config,
      db: container.database.db,
      users: container.users,
      quota: container.quota,
      clock: container.clock,
      logger: container.logger,
      tierOf: container.tierOf,
      tierFrom: container.tierFrom,
      limitFor: container.limitFor,
    });
    const tags = ['Subscription'];

    app.post(
      '/subscribe/pro',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'Start a Stripe Checkout for the Pro subscription',
          description:
            'Creates the Stripe customer on first use and a Checkout Session in subscription mode. Redirect the user to `url`; the tier changes when Stripe confirms the payment through the webhook. 409 when already Pro.',
          response: {
            201: checkoutSchema,
            ...errorResponses(
              'UNAUTHENTICATED',
              'CONFLICT',
              'RATE_LIMITED',
              'BAD_GATEWAY',
              'BILLING_NOT_CONFIGURED',
            ),
          },
        },
      },
      async (request, reply) => {
        const started = await billing.startCheckout(caller(request).userId);
        reply.code(201);
        return started;
      },
    );

    app.post(
      '/subscription/portal',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'A Stripe customer-portal URL (payment method, invoices, cancel)',
          description: '409 for a user who never started a checkout.',
          response: {
            200: z.object({ url: z.string() }).meta({ id: 'PortalSession' }),
            ...errorResponses(
              'UNAUTHENTICATED',
              'CONFLICT',
              'RATE_LIMITED',
              'BAD_GATEWAY',
              'BILLING_NOT_CONFIGURED',
            ),
          },
        },
      },
      async (request) => billing.portal(caller(request).userId),
    );

    app.get(
      '/subscription/status',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'Tier, subscription state and today’s prompt usage',
          description:
            'The tier comes from the subscriptions in the database (never from the token), as of the last committed change. Works without Stripe settings (everyone is Basic then). Carries the `X-RateLimit-*` headers of the daily quota.',
          response: {
            200: statusSchema,
            ...errorResponses('UNAUTHENTICATED', 'RATE_LIMITED', 'UNAVAILABLE'),
          },
        },
      },
      async (request, reply) => {
        const status = await billing.status(caller(request).userId);
        reply.headers(rateLimitHeaders(status.usage));
        return {
          tier: status.tier,
          status: status.status,
          currentPeriodEnd: toIsoOrNull(status.currentPeriodEnd),
          cancelAtPeriodEnd: status.cancelAtPeriodEnd,
          usage: {
            used: status.usage.used,
            limit: status.usage.limit,
            remaining: status.usage.remaining,
            resetsAt: toIso(status.usage.resetsAt),
          },
        };
      },
    );

    // Its own encapsulated context: the signature covers the exact bytes Stripe sent, so this
    // route alone takes JSON as a raw Buffer; every other route keeps the JSON parser.
    await app.register(async (webhook) => {
      webhook.addContentTypeParser(
        'application/json',
        { parseAs: 'buffer', bodyLimit: WEBHOOK_BODY_LIMIT },
        (_request, body, done) => done(null, body),
      );

      webhook.post(
        '/webhook/stripe',
        {
          bodyLimit: WEBHOOK_BODY_LIMIT,
          // Stripe's retries must never be refused; the signature is the gate.
          config: { rateLimit: false },
          schema: {
            tags: ['Webhook'],
            summary: 'Stripe webhook endpoint',
            description:
              'Verified against the raw body with `Stripe-Signature` (300 s tolerance); 400 VALIDATION_FAILED on a bad signature with nothing changed. Each event is applied once; the subscription is re-read from Stripe. Handles `checkout.session.completed`, `customer.subscription.created|updated|deleted`, `invoice.paid` and `invoice.payment_failed`; other events are acknowledged. A 5xx makes Stripe deliver again.',
            headers: z.looseObject({
              'stripe-signature': z.string().optional(),
            }),
            response: {
              200: z.object({ received: z.literal(true) }),
              ...errorResponses(
                'VALIDATION_FAILED',
                'UNSUPPORTED_MEDIA_TYPE',
                'INTERNAL',
                'BAD_GATEWAY',
                'BILLING_NOT_CONFIGURED',
              ),
            },
          },
        },
        async (request) => {
          const body = Buffer.isBuffer(request.body) ? request.body : Buffer.alloc(0);
          const signature = request.headers['stripe-signature'];
          const { webhookEvents } = container.metrics;
          let outcome: Awaited<ReturnType<typeof billing.handleWebhook>>;
          try {
            outcome = await billing.handleWebhook(
              body,
              typeof signature === 'string' ? signature : undefined,
            );
          } catch (error) {
            const rejected = error instanceof AppError && error.status < 500;
            webhookEvents.inc({ type: 'unknown', outcome: rejected ? 'rejected' : 'failed' });
            throw error;
          }
          webhookEvents.inc({
            type: outcome.type,
            outcome: outcome.duplicate ? 'duplicate' : 'processed',
          });
          request.log.info(outcome, 'stripe webhook processed');
          return { received: true as const };
        },
      );
    });
  };
