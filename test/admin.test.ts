import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestContext, type TestContext } from './helpers/context.js';

const TOKEN = 'admin-token-0123456789abcdef';

describe('queue dashboard', () => {
  let off: TestContext;
  let on: TestContext;
  beforeAll(async () => {
    off = await createTestContext();
    on = await createTestContext({ env: { ADMIN_TOKEN: TOKEN } });
  });
  afterAll(async () => {
    await off?.close();
    await on?.close();
  });

  it('is not there without ADMIN_TOKEN', async () => {
    const res = await off.app.inject({
      method: 'GET',
      url: '/admin/queues',
      headers: { authorization: `Bearer ${TOKEN}` },
    });
    expect(res.statusCode).toBe(404);
    expect(res.json().error.code).toBe('NOT_FOUND');
  });

  it('asks for the token, and refuses a wrong one', async () => {
    const none = await on.app.inject({ method: 'GET', url: '/admin/queues' });
    expect(none.statusCode).toBe(401);
    expect(none.headers['www-authenticate']).toMatch(/^Basic/);
    expect(none.json().error.code).toBe('UNAUTHENTICATED');
    const wrong = await on.app.inject({
      method: 'GET',
      url: '/admin/queues',
      headers: { authorization: 'Bearer nope-nope-nope-nope' },
    });
    expect(wrong.statusCode).toBe(401);
    const api = await on.app.inject({ method: 'GET', url: '/admin/queues/api/queues' });
    expect(api.statusCode).toBe(401);
  });

  it('serves the dashboard and the queue list with the token (bearer or basic)', async () => {
    const page = await on.app.inject({
      method: 'GET',
      url: '/admin/queues',
      headers: { authorization: `Bearer ${TOKEN}` },
    });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-type']).toMatch(/text\/html/);
    const basic = Buffer.from(`ops:${TOKEN}`).toString('base64');
    const api = await on.app.inject({
      method: 'GET',
      url: '/admin/queues/api/queues',
      headers: { authorization: `Basic ${basic}` },
    });
    expect(api.statusCode).toBe(200);
    const names = api.json().queues.map((q: { name: string }) => q.name);
    expect(names).toEqual(expect.arrayContaining(['replies', 'maintenance']));
  });
});
