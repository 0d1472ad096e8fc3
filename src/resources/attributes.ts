/**
 * Process and thread attributes that a restore would otherwise leave as
 * the seed's (silently wrong): the OOM score adjustment, child-subreaper
 * status, transparent huge pages disabled, personality, the audit login
 * uid, membarrier registrations, the core dump filter, memory-deny-write-
 * execute; and per thread, nice value, scheduling
 * policy and priority (a SCHED_DEADLINE thread's runtime, deadline, period
 * and flags), CPU affinity, I/O priority, timer slack, utilization
 * clamps, speculation controls and parent-death signal.
 *
 * Read at snapshot from /proc, by the scheduling getters (which take any
 * TID) from appshot's process, and by calls injected into the frozen
 * process only for what the kernel tells the process alone (the prctl
 * getters act on the calling thread or process); set back by
 * calls injected into the restored process before its limits and
 * credentials, which may take away the right to (a lower nice value, a
 * real-time policy). What this user may not grant fails the restore,
 * naming the attribute.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { procText } from '../procfs.js';
import type { Image, Process, ProcessAttributes, Rlimit, SchedDeadline, Thread, ThreadAttributes } from '../image/types.js';
import { type CallBatch, type NamedCall, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { AppshotError, errnoName, ExitCode } from '../errors.js';
import { nameProcess, Unsupported } from './context.js';
import { NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { addon } from '../native.js';
import { mempolicyFromAnswer, mempolicyMask } from './memory.js';
import { CAP_SYS_ADMIN, CAP_SYS_NICE as SYS_NICE, imageLimit, ownHardLimit, processMay, restorerMay, RLIMIT_NICE, RLIMIT_RTPRIO, threadMay, vouchedFor } from './heldcaps.js';

const PR_SET_PDEATHSIG = 1;
const PR_GET_PDEATHSIG = 2;
const PR_SET_CHILD_SUBREAPER = 36;
const PR_GET_CHILD_SUBREAPER = 37;
const PR_SET_THP_DISABLE = 41;
const PR_GET_THP_DISABLE = 42;
const NR_sched_getparam = 143;
const NR_sched_getscheduler = 145;
const NR_personality = 135;
const NR_modify_ldt = 154;
/** struct desc_struct: one LDT entry as modify_ldt(0) reads them. */
const LDT_ENTRY_SIZE = 8;
const NR_sched_getaffinity = 204;
const NR_ioprio_get = 252;
const IOPRIO_WHO_PROCESS = 1;
/** Bytes of CPU mask asked for: 1024 CPUs. */
const AFFINITY_BYTES = 128;
const PRIO_PROCESS = 0;
const SCHED_DEADLINE = 6;
const SCHED_RESET_ON_FORK = 0x40000000;
const PERSONALITY_QUERY = 0xffffffff;
/** The bits of a personality the kernel defines (linux/personality.h):
 * the type in the low byte (PER_MASK) and the flags UNAME26 to
 * ADDR_LIMIT_3GB. personality(2) takes any value; an image's with other
 * bits is refused (validate.ts), so a snapshot refuses them by name. */
export const PERSONALITY_BITS = 0xff | 0x0ffe0000;
const MADV_DONTNEED = 4;
const PAGE = 4096;
const PROT_READ = 1;
const MAP_PRIVATE = 2;
const MAP_ANONYMOUS = 0x20;
const MCL_FUTURE = 2;
const PR_SET_MDWE = 65;
const PR_GET_MDWE = 66;
/** Machine-check memory corruption kill policy, per thread (PR_MCE_KILL
 * with PR_MCE_KILL_SET; PR_MCE_KILL_GET reads 0 late, 1 early, 2 the
 * system's default). */
const PR_MCE_KILL = 33;
const PR_MCE_KILL_GET = 34;
const PR_MCE_KILL_SET = 1;
const PR_MCE_KILL_DEFAULT = 2;
/** Whether rdtsc faults, per thread (x86 only: EINVAL elsewhere). */
const PR_GET_TSC = 25;
const PR_SET_TSC = 26;
const PR_TSC_SIGSEGV = 2;
/** KSM for every mapping of the process (Linux 6.4; EINVAL before). */
const PR_SET_MEMORY_MERGE = 67;
const PR_GET_MEMORY_MERGE = 68;
/** The thread's NUMA memory policy (set_mempolicy: each thread's own; a
 * mapping's own, mbind, is memory.ts's concern). The mode carries its
 * flags (MPOL_F_STATIC_NODES...); the nodes are a mask of MEMPOLICY_NODES
 * bits, as get_mempolicy copies out that many (rounded to a long). */
const NR_set_mempolicy = 238;
const NR_get_mempolicy = 239;
const MEMPOLICY_NODES = 1024;
const MEMPOLICY_MASK_BYTES = MEMPOLICY_NODES / 8;
const PR_SET_TIMERSLACK = 29;
const PR_GET_TIMERSLACK = 30;
const NR_open = 2;
const NR_write = 1;
const NR_close = 3;
const O_WRONLY = 1;
const O_CLOEXEC = 0o2000000;
/** MEMBARRIER_CMD_GET_REGISTRATIONS (Linux 6.3): the REGISTER_* commands
 * the process ran, as a mask of those commands, each of which is also
 * what registers it again. */
const MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9;
const MEMBARRIER_REGISTER_COMMANDS = [1 << 2, 1 << 4, 1 << 6, 1 << 8];
const EINVAL = 22n;
const ENOSYS = 38n;
/** sched_getattr/sched_setattr (not in the ptrace layer's tables). */
const NR_sched_setattr = 314;
const NR_sched_getattr = 315;
/** struct sched_attr up to the utilization clamps (SCHED_ATTR_SIZE_VER1). */
const SCHED_ATTR_SIZE = 56;
const SCHED_FLAG_KEEP_POLICY = 0x08;
const SCHED_FLAG_KEEP_PARAMS = 0x10;
const SCHED_FLAG_UTIL_CLAMP_MIN = 0x20;
const SCHED_FLAG_UTIL_CLAMP_MAX = 0x40;
/** The sched_flags a SCHED_DEADLINE thread has and sched_getattr tells:
 * reset on fork, reclaim unused bandwidth (GRUB), SIGXCPU on overrun. */
const SCHED_FLAG_RESET_ON_FORK = 0x01n;
const SCHED_FLAG_RECLAIM = 0x02n;
const SCHED_FLAG_DL_OVERRUN = 0x04n;
const DEADLINE_FLAGS = SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_RECLAIM | SCHED_FLAG_DL_OVERRUN;
/** struct sched_attr up to the deadline fields (SCHED_ATTR_SIZE_VER0). */
const SCHED_ATTR_SIZE_VER0 = 48;
/** The capability SCHED_DEADLINE needs, whoever sets it (the kernel lets
 * no one without it, not even for their own threads). */
const CAP_SYS_NICE = 23n;
const SCHED_FIFO = 1;
const SCHED_RR = 2;
const IOPRIO_CLASS_SHIFT = 13;
const IOPRIO_CLASS_RT = 1;
/** A thread's clamps when nobody set them: the whole range. */
const UTIL_MIN_DEFAULT = 0;
const UTIL_MAX_DEFAULT = 1024;
const PR_GET_SPECULATION_CTRL = 52;
const PR_SET_SPECULATION_CTRL = 53;
/** PR_SPEC_STORE_BYPASS, PR_SPEC_INDIRECT_BRANCH, PR_SPEC_L1D_FLUSH: the
 * controls asked, by their number (their index in speculationCtrl). */
