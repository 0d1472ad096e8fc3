/**
 * io_uring instances (io_uring_setup), idle ones. A ring is kernel state
 * (requests, registered resources, its counters) and memory the process
 * maps from its descriptor: the SQ and CQ rings (one region, mapped at
 * IORING_OFF_SQ_RING and/or IORING_OFF_CQ_RING) and the SQE array
 * (IORING_OFF_SQES). /proc/PID/maps shows each mapping as
 * "anon_inode:[io_uring]" with the ring's inode, which fdinfo names too.
 *
 * Four counters run the rings. The SQ tail and the CQ head are the
 * application's: it writes them in the mapping (and liburing keeps copies
 * of them in its own memory: sqe_tail, the CQ head it reaps to). The SQ
 * head and the CQ tail are the kernel's: it keeps them in the ring context
 * (cached_sq_head, cached_cq_tail), starting at 0 in a new ring, and
 * copies them into the mapping. A restored ring must have the same four,
 * or the application's copies and the kernel's disagree. So the restore
 * makes the ring inside the restored process with the same sizes and
 * layout (io_uring_setup: its memory and limits are charged to it), brings
 * the kernel's two counters where they were by NOPs (addon/src/iouring.c:
 * NOPs that post a CQE, reaped at once, then NOPs that post none,
 * IOSQE_CQE_SKIP_SUCCESS), writes the image's ring memory over the new
 * ring's (the application's counters and flags, the SQEs queued but not
 * submitted, the CQEs posted but not reaped, the SQ index array: the
 * kernel's counters there are equal by then, which is checked first), and
 * maps it where it was, with the same offsets and protection
 * (MADV_DONTFORK kept; the kernel maps a ring only where it chooses:
 * placeMapping leaves it no other choice), at its descriptor number.
 *
 * Cost and bound. Advancing is one io_uring_enter per batch of as many
 * NOPs as the ring takes at once (its SQ entries; its CQ entries too while
 * they post CQEs). Measured on this machine (Linux 6.18, 2 CPUs shared
 * with other work, load 8-10): about 0.5-1.2 s per million NOPs for an
 * 8-entry ring, 0.1-0.3 s for 64 to 4096 entries (MariaDB's has 2048).
 * A ring whose SQ head is past 2^24 (ADVANCE_LIMIT: at most about 15 s
 * for the smallest rings, 2-5 s for usual ones) is refused
 * by name at snapshot: a long-lived server's ring will be (the counters
 * are 32-bit and wrap; nothing short of 2^32 NOPs reproduces an arbitrary
 * value).
 *
 * In flight. Requests submitted and not completed live only in the
 * kernel: a ring holding one is refused. The evidence, read while the
 * process is frozen: every SQE the kernel consumed posted exactly one CQE
 * (its CQ tail equals its SQ head), no poll is armed (fdinfo's PollList:
 * a read of an empty pipe waits there), no CQE waits in the overflow list
 * (CqOverflowList), the mapping's counters equal the kernel's cached ones,
 * and the kernel has raised no flag in sq_flags (IORING_SQ_CQ_OVERFLOW,
 * IORING_SQ_TASKRUN: completions not yet posted). A request in flight
 * leaves the CQ tail behind the SQ head; so does a completion whose CQE
 * the frozen task has yet to post, and an SQE sent with
 * IOSQE_CQE_SKIP_SUCCESS: all refused (conservative: a ring whose
 * application skips CQEs cannot be told idle). A multishot request posts
 * several CQEs: a CQ tail past the SQ head is refused too. What this does
 * not see: a multishot request that ended and left as many extra CQEs as
 * requests then in flight in io-wq (a blocking read of a regular file),
 * which balance exactly; and a timeout request (not listed in fdinfo) in
 * the same balance.
 *
 * Refused by name at snapshot: an SQPOLL ring (SqThread, a kernel thread
 * of its own polling the SQ), registered files or buffers (UserFiles,
 * UserBufs), registered personalities, a registered eventfd (which
 * fdinfo does not show: asked of the ring through a copy of its
 * descriptor, by registering one of appshot's, refused with EBUSY while
 * one is there, and unregistered at once if taken), NAPI busy polling, a
 * ring not mapped (IORING_SETUP_NO_MMAP: its memory is the application's,
 * which the kernel pins; or a ring simply not mapped yet), a ring held by two
 * descriptors or by two processes (one ring would come back as two), a
 * counter past the bound.
 *
 * A ring only its maker may use (IORING_SETUP_SINGLE_ISSUER, which
 * DEFER_TASKRUN requires) answers io_uring_register from another task
 * with EEXIST: refused by name, the eventfd question above telling it.
 *
 * Not seen, so not carried (the kernel shows no setup flags in fdinfo):
 * COOP_TASKRUN, TASKRUN_FLAG, SUBMIT_ALL, IOPOLL, HYBRID_IOPOLL,
 * ATTACH_WQ, CQE_MIXED: the ring comes back without them (each only
 * restricts when or where completions are posted, or where a request
 * runs, but IOPOLL and CQE_MIXED change what the ring serves: such a ring
 * is misrestored). A registered ring descriptor (IORING_REGISTER_RING_FDS)
 * and provided-buffer rings are not shown either: lost. IORING_SETUP_SQE128 and CQE32 are told by the size of the
 * mappings (a ring of SQEs larger than 64-byte ones need, a ring region
 * larger than 16-byte CQEs need), which a ring of at most 32 entries
 * cannot show (one page holds either): such a ring is taken as the usual
 * layout, as is IORING_SETUP_NO_SQARRAY (no mapping size tells it).
 */
import { readFileSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { type Fd, FdKind, type IoUring, type IoUringMapping, type Process } from '../image/types.js';
import { addon } from '../native.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Unsupported } from './context.js';
import { readMaps } from './memory.js';

const PAGE = 4096n;
/** mmap offsets (linux/io_uring.h). */
export const IORING_OFF = { SQ_RING: 0n, CQ_RING: 0x8000000n, SQES: 0x10000000n } as const;
/** io_uring_setup flags this module asks. */
const SETUP = { CQSIZE: 1 << 3, SQE128: 1 << 10, CQE32: 1 << 11 } as const;
const SETUP_BITS = SETUP.CQSIZE | SETUP.SQE128 | SETUP.CQE32;
/** The kernel's bounds (IORING_MAX_ENTRIES, IORING_MAX_CQ_ENTRIES). */
const MAX_ENTRIES = 32768;
const MAX_CQ_ENTRIES = 2 * MAX_ENTRIES;
/** The highest SQ head a restore reaches by NOPs (see the header). */
export const ADVANCE_LIMIT = 1 << 24;
/** And at most this many io_uring_enter calls, one per batch of a ring's
 * SQ entries: a ring of one entry would otherwise take 2^24 of them
 * (review29 L1). */
export const ADVANCE_CALLS = 1 << 20;
const advanceCalls = (head: number, sqEntries: number) => Math.ceil(head / sqEntries);
const IORING_FEAT_SINGLE_MMAP = 1;
/** sq_flags / cq_flags bits. */
const CQ_EVENTFD_DISABLED = 1;
const EEXIST = 17;

/** struct io_rings' fixed part (io_uring/io_uring.h; the offsets
 * io_uring_setup reports in sq_off/cq_off, checked at restore). */
const RING = { sqHead: 0, sqTail: 4, cqHead: 8, cqTail: 12, sqMask: 16, cqMask: 20, sqEntries: 24, cqEntries: 28, dropped: 32, sqFlags: 36, cqFlags: 40, overflow: 44, cqes: 64 } as const;

const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const MAP_FIXED_NOREPLACE = 0x100000;
const MAP_POPULATE = 0x8000;
const MADV_DONTFORK = 10;
const PROT_READ = 1;
const PROT_WRITE = 2;

const pageUp = (n: bigint) => (n + PAGE - 1n) & ~(PAGE - 1n);
const isPow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
const hex = (n: bigint) => `0x${n.toString(16)}`;

/** The ring region's layout for these sizes and flags (rings_size in
 * io_uring/io_uring.c): its bytes, and where the SQ index array is. */
function layout(sqEntries: number, cqEntries: number, flags: number): { bytes: bigint; array: number; sqeBytes: bigint } {
  const cqeSize = flags & SETUP.CQE32 ? 32 : 16;
  const array = (RING.cqes + cqEntries * cqeSize + 63) & ~63;
  return { bytes: BigInt(array + sqEntries * 4), array, sqeBytes: BigInt(sqEntries * (flags & SETUP.SQE128 ? 128 : 64)) };
}

/* ---- snapshot -------------------------------------------------------- */

interface RingMapping {
  start: bigint;
  end: bigint;
  perms: string;
  pgoff: bigint;
  dontfork: boolean;
}

/** The process's mappings of io_uring instances, by the ring's inode
 * (smaps: its VmFlags tell MADV_DONTFORK, "dc"). */
function ringMappings(pid: number): Map<bigint, RingMapping[]> {
  const out = new Map<bigint, RingMapping[]>();
  let last: RingMapping | undefined;
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ (\d+)\s+(.*)$/.exec(line);
    if (m) {
      last = undefined;
      if (m[6] !== 'anon_inode:[io_uring]') continue;
      last = { start: BigInt(`0x${m[1]}`), end: BigInt(`0x${m[2]}`), perms: m[3], pgoff: BigInt(`0x${m[4]}`), dontfork: false };
      const ino = BigInt(m[5]);
      out.set(ino, [...(out.get(ino) ?? []), last]);
    } else if (last && line.startsWith('VmFlags:')) last.dontfork = line.split(/\s+/).includes('dc');
  }
  return out;
}

