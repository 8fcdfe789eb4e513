/**
 * How long something asynchronous may take to reach another part of the system (a pub/sub
 * message, a NOTIFY). It arrives in about a millisecond here; the margin is for a loaded CI
 * machine, and is still far below any cache TTL, so passing within it shows the message arrived.
 */
export const DEADLINE_MS = 1000;

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Calls `attempt` until `done` accepts its result (every 5 ms, for at most `timeoutMs`). */
export async function until<T>(
  attempt: () => Promise<T> | T,
  done: (value: T) => boolean,
  timeoutMs = DEADLINE_MS,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await attempt();
    if (done(value)) return value;
    if (Date.now() > deadline) {
      throw new Error(`not within ${timeoutMs} ms; last: ${JSON.stringify(value)}`);
    }
    await sleep(5);
  }
}
