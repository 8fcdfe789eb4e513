import { createHash, randomInt } from 'node:crypto';
import { and, eq } from 'drizzle-orm';
import { decodeJwt, decodeProtectedHeader } from 'jose';
import type { Response } from 'light-my-request';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { App } from '../src/api/app.js';
import { sessions, subscriptions, users } from '../src/db/schema/index.js';
import { sha256Hex } from '../src/lib/secrets.js';
import { expectError } from './helpers/assertions.js';
import { createTestContext, type TestContext } from './helpers/context.js';
import { itRejectsBadTokens, randomMobile, type SignedInUser, signIn } from './helpers/users.js';
import { until } from './helpers/wait.js';

type Purpose = 'signin' | 'reset';

let ctx: TestContext;
beforeAll(async () => {
  ctx = await createTestContext();
});
afterAll(async () => ctx?.close());

// ---------------------------------------------------------------------------------------------
// helpers

/** A random valid Indian mobile number in national form (10 digits, no +91). */
function nationalMobile(): string {
  return `9${randomInt(100_000_000, 999_999_999)}`;
}

function post(
  app: App,
  url: string,
  payload?: object,
  options: { headers?: Record<string, string>; ip?: string } = {},
) {
  return app.inject({
    method: 'POST',
    url,
    ...(payload !== undefined ? { payload } : {}),
    ...(options.headers ? { headers: options.headers } : {}),
    ...(options.ip ? { remoteAddress: options.ip } : {}),
  });
}

function me(app: App, accessToken: string) {
  return app.inject({
    method: 'GET',
    url: '/user/me',
    headers: { authorization: `Bearer ${accessToken}` },
  });
}

function expectRetryAfter(res: Response, max: number) {
  const value = Number(res.headers['retry-after']);
  expect(Number.isInteger(value), `Retry-After: ${res.headers['retry-after']}`).toBe(true);
  expect(value).toBeGreaterThanOrEqual(1);
  expect(value).toBeLessThanOrEqual(max);
}

/** A 6-digit code that is not `code`. */
function wrongCode(code: string): string {
  return ((Number(code) + 1) % 1_000_000).toString().padStart(6, '0');
}

function otpKey(c: TestContext, purpose: Purpose, mobile: string) {
  return c.container.keys.key('otp', purpose, mobile);
}

/** Lets the next code for this number and purpose be sent at once (skips the 60 s cooldown). */
async function clearCooldown(c: TestContext, mobile: string, purpose: Purpose) {
  await c.container.redis.del(c.container.keys.key('otp-cooldown', purpose, mobile));
}

async function signup(c: TestContext, body: Record<string, unknown>) {
  const res = await post(c.app, '/auth/signup', body);
  expect(res.statusCode, res.body).toBe(201);
  return res.json().user as { id: string; mobile: string };
}

/** Asks for a code (response mode) and returns it. */
async function sendCode(c: TestContext, mobile: string, purpose: Purpose = 'signin') {
  const res = await post(c.app, purpose === 'signin' ? '/auth/send-otp' : '/auth/forgot-password', {
    mobile,
  });
  expect(res.statusCode, res.body).toBe(200);
  const { otp } = res.json();
  expect(otp).toMatch(/^\d{6}$/);
  return otp as string;
}

async function verify(c: TestContext, mobile: string, otp: string) {
  return post(c.app, '/auth/verify-otp', { mobile, otp });
}

async function login(c: TestContext, mobile: string, password: string) {
  const res = await post(c.app, '/auth/login', { mobile, password });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as { accessToken: string; refreshToken: string };
}

function withinWord(text: string, value: string) {
  return new RegExp(
    `(?<![0-9A-Za-z])${value.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(?![0-9A-Za-z])`,
  ).test(text);
}

// ---------------------------------------------------------------------------------------------

