import type { Queue } from 'bullmq';
import pLimit from 'p-limit';
import { v7 as uuidv7 } from 'uuid';
import type { QuotaService, Reservation } from '../billing/quota-service.js';
import type { Tier } from '../billing/tier.js';
import type { Database } from '../db/client.js';
import type { MessageRow } from '../db/schema/index.js';
import { batched } from '../lib/batch.js';
import type { Clock } from '../lib/clock.js';
import { AppError, notFound } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { Metrics } from '../lib/metrics.js';
import { type ReplyJob, replyJobOptions } from '../queue/queues.js';
import type { CancelBus } from './cancel-bus.js';
import { type ChatRepository, decodeCursor, PENDING_STATUSES } from './chat-repository.js';
import { type ChatroomDto, toChatroomDto, toMessageDto } from './message-dto.js';
import type { ReplyStreams } from './reply-stream.js';
import type { CacheResult, RoomListCache } from './room-list-cache.js';

/** The room list is capped; the most recently active rooms come first. */
export const ROOM_LIST_LIMIT = 500;

export interface ChatServiceOptions {
  db: Database;
  chat: ChatRepository;
  cache: RoomListCache;
  quota: QuotaService;
  replyQueue: Queue<ReplyJob>;
  streams: ReplyStreams;
  cancelBus: CancelBus;
  clock: Clock;
  logger: Logger;
  metrics: Metrics;
  tierOf(userId: string): Promise<Tier>;
  limitFor(tier: Tier): number | null;
}

export interface Accepted {
  userMessage: MessageRow;
  assistantMessage: MessageRow;
  /** Absent when an Idempotency-Key replayed an earlier request. */
  usage?: Reservation;
  replayed: boolean;
}

/**
 * Prompts being accepted at once by one process; more wait their turn. A burst (a thousand
 * clients sending at the same moment) costs the same CPU either way, but with all of them in
 * flight every step of every request resumes in the same turn of the event loop, which then
 * stalls for tens of milliseconds (and every stream this process serves stalls with it).
 */
const ACCEPTING_AT_ONCE = 32;
/** Prompts that may wait for their turn in one process. */
const ACCEPT_QUEUE_MAX = 2000;

export class ChatService {
  /** The replies queued at the moment, added to the queue in one round trip (`addBulk`). */
  private readonly enqueueBatch: (messageId: string) => Promise<void>;
  private readonly accepting = pLimit(ACCEPTING_AT_ONCE);

  constructor(private readonly o: ChatServiceOptions) {
    this.enqueueBatch = batched(async (ids: readonly string[]) => {
      // addBulk runs in a MULTI, which ioredis builds at a cost of its own: not for one job.
      if (ids.length === 1) {
        const messageId = ids[0]!;
        await o.replyQueue.add('reply', { messageId }, { ...replyJobOptions(), jobId: messageId });
        return [undefined];
      }
      await o.replyQueue.addBulk(
        ids.map((messageId) => ({
          name: 'reply',
          data: { messageId },
          opts: { ...replyJobOptions(), jobId: messageId },
        })),
      );
      return ids.map(() => undefined);
    });
  }

  async listRooms(userId: string): Promise<CacheResult> {
    return this.o.cache.get(userId, async () =>
      (await this.o.chat.listRooms(userId, ROOM_LIST_LIMIT)).map(toChatroomDto),
    );
  }

  async createRoom(
    userId: string,
    name: string,
    systemInstruction?: string | null,
  ): Promise<ChatroomDto> {
    const row = await this.o.chat.insertRoom({
      userId,
      name,
      systemInstruction: systemInstruction ?? null,
    });
    await this.o.cache.invalidate(userId);
    return toChatroomDto(row);
  }

  async room(userId: string, roomId: string) {
    const row = await this.o.chat.findRoom(userId, roomId);
    if (!row) throw notFound('Chatroom');
    return row;
  }

  async updateRoom(
    userId: string,
    roomId: string,
    values: { name?: string | undefined; systemInstruction?: string | null | undefined },
  ) {
    const patch: { name?: string; systemInstruction?: string | null } = {};
    if (values.name !== undefined) patch.name = values.name;
    if (values.systemInstruction !== undefined) patch.systemInstruction = values.systemInstruction;
    const row = await this.o.chat.updateRoom(userId, roomId, patch);
    if (!row) throw notFound('Chatroom');
    await this.o.cache.invalidate(userId);
    return toChatroomDto(row);
  }

