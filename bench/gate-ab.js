#!/usr/bin/env node
/**
 * The freeze gate (addon/preload/preload.h, "Freeze gate"), paired A/B:
 * snapshots (--leave-running --full) of an application that forks and
 * reaps without a pause (test/fixtures/forkstorm), taken by two builds of
 * appshot alternately in the same run; per build, how many were taken and
 * the median wall time of a snapshot (refusals included).
 *
 *   node bench/gate-ab.js A_ROOT B_ROOT [rounds=3] [snapshots=5] [timeout=5]
 *
 * A_ROOT and B_ROOT are checkouts with their build (bin/appshot.js, build/,
 * dist/); the fixture is B's. Prints one JSON object.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';

const [a, b, rounds = '3', snapshots = '5', timeout = '5'] = process.argv.slice(2);
if (!a || !b) {
  console.error('usage: node bench/gate-ab.js A_ROOT B_ROOT [rounds] [snapshots] [timeout-s]');
  process.exit(2);
}
const storm = join(b, 'test', 'fixtures', 'bin', 'forkstorm');
// Both builds whole before anything starts: a half-built one could start
// the storm and not stop it.
for (const f of [join(a, 'build', 'Release', 'appshot.node'), join(b, 'build', 'Release', 'appshot.node'), storm])
  if (!existsSync(f)) {
    console.error(`missing: ${f}`);
    process.exit(2);
  }
const median = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

function session(root) {
  const home = mkdtempSync(join(tmpdir(), 'appshot-gate-ab-'));
  const env = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' };
  const cli = (args) => spawnSync(process.execPath, [join(root, 'bin', 'appshot.js'), ...args], { env, encoding: 'utf8', timeout: 120_000 });
  const out = { taken: 0, ms: [] };
  try {
    const r = cli(['run', '-d', '--aid', 'storm', '--', storm, '16']);
    if (r.status !== 0) throw new Error(`run: ${r.stderr}`);
    const log = () => readFileSync(join(home, 'apps', 'storm', 'log'), 'utf8');
    for (let until = Date.now() + 10_000; !/^CHECK 3$/m.test(log()); sleep(50)) if (Date.now() > until) throw new Error('storm did not start');
    for (let i = 0; i < Number(snapshots); i++) {
      const t0 = process.hrtime.bigint();
      const s = cli(['snapshot', 'storm', '--leave-running', '--full', '--timeout', timeout, '-o', join(home, `s${i}`)]);
      out.ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
      if (s.status === 0) out.taken++;
      rmSync(join(home, `s${i}`), { recursive: true, force: true });
    }
    if (/^FAIL/m.test(log())) throw new Error(`storm failed: ${log()}`);
  } finally {
    cli(['stop', 'storm', '--signal', 'KILL']);
    sleep(500);
    rmSync(home, { recursive: true, force: true });
  }
  return out;
}

const results = { A: { taken: 0, tried: 0, ms: [] }, B: { taken: 0, tried: 0, ms: [] } };
const load = [loadavg()[0]];
for (let round = 0; round < Number(rounds); round++)
  for (const [name, root] of round % 2 ? [['B', b], ['A', a]] : [['A', a], ['B', b]]) {
    const r = session(root);
    results[name].taken += r.taken;
    results[name].tried += r.ms.length;
    results[name].ms.push(...r.ms);
  }
load.push(loadavg()[0]);
const summary = (r) => ({ taken: `${r.taken}/${r.tried}`, medianMs: Math.round(median(r.ms)), maxMs: Math.round(Math.max(...r.ms)) });
console.log(JSON.stringify({ A: a, B: b, a: summary(results.A), b: summary(results.B), load1: load.map((l) => l.toFixed(1)) }));
