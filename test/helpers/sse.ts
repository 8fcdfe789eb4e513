import { createParser, type EventSourceMessage } from 'eventsource-parser';

export interface SseEvent {
  id: string | undefined;
  event: string;
  data: unknown;
}

export interface SseConnection {
  status: number;
  headers: Headers;
  /** Resolves with the events read until the stream ends, `stopAfter` events, or abort. */
  events: Promise<SseEvent[]>;
  abort(): void;
}

/** Opens an SSE response with fetch and parses it with a spec-compliant parser. */
export async function openSse(
  url: string,
  init: RequestInit & { stopAfter?: number; onEvent?: (event: SseEvent) => void } = {},
): Promise<SseConnection> {
  const controller = new AbortController();
  const res = await fetch(url, {
    ...init,
    headers: { accept: 'text/event-stream', ...(init.headers as Record<string, string>) },
    signal: controller.signal,
  });
  const collected: SseEvent[] = [];
  const events = (async () => {
    if (!res.body || !res.headers.get('content-type')?.includes('text/event-stream'))
      return collected;
    const decoder = new TextDecoder();
    let stop = false;
    const parser = createParser({
      onEvent: (message: EventSourceMessage) => {
        if (stop) return;
        const event = {
          id: message.id,
          event: message.event ?? 'message',
          data: message.data ? JSON.parse(message.data) : null,
        };
        collected.push(event);
        init.onEvent?.(event);
        if (init.stopAfter !== undefined && collected.length >= init.stopAfter) stop = true;
      },
    });
    try {
      const reader = res.body.getReader();
      while (!stop) {
        const { done, value } = await reader.read();
        if (done) break;
        parser.feed(decoder.decode(value, { stream: true }));
      }
      if (stop) controller.abort();
    } catch (error) {
      if ((error as Error).name !== 'AbortError') throw error;
    }
    return collected;
  })();
  return { status: res.status, headers: res.headers, events, abort: () => controller.abort() };
}
