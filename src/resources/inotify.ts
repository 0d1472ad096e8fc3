/**
 * inotify: an instance and its watches. /proc/PID/fdinfo lists each watch
 * by its watch descriptor (wd), the watched inode's file handle and the
 * event mask; the path is found from the handle at snapshot
 * (open_by_handle_at, which needs CAP_DAC_READ_SEARCH) and each watch is
 * added again by path to the instance made inside the restored process,
 * by the restorer with the process's filesystem identity (fsident.ts).
 *
 * Each watch's name is walked once, as the process, and what it leads to
 * checked before the watch is added on it (fsident.ts openWatchedAs): a
 * symlink the image's user put on the way to another process's /proc
 * (the restoring engine's, /proc/self) or through a /proc magic link is
 * refused, as for a file the process holds.
 *
 * The application knows its watches by their wd, so they must come back
 * with the same numbers. The kernel hands them out in increasing order
 * from 1 in each instance: adding the watches in wd order gives the same
 * numbers, and a gap (a watch the application removed) is used up by
 * adding and removing a watch on a directory that is not watched.
 *
 * The kernel numbers on from the last wd it gave, not from the highest
 * one there: a program that removed its highest watches gets numbers above
 * them next. /proc does not show it; the preload library records, per
 * descriptor, the highest wd inotify_add_watch got
 * (addon/preload/preload_inotify.c), and the restore spends numbers up to
 * it the same way (inotifyLastWd). Where the library did not see it (an
 * instance another process added watches to, one kept across an exec, a
 * descriptor from 1024 up), the numbering goes on from the highest watch,
 * as the kernel's would from the highest the library saw.
 *
 * Events queued at the snapshot cannot be put back: an instance with some
 * is refused by name (refuseQueuedEvents; fanotify's too).
 */
import { type BigIntStats, closeSync, lstatSync, readFileSync, statSync } from 'node:fs';
import { addon } from '../native.js';
import { deviceName, mapsDeviceName } from '../procfs.js';
import { type Fd, type InotifyWatch, type Process } from '../image/types.js';
import { countedIds, LIMITS } from '../image/validate.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Transient, Unsupported } from './context.js';
import { fsIdentity, identitiesOfRestored, openWatchedAs, refusedAsProcess } from './fsident.js';

const IN_NONBLOCK = 0o4000; // = O_NONBLOCK
const IN_CLOEXEC = 0o2000000;
/** A lookup flag, not part of a watch: the path names the watched inode
 * itself, never what a symlink there points to (the restore's open of
 * the name, O_NOFOLLOW, does that; never passed on). */
const IN_DONT_FOLLOW = 0x02000000;
const F_SETFL = 4;

/** A watch's fdinfo line. The kernel prints every number in it in hex,
 * its wd too (wd 26 is "1a", wd 16 is "10"). */
const WATCH = /^inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) ignored_mask:[0-9a-f]+(?: fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]+))?/;

/** Where the filesystem with kernel device number `sdev` is mounted, as
 * the process sees it (a mount of its root preferred). */
export function mountOf(pid: number, sdev: number): string | undefined {
  const dev = `${sdev >>> 20}:${sdev & 0xfffff}`;
  let best: string | undefined;
  for (const line of readFileSync(`/proc/${pid}/mountinfo`, 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f[2] !== dev) continue;
    const at = `/proc/${pid}/root${f[4] === '/' ? '' : f[4]}`;
    if (f[3] === '/') return at;
    best ??= at;
  }
  return best;
}

/** The path of the inode a mark or watch of process `pid` is on, from
 * the fields its fdinfo line gives (hex, as the kernel prints them);
 * `what` names it ("inotify watch 3") in the refusal, prefixed by
 * `where`. The inode at that path now must be the one marked: a deleted
 * one (or one whose name went elsewhere) cannot be marked again by name. */
