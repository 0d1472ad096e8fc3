/**
 * The CPU time a process and its threads had used. The kernel counts it
 * from when a task is made and no call sets it, so a restored process
 * would see its CPU-time clocks, getrusage and times() start again near 0:
 * a program that reads its CPU time before and after sees it go
 * backwards. The preload library adds an offset to those answers
 * (appshot_cpu_times, addon/preload/preload_cputime.c), which the restore
 * writes into the restored process's memory: what each count had reached
 * at the snapshot, as the application saw it (the kernel's count and the
 * offset an earlier restore gave it), less what the kernel counts in the
 * restored process. A thread's offsets are its restored thread's only:
 * the restore also writes, into each thread's thread-local storage, which
 * entry is its own (a thread made later starts with none, whatever
 * numbers it is given), and the next snapshot reads them back by it.
 *
 * The kernel's counts, read from outside while the process is stopped:
 *  - a process's CPU-time clock in nanoseconds (its CLOCK_PROCESS_CPUTIME_ID,
 *    which another process may read: addon processCpuTimeNs), each
 *    thread's from /proc/PID/task/TID/schedstat (the scheduler's runtime,
 *    which CLOCK_THREAD_CPUTIME_ID reads);
 *  - getrusage's user and system split, and the reaped children's, only in
 *    clock ticks (/proc/PID/stat, which shows the same adjusted split
 *    getrusage and times() do): each taken as the most it may have been,
 *    the end of its tick (bounded by the total: user + system is the
 *    clock), so that no answer the application had is above it. The
 *    children's counts of 0 ticks both are taken as 0 (they may have been
 *    up to a tick each: a program that reaped children using less than
 *    10 ms in all may see getrusage(RUSAGE_CHILDREN) go back to 0); one
 *    of 0 ticks beside one of more is the most it may have been, as any
 *    other (children that reaped used CPU time; a child burning in system
 *    calls has often no user tick, and its user time, which getrusage
 *    shows to the microsecond, went back to 0).
 */
import type { CpuTimes, Process, Thread } from '../image/types.js';
import { addon } from '../native.js';
import { procText } from '../procfs.js';
import { cpuEntryTpoffOf, cpuTimesOf } from '../ptrace/windows.js';
import type { MapsLine } from './memory.js';
import { ImageMemory, REG } from './threads.js';

/** USER_HZ: /proc's clock ticks, 100 on every Linux ABI. */
const NS_PER_TICK = 10_000_000n;
/** The most a restore writes: 2^62 ns, 146 years of CPU time (the library
 * adds in int64). */
export const CPU_TIMES_MAX = 1n << 62n;

/** struct appshot_cpu_times (preload_cputime.c): owner (the virtual PID)
 * and the count of thread entries, five int64 of the process, then
 * `capacity` entries of vtid, the system TID the restore gave the thread
 * (0: it ended) and three int64, sorted by vtid. A thread finds its own
 * entry by an index in its thread-local storage (appshot_cpu_entry_tpoff),
 * which the restore writes; a library without that symbol is an older
 * one, of 128 entries found by vtid. */
const CPU_TIMES = { owner: 0, threads: 4, process: 8, entries: 48, entry: 32, capacity: 4096, olderCapacity: 128 } as const;
const CPU_TIMES_SIZE = CPU_TIMES.entries + CPU_TIMES.capacity * CPU_TIMES.entry;

/** Where thread `t`'s entry index lies (its thread pointer plus `tpoff`),
 * or undefined: a thread without a thread pointer. */
function entryIndexAt(t: Thread, tpoff: bigint): bigint | undefined {
  const fsBase = t.regs.length >= REG.fsBase + 8 ? t.regs.readBigUInt64LE(REG.fsBase) : 0n;
  return fsBase ? BigInt.asUintN(64, fsBase + tpoff) : undefined;
}

/** A process's or thread's counts as the kernel shows them: the runtime in
 * ns, user and system (and children's) ticks of /proc's stat. */
interface KernelCpu {
  ns: bigint;
  userTicks: bigint;
  systemTicks: bigint;
  childUserTicks: bigint;
  childSystemTicks: bigint;
}

/** Fields 14-17 of a stat file (utime, stime, cutime, cstime). */
function statTicks(path: string): bigint[] {
  const text = procText(path);
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return [f[11], f[12], f[13], f[14]].map((v) => BigInt(v));
}

/** A thread's runtime in ns (schedstat's first number), or undefined
 * where the kernel has no schedstat (CONFIG_SCHED_INFO). */
function threadRuntime(pid: number, tid: number): bigint | undefined {
  try {
    return BigInt(procText(`/proc/${pid}/task/${tid}/schedstat`).split(' ')[0]);
  } catch {
    return undefined;
  }
}