describe('whole flow', () => {
  it('signs up, sends and verifies a code, and reads the profile (basic, verified)', async () => {
    const national = nationalMobile();
    const e164 = `+91${national}`;
    const signupRes = await post(ctx.app, '/auth/signup', {
      mobile: national,
      name: 'Asha',
      email: 'asha@example.com',
    });
    expect(signupRes.statusCode, signupRes.body).toBe(201);
    const created = signupRes.json().user;
    expect(created).toMatchObject({
      mobile: e164,
      name: 'Asha',
      email: 'asha@example.com',
      tier: 'basic',
      verified: false,
      hasPassword: false,
    });

    const sent = await post(ctx.app, '/auth/send-otp', { mobile: national });
    expect(sent.statusCode, sent.body).toBe(200);
    expect(sent.json()).toEqual({ expiresIn: 300, otp: expect.stringMatching(/^\d{6}$/) });

    const verified = await verify(ctx, e164, sent.json().otp);
    expect(verified.statusCode, verified.body).toBe(200);
    const body = verified.json();
    expect(body).toMatchObject({
      accessToken: expect.any(String),
      refreshToken: expect.any(String),
      tokenType: 'Bearer',
      expiresIn: 900,
      user: { id: created.id, mobile: e164, verified: true, tier: 'basic' },
    });
    // 256 random bits, base64url.
    expect(body.refreshToken).toMatch(/^[A-Za-z0-9_-]{43}$/);

    // The access token: HS256 with sub, sid, iat, exp (15 minutes), iss and aud.
    expect(decodeProtectedHeader(body.accessToken).alg).toBe('HS256');
    const claims = decodeJwt(body.accessToken);
    expect(claims).toMatchObject({
      sub: created.id,
      sid: expect.any(String),
      iss: ctx.config.jwt.issuer,
      aud: ctx.config.jwt.audience,
    });
    expect(claims.exp! - claims.iat!).toBe(900);

    const profile = await me(ctx.app, body.accessToken);
    expect(profile.statusCode, profile.body).toBe(200);
    expect(profile.json()).toEqual({
      id: created.id,
      mobile: e164,
      name: 'Asha',
      email: 'asha@example.com',
      tier: 'basic',
      verified: true,
      hasPassword: false,
      createdAt: created.createdAt,
    });
    expect(new Date(profile.json().createdAt).toISOString()).toBe(profile.json().createdAt);
  });

  it('resets a forgotten password with a reset code, revokes old sessions, and logs in with the new password', async () => {
    const user = await signIn(ctx.app, { password: 'old-password-1' });
    const other = await login(ctx, user.mobile, 'old-password-1');
    expect((await me(ctx.app, user.accessToken)).statusCode).toBe(200);
    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);

    const forgot = await post(ctx.app, '/auth/forgot-password', { mobile: user.mobile });
    expect(forgot.statusCode, forgot.body).toBe(200);
    expect(forgot.json()).toEqual({ expiresIn: 300, otp: expect.stringMatching(/^\d{6}$/) });

    const reset = await post(ctx.app, '/auth/reset-password', {
      mobile: user.mobile,
      otp: forgot.json().otp,
      newPassword: 'new-password-2',
    });
    expect(reset.statusCode, reset.body).toBe(204);
    expect(reset.body).toBe('');

    // Every session of the user is gone, access and refresh alike.
    for (const token of [user.accessToken, other.accessToken]) {
      expectError(await me(ctx.app, token), 401, 'UNAUTHENTICATED');
    }
    for (const refreshToken of [user.refreshToken, other.refreshToken]) {
      expectError(await post(ctx.app, '/auth/refresh', { refreshToken }), 401, 'UNAUTHENTICATED');
    }

    expectError(
      await post(ctx.app, '/auth/login', { mobile: user.mobile, password: 'old-password-1' }),
      401,
      'INVALID_CREDENTIALS',
    );
    const fresh = await login(ctx, user.mobile, 'new-password-2');
    const profile = await me(ctx.app, fresh.accessToken);
    expect(profile.statusCode).toBe(200);
    expect(profile.json()).toMatchObject({ id: user.id, hasPassword: true, verified: true });

    // The reset code is single use.
    expectError(
      await post(ctx.app, '/auth/reset-password', {
        mobile: user.mobile,
        otp: forgot.json().otp,
        newPassword: 'third-password-3',
      }),
      400,
      'OTP_INVALID',
    );
  });
});

describe('mobile numbers and signup', () => {
  it('stores and returns a national number in E.164 and treats both forms as the same number', async () => {
    const national = nationalMobile();
    const user = await signup(ctx, { mobile: national });
    expect(user.mobile).toBe(`+91${national}`);
    const [row] = await ctx.container.database.db
      .select({ mobile: users.mobile })
      .from(users)
      .where(eq(users.id, user.id));
    expect(row!.mobile).toBe(`+91${national}`);

    // Code asked with the spaced E.164 form, verified with the national form.
    const spaced = `+91 ${national.slice(0, 5)} ${national.slice(5)}`;
    const otp = await sendCode(ctx, spaced);
    const verified = await verify(ctx, national, otp);
    expect(verified.statusCode, verified.body).toBe(200);
    expect(verified.json().user.mobile).toBe(`+91${national}`);
  });

  it('answers an invalid number with 400 VALIDATION_FAILED naming body.mobile', async () => {
    for (const mobile of ['12345', 'not-a-number', '+91123', '+911123456789' /* a landline */]) {
      for (const url of ['/auth/signup', '/auth/send-otp', '/auth/forgot-password']) {
        const error = expectError(await post(ctx.app, url, { mobile }), 400, 'VALIDATION_FAILED');
        expect(error.message).toContain('body.mobile');
        expect(error.details.issues).toEqual([expect.objectContaining({ field: 'body.mobile' })]);
      }
    }
    const missing = expectError(
      await post(ctx.app, '/auth/verify-otp', { otp: '123456' }),
      400,
      'VALIDATION_FAILED',
    );
    expect(missing.details.issues).toEqual([expect.objectContaining({ field: 'body.mobile' })]);
  });

  it('refuses to sign up a verified number again with 409 CONFLICT, in either form', async () => {
    const user = await signIn(ctx.app);
    expectError(await post(ctx.app, '/auth/signup', { mobile: user.mobile }), 409, 'CONFLICT');
    expectError(
      await post(ctx.app, '/auth/signup', { mobile: user.mobile.slice(3) }),
      409,
      'CONFLICT',
    );
  });

  it('lets a never-verified number sign up again, which voids its outstanding code', async () => {
    const mobile = randomMobile();
    const first = await signup(ctx, { mobile, name: 'First' });
    const oldCode = await sendCode(ctx, mobile);
    const second = await signup(ctx, { mobile, name: 'Second' });
    expect(second.id).toBe(first.id);
    expectError(await verify(ctx, mobile, oldCode), 400, 'OTP_INVALID');
  });

  it('refuses passwords shorter than 8 or longer than 128 characters', async () => {
    for (const password of ['short', 'x'.repeat(129)]) {
      const error = expectError(
        await post(ctx.app, '/auth/signup', { mobile: randomMobile(), password }),
        400,
        'VALIDATION_FAILED',
      );
      expect(error.details.issues).toEqual([expect.objectContaining({ field: 'body.password' })]);
    }
    await signup(ctx, { mobile: randomMobile(), password: 'x'.repeat(128) });
  });

  it('never returns the password hash', async () => {
    const res = await post(ctx.app, '/auth/signup', {
      mobile: randomMobile(),
      password: 'a-secret-password',
    });
    expect(res.statusCode).toBe(201);
    expect(res.json().user.hasPassword).toBe(true);
    expect(res.body).not.toContain('$argon2');
    expect(res.body).not.toContain('passwordHash');
  });
});

