/**
 * Running system calls inside a stopped process, for the state only the
 * process itself can ask the kernel for (signal handlers, its TID address,
 * its alternate signal stack, the exact brk).
 *
 * No byte of the process's code is changed: the thread is pointed at a
 * `syscall` instruction that already exists in its vDSO, stopped at the
 * call's entry and exit, and put back. Out-parameters go to a scratch area
 * below the thread's stack red zone, whose bytes are saved first and put
 * back after.
 */
import { addon } from '../native.js';
import { countCall } from './remote.js';

const REGS = { rsp: 19 * 8 };
const RED_ZONE = 128n;
const SCRATCH = 512;
const SYSCALL = Buffer.from([0x0f, 0x05]);
/** Offset of the first `syscall` instruction in a vDSO, by vDSO size. */
const syscallAt = new Map<bigint, bigint>();

export class Injector {
  /** The scratch bytes below the stack and what they held, once a call
   * needed them: most snapshots ask their questions in batches from the
   * preload library's area and never use them, and saving and putting
   * back 512 bytes of the stack (with a read of the registers) was three
   * system calls of the frozen window for nothing, the put-back a write
   * to the stack's page. Taken at the first use: the thread's stack
   * pointer is the same then (every injection puts its registers back). */
  private scratchAt?: bigint;
  private saved?: Buffer;

  private constructor(
    readonly pid: number,
    readonly tid: number,
    private readonly insn: bigint,
  ) {}

  private get scratch(): bigint {
    if (this.scratchAt === undefined) {
      const rsp = addon().getRegs(this.tid).readBigUInt64LE(REGS.rsp);
      const at = (rsp - RED_ZONE - BigInt(SCRATCH)) & ~63n;
      this.saved = addon().readMemory(this.pid, at, SCRATCH);
      this.scratchAt = at;
    }
    return this.scratchAt;
  }

  /** An injector working through thread `tid` of `pid`, or an error naming
   * why the process offers none (no vDSO). */
  static open(pid: number, tid: number, vdso: { start: bigint; end: bigint } | undefined): Injector {
    if (!vdso) throw new Error('the process has no vDSO to run system calls from');
    // The vDSO is the kernel's, the same in every process of an ABI: where
    // its instruction was last time is checked (two bytes) before the
    // whole vDSO is searched again.
    const size = vdso.end - vdso.start;
    const known = syscallAt.get(size);
    if (known !== undefined && addon().readMemory(pid, vdso.start + known, 2).equals(SYSCALL)) return new Injector(pid, tid, vdso.start + known);
    const code = addon().readMemory(pid, vdso.start, Number(size));
    const at = code.indexOf(SYSCALL);
    if (at < 0) throw new Error('no syscall instruction in the vDSO');
    syscallAt.set(size, BigInt(at));
    return new Injector(pid, tid, vdso.start + BigInt(at));
  }

  /** Runs `nr(args)` in the thread; returns the raw result (-errno on error). */
  call(nr: number, args: (bigint | number)[], tid = this.tid): bigint {
    countCall(this.pid);
    return addon().inject(tid, this.insn, nr, args);
  }

  /** Runs a call that reads `input` from memory and may write back into
   * it ('buf' in args is its address, { bufAt: n } the address n bytes
   * into it); returns the result and the bytes. */
  callWith(nr: number, args: (bigint | number | 'buf' | { bufAt: number })[], input: Buffer, tid = this.tid): { ret: bigint; out: Buffer } {
    if (input.length > SCRATCH) throw new Error('system call argument too large');
    addon().writeMemory(this.pid, this.scratch, input);
    const ret = this.call(nr, args.map((a) => (a === 'buf' ? this.scratch : typeof a === 'object' ? this.scratch + BigInt(a.bufAt) : a)), tid);
    return { ret, out: addon().readMemory(this.pid, this.scratch, input.length) };
  }

  /** Runs a call whose result is written to memory, and returns that. The
   * scratch area serves every thread: they share the address space, and
   * all of them are stopped. */
  callOut(nr: number, args: (bigint | number | 'out')[], outLength: number, tid = this.tid): { ret: bigint; out: Buffer } {
    const real = args.map((a) => (a === 'out' ? this.scratch : a));
    const ret = this.call(nr, real, tid);
    return { ret, out: addon().readMemory(this.pid, this.scratch, outLength) };
  }

  /** Where the scratch bytes are, for a call whose arguments point into
   * each other (written there with writeMemory; put back by close()). */
  get scratchAddress(): bigint {
    return this.scratch;
  }

  /** The `syscall` instruction calls are run at (in the vDSO): usable
   * after close(), which only puts the scratch bytes back. */
  get syscallInstruction(): bigint {
    return this.insn;
  }

  /** Bytes an out-parameter may take. */
  readonly scratchSize = SCRATCH;

  /** Puts the scratch bytes back, if a call used them. */
  close(): void {
    if (this.scratchAt !== undefined && this.saved) addon().writeMemory(this.pid, this.scratchAt, this.saved);
  }
}

export const NR = {
  close: 3,
  mmap: 9,
  munmap: 11,
  madvise: 28,
  brk: 12,
  ioctl: 16,
  getitimer: 36,
  fcntl: 72,
  userfaultfd: 323,
  rt_sigaction: 13,
  sigaltstack: 131,
  prctl: 157,
  mincore: 27,
} as const;
export const PR_GET_TID_ADDRESS = 40;
