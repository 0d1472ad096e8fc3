// npm run bench, part five: what kernel objects cost a snapshot and a
// restore, per object. bench/objapp holds N established TCP connections to
// itself (both ends inside: 2N sockets, carried by TCP repair) and M POSIX
// record locks on one file; each (N, M) of (0, 0), (N, 0), (0, M), (N, M)
// goes, in every round, through
//   appshot run, the check below,
//   appshot snapshot --leave-running --full, the check (the application
//     resumed intact),
//   appshot snapshot --full (default mode: the application ends),
//   appshot restore of that image, the check.
// The check (SIGUSR1 to objapp) makes every connection carry a message
// each way and a forked checker find every lock: a restore that lost
// anything fails the run instead of giving a figure. Measured: frozenMs and
// the command's wall (bench/rusage) of both snapshots, totalMs of the
// default one, restoreMs and the wall of the restore. Cost per object =
// (median with - median without) / count, the baseline (0, 0) from the
// same rounds. BENCH_RUNS rounds (default 5), BENCH_OBJECTS=N,M (default
// 1000,10000).
//
// Results: bench/results/objects-DATE.json (-2, -3... for later runs the
// same day) with every sample, and a table on stdout. --json: the results
// on stdout instead of the table.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { read, runBench, summary, timed as timedRun, waitFor } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const objapp = join(root, 'bench', 'bin', 'objapp');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const [conns, locks] = (process.env.BENCH_OBJECTS ?? '1000,10000').split(',').map(Number);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-objects-'));
// On a disk like the other benchmarks (the prefix .gitignore ignores).
const work = mkdtempSync(join(process.env.BENCH_DIR ?? root, '.bench-images-objects-'));
const env = { ...process.env, APPSHOT_HOME: home };
const log = (s) => process.stderr.write(`bench/objects: ${s}\n`);
const aids = new Set();

if (!existsSync(objapp)) {
  log(`${objapp} is missing: run make -C bench`);
  process.exit(1);
}

const timed = (cmd, args) => timedRun(cmd, args, { env });
const appshot = (...args) => {
  const r = timed(process.execPath, [cli, ...args, '--json']);
  return { ...r, json: JSON.parse(r.out) };
};
const appLog = (aid) => read(join(home, 'apps', aid, 'log'));

/** Asks objapp to check every connection and lock; throws on its FAIL. */
async function check(aid, when) {
  const before = (appLog(aid).match(/^VERIFIED /gm) ?? []).length;
  timed(process.execPath, [cli, 'kill', '-s', 'USR1', aid]);
  await waitFor(`${aid}'s check ${when}`, () => {
    const text = appLog(aid);
    const fail = /^FAIL: .*$/m.exec(text);
    if (fail) throw new Error(`${aid} ${when}: ${fail[0]}`);
    return (text.match(/^VERIFIED /gm) ?? []).length > before;
  });
}

const CONFIGS = [
  [0, 0],
  [conns, 0],
  [0, locks],
  [conns, locks],
];
const key = ([c, l]) => `${c}c${l}l`;

const ROWS = [
  ['frozen_lr', 'frozen, --leave-running (ms)'],
  ['snapshot_lr_wall', 'snapshot --leave-running, whole command wall (ms)'],
  ['frozen', 'frozen, default snapshot (ms)'],
  ['held', '  kept stopped until the image is on disk (ms)'],
  ['snapshot_total', 'default snapshot, totalMs (ms)'],
  ['snapshot_wall', 'default snapshot, whole command wall (ms)'],
  ['restore', 'restore, restoreMs (ms)'],
  ['restore_wall', 'restore, whole command wall (ms)'],
];

