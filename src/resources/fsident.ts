/**
 * Filesystem identity: a restore does every path operation on a name an
 * image gives (a socket's file, a file to open again) as the image's
 * processes would, never as the restorer.
 *
 * A root restore of an application that ran as uid 1000 would otherwise
 * follow a symlink planted in the application's directory to a place
 * only root may write, bind or open there, and hand the application what
 * it never could reach (review28 R3). The kernel decides a path operation
 * by the calling thread's fsuid, fsgid, supplementary groups and effective
 * capabilities: the addon takes those of an image's process on a thread
 * of its own for the one operation (addon fsident.c), and the kernel's
 * EACCES is the answer, as it would have been the application's.
 *
 * Whose: the process the restore makes the descriptor for (for a socket,
 * a pipe, a deleted file: the first process of the image that holds it),
 * and, refused as that one, each other identity among the application's
 * processes in turn. A server binds its sockets and opens its files as
 * root, then its workers run as another user and hold them (haproxy's
 * worker, the only holder of the stats socket its root master bound): the
 * worker alone could not make them again, the application could, and a
 * restore grants no more than the application's processes together hold
 * (a process the image says is root may do anything once restored). An
 * application whose every process is unprivileged gets nothing more.
 *
 * Never through a /proc magic link (/proc/PID/fd/N, cwd, root, exe...,
 * anywhere on the way): followed by a thread of the restorer, whatever
 * identity it took, /proc/self/fd/N is the restorer's own descriptor (the
 * resident engine's files and memfds), past every directory's
 * permissions. The addon refuses the walk (openat2
 * RESOLVE_NO_MAGICLINKS); refuseMagicLink words the refusal.
 *
 * Each identity is a thread's credentials as the image recorded them
 * (the main thread's; an older image: the process's). An unprivileged
 * restorer holds those already or is refused before anything is made
 * (creds.ts, credentialRefusal): the calls on its thread need no
 * privilege.
 */
