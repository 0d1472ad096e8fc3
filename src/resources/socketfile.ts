/**
 * The file a unix socket's bind makes: its place, mode and owner.
 *
 * A unix listener is made again by binding the name it was bound to (what
 * getsockname answers, and what the kernel keeps), but the application
 * may have done more with the file since: a server that binds a
 * temporary name and renames it into place (haproxy's stats and master
 * sockets: `admin.sock.PID.tmp` → `admin.sock`) has its clients connect
 * to the new name; a chmod (`mode 660`) or chown decides who may connect;
 * an unlinked file leaves the socket reachable by no name. A restore that
 * only bound the name left clients a stale file at the name they use
 * (ECONNREFUSED), a file at the temporary name, and the bind's umask
 * where the mode was.
 *
 * The kernel tells a named socket's file by inode and device (sock_diag's
 * UNIX_DIAG_VFS) wherever it is now; a rename is looked for in the
 * directory of the bound name only (servers rename beside the temporary
 * name). The same look tells a name bound before a chroot (found as
 * appshot sees it: the restore binds it right) from one bound inside it
 * (found under the root: refused by name, the restore does not resolve
 * names under a root).
 *
 * A relative name (Postfix binds every socket of its queue directory so:
 * `private/smtp`, `public/postlog`) is what getsockname answers too, and
 * was resolved in the working directory of the process at its bind. The
 * snapshot looks for its file under the process's working directory now
 * (`base`); the restore binds the same relative name there (addon bind_in,
 * in a thread of its own working directory). Found nowhere there, it is
 * refused by name: where it was bound cannot be known.
 *
 * The directories on the way are not appshot's, and a root restore must
 * not be led to another file: after the bind, every step (owner, mode,
 * rename, removal, and a failed restore's clean-up) acts on the inode the
 * kernel says the bind made, through one descriptor of its directory
 * (addon sockfile.c). Whether a file there is stale or held is asked of
 * the kernel too (the sockets' files, sock_diag), then, for a socket of
 * another network namespace, which sock_diag does not list, of a connect()
 * through the directory's descriptor (a connect() by path alone takes any
 * file that is no socket for a stale one, and cannot be given a long
 * path).
 *
 * The bind, and every step after it, runs as the socket's process would
 * (the first process of the image that holds it: its fsuid, fsgid, groups
 * and effective capabilities; refused, as the application's other
 * processes in turn, as a root master binds for its workers: fsident.ts):
 * a root restore of an application that ran as nobody, whose directory
 * was swapped for a symlink to one only root may write, gets the kernel's
 * EACCES, as the application would have.
 *
 * A socket whose file went away and another one the application bound
 * to the same name since (review27 L1) are made in descriptor order,
 * whichever comes first: the file of the one bound first in the restore is
 * moved aside to a name of its own for the other's bind (a removed one's
 * stays there for its peers to connect, until every process is final; a
 * live one's comes back to its name as soon as the removed one is bound).
 *
 * On an overlay whose layers are on other file systems (without xino),
 * sock_diag's device is the overlay's and stat's the layer's (review28
 * R4): the file is told by its inode number and its directory's device,
 * which is the overlay's (isFileOf; sockfile.c is_file).
 */
