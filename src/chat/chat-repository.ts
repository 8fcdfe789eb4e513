import { and, asc, desc, eq, inArray, isNull, lt, or, sql } from 'drizzle-orm';
import type { Database, DbOrTx } from '../db/client.js';
import {
  type ChatroomRow,
  chatrooms,
  type MessageError,
  type MessageRow,
  type MessageStatus,
  type MessageUsage,
  messages,
} from '../db/schema/index.js';

export const PENDING_STATUSES: MessageStatus[] = ['queued', 'streaming'];
export const FINAL_STATUSES: MessageStatus[] = ['completed', 'failed', 'cancelled', 'blocked'];

export interface MessageCursor {
  createdAt: Date;
  id: string;
}

export function encodeCursor(row: Pick<MessageRow, 'createdAt' | 'id'>): string {
  return Buffer.from(`${row.createdAt.toISOString()}|${row.id}`).toString('base64url');
}

const CURSOR_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const CURSOR_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * Only what encodeCursor makes: anything else (a year PostgreSQL cannot read, a malformed uuid)
 * would fail in the query as a 500 instead of answering 400.
 */
export function decodeCursor(cursor: string): MessageCursor | null {
  const parts = Buffer.from(cursor, 'base64url').toString('utf8').split('|');
  const [at, id] = parts;
  if (parts.length !== 2 || !at || !id || !CURSOR_TIME.test(at) || !CURSOR_ID.test(id)) return null;
  const createdAt = new Date(at);
  if (
    Number.isNaN(createdAt.getTime()) ||
    createdAt.toISOString() !== at ||
    at.startsWith('0000')
  ) {
    return null;
  }
  return { createdAt, id };
}

export interface FinalOutcome {
  status: Exclude<MessageStatus, 'queued' | 'streaming'>;
  content: string;
  model?: string | null;
  usage?: MessageUsage | null;
  finishReason?: string | null;
  error?: MessageError | null;
}

export class ChatRepository {
  constructor(private readonly db: Database) {}

  async listRooms(userId: string, limit: number): Promise<ChatroomRow[]> {
    return this.db
      .select()
      .from(chatrooms)
      .where(eq(chatrooms.userId, userId))
      .orderBy(desc(chatrooms.lastActivityAt), desc(chatrooms.id))
      .limit(limit);
  }

  async findRoom(userId: string, roomId: string, tx: DbOrTx = this.db) {
    const [row] = await tx
      .select()
      .from(chatrooms)
      .where(and(eq(chatrooms.id, roomId), eq(chatrooms.userId, userId)));
    return row;
  }

  async findRoomById(roomId: string) {
    const [row] = await this.db.select().from(chatrooms).where(eq(chatrooms.id, roomId));
    return row;
  }

  async insertRoom(values: { userId: string; name: string; systemInstruction?: string | null }) {
    const [row] = await this.db.insert(chatrooms).values(values).returning();
    return row!;
  }

  async updateRoom(
    userId: string,
    roomId: string,
    values: { name?: string; systemInstruction?: string | null },
  ) {
    const [row] = await this.db
      .update(chatrooms)
      .set({ ...values, updatedAt: new Date() })
      .where(and(eq(chatrooms.id, roomId), eq(chatrooms.userId, userId)))
      .returning();
    return row;
  }

  async deleteRoom(userId: string, roomId: string, tx: DbOrTx = this.db) {
    const [row] = await tx
      .delete(chatrooms)
      .where(and(eq(chatrooms.id, roomId), eq(chatrooms.userId, userId)))
      .returning({ id: chatrooms.id });
    return row;
  }

  /** Records activity at `at`; never moves a room's activity back (touches may commit late). */
  async touchRoom(roomId: string, at: Date, tx: DbOrTx = this.db) {
    await tx
      .update(chatrooms)
      .set({ lastActivityAt: sql`greatest(${chatrooms.lastActivityAt}, ${at})` })
      .where(eq(chatrooms.id, roomId));
  }

  /** A page of a room's messages, newest first, strictly before `before`. */
  async listMessages(roomId: string, limit: number, before?: MessageCursor | null) {
    const rows = await this.db
      .select()
      .from(messages)
      .where(
        and(
          eq(messages.chatroomId, roomId),
          before
            ? or(
                lt(messages.createdAt, before.createdAt),
                and(eq(messages.createdAt, before.createdAt), lt(messages.id, before.id)),
              )
            : undefined,
        ),
      )
      .orderBy(desc(messages.createdAt), desc(messages.id))
      .limit(limit + 1);
    const page = rows.slice(0, limit);
    const last = page.at(-1);
    return { messages: page, nextCursor: rows.length > limit && last ? encodeCursor(last) : null };
  }

  async findMessage(userId: string, roomId: string, messageId: string, tx: DbOrTx = this.db) {
    const [row] = await tx
      .select()
      .from(messages)
      .where(
        and(
          eq(messages.id, messageId),
          eq(messages.chatroomId, roomId),
          eq(messages.userId, userId),
        ),
      );
    return row;
  }

  async findMessageById(messageId: string, tx: DbOrTx = this.db) {
    const [row] = await tx.select().from(messages).where(eq(messages.id, messageId));
    return row;
  }

