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
