import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, type WriteStream } from 'node:fs';
import path from 'node:path';
import { repoRoot } from '../helpers/process.js';

export type Role = 'api' | 'worker';

const START_TIMEOUT_MS = 90_000;

/**
 * One service process (`ROLE=api` or `ROLE=worker`) that can be killed and started again with the
 * same environment (and port). Its output goes to a log file; the tail is kept for reports.
 */
export class ServiceProcess {
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private log: WriteStream;
  private tail = '';
  private listeners = new Set<() => void>();
  starts = 0;

  constructor(
    readonly name: string,
    readonly role: Role,
    readonly port: number | undefined,
    private readonly entry: string,
    private readonly env: Record<string, string>,
    logDir: string,
  ) {
    this.log = createWriteStream(path.join(logDir, `${name}.log`), { flags: 'a' });
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  alive(): boolean {
    return this.child !== undefined;
  }

  output(): string {
    return this.tail;
  }

  async start(): Promise<void> {
    if (this.child) return;
    this.starts++;
    this.tail = '';
    this.log.write(`\n--- start #${this.starts} at ${new Date().toISOString()} ---\n`);
    const child = spawn(process.execPath, ['--import', 'tsx', this.entry], {
      cwd: repoRoot,
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '/tmp',
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const onData = (chunk: Buffer) => {
      this.log.write(chunk);
      this.tail = (this.tail + chunk.toString()).slice(-20_000);
      for (const listener of this.listeners) listener();
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.log.write(
          `--- exit code=${code} signal=${signal} at ${new Date().toISOString()} ---\n`,
        );
        if (this.child === child) this.child = undefined;
        for (const listener of this.listeners) listener();
        resolve();
      });
    });
    try {
      if (this.role === 'api') await this.waitForHttp();
      else await this.waitForLog(/service started/);
    } catch (error) {
      await this.kill('SIGKILL');
      throw error;
    }
  }

  /** Sends `signal` and waits for the process to exit (SIGKILL after 10 s). */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child) return;
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    try {
      await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Synchronous last-resort kill (process exit handlers). */
  killNow(): void {
    this.child?.kill('SIGKILL');
  }

  async close(): Promise<void> {
    await this.kill('SIGKILL');
    await new Promise<void>((resolve) => this.log.end(resolve));
  }

  private async waitForHttp(): Promise<void> {
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (!this.child) throw new Error(`${this.name} exited during start-up:\n${this.tail}`);
      try {
        const res = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`${this.name} did not start:\n${this.tail}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  private waitForLog(pattern: RegExp): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.listeners.delete(check);
        reject(new Error(`${this.name} did not log ${pattern}:\n${this.tail}`));
      }, START_TIMEOUT_MS);
      const check = () => {
        if (pattern.test(this.tail)) {
          clearTimeout(timer);
          this.listeners.delete(check);
          resolve();
        } else if (!this.child) {
          clearTimeout(timer);
          this.listeners.delete(check);
          reject(new Error(`${this.name} exited during start-up:\n${this.tail}`));
        }
      };
      this.listeners.add(check);
      check();
    });
  }
}
