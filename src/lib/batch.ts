import DataLoader from 'dataloader';

/**
 * Gathers the calls made while this process handles one round of I/O and runs them as one
 * batch: under load, many requests arrive in one round, and one query or one Redis pipeline for
 * all of them costs little more than for one. The batch starts after the poll phase
 * (`setImmediate`), so it waits for no timer, only for the requests already read; DataLoader's
 * default (after the current microtasks) would gather one request's calls only.
 *
 * `run` answers each item in order, with an Error for an item that failed on its own. A batch is
 * at most `maxBatchSize` items (more go out as several batches at once): the callers of one batch
 * all resume in one task when it returns, and a thousand of them would hold the event loop.
 */
export function batched<I, O>(
  run: (items: readonly I[]) => Promise<ReadonlyArray<O | Error>>,
  maxBatchSize = 64,
): (item: I) => Promise<O> {
  const loader = new DataLoader<I, O, I>(run, {
    cache: false,
    batchScheduleFn: (callback) => setImmediate(callback),
    maxBatchSize,
  });
  return (item) => loader.load(item);
}
