// npm run bench:criu (not part of npm run bench, not in CI or the tests):
// appshot against CRIU 4.x, side by side, in one interleaved series.
//
// CRIU is the one on PATH if it is 4.x, else built from source into
// ~/.cache/appshot-bench (bench/criu-build.js holds the recipe). If it
// cannot be built, or `criu check` fails on this kernel, one line says so
// and the appshot half still runs.
//
// The application is bench/memapp with 0 MiB (the tiny app: about 0.1 MiB
// of its own), 16 and 256 MiB of touched memory (BENCH_SIZES=0,16,256,1024
// to choose). Each round takes every size in turn, and within it each
// measure by appshot and by CRIU one after the other (which one first
// alternates by round). Per size, BENCH_RUNS rounds (default 5): median and
// min-max of
//   frozen, --leave-running   appshot's frozenMs; CRIU's "Frozen time"
//                             (appshot's memory read from copy-on-write
//                             copies, then read once the app runs on:
//                             lr_copy; and the same with
//                             --no-cow-capture on the same app)
//   frozen, default           the same span, the application ended by
//                             the snapshot: from the end of freezing until
//                             it is killed and its processes gone. CRIU's
//                             clock stops there (cr-dump.c cr_dump_finish:
//                             pstree_switch_state(TASK_DEAD) kills and
//                             waits for the tasks, then TIME_FROZEN stops),
//                             its images written meanwhile (not synced);
//                             appshot's is heldMs: it keeps the
//                             application stopped until its image is on
//                             disk (fsync, commit synced), then kills it.
//                             appshot's frozenMs (its state read, the part
//                             that needs the application still) is shown
//                             apart: CRIU has no such figure (in builds
//                             before 5cff9bb this row held it)
//   snapshot wall, CPU        the whole command (default mode), user+sys;
//                             and its wall and CPU with CRIU's image files
//                             synced after (appshot's is on the disk on
//                             return, its fsync's writeback in its CPU)
//   restore eager, lazy       internal, until the application runs again,
//                             and the whole command's wall; CRIU's lazy
//                             restore is `restore --lazy-pages` served by
//                             a `criu lazy-pages` daemon. What each tool
//                             reports of itself is not the same span and
//                             is shown apart (reported): appshot's
//                             restoreMs starts once the image is read and
//                             verified (verifyMs: its metadata read,
//                             decoded and checked) and ends with the
//                             processes resumed; CRIU's "Restore time"
//                             starts before it reads its images and stops
//                             at its credentials stage, before it catches
//                             the tasks, lets its restorer run to
//                             rt_sigreturn, and detaches (cr-restore.c:
//                             timing_stop(TIME_RESTORE)). Internal, then:
//                             appshot's verifyMs + restoreMs; CRIU's
//                             Restore time + the span of its log (-v3)
//                             from "Unlock network" (just before its
//                             clock stops) to "Tasks resumed" (which
//                             counts the attach and the credentials stage
//                             twice: ~0.1 ms, against CRIU)
//   baselines                 fork() of the running app (memapp's own
//                             measure), a cold start (exec to READY), and
//                             cp + sync of appshot's page file
// Each command runs under bench/rusage (fork, exec, wait4) for its wall and
// CPU time.
//
// BENCH_APPSHOT: how appshot's commands run. `native` (the default, as
// users meet appshot): `bin/appshot` (the installed command: the native
// client) with an engine started beforehand (APPSHOT_ENGINE=manual: none
// is started on demand in the middle of the series, so the one measured
// is the one whose CPU is read) and warmed by BENCH_WARMUP rounds of the
// tiny app (default 2, both tools, not counted: a JIT-cold engine costs
// 5-10 ms more per restore for its first ~10 commands). A command's CPU
// is the client's plus what the engine used meanwhile, as the engine
// reports it (`engine status`: cpu, to the microsecond; /proc/PID/stat
// counts 10 ms ticks), so that no work goes uncounted, less what the
// bench's own two status reads cost the engine (each reads its CPU in the
// middle of its own handling): the median of 51 back-to-back pairs, taken
// after the warm-up and subtracted from every sample (0.2-0.5 ms, r465
// F10; in the results as engine_status_overhead_ms). `in-process`:
// `node bin/appshot.js` with APPSHOT_ENGINE=off, each command a Node
// process of its own (the figures of runs before 2026-12-07).
// In native mode each round also takes, on an application of its own, a
// default snapshot and an eager restore with APPSHOT_ENGINE=off, each
// command `node bin/appshot.js`, a cold Node process (rows "APPSHOT_ENGINE
// =off"; BENCH_COLD=0 leaves them out). That is every command with the
// engine off. It is not exactly a user's first command: by default
// (APPSHOT_ENGINE=auto) the native client finds no engine and runs
// bin/appshot.js, which starts an engine in the background and runs the
// command itself, so the first command also pays the client's exec and
// the engine's start beside it on the same cores, not measured here.
// And `--version`, against `criu --version`, both ways.
//
// CPU rows are not like for like (r465 F9): CRIU's is criu's own
// processes (wait4 of the command), and CRIU does much of its work inside
// the application's tasks (the dump's parasite in the dumped task, which
// is then killed; the restore's restorer, which maps and reads the pages,
// in the restored task, which `restore -d` never reaps), none of which is
// counted; appshot's reading and writing of pages is in its own process
// (the engine's), and is. The row labels say so.
//
// Results: bench/results/criu-DATE.json (-2, -3... for later runs the same
// day) and a table on stdout.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findCriu } from './criu-build.js';
import { read, runBench, sleep, summary, timed as timedRun, waitFor } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const memapp = join(root, 'bench', 'bin', 'memapp');
const rusage = join(root, 'bench', 'bin', 'rusage');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const sizes = (process.env.BENCH_SIZES ?? '0,16,256').split(',').map(Number);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-criu-'));
// On a disk like the other benchmarks (the prefix .gitignore ignores).
const work = mkdtempSync(join(process.env.BENCH_DIR ?? root, '.bench-images-criu-'));
const MODE = process.env.BENCH_APPSHOT ?? 'native';
const warmups = MODE === 'native' ? Number(process.env.BENCH_WARMUP ?? 2) : 0;
const coldRows = MODE === 'native' && process.env.BENCH_COLD !== '0';
if (MODE !== 'in-process' && MODE !== 'native') {
  process.stderr.write(`bench/criu: BENCH_APPSHOT is in-process or native, not ${MODE}\n`);
  process.exit(2);
}
const env = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: MODE === 'native' ? 'manual' : 'off', APPSHOT_ENGINE_IDLE: '3600' };
/** No engine: each command a cold Node process (the cold rows). */
const envOff = { ...env, APPSHOT_ENGINE: 'off' };
/** The command line that runs `appshot ...` in this mode. */
const appshotCommand = MODE === 'native' ? [join(root, 'bin', 'appshot')] : [process.execPath, cli];
let enginePid = 0;
/** The engine CPU of the bench's own two status reads around a command
 * (see the header), subtracted from each measured command's. */
