/**
 * A snapshot's progress in bytes, without the resources knowing of it: the
 * page writer they are handed reports what it has taken, and the memory
 * the image will hold is estimated up front from the processes' own
 * accounting.
 */
import { readFileSync } from 'node:fs';
import { addon, PAGES_MODE, type PageWriter } from '../native.js';
import type { ByteProgress } from '../progress.js';

const PAGE = 4096;
/** A mapping is read this many pages at a time (32 MiB), so that the
 * display moves while a large one is copied. */
const SLICE_PAGES = 8192;

/** What `pid` holds that a snapshot stores, from its smaps_rollup, in
 * bytes: private anonymous memory (written file pages count there) and
 * what of it is in swap (`own`), and its proportional share of shared
 * memory (`shared`); undefined if it is gone. */
function storedBytes(pid: number): { own: number; shared: number } | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  } catch {
    return undefined;
  }
  const bytes = { own: 0, shared: 0 };
  for (const m of text.matchAll(/^(Anonymous|Swap|Pss_Shmem):\s+(\d+) kB$/gm)) bytes[m[1] === 'Pss_Shmem' ? 'shared' : 'own'] += Number(m[2]) * 1024;
  return bytes;
}

/** What the processes hold that a snapshot stores (storedBytes). An
 * estimate (pages of zeros are not stored); the exact total is known
 * once everything is read. */
export function estimateImageBytes(pids: number[]): number {
  let total = 0;
  for (const pid of pids) {
    const b = storedBytes(pid);
    if (b) total += b.own + b.shared;
  }
  return total;
}

/** About how many bytes of memory a --leave-running snapshot with
 * copy-on-write capture reads while the application is frozen (all of a
 * process that is not copied, see CowCapture; the shared memory of one
 * that is), and how many from the copies once it runs again. */
export function estimateFrozenBytes(pids: number[], isCopied: (pid: number) => boolean): { frozen: number; copied: number } {
  let frozen = 0;
  let copied = 0;
  for (const pid of pids) {
    const b = storedBytes(pid);
    if (!b) continue;
    if (isCopied(pid)) copied += b.own;
    else frozen += b.own;
    frozen += b.shared;
  }
  return { frozen, copied };
}

/** Merges `runs` (pairs of page index and count, relative to `shift`
 * pages further on) into `into`, joining a run that continues the last. */
function appendRuns(into: number[], runs: ArrayLike<number>, shift: number): void {
  for (let i = 0; i < runs.length; i += 2) {
    const first = runs[i] + shift;
    const n = into.length;
    if (n && into[n - 2] + into[n - 1] === first) into[n - 1] += runs[i + 1];
    else into.push(first, runs[i + 1]);
  }
}

/**
 * The page writer, reporting to `progress` the bytes written to the file
 * against `estimate` (or what was taken, once more). A mapping with no
 * parent to compare with is read in slices; the result is the one a single
 * call gives (the slices' data follow each other in the file).
 */
export class ReportingPageWriter {
  /** Bytes handed to the writer so far. */
  taken = 0;

  constructor(
    readonly pages: PageWriter,
    private readonly progress: ByteProgress,
    private readonly estimate: number,
  ) {}

  report(): void {
    this.progress.bytes(this.pages.written(), Math.max(this.estimate, this.taken));
  }

