// Where the machine's CPU went during a scenario: the whole machine (/proc/stat), our own
// PostgreSQL backends (pg_stat_activity of the bench database) and the Redis server.
import { readFileSync } from 'node:fs';
import type { Redis } from 'ioredis';
import type pg from 'pg';

/** Linux reports process CPU in clock ticks; USER_HZ is 100 on every mainstream kernel. */
const TICK_MS = 10;

function processTicks(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th overall.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return 0;
  }
}

function machineTicks(): { busy: number; total: number } {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
    const values = line.trim().split(/\s+/).slice(1).map(Number);
    const total = values.reduce((a, b) => a + b, 0);
    const idle = (values[3] ?? 0) + (values[4] ?? 0);
    return { busy: total - idle, total };
  } catch {
    return { busy: 0, total: 0 };
  }
}

export interface CpuSnapshot {
  at: number;
  machine: { busy: number; total: number };
  pg: Map<number, number>;
  redis: number;
}

export interface CpuUse {
  /** Share of all cores busy (everyone's work, the other engineers' included). */
  machineBusyPct: number;
  /** CPU milliseconds of the bench database's PostgreSQL backends and of the Redis server. */
  postgresMs: number;
  redisMs: number;
  wallMs: number;
}

export class CpuMeter {
  private redisPid: number | undefined;

  constructor(
    private readonly db: pg.Pool,
    private readonly redis: Redis,
    private readonly database: string,
  ) {}

  async snapshot(): Promise<CpuSnapshot> {
    if (this.redisPid === undefined) {
      const info = await this.redis.info('server');
      this.redisPid = Number(/process_id:(\d+)/.exec(info)?.[1] ?? 0);
    }
    const { rows } = await this.db.query<{ pid: number }>(
      'select pid from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()',
      [this.database],
    );
    const pgTicks = new Map<number, number>();
    for (const { pid } of rows) pgTicks.set(pid, processTicks(pid));
    return {
      at: performance.now(),
      machine: machineTicks(),
      pg: pgTicks,
      redis: this.redisPid ? processTicks(this.redisPid) : 0,
    };
  }

  /** CPU used between `before` and now (a backend that ended in between is missed). */
  async since(before: CpuSnapshot): Promise<CpuUse> {
    const after = await this.snapshot();
    let pgTicks = 0;
    // A backend that connected in between did all its work in between.
    for (const [pid, ticks] of after.pg) pgTicks += ticks - (before.pg.get(pid) ?? 0);
    const total = after.machine.total - before.machine.total;
    return {
      machineBusyPct:
        total > 0 ? Math.round(((after.machine.busy - before.machine.busy) / total) * 100) : 0,
      postgresMs: pgTicks * TICK_MS,
      redisMs: (after.redis - before.redis) * TICK_MS,
      wallMs: Math.round(after.at - before.at),
    };
  }
}
