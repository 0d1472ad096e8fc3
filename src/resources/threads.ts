/**
 * Threads: registers, FPU/extended state, signal mask and pending signals,
 * TID address, robust futex list, rseq registration, alternate signal
 * stack. Each is per thread in the kernel and none survives a restore by
 * itself (DESIGN.md, "glibc caches each thread's system TID").
 */
import { readFileSync, readlinkSync } from 'node:fs';
import { addon, ENTRY_FLAGS } from '../native.js';
import { procText, readStat } from '../procfs.js';
import { type Image, type Process, type SigAction, type Thread, type Vma, VmaKind } from '../image/types.js';
import type { DumpContext } from './context.js';
import type { FrozenThread } from '../ptrace/freezer.js';
import { NR, PR_GET_TID_ADDRESS } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { type BatchCall, type CallBatch, type NamedCall, RemoteProcess, SyscallError, SYS } from '../ptrace/remote.js';
import { restoreGenerationAddrOf, timedWaitTpoffOf } from '../ptrace/windows.js';
import { type MapsLine, readMaps } from './memory.js';
import { tidMoves } from './mutexes.js';
import { ownPersonality, ownTimerSlack, seedPersonality, seedSlack } from './attributes.js';
import { readPending } from './signals.js';

/** Byte offsets in struct user_regs_struct (x86-64). */
export const REG = { rax: 10 * 8, origRax: 15 * 8, rip: 16 * 8, rsp: 19 * 8, fsBase: 21 * 8 } as const;
const THREAD_FLAG = ENTRY_FLAGS.thread;

/** `regs` were read before any system call was run in the process: those
 * leave an interrupted call rewound, and the image keeps it as it was. */
/** What dumpThread needs of the thread itself, asked with the other
 * kinds' questions: its TID address and its alternate signal stack; and
 * the signal it was caught taking, queued again for it (see askThread). */
export interface ThreadAsked {
  tidAddress: Answer;
  altstack: Answer;
  requeued?: Answer;
  /** The siginfo queued again with `requeued`: the kernel may have kept
   * only its bit (RLIMIT_SIGPENDING reached) and still answered 0. */
  requeuedInfo?: Buffer;
  /** How many more of the requeued real-time signal waited in the
   * thread's queue before it, taken out and queued again behind it (see
   * sameSignalQueued). */
  behind?: number;
}

/** The most of them moved behind it (each two more calls). */
const MAX_BEHIND = 256;
const SIGRTMIN_KERNEL = 32;
const SIGINFO_SIZE = 128;

const SIGCONT = 18;
const SIGSTOP = 19;

/**
 * A thread caught taking a signal (signal-delivery-stop: the kernel has
 * dequeued it, a timer's expiry accounted and the timer re-armed) leaves
 * that stop to run these questions, and the stop's siginfo with it: given
 * back by the detach from any later stop, the signal would come as one
 * from the kernel or the tracer (SI_KERNEL, SI_USER), with no value,
 * timer id or sender. So it is queued again for the thread, by the thread
 * itself (the kernel takes any siginfo a thread sends itself), with its
 * siginfo as it was, while its signals are blocked for the questions:
 * pending, it is taken when the thread goes on, and the image sees it in
 * the thread's queue. SIGSTOP, which no mask holds back and no handler
 * sees, is left to the detach; so is SIGCONT (c3c1f6f), which would not
 * stay pending once any stop signal is sent to the process (the kernel's
 * job control discards it). The batches end with a SIGTRAP now, no stop
 * signal (trace.c); one of the process's own SIGTRAPs a batch takes out
 * of the queue is queued again by the tracer after it.
 */
export function askThread(calls: CallQueue, t: FrozenThread): ThreadAsked {
  const tid = t.tid;
  const requeue = !!(t.signal && t.siginfo && t.signal !== SIGSTOP && t.signal !== SIGCONT);
  const behind = requeue && t.signal >= SIGRTMIN_KERNEL ? sameSignalQueued(tid, t.signal) : [];
  const taken = behind.map(() => calls.ask(SYS.rt_sigtimedwait, ['buf', 0, { bufAt: 8 }, 8], { tid, input: takeOne(t.signal) }));
  const requeued = requeue ? calls.ask(SYS.rt_tgsigqueueinfo, [t.pid, tid, t.signal, 'buf'], { tid, input: t.siginfo }) : undefined;
  behind.forEach((info, i) => calls.ask(SYS.rt_tgsigqueueinfo, [t.pid, tid, taken[i], 'buf'], { tid, input: info }));
  return {
    requeued,
    requeuedInfo: requeue ? t.siginfo : undefined,
    behind: behind.length,
    tidAddress: calls.ask(NR.prctl, [PR_GET_TID_ADDRESS, 'buf'], { tid, outLength: 8 }),
    altstack: calls.ask(NR.sigaltstack, [0, 'buf'], { tid, outLength: 24 }),
  };
}

/**
 * The siginfo of each instance of real-time signal `sig` that waits in
 * thread `tid`'s own queue, in order (none if more than MAX_BEHIND).
 *
 * The kernel delivers one real-time signal's instances in the order they
 * were sent; those waiting were sent after the one caught, but the caught
 * one, queued again, would come after them (a --leave-running original,
 * or an image, took 2 3 ... 8 1 of eight values queued in order). So, in
 * the same batch of questions (askThread), before it is queued again,
 * each is taken out of the queue (rt_sigtimedwait, no wait: the thread's
 * own queue is read first, and they are its first instances), and after
 * it, queued again with the siginfo it had (read here, through ptrace).
 * Each is queued again under the number its take answered: one not taken
 * (the answer an error) is not queued twice (an invalid signal). One
 * batch, so that appshot killed at any instant (kill -9) leaves them all
 * in the queue, in order: the thread runs a batch to its end on its own
 * (trace.c). Where there are no batches (one call at a time), appshot
 * killed between a take and its queueing loses that one.
 */
function sameSignalQueued(tid: number, sig: number): Buffer[] {
  const queued = addon().peekSiginfo(tid, false);
  const infos: Buffer[] = [];
  for (let at = 0; at + SIGINFO_SIZE <= queued.length; at += SIGINFO_SIZE)
    if (queued.readInt32LE(at) === sig) infos.push(Buffer.from(queued.subarray(at, at + SIGINFO_SIZE)));
  return infos.length <= MAX_BEHIND ? infos : [];
}

/** rt_sigtimedwait's set of `sig` (8 bytes), then a timeout of none (16). */
function takeOne(sig: number): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(1n << BigInt(sig - 1));
  return b;
}

/** Once the questions have run (or failed): a caught signal that is
 * queued again is no longer the thread's to be given on resume (it would
 * come twice); one that could not be (the queue full: RLIMIT_SIGPENDING)
 * stays, as before. */
export function settleCaughtSignal(t: FrozenThread, asked: ThreadAsked): void {
  let ret: bigint | undefined;
  try {
    ret = asked.requeued?.ret;
  } catch {
    return; // never answered: the thread's batch did not run
  }
  if (ret !== 0n) return;
  t.signal = 0;
  t.siginfo = undefined;
}

/** The caught signal queued again for the thread (askThread), by its
 * number, with the siginfo it was queued with: a standard one sent with
 * a negative si_code (a timer's, sigqueue's, tgkill's) is kept as its bit
 * alone once the user is at RLIMIT_SIGPENDING, though the call answers 0,
 * and that siginfo is what it had, not the SI_USER a bare bit is taken
 * for (review r450 F2). None if the call failed or never ran: the
 * siginfo then stays the thread's (settleCaughtSignal). */
function caughtRequeued(asked: ThreadAsked): Map<number, Buffer> | undefined {
  const info = asked.requeuedInfo;
  if (!info) return undefined;
  try {
    if (asked.requeued?.ret !== 0n) return undefined;
  } catch {
    return undefined;
  }
  return new Map([[info.readInt32LE(0), info]]);
}

