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
// "threads' own state"), the main thread's batch (to "main thread's
// batch": the attributes), the credentials' step (to "limits and
// credentials", where the parent-death signals are set) and
// the round trips, medians of BENCH_RUNS each. BENCH_BASE=DIR (a checkout
// built at another commit) adds its restore, at once, as a third mode
// alternated with the others: a change measured against its base in the
// same run.
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

const appshot = (args, extra = {}, via = cli) => timed(process.execPath, [via, ...args], { env: { ...env, ...extra } });
const baseCli = process.env.BENCH_BASE ? join(process.env.BENCH_BASE, 'bin', 'appshot.js') : undefined;

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
 * APPSHOT_DEBUG phases: the threads' step and the credentials'. */
function restoreTimed(image, aid, extra, via) {
  const r = appshot(['restore', image, '--aid', aid, '--json'], { APPSHOT_DEBUG: '1', ...extra }, via);
  const at = (what) => Number(new RegExp(`^([\\d.]+) ms, \\d+ calls injected: ${what}$`, 'm').exec(r.err)?.[1]);
  return { json: JSON.parse(r.out), threadsMs: at("threads' own state") - at('threads made'), mainMs: at("main thread's batch") - at("threads' own state"), credsMs: at('limits and credentials') - at("main thread's batch") };
}

async function threadsAtOnce() {
  const counts = (process.env.BENCH_THREADS ?? '16,64,200').split(',').map(Number);
  for (const n of counts) {
    const image = join(home, `crowd-${n}.appshot`);
    appshot(['run', '-d', '--aid', 'crowd', '--', join(root, 'test', 'fixtures', 'bin', 'threadcrowd'), String(n)]);
    await sleep(500 + 5 * n);
    appshot(['snapshot', 'crowd', '-o', image]);
    appshot(['rm', '-f', 'crowd']);
    const modes = ['atOnce', 'oneByOne', ...(baseCli ? ['base'] : [])];
    const series = Object.fromEntries(modes.map((m) => [m, { ms: [], threadsMs: [], mainMs: [], credsMs: [], calls: [] }]));
    for (let i = 0; i < runs; i++) {
      // Each mode first in turn.
      const order = modes.map((_, k) => modes[(i + k) % modes.length]);
      for (const mode of order) {
        const r = restoreTimed(image, `crowd-${mode}`, mode === 'oneByOne' ? { APPSHOT_THREADS_AT_ONCE: '0' } : {}, mode === 'base' ? baseCli : cli);
        series[mode].ms.push(r.json.restoreMs);
        series[mode].threadsMs.push(r.threadsMs);
        series[mode].mainMs.push(r.mainMs);
        series[mode].credsMs.push(r.credsMs);
        series[mode].calls.push(r.json.injectedCalls);
        appshot(['rm', '-f', `crowd-${mode}`]);
      }
    }
    rmSync(image, { recursive: true, force: true });
    const sum = (s) => ({ restoreMs: summary(s.ms), threadsMs: summary(s.threadsMs), mainMs: summary(s.mainMs), credsMs: summary(s.credsMs), roundTrips: summary(s.calls) });
    const ratio = (a, b, key = 'ms') => +(summary(series[a][key]).median / summary(series[b][key]).median).toFixed(2);
    const r = (results[`${n} threads`] = {
      ...Object.fromEntries(modes.map((m) => [m, sum(series[m])])),
      ratio: ratio('atOnce', 'oneByOne'),
      threadsRatio: ratio('atOnce', 'oneByOne', 'threadsMs'),
      ...(baseCli ? { base: { ...sum(series.base), dir: process.env.BENCH_BASE }, ratioToBase: ratio('atOnce', 'base') } : {}),
    });
    const line = (m) => `${r[m].restoreMs.median} ms (threads' state ${r[m].threadsMs.median} ms, main batch ${r[m].mainMs.median} ms, credentials ${r[m].credsMs.median} ms, ${r[m].roundTrips.median} round trips)`;
    console.log(
      `${n} threads: restore ${line('atOnce')} at once, ${line('oneByOne')} one by one (ratio ${r.ratio}, threads' state ${r.threadsRatio})` +
        (baseCli ? `; base at once ${line('base')} (ratio to base ${r.ratioToBase})` : ''),
    );
  }
}
const out = join(root, 'bench', 'results', `batch-${part === 'all' ? '' : `${part}-`}${new Date().toISOString().slice(0, 10)}.json`);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), runs, loadavg: loadavg(), results }, null, 2) + '\n');
console.log(`written to ${out}`);
