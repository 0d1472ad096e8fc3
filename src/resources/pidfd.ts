/**
 * pidfds (pidfd_open, clone's CLONE_PIDFD): a descriptor that names one
 * process. A pidfd of a process of the application names, after a
 * restore, that process as restored: made with pidfd_open of its new
 * system PID (in appshot's process, once per open file description) and
 * handed over like any descriptor, with its PIDFD_NONBLOCK. Go (1.23 and
 * later) holds one for every child it starts, systemd for every service.
 *
 * The process is read from fdinfo ("Pid:", the system PID, -1 once it has
 * been reaped) and recorded by its virtual PID. Refused by name: a pidfd
 * of a process outside the application (nothing to name after a restore),
 * of one already reaped (the kernel can make no such pidfd again), and a
 * thread's pidfd (PIDFD_THREAD: the restored thread is made after the
 * descriptors).
 */
import { AppshotError } from '../errors.js';
import type { Fd, Process } from '../image/types.js';
import { addon } from '../native.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';

/** PIDFD_THREAD is O_EXCL; PIDFD_NONBLOCK is O_NONBLOCK. */
const PIDFD_THREAD = 0o200;
const PIDFD_NONBLOCK = 0o4000;

/** The virtual PID the pidfd `fd` of a process names; throws Unsupported
 * for what cannot be named again. */
export function dumpPidfd(ctx: DumpContext, info: Map<string, string>, flags: number, where: string): number {
  if (flags & PIDFD_THREAD) throw new Unsupported(`${where}: a pidfd of a thread (PIDFD_THREAD) cannot be captured yet`);
  const pid = Number(info.get('Pid') ?? '-1');
  if (!(pid > 0)) throw new Unsupported(`${where}: a pidfd of a process that has ended and been reaped cannot be captured (no process is there to name again)`);
  const vpid = ctx.virtual('pid', pid);
  if (!vpid) throw new Unsupported(`${where}: a pidfd of system process ${pid}, outside the application, cannot be captured`);
  return vpid;
}

/** Our pidfd for image fd `fd` of `p`: of the restored process `fd.procVpid`. */
export function openPidfd(h: RestoreContext, p: Process, fd: Fd): number {
  const what = `process ${p.vpid} fd ${fd.fd}`;
  const vpid = fd.procVpid ?? 0;
  const pid = addon().readTables(h.tablesPath).tables.pid?.find((e) => e.virtual === vpid)?.system;
  if (!vpid || pid === undefined) throw new AppshotError(`${what}: a pidfd of process ${vpid}, which this restore did not make`);
  try {
    return h.keep(addon().pidfdOpen(pid, fd.flags & PIDFD_NONBLOCK));
  } catch (e) {
    throw new AppshotError(`${what}: a pidfd of process ${vpid} (now ${pid}): ${(e as Error).message}`);
  }
}

/** For `inspect`. */
export const describePidfd = (fd: Fd): string => `pidfd of process ${fd.procVpid ?? '?'}`;
