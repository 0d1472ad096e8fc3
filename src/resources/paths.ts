/**
 * Paths of an instance (REDIR PATH and copy-on-write files), on appshot's
 * side: the preload library rewrites the paths a running process names;
 * these helpers place the descriptors a clone inherits from its template,
 * and make the directories the rewritten paths lead into.
 */
import { uniqueTag } from '../holder.js';
import { killPoint } from '../killpoint.js';
import { closeSync, constants as fsConstants, existsSync, fchmodSync, fchownSync, fstatSync, futimesSync, lchownSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readlinkSync, readSync, renameSync, rmdirSync, statSync, symlinkSync, unlinkSync, writeSync } from 'node:fs';
import { AppshotError, errorText } from '../errors.js';
import { basename, dirname, join, resolve as resolvePath } from 'node:path';
import { addon, type FsIdentity, type InstanceConfig } from '../native.js';
import { refuseMagicLink } from './fsident.js';

const under = (path: string, dir: string) => path === dir || path.startsWith(dir + '/');

/** The target of `path` under a rule of `kind` (the longest `from` that
 * holds it, as the preload library matches), or undefined. */
export function redirected(redirs: InstanceConfig['redirs'], path: string, kind: 'path' | 'cow' = 'path'): string | undefined {
  let best: InstanceConfig['redirs'][number] | undefined;
  for (const r of redirs) if (r.kind === kind && under(path, r.from) && (!best || r.from.length > best.from.length)) best = r;
  return best && best.to + path.slice(best.from.length);
}

/** The reverse: the path the application named for one the kernel shows
 * (a descriptor or working directory of the template, recorded where its
 * REDIR PATH rules had sent it, or in its private copies if it was a clone
 * itself). */
export function unredirected(redirs: InstanceConfig['redirs'], path: string): string {
  let best: InstanceConfig['redirs'][number] | undefined;
  for (const r of redirs) if (under(path, r.to) && (!best || r.to.length > best.to.length)) best = r;
  return best ? best.from + path.slice(best.to.length) : path;
}

/** A regular file privateCopy copied: the identity of the file it read
 * (fstat of the descriptor it read from) and of the copy it wrote. */
export interface CopiedFile {
  source: { dev: bigint; ino: bigint; birthtimeNs: bigint };
  copy: { dev: bigint; ino: bigint };
}

/** How privateCopy reaches what it copies: as the process the copy is
 * for, never as the restorer. */
export interface CopySource {
  /** Opens `path` (`shown`: its name in a message) with `flags` as the
   * process would (fsident.ts openAs), or throws: the kernel's refusal
   * as one line naming `shown`, ENOENT as it is. `dir`: a descriptor
   * this opener gave, `path` a name beneath it: a directory's entries
   * are opened beneath the directory opened as the process, never by
   * their names again (and not through /proc/self/fd/N/name, a magic
   * link openAs refuses). */
  open(shown: string, path: string, flags: number, dir?: number): number;
  /** The original opened already as the process, for reading (the check
   * before the restore kept it: clone.ts checkRedirCopies): copied from,
   * never opened again by name (a name swapped since for a symlink to a
   * file only root may read would have root copy that file). Not closed
   * here. */
  fd?: number;
  /** The original is a symbolic link held itself (O_PATH|O_NOFOLLOW): its
   * copy is a link with its text, as a directory's links are copied. */
  link?: boolean;
}

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NONBLOCK, O_NOCTTY, O_NOFOLLOW, O_DIRECTORY } = fsConstants;
const O_PATH = 0o10000000;
const O_CLOEXEC = 0o2000000;

