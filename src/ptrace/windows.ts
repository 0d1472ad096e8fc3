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
 *
 * Let run on, a thread that forks or reaps without a pause would be
 * inside its next window at the next look: the freezer closes the
 * process's freeze gate (closeGate), in front of which such a thread
 * waits, outside any window, until the freezer opens it (openGate) or its
 * deadline passes.
 */
import { closeSync, openSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { elfSymbol, firstLoadVaddr } from '../elf.js';
import { AppshotError } from '../errors.js';
import { addon, paths } from '../native.js';
import type { MapsLine } from '../resources/memory.js';
import { deviceName, mapFilesPath, mapsDeviceName } from '../procfs.js';

/** Offsets in x86-64 struct user_regs_struct. */
const REG = { rax: 10 * 8, rdi: 14 * 8, origRax: 15 * 8, rip: 16 * 8, rsp: 19 * 8, fsBase: 21 * 8 } as const;
const SYS_FUTEX = 202n;
const SYS_RESTART_SYSCALL = 219n;
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
  /** The process's freeze gate (struct appshot_freeze_gate), or 0n: a
   * library without one. */
  gate: bigint;
  /** Where the process maps translation tables (appshot's files in
   * /dev/shm, at offset 0), and the file's inode: a futex wait there is a
   * wait for the tables' lock. */
  tables: { start: bigint; end: bigint; inode: string }[];
}

/** The mappings of translation tables in a process's maps. */
function tableMappings(maps: string): { start: bigint; end: bigint; inode: string }[] {
  const out: { start: bigint; end: bigint; inode: string }[] = [];
  // Named as the registry names them (registry.ts newTablesPath): an
  // application's own file under /dev/shm/appshot-... is not taken for them.
  for (const m of maps.matchAll(/^([0-9a-f]+)-([0-9a-f]+) \S+ 0+ \S+ (\d+)\s+\/dev\/shm\/appshot-[0-9a-f]{8}-[\w.-]+-[0-9a-f]{16}(?: \(deleted\))?$/gm))
    out.push({ start: BigInt(`0x${m[1]}`), end: BigInt(`0x${m[2]}`), inode: m[3] });
  return out;
}

/** The bits of a robust futex word that hold its owner's TID. */
const FUTEX_TID_MASK = 0x3fffffff;

/** The system TID holding the tables' lock, read through the mapping `m`
 * of process `pid`, or 0: free (or unreadable: the process is gone). */
export function tableLockHolder(pid: number, m: { start: bigint }): number {
  try {
    return addon().readMemory(pid, m.start + BigInt(addon().tablesLockOffset), 4).readInt32LE(0) & FUTEX_TID_MASK;
  } catch {
    return 0;
  }
}

/** The preload library as a process maps it (a line of its maps at file
 * offset 0): where, and which file (device and inode). */
interface PreloadMapping {
  start: bigint;
  end: bigint;
  path: string;
  dev: string;
  inode: bigint;
}

/** The lowest mapping at offset 0 of a file named like our preload library
 * (this build's, a replaced or deleted one, "(deleted)", or another
 * install's), or undefined: the process runs without it. */
function preloadMapping(maps: string): PreloadMapping | undefined {
  const ours = preload();
  const name = basename(ours);
  let found: PreloadMapping | undefined;
  for (const line of maps.split('\n')) {
    // start-end perms offset dev inode   path
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)\s+(.*)$/.exec(line);
    if (!m || BigInt(`0x${m[3]}`) !== 0n) continue;
    const path = m[6].replace(/ \(deleted\)$/, '');
    if (path !== ours && basename(path) !== name) continue;
    const start = BigInt(`0x${m[1]}`);
    if (!found || start < found.start) found = { start, end: BigInt(`0x${m[2]}`), path, dev: m[4], inode: BigInt(m[5]) };
  }
  return found;
}