describe('one-time codes', () => {
  it('stores the code in Redis only as a keyed hash, valid for 5 minutes', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    const otp = await sendCode(ctx, mobile);
    const key = otpKey(ctx, 'signin', mobile);
    const stored = await ctx.container.redis.hgetall(key);
    expect(Object.keys(stored).length).toBeGreaterThan(0);
    expect(JSON.stringify(stored)).not.toContain(otp);
    expect(stored.h).toMatch(/^[0-9a-f]{64}$/);
    // Keyed: not a plain hash of the code that anyone could brute-force offline.
    for (const plain of [otp, `signin:${mobile}:${otp}`, `${mobile}:${otp}`]) {
      expect(stored.h).not.toBe(sha256Hex(plain));
      expect(stored.h).not.toBe(createHash('sha1').update(plain).digest('hex'));
    }
    const ttl = await ctx.container.redis.ttl(key);
    expect(ttl).toBeGreaterThan(290);
    expect(ttl).toBeLessThanOrEqual(300);

    // Nowhere else under our prefix either (key names or string/hash values).
    const keys = await ctx.container.redis.keys(`${ctx.container.keys.prefix}*`);
    for (const k of keys) {
      expect(withinWord(k, otp), k).toBe(false);
      const type = await ctx.container.redis.type(k);
      const value =
        type === 'string'
          ? await ctx.container.redis.get(k)
          : type === 'hash'
            ? JSON.stringify(await ctx.container.redis.hgetall(k))
            : '';
      expect(withinWord(value ?? '', otp), k).toBe(false);
    }
  });

  it('answers 5 wrong codes with 400 OTP_INVALID, then refuses the right code with 429 OTP_LOCKED', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    const otp = await sendCode(ctx, mobile);
    for (let i = 1; i <= 5; i++) {
      const error = expectError(await verify(ctx, mobile, wrongCode(otp)), 400, 'OTP_INVALID');
      expect(error.details.attemptsLeft).toBe(5 - i);
    }
    const sixth = await verify(ctx, mobile, otp);
    expectError(sixth, 429, 'OTP_LOCKED');
    expectRetryAfter(sixth, 300);
    // Still dead afterwards.
    expectError(await verify(ctx, mobile, otp), 429, 'OTP_LOCKED');

    // A new code (after the cooldown) starts over and works.
    await clearCooldown(ctx, mobile, 'signin');
    const next = await sendCode(ctx, mobile);
    expect((await verify(ctx, mobile, next)).statusCode).toBe(200);
  });

  it('locks a reset code after 5 wrong tries too', async () => {
    const user = await signIn(ctx.app, { password: 'reset-lock-pass' });
    const otp = await sendCode(ctx, user.mobile, 'reset');
    for (let i = 0; i < 5; i++) {
      expectError(
        await post(ctx.app, '/auth/reset-password', {
          mobile: user.mobile,
          otp: wrongCode(otp),
          newPassword: 'attacker-password',
        }),
        400,
        'OTP_INVALID',
      );
    }
    const res = await post(ctx.app, '/auth/reset-password', {
      mobile: user.mobile,
      otp,
      newPassword: 'attacker-password',
    });
    expectError(res, 429, 'OTP_LOCKED');
    expectRetryAfter(res, 300);
    await login(ctx, user.mobile, 'reset-lock-pass');
  });

  it('refuses an expired code', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    const otp = await sendCode(ctx, mobile);
    // Fast-forward the 5 minutes: let the key's TTL run out.
    await ctx.container.redis.pexpire(otpKey(ctx, 'signin', mobile), 1);
    await new Promise((resolve) => setTimeout(resolve, 20));
    expectError(await verify(ctx, mobile, otp), 400, 'OTP_INVALID');
  });

  it('refuses a code that was already used', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    const otp = await sendCode(ctx, mobile);
    expect((await verify(ctx, mobile, otp)).statusCode).toBe(200);
    expectError(await verify(ctx, mobile, otp), 400, 'OTP_INVALID');
  });

  it('refuses a code sent for another number', async () => {
    const a = randomMobile();
    const b = randomMobile();
    await signup(ctx, { mobile: a });
    await signup(ctx, { mobile: b });
    const codeA = await sendCode(ctx, a);
    await sendCode(ctx, b);
    expectError(await verify(ctx, b, codeA), 400, 'OTP_INVALID');
  });

  it('does not let a sign-in code reset a password, nor a reset code sign in', async () => {
    const user = await signIn(ctx.app, { password: 'purpose-pass-1' });
    await clearCooldown(ctx, user.mobile, 'signin');
    const signinCode = await sendCode(ctx, user.mobile, 'signin');
    expectError(
      await post(ctx.app, '/auth/reset-password', {
        mobile: user.mobile,
        otp: signinCode,
        newPassword: 'hijacked-password',
      }),
      400,
      'OTP_INVALID',
    );

    const resetCode = await sendCode(ctx, user.mobile, 'reset');
    expectError(await verify(ctx, user.mobile, resetCode), 400, 'OTP_INVALID');

    // Each still works for its own purpose.
    expect((await verify(ctx, user.mobile, signinCode)).statusCode).toBe(200);
    const reset = await post(ctx.app, '/auth/reset-password', {
      mobile: user.mobile,
      otp: resetCode,
      newPassword: 'purpose-pass-2',
    });
    expect(reset.statusCode, reset.body).toBe(204);
    await login(ctx, user.mobile, 'purpose-pass-2');
  });

  it('refuses a second code within 60 s with 429 OTP_COOLDOWN and Retry-After', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    const first = await sendCode(ctx, mobile);
    const again = await post(ctx.app, '/auth/send-otp', { mobile });
    expectError(again, 429, 'OTP_COOLDOWN');
    expectRetryAfter(again, 60);
    expect(again.body).not.toContain(first);
    // The first code is untouched by the refused request.
    expect((await verify(ctx, mobile, first)).statusCode).toBe(200);

    // The cooldown is per purpose: a reset code can still be asked.
    await sendCode(ctx, mobile, 'reset');
    const resetAgain = await post(ctx.app, '/auth/forgot-password', { mobile });
    expectError(resetAgain, 429, 'OTP_COOLDOWN');
    expectRetryAfter(resetAgain, 60);
  });

  it('refuses an 11th code in an hour for one number with 429, whatever the purpose', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile });
    for (let i = 0; i < 10; i++) {
      await clearCooldown(ctx, mobile, 'signin');
      await sendCode(ctx, mobile);
    }
    await clearCooldown(ctx, mobile, 'signin');
    const eleventh = await post(ctx.app, '/auth/send-otp', { mobile });
    expectError(eleventh, 429, 'RATE_LIMITED');
    expectRetryAfter(eleventh, 3600);

    const reset = await post(ctx.app, '/auth/forgot-password', { mobile });
    expectError(reset, 429, 'RATE_LIMITED');
    expectRetryAfter(reset, 3600);

    // Another number is not affected.
    const other = randomMobile();
    await signup(ctx, { mobile: other });
    await sendCode(ctx, other);
  });

  it('gives tokens to exactly one of 10 concurrent verifications with the right code', async () => {
    const mobile = randomMobile();
    const user = await signup(ctx, { mobile });
    const otp = await sendCode(ctx, mobile);
    const results = await Promise.all(Array.from({ length: 10 }, () => verify(ctx, mobile, otp)));
    const winners = results.filter((r) => r.statusCode === 200);
    expect(winners).toHaveLength(1);
    expect(winners[0]!.json().accessToken).toEqual(expect.any(String));
    for (const loser of results.filter((r) => r.statusCode !== 200)) {
      expect([400, 429]).toContain(loser.statusCode);
      expect(['OTP_INVALID', 'OTP_LOCKED']).toContain(loser.json().error.code);
      expect(loser.body).not.toContain('accessToken');
    }
    const rows = await ctx.container.database.db
      .select({ id: sessions.id })
      .from(sessions)
      .where(eq(sessions.userId, user.id));
    expect(rows).toHaveLength(1);
  });
});

