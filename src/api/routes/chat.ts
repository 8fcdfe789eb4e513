import type { FastifyReply } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { rateLimitHeaders } from '../../billing/quota-service.js';
import type { Accepted } from '../../chat/chat-service.js';
import { toChatroomDto, toMessageDto } from '../../chat/message-dto.js';
import { type ReplyEventsDeps, waitForFinal } from '../../chat/reply-events.js';
import type { Container } from '../../container.js';
import { caller, type Protected } from '../plugins/auth.js';
import {
  acceptedSchema,
  bearer,
  chatroomSchema,
  errorResponses,
  messageParams,
  messageSchema,
  roomParams,
  sendJson,
  textInput,
} from '../schemas.js';
import { streamReply } from './stream.js';

const roomName = textInput().trim().min(1).max(100);
const systemInstruction = textInput()
  .trim()
  .max(4000)
  .nullable()
  .describe('Optional instruction sent to the model with every prompt of this room');
const pageLimit = z.coerce.number().int().min(1).max(100).default(50);

export const messageContent = textInput()
  .max(32_000)
  .refine((value) => value.trim().length > 0, 'must not be blank')
  .describe('1 to 32,000 characters');

export const chatRoutes =
  (
    container: Container,
    authenticated: Protected,
    replies: ReplyEventsDeps,
  ): FastifyPluginAsyncZod =>
  async (app) => {
    const { chat } = container;
    const tags = ['Chatroom'];
    const common = { ...authenticated };

    /** 202 with Location and the quota headers, the answer to an accepted prompt. */
    const accepted = (reply: FastifyReply, roomId: string, result: Accepted) => {
      if (result.usage) reply.headers(rateLimitHeaders(result.usage));
      reply.header('location', `/chatroom/${roomId}/messages/${result.assistantMessage.id}`);
      if (result.replayed) reply.header('idempotent-replayed', 'true');
      reply.code(202);
      return {
        userMessage: toMessageDto(result.userMessage),
        assistantMessage: toMessageDto(result.assistantMessage),
      };
    };

    app.post(
      '/chatroom',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'Create a chatroom',
          body: z.object({ name: roomName, systemInstruction: systemInstruction.optional() }),
          response: {
            201: chatroomSchema,
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED'),
          },
        },
      },
      async (request, reply) => {
        const room = await chat.createRoom(
          caller(request).userId,
          request.body.name,
          request.body.systemInstruction,
        );
        reply.code(201).header('location', `/chatroom/${room.id}`);
        return room;
      },
    );

    app.get(
      '/chatroom',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'The caller’s chatrooms, most recently active first',
          description:
            'Cached per user, in the API process (at most `LOCAL_CACHE_SECONDS`) and in Redis (5 minutes), and invalidated on every change; `X-Cache` says HIT or MISS. At most 500 rooms.',
          response: {
            200: z.object({ chatrooms: z.array(chatroomSchema) }),
            ...errorResponses('UNAUTHENTICATED'),
          },
        },
      },
      async (request, reply) => {
        const result = await chat.listRooms(caller(request).userId);
        reply.header('x-cache', result.hit ? 'HIT' : 'MISS');
        // The list is cached as the JSON it is sent as; the response tests check it against
        // the schema above.
        return sendJson(reply, `{"chatrooms":${result.json}}`);
      },
    );

    app.get(
      '/chatroom/:id',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'A chatroom with its newest page of messages (newest first)',
          params: roomParams,
          querystring: z.object({ limit: pageLimit }),
          response: {
            200: z.object({
              chatroom: chatroomSchema,
              messages: z.array(messageSchema),
              nextCursor: z
                .string()
                .nullable()
                .describe('Pass as `before` to /messages for older ones'),
            }),
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request) => {
        const { userId } = caller(request);
        const room = await chat.room(userId, request.params.id);
        const page = await chat.messages(userId, room.id, request.query.limit);
        return { chatroom: toChatroomDto(room), ...page };
      },
    );

    app.patch(
      '/chatroom/:id',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'Rename a chatroom or change its system instruction',
          params: roomParams,
          body: z
            .object({ name: roomName.optional(), systemInstruction: systemInstruction.optional() })
            .refine(
              (b) => b.name !== undefined || b.systemInstruction !== undefined,
              'give name or systemInstruction',
            ),
          response: {
            200: chatroomSchema,
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request) => chat.updateRoom(caller(request).userId, request.params.id, request.body),
    );

    app.delete(
      '/chatroom/:id',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'Delete a chatroom and its messages (stops replies in flight)',
          params: roomParams,
          response: {
            204: z.null().describe('Deleted'),
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request, reply) => {
        await chat.deleteRoom(caller(request).userId, request.params.id);
        return reply.code(204).send(null);
      },
    );

    app.get(
      '/chatroom/:id/messages',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'Messages of a chatroom, newest first, with cursor pagination',
          params: roomParams,
          querystring: z.object({
            before: z.string().max(200).optional().describe('`nextCursor` of the previous page'),
            limit: pageLimit,
          }),
          response: {
            200: z.object({ messages: z.array(messageSchema), nextCursor: z.string().nullable() }),
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request) =>
        chat.messages(
          caller(request).userId,
          request.params.id,
          request.query.limit,
          request.query.before,
        ),
    );

    app.get(
      '/chatroom/:id/messages/:messageId',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'One message (poll a reply until its status is final)',
          params: messageParams,
          response: {
            200: messageSchema,
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request) =>
        toMessageDto(
          await chat.message(caller(request).userId, request.params.id, request.params.messageId),
        ),
    );

    app.post(
      '/chatroom/:id/message',
      {
        ...common,
        sse: 'dual',
        schema: {
          tags,
          security: bearer,
          summary: 'Send a prompt; the reply is generated asynchronously',
          description: [
            'Stores the prompt and a queued reply, counts one prompt of the daily quota (`X-RateLimit-*` headers) and queues the reply. Three ways to get the reply:',
            '- default: 202 with both messages and `Location` of the reply; poll it or stream it (`/stream`);',
            '- `?wait=N` (seconds, at most 60): 200 with the finished reply if it finishes in time, else the same 202;',
            '- `Accept: text/event-stream`: the reply streamed on this response (an `accepted` event with both messages, then the events of `/stream`).',
            '`Idempotency-Key` makes a retried request return the first result (header `Idempotent-Replayed: true`) without counting a prompt; the same key with a different request is 409.',
          ].join('\n\n'),
          params: roomParams,
          querystring: z.object({
            wait: z.coerce
              .number()
              .int()
              .min(0)
              .max(60)
              .optional()
              .describe('Seconds to wait for the reply'),
          }),
          headers: z.looseObject({
            'idempotency-key': z
              .string()
              .regex(/^[\x20-\x7e]{1,255}$/, 'must be 1 to 255 printable ASCII characters')
              .optional(),
          }),
          body: z.object({ content: messageContent }),
          response: {
            200: {
              description:
                'The reply finished within `wait` (JSON), or the reply streamed (`Accept: text/event-stream`)',
              content: {
                'application/json': { schema: acceptedSchema },
                'text/event-stream': { schema: z.string() },
              },
            },
            202: acceptedSchema,
            ...errorResponses(
              'VALIDATION_FAILED',
              'UNAUTHENTICATED',
              'NOT_FOUND',
              'CONFLICT',
              'QUOTA_EXCEEDED',
              'RATE_LIMITED',
              'UNAVAILABLE',
            ),
          },
        },
      },
      async (request, reply) => {
        const result = await chat.send(
          caller(request).userId,
          request.params.id,
          request.body.content,
          request.headers['idempotency-key'],
        );
        const body = accepted(reply, request.params.id, result);
        if (reply.sse) {
          reply.code(200);
          await streamReply(replies, request, reply, result.assistantMessage, {
            event: 'accepted',
            data: body,
          });
          return;
        }
        const wait = request.query.wait ?? 0;
        if (wait > 0) {
          const finished = await waitForFinal(replies, result.assistantMessage.id, wait * 1000);
          if (finished && !['queued', 'streaming'].includes(finished.status)) {
            reply.code(200);
            return { userMessage: body.userMessage, assistantMessage: toMessageDto(finished) };
          }
        }
        return body;
      },
    );

    app.post(
      '/chatroom/:id/messages/:messageId/cancel',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'Stop a reply; the text generated so far is kept',
          description:
            'Answers the reply as it is now: `cancelled` when it was still queued, or `streaming` for a moment while its worker stops (within a second).',
          params: messageParams,
          response: {
            200: messageSchema,
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND', 'CONFLICT'),
          },
        },
      },
      async (request) =>
        toMessageDto(
          await chat.cancel(caller(request).userId, request.params.id, request.params.messageId),
        ),
    );

    app.post(
      '/chatroom/:id/messages/:messageId/regenerate',
      {
        ...common,
        schema: {
          tags,
          security: bearer,
          summary: 'A new reply to the same prompt (counts as a prompt)',
          description: 'Give the prompt or any of its replies; earlier replies stay as they were.',
          params: messageParams,
          response: {
            202: acceptedSchema,
            ...errorResponses(
              'VALIDATION_FAILED',
              'UNAUTHENTICATED',
              'NOT_FOUND',
              'QUOTA_EXCEEDED',
            ),
          },
        },
      },
      async (request, reply) => {
        const result = await chat.regenerate(
          caller(request).userId,
          request.params.id,
          request.params.messageId,
        );
        return accepted(reply, request.params.id, result);
      },
    );
  };
