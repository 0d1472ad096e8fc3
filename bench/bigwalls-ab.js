// Whole snapshot and restore commands of large applications, two builds of
// appshot side by side (paired A/B, interleaved, which build goes first
// alternating by round), for the image format's cost: the digest of the
// page file (at the commit) and its check (before a restore).
//
//   node bench/bigwalls-ab.js OLD_CHECKOUT NEW_CHECKOUT > results.txt
//   BENCH_SIZES=256,1024 BENCH_RUNS=5 (the defaults)
//   BENCH_LR_ONLY=1: only the --leave-running snapshot (its frozen time)
//
// Each checkout built (npm run build, build:native; bench/bin/memapp from
// NEW). Commands run as a cold CLI (APPSHOT_ENGINE=off), each build with a
// state directory of its own. Per size, round and build:
//   lr       snapshot --leave-running: frozenMs, commitMs, the command's wall
//            and CPU (user + system, bench/rusage)
//   def      snapshot (default): heldMs, commitMs, wall, CPU
//   eager    restore: restoreMs, verifyMs, wall, CPU
//   lazy     restore --lazy: restoreMs, verifyMs, wall, CPU
// Prints one line per measure as it goes, then medians with min-max and
// the load average's range.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const [oldDir, newDir] = process.argv.slice(2).map((p) => resolve(p));
if (!oldDir || !newDir) {
  process.stderr.write('usage: node bench/bigwalls-ab.js OLD_CHECKOUT NEW_CHECKOUT\n');
  process.exit(2);
}
const sizes = (process.env.BENCH_SIZES ?? '256,1024').split(',').map(Number);
const runs = Number(process.env.BENCH_RUNS ?? 5);
const lrOnly = process.env.BENCH_LR_ONLY === '1';
const memapp = join(newDir, 'bench', 'bin', 'memapp');
const work = mkdtempSync(join(tmpdir(), 'appshot-bigwalls-'));
const builds = { old: oldDir, new: newDir };
const homes = { old: join(work, 'home-old'), new: join(work, 'home-new') };
const load = () => Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);

const rusage = join(newDir, 'bench', 'bin', 'rusage');

/** Runs appshot under bench/rusage: its JSON output, wall and CPU (user +
 * system, its own and its waited-for children's) in ms. */
function appshot(build, args, mayFail = false) {
  const r = spawnSync(rusage, [process.execPath, join(builds[build], 'bin', 'appshot.js'), ...args], {
    env: { ...process.env, APPSHOT_HOME: homes[build], APPSHOT_ENGINE: 'off' },
    encoding: 'utf8',
    maxBuffer: 1 << 26,
  });
  if (r.status !== 0 && !mayFail) throw new Error(`${build}: appshot ${args.join(' ')}: ${r.stderr}`);
  const [, wallUs, cpuUs] = /RUSAGE (\d+) (\d+)/.exec(r.stderr) ?? [];
  const wall = Number(wallUs) / 1000;
  const cpu = Number(cpuUs) / 1000;
  let json;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { wall, cpu, json };
}

function waitReady(build, aid) {
  const log = join(homes[build], 'apps', aid, 'log');
  const until = Date.now() + 120_000;
  for (;;) {
    try {
      if (/READY/.test(readFileSync(log, 'utf8'))) return;
    } catch {
      /* not yet */
    }
    if (Date.now() > until) throw new Error(`${build}: ${aid} never got ready`);
    spawnSync('sleep', ['0.1']);
  }
}

const rows = [];
function record(size, build, what, values) {
  const row = { size, build, what, ...values, load: load() };
  rows.push(row);
  process.stdout.write(`${JSON.stringify(row)}\n`);
}

const started = new Set();
function round(size, build, i) {
  const aid = `m${size}-${i}`;
  started.add(`${build} ${aid}`);
  const img = join(work, `${build}-${aid}`);
  // --leave-running, then (the same application, still running) default.
  appshot(build, ['run', '-d', '--aid', aid, '--', memapp, String(size)]);
  waitReady(build, aid);
  let r = appshot(build, ['snapshot', aid, '-o', `${img}-lr`, '--leave-running', '--json']);
  record(size, build, 'lr', { frozenMs: r.json.frozenMs, commitMs: r.json.phases.commitMs, wall: r.wall, cpu: r.cpu });
  rmSync(`${img}-lr`, { recursive: true, force: true });
  if (lrOnly) {
    appshot(build, ['rm', '-f', aid]);
    return;
  }
  r = appshot(build, ['snapshot', aid, '-o', img, '--json']);
  record(size, build, 'def', { heldMs: r.json.phases.heldMs, commitMs: r.json.phases.commitMs, wall: r.wall, cpu: r.cpu });
  appshot(build, ['rm', '-f', aid], true); // ended by the snapshot
  for (const lazy of [false, true]) {
    r = appshot(build, ['restore', img, ...(lazy ? ['--lazy'] : []), '--json']);
    record(size, build, lazy ? 'lazy' : 'eager', { restoreMs: r.json.restoreMs, verifyMs: r.json.verifyMs, wall: r.wall, cpu: r.cpu });
    appshot(build, ['rm', '-f', aid]);
  }
  rmSync(img, { recursive: true, force: true });
}

try {
  for (const size of sizes)
    for (let i = 0; i < runs; i++) for (const build of i % 2 ? ['new', 'old'] : ['old', 'new']) round(size, build, i);
} finally {
  for (const key of started) {
    const [build, aid] = key.split(' ');
    spawnSync(process.execPath, [join(builds[build], 'bin', 'appshot.js'), 'rm', '-f', aid], { env: { ...process.env, APPSHOT_HOME: homes[build], APPSHOT_ENGINE: 'off' } });
  }
  rmSync(work, { recursive: true, force: true });
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (xs) => `${median(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)})`;
process.stdout.write(`\nmedians (min-max) of ${runs} paired rounds, ms; old = ${oldDir}, new = ${newDir}\n`);
for (const size of sizes)
  for (const what of ['lr', 'def', 'eager', 'lazy']) {
    const of = (build) => rows.filter((r) => r.size === size && r.what === what && r.build === build);
    const keys = Object.keys(of('old')[0] ?? {}).filter((k) => !['size', 'build', 'what', 'load'].includes(k));
    for (const k of keys) process.stdout.write(`${size} MiB ${what.padEnd(5)} ${k.padEnd(10)} old ${fmt(of('old').map((r) => r[k])).padEnd(20)} new ${fmt(of('new').map((r) => r[k]))}\n`);
  }
const loads = rows.map((r) => r.load);
process.stdout.write(`load average (1 min) during the runs: ${Math.min(...loads)}-${Math.max(...loads)}\n`);
