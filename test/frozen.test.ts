/**
 * The frozen window and where a snapshot's time goes (src/snapshot/
 * phases.ts). A default snapshot keeps the application stopped after its
 * state is read, until the image is on disk, and only then ends it (a
 * snapshot killed as it commits leaves the application running:
 * atomic.test.ts).
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { cli, fixture, processState, Sandbox, stoppedAt, waitFor } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-frozen-'));
type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const logOf = (aid: string) => {
  try {
    return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const checks = (aid: string) => (logOf(aid).match(/^CHECK \d+$/gm) ?? []).length;

async function start(aid: string, mib: number): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', String(mib)]);
  expect(r.code, r.stderr).toBe(0);
  await waitFor(() => checks(aid) >= 2, 10_000, `${aid} to check itself`);
}

async function goesOn(aid: string): Promise<void> {
  const from = checks(aid);
  await waitFor(() => checks(aid) >= from + 3 || /FAIL/.test(logOf(aid)), 15_000, `${aid} to go on`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
}

const PHASES = ['freezeMs', 'dumpMs', 'trackMs', 'resumeMs', 'copyMs', 'drainMs', 'fsyncMs', 'hashMs', 'checksumMs', 'commitMs', 'endMs', 'heldMs'];

describe('snapshot phases', () => {
  it('--leave-running: held exactly as long as frozen, the commit after', async () => {
    await start('lr', 8);
    const r = sb.json<Json>(['snapshot', 'lr', '-o', join(dir, 'lr'), '--leave-running']);
    expect(Object.keys(r.phases).sort()).toEqual([...PHASES].sort());
    expect(r.frozenMs).toBeGreaterThan(0);
    expect(r.phases.heldMs).toBeCloseTo(r.frozenMs, 1);
    expect(r.phases.commitMs).toBeGreaterThan(0);
    expect(r.phases.endMs).toBe(0);
    await goesOn('lr');
  });

  it('default: frozen while its state is read, held until the image is on disk, then ended', async () => {
    await start('def', 8);
    const r = sb.json<Json>(['snapshot', 'def', '-o', join(dir, 'def')]);
    expect(r.leftRunning).toBe(false);
    const p = r.phases;
    expect(r.frozenMs).toBeGreaterThan(0);
    expect(p.resumeMs).toBe(0);
    // Held through the page file's fsync, the checksums and the commit.
    expect(p.heldMs).toBeGreaterThan(r.frozenMs);
    expect(p.heldMs + 0.05).toBeGreaterThanOrEqual(r.frozenMs + p.drainMs + p.hashMs + p.checksumMs + p.commitMs);
    // A directory image's page file fsync runs beside the digests, the
    // checksums and the commit, which waits for it before its rename:
    // within the held time after the state was read, not after it.
    expect(p.fsyncMs).toBeGreaterThan(0);
    expect(p.fsyncMs).toBeLessThanOrEqual(p.heldMs - r.frozenMs);
    expect(readdirSync(join(dir, 'def')).sort()).toEqual(['image.pb', 'manifest.pb', 'pages.img']);
    // The image restores (and its application runs).
    const back = sb.run(['restore', join(dir, 'def'), '--aid', 'def']);
    expect(back.code, back.stderr).toBe(0);
    await goesOn('def');
  });

  // CRIU's "Frozen time" of a dump that ends the application runs until
  // its tasks are killed and waited for (cr-dump.c cr_dump_finish): the
  // held time spans the same, the kill included. appshot stopped just
  // before the kill, for a while: that while is held time, not frozen.
  it('default: held until the application is killed and gone, its stop before the kill included', async () => {
    await start('held', 1);
    const app = sb.systemPid('held');
    const snap = await stoppedAt(sb, ['snapshot', 'held', '-o', join(dir, 'held'), '--json'], 'snapshot: killing', 'the snapshot to stop before the kill');
    // Its image is in place and the application still there, stopped.
    expect(readdirSync(join(dir, 'held')).sort()).toEqual(['image.pb', 'manifest.pb', 'pages.img']);
    expect(processState(app)).toBe('t');
    const stopMs = 1000;
    await new Promise((r) => setTimeout(r, stopMs));
    const r = await snap.go();
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as Json;
    expect(out.phases.heldMs).toBeGreaterThanOrEqual(stopMs);
    expect(out.frozenMs).toBeLessThan(out.phases.heldMs - stopMs + 0.05);
    await waitFor(() => processState(app) === '', 10_000, 'the application to be gone');
  });
});

/** A snapshot as `sb.json` takes it, with APPSHOT_NO_BATCH=1 (the engine
 * takes a command's APPSHOT_ variables as its own for it). */
