/**
 * Mutexes that are not robust, held across a restore: glibc's recursive,
 * error-checking and priority-inheritance mutexes keep their holder's
 * system TID (in __owner, and a PI one in its futex word too), which the
 * restore changes. Nothing lists them and a search of memory for their
 * shape would be a guess, so they are mended where the program names
 * them: the preload library's mutex calls rewrite an owner that is an old
 * TID of one of the process's threads (addon/preload/preload_mutex.c),
 * from the moves (old TID → new TID) the restore writes into the library
 * (appshot_tid_moves).
 *
 * A mutex left untouched from one restore to the next still names the
 * TID from before the first. So the snapshot reads the moves the process
 * holds and records, for each thread, the TIDs it had before (its earlier
 * TIDs), and the next restore moves those to its new TID too, with the
 * TID it had at this snapshot. The library holds a bounded number of
 * moves (its `capacity`): the oldest are dropped first, and said so.
 */
import type { Process, Thread } from '../image/types.js';
import { addon } from '../native.js';
import { tidMovesOf } from '../ptrace/windows.js';
import { readMaps, type MapsLine } from './memory.js';

/** struct appshot_tid_moves: int32 count, int32 capacity, int32 glibc's
 * TID offset in a thread's descriptor (0: not known), int32 reserved, then
 * `capacity` pairs of int32 (old TID, new TID). */
const HEADER = 16;
const MOVE = 8;
/** The moves the library holds (TID_MOVES_MAX in preload_mutex.c): fixed,
 * never read from a process, whose memory the image wrote. */
const CAPACITY = 256;
/** The kernel's PID_MAX_LIMIT: no TID is above it. */
const TID_MAX = 4 * 1024 * 1024;


/** The moves written at `address` in stopped process `pid`, or none where
 * they cannot be read or do not look like ours. */
function readMoves(pid: number, address: bigint): { oldTid: number; newTid: number }[] {
  try {
    const header = addon().readMemory(pid, address, HEADER);
    const count = header.readInt32LE(0);
    const capacity = header.readInt32LE(4);
    if (!(capacity === CAPACITY && count > 0 && count <= capacity)) return [];
    const data = addon().readMemory(pid, address + BigInt(HEADER), count * MOVE);
    const moves = [];
    for (let i = 0; i < count; i++) moves.push({ oldTid: data.readInt32LE(i * MOVE), newTid: data.readInt32LE(i * MOVE + 4) });
    return moves;
  } catch {
    return [];
  }
}

/**
 * At snapshot: where process `pid` (stopped, mappings `maps`) keeps its
 * moves, into `proc`, and each thread's earlier TIDs (`proc.threads`,
 * their `tid` the TID now): the old TIDs the restore moved to it.
 */
export function dumpTidMoves(pid: number, maps: MapsLine[], proc: Process): void {
  const address = tidMovesOf(pid, maps);
  if (address === undefined) return;
  // A process stopped while the dynamic loader is still mapping the
  // library (an exec just made, as a forking program's children are) has
  // the symbol's page mapped, but not yet writable: nothing of the library
  // ran, so there are no moves, and an address there would make the image
  // fail its own check at restore (checkTidMoves), seen under load.
  if (!maps.some((m) => m.start <= address && address + BigInt(HEADER) <= m.end && m.perms[1] === 'w' && m.perms[3] === 'p')) return;
  proc.tidMovesAddress = address;
  const moves = readMoves(pid, address);
  for (const t of proc.threads) {
    const earlier = moves.filter((m) => m.newTid === t.tid && m.oldTid !== t.tid && m.oldTid > 0).map((m) => m.oldTid);
    if (earlier.length) t.earlierTids = [...new Set(earlier)];
  }
}

/** Whether `tid` could be a TID. */
const isTid = (tid: number) => Number.isInteger(tid) && tid > 0 && tid <= TID_MAX;

