// The resident engine (src/engine/) against the CLI in-process: wall time
// of whole commands, each run both ways in turn (the order swapped every
// run), in one state directory, medians (min-max) of BENCH_RUNS (default 7)
// after one run not counted:
//   node -e ''                the floor: a Node process that does nothing
//   appshot --version         the client path: with an engine, bin/appshot.js
//                             loads only the client, not the CLI
//   appshot ps                with one application running
//   appshot snapshot, restore of test/fixtures/bin/ticker (run -d), in turn
//   appshot clone             one instance of a template of ticker (its
//                             removal not counted)
// "engine" = an engine started for the state directory beforehand (warm),
// reached by bin/appshot.js (Node's client); "native" = the same engine
// reached by bin/appshot, the command npm installs, which runs
// appshot-client (C) and starts no Node; "in-process" = APPSHOT_ENGINE=off.
// Baselines in the same run: `criu --version` (a C program that does
// nothing else) when a CRIU binary is there (CRIU_BIN, on PATH, or the one
// bench/criu.js built), and `true` (an exec and nothing).
// --json: the results as JSON.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const nativeBin = join(root, 'bin', 'appshot');
const criu = [process.env.CRIU_BIN, spawnSync('sh', ['-c', 'command -v criu'], { encoding: 'utf8' }).stdout?.trim(), join(homedir(), '.cache', 'appshot-bench', 'criu-v4.2', 'criu', 'criu')].find(
  (b) => b && existsSync(b),
);
const ticker = join(root, 'test', 'fixtures', 'bin', 'ticker');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const jsonOut = process.argv.includes('--json');
const log = (s) => process.stderr.write(`bench/engine: ${s}\n`);
if (!existsSync(ticker)) {
  log(`${ticker} is missing: run npm run fixtures`);
  process.exit(1);
}

const home = mkdtempSync(join(tmpdir(), 'appshot-bench-engine-'));
const work = mkdtempSync(join(root, '.bench-images-engine-'));
const aid = `bench-engine-${process.pid}`;
const modes = {
  'in-process': { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' },
  engine: { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '600' },
};
modes.native = modes.engine;
const times = {};
let counting = false;
let images = 0;
let clones = 0;

function timed(mode, what, argv) {
  const start = process.hrtime.bigint();
  const r = spawnSync(argv[0], argv.slice(1), { cwd: work, env: modes[mode], encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${mode}: ${what} failed (${r.status ?? r.signal}):\n${r.stderr || r.stdout}`);
  if (counting) ((times[what] ??= {})[mode] ??= []).push(ms);
  return r.stdout;
}
const appshot = (...a) => [process.execPath, cli, ...a];
/** The command line of `appshot ...` in mode `m`. */
const command = (m, ...a) => (m === 'native' ? [nativeBin, ...a] : appshot(...a));
const quiet = (env, ...a) => execFileSync(process.execPath, [cli, ...a], { cwd: work, env, stdio: 'ignore' });

function cleanUp() {
  spawnSync(process.execPath, [cli, 'engine', 'stop'], { env: modes['in-process'], stdio: 'ignore' });
  spawnSync(process.execPath, [cli, 'rm', '-f', aid], { env: modes['in-process'], stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

try {
  const off = modes['in-process'];
  // The template: of a ticker of its own, snapshotted (ended) once.
  quiet(off, 'run', '-d', '--aid', `${aid}-t`, '--', ticker);
  quiet(off, 'snapshot', `${aid}-t`, '-o', 'tpl.appshot');
  quiet(off, 'template', 'create', 'tpl.appshot', '-o', 'tpl.template');
  quiet(off, 'run', '-d', '--aid', aid, '--', ticker);
  quiet(off, 'engine', 'start');
  for (let i = -1; i < runs; i++) {
    counting = i >= 0;
    const order = [['in-process', 'engine', 'native'], ['native', 'engine', 'in-process'], ['engine', 'native', 'in-process']][(i + 1) % 3];
    timed('in-process', "node -e ''", [process.execPath, '-e', '']);
    timed('in-process', 'true', ['true']);
    if (criu) timed('in-process', 'criu --version', [criu, '--version']);
    for (const m of order) timed(m, '--version', command(m, '--version'));
    for (const m of order) timed(m, 'ps', command(m, 'ps'));
    for (const m of order) {
      const image = `img-${images++}`;
      timed(m, 'snapshot', command(m, 'snapshot', aid, '-o', image));
      timed(m, 'restore', command(m, 'restore', image));
      rmSync(join(work, image), { recursive: true, force: true });
    }
    for (const m of order) {
      const c = `${aid}-c${clones++}`;
      timed(m, 'clone', command(m, 'clone', 'tpl.template', '--aid', c));
      quiet(off, 'rm', '-f', c);
    }
    if (counting) log(`run ${i + 1}/${runs}`);
  }
  const status = JSON.parse(execFileSync(process.execPath, [cli, 'engine', 'status', '--json'], { env: off, encoding: 'utf8' }));

  const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  };
  const stat = (xs) => xs && { median: +median(xs).toFixed(1), min: +Math.min(...xs).toFixed(1), max: +Math.max(...xs).toFixed(1) };
  const rows = Object.entries(times).map(([what, t]) => {
    const row = { what, inProcess: stat(t['in-process']), engine: stat(t.engine), native: stat(t.native) };
    if (row.engine) row.ratio = +(row.engine.median / row.inProcess.median).toFixed(2);
    if (row.native) row.nativeRatio = +(row.native.median / row.inProcess.median).toFixed(2);
    return row;
  });
  const result = { date: new Date().toISOString(), node: process.version, runs, loadavg: (await import('node:os')).loadavg(), templateCache: status.templateCache, rows };
  if (jsonOut) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  else {
    const cell = (s) => (s ? `${s.median} (${s.min}-${s.max})` : '');
    const lines = [['wall ms, median (min-max)', 'in-process', 'engine (Node client)', 'engine (native client)', 'engine/in-process', 'native/in-process']];
    for (const r of rows)
      lines.push([r.what, cell(r.inProcess), cell(r.engine), cell(r.native), r.ratio === undefined ? '' : String(r.ratio), r.nativeRatio === undefined ? '' : String(r.nativeRatio)]);
    const widths = lines[0].map((_, c) => Math.max(...lines.map((l) => l[c].length)));
    process.stdout.write(`appshot engine, ${runs} runs, ${process.version}, load ${result.loadavg.map((l) => l.toFixed(1)).join(' ')}\n`);
    for (const l of lines) process.stdout.write(l.map((s, c) => s.padEnd(widths[c])).join('  ').trimEnd() + '\n');
    process.stdout.write(`template cache: ${JSON.stringify(status.templateCache)}\n`);
  }
} finally {
  cleanUp();
}
