/**
 * Copy-on-write capture (snapshot --leave-running, src/snapshot/cowcapture.ts):
 * each process forked while frozen, its private memory read from that copy
 * once the application goes on. The fixture (cowcapture.c) writes its
 * buffer pass after pass and checks that memory and its own place in the
 * pass are of one instant, that its MAP_SHARED, MADV_WIPEONFORK and
 * MADV_DONTFORK regions are as it left them, and that it never gets a
 * SIGCHLD nor finds a child with waitpid(-1, __WALL): the copy is no one's
 * in the application.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { cli, fixture, processState, Sandbox, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());
// Each test's applications are stopped as it ends: the fixture writes its
// buffer pass after pass (most of a core each, on a quiet machine), and
// left running to the file's end, a dozen of them (originals and restored
// copies) took the CPU of the tests after theirs. Nothing looks at them
// after their test.
afterEach(async () => {
  const aids = sb.aids();
  if (aids.length) await sb.runAsync(['stop', ...aids, '--signal', 'KILL']);
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

/** Every child of `pid` (all its threads'), as the kernel lists them. */
function childrenOf(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).flatMap((t) =>
    readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8')
      .split(/\s+/)
      .filter(Boolean)
      .map(Number),
  );
}

const initOf = (aid: string) => sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid])[0].processes.find((p) => p.init)!.pid;