/** Rings already taken in this snapshot, by inode: a ring held by two
 * descriptors or two processes cannot be made again as one. */
const seenRings = new WeakMap<object, Map<bigint, string>>();

/** The ring of io_uring descriptor `where` ("process 2 (app) fd 5"), from
 * its fdinfo and mappings, read while the process is frozen. `snapshot`
 * is the snapshot's context (one per snapshot: rings seen in it). */
export function dumpIoUring(snapshot: object, pid: number, fdNumber: number, fdinfo: string, where: string): IoUring {
  const field = (k: string) => new RegExp(`^${k}:\\s*(\\S*)\\s*$`, 'm').exec(fdinfo)?.[1];
  const num = (k: string) => {
    const v = field(k);
    if (v === undefined || !/^(0x[0-9a-f]+|\d+|-1)$/.test(v)) throw new Unsupported(`${where}: an io_uring this kernel shows without ${k} in fdinfo cannot be captured yet`);
    return Number(v);
  };
  const section = (k: string) => {
    const lines = fdinfo.split('\n');
    const at = lines.findIndex((l) => l.startsWith(`${k}:`));
    if (at < 0) return undefined;
    const out: string[] = [];
    for (const l of lines.slice(at + 1)) {
      if (!/^\s/.test(l) || !l.trim()) break;
      out.push(l.trim());
    }
    return out;
  };
  const ino = BigInt(num('ino'));
  const ringName = `${where}: its io_uring`;
  if (num('SqThread') !== -1) throw new Unsupported(`${ringName} polls its SQ from a kernel thread (IORING_SETUP_SQPOLL), which cannot be captured yet`);
  if (num('UserFiles') !== 0) throw new Unsupported(`${ringName} has ${num('UserFiles')} registered files, which cannot be captured yet`);
  if (num('UserBufs') !== 0) throw new Unsupported(`${ringName} has ${num('UserBufs')} registered buffers, which cannot be captured yet`);
  if (/^Personalities:/m.test(fdinfo)) throw new Unsupported(`${ringName} has registered personalities (credentials), which cannot be captured yet`);
  if (/^NAPI:\s*enabled/m.test(fdinfo)) throw new Unsupported(`${ringName} busy-polls the network (NAPI), which cannot be captured yet`);
  const polls = section('PollList');
  const overflow = section('CqOverflowList');
  if (polls === undefined || overflow === undefined) throw new Unsupported(`${where}: an io_uring this kernel shows without PollList or CqOverflowList in fdinfo cannot be captured yet`);
  const inFlight = `requests in flight (submitted, not completed), which live only in the kernel and cannot be captured`;
  if (polls.length) throw new Unsupported(`${ringName} has ${polls.length} request(s) waiting on a poll (${polls[0]}): ${inFlight}`);
  if (overflow.length) throw new Unsupported(`${ringName} has ${overflow.length} CQE(s) in its overflow list (its CQ ring was full), which cannot be captured yet`);
  const sqEntries = num('SqMask') + 1;
  const cqEntries = num('CqMask') + 1;
  const [sqHead, sqTail, cachedSqHead, cqHead, cqTail, cachedCqTail] = ['SqHead', 'SqTail', 'CachedSqHead', 'CqHead', 'CqTail', 'CachedCqTail'].map(num);
  if (!isPow2(sqEntries) || !isPow2(cqEntries) || sqEntries > MAX_ENTRIES || cqEntries > MAX_CQ_ENTRIES)
    throw new Unsupported(`${ringName} has ${sqEntries} SQ and ${cqEntries} CQ entries, which cannot be captured yet`);
  if (cachedSqHead !== sqHead || cachedCqTail !== cqTail)
    throw new Unsupported(`${ringName} has its SQ head at ${sqHead} in its ring and ${cachedSqHead} in the kernel, its CQ tail at ${cqTail} and ${cachedCqTail}: ${inFlight}`);
  if (cachedCqTail !== cachedSqHead)
    throw new Unsupported(
      `${ringName} has consumed ${cachedSqHead} SQEs and posted ${cachedCqTail} CQEs: ${cachedCqTail < cachedSqHead ? `${inFlight} (or completions skipped with IOSQE_CQE_SKIP_SUCCESS, or not yet posted, which cannot be told apart)` : 'some request posted several (multishot), which cannot be captured yet'}`,
    );
  if (cachedSqHead > ADVANCE_LIMIT)
    throw new Unsupported(`${ringName} has consumed ${cachedSqHead} SQEs, more than the ${ADVANCE_LIMIT} a restore brings a new ring's counters to (by as many NOPs)`);
  if (advanceCalls(cachedSqHead, sqEntries) > ADVANCE_CALLS)
    throw new Unsupported(`${ringName} has consumed ${cachedSqHead} SQEs in batches of at most ${sqEntries}, more than the ${ADVANCE_CALLS} calls a restore makes to bring a new ring's counters there`);
  if (((sqTail - sqHead) >>> 0) > sqEntries || ((cqTail - cqHead) >>> 0) > cqEntries)
    throw new Unsupported(`${ringName} has SQ head ${sqHead} and tail ${sqTail}, CQ head ${cqHead} and tail ${cqTail}, which do not fit its ${sqEntries} and ${cqEntries} entries`);

  // Not in fdinfo: asked of the ring itself, which it leaves as it was.
  const eventfd = addon().ioUringHasEventfd(pid, fdNumber);
  if (eventfd === 1) throw new Unsupported(`${ringName} signals an eventfd of its completions (IORING_REGISTER_EVENTFD), which cannot be captured yet`);
  if (eventfd === -EEXIST)
    throw new Unsupported(`${ringName} takes calls only from the thread that made it (IORING_SETUP_SINGLE_ISSUER), which cannot be captured yet (a restore brings its counters back from a thread of its own)`);
  if (eventfd < 0) throw new Unsupported(`${ringName} cannot be asked whether it signals an eventfd (errno ${-eventfd}), which a capture must know`);
  const taken = seenRings.get(snapshot) ?? new Map<bigint, string>();
  seenRings.set(snapshot, taken);
  const before = taken.get(ino);
  if (before) throw new Unsupported(`${where}: its io_uring is also ${before}'s: one ring held by two descriptors or processes cannot be captured yet`);
  taken.set(ino, where);

  const maps = ringMappings(pid).get(ino) ?? [];
  const rings = maps.filter((m) => m.pgoff === IORING_OFF.SQ_RING || m.pgoff === IORING_OFF.CQ_RING);
  const sqeMaps = maps.filter((m) => m.pgoff === IORING_OFF.SQES);
  if (!rings.length || !sqeMaps.length)
    throw new Unsupported(`${ringName} has its ${!rings.length ? 'rings' : 'SQEs'} not mapped (not yet, or in the application's own memory: IORING_SETUP_NO_MMAP), which cannot be captured yet`);
  if (maps.some((m) => !rings.includes(m) && !sqeMaps.includes(m))) throw new Unsupported(`${ringName} is mapped at an offset this module does not know, which cannot be captured yet`);
  const longest = (ms: RingMapping[]) => ms.reduce((a, b) => (b.end - b.start > a.end - a.start ? b : a));
  const ringMap = longest(rings);
  const sqeMap = longest(sqeMaps);
  // SQE128, CQE32: what the mapped sizes show (see the header).
  let flags = cqEntries !== 2 * sqEntries ? SETUP.CQSIZE : 0;
  if (sqeMap.end - sqeMap.start > pageUp(layout(sqEntries, cqEntries, 0).sqeBytes)) flags |= SETUP.SQE128;
  if (ringMap.end - ringMap.start > pageUp(layout(sqEntries, cqEntries, 0).bytes)) flags |= SETUP.CQE32;
  const ringBytes = addon().readMemory(pid, ringMap.start, Number(ringMap.end - ringMap.start));
  const sqes = addon().readMemory(pid, sqeMap.start, Number(sqeMap.end - sqeMap.start));
  const record: IoUring = {
    sqEntries,
    cqEntries,
    flags,
    sqHead: cachedSqHead,
    cqTail: cachedCqTail,
    mappings: maps.map((m) => ({ start: m.start, length: m.end - m.start, offset: m.pgoff, prot: (m.perms[0] === 'r' ? PROT_READ : 0) | (m.perms[1] === 'w' ? PROT_WRITE : 0), dontfork: m.dontfork })),
    rings: ringBytes,
    sqes,
  };
  const fault = ringFault(record);
  if (fault) throw new Unsupported(`${ringName} ${fault}, which cannot be captured yet`);
  const sqFlags = ringBytes.readUInt32LE(RING.sqFlags);
  if (sqFlags) throw new Unsupported(`${ringName} has SQ flags 0x${sqFlags.toString(16)} raised by the kernel (a CQ overflow, or completions not yet posted): ${inFlight}`);
  return record;
}

