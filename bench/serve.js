// bench/serve.js: what the front door of `appshot serve` costs and gives
// (issue 15), for redis with 10,000 keys, in one run. Latency from
// connect() to the first byte of the reply to PING:
//   (a) the server running, reached directly;
//   (b) the server running, through the front door (the proxy's cost);
//   (c) the server suspended (snapshotted after --idle), through the front
//       door: held while its image is restored;
//   (d) a cold start of the same server with its dataset loaded from its
//       RDB file (redis-server spawned, polled until it answers).
//   (f) clone mode, no instance running: held while a clone is made from a
//       template of the same server (BENCH_CLONE=0 skips it).
// Also the serve process's own PSS (what appshot keeps running for a
// suspended service), and (e) the PSS of everything appshot keeps running
// for BENCH_SERVICES (100) suspended services of the same image: the serve
// process, and any process of the state directory (an engine, an
// application's init) there may be. Medians and p99 (with few samples p99
// is their max).
//
// BENCH_HOT=1000 samples for (a) and (b), BENCH_RUNS=20 for (c) and (d),
// BENCH_IDLE=300ms the service's idle time, BENCH_SERVICES=0 skips (e);
// (e) is measured once settled and again BENCH_E_STEADY (31) s later,
// when the page buffers kept warm for 30 s are gone (0: not again);
// BENCH_E_ENV=NAME=VALUE measures (e) also with that variable set.
// BENCH_MARKS=1: serve run with APPSHOT_SERVE_MARKS=1, and each series of
// resumes of a held instance broken into segments (medians, µs): connect()
// to serve seeing the listener readable (w), to the restore begun (r), to
// the release decided (d: the image's files checked), to the commit (c), to
// the restore returned (e), and from c and e to the first byte.
// BENCH_FAULTS=1: each resume of a held (prepared) instance also counts
// its processes' page faults from the connection to the first byte.
//
// BENCH_AB=NAME=VALUE (e.g. APPSHOT_STANDBYS=0): (c) again with serve
// restarted alternately with and without that variable in its
// environment, BENCH_AB_ROUNDS (3) rounds of BENCH_RUNS resumes each: a
// same-run comparison of a change that a variable turns off ((f) too). Reported:
// each round's p50 and p99 and the medians of them, with the load average,
// and the PSS of the instance held after each round (BENCH_SMAPS=1: each
// of its processes broken down).
// BENCH_AB_CLI=PATH (another build's bin/appshot.js, e.g. main's): the same
// rounds with serve run alternately by that build and by this one (the
// images are this build's); with BENCH_AB too, that variable is set for
// both, so that each build's resumes without prepared instances
// (BENCH_AB=APPSHOT_PREPARED=0) can be compared. BENCH_AB_HOT=N: each of
// those rounds also measures (a) and (b), N of each interleaved, and
// reports (b) - (a) at p50 per build (the front door's cost, A/B). With
// BENCH_SERVE=hosted, both builds' serves are hosted, each by an engine
// of its own build (the engine is stopped after each round); with own,
// both run in their own process.
// BENCH_AB=APPSHOT_SHARE_LISTENER=0 BENCH_AB_HOT=N: each round also
// measures (a) and (b), N of each interleaved, and reports (b) - (a) at p50
// with the public listener shared with the instance (unset) and with the
// forwarding front door (=0). Shared, the instance's IPv4 listener on its
// port is serve's public one: (a) is then reached on its other listener,
// [::1]:APP (redis listens on both families by default), in both variants
// alike; the forwarding variant also measures 127.0.0.1:APP, for the
// difference between the two families (reported as (a4)).
// BENCH_AB_SERVE=1: (c) in rounds alternately with serve in its own
// process and hosted by the engine (this build; the engine stays between
// rounds): the cost of hosting, same run.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, mkdirSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const HOT = Number(process.env.BENCH_HOT ?? 1000);
const RUNS = Number(process.env.BENCH_RUNS ?? 20);
const IDLE = process.env.BENCH_IDLE ?? '300ms';
/** BENCH_SETTLE (ms, 50): how long each resume of (c) and (f) waits
 * after the service was written idle: serve may still be preparing its
 * next instance then (and mapping in its pages while it is held); a
 * longer wait measures the resume of one prepared well before. */
const SETTLE_MS = Number(process.env.BENCH_SETTLE ?? 50);
const KEYS = 10_000;
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-serve-'));
const env = { ...process.env, APPSHOT_HOME: home, ...(process.env.BENCH_MARKS === '1' ? { APPSHOT_SERVE_MARKS: '1' } : {}) };
// BENCH_PORT: the first of the three ports (a bench run next to another).
const APP = Number(process.env.BENCH_PORT ?? 26950);
const PUBLIC = APP + 1;
const COLD = APP + 2;
/** (f): the template's redis, as it knows its port; the clone service's
 * public port. */
const CLONE_APP = APP + 3;
const CLONE_PUBLIC = APP + 5;
/** BENCH_ONLY_E=1: (e) alone (with BENCH_SMAPS=1, each process's PSS
 * broken down), none of (a)-(d) and (f). */