  /** Deletes a room and its messages; replies in flight are stopped. */
  async deleteRoom(userId: string, roomId: string): Promise<void> {
    const pending = await this.o.db.transaction(async (tx) => {
      const room = await this.o.chat.findRoom(userId, roomId, tx);
      if (!room) throw notFound('Chatroom');
      const ids = await this.o.chat.pendingInRoom(roomId, tx);
      await this.o.chat.deleteRoom(userId, roomId, tx);
      return ids;
    });
    await this.o.cache.invalidate(userId);
    for (const { id } of pending) {
      await this.o.cancelBus.publish(id).catch(() => {});
      await this.o.replyQueue.remove(id).catch(() => {});
      // The reply is gone with its room: open streams end now instead of idling.
      await this.o.streams
        .append(id, {
          type: 'error',
          data: { code: 'NOT_FOUND', message: 'The chatroom was deleted' },
        })
        .catch(() => {});
    }
  }

  async messages(userId: string, roomId: string, limit: number, before?: string) {
    await this.room(userId, roomId);
    const cursor = before ? decodeCursor(before) : undefined;
    if (before && !cursor) {
      throw new AppError({
        code: 'VALIDATION_FAILED',
        message: 'query.before: not a cursor returned by this API',
        details: { issues: [{ field: 'query.before', message: 'invalid cursor' }] },
      });
    }
    const page = await this.o.chat.listMessages(roomId, limit, cursor);
    return { messages: page.messages.map(toMessageDto), nextCursor: page.nextCursor };
  }

  async message(userId: string, roomId: string, messageId: string) {
    const row = await this.o.chat.findMessage(userId, roomId, messageId);
    if (!row) throw notFound('Message');
    return row;
  }

  /**
   * Accepts a prompt: counts it against the daily quota, stores the user message and a queued
   * reply in one transaction, and queues the reply. A repeated Idempotency-Key returns the first
   * result and counts nothing.
   */
  async send(
    userId: string,
    roomId: string,
    content: string,
    idempotencyKey?: string,
  ): Promise<Accepted> {
    // Beyond this, waiting is no longer a burst being smoothed but an overload: say so now,
    // rather than hold requests whose clients will time out and retry.
    if (this.accepting.pendingCount >= ACCEPT_QUEUE_MAX) {
      throw new AppError({
        code: 'UNAVAILABLE',
        message: 'The service is busy accepting other prompts; retry shortly',
        retryAfter: 1,
      });
    }
    return this.accepting(() => this.accept(userId, roomId, content, idempotencyKey));
  }

  private async accept(
    userId: string,
    roomId: string,
    content: string,
    idempotencyKey?: string,
  ): Promise<Accepted> {
    if (idempotencyKey) {
      const earlier = await this.replay(userId, roomId, idempotencyKey, content);
      if (earlier) return earlier;
    }
    // The room check and the tier are independent reads: both in flight at once.
    const [, tier] = await Promise.all([this.room(userId, roomId), this.o.tierOf(userId)]);
    const usage = await this.reserve(userId, tier);
    const now = this.o.clock.now();
    let stored: [MessageRow, MessageRow];
    try {
      // One multi-row INSERT stores both messages atomically (a statement is its own
      // transaction): one round trip instead of BEGIN, two INSERTs and COMMIT.
      stored = await this.o.chat.insertPromptAndReply({
        promptId: uuidv7(),
        replyId: uuidv7(),
        roomId,
        userId,
        content,
        idempotencyKey: idempotencyKey ?? null,
        quotaDay: usage.day,
        promptAt: now,
        // A millisecond later keeps the prompt before its reply in every ordering.
        replyAt: new Date(now.getTime() + 1),
      });
    } catch (error) {
      await this.o.quota.release(userId, usage.day).catch(() => {});
      const code = (error as { cause?: { code?: string } }).cause?.code;
      // Two requests with the same key raced: the loser returns the winner's result.
      if (idempotencyKey && code === '23505') {
        const earlier = await this.replay(userId, roomId, idempotencyKey, content);
        if (earlier) return earlier;
      }
      // The room was deleted after the check above.
      if (code === '23503') throw notFound('Chatroom');
      throw error;
    }
    const [userMessage, assistantMessage] = stored;
    // Neither fails the request (see both), and neither needs the other.
    await Promise.all([this.enqueue(assistantMessage.id), this.touch(userId, roomId, now)]);
    return { userMessage, assistantMessage, usage, replayed: false };
  }

