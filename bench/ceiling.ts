// The ceiling: a bare Fastify route with the service's logger (pino, same options and level) and
// Fastify's default request logging, as the service has it.
import Fastify, { type FastifyBaseLogger } from 'fastify';
import { createLogger } from '../src/lib/logger.js';
import { ready, startProbe } from './probe.js';

const logger = createLogger(process.env.LOG_LEVEL ?? 'info');
const app = Fastify({ loggerInstance: logger as FastifyBaseLogger });
app.get('/', async () => ({ hello: 'world' }));
const address = await app.listen({ port: 0, host: '127.0.0.1' });
startProbe(() => app.close());
ready(address);
