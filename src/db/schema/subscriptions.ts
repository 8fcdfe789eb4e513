import { boolean, index, pgTable, text, timestamp, uuid } from 'drizzle-orm/pg-core';
import { createdAt, timestamptz, updatedAt } from './columns.js';
import { users } from './users.js';

/** Mirror of a Stripe subscription, always re-read from Stripe before it is written. */
export const subscriptions = pgTable(
  'subscriptions',
  {
    /** Stripe's subscription id (`sub_…`). */
    id: text('id').primaryKey(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    customerId: text('customer_id').notNull(),
    status: text('status').notNull(),
    priceId: text('price_id'),
    currentPeriodEnd: timestamptz('current_period_end'),
    cancelAtPeriodEnd: boolean('cancel_at_period_end').notNull().default(false),
    /** When the subscription entered `past_due` (start of the grace period). */
    pastDueSince: timestamptz('past_due_since'),
    /** Stripe's `created` of the newest event or read applied, to ignore stale writes. */
    stripeUpdatedAt: timestamp('stripe_updated_at', { withTimezone: true }),
    createdAt: createdAt(),
    updatedAt: updatedAt(),
  },
  (t) => [index('subscriptions_user_id_idx').on(t.userId)],
);

/** Stripe events already processed; the primary key makes a redelivery a no-op. */
export const stripeEvents = pgTable('stripe_events', {
  id: text('id').primaryKey(),
  type: text('type').notNull(),
  stripeCreatedAt: timestamptz('stripe_created_at').notNull(),
  processedAt: createdAt(),
});

export type SubscriptionRow = typeof subscriptions.$inferSelect;
