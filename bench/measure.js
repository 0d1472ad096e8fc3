// What the benchmarks share for measuring (bench/criu.js, bench/objects.js,
// the paired profiles): a command's wall and CPU time through bench/rusage,
// a series' median and range, waiting for a condition, the builds a paired
// run compares and their warm engines.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const rusage = join(dirname(fileURLToPath(import.meta.url)), 'bin', 'rusage');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs a command to its end under bench/rusage: { out, err, wallMs,
 * cpuMs } (user + system time of it and the children it waited for);
 * throws on failure. */
export function timed(cmd, args, opts = {}) {
  const r = spawnSync(rusage, [cmd, ...args], { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  const m = /^RUSAGE (\d+) (\d+)$/m.exec(r.stderr ?? '');
  const err = (r.stderr ?? '').replace(/^RUSAGE .*\n?/m, '');
  if (r.status !== 0 || !m) throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}): ${err.trim().split('\n').slice(-3).join(' | ')}`);
  return { out: r.stdout, err, wallMs: Number(m[1]) / 1000, cpuMs: Number(m[2]) / 1000 };
}

/** Median, min and max of the finite values of a series (undefined if
 * none), rounded to 2 decimals under 10 and 1 above. */
export function summary(xs) {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return undefined;
  const median = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  const r = (x) => +x.toFixed(x < 10 ? 2 : 1);
  return { median: r(median), min: r(s[0]), max: r(s[s.length - 1]), n: s.length };
}

/** The median of the finite values of a series, unrounded (NaN if none). */
export function median(xs) {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** The builds a paired benchmark compares, from BENCH_BUILDS
 * ("name=DIR,name=DIR"; default: the checkout `here` alone, named "this"),
 * each with an APPSHOT_HOME of its own under the system's temporary
 * directory, named after `tag`. */
export function pairedBuilds(here, tag) {
  return (process.env.BENCH_BUILDS ?? `this=${here}`).split(',').map((b) => {
    const [name, dir] = b.split('=');
    return { name, root: resolve(dir), home: mkdtempSync(join(tmpdir(), `appshot-bench-${tag}-${name}-`)) };
  });
}

/** The environment of a build's commands: its own home, and its engine
 * started by hand (`engine start`) and kept while the benchmark runs. */
export const engineEnv = (b, extra = {}) => ({ ...process.env, APPSHOT_HOME: b.home, APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '600', ...extra });

/** For each build: `appshot` run in-process (no engine) with `args`. */
export const inProcess = (b, args, extra = {}) =>
  spawnSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), ...args], { env: engineEnv(b, { APPSHOT_ENGINE: 'off', ...extra }), stdio: 'ignore' });

/** Stops each build's engine, removes the applications `aids` (`rm -f`),
 * then its home, then the `paths` the benchmark made. */
export function cleanUpBuilds(builds, aids = [], paths = []) {
  for (const b of builds) {
    inProcess(b, ['engine', 'stop']);
    for (const aid of aids) inProcess(b, ['rm', '-f', aid]);
    rmSync(b.home, { recursive: true, force: true });
  }
  for (const p of paths) rmSync(p, { recursive: true, force: true });
}

/** The clean-up of a paired benchmark: run by the caller when it ends, and
 * on Ctrl-C (then exit 130). */
export function pairedCleanUp(builds, aids, paths) {
  const cleanUp = () => cleanUpBuilds(builds, aids, paths);
  process.on('SIGINT', () => {
    cleanUp();
    process.exit(130);
  });
  return cleanUp;
}

/** Polls ok() every 10 ms until it returns something truthy, which it
 * returns; throws after ms. */
export async function waitFor(what, ok, ms = 60_000) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const v = ok();
    if (v) return v;
    await sleep(10);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A file's text, or '' if it cannot be read (not there yet). */
export const read = (path) => {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
};

/** Runs a benchmark's main(), with cleanup() after it however it ends
 * (Ctrl-C too, exit 130); a failure is one line through log(), exit 1. */
export async function runBench(main, cleanup, log) {
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    await main();
  } catch (e) {
    log(`failed: ${e.message}`);
    process.exitCode = 1;
  } finally {
    cleanup();
  }
}
