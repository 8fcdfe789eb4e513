import { and, asc, desc, eq, inArray, isNull, lt, or, type SQL, sql } from 'drizzle-orm';
import { alias } from 'drizzle-orm/pg-core';
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
import { batched } from '../lib/batch.js';

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

/** The prompt a reply answers, joined to the reply (messages twice in one query). */
const prompts = alias(messages, 'prompt');

/**
 * A named value of a prepared statement. In `set()` drizzle binds it to the column, so it is
 * encoded as the column encodes when the statement runs (null included: not for JSON columns).
 */
const param = (name: string) => sql.placeholder(name) as unknown as SQL;

/**
 * A condition that is always true and makes the statement's own transaction commit without
 * waiting for the WAL flush (`synchronous_commit = off`, local to that transaction). Only for
 * bookkeeping whose loss in a PostgreSQL crash is harmless: a reply's move to `streaming` and its
 * heartbeat (it would read `queued` again and be finished or re-queued as usual), a room's
 * activity time. A later synchronous commit (every final reply) flushes these too. It halves the
 * WAL flushes a reply waits for, which bounded how fast one worker drains its queue.
 */
const relaxedCommit = sql`set_config('synchronous_commit', 'off', true) = 'off'`;

/**
 * The statements of the hot paths (accepting a prompt, generating a reply), built once and
 * prepared by name on each pooled connection: drizzle builds a query's SQL anew on every call,
 * which was the largest CPU cost of the reply worker, and PostgreSQL skips parsing and planning.
 */
function prepareStatements(db: Database) {
  const pending = inArray(messages.status, PENDING_STATUSES);
  /** A reply's attempt starting at `at` (the first start is kept). */
  const started = {
    status: 'streaming' as const,
    startedAt: sql`coalesce(${messages.startedAt}, ${sql.placeholder('at')}::timestamptz)`,
    attempts: sql`${messages.attempts} + 1`,
    updatedAt: param('at'),
  };
  return {
    findRooms: db
      .select()
      .from(chatrooms)
      .where(sql`${chatrooms.id} = any(${sql.placeholder('ids')}::uuid[])`)
      .prepare('chat_find_rooms'),
    // A room touched twice in one batch is given once, with its latest time (see touchRooms).
    touchRooms: db
      .update(chatrooms)
      .set({
        lastActivityAt: sql`greatest(${chatrooms.lastActivityAt}, touched.at)`,
      })
      .from(
        sql`unnest(${sql.placeholder('ids')}::uuid[], ${sql.placeholder('ats')}::timestamptz[]) as touched(id, at)`,
      )
      .where(and(sql`${chatrooms.id} = touched.id`, relaxedCommit))
      .prepare('chat_touch_rooms'),
    insertPromptAndReply: db
      .insert(messages)
      .values([
        {
          id: sql.placeholder('promptId'),
          chatroomId: sql.placeholder('roomId'),
          userId: sql.placeholder('userId'),
          role: 'user',
          content: sql.placeholder('content'),
          status: 'completed',
          idempotencyKey: sql.placeholder('idempotencyKey'),
          createdAt: sql.placeholder('promptAt'),
          completedAt: sql.placeholder('promptAt'),
        },
        {
          id: sql.placeholder('replyId'),
          chatroomId: sql.placeholder('roomId'),
          userId: sql.placeholder('userId'),
          role: 'assistant',
          status: 'queued',
          replyToId: sql.placeholder('promptId'),
          quotaDay: sql.placeholder('quotaDay'),
          createdAt: sql.placeholder('replyAt'),
        },
      ])
      .returning()
      .prepare('chat_insert_prompt_reply'),
    replyContext: db
      .select({ reply: messages, prompt: prompts, room: chatrooms })
      .from(messages)
      .leftJoin(prompts, eq(prompts.id, messages.replyToId))
      .leftJoin(chatrooms, eq(chatrooms.id, prompts.chatroomId))
      .where(eq(messages.id, sql.placeholder('id')))
      .prepare('chat_reply_context'),
    history: db
      .select({ role: messages.role, content: messages.content, createdAt: messages.createdAt })
      .from(messages)
      .where(
        and(
          eq(messages.chatroomId, sql.placeholder('roomId')),
          or(
            lt(messages.createdAt, sql`${sql.placeholder('createdAt')}::timestamptz`),
            and(
              eq(messages.createdAt, sql`${sql.placeholder('createdAt')}::timestamptz`),
              lt(messages.id, sql.placeholder('id')),
            ),
          ),
          or(eq(messages.role, 'user'), eq(messages.status, 'completed')),
        ),
      )
      .orderBy(desc(messages.createdAt), desc(messages.id))
      .limit(sql.placeholder('limit'))
      .prepare('chat_history'),
    startAttempt: db
      .update(messages)
      .set(started)
      .where(and(eq(messages.id, sql.placeholder('id')), pending, relaxedCommit))
      .returning()
      .prepare('chat_start_attempt'),
    startReply: db
      .update(messages)
      .set(started)
      .from(prompts)
      .innerJoin(chatrooms, eq(chatrooms.id, prompts.chatroomId))
      .where(
        and(
          eq(messages.id, sql.placeholder('id')),
          eq(prompts.id, messages.replyToId),
          eq(messages.role, 'assistant'),
          pending,
          relaxedCommit,
        ),
      )
      .returning({ reply: messages, prompt: prompts, room: chatrooms })
      .prepare('chat_start_reply'),
    finalize: db
      .update(messages)
      .set({
        status: param('status'),
        content: param('content'),
        model: param('model'),
        // JSON text or SQL NULL (the column's own encoder would turn null into JSON `null`).
        usage: sql`${sql.placeholder('usage')}::jsonb`,
        finishReason: param('finishReason'),
        error: sql`${sql.placeholder('error')}::jsonb`,
        completedAt: param('at'),
        updatedAt: param('at'),
      })
      .where(and(eq(messages.id, sql.placeholder('id')), pending))
      .returning()
      .prepare('chat_finalize'),
  };
}

