import { randomInt, randomUUID } from 'node:crypto';
import type { ApiClient, HttpResult } from './http.js';

export type Tier = 'basic' | 'pro';
/**
 * How a client gets its reply: `poll` GETs the message until final, `stream` follows
 * `GET …/stream`, `wait` sends with `?wait=5`, `sse` sends with `Accept: text/event-stream`.
 */
export type Mode = 'poll' | 'stream' | 'wait' | 'sse';

export const FINAL = new Set(['completed', 'failed', 'cancelled', 'blocked']);

export interface ChaosUser {
  idx: number;
  id: string;
  mobile: string;
  token: string;
  tier: Tier;
  rooms: string[];
  /** Set by a QUOTA_EXCEEDED answer, cleared by the next accepted prompt. */
  quotaHit: boolean;
}

export interface AcceptedReply {
  replyId: string;
  promptId: string;
  roomId: string;
  userId: string;
  tier: Tier;
  kind: 'prompt' | 'regenerate';
  mode: Mode;
  /** When the request that was accepted was sent, and when its answer came. */
  sentAt: number;
  acceptedAt: number;
  api: number;
  /** Attempts the client needed (retries with the same Idempotency-Key after 503s/drops). */
  attempts: number;
  /** The final status a client saw, and when. */
  clientFinal?: string;
  clientFinalAt?: number;
}

export interface PromptExpectation {
  promptId: string;
  userId: string;
  tier: Tier;
  content: string;
  /** Replies the client knows it asked for (the prompt and each accepted regeneration). */
  requested: number;
  /** Regenerations whose answer never came: each may or may not have been stored. */
  uncertain: number;
}

export interface StreamIssue {
  replyId: string;
  kind: 'mismatch' | 'hung' | 'not-found' | 'gave-up';
  detail: string;
  at: string;
}

/** A client following one reply's SSE; faults look at the open ones. */
export interface Follow {
  replyId: string;
  api: number;
  connected: boolean;
  finalAt?: number;
  reconnects: number;
}

export class Ledger {
  readonly accepted = new Map<string, AcceptedReply>();
  readonly prompts = new Map<string, PromptExpectation>();
  /** Sends that never got an answer (every retry dropped or 503): they may or may not exist. */
  readonly unknownSends: Array<{ userId: string; content: string }> = [];
  readonly streamIssues: StreamIssue[] = [];
  readonly quotaRejections: Record<Tier, number> = { basic: 0, pro: 0 };
  readonly counters = {
    sends: 0,
    retriedSends: 0,
    idempotentReplays: 0,
    streamsOpened: 0,
    streamReconnects: 0,
    cancels: 0,
    regenerations: 0,
    regenerationsUncertain: 0,
  };
  readonly modes: Record<Mode, number> = { poll: 0, stream: 0, wait: 0, sse: 0 };

  issue(replyId: string, kind: StreamIssue['kind'], detail: string) {
    this.streamIssues.push({ replyId, kind, detail, at: new Date().toISOString() });
  }
}

