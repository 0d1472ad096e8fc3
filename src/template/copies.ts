/**
 * A clone's private copies (its FILE ... DUPLICATE and COPY-ON-WRITE
 * files), and a template's of them, copied as root copies another user's
 * files: as they were, and no more.
 *
 * Three copies are made: a clone's private copies into the template that
 * is made of it (template create), a template's into each new clone, and
 * a FILE ... DUPLICATE rule's file or directory of the host into a clone.
 * The template's copy is not signed and may have been written by anyone
 * who could write the template's directory; the host's is the
 * application's user's. Node's cpSync, used for all three, did what root
 * may (fuzz33 H1, H4, M1):
 *  - a file kept its set-user-ID bit and became root's: a nobody
 *    application's 4755 file in a copy-on-write directory came back in
 *    every clone as a root set-user-ID program;
 *  - a symbolic link copied first was written through by the next copy,
 *    so root made files wherever it pointed;
 *  - an application's own 0600 file became root's, which it could then no
 *    longer read.
 * Here: only directories, regular files, symbolic links (made, never
 * followed) and FIFOs (made anew, empty); a socket's name is left out (the
 * socket is not in the copy), a device refused. Each entry made anew
 * (O_EXCL: a name that is there already is never written through) in a
 * directory this copy made or found as a directory (lstat: never through a
 * link), owned by the owner of what it copies (root only: an ordinary user
 * owns what it makes, as before), with its permissions but never a
 * set-user-ID or set-group-ID bit on a file.
 */
import { closeSync, constants, fchmodSync, fchownSync, fstatSync, futimesSync, lchownSync, lstatSync, mkdirSync, openSync, readdirSync, readlinkSync, type Stats, symlinkSync } from 'node:fs';
import { dirname, join, relative, sep } from 'node:path';
import { getSystemErrorMap } from 'node:util';
import { AppshotError, ExitCode } from '../errors.js';
import { addon } from '../native.js';

/** A system call's failure while copying `what` (`path`), as one line of
 * appshot's: Node's own text ("EACCES: permission denied, scandir '...'")
 * was printed as it was (fuzz33 L7). A refusal of the kernel's is exit 5,
 * as a process's credentials refusing a file is. */
function copyFailed(e: unknown, what: string, path: string): never {
  const err = e as NodeJS.ErrnoException;
  if (e instanceof AppshotError || typeof err?.code !== 'string' || typeof err.errno !== 'number') throw e;
  const text = getSystemErrorMap().get(err.errno)?.[1] ?? err.code;
  const denied = err.code === 'EACCES' || err.code === 'EPERM';
  throw new AppshotError(`cannot copy ${what} ${err.path ?? path}: ${text} (${err.code})`, denied ? ExitCode.denied : ExitCode.failure);
}

const asRoot = () => process.geteuid?.() === 0;

/** The permissions a copy gets: a file's without set-id bits, a
 * directory's with its sticky bit (a shared /tmp-like directory) but
 * without set-group-ID. */
const copyMode = (st: Stats) => st.mode & (st.isDirectory() ? 0o1777 : 0o777);

/** `dir` exists as a directory reached through no symbolic link from
 * `top` (which it is, or lies under): made if missing, each missing
 * component with the mode and owner of the component `like` names for it
 * (the source's own ancestors), or 0755 and ours where there is none. */
