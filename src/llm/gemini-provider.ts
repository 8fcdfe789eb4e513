import {
  ApiError,
  type Candidate,
  type Content,
  type GenerateContentResponseUsageMetadata,
  GoogleGenAI,
} from '@google/genai';
import {
  LlmError,
  type LlmEvent,
  type LlmProvider,
  type LlmRequest,
  type LlmUsage,
} from './provider.js';

export interface GeminiProviderOptions {
  /** Gemini API key, sent as `x-goog-api-key`. */
  apiKey: string;
  /** Model id, e.g. `gemini-2.5-flash`. */
  model: string;
  /** Root of the v1beta REST API, for proxies, gateways and tests. Default: Google's endpoint. */
  baseUrl?: string;
  /** Bound on one whole reply, from the request to the last chunk, in milliseconds. */
  timeoutMs: number;
}

/** Finish reasons that mean the reply was stopped by a filter rather than completed. */
const BLOCK_FINISH_REASONS: ReadonlySet<string> = new Set([
  'SAFETY',
  'RECITATION',
  'PROHIBITED_CONTENT',
  'SPII',
  'BLOCKLIST',
  'IMAGE_SAFETY',
  'IMAGE_PROHIBITED_CONTENT',
  'IMAGE_RECITATION',
]);

const NETWORK_CODES: ReadonlySet<string> = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
]);

// undici says `fetch failed` before a response and `terminated` when the body is cut; the SDK says
// `Incomplete JSON segment at the end` when the connection ends inside an SSE event.
const NETWORK_MESSAGE =
  /fetch failed|^terminated$|socket hang up|other side closed|socket closed|incomplete json segment/i;

const RETRY_INFO_TYPE = 'type.googleapis.com/google.rpc.RetryInfo';

export class GeminiProvider implements LlmProvider {
  readonly name = 'gemini' as const;
  readonly model: string;
  readonly #client: GoogleGenAI;
  readonly #timeoutMs: number;

  constructor(options: GeminiProviderOptions) {
    this.model = options.model;
    this.#timeoutMs = options.timeoutMs;
    this.#client = new GoogleGenAI({
      apiKey: options.apiKey,
      apiVersion: 'v1beta',
      ...(options.baseUrl ? { httpOptions: { baseUrl: options.baseUrl } } : {}),
    });
  }

  async *stream(request: LlmRequest): AsyncGenerator<LlmEvent, void, undefined> {
    const { signal } = request;
    if (signal.aborted) throw abortedError(signal.reason);
    const timeout = AbortSignal.timeout(this.#timeoutMs);
    // The SDK only releases the reader when iteration stops early, which leaves the connection
    // open; aborting on the way out closes it.
    const release = new AbortController();
    const abortSignal = AbortSignal.any([signal, timeout, release.signal]);

    const contents: Content[] = [
      ...request.history.map((turn) => ({ role: turn.role, parts: [{ text: turn.text }] })),
      { role: 'user', parts: [{ text: request.prompt }] },
    ];
    const systemInstruction = request.systemInstruction?.trim()
      ? request.systemInstruction
      : undefined;

    let finishReason: string | undefined;
    let usage: LlmUsage | null = null;
    let model = this.model;
    try {
      const chunks = await this.#client.models.generateContentStream({
        model: this.model,
        contents,
        config: { abortSignal, ...(systemInstruction ? { systemInstruction } : {}) },
      });
      for await (const chunk of chunks) {
        const blockReason = chunk.promptFeedback?.blockReason;
        if (blockReason) {
          throw new LlmError('blocked', `Gemini blocked the prompt (${blockReason})`, {
            blockReason,
          });
        }
        if (chunk.modelVersion) model = chunk.modelVersion;
        if (chunk.usageMetadata) usage = toUsage(chunk.usageMetadata);
        const candidate = chunk.candidates?.[0];
        const text = candidateText(candidate);
        if (text) yield { type: 'delta', text };
        const reason = candidate?.finishReason;
        if (reason && reason !== 'FINISH_REASON_UNSPECIFIED') {
          if (BLOCK_FINISH_REASONS.has(reason)) {
            throw new LlmError('blocked', `Gemini stopped the reply (${reason})`, {
              blockReason: reason,
            });
          }
          finishReason = reason;
        }
      }
    } catch (error) {
      throw toLlmError(error, signal, timeout, this.#timeoutMs);
    } finally {
      release.abort();
    }
    if (finishReason === undefined) {
      throw new LlmError('network', 'The Gemini stream ended without a finish reason');
    }
    yield { type: 'done', finishReason, usage, model };
  }
}