/** Makes `copy` the instance's own copy of `original`, unless it has one
 * already; returns whether this call made it (false: it was there, or
 * another clone made it meanwhile). Written under a temporary name and
 * moved to `copy` only if nothing is there (renameat2
 * RENAME_NOREPLACE), so that a copy is never seen half-made, and of two
 * clones racing for one target exactly one is its maker (the one whose
 * failure may remove it: clone.ts). `made`: told what a regular file's
 * copy was made from, when one is made now.
 *
 * Root makes copies for processes of other users (PostgreSQL as
 * postgres, nginx's workers as nobody): what it copies is only ever what
 * that process could read, each file read from a descriptor opened as
 * the process (`from`), a directory's entries opened beneath it, none
 * by a name walked by root (review: a symlink swapped in at the
 * template's path, or a file only root may read inside a working
 * directory, was copied by root into a place the process reads). */
export function privateCopy(original: string, copy: string, from: CopySource, made?: (c: CopiedFile) => void, temporary?: (tmp: string) => void): boolean {
  if (lexists(copy)) return false;
  let fd = from.fd;
  const opened = fd === undefined;
  if (fd === undefined)
    try {
      // Not blocking on a FIFO put there: refused below, as any file
      // that is neither a regular file nor a directory.
      fd = from.open(original, original, from.link ? O_PATH | O_NOFOLLOW | O_CLOEXEC : O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  const name = basename(copy);
  const tmp = `${name}.appshot-${uniqueTag()}`;
  let copied: CopiedFile | undefined;
  // Everything on the copy's side is done beneath descriptors of its
  // directories (openDirectoryWalked, /proc/self/fd/N/name), never by a
  // name walked from the root again: those directories may be another
  // user's (made for the process, given its owner; an earlier copy's),
  // who could swap a name on the way for a symlink between two steps and
  // have root write, chown or remove elsewhere (review35b).
  let at: number | undefined;
  try {
    at = openDirectoryWalked(dirname(copy), (made, k) => giveOriginalsOwner(made, nthParent(original, k)));
    temporary?.(join(dirname(copy), tmp));
    // Nothing there (the process found nothing either): an empty file,
    // as before, root's with the default mode.
    if (fd === undefined) closeSync(openSync(beneath(at, tmp), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o666));
    else {
      const st = fstatSync(fd, { bigint: true });
      if (st.isSymbolicLink() && from.link) copyLink(fd, original, at, tmp);
      else if (st.isDirectory()) copyDirectory(fd, original, at, tmp, from);
      else if (st.isFile()) copied = { source: { dev: st.dev, ino: st.ino, birthtimeNs: st.birthtimeNs }, copy: copyFile(fd, at, tmp) };
      else throw new AppshotError(`${original} is not a regular file: no private copy of it is made`);
    }
    if (!claim(at, tmp, name)) {
      removeBeneath(at, tmp);
      return false;
    }
  } catch (e) {
    if (at !== undefined) removeBeneath(at, tmp);
    throw e;
  } finally {
    if (opened && fd !== undefined) closeSync(fd);
    if (at !== undefined) closeSync(at);
  }
  if (copied) made?.(copied);
  return true;
}

/** The symbolic link `fd` holds (O_PATH), named `original`, copied as a
 * link with its text to `name` beneath directory `at`, with its owner
 * where root copies. The text is read by the name, which must name that
 * very link before and after. */
function copyLink(fd: number, original: string, at: number, name: string): void {
  const st = fstatSync(fd, { bigint: true });
  const same = () => {
    const now = lstatSync(original, { bigint: true, throwIfNoEntry: false });
    return now !== undefined && now.dev === st.dev && now.ino === st.ino;
  };
  if (!same()) throw new AppshotError(`${original} changed while it was copied: no private copy of it is made`);
  const text = readlinkSync(original, { encoding: 'buffer' });
  if (!same()) throw new AppshotError(`${original} changed while it was copied: no private copy of it is made`);
  symlinkSync(text, beneath(at, name));
  if (process.geteuid?.() === 0) lchownSync(beneath(at, name), Number(st.uid), Number(st.gid));
}

/** `name` in the directory descriptor `dir` holds, whatever path leads
 * there now (the kernel resolves /proc/self/fd/N to that very
 * directory): an openat(2) for Node's path-only calls. */
const beneath = (dir: number, name: string) => `/proc/self/fd/${dir}/${name}`;

/** `path` with its last `k` components taken off. */
function nthParent(path: string, k: number): string {
  let p = path;
  for (let i = 0; i < k; i++) p = dirname(p);
  return p;
}

/**
 * A descriptor (O_RDONLY | O_DIRECTORY) of directory `path`, absolute,
 * reached one component at a time beneath the descriptor of the one
 * before, each opened O_NOFOLLOW: a directory on the way that another
 * user may change cannot send root elsewhere by a symlink swapped in.
 * A symbolic link on the way is followed only if it is root's or this
 * user's (Debian's /var/run), which no other user can make; another's is
 * refused. With `make`, a missing directory is made (mode 0700, root's)
 * and handed to `make` with how many components below it the path goes
 * (1: the last one), to be given its owner and mode; without, ENOENT.
 */
export function openDirectoryWalked(path: string, make?: (made: number, k: number) => void): number {
  let parts = path.split('/').filter(Boolean);
  let fd = openSync('/', O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  let shown = '';
  let hops = 0;
  const me = process.geteuid?.() ?? 0;
  try {
    for (let i = 0; i < parts.length; i++) {
      const here = beneath(fd, parts[i]);
      let st = lstatSync(here, { throwIfNoEntry: false });
      let madeNow = false;
      if (!st && make) {
        try {
          mkdirSync(here, { mode: 0o700 });
          madeNow = true;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        }
        st = lstatSync(here);
      }
      if (!st) throw Object.assign(new Error(`ENOENT: no such file or directory, ${shown}/${parts[i]}`), { code: 'ENOENT' });
      if (st.isSymbolicLink()) {
        if ((st.uid !== 0 && st.uid !== me) || ++hops > 40)
          throw new AppshotError(`${shown}/${parts[i]} is a symbolic link ${hops > 40 ? 'in a loop' : `of another user's (uid ${st.uid})`}: nothing is made or removed through it`);
        const text = readlinkSync(here);
        parts = [...resolvePath(text.startsWith('/') ? text : `${shown || '/'}/${text}`).split('/').filter(Boolean), ...parts.slice(i + 1)];
        closeSync(fd);
        fd = openSync('/', O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        shown = '';
        i = -1;
        continue;
      }
      const next = openSync(here, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      closeSync(fd);
      fd = next;
      shown = `${shown}/${parts[i]}`;
      if (madeNow) make!(fd, parts.length - i);
    }
    return fd;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** A directory made for a copy (`made`, its descriptor) given the owner
 * and mode of the original's directory at the same depth from the end,
 * where there is one: the application's own processes make later copies
 * beside this one (the preload library copies a file on its first
 * write), as whatever user they run as. */
function giveOriginalsOwner(made: number, original: string): void {
  const st = lstatSync(original, { throwIfNoEntry: false });
  if (!st?.isDirectory()) return; // deeper than the original's path, or not one: root's default
  if (process.geteuid?.() === 0) fchownSync(made, st.uid, st.gid);
  fchmodSync(made, st.mode & 0o7777);
}

/** `name` in directory descriptor `dir` removed, and all beneath it,
 * walked by descriptors as openDirectoryWalked walks (a directory is
 * opened O_NOFOLLOW beneath its parent's descriptor; whatever is not a
 * directory, a symlink swapped in included, is unlinked, never followed):
 * the tree may be another user's, who could swap a directory for a
 * symlink while it is removed, and have root remove elsewhere (Node's
 * rmSync walks by path: review35b). */
export function removeBeneath(dir: number, name: string): void {
  for (let tries = 0; tries < 3; tries++) {
    const here = beneath(dir, name);
    const st = lstatSync(here, { throwIfNoEntry: false });
    if (!st) return;
    if (st.isDirectory()) {
      let fd: number | undefined;
      try {
        fd = openSync(here, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') return;
        if (code !== 'ELOOP' && code !== 'ENOTDIR') throw e;
      }
      if (fd !== undefined) {
        try {
          for (const n of readdirSync(`/proc/self/fd/${fd}`)) removeBeneath(fd, n);
        } finally {
          closeSync(fd);
        }
        try {
          rmdirSync(here);
          return;
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code === 'ENOENT') return;
          if (code !== 'ENOTDIR' && code !== 'ENOTEMPTY') throw e;
          continue;
        }
      }
    }
    try {
      unlinkSync(here);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EISDIR' && code !== 'EPERM') throw e;
    }
  }
}

/** Absolute `path` and all beneath it removed as removeBeneath does, its
 * directory reached as openDirectoryWalked reaches it; left as it is if
 * that cannot be (a link of another user's on the way, gone already). */
export function removeWalked(path: string): void {
  if (!plainAbsolute(path)) return;
  let at: number;
  try {
    at = openDirectoryWalked(dirname(path));
  } catch {
    return;
  }
  try {
    removeBeneath(at, basename(path));
  } finally {
    closeSync(at);
  }
}

/** Whether there is anything at `path`, a dangling link included. */
export function lexists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/** `tmp` moved to `name`, both in directory descriptor `dir`, if nothing
 * is there; false if something is. */
function claim(dir: number, tmp: string, name: string): boolean {
  const from = beneath(dir, tmp);
  const to = beneath(dir, name);
  try {
    addon().renameNoReplace(from, to);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    if (code !== 'EINVAL') throw e;
  }
  // A file system without RENAME_NOREPLACE: a directory's name claimed
  // by a mkdir of ours (EEXIST: another's), which rename(2) then replaces
  // (an empty directory, ours); a file's by a hard link, which never
  // replaces a name.
  if (lstatSync(from).isDirectory()) {
    try {
      mkdirSync(to);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw e;
    }
    renameSync(from, to);
    return true;
  }
  try {
    linkSync(from, to);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
  unlinkSync(from);
  return true;
}

/** The bytes of `fd` (a regular file, read from its start) in a new file
 * `to`, with the owner and mode of the file read (fstat of `fd`: the
 * very file, not whatever a name leads to now). Root gives it the
 * original's owner, as `cp -a` does: a copy owned by root, mode 0600,
 * would lock its own user out; anyone else owns the copies they make
 * anyway (and cannot give them away). Made 0600, filled, given its
 * owner, then its mode: never for a moment a root-owned set-user-ID file
 * of another's bytes (chown after chmod would also clear the set-ID bits
 * the original has). */
function copyFile(fd: number, dir: number, to: string, times = false): { dev: bigint; ino: bigint } {
  const st = fstatSync(fd);
  const out = openSync(beneath(dir, to), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600);
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    // From its start, whoever read this descriptor before.
    for (let at = 0, n; (n = readSync(fd, buf, 0, buf.length, at)) > 0; at += n) writeSync(out, buf, 0, n);
    if (process.geteuid?.() === 0) fchownSync(out, st.uid, st.gid);
    fchmodSync(out, st.mode & 0o7777);
    if (times) futimesSync(out, st.atime, st.mtime);
    const written = fstatSync(out, { bigint: true });
    return { dev: written.dev, ino: written.ino };
  } finally {
    closeSync(out);
  }
}

/**
 * Directory `dir` (a descriptor opened as the process, for reading) and
 * all beneath it, copied to `to` (made here), as the process reaches
 * each: every entry is opened as the process beneath the descriptor of
 * its directory (/proc/self/fd/N/name: one component, its directory's
 * search permission and its own read permission the process's), never
 * walked by name from the root, and never followed if it is a symbolic
 * link (O_NOFOLLOW), which is copied as a link. Anything the process may
 * not read is refused, not skipped: a copy without some of the
 * application's files would run it on a tree it never had, where a
 * refusal says what is missing (and the copy, made under a temporary
 * name, is removed whole). A FIFO, socket or device is refused, as
 * privateCopy refuses one named itself, and never opened: a copy of one
 * is no copy.
 * Owners, modes and times as the originals' (copyFile); a directory's
 * mode and owner last, so that until then it is root's 0700 and no one
 * else puts a name in it.
 */
function copyDirectory(dir: number, shown: string, toDir: number, to: string, from: CopySource): void {
  const st = fstatSync(dir);
  mkdirSync(beneath(toDir, to), { mode: 0o700 });
  const out = openSync(beneath(toDir, to), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  try {
    copyEntries(dir, shown, out, from);
    if (process.geteuid?.() === 0) fchownSync(out, st.uid, st.gid);
    fchmodSync(out, st.mode & 0o7777);
    futimesSync(out, st.atime, st.mtime);
  } finally {
    closeSync(out);
  }
}

/** The entries of `dir` copied into directory descriptor `out` (copyDirectory). */
function copyEntries(dir: number, shown: string, out: number, from: CopySource): void {
  for (const name of readdirSync(`/proc/self/fd/${dir}`)) {
    const entry = `${shown}/${name}`;
    const source = beneath(dir, name);
    const dest = beneath(out, name);
    const notCopied = () => new AppshotError(`${entry} is not a regular file, directory or symbolic link: no private copy of ${shown} is made`);
    // What it is, first (root's lstat: its type, not its bytes): a FIFO
    // or device is never opened (a writer waiting on a FIFO would be let
    // go, a device may act on its open).
    let lst;
    try {
      lst = lstatSync(source);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // removed since it was listed
      throw e;
    }
    if (!lst.isSymbolicLink() && !lst.isFile() && !lst.isDirectory()) throw notCopied();
    let r: number | undefined;
    if (!lst.isSymbolicLink())
      try {
        // One open as the process: its search permission on the
        // directory, its read permission on the entry; a link put there
        // since is not followed (ELOOP: copied as the link it is now).
        r = from.open(entry, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, dir);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') continue;
        if (code !== 'ELOOP') throw e;
      }
    if (r === undefined) {
      // A symbolic link, copied as one: reached as the process (O_PATH,
      // not followed), its text read beneath the same directory.
      let at: number;
      try {
        at = from.open(entry, name, O_PATH | O_NOFOLLOW | O_CLOEXEC, dir);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw e;
      }
      try {
        const est = fstatSync(at);
        if (!est.isSymbolicLink()) throw new AppshotError(`${entry} changed while it was copied: no private copy of ${shown} is made`);
        symlinkSync(readlinkSync(source), dest);
        if (process.geteuid?.() === 0) lchownSync(dest, est.uid, est.gid);
      } finally {
        closeSync(at);
      }
      continue;
    }
    try {
      // What was opened (a FIFO swapped in since is refused all the same).
      const est = fstatSync(r);
      if (est.isFile()) copyFile(r, out, name, true);
      else if (est.isDirectory()) copyDirectory(r, entry, out, name, from);
      else throw notCopied();
    } finally {
      closeSync(r);
    }
  }
}

/** A directory made for a REDIR PATH target: `leaf`, and `top`, the first
 * of its parents that did not exist before. */
export interface MadeDir {
  top: string;
  leaf: string;
}

/** As whom REDIR PATH targets are made, and who hears of each before it
 * is (prepareRedirTargets). */
export interface RedirTargetsAs {
  /** The image's filesystem identities (fsident.ts identitiesFor): a
   * target is walked, and made, only where one of them may. Absent: as
   * the restorer (a clone's targets are its own rules', not an image's
   * word). */
  who?: FsIdentity[];
  /** Called with everything made so far and the one about to be, before
   * its first directory is made: the restore writes it into its
   * registration, so that a restore killed then leaves a record of what
   * to remove (the kill -9 rule). */
  willMake?: (made: MadeDir[]) => void;
}

/** The directories that REDIR PATH targets lead into: a redirected
 * directory exists for the instance, as does a redirected file's parent.
 * Returns what it made, for a failed start to remove. `as`: the image's
 * identities: the names come from an image or from rules, and are
 * walked and made as its processes could (r344 #4: root made any
 * directory an image named); without it (a caller with no image), as
 * the restorer. */
export function prepareRedirTargets(redirs: InstanceConfig['redirs'], as?: RedirTargetsAs): MadeDir[] {
  const made: MadeDir[] = [];
  try {
    for (const r of redirs) {
      if (r.kind !== 'path') continue;
      // An image's (or rules') name: what is made here is removed later, so
      // it must be the directory it says (a `..` had a restore's removal take
      // any directory: found by review).
      if (!plainAbsolute(r.to)) throw new AppshotError(`REDIR PATH target ${JSON.stringify(r.to)} is not a plain absolute path`);
      const leaf = redirLeaf(r, as?.who);
      let top: string | undefined;
      try {
        top = as?.who ? makeDirectoriesAs(leaf, as.who, as.willMake, made) : makeDirectories(leaf, as?.willMake, made);
      } catch (e) {
        // A step that leads through a /proc magic link (a symlink put
        // there since; makeDirectoriesAs walks with openAs): said as every
        // other such refusal is, exit 5, not as a loop of symlinks.
        refuseMagicLink(e, `the directory ${leaf} of REDIR PATH target ${r.to}`);
        throw new AppshotError(`cannot make the directory of REDIR PATH target ${r.to}: ${errorText(e)}`);
      }
      if (top) made.push({ top, leaf });
    }
  } catch (e) {
    // Those made for the targets before: the caller never learns of them.
    removeRedirTargets(made);
    throw e;
  }
  return made;
}

const CAP_DAC_OVERRIDE = 1n << 1n;

/** Whether `id` may make an entry in a directory of this owner and mode
 * (write and search), as the kernel's permission bits say. */
function mayMakeIn(st: { uid: number; gid: number; mode: number }, id: FsIdentity): boolean {
  if (id.capEff & CAP_DAC_OVERRIDE) return true;
  if (st.uid === id.fsuid) return (st.mode & 0o300) === 0o300;
  if (st.gid === id.fsgid || id.groups.includes(st.gid)) return (st.mode & 0o030) === 0o030;
  return (st.mode & 0o003) === 0o003;
}

/** mkdir -p of `leaf` as one of `as.who` would: each existing component
 * reached as the identities (a symlink planted on the way is followed as
 * they would follow it, a directory they cannot search refused), each
 * missing one made in the very directory so reached (through our
 * descriptor of it) only where one of them may make an entry there, and
 * given to that one. Returns the first directory made, as
 * mkdirSync(recursive) does; `as.willMake` hears of it before. */
function makeDirectoriesAs(leaf: string, who: FsIdentity[], willMake: RedirTargetsAs['willMake'], before: MadeDir[]): string | undefined {
  const O_PATH = 0o10000000;
  const parts = leaf.slice(1).split('/');
  let dir = addon().openAs('/', O_PATH | fsConstants.O_DIRECTORY, 0, who);
  let path = '';
  let top: string | undefined;
  try {
    for (const part of parts) {
      const next = `${path}/${part}`;
      let at: number | undefined;
      if (top === undefined) {
        try {
          at = addon().openAs(next, O_PATH | fsConstants.O_DIRECTORY, 0, who);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
        }
      }
      if (at === undefined) {
        const st = fstatSync(dir);
        const id = who.find((i) => mayMakeIn(st, i));
        if (!id) throw new AppshotError(`${path || '/'} is not writable by the image's processes (uid ${who.map((i) => i.fsuid).join(', ')})`);
        if (top === undefined) {
          top = next;
          willMake?.([...before, { top, leaf }]);
        }
        const inDir = `/proc/self/fd/${dir}/${part}`;
        mkdirSync(inDir, { mode: 0o755 });
        at = openSync(inDir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
        if (process.geteuid?.() === 0) fchownSync(at, id.fsuid, id.fsgid);
        // Where a restore killed leaves a directory made, recorded before.
        killPoint('restore: redir target directory made');
      }
      closeSync(dir);
      dir = at;
      path = next;
    }
  } catch (e) {
    // Part of it made: removed here, as the caller knows only of whole ones.
    if (top !== undefined && path.length >= top.length) removeRedirTargets([{ top, leaf: path }]);
    throw e;
  } finally {
    closeSync(dir);
  }
  return top;
}

/** mkdir -p of `leaf` as the restorer, `willMake` told of the first
 * directory it will make before it is made. */
function makeDirectories(leaf: string, willMake: RedirTargetsAs['willMake'], before: MadeDir[]): string | undefined {
  let top: string | undefined;
  for (let dir = leaf; dir !== '/' && !existsSync(dir); dir = dirname(dir)) top = dir;
  if (top === undefined) return undefined;
  willMake?.([...before, { top, leaf }]);
  return mkdirSync(leaf, { recursive: true });
}

/** The directory a REDIR PATH target leads into: the target, where the
 * path it redirects is a directory, else the target's parent. Looked at
 * as `who` where given: whether a name exists is not the restorer's to
 * tell an image. */
function redirLeaf(r: InstanceConfig['redirs'][number], who?: FsIdentity[]): string {
  let isDir = false;
  try {
    if (!who) isDir = statSync(r.from).isDirectory();
    else {
      const fd = addon().openAs(r.from, 0o10000000, 0, who);
      try {
        isDir = fstatSync(fd).isDirectory();
      } finally {
        closeSync(fd);
      }
    }
  } catch {
    /* not there: the target's parent is all we can make */
  }
  return isDir ? r.to : dirname(r.to);
}

/** The directories an instance's REDIR PATH targets lead into (those
 * prepareRedirTargets makes, or finds made): recorded with its
 * registration, so that the removal of another instance leaves a
 * directory it made while this one still uses it (registry.ts
 * releaseRedirTargets). A
 * target that is not plain is left out (prepareRedirTargets refuses it). */
export function redirLeaves(redirs: InstanceConfig['redirs']): string[] {
  return [...new Set(redirs.filter((r) => r.kind === 'path' && plainAbsolute(r.to)).map((r) => redirLeaf(r)))];
}

/** Whether two directories are one, or one holds the other: removing
 * either takes some of the other's files. */
export function overlaps(a: string, b: string): boolean {
  return a === b || a.startsWith(`${b}/`) || b.startsWith(`${a}/`);
}

/** An absolute path with no empty, `.` or `..` component. */
export function plainAbsolute(path: string): boolean {
  return path.startsWith('/') && path.length > 1 && !path.endsWith('/') && path.slice(1).split('/').every((c) => c !== '' && c !== '.' && c !== '..');
}

/** Undoes prepareRedirTargets: each leaf, then its parents up to the top
 * while they are empty (another instance may have made its own beside). */
export function removeRedirTargets(made: MadeDir[]): void {
  for (const { top, leaf } of made) {
    // What a record says was made: only a leaf at or under its top, both
    // plain, and reached through no symlink now (a directory on the way
    // swapped for a symlink to /root would have the removal follow it).
    if (!plainAbsolute(top) || !plainAbsolute(leaf) || (leaf !== top && !leaf.startsWith(`${top}/`))) continue;
    removeWalked(leaf);
    for (let dir = dirname(leaf); dir.length >= top.length && dir.startsWith(top); dir = dirname(dir))
      try {
        rmdirSync(dir);
      } catch {
        break;
      }
  }
}