export function markedInodePath(pid: number, fields: { ino: string; sdev: string; type?: string; handle?: string }, where: string, what: string): string {
  const { ino, sdev, type, handle } = fields;
  if (!handle || !type) throw new Unsupported(`${where}: ${what} is on a filesystem that gives no file handles: its path cannot be found`);
  const mount = mountOf(pid, parseInt(sdev, 16));
  if (!mount) throw new Unsupported(`${where}: ${what} is on a filesystem the process has no mount of`);
  let path: string;
  try {
    path = addon().fileHandlePath(mount, parseInt(type, 16), handle);
  } catch (e) {
    throw new Unsupported(`${where}: the path of ${what} cannot be found (${(e as Error).message})`);
  }
  let named: BigIntStats | undefined;
  try {
    named = lstatSync(path, { bigint: true });
  } catch {
    /* no longer at that path */
  }
  // The inode decides, not a " (deleted)" at the name's end: a file
  // still there may be named so (deleted.ts shownFile); a removed one's
  // name, suffix and all, leads to no file or another.
  if (named?.ino !== BigInt(`0x${ino}`)) throw new Unsupported(`${where}: ${what} is on an inode with no name (${path}): it cannot be found again by path`);
  // And its filesystem: an inode number alone is another file's on
  // another one (a mount over the directory since). The mark's device,
  // or, on btrfs, whose files stat shows on their subvolume's device,
  // the mount's root's.
  const sd = parseInt(sdev, 16);
  if (deviceName(named.dev) !== mapsDeviceName(sd >>> 20, sd & 0xfffff) && named.dev !== statSync(mount, { bigint: true }).dev)
    throw new Unsupported(`${where}: ${what} is on inode ${BigInt(`0x${ino}`)} of device ${mapsDeviceName(sd >>> 20, sd & 0xfffff)}, but its path ${path} leads to a file of device ${deviceName(named.dev)}: it cannot be found again by path`);
  return path;
}

/** The wd the kernel gave last on an instance with `watches`, as the
 * library recorded it (`recorded`: the process's memory, a number to
 * check), where it says more than the watches do: only above the highest
 * watch there (one below is not this instance's: left at a number closed
 * past the library) and within what an image may hold; else undefined,
 * and the numbering goes on from the highest watch. */
export function inotifyLastWd(watches: InotifyWatch[], recorded: number): number | undefined {
  const highest = Math.max(0, ...watches.map((w) => w.wd));
  return recorded > highest && recorded <= LIMITS.inotifyWatches ? recorded : undefined;
}


/** At snapshot, before anything ends the application: the image's watch
 * numbers and timer ids within what a restore takes (LIMITS.countedIds,
 * the whole image's: validate.ts). The numbers the library recorded
 * above a descriptor's watches are each one a restore spends: past that
 * bound, the largest are given up (that descriptor's numbering goes on
 * from its highest watch, as one the library does not follow), rather
 * than an image written that every restore refuses as corrupt (two
 * instances that had used 40,000 numbers each). The watches and timers
 * themselves over it: refused by name. */
export function fitInotifyNumbers(processes: Pick<Process, 'posixTimers' | 'fds'>[]): void {
  let counted = countedIds(processes);
  if (counted <= LIMITS.countedIds) return;
  const above = processes
    .flatMap((p) => p.fds)
    .filter((fd) => fd.inotifyLastWd !== undefined)
    .map((fd) => ({ fd, saves: fd.inotifyLastWd! - Math.max(0, ...(fd.inotifyWatches ?? []).map((w) => w.wd)) }))
    .sort((a, b) => b.saves - a.saves);
  for (const { fd, saves } of above) {
    if (counted <= LIMITS.countedIds) break;
    delete fd.inotifyLastWd;
    counted -= saves;
  }
  if (counted > LIMITS.countedIds) throw new Unsupported(`its inotify watch numbers and POSIX timer ids add up to ${counted}, more than a restore makes (${LIMITS.countedIds})`);
}

/** Each watch of inotify descriptor `where` ("process 2 (app) fd 5"), in
 * wd order, from its fdinfo text. */
export function dumpInotify(pid: number, fdinfo: string, where: string): InotifyWatch[] {
  const watches: InotifyWatch[] = [];
  for (const line of fdinfo.split('\n')) {
    if (!line.startsWith('inotify ')) continue;
    const m = WATCH.exec(line);
    if (!m) throw new Unsupported(`${where}: an inotify watch this kernel shows as '${line}' cannot be captured yet`);
    const [, hexWd, ino, sdev, mask, , type, handle] = m;
    const wd = parseInt(hexWd, 16);
    const path = markedInodePath(pid, { ino, sdev, type, handle }, where, `inotify watch ${wd}`);
    watches.push({ wd, path, mask: parseInt(mask, 16) });
  }
  return watches.sort((a, b) => a.wd - b.wd);
}

/** Throws Unsupported if `kind` instance `fd` of `pid` has events queued,
 * unread (FIONREAD): a restore makes the instance again, empty, so they
 * would be lost. Asked before anything of the snapshot's opens a watched
 * inode (markedInodePath), which may queue events of its own. */
