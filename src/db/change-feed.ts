import pg from 'pg';
import { CacheGroup } from '../lib/local-cache.js';
import type { Logger } from '../lib/logger.js';

const RECONNECT_MS = 1000;

export interface ChangeFeedOptions {
  databaseUrl: string;
  /** The NOTIFY channel; each notification's payload is one key to drop. */
  channel: string;
  /** TTL of the caches' entries; 0 turns them off (and nothing listens). */
  ttlMs: number;
  logger: Logger;
  /** How often the listening connection is checked, and how long a check may take (5,000 ms). */
  heartbeatMs?: number;
}

/**
 * Process caches kept true by PostgreSQL itself: triggers NOTIFY the key of every committed
 * change (see migration 0001), whoever wrote it, and this process LISTENs on a connection of its
 * own. The caches serve only while that connection is confirmed listening: they are emptied and
 * bypassed when it drops, and emptied again once LISTEN succeeds after a reconnect. A connection
 * that stops answering without closing (a half-open socket) is caught by a heartbeat query.
 *
 * The listener needs a session-level connection: behind a pooler in transaction mode, point
 * DATABASE_URL at PostgreSQL itself (or the caches stay off, which is safe, only slower).
 */
export class ChangeFeed extends CacheGroup {
  private client: pg.Client | undefined;
  private stopped = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private reconnect: NodeJS.Timeout | undefined;

  constructor(private readonly o: ChangeFeedOptions) {
    super(o.ttlMs, o.heartbeatMs);
  }

  /** Starts listening; resolves once it listens, or after 1 s (until then, lookups miss). */
  async start(): Promise<void> {
    if (!this.enabled || this.heartbeat) return;
    this.heartbeat = setInterval(() => void this.beat(), this.heartbeatMs);
    this.heartbeat.unref();
    await Promise.race([this.connect(), new Promise((r) => setTimeout(r, 1000).unref())]);
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const client = new pg.Client({
      connectionString: this.o.databaseUrl,
      application_name: 'gemini-chat change feed',
      keepAlive: true,
      // An unreachable server fails the attempt (and a retry follows) instead of hanging it.
      connectionTimeoutMillis: 5000,
    });
    this.client = client;
    client.on('error', (error) => this.abandon(client, error.message));
    client.on('end', () => this.abandon(client, 'connection ended'));
    client.on('notification', (message) => {
      if (message.channel === this.o.channel && message.payload) {
        this.dropLocal(undefined, [message.payload]);
      }
    });
    try {
      await client.connect();
      await client.query(`LISTEN ${pg.escapeIdentifier(this.o.channel)}`);
      if (this.client !== client || this.stopped) return;
      // Changes committed before LISTEN took effect were not heard: start empty.
      this.up();
    } catch (error) {
      this.abandon(client, (error as Error).message);
    }
  }

  /** The connection can no longer be trusted to hear every change: caches off, reconnect. */
  private abandon(client: pg.Client, reason: string) {
    if (this.client !== client) return;
    this.client = undefined;
    if (this.isLive) {
      this.o.logger.warn({ reason }, 'database change feed lost; process caches off until back');
    }
    this.down();
    client.end().catch(() => {});
    this.retry();
  }

  private retry() {
    if (this.stopped || this.reconnect) return;
    this.reconnect = setTimeout(() => {
      this.reconnect = undefined;
      void this.connect();
    }, RECONNECT_MS);
    this.reconnect.unref();
  }

  /** A query on the listening connection must come back within a heartbeat. */
  private async beat(): Promise<void> {
    const client = this.client;
    if (!client || !this.isLive) return;
    let timer: NodeJS.Timeout | undefined;
    const answered = await Promise.race([
      client.query('select 1').then(
        () => true,
        () => false,
      ),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), this.heartbeatMs);
      }),
    ]);
    clearTimeout(timer);
    if (!answered) this.abandon(client, 'the connection stopped answering');
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.down();
    clearInterval(this.heartbeat);
    clearTimeout(this.reconnect);
    const client = this.client;
    this.client = undefined;
    await client?.end().catch(() => {});
  }
}