export interface PromptAndReply {
  promptId: string;
  replyId: string;
  roomId: string;
  userId: string;
  content: string;
  idempotencyKey: string | null;
  quotaDay: string;
  promptAt: Date;
  replyAt: Date;
}

/** The two rows of a prompt, as `chat_insert_prompt_reply` writes them. */
function promptAndReplyRows(v: PromptAndReply): Array<typeof messages.$inferInsert> {
  return [
    {
      id: v.promptId,
      chatroomId: v.roomId,
      userId: v.userId,
      role: 'user',
      content: v.content,
      status: 'completed',
      idempotencyKey: v.idempotencyKey,
      createdAt: v.promptAt,
      completedAt: v.promptAt,
    },
    {
      id: v.replyId,
      chatroomId: v.roomId,
      userId: v.userId,
      role: 'assistant',
      status: 'queued',
      replyToId: v.promptId,
      quotaDay: v.quotaDay,
      createdAt: v.replyAt,
    },
  ];
}

interface PreparedInsert {
  execute(params: Record<string, unknown>): Promise<MessageRow[]>;
}

const asError = (error: unknown) => (error instanceof Error ? error : new Error(String(error)));

export class ChatRepository {
  private readonly statements: ReturnType<typeof prepareStatements>;

  /*
   * The reads and writes of every prompt, batched with those of the other requests of the moment
   * (see `batched`): one query each for many concurrent prompts.
   */
  private readonly roomById: (id: string) => Promise<ChatroomRow | undefined>;
  private readonly touchBatch: (touch: { roomId: string; at: Date }) => Promise<void>;
  private readonly insertBatch: (values: PromptAndReply) => Promise<[MessageRow, MessageRow]>;
  private readonly insertStatements = new Map<number, PreparedInsert>();

