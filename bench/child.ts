import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, type WriteStream } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ProbeStats } from './probe.js';

export const benchDir = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(benchDir, '..');
export const outDir = path.join(benchDir, 'out');

const START_TIMEOUT_MS = 60_000;

interface ChildOptions {
  name: string;
  entry: 'server.ts' | 'ceiling.ts';
  env: Record<string, string>;
  /** Writes a V8 CPU profile to bench/out/profiles/<name>/ on exit. */
  profile?: boolean;
}

/**
 * A service (or ceiling) process started with `node --import tsx bench/<entry>`, talked to over
 * IPC: `ready` with its address once it listens, stats on request, a clean stop.
 */
export class BenchChild {
  readonly name: string;
  private readonly child: ChildProcess;
  private readonly log: WriteStream;
  private tail = '';
  private nextId = 1;
  private readonly waiting = new Map<number, (stats: ProbeStats) => void>();
  private readonly commands = new Map<number, (error?: string) => void>();
  private readonly exited: Promise<number | null>;
  private exitCode: number | null | undefined;
  readonly ready: Promise<{ address: string | undefined; at: number }>;

  constructor(options: ChildOptions) {
    this.name = options.name;
    mkdirSync(outDir, { recursive: true });
    this.log = createWriteStream(path.join(outDir, `${options.name}.log`));
    const args = ['--import', 'tsx'];
    if (options.profile) {
      const dir = path.join(outDir, 'profiles', options.name);
      mkdirSync(dir, { recursive: true });
      args.push('--cpu-prof', `--cpu-prof-dir=${dir}`);
    }
    args.push(path.join(benchDir, options.entry));
    this.child = spawn(process.execPath, args, {
      cwd: repoRoot,
      env: options.env,
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    });
    const onData = (chunk: Buffer) => {
      this.log.write(chunk);
      this.tail = (this.tail + chunk.toString()).slice(-4000);
    };
    this.child.stdout?.on('data', onData);
    this.child.stderr?.on('data', onData);
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code) => {
        this.exitCode = code;
        resolve(code);
      });
    });
    this.ready = new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`${this.name} did not start in time:\n${this.tail}`)),
        START_TIMEOUT_MS,
      );
      this.child.on('message', (message: { type: string; [key: string]: unknown }) => {
        if (message.type === 'ready') {
          clearTimeout(timer);
          resolve({ address: message.address as string | undefined, at: message.at as number });
        } else if (message.type === 'done') {
          this.commands.get(message.id as number)?.(message.error as string | undefined);
          this.commands.delete(message.id as number);
        } else if (message.type === 'stats') {
          this.waiting.get(message.id as number)?.(message.stats as ProbeStats);
          this.waiting.delete(message.id as number);
        }
      });
      void this.exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`${this.name} exited (code ${code}) before it was ready:\n${this.tail}`));
      });
    });
    // A rejection nobody awaits yet (the child died later) must not crash the bench.
    this.ready.catch(() => {});
  }

  get pid() {
    return this.child.pid;
  }

  output() {
    return this.tail;
  }

  async url(): Promise<string> {
    const { address } = await this.ready;
    if (!address) throw new Error(`${this.name} does not listen`);
    return address.replace('0.0.0.0', '127.0.0.1');
  }

  /** The probe's figures; `reset` starts a new window (delay histogram, peak RSS, counters). */
  stats(reset = false): Promise<ProbeStats> {
    if (this.exitCode !== undefined) return Promise.reject(new Error(`${this.name} has exited`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no stats`)), 10_000);
      this.waiting.set(id, (stats) => {
        clearTimeout(timer);
        resolve(stats);
      });
      this.child.send({ cmd: 'stats', id, reset });
    });
  }

  /** Starts V8's CPU profiler in the child (see `profileStop`). */
  profileStart(): Promise<void> {
    return this.command({ cmd: 'profile-start' });
  }

  /** Stops the profiler and writes the profile to `file`. */
  profileStop(file: string): Promise<void> {
    return this.command({ cmd: 'profile-stop', file });
  }

  private command(message: Record<string, unknown>): Promise<void> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no answer`)), 30_000);
      this.commands.set(id, (error) => {
        clearTimeout(timer);
        if (error) reject(new Error(error));
        else resolve();
      });
      this.child.send({ ...message, id });
    });
  }

  /** Asks the process to close cleanly (flushing a CPU profile); kills it after `timeoutMs`. */
  async stop(timeoutMs = 30_000): Promise<number | null> {
    if (this.exitCode === undefined) {
      if (this.child.connected) this.child.send({ cmd: 'stop' });
      else this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
      await this.exited;
      clearTimeout(timer);
    }
    await new Promise<void>((resolve) => this.log.end(resolve));
    return this.exitCode ?? null;
  }

  /** Last resort, synchronous (exit handlers). */
  killNow() {
    if (this.exitCode === undefined) this.child.kill('SIGKILL');
  }
}
