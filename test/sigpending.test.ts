/**
 * A snapshot of a process whose user has used up its queued signals
 * (RLIMIT_SIGPENDING): a signal sent to it with a negative si_code
 * (tgkill's, sigqueue's) is then pending without its siginfo, which
 * PTRACE_PEEKSIGINFO does not list and which reads back as SI_USER from
 * PID 0. The batches that run the snapshot's calls in the process end by
 * such a tgkill of their own, and the end signal kept from one batch to
 * the next (trace.c end_kept) is looked for with that peek (review r394
 * F1). The fixture (sigpendfull) blocks SIGURG, the first end signal a
 * batch takes, and reports the SIGURG pending when asked (SIGPWR).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { release } from 'node:os';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, processState as stateOf, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

/** Whether the kernel queues a signal a tracer gives back to a thread
 * that blocks it in the queue it was taken from (Linux 5.17): before, a
 * batch's put-back of the process's signals is left to appshot's own
 * (trace.c requeue_keeps_queue), which cannot tell that a signal taken at
 * a batch's start without its siginfo was the thread's. */
const [major, minor] = release().split('.').map(Number);
const requeuesWhereTaken = major > 5 || (major === 5 && minor >= 17);
const SIGURG_BIT = 1n << 22n; // signal 23
const SYS_TGKILL = 234;
const SIGURG = 23;
/** tgkill(argv[1], argv[1], argv[2]): to the main thread of process argv[1]. */
const TGKILL = `import ctypes, sys\npid = int(sys.argv[1])\nsys.exit(ctypes.CDLL(None, use_errno=True).syscall(${SYS_TGKILL}, pid, pid, int(sys.argv[2])))`;

/** The fixture as application `aid`, its verdict READY: its system PID
 * (one thread). */
async function started(aid: string): Promise<number> {
  sb.ok(['run', '-d', '--aid', aid, '--', fixture('sigpendfull')]);
  await waitFor(() => /READY|FAIL/.test(sb.log(aid)), 10_000, `${aid} to use up its queued signals`);
  expect(sb.log(aid)).not.toMatch(/FAIL/);
  const [app] = sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid]);
  return app.processes.find((p) => !p.init)!.pid;
}

/** Whether SIGURG waits in the thread's own queue and in its process's. */
function urgPending(pid: number): { thread: boolean; process: boolean } {
  const status = readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8');
  const mask = (field: string) => BigInt(`0x${new RegExp(`^${field}:\\s*([0-9a-f]+)$`, 'm').exec(status)![1]}`);
  return { thread: (mask('SigPnd') & SIGURG_BIT) !== 0n, process: (mask('ShdPnd') & SIGURG_BIT) !== 0n };
}

/** The SIGURG the fixture takes when asked (SIGPWR): each one's
 * "<si_code> <si_pid>". */
async function taken(aid: string, pid: number): Promise<string[]> {
  const before = sb.log(aid).length;
  const answer = () => sb.log(aid).slice(before);
  process.kill(pid, 'SIGPWR');
  await waitFor(() => /^(TOOK \d+|FAIL.*)$/m.test(answer()), 10_000, `${aid} to take its SIGURG`);
  const lines = answer().trim().split('\n');
  const urg = lines.filter((l) => l.startsWith('URG ')).map((l) => l.slice(4));
  expect(lines).toEqual([...urg.map((u) => `URG ${u}`), `TOOK ${urg.length}`]);
  return urg;
}

describe("a snapshot of a process whose user's queued signals are used up (RLIMIT_SIGPENDING)", () => {
  it('ends each batch at its own end signal, which comes without its siginfo, and sends the application nothing', async () => {
    // The batch's tgkill came as SI_USER from PID 0 (no queue entry): taken
    // for a signal of the application's, the thread was let go past it,
    // back into its own code; the batch gave up after 10 s, the snapshot
    // failed, and the application was sent a SIGURG no one sent it.
    const aid = 'spfull';
    const pid = await started(aid);
    try {
      const r = sb.run(['snapshot', aid, '--leave-running', '-o', `${sb.home}/spfull.img`]);
      expect(r.code, r.stderr).toBe(0);
      expect(urgPending(pid)).toEqual({ thread: false, process: false });
      expect(await taken(aid, pid)).toEqual([]);
    } finally {
      sb.run(['rm', '-f', aid]);
    }
  });

  it.runIf(requeuesWhereTaken)('puts an end signal pending without its siginfo back where it was, the thread\'s own, once (review r394 F1)', async () => {
    // A SIGURG sent to the thread (tgkill) once its first batch has ended
    // by SIGURG: pending without siginfo, which the peeks before the next
    // batch do not see, so that batch keeps SIGURG and takes it at its
    // start. It was sent back to the process (kill: not the thread's any
    // more); the kernel now queues it again itself, where it was.
    const aid = 'spf1';
    const pid = await started(aid);
    let child: ChildProcess | undefined;
    try {
      child = spawn(process.execPath, [cli, 'snapshot', aid, '--leave-running', '-o', `${sb.home}/spf1.img`], {
        env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: 'batch: running' },
      });
      let stderr = '';
      child.stderr!.on('data', (d) => (stderr += d));
      const exited = new Promise<number | null>((resolve) => child!.on('close', (code) => resolve(code)));
      let sent = false;
      // Batches of the fixture's thread after the send (review r417 F6):
      // without one, the SIGURG would stay where it was sent untouched,
      // and the test would pass having put nothing back.
      let later = 0;
      // appshot stops itself as each batch is let go: continued every
      // time, and the SIGURG sent at the first stop after the fixture's
      // thread has ended a batch of its own (stopped, its last call the
      // batch's tgkill; at a batch of another process it waits in
      // rt_sigtimedwait).
      const appshot = child;
      while (appshot.exitCode === null) {
        await waitFor(() => stateOf(appshot.pid!) === 'T' || appshot.exitCode !== null, 60_000, 'appshot to stop at a batch');
        if (appshot.exitCode !== null) break;
        // Looked at until the first batch after the send: the fixture is
        // frozen (stopped) until then, not once the snapshot lets it go.
        if (!sent || later === 0) {
          await waitFor(() => stateOf(pid) === 't', 10_000, 'the fixture to stop');
          // Its last call the batch's tgkill (its batch ended), or none
          // (-1: stopped at a signal taken at its batch's start), where
          // the thread's own wait is rt_sigtimedwait.
          const call = readFileSync(`/proc/${pid}/task/${pid}/syscall`, 'utf8');
          if (sent && (call.startsWith(`${SYS_TGKILL} `) || call.startsWith('-1 '))) later++;
          if (!sent && call.startsWith(`${SYS_TGKILL} `)) {
            const k = spawnSync('python3', ['-c', TGKILL, String(pid), String(SIGURG)]);
            expect(k.status).toBe(0);
            sent = true;
          }
        }
        // Woken by the time kill returns: a T seen after is its next stop.
        appshot.kill('SIGCONT');
      }
      expect(await exited, stderr).toBe(0);
      expect(sent, 'a batch of the fixture was seen').toBe(true);
      expect(later, 'batches of the fixture after the send').toBeGreaterThan(0);
      expect(urgPending(pid)).toEqual({ thread: true, process: false });
      // As the kernel reads a signal it kept without siginfo: SI_USER, PID 0.
      expect(await taken(aid, pid)).toEqual(['0 0']);
    } finally {
      // Not left stopped at a batch, holding the application.
      if (child && child.exitCode === null) child.kill('SIGKILL');
      sb.run(['rm', '-f', aid]);
    }
  });
});
