import type { FastifyRequest } from 'fastify';
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { OtpPurpose } from '../../auth/otp-service.js';
import { normalizeMobile } from '../../auth/phone.js';
import type { Container } from '../../container.js';
import { AppError } from '../../lib/errors.js';
import { caller, type Protected } from '../plugins/auth.js';
import {
  bearer,
  errorResponses,
  mobileInput,
  otpInput,
  passwordInput,
  textInput,
  tokenPairSchema,
  userSchema,
} from '../schemas.js';
import { toUserDto } from './user.js';

const otpSent = z.object({
  expiresIn: z.number().int().describe('Seconds the code stays valid'),
  otp: z.string().optional().describe('Only when OTP_DELIVERY=response (mocked SMS)'),
});

const signedIn = tokenPairSchema.extend({ user: userSchema });

const meta = (request: FastifyRequest) => ({
  userAgent: request.headers['user-agent'],
  ip: request.ip,
});

export const authRoutes =
  (container: Container, authenticated: Protected): FastifyPluginAsyncZod =>
  async (app) => {
    const { auth, config } = container;
    const mobile = (value: string) => normalizeMobile(value, config.defaultPhoneRegion);
    const tags = ['Auth'];

    app.post(
      '/auth/signup',
      {
        schema: {
          tags,
          summary: 'Register a mobile number',
          description:
            'Creates an unverified user; the first successful /auth/verify-otp verifies it. A number that was registered but never verified can be registered again.',
          body: z.object({
            mobile: mobileInput,
            name: textInput().trim().min(1).max(100).optional(),
            email: z.email().max(254).optional(),
            password: passwordInput.optional(),
          }),
          response: {
            201: z.object({ user: userSchema }),
            ...errorResponses('VALIDATION_FAILED', 'CONFLICT', 'RATE_LIMITED'),
          },
        },
      },
      async (request, reply) => {
        const user = await auth.signup({ ...request.body, mobile: mobile(request.body.mobile) });
        reply.code(201);
        return { user: toUserDto(user, 'basic') };
      },
    );

    /** send-otp and forgot-password: the same answer, a code of a different purpose. */
    const codeRoute = (url: string, purpose: OtpPurpose, summary: string, description: string) =>
      app.post(
        url,
        {
          schema: {
            tags,
            summary,
            description,
            body: z.object({ mobile: mobileInput }),
            response: {
              200: otpSent,
              ...errorResponses('VALIDATION_FAILED', 'NOT_FOUND', 'RATE_LIMITED'),
            },
          },
        },
        async (request) => auth.sendOtp(mobile(request.body.mobile), purpose),
      );

    codeRoute(
      '/auth/send-otp',
      'signin',
      'Send a sign-in code',
      'Codes are 6 digits, valid 5 minutes, single use, and die after 5 wrong tries. One code per number and purpose every 60 s, at most 10 an hour.',
    );

    app.post(
      '/auth/verify-otp',
      {
        schema: {
          tags,
          summary: 'Exchange a sign-in code for tokens',
          body: z.object({ mobile: mobileInput, otp: otpInput }),
          response: {
            200: signedIn,
            ...errorResponses('VALIDATION_FAILED', 'OTP_INVALID', 'OTP_LOCKED'),
          },
        },
      },
      async (request) => {
        const result = await auth.verifyOtp(
          mobile(request.body.mobile),
          request.body.otp,
          meta(request),
        );
        return { ...result, user: toUserDto(result.user, await container.tierOf(result.user.id)) };
      },
    );

    codeRoute(
      '/auth/forgot-password',
      'reset',
      'Send a password-reset code',
      'The code works only with /auth/reset-password; the same limits as sign-in codes apply.',
    );

    app.post(
      '/auth/reset-password',
      {
        schema: {
          tags,
          summary: 'Set a new password with a reset code',
          description: 'Signs out every session of the user.',
          body: z.object({ mobile: mobileInput, otp: otpInput, newPassword: passwordInput }),
          response: {
            204: z.null().describe('Password changed'),
            ...errorResponses('VALIDATION_FAILED', 'OTP_INVALID', 'OTP_LOCKED'),
          },
        },
      },
      async (request, reply) => {
        const { otp, newPassword } = request.body;
        await auth.resetPassword(mobile(request.body.mobile), otp, newPassword);
        return reply.code(204).send(null);
      },
    );

    app.post(
      '/auth/change-password',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'Change (or first set) the password',
          description:
            '`currentPassword` is required when a password is already set. Signs out every other session.',
          body: z.object({
            currentPassword: z.string().max(128).optional(),
            newPassword: passwordInput,
          }),
          response: {
            204: z.null().describe('Password changed'),
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'FORBIDDEN'),
          },
        },
      },
      async (request, reply) => {
        const { userId, sessionId } = caller(request);
        await auth.changePassword(
          userId,
          sessionId,
          request.body.currentPassword,
          request.body.newPassword,
        );
        return reply.code(204).send(null);
      },
    );

    app.post(
      '/auth/login',
      {
        schema: {
          tags,
          summary: 'Sign in with mobile number and password',
          body: z.object({ mobile: mobileInput, password: z.string().min(1).max(128) }),
          response: {
            200: signedIn,
            ...errorResponses(
              'VALIDATION_FAILED',
              'INVALID_CREDENTIALS',
              'FORBIDDEN',
              'RATE_LIMITED',
            ),
          },
        },
      },
      async (request) => {
        const result = await auth.login(
          mobile(request.body.mobile),
          request.body.password,
          meta(request),
        );
        return { ...result, user: toUserDto(result.user, await container.tierOf(result.user.id)) };
      },
    );

    app.post(
      '/auth/refresh',
      {
        schema: {
          tags,
          summary: 'Rotate the refresh token',
          description:
            'Returns a new pair; the old refresh token stops working. Presenting an already rotated token revokes the whole session.',
          body: z.object({ refreshToken: z.string().min(1).max(200) }),
          response: {
            200: tokenPairSchema,
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED'),
          },
        },
      },
      async (request) => container.sessions.refresh(request.body.refreshToken),
    );

    app.post(
      '/auth/logout',
      {
        ...authenticated,
        schema: {
          tags,
          security: bearer,
          summary: 'Sign out this session, the session of a refresh token, or all of them',
          body: z
            .object({
              refreshToken: z.string().max(200).optional(),
              all: z.boolean().optional().describe('Sign out every session of the user'),
            })
            // A POST without a body (and without Content-Type) arrives as null.
            .nullish(),
          response: {
            204: z.null().describe('Signed out'),
            ...errorResponses('VALIDATION_FAILED', 'UNAUTHENTICATED', 'NOT_FOUND'),
          },
        },
      },
      async (request, reply) => {
        const { userId, sessionId } = caller(request);
        const body = request.body;
        if (body?.all) await container.sessions.revokeAll(userId, 'logout_all');
        else if (body?.refreshToken) {
          // Signs out the session the refresh token belongs to (e.g. another device of the user).
          const revoked = await container.sessions.revokeByRefreshToken(
            userId,
            body.refreshToken,
            'logout',
          );
          if (!revoked)
            throw new AppError({
              code: 'NOT_FOUND',
              message: 'No session of yours uses this refresh token',
            });
        } else await container.sessions.revoke(sessionId, 'logout');
        return reply.code(204).send(null);
      },
    );
  };