/* ---- the image as untrusted input ------------------------------------ */

/** What is wrong with a ring record, if anything: sizes the kernel makes,
 * flags this module asks, counters within the bound and idle, ring memory
 * of the size its layout has and agreeing with the record, mappings of
 * it at page-aligned user addresses. */
function ringFault(g: IoUring): string | undefined {
  if (!isPow2(g.sqEntries) || g.sqEntries > MAX_ENTRIES) return `has ${g.sqEntries} SQ entries (a power of two up to ${MAX_ENTRIES})`;
  if (!isPow2(g.cqEntries) || g.cqEntries > MAX_CQ_ENTRIES || g.cqEntries < g.sqEntries) return `has ${g.cqEntries} CQ entries (a power of two from its ${g.sqEntries} SQ entries up to ${MAX_CQ_ENTRIES})`;
  if (g.flags & ~SETUP_BITS || Boolean(g.flags & SETUP.CQSIZE) !== (g.cqEntries !== 2 * g.sqEntries)) return `has setup flags 0x${g.flags.toString(16)}`;
  if (!(Number.isInteger(g.sqHead) && g.sqHead >= 0 && g.sqHead <= ADVANCE_LIMIT) || g.cqTail !== g.sqHead) return `has SQ head ${g.sqHead} and CQ tail ${g.cqTail} (equal, at most ${ADVANCE_LIMIT})`;
  if (advanceCalls(g.sqHead, g.sqEntries) > ADVANCE_CALLS) return `has SQ head ${g.sqHead} in batches of ${g.sqEntries} (more than ${ADVANCE_CALLS} calls to bring back)`;
  const l = layout(g.sqEntries, g.cqEntries, g.flags);
  const ringLength = BigInt(g.rings.length);
  const sqeLength = BigInt(g.sqes.length);
  if (ringLength < BigInt(RING.cqes) || ringLength % PAGE || ringLength > pageUp(l.bytes)) return `has ${g.rings.length} bytes of rings (whole pages, at most ${pageUp(l.bytes)})`;
  if (!sqeLength || sqeLength % PAGE || sqeLength > pageUp(l.sqeBytes)) return `has ${g.sqes.length} bytes of SQEs (whole pages, at most ${pageUp(l.sqeBytes)})`;
  const r = g.rings;
  const u = (at: number) => r.readUInt32LE(at);
  if (u(RING.sqMask) !== g.sqEntries - 1 || u(RING.cqMask) !== g.cqEntries - 1 || u(RING.sqEntries) !== g.sqEntries || u(RING.cqEntries) !== g.cqEntries)
    return `has rings whose masks and sizes (${u(RING.sqMask)}, ${u(RING.cqMask)}, ${u(RING.sqEntries)}, ${u(RING.cqEntries)}) are not its ${g.sqEntries} and ${g.cqEntries} entries'`;
  if (u(RING.sqHead) !== g.sqHead || u(RING.cqTail) !== g.cqTail) return `has rings whose SQ head ${u(RING.sqHead)} and CQ tail ${u(RING.cqTail)} are not its ${g.sqHead} and ${g.cqTail}`;
  if (((u(RING.sqTail) - g.sqHead) >>> 0) > g.sqEntries || ((g.cqTail - u(RING.cqHead)) >>> 0) > g.cqEntries) return `has SQ tail ${u(RING.sqTail)} and CQ head ${u(RING.cqHead)} beyond its entries`;
  // The pending SQEs and unreaped CQEs must lie in the memory carried.
  if (u(RING.sqTail) !== g.sqHead && ringLength < BigInt(l.array + g.sqEntries * 4)) return 'has SQEs queued but its index array not carried';
  if (u(RING.cqHead) !== g.cqTail && ringLength < BigInt(l.array)) return 'has CQEs to reap but its CQ ring not carried whole';
  if (u(RING.sqFlags) !== 0 || u(RING.cqFlags) & ~CQ_EVENTFD_DISABLED) return `has SQ flags 0x${u(RING.sqFlags).toString(16)} and CQ flags 0x${u(RING.cqFlags).toString(16)}`;
  if (!g.mappings.length || g.mappings.length > 4) return `has ${g.mappings.length} mappings (1 to 4)`;
  for (const m of g.mappings) {
    const region = m.offset === IORING_OFF.SQES ? sqeLength : m.offset === IORING_OFF.SQ_RING || m.offset === IORING_OFF.CQ_RING ? ringLength : -1n;
    if (region < 0n || m.start % PAGE || m.start < PAGE || !m.length || m.length % PAGE || m.length > region || m.start + m.length > 0x7ffffffff000n || m.prot & ~(PROT_READ | PROT_WRITE))
      return `has a mapping of ${m.length} bytes at ${hex(m.start)}, offset ${hex(m.offset)}, protection ${m.prot}`;
  }
  if (!g.mappings.some((m) => m.offset !== IORING_OFF.SQES && m.length === ringLength) || !g.mappings.some((m) => m.offset === IORING_OFF.SQES && m.length === sqeLength))
    return 'has no mapping the length of its rings or SQEs carried';
  return undefined;
}

