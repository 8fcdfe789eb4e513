import { ReplyWorker } from './chat/reply-worker.js';
import { Sweeper } from './chat/sweeper.js';
import type { Container } from './container.js';

export interface WorkerTuning {
  /** BullMQ lock duration and stalled-check interval (ms); shorter in tests. */
  lockDurationMs?: number;
  stalledIntervalMs?: number;
}

export interface RunningWorker {
  replies: ReplyWorker;
  sweeper: Sweeper;
  close(timeoutMs?: number): Promise<void>;
}

/** Starts the reply worker and the sweeper of stale replies. */
export async function startWorker(
  container: Container,
  tuning: WorkerTuning = {},
): Promise<RunningWorker> {
  const { config } = container;
  const replies = new ReplyWorker({
    redisUrl: config.redisUrl,
    redisPrefix: config.redisPrefix,
    concurrency: config.workerConcurrency,
    historyTokenBudget: config.llm.historyTokenBudget,
    retryBaseDelayMs: config.llm.retryBaseMs,
    lockDurationMs: tuning.lockDurationMs ?? config.workerLockSeconds * 1000,
    stalledIntervalMs:
      tuning.stalledIntervalMs ?? Math.min(30_000, config.workerLockSeconds * 1000),
    heartbeatMs: Math.max(1000, (config.replyStaleSeconds * 1000) / 3),
    chat: container.chatRepository,
    streams: container.streams,
    llm: container.llm,
    quota: container.quota,
    cancelBus: container.cancelBus,
    clock: container.clock,
    logger: container.logger,
    metrics: container.metrics,
  });
  const sweeper = new Sweeper({
    redisUrl: config.redisUrl,
    redisPrefix: config.redisPrefix,
    intervalMs: config.sweepIntervalSeconds * 1000,
    staleMs: config.replyStaleSeconds * 1000,
    chat: container.chatRepository,
    replyQueue: container.replyQueue,
    maintenanceQueue: container.maintenanceQueue,
    clock: container.clock,
    logger: container.logger,
  });
  await replies.start();
  await sweeper.start();
  return {
    replies,
    sweeper,
    close: async (timeoutMs = 20_000) => {
      await sweeper.close();
      await replies.close(timeoutMs);
    },
  };
}
