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

const SCRATCH_SIZE = 1 << 16;

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

  /** Maps the scratch area at `addr` (chosen free in the image and here). */
  mapScratch(addr: bigint): void {
    const PROT_RW = 3;
    const MAP_PRIVATE_ANON_FIXED_NOREPLACE = 0x02 | 0x20 | 0x100000;
    const got = this.call('mapping scratch memory', SYS.mmap, [addr, SCRATCH_SIZE, PROT_RW, MAP_PRIVATE_ANON_FIXED_NOREPLACE, -1, 0]);
    this.scratch = got;
    this.used = 0;
  }

  unmapScratch(): void {
    if (this.scratch) this.call('unmapping scratch memory', SYS.munmap, [this.scratch, SCRATCH_SIZE]);
    this.scratch = 0n;
  }

  /** Frees everything put so far. */
  reset(): void {
    this.used = 0;
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
