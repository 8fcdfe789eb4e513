export interface LlmTurn {
  role: 'user' | 'model';
  text: string;
}

export interface LlmUsage {
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
}

export interface LlmRequest {
  /** Earlier turns, oldest first, already trimmed to the budget. */
  history: LlmTurn[];
  prompt: string;
  systemInstruction?: string | null;
  signal: AbortSignal;
}

export type LlmEvent =
  | { type: 'delta'; text: string }
  | { type: 'done'; finishReason: string; usage: LlmUsage | null; model: string };

export interface LlmProvider {
  readonly name: 'gemini' | 'offline';
  readonly model: string;
  /** Streams text deltas, then exactly one `done`. Throws LlmError on failure. */
  stream(request: LlmRequest): AsyncIterable<LlmEvent>;
}

export type LlmErrorKind =
  | 'rate_limited'
  | 'server'
  | 'network'
  | 'timeout'
  | 'client'
  | 'blocked'
  | 'aborted';

const RETRYABLE_KINDS: ReadonlySet<LlmErrorKind> = new Set([
  'rate_limited',
  'server',
  'network',
  'timeout',
]);

export interface LlmErrorOptions {
  /** HTTP status of the upstream answer, when there was one. */
  status?: number;
  /** How long the upstream asked us to wait before trying again. */
  retryAfterMs?: number;
  /** The prompt's block reason or the reply's finish reason, for kind `blocked`. */
  blockReason?: string;
  cause?: unknown;
}

export class LlmError extends Error {
  override name = 'LlmError';
  readonly kind: LlmErrorKind;
  readonly status?: number;
  readonly retryAfterMs?: number;
  readonly blockReason?: string;

  constructor(kind: LlmErrorKind, message: string, options: LlmErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.kind = kind;
    if (options.status !== undefined) this.status = options.status;
    if (options.retryAfterMs !== undefined) this.retryAfterMs = options.retryAfterMs;
    if (options.blockReason !== undefined) this.blockReason = options.blockReason;
  }

  /** True for kinds a retry can fix: rate_limited, server, network, timeout. */
  get retryable(): boolean {
    return RETRYABLE_KINDS.has(this.kind);
  }
}
