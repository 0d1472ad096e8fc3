// Where the time of one clone goes, step by step, with a warm engine:
// BENCH_ROW (default 30) single clones of a 16 MiB memapp template in a
// row, each its own `appshot clone --json` command through bin/appshot
// (APPSHOT_DEBUG=1 for the restore's phase lines), then all removed;
// BENCH_RUNS (default 3) such rows, after one not counted; and in each
// round, batches of BENCH_BATCHES (default "8,32"; "" for none) clones in
// one command (cloneMs per instance and the command's wall time per
// instance).
//
// Paired A/B: BENCH_BUILDS="main=/work/main,new=." profiles several
// builds (each its own state directory, template and engine) in one run:
// their single clones alternate one by one, their batches batch by batch. Prints, per build: the median of each step's
// time (the gap between one phase line and the one before it), the
// injected calls (stops) per clone, cloneMs of the first 5 and the last 5
// clones of a row (what a row of clones costs those that come late), the
// command's wall time. --json: the raw medians.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pairedCleanUp, engineEnv, median, pairedBuilds } from './measure.js';

const here = join(dirname(fileURLToPath(import.meta.url)), '..');
const runs = Number(process.env.BENCH_RUNS ?? 3);
const row = Number(process.env.BENCH_ROW ?? 30);
const MIB = Number(process.env.BENCH_MIB ?? 16);
// BENCH_STEPS=0: no phase lines (their writes cost the clone a little
// time of its own, more in a build that says more phases).
const STEPS = process.env.BENCH_STEPS !== '0';
const BATCHES = (process.env.BENCH_BATCHES ?? '8,32').split(',').filter(Boolean).map(Number);
if (!BATCHES.every((n) => Number.isInteger(n) && n > 1)) throw new Error(`BENCH_BATCHES='${process.env.BENCH_BATCHES}': expected sizes above 1, e.g. 8,32`);
const memapp = join(here, 'bench', 'bin', 'memapp');
const builds = pairedBuilds(here, 'clone-profile');
const work = mkdtempSync(join(here, '.bench-images-clone-profile-'));
const envOf = engineEnv;
const node = (b, args, extra) => execFileSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), ...args], { cwd: work, env: envOf(b, { APPSHOT_ENGINE: 'off', ...extra }), stdio: 'ignore' });
let n = 0;