function candidateText(candidate: Candidate | undefined): string {
  let text = '';
  for (const part of candidate?.content?.parts ?? []) {
    if (typeof part.text === 'string' && !part.thought) text += part.text;
  }
  return text;
}

function toUsage(metadata: GenerateContentResponseUsageMetadata): LlmUsage {
  const promptTokens = metadata.promptTokenCount ?? 0;
  // Thinking tokens are billed as output, and totalTokenCount includes them.
  const completionTokens =
    (metadata.candidatesTokenCount ?? 0) + (metadata.thoughtsTokenCount ?? 0);
  return {
    promptTokens,
    completionTokens,
    totalTokens: metadata.totalTokenCount ?? promptTokens + completionTokens,
  };
}

function abortedError(cause: unknown): LlmError {
  return new LlmError('aborted', 'The request to Gemini was cancelled', { cause });
}

function toLlmError(
  error: unknown,
  signal: AbortSignal,
  timeout: AbortSignal,
  timeoutMs: number,
): LlmError {
  if (error instanceof LlmError) return error;
  // The SDK aborts fetch with a reason-less signal of its own, so the error cannot tell a timeout
  // from a cancellation: the signals can.
  if (signal.aborted) return abortedError(error);
  if (timeout.aborted) {
    return new LlmError('timeout', `Gemini did not finish within ${timeoutMs} ms`, {
      cause: error,
    });
  }
  if (error instanceof ApiError || (error instanceof Error && error.name === 'ApiError')) {
    return fromApiError(error as ApiError);
  }
  if (isNetworkError(error)) {
    return new LlmError('network', `Connection to Gemini failed: ${describe(error)}`, {
      cause: error,
    });
  }
  return new LlmError('server', `Unexpected answer from Gemini: ${describe(error)}`, {
    cause: error,
  });
}

interface GoogleErrorBody {
  message?: unknown;
  details?: unknown;
}

function fromApiError(error: ApiError): LlmError {
  const status = error.status;
  const body = parseErrorBody(error.message);
  const detail = typeof body?.message === 'string' ? body.message : error.message;
  const message = `Gemini answered ${status}: ${detail}`;
  if (status === 429) {
    const retryAfterMs = retryDelayMs(body);
    return new LlmError('rate_limited', message, {
      status,
      cause: error,
      ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
    });
  }
  if (status === 408) return new LlmError('timeout', message, { status, cause: error });
  if (status >= 500) return new LlmError('server', message, { status, cause: error });
  return new LlmError('client', message, { status, cause: error });
}

/**
 * The `error` object of Google's JSON error body. The SDK puts the body in the message, after a
 * `got status: …` prefix when the error arrived inside the stream.
 */
function parseErrorBody(message: string): GoogleErrorBody | undefined {
  const start = message.indexOf('{');
  if (start === -1) return undefined;
  try {
    const parsed: unknown = JSON.parse(message.slice(start));
    if (typeof parsed !== 'object' || parsed === null) return undefined;
    const inner = (parsed as { error?: unknown }).error;
    return typeof inner === 'object' && inner !== null ? (inner as GoogleErrorBody) : undefined;
  } catch {
    return undefined;
  }
}

// SDK 2.32's ApiError keeps no response headers, so a Retry-After header cannot be read; Gemini
// sends its hint as google.rpc.RetryInfo in the body instead.
function retryDelayMs(body: GoogleErrorBody | undefined): number | undefined {
  if (!Array.isArray(body?.details)) return undefined;
  for (const detail of body.details as unknown[]) {
    if (typeof detail !== 'object' || detail === null) continue;
    const { '@type': type, retryDelay } = detail as Record<string, unknown>;
    if (type !== RETRY_INFO_TYPE || typeof retryDelay !== 'string') continue;
    const match = /^(\d+(?:\.\d+)?)s$/.exec(retryDelay.trim());
    if (match?.[1]) return Math.round(Number(match[1]) * 1000);
  }
  return undefined;
}

function isNetworkError(error: unknown): boolean {
  let current: unknown = error;
  for (let depth = 0; depth < 5 && current instanceof Error; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string' && NETWORK_CODES.has(code)) return true;
    if (NETWORK_MESSAGE.test(current.message)) return true;
    current = current.cause;
  }
  return false;
}

function describe(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? ` (${error.cause.message})` : '';
  return `${error.message}${cause}`;
}