import { type Creds, type FileIdentity, type Image, type Process } from '../image/types.js';
import { addon, type FsIdentity } from '../native.js';
import { type CopiedFile } from './paths.js';
import { closeSync, constants as fsConstants, fstatSync, openSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { isOwnSnapshot } from '../image/format.js';
import { onlyRestorerMayChange } from '../home.js';
import { ownCreds } from './creds.js';
import { refuseOutsideApplication } from './procpaths.js';

/** A filesystem identity with the permitted set of the credentials it
 * was taken from: the capabilities its process may raise into its
 * effective set at will (identitiesOfRestored's `raisable`). Two threads
 * that differ only there are two identities: one that may raise
 * CAP_SYS_ADMIN is not the same as one that may not. */
type AppIdentity = FsIdentity & { capPrm: bigint };

/** The filesystem identity of credentials `c` (uid[3], gid[3]: fsuid, fsgid). */
function fsIdentityOfCreds(c: Creds): AppIdentity {
  return { fsuid: c.uid[3], fsgid: c.gid[3], groups: c.groups, capEff: c.capEff, capPrm: c.capPrm };
}

/** The filesystem identity of process `p` of an image. */
export function fsIdentity(p: Process): AppIdentity {
  const main = p.threads.find((t) => t.vtid === p.vpid)?.creds;
  return fsIdentityOfCreds(main ?? p.creds);
}

/** An identity as the kernel sees an operation made as it: its permitted
 * set plays no part until raised (raisableIdentitiesFor). */
const effectiveKey = (i: FsIdentity) => `${i.fsuid}:${i.fsgid}:${[...i.groups].sort((a, b) => a - b).join(',')}:${i.capEff}`;

/** An identity whole: two that may raise different capabilities differ. */
const key = (i: AppIdentity) => `${effectiveKey(i)}:${i.capPrm}`;

/** Per image: every distinct identity of its processes' threads, in
 * process order. */
const everyone = new WeakMap<Image, AppIdentity[]>();

function identitiesOf(image: Image): AppIdentity[] {
  let all = everyone.get(image);
  if (!all) {
    const seen = new Map<string, AppIdentity>();
    for (const p of image.processes)
      for (const c of [p.threads.find((t) => t.vtid === p.vpid)?.creds ?? p.creds, ...p.threads.map((t) => t.creds)]) {
        if (!c) continue;
        const id = fsIdentityOfCreds(c);
        if (!seen.has(key(id))) seen.set(key(id), id);
      }
    all = [...seen.values()];
    everyone.set(image, all);
  }
  return all;
}

/** The identities an operation for process `p` of `image` is tried as:
 * `p`'s, then the application's others. */
export function identitiesFor(image: Image, p: Process | undefined): AppIdentity[] {
  const all = identitiesOf(image);
  return distinct(p ? [fsIdentity(p), ...all] : all, effectiveKey);
}


/** The first of each `keyOf` in `ids`: each one tried once (a try costs
 * a thread of the restorer's, and there are at most 64). */
function distinct<T extends FsIdentity>(ids: T[], keyOf: (i: FsIdentity) => string): T[] {
  const seen = new Set<string>();
  return ids.filter((i) => !seen.has(keyOf(i)) && !!seen.add(keyOf(i)));
}

/** Those for what the first process of `image` that `holds` holds (a
 * descriptor or mapping of a file, a pipe). */
export function firstHolderIdentities(image: Image, holds: (p: Process) => boolean): FsIdentity[] {
  return identitiesFor(image, image.processes.find(holds));
}

/** Per image: each socket's first holder (by inode). */
const holders = new WeakMap<Image, Map<bigint, Process>>();

/** Those for socket `ino` of `image`: its first holder's first, whose
 * bind it was as far as an image can tell. */
export function socketHolderIdentities(image: Image, ino: bigint): FsIdentity[] {
  let byIno = holders.get(image);
  if (!byIno) {
    byIno = new Map();
    for (const p of image.processes) for (const fd of p.fds) if (fd.socket && !byIno.has(fd.socket.ino)) byIno.set(fd.socket.ino, p);
    holders.set(image, byIno);
  }
  return identitiesFor(image, byIno.get(ino));
}

/**
 * Those a unix socket's own file is made as (its bind, then its owner and
 * mode): socketHolderIdentities, then, for this node's own snapshot
 * (format.ts isOwnSnapshot), the restorer's own, where no one but the
 * restorer (or root) may change the socket's directory or a step to it.
 * A daemon binds its socket as root, then runs as its user for good
 * (unbound's /run/unbound.ctl: root's file in root's /run): no process of
 * the image may make it again, so every restore failed (hand-servers-37).
 * This node's snapshot saw the file there, so the restorer makes what
 * was; an image anyone wrote gets no more than its processes, and in a
 * directory another user may change, a link put on the way since would
 * have the restorer bind wherever it leads.
 */
export function socketFileIdentities(image: Image, ino: bigint, address: string, base: string | undefined): FsIdentity[] {
  const own = socketHolderIdentities(image, ino);
  if (!isOwnSnapshot(image)) return own;
  // The socket's own directory: for a relative name, the one it was
  // bound from and the name's directories in it (review r256).
  const dir = base ? join(base, dirname(address)) : isAbsolute(address) ? dirname(address) : undefined;
  if (!dir || !onlyRestorerMayChange(dir)) return own;
  const me = ownCreds();
  return [...own, { fsuid: me.uid[3], fsgid: me.gid[3], groups: me.groups, capEff: me.capEff }];
}

/** Under what openToMapAs keeps the open of `path` with `flags` for
 * process `p`: one per identity, flags and path (restore/verify.ts puts
 * there the opens it checked). */
export const openToMapKey = (p: Process | undefined, path: string, flags: number) => `${p ? key(fsIdentity(p)) : ''}|${flags}|${path}`;

/** `path` opened here with `flags` as process `vpid` of `image` would
 * open it, kept by `keep` until the restore lets it go: the descriptor a root
 * restore hands its process to map (memory.ts MemorySources.openToMap).
 * Opened once, here: were the process to open the path itself, as root
 * before its own credentials are given back, a directory on it that the
 * application's user may write could be swapped for a symlink after this
 * open and before that one, and root would map what the check never saw.
 * Throws what the process's credentials do not allow. `opened`: what this
 * restore opened already (a server's processes map the same libraries,
 * and each open as another costs a thread, ~0.15 ms). */
export function openToMapAs(image: Image, vpid: number, path: string, flags: number, opened: Map<string, number>, keep: (fd: number) => number): number {
  const p = image.processes.find((q) => q.vpid === vpid);
  const k = openToMapKey(p, path, flags);
  let fd = opened.get(k);
  if (fd === undefined) {
    // Close-on-exec: the seeds this restorer starts later inherit none.
    // Non-blocking: a FIFO put at the name since (by the application's
    // user) would hold the restorer in open() for ever; mmap of what is
    // opened ignores the flag, and fails on anything it cannot map.
    fd = keep(addon().openAs(path, flags | O_CLOEXEC | O_NONBLOCK, 0, identitiesFor(image, p)));
    opened.set(k, fd);
  }
  // This open or the check's (restore/verify.ts): not another process's
  // file (procpaths.ts).
  refuseOutsideApplication(fd, path, `process ${vpid}'s mapping`);
  return fd;
}

/** `e`, an open's refusal of a name that leads through a /proc magic
 * link (openAs: fsident.c fsident_open), as one line whose subject is
 * `what` (the name and whose it is; exit 5); openat2 refused as such
 * too (refuseWithoutOpenat2); anything else returns. No snapshot records
 * such a name (the kernel names what a link leads to): an image that has
 * one, or a symlink to one put at an image's name since, would reach a
 * file the application never held, the restoring engine's own among
 * them. */
export function refuseMagicLink(e: unknown, what: string): void {
  if ((e as { magicLink?: boolean })?.magicLink) throw new AppshotError(`${what} leads through a /proc magic link (a process's fd, cwd, root or exe), which a restore never follows`, ExitCode.denied);
  refuseWithoutOpenat2(e, what);
}

/** `e`, openAs's answer where openat2 itself is refused whatever it is
 * asked (the addon's `openat2Refused`: a seccomp filter that answers
 * EPERM, as older Docker profiles do, or a kernel before 5.6), as one
 * line naming `what`: not a credential the process lacks (r375 L1), and
 * no name of an image is opened without openat2 (a plain open would
 * follow a /proc magic link), so nothing that needs one, a watch a retry
 * identity must reach by its name among them, can be restored safely.
 * Every caller of refuseMagicLink asks this too; faccessat2 refused so
 * (the addon's `faccessat2Refused`) is told the same way. Anything else
 * returns. */
export function refuseWithoutOpenat2(e: unknown, what: string): void {
  const how = (e as { openat2Refused?: string })?.openat2Refused;
  if (how) throw new AppshotError(`${how}: ${what} cannot be restored safely without it (a restore opens an image's names only through openat2)`);
  // openExecAs's check that a process may run its executable (Linux 5.8):
  // refused as such, not a credential the process lacks (r392 F4).
  const check = (e as { faccessat2Refused?: string })?.faccessat2Refused;
  if (check) throw new AppshotError(`${check}: ${what} cannot be restored without it (a restore checks with it that a process may run its executable)`);
}

/** `e`, the kernel's refusal of an open made as a process (EACCES,
 * EPERM), as one line naming `what` (and `who`'s fsuid and fsgid), which
 * cannot be `verb` (opened, made, reached): exit 5. A watch or mark that
 * another identity reached but could not show it may make (the addon's
 * `retryRefused`: no mount id to compare, a hard link the holder may not
 * read) says so after the code.
 * Any other error is thrown as it is. */
export function refusedAsProcess(e: unknown, what: string, who?: FsIdentity, verb = 'opened'): never {
  refuseMagicLink(e, what);
  if (!refusal(e)) throw e;
  const code = (e as NodeJS.ErrnoException).code;
  const why = (e as { retryRefused?: string }).retryRefused;
  throw new AppshotError(`${what} cannot be ${verb} with the credentials of the process or the application's others${who ? ` (fsuid ${who.fsuid}, fsgid ${who.fsgid})` : ''}: ${code}${why ? ` (${why})` : ''}`, ExitCode.denied);
}

/** Per restored process (its RemoteProcess): which process of which image
 * it is, told by restoreProcessState (process.ts), its first step by
 * name, for the kinds whose calls come after it with only the remote in
 * hand (inotify.ts, fanotify.ts: a watch or mark added as that process). */
const restoring = new WeakMap<object, { image: Image; p: Process }>();

export function restoringProcess(r: object, image: Image, p: Process): void {
  restoring.set(r, { image, p });
}

/** The identities a path operation for the process `r` restores is tried
 * as (identitiesFor), with the process (for the refusal's line).
 * `raisable`: each with its permitted capabilities in its effective set,
 * for state whose making asks a capability the process holds but may have
 * lowered since (a fanotify mount mark made with CAP_SYS_ADMIN, which it
 * then left out of its effective set only: it may raise it again and
 * make the mark itself). */
export function identitiesOfRestored(r: object, raisable = false): { who: FsIdentity[]; p: Process } {
  const known = restoring.get(r);
  if (!known) throw new Error('a path operation of a process whose image process is not known yet');
  return { who: raisable ? raisableIdentitiesFor(known.image, known.p) : identitiesFor(known.image, known.p), p: known.p };
}

/** identitiesFor, each with its permitted capabilities in its effective
 * set (identitiesOfRestored's `raisable`). */
export function raisableIdentitiesFor(image: Image, p: Process): FsIdentity[] {
  const own = fsIdentity(p);
  const raised = [own, ...identitiesOf(image)].map((i) => ({ ...i, capEff: i.capEff | i.capPrm }));
  return distinct(raised, effectiveKey);
}

const O_PATH = 0o10000000;
const O_CLOEXEC = 0o2000000;
const O_NONBLOCK = 0o4000;
const O_DIRECTORY = 0o200000;

/** `path`, a directory, opened O_PATH as process `p` of `image` would
 * reach it (the walk to it with its rights; the directory itself need not
 * be searchable, as a working directory inherited from a parent of other
 * credentials need not be): refused in one line naming `what`, unless it
 * is the very directory (Image.files[`held`]) an image of our own
 * snapshot says the process is in (reopenHeld: entered before it
 * dropped its privileges). */
export function openDirectoryAs(image: Image, p: Process, path: string, what: string, held?: number): number {
  const opened = (): number => {
    try {
      return addon().openAs(path, O_PATH | O_DIRECTORY, 0, identitiesFor(image, p));
    } catch (e) {
      const got = refusal(e) && held !== undefined ? reopenHeld(image.files[held], isOwnSnapshot(image), path, O_PATH | O_DIRECTORY) : undefined;
      if (got !== undefined) return got;
      refusedAsProcess(e, `process ${p.vpid}: ${what} ${path}`, fsIdentity(p), 'reached');
    }
  };
  const got = opened();
  try {
    // Not another process's /proc directory (procpaths.ts).
    refuseOutsideApplication(got, path, `process ${p.vpid}: ${what}`);
  } catch (e) {
    closeSync(got);
    throw e;
  }
  return got;
}

/** What a watch or mark of the process `p` is on (inotify.ts,
 * fanotify.ts): `path` opened O_PATH as `who` (`nofollow`: a symlink
 * there is itself what is watched, as IN_DONT_FOLLOW asks), and checked
 * as every other name an image gives (refuseOutsideApplication: not
 * another process's /proc file, such as the restoring engine's own
 * reached through a symlink to /proc/self); the watch is then added on
 * this descriptor (addon inotifyAddWatchAs, fanotifyMarkAs), never by the
 * name again, which the application's user may change meanwhile. Refused
 * in one line naming `what`. The caller closes it, and passes `path` to
 * the watch as its `shown`: an identity after the holder's adds it only
 * if it reaches this very inode by that name itself, following no symlink
 * (addon_fsident.cc SameAsHeldStrictly): the holder's walk here follows
 * the symlinks its user may have planted, and needs search permission
 * only, so a root master's read right is never applied to what they
 * chose (r375 M1). */
export function openWatchedAs(path: string, nofollow: boolean, who: FsIdentity[], p: Process, what: string): number {
  let at: number;
  try {
    at = addon().openAs(path, O_PATH | (nofollow ? O_NOFOLLOW : 0), 0, who);
  } catch (e) {
    refusedAsProcess(e, `${what} on ${path}`, fsIdentity(p), 'made');
  }
  try {
    refuseOutsideApplication(at, path, what);
  } catch (e) {
    closeSync(at);
    throw e;
  }
  return at;
}

/** Whether `e` is the kernel's refusal of an operation made as a process. */
export function refusal(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'EACCES' || code === 'EPERM';
}

const { O_NOFOLLOW, S_IFMT, S_IFREG, S_IFDIR, S_IFIFO } = fsConstants;

/** What the image says a held file is: its FileIdentity, or a named
 * FIFO's (Pipe: fifoDev, ino, fifoBtimeNs). */
export type HeldIdentity = Pick<FileIdentity, 'dev' | 'ino' | 'mode' | 'deleted' | 'btimeNs'>;

const isHeld = (st: { dev: bigint; ino: bigint; birthtimeNs: bigint }, held: HeldIdentity) => st.dev === held.dev && st.ino === held.ino && st.birthtimeNs === held.btimeNs;

/**
 * What a process held past a drop of its privileges, given back as the
 * very one where the process's credentials no longer reach it: a file or
 * a named FIFO it opened, or a working or root directory it entered, as
 * root (in or under a directory only root may enter) before it gave up
 * its privileges. lighttpd, as Debian starts it, opens its PID file in
 * /run as root, becomes www-data and keeps the descriptor; no identity of
 * the application may open that file again, yet the application held it.
 *
 * Only on the word of an image a snapshot of this node wrote
 * (`ownSnapshot`: format.ts isOwnSnapshot: its image.pb says
 * from_snapshot, under a manifest signed by this node's own key), whose
 * names are what the kernel showed that snapshot: an image that someone
 * wrote and had signed (hostile.test's root-only file, also made a
 * template) names files as it likes, and gets only what its credentials
 * open. And only the very one, by device, inode and birth time (a later
 * file given its inode number has another; where statx gives no birth
 * time, Node reports the ctime in its place, which a file's every change
 * moves), a regular file, FIFO or directory as `held` was.
 *
 * And with no symbolic link anywhere on the way: the image's name is the
 * kernel's (d_path) at snapshot, which has none, so a link met now was
 * put there since, and whoever could put it there has no say over what
 * root reaches (even where it leads to the very file: opening a name is
 * root's act, and a link may be changed between the walk and the open).
 * The name is walked one component at a time, each opened O_PATH |
 * O_NOFOLLOW beneath the one before (walkWithoutLinks), as the restorer,
 * which opens nothing and runs no driver. The very one found is then
 * opened from its O_PATH descriptor with `flags` (the access the
 * descriptor had; a FIFO's O_RDWR never blocks; a directory's O_PATH
 * again), no name walked again, as the restorer: a restorer that may not
 * open it either is refused by the kernel.
 *
 * A clone whose rules give it its own copy of such a file (`copy`: made by
 * this restore, paths.ts privateCopy) gets the copy only if what was
 * copied was that very file, and the copy at the name is still the one
 * made, by device and inode: its path is appshot's (under the state
 * directory, which may itself be reached through a link), so only its
 * last component is not followed. A template keeps the word of the
 * snapshot it was made of, and only of one of ours (template.ts).
 *
 * Returns the descriptor, or undefined where this cannot be shown; the
 * caller then refuses as before.
 */
export function reopenHeld(held: HeldIdentity | undefined, ownSnapshot: boolean, path: string, flags: number, copy?: CopiedFile): number | undefined {
  if (!held || !ownSnapshot || held.deleted || !held.btimeNs) return undefined;
  const type = held.mode & S_IFMT;
  if (type !== S_IFREG && type !== S_IFDIR && type !== S_IFIFO) return undefined;
  if (copy && (type !== S_IFREG || !isHeld(copy.source, held))) return undefined;
  let at: number | undefined;
  try {
    at = copy ? addon().openAs(path, O_PATH | O_NOFOLLOW, 0) : walkWithoutLinks(path);
  } catch {
    return undefined;
  }
  if (at === undefined) return undefined;
  try {
    const st = fstatSync(at, { bigint: true });
    const very = copy ? st.dev === copy.copy.dev && st.ino === copy.copy.ino : isHeld(st, held);
    if (!very || Number(st.mode & BigInt(S_IFMT)) !== type) return undefined;
    // O_NOFOLLOW would refuse the /proc link itself: the descriptor's
    // status flags (F_GETFL, the next snapshot) lack it, which changes
    // nothing for a descriptor already open.
    return openSync(`/proc/self/fd/${at}`, flags & ~O_NOFOLLOW);
  } catch {
    return undefined;
  } finally {
    closeSync(at);
  }
}

/** An O_PATH descriptor of absolute `path` reached with no symbolic link
 * on the way, the last component included; undefined otherwise (a link,
 * a name missing, a "." or ".."). */
function walkWithoutLinks(path: string): number | undefined {
  const names = path.split('/').filter((n) => n !== '');
  if (!path.startsWith('/') || names.some((n) => n === '.' || n === '..')) return undefined;
  let at: number | undefined;
  try {
    at = openSync('/', O_PATH | O_DIRECTORY);
    for (const name of names) {
      const next: number = openSync(`/proc/self/fd/${at}/${name}`, O_PATH | O_NOFOLLOW);
      closeSync(at);
      at = next;
      if (fstatSync(at).isSymbolicLink()) throw new Error('a symbolic link on the way');
    }
    const found = at;
    at = undefined;
    return found;
  } catch {
    return undefined;
  } finally {
    if (at !== undefined) closeSync(at);
  }
}
