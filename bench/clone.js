// npm run bench (third part): templates and clones, against baselines
// measured in the same run.
//  1. Clone time of one instance (appshot's own cloneMs, without Node's
//     start-up) of bench/memapp with 16 MiB and 1 GiB of touched memory and
//     of a redis-server holding 100k keys, against fork() of the running
//     application and its cold start (memapp: exec to READY; redis: start
//     and load the same dataset until DBSIZE answers it all). Also the
//     per-instance time of a --count 8 batch.
//  2. Memory of N = 1, 8, 32 idle clones of the 1 GiB memapp template (sum
//     of PSS over every process of every clone, appshot-init included and
//     not), against N independent copies (N x the PSS of one cold-started
//     memapp 1024: one is measured, not 32).
// Median of BENCH_RUNS (default 3); BENCH_SIZES=16,1024 to choose memapp
// sizes (the memory part uses the largest); BENCH_CLONES=1,8,32; --json.
import { execFile, execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const memapp = join(root, 'bench', 'bin', 'memapp');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 3);
const sizes = (process.env.BENCH_SIZES ?? '16,1024').split(',').map(Number);
const counts = (process.env.BENCH_CLONES ?? '1,8,32').split(',').map(Number);
const BATCH = 8;
const KEYS = 100_000;
const jsonOut = process.argv.includes('--json');
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-'));
// Under the repository like images.js (a disk, not a tmpfs); the prefix is
// the one .gitignore already ignores.
const work = mkdtempSync(join(process.env.BENCH_DIR ?? root, '.bench-images-clone-'));
const env = { ...process.env, APPSHOT_HOME: home };
const children = new Set(); // processes started without appshot (baselines)
let cleaned = false; // set when cleaning up starts: nothing new is started after

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => Number(process.hrtime.bigint()) / 1e6;
const round = (x, d = 1) => +x.toFixed(d);
const log = (s) => process.stderr.write(`bench/clone: ${s}\n`);

// --- appshot ------------------------------------------------------------------

