import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface RedisInstance {
  readonly port: number;
  /** `redis://127.0.0.1:<port>` */
  readonly url: string;
  /** SIGTERM and wait for exit; SIGKILL if it is still alive after 5 s. */
  stop(): Promise<void>;
  /** SIGKILL and wait for exit (simulates a crash). */
  kill(): Promise<void>;
  /**
   * Start again on the same port. Without `persistent` nothing is saved, so the restarted
   * server is empty; with it every acknowledged write survives (unless `wipe()` ran).
   */
  start(): Promise<void>;
  restart(): Promise<void>;
  flushAll(): Promise<void>;
  dbSize(): Promise<number>;
  /** Deletes the data files; only while stopped (the next start is empty). */
  wipe(): Promise<void>;
  running(): boolean;
  /** Stop and remove the temp dir. Safe to call more than once. */
  destroy(): Promise<void>;
  /** Synchronous last-resort kill (process exit handlers). */
  killNow(): void;
}

export interface RedisInstanceOptions {
  port?: number;
  /** An append-only file fsynced on every write, so a restart keeps the data. */
  persistent?: boolean;
  /** Where the temp dir is made (default: the OS temp dir). */
  baseDir?: string;
}

export type RedisReply = string | number | null | RedisReply[];

const READY_TIMEOUT_MS = 15_000;
const STOP_GRACE_MS = 5_000;
const OUTPUT_TAIL_CHARS = 4_000;

export async function getFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      if (address === null || typeof address === 'string') {
        server.close();
        reject(new Error('could not determine a free port'));
        return;
      }
      server.close(() => resolve(address.port));
    });
  });
}

export async function startRedisInstance(opts: RedisInstanceOptions = {}): Promise<RedisInstance> {
  const port = opts.port ?? (await getFreePort());
  const root = await mkdtemp(path.join(opts.baseDir ?? os.tmpdir(), 'redis-instance-'));
  const dir = path.join(root, 'data');
  await mkdir(dir, { recursive: true });
  const persistence = opts.persistent
    ? ['--appendonly', 'yes', '--appendfsync', 'always']
    : ['--appendonly', 'no'];
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let output = '';
  let destroyed = false;

  const launch = async (): Promise<void> => {
    if (destroyed) throw new Error('redis instance was destroyed');
    if (child) return;
    output = '';
    const proc = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', ...persistence, '--dir', dir],
      { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    // Redis logs to stdout; the pipe must be drained or the server blocks once it fills.
    const collect = (chunk: Buffer): void => {
      output = (output + chunk.toString()).slice(-OUTPUT_TAIL_CHARS);
    };
    proc.stdout?.on('data', collect);
    proc.stderr?.on('data', collect);
    child = proc;
    let exitInfo: string | undefined;
    exited = new Promise((resolve) => {
      // 'close' rather than 'exit': it fires after stdout is drained, so the tail is complete.
      proc.once('close', (code, signal) => {
        exitInfo = `code=${code} signal=${signal}`;
        if (child === proc) child = undefined;
        resolve();
      });
      proc.once('error', (err) => {
        // Only a spawn failure means there is no process; a failed kill leaves it running.
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
          `redis-server on port ${port} exited during startup (${exitInfo}):\n${output}`,
        );
      }
      let answered = false;
      try {
        // DBSIZE, not PING: a persistent server answers LOADING until its data is read back.
        answered = typeof (await redisCommand(port, ['DBSIZE'], 1_000)) === 'number';
      } catch {
        // not accepting connections yet
      }
      if (answered) {
        // A PONG could come from another server that grabbed the port while ours was down.
        const info = await redisCommand(port, ['INFO', 'server']);
        if (typeof info === 'string' && info.includes(`process_id:${proc.pid}\r\n`)) return;
        await terminate('SIGKILL');
        throw new Error(
          `port ${port} is answered by another redis server, not by the one just started`,
        );
      }
      if (Date.now() > deadline) {
        await terminate('SIGKILL');
        throw new Error(
          `redis-server on port ${port} did not answer PING within ${READY_TIMEOUT_MS} ms:\n${output}`,
        );
      }
      await sleep(50);
    }
  };

  const terminate = async (signal: NodeJS.Signals): Promise<void> => {
    const proc = child;
    if (!proc) return;
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill('SIGKILL'), STOP_GRACE_MS);
    try {
      await exited;
    } finally {
      clearTimeout(timer);
    }
  };

  const instance: RedisInstance = {
    port,
    url: `redis://127.0.0.1:${port}`,
    stop: () => terminate('SIGTERM'),
    kill: () => terminate('SIGKILL'),
    start: launch,
    async restart() {
      await terminate('SIGTERM');
      await launch();
    },
    async flushAll() {
      await redisCommand(port, ['FLUSHALL']);
    },
    async dbSize() {
      return Number(await redisCommand(port, ['DBSIZE']));
    },
    async wipe() {
      if (child) throw new Error('wipe() needs a stopped server');
      await rm(dir, { recursive: true, force: true });
      await mkdir(dir, { recursive: true });
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
  } catch (err) {
    await instance.destroy();
    throw err;
  }
  return instance;
}

/**
 * Sends one command over a fresh raw TCP connection and returns the parsed reply.
 * Error replies reject. Kept dependency-free so it also works while a client library
 * would be stuck reconnecting.
 */
export async function redisCommand(
  port: number,
  args: readonly string[],
  timeoutMs = 5_000,
): Promise<RedisReply> {
  const payload = `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`;
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let buffer = Buffer.alloc(0);
    const finish = (err: Error | null, value?: RedisReply): void => {
      socket.destroy();
      if (err) reject(err);
      else resolve(value ?? null);
    };
    socket.setTimeout(timeoutMs, () =>
      finish(new Error(`redis command ${args[0]} timed out on port ${port}`)),
    );
    socket.once('error', (err) => finish(err));
    socket.once('close', () =>
      finish(new Error(`connection to port ${port} closed before a reply`)),
    );
    socket.once('connect', () => socket.write(payload));
    socket.on('data', (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      let parsed: ParsedReply | undefined;
      try {
        parsed = parseReply(buffer, 0);
      } catch (err) {
        finish(err as Error);
        return;
      }
      if (parsed) finish(null, parsed.value);
    });
  });
}

interface ParsedReply {
  value: RedisReply;
  next: number;
}

/** Returns undefined when the buffer does not yet hold a complete reply. */
function parseReply(buf: Buffer, offset: number): ParsedReply | undefined {
  const lineEnd = buf.indexOf('\r\n', offset);
  if (lineEnd === -1) return undefined;
  const type = String.fromCharCode(buf[offset] ?? 0);
  const line = buf.toString('utf8', offset + 1, lineEnd);
  const afterLine = lineEnd + 2;
  switch (type) {
    case '+':
      return { value: line, next: afterLine };
    case '-':
      throw new Error(`redis error reply: ${line}`);
    case ':':
      return { value: Number(line), next: afterLine };
    case '$': {
      const len = Number(line);
      if (len < 0) return { value: null, next: afterLine };
      if (buf.length < afterLine + len + 2) return undefined;
      return { value: buf.toString('utf8', afterLine, afterLine + len), next: afterLine + len + 2 };
    }
    case '*': {
      const count = Number(line);
      if (count < 0) return { value: null, next: afterLine };
      const items: RedisReply[] = [];
      let next = afterLine;
      for (let i = 0; i < count; i++) {
        const item = parseReply(buf, next);
        if (!item) return undefined;
        items.push(item.value);
        next = item.next;
      }
      return { value: items, next };
    }
    default:
      throw new Error(`unexpected redis reply type ${JSON.stringify(type)}`);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
