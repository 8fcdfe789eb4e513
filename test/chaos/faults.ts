import type { PostgresInstance } from '../helpers/postgres-instance.js';
import type { RedisInstance } from '../helpers/redis-instance.js';
import type { RandomModel } from './fake-llm.js';
import type { ApiClient } from './http.js';
import type { Follow } from './load.js';
import type { ServiceProcess } from './services.js';

export type FaultKind =
  | 'worker-sigkill'
  | 'redis-restart-kept'
  | 'postgres-restart'
  | 'api-sigkill-streams-open'
  | 'redis-restart-empty'
  | 'redis-flushall';

export interface FaultRecord {
  kind: FaultKind;
  description: string;
  /** When the fault was injected (epoch ms). */
  at: number;
  /** When the component was back (epoch ms). */
  restoredAt: number;
  details: Record<string, unknown>;
  /** Fault-specific data the analysis needs (not printed). */
  orphanPrompts?: string[];
  interrupted?: Follow[];
}

export interface Cluster {
  pg: PostgresInstance;
  redis: RedisInstance;
  apis: ServiceProcess[];
  workers: ServiceProcess[];
  model: RandomModel;
  client: ApiClient;
  follows: Set<Follow>;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** How long a stopped component stays down before it is started again. */
const HOLD_MS = 1500;

async function waitUntil(predicate: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

export const FAULTS: Record<FaultKind, (c: Cluster) => Promise<FaultRecord>> = {
  async 'worker-sigkill'(c) {
    const victim = c.workers[0]!;
    // Mid-reply: wait until the model is answering several requests.
    await waitUntil(() => c.model.inFlight().length >= 3, 5000);
    const inFlight = c.model.inFlight().length;
    const pid = victim.pid;
    const at = Date.now();
    await victim.kill('SIGKILL');
    await sleep(HOLD_MS);
    // The dead worker's model requests were cut when the kernel closed its sockets.
    const orphanPrompts = c.model.served
      .filter(
        (s) =>
          s.aborted && s.closedAt !== undefined && s.closedAt >= at && s.closedAt <= at + HOLD_MS,
      )
      .map((s) => s.prompt);
    await victim.start();
    return {
      kind: 'worker-sigkill',
      description: `SIGKILL ${victim.name} mid-reply, start it again`,
      at,
      restoredAt: Date.now(),
      details: {
        pid,
        modelRequestsInFlight: inFlight,
        repliesCutOff: orphanPrompts.length,
      },
      orphanPrompts,
    };
  },

  async 'redis-restart-kept'(c) {
    const keysBefore = await c.redis.dbSize();
    const at = Date.now();
    await c.redis.stop();
    await sleep(HOLD_MS);
    await c.redis.start();
    const keysAfter = await c.redis.dbSize();
    return {
      kind: 'redis-restart-kept',
      description: 'restart Redis with its data kept (AOF, appendfsync always)',
      at,
      restoredAt: Date.now(),
      details: { keysBefore, keysAfter },
    };
  },

  async 'postgres-restart'(c) {
    const at = Date.now();
    await c.pg.stop();
    await sleep(HOLD_MS);
    await c.pg.start();
    return {
      kind: 'postgres-restart',
      description: 'restart PostgreSQL (pg_ctl stop -m fast, start)',
      at,
      restoredAt: Date.now(),
      details: {},
    };
  },

  async 'api-sigkill-streams-open'(c) {
    const index = 0;
    const victim = c.apis[index]!;
    await waitUntil(() => (c.client.openStreams[index] ?? 0) >= 2, 5000);
    const interrupted = [...c.follows].filter((f) => f.connected && f.api === index);
    const openStreams = c.client.openStreams[index] ?? 0;
    const pid = victim.pid;
    const at = Date.now();
    await victim.kill('SIGKILL');
    await sleep(HOLD_MS);
    await victim.start();
    return {
      kind: 'api-sigkill-streams-open',
      description: `SIGKILL ${victim.name} while SSE streams are open, start it again`,
      at,
      restoredAt: Date.now(),
      details: { pid, openStreams, replyStreamsInterrupted: interrupted.length },
      interrupted,
    };
  },

  async 'redis-restart-empty'(c) {
    const keysBefore = await c.redis.dbSize();
    const at = Date.now();
    await c.redis.stop();
    await c.redis.wipe();
    await sleep(HOLD_MS);
    await c.redis.start();
    return {
      kind: 'redis-restart-empty',
      description: 'restart Redis empty (data files deleted)',
      at,
      restoredAt: Date.now(),
      details: { keysBefore, keysAfter: await c.redis.dbSize() },
    };
  },

  async 'redis-flushall'(c) {
    const keysBefore = await c.redis.dbSize();
    const at = Date.now();
    await c.redis.flushAll();
    return {
      kind: 'redis-flushall',
      description: 'FLUSHALL on the live Redis',
      at,
      restoredAt: Date.now(),
      details: { keysBefore },
    };
  },
};

/** The order and the moment (share of the load phase) of each fault. */
export const SCHEDULE: Array<{ kind: FaultKind; share: number }> = [
  { kind: 'worker-sigkill', share: 0.1 },
  { kind: 'redis-restart-kept', share: 0.24 },
  { kind: 'postgres-restart', share: 0.38 },
  { kind: 'api-sigkill-streams-open', share: 0.52 },
  { kind: 'redis-restart-empty', share: 0.66 },
  { kind: 'redis-flushall', share: 0.8 },
];
