// `npm run bench [-- --quick] [-- --profile] [-- --keep] [-- --strict] [-- --no-pin] [-- --only=a,b]`
//
// Starts the service as child processes (real PostgreSQL and Redis, a fake model), seeds users
// and rooms through the API, measures each figure against a bare-Fastify ceiling measured in
// the same run, prints one JSON report on stdout (progress goes to stderr) and exits non-zero
// when a run failed (errors, non-2xx answers, a reply that did not complete).
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Redis } from 'ioredis';
import pg from 'pg';
import { ensureDatabase } from '../src/db/client.js';
import { runMigrations } from '../src/db/migrate.js';
import { createReplyQueue } from '../src/queue/queues.js';
import { BenchChild, outDir } from './child.js';
import { CpuMeter, type CpuUse } from './cpu.js';
import { explainHotQueries } from './explain.js';
import {
  type CannonSummary,
  cannon,
  json,
  jsonRequest,
  percentile,
  rotating,
  round,
  type SseResult,
  sseAgent,
  sseRequest,
} from './load.js';
import { pin, pinningPlan } from './pin.js';
import type { ProbeStats } from './probe.js';
import { summariseProfiles } from './profile-summary.js';

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(`--${name}`);
const quick = flag('quick');
/** Per-scenario CPU profiles of the service children (V8 profiler over each measured window). */
const profile = flag('profile');
/** Whole-process `--cpu-prof` of every child, start-up included. */
const cpuProf = flag('cpu-prof');
const keep = flag('keep');
const strict = flag('strict');
const noPin = flag('no-pin');
const onlyArg = argv.find((a) => a.startsWith('--only='))?.slice('--only='.length);
const only = onlyArg ? new Set(onlyArg.split(',')) : undefined;
const wanted = (section: string) => !only || only.has(section);
const endpointsArg = argv.find((a) => a.startsWith('--endpoints='))?.slice('--endpoints='.length);
const endpointFilter = endpointsArg ? new Set(endpointsArg.split(',')) : undefined;

const settings = quick
  ? {
      connections: 32,
      durationS: 1,
      rounds: 3,
      warmupS: 1,
      users: 24,
      roomsPerUser: 4,
      pipelineRate: 200,
      pipelineS: 3,
      // Enough for a steady rate; the full run drains the 10,000 of the target.
      drainPrompts: 2000,
      streams: 1000,
      streamDeltas: 50,
      streamMs: 2000,
    }
  : {
      connections: 32,
      durationS: 3,
      rounds: 5,
      warmupS: 3,
      users: 40,
      roomsPerUser: 5,
      pipelineRate: 200,
      pipelineS: 15,
      drainPrompts: 10_000,
      streams: 1000,
      streamDeltas: 50,
      streamMs: 2000,
    };

const TARGETS = {
  getChatroomRatio: 0.5,
  userMeRatio: 0.5,
  messageAcceptRatio: 0.25,
  pipelineP50Ms: 5,
  pipelineP99Ms: 25,
  drainPerSecond: 1000,
  streamsPeakRssMb: 400,
  streamsEventLoopP99Ms: 50,
};

const log = (message: string) => process.stderr.write(`[bench] ${message}\n`);

const runId = process.pid;
const dbName = `gemini_chat_bench_${runId}`;
const redisPrefix = `bench:${runId}:`;
const baseDbUrl = new URL(
  process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/gemini_chat',
);
const adminDbUrl = new URL(baseDbUrl);
adminDbUrl.pathname = '/postgres';
const databaseUrl = new URL(baseDbUrl);
databaseUrl.pathname = `/${dbName}`;
const redisUrl = process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379';
const LOG_LEVEL = 'warn';
/** In the pipeline run, one prompt in this many is sent with Accept: text/event-stream. */
const SSE_SHARE = 10;

/** BENCH_WORKER_CONCURRENCY tries another WORKER_CONCURRENCY for the drain and pipeline runs. */
const workerTuning: Record<string, string> = process.env.BENCH_WORKER_CONCURRENCY
  ? { WORKER_CONCURRENCY: process.env.BENCH_WORKER_CONCURRENCY }
  : {};

/** The environment of every service child: the product's variables only, nothing inherited. */
function serviceEnv(extra: Record<string, string>): Record<string, string> {
  return {
    PATH: process.env.PATH ?? '',
    HOME: process.env.HOME ?? '/tmp',
    NODE_ENV: 'production',
    APP_ENV: 'test',
    JWT_SECRET: 'bench-secret-bench-secret-bench-secret-0123456789',
    ACCESS_TOKEN_TTL_SECONDS: '7200',
    DATABASE_URL: databaseUrl.toString(),
    REDIS_URL: redisUrl,
    REDIS_PREFIX: redisPrefix,
    HOST: '127.0.0.1',
    PORT: '0',
    LOG_LEVEL,
    OTP_DELIVERY: 'response',
    RATE_LIMIT_PUBLIC_PER_MINUTE: '100000000',
    RATE_LIMIT_USER_PER_MINUTE: '100000000',
    ...extra,
  };
}

