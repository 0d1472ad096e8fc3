// Restores of a freshly snapshotted image, as bench/criu.js measures
// appshot's (its rows restore_eager/restore_lazy), with a warm engine, for
// a paired A/B of builds: per round, size (BENCH_SIZES, MiB, default
// "0,16") and build (BENCH_BUILDS="old=DIR,new=DIR", as restore-profile.js),
// memapp run, a default snapshot, an eager restore, rm, a --lazy restore,
// rm; the builds alternate, BENCH_RUNS (default 7) rounds after one not
// counted. Prints the median (min-max) of restoreMs and of the command's
// wall time.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pairedBuilds, engineEnv, summary, cleanUpBuilds } from './measure.js';

const here = join(dirname(fileURLToPath(import.meta.url)), '..');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const sizes = (process.env.BENCH_SIZES ?? '0,16').split(',').map(Number);
const builds = pairedBuilds(here, 'restore-fresh');
const work = mkdtempSync(join(here, '.bench-images-restore-fresh-'));
const memapp = join(here, 'bench', 'bin', 'memapp');
const cli = (b, args, extra = {}) => {
  const t = process.hrtime.bigint();
  const r = spawnSync(join(b.root, 'bin', 'appshot'), args, { cwd: work, env: engineEnv(b, extra), encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - t) / 1e6;
  if (r.status !== 0) throw new Error(`${b.name} ${args.join(' ')}: ${r.stderr}`);
  return { wall, out: r.stdout };
};
const res = {};
let n = 0;
try {
  for (const b of builds) execFileSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), 'engine', 'start'], { env: engineEnv(b), stdio: 'ignore' });
  for (let i = -1; i < runs; i++) {
    const order = i % 2 ? builds : [...builds].reverse();
    for (const mib of sizes) for (const b of order) {
      const aid = `f${n++}`;
      cli(b, ['run', '-d', '--aid', aid, '--', memapp, String(mib)]);
      const log = join(b.home, 'apps', aid, 'log');
      for (let k = 0; k < 200 && !/READY/.test((() => { try { return readFileSync(log, 'utf8'); } catch { return ''; } })()); k++) spawnSync('sleep', ['0.05']);
      const img = join(work, `${aid}.img`);
      cli(b, ['snapshot', aid, '-o', img, '--full', '--json']);
      for (const lazy of [false, true]) {
        const r = cli(b, ['restore', img, '--aid', `${aid}${lazy ? 'l' : 'e'}`, '--json', ...(lazy ? ['--lazy'] : [])]);
        const j = JSON.parse(r.out);
        if (i >= 0) {
          const key = `${mib} MiB ${lazy ? 'lazy' : 'eager'}`;
          ((res[key] ??= {})[b.name] ??= { restoreMs: [], wallMs: [] });
          res[key][b.name].restoreMs.push(j.restoreMs);
          res[key][b.name].wallMs.push(r.wall);
        }
        cli(b, ['rm', '-f', `${aid}${lazy ? 'l' : 'e'}`]);
      }
      cli(b, ['rm', '-f', aid]);
      rmSync(img, { recursive: true, force: true });
    }
  }
  const fmt = (s) => `${s.median} (${s.min}–${s.max})`;
  console.log(`fresh image each round (as bench/criu.js), ${runs} rounds, builds alternating; median (min–max) ms; load ${readFileSync('/proc/loadavg', 'utf8').trim()}`);
  console.log(`| | ${builds.map((b) => b.name).join(' | ')} |\n|---|${builds.map(() => '---').join('|')}|`);
  for (const [key, per] of Object.entries(res)) for (const k of ['restoreMs', 'wallMs']) console.log(`| ${key}: ${k} | ${builds.map((b) => fmt(summary(per[b.name][k]))).join(' | ')} |`);
} finally {
  cleanUpBuilds(builds, [], [work]);
}
