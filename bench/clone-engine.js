// Clones of a 16 MiB template with and without a warm resident engine, in
// one run, interleaved (the order alternates each round): `appshot clone`
// of one instance and batches of BENCH_BATCHES (default 8; e.g. "8,32"),
// wall time of the command and appshot's
// own cloneMs per instance; median of BENCH_RUNS (default 7) after one
// round not counted. "in-process" = APPSHOT_ENGINE=off; "engine" = a warm
// engine (APPSHOT_ENGINE=manual, started first). --json: the results.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const memapp = join(root, 'bench', 'bin', 'memapp');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const MIB = Number(process.env.BENCH_MIB ?? 16);
const BATCHES = (process.env.BENCH_BATCHES ?? '8').split(',').map(Number);
if (!BATCHES.every((n) => Number.isInteger(n) && n > 1)) throw new Error(`BENCH_BATCHES='${process.env.BENCH_BATCHES}': expected sizes above 1, e.g. 8,32`);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-clone-engine-'));
const work = mkdtempSync(join(root, '.bench-images-clone-engine-'));
const modes = {
  'in-process': { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' },
  engine: { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'manual', APPSHOT_ENGINE_IDLE: '600' },
};
const off = modes['in-process'];
const quiet = (...a) => execFileSync(process.execPath, [cli, ...a], { cwd: work, env: off, stdio: 'ignore' });
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const results = {};
let n = 0;

function clone(mode, count, counting) {
  const aid = `c${n++}`;
  const start = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [cli, 'clone', 'tpl.template', '--aid', aid, '--count', String(count), '--json'], { cwd: work, env: modes[mode], encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - start) / 1e6;
  if (r.status !== 0) throw new Error(`${mode}: clone failed (${r.status}): ${r.stderr}`);
  const made = JSON.parse(r.stdout);
  if (made.length !== count) throw new Error(`${mode}: ${made.length} instances, not ${count}`);
  if (counting) {
    const row = ((results[count === 1 ? 'single' : `batch of ${count}`] ??= {})[mode] ??= { wall: [], perInstance: [] });
    row.wall.push(count === 1 ? wall : wall / count);
    row.perInstance.push(median(made.map((c) => c.cloneMs)));
  }
  for (const c of made) quiet('rm', '-f', c.aid);
}

function cleanUp() {
  spawnSync(process.execPath, [cli, 'engine', 'stop'], { env: off, stdio: 'ignore' });
  spawnSync(process.execPath, [cli, 'rm', '-f', 'src'], { env: off, stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  rmSync(home, { recursive: true, force: true });
}
process.on('SIGINT', () => {
  cleanUp();
  process.exit(130);
});

try {
  quiet('run', '-d', '--aid', 'src', '--', memapp, String(MIB));
  const log = join(home, 'apps', 'src', 'log');
  for (let i = 0; i < 200 && !/READY/.test((() => { try { return readFileSync(log, 'utf8'); } catch { return ''; } })()); i++) spawnSync('sleep', ['0.05']);
  quiet('snapshot', 'src', '-o', 'src.appshot');
  quiet('template', 'create', 'src.appshot', '-o', 'tpl.template');
  quiet('engine', 'start');
  for (let i = -1; i < runs; i++) {
    const order = i % 2 ? ['in-process', 'engine'] : ['engine', 'in-process'];
    for (const m of order) clone(m, 1, i >= 0);
    for (const batch of BATCHES) for (const m of order) clone(m, batch, i >= 0);
  }
  const rows = [];
  for (const [what, byMode] of Object.entries(results))
    for (const [mode, r] of Object.entries(byMode)) rows.push({ what, mode, wallMs: +median(r.wall).toFixed(1), cloneMsPerInstance: +median(r.perInstance).toFixed(2) });
  if (process.argv.includes('--json')) console.log(JSON.stringify({ mib: MIB, runs, load: readFileSync('/proc/loadavg', 'utf8').trim(), rows }, null, 2));
  else {
    console.log(`clone of a ${MIB} MiB memapp template, medians of ${runs} (batch: wall per instance); load ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}`);
    console.log('| | mode | wall ms | cloneMs per instance |\n|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.what} | ${r.mode} | ${r.wallMs} | ${r.cloneMsPerInstance} |`);
  }
} finally {
  cleanUp();
}
