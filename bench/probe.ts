// Instruments a bench child process: event-loop delay, peak RSS, CPU time, and the number of
// PostgreSQL queries and Redis round trips it makes. The bench process reads them over IPC.
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Pipeline, Redis } from 'ioredis';
import pg from 'pg';

export interface ProbeStats {
  pid: number;
  /** Since the last reset. */
  windowMs: number;
  rssMb: number;
  peakRssMb: number;
  heapUsedMb: number;
  eventLoopDelayMs: { p50: number; p99: number; max: number };
  cpuMs: { user: number; system: number };
  trips: { pg: number; redis: number; redisCommands: number };
}

export type ProbeRequest =
  | { cmd: 'stats'; id: number; reset?: boolean }
  | { cmd: 'profile-start'; id: number }
  | { cmd: 'profile-stop'; id: number; file: string }
  | { cmd: 'stop' };

/** V8's CPU profiler over a window the bench chooses (a scenario, without start-up). */
class WindowProfiler {
  private session: Session | undefined;

  async start() {
    this.session ??= new Session();
    this.session.connect();
    await this.session.post('Profiler.enable');
    await this.session.post('Profiler.setSamplingInterval', { interval: 500 });
    await this.session.post('Profiler.start');
  }

  async stop(file: string) {
    if (!this.session) return;
    const { profile } = await this.session.post('Profiler.stop');
    writeFileSync(file, JSON.stringify(profile));
    await this.session.post('Profiler.disable');
    this.session.disconnect();
  }
}

const trips = { pg: 0, redis: 0, redisCommands: 0 };
let installed = false;

/** Counts queries and round trips by wrapping pg's Client.query and ioredis' sendCommand. */
function countTrips() {
  if (installed) return;
  installed = true;
  type Fn = (this: unknown, ...args: unknown[]) => unknown;
  const client = pg.Client.prototype as unknown as { query: Fn };
  const query = client.query;
  client.query = function (this: unknown, ...args: unknown[]) {
    trips.pg++;
    return query.apply(this, args);
  };
  const redis = Redis.prototype as unknown as { sendCommand: Fn };
  const send = redis.sendCommand;
  redis.sendCommand = function (this: unknown, ...args: unknown[]) {
    trips.redisCommands++;
    // A command of a pipeline or MULTI is sent with the pipeline's stream: not a trip of its own.
    if (args[1] === undefined) trips.redis++;
    return send.apply(this, args);
  };
  const pipeline = Pipeline.prototype as unknown as { exec: Fn };
  const exec = pipeline.exec;
  pipeline.exec = function (this: unknown, ...args: unknown[]) {
    trips.redis++;
    return exec.apply(this, args);
  };
}

export function startProbe(onStop: () => Promise<void>) {
  countTrips();
  const delay = monitorEventLoopDelay({ resolution: 10 });
  delay.enable();
  const mb = (bytes: number) => Math.round((bytes / 1048576) * 10) / 10;
  let peakRss = process.memoryUsage.rss();
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
  }, 20);
  sampler.unref();
  let since = performance.now();
  let cpu = process.cpuUsage();

  const stats = (reset: boolean): ProbeStats => {
    const rss = process.memoryUsage.rss();
    peakRss = Math.max(peakRss, rss);
    const used = process.cpuUsage(cpu);
    const out: ProbeStats = {
      pid: process.pid,
      windowMs: Math.round(performance.now() - since),
      rssMb: mb(rss),
      peakRssMb: mb(peakRss),
      heapUsedMb: mb(process.memoryUsage().heapUsed),
      eventLoopDelayMs: {
        p50: Math.round(delay.percentile(50) / 1e4) / 100,
        p99: Math.round(delay.percentile(99) / 1e4) / 100,
        max: Math.round(delay.max / 1e4) / 100,
      },
      cpuMs: { user: Math.round(used.user / 1000), system: Math.round(used.system / 1000) },
      trips: { ...trips },
    };
    if (reset) {
      delay.reset();
      peakRss = rss;
      since = performance.now();
      cpu = process.cpuUsage();
      trips.pg = 0;
      trips.redis = 0;
      trips.redisCommands = 0;
    }
    return out;
  };

  const profiler = new WindowProfiler();
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    clearInterval(sampler);
    try {
      await onStop();
    } finally {
      process.exit(0);
    }
  };
  process.on('message', (message: ProbeRequest) => {
    if (message.cmd === 'stats') {
      process.send?.({ type: 'stats', id: message.id, stats: stats(Boolean(message.reset)) });
    } else if (message.cmd === 'profile-start') {
      void profiler.start().then(
        () => process.send?.({ type: 'done', id: message.id }),
        (error: Error) => process.send?.({ type: 'done', id: message.id, error: error.message }),
      );
    } else if (message.cmd === 'profile-stop') {
      void profiler.stop(message.file).then(
        () => process.send?.({ type: 'done', id: message.id }),
        (error: Error) => process.send?.({ type: 'done', id: message.id, error: error.message }),
      );
    } else if (message.cmd === 'stop') {
      void stop();
    }
  });
  // The bench process went away (killed): do not outlive it.
  process.on('disconnect', () => void stop());
  process.on('SIGTERM', () => void stop());
  process.on('SIGINT', () => void stop());
}

export function ready(address: string | undefined) {
  process.send?.({ type: 'ready', address, at: Date.now() });
}
