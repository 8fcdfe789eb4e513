import { createRedis, type Redis } from '../lib/redis.js';
import { parsePublished, type ReplyEntry, type ReplyStreams } from './reply-stream.js';

/** Entries read from a stream at once, when a follower catches up from its cursor. */
const READ_BATCH = 200;
/**
 * What a follower holds of the live entries its client has not taken yet (its socket is full):
 * at most QUEUE_ENTRIES entries and QUEUE_CHARS characters of published entries. Past either
 * bound the follower drops what it holds and, once the client takes more, reads the stream from
 * its cursor instead, READ_BATCH entries at a time. So a slow client costs the server at most
 * one queue (128 KB) plus one batch being written, however far behind it is; the stream in Redis
 * holds the rest. A client that keeps up empties its queue on every turn of the event loop.
 */
export const QUEUE_ENTRIES = 256;
export const QUEUE_CHARS = 64 * 1024;
/** Wait before sending a SUBSCRIBE again after Redis refused it (the connection stayed up). */
const RESUBSCRIBE_DELAY_MS = 250;

/** Orders Redis Stream ids ("<ms>-<seq>", each part an unsigned 64-bit decimal). */
export function compareStreamIds(a: string, b: string): number {
  // Called for every published entry and follower: compares the digits in place rather than
  // splitting and converting (which also loses precision past 2^53).
  if (!a.includes('-')) a += '-0';
  if (!b.includes('-')) b += '-0';
  const ad = a.indexOf('-');
  const bd = b.indexOf('-');
  return (
    compareDigits(a, 0, ad, b, 0, bd) || compareDigits(a, ad + 1, a.length, b, bd + 1, b.length)
  );
}

/** Compares two runs of decimal digits without leading zeros as numbers. */
function compareDigits(a: string, as: number, ae: number, b: string, bs: number, be: number) {
  while (as < ae - 1 && a.charCodeAt(as) === 48) as++;
  while (bs < be - 1 && b.charCodeAt(bs) === 48) bs++;
  const length = ae - as - (be - bs);
  if (length !== 0) return length;
  for (let i = 0; i < ae - as; i++) {
    const d = a.charCodeAt(as + i) - b.charCodeAt(bs + i);
    if (d !== 0) return d;
  }
  return 0;
}

/** The pub/sub channel of one reply, shared by every follower of it in this process. */
interface Channel {
  readonly name: string;
  readonly messageId: string;
  readonly followers: Set<Follower>;
  /** The subscriber connection's epoch in which SUBSCRIBE was sent (-1: not in this one). */
  requested: number;
  /** The epoch in which Redis confirmed the SUBSCRIBE: from then on no entry is missed. */
  confirmed: number;
}

/**
 * One client following one reply. It hands out entries after `cursor`, in stream order, each
 * once. Published entries queue up in `queue`; when `gap` is set, entries between `cursor` and
 * the queue may exist only in the stream (the follower just joined, fell behind past the bound,
 * or the subscriber connection dropped), so it reads the stream before it takes from the queue.
 */
class Follower {
  queue: ReplyEntry[] = [];
  private chars = 0;
  gap = true;
  /** Bumped whenever a gap opens, so a read sent before cannot close the newer gap. */
  gapSeq = 0;
  /** Something happened since the follower last looked. */
  pending = true;
  private resolveWait: ((woke: boolean) => void) | undefined;
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly channel: Channel,
    public cursor: string,
  ) {}

  /** Queues a published entry; false when it was not new to this follower. */
  push(entry: ReplyEntry, size: number): boolean {
    const newest = this.queue.at(-1)?.id ?? this.cursor;
    if (compareStreamIds(entry.id, newest) <= 0) return false;
    if (this.queue.length >= QUEUE_ENTRIES || this.chars + size > QUEUE_CHARS) {
      this.openGap();
    }
    this.queue.push(entry);
    this.chars += size;
    return true;
  }

  /**
   * Drops the queue: what it held is in the stream. The queue starts again with the next
   * published entry, and everything from it on arrives in order, so the gap is only between
   * `cursor` and the new queue's head.
   */
  openGap() {
    this.queue = [];
    this.chars = 0;
    this.gap = true;
    this.gapSeq++;
    this.wake();
  }

  /** Hands out the queue (the gap is closed): the entries after `cursor`. */
  take(): ReplyEntry[] {
    const taken = this.queue;
    this.queue = [];
    this.chars = 0;
    if (taken.length > 0) this.cursor = taken.at(-1)!.id;
    return taken;
  }

  /** After the stream was read up to `cursor` and the gap closed: the queue's older entries go. */
  closeGap() {
    this.gap = false;
    let drop = 0;
    while (drop < this.queue.length && compareStreamIds(this.queue[drop]!.id, this.cursor) <= 0) {
      drop++;
    }
    // `chars` still counts the dropped ones until the follower takes the rest, right after.
    if (drop > 0) this.queue = this.queue.slice(drop);
  }

  wake() {
    this.pending = true;
    const resolve = this.resolveWait;
    if (resolve) {
      this.resolveWait = undefined;
      resolve(true);
    }
  }

  /** Resolves true when woken, false after `ms` of nothing. */
  wait(ms: number): Promise<boolean> {
    if (this.pending) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      this.resolveWait = resolve;
      // One timer per follower, restarted for each wait rather than made anew: a live reply waits
      // once per batch, tens of times a second.
      if (this.idleTimer) this.idleTimer.refresh();
      else this.idleTimer = setTimeout(this.onIdle, ms);
    });
  }

  private readonly onIdle = () => {
    const resolve = this.resolveWait;
    this.resolveWait = undefined;
    resolve?.(false);
  };

  /** The follower is done: its timer goes. */
  stop() {
    clearTimeout(this.idleTimer);
  }
}

