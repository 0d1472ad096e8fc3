/**
 * The descriptor table itself: processes that share one (clone with
 * CLONE_FILES but not CLONE_THREAD) would each get their own at restore,
 * so a descriptor one of them opens afterwards would silently be missing
 * in the other. Until a restore can make them share it again, such
 * processes are refused by name at snapshot, before anything is injected.
 */
import { addon } from '../native.js';
import { Unsupported } from './context.js';

/** Throws Unsupported naming two processes of `pids` that share one
 * descriptor table. kcmp(KCMP_FILES) orders the tables, so a sort puts
 * sharers side by side: n log n comparisons, not n². A kernel without
 * kcmp compares nothing (every table looks its own). */
export function refuseSharedFdTables(pids: number[], name: (pid: number) => string): void {
  if (pids.length < 2) return;
  const order = (a: number, b: number) => {
    const r = addon().compareFileTables(a, b);
    return r === 1 ? -1 : r === 2 ? 1 : 0;
  };
  const sorted = [...pids].sort(order);
  for (let i = 1; i < sorted.length; i++)
    if (addon().compareFileTables(sorted[i - 1], sorted[i]) === 0)
      throw new Unsupported(`${name(sorted[i - 1])} and ${name(sorted[i])} share one descriptor table (CLONE_FILES without CLONE_THREAD), which cannot be captured yet`);
}
