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
 */
import { closeSync, chmodSync, chownSync, fstatSync, linkSync, lstatSync, openSync, readdirSync, readlinkSync, type Stats, unlinkSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import type { SocketFile } from '../image/types.js';
import { addon } from '../native.js';
import { Unsupported } from './context.js';
import { AF_UNIX, makeSockaddr } from './sockaddr.js';

const O_PATH = 0o10000000;
const O_NOFOLLOW = 0o400000;
const O_CLOEXEC = 0o2000000;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;

/** The socket file `st` is the one the kernel names by `ino` and `dev`. */
function isFileOf(st: Stats | undefined, ino: number, dev: number): boolean {
  return !!st && st.isSocket() && st.ino === ino && st.dev === dev;
}

function lstatOrNone(path: string): Stats | undefined {
  try {
    return lstatSync(path);
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
  return names.find((n) => isFileOf(lstatOrNone(join(dir, n)), ino, dev));
}

/**
 * The file of process `pid`'s unix listener bound to `path`, the kernel's
 * `vfs` look at it, or undefined for an abstract or unnamed socket.
 * `where` names the descriptor in a refusal.
 */
export function dumpSocketFile(pid: number, name: string, vfs: { vfsIno?: number; vfsDev?: number } | undefined, where: string): SocketFile | undefined {
  if (!name || name.startsWith('@')) return undefined;
  const relative = !name.startsWith('/');
  if (!vfs?.vfsIno || vfs.vfsDev === undefined) {
    if (relative) throw new Unsupported(`${where}: it is bound to the relative path ${name}, whose file the kernel does not show: where it was bound cannot be found`);
    return undefined;
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
  const found = (st: Stats, renamed = ''): SocketFile => ({ renamed, removed: false, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, ...(relative ? { base } : {}) });
  try {
    const here = lstatOrNone(path);
    if (isFileOf(here, ino, dev)) return found(here!);
    const rootView = root === '/' ? undefined : `/proc/${pid}/root${path}`;
    const insideRoot = () => new Unsupported(`${where}: a unix socket that names ${path} in a process whose root directory is ${root} (chroot): the name is resolved in that root, which the restore does not do`);
    if (rootView && (isFileOf(lstatOrNone(rootView), ino, dev) || renamedIn(dirname(rootView), ino, dev))) throw insideRoot();
    const renamed = renamedIn(dirname(path), ino, dev);
    if (renamed) return found(lstatSync(join(dirname(path), renamed)), renamed);
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
export function socketFilePath(name: string, file: SocketFile | undefined): string | undefined {
  if (!name || name.startsWith('@')) return undefined;
  if (name.startsWith('/')) return name;
  return file?.base ? join(file.base, name) : undefined;
}

/** Where the file of a socket bound to `name` is once restoreSocketFile
 * is done: moved where it went; undefined where there is none (removed,
 * abstract, unnamed). */
export function socketFileNow(name: string, file: SocketFile | undefined): string | undefined {
  const path = socketFilePath(name, file);
  if (!path || file?.removed) return undefined;
  return file?.renamed ? join(dirname(path), file.renamed) : path;
}

/**
 * After the bind of `path` made the listener's file: the recorded mode and
 * owner, then its place (renamed beside it, or removed). Everything is done
 * through a descriptor of the file itself (O_PATH, not following a link),
 * so that a name swapped for a symlink cannot send the change to another
 * file; a rename never replaces anything but a stale socket file. `where`
 * names the descriptor in an error.
 */
export function restoreSocketFile(path: string, file: SocketFile | undefined, where: string): void {
  if (!file || !path.startsWith('/')) return;
  if (file.removed) {
    unlinkSocketFile(path);
    return;
  }
  let fd: number;
  try {
    fd = openSync(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  } catch (e) {
    throw new AppshotError(`${where}: the file its bind made at ${path}: ${(e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isSocket()) throw new AppshotError(`${where}: ${path} is no longer the socket file its bind made`);
    // The owner first: a chown drops set-id bits, which the mode then sets.
    // An owner the restoring user may not give is refused, not dropped
    // (EPERM names it).
    if (st.uid !== file.uid || st.gid !== file.gid) chownSync(`/proc/self/fd/${fd}`, file.uid, file.gid);
    if ((st.mode & 0o7777) !== file.mode) chmodSync(`/proc/self/fd/${fd}`, file.mode);
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    throw new AppshotError(`${where}: giving ${path} its mode ${file.mode.toString(8)} and owner ${file.uid}:${file.gid}: ${(e as Error).message}`);
  } finally {
    closeSync(fd);
  }
  if (!file.renamed) return;
  const to = join(dirname(path), file.renamed);
  try {
    // A stale socket file there (the ended original's) goes; a live one
    // is a conflict; anything else stays, and the link below says so.
    if (removeStale(to, SOCK_STREAM)) throw new AppshotError(`${where}: ${to}: a live socket listens there`, ExitCode.conflict);
    try {
      // link + unlink: a rename that replaces nothing (rename(2) would
      // replace any file at `to`).
      linkSync(path, to);
    } catch (e) {
      throw new AppshotError(`${where}: moving the socket file ${basename(path)} to ${to}, where it was: ${(e as Error).message}`, ExitCode.conflict);
    }
  } finally {
    // Moved, or the restore fails: the file at the bound name goes either
    // way (nothing of a failed restore is left).
    unlinkSocketFile(path);
  }
}

/** A socket file the ended original left behind (nothing answers there)
 * goes; one a live socket holds stays, and the bind says so. Returns
 * whether a live socket of `type` answered there. */
export function removeStale(path: string, type = SOCK_DGRAM): boolean {
  const probe = addon().sockOpen(AF_UNIX, type);
  try {
    addon().sockConnect(probe, makeSockaddr({ family: AF_UNIX, address: path, port: 0 }));
    return true;
  } catch (e) {
    // ECONNREFUSED is also what a file that is no socket answers: only a
    // socket file goes (the bind then says the name is taken).
    if ((e as NodeJS.ErrnoException).code === 'ECONNREFUSED') unlinkSocketFile(path);
    return false;
  } finally {
    closeSync(probe);
  }
}

const O_DIRECTORY = 0o200000;

/** Removes `path` if it is a socket file, and nothing else: a name from
 * an image may be any file of the restoring node. Looked at and removed
 * through one descriptor of its directory, so that a directory swapped
 * for a symlink in between cannot send the removal elsewhere. */
export function unlinkSocketFile(path: string): void {
  if (path.endsWith('/')) return;
  let dir: number;
  try {
    dir = openSync(dirname(path), O_PATH | O_DIRECTORY | O_CLOEXEC);
  } catch {
    return;
  }
  try {
    const at = `/proc/self/fd/${dir}/${basename(path)}`;
    if (lstatSync(at).isSocket()) unlinkSync(at);
  } catch {
    /* gone already, or not ours to remove: the bind tells */
  } finally {
    closeSync(dir);
  }
}
