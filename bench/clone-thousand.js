// 1,000 clones of one template and their removal, against fork() of 1,000
// children, all in one run (issue 14):
//  (a) fork(): bench/forkmany N forks N children of a small process, each
//      telling its parent it runs, then kills and reaps them all (the
//      baseline for both making and removing);
//  (b) `appshot clone T --count N` through a warm resident engine with its
//      default pool of held clones (APPSHOT_CLONE_POOL unset: 32), T a
//      template of `forkmany idle` (the same small program);
//  (c) the same with a pool large enough for the whole batch
//      (APPSHOT_CLONE_POOL=N, filled before the clone is timed);
//  (d) `appshot rm -f` of all N in one command (each batch's), and once,
//      on (c)'s last batch, the removal one by one that `rm` did before it
//      was batched (lifecycle.ts removeApp for each AID in turn, in one
//      process, as the rm action looped), for the before/after ratio.
// Each batch is checked: N distinct AIDs, N running; after each rm, none of
// them left (registrations, table files in /dev/shm). Before each timed
// clone and rm the pool has settled (no refill competes with it); right
// after the (c) clone answers, the latency of an `appshot ps -q` served
// while the pool refills N instances (how long a refill blocks others).
// Medians of BENCH_RUNS (default 3) for (a)-(d); one-by-one rm once
// (BENCH_RM_BEFORE=0 skips it: ~1 min for 1,000). BENCH_N (default 1000).
// --json: the results. Needs `make -C bench` (bench/bin/forkmany).
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const bin = join(root, 'bin', 'appshot');
const forkmany = join(root, 'bench', 'bin', 'forkmany');
const N = Number(process.env.BENCH_N ?? 1000);
const runs = Number(process.env.BENCH_RUNS ?? 3);
const rmBefore = process.env.BENCH_RM_BEFORE !== '0';
if (!existsSync(forkmany)) throw new Error(`${forkmany} missing: make -C bench`);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-thousand-'));
const work = mkdtempSync(join(root, '.bench-images-thousand-'));
const template = resolve(work, 'tpl.template');
const off = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' };
const engineBase = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '900', APPSHOT_CLONE_POOL_IDLE_MS: '900000' };
delete engineBase.APPSHOT_CLONE_POOL;
const defaultPool = engineBase;
const largePool = { ...engineBase, APPSHOT_CLONE_POOL: String(N) };
const log = (s) => process.stderr.write(`bench/clone-thousand: ${s}\n`);
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const sleep = (ms) => spawnSync('sleep', [String(ms / 1000)]);
const now = () => Number(process.hrtime.bigint()) / 1e6;
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const big = { maxBuffer: 256 << 20, encoding: 'utf8' };

function run(env, args) {
  const r = spawnSync(bin, args, { cwd: work, env, ...big });
  if (r.status !== 0) throw new Error(`appshot ${args.slice(0, 3).join(' ')}… failed (${r.status}): ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`);
  return r.stdout;
}
const status = () => JSON.parse(run(engineBase, ['engine', 'status', '--json']));

/** Waits until the pool holds what it keeps (nothing being made). */
function poolSettled() {
  const until = Date.now() + 600_000;
  while (Date.now() < until) {
    const p = status().clonePool?.[template];
    if (!p || p.held >= p.target) return p?.held ?? 0;
    sleep(200);
  }
  throw new Error('the pool did not fill in 10 minutes');
}

/** Our registrations and table files now. */
function leftOver(aids) {
  const apps = new Set(readdirSync(join(home, 'apps')));
  const shm = readdirSync('/dev/shm').filter((f) => f.startsWith('appshot-'));
  return { apps: aids.filter((a) => apps.has(a)).length, shm: shm.filter((f) => aids.some((a) => f.includes(`-${a}-`))).length };
}

/** The pool in `env`'s context: a clone there gives up what was held
 * for the other one (pool.ts demand), and is refilled to the largest batch
 * of the last minutes (N), at most that context's APPSHOT_CLONE_POOL. */
function prime(env) {
  const one = JSON.parse(run(env, ['clone', template, '--json']));
  run(env, ['rm', '-f', ...one.map((c) => c.aid)]);
}

/** One timed `clone --count N`: wall ms, appshot's own cloneMs summed,
 * how many came from the pool; checked distinct and running. */
