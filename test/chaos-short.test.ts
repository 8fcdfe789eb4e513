import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { REPORT_MARKER } from './chaos/report.js';
import { repoRoot } from './helpers/process.js';

// The short variant of `npm run chaos` (issue 7): its own PostgreSQL and Redis, 2 API and 2
// worker processes, ~28 s of load while workers, API instances, Redis and PostgreSQL are killed,
// restarted and flushed. It must end with nothing lost, duplicated or stuck.
const TIMEOUT_MS = 240_000;

interface Report {
  passed: boolean;
  failures: string[];
  accepted: number;
  lost: number;
  duplicated: number;
  stuck: number;
  undocumentedStatuses: number;
  faults: unknown[];
}

function runShortChaos(): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/chaos/run.ts', '--short'], {
      cwd: repoRoot,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    // SIGINT lets the suite stop its processes and servers before the test gives up.
    const timer = setTimeout(() => child.kill('SIGINT'), TIMEOUT_MS - 30_000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe('chaos suite (short)', () => {
  it(
    'loses, duplicates and strands no accepted prompt while processes and servers fail',
    async () => {
      const { code, stdout, stderr } = await runShortChaos();
      const line = stdout.split('\n').find((l) => l.startsWith(REPORT_MARKER));
      expect(line, `no report printed\n${stderr.slice(-4000)}`).toBeDefined();
      const report = JSON.parse(line!.slice(REPORT_MARKER.length)) as Report;
      const summary = stdout.replace(line!, '').slice(-6000);
      expect(report.accepted, summary).toBeGreaterThan(0);
      expect(report.faults, summary).toHaveLength(6);
      expect(report.lost, summary).toBe(0);
      expect(report.duplicated, summary).toBe(0);
      expect(report.stuck, summary).toBe(0);
      expect(report.failures, summary).toEqual([]);
      expect(code, summary).toBe(0);
    },
    TIMEOUT_MS,
  );
});