function failure(args, e) {
  const out = [e.stderr, e.stdout].map((s) => String(s ?? '').trim()).filter(Boolean).join('\n');
  return new Error(`appshot ${args.join(' ')} failed (exit ${e.status ?? e.code ?? e.signal}):\n${out || e.message}`);
}
/** Runs appshot, returns its stdout; a failure names the command and shows its output. */
function appshotRaw(...args) {
  if (cleaned) throw new Error('interrupted');
  try {
    return execFileSync(process.execPath, [cli, ...args], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
  } catch (e) {
    throw failure(args, e);
  }
}
const appshot = (...args) => {
  const out = appshotRaw(...args, '--json');
  try {
    return JSON.parse(out);
  } catch {
    throw new Error(`appshot ${args.join(' ')} --json printed no JSON:\n${out}`);
  }
};
const appshotAsync = (...args) =>
  new Promise((resolve) => execFile(process.execPath, [cli, ...args], { env, encoding: 'utf8' }, (e, stdout) => resolve(e ? null : stdout)));

const logOf = (aid) => {
  try {
    return readFileSync(join(home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
async function waitLog(aid, re, count = 1, timeoutMs = 20000) {
  for (const end = now() + timeoutMs; now() < end; await sleep(10)) {
    const m = logOf(aid).match(re);
    if ((m ?? []).length >= count) return m;
  }
  throw new Error(`${aid}: no ${re} in its log within ${timeoutMs / 1000} s; the log:\n${logOf(aid).slice(-2000)}`);
}
const processesOf = (aid) => appshot('ps', aid)[0].processes;
const mainPid = (aid) => {
  const p = processesOf(aid).find((q) => !q.init && q.vppid === 1) ?? processesOf(aid).find((q) => !q.init);
  if (!p) throw new Error(`${aid}: no process besides appshot-init (appshot ps ${aid})`);
  return p.pid;
};

/** Kills the application and removes it (an ended one keeps its AID until
 * then), then until `appshot ps AID` fails. */
async function stop(aid) {
  await appshotAsync('rm', '-f', aid);
  for (const end = now() + 15000; now() < end; await sleep(25)) if ((await appshotAsync('ps', aid)) === null) return;
  throw new Error(`${aid}: still registered 15 s after appshot rm -f ${aid}`);
}
/** Stops several applications, a few at a time. */
async function stopAll(aids) {
  const list = [...aids];
  for (let i = 0; i < list.length; i += 8) await Promise.all(list.slice(i, i + 8).map(stop));
}

/** The applications of this (temporary) APPSHOT_HOME: all ours. */
function registered() {
  const r = spawnSync(process.execPath, [cli, 'ps', '--json'], { env, encoding: 'utf8' });
  try {
    return JSON.parse(r.stdout);
  } catch {
    return [];
  }
}

async function cleanup() {
  if (cleaned) return;
  cleaned = true;
  for (const c of children) c.kill('SIGKILL');
  const apps = registered();
  try {
    await stopAll(apps.map((a) => a.aid));
  } catch (e) {
    log(`cleanup: ${e.message}`);
  }
  // Whatever is still there (a registry that cannot be read, a stuck
  // stop): killed by PID, appshot-init last.
  for (const a of apps) for (const p of [...a.processes].sort((x, y) => Number(x.init) - Number(y.init))) try {
    process.kill(p.pid, 'SIGKILL');
  } catch {
    /* gone */
  }
  // Last resort, if the registry could not be read: processes whose
  // environment names this APPSHOT_HOME or that map files of this run.
  for (const pid of strays()) try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone */
  }
  // Tables a killed appshot-init could not remove (named as the registry
  // names them: /dev/shm/appshot-<sha256 of APPSHOT_HOME, 8 hex>-AID).
  const tag = createHash('sha256').update(realpathSync(home)).digest('hex').slice(0, 8);
  for (const f of readdirSync('/dev/shm').filter((f) => f.startsWith(`appshot-${tag}-`))) {
    log(`cleanup: removing a left-over /dev/shm/${f}`);
    rmSync(join('/dev/shm', f), { force: true });
  }
  rmSync(home, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
function strays() {
  const found = [];
  for (const name of readdirSync('/proc')) {
    const pid = Number(name);
    if (!(pid > 0) || pid === process.pid) continue;
    try {
      if (readFileSync(`/proc/${pid}/environ`, 'latin1').includes(`APPSHOT_HOME=${home}\0`) || readFileSync(`/proc/${pid}/maps`, 'latin1').includes(work))
        found.push(pid);
    } catch {
      /* not ours, or gone */
    }
  }
  return found;
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'])
  process.on(sig, () => {
    log(`${sig}: cleaning up`);
    cleanup().finally(() => process.exit(128 + ({ SIGHUP: 1, SIGINT: 2, SIGTERM: 15 })[sig]));
  });

// --- /proc ----------------------------------------------------------------------

/** Pss and Rss of a process in KiB, from /proc/PID/smaps_rollup. */
function memOf(pid) {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (name) => Number(text.match(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm'))?.[1] ?? NaN);
  return { pss: kb('Pss'), rss: kb('Rss') };
}

// --- memapp -----------------------------------------------------------------------

/** Starts memapp without appshot; resolves at READY with the child and the time from exec. */
async function startMemapp(mib) {
  if (cleaned) throw new Error('interrupted');
  const t0 = now();
  const child = spawn(memapp, [String(mib)], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => (out += d).includes('READY') && resolve());
    child.on('error', reject);
    child.on('exit', (code, sig) => reject(new Error(`${memapp} ${mib} ended (${code ?? sig}) before READY`)));
  });
  return { child, ms: now() - t0 };
}
async function killChild(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await gone;
}

/** A clone that answers: SIGUSR1 makes memapp rewrite 1% of its pages (reading
 * the template's memory) and print DIRTIED in the instance's own log. */
async function checkMemappClone(aid) {
  process.kill(mainPid(aid), 'SIGUSR1');
  await waitLog(aid, /^DIRTIED \d+$/m);
}

/** fork() of the running application: memapp's own median of 7, in ms. */
async function memappFork(aid) {
  process.kill(mainPid(aid), 'SIGUSR2');
  return Number((await waitLog(aid, /^FORK ([\d.]+)$/m))[0].split(' ')[1]) / 1000;
}

// --- redis ----------------------------------------------------------------------------

async function freePort() {
  const s = createServer();
  await new Promise((r, j) => s.listen(0, '127.0.0.1', r).on('error', j));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** One inline command to a redis on `port`; its reply line, or null if it cannot connect. */
function redisCommand(port, command, timeoutMs = 5000) {
  return new Promise((resolve) => {
    const sock = connect({ port, host: '127.0.0.1' });
    let buf = '';
    const done = (v) => {
      sock.destroy();
      resolve(v);
    };
    sock.setTimeout(timeoutMs, () => done(null));
    sock.on('connect', () => sock.write(`${command}\r\n`));
    sock.on('data', (d) => {
      buf += d;
      if (buf.startsWith('$')) {
        // bulk reply: $len\r\n...\r\n
        const len = Number(buf.slice(1, buf.indexOf('\r\n')));
        const body = buf.slice(buf.indexOf('\r\n') + 2);
        if (len < 0 || body.length >= len) done(body.slice(0, Math.max(len, 0)));
      } else if (buf.includes('\r\n')) done(buf.slice(0, buf.indexOf('\r\n')));
    });
    sock.on('error', () => done(null));
  });
}
async function waitRedis(port, timeoutMs = 20000) {
  for (const end = now() + timeoutMs; now() < end; await sleep(2)) if ((await redisCommand(port, 'PING', 1000)) === '+PONG') return;
  throw new Error(`redis on port ${port}: no PONG within ${timeoutMs / 1000} s`);
}
async function dbsize(port) {
  const r = await redisCommand(port, 'DBSIZE');
  return r?.startsWith(':') ? Number(r.slice(1)) : NaN;
}

/** The dataset, as the Redis protocol for redis-cli --pipe: KEYS keys of ~100 bytes. */
function writeDataset(path) {
  const value = 'v'.repeat(90);
  const parts = [];
  for (let i = 0; i < KEYS; i++) {
    const key = `key:${String(i).padStart(8, '0')}`;
    const val = `${value}${String(i).padStart(10, '0')}`;
    parts.push(`*3\r\n$3\r\nSET\r\n$${key.length}\r\n${key}\r\n$${val.length}\r\n${val}\r\n`);
  }
  writeFileSync(path, parts.join(''));
}
/** Loads the dataset with redis-cli --pipe (which waits for every reply), then checks DBSIZE. */
async function loadRedis(port, dataset) {
  await new Promise((resolve, reject) => {
    const c = spawn('redis-cli', ['-p', String(port), '--pipe'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.on('data', (d) => (out += d));
    c.stderr.on('data', (d) => (out += d));
    c.on('error', reject);
    c.on('exit', (code) => (code === 0 && /errors: 0\b/.test(out) ? resolve() : reject(new Error(`redis-cli --pipe to port ${port} failed (${code}):\n${out}`))));
    createReadStream(dataset).pipe(c.stdin);
  });
  for (const end = now() + 10000; now() < end; await sleep(2)) if ((await dbsize(port)) === KEYS) return;
  throw new Error(`redis on port ${port}: DBSIZE is ${await dbsize(port)}, not ${KEYS}, after loading`);
}
const redisArgs = (port) => ['--port', String(port), '--save', '', '--appendonly', 'no'];

/** Cold start: redis-server started and loaded with the dataset until DBSIZE
 * answers all of it. Also fork() of that running, loaded server: redis's own
 * latest_fork_usec after a BGSAVE (the fork() call in the parent). */
async function redisCold(dataset) {
  const port = await freePort();
  if (cleaned) throw new Error('interrupted');
  const t0 = now();
  const child = spawn('redis-server', redisArgs(port), { stdio: 'ignore', cwd: work });
  children.add(child);
  child.on('exit', () => children.delete(child));
  try {
    await waitRedis(port);
    await loadRedis(port, dataset);
    const ms = now() - t0;
    if ((await redisCommand(port, 'BGSAVE')) === null) throw new Error('redis BGSAVE: no answer');
    let info = '';
    for (const end = now() + 10000; now() < end; await sleep(5)) {
      info = (await redisCommand(port, 'INFO persistence')) ?? '';
      if (/rdb_bgsave_in_progress:0/.test(info)) break;
    }
    if (!/rdb_last_bgsave_status:ok/.test(info)) throw new Error(`redis BGSAVE did not succeed:\n${info}`);
    const stats = (await redisCommand(port, 'INFO stats')) ?? '';
    const fork = Number(stats.match(/latest_fork_usec:(\d+)/)?.[1] ?? NaN) / 1000;
    return { ms, fork };
  } finally {
    await killChild(child);
    rmSync(join(work, 'dump.rdb'), { force: true });
  }
}

// --- templates and clones ---------------------------------------------------------

/** Snapshot of a running application, made a template. */
function makeTemplate(aid) {
  const snap = join(work, `${aid}.snapshot`);
  const tpl = join(work, `${aid}.template`);
  appshot('snapshot', aid, '-o', snap);
  const t = appshot('template', 'create', snap, '-o', tpl);
  rmSync(snap, { recursive: true, force: true }); // the template holds (hard links to) what it needs
  return { path: tpl, summary: t };
}

/** Clones `count` instances; checks the result. */
function cloneOf(tpl, aid, count = 1) {
  const r = appshot('clone', tpl, '--aid', aid, ...(count > 1 ? ['--count', String(count)] : []));
  if (!Array.isArray(r) || r.length !== count) throw new Error(`appshot clone ${tpl} --count ${count}: ${r?.length} results:\n${JSON.stringify(r)}`);
  for (const c of r) if (!(c.cloneMs > 0)) throw new Error(`appshot clone: no cloneMs for ${c.aid}:\n${JSON.stringify(c)}`);
  return r;
}

/** Clone time: `runs` single clones (each killed before the next) and one batch. */
async function cloneTimes(tpl, name, check) {
  const single = [];
  for (let i = 0; i < runs; i++) {
    const [c] = cloneOf(tpl, `${name}-c${i}`);
    single.push(c.cloneMs);
    if (i === 0) await check(c);
    await stop(c.aid);
  }
  const batch = cloneOf(tpl, `${name}-b`, BATCH);
  await check(batch[BATCH - 1]);
  await stopAll(batch.map((c) => c.aid));
  return { single: median(single), batch: median(batch.map((c) => c.cloneMs)) };
}

/** One row of the clone table: appshot's times against the baselines. */
function cloneRow(app, t, forkMs, coldMs) {
  return {
    app,
    clone_ms: round(t.single),
    [`batch${BATCH}_ms`]: round(t.batch),
    fork_ms: round(forkMs, 3),
    vs_fork: round(t.single / forkMs),
    cold_ms: round(coldMs),
    vs_cold: round(t.single / coldMs, 3),
  };
}

const cloneRows = [];
const memRows = [];
let onePss = 0;
let oneRss = 0;
let memMib = 0;
let memTemplate = '';
let failed = false;
try {
  // 1. memapp
  for (const mib of sizes) {
    log(`memapp ${mib} MiB`);
    const cold = [];
    for (let i = 0; i < runs; i++) {
      const { child, ms } = await startMemapp(mib);
      cold.push(ms);
      await killChild(child);
    }
    const aid = `m${mib}`;
    appshotRaw('run', '-d', '--aid', aid, '--', memapp, String(mib));
    await waitLog(aid, /^READY$/m);
    const fork = await memappFork(aid);
    const tpl = makeTemplate(aid);
    await stop(aid).catch(() => {}); // the snapshot ended it
    const t = await cloneTimes(tpl.path, aid, (c) => checkMemappClone(c.aid));
    cloneRows.push(cloneRow(`memapp ${mib} MiB`, t, fork, median(cold)));
    if (mib === Math.max(...sizes)) memMib = mib;
    if (mib === memMib) memTemplate = tpl.path;
    else rmSync(tpl.path, { recursive: true, force: true });
  }

  // 1b. redis
  log(`redis-server, ${KEYS} keys`);
  const dataset = join(work, 'dataset.resp');
  writeDataset(dataset);
  const rcold = [];
  for (let i = 0; i < runs; i++) rcold.push(await redisCold(dataset));
  const port = await freePort();
  const rules = join(work, 'redis.rules');
  const rulesText = readFileSync(join(root, 'templates', 'redis.rules'), 'utf8');
  if (!/\b6379\b/.test(rulesText)) throw new Error('templates/redis.rules has no 6379 to replace');
  writeFileSync(rules, rulesText.replace(/\b6379\b/g, String(port)));
  appshotRaw('run', '-d', '--aid', 'redis', '--rules', rules, '--', 'redis-server', ...redisArgs(port));
  await waitRedis(port).catch((e) => {
    throw new Error(`${e.message}; its log:\n${logOf('redis').slice(-2000)}`);
  });
  await loadRedis(port, dataset);
  const rtpl = makeTemplate('redis');
  const portVerdict = rtpl.summary.verdicts?.find((v) => v.ref === `port:${port}`);
  if (portVerdict?.action !== 'allocate') throw new Error(`redis template: port ${port} is ${portVerdict?.action ?? 'missing'}, not allocate:\n${JSON.stringify(rtpl.summary.verdicts)}`);
  await stop('redis').catch(() => {});
  const checkRedis = async (c) => {
    const own = c.ports?.find((p) => p.virtual === port);
    if (!own || own.mode !== 'allocate' || own.system === port) throw new Error(`clone ${c.aid}: no port of its own for ${port}: ${JSON.stringify(c.ports)}`);
    const n = await dbsize(own.system);
    if (n !== KEYS) throw new Error(`clone ${c.aid}: DBSIZE on its port ${own.system} is ${n}, not ${KEYS}; its log:\n${logOf(c.aid).slice(-2000)}`);
  };
  const rt = await cloneTimes(rtpl.path, 'redis', checkRedis);
  cloneRows.push(cloneRow(`redis ${KEYS / 1000}k keys`, rt, median(rcold.map((r) => r.fork)), median(rcold.map((r) => r.ms))));
  rmSync(rtpl.path, { recursive: true, force: true });

  // 2. memory of idle clones
  log(`memory of idle clones of memapp ${memMib} MiB`);
  {
    const { child } = await startMemapp(memMib);
    ({ pss: onePss, rss: oneRss } = memOf(child.pid));
    await killChild(child);
  }
  for (const n of counts) {
    const made = cloneOf(memTemplate, `mem${n}`, n);
    await sleep(300); // idle
    const mine = new Set(made.map((c) => c.aid));
    const apps = appshot('ps').filter((a) => mine.has(a.aid));
    const apps_ok = apps.filter((a) => a.processes.some((p) => !p.init)).length;
    if (apps_ok !== n) throw new Error(`${n} clones made, ${apps_ok} with a running memapp (appshot ps)`);
    const measure = () => {
      let all = 0;
      let app = 0;
      let procs = 0;
      for (const a of apps)
        for (const p of a.processes) {
          const m = memOf(p.pid);
          all += m.pss;
          if (!p.init) app += m.pss;
          procs++;
        }
      return { all, app, procs };
    };
    const { all, app, procs } = measure();
    // Then each clone rewrites 1% of its pages (memapp's SIGUSR1): what
    // copy-on-write costs once they work a little.
    for (const a of apps) process.kill(a.processes.find((p) => !p.init && p.vppid === 1).pid, 'SIGUSR1');
    for (const a of apps) await waitLog(a.aid, /^DIRTIED \d+$/m);
    const written = measure();
    const independent = n * onePss;
    memRows.push({
      clones: n,
      processes: procs,
      pss_MiB: round(all / 1024),
      pss_no_init_MiB: round(app / 1024),
      per_clone_MiB: round(all / 1024 / n, 2),
      independent_MiB: round(independent / 1024),
      vs_independent: round(all / independent, 4),
      pss_after_1pct_write_MiB: round(written.all / 1024),
      ...(n === 32 ? { goal_under_2GiB: all / 1024 < 2048 ? 'met' : 'NOT met' } : {}),
    });
    await stopAll(made.map((c) => c.aid));
  }
} catch (e) {
  failed = true;
  console.error(`bench/clone: ${e.message}`);
} finally {
  await cleanup();
}
if (failed) process.exit(1);

const cloneNote =
  `clone of one instance (appshot's cloneMs, without Node's start-up), median of ${runs} (each a fresh clone, then killed); ` +
  `batch${BATCH}_ms: median per instance of one --count ${BATCH}. Baselines, same run: fork_ms = fork() of the running app ` +
  `(memapp: fork to child running, median of 7; redis: latest_fork_usec of a BGSAVE), cold_ms = exec to READY (memapp) / ` +
  `redis-server start + redis-cli --pipe of the same ${KEYS / 1000}k keys until DBSIZE = ${KEYS} (redis), median of ${runs}`;
const memNote =
  `idle clones of memapp ${memMib} MiB: sum of Pss (/proc/PID/smaps_rollup) over every process of every clone, appshot-init ` +
  `included (pss_no_init_MiB: without it); independent_MiB = N x the Pss of ONE cold-started memapp ${memMib} ` +
  `(${round(onePss / 1024)} MiB Pss, ${round(oneRss / 1024)} MiB Rss; measured once and multiplied, not started N times). ` +
  `Idle clones have not touched the template's pages (mapped lazily, copy-on-write); pss_after_1pct_write_MiB: the same clones ` +
  `after each rewrote 1% of its pages (SIGUSR1). Goal: 32 idle clones under 2 GiB`;
if (jsonOut) console.log(JSON.stringify({ runs, clone: { note: cloneNote, rows: cloneRows }, memory: { note: memNote, onePssKiB: onePss, oneRssKiB: oneRss, rows: memRows } }, null, 2));
else {
  console.log(cloneNote);
  console.table(cloneRows);
  console.log(memNote);
  console.table(memRows);
}
