/**
 * What a restore of an incremental chain works out from the images alone,
 * worked out ahead of time: `appshot serve` does it while a service is
 * suspended (its image preloaded), so that the resume does not.
 *
 * Each page a process inherits from older images of its chain is found by
 * resolving the chain page by page (resolveProcess: a map of every page
 * of every link) and gathered into copies (inheritedCopyRuns). For redis
 * with 10,000 keys and a chain of 2-4 links that was ~0.7 ms of a ~17 ms
 * resume, spent while a client waited.
 *
 * Kept with the chain's LoadedImage objects (a WeakMap: it goes when they
 * do), and used only for exactly that chain, link by link: a chain read
 * afresh (an image changed on disk, unchangedOnDisk) is other objects and
 * is resolved at its restore as ever. The images are not changed by a
 * restore, so what was worked out stays true.
 */
import { closeSync, openSync, readSync, statSync, statfsSync } from 'node:fs';
import { addon } from '../native.js';
import type { LoadedImage } from '../image/format.js';
import type { Vma } from '../image/types.js';
import { type CopyRun, inheritedCopyRuns, lazyMappable, mapsDeleted, readMaps, recordedTouchedPages, recordTouchedAtDump, touchedCandidate } from '../resources/memory.js';
import { readStat } from '../procfs.js';
import { resolveProcess } from '../snapshot/parent.js';

const prepared = new WeakMap<LoadedImage, { chain: LoadedImage[]; runs: Map<Vma, CopyRun[]> }>();

/** Works out the copies of every inherited page of `chain`'s processes
 * (nothing for an image without parents). */
export function prepareChain(chain: LoadedImage[]): void {
  if (chain.length < 2 || prepared.has(chain[0])) return;
  const images = chain.map((l) => l.image);
  const runs = new Map<Vma, CopyRun[]>();
  for (const p of chain[0].image.processes) {
    let inherited: ReturnType<typeof resolveProcess> | undefined;
    for (const v of p.vmas) if (v.pages?.fromParent.length) runs.set(v, inheritedCopyRuns(v, (inherited ??= resolveProcess(images, p.vpid))));
  }
  prepared.set(chain[0], { chain: [...chain], runs });
}

/** The copies prepareChain worked out for this very chain, by VMA; undefined
 * if it did not (the restore works them out itself). */
export function preparedRuns(chain: LoadedImage[]): ((vpid: number, v: Vma) => CopyRun[] | undefined) | undefined {
  const p = prepared.get(chain[0]);
  if (!p || p.chain.length !== chain.length || p.chain.some((l, i) => l !== chain[i])) return undefined;
  return (_vpid, v) => p.runs.get(v);
}

const PAGE = 4096;

/**
 * How many pages a prepared resume copies in ahead (prefaultPages) at
 * most, all its processes together: APPSHOT_PREPARED_PREFAULT (0: none,
 * every stored page mapped from the page file as before), by default 256
 * (1 MiB). Measured with redis (README): a run answering PINGs writes
 * 34-40 of its pages mapped from the page file, one of 2,000 GETs and a
 * SET 75-160; 256 holds those with room, and is at most 1 MiB more PSS
 * per held instance (copying in all its memory is ~1.6 MiB more for
 * redis with 10,000 keys, and grows with the application).
 */
export function prefaultCap(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.APPSHOT_PREPARED_PREFAULT;
  if (v === undefined || v === '') return 256;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : 256;
}

/** Pages compared with the parent's at most (prefaultPages), then no more
 * pages chosen: 32 MiB read for an application of 16 MiB or more. The
 * reads are synchronous on serve's one event loop, which forwards every
 * service's connections meanwhile (review32b L2): ~2 ms for redis with
 * 10,000 keys, and no more than a few tens of ms for any application. */
const MAX_COMPARED_PAGES = 4096;
/** Pages read at once from a run of a page file. */
const SLICE_PAGES = 256;

/** Of the `pages` pages at `start`, stored at `offset` of the newest page
 * file (fds[0]), which have bytes other than the parent chain's at their
 * address (`before`: where each is in the chain), or which it had none
 * of. Read a slice at once, and the parent's pages in as few reads as
 * they are contiguous in its page files. */
