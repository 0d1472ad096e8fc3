/**
 * Paths of an instance (REDIR PATH and copy-on-write files), on appshot's
 * side: the preload library rewrites the paths a running process names;
 * these helpers place the descriptors a clone inherits from its template,
 * and make the directories the rewritten paths lead into.
 */
import { uniqueTag } from '../holder.js';
import { chmodSync, closeSync, constants as fsConstants, existsSync, fchmodSync, fchownSync, fstatSync, futimesSync, lchownSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readlinkSync, readSync, realpathSync, renameSync, rmdirSync, rmSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { AppshotError, errorText } from '../errors.js';
import { dirname, join } from 'node:path';
import { addon, type InstanceConfig } from '../native.js';

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
   * as one line naming `shown`, ENOENT as it is. `path` may lead
   * through a descriptor this opener gave (/proc/self/fd/N/name): a
   * directory's entries are opened beneath the directory opened as the
   * process, never by their names again. */
  open(shown: string, path: string, flags: number): number;
  /** The original opened already as the process, for reading (the check
   * before the restore kept it: clone.ts checkRedirCopies): copied from,
   * never opened again by name (a name swapped since for a symlink to a
   * file only root may read would have root copy that file). Not closed
   * here. */
  fd?: number;
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
export function privateCopy(original: string, copy: string, from: CopySource, made?: (c: CopiedFile) => void): boolean {
  if (lexists(copy)) return false;
  let fd = from.fd;
  const opened = fd === undefined;
  if (fd === undefined)
    try {
      // Not blocking on a FIFO put there: refused below, as any file
      // that is neither a regular file nor a directory.
      fd = from.open(original, original, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  const tmp = `${copy}.appshot-${uniqueTag()}`;
  let copied: CopiedFile | undefined;
  try {
    makeParents(original, copy);
    // Nothing there (the process found nothing either): an empty file,
    // as before, root's with the default mode.
    if (fd === undefined) writeFileSync(tmp, '', { flag: 'wx' });
    else {
      const st = fstatSync(fd, { bigint: true });
      if (st.isDirectory()) copyDirectory(fd, original, tmp, from);
      else if (st.isFile()) copied = { source: { dev: st.dev, ino: st.ino, birthtimeNs: st.birthtimeNs }, copy: copyFile(fd, tmp) };
      else throw new AppshotError(`${original} is not a regular file: no private copy of it is made`);
    }
    if (!claim(tmp, copy)) {
      rmSync(tmp, { recursive: true, force: true });
      return false;
    }
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  } finally {
    if (opened && fd !== undefined) closeSync(fd);
  }
  if (copied) made?.(copied);
  return true;
}

/** Whether there is anything at `path`, a dangling link included. */
function lexists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/** `tmp` moved to `copy` if nothing is there; false if something is. */
function claim(tmp: string, copy: string): boolean {
  try {
    addon().renameNoReplace(tmp, copy);
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
  if (lstatSync(tmp).isDirectory()) {
    try {
      mkdirSync(copy);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw e;
    }
    renameSync(tmp, copy);
    return true;
  }
  try {
    linkSync(tmp, copy);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
  rmSync(tmp, { force: true });
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
function copyFile(fd: number, to: string, times = false): { dev: bigint; ino: bigint } {
  const st = fstatSync(fd);
  const out = openSync(to, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600);
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
function copyDirectory(dir: number, shown: string, to: string, from: CopySource): void {
  const st = fstatSync(dir);
  mkdirSync(to, { mode: 0o700 });
  for (const name of readdirSync(`/proc/self/fd/${dir}`)) {
    const entry = `${shown}/${name}`;
    const beneath = `/proc/self/fd/${dir}/${name}`;
    const dest = join(to, name);
    const notCopied = () => new AppshotError(`${entry} is not a regular file, directory or symbolic link: no private copy of ${shown} is made`);
    // What it is, first (root's lstat: its type, not its bytes): a FIFO
    // or device is never opened (a writer waiting on a FIFO would be let
    // go, a device may act on its open).
    let lst;
    try {
      lst = lstatSync(beneath);
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
        r = from.open(entry, beneath, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
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
        at = from.open(entry, beneath, O_PATH | O_NOFOLLOW | O_CLOEXEC);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw e;
      }
      try {
        const est = fstatSync(at);
        if (!est.isSymbolicLink()) throw new AppshotError(`${entry} changed while it was copied: no private copy of ${shown} is made`);
        symlinkSync(readlinkSync(beneath), dest);
        if (process.geteuid?.() === 0) lchownSync(dest, est.uid, est.gid);
      } finally {
        closeSync(at);
      }
      continue;
    }
    try {
      // What was opened (a FIFO swapped in since is refused all the same).
      const est = fstatSync(r);
      if (est.isFile()) copyFile(r, dest, true);
      else if (est.isDirectory()) copyDirectory(r, entry, dest, from);
      else throw notCopied();
    } finally {
      closeSync(r);
    }
  }
  const out = openSync(to, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  try {
    if (process.geteuid?.() === 0) fchownSync(out, st.uid, st.gid);
    fchmodSync(out, st.mode & 0o7777);
    futimesSync(out, st.atime, st.mtime);
  } finally {
    closeSync(out);
  }
}

/** The directories leading to `copy` that do not exist yet, each made with
 * the owner and mode of the directory of `original` at the same depth
 * from the end (where there is one): the application's own processes make
 * later copies beside this one (the preload library copies a file on its
 * first write), as whatever user they run as. */
function makeParents(original: string, copy: string): void {
  const missing: [string, string][] = [];
  for (let c = dirname(copy), o = dirname(original); !existsSync(c); c = dirname(c), o = dirname(o)) missing.unshift([c, o]);
  for (const [c, o] of missing) {
    mkdirSync(c);
    let st;
    try {
      st = statSync(o);
    } catch {
      continue; // deeper than the original's path: root's default
    }
    if (!st.isDirectory()) continue;
    chmodSync(c, st.mode & 0o7777);
    if (process.geteuid?.() === 0) lchownSync(c, st.uid, st.gid);
  }
}

/** A directory made for a REDIR PATH target: `leaf`, and `top`, the first
 * of its parents that did not exist before. */
export interface MadeDir {
  top: string;
  leaf: string;
}

/** The directories that REDIR PATH targets lead into: a redirected
 * directory exists for the instance, as does a redirected file's parent.
 * Returns what it made, for a failed start to remove. */
export function prepareRedirTargets(redirs: InstanceConfig['redirs']): MadeDir[] {
  const made: MadeDir[] = [];
  try {
    for (const r of redirs) {
      if (r.kind !== 'path') continue;
      // An image's (or rules') name: what is made here is removed later, so
      // it must be the directory it says (a `..` had a restore's removal take
      // any directory: found by review).
      if (!plainAbsolute(r.to)) throw new AppshotError(`REDIR PATH target ${JSON.stringify(r.to)} is not a plain absolute path`);
      const leaf = redirLeaf(r);
      let top: string | undefined;
      try {
        top = mkdirSync(leaf, { recursive: true });
      } catch (e) {
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

/** The directory a REDIR PATH target leads into: the target, where the
 * path it redirects is a directory, else the target's parent. */
function redirLeaf(r: InstanceConfig['redirs'][number]): string {
  let isDir = false;
  try {
    isDir = statSync(r.from).isDirectory();
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
  return [...new Set(redirs.filter((r) => r.kind === 'path' && plainAbsolute(r.to)).map(redirLeaf))];
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
    try {
      if (realpathSync(leaf) !== leaf) continue;
    } catch {
      continue; // gone already
    }
    rmSync(leaf, { recursive: true, force: true });
    for (let dir = dirname(leaf); dir.length >= top.length && dir.startsWith(top); dir = dirname(dir))
      try {
        rmdirSync(dir);
      } catch {
        break;
      }
  }
}
