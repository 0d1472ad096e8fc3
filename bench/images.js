// npm run bench (second part): snapshot and restore of applications with
// 16 MiB, 256 MiB and 1 GiB of touched memory, against baselines measured
// in the same run: cp of the same bytes (with sync) for throughput, the
// application's cold start and fork() for restore. Times are appshot's own
// (reported by the command), without Node's start-up. Median of BENCH_RUNS
// (default 3); BENCH_SIZES=16,256 to choose sizes. Last, as root, what
// restoring credentials and limits costs: the calls injected for them in a
// process that kept root's (creds_calls above) and in test/fixtures'
// privdrop, whose two threads dropped privileges and run under seccomp.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const memapp = join(root, 'bench', 'bin', 'memapp');
const privdrop = join(root, 'test', 'fixtures', 'bin', 'privdrop');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 3);
const sizes = (process.env.BENCH_SIZES ?? '16,256,1024').split(',').map(Number);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-'));
const work = mkdtempSync(join(process.env.BENCH_DIR ?? root, '.bench-images-'));
const env = { ...process.env, APPSHOT_HOME: home };

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const appshot = (...args) => JSON.parse(execFileSync(process.execPath, [cli, ...args, '--json'], { env, encoding: 'utf8' }));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const logOf = (aid) => {
  try {
    return readFileSync(join(home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
async function waitLog(aid, re, count = 1) {
  for (let i = 0; i < 2000; i++) {
    if ((logOf(aid).match(re) ?? []).length >= count) return logOf(aid).match(re);
    await sleep(10);
  }
  throw new Error(`${aid}: no ${re}`);
}
const mainPid = (aid) => appshot('ps', aid)[0].processes.find((p) => p.vpid === 2).pid;
async function stop(aid) {
  // Killed and removed: an ended application keeps its AID until rm.
  spawnSync(process.execPath, [cli, 'rm', '-f', aid], { env });
  for (let i = 0; i < 400 && spawnSync(process.execPath, [cli, 'ps', aid], { env }).status === 0; i++) await sleep(25);
}

/** Cold start: exec to "READY" (memory touched), without appshot. */
async function coldStart(mib) {
  const t0 = process.hrtime.bigint();
  const child = spawn(memapp, [String(mib)], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((resolve) => child.stdout.on('data', (d) => String(d).includes('READY') && resolve()));
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  child.kill('SIGKILL');
  return ms;
}

function cpMs(file) {
  const copy = join(work, 'cp-copy');
  const t0 = process.hrtime.bigint();
  execFileSync('sh', ['-c', `cp "${file}" "${copy}" && sync "${copy}"`]);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  rmSync(copy, { force: true });
  return ms;
}

/** Restores of privdrop: what its credentials cost (calls injected for
 * credentials and limits, and the restore's time). */
async function credentials() {
  execFileSync(process.execPath, [cli, 'run', '-d', '--aid', 'creds', '--', privdrop], { env });
  await waitLog('creds', /^CHECK 3$/m);
  const image = join(work, 'creds-final');
  appshot('snapshot', 'creds', '-o', image);
  const ms = [];
  let calls = 0;
  for (let i = 0; i < runs; i++) {
    const r = appshot('restore', image, '--aid', 'creds-r');
    ms.push(r.restoreMs);
    calls = r.credentialCalls;
    await stop('creds-r');
  }
  return { app: 'privdrop (2 threads, uid 65534/1000, seccomp)', restore_ms: +median(ms).toFixed(2), creds_calls: calls, creds_ms_at_16us: +(calls * 0.016).toFixed(2) };
}

const rows = [];
let credsRow;
try {
  for (const mib of sizes) {
    const aid = `m${mib}`;
    const cold = [];
    for (let i = 0; i < runs; i++) cold.push(await coldStart(mib));
    execFileSync(process.execPath, [cli, 'run', '-d', '--aid', aid, '--', memapp, String(mib)], { env });
    await waitLog(aid, /^READY$/m);
    process.kill(mainPid(aid), 'SIGUSR2');
    const fork = Number((await waitLog(aid, /^FORK ([\d.]+)$/m))[0].split(' ')[1]) / 1000;

    const full = [];
    const cp = [];
    for (let i = 0; i < runs; i++) {
      const dir = join(work, `${aid}-full-${i}`);
      full.push(appshot('snapshot', aid, '-o', dir, '--leave-running', '--full'));
      cp.push(cpMs(join(dir, 'pages.img')));
      if (i < runs - 1) rmSync(dir, { recursive: true });
    }
    const incr = [];
    for (let i = 0; i < runs; i++) {
      process.kill(mainPid(aid), 'SIGUSR1');
      await waitLog(aid, /^DIRTIED/gm, i + 1);
      incr.push(appshot('snapshot', aid, '-o', join(work, `${aid}-incr-${i}`), '--leave-running'));
    }
    const pre = [];
    for (let i = 0; i < runs; i++) {
      process.kill(mainPid(aid), 'SIGUSR1');
      await waitLog(aid, /^DIRTIED/gm, runs + i + 1);
      pre.push(appshot('snapshot', aid, '-o', join(work, `${aid}-pre-${i}`), '--leave-running', '--pre-copy'));
      rmSync(join(work, `${aid}-pre-${i}`), { recursive: true });
    }
    const image = join(work, `${aid}-final`);
    appshot('snapshot', aid, '-o', image, '--full');
    const bytes = statSync(join(image, 'pages.img')).size;
    const restoreRuns = { eager: [], lazy: [] };
    let credsCalls = 0;
    for (let i = 0; i < runs; i++)
      for (const mode of ['eager', 'lazy']) {
        const r = appshot('restore', image, '--aid', `${aid}-r`, ...(mode === 'lazy' ? ['--lazy'] : []));
        restoreRuns[mode].push(r.restoreMs);
        credsCalls = r.credentialCalls;
        await stop(`${aid}-r`);
      }
    const total = median(full.map((r) => r.totalMs));
    rows.push({
      MiB: mib,
      snapshot_ms: +total.toFixed(1),
      frozen_ms: +median(full.map((r) => r.frozenMs)).toFixed(1),
      MiB_per_s: Math.round(bytes / 1048576 / (total / 1000)),
      cp_ms: +median(cp).toFixed(1),
      vs_cp: +(total / median(cp)).toFixed(2),
      incr_frozen_ms: +median(incr.map((r) => r.frozenMs)).toFixed(1),
      incr_pages: median(incr.map((r) => r.pages)),
      precopy_frozen_ms: +median(pre.map((r) => r.frozenMs)).toFixed(1),
      precopy_arm_ms: +median(pre.map((r) => r.preCopyFrozenMs)).toFixed(1),
      restore_ms: +median(restoreRuns.eager).toFixed(1),
      lazy_ms: +median(restoreRuns.lazy).toFixed(1),
      creds_calls: credsCalls,
      cold_start_ms: +median(cold).toFixed(1),
      fork_ms: +fork.toFixed(3),
      lazy_vs_fork: +(median(restoreRuns.lazy) / fork).toFixed(1),
    });
    await stop(aid);
  }
  if (process.getuid() === 0) credsRow = await credentials();
} finally {
  rmSync(home, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
if (process.argv.includes('--json')) console.log(JSON.stringify({ runs, rows, credentials: credsRow }, null, 2));
else {
  console.log(`snapshot and restore, median of ${runs} runs (appshot's own times, without Node's start-up)`);
  console.table(rows);
  if (credsRow) {
    console.log('credentials and limits restored (a snapshot reads them with one injected call per thread and one per process)');
    console.table([credsRow]);
  }
}