function writtenSince(fds: number[], before: Map<bigint, { file: number; offset: bigint }>, start: bigint, offset: bigint, pages: number): boolean[] {
  const mine = Buffer.alloc(pages * PAGE);
  const got = readSync(fds[0], mine, 0, mine.length, Number(offset));
  const out = new Array<boolean>(pages).fill(true);
  const theirs = Buffer.alloc(pages * PAGE);
  for (let k = 0; k < pages; ) {
    const was = before.get(start + BigInt(k * PAGE));
    if (!was) {
      k++;
      continue;
    }
    // The longest stretch from k stored contiguously in one parent file.
    let end = k + 1;
    for (; end < pages; end++) {
      const next = before.get(start + BigInt(end * PAGE));
      if (!next || next.file !== was.file || next.offset !== was.offset + BigInt((end - k) * PAGE)) break;
    }
    const n = readSync(fds[was.file], theirs, k * PAGE, (end - k) * PAGE, Number(was.offset));
    for (let j = k; j < end; j++) {
      const lo = j * PAGE;
      const whole = lo + PAGE <= got && lo - k * PAGE + PAGE <= n;
      out[j] = !whole || mine.compare(theirs, lo, lo + PAGE, lo, lo + PAGE) !== 0;
    }
    k = end;
  }
  return out;
}

/** The pages a prepare copies in ahead, by process and address. */
export type HotPages = ReadonlyMap<number, ReadonlySet<bigint>>;

export interface Prefault {
  /** The page indexes of `v` to copy in (MemorySources.prefault). */
  pages: (vpid: number, v: Vma) => number[] | undefined;
  count: number;
  /** The same, by address: what the next prepare of a full image goes by. */
  addresses: HotPages;
}

const hot = new WeakMap<LoadedImage, { chain: LoadedImage[]; cap: number; previous?: HotPages; found: Prefault }>();

/**
 * The pages of `chain`'s newest image that its previous run wrote (stored
 * there with bytes other than its parent's at that address, or that the
 * parent did not have), in mappings a lazy restore maps from the page
 * file: what the application is likely to write again as soon as it is
 * resumed, each write then a copy-on-write fault (several µs on this VM,
 * ~0.7 ms of a prepared resume of redis). Their bytes are compared, not
 * the image's page lists: a lazy resume's next suspend stores the memory
 * mapped from its page file whole (memory.ts dumpMemory), written or not.
 * At most `cap` pages, taken in address order. An image without a parent
 * (a full one: serve takes one every few suspends) has nothing to compare
 * with: the pages of `previous` (those the prepare before chose, the
 * application's addresses being the same from one resume to the next)
 * that it stores, if given, else none. Read while the service is
 * suspended (its images preloaded, page files open): ~2.5 MiB twice for
 * redis with 10,000 keys, and no more than MAX_COMPARED_PAGES pages.
 *
 * A page copied in at the prepare is anonymous memory the next suspend
 * compares with this image like any other (memory.ts): stored again only
 * if the application changed it, as the eager restore's are.
 */
export function prefaultPages(chain: LoadedImage[], cap: number, previous?: HotPages): Prefault | undefined {
  if (cap <= 0 || (chain.length < 2 && !previous?.size)) return undefined;
  const head = chain[0];
  const known = hot.get(head);
  if (known && known.cap === cap && known.previous === previous && known.chain.length === chain.length && known.chain.every((l, i) => l === chain[i])) return known.found;
  try {
    const found = choosePages(chain, cap, previous);
    if (found) hot.set(head, { chain: [...chain], cap, previous, found });
    return found;
  } catch {
    // A page file that cannot be read now: only a guess is lost (the
    // restore reads it, and says what is wrong).
    return undefined;
  }
}