const children = new Set<BenchChild>();
function startChild(
  name: string,
  entry: 'server.ts' | 'ceiling.ts',
  env: Record<string, string>,
): BenchChild {
  const child = new BenchChild({ name, entry, env, profile: cpuProf });
  children.add(child);
  return child;
}
async function stopChild(child: BenchChild) {
  const code = await child.stop();
  children.delete(child);
  if (code !== 0) failures.push(`${child.name} exited with code ${code}`);
}
process.on('exit', () => {
  for (const child of children) child.killNow();
});

const failures: string[] = [];
function checkCannon(name: string, summary: CannonSummary) {
  if (summary.errors > 0 || summary.timeouts > 0 || summary.non2xx > 0) {
    failures.push(
      `${name}: ${summary.errors} errors, ${summary.timeouts} timeouts, ${summary.non2xx} non-2xx (${JSON.stringify(summary.statusCodes)})`,
    );
  }
}

interface User {
  id: string;
  authorization: string;
  rooms: string[];
}

// ---------------------------------------------------------------------------------------------

const report: Record<string, unknown> = {
  machine: {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memoryGb: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    loadAverageAtStart: os.loadavg().map((v) => round(v)),
  },
  mode: quick ? 'quick' : 'full',
  settings: { ...settings, logLevel: LOG_LEVEL },
};
const targets: Array<{ name: string; value: number; target: string; pass: boolean }> = [];
const target = (name: string, value: number, op: '>=' | '<=', limit: number) => {
  const pass = Number.isFinite(value) && (op === '>=' ? value >= limit : value <= limit);
  targets.push({ name, value, target: `${op} ${limit}`, pass });
  return pass;
};

const started = performance.now();
const admin = new pg.Client({ connectionString: adminDbUrl.toString() });
const db = new pg.Pool({ connectionString: databaseUrl.toString(), max: 4 });
// Dropping the database at the end ends its sessions; an idle pooled one reports it here.
db.on('error', () => {});
admin.on('error', () => {});
const redis = new Redis(redisUrl, { maxRetriesPerRequest: 3 });
const cpuMeter = new CpuMeter(db, redis, dbName);

/** Runs `work` and tells where the machine's CPU went meanwhile (per unit of work). */
async function withCpu<T>(work: () => Promise<T>): Promise<{ value: T; cpu: CpuUse | undefined }> {
  const before = await cpuMeter.snapshot().catch(() => undefined);
  const value = await work();
  const cpu = before ? await cpuMeter.since(before).catch(() => undefined) : undefined;
  return { value, cpu };
}

function cpuPer(cpu: CpuUse | undefined, units: number) {
  if (!cpu || units === 0) return undefined;
  return {
    machineBusyPct: cpu.machineBusyPct,
    postgresMsPerUnit: round(cpu.postgresMs / units, 3),
    redisMsPerUnit: round(cpu.redisMs / units, 3),
  };
}

async function stats(child: BenchChild, reset = false): Promise<ProbeStats | undefined> {
  try {
    return await child.stats(reset);
  } catch (error) {
    failures.push(`${child.name}: ${(error as Error).message}`);
    return undefined;
  }
}

function tripsPer(stats: ProbeStats | undefined, requests: number) {
  if (!stats || requests === 0) return undefined;
  return {
    pgQueries: round(stats.trips.pg / requests),
    redisRoundTrips: round(stats.trips.redis / requests),
    redisCommands: round(stats.trips.redisCommands / requests),
    cpuMsPerRequest: round((stats.cpuMs.user + stats.cpuMs.system) / requests, 3),
  };
}

