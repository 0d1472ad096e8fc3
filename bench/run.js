// npm run bench: the cost appshot's preload library adds to each
// id-carrying call, against the same calls without appshot, measured in the
// same run and interleaved so that machine noise hits both alike. Reports
// the median of several runs.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const micro = join(root, 'bench', 'bin', 'micro');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-'));
const env = { ...process.env, APPSHOT_HOME: home };


const native = [];
const under = [];
try {
  for (let i = 0; i < runs; i++) {
    native.push(JSON.parse(execFileSync(micro, { encoding: 'utf8' })));
    under.push(JSON.parse(execFileSync(process.execPath, [cli, 'run', '--', micro], { encoding: 'utf8', env })));
  }
} finally {
  rmSync(home, { recursive: true, force: true });
}

const rows = Object.keys(native[0]).map((op) => {
  const a = median(native.map((r) => r[op]));
  const b = median(under.map((r) => r[op]));
  return { op, native_ns: +a.toFixed(1), appshot_ns: +b.toFixed(1), added_ns: +(b - a).toFixed(1), ratio: +(b / a).toFixed(3) };
});
if (process.argv.includes('--json')) console.log(JSON.stringify({ runs, rows }, null, 2));
else {
  console.log(`preload overhead, median of ${runs} interleaved runs (ns per call)`);
  console.table(rows);
}
