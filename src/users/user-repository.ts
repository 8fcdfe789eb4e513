import { desc, eq, sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.js';
import { type SubscriptionRow, subscriptions, type UserRow, users } from '../db/schema/index.js';

export class UserRepository {
  /** `findById` runs on every authenticated profile read: built once, prepared by name. */
  private readonly byId;
  private readonly withSubscriptions;

  constructor(private readonly db: DbOrTx) {
    this.byId = db
      .select()
      .from(users)
      .where(eq(users.id, sql.placeholder('id')))
      .prepare('users_by_id');
    this.withSubscriptions = db
      .select({ user: users, subscription: subscriptions })
      .from(users)
      .leftJoin(subscriptions, eq(subscriptions.userId, users.id))
      .where(eq(users.id, sql.placeholder('id')))
      .orderBy(desc(subscriptions.updatedAt))
      .prepare('users_with_subscriptions');
  }

  /**
   * The user and their subscriptions (newest first, as `loadSubscriptions` orders them) in one
   * round trip, for `GET /user/me` which needs both.
   */
  async findWithSubscriptions(
    id: string,
  ): Promise<{ user: UserRow; subscriptions: SubscriptionRow[] } | undefined> {
    const rows = await this.withSubscriptions.execute({ id });
    const user = rows[0]?.user;
    if (!user) return undefined;
    return {
      user,
      subscriptions: rows.flatMap((row) => (row.subscription ? [row.subscription] : [])),
    };
  }

  async findByMobile(mobile: string, tx: DbOrTx = this.db): Promise<UserRow | undefined> {
    const [row] = await tx.select().from(users).where(eq(users.mobile, mobile));
    return row;
  }

  async findById(id: string, tx: DbOrTx = this.db): Promise<UserRow | undefined> {
    if (tx === this.db) {
      const [row] = await this.byId.execute({ id });
      return row;
    }
    const [row] = await tx.select().from(users).where(eq(users.id, id));
    return row;
  }

  /** Inserts a user; returns undefined when the mobile number is already taken. */
  async insert(
    values: {
      mobile: string;
      name?: string | null;
      email?: string | null;
      passwordHash?: string | null;
    },
    tx: DbOrTx = this.db,
  ): Promise<UserRow | undefined> {
    const [row] = await tx
      .insert(users)
      .values(values)
      .onConflictDoNothing({ target: users.mobile })
      .returning();
    return row;
  }

  async update(
    id: string,
    values: Partial<
      Pick<UserRow, 'name' | 'email' | 'passwordHash' | 'verifiedAt' | 'stripeCustomerId'>
    >,
    tx: DbOrTx = this.db,
  ): Promise<UserRow | undefined> {
    const [row] = await tx
      .update(users)
      .set({ ...values, updatedAt: new Date() })
      .where(eq(users.id, id))
      .returning();
    return row;
  }
}
