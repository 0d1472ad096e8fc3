/**
 * Incremental snapshots (step 270): a snapshot of an application that was
 * snapshotted before with --leave-running stores only the pages that differ
 * from its parent image, and names the parent. Here: where each page of the
 * parent chain keeps its bytes, so the page writer can compare.
 *
 * Comparing against the parent's bytes works on every kernel (this one has
 * no soft-dirty bits); it reads all memory but writes only what changed.
 */
import { join } from 'node:path';
import type { ParentPages } from '../native.js';
import type { LoadedImage } from '../image/format.js';
import { PARTS } from '../image/format.js';
import type { Image, PageRef } from '../image/types.js';

const PAGE = 4096n;

interface Located {
  file: number;
  offset: bigint;
}

/** Every page a process's private memory had in an image chain, by address. */
type PageMap = Map<bigint, Located>;

export class ParentResolver {
  /** Page files of the chain, newest first: PageWriter compares against them. */
  readonly paths: string[];
  private readonly byVpid = new Map<number, { addrs: bigint[]; locs: Located[] }>();

  /** @param chain the parent image, then its parent, and so on */
  constructor(readonly chain: LoadedImage[]) {
    this.paths = chain.map((l) => join(l.dir, PARTS.pages));
  }

  get head(): LoadedImage {
    return this.chain[0];
  }

  /** The process's parent pages sorted by address. */
  private pagesOf(vpid: number): { addrs: bigint[]; locs: Located[] } {
    let sorted = this.byVpid.get(vpid);
    if (sorted) return sorted;
    const map = resolveProcess(this.chain.map((l) => l.image), vpid);
    const addrs = [...map.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    sorted = { addrs, locs: addrs.map((a) => map.get(a)!) };
    this.byVpid.set(vpid, sorted);
    return sorted;
  }

  /** The parent's pages inside [start, end) of process `vpid`. */
  pagesFor(vpid: number, start: bigint, end: bigint): ParentPages | undefined {
    const { addrs, locs } = this.pagesOf(vpid);
    let lo = 0;
    let hi = addrs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (addrs[mid] < start) lo = mid + 1;
      else hi = mid;
    }
    const index: number[] = [];
    const file: number[] = [];
    const offset: bigint[] = [];
    for (let i = lo; i < addrs.length && addrs[i] < end; i++) {
      index.push(Number((addrs[i] - start) / PAGE));
      file.push(locs[i].file);
      offset.push(locs[i].offset);
    }
    if (!index.length) return undefined;
    return { index: Uint32Array.from(index), file: Uint32Array.from(file), offset: BigUint64Array.from(offset) };
  }
}

/** Walks a PageRef: calls `visit(pageIndex, offsetInFile)` for each stored page. */
export function storedPages(ref: PageRef | undefined, visit: (page: number, offset: bigint) => void): void {
  if (!ref) return;
  let at = ref.offset;
  for (let i = 0; i < ref.runs.length; i += 2)
    for (let p = 0; p < ref.runs[i + 1]; p++) {
      visit(ref.runs[i] + p, at);
      at += PAGE;
    }
}

/** Where each private page of `vpid` lives, following from_parent links
 * down the chain (images[0] is the newest). */
export function resolveProcess(images: Image[], vpid: number, depth = 0): PageMap {
  const map: PageMap = new Map();
  const image = images[depth];
  const proc = image?.processes.find((p) => p.vpid === vpid);
  if (!proc) return map;
  let older: PageMap | undefined;
  for (const vma of proc.vmas) {
    storedPages(vma.pages, (page, offset) => map.set(vma.start + BigInt(page) * PAGE, { file: depth, offset }));
    const inherit = vma.pages?.fromParent ?? [];
    if (!inherit.length) continue;
    older ??= resolveProcess(images, vpid, depth + 1);
    for (let i = 0; i < inherit.length; i += 2)
      for (let p = 0; p < inherit[i + 1]; p++) {
        const addr = vma.start + BigInt(inherit[i] + p) * PAGE;
        const loc = older.get(addr);
        if (loc) map.set(addr, loc);
      }
  }
  return map;
}