async function seed(url: string): Promise<User[]> {
  const users: User[] = [];
  const base = 9_000_000_000 + (runId % 1_000_000) * 100;
  const one = async (n: number): Promise<User> => {
    const mobile = `+91${base + n}`;
    const signup = await json(url, 'POST', '/auth/signup', { mobile, name: `Bench ${n}` });
    if (signup.status !== 201)
      throw new Error(`signup: ${signup.status} ${JSON.stringify(signup.body)}`);
    const sent = await json(url, 'POST', '/auth/send-otp', { mobile });
    const otp = (sent.body as { otp?: string }).otp;
    if (sent.status !== 200 || !otp) throw new Error(`send-otp: ${sent.status}`);
    const verified = await json(url, 'POST', '/auth/verify-otp', { mobile, otp });
    if (verified.status !== 200) throw new Error(`verify-otp: ${verified.status}`);
    const body = verified.body as { accessToken: string; user: { id: string } };
    const authorization = `Bearer ${body.accessToken}`;
    await db.query(
      `insert into subscriptions (id, user_id, customer_id, status) values ($1, $2, $3, 'active')`,
      [`sub_${n}`, body.user.id, `cus_bench_${n}`],
    );
    const rooms: string[] = [];
    for (let r = 0; r < settings.roomsPerUser; r++) {
      const room = await json(url, 'POST', '/chatroom', { name: `Room ${r}` }, { authorization });
      if (room.status !== 201) throw new Error(`create room: ${room.status}`);
      rooms.push((room.body as { id: string }).id);
    }
    return { id: body.user.id, authorization, rooms };
  };
  for (let n = 0; n < settings.users; n += 8) {
    const batch = [];
    for (let k = n; k < Math.min(settings.users, n + 8); k++) batch.push(one(k));
    users.push(...(await Promise.all(batch)));
  }
  return users;
}

/**
 * New rooms for each user (through the API), so a scenario's replies read histories of the same
 * size whatever the scenarios before it stored: otherwise a faster accept run would leave longer
 * histories and slow the drain that follows.
 */
async function freshRooms(url: string, users: User[]): Promise<User[]> {
  return Promise.all(
    users.map(async (user) => {
      const rooms: string[] = [];
      for (let r = 0; r < settings.roomsPerUser; r++) {
        const room = await json(
          url,
          'POST',
          '/chatroom',
          { name: `Fresh room ${r}` },
          { authorization: user.authorization },
        );
        if (room.status !== 201) throw new Error(`create room: ${room.status}`);
        rooms.push((room.body as { id: string }).id);
      }
      return { ...user, rooms };
    }),
  );
}

const allRooms = (users: User[]) =>
  users.flatMap((u) => u.rooms.map((room) => ({ room, authorization: u.authorization })));

/** Streams run before the measured 1,000, to warm a fresh API process. */
const STREAM_WARMUP = 100;

let promptCounter = 0;
const messageRequests = (users: User[]) =>
  rotating(
    allRooms(users).map(({ room, authorization }) => ({
      method: 'POST',
      path: `/chatroom/${room}/message`,
      headers: { authorization, 'content-type': 'application/json' },
      body: JSON.stringify({ content: `What is the capital of France? (${++promptCounter})` }),
    })),
  );

const profilesDir = path.join(outDir, 'profiles');

/** With --profile, runs `work` under the CPU profiler of each child: profiles/<scenario>-<child>. */
async function profiled<T>(scenario: string, targets: BenchChild[], work: () => Promise<T>) {
  if (!profile) return work();
  mkdirSync(profilesDir, { recursive: true });
  await Promise.all(targets.map((c) => c.profileStart()));
  try {
    return await work();
  } finally {
    await Promise.all(
      targets.map((c) =>
        c
          .profileStop(path.join(profilesDir, `${scenario}-${c.name}.cpuprofile`))
          .catch((error: Error) => log(`profile of ${c.name}: ${error.message}`)),
      ),
    );
  }
}