export function plainDirectory(top: string, dir: string, like?: (made: string) => string | undefined): void {
  const rel = relative(top, dir);
  if (rel.startsWith('..') || rel.startsWith(sep)) throw new AppshotError(`a private copy at ${dir} would lie outside ${top}`);
  let at = top;
  for (const part of ['', ...(rel ? rel.split(sep) : [])]) {
    at = part ? join(at, part) : at;
    let st: Stats | undefined;
    try {
      st = lstatSync(at);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    if (st) {
      if (!st.isDirectory()) throw new AppshotError(`cannot make a private copy under ${at}: it is ${st.isSymbolicLink() ? 'a symbolic link' : 'not a directory'}`);
      continue;
    }
    const model = like?.(at);
    let mst: Stats | undefined;
    try {
      mst = model === undefined ? undefined : lstatSync(model);
    } catch {
      /* no model: a plain directory */
    }
    mkdirSync(at, { mode: 0o700 });
    // mkdir's mode is cut by the umask: the source's, exactly (or 0755).
    settle(at, mst?.isDirectory() ? mst : undefined, 0o755);
  }
}

/** Gives directory `path`, made just now, the mode, owner and times of
 * `like` (else `mode`), through a descriptor that did not follow a link:
 * a directory swapped for one meanwhile is refused (ELOOP), never
 * changed through it. */
function settle(path: string, like: Stats | undefined, mode = 0o755): void {
  const fd = openSync(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  try {
    if (like && asRoot()) fchownSync(fd, like.uid, like.gid);
    fchmodSync(fd, like ? copyMode(like) : mode);
    if (like) futimesSync(fd, like.atime, like.mtime);
  } finally {
    closeSync(fd);
  }
}

/**
 * Copies `from` (a file, a directory and all under it, or a symbolic
 * link) to `to`, whose parent must exist as a plain directory
 * (plainDirectory). Refuses in one line, naming `what`, anything else or
 * a name already there; what it made before stays for the caller's
 * clean-up (the clone's or template's directory is removed whole).
 */
export function copyPrivately(from: string, to: string, what: string): void {
  try {
    copyTree(from, to, what);
  } catch (e) {
    copyFailed(e, what, from);
  }
}

function copyTree(from: string, to: string, what: string): void {
  const st = lstatSync(from);
  if (st.isSymbolicLink()) {
    symlinkSync(readlinkSync(from), to);
    if (asRoot()) lchownSync(to, st.uid, st.gid);
    return;
  }
  if (st.isDirectory()) {
    try {
      mkdirSync(to, { mode: 0o700 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      // Made already (a parent of a copy made before): a directory, not
      // a link to one.
      if (!lstatSync(to).isDirectory()) throw new AppshotError(`cannot copy ${what} ${from}: ${to} is there already and not a directory`);
    }
    // Its mode last: until then 0700, so that no one else can put a name
    // in it while it is filled.
    for (const name of readdirSync(from)) copyTree(join(from, name), join(to, name), what);
    settle(to, st);
    return;
  }
  // A socket's file is a name, not the socket: the application that bound
  // it is not in the copy (a listener is refused at snapshot), and a name
  // left behind (a JVM's /tmp/.java_pid2 after one jcmd, in a private
  // /tmp anyone may write in) must not stop the copy. Left out.
  if (st.isSocket()) return;
  // A FIFO holds nothing once its users are gone: made anew, empty.
  if (st.isFIFO()) {
    makeFifo(to, st);
    return;
  }
  if (!st.isFile()) throw new AppshotError(`cannot copy ${what} ${from}: it is not a file, a directory or a symbolic link`);
  // The source as lstat saw it (O_NOFOLLOW: not a link put in its place
  // since; fstat: still a regular file, not a FIFO to block on).
  const source = openSync(from, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    // Its owner, mode and times from here on: those of the file whose
    // data is copied, not of whatever lstat saw at the name before (one
    // renamed over it meanwhile, in a directory its writer owns, would
    // otherwise come out with another's owner).
    const opened = fstatSync(source);
    if (!opened.isFile()) throw new AppshotError(`cannot copy ${what} ${from}: it is not a file, a directory or a symbolic link`);
    // O_EXCL: never through a name already there (a link planted).
    const fd = openSync(to, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      // Holes stay holes: written out, a sparse file of the application's
      // (or of a template's writer) would fill the disk, as root, once
      // per clone.
      addon().copyFileData(source, fd);
      if (asRoot()) fchownSync(fd, opened.uid, opened.gid);
      // After the owner: a chown clears set-id bits, and none is given.
      fchmodSync(fd, copyMode(opened));
      futimesSync(fd, opened.atime, opened.mtime);
    } finally {
      closeSync(fd);
    }
  } finally {
    closeSync(source);
  }
}

/** A FIFO at `to` (nothing there: mkfifo never follows a link) with the
 * owner and mode of `like`, never a set-id bit. */
function makeFifo(to: string, like: Stats): void {
  addon().mkfifo(to, 0o600);
  // Through a descriptor of the FIFO just made (O_NONBLOCK: an open for
  // reading does not wait for a writer; O_NOFOLLOW: not a link put in its
  // place).
  const fd = openSync(to, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW);
  try {
    if (!fstatSync(fd).isFIFO()) throw new AppshotError(`${to}, just made, is not a FIFO`);
    if (asRoot()) fchownSync(fd, like.uid, like.gid);
    fchmodSync(fd, copyMode(like));
    futimesSync(fd, like.atime, like.mtime);
  } finally {
    closeSync(fd);
  }
}

/** A copy of `from` at `to` under `top` (a clone's private copies), its
 * missing parents made like the source's own (`from`'s ancestors: the
 * copy of /srv/data/x at TOP/srv/data/x gets TOP/srv/data made as
 * /srv/data is). */
export function copyUnder(top: string, from: string, to: string, what: string): void {
  // The state directory's instances/ (ours), then the copies' own chain.
  try {
    mkdirSync(dirname(top), { recursive: true });
    plainDirectory(top, dirname(to), (made) => join('/', relative(top, made)));
  } catch (e) {
    copyFailed(e, what, from);
  }
  copyPrivately(from, to, what);
}