const ONLY_E = process.env.BENCH_ONLY_E === '1';
const CLONES = process.env.BENCH_CLONE !== '0' && !ONLY_E;
const SERVICES = Number(process.env.BENCH_SERVICES ?? 100);
/** (e) measured again this many seconds after it settled (BENCH_E_STEADY). */
const STEADY_S = Number(process.env.BENCH_E_STEADY ?? 31);
const AB_HOT = Number(process.env.BENCH_AB_HOT ?? 0);
/** Where (a) reaches the instance: with the listener shared (the default),
 * its IPv4 listener on APP is the public one, and [::1]:APP is its own. */
const SHARING = process.env.APPSHOT_SHARE_LISTENER !== '0';
const DIRECT_HOST = SHARING ? '::1' : '127.0.0.1';
/** Node's flags as \`appshot serve -d\` runs the serve process (commands/serve.ts). */
const RESIDENT = ['--max-semi-space-size=1'];
/** ...and its environment (residentEnv there): this build's; another's
 * (BENCH_AB_CLI) runs as it is. */
const RESIDENT_ENV = { MALLOC_ARENA_MAX: '1' };
/** Where serve runs for (a)-(d) and (f): 'own' (a process of its own,
 * `serve --foreground`) or 'hosted' (the resident engine, as `appshot
 * serve` runs by default). (e) is measured both ways. */
const SERVE_MODE = process.env.BENCH_SERVE ?? 'own';
/** (e)'s public ports: SERVICES_PORT, +1, ... */
const SERVICES_PORT = APP + 4150;

const appshot = (...args) => execFileSync(process.execPath, [cli, ...args], { encoding: 'utf8', env });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
};
const ms = (x) => (x >= 1 ? `${x.toFixed(2)} ms` : `${(x * 1000).toFixed(0)} µs`);

/** The last firstByte's connect() and first byte, process.hrtime.bigint(). */
let lastTimes;
/** BENCH_MARKS=1: each resume's [connect(), first byte], to set beside
 * serve's marks (APPSHOT_SERVE_MARKS, its `restore` lines). */
const MARKS = process.env.BENCH_MARKS === '1';
let timesSeen = [];

/** connect() to the first byte of the reply to PING, in ms; rejects if
 * refused or reset. */
function firstByte(port, host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const s = connect({ port, host, noDelay: true });
    s.on('connect', () => s.write('PING\r\n'));
    s.once('data', () => {
      const t1 = process.hrtime.bigint();
      lastTimes = [t0, t1];
      resolve(Number(t1 - t0) / 1e6);
      s.destroy();
    });
    s.on('error', reject);
  });
}

async function untilAnswers(port, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await firstByte(port);
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await sleep(1);
    }
  }
}

function load(port) {
  const cmds = Array.from({ length: KEYS }, (_, i) => `SET key:${i} value-${i}-${'x'.repeat(i % 40)}`).join('\n') + '\n';
  execFileSync('redis-cli', ['-p', String(port)], { input: cmds, stdio: ['pipe', 'ignore', 'inherit'] });
}

/** Whether `service` has been written by the serve running now, since
 * `since` (Date.now()), with nothing running: suspended (restore mode) or
 * without an instance (clone mode). */
function idleSince(service, since) {
  try {
    const s = JSON.parse(readFileSync(join(home, 'services', service, 'state.json'), 'utf8'));
    const idle = s.spec.mode === 'clone' ? s.instances.length === 0 : s.instances[0]?.state === 'suspended';
    return idle && s.servePid === serve.hostPid && Date.parse(s.updatedAt) > since;
  } catch {
    return false;
  }
}

/** `runs` connections to `service` on `port`, each once it is idle again
 * (the first: once this serve has written it idle). */
async function whenIdle(service, port, runs, atFirst = () => {}) {
  const out = [];
  let since = 0;
  for (let i = 0; i < runs; i++) {
    const deadline = Date.now() + 30_000;
    while (!idleSince(service, since)) {
      if (Date.now() > deadline) throw new Error(`${service} did not become idle`);
      await sleep(20);
    }
    await sleep(SETTLE_MS);
    if (i === 0) atFirst();
    const held = FAULTS ? heldFaults(service) : undefined;
    out.push(await firstByte(port));
    if (MARKS) timesSeen.push(lastTimes);
    if (held) faultsSeen.push(held());
    since = Date.now();
  }
  return out;
}

/** BENCH_FAULTS=1: the page faults (minor) of a held instance's
 * application processes from just before the connection to the first
 * byte of the reply (its release, its first pages touched, the reply),
 * one number per resume of a held instance, into faultsSeen. */
