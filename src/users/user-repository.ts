import { eq, sql } from 'drizzle-orm';
import type pg from 'pg';
import type { DbOrTx } from '../db/client.js';
import { type SubscriptionRow, type UserRow, users } from '../db/schema/index.js';
import { batched } from '../lib/batch.js';
import type { CacheGroup, LocalCache } from '../lib/local-cache.js';

/** The process cache's name in its group (the database change feed). */
const ACCOUNT_CACHE = 'accounts';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** What the profile shows of a user: no hash, no Stripe id. */
export interface Profile {
  id: string;
  mobile: string;
  name: string | null;
  email: string | null;
  verified: boolean;
  hasPassword: boolean;
  createdAt: Date;
}

/** The columns of a subscription that decide the tier (see `tierOf`). */
export type TierFacts = Pick<
  SubscriptionRow,
  'status' | 'pastDueSince' | 'currentPeriodEnd' | 'cancelAtPeriodEnd'
>;

/** A user and their subscriptions' tier facts, newest first (as `loadSubscriptions` orders them). */
const ACCOUNTS_SQL = `
  select u.id, u.mobile, u.name, u.email, u.verified_at is not null, u.password_hash is not null,
         u.created_at, s.status, s.past_due_since, s.current_period_end, s.cancel_at_period_end
  from users u left join subscriptions s on s.user_id = u.id
  where u.id = any($1::uuid[])
  order by s.updated_at desc`;

type AccountRow = [
  id: string,
  mobile: string,
  name: string | null,
  email: string | null,
  verified: boolean,
  hasPassword: boolean,
  createdAt: Date,
  status: SubscriptionRow['status'] | null,
  pastDueSince: Date | null,
  currentPeriodEnd: Date | null,
  cancelAtPeriodEnd: boolean,
];

export interface Account {
  profile: Profile;
  subscriptions: TierFacts[];
}

export function profileOf(user: UserRow): Profile {
  return {
    id: user.id,
    mobile: user.mobile,
    name: user.name,
    email: user.email,
    verified: user.verifiedAt !== null,
    hasPassword: user.passwordHash !== null,
    createdAt: user.createdAt,
  };
}

export class UserRepository {
  /** `findById` runs on every authenticated profile read: built once, prepared by name. */
  private readonly byId;
  /**
   * Reads of a user with their subscriptions, batched: the ones asked for while this process
   * handled one round of I/O go to PostgreSQL as one query (`id = any($1)`). Each read is still
   * made after it was asked for, so it sees every change committed before that.
   */
  private readonly accounts: (id: string) => Promise<Account | undefined>;
  /** Accounts by user id, in this process (see `findWithSubscriptions`). */
  private readonly cached: LocalCache<Account | undefined>;

  constructor(
    private readonly db: DbOrTx,
    private readonly pool: pg.Pool,
    private readonly changes: CacheGroup,
  ) {
    this.cached = changes.cache<Account | undefined>(ACCOUNT_CACHE, 100_000);
    this.byId = db
      .select()
      .from(users)
      .where(eq(users.id, sql.placeholder('id')))
      .prepare('users_by_id');
    this.accounts = batched((ids: readonly string[]) => this.loadAccounts(ids));
  }

  private async loadAccounts(ids: readonly string[]): Promise<Array<Account | undefined>> {
    // One malformed id must not fail the others' batch (ids come from tokens, so none should be).
    const valid = [...new Set(ids)].filter((id) => UUID.test(id));
    const found = new Map<string, Account>();
    if (valid.length === 0) return ids.map(() => undefined);
    // pg without drizzle: mapping the joined rows through drizzle's column objects cost more
    // than the query itself on this path (it runs for every profile read and every prompt).
    const { rows } = await this.pool.query<AccountRow>({
      name: 'users_with_subscriptions',
      text: ACCOUNTS_SQL,
      values: [valid],
      rowMode: 'array',
    });
    for (const [id, mobile, name, email, verified, hasPassword, createdAt, ...tier] of rows) {
      let account = found.get(id);
      if (!account) {
        account = {
          profile: { id, mobile, name, email, verified, hasPassword, createdAt },
          subscriptions: [],
        };
        found.set(id, account);
      }
      const [status, pastDueSince, currentPeriodEnd, cancelAtPeriodEnd] = tier;
      if (status !== null) {
        account.subscriptions.push({ status, pastDueSince, currentPeriodEnd, cancelAtPeriodEnd });
      }
    }
    // Shared by every request that reads them from the cache (and the profile JSON is memoised
    // per account): frozen, so nothing can change one in place.
    for (const account of found.values()) {
      for (const facts of account.subscriptions) Object.freeze(facts);
      Object.freeze(account.subscriptions);
      Object.freeze(account.profile);
      Object.freeze(account);
    }
    return ids.map((id) => found.get(id));
  }

  /**
   * The user and their subscriptions (newest first, as `loadSubscriptions` orders them), for the
   * profile and the tier of every request that needs them. Kept in this process until the
   * database announces a change to the user or their subscriptions (a trigger NOTIFYs every
   * committed change, whoever makes it: see ChangeFeed), so an upgrade or downgrade takes effect
   * on the next request. A miss is read in one round trip shared with the other reads of the
   * moment. The value is shared: callers must not modify it.
   */
  async findWithSubscriptions(id: string): Promise<Account | undefined> {
    return this.cached.load(
      id,
      () => this.accounts(id),
      (account) => account !== undefined,
    );
  }

  /**
   * Drops the accounts here at once, after a change this process committed: the database's
   * announcement of it reaches every process a moment later, and this one's next request must
   * not be answered from before it. `update` outside a transaction calls it itself.
   */
  accountChanged(...ids: string[]): void {
    this.changes.dropLocal(ACCOUNT_CACHE, ids);
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
    if (tx === this.db) this.accountChanged(id);
    return row;
  }
}
