/**
 * What processes may share besides a thread group: a descriptor table
 * (clone with CLONE_FILES but not CLONE_THREAD), a working directory, root
 * and umask (CLONE_FS), or their memory (CLONE_VM, with or without
 * CLONE_SIGHAND and its handlers). A restore makes each process its own,
 * so a descriptor one of them opens afterwards would silently be missing in
 * the other, a chdir or umask would no longer reach it, and a write to
 * memory would no longer be seen by it (nor a handler it installs). Until
 * a restore can make them share again, such processes are refused by name
 * at snapshot, before anything is injected. (A vfork child shares its
 * parent's memory only until it execs or exits: the freezer lets it get
 * there before the parent can stop.)
 */
import { addon } from '../native.js';
import { Unsupported } from './context.js';

const SHARED_PARTS: { compare: (a: number, b: number) => number; what: string }[] = [
  { compare: (a, b) => addon().compareFileTables(a, b), what: 'one descriptor table (CLONE_FILES without CLONE_THREAD)' },
  { compare: (a, b) => addon().compareFsStructs(a, b), what: 'one working directory, root and umask (CLONE_FS without CLONE_THREAD)' },
  { compare: (a, b) => addon().compareMms(a, b), what: 'one memory (CLONE_VM without CLONE_THREAD)' },
];

/** Throws Unsupported naming two processes of `pids` that share a
 * descriptor table, a working directory, root and umask, or memory. kcmp
 * orders each kind of object, so a sort puts sharers side by side: n log n
 * comparisons, not n². A kernel without kcmp compares nothing (every
 * process looks its own). */
export function refuseSharedTables(pids: number[], name: (pid: number) => string): void {
  if (pids.length < 2) return;
  for (const { compare, what } of SHARED_PARTS) {
    const order = (a: number, b: number) => {
      const r = compare(a, b);
      return r === 1 ? -1 : r === 2 ? 1 : 0;
    };
    const sorted = [...pids].sort(order);
    for (let i = 1; i < sorted.length; i++)
      if (compare(sorted[i - 1], sorted[i]) === 0) throw new Unsupported(`${name(sorted[i - 1])} and ${name(sorted[i])} share ${what}, which cannot be captured yet`);
  }
}

/** Throws Unsupported naming a thread of `pid` (system TIDs `tids`, main
 * thread first) with syscall user dispatch on, or one that has a
 * descriptor table, or a working directory, root and umask, of its own
 * (unshare(CLONE_FILES), unshare(CLONE_FS)): a restore makes every thread
 * share the main thread's, so the thread would silently see the other's
 * descriptors, directory and umask. (Named by
 * its system TID, as process.ts names a thread in a namespace of its own:
 * a thread never seen by name has no virtual one yet.) */
export function refuseOwnThreadTables(pid: number, tids: number[], what: string): void {
  for (const tid of tids) {
    // Syscall user dispatch (Wine's): a restored thread would come back
    // without it, its system calls no longer sent to its SIGSYS handler;
    // and with its selector on BLOCK a call injected by the snapshot
    // would be. Asked of every thread, the main one too, before anything
    // is injected.
    if (addon().syscallDispatchMode(tid) > 0) throw new Unsupported(`${what}: thread ${tid} has syscall user dispatch on (PR_SET_SYSCALL_USER_DISPATCH), which cannot be captured yet`);
    if (tid === pid) continue;
    const files = addon().compareFileTables(pid, tid);
    if (files === 1 || files === 2) throw new Unsupported(`${what}: thread ${tid} has a descriptor table of its own (unshare(CLONE_FILES)), which cannot be captured yet`);
    const fsStruct = addon().compareFsStructs(pid, tid);
    if (fsStruct === 1 || fsStruct === 2) throw new Unsupported(`${what}: thread ${tid} has a working directory, root and umask of its own (unshare(CLONE_FS)), which cannot be captured yet`);
  }
}