  async findByIdempotencyKey(userId: string, key: string, tx: DbOrTx = this.db) {
    const [prompt] = await tx
      .select()
      .from(messages)
      .where(and(eq(messages.userId, userId), eq(messages.idempotencyKey, key)));
    if (!prompt) return undefined;
    const [reply] = await tx
      .select()
      .from(messages)
      .where(eq(messages.replyToId, prompt.id))
      .orderBy(asc(messages.createdAt))
      .limit(1);
    return reply ? { prompt, reply } : undefined;
  }

  async insertMessages(values: (typeof messages.$inferInsert)[], tx: DbOrTx = this.db) {
    return tx.insert(messages).values(values).returning();
  }

  /**
   * The turns a reply is generated from: every user message and completed reply of the room
   * created before the prompt, oldest first (at most `limit`, the newest ones).
   */
  async history(prompt: Pick<MessageRow, 'chatroomId' | 'createdAt' | 'id'>, limit: number) {
    const rows = await this.db
      .select({ role: messages.role, content: messages.content, createdAt: messages.createdAt })
      .from(messages)
      .where(
        and(
          eq(messages.chatroomId, prompt.chatroomId),
          or(
            lt(messages.createdAt, prompt.createdAt),
            and(eq(messages.createdAt, prompt.createdAt), lt(messages.id, prompt.id)),
          ),
          or(eq(messages.role, 'user'), eq(messages.status, 'completed')),
        ),
      )
      .orderBy(desc(messages.createdAt), desc(messages.id))
      .limit(limit);
    return rows.reverse();
  }

  /** Moves a pending reply to `streaming` for one more attempt; undefined when it is final. */
  async startAttempt(messageId: string, at: Date) {
    const [row] = await this.db
      .update(messages)
      .set({
        status: 'streaming',
        startedAt: sql`coalesce(${messages.startedAt}, ${at})`,
        attempts: sql`${messages.attempts} + 1`,
        updatedAt: at,
      })
      .where(and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES)))
      .returning();
    return row;
  }

  /** Marks a pending reply as alive (the sweeper leaves recently touched replies alone). */
  async touch(messageId: string, at: Date) {
    await this.db
      .update(messages)
      .set({ updatedAt: at })
      .where(and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES)));
  }

  /** Back to `queued` while a retry waits (only if still pending). */
  async requeue(messageId: string, at: Date) {
    await this.db
      .update(messages)
      .set({ status: 'queued', updatedAt: at })
      .where(and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES)));
  }

  /**
   * Writes a reply's final state once: the status guard makes a second writer (a retried or
   * stalled job, a racing cancel) a no-op. Returns the row when this call won.
   */
  async finalize(messageId: string, outcome: FinalOutcome, at: Date, tx: DbOrTx = this.db) {
    const [row] = await tx
      .update(messages)
      .set({
        status: outcome.status,
        content: outcome.content,
        model: outcome.model ?? null,
        usage: outcome.usage ?? null,
        finishReason: outcome.finishReason ?? null,
        error: outcome.error ?? null,
        completedAt: at,
        updatedAt: at,
      })
      .where(and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES)))
      .returning();
    return row;
  }

  /** Marks a pending reply for cancellation; returns it when it was still pending. */
  async requestCancel(messageId: string, at: Date, tx: DbOrTx = this.db) {
    const [row] = await tx
      .update(messages)
      .set({ cancelRequestedAt: at, updatedAt: at })
      .where(and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES)))
      .returning();
    return row;
  }

  /** Pending replies of a room (for deletion). */
  async pendingInRoom(roomId: string, tx: DbOrTx = this.db) {
    return tx
      .select({ id: messages.id })
      .from(messages)
      .where(and(eq(messages.chatroomId, roomId), inArray(messages.status, PENDING_STATUSES)));
  }

  /** Pending replies not touched since `olderThan`: candidates for the sweeper. */
  async stalePending(olderThan: Date, limit: number) {
    return this.db
      .select({ id: messages.id, status: messages.status })
      .from(messages)
      .where(and(inArray(messages.status, PENDING_STATUSES), lt(messages.updatedAt, olderThan)))
      .orderBy(asc(messages.updatedAt))
      .limit(limit);
  }

  /** Clears a reply's quota day (the prompt is given back); returns the day it had, once. */
  async releaseQuotaDay(messageId: string, tx: DbOrTx = this.db) {
    const result = await tx.execute<{ user_id: string; quota_day: string }>(sql`
      update ${messages} m set quota_day = null
      from (select id, quota_day from ${messages} where id = ${messageId} for update) old
      where m.id = old.id and old.quota_day is not null
      returning m.user_id, old.quota_day`);
    const row = result.rows[0];
    return row ? { userId: row.user_id, quotaDay: row.quota_day } : undefined;
  }

  /** Prompts counted against a user's quota on a day (to rebuild a lost Redis counter). */
  async countQuotaDay(userId: string, day: string): Promise<number> {
    const [row] = await this.db
      .select({ n: sql<number>`count(*)::int` })
      .from(messages)
      .where(
        and(
          eq(messages.userId, userId),
          eq(messages.quotaDay, day),
          eq(messages.role, 'assistant'),
        ),
      );
    return row?.n ?? 0;
  }

  async isCancelRequested(messageId: string): Promise<boolean> {
    const [row] = await this.db
      .select({ at: messages.cancelRequestedAt })
      .from(messages)
      .where(and(eq(messages.id, messageId), isNull(messages.completedAt)));
    return Boolean(row?.at);
  }
}