export function dumpThread(ctx: DumpContext, t: FrozenThread, regs: Buffer, asked: ThreadAsked): Thread {
  const a = addon();
  // Read fresh around the peek, as the process's queue is (readPending):
  // the status gathered after the questions (procfs.ts) is older by the
  // dump of every thread before, in which job control may discard a
  // pending stop signal or SIGCONT.
  const point = t.tid === t.pid ? 'snapshot: main thread pending mask read' : 'snapshot: thread pending mask read';
  let pending = readPending(`/proc/${t.pid}/task/${t.tid}/status`, 'SigPnd', () => a.peekSiginfo(t.tid, false), point, caughtRequeued(asked));
  // A signal that was being delivered when the thread stopped is still
  // pending from the application's point of view (one queued again,
  // askThread, is in the queue already).
  if (t.siginfo) pending = Buffer.concat([t.siginfo, pending]);
  const rseq = a.getRseq(t.tid);
  const robust = a.getRobustList(t.tid);
  const tidAddr = asked.tidAddress;
  const alt = asked.altstack;
  const st = readStat(t.tid);
  let wchan = '';
  try {
    wchan = procText(`/proc/${t.pid}/task/${t.tid}/wchan`);
  } catch {
    /* not readable */
  }
  const origRax = regs.readBigInt64LE(REG.origRax);
  let vtid = t.tid === t.pid ? ctx.virtual('pid', t.pid) : ctx.virtual('pid', t.tid);
  if (!vtid && t.tid !== t.pid) {
    vtid = a.mapSystem(ctx.tablesPath, 'pid', t.tid, THREAD_FLAG, t.pid);
    ctx.tablesWritten = true;
  }
  return {
    vtid,
    tid: t.tid,
    regs,
    xstate: a.getXstate(t.tid),
    sigmask: a.getSigmask(t.tid),
    pending,
    tidAddress: tidAddr.ret === 0n ? tidAddr.out.readBigUInt64LE(0) : 0n,
    robustList: robust.head,
    robustListLen: BigInt(robust.length),
    rseq: rseq.pointer ? { pointer: rseq.pointer, size: rseq.size, signature: rseq.signature } : undefined,
    altstack:
      alt.ret === 0n
        ? { sp: alt.out.readBigUInt64LE(0), flags: alt.out.readInt32LE(8), size: alt.out.readBigUInt64LE(16) }
        : undefined,
    state: st?.state ?? '?',
    inSyscall: origRax,
    wchan,
    comm: st?.comm ?? '',
  };
}

/**
 * Where glibc keeps each thread's TID in its thread descriptor, as an
 * offset from the thread pointer (fs_base): the offset at which every
 * thread's descriptor holds that thread's own TID. glibc uses it in
 * pthread_kill, raise and mutex ownership, so a restore writes the new TID
 * there. 0 if there is no such offset (not glibc, or no TLS).
 */
export function findGlibcTidOffset(pid: number, threads: { tid: number; regs: Buffer }[]): number {
  let common: number[] | undefined;
  for (const t of threads) {
    const fsBase = t.regs.readBigUInt64LE(REG.fsBase);
    if (!fsBase) return 0;
    let mem: Buffer | undefined;
    for (const len of [0x1000, 0x800, 0x400])
      try {
        mem = addon().readMemory(pid, fsBase, len);
        break;
      } catch {
        /* the descriptor ends sooner: read less */
      }
    if (!mem) return 0;
    const found: number[] = [];
    // Through a view of 32-bit words (a copy where the bytes are not
    // aligned), not a readInt32LE per word: once per thread per snapshot,
    // in the frozen window, mostly interpreted, the thousand calls took
    // 0.2 ms of the tiny app's window (CPU profile; 640 -> 55 us apart).
    // (Little-endian, as the words are on x86-64.)
    const bytes = mem.byteOffset % 4 === 0 ? mem : new Uint8Array(mem);
    const words = new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length >> 2);
    // The descriptor's first words (tcbhead_t) are pointers, never a TID.
    for (let k = 0x40 / 4; k < words.length; k++) if (words[k] === t.tid) found.push(k * 4);
    common = common ? common.filter((o) => found.includes(o)) : found;
  }
  return common?.[0] ?? 0;
}

/* ---- restore ---------------------------------------------------------- */

const CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000; // VM FS FILES SIGHAND THREAD SYSVSEM
const RSEQ_FLAG_UNREGISTER = 1;
const EINTR = 4n;

const CLONE_PTRACE = 0x2000;

/**
 * The process's other threads, `count` of them, made by clone run in its
 * main thread: all in one batch where the process has the batch code (one
 * stop for all, where each clone alone took three). CLONE_PTRACE has each
 * traced by us from its creation (with exit-kill: it dies with us), and it
 * stops before its first instruction, so no thread runs a thing of the
 * application before its registers are set. Their TIDs are pushed onto
 * `tids` as they are known: a failure part way leaves the threads made
 * there, to be killed with the process and their exits reaped.
 */
export function createThreads(r: RemoteProcess, count: number, tids: number[]): void {
  if (!count) return;
  const clone: BatchCall = { nr: SYS.clone, args: [CLONE_THREAD_FLAGS | CLONE_PTRACE, 0, 0, 0, 0] };
  const results = r.runCalls(Array.from({ length: count }, () => clone), r.pid, true);
  const made = results.filter((t) => t > 0n).map(Number);
  tids.push(...made);
  for (const tid of made) {
    const report = addon().wait(tid, 10_000);
    if (!report || report.kind !== 'stop') throw new Error(`new thread ${tid} did not stop (${report?.kind ?? 'timeout'})`);
    // Made without PTRACE_O_TRACECLONE (see trace_inject_batch_clones).
    addon().killOnExit(tid);
  }
  const failed = results.find((t) => t < 0n && t > -4096n);
  if (failed !== undefined) throw new SyscallError('creating a thread', Number(-failed));
  if (made.length < count) throw new Error(`a batch of clone calls stopped after ${made.length} of ${count}`);
}

/** Drops the seed's rseq registration: its area is about to be unmapped,
 * and the kernel writes to it on every preemption. */
export function unregisterRseq(r: RemoteProcess, tid: number): void {
  const cur = addon().getRseq(tid);
  if (cur.pointer) r.call('unregistering rseq', SYS.rseq, [cur.pointer, cur.size, RSEQ_FLAG_UNREGISTER, cur.signature], tid);
}

const ERESTARTSYS = -512n;
const ERESTARTNOINTR = -513n;
const ERESTARTNOHAND = -514n;
const ERESTART_RESTARTBLOCK = -516n;
const SA_RESTART = 0x10000000n;
const NR_nanosleep = 35n;
const NR_clock_nanosleep = 230n;
const NR_poll = 7n;
const NR_futex = 202n;
/** epoll_wait, epoll_pwait, epoll_pwait2: they end with EINTR, not an
 * -ERESTART code, when a stop (and so a snapshot's freeze) interrupts
 * them. */
const NR_epoll_waits = [232n, 281n, 441n];
/** The socket calls a stop ends with EINTR where the socket has a
 * timeout (SO_RCVTIMEO, SO_SNDTIMEO: signal(7); the kernel's
 * sock_intr_errno): read, write, readv, writev, accept, sendto,
 * recvfrom, sendmsg, recvmsg, accept4, recvmmsg, sendmmsg. tinyproxy
 * sets both on every client and takes the EINTR of a snapshot's freeze
 * for a broken request (400 to a client in the middle of its headers).
 * Not connect: its connection goes on being set up, and the call made
 * again would say EALREADY. */
const NR_socket_timed = [0n, 1n, 19n, 20n, 43n, 44n, 45n, 46n, 47n, 288n, 299n, 307n];
/** The other calls a stop ends with EINTR (signal(7)): semop,
 * rt_sigtimedwait (sigtimedwait, sigwaitinfo), semtimedop, and the
 * socket calls above. A semaphore call's id is made this node's by the
 * restore (blocked.ts). */
