import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import cors from '@fastify/cors';
import { fastifySSE } from '@fastify/sse';
import fastifyStatic from '@fastify/static';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import {
  jsonSchemaTransform,
  jsonSchemaTransformObject,
  serializerCompiler,
  validatorCompiler,
  type ZodTypeProvider,
} from 'fastify-type-provider-zod';
import { ReplyHub } from '../chat/reply-hub.js';
import type { Container } from '../container.js';
import { errorCatalogue } from '../lib/errors.js';
import { registerAdmin } from './plugins/admin.js';
import { registerAuth } from './plugins/auth.js';
import { registerErrorHandling, sendError, toAppError } from './plugins/errors.js';
import { registerMetricsRoute } from './plugins/metrics.js';
import { registerRateLimit } from './plugins/rate-limit.js';
import { registerRequestLifecycle } from './plugins/request-lifecycle.js';
import { API_SECURITY_HEADERS, registerDocumentHeaders } from './plugins/security-headers.js';
import { authRoutes } from './routes/auth.js';
import { billingRoutes } from './routes/billing.js';
import { chatRoutes } from './routes/chat.js';
import { healthRoutes } from './routes/health.js';
import { streamRoutes } from './routes/stream.js';
import { userRoutes } from './routes/user.js';

export type App = FastifyInstance;

/** The playground page; same relative path from `src/api` and `dist/api`. */
const publicFolder = fileURLToPath(new URL('../../public', import.meta.url));

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** Body limit: a 32,000-character message is at most ~128 KB of UTF-8, with room for JSON. */
export const BODY_LIMIT = 256 * 1024;

export interface BuildAppOptions {
  /** Extra routes (tests, benchmarks); registered after the product's own. */
  configure?: (app: FastifyInstance) => void | Promise<void>;
}

export async function buildApp(container: Container, options: BuildAppOptions = {}): Promise<App> {
  const { config } = container;
  const app = Fastify({
    loggerInstance: container.logger as FastifyBaseLogger,
    bodyLimit: BODY_LIMIT,
    trustProxy: config.trustProxy,
    requestIdHeader: false,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && REQUEST_ID.test(given) ? given : randomUUID();
    },
    routerOptions: { ignoreTrailingSlash: true },
    // Errors raised before routing (e.g. a malformed percent-encoding in the path) answer in the
    // API's error shape too, instead of Fastify's default body.
    frameworkErrors: (error, request, reply) => {
      reply.header('x-request-id', request.id);
      reply.headers(API_SECURITY_HEADERS);
      return sendError(request, reply, toAppError(error));
    },
    // Lets in-flight requests finish on close while idle keep-alive sockets are dropped.
    forceCloseConnections: 'idle',
    return503OnClosing: true,
  });

  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(serializerCompiler);
  // JSON only: text/plain bodies are refused with 415 rather than parsed as strings.
  app.removeContentTypeParser('text/plain');

  registerErrorHandling(app, container.metrics);
  container.metrics.watchQueues([container.replyQueue, container.maintenanceQueue]);
  registerRequestLifecycle(app, container.metrics);
  registerMetricsRoute(app, container.metrics);

  // Without allowed origins there is nothing to grant: no CORS hook runs at all.
  if (config.corsOrigins.length > 0) {
    await app.register(cors, {
      origin: config.corsOrigins,
      exposedHeaders: [
        'x-request-id',
        'location',
        'retry-after',
        'x-ratelimit-limit',
        'x-ratelimit-remaining',
        'x-ratelimit-reset',
        'x-cache',
      ],
    });
  }

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Gemini Chat API',
        version: '1.0.0',
        description: [
          'Chatrooms answered by Google Gemini through a queue, with OTP sign-in and Stripe subscriptions.',
          '',
          'Every error has the shape `{ "error": { "code", "message", "requestId", "details" } }`. Codes:',
          '',
          ...Object.entries(errorCatalogue).map(
            ([code, { status, description }]) => `- \`${code}\` (${status}): ${description}`,
          ),
        ].join('\n'),
      },
      components: {
        securitySchemes: {
          bearerAuth: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' },
        },
      },
    },
    transform: jsonSchemaTransform,
    transformObject: jsonSchemaTransformObject,
  });
  // The pages: the reference, the queue dashboard and the playground, with helmet's document
  // headers instead of the API's.
  await app.register(async (pages) => {
    registerDocumentHeaders(pages, {
      // The reference page at /docs loads its own scripts and styles from this origin.
      contentSecurityPolicy: {
        directives: {
          defaultSrc: ["'self'"],
          scriptSrc: ["'self'"],
          styleSrc: ["'self'", 'https:', "'unsafe-inline'"],
          imgSrc: ["'self'", 'data:', 'https:'],
          connectSrc: ["'self'"],
        },
      },
    });
    await pages.register(swaggerUi, { routePrefix: '/docs', staticCSP: true });
    await registerAdmin(pages, container);
    await pages.register(fastifyStatic, {
      root: publicFolder,
      wildcard: false,
      index: ['index.html'],
      cacheControl: true,
      maxAge: '5m',
    });
  });

  await container.invalidation.start();
  app.addHook('onClose', async () => container.invalidation.close());
  await container.accountChanges.start();
  app.addHook('onClose', async () => container.accountChanges.close());
  const authenticated = registerAuth(app, container);
  await registerRateLimit(app, container);

  await app.register(fastifySSE, { heartbeatInterval: 15_000 });
  const hub = new ReplyHub(container.streams, config.redisUrl, container.redis);
  hub.start();
  app.addHook('onClose', async () => hub.close());
  const replyDeps = { chat: container.chatRepository, streams: container.streams, hub };

  const routes = app.withTypeProvider<ZodTypeProvider>();
  await routes.register(healthRoutes(container));
  await routes.register(authRoutes(container, authenticated));
  await routes.register(userRoutes(container, authenticated));
  await routes.register(chatRoutes(container, authenticated, replyDeps));
  await routes.register(streamRoutes(container, authenticated, replyDeps));
  await routes.register(billingRoutes(container, authenticated));
  app.get('/openapi.json', { schema: { hide: true }, config: { rateLimit: false } }, async () =>
    app.swagger(),
  );

  if (options.configure) await options.configure(app);
  return app;
}