  constructor(private readonly db: Database) {
    this.statements = prepareStatements(db);
    this.roomById = batched(async (ids: readonly string[]) => {
      const rows = await this.statements.findRooms.execute({ ids: [...new Set(ids)] });
      const byId = new Map(rows.map((row) => [row.id, row]));
      return ids.map((id) => byId.get(id));
    });
    this.touchBatch = batched(async (touches) => {
      await this.touchRooms(touches);
      return touches.map(() => undefined);
    });
    this.insertBatch = batched((batch) => this.insertPromptsAndReplies(batch));
  }

  async listRooms(userId: string, limit: number): Promise<ChatroomRow[]> {
    return this.db
      .select()
      .from(chatrooms)
      .where(eq(chatrooms.userId, userId))
      .orderBy(desc(chatrooms.lastActivityAt), desc(chatrooms.id))
      .limit(limit);
  }

  async findRoom(userId: string, roomId: string, tx: DbOrTx = this.db) {
    if (tx === this.db) {
      const row = await this.roomById(roomId);
      return row?.userId === userId ? row : undefined;
    }
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
    if (tx === this.db) {
      await this.touchBatch({ roomId, at });
      return;
    }
    await tx
      .update(chatrooms)
      .set({ lastActivityAt: sql`greatest(${chatrooms.lastActivityAt}, ${at})` })
      .where(eq(chatrooms.id, roomId));
  }