const NR_ended_by_stops = [...NR_epoll_waits, 65n, 128n, 220n, ...NR_socket_timed];
const FUTEX_WAIT = 0n;
const FUTEX_WAIT_BITSET = 9n;
/** FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME */
const FUTEX_FLAGS = 128n | 256n;
/** Where user_regs_struct keeps the argument registers read here. */
const ARG = { r10: 7 * 8, rdx: 12 * 8, rsi: 13 * 8, rdi: 14 * 8 } as const;

/** The signal a thread will take first when it resumes, if it has a
 * handler: the lowest-numbered one pending for it (its own queue first,
 * then the process's) and not blocked. */
export function firstHandledSignal(thread: Pick<Thread, 'pending' | 'sigmask'>, sharedPending: Buffer, actions: SigAction[]): SigAction | undefined {
  const numbers = (queue: Buffer) => {
    const out: number[] = [];
    for (let at = 0; at + 128 <= queue.length; at += 128) out.push(queue.readInt32LE(at));
    return out.filter((sig) => !(thread.sigmask & (1n << BigInt(sig - 1)))).sort((a, b) => a - b);
  };
  const sig = numbers(thread.pending)[0] ?? numbers(sharedPending)[0];
  if (sig === undefined) return undefined;
  const action = actions.find((a) => a.signal === sig);
  return action && action.handler > 1n ? action : undefined;
}

/**
 * The registers a thread resumes with, when the snapshot caught it inside
 * a system call (rax holds a kernel-internal -ERESTART* code), decided as
 * the kernel would have at that point:
 *  - a signal with a handler is about to be taken: the call fails with
 *    EINTR (ERESTARTNOHAND, and ERESTARTSYS unless the handler has
 *    SA_RESTART), or restarts once the handler returns;
 *  - otherwise it restarts. A call whose restart needs kernel state of the
 *    thread's own (a relative sleep's remaining time: ERESTART_RESTARTBLOCK)
 *    restarts through restart_syscall where that state is still there (the
 *    same thread, `inPlace`). After a restore, a relative nanosleep or
 *    clock_nanosleep is made again for the time it had left, which the
 *    kernel wrote to its `rem` argument when it stopped (the request's
 *    register then names `rem`: the two may be one buffer anyway); a
 *    futex wait until an absolute instant (FUTEX_WAIT_BITSET) is made
 *    again as it was; poll and a relative FUTEX_WAIT are made again with
 *    their full timeout (see below), and so is a sleep without `rem`
 *    (the preload library makes a program's poll a ppoll and gives its
 *    nanosleep and usleep a `rem`: preload_wait.c; these are for raw and
 *    libc-internal calls),
 *    whose time left nothing shows. ppoll, pselect6 and select stop
 *    with ERESTARTNOHAND, their time left written back to their timeout,
 *    and restart as any other call.
 *  - epoll waits, semop, semtimedop, sigtimedwait, sigwaitinfo and
 *    socket calls on a socket with a timeout (NR_socket_timed) are
 *    never restarted by the kernel: a stop ends them with EINTR at once
 *    (signal(7)), the snapshot's freeze too. One found failed so with no
 *    handled signal to take is the freeze's doing, not the program's: made
 *    again with its full timeout, as poll, here and in the original that
 *    a snapshot leaves running (an epoll wait noted by the preload
 *    library gets its time left: timeLeftOfWaits). (A real signal that
 *    ended it is still pending, and is taken: it stays EINTR; one already
 *    taken left the thread in its handler, not at the call's end. A
 *    signal sigtimedwait waits for is blocked: it stays pending, and the
 *    call made again takes it.) In a process stopped by job control
 *    (`jobStopped`: SIGSTOP, SIGTSTP...) such a call was ended by that
 *    stop, whatever else did: it stays EINTR, which the program sees once
 *    continued, as the kernel has it (made again, a program stopped
 *    and continued around a snapshot went on waiting).
 */
export function resumeRegisters(regs: Buffer, signal?: SigAction, inPlace = false, jobStopped = false): Buffer {
  const out = Buffer.from(regs);
  const orig = out.readBigInt64LE(REG.origRax);
  const rax = out.readBigInt64LE(REG.rax);
  if (orig >= 0n && rax === -EINTR && NR_ended_by_stops.includes(orig)) {
    if (!signal && !jobStopped) {
      out.writeBigInt64LE(orig, REG.rax);
      out.writeBigUInt64LE(out.readBigUInt64LE(REG.rip) - 2n, REG.rip);
    }
    return out;
  }
  if (orig < 0n || ![ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK].includes(rax)) return out;
  const rewind = (nr: bigint) => {
    out.writeBigInt64LE(nr, REG.rax);
    out.writeBigUInt64LE(out.readBigUInt64LE(REG.rip) - 2n, REG.rip);
  };
  const fail = () => out.writeBigInt64LE(-EINTR, REG.rax);
  if (signal && (rax === ERESTARTNOHAND || rax === ERESTART_RESTARTBLOCK || (rax === ERESTARTSYS && !(signal.flags & SA_RESTART)))) fail();
  else if (rax === ERESTART_RESTARTBLOCK) {
    // The futex operation without its flags (private, clock), or -1.
    const futexOp = orig === NR_futex ? out.readBigUInt64LE(ARG.rsi) & ~FUTEX_FLAGS : -1n;
    if (inPlace) rewind(219n /* restart_syscall */);
    else if (orig === NR_nanosleep || orig === NR_clock_nanosleep) {
      // nanosleep(req: rdi, rem: rsi); clock_nanosleep(clock, flags,
      // req: rdx, rem: r10), relative (an absolute one restarts as such).
      const [req, rem] = orig === NR_nanosleep ? [ARG.rdi, ARG.rsi] : [ARG.rdx, ARG.r10];
      // Without rem, the time left shows nowhere: made again for its full
      // request (longer than asked, as a timeout may be; never EINTR
      // with no signal behind it: usleep's callers do not look).
      const left = out.readBigUInt64LE(rem);
      if (left) out.writeBigUInt64LE(left, req);
      rewind(orig);
    } else if (futexOp === FUTEX_WAIT_BITSET) {
      // Its timeout is an absolute instant, still in its arguments: made
      // again as it was (sem_timedwait, pthread_cond_timedwait).
      rewind(orig);
    } else if (orig === NR_poll || futexOp === FUTEX_WAIT) {
      // The kernel kept the instant their timeout ends in the thread's
      // restart block, which nothing outside the thread shows, and when
      // the call began is recorded nowhere, so the time left cannot be
      // had from the snapshot's time either: made again with the full
      // timeout (or none: poll with -1, exact). It may wait longer than
      // asked, which a timeout allows (a loaded machine does as much);
      // EINTR with no signal behind it is not allowed (futex(2) has not
      // woken spuriously since Linux 2.6.22) and is what programs get
      // wrong.
      rewind(orig);
    } else fail();
  } else rewind(orig);
  return out;
}

/** struct appshot_timed_wait (addon/preload/preload.h): the
 * CLOCK_MONOTONIC instant (ns) an epoll wait's timeout ends, 0 for none,
 * then its arguments (epfd, events, maxevents, timeout), the wrapper's
 * stack pointer and the restore generation it was noted in; then the
 * mutex of the condition wait the thread is in (0: none); 8 bytes each. */
const TIMED_WAIT = { deadline: 0, epfd: 8, events: 16, maxevents: 24, timeout: 32, sp: 40, generation: 48, condMutex: 56, size: 64 } as const;

/** Whether process `pid` is in our time namespace (both unknown, on a
 * kernel without them: the same). Not known: taken as another. */
function sameTimeNamespace(pid: number): boolean {
  const ns = (p: string) => {
    try {
      return readlinkSync(`/proc/${p}/ns/time`);
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'none' : undefined;
    }
  };
  const ours = ns('self');
  return ours !== undefined && ours === ns(String(pid));
}

/** The image's mappings whose memory the restore may read or write
 * where an image points it (a thread pointer, a robust list, a futex
 * word): ordinary memory, not [vdso], [vvar] or [vsyscall]. */
const ORDINARY_VMA_KINDS: readonly number[] = [VmaKind.ANON, VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED, VmaKind.SHARED_ANON, VmaKind.SYSV_SHM];
const PROT_READ_ = 1;
const PROT_WRITE_ = 2;

