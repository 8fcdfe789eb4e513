import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';
import { errorResponses } from '../schemas.js';

const READY_TIMEOUT_MS = 1500;

function within<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

type CheckResult = 'ok' | 'unavailable';

async function check(
  probe: () => Promise<unknown>,
): Promise<{ result: CheckResult; reason?: string }> {
  try {
    await within(probe(), READY_TIMEOUT_MS);
    return { result: 'ok' };
  } catch (error) {
    return { result: 'unavailable', reason: (error as Error).message };
  }
}

const checkResult = z.enum(['ok', 'unavailable']);
const checksSchema = z.object({ postgres: checkResult, redis: checkResult });

export const healthRoutes =
  (container: Container): FastifyPluginAsyncZod =>
  async (app) => {
    app.get(
      '/healthz',
      {
        schema: {
          tags: ['Operations'],
          summary: 'Liveness: the process is up',
          response: { 200: z.object({ status: z.literal('ok') }) },
        },
        logLevel: 'warn',
        config: { rateLimit: false },
      },
      async () => ({ status: 'ok' as const }),
    );

    app.get(
      '/readyz',
      {
        schema: {
          tags: ['Operations'],
          summary: 'Readiness: PostgreSQL and Redis answer',
          response: {
            200: z.object({ status: z.literal('ok'), checks: checksSchema }),
            ...errorResponses('UNAVAILABLE'),
          },
        },
        logLevel: 'warn',
        config: { rateLimit: false },
      },
      async (request) => {
        const [pg, rd] = await Promise.all([
          check(() => container.database.pool.query('select 1')),
          check(() => container.redis.ping()),
        ]);
        const postgres = pg.result;
        const redis = rd.result;
        if (postgres !== 'ok' || redis !== 'ok') {
          request.log.warn({ postgres: pg.reason, redis: rd.reason }, 'not ready');
          throw new AppError({
            code: 'UNAVAILABLE',
            message: 'Not ready: a backing service is unreachable',
            retryAfter: 2,
            details: { checks: { postgres, redis } },
          });
        }
        return { status: 'ok' as const, checks: { postgres, redis } };
      },
    );
  };