describe('OTP_DELIVERY=log', () => {
  let logCtx: TestContext;
  beforeAll(async () => {
    logCtx = await createTestContext({ env: { OTP_DELIVERY: 'log' } });
  });
  afterAll(async () => logCtx?.close());

  const deliveredCodes = (mobile: string) =>
    logCtx.logs
      .records()
      .filter((r) => r.mobile === mobile && typeof r.deliveredCode === 'string')
      .map((r) => ({ purpose: r.purpose, code: r.deliveredCode as string }));

  it('answers send-otp and forgot-password identically for registered and unknown numbers, logging the code only for the registered one', async () => {
    const registered = randomMobile();
    const unknown = randomMobile();
    await signup(logCtx, { mobile: registered });

    for (const url of ['/auth/send-otp', '/auth/forgot-password']) {
      const known = await post(logCtx.app, url, { mobile: registered });
      const stranger = await post(logCtx.app, url, { mobile: unknown });
      expect(known.statusCode, known.body).toBe(200);
      expect(stranger.statusCode).toBe(known.statusCode);
      expect(Object.keys(known.json()).sort()).toEqual(['expiresIn']);
      expect(stranger.json()).toEqual(known.json());
      expect(stranger.headers['content-type']).toBe(known.headers['content-type']);

      // Asking again too soon is refused the same way for both, too.
      const knownAgain = await post(logCtx.app, url, { mobile: registered });
      const strangerAgain = await post(logCtx.app, url, { mobile: unknown });
      expect(knownAgain.statusCode).toBe(429);
      expect(strangerAgain.statusCode).toBe(429);
      expect(strangerAgain.json().error.code).toBe(knownAgain.json().error.code);
      expect(strangerAgain.headers['retry-after']).toBe(knownAgain.headers['retry-after']);
    }

    const codes = deliveredCodes(registered);
    expect(codes.map((c) => c.purpose).sort()).toEqual(['reset', 'signin']);
    for (const { code } of codes) expect(code).toMatch(/^\d{6}$/);
    expect(deliveredCodes(unknown)).toEqual([]);
    expect(logCtx.logs.text).not.toContain(unknown.slice(1));
    expect(await logCtx.container.redis.exists(otpKey(logCtx, 'signin', unknown))).toBe(0);
    expect(await logCtx.container.redis.exists(otpKey(logCtx, 'reset', unknown))).toBe(0);

    // The logged code is the real one.
    const signinCode = codes.find((c) => c.purpose === 'signin')!.code;
    const verified = await post(logCtx.app, '/auth/verify-otp', {
      mobile: registered,
      otp: signinCode,
    });
    expect(verified.statusCode, verified.body).toBe(200);
    expect(verified.json().user).toMatchObject({ mobile: registered, verified: true });
    const resetCode = codes.find((c) => c.purpose === 'reset')!.code;
    const reset = await post(logCtx.app, '/auth/reset-password', {
      mobile: registered,
      otp: resetCode,
      newPassword: 'logged-mode-pass',
    });
    expect(reset.statusCode, reset.body).toBe(204);
  });
});

