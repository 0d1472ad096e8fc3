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
//
// Rows off by default (heavy: not for CI), each an environment knob:
//  - BENCH_MIB=1024: the 1 GiB memapp (any size).
//  - BENCH_APP=redis: a redis-server holding BENCH_REDIS_KEYS (default
//    100000) keys of ~100 bytes, made a template with templates/redis.rules
//    (its port allocated per clone), instead of memapp; its fork()
//    baseline is redis's own latest_fork_usec of a BGSAVE of a second
//    server run by appshot with the same data, each round.
//  - BENCH_MANY=1000: after the rows, that many clones by one `clone
//    --count N` command through the warm engine (its pool full for the
//    last batch size first), and by batches of 32 one after another;
//    the time in all, and appshot's own cloneMs summed.
//  - BENCH_IDLE=32: after the rows, a batch of that many clones left
//    idle for BENCH_IDLE_WAIT_MS (default 3000), then the PSS of all their
//    processes (their inits too), in all.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
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
const APP = process.env.BENCH_APP ?? 'memapp';
if (!['memapp', 'redis'].includes(APP)) throw new Error(`BENCH_APP='${APP}': expected memapp or redis`);
const KEYS = Number(process.env.BENCH_REDIS_KEYS ?? 100_000);
const MANY = Number(process.env.BENCH_MANY ?? 0);
const IDLE = Number(process.env.BENCH_IDLE ?? 0);
const IDLE_WAIT_MS = Number(process.env.BENCH_IDLE_WAIT_MS ?? 3000);
const redisPorts = [31000 + (process.pid % 400) * 2, 31001 + (process.pid % 400) * 2];
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

/** One command to the redis on `port` (redis-cli): its reply. */
const redisCli = (port, ...args) => execFileSync('redis-cli', ['-p', String(port), ...args], { encoding: 'utf8' }).trim();

/** A redis-server run by appshot as `aid` on `port`, loaded with KEYS keys. */
function runRedis(aid, port) {
  const rules = join(work, 'redis.rules');
  writeFileSync(rules, readFileSync(join(root, 'templates', 'redis.rules'), 'utf8').replaceAll('6379', String(port)));
  quiet('run', '-d', '--aid', aid, '--rules', rules, '--', 'redis-server', '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', work, '--dbfilename', `${aid}.rdb`);
  for (let i = 0; i < 400; i++) {
    try {
      if (redisCli(port, 'PING') === 'PONG') break;
    } catch {
      /* not yet */
    }
    sleep(25);
  }
  const value = 'v'.repeat(90);
  const proto = [];
  for (let i = 0; i < KEYS; i++) {
    const key = `key:${String(i).padStart(8, '0')}`;
    const val = `${value}${String(i).padStart(10, '0')}`;
    proto.push(`*3\r\n$3\r\nSET\r\n$${key.length}\r\n${key}\r\n$${val.length}\r\n${val}\r\n`);
  }
  execFileSync('redis-cli', ['-p', String(port), '--pipe'], { input: proto.join(''), stdio: ['pipe', 'ignore', 'inherit'] });
  const size = Number(redisCli(port, 'DBSIZE'));
  if (size !== KEYS) throw new Error(`redis ${aid}: DBSIZE ${size}, not ${KEYS}`);
}

/** fork() of the running redis: its own latest_fork_usec of a BGSAVE, in ms. */
function redisForkMs() {
  const port = redisPorts[1];
  redisCli(port, 'BGSAVE');
  for (let i = 0; i < 400; i++) {
    const info = redisCli(port, 'INFO', 'persistence');
    if (/rdb_bgsave_in_progress:0/.test(info) && /rdb_last_bgsave_status:ok/.test(info)) break;
    sleep(25);
  }
  const usec = /latest_fork_usec:(\d+)/.exec(redisCli(port, 'INFO', 'stats'))?.[1];
  if (usec === undefined) throw new Error('redis: no latest_fork_usec');
  return Number(usec) / 1000;
}

/** fork() of the running app: memapp's own median of 7, in ms. */
function forkMs() {
  if (APP === 'redis') return redisForkMs();
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
  return pssOf(JSON.parse(execFileSync(bin, ['ps', '-a', '--json'], { env: engineEnv, encoding: 'utf8' })).filter((a) => a.state === 'restoring'));
}