const SPECULATION_CONTROLS = ['store bypass', 'indirect branch', 'L1D flush'];
const PR_SPEC_PRCTL = 1;
const PR_SPEC_ENABLE = 2;
const PR_SPEC_DISABLE = 4;
const PR_SPEC_FORCE_DISABLE = 8;
const PR_SPEC_DISABLE_NOEXEC = 16;
const SPECULATION_MODES: Record<number, string> = { 2: 'enabled', 4: 'disabled', 8: 'force-disabled', 16: 'disabled until exec' };
/** The control for L1D flushing asks for a protection (ENABLE: flush);
 * the others take one away (ENABLE: speculate). */
const L1D_FLUSH = 2;
/** A call's negative result in words. */
const failed = (ret: bigint) => errnoName(Number(-ret));
/** What /proc/PID/loginuid says of a process no login set it for. */
const LOGINUID_UNSET = 4294967295;

function check(ret: bigint, what: string): bigint {
  if (ret < 0n) throw new Error(`reading ${what}: errno ${-ret}`);
  return ret;
}

/** What only the process tells of its attributes (the prctl getters),
 * asked with the other kinds' questions: whether it is a child subreaper
 * and has THP disabled, and each thread's parent-death signal. */
export interface AttributesAsked {
  subreaper: Answer;
  thpDisabled: Answer;
  membarrier: Answer;
  mdwe: Answer;
  /** modify_ldt(0) of one entry: above 0, the process has a local
   * descriptor table. */
  ldt: Answer;
  memoryMerge: Answer;
  pdeathsig: Map<number, Answer>;
  /** Each thread's personality (personality(2) is the calling thread's). */
  personality: Map<number, Answer>;
  /** Each thread's machine-check kill policy and rdtsc faulting. */
  mceKill: Map<number, Answer>;
  tsc: Map<number, Answer>;
  /** Each thread's NUMA memory policy. */
  mempolicy: Map<number, Answer>;
  timerSlack: Map<number, Answer>;
  /** Each thread's sched_attr; none where the kernel has no clamps. */
  schedAttr?: Map<number, Answer>;
  /** Each thread's speculation controls, in SPECULATION_CONTROLS order. */
  speculation: Map<number, Answer[]>;
  /** A page mapped for dumpLockFuture to see whether it got locked, and
   * what was said of it (see dumpLockFuture). */
  lockProbe: { mapped: Answer; dontneed: Answer; unmapped: Answer };
}

let uclamp: boolean | undefined;

/** Whether this kernel clamps utilization (CONFIG_UCLAMP_TASK): its
 * system-wide clamp settings exist only then. Without it sched_getattr
 * reads 0 for both clamps and sched_setattr refuses them (EOPNOTSUPP).
 * Built in or not, for as long as the kernel runs: looked at once per
 * appshot process, not in every frozen window. */
export function kernelHasUclamp(): boolean {
  uclamp ??= existsSync('/proc/sys/kernel/sched_util_clamp_min');
  return uclamp;
}

export function askAttributes(calls: CallQueue, tids: number[]): AttributesAsked {
  return {
    subreaper: calls.ask(NR.prctl, [PR_GET_CHILD_SUBREAPER, 'buf'], { outLength: 4 }),
    thpDisabled: calls.ask(NR.prctl, [PR_GET_THP_DISABLE, 0, 0, 0, 0]),
    // The parent-death signal is only told to the thread itself.
    pdeathsig: new Map(tids.map((tid) => [tid, calls.ask(NR.prctl, [PR_GET_PDEATHSIG, 'buf'], { tid, outLength: 4 })])),
    // So is the personality: /proc/PID/personality is the main thread's,
    // and a thread may have set its own. Asked in the batch each thread
    // runs anyway: no stop, no file read of its own.
    personality: new Map(tids.map((tid) => [tid, calls.ask(NR_personality, [PERSONALITY_QUERY], { tid })])),
    // Registrations are the mm's; the timer slack is each thread's own.
    membarrier: calls.ask(SYS.membarrier, [MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0]),
    mdwe: calls.ask(NR.prctl, [PR_GET_MDWE, 0, 0, 0, 0]),
    ldt: calls.ask(NR_modify_ldt, [0, 'buf', LDT_ENTRY_SIZE], { outLength: LDT_ENTRY_SIZE }),
    memoryMerge: calls.ask(NR.prctl, [PR_GET_MEMORY_MERGE, 0, 0, 0, 0]),
    // Each thread's own, told only to it (task flags a clone copies).
    mceKill: new Map(tids.map((tid) => [tid, calls.ask(NR.prctl, [PR_MCE_KILL_GET, 0, 0, 0, 0], { tid })])),
    tsc: new Map(tids.map((tid) => [tid, calls.ask(NR.prctl, [PR_GET_TSC, 'buf'], { tid, outLength: 4 })])),
    // The mode at the buffer's start, the node mask 8 bytes in.
    mempolicy: new Map(tids.map((tid) => [tid, calls.ask(NR_get_mempolicy, ['buf', { bufAt: 8 }, MEMPOLICY_NODES, 0, 0], { tid, outLength: 8 + MEMPOLICY_MASK_BYTES })])),
    timerSlack: new Map(tids.map((tid) => [tid, calls.ask(NR.prctl, [PR_GET_TIMERSLACK, 0, 0, 0, 0], { tid })])),
    // The clamps, from inside each thread (pid 0: itself): a system call
    // appshot's addon does not make.
    ...(kernelHasUclamp() ? { schedAttr: new Map(tids.map((tid) => [tid, calls.ask(NR_sched_getattr, [0, 'buf', SCHED_ATTR_SIZE, 0], { tid, outLength: SCHED_ATTR_SIZE })])) } : {}),
    // Each thread's own: the prctl acts on the calling thread.
    speculation: new Map(tids.map((tid) => [tid, SPECULATION_CONTROLS.map((_, which) => calls.ask(NR.prctl, [PR_GET_SPECULATION_CTRL, which, 0, 0, 0], { tid }))])),
    // Mapped, looked at and unmapped with the other questions: no stop
    // of its own (dumpLockFuture).
    lockProbe: askLockProbe(calls),
  };
}

function askLockProbe(calls: CallQueue): AttributesAsked['lockProbe'] {
  const mapped = calls.ask(NR.mmap, [0, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0]);
  return { mapped, dontneed: calls.ask(NR.madvise, [mapped, PAGE, MADV_DONTNEED]), unmapped: calls.ask(NR.munmap, [mapped, PAGE]) };
}

/** Fills `p`'s attributes and each of its threads'; `asked`: answered.
 * What a rare refusal leaves to be asked is asked through `calls` then. */