const FAULTS = process.env.BENCH_FAULTS === '1';
let faultsSeen = [];
function heldFaults(service) {
  let init;
  try {
    const s = JSON.parse(readFileSync(join(home, 'services', service, 'state.json'), 'utf8'));
    if (!s.instances[0]?.prepared) return undefined;
    init = JSON.parse(readFileSync(join(home, 'apps', service, 'app.json'), 'utf8')).initPid;
  } catch {
    return undefined;
  }
  const pids = childrenOf(init);
  const minflt = () =>
    pids.reduce((n, p) => {
      try {
        const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
        return n + Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[7]);
      } catch {
        return n;
      }
    }, 0);
  // And their threads' CPU time (schedstat: ns on the CPU).
  const cpuNs = () =>
    pids.reduce((n, p) => {
      let tids = [];
      try {
        tids = readdirSync(`/proc/${p}/task`);
      } catch {
        return n;
      }
      for (const t of tids)
        try {
          n += Number(readFileSync(`/proc/${p}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
        } catch {
          /* gone */
        }
      return n;
    }, 0);
  const before = minflt();
  const cpuBefore = cpuNs();
  return () => {
    cpuSeen.push((cpuNs() - cpuBefore) / 1e3);
    return minflt() - before;
  };
}
/** BENCH_FAULTS: the held instance's CPU time (µs, all its threads) from
 * just before the connection to the first byte, one per resume. */
let cpuSeen = [];

function pssKiB(pid) {
  const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** The node binary's pages resident in `pid` (KiB, Rss of its mappings
 * of it): shared with every other Node process, so that `pid`'s PSS of
 * them depends on how many run (tests, other tools, the bench itself):
 * ~3 MiB on a busy machine, 10-15 on a quiet one. (e) shows them apart,
 * and the anonymous PSS, which does not depend on what else runs. */
const nodeBinary = realpathSync(process.execPath);
function nodeRssKiB(pid) {
  let n = 0;
  let ours = false;
  try {
    for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
      const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
      if (head) ours = head[1] === nodeBinary;
      else if (ours) {
        const m = /^Rss:\s+(\d+) kB/.exec(line);
        if (m) n += Number(m[1]);
      }
    }
  } catch {
    /* gone */
  }
  return n;
}
function anonKiB(pid) {
  try {
    return Number(/^Pss_Anon:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** BENCH_SMAPS=1: where a kept process's PSS is (anonymous, file,
 * shared memory; its largest mappings), one line each, to stderr. */
function smapsDetail(pid) {
  try {
    const roll = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
    const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(roll)?.[1] ?? 0);
    const comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
    const byName = new Map();
    let name = '';
    for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
      const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
      if (head) name = head[1] || '[anon]';
      const m = /^Pss:\s+(\d+) kB/.exec(line);
      if (m) byName.set(name, (byName.get(name) ?? 0) + Number(m[1]));
    }
    const top = [...byName].sort((a, b) => b[1] - a[1]).slice(0, 6).map(([n, v]) => `${n.split('/').pop()} ${(v / 1024).toFixed(1)}`);
    process.stderr.write(`    ${pid} ${comm}: Pss ${(kb('Pss') / 1024).toFixed(1)} MiB (anon ${(kb('Pss_Anon') / 1024).toFixed(1)}, file ${(kb('Pss_File') / 1024).toFixed(1)}, shmem ${(kb('Pss_Shmem') / 1024).toFixed(1)}); largest: ${top.join(', ')}\n`);
  } catch {
    /* gone */
  }
}

/** The processes appshot keeps for the state directory: `pid` (serve),
 * its descendants, and any process whose command line names the state
 * directory (an application's init, an engine). */
function keptProcesses(pid) {
  const kept = new Set([pid]);
  const procs = readdirSync('/proc').filter((n) => /^\d+$/.test(n)).map(Number);
  const parentOf = new Map();
  for (const p of procs)
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      parentOf.set(p, Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
      if (readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(home)) kept.add(p);
    } catch {
      /* gone */
    }
  for (let grew = true; grew; ) {
    grew = false;
    for (const [p, pp] of parentOf) if (kept.has(pp) && !kept.has(p)) kept.add(p), (grew = true);
  }
  return [...kept];
}

/** The PIDs whose parent is `pid`. */
function childrenOf(pid) {
  const out = [];
  for (const n of readdirSync('/proc').filter((x) => /^\d+$/.test(x)))
    try {
      const stat = readFileSync(`/proc/${n}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) out.push(Number(n));
    } catch {
      /* gone */
    }
  return out;
}

/** Once `service` is suspended with its next instance prepared (held
 * stopped): the PSS of that instance's processes (everything appshot keeps
 * for the state directory but the serve process), and how many pages its
 * prepare copied in ahead (the serve log's last `prepared`); undefined if
 * none is prepared within 10 s (a prepare that failed, --prepared 0). */
async function heldInstancePss(service) {
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(50)) {
    let s;
    try {
      s = JSON.parse(readFileSync(join(home, 'services', service, 'state.json'), 'utf8'));
    } catch {
      continue;
    }
    if (s.servePid !== serve.hostPid || s.instances[0]?.state !== 'suspended' || !s.instances[0]?.prepared) continue;
    // (its state file is written up to 100 ms after the prepare is held)
    await sleep(200);
    let init;
    try {
      init = JSON.parse(readFileSync(join(home, 'apps', service, 'app.json'), 'utf8')).initPid;
    } catch {
      continue;
    }
    const pids = [init, ...childrenOf(init)];
    if (process.env.BENCH_SMAPS) for (const p of pids) smapsDetail(p);
    const last = [...serveErr.matchAll(/^\{.*"event":"prepared".*\}$/gm)].at(-1);
    const prefaulted = last ? (JSON.parse(last[0]).prefaulted ?? '?') : '?';
    return { kib: pids.reduce((n, p) => n + (pssKiB(p) || 0), 0), processes: pids.length, prefaulted };
  }
  return undefined;
}

/** BENCH_MARKS: where each resume's time went, from the client's
 * connect() to its first byte, through serve's marks (server.ts MARKS): a
 * line of medians (µs) over the resumes of `log` whose listener was seen
 * readable between a connect() and its first byte of timesSeen. */
function marksReport(log, label) {
  const restores = [...log.matchAll(/^\{.*"event":"restore".*\}$/gm)].map((m) => JSON.parse(m[0])).filter((r) => r.marks?.w && r.prepared);
  const segs = { 'connect>w': [], 'w>r': [], 'r>d': [], 'd>c': [], 'c>e': [], 'c>byte': [], 'e>byte': [], total: [] };
  for (const [t0, t1] of timesSeen) {
    const r = restores.find((x) => BigInt(x.marks.w) >= t0 && BigInt(x.marks.w) <= t1);
    if (!r || !['w', 'r', 'd', 'c', 'e'].every((k) => r.marks[k])) continue;
    const m = Object.fromEntries(Object.entries(r.marks).map(([k, v]) => [k, BigInt(v)]));
    const us = (a, b) => Number(b - a) / 1e3;
    segs['connect>w'].push(us(t0, m.w));
    segs['w>r'].push(us(m.w, m.r));
    segs['r>d'].push(us(m.r, m.d));
    segs['d>c'].push(us(m.d, m.c));
    segs['c>e'].push(us(m.c, m.e));
    segs['c>byte'].push(us(m.c, t1));
    segs['e>byte'].push(us(m.e, t1));
    segs.total.push(us(t0, t1));
  }
  const n = segs.total.length;
  console.log(`    marks${label ? ` (${label})` : ''}, medians of ${n} prepared resumes, µs: ${Object.entries(segs).map(([k, xs]) => `${k} ${xs.length ? pct(xs, 50).toFixed(0) : '-'}`).join(', ')}`);
  report.push({ what: `marks${label ? ` ${label}` : ''}`, n, ...Object.fromEntries(Object.entries(segs).map(([k, xs]) => [k, xs.length ? pct(xs, 50) : null])) });
  timesSeen = [];
  return segs;
}

/** The 1-minute load average. */
const loadAverage = () => Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);