/** What is wrong with a descriptor's io_uring record, if anything (for
 * validate.ts's "corrupt image" line). */
export function ioUringRecordFault(fd: Fd): string | undefined {
  const g = fd.ioUring;
  if (fd.kind !== FdKind.IO_URING) return g ? 'has an io_uring but is not an io_uring descriptor' : undefined;
  if (!g) return 'is an io_uring descriptor with no ring';
  const fault = ringFault(g);
  return fault ? `is an io_uring that ${fault}` : undefined;
}

/** A process's rings' mappings: apart from each other and from every
 * mapping the memory restore makes (each is mapped with MAP_FIXED, which
 * would unmap what is there). */
export function checkIoUringMappings(p: Process, corrupt: (what: string) => never): void {
  const all = p.fds.flatMap((fd) => (fd.kind === FdKind.IO_URING ? (fd.ioUring?.mappings ?? []).map((m) => ({ m, fd: fd.fd })) : []));
  const overlaps = (a: IoUringMapping, start: bigint, end: bigint) => a.start < end && start < a.start + a.length;
  all.forEach(({ m, fd }, i) => {
    const where = `process ${p.vpid} fd ${fd}'s io_uring mapping at ${hex(m.start)}`;
    for (const v of p.vmas) if (overlaps(m, v.start, v.end)) corrupt(`${where} overlaps a mapping`);
    for (const ring of p.aioRings ?? []) if (overlaps(m, ring.address, ring.address + ring.length)) corrupt(`${where} overlaps an AIO context`);
    all.slice(0, i).forEach((o) => {
      if (overlaps(m, o.m.start, o.m.start + o.m.length)) corrupt(`${where} overlaps another io_uring mapping`);
    });
  });
}