export function dumpAttributes(p: Process, pid: number, asked: AttributesAsked, calls: CallQueue, what: string): void {
  p.attributes = dumpProcessAttributes(pid, asked, what);
  p.personality = dumpPersonality(pid, calls, what);
  refuseUndefinedPersonality(p.personality, what);
  for (const t of p.threads) {
    t.attributes = dumpThreadAttributes(pid, t.tid, asked.pdeathsig.get(t.tid)!, asked.timerSlack.get(t.tid)!, calls, what);
    const personality = Number(check(asked.personality.get(t.tid)!.ret, `the personality of ${what} thread ${t.tid}`));
    if (personality !== p.personality) {
      refuseUndefinedPersonality(personality, `${what} thread ${t.tid}`);
      t.attributes.personality = personality;
    }
    const attr = asked.schedAttr?.get(t.tid);
    if ((t.attributes.schedPolicy & ~SCHED_RESET_ON_FORK) === SCHED_DEADLINE) t.attributes.deadline = dumpDeadline(t.tid, attr, calls, what);
    if (attr) {
      check(attr.ret, `the scheduling attributes (utilization clamps) of ${what} thread ${t.tid}`);
      t.attributes.utilMin = attr.out.readUInt32LE(48);
      t.attributes.utilMax = attr.out.readUInt32LE(52);
    }
    // -errno where there is no such control (ENODEV, EINVAL): kept as it is.
    t.attributes.speculationCtrl = asked.speculation.get(t.tid)!.map((a) => Number(a.ret));
    // A kernel without the getter (-errno): nothing recorded, as before.
    const mce = asked.mceKill.get(t.tid)!.ret;
    if (mce >= 0n && mce !== BigInt(PR_MCE_KILL_DEFAULT)) t.attributes.mceKill = Number(mce);
    const tsc = asked.tsc.get(t.tid)!;
    if (tsc.ret === 0n && tsc.out.readInt32LE() === PR_TSC_SIGSEGV) t.attributes.tscSigsegv = true;
    // A kernel without NUMA (-ENOSYS): none.
    const policy = asked.mempolicy.get(t.tid)!;
    // MPOL_DEFAULT (0): a fresh thread's, recorded as nothing.
    const mempolicy = policy.ret === 0n ? mempolicyFromAnswer(policy.out) : undefined;
    if (mempolicy) t.attributes.mempolicy = mempolicy;
  }
}

function dumpProcessAttributes(pid: number, asked: AttributesAsked, what: string): ProcessAttributes {
  check(asked.subreaper.ret, `whether ${what} is a child subreaper`);
  // Segments of its own (Wine, 16-bit code, some JITs), which /proc does
  // not show: the restored process would have none, and its first use of
  // one would fault. -ENOSYS: a kernel without modify_ldt, none.
  if (asked.ldt.ret > 0n) throw new Unsupported(`${what} has a local descriptor table (modify_ldt), which cannot be captured yet`);
  return {
    oomScoreAdj: Number(procText(`/proc/${pid}/oom_score_adj`)),
    childSubreaper: asked.subreaper.out.readInt32LE() !== 0,
    thpDisabled: check(asked.thpDisabled.ret, `THP disable of ${what}`) !== 0n,
    loginuid: dumpLoginuid(pid),
    membarrierRegistrations: dumpMembarrier(asked.membarrier, what),
    coredumpFilter: parseInt(procText(`/proc/${pid}/coredump_filter`), 16),
    // A kernel before 6.3 has no MDWE (EINVAL): none then.
    mdwe: asked.mdwe.ret === -EINVAL ? 0 : Number(check(asked.mdwe.ret, `memory-deny-write-execute of ${what}`)),
    // Before 6.4 (EINVAL): not known, none recorded.
    ...(asked.memoryMerge.ret === 1n ? { memoryMerge: true } : {}),
    ...autogroupOf(pid),
  };
}

/** The nice of process `pid`'s autogroup (its session's), from
 * /proc/PID/autogroup ("/autogroup-ID nice N"); undefined where the
 * kernel has no autogroups (no CONFIG_SCHED_AUTOGROUP). */
