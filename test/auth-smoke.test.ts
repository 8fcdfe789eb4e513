import { afterAll, beforeAll, expect, it } from 'vitest';
import { createTestContext, type TestContext } from './helpers/context.js';
import { signIn } from './helpers/users.js';

let ctx: TestContext;
beforeAll(async () => {
  ctx = await createTestContext();
});
afterAll(async () => ctx?.close());

it('signs up, signs in with a code and reads the profile', async () => {
  const user = await signIn(ctx.app, { name: 'Asha' });
  const me = await ctx.app.inject({ method: 'GET', url: '/user/me', headers: user.headers });
  expect(me.statusCode).toBe(200);
  expect(me.json()).toMatchObject({
    id: user.id,
    mobile: user.mobile,
    name: 'Asha',
    tier: 'basic',
    verified: true,
  });
});