let statusOverheadMs = 0;
let controlEngine; // dist/engine/client.js's, in native mode
/** CPU time the engine used so far, in ms (0 in-process), as it reports
 * it itself (to the microsecond). */
async function engineCpuMs() {
  if (!enginePid) return 0;
  const s = await controlEngine('status', home);
  if (s?.pid !== enginePid || !s.cpu) throw new Error(`the engine (pid ${enginePid}) did not report its CPU: ${JSON.stringify(s)}`);
  return s.cpu.userMs + s.cpu.systemMs;
}
/** The median engine CPU between two status reads back to back. */
async function statusReadsCpuMs() {
  for (let i = 0; i < 10; i++) await engineCpuMs();
  const d = [];
  for (let i = 0; i < 51; i++) {
    const before = await engineCpuMs();
    d.push((await engineCpuMs()) - before);
  }
  return d.sort((x, y) => x - y)[25];
}
const log = (s) => process.stderr.write(`bench/criu: ${s}\n`);
const children = new Set(); // processes started without appshot
const aids = new Set(); // applications started under appshot

if (!existsSync(memapp) || !existsSync(rusage)) {
  log(`${existsSync(memapp) ? rusage : memapp} is missing: run make -C bench`);
  process.exit(1);
}

// --- measuring ---------------------------------------------------------------

const timed = (cmd, args, opts = {}) => timedRun(cmd, args, { env, ...opts });

