import type { Recovery, Verification } from './verify.js';

export interface ChaosReport {
  mode: 'short' | 'full';
  entry: string;
  durationSeconds: number;
  users: { total: number; basic: number; pro: number };
  processes: { api: number; worker: number };
  settings: Record<string, unknown>;
  accepted: number;
  acceptedPrompts: number;
  acceptedRegenerations: number;
  completed: number;
  failed: number;
  blocked: number;
  cancelled: number;
  lost: number;
  duplicated: number;
  stuck: number;
  corrupted: number;
  inconsistent: number;
  undocumentedStatuses: number;
  settledMs: number;
  quota: Verification['quota'];
  unknownSends: Verification['unknownSends'];
  clients: Record<string, unknown>;
  statuses: Record<string, Record<string, number>>;
  errorCodes: Record<string, number>;
  model: Record<string, number>;
  database: Verification['totals'];
  faults: Recovery[];
  details: Record<string, unknown[]>;
  failures: string[];
  passed: boolean;
}

/** The line the CI test looks for: the whole report as one JSON object. */
export const REPORT_MARKER = 'CHAOS_REPORT_JSON ';

const ms = (value: number | null) => (value === null ? '-' : String(value));

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ');
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

export function printReport(r: ChaosReport): void {
  const out: string[] = [];
  out.push('');
  out.push(
    `Chaos run (${r.mode}): ${r.durationSeconds} s of load, ${r.users.total} users (${r.users.basic} Basic, ${r.users.pro} Pro), ${r.processes.api} API + ${r.processes.worker} worker processes, entry ${r.entry}`,
  );
  out.push('');
  out.push(
    table(
      ['check', 'value'],
      [
        [
          'accepted',
          `${r.accepted} (${r.acceptedPrompts} prompts, ${r.acceptedRegenerations} regenerations)`,
        ],
        ['completed', String(r.completed)],
        ['failed', String(r.failed)],
        ['blocked', String(r.blocked)],
        ['cancelled', String(r.cancelled)],
        ['lost', `${r.lost} (must be 0)`],
        ['duplicated', `${r.duplicated} (must be 0)`],
        ['stuck', `${r.stuck} (must be 0)`],
        ['corrupted', `${r.corrupted} (must be 0)`],
        ['client/db status disagreements', `${r.inconsistent} (must be 0)`],
        ['undocumented statuses', `${r.undocumentedStatuses} (must be 0)`],
        [
          'Basic quota',
          `limit ${r.quota.limit}; max counted per user-day ${r.quota.maxCountedPerUserDay}; ${r.quota.violations.length} over; ${r.quota.basicRejections} QUOTA_EXCEEDED to Basic, ${r.quota.proRejections} to Pro`,
        ],
        [
          'sends with no answer',
          `${r.unknownSends.total} (${r.unknownSends.stored} stored anyway, all checked)`,
        ],
        ['settled after', `${r.settledMs} ms`],
      ],
    ),
  );
  out.push('');
  out.push('Faults and recovery (ms from the fault):');
  out.push(
    table(
      [
        't (s)',
        'fault',
        'down',
        'first accepted',
        'first completed',
        'ready',
        '503s',
        'conn errors',
        'details',
      ],
      r.faults.map((f) => [
        f.atSeconds.toFixed(1),
        f.kind,
        String(f.downtimeMs),
        ms(f.firstAcceptedMs),
        ms(f.firstCompletedMs),
        ms(f.readyMs),
        String(f.errorsUntilNext.unavailable),
        String(f.errorsUntilNext.connection),
        JSON.stringify(f.details),
      ]),
    ),
  );
  out.push('');
  out.push('Answers by route and status:');
  out.push(
    table(
      ['route', 'statuses'],
      Object.entries(r.statuses).map(([route, counts]) => [
        route,
        Object.entries(counts)
          .map(([status, n]) => `${status}: ${n}`)
          .join(', '),
      ]),
    ),
  );
  out.push('');
  out.push(`Clients: ${JSON.stringify(r.clients)}`);
  out.push(`Model: ${JSON.stringify(r.model)}`);
  out.push(`Database: ${JSON.stringify(r.database)}`);
  for (const [name, items] of Object.entries(r.details)) {
    if (items.length > 0) out.push(`${name}: ${JSON.stringify(items, null, 1)}`);
  }
  out.push('');
  out.push(r.passed ? 'PASSED' : `FAILED: ${r.failures.join('; ')}`);
  out.push(`${REPORT_MARKER}${JSON.stringify(r)}`);
  process.stdout.write(`${out.join('\n')}\n`);
}