/**
 * Where the restore may touch memory at an address an image gives (the
 * image is untrusted: anyone may have written it): only inside one
 * mapping the image says the process has, readable to read, writable to
 * write, and, to write anything but a robust mutex's words, private (a
 * shared mapping is another process's memory too, or a file's). With the
 * live mappings `live`, the range must lie in one of those as well, with
 * the same permissions: the restore's own scratch memory, or any mapping
 * not the image's, is never touched.
 */
export class ImageMemory {
  constructor(private readonly vmas: readonly Vma[], private readonly live?: MapsLine[]) {}

  /** Whether [addr, addr+len) is covered, without a gap, by mappings of
   * `list` that each pass `ok`: a range may cross from one mapping into
   * the next where the kernel keeps two of the same permissions apart (a
   * restored process's anonymous memory is not always merged again, nor
   * is the image's), as the CPU-time offsets, longer than a page, do. */
  private static covered<M extends { start: bigint; end: bigint }>(list: readonly M[], addr: bigint, len: number, ok: (m: M) => boolean): boolean {
    const end = addr + BigInt(Math.max(len, 1));
    let at = addr;
    while (at < end) {
      const m = list.find((x) => at >= x.start && at < x.end && ok(x));
      if (!m) return false;
      at = m.end;
    }
    return true;
  }

  private inImage(addr: bigint, len: number, ok: (v: Vma) => boolean): boolean {
    return ImageMemory.covered(this.vmas, addr, len, (v) => ORDINARY_VMA_KINDS.includes(v.kind) && ok(v));
  }

  private inLive(addr: bigint, len: number, ok: (perms: string) => boolean): boolean {
    return !this.live || ImageMemory.covered(this.live, addr, len, (m) => ok(m.perms));
  }

  /** [addr, addr+len) may be read. */
  readable(addr: bigint, len: number): boolean {
    return this.inImage(addr, len, (v) => !!(v.prot & PROT_READ_)) && this.inLive(addr, len, (p) => p[0] === 'r');
  }

  /** [addr, addr+len) may be written: in private writable mappings. */
  writablePrivate(addr: bigint, len: number): boolean {
    return this.inImage(addr, len, (v) => !!(v.prot & PROT_WRITE_) && !v.shared) && this.inLive(addr, len, (p) => p[1] === 'w' && p[3] === 'p');
  }

  /** [addr, addr+len) may be written, private or shared: only a robust
   * mutex's futex word and __owner, which the kernel itself writes at a
   * thread's death wherever the robust list points (a mutex shared
   * between processes is the reason robust mutexes exist). */
  writable(addr: bigint, len: number): boolean {
    return this.inImage(addr, len, (v) => !!(v.prot & PROT_WRITE_)) && this.inLive(addr, len, (p) => p[1] === 'w');
  }
}

/** Where glibc's cached TID of a thread lies (its thread pointer plus the
 * image's offset into glibc's thread descriptor), if the restore writes
 * it: neither is 0. */
export function glibcTidAddress(t: Thread, glibcTidOffset: number): bigint | undefined {
  const fsBase = t.regs.length >= REG.fsBase + 8 ? t.regs.readBigUInt64LE(REG.fsBase) : 0n;
  return glibcTidOffset && fsBase ? BigInt.asUintN(64, fsBase + BigInt(glibcTidOffset)) : undefined;
}

/** The offsets findGlibcTidOffset finds: past the descriptor's first
 * pointers, inside its first page, a 4-byte word. */
const isGlibcTidOffset = (o: number) => Number.isInteger(o) && o >= 0x40 && o + 4 <= 0x1000 && o % 4 === 0;

/** An image's glibc TID offset and thread pointers (untrusted input): the
 * restore writes each thread's new TID there where it lies in private
 * writable memory the image gives the process. In a shared writable
 * mapping it is not written (its file or other processes would be), but
 * the image is no less a program's own: glibc puts the descriptor at the
 * top of a stack the program gives the thread (pthread_attr_setstack),
 * which may be MAP_SHARED memory (restoreThreadState says what is not
 * kept). Anywhere else (read-only, or in no mapping of the image) no
 * thread's descriptor can be: the image is corrupt. */
export function checkGlibcTidWrites(p: Process, corrupt: (what: string) => never): void {
  if (!p.glibcTidOffset) return;
  if (!isGlibcTidOffset(p.glibcTidOffset)) corrupt(`process ${p.vpid}'s glibc TID offset ${p.glibcTidOffset} is not one in a thread descriptor`);
  const memory = new ImageMemory(p.vmas);
  for (const t of p.threads) {
    const at = glibcTidAddress(t, p.glibcTidOffset);
    if (at !== undefined && !memory.writable(at, 4))
      corrupt(`thread ${t.vtid}'s glibc TID at 0x${at.toString(16)} is not in writable memory of its process`);
  }
}

/** epoll_wait and epoll_pwait: a timeout in milliseconds (arg 4, r10). */
const NR_epoll_ms_waits = [232n, 281n];

/** Whether a thread's registers `regs` show an epoll wait with its timeout
 * in milliseconds that a stop ended with EINTR (see resumeRegisters). */
function inEpollWait(regs: Buffer): boolean {
  return NR_epoll_ms_waits.includes(regs.readBigInt64LE(REG.origRax)) && regs.readBigInt64LE(REG.rax) === -EINTR && regs.readBigUInt64LE(REG.fsBase) !== 0n;
}

/**
 * At snapshot, for each thread of process `pid` (stopped; mappings
 * `maps`) caught in epoll_wait or epoll_pwait with a timeout: its timeout
 * argument (in `regs`, the image's registers, which the restore makes the
 * call again with) becomes the time that was left when the freeze began,
 * from the instant the preload library's wrapper noted the wait ends
 * (addon/preload/preload_wait.c). The kernel writes nothing back for an
 * epoll wait, so without this it was made again with its whole timeout.
 * Only where the note is for that very call (its arguments are the ones in
 * the registers); rounded up to a millisecond, so never less than was
 * left (more by at most the freeze's own time). The note is the process's
 * memory: read as data, the time left bounded by the call's own timeout.
 */
export function timeLeftOfWaits(pid: number, maps: MapsLine[], regs: Map<number, Buffer>, freezeBegan: bigint): void {
  if (!freezeBegan) return;
  const waiting = [...regs].filter(([, r]) => inEpollWait(r));
  if (!waiting.length) return;
  // freezeBegan is our CLOCK_MONOTONIC, the note the process's: in another
  // time namespace they differ by its offsets. Its calls keep their whole
  // timeout (longer, never shorter).
  if (!sameTimeNamespace(pid)) return;
  const tpoff = timedWaitTpoffOf(pid, maps);
  const genAt = restoreGenerationAddrOf(pid, maps);
  if (tpoff === undefined || genAt === undefined) return;
  let generation: bigint;
  try {
    generation = addon().readMemory(pid, genAt, 8).readBigInt64LE(0);
  } catch {
    return;
  }
  for (const [tid, r] of waiting) {
    let note: Buffer;
    try {
      note = addon().readMemory(pid, BigInt.asUintN(64, r.readBigUInt64LE(REG.fsBase) + tpoff), TIMED_WAIT.size);
    } catch {
      continue;
    }
    // A note from before a restore (its instant of another clock's time),
    // or left by a call the thread jumped out of (siglongjmp from a
    // handler: its stack above the wrapper's), is not this call's.
    if (note.readBigInt64LE(TIMED_WAIT.generation) !== generation) continue;
    if (r.readBigUInt64LE(REG.rsp) >= note.readBigUInt64LE(TIMED_WAIT.sp)) continue;
    const deadline = note.readBigInt64LE(TIMED_WAIT.deadline);
    const timeout = note.readBigInt64LE(TIMED_WAIT.timeout);
    const int = (at: number) => BigInt.asIntN(32, r.readBigUInt64LE(at));
    if (deadline <= 0n || timeout <= 0n || timeout > 0x7fffffffn) continue;
    if (note.readBigInt64LE(TIMED_WAIT.epfd) !== int(ARG.rdi) || note.readBigUInt64LE(TIMED_WAIT.events) !== r.readBigUInt64LE(ARG.rsi) ||
        note.readBigInt64LE(TIMED_WAIT.maxevents) !== int(ARG.rdx) || timeout !== int(ARG.r10))
      continue;
    const leftNs = deadline - freezeBegan;
    let leftMs = leftNs <= 0n ? 0n : (leftNs + 999_999n) / 1_000_000n;
    if (leftMs > timeout) leftMs = timeout;
    const out = Buffer.from(r);
    out.writeBigUInt64LE(leftMs, ARG.r10);
    regs.set(tid, out);
  }
}

