/**
 * Cgroup membership: each process goes back into the cgroup (v2) it was
 * in, by its path in the unified hierarchy ("0::PATH" of /proc/PID/cgroup),
 * before its memory is made, so that what it allocates is charged there.
 * Where the path does not exist on the restoring node, or this user may
 * not move a process into it (cgroup.procs not writable, a delegation
 * boundary), the restore fails naming the process and the cgroup: never
 * silently left in the restorer's cgroup. The v1 hierarchies are not
 * recorded (README).
 *
 * Threads of one process in different cgroups (threaded cgroups) are
 * refused at snapshot.
 */
import { closeSync, constants, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import { isOwnSnapshot } from '../image/format.js';
import { addon } from '../native.js';
import { fsIdentity, identitiesFor } from './fsident.js';
import { procDir, procText } from '../procfs.js';
import { join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import type { Image, Process } from '../image/types.js';
import { nameProcess, Unsupported } from './context.js';

/** The cgroup v2 path of a process or thread, or '' without a unified hierarchy. */
function unifiedPath(procDir: string): string {
  let text = '';
  try {
    text = procText(join(procDir, 'cgroup'));
  } catch {
    return '';
  }
  return /^0::(.*)$/m.exec(text)?.[1] ?? '';
}

export function dumpCgroup(p: Process, pid: number, what: string): void {
  p.cgroup = unifiedPath(`/proc/${pid}`);
  for (const tid of procDir(`/proc/${pid}/task`)) {
    if (tid === String(pid)) continue; // the process's own, read above
    const there = unifiedPath(`/proc/${pid}/task/${tid}`);
    // Named by the TID the application knows (the system's where the
    // thread is not in the image yet).
    const vtid = p.threads?.find((t) => t.tid === Number(tid))?.vtid ?? tid;
    if (there && there !== p.cgroup) throw new Unsupported(`${what} thread ${vtid}: in cgroup ${there}, its process in ${p.cgroup}: threaded cgroups cannot be captured yet`);
  }
}

/** Where the unified (v2) hierarchy is mounted here, as this process's
 * cgroup namespace shows it. */
function unifiedMount(): string | undefined {
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [before, after] = line.split(' - ');
    if (after?.startsWith('cgroup2 ')) return before.split(' ')[4];
  }
  return undefined;
}

/** Moves the restored process `pid` into the cgroup its image names.
 *
 * As whom: the write to cgroup.procs is the move, and the kernel decides
 * it by the writer's rights (write access to the cgroup.procs of the
 * common ancestor of where the process is and where it goes, by the
 * credentials the file was opened with). A snapshot of this node
 * (isOwnSnapshot) says where the kernel had the process: it goes back
 * there with the restorer's rights, as before. Any other image's word is
 * a claim: the file is opened as the application's processes would open
 * it (fsident.ts), so a crafted cgroup (the root one, another service's)
 * is refused by the kernel as the image's identity would have been,
 * never entered with the restorer's rights (r344 #3). */
export function restoreCgroup(image: Image, p: Process, pid: number): void {
  if (!p.cgroup || unifiedPath(`/proc/${pid}`) === p.cgroup) return;
  const who = nameProcess(p.vpid, p.comm);
  const mount = unifiedMount();
  if (!mount) throw new AppshotError(`${who}: was in cgroup ${p.cgroup}, but this node has no cgroup v2 hierarchy mounted`, ExitCode.conflict);
  const dir = join(mount, p.cgroup);
  if (!existsSync(join(dir, 'cgroup.procs'))) throw new AppshotError(`${who}: its cgroup ${p.cgroup} does not exist on this node (${dir})`, ExitCode.conflict);
  const own = isOwnSnapshot(image);
  let procs: number | undefined;
  try {
    procs = own ? openSync(join(dir, 'cgroup.procs'), 'w') : addon().openAs(join(dir, 'cgroup.procs'), constants.O_WRONLY, 0, identitiesFor(image, p));
    writeSync(procs, `${pid}\n`);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
    const as = own || (code !== 'EACCES' && code !== 'EPERM') ? '' : ` as the image's processes (uid ${fsIdentity(p).fsuid}) may not enter it`;
    throw new AppshotError(`${who}: cannot be put back into its cgroup ${p.cgroup}${as}: ${code}`, ExitCode.conflict);
  } finally {
    if (procs !== undefined) closeSync(procs);
  }
}