/** What preloadMappingIn found in each list of mappings, with the list's
 * length then: a snapshot asks it of one process's list three or four
 * times in its frozen window (its batch area, its TID moves, its timed
 * waits), each a walk of every mapping with a string replace and a
 * basename, interpreted code mostly. A list is read from /proc once and
 * not changed after; one that grew or shrank is looked at again. */
const preloadMappingOf = new WeakMap<MapsLine[], { length: number; found: PreloadMapping | undefined }>();

/** preloadMapping, from maps already read and parsed. */
function preloadMappingIn(maps: MapsLine[]): PreloadMapping | undefined {
  const known = preloadMappingOf.get(maps);
  if (known && known.length === maps.length) return known.found;
  const found = findPreloadMappingIn(maps);
  preloadMappingOf.set(maps, { length: maps.length, found });
  return found;
}

function findPreloadMappingIn(maps: MapsLine[]): PreloadMapping | undefined {
  const ours = preload();
  const name = basename(ours);
  let found: PreloadMapping | undefined;
  for (const l of maps) {
    if (l.pgoff !== 0n) continue;
    const path = l.path.replace(/ \(deleted\)$/, '');
    if (path !== ours && basename(path) !== name) continue;
    if (!found || l.start < found.start) found = { start: l.start, end: l.end, path, dev: mapsDeviceName(l.major, l.minor), inode: l.ino };
  }
  return found;
}

/** Offsets of the preload library's symbols from its start, by the mapped
 * file (path, device, inode) and the symbols asked for: looked up once per
 * library, not once per snapshot or restore (null: the library lacks one
 * of them). */
const symbolOffsets = new Map<string, Record<string, bigint> | null>();

/** The offsets from the start of `lib` (as the process `pid` maps it) of
 * each of `names`' symbols in it; null if it lacks one, undefined if its
 * file cannot be read. */
function librarySymbols<K extends string>(pid: number, lib: PreloadMapping, names: readonly K[]): Record<K, bigint> | null | undefined {
  const key = `${lib.path}\0${lib.dev}\0${lib.inode}\0${names.join(',')}`;
  let offsets = symbolOffsets.get(key);
  if (offsets === undefined) {
    try {
      const file = mappedFile(pid, lib);
      const base = firstLoadVaddr(file);
      const found: Record<string, bigint> = {};
      for (const name of names) {
        const at = elfSymbol(file, name);
        if (at === undefined) break;
        found[name] = at - base;
      }
      offsets = Object.keys(found).length === names.length ? found : null;
    } catch {
      return undefined;
    }
    symbolOffsets.set(key, offsets);
    while (symbolOffsets.size > 16) symbolOffsets.delete(symbolOffsets.keys().next().value!);
  }
  return offsets as Record<K, bigint> | null;
}

const RESIDENT_SYMBOLS = ['appshot_resident_batch_code', 'appshot_batch_area', 'appshot_batch_area_size'] as const;

/** Where the preload library keeps its copy of the batch code and the
 * area for its tables (addon/preload/preload_batch.c) in a process whose
 * mappings are `maps`, or undefined: no library, one without them (an
 * older build), or one whose file cannot be read. Not yet checked: the
 * caller compares the code's bytes with its own and sees that the area is
 * mapped writable (RemoteProcess.adoptResident), which a file changed in
 * place since the offsets were cached would fail. The area's size is read
 * from each process again, not kept: it is the process's memory, which
 * it may have changed, and what one process said must not be what
 * another is taken to have. */
export function residentBatchOf(pid: number, maps: MapsLine[]): { code: bigint; area: bigint; size: number } | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, RESIDENT_SYMBOLS);
  if (!lib || !offsets) return undefined;
  let size: number;
  try {
    size = Number(addon().readMemory(pid, lib.start + offsets.appshot_batch_area_size, 8).readBigUInt64LE(0));
  } catch {
    return undefined;
  }
  return { code: lib.start + offsets.appshot_resident_batch_code, area: lib.start + offsets.appshot_batch_area, size };
}

/** Where the preload library keeps its TID moves (appshot_tid_moves,
 * addon/preload/preload_mutex.c) in a process whose mappings are `maps`,
 * or undefined: no library, an older one without them, or one whose file
 * cannot be read. */
