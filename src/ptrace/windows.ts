/**
 * Translation windows (addon/preload/preload.h, "Translation windows"): a
 * thread of the application inside a wrapper of the preload library that
 * translates ids holds a system id of this node, on its way into a system
 * call (kill) or out of one (getppid). Stopped there, snapshotted and
 * restored, it would use that id on the new node. Each such wrapper raises
 * a per-thread mark while it runs (struct appshot_id_window); the library
 * publishes where the mark is (its offset from the thread pointer) in the
 * exported symbol appshot_id_window_tpoff. The freezer reads the mark of
 * every stopped thread and lets a thread that has it raised run on until
 * it is lowered, unless the thread is blocked in a system call: a blocked
 * call restarts on the new node and its answer is translated there. A
 * thread at the first instructions of the library's signal handler stub,
 * where the kernel's frame (and its siginfo's system PID) exists but the
 * mark is not raised yet, is inside too.
 */
import { readFileSync, realpathSync } from 'node:fs';
import { symbolAddress } from '../elf.js';
import { addon, paths } from '../native.js';

/** Offsets in x86-64 struct user_regs_struct. */
const REG = { rax: 10 * 8, origRax: 15 * 8, rip: 16 * 8, rsp: 19 * 8, fsBase: 21 * 8 } as const;
/** The kernel's codes for a call interrupted in its sleep, to be restarted
 * (or to fail with EINTR), and EINTR itself. */
const BLOCKED = new Set([-512n, -513n, -514n, -516n, -4n]);

let preloadPath: string | undefined;
function preload(): string {
  if (preloadPath === undefined)
    try {
      preloadPath = realpathSync(paths.preload);
    } catch {
      preloadPath = paths.preload;
    }
  return preloadPath;
}

/** Where a process keeps its windows: the mark's offset from the thread
 * pointer, and the signal handler's entry stub, whose first instructions
 * run before the mark is raised (preload_signal.c). */
export interface Windows {
  offset: bigint;
  entry: bigint;
  raised: bigint;
}

/** undefined when the process has no preload library (or the library has
 * not published the offset yet). */
export function windowsOf(pid: number): Windows | undefined {
  let maps: string;
  try {
    maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch {
    return undefined;
  }
  const at = symbolAddress(maps, [preload()], 'appshot_id_window_tpoff');
  if (!at) return undefined;
  const entry = symbolAddress(maps, [preload()], 'appshot_signal_entry')?.address ?? 0n;
  const raised = symbolAddress(maps, [preload()], 'appshot_signal_entry_raised')?.address ?? 0n;
  try {
    const offset = addon().readMemory(pid, at.address, 8).readBigInt64LE(0);
    return offset === 0n ? undefined : { offset, entry, raised };
  } catch {
    return undefined;
  }
}

/** Whether stopped thread `tid` of `pid` is inside a window and not blocked
 * in a system call: it must run on before it is snapshotted. */
export function insideWindow(pid: number, tid: number, windows: Windows): boolean {
  let regs: Buffer;
  try {
    regs = addon().getRegs(tid);
  } catch {
    return false;
  }
  // At the handler's entry (where the kernel leaves a thread whose signal
  // frame it just built), before the stub raised the mark.
  const rip = regs.readBigUInt64LE(REG.rip);
  if (windows.entry && rip >= windows.entry && rip < windows.raised) return true;
  const offset = windows.offset;
  const fsBase = regs.readBigUInt64LE(REG.fsBase);
  if (!fsBase) return false;
  // struct appshot_id_window: windows open, and the stack pointer where
  // the outermost began; a thread above it left it by a longjmp that
  // escaped the library's longjmp wrappers (which close what they leave),
  // and is not inside. (A handler's window on a higher alternate stack
  // moves that pointer up to itself: addon/preload/preload_jump.c.)
  let open: number;
  let sp: bigint;
  try {
    const mark = addon().readMemory(pid, BigInt.asUintN(64, fsBase + offset), 16);
    open = mark.readInt32LE(0);
    sp = mark.readBigUInt64LE(8);
  } catch {
    return false;
  }
  if (open <= 0 || regs.readBigUInt64LE(REG.rsp) > sp) return false;
  const blocked = regs.readBigInt64LE(REG.origRax) >= 0n && BLOCKED.has(regs.readBigInt64LE(REG.rax));
  return !blocked;
}