const appshot = async (...args) => {
  const before = await engineCpuMs();
  const r = timed(appshotCommand[0], [...appshotCommand.slice(1), ...args, '--json']);
  return { ...r, cpuMs: r.cpuMs + (await engineCpuMs()) - before - statusOverheadMs, json: JSON.parse(r.out) };
};
/** `appshot ...` in a cold Node process of its own, no engine. */
const appshotCold = (...args) => {
  const r = timed(process.execPath, [cli, ...args, '--json'], { env: envOff });
  return { ...r, json: JSON.parse(r.out) };
};

function waitGone(pid, ms = 10_000) {
  const until = Date.now() + ms;
  return (async () => {
    while (existsSync(`/proc/${pid}`) && Date.now() < until) await sleep(10);
    if (existsSync(`/proc/${pid}`)) throw new Error(`process ${pid} did not go`);
  })();
}

// --- the application, three ways ------------------------------------------------

/** memapp under appshot: its AID once READY. */
async function appshotApp(aid, mib) {
  aids.add(aid);
  timed(process.execPath, [cli, 'run', '-d', '--aid', aid, '--', memapp, String(mib)]);
  await waitFor(`${aid} to be ready`, () => read(join(home, 'apps', aid, 'log')).includes('READY'));
  return aid;
}

function rmApp(aid) {
  spawnSync(process.execPath, [cli, 'rm', '-f', aid], { env });
  aids.delete(aid);
}

/** memapp as CRIU takes it: in a session of its own, no terminal, its
 * output in a file. Returns { pid, log, exited }. */
async function plainApp(mib, logPath) {
  writeFileSync(logPath, '');
  const fd = openSync(logPath, 'a');
  const child = spawn(memapp, [String(mib)], { detached: true, stdio: ['ignore', fd, fd] });
  closeSync(fd);
  children.add(child);
  const exited = new Promise((r) => child.on('exit', r));
  exited.then(() => children.delete(child));
  await waitFor(`memapp ${mib} to be ready`, () => read(logPath).includes('READY'));
  return { pid: child.pid, log: logPath, exited };
}

/** fork() of the running application, as memapp measures it (µs → ms). */
async function forkMs(pid, logPath) {
  const before = (read(logPath).match(/^FORK /gm) ?? []).length;
  // Sent again each second until it answers: memapp prints READY before
  // its first pause(), and a signal that comes in between only sets the
  // flag pause() is not woken for (a loaded machine lost one a run).
  let sentAt = 0;
  const m = await waitFor('FORK', () => {
    const all = [...read(logPath).matchAll(/^FORK ([\d.]+)$/gm)];
    if (all.length > before) return all[all.length - 1];
    if (Date.now() - sentAt >= 1000) {
      process.kill(pid, 'SIGUSR2');
      sentAt = Date.now();
    }
    return undefined;
  });
  return Number(m[1]) / 1000;
}

async function coldStartMs(mib) {
  const t0 = process.hrtime.bigint();
  const child = spawn(memapp, [String(mib)], { stdio: ['ignore', 'pipe', 'ignore'] });
  await new Promise((resolve) => child.stdout.on('data', (d) => String(d).includes('READY') && resolve()));
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  child.kill('SIGKILL');
  await new Promise((r) => child.on('exit', r));
  return ms;
}

function cpSyncMs(file) {
  const copy = join(work, 'cp-copy');
  const r = timed('sh', ['-c', `cp "${file}" "${copy}" && sync "${copy}"`]);
  rmSync(copy, { force: true });
  return r.wallMs;
}

// --- one round of one size --------------------------------------------------------

const stat = (text, name) => {
  const m = new RegExp(`${name}: (\\d+) us`).exec(text);
  return m ? Number(m[1]) / 1000 : NaN;
};

/** The time from CRIU's "Unlock network" to "Tasks resumed" in a restore
 * log written at -v3 (ms): what its "Restore time" leaves out of the wait
 * until the application runs (see the header). */
function criuTailMs(logPath) {
  const at = (what) => {
    const m = new RegExp(`^\\((\\d+\\.\\d+)\\) .*${what}`, 'm').exec(read(logPath));
    // A row of NaN would be dropped from a median without a word.
    if (!m) throw new Error(`${logPath}: no line '${what}' (CRIU's -v3 log): its restore's tail cannot be timed`);
    return Number(m[1]) * 1000;
  };
  return at('Tasks resumed') - at('Unlock network');
}

