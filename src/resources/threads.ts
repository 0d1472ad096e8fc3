/**
 * Threads: registers, FPU/extended state, signal mask and pending signals,
 * TID address, robust futex list, rseq registration, alternate signal
 * stack. Each is per thread in the kernel and none survives a restore by
 * itself (DESIGN.md, "glibc caches each thread's system TID").
 */
import { readFileSync } from 'node:fs';
import { addon } from '../native.js';
import { readStat } from '../procfs.js';
import type { Thread } from '../image/types.js';
import type { DumpContext } from '../snapshot/context.js';
import type { FrozenThread } from '../snapshot/freezer.js';
import { type Injector, NR, PR_GET_TID_ADDRESS } from '../snapshot/inject.js';

/** Byte offsets in struct user_regs_struct (x86-64). */
export const REG = { rax: 10 * 8, origRax: 15 * 8, rip: 16 * 8, rsp: 19 * 8, fsBase: 21 * 8 } as const;
const THREAD_FLAG = 0x2;

/** `regs` were read before any system call was run in the process: those
 * leave an interrupted call rewound, and the image keeps it as it was. */
export function dumpThread(ctx: DumpContext, t: FrozenThread, regs: Buffer, inj: Injector): Thread {
  const a = addon();
  let pending = a.peekSiginfo(t.tid, false);
  // A signal that was being delivered when the thread stopped is still
  // pending from the application's point of view.
  if (t.siginfo) pending = Buffer.concat([t.siginfo, pending]);
  const rseq = a.getRseq(t.tid);
  const robust = a.getRobustList(t.tid);
  const tidAddr = inj.callOut(NR.prctl, [PR_GET_TID_ADDRESS, 'out'], 8, t.tid);
  const alt = inj.callOut(NR.sigaltstack, [0, 'out'], 24, t.tid);
  const st = readStat(t.tid);
  let wchan = '';
  try {
    wchan = readFileSync(`/proc/${t.pid}/task/${t.tid}/wchan`, 'utf8');
  } catch {
    /* not readable */
  }
  const origRax = regs.readBigInt64LE(REG.origRax);
  const vtid =
    t.tid === t.pid
      ? ctx.virtual('pid', t.pid)
      : ctx.virtual('pid', t.tid) || a.mapSystem(ctx.tablesPath, 'pid', t.tid, THREAD_FLAG, t.pid);
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
