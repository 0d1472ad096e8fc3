/**
 * Paths of an instance (REDIR PATH and copy-on-write files), on appshot's
 * side: the preload library rewrites the paths a running process names;
 * these helpers place the descriptors a clone inherits from its template,
 * and make the directories the rewritten paths lead into.
 */
import { uniqueTag } from '../holder.js';
import { chmodSync, closeSync, constants as fsConstants, cpSync, realpathSync, existsSync, fchmodSync, fchownSync, fstatSync, lchownSync, lstatSync, mkdirSync, openSync, readdirSync, readSync, renameSync, rmdirSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { AppshotError, errorText } from '../errors.js';
import { dirname, join } from 'node:path';
import type { InstanceConfig } from '../native.js';

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

/** Makes `copy` the instance's own copy of `original`, unless it has one
 * already; returns `copy`. Written under a temporary name and renamed, so
 * that a copy is never seen half-made. `made`: told what a regular file's
 * copy was made from, when one is made now. */
export function privateCopy(original: string, copy: string, made?: (c: CopiedFile) => void): string {
  if (existsSync(copy)) return copy;
  makeParents(original, copy);
  // A directory (a working directory, a descriptor on one): the whole of
  // it, as a copy-on-write directory is seen from inside.
  if (existsSync(original) && statSync(original).isDirectory()) {
    cpSync(original, copy, { recursive: true, preserveTimestamps: true });
    sameOwners(original, copy);
    return copy;
  }
  const tmp = `${copy}.appshot-${uniqueTag()}`;
  if (existsSync(original)) {
    // The mode and owner of the very file whose bytes are copied: the
    // path may be a symlink, owned by whoever made it, to a file only
    // root may read, which a copy owned by the symlink's owner would
    // hand to them (the path is opened once, and everything read from
    // that descriptor).
    // Not blocking on a FIFO put there: refused below, as any file that
    // is not a regular one.
    const fd = openSync(original, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    let copied: CopiedFile | undefined;
    try {
      const st = fstatSync(fd, { bigint: true });
      if (!st.isFile()) throw new AppshotError(`${original} is not a regular file: no private copy of it is made`);
      // Made 0600, filled, given its owner, then its mode: never for a
      // moment a root-owned set-user-ID file of another's bytes (chown
      // after chmod would also clear the set-ID bits the original has).
      const out = openSync(tmp, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o600);
      try {
        const buf = Buffer.allocUnsafe(1 << 20);
        for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0; ) writeSync(out, buf, 0, n);
        if (process.geteuid?.() === 0) fchownSync(out, Number(st.uid), Number(st.gid));
        fchmodSync(out, Number(st.mode) & 0o7777);
        const written = fstatSync(out, { bigint: true });
        copied = { source: { dev: st.dev, ino: st.ino, birthtimeNs: st.birthtimeNs }, copy: { dev: written.dev, ino: written.ino } };
      } finally {
        closeSync(out);
      }
    } catch (e) {
      rmSync(tmp, { force: true });
      throw e;
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, copy);
    if (copied) made?.(copied);
    return copy;
  }
  writeFileSync(tmp, '');
  renameSync(tmp, copy);
  return copy;
}

/** Root copies for applications that run as other users (PostgreSQL as
 * postgres, nginx's workers as nobody): a copy owned by root, mode 0600,
 * would lock its own user out. So the copy gets the owner of what it
 * copies, as `cp -a` does; anyone else owns the copies they make anyway
 * (and cannot give them away). */
function sameOwners(original: string, copy: string): void {
  if (process.geteuid?.() !== 0) return;
  const st = lstatSync(original);
  lchownSync(copy, st.uid, st.gid);
  if (!st.isDirectory()) return;
  for (const name of readdirSync(original)) sameOwners(join(original, name), join(copy, name));
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