import { type BigIntStats, lstatSync, readdirSync, readlinkSync, statfsSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { type Fd, FdKind, type SocketFile } from '../image/types.js';
import { uniqueTag } from '../holder.js';
import { killPoint } from '../killpoint.js';
import { addon, type FileId, type FsIdentities } from '../native.js';
import { type RestoreContext, Unsupported } from './context.js';
import { isOwnSnapshot } from '../image/format.js';

/** A unix socket the restore binds by its path name (a listener, a
 * datagram socket, a stream socket neither listening nor connected): the
 * kinds whose file this module makes and places. */
export function bindsByName(fd: Fd): boolean {
  const s = fd.socket;
  return !!s && s.family === 1 && ((fd.kind === FdKind.UNIX_SOCKET && s.listening) || fd.kind === FdKind.UNIX_DGRAM || fd.kind === FdKind.UNCONNECTED_STREAM) && s.address !== '' && !s.address.startsWith('@');
}

/** One name in a directory: no slash or NUL, not . or .., at most 255 bytes. */
const FILE_NAME = /^(?!\.\.?$)[^/\0]{1,255}$/;

/** What is wrong with descriptor `fd`'s socket file record and name, from
 * an image (validate.ts), or undefined. The file is moved within its
 * directory and given a mode: a name with a slash (or . and ..) would move
 * it anywhere. A relative name is bound where the image says it was
 * (base), never where the restore happens to run. */
export function socketFileRecordFault(fd: Fd): string | undefined {
  const s = fd.socket;
  const byName = bindsByName(fd);
  const relative = byName && !s!.address.startsWith('/');
  const file = s?.file;
  if (file && (!byName || !(file.mode >= 0 && file.mode <= 0o7777) || (file.renamed !== '' && !FILE_NAME.test(file.renamed)) || (file.removed && file.renamed !== '') || (relative ? !file.base?.startsWith('/') : !!file.base)))
    return `has a socket file record that is not of a unix socket bound to a path, or names ${JSON.stringify(String(file.renamed).slice(0, 64))} (not one name in its directory) or mode ${file.mode}, or a directory it was bound in that its name does not need`;
  if (relative && !file?.base) return `is a unix socket bound to the relative name ${JSON.stringify(s!.address.slice(0, 64))}, with no directory it was bound in`;
  if (relative && s!.address.split('/').some((part) => part === '.' || part === '..')) return `is a unix socket bound to ${JSON.stringify(s!.address.slice(0, 64))}, which is not a plain relative path`;
  return undefined;
}

/** statfs(2)'s type of an overlay (linux/magic.h). */
const OVERLAYFS_MAGIC = 0x794c7630;

/** The socket file `st`, an entry of directory `dir`, is the one the
 * kernel names by `ino` and `dev`. On an overlay whose layers are on other
 * file systems (without xino), stat gives the file its layer's device and
 * sock_diag the overlay's, which the overlay's directories show: told by
 * its inode and its directory's device then (review28 R4; sockfile.c the
 * same). */
function isFileOf(st: BigIntStats | undefined, ino: number, dev: number, dir: string): boolean {
  // sock_diag's inode number is the low 32 bits of the file's. The file's
  // is read whole (bigint): as a Number, one above 2^53 (an overlay's with
  // xino, a large XFS's) is rounded, and its low 32 bits are not its own.
  if (!st || !st.isSocket() || BigInt.asUintN(32, st.ino) !== BigInt(ino % 2 ** 32)) return false;
  if (st.dev === BigInt(dev)) return true;
  try {
    return statfsSync(dir).type === OVERLAYFS_MAGIC && lstatSync(dir, { bigint: true }).dev === BigInt(dev);
  } catch {
    return false;
  }
}

function lstatOrNone(path: string): BigIntStats | undefined {
  try {
    return lstatSync(path, { bigint: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
    throw e;
  }
}

/** The entry of directory `dir` that is the socket file (`ino`, `dev`). */
function renamedIn(dir: string, ino: number, dev: number): string | undefined {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return undefined;
  }
  return names.find((n) => isFileOf(lstatOrNone(join(dir, n)), ino, dev, dir));
}

/**
 * The file of process `pid`'s unix listener bound to `path`, the kernel's
 * `vfs` look at it, or undefined for an abstract or unnamed socket.
 * `where` names the descriptor in a refusal.
 */
export function dumpSocketFile(pid: number, name: string, vfs: { vfsIno?: number; vfsDev?: number } | undefined, where: string): SocketFile | undefined {
  if (!name || name.startsWith('@')) return undefined;
  const relative = !name.startsWith('/');
  // sock_diag shows the file of every socket bound to a path of this
  // network namespace (the table was read again while it did not,
  // sockets.ts): without it, the file's name, mode and owner are unknown,
  // and a restore that bound the name again would not be the same.
  if (!vfs?.vfsIno || vfs.vfsDev === undefined) {
    if (relative) throw new Unsupported(`${where}: it is bound to the relative path ${name}, whose file the kernel does not show: where it was bound cannot be found`);
    throw new Unsupported(`${where}: it is bound to ${name}, whose file the kernel's list of sockets does not show (a socket of another network namespace?): where its file is cannot be told`);
  }
  const { vfsIno: ino, vfsDev: dev } = vfs;
  let root = '/';
  let base = '';
  try {
    root = readlinkSync(`/proc/${pid}/root`);
    if (relative) base = readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    /* gone: the snapshot finds out */
  }
  if (relative && !base.startsWith('/')) throw new Unsupported(`${where}: it is bound to the relative path ${name}, and the working directory of its process cannot be read`);
  const path = relative ? join(base, name) : name;
  const found = (st: BigIntStats, renamed = ''): SocketFile => ({ renamed, removed: false, mode: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), ...(relative ? { base } : {}) });
  try {
    const here = lstatOrNone(path);
    if (isFileOf(here, ino, dev, dirname(path))) return found(here!);
    const rootView = root === '/' ? undefined : `/proc/${pid}/root${path}`;
    const insideRoot = () => new Unsupported(`${where}: a unix socket that names ${path} in a process whose root directory is ${root} (chroot): the name is resolved in that root, which the restore does not do`);
    if (rootView && (isFileOf(lstatOrNone(rootView), ino, dev, dirname(rootView)) || renamedIn(dirname(rootView), ino, dev))) throw insideRoot();
    const renamed = renamedIn(dirname(path), ino, dev);
    if (renamed) return found(lstatSync(join(dirname(path), renamed), { bigint: true }), renamed);
    // Gone from its directory. In a chrooted process the name may have
    // been the root's, its file since removed: which, nothing tells; a
    // relative one may have been bound in another directory.
    if (rootView) throw insideRoot();
    if (relative) throw new Unsupported(`${where}: it is bound to the relative path ${name}, whose file is not under the working directory ${base} of its process: where it was bound cannot be found`);
    return { renamed: '', removed: true, mode: 0, uid: 0, gid: 0 };
  } catch (e) {
    if (e instanceof Unsupported) throw e;
    throw new Unsupported(`${where}: the file of the unix socket bound to ${path} cannot be looked at (${(e as Error).message})`);
  }
}

/** Where the file of a socket bound to `name` is, as appshot sees it: a
 * relative name joined to the directory it was bound in; undefined for an
 * abstract or unnamed socket, or a relative name with no directory (an
 * image validation refuses). */
function socketFilePath(name: string, file: SocketFile | undefined): string | undefined {
  if (!name || name.startsWith('@')) return undefined;
  if (name.startsWith('/')) return name;
  return file?.base ? join(file.base, name) : undefined;
}

/** The directory of the file of a socket bound to `name`, and its name
 * there (undefined: abstract, unnamed). Every step of a restore on the
 * file goes through that directory (addon sockfile.c). */
export function socketFilePlace(name: string, file: SocketFile | undefined): { dir: string; name: string } | undefined {
  const path = socketFilePath(name, file);
  return path ? { dir: dirname(path), name: basename(path) } : undefined;
}

/** Where the file of a socket bound to `name` is while the restore makes
 * connections to it: moved where it went (one the application removed is
 * removed only once every process is final, so that its peers can
 * connect to it first). */
export function socketFileForPeers(name: string, file: SocketFile | undefined): { dir: string; name: string } | undefined {
  const place = socketFilePlace(name, file);
  return place && file?.renamed ? { ...place, name: file.renamed } : place;
}

/** Before the bind of `name`: a socket file there that no live socket
 * holds (the ended original's) is removed; one a live socket holds (the
 * original, still running) is a conflict. Told by the kernel's list of
 * the sockets' files, whatever their kind, and looked at through the
 * directory (a name too long for a sockaddr too). */
export function clearSocketFile(h: RestoreContext, name: string, file: SocketFile | undefined, where: string, who: FsIdentities | undefined): void {
  const place = socketFilePlace(name, file);
  if (!place) return;
  // A name the application no longer has (it renamed its file, or
  // removed it): known before the bind, so that a restore killed before
  // its commit has the file there removed (registry.ts release).
  if (file?.removed || file?.renamed) h.recordSocketFileMade?.(place.dir, place.name, who);
  makeRoomAmongOurs(h, place, !!file?.removed, where);
  let live: boolean;
  try {
    live = addon().socketFileClear(place.dir, place.name, who);
  } catch (e) {
    throw new AppshotError(`${where}: ${(e as Error).message}`);
  }
  if (live) throw new AppshotError(`${where}: a live socket holds ${join(place.dir, place.name)}`, ExitCode.conflict);
  // The name it was renamed to, where restoreSocketFile moves it: one a
  // live socket holds (the running original's) is refused before the
  // bind, not after it, which put the bound name in that directory for
  // as long as the failed restore took to undo (the original saw it).
  if (!file?.renamed || file.removed) return;
  try {
    live = addon().socketFileClear(place.dir, file.renamed, who);
  } catch (e) {
    throw new AppshotError(`${where}: ${(e as Error).message}`);
  }
  if (live) throw new AppshotError(`${where}: a live socket holds ${join(place.dir, file.renamed)}`, ExitCode.conflict);
}

/**
 * After the bind of `name` made socket `sock`'s file: its owner and mode,
 * then its place (renamed beside it; one the application removed, once
 * every process is final). Each step acts on the file the kernel says the
 * bind made (its inode, through a descriptor of its directory, sockfile.c):
 * a directory on the way swapped for a symlink makes the step fail, never
 * land on another file; a rename replaces nothing but a stale socket file.
 * A failed restore removes the file, wherever it went. `where` names the
 * descriptor in an error.
 */
export function restoreSocketFile(h: RestoreContext, sock: number, name: string, file: SocketFile | undefined, where: string, who: FsIdentities | undefined): void {
  const place = socketFilePlace(name, file);
  if (!place) return;
  const id = addon().socketFileOf(sock);
  if (!id) return;
  const ours: OurFile = { sock, dir: place.dir, at: place.name, id, who, removed: !!file?.removed };
  ourFiles(h).push(ours);
  h.undoOnFailure(() => {
    for (const at of new Set([place.name, file?.renamed || place.name, ours.at])) addon().socketFileRemove(place.dir, at, id, who);
  });
  if (!file) return;
  if (file.removed) {
    // A live socket of the application's, made before this one, was
    // moved aside for its bind (makeRoomAmongOurs): this file goes aside
    // now, that one back.
    const back = stashed(h).get(join(place.dir, place.name));
    if (back) {
      stashed(h).delete(join(place.dir, place.name));
      moveAside(h, ours, where);
      move(back, place.name, where);
    }
    h.whenProcessesAreFinal(() => addon().socketFileRemove(place.dir, ours.at, id, who));
    return;
  }
  try {
    try {
      addon().socketFileFinish(place.dir, place.name, id, { uid: file.uid, gid: file.gid, mode: file.mode, renamed: file.renamed }, who);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EPERM' || !isOwnSnapshot(h.image)) throw e;
      ownerByRestorer(place, id, file, who);
    }
    if (file.renamed) ours.at = file.renamed;
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const to = join(place.dir, file.renamed || place.name);
    if (err.code === 'EADDRINUSE') throw new AppshotError(`${where}: a live socket holds ${to}`, ExitCode.conflict);
    if (err.code === 'EEXIST') throw new AppshotError(`${where}: moving the socket file ${place.name} to ${to}, where it was: another file is there`, ExitCode.conflict);
    if (err.code === 'ESTALE') throw new AppshotError(`${where}: ${join(place.dir, place.name)} is not the file its bind made (its directory changed meanwhile?)`);
    throw new AppshotError(`${where}: giving ${join(place.dir, place.name)} its owner ${file.uid}:${file.gid} and mode ${file.mode.toString(8)}${file.renamed ? ` and its name ${file.renamed}` : ''}: ${err.message}`);
  }
}

/** Not the file's owner, no identity of the application may give it one
 * (EPERM): slapd binds its ldapi socket as root in /run/slapd, a
 * directory of its user's, then runs as openldap for good, so the file
 * is root's and only root may make it so again (the bind as openldap
 * succeeds there; its chown does not). For this node's own snapshot,
 * which saw the file so, the application's identities bind, place and
 * give the file its mode, keeping their own owner (uid and gid -1: no
 * change), and the restorer then gives that very inode (opened beneath
 * the directory without following a link, checked to be the bind's:
 * sockfile.c) the owner and mode the snapshot saw, and nothing else: no
 * name is made, moved or removed as the restorer in a directory the
 * application may change. An image anyone wrote gets no more than its
 * processes could do. */
function ownerByRestorer(place: { dir: string; name: string }, id: FileId, file: SocketFile, who: FsIdentities | undefined): void {
  const KEEP = 0xffffffff;
  addon().socketFileFinish(place.dir, place.name, id, { uid: KEEP, gid: KEEP, mode: file.mode, renamed: file.renamed }, who);
  addon().socketFileFinish(place.dir, file.renamed || place.name, id, { uid: file.uid, gid: file.gid, mode: file.mode, renamed: undefined }, undefined);
}

/* ---- sockets of the application bound to one name (review27 L1) ---- */

/** A socket file this restore made, and where it is now. */
interface OurFile {
  sock: number;
  dir: string;
  at: string;
  id: FileId;
  who: FsIdentities | undefined;
  /** The application had removed it: it goes once every process is final. */
  removed: boolean;
}

const made = new WeakMap<RestoreContext, OurFile[]>();
const ourFiles = (h: RestoreContext) => made.get(h) ?? (made.set(h, []), made.get(h)!);
/** Live files moved aside for the bind of a removed one, by their path. */
const stashes = new WeakMap<RestoreContext, Map<string, OurFile>>();
const stashed = (h: RestoreContext) => stashes.get(h) ?? (stashes.set(h, new Map()), stashes.get(h)!);

function move(f: OurFile, to: string, where: string): void {
  try {
    addon().socketFileMove(f.dir, f.at, to, f.id, f.who);
  } catch (e) {
    throw new AppshotError(`${where}: moving the socket file ${join(f.dir, f.at)} to ${to}: ${(e as Error).message}`);
  }
  f.at = to;
}

/** To a name of its own beside it, which no one uses. The name is known
 * (written into the registration) before the file is there: a restore
 * killed from here to its commit would leave it in the application's
 * directory for good; the next command removes it (registry.ts release). */
function moveAside(h: RestoreContext, f: OurFile, where: string): void {
  const aside = `.appshot-bound-${uniqueTag()}`;
  h.recordSocketFileMade?.(f.dir, aside, f.who);
  move(f, aside, where);
  killPoint('restore: socket file moved aside');
}

/**
 * A socket whose file the application removed and another it bound to the
 * same name since (a server restarted its listener in place) are made in
 * descriptor order; the name is free for only one bind at a time. Before
 * a bind of `place`: a file there that this restore made is moved aside
 * (a removed one's: its peers connect to it where it went,
 * socketFileForPeers; a live one's, when the removed one comes after it:
 * back at its name as soon as the removed one is bound, restoreSocketFile).
 */
function makeRoomAmongOurs(h: RestoreContext, place: { dir: string; name: string }, removed: boolean, where: string): void {
  const there = ourFiles(h).find((f) => f.dir === place.dir && f.at === place.name);
  if (!there) return;
  if (there.removed) moveAside(h, there, where);
  else if (removed) {
    moveAside(h, there, where);
    stashed(h).set(join(place.dir, place.name), there);
  }
}

/** Where the file of the application's socket `sock` is now, if this
 * restore made it and moved it aside. */
export function movedSocketFile(h: RestoreContext, sock: number): { dir: string; name: string } | undefined {
  const f = ourFiles(h).find((x) => x.sock === sock);
  return f && f.at.startsWith('.appshot-bound-') ? { dir: f.dir, name: f.at } : undefined;
}