interface PendingRead {
  follower: Follower;
  resolve(entries: ReplyEntry[]): void;
  reject(error: unknown): void;
}

function isFinal(entry: ReplyEntry): boolean {
  return entry.event.type === 'done' || entry.event.type === 'error';
}

/**
 * Delivers the reply streams that this API instance's clients follow. The worker publishes every
 * entry it appends (ReplyStreams.append); the hub holds ONE subscriber connection, subscribed to
 * the channels of the replies followed here, and hands each published entry to the followers of
 * its reply. The stream is read only to catch up: when a follower joins (after its channel's
 * SUBSCRIBE is confirmed, so nothing falls between the read and the first published entry), when
 * it fell behind past its bound, and when the subscriber connection was lost (Redis restarted,
 * the connection was killed): published entries are not kept, the stream is. Entries are
 * deduplicated by stream id, so one that is both read and published is handed out once.
 * SUBSCRIBEs, catch-up reads and wake-ups are each gathered per turn of the event loop, so a
 * thousand clients arriving (or reconnecting) together cost a few round trips, not thousands.
 */
export class ReplyHub {
  private readonly channels = new Map<string, Channel>();
  /** Channels whose subscription may need to change: (un)subscribed together, once per tick. */
  private readonly dirty = new Set<Channel>();
  private flushScheduled = false;
  /** Followers given entries since the last turn of the event loop. */
  private readonly woken = new Set<Follower>();
  private wakeScheduled = false;
  /** Followers waiting for a read of their stream, sent together once per turn. */
  private reads: PendingRead[] = [];
  private subscriber: Redis | undefined;
  /** Bumped when the subscriber connection closes: its subscriptions are gone with it. */
  private epoch = 0;
  private running = false;

  constructor(
    private readonly streams: ReplyStreams,
    private readonly redisUrl: string,
    /** The command connection, for reading the streams. */
    private readonly commands: Redis,
  ) {}

  start() {
    if (this.running) return;
    this.running = true;
    const subscriber = createRedis(this.redisUrl, {
      lazyConnect: false,
      // The hub subscribes again itself, so it knows when the subscriptions are back.
      autoResubscribe: false,
      // A SUBSCRIBE in flight when the connection drops fails instead of being sent again later:
      // the hub subscribes everything again on `ready`.
      maxRetriesPerRequest: 0,
      commandTimeout: undefined,
      connectionName: this.streams.keys.key('reply-hub'),
    });
    this.subscriber = subscriber;
    subscriber.on('error', () => {});
    subscriber.on('message', (channel: string, message: string) => this.dispatch(channel, message));
    subscriber.on('close', () => this.lost());
    subscriber.on('ready', () => {
      for (const channel of this.channels.values()) this.dirty.add(channel);
      this.flush();
    });
  }

  async close() {
    this.running = false;
    this.subscriber?.disconnect();
    for (const channel of this.channels.values()) for (const f of channel.followers) f.wake();
  }

  /** How many clients of this process follow a reply (for tests and introspection). */
  followers(messageId: string): number {
    return this.channels.get(this.streams.channel(messageId))?.followers.size ?? 0;
  }

