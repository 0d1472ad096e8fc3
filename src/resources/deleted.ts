/**
 * Files still open after they were deleted, and memfds (such files from
 * the start): a deleted file lives only as long as its last descriptor or
 * mapping, so the image keeps its bytes (its data ranges only: holes stay
 * holes), and a restore makes the file again once, at its exact size and
 * mode, and opens each open file description of it anew. A memfd comes
 * back as a memfd of the same name, then takes its seals (F_ADD_SEALS)
 * once it is filled. A deleted file or memfd that is also mapped shared
 * is the same object in the mapping (see sharedMemoryFd in memory.ts).
 */
import { uniqueTag } from '../holder.js';
import { type BigIntStats, closeSync, constants as fs, fchmodSync, fchownSync, fstatSync, ftruncateSync, lstatSync, openSync, readlinkSync, statfsSync, unlinkSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { AppshotError } from '../errors.js';
import { type Fd, FdKind, type FileIdentity, type Process } from '../image/types.js';
import { isOwnSnapshot } from '../image/format.js';
import { ownCreds, strangeOwner } from './creds.js';
import { addon } from '../native.js';
import type { DumpContext, RestoreContext } from './context.js';
import { firstHolderIdentities, refusal } from './fsident.js';

const MEMFD_PREFIX = '/memfd:';
const MFD_ALLOW_SEALING = 2;
const MFD_EXEC = 0x10;
const EINVAL = 22;
const O_CLOEXEC = 0o2000000;
/** O_TMPFILE: __O_TMPFILE | O_DIRECTORY. */
const O_TMPFILE_BITS = 0o20000000 | 0o200000;

/* ---- dump ------------------------------------------------------------- */

/** What the kernel appends to the name of a file whose name was removed,
 * in /proc/PID/exe, fd/N, cwd and maps. */
export const DELETED = ' (deleted)';

/**
 * The file that /proc shows as `shown` (a link's text, a maps line's
 * name): the name to record, and whether it was deleted. The kernel adds
 * " (deleted)" to a removed file's name, but a file still there may be
 * named so itself ("x (deleted)", or ".../a b\n) R 1 (deleted)": hunt
 * h296), and taken for deleted it came back as a stand-in copy (another
 * name and inode) or was refused as "linked elsewhere". So the file
 * decides, not the suffix: deleted unless the whole name shown, looked
 * up now, is that very file (`same`: by device and inode, as the
 * caller's stat of the /proc link or the maps line gives them). Its own
 * name is not followed (the link names the file itself, an O_PATH
 * symlink too).
 */
export function shownFile(shown: string, same: (named: BigIntStats) => boolean): { name: string; deleted: boolean } {
  if (!shown.endsWith(DELETED)) return { name: shown, deleted: false };
  let named: BigIntStats | undefined;
  try {
    named = shown.startsWith('/') ? lstatSync(shown, { bigint: true }) : undefined;
  } catch {
    // Nothing at the whole name: the suffix is the kernel's.
  }
  if (named && same(named)) return { name: shown, deleted: false };
  return { name: shown.slice(0, -DELETED.length), deleted: true };
}

/** shownFile for a /proc link whose target `st` is (its stat). */
export function shownLinkFile(shown: string, st: BigIntStats): { name: string; deleted: boolean } {
  return shownFile(shown, (named) => named.dev === st.dev && named.ino === st.ino);
}

/** The deleted file's bytes into the image, once per file; a memfd's
 * seals with them. */
export function saveDeletedContents(ctx: DumpContext, pid: number, fd: number, index: number): void {
  saveDeletedFrom(ctx, `/proc/${pid}/fd/${fd}`, index);
}

/** The same for a deleted file read through `procPath` (a process's
 * /proc/PID/exe: an executable deleted or replaced since it was run, as a
 * package upgrade does under a running server). */
export function saveDeletedFrom(ctx: DumpContext, procPath: string, index: number): void {
  const id = ctx.image.files[index];
  if (id.contents) return;
  const f = openWithoutAccessTime(procPath);
  try {
    // Its times before our read, which moves the access time where the
    // kernel refuses us O_NOATIME (a file neither ours nor CAP_FOWNER's).
    const st = fstatSync(f, { bigint: true });
    id.atimeNs = st.atimeNs;
    id.mtimeNs = st.mtimeNs;
    if (id.path.startsWith(MEMFD_PREFIX)) id.seals = Math.max(0, addon().fileSeals(f));
    const { offset, runs } = ctx.pages.appendFd(f, Number(id.size));
    id.contents = { offset: BigInt(offset), runs: Array.from(runs), fromParent: [] };
    const allocated = allocatedPastData(f, st.blocks, id.contents.runs);
    if (allocated.length) id.allocated = allocated;
  } finally {
    closeSync(f);
  }
}

const PAGE = 4096n;
/** FS_IOC_FIEMAP: _IOWR('f', 11, struct fiemap), whose header is 32 bytes
 * and each extent 56 (linux/fiemap.h). */
const FS_IOC_FIEMAP = 0xc020660b;
const FIEMAP_HEADER = 32;
const FIEMAP_EXTENT = 56;
const FIEMAP_EXTENT_LAST = 0x1;
/** Ranges an image records past a file's data: a file fragmented past
 * this has neighbouring ranges joined (the blocks between allocated too). */
export const MAX_ALLOCATED_RANGES = 1024;
/** Past this, no deleted file of an image has blocks (validate.ts): a
 * snapshot records none there, which its restore would refuse. */
const ALLOCATED_BOUND = 1n << 40n;

/**
 * The blocks deleted file `f` has allocated past its saved data (`runs`:
 * pairs of first page and count), as [offset, length) byte pairs, whole
 * pages: what fallocate made and nothing was written to (an unwritten
 * extent, which SEEK_DATA takes for a hole, so the copy has none of it),
 * also past its size (FALLOC_FL_KEEP_SIZE: a log or database file that
 * reserves its room ahead). Asked of the file system (FIEMAP) only when
 * its block count (st_blocks, `blocks`) says there are more than the data
 * holds. None where the file system cannot say where they are: tmpfs and
 * memfds, which have no FIEMAP and whose SEEK_DATA counts a page
 * fallocate made, never written, as a hole (README: not carried). None
 * at or past 2^40 bytes (ALLOCATED_BOUND), where an image has none.
 */
function allocatedPastData(f: number, blocks: bigint, runs: number[]): bigint[] {
  let dataPages = 0n;
  for (let i = 1; i < runs.length; i += 2) dataPages += BigInt(runs[i]);
  if (blocks * 512n <= dataPages * PAGE) return [];
  const extents = fileExtents(f, ALLOCATED_BOUND / PAGE);
  if (!extents) return [];
  // The pages of each extent not saved as data.
  const ranges: [bigint, bigint][] = [];
  let r = 0;
  for (const [start, end] of extents) {
    let at = start;
    while (r < runs.length && BigInt(runs[r] + runs[r + 1]) <= at) r += 2;
    for (let k = r; k < runs.length && at < end; k += 2) {
      const dataStart = BigInt(runs[k]);
      const dataEnd = dataStart + BigInt(runs[k + 1]);
      if (dataStart >= end) break;
      if (dataStart > at) ranges.push([at, dataStart]);
      if (dataEnd > at) at = dataEnd;
    }
    if (at < end) ranges.push([at, end]);
  }
  return joinToFit(ranges, runs, MAX_ALLOCATED_RANGES).flatMap(([a, b]) => [a * PAGE, (b - a) * PAGE]);
}

/** `ranges` (pages, ascending, apart) made at most `max` by closing the
 * gaps between neighbours that cost least, as few as needed: a gap's cost
 * is its pages that are not saved data (`runs`), which the restore would
 * allocate and the file never had (a gap over saved data costs nothing:
 * those blocks are allocated anyway). Never fewer blocks than the file
 * had; as few more as the bound allows. (Every other gap closed, as
 * before, gave a sparse file with scattered preallocations half of its
 * holes: review r393.) */
export function joinToFit(ranges: [bigint, bigint][], runs: number[], max: number): [bigint, bigint][] {
  const over = ranges.length - max;
  if (over <= 0) return ranges;
  // Each gap's cost, its data pages counted by one walk over the runs.
  const cost: bigint[] = [];
  let r = 0;
  for (let i = 0; i + 1 < ranges.length; i++) {
    const [from, to] = [ranges[i][1], ranges[i + 1][0]];
    let data = 0n;
    while (r < runs.length && BigInt(runs[r] + runs[r + 1]) <= from) r += 2;
    for (let k = r; k < runs.length && BigInt(runs[k]) < to; k += 2) {
      const a = BigInt(runs[k]) > from ? BigInt(runs[k]) : from;
      const end = BigInt(runs[k] + runs[k + 1]);
      data += (end < to ? end : to) - a;
    }
    cost.push(to - from - data);
  }
  const order = cost.map((_, i) => i).sort((x, y) => (cost[x] < cost[y] ? -1 : cost[x] > cost[y] ? 1 : x - y));
  const closed = new Set(order.slice(0, over));
  const joined: [bigint, bigint][] = [[...ranges[0]]];
  for (let i = 1; i < ranges.length; i++) {
    if (closed.has(i - 1)) joined[joined.length - 1][1] = ranges[i][1];
    else joined.push([...ranges[i]]);
  }
  return joined;
}

/** A file scattered in more pieces than this (apart in the file, not
 * merely on the disk) records no blocks past its data: the walk's memory
 * stays bounded (review r393: a fragmented database file at snapshot). */
const MAX_EXTENTS_WALKED = 65536;

/** File `f`'s extents (FIEMAP) below page `bound`, whole pages, ascending
 * and merged (logical neighbours are one: a fragmented file's list stays
 * short): [first page, page past the end); undefined where its file
 * system has no FIEMAP, or answers it with any error (the blocks are a
 * best-effort extra: never a reason to fail a snapshot). Not synced
 * (FIEMAP_FLAG_SYNC would write the application's dirty pages out): data
 * not yet on disk shows as a delayed extent, saved as data anyway. An
 * answer that does not move on (a file system that ignores fm_start, an
 * extent of no length) ends the walk: undefined; so do more than
 * MAX_EXTENTS_WALKED pieces. */
function fileExtents(f: number, bound: bigint): [bigint, bigint][] | undefined {
  const count = 256;
  const buf = Buffer.alloc(FIEMAP_HEADER + count * FIEMAP_EXTENT);
  const out: [bigint, bigint][] = [];
  let from = 0n;
  for (;;) {
    buf.fill(0);
    buf.writeBigUInt64LE(from, 0);
    buf.writeBigUInt64LE(0xffffffffffffffffn - from, 8);
    buf.writeUInt32LE(count, 24);
    try {
      addon().ioctl(f, FS_IOC_FIEMAP, buf);
    } catch {
      return undefined;
    }
    const mapped = buf.readUInt32LE(20);
    let last = mapped === 0;
    const before = from;
    for (let i = 0; i < mapped; i++) {
      const at = FIEMAP_HEADER + i * FIEMAP_EXTENT;
      const logical = buf.readBigUInt64LE(at);
      const end = logical + buf.readBigUInt64LE(at + 16);
      if (buf.readUInt32LE(at + 40) & FIEMAP_EXTENT_LAST) last = true;
      if (end <= from) continue;
      const range: [bigint, bigint] = [logical / PAGE, (end + PAGE - 1n) / PAGE];
      if (range[0] >= bound) return out;
      if (range[1] > bound) range[1] = bound;
      const prev = out[out.length - 1];
      if (prev && range[0] <= prev[1]) prev[1] = range[1] > prev[1] ? range[1] : prev[1];
      else if (out.push(range) > MAX_EXTENTS_WALKED) return undefined;
      from = end;
    }
    if (last) return out;
    if (from <= before) return undefined;
  }
}

/** `path` opened read-only with O_NOATIME: the snapshot's read of an
 * application's file is not the program's, and would move its access time
 * under the application (left running, or resumed after a refused
 * snapshot), which its fstat shows. The kernel allows the flag to the
 * file's owner and to CAP_FOWNER only: for anyone else, opened as before. */
export function openWithoutAccessTime(path: string): number {
  try {
    return openSync(path, fs.O_RDONLY | fs.O_NOATIME);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') throw e;
    return openSync(path, 'r');
  }
}

/** A memfd's seals (F_GET_SEALS), read through a descriptor of ours for
 * it; undefined for anything else. */
export function memfdSeals(path: string, fd: number): number | undefined {
  return path.startsWith(MEMFD_PREFIX) ? Math.max(0, addon().fileSeals(fd)) : undefined;
}

/** What is wrong with the times and the allocation file `i` of an image
 * records (untrusted: validate.ts), or undefined. Times only on a deleted
 * file; its blocks past its data only on one whose data is saved, as
 * allocatedPastData makes them: whole pages in [offset, length) pairs,
 * ascending and apart, at most MAX_ALLOCATED_RANGES of them, all below
 * 2^40 (what an image's deleted file may be): what a restore allocates is
 * then never more than its data and those ranges. (A range may cover
 * saved pages where allocatedPastData joined ranges: allocating them again
 * costs nothing.) */
export function deletedFileRecordFault(f: FileIdentity, i: number): string | undefined {
  if (f.atimeNs !== undefined && !f.deleted) return `file ${i} carries an access time but is not a deleted file`;
  const a = f.allocated ?? [];
  if (!a.length) return undefined;
  if (!f.deleted || !f.contents) return `file ${i} carries blocks past its data but is not a deleted file with its data saved`;
  // A memfd's file system (shmem) has no FIEMAP: a snapshot never finds
  // any there, and a restore would commit memory for them.
  if (f.path.startsWith(MEMFD_PREFIX)) return `file ${i} carries blocks past its data but is a memfd, which has none a snapshot can find`;
  const bad = `deleted file ${i}'s blocks past its data`;
  if (a.length % 2 || a.length > 2 * MAX_ALLOCATED_RANGES) return `${bad} are ${a.length} numbers (pairs, at most ${MAX_ALLOCATED_RANGES})`;
  let end = -1n;
  for (let k = 0; k < a.length; k += 2) {
    const [at, length] = [a[k], a[k + 1]];
    if (at % PAGE || length % PAGE || length <= 0n || at <= end || at + length > 1n << 40n) return `${bad}: ${length} bytes at ${at} (whole pages, ascending, apart, below 2^40)`;
    end = at + length;
  }
  return undefined;
}

/* ---- restore ---------------------------------------------------------- */

/** Our descriptor for one open file description of a deleted file (the
 * driver asks once per description): the file, made the first time, opened
 * again with the description's flags. Its offset is the caller's. */
export function openDeletedFile(h: RestoreContext, fd: Fd): number {
  const anchor = deletedFileAnchor(h, fd.file);
  // Flags that ruled how the name was looked up, which the kernel keeps
  // in the description's flags, and which the open of the magic link
  // /proc/self/fd/N cannot take: O_NOFOLLOW, which every mkstemp-style
  // temporary file is opened with (Python's tempfile: gunicorn's worker
  // heartbeat files), fails with ELOOP; O_TMPFILE's bits (__O_TMPFILE |
  // O_DIRECTORY: MariaDB's temporary files) with ENOTDIR on the anchor, a
  // regular file. The one trace of leaving them out is F_GETFL without them.
  return h.keep(openSync(`/proc/self/fd/${anchor}`, fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC | fs.O_NOFOLLOW | O_TMPFILE_BITS)));
}

