/**
 * Signals pending without their siginfo across a snapshot and restore
 * (issue 12). The kernel keeps a standard signal it could not queue a
 * siginfo for (the user's queued signals at RLIMIT_SIGPENDING, sent with
 * a negative si_code) as its pending bit alone, which PTRACE_PEEKSIGINFO
 * does not list: an image made from the peek alone lost it, and the
 * restored program waited for a signal that never came. The fixture
 * (sigpendbare) holds such, one in its main thread's own set, one in its
 * second thread's, two in the process's (a standard one, a real-time one
 * sent by kill), beside a SIGUSR1 queued with its siginfo to the process
 * and a real-time one queued with a second instance lost bare (the kernel
 * gives the queued one alone), and after SIGHUP takes them, checking that
 * each comes exactly once as the kernel gives a bare one (SI_USER from
 * PID 0), and the queued ones with their siginfo.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, stoppedAt, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

async function started(aid: string): Promise<void> {
  sb.ok(['run', '-d', '--aid', aid, '--', fixture('sigpendbare')]);
  await waitFor(() => /^(READY|FAIL.*)$/m.test(sb.log(aid)), 10_000, `${aid} to hold its signals`);
  expect(/^FAIL.*$/m.exec(sb.log(aid))?.[0]).toBeUndefined();
}

/** Each thread's pending masks (SigPnd, ShdPnd): the main thread's (its
 * TID is the process's PID) first, then the others' in TID order (PIDs
 * wrap: the main thread's TID need not be the lowest). */
function masks(pid: number): string[] {
  const tids = readdirSync(`/proc/${pid}/task`).map(Number);
  expect(tids).toContain(pid);
  return [pid, ...tids.filter((tid) => tid !== pid).sort((a, b) => a - b)].map((tid) => {
    const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    const field = (name: string) => new RegExp(`^${name}:\\s*([0-9a-f]+)$`, 'm').exec(status)![1];
    return `${field('SigPnd')} ${field('ShdPnd')}`;
  });
}

// SIGUSR1 (bit 9) in the main thread's set, SIGUSR2 (bit 11) in the
// second thread's, SIGUSR1, SIGWINCH (bit 27), SIGRTMIN+2 and +3 (bits
// 35, 36) in the process's.
const HELD = ['0000000000000200 0000001808000200', '0000000000000800 0000001808000200'];

/** SIGHUP to the fixture: its verdict, once it has taken its signals. */
async function verdict(aid: string): Promise<string> {
  const before = sb.log(aid).length;
  process.kill(sb.systemPid(aid), 'SIGHUP');
  const after = () => sb.log(aid).slice(before);
  await waitFor(() => /^(PASS|FAIL.*)$/m.test(after()), 10_000, `the verdict of ${aid}`);
  return after().trim();
}

const PASSED = 'MAIN USR1 0 0 0, USR1 -1 self 7, WINCH 0 0 0, RT2 -1 self 3, RT3 0 0 0\nSECOND USR2 0 0 0\nPASS';

describe('signals pending without their siginfo (RLIMIT_SIGPENDING reached)', () => {
  for (const lazy of [false, true]) {
    it(`are pending again after a restore${lazy ? ' (--lazy)' : ''}, each where it was and once`, async () => {
      const aid = lazy ? 'bare-lazy' : 'bare';
      try {
        await started(aid);
        expect(masks(sb.systemPid(aid))).toEqual(HELD);
        // Twice: restored, they are queued with the siginfo recorded, and
        // a second image must carry each once again, not once more.
        for (const round of [1, 2]) {
          const image = join(sb.home, `${aid}-${round}.img`);
          sb.ok(['snapshot', aid, '-o', image]);
          sb.ok(['restore', image, ...(lazy ? ['--lazy'] : [])]);
          expect(masks(sb.systemPid(aid)), `round ${round}`).toEqual(HELD);
        }
        expect(await verdict(aid)).toBe(PASSED);
      } finally {
        sb.run(['rm', '-f', aid]);
      }
    });
  }

  it('stay with the original left running, and come once in its copy', async () => {
    const aid = 'bare-orig';
    try {
      await started(aid);
      const image = join(sb.home, `${aid}.img`);
      sb.ok(['snapshot', aid, '--leave-running', '-o', image]);
      expect(masks(sb.systemPid(aid))).toEqual(HELD);
      sb.ok(['restore', image, '--aid', 'bare-copy']);
      expect(masks(sb.systemPid('bare-copy'))).toEqual(HELD);
      expect(await verdict(aid)).toBe(PASSED);
      expect(await verdict('bare-copy')).toBe(PASSED);
    } finally {
      sb.run(['rm', '-f', aid]);
      sb.run(['rm', '-f', 'bare-copy']);
    }
  });
});