/** PSS of every process of `listed` (ps --json entries), their inits too. */
function pssOf(listed) {
  let kib = 0;
  let procs = 0;
  for (const a of listed)
    for (const p of a.processes) {
      try {
        const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p.pid}/smaps_rollup`, 'utf8'));
        kib += Number(m?.[1] ?? 0);
        procs++;
      } catch {
        /* gone meanwhile */
      }
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

/** N clones: by one command, then by batches of 32 back to back (each
 * taking what the pool refilled meanwhile): wall time in all, appshot's
 * own cloneMs summed, and how many came from the pool. */
function manyClones(n) {
  const out = {};
  const ways = { 'one command': [n], 'batches of 32': Array.from({ length: Math.ceil(n / 32) }, (_, i) => Math.min(32, n - i * 32)) };
  for (const [way, counts] of Object.entries(ways)) {
    poolSettled();
    const made = [];
    const start = process.hrtime.bigint();
    for (const count of counts) {
      const r = spawnSync(bin, ['clone', 'tpl.template', '--count', String(count), '--json'], { cwd: work, env: engineEnv, encoding: 'utf8', maxBuffer: 256 << 20 });
      if (r.status !== 0) throw new Error(`${n} clones (${way}): failed (${r.status}): ${r.stderr}`);
      made.push(...JSON.parse(r.stdout));
    }
    const wallMs = Number(process.hrtime.bigint() - start) / 1e6;
    if (made.length !== n) throw new Error(`${way}: ${made.length} instances, not ${n}`);
    const running = JSON.parse(execFileSync(bin, ['ps', '--json'], { env: engineEnv, encoding: 'utf8', maxBuffer: 256 << 20 })).filter((a) => a.state === 'running' && made.some((c) => c.aid === a.aid)).length;
    out[way] = { wallMs: +wallMs.toFixed(0), cloneMsSum: +made.reduce((t, c) => t + c.cloneMs, 0).toFixed(0), fromPool: made.filter((c) => c.prepared).length, running, load: loadavg() };
    for (let i = 0; i < made.length; i += 100) execFileSync(bin, ['rm', '-f', ...made.slice(i, i + 100).map((c) => c.aid)], { cwd: work, env: engineEnv, stdio: 'ignore' });
  }
  return out;
}

/** N clones in one batch, left idle a while: the PSS of all their processes. */
function idleClones(n) {
  poolSettled();
  const r = spawnSync(bin, ['clone', 'tpl.template', '--count', String(n), '--json'], { cwd: work, env: engineEnv, encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${n} idle clones: failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout);
  sleep(IDLE_WAIT_MS);
  const aids = new Set(made.map((c) => c.aid));
  const out = pssOf(JSON.parse(execFileSync(bin, ['ps', '--json'], { env: engineEnv, encoding: 'utf8' })).filter((a) => aids.has(a.aid)));
  // The template's own page cache is what they share: counted once, in
  // their PSS shares; the template's page file size for comparison.
  out.templatePagesMiB = +(statSync(join(template, 'pages.img')).size / 2 ** 20).toFixed(1);
  out.fromPool = made.filter((c) => c.prepared).length;
  execFileSync(bin, ['rm', '-f', ...made.map((c) => c.aid)], { cwd: work, env: engineEnv, stdio: 'ignore' });
  return out;
}

let held;
let many;
let idle;
try {
  if (APP === 'redis') {
    runRedis('src', redisPorts[0]);
    runRedis('fk', redisPorts[1]);
  } else {
    quiet('run', '-d', '--aid', 'src', '--', memapp, String(MIB));
    quiet('run', '-d', '--aid', 'fk', '--', memapp, String(MIB));
    for (let i = 0; i < 200 + MIB && !(/READY/.test(readLog('src')) && /READY/.test(readLog('fk'))); i++) sleep(50);
  }
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
  if (MANY > 0) many = manyClones(MANY);
  if (IDLE > 0) idle = idleClones(IDLE);
  loads.push(loadavg());
  const fork = median(forks);
  const rows = [];
  for (const [what, byMode] of Object.entries(results))
    for (const [mode, r] of Object.entries(byMode)) {
      const per = median(r.perInstance);
      rows.push({ what, mode, cloneMsPerInstance: +per.toFixed(3), wallMsPerInstance: +median(r.wall).toFixed(2), fromPool: +median(r.fromPool).toFixed(2), vsFork: +(per / fork).toFixed(2) });
    }
  const out = { app: APP === 'redis' ? `redis ${KEYS} keys` : `memapp ${MIB} MiB`, mib: MIB, runs, load: loads, forkMs: +fork.toFixed(3), forkMinMax: [Math.min(...forks), Math.max(...forks)], held, rows, ...(many ? { many } : {}), ...(idle ? { idle } : {}) };
  if (process.argv.includes('--json')) console.log(JSON.stringify(out, null, 2));
  else {
    console.log(`clone of a ${out.app} template through a warm engine, medians of ${runs}; load ${loads.join(' -> ')}`);
    console.log(`fork() of the running app (baseline): ${fork.toFixed(3)} ms [${out.forkMinMax.map((x) => x.toFixed(3)).join('-')}]`);
    console.log('| | mode | cloneMs per instance | wall ms per instance | share from the pool | cloneMs / fork |\n|---|---|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.what} | ${r.mode} | ${r.cloneMsPerInstance} | ${r.wallMsPerInstance} | ${r.fromPool} | ${r.vsFork} |`);
    console.log(`held: ${held.instances} instances, ${held.processes} processes, PSS ${held.pssMiB.toFixed(1)} MiB in all (${(held.pssMiB / Math.max(1, held.instances)).toFixed(2)} MiB each)`);
    for (const [way, m] of Object.entries(many ?? {}))
      console.log(`${MANY} clones, ${way}: ${m.wallMs} ms in all (${(m.wallMs / MANY).toFixed(2)} ms each), cloneMs summed ${m.cloneMsSum} ms, ${m.fromPool} from the pool, ${m.running} running; load ${m.load}`);
    if (idle) console.log(`${IDLE} idle clones (${idle.fromPool} from the pool), after ${IDLE_WAIT_MS / 1000} s: ${idle.instances} instances, ${idle.processes} processes, PSS ${idle.pssMiB.toFixed(1)} MiB in all (template pages ${idle.templatePagesMiB} MiB)`);
  }
} finally {
  cleanUp();
}