/** A round's name: its number, or w1, w2... for the uncounted warm-ups
 * (rounds -1, -2...). */
const tag = (round) => (round < 0 ? `w${-round}` : String(round));

async function appshotRound(mib, round, r) {
  const dir = join(work, `a${mib}-${tag(round)}`);
  mkdirSync(dir);
  const aid = await appshotApp(`a${mib}r${tag(round)}`, mib);
  // Copy-on-write capture (the default) and the frozen copy it replaced
  // (--no-cow-capture), on the same application, which goes first
  // alternating by round.
  const lrFrozen = async () => {
    const lr = await appshot('snapshot', aid, '-o', join(dir, 'lr-frozen'), '--leave-running', '--full', '--no-cow-capture');
    r.frozen_lr_nocow.push(lr.json.frozenMs);
  };
  if (round % 2) await lrFrozen();
  const lr = await appshot('snapshot', aid, '-o', join(dir, 'lr'), '--leave-running', '--full');
  r.frozen_lr.push(lr.json.frozenMs);
  r.lr_track.push(lr.json.phases.trackMs);
  r.lr_copy.push(lr.json.phases.copyMs ?? 0);
  if (!(round % 2)) await lrFrozen();
  // The same memory for both tools' default snapshot: the page cache of
  // their --leave-running images given back just before (warm memory;
  // a page file written into memory the VM's host had taken back costs
  // twice the CPU: README, "Latest run" of 2026-12-05 23:15).
  for (const d of ['lr', 'lr-frozen']) rmSync(join(dir, d), { recursive: true, force: true });
  const def = await appshot('snapshot', aid, '-o', join(dir, 'img'), '--full');
  r.frozen_default.push(def.json.phases.heldMs);
  r.frozen_default_state.push(def.json.frozenMs);
  for (const phase of ['drain', 'fsync', 'checksum', 'commit', 'end']) r[`held_${phase}`].push(def.json.phases[`${phase}Ms`]);
  r.snapshot_wall.push(def.wallMs);
  r.snapshot_wall_durable.push(def.wallMs);
  r.snapshot_cpu.push(def.cpuMs);
  r.snapshot_cpu_durable.push(def.cpuMs);
  r.cp_sync.push(cpSyncMs(join(dir, 'img', 'pages.img')));
  aids.add(`${aid}e`).add(`${aid}l`);
  const eager = await appshot('restore', join(dir, 'img'), '--aid', `${aid}e`);
  r.restore_eager.push(eager.json.verifyMs + eager.json.restoreMs);
  r.restore_eager_reported.push(eager.json.restoreMs);
  r.restore_eager_wall.push(eager.wallMs);
  r.restore_eager_cpu.push(eager.cpuMs);
  rmApp(`${aid}e`);
  const lazy = await appshot('restore', join(dir, 'img'), '--aid', `${aid}l`, '--lazy');
  r.restore_lazy.push(lazy.json.verifyMs + lazy.json.restoreMs);
  r.restore_lazy_reported.push(lazy.json.restoreMs);
  r.restore_lazy_wall.push(lazy.wallMs);
  rmApp(`${aid}l`);
  rmApp(aid);
  r.version_wall.push(timed(appshotCommand[0], [...appshotCommand.slice(1), '--version']).wallMs);
  if (coldRows && round >= 0) await appshotColdRound(mib, round, dir, r);
  rmSync(dir, { recursive: true, force: true });
}

/** The same default snapshot and eager restore with no engine, each
 * command a cold Node process: on an application of its own (a default
 * snapshot ends it). */
async function appshotColdRound(mib, round, dir, r) {
  const aid = await appshotApp(`a${mib}r${tag(round)}c`, mib);
  const def = appshotCold('snapshot', aid, '-o', join(dir, 'cold'), '--full');
  r.cold_frozen_default.push(def.json.phases.heldMs);
  r.cold_frozen_default_state.push(def.json.frozenMs);
  r.cold_snapshot_wall.push(def.wallMs);
  r.cold_snapshot_cpu.push(def.cpuMs);
  aids.add(`${aid}e`);
  const eager = appshotCold('restore', join(dir, 'cold'), '--aid', `${aid}e`);
  r.cold_restore_eager.push(eager.json.verifyMs + eager.json.restoreMs);
  r.cold_restore_eager_wall.push(eager.wallMs);
  r.cold_restore_eager_cpu.push(eager.cpuMs);
  rmApp(`${aid}e`);
  aids.delete(aid); // ended by its snapshot
  r.cold_version_wall.push(timed(process.execPath, [cli, '--version'], { env: envOff }).wallMs);
}