/**
 * Job control (review r450 F1): SIGCONT sent to a process discards every
 * stop signal pending in it, and a stop signal every SIGCONT; the kernel
 * never holds both. Sent while a snapshot reads a queue, between its read
 * of the pending mask and its peek of the queue, the discarded stop
 * signal's bit was in the mask and its siginfo no longer in the queue: it
 * was taken for one pending without siginfo and recorded beside the
 * SIGCONT, and the restore, queueing it again after, discarded the
 * SIGCONT (the copy stayed with a SIGTSTP nobody sent it last). The
 * fixture (sigpendjc) holds a SIGTSTP in its thread's queue or in its
 * process's; the test sends SIGCONT while the snapshot is stopped at that
 * point (APPSHOT_TEST_STOP_AT), then restores the image: the copy must
 * hold the SIGCONT alone, with its siginfo (SI_USER from the test, which
 * is outside the application: PID 0).
 */
describe('a stop signal that job control discards while the snapshot reads the queue', () => {
  for (const [queue, point] of [
    ['thread', 'snapshot: main thread pending mask read'],
    ['process', 'snapshot: shared pending mask read'],
  ] as const) {
    it(`is not recorded beside the SIGCONT that discarded it (${queue}'s queue)`, async () => {
      const aid = `jc-${queue}`;
      const image = join(sb.home, `${aid}.img`);
      try {
        sb.ok(['run', '-d', '--aid', aid, '--', fixture('sigpendjc'), queue]);
        await waitFor(() => /^(READY|FAIL.*)$/m.test(sb.log(aid)), 10_000, `${aid} to hold its SIGTSTP`);
        expect(/^FAIL.*$/m.exec(sb.log(aid))?.[0]).toBeUndefined();
        const pid = sb.systemPid(aid);
        const snapshot = await stoppedAt(sb, ['snapshot', aid, '-o', image], point, `the snapshot of ${aid} to reach '${point}'`);
        process.kill(pid, 'SIGCONT');
        // SIGCONT pending (bit 18) in the process's queue, SIGTSTP (bit 20)
        // nowhere: the kernel's own state when the snapshot goes on.
        expect(masks(pid)).toEqual(['0000000000000000 0000000000020000']);
        const done = await snapshot.go();
        expect(done.code, done.stderr).toBe(0);
        // The image: nothing in the thread's queue, the SIGCONT alone in
        // the process's (inspect shows each queue's size and its start).
        type Queue = { bytes: number; hex: string };
        const [recorded] = sb.json<{ processes: { threads: { pending: Queue }[]; sharedPending: Queue }[] }>(['inspect', image]).processes;
        expect(recorded.threads.map((t) => t.pending.bytes)).toEqual([0]);
        expect(recorded.sharedPending.bytes).toBe(128);
        expect(Buffer.from(recorded.sharedPending.hex, 'hex').readInt32LE(0)).toBe(18);
        sb.ok(['restore', image]);
        expect(masks(sb.systemPid(aid))).toEqual(['0000000000000000 0000000000020000']);
        const before = sb.log(aid).length;
        process.kill(sb.systemPid(aid), 'SIGHUP');
        const after = () => sb.log(aid).slice(before);
        await waitFor(() => /^(DONE|FAIL.*)$/m.test(after()), 10_000, `what ${aid} took`);
        expect(after().trim()).toBe('TOOK CONT 0 0\nDONE');
      } finally {
        sb.run(['rm', '-f', aid]);
      }
    });
  }
});
