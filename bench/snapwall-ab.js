// The whole default snapshot command of a memapp, two builds of appshot
// side by side (paired A/B, interleaved, which build goes first alternating
// by round), each through its native client and a warm engine of its own
// (the way bench/criu.js BENCH_APPSHOT=native runs appshot).
//
//   node bench/snapwall-ab.js OLD_CHECKOUT NEW_CHECKOUT
//   BENCH_SIZES=16,256 (MiB) BENCH_RUNS=5 BENCH_LR=1 (also --leave-running)
//   BENCH_RESTORE=1 (the default snapshot's image restored at once, timed)
//   BENCH_OLD_ENV, BENCH_NEW_ENV: settings of one build's (below)
//   BENCH_WARM=1: unmeasured rounds first, per size and build (an
//   engine's first few snapshots run its code cold: 20-35 ms frozen)
//   BENCH_WARM_MEMORY=MIB: that much written to a file and deleted right
//   before each measured snapshot, so that both builds' page files go
//   into memory just given back (on this VM, memory idle for a few
//   seconds is taken back by the host, and a page file written into it
//   costs up to twice the CPU: README, CRIU section)
//
// Per size, round and build: the command's wall and CPU (bench/rusage: the
// client's; plus the engine's CPU meanwhile, from its /proc/PID/stat),
// frozenMs and the held phases from --json. Prints one line per
// measure, then medians with min-max and the load average's range.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { median } from './measure.js';

const [oldDir, newDir] = process.argv.slice(2).map((p) => resolve(p));
if (!oldDir || !newDir) {
  process.stderr.write('usage: node bench/snapwall-ab.js OLD_CHECKOUT NEW_CHECKOUT\n');
  process.exit(2);
}
const sizes = (process.env.BENCH_SIZES ?? '16,256').split(',').map(Number);
const runs = Number(process.env.BENCH_RUNS ?? 5);
const withLr = process.env.BENCH_LR === '1';
const memapp = join(newDir, 'bench', 'bin', 'memapp');
const rusage = join(newDir, 'bench', 'bin', 'rusage');
const work = mkdtempSync(join(tmpdir(), 'appshot-snapwall-'));
// Images on the disk the other benchmarks use (the prefix .gitignore ignores).
const images = mkdtempSync(join(process.env.BENCH_DIR ?? newDir, '.bench-images-snapwall-'));
const builds = { old: oldDir, new: newDir };
const homes = { old: join(work, 'home-old'), new: join(work, 'home-new') };
// BENCH_OLD_ENV / BENCH_NEW_ENV: K=V,K=V more for that build's commands and
// engine (the same checkout twice, with and without a setting).
const extra = (v) => Object.fromEntries((v ?? '').split(',').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
const extras = { old: extra(process.env.BENCH_OLD_ENV), new: extra(process.env.BENCH_NEW_ENV) };
const envOf = (b) => ({ ...process.env, ...extras[b], APPSHOT_HOME: homes[b], APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '3600' });
const load = () => Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
const ticks = 100; // USER_HZ
const engines = {};
const cpuOf = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return ((Number(f[11]) + Number(f[12])) * 1000) / ticks;
};

function cli(b, args, opts = {}) {
  return spawnSync(process.execPath, [join(builds[b], 'bin', 'appshot.js'), ...args], { env: envOf(b), encoding: 'utf8', ...opts });
}

