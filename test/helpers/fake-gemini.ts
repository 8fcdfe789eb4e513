import { randomBytes } from 'node:crypto';
import {
  createServer,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface UsageMetadata {
  promptTokenCount: number;
  candidatesTokenCount: number;
  totalTokenCount: number;
}

interface BehaviourBase {
  /** Wait this long before sending anything (status line included). */
  delayMs?: number;
}

export interface TextBehaviour extends BehaviourBase {
  kind: 'text';
  text: string;
  /** Number of SSE chunks, or the exact pieces (their concatenation replaces `text`). Default 3. */
  chunks?: number | string[];
  chunkDelayMs?: number;
  finishReason?: string;
  usage?: UsageMetadata;
  modelVersion?: string;
}

export interface RateLimitBehaviour extends BehaviourBase {
  kind: 'rateLimit';
  retryAfterSeconds: number;
}

export interface ServerErrorBehaviour extends BehaviourBase {
  kind: 'serverError';
  status?: number;
}

export interface ClientErrorBehaviour extends BehaviourBase {
  kind: 'clientError';
  status: number;
  message?: string;
}

export interface PromptBlockedBehaviour extends BehaviourBase {
  kind: 'promptBlocked';
  reason?: string;
}

export interface ResponseBlockedBehaviour extends BehaviourBase {
  kind: 'responseBlocked';
  reason?: string;
  partialText?: string;
  chunkDelayMs?: number;
}

export interface DropMidStreamBehaviour extends BehaviourBase {
  kind: 'dropMidStream';
  text: string;
  afterChunks: number;
  chunkDelayMs?: number;
}

export interface HangBehaviour extends BehaviourBase {
  kind: 'hang';
}

export type Behaviour =
  | TextBehaviour
  | RateLimitBehaviour
  | ServerErrorBehaviour
  | ClientErrorBehaviour
  | PromptBlockedBehaviour
  | ResponseBlockedBehaviour
  | DropMidStreamBehaviour
  | HangBehaviour;

export interface GeminiPart {
  text?: string;
  [key: string]: unknown;
}

export interface GeminiContent {
  role?: string;
  parts?: GeminiPart[];
}

/** The JSON the SDK posts (Gemini API field names, camelCase). */
export interface GeminiRequestBody {
  contents?: GeminiContent[];
  systemInstruction?: GeminiContent;
  generationConfig?: Record<string, unknown>;
  safetySettings?: Record<string, unknown>[];
  tools?: unknown[];
  [key: string]: unknown;
}

export interface RecordedRequest {
  method: string;
  /** Path without the query string, e.g. `/v1beta/models/gemini-2.5-flash:generateContent`. */
  path: string;
  /** Path with the query string, e.g. `...:streamGenerateContent?alt=sse`. */
  url: string;
  apiVersion: string;
  /** Model id without the `models/` prefix; '' when the path names none. */
  model: string;
  /** `generateContent`, `streamGenerateContent`, `countTokens`, or '' for unknown paths. */
  action: string;
  stream: boolean;
  headers: IncomingHttpHeaders;
  /** Parsed JSON body; undefined when empty or not a JSON object (see rawBody). */
  body: GeminiRequestBody | undefined;
  rawBody: string;
  /** The behaviour that answered, undefined for requests not served from the script. */
  behaviour?: Behaviour;
  receivedAt: number;
  /** When the response was fully sent (or the fake itself dropped the connection). */
  finishedAt?: number;
  /** When the client closed the connection before the response was complete. */
  closedAt?: number;
  aborted: boolean;
}

export interface FakeGeminiOptions {
  /** When set, requests whose `x-goog-api-key` differs get Google's API_KEY_INVALID error. */
  apiKey?: string;
}

export interface FakeGemini {
  url: string;
  port: number;
  requests: RecordedRequest[];
  enqueue(...behaviours: Behaviour[]): void;
  setDefault(behaviour: Behaviour): void;
  /** Behaviours still queued. */
  pending(): number;
  /** Resolves once `predicate(requests)` holds; rejects after `timeoutMs` (default 5000). */
  waitFor(predicate: (requests: RecordedRequest[]) => boolean, timeoutMs?: number): Promise<void>;
  /** Clears recorded requests and the queue; the default behaviour is kept. */
  reset(): void;
  close(): Promise<void>;
}

const DEFAULT_BEHAVIOUR: Behaviour = { kind: 'text', text: 'Hello from fake Gemini' };

const STATUS_NAMES: Record<number, string> = {
  400: 'INVALID_ARGUMENT',
  401: 'UNAUTHENTICATED',
  403: 'PERMISSION_DENIED',
  404: 'NOT_FOUND',
  409: 'ABORTED',
  429: 'RESOURCE_EXHAUSTED',
  499: 'CANCELLED',
  500: 'INTERNAL',
  501: 'NOT_IMPLEMENTED',
  503: 'UNAVAILABLE',
  504: 'DEADLINE_EXCEEDED',
};

const SAFETY_CATEGORIES = [
  'HARM_CATEGORY_SEXUALLY_EXPLICIT',
  'HARM_CATEGORY_HATE_SPEECH',
  'HARM_CATEGORY_HARASSMENT',
  'HARM_CATEGORY_DANGEROUS_CONTENT',
];

const PATH_RE =
  /^\/(v1beta|v1|v1alpha)\/(?:models|tunedModels)\/([^/:]+):(generateContent|streamGenerateContent|countTokens)$/;

export function googleError(
  code: number,
  message: string,
  details?: unknown[],
): { error: Record<string, unknown> } {
  const error: Record<string, unknown> = {
    code,
    message,
    status: STATUS_NAMES[code] ?? (code >= 500 ? 'INTERNAL' : 'FAILED_PRECONDITION'),
  };
  if (details) error.details = details;
  return { error };
}

function rateLimitBody(model: string, retryAfterSeconds: number) {
  return googleError(
    429,
    'You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.',
    [
      {
        '@type': 'type.googleapis.com/google.rpc.QuotaFailure',
        violations: [
          {
            quotaMetric: 'generativelanguage.googleapis.com/generate_content_free_tier_requests',
            quotaId: 'GenerateRequestsPerMinutePerProjectPerModel-FreeTier',
            quotaDimensions: { location: 'global', model },
            quotaValue: '10',
          },
        ],
      },
      {
        '@type': 'type.googleapis.com/google.rpc.Help',
        links: [
          {
            description: 'Learn more about Gemini API quotas',
            url: 'https://ai.google.dev/gemini-api/docs/rate-limits',
          },
        ],
      },
      {
        '@type': 'type.googleapis.com/google.rpc.RetryInfo',
        retryDelay: `${retryAfterSeconds}s`,
      },
    ],
  );
}

function serverErrorBody(status: number) {
  if (status === 503) {
    return googleError(503, 'The model is overloaded. Please try again later.');
  }
  if (status === 504) {
    return googleError(504, 'The request timed out. Please try again.');
  }
  return googleError(
    status,
    'An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting',
  );
}

function estimateTokens(text: string): number {
  return text.length === 0 ? 0 : Math.max(1, Math.ceil(text.length / 4));
}

function promptText(body: GeminiRequestBody): string {
  const texts: string[] = [];
  const collect = (content: GeminiContent | undefined) => {
    for (const part of content?.parts ?? []) {
      if (typeof part?.text === 'string') texts.push(part.text);
    }
  };
  if (Array.isArray(body?.contents)) body.contents.forEach(collect);
  collect(body?.systemInstruction);
  return texts.join('\n');
}

function splitText(text: string, chunks: number | string[] | undefined): string[] {
  if (Array.isArray(chunks)) return chunks.length > 0 ? chunks : [''];
  const codePoints = Array.from(text);
  const count = Math.max(1, Math.min(chunks ?? 3, codePoints.length || 1));
  const size = Math.ceil(codePoints.length / count);
  const pieces: string[] = [];
  for (let i = 0; i < count; i++) {
    pieces.push(codePoints.slice(i * size, (i + 1) * size).join(''));
  }
  return pieces.filter((piece, i) => piece.length > 0 || i === 0);
}

function safetyRatings(blockedCategory?: string) {
  return SAFETY_CATEGORIES.map((category) =>
    category === blockedCategory
      ? { category, probability: 'HIGH', blocked: true }
      : { category, probability: 'NEGLIGIBLE' },
  );
}

function responseId(): string {
  return randomBytes(12).toString('base64url');
}

export async function startFakeGemini(options: FakeGeminiOptions = {}): Promise<FakeGemini> {
  const requests: RecordedRequest[] = [];
  const queue: Behaviour[] = [];
  let defaultBehaviour: Behaviour = DEFAULT_BEHAVIOUR;
  let closing = false;
  const sockets = new Set<Socket>();
  const listeners = new Set<() => void>();

  const notify = () => {
    for (const listener of [...listeners]) listener();
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent && !res.destroyed) {
        sendJson(res, 500, googleError(500, `fake-gemini: ${String(err)}`));
      } else {
        res.destroy();
      }
    });
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  function sendJson(res: ServerResponse, status: number, payload: unknown) {
    const body = JSON.stringify(payload);
    res.writeHead(status, {
      'content-type': 'application/json; charset=UTF-8',
      'content-length': Buffer.byteLength(body),
      vary: 'Origin, X-Origin, Referer',
    });
    res.end(body);
  }

  async function readBody(req: IncomingMessage): Promise<string> {
    const parts: Buffer[] = [];
    for await (const chunk of req) parts.push(chunk as Buffer);
    return Buffer.concat(parts).toString('utf8');
  }

  async function handle(req: IncomingMessage, res: ServerResponse) {
    const receivedAt = Date.now();
    const url = new URL(req.url ?? '/', 'http://fake-gemini');
    const match = PATH_RE.exec(url.pathname);
    const action = match?.[3] ?? '';
    const record: RecordedRequest = {
      method: req.method ?? 'GET',
      path: url.pathname,
      url: `${url.pathname}${url.search}`,
      apiVersion: match?.[1] ?? '',
      model: match ? decodeURIComponent(match[2] ?? '') : '',
      action,
      stream: action === 'streamGenerateContent',
      headers: req.headers,
      body: undefined,
      rawBody: '',
      receivedAt,
      aborted: false,
    };

    // Set when the fake ends the connection itself, so only client-side closes count as aborts.
    let selfClosed = false;
    const abort = new AbortController();
    res.on('close', () => {
      abort.abort();
      if (!res.writableFinished && !selfClosed && !closing) {
        record.closedAt = Date.now();
        record.aborted = true;
      } else if (record.finishedAt === undefined) {
        record.finishedAt = Date.now();
      }
      notify();
    });

    record.rawBody = await readBody(req);
    let parsedJson = false;
    if (record.rawBody.length > 0) {
      try {
        const parsed: unknown = JSON.parse(record.rawBody);
        if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed)) {
          record.body = parsed as GeminiRequestBody;
          parsedJson = true;
        }
      } catch {}
    }
    requests.push(record);
    notify();

    if (!match || req.method !== 'POST') {
      sendJson(res, 404, googleError(404, `Method not found: ${req.method} ${url.pathname}`));
      return;
    }
    const apiKey = req.headers['x-goog-api-key'] ?? url.searchParams.get('key') ?? undefined;
    if (apiKey === undefined) {
      sendJson(
        res,
        403,
        googleError(
          403,
          "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        ),
      );
      return;
    }
    if (options.apiKey !== undefined && apiKey !== options.apiKey) {
      sendJson(
        res,
        400,
        googleError(400, 'API key not valid. Please pass a valid API key.', [
          {
            '@type': 'type.googleapis.com/google.rpc.ErrorInfo',
            reason: 'API_KEY_INVALID',
            domain: 'googleapis.com',
            metadata: { service: 'generativelanguage.googleapis.com' },
          },
        ]),
      );
      return;
    }
    if (!parsedJson || !record.body) {
      sendJson(res, 400, googleError(400, 'Invalid JSON payload received.'));
      return;
    }

    const promptTokens = estimateTokens(promptText(record.body));
    if (action === 'countTokens') {
      sendJson(res, 200, {
        totalTokens: promptTokens,
        promptTokensDetails: [{ modality: 'TEXT', tokenCount: promptTokens }],
      });
      return;
    }

    const behaviour = queue.shift() ?? defaultBehaviour;
    record.behaviour = behaviour;
    const pause = async (ms: number | undefined) => {
      if (!ms || ms <= 0) return;
      await sleep(ms, undefined, { signal: abort.signal }).catch(() => undefined);
    };
    const gone = () => abort.signal.aborted || res.destroyed;

    await pause(behaviour.delayMs);
    if (gone()) return;

    const model = record.model;
    const envelope = (
      candidate: Record<string, unknown> | undefined,
      usage: unknown,
      id: string,
    ) => {
      const payload: Record<string, unknown> = {};
      if (candidate) payload.candidates = [candidate];
      if (usage) payload.usageMetadata = usage;
      payload.modelVersion = model;
      payload.responseId = id;
      return payload;
    };
    const fullUsage = (candidatesTokenCount: number) => ({
      promptTokenCount: promptTokens,
      candidatesTokenCount,
      totalTokenCount: promptTokens + candidatesTokenCount,
      promptTokensDetails: [{ modality: 'TEXT', tokenCount: promptTokens }],
    });
    // Intermediate stream chunks carry the running prompt-only usage, as the real API does.
    const partialUsage = {
      promptTokenCount: promptTokens,
      totalTokenCount: promptTokens,
      promptTokensDetails: [{ modality: 'TEXT', tokenCount: promptTokens }],
    };
    const textPart = (text: string) => ({ parts: [{ text }], role: 'model' });

    const startStream = () => {
      res.writeHead(200, {
        'content-type': 'text/event-stream',
        'content-disposition': 'attachment',
        vary: 'Origin, X-Origin, Referer',
        'x-content-type-options': 'nosniff',
      });
      res.flushHeaders();
    };
    const sendEvent = (payload: unknown) => {
      if (gone()) return false;
      res.write(`data: ${JSON.stringify(payload)}\r\n\r\n`);
      return true;
    };

    switch (behaviour.kind) {
      case 'text': {
        const pieces = splitText(behaviour.text, behaviour.chunks);
        const text = Array.isArray(behaviour.chunks) ? pieces.join('') : behaviour.text;
        const finishReason = behaviour.finishReason ?? 'STOP';
        const usage = behaviour.usage ?? fullUsage(estimateTokens(text));
        const id = responseId();
        const withVersion = (payload: Record<string, unknown>) => {
          if (behaviour.modelVersion) payload.modelVersion = behaviour.modelVersion;
          return payload;
        };
        if (!record.stream) {
          sendJson(
            res,
            200,
            withVersion(envelope({ content: textPart(text), finishReason, index: 0 }, usage, id)),
          );
          return;
        }
        startStream();
        for (let i = 0; i < pieces.length; i++) {
          if (i > 0) await pause(behaviour.chunkDelayMs);
          const last = i === pieces.length - 1;
          const candidate: Record<string, unknown> = { content: textPart(pieces[i] ?? '') };
          if (last) candidate.finishReason = finishReason;
          candidate.index = 0;
          if (!sendEvent(withVersion(envelope(candidate, last ? usage : partialUsage, id)))) return;
        }
        res.end();
        return;
      }
      case 'rateLimit':
        sendJson(res, 429, rateLimitBody(model, behaviour.retryAfterSeconds));
        return;
      case 'serverError': {
        const status = behaviour.status ?? 500;
        sendJson(res, status, serverErrorBody(status));
        return;
      }
      case 'clientError':
        sendJson(
          res,
          behaviour.status,
          googleError(
            behaviour.status,
            behaviour.message ?? 'Request contains an invalid argument.',
          ),
        );
        return;
      case 'promptBlocked': {
        const payload = {
          promptFeedback: {
            blockReason: behaviour.reason ?? 'SAFETY',
            safetyRatings: safetyRatings('HARM_CATEGORY_DANGEROUS_CONTENT'),
          },
          usageMetadata: partialUsage,
          modelVersion: model,
          responseId: responseId(),
        };
        if (!record.stream) {
          sendJson(res, 200, payload);
          return;
        }
        startStream();
        sendEvent(payload);
        if (!gone()) res.end();
        return;
      }
      case 'responseBlocked': {
        const reason = behaviour.reason ?? 'SAFETY';
        const partial = behaviour.partialText ?? '';
        const id = responseId();
        const blocked: Record<string, unknown> = {
          finishReason: reason,
          index: 0,
          safetyRatings: safetyRatings('HARM_CATEGORY_HARASSMENT'),
        };
        const usage = fullUsage(estimateTokens(partial));
        if (!record.stream) {
          sendJson(
            res,
            200,
            envelope(partial ? { content: textPart(partial), ...blocked } : blocked, usage, id),
          );
          return;
        }
        startStream();
        if (partial) {
          for (const [i, piece] of splitText(partial, undefined).entries()) {
            if (i > 0) await pause(behaviour.chunkDelayMs);
            if (!sendEvent(envelope({ content: textPart(piece), index: 0 }, partialUsage, id))) {
              return;
            }
          }
          await pause(behaviour.chunkDelayMs);
        }
        if (!sendEvent(envelope(blocked, usage, id))) return;
        res.end();
        return;
      }
      case 'dropMidStream': {
        if (!record.stream) {
          selfClosed = true;
          res.destroy();
          return;
        }
        const pieces = splitText(behaviour.text, Math.max(behaviour.afterChunks + 1, 3));
        const id = responseId();
        startStream();
        for (let i = 0; i < behaviour.afterChunks && i < pieces.length; i++) {
          if (i > 0) await pause(behaviour.chunkDelayMs);
          const candidate = { content: textPart(pieces[i] ?? ''), index: 0 };
          if (!sendEvent(envelope(candidate, partialUsage, id))) return;
        }
        // Lets the written chunks reach the client before the reset.
        await pause(Math.max(behaviour.chunkDelayMs ?? 0, 20));
        selfClosed = true;
        res.socket?.destroy();
        res.destroy();
        return;
      }
      case 'hang':
        return;
    }
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    port,
    requests,
    enqueue(...behaviours) {
      queue.push(...behaviours);
    },
    setDefault(behaviour) {
      defaultBehaviour = behaviour;
    },
    pending() {
      return queue.length;
    },
    waitFor(predicate, timeoutMs = 5000) {
      if (predicate(requests)) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const check = () => {
          if (!predicate(requests)) return;
          clearTimeout(timer);
          listeners.delete(check);
          resolve();
        };
        const timer = setTimeout(() => {
          listeners.delete(check);
          reject(new Error(`fake-gemini: condition not met within ${timeoutMs}ms`));
        }, timeoutMs);
        listeners.add(check);
      });
    },
    reset() {
      requests.length = 0;
      queue.length = 0;
    },
    close() {
      closing = true;
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
        server.closeAllConnections();
      });
    },
  };
}
