import { GeminiProvider } from './gemini-provider.js';
import { OfflineProvider } from './offline-provider.js';
import type { LlmProvider } from './provider.js';

export { GeminiProvider, type GeminiProviderOptions } from './gemini-provider.js';
export { estimateTokens, fitHistory } from './history.js';
export { OfflineProvider, type OfflineProviderOptions } from './offline-provider.js';
export {
  LlmError,
  type LlmErrorKind,
  type LlmErrorOptions,
  type LlmEvent,
  type LlmProvider,
  type LlmRequest,
  type LlmTurn,
  type LlmUsage,
} from './provider.js';

export interface LlmProviderConfig {
  provider: 'gemini' | 'offline';
  geminiApiKey?: string | undefined;
  geminiModel: string;
  geminiBaseUrl?: string | undefined;
  timeoutMs: number;
}

export interface CreateLlmProviderOptions {
  /** Word delay of the offline provider, in milliseconds. Default 15. */
  offlineDelayMs?: number;
}

export function createLlmProvider(
  config: LlmProviderConfig,
  options: CreateLlmProviderOptions = {},
): LlmProvider {
  if (config.provider === 'offline') {
    return new OfflineProvider(
      options.offlineDelayMs !== undefined ? { delayMs: options.offlineDelayMs } : {},
    );
  }
  if (!config.geminiApiKey) {
    throw new Error('GEMINI_API_KEY is required when LLM_PROVIDER is gemini');
  }
  return new GeminiProvider({
    apiKey: config.geminiApiKey,
    model: config.geminiModel,
    timeoutMs: config.timeoutMs,
    ...(config.geminiBaseUrl ? { baseUrl: config.geminiBaseUrl } : {}),
  });
}