function appshot(b, args) {
  const before = cpuOf(engines[b]);
  const r = spawnSync(rusage, [join(builds[b], 'bin', 'appshot'), ...args, '--json'], { env: envOf(b), encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${b}: appshot ${args.join(' ')}: ${r.stderr}`);
  const [, wallUs, cpuUs] = /RUSAGE (\d+) (\d+)/.exec(r.stderr) ?? [];
  return { wall: Number(wallUs) / 1000, cpu: Number(cpuUs) / 1000 + cpuOf(engines[b]) - before, json: JSON.parse(r.stdout) };
}

function waitReady(b, aid) {
  const log = join(homes[b], 'apps', aid, 'log');
  const until = Date.now() + 120_000;
  for (;;) {
    try {
      if (/READY/.test(readFileSync(log, 'utf8'))) return;
    } catch {
      /* not yet */
    }
    if (Date.now() > until) throw new Error(`${b}: ${aid} never got ready`);
    spawnSync('sleep', ['0.05']);
  }
}

const rows = [];
function record(size, build, what, values) {
  const row = { size, build, what, ...values, load: load() };
  rows.push(row);
  process.stdout.write(`${JSON.stringify(row)}\n`);
}

function round(size, r, b) {
  const aid = `m${size}r${r}${b}`;
  const run = cli(b, ['run', '-d', '--aid', aid, '--', memapp, String(size)]);
  if (run.status !== 0) throw new Error(`${b}: run: ${run.stderr}`);
  waitReady(b, aid);
  const dir = join(images, `${b}-${size}-${r}`);
  mkdirSync(dir);
  try {
    if (withLr) {
      const lr = appshot(b, ['snapshot', aid, '-o', join(dir, 'lr'), '--leave-running', '--full']);
      record(size, b, 'lr', { wall: lr.wall, cpu: lr.cpu, frozen: lr.json.frozenMs, injected: lr.json.injectedCalls, ...lr.json.phases });
    }
    const warmMib = Number(process.env.BENCH_WARM_MEMORY ?? 0);
    if (warmMib) {
      const f = join(dir, 'warm');
      spawnSync('dd', ['if=/dev/zero', `of=${f}`, 'bs=1M', `count=${warmMib}`, 'status=none']);
      rmSync(f, { force: true });
    }
    const def = appshot(b, ['snapshot', aid, '-o', join(dir, 'img'), '--full']);
    record(size, b, 'def', { wall: def.wall, cpu: def.cpu, frozen: def.json.frozenMs, injected: def.json.injectedCalls, ...def.json.phases });
    // BENCH_RESTORE=1: the image restored at once (eager), as a migration
    // does: what the way its page file was written costs the next command.
    if (process.env.BENCH_RESTORE === '1') {
      const rs = appshot(b, ['restore', join(dir, 'img'), '--aid', `${aid}r`]);
      record(size, b, 'restore', { wall: rs.wall, cpu: rs.cpu, frozen: 0 });
    }
  } finally {
    cli(b, ['rm', '-f', aid, `${aid}r`]);
    rmSync(dir, { recursive: true, force: true });
  }
}

const fmt = (xs) => `${median(xs).toFixed(1)} (${Math.min(...xs).toFixed(1)}-${Math.max(...xs).toFixed(1)})`;

try {
  for (const b of Object.keys(builds)) {
    mkdirSync(homes[b], { recursive: true });
    cli(b, ['engine', 'start'], { stdio: 'ignore' });
    engines[b] = JSON.parse(cli(b, ['engine', 'status', '--json']).stdout).pid;
    if (!engines[b]) throw new Error(`${b}: the engine did not start`);
  }
  // Rounds unmeasured: the engines' code warm.
  const warm = Number(process.env.BENCH_WARM ?? 1);
  for (let w = 0; w < warm; w++) for (const b of Object.keys(builds)) for (const size of sizes) round(size, `w${w}`, b);
  rows.length = 0;
  for (let r = 0; r < runs; r++)
    for (const size of sizes) {
      const order = r % 2 ? ['new', 'old'] : ['old', 'new'];
      for (const b of order) round(size, r, b);
    }
  const loads = rows.map((x) => x.load);
  process.stdout.write(`\nload average (1 min) during: ${Math.min(...loads)}-${Math.max(...loads)}, median ${median(loads)}\n`);
  for (const size of sizes)
    for (const what of [...(withLr ? ['lr'] : []), 'def', ...(process.env.BENCH_RESTORE === '1' ? ['restore'] : [])]) {
      const keys = Object.keys(rows.find((x) => x.size === size && x.what === what)).filter((k) => !['size', 'build', 'what', 'load'].includes(k));
      process.stdout.write(`\n${size} MiB, ${what}: old / new\n`);
      for (const k of keys) {
        const v = (b) => rows.filter((x) => x.size === size && x.what === what && x.build === b).map((x) => x[k]);
        process.stdout.write(`  ${k.padEnd(12)} ${fmt(v('old'))} / ${fmt(v('new'))}\n`);
      }
      // Paired by round (the two builds' snapshots of the same round run
      // one after the other): less swayed by the load's swings than the
      // medians above, whose tails differ run to run.
      const frozen = (b) => rows.filter((x) => x.size === size && x.what === what && x.build === b).map((x) => x.frozen);
      const old = frozen('old');
      const diffs = frozen('new').map((f, i) => f - old[i]);
      process.stdout.write(`  frozen, paired by round: new - old median ${median(diffs).toFixed(2)} ms, new lower in ${diffs.filter((d) => d < 0).length} of ${diffs.length}\n`);
      const cpu = (b) => rows.filter((x) => x.size === size && x.what === what && x.build === b).map((x) => x.cpu);
      const oldCpu = cpu('old');
      const cpuDiffs = cpu('new').map((c, i) => c - oldCpu[i]);
      process.stdout.write(`  cpu, paired by round: new - old median ${median(cpuDiffs).toFixed(1)} ms, new lower in ${cpuDiffs.filter((d) => d < 0).length} of ${cpuDiffs.length}\n`);
    }
} finally {
  for (const b of Object.keys(builds)) cli(b, ['engine', 'stop'], { stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  rmSync(images, { recursive: true, force: true });
}