describe('sessions', () => {
  it('rotates the refresh token into a new pair that works', async () => {
    const user = await signIn(ctx.app);
    const res = await post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken });
    expect(res.statusCode, res.body).toBe(200);
    const pair = res.json();
    expect(pair).toEqual({
      accessToken: expect.any(String),
      refreshToken: expect.stringMatching(/^[A-Za-z0-9_-]{43}$/),
      tokenType: 'Bearer',
      expiresIn: 900,
    });
    expect(pair.refreshToken).not.toBe(user.refreshToken);
    expect(decodeJwt(pair.accessToken).sid).toBe(decodeJwt(user.accessToken).sid);
    const profile = await me(ctx.app, pair.accessToken);
    expect(profile.statusCode).toBe(200);
    expect(profile.json().id).toBe(user.id);

    const next = await post(ctx.app, '/auth/refresh', { refreshToken: pair.refreshToken });
    expect(next.statusCode, next.body).toBe(200);
    expect((await me(ctx.app, next.json().accessToken)).statusCode).toBe(200);
  });

  it('rejects a reused refresh token and revokes the family: the rotated-to token and the access tokens die too', async () => {
    const user = await signIn(ctx.app);
    const other = await signIn(ctx.app);
    const rotated = (
      await post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken })
    ).json();
    // Warm the session cache, so that revocation must overwrite it.
    expect((await me(ctx.app, rotated.accessToken)).statusCode).toBe(200);

    const reuse = await post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken });
    expectError(reuse, 401, 'UNAUTHENTICATED');
    expect(reuse.headers['www-authenticate']).toMatch(/^Bearer/);

    expectError(
      await post(ctx.app, '/auth/refresh', { refreshToken: rotated.refreshToken }),
      401,
      'UNAUTHENTICATED',
    );
    expectError(await me(ctx.app, rotated.accessToken), 401, 'UNAUTHENTICATED');
    expectError(await me(ctx.app, user.accessToken), 401, 'UNAUTHENTICATED');
    // Someone else's session is untouched.
    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);
  });

  it('rotates a refresh token only once when it is presented concurrently, treating the rest as reuse', async () => {
    const user = await signIn(ctx.app);
    const results = await Promise.all(
      Array.from({ length: 5 }, () =>
        post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken }),
      ),
    );
    const ok = results.filter((r) => r.statusCode === 200);
    expect(ok).toHaveLength(1);
    for (const r of results.filter((r) => r.statusCode !== 200)) {
      expectError(r, 401, 'UNAUTHENTICATED');
    }
    // The losers presented an already rotated token: that is a reuse, and the family is revoked.
    expectError(
      await post(ctx.app, '/auth/refresh', { refreshToken: ok[0]!.json().refreshToken }),
      401,
      'UNAUTHENTICATED',
    );
  });

  it('rejects an unknown refresh token', async () => {
    expectError(
      await post(ctx.app, '/auth/refresh', { refreshToken: 'x'.repeat(43) }),
      401,
      'UNAUTHENTICATED',
    );
  });

  it('refuses the access token on the next request after logout, and only that session ends', async () => {
    const user = await signIn(ctx.app, { password: 'logout-pass-1' });
    const other = await login(ctx, user.mobile, 'logout-pass-1');
    expect((await me(ctx.app, user.accessToken)).statusCode).toBe(200);
    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);

    const out = await post(ctx.app, '/auth/logout', {}, { headers: user.headers });
    expect(out.statusCode, out.body).toBe(204);

    const after = await me(ctx.app, user.accessToken);
    expectError(after, 401, 'UNAUTHENTICATED');
    expect(after.headers['www-authenticate']).toMatch(/^Bearer/);
    expectError(
      await post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken }),
      401,
      'UNAUTHENTICATED',
    );
    expectError(
      await post(ctx.app, '/auth/logout', {}, { headers: user.headers }),
      401,
      'UNAUTHENTICATED',
    );

    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);
    expect(
      (await post(ctx.app, '/auth/refresh', { refreshToken: other.refreshToken })).statusCode,
    ).toBe(200);
  });

  it('logs out without a body', async () => {
    const user = await signIn(ctx.app);
    const out = await ctx.app.inject({
      method: 'POST',
      url: '/auth/logout',
      headers: user.headers,
    });
    expect(out.statusCode, out.body).toBe(204);
    expectError(await me(ctx.app, user.accessToken), 401, 'UNAUTHENTICATED');
  });

  it('ends every session of the user with logout {all: true}', async () => {
    const user = await signIn(ctx.app, { password: 'logout-all-pass' });
    const second = await login(ctx, user.mobile, 'logout-all-pass');
    const third = await login(ctx, user.mobile, 'logout-all-pass');
    const stranger = await signIn(ctx.app);
    const all = [user, second, third];
    for (const s of all) expect((await me(ctx.app, s.accessToken)).statusCode).toBe(200);

    const out = await post(ctx.app, '/auth/logout', { all: true }, { headers: user.headers });
    expect(out.statusCode, out.body).toBe(204);

    for (const s of all) {
      expectError(await me(ctx.app, s.accessToken), 401, 'UNAUTHENTICATED');
      expectError(
        await post(ctx.app, '/auth/refresh', { refreshToken: s.refreshToken }),
        401,
        'UNAUTHENTICATED',
      );
    }
    expect((await me(ctx.app, stranger.accessToken)).statusCode).toBe(200);
  });

  it("signs out the session of a given refresh token, and refuses someone else's token", async () => {
    const user = await signIn(ctx.app, { password: 'logout-other-pass' });
    const phone = await login(ctx, user.mobile, 'logout-other-pass');
    const stranger = await signIn(ctx.app);

    const foreign = await post(
      ctx.app,
      '/auth/logout',
      { refreshToken: stranger.refreshToken },
      { headers: user.headers },
    );
    expectError(foreign, 404, 'NOT_FOUND');
    expect((await me(ctx.app, stranger.accessToken)).statusCode).toBe(200);

    const out = await post(
      ctx.app,
      '/auth/logout',
      { refreshToken: phone.refreshToken },
      { headers: user.headers },
    );
    expect(out.statusCode, out.body).toBe(204);
    expectError(await me(ctx.app, phone.accessToken), 401, 'UNAUTHENTICATED');
    expect((await me(ctx.app, user.accessToken)).statusCode).toBe(200);
  });
});