/** The kernel's counts of process `pid` and each of `tids`; the stat read
 * before the runtime, so that the split (which the read adjusts to the
 * runtime then) is never above the runtime read after. At snapshot, the
 * files come from the frozen window's gather (procfs.ts
 * gatheredBeforeCalls: one native call). Undefined for a process gone, or
 * one whose clock cannot be read. */
function kernelCpu(pid: number, tids: number[]): { process: KernelCpu; threads: Map<number, KernelCpu> } | undefined {
  try {
    const [u, s, cu, cs] = statTicks(`/proc/${pid}/stat`);
    const process = { ns: addon().processCpuTimeNs(pid), userTicks: u, systemTicks: s, childUserTicks: cu, childSystemTicks: cs };
    const threads = new Map<number, KernelCpu>();
    for (const tid of tids) {
      const [tu, ts] = statTicks(`/proc/${pid}/task/${tid}/stat`);
      // Without schedstat, the most the ticks allow.
      const ns = threadRuntime(pid, tid) ?? (tu + ts + 1n) * NS_PER_TICK;
      threads.set(tid, { ns, userTicks: tu, systemTicks: ts, childUserTicks: 0n, childSystemTicks: 0n });
    }
    return { process, threads };
  } catch {
    return undefined;
  }
}

/** The most the user and system split may have been, given its ticks
 * (each below the end of its tick, and a microsecond below at most, the
 * unit getrusage shows) and the runtime they add up to. */
function splitCeiling(k: KernelCpu): { userNs: bigint; systemNs: bigint } {
  const min = (a: bigint, b: bigint) => (a < b ? a : b);
  const max0 = (a: bigint) => (a < 0n ? 0n : a);
  return {
    userNs: max0(min((k.userTicks + 1n) * NS_PER_TICK - 1000n, k.ns - k.systemTicks * NS_PER_TICK)),
    systemNs: max0(min((k.systemTicks + 1n) * NS_PER_TICK - 1000n, k.ns - k.userTicks * NS_PER_TICK)),
  };
}

/** The children's user or system time (`ticks`) at most, `other` the
 * other's ticks: 0 only if both are (no child reaped, as a rule). */
const childCeiling = (ticks: bigint, other: bigint) => (ticks === 0n && other === 0n ? 0n : (ticks + 1n) * NS_PER_TICK - 1000n);

/** The library's offsets in a process (its memory at `address`), if a
 * restore wrote them for it (`vpid`: a fork's child keeps a copy that is
 * not its own): the process's, and each of `threads`' by virtual TID,
 * the entry its thread-local index names (`tpoff`; an older library's:
 * the entry of its virtual TID). A thread made since the restore has
 * none, whatever its numbers. */
function readOffsets(pid: number, address: bigint, vpid: number, threads: Thread[], tpoff: bigint | undefined): { process: CpuTimes; threads: Map<number, CpuTimes> } | undefined {
  let b: Buffer;
  try {
    b = addon().readMemory(pid, address, CPU_TIMES.entries);
  } catch {
    return undefined;
  }
  if (b.readInt32LE(CPU_TIMES.owner) !== vpid) return undefined;
  const p = CPU_TIMES.process;
  const at = (o: number) => b.readBigInt64LE(o);
  const process = { ns: at(p), userNs: at(p + 8), systemNs: at(p + 16), childUserNs: at(p + 24), childSystemNs: at(p + 32) };
  const offsets = new Map<number, CpuTimes>();
  const n = Math.min(b.readUInt32LE(CPU_TIMES.threads), tpoff === undefined ? CPU_TIMES.olderCapacity : CPU_TIMES.capacity);
  if (!n) return { process, threads: offsets };
  let e: Buffer;
  try {
    e = addon().readMemory(pid, address + BigInt(CPU_TIMES.entries), n * CPU_TIMES.entry);
  } catch {
    return { process, threads: offsets };
  }
  const entry = (i: number): CpuTimes => {
    const o = i * CPU_TIMES.entry;
    return { ns: e.readBigInt64LE(o + 8), userNs: e.readBigInt64LE(o + 16), systemNs: e.readBigInt64LE(o + 24), childUserNs: 0n, childSystemNs: 0n };
  };
  if (tpoff === undefined) {
    for (let i = 0; i < n; i++) offsets.set(e.readInt32LE(i * CPU_TIMES.entry), entry(i));
    return { process, threads: offsets };
  }
  for (const t of threads) {
    const where = entryIndexAt(t, tpoff);
    if (where === undefined) continue;
    let index: number;
    try {
      index = addon().readMemory(pid, where, 4).readUInt32LE(0);
    } catch {
      continue;
    }
    // The thread's memory, as any: an index out of the table, or of an
    // entry closed or another thread's, gives nothing.
    if (index < 1 || index > n) continue;
    const o = (index - 1) * CPU_TIMES.entry;
    if (e.readInt32LE(o) !== t.vtid || e.readInt32LE(o + 4) === 0) continue;
    offsets.set(t.vtid, entry(index - 1));
  }
  return { process, threads: offsets };
}