function cloneBatch(env, after) {
  prime(env);
  poolSettled();
  const start = now();
  const out = run(env, ['clone', template, '--count', String(N), '--json']);
  const wallMs = now() - start;
  let psMs;
  if (after) psMs = after();
  const made = JSON.parse(out);
  const aids = made.map((c) => c.aid);
  if (new Set(aids).size !== N) throw new Error(`${new Set(aids).size} distinct AIDs, not ${N}`);
  const running = JSON.parse(run(env, ['ps', '--json'])).filter((a) => a.state === 'running' && a.processes.length > 0);
  const mine = new Set(aids);
  const up = running.filter((a) => mine.has(a.aid)).length;
  if (up !== N) throw new Error(`${up} of ${N} clones running`);
  return { aids, wallMs, cloneMsSum: made.reduce((t, c) => t + c.cloneMs, 0), fromPool: made.filter((c) => c.prepared).length, psMs };
}

/** `rm -f` of all of them by one command (batched); checked gone. */
function rmBatch(env, aids) {
  poolSettled();
  const start = now();
  run(env, ['rm', '-f', ...aids]);
  const ms = now() - start;
  const left = leftOver(aids);
  if (left.apps || left.shm) throw new Error(`after rm -f: ${left.apps} registrations, ${left.shm} table files left`);
  return ms;
}

/** The removal one by one, as `rm` did before it was batched: removeApp
 * of each AID in turn, in one process (the engine off, as a cold CLI). */
function rmOneByOne(aids) {
  poolSettled();
  const script = `
    const { removeApp } = await import(${JSON.stringify(join(root, 'dist', 'lifecycle.js'))});
    const { LocalRegistry } = await import(${JSON.stringify(join(root, 'dist', 'registry.js'))});
    const reg = new LocalRegistry(process.env.APPSHOT_HOME);
    const aids = JSON.parse(process.argv[1]);
    const t0 = performance.now();
    for (const aid of aids) await removeApp(reg, aid, true);
    console.log(performance.now() - t0);`;
  const start = now();
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, JSON.stringify(aids)], { cwd: work, env: off, ...big });
  const ms = now() - start;
  if (r.status !== 0) throw new Error(`rm one by one failed: ${r.stderr}`);
  const left = leftOver(aids);
  if (left.apps || left.shm) throw new Error(`after rm one by one: ${left.apps} registrations, ${left.shm} table files left`);
  return ms;
}

