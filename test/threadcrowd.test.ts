/**
 * A process of 70 threads restored: each thread's own kernel state (name,
 * alternate stack, signal mask, thread pointer, robust list, TID address,
 * rseq, glibc's cached TID, timer slack) is set in all its threads at
 * once, in rounds of 64 (RemoteProcess.runAtOnce: two rounds here), their
 * parent-death signals so too after the credentials, and each thread
 * checks its own (threadcrowd.c). A process that dies while its threads are set
 * at once fails the restore in one line, leaving nothing.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-threadcrowd-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

const WORKERS = 70;

/** The restore in this process (not the engine's: the switch
 * APPSHOT_THREADS_AT_ONCE is read by the process that restores). */
function restore(image: string, extra: Record<string, string> = {}): Json {
  const r = spawnSync(process.execPath, [cli, 'restore', image, '--json'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', ...extra }, encoding: 'utf8', timeout: 50_000 });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

function snapshot(aid: string, name: string): string {
  const image = join(out, name);
  const r = sb.run(['snapshot', aid, '-o', image]);
  expect(r.code, r.stderr).toBe(0);
  return image;
}

/** A process's state letter ('t': stopped by its tracer), '' once gone. */
function stateOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0];
  } catch {
    return '';
  }
}

/** The system PIDs of processes running `path` (their command line's first word). */
function running(path: string): number[] {
  return readdirSync('/proc')
    .filter((n) => /^\d+$/.test(n))
    .filter((n) => {
      try {
        return readFileSync(`/proc/${n}/cmdline`, 'utf8').split('\0')[0] === path;
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe(`a process of ${WORKERS} threads, each with state of its own`, () => {
  const aid = 'crowd';

  it('comes back with every thread its own, set in all threads at once: two rounds of stops, not one per thread', async () => {
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('threadcrowd'), String(WORKERS)]);
    await waitFor(() => /^READY threads=70$/m.test(sb.log(aid)) || /FAIL/.test(sb.log(aid)), 30_000, 'the crowd to start');
    await sb.checksPass(aid, 2);
    const atOnce = restore(snapshot(aid, 'at-once'));
    expect(atOnce).toMatchObject({ aid, processes: 1, threads: WORKERS + 1 });
    await sb.checksPass(aid, 3);
    // The same, one thread after the other: each of the 70 threads' own
    // stops is a round trip of its own, where at once they took two
    // (64 threads, then 6).
    const oneByOne = restore(snapshot(aid, 'one-by-one'), { APPSHOT_THREADS_AT_ONCE: '0' });
    await sb.checksPass(aid, 3);
    expect(oneByOne.injectedCalls - atOnce.injectedCalls).toBeGreaterThanOrEqual(WORKERS - 2 - 2);
    // Their timer slack and parent-death signals too (each a prctl the
    // thread runs itself): the slack in the same batches, the signals
    // after the credentials in rounds of their own. With a stop per
    // thread for each, the restore took more than two round trips per
    // thread.
    expect(atOnce.injectedCalls).toBeLessThan(WORKERS / 2);
    // Every thread named as it named itself (the fixture checks the rest).
    const pid = sb.systemPid(aid);
    const names = readdirSync(`/proc/${pid}/task`).map((t) => readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim());
    expect(names.filter((n) => n.startsWith('crowd-')).sort()).toEqual(Array.from({ length: WORKERS }, (_, i) => `crowd-${i + 1}`).sort());
  }, 120_000);

  /**
   * A restore of `image` as `as`, stopped (APPSHOT_TEST_STOP_AT) at `point`
   * of its rounds, whose process is killed there as the OOM killer would,
   * then continued: it fails in one line and leaves nothing.
   */
  async function diesAt(point: string, image: string, as: string): Promise<void> {
    const child = spawn(process.execPath, [cli, 'restore', image, '--aid', as], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: point } });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    await waitFor(() => stateOf(child.pid!) === 'T' || child.exitCode !== null, 60_000, `the restore to reach '${point}'`);
    expect(child.exitCode, stderr).toBeNull();
    // The process being restored (its memory in place: its command line
    // the fixture's), its main thread stopped by its tracer.
    const restored = running(fixture('threadcrowd')).filter((p) => stateOf(p) === 't');
    expect(restored.length).toBe(1);
    process.kill(restored[0], 'SIGKILL');
    child.kill('SIGCONT');
    expect(await exited).not.toBe(0);
    expect(stderr.trim().split('\n')).toEqual([expect.stringMatching(/^appshot: cannot restore .*: running a batch of system calls in thread \d+: the thread is gone; nothing was left behind$/)]);
    await waitFor(() => running(fixture('threadcrowd')).length === 0, 10_000, 'nothing of the restore to be left');
    expect(sb.run(['ps']).code).toBe(0);
    expect(sb.allAids()).not.toContain(as);
    expect(sb.shmFiles().filter((f) => f.includes(`-${as}-`))).toEqual([]);
  }

  it('whose process dies just as its threads are let go at once: the restore fails in one line and leaves nothing', async () => {
    const image = snapshot(aid, 'dies');
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    // Stopped before the first round: every thread's arm fails (ESRCH).
    await diesAt('restore: threads at once', image, 'gone');
    // Stopped in the addon once the first round's 64 threads are all let
    // go into their batches: their process killed while they run (or
    // wait, done, for the tracer), each thread's end is heard among the
    // others' (trace_wait_any), none is put back, and the round fails.
    await diesAt('batches: running at once', image, 'gone-running');
  }, 120_000);
});