export function tidMovesOf(pid: number, maps: MapsLine[]): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_tid_moves'] as const);
  return lib && offsets ? lib.start + offsets.appshot_tid_moves : undefined;
}

/** Where the preload library keeps a late SIGCHLD's ids for the restore
 * to write (appshot_late_sigchld, addon/preload/preload_pid.c) in a
 * process whose mappings are `maps`, or undefined: no library, an older
 * one without it, or one whose file cannot be read. */
export function lateSigchldOf(pid: number, maps: MapsLine[]): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_late_sigchld'] as const);
  return lib && offsets ? lib.start + offsets.appshot_late_sigchld : undefined;
}

/** Whether the process whose mappings are `maps` called mbind through
 * the preload library (appshot_mbind_used, addon/preload/preload_syscall.c),
 * or undefined: no library, an older one without the mark, or one whose
 * file or memory cannot be read. */
export function mbindUsedOf(pid: number, maps: MapsLine[]): boolean | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_mbind_used'] as const);
  if (!lib || !offsets) return undefined;
  try {
    return addon().readMemory(pid, lib.start + offsets.appshot_mbind_used, 4).readUInt32LE(0) !== 0;
  } catch {
    return undefined;
  }
}

/** Where the preload library keeps its process's SEM_UNDO adjustments
 * (appshot_sem_undo, addon/preload/preload_ipc.c) in a process whose
 * mappings are `maps`, or undefined: no library, an older one without
 * them, or one whose file cannot be read. */
export function semUndoOf(pid: number, maps: MapsLine[]): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_sem_undo'] as const);
  return lib && offsets ? lib.start + offsets.appshot_sem_undo : undefined;
}

/** Where the preload library keeps the CPU time its process had before a
 * restore (appshot_cpu_times, addon/preload/preload_cputime.c) in a
 * process whose mappings are `maps`, or undefined: no library, an older
 * one without it, or one whose file cannot be read. */
export function cpuTimesOf(pid: number, maps: MapsLine[]): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_cpu_times'] as const);
  return lib && offsets ? lib.start + offsets.appshot_cpu_times : undefined;
}

/** The highest inotify watch descriptor process `pid`'s preload library
 * saw the kernel give on its descriptor `fd` (appshot_inotify_last_wd,
 * addon/preload/preload_inotify.c, of INOTIFY_TRACKED descriptors); 0:
 * none seen, no library, or an older one. The process's memory: a
 * number to check, not to trust. */
export function inotifyLastWdOf(pid: number, fd: number): number {
  if (!(fd >= 0 && fd < 1024)) return 0;
  let maps: string;
  try {
    maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch {
    return 0;
  }
  const lib = preloadMapping(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_inotify_last_wd'] as const);
  if (!lib || !offsets) return 0;
  try {
    return addon().readMemory(pid, lib.start + offsets.appshot_inotify_last_wd + BigInt(4 * fd), 4).readInt32LE(0);
  } catch {
    return 0;
  }
}

/** A TLS offset the preload library publishes in `symbol` (a thread's
 * pointer plus it is that thread's variable), in a process whose mappings
 * are `maps`; undefined: no library, an older one without the symbol, or
 * one that has not set it yet (0). */
function libraryTpoff(pid: number, maps: MapsLine[], symbol: 'appshot_cpu_entry_tpoff' | 'appshot_timed_wait_tpoff'): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, [symbol] as const);
  if (!lib || !offsets) return undefined;
  try {
    const tpoff = addon().readMemory(pid, lib.start + offsets[symbol], 8).readBigInt64LE(0);
    return tpoff === 0n ? undefined : tpoff;
  } catch {
    return undefined;
  }
}

/** Which entry of the preload library's CPU-time offsets is the thread's
 * (appshot_cpu_entry_tpoff, addon/preload/preload_cputime.c); undefined
 * for an older library, whose table is of 128 threads found by virtual
 * TID. */
