import { type App, type BuildAppOptions, buildApp } from './api/app.js';
import type { Config } from './config.js';
import { type Container, type ContainerOptions, createContainer } from './container.js';
import type { Logger } from './lib/logger.js';
import { type RunningWorker, startWorker, type WorkerTuning } from './worker.js';

export interface RunningService {
  container: Container;
  app: App | undefined;
  worker: RunningWorker | undefined;
  /** The address the API listens on, when ROLE runs the API. */
  address: string | undefined;
  /** Stops taking requests, lets in-flight ones and active jobs finish, then closes pools. */
  close(): Promise<void>;
}

export interface StartOptions extends ContainerOptions, BuildAppOptions {
  worker?: WorkerTuning;
}

/** Starts the roles that `config.role` names, sharing one container. */
export async function startService(
  config: Config,
  logger: Logger,
  options: StartOptions = {},
): Promise<RunningService> {
  const container = await createContainer(config, logger, options);
  const runsApi = config.role === 'all' || config.role === 'api';
  const runsWorker = config.role === 'all' || config.role === 'worker';
  let app: App | undefined;
  let address: string | undefined;
  let worker: RunningWorker | undefined;
  try {
    if (runsWorker) worker = await startWorker(container, options.worker);
    if (runsApi) {
      app = await buildApp(container, options);
      address = await app.listen({ port: config.port, host: config.host });
    }
  } catch (error) {
    await app?.close().catch(() => {});
    await worker?.close().catch(() => {});
    await container.close();
    throw error;
  }

  let closing: Promise<void> | undefined;
  return {
    container,
    app,
    worker,
    address,
    close: () => {
      closing ??= (async () => {
        if (app) await app.close();
        // Active replies get most of the shutdown budget; the rest are left to stall and are
        // taken over by another worker.
        if (worker) await worker.close(Math.max(1000, config.shutdownTimeoutMs - 5000));
        await container.close();
      })();
      return closing;
    },
  };
}
