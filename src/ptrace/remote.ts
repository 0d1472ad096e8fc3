/**
 * A process being restored, driven from outside: every change is a system
 * call run inside it (trace.c injects them from a `syscall` instruction of
 * its vDSO), with arguments that point into a scratch mapping of ours at an
 * address the image does not use, unmapped again at the end.
 */
import { readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { errnoName } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { addon } from '../native.js';

export const SYS = {
  read: 0,
  write: 1,
  open: 2,
  close: 3,
  lseek: 8,
  ioctl: 16,
  poll: 7,
  mmap: 9,
  mprotect: 10,
  munmap: 11,
  brk: 12,
  rt_sigaction: 13,
  mremap: 25,
  madvise: 28,
  shmat: 30,
  dup2: 33,
  setitimer: 38,
  fork: 57,
  clone: 56,
  fcntl: 72,
  chdir: 80,
  fchdir: 81,
  umask: 95,
  setpgid: 109,
  setsid: 112,
  rt_sigtimedwait: 128,
  rt_sigqueueinfo: 129,
  sigaltstack: 131,
  personality: 135,
  setpriority: 141,
  sched_setscheduler: 144,
  mlockall: 151,
  prctl: 157,
  chroot: 161,
  sched_setaffinity: 203,
  set_tid_address: 218,
  timer_create: 222,
  timer_settime: 223,
  timer_delete: 226,
  exit_group: 231,
  epoll_wait: 232,
  epoll_ctl: 233,
  ioprio_set: 251,
  inotify_add_watch: 254,
  inotify_rm_watch: 255,
  timerfd_create: 283,
  timerfd_settime: 286,
  clock_gettime: 228,
  set_robust_list: 273,
  signalfd4: 289,
  epoll_create1: 291,
  dup3: 292,
  inotify_init1: 294,
  fanotify_init: 300,
  fanotify_mark: 301,
  capget: 125,
  capset: 126,
  setgroups: 116,
  setresuid: 117,
  setresgid: 119,
  socket: 41,
  connect: 42,
  bind: 49,
  listen: 50,
  getsockname: 51,
  socketpair: 53,
  getsockopt: 55,
  accept4: 288,
  rt_tgsigqueueinfo: 297,
  prlimit64: 302,
  membarrier: 324,
  mlock2: 325,
  rseq: 334,
  mq_notify: 244,
  io_setup: 206,
  io_uring_setup: 425,
  io_submit: 209,
  pidfd_open: 434,
  close_range: 436,
  pidfd_getfd: 438,
  mseal: 462,
} as const;

/** System calls injected by this process so far (each one a ptrace round
 * trip, two stops or one): what an operation reports as its cost. */
export const injected = { calls: 0 };

/**
 * Per process (its PID; a thread's calls count as its process's), the
 * value of injected.calls just after the last call injected into it: for
 * a cache of what only the process's own calls change (LiveMaps, its
 * /proc/PID/maps), which a call in another process leaves valid. A fork
 * or clone also counts for the process it makes: its PID may be that of
 * one gone, whose cache would otherwise look current.
 *
 * A resident engine would keep a record for every PID it ever injected
 * into: past RECORDS_KEPT, all are forgotten at once and every process
 * counts as called at that point (`forgottenAt`), which only makes a
 * cache read again.
 */
const lastCalls = new Map<number, number>();
let forgottenAt = 0;
const RECORDS_KEPT = 4096;

/** injected.calls just after the last call injected into process `pid`
 * (0 if none, as far as is remembered). */
export function lastCallInto(pid: number): number {
  return lastCalls.get(pid) ?? forgottenAt;
}

/** Counts one injected call (a batch, a round) into process `pid`. */
export function countCall(pid: number): void {
  injected.calls++;
  noteCalledAt(pid);
}

/** Process `pid` as changed by the last call counted (its own, or the
 * fork that made it), without counting another. */
function noteCalledAt(pid: number): void {
  if (lastCalls.size >= RECORDS_KEPT && !lastCalls.has(pid)) {
    lastCalls.clear();
    forgottenAt = injected.calls;
  }
  lastCalls.set(pid, injected.calls);
}

const CLONE_THREAD = 0x10000n;

/** The same for a process made by a fork or clone (`ret`, its PID, when
 * the call succeeded) of one counted already; not for a thread. Not a
 * call of its own: injected.calls, what an operation reports as its
 * cost, counts the fork once. */
function countMade(c: { nr: number; args: unknown[] }, ret: bigint): void {
  if (!(ret > 0n && ret < 1n << 31n)) return;
  if (c.nr === SYS.fork || (c.nr === SYS.clone && (BigInt(c.args[0] as bigint | number) & CLONE_THREAD) === 0n)) noteCalledAt(Number(ret));
}


export class SyscallError extends Error {
  constructor(
    readonly call: string,
    readonly errno: number,
  ) {
    super(`${call} failed: ${errnoName(errno)}`);
  }
}

// Room for a batch of a few thousand calls and the paths they open.
const SCRATCH_SIZE = 1 << 18;

/* The batch table (trace.c): a header {count, tgid, tid, unused}, then
 * entries {nr, six arguments, result}. */
const BATCH_HEADER = 32;
const BATCH_ENTRY = 64;
/** Bytes of the scratch area the batch code is given, at its start. */
const BATCH_CODE_ROOM = 256;
/** A result no call returns: the entry was not run. */
const NOT_RUN = 0x7fffffffffffffffn;
/** The table's flags: a call that fails does not end the batch. */
const BATCH_KEEP_GOING = 1n;

let batchCodeBytes: { code: Buffer; stoppedAt: number; frameRoom: number } | undefined;
function batchCode(): { code: Buffer; stoppedAt: number; frameRoom: number } {
  batchCodeBytes ??= addon().batchCode();
  if (batchCodeBytes.code.length > BATCH_CODE_ROOM) throw new Error('the batch code does not fit its room');
  return batchCodeBytes;
}

/** The high half of an entry's nr word (trace.c): which earlier entry's
 * result (an index in the same batch: inBatchFrom) goes into which
 * argument; 0n for none. */
function linkOf(c: Pick<BatchCall, 'argFrom' | 'firstArgOf'>): bigint {
  const from = c.argFrom ?? (c.firstArgOf === undefined ? undefined : { call: c.firstArgOf, arg: 0 });
  if (!from) return 0n;
  if (!(from.arg >= 0 && from.arg <= 5)) throw new Error(`a call's argument ${from.arg} cannot take an earlier result`);
  return (BigInt(from.arg) << 48n) | (BigInt(from.call + 1) << 32n);
}

/** The call an argument of `c` is taken from, if one is. */
/** The batch code's table for `calls` run in thread `tid` of process
 * `pid`, written into `into` at `offset` (BATCH_HEADER + a BATCH_ENTRY
 * each): its header, and each call's number with its link, arguments and
 * result slot marked not run. */
function writeBatchTable(into: Buffer, offset: number, calls: BatchCall[], pid: number, tid: number): void {
  into.writeBigUInt64LE(BigInt(calls.length), offset);
  into.writeBigUInt64LE(BigInt(pid), offset + 8);
  into.writeBigUInt64LE(BigInt(tid), offset + 16);
  calls.forEach((c, i) => {
    const e = offset + BATCH_HEADER + i * BATCH_ENTRY;
    into.writeBigUInt64LE(BigInt(c.nr) | linkOf(c), e);
    c.args.forEach((a, j) => into.writeBigUInt64LE(BigInt.asUintN(64, BigInt(a)), e + 8 + j * 8));
    into.writeBigUInt64LE(NOT_RUN, e + 56);
  });
}

const linkedCall = (c: Pick<BatchCall, 'argFrom' | 'firstArgOf'>): number | undefined => c.argFrom?.call ?? c.firstArgOf;

/**
 * Call `c` of a list run in several batches (more than the scratch area
 * holds at once), as the batch starting at call `at` takes it: one that
 * uses the result of a call run in an earlier batch is given that result
 * (`earlier`) as the argument, as the batch code would have copied it
 * (the raw return, -errno too: a call after one that failed fails on
 * what it is given, as in one batch); one that uses a call of its own
 * batch is linked to it counted from that batch's start. A snapshot of a
 * process with 12,000 writable mappings asks for a userfaultfd and then
 * registers each mapping with it: some 1.2 MB of questions, the first
 * 256 KiB of which hold the userfaultfd's (hunt h296: --leave-running was
 * refused, "questions that use earlier answers do not fit the scratch
 * memory together").
 */
function inBatchFrom<T extends { args: unknown[]; argFrom?: { call: number; arg: number }; firstArgOf?: number }>(c: T, at: number, earlier: (call: number) => bigint): T {
  const from = linkedCall(c);
  if (from === undefined || at === 0) return c;
  const arg = c.argFrom?.arg ?? 0;
  const { argFrom: _argFrom, firstArgOf: _firstArgOf, ...rest } = c;
  if (from < at) return { ...rest, args: c.args.map((a, i) => (i === arg ? earlier(from) : a)) } as unknown as T;
  return { ...rest, argFrom: { call: from - at, arg } } as unknown as T;
}

const ARCH_PRCTL = 158;
const SIGTRAP = 5;

/** APPSHOT_NO_BATCH=1: one injected call at a time (for comparison). */
const batchingWanted = () => !process.env.APPSHOT_NO_BATCH;

/** Where the vDSO's first `syscall` instruction is, from its start. */
let syscallOffset: bigint | undefined;

export class RemoteProcess {
  /** Calls are single-stepped (one stop each, not two) while this holds.
   * A step's trap is a forced SIGTRAP, and with SIGTRAP blocked the kernel
   * resets its handler to the default: so only until the process's own
   * handlers are restored. */
  singleStep = true;
  private insn = 0n;
  scratch = 0n;
  /** Bytes of the scratch area. */
  private size = SCRATCH_SIZE;
  /** The scratch area is the preload library's (adoptResident): not ours
   * to unmap, and part of the process's memory like any other. */
  private resident = false;
  private used = 0;
  /** Where the batch code is in the scratch area (0: no batches). */
  private batchCode = 0n;
  /** Pages to unmap before the scratch area (unmapLater). */
  private unmaps: { addr: bigint; length: number }[] = [];
  /** Each thread's batch end (trace.c choose_batch_end: the signal that
   * ends its batches, chosen from one read of its /proc status) as its
   * last batch used it, given back with its next batch, which keeps it
   * unless that signal is pending then: one read per thread per operation,
   * not one per batch. Dropped by a call that changes what it was chosen
   * by (endSignalChanged). */
  private ends = new Map<number, number>();
  /** lastCallInto(pid) after this handle's last call: another since (a
   * fork's handle, an Injector) may have set a handler. */
  private seenCalls = -1;
  /** Calls handed over to run at the start of the next stop (defer). */
  private deferred: { calls: NamedCall[]; then?: (results: bigint[]) => void }[] = [];
  /** Scratch memory the deferred calls' arguments point into: kept by
   * reset() until they ran. */
  private deferredUsed = 0;

  /** Whether batches run from the batch code in the scratch area (one
   * stop each), not one injected call at a time. */
  get batched(): boolean {
    return this.batchCode !== 0n;
  }

  /** `vdso`: where the process's vDSO is, if known (else read from its maps). */
  constructor(
    readonly pid: number,
    vdso?: { start: bigint; end: bigint },
  ) {
    // Without it, looked for at the first call: a handle made for calls
    // that turn out not to be needed costs no read of the maps.
    if (vdso) this.findSyscall(vdso);
  }

  /** The `syscall` instruction to run calls from: in the vDSO, wherever it
   * is now (it moves during a restore). */
  findSyscall(vdso?: { start: bigint; end: bigint }): void {
    let start: bigint, end: bigint;
    if (vdso) ({ start, end } = vdso);
    else {
      const line = readFileSync(`/proc/${this.pid}/maps`, 'utf8')
        .split('\n')
        .find((l) => l.endsWith('[vdso]'));
      if (!line) throw new Error(`process ${this.pid} has no vDSO`);
      [start, end] = line.split(' ')[0].split('-').map((x) => BigInt('0x' + x));
    }
    // Every process has the same vDSO (the kernel's): look once.
    if (syscallOffset === undefined) {
      const at = addon().readMemory(this.pid, start, Number(end - start)).indexOf(Buffer.from([0x0f, 0x05]));
      if (at < 0) throw new Error('no syscall instruction in the vDSO');
      syscallOffset = BigInt(at);
    }
    this.insn = start + syscallOffset;
  }

  /** Runs a system call; returns its raw result. */
  raw(nr: number, args: (bigint | number)[], tid = this.pid): bigint {
    // A seed's signals are blocked from the start of the restore, so the
    // cheaper single-step injection serves, but for fork and clone.
    if (this.deferred.length) this.runDeferred();
    if (!this.insn) this.findSyscall();
    return this.injecting([{ nr, args }], () => {
      const ret = addon().inject(tid, this.insn, nr, args, this.singleStep && nr !== SYS.fork && nr !== SYS.clone);
      countMade({ nr, args }, ret);
      return ret;
    });
  }

  /** Counts `run`, which injects `calls` into this process (one stop, or
   * one round), and keeps the batch ends (`ends`) to what it may have
   * left of them. */
  private injecting<T>(calls: { nr: number; args: unknown[] }[], run: () => T): T {
    // Calls injected into this process through another handle since this
    // one's last: they may have set a handler; the ends are chosen again.
    if (lastCallInto(this.pid) !== this.seenCalls) this.ends.clear();
    countCall(this.pid);
    try {
      return run();
    } finally {
      this.seenCalls = lastCallInto(this.pid);
      this.endSignalChanged(calls);
    }
  }

  /** Runs a system call and throws a SyscallError naming `what` on failure. */
  call(what: string, nr: number, args: (bigint | number)[], tid = this.pid): bigint {
    const r = this.raw(nr, args, tid);
    if (r < 0n && r > -4096n) throw new SyscallError(what, Number(-r));
    return r;
  }

  /**
   * Drops the batch ends (see `ends`) that `calls`, run in this process
   * (or some of them: they may have failed midway), may have made stale.
   * A batch end is chosen by what the process catches, what is pending
   * and the thread's shadow stack. Pending signals trace.c looks at again
   * before every batch (they change from outside at any time). What is
   * caught changes only by rt_sigaction, and only by one of ours: the
   * process is stopped, running nothing of its own, and no process
   * outside shares its handlers (CLONE_SIGHAND needs CLONE_VM, refused
   * between processes at snapshot). A handler set for the signal an end
   * uses makes it stale; so does any while an end fell back to SIGTRAP
   * (none of SIGURG, SIGWINCH, SIGCHLD was free: one may be now). A
   * question (no new action) changes nothing. The shadow stack changes
   * only by arch_prctl, which nothing injects: any drops all.
   */
  private endSignalChanged(calls: { nr: number; args: unknown[] }[]): void {
    if (!this.ends.size) return;
    for (const c of calls) {
      if (c.nr === ARCH_PRCTL) this.ends.clear();
      if (c.nr !== SYS.rt_sigaction || c.args[1] === 0 || c.args[1] === 0n) continue;
      const sig = Number(c.args[0]);
      for (const [tid, end] of this.ends) if ((end & 0xff) === sig || (end & 0xff) === SIGTRAP) this.ends.delete(tid);
    }
  }

  /** Maps the scratch area at `addr` (chosen free in the image and here),
   * executable too where the kernel allows, with the batch code at its
   * start (see batch()). */
  mapScratch(addr: bigint): void {
    const PROT_RW = 3;
    const PROT_RWX = 7;
    const MAP_PRIVATE_ANON_FIXED_NOREPLACE = 0x02 | 0x20 | 0x100000;
    const args = (prot: number) => [addr, SCRATCH_SIZE, prot, MAP_PRIVATE_ANON_FIXED_NOREPLACE, -1, 0];
    let got = batchingWanted() ? this.raw(SYS.mmap, args(PROT_RWX)) : -1n;
    // Refused (memory-deny-write-execute): no batches, one call at a time.
    this.batchCode = got >= 0n || got <= -4096n ? got : 0n;
    if (!this.batchCode) got = this.call('mapping scratch memory', SYS.mmap, args(PROT_RW));
    this.scratch = got;
    this.used = 0;
    if (this.batchCode) {
      const { code } = batchCode();
      addon().writeMemory(this.pid, this.scratch, code);
      this.used = BATCH_CODE_ROOM;
    }
  }

  /** Takes the area at `addr` (anonymous, readable, writable and
   * executable, SCRATCH_SIZE bytes, the process's own already: a seed's,
   * see appshot-init) as the scratch area, with the batch code written at
   * its start: what mapScratch does, without a stop. false (nothing
   * taken) where batches are not wanted: mapScratch then. */
  adoptScratch(addr: bigint): boolean {
    if (!batchingWanted()) return false;
    addon().writeMemory(this.pid, addr, batchCode().code);
    this.scratch = this.batchCode = addr;
    this.used = BATCH_CODE_ROOM;
    return true;
  }

  /**
   * For a process that goes on running after (a snapshot): maps the
   * scratch area where the kernel likes, with the batch code at its start,
   * in one injected call; false (and nothing mapped) where batches cannot
   * be had: APPSHOT_NO_BATCH, or executable memory refused
   * (memory-deny-write-execute). Calls are not single-stepped: the
   * process's own signal handlers are in place.
   */
  mapBatchScratch(): boolean {
    this.singleStep = false;
    if (!batchingWanted()) return false;
    const PROT_RWX = 7;
    const MAP_PRIVATE_ANON = 0x02 | 0x20;
    const got = this.raw(SYS.mmap, [0, SCRATCH_SIZE, PROT_RWX, MAP_PRIVATE_ANON, -1, 0]);
    if (got < 0n && got > -4096n) return false;
    this.scratch = this.batchCode = got;
    addon().writeMemory(this.pid, this.scratch, batchCode().code);
    this.used = BATCH_CODE_ROOM;
    return true;
  }

  /**
   * For a process that goes on running after (a snapshot), instead of
   * mapBatchScratch: takes the batch code and the area for its tables that
   * the preload library already has in the process (`resident`, from
   * windows.ts: residentBatchOf), with no stop, none to unmap them after.
   * false (nothing taken) unless the code there is byte for byte ours and
   * the area is mapped readable and writable (in `maps`): a fault in the
   * batch, every signal blocked, would reset the process's handler. The
   * process must be frozen (no thread of its own changes them meanwhile),
   * and both must be private to it, the area anonymous memory as the
   * library's .bss is: the application could have put a shared mapping
   * there instead, which a process outside it, not frozen, could change
   * between the check and the run, or while the batch runs (its calls,
   * its answers).
   */
  adoptResident(resident: { code: bigint; area: bigint; size: number }, maps: { start: bigint; end: bigint; perms: string; ino: bigint; path: string }[]): boolean {
    this.singleStep = false;
    if (!this.residentUsable(resident, maps, false)) return false;
    this.scratch = resident.area;
    this.batchCode = resident.code;
    this.size = resident.size;
    this.resident = true;
    this.used = 0;
    return true;
  }

  /** Whether `resident` (residentBatchOf) can run batches: batches wanted,
   * the code there byte for byte ours in an executable private mapping,
   * the area large enough and within one readable, writable, private
   * mapping (`maps`) of anonymous memory; with `privateFile`, within
   * adjacent readable, writable, private mappings, anonymous or of a file
   * (see moveToResident). */
  private residentUsable(resident: { code: bigint; area: bigint; size: number }, maps: { start: bigint; end: bigint; perms: string; ino: bigint; path: string }[], privateFile: boolean): boolean {
    if (!batchingWanted()) return false;
    const { code } = batchCode();
    const within = (start: bigint, end: bigint, ok: (m: { perms: string; ino: bigint; path: string }) => boolean) =>
      maps.some((m) => m.start <= start && end <= m.end && m.perms[3] === 'p' && ok(m));
    const areaOk = (m: { perms: string; ino: bigint; path: string }) => m.perms.startsWith('rw') && m.perms[3] === 'p' && (privateFile || (m.ino === 0n && m.path === ''));
    if (!(resident.size >= 4096 + batchCode().frameRoom)) return false;
    if (privateFile) {
      // A restored area is made of several mappings where the image held
      // some of its pages and not others: each piece must be fit, and
      // they must leave no gap.
      let at = resident.area;
      const end = resident.area + BigInt(resident.size);
      for (const m of [...maps].sort((a, b) => (a.start < b.start ? -1 : 1))) {
        if (m.end <= at || m.start > at) continue;
        if (!areaOk(m)) return false;
        at = m.end;
        if (at >= end) break;
      }
      if (at < end) return false;
    } else if (!within(resident.area, resident.area + BigInt(resident.size), areaOk)) return false;
    if (!within(resident.code, resident.code + BigInt(code.length), (m) => m.perms[2] === 'x')) return false;
    try {
      return addon().readMemory(this.pid, resident.code, code.length).equals(code);
    } catch {
      return false;
    }
  }

  /**
   * For a restored process whose memory is all in place (the image's
   * preload library mapped where it was), its signals blocked and its
   * main thread stopped: the batches from here on run from the library's
   * copy of the batch code and table area (`resident`, residentBatchOf)
   * instead of the scratch area, and `calls`, a batch of the main thread
   * that has not run, unmaps the scratch area (first, as nothing in it
   * points there): one stop fewer than unmapping it alone, which cannot be
   * done from a batch running in it (unmapScratch). false (nothing
   * changed) unless the code there is byte for byte ours and the area is
   * mapped readable, writable and private (`maps`, read since the memory
   * was made). Calls deferred with their arguments in the scratch area
   * run before the unmap: at the latest first in `calls`' stop (defer).
   *
   * Unlike a frozen application's (adoptResident), the area may be a
   * private mapping of a file: a clone's or --lazy restore's memory is the
   * page file mapped copy-on-write. What a batch reads there is what we
   * wrote first (its table and arguments, each write making the page the
   * process's own) and the frame the kernel writes; nothing of the process
   * runs meanwhile. The library's area is appshot's, not the program's:
   * what is left in it is what a snapshot's questions leave.
   */
  moveToResident(resident: { code: bigint; area: bigint; size: number }, maps: { start: bigint; end: bigint; perms: string; ino: bigint; path: string }[], calls: CallBatch): boolean {
    if (this.resident || !this.batchCode || !this.scratch || this.unmaps.length) return false;
    if (!this.residentUsable(resident, maps, true)) return false;
    const scratchArea = this.scratch;
    const scratchSize = this.size;
    this.scratch = resident.area;
    this.batchCode = resident.code;
    this.size = resident.size;
    this.resident = true;
    this.used = 0;
    calls.add('unmapping scratch memory', SYS.munmap, [scratchArea, scratchSize]);
    return true;
  }

  /** Where the scratch area is, if mapped: to be left out of what is read
   * of the process's mappings (not the preload library's: that is the
   * process's own). */
  get scratchRange(): { start: bigint; end: bigint } | undefined {
    return this.scratch && !this.resident ? { start: this.scratch, end: this.scratch + BigInt(this.size) } : undefined;
  }

  /** Has `length` bytes at `addr` (a page a question mapped) unmapped by
   * unmapScratch, in one batch with any others, from the scratch area. */
  unmapLater(addr: bigint, length: number): void {
    this.unmaps.push({ addr, length });
  }

  /** Unmaps what unmapLater was given (in one stop), then the scratch
   * area if it is ours. Throws on the first that fails. */
  unmapScratch(): void {
    const unmaps = this.unmaps.splice(0);
    if (unmaps.length && this.scratch) {
      const results = this.runQueries(unmaps.map(({ addr, length }) => ({ nr: SYS.munmap, args: [addr, length] })));
      const failed = results.find((r) => r.ret < 0n && r.ret > -4096n);
      if (failed) throw new SyscallError('unmapping a page the snapshot mapped', Number(-failed.ret));
    }
    if (this.scratch && !this.resident) this.call('unmapping scratch memory', SYS.munmap, [this.scratch, SCRATCH_SIZE]);
    this.scratch = 0n;
    // No batch code is left to run from (its table area gone, or ours
    // unmapped): calls after this are injected one at a time.
    this.batchCode = 0n;
  }

  /** Frees everything put so far (but what deferred calls use). */
  reset(): void {
    this.used = Math.max(this.batchCode && !this.resident ? BATCH_CODE_ROOM : 0, this.deferred.length ? this.deferredUsed : 0);
  }

  /**
   * Hands `calls` over to run at the start of the next stop of the main
   * thread, before the calls of that stop (runCalls of this process, a
   * CallBatch's run), instead of in a stop of their own; `then` is told
   * their results once they ran. Any other injection runs them first, in
   * a stop of their own, so that the process sees every call in the
   * order it was made. The first that fails throws a SyscallError naming
   * it from whatever ran them, and nothing after it runs. Without the
   * batch code, they run now.
   *
   * For calls whose effect nothing looks at before the next stop but
   * the process itself: what is read of the process from outside meanwhile
   * (its memory, /proc) does not see them yet.
   */
  defer(calls: NamedCall[], then?: (results: bigint[]) => void): void {
    if (!calls.length) return;
    if (!this.batchCode) {
      const results = this.runNamed(calls, this.pid);
      then?.(results);
      return;
    }
    this.deferred.push({ calls, then });
    this.deferredUsed = this.used;
  }

  /** Whether calls wait for the next stop (defer). */
  get hasDeferred(): boolean {
    return this.deferred.length > 0;
  }

  /** Runs the deferred calls now, in a stop of their own. */
  runDeferred(): void {
    if (!this.deferred.length) return;
    const taken = this.deferred.splice(0);
    const calls = taken.flatMap((d) => d.calls);
    const results = this.runNamed(calls, this.pid);
    let at = 0;
    for (const d of taken) {
      d.then?.(results.slice(at, at + d.calls.length));
      at += d.calls.length;
    }
  }

  /** Runs named calls; the first that fails throws a SyscallError naming it. */
  private runNamed(calls: NamedCall[], tid: number): bigint[] {
    const results = this.runCalls(calls, tid);
    const last = results.length - 1;
    if (last >= 0 && results[last] < 0n && results[last] > -4096n) throw new SyscallError(calls[last].what, Number(-results[last]));
    if (results.length < calls.length) throw new Error(`a batch of system calls stopped after ${results.length} of ${calls.length}`);
    return results;
  }

  /** Bytes of scratch memory still free for put(). */
  room(): number {
    return this.usable - ((this.used + 15) & ~15);
  }

  /* The scratch area's last bytes (64-byte aligned, as the area is) hold
   * the signal frame of each batch (trace_inject_batch_framed): where the
   * thread goes back to on its own, should appshot die while it runs the
   * batch. Only where there is batch code. */
  private get frameRoom(): number {
    return this.batchCode ? batchCode().frameRoom : 0;
  }

  /** Bytes of the scratch area for what is put there: all but the frame's. */
  private get usable(): number {
    return this.size - this.frameRoom;
  }

  private get frame(): bigint {
    return this.scratch + BigInt(this.usable);
  }

  /** A batch of calls for thread `tid`, run together by its run(). */
  batch(tid = this.pid): CallBatch {
    return new CallBatch(this, tid);
  }

  /**
   * Runs `calls` in order in thread `tid`, stopping at the first that
   * fails; returns the results of those run. With the batch code in the
   * scratch area, as many as fit in it go in one stop (one round trip,
   * where each call alone takes two stops); without it, one at a time.
   * Arguments that point into the scratch area must have been put there
   * before (reset() would free them).
   *
   * `clones`: the calls are clone(CLONE_THREAD | CLONE_PTRACE) calls of a
   * restore, whose new threads are traced from their creation and stop
   * before their first instruction; in a batch (even of one), without
   * stopping the caller at each (trace_inject_batch_clones).
   */
  runCalls(calls: BatchCall[], tid = this.pid, clones = false): bigint[] {
    if (this.deferred.length) {
      // Taken along in this stop when it is the main thread's (as the
      // first calls of the batch), else run first in a stop of their own.
      const waiting = this.deferred.reduce((n, d) => n + d.calls.length, 0);
      const room = Math.floor((this.usable - ((this.used + 15) & ~15) - BATCH_HEADER) / BATCH_ENTRY);
      if (tid !== this.pid || !this.batchCode || clones || waiting + calls.length > room) this.runDeferred();
      else {
        const taken = this.deferred.splice(0);
        const before = taken.flatMap((d) => d.calls);
        const shift = (c: BatchCall): BatchCall =>
          c.argFrom ? { ...c, argFrom: { ...c.argFrom, call: c.argFrom.call + before.length } } : c.firstArgOf !== undefined ? { ...c, firstArgOf: c.firstArgOf + before.length } : c;
        const all = this.runCalls([...before, ...calls.map(shift)], tid);
        const n = Math.min(all.length, before.length);
        const failed = n > 0 && all[n - 1] < 0n && all[n - 1] > -4096n;
        if (failed) throw new SyscallError(before[n - 1].what, Number(-all[n - 1]));
        if (n < before.length) throw new Error(`a batch of system calls stopped after ${n} of ${before.length}`);
        let at = 0;
        for (const d of taken) {
          d.then?.(all.slice(at, at + d.calls.length));
          at += d.calls.length;
        }
        return all.slice(before.length);
      }
    }
    const results: bigint[] = [];
    if (!this.batchCode || (calls.length === 1 && !clones)) {
      for (const c of calls) {
        const from = linkedCall(c);
        const args = from === undefined ? c.args : c.args.map((a, i) => (i === (c.argFrom?.arg ?? 0) ? results[from] : a));
        const r = this.raw(c.nr, args, tid);
        results.push(r);
        if (r < 0n && r > -4096n) break;
      }
      return results;
    }
    const mark = this.used;
    const room = Math.floor((this.usable - ((mark + 15) & ~15) - BATCH_HEADER) / BATCH_ENTRY);
    if (room < 1) throw new Error('scratch memory exhausted');
    for (let at = 0; at < calls.length; at += room) {
      const chunk = calls.slice(at, at + room).map((c) => inBatchFrom(c, at, (k) => results[k]));
      const table = Buffer.alloc(BATCH_HEADER + chunk.length * BATCH_ENTRY);
      writeBatchTable(table, 0, chunk, this.pid, tid);
      const addr = this.put(table);
      this.runBatch(chunk, tid, addr, clones);
      const back = addon().readMemory(this.pid, addr, table.length);
      this.used = mark;
      for (let i = 0; i < chunk.length; i++) {
        const r = BigInt.asIntN(64, back.readBigUInt64LE(BATCH_HEADER + i * BATCH_ENTRY + 56));
        if (r === BigInt.asIntN(64, NOT_RUN)) return results;
        countMade(chunk[i], r);
        results.push(r);
        if (r < 0n && r > -4096n) return results;
      }
    }
    return results;
  }

  /** Runs the batch whose table (of `calls`) is at `table` in thread
   * `tid`, in one stop, with the thread's batch end kept from its last
   * batch (`ends`). */
  private runBatch(calls: { nr: number; args: unknown[] }[], tid: number, table: bigint, clones: boolean): void {
    this.injecting(calls, () => {
      const end = addon().injectBatch(tid, this.batchCode, table, clones, this.frame, this.ends.get(tid) ?? 0);
      if (end) this.ends.set(tid, end);
      else this.ends.delete(tid);
    });
  }

  /** The most threads runAtOnce lets go together: a round's tables (and
   * what its calls point to) fit the scratch area many times over, and
   * its waits scan no longer a list of threads than is worth it. */
  static readonly threadsAtOnce = 64;

  /**
   * Runs each job's calls in its own thread (as runCalls would, one
   * batch each), every thread's at once: all are let go into their
   * batches before any is waited for (trace_inject_batches), so that
   * their stops overlap, where one after the other each thread's cost a
   * scheduler round trip of its own. In rounds of at most threadsAtOnce
   * threads, each counted as one injected call (one round trip). For a
   * process that dies with appshot (a restore's, before its commit):
   * the batches have no frame to go back on should appshot die.
   *
   * Returns each job's results. The first job (in order) whose thread
   * could not run its batch, or one of whose calls failed (a SyscallError
   * naming it), is thrown, once every thread of its round is put back;
   * no round after it runs. Arguments that point into the scratch area
   * must have been put there before, as for runCalls.
   *
   * APPSHOT_THREADS_AT_ONCE=0: one thread after the other (for comparison).
   */
  runAtOnce(jobs: { tid: number; calls: NamedCall[] }[]): bigint[][] {
    const work = jobs.filter((j) => j.calls.length);
    if (process.env.APPSHOT_THREADS_AT_ONCE === '0' || !this.batchCode || work.length < 2) return jobs.map((j) => (j.calls.length ? this.runNamed(j.calls, j.tid) : []));
    this.runDeferred();
    const results = new Map<{ tid: number; calls: NamedCall[] }, bigint[]>();
    const mark = this.used;
    try {
      for (let at = 0; at < work.length; ) {
        // As many threads' tables as fit, side by side, written in one
        // piece and read back in one.
        const base = (this.used + 15) & ~15;
        const round: { job: { tid: number; calls: NamedCall[] }; offset: number }[] = [];
        let bytes = 0;
        while (at + round.length < work.length && round.length < RemoteProcess.threadsAtOnce) {
          const job = work[at + round.length];
          const size = BATCH_HEADER + job.calls.length * BATCH_ENTRY;
          if (base + bytes + size > this.usable) break;
          round.push({ job, offset: bytes });
          bytes += size;
        }
        if (!round.length) throw new Error('scratch memory exhausted');
        const whole = Buffer.alloc(bytes);
        for (const { job, offset } of round) writeBatchTable(whole, offset, job.calls, this.pid, job.tid);
        const addr = this.scratch + BigInt(base);
        addon().writeMemory(this.pid, addr, whole);
        this.used = base + bytes;
        // Where a test has the process die (APPSHOT_TEST_STOP_AT) with
        // everything in place, just before its threads are let go.
        if (at === 0) killPoint('restore: threads at once');
        // The main thread's end, if a batch of it chose one: its signal,
        // for the process's part (what it catches).
        const errors = this.injecting(round.flatMap(({ job }) => job.calls), () =>
          addon().injectBatches(
            this.batchCode,
            round.map(({ job, offset }) => [job.tid, addr + BigInt(offset)]),
            this.ends.get(this.pid) ?? 0,
          ),
        );
        // A thread that could not run its batch is said first: its
        // process may be gone, and its memory with it.
        round.forEach(({ job }, k) => {
          if (!errors[k]) return;
          const name = errnoName(-errors[k]);
          throw Object.assign(new Error(`running a batch of system calls in thread ${job.tid}: ${-errors[k] === constants.errno.ESRCH ? 'the thread is gone' : name}`), { errno: -errors[k], code: name });
        });
        const back = addon().readMemory(this.pid, addr, bytes);
        this.used = mark;
        round.forEach(({ job, offset }) => {
          const got: bigint[] = [];
          for (let i = 0; i < job.calls.length; i++) {
            const r = BigInt.asIntN(64, back.readBigUInt64LE(offset + BATCH_HEADER + i * BATCH_ENTRY + 56));
            if (r === BigInt.asIntN(64, NOT_RUN)) throw new Error(`a batch of system calls stopped after ${i} of ${job.calls.length}`);
            if (r < 0n && r > -4096n) throw new SyscallError(job.calls[i].what, Number(-r));
            got.push(r);
          }
          results.set(job, got);
        });
        at += round.length;
      }
    } finally {
      this.used = mark;
    }
    return jobs.map((j) => results.get(j) ?? []);
  }

  /**
   * Runs every call of `calls` in thread `tid`, each whatever became of
   * those before it (questions, any of which may fail on its own), and
   * returns each one's result and the bytes of its buffer after: `buffer`
   * is copied in first and 'buf' in its arguments is its address. With
   * the batch code (mapBatchScratch), all go in one stop, their buffers
   * and table written and read back in one piece each. `answered` is
   * told each batch's answers as that batch is back, before a later one
   * runs: a later batch's failure leaves the earlier answers known to
   * whoever cleans up (a userfaultfd made in the first, say).
   */
  runQueries(calls: QueryCall[], tid = this.pid, answered?: (first: number, answers: { ret: bigint; out: Buffer }[]) => void): { ret: bigint; out: Buffer }[] {
    if (!this.batchCode) throw new Error('questions are asked in batches only');
    this.runDeferred();
    const mark = this.used;
    const base = (mark + 15) & ~15;
    const answers: { ret: bigint; out: Buffer }[] = [];
    for (let at = 0; at < calls.length; ) {
      // As many as fit: their buffers, then the table.
      let bytes = 0;
      let n = 0;
      while (at + n < calls.length) {
        const more = bytes + (((calls[at + n].buffer?.length ?? 0) + 15) & ~15);
        if (base + more + BATCH_HEADER + (n + 1) * BATCH_ENTRY > this.usable) break;
        bytes = more;
        n++;
      }
      if (!n) throw new Error('scratch memory exhausted');
      const chunk = calls.slice(at, at + n).map((c) => inBatchFrom(c, at, (k) => answers[k].ret));
      // The table through a view of 64-bit words, not Buffer's
      // writeBigUInt64LE: this runs once per process per snapshot, mostly
      // not yet optimised by V8, where each of those calls is JavaScript
      // of its own (measured, interpreted, 40 questions: 340 -> 56 us).
      // `bytes` is a multiple of 16: the table's words are aligned.
      const whole = Buffer.from(new ArrayBuffer(bytes + BATCH_HEADER + n * BATCH_ENTRY));
      const words = new BigUint64Array(whole.buffer, bytes, (BATCH_HEADER + n * BATCH_ENTRY) / 8);
      words[0] = BigInt(n);
      words[1] = BigInt(this.pid);
      words[2] = BigInt(tid);
      words[3] = BATCH_KEEP_GOING;
      let offset = 0;
      const where = chunk.map((c, i) => {
        const e = (BATCH_HEADER + i * BATCH_ENTRY) / 8;
        const addr = this.scratch + BigInt(base + offset);
        if (c.buffer) c.buffer.copy(whole, offset);
        const bufferAt = offset;
        offset += ((c.buffer?.length ?? 0) + 15) & ~15;
        words[e] = BigInt(c.nr) | linkOf(c);
        // A word takes a BigInt modulo 2^64: a negative argument (-1 for
        // "none") is stored as BigInt.asUintN(64, ...) would.
        for (let j = 0; j < c.args.length; j++) {
          const a = c.args[j];
          words[e + 1 + j] = a === 'buf' ? addr : typeof a === 'object' ? addr + BigInt(a.bufAt) : typeof a === 'bigint' ? a : BigInt(a);
        }
        words[e + 7] = NOT_RUN;
        return bufferAt;
      });
      addon().writeMemory(this.pid, this.scratch + BigInt(base), whole);
      this.runBatch(chunk, tid, this.scratch + BigInt(base + bytes), false);
      const back = addon().readMemory(this.pid, this.scratch + BigInt(base), whole.length);
      // The results through a view as well (a copy where the bytes read
      // are not 8-byte aligned).
      const aligned = back.byteOffset % 8 === 0 ? back : new Uint8Array(back);
      const results = new BigInt64Array(aligned.buffer, aligned.byteOffset + bytes, (BATCH_HEADER + n * BATCH_ENTRY) / 8);
      let stopped: number | undefined;
      chunk.forEach((c, i) => {
        if (stopped !== undefined) return;
        const ret = results[(BATCH_HEADER + i * BATCH_ENTRY + 56) / 8];
        if (ret === BigInt.asIntN(64, NOT_RUN)) stopped = i;
        else answers.push({ ret, out: Buffer.from(back.subarray(where[i], where[i] + (c.buffer?.length ?? 0))) });
      });
      // Those that ran are told, even where the batch stopped short.
      answered?.(at, answers.slice(at));
      if (stopped !== undefined) throw new Error(`a batch of questions stopped after ${stopped} of ${chunk.length}`);
      at += n;
    }
    this.used = mark;
    return answers;
  }

  /** Copies bytes into scratch memory; returns their address there. */
  put(data: Buffer): bigint {
    const at = (this.used + 15) & ~15;
    if (at + data.length > this.usable) throw new Error('scratch memory exhausted');
    addon().writeMemory(this.pid, this.scratch + BigInt(at), data);
    this.used = at + data.length;
    return this.scratch + BigInt(at);
  }

  str(s: string): bigint {
    return this.put(Buffer.from(s + '\0'));
  }

  u64s(values: bigint[]): Buffer {
    const b = Buffer.alloc(values.length * 8);
    values.forEach((v, i) => b.writeBigUInt64LE(BigInt.asUintN(64, v), i * 8));
    return b;
  }

  /** Reads back `length` bytes at a scratch address. */
  get(addr: bigint, length: number): Buffer {
    return addon().readMemory(this.pid, addr, length);
  }

  static readonly scratchSize = SCRATCH_SIZE;
}

/** A call of a batch; `firstArgOf`: the index of an earlier call of the
 * same batch whose result is its first argument (replacing args[0]). */
export interface BatchCall {
  nr: number;
  args: (bigint | number)[];
  firstArgOf?: number;
  /** An earlier call of the same batch (`call`, its index) whose result
   * is argument `arg` (0-5) of this one (replacing args[arg]): a
   * descriptor it opened, mapped by this mmap (arg 4), say. */
  argFrom?: { call: number; arg: number };
}

/** A call named for the message if it fails (CallBatch.add's arguments),
 * for one kind to hand to a batch another kind runs. */
export interface NamedCall {
  what: string;
  nr: number;
  args: (bigint | number)[];
  argFrom?: { call: number; arg: number };
}

/** A question for RemoteProcess.runQueries: 'buf' in `args` is the
 * address of `buffer`, copied in before and read back after, and
 * { bufAt: n } the address n bytes into it. */
export interface QueryCall {
  nr: number;
  args: (bigint | number | 'buf' | { bufAt: number })[];
  buffer?: Buffer;
  /** As in BatchCall: an earlier question's result is the first argument. */
  firstArgOf?: number;
  argFrom?: { call: number; arg: number };
}

/**
 * System calls gathered to run together (RemoteProcess.runCalls): each
 * named for the message if it fails.
 */
export class CallBatch {
  private readonly calls: NamedCall[] = [];
  /** What the last run() returned. */
  private results: bigint[] = [];

  constructor(
    private readonly r: RemoteProcess,
    private readonly tid: number,
  ) {}

  /** The result of the call `index` (add's answer) of the last run(),
   * for a caller that added calls to a batch someone else runs. */
  result(index: number): bigint {
    if (index >= this.results.length) throw new Error('a result was read before its batch ran');
    return this.results[index];
  }

  /** Adds a call; returns its index in run()'s results. `argFrom`: an
   * earlier call of this batch whose result is one of its arguments. */
  add(what: string, nr: number, args: (bigint | number)[], argFrom?: { call: number; arg: number }): number {
    this.calls.push(argFrom ? { what, nr, args, argFrom } : { what, nr, args });
    return this.calls.length - 1;
  }

  /** Hands the calls over to run at the start of the main thread's next
   * stop (RemoteProcess.defer; of the main thread's batch only): `then`
   * is told their results, as run() returns them. */
  defer(then?: (results: bigint[]) => void): void {
    if (this.tid !== this.r.pid) throw new Error('only the main thread\'s calls are deferred');
    const calls = this.calls.splice(0);
    this.r.defer(calls, (results) => {
      this.results = results;
      then?.(results);
    });
  }

  get length(): number {
    return this.calls.length;
  }

  /** Runs every call in order; the first that fails throws a SyscallError
   * naming it, and those after it are not run. */
  run(): bigint[] {
    if (!this.calls.length) return [];
    const results = this.r.runCalls(this.calls, this.tid);
    const last = results.length - 1;
    if (last >= 0 && results[last] < 0n && results[last] > -4096n) throw new SyscallError(this.calls[last].what, Number(-results[last]));
    if (results.length < this.calls.length) throw new Error(`a batch of system calls stopped after ${results.length} of ${this.calls.length}`);
    this.calls.length = 0;
    this.results = results;
    return results;
  }
}

/**
 * Adds to `into` the calls that give descriptors of ours to the remote
 * process in the stop they run in: pidfd_open of appshot, pidfd_getfd of
 * each of `ours`, the pidfd closed. Returns, per descriptor, the index of
 * its pidfd_getfd, whose result is the process's copy (close-on-exec, as
 * pidfd_getfd makes it). One place for the hand-over that the batches of
 * the root directory, the working directory and executable, and shared
 * memory make: the pidfd is never left open where the batch succeeds,
 * and a failed one fails a restore whose processes die with it.
 */
export function takeDescriptors(into: CallBatch | NamedCall[], ours: { what: string; fd: number }[]): number[] {
  const add = (c: NamedCall): number => (Array.isArray(into) ? into.push(c) - 1 : into.add(c.what, c.nr, c.args, c.argFrom));
  const pidfd = { call: add({ what: 'pidfd_open of appshot', nr: SYS.pidfd_open, args: [process.pid, 0] }), arg: 0 };
  const taken = ours.map((o) => add({ what: o.what, nr: SYS.pidfd_getfd, args: [-1, o.fd, 0], argFrom: pidfd }));
  add({ what: 'closing the pidfd of appshot', nr: SYS.close, args: [-1], argFrom: pidfd });
  return taken;
}