function choosePages(chain: LoadedImage[], cap: number, previous: HotPages | undefined): Prefault | undefined {
  const head = chain[0];
  const fds = chain.map((l) => l.pagesFd);
  if (fds.some((fd) => fd === undefined)) return undefined;
  const images = chain.map((l) => l.image);
  const byVpid = new Map<number, Map<bigint, number[]>>();
  const addresses = new Map<number, Set<bigint>>();
  let count = 0;
  let compared = 0;
  for (const p of head.image.processes) {
    let before: ReturnType<typeof resolveProcess> | undefined;
    const chosen = previous?.get(p.vpid);
    const byVma = new Map<bigint, number[]>();
    const at = new Set<bigint>();
    for (const v of p.vmas) {
      if (count >= cap || compared >= MAX_COMPARED_PAGES) break;
      if (!v.pages?.runs.length || !lazyMappable(v)) continue;
      const list: number[] = [];
      let offset = v.pages.offset;
      for (let i = 0; i < v.pages.runs.length && count < cap && compared < MAX_COMPARED_PAGES; i += 2) {
        const [first, n] = [v.pages.runs[i], v.pages.runs[i + 1]];
        // In slices of a run, each read at once, its parent's pages too.
        for (let s = 0; s < n && count < cap && compared < MAX_COMPARED_PAGES; s += SLICE_PAGES) {
          const pages = Math.min(SLICE_PAGES, n - s);
          const start = v.start + BigInt((first + s) * PAGE);
          let written: boolean[];
          if (chain.length < 2) written = Array.from({ length: pages }, (_, k) => chosen?.has(start + BigInt(k * PAGE)) ?? false);
          else {
            before ??= resolveProcess(images, p.vpid, 1);
            written = writtenSince(fds as number[], before, start, offset + BigInt(s * PAGE), pages);
            compared += pages;
          }
          for (let k = 0; k < pages && count < cap; k++)
            if (written[k]) {
              list.push(first + s + k);
              at.add(start + BigInt(k * PAGE));
              count++;
            }
        }
        offset += BigInt(n * PAGE);
      }
      if (list.length) byVma.set(v.start, list);
    }
    if (byVma.size) {
      byVpid.set(p.vpid, byVma);
      addresses.set(p.vpid, at);
    }
  }
  return { pages: (vpid, v) => byVpid.get(vpid)?.get(v.start), count, addresses };
}

/**
 * The code pages a run executed, by file: for each executable mapping of
 * a regular file, the pages of it (by index in the file) present in a
 * process's page tables (/proc/PID/pagemap), keyed by the file's device
 * and inode as /proc/PID/maps names them. Read from a running instance just before
 * its suspend: what its run executed since its restore (or its start),
 * with the kernel's fault-around neighbours.
 *
 * Why: a restored process maps its code afresh, with no page of it in its
 * page tables; each first execution of a page is then a minor fault (~40
 * for redis answering its first PING after a resume, ~10-20 µs each on
 * this VM, README). populateCode maps those pages into the held instance
 * before its release, so the resumed run executes them without faulting.
 */
export type HotCode = ReadonlyMap<string, ReadonlySet<number>>;

/** Pages of code recorded at most (all files together): 16 MiB. */
const MAX_HOT_CODE_PAGES = 4096;

/** One executable mapping of a regular file in /proc/PID/maps. */
interface CodeMapping {
  start: bigint;
  end: bigint;
  /** The file's page index at `start`. */
  page: number;
  key: string;
  path: string;
}

function codeMappings(pid: number): CodeMapping[] {
  // A file (inode not 0, still there: as the file says, one may be named
  // "x (deleted)"), private and executable.
  return readMaps(pid)
    .filter((m) => m.perms === 'r-xp' && m.ino !== 0n && m.path.startsWith('/') && !mapsDeleted(pid, m))
    .map((m) => ({ start: m.start, end: m.end, page: Number(m.pgoff / BigInt(PAGE)), key: `${m.major}:${m.minor} ${m.ino}`, path: m.path }));
}

/** The code pages `pids` have in their page tables now (HotCode); pages
 * of processes that went meanwhile are left out. */
