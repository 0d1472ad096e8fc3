/**
 * A process being restored, driven from outside: every change is a system
 * call run inside it (trace.c injects them from a `syscall` instruction of
 * its vDSO), with arguments that point into a scratch mapping of ours at an
 * address the image does not use, unmapped again at the end.
 */
import { readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { addon } from '../native.js';

export const SYS = {
  read: 0,
  write: 1,
  open: 2,
  close: 3,
  lseek: 8,
  ioctl: 16,
  mmap: 9,
  mprotect: 10,
  munmap: 11,
  brk: 12,
  rt_sigaction: 13,
  mremap: 25,
  shmat: 30,
  dup2: 33,
  setitimer: 38,
  fork: 57,
  clone: 56,
  fcntl: 72,
  chdir: 80,
  umask: 95,
  setpgid: 109,
  setsid: 112,
  rt_sigtimedwait: 128,
  rt_sigqueueinfo: 129,
  sigaltstack: 131,
  personality: 135,
  setpriority: 141,
  sched_setscheduler: 144,
  prctl: 157,
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
  set_robust_list: 273,
  signalfd4: 289,
  epoll_create1: 291,
  dup3: 292,
  inotify_init1: 294,
  rt_tgsigqueueinfo: 297,
  prlimit64: 302,
  rseq: 334,
  pidfd_open: 434,
  close_range: 436,
  pidfd_getfd: 438,
} as const;

/** System calls injected by this process so far (each one a ptrace round
 * trip, two stops or one): what an operation reports as its cost. */
export const injected = { calls: 0 };

const errnoName = new Map(Object.entries(constants.errno).map(([k, v]) => [v, k]));

export class SyscallError extends Error {
  constructor(
    readonly call: string,
    readonly errno: number,
  ) {
    super(`${call} failed: ${errnoName.get(errno) ?? `errno ${errno}`}`);
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

let batchCodeBytes: { code: Buffer; stoppedAt: number } | undefined;
function batchCode(): { code: Buffer; stoppedAt: number } {
  batchCodeBytes ??= addon().batchCode();
  if (batchCodeBytes.code.length > BATCH_CODE_ROOM) throw new Error('the batch code does not fit its room');
  return batchCodeBytes;
}

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
  private used = 0;
  /** Where the batch code is in the scratch area (0: no batches). */
  private batchCode = 0n;

  constructor(readonly pid: number) {
    this.findSyscall();
  }

  /** The `syscall` instruction to run calls from: in the vDSO, wherever it
   * is now (it moves during a restore). */
  findSyscall(): void {
    const line = readFileSync(`/proc/${this.pid}/maps`, 'utf8')
      .split('\n')
      .find((l) => l.endsWith('[vdso]'));
    if (!line) throw new Error(`process ${this.pid} has no vDSO`);
    const [start, end] = line.split(' ')[0].split('-').map((x) => BigInt('0x' + x));
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
    injected.calls++;
    return addon().inject(tid, this.insn, nr, args, this.singleStep && nr !== SYS.fork && nr !== SYS.clone);
  }

  /** Runs a system call and throws a SyscallError naming `what` on failure. */
  call(what: string, nr: number, args: (bigint | number)[], tid = this.pid): bigint {
    const r = this.raw(nr, args, tid);
    if (r < 0n && r > -4096n) throw new SyscallError(what, Number(-r));
    return r;
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

  unmapScratch(): void {
    if (this.scratch) this.call('unmapping scratch memory', SYS.munmap, [this.scratch, SCRATCH_SIZE]);
    this.scratch = 0n;
  }

  /** Frees everything put so far. */
  reset(): void {
    this.used = this.batchCode ? BATCH_CODE_ROOM : 0;
  }

  /** Bytes of scratch memory still free for put(). */
  room(): number {
    return SCRATCH_SIZE - ((this.used + 15) & ~15);
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
   */
  runCalls(calls: { nr: number; args: (bigint | number)[] }[], tid = this.pid): bigint[] {
    const results: bigint[] = [];
    if (!this.batchCode || calls.length === 1) {
      for (const c of calls) {
        const r = this.raw(c.nr, c.args, tid);
        results.push(r);
        if (r < 0n && r > -4096n) break;
      }
      return results;
    }
    const mark = this.used;
    const room = Math.floor((SCRATCH_SIZE - ((mark + 15) & ~15) - BATCH_HEADER) / BATCH_ENTRY);
    if (room < 1) throw new Error('scratch memory exhausted');
    for (let at = 0; at < calls.length; at += room) {
      const chunk = calls.slice(at, at + room);
      const table = Buffer.alloc(BATCH_HEADER + chunk.length * BATCH_ENTRY);
      table.writeBigUInt64LE(BigInt(chunk.length), 0);
      table.writeBigUInt64LE(BigInt(this.pid), 8);
      table.writeBigUInt64LE(BigInt(tid), 16);
      chunk.forEach((c, i) => {
        const e = BATCH_HEADER + i * BATCH_ENTRY;
        table.writeBigUInt64LE(BigInt(c.nr), e);
        c.args.forEach((a, j) => table.writeBigUInt64LE(BigInt.asUintN(64, BigInt(a)), e + 8 + j * 8));
        table.writeBigUInt64LE(NOT_RUN, e + 56);
      });
      const addr = this.put(table);
      injected.calls++;
      addon().injectBatch(tid, this.batchCode, addr);
      const back = addon().readMemory(this.pid, addr, table.length);
      this.used = mark;
      for (let i = 0; i < chunk.length; i++) {
        const r = BigInt.asIntN(64, back.readBigUInt64LE(BATCH_HEADER + i * BATCH_ENTRY + 56));
        if (r === BigInt.asIntN(64, NOT_RUN)) return results;
        results.push(r);
        if (r < 0n && r > -4096n) return results;
      }
    }
    return results;
  }

  /** Copies bytes into scratch memory; returns their address there. */
  put(data: Buffer): bigint {
    const at = (this.used + 15) & ~15;
    if (at + data.length > SCRATCH_SIZE) throw new Error('scratch memory exhausted');
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

/**
 * System calls gathered to run together (RemoteProcess.runCalls): each
 * named for the message if it fails.
 */
export class CallBatch {
  private readonly calls: { what: string; nr: number; args: (bigint | number)[] }[] = [];

  constructor(
    private readonly r: RemoteProcess,
    private readonly tid: number,
  ) {}

  /** Adds a call; returns its index in run()'s results. */
  add(what: string, nr: number, args: (bigint | number)[]): number {
    this.calls.push({ what, nr, args });
    return this.calls.length - 1;
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
    return results;
  }
}
