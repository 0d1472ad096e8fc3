// The cost the preload library's mutex wrappers (preload_mutex.c) add to an
// uncontended pthread_mutex_lock+unlock pair: natively, under `appshot run`
// (the hot path: one load, nothing to mend), and under it in a process
// whose TID moves are set as a restore that changed the TIDs leaves them
// (the slow path's look at each mutex; "full": all 256 moves the library
// holds, the most a look scans). Runs interleaved in one session,
// medians of several.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bench = join(root, 'bench', 'bin', 'mutex');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-'));
const env = { ...process.env, APPSHOT_HOME: home };


const native = [];
const under = [];
const moved = [];
const full = [];
// Where glibc keeps a thread's TID, found natively (the restore writes it).
const tidOffset = execFileSync(bench, ['tid-offset'], { encoding: 'utf8' }).trim();
try {
  for (let i = 0; i < runs; i++) {
    native.push(JSON.parse(execFileSync(bench, { encoding: 'utf8' })));
    under.push(JSON.parse(execFileSync(process.execPath, [cli, 'run', '--', bench], { encoding: 'utf8', env })));
    moved.push(JSON.parse(execFileSync(process.execPath, [cli, 'run', '--', bench, 'moved', tidOffset], { encoding: 'utf8', env })));
    full.push(JSON.parse(execFileSync(process.execPath, [cli, 'run', '--', bench, 'full', tidOffset], { encoding: 'utf8', env })));
  }
} finally {
  rmSync(home, { recursive: true, force: true });
}

const rows = Object.keys(native[0]).map((kind) => {
  const a = median(native.map((r) => r[kind]));
  const b = median(under.map((r) => r[kind]));
  const c = median(moved.map((r) => r[kind]));
  const d = median(full.map((r) => r[kind]));
  return { mutex: kind, native_ns: +a.toFixed(2), appshot_ns: +b.toFixed(2), added_ns: +(b - a).toFixed(2), restored_ns: +c.toFixed(2), restored_added_ns: +(c - a).toFixed(2), full_table_ns: +d.toFixed(2), full_table_added_ns: +(d - a).toFixed(2) };
});
if (process.argv.includes('--json')) console.log(JSON.stringify({ runs, rows }, null, 2));
else {
  console.log(`lock+unlock pair, median of ${runs} interleaved runs (ns per pair)`);
  console.table(rows);
}