async function measure(
  scenario: string,
  child: BenchChild,
  run: Parameters<typeof cannon>[0],
): Promise<{ summary: CannonSummary; stats: ProbeStats | undefined; cpu: CpuUse | undefined }> {
  await stats(child, true);
  const { value: summary, cpu } = await withCpu(() =>
    profiled(scenario, [child], () => cannon(run)),
  );
  return { summary, stats: await stats(child, true), cpu };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  if (profile || cpuProf) rmSync(profilesDir, { recursive: true, force: true });
  log(`run ${runId}: database ${dbName}, redis prefix ${redisPrefix}, ${os.cpus().length} cores`);
  await admin.connect();
  await ensureDatabase(databaseUrl.toString());
  {
    const pool = new pg.Pool({ connectionString: databaseUrl.toString(), max: 1 });
    await runMigrations(pool);
    await pool.end();
  }

  const ceilingChild = wanted('endpoints')
    ? startChild('ceiling', 'ceiling.ts', serviceEnv({}))
    : undefined;
  let api = startChild('api', 'server.ts', serviceEnv({ ROLE: 'api' }));
  const url = await api.url();
  const users = await seed(url);
  log(`seeded ${users.length} Pro users, ${allRooms(users).length} rooms`);

  // 1 + 2: the ceiling and the endpoints, same connections and duration. The machine is shared,
  // so each endpoint is measured right after a ceiling run of its own and divided by it; the
  // ceiling figure reported is the median of those runs.
  if (ceilingChild) {
    const ceilingUrl = await ceilingChild.url();
    const { connections, durationS, warmupS } = settings;
    const ceilingRun = { url: ceilingUrl, connections, requests: [{ path: '/' }] };
    await cannon({ ...ceilingRun, duration: warmupS });

    const getRequests = (p: string) =>
      rotating(users.map((u) => ({ path: p, headers: { authorization: u.authorization } })));
    // Every list cached before the run (a miss loads and caches it).
    for (const u of users)
      await json(url, 'GET', '/chatroom', undefined, { authorization: u.authorization });
    const hit = await fetch(new URL('/chatroom', url), {
      headers: { authorization: users[0]!.authorization },
    });
    if (hit.headers.get('x-cache') !== 'HIT') failures.push('GET /chatroom was not a cache hit');

    // The read endpoints run pinned (see pin.ts); message accept does not: most of its cost is in
    // PostgreSQL and Redis, which need the cores the pinning would hand out.
    const plan = noPin ? undefined : pinningPlan();
    const setPinning = (on: boolean) => {
      if (!plan) return false;
      const done = [
        pin(process.pid, on ? plan.loadGenerator : plan.all),
        pin(api.pid, on ? plan.servers : plan.all),
        pin(ceilingChild.pid, on ? plan.servers : plan.all),
      ];
      if (done.every(Boolean)) return true;
      // All or none: a half-pinned run would compare unlike with unlike.
      if (on) setPinning(false);
      return false;
    };

    const endpoints: Record<string, unknown> = {};
    const ceilings: Array<{ before: string; summary: CannonSummary; stats?: ProbeStats }> = [];
    const runs = [
      {
        name: 'getChatroom',
        requests: getRequests('/chatroom'),
        t: TARGETS.getChatroomRatio,
        pinned: true,
      },
      { name: 'userMe', requests: getRequests('/user/me'), t: TARGETS.userMeRatio, pinned: true },
      {
        name: 'messageAccept',
        requests: messageRequests(users),
        t: TARGETS.messageAcceptRatio,
        pinned: false,
      },
    ];
    for (const { name, requests, t, pinned: pinnable } of runs) {
      if (endpointFilter && !endpointFilter.has(name)) continue;
      const pinned = setPinning(pinnable);
      if (plan && pinnable && !pinned) log('could not pin processes to cores (taskset)');
      const base = { url, connections, requests };
      // Warm-up (JIT, pools); message accept is warm enough from the seeding and the others.
      if (name !== 'messageAccept') await cannon({ ...base, duration: warmupS });
      // Rounds of (ceiling, endpoint) pairs: this machine's speed drifts by tens of percent
      // over seconds, so each endpoint run is compared with the ceiling run just before it, and
      // the median pair is reported.
      const pairs = [];
      for (let r = 1; r <= settings.rounds; r++) {
        log(`ceiling, then ${name} (round ${r} of ${settings.rounds})`);
        const suffix = settings.rounds > 1 ? `-${r}` : '';
        const ceiling = await measure(`ceiling-before-${name}${suffix}`, ceilingChild, {
          ...ceilingRun,
          duration: durationS,
        });
        checkCannon('ceiling', ceiling.summary);
        ceilings.push({ before: name, ...ceiling });
        const run = await measure(`${name}${suffix}`, api, { ...base, duration: durationS });
        checkCannon(name, run.summary);
        pairs.push({ ceiling, run, ratio: round(run.summary.rps / ceiling.summary.rps, 3) });
      }
      // An odd number of rounds, so the median is one of them.
      const median = [...pairs].sort((a, b) => a.ratio - b.ratio)[(pairs.length - 1) >> 1]!;
      const { summary, stats: s, cpu } = median.run;
      const ratio = median.ratio;
      target(`${name} ratio to ceiling`, ratio, '>=', t);
      endpoints[name] = {
        ...summary,
        ceilingRps: median.ceiling.summary.rps,
        ratio,
        target: t,
        pass: ratio >= t,
        rounds: pairs.map((p) => ({
          rps: p.run.summary.rps,
          ceilingRps: p.ceiling.summary.rps,
          ratio: p.ratio,
        })),
        pinned:
          pinnable && pinned
            ? { loadGenerator: plan?.loadGenerator, servers: plan?.servers }
            : false,
        perRequest: tripsPer(s, summary.requests),
        otherCpuPerRequest: cpuPer(cpu, summary.requests),
        eventLoopDelayMs: s?.eventLoopDelayMs,
      };
    }
    await stopChild(ceilingChild);
    if (plan) {
      pin(process.pid, plan.all);
      pin(api.pid, plan.all);
    }
    const sorted = [...ceilings].sort((a, b) => a.summary.rps - b.summary.rps);
    const median = sorted[Math.floor(sorted.length / 2)];
    report.ceiling = {
      what: 'GET / on a bare Fastify app, pino at the same level and options as the service',
      rps: median?.summary.rps,
      runs: ceilings.map((c) => ({
        before: c.before,
        rps: c.summary.rps,
        latencyMs: c.summary.latencyMs,
        cpuMsPerRequest: tripsPer(c.stats, c.summary.requests)?.cpuMsPerRequest,
      })),
    };
    report.endpoints = {
      note: 'API process alone (ROLE=api): accepted prompts are queued, no worker competes for the CPU; each ratio is to the ceiling run just before it',
      ...endpoints,
    };
  }

  // 4: drain. Whatever earlier runs queued is set aside so the backlog is exactly N prompts.
  let worker: BenchChild | undefined;
  if (wanted('drain')) {
    const queueConnection = new Redis(redisUrl, { maxRetriesPerRequest: null });
    const queue = createReplyQueue(queueConnection, redisPrefix);
    await queue.drain(true);
    await queue.close();
    queueConnection.disconnect();
    await db.query(
      `update messages set status = 'cancelled', completed_at = now(), updated_at = now()
       where status in ('queued', 'streaming')`,
    );
    const n = settings.drainPrompts;
    log(`drain: queueing ${n} prompts through the API (ROLE=api, no worker), in new rooms`);
    const enqueue = await cannon({
      url,
      connections: settings.connections,
      amount: n,
      requests: messageRequests(await freshRooms(url, users)),
    });
    checkCannon('drain enqueue', enqueue);
    const {
      rows: [queued],
    } = await db.query<{ n: number }>(
      `select count(*)::int as n from messages where role = 'assistant' and status = 'queued'`,
    );
    log(`drain: ${queued?.n} queued; starting one worker process`);
    const drainStartedAt = new Date();
    worker = startChild('worker', 'server.ts', serviceEnv({ ROLE: 'worker', ...workerTuning }));
    await worker.ready;
    await stats(worker, true);
    // The worker takes jobs from the moment it starts, a little before it says it is ready: the
    // per-reply costs are over the replies finished inside the measured window.
    const doneBefore = await db.query<{ n: number }>(
      `select count(*)::int as n from messages where role = 'assistant' and started_at >= $1
       and completed_at is not null`,
      [drainStartedAt],
    );
    const deadline = Date.now() + Math.max(120_000, n * 20);
    let pending = Number.POSITIVE_INFINITY;
    const { cpu: drainCpu } = await withCpu(() =>
      profiled('drain', [worker!], async () => {
        while (Date.now() < deadline) {
          const { rows } = await db.query<{ n: number }>(
            `select count(*)::int as n from messages where status in ('queued', 'streaming')`,
          );
          pending = rows[0]?.n ?? 0;
          if (pending === 0) break;
          await sleep(100);
        }
      }),
    );
    const workerStats = await stats(worker, true);
    const {
      rows: [span],
    } = await db.query<{ n: number; completed: number; first: Date; last: Date; ms: number }>(
      `select count(*)::int as n,
              count(*) filter (where status = 'completed')::int as completed,
              min(started_at) as first, max(completed_at) as last,
              extract(epoch from max(completed_at) - min(started_at)) * 1000 as ms
       from messages where role = 'assistant' and started_at >= $1`,
      [drainStartedAt],
    );
    const { rows: perSecond } = await db.query<{ n: number }>(
      `select count(*)::int as n from messages
       where role = 'assistant' and started_at >= $1 and completed_at is not null
       group by date_trunc('second', completed_at) order by 1`,
      [drainStartedAt],
    );
    const seconds = perSecond.map((r) => r.n);
    const drained = span?.completed ?? 0;
    const inWindow = drained - (doneBefore.rows[0]?.n ?? 0);
    const rate = span && span.ms > 0 ? round((drained / span.ms) * 1000, 1) : 0;
    if (pending !== 0) failures.push(`drain: ${pending} replies still pending at the deadline`);
    if (drained !== queued?.n) failures.push(`drain: ${drained} of ${queued?.n} replies completed`);
    target('drain replies per second (one worker)', rate, '>=', TARGETS.drainPerSecond);
    report.drain = {
      prompts: queued?.n,
      enqueue: { rps: enqueue.rps, latencyMs: enqueue.latencyMs, durationS: enqueue.durationS },
      completed: drained,
      drainMs: round(Number(span?.ms ?? 0), 0),
      repliesPerSecond: rate,
      perSecondCompleted: {
        // The first and last seconds are partial.
        median: percentile(seconds.slice(1, -1), 50),
        min: Math.min(...seconds.slice(1, -1)),
        max: Math.max(...seconds),
      },
      target: TARGETS.drainPerSecond,
      pass: rate >= TARGETS.drainPerSecond,
      worker: {
        concurrency: workerTuning.WORKER_CONCURRENCY ?? 'WORKER_CONCURRENCY default (50)',
        perReply: tripsPer(workerStats, inWindow),
        otherCpuPerReply: cpuPer(drainCpu, inWindow),
        cpuMs: workerStats?.cpuMs,
        peakRssMb: workerStats?.peakRssMb,
      },
    };
  }

  // 3: pipeline at a steady rate, API and worker in separate processes (one per core).
  if (wanted('pipeline')) {
    worker ??= startChild('worker', 'server.ts', serviceEnv({ ROLE: 'worker', ...workerTuning }));
    await worker.ready;
    const rooms = allRooms(await freshRooms(url, users));
    const agent = sseAgent();
    const total = settings.pipelineRate * settings.pipelineS;
    const intervalMs = 1000 / settings.pipelineRate;
    log(`pipeline: ${total} prompts at ${settings.pipelineRate}/s (1 in ${SSE_SHARE} over SSE)`);
    // Warm-up: one prompt per room, not measured.
    await Promise.all(
      rooms.slice(0, 50).map(({ room, authorization }) =>
        sseRequest(
          agent,
          url,
          {
            method: 'POST',
            path: `/chatroom/${room}/message`,
            headers: { authorization },
            body: JSON.stringify({ content: 'warm-up' }),
          },
          30_000,
        ),
      ),
    );
    await stats(api, true);
    await stats(worker, true);
    // Most prompts are plain POSTs (202, as most clients send them); one in SSE_SHARE asks for
    // the reply on the same response (Accept: text/event-stream), which gives the client's view.
    const pendingPlain: Array<ReturnType<typeof jsonRequest>> = [];
    const pendingSse: Array<Promise<SseResult>> = [];
    const pipelineWorker = worker;
    if (profile) await Promise.all([api.profileStart(), pipelineWorker.profileStart()]);
    const before = await cpuMeter.snapshot().catch(() => undefined);
    const t0 = performance.now();
    for (let i = 0; i < total; i++) {
      const due = t0 + i * intervalMs;
      const wait = due - performance.now();
      if (wait > 1) await sleep(wait);
      const { room, authorization } = rooms[i % rooms.length]!;
      const init = {
        method: 'POST',
        path: `/chatroom/${room}/message`,
        headers: { authorization },
        body: JSON.stringify({ content: `Pipeline prompt ${i}` }),
      };
      if (i % SSE_SHARE === 0) pendingSse.push(sseRequest(agent, url, init, 30_000));
      else pendingPlain.push(jsonRequest(agent, url, init, 30_000));
    }
    const sendMs = performance.now() - t0;
    const plain = await Promise.all(pendingPlain);
    const results = await Promise.all(pendingSse);
    // Every reply stored before the window closes (the plain POSTs do not wait for theirs).
    const ids: string[] = [];
    for (const r of plain) {
      const body = r.body as { assistantMessage?: { id: string } } | null;
      if (r.status === 202 && body?.assistantMessage) ids.push(body.assistantMessage.id);
    }
    const settleBy = Date.now() + 30_000;
    while (Date.now() < settleBy) {
      const { rows } = await db.query<{ n: number }>(
        `select count(*)::int as n from messages where id = any($1::uuid[]) and completed_at is null`,
        [ids],
      );
      if ((rows[0]?.n ?? 0) === 0) break;
      await sleep(50);
    }
    const pipelineCpu = before ? await cpuMeter.since(before).catch(() => undefined) : undefined;
    if (profile) {
      mkdirSync(profilesDir, { recursive: true });
      for (const c of [api, pipelineWorker]) {
        await c.profileStop(path.join(profilesDir, `pipeline-${c.name}.cpuprofile`));
      }
    }
    const apiStats = await stats(api, true);
    const workerStats = await stats(worker, true);
    agent.destroy();
    const clientMs: number[] = [];
    const clientTotalMs: number[] = [];
    let bad = plain.length - ids.length;
    for (const r of results) {
      const accepted = r.events.find((e) => e.event === 'accepted');
      const done = r.events.find((e) => e.event === 'done');
      if (r.status !== 200 || !accepted || !done) {
        bad++;
        continue;
      }
      const body = JSON.parse(accepted.data) as { assistantMessage: { id: string } };
      const final = JSON.parse(done.data) as { status: string };
      if (final.status !== 'completed') bad++;
      ids.push(body.assistantMessage.id);
      clientMs.push(done.at - accepted.at);
      clientTotalMs.push(done.at - r.sentAt);
    }
    const acceptMs = plain.map((r) => r.at - r.sentAt);
    if (bad > 0) failures.push(`pipeline: ${bad} of ${total} prompts did not complete`);
    const { rows } = await db.query<{ ms: number }>(
      `select extract(epoch from completed_at - created_at) * 1000 as ms
       from messages where id = any($1::uuid[]) and status = 'completed'`,
      [ids],
    );
    const storedMs = rows.map((r) => Number(r.ms));
    const p50 = round(percentile(storedMs, 50));
    const p99 = round(percentile(storedMs, 99));
    target('pipeline p50 ms (created_at -> completed_at)', p50, '<=', TARGETS.pipelineP50Ms);
    target('pipeline p99 ms (created_at -> completed_at)', p99, '<=', TARGETS.pipelineP99Ms);
    report.pipeline = {
      note: `ROLE=api and ROLE=worker in two processes; instant model; open-loop at a fixed rate; one prompt in ${SSE_SHARE} POSTed with Accept: text/event-stream, the others plain (202)`,
      prompts: total,
      offeredRate: settings.pipelineRate,
      achievedSendRate: round((total / sendMs) * 1000, 1),
      completed: rows.length,
      storedMs: {
        what: 'completed_at - created_at of the assistant message, from PostgreSQL',
        p50,
        p99,
        max: round(Math.max(...storedMs)),
      },
      clientAcceptMs: {
        what: 'client: plain POST sent to its 202 answer',
        p50: round(percentile(acceptMs, 50)),
        p99: round(percentile(acceptMs, 99)),
      },
      clientSseMs: {
        what: 'client, one prompt in SSE_SHARE: `accepted` event to `done` event on the same SSE response',
        prompts: results.length,
        p50: round(percentile(clientMs, 50)),
        p99: round(percentile(clientMs, 99)),
      },
      clientRequestToDoneMs: {
        p50: round(percentile(clientTotalMs, 50)),
        p99: round(percentile(clientTotalMs, 99)),
      },
      targets: { p50: TARGETS.pipelineP50Ms, p99: TARGETS.pipelineP99Ms },
      pass: p50 <= TARGETS.pipelineP50Ms && p99 <= TARGETS.pipelineP99Ms,
      otherCpuPerPrompt: cpuPer(pipelineCpu, total),
      api: { perPrompt: tripsPer(apiStats, total), eventLoopDelayMs: apiStats?.eventLoopDelayMs },
      worker: {
        perReply: tripsPer(workerStats, total),
        eventLoopDelayMs: workerStats?.eventLoopDelayMs,
      },
    };
  }
  // Made through the API that is still up; the streams' API process starts fresh.
  const streamUsers = wanted('streams') ? await freshRooms(url, users) : users;
  if (worker) await stopChild(worker);
  await stopChild(api);

  // 5: streams, on a fresh API process so its peak RSS is the streams' own.
  if (wanted('streams')) {
    const n = settings.streams;
    api = startChild('api-streams', 'server.ts', serviceEnv({ ROLE: 'api' }));
    const streamWorker = startChild(
      'worker-streams',
      'server.ts',
      serviceEnv({
        ROLE: 'worker',
        WORKER_CONCURRENCY: String(n),
        BENCH_LLM_DELTAS: String(settings.streamDeltas),
        BENCH_LLM_DURATION_MS: String(settings.streamMs),
      }),
    );
    const streamUrl = await api.url();
    await streamWorker.ready;
    const rooms = allRooms(streamUsers);
    const agent = sseAgent();
    const streamOnce = (i: number, label: string) => {
      const { room, authorization } = rooms[i % rooms.length]!;
      return sseRequest(
        agent,
        streamUrl,
        {
          method: 'POST',
          path: `/chatroom/${room}/message`,
          headers: { authorization },
          body: JSON.stringify({ content: `${label} ${i}` }),
        },
        120_000,
      );
    };
    // Warm-up, not measured: a fresh process compiles its hot paths on the first requests, and
    // a burst of a thousand would otherwise measure V8's compiler, not the service.
    await Promise.all(Array.from({ length: STREAM_WARMUP }, (_, i) => streamOnce(i, 'Warm-up')));
    const startStats = await stats(api, true);
    log(
      `streams: ${n} concurrent SSE replies, ${settings.streamDeltas} deltas over ${settings.streamMs} ms`,
    );
    const t0 = performance.now();
    const results = await profiled('streams', [api, streamWorker], () =>
      Promise.all(Array.from({ length: n }, (_, i) => streamOnce(i, 'Stream prompt'))),
    );
    const wallMs = performance.now() - t0;
    const apiStats = await stats(api, true);
    const workerStats = await stats(streamWorker, true);
    agent.destroy();
    let complete = 0;
    const durations: number[] = [];
    const problems: Record<string, number> = {};
    for (const r of results) {
      const deltas = r.events.filter((e) => e.event === 'delta').length;
      const accepted = r.events.find((e) => e.event === 'accepted');
      const done = r.events.find((e) => e.event === 'done');
      const ok =
        r.status === 200 &&
        accepted &&
        done &&
        deltas === settings.streamDeltas &&
        (JSON.parse(done.data) as { status: string }).status === 'completed';
      if (ok) {
        complete++;
        durations.push(done.at - accepted.at);
      } else {
        const why = r.error ?? `status ${r.status}, ${deltas} deltas, done=${Boolean(done)}`;
        problems[why] = (problems[why] ?? 0) + 1;
      }
    }
    if (complete !== n) failures.push(`streams: ${n - complete} of ${n} did not complete`);
    const rss = apiStats?.peakRssMb ?? Number.NaN;
    const eld = apiStats?.eventLoopDelayMs.p99 ?? Number.NaN;
    target('streams completed', complete, '>=', n);
    target('streams API peak RSS MB', rss, '<=', TARGETS.streamsPeakRssMb);
    target('streams API event-loop delay p99 ms', eld, '<=', TARGETS.streamsEventLoopP99Ms);
    report.streams = {
      note: 'fresh ROLE=api process (measured) + ROLE=worker process with WORKER_CONCURRENCY=streams; each stream is POST /chatroom/:id/message with Accept: text/event-stream',
      streams: n,
      completed: complete,
      problems,
      wallMs: round(wallMs, 0),
      acceptedToDoneMs: {
        ideal: settings.streamMs,
        p50: round(percentile(durations, 50), 0),
        p99: round(percentile(durations, 99), 0),
      },
      api: {
        rssBeforeMb: startStats?.rssMb,
        peakRssMb: rss,
        eventLoopDelayMs: apiStats?.eventLoopDelayMs,
        cpuMs: apiStats?.cpuMs,
        perStream: tripsPer(apiStats, n),
      },
      worker: {
        peakRssMb: workerStats?.peakRssMb,
        eventLoopDelayMs: workerStats?.eventLoopDelayMs,
        cpuMs: workerStats?.cpuMs,
      },
      targets: {
        peakRssMb: TARGETS.streamsPeakRssMb,
        eventLoopDelayP99Ms: TARGETS.streamsEventLoopP99Ms,
      },
      pass:
        complete === n && rss <= TARGETS.streamsPeakRssMb && eld <= TARGETS.streamsEventLoopP99Ms,
    };
    await stopChild(streamWorker);
    await stopChild(api);
  }
}

