// Summarises V8 CPU profiles (`--cpu-prof`): self time by package and the hottest functions.
// Also runnable alone: `node --import tsx bench/profile-summary.ts [dir]`.
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

/** Where a frame's code comes from: a package, our source, node's own, or V8's pseudo-frames. */
function area(url: string, name: string): string {
  if (!url) return name.startsWith('(') ? name : '(native)';
  const modules = url.lastIndexOf('node_modules/');
  if (modules >= 0) {
    const rest = url.slice(modules + 'node_modules/'.length).split('/');
    return rest[0]!.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  if (url.startsWith('node:')) return url.slice('node:'.length);
  const src = url.indexOf('/src/');
  if (src >= 0) return url.slice(src + 1);
  const bench = url.indexOf('/bench/');
  if (bench >= 0) return url.slice(bench + 1);
  return url;
}

export interface ProfileSummary {
  file: string;
  totalMs: number;
  /** Self time by area, busiest first, as ms and share of the non-idle time. */
  byArea: Array<{ area: string; ms: number; pct: number }>;
  top: Array<{ fn: string; ms: number; pct: number }>;
  /** Time with the area anywhere on the stack (synchronous stacks only), busiest first. */
  inclusiveByArea: Array<{ area: string; ms: number; pct: number }>;
  /** The same for functions of our own code (src/). */
  inclusiveSrc: Array<{ fn: string; ms: number; pct: number }>;
}

export function summariseProfile(file: string, topN = 25): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const selfMs = new Map<number, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  for (let i = 0; i < samples.length; i++) {
    const id = samples[i]!;
    selfMs.set(id, (selfMs.get(id) ?? 0) + (deltas[i] ?? 0) / 1000);
  }
  const areas = new Map<string, number>();
  const fns = new Map<string, number>();
  let busy = 0;
  for (const node of profile.nodes) {
    const ms = selfMs.get(node.id) ?? 0;
    if (ms === 0) continue;
    const { functionName, url, lineNumber } = node.callFrame;
    const name = functionName || '(anonymous)';
    const where = area(url, name);
    if (name === '(idle)') continue;
    busy += ms;
    areas.set(where, (areas.get(where) ?? 0) + ms);
    const key = url ? `${name} ${where}:${lineNumber + 1}` : name;
    fns.set(key, (fns.get(key) ?? 0) + ms);
  }
  // Inclusive: each sample counts once for every distinct area / src function on its stack.
  const parent = new Map<number, number>();
  const byId = new Map<number, ProfileNode>();
  for (const node of profile.nodes) {
    byId.set(node.id, node);
    for (const child of node.children ?? []) parent.set(child, node.id);
  }
  const inclusiveAreas = new Map<string, number>();
  const inclusiveSrc = new Map<string, number>();
  for (const [id, ms] of selfMs) {
    const leaf = byId.get(id);
    if (!leaf || leaf.callFrame.functionName === '(idle)') continue;
    const seenAreas = new Set<string>();
    const seenFns = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const { functionName, url, lineNumber } = byId.get(at)!.callFrame;
      const where = area(url, functionName || '(anonymous)');
      seenAreas.add(where);
      if (where.startsWith('src/'))
        seenFns.add(`${functionName || '(anonymous)'} ${where}:${lineNumber + 1}`);
    }
    for (const a of seenAreas) inclusiveAreas.set(a, (inclusiveAreas.get(a) ?? 0) + ms);
    for (const f of seenFns) inclusiveSrc.set(f, (inclusiveSrc.get(f) ?? 0) + ms);
  }
  const rank = (map: Map<string, number>, n: number) =>
    [...map.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([k, ms]) => ({ k, ms: Math.round(ms), pct: Math.round((ms / busy) * 1000) / 10 }));
  return {
    file,
    totalMs: Math.round(busy),
    byArea: rank(areas, 20).map(({ k, ms, pct }) => ({ area: k, ms, pct })),
    top: rank(fns, topN).map(({ k, ms, pct }) => ({ fn: k, ms, pct })),
    inclusiveByArea: rank(inclusiveAreas, 25).map(({ k, ms, pct }) => ({ area: k, ms, pct })),
    inclusiveSrc: rank(inclusiveSrc, topN).map(({ k, ms, pct }) => ({ fn: k, ms, pct })),
  };
}

function render(s: ProfileSummary): string {
  const line = (ms: number, pct: number, what: string) =>
    `${String(ms).padStart(8)} ms ${String(pct).padStart(5)}%  ${what}`;
  return [
    `# ${s.file} (busy ${s.totalMs} ms)`,
    '## self time by area',
    ...s.byArea.map((a) => line(a.ms, a.pct, a.area)),
    '## hottest functions (self time)',
    ...s.top.map((t) => line(t.ms, t.pct, t.fn)),
    '## inclusive time by area (anywhere on the synchronous stack)',
    ...s.inclusiveByArea.map((a) => line(a.ms, a.pct, a.area)),
    '## inclusive time of src/ functions',
    ...s.inclusiveSrc.map((t) => line(t.ms, t.pct, t.fn)),
  ].join('\n');
}

const brief = (s: ProfileSummary) => ({
  ...s,
  byArea: s.byArea.slice(0, 12),
  top: s.top.slice(0, 15),
  inclusiveByArea: s.inclusiveByArea.slice(0, 12),
  inclusiveSrc: s.inclusiveSrc.slice(0, 15),
});

/**
 * Every profile under `dir`: `<scenario>-<child>.cpuprofile` (a scenario's window) and
 * `<child>/*.cpuprofile` (`--cpu-prof`, whole process; the busiest thread's). Writes a `.txt`
 * next to each and returns the short form.
 */
export function summariseProfiles(dir: string): Record<string, ProfileSummary> {
  const out: Record<string, ProfileSummary> = {};
  if (!existsSync(dir)) return out;
  for (const entry of readdirSync(dir).sort()) {
    const full = path.join(dir, entry);
    let summary: ProfileSummary | undefined;
    let name = entry;
    if (statSync(full).isDirectory()) {
      const files = readdirSync(full).filter((f) => f.endsWith('.cpuprofile'));
      summary = files
        .map((f) => summariseProfile(path.join(full, f), 60))
        .sort((a, b) => b.totalMs - a.totalMs)[0];
      name = `${entry}-whole-process`;
    } else if (entry.endsWith('.cpuprofile')) {
      summary = summariseProfile(full, 60);
      name = entry.slice(0, -'.cpuprofile'.length);
    }
    if (!summary) continue;
    writeFileSync(path.join(dir, `${name}.txt`), `${render(summary)}\n`);
    out[name] = brief(summary);
  }
  return out;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const dir =
    process.argv[2] ?? path.join(path.dirname(fileURLToPath(import.meta.url)), 'out', 'profiles');
  process.stdout.write(`${JSON.stringify(summariseProfiles(dir), null, 2)}\n`);
}