export interface LoadContext {
  client: ApiClient;
  ledger: Ledger;
  /** No new prompt after this. */
  stopAt: number;
  /** Every client gives up following after this. */
  hardStopAt: number;
  follows: Set<Follow>;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const between = (min: number, max: number) => randomInt(min, max + 1);
const pick = <T>(items: readonly T[]): T => items[randomInt(items.length)]!;

function bodyOf<T>(result: HttpResult): T | undefined {
  return result.ok ? (result.body as T) : undefined;
}

function errorCode(result: HttpResult): string | undefined {
  return bodyOf<{ error?: { code?: string } }>(result)?.error?.code;
}

/** Signs a new user up and in through the public API (OTP_DELIVERY=response). */
export async function createUser(
  client: ApiClient,
  idx: number,
  tier: Tier,
  rooms: number,
): Promise<ChaosUser> {
  const mobile = `+919${String(100_000_000 + idx * 7919 + randomInt(7000)).padStart(9, '0')}`;
  const must = async (
    label: string,
    method: string,
    path: string,
    expect: number,
    body?: unknown,
    token?: string,
  ) => {
    for (let attempt = 0; ; attempt++) {
      const res = await client.call(label, method, path, {
        ...(body !== undefined ? { body } : {}),
        ...(token ? { token } : {}),
      });
      if (res.ok && res.status === expect) return res.body as Record<string, unknown>;
      if (attempt >= 5) {
        throw new Error(
          `${label} failed during set-up: ${res.ok ? `${res.status} ${JSON.stringify(res.body)}` : res.error}`,
        );
      }
      await sleep(200);
    }
  };
  await must('POST /auth/signup', 'POST', '/auth/signup', 201, { mobile, name: `Chaos ${idx}` });
  const sent = await must('POST /auth/send-otp', 'POST', '/auth/send-otp', 200, { mobile });
  const verified = await must('POST /auth/verify-otp', 'POST', '/auth/verify-otp', 200, {
    mobile,
    otp: sent.otp,
  });
  const token = verified.accessToken as string;
  const user: ChaosUser = {
    idx,
    id: (verified.user as { id: string }).id,
    mobile,
    token,
    tier,
    rooms: [],
    quotaHit: false,
  };
  for (let r = 0; r < rooms; r++) {
    const room = await must(
      'POST /chatroom',
      'POST',
      '/chatroom',
      201,
      { name: `room ${r}` },
      token,
    );
    user.rooms.push(room.id as string);
  }
  return user;
}

interface StreamState {
  text: string;
  lastEventId: string | undefined;
  final: { status: string; content: string } | undefined;
}

function handleEvent(
  ctx: LoadContext,
  replyId: string,
  state: StreamState,
  event: { id: string | undefined; event: string; data: unknown },
): boolean {
  if (event.id) state.lastEventId = event.id;
  switch (event.event) {
    case 'delta':
      state.text += (event.data as { text?: string })?.text ?? '';
      return false;
    case 'reset':
      state.text = '';
      return false;
    case 'done': {
      const message = event.data as { status?: string; content?: string };
      state.final = { status: message.status ?? '?', content: message.content ?? '' };
      if ((message.content ?? '') !== state.text) {
        ctx.ledger.issue(
          replyId,
          'mismatch',
          `streamed text ${JSON.stringify(state.text.slice(0, 80))} (${state.text.length} chars) != final content ${JSON.stringify((message.content ?? '').slice(0, 80))} (${(message.content ?? '').length} chars)`,
        );
      }
      return true;
    }
    case 'error':
      state.final = { status: 'failed', content: state.text };
      return true;
    default:
      return false;
  }
}

export class UserDriver {
  constructor(
    private readonly ctx: LoadContext,
    private readonly user: ChaosUser,
  ) {}

  async run(): Promise<void> {
    const { ctx, user } = this;
    // Spread the first prompts out.
    await sleep(between(0, 1500));
    while (Date.now() < ctx.stopAt) {
      if (user.tier === 'basic' && user.quotaHit) {
        // Over the limit: keep knocking now and then (the limit must hold through every fault).
        await sleep(between(1500, 3000));
        if (Date.now() >= ctx.stopAt) break;
        await this.prompt('poll');
        continue;
      }
      if (user.tier === 'basic' && Math.random() < 0.25) {
        // A burst of concurrent sends: the quota must not be overshot by racing requests.
        await Promise.all(Array.from({ length: between(2, 3) }, () => this.prompt('poll')));
      } else {
        await this.prompt(pick<Mode>(['poll', 'stream', 'stream', 'wait', 'sse']));
      }
      await sleep(between(100, 600));
    }
  }

