// npm run bench: what batched injection saves a restore. The same image
// restored with the calls injected in batches (the default) and one at a
// time (APPSHOT_NO_BATCH=1), interleaved so that machine noise hits both
// alike: the restore's own time (restoreMs) and its round trips
// (injectedCalls), medians of BENCH_RUNS (7) each, for the tiny app and
// 16 MiB. Written to bench/results/batch-DATE.json.
//
// Then what setting the threads' own state in all threads at once saves
// (RemoteProcess.runAtOnce): the image of a process of N threads
// (threadcrowd; BENCH_THREADS, "16,64,200") restored again and again, at
// once (the default) and one thread after the other
// (APPSHOT_THREADS_AT_ONCE=0), alternating which goes first: restoreMs,
// the threads' step alone (APPSHOT_DEBUG's phases "threads made" to
// "threads' own state") and the round trips, medians of BENCH_RUNS each.
// `node bench/batch.js threads` runs only this part, `calls` only the first.
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

const part = process.argv[2] ?? 'all';
const results = {};
try {
  for (const [name, argv] of part === 'threads' ? [] : Object.entries(apps)) {
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
  if (part !== 'calls') await threadsAtOnce();
} finally {
  rmSync(home, { recursive: true, force: true });
}

/** The restore's --json and the milliseconds between two of its
 * APPSHOT_DEBUG phases. */
function restoreTimed(image, aid, extra) {
  const r = appshot(['restore', image, '--aid', aid, '--json'], { APPSHOT_DEBUG: '1', ...extra });
  const at = (what) => Number(new RegExp(`^([\\d.]+) ms, \\d+ calls injected: ${what}$`, 'm').exec(r.err)?.[1]);
  return { json: JSON.parse(r.out), threadsMs: at("threads' own state") - at('threads made') };
}

async function threadsAtOnce() {
  const counts = (process.env.BENCH_THREADS ?? '16,64,200').split(',').map(Number);
  for (const n of counts) {
    const image = join(home, `crowd-${n}.appshot`);
    appshot(['run', '-d', '--aid', 'crowd', '--', join(root, 'test', 'fixtures', 'bin', 'threadcrowd'), String(n)]);
    await sleep(500 + 5 * n);
    appshot(['snapshot', 'crowd', '-o', image]);
    appshot(['rm', '-f', 'crowd']);
    const series = { atOnce: { ms: [], threadsMs: [], calls: [] }, oneByOne: { ms: [], threadsMs: [], calls: [] } };
    for (let i = 0; i < runs; i++) {
      const order = i % 2 ? ['oneByOne', 'atOnce'] : ['atOnce', 'oneByOne'];
      for (const mode of order) {
        const r = restoreTimed(image, `crowd-${mode}`, mode === 'oneByOne' ? { APPSHOT_THREADS_AT_ONCE: '0' } : {});
        series[mode].ms.push(r.json.restoreMs);
        series[mode].threadsMs.push(r.threadsMs);
        series[mode].calls.push(r.json.injectedCalls);
        appshot(['rm', '-f', `crowd-${mode}`]);
      }
    }
    rmSync(image, { recursive: true, force: true });
    const sum = (s) => ({ restoreMs: summary(s.ms), threadsMs: summary(s.threadsMs), roundTrips: summary(s.calls) });
    const r = (results[`${n} threads`] = {
      atOnce: sum(series.atOnce),
      oneByOne: sum(series.oneByOne),
      ratio: +(summary(series.atOnce.ms).median / summary(series.oneByOne.ms).median).toFixed(2),
      threadsRatio: +(summary(series.atOnce.threadsMs).median / summary(series.oneByOne.threadsMs).median).toFixed(2),
    });
    console.log(
      `${n} threads: restore ${r.atOnce.restoreMs.median} ms (threads' state ${r.atOnce.threadsMs.median} ms, ${r.atOnce.roundTrips.median} round trips) at once, ` +
        `${r.oneByOne.restoreMs.median} ms (${r.oneByOne.threadsMs.median} ms, ${r.oneByOne.roundTrips.median}) one by one (ratio ${r.ratio}, threads' state ${r.threadsRatio})`,
    );
  }
}
const out = join(root, 'bench', 'results', `batch-${part === 'all' ? '' : `${part}-`}${new Date().toISOString().slice(0, 10)}.json`);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), runs, loadavg: loadavg(), results }, null, 2) + '\n');
console.log(`written to ${out}`);