/** Our read-write descriptor for deleted file `index` of the image, made
 * once for the whole restore: a memfd again, or a file made beside where
 * it was (or in /tmp) and deleted again; given its owner, filled (as
 * that owner: fillAsOwner), then cut to its exact size, given its mode,
 * then (a memfd) its seals. */
export function deletedFileAnchor(h: RestoreContext, index: number): number {
  return h.once(`deleted file ${index}`, () => {
    const id = h.image.files[index];
    const f = id.path.startsWith(MEMFD_PREFIX) ? makeMemfd(h, id) : makeUnlinked(h, id, index);
    const exactOwner = giveOwner(h, f, id, index);
    fillAsOwner(h, f, id, index);
    ftruncateSync(f, Number(id.size));
    allocateAndMode(h, f, id, index, exactOwner);
    sealMemfd(h, f, id.seals, mappedSharedWritable(h, id));
    giveTimesAtTheEnd(h, f, id, index);
    return f;
  });
}

/** A deleted executable made again (deletedExecutable): our read-only
 * descriptor, the name /proc shows for it (its link's text, " (deleted)"
 * and all), and, where that is not the name it had, why. */
export interface RemadeExecutable {
  fd: number;
  shown: string;
  otherName?: string;
}

/** Our read-only descriptor (the restore's, closed at its end: never the
 * caller's to close) of deleted file `index` made again as a process's
 * executable: a copy made once for every process that ran it, filled and
 * given its owner and mode, whose writable descriptor is closed before it
 * is handed over, as PR_SET_MM_MAP's exe_fd must be a file nobody may
 * write (ETXTBSY, as for execve). Made at its own name where that is
 * free and the restorer can set an executable (madeAtItsName), so
 * /proc/PID/exe reads what it read; elsewhere beside it, with the reason
 * (none where it cannot be set: the restore says that instead). A descriptor or shared mapping of the
 * same deleted file gets deletedFileAnchor's file, another inode. */
