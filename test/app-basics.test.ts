import { Validator } from '@seriousme/openapi-schema-validator';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { BODY_LIMIT } from '../src/api/app.js';
import { createTestContext, type TestContext } from './helpers/context.js';

let ctx: TestContext;

beforeAll(async () => {
  ctx = await createTestContext({
    configure: (app) => {
      app.post(
        '/test/echo',
        {
          schema: {
            body: z.object({ name: z.string().min(1), count: z.number().int() }),
          },
        },
        async (request) => request.body,
      );
    },
  });
});

afterAll(async () => {
  await ctx?.close();
});

function expectErrorShape(body: unknown, code: string, requestId: string) {
  expect(body).toMatchObject({
    error: { code, message: expect.any(String), requestId, details: expect.any(Object) },
  });
}

describe('the app', () => {
  it('answers liveness and readiness', async () => {
    const live = await ctx.app.inject({ method: 'GET', url: '/healthz' });
    expect(live.statusCode).toBe(200);
    expect(live.json()).toEqual({ status: 'ok' });
    const ready = await ctx.app.inject({ method: 'GET', url: '/readyz' });
    expect(ready.statusCode).toBe(200);
    expect(ready.json()).toEqual({ status: 'ok', checks: { postgres: 'ok', redis: 'ok' } });
  });

  it('returns a generated X-Request-Id, or echoes a well-formed one', async () => {
    const generated = await ctx.app.inject({ method: 'GET', url: '/healthz' });
    expect(generated.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    const given = await ctx.app.inject({
      method: 'GET',
      url: '/healthz',
      headers: { 'x-request-id': 'abc-123' },
    });
    expect(given.headers['x-request-id']).toBe('abc-123');
    const hostile = await ctx.app.inject({
      method: 'GET',
      url: '/healthz',
      headers: { 'x-request-id': 'bad id\nwith newline' },
    });
    expect(hostile.headers['x-request-id']).not.toContain('bad id');
  });

  it('answers an unknown route with 404 in the error shape', async () => {
    const res = await ctx.app.inject({
      method: 'GET',
      url: '/no/such/route',
      headers: { 'x-request-id': 'req-404' },
    });
    expect(res.statusCode).toBe(404);
    expectErrorShape(res.json(), 'NOT_FOUND', 'req-404');
  });

  it('answers malformed JSON with 400 in the error shape', async () => {
    const res = await ctx.app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json', 'x-request-id': 'req-400' },
      payload: '{"name": "x", ',
    });
    expect(res.statusCode).toBe(400);
    expectErrorShape(res.json(), 'MALFORMED_REQUEST', 'req-400');
  });

  it('answers a schema violation with 400 naming the failing fields', async () => {
    const res = await ctx.app.inject({
      method: 'POST',
      url: '/test/echo',
      payload: { name: '', count: 'three' },
    });
    expect(res.statusCode).toBe(400);
    const body = res.json();
    expectErrorShape(body, 'VALIDATION_FAILED', res.headers['x-request-id'] as string);
    const fields = body.error.details.issues.map((i: { field: string }) => i.field);
    expect(fields).toEqual(expect.arrayContaining(['body.name', 'body.count']));
  });

  it('answers a body over the limit with 413 in the error shape', async () => {
    const res = await ctx.app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'application/json', 'x-request-id': 'req-413' },
      payload: JSON.stringify({ name: 'x'.repeat(BODY_LIMIT + 10), count: 1 }),
    });
    expect(res.statusCode).toBe(413);
    expectErrorShape(res.json(), 'PAYLOAD_TOO_LARGE', 'req-413');
  });

  it('answers a wrong content type with 415 in the error shape', async () => {
    const res = await ctx.app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { 'content-type': 'text/plain' },
      payload: 'name=x',
    });
    expect(res.statusCode).toBe(415);
    expectErrorShape(res.json(), 'UNSUPPORTED_MEDIA_TYPE', res.headers['x-request-id'] as string);
  });

  it('sends the API security headers on JSON answers, and no CORS grant without allowed origins', async () => {
    const res = await ctx.app.inject({
      method: 'GET',
      url: '/healthz',
      headers: { origin: 'https://evil.example' },
    });
    expect(res.headers).toMatchObject({
      'cache-control': 'no-store',
      'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
      'strict-transport-security': 'max-age=31536000; includeSubDomains',
      'x-content-type-options': 'nosniff',
      'x-frame-options': 'DENY',
    });
    // Helmet's document headers are for pages only.
    expect(res.headers['cross-origin-opener-policy']).toBeUndefined();
    expect(res.headers['access-control-allow-origin']).toBeUndefined();
    expect(res.headers.vary).toBeUndefined();
    const missing = await ctx.app.inject({ method: 'GET', url: '/no-such-route' });
    expect(missing.statusCode).toBe(404);
    expect(missing.headers['x-content-type-options']).toBe('nosniff');
    // Refused before routing (a malformed percent-encoding): the same headers.
    const unroutable = await ctx.app.inject({ method: 'GET', url: '/chatroom/%E0%A4%A' });
    expect(unroutable.statusCode).toBe(400);
    expect(unroutable.headers['x-content-type-options']).toBe('nosniff');
    expect(unroutable.headers['cache-control']).toBe('no-store');
  });

  it('sends helmet’s document headers and the pages’ own caching on the pages', async () => {
    const page = await ctx.app.inject({ method: 'GET', url: '/' });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-type']).toMatch(/^text\/html/);
    expect(page.headers['cache-control']).toBe('public, max-age=300');
    expect(page.headers['content-security-policy']).toContain("script-src 'self'");
    expect(page.headers['cross-origin-opener-policy']).toBe('same-origin');
    expect(page.headers['x-frame-options']).toBe('SAMEORIGIN');
    const docs = await ctx.app.inject({ method: 'GET', url: '/docs/' });
    expect(docs.statusCode).toBe(200);
    expect(docs.headers['cache-control']).not.toBe('no-store');
    expect(docs.headers['cross-origin-opener-policy']).toBe('same-origin');
    expect(docs.headers['content-security-policy']).toContain("script-src 'self'");
  });

  it('grants CORS to the allowed origins only, when CORS_ORIGINS names some', async () => {
    const cors = await createTestContext({ env: { CORS_ORIGINS: 'https://app.example' } });
    try {
      const allowed = await cors.app.inject({
        method: 'GET',
        url: '/healthz',
        headers: { origin: 'https://app.example' },
      });
      expect(allowed.headers['access-control-allow-origin']).toBe('https://app.example');
      expect(allowed.headers['access-control-expose-headers']).toContain('x-request-id');
      const other = await cors.app.inject({
        method: 'GET',
        url: '/healthz',
        headers: { origin: 'https://evil.example' },
      });
      expect(other.headers['access-control-allow-origin']).toBeUndefined();
    } finally {
      await cors.close();
    }
  });

  it('serves a valid OpenAPI 3.1 document and the reference page', async () => {
    const res = await ctx.app.inject({ method: 'GET', url: '/openapi.json' });
    expect(res.statusCode).toBe(200);
    const document = res.json();
    expect(document.openapi).toBe('3.1.0');
    expect(document.paths['/readyz']).toBeDefined();
    const validator = new Validator();
    const result = await validator.validate(document);
    expect(result.errors ?? []).toEqual([]);
    expect(result.valid).toBe(true);
    const docs = await ctx.app.inject({ method: 'GET', url: '/docs/' });
    expect(docs.statusCode).toBe(200);
    expect(docs.body).toContain('swagger');
  });

  it('exposes Prometheus metrics with the request duration histogram', async () => {
    await ctx.app.inject({ method: 'GET', url: '/healthz' });
    const res = await ctx.app.inject({ method: 'GET', url: '/metrics' });
    expect(res.statusCode).toBe(200);
    expect(res.body).toContain('process_cpu_user_seconds_total');
    expect(res.body).toMatch(
      /http_request_duration_seconds_count\{method="GET",route="\/healthz",status="200"\} [1-9]/,
    );
  });

  it('never logs a password or a bearer token', async () => {
    const token = 'eyJhbGciOiJIUzI1NiJ9.secret-bearer-token-value.sig';
    await ctx.app.inject({
      method: 'POST',
      url: '/test/echo',
      headers: { authorization: `Bearer ${token}`, cookie: 'sid=cookie-secret-value' },
      payload: { name: 'hunter2-password-value', count: 'bad' },
    });
    ctx.container.logger.info(
      {
        password: 'plain-password-value',
        nested: { refreshToken: 'refresh-secret-value', otp: '123456' },
      },
      'probe',
    );
    const text = ctx.logs.text;
    expect(text).toContain('probe');
    for (const secret of [
      'secret-bearer-token-value',
      'cookie-secret-value',
      'plain-password-value',
      'refresh-secret-value',
      '123456',
    ]) {
      expect(text).not.toContain(secret);
    }
    expect(ctx.logs.records().every((r) => typeof r.level === 'string')).toBe(true);
  });
});
