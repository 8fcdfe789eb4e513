import { collectDefaultMetrics, Histogram, Registry } from 'prom-client';

/** One registry per process (or per app in tests), so instances never share counters. */
export class Metrics {
  readonly registry = new Registry();
  readonly httpDuration: Histogram<'method' | 'route' | 'status'>;
  readonly replyDuration: Histogram<'outcome' | 'model'>;

  constructor() {
    collectDefaultMetrics({ register: this.registry });
    this.httpDuration = new Histogram({
      name: 'http_request_duration_seconds',
      help: 'HTTP request duration by route template and status code',
      labelNames: ['method', 'route', 'status'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers: [this.registry],
    });
    this.replyDuration = new Histogram({
      name: 'reply_job_duration_seconds',
      help: 'Time to generate a reply, by outcome and model',
      labelNames: ['outcome', 'model'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers: [this.registry],
    });
  }

  observeReply(outcome: string, model: string, elapsedMs: number) {
    this.replyDuration.observe({ outcome, model }, elapsedMs / 1000);
  }
}
