import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';

interface QueueLike {
  name: string;
  getJobCounts(...states: string[]): Promise<Record<string, number>>;
}

const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

/**
 * The service's Prometheus metrics. One registry per process (or per app in tests), so
 * instances never share counters.
 */
export class Metrics {
  readonly registry = new Registry();
  readonly httpDuration: Histogram<'method' | 'route' | 'status'>;
  readonly replyDuration: Histogram<'outcome' | 'model'>;
  readonly llmFirstToken: Histogram<'model'>;
  readonly llmTotal: Histogram<'model'>;
  readonly llmTokens: Counter<'model' | 'kind'>;
  readonly errors: Counter<'code'>;
  readonly quotaRefusals: Counter<'tier'>;
  readonly webhookEvents: Counter<'type' | 'outcome'>;
  readonly queueDepth: Gauge<'queue' | 'state'>;
  private queues: QueueLike[] = [];

  constructor() {
    collectDefaultMetrics({ register: this.registry });
    const registers = [this.registry];
    this.httpDuration = new Histogram({
      name: 'http_request_duration_seconds',
      help: 'HTTP request duration by route template and status code',
      labelNames: ['method', 'route', 'status'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers,
    });
    this.replyDuration = new Histogram({
      name: 'reply_job_duration_seconds',
      help: 'Time a worker spent on a reply attempt that ended, by outcome and model',
      labelNames: ['outcome', 'model'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.llmFirstToken = new Histogram({
      name: 'llm_time_to_first_token_seconds',
      help: 'From the model request to its first text, by model',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.llmTotal = new Histogram({
      name: 'llm_response_seconds',
      help: 'From the model request to its last text, by model',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.llmTokens = new Counter({
      name: 'llm_tokens_total',
      help: 'Tokens reported by the model, by model and kind (prompt, completion)',
      labelNames: ['model', 'kind'],
      registers,
    });
    this.errors = new Counter({
      name: 'api_errors_total',
      help: 'Error responses by error code',
      labelNames: ['code'],
      registers,
    });
    this.quotaRefusals = new Counter({
      name: 'quota_refusals_total',
      help: 'Prompts refused because the daily quota was used up, by tier',
      labelNames: ['tier'],
      registers,
    });
    this.webhookEvents = new Counter({
      name: 'stripe_webhook_events_total',
      help: 'Stripe webhook deliveries by event type and outcome',
      labelNames: ['type', 'outcome'],
      registers,
    });
    const queues = () => this.queues;
    const states = ['waiting', 'active', 'delayed', 'failed', 'completed', 'prioritized'];
    this.queueDepth = new Gauge({
      name: 'queue_jobs',
      help: 'Jobs in a queue by state, read when metrics are scraped',
      labelNames: ['queue', 'state'],
      registers,
      async collect() {
        for (const queue of queues()) {
          const counts = await queue.getJobCounts(...states).catch(() => undefined);
          if (!counts) continue;
          for (const state of states) this.set({ queue: queue.name, state }, counts[state] ?? 0);
        }
      },
    });
  }

  observeReply(outcome: string, model: string, elapsedMs: number) {
    this.replyDuration.observe({ outcome, model }, elapsedMs / 1000);
  }

  /** Queues whose depth is read at scrape time (one Redis round trip per queue). */
  watchQueues(queues: QueueLike[]) {
    this.queues = queues;
  }
}
