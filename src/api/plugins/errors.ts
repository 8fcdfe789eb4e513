import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import {
  hasZodFastifySchemaValidationErrors,
  isResponseSerializationError,
} from 'fastify-type-provider-zod';
import { AppError, type ErrorCode, isConnectionError } from '../../lib/errors.js';
import type { Metrics } from '../../lib/metrics.js';

const statusCodes: Record<number, ErrorCode> = {
  400: 'MALFORMED_REQUEST',
  401: 'UNAUTHENTICATED',
  403: 'FORBIDDEN',
  404: 'NOT_FOUND',
  405: 'METHOD_NOT_ALLOWED',
  406: 'NOT_ACCEPTABLE',
  409: 'CONFLICT',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  429: 'RATE_LIMITED',
};

interface ValidationIssue {
  instancePath?: string;
  message?: string;
}

function validationDetails(error: FastifyError): Record<string, unknown> {
  const context = (error as { validationContext?: string }).validationContext ?? 'body';
  const issues = ((error as { validation?: ValidationIssue[] }).validation ?? []).map((issue) => {
    const path = (issue.instancePath ?? '').split('/').filter(Boolean);
    const field = [context, ...path].join('.');
    return { field, message: issue.message ?? 'is invalid' };
  });
  return { issues };
}

/** Converts whatever was thrown into an AppError; the one place that knows every error source. */
export function toAppError(error: unknown): AppError {
  if (error instanceof AppError) return error;
  const fastifyError = error as FastifyError;
  if (hasZodFastifySchemaValidationErrors(fastifyError)) {
    const details = validationDetails(fastifyError);
    const first = (details.issues as Array<{ field: string; message: string }>)[0];
    return new AppError({
      code: 'VALIDATION_FAILED',
      message: first ? `${first.field}: ${first.message}` : 'The request is invalid',
      details,
    });
  }
  if (isResponseSerializationError(fastifyError)) {
    return new AppError({ code: 'INTERNAL', message: 'Internal error', cause: error });
  }
  if (isConnectionError(error)) {
    return new AppError({
      code: 'UNAVAILABLE',
      message: 'A backing service is temporarily unavailable; try again shortly',
      retryAfter: 2,
      cause: error,
    });
  }
  const status = fastifyError?.statusCode;
  if (typeof status === 'number' && status >= 400 && status < 500) {
    const code = statusCodes[status] ?? 'MALFORMED_REQUEST';
    let message = fastifyError.message;
    if (fastifyError.code === 'FST_ERR_CTP_BODY_TOO_LARGE') message = 'Request body is too large';
    if (fastifyError.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
      message = 'Unsupported Content-Type; send application/json';
    }
    if (error instanceof SyntaxError || fastifyError.code === 'FST_ERR_CTP_INVALID_JSON_BODY') {
      message = 'Request body is not valid JSON';
    }
    return new AppError({ code, message, cause: error });
  }
  return new AppError({ code: 'INTERNAL', message: 'Internal error', cause: error });
}

export function sendError(request: FastifyRequest, reply: FastifyReply, error: AppError) {
  if (error.retryAfter !== undefined)
    reply.header('retry-after', String(Math.max(1, Math.ceil(error.retryAfter))));
  for (const [name, value] of Object.entries(error.headers)) reply.header(name, value);
  return reply
    .code(error.status)
    .type('application/json')
    .send({
      error: {
        code: error.code,
        message:
          error.status >= 500 && error.code === 'INTERNAL' ? 'Internal error' : error.message,
        requestId: request.id,
        details: error.code === 'INTERNAL' ? {} : error.details,
      },
    });
}

export function registerErrorHandling(app: FastifyInstance, metrics?: Metrics) {
  app.setErrorHandler((error, request, reply) => {
    const appError = toAppError(error);
    metrics?.errors.inc({ code: appError.code });
    if (appError.code === 'INTERNAL' || appError.code === 'BAD_GATEWAY') {
      request.log.error({ err: error, code: appError.code }, 'request failed');
    } else if (appError.status >= 500) {
      // Expected states (a dependency down, billing not set up): no stack trace needed.
      const cause = appError.cause instanceof Error ? appError.cause.message : undefined;
      request.log.warn({ code: appError.code, cause }, appError.message);
    } else if (appError.code === 'VALIDATION_FAILED' || appError.code === 'MALFORMED_REQUEST') {
      request.log.info({ code: appError.code, details: appError.details }, 'request rejected');
    }
    return sendError(request, reply, appError);
  });

  app.setNotFoundHandler((request, reply) =>
    sendError(
      request,
      reply,
      new AppError({
        code: 'NOT_FOUND',
        message: `Route ${request.method} ${request.url.split('?')[0]} not found`,
      }),
    ),
  );
}
