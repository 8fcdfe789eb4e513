import { randomBytes } from 'node:crypto';
import { and, eq, gt, isNull, ne } from 'drizzle-orm';
import type { Database, DbOrTx } from '../db/client.js';
import { refreshTokens, sessions } from '../db/schema/index.js';
import type { Clock } from '../lib/clock.js';
import { AppError, isConnectionError } from '../lib/errors.js';
import type { InvalidationBus, LocalCache } from '../lib/local-cache.js';
import type { Logger } from '../lib/logger.js';
import type { Redis, RedisKeys } from '../lib/redis.js';
import { sha256Hex } from '../lib/secrets.js';
import type { AccessClaims, TokenService } from './token-service.js';

export interface TokenPair {
  accessToken: string;
  refreshToken: string;
  tokenType: 'Bearer';
  expiresIn: number;
}

export interface SessionMeta {
  userAgent?: string | undefined;
  ip?: string | undefined;
}

/** How long a "session is live" answer is cached; revocation overwrites it at once. */
const SESSION_CACHE_SECONDS = 300;
const REVOKED = 'revoked';
/** The process cache's name on the invalidation bus. */
const LOCAL_CACHE = 'sessions';

const unauthenticated = (message: string) =>
  new AppError({
    code: 'UNAUTHENTICATED',
    message,
    headers: { 'www-authenticate': 'Bearer error="invalid_token"' },
  });

const sessionEnded = () => unauthenticated('The session has ended; sign in again');

export interface SessionServiceOptions {
  db: Database;
  redis: Redis;
  keys: RedisKeys;
  tokens: TokenService;
  clock: Clock;
  logger: Logger;
  refreshTtlDays: number;
  invalidation: InvalidationBus;
}

export class SessionService {
  /**
   * Session id -> its user id, or REVOKED (a session that ended never comes back), in this
   * process; a revocation anywhere drops the entry everywhere (see `markRevoked`).
   */
  private readonly local: LocalCache<string>;

  constructor(private readonly o: SessionServiceOptions) {
    this.local = o.invalidation.cache<string>(LOCAL_CACHE, 100_000);
  }

  private cacheKey(sessionId: string) {
    return this.o.keys.key('session', sessionId);
  }

  private newRefreshToken() {
    const token = randomBytes(32).toString('base64url');
    return { token, hash: sha256Hex(token) };
  }

  private refreshExpiry() {
    return new Date(this.o.clock.now().getTime() + this.o.refreshTtlDays * 86_400_000);
  }

  /** Starts a session and returns its first token pair. */
  async create(userId: string, meta: SessionMeta, tx: DbOrTx = this.o.db): Promise<TokenPair> {
    const expiresAt = this.refreshExpiry();
    const [session] = await tx
      .insert(sessions)
      .values({ userId, userAgent: meta.userAgent?.slice(0, 300), ip: meta.ip, expiresAt })
      .returning({ id: sessions.id });
    const refresh = this.newRefreshToken();
    await tx
      .insert(refreshTokens)
      .values({ sessionId: session!.id, tokenHash: refresh.hash, expiresAt });
    return this.pair(userId, session!.id, refresh.token);
  }

  private async pair(userId: string, sessionId: string, refreshToken: string): Promise<TokenPair> {
    return {
      accessToken: await this.o.tokens.signAccess({ userId, sessionId }),
      refreshToken,
      tokenType: 'Bearer',
      expiresIn: this.o.tokens.ttlSeconds,
    };
  }

  /**
   * Rotates a refresh token. Presenting one that was already rotated means it leaked: the whole
   * session (its token family and its access tokens) is revoked.
   */
  async refresh(refreshToken: string): Promise<TokenPair> {
    const now = this.o.clock.now();
    const hash = sha256Hex(refreshToken);
    const outcome = await this.o.db.transaction(async (tx) => {
      const [row] = await tx
        .select({
          tokenId: refreshTokens.id,
          usedAt: refreshTokens.usedAt,
          tokenExpiresAt: refreshTokens.expiresAt,
          sessionId: sessions.id,
          userId: sessions.userId,
          revokedAt: sessions.revokedAt,
          sessionExpiresAt: sessions.expiresAt,
        })
        .from(refreshTokens)
        .innerJoin(sessions, eq(sessions.id, refreshTokens.sessionId))
        .where(eq(refreshTokens.tokenHash, hash))
        .for('update', { of: sessions });
      if (!row) return { kind: 'invalid' as const };
      if (row.revokedAt) return { kind: 'invalid' as const };
      if (row.usedAt) return { kind: 'reuse' as const, sessionId: row.sessionId };
      if (row.tokenExpiresAt <= now || row.sessionExpiresAt <= now) {
        return { kind: 'invalid' as const };
      }
      // Conditional: a concurrent rotation of the same token that committed while we waited for
      // the session lock has already used it (the row read above may predate it), so this one
      // counts as a reuse.
      const claimed = await tx
        .update(refreshTokens)
        .set({ usedAt: now })
        .where(and(eq(refreshTokens.id, row.tokenId), isNull(refreshTokens.usedAt)))
        .returning({ id: refreshTokens.id });
      if (claimed.length === 0) return { kind: 'reuse' as const, sessionId: row.sessionId };
      const next = this.newRefreshToken();
      const expiresAt = this.refreshExpiry();
      await tx
        .insert(refreshTokens)
        .values({ sessionId: row.sessionId, tokenHash: next.hash, expiresAt });
      await tx
        .update(sessions)
        .set({ lastUsedAt: now, expiresAt })
        .where(eq(sessions.id, row.sessionId));
      return {
        kind: 'ok' as const,
        userId: row.userId,
        sessionId: row.sessionId,
        token: next.token,
      };
    });
    if (outcome.kind === 'reuse') {
      await this.revoke(outcome.sessionId, 'refresh_token_reuse');
      this.o.logger.warn({ sessionId: outcome.sessionId }, 'refresh token reused; session revoked');
      throw unauthenticated('The refresh token was already used; the session has been revoked');
    }
    if (outcome.kind === 'invalid')
      throw unauthenticated('The refresh token is invalid or expired');
    return this.pair(outcome.userId, outcome.sessionId, outcome.token);
  }