export function deletedExecutable(h: RestoreContext, index: number): RemadeExecutable {
  return h.once(`deleted executable ${index}`, () => {
    const id = h.image.files[index];
    const made = id.path.startsWith(MEMFD_PREFIX) ? { f: makeMemfd(h, id) } : mayRestorerSetExecutable() ? madeAtItsName(h, id, index) : { f: makeUnlinked(h, id, index) };
    const f = made.f;
    try {
      const exactOwner = giveOwner(h, f, id, index);
      fillAsOwner(h, f, id, index);
      ftruncateSync(f, Number(id.size));
      allocateAndMode(h, f, id, index, exactOwner);
      const exe = h.keep(openSync(`/proc/self/fd/${f}`, fs.O_RDONLY | O_CLOEXEC));
      giveTimesAtTheEnd(h, exe, id, index);
      const shown = readlinkSync(`/proc/self/fd/${exe}`);
      return { fd: exe, shown, ...(made.otherName ? { otherName: made.otherName } : {}) };
    } finally {
      h.release([f]);
    }
  });
}

/**
 * Deleted file `index` (an executable) made again at its own name, then
 * removed from it at once, as the program's was: the kernel keeps the
 * name a file was removed from, so /proc/PID/exe (and fd/N) read
 * "NAME (deleted)" as they did, which a restore made elsewhere cannot
 * give (the name /proc shows is the one the file had in its directory
 * when it was removed).
 *
 * The path is the image's, its directories the application's user's, and
 * the restorer may be root (review r413 F1: root looking the path up again
 * to check and remove its file could be sent, by a directory swapped for
 * a symlink, to remove a file of that name anywhere). So it is all one
 * native operation (exename.c), done as the file's first holder (fsident):
 * the directory opened once, the file made in it (O_EXCL|O_NOFOLLOW: never
 * over a file there nor through a link), checked by its inode and removed
 * through that same directory descriptor, and found to have no name left
 * (F4). What it makes or removes is what the application's own process
 * could, whatever the restorer may. Inside that one directory, one who may
 * write it can still rename a file over the name between the check and the
 * removal (no conditional unlink exists), which is then removed instead.
 *
 * For that instant the name has a file, empty, mode 0600, the holder's:
 * written into the registration before it is made, so that a restore
 * killed then has it removed by the next command (F2). Where it cannot be
 * done (another file at the name: a package upgrade's new version, or
 * another restore's copy in its own instant; ours moved or linked as it
 * was made; the directory refused or gone), the copy is made beside it
 * (makeUnlinked) and `otherName` says why: the restore goes on (F3).
 */