async function criuRound(criu, mib, round, r) {
  const dir = join(work, `c${mib}-${tag(round)}`);
  for (const d of ['lr', 'img']) mkdirSync(join(dir, d), { recursive: true });
  const app = await plainApp(mib, join(dir, 'app.log'));
  r.fork.push(await forkMs(app.pid, app.log));
  const lr = timed(criu, ['dump', '-t', String(app.pid), '-D', join(dir, 'lr'), '--leave-running', '--display-stats', '-o', 'dump.log']);
  r.frozen_lr.push(stat(lr.out, 'Frozen time'));
  rmSync(join(dir, 'lr'), { recursive: true, force: true }); // as appshot's (appshotRound)
  const def = timed(criu, ['dump', '-t', String(app.pid), '-D', join(dir, 'img'), '--display-stats', '-o', 'dump.log']);
  r.frozen_default.push(stat(def.out, 'Frozen time'));
  r.snapshot_wall.push(def.wallMs);
  r.snapshot_cpu.push(def.cpuMs);
  // appshot's image is on the disk when its command returns (the page file
  // fsynced before the commit, the commit synced); CRIU's is in the page
  // cache. The same durability for CRIU: its image's files and directory
  // synced after.
  const files = readdirSync(join(dir, 'img')).map((f) => join(dir, 'img', f));
  const synced = timed('sync', [...files, join(dir, 'img'), dir]);
  r.snapshot_wall_durable.push(def.wallMs + synced.wallMs);
  // And the CPU of that sync (its writeback is issued by the process that
  // syncs): appshot's command pays its own fsync's; CRIU's dirty pages are
  // otherwise written back by the kernel's flusher threads, whose CPU no
  // command is charged.
  r.snapshot_cpu_durable.push(def.cpuMs + synced.cpuMs);
  await app.exited; // reaped: its PID is free for the restore
  const pidfile = join(dir, 'pid');
  const restored = async (lazyDaemon) => {
    const pid = Number(read(pidfile));
    process.kill(pid, 'SIGKILL');
    await waitGone(pid);
    rmSync(pidfile, { force: true });
    if (lazyDaemon) await lazyDaemon;
  };
  const eager = timed(criu, ['restore', '-D', join(dir, 'img'), '-d', '--display-stats', '-v3', '-o', 'restore.log', '--pidfile', pidfile]);
  r.restore_eager.push(stat(eager.out, 'Restore time') + criuTailMs(join(dir, 'img', 'restore.log')));
  r.restore_eager_reported.push(stat(eager.out, 'Restore time'));
  r.restore_eager_wall.push(eager.wallMs);
  r.restore_eager_cpu.push(eager.cpuMs);
  await restored();
  // The lazy-pages daemon serves the pages from the images, and leaves when
  // the restored process is gone.
  const daemon = spawn(criu, ['lazy-pages', '-D', join(dir, 'img'), '-o', 'lazy.log'], { stdio: 'ignore' });
  children.add(daemon);
  const daemonGone = new Promise((res) => daemon.on('exit', res)).then(() => children.delete(daemon));
  await waitFor('the lazy-pages socket', () => existsSync(join(dir, 'img', 'lazy-pages.socket')), 10_000);
  const lazy = timed(criu, ['restore', '-D', join(dir, 'img'), '-d', '--lazy-pages', '--display-stats', '-v3', '-o', 'restore-lazy.log', '--pidfile', pidfile]);
  r.restore_lazy.push(stat(lazy.out, 'Restore time') + criuTailMs(join(dir, 'img', 'restore-lazy.log')));
  r.restore_lazy_reported.push(stat(lazy.out, 'Restore time'));
  r.restore_lazy_wall.push(lazy.wallMs);
  await restored(daemonGone);
  r.cold.push(await coldStartMs(mib));
  r.version_wall.push(timed(criu, ['--version']).wallMs);
  rmSync(dir, { recursive: true, force: true });
}