  /** Entries held in memory for the followers of a reply: at most QUEUE_ENTRIES each. */
  held(messageId: string): number {
    let held = 0;
    const channel = this.channels.get(this.streams.channel(messageId));
    for (const follower of channel?.followers ?? []) held += follower.queue.length;
    return held;
  }

  private dispatch(name: string, message: string) {
    const channel = this.channels.get(name);
    if (!channel || channel.followers.size === 0) return;
    let entry: ReplyEntry;
    try {
      entry = parsePublished(message);
    } catch {
      // Unreadable: its entry is in the stream all the same, so the followers read it from there.
      for (const follower of channel.followers) follower.openGap();
      return;
    }
    for (const follower of channel.followers) {
      if (follower.push(entry, message.length)) this.woken.add(follower);
    }
    if (!this.wakeScheduled && this.woken.size > 0) {
      this.wakeScheduled = true;
      setImmediate(this.wakeAll);
    }
  }

  /**
   * Followers are woken once per turn of the event loop, after everything the subscriber
   * connection had to read, not once per entry: a client whose entries arrived together gets
   * them in one write. The busier the process, the more each write carries; an idle one still
   * writes at once.
   */
  private readonly wakeAll = () => {
    this.wakeScheduled = false;
    for (const follower of this.woken) follower.wake();
    this.woken.clear();
  };

  /** The subscriber connection is gone, and what was published meanwhile with it. */
  private lost() {
    this.epoch++;
    for (const channel of this.channels.values()) {
      channel.requested = -1;
      channel.confirmed = -1;
      if (channel.followers.size === 0) {
        this.channels.delete(channel.name);
        this.dirty.delete(channel);
      }
      for (const follower of channel.followers) follower.openGap();
    }
  }

