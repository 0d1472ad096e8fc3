/**
 * Incremental snapshots (step 270): a snapshot of an application that was
 * snapshotted before with --leave-running stores only the pages that differ
 * from its parent image, and names the parent. Here: where each page of the
 * parent chain keeps its bytes, so the page writer can compare.
 *
 * Comparing against the parent's bytes works on every kernel (this one has
 * no soft-dirty bits); it reads all memory but writes only what changed.
 */
import type { ParentPages } from '../native.js';
import type { LoadedImage } from '../image/format.js';
import type { Image, PageRef } from '../image/types.js';

const PAGE = 4096n;

interface Located {
  file: number;
  offset: bigint;
}

/** Every page a process's private memory had in an image chain, by address. */
type PageMap = Map<bigint, Located>;

export class ParentResolver {
  /** Page files of the chain, newest first, as the descriptors that were
   * checked when each link was loaded (LoadOptions.holdPages): PageWriter
   * compares against them. Their paths may name other files by now. */
  readonly fds: number[];

  /** @param chain the parent image, then its parent, and so on, each
   * loaded with holdPages */
  constructor(readonly chain: LoadedImage[]) {
    this.fds = chain.map((l) => {
      if (l.pagesFd === undefined) throw new Error(`${l.dir}: its page file was not kept open when it was checked`);
      return l.pagesFd;
    });
  }

  get head(): LoadedImage {
    return this.chain[0];
  }

  /** The parent's pages inside [start, end) of process `vpid`: only the
   * mappings of the chain that overlap the range are looked at. */
  pagesFor(vpid: number, start: bigint, end: bigint): ParentPages | undefined {
    const images = this.chain.map((l) => l.image);
    const found = new Map<bigint, Located>();
    resolveRange(images, vpid, start, end, 0, found);
    if (!found.size) return undefined;
    const addrs = [...found.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return {
      index: Uint32Array.from(addrs, (a) => Number((a - start) / PAGE)),
      file: Uint32Array.from(addrs, (a) => found.get(a)!.file),
      offset: BigUint64Array.from(addrs, (a) => found.get(a)!.offset),
    };
  }
}

/** Where the private pages of `vpid` in [start, end) live in the chain
 * from `depth` on, following from_parent links (and cow_shared ones to
 * the parent process in the same image); adds them to `out`. */
function resolveRange(images: Image[], vpid: number, start: bigint, end: bigint, depth: number, out: Map<bigint, Located>): void {
  const proc = images[depth]?.processes.find((p) => p.vpid === vpid);
  if (!proc) return;
  for (const vma of proc.vmas) {
    if (vma.end <= start || vma.start >= end || !vma.pages) continue;
    storedPages(vma.pages, (page, offset) => {
      const addr = vma.start + BigInt(page) * PAGE;
      if (addr >= start && addr < end) out.set(addr, { file: depth, offset });
    });
    const inherit = vma.pages.fromParent;
    for (let i = 0; i < inherit.length; i += 2) {
      const lo = vma.start + BigInt(inherit[i]) * PAGE;
      const hi = lo + BigInt(inherit[i + 1]) * PAGE;
      const a = lo > start ? lo : start;
      const b = hi < end ? hi : end;
      if (a < b) resolveRange(images, vpid, a, b, depth + 1, out);
    }
    const cow = vma.pages.cowShared ?? [];
    for (let i = 0; i < cow.length; i += 2) {
      const lo = vma.start + BigInt(cow[i]) * PAGE;
      const hi = lo + BigInt(cow[i + 1]) * PAGE;
      const a = lo > start ? lo : start;
      const b = hi < end ? hi : end;
      if (a < b) resolveRange(images, proc.vppid, a, b, depth, out);
    }
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
 * down the chain (images[0] is the newest), and cow_shared ones to the
 * parent process in the same image. */
export function resolveProcess(images: Image[], vpid: number, depth = 0): PageMap {
  const map: PageMap = new Map();
  const image = images[depth];
  const proc = image?.processes.find((p) => p.vpid === vpid);
  if (!proc) return map;
  let older: PageMap | undefined;
  let forker: PageMap | undefined;
  for (const vma of proc.vmas) {
    storedPages(vma.pages, (page, offset) => map.set(vma.start + BigInt(page) * PAGE, { file: depth, offset }));
    const cow = vma.pages?.cowShared ?? [];
    if (cow.length) forker ??= resolveProcess(images, proc.vppid, depth);
    for (let i = 0; i < cow.length; i += 2)
      for (let p = 0; p < cow[i + 1]; p++) {
        const addr = vma.start + BigInt(cow[i] + p) * PAGE;
        const loc = forker!.get(addr);
        if (loc) map.set(addr, loc);
      }
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
