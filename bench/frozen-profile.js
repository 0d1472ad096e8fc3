// Where the tiny application's frozen window goes, step by step, with a
// warm engine: BENCH_ROUNDS (default 15) rounds, each a default snapshot
// (BENCH_MODE=default; `leave-running` for --leave-running) of a fresh
// memapp of BENCH_MIB MiB (default 0: the tiny app), through bin/appshot
// with APPSHOT_PROFILE=1 and APPSHOT_DEBUG=1 (the steps of the frozen
// window and the snapshot's phases, on stderr), after one round not
// counted.
//
// Paired A/B: BENCH_BUILDS="main=/tmp/base,new=." runs several builds
// (each its own state directory and engine) in one run, their snapshots
// alternating one by one, which one first alternating by round. Prints
// per build the median frozenMs, heldMs and injected calls, each phase
// and each step of the frozen window (steps' medians do not add up to the
// median total: a preemption falls into a random step). --json: the raw
// medians.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pairedCleanUp, engineEnv, median, pairedBuilds } from './measure.js';

const here = join(dirname(fileURLToPath(import.meta.url)), '..');
const rounds = Number(process.env.BENCH_ROUNDS ?? 15);
const MIB = Number(process.env.BENCH_MIB ?? 0);
const leaveRunning = process.env.BENCH_MODE === 'leave-running';
const memapp = join(here, 'bench', 'bin', 'memapp');
const builds = pairedBuilds(here, 'frozen-profile');
const work = mkdtempSync(join(tmpdir(), 'appshot-bench-frozen-profile-images-'));
// BENCH_PROFILE=0: the frozen time alone, without the profile's own
// timing of each step (and its report) in the window.
const profiled = process.env.BENCH_PROFILE !== '0';
const envOf = (b, extra = {}) => engineEnv(b, profiled ? { APPSHOT_PROFILE: '1', APPSHOT_DEBUG: '1', ...extra } : extra);
const cli = (b, args, extra) => spawnSync(join(b.root, 'bin', 'appshot'), args, { cwd: work, env: envOf(b, extra), encoding: 'utf8' });
let n = 0;

function waitReady(b, aid) {
  const log = join(b.home, 'apps', aid, 'log');
  for (let i = 0; i < 400; i++) {
    try {
      if (/READY/.test(readFileSync(log, 'utf8'))) return;
    } catch {
      /* not yet */
    }
    spawnSync('sleep', ['0.02']);
  }
  throw new Error(`${b.name}: ${aid} never said READY`);
}

/** One snapshot of a fresh app: its figures and its frozen window's steps. */
function snapshotOnce(b) {
  const aid = `f${n++}`;
  const run = cli(b, ['run', '-d', '--aid', aid, '--', memapp, String(MIB)]);
  if (run.status !== 0) throw new Error(`${b.name}: run failed: ${run.stderr}`);
  waitReady(b, aid);
  spawnSync('sleep', ['0.1']);
  const r = cli(b, ['snapshot', aid, '-o', join(work, `${b.name}-${aid}`), '--json', ...(leaveRunning ? ['--leave-running'] : [])]);
  if (r.status !== 0) throw new Error(`${b.name}: snapshot failed (${r.status}): ${r.stderr}`);
  const j = JSON.parse(r.stdout);
  const steps = {};
  let inProfile = false;
  for (const line of r.stderr.split('\n')) {
    if (/^appshot: profile of the frozen window:/.test(line)) {
      inProfile = true;
      continue;
    }
    const m = inProfile && /^\s+([\d.]+) ms\s+\d+x\s+(.*?)(?: \(\d+ calls injected\))?$/.exec(line);
    if (m) steps[m[2]] = (steps[m[2]] ?? 0) + Number(m[1]);
    else inProfile = false;
  }
  if (leaveRunning) cli(b, ['kill', aid]);
  cli(b, ['rm', '-f', aid]);
  rmSync(join(work, `${b.name}-${aid}`), { recursive: true, force: true });
  return { frozenMs: j.frozenMs, heldMs: j.phases.heldMs, totalMs: j.totalMs, injectedCalls: j.injectedCalls, phases: j.phases, steps };
}