  /** Sends one prompt (retrying with its Idempotency-Key) and follows its reply. */
  private async prompt(mode: Mode): Promise<void> {
    const { ctx, user } = this;
    const roomId = pick(user.rooms);
    const content = `chaos u${user.idx} ${randomUUID()}`;
    const key = randomUUID();
    const deadline = Date.now() + 20_000;
    ctx.ledger.counters.sends++;
    ctx.ledger.modes[mode]++;
    let exclude: number | undefined;
    for (let attempt = 1; ; attempt++) {
      if (attempt > 1) ctx.ledger.counters.retriedSends++;
      const api = ctx.client.pick(exclude);
      const sentAt = Date.now();
      if (mode === 'sse') {
        const outcome = await this.sendStreaming(roomId, content, key, api, sentAt, attempt);
        if (outcome === 'done') return;
        if (outcome === 'stop') return;
      } else {
        const res = await ctx.client.call(
          'POST /chatroom/:id/message',
          'POST',
          `/chatroom/${roomId}/message${mode === 'wait' ? '?wait=5' : ''}`,
          {
            api,
            token: user.token,
            body: { content },
            headers: { 'idempotency-key': key },
            timeoutMs: mode === 'wait' ? 30_000 : 20_000,
          },
        );
        if (res.ok && (res.status === 202 || res.status === 200)) {
          const body = res.body as {
            userMessage: { id: string };
            assistantMessage: { id: string; status: string };
          };
          if (res.headers.get('idempotent-replayed') === 'true')
            ctx.ledger.counters.idempotentReplays++;
          const accepted = this.accept(body, roomId, content, mode, sentAt, api, attempt);
          if (res.status === 200 && FINAL.has(body.assistantMessage.status)) {
            accepted.clientFinal = body.assistantMessage.status;
            accepted.clientFinalAt = Date.now();
          } else if (mode === 'stream') {
            await this.follow(accepted, { text: '', lastEventId: undefined, final: undefined });
          } else {
            await this.poll(accepted);
          }
          await this.maybeRegenerate(accepted);
          return;
        }
        if (res.ok && res.status === 429) {
          if (errorCode(res) === 'QUOTA_EXCEEDED') {
            ctx.ledger.quotaRejections[user.tier]++;
            user.quotaHit = true;
          }
          return;
        }
        if (res.ok && res.status !== 503) return; // counted by Traffic (401, 404, undocumented)
      }
      // 503 or no answer: retry the same request (same Idempotency-Key) elsewhere, for a while.
      exclude = api;
      if (Date.now() > deadline) {
        ctx.ledger.unknownSends.push({ userId: user.id, content });
        return;
      }
      await sleep(between(250, 600));
    }
  }

  /** One attempt of a send with `Accept: text/event-stream`. */
  private async sendStreaming(
    roomId: string,
    content: string,
    key: string,
    api: number,
    sentAt: number,
    attempt: number,
  ): Promise<'done' | 'retry' | 'stop'> {
    const { ctx, user } = this;
    const controller = new AbortController();
    const state: StreamState = { text: '', lastEventId: undefined, final: undefined };
    let accepted: AcceptedReply | undefined;
    let follow: Follow | undefined;
    const hardStop = setTimeout(() => controller.abort(), Math.max(0, ctx.hardStopAt - Date.now()));
    let outcome: Awaited<ReturnType<ApiClient['sse']>>;
    try {
      outcome = await ctx.client.sse(
        'POST /chatroom/:id/message (SSE)',
        'POST',
        `/chatroom/${roomId}/message`,
        {
          onEvent: (event) => {
            if (event.event === 'accepted') {
              const body = event.data as {
                userMessage: { id: string };
                assistantMessage: { id: string };
              };
              accepted = this.accept(body, roomId, content, 'sse', sentAt, api, attempt);
              follow = { replyId: body.assistantMessage.id, api, connected: true, reconnects: 0 };
              ctx.follows.add(follow);
              return;
            }
            if (accepted && handleEvent(ctx, accepted.replyId, state, event)) {
              if (follow) follow.finalAt = Date.now();
              accepted.clientFinal = state.final?.status;
              accepted.clientFinalAt = Date.now();
              controller.abort();
            }
          },
        },
        {
          api,
          token: user.token,
          body: { content },
          headers: { 'idempotency-key': key },
          signal: controller.signal,
        },
      );
    } finally {
      clearTimeout(hardStop);
      if (follow) {
        follow.connected = false;
        ctx.follows.delete(follow);
      }
    }
    if (accepted) {
      if (!state.final) {
        ctx.ledger.counters.streamReconnects++;
        await this.follow(accepted, state, follow);
      }
      await this.maybeRegenerate(accepted);
      return 'done';
    }
    if (outcome.kind === 'http') {
      if (outcome.status === 429) {
        if ((outcome.body as { error?: { code?: string } })?.error?.code === 'QUOTA_EXCEEDED') {
          ctx.ledger.quotaRejections[user.tier]++;
          user.quotaHit = true;
        }
        return 'stop';
      }
      if (outcome.status !== 503) return 'stop';
    }
    if (outcome.kind === 'aborted') return 'stop';
    return 'retry';
  }

