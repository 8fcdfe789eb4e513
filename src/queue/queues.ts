import { Queue, type QueueOptions } from 'bullmq';
import type { Redis } from '../lib/redis.js';

export const REPLY_QUEUE = 'replies';
export const MAINTENANCE_QUEUE = 'maintenance';
export const SWEEP_SCHEDULER = 'sweep-stale-replies';

export interface ReplyJob {
  /** The assistant message to generate; also the job id, so a message is queued at most once. */
  messageId: string;
}

/** BullMQ keys live under REDIS_PREFIX too: `<prefix>bull:<queue>:…`. */
export function bullPrefix(redisPrefix: string): string {
  return `${redisPrefix}bull`;
}

/** Attempts per reply: transient provider failures are retried with backoff. */
export const REPLY_ATTEMPTS = 5;

export function replyJobOptions() {
  return {
    attempts: REPLY_ATTEMPTS,
    backoff: { type: 'reply' },
    removeOnComplete: { age: 3600, count: 10_000 },
    removeOnFail: { age: 24 * 3600 },
  };
}

export function createReplyQueue(connection: Redis, redisPrefix: string): Queue<ReplyJob> {
  const options: QueueOptions = { connection, prefix: bullPrefix(redisPrefix) };
  return new Queue<ReplyJob>(REPLY_QUEUE, options);
}

export function createMaintenanceQueue(connection: Redis, redisPrefix: string): Queue {
  return new Queue(MAINTENANCE_QUEUE, { connection, prefix: bullPrefix(redisPrefix) });
}
