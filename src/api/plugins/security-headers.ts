import type { FastifyInstance } from 'fastify';
import helmet, { type HelmetOptions } from 'helmet';

/**
 * The security headers of every API response, which is JSON and never a page: the set of OWASP's
 * REST Security Cheat Sheet. Nothing may load, frame or sniff it, and nothing stores it. Helmet's
 * other headers (COOP, Origin-Agent-Cluster, DNS prefetch, download options...) govern HTML
 * documents; they go on the pages only (see `registerDocumentHeaders`). Each header costs a
 * validation on every response, so the API sends only the ones that mean something for it.
 */
export const API_SECURITY_HEADERS: Readonly<Record<string, string>> = {
  'cache-control': 'no-store',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
};

/**
 * Helmet's headers for HTML documents, worked out once. Helmet is Express-style middleware that
 * rebuilds and re-parses its whole configuration on every call (as @fastify/helmet calls it, per
 * request); the headers never change, so they are read off one run of it at start-up.
 */
export function documentSecurityHeaders(options: HelmetOptions): Record<string, string> {
  const headers: Record<string, string> = {};
  const response = {
    setHeader(name: string, value: string | number) {
      headers[name.toLowerCase()] = String(value);
    },
    removeHeader() {},
  };
  helmet(options)({} as never, response as never, () => {});
  return headers;
}

/**
 * Pages (the playground, the reference, the queue dashboard) registered in `scope` get helmet's
 * document headers in place of the API's, and their own caching.
 */
export function registerDocumentHeaders(scope: FastifyInstance, options: HelmetOptions) {
  const headers = documentSecurityHeaders(options);
  scope.addHook('onRequest', (_request, reply, done) => {
    reply.removeHeader('cache-control');
    reply.headers(headers);
    done();
  });
}
