/**
 * Paths under /proc/PID of one of the application's processes that a
 * process holds: a descriptor opened there (files.ts) and a working
 * directory there (chdir("/proc/PID"), then relative opens: context.ts).
 * The kernel named the process by its system PID, which the restore
 * changes: the image records the virtual PID, and the restore puts the
 * restored process's system PID in its place. A path under a process
 * outside the application stays as it is.
 */
import { fstatSync, readFileSync, readlinkSync, statfsSync, statSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { addon } from '../native.js';
import { FdKind, type Image } from '../image/types.js';
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
  const fault = procFileFault(path);
  if (fault) throw new AppshotError(`corrupt image: ${fault}`);
  const pid = restoredPid(h, vpid);
  const task = PROC_TASK.exec(path);
  if (!task) return path.replace(PROC_PID, `/proc/${pid}`);
  if (task[1] !== task[2]) throw new AppshotError(`the image names ${path}, a thread's /proc directory other than its process's main one, which a restore cannot follow`);
  return path.replace(PROC_TASK, `/proc/${pid}/task/${pid}`);
}

/** Why `path` cannot be a process's /proc file as a snapshot records
 * one (restoredProcPath), or undefined. */
function procFileFault(path: string): string | undefined {
  if (!PROC_PID.test(path) || path.split('/').some((c) => c === '..' || c === '.') || /^\/proc\/\d+(\/task\/\d+)?\/(root|cwd|fd|exe|map_files|ns)(\/|$)/.test(path))
    return `it names ${JSON.stringify(path)} as a process's /proc file`;
  return undefined;
}

/** The system PID of the restored process `vpid`, from the new tables (it
 * is bound there once made, before any descriptor or working directory is
 * placed). */
function restoredPid(h: RestoreContext, vpid: number): number {
  const pid = addon().readTables(h.tablesPath).tables.pid?.find((e) => e.virtual === vpid)?.system;
  if (pid === undefined) throw new AppshotError(`the image names /proc of process ${vpid}, which this restore did not make`);
  return pid;
}

/** Names that resolve through the resolver's own process, whoever that is:
 * /proc/self, /proc/thread-self and the /proc links to them (net, mounts),
 * /dev/fd and /dev/std*. The kernel names what they lead to, never them,
 * so no snapshot records one; the restore resolves an image's names in
 * the engine (files.ts openAsProcess on an engine thread, context.ts,
 * devices.ts, fsident.ts), where they would be the engine's own: its
 * /proc/self/mem opened read-write is code execution in the engine. */
const THROUGH_RESOLVER = /^\/(proc\/(self|thread-self|net|mounts)|dev\/fd|dev\/std(in|out|err))(\/|$)/;

/** Why `path`, a name of the image's `where`, may not be resolved at
 * restore, or undefined. `vpid`: the application's process the snapshot
 * said the name is under (/proc/VPID, followed to the restored process);
 * any other /proc/N names whatever process has that number here (the
 * engine, appshot-init, another user's), which the application never held
 * and the restore does not follow. */
function resolverPathFault(path: string | undefined, where: () => string, vpids: Set<number>, vpid?: number): string | undefined {
  if (!path) return undefined;
  // Repeated slashes resolve as one: "//proc//self" is /proc/self.
  const plain = path.replace(/\/+/g, '/');
  if (THROUGH_RESOLVER.test(plain)) return `${where()} names ${JSON.stringify(path)}, which would be resolved as the restoring engine's own`;
  const proc = PROC_PID.exec(plain);
  if (vpid !== undefined && vpid !== 0) {
    if (!vpids.has(vpid)) return `${where()} names /proc of process ${vpid}, which the image does not have`;
    return procFileFault(path);
  }
  if (proc) return `${where()} names ${JSON.stringify(path)}, /proc of process ${proc[1]}, which is not one of the application's`;
  return undefined;
}

/** The first name of `image` that the restore would resolve as its own
 * process's or another process's outside the application (see
 * resolverPathFault), or undefined: checked before anything is made. */
