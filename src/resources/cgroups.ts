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
import { fsIdentity, identitiesFor, openToMapKey, refuseMagicLink } from './fsident.js';
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

/** Per process (vpid) to be moved: its cgroup's cgroup.procs, opened for
 * the move before anything of the restore is made (openCgroupJoins). */
export type CgroupJoins = Map<number, number>;

/** The cgroup both `a` and `b` are in (paths in the unified hierarchy). */
function commonAncestor(a: string, b: string): string {
  const x = a.split('/').filter(Boolean);
  const y = b.split('/').filter(Boolean);
  let n = 0;
  while (n < x.length && n < y.length && x[n] === y[n]) n++;
  return `/${x.slice(0, n).join('/')}`;
}

/**
 * The cgroup each process's seed is in when restoreCgroup moves it, in
 * the unified hierarchy: a root of the tree is one of appshot-init's
 * seeds, in ours (`here`); a child is forked from its parent's seed,
 * before the parent was moved (in its seed's cgroup), or, where
 * `forkedWithMemory` says a child of it is forked from its filled memory
 * (restore/driver.ts: every child of such a parent is forked after its
 * memory, so after its move), in the parent's own.
 */
function seedCgroups(image: Image, here: string, forkedWithMemory: (child: Process) => boolean): Map<number, string> {
  const byVpid = new Map(image.processes.map((p) => [p.vpid, p]));
  const movedFirst = new Set(image.processes.filter(forkedWithMemory).map((c) => c.vppid));
  const seeds = new Map<number, string>();
  const seedOf = (p: Process): string => {
    // Up to the first process placed, or the root (the image's tree has
    // no cycle: validate.ts), then down again.
    const chain = new Set<Process>();
    for (let q: Process | undefined = p; q && !seeds.has(q.vpid) && !chain.has(q); q = byVpid.get(q.vppid)) chain.add(q);
    for (const q of [...chain].reverse()) {
      const parent = byVpid.get(q.vppid);
      const parentSeed = parent ? seeds.get(parent.vpid) : undefined;
      seeds.set(q.vpid, !parent || parentSeed === undefined ? here : movedFirst.has(parent.vpid) ? parent.cgroup || parentSeed : parentSeed);
    }
    return seeds.get(p.vpid)!;
  };
  for (const p of image.processes) seedOf(p);
  return seeds;
}

/**
 * Whether each process may be put back into its cgroup, decided before
 * anything of the restore is made (a refusal after its processes were
 * made left them to be killed and waited for): its cgroup.procs opened
 * for the move, kept for it (restoreCgroup writes the PID there).
 *
 * As whom: the write to cgroup.procs is the move, and the kernel decides
 * it by the credentials the file was opened with: write access to it and
 * to the cgroup.procs of the common ancestor of where the process is
 * (where its seed is: seedCgroups) and where it goes. A snapshot of this
 * node (isOwnSnapshot) says where the kernel had the process: it goes back
 * there with the restorer's rights, as before. Any other image's word is
 * a claim: the files are opened as the application's processes would open
 * them (fsident.ts), so a crafted cgroup (the root one, another service's)
 * is refused by the kernel as the image's identity would have been, never
 * entered with the restorer's rights (r344 #3). A process whose seed is in
 * its cgroup already is not moved. One whose cgroup is ours (the
 * engine's) is moved too where its seed is not in it (forked from a
 * parent moved elsewhere first), and so asked here like any other: it
 * was asked only at the move, after the processes were made.
 *
 * `forkedWithMemory`: whether a child is forked from its parent's filled
 * memory (restore/driver.ts sharesWithParent), for seedCgroups.
 */