const report = [];
const row = (what, xs) => {
  report.push({ what, n: xs.length, p50: pct(xs, 50), p99: pct(xs, 99) });
  console.log(`${what.padEnd(48)} n=${String(xs.length).padStart(4)}  p50 ${ms(pct(xs, 50)).padStart(10)}  p99 ${ms(pct(xs, 99)).padStart(10)}`);
};

let serve;
let serveErr = '';
/** The logs of the serve processes before the current one. */
let earlierServeErr = '';
/** The PID that serves (the lock's holder: serve's own process, or the
 * engine hosting it). */
const servingPid = () => Number(readFileSync(join(home, 'services', 'serve.lock'), 'utf8').trim().split(' ')[0]);
/** The engine's PID, if one runs for `home`. */
function enginePid() {
  try {
    const pid = Number(readFileSync(join(home, 'engine', 'lock'), 'utf8').trim());
    return pid > 0 && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('engine/main.js') ? pid : undefined;
  } catch {
    return undefined;
  }
}
/** `appshot serve`, as serve -d runs it, once it says it is ready; its
 * `hostPid` is the process that serves (`mode` hosted: the engine's). */
async function startServe(extraEnv = {}, serveCli = cli, mode = SERVE_MODE, args = []) {
  // Another build (BENCH_AB_CLI) may not know --foreground: in its own
  // process by APPSHOT_ENGINE=off, which every build heeds or ignores.
  const where = serveCli === cli && mode === 'own' ? ['--foreground'] : [];
  const modeEnv = serveCli !== cli && mode === 'own' ? { APPSHOT_ENGINE: 'off' } : {};
  const child = spawn(process.execPath, [...RESIDENT, serveCli, 'serve', ...where, ...args], { env: { ...(serveCli === cli ? RESIDENT_ENV : {}), ...env, ...modeEnv, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'] });
  child.exited = new Promise((r) => child.once('exit', r));
  child.mode = mode;
  child.cli = serveCli;
  earlierServeErr += serveErr;
  // Each serve's log headed by the build that runs it (an A/B's logs,
  // APPSHOT_DEBUG's restore phases among them, told apart).
  serveErr = `=== serve ${serveCli}\n`;
  child.stderr.on('data', (d) => (serveErr += d));
  await new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => /^ready$/m.test(String(d)) && resolve());
    child.on('exit', () => reject(new Error(`serve exited: ${serveErr}`)));
  });
  child.hostPid = mode === 'hosted' ? servingPid() : child.pid;
  return child;
}
/** Stops the serve running (its client, attached, stops a hosted one),
 * and with `engineToo` the engine that hosted it, waiting until it left. */
