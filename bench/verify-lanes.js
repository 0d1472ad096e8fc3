// node bench/verify-lanes.js (after npm run -s build, the native build and
// make -C bench; not part of npm run bench, not in CI or the tests): a
// restore's check of the page file's chunks (pages_check: an image from
// elsewhere, or --verify) with the sixteen-lane SHA-256 and without
// (APPSHOT_SHA_LANES=0: OpenSSL, one chunk at a time), on one build, the
// two ways alternating (which goes first alternates by round).
//
// Per size (BENCH_SIZES, MiB, default 16,256), BENCH_RUNS rounds (default
// 5), median and min-max of:
//   check alone         PagesCheck on a page file of that size in the page
//                       cache (random bytes, chunks of a MiB), one thread
//                       per core as a restore runs it: wall until every
//                       chunk is good, and the process's CPU meanwhile
//   restore --verify    memapp with that much memory, snapshotted once;
//                       `appshot restore --verify` in-process
//                       (APPSHOT_ENGINE=off) under bench/rusage: the whole
//                       command's wall and CPU, and its verifyMs (the
//                       image read and checked) and restoreMs
// and, paired by round, OpenSSL's minus the lanes' (median, and in how
// many rounds the lanes' was lower). The load average is printed before
// and after.
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { read, summary, timed, waitFor } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { addon } = await import(join(root, 'dist', 'native.js'));
const cli = join(root, 'bin', 'appshot.js');
const memapp = join(root, 'bench', 'bin', 'memapp');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const sizes = (process.env.BENCH_SIZES ?? '16,256').split(',').map(Number);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-verify-'));
const work = mkdtempSync(join(process.env.BENCH_DIR ?? root, '.bench-images-verify-'));
const env = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' };
const MiB = 1 << 20;
const ways = { lanes: {}, openssl: { APPSHOT_SHA_LANES: '0' } };
const log = (s) => process.stderr.write(`bench/verify-lanes: ${s}\n`);
const aids = new Set();

function cleanUp() {
  for (const aid of aids) spawnSync(process.execPath, [cli, 'rm', '-f', aid], { env });
  spawnSync(process.execPath, [cli, 'engine', 'stop'], { env });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}

/** One check of `path` (its table `table`) by PagesCheck, the way `way`:
 * { wallMs, cpuMs, byLanes }. */
function checkOnce(path, size, table, way) {
  const saved = process.env.APPSHOT_SHA_LANES;
  if (way.APPSHOT_SHA_LANES) process.env.APPSHOT_SHA_LANES = way.APPSHOT_SHA_LANES;
  else delete process.env.APPSHOT_SHA_LANES;
  const fd = openSync(path, 'r');
  try {
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const check = new (addon().PagesCheck)(fd, size, MiB, table);
    const verdict = check.wait(-1);
    const wallMs = Number(process.hrtime.bigint() - t0) / 1e6;
    const cpu = process.cpuUsage(cpu0);
    const byLanes = check.byLanes();
    check.stop();
    if (verdict.state !== 'good') throw new Error(`the check found chunk ${verdict.chunk} bad`);
    return { wallMs, cpuMs: (cpu.user + cpu.system) / 1000, byLanes };
  } finally {
    closeSync(fd);
    if (saved === undefined) delete process.env.APPSHOT_SHA_LANES;
    else process.env.APPSHOT_SHA_LANES = saved;
  }
}

async function main() {
  log(`${cpus().length} cores, load ${loadavg().map((l) => l.toFixed(2)).join(' ')}, ${runs} rounds`);
  const results = {};
  for (const mib of sizes) {
    const r = (results[mib] = {});
    const put = (k, v) => (r[k] ??= []).push(v);
    // The check alone, on a file of random bytes with a chunk table.
    const size = mib * MiB + 4096; // a short last chunk, as a page file has
    const bytes = randomBytes(size);
    const table = Buffer.concat(Array.from({ length: Math.ceil(size / MiB) }, (_, i) => createHash('sha256').update(bytes.subarray(i * MiB, (i + 1) * MiB)).digest()));
    const file = join(work, `pages-${mib}.img`);
    writeFileSync(file, bytes);
    // An application and its image, for the restores.
    const aid = `v${mib}`;
    aids.add(aid);
    timed(process.execPath, [cli, 'run', '-d', '--aid', aid, '--', memapp, String(mib)], { env });
    await waitFor(`${aid} to be ready`, () => read(join(home, 'apps', aid, 'log')).includes('READY'));
    const image = join(work, `img-${mib}`);
    timed(process.execPath, [cli, 'snapshot', aid, '-o', image, '--json'], { env });
    aids.delete(aid);
    // Not counted: the lanes' self-test (on first use) and the buffers'
    // first touch.
    for (const way of Object.values(ways)) checkOnce(file, size, table, way);
    for (let round = 0; round < runs; round++) {
      const order = round % 2 ? Object.keys(ways).reverse() : Object.keys(ways);
      for (const way of order) {
        const c = checkOnce(file, size, table, ways[way]);
        put(`check_wall_${way}`, c.wallMs);
        put(`check_cpu_${way}`, c.cpuMs);
        put(`check_bylanes_${way}`, c.byLanes);
      }
      for (const way of order) {
        const restored = `${aid}-${way}-${round}`;
        aids.add(restored);
        const t = timed(process.execPath, [cli, 'restore', image, '--aid', restored, '--verify', '--json'], { env: { ...env, ...ways[way] } });
        const j = JSON.parse(t.out);
        if (!j.pagesChecked) throw new Error('the restore did not check the page file');
        put(`restore_wall_${way}`, t.wallMs);
        put(`restore_cpu_${way}`, t.cpuMs);
        put(`restore_verifyMs_${way}`, j.verifyMs);
        put(`restore_restoreMs_${way}`, j.restoreMs);
        spawnSync(process.execPath, [cli, 'rm', '-f', restored], { env });
        aids.delete(restored);
      }
    }
    rmSync(file, { force: true });
    rmSync(image, { recursive: true, force: true });
  }
  log(`load after ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  const rows = [];
  for (const mib of sizes)
    for (const [k, v] of Object.entries(results[mib])) {
      const s = summary(v);
      rows.push(`${String(mib).padStart(4)} MiB  ${k.padEnd(28)} ${String(s.median).padStart(8)}  (${s.min}-${s.max})  [${v.map((x) => +x.toFixed(1)).join(' ')}]`);
    }
  // Paired by round: OpenSSL's minus the lanes' (positive: the lanes less).
  for (const mib of sizes)
    for (const k of Object.keys(results[mib]).filter((k) => k.endsWith('_lanes') && !k.includes('bylanes'))) {
      const base = k.replace(/_lanes$/, '');
      const d = results[mib][`${base}_openssl`].map((o, i) => o - results[mib][k][i]);
      rows.push(`${String(mib).padStart(4)} MiB  ${`${base}: openssl - lanes`.padEnd(36)} median ${summary(d).median}, lanes lower in ${d.filter((x) => x > 0).length} of ${d.length}`);
    }
  process.stdout.write(rows.join('\n') + '\n');
}

try {
  mkdirSync(work, { recursive: true });
  await main();
} finally {
  cleanUp();
}
