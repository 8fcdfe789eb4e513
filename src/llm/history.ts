import type { LlmTurn } from './provider.js';

/** A rough token count (about four characters per token), at least 1. */
export function estimateTokens(text: string): number {
  return Math.max(1, Math.ceil(text.length / 4));
}

/**
 * The newest turns whose estimated tokens fit `budgetTokens`, oldest first. The run is contiguous
 * (an older turn is never kept once a newer one was dropped), and a leading `model` turn is dropped
 * because Gemini expects the conversation to open with a `user` turn.
 */
export function fitHistory(
  turns: LlmTurn[],
  budgetTokens: number,
  estimate: (text: string) => number = estimateTokens,
): LlmTurn[] {
  let used = 0;
  let start = turns.length;
  while (start > 0) {
    const turn = turns[start - 1];
    if (!turn) break;
    const cost = estimate(turn.text);
    if (used + cost > budgetTokens) break;
    used += cost;
    start--;
  }
  while (start < turns.length && turns[start]?.role === 'model') start++;
  return turns.slice(start);
}