describe('passwords', () => {
  it('requires currentPassword when a password is set, refuses a wrong one, and on success revokes the other sessions only', async () => {
    const user = await signIn(ctx.app, { password: 'change-pass-1' });
    const other = await login(ctx, user.mobile, 'change-pass-1');
    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);

    const missing = expectError(
      await post(
        ctx.app,
        '/auth/change-password',
        { newPassword: 'change-pass-2' },
        { headers: user.headers },
      ),
      400,
      'VALIDATION_FAILED',
    );
    expect(missing.message).toContain('currentPassword');

    expectError(
      await post(
        ctx.app,
        '/auth/change-password',
        { currentPassword: 'not-the-password', newPassword: 'change-pass-2' },
        { headers: user.headers },
      ),
      403,
      'FORBIDDEN',
    );
    // Neither refused attempt changed anything.
    expect((await me(ctx.app, other.accessToken)).statusCode).toBe(200);
    await login(ctx, user.mobile, 'change-pass-1');

    const tooShort = expectError(
      await post(
        ctx.app,
        '/auth/change-password',
        { currentPassword: 'change-pass-1', newPassword: 'short' },
        { headers: user.headers },
      ),
      400,
      'VALIDATION_FAILED',
    );
    expect(tooShort.details.issues).toEqual([
      expect.objectContaining({ field: 'body.newPassword' }),
    ]);

    const changed = await post(
      ctx.app,
      '/auth/change-password',
      { currentPassword: 'change-pass-1', newPassword: 'change-pass-2' },
      { headers: user.headers },
    );
    expect(changed.statusCode, changed.body).toBe(204);

    // The caller stays signed in; every other session ends.
    expect((await me(ctx.app, user.accessToken)).statusCode).toBe(200);
    expect(
      (await post(ctx.app, '/auth/refresh', { refreshToken: user.refreshToken })).statusCode,
    ).toBe(200);
    expectError(await me(ctx.app, other.accessToken), 401, 'UNAUTHENTICATED');
    expectError(
      await post(ctx.app, '/auth/refresh', { refreshToken: other.refreshToken }),
      401,
      'UNAUTHENTICATED',
    );

    expectError(
      await post(ctx.app, '/auth/login', { mobile: user.mobile, password: 'change-pass-1' }),
      401,
      'INVALID_CREDENTIALS',
    );
    await login(ctx, user.mobile, 'change-pass-2');

    // Stored with Argon2id.
    const [row] = await ctx.container.database.db
      .select({ hash: users.passwordHash })
      .from(users)
      .where(eq(users.id, user.id));
    expect(row!.hash).toMatch(/^\$argon2id\$/);
  });

  it('sets a first password without currentPassword', async () => {
    const user = await signIn(ctx.app);
    expect((await me(ctx.app, user.accessToken)).json().hasPassword).toBe(false);
    const set = await post(
      ctx.app,
      '/auth/change-password',
      { newPassword: 'first-password-1' },
      { headers: user.headers },
    );
    expect(set.statusCode, set.body).toBe(204);
    expect((await me(ctx.app, user.accessToken)).json().hasPassword).toBe(true);
    await login(ctx, user.mobile, 'first-password-1');
  });
});

describe('login', () => {
  it('answers an unknown number, a wrong password and a password-less account with the identical error', async () => {
    const withPassword = await signIn(ctx.app, { password: 'login-pass-1' });
    const withoutPassword = await signIn(ctx.app);
    const attempts = [
      { mobile: randomMobile(), password: 'login-pass-1' },
      { mobile: withPassword.mobile, password: 'wrong-password' },
      { mobile: withoutPassword.mobile, password: 'login-pass-1' },
    ];
    const errors = [];
    for (const attempt of attempts) {
      const res = await post(ctx.app, '/auth/login', attempt);
      const { code, message, details } = expectError(res, 401, 'INVALID_CREDENTIALS');
      errors.push({ code, message, details, retryAfter: res.headers['retry-after'] });
    }
    expect(errors[1]).toEqual(errors[0]);
    expect(errors[2]).toEqual(errors[0]);

    const ok = await post(ctx.app, '/auth/login', {
      mobile: withPassword.mobile.slice(3),
      password: 'login-pass-1',
    });
    expect(ok.statusCode, ok.body).toBe(200);
    expect(ok.json()).toMatchObject({
      tokenType: 'Bearer',
      user: { id: withPassword.id, tier: 'basic', verified: true },
    });
  });

  it('refuses a correct password before the number is verified', async () => {
    const mobile = randomMobile();
    await signup(ctx, { mobile, password: 'unverified-pass' });
    expectError(
      await post(ctx.app, '/auth/login', { mobile, password: 'unverified-pass' }),
      403,
      'FORBIDDEN',
    );
  });
});