export const cpuEntryTpoffOf = (pid: number, maps: MapsLine[]) => libraryTpoff(pid, maps, 'appshot_cpu_entry_tpoff');

/** The epoll wait with a timeout the thread is in (appshot_timed_wait_tpoff,
 * addon/preload/preload_wait.c). */
export const timedWaitTpoffOf = (pid: number, maps: MapsLine[]) => libraryTpoff(pid, maps, 'appshot_timed_wait_tpoff');

/** Where the preload library of a process whose mappings are `maps` keeps
 * its restore generation (appshot_restore_generation, preload_wait.c),
 * which each restore counts up; undefined: no library, or an older one. */
export function restoreGenerationAddrOf(pid: number, maps: MapsLine[]): bigint | undefined {
  const lib = preloadMappingIn(maps);
  const offsets = lib && librarySymbols(pid, lib, ['appshot_restore_generation'] as const);
  return lib && offsets ? lib.start + offsets.appshot_restore_generation : undefined;
}

/** A file holding the very library the process mapped: its path while
 * that still names the same file, else the mapping itself
 * (/proc/PID/map_files, which needs CAP_SYS_ADMIN or
 * CAP_CHECKPOINT_RESTORE). The library rebuilt while the application
 * runs would otherwise give the symbols of another build, or none. */
function mappedFile(pid: number, lib: PreloadMapping): string {
  try {
    const st = statSync(lib.path, { bigint: true });
    if (st.ino === lib.inode && deviceName(st.dev) === lib.dev) return lib.path;
  } catch {
    /* gone: the mapping then */
  }
  const mapping = mapFilesPath(pid, lib.start, lib.end);
  try {
    closeSync(openSync(mapping, 'r'));
    return mapping;
  } catch (e) {
    throw new AppshotError(
      `it runs the preload library ${lib.path} as it was when it started, which has since been replaced or deleted (rebuilt while the application ran?), and the copy it maps cannot be read (${mapping}: ${(e as NodeJS.ErrnoException).code ?? String(e)}): where its translations of process ids are cannot be known`,
    );
  }
}

/** undefined when the process has no preload library (or the library has
 * not published the offset yet). Throws, saying why of "it" (the
 * process), when it has one whose symbols cannot be read: a snapshot that
 * cannot see the windows must not go on as if there were none. */
