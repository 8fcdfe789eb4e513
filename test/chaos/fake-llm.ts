import type { Behaviour, FakeGemini, RecordedRequest } from '../helpers/fake-gemini.js';

export interface ModelMix {
  /** Share of requests answered 429 with a RetryInfo hint. */
  rateLimit: number;
  /** Share of requests answered 500. */
  serverError: number;
  /** Share of replies the safety filter blocks part-way. */
  blocked: number;
}

/** What the suite keeps of one finished request to the fake (the full records grow large). */
export interface ServedRequest {
  prompt: string;
  kind: Behaviour['kind'];
  /** The reply text, for `text` behaviours. */
  text: string | undefined;
  receivedAt: number;
  /** When the fake finished sending, or undefined when the client (a worker) went away first. */
  finishedAt: number | undefined;
  closedAt: number | undefined;
  aborted: boolean;
}

const WORDS =
  'the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near river banks'.split(
    ' ',
  );

const between = (min: number, max: number) => min + Math.floor(Math.random() * (max - min + 1));

/**
 * Drives the fake Gemini like a real model under load: each request takes a behaviour from a
 * queue that is kept topped up with random ones: text with realistic latency (time to first
 * token 150–600 ms, 4–12 chunks 40–160 ms apart) and, now and then, a 429, a 500 or a blocked
 * reply. Every text is unique, so a stored reply can be traced to the request that produced it.
 */
export class RandomModel {
  private timer: NodeJS.Timeout | undefined;
  private counter = 0;
  readonly served: ServedRequest[] = [];
  readonly counts: Record<string, number> = {};

  constructor(
    private readonly fake: FakeGemini,
    private readonly mix: ModelMix,
  ) {}

  start(): void {
    this.topUp();
    this.timer = setInterval(() => {
      this.topUp();
      this.compact();
    }, 25);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.compact(true);
  }

  /** Requests to the fake that are still being answered. */
  inFlight(): RecordedRequest[] {
    return this.fake.requests.filter((r) => r.finishedAt === undefined && r.closedAt === undefined);
  }

  private next(): Behaviour {
    const roll = Math.random();
    const { rateLimit, serverError, blocked } = this.mix;
    if (roll < rateLimit)
      return { kind: 'rateLimit', retryAfterSeconds: 1, delayMs: between(20, 80) };
    if (roll < rateLimit + serverError) return { kind: 'serverError', delayMs: between(20, 200) };
    if (roll < rateLimit + serverError + blocked) {
      return {
        kind: 'responseBlocked',
        reason: 'SAFETY',
        partialText: `Partial ${++this.counter} before the filter`,
        chunkDelayMs: 60,
        delayMs: between(150, 400),
      };
    }
    const n = ++this.counter;
    const words = Array.from(
      { length: between(12, 40) },
      () => WORDS[between(0, WORDS.length - 1)],
    );
    return {
      kind: 'text',
      text: `Answer ${n}: ${words.join(' ')}.`,
      chunks: between(4, 12),
      chunkDelayMs: between(40, 160),
      delayMs: between(150, 600),
    };
  }

  private topUp() {
    const missing = 400 - this.fake.pending();
    if (missing <= 0) return;
    const batch: Behaviour[] = [];
    for (let i = 0; i < missing; i++) batch.push(this.next());
    this.fake.enqueue(...batch);
  }

  /** Moves finished records out of the fake's request log into compact ones. */
  private compact(all = false) {
    const keep: RecordedRequest[] = [];
    for (const record of this.fake.requests) {
      const done = record.finishedAt !== undefined || record.closedAt !== undefined;
      if (!done && !all) {
        keep.push(record);
        continue;
      }
      const behaviour = record.behaviour;
      const kind = behaviour?.kind ?? 'text';
      this.counts[kind] = (this.counts[kind] ?? 0) + 1;
      this.served.push({
        prompt: lastUserText(record),
        kind,
        text: behaviour?.kind === 'text' ? behaviour.text : undefined,
        receivedAt: record.receivedAt,
        finishedAt: record.finishedAt,
        closedAt: record.closedAt,
        aborted: record.aborted,
      });
    }
    this.fake.requests.splice(0, this.fake.requests.length, ...keep);
  }
}

function lastUserText(record: RecordedRequest): string {
  const contents = record.body?.contents ?? [];
  const last = contents.at(-1);
  return (last?.parts ?? []).map((p) => (typeof p.text === 'string' ? p.text : '')).join('');
}
