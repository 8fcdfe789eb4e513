import { desc, eq, sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.js';
import { type SubscriptionRow, subscriptions } from '../db/schema/index.js';

export type Tier = 'basic' | 'pro';

/**
 * Pro while a subscription is `active` or `trialing`, and while `past_due` for at most
 * `graceDays` after it became past due; Basic otherwise. A subscription set to cancel at period
 * end stops counting once that end has passed, even before Stripe's `deleted` event arrives.
 */
export function tierOf(
  rows: Array<
    Pick<SubscriptionRow, 'status' | 'pastDueSince' | 'currentPeriodEnd'> &
      Partial<Pick<SubscriptionRow, 'cancelAtPeriodEnd'>>
  >,
  now: Date,
  graceDays: number,
): Tier {
  for (const row of rows) {
    if (row.cancelAtPeriodEnd && row.currentPeriodEnd && row.currentPeriodEnd <= now) continue;
    if (row.status === 'active' || row.status === 'trialing') return 'pro';
    if (row.status === 'past_due') {
      const since = row.pastDueSince ?? row.currentPeriodEnd ?? now;
      if (now.getTime() - since.getTime() < graceDays * 86_400_000) return 'pro';
    }
  }
  return 'basic';
}

function prepare(db: DbOrTx) {
  return db
    .select()
    .from(subscriptions)
    .where(eq(subscriptions.userId, sql.placeholder('userId')))
    .orderBy(desc(subscriptions.updatedAt))
    .prepare('tier_subscriptions');
}

/** Built once per database handle. */
const statements = new WeakMap<DbOrTx, ReturnType<typeof prepare>>();

/** The user's subscriptions, newest first, read now (for `GET /subscription/status`). */
export async function loadSubscriptions(db: DbOrTx, userId: string): Promise<SubscriptionRow[]> {
  let statement = statements.get(db);
  if (!statement) {
    statement = prepare(db);
    statements.set(db, statement);
  }
  return statement.execute({ userId });
}
