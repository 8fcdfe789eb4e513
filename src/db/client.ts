import { drizzle, type NodePgDatabase } from 'drizzle-orm/node-postgres';
import pg from 'pg';
import { safeUrl } from '../lib/redis.js';
import * as schema from './schema/index.js';

export type Database = NodePgDatabase<typeof schema>;
/** A transaction handle; repository methods accept it in place of the database. */
export type Tx = Parameters<Parameters<Database['transaction']>[0]>[0];
export type DbOrTx = Database | Tx;

export interface DatabaseHandle {
  pool: pg.Pool;
  db: Database;
  close(): Promise<void>;
}

export function createDatabase(url: string, options: { max?: number } = {}): DatabaseHandle {
  const pool = new pg.Pool({
    connectionString: url,
    max: options.max ?? 30,
    // A refused connection (PostgreSQL down) fails at once either way; this bounds a connection
    // attempt to an unreachable host and the wait for a free client under a burst.
    connectionTimeoutMillis: 5000,
    idleTimeoutMillis: 30_000,
    application_name: 'gemini-chat',
  });
  // An idle client whose server went away emits here; the pool drops it and reconnects later.
  pool.on('error', () => {});
  const db = drizzle(pool, { schema, casing: 'snake_case' });
  let closed = false;
  return {
    pool,
    db,
    close: async () => {
      if (closed) return;
      closed = true;
      await pool.end();
    },
  };
}

/** Creates the database named in `url` when it does not exist yet. */
export async function ensureDatabase(url: string): Promise<void> {
  const target = new URL(url);
  const name = decodeURIComponent(target.pathname.slice(1));
  if (!name) return;
  const admin = new URL(url);
  admin.pathname = '/postgres';
  const client = new pg.Client({
    connectionString: admin.toString(),
    connectionTimeoutMillis: 3000,
  });
  try {
    await client.connect();
  } catch (error) {
    throw new Error(
      `Cannot reach PostgreSQL at ${safeUrl(url)} (${(error as Error).message}). Start PostgreSQL (for example: pg_ctlcluster 15 main start) or set DATABASE_URL.`,
    );
  }
  try {
    const existing = await client.query('select 1 from pg_database where datname = $1', [name]);
    if (existing.rowCount === 0) {
      await client.query(`create database "${name.replaceAll('"', '""')}"`).catch((error) => {
        // Another instance created it between our check and our create.
        if (!['42P04', '23505'].includes((error as { code?: string }).code ?? '')) throw error;
      });
    }
  } finally {
    await client.end();
  }
}
