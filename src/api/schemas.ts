import type { FastifyReply } from 'fastify';
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
/**
 * Text that is stored: PostgreSQL `text` cannot hold U+0000, so it is refused here (400) rather
 * than failing the insert (500).
 */
export const textInput = () =>
  // biome-ignore lint/suspicious/noControlCharactersInRegex: U+0000 is the character refused.
  z.string().regex(/^[^\u0000]*$/, 'must not contain NUL (U+0000) characters');

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

export const chatroomSchema = z
  .object({
    id: z.uuid(),
    name: z.string(),
    systemInstruction: z.string().nullable(),
    createdAt: isoDate,
    updatedAt: isoDate,
    lastActivityAt: isoDate,
  })
  .meta({ id: 'Chatroom' });

export const messageSchema = z
  .object({
    id: z.uuid(),
    chatroomId: z.uuid(),
    role: z.enum(['user', 'assistant']),
    content: z.string(),
    status: z
      .enum(['queued', 'streaming', 'completed', 'failed', 'cancelled', 'blocked'])
      .describe(
        'A user message is always completed; a reply moves queued → streaming → a final state',
      ),
    replyToId: z.uuid().nullable().describe('For a reply: the user message it answers'),
    model: z.string().nullable(),
    usage: z
      .object({
        promptTokens: z.number().int(),
        completionTokens: z.number().int(),
        totalTokens: z.number().int(),
      })
      .nullable(),
    finishReason: z.string().nullable(),
    error: z
      .object({ code: z.string(), message: z.string() })
      .nullable()
      .describe(
        'For failed or blocked replies: LLM_RATE_LIMITED, LLM_UNAVAILABLE, LLM_TIMEOUT, LLM_REJECTED, BLOCKED, INTERNAL',
      ),
    createdAt: isoDate,
    completedAt: isoDate.nullable(),
  })
  .meta({ id: 'Message' });

export const acceptedSchema = z
  .object({ userMessage: messageSchema, assistantMessage: messageSchema })
  .meta({ id: 'AcceptedPrompt' });

export const roomParams = z.object({ id: z.uuid() });
export const messageParams = z.object({ id: z.uuid(), messageId: z.uuid() });

/**
 * Sends a body that is already JSON (a cached one) as it is: with a JSON content type set and a
 * string payload, Fastify skips the response serializer.
 */
export function sendJson(reply: FastifyReply, json: string): FastifyReply {
  return reply.type('application/json; charset=utf-8').send(json);
}