  /** Revokes one session; its access tokens stop working on the next request. */
  async revoke(sessionId: string, reason: string, tx: DbOrTx = this.o.db): Promise<void> {
    await tx
      .update(sessions)
      .set({ revokedAt: this.o.clock.now(), revokedReason: reason })
      .where(and(eq(sessions.id, sessionId), isNull(sessions.revokedAt)));
    await this.markRevoked([sessionId]);
  }

  /** Revokes the user's session that a refresh token belongs to; false when it is not theirs. */
  async revokeByRefreshToken(
    userId: string,
    refreshToken: string,
    reason: string,
  ): Promise<boolean> {
    const [row] = await this.o.db
      .select({ sessionId: refreshTokens.sessionId })
      .from(refreshTokens)
      .innerJoin(sessions, eq(sessions.id, refreshTokens.sessionId))
      .where(
        and(eq(refreshTokens.tokenHash, sha256Hex(refreshToken)), eq(sessions.userId, userId)),
      );
    if (!row) return false;
    await this.revoke(row.sessionId, reason);
    return true;
  }

  /** Revokes every live session of a user, optionally keeping one (the caller's). */
  async revokeAll(userId: string, reason: string, keepSessionId?: string, tx: DbOrTx = this.o.db) {
    const revoked = await tx
      .update(sessions)
      .set({ revokedAt: this.o.clock.now(), revokedReason: reason })
      .where(
        and(
          eq(sessions.userId, userId),
          isNull(sessions.revokedAt),
          keepSessionId ? ne(sessions.id, keepSessionId) : undefined,
        ),
      )
      .returning({ id: sessions.id });
    await this.markRevoked(revoked.map((r) => r.id));
  }

  private async markRevoked(sessionIds: string[]) {
    if (sessionIds.length === 0) return;
    const bus = this.o.invalidation;
    bus.dropLocal(LOCAL_CACHE, sessionIds);
    // The markers first, then the invalidation, in one round trip: an instance that reloads
    // after the invalidation finds the marker.
    const pipeline = this.o.redis.pipeline();
    for (const id of sessionIds)
      pipeline.set(this.cacheKey(id), REVOKED, 'EX', SESSION_CACHE_SECONDS);
    pipeline.publish(bus.channel, bus.message(LOCAL_CACHE, sessionIds));
    await pipeline.exec().catch((error) => {
      // The database is the truth; a missed marker only delays revocation by the cache time.
      this.o.logger.warn(
        { err: (error as Error).message },
        'could not mark sessions revoked in Redis',
      );
    });
  }

  /** Whether a session is live, answered from this process or Redis when possible. */
  async isActive(sessionId: string, userId: string): Promise<boolean> {
    // Concurrent checks of one session (a client's burst on a cold process) share one look-up.
    // A session that is not live now never will be (revoked or expired).
    const owner = await this.local.load(
      sessionId,
      async () => (await this.load(sessionId)) ?? REVOKED,
    );
    return owner === userId;
  }

  /** The user whose live session this is, or null (revoked, expired, unknown). */
  private async load(sessionId: string): Promise<string | null> {
    const key = this.cacheKey(sessionId);
    let cached: string | null = null;
    try {
      cached = await this.o.redis.get(key);
    } catch (error) {
      if (!isConnectionError(error)) throw error;
    }
    if (cached === REVOKED) return null;
    if (cached) return cached;
    const [row] = await this.o.db
      .select({ userId: sessions.userId })
      .from(sessions)
      .where(
        and(
          eq(sessions.id, sessionId),
          isNull(sessions.revokedAt),
          gt(sessions.expiresAt, this.o.clock.now()),
        ),
      );
    if (!row) return null;
    // NX: never overwrite a revocation marker written after our read.
    await this.o.redis.set(key, row.userId, 'EX', SESSION_CACHE_SECONDS, 'NX').catch(() => {});
    return row.userId;
  }

  /** Checks a bearer token and its session; throws UNAUTHENTICATED. */
  async authenticate(accessToken: string) {
    const claims = await this.o.tokens.verifyAccess(accessToken);
    if (!(await this.isActive(claims.sessionId, claims.userId))) throw sessionEnded();
    return claims;
  }

  /**
   * `authenticate` without waiting, when this process already knows the answer (a token that
   * verified before, a session in the process cache): the claims, or the error to throw.
   * Undefined when it takes a look elsewhere.
   */
  authenticateKnown(accessToken: string): AccessClaims | AppError | undefined {
    const claims = this.o.tokens.verifiedBefore(accessToken);
    if (!claims) return undefined;
    const known = this.local.get(claims.sessionId);
    if (known === undefined) return undefined;
    return known === claims.userId ? claims : sessionEnded();
  }
}
