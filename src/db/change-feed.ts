import pg from 'pg';
import { CacheGroup } from '../lib/local-cache.js';
import type { Logger } from '../lib/logger.js';

const RECONNECT_MS = 1000;

export interface ChangeFeedOptions {
  databaseUrl: string;
  /** Sends the heartbeats (a connection other than the listener's, as any writer's is). */
  pool: pg.Pool;
  /** The NOTIFY channel; each notification's payload is one key to drop, or `*` for all. */
  channel: string;
  /** TTL of the caches' entries; 0 turns them off (and nothing listens). */
  ttlMs: number;
  logger: Logger;
  /** How often the feed checks that it still hears, and how long an answer may take (5,000 ms). */
  heartbeatMs?: number;
}

/** The payload that drops every key (a TRUNCATE announces it). */
const ALL = '*';
const HEARTBEAT_PREFIX = 'heartbeat:';

/**
 * Process caches kept true by PostgreSQL itself: triggers NOTIFY the key of every committed
 * change (see migration 0001), whoever wrote it, and this process LISTENs on a connection of its
 * own. The caches serve only while that connection is confirmed listening: they are emptied and
 * bypassed when it drops, and emptied again once LISTEN succeeds after a reconnect. A heartbeat
 * NOTIFY, sent through the pool as any change would be, must come back on the listener by the
 * next beat; if it does not (a half-open socket, a frozen server, a pooler or proxy that does not
 * carry notifications), the caches go off and the feed reconnects.
 *
 * So behind a pooler in transaction mode the caches simply stay off (correct, only slower): point
 * DATABASE_URL at PostgreSQL itself or at a session-mode pool to have them.
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
    this.heartbeat = setInterval(() => this.beat(), this.heartbeatMs);
    this.heartbeat.unref();
    await Promise.race([this.connect(), new Promise((r) => setTimeout(r, 1000).unref())]);
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const client = new pg.Client({
      connectionString: this.o.databaseUrl,
      application_name: 'gemini-chat change feed',
      keepAlive: true,
    });
    this.client = client;
    client.on('error', (error) => this.abandon(client, error.message));
    client.on('end', () => this.abandon(client, 'connection ended'));
    client.on('notification', (message) => {
      if (message.channel === this.o.channel && message.payload) this.apply(message.payload);
    });
    // Connecting and LISTEN together get one heartbeat's time; a server that accepts the
    // connection and then never answers must not leave the caches off for good.
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error('connect and LISTEN timed out')), this.heartbeatMs);
    });
    try {
      await Promise.race([
        (async () => {
          await client.connect();
          await client.query(`LISTEN ${pg.escapeIdentifier(this.o.channel)}`);
        })(),
        timedOut,
      ]);
      if (this.client !== client || this.stopped) return;
      // Changes committed before LISTEN took effect were not heard: start empty.
      this.up();
    } catch (error) {
      this.abandon(client, (error as Error).message);
    } finally {
      clearTimeout(timer);
    }
  }

  private apply(payload: string) {
    if (payload.startsWith(HEARTBEAT_PREFIX)) {
      const [instance, id] = payload.slice(HEARTBEAT_PREFIX.length).split(':');
      if (instance === this.instance && id) this.heartbeatSettled(id);
    } else if (payload === ALL) {
      this.clearAll();
    } else {
      this.dropLocal(undefined, [payload]);
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

  /** Sends a heartbeat, or gives up on a listener that did not hear the last one in time. */
  private beat() {
    const client = this.client;
    if (!client || !this.isLive) return;
    const next = this.nextHeartbeat();
    if (next === 'late') return this.abandon(client, 'the heartbeat did not come back');
    if (!next) return;
    const payload = `${HEARTBEAT_PREFIX}${this.instance}:${next.id}`;
    this.o.pool
      .query('select pg_notify($1, $2)', [this.o.channel, payload])
      // PostgreSQL unreachable for writers too: no verdict on the listener from this beat.
      .catch(() => this.heartbeatSettled(next.id));
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.down();
    clearInterval(this.heartbeat);
    clearTimeout(this.reconnect);
    const client = this.client;
    this.client = undefined;
    // A connection attempt under way is not waited for (it may take until its timeout).
    await Promise.race([
      client?.end().catch(() => {}),
      new Promise((resolve) => setTimeout(resolve, 500).unref()),
    ]);
  }
}