/* ---- restore --------------------------------------------------------- */

/** Where a process's rings are mapped: kept free by the restore until
 * then (its scratch area goes elsewhere). */
export function ioUringRanges(p: Process): { start: bigint; end: bigint }[] {
  return p.fds.flatMap((fd) => (fd.kind === FdKind.IO_URING ? (fd.ioUring?.mappings ?? []).map((m) => ({ start: m.start, end: m.start + m.length })) : []));
}

/** The ring made again inside the restored process, its counters and
 * memory as they were, mapped where they were; its number there (the
 * kernel makes io_uring descriptors close-on-exec, as restoreFds
 * expects). After the process's memory (its addresses are free then: the
 * image maps nothing there). The record was checked (ioUringRecordFault,
 * checkIoUringMappings). */
export function restoreIoUring(r: RemoteProcess, fd: Fd): number {
  const g = fd.ioUring;
  if (!g) throw new Error(`io_uring fd ${fd.fd} has no ring in the image`);
  const where = `process ${r.pid}: io_uring fd ${fd.fd}`;
  r.reset();
  const params = Buffer.alloc(120);
  params.writeUInt32LE(g.cqEntries, 4);
  params.writeUInt32LE(g.flags, 8);
  const at = r.put(params);
  const made = Number(r.call(`${where}: io_uring_setup(${g.sqEntries})`, SYS.io_uring_setup, [g.sqEntries, at]));
  const got = r.get(at, 120);
  const sqOff = { head: got.readUInt32LE(40), tail: got.readUInt32LE(44), array: got.readUInt32LE(64) };
  const cqOff = { head: got.readUInt32LE(80), tail: got.readUInt32LE(84), cqes: got.readUInt32LE(100) };
  const l = layout(g.sqEntries, g.cqEntries, g.flags);
  if (got.readUInt32LE(0) !== g.sqEntries || got.readUInt32LE(4) !== g.cqEntries || !(got.readUInt32LE(20) & IORING_FEAT_SINGLE_MMAP))
    throw new AppshotError(`${where}: io_uring_setup made a ring of ${got.readUInt32LE(0)} and ${got.readUInt32LE(4)} entries here (features 0x${got.readUInt32LE(20).toString(16)}), the image's has ${g.sqEntries} and ${g.cqEntries}`);
  if (sqOff.head !== RING.sqHead || sqOff.tail !== RING.sqTail || cqOff.head !== RING.cqHead || cqOff.tail !== RING.cqTail || cqOff.cqes !== RING.cqes || sqOff.array !== l.array)
    throw new AppshotError(`${where}: this kernel lays out io_uring rings otherwise (SQ array at ${sqOff.array}, CQEs at ${cqOff.cqes})`);
  // The image's lengths: how much of the ring its mappings show.
  const ringBytes = g.rings.length;
  const sqeBytes = g.sqes.length;
  if (g.sqHead) {
    try {
      // The new ring's whole sizes, from its entries (the kernel made it
      // so): never the image's lengths, which may be shorter than what
      // the NOPs write (the index array, every SQE slot).
      addon().ioUringAdvance({ pid: r.pid, fd: made, sqEntries: g.sqEntries, cqEntries: g.cqEntries, ringBytes: Number(pageUp(l.bytes)), sqeBytes: Number(pageUp(l.sqeBytes)), arrayOffset: l.array, sqeSize: g.flags & SETUP.SQE128 ? 128 : 64, sqHead: g.sqHead, cqTail: g.cqTail });
    } catch (e) {
      throw new AppshotError(`${where}: bringing its counters to SQ head ${g.sqHead}, CQ tail ${g.cqTail}: ${(e as Error).message}`);
    }
  }
  // Mapped where it was; then the image's ring memory written over the
  // new ring's, once the kernel's counters are seen to agree.
  for (const m of g.mappings) {
    placeMapping(r, m, made, `${where}: mapping it at ${hex(m.start)}`);
    if (m.dontfork) r.call(`${where}: MADV_DONTFORK at ${hex(m.start)}`, SYS.madvise, [m.start, m.length, MADV_DONTFORK]);
  }
  const ringAt = g.mappings.find((m) => m.offset !== IORING_OFF.SQES && m.length === BigInt(ringBytes))!;
  const sqeAt = g.mappings.find((m) => m.offset === IORING_OFF.SQES && m.length === BigInt(sqeBytes))!;
  const now = addon().readMemory(r.pid, ringAt.start, RING.cqes);
  for (const k of ['sqHead', 'cqTail', 'sqMask', 'cqMask', 'sqEntries', 'cqEntries'] as const)
    if (now.readUInt32LE(RING[k]) !== g.rings.readUInt32LE(RING[k]))
      throw new AppshotError(`${where}: its ring's ${k} is ${now.readUInt32LE(RING[k])} here, ${g.rings.readUInt32LE(RING[k])} in the image`);
  addon().writeMemory(r.pid, sqeAt.start, g.sqes);
  addon().writeMemory(r.pid, ringAt.start, g.rings);
  return made;
}