/**
 * At restore, before the threads run: the preload library's restore
 * generation is counted up, so that a later snapshot takes no note made
 * before this restore (see timeLeftOfWaits): each holds an instant of the
 * clock before it, and a thread stopped between its note and its call, or
 * that left a call by a jump, would otherwise be given a time left
 * counted from then (none, at once). The note of the epoll wait each
 * thread was caught in is cleared as well (the call is made again with
 * the time left in its registers). The addresses are the library's symbol
 * in the live mappings and the image's thread pointers: each written only
 * inside a writable private mapping, and a failure skips it (the wait may
 * then be given its whole timeout again, never less), not the restore.
 */
export function forgetTimedWaits(pid: number, p: Process, maps: () => MapsLine[]): void {
  const live = maps();
  const memory = new ImageMemory(p.vmas, live);
  const genAt = restoreGenerationAddrOf(pid, live);
  if (genAt !== undefined && memory.writablePrivate(genAt, 8)) {
    try {
      const b = addon().readMemory(pid, genAt, 8);
      b.writeBigInt64LE(BigInt.asIntN(64, b.readBigInt64LE(0) + 1n));
      addon().writeMemory(pid, genAt, b);
    } catch {
      // Left: the notes it would have set aside are matched by their
      // arguments and stack pointer still.
    }
  }
  const waiting = p.threads.filter((t) => inEpollWait(t.regs));
  if (!waiting.length) return;
  const tpoff = timedWaitTpoffOf(pid, live);
  if (tpoff === undefined) return;
  for (const t of waiting) {
    const at = BigInt.asUintN(64, t.regs.readBigUInt64LE(REG.fsBase) + tpoff + BigInt(TIMED_WAIT.deadline));
    if (!memory.writablePrivate(at, 8)) continue;
    try {
      addon().writeMemory(pid, at, Buffer.alloc(8));
    } catch {
      // The generation sets the note aside anyway.
    }
  }
}

/** Per-thread kernel state: TID address, robust list, rseq, alternate
 * stack, name, FPU state, and glibc's cached TID made true again. Each
 * call acts on the calling thread: one batch run in that thread, or, with
 * `calls` (a batch of that thread's, the main thread's, that goes on with
 * other kinds' calls, or restoreThreadStates' gathering), added to it for
 * its caller to run, with scratch memory not reset until it has. */
export function restoreThreadState(r: RemoteProcess, t: Thread, tid: number, glibcTidOffset: number, memory: ImageMemory, calls?: Pick<CallBatch, 'add'>): string | undefined {
  // Neither is touched by the batch code, which uses no FPU and writes no
  // memory of the thread's: set from here, before it runs.
  addon().setXstate(tid, t.xstate);
  // Where the image's thread pointer says: only in private writable memory
  // the image gives the process, and the live process has (an image
  // naming memory not writable was refused already, checkGlibcTidWrites).
  // In shared memory (a stack the program gave the thread) it is left as
  // it was, and said so: the memory is other processes' or a file's too.
  const tidAt = glibcTidAddress(t, glibcTidOffset);
  let notKept: string | undefined;
  if (tidAt !== undefined && memory.writablePrivate(tidAt, 4)) {
    const b = Buffer.alloc(4);
    b.writeInt32LE(tid);
    addon().writeMemory(r.pid, tidAt, b);
  } else if (tidAt !== undefined) {
    const where = memory.writable(tidAt, 4) ? 'is in shared memory (a stack the program gave the thread?), which the restore does not write' : 'is not in writable memory of the process as restored';
    notKept = `thread ${t.vtid}: glibc's cached TID at 0x${tidAt.toString(16)} ${where}: glibc's calls that name the thread by it (pthread_kill) name its old TID`;
  }
  if (!calls) r.reset();
  const own = calls ? undefined : r.batch(tid);
  const batch = calls ?? own!;
  if (t.tidAddress) batch.add('set_tid_address', SYS.set_tid_address, [t.tidAddress]);
  if (t.robustList) batch.add('set_robust_list', SYS.set_robust_list, [t.robustList, t.robustListLen]);
  if (t.rseq) batch.add('registering rseq', SYS.rseq, [t.rseq.pointer, t.rseq.size, 0, t.rseq.signature]);
  if (t.altstack) {
    const ss = Buffer.alloc(24);
    ss.writeBigUInt64LE(t.altstack.sp, 0);
    ss.writeInt32LE(t.altstack.flags & ~1 /* SS_ONSTACK is a state, not a setting */, 8);
    ss.writeBigUInt64LE(t.altstack.size, 16);
    if (t.altstack.flags & 2 /* SS_DISABLE */) ss.writeInt32LE(2, 8);
    batch.add('sigaltstack', SYS.sigaltstack, [r.put(ss), 0]);
  }
  if (t.comm) {
    const PR_SET_NAME = 15;
    batch.add('naming the thread', SYS.prctl, [PR_SET_NAME, r.str(t.comm.slice(0, 15))]);
  }
  own?.run();
  return notKept;
}

/**
 * restoreThreadState for each of `threads` (none the main thread, whose
 * calls go with its own batch), in rounds of RemoteProcess.threadsAtOnce:
 * each round's threads run their calls at once (RemoteProcess.runAtOnce),
 * one scheduler round trip for all where each took one of its own. Their
 * arguments are put in the scratch area round by round, so that no count
 * of threads outgrows it. Each thread's timer slack goes in its batch
 * too (attributes.ts ownTimerSlack): a prctl of its own, which took a
 * stop of its own after the attributes; and its personality
 * (ownPersonality; `personality`: its process's; `seedsSlack`: the main
 * thread's, which they were made with, read before any is set, by the
 * caller or else here). Returns the notes of what was not kept; the
 * first call that fails throws, naming it.
 */
export function restoreThreadStates(r: RemoteProcess, threads: { t: Thread; tid: number }[], glibcTidOffset: number, memory: ImageMemory, personality: number, seedsSlack: () => bigint | undefined = () => seedSlack(r.pid)): string[] {
  const notes: string[] = [];
  if (!threads.length) return notes;
  const slack = seedsSlack();
  const seedsPersonality = threads.length ? seedPersonality(r.pid) : undefined;
  for (let at = 0; at < threads.length; at += RemoteProcess.threadsAtOnce) {
    r.reset();
    const round = threads.slice(at, at + RemoteProcess.threadsAtOnce).map(({ t, tid }) => {
      const calls: NamedCall[] = [];
      const note = restoreThreadState(r, t, tid, glibcTidOffset, memory, {
        add: (what, nr, args, argFrom) => calls.push(argFrom ? { what, nr, args, argFrom } : { what, nr, args }) - 1,
      });
      if (note) notes.push(note);
      calls.push(...ownTimerSlack(t, slack), ...ownPersonality(t, personality, seedsPersonality));
      return { tid, calls };
    });
    r.runAtOnce(round);
  }
  return notes;
}

/** AT_BASE in the auxiliary vector: where the program's interpreter (the
 * dynamic loader) is mapped; 0 for a static program. */
const AT_BASE = 7n;
const PROT_WRITE = 2;
/** glibc's pthread_mutex_t (x86-64): int __lock, unsigned __count, int
 * __owner, unsigned __nusers, int __kind, ...; 40 bytes, 8-aligned. */
