import { eq } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.js';
import { type UserRow, users } from '../db/schema/index.js';

export class UserRepository {
  constructor(private readonly db: DbOrTx) {}

  async findByMobile(mobile: string, tx: DbOrTx = this.db): Promise<UserRow | undefined> {
    const [row] = await tx.select().from(users).where(eq(users.mobile, mobile));
    return row;
  }

  async findById(id: string, tx: DbOrTx = this.db): Promise<UserRow | undefined> {
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