// --- the series ---------------------------------------------------------------------

const ROWS = [
  ['frozen_lr', 'frozen, --leave-running (ms)'],
  ['lr_track', '  appshot: of which arming dirty tracking for the next one (ms)'],
  ['lr_copy', '  appshot: then reading the copy-on-write copies, app running (ms)'],
  ['frozen_lr_nocow', '  appshot: frozen, --leave-running --no-cow-capture (ms)'],
  ['frozen_default', 'frozen, default snapshot: until the application is killed and gone (appshot: heldMs) (ms)'],
  ['frozen_default_state', '  appshot: of which its state read (frozenMs) (ms)'],
  ['held_drain', '  appshot: of which the page file written out (ms)'],
  ['held_fsync', '  appshot: of which its fsync (ms)'],
  ['held_checksum', '  appshot: of which classifying, checksums of mapped files (ms)'],
  ['held_commit', '  appshot: of which the commit (metadata signed, renamed into place, syncs) (ms)'],
  ['held_end', '  appshot: ending it: the kill (in heldMs too), its registration gone (ms)'],
  ['snapshot_wall', 'whole snapshot command, wall (ms)'],
  ['snapshot_wall_durable', '  the same, the image on the disk (CRIU: then sync of its files) (ms)'],
  ['snapshot_cpu', "whole snapshot command, CPU (CRIU: criu's processes only, its parasite's work in the dumped task not counted) (ms)"],
  ['snapshot_cpu_durable', '  the same, the image on the disk (CRIU: then the CPU of its sync too) (ms)'],
  ['restore_eager', 'eager restore, internal: until the application runs (ms)'],
  ['restore_eager_reported', '  as each tool reports it (appshot: restoreMs; CRIU: Restore time) (ms)'],
  ['restore_eager_wall', 'eager restore, whole command wall (ms)'],
  ['restore_eager_cpu', "eager restore, whole command CPU (CRIU: criu's process only, its restorer's work in the restored task, the pages read, not counted; appshot's page writing is) (ms)"],
  ['restore_lazy', 'lazy restore, internal: until the application runs (ms)'],
  ['restore_lazy_reported', '  as each tool reports it (appshot: restoreMs; CRIU: Restore time) (ms)'],
  ['restore_lazy_wall', 'lazy restore, whole command wall (ms)'],
  ['version_wall', '--version, wall (ms)'],
  ['fork', 'baseline: fork() of the running app (ms)'],
  ['cold', 'baseline: cold start (ms)'],
  ['cp_sync', 'baseline: cp + sync of the page file (ms)'],
  ['cold_frozen_default', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): frozen, default snapshot (heldMs) (ms)'],
  ['cold_frozen_default_state', '  of which its state read (frozenMs) (ms)'],
  ['cold_snapshot_wall', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): whole snapshot command, wall (ms)'],
  ['cold_snapshot_cpu', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): whole snapshot command, CPU (ms)'],
  ['cold_restore_eager', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): eager restore, until the application runs (ms)'],
  ['cold_restore_eager_wall', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): eager restore, whole command wall (ms)'],
  ['cold_restore_eager_cpu', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): eager restore, whole command CPU (ms)'],
  ['cold_version_wall', 'appshot, APPSHOT_ENGINE=off (each command a cold Node process): --version, wall (ms)'],
];
const series = () => Object.fromEntries(ROWS.map(([k]) => [k, []]));