/** The kernel's counts, read at snapshot (all threads stopped) before any
 * call is injected; undefined for a process without the library (mappings
 * `maps`), which no restore can give offsets. */
/** Where process `pid`'s library keeps the offsets a restore writes, or
 * undefined: the one range of its memory a restore writes that the
 * application never did (a prepared instance's page of it is copied, not
 * mapped from the page file; serve-prepared.test leaves it out). */
export function cpuTimesRange(pid: number, maps: MapsLine[]): { start: bigint; end: bigint } | undefined {
  const start = cpuTimesOf(pid, maps);
  return start === undefined ? undefined : { start, end: start + BigInt(CPU_TIMES_SIZE) };
}

export type KernelCpuAtSnapshot = ReturnType<typeof kernelCpu>;
export function readKernelCpu(pid: number, tids: number[], maps: MapsLine[]): KernelCpuAtSnapshot {
  return cpuTimesOf(pid, maps) === undefined ? undefined : kernelCpu(pid, tids);
}

/** A count within what an image may hold (checkCpuTimes): the offsets
 * added are the application's memory, which a stray write may have made
 * anything; past the bound, the snapshot wrote an image every restore
 * refused as corrupt. */
const nonNegative = (v: bigint) => (v < 0n ? 0n : v > CPU_TIMES_MAX ? CPU_TIMES_MAX : v);
const sum = (a: CpuTimes, b: CpuTimes | undefined): CpuTimes =>
  b
    ? {
        ns: nonNegative(a.ns + b.ns),
        userNs: nonNegative(a.userNs + b.userNs),
        systemNs: nonNegative(a.systemNs + b.systemNs),
        childUserNs: nonNegative(a.childUserNs + b.childUserNs),
        childSystemNs: nonNegative(a.childSystemNs + b.childSystemNs),
      }
    : a;

/**
 * At snapshot: the CPU time process `proc` (system PID `pid`, mappings
 * `maps`) and its threads had as the application saw them, into
 * proc.cpuTimes and each thread's cpuTimes: the kernel's counts `kernel`
 * and the offsets its library had from an earlier restore. Nothing for a
 * process without the library (no restore can give it offsets).
 */
export function dumpCpuTimes(pid: number, maps: MapsLine[], kernel: KernelCpuAtSnapshot, proc: Process): void {
  const address = cpuTimesOf(pid, maps);
  if (address === undefined || !kernel) return;
  const earlier = readOffsets(pid, address, proc.vpid, proc.threads, cpuEntryTpoffOf(pid, maps));
  const k = kernel.process;
  proc.cpuTimes = sum({ ns: k.ns, ...splitCeiling(k), childUserNs: childCeiling(k.childUserTicks, k.childSystemTicks), childSystemNs: childCeiling(k.childSystemTicks, k.childUserTicks) }, earlier?.process);
  for (const t of proc.threads) {
    const kt = kernel.threads.get(t.tid);
    if (!kt) continue;
    t.cpuTimes = sum({ ns: kt.ns, ...splitCeiling(kt), childUserNs: 0n, childSystemNs: 0n }, earlier?.threads.get(t.vtid));
  }
}

/** The image's counts are untrusted: each within what the library adds. */
export function checkCpuTimes(what: string, c: CpuTimes | undefined): string | undefined {
  if (!c) return undefined;
  for (const [name, v] of Object.entries(c))
    if (typeof v !== 'bigint' || v < 0n || v > CPU_TIMES_MAX) return `${what} has a CPU time ${name} of ${String(v)} ns (at most 2^62)`;
  return undefined;
}

/**
 * At restore, the process (system PID `pid`, threads `tids` in the
 * image's order) stopped and not yet run: its library's offsets written,
 * the image's counts less the kernel's now, so that each answer goes on
 * from what the application saw. A process without the library, or an
 * image without the counts, is left as it is (its counts start again). A
 * failure to read or write is no failure of the restore: the counts then
 * start again, as they did before this was carried. Returns a note for
 * the restore's list of what was not kept, or undefined.
 */
