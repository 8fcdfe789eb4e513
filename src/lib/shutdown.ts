import type { Logger } from './logger.js';

/**
 * One handler for SIGTERM and SIGINT: close everything once, exit 0 when done, exit 1 when the
 * deadline passes first (an orchestrator would kill us anyway).
 */
export function installShutdown(
  close: () => Promise<void>,
  logger: Logger,
  timeoutMs: number,
): void {
  let stopping = false;
  const shutdown = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down');
    const deadline = setTimeout(() => {
      logger.error('shutdown deadline passed; exiting');
      process.exit(1);
    }, timeoutMs);
    deadline.unref();
    close().then(
      () => {
        logger.info('shutdown complete');
        process.exit(0);
      },
      (error: unknown) => {
        logger.error({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}