export function windowsOf(pid: number): Windows | undefined {
  let maps: string;
  try {
    maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch {
    return undefined;
  }
  const lib = preloadMapping(maps);
  if (!lib) return undefined;
  const file = mappedFile(pid, lib);
  const bias = lib.start - firstLoadVaddr(file);
  const at = elfSymbol(file, 'appshot_id_window_tpoff');
  if (at === undefined)
    throw new AppshotError(`it maps ${lib.path}, a preload library that does not say where its translations of process ids are (appshot_id_window_tpoff): another appshot's?`);
  const entry = elfSymbol(file, 'appshot_signal_entry');
  const raised = elfSymbol(file, 'appshot_signal_entry_raised');
  const gate = elfSymbol(file, 'appshot_freeze_gate');
  try {
    const offset = addon().readMemory(pid, bias + at, 8).readBigInt64LE(0);
    return offset === 0n
      ? undefined
      : { offset, entry: entry === undefined ? 0n : bias + entry, raised: raised === undefined ? 0n : bias + raised, gate: gate === undefined ? 0n : bias + gate, tables: tableMappings(maps) };
  } catch {
    return undefined;
  }
}

/** A stopped thread's registers, or undefined if they cannot be read. */
export function registersOf(tid: number): Buffer | undefined {
  try {
    return addon().getRegs(tid);
  } catch {
    return undefined;
  }
}

/** The thread pointer in a thread's registers (0: none). */
export const threadPointer = (regs: Buffer) => regs.readBigUInt64LE(REG.fsBase);

/** Whether stopped thread `tid` of `pid` (registers `regs`) is inside a
 * window and not blocked in a system call: it must run on before it is
 * snapshotted. `shared`: other threads of the process run on the same
 * thread pointer (a clone() without CLONE_SETTLS), so the mark is theirs
 * too and cannot say which of them is inside: each of them is taken as
 * inside while it is raised. */
export function insideWindow(pid: number, regs: Buffer, windows: Windows, shared = false): boolean {
  // At the handler's entry (where the kernel leaves a thread whose signal
  // frame it just built), before the stub raised the mark.
  const rip = regs.readBigUInt64LE(REG.rip);
  if (windows.entry && rip >= windows.entry && rip < windows.raised) return true;
  const offset = windows.offset;
  const fsBase = threadPointer(regs);
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
  if (open <= 0 || (!shared && regs.readBigUInt64LE(REG.rsp) > sp)) return false;
  const blocked = regs.readBigInt64LE(REG.origRax) >= 0n && BLOCKED.has(regs.readBigInt64LE(REG.rax));
  // Blocked waiting for the tables' lock, it still holds the id it came to
  // map, and would map it in the new node's tables: run on (with the
  // lock's holder: the freezer's insideWindows) until it is through.
  return !blocked || waitsForTableLock(regs, windows);
}

/** Whether a thread (registers `regs`) is in a futex wait on a mapping of
 * the tables: the only futex there is their lock. Such a thread is let run
 * on rather than taken there, inside a wrapper or not (a thread's exit
 * unmaps its TID under the lock, outside any): it is about to take the
 * lock. A locker taken anyway between its gettid and its compare-and-swap
 * (appshot_table.c lock_word) takes the word, restored, under its old TID;
 * it re-tags the word under its new one right after the take (the unlock
 * does not look at the TID), and only in the instants between could a
 * waiter's probe of the holder (kill(TID, 0): ESRCH) take the lock as a
 * dead holder's too. */
export function waitsForTableLock(regs: Buffer, windows: Windows): boolean {
  // The wait is timed (the locker looks at the holder every second), so
  // one interrupted by a stop and let run on goes on as restart_syscall,
  // whose registers still hold the futex's: its first argument is the word.
  const nr = regs.readBigInt64LE(REG.origRax);
  if (nr !== SYS_FUTEX && nr !== SYS_RESTART_SYSCALL) return false;
  const at = regs.readBigUInt64LE(REG.rdi);
  return windows.tables.some((m) => at >= m.start && at < m.end);
}

/**
 * The freeze gate (addon/preload/preload.h, "Freeze gate"): closed, an
 * outermost translation window of the process does not begin until it is
 * opened or its deadline passes; the thread waits in front of it, outside
 * every window, blocked in a futex wait where a snapshot may take it. The
 * deadline is CLOCK_MONOTONIC (process.hrtime's clock), `leaseMs` ahead:
 * the bound on what a snapshot killed with the gate closed leaves behind.
 * The deadline is written before the word, so that a thread never sees
 * the gate closed with a stale deadline of an earlier snapshot (it would
 * only go on, which is harmless anyway). Throws if the memory cannot be
 * written (the process is gone).
 */
export function closeGate(pid: number, windows: Windows, leaseMs: number): void {
  const deadline = Buffer.alloc(8);
  deadline.writeBigInt64LE(process.hrtime.bigint() + BigInt(leaseMs) * 1_000_000n);
  addon().writeMemory(pid, windows.gate + 8n, deadline);
  addon().writeMemory(pid, windows.gate, GATE_CLOSED);
}
const GATE_CLOSED = Buffer.from([1, 0, 0, 0]);
const GATE_OPEN = Buffer.from([0, 0, 0, 0]);

/** Opens the freeze gate of `pid` if it is closed (read first: an open
 * gate's page is not written, so not dirtied for the next image). Whether
 * it was closed. */
export function openGate(pid: number, windows: Windows): boolean {
  if (addon().readMemory(pid, windows.gate, 4).readInt32LE(0) === 0) return false;
  addon().writeMemory(pid, windows.gate, GATE_OPEN);
  return true;
}