export function refuseQueuedEvents(pid: number, fd: number, kind: 'inotify' | 'fanotify', where: string): void {
  const dup = addon().getFd(pid, fd);
  try {
    const bytes = addon().bytesToRead(dup);
    // A moment's state: the program reads its events soon (tried again).
    if (bytes > 0) throw new Transient(`${where}: the ${kind} instance has ${bytes} bytes of events queued, unread, which a restore cannot put back; cannot be captured yet`);
  } finally {
    closeSync(dup);
  }
}

/** Directories to spend watch descriptors on: any that is not watched. */
const SPARE = ['/', '/tmp', '/usr', '/etc', '/var', '/proc'];

/** A new inotify instance inside the restored process, each watch at its
 * wd; its number there (close-on-exec, as restoreFds expects). */
export function restoreInotify(r: RemoteProcess, fd: Fd): number {
  r.reset();
  const made = Number(r.call(`making inotify fd ${fd.fd}`, SYS.inotify_init1, [IN_NONBLOCK | IN_CLOEXEC]));
  const watches = fd.inotifyWatches ?? [];
  const inode = (path: string) => {
    try {
      return lstatSync(path).ino;
    } catch {
      return -1; // the add below names the path that is missing
    }
  };
  const watched = new Set(watches.map((w) => inode(w.path)));
  const last = fd.inotifyLastWd ?? 0;
  const spare = SPARE.find((p) => inode(p) >= 0 && !watched.has(inode(p)));
  // The watches are added by the restorer, on the instance taken from the
  // process (one watch list: the numbers are the same), on a thread with
  // the process's filesystem identity (fsident.ts): the kernel walks to the
  // name and checks read permission as the caller, which must be the
  // process, not a root restorer before the process's credentials are
  // back (issue 12). The numbers skipped are spent there too, on a spare
  // directory (fixed names, not the image's: nothing of the image is
  // walked with the restorer's rights), by a native loop: two calls
  // injected into the process per number cost ~0.5 ms, a program that had
  // removed thousands of watches would take seconds.
  const as = identitiesOfRestored(r);
  const ours = watches.length || last ? addon().getFd(r.pid, made) : -1;
  let next = 1;
  /** Numbers up to `wd` (not included) spent; their events read out. */
  const skipTo = (wd: number) => {
    if (next >= wd) return;
    if (!spare) throw new Error(`inotify fd ${fd.fd}: no unwatched directory to skip watch descriptor ${next} with`);
    next = addon().inotifySkipWds(ours, spare, next, wd);
  };
  try {
    for (const w of watches) {
      skipTo(w.wd);
      const what = `process ${as.p.vpid} fd ${fd.fd}: its inotify watch ${w.wd}`;
      // The name walked once, as the process, and what it leads to
      // checked (openWatchedAs); the watch added on that very inode. The
      // path names the watched inode itself: a symlink there is watched,
      // not followed (IN_DONT_FOLLOW, as O_NOFOLLOW). `w.path` given to
      // the watch too: walked again, without symlinks, by a retry identity.
      const at = openWatchedAs(w.path, true, as.who, as.p, what);
      let got: number;
      try {
        got = addon().inotifyAddWatchAs(ours, at, (w.mask & ~IN_DONT_FOLLOW) >>> 0, as.who, w.path);
      } catch (e) {
        refusedAsProcess(e, `${what} on ${w.path}`, fsIdentity(as.p), 'made');
      } finally {
        closeSync(at);
      }
      if (got !== w.wd) throw new Error(`inotify fd ${fd.fd}: ${w.path} came back as watch ${got}, not ${w.wd}`);
      next = got + 1;
    }
    // The numbers the program had used above its highest watch.
    skipTo(last + 1);
  } finally {
    if (ours >= 0) closeSync(ours);
  }
  if (!(fd.flags & IN_NONBLOCK)) r.call(`clearing O_NONBLOCK of inotify fd ${fd.fd}`, SYS.fcntl, [made, F_SETFL, fd.flags & ~IN_NONBLOCK & ~IN_CLOEXEC]);
  return made;
}

export function describeInotify(watches: InotifyWatch[] | undefined): string {
  return `inotify watching ${(watches ?? []).map((w) => `${w.wd}:${w.path}`).join(', ') || 'nothing'}`;
}
