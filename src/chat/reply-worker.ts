import { type Job, Worker } from 'bullmq';
import type { QuotaService } from '../billing/quota-service.js';
import type { MessageRow } from '../db/schema/index.js';
import type { Clock } from '../lib/clock.js';
import type { Logger } from '../lib/logger.js';
import type { Metrics } from '../lib/metrics.js';
import { createWorkerRedis, type Redis } from '../lib/redis.js';
import {
  fitHistory,
  LlmError,
  type LlmProvider,
  type LlmTurn,
  type LlmUsage,
} from '../llm/index.js';
import { bullPrefix, REPLY_QUEUE, type ReplyJob } from '../queue/queues.js';
import type { CancelBus } from './cancel-bus.js';
import { type ChatRepository, FINAL_STATUSES, type FinalOutcome } from './chat-repository.js';
import { toMessageDto } from './message-dto.js';
import type { ReplyStreams } from './reply-stream.js';

export interface ReplyWorkerOptions {
  redisUrl: string;
  redisPrefix: string;
  concurrency: number;
  historyTokenBudget: number;
  /** First retry delay; doubles each attempt (with jitter), capped at 30 s. Default 1000. */
  retryBaseDelayMs?: number;
  /** BullMQ lock duration: how long a killed worker's job waits before another takes it. */
  lockDurationMs?: number;
  stalledIntervalMs?: number;
  /** How often a streaming reply's `updated_at` is refreshed, so the sweeper sees it is alive. */
  heartbeatMs?: number;
  chat: ChatRepository;
  streams: ReplyStreams;
  llm: LlmProvider;
  quota: QuotaService;
  cancelBus: CancelBus;
  clock: Clock;
  logger: Logger;
  metrics: Metrics;
}

/** Error codes recorded on a failed reply (`message.error.code`). */
const FAILURE_CODES: Record<LlmError['kind'], string> = {
  rate_limited: 'LLM_RATE_LIMITED',
  server: 'LLM_UNAVAILABLE',
  network: 'LLM_UNAVAILABLE',
  timeout: 'LLM_TIMEOUT',
  client: 'LLM_REJECTED',
  blocked: 'BLOCKED',
  aborted: 'CANCELLED',
};

const HISTORY_ROWS = 200;
const MAX_DELAY_MS = 30_000;

/**
 * Generates replies from the `replies` queue. Every reply is written once: the final state is
 * guarded by status in PostgreSQL, so a retried, stalled or duplicated job cannot write twice.
 */
export class ReplyWorker {
  private worker: Worker<ReplyJob> | undefined;
  private connection: Redis | undefined;
  private subscriber: Redis | undefined;
  private readonly active = new Map<string, AbortController>();
  private readonly cancelled = new Set<string>();

  constructor(private readonly o: ReplyWorkerOptions) {}

  async start(): Promise<void> {
    this.connection = createWorkerRedis(this.o.redisUrl);
    this.subscriber = createWorkerRedis(this.o.redisUrl);
    this.subscriber.on('error', () => {});
    await this.o.cancelBus.subscribe(this.subscriber, (messageId) => this.abort(messageId));
    const base = this.o.retryBaseDelayMs ?? 1000;
    this.worker = new Worker<ReplyJob>(REPLY_QUEUE, (job) => this.process(job), {
      connection: this.connection,
      prefix: bullPrefix(this.o.redisPrefix),
      concurrency: this.o.concurrency,
      lockDuration: this.o.lockDurationMs ?? 30_000,
      stalledInterval: this.o.stalledIntervalMs ?? 30_000,
      maxStalledCount: 3,
      settings: {
        backoffStrategy: (attemptsMade: number, _type?: string, error?: Error) => {
          if (error instanceof LlmError && error.retryAfterMs !== undefined) {
            return error.retryAfterMs + Math.floor(Math.random() * 250);
          }
          const exponential = Math.min(MAX_DELAY_MS, base * 2 ** Math.max(0, attemptsMade - 1));
          return Math.round(exponential * (0.5 + Math.random()));
        },
      },
    });
    this.worker.on('error', (error) => {
      this.o.logger.warn({ err: error.message }, 'reply worker error');
    });
    await this.worker.waitUntilReady();
  }