/** EXPLAIN ANALYZE of the hot queries on what the runs left in the tables. */
async function explain() {
  try {
    const { rows } = await db.query<{ messages: number; chatrooms: number }>(
      'select (select count(*)::int from messages) as messages, (select count(*)::int from chatrooms) as chatrooms',
    );
    report.explain = { tables: rows[0], queries: await explainHotQueries(db) };
  } catch (error) {
    log(`explain: ${(error as Error).message}`);
  }
}

async function cleanUp() {
  for (const child of children) await child.stop(5000).catch(() => {});
  await db.end().catch(() => {});
  if (!keep) {
    await admin
      .query(`drop database if exists "${dbName}" with (force)`)
      .catch((error: Error) => log(`could not drop ${dbName}: ${error.message}`));
    try {
      let cursor = '0';
      do {
        const [next, keys] = await redis.scan(cursor, 'MATCH', `${redisPrefix}*`, 'COUNT', 1000);
        cursor = next;
        if (keys.length > 0) await redis.unlink(...keys);
      } while (cursor !== '0');
    } catch (error) {
      log(`could not delete the ${redisPrefix}* keys: ${(error as Error).message}`);
    }
  } else {
    log(`kept database ${dbName} and redis prefix ${redisPrefix}`);
  }
  await admin.end().catch(() => {});
  redis.disconnect();
}