async function stopServe(engineToo = false) {
  serve.kill('SIGTERM');
  await serve.exited;
  const pid = serve.mode === 'hosted' && engineToo ? enginePid() : undefined;
  if (!pid) return;
  execFileSync(process.execPath, [serve.cli, 'engine', 'stop'], { env, stdio: 'ignore' });
  for (const deadline = Date.now() + 30_000; Date.now() < deadline; await sleep(20))
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
  throw new Error(`engine ${pid} did not leave`);
}
try {
  // The image: redis with 10,000 keys under appshot.
  appshot('run', '-d', '--aid', 'loader', '--', 'redis-server', '--port', String(APP), '--save', '', '--appendonly', 'no');
  await untilAnswers(APP);
  load(APP);
  appshot('snapshot', 'loader', '-o', join(home, 'redis.img'));
  appshot('service', 'add', 'db', '--from', join(home, 'redis.img'), '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', IDLE);
  if (CLONES) {
    // The same server as a template: its port allocated per clone.
    const rules = join(home, 'redis.rules');
    writeFileSync(rules, `PORT ${CLONE_APP} ALLOCATE\n`);
    appshot('run', '-d', '--aid', 'tloader', '--rules', rules, '--', 'redis-server', '--port', String(CLONE_APP), '--save', '', '--appendonly', 'no');
    await untilAnswers(CLONE_APP);
    load(CLONE_APP);
    appshot('snapshot', 'tloader', '-o', join(home, 'tredis.img'));
    appshot('template', 'create', join(home, 'tredis.img'), '-o', join(home, 'redis.template'));
    appshot('service', 'add', 'dbc', '--mode', 'clone', '--from', join(home, 'redis.template'), '--port', `127.0.0.1:${CLONE_PUBLIC}:${CLONE_APP}`, '--idle', IDLE, '--min', '0', '--max', '1');
  }
  serve = await startServe();
  console.log(`redis, ${KEYS} keys; serve pid ${serve.hostPid} (${SERVE_MODE === 'hosted' ? 'hosted by the engine' : 'its own process'}); idle ${IDLE}\n`);

  if (!ONLY_E) {
    // (a) and (b) interleaved: the front door's connections keep it running.
    await untilAnswers(PUBLIC);
    for (let i = 0; i < 50; i++) await firstByte(PUBLIC), await firstByte(APP, DIRECT_HOST); // warm-up
    const direct = [];
    const door = [];
    for (let i = 0; i < HOT; i++) {
      direct.push(await firstByte(APP, DIRECT_HOST));
      door.push(await firstByte(PUBLIC));
    }
    row(`(a) running, direct (${DIRECT_HOST})`, direct);
    row('(b) running, through the front door', door);
    report.push({ what: '(b) - (a) p50', added: pct(door, 50) - pct(direct, 50) });
    console.log(`    the proxy adds ${ms(pct(door, 50) - pct(direct, 50))} at p50\n`);

    // (c) suspended, through the front door.
    const resumes = (runs, atFirst) => whenIdle('db', PUBLIC, runs, atFirst);
    const clonings = (runs) => whenIdle('dbc', CLONE_PUBLIC, runs);
    let pss = NaN;
    const resumed = await resumes(RUNS, () => (pss = pssKiB(serve.hostPid)));
    const loadC = loadAverage();
    row('(c) suspended, through the front door', resumed);
    if (MARKS) marksReport(serveErr, '');
    const cloned = CLONES ? await clonings(RUNS) : [];
    if (CLONES) row('(f) clone mode, none running, through the door', cloned);
    if (process.env.BENCH_AB_CLI) {
      const other = process.env.BENCH_AB_CLI;
      const extra = process.env.BENCH_AB ? Object.fromEntries([process.env.BENCH_AB.split('=')]) : {};
      const label = process.env.BENCH_AB ? ` (${process.env.BENCH_AB})` : '';
      const rounds = Number(process.env.BENCH_AB_ROUNDS ?? 3);
      const p50s = { this: [], other: [] };
      const added = { this: [], other: [] };
      const loads = [];
      for (let r = 0; r < rounds; r++)
        for (const build of r % 2 ? ['this', 'other'] : ['other', 'this']) {
          await stopServe(true);
          serve = await startServe(extra, build === 'this' ? cli : other);
          const xs = await resumes(RUNS);
          p50s[build].push(pct(xs, 50));
          if (MARKS) marksReport(serveErr, build === 'this' ? 'this build' : other);
          loads.push(Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]));
          let hot = '';
          if (AB_HOT > 0) {
            const direct = [];
            const door = [];
            for (let i = 0; i < 50; i++) await firstByte(PUBLIC), await firstByte(APP); // warm-up
            for (let i = 0; i < AB_HOT; i++) direct.push(await firstByte(APP)), door.push(await firstByte(PUBLIC));
            added[build].push(pct(door, 50) - pct(direct, 50));
            hot = `; (a) p50 ${ms(pct(direct, 50))}, (b) p50 ${ms(pct(door, 50))}, (b) - (a) ${ms(pct(door, 50) - pct(direct, 50))}`;
          }
          console.log(`    round ${r + 1}, ${build === 'this' ? 'this build' : other}${label}: (c) p50 ${ms(pct(xs, 50))}, p99 ${ms(pct(xs, 99))}${hot}`);
        }
      const median = (xs) => pct(xs, 50);
      console.log(`(c)${label} median of ${rounds} rounds' p50: ${other} ${ms(median(p50s.other))}, this build ${ms(median(p50s.this))}; load average ${Math.min(...loads)}-${Math.max(...loads)}\n`);
      if (AB_HOT > 0) {
        console.log(`(b) - (a) at p50, median of ${rounds} rounds: ${other} ${ms(median(added.other))}, this build ${ms(median(added.this))}\n`);
        report.push({ what: '(b) - (a) A/B builds', other: added.other, this: added.this, loads });
      }
      report.push({ what: `(c) A/B builds${label}`, other: p50s.other, this: p50s.this, loads });
    } else if (process.env.BENCH_AB_SERVE === '1') {
      const rounds = Number(process.env.BENCH_AB_ROUNDS ?? 3);
      const p50s = { own: [], hosted: [] };
      const loads = [];
      for (let r = 0; r < rounds; r++)
        for (const mode of r % 2 ? ['hosted', 'own'] : ['own', 'hosted']) {
          await stopServe();
          serve = await startServe({}, cli, mode);
          const xs = await resumes(RUNS);
          p50s[mode].push(pct(xs, 50));
          loads.push(Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]));
          console.log(`    round ${r + 1}, ${mode === 'own' ? 'its own process' : 'hosted by the engine'}: (c) p50 ${ms(pct(xs, 50))}, p99 ${ms(pct(xs, 99))}`);
        }
      const median = (xs) => pct(xs, 50);
      console.log(`(c) median of ${rounds} rounds' p50: own process ${ms(median(p50s.own))}, hosted ${ms(median(p50s.hosted))}; load average ${Math.min(...loads)}-${Math.max(...loads)}\n`);
      report.push({ what: '(c) A/B own process, hosted', own: p50s.own, hosted: p50s.hosted, loads });
    } else if (process.env.BENCH_AB) {
      const [name, value] = process.env.BENCH_AB.split('=');
      const rounds = Number(process.env.BENCH_AB_ROUNDS ?? 3);
      const p50s = { with: [], without: [] };
      const p99s = { with: [], without: [] };
      const heldPss = { with: [], without: [] };
      const cpu = { with: [], without: [] };
      const f50s = { with: [], without: [] };
      const added = { with: [], without: [] };
      const v4v6 = [];
      const loads = [];
      for (let r = 0; r < rounds; r++)
        for (const variant of r % 2 ? ['with', 'without'] : ['without', 'with']) {
          // Suspended first: a running instance is adopted by the next
          // serve as it is (its listener shared or not).
          // (its state file may still say suspended from before the last
          // resume: first an idle time and a tick past it)
          await sleep(parseInt(IDLE, 10) + 1000);
          const since = Date.now();
          while (!idleSince('db', since - 60_000)) await sleep(20);
          await stopServe();
          serve = await startServe(variant === 'with' ? { [name]: value } : {});
          if (AB_HOT > 0) {
            await untilAnswers(PUBLIC);
            for (let i = 0; i < 50; i++) await firstByte(PUBLIC), await firstByte(APP, '::1');
            const direct = [];
            const door = [];
            const direct4 = [];
            const forwarding = variant === 'with' ? value === '0' : false;
            for (let i = 0; i < AB_HOT; i++) {
              direct.push(await firstByte(APP, '::1'));
              door.push(await firstByte(PUBLIC));
              if (forwarding) direct4.push(await firstByte(APP));
            }
            added[variant].push(pct(door, 50) - pct(direct, 50));
            if (forwarding) v4v6.push(pct(direct4, 50) - pct(direct, 50));
            const shared = /"event":"listen"[^\n]*"shared":true/.test(serveErr);
            console.log(
              `    round ${r + 1}, ${variant === 'with' ? `${name}=${value}` : `${name} unset`} (listener ${shared ? 'shared' : 'forwarded'}): (a) [::1] p50 ${ms(pct(direct, 50))}, (b) p50 ${ms(pct(door, 50))}, (b) - (a) ${ms(pct(door, 50) - pct(direct, 50))}` +
                (forwarding ? `; (a4) 127.0.0.1 p50 ${ms(pct(direct4, 50))}` : ''),
            );
          }
          // The instance keeps running across serves: the first resume waits
          // for its idle suspend.
          faultsSeen = [];
          cpuSeen = [];
          const xs = await resumes(RUNS);
          p50s[variant].push(pct(xs, 50));
          if (MARKS) marksReport(serveErr, variant === 'with' ? `${name}=${value}` : `${name} unset`);
          p99s[variant].push(pct(xs, 99));
          const faults = faultsSeen.length ? `; faults to first byte p50 ${pct(faultsSeen, 50)}, its CPU ${pct(cpuSeen, 50).toFixed(0)} µs (${faultsSeen.length} held)` : '';
          if (faultsSeen.length) cpu[variant].push(pct(cpuSeen, 50));
          cpuSeen = [];
          // The instance held for the next resume (its init and redis):
          // what a prepared service costs while suspended.
          const held = await heldInstancePss('db');
          if (held) heldPss[variant].push(held.kib);
          const fs = CLONES ? await clonings(RUNS) : [];
          if (CLONES) f50s[variant].push(pct(fs, 50));
          loads.push(Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]));
          console.log(
            `    round ${r + 1}, ${variant === 'with' ? `${name}=${value}` : `${name} unset`}: (c) p50 ${ms(pct(xs, 50))}, p99 ${ms(pct(xs, 99))}` +
              faults +
              (held ? `; held instance PSS ${(held.kib / 1024).toFixed(2)} MiB (${held.processes} processes, ${held.prefaulted} pages prefaulted)` : '') +
              (CLONES ? `; (f) p50 ${ms(pct(fs, 50))}, p99 ${ms(pct(fs, 99))}` : ''),
          );
        }
      const median = (xs) => pct(xs, 50);
      console.log(`(c) median of ${rounds} rounds' p50: ${name} unset ${ms(median(p50s.without))}, ${name}=${value} ${ms(median(p50s.with))}; load average ${Math.min(...loads)}-${Math.max(...loads)}`);
      console.log(`(c) median of ${rounds} rounds' p99: ${name} unset ${ms(median(p99s.without))}, ${name}=${value} ${ms(median(p99s.with))}`);
      if (cpu.with.length || cpu.without.length) console.log(`held instance's CPU from connect() to first byte, median of rounds' p50: ${name} unset ${pct(cpu.without, 50)?.toFixed(0)} µs, ${name}=${value} ${pct(cpu.with, 50)?.toFixed(0)} µs`);
      if (heldPss.with.length || heldPss.without.length)
        console.log(`held instance PSS, median of rounds: ${name} unset ${(median(heldPss.without) / 1024).toFixed(2)} MiB, ${name}=${value} ${(median(heldPss.with) / 1024).toFixed(2)} MiB`);
      if (CLONES) console.log(`(f) median of ${rounds} rounds' p50: ${name} unset ${ms(median(f50s.without))}, ${name}=${value} ${ms(median(f50s.with))}`);
      console.log('');
      if (AB_HOT > 0) {
        console.log(`(b) - (a) at p50, median of ${rounds} rounds: ${name} unset ${ms(median(added.without))}, ${name}=${value} ${ms(median(added.with))}; (a4) - (a) ${v4v6.length ? ms(median(v4v6)) : '-'}`);
        report.push({ what: `(b) - (a) A/B ${name}=${value}`, without: added.without, with: added.with, v4MinusV6: v4v6, loads });
      }
      report.push({ what: `(c) A/B ${name}=${value}`, without: p50s.without, with: p50s.with, p99without: p99s.without, p99with: p99s.with, heldPssWithout: heldPss.without, heldPssWith: heldPss.with, cpuWithout: cpu.without, cpuWith: cpu.with, loads });
      if (CLONES) report.push({ what: `(f) A/B ${name}=${value}`, without: f50s.without, with: f50s.with, loads });
    }
    console.log(`    serve's own PSS with the service suspended: ${(pss / 1024).toFixed(1)} MiB\n`);
    report.push({ what: 'serve PSS, suspended (MiB)', value: pss / 1024 });

    // (d) a cold start of redis loading the same dataset from its RDB file.
    const rdbDir = join(home, 'rdb');
    mkdirSync(rdbDir);
    const maker = spawn('redis-server', ['--port', String(COLD), '--dir', rdbDir, '--dbfilename', 'dump.rdb', '--appendonly', 'no'], { stdio: 'ignore' });
    await untilAnswers(COLD);
    load(COLD);
    execFileSync('redis-cli', ['-p', String(COLD), 'SAVE']);
    maker.kill('SIGKILL');
    await new Promise((r) => maker.on('exit', r));
    const cold = [];
    for (let i = 0; i < RUNS; i++) {
      const t0 = process.hrtime.bigint();
      const r = spawn('redis-server', ['--port', String(COLD), '--dir', rdbDir, '--dbfilename', 'dump.rdb', '--appendonly', 'no', '--save', ''], { stdio: 'ignore' });
      await untilAnswers(COLD);
      cold.push(Number(process.hrtime.bigint() - t0) / 1e6);
      const keys = execFileSync('redis-cli', ['-p', String(COLD), 'DBSIZE'], { encoding: 'utf8' }).trim();
      if (keys !== String(KEYS)) throw new Error(`cold redis has ${keys} keys`);
      r.kill('SIGKILL');
      await new Promise((ok) => r.on('exit', ok));
    }
    row('(d) cold start, dataset from RDB', cold);
    // The machine's load as each was measured: (d) suffers more from a
    // loaded machine than (c) (a process started and its RDB file read,
    // against a resume), so their ratio moves with it.
    const loadD = loadAverage();
    console.log(`    (d) / (c) at p50: ${(pct(cold, 50) / pct(resumed, 50)).toFixed(1)}x (load average ${loadC} at (c), ${loadD} at (d))`);
    report.push({ what: '(d) / (c) p50', ratio: pct(cold, 50) / pct(resumed, 50), loadC, loadD });
  }

  // (e) SERVICES suspended services: serve restarted with them all (the
  // first, db, suspended by now), each of them never started or suspended.
  if (SERVICES > 0) {
    await stopServe();
    if (CLONES) appshot('service', 'rm', 'dbc');
    for (let i = 1; i < SERVICES; i++)
      appshot('service', 'add', `db${i}`, '--from', join(home, 'redis.img'), '--port', `127.0.0.1:${SERVICES_PORT + i}:${APP}`, '--idle', IDLE);
    // As serve runs by default (the most recently suspended services'
    // next instances prepared, held stopped), and without any prepared
    // (--prepared 0); each in its own process and hosted by the engine,
    // in the same run (BENCH_E_MODES=own,hosted).
    const modes = (process.env.BENCH_E_MODES ?? 'own,hosted').split(',');
    // BENCH_E_ENV=NAME=VALUE: also as by default with that variable set.
    const eEnv = process.env.BENCH_E_ENV ? Object.fromEntries([process.env.BENCH_E_ENV.split('=')]) : undefined;
    for (const [label, args, extra] of [['default', [], {}], ...(eEnv ? [[process.env.BENCH_E_ENV, [], eEnv]] : []), ['--prepared 0', ['--prepared', '0'], {}]])
    for (const mode of modes) {
      await stopServe();
      serve = await startServe(extra, cli, mode, args);
      // Settled: every service's state written, whatever serve does ahead
      // of a resume done (its log quiet for a second).
      for (let quiet = 0, seen = -1; quiet < 5; ) {
        await sleep(200);
        quiet = serveErr.length === seen ? quiet + 1 : 0;
        seen = serveErr.length;
      }
      const measure = (when) => {
        const states = readdirSync(join(home, 'services')).map((name) => {
          try {
            return JSON.parse(readFileSync(join(home, 'services', name, 'state.json'), 'utf8')).instances[0];
          } catch {
            return undefined;
          }
        });
        const suspended = states.filter((s) => s?.state === 'suspended').length;
        const prepared = states.filter((s) => s?.prepared).length;
        const pids = keptProcesses(serve.hostPid);
        const total = pids.reduce((n, p) => n + (pssKiB(p) || 0), 0);
        const anon = pids.reduce((n, p) => n + anonKiB(p), 0);
        const nodeRss = pids.reduce((n, p) => n + nodeRssKiB(p), 0);
        const own = pssKiB(serve.hostPid) / 1024;
        if (process.env.BENCH_SMAPS) for (const p of pids) smapsDetail(p);
        // In its own process, with an engine running beside it (as the
        // commands before started one): what both keep.
        const engine = mode === 'own' ? enginePid() : undefined;
        const beside = engine ? keptProcesses(engine).filter((p) => !pids.includes(p)) : [];
        const besideKiB = beside.reduce((n, p) => n + (pssKiB(p) || 0), 0);
        const where = mode === 'hosted' ? 'hosted by the engine' : 'its own process';
        console.log(
          `(e) ${SERVICES} services, ${suspended} suspended, ${prepared} prepared (${label}, ${where}, ${when}): PSS of all appshot keeps running for them (${pids.length} process${pids.length > 1 ? 'es' : ''}): ${(total / 1024).toFixed(1)} MiB (anonymous ${(anon / 1024).toFixed(1)}; the node binary's pages resident ${(nodeRss / 1024).toFixed(1)}, shared), of which the ${mode === 'hosted' ? 'engine' : 'serve process'} ${own.toFixed(1)} MiB` +
            (engine ? `; with the engine beside it (${beside.length} more): ${((total + besideKiB) / 1024).toFixed(1)} MiB` : ''),
        );
        report.push({ what: `(e) PSS, ${SERVICES} suspended services (MiB), ${label}, ${mode}, ${when}`, value: total / 1024, anon: anon / 1024, nodeRss: nodeRss / 1024, serve: own, processes: pids.length, suspended, prepared, ...(engine ? { withEngine: (total + besideKiB) / 1024 } : {}) });
      };
      measure('settled');
      // And once the page files' buffers that restores and snapshots
      // keep warm (up to 16 MiB, let go after 30 s unused: pages.c,
      // releaseKeptBuffers in serve's and the engine's ticks) are gone:
      // what a service suspended for longer than that costs.
      // BENCH_E_STEADY=0 skips it.
      if (STEADY_S > 0) {
        await sleep(STEADY_S * 1000);
        measure(`after ${STEADY_S} s quiet`);
      }
    }
  }
  if (process.env.BENCH_JSON) console.log(JSON.stringify(report));
} finally {
  // BENCH_LOG=FILE: the serve process's log (with APPSHOT_DEBUG=1, the
  // restore's phase timings), to see where a resume's time goes.
  if (process.env.BENCH_LOG) writeFileSync(process.env.BENCH_LOG, earlierServeErr + serveErr);
  if (serve) await stopServe(true);
  for (const aid of ['db', 'loader', 'tloader'])
    try {
      execFileSync(process.execPath, [cli, 'stop', aid, '--signal', 'KILL'], { env, stdio: 'ignore' });
    } catch {
      /* suspended or ended: nothing runs */
    }
  rmSync(home, { recursive: true, force: true });
}
