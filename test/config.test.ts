import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';

const secret = 'a'.repeat(32);

describe('configuration', () => {
  it('applies the documented defaults', () => {
    const config = loadConfig({});
    expect(config.port).toBe(3000);
    expect(config.host).toBe('0.0.0.0');
    expect(config.databaseUrl).toBe('postgres://postgres@127.0.0.1:5432/gemini_chat');
    expect(config.redisUrl).toBe('redis://127.0.0.1:6379');
    expect(config.otpDelivery).toBe('response');
    expect(config.llm.provider).toBe('offline');
    expect(config.basicDailyLimit).toBe(5);
    expect(config.proDailyLimit).toBeNull();
    expect(config.role).toBe('all');
    expect(config.workerConcurrency).toBe(50);
    expect(config.redisPrefix).toBe('gc:');
    expect(config.defaultPhoneRegion).toBe('IN');
    expect(config.corsOrigins).toEqual([]);
    expect(config.stripe).toBeUndefined();
    expect(config.jwt.generated).toBe(true);
  });

  it('names the variable when a value is bad', () => {
    expect(() => loadConfig({ PORT: 'abc' })).toThrow(ConfigError);
    expect(() => loadConfig({ PORT: 'abc' })).toThrow(/PORT/);
    expect(() => loadConfig({ PORT: '70000' })).toThrow(/PORT/);
    expect(() => loadConfig({ ROLE: 'scheduler' })).toThrow(/ROLE/);
    expect(() => loadConfig({ DATABASE_URL: 'mysql://x' })).toThrow(/DATABASE_URL/);
    expect(() => loadConfig({ REDIS_URL: 'not a url' })).toThrow(/REDIS_URL/);
    expect(() => loadConfig({ WORKER_CONCURRENCY: '0' })).toThrow(/WORKER_CONCURRENCY/);
    expect(() => loadConfig({ DEFAULT_PHONE_REGION: 'india' })).toThrow(/DEFAULT_PHONE_REGION/);
  });

  it('requires JWT_SECRET outside development and accepts it when long enough', () => {
    expect(() => loadConfig({ APP_ENV: 'production' })).toThrow(/JWT_SECRET/);
    expect(() => loadConfig({ APP_ENV: 'production', JWT_SECRET: 'short' })).toThrow(/JWT_SECRET/);
    const config = loadConfig({ APP_ENV: 'production', JWT_SECRET: secret });
    expect(config.jwt.generated).toBe(false);
    expect(Buffer.from(config.jwt.secret).toString()).toBe(secret);
  });

  it('picks gemini when a key is given, and refuses gemini without a key', () => {
    expect(loadConfig({ GEMINI_API_KEY: 'k' }).llm.provider).toBe('gemini');
    expect(loadConfig({ GEMINI_API_KEY: 'k', LLM_PROVIDER: 'offline' }).llm.provider).toBe(
      'offline',
    );
    expect(() => loadConfig({ LLM_PROVIDER: 'gemini' })).toThrow(/GEMINI_API_KEY/);
  });

  it('turns billing on only when all three Stripe settings are present', () => {
    expect(
      loadConfig({ STRIPE_SECRET_KEY: 'sk', STRIPE_PRICE_ID: 'price' }).stripe,
    ).toBeUndefined();
    const config = loadConfig({
      STRIPE_SECRET_KEY: 'sk_test_x',
      STRIPE_WEBHOOK_SECRET: 'whsec_x',
      STRIPE_PRICE_ID: 'price_x',
      STRIPE_API_BASE: 'http://127.0.0.1:12111',
    });
    expect(config.stripe).toEqual({
      secretKey: 'sk_test_x',
      webhookSecret: 'whsec_x',
      priceId: 'price_x',
      apiBase: 'http://127.0.0.1:12111',
    });
  });

  it('parses limits, lists and empty values', () => {
    expect(loadConfig({ PRO_DAILY_LIMIT: 'unlimited' }).proDailyLimit).toBeNull();
    expect(loadConfig({ PRO_DAILY_LIMIT: '' }).proDailyLimit).toBeNull();
    expect(loadConfig({ PRO_DAILY_LIMIT: '100' }).proDailyLimit).toBe(100);
    expect(() => loadConfig({ PRO_DAILY_LIMIT: 'lots' })).toThrow(/PRO_DAILY_LIMIT/);
    expect(loadConfig({ BASIC_DAILY_LIMIT: '0' }).basicDailyLimit).toBe(0);
    expect(
      loadConfig({ CORS_ORIGINS: 'https://a.example, https://b.example,' }).corsOrigins,
    ).toEqual(['https://a.example', 'https://b.example']);
    expect(loadConfig({ GEMINI_API_KEY: '' }).llm.provider).toBe('offline');
    expect(loadConfig({ TRUST_PROXY: 'yes' }).trustProxy).toBe(true);
    expect(() => loadConfig({ TRUST_PROXY: 'maybe' })).toThrow(/TRUST_PROXY/);
  });
});
