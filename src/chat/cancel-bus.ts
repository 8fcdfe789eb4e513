import type { Redis, RedisKeys } from '../lib/redis.js';

/**
 * Tells every worker process to stop a reply now (Redis pub/sub). The durable record of the
 * request is the message's `cancel_requested_at`; this only makes the stop immediate.
 */
export class CancelBus {
  private readonly channel: string;

  constructor(
    private readonly redis: Redis,
    keys: RedisKeys,
  ) {
    this.channel = keys.key('cancel');
  }

  async publish(messageId: string): Promise<void> {
    await this.redis.publish(this.channel, messageId);
  }

  /** Subscribes on a dedicated connection (a subscribed connection can do nothing else). */
  async subscribe(subscriber: Redis, onCancel: (messageId: string) => void): Promise<void> {
    subscriber.on('message', (channel: string, messageId: string) => {
      if (channel === this.channel) onCancel(messageId);
    });
    await subscriber.subscribe(this.channel);
  }
}