function autogroupNiceOf(pid: number): number | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/autogroup`, 'utf8');
  } catch {
    return undefined;
  }
  return Number(/ nice (-?\d+)/.exec(text)?.[1] ?? 0);
}

/** The autogroup's nice where it is not the default. */
function autogroupOf(pid: number): { autogroupNice?: number } {
  const nice = autogroupNiceOf(pid);
  return nice ? { autogroupNice: nice } : {};
}

/**
 * Whether mlockall(MCL_FUTURE) is in effect: nothing in /proc says so,
 * but every mapping made meanwhile is locked (VM_LOCKED, with MCL_ONFAULT
 * too), and the snapshot made one with its questions (`asked.lockProbe`:
 * a page of its own, not the batches' scratch area, which the preload
 * library's area replaces). The kernel refuses MADV_DONTNEED on a locked
 * mapping (EINVAL, madvise(2)), which it grants on any other anonymous
 * one: asked in the same batch, and the page unmapped there too, so that
 * the probe costs no stop of its own and nothing is left to unmap. (It
 * used to read VmLck from /proc while the page was still mapped, and to
 * unmap it when the frozen window ended: one more stop, 0.3-0.4 ms of a
 * tiny application's window.) (MCL_ONFAULT is not told apart: the restore
 * locks at once.)
 */
export function dumpLockFuture(p: Process, asked: AttributesAsked, what: string): void {
  const { mapped, dontneed, unmapped } = asked.lockProbe;
  // Refused (no memory, the locked-memory limit): not known, nothing to unmap.
  if (mapped.ret < 0n && mapped.ret > -4096n) return;
  if (unmapped.ret < 0n) throw new Error(`unmapping a page the snapshot mapped in ${what}: ${failed(unmapped.ret)}`);
  if (p.attributes && dontneed.ret === -EINVAL) p.attributes.lockFuture = true;
}

/** The audit login uid (inherited by every child, and what audit records
 * carry); undefined where the kernel has no audit (no such file). */
function dumpLoginuid(pid: number): number | undefined {
  try {
    return Number(procText(`/proc/${pid}/loginuid`));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/** The membarrier registrations: without them a restored process's
 * expedited barriers fail with EPERM (a .NET runtime, liburcu). A kernel
 * before 6.3 cannot tell them (EINVAL), nor one without membarrier
 * (ENOSYS): none recorded then (README, What is not kept). */
function dumpMembarrier(asked: Answer, what: string): number {
  if (asked.ret === -EINVAL || asked.ret === -ENOSYS) return 0;
  return Number(check(asked.ret, `the membarrier registrations of ${what}`));
}

/** The personality, as the process has it: from /proc/PID/personality,
 * or asked inside the process where that is unreadable to the snapshot's
 * user. */
function dumpPersonality(pid: number, calls: CallQueue, what: string): number {
  try {
    return parseInt(procText(`/proc/${pid}/personality`), 16);
  } catch {
    return Number(check(calls.askNow(NR_personality, [PERSONALITY_QUERY]).ret, `the personality of ${what}`));
  }
}

/** A personality with bits no kernel defines (personality(2) takes any
 * value): the image's check would refuse it as corrupt at restore. */
function refuseUndefinedPersonality(personality: number, what: string): void {
  const odd = personality & ~PERSONALITY_BITS;
  if (odd) throw new Unsupported(`${what} has personality 0x${personality.toString(16)}, whose bits 0x${(odd >>> 0).toString(16)} no kernel defines, which cannot be captured`);
}

/** Policy, priority, affinity and I/O priority, which every thread's
 * getters give for any TID: asked from appshot's process (no stop of the
 * frozen thread), or inside it if that is refused (a security module). */
function schedAttributes(tid: number, calls: CallQueue, what: string): { policy: number; priority: number; affinity: Buffer; ioprio: number } {
  try {
    return addon().schedAttributes(tid);
  } catch {
    /* asked inside the thread below */
  }
  const param = calls.ask(NR_sched_getparam, [tid, 'buf'], { tid, outLength: 4 });
  const policyAsked = calls.ask(NR_sched_getscheduler, [tid], { tid });
  const affinity = calls.ask(NR_sched_getaffinity, [tid, AFFINITY_BYTES, 'buf'], { tid, outLength: AFFINITY_BYTES });
  const ioprio = calls.ask(NR_ioprio_get, [IOPRIO_WHO_PROCESS, tid], { tid });
  calls.run();
  check(param.ret, `the scheduling priority of ${what} thread ${tid}`);
  const policy = Number(check(policyAsked.ret, `the scheduling policy of ${what} thread ${tid}`));
  check(affinity.ret, `the CPU affinity of ${what} thread ${tid}`);
  return {
    policy,
    priority: param.out.readInt32LE(),
    // The kernel writes as many bytes as its CPU mask has.
    affinity: Buffer.from(affinity.out.subarray(0, Number(affinity.ret))),
    ioprio: Number(check(ioprio.ret, `the I/O priority of ${what} thread ${tid}`)),
  };
}

function dumpThreadAttributes(pid: number, tid: number, pdeathsig: Answer, timerSlack: Answer, calls: CallQueue, what: string): ThreadAttributes {
  const stat = procText(`/proc/${pid}/task/${tid}/stat`);
  // Field 19 of proc(5): nice.
  const nice = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
  check(pdeathsig.ret, `the parent-death signal of ${what} thread ${tid}`);
  const sched = schedAttributes(tid, calls, what);
  return {
    nice,
    schedPolicy: sched.policy,
    schedPriority: sched.priority,
    pdeathsig: pdeathsig.out.readInt32LE(),
    cpuAffinity: sched.affinity,
    ioprio: sched.ioprio,
    timerSlackNs: BigInt.asUintN(64, check(timerSlack.ret, `the timer slack of ${what} thread ${tid}`)),
  };
}

/**
 * A SCHED_DEADLINE thread's reservation, from sched_getattr in the thread
 * itself (`asked`: the answer of the question every thread is asked where
 * the kernel has clamps; else asked now, a stop of this thread alone: a
 * deadline thread is rare). Flags other than those a deadline thread may
 * have (SCHED_FLAG_SUGOV: the kernel's own frequency governor threads) are
 * refused by name: they could not be set back.
 */
function dumpDeadline(tid: number, asked: Answer | undefined, calls: CallQueue, what: string): SchedDeadline {
  const a = asked ?? calls.askNow(NR_sched_getattr, [0, 'buf', SCHED_ATTR_SIZE, 0], { tid, outLength: SCHED_ATTR_SIZE });
  check(a.ret, `the SCHED_DEADLINE reservation of ${what} thread ${tid}`);
  const flags = a.out.readBigUInt64LE(8);
  const dl: SchedDeadline = { runtimeNs: a.out.readBigUInt64LE(24), deadlineNs: a.out.readBigUInt64LE(32), periodNs: a.out.readBigUInt64LE(40), flags: flags & DEADLINE_FLAGS };
  // The same policy as the first look saw: frozen, the thread cannot
  // have changed it; anything else is a fault of ours, said loudly.
  if (a.out.readUInt32LE(4) !== SCHED_DEADLINE) throw new Error(`reading the SCHED_DEADLINE reservation of ${what} thread ${tid}: its policy is ${a.out.readUInt32LE(4)}`);
  const other = flags & ~DEADLINE_FLAGS & ~BigInt(SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX);
  if (other) throw new Unsupported(`${what} thread ${tid}: SCHED_DEADLINE with scheduling flags 0x${other.toString(16)} cannot be captured`);
  return dl;
}

/** How a deadline reads in messages and `inspect`. */
function showDeadline(dl: SchedDeadline): string {
  const flags = [dl.flags & SCHED_FLAG_RESET_ON_FORK ? 'reset-on-fork' : '', dl.flags & SCHED_FLAG_RECLAIM ? 'reclaim' : '', dl.flags & SCHED_FLAG_DL_OVERRUN ? 'overrun-signal' : ''].filter(Boolean);
  return `SCHED_DEADLINE runtime ${dl.runtimeNs} ns, deadline ${dl.deadlineNs} ns, period ${dl.periodNs} ns${flags.length ? `, ${flags.join(' ')}` : ''}`;
}

/**
 * The privilege rule for SCHED_DEADLINE, before anything is made: the
 * kernel lets only a caller with CAP_SYS_NICE set it (there is no limit,
 * as RLIMIT_RTPRIO is for the real-time policies, under which an ordinary
 * user may). `capEff`: the restoring process's effective set, which its
 * seeds have when the policy is set. (Inside a user namespace the kernel
 * asks for the capability in the initial one, which capEff does not tell:
 * there the call fails, and with it the restore, naming the thread.)
 * Then the rule for every thread's scheduling (schedulingRefusal).
 */
export function checkSchedulingPrivileges(image: Image, capEff: bigint, own: Rlimit[] = []): void {
  if (!(capEff & (1n << CAP_SYS_NICE)))
    for (const p of image.processes)
      for (const t of p.threads) {
        const dl = t.attributes?.deadline;
        if (dl)
          throw new AppshotError(
            `${nameProcess(p.vpid, p.comm)}${t.vtid === p.vpid ? '' : ` thread ${t.vtid}`}: ${showDeadline(dl)}, which only a restore with CAP_SYS_NICE may set`,
            ExitCode.denied,
          );
      }
  checkThreadScheduling(image, capEff, own);
}

/**
 * Each thread's policy, priority, nice and I/O priority are set inside
 * the process while it is still the restorer's (root's, before
 * restoreCreds): the kernel asks nothing then. So they are weighed here
 * as the kernel would have weighed the thread itself (per holder,
 * heldcaps.ts; this node's own snapshot taken at its word): a real-time priority within its RLIMIT_RTPRIO, a negative
 * nice within its RLIMIT_NICE (20 - nice at most), else CAP_SYS_NICE in
 * its effective or permitted set; SCHED_DEADLINE CAP_SYS_NICE; the
 * real-time I/O class CAP_SYS_NICE or CAP_SYS_ADMIN. And as the kernel
 * weighs the restorer, whose seeds make the calls: the same, with its
 * effective set and its own hard limits. Refused in one line naming the
 * thread and what it lacks.
 */
function checkThreadScheduling(image: Image, capEff: bigint, own: Rlimit[]): void {
  const restorerNice = restorerMay(capEff, [SYS_NICE]);
  const restorerIo = restorerMay(capEff, [SYS_NICE, CAP_SYS_ADMIN]);
  const vouched = vouchedFor(image);
  for (const p of image.processes) {
    const rtprio = imageLimit(p, RLIMIT_RTPRIO);
    const niceLimit = imageLimit(p, RLIMIT_NICE);
    const refuse = (who: string, what: string, lacked: string) => {
      throw new AppshotError(`${who}: ${what}, ${lacked}`, ExitCode.denied);
    };
    const byImage = (who: string, what: string, holderMay: boolean, restorerToo: boolean) => {
      if (!holderMay && !vouched) refuse(who, what, 'which the thread could not set itself (its capabilities and limits as the image recorded them): made by this restore, it would give the application more than it had');
      if (!restorerToo) refuse(who, what, 'which this restore may not set (no CAP_SYS_NICE, and its own limits are lower)');
    };
    const autogroup = p.attributes?.autogroupNice ?? 0;
    if (autogroup < 0) {
      const need = BigInt(20 - autogroup);
      byImage(nameProcess(p.vpid, p.comm), `autogroup nice ${autogroup} needs CAP_SYS_NICE or RLIMIT_NICE ${need}`, processMay(p, [SYS_NICE]) || need <= niceLimit, restorerNice || need <= ownHardLimit(own, RLIMIT_NICE));
    }
    for (const t of p.threads) {
      const a = t.attributes;
      if (!a) continue;
      const who = `${nameProcess(p.vpid, p.comm)}${t.vtid === p.vpid ? '' : ` thread ${t.vtid}`}`;
      const nice = threadMay(p, t, [SYS_NICE]);
      const policy = a.schedPolicy & ~SCHED_RESET_ON_FORK;
      if ((policy === SCHED_FIFO || policy === SCHED_RR) && a.schedPriority > 0) {
        const prio = BigInt(a.schedPriority);
        byImage(
          who,
          `${policy === SCHED_FIFO ? 'SCHED_FIFO' : 'SCHED_RR'} priority ${a.schedPriority} needs CAP_SYS_NICE or RLIMIT_RTPRIO ${a.schedPriority} (the image's is ${rtprio})`,
          nice || prio <= rtprio,
          restorerNice || prio <= ownHardLimit(own, RLIMIT_RTPRIO),
        );
      }
      if (a.deadline && !nice) byImage(who, `${showDeadline(a.deadline)} needs CAP_SYS_NICE`, false, restorerNice);
      if (a.nice < 0) {
        const need = BigInt(20 - a.nice);
        byImage(who, `nice ${a.nice} needs CAP_SYS_NICE or RLIMIT_NICE ${need} (the image's is ${niceLimit})`, nice || need <= niceLimit, restorerNice || need <= ownHardLimit(own, RLIMIT_NICE));
      }
      if (a.ioprio !== undefined && a.ioprio >> IOPRIO_CLASS_SHIFT === IOPRIO_CLASS_RT)
        byImage(who, `the real-time I/O class (ioprio 0x${a.ioprio.toString(16)}) needs CAP_SYS_NICE or CAP_SYS_ADMIN`, threadMay(p, t, [SYS_NICE, CAP_SYS_ADMIN]), restorerIo);
    }
  }
}

