/**
 * Dirty-page tracking for incremental and pre-copy snapshots: which pages a
 * process wrote since the last snapshot, without reading its memory.
 *
 * This kernel has no soft-dirty bits; it has userfaultfd write-protection in
 * asynchronous mode (Linux 6.7): a write to a protected page just clears the
 * protection, with no fault handler, and PAGEMAP_SCAN, run from outside on
 * /proc/PID/pagemap, lists the pages whose protection was cleared and can
 * protect them again in the same pass. The userfaultfd lives in the
 * process, at a high descriptor number recorded with the application; it is
 * not part of the application's state, and images leave it out.
 *
 * Where the kernel refuses (an older kernel, a process that forked since:
 * registrations are not inherited), the snapshot compares pages with the
 * parent image instead, which is exact but reads all memory.
 */
import { closeSync, openSync, readdirSync, readlinkSync } from 'node:fs';
import { addon } from '../native.js';
import { killPoint } from '../killpoint.js';
import { readLimits, RLIMIT_NOFILE } from '../resources/limits.js';
import { type MapsLine } from '../resources/memory.js';
import { readStat } from '../procfs.js';
import { NR } from '../ptrace/inject.js';
import { timed } from './profile.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';

const UFFD_USER_MODE_ONLY = 1;
const O_CLOEXEC = 0o2000000;
const UFFD_API = 0xaan;
const UFFD_FEATURE_WP_UNPOPULATED = 1n << 13n;
const UFFD_FEATURE_WP_ASYNC = 1n << 15n;
const UFFDIO_API = 0xc018aa3f;
const UFFDIO_REGISTER = 0xc020aa00;
const UFFDIO_REGISTER_MODE_WP = 2n;
const F_DUPFD_CLOEXEC = 1030;
const EBUSY = -16n;
/** Where the userfaultfd is put: out of the way of the application's own. */
export const TRACKING_FD_MIN = 900;

const isErr = (r: bigint) => r < 0n && r > -4096n;

/** Whether fd `fd` of `pid` is a userfaultfd. */
export function isUserfaultfd(pid: number, fd: number): boolean {
  try {
    return readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[userfaultfd]';
  } catch {
    return false;
  }
}

/** The mappings worth tracking: private, writable and anonymous ([heap],
 * [stack] and the rest), but appshot's own scratch area (`exclude`). Not
 * private file mappings: a page of theirs dropped with MADV_DONTNEED reads
 * the file again, but leaves a marker that PAGEMAP_SCAN does not call
 * written; those are compared instead. */
function trackable(pid: number, maps: MapsLine[], exclude: { start: bigint } | undefined) {
  const candidates = maps.filter((m) => m.perms[1] === 'w' && m.perms[3] === 'p' && m.ino === 0n && !m.path.startsWith('[v') && m.start !== exclude?.start);
  return denseEnough(pid, candidates);
}

/** A mapping larger than this is tracked only if dense (DENSE_SHARE). */
const SPARSE_CHECKED_BYTES = 1n << 30n;
/** ... at least one page in this many present or swapped. */
const DENSE_SHARE = 64n;
const PAGE = 4096n;

/**
 * Leaves out the large mappings that hold few pages. Write protection of
 * a range never touched (UFFD_FEATURE_WP_UNPOPULATED, which tracking
 * needs to see a write to such a page) puts a marker in a page table
 * entry for each of its pages: 8 bytes a page, 2 GiB of page tables in
 * the application for a 1 TiB reservation (measured: 128 MiB more VmPTE
 * and 0.4 s frozen for 64 GiB with 43 pages written). Such a mapping is
 * compared with the parent instead (memory.ts), which reads only its few
 * pages. One in 64 pages present bounds the markers at an eighth of what
 * the mapping holds.
 *
 * The choice is made when a mapping is registered. One that was dense
 * then and is sparse now (most of it dropped with MADV_DONTNEED) keeps its
 * registration and its markers: nothing is lost or stored wrong, and a
 * page written before the last snapshot may be stored again, extra bytes
 * in the image only (review30 L4).
 */
