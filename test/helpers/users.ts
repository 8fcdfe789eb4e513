import { randomInt } from 'node:crypto';
import { SignJWT } from 'jose';
import { expect, it } from 'vitest';
import type { App } from '../../src/api/app.js';
import type { Config } from '../../src/config.js';

/** A fresh valid Indian mobile number in E.164. */
export function randomMobile(): string {
  return `+91${9}${randomInt(100_000_000, 999_999_999)}`;
}

export interface SignedInUser {
  id: string;
  mobile: string;
  accessToken: string;
  refreshToken: string;
  headers: { authorization: string };
}

/** Signs up and signs in through the public API (OTP_DELIVERY=response). */
export async function signIn(
  app: App,
  options: { mobile?: string; password?: string; name?: string } = {},
): Promise<SignedInUser> {
  const mobile = options.mobile ?? randomMobile();
  const signup = await app.inject({
    method: 'POST',
    url: '/auth/signup',
    payload: { mobile, name: options.name, password: options.password },
  });
  if (signup.statusCode !== 201 && signup.statusCode !== 409) {
    throw new Error(`signup failed: ${signup.statusCode} ${signup.body}`);
  }
  const sent = await app.inject({ method: 'POST', url: '/auth/send-otp', payload: { mobile } });
  if (sent.statusCode !== 200) throw new Error(`send-otp failed: ${sent.statusCode} ${sent.body}`);
  const verified = await app.inject({
    method: 'POST',
    url: '/auth/verify-otp',
    payload: { mobile, otp: sent.json().otp },
  });
  if (verified.statusCode !== 200) {
    throw new Error(`verify-otp failed: ${verified.statusCode} ${verified.body}`);
  }
  const body = verified.json();
  return {
    id: body.user.id,
    mobile,
    accessToken: body.accessToken,
    refreshToken: body.refreshToken,
    headers: { authorization: `Bearer ${body.accessToken}` },
  };
}

export interface ProtectedRoute {
  method: 'GET' | 'POST' | 'PATCH' | 'DELETE' | 'PUT';
  url: string | (() => string);
  payload?: unknown;
}

/** An unsigned (`alg: none`) token carrying otherwise valid claims. */
function unsignedToken(userId: string) {
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  return `${encode({ alg: 'none', typ: 'JWT' })}.${encode({ sub: userId, sid: userId, iat: now, exp: now + 600, iss: 'gemini-chat', aud: 'gemini-chat-api' })}.`;
}

/** Signs an access token as the app would, with overrides to make it bad in one way. */
export async function signAccessToken(
  config: Config,
  userId: string,
  sessionId: string,
  overrides: { exp?: number; aud?: string; key?: Uint8Array } = {},
): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ sid: sessionId })
    .setProtectedHeader({ alg: 'HS256' })
    .setSubject(userId)
    .setIssuer(config.jwt.issuer)
    .setAudience(overrides.aud ?? config.jwt.audience)
    .setIssuedAt(now - 3600)
    .setExpirationTime(overrides.exp ?? now + 600)
    .sign(overrides.key ?? config.jwt.secret);
}

/** The session id (`sid`) of an access token. */
export function sessionIdOf(accessToken: string): string {
  const [, payload] = accessToken.split('.');
  return JSON.parse(Buffer.from(payload!, 'base64url').toString()).sid as string;
}

/**
 * Authorization headers that must all be refused with 401: no token, a malformed header,
 * garbage, a tampered, an expired, a wrong-audience, a wrong-key (forged) and an unsigned
 * (`alg: none`) token of `user`; `extra` adds more (e.g. the token of a revoked session).
 */
export async function badTokenCases(
  config: Config,
  user: Pick<SignedInUser, 'id' | 'accessToken'>,
  extra: Array<[string, string]> = [],
): Promise<Array<[string, Record<string, string>]>> {
  const sid = sessionIdOf(user.accessToken);
  const tampered = user.accessToken.slice(0, -2) + (user.accessToken.endsWith('AA') ? 'BB' : 'AA');
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
  return [
    ['no token', {}],
    ['malformed header', { authorization: `Token ${user.accessToken}` }],
    ['garbage', { authorization: 'Bearer not-a-jwt' }],
    ['tampered', bearer(tampered)],
    [
      'expired',
      bearer(
        await signAccessToken(config, user.id, sid, { exp: Math.floor(Date.now() / 1000) - 60 }),
      ),
    ],
    [
      'wrong audience',
      bearer(await signAccessToken(config, user.id, sid, { aud: 'someone-else' })),
    ],
    [
      'wrong key',
      bearer(
        await signAccessToken(config, user.id, sid, {
          key: new TextEncoder().encode('x'.repeat(40)),
        }),
      ),
    ],
    ['alg none', bearer(unsignedToken(user.id))],
    ...extra.map(([name, token]): [string, Record<string, string>] => [name, bearer(token)]),
  ];
}

/**
 * The checks every protected route must pass: no token, a malformed header, a tampered, an
 * expired, an unsigned (`alg: none`), a wrong-audience and a wrong-key token all answer 401
 * UNAUTHENTICATED with a WWW-Authenticate header. Call inside a describe block.
 */
export function itRejectsBadTokens(
  getContext: () => { app: App; config: Config; user: SignedInUser },
  routes: ProtectedRoute[],
) {
  for (const route of routes) {
    const label = `${route.method} ${typeof route.url === 'string' ? route.url : 'route'}`;
    it(`${label} refuses missing, malformed, expired, tampered, unsigned and foreign tokens`, async () => {
      const { app, config, user } = getContext();
      const cases = await badTokenCases(config, user);
      for (const [name, headers] of cases) {
        const url = typeof route.url === 'string' ? route.url : route.url();
        const res = await app.inject({
          method: route.method,
          url,
          headers,
          ...(route.payload !== undefined ? { payload: route.payload as object } : {}),
        });
        expect(res.statusCode, `${name} on ${route.method} ${url}`).toBe(401);
        expect(res.json().error.code, name).toBe('UNAUTHENTICATED');
        expect(res.headers['www-authenticate'], name).toMatch(/^Bearer/);
      }
    });
  }
}
