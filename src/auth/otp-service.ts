import { randomInt, timingSafeEqual } from 'node:crypto';
import { AppError } from '../lib/errors.js';
import type { Redis, RedisKeys } from '../lib/redis.js';
import { deriveKey, hmacHex } from '../lib/secrets.js';

export type OtpPurpose = 'signin' | 'reset';

export interface OtpPolicy {
  /** Seconds a code stays valid. Default 300. */
  ttlSeconds: number;
  /** Wrong tries after which the code is dead. Default 5. */
  maxAttempts: number;
  /** Seconds between two codes for one number and purpose. Default 60. */
  cooldownSeconds: number;
  /** Codes per number per hour, all purposes together. Default 10. */
  hourlyLimit: number;
}

export const defaultOtpPolicy: OtpPolicy = {
  ttlSeconds: 300,
  maxAttempts: 5,
  cooldownSeconds: 60,
  hourlyLimit: 10,
};

// KEYS: cooldown, hourly counter, code. ARGV: cooldown s, hourly limit, code hash, ttl s, store?
// Returns {0} when issued, {1, ttl} in cooldown, {2, ttl} over the hourly limit.
const ISSUE_SCRIPT = `
local cooldown = redis.call('TTL', KEYS[1])
if cooldown > 0 then return {1, cooldown} end
local count = redis.call('INCR', KEYS[2])
if count == 1 then redis.call('EXPIRE', KEYS[2], 3600) end
if count > tonumber(ARGV[2]) then return {2, redis.call('TTL', KEYS[2])} end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'h', ARGV[3], 'tries', 0)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return {0}
`;

// Counts the try before the comparison, so concurrent guesses cannot exceed the limit.
const TRY_SCRIPT = `
local h = redis.call('HGET', KEYS[1], 'h')
if not h then return nil end
local tries = redis.call('HINCRBY', KEYS[1], 'tries', 1)
return {h, tries}
`;

// Consumes the code only if it is still the one we compared against: one winner among racers.
const CONSUME_SCRIPT = `
if redis.call('HGET', KEYS[1], 'h') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`;

export interface IssuedOtp {
  code: string;
  expiresIn: number;
}

export interface OtpServiceOptions {
  redis: Redis;
  keys: RedisKeys;
  secret: Uint8Array;
  policy?: Partial<OtpPolicy>;
}

export class OtpService {
  private readonly redis: Redis;
  private readonly keys: RedisKeys;
  private readonly hashKey: Buffer;
  readonly policy: OtpPolicy;

  constructor(options: OtpServiceOptions) {
    this.redis = options.redis;
    this.keys = options.keys;
    this.hashKey = deriveKey(options.secret, 'otp');
    this.policy = { ...defaultOtpPolicy, ...options.policy };
  }

  private codeKey(purpose: OtpPurpose, mobile: string) {
    return this.keys.key('otp', purpose, mobile);
  }

  private hash(purpose: OtpPurpose, mobile: string, code: string) {
    return hmacHex(this.hashKey, `${purpose}:${mobile}:${code}`);
  }

  /**
   * Issues a code, or, with `store: false` (an unknown number), applies the same limits and stores
   * nothing, so the answer does not reveal whether the number is registered.
   */
  async issue(mobile: string, purpose: OtpPurpose, store = true): Promise<IssuedOtp> {
    const code = randomInt(0, 1_000_000).toString().padStart(6, '0');
    const result = (await this.redis.eval(
      ISSUE_SCRIPT,
      3,
      this.keys.key('otp-cooldown', purpose, mobile),
      this.keys.key('otp-hourly', mobile),
      this.codeKey(purpose, mobile),
      this.policy.cooldownSeconds,
      this.policy.hourlyLimit,
      this.hash(purpose, mobile, code),
      this.policy.ttlSeconds,
      store ? '1' : '0',
    )) as [number, number?];
    const [status, ttl = 1] = result;
    if (status === 1) {
      throw new AppError({
        code: 'OTP_COOLDOWN',
        message: `A code was sent recently; ask again in ${ttl} seconds`,
        retryAfter: ttl,
      });
    }
    if (status === 2) {
      throw new AppError({
        code: 'RATE_LIMITED',
        message: 'Too many codes requested for this number; try again later',
        retryAfter: ttl,
      });
    }
    return { code, expiresIn: this.policy.ttlSeconds };
  }

  /** Voids any outstanding code for the number and purpose. */
  async discard(mobile: string, purpose: OtpPurpose): Promise<void> {
    await this.redis.del(this.codeKey(purpose, mobile));
  }

  /** Checks and consumes a code; throws OTP_INVALID or OTP_LOCKED. */
  async verify(mobile: string, purpose: OtpPurpose, code: string): Promise<void> {
    const key = this.codeKey(purpose, mobile);
    const found = (await this.redis.eval(TRY_SCRIPT, 1, key)) as [string, number] | null;
    if (!found) {
      throw new AppError({
        code: 'OTP_INVALID',
        message: 'The code is wrong, expired or already used',
      });
    }
    const [stored, tries] = found;
    if (tries > this.policy.maxAttempts) {
      const ttl = await this.redis.ttl(key);
      throw new AppError({
        code: 'OTP_LOCKED',
        message: 'Too many wrong codes; ask for a new code',
        retryAfter: ttl > 0 ? ttl : this.policy.ttlSeconds,
      });
    }
    const expected = Buffer.from(stored, 'hex');
    const given = Buffer.from(this.hash(purpose, mobile, code), 'hex');
    const matches = expected.length === given.length && timingSafeEqual(expected, given);
    if (!matches) {
      throw new AppError({
        code: 'OTP_INVALID',
        message: 'The code is wrong, expired or already used',
        details: { attemptsLeft: Math.max(0, this.policy.maxAttempts - tries) },
      });
    }
    const consumed = (await this.redis.eval(CONSUME_SCRIPT, 1, key, stored)) as number;
    if (consumed !== 1) {
      throw new AppError({
        code: 'OTP_INVALID',
        message: 'The code is wrong, expired or already used',
      });
    }
  }
}