/** One clone; its steps: [label, ms since the step before]. */
function cloneOnce(b) {
  const aid = `p${n++}`;
  const start = process.hrtime.bigint();
  const r = spawnSync(join(b.root, 'bin', 'appshot'), ['clone', `${b.name}.template`, '--aid', aid, '--json'], { cwd: work, env: envOf(b, STEPS ? { APPSHOT_DEBUG: '1' } : {}), encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${b.name}: clone failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout)[0];
  const steps = [];
  let last = 0;
  let calls = 0;
  for (const line of r.stderr.split('\n')) {
    let m = /^clone: (template opened|node and mapped files checked|instance 1 planned) in ([\d.]+) ms/.exec(line);
    if (m) steps.push([`clone: ${m[1]}`, Number(m[2])]);
    m = /^([\d.]+) ms, (\d+) calls injected: (.*)$/.exec(line);
    if (m) {
      const label = m[3].replace(/^process \d+$/, 'process (seed taken, scratch mapped)').replace(/\(\d+ in its chain\)/, '');
      steps.push([`restore: ${label}`, Number(m[1]) - last]);
      last = Number(m[1]);
      calls = Number(m[2]);
    }
    m = /^clone: instance 1 made in ([\d.]+) ms/.exec(line);
    if (m) steps.push(['clone: after the restore returned', Number(m[1]) - (steps.find(([l]) => l === 'clone: instance 1 planned')?.[1] ?? 0) - last]);
  }
  return { aid, wall, cloneMs: made.cloneMs, calls: made.injectedCalls ?? calls, steps };
}

const results = new Map(builds.map((b) => [b.name, { rows: [], batches: new Map(BATCHES.map((n) => [n, { cloneMs: [], wall: [], calls: [] }])) }]));

/** One batch of `count` clones in one command. */
function batchOnce(b, count, counting) {
  const aid = `p${n++}`;
  const start = process.hrtime.bigint();
  const r = spawnSync(join(b.root, 'bin', 'appshot'), ['clone', `${b.name}.template`, '--aid', aid, '--count', String(count), '--json'], { cwd: work, env: envOf(b), encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${b.name}: clone --count ${count} failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout);
  if (counting) {
    const row = results.get(b.name).batches.get(count);
    row.cloneMs.push(median(made.map((c) => c.cloneMs)));
    row.wall.push(wall / count);
    row.calls.push(median(made.map((c) => c.injectedCalls ?? NaN)));
  }
  const rm = spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', ...made.map((c) => c.aid)], { cwd: work, env: envOf(b), stdio: 'ignore' });
  if (rm.status !== 0) throw new Error(`${b.name}: rm failed`);
}
const cleanUp = pairedCleanUp(builds, ['src'], [work]);

try {
  for (const b of builds) {
    node(b, ['run', '-d', '--aid', 'src', '--', memapp, String(MIB)]);
    const log = join(b.home, 'apps', 'src', 'log');
    for (let i = 0; i < 200 && !/READY/.test((() => { try { return readFileSync(log, 'utf8'); } catch { return ''; } })()); i++) spawnSync('sleep', ['0.05']);
    node(b, ['snapshot', 'src', '-o', `${b.name}.appshot`]);
    node(b, ['template', 'create', `${b.name}.appshot`, '-o', `${b.name}.template`]);
    node(b, ['engine', 'start'], { APPSHOT_ENGINE: 'manual' });
  }
  for (let i = -1; i < runs; i++) {
    const order = i % 2 ? builds : [...builds].reverse();
    // The builds' clones alternate one by one (each its own row): the
    // load of a shared machine falls on both alike.
    const made = new Map(builds.map((b) => [b.name, []]));
    for (let k = 0; k < row; k++) for (const b of order) made.get(b.name).push(cloneOnce(b));
    for (const b of order) {
      if (i >= 0) results.get(b.name).rows.push(made.get(b.name));
      const rm = spawnSync(join(b.root, 'bin', 'appshot'), ['rm', '-f', ...made.get(b.name).map((c) => c.aid)], { cwd: work, env: envOf(b), stdio: 'ignore' });
      if (rm.status !== 0) throw new Error(`${b.name}: rm failed`);
    }
    for (const count of BATCHES) for (const b of order) batchOnce(b, count, i >= 0);
  }
  const report = {};
  for (const b of builds) {
    const all = results.get(b.name).rows.flat();
    const labels = [];
    for (const c of all) for (const [l] of c.steps) if (!labels.includes(l)) labels.push(l);
    const steps = Object.fromEntries(
      labels.map((l) => [l, +median(all.map((c) => c.steps.find(([x]) => x === l)?.[1]).filter((x) => Number.isFinite(x))).toFixed(3)]),
    );
    const rows = results.get(b.name).rows;
    report[b.name] = {
      cloneMs: +median(all.map((c) => c.cloneMs)).toFixed(2),
      firstFive: +median(rows.flatMap((r) => r.slice(0, 5).map((c) => c.cloneMs))).toFixed(2),
      lastFive: +median(rows.flatMap((r) => r.slice(-5).map((c) => c.cloneMs))).toFixed(2),
      wallMs: +median(all.map((c) => c.wall)).toFixed(2),
      injectedCalls: median(all.map((c) => c.calls)),
      batches: Object.fromEntries(
        BATCHES.map((count) => {
          const x = results.get(b.name).batches.get(count);
          return [count, { cloneMsPerInstance: +median(x.cloneMs).toFixed(2), wallMsPerInstance: +median(x.wall).toFixed(2), injectedCalls: median(x.calls) }];
        }),
      ),
      steps,
    };
  }
  const load = readFileSync('/proc/loadavg', 'utf8').trim();
  if (process.argv.includes('--json')) console.log(JSON.stringify({ mib: MIB, runs, row, load, builds: report }, null, 2));
  else {
    console.log(`single clones of a ${MIB} MiB memapp template, ${runs} rows of ${row} in a row per build, alternating; medians; load ${load}`);
    const names = builds.map((b) => b.name);
    console.log(`| | ${names.join(' | ')} |\n|---|${names.map(() => '---').join('|')}|`);
    for (const k of ['cloneMs', 'firstFive', 'lastFive', 'wallMs', 'injectedCalls']) console.log(`| single: ${k} | ${names.map((x) => report[x][k]).join(' | ')} |`);
    for (const count of BATCHES)
      for (const k of ['cloneMsPerInstance', 'wallMsPerInstance', 'injectedCalls']) console.log(`| batch of ${count}: ${k} | ${names.map((x) => report[x].batches[count][k]).join(' | ')} |`);
    const labels = [...new Set(names.flatMap((x) => Object.keys(report[x].steps)))];
    for (const l of labels) console.log(`| ${l} | ${names.map((x) => report[x].steps[l] ?? '–').join(' | ')} |`);
  }
} finally {
  cleanUp();
}
