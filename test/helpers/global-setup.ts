import { randomBytes } from 'node:crypto';
import { Redis } from 'ioredis';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { createDatabase, ensureDatabase } from '../../src/db/client.js';
import { runMigrations } from '../../src/db/migrate.js';
import { ADMIN_URL, REDIS_URL } from './env.js';

declare module 'vitest' {
  export interface ProvidedContext {
    runId: string;
    templateDatabase: string;
  }
}

/**
 * Once per test run: a run id that names every database and Redis key of the run, and a template
 * database with the migrations applied, so each test file clones it instead of migrating.
 */
export default async function setup(project: TestProject) {
  const runId = `${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
  const templateDatabase = `gct_${runId}_template`;
  const templateUrl = ADMIN_URL.replace(/\/[^/]*$/, `/${templateDatabase}`);
  await ensureDatabase(templateUrl);
  const handle = createDatabase(templateUrl, { max: 1 });
  await runMigrations(handle.pool);
  await handle.close();

  project.provide('runId', runId);
  project.provide('templateDatabase', templateDatabase);

  return async () => {
    const admin = new pg.Client({ connectionString: ADMIN_URL });
    await admin.connect();
    const { rows } = await admin.query<{ datname: string }>(
      'select datname from pg_database where datname like $1',
      [`gct_${runId}_%`],
    );
    for (const { datname } of rows) {
      await admin.query(`drop database if exists "${datname}" with (force)`);
    }
    await admin.end();

    const redis = new Redis(REDIS_URL);
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `gct:${runId}:*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.unlink(...keys);
    } while (cursor !== '0');
    redis.disconnect();
  };
}
