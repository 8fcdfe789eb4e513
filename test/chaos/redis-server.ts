import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { getFreePort, redisCommand } from '../helpers/redis-instance.js';

/**
 * A redis-server of the chaos suite's own, with an append-only file fsynced on every write, so
 * that a restart keeps every acknowledged write (`stop()` + `start()`), and `wipe()` between
 * them makes the restart empty. The shared helper runs without persistence, which only allows
 * the empty kind of restart.
 */
export interface PersistentRedis {
  readonly port: number;
  readonly url: string;
  /** SIGTERM (Redis fsyncs its AOF and exits); SIGKILL after 5 s. */
  stop(): Promise<void>;
  start(): Promise<void>;
  /** Deletes the data files; only while stopped. */
  wipe(): Promise<void>;
  flushAll(): Promise<void>;
  dbSize(): Promise<number>;
  running(): boolean;
  /** Stop and remove the temp dir. Safe to call more than once. */
  destroy(): Promise<void>;
  /** Synchronous last-resort kill (process exit handlers). */
  killNow(): void;
}

const READY_TIMEOUT_MS = 15_000;

export async function startPersistentRedis(baseDir?: string): Promise<PersistentRedis> {
  const port = await getFreePort();
  const root = await mkdtemp(path.join(baseDir ?? os.tmpdir(), 'chaos-redis-'));
  const dataDir = path.join(root, 'data');
  await mkdir(dataDir, { recursive: true });
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let output = '';
  let destroyed = false;

  const launch = async (): Promise<void> => {
    if (destroyed) throw new Error('redis was destroyed');
    if (child) return;
    output = '';
    const proc = spawn(
      'redis-server',
      [
        '--port',
        String(port),
        '--bind',
        '127.0.0.1',
        '--save',
        '',
        '--appendonly',
        'yes',
        '--appendfsync',
        'always',
        '--dir',
        dataDir,
      ],
      { cwd: dataDir, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const collect = (chunk: Buffer): void => {
      output = (output + chunk.toString()).slice(-4000);
    };
    proc.stdout?.on('data', collect);
    proc.stderr?.on('data', collect);
    child = proc;
    let exitInfo: string | undefined;
    exited = new Promise((resolve) => {
      proc.once('close', (code, signal) => {
        exitInfo = `code=${code} signal=${signal}`;
        if (child === proc) child = undefined;
        resolve();
      });
      proc.once('error', (err) => {
        if (proc.pid !== undefined) return;
        exitInfo = err.message;
        if (child === proc) child = undefined;
        resolve();
      });
    });
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (exitInfo !== undefined) {
        throw new Error(
          `redis-server on port ${port} exited during start-up (${exitInfo}):\n${output}`,
        );
      }
      try {
        // Ready once the AOF is loaded: data commands answer LOADING errors until then.
        await redisCommand(port, ['DBSIZE'], 1000);
        const server = await redisCommand(port, ['INFO', 'server'], 1000);
        if (typeof server === 'string' && server.includes(`process_id:${proc.pid}\r\n`)) return;
        throw new Error(`port ${port} is answered by another redis server`);
      } catch (error) {
        if ((error as Error).message.includes('another redis')) throw error;
      }
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`redis-server on port ${port} not ready within ${READY_TIMEOUT_MS} ms`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };

  const terminate = async (signal: NodeJS.Signals): Promise<void> => {
    const proc = child;
    if (!proc) return;
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    try {
      await exited;
    } finally {
      clearTimeout(timer);
    }
  };

  const instance: PersistentRedis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    stop: () => terminate('SIGTERM'),
    start: launch,
    async wipe() {
      if (child) throw new Error('wipe() needs a stopped server');
      await rm(dataDir, { recursive: true, force: true });
      await mkdir(dataDir, { recursive: true });
    },
    async flushAll() {
      await redisCommand(port, ['FLUSHALL']);
    },
    async dbSize() {
      return Number(await redisCommand(port, ['DBSIZE']));
    },
    running: () => child !== undefined,
    async destroy() {
      if (destroyed) return;
      destroyed = true;
      await terminate('SIGTERM');
      await rm(root, { recursive: true, force: true });
    },
    killNow() {
      child?.kill('SIGKILL');
    },
  };
  try {
    await launch();
  } catch (error) {
    await instance.destroy();
    throw error;
  }
  return instance;
}