  /** The writer to hand the resources. */
  writer(): PageWriter {
    const self = this;
    const pages = this.pages;
    // Every method delegated explicitly: the addon's methods must be
    // called on the addon's object.
    const writer: PageWriter = {
      finish: (deferSync?: boolean) => pages.finish(deferSync),
      synced: () => pages.synced(),
      link: (path: string) => pages.link(path),
      fd: () => pages.fd(),
      written: () => pages.written(),
      drain: (ms: number) => pages.drain(ms),
      startHashing: (all: boolean) => pages.startHashing(all),
      startFlushing: () => pages.startFlushing(),
      reserve: (bytes: number) => pages.reserve(bytes),
      close: () => pages.close(),
      abort: () => pages.abort(),
      dump(pid: number, pagemapFd: number, start: bigint, end: bigint, mode: number, parent?: Parameters<PageWriter['dump']>[5], forkedFrom?: Parameters<PageWriter['dump']>[6]) {
        const npages = Number((end - start) / BigInt(PAGE));
        // Sliced only when nothing refers to page positions in the whole
        // range (a parent image's pages, pages shared with a parent process).
        if (parent || forkedFrom || npages <= SLICE_PAGES) {
          const d = pages.dump(pid, pagemapFd, start, end, mode, parent, forkedFrom);
          self.taken += d.pages * PAGE;
          self.report();
          return d;
        }
        let offset = -1;
        const runs: number[] = [];
        let stored = 0;
        // A slice starts at the next page the process has (one
        // PAGEMAP_SCAN, which passes over page tables never filled in a
        // table at a time): a 1 TiB reservation with a few pages written
        // is a few slices, not 32,768 reads of its empty pagemap. Only
        // where the kernel's categories decide what is stored.
        let scan = mode === PAGES_MODE.anon || mode === PAGES_MODE.privateFile;
        for (let first = 0; first < npages; first += SLICE_PAGES) {
          if (scan) {
            const next = addon().scanFirst(pagemapFd, start + BigInt(first * PAGE), end);
            if (next === false) break;
            if (next === null) scan = false;
            else first = Math.max(first, Number((next - start) / BigInt(PAGE)));
          }
          const from = start + BigInt(first * PAGE);
          const to = start + BigInt(Math.min(npages, first + SLICE_PAGES) * PAGE);
          const d = pages.dump(pid, pagemapFd, from, to, mode);
          if (offset < 0) offset = d.offset;
          appendRuns(runs, d.runs, first);
          stored += d.pages;
          self.taken += d.pages * PAGE;
          self.report();
        }
        // Nothing there at all: the writer's position, from a one-page
        // dump, as a mapping of one slice would have it.
        if (offset < 0) {
          const d = pages.dump(pid, pagemapFd, start, start + BigInt(PAGE), mode);
          offset = d.offset;
          appendRuns(runs, d.runs, 0);
          stored += d.pages;
        }
        return { offset, runs: Uint32Array.from(runs), same: new Uint32Array(0), shared: new Uint32Array(0), pages: stored };
      },
      // In groups of at most a slice of address space, so that the display
      // moves as they are read; a mapping larger than a slice alone,
      // sliced (dump above).
      dumpScanned(pid: number, pagemapFd: number, bounds: BigUint64Array, modes: Uint8Array) {
        const n = modes.length;
        const offsets = new Float64Array(n);
        const counts = new Uint32Array(n);
        const runs: number[] = [];
        let stored = 0;
        // Mapping k alone, through dump; its errors carry its place, as
        // dumpScanned's do (the caller names the mapping by it).
        const dumpOne = (k: number): void => {
          let d: ReturnType<PageWriter['dump']>;
          try {
            d = writer.dump(pid, pagemapFd, bounds[2 * k], bounds[2 * k + 1], modes[k]);
          } catch (e) {
            if (e && typeof e === 'object') (e as { index?: number }).index = k;
            throw e;
          }
          offsets[k] = d.offset;
          counts[k] = d.runs.length / 2;
          for (const r of d.runs) runs.push(r);
          stored += d.pages;
        };
        for (let i = 0; i < n; ) {
          const size = (k: number) => Number((bounds[2 * k + 1] - bounds[2 * k]) / BigInt(PAGE));
          if (size(i) > SLICE_PAGES) {
            dumpOne(i);
            i++;
            continue;
          }
          let j = i + 1;
          for (let total = size(i); j < n && size(j) <= SLICE_PAGES && total + size(j) <= SLICE_PAGES; j++) total += size(j);
          let d: ReturnType<PageWriter['dumpScanned']>;
          try {
            d = pages.dumpScanned(pid, pagemapFd, bounds.subarray(2 * i, 2 * j), modes.subarray(i, j));
          } catch (e) {
            if (typeof (e as { index?: number }).index === 'number') (e as { index: number }).index += i;
            throw e;
          }
          if (!d) {
            // No PAGEMAP_SCAN: the caller dumps each mapping, unless some
            // are copied already (a larger one before, or an earlier
            // group), whose pages would be written twice: the rest here,
            // one by one.
            if (i === 0) return undefined;
            for (; i < j; i++) dumpOne(i);
            continue;
          }
          offsets.set(d.offsets, i);
          counts.set(d.counts, i);
          for (const r of d.runs) runs.push(r);
          stored += d.pages;
          self.taken += d.pages * PAGE;
          self.report();
          i = j;
        }
        return { offsets, counts, runs: Uint32Array.from(runs), pages: stored };
      },
      appendFd(fd: number, length: number) {
        const r = pages.appendFd(fd, length);
        for (let i = 1; i < r.runs.length; i += 2) self.taken += r.runs[i] * PAGE;
        self.report();
        return r;
      },
      append(data: Buffer) {
        const offset = pages.append(data);
        self.taken += data.length;
        return offset;
      },
    };
    return writer;
  }

  /** Waits for the writer thread to write what it was handed, reporting
   * as it goes, with a turn of the event loop between waits (so that
   * Ctrl-C is heard: `stop` says whether to give up). */
  async drain(stop: () => boolean): Promise<void> {
    for (;;) {
      this.pages.drain(100);
      this.progress.bytes(this.pages.written(), this.taken);
      if (this.pages.written() >= this.taken || stop()) return;
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
}