  private async touchRooms(touches: ReadonlyArray<{ roomId: string; at: Date }>) {
    const latest = new Map<string, Date>();
    for (const { roomId, at } of touches) {
      const known = latest.get(roomId);
      if (!known || known < at) latest.set(roomId, at);
    }
    // In id order: batches (of this and other instances) lock the rows they share in the same
    // order, so two of them cannot deadlock.
    const ids = [...latest.keys()].sort();
    await this.statements.touchRooms.execute({
      ids,
      ats: ids.map((id) => latest.get(id)!.toISOString()),
    });
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

  /**
   * A reply with the prompt it answers and the prompt's room, in one round trip (a worker needs
   * all three before it can start); `prompt` and `room` are null when they no longer exist.
   */
  async findReplyContext(messageId: string) {
    const [row] = await this.statements.replyContext.execute({ id: messageId });
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

  /**
   * A prompt and its queued reply, stored together atomically: the reply answers the prompt and
   * counts against `quotaDay`. Returns [prompt, reply]. Concurrent calls share one multi-row
   * INSERT (one statement, one commit); if that fails, each is retried on its own, so one bad
   * row (a room deleted meanwhile, a repeated idempotency key) fails only its own call.
   */
  async insertPromptAndReply(values: PromptAndReply): Promise<[MessageRow, MessageRow]> {
    return this.insertBatch(values);
  }

  private async insertPromptsAndReplies(
    batch: readonly PromptAndReply[],
  ): Promise<Array<[MessageRow, MessageRow] | Error>> {
    if (batch.length === 1) return [await this.insertOne(batch[0]!).catch(asError)];
    let rows: MessageRow[];
    try {
      const params: Record<string, unknown> = {};
      batch.forEach((values, i) => {
        for (const [name, value] of Object.entries(values)) params[`${name}${i}`] = value;
      });
      rows = await this.insertStatement(batch.length).execute(params);
    } catch (error) {
      // Only an error of some row (a data or constraint violation) is worth retrying row by
      // row; anything else (PostgreSQL down or full) is every row's answer.
      const code = (error as { cause?: { code?: string } }).cause?.code ?? '';
      if (!/^2[23]/.test(code)) throw error;
      return Promise.all(batch.map((values) => this.insertOne(values).catch(asError)));
    }
    const byId = new Map(rows.map((row) => [row.id, row]));
    return batch.map((values) => {
      const prompt = byId.get(values.promptId);
      const reply = byId.get(values.replyId);
      return prompt && reply ? [prompt, reply] : new Error('insert returned no rows');
    });
  }

  /**
   * The INSERT of `n` prompts and their replies, built and prepared once per size (at most 64,
   * the batch limit): drizzle's query building for 2n rows on every batch had become the largest
   * cost of accepting.
   */
  private insertStatement(n: number) {
    let statement = this.insertStatements.get(n);
    if (!statement) {
      const rows = Array.from({ length: n }, (_, i) => {
        const p = (name: keyof PromptAndReply) => sql.placeholder(`${name}${i}`) as never;
        return promptAndReplyRows({
          promptId: p('promptId'),
          replyId: p('replyId'),
          roomId: p('roomId'),
          userId: p('userId'),
          content: p('content'),
          idempotencyKey: p('idempotencyKey'),
          quotaDay: p('quotaDay'),
          promptAt: p('promptAt'),
          replyAt: p('replyAt'),
        });
      });
      statement = this.db
        .insert(messages)
        .values(rows.flat())
        .returning()
        .prepare(`chat_insert_prompts_${n}`);
      this.insertStatements.set(n, statement);
    }
    return statement;
  }

  private async insertOne(values: PromptAndReply): Promise<[MessageRow, MessageRow]> {
    const rows = await this.statements.insertPromptAndReply.execute({ ...values });
    const prompt = rows.find((row) => row.id === values.promptId);
    const reply = rows.find((row) => row.id === values.replyId);
    if (!prompt || !reply) throw new Error('insert returned no rows');
    return [prompt, reply];
  }

  async insertMessages(values: (typeof messages.$inferInsert)[], tx: DbOrTx = this.db) {
    return tx.insert(messages).values(values).returning();
  }

  /**
   * The turns a reply is generated from: every user message and completed reply of the room
   * created before the prompt, oldest first (at most `limit`, the newest ones).
   */
  async history(prompt: Pick<MessageRow, 'chatroomId' | 'createdAt' | 'id'>, limit: number) {
    const rows = await this.statements.history.execute({
      roomId: prompt.chatroomId,
      createdAt: prompt.createdAt,
      id: prompt.id,
      limit,
    });
    return rows.reverse();
  }

  /**
   * The common start of a reply in one statement: moves it to `streaming` for one more attempt
   * and returns it with its prompt and room, when it is a pending reply whose prompt and room
   * exist (the caller checks `cancelRequestedAt`). Undefined otherwise: `findReplyContext` tells
   * which case it is.
   */
  async startReply(messageId: string, at: Date) {
    const [row] = await this.statements.startReply.execute({ id: messageId, at });
    return row;
  }

  /** Moves a pending reply to `streaming` for one more attempt; undefined when it is final. */
  async startAttempt(messageId: string, at: Date) {
    const [row] = await this.statements.startAttempt.execute({ id: messageId, at });
    return row;
  }

  /** Marks a pending reply as alive (the sweeper leaves recently touched replies alone). */
  async touch(messageId: string, at: Date) {
    await this.db
      .update(messages)
      .set({ updatedAt: at })
      .where(
        and(eq(messages.id, messageId), inArray(messages.status, PENDING_STATUSES), relaxedCommit),
      );
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
    const values = {
      status: outcome.status,
      content: outcome.content,
      model: outcome.model ?? null,
      usage: outcome.usage ?? null,
      finishReason: outcome.finishReason ?? null,
      error: outcome.error ?? null,
    };
    if (tx === this.db) {
      const [row] = await this.statements.finalize.execute({
        ...values,
        usage: values.usage === null ? null : JSON.stringify(values.usage),
        error: values.error === null ? null : JSON.stringify(values.error),
        id: messageId,
        at,
      });
      return row;
    }
    const [row] = await tx
      .update(messages)
      .set({ ...values, completedAt: at, updatedAt: at })
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
