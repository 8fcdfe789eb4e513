import type { MessageRow } from '../db/schema/index.js';
import type { ChatRepository } from './chat-repository.js';
import { FINAL_STATUSES } from './chat-repository.js';
import { toMessageDto } from './message-dto.js';
import type { ReplyHub } from './reply-hub.js';
import type { ReplyEvent, ReplyStreams } from './reply-stream.js';

export interface ReplySseEvent {
  id?: string;
  event: ReplyEvent['type'] | 'accepted';
  data: unknown;
}

const STREAM_ID = /^\d{1,20}-\d{1,20}$/;
const MAX_STREAM_ID_PART = 2n ** 64n - 1n;

/** A Redis stream id (two unsigned 64-bit parts); anything else would make XREAD fail. */
function isStreamId(id: string): boolean {
  return STREAM_ID.test(id) && id.split('-').every((part) => BigInt(part) <= MAX_STREAM_ID_PART);
}

export interface ReplyEventsDeps {
  chat: ChatRepository;
  streams: ReplyStreams;
  hub: ReplyHub;
}

/** The final state of a reply as stream events, from PostgreSQL (its stream has expired). */
function* fromDatabase(message: MessageRow, resumed: boolean): Generator<ReplySseEvent> {
  if (resumed) yield { id: 'db-0', event: 'reset', data: {} };
  if (message.content) yield { id: 'db-1', event: 'delta', data: { text: message.content } };
  if (message.status === 'failed') {
    yield {
      id: 'db-2',
      event: 'error',
      data: message.error ?? { code: 'INTERNAL', message: 'The reply failed' },
    };
  } else {
    yield { id: 'db-2', event: 'done', data: toMessageDto(message) };
  }
}

/**
 * Every event of one reply after `lastEventId`, in batches (what is ready to send at once): what
 * its Redis Stream holds, then live ones, ending with `done` or `error`. A finished reply whose
 * stream expired is served from PostgreSQL (after a `reset` when the client resumes, since its
 * earlier events are gone).
 */
export async function* replyEvents(
  deps: ReplyEventsDeps,
  message: MessageRow,
  lastEventId: string | null,
  signal: AbortSignal,
  idleMs = 15_000,
): AsyncGenerator<ReplySseEvent[]> {
  const resumed = lastEventId !== null && lastEventId !== '';
  const from = lastEventId && isStreamId(lastEventId) ? lastEventId : '0-0';
  if (FINAL_STATUSES.includes(message.status) && !(await deps.streams.exists(message.id))) {
    yield [...fromDatabase(message, resumed)];
    return;
  }
  let sent = resumed;
  for await (const entries of deps.hub.follow(message.id, from, { signal, idleMs })) {
    if (entries === null) {
      const current = await deps.chat.findMessageById(message.id);
      if (!current) return;
      // Final, and nothing after the client's position for idleMs: the stream has no more for
      // it (it resumed after `done`, or from an id past the end), so end with PostgreSQL's state
      // rather than wait until the stream expires.
      if (FINAL_STATUSES.includes(current.status)) {
        yield [...fromDatabase(current, sent)];
        return;
      }
      continue;
    }
    sent = true;
    yield entries.map((entry) => ({
      id: entry.id,
      event: entry.event.type,
      data: entry.event.data,
    }));
  }
}

/** Waits until a reply is final or `ms` pass; returns the reply as it is then. */
export async function waitForFinal(
  deps: ReplyEventsDeps,
  messageId: string,
  ms: number,
): Promise<MessageRow | undefined> {
  const signal = AbortSignal.timeout(ms);
  const current = await deps.chat.findMessageById(messageId);
  if (!current || FINAL_STATUSES.includes(current.status)) return current;
  for await (const entries of deps.hub.follow(messageId, '0-0', {
    signal,
    idleMs: Math.min(ms, 1000),
  })) {
    if (entries === null) {
      const row = await deps.chat.findMessageById(messageId);
      if (!row || FINAL_STATUSES.includes(row.status)) return row;
      continue;
    }
    // The hub ends the batch, and the stream, at `done` or `error`.
    if (entries.some((e) => e.event.type === 'done' || e.event.type === 'error')) break;
  }
  return deps.chat.findMessageById(messageId);
}
