import type { FastifyInstance } from 'fastify';
import type { Metrics } from '../../lib/metrics.js';

/** The Prometheus scrape endpoint (request durations are observed in `request-lifecycle.ts`). */
export function registerMetricsRoute(app: FastifyInstance, metrics: Metrics) {
  app.get('/metrics', { schema: { hide: true } }, async (_request, reply) => {
    reply.type(metrics.registry.contentType);
    return metrics.registry.metrics();
  });
}