function madeAtItsName(h: RestoreContext, id: FileIdentity, index: number): { f: number; otherName?: string } {
  const holds = (p: Process) => p.exeFile === index || p.fds.some((d) => d.file === index) || p.vmas.some((v) => v.file === index);
  const who = firstHolderIdentities(h.image, holds);
  const dir = dirname(id.path);
  const name = basename(id.path);
  h.recordExecutableNameMade?.(dir, name, who);
  let made: number | undefined;
  let failure: unknown;
  try {
    made = addon().executableNameMake(dir, name, who);
  } catch (e) {
    failure = e;
  }
  const f = made === undefined ? undefined : h.keep(made);
  // Taken back at once unless our file may still be at the name (review
  // r425 G1): a release clears only what this restore left there, never a
  // file of another that was at the name first (EEXIST) and that the
  // clear would take for ours.
  const leftAtName = (failure as { leftAtName?: boolean } | undefined)?.leftAtName === true;
  if (!leftAtName) h.recordExecutableNameDone?.(dir, name);
  if (f !== undefined) return { f };
  const why = whyNotAtItsName(failure);
  return { f: makeUnlinked(h, id, index), otherName: leftAtName ? `${why}; an empty file of this restore is left at its name` : why };
}

/** Why madeAtItsName made the copy beside its name, from the error of
 * executableNameMake. */
