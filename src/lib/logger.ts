import { type Logger, type LoggerOptions, pino } from 'pino';

export type { Logger };

/** Keys whose values never reach a log line, at any depth of a logged plain object. */
const SECRET_KEY =
  /^(password|currentPassword|newPassword|passwordHash|otp|otpHash|code_hash|.*token|.*secret|authorization|cookie|set-cookie|x-api-key|x-goog-api-key|apiKey|.*Hash)$/i;

const REDACTED = '[redacted]';

function redactDeep(value: unknown, depth: number): unknown {
  if (depth > 6 || value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((item) => redactDeep(item, depth + 1));
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null) return value;
  const out: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) {
    out[key] = SECRET_KEY.test(key) ? REDACTED : redactDeep(item, depth + 1);
  }
  return out;
}

export function loggerOptions(level: string): LoggerOptions {
  return {
    level,
    base: { service: 'gemini-chat' },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: {
      paths: [
        'req.headers.authorization',
        'req.headers.cookie',
        'req.headers["x-api-key"]',
        'req.headers["stripe-signature"]',
        'res.headers["set-cookie"]',
      ],
      censor: REDACTED,
    },
    formatters: {
      level: (label) => ({ level: label }),
      log: (object) => redactDeep(object, 0) as Record<string, unknown>,
    },
  };
}

/** The process logger: structured JSON on stdout, or to `destination` (tests capture it). */
export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return destination ? pino(loggerOptions(level), destination) : pino(loggerOptions(level));
}