  private accept(
    body: { userMessage: { id: string }; assistantMessage: { id: string } },
    roomId: string,
    content: string,
    mode: Mode,
    sentAt: number,
    api: number,
    attempts: number,
  ): AcceptedReply {
    const { ctx, user } = this;
    user.quotaHit = false;
    const replyId = body.assistantMessage.id;
    const existing = ctx.ledger.accepted.get(replyId);
    if (existing) return existing;
    const accepted: AcceptedReply = {
      replyId,
      promptId: body.userMessage.id,
      roomId,
      userId: user.id,
      tier: user.tier,
      kind: 'prompt',
      mode,
      sentAt,
      acceptedAt: Date.now(),
      api,
      attempts,
    };
    ctx.ledger.accepted.set(replyId, accepted);
    ctx.ledger.prompts.set(accepted.promptId, {
      promptId: accepted.promptId,
      userId: user.id,
      tier: user.tier,
      content,
      requested: 1,
      uncertain: 0,
    });
    return accepted;
  }

  /** Polls the reply until it is final (or the client gives up). */
  private async poll(accepted: AcceptedReply): Promise<void> {
    const { ctx, user } = this;
    const deadline = Math.min(ctx.hardStopAt, Date.now() + 90_000);
    while (Date.now() < deadline) {
      await sleep(between(300, 700));
      const res = await ctx.client.call(
        'GET /chatroom/:id/messages/:messageId',
        'GET',
        `/chatroom/${accepted.roomId}/messages/${accepted.replyId}`,
        { token: user.token },
      );
      if (!res.ok || res.status === 503) continue;
      if (res.status === 404) {
        ctx.ledger.issue(
          accepted.replyId,
          'not-found',
          'an accepted reply answered 404 to its poll',
        );
        return;
      }
      const status = (res.body as { status?: string } | undefined)?.status;
      if (res.status === 200 && status && FINAL.has(status)) {
        accepted.clientFinal = status;
        accepted.clientFinalAt = Date.now();
        return;
      }
    }
  }