describe('copy-on-write capture', () => {
  const out = scratchDir('appshot-cow-');

  it('captures memory being written at one instant, special regions as they were, unseen by the application', async () => {
    const aid = 'cow';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '64']);
    await sb.checksPass(aid);
    const whole = sb.json<Json>(['snapshot', aid, '-o', join(out, 'whole'), '--leave-running']);
    // Read from a copy, not frozen (the copy is forked: ps shows none left).
    expect(whole.cowCapture).toEqual({ copied: 1, frozen: [] });
    expect(childrenOf(initOf(aid))).toEqual([sb.systemPid(aid)]);
    // The original goes on: no SIGCHLD, no child found, its memory intact.
    await sb.checksPass(aid);
    sb.ok(['restore', join(out, 'whole'), '--aid', 'cow-whole']);
    await sb.checksPass('cow-whole');
    // Incremental on it: the pages written since, known from the record
    // armed at the freeze, read from the next copy.
    const incr = sb.json<Json>(['snapshot', aid, '-o', join(out, 'incr'), '--leave-running']);
    expect(incr.cowCapture).toEqual({ copied: 1, frozen: [] });
    expect(incr.pagesFromParent).toBeGreaterThan(0);
    sb.ok(['restore', join(out, 'incr'), '--aid', 'cow-incr']);
    await sb.checksPass('cow-incr');
    await sb.checksPass(aid);
  });

  it('reads a lazily restored application from its copy too, its page file mapping included', async () => {
    const aid = 'cowlazy';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '16']);
    await sb.checksPass(aid);
    sb.ok(['snapshot', aid, '-o', join(out, 'lazy-src')]);
    sb.ok(['restore', join(out, 'lazy-src'), '--aid', aid, '--lazy']);
    await sb.checksPass(aid);
    const r = sb.json<Json>(['snapshot', aid, '-o', join(out, 'lazy-lr'), '--leave-running']);
    expect(r.cowCapture).toEqual({ copied: 1, frozen: [] });
    sb.ok(['restore', join(out, 'lazy-lr'), '--aid', 'cowlazy-r']);
    await sb.checksPass('cowlazy-r');
    await sb.checksPass(aid);
  });

  it('lets the application run while the copy waits, and leaves no copy when appshot is killed then, or fails', async () => {
    const aid = 'cowkill';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '16']);
    await sb.checksPass(aid);
    const app = sb.systemPid(aid);
    const init = initOf(aid);
    const dest = join(out, 'killed');
    const snap = spawn(process.execPath, [cli, 'snapshot', aid, '-o', dest, '--leave-running'], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: 'snapshot: reading the copies' },
      stdio: 'ignore',
    });
    await waitFor(() => processState(snap.pid!) === 'T' || snap.exitCode !== null, 50_000, 'the snapshot to stop before reading the copies');
    expect(snap.exitCode).toBeNull();
    // The copy: init's child, stopped under trace; the application runs
    // on meanwhile, finding no child and getting no SIGCHLD.
    const copy = childrenOf(init).filter((p) => p !== app);
    expect(copy).toHaveLength(1);
    expect(processState(copy[0])).toBe('t');
    await sb.checksPass(aid);
    snap.kill('SIGKILL');
    await new Promise((r) => snap.on('close', r));
    // It dies with appshot, and init reaps it.
    await waitFor(() => processState(copy[0]) === '', 10_000, 'the copy to die with appshot');
    expect(childrenOf(init)).toEqual([app]);
    expect(existsSync(dest)).toBe(false);
    await sb.checksPass(aid);
    // A failure while the copies are read: no image, no copy, the
    // application left running.
    const failed = spawn(process.execPath, [cli, 'snapshot', aid, '-o', join(out, 'failed'), '--leave-running'], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: reading the copies' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    failed.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise((r) => failed.on('close', r));
    expect(code).not.toBe(0);
    expect(stderr).toMatch(/left running/);
    expect(existsSync(join(out, 'failed'))).toBe(false);
    expect(childrenOf(init)).toEqual([app]);
    await sb.checksPass(aid);
  });

  it('reads memory frozen, saying why, in a process with a seccomp filter', async () => {
    const aid = 'cowseccomp';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('seccompwrap'), fixture('cowcapture'), '16']);
    await sb.checksPass(aid);
    const r = sb.json<Json>(['snapshot', aid, '-o', join(out, 'seccomp'), '--leave-running']);
    expect(r.cowCapture).toEqual({ copied: 0, frozen: [{ process: expect.stringContaining('cowcapture'), why: 'it has a seccomp filter' }] });
    await sb.checksPass(aid);
    sb.ok(['restore', join(out, 'seccomp'), '--aid', 'cowseccomp-r']);
    await sb.checksPass('cowseccomp-r');
  });

  it("reads memory frozen, saying why, where the fork is refused (the pids cgroup's limit)", async (ctx) => {
    // A pids cgroup of its own (v1's controller, or v2's where it is on),
    // with no room for one more task.
    const v1 = '/sys/fs/cgroup/pids';
    const v2 = '/sys/fs/cgroup';
    const root = existsSync(`${v1}/cgroup.procs`) ? v1 : existsSync(`${v2}/cgroup.controllers`) && /\bpids\b/.test(readFileSync(`${v2}/cgroup.subtree_control`, 'utf8')) ? v2 : undefined;
    const group = root && join(root, `appshot-cow-${process.pid}`);
    try {
      if (group) mkdirSync(group);
    } catch {
      /* not ours to make */
    }
    if (!group || !existsSync(`${group}/pids.max`)) return ctx.skip();
    const aid = 'cowpids';
    try {
      sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '16']);
      await sb.checksPass(aid);
      writeFileSync(`${group}/cgroup.procs`, String(sb.systemPid(aid)));
      writeFileSync(`${group}/pids.max`, readFileSync(`${group}/pids.current`, 'utf8').trim());
      const r = sb.json<Json>(['snapshot', aid, '-o', join(out, 'pids'), '--leave-running']);
      expect(r.cowCapture.copied).toBe(0);
      expect(r.cowCapture.frozen).toEqual([{ process: expect.stringContaining('cowcapture'), why: 'its fork failed (EAGAIN)' }]);
      await sb.checksPass(aid);
      writeFileSync(`${group}/pids.max`, 'max');
      sb.ok(['restore', join(out, 'pids'), '--aid', 'cowpids-r']);
      await sb.checksPass('cowpids-r');
    } finally {
      sb.run(['rm', '-f', aid]);
      await waitFor(() => readFileSync(`${group}/cgroup.procs`, 'utf8').trim() === '', 10_000, 'the cgroup to empty');
      rmdirSync(group);
    }
  });

  it('reads memory frozen when told not to, or where it is small, and says why', async () => {
    const aid = 'cowoff';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '8']);
    await sb.checksPass(aid);
    const off = sb.json<Json>(['snapshot', aid, '-o', join(out, 'off'), '--leave-running', '--no-cow-capture']);
    expect(off.cowCapture).toBeUndefined();
    sb.ok(['restore', join(out, 'off'), '--aid', 'cowoff-r']);
    await sb.checksPass('cowoff-r');
    const on = sb.json<Json>(['snapshot', aid, '-o', join(out, 'on'), '--leave-running']);
    expect(on.cowCapture).toEqual({ copied: 1, frozen: [] });
    sb.ok(['restore', join(out, 'on'), '--aid', 'cowoff-on']);
    await sb.checksPass('cowoff-on');
    await sb.checksPass(aid);
    // 256 KiB (the regions a fork does not copy count for nothing): below
    // the threshold, read frozen.
    sb.ok(['run', '-d', '--aid', 'cowsmall', '--', fixture('cowcapture'), '256k']);
    await sb.checksPass('cowsmall');
    const small = sb.json<Json>(['snapshot', 'cowsmall', '-o', join(out, 'small'), '--leave-running']);
    expect(small.cowCapture.copied).toBe(0);
    expect(small.cowCapture.frozen).toHaveLength(1);
    expect(small.cowCapture.frozen[0].why).toMatch(/below/);
    sb.ok(['restore', join(out, 'small'), '--aid', 'cowsmall-r']);
    await sb.checksPass('cowsmall-r');
  });
});
