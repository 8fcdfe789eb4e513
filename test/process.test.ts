import { spawn } from 'node:child_process';
import { readMigrationFiles } from 'drizzle-orm/migrator';
import pg from 'pg';
import { afterEach, describe, expect, inject, it } from 'vitest';
import { migrationsFolder } from '../src/db/migrate.js';
import { createTestDatabase, testEnv, testRedisPrefix } from './helpers/context.js';
import { PG_BASE_URL } from './helpers/env.js';
import { repoRoot, type ServiceProcess, spawnService } from './helpers/process.js';
import { getFreePort } from './helpers/redis-instance.js';

const running: ServiceProcess[] = [];
const cleanups: Array<() => Promise<void>> = [];

afterEach(async () => {
  await Promise.all(running.splice(0).map((p) => p.stop('SIGKILL')));
  for (const cleanup of cleanups.splice(0)) await cleanup();
});

function start(entry: string, env: Record<string, string>) {
  const proc = spawnService(entry, env);
  running.push(proc);
  return proc;
}

describe('the service process', () => {
  it('builds and serves /readyz with `npm start`', async () => {
    const db = await createTestDatabase();
    cleanups.push(db.drop);
    const port = await getFreePort();
    const child = spawn('npm', ['start', '--silent'], {
      cwd: repoRoot,
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '/tmp',
        ...testEnv({
          DATABASE_URL: db.url,
          REDIS_PREFIX: testRedisPrefix(),
          PORT: String(port),
          HOST: '127.0.0.1',
        }),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    let output = '';
    const collect = (chunk: Buffer) => {
      output += chunk.toString();
    };
    child.stdout?.on('data', collect);
    child.stderr?.on('data', collect);
    const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
    try {
      const deadline = Date.now() + 60_000;
      let status = 0;
      while (Date.now() < deadline && status !== 200) {
        status = await fetch(`http://127.0.0.1:${port}/readyz`).then(
          (r) => r.status,
          () => 0,
        );
        if (status !== 200) await new Promise((resolve) => setTimeout(resolve, 250));
      }
      expect(status).toBe(200);
    } finally {
      // npm runs the service as its child: signal the whole group.
      process.kill(-child.pid!, 'SIGTERM');
    }
    await exited;
    // npm itself ends by the signal; the service inside it shut down cleanly.
    expect(output).toMatch(/shutdown complete/);
  }, 90_000);

  it('refuses a bad PORT with a message naming PORT', async () => {
    const proc = start('src/main.ts', testEnv({ PORT: 'abc' }));
    expect(await proc.exited).not.toBe(0);
    expect(proc.output()).toMatch(/PORT must be a port number/);
  });

  it('exits with one clear line when PostgreSQL is unreachable', async () => {
    const port = await getFreePort();
    const proc = start(
      'src/main.ts',
      testEnv({ DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/x` }),
    );
    expect(await proc.exited).not.toBe(0);
    expect(proc.output()).toContain(
      `Cannot reach PostgreSQL at postgres://postgres@127.0.0.1:${port}/x`,
    );
    expect(proc.output()).toMatch(/Start PostgreSQL/);
  });

  it('exits with one clear line when Redis is unreachable', async () => {
    const db = await createTestDatabase();
    cleanups.push(db.drop);
    const port = await getFreePort();
    const proc = start(
      'src/main.ts',
      testEnv({ DATABASE_URL: db.url, REDIS_URL: `redis://127.0.0.1:${port}` }),
    );
    expect(await proc.exited).not.toBe(0);
    expect(proc.output()).toContain(`Cannot reach Redis at redis://127.0.0.1:${port}`);
  });

  it('brings two instances up together on an empty database and migrates once', async () => {
    const name = `gct_${inject('runId')}_fresh_${process.pid}`;
    const url = `${PG_BASE_URL}/${name}`;
    const prefix = testRedisPrefix();
    const ports = [await getFreePort(), await getFreePort()];
    const procs = ports.map((port) =>
      start(
        'src/main.ts',
        testEnv({ DATABASE_URL: url, REDIS_PREFIX: prefix, PORT: String(port), HOST: '127.0.0.1' }),
      ),
    );
    await Promise.all(procs.map((p) => p.waitForOutput(/service started/)));
    for (const port of ports) {
      const res = await fetch(`http://127.0.0.1:${port}/readyz`);
      expect(res.status).toBe(200);
    }
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    const { rows } = await client.query<{ hash: string }>(
      'select hash from drizzle.__drizzle_migrations',
    );
    await client.end();
    const files = readMigrationFiles({ migrationsFolder });
    expect(rows.map((r) => r.hash).sort()).toEqual(files.map((f) => f.hash).sort());
  });

  it('finishes an in-flight request on SIGTERM, then exits 0', async () => {
    const db = await createTestDatabase();
    cleanups.push(db.drop);
    const port = await getFreePort();
    const proc = start(
      'test/fixtures/slow-service.ts',
      testEnv({
        DATABASE_URL: db.url,
        REDIS_PREFIX: testRedisPrefix(),
        PORT: String(port),
        HOST: '127.0.0.1',
      }),
    );
    await proc.waitForOutput(/service started/);
    const pending = fetch(`http://127.0.0.1:${port}/slow`);
    await new Promise((resolve) => setTimeout(resolve, 300));
    proc.child.kill('SIGTERM');
    const res = await pending;
    expect(res.status).toBe(200);
    // The keep-alive connection is not kept: the server can close as soon as this is sent.
    expect(res.headers.get('connection')).toBe('close');
    expect(await res.json()).toEqual({ finished: true });
    expect(await proc.exited).toBe(0);
    expect(proc.output()).toMatch(/shutdown complete/);
  });
});