  /** A new reply to the same prompt (counts as a prompt); earlier replies stay as they are. */
  async regenerate(userId: string, roomId: string, messageId: string): Promise<Accepted> {
    const target = await this.message(userId, roomId, messageId);
    const promptId = target.role === 'user' ? target.id : target.replyToId;
    const prompt = promptId ? await this.o.chat.findMessage(userId, roomId, promptId) : undefined;
    if (!prompt) throw notFound('Message');
    const usage = await this.reserve(userId);
    const now = this.o.clock.now();
    let reply: MessageRow;
    try {
      reply = await this.o.db.transaction(async (tx) => {
        const [row] = await this.o.chat.insertMessages(
          [
            {
              chatroomId: roomId,
              userId,
              role: 'assistant',
              status: 'queued',
              replyToId: prompt.id,
              quotaDay: usage.day,
              createdAt: now,
            },
          ],
          tx,
        );
        return row!;
      });
    } catch (error) {
      await this.o.quota.release(userId, usage.day).catch(() => {});
      throw error;
    }
    await this.enqueue(reply.id);
    await this.touch(userId, roomId, now);
    return { userMessage: prompt, assistantMessage: reply, usage, replayed: false };
  }

  /**
   * Stops a reply. A queued one is finished here; a streaming one is stopped by its worker,
   * which keeps the partial text. Returns the message (final, or about to be).
   */
  async cancel(userId: string, roomId: string, messageId: string): Promise<MessageRow> {
    const message = await this.message(userId, roomId, messageId);
    if (message.role !== 'assistant') {
      throw new AppError({ code: 'CONFLICT', message: 'Only a reply can be cancelled' });
    }
    if (!PENDING_STATUSES.includes(message.status)) return message;
    const now = this.o.clock.now();
    await this.o.chat.requestCancel(message.id, now);
    await this.o.cancelBus.publish(message.id);
    if (message.status === 'queued') {
      const job = await this.o.replyQueue.getJob(message.id);
      const state = job ? await job.getState() : 'missing';
      if (state !== 'active') {
        const row = await this.o.chat.finalize(
          message.id,
          { status: 'cancelled', content: message.content },
          now,
        );
        if (row) {
          await job?.remove().catch(() => {});
          await this.o.streams.append(row.id, { type: 'done', data: { ...toMessageDto(row) } });
          return row;
        }
      }
    }
    return (await this.o.chat.findMessageById(message.id)) ?? message;
  }

  async usage(userId: string) {
    const tier = await this.o.tierOf(userId);
    return { tier, usage: await this.o.quota.current(userId, this.o.limitFor(tier)) };
  }

  private async reserve(userId: string, knownTier?: Tier) {
    const tier = knownTier ?? (await this.o.tierOf(userId));
    try {
      return await this.o.quota.reserve(userId, this.o.limitFor(tier));
    } catch (error) {
      if (error instanceof AppError && error.code === 'QUOTA_EXCEEDED') {
        this.o.metrics.quotaRefusals.inc({ tier });
      }
      throw error;
    }
  }

  /**
   * Moves the room to the top of the list. Deliberately outside the accepting transaction: an
   * update of the room row there made concurrent prompts to one room wait for each other's
   * commit while holding pooled connections, and a burst answered 503. The prompt is already
   * stored and queued, so a failure here only costs the room its place in the list.
   */
  private async touch(userId: string, roomId: string, at: Date) {
    await this.o.chat.touchRoom(roomId, at).catch((error: unknown) => {
      this.o.logger.warn({ roomId, err: (error as Error).message }, 'could not touch a room');
    });
    await this.o.cache.invalidate(userId).catch(() => {});
  }

  private async enqueue(messageId: string) {
    try {
      await this.enqueueBatch(messageId);
    } catch (error) {
      // The reply is stored as queued: the sweeper will queue it once Redis answers again.
      this.o.logger.warn(
        { messageId, err: (error as Error).message },
        'could not queue a reply now',
      );
    }
  }

  private async replay(
    userId: string,
    roomId: string,
    key: string,
    content: string,
  ): Promise<Accepted | undefined> {
    const earlier = await this.o.chat.findByIdempotencyKey(userId, key);
    if (!earlier) return undefined;
    if (earlier.prompt.chatroomId !== roomId || earlier.prompt.content !== content) {
      throw new AppError({
        code: 'CONFLICT',
        message: 'This Idempotency-Key was already used for a different request',
      });
    }
    return { userMessage: earlier.prompt, assistantMessage: earlier.reply, replayed: true };
  }
}
