// The cost of path calls under a FILE ... COPY-ON-WRITE rule in a clone
// (bench/micro.c's MICRO_COW: stat and open of a file three directories
// below the rule's tree, read from the original and on a private copy),
// against the same calls natively, in one run, interleaved.
//
// A copy-on-write rule applies only in a clone: for each build micro is run
// by appshot (waiting), snapshotted and made a template; then each round
// clones it once per build (the order alternating), signals the clone and
// reads its answer from the clone's log. Paired A/B: BENCH_BUILDS=
// "old=DIR,new=." (measure.js) compares preload libraries. Median of
// BENCH_RUNS (default 5); BENCH_N (default 1000000: n/10 calls each).
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanUpBuilds, median, pairedBuilds } from './measure.js';

const here = join(dirname(fileURLToPath(import.meta.url)), '..');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const N = process.env.BENCH_N ?? '1000000';
const builds = pairedBuilds(here, 'cow');
const data = mkdtempSync(join(tmpdir(), 'appshot-bench-cowtree-'));
const tree = join(data, 'tree');
for (const f of ['a/b/c/f', 'p/q/r/g']) {
  mkdirSync(join(tree, f, '..'), { recursive: true });
  writeFileSync(join(tree, f), 'x\n');
}
const rules = join(data, 'cow.rules');
writeFileSync(rules, `FILE "${tree}" COPY-ON-WRITE\n`);

const env = (b) => ({ ...process.env, APPSHOT_HOME: b.home, APPSHOT_ENGINE: 'off', APPSHOT_CLONE_POOL: '0', MICRO_COW: tree });
const appshot = (b, args) =>
  execFileSync(process.execPath, [join(b.root, 'bin', 'appshot.js'), ...args], { env: env(b), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const log = (b, aid) => {
  try {
    return readFileSync(join(b.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, test) {
  for (let i = 0; i < 6000; i++) {
    const v = test();
    if (v) return v;
    await sleep(20);
  }
  throw new Error(`no ${what}`);
}
const answer = (text) => {
  const line = text.split('\n').find((l) => l.startsWith('{'));
  return line && JSON.parse(line);
};

/** micro natively: READY, SIGHUP, its answer. */
async function native(b) {
  const child = spawn(join(b.root, 'bench', 'bin', 'micro'), [N], { env: env(b) });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await until('READY', () => out.includes('READY'));
  child.kill('SIGHUP');
  return until('answer', () => answer(out));
}

/** One clone of b's template: signalled, its answer, then removed. */
async function cloned(b, aid) {
  appshot(b, ['clone', join(b.home, 'tpl'), '--aid', aid, '--json']);
  const pid = JSON.parse(appshot(b, ['ps', aid, '--json']))[0].processes.find((p) => p.vpid === 2).pid;
  process.kill(pid, 'SIGHUP');
  const r = await until(`${aid}'s answer`, () => answer(log(b, aid)));
  appshot(b, ['rm', '-f', aid]);
  return r;
}

const results = { native: [] };
try {
  for (const b of builds) {
    results[b.name] = [];
    appshot(b, ['run', '-d', '--aid', 'cowbench', '--rules', rules, '--', join(b.root, 'bench', 'bin', 'micro'), N]);
    await until('READY', () => log(b, 'cowbench').includes('READY'));
    appshot(b, ['snapshot', 'cowbench', '-o', join(b.home, 'snap')]);
    appshot(b, ['template', 'create', join(b.home, 'snap'), '-o', join(b.home, 'tpl')]);
    appshot(b, ['rm', '-f', 'cowbench']);
  }
  for (let i = 0; i < runs; i++) {
    results.native.push(await native(builds[0]));
    const order = i % 2 ? [...builds].reverse() : builds;
    for (const b of order) results[b.name].push(await cloned(b, `cowbench-${i}`));
  }
} finally {
  cleanUpBuilds(builds, [], [data]);
}

const rows = Object.keys(results.native[0]).map((op) => {
  const row = { op };
  for (const [name, rs] of Object.entries(results)) row[`${name}_ns`] = +median(rs.map((r) => r[op])).toFixed(1);
  return row;
});
if (process.argv.includes('--json')) console.log(JSON.stringify({ runs, rows }, null, 2));
else {
  console.log(`path calls under a copy-on-write rule in a clone, median of ${runs} interleaved runs (ns per call)`);
  console.table(rows);
}
