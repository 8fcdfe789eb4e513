import rateLimit from '@fastify/rate-limit';
import type { FastifyInstance } from 'fastify';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';
import { LeasedRateLimitStore } from './rate-limit-store.js';

/**
 * Request rate limits in Redis (shared by every API instance): per user on signed-in routes, per
 * client IP elsewhere. The check runs after the route's token check (see Protected), so it knows
 * the user. Counting takes numbers from Redis in runs (see LeasedRateLimitStore).
 */
export async function registerRateLimit(app: FastifyInstance, container: Container) {
  const { rateLimit: limits } = container.config;
  await app.register(rateLimit, {
    global: true,
    hook: 'onRequest',
    // The plugin constructs the store itself.
    store: LeasedRateLimitStore.on(container.redis, container.keys.key('rate', '')),
    timeWindow: 60_000,
    max: (request) => (request.auth ? limits.userPerMinute : limits.publicPerMinute),
    keyGenerator: (request) => (request.auth ? `u:${request.auth.userId}` : `ip:${request.ip}`),
    // A Redis outage surfaces as 503 from the error handler rather than letting traffic through.
    skipOnError: false,
    // X-RateLimit-* describe the daily prompt quota (on message routes); the request limiter
    // only speaks up when it refuses, with Retry-After.
    addHeadersOnExceeding: {
      'x-ratelimit-limit': false,
      'x-ratelimit-remaining': false,
      'x-ratelimit-reset': false,
    },
    addHeaders: {
      'x-ratelimit-limit': false,
      'x-ratelimit-remaining': false,
      'x-ratelimit-reset': false,
      'retry-after': true,
    },
    errorResponseBuilder: (_request, context) =>
      new AppError({
        code: 'RATE_LIMITED',
        message: `Too many requests; retry in ${Math.ceil(context.ttl / 1000)} seconds`,
        retryAfter: Math.ceil(context.ttl / 1000),
        details: { limit: context.max },
      }),
  });
}
