// `npm run chaos`: the resilience suite of issue 7. It starts its own PostgreSQL and Redis (on
// spare ports, so it may stop, restart and flush them), a fake Gemini with realistic latency and
// occasional 429s/500s, 2 API and 2 worker processes; drives load from many Basic and Pro users
// for a fixed time while it kills and restarts processes and servers; waits for the system to
// settle; then checks from PostgreSQL that no accepted prompt was lost, answered twice or left
// stuck, and prints a report.
//
//   node --import tsx test/chaos/run.ts [--short] [--duration=SECONDS] [--users=N]
//        [--settle=SECONDS] [--faults=a,b|none] [--keep-logs]
//
// --short       ~28 s of load with fewer users (CI)
// --settle      how long to wait after the load for every reply to be final (bounded wait)
// --faults      inject these faults instead, in this order, spread evenly (repeats allowed;
//               names as in faults.ts), or none (a baseline)
// --keep-logs   keep the service logs (test-output/chaos-logs/), as on every failure
//
// The services run src/main.ts unchanged, configured through the environment only; workers get
// WORKER_LOCK_SECONDS=5, so a SIGKILLed worker's replies are taken over within seconds.
// Exit status: 0 when every check passes, 1 when one fails, 2 when the run itself broke.
import { cp, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { startFakeGemini } from '../helpers/fake-gemini.js';
import { startPostgresInstance } from '../helpers/postgres-instance.js';
import { repoRoot } from '../helpers/process.js';
import { getFreePort, startRedisInstance } from '../helpers/redis-instance.js';
import { RandomModel } from './fake-llm.js';
import { type Cluster, FAULTS, type FaultKind, type FaultRecord, SCHEDULE } from './faults.js';
import { ApiClient, Traffic } from './http.js';
import {
  type ChaosUser,
  createUser,
  type Follow,
  Ledger,
  type LoadContext,
  UserDriver,
} from './load.js';
import { type ChaosReport, printReport } from './report.js';
import { ServiceProcess } from './services.js';
import {
  diagnose,
  loadMessages,
  pendingCount,
  type ReadySample,
  recoveries,
  verify,
} from './verify.js';

interface Options {
  short: boolean;
  durationS: number;
  users: number;
  proShare: number;
  settleS: number;
  basicLimit: number;
  keepLogs: boolean;
  faults: FaultKind[];
  faultsGiven: boolean;
}

function parseArgs(argv: string[]): Options {
  const flag = (name: string) => argv.includes(`--${name}`);
  const value = (name: string) =>
    argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3) ?? undefined;
  const short = flag('short');
  const number = (name: string, fallback: number) => {
    const raw = value(name);
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number`);
    return n;
  };
  return {
    short,
    durationS: number('duration', short ? 28 : 90),
    users: Math.round(number('users', short ? 20 : 48)),
    proShare: 0.4,
    settleS: number('settle', short ? 30 : 60),
    basicLimit: 5,
    keepLogs: flag('keep-logs'),
    faults: parseFaults(value('faults')),
    faultsGiven: value('faults') !== undefined,
  };
}

function parseFaults(raw: string | undefined): FaultKind[] {
  if (raw === undefined) return SCHEDULE.map((s) => s.kind);
  if (raw === 'none') return [];
  const kinds = raw.split(',').filter(Boolean);
  for (const kind of kinds) {
    if (!SCHEDULE.some((s) => s.kind === kind)) {
      throw new Error(
        `--faults: unknown fault ${kind} (${SCHEDULE.map((s) => s.kind).join(', ')})`,
      );
    }
  }
  return kinds as FaultKind[];
}

const WORKER_LOCK_SECONDS = 5;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const started = Date.now();
const log = (message: string) =>
  process.stderr.write(`[chaos +${((Date.now() - started) / 1000).toFixed(1)}s] ${message}\n`);

const cleanups: Array<{ name: string; run: () => Promise<void> }> = [];
/** Service logs are copied to test-output/chaos-logs/ on failure or with --keep-logs. */
let keepLogs = false;
const lastResort: Array<() => void> = [];
let cleaning: Promise<void> | undefined;

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    for (const { name, run } of cleanups.splice(0).reverse()) {
      try {
        await run();
      } catch (error) {
        log(`clean-up of ${name} failed: ${(error as Error).message}`);
      }
    }
  })();
  return cleaning;
}

for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    log(`${signal}: cleaning up`);
    const force = setTimeout(() => process.exit(130), 30_000);
    force.unref();
    cleanup().finally(() => process.exit(130));
  });
}
process.on('exit', () => {
  for (const kill of lastResort) kill();
});

async function inBatches<T, R>(
  items: T[],
  size: number,
  fn: (item: T) => Promise<R>,
): Promise<R[]> {
  const out: R[] = [];
  for (let i = 0; i < items.length; i += size) {
    out.push(...(await Promise.all(items.slice(i, i + size).map(fn))));
  }
  return out;
}

async function main(): Promise<number> {
  const opts = parseArgs(process.argv.slice(2));
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'chaos-'));
  const logDir = path.join(tmp, 'logs');
  await mkdir(logDir);
  keepLogs = opts.keepLogs;
  cleanups.push({
    name: 'temp dir',
    run: async () => {
      if (keepLogs) {
        const target = path.join(
          repoRoot,
          'test-output',
          'chaos-logs',
          new Date().toISOString().replaceAll(':', '-'),
        );
        await mkdir(path.dirname(target), { recursive: true });
        await cp(logDir, target, { recursive: true });
        log(`service logs kept in ${path.relative(repoRoot, target)}`);
      }
      await rm(tmp, { recursive: true, force: true });
    },
  });

  log(`${opts.short ? 'short' : 'full'} run: ${opts.durationS}s of load, ${opts.users} users`);
  const pgInstance = await startPostgresInstance();
  cleanups.push({ name: 'postgres', run: () => pgInstance.destroy() });
  const redis = await startRedisInstance({ persistent: true, baseDir: tmp });
  cleanups.push({ name: 'redis', run: () => redis.destroy() });
  lastResort.push(() => redis.killNow());
  const fake = await startFakeGemini();
  cleanups.push({ name: 'fake gemini', run: () => fake.close() });
  const model = new RandomModel(fake, { rateLimit: 0.05, serverError: 0.05, blocked: 0.01 });
  model.start();
  cleanups.push({ name: 'model', run: async () => model.stop() });
  log(`postgres :${pgInstance.port}, redis :${redis.port}, fake gemini :${fake.port}`);

  const databaseUrl = pgInstance.url('gemini_chat_chaos');
  const env: Record<string, string> = {
    APP_ENV: 'test',
    JWT_SECRET: 'chaos-suite-secret-that-is-long-enough-0123456789',
    ACCESS_TOKEN_TTL_SECONDS: '3600',
    DATABASE_URL: databaseUrl,
    REDIS_URL: redis.url,
    REDIS_PREFIX: 'chaos:',
    HOST: '127.0.0.1',
    OTP_DELIVERY: 'response',
    LLM_PROVIDER: 'gemini',
    GEMINI_API_KEY: 'chaos-key',
    GEMINI_BASE_URL: fake.url,
    LLM_TIMEOUT_SECONDS: '30',
    LLM_RETRY_BASE_MS: '200',
    BASIC_DAILY_LIMIT: String(opts.basicLimit),
    PRO_DAILY_LIMIT: 'unlimited',
    RATE_LIMIT_PUBLIC_PER_MINUTE: '1000000',
    RATE_LIMIT_USER_PER_MINUTE: '1000000',
    REPLY_STALE_SECONDS: '5',
    SWEEP_INTERVAL_SECONDS: '1',
    SHUTDOWN_TIMEOUT_SECONDS: '5',
    // A killed worker's replies are taken over after this (BullMQ lock and stalled check).
    WORKER_LOCK_SECONDS: String(WORKER_LOCK_SECONDS),
  };
  const entry = 'src/main.ts';
  const apis: ServiceProcess[] = [];
  for (const i of [1, 2]) {
    const port = await getFreePort();
    apis.push(
      new ServiceProcess(
        `api-${i}`,
        'api',
        port,
        entry,
        { ...env, ROLE: 'api', PORT: String(port), LOG_LEVEL: 'warn' },
        logDir,
      ),
    );
  }
  const workers = [1, 2].map(
    (i) =>
      new ServiceProcess(
        `worker-${i}`,
        'worker',
        undefined,
        entry,
        { ...env, ROLE: 'worker', PORT: '0', LOG_LEVEL: 'info' },
        logDir,
      ),
  );
  const services = [...apis, ...workers];
  cleanups.push({
    name: 'services',
    run: async () => {
      await Promise.all(services.map((s) => s.close()));
    },
  });
  for (const s of services) lastResort.push(() => s.killNow());
  // The first instance creates and migrates the database; the others start together.
  await apis[0]!.start();
  await Promise.all(services.slice(1).map((s) => s.start()));
  log(
    `services up: ${services.map((s) => `${s.name} pid ${s.pid}${s.port ? ` :${s.port}` : ''}`).join(', ')}`,
  );

  const traffic = new Traffic();
  const client = new ApiClient(
    apis.map((a) => a.url),
    traffic,
  );
  const proCount = Math.round(opts.users * opts.proShare);
  const users: ChaosUser[] = await inBatches(
    Array.from({ length: opts.users }, (_, i) => i),
    6,
    (i) => createUser(client, i, i < proCount ? 'pro' : 'basic', 2),
  );
  {
    const db = new pg.Client({ connectionString: databaseUrl });
    await db.connect();
    for (const u of users.filter((x) => x.tier === 'pro')) {
      await db.query(
        `insert into subscriptions (id, user_id, customer_id, status) values ($1, $2, $3, 'active')`,
        [`sub_chaos_${u.idx}`, u.id, `cus_chaos_${u.idx}`],
      );
    }
    await db.end();
  }
  log(`${users.length} users signed in (${proCount} Pro), ${users.length * 2} rooms`);

  // /readyz of every API instance, 4 times a second (recovery times).
  const ready: ReadySample[] = [];
  let polling = true;
  const readyLoop = (async () => {
    while (polling) {
      const t = Date.now();
      const answers = await Promise.all(
        apis.map(async (a) => {
          try {
            const res = await fetch(`${a.url}/readyz`, { signal: AbortSignal.timeout(1000) });
            await res.arrayBuffer();
            return res.status === 200;
          } catch {
            return false;
          }
        }),
      );
      ready.push({ t, ok: answers.every(Boolean) });
      await sleep(250 - (Date.now() - t));
    }
  })();
  cleanups.push({
    name: 'readyz poller',
    run: async () => {
      polling = false;
      await readyLoop;
    },
  });

  const ledger = new Ledger();
  const follows = new Set<Follow>();
  const loadStart = Date.now();
  const stopAt = loadStart + opts.durationS * 1000;
  const ctx: LoadContext = {
    client,
    ledger,
    stopAt,
    hardStopAt: stopAt + opts.settleS * 1000,
    follows,
  };
  log(`load starts for ${opts.durationS}s`);
  const drivers = Promise.all(users.map((u) => new UserDriver(ctx, u).run()));
  const progress = setInterval(() => {
    log(
      `accepted ${ledger.accepted.size}, model requests in flight ${model.inFlight().length}, open streams ${client.openStreams.join('/')}, 503s ${traffic.samples.filter((s) => s.status === 503).length}, connection errors ${traffic.samples.filter((s) => s.status === 0).length}`,
    );
  }, 5000);
  cleanups.push({ name: 'progress', run: async () => clearInterval(progress) });

  const cluster: Cluster = { pg: pgInstance, redis, apis, workers, model, client, follows };
  const faults: FaultRecord[] = [];
  // The default schedule, or the faults named on the command line (repeats allowed) spread
  // evenly over the load.
  const plan = opts.faultsGiven
    ? opts.faults.map((kind, i) => ({
        kind,
        share: 0.1 + (0.75 * i) / Math.max(1, opts.faults.length - 1),
      }))
    : SCHEDULE;
  for (const { kind, share } of plan) {
    await sleep(loadStart + share * opts.durationS * 1000 - Date.now());
    log(`fault: ${kind}`);
    const record = await FAULTS[kind](cluster);
    faults.push(record);
    log(`  back after ${record.restoredAt - record.at} ms ${JSON.stringify(record.details)}`);
  }

  await sleep(stopAt - Date.now());
  log('load stops; waiting for every reply to be final');
  // Every client gives up by hardStopAt; the race only guards against a client bug.
  await Promise.race([drivers, sleep(ctx.hardStopAt + 30_000 - Date.now())]);
  let pending = await pendingCount(databaseUrl);
  while (pending > 0 && Date.now() < ctx.hardStopAt) {
    await sleep(500);
    pending = await pendingCount(databaseUrl);
  }
  const settledMs = Date.now() - stopAt;
  log(`settled after ${settledMs} ms (${pending} replies still pending)`);
  clearInterval(progress);
  polling = false;
  await readyLoop;
  model.stop();

  const rows = await loadMessages(databaseUrl);
  const verification = verify(rows, ledger, model.served, users, opts.basicLimit);
  const recovery = recoveries(faults, loadStart, rows, ledger, traffic, ready);
  const unfinished = [
    ...new Set([
      ...verification.stuck.map((s) => s.id),
      ...verification.lost.map((l) => l.replyId),
    ]),
  ];
  const diagnosis = await diagnose(unfinished, rows, model.served, redis.port, 'chaos:');

  const failures: string[] = [];
  if (verification.lost.length > 0) failures.push(`${verification.lost.length} lost`);
  if (verification.duplicated.length > 0)
    failures.push(`${verification.duplicated.length} duplicated`);
  if (verification.stuck.length > 0) failures.push(`${verification.stuck.length} stuck`);
  if (verification.promptsWithoutReply.length > 0) {
    failures.push(`${verification.promptsWithoutReply.length} prompts without a reply`);
  }
  if (verification.corrupted.length > 0)
    failures.push(`${verification.corrupted.length} corrupted`);
  if (verification.inconsistent.length > 0) {
    failures.push(
      `${verification.inconsistent.length} final statuses differ from what clients saw`,
    );
  }
  if (verification.quota.violations.length > 0) {
    failures.push(`${verification.quota.violations.length} Basic user-days over the limit`);
  }
  if (verification.quota.proRejections > 0) {
    failures.push(`${verification.quota.proRejections} QUOTA_EXCEEDED answers to Pro users`);
  }
  if (traffic.undocumented.length > 0) {
    failures.push(`${traffic.undocumented.length} answers with an undocumented status`);
  }
  if (faults.length !== opts.faults.length) failures.push('not every fault was injected');

  const report: ChaosReport = {
    mode: opts.short ? 'short' : 'full',
    entry,
    durationSeconds: opts.durationS,
    users: { total: users.length, basic: users.length - proCount, pro: proCount },
    processes: { api: apis.length, worker: workers.length },
    settings: {
      basicDailyLimit: opts.basicLimit,
      replyStaleSeconds: 5,
      sweepIntervalSeconds: 1,
      workerLockSeconds: WORKER_LOCK_SECONDS,
      modelMix: '5% 429 (retry in 1 s), 5% 500, 1% blocked, text 0.3-2.5 s',
    },
    accepted: verification.accepted,
    acceptedPrompts: verification.acceptedPrompts,
    acceptedRegenerations: verification.acceptedRegenerations,
    completed: verification.outcomes.completed ?? 0,
    failed: verification.outcomes.failed ?? 0,
    blocked: verification.outcomes.blocked ?? 0,
    cancelled: verification.outcomes.cancelled ?? 0,
    lost: verification.lost.length,
    duplicated: verification.duplicated.length,
    stuck: verification.stuck.length,
    corrupted: verification.corrupted.length,
    inconsistent: verification.inconsistent.length,
    undocumentedStatuses: traffic.undocumented.length,
    settledMs,
    quota: verification.quota,
    unknownSends: verification.unknownSends,
    clients: {
      ...ledger.counters,
      modes: ledger.modes,
      connectionErrors: Object.fromEntries(traffic.connectionErrors),
      streamIssues: countKinds(ledger.streamIssues.map((i) => i.kind)),
    },
    statuses: traffic.byStatus(),
    errorCodes: Object.fromEntries(traffic.errorCodes),
    model: model.counts,
    database: verification.totals,
    faults: recovery,
    details: {
      lost: verification.lost.slice(0, 20),
      duplicated: verification.duplicated.slice(0, 20),
      stuck: verification.stuck.slice(0, 20),
      corrupted: verification.corrupted.slice(0, 20),
      inconsistent: verification.inconsistent.slice(0, 20),
      promptsWithoutReply: verification.promptsWithoutReply.slice(0, 20),
      undocumented: traffic.undocumented.slice(0, 20),
      streamIssues: ledger.streamIssues.slice(0, 20),
      unfinishedReplies: diagnosis,
    },
    failures,
    passed: failures.length === 0,
  };
  printReport(report);
  const out = path.join(repoRoot, 'test-output', `chaos-report-${report.mode}.json`);
  await mkdir(path.dirname(out), { recursive: true });
  await writeFile(out, `${JSON.stringify(report, null, 2)}\n`);
  if (!report.passed) keepLogs = true;
  return report.passed ? 0 : 1;
}

function countKinds(kinds: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of kinds) out[k] = (out[k] ?? 0) + 1;
  return out;
}

let code = 2;
try {
  code = await main();
} catch (error) {
  log(`run failed: ${(error as Error).stack ?? error}`);
  keepLogs = true;
  code = 2;
} finally {
  await cleanup();
}
process.exit(code);
