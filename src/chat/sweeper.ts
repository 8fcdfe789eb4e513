import { type Queue, Worker } from 'bullmq';
import type { Clock } from '../lib/clock.js';
import type { Logger } from '../lib/logger.js';
import { createWorkerRedis, type Redis } from '../lib/redis.js';
import {
  bullPrefix,
  MAINTENANCE_QUEUE,
  type ReplyJob,
  replyJobOptions,
  SWEEP_SCHEDULER,
} from '../queue/queues.js';
import type { ChatRepository } from './chat-repository.js';

const LIVE_STATES = new Set(['waiting', 'active', 'delayed', 'prioritized', 'waiting-children']);

export interface SweeperOptions {
  redisUrl: string;
  redisPrefix: string;
  /** How often the sweep runs. */
  intervalMs: number;
  /** A pending reply untouched this long, with no live job, is queued again. */
  staleMs: number;
  chat: ChatRepository;
  replyQueue: Queue<ReplyJob>;
  maintenanceQueue: Queue;
  clock: Clock;
  logger: Logger;
}

/**
 * Finds replies that PostgreSQL says are pending but that no live job will ever finish (Redis
 * flushed or restarted empty, a job removed or failed) and queues them again. Runs as a BullMQ
 * job scheduler, so one worker sweeps at a time however many run; each worker re-registers the
 * scheduler on every interval, so it comes back after a flush too.
 */
export class Sweeper {
  private worker: Worker | undefined;
  private connection: Redis | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly o: SweeperOptions) {}

  async start(): Promise<void> {
    this.connection = createWorkerRedis(this.o.redisUrl);
    this.worker = new Worker(MAINTENANCE_QUEUE, async () => this.sweep(), {
      connection: this.connection,
      prefix: bullPrefix(this.o.redisPrefix),
      concurrency: 1,
    });
    this.worker.on('error', (error) => this.o.logger.warn({ err: error.message }, 'sweeper error'));
    await this.worker.waitUntilReady();
    await this.schedule();
    this.timer = setInterval(() => {
      this.schedule().catch(() => {});
    }, this.o.intervalMs);
    this.timer.unref();
  }

  private async schedule() {
    await this.o.maintenanceQueue.upsertJobScheduler(
      SWEEP_SCHEDULER,
      { every: this.o.intervalMs },
      { name: 'sweep', opts: { removeOnComplete: true, removeOnFail: 100 } },
    );
  }

  /** One pass; returns how many replies were queued again. */
  async sweep(): Promise<number> {
    const olderThan = new Date(this.o.clock.now().getTime() - this.o.staleMs);
    const stale = await this.o.chat.stalePending(olderThan, 500);
    let requeued = 0;
    for (const { id } of stale) {
      const job = await this.o.replyQueue.getJob(id);
      const state = job ? await job.getState() : 'missing';
      if (LIVE_STATES.has(state)) continue;
      if (job) await job.remove().catch(() => {});
      await this.o.replyQueue.add('reply', { messageId: id }, { ...replyJobOptions(), jobId: id });
      requeued++;
    }
    if (requeued > 0) this.o.logger.warn({ requeued }, 'sweeper queued lost replies again');
    return requeued;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.worker?.close();
    this.connection?.disconnect();
  }
}
