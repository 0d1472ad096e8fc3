/**
 * Paths under /proc/PID of one of the application's processes that a
 * process holds: a descriptor opened there (files.ts) and a working
 * directory there (chdir("/proc/PID"), then relative opens: context.ts).
 * The kernel named the process by its system PID, which the restore
 * changes: the image records the virtual PID, and the restore puts the
 * restored process's system PID in its place. A path under a process
 * outside the application stays as it is.
 */
import { readFileSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { addon } from '../native.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';

export const PROC_PID = /^\/proc\/(\d+)(?=\/|$)/;
const PROC_TASK = /^\/proc\/(\d+)\/task\/(\d+)(?=\/|$)/;

/** The virtual PID of the application's process whose /proc directory
 * `path` (as the kernel names it) is in; undefined for any other path. A
 * thread's directory other than its process's main thread's is refused
 * (see refuseOtherThreads). `what`: who holds it, for messages. */
export function dumpProcVpid(ctx: DumpContext, path: string, what: string): number | undefined {
  const proc = PROC_PID.exec(path);
  if (!proc) return undefined;
  const vpid = ctx.virtual('pid', Number(proc[1])) || undefined;
  refuseOtherThreads(ctx, path, what);
  return vpid;
}

/** /proc/PID/task/TID/... (what /proc/thread-self/... opens) and
 * /proc/TID/... name a thread. The restore follows PID to the restored
 * process, and TID with it where it is the main thread's (the same
 * number); it places a process's descriptors and working directory before
 * making its other threads, so one of those cannot be followed: refused
 * here, in one line, rather than placed at the old TID (another process's
 * by then, or none). */
function refuseOtherThreads(ctx: DumpContext, target: string, what: string): void {
  const task = PROC_TASK.exec(target);
  if (task && task[1] !== task[2] && ctx.virtual('pid', Number(task[1])))
    throw new Unsupported(`${what}: ${target} is of thread ${task[2]}, not its process's main thread; another thread's /proc files cannot be captured yet`);
  if (task) return;
  const pid = PROC_PID.exec(target)![1];
  let tgid: string | undefined;
  try {
    tgid = /^Tgid:\s*(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'latin1'))?.[1];
  } catch {
    return; // gone, or not a process: as before
  }
  if (tgid && tgid !== pid && ctx.virtual('pid', Number(tgid)))
    throw new Unsupported(`${what}: ${target} is of thread ${pid} of process ${tgid}, not its main thread; another thread's /proc files cannot be captured yet`);
}

/** `path` (/proc/PID/... as snapshotted) of the restored process `vpid`:
 * the main thread's task directory follows it too. Another thread's is
 * refused at snapshot; an image that has one anyway is refused here. */
export function restoredProcPath(h: RestoreContext, path: string, vpid: number): string {
  // An image may come from anyone: a name under /proc/N, each component a
  // plain one.
  // Nor one through a magic link (root, cwd, fd, exe, map_files, ns): the
  // kernel names what those lead to, never them, so a snapshot never
  // records one, and followed by root they reach past the process's own
  // rights.
  if (!PROC_PID.test(path) || path.split('/').some((c) => c === '..' || c === '.') || /^\/proc\/\d+(\/task\/\d+)?\/(root|cwd|fd|exe|map_files|ns)(\/|$)/.test(path))
    throw new AppshotError(`corrupt image: it names ${JSON.stringify(path)} as a process's /proc file`);
  const pid = restoredPid(h, vpid);
  const task = PROC_TASK.exec(path);
  if (!task) return path.replace(PROC_PID, `/proc/${pid}`);
  if (task[1] !== task[2]) throw new AppshotError(`the image names ${path}, a thread's /proc directory other than its process's main one, which a restore cannot follow`);
  return path.replace(PROC_TASK, `/proc/${pid}/task/${pid}`);
}

/** The system PID of the restored process `vpid`, from the new tables (it
 * is bound there once made, before any descriptor or working directory is
 * placed). */
function restoredPid(h: RestoreContext, vpid: number): number {
  const pid = addon().readTables(h.tablesPath).tables.pid?.find((e) => e.virtual === vpid)?.system;
  if (pid === undefined) throw new AppshotError(`the image names /proc of process ${vpid}, which this restore did not make`);
  return pid;
}