const MUTEX = { lock: 0, count: 4, owner: 8, nusers: 12, kind: 16, size: 40 } as const;
/** __kind: the type in its low bits (1 recursive, 2 error-checking), and
 * the robust, priority-inheritance and priority-protect bits, whose lock
 * word holds a TID too (not these). */
const MUTEX_TYPE_MASK = 3;
const MUTEX_RECURSIVE = 1;
const MUTEX_ERRORCHECK = 2;
const MUTEX_ROBUST = 16;
const MUTEX_ROBUST_PI_PP = MUTEX_ROBUST | 32 | 64;
const MUTEX_PI = 32;
const MUTEX_PSHARED = 128;

/**
 * The dynamic loader's locks held across the snapshot, given their
 * holder's new TID. glibc's loader (ld.so, its _rtld_global) guards
 * dlopen, dlsym, dlclose, dl_iterate_phdr (which C++ exceptions unwind
 * through) and thread creation with recursive mutexes that keep their
 * holder's system TID (__owner) and compare it with the thread's cached
 * one, which the restore makes the new TID (restoreThreadState). A thread
 * caught holding one, restored, had its unlock refused (EPERM, which the
 * loader ignores) and waited forever at its next call: a process caught
 * in the preload library's constructor, inside dlsym, never got to main.
 *
 * A held recursive or error-checking mutex in the loader's writable data
 * whose owner is one of the process's threads in the image is given that
 * thread's new TID (`tids`, in the order of `p.threads`). The
 * application's own robust mutexes are found through their holders'
 * robust lists (restoreRobustMutexOwners); its other mutexes, anywhere in
 * its memory, are not looked for (README: not kept). Returns how many
 * were rewritten.
 */
export function restoreLoaderLockOwners(pid: number, p: Process, tids: number[]): number {
  let base = 0n;
  for (let o = 0; o + 16 <= p.mm.auxv.length; o += 16)
    if (p.mm.auxv.readBigUInt64LE(o) === AT_BASE) base = p.mm.auxv.readBigUInt64LE(o + 8);
  const loader = base ? p.vmas.find((v) => v.start <= base && base < v.end && v.path) : undefined;
  if (!loader) return 0;
  const newTid = new Map(p.threads.map((t, i) => [t.tid, tids[i]]));
  let rewritten = 0;
  for (const v of p.vmas) {
    if (v.path !== loader.path || !(v.prot & PROT_WRITE) || v.shared) continue;
    // The loader's data is a few pages; a larger mapping of that name is
    // not its data.
    const length = Number(v.end - v.start);
    if (length > 1 << 20) continue;
    const data = addon().readMemory(pid, v.start, length);
    for (let o = 0; o + MUTEX.size <= length; o += 8) {
      const lock = data.readInt32LE(o + MUTEX.lock);
      if (lock !== 1 && lock !== 2) continue;
      const tid = newTid.get(data.readInt32LE(o + MUTEX.owner));
      if (tid === undefined) continue;
      const kind = data.readInt32LE(o + MUTEX.kind);
      const type = kind & MUTEX_TYPE_MASK;
      if (kind < 0 || kind & MUTEX_ROBUST_PI_PP || (type !== MUTEX_RECURSIVE && type !== MUTEX_ERRORCHECK)) continue;
      if (data.readUInt32LE(o + MUTEX.nusers) === 0 || (type === MUTEX_RECURSIVE && data.readUInt32LE(o + MUTEX.count) === 0)) continue;
      const b = Buffer.alloc(4);
      b.writeInt32LE(tid);
      addon().writeMemory(pid, v.start + BigInt(o + MUTEX.owner), b);
      rewritten++;
    }
  }
  return rewritten;
}

/** The kernel's struct robust_list_head: the list's first entry, the
 * futex word's offset from an entry, the entry being taken or given up. */
const ROBUST_HEAD_SIZE = 24n;
/** The most entries the kernel walks in a dying thread's list (its
 * ROBUST_LIST_LIMIT): an image's list longer than that, or a cycle, is
 * not a list the kernel would have seen through either. */
const ROBUST_LIST_LIMIT = 2048;
/** An entry's low bit: the mutex is priority-inheritance. */
const ROBUST_ENTRY_PI = 1n;
const FUTEX_TID_MASK = 0x3fffffff;
/** glibc's robust list links each mutex by its __list.__next member: the
 * futex word (__lock) is 32 bytes before it (x86-64, struct
 * __pthread_mutex_s), __owner 8 bytes after the word. A list with another
 * offset is not glibc's, and only its futex words are the kernel's ABI. */
const GLIBC_ROBUST_FUTEX_OFFSET = -32n;

/** FUTEX_LOCK_PI and FUTEX_LOCK_PI2 (without FUTEX_FLAGS). */
const FUTEX_LOCK_PIS = [6n, 13n];

/**
 * Whether thread `t`, waiting in the kernel for the robust mutex whose
 * futex word is `word`, gets it under its TID now after all: a
 * priority-inheritance lock (FUTEX_LOCK_PI) is handed over by the kernel,
 * which writes the taker's own TID into the word, not the old one glibc
 * keeps in its frame; and glibc's unlock of a PI mutex of the normal type
 * compares that word (a recursive one compares __owner, which glibc sets
 * from the frame: refused). Only glibc's layout tells the type.
 * test/fixtures/futexwait.c's PI waiters unlock theirs after a restore.
 */
function handedOverByKernel(pid: number, t: Thread, word: bigint, futexOffset: bigint, memory: ImageMemory): boolean {
  if (futexOffset !== GLIBC_ROBUST_FUTEX_OFFSET) return false;
  if (!FUTEX_LOCK_PIS.includes(t.regs.readBigUInt64LE(ARG.rsi) & ~FUTEX_FLAGS)) return false;
  // The kind beside the word, read only where the image's mapping holds it.
  const kindAt = word - BigInt(MUTEX.lock) + BigInt(MUTEX.kind);
  if (!memory.readable(kindAt, 4)) return false;
  const kind = addon().readMemory(pid, kindAt, 4).readInt32LE(0);
  return (kind & MUTEX_TYPE_MASK) === 0;
}

/**
 * At restore, once the threads have their new TIDs (`tids`, in the order
 * of p.threads) and the robust lists were walked: the futex word of each
 * private priority-inheritance mutex a thread was caught waiting to take
 * (FUTEX_LOCK_PI, to be made again) is given its holder's TID now, where
 * it names a TID one of the process's threads had at the snapshot (or
 * before). The kernel attaches a PI waiter to the task the word names: an
 * old TID is no task (ESRCH, on which glibc waits forever) or another's.
 * A mutex that is not robust is in no list, and its holder mends its word
 * only at its next call on it (addon/preload/preload_mutex.c), after the
 * waiter's restarted call. Private only (FUTEX_PRIVATE_FLAG): a shared
 * word may be another process's holder's. Robust ones (the mutex's kind
 * says so) are the robust walk's, which wrote them already. A word that
 * names a thread's TID at this snapshot is that thread's, even if the
 * TID was given to another of its threads now (its word was written
 * before the restore, when no thread had that TID but the holder); one
 * that names an older TID (an earlier restore's) that some thread has now
 * is left, as it may be that thread's. The waiter itself takes the mutex
 * under its TID now (the kernel writes it), and glibc's __owner from the
 * TID it read before (the preload library's condition waits mend that;
 * its mutex calls, at its next one). So is the word of the mutex of a
 * thread blocked on a condition variable (the library's condition wait
 * notes it, TIMED_WAIT.condMutex), where it is a private PI mutex that is
 * not robust: glibc retakes it with FUTEX_LOCK_PI once the thread is
 * woken, which may be before its holder's next call mends it
 * (test/fixtures/condpi.c). The word's address is the image's
 * registers': written only inside a writable private mapping, a failure
 * skipping that word, not the restore.
 */
