import { randomUUID } from 'node:crypto';
import type { Logger } from './logger.js';
import { createWorkerRedis, type Redis } from './redis.js';

interface Entry<V> {
  value: V;
  expiresAt: number;
}

/**
 * A cache in this process's memory for answers read on nearly every request. Every entry is
 * dropped by an invalidation from its group's feed (Redis pub/sub, see `InvalidationBus`, or
 * PostgreSQL's NOTIFY, see `ChangeFeed`), so a change reaches every instance in the time a message
 * takes; the TTL only bounds the damage of a change no invalidation announced.
 *
 * Loads and invalidations can cross: a load that started before an invalidation of its key (or
 * before the bus lost its connection) is not stored, so a stale value is never cached after the
 * invalidation that should have removed it. `begin()` takes the ticket a load passes to `set`.
 */
export class LocalCache<V> {
  private readonly entries = new Map<string, Entry<V>>();
  /** Loads under way (see `load`), with the ticket each began with. */
  private readonly loading = new Map<string, { ticket: number; value: Promise<V> }>();
  /** Sequence number of the last invalidation of each key, pruned with `floor`. */
  private readonly dropped = new Map<string, number>();
  /** Loads that began at or before this are refused (a clear, or pruned invalidations). */
  private floor = 0;
  private sequence = 0;

  constructor(
    readonly name: string,
    private readonly options: {
      ttlMs: number;
      maxEntries: number;
      /** False while invalidations may be missed (bus down): nothing is served or stored. */
      live: () => boolean;
    },
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get(key: string): V | undefined {
    if (!this.options.live()) return undefined;
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.entries.delete(key);
      return undefined;
    }
    return entry.value;
  }

  /** A ticket for a load about to read the source of truth. */
  begin(): number {
    return ++this.sequence;
  }

  /** Whether `key` was invalidated (or everything cleared) since `ticket` was taken. */
  droppedSince(key: string, ticket: number): boolean {
    return ticket <= this.floor || (this.dropped.get(key) ?? 0) >= ticket;
  }

  /** Stores what a load read, unless its key was invalidated since `ticket` was taken. */
  set(key: string, value: V, ticket: number, ttlMs = this.options.ttlMs): boolean {
    if (!this.options.live() || this.options.ttlMs <= 0) return false;
    if (this.droppedSince(key, ticket)) return false;
    if (this.entries.size >= this.options.maxEntries && !this.entries.has(key)) {
      // Oldest first: Map keeps insertion order.
      const oldest = this.entries.keys().next().value;
      if (oldest !== undefined) this.entries.delete(oldest);
    }
    this.entries.set(key, { value, expiresAt: Date.now() + Math.min(ttlMs, this.options.ttlMs) });
    return true;
  }

  /**
   * The value of `key`: from memory; else from a load of it under way that began after the key
   * was last invalidated (concurrent misses share one load); else from `load`, stored when `keep`
   * allows. A load that began before an invalidation is never joined by later callers: it may
   * have read what the invalidation replaced.
   */
  async load(
    key: string,
    load: () => Promise<V>,
    keep: (value: V) => boolean = () => true,
  ): Promise<V> {
    const known = this.get(key);
    if (known !== undefined) return known;
    const running = this.loading.get(key);
    if (running && !this.droppedSince(key, running.ticket)) return running.value;
    const ticket = this.begin();
    const entry = { ticket, value: load() };
    this.loading.set(key, entry);
    try {
      const value = await entry.value;
      if (keep(value)) this.set(key, value, ticket);
      return value;
    } finally {
      if (this.loading.get(key) === entry) this.loading.delete(key);
    }
  }

  /** Forgets a key, and refuses the loads of it already under way. */
  drop(key: string): void {
    this.entries.delete(key);
    this.dropped.set(key, ++this.sequence);
    if (this.dropped.size > 10_000) {
      this.dropped.clear();
      this.floor = this.sequence;
    }
  }

  clear(): void {
    this.entries.clear();
    this.dropped.clear();
    this.floor = ++this.sequence;
  }
}

