// Clones of a 16 MiB memapp template through a warm resident engine, with
// its pool of clones held ready (src/template/pool.ts) and without it
// (`clone --no-prepared`), in one run, interleaved (the order alternates
// each round): one clone and batches of BENCH_BATCHES (default "8,32"),
// each a `bin/appshot clone --json` command (the native client) without
// --aid (the pool serves generated AIDs only). Per instance: appshot's own
// cloneMs and the command's wall time. Baseline, same run: fork() of the
// running app (a memapp of the same size run by appshot: its own median of
// 7 forks, fork to child running, each round). Before every clone the
// bench waits until the pool holds what it keeps, so that no refill runs
// during a measured clone (in either mode). Medians of BENCH_RUNS (default
// 5) after one round not counted; the load average before and after.
// BENCH_INPROCESS=1 adds APPSHOT_ENGINE=off (a cold CLI) as a third mode.
// Also: the PSS of the held instances (smaps_rollup of each held process,
// its init included) once the pool is full. --json: the results.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const bin = join(root, 'bin', 'appshot');
const memapp = join(root, 'bench', 'bin', 'memapp');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const MIB = Number(process.env.BENCH_MIB ?? 16);
const BATCHES = (process.env.BENCH_BATCHES ?? '8,32').split(',').filter(Boolean).map(Number);
if (!BATCHES.every((n) => Number.isInteger(n) && n > 1)) throw new Error(`BENCH_BATCHES='${process.env.BENCH_BATCHES}': expected sizes above 1, e.g. 8,32`);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-clone-engine-'));
const work = mkdtempSync(join(root, '.bench-images-clone-engine-'));
const template = resolve(work, 'tpl.template');
const engineEnv = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '600' };
const off = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' };
const modes = {
  'engine, pool': { env: engineEnv, args: [] },
  'engine, no pool': { env: engineEnv, args: ['--no-prepared'] },
  ...(process.env.BENCH_INPROCESS === '1' ? { 'in-process': { env: off, args: [] } } : {}),
};
const quiet = (...a) => execFileSync(process.execPath, [cli, ...a], { cwd: work, env: off, stdio: 'ignore' });
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const sleep = (ms) => spawnSync('sleep', [String(ms / 1000)]);
const status = () => JSON.parse(execFileSync(bin, ['engine', 'status', '--json'], { env: engineEnv, encoding: 'utf8' }));
const readLog = (aid) => {
  try {
    return readFileSync(join(home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};

/** Waits until the pool holds what it keeps (nothing is being made). */
function poolSettled() {
  for (let i = 0; i < 1200; i++) {
    const p = status().clonePool?.[template];
    if (!p || p.held >= p.target) return;
    sleep(50);
  }
  throw new Error('the pool did not fill in a minute');
}

const results = {};
const forks = [];
const loads = [loadavg()];

function clone(mode, count, counting) {
  if (modes[mode].env === engineEnv) poolSettled();
  const start = process.hrtime.bigint();
  const r = spawnSync(bin, ['clone', 'tpl.template', '--count', String(count), '--json', ...modes[mode].args], { cwd: work, env: modes[mode].env, encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${mode}: clone failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout);
  if (made.length !== count) throw new Error(`${mode}: ${made.length} instances, not ${count}`);
  if (counting) {
    const row = ((results[count === 1 ? 'single' : `batch of ${count}`] ??= {})[mode] ??= { wall: [], perInstance: [], fromPool: [] });
    row.wall.push(wall / count);
    row.perInstance.push(median(made.map((c) => c.cloneMs)));
    row.fromPool.push(made.filter((c) => c.prepared).length / count);
  }
  execFileSync(bin, ['rm', '-f', ...made.map((c) => c.aid)], { cwd: work, env: engineEnv, stdio: 'ignore' });
}

/** fork() of the running app: memapp's own median of 7, in ms. */
function forkMs() {
  const pid = JSON.parse(execFileSync(bin, ['ps', 'fk', '--json'], { env: engineEnv, encoding: 'utf8' }))[0].processes.find((p) => p.vpid === 2).pid;
  const before = (readLog('fk').match(/^FORK /gm) ?? []).length;
  process.kill(pid, 'SIGUSR2');
  for (let i = 0; i < 400; i++) {
    const all = [...readLog('fk').matchAll(/^FORK ([\d.]+)$/gm)];
    if (all.length > before) return Number(all[all.length - 1][1]) / 1000;
    sleep(25);
  }
  throw new Error('memapp did not report its fork');
}

/** PSS of every process of the held instances (their inits too), in MiB,
 * and how many processes that is. */
function heldPss() {
  const listed = JSON.parse(execFileSync(bin, ['ps', '--json'], { env: engineEnv, encoding: 'utf8' })).filter((a) => a.state === 'restoring');
  let kib = 0;
  let procs = 0;
  for (const a of listed)
    for (const p of a.processes) {
      const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p.pid}/smaps_rollup`, 'utf8'));
      kib += Number(m?.[1] ?? 0);
      procs++;
    }
  return { instances: listed.length, processes: procs, pssMiB: kib / 1024 };
}

function cleanUp() {
  spawnSync(process.execPath, [cli, 'engine', 'stop'], { env: off, stdio: 'ignore' });
  const running = () => {
    try {
      return JSON.parse(spawnSync(process.execPath, [cli, 'engine', 'status', '--json'], { env: off, encoding: 'utf8' }).stdout).running === true;
    } catch {
      return false;
    }
  };
  for (let i = 0; i < 100 && running(); i++) sleep(100);
  spawnSync(process.execPath, [cli, 'stop', 'fk', '--signal', 'KILL'], { env: off, stdio: 'ignore' });
  for (let i = 0; i < 100 && spawnSync(process.execPath, [cli, 'ps', '-q'], { env: off, encoding: 'utf8' }).stdout.trim(); i++) sleep(100);
  spawnSync(process.execPath, [cli, 'rm', '-f', 'fk', 'src'], { env: off, stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

let held;
try {
  quiet('run', '-d', '--aid', 'src', '--', memapp, String(MIB));
  quiet('run', '-d', '--aid', 'fk', '--', memapp, String(MIB));
  for (let i = 0; i < 200 && !(/READY/.test(readLog('src')) && /READY/.test(readLog('fk'))); i++) sleep(50);
  quiet('snapshot', 'src', '-o', 'src.appshot');
  quiet('template', 'create', 'src.appshot', '-o', 'tpl.template');
  quiet('engine', 'start');
  const order0 = Object.keys(modes);
  for (let i = -1; i < runs; i++) {
    const order = i % 2 ? [...order0].reverse() : order0;
    for (const m of order) clone(m, 1, i >= 0);
    for (const batch of BATCHES) for (const m of order) clone(m, batch, i >= 0);
    if (i >= 0) forks.push(forkMs());
  }
  poolSettled();
  held = heldPss();
  loads.push(loadavg());
  const fork = median(forks);
  const rows = [];
  for (const [what, byMode] of Object.entries(results))
    for (const [mode, r] of Object.entries(byMode)) {
      const per = median(r.perInstance);
      rows.push({ what, mode, cloneMsPerInstance: +per.toFixed(3), wallMsPerInstance: +median(r.wall).toFixed(2), fromPool: +median(r.fromPool).toFixed(2), vsFork: +(per / fork).toFixed(2) });
    }
  const out = { mib: MIB, runs, load: loads, forkMs: +fork.toFixed(3), forkMinMax: [Math.min(...forks), Math.max(...forks)], held, rows };
  if (process.argv.includes('--json')) console.log(JSON.stringify(out, null, 2));
  else {
    console.log(`clone of a ${MIB} MiB memapp template through a warm engine, medians of ${runs}; load ${loads.join(' -> ')}`);
    console.log(`fork() of the running app (baseline): ${fork.toFixed(3)} ms [${out.forkMinMax.map((x) => x.toFixed(3)).join('-')}]`);
    console.log('| | mode | cloneMs per instance | wall ms per instance | share from the pool | cloneMs / fork |\n|---|---|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.what} | ${r.mode} | ${r.cloneMsPerInstance} | ${r.wallMsPerInstance} | ${r.fromPool} | ${r.vsFork} |`);
    console.log(`held: ${held.instances} instances, ${held.processes} processes, PSS ${held.pssMiB.toFixed(1)} MiB in all (${(held.pssMiB / Math.max(1, held.instances)).toFixed(2)} MiB each)`);
  }
} finally {
  cleanUp();
}