function denseEnough(pid: number, maps: MapsLine[]): MapsLine[] {
  if (!maps.some((m) => m.end - m.start > SPARSE_CHECKED_BYTES)) return maps;
  let pagemapFd: number;
  try {
    pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
  } catch {
    return maps; // gone: its registrations fail as they would have
  }
  try {
    return maps.filter((m) => {
      const size = m.end - m.start;
      if (size <= SPARSE_CHECKED_BYTES) return true;
      const wanted = size / PAGE / DENSE_SHARE;
      const found = addon().scanCount(pagemapFd, m.start, m.end, wanted);
      // No PAGEMAP_SCAN: no tracking either (Linux 6.7 brought both).
      return found === null || BigInt(found) >= wanted;
    });
  } finally {
    closeSync(pagemapFd);
  }
}

/** "PID:start time": names one process for good, as a PID alone does not. */
export function processKey(pid: number): string {
  return `${pid}:${readStat(pid)?.startTime ?? 0}`;
}

/** A process's soft limit on descriptor numbers. */
function openFilesLimit(pid: number): number {
  return Number(readLimits(pid)[RLIMIT_NOFILE].cur);
}

/** The lowest descriptor number a userfaultfd of appshot's is put at in a
 * process whose soft descriptor limit is `soft`: high, but under that
 * limit (snapfix sets 777). */
function trackingFdMin(soft: number): number {
  return Math.max(10, Math.min(TRACKING_FD_MIN, soft - 16));
}

/**
 * Where the userfaultfd that armTracking is about to make in `pid` will
 * be: its descriptor, if it has one already (`own`, a userfaultfd), else
 * the lowest free number from trackingFdMin on (or undefined: none is
 * free, or the process is gone). Asked before the freeze, so that the
 * registry records it then: armTracking puts the new one there if that is
 * still free, and only if not is the registry written again while the
 * application is frozen.
 *
 * The process is not frozen yet: one of an application that forks all
 * the time (a shell running short commands) may exit between any two of
 * these reads. It is then neither frozen nor dumped, and needs no plan;
 * its exit was once a failed snapshot ("ENOENT ... /proc/PID/limits").
 * Nothing read here goes into the image: a plan that turns out wrong
 * (the number taken meanwhile) only costs armTracking a registry write.
 */
export function plannedTrackingFd(pid: number, own: number | undefined): number | undefined {
  try {
    if (own !== undefined && isUserfaultfd(pid, own)) return own;
    const used = new Set(readdirSync(`/proc/${pid}/fd`).map(Number));
    // Where a test makes the process exit, between two reads.
    killPoint(`snapshot: tracking of ${pid} planned from its descriptors`);
    const soft = openFilesLimit(pid);
    for (let fd = trackingFdMin(soft); fd < soft; fd++) if (!used.has(fd)) return fd;
    return undefined;
  } catch (e) {
    if (exited(e)) return undefined;
    throw e;
  }
}

/** Whether `e` says the process read was gone (it exited, or it was
 * reaped: its /proc directory goes with it). */
function exited(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ESRCH';
}

/** What askArming queued for one process: read by armingAnswered once
 * the queue ran, then protectTracked. */
export interface ArmingAsked {
  existing?: number;
  made?: Answer;
  moved?: Answer;
  api?: Answer;
  ranges: { m: MapsLine; registered: Answer }[];
}

/**
 * Queues on `calls`, to run with whatever else is asked of `pid` in the
 * same stop, what makes sure it has a userfaultfd of its own (at `own`,
 * the one made for it before, or a new one; userfaultfds at the numbers
 * in `strays`, inherited from a parent or left by an earlier failure, are
 * closed), with every writable anonymous mapping of `maps` (read while it
 * was stopped) registered for write-protection. Registering protects no
 * page: what a dump reads of the pages written since the parent
 * (scanWritten) is the same before and after; protectTracked does, once
 * the process's memory is read.
 *
 * The new userfaultfd is passed on as the answer of the call that made
 * it, and a call after one that failed fails harmlessly on the bad
 * descriptor it is given; what failed is seen after (armingAnswered), and
 * what was made is closed again.
 */
