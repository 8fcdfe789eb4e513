import { sql } from 'drizzle-orm';
import {
  type AnyPgColumn,
  index,
  integer,
  jsonb,
  pgEnum,
  pgTable,
  text,
  uniqueIndex,
  uuid,
} from 'drizzle-orm/pg-core';
import { chatrooms } from './chatrooms.js';
import { createdAt, id, timestamptz, updatedAt } from './columns.js';
import { users } from './users.js';

export const messageRole = pgEnum('message_role', ['user', 'assistant']);

export const messageStatus = pgEnum('message_status', [
  'queued',
  'streaming',
  'completed',
  'failed',
  'cancelled',
  'blocked',
]);

export interface MessageUsage {
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
}

export interface MessageError {
  code: string;
  message: string;
}

export const messages = pgTable(
  'messages',
  {
    id: id(),
    chatroomId: uuid('chatroom_id')
      .notNull()
      .references(() => chatrooms.id, { onDelete: 'cascade' }),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    role: messageRole('role').notNull(),
    content: text('content').notNull().default(''),
    status: messageStatus('status').notNull(),
    /** For an assistant message: the user message it answers. */
    replyToId: uuid('reply_to_id').references((): AnyPgColumn => messages.id, {
      onDelete: 'cascade',
    }),
    model: text('model'),
    usage: jsonb('usage').$type<MessageUsage>(),
    finishReason: text('finish_reason'),
    error: jsonb('error').$type<MessageError>(),
    /** The UTC day (YYYY-MM-DD) whose quota this reply's prompt counts against; null once given back. */
    quotaDay: text('quota_day'),
    /** Set by cancel (or room deletion); the worker stops and keeps the partial text. */
    cancelRequestedAt: timestamptz('cancel_requested_at'),
    attempts: integer('attempts').notNull().default(0),
    idempotencyKey: text('idempotency_key'),
    createdAt: createdAt(),
    updatedAt: updatedAt(),
    startedAt: timestamptz('started_at'),
    completedAt: timestamptz('completed_at'),
  },
  (t) => [
    index('messages_chatroom_created_idx').on(t.chatroomId, t.createdAt.desc(), t.id.desc()),
    index('messages_pending_idx')
      .on(t.updatedAt)
      .where(sql`${t.status} in ('queued', 'streaming')`),
    uniqueIndex('messages_user_idempotency_idx')
      .on(t.userId, t.idempotencyKey)
      .where(sql`${t.idempotencyKey} is not null`),
    index('messages_reply_to_idx').on(t.replyToId),
    index('messages_user_quota_day_idx')
      .on(t.userId, t.quotaDay)
      .where(sql`${t.quotaDay} is not null`),
  ],
);

export type MessageRow = typeof messages.$inferSelect;
export type MessageStatus = (typeof messageStatus.enumValues)[number];