async function round([c, l], n, r) {
  const aid = `o${key([c, l])}-${n}`;
  const dir = mkdtempSync(join(work, `${aid}-`));
  aids.add(aid);
  timed(process.execPath, [cli, 'run', '-d', '--aid', aid, '--', objapp, String(c), String(l), dir]);
  await waitFor(`${aid} to be ready`, () => {
    const text = appLog(aid);
    if (/^FAIL: /m.test(text)) throw new Error(`${aid}: ${text.trim()}`);
    return /^READY /m.test(text);
  });
  await check(aid, 'before the snapshots');
  const lr = appshot('snapshot', aid, '-o', join(dir, 'lr'), '--leave-running', '--full');
  r.frozen_lr.push(lr.json.frozenMs);
  r.snapshot_lr_wall.push(lr.wallMs);
  await check(aid, 'after snapshot --leave-running');
  const def = appshot('snapshot', aid, '-o', join(dir, 'img'), '--full');
  r.frozen.push(def.json.frozenMs);
  r.held.push(def.json.phases?.heldMs);
  r.snapshot_total.push(def.json.totalMs);
  r.snapshot_wall.push(def.wallMs);
  const rst = appshot('restore', join(dir, 'img'));
  r.restore.push(rst.json.restoreMs);
  r.restore_wall.push(rst.wallMs);
  await check(aid, 'after the restore');
  spawnSync(process.execPath, [cli, 'rm', '-f', aid], { env });
  aids.delete(aid);
  rmSync(dir, { recursive: true, force: true });
}

/** Per object, in µs: (with - without) / count, from the medians. */
function perObject(results, k, config, count) {
  const a = results[key(config)][k];
  const b = results[key([0, 0])][k];
  return a && b ? +(((a.median - b.median) / count) * 1000).toFixed(1) : undefined;
}

async function main() {
  const data = Object.fromEntries(CONFIGS.map((cfg) => [key(cfg), Object.fromEntries(ROWS.map(([k]) => [k, []]))]));
  const loads = [];
  for (let n = 0; n < runs; n++)
    for (const cfg of CONFIGS) {
      loads.push(loadavg()[0]);
      log(`round ${n + 1}/${runs}: ${cfg[0]} connections, ${cfg[1]} locks`);
      await round(cfg, n, data[key(cfg)]);
    }
  const results = Object.fromEntries(CONFIGS.map((cfg) => [key(cfg), Object.fromEntries(ROWS.map(([k]) => [k, summary(data[key(cfg)][k])]))]));
  const per = Object.fromEntries(
    ROWS.map(([k]) => {
      const conn = perObject(results, k, [conns, 0], conns);
      const lock = perObject(results, k, [0, locks], locks);
      const both = results[key([conns, locks])][k];
      const base = results[key([0, 0])][k];
      // Both at once against the sum of each alone: more would mean they
      // cost each other something.
      const predicted = base && conn !== undefined && lock !== undefined ? +(base.median + (conn * conns + lock * locks) / 1000).toFixed(1) : undefined;
      return [k, { us_per_connection: conn, us_per_lock: lock, both_ms: both?.median, both_predicted_ms: predicted }];
    }),
  );
  const out = {
    date: new Date().toISOString(),
    machine: { cpus: cpus().length, model: cpus()[0]?.model, kernel: release(), loadavg_during: summary(loads) },
    runs,
    connections: conns,
    locks,
    rows: Object.fromEntries(ROWS),
    results,
    per_object: per,
    raw: data,
  };
  const outDir = join(root, 'bench', 'results');
  mkdirSync(outDir, { recursive: true });
  let file = join(outDir, `objects-${out.date.slice(0, 10)}.json`);
  for (let i = 2; existsSync(file); i++) file = join(outDir, `objects-${out.date.slice(0, 10)}-${i}.json`);
  writeFileSync(file, JSON.stringify(out, null, 2) + '\n');
  if (process.argv.includes('--json')) console.log(JSON.stringify(out, null, 2));
  else printTable(out);
  log(`results in ${file}`);
}

function printTable(out) {
  const cell = (s) => (s ? `${s.median} (${s.min}–${s.max})` : '–');
  const lines = [
    `${out.connections} established TCP connections (both ends in the application) and ${out.locks} POSIX locks, median (min–max) of ${out.runs}, load ${out.machine.loadavg_during?.median}`,
    `| | none | ${conns} conns | ${locks} locks | both | µs per conn | µs per lock | both, if additive |`,
    '|---|---|---|---|---|---|---|---|',
  ];
  for (const [k, label] of ROWS) {
    const p = out.per_object[k];
    lines.push(`| ${label} | ${CONFIGS.map((cfg) => cell(out.results[key(cfg)][k])).join(' | ')} | ${p.us_per_connection ?? '–'} | ${p.us_per_lock ?? '–'} | ${p.both_predicted_ms ?? '–'} |`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

function cleanup() {
  if (aids.size) spawnSync(process.execPath, [cli, 'rm', '-f', ...aids], { env });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}

await runBench(main, cleanup, log);
