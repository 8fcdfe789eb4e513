import { timingSafeEqual } from 'node:crypto';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';
import { sendError } from './errors.js';

export const ADMIN_PREFIX = '/admin/queues';

function sameSecret(given: string, expected: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** Accepts `Authorization: Bearer <ADMIN_TOKEN>` or HTTP Basic with the token as password. */
function presentedToken(request: FastifyRequest): string | undefined {
  const header = request.headers.authorization ?? '';
  const bearer = /^Bearer (.+)$/i.exec(header);
  if (bearer?.[1]) return bearer[1].trim();
  const basic = /^Basic (.+)$/i.exec(header);
  if (basic?.[1]) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    return decoded.slice(decoded.indexOf(':') + 1);
  }
  return undefined;
}

/**
 * The queue dashboard (Bull Board), only when ADMIN_TOKEN is set; otherwise the path is an
 * ordinary 404. Browsers get a Basic-auth prompt (any user name, the token as password).
 */
export async function registerAdmin(app: FastifyInstance, container: Container) {
  const token = container.config.adminToken;
  if (!token) return;
  const serverAdapter = new FastifyAdapter();
  serverAdapter.setBasePath(ADMIN_PREFIX);
  createBullBoard({
    queues: [
      new BullMQAdapter(container.replyQueue, { readOnlyMode: false }),
      new BullMQAdapter(container.maintenanceQueue, { readOnlyMode: true }),
    ],
    serverAdapter,
  });
  await app.register(async (scope) => {
    // Answered here rather than thrown: the dashboard plugin has an error handler of its own.
    scope.addHook('onRequest', async (request, reply) => {
      const given = presentedToken(request);
      if (!given || !sameSecret(given, token)) {
        return sendError(
          request,
          reply,
          new AppError({
            code: 'UNAUTHENTICATED',
            message: 'The queue dashboard needs the admin token',
            headers: { 'www-authenticate': 'Basic realm="queues", charset="UTF-8"' },
          }),
        );
      }
    });
    // The dashboard's own page needs inline scripts; this scope only serves it.
    scope.addHook('onSend', async (_request, reply) => {
      reply.removeHeader('content-security-policy');
    });
    await scope.register(serverAdapter.registerPlugin(), { prefix: ADMIN_PREFIX });
  });
}
