import { existsSync } from 'node:fs';
import { ConfigError, loadConfig } from './config.js';
import { createLogger } from './lib/logger.js';
import { installShutdown } from './lib/shutdown.js';
import { startService } from './service.js';

async function main(): Promise<void> {
  if (existsSync('.env')) process.loadEnvFile('.env');

  let config: ReturnType<typeof loadConfig>;
  try {
    config = loadConfig();
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`);
      process.exit(1);
    }
    throw error;
  }

  const logger = createLogger(config.logLevel);
  if (config.jwt.generated) {
    logger.warn(
      'JWT_SECRET is not set: using a random secret for this process only. Sessions end on restart and instances cannot share them. Set JWT_SECRET in production.',
    );
  }

  let service: Awaited<ReturnType<typeof startService>>;
  try {
    service = await startService(config, logger);
  } catch (error) {
    process.stderr.write(`Start-up failed: ${(error as Error).message}\n`);
    process.exit(1);
  }
  logger.info(
    { role: config.role, address: service.address, llm: config.llm.provider },
    'service started',
  );

  installShutdown(service.close, logger, config.shutdownTimeoutMs);
}

await main();
