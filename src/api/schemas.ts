import { z } from 'zod';
import { type ErrorCode, errorCatalogue, errorCodes } from '../lib/errors.js';

export const errorBody = z
  .object({
    error: z.object({
      code: z.enum(errorCodes),
      message: z.string(),
      requestId: z.string(),
      details: z.record(z.string(), z.unknown()),
    }),
  })
  .meta({ id: 'Error' });

/** Response schemas for the error statuses a route can answer with. */
export function errorResponses(...codes: ErrorCode[]): Record<number, typeof errorBody> {
  const out: Record<number, typeof errorBody> = {};
  for (const code of codes) out[errorCatalogue[code].status] = errorBody;
  return out;
}

export const isoDate = z.iso.datetime({ offset: true });

export const toIso = (date: Date) => date.toISOString();
export const toIsoOrNull = (date: Date | null | undefined) => (date ? date.toISOString() : null);

export const mobileInput = z
  .string()
  .min(3)
  .max(32)
  .describe('E.164 (+919876543210) or a national number in DEFAULT_PHONE_REGION');
export const passwordInput = z.string().min(8).max(128);
export const otpInput = z.string().regex(/^\d{6}$/, 'must be 6 digits');

export const userSchema = z
  .object({
    id: z.uuid(),
    mobile: z.string().describe('E.164'),
    name: z.string().nullable(),
    email: z.string().nullable(),
    tier: z.enum(['basic', 'pro']),
    verified: z.boolean(),
    hasPassword: z.boolean(),
    createdAt: isoDate,
  })
  .meta({ id: 'User' });

export const tokenPairSchema = z.object({
  accessToken: z.string(),
  refreshToken: z.string(),
  tokenType: z.literal('Bearer'),
  expiresIn: z.number().int().describe('Seconds until the access token expires'),
});

export const bearer = [{ bearerAuth: [] }];
