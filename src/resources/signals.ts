/**
 * Signals of a process: its handlers (read with rt_sigaction run inside the
 * process: /proc shows only which are caught) and the process-wide queue of
 * pending signals. Masks and per-thread queues are the threads' (threads.ts).
 */
import { procText } from '../procfs.js';
import { addon } from '../native.js';
import type { SigAction } from '../image/types.js';
import { NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { type NamedCall, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { lateSigchldOf } from '../ptrace/windows.js';
import type { MapsLine } from './memory.js';

const SIGKILL = 9;
const SYS_tgkill = 234;
const SIGSTOP = 19;
const NSIG = 64;

/** Signals whose disposition is not the default (SigCgt | SigIgn): only
 * those are asked for, one injected call each. */
function nonDefault(pid: number): bigint {
  const status = procText(`/proc/${pid}/status`);
  const field = (name: string) => BigInt('0x' + (new RegExp(`^${name}:\\s+([0-9a-f]+)`, 'm').exec(status)?.[1] ?? '0'));
  return field('SigCgt') | field('SigIgn');
}

/** The dispositions to read: asked with the other kinds' questions.
 * SIGCHLD's always: SIG_DFL with SA_NOCLDWAIT (children reaped by the
 * kernel, never zombies) shows in neither SigCgt nor SigIgn. */
export function askSigactions(pid: number, calls: CallQueue): Map<number, Answer> {
  const asked = new Map<number, Answer>();
  const wanted = nonDefault(pid) | (1n << BigInt(SIGCHLD - 1));
  for (let sig = 1; sig <= NSIG; sig++) {
    if (sig === SIGKILL || sig === SIGSTOP || !(wanted & (1n << BigInt(sig - 1)))) continue;
    asked.set(sig, calls.ask(NR.rt_sigaction, [sig, 0, 'buf', 8], { outLength: 32 }));
  }
  return asked;
}

/** `asked`: askSigactions's questions, answered. */
export function dumpSigactions(asked: Map<number, Answer>): SigAction[] {
  const out: SigAction[] = [];
  for (const [sig, { ret, out: act }] of asked) {
    if (ret !== 0n) continue; // 32 and 33 belong to glibc and may refuse
    const handler = act.readBigUInt64LE(0);
    const flags = act.readBigUInt64LE(8);
    const mask = act.readBigUInt64LE(24);
    // SIG_DFL with nothing else set is what a restore starts with anyway.
    if (handler === 0n && flags === 0n && mask === 0n) continue;
    out.push({ signal: sig, handler, flags, restorer: act.readBigUInt64LE(16), mask });
  }
  return out;
}

export function dumpSharedPending(tid: number): Buffer {
  return addon().peekSiginfo(tid, true);
}

/* ---- restore ---------------------------------------------------------- */

/** The calls that make every disposition as in the image; the seed's own
 * (it ignores SIGPIPE, as init does) go back to the default. Their
 * arguments are put in scratch memory: for the caller to run, in a batch
 * with other calls, before it resets it. */
export function sigactionCalls(r: RemoteProcess, actions: SigAction[]): NamedCall[] {
  const bySignal = new Map(actions.map((a) => [a.signal, a]));
  const seedOwn = nonDefault(r.pid);
  const calls: NamedCall[] = [];
  for (let sig = 1; sig <= NSIG; sig++) {
    if (sig === SIGKILL || sig === SIGSTOP) continue;
    const a = bySignal.get(sig);
    if (!a && !(seedOwn & (1n << BigInt(sig - 1)))) continue;
    const act = r.put(r.u64s(a ? [a.handler, a.flags, a.restorer, a.mask] : [0n, 0n, 0n, 0n]));
    calls.push({ what: `restoring the handler of signal ${sig}`, nr: SYS.rt_sigaction, args: [sig, act, 0, 8] });
  }
  return calls;
}

const SIGCHLD = 17;
/** si_code values whose si_pid is a sender: SI_USER, SI_QUEUE, SI_MESGQ,
 * SI_TKILL (and any positive code of SIGCHLD: the child). The same rule as
 * the preload library's translate_si_pid. */
const SENDER_CODES = new Set([0, -1, -3, -6]);

/** Pending siginfos (128 bytes each) with their sender's system PID made
 * this node's (`now`: the new system PID of the image's one, undefined if
 * the image's tables do not map it): the program reads them here, through
 * this node's tables. A sender outside the application, which the program
 * saw as 0, is 0, not a number that may be one of the application's
 * processes here. */
export function retargetSiginfos(pending: Buffer, now: (oldPid: number) => number | undefined): Buffer {
  let out = pending;
  for (let at = 0; at + 128 <= pending.length; at += 128) {
    const signo = pending.readInt32LE(at);
    const code = pending.readInt32LE(at + 8);
    if (!SENDER_CODES.has(code) && !(signo === SIGCHLD && code > 0)) continue;
    const old = pending.readInt32LE(at + 16);
    if (old <= 0) continue;
    const pid = now(old) ?? 0;
    if (pid === old) continue;
    if (out === pending) out = Buffer.from(pending);
    out.writeInt32LE(pid, at + 16);
  }
  return out;
}

/** The old system PID of the child named by the first pending SIGCHLD
 * (128-byte siginfos, `pending`) whose child the image's tables do not
 * map (`now` answers undefined): one reaped before the snapshot, whose
 * SIGCHLD retargetSiginfos queues again with si_pid 0. At most one such
 * is pending process-wide, SIGCHLD being a standard signal. */
export function lateSigchldChild(pending: Buffer[], now: (oldPid: number) => number | undefined): number | undefined {
  for (const queue of pending) {
    for (let at = 0; at + 128 <= queue.length; at += 128) {
      if (queue.readInt32LE(at) !== SIGCHLD || queue.readInt32LE(at + 8) <= 0) continue;
      const old = queue.readInt32LE(at + 16);
      if (old > 0 && now(old) === undefined) return old;
    }
  }
  return undefined;
}

/**
 * A late SIGCHLD's child named to the restored process's preload library
 * (stopped process `pid`, mappings `maps`, its image's system PID
 * `oldSelf`): the child's and the process's old system PIDs, from which
 * it finds the child's virtual PID in the pairs of reaped children its
 * memory kept (addon/preload/preload_pid.c, appshot_late_sigchld). A
 * number in the siginfo instead would be read by any program the process
 * execs, which pending signals survive.
 */
export function restoreLateSigchld(pid: number, maps: MapsLine[], child: number, oldSelf: number): void {
  const address = lateSigchldOf(pid, maps);
  // A program without our library (or an older one) never named the
  // child by these pairs: its SIGCHLD names none, as before.
  if (address === undefined) return;
  const ids = Buffer.alloc(16);
  ids.writeInt32LE(child, 0);
  ids.writeInt32LE(oldSelf, 4);
  addon().writeMemory(pid, address, ids);
}

/** Queues signals again: 128-byte siginfos, for a thread or (tid 0) for the
 * process. Run while every signal is blocked in the thread, so that none is
 * delivered before the thread's registers are its own again. */
export function requeueSignals(r: RemoteProcess, pending: Buffer, tid: number): void {
  for (let at = 0; at + 128 <= pending.length; at += 128) {
    const info = pending.subarray(at, at + 128);
    const sig = info.readInt32LE(0);
    r.reset();
    const addr = r.put(info);
    if (!tid) {
      r.call(`requeueing signal ${sig}`, SYS.rt_sigqueueinfo, [r.pid, sig, addr]);
      continue;
    }
    // The kernel takes a siginfo claiming a kernel or tgkill origin only
    // from the thread it is for; another thread's gets a plain tgkill.
    if (r.raw(SYS.rt_tgsigqueueinfo, [r.pid, tid, sig, addr], tid) !== 0n)
      r.call(`requeueing signal ${sig}`, SYS_tgkill, [r.pid, tid, sig], tid);
  }
}
