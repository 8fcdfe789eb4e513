import { errors, jwtVerify, SignJWT } from 'jose';
import { AppError } from '../lib/errors.js';

export interface AccessClaims {
  userId: string;
  sessionId: string;
}

export interface TokenServiceOptions {
  secret: Uint8Array;
  issuer: string;
  audience: string;
  /** Access token lifetime in seconds. */
  ttlSeconds: number;
}

export class TokenService {
  constructor(private readonly options: TokenServiceOptions) {}

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
      .sign(this.options.secret);
  }

  /** Verifies signature (HS256 only: `alg: none` and others are refused), issuer, audience, expiry. */
  async verifyAccess(token: string): Promise<AccessClaims> {
    try {
      const { payload } = await jwtVerify(token, this.options.secret, {
        algorithms: ['HS256'],
        issuer: this.options.issuer,
        audience: this.options.audience,
        requiredClaims: ['sub', 'sid', 'exp', 'iat'],
      });
      if (typeof payload.sub !== 'string' || typeof payload.sid !== 'string')
        throw new Error('claims');
      return { userId: payload.sub, sessionId: payload.sid };
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
