import type {
  FastifyInstance,
  FastifyRequest,
  onRequestAsyncHookHandler,
  preValidationAsyncHookHandler,
} from 'fastify';
import type { AccessClaims } from '../../auth/token-service.js';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';

declare module 'fastify' {
  interface FastifyRequest {
    auth: AccessClaims | null;
    authError: unknown;
  }
}

const missing = () =>
  new AppError({
    code: 'UNAUTHENTICATED',
    message: 'Send an access token as "Authorization: Bearer <token>"',
    headers: { 'www-authenticate': 'Bearer realm="gemini-chat"' },
  });

/**
 * Route options that make a route protected. The token is checked first (onRequest) without
 * failing, so the rate limiter that runs next can key by user, or by IP for a bad token (failed
 * attempts are counted too); the failure is raised before body validation, so an unauthenticated
 * caller gets 401, never a 400 that describes the schema.
 */
export interface Protected {
  onRequest: onRequestAsyncHookHandler;
  preValidation: preValidationAsyncHookHandler;
}

export function registerAuth(app: FastifyInstance, container: Container): Protected {
  app.decorateRequest('auth', null);
  app.decorateRequest('authError', null);
  return {
    onRequest: async (request) => {
      const header = request.headers.authorization;
      const match =
        typeof header === 'string' ? /^Bearer ([A-Za-z0-9._~+/=-]+)$/i.exec(header.trim()) : null;
      if (!match?.[1]) {
        request.authError = missing();
        return;
      }
      try {
        request.auth = await container.sessions.authenticate(match[1]);
      } catch (error) {
        request.authError = error;
      }
    },
    preValidation: async (request) => {
      if (!request.auth) throw request.authError ?? missing();
    },
  };
}

/** The signed-in caller; only call from protected routes. */
export function caller(request: FastifyRequest): AccessClaims {
  if (!request.auth) throw missing();
  return request.auth;
}