/** The highest user address mmap gives (47-bit, without a hint above). */
const TASK_TOP = 0x7ffffffff000n;

/**
 * Maps `m` of ring descriptor `fd` at its address. The kernel maps an
 * io_uring only where it chooses: an address given is refused, with
 * MAP_FIXED too, and so is moving it there (mremap asks the same hook:
 * io_uring_get_unmapped_area). So the holes of the address space it
 * would choose instead are held meanwhile by inaccessible placeholders
 * (PROT_NONE, MAP_NORESERVE: an entry in the mapping list, no memory),
 * the ring mapped where it may, and the placeholders unmapped. The
 * kernel searches from the top of the mapping area down: first only the
 * holes above the address are held (few, near the libraries and the
 * stack); if the kernel still chose another place (the address lies
 * above this process's mapping base, which is randomized anew), every
 * hole but the one wanted is held and it is mapped again. The hole is
 * free: the image maps nothing there (checkIoUringMappings), nor does the
 * restore (ioUringRanges).
 */
function placeMapping(r: RemoteProcess, m: IoUringMapping, fd: number, what: string): void {
  const low = pageUp(BigInt(Number(readFileSync('/proc/sys/vm/mmap_min_addr', 'utf8').trim()) || 65536));
  const end = m.start + m.length;
  for (const everywhere of [false, true]) {
    const holes: [bigint, bigint][] = [];
    let at = low;
    const maps = readMaps(r.pid).sort((a, b) => (a.start < b.start ? -1 : 1));
    for (const v of [...maps, { start: TASK_TOP, end: TASK_TOP }]) {
      if (v.start > at) holes.push([at, v.start < TASK_TOP ? v.start : TASK_TOP]);
      if (v.end > at) at = v.end;
      if (at >= TASK_TOP) break;
    }
    const home = holes.find(([a, b]) => a <= m.start && end <= b);
    if (!home) throw new AppshotError(`${what}: the addresses are taken in the restored process`);
    const fill = holes
      .flatMap(([a, b]): [bigint, bigint][] => (a === home[0] ? [[a, m.start], [end, b]] : [[a, b]]))
      .filter(([a, b]) => b > a && (everywhere || a >= end));
    const mapped = withPlaceholders(r, fill, what, () => r.call(what, SYS.mmap, [0, m.length, m.prot, MAP_SHARED | MAP_POPULATE, fd, m.offset]));
    if (mapped === m.start) return;
    r.call(`${what}: unmapping it from ${hex(mapped)}`, SYS.munmap, [mapped, m.length]);
    if (everywhere) throw new AppshotError(`${what}: the kernel mapped it at ${hex(mapped)}`);
  }
}