/** The most bytes a CPU mask of the image may have: the kernel's largest
 * CONFIG_NR_CPUS (8192 CPUs). A snapshot records as many as its node's
 * mask has. */
export const CPU_MASK_BYTES = 1024;

/** What is wrong with a thread's recorded CPU mask, if anything (for
 * validate.ts's "corrupt image" line): whole 64-bit words, at most
 * CPU_MASK_BYTES, at least one CPU. */
export function cpuAffinityFault(mask: Buffer): string | undefined {
  if (mask.length % 8 || mask.length > CPU_MASK_BYTES) return `${mask.length} bytes (whole 8-byte words, at most ${CPU_MASK_BYTES})`;
  if (mask.length && mask.every((b) => b === 0)) return 'empty (no CPU)';
  return undefined;
}

/** The bytes of `mask` this node's kernel reads (sched_setaffinity ignores
 * those past its own mask's size, which is possible CPUs in whole words):
 * what the restore copies into the process's scratch memory. */
function nodeMask(mask: Buffer): Buffer {
  return mask.length > nodeMaskBytes() ? mask.subarray(0, nodeMaskBytes()) : mask;
}

let maskBytes: number | undefined;
function nodeMaskBytes(): number {
  if (maskBytes === undefined) {
    let highest = 0;
    try {
      for (const part of readFileSync('/sys/devices/system/cpu/possible', 'utf8').trim().split(','))
        highest = Math.max(highest, ...part.split('-').map(Number).filter(Number.isInteger));
    } catch {
      highest = CPU_MASK_BYTES * 8 - 1;
    }
    maskBytes = Math.min(CPU_MASK_BYTES, Math.ceil((highest + 1) / 64) * 8);
  }
  return maskBytes;
}

/** Each thread's CPU mask names a CPU this node has online: else the
 * kernel refuses it (EINVAL) late, after the processes were made. */
export function checkCpuAffinities(image: Image): void {
  let online: Set<number> | undefined;
  for (const p of image.processes)
    for (const t of p.threads) {
      const mask = t.attributes?.cpuAffinity;
      if (!mask?.length) continue;
      online ??= onlineCpus();
      const named = [...online].some((cpu) => cpu < mask.length * 8 && (mask[cpu >> 3] >> (cpu & 7)) & 1);
      if (!named)
        throw new AppshotError(`${nameProcess(p.vpid, p.comm)}${t.vtid === p.vpid ? '' : ` thread ${t.vtid}`}: its CPU affinity (cpus ${cpusOf(mask).slice(0, 16).join(',')}) names no CPU this node has online`);
    }
}