describe('per-IP rate limits', () => {
  let limited: TestContext;
  beforeAll(async () => {
    limited = await createTestContext({ env: { RATE_LIMIT_PUBLIC_PER_MINUTE: '5' } });
  });
  afterAll(async () => limited?.close());

  async function expectLimitedAfterFive(
    ip: string,
    request: (ip: string) => Promise<Response>,
    allowedStatus: number,
  ) {
    for (let i = 0; i < 5; i++) {
      const res = await request(ip);
      expect(res.statusCode, res.body).toBe(allowedStatus);
    }
    const refused = await request(ip);
    const error = expectError(refused, 429, 'RATE_LIMITED');
    expect(error.details.limit).toBe(5);
    expectRetryAfter(refused, 60);
    // Another client is not affected.
    expect((await request(`${ip}9`)).statusCode).toBe(allowedStatus);
  }

  it('rate limits login per client IP with 429 RATE_LIMITED and Retry-After', async () => {
    await expectLimitedAfterFive(
      '10.1.0.1',
      (ip) =>
        post(limited.app, '/auth/login', { mobile: randomMobile(), password: 'guess-123' }, { ip }),
      401,
    );
  });

  it('rate limits send-otp per client IP, across different numbers', async () => {
    await expectLimitedAfterFive(
      '10.2.0.1',
      // Unknown numbers answer 404 in response mode; the limit counts them all the same.
      (ip) => post(limited.app, '/auth/send-otp', { mobile: randomMobile() }, { ip }),
      404,
    );
  });

  it('rate limits verify-otp per client IP, across different numbers', async () => {
    await expectLimitedAfterFive(
      '10.3.0.1',
      (ip) =>
        post(limited.app, '/auth/verify-otp', { mobile: randomMobile(), otp: '123456' }, { ip }),
      400,
    );
  });

  it('rate limits forgot-password per client IP', async () => {
    await expectLimitedAfterFive(
      '10.4.0.1',
      (ip) => post(limited.app, '/auth/forgot-password', { mobile: randomMobile() }, { ip }),
      404,
    );
  });
});

describe('protected routes', () => {
  let user: SignedInUser;
  beforeAll(async () => {
    user = await signIn(ctx.app, { password: 'protected-pass' });
  });

  itRejectsBadTokens(
    () => ({ app: ctx.app, config: ctx.config, user }),
    [
      { method: 'GET', url: '/user/me' },
      { method: 'PATCH', url: '/user/me', payload: { name: 'Mallory' } },
      {
        method: 'POST',
        url: '/auth/change-password',
        payload: { currentPassword: 'protected-pass', newPassword: 'hijacked-password' },
      },
      { method: 'POST', url: '/auth/logout', payload: { all: true } },
    ],
  );

  it('refuses the token of a session that was revoked, before validating the body', async () => {
    const victim = await signIn(ctx.app);
    await post(ctx.app, '/auth/logout', {}, { headers: victim.headers });
    const res = await ctx.app.inject({
      method: 'PATCH',
      url: '/user/me',
      headers: victim.headers,
      payload: { email: 'not-an-email' },
    });
    expectError(res, 401, 'UNAUTHENTICATED');
    expect(res.headers['www-authenticate']).toMatch(/^Bearer/);
  });
});