async function main() {
  if (MODE === 'native') {
    mkdirSync(home, { recursive: true });
    spawnSync(process.execPath, [cli, 'engine', 'start'], { env, stdio: 'ignore' });
    enginePid = JSON.parse(spawnSync(process.execPath, [cli, 'engine', 'status', '--json'], { env, encoding: 'utf8' }).stdout).pid;
    if (!enginePid) throw new Error('the engine did not start');
    ({ controlEngine } = await import(join(root, 'dist', 'engine', 'client.js')));
    log(`appshot through the native client and a warm engine (pid ${enginePid})`);
  }
  const criu = findCriu(log);
  if (criu.why) log(`${criu.why}; measuring appshot alone`);
  else log(`CRIU ${criu.version} (${criu.bin})`);
  const data = Object.fromEntries(sizes.map((mib) => [mib, { appshot: series(), criu: series() }]));
  const loads = [];
  // Uncounted: the engine's JIT warmed on the paths the series takes (and
  // both tools' files in the page cache).
  for (let w = 0; w < warmups; w++) {
    log(`warm-up ${w + 1}/${warmups} (not counted), tiny app`);
    await appshotRound(0, -1 - w, series());
    if (!criu.why) await criuRound(criu.bin, 0, -1 - w, series());
  }
  if (enginePid) {
    statusOverheadMs = await statusReadsCpuMs();
    log(`the bench's own status reads: ${statusOverheadMs.toFixed(3)} ms of engine CPU per command, subtracted`);
  }
  for (let round = 0; round < runs; round++) {
    for (const mib of sizes) {
      loads.push(loadavg()[0]);
      log(`round ${round + 1}/${runs}, ${mib} MiB`);
      const steps = [() => appshotRound(mib, round, data[mib].appshot)];
      if (!criu.why) steps.push(() => criuRound(criu.bin, mib, round, data[mib].criu));
      // The fork and cold-start baselines come from the CRIU half's app;
      // without CRIU, from a plain app of their own.
      else
        steps.push(async () => {
          const app = await plainApp(mib, join(work, `plain-${mib}.log`));
          data[mib].criu.fork.push(await forkMs(app.pid, app.log));
          process.kill(app.pid, 'SIGKILL');
          await app.exited;
          data[mib].criu.cold.push(await coldStartMs(mib));
        });
      if (round % 2) steps.reverse();
      for (const step of steps) await step();
    }
  }
  const results = {
    date: new Date().toISOString(),
    appshot: MODE,
    warmups,
    engine_status_overhead_ms: enginePid ? statusOverheadMs : undefined,
    machine: { cpus: cpus().length, model: cpus()[0]?.model, kernel: release(), loadavg_during: summary(loads) },
    criu: criu.why ? { unavailable: criu.why } : { version: criu.version, bin: criu.bin },
    runs,
    sizes_mib: sizes,
    rows: Object.fromEntries(ROWS.map(([k, label]) => [k, label])),
    results: Object.fromEntries(
      sizes.map((mib) => [
        mib,
        Object.fromEntries(
          ROWS.map(([k]) => {
            const a = summary(data[mib].appshot[k]);
            const c = summary(data[mib].criu[k]);
            return [k, { appshot: a, criu: c, ratio: a && c && c.median ? +(a.median / c.median).toFixed(2) : undefined }];
          }),
        ),
      ]),
    ),
    raw: data,
  };
  const outDir = join(root, 'bench', 'results');
  mkdirSync(outDir, { recursive: true });
  // A second run the same day does not replace the first.
  let file = join(outDir, `criu-${results.date.slice(0, 10)}.json`);
  for (let n = 2; existsSync(file); n++) file = join(outDir, `criu-${results.date.slice(0, 10)}-${n}.json`);
  writeFileSync(file, JSON.stringify(results, null, 2) + '\n');
  printTable(results);
  log(`results in ${file}`);
}

function printTable(results) {
  const cell = (s) => (s ? `${s.median} (${s.min}–${s.max})` : '–');
  const head = `| ${results.criu.version ? `appshot / CRIU ${results.criu.version}` : 'appshot'} | ${sizes.map((m) => `${m || 'tiny'}${m ? ' MiB' : ''}`).join(' | ')} |`;
  const lines = [head, `|---|${sizes.map(() => '---').join('|')}|`];
  for (const [k, label] of ROWS) {
    const cells = sizes.map((mib) => {
      const x = results.results[mib][k];
      if (k === 'fork' || k === 'cold') return cell(x.criu ?? x.appshot);
      if (!x.criu) return cell(x.appshot);
      return `${cell(x.appshot)} / ${cell(x.criu)}${x.ratio !== undefined ? ` = ${x.ratio}` : ''}`;
    });
    lines.push(`| ${label} | ${cells.join(' | ')} |`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

function cleanup() {
  for (const c of children) {
    try {
      process.kill(c.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
  if (aids.size) spawnSync(process.execPath, [cli, 'rm', '-f', ...aids], { env });
  if (enginePid) spawnSync(process.execPath, [cli, 'engine', 'stop'], { env, stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}

await runBench(main, cleanup, log);
