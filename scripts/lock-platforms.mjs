// The package registry reachable here lacks some other-platform builds of optional native
// packages (e.g. @biomejs/cli-darwin-arm64), so `npm install` leaves them out of the lock file and
// `npm ci` then refuses the lock as out of sync. This adds an entry for each missing optional
// package, with its os/cpu from the parent's declaration, so `npm ci` skips it on this platform
// as it would with a complete lock. Run after `npm install` changes the lock.
import { readFileSync, writeFileSync } from 'node:fs';

const platforms = {
  android: /android/,
  darwin: /darwin/,
  linux: /linux/,
  win32: /win32/,
  freebsd: /freebsd/,
};
const cpus = { arm64: /arm64/, x64: /x64/, arm: /-arm(?!64)/, ia32: /ia32/ };

const lock = JSON.parse(readFileSync('package-lock.json', 'utf8'));
let added = 0;
for (const [path, entry] of Object.entries(lock.packages)) {
  for (const [name, version] of Object.entries(entry.optionalDependencies ?? {})) {
    const base = path ? `${path}/node_modules/${name}` : `node_modules/${name}`;
    const hoisted = `node_modules/${name}`;
    if (lock.packages[base] || lock.packages[hoisted]) continue;
    const os = Object.keys(platforms).filter((p) => platforms[p].test(name));
    const cpu = Object.keys(cpus).filter((c) => cpus[c].test(name));
    if (os.length === 0) continue;
    const libc = /musl/.test(name) ? ['musl'] : undefined;
    lock.packages[hoisted] = {
      version: version.replace(/^[^\d]*/, ''),
      cpu: cpu.length ? cpu : undefined,
      optional: true,
      os,
      ...(libc ? { libc } : {}),
    };
    added++;
  }
}
lock.packages = Object.fromEntries(
  Object.entries(lock.packages).sort(([a], [b]) =>
    a === '' ? -1 : b === '' ? 1 : a.localeCompare(b),
  ),
);
writeFileSync('package-lock.json', `${JSON.stringify(lock, null, 2)}\n`);
console.log(`lock-platforms: added ${added} placeholder entries`);