export function resolverPathsFault(image: Image): string | undefined {
  const vpids = new Set(image.processes.map((p) => p.vpid));
  let fault: string | undefined;
  // Where a name is, as a function: the text is made only for a fault.
  // Made for every mapping and descriptor, it was 11% of reading and
  // checking an image (a bigint's toString(16) per mapping; h449 R3).
  const check = (path: string | undefined, where: () => string, vpid?: number) => {
    fault ??= resolverPathFault(path, where, vpids, vpid);
  };
  for (const p of image.processes) {
    const who = `process ${p.vpid}`;
    check(p.cwd, () => `${who}'s working directory`, p.cwdProcVpid);
    check(p.root, () => `${who}'s root directory`);
    check(p.exe, () => `${who}'s executable`);
    for (const v of p.vmas) check(v.path, () => `${who}'s mapping at 0x${v.start.toString(16)}`);
    for (const fd of p.fds) {
      const where = () => `${who} fd ${fd.fd}`;
      // A pidfd's procVpid is its process, not a /proc name.
      check(fd.path, where, fd.kind === FdKind.FILE ? fd.procVpid : undefined);
      check(fd.socket?.file?.base, () => `${where()}'s socket directory`);
      for (const w of fd.inotifyWatches ?? []) check(w.path, () => `${where()}'s inotify watch`);
      for (const m of fd.fanotify?.marks ?? []) check(m.path, () => `${where()}'s fanotify mark`);
    }
  }
  // A file's /proc/VPID name is its descriptors' (checked above with
  // their process); the resolver's own, never.
  for (const [i, f] of image.files.entries()) if (THROUGH_RESOLVER.test(f.path.replace(/\/+/g, '/'))) fault ??= `file ${i} names ${JSON.stringify(f.path)}, which would be resolved as the restoring engine's own`;
  for (const [i, pipe] of image.pipes.entries()) check(pipe.fifoPath, () => `pipe ${i}`);
  for (const r of image.instance?.redirs ?? []) {
    check(r.from, () => `a clone's REDIR from`);
    check(r.to, () => `a clone's REDIR to`);
  }
  return fault;
}

const PROC_SUPER_MAGIC = 0x9fa0;
/** Filesystems whose files have no name to open: a pipe, a socket, an
 * eventfd, epoll, a pidfd... reached by an open only through a process's
 * /proc/PID/fd/N (a magic link). */
const NAMELESS = new Set([0x50495045 /* pipefs */, 0x534f434b /* sockfs */, 0x09041934 /* anon_inodefs */]);

let procDevice: number | undefined;

/**
 * The one check after the engine opened a name an image gives and before
 * the descriptor is the application's (a file, a FIFO, a device, a
 * mapping, a working or root directory): refused in one line naming
 * `where` unless what opened is the application's to hold.
 *
 * A /proc file (its filesystem says, fstatfs, whatever its path) is taken
 * only as /proc/NAME plainly, in the engine's /proc, reached with no
 * symbolic link on the way, and either not a process's (/proc/meminfo,
 * /proc/sys/...) or, `procPath`, the restored process's own file the
 * snapshot recorded (restoredProcPath). Anything else - a symlink or a
 * bind mount into /proc, a second procfs mount (its own superblock since
 * Linux 5.8, so neither its device nor its path prefix is /proc's) - may
 * be any process's file: the engine's own /proc/self/mem read-write, or
 * init's, or another appshot process's, which the application never held.
 * Nor a pipe, a socket or an anonymous inode: an open reaches one only
 * through a process's /proc/PID/fd/N, which a snapshot never records (a
 * named FIFO opened is a file of its directory's filesystem).
 */
export function refuseOutsideApplication(got: number, name: string, where: string, procPath?: string): void {
  const type = Number(statfsSync(`/proc/self/fd/${got}`).type);
  if (NAMELESS.has(type)) throw new AppshotError(`${where}: ${name} leads to ${readlinkSync(`/proc/self/fd/${got}`)}, another process's descriptor, not a file the application may open`);
  if (type !== PROC_SUPER_MAGIC) return;
  const opened = readlinkSync(`/proc/self/fd/${got}`);
  const plain = (n: string) => n.replace(/\/+/g, '/').replace(/(.)\/$/, '$1');
  procDevice ??= statSync('/proc').dev;
  const honest = fstatSync(got).dev === procDevice && (opened === '/proc' || opened.startsWith('/proc/')) && (procPath !== undefined ? opened === plain(procPath) : opened === plain(name) && !PROC_PID.test(opened));
  if (!honest) throw new AppshotError(`${where}: ${name} leads to the /proc file ${opened}, which is not the application's own (reached through a symbolic link or another /proc mount)`);
}
