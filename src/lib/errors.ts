/**
 * The closed catalogue of error codes. Each code is bound to one HTTP status; the API's error
 * handler renders every failure as `{ error: { code, message, requestId, details } }`.
 */
export const errorCatalogue = {
  VALIDATION_FAILED: { status: 400, description: 'The request did not match its schema.' },
  MALFORMED_REQUEST: { status: 400, description: 'The body could not be parsed (e.g. bad JSON).' },
  OTP_INVALID: { status: 400, description: 'The one-time code is wrong, expired or used.' },
  UNAUTHENTICATED: {
    status: 401,
    description: 'Missing, invalid, expired or revoked credentials.',
  },
  INVALID_CREDENTIALS: { status: 401, description: 'Mobile number or password is wrong.' },
  FORBIDDEN: { status: 403, description: 'Authenticated, but not allowed to do this.' },
  NOT_FOUND: { status: 404, description: 'No such resource (or it belongs to someone else).' },
  METHOD_NOT_ALLOWED: { status: 405, description: 'The route does not accept this method.' },
  NOT_ACCEPTABLE: { status: 406, description: 'The route cannot answer in the accepted type.' },
  CONFLICT: { status: 409, description: 'The request conflicts with the current state.' },
  PAYLOAD_TOO_LARGE: { status: 413, description: 'The body is larger than allowed.' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, description: 'The Content-Type is not accepted.' },
  OTP_LOCKED: { status: 429, description: 'Too many wrong codes; ask for a new one.' },
  OTP_COOLDOWN: { status: 429, description: 'A code was sent moments ago; wait to ask again.' },
  RATE_LIMITED: { status: 429, description: 'Too many requests; see Retry-After.' },
  QUOTA_EXCEEDED: { status: 429, description: 'The daily prompt quota is used up.' },
  INTERNAL: { status: 500, description: 'An unexpected error; it has been logged.' },
  BAD_GATEWAY: { status: 502, description: 'An upstream service answered with an error.' },
  BILLING_NOT_CONFIGURED: { status: 503, description: 'Billing is not set up on this server.' },
  UNAVAILABLE: {
    status: 503,
    description: 'A dependency (database, Redis) is unreachable, or the service is overloaded.',
  },
} as const;

export type ErrorCode = keyof typeof errorCatalogue;
export const errorCodes = Object.keys(errorCatalogue) as [ErrorCode, ...ErrorCode[]];

export interface AppErrorOptions {
  code: ErrorCode;
  message: string;
  details?: Record<string, unknown>;
  /** Seconds, sent as `Retry-After` (required in practice for 429 and useful for 503). */
  retryAfter?: number;
  headers?: Record<string, string>;
  cause?: unknown;
}

export class AppError extends Error {
  override name = 'AppError';
  readonly code: ErrorCode;
  readonly status: number;
  readonly details: Record<string, unknown>;
  readonly retryAfter: number | undefined;
  readonly headers: Record<string, string>;

  constructor(options: AppErrorOptions) {
    super(options.message, { cause: options.cause });
    this.code = options.code;
    this.status = errorCatalogue[options.code].status;
    this.details = options.details ?? {};
    this.retryAfter = options.retryAfter;
    this.headers = options.headers ?? {};
  }
}

export const notFound = (what: string) =>
  new AppError({ code: 'NOT_FOUND', message: `${what} not found` });

export const unavailable = (what: string, cause?: unknown) =>
  new AppError({
    code: 'UNAVAILABLE',
    message: `${what} is temporarily unavailable; try again shortly`,
    retryAfter: 2,
    cause,
  });

/**
 * Errors raised by `pg` or ioredis when the server cannot be reached or the link dropped. The
 * cause chain is followed: Drizzle wraps the driver's error in one of its own.
 */
export function isConnectionError(error: unknown, depth = 0): boolean {
  if (!(error instanceof Error) || depth > 5) return false;
  if (error.cause !== undefined && isConnectionError(error.cause, depth + 1)) return true;
  const code = (error as { code?: unknown }).code;
  if (
    typeof code === 'string' &&
    [
      'ECONNREFUSED',
      'ECONNRESET',
      'ETIMEDOUT',
      'EPIPE',
      'ENOTFOUND',
      'EHOSTUNREACH',
      '57P01', // admin_shutdown
      '57P02', // crash_shutdown
      '57P03', // cannot_connect_now
      '53300', // too_many_connections: the server is full, not our request
      '08000',
      '08003',
      '08006',
    ].includes(code)
  ) {
    return true;
  }
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|Connection is closed|Stream isn't writeable|MaxRetriesPerRequest|Reached the max retries|ECONNREFUSED|Command timed out|terminating connection due to administrator command|the database system is (shutting down|starting up|in recovery mode)/i.test(
    error.message,
  );
}