describe('profile', () => {
  it('updates name and email with PATCH /user/me', async () => {
    const user = await signIn(ctx.app, { name: 'Before' });
    const res = await ctx.app.inject({
      method: 'PATCH',
      url: '/user/me',
      headers: user.headers,
      payload: { name: 'After', email: 'after@example.com' },
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json()).toMatchObject({
      id: user.id,
      mobile: user.mobile,
      name: 'After',
      email: 'after@example.com',
      tier: 'basic',
      verified: true,
    });
    expect((await me(ctx.app, user.accessToken)).json()).toMatchObject({
      name: 'After',
      email: 'after@example.com',
    });

    // One field at a time; null clears.
    const cleared = await ctx.app.inject({
      method: 'PATCH',
      url: '/user/me',
      headers: user.headers,
      payload: { name: null },
    });
    expect(cleared.statusCode, cleared.body).toBe(200);
    expect(cleared.json()).toMatchObject({ name: null, email: 'after@example.com' });
  });

  it('refuses an invalid email or an empty update with 400', async () => {
    const user = await signIn(ctx.app);
    const bad = expectError(
      await ctx.app.inject({
        method: 'PATCH',
        url: '/user/me',
        headers: user.headers,
        payload: { email: 'not-an-email' },
      }),
      400,
      'VALIDATION_FAILED',
    );
    expect(bad.details.issues).toEqual([expect.objectContaining({ field: 'body.email' })]);
    expectError(
      await ctx.app.inject({
        method: 'PATCH',
        url: '/user/me',
        headers: user.headers,
        payload: {},
      }),
      400,
      'VALIDATION_FAILED',
    );
    // Fields outside name and email cannot be changed.
    const sneaky = await ctx.app.inject({
      method: 'PATCH',
      url: '/user/me',
      headers: user.headers,
      payload: { name: 'Ok', mobile: '+919999999999', tier: 'pro', verified: false },
    });
    if (sneaky.statusCode === 200) {
      expect(sneaky.json()).toMatchObject({ mobile: user.mobile, tier: 'basic', verified: true });
    } else {
      expectError(sneaky, 400, 'VALIDATION_FAILED');
    }
  });

  it('reads the tier from the database, never the token: a change shows on the next request, even one made by hand', async () => {
    const user = await signIn(ctx.app);
    expect((await me(ctx.app, user.accessToken)).json().tier).toBe('basic');
    const db = ctx.container.database.db;
    const subscriptionId = `sub_test_${randomInt(1e9)}`;
    // By hand: the database itself announces the change (NOTIFY), a moment after the commit.
    await db.insert(subscriptions).values({
      id: subscriptionId,
      userId: user.id,
      customerId: `cus_test_${randomInt(1e9)}`,
      status: 'active',
    });
    await until(
      async () => (await me(ctx.app, user.accessToken)).json().tier,
      (tier) => tier === 'pro',
    );
    await db
      .update(subscriptions)
      .set({ status: 'canceled' })
      .where(and(eq(subscriptions.id, subscriptionId), eq(subscriptions.userId, user.id)));
    await until(
      async () => (await me(ctx.app, user.accessToken)).json().tier,
      (tier) => tier === 'basic',
    );
  });
});

describe('secrets in logs', () => {
  let flow: TestContext;
  beforeAll(async () => {
    flow = await createTestContext();
  });
  afterAll(async () => flow?.close());

  it('captures no OTP, password, hash, refresh token or access token across the whole flow', async () => {
    const app = flow.app;
    const mobile = randomMobile();
    const passwords = ['flow-password-0', 'flow-password-1', 'flow-password-2', 'wrong-flow-pass'];
    const otps: string[] = [];
    const accessTokens: string[] = [];
    const refreshTokens: string[] = [];
    const hashes: string[] = [];
    const keep = (pair: { accessToken: string; refreshToken: string }) => {
      accessTokens.push(pair.accessToken);
      refreshTokens.push(pair.refreshToken);
      return pair;
    };
    const passwordHash = async () => {
      const [row] = await flow.container.database.db
        .select({ hash: users.passwordHash })
        .from(users)
        .where(eq(users.mobile, mobile));
      hashes.push(row!.hash!);
    };
    const otpHash = async (purpose: Purpose) => {
      hashes.push((await flow.container.redis.hget(otpKey(flow, purpose, mobile), 'h'))!);
    };
    const auth = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

    await signup(flow, { mobile, name: 'Flow', password: passwords[0] });
    await passwordHash();
    otps.push(await sendCode(flow, mobile));
    await otpHash('signin');
    expectError(await verify(flow, mobile, wrongCode(otps[0]!)), 400, 'OTP_INVALID');
    const first = await verify(flow, mobile, otps[0]!);
    expect(first.statusCode).toBe(200);
    keep(first.json());
    expect((await me(app, accessTokens[0]!)).statusCode).toBe(200);

    const rotated = keep(
      (await post(app, '/auth/refresh', { refreshToken: refreshTokens[0]! })).json(),
    );
    keep(await login(flow, mobile, passwords[0]!));
    expectError(
      await post(app, '/auth/login', { mobile, password: passwords[3] }),
      401,
      'INVALID_CREDENTIALS',
    );
    expectError(
      await post(
        app,
        '/auth/change-password',
        { currentPassword: passwords[3], newPassword: passwords[1] },
        auth(rotated.accessToken),
      ),
      403,
      'FORBIDDEN',
    );
    expect(
      (
        await post(
          app,
          '/auth/change-password',
          { currentPassword: passwords[0], newPassword: passwords[1] },
          auth(rotated.accessToken),
        )
      ).statusCode,
    ).toBe(204);
    await passwordHash();

    otps.push(await sendCode(flow, mobile, 'reset'));
    await otpHash('reset');
    expect(
      (
        await post(app, '/auth/reset-password', {
          mobile,
          otp: otps[1],
          newPassword: passwords[2],
        })
      ).statusCode,
    ).toBe(204);
    await passwordHash();
    const last = keep(await login(flow, mobile, passwords[2]!));
    // A reused (revoked) refresh token and a logout are logged as events, not with their values.
    expectError(
      await post(app, '/auth/refresh', { refreshToken: refreshTokens[0]! }),
      401,
      'UNAUTHENTICATED',
    );
    expect(
      (await post(app, '/auth/logout', { all: true }, auth(last.accessToken))).statusCode,
    ).toBe(204);

    const text = flow.logs.text;
    // The capture did see the flow.
    expect(text).toContain('/auth/verify-otp');
    expect(text).toContain('/auth/reset-password');
    expect(flow.logs.lines.length).toBeGreaterThan(20);

    const secrets: Array<[string, string]> = [
      ...otps.map((v) => ['otp', v] as [string, string]),
      ...passwords.map((v) => ['password', v] as [string, string]),
      ...hashes.map((v) => ['hash', v] as [string, string]),
      ...refreshTokens.map((v) => ['refresh token', v] as [string, string]),
      ...refreshTokens.map((v) => ['refresh token hash', sha256Hex(v)] as [string, string]),
      ...accessTokens.map((v) => ['access token', v] as [string, string]),
      ...accessTokens.map((v) => ['access token signature', v.split('.')[2]!] as [string, string]),
    ];
    expect(secrets.length).toBeGreaterThan(20);
    for (const [what, value] of secrets) {
      expect(value.length, what).toBeGreaterThanOrEqual(6);
      expect(withinWord(text, value), `${what} ${value} in logs`).toBe(false);
    }
    expect(text).not.toContain('$argon2');
    expect(text).not.toMatch(/eyJ[A-Za-z0-9_-]+\.eyJ/);
  });
});
