import { createParser, type EventSourceMessage } from 'eventsource-parser';

/** Statuses the API documents for the routes the suite drives (503 during outages). */
export const DOCUMENTED_STATUSES = new Set([200, 201, 202, 204, 401, 404, 429, 503]);

export interface Sample {
  label: string;
  api: number;
  sentAt: number;
  doneAt: number;
  /** HTTP status, or 0 for a connection error (no HTTP answer). */
  status: number;
  code?: string;
}

export interface Undocumented {
  at: string;
  label: string;
  api: number;
  status: number;
  body: string;
  requestId?: string;
}

/** Every answer the clients got, by route and status, for the report and the recovery times. */
export class Traffic {
  readonly samples: Sample[] = [];
  readonly undocumented: Undocumented[] = [];
  readonly connectionErrors = new Map<string, number>();
  /** Error codes of the 4xx/5xx answers, e.g. `POST /message 429 QUOTA_EXCEEDED`. */
  readonly errorCodes = new Map<string, number>();

  record(sample: Sample, body?: unknown, rawBody?: string) {
    this.samples.push(sample);
    if (sample.status === 0) {
      this.connectionErrors.set(sample.label, (this.connectionErrors.get(sample.label) ?? 0) + 1);
      return;
    }
    if (sample.status >= 400) {
      const key = `${sample.label} ${sample.status} ${sample.code ?? '-'}`;
      this.errorCodes.set(key, (this.errorCodes.get(key) ?? 0) + 1);
    }
    if (!DOCUMENTED_STATUSES.has(sample.status)) {
      const error = (body as { error?: { requestId?: string } } | undefined)?.error;
      this.undocumented.push({
        at: new Date(sample.doneAt).toISOString(),
        label: sample.label,
        api: sample.api,
        status: sample.status,
        body: (rawBody ?? '').slice(0, 500),
        ...(error?.requestId ? { requestId: error.requestId } : {}),
      });
    }
  }

  byStatus(): Record<string, Record<string, number>> {
    const out: Record<string, Record<string, number>> = {};
    for (const s of this.samples) {
      const route = out[s.label] ?? {};
      out[s.label] = route;
      const key = s.status === 0 ? 'connection error' : String(s.status);
      route[key] = (route[key] ?? 0) + 1;
    }
    return out;
  }
}

export type HttpResult =
  | {
      ok: true;
      api: number;
      status: number;
      body: unknown;
      headers: Headers;
    }
  | { ok: false; api: number; error: string };

export interface CallOptions {
  token?: string;
  body?: unknown;
  headers?: Record<string, string>;
  /** Which API instance; random when absent. */
  api?: number;
  timeoutMs?: number;
}

export interface SseHandlers {
  onEvent(event: { id: string | undefined; event: string; data: unknown }): void;
  /** Called for every chunk of bytes (keep-alives included). */
  onActivity?(): void;
}

export type SseOutcome =
  /** The server ended the response. */
  | { kind: 'ended'; status: number; api: number }
  /** Not an event stream: an error answer (or a JSON one). */
  | { kind: 'http'; status: number; api: number; body: unknown }
  | { kind: 'connection'; api: number; error: string }
  | { kind: 'aborted'; api: number };

/** Talks to the API instances the way a client behind a load balancer would. */
export class ApiClient {
  /** SSE responses being read, per API instance. */
  readonly openStreams: number[];

  constructor(
    private readonly urls: string[],
    private readonly traffic: Traffic,
  ) {
    this.openStreams = urls.map(() => 0);
  }

  pick(exclude?: number): number {
    if (this.urls.length === 1) return 0;
    for (;;) {
      const i = Math.floor(Math.random() * this.urls.length);
      if (i !== exclude) return i;
    }
  }