  /**
   * Follows the reply's SSE stream until `done`/`error`, reconnecting (to any API instance, with
   * `Last-Event-ID`) when the connection drops. A stream that says nothing while the reply is
   * already final in the database is reported as hung.
   */
  private async follow(accepted: AcceptedReply, state: StreamState, resumed?: Follow) {
    const { ctx, user } = this;
    const follow: Follow = resumed ?? {
      replyId: accepted.replyId,
      api: -1,
      connected: false,
      reconnects: 0,
    };
    ctx.follows.add(follow);
    const deadline = Math.min(ctx.hardStopAt, Date.now() + 90_000);
    let exclude: number | undefined = resumed?.api;
    let cancelRequested = false;
    try {
      while (!state.final && Date.now() < deadline) {
        const controller = new AbortController();
        let lastActivity = Date.now();
        let finalInDbAt: number | undefined;
        let hung = false;
        let checking = false;
        const watchdog = setInterval(() => {
          if (checking || Date.now() - lastActivity < 8000) return;
          checking = true;
          ctx.client
            .call(
              'GET /chatroom/:id/messages/:messageId',
              'GET',
              `/chatroom/${accepted.roomId}/messages/${accepted.replyId}`,
              { token: user.token },
            )
            .then((res) => {
              const status = res.ok ? (res.body as { status?: string })?.status : undefined;
              if (status && FINAL.has(status)) finalInDbAt ??= Date.now();
              if (finalInDbAt !== undefined && Date.now() - finalInDbAt > 20_000) {
                hung = true;
                controller.abort();
              }
            })
            .finally(() => {
              checking = false;
            });
        }, 2000);
        const hardStop = setTimeout(() => controller.abort(), Math.max(0, deadline - Date.now()));
        const api = ctx.client.pick(exclude);
        follow.api = api;
        follow.connected = true;
        ctx.ledger.counters.streamsOpened++;
        const outcome = await ctx.client.sse(
          'GET /chatroom/:id/messages/:messageId/stream',
          'GET',
          `/chatroom/${accepted.roomId}/messages/${accepted.replyId}/stream`,
          {
            onEvent: (event) => {
              lastActivity = Date.now();
              if (
                event.event === 'delta' &&
                accepted.tier === 'pro' &&
                !cancelRequested &&
                Math.random() < 0.01
              ) {
                cancelRequested = true;
                void this.cancel(accepted);
              }
              if (handleEvent(ctx, accepted.replyId, state, event)) {
                follow.finalAt = Date.now();
                accepted.clientFinal = state.final?.status;
                accepted.clientFinalAt = Date.now();
                controller.abort();
              }
            },
            onActivity: () => {
              lastActivity = Date.now();
            },
          },
          {
            api,
            token: user.token,
            signal: controller.signal,
            ...(state.lastEventId ? { headers: { 'last-event-id': state.lastEventId } } : {}),
          },
        );
        clearInterval(watchdog);
        clearTimeout(hardStop);
        follow.connected = false;
        if (state.final) break;
        if (hung) {
          ctx.ledger.issue(
            accepted.replyId,
            'hung',
            `the reply was final in the database for 20 s but its stream (API ${api}, Last-Event-ID ${state.lastEventId ?? '-'}) sent neither done nor error`,
          );
          break;
        }
        if (outcome.kind === 'http') {
          if (outcome.status === 404) {
            ctx.ledger.issue(
              accepted.replyId,
              'not-found',
              'an accepted reply answered 404 to /stream',
            );
            return;
          }
          if (outcome.status !== 503) break;
        }
        if (outcome.kind === 'aborted') break;
        // Dropped (API killed, Redis gone) or ended without a final event: reconnect elsewhere.
        follow.reconnects++;
        ctx.ledger.counters.streamReconnects++;
        exclude = outcome.kind === 'connection' ? api : undefined;
        await sleep(between(200, 500));
      }
    } finally {
      ctx.follows.delete(follow);
    }
    if (!state.final) {
      if (Date.now() >= ctx.hardStopAt) {
        ctx.ledger.issue(accepted.replyId, 'gave-up', 'no final event before the end of the run');
        return;
      }
      await this.poll(accepted);
    }
  }

  private async cancel(accepted: AcceptedReply) {
    this.ctx.ledger.counters.cancels++;
    await this.ctx.client.call(
      'POST /chatroom/:id/messages/:messageId/cancel',
      'POST',
      `/chatroom/${accepted.roomId}/messages/${accepted.replyId}/cancel`,
      { token: this.user.token },
    );
  }

  /** Now and then a Pro user asks for a new reply to the same prompt (two generations). */
  private async maybeRegenerate(accepted: AcceptedReply) {
    const { ctx, user } = this;
    if (user.tier !== 'pro' || Math.random() >= 0.04 || Date.now() >= ctx.stopAt) return;
    const expectation = ctx.ledger.prompts.get(accepted.promptId);
    if (!expectation) return;
    ctx.ledger.counters.regenerations++;
    const sentAt = Date.now();
    const res = await ctx.client.call(
      'POST /chatroom/:id/messages/:messageId/regenerate',
      'POST',
      `/chatroom/${accepted.roomId}/messages/${accepted.replyId}/regenerate`,
      { token: user.token },
    );
    if (res.ok && res.status === 202) {
      const body = res.body as { assistantMessage: { id: string } };
      expectation.requested++;
      const regenerated: AcceptedReply = {
        ...accepted,
        replyId: body.assistantMessage.id,
        kind: 'regenerate',
        mode: 'poll',
        sentAt,
        acceptedAt: Date.now(),
        api: res.api,
        attempts: 1,
      };
      delete regenerated.clientFinal;
      delete regenerated.clientFinalAt;
      ctx.ledger.accepted.set(regenerated.replyId, regenerated);
      await this.poll(regenerated);
    } else if (!res.ok || res.status >= 500) {
      // No answer: the regeneration may or may not have been stored.
      expectation.uncertain++;
      ctx.ledger.counters.regenerationsUncertain++;
    }
  }
}
