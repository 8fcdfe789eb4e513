import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { Tier } from '../../billing/tier.js';
import type { Container } from '../../container.js';
import type { UserRow } from '../../db/schema/index.js';
import { AppError } from '../../lib/errors.js';
import { type Account, type Profile, profileOf } from '../../users/user-repository.js';
import { caller, type Protected } from '../plugins/auth.js';
import { bearer, errorResponses, sendJson, textInput, toIso, userSchema } from '../schemas.js';

export function toUserDto(user: UserRow | Profile, tier: Tier): z.infer<typeof userSchema> {
  const profile = 'passwordHash' in user ? profileOf(user) : user;
  return {
    id: profile.id,
    mobile: profile.mobile,
    name: profile.name,
    email: profile.email,
    tier,
    verified: profile.verified,
    hasPassword: profile.hasPassword,
    createdAt: toIso(profile.createdAt),
  };
}

/**
 * The profile as sent, per account and tier. Accounts come from a cache and are never modified
 * (a change replaces them), so an account's JSON is built once per tier it is shown with.
 */
const serialized = new WeakMap<Account, Partial<Record<Tier, string>>>();

function profileJson(account: Account, tier: Tier): string {
  let byTier = serialized.get(account);
  if (!byTier) {
    byTier = {};
    serialized.set(account, byTier);
  }
  // Built from typed fields only, so the schema check of the serializer adds nothing here (the
  // response tests check the body against the schema).
  byTier[tier] ??= JSON.stringify(toUserDto(account.profile, tier));
  return byTier[tier];
}

export const userRoutes =
  (container: Container, authenticated: Protected): FastifyPluginAsyncZod =>
  async (app) => {
    const tags = ['User'];
    const gone = () =>
      new AppError({ code: 'UNAUTHENTICATED', message: 'The account no longer exists' });

    app.get(
      '/user/me',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary:
            'The signed-in user, with their current tier (from the database, never the token)',
          response: { 200: userSchema, ...errorResponses('UNAUTHENTICATED') },
        },
      },
      async (request, reply) => {
        const { userId } = caller(request);
        // The profile and the subscriptions that decide the tier, in one read (see
        // findWithSubscriptions); the tier is worked out now, as it depends on the time.
        const found = await container.users.findWithSubscriptions(userId);
        if (!found) throw gone();
        return sendJson(reply, profileJson(found, container.tierFrom(found.subscriptions)));
      },
    );

    app.patch(
      '/user/me',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'Update name and email',
          body: z
            .object({
              name: textInput().trim().min(1).max(100).nullable().optional(),
              email: z.email().max(254).nullable().optional(),
            })
            .refine((b) => b.name !== undefined || b.email !== undefined, 'give name or email'),
          response: { 200: userSchema, ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED') },
        },
      },
      async (request) => {
        const { userId } = caller(request);
        const user = await container.users.update(userId, request.body);
        if (!user) throw gone();
        return toUserDto(user, await container.tierOf(userId));
      },
    );
  };