  /** Stops taking jobs and waits for active ones up to `timeoutMs`; the rest are left to stall. */
  async close(timeoutMs = 20_000): Promise<void> {
    if (!this.worker) return;
    const worker = this.worker;
    this.worker = undefined;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), timeoutMs);
    });
    const outcome = await Promise.race([worker.close(), timedOut]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      this.o.logger.warn(
        { active: this.active.size },
        'replies still active at shutdown; left to stall',
      );
      await worker.close(true).catch(() => {});
    }
    this.subscriber?.disconnect();
    this.connection?.disconnect();
  }

  private abort(messageId: string) {
    const controller = this.active.get(messageId);
    if (!controller) return;
    this.cancelled.add(messageId);
    controller.abort(new LlmError('aborted', 'cancelled by the user'));
  }

  private isLastAttempt(job: Job<ReplyJob>) {
    return job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
  }

  private async process(job: Job<ReplyJob>): Promise<string> {
    const { messageId } = job.data;
    // Almost always one statement starts the attempt and returns the reply, its prompt and room.
    let begun = await this.o.chat.startReply(messageId, this.o.clock.now());
    if (!begun) {
      // It did not start: find out why, as separate reads (final, cancelled, prompt gone, a race).
      const context = await this.o.chat.findReplyContext(messageId);
      const reply = context?.reply;
      if (reply?.role !== 'assistant' || FINAL_STATUSES.includes(reply.status)) {
        return 'skipped';
      }
      if (reply.cancelRequestedAt) return this.finishCancelled(reply.id);
      const { prompt, room } = context!;
      if (!prompt || !room) {
        await this.fail(reply.id, '', 'INTERNAL', 'The prompt of this reply no longer exists');
        return 'failed';
      }
      const started = await this.o.chat.startAttempt(reply.id, this.o.clock.now());
      if (!started) return 'skipped';
      begun = { reply: started, prompt, room };
    }
    const { reply, prompt, room } = begun;
    if (reply.cancelRequestedAt) return this.finishCancelled(reply.id);
    if (reply.attempts > 1) await this.o.streams.append(reply.id, { type: 'reset', data: {} });

    const rows = await this.o.chat.history(prompt, HISTORY_ROWS);
    const turns: LlmTurn[] = [];
    for (const row of rows) {
      const turn: LlmTurn = { role: row.role === 'user' ? 'user' : 'model', text: row.content };
      // A regenerated prompt has several replies: the newest one carries the conversation on
      // (and Gemini rejects consecutive turns of the same role).
      if (turn.role === 'model' && turns.at(-1)?.role === 'model') turns[turns.length - 1] = turn;
      else turns.push(turn);
    }
    const history = fitHistory(turns, this.o.historyTokenBudget);

    const controller = new AbortController();
    this.active.set(reply.id, controller);
    const heartbeat = setInterval(() => {
      this.o.chat.touch(reply.id, this.o.clock.now()).catch(() => {});
    }, this.o.heartbeatMs ?? 60_000);
    heartbeat.unref();
    const startedAt = performance.now();
    let text = '';
    let model = this.o.llm.model;
    let usage: LlmUsage | null = null;
    let finishReason = 'STOP';
    try {
      for await (const event of this.o.llm.stream({
        history,
        prompt: prompt.content,
        systemInstruction: room.systemInstruction,
        signal: controller.signal,
      })) {
        if (event.type === 'delta') {
          if (text === '') {
            this.o.metrics.llmFirstToken.observe({ model }, (performance.now() - startedAt) / 1000);
          }
          text += event.text;
          await this.o.streams.append(reply.id, { type: 'delta', data: { text: event.text } });
        } else {
          model = event.model;
          usage = event.usage;
          finishReason = event.finishReason;
        }
      }
      const { llmTotal, llmTokens } = this.o.metrics;
      llmTotal.observe({ model }, (performance.now() - startedAt) / 1000);
      if (usage) {
        llmTokens.inc({ model, kind: 'prompt' }, usage.promptTokens);
        llmTokens.inc({ model, kind: 'completion' }, usage.completionTokens);
      }
      await this.finish(reply.id, {
        status: 'completed',
        content: text,
        model,
        usage,
        finishReason,
      });
      this.o.metrics.observeReply('completed', model, performance.now() - startedAt);
      return 'completed';
    } catch (error) {
      return await this.handleFailure(job, reply, error, text, model, startedAt);
    } finally {
      clearInterval(heartbeat);
      this.active.delete(reply.id);
      this.cancelled.delete(reply.id);
    }
  }

  private async handleFailure(
    job: Job<ReplyJob>,
    reply: MessageRow,
    error: unknown,
    text: string,
    model: string,
    startedAt: number,
  ): Promise<string> {
    const elapsed = performance.now() - startedAt;
    if (this.cancelled.has(reply.id) || (error instanceof LlmError && error.kind === 'aborted')) {
      await this.finish(reply.id, { status: 'cancelled', content: text, model });
      this.o.metrics.observeReply('cancelled', model, elapsed);
      return 'cancelled';
    }
    if (error instanceof LlmError && error.kind === 'blocked') {
      const reason = error.blockReason ?? 'SAFETY';
      await this.finish(reply.id, {
        status: 'blocked',
        content: text,
        model,
        finishReason: reason,
        error: {
          code: 'BLOCKED',
          message: `The model's safety filters blocked this reply (${reason})`,
        },
      });
      this.o.metrics.observeReply('blocked', model, elapsed);
      return 'blocked';
    }
    const retryable = !(error instanceof LlmError) || error.retryable;
    if (retryable && !this.isLastAttempt(job)) {
      this.o.logger.warn(
        { messageId: reply.id, attempt: job.attemptsMade + 1, err: (error as Error).message },
        'reply attempt failed; will retry',
      );
      await this.o.chat.requeue(reply.id, this.o.clock.now());
      throw error;
    }
    const code = error instanceof LlmError ? FAILURE_CODES[error.kind] : 'INTERNAL';
    const message =
      error instanceof LlmError
        ? `The model could not answer (${error.kind}${error.status ? ` ${error.status}` : ''})`
        : 'The reply could not be generated because of an internal error';
    this.o.logger.error({ messageId: reply.id, err: error, code }, 'reply failed');
    await this.fail(reply.id, text, code, message, model);
    this.o.metrics.observeReply('failed', model, elapsed);
    return 'failed';
  }

  private async fail(
    messageId: string,
    content: string,
    code: string,
    message: string,
    model?: string,
  ) {
    const row = await this.o.chat.finalize(
      messageId,
      { status: 'failed', content, model: model ?? null, error: { code, message } },
      this.o.clock.now(),
    );
    if (!row) return;
    // Not the user's fault: the prompt goes back to their daily quota.
    const released = await this.o.chat.releaseQuotaDay(messageId);
    if (released) {
      await this.o.quota.release(released.userId, released.quotaDay).catch((err: unknown) => {
        this.o.logger.warn(
          { messageId, err: (err as Error).message },
          'could not give the prompt back',
        );
      });
    }
    await this.o.streams.append(messageId, { type: 'error', data: { code, message } });
  }

  /**
   * A reply cancelled before this attempt generated anything: it keeps the text an earlier
   * attempt streamed (a worker killed mid-reply), which is what its viewers saw.
   */
  private async finishCancelled(messageId: string): Promise<string> {
    const content = await this.o.streams.textSoFar(messageId).catch(() => '');
    await this.finish(messageId, { status: 'cancelled', content });
    return 'cancelled';
  }

  private async finish(messageId: string, outcome: FinalOutcome) {
    const row = await this.o.chat.finalize(messageId, outcome, this.o.clock.now());
    if (row)
      await this.o.streams.append(messageId, { type: 'done', data: { ...toMessageDto(row) } });
    return row;
  }
}
