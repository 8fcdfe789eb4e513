import http from 'node:http';
import autocannon from 'autocannon';

export interface CannonSummary {
  /** 2xx answers per second over the run. */
  rps: number;
  requests: number;
  non2xx: number;
  errors: number;
  timeouts: number;
  statusCodes: Record<string, number>;
  latencyMs: { p50: number; p99: number; max: number };
  durationS: number;
}

export interface BenchRequest {
  method?: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

export interface CannonRun {
  url: string;
  connections: number;
  duration?: number;
  amount?: number;
  /** Each connection loops over these from the first (use `rotating` to spread them). */
  requests: Array<
    BenchRequest | { setupRequest: (request: Partial<BenchRequest>) => BenchRequest }
  >;
}

/**
 * One request template that takes the next of `list` from a counter shared by every
 * connection, so concurrent requests go to different users and rooms (autocannon starts every
 * connection at the first request of its list, which would send them all to the same room).
 */
export function rotating(list: BenchRequest[]): CannonRun['requests'] {
  let next = 0;
  return [
    {
      setupRequest: (request: Partial<BenchRequest>) => ({
        ...request,
        ...list[next++ % list.length]!,
      }),
    },
  ];
}

/** Runs autocannon in this process (the service under test runs in another). */
export async function cannon(run: CannonRun): Promise<CannonSummary> {
  const result = await autocannon({
    url: run.url,
    connections: run.connections,
    ...(run.amount !== undefined ? { amount: run.amount } : { duration: run.duration ?? 5 }),
    timeout: 30,
    requests: run.requests,
  });
  const statusCodes: Record<string, number> = {};
  for (const [code, { count }] of Object.entries(result.statusCodeStats)) statusCodes[code] = count;
  const ok = result['2xx'];
  return {
    rps: Math.round(ok / result.duration),
    requests: ok + result.non2xx,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    statusCodes,
    latencyMs: { p50: result.latency.p50, p99: result.latency.p99, max: result.latency.max },
    durationS: Math.round(result.duration * 100) / 100,
  };
}

export interface SseEvent {
  event: string;
  data: string;
  /** performance.now() when the chunk holding the event's end arrived. */
  at: number;
}

export interface SseResult {
  status: number;
  events: SseEvent[];
  /** performance.now() when the request was sent. */
  sentAt: number;
  error?: string;
}

/** An agent for many concurrent, long-lived requests (keep-alive, no socket cap). */
export function sseAgent() {
  return new http.Agent({ keepAlive: true, maxSockets: Number.POSITIVE_INFINITY });
}

interface LoadRequest {
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: string;
}

/** The options of one request over `agent` to `target`, with a JSON body when `init` has one. */
function requestOptions(
  agent: http.Agent,
  target: URL,
  init: LoadRequest,
  headers: Record<string, string> = {},
): http.RequestOptions {
  return {
    agent,
    host: target.hostname,
    port: target.port,
    path: target.pathname + target.search,
    method: init.method,
    headers: {
      ...headers,
      ...(init.body !== undefined
        ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(init.body) }
        : {}),
      ...init.headers,
    },
  };
}

/**
 * Sends one request with `Accept: text/event-stream` and collects its events (with arrival
 * times) until the server ends the response, a `done`/`error` event, or `timeoutMs`.
 */
export function sseRequest(
  agent: http.Agent,
  url: string,
  init: LoadRequest,
  timeoutMs: number,
): Promise<SseResult> {
  const target = new URL(init.path, url);
  const sentAt = performance.now();
  return new Promise((resolve) => {
    const events: SseEvent[] = [];
    let settled = false;
    const finish = (status: number, error?: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(error ? { status, events, sentAt, error } : { status, events, sentAt });
    };
    const request = http.request(
      requestOptions(agent, target, init, { accept: 'text/event-stream' }),
      (response) => {
        const status = response.statusCode ?? 0;
        let buffer = '';
        response.setEncoding('utf8');
        response.on('data', (chunk: string) => {
          const at = performance.now();
          buffer += chunk;
          for (;;) {
            const end = buffer.indexOf('\n\n');
            if (end < 0) break;
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let event = 'message';
            const data: string[] = [];
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) event = line.slice(6).trim();
              else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
            }
            if (data.length === 0 && event === 'message') continue;
            events.push({ event, data: data.join('\n'), at });
            if (event === 'done' || event === 'error') {
              // The reply is over; let the socket go back to the pool once the response ends.
              response.resume();
              finish(status);
            }
          }
        });
        response.on('end', () => finish(status));
        response.on('error', (error) => finish(status, error.message));
      },
    );
    const timer = setTimeout(() => {
      request.destroy();
      finish(0, 'timeout');
    }, timeoutMs);
    request.on('error', (error) => finish(0, error.message));
    if (init.body !== undefined) request.write(init.body);
    request.end();
  });
}

/** One JSON request over `agent` (keep-alive); the body parsed, with its arrival time. */
export function jsonRequest(
  agent: http.Agent,
  url: string,
  init: LoadRequest,
  timeoutMs: number,
): Promise<{ status: number; body: unknown; sentAt: number; at: number; error?: string }> {
  const target = new URL(init.path, url);
  const sentAt = performance.now();
  return new Promise((resolve) => {
    const request = http.request(
      { ...requestOptions(agent, target, init), timeout: timeoutMs },
      (response) => {
        let text = '';
        response.setEncoding('utf8');
        response.on('data', (chunk: string) => {
          text += chunk;
        });
        response.on('end', () => {
          let body: unknown = null;
          try {
            body = text ? JSON.parse(text) : null;
          } catch {
            body = text;
          }
          resolve({ status: response.statusCode ?? 0, body, sentAt, at: performance.now() });
        });
      },
    );
    request.on('timeout', () => request.destroy(new Error('timeout')));
    request.on('error', (error) =>
      resolve({ status: 0, body: null, sentAt, at: performance.now(), error: error.message }),
    );
    if (init.body !== undefined) request.write(init.body);
    request.end();
  });
}

/** JSON request for seeding (not measured). */
export async function json(
  url: string,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: unknown }> {
  const response = await fetch(new URL(path, url), {
    method,
    headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index]!;
}

export const round = (value: number, digits = 2) => {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
};
