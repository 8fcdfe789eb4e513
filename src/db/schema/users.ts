import { pgTable, text } from 'drizzle-orm/pg-core';
import { createdAt, id, timestamptz, updatedAt } from './columns.js';

export const users = pgTable('users', {
  id: id(),
  /** E.164. */
  mobile: text('mobile').notNull().unique(),
  name: text('name'),
  email: text('email'),
  passwordHash: text('password_hash'),
  verifiedAt: timestamptz('verified_at'),
  stripeCustomerId: text('stripe_customer_id').unique(),
  createdAt: createdAt(),
  updatedAt: updatedAt(),
});

export type UserRow = typeof users.$inferSelect;