export function openCgroupJoins(image: Image, forkedWithMemory: (child: Process) => boolean): CgroupJoins {
  const joins: CgroupJoins = new Map();
  const here = unifiedPath('/proc/self');
  const seeds = seedCgroups(image, here, forkedWithMemory);
  const own = isOwnSnapshot(image);
  const opened = new Map<string, number>();
  const ancestorsAsked = new Set<string>();
  try {
    for (const p of image.processes) {
      const from = seeds.get(p.vpid) ?? here;
      if (!p.cgroup || p.cgroup === from) continue;
      const who = nameProcess(p.vpid, p.comm);
      const mount = unifiedMount();
      if (!mount) throw new AppshotError(`${who}: was in cgroup ${p.cgroup}, but this node has no cgroup v2 hierarchy mounted`, ExitCode.conflict);
      const procs = join(mount, p.cgroup, 'cgroup.procs');
      if (!existsSync(procs)) throw new AppshotError(`${who}: its cgroup ${p.cgroup} does not exist on this node (${join(mount, p.cgroup)})`, ExitCode.conflict);
      const k = openToMapKey(own ? undefined : p, procs, constants.O_WRONLY);
      let fd = opened.get(k);
      if (fd === undefined) {
        fd = openForMove(image, p, procs, own);
        opened.set(k, fd);
      }
      joins.set(p.vpid, fd);
      // The common ancestor's, asked now as the kernel asks at the move.
      const ancestor = commonAncestor(from, p.cgroup);
      if (from && ancestor !== p.cgroup && !ancestorsAsked.has(`${k}|${ancestor}`)) {
        ancestorsAsked.add(`${k}|${ancestor}`);
        closeSync(openForMove(image, p, join(mount, ancestor, 'cgroup.procs'), own));
      }
    }
  } catch (e) {
    for (const fd of opened.values()) closeSync(fd);
    throw e;
  }
  return joins;
}

/** Closes what openCgroupJoins opened. */
export function closeCgroupJoins(joins: CgroupJoins): void {
  for (const fd of new Set(joins.values())) closeSync(fd);
  joins.clear();
}

/** `procs` (a cgroup.procs) opened for writing as process `p` would (or,
 * `own`, as the restorer), or its refusal in one line. */
function openForMove(image: Image, p: Process, procs: string, own: boolean): number {
  try {
    return own ? openSync(procs, 'w') : addon().openAs(procs, constants.O_WRONLY, 0, identitiesFor(image, p));
  } catch (e) {
    // A symlink to a /proc magic link put on the way since: said as every
    // other such refusal is (exit 5), not as the bare ELOOP of a move.
    refuseMagicLink(e, `${nameProcess(p.vpid, p.comm)}: its cgroup's ${procs}`);
    throw moveRefused(e, p, own);
  }
}

function moveRefused(e: unknown, p: Process, own: boolean): AppshotError {
  const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
  const as = own || (code !== 'EACCES' && code !== 'EPERM') ? '' : ` as the image's processes (uid ${fsIdentity(p).fsuid}) may not enter it`;
  return new AppshotError(`${nameProcess(p.vpid, p.comm)}: cannot be put back into its cgroup ${p.cgroup}${as}: ${code}`, ExitCode.conflict);
}

/** Moves the restored process `pid` into the cgroup its image names,
 * through its cgroup.procs opened before anything was made (`joins`), or
 * opened now: its seed not where seedCgroups expected it (moved from
 * outside meanwhile), still as the image's processes would open it. */
export function restoreCgroup(image: Image, p: Process, pid: number, joins: CgroupJoins): void {
  if (!p.cgroup || unifiedPath(`/proc/${pid}`) === p.cgroup) return;
  const own = isOwnSnapshot(image);
  let procs = joins.get(p.vpid);
  const late = procs === undefined;
  try {
    if (procs === undefined) {
      const mount = unifiedMount();
      if (!mount) throw new AppshotError(`${nameProcess(p.vpid, p.comm)}: was in cgroup ${p.cgroup}, but this node has no cgroup v2 hierarchy mounted`, ExitCode.conflict);
      procs = openForMove(image, p, join(mount, p.cgroup, 'cgroup.procs'), own);
    }
    writeSync(procs, `${pid}\n`);
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    throw moveRefused(e, p, own);
  } finally {
    if (late && procs !== undefined) closeSync(procs);
  }
}