  async call(label: string, method: string, path: string, options: CallOptions = {}) {
    const api = options.api ?? this.pick();
    const sentAt = Date.now();
    const headers: Record<string, string> = { ...options.headers };
    if (options.token) headers.authorization = `Bearer ${options.token}`;
    if (options.body !== undefined) headers['content-type'] = 'application/json';
    let res: Response;
    let raw: string;
    const controller = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    // The timer settles the race even if an aborted fetch leaves its body read pending.
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        controller.abort();
        reject(new Error(`no answer within ${options.timeoutMs ?? 20_000} ms`));
      }, options.timeoutMs ?? 20_000);
    });
    try {
      [res, raw] = await Promise.race([
        (async () => {
          const r = await fetch(`${this.urls[api]}${path}`, {
            method,
            headers,
            ...(options.body !== undefined ? { body: JSON.stringify(options.body) } : {}),
            signal: controller.signal,
          });
          return [r, await r.text()] as const;
        })(),
        timeout,
      ]);
    } catch (error) {
      this.traffic.record({ label, api, sentAt, doneAt: Date.now(), status: 0 });
      return { ok: false, api, error: describe(error) } satisfies HttpResult;
    } finally {
      clearTimeout(timer);
    }
    const body = this.recordAnswer({ label, api, sentAt }, res.status, raw);
    return { ok: true, api, status: res.status, body, headers: res.headers } satisfies HttpResult;
  }

  /**
   * Opens an SSE response (a GET of `/stream`, or a POST with `Accept: text/event-stream`) and
   * feeds its events to `handlers` until the server ends it, the connection drops or `signal`
   * aborts.
   */
  async sse(
    label: string,
    method: string,
    path: string,
    handlers: SseHandlers,
    options: CallOptions & { signal: AbortSignal },
  ): Promise<SseOutcome> {
    const api = options.api ?? this.pick();
    const headers: Record<string, string> = { accept: 'text/event-stream', ...options.headers };
    if (options.token) headers.authorization = `Bearer ${options.token}`;
    if (options.body !== undefined) headers['content-type'] = 'application/json';
    // One controller of our own (AbortSignal.any is avoided: on Node 20 a composite signal can
    // be garbage-collected while fetch still reads, and its abort is then lost).
    const controller = new AbortController();
    const abort = () => controller.abort();
    if (options.signal.aborted) abort();
    options.signal.addEventListener('abort', abort, { once: true });
    const timer = setTimeout(abort, 120_000);
    try {
      return await this.readSse(label, method, path, handlers, options, api, controller, headers);
    } finally {
      clearTimeout(timer);
      options.signal.removeEventListener('abort', abort);
    }
  }

  /** Records an answer that came back (its error code, if any) and returns its parsed body. */
  private recordAnswer(
    request: { label: string; api: number; sentAt: number },
    status: number,
    raw: string,
  ): unknown {
    let body: unknown;
    try {
      body = raw ? JSON.parse(raw) : undefined;
    } catch {
      body = undefined;
    }
    const code = (body as { error?: { code?: string } } | undefined)?.error?.code;
    this.traffic.record(
      { ...request, doneAt: Date.now(), status, ...(code ? { code } : {}) },
      body,
      raw,
    );
    return body;
  }

  private async readSse(
    label: string,
    method: string,
    path: string,
    handlers: SseHandlers,
    options: CallOptions & { signal: AbortSignal },
    api: number,
    controller: AbortController,
    headers: Record<string, string>,
  ): Promise<SseOutcome> {
    const sentAt = Date.now();
    let res: Response;
    try {
      res = await fetch(`${this.urls[api]}${path}`, {
        method,
        headers,
        ...(options.body !== undefined ? { body: JSON.stringify(options.body) } : {}),
        signal: controller.signal,
      });
    } catch (error) {
      if (options.signal.aborted) return { kind: 'aborted', api };
      this.traffic.record({ label, api, sentAt, doneAt: Date.now(), status: 0 });
      return { kind: 'connection', api, error: describe(error) };
    }
    const isStream = res.headers.get('content-type')?.includes('text/event-stream');
    if (!isStream || !res.body) {
      let raw = '';
      try {
        raw = await res.text();
      } catch {
        // body cut off
      }
      const body = this.recordAnswer({ label, api, sentAt }, res.status, raw);
      return { kind: 'http', status: res.status, api, body };
    }
    this.traffic.record({ label, api, sentAt, doneAt: Date.now(), status: res.status });
    const parser = createParser({
      onEvent: (message: EventSourceMessage) => {
        let data: unknown = null;
        try {
          data = message.data ? JSON.parse(message.data) : null;
        } catch {
          data = message.data;
        }
        handlers.onEvent({ id: message.id, event: message.event ?? 'message', data });
      },
    });
    const decoder = new TextDecoder();
    this.openStreams[api] = (this.openStreams[api] ?? 0) + 1;
    const reader = res.body.getReader();
    // Aborting fetch does not always settle a pending read() of the body (Node 20's undici), so
    // an abort also settles the race below and cancels the reader.
    const aborted = new Promise<'aborted'>((resolve) => {
      if (controller.signal.aborted) resolve('aborted');
      controller.signal.addEventListener('abort', () => resolve('aborted'), { once: true });
    });
    try {
      for (;;) {
        const next = await Promise.race([reader.read(), aborted]);
        if (next === 'aborted' || controller.signal.aborted) return { kind: 'aborted', api };
        if (next.done) return { kind: 'ended', status: res.status, api };
        handlers.onActivity?.();
        parser.feed(decoder.decode(next.value, { stream: true }));
      }
    } catch (error) {
      if (controller.signal.aborted) return { kind: 'aborted', api };
      return { kind: 'connection', api, error: describe(error) };
    } finally {
      this.openStreams[api] = (this.openStreams[api] ?? 1) - 1;
      reader.cancel().catch(() => {});
    }
  }
}

export function describe(error: unknown): string {
  const e = error as Error & { cause?: { code?: string; message?: string } };
  const cause = e.cause ? ` (${e.cause.code ?? e.cause.message})` : '';
  return `${e.name}: ${e.message}${cause}`;
}
