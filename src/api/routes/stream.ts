import { once } from 'node:events';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import { type ReplyEventsDeps, type ReplySseEvent, replyEvents } from '../../chat/reply-events.js';
import type { Container } from '../../container.js';
import type { MessageRow } from '../../db/schema/index.js';
import { caller, type Protected } from '../plugins/auth.js';
import { bearer, errorResponses, messageParams } from '../schemas.js';

/** One event framed as @fastify/sse frames it: `id`, `event`, `data` lines and a blank line. */
function frame(event: ReplySseEvent): string {
  const id = event.id ? `id: ${event.id}\n` : '';
  // JSON.stringify escapes line breaks inside strings: the data is always one line.
  return `${id}event: ${event.event}\ndata: ${JSON.stringify(event.data) ?? 'null'}\n\n`;
}

/** Writes a reply's events to an SSE response until done, error or the client leaves. */
export async function streamReply(
  deps: ReplyEventsDeps,
  request: FastifyRequest,
  reply: FastifyReply,
  message: MessageRow,
  first?: ReplySseEvent,
): Promise<void> {
  const controller = new AbortController();
  let open = true;
  const closed = new Promise<void>((resolve) => {
    controller.signal.addEventListener(
      'abort',
      () => {
        open = false;
        resolve();
      },
      { once: true },
    );
  });
  reply.sse.onClose(() => controller.abort());
  request.raw.once('close', () => controller.abort());
  // Writes straight to the response (framed as @fastify/sse would): a batch of events is one
  // write. A full socket is waited for, but a slow client that leaves never drains it: without
  // the race with 'close', this loop (and its stream follower) would wait forever.
  const raw = reply.raw;
  const write = async (text: string) => {
    if (!raw.write(text)) await Promise.race([once(raw, 'drain').catch(() => {}), closed]);
  };
  const lastEventId = first ? null : reply.sse.lastEventId;
  reply.sse.sendHeaders();
  // `retry` tells EventSource how soon to reconnect after a dropped connection.
  await write(`event: ready\ndata: {}\nretry: 2000\n\n${first ? frame(first) : ''}`);
  for await (const events of replyEvents(deps, message, lastEventId, controller.signal)) {
    if (!open || !reply.sse.isConnected || raw.destroyed) break;
    // Everything the hub had ready for this client goes out in one write (one chunk), not one
    // write per event: with a thousand clients streaming, the writes are most of the work.
    let text = '';
    for (const event of events) text += frame(event);
    await write(text);
  }
}

export const streamRoutes =
  (container: Container, authenticated: Protected, deps: ReplyEventsDeps): FastifyPluginAsyncZod =>
  async (app) => {
    app.get(
      '/chatroom/:id/messages/:messageId/stream',
      {
        ...authenticated,
        sse: 'manual',
        schema: {
          tags: ['Chatroom'],
          security: bearer,
          summary: 'Stream a reply as Server-Sent Events',
          description: [
            'Replays what the reply has produced so far, then follows it live. Events:',
            '`ready` (connection open), `delta` `{ text }`, `reset` (discard the text received so far: a retry starts over), `done` (the final message, for completed, cancelled and blocked replies), `error` `{ code, message }` (a failed reply).',
            'Every event has an `id`; reconnect with `Last-Event-ID` to resume right after it. A keep-alive comment is sent every 15 s. The reply keeps generating when the client disconnects.',
          ].join('\n\n'),
          params: messageParams,
          headers: z.looseObject({ 'last-event-id': z.string().max(100).optional() }),
          response: {
            200: {
              description: 'The reply as Server-Sent Events',
              content: { 'text/event-stream': { schema: z.string() } },
            },
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request, reply) => {
        const message = await container.chat.message(
          caller(request).userId,
          request.params.id,
          request.params.messageId,
        );
        await streamReply(deps, request, reply, message);
      },
    );
  };
