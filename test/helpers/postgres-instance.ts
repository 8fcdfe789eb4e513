import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { getFreePort } from './redis-instance.js';

const execFileAsync = promisify(execFile);

export interface PostgresInstance {
  readonly port: number;
  /** `postgres://postgres@127.0.0.1:<port>/<database>` (trust auth, no password). */
  url(database?: string): string;
  /** `pg_ctl stop -m fast -w`. */
  stop(): Promise<void>;
  /** Start again on the same port; the data directory is kept. */
  start(): Promise<void>;
  restart(): Promise<void>;
  /** `pg_ctl stop -m immediate` and remove the temp dir. Safe to call more than once. */
  destroy(): Promise<void>;
}

const PG_BIN_DIRS = ['/usr/lib/postgresql/15/bin', '/usr/local/bin'];
const LOG_TAIL_LINES = 40;

function pgBinary(name: string): string {
  for (const dir of PG_BIN_DIRS) {
    const candidate = path.join(dir, name);
    if (existsSync(candidate)) return candidate;
  }
  return name;
}

async function postgresIds(): Promise<{ uid: number; gid: number }> {
  const [uid, gid] = await Promise.all([
    execFileAsync('id', ['-u', 'postgres']),
    execFileAsync('id', ['-g', 'postgres']),
  ]);
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

/** PostgreSQL refuses to run as root, so as root the binaries run as the postgres user. */
async function runPg(dir: string, binary: string, args: string[]): Promise<void> {
  const bin = pgBinary(binary);
  let file = bin;
  let fileArgs = args;
  if (process.getuid?.() === 0) {
    const runuser = ['/usr/sbin/runuser', '/sbin/runuser'].find((p) => existsSync(p));
    if (runuser) {
      file = runuser;
      fileArgs = ['-u', 'postgres', '--', bin, ...args];
    } else {
      file = 'su';
      fileArgs = ['postgres', '-s', '/bin/sh', '-c', [bin, ...args].map(shellQuote).join(' ')];
    }
  }
  try {
    // cwd: the postgres user usually cannot read the caller's working directory.
    await execFileAsync(file, fileArgs, { cwd: dir });
  } catch (err) {
    const e = err as Error & { code?: number | string; stdout?: string; stderr?: string };
    throw new Error(
      `${binary} ${args.join(' ')} failed (exit ${e.code}):\n${e.stderr ?? ''}${e.stdout ?? ''}`,
    );
  }
}

function shellQuote(arg: string): string {
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}

export async function startPostgresInstance(): Promise<PostgresInstance> {
  const port = await getFreePort();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pg-instance-'));
  const dataDir = path.join(dir, 'data');
  const logFile = path.join(dir, 'log');
  let running = false;
  let destroyed = false;

  const logTail = async (): Promise<string> => {
    try {
      const log = await readFile(logFile, 'utf8');
      return log.split('\n').slice(-LOG_TAIL_LINES).join('\n');
    } catch {
      return '(no server log)';
    }
  };

  const start = async (): Promise<void> => {
    if (destroyed) throw new Error('postgres instance was destroyed');
    if (running) return;
    const serverOptions = `-p ${port} -c listen_addresses=127.0.0.1 -k ${dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off`;
    try {
      await runPg(dir, 'pg_ctl', [
        '-D',
        dataDir,
        '-o',
        serverOptions,
        '-l',
        logFile,
        '-w',
        '-t',
        '60',
        'start',
      ]);
    } catch (err) {
      throw new Error(
        `${(err as Error).message}\n--- server log tail (${logFile}) ---\n${await logTail()}`,
      );
    }
    running = true;
  };

  const stop = async (mode: 'fast' | 'immediate'): Promise<void> => {
    if (!running) return;
    await runPg(dir, 'pg_ctl', ['-D', dataDir, '-m', mode, '-w', 'stop']);
    running = false;
  };

  const instance: PostgresInstance = {
    port,
    url: (database = 'postgres') => `postgres://postgres@127.0.0.1:${port}/${database}`,
    stop: () => stop('fast'),
    start,
    async restart() {
      await stop('fast');
      await start();
    },
    async destroy() {
      if (destroyed) return;
      destroyed = true;
      // A failed or timed-out start can leave a postmaster behind, so stop whenever a pid file exists.
      if (running || existsSync(path.join(dataDir, 'postmaster.pid'))) {
        try {
          await runPg(dir, 'pg_ctl', ['-D', dataDir, '-m', 'immediate', '-w', 'stop']);
        } catch {
          // already stopped
        }
        running = false;
      }
      await rm(dir, { recursive: true, force: true });
    },
  };

  try {
    if (process.getuid?.() === 0) {
      const { uid, gid } = await postgresIds();
      await chown(dir, uid, gid);
    }
    // --locale=C: initdb fails when the inherited locale is not installed; C works with any encoding.
    await runPg(dir, 'initdb', [
      '-D',
      dataDir,
      '-U',
      'postgres',
      '--auth=trust',
      '--no-sync',
      '-E',
      'UTF8',
      '--locale=C',
    ]);
    await start();
  } catch (err) {
    await instance.destroy();
    throw err;
  }
  return instance;
}
