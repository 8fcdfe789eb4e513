import { setTimeout as sleep } from 'node:timers/promises';
import { estimateTokens } from './history.js';
import { LlmError, type LlmEvent, type LlmProvider, type LlmRequest } from './provider.js';

export interface OfflineProviderOptions {
  /** Pause before each word, in milliseconds; 0 streams as fast as possible. Default 15. */
  delayMs?: number;
}

const SUMMARY_WORDS = 24;

/**
 * A deterministic stand-in for Gemini that needs no key and no network: the same request always
 * gets the same reply, and every reply says it comes from the offline model.
 */
export class OfflineProvider implements LlmProvider {
  readonly name = 'offline' as const;
  /** Stored as the message's `model`, so a reply is recognisable as the offline model's. */
  readonly model = 'offline-echo-1';
  readonly #delayMs: number;

  constructor(options: OfflineProviderOptions = {}) {
    this.#delayMs = Math.max(0, options.delayMs ?? 15);
  }

  async *stream(request: LlmRequest): AsyncGenerator<LlmEvent, void, undefined> {
    const { signal } = request;
    const reply = offlineReply(request);
    for (const word of reply.match(/\S+\s*/g) ?? []) {
      if (this.#delayMs > 0) {
        await sleep(this.#delayMs, undefined, { signal }).catch(() => undefined);
      }
      if (signal.aborted) {
        throw new LlmError('aborted', 'The offline reply was cancelled', { cause: signal.reason });
      }
      yield { type: 'delta', text: word };
    }
    const promptTokens = estimateTokens(
      [request.systemInstruction ?? '', ...request.history.map((t) => t.text), request.prompt].join(
        '\n',
      ),
    );
    const completionTokens = estimateTokens(reply);
    yield {
      type: 'done',
      finishReason: 'STOP',
      usage: { promptTokens, completionTokens, totalTokens: promptTokens + completionTokens },
      model: this.model,
    };
  }
}

function offlineReply(request: LlmRequest): string {
  const words = request.prompt.trim().split(/\s+/).filter(Boolean);
  const summary =
    words.slice(0, SUMMARY_WORDS).join(' ') + (words.length > SUMMARY_WORDS ? ' …' : '');
  const turns = request.history.length;
  const context =
    turns === 0
      ? 'This is the first message of the conversation.'
      : `I can see ${turns} earlier ${turns === 1 ? 'turn' : 'turns'} of this conversation.`;
  const echo =
    words.length === 0
      ? 'Your message was empty.'
      : `You wrote ${words.length} ${words.length === 1 ? 'word' : 'words'}: “${summary}”.`;
  return (
    'This reply comes from the built-in offline model (offline-echo-1), because no Gemini API key ' +
    `is configured. ${echo} ${context}`
  );
}
