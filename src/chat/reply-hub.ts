import { createWorkerRedis, type Redis } from '../lib/redis.js';
import type { ReplyEvent, ReplyStreams } from './reply-stream.js';

/** Entries a follower reads at once: a slow client holds at most this many in memory. */
const READ_BATCH = 200;

interface Follower {
  wake(): void;
}

/** Orders Redis Stream ids ("<ms>-<seq>"). */
export function compareStreamIds(a: string, b: string): number {
  const [am = 0, as = 0] = a.split('-').map(Number);
  const [bm = 0, bs = 0] = b.split('-').map(Number);
  return am - bm || as - bs;
}

/**
 * Watches the reply streams that this API instance's clients follow, with ONE blocking XREAD
 * over all of them (not a connection per client). It only wakes followers; each follower reads
 * its own entries when it is ready to write them, so a slow client holds at most one batch in
 * memory and never makes the server buffer without bound.
 */
export class ReplyHub {
  private readonly cursors = new Map<string, string>();
  private readonly followers = new Map<string, Set<Follower>>();
  private connection: Redis | undefined;
  private clientId: number | undefined;
  private running = false;
  private idle: (() => void) | undefined;
  /** Bumped when a stream is added; a read prepared before the bump is not sent. */
  private version = 0;

  constructor(
    private readonly streams: ReplyStreams,
    private readonly redisUrl: string,
    /** The command connection, used to interrupt the blocking read when a key is added. */
    private readonly commands: Redis,
  ) {}

  start() {
    if (this.running) return;
    this.running = true;
    this.connection = createWorkerRedis(this.redisUrl);
    this.connection.on('error', () => {});
    this.connection.on('ready', () => {
      this.clientId = undefined;
    });
    void this.loop();
  }

  async close() {
    this.running = false;
    this.idle?.();
    this.connection?.disconnect();
    for (const set of this.followers.values()) for (const f of set) f.wake();
  }

  private async loop() {
    while (this.running) {
      const keys = [...this.cursors.keys()];
      if (keys.length === 0) {
        await new Promise<void>((resolve) => {
          this.idle = resolve;
        });
        this.idle = undefined;
        continue;
      }
      try {
        const connection = this.connection!;
        const version = this.version;
        this.clientId ??= Number(await connection.client('ID'));
        if (version !== this.version) continue;
        // Short enough that a stream added just as the read is sent (the UNBLOCK arriving
        // before the read blocks) waits at most this long.
        const result = await connection.xread(
          'COUNT',
          1,
          'BLOCK',
          2000,
          'STREAMS',
          ...keys.map((id) => this.streams.key(id)),
          ...keys.map((id) => this.cursors.get(id) ?? '0-0'),
        );
        for (const [key, entries] of result ?? []) {
          const messageId = key.slice(key.lastIndexOf(':') + 1);
          const last = entries.at(-1)?.[0];
          if (last && this.cursors.has(messageId)) this.cursors.set(messageId, last);
          for (const follower of this.followers.get(messageId) ?? []) follower.wake();
        }
      } catch {
        if (!this.running) return;
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    }
  }

  private add(messageId: string, follower: Follower, fromId: string) {
    let set = this.followers.get(messageId);
    if (!set) {
      set = new Set();
      this.followers.set(messageId, set);
      this.cursors.set(messageId, fromId);
      this.version++;
      this.interrupt();
    }
    set.add(follower);
  }

  private remove(messageId: string, follower: Follower) {
    const set = this.followers.get(messageId);
    if (!set) return;
    set.delete(follower);
    if (set.size === 0) {
      this.followers.delete(messageId);
      this.cursors.delete(messageId);
    }
  }

  /** Moves the shared cursor past what a follower has read, so the hub does not re-read it. */
  private advance(messageId: string, id: string) {
    const current = this.cursors.get(messageId);
    if (current !== undefined && compareStreamIds(id, current) > 0) this.cursors.set(messageId, id);
  }

  /** Interrupts the blocking read so it restarts with the new set of streams. */
  private interrupt() {
    if (this.idle) {
      this.idle();
      return;
    }
    if (this.clientId !== undefined) {
      this.commands.client('UNBLOCK', this.clientId).catch(() => {});
    }
  }

  /**
   * Yields the entries of a reply's stream after `fromId`, live, until the caller stops or a
   * `done`/`error` entry. When nothing arrives for `idleMs`, yields `null` so the caller can check
   * whether the stream still exists (a finished stream expires).
   */
  async *follow(
    messageId: string,
    fromId: string,
    options: { signal?: AbortSignal; idleMs?: number } = {},
  ): AsyncGenerator<{ id: string; event: ReplyEvent } | null> {
    let pending = true;
    let notify: (() => void) | undefined;
    const follower: Follower = {
      wake: () => {
        pending = true;
        notify?.();
      },
    };
    const onAbort = () => follower.wake();
    options.signal?.addEventListener('abort', onAbort);
    this.add(messageId, follower, fromId);
    let cursor = fromId;
    try {
      while (!options.signal?.aborted && this.running) {
        if (!pending) {
          const woke = await new Promise<boolean>((resolve) => {
            const timer = setTimeout(() => resolve(false), options.idleMs ?? 15_000);
            notify = () => {
              clearTimeout(timer);
              resolve(true);
            };
          });
          notify = undefined;
          if (!woke) {
            yield null;
            continue;
          }
        }
        pending = false;
        for (;;) {
          const entries = await this.streams.read(messageId, cursor, { count: READ_BATCH });
          if (entries.length === 0) break;
          this.advance(messageId, entries.at(-1)!.id);
          for (const entry of entries) {
            cursor = entry.id;
            yield entry;
            if (entry.event.type === 'done' || entry.event.type === 'error') return;
          }
          // A short batch was the end of the stream when it was read: whatever came after it
          // wakes this follower again (`pending`), so reading on now would only find nothing, one
          // wasted round trip per wake-up, i.e. per delta of a live reply.
          if (entries.length < READ_BATCH) break;
        }
      }
    } finally {
      options.signal?.removeEventListener('abort', onAbort);
      this.remove(messageId, follower);
    }
  }
}
