// CPU pinning for the endpoint runs (`taskset` from util-linux): the load generator on one core,
// the server it measures (the ceiling or the API) on the others. Unpinned, the scheduler now and
// then puts both on one core, and a run measures half a core: the same build gave ratios from
// 0.38 to 0.55 from one run to the next. The ceiling and the API are pinned alike.
import { execFileSync } from 'node:child_process';
import os from 'node:os';

export interface Pinning {
  loadGenerator: string;
  servers: string;
  all: string;
}

/** Which cores go where; none on a single core. */
export function pinningPlan(): Pinning | undefined {
  const cores = os.availableParallelism();
  if (cores < 2) return undefined;
  return {
    loadGenerator: String(cores - 1),
    servers: cores === 2 ? '0' : `0-${cores - 2}`,
    all: `0-${cores - 1}`,
  };
}

/** Pins every thread of `pid` to `cpus`; false when that is not possible here. */
export function pin(pid: number | undefined, cpus: string): boolean {
  if (pid === undefined) return false;
  try {
    execFileSync('taskset', ['-a', '-cp', cpus, String(pid)], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
