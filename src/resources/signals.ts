/**
 * Signals of a process: its handlers (read with rt_sigaction run inside the
 * process: /proc shows only which are caught) and the process-wide queue of
 * pending signals. Masks and per-thread queues are the threads' (threads.ts).
 */
import { readFileSync } from 'node:fs';
import { procText } from '../procfs.js';
import { addon } from '../native.js';
import type { SigAction } from '../image/types.js';
import { NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { type NamedCall, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { lateSigchldOf } from '../ptrace/windows.js';
import { killPoint } from '../killpoint.js';
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

/** The process's pending signals (`pid`: its leader, stopped): its queue
 * with those pending there without a siginfo (readPending). */
export function dumpSharedPending(pid: number): Buffer {
  return readPending(`/proc/${pid}/status`, 'ShdPnd', () => addon().peekSiginfo(pid, true), 'snapshot: shared pending mask read');
}

/** How many times a queue is read when its mask changes around the peek
 * (a signal sent or discarded meanwhile), before the last read is taken. */
const PENDING_READS = 8;

/**
 * A queue of pending signals (`peek`: its siginfos, PTRACE_PEEKSIGINFO)
 * with those pending in it without a siginfo (withBareSignals), its
 * pending mask (`field` of the status at `statusPath`) read fresh just
 * before the peek and, where that read has a bit the queue does not name,
 * again just after. A frozen process runs nothing, but others can still
 * send it signals, and job control can take them away: SIGCONT sent to it
 * discards every pending stop signal (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU)
 * in all its queues, a stop signal every SIGCONT. A signal sent between
 * the first read and the peek is in the queue, never taken for one
 * without siginfo; one discarded there was in that read and no longer in
 * the queue, and was made up beside the signal that discarded it: an
 * image holding a stop signal and SIGCONT at once, which the kernel never
 * does, and whose restore queued both, the last discarding the other
 * (review r450 F1; the status gathered after the questions, procfs.ts, is
 * older by the whole dump before). So only a bit set in both reads is
 * made up, and the reads count only when they agree and the queue names
 * nothing the second lacks (else all three again, PENDING_READS times at
 * most); one discarded and sent again within the peek (set in both reads)
 * is still left out beside what discarded it (withBareSignals). Most
 * queues have no bit to make up: they cost the frozen window one status
 * read (tens of µs on a loaded machine), not two. `point`: a test stop
 * point between the first read and the peek (killpoint.ts); `known`: as
 * withBareSignals takes it.
 */
export function readPending(statusPath: string, field: 'SigPnd' | 'ShdPnd', peek: () => Buffer, point: string, known?: Map<number, Buffer>): Buffer {
  for (let read = 1; ; read++) {
    const before = pendingMask(readFileSync(statusPath, 'latin1'), field);
    if (read === 1) killPoint(point);
    const queued = peek();
    const named = signalsOf(queued);
    // Nothing to make up (most queues): the peek is the queue as it was
    // then, and a second read would tell nothing more.
    if (!(before & ~named & ~bit(SIGKILL))) return queued;
    const after = pendingMask(readFileSync(statusPath, 'latin1'), field);
    if ((before === after && !(named & ~after)) || read === PENDING_READS) return withBareSignals(queued, before & after, known);
  }
}

/** The signals a queue of siginfos names, as a mask (bit n-1: signal n). */
function signalsOf(queued: Buffer): bigint {
  let named = 0n;
  for (let at = 0; at + SIGINFO_BYTES <= queued.length; at += SIGINFO_BYTES) {
    const sig = queued.readInt32LE(at);
    if (sig >= 1 && sig <= NSIG) named |= 1n << BigInt(sig - 1);
  }
  return named;
}

/** A pending mask of a thread's status text (/proc/PID/task/TID/status):
 * SigPnd, the thread's own signals, or ShdPnd, its process's; bit n-1 for
 * signal n. */
export function pendingMask(status: string, field: 'SigPnd' | 'ShdPnd'): bigint {
  const found = new RegExp(`^${field}:\\s*([0-9a-f]+)$`, 'm').exec(status);
  if (!found) throw new Error(`a status without ${field}`);
  return BigInt('0x' + found[1]);
}

const SI_USER = 0;
const SIGINFO_BYTES = 128;
const SIGCONT = 18;
const bit = (sig: number) => 1n << BigInt(sig - 1);
/** SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU. */
const STOP_SIGNALS = bit(SIGSTOP) | bit(20) | bit(21) | bit(22);

/**
 * A queue of pending siginfos as PTRACE_PEEKSIGINFO reads it (`queued`),
 * with, after them, one siginfo for each signal set in the queue's
 * pending mask (`mask`: the bits set on both sides of the peek,
 * readPending) that none of them names.
 *
 * The kernel keeps a signal whose siginfo it could not allocate as its
 * pending bit alone: a standard signal sent with a negative si_code
 * (tgkill's SI_TKILL, sigqueue's SI_QUEUE, a timer's) once the user's
 * queued signals are at RLIMIT_SIGPENDING, a real-time one sent by kill
 * past it, any where the allocation fails. The peek, which walks the
 * queue, does not list it, and an image of the queue alone lost it: the
 * restored program waited for a signal that never came. Whoever takes it
 * reads what the kernel makes up for it (collect_signal): SI_USER, no
 * sender (si_pid and si_uid 0), which is what is recorded; queued again
 * at a restore it comes so, once (a standard signal's bit is one
 * instance however many were sent; a real-time one's bit without any
 * siginfo, one taken). A signal with a siginfo queued is not added: the
 * bit is that siginfo's (a standard one is never queued twice; a
 * real-time one's bit stays set while any is queued, and one sent bare
 * beside them is lost in the kernel too). SIGKILL is never queued with a
 * siginfo, but a process with it pending is dying, not to be restored.
 * A bit whose siginfo is `known` (a caught signal the snapshot queued
 * again, threads.ts caughtRequeued) is recorded with that one instead.
 */
export function withBareSignals(queued: Buffer, mask: bigint, known?: Map<number, Buffer>): Buffer {
  const named = signalsOf(queued);
  let bare = mask & ~named & ~bit(SIGKILL);
  // The kernel never holds a stop signal and SIGCONT at once (each
  // discards the other): beside one queued with its siginfo, the other's
  // bit is one it discarded (read before, set again after the peek).
  if (named & STOP_SIGNALS) bare &= ~bit(SIGCONT);
  if (named & bit(SIGCONT)) bare &= ~STOP_SIGNALS;
  if (!bare) return queued;
  const made: Buffer[] = [queued];
  for (let sig = 1; sig <= NSIG; sig++) {
    if (!(bare & bit(sig))) continue;
    const real = known?.get(sig);
    if (real) {
      made.push(real);
      continue;
    }
    const info = Buffer.alloc(SIGINFO_BYTES); // si_errno, si_pid, si_uid: 0
    info.writeInt32LE(sig, 0);
    info.writeInt32LE(SI_USER, 8);
    made.push(info);
  }
  return Buffer.concat(made);
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
