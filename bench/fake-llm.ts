import { setTimeout as sleep } from 'node:timers/promises';
import { LlmError, type LlmEvent, type LlmProvider, type LlmRequest } from '../src/llm/provider.js';

export interface FakeLlmOptions {
  /** Text deltas per reply; 1 with `durationMs` 0 is the instant model. */
  deltas: number;
  /** Time from the request to the last delta; the deltas are spread evenly over it. */
  durationMs: number;
}

/**
 * A model that costs nothing: the instant one answers in the same tick, the paced one streams
 * `deltas` deltas evenly over `durationMs` (timed against the start, so the pace does not drift
 * when the event loop is busy).
 */
export class FakeLlm implements LlmProvider {
  readonly name = 'offline' as const;
  readonly model = 'bench-fake';

  constructor(private readonly options: FakeLlmOptions) {}

  async *stream(request: LlmRequest): AsyncIterable<LlmEvent> {
    const { deltas, durationMs } = this.options;
    const count = Math.max(1, deltas);
    const start = performance.now();
    for (let i = 1; i <= count; i++) {
      if (durationMs > 0) {
        const due = start + (durationMs * i) / count;
        const wait = due - performance.now();
        if (wait > 0) {
          try {
            await sleep(wait, undefined, { signal: request.signal });
          } catch (error) {
            throw new LlmError('aborted', 'cancelled', { cause: error });
          }
        }
      }
      if (request.signal.aborted) throw new LlmError('aborted', 'cancelled');
      yield { type: 'delta', text: count === 1 ? 'ok' : `w${i} ` };
    }
    yield {
      type: 'done',
      finishReason: 'STOP',
      model: this.model,
      usage: { promptTokens: 1, completionTokens: count, totalTokens: count + 1 },
    };
  }
}

/** The model that BENCH_LLM_DELTAS / BENCH_LLM_DURATION_MS describe (instant by default). */
export function fakeLlmFromEnv(env: NodeJS.ProcessEnv): FakeLlm {
  const deltas = Number(env.BENCH_LLM_DELTAS ?? 1);
  const durationMs = Number(env.BENCH_LLM_DURATION_MS ?? 0);
  return new FakeLlm({
    deltas: Number.isFinite(deltas) && deltas > 0 ? deltas : 1,
    durationMs: Number.isFinite(durationMs) && durationMs > 0 ? durationMs : 0,
  });
}