export function hotCode(pids: number[]): HotCode {
  const hot = new Map<string, Set<number>>();
  let count = 0;
  for (const pid of pids) {
    let fd: number | undefined;
    try {
      const maps = codeMappings(pid);
      fd = openSync(`/proc/${pid}/pagemap`, 'r');
      for (const m of maps) {
        const pages = Number((m.end - m.start) / BigInt(PAGE));
        const entries = Buffer.alloc(pages * 8);
        const got = readSync(fd, entries, 0, entries.length, Number((m.start / BigInt(PAGE)) * 8n));
        let set = hot.get(m.key);
        for (let k = 0; k * 8 + 8 <= got; k++) {
          // Bit 63: present.
          if (!(entries.readBigUInt64LE(k * 8) >> 63n)) continue;
          if (!set) hot.set(m.key, (set = new Set()));
          if (!set.has(m.page + k)) {
            set.add(m.page + k);
            if (++count >= MAX_HOT_CODE_PAGES) return hot;
          }
        }
      }
    } catch {
      /* gone, or not ours to read: nothing of it */
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }
  return hot;
}

/** FUSE's f_type: a page of such a file may have to be read from its
 * server, which could be the held application itself (stopped). */
const FUSE_SUPER_MAGIC = 0x65735546;

/** An image's page file, as a lazy restore maps it. */
const PAGE_FILE = /\/pages\.img$/;

/** Pages populateCode faults in between two turns of the event loop, so
 * that a connection coming meanwhile does not wait out hundreds of them
 * (redis's ~650: 2 ms in the median on this loaded VM, 78 ms at worst). */
const POPULATE_SLICE_PAGES = 8;

/**
 * Maps the pages of `hot` into the page tables of the held processes
 * `pids`, where each maps the same file (same device and inode) as code:
 * read from outside (process_vm_readv, which faults each page in for the
 * target, from the page cache), nothing written. Only regular files'
 * executable mappings, never on FUSE. A slice of pages per turn of
 * serve's event loop (hundreds of pages would otherwise hold every other
 * service's connections meanwhile), and no further
 * once `keepOn` says the instance is no longer held. Resolves to the
 * pages mapped.
 */
export async function populateCode(pids: number[], hot: HotCode, keepOn: () => boolean): Promise<number> {
  const runs: { pid: number; addr: bigint; pages: number }[] = [];
  const fuse = new Map<string, boolean>();
  for (const pid of pids) {
    let maps: CodeMapping[];
    try {
      maps = codeMappings(pid);
    } catch {
      continue;
    }
    for (const m of maps) {
      const set = hot.get(m.key);
      if (!set) continue;
      let onFuse = fuse.get(m.key);
      if (onFuse === undefined) {
        try {
          onFuse = statfsSync(m.path).type === FUSE_SUPER_MAGIC;
        } catch {
          onFuse = true; // not looked at: left alone
        }
        fuse.set(m.key, onFuse);
      }
      if (onFuse) continue;
      const pages = Number((m.end - m.start) / BigInt(PAGE));
      for (let k = 0; k < pages; ) {
        if (!set.has(m.page + k)) {
          k++;
          continue;
        }
        let end = k + 1;
        while (end < pages && end - k < POPULATE_SLICE_PAGES && set.has(m.page + end)) end++;
        runs.push({ pid, addr: m.start + BigInt(k * PAGE), pages: end - k });
        k = end;
      }
    }
  }
  let mapped = 0;
  let slice = 0;
  for (const r of runs) {
    if (slice >= POPULATE_SLICE_PAGES) {
      await new Promise((resolve) => setImmediate(resolve));
      slice = 0;
    }
    if (!keepOn()) break;
    try {
      addon().readMemory(r.pid, r.addr, r.pages * PAGE);
      mapped += r.pages;
    } catch {
      /* gone, or unreadable: it faults them in itself */
    }
    slice += r.pages;
  }
  return mapped;
}

/** Pages populateHeldMappings reads at once, between two turns of the
 * event loop (serve forwards every other service's connections meanwhile). */
const POPULATE_READ_SLICE = 16;

/** What populateHeldMappings did: pages mapped in (read), of which
 * `written` copied in; slices that failed (a page beyond its file's end,
 * a process gone) and the first error; how long it took. */
export interface PopulatedMappings {
  pages: number;
  written: number;
  failed: number;
  error?: string;
  ms: number;
}

/** `runs` ([address, pages]) without the pages `skip` says. */
function pagesExcept(runs: readonly (readonly [bigint, number])[], skip: (addr: bigint) => boolean): [bigint, number][] {
  const out: [bigint, number][] = [];
  for (const [addr, pages] of runs)
    for (let k = 0; k < pages; k++) {
      const at = addr + BigInt(k * PAGE);
      if (skip(at)) continue;
      const last = out.at(-1);
      if (last && last[0] + BigInt(last[1] * PAGE) === at) last[1]++;
      else out.push([at, 1]);
    }
  return out;
}

/** Has the next dump of each held process of `made` (serve's suspend of
 * its prepared instance) record the pages its run touched
 * (memory.ts recordTouchedAtDump), for the prepare after to map in: also
 * for an instance a resume lets go before its populate (a connection that
 * came while it was prepared). Its processes' start times, by PID (none
 * for a process gone). */
export function recordAtSuspend(made: readonly { pid: number }[]): Map<number, number> {
  const held = new Map<number, number>();
  for (const { pid } of made) {
    const startTime = readStat(pid)?.startTime;
    if (startTime === undefined) continue;
    held.set(pid, startTime);
    recordTouchedAtDump(pid, startTime);
  }
  return held;
}

/**
 * Maps into the page tables of the held processes `made` (serve's
 * prepared instance, as its restore's hold names them) the file pages
 * their previous run touched (memory.ts recordedTouchedPages, recorded at
 * their last suspend): of the image's page file, which a lazy restore maps the application's memory
 * from, and of their code and read-only data. Read from outside
 * (process_vm_readv faults each page in for the target, read-only, from
 * the page cache): a private page stays the file's until the application
 * writes it; but those of the page file its previous run wrote, copied in
 * (the same bytes written back). And has their next dump (serve's suspend)
 * record what they touch, for the prepare after.
 *
 * Why: a resumed prepared instance otherwise takes a fault at its first
 * touch of each such page after its release, with its client waiting:
 * redis answering its first PING after a resume took ~115 faults
 * (2026-12-07, perf record -e page-faults: ~51 on its page file, ~40
 * instruction fetches, ~8 on libraries' data), ~4-10 µs each on this VM.
 * With it, 17 faults, and its CPU to its first byte ~0.9 -> 0.5 ms; but
 * (c) was not shown faster (README, APPSHOT_PREPARED_POPULATE). A page it
 * maps in is not free at its first touch either: the README measured
 * 16-25 µs a page at the first touch after MADV_POPULATE_WRITE on this
 * paravirtualized VM, 0.03 µs at the next.
 *
 * Only the touched pages: mapping whole files (every library's code, the
 * whole page file) made the held redis 17.4 MiB of PSS instead of 4.4
 * (libcrypto alone 4.6). Never on FUSE (a page may have to come from its
 * server, which could be the held application itself, stopped), never a
 * device's mapping or a file not where its name says. `keepOn` false
 * stops it (the instance no longer held). A process found gone, or no
 * longer the one it was (its PID reused) or no longer held, is left at
 * once: its pages are never read or written again. A page that cannot be
 * read is left to fault as before.
 */
export async function populateHeldMappings(made: readonly { pid: number; vpid: number }[], keepOn: () => boolean = () => true, prefaulted?: HotPages): Promise<PopulatedMappings> {
  const t0 = performance.now();
  const done: PopulatedMappings = { pages: 0, written: 0, failed: 0, ms: 0 };
  const failed = (e: unknown) => {
    done.failed++;
    done.error ??= (e as Error).message;
  };
  const held = recordAtSuspend(made);
  // What it put in each process's page tables (page numbers), the
  // prefault's pages with them: its suspend records those last.
  const putThere = new Map<number, Set<number>>();
  const finished = () => {
    for (const [pid, pages] of putThere) {
      const startTime = held.get(pid);
      if (startTime !== undefined) recordTouchedAtDump(pid, startTime, pages);
    }
    return { ...done, ms: Math.round((performance.now() - t0) * 100) / 100 };
  };
  for (const { pid } of made) if (!held.has(pid)) failed(new Error(`process ${pid} is gone`));
  // The rest (every process's maps read, a stat of each file mapped) not
  // in the hold's own turn: a connection that came during the prepare is
  // let in first.
  await new Promise((resolve) => setImmediate(resolve));
  if (!keepOn()) return finished();
  const runs: { pid: number; addr: bigint; pages: number; write: boolean }[] = [];
  const regular = new Map<string, boolean>();
  for (const { pid, vpid } of made) {
    if (!held.has(pid)) continue;
    let maps: ReturnType<typeof readMaps>;
    try {
      maps = readMaps(pid);
    } catch (e) {
      failed(e);
      continue;
    }
    const recorded = recordedTouchedPages(vpid, maps);
    if (!recorded) continue;
    // Each recorded run, within a mapping of a regular file it has now.
    const usable = maps.filter((m) => {
      if (!touchedCandidate(m) || m.path.endsWith(' (deleted)')) return false;
      const key = `${m.major}:${m.minor} ${m.ino}`;
      let ok = regular.get(key);
      if (ok === undefined) {
        try {
          const st = statSync(m.path, { bigint: true });
          ok = st.isFile() && st.ino === m.ino && statfsSync(m.path).type !== FUSE_SUPER_MAGIC;
        } catch {
          ok = false; // not looked at: left alone
        }
        regular.set(key, ok);
      }
      return ok;
    });
    // Written first: a write is the dearer fault (a page copied). Not
    // again what the restore copied in already (prefaultPages: much of
    // what the run wrote, chosen the same way), nor a written page twice.
    const copied = prefaulted?.get(vpid);
    const put = new Set<number>(Array.from(copied ?? [], (a) => Number(a / BigInt(PAGE))));
    putThere.set(pid, put);
    const written = pagesExcept(recorded.written, (a) => copied?.has(a) ?? false);
    const writtenAt = new Set(written.flatMap(([a, n]) => Array.from({ length: n }, (_, k) => a + BigInt(k * PAGE))));
    const touched = pagesExcept(recorded.touched, (a) => writtenAt.has(a) || (copied?.has(a) ?? false));
    for (const [list, write] of [[written, true], [touched, false]] as const)
      for (const [addr, pages] of list) {
        const end = addr + BigInt(pages * PAGE);
        for (const m of usable) {
          if (write && !(m.perms[1] === 'w' && PAGE_FILE.test(m.path))) continue;
          const lo = addr > m.start ? addr : m.start;
          const hi = end < m.end ? end : m.end;
          if (lo < hi) runs.push({ pid, addr: lo, pages: Number((hi - lo) / BigInt(PAGE)), write });
        }
      }
  }
  let slice = POPULATE_READ_SLICE;
  slices: for (const r of runs)
    for (let k = 0; k < r.pages && held.has(r.pid); k += POPULATE_READ_SLICE) {
      if (slice >= POPULATE_READ_SLICE) {
        await new Promise((resolve) => setImmediate(resolve));
        slice = 0;
      }
      if (!keepOn()) break slices;
      // Still the process it was, still held (in its tracing stop): killed
      // meanwhile, its PID could name another process, running.
      const st = readStat(r.pid);
      if (st?.startTime !== held.get(r.pid) || st?.state !== 't') {
        held.delete(r.pid);
        failed(new Error(`process ${r.pid} is no longer held`));
        break;
      }
      const n = Math.min(POPULATE_READ_SLICE, r.pages - k);
      slice += n;
      try {
        const bytes = addon().readMemory(r.pid, r.addr + BigInt(k * PAGE), n * PAGE);
        // The same bytes written back: copied now (the process is held,
        // every thread stopped, so nothing changes between the two).
        if (r.write) addon().writeMemory(r.pid, r.addr + BigInt(k * PAGE), bytes);
        done.pages += n;
        if (r.write) done.written += n;
        const first = Number(r.addr / BigInt(PAGE)) + k;
        for (let j = 0; j < n; j++) putThere.get(r.pid)?.add(first + j);
      } catch (e) {
        // Gone: none of its pages again. Otherwise (beyond the file's
        // end, a mapping gone) those fault in as before.
        if ((e as NodeJS.ErrnoException).code === 'ESRCH') held.delete(r.pid);
        failed(e);
      }
    }
  return finished();
}
