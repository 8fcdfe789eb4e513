import type {
  FastifyInstance,
  FastifyRequest,
  onRequestHookHandler,
  preValidationHookHandler,
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

const BEARER = /^Bearer ([A-Za-z0-9._~+/=-]+)$/i;

function bearerToken(header: string | string[] | undefined): string | undefined {
  return typeof header === 'string' ? BEARER.exec(header.trim())?.[1] : undefined;
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
  onRequest: onRequestHookHandler;
  preValidation: preValidationHookHandler;
}

export function registerAuth(app: FastifyInstance, container: Container): Protected {
  app.decorateRequest('auth', null);
  app.decorateRequest('authError', null);
  return {
    // Callback hooks: a request whose token and session this process already knows (nearly
    // every one) is checked without a promise.
    onRequest: (request, _reply, done) => {
      const header = request.headers.authorization;
      // A token this process verified before needs no syntax check.
      const quick =
        typeof header === 'string' && header.startsWith('Bearer ') ? header.slice(7) : undefined;
      const knownQuick =
        quick === undefined ? undefined : container.sessions.authenticateKnown(quick);
      const token = knownQuick === undefined ? bearerToken(header) : quick;
      if (!token) {
        request.authError = missing();
        return done();
      }
      // The same text was looked up already when the quick form matched it.
      const known =
        knownQuick ?? (token === quick ? undefined : container.sessions.authenticateKnown(token));
      if (known !== undefined) {
        if (known instanceof AppError) request.authError = known;
        else request.auth = known;
        return done();
      }
      container.sessions.authenticate(token).then(
        (claims) => {
          request.auth = claims;
          done();
        },
        (error: unknown) => {
          request.authError = error;
          done();
        },
      );
    },
    preValidation: (request, _reply, done) => {
      if (!request.auth) return done(toError(request.authError ?? missing()));
      done();
    },
  };
}

function toError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

/** The signed-in caller; only call from protected routes. */
export function caller(request: FastifyRequest): AccessClaims {
  if (!request.auth) throw missing();
  return request.auth;
}