function cleanUp() {
  spawnSync(process.execPath, [cli, 'engine', 'stop'], { env: off, stdio: 'ignore' });
  for (let i = 0; i < 600; i++) {
    let running = false;
    try {
      running = JSON.parse(spawnSync(process.execPath, [cli, 'engine', 'status', '--json'], { env: off, encoding: 'utf8' }).stdout).running === true;
    } catch {
      /* none */
    }
    if (!running) break;
    sleep(100);
  }
  const left = spawnSync(process.execPath, [cli, 'ps', '-aq'], { env: off, encoding: 'utf8', maxBuffer: 64 << 20 }).stdout.trim().split('\n').filter(Boolean);
  if (left.length) spawnSync(process.execPath, [cli, 'rm', '-f', ...left], { env: off, stdio: 'ignore', maxBuffer: 64 << 20 });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

const rows = { forkMs: [], forkKillMs: [], defaultPool: [], largePool: [], rmDefault: [], rmLarge: [], psDuringRefillMs: [] };
let oneByOne;
const loads = [loadavg()];
try {
  execFileSync(process.execPath, [cli, 'run', '-d', '--aid', 'src', '--', forkmany, 'idle'], { cwd: work, env: off, stdio: 'ignore' });
  for (let i = 0; i < 200 && !/READY/.test(readFileSync(join(home, 'apps', 'src', 'log'), 'utf8')); i++) sleep(50);
  execFileSync(process.execPath, [cli, 'snapshot', 'src', '-o', 'src.appshot'], { cwd: work, env: off, stdio: 'ignore' });
  execFileSync(process.execPath, [cli, 'template', 'create', 'src.appshot', '-o', template], { cwd: work, env: off, stdio: 'ignore' });
  execFileSync(process.execPath, [cli, 'engine', 'start'], { cwd: work, env: engineBase, stdio: 'ignore' });
  // One round not counted: the engine warm, and each pool sized.
  for (let i = -1; i < runs; i++) {
    const counting = i >= 0;
    const f = JSON.parse(execFileSync(forkmany, [String(N)], { encoding: 'utf8' }));
    const d = cloneBatch(defaultPool);
    const rmD = rmBatch(defaultPool, d.aids);
    // The large pool sized by a batch of N in its context (the first
    // round), then filled before the timed clone (cloneBatch waits).
    const ps = () => {
      const s = now();
      run(largePool, ['ps', '-q']);
      return now() - s;
    };
    const l = cloneBatch(largePool, ps);
    const last = i === runs - 1;
    const rmL = last && rmBefore ? undefined : rmBatch(largePool, l.aids);
    if (last && rmBefore) oneByOne = { ms: rmOneByOne(l.aids) };
    log(`round ${i + 1}/${runs}${counting ? '' : ' (not counted)'}: fork ${f.forkMs.toFixed(0)} ms, clone default pool ${d.wallMs.toFixed(0)} ms (${d.fromPool} from the pool), large pool ${l.wallMs.toFixed(0)} ms (${l.fromPool} from the pool; ps meanwhile ${l.psMs.toFixed(0)} ms), rm -f ${rmD.toFixed(0)}${rmL ? `/${rmL.toFixed(0)}` : ''} ms${oneByOne && last ? `, one by one ${oneByOne.ms.toFixed(0)} ms` : ''}; load ${loadavg()}`);
    if (!counting) continue;
    rows.forkMs.push(f.forkMs);
    rows.forkKillMs.push(f.killMs);
    rows.defaultPool.push(d);
    rows.largePool.push(l);
    rows.rmDefault.push(rmD);
    if (rmL !== undefined) rows.rmLarge.push(rmL);
    rows.psDuringRefillMs.push(l.psMs);
  }
  loads.push(loadavg());
  const fork = median(rows.forkMs);
  const kill = median(rows.forkKillMs);
  const of = (xs, k) => median(xs.map((x) => x[k]));
  const rmAll = [...rows.rmDefault, ...rows.rmLarge];
  const out = {
    n: N,
    runs,
    load: loads,
    fork: { ms: +fork.toFixed(1), killMs: +kill.toFixed(1) },
    clone: {
      defaultPool: { wallMs: +of(rows.defaultPool, 'wallMs').toFixed(0), cloneMsSum: +of(rows.defaultPool, 'cloneMsSum').toFixed(0), fromPool: of(rows.defaultPool, 'fromPool'), vsFork: +(of(rows.defaultPool, 'wallMs') / fork).toFixed(1) },
      largePool: { wallMs: +of(rows.largePool, 'wallMs').toFixed(0), cloneMsSum: +of(rows.largePool, 'cloneMsSum').toFixed(0), fromPool: of(rows.largePool, 'fromPool'), vsFork: +(of(rows.largePool, 'wallMs') / fork).toFixed(1) },
    },
    psDuringRefillMs: +median(rows.psDuringRefillMs).toFixed(0),
    rm: {
      batchedMs: +median(rmAll).toFixed(0),
      batchedAll: rmAll.map((x) => +x.toFixed(0)),
      vsForkKill: +(median(rmAll) / kill).toFixed(1),
      ...(oneByOne ? { oneByOneMs: +oneByOne.ms.toFixed(0), oneByOneVsBatched: +(oneByOne.ms / median(rmAll)).toFixed(1) } : {}),
    },
  };
  if (process.argv.includes('--json')) console.log(JSON.stringify(out, null, 2));
  else {
    console.log(`${N} clones of a template of \`forkmany idle\` through a warm engine, against fork() of ${N} children; medians of ${runs}; load ${loads.join(' -> ')}`);
    console.log(`(a) fork x${N} (to all running): ${out.fork.ms} ms; kill + reap all: ${out.fork.killMs} ms`);
    for (const [what, r] of [['(b) clone, default pool', out.clone.defaultPool], ['(c) clone, pool of ' + N, out.clone.largePool]])
      console.log(`${what}: ${r.wallMs} ms wall (x${r.vsFork} fork), cloneMs summed ${r.cloneMsSum}, ${r.fromPool} from the pool`);
    console.log(`    ps -q while the pool of ${N} refills: ${out.psDuringRefillMs} ms`);
    console.log(`(d) rm -f of ${N}, one command: ${out.rm.batchedMs} ms (x${out.rm.vsForkKill} kill+reap) [${out.rm.batchedAll.join(', ')}]`);
    if (oneByOne) console.log(`    one by one (as before): ${out.rm.oneByOneMs} ms (x${out.rm.oneByOneVsBatched} the batched)`);
  }
} finally {
  cleanUp();
}