function whyNotAtItsName(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  // Not "another file is at its name now" (review r413 F5): it may have
  // been another restore's copy, gone a moment later.
  if (code === 'EEXIST') return 'another file was at its name when the copy was made (a new version of the program, or another restore of it making its copy there at that moment)';
  if (code === 'ESTALE') return 'the copy made at its name was moved elsewhere as it was made';
  if (code === 'EMLINK') return 'the copy made at its name was given another name as it was made';
  return `its name could not be made again, or the copy made there removed from it (${code ?? (e as Error).message})`;
}

/** Whether this restore can set a process's executable at all
 * (PR_SET_MM_MAP's exe_fd, asked by the seed, which has the restorer's
 * capabilities): CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, never
 * CAP_SYS_RESOURCE. Without, the copy is never made at the program's
 * name, which watchers of its directory would see made (review r413 F6),
 * for nothing. */
function mayRestorerSetExecutable(): boolean {
  const capEff = ownCreds().capEff;
  return (capEff & ((1n << CAP_CHECKPOINT_RESTORE) | (1n << CAP_SYS_ADMIN))) !== 0n;
}

const CAP_SYS_ADMIN = 21n;
const CAP_CHECKPOINT_RESTORE = 40n;

/** statfs f_type of the file systems whose blocks are memory (tmpfs,
 * ramfs): no FIEMAP, so an honest image has no ranges there. */
const MEMORY_FILE_SYSTEMS = new Set([0x01021994n, 0x858458f6n]);

/** Deleted file `index`'s blocks past its data allocated again in `f`, as
 * the image recorded them (`allocated`), with FALLOC_FL_KEEP_SIZE: its
 * size stays, and ranges over what was just written cost nothing. The
 * image's ranges are checked (validate.ts: whole pages, apart, below 2^40
 * bytes); they are allocated only where a snapshot could have found them
 * (the file system where `f` is made answers FIEMAP, and is no tmpfs:
 * anywhere else, said and left, as a crafted image could have a tmpfs
 * such as /dev/shm commit memory up to half of RAM per mount); what they
 * add must fit in what its file system has free for anyone (f_bavail:
 * never the room kept for root; Node's statfs gives f_bsize where the
 * count is in f_frsize units, the same on every disk file system that
 * has FIEMAP). They are allocated as the file's owner, given before
 * (giveOwner), without CAP_SYS_RESOURCE (the addon's
 * fallocateKeepSize): the owner's quota holds them back as it held the
 * application (EDQUOT: the restore fails, naming the file), a root
 * restore too (review r393: root passed quotas, and a few KB of image
 * bought a user a file as large as the disk had free, which O_TMPFILE's
 * linkat could keep). A file system without fallocate (EOPNOTSUPP)
 * keeps the data alone, said. */
