import { webcrypto } from 'node:crypto';
import { errors, jwtVerify, SignJWT } from 'jose';
import { AppError } from '../lib/errors.js';

export interface AccessClaims {
  readonly userId: string;
  readonly sessionId: string;
}

export interface TokenServiceOptions {
  secret: Uint8Array;
  issuer: string;
  audience: string;
  /** Access token lifetime in seconds. */
  ttlSeconds: number;
}

/** Tokens whose verification is remembered, at most (about 5 MB). */
const VERIFIED_MAX = 10_000;

export class TokenService {
  /**
   * The HMAC key, imported once: given the raw secret, jose imports a WebCrypto key on every
   * sign and verify, which was the largest single cost of an authenticated request.
   */
  private key: Promise<webcrypto.CryptoKey> | undefined;

  /**
   * Access tokens that passed verification, by their full text (signature included), with their
   * expiry: a client sends the same token with every request for its lifetime, and checking the
   * signature again (WebCrypto HMAC, tens of microseconds) is the same answer until it expires.
   * Only a token that verified is kept, so nothing can be got from here without the exact token;
   * revocation is the session check, which runs on every request regardless.
   */
  private readonly verified = new Map<string, { claims: AccessClaims; exp: number }>();

  constructor(private readonly options: TokenServiceOptions) {}

  private hmacKey(): Promise<webcrypto.CryptoKey> {
    this.key ??= webcrypto.subtle.importKey(
      'raw',
      this.options.secret,
      { name: 'HMAC', hash: 'SHA-256' },
      false,
      ['sign', 'verify'],
    );
    return this.key;
  }

  get ttlSeconds() {
    return this.options.ttlSeconds;
  }

  async signAccess(claims: AccessClaims): Promise<string> {
    return new SignJWT({ sid: claims.sessionId })
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setSubject(claims.userId)
      .setIssuer(this.options.issuer)
      .setAudience(this.options.audience)
      .setIssuedAt()
      .setExpirationTime(`${this.options.ttlSeconds}s`)
      .sign(await this.hmacKey());
  }

  /** The claims of a token that verified before and has not expired since; no work otherwise. */
  verifiedBefore(token: string): AccessClaims | undefined {
    const known = this.verified.get(token);
    if (!known) return undefined;
    // The same rule as jose's: expired once `exp` is not after the current second.
    if (known.exp > Math.floor(Date.now() / 1000)) return known.claims;
    this.verified.delete(token);
    return undefined;
  }

  /** Verifies signature (HS256 only: `alg: none` and others are refused), issuer, audience, expiry. */
  async verifyAccess(token: string): Promise<AccessClaims> {
    const known = this.verifiedBefore(token);
    if (known) return known;
    try {
      const { payload } = await jwtVerify(token, await this.hmacKey(), {
        algorithms: ['HS256'],
        issuer: this.options.issuer,
        audience: this.options.audience,
        requiredClaims: ['sub', 'sid', 'exp', 'iat'],
      });
      if (typeof payload.sub !== 'string' || typeof payload.sid !== 'string')
        throw new Error('claims');
      // Frozen: the same object is handed to every request that presents this token.
      const claims: AccessClaims = Object.freeze({ userId: payload.sub, sessionId: payload.sid });
      if (this.verified.size >= VERIFIED_MAX) {
        // Oldest first (a Map iterates in insertion order).
        const oldest = this.verified.keys().next().value;
        if (oldest !== undefined) this.verified.delete(oldest);
      }
      this.verified.set(token, { claims, exp: payload.exp! });
      return claims;
    } catch (error) {
      const expired = error instanceof errors.JWTExpired;
      throw new AppError({
        code: 'UNAUTHENTICATED',
        message: expired ? 'The access token has expired' : 'The access token is invalid',
        headers: {
          'www-authenticate': `Bearer error="invalid_token", error_description="${expired ? 'expired' : 'invalid'}"`,
        },
      });
    }
  }
}
