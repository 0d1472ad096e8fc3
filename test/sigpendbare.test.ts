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
import { fixture, Sandbox, waitFor } from './helpers.js';

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
