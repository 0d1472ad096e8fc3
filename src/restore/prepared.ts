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
import { readSync } from 'node:fs';
import type { LoadedImage } from '../image/format.js';
import type { Vma } from '../image/types.js';
import { type CopyRun, inheritedCopyRuns, lazyMappable } from '../resources/memory.js';
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
 * (1 MiB). Redis with 10,000 keys takes ~155-175 copy-on-write faults in
 * the moments after its release, and writes ~200-250 pages in a whole
 * run between a resume and its suspend; 1 MiB is under a third of what
 * copying all of it in costs (3.5 MiB of PSS per held instance), and
 * bounds a held instance of a larger application alike.
 */
export function prefaultCap(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.APPSHOT_PREPARED_PREFAULT;
  if (v === undefined || v === '') return 256;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : 256;
}

const hot = new WeakMap<LoadedImage, { chain: LoadedImage[]; cap: number; pages: Map<number, Map<bigint, number[]>>; count: number }>();

/**
 * The pages of `chain`'s newest image that its previous run wrote (stored
 * there with bytes other than its parent's at that address, or that the
 * parent did not have), in mappings a lazy restore maps from the page
 * file: what the application is likely to write again as soon as it is
 * resumed, each write then a copy-on-write fault (several µs on this VM,
 * ~0.7 ms of a prepared resume of redis). Their bytes are compared, not
 * the image's page lists: a lazy resume's next suspend stores the memory
 * mapped from its page file whole (memory.ts dumpMemory), written or not.
 * At most `cap` pages, taken in address order; none for an image without
 * a parent (nothing to compare with). Read while the service is suspended
 * (its images preloaded, page files open): ~3.5 MiB for redis.
 *
 * A page copied in at the prepare is anonymous memory the next suspend
 * compares with this image like any other (memory.ts): stored again only
 * if the application changed it, as the eager restore's are.
 */
export function prefaultPages(chain: LoadedImage[], cap: number): { pages: (vpid: number, v: Vma) => number[] | undefined; count: number } | undefined {
  if (chain.length < 2 || cap <= 0) return undefined;
  const head = chain[0];
  let found = hot.get(head);
  if (!found || found.cap !== cap || found.chain.length !== chain.length || found.chain.some((l, i) => l !== chain[i])) {
    const fds = chain.map((l) => l.pagesFd);
    if (fds.some((fd) => fd === undefined)) return undefined;
    const images = chain.map((l) => l.image);
    const pages = new Map<number, Map<bigint, number[]>>();
    let count = 0;
    const mine = Buffer.alloc(PAGE);
    const theirs = Buffer.alloc(PAGE);
    const read = (fd: number, buf: Buffer, offset: bigint) => readSync(fd, buf, 0, PAGE, Number(offset)) === PAGE;
    for (const p of head.image.processes) {
      if (count >= cap) break;
      let before: ReturnType<typeof resolveProcess> | undefined;
      const byVma = new Map<bigint, number[]>();
      for (const v of p.vmas) {
        if (count >= cap) break;
        if (!v.pages?.runs.length || !lazyMappable(v)) continue;
        before ??= resolveProcess(images, p.vpid, 1);
        const list: number[] = [];
        let offset = v.pages.offset;
        for (let i = 0; i < v.pages.runs.length && count < cap; i += 2)
          for (let pg = v.pages.runs[i]; pg < v.pages.runs[i] + v.pages.runs[i + 1]; pg++, offset += BigInt(PAGE)) {
            if (count >= cap) break;
            const was = before.get(v.start + BigInt(pg * PAGE));
            const written = !was || !read(fds[0]!, mine, offset) || !read(fds[was.file]!, theirs, was.offset) || !mine.equals(theirs);
            if (written) {
              list.push(pg);
              count++;
            }
          }
        if (list.length) byVma.set(v.start, list);
      }
      if (byVma.size) pages.set(p.vpid, byVma);
    }
    found = { chain: [...chain], cap, pages, count };
    hot.set(head, found);
  }
  const { pages, count } = found;
  return { pages: (vpid, v) => pages.get(vpid)?.get(v.start), count };
}
