// One service process for the bench: the product's startService with the fake model and the
// probe (event-loop delay, peak RSS, round trips) on IPC. Configuration comes from the
// environment exactly as for `npm start`; BENCH_LLM_DELTAS / BENCH_LLM_DURATION_MS pace the model.
import { loadConfig } from '../src/config.js';
import { createLogger } from '../src/lib/logger.js';
import { startService } from '../src/service.js';
import { fakeLlmFromEnv } from './fake-llm.js';
import { ready, startProbe } from './probe.js';

const config = loadConfig(process.env);
const logger = createLogger(config.logLevel);
const service = await startService(config, logger, {
  llm: fakeLlmFromEnv(process.env),
  // The bench process created the database and ran the migrations once, before any child.
  skipMigrations: true,
});
startProbe(() => service.close());
ready(service.address);
