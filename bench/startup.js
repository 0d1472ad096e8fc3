// npm run bench (last part): what a command costs before it does anything,
// wall time of whole commands:
//   node -e ''                the floor: a Node process that does nothing
//   appshot --version, --help
//   appshot ps                with one application running
//   appshot snapshot, restore of test/fixtures/bin/ticker (run -d), in turn:
//                             each restore brings back the image the
//                             snapshot before it wrote
// Median (min-max) of BENCH_RUNS (default 5).
//
// --base DIR (or BENCH_BASE=DIR): also measure the checkout in DIR (built:
// npm run build, build:native), e.g. a worktree of main, interleaved with
// this one in the same run, and print this one's time / DIR's.
//   git worktree add --detach ../base main && (cd ../base && npm ci && npm run build)
//   node bench/startup.js --base ../base
// --json: the results as JSON on stdout.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ticker = join(root, 'test', 'fixtures', 'bin', 'ticker');
const runs = Number(process.env.BENCH_RUNS ?? 5);
const args = process.argv.slice(2);
const baseArg = args.includes('--base') ? args[args.indexOf('--base') + 1] : process.env.BENCH_BASE;
const jsonOut = args.includes('--json');
const log = (s) => process.stderr.write(`bench/startup: ${s}\n`);

if (!existsSync(ticker)) {
  log(`${ticker} is missing: run npm run fixtures`);
  process.exit(1);
}

/** A checkout under test: its CLI, its own state directory (its own key,
 * so each trusts only its own images) and image directory. */
function tree(name, dir) {
  const cli = join(dir, 'bin', 'appshot.js');
  if (!existsSync(join(dir, 'dist', 'cli.js'))) {
    log(`${dir} is not built (no dist/cli.js): npm run build there`);
    process.exit(1);
  }
  const home = mkdtempSync(join(tmpdir(), 'appshot-bench-startup-'));
  // On the repository's disk like images.js (a snapshot fsyncs), under the
  // prefix .gitignore ignores.
  const work = mkdtempSync(join(root, '.bench-images-startup-'));
  return { name, dir, cli, home, work, aid: `bench-startup-${process.pid}`, images: 0, times: {} };
}

const trees = [tree('this', root)];
if (baseArg) trees.push(tree('base', resolve(baseArg)));

/** Runs a command, returns its wall time in ms; a failure ends the bench
 * with its output. */
function timed(t, argv, what) {
  const start = process.hrtime.bigint();
  const r = spawnSync(argv[0], argv.slice(1), { env: { ...process.env, APPSHOT_HOME: t.home }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${t.name}: ${what} failed (${r.status ?? r.signal}):\n${r.stderr || r.stdout}`);
  return ms;
}
const appshot = (t, ...a) => [process.execPath, t.cli, ...a];
let warmingUp = true;
const record = (t, what, ms) => warmingUp || (t.times[what] ??= []).push(ms);

function cleanUp() {
  for (const t of trees) {
    spawnSync(process.execPath, [t.cli, 'rm', '-f', t.aid], { env: { ...process.env, APPSHOT_HOME: t.home }, stdio: 'ignore' });
    rmSync(t.work, { recursive: true, force: true });
    rmSync(t.home, { recursive: true, force: true });
  }
}
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

try {
  for (const t of trees) execFileSync(process.execPath, [t.cli, 'run', '-d', '--aid', t.aid, '--', ticker], { env: { ...process.env, APPSHOT_HOME: t.home }, stdio: 'ignore' });
  const floor = { name: 'node', home: tmpdir(), times: {} };
  // One run first that is not counted: the page cache, the key files.
  for (let i = -1; i < runs; i++) {
    warmingUp = i < 0;
    // Each command for every tree in turn, the order swapped every run, so
    // that a busy moment of the machine falls on both alike.
    const order = i % 2 ? trees : [...trees].reverse();
    record(floor, "node -e ''", timed(floor, [process.execPath, '-e', ''], "node -e ''"));
    for (const t of order) record(t, '--version', timed(t, appshot(t, '--version'), '--version'));
    for (const t of order) record(t, '--help', timed(t, appshot(t, '--help'), '--help'));
    for (const t of order) record(t, 'ps', timed(t, appshot(t, 'ps'), 'ps'));
    for (const t of order) {
      const image = join(t.work, `img-${t.images++}`);
      record(t, 'snapshot', timed(t, appshot(t, 'snapshot', t.aid, '-o', image), 'snapshot'));
      record(t, 'restore', timed(t, appshot(t, 'restore', image), 'restore'));
      rmSync(image, { recursive: true, force: true });
    }
    if (!warmingUp) log(`run ${i + 1}/${runs}`);
  }

  const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const stat = (xs) => ({ median: +median(xs).toFixed(1), min: +Math.min(...xs).toFixed(1), max: +Math.max(...xs).toFixed(1) });
  const rows = [
    { what: "node -e ''", this: stat(floor.times["node -e ''"]) },
    ...['--version', '--help', 'ps', 'snapshot', 'restore'].map((what) => {
      const row = { what, this: stat(trees[0].times[what]) };
      if (trees[1]) {
        row.base = stat(trees[1].times[what]);
        row.ratio = +(row.this.median / row.base.median).toFixed(2);
      }
      return row;
    }),
  ];
  const result = { date: new Date().toISOString(), node: process.version, runs, base: trees[1]?.dir, rows };
  if (jsonOut) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  else {
    const cell = (s) => (s ? `${s.median} (${s.min}-${s.max})` : '');
    const lines = [['wall ms, median (min-max)', 'this', ...(trees[1] ? [`base ${trees[1].dir}`, 'this/base'] : [])]];
    for (const r of rows) lines.push([r.what, cell(r.this), ...(trees[1] ? [cell(r.base), r.ratio === undefined ? '' : String(r.ratio)] : [])]);
    const widths = lines[0].map((_, c) => Math.max(...lines.map((l) => l[c].length)));
    process.stdout.write(`appshot start-up, ${runs} runs, ${process.version}\n`);
    for (const l of lines) process.stdout.write(l.map((s, c) => s.padEnd(widths[c])).join('  ').trimEnd() + '\n');
  }
} finally {
  cleanUp();
}