/** An image's moves address and earlier TIDs (untrusted input): the
 * address inside a private writable mapping of the process (the restore
 * writes there), each thread's earlier TIDs TIDs, no more than a table
 * holds. */
export function checkTidMoves(p: Process, corrupt: (what: string) => never): void {
  const address = p.tidMovesAddress ?? 0n;
  const PROT_WRITE = 2;
  if (address && !p.vmas.some((v) => v.start <= address && address + BigInt(HEADER) <= v.end && v.prot & PROT_WRITE && !v.shared))
    corrupt(`process ${p.vpid}'s table of TID moves at 0x${address.toString(16)} is not in private writable memory of its own`);
  let total = 0;
  for (const t of p.threads) {
    const earlier = t.earlierTids ?? [];
    if (earlier.length > CAPACITY || !earlier.every(isTid)) corrupt(`thread ${t.vtid}'s earlier TIDs are not TIDs, or more than ${CAPACITY}`);
    total += earlier.length;
  }
  if (total > CAPACITY) corrupt(`process ${p.vpid}'s threads have ${total} earlier TIDs, more than its table of TID moves holds (${CAPACITY})`);
}

/** The moves process `p`'s threads make, their TIDs now `tids` (in the
 * order of p.threads): first every thread's TID at the snapshot, then the
 * earlier ones, newest first, so that a full table loses the oldest. An
 * old TID is moved once (the first claim wins), and never to itself. */
export function tidMoves(threads: Thread[], tids: number[]): { oldTid: number; newTid: number }[] {
  const moves: { oldTid: number; newTid: number }[] = [];
  const seen = new Set<number>();
  const add = (oldTid: number, newTid: number) => {
    if (oldTid === newTid || seen.has(oldTid) || !isTid(oldTid)) return;
    seen.add(oldTid);
    moves.push({ oldTid, newTid });
  };
  threads.forEach((t, i) => add(t.tid, tids[i]));
  const depth = Math.max(0, ...threads.map((t) => t.earlierTids?.length ?? 0));
  for (let d = 0; d < depth; d++) threads.forEach((t, i) => t.earlierTids?.[d] !== undefined && add(t.earlierTids[d], tids[i]));
  return moves;
}

/**
 * At restore, once the threads have their new TIDs (`tids`, in the order
 * of p.threads): the process's moves written into its preload library,
 * which mends its mutexes from them as the program uses them. Returns
 * what was not kept (moves beyond the library's capacity), to be warned
 * about. `maps`: the process's mappings, if the caller has them read
 * since its memory was made.
 */
export function restoreTidMoves(pid: number, p: Process, tids: number[], maps?: MapsLine[]): string[] {
  if (!p.tidMovesAddress) return [];
  const moves = tidMoves(p.threads, tids);
  if (!moves.length) return [];
  // Where the library the restored process maps keeps the table, by its
  // symbol: the image's address is only a sign the process had one (an
  // image could name any writable memory of the process).
  const address = tidMovesOf(pid, maps ?? readMaps(pid));
  if (address === undefined) return ['its preload library\'s table of TID moves is not found: mutexes held across the restore keep their old owner TIDs'];
  const capacity = CAPACITY;
  const kept = moves.slice(0, capacity);
  const table = Buffer.alloc(HEADER + kept.length * MOVE);
  table.writeInt32LE(kept.length, 0);
  table.writeInt32LE(capacity, 4);
  table.writeInt32LE(p.glibcTidOffset, 8);
  kept.forEach((m, i) => {
    table.writeInt32LE(m.oldTid, HEADER + i * MOVE);
    table.writeInt32LE(m.newTid, HEADER + i * MOVE + 4);
  });
  // The process is stopped: the count and the moves are seen together.
  addon().writeMemory(pid, address, table);
  const dropped = moves.length - kept.length;
  return dropped ? [`${dropped} TIDs its threads had before earlier restores are beyond its preload library's ${capacity} moves: a mutex still naming one of them keeps it`] : [];
}
