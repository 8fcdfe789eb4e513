import type { Config } from '../config.js';
import type { Database } from '../db/client.js';
import type { UserRow } from '../db/schema/index.js';
import type { Clock } from '../lib/clock.js';
import { AppError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { UserRepository } from '../users/user-repository.js';
import type { OtpPurpose, OtpService } from './otp-service.js';
import { hashPassword, verifyPassword } from './password.js';
import type { SessionMeta, SessionService, TokenPair } from './session-service.js';

export interface OtpSent {
  expiresIn: number;
  /** Only when OTP_DELIVERY=response. */
  otp?: string;
}

export interface SignedIn extends TokenPair {
  user: UserRow;
}

export interface AuthServiceOptions {
  config: Pick<Config, 'otpDelivery'>;
  db: Database;
  users: UserRepository;
  otps: OtpService;
  sessions: SessionService;
  clock: Clock;
  logger: Logger;
}

const invalidCredentials = () =>
  new AppError({ code: 'INVALID_CREDENTIALS', message: 'Mobile number or password is wrong' });

export class AuthService {
  constructor(private readonly o: AuthServiceOptions) {}

  /**
   * Registers a number. A number that was never verified can be registered again (the newer
   * registration replaces the pending one and voids its codes); a verified number is a conflict.
   */
  async signup(input: {
    mobile: string;
    name?: string | undefined;
    email?: string | undefined;
    password?: string | undefined;
  }): Promise<UserRow> {
    const passwordHash = input.password ? await hashPassword(input.password) : null;
    const values = {
      mobile: input.mobile,
      name: input.name ?? null,
      email: input.email ?? null,
      passwordHash,
    };
    const user = await this.o.db.transaction(async (tx) => {
      const created = await this.o.users.insert(values, tx);
      if (created) return created;
      const existing = await this.o.users.findByMobile(input.mobile, tx);
      if (!existing || existing.verifiedAt) {
        throw new AppError({
          code: 'CONFLICT',
          message: 'This mobile number is already registered',
        });
      }
      const replaced = await this.o.users.update(
        existing.id,
        { name: values.name, email: values.email, passwordHash },
        tx,
      );
      await this.o.otps.discard(input.mobile, 'signin');
      return replaced!;
    });
    this.o.users.accountChanged(user.id);
    return user;
  }

  /** Sends a code. With OTP_DELIVERY=log the answer is the same for unknown numbers. */
  async sendOtp(mobile: string, purpose: OtpPurpose): Promise<OtpSent> {
    const user = await this.o.users.findByMobile(mobile);
    if (!user && this.o.config.otpDelivery === 'response') {
      throw new AppError({
        code: 'NOT_FOUND',
        message: 'No account uses this mobile number; sign up first',
      });
    }
    const issued = await this.o.otps.issue(mobile, purpose, Boolean(user));
    if (this.o.config.otpDelivery === 'response') {
      return { expiresIn: issued.expiresIn, otp: issued.code };
    }
    if (user) {
      // OTP_DELIVERY=log is the stand-in for an SMS gateway: the code goes to the log only.
      this.o.logger.info({ mobile, purpose, deliveredCode: issued.code }, 'one-time code issued');
    }
    return { expiresIn: issued.expiresIn };
  }

  async verifyOtp(mobile: string, otp: string, meta: SessionMeta): Promise<SignedIn> {
    await this.o.otps.verify(mobile, 'signin', otp);
    const user = await this.o.users.findByMobile(mobile);
    if (!user) {
      throw new AppError({
        code: 'OTP_INVALID',
        message: 'The code is wrong, expired or already used',
      });
    }
    const signedIn = await this.o.db.transaction(async (tx) => {
      const current = user.verifiedAt
        ? user
        : ((await this.o.users.update(user.id, { verifiedAt: this.o.clock.now() }, tx)) ?? user);
      const pair = await this.o.sessions.create(current.id, meta, tx);
      return { ...pair, user: current };
    });
    if (!user.verifiedAt) this.o.users.accountChanged(user.id);
    return signedIn;
  }

  async resetPassword(mobile: string, otp: string, newPassword: string): Promise<void> {
    await this.o.otps.verify(mobile, 'reset', otp);
    const user = await this.o.users.findByMobile(mobile);
    if (!user) {
      throw new AppError({
        code: 'OTP_INVALID',
        message: 'The code is wrong, expired or already used',
      });
    }
    const passwordHash = await hashPassword(newPassword);
    await this.o.db.transaction(async (tx) => {
      // The code proves the number, so a reset also verifies a never-verified account.
      await this.o.users.update(
        user.id,
        { passwordHash, verifiedAt: user.verifiedAt ?? this.o.clock.now() },
        tx,
      );
      await this.o.sessions.revokeAll(user.id, 'password_reset', undefined, tx);
    });
    this.o.users.accountChanged(user.id);
  }

  async changePassword(
    userId: string,
    sessionId: string,
    currentPassword: string | undefined,
    newPassword: string,
  ): Promise<void> {
    const user = await this.o.users.findById(userId);
    if (!user) throw new AppError({ code: 'UNAUTHENTICATED', message: 'The session has ended' });
    if (user.passwordHash) {
      if (!currentPassword) {
        throw new AppError({
          code: 'VALIDATION_FAILED',
          message: 'body.currentPassword: required when a password is set',
          details: {
            issues: [{ field: 'body.currentPassword', message: 'required when a password is set' }],
          },
        });
      }
      if (!(await verifyPassword(user.passwordHash, currentPassword))) {
        throw new AppError({ code: 'FORBIDDEN', message: 'The current password is wrong' });
      }
    }
    const passwordHash = await hashPassword(newPassword);
    await this.o.db.transaction(async (tx) => {
      await this.o.users.update(userId, { passwordHash }, tx);
      await this.o.sessions.revokeAll(userId, 'password_changed', sessionId, tx);
    });
    this.o.users.accountChanged(userId);
  }

  /** The same error for an unknown number and a wrong password, in about the same time. */
  async login(mobile: string, password: string, meta: SessionMeta): Promise<SignedIn> {
    const user = await this.o.users.findByMobile(mobile);
    const ok = await verifyPassword(user?.passwordHash ?? null, password);
    if (!user || !ok) throw invalidCredentials();
    if (!user.verifiedAt) {
      throw new AppError({
        code: 'FORBIDDEN',
        message: 'Verify this mobile number with a one-time code before signing in with a password',
      });
    }
    const pair = await this.o.sessions.create(user.id, meta);
    return { ...pair, user };
  }
}