function allocateAsRecorded(h: RestoreContext, f: number, id: FileIdentity, index: number): void {
  const ranges = id.allocated ?? [];
  if (!ranges.length) return;
  const what = `deleted file ${index} (${id.path})`;
  let total = 0n;
  for (let i = 1; i < ranges.length; i += 2) total += ranges[i];
  const room = statfsSync(`/proc/self/fd/${f}`, { bigint: true });
  if (MEMORY_FILE_SYSTEMS.has(room.type) || !answersFiemap(f)) {
    h.notKept.push(`${what}: ${total} bytes allocated past its data, not allocated again (the file system it is made on here cannot say where a file's blocks are, so a snapshot never finds any there)`);
    return;
  }
  if (total > room.bavail * room.bsize) throw new AppshotError(`${what} had ${total} bytes allocated past its data, more than the ${room.bavail * room.bsize} free on the file system it is made on`);
  try {
    addon().fallocateKeepSize(f, ranges);
  } catch (e) {
    // An owner whose identity cannot be taken here (root in a user
    // namespace that maps no such uid or gid, or refuses setgroups): the
    // blocks are a claim of the image's, left unallocated, as where the
    // file system has no fallocate; never allocated as the restorer.
    if ((e as { ownerNotTaken?: boolean }).ownerNotTaken) {
      h.notKept.push(`${what}: ${total} bytes allocated past its data, not allocated again (its owner's identity cannot be taken here: ${(e as NodeJS.ErrnoException).code})`);
      return;
    }
    if ((e as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw new AppshotError(`${what}: allocating its ${total} bytes past its data again: ${(e as Error).message}`);
    h.notKept.push(`${what}: ${total} bytes allocated past its data, not allocated again (its file system here has no fallocate)`);
  }
}

/** Whether `f`'s file system answers FIEMAP (asked for no extents: the
 * count alone). */
function answersFiemap(f: number): boolean {
  const buf = Buffer.alloc(FIEMAP_HEADER);
  buf.writeBigUInt64LE(0xffffffffffffffffn, 8);
  try {
    addon().ioctl(f, FS_IOC_FIEMAP, buf);
    return true;
  } catch {
    return false;
  }
}

/** Once every process is as it will run (nothing of the restore writes
 * the file after: a write through a shared mapping would move its
 * modification time), `f` is given the access and modification times
 * deleted file `index` had, to the nanosecond (futimens on the restore's
 * own descriptor, which the file's owner and CAP_FOWNER may: the
 * restorer made it). Its change time is the
 * restore's: nothing sets one. An older image, without the access time,
 * leaves both the restore's. */
function giveTimesAtTheEnd(h: RestoreContext, f: number, id: FileIdentity, index: number): void {
  if (id.atimeNs === undefined) return;
  const list = h.once('deleted files to date', () => {
    const files: { f: number; atimeNs: bigint; mtimeNs: bigint; what: string }[] = [];
    h.whenProcessesAreFinal(() => giveTimes(h, files));
    return files;
  });
  list.push({ f, atimeNs: id.atimeNs, mtimeNs: id.mtimeNs, what: `deleted file ${index} (${id.path})` });
}

function giveTimes(h: RestoreContext, files: { f: number; atimeNs: bigint; mtimeNs: bigint; what: string }[]): void {
  const failed: string[] = [];
  let why = '';
  for (const x of files) {
    try {
      addon().futimensNs(x.f, x.atimeNs, x.mtimeNs);
    } catch (e) {
      failed.push(x.what);
      why = (e as Error).message;
    }
  }
  // Not a reason to fail the restore (the files are whole): said.
  if (failed.length) h.notKept.push(`${failed.join(', ')}: their times, not given again (${why})`);
}

/** The file's owner as the image says (before its mode: a chown clears
 * set-id bits). Made by us, it is ours; one of another user (a server that
 * handed the file to a worker of its own user) is given away, which needs
 * the privilege such an application needs to be restored at all. From an
 * image this node did not snapshot, an owner that none of its processes
 * is is not given: its first holder's fsuid and fsgid are, and the
 * restore says so. Whether the recorded owner was given exactly. */
function giveOwner(h: RestoreContext, f: number, id: FileIdentity, index: number, orKeep = false): boolean {
  if (id.uid === undefined || id.gid === undefined) return true;
  const what = `${(id.mode & fs.S_IFMT) === fs.S_IFDIR ? 'removed directory' : 'deleted file'} ${index} (${id.path})`;
  let uid = id.uid;
  let gid = id.gid;
  const stranger = strangeOwner(h.image, uid, [gid]);
  if (stranger) {
    const holder = h.image.processes.find((p) => p.exeFile === index || p.fds.some((x) => x.file === index && x.kind === FdKind.FILE) || p.cwdFile === index || p.rootFile === index) ?? h.image.processes[0];
    const c = holder.threads[0]?.creds ?? holder.creds;
    [uid, gid] = [c.uid[3], c.gid[3]];
    h.notKept.push(`${what}: owned by uid ${id.uid} gid ${id.gid}, now uid ${uid} gid ${gid}'s, its holder's, without set-id bits (${stranger})`);
  }
  const st = fstatSync(f);
  if (st.uid !== uid || st.gid !== gid) {
    try {
      fchownSync(f, uid, gid);
    } catch (e) {
      // `orKeep` (a removed directory's stand-in, which nothing is in):
      // an owner the restoring user may not give (an ordinary user's own
      // process in a directory of root's, removed; root in a user
      // namespace that does not map it: EINVAL) is not a reason to
      // refuse the process; the stand-in stays the restorer's.
      if (!orKeep || !(refusal(e) || (e as NodeJS.ErrnoException).code === 'EINVAL')) throw new AppshotError(`${what} was owned by ${uid}:${gid}, which this restore cannot give it: ${(e as Error).message}`);
      h.notKept.push(`${what}: owned by uid ${uid} gid ${gid}, which this restore may not give (${(e as NodeJS.ErrnoException).code}): now uid ${st.uid} gid ${st.gid}'s, the restorer's, without set-id bits`);
      return false;
    }
  }
  return !stranger;
}

/** Our descriptor of the removed directory deleted file `index` of the
 * image is (a descriptor held open after its rmdir), opened with the
 * open's `flags`: a new open file description of its stand-in
 * (removedDirectoryStandIn), reached through our descriptor of it
 * (/proc/self/fd/N), never by a name: a name walked again could be a
 * link put there meanwhile, and what it led to would be given the
 * image's owner and mode (review r300 had a root-owned directory made
 * nobody's and 0777). (O_NOFOLLOW, with which the open of the magic
 * link fails, is left out, as openDeletedFile does.) */
export function removedDirectoryFd(h: RestoreContext, index: number, flags: number): number {
  const standIn = removedDirectoryStandIn(h, index, h.image.files[index].path);
  // A directory's open, whatever the image says (review r305: O_TMPFILE's
  // bits, through the magic link, made a nameless root-owned regular file
  // on tmpfs in the directory's place); no access mode but reading, and
  // none of the open's creating flags (r307), which a directory never has.
  const creating = fs.O_NOFOLLOW | O_TMPFILE_BITS | fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC | 3;
  return h.keep(openSync(`/proc/self/fd/${standIn}`, (flags & ~creating) | fs.O_RDONLY | fs.O_DIRECTORY));
}

/** A descriptor (O_PATH, the caller's to close) of the stand-in for a
 * process's working or root directory `shown` (as the image names it,
 * "... (deleted)"), removed while the process was in it (deleted
 * file `index`, if the image records it): the process takes it and
 * enters it (fchdir; chroot(".")), not a name (review r300: the root's
 * stand-in, walked again by name, could be swapped for a link to / and
 * the "jailed" process's root was the real /). */
export function removedDirectoryToEnter(h: RestoreContext, shown: string, index: number | undefined): number {
  return openSync(`/proc/self/fd/${removedDirectoryStandIn(h, index, shown)}`, O_PATH | fs.O_DIRECTORY);
}

const O_PATH = 0o10000000;

/** Our descriptor (the context's, kept until its close) of the stand-in
 * for removed directory `index` of the image, or, an older image's
 * working or root directory recorded without one, for its name `shown`: one per
 * directory (processes that shared it share it; two removed directories
 * of one name are two), made dead at once (RestoreContext's
 * removedDirectory). Given the owner the image recorded, by descriptor,
 * now (a process of that uid may enter it), or, one the restoring user
 * may not give, left the restorer's and said so (giveOwner's `orKeep`);
 * its mode only once every process is as it will run (every holder has
 * entered or opened it): a mode without search permission (0) would
 * make the process's own fchdir fail. Set-id bits as allocateAndMode
 * gives them. (It came back 0700 and the restorer's, and a worker of
 * another uid could no longer use ".": issue 12, review r294.) An older
 * image, without `index`, keeps it 0700 and the restorer's. */
function removedDirectoryStandIn(h: RestoreContext, index: number | undefined, shown: string): number {
  const f = h.removedDirectory(index === undefined ? `named ${shown}` : `file ${index}`);
  if (index !== undefined)
    h.once(`removed directory ${index} given its owner`, () => {
      const id = h.image.files[index];
      const mode = modeToGive(h, id, giveOwner(h, f, id, index, true));
      h.whenProcessesAreFinal(() => fchmodSync(f, mode));
    });
  return f;
}

/** Gives `f`, deleted file `index` of the image made again and given its
 * owner (giveOwner: `exactOwner`) and data (fillAsOwner), its blocks past
 * its data (allocateAsRecorded) and the mode it had. Set-id bits only on
 * the owner the image recorded, given exactly: on a stand-in they would
 * make the file run as someone it never ran as (the fuzzing had a nobody
 * image's file come back root's and set-user-ID). (An image without the
 * owner, an older one's, has them only from this node's own snapshot.)
 * The blocks are the owner's from the start, allocated as the owner,
 * never moved to them by a chown of the restorer's, which passes quotas
 * as root; the mode last, as a write (fallocate's too) would strip it of
 * its set-id bits. */
function allocateAndMode(h: RestoreContext, f: number, id: FileIdentity, index: number, exactOwner: boolean): void {
  allocateAsRecorded(h, f, id, index);
  fchmodSync(f, modeToGive(h, id, exactOwner));
}

/** Deleted file `id`'s saved data written into `f`, which has its owner
 * already (giveOwner), as that owner would write it (the context's
 * copyPagesAsOwner: without CAP_SYS_RESOURCE, on one thread of the
 * owner's fsuid and fsgid for the whole file where the restorer is
 * privileged): its quota and ext4's root reserve hold as they held the
 * application, a root restore too (review r393: a root restorer's own
 * write passed both, for as many bytes as the image carries, and a chown
 * after it moves the blocks to the owner passing its quota as well).
 * Where the owner cannot be taken here (a user namespace), as the
 * restorer's ids without capabilities: the data must be there. A memfd
 * is written as the restorer: its file system (shmem's internal mount)
 * keeps no quota nor reserve. */
function fillAsOwner(h: RestoreContext, f: number, id: FileIdentity, index: number): void {
  if (id.path.startsWith(MEMFD_PREFIX)) return h.copyPages(f, id.contents);
  try {
    h.copyPagesAsOwner(f, id.contents);
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    const as = (e as { ownerNotTaken?: boolean }).ownerNotTaken ? "as the restorer without capabilities (its owner's identity cannot be taken here)" : 'as its owner';
    throw new AppshotError(`deleted file ${index} (${id.path}): writing its saved data again ${as}: ${(e as Error).message}`);
  }
}

/** The mode `id` had, with its set-id bits where its owner was given
 * exactly (`exactOwner`: giveOwner) and the image recorded it or is
 * this node's own (allocateAndMode). */
function modeToGive(h: RestoreContext, id: FileIdentity, exactOwner: boolean): number {
  const setId = exactOwner && (id.uid !== undefined || isOwnSnapshot(h.image));
  return id.mode & (setId ? 0o7777 : 0o1777);
}

/** A memfd of the name, size and seals `name`, `size`, `seals` say (one
 * mapped only, its SharedMemory): for memory.ts. */
export function memfdLike(h: RestoreContext, id: Pick<FileIdentity, 'path' | 'seals' | 'dev' | 'ino'>, size: bigint, fill: (fd: number) => void): number {
  const f = makeMemfd(h, id);
  fill(f);
  ftruncateSync(f, Number(size));
  sealMemfd(h, f, id.seals, mappedSharedWritable(h, id));
  return f;
}

const F_SEAL_SEAL = 0x1;
const PROT_WRITE = 0x2;
const F_SEAL_FUTURE_WRITE = 0x10;

/** Whether the image maps the object `id` names (its device and inode)
 * shared and writable anywhere: a mapping the restore must make so. */
function mappedSharedWritable(h: RestoreContext, id: { dev?: bigint; ino?: bigint }): boolean {
  if (id.dev === undefined || id.ino === undefined) return true;
  const objects = new Set(h.image.sharedMemory.flatMap((o, i) => (o.dev === id.dev && o.ino === id.ino ? [i] : [])));
  return h.image.processes.some((p) => p.vmas.some((v) => v.shared && (v.prot & PROT_WRITE) !== 0 && objects.has(v.sharedMemory)));
}

/** A memfd's seals given back. F_SEAL_FUTURE_WRITE refuses new writable
 * shared mappings, which is what the restore makes for the ones the
 * application made before it sealed (they still write): where the image
 * has one (`writableShared`), it waits, with F_SEAL_SEAL (which would
 * refuse it then), until every process's memory is as it will run. Only
 * then: a mapping made while it waits may be mprotect'ed writable later
 * (the kernel clears VM_MAYWRITE only for shared mappings made after the
 * seal), so a memfd mapped read-only after its seal would come back
 * writable through them (review r294: a process wrote into its sealed
 * memfd). With both kinds of mapping, the read-only ones still can. */
function sealMemfd(h: RestoreContext, f: number, seals: number | undefined, writableShared: boolean): void {
  if (!seals) return;
  const later = seals & F_SEAL_FUTURE_WRITE && writableShared ? seals & (F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) : 0;
  if (seals & ~later) addon().addSeals(f, seals & ~later);
  if (later) h.whenProcessesAreFinal(() => addon().addSeals(f, later));
}

function makeMemfd(h: RestoreContext, id: Pick<FileIdentity, 'path'>): number {
  const name = id.path.slice(MEMFD_PREFIX.length).replace(/ \(deleted\)$/, '');
  // Always able to take seals: F_SEAL_SEAL alone (a memfd made without
  // MFD_ALLOW_SEALING) is added like any other. MFD_EXEC: executable
  // whatever vm.memfd_noexec says (its mode is set after), where the
  // kernel knows the flag.
  try {
    return h.keep(addon().memfd(name, 0, MFD_ALLOW_SEALING | MFD_EXEC));
  } catch (e) {
    if ((e as { errno?: number }).errno !== EINVAL && !/EINVAL|Invalid argument/.test(String(e))) throw new AppshotError(`memfd ${name}: ${(e as Error).message}`);
    return h.keep(addon().memfd(name, 0, MFD_ALLOW_SEALING));
  }
}

/** __O_TMPFILE, which the kernel keeps in the flags of a description
 * opened with O_TMPFILE. */
const O_TMPFILE_ONLY = 0o20000000;

function makeUnlinked(h: RestoreContext, id: FileIdentity, index: number): number {
  // Its processes: whose identities make it (fsident.ts).
  const holds = (p: Process) => p.exeFile === index || p.fds.some((d) => d.file === index) || p.vmas.some((v) => v.file === index);
  // A file made with O_TMPFILE never had a name, and may still be given
  // one (linkat of /proc/self/fd/N) unless made with O_EXCL, which its
  // description does not keep: made so again, in its own directory, it can
  // (a file made and unlinked could not: ENOENT).
  if (h.image.processes.some((p) => p.fds.some((d) => d.file === index && d.kind === FdKind.FILE && (d.flags & O_TMPFILE_ONLY) !== 0))) {
    const who = firstHolderIdentities(h.image, holds);
    try {
      return h.keep(addon().openAs(dirname(id.path), fs.O_RDWR | O_TMPFILE_BITS, 0o600, who));
    } catch {
      /* a directory gone or not writable: an unlinked file, as below */
    }
  }
  try {
    // Made in the image's directory as the file's process would make it
    // (fsident.ts): nowhere it could not write, and its owner; made and
    // removed by madeAtItsName's native step (review r425 G2), so that
    // root never removes by path in a directory the application's user
    // controls, and nothing refused to a squashed root that the user may
    // do fails the restore.
    const who = firstHolderIdentities(h.image, holds);
    return h.keep(addon().executableNameMake(dirname(id.path), `.appshot-restored-${uniqueTag()}-${index}`, who, true));
  } catch {
    /* refused, gone, moved or linked as it was made: in /tmp, below */
  }
  // The restorer's own file, in a directory no user can swap (root's,
  // sticky), where a removal by path goes nowhere else.
  const path = join('/tmp', `.appshot-restored-${uniqueTag()}-${index}`);
  const f = openSync(path, fs.O_RDWR | fs.O_CREAT | fs.O_EXCL, 0o600);
  try {
    unlinkSync(path);
    // No name left (review r413 F4): a link() made meanwhile would keep a
    // named file that is then filled and given the image's owner and mode.
    if (fstatSync(f).nlink !== 0) throw new AppshotError(`the copy of deleted file ${index} made at ${path} was given another name as it was made`);
  } catch (e) {
    closeSync(f);
    throw e;
  }
  return h.keep(f);
}