/** How often a feed of invalidations is checked for being live, by default. */
const HEARTBEAT_MS = 5000;

/**
 * Process caches kept true by one feed of invalidations. Feeds deliver at most once, so the
 * caches serve nothing unless the feed is known to be live: they are emptied when it goes down
 * and again when it is confirmed after a reconnect (whatever changed meanwhile is unknown).
 */
export class CacheGroup {
  private readonly caches = new Map<string, LocalCache<unknown>>();
  private live = false;
  /** Names this process's heartbeats on a feed other processes share. */
  protected readonly instance = randomUUID();
  /** The heartbeat sent and not heard back yet, and when it was sent. */
  private awaiting: { id: string; sentAt: number } | undefined;

  constructor(
    private readonly ttlMs: number,
    /** How often the feed is checked for being live (see the subclasses' heartbeats). */
    protected readonly heartbeatMs = HEARTBEAT_MS,
  ) {}

  get enabled(): boolean {
    return this.ttlMs > 0;
  }

  get isLive(): boolean {
    return this.live;
  }

  /** A cache in this group; `ttlMs` can shorten (never lengthen) the group's TTL. */
  cache<V>(name: string, maxEntries: number, ttlMs = this.ttlMs): LocalCache<V> {
    const cache = new LocalCache<V>(name, {
      ttlMs: Math.min(ttlMs, this.ttlMs),
      maxEntries,
      live: () => this.live,
    });
    this.caches.set(name, cache as LocalCache<unknown>);
    return cache;
  }

  /** The feed is confirmed: start empty, then serve. */
  protected up(): void {
    this.awaiting = undefined;
    this.clearAll();
    this.live = true;
  }

  /** The feed may miss invalidations from now on: serve nothing. */
  protected down(): void {
    this.awaiting = undefined;
    if (!this.live) return;
    this.live = false;
    this.clearAll();
  }

  /**
   * One step of the check each feed runs on itself every `heartbeatMs` (a connection can stop
   * hearing without closing): `'late'` when the heartbeat out was not heard back within a beat,
   * the id of a new one to send through the feed when none is out and the feed is live,
   * undefined otherwise.
   */
  protected nextHeartbeat(): 'late' | { id: string } | undefined {
    if (this.awaiting) {
      if (Date.now() - this.awaiting.sentAt < this.heartbeatMs) return undefined;
      this.awaiting = undefined;
      return 'late';
    }
    if (!this.live) return undefined;
    const id = randomUUID();
    this.awaiting = { id, sentAt: Date.now() };
    return { id };
  }

  /** Heartbeat `id` came back (or could not be sent): none is out any more. */
  protected heartbeatSettled(id: string): void {
    if (this.awaiting?.id === id) this.awaiting = undefined;
  }

  /** Empties every cache of the group (everything may have changed). */
  protected clearAll(): void {
    for (const cache of this.caches.values()) cache.clear();
  }

  /** Drops keys of one cache, or of every cache when `name` is undefined, in this process. */
  dropLocal(name: string | undefined, keys: string[]): void {
    const caches = name === undefined ? [...this.caches.values()] : [this.caches.get(name)];
    for (const cache of caches) for (const key of keys) cache?.drop(key);
  }
}

export interface InvalidationBusOptions {
  redisUrl: string;
  /** Channel name (already under the Redis key prefix). */
  channel: string;
  /** The command connection that publishes. */
  redis: Redis;
  /** TTL of each cache's entries; 0 turns the process caches off. */
  ttlMs: number;
  logger: Logger;
  /** How often the subscription is checked by a heartbeat; default 5,000 ms. */
  heartbeatMs?: number;
}

/**
 * Invalidations of the process caches, over Redis pub/sub: `invalidate` drops the keys here at
 * once and tells every other instance. Pub/sub delivers at most once, so the caches serve nothing
 * unless the subscription is known to be live: they are emptied when its connection drops and
 * again when the subscription is confirmed after a reconnect. Until `start()` has subscribed
 * (or in a process that never starts it, like the worker), every lookup misses.
 */
