import type { FastifyInstance } from 'fastify';
import type { Metrics } from '../../lib/metrics.js';
import { API_SECURITY_HEADERS } from './security-headers.js';

/**
 * What every request gets, in one hook per stage: each hook Fastify runs costs a step of its
 * hook runner on every request, so the request id, the security headers, shutdown handling and
 * the duration metric share hooks instead of taking one each.
 */
export function registerRequestLifecycle(app: FastifyInstance, metrics: Metrics) {
  const headers = Object.entries(API_SECURITY_HEADERS);
  app.addHook('onRequest', (request, reply, done) => {
    reply.header('x-request-id', request.id);
    for (const [name, value] of headers) reply.header(name, value);
    done();
  });

  // While shutting down, responses to in-flight requests close their keep-alive connection, so
  // the server can finish closing as soon as they are sent.
  let closing = false;
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close');
    done(null, payload);
  });

  app.addHook('onResponse', (request, reply, done) => {
    metrics.httpDuration.observe(
      {
        method: request.method,
        // The route template keeps the label set small; unknown routes share one label.
        route: request.routeOptions.url ?? 'unmatched',
        status: String(reply.statusCode),
      },
      reply.elapsedTime / 1000,
    );
    done();
  });
}