const cleanUp = pairedCleanUp(builds, [], [work]);

try {
  for (const b of builds) execFileSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), 'engine', 'start'], { env: envOf(b), stdio: 'ignore' });
  const results = new Map(builds.map((b) => [b.name, []]));
  const loads = [];
  for (let i = -1; i < rounds; i++) {
    const order = i % 2 ? builds : [...builds].reverse();
    for (const b of order) {
      const r = snapshotOnce(b);
      if (i >= 0) results.get(b.name).push(r);
    }
    loads.push(Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]));
  }
  const report = {};
  for (const b of builds) {
    const all = results.get(b.name);
    const stepNames = [...new Set(all.flatMap((r) => Object.keys(r.steps)))];
    const steps = Object.fromEntries(stepNames.map((s) => [s, +median(all.map((r) => r.steps[s] ?? 0)).toFixed(3)]).sort((x, y) => y[1] - x[1]));
    const phases = Object.fromEntries(Object.keys(all[0].phases ?? {}).map((p) => [p, +median(all.map((r) => r.phases[p])).toFixed(2)]));
    report[b.name] = {
      frozenMs: +median(all.map((r) => r.frozenMs)).toFixed(3),
      frozenMinMax: [Math.min(...all.map((r) => r.frozenMs)), Math.max(...all.map((r) => r.frozenMs))],
      // Round by round (--json): for paired differences between builds.
      frozenEach: all.map((r) => r.frozenMs),
      // The window's time on a CPU (profile.ts, schedstat), round by
      // round: the work, apart from the waits for a CPU that a loaded
      // machine adds.
      onCpuEach: all.map((r) => r.steps['(window: on a CPU)']),
      heldMs: +median(all.map((r) => r.heldMs)).toFixed(2),
      totalMs: +median(all.map((r) => r.totalMs)).toFixed(2),
      injectedCalls: median(all.map((r) => r.injectedCalls)),
      phases,
      steps,
    };
  }
  const load = { median: median(loads), min: Math.min(...loads), max: Math.max(...loads) };
  // Paired: per round, each build's frozen time and time on a CPU less
  // the first build's, medians.
  const paired = {};
  for (const b of builds.slice(1)) {
    const first = report[builds[0].name];
    const diff = (k) => median(report[b.name][k].map((v, i) => v - first[k][i]).filter((v) => Number.isFinite(v)));
    paired[`${b.name} - ${builds[0].name}`] = { frozenMs: +diff('frozenEach').toFixed(3), onCpuMs: +diff('onCpuEach').toFixed(3) };
  }
  if (process.argv.includes('--json')) console.log(JSON.stringify({ mib: MIB, mode: leaveRunning ? 'leave-running' : 'default', rounds, load, paired, builds: report }, null, 2));
  else {
    console.log(`${leaveRunning ? '--leave-running' : 'default'} snapshots of a ${MIB} MiB memapp, ${rounds} rounds, builds alternating; medians (ms); load (1 min) median ${load.median}, ${load.min}–${load.max}`);
    const names = builds.map((b) => b.name);
    console.log(`| | ${names.join(' | ')} |\n|---|${names.map(() => '---').join('|')}|`);
    for (const k of ['frozenMs', 'heldMs', 'totalMs', 'injectedCalls']) console.log(`| ${k} | ${names.map((x) => report[x][k]).join(' | ')} |`);
    console.log(`| frozen min–max | ${names.map((x) => report[x].frozenMinMax.join('–')).join(' | ')} |`);
    for (const [pair, d] of Object.entries(paired)) console.log(`| paired median ${pair}: frozen, on a CPU | ${d.frozenMs} ms, ${d.onCpuMs} ms |`);
    for (const p of Object.keys(report[names[0]].phases)) console.log(`| phase ${p} | ${names.map((x) => report[x].phases[p]).join(' | ')} |`);
    const labels = [...new Set(names.flatMap((x) => Object.keys(report[x].steps)))];
    for (const l of labels) console.log(`| step: ${l} | ${names.map((x) => report[x].steps[l] ?? '–').join(' | ')} |`);
  }
} finally {
  cleanUp();
}