export class InvalidationBus extends CacheGroup {
  private subscriber: Redis | undefined;
  private stopped = false;
  private heartbeat: NodeJS.Timeout | undefined;

  constructor(private readonly o: InvalidationBusOptions) {
    super(o.ttlMs, o.heartbeatMs);
  }

  async start(): Promise<void> {
    if (!this.enabled || this.subscriber) return;
    const subscriber = createWorkerRedis(this.o.redisUrl);
    // Subscribed again by hand on every connect, so that "live" means "confirmed subscribed".
    subscriber.options.autoResubscribe = false;
    this.subscriber = subscriber;
    subscriber.on('error', () => {});
    subscriber.on('close', () => this.down());
    subscriber.on('message', (channel: string, message: string) => {
      if (channel === this.o.channel) this.apply(message);
    });
    const confirmed = new Promise<void>((resolve) => {
      subscriber.on('ready', () => {
        void this.subscribe(subscriber).then(resolve);
      });
    });
    this.heartbeat = setInterval(() => this.beat(), this.heartbeatMs);
    this.heartbeat.unref();
    // Start-up does not wait for Redis: until the subscription is confirmed, lookups miss.
    await Promise.race([confirmed, new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
  }

  /**
   * A connection that only reads does not notice a peer that vanished without closing it (a
   * dropped NAT entry, a half-open socket): it would stay "live" while invalidations are lost.
   * So the process publishes a heartbeat on the channel and expects to hear it back; if it does
   * not by the next beat, the caches go off and the subscriber reconnects.
   */
  private beat() {
    const subscriber = this.subscriber;
    if (!subscriber || this.stopped) return;
    const next = this.nextHeartbeat();
    if (next === 'late') {
      if (this.isLive) {
        this.o.logger.warn('cache invalidation channel went quiet; reconnecting');
        this.down();
        subscriber.disconnect(true);
      }
      return;
    }
    if (!next) return;
    this.o.redis
      .publish(this.o.channel, `\n${this.instance}\n${next.id}`)
      .catch(() => this.heartbeatSettled(next.id));
  }

  private async subscribe(subscriber: Redis): Promise<void> {
    try {
      await subscriber.subscribe(this.o.channel);
      if (this.stopped) return;
      // Whatever was published while we were not subscribed is lost: start empty.
      this.up();
    } catch (error) {
      if (this.stopped || subscriber !== this.subscriber) return;
      this.o.logger.warn({ err: (error as Error).message }, 'cache invalidation subscribe failed');
      // The caches stay off until it succeeds; a connection that stays up is not reconnected
      // by itself, so try again.
      await new Promise((resolve) => setTimeout(resolve, 1000).unref());
      if (subscriber.status === 'ready') return this.subscribe(subscriber);
    }
  }

  /** Message: `<cache>\n<key>\n<key>...`, or a heartbeat: `\n<instance>\n<id>`. */
  private apply(message: string) {
    const lines = message.split('\n');
    if (lines[0] === '') {
      if (lines[1] === this.instance && lines[2]) this.heartbeatSettled(lines[2]);
      return;
    }
    this.dropLocal(lines[0] ?? '', lines.slice(1));
  }

  /**
   * Drops keys of a cache here and in every instance. Call it after the change is committed; a
   * failed publish is thrown to the caller (the other instances would keep stale answers).
   */
  async invalidate(name: string, keys: string[]): Promise<void> {
    if (keys.length === 0) return;
    this.dropLocal(name, keys);
    if (!this.enabled) return;
    await this.o.redis.publish(this.o.channel, this.message(name, keys));
  }

  /** The PUBLISH arguments of an invalidation, to send inside a caller's MULTI. */
  message(name: string, keys: string[]): string {
    return [name, ...keys].join('\n');
  }

  get channel(): string {
    return this.o.channel;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.down();
    clearInterval(this.heartbeat);
    this.subscriber?.disconnect();
    this.subscriber = undefined;
  }
}
