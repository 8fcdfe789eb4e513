import { type App, type BuildAppOptions, buildApp } from './api/app.js';
import type { Config } from './config.js';
import { type Container, type ContainerOptions, createContainer } from './container.js';
import type { Logger } from './lib/logger.js';

export interface RunningService {
  container: Container;
  app: App | undefined;
  /** The address the API listens on, when ROLE runs the API. */
  address: string | undefined;
  /** Stops taking requests, lets in-flight ones and active jobs finish, then closes pools. */
  close(): Promise<void>;
}

export interface StartOptions extends ContainerOptions, BuildAppOptions {}

/** Starts the roles that `config.role` names, sharing one container. */
export async function startService(
  config: Config,
  logger: Logger,
  options: StartOptions = {},
): Promise<RunningService> {
  const container = await createContainer(config, logger, options);
  const runsApi = config.role === 'all' || config.role === 'api';
  let app: App | undefined;
  let address: string | undefined;
  try {
    if (runsApi) {
      app = await buildApp(container, options);
      address = await app.listen({ port: config.port, host: config.host });
    }
  } catch (error) {
    await app?.close().catch(() => {});
    await container.close();
    throw error;
  }

  let closing: Promise<void> | undefined;
  return {
    container,
    app,
    address,
    close: () => {
      closing ??= (async () => {
        if (app) await app.close();
        await container.close();
      })();
      return closing;
    },
  };
}
