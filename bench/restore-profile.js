// Where the time of one eager restore goes, end to end, with a warm
// engine: per size (BENCH_SIZES, MiB of touched memory, default "0,16"; 0
// is the tiny app), a memapp snapshotted once, then BENCH_ROW (default 10)
// eager restores of its image in a row, each its own `appshot restore IMG
// --aid X --json` through bin/appshot (the installed command: the native
// client, and the engine), then all removed; BENCH_RUNS (default 5) such
// rows, after one not counted.
//
// Paired A/B: BENCH_BUILDS="main=/work/main,new=." runs several builds
// (each its own state directory, image and engine) in one run, their
// restores alternating one by one. Prints per build and size the median
// and range of the command's wall time, the restore's own time
// (restoreMs) and its verification (verifyMs), and with BENCH_STEPS=1 the
// median of each of the restore's APPSHOT_DEBUG phases. BENCH_LAZY=1:
// `--lazy` restores instead. BENCH_SAME_AID=1: each restore under the
// image's own AID (as `appshot restore IMG` does), removed right after it
// (not timed), where by default each takes a new one (--aid rN), for which
// the restore maps its environment a new block (the AID is in it). --json:
// raw medians.
//
// BENCH_PROC_READS=1: before the timed rows, per build and size, counts
// what one restore reads of /proc: strace (-e openat, the engine's main
// thread only: following its children would take the seeds it traces)
// attached to the engine while it serves one restore, the opens of
// /proc/PID/... of any process but the engine and the client, by file
// (PID and TID as P and T). The engine's own /proc/self is left out; so are
// the client's files, which the engine reads to know who asks.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pairedCleanUp, engineEnv, pairedBuilds, summary } from './measure.js';

const here = join(dirname(fileURLToPath(import.meta.url)), '..');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const row = Number(process.env.BENCH_ROW ?? 10);
const sizes = (process.env.BENCH_SIZES ?? '0,16').split(',').map(Number);
const STEPS = process.env.BENCH_STEPS === '1';
const LAZY = process.env.BENCH_LAZY === '1';
const SAME_AID = process.env.BENCH_SAME_AID === '1';
const PROC_READS = process.env.BENCH_PROC_READS === '1';
const memapp = join(here, 'bench', 'bin', 'memapp');
const builds = pairedBuilds(here, 'restore-profile');
const work = mkdtempSync(join(here, '.bench-images-restore-profile-'));
const envOf = engineEnv;
const node = (b, args, extra) => execFileSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), ...args], { cwd: work, env: envOf(b, { APPSHOT_ENGINE: 'off', ...extra }), stdio: 'ignore' });
let n = 0;