/** The CPUs a mask names. */
const cpusOf = (mask: Buffer) => [...mask].flatMap((byte, i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((b) => byte & (1 << b)).map((b) => i * 8 + b));

function onlineCpus(): Set<number> {
  const out = new Set<number>();
  try {
    for (const part of readFileSync('/sys/devices/system/cpu/online', 'utf8').trim().split(',')) {
      const [a, b] = part.split('-').map(Number);
      for (let c = a; c <= (b ?? a); c++) out.add(c);
    }
  } catch {
    for (let c = 0; c < CPU_MASK_BYTES * 8; c++) out.add(c);
  }
  return out;
}

/* ---- restore ---------------------------------------------------------- */

/** `tids[i]`: the restored TID of p.threads[i]. `calls`: a batch of the
 * main thread's with calls of other kinds in it already, which these join
 * and which is run here (one stop for all); its scratch memory is kept.
 * `seedsSlack`: the main thread's timer slack as it is now (seedSlack),
 * read by the caller or else here.
 * Returns what could not be carried and is not worth failing the restore
 * for (the caller says so). */
export function restoreAttributes(r: RemoteProcess, p: Process, tids: number[], calls: CallBatch = (r.reset(), r.batch()), seedsSlack: () => bigint | undefined = () => seedSlack(r.pid)): string[] {
  const notKept: string[] = [];
  const a = p.attributes;
  if (a) setProcValue(r.pid, 'oom_score_adj', Number, a.oomScoreAdj, String(a.oomScoreAdj));
  // Written from here: the file is the process's, its owner's to write.
  if (a?.coredumpFilter !== undefined) setProcValue(r.pid, 'coredump_filter', (text) => parseInt(text, 16), a.coredumpFilter, `0x${a.coredumpFilter.toString(16)}`);
  if (a?.loginuid !== undefined) {
    const note = restoreLoginuid(r, a.loginuid);
    if (note) notKept.push(note);
  }
  if (a?.autogroupNice && p.vsid !== 0) restoreAutogroupNice(r.pid, a.autogroupNice);
  const slack = seedsSlack();
  // One batch (remote.ts): each call names the thread it acts on.
  for (const cmd of MEMBARRIER_REGISTER_COMMANDS)
    if ((a?.membarrierRegistrations ?? 0) & cmd) calls.add(`registering for membarrier command ${cmd}`, SYS.membarrier, [cmd, 0, 0]);
  if (a?.childSubreaper) calls.add('becoming a child subreaper', SYS.prctl, [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0]);
  if (a?.thpDisabled) calls.add('disabling transparent huge pages', SYS.prctl, [PR_SET_THP_DISABLE, 1, 0, 0, 0]);
  calls.add(`setting personality 0x${p.personality.toString(16)}`, SYS.personality, [p.personality]);
  // A standby's seed carries a parent-death SIGKILL (restore/standby.ts);
  // the process's own, if any, is set after the credentials.
  calls.add('clearing the seed\'s parent-death signal', SYS.prctl, [PR_SET_PDEATHSIG, 0, 0, 0, 0]);
  p.threads.forEach((t: Thread, i) => {
    const ta = t.attributes;
    if (!ta) return;
    const tid = tids[i];
    calls.add(`setting nice ${ta.nice} of thread ${t.vtid}`, SYS.setpriority, [PRIO_PROCESS, tid, ta.nice]);
    const param = Buffer.alloc(4);
    param.writeInt32LE(ta.schedPriority);
    if (!ta.deadline) calls.add(`setting scheduling policy ${ta.schedPolicy} of thread ${t.vtid}`, SYS.sched_setscheduler, [tid, ta.schedPolicy, r.put(param)]);
    // A mask naming CPUs this node lacks is cut to those it has; one
    // naming none of them fails.
    if (ta.cpuAffinity?.length) {
      const mask = nodeMask(ta.cpuAffinity);
      calls.add(`setting the CPU affinity of thread ${t.vtid}`, SYS.sched_setaffinity, [tid, mask.length, r.put(mask)]);
    }
    // After the affinity: the kernel admits a deadline thread only on the
    // whole of its root domain, and refuses a narrower mask for one. Here,
    // after every thread and child was made: a deadline thread cannot
    // clone (EAGAIN) unless reset-on-fork. Refused admission (EBUSY: the
    // node's deadline bandwidth is taken) fails the restore, naming it.
    if (ta.deadline) calls.add(`setting ${showDeadline(ta.deadline)} of thread ${t.vtid}`, NR_sched_setattr, [tid, r.put(deadlineAttr(ta.deadline)), 0]);
    // After the policy: clamps set with SCHED_FLAG_KEEP_* leave it as it is.
    if (ta.utilMin !== undefined && ta.utilMax !== undefined && (ta.utilMin !== UTIL_MIN_DEFAULT || ta.utilMax !== UTIL_MAX_DEFAULT)) {
      const attr = Buffer.alloc(SCHED_ATTR_SIZE);
      attr.writeUInt32LE(SCHED_ATTR_SIZE, 0);
      attr.writeBigUInt64LE(BigInt(SCHED_FLAG_KEEP_POLICY | SCHED_FLAG_KEEP_PARAMS | SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX), 8);
      attr.writeUInt32LE(ta.utilMin, 48);
      attr.writeUInt32LE(ta.utilMax, 52);
      // Refused where the kernel has no clamps (EOPNOTSUPP): the restore
      // fails naming them, never comes back unclamped.
      calls.add(`setting utilization clamps ${ta.utilMin}..${ta.utilMax} of thread ${t.vtid}`, NR_sched_setattr, [tid, r.put(attr), 0]);
    }
    if (ta.ioprio !== undefined) calls.add(`setting I/O priority 0x${ta.ioprio.toString(16)} of thread ${t.vtid}`, SYS.ioprio_set, [IOPRIO_WHO_PROCESS, tid, ta.ioprio]);
    // Every thread starts with the main thread's slack, the seed's; a
    // real-time thread's reads 0, which would set the default instead.
    if (i === 0 && ta.timerSlackNs && ta.timerSlackNs !== slack) calls.add(`setting timer slack ${ta.timerSlackNs} ns`, SYS.prctl, [PR_SET_TIMERSLACK, ta.timerSlackNs, 0, 0, 0]);
  });
  // Memory-deny-write-execute last: it cannot be undone, and refuses
  // only new executable memory, which the restore made before (the
  // memory, the batch code this batch runs in).
  // After every mapping the restore makes for the process, which would be
  // locked too; the locked ones of the image are locked again by memory.ts.
  if (a?.lockFuture) calls.add('locking future mappings (mlockall MCL_FUTURE)', SYS.mlockall, [MCL_FUTURE]);
  // Which may take CAP_SYS_RESOURCE: a restore without it fails naming it.
  if (a?.memoryMerge) calls.add('letting KSM merge every mapping (PR_SET_MEMORY_MERGE)', SYS.prctl, [PR_SET_MEMORY_MERGE, 1, 0, 0, 0]);
  if (a?.mdwe) calls.add(`setting memory-deny-write-execute 0x${a.mdwe.toString(16)}`, SYS.prctl, [PR_SET_MDWE, a.mdwe, 0, 0, 0]);
  calls.run();
  // The other threads' timer slack went with their own state
  // (ownTimerSlack, restoreThreadStates). Speculation controls still one
  // thread after the other: a refused one is asked about before it fails
  // the restore, which a round would have to carry, and the node this was
  // measured on refuses every control, so such a round would go untested.
  p.threads.forEach((t: Thread, i) => restoreSpeculation(r, t, tids[i]));
  p.threads.forEach((t: Thread, i) => restoreTaskFlags(r, t, tids[i]));
  return notKept;
}

/**
 * The timer slack of a thread other than the main one (whose own goes
 * with the process's attributes), as a call to run in that thread
 * (PR_SET_TIMERSLACK acts on its caller): with its own state, in all
 * threads at once (restoreThreadStates). Only where it differs from the
 * seed's (`seedsSlack`, seedSlack: what a thread made by the restore
 * starts with). Sound before the scheduling policies are set: the kernel
 * keeps a normal thread's slack when its policy is set; since 6.7 it
 * makes a real-time or deadline thread's 0 and ignores the prctl in one,
 * so that such a thread ends with 0 in either order (and before 6.7 the
 * policy leaves the slack alone).
 */
export function ownTimerSlack(t: Thread, seedsSlack: bigint | undefined): NamedCall[] {
  const slack = t.attributes?.timerSlackNs;
  return slack && slack !== seedsSlack ? [{ what: `setting timer slack ${slack} ns of thread ${t.vtid}`, nr: SYS.prctl, args: [PR_SET_TIMERSLACK, slack, 0, 0, 0] }] : [];
}

/**
 * The personality of a thread other than the main one (whose own is its
 * process's, set with the process's attributes: an image giving the main
 * thread another is refused as corrupt, validate.ts), as a call to run in that
 * thread (personality(2) acts on its caller): with its own state, in all
 * threads at once (restoreThreadStates). Threads are made by clone from
 * the seed's main thread before its personality is set, so each starts
 * with the seed's (`seedsPersonality`, seedPersonality): set where the
 * image's differs, its own or, absent (older images too), its process's
 * (`processPersonality`), which the threads of a process that set it
 * before making them share.
 */
export function ownPersonality(t: Thread, processPersonality: number, seedsPersonality: number | undefined): NamedCall[] {
  const personality = t.attributes?.personality ?? processPersonality;
  return personality === seedsPersonality ? [] : [{ what: `setting personality 0x${personality.toString(16)} of thread ${t.vtid}`, nr: SYS.personality, args: [personality] }];
}

/** The personality every thread of the seed starts with (its main
 * thread's, which clone copies); undefined where this user may not read
 * it: then set anyway. */
export function seedPersonality(pid: number): number | undefined {
  try {
    return parseInt(readFileSync(`/proc/${pid}/personality`, 'utf8'), 16);
  } catch {
    return undefined;
  }
}

/** A thread's machine-check kill policy and rdtsc faulting, each set in
 * the thread itself (the prctls act on their caller), only where the
 * image has them other than a fresh thread's (rare: a stop each). */
function restoreTaskFlags(r: RemoteProcess, t: Thread, tid: number): void {
  const ta = t.attributes;
  const set = (what: string, args: number[]) => {
    const ret = r.raw(SYS.prctl, args, tid);
    if (ret !== 0n) throw new AppshotError(`setting ${what} of thread ${t.vtid}: ${failed(ret)}`);
  };
  if (ta?.mceKill !== undefined) set(`the machine-check kill policy ${ta.mceKill ? 'early' : 'late'} (PR_MCE_KILL)`, [PR_MCE_KILL, PR_MCE_KILL_SET, ta.mceKill, 0, 0]);
  if (ta?.tscSigsegv) set('rdtsc faulting (PR_SET_TSC PR_TSC_SIGSEGV)', [PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0]);
  const policy = ta?.mempolicy;
  if (policy) {
    // A node this machine lacks fails the restore (EINVAL), naming the
    // policy.
    const { mask, maxnode } = mempolicyMask(policy);
    const ret = r.raw(NR_set_mempolicy, [policy.mode, r.put(mask), maxnode], tid);
    if (ret !== 0n) throw new AppshotError(`setting the NUMA memory policy of thread ${t.vtid} (mode 0x${policy.mode.toString(16)}, nodes ${policy.nodes.toString('hex')}): ${failed(ret)}`);
  }
}

/** The sched_attr that sets `dl` (its size VER0: no clamps). */
function deadlineAttr(dl: SchedDeadline): Buffer {
  const attr = Buffer.alloc(SCHED_ATTR_SIZE_VER0);
  attr.writeUInt32LE(SCHED_ATTR_SIZE_VER0, 0);
  attr.writeUInt32LE(SCHED_DEADLINE, 4);
  attr.writeBigUInt64LE(dl.flags & DEADLINE_FLAGS, 8);
  attr.writeBigUInt64LE(dl.runtimeNs, 24);
  attr.writeBigUInt64LE(dl.deadlineNs, 32);
  attr.writeBigUInt64LE(dl.periodNs, 40);
  return attr;
}

/** Whether a thread whose control `which` reads `now` (`byPrctl`: set by
 * a prctl, which can change it, not this node's fixed mitigation) is
 * protected at least as a thread that set `mode` was. */
function protectsAsMuch(which: number, mode: number, now: number, byPrctl: boolean): boolean {
  if (which === L1D_FLUSH) return now === PR_SPEC_ENABLE;
  // Force-disabled: no one may enable it again; so is a fixed mitigation.
  if (mode === PR_SPEC_FORCE_DISABLE) return now === PR_SPEC_FORCE_DISABLE || (now === PR_SPEC_DISABLE && !byPrctl);
  if (mode === PR_SPEC_DISABLE) return now === PR_SPEC_DISABLE || now === PR_SPEC_FORCE_DISABLE;
  // Disabled until exec.
  return now === PR_SPEC_DISABLE || now === PR_SPEC_FORCE_DISABLE || now === PR_SPEC_DISABLE_NOEXEC;
}

/**
 * The speculation controls a thread set (PR_SET_SPECULATION_CTRL), each
 * in the thread itself (the prctl acts on its caller), after the threads
 * are made (a clone copies its maker's): only those the image shows set
 * by prctl to more than a fresh thread has (store bypass or indirect
 * branch speculation disabled, force-disabled or disabled until exec; L1D
 * flushing enabled). A thread's own is all this restore ever sets, so it
 * never gives a thread more than the image had: where this node refuses
 * the control (no prctl mode, ENXIO; EPERM), the restore goes on only if
 * the thread has it anyway (a mitigation this node always applies), and
 * fails naming the thread and the control otherwise.
 */
function restoreSpeculation(r: RemoteProcess, t: Thread, tid: number): void {
  (t.attributes?.speculationCtrl ?? []).forEach((value, which) => {
    if (value < 0 || !(value & PR_SPEC_PRCTL)) return;
    const mode = value & ~PR_SPEC_PRCTL;
    const protective = which === L1D_FLUSH ? mode === PR_SPEC_ENABLE : mode === PR_SPEC_DISABLE || mode === PR_SPEC_FORCE_DISABLE || mode === PR_SPEC_DISABLE_NOEXEC;
    if (!protective) return;
    const name = `${SPECULATION_CONTROLS[which]} speculation control of thread ${t.vtid}`;
    const set = r.raw(SYS.prctl, [PR_SET_SPECULATION_CTRL, which, mode, 0, 0], tid);
    if (set === 0n) return;
    const now = r.raw(SYS.prctl, [PR_GET_SPECULATION_CTRL, which, 0, 0, 0], tid);
    const nowMode = now < 0n ? 0 : Number(now) & ~PR_SPEC_PRCTL;
    if (now >= 0n && protectsAsMuch(which, mode, nowMode, (Number(now) & PR_SPEC_PRCTL) !== 0)) return;
    throw new AppshotError(
      `the ${name} was ${SPECULATION_MODES[mode] ?? `mode 0x${mode.toString(16)}`} (PR_SET_SPECULATION_CTRL), which this node refuses (${failed(set)}); here the thread would be ${now < 0n ? `without it (${failed(now)})` : (SPECULATION_MODES[nowMode] ?? `mode 0x${nowMode.toString(16)}`)}`,
      ExitCode.conflict,
    );
  });
}

/** Writes `written` to the restored process's /proc/PID/`file` where it
 * does not read `want` already (`read`: how its text reads). */
function setProcValue(pid: number, file: string, read: (text: string) => number, want: number, written: string): void {
  const path = `/proc/${pid}/${file}`;
  if (read(readFileSync(path, 'utf8')) === want) return;
  try {
    writeFileSync(path, written);
  } catch (e) {
    throw new Error(`setting ${file} ${written}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

/**
 * The session's autogroup nice. A restored session is the application's
 * own (its leader's setsid, or a placeholder leader's for a session whose
 * leader is gone, or appshot-init's: restore/driver.ts); a process of the
 * terminal's session (vsid 0) is not restored into it, and what that
 * session's autogroup had was never the application's to carry. Written
 * from here, with the restorer's rights: the kernel lets it lower the
 * value (more weight) only with CAP_SYS_NICE or RLIMIT_NICE, so no more
 * than this user may grant; a refusal fails the restore naming it. The
 * kernel takes one such write per 100 ms from a caller without
 * CAP_SYS_ADMIN (EAGAIN): tried again after that. Members of one session
 * share the group: once it holds the value, the others find it so.
 */
function restoreAutogroupNice(pid: number, nice: number): void {
  const path = `/proc/${pid}/autogroup`;
  for (let tries = 0; autogroupNiceOf(pid) !== nice; tries++) {
    try {
      writeFileSync(path, String(nice));
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN' && tries < 20) {
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 25);
        continue;
      }
      throw new AppshotError(`setting the session's autogroup nice ${nice}: ${code ?? (e as Error).message}${code === 'EPERM' ? ' (a lower value needs CAP_SYS_NICE)' : ''}`, code === 'EPERM' ? ExitCode.denied : ExitCode.failure);
    }
  }
}

/** The slack every thread of the seed has (its main thread's, which
 * threads made by clone copy); undefined where this user may not read it
 * (another uid without CAP_SYS_NICE): then set anyway. */
export function seedSlack(pid: number): bigint | undefined {
  try {
    return BigInt(readFileSync(`/proc/${pid}/timerslack_ns`, 'utf8').trim());
  } catch {
    return undefined;
  }
}

/**
 * The audit login uid: a process sets only its own (the kernel refuses a
 * write to another's /proc/PID/loginuid), so the restored process writes
 * it, while it still has the seed's CAP_AUDIT_CONTROL, before its root
 * directory and credentials are its own. Only where it differs from the
 * seed's, which is the restoring user's: the usual case for an ordinary
 * user. Setting it starts a new audit session id, which is not kept.
 */
function restoreLoginuid(r: RemoteProcess, loginuid: number): string | undefined {
  const now = Number(readFileSync(`/proc/${r.pid}/loginuid`, 'utf8'));
  if (now === loginuid) return undefined;
  // No reset: a batch of the caller's may hold scratch memory already.
  const text = String(loginuid);
  const results = r.runCalls([
    { nr: NR_open, args: [r.str('/proc/self/loginuid'), O_WRONLY | O_CLOEXEC, 0] },
    { nr: NR_write, args: [0, r.put(Buffer.from(text)), text.length], firstArgOf: 0 },
    { nr: NR_close, args: [0], firstArgOf: 0 },
  ]);
  const failed = results.find((x) => x < 0n && x > -4096n);
  if (results[0] >= 0n && results.length < 3) r.raw(NR_close, [results[0]]);
  const shown = (uid: number) => (uid === LOGINUID_UNSET ? 'unset' : String(uid));
  // Refused (EPERM): changing a login uid once set needs CAP_AUDIT_CONTROL,
  // which an ordinary user restoring their own image lacks, as does anyone
  // restoring across login sessions (sudo -u, an image from a container).
  // Not a privilege of the process, only who audit says it acts for: the
  // restore goes on with the restoring session's, and says so.
  if (failed === -1n) return `audit login uid ${shown(loginuid)} not set, it is ${shown(now)} (the restoring session's): changing it needs CAP_AUDIT_CONTROL`;
  if (failed !== undefined || results.length < 3)
    throw new Error(`setting the audit login uid ${shown(loginuid)} (it is ${shown(now)} here): errno ${failed === undefined ? '?' : -failed}`);
  return undefined;
}

/** The parent-death signal, after the credentials: the kernel clears it
 * whenever a thread's uids, gids or capabilities change (commit_creds),
 * and before a seccomp filter may refuse prctl. Each acts on the calling
 * thread: run in that thread, the threads but the main one all at once
 * (RemoteProcess.runAtOnce, which never takes the main thread: its exit
 * is reported only once every other thread is reaped): one round trip
 * for up to 64 threads where each took its own. Measured against one
 * plain call per thread in the same run (bench/batch.js threads), the
 * step cost the same at 16 and 64 threads and less at 200. */
export function restoreParentDeathSignals(r: RemoteProcess, p: Process, tids: number[]): void {
  const set = (t: Thread): NamedCall[] => {
    const sig = t.attributes?.pdeathsig;
    return sig ? [{ what: `setting parent-death signal ${sig} of thread ${t.vtid}`, nr: SYS.prctl, args: [PR_SET_PDEATHSIG, sig, 0, 0, 0] }] : [];
  };
  const [main, ...others] = p.threads;
  for (const c of set(main)) r.call(c.what, c.nr, c.args, tids[0]);
  r.runAtOnce(others.map((t, i) => ({ tid: tids[i + 1], calls: set(t) })));
}

/** For `inspect`. */
export function describeAttributes(p: Process): string {
  const a = p.attributes;
  const parts = a ? [`oom_score_adj ${a.oomScoreAdj}`, ...(a.childSubreaper ? ['child subreaper'] : []), ...(a.thpDisabled ? ['THP disabled'] : []), ...(a.autogroupNice ? [`autogroup nice ${a.autogroupNice}`] : [])] : [];
  if (p.personality) parts.push(`personality 0x${p.personality.toString(16)}`);
  const cpus = (mask: Buffer) => [...mask].flatMap((byte, i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((b) => byte & (1 << b)).map((b) => i * 8 + b));
  const t = p.threads.map((th) => {
    const a = th.attributes;
    if (!a) return undefined;
    const affinity = a.cpuAffinity?.length ? ` cpus ${cpus(a.cpuAffinity).join(',')}` : '';
    const slack = a.timerSlackNs !== undefined && a.timerSlackNs !== 50000n ? ` timerslack ${a.timerSlackNs}` : '';
    const clamps = a.utilMin !== undefined && (a.utilMin !== UTIL_MIN_DEFAULT || a.utilMax !== UTIL_MAX_DEFAULT) ? ` uclamp ${a.utilMin}..${a.utilMax}` : '';
    const speculation = (a.speculationCtrl ?? [])
      .map((v, which) => (v > 0 && v & PR_SPEC_PRCTL && v !== (PR_SPEC_PRCTL | (which === L1D_FLUSH ? PR_SPEC_DISABLE : PR_SPEC_ENABLE)) ? ` speculation ${SPECULATION_CONTROLS[which]} ${SPECULATION_MODES[v & ~PR_SPEC_PRCTL] ?? v}` : ''))
      .join('');
    const deadline = a.deadline ? ` ${showDeadline(a.deadline).replace(/,/g, '')}` : '';
    const personality = a.personality !== undefined ? ` personality 0x${a.personality.toString(16)}` : '';
    return `${th.vtid}: nice ${a.nice} policy ${a.schedPolicy}/${a.schedPriority}${deadline}${a.pdeathsig ? ` pdeathsig ${a.pdeathsig}` : ''}${affinity} ioprio 0x${(a.ioprio ?? 0).toString(16)}${slack}${clamps}${speculation}${personality}`;
  });
  // Last, so that what comes before reads the same wherever a login set
  // the uid.
  const more: string[] = [];
  if (a?.loginuid !== undefined && a.loginuid !== LOGINUID_UNSET) more.push(`loginuid ${a.loginuid}`);
  if (a?.membarrierRegistrations) more.push(`membarrier registrations 0x${a.membarrierRegistrations.toString(16)}`);
  if (a?.lockFuture) more.push('mlockall MCL_FUTURE');
  if (a?.mdwe) more.push(`memory-deny-write-execute 0x${a.mdwe.toString(16)}`);
  if (a?.coredumpFilter !== undefined && a.coredumpFilter !== 0x33) more.push(`coredump_filter 0x${a.coredumpFilter.toString(16)}`);
  return [...parts, ...t.filter(Boolean), ...more].join(', ');
}