export function askArming(calls: CallQueue, pid: number, own: number | undefined, strays: number[], maps: MapsLine[], exclude?: { start: bigint }): ArmingAsked {
  const existing = own !== undefined && isUserfaultfd(pid, own) ? own : undefined;
  for (const n of strays) if (n !== existing && isUserfaultfd(pid, n)) calls.ask(NR.close, [n]);
  let made: Answer | undefined;
  let moved: Answer | undefined;
  let api: Answer | undefined;
  if (existing === undefined) {
    made = calls.ask(NR.userfaultfd, [O_CLOEXEC | UFFD_USER_MODE_ONLY]);
    const lowest = trackingFdMin(openFilesLimit(pid));
    const min = own !== undefined && own >= lowest ? own : lowest;
    moved = calls.ask(NR.fcntl, [made, F_DUPFD_CLOEXEC, min]);
    calls.ask(NR.close, [made]);
    const apiStruct = Buffer.alloc(24);
    apiStruct.writeBigUInt64LE(UFFD_API, 0);
    apiStruct.writeBigUInt64LE(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, 8);
    api = calls.ask(NR.ioctl, [moved, UFFDIO_API, 'buf'], { input: apiStruct });
  }
  const ranges = trackable(pid, maps, exclude).map((m) => {
    const reg = Buffer.alloc(32);
    reg.writeBigUInt64LE(m.start, 0);
    reg.writeBigUInt64LE(m.end - m.start, 8);
    reg.writeBigUInt64LE(UFFDIO_REGISTER_MODE_WP, 16);
    return { m, registered: calls.ask(NR.ioctl, [moved ?? existing!, UFFDIO_REGISTER, 'buf'], { input: reg }) };
  });
  return { existing, made, moved, api, ranges };
}

/** Once askArming's calls ran: the process's userfaultfd, or undefined
 * if the process cannot be tracked (then its pages are compared). One
 * made that the kernel would not set up is closed again (a stop of its
 * own, on that rare failure only). */
export function armingAnswered(calls: CallQueue, asked: ArmingAsked): number | undefined {
  const { made, moved, api } = asked;
  if (made && isErr(made.ret)) return undefined;
  if (moved && isErr(moved.ret)) return undefined;
  const fd = asked.existing ?? Number(moved!.ret);
  if (api && isErr(api.ret)) {
    calls.askNow(NR.close, [fd]);
    return undefined;
  }
  // Registered with another userfaultfd: its writes would be reset by no
  // one. The process is not tracked.
  if (asked.ranges.some((r) => r.registered.ret === EBUSY)) return undefined;
  return fd;
}

/** Protects every page of the mappings askArming registered (for a
 * process armingAnswered gave a descriptor): from here on, writes are
 * tracked. After the dump's own reading of which pages were written
 * since the parent, which this resets. */
export function protectTracked(asked: ArmingAsked, pagemapFd: number): void {
  for (const { m, registered } of asked.ranges) {
    // A mapping the kernel will not track (VM_PFNMAP, say) is compared:
    // the scan finds it unregistered.
    if (!isErr(registered.ret)) timed('track: scan', () => addon().scanWritten(pagemapFd, m.start, m.end, true));
  }
}

/**
 * askArming, its calls run at once (calls.run()), armingAnswered and
 * protectTracked: from here on, writes are tracked. Returns the
 * descriptor, or undefined if the process cannot be tracked (then its
 * pages are compared). For a process whose dump is not under way (a
 * pre-copy's brief freeze).
 */
export function armTracking(calls: CallQueue, pid: number, pagemapFd: number, own: number | undefined, strays: number[], maps: MapsLine[], exclude?: { start: bigint }): number | undefined {
  const asked = askArming(calls, pid, own, strays, maps, exclude);
  timed('track: calls', () => calls.run());
  const fd = armingAnswered(calls, asked);
  if (fd !== undefined) protectTracked(asked, pagemapFd);
  return fd;
}
