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
import type { LoadedImage } from '../image/format.js';
import type { Vma } from '../image/types.js';
import { type CopyRun, inheritedCopyRuns } from '../resources/memory.js';
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
