import { index, pgTable, text, uuid } from 'drizzle-orm/pg-core';
import { createdAt, id, timestamptz, updatedAt } from './columns.js';
import { users } from './users.js';

export const chatrooms = pgTable(
  'chatrooms',
  {
    id: id(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    name: text('name').notNull(),
    systemInstruction: text('system_instruction'),
    createdAt: createdAt(),
    updatedAt: updatedAt(),
    /** Moves with every message; the room list is ordered by it. */
    lastActivityAt: timestamptz('last_activity_at').notNull().defaultNow(),
  },
  (t) => [index('chatrooms_user_activity_idx').on(t.userId, t.lastActivityAt.desc(), t.id.desc())],
);

export type ChatroomRow = typeof chatrooms.$inferSelect;