export function restorePiWaitWords(pid: number, p: Process, tids: number[], liveMaps: () => MapsLine[] = () => readMaps(pid)): void {
  const waiting = p.threads.filter((t) => {
    const op = t.regs.readBigUInt64LE(ARG.rsi);
    return t.regs.readBigInt64LE(REG.origRax) === NR_futex && op & 128n && FUTEX_LOCK_PIS.includes(op & ~FUTEX_FLAGS) && [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK].includes(t.regs.readBigInt64LE(REG.rax));
  });
  if (!p.threads.some((t) => t.regs.readBigInt64LE(REG.origRax) === NR_futex)) return;
  const live = liveMaps();
  const memory = new ImageMemory(p.vmas, live);
  // Threads blocked on a condition variable (in another futex call) whose
  // mutex, noted by the library's condition wait, is a private PI one
  // that is not robust: glibc retakes it with FUTEX_LOCK_PI once woken.
  const words: bigint[] = waiting.map((t) => t.regs.readBigUInt64LE(ARG.rdi));
  const tpoff = timedWaitTpoffOf(pid, live);
  for (const t of tpoff === undefined ? [] : p.threads) {
    if (waiting.includes(t) || t.regs.readBigInt64LE(REG.origRax) !== NR_futex || t.regs.readBigUInt64LE(REG.fsBase) === 0n) continue;
    const noteAt = BigInt.asUintN(64, t.regs.readBigUInt64LE(REG.fsBase) + tpoff! + BigInt(TIMED_WAIT.condMutex));
    if (!memory.writablePrivate(noteAt, 8)) continue;
    try {
      const m = addon().readMemory(pid, noteAt, 8).readBigUInt64LE(0);
      if (!m || m & 3n || !memory.writablePrivate(m, MUTEX.size)) continue;
      const kind = addon().readMemory(pid, m + BigInt(MUTEX.kind), 4).readInt32LE(0);
      if (kind >= 0 && kind & MUTEX_PI && !(kind & (MUTEX_ROBUST | MUTEX_PSHARED))) words.push(m + BigInt(MUTEX.lock));
    } catch {
      // No note read: the thread is left as before.
    }
  }
  if (!words.length) return;
  const moved = new Map(tidMoves(p.threads, tids).map((m) => [m.oldTid, m.newTid]));
  const atSnapshot = new Set(p.threads.map((t) => t.tid));
  const now = new Set(tids);
  for (const at of new Set(words)) {
    if (at & 3n || !memory.writablePrivate(at, 4)) continue;
    try {
      const word = addon().readMemory(pid, at, 4).readUInt32LE(0);
      const tid = word & FUTEX_TID_MASK;
      const to = moved.get(tid);
      if (!tid || to === undefined || (!atSnapshot.has(tid) && now.has(tid))) continue;
      // glibc's mutex: its kind four words on (a raw PI futex word may have
      // no kind beside it: read only where the mapping holds it).
      if (memory.readable(at + BigInt(MUTEX.kind - MUTEX.lock), 4) &&
          addon().readMemory(pid, at + BigInt(MUTEX.kind - MUTEX.lock), 4).readInt32LE(0) & MUTEX_ROBUST) continue;
      const b = Buffer.alloc(4);
      b.writeUInt32LE(((word & ~FUTEX_TID_MASK) | to) >>> 0);
      addon().writeMemory(pid, at, b);
    } catch {
      // Left as it was: the waiter's call may fail as it would have.
    }
  }
}

/**
 * What a restore's robust-list walks have rewritten in memory that
 * processes share, by what the memory is (device, inode and offset in the
 * object, the same in every process that maps it), each word with the
 * value it held before. Each process's words are read before any is
 * written, but the processes are restored one after another: a mutex in
 * shared memory held by one process restored first holds its holder's new
 * TID when the next process's walk reads it, which may be a TID one of the
 * next process's threads had at the snapshot (another thread's list_op_
 * pending names the mutex it waits for). Such a walk compares with the
 * value the word had in the image, kept here, not with the live one.
 */
export class RobustWordsRewritten {
  private readonly before = new Map<string, number>();

  /** Where in which shared object an address of process `pid` lies, if
   * in one of its shared mappings `vmas` (the image's, known here; the
   * live object from /proc/PID/maps, read only when a word is in one). */
  identities(pid: number, vmas: readonly Vma[]): (addr: bigint) => string | undefined {
    let shared: { start: bigint; end: bigint; offset: bigint; object: string }[] | undefined;
    return (addr) => {
      if (!vmas.some((v) => v.shared && addr >= v.start && addr < v.end)) return undefined;
      shared ??= readFileSync(`/proc/${pid}/maps`, 'utf8')
        .split('\n')
        .map((line) => line.match(/^([0-9a-f]+)-([0-9a-f]+) \S\S\Ss ([0-9a-f]+) (\S+) (\d+)/))
        .filter((m) => m !== null)
        .map((m) => ({ start: BigInt(`0x${m[1]}`), end: BigInt(`0x${m[2]}`), offset: BigInt(`0x${m[3]}`), object: `${m[4]}:${m[5]}` }));
      const v = shared.find((v) => addr >= v.start && addr < v.end);
      return v && `${v.object}:${v.offset + (addr - v.start)}`;
    };
  }

  /** The value the word `key` names had before this restore rewrote it. */
  original(key: string | undefined): number | undefined {
    return key === undefined ? undefined : this.before.get(key);
  }

  /** Word `key` held `value` before this restore rewrote it (the first
   * rewrite's is kept: the image's). */
  rewrote(key: string | undefined, value: number): void {
    if (key !== undefined && !this.before.has(key)) this.before.set(key, value);
  }
}

/**
 * The robust mutexes each thread held at the snapshot, given its new TID.
 * A robust or priority-inheritance mutex keeps its holder's TID in its
 * futex word, which the kernel reads: a thread that dies holding one has
 * it marked owner-dead (EOWNERDEAD to the next locker) only where the
 * word holds the dying thread's TID, and a PI waiter attaches to the task
 * the word names (a stale TID: ESRCH, on which glibc waits forever or
 * asserts). glibc also keeps it in __owner, which unlock compares with
 * the thread's TID (a stale one: EPERM, the mutex never given up).
 *
 * Exact, not a search: every robust mutex a thread holds is linked in its
 * robust list (set_robust_list, which the restore has registered again
 * at the same address), and the one it was taking or giving up when
 * caught is its list_op_pending. Walked as the kernel walks it when the
 * thread exits (each entry's word rewritten only where its TID bits are
 * the thread's old TID, the waiters and owner-died bits kept), bounded
 * and cycle-safe, since the image is untrusted; a pointer that cannot be
 * read ends the walk, as it does the kernel's. __owner is rewritten only
 * in glibc's layout (its futex offset, and a __kind with the robust bit),
 * and only where it holds the old TID (a mutex being taken has not set it
 * yet). Every word is read before any is written, so
 * that one thread's new TID is never taken for another's old one; a word
 * in memory shared with a process restored before is compared as it was
 * in the image (`rewritten`, the restore's record of such words).
 * Mutexes that are not robust are listed nowhere (README: not kept).
 *
 * One thing cannot be mended: a thread caught waiting in a futex call for
 * the mutex its list_op_pending names (another thread's) holds its old
 * TID in glibc's lock function's own frame across the wait, and takes the
 * mutex under it once it is free (its unlock then refused, its death not
 * seen by the kernel). Returned as a note for each such thread.
 */