/** `run` with every range of `fill` held by a placeholder; they are
 * released after, whatever happens. */
function withPlaceholders(r: RemoteProcess, fill: [bigint, bigint][], what: string, run: () => bigint): bigint {
  const placed: [bigint, bigint][] = [];
  const PER = 200;
  try {
    for (let i = 0; i < fill.length; i += PER) {
      const batch = r.batch();
      const part = fill.slice(i, i + PER);
      for (const [a, b] of part) batch.add(`${what}: holding 0x${a.toString(16)}-0x${b.toString(16)}`, SYS.mmap, [a, b - a, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0]);
      const results = batch.run();
      part.forEach((p, j) => {
        if (results[j] === p[0]) placed.push(p);
      });
      if (placed.length !== i + part.length) throw new AppshotError(`${what}: a placeholder landed elsewhere`);
    }
    return run();
  } finally {
    for (let i = 0; i < placed.length; i += PER) {
      const batch = r.batch();
      for (const [a, b] of placed.slice(i, i + PER)) batch.add(`${what}: releasing 0x${a.toString(16)}`, SYS.munmap, [a, b - a]);
      batch.run();
    }
  }
}

export function describeIoUring(g: IoUring | undefined): string {
  if (!g) return 'io_uring';
  const u = (at: number) => g.rings.readUInt32LE(at);
  const flags = [g.flags & SETUP.CQSIZE && 'CQSIZE', g.flags & SETUP.SQE128 && 'SQE128', g.flags & SETUP.CQE32 && 'CQE32'].filter(Boolean).join('|');
  return `io_uring ${g.sqEntries}/${g.cqEntries} entries${flags ? ` ${flags}` : ''}, ${g.sqHead} SQEs consumed, ${(u(RING.sqTail) - g.sqHead) >>> 0} queued, ${(g.cqTail - u(RING.cqHead)) >>> 0} CQEs not reaped, mapped at ${g.mappings.map((m) => hex(m.start)).join(', ')}`;
}