  private scheduleFlush() {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  /** Sends one SUBSCRIBE and one UNSUBSCRIBE for every channel that changed since the last. */
  private flush() {
    const subscriber = this.subscriber;
    if (!this.running || !subscriber || subscriber.status !== 'ready') return;
    const epoch = this.epoch;
    const subscribe: Channel[] = [];
    const unsubscribe: string[] = [];
    for (const channel of this.dirty) {
      if (channel.followers.size === 0) {
        this.channels.delete(channel.name);
        if (channel.requested === epoch) unsubscribe.push(channel.name);
      } else if (channel.requested !== epoch) {
        channel.requested = epoch;
        subscribe.push(channel);
      }
    }
    this.dirty.clear();
    if (unsubscribe.length > 0) subscriber.unsubscribe(...unsubscribe).catch(() => {});
    if (subscribe.length === 0) return;
    subscriber.subscribe(...subscribe.map((c) => c.name)).then(
      () => {
        if (epoch !== this.epoch) return;
        for (const channel of subscribe) {
          channel.confirmed = epoch;
          for (const follower of channel.followers) follower.wake();
        }
      },
      () => {
        if (epoch !== this.epoch || !this.running) return;
        for (const channel of subscribe) {
          channel.requested = -1;
          this.dirty.add(channel);
        }
        setTimeout(() => this.flush(), RESUBSCRIBE_DELAY_MS).unref();
      },
    );
  }

  private add(messageId: string, fromId: string): Follower {
    const name = this.streams.channel(messageId);
    let channel = this.channels.get(name);
    if (!channel) {
      channel = { name, messageId, followers: new Set(), requested: -1, confirmed: -1 };
      this.channels.set(name, channel);
    }
    const follower = new Follower(channel, fromId);
    channel.followers.add(follower);
    if (channel.requested !== this.epoch) {
      this.dirty.add(channel);
      this.scheduleFlush();
    }
    return follower;
  }

  private remove(follower: Follower) {
    const channel = follower.channel;
    channel.followers.delete(follower);
    if (channel.followers.size === 0) {
      this.dirty.add(channel);
      this.scheduleFlush();
    }
  }

  /**
   * Reads the stream after the follower's cursor, together with the reads of every other follower
   * that needs one in this turn of the event loop (all of them at once after a reconnect, or when
   * many clients arrive together): one XREAD for all instead of one each.
   */
  private read(follower: Follower): Promise<ReplyEntry[]> {
    return new Promise((resolve, reject) => {
      this.reads.push({ follower, resolve, reject });
      if (this.reads.length === 1) setImmediate(this.sendReads);
    });
  }

  private readonly sendReads = () => {
    // Followers of one reply at one cursor (clients arriving together) share a request; XREAD
    // names each stream once, so followers of that reply at other cursors wait for the next one.
    let pending = new Map<string, PendingRead[]>();
    for (const read of this.reads.splice(0)) {
      const key = `${read.follower.channel.messageId} ${read.follower.cursor}`;
      const same = pending.get(key);
      if (same) same.push(read);
      else pending.set(key, [read]);
    }
    while (pending.size > 0) {
      const round: PendingRead[][] = [];
      const later = new Map<string, PendingRead[]>();
      const replies = new Set<string>();
      for (const [key, reads] of pending) {
        const messageId = reads[0]!.follower.channel.messageId;
        if (replies.has(messageId)) later.set(key, reads);
        else {
          replies.add(messageId);
          round.push(reads);
        }
      }
      void this.readRound(round);
      pending = later;
    }
  };

  /**
   * Closes a follower's gap when its read reached the queue's head or the end of the stream,
   * provided the channel was subscribed before the read was sent and no newer gap opened while it
   * was under way (then every later entry is in the queue or still to be published).
   */
  private async readRound(round: PendingRead[][]) {
    const sent = round.map((reads) =>
      reads.map(({ follower }) => ({
        seq: follower.gapSeq,
        subscribed: follower.channel.confirmed === this.epoch,
      })),
    );
    let results: ReplyEntry[][];
    try {
      results = await this.streams.readMany(
        round.map((reads) => ({
          messageId: reads[0]!.follower.channel.messageId,
          afterId: reads[0]!.follower.cursor,
        })),
        { count: READ_BATCH, connection: this.commands },
      );
    } catch (error) {
      for (const reads of round) for (const read of reads) read.reject(error);
      return;
    }
    round.forEach((reads, i) => {
      const entries = results[i] ?? [];
      const last = entries.at(-1)?.id;
      reads.forEach(({ follower, resolve }, k) => {
        if (last !== undefined) follower.cursor = last;
        const { seq, subscribed } = sent[i]![k]!;
        if (subscribed && seq === follower.gapSeq) {
          const head = follower.queue[0]?.id;
          const reachedQueue =
            head !== undefined && last !== undefined && compareStreamIds(last, head) >= 0;
          if (entries.length < READ_BATCH || reachedQueue) follower.closeGap();
        }
        resolve(entries);
      });
    });
  }

  /**
   * Yields the entries of a reply's stream after `fromId`, in batches (all that is ready for the
   * client at once), live, until the caller stops or a `done`/`error` entry, which ends the last
   * batch. When nothing arrives for `idleMs`, yields `null` so the caller can check whether the
   * stream still exists (a finished stream expires).
   */
  async *follow(
    messageId: string,
    fromId: string,
    options: { signal?: AbortSignal; idleMs?: number } = {},
  ): AsyncGenerator<ReplyEntry[] | null> {
    const { signal } = options;
    const idleMs = options.idleMs ?? 15_000;
    const follower = this.add(messageId, fromId);
    // A flag rather than `signal.aborted` on every batch (the getter validates its receiver).
    let aborted = signal?.aborted ?? false;
    const onAbort = () => {
      aborted = true;
      follower.wake();
    };
    signal?.addEventListener('abort', onAbort);
    try {
      while (!aborted && this.running) {
        follower.pending = false;
        let batch: ReplyEntry[] = [];
        // Reading the stream waits for the channel's subscription: an entry appended between a
        // read and the SUBSCRIBE would be in neither.
        if (follower.gap && follower.channel.confirmed === this.epoch) {
          batch = await this.read(follower);
        }
        if (!follower.gap && follower.queue.length > 0) {
          batch = batch.length > 0 ? batch.concat(follower.take()) : follower.take();
        }
        if (batch.length === 0) {
          if (await follower.wait(idleMs)) continue;
          // Quiet for idleMs: read the stream once in case something was appended without being
          // published (a worker of an older version), then let the caller look at the reply.
          if (follower.channel.confirmed === this.epoch) {
            follower.gap = true;
            batch = await this.read(follower);
          }
          if (batch.length === 0) {
            yield null;
            continue;
          }
        }
        const end = batch.findIndex(isFinal);
        if (end >= 0) {
          yield batch.slice(0, end + 1);
          return;
        }
        yield batch;
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      follower.stop();
      this.remove(follower);
    }
  }
}
