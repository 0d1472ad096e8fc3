// npm run bench: what batched injection saves a restore. The same image
// restored with the calls injected in batches (the default) and one at a
// time (APPSHOT_NO_BATCH=1), interleaved so that machine noise hits both
// alike: the restore's own time (restoreMs) and its round trips
// (injectedCalls), medians of BENCH_RUNS (7) each, for the tiny app and
// 16 MiB. Written to bench/results/batch-DATE.json.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sleep, summary, timed } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 7);
const home = mkdtempSync(join(tmpdir(), 'appshot-batch-'));
// In this process, not a warm engine: both modes pay the same start.
const env = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off', CI: '' };
const apps = {
  tiny: [join(root, 'test', 'fixtures', 'bin', 'ticker')],
  '16 MiB': [join(root, 'bench', 'bin', 'memapp'), '16'],
};

const appshot = (args, extra = {}) => timed(process.execPath, [cli, ...args], { env: { ...env, ...extra } });

const results = {};
try {
  for (const [name, argv] of Object.entries(apps)) {
    const series = { batched: { ms: [], calls: [] }, single: { ms: [], calls: [] } };
    for (let i = 0; i < runs; i++)
      for (const mode of ['batched', 'single']) {
        const image = join(home, `${mode}.appshot`);
        appshot(['run', '-d', '--aid', 'b', '--', ...argv]);
        await sleep(300);
        appshot(['snapshot', 'b', '-o', image]);
        const r = JSON.parse(appshot(['restore', image, '--json'], mode === 'single' ? { APPSHOT_NO_BATCH: '1' } : {}).out);
        series[mode].ms.push(r.restoreMs);
        series[mode].calls.push(r.injectedCalls);
        appshot(['rm', '-f', 'b']);
        rmSync(image, { recursive: true, force: true });
      }
    results[name] = {
      batched: { restoreMs: summary(series.batched.ms), roundTrips: summary(series.batched.calls) },
      single: { restoreMs: summary(series.single.ms), roundTrips: summary(series.single.calls) },
      ratio: +(summary(series.batched.ms).median / summary(series.single.ms).median).toFixed(2),
    };
    const r = results[name];
    console.log(
      `${name}: restore ${r.batched.restoreMs.median} ms in ${r.batched.roundTrips.median} round trips batched, ` +
        `${r.single.restoreMs.median} ms in ${r.single.roundTrips.median} one call at a time (ratio ${r.ratio})`,
    );
  }
} finally {
  rmSync(home, { recursive: true, force: true });
}
const out = join(root, 'bench', 'results', `batch-${new Date().toISOString().slice(0, 10)}.json`);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), runs, loadavg: loadavg(), results }, null, 2) + '\n');
console.log(`written to ${out}`);