let crashed: unknown;
// Whatever happens, the database and the Redis keys of this run go away.
process.once('uncaughtException', (error) => {
  log(`uncaught: ${error.stack ?? error.message}`);
  void cleanUp().finally(() => process.exit(1));
});
process.once('SIGINT', () => {
  log('interrupted; cleaning up');
  void cleanUp().then(() => process.exit(130));
});
try {
  await main();
  await explain();
} catch (error) {
  crashed = error;
  failures.push(`bench crashed: ${(error as Error).stack ?? error}`);
}
await cleanUp();

if (profile || cpuProf) report.profiles = summariseProfiles(profilesDir);
report.targets = targets;
report.allTargetsPass = targets.every((t) => t.pass);
report.failures = failures;
report.ok = failures.length === 0;
report.loadAverageAtEnd = os.loadavg().map((v) => round(v));
report.elapsedS = round((performance.now() - started) / 1000, 1);
const text = JSON.stringify(report, null, 2);
mkdirSync(outDir, { recursive: true });
writeFileSync(path.join(outDir, quick ? 'latest-quick.json' : 'latest.json'), `${text}\n`);
process.stdout.write(`${text}\n`);
if (crashed) log(`crashed: ${(crashed as Error).message}`);
process.exit(failures.length > 0 || (strict && !report.allTargetsPass) ? 1 : 0);