function restoreOnce(b, image, mib) {
  const aid = SAME_AID ? `src${mib}` : `r${n++}`;
  const start = process.hrtime.bigint();
  const r = spawnSync(join(b.root, 'bin', 'appshot'), ['restore', image, ...(SAME_AID ? [] : ['--aid', aid]), '--json', ...(LAZY ? ['--lazy'] : [])], { cwd: work, env: envOf(b, STEPS ? { APPSHOT_DEBUG: '1' } : {}), encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${b.name}: restore failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout);
  if (SAME_AID && spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', aid], { cwd: work, env: envOf(b), stdio: 'ignore' }).status !== 0) throw new Error(`${b.name}: rm failed`);
  const steps = [];
  let last = 0;
  for (const line of r.stderr.split('\n')) {
    const m = /^([\d.]+) ms, (\d+) calls injected: (.*)$/.exec(line);
    if (!m) continue;
    steps.push([m[3].replace(/^process \d+$/, 'process').replace(/\(\d+ in its chain\)/, ''), Number(m[1]) - last]);
    last = Number(m[1]);
  }
  return { aid, wall, restoreMs: made.restoreMs, verifyMs: made.verifyMs, injectedCalls: made.injectedCalls, steps };
}

const results = new Map(builds.map((b) => [b.name, new Map(sizes.map((s) => [s, []]))]));

/** The engine's PID (engine status --json). */
function enginePid(b) {
  const out = spawnSync(join(b.root, 'bin', 'appshot'), ['engine', 'status', '--json'], { cwd: work, env: envOf(b), encoding: 'utf8' }).stdout;
  return JSON.parse(out).pid;
}

/** What one restore of `image` by build `b` reads of /proc (see
 * BENCH_PROC_READS): { total, byFile }. */
function procReads(b, image, mib) {
  const engine = enginePid(b);
  const log = join(work, `strace-${b.name}-${mib}`);
  const tracer = spawn('strace', ['-qq', '-s', '256', '-e', 'trace=openat', '-o', log, '-p', String(engine)], { stdio: 'ignore' });
  // Attached once strace has written its first line or the engine has
  // done anything at all: wait for the log to exist, then a little.
  for (let i = 0; i < 100 && !existsSync(log); i++) spawnSync('sleep', ['0.02']);
  spawnSync('sleep', ['0.3']);
  const aid = `proc${n++}`;
  const r = spawnSync(join(b.root, 'bin', 'appshot'), ['restore', image, '--aid', aid, '--json'], { cwd: work, env: envOf(b), encoding: 'utf8' });
  spawnSync('sleep', ['0.2']);
  tracer.kill('SIGINT');
  spawnSync('sleep', ['0.2']);
  if (r.status !== 0) throw new Error(`${b.name}: restore failed (${r.status}): ${r.stderr}`);
  spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', aid], { cwd: work, env: envOf(b), stdio: 'ignore' });
  const byFile = {};
  let total = 0;
  for (const m of readFileSync(log, 'utf8').matchAll(/openat\(AT_FDCWD, "\/proc\/(\d+)\/([^"]*)"/g)) {
    if (Number(m[1]) === engine || Number(m[1]) === r.pid) continue;
    const file = `/proc/P/${m[2].replace(/^task\/\d+\//, 'task/T/').replace(/\/\d+$/, '/N')}`;
    byFile[file] = (byFile[file] ?? 0) + 1;
    total++;
  }
  rmSync(log, { force: true });
  return { total, byFile };
}

const cleanUp = pairedCleanUp(builds, [], [work]);
const loadBefore = readFileSync('/proc/loadavg', 'utf8').trim();

try {
  for (const b of builds) {
    for (const mib of sizes) {
      const aid = `src${mib}`;
      node(b, ['run', '-d', '--aid', aid, '--', memapp, String(mib)]);
      const log = join(b.home, 'apps', aid, 'log');
      for (let i = 0; i < 200 && !/READY/.test((() => { try { return readFileSync(log, 'utf8'); } catch { return ''; } })()); i++) spawnSync('sleep', ['0.05']);
      node(b, ['snapshot', aid, '-o', `${b.name}-${mib}.appshot`, '--full']);
    }
    node(b, ['engine', 'start'], { APPSHOT_ENGINE: 'manual' });
  }
  const reads = {};
  if (PROC_READS)
    for (const b of builds) {
      reads[b.name] = {};
      // Warm: the engine's first restore of a seed count starts its own
      // supervisor (no standby yet), and reads what a later one does not.
      for (const mib of sizes)
        for (let k = 0; k < 2; k++) {
          const { aid } = restoreOnce(b, `${b.name}-${mib}.appshot`, mib);
          if (!SAME_AID) spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', aid], { cwd: work, env: envOf(b), stdio: 'ignore' });
        }
      for (const mib of sizes) reads[b.name][mib] = procReads(b, `${b.name}-${mib}.appshot`, mib);
    }
  for (let i = -1; i < runs; i++) {
    const order = i % 2 ? builds : [...builds].reverse();
    for (const mib of sizes) {
      const made = new Map(builds.map((b) => [b.name, []]));
      for (let k = 0; k < row; k++) for (const b of order) made.get(b.name).push(restoreOnce(b, `${b.name}-${mib}.appshot`, mib));
      for (const b of order) {
        if (i >= 0) results.get(b.name).get(mib).push(...made.get(b.name));
        if (SAME_AID) continue;
        const rm = spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', ...made.get(b.name).map((c) => c.aid)], { cwd: work, env: envOf(b), stdio: 'ignore' });
        if (rm.status !== 0) throw new Error(`${b.name}: rm failed`);
      }
    }
  }
  const load = `${loadBefore} at the start, ${readFileSync('/proc/loadavg', 'utf8').trim()} at the end`;
  const report = {};
  for (const b of builds) {
    report[b.name] = {};
    for (const mib of sizes) {
      const all = results.get(b.name).get(mib);
      const labels = [...new Set(all.flatMap((c) => c.steps.map(([l]) => l)))];
      report[b.name][mib] = {
        wallMs: summary(all.map((c) => c.wall)),
        restoreMs: summary(all.map((c) => c.restoreMs)),
        verifyMs: summary(all.map((c) => c.verifyMs)),
        // Stops the restore made in the process (injected batches and calls).
        injectedCalls: summary(all.map((c) => c.injectedCalls)),
        steps: Object.fromEntries(labels.map((l) => [l, summary(all.map((c) => c.steps.find(([x]) => x === l)?.[1]))?.median])),
        paired: Object.fromEntries(['restoreMs', 'wallMs'].map((k) => {
          const first = results.get(builds[0].name).get(mib);
          const of = (c) => (k === 'wallMs' ? c.wall : c[k]);
          return [k, summary(all.map((c, i) => of(c) - of(first[i])))];
        })),
      };
    }
  }
  if (process.argv.includes('--json')) console.log(JSON.stringify({ lazy: LAZY, runs, row, load, builds: report, ...(PROC_READS ? { procReads: reads } : {}) }, null, 2));
  else {
    const names = builds.map((b) => b.name);
    const fmt = (s) => (s ? `${s.median} (${s.min}–${s.max})` : '–');
    console.log(`${LAZY ? 'lazy' : 'eager'} restores${SAME_AID ? ' under the image\'s own AID' : ''}, ${runs} rows of ${row} per size and build, alternating; median (min–max) ms; load ${load}`);
    console.log(`| | ${names.join(' | ')} |\n|---|${names.map(() => '---').join('|')}|`);
    for (const mib of sizes) {
      for (const k of ['wallMs', 'restoreMs', 'verifyMs', 'injectedCalls']) console.log(`| ${mib} MiB: ${k} | ${names.map((x) => fmt(report[x][mib][k])).join(' | ')} |`);
      // Paired: each build's k-th restore against the first build's k-th
      // (they ran one right after the other).
      for (const k of ['restoreMs', 'wallMs'])
        if (names.length > 1) console.log(`| ${mib} MiB: ${k}, paired difference from ${names[0]} | – | ${names.slice(1).map((x) => report[x][mib].paired[k]?.median ?? '–').join(' | ')} |`);
      const labels = [...new Set(names.flatMap((x) => Object.keys(report[x][mib].steps)))];
      for (const l of labels) console.log(`| ${mib} MiB: ${l} | ${names.map((x) => report[x][mib].steps[l] ?? '–').join(' | ')} |`);
      if (PROC_READS) {
        console.log(`| ${mib} MiB: /proc reads in one restore | ${names.map((x) => reads[x][mib].total).join(' | ')} |`);
        const files = [...new Set(names.flatMap((x) => Object.keys(reads[x][mib].byFile)))].sort();
        for (const f of files) console.log(`| ${mib} MiB: ${f} | ${names.map((x) => reads[x][mib].byFile[f] ?? 0).join(' | ')} |`);
      }
    }
  }
} finally {
  cleanUp();
}