function snapshotOneCallEach(args: string[]): Json {
  const r = spawnSync(process.execPath, [cli, 'snapshot', ...args, '--json'], { env: { ...sb.env, APPSHOT_NO_BATCH: '1' }, encoding: 'utf8', timeout: 50_000 });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('calls injected into the frozen application', () => {
  // attrs: two threads, each with questions of its own (TID address,
  // alternate stack, securebits, parent-death signal), a handler, a
  // child subreaper, THP disabled; its own checks say whether a restore
  // brought them all back.
  async function startAttrs(aid: string): Promise<void> {
    const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('attrs')]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => checks(aid) >= 2, 10_000, `${aid} to check itself`);
  }

  it("are answered in one stop per thread, from one scratch mapping, dirty tracking armed in the main thread's", async () => {
    await startAttrs('qa');
    const batched = sb.json<Json>(['snapshot', 'qa', '-o', join(dir, 'qa-batched'), '--leave-running']);
    expect(batched.threads).toBe(2);
    // Mapping the scratch area (none where the preload library's serves),
    // one batch per thread (the main thread's arms dirty tracking too),
    // unmapping it.
    expect(batched.injectedCalls).toBeLessThanOrEqual(1 + batched.threads + 1);
    await goesOn('qa');
    // One call per question: every thread's (4 each), the process's (at
    // least 8) and tracking's (at least 4), each a round trip of its own.
    const single = snapshotOneCallEach(['qa', '-o', join(dir, 'qa-single'), '--leave-running', '--full']);
    expect(single.injectedCalls).toBeGreaterThanOrEqual(4 * single.threads + 8);
    await goesOn('qa');
  });

  // batcharea: the preload library's copy of the batch code and its area
  // for the tables, which a snapshot runs its questions from (no mapping
  // of its own), as the application left them, or tampered with.
  async function startBatchArea(aid: string, mode: string): Promise<void> {
    const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('batcharea'), mode]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => checks(aid) >= 2 || /FAIL|NO LIBRARY/.test(logOf(aid)), 10_000, `${aid} to check itself`);
    expect(logOf(aid)).toMatch(/^READY$/m);
  }

  it("are run from the preload library's copy of the batch code and its area", async () => {
    await startBatchArea('ba-plain', 'plain');
    expect(sb.run(['snapshot', 'ba-plain', '-o', join(dir, 'ba-plain'), '--leave-running']).code).toBe(0);
    const main = sb.json<Json>(['ps', 'ba-plain'])[0].processes.find((p: Json) => !p.init);
    process.kill(main.pid, 'SIGHUP');
    await waitFor(() => /^AREA (UN)?USED$/m.test(logOf('ba-plain')), 10_000, 'ba-plain to say whether its area was used');
    expect(logOf('ba-plain')).toMatch(/^AREA USED$/m);
    await goesOn('ba-plain');
  });

  it('are not run from an area the application made shared (a process outside it could write it meanwhile)', async () => {
    await startBatchArea('ba-shared', 'shared');
    const r = sb.run(['snapshot', 'ba-shared', '-o', join(dir, 'ba-shared'), '--leave-running']);
    expect(r.code, r.stderr).toBe(0);
    // Its check: nothing was written into the shared area.
    await goesOn('ba-shared');
  });

  it("take the area's size from each process: one that changed its own is not believed for the next", async () => {
    // An engine of its own: the first snapshot of the library in it is the
    // one that would have been believed.
    const own = new Sandbox();
    try {
      const started = (aid: string, mode: string) => {
        const r = own.run(['run', '-d', '--aid', aid, '--', fixture('batcharea'), mode]);
        expect(r.code, r.stderr).toBe(0);
      };
      const log = (aid: string) => readFileSync(join(own.home, 'apps', aid, 'log'), 'utf8');
      const engine = own.run(['engine', 'start']);
      expect(engine.code, engine.stderr).toBe(0);
      started('liar', 'bigsize');
      await waitFor(() => /^CHECK 2$/m.test(log('liar')), 10_000, 'liar to check itself');
      expect(own.run(['snapshot', 'liar', '-o', join(dir, 'liar'), '--leave-running']).code).toBe(0);
      started('honest', 'plain');
      await waitFor(() => /^CHECK 2$/m.test(log('honest')), 10_000, 'honest to check itself');
      expect(own.run(['snapshot', 'honest', '-o', join(dir, 'honest'), '--leave-running']).code).toBe(0);
      const main = own.json<Json>(['ps', 'honest'])[0].processes.find((p: Json) => !p.init);
      process.kill(main.pid, 'SIGHUP');
      await waitFor(() => /^AREA (UN)?USED$/m.test(log('honest')), 10_000, 'honest to say whether its area was used');
      expect(log('honest')).toMatch(/^AREA USED$/m);
    } finally {
      await own.dispose();
    }
  });

  it('are not run from a copy of the code the application changed', async () => {
    await startBatchArea('ba-patched', 'patched');
    const r = sb.run(['snapshot', 'ba-patched', '-o', join(dir, 'ba-patched'), '--leave-running']);
    expect(r.code, r.stderr).toBe(0);
    await goesOn('ba-patched');
  });

  it('one call per question (APPSHOT_NO_BATCH=1) makes an image that restores as well', async () => {
    await startAttrs('qs');
    const r = snapshotOneCallEach(['qs', '-o', join(dir, 'qs')]);
    expect(r.leftRunning).toBe(false);
    const back = sb.run(['restore', join(dir, 'qs'), '--aid', 'qs']);
    expect(back.code, back.stderr).toBe(0);
    await goesOn('qs');
  });
});