export function restoreCpuTimes(pid: number, p: Process, tids: number[], maps: MapsLine[]): string | undefined {
  if (!p.cpuTimes) return undefined;
  const address = cpuTimesOf(pid, maps);
  if (address === undefined) return undefined;
  const tpoff = cpuEntryTpoffOf(pid, maps);
  const capacity = tpoff === undefined ? CPU_TIMES.olderCapacity : CPU_TIMES.capacity;
  const memory = new ImageMemory(p.vmas, maps);
  if (!memory.writablePrivate(address, CPU_TIMES.entries)) return 'its CPU time starts again near 0 (its library\'s offsets are not in private writable memory)';
  const now = kernelCpu(pid, tids);
  if (!now) return 'its CPU time starts again near 0 (the kernel\'s count of the restored process could not be read)';
  const header = Buffer.alloc(CPU_TIMES.entries);
  header.writeInt32LE(p.vpid, CPU_TIMES.owner);
  const k = now.process;
  const c = p.cpuTimes;
  const o = CPU_TIMES.process;
  // The split's floor now: the kernel's split from here on is at least it.
  header.writeBigInt64LE(c.ns - k.ns, o);
  header.writeBigInt64LE(c.userNs - k.userTicks * NS_PER_TICK, o + 8);
  header.writeBigInt64LE(c.systemNs - k.systemTicks * NS_PER_TICK, o + 16);
  header.writeBigInt64LE(c.childUserNs - k.childUserTicks * NS_PER_TICK, o + 24);
  header.writeBigInt64LE(c.childSystemNs - k.childSystemTicks * NS_PER_TICK, o + 32);
  // Each thread's index, where it is written: every thread's (0 for one
  // without an entry), since the image's may name an entry of an earlier
  // restore's table. Threads sharing a thread pointer share the index:
  // none of them has an entry. If one cannot be written, no thread has an
  // entry (its index would be the image's).
  const indexAt = new Map<Thread, bigint>();
  let indexed = tpoff !== undefined;
  if (tpoff !== undefined) {
    const pointers = new Map<bigint, number>();
    for (const t of p.threads) {
      const at = entryIndexAt(t, tpoff);
      if (at === undefined) continue;
      if (!memory.writablePrivate(at, 4)) indexed = false;
      indexAt.set(t, at);
      pointers.set(at, (pointers.get(at) ?? 0) + 1);
    }
    for (const [t, at] of indexAt) if (pointers.get(at)! > 1) indexAt.delete(t);
  }
  const own = p.threads
    .map((t: Thread, i: number) => ({ t, tid: tids[i], kt: now.threads.get(tids[i]) }))
    .filter(({ t, kt }) => t.cpuTimes && kt && (tpoff === undefined || (indexed && indexAt.has(t))))
    .sort((a, b) => a.t.vtid - b.t.vtid)
    .slice(0, capacity);
  const entries = Buffer.alloc(own.length * CPU_TIMES.entry);
  own.forEach(({ t, tid, kt }, i) => {
    const e = i * CPU_TIMES.entry;
    entries.writeInt32LE(t.vtid, e);
    entries.writeInt32LE(tid, e + 4);
    entries.writeBigInt64LE(t.cpuTimes!.ns - kt!.ns, e + 8);
    entries.writeBigInt64LE(t.cpuTimes!.userNs - kt!.userTicks * NS_PER_TICK, e + 16);
    entries.writeBigInt64LE(t.cpuTimes!.systemNs - kt!.systemTicks * NS_PER_TICK, e + 24);
  });
  header.writeUInt32LE(own.length, CPU_TIMES.threads);
  if (entries.length && !memory.writablePrivate(address + BigInt(CPU_TIMES.entries), entries.length))
    return 'its CPU time starts again near 0 (its library\'s offsets are not in private writable memory)';
  // The count first written as 0: the table the image brought, and
  // indices of it, must not be taken together with this restore's.
  const counted = Buffer.from(header);
  header.writeUInt32LE(0, CPU_TIMES.threads);
  try {
    addon().writeMemory(pid, address, header);
    if (indexed) {
      const index = new Map(own.map(({ t }, i) => [t, i + 1]));
      for (const [t, at] of indexAt) {
        const b = Buffer.alloc(4);
        b.writeUInt32LE(index.get(t) ?? 0);
        // Written only if it differs: a page written is a page copied in
        // a prepared instance, whose pages stay the page file's
        // otherwise (the same threads get the same entries again).
        if (!addon().readMemory(pid, at, 4).equals(b)) addon().writeMemory(pid, at, b);
      }
    }
    if (entries.length) addon().writeMemory(pid, address + BigInt(CPU_TIMES.entries), entries);
    addon().writeMemory(pid, address, counted);
  } catch (e) {
    return `its CPU time starts again near 0 (${(e as Error).message})`;
  }
  const left = p.threads.filter((t) => t.cpuTimes).length - own.length;
  if (left <= 0) return undefined;
  return tpoff !== undefined && !indexed
    ? `its threads' CPU time starts again near 0 (where a thread keeps which offsets are its own is not in private writable memory)`
    : `${left} of its threads' CPU time starts again near 0 (${own.length === capacity ? `the library carries ${capacity} threads' at most` : 'a thread without its own thread pointer'})`;
}