export function restoreRobustMutexOwners(pid: number, p: Process, tids: number[], rewritten: RobustWordsRewritten, liveMaps: () => MapsLine[] = () => readMaps(pid)): string[] {
  const a = addon();
  // Every address here is the image's (its list heads, and what its memory
  // links from them): read only inside its readable mappings, written only
  // inside its writable ones (see ImageMemory.writable). The live mappings
  // are read once, by the first thread with a list to walk.
  let known: ImageMemory | undefined;
  const memory = () => (known ??= new ImageMemory(p.vmas, liveMaps()));
  const outside = (addr: bigint) => new Error(`0x${addr.toString(16)} is not in the image's memory`);
  const read64 = (addr: bigint): bigint => {
    if (!memory().readable(addr, 8)) throw outside(addr);
    return a.readMemory(pid, addr, 8).readBigUInt64LE(0);
  };
  const identity = rewritten.identities(pid, p.vmas);
  /** A word as the image had it: in shared memory another process's walk
   * rewrote, the value before. */
  const read32 = (addr: bigint): number => {
    if (!memory().readable(addr, 4)) throw outside(addr);
    return rewritten.original(identity(addr)) ?? a.readMemory(pid, addr, 4).readUInt32LE(0);
  };
  /** Each word to write: its new value and the value it had. */
  const writes = new Map<bigint, { value: number; was: number }>();
  const notes: string[] = [];
  p.threads.forEach((t, i) => {
    const oldTid = t.tid;
    const newTid = tids[i];
    if (!t.robustList || t.robustListLen !== ROBUST_HEAD_SIZE || newTid === undefined || newTid === oldTid) return;
    const head = t.robustList;
    const rewrite = (entry: bigint, futexOffset: bigint): void => {
      const word = BigInt.asUintN(64, (entry & ~ROBUST_ENTRY_PI) + futexOffset);
      if (word & 3n || writes.has(word)) return;
      const value = read32(word);
      if ((value & FUTEX_TID_MASK) !== oldTid) return;
      // A word of the thread's that the kernel could not write either ends
      // its walk, as the kernel's (outside the image's writable memory).
      if (!memory().writable(word, 4)) throw outside(word);
      writes.set(word, { value: ((value & ~FUTEX_TID_MASK) | newTid) >>> 0, was: value });
      if (futexOffset !== GLIBC_ROBUST_FUTEX_OFFSET) return;
      const kindAt = word - BigInt(MUTEX.lock) + BigInt(MUTEX.kind);
      if (!memory().readable(kindAt, 4)) return;
      const kind = a.readMemory(pid, kindAt, 4).readInt32LE(0);
      if (!(kind & MUTEX_ROBUST)) return;
      const owner = word + BigInt(MUTEX.owner - MUTEX.lock);
      if (!memory().writable(owner, 4)) return;
      const was = read32(owner);
      if ((was | 0) === oldTid) writes.set(owner, { value: newTid, was });
    };
    try {
      if (!memory().readable(head, Number(ROBUST_HEAD_SIZE))) throw outside(head);
      const h = a.readMemory(pid, head, Number(ROBUST_HEAD_SIZE));
      const futexOffset = h.readBigInt64LE(8);
      const pending = h.readBigUInt64LE(16);
      const seen = new Set<bigint>();
      let entry = h.readBigUInt64LE(0);
      // The kernel reads each entry's next before it handles the entry,
      // and leaves the pending one to the end.
      // The end is the head, as the kernel sees it: with the PI bit
      // stripped (a list that ends in the head's address | 1 ends there).
      for (let n = 0; (entry & ~ROBUST_ENTRY_PI) !== head && n < ROBUST_LIST_LIMIT; n++) {
        const at = entry & ~ROBUST_ENTRY_PI;
        if (seen.has(at)) break;
        seen.add(at);
        const next = read64(at);
        if (entry !== pending) rewrite(entry, futexOffset);
        entry = next;
      }
      if (pending) {
        rewrite(pending, futexOffset);
        const word = BigInt.asUintN(64, (pending & ~ROBUST_ENTRY_PI) + futexOffset);
        const waiting = t.inSyscall === NR_futex && t.regs.readBigUInt64LE(ARG.rdi) === word;
        if (waiting && (read32(word) & FUTEX_TID_MASK) !== oldTid && !handedOverByKernel(pid, t, word, futexOffset, memory()))
          notes.push(`thread ${t.vtid} was waiting for the robust mutex at 0x${word.toString(16)}: it takes it under its old TID (its unlock is refused)`);
      }
    } catch {
      /* a pointer into nothing: the walk ends there, as the kernel's */
    }
  });
  for (const [addr, { value, was }] of writes) {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value >>> 0);
    try {
      a.writeMemory(pid, addr, b);
      rewritten.rewrote(identity(addr), was);
    } catch {
      /* made read-only since: the kernel could not mark it either, nor
       * the holder give it up */
    }
  }
  return notes;
}

/**
 * The robust futex lists of an application that a snapshot ends, emptied
 * just before its kill, where a robust mutex a thread holds lies in a file
 * mapped shared. The kernel walks a dying thread's robust list and marks
 * each mutex whose futex word holds the thread's TID owner-dead (the word
 * becomes FUTEX_OWNER_DIED with the waiters bit, and no TID) and wakes a
 * waiter. But the application does not die there: it goes on in its
 * image. A word in memory the image holds (the process's own, shared
 * anonymous memory, a SysV segment) comes back as the image has it, and
 * the marking dies with the old process. A file mapped shared (a POSIX shm
 * object in /dev/shm, a database's file) is not in the image: the restore
 * maps it as it is, and found the mutex owner-dead although its holder
 * lives on; its waiter took it with EOWNERDEAD, and the holder's unlock was
 * refused (EPERM: the word names no one, so restoreRobustMutexOwners had
 * no old TID to replace).
 *
 * Only a thread with an entry (or the pending one) whose word is in a
 * shared file mapping of its process is touched: its list head is made
 * empty (its next pointing at itself, no pending entry), so the kernel's
 * walk finds nothing. That head is the thread's own memory (glibc's is in
 * its thread descriptor), which dies with it a moment later; the image
 * holds it as it was. A head that is itself in a shared mapping is left
 * alone: emptying it would change what outlives the process. The walk is
 * the kernel's, bounded and cycle-safe as restoreRobustMutexOwners'; a
 * pointer that cannot be read ends it. Returns how many lists were
 * emptied.
 *
 * The translation tables, which every process maps shared, do not count:
 * the freezer lets no thread stay stopped holding their lock, and the
 * restore makes new ones. A process with no other file mapped shared
 * (most) is not looked at: no read per thread.
 */
export function disarmRobustLists(image: Pick<Image, 'processes' | 'tablesPath'>): number {
  const a = addon();
  let emptied = 0;
  for (const p of image.processes) {
    const files = p.vmas.filter((v) => v.kind === VmaKind.FILE_SHARED && v.path !== image.tablesPath);
    if (!files.length) continue;
    const inFile = (addr: bigint) => files.some((v) => addr >= v.start && addr < v.end);
    const inShared = (addr: bigint) => p.vmas.some((v) => v.shared && addr >= v.start && addr < v.end);
    for (const t of p.threads) {
      if (!t.robustList || t.robustListLen !== ROBUST_HEAD_SIZE) continue;
      const head = t.robustList;
      let h: Buffer;
      try {
        h = a.readMemory(p.pid, head, Number(ROBUST_HEAD_SIZE));
      } catch {
        continue; /* the kernel cannot read it either */
      }
      const futexOffset = h.readBigInt64LE(8);
      const pending = h.readBigUInt64LE(16);
      const wordOf = (entry: bigint) => BigInt.asUintN(64, (entry & ~ROBUST_ENTRY_PI) + futexOffset);
      let holdsInFile = pending !== 0n && inFile(wordOf(pending));
      const seen = new Set<bigint>();
      try {
        let entry = h.readBigUInt64LE(0);
        for (let n = 0; !holdsInFile && (entry & ~ROBUST_ENTRY_PI) !== head && n < ROBUST_LIST_LIMIT; n++) {
          const at = entry & ~ROBUST_ENTRY_PI;
          if (seen.has(at)) break;
          seen.add(at);
          holdsInFile = inFile(wordOf(entry));
          entry = a.readMemory(p.pid, at, 8).readBigUInt64LE(0);
        }
      } catch {
        /* a pointer into nothing: the kernel's walk ends there too */
      }
      if (!holdsInFile || inShared(head)) continue;
      const empty = Buffer.from(h);
      empty.writeBigUInt64LE(head, 0);
      empty.writeBigUInt64LE(0n, 16);
      try {
        a.writeMemory(p.pid, head, empty);
        emptied++;
      } catch {
        /* read-only: the kernel's walk marks as before */
      }
    }
  }
  return emptied;
}
