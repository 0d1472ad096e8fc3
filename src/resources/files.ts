/**
 * File descriptors: each at its number, with its open flags, offset and
 * close-on-exec bit. This module reads a process's descriptor table and
 * sends each descriptor to the module of its kind, and at restore places
 * what those made at its number. Regular files are its own; a deleted
 * file's contents are deleted.ts's, character devices devices.ts's, pipes
 * and FIFOs pipes.ts's, listening and unix sockets sockets.ts's (unix
 * datagram sockets unixdgram.ts's, UDP udp.ts's, netlink netlink.ts's),
 * established TCP connections tcp.ts's, and eventfd, epoll, signalfd,
 * timerfd, inotify, fanotify and io_uring each their own module's, POSIX message queues
 * mqueue.ts's, pseudoterminals ptys.ts's
 * (after every process is read). Anything else is refused
 * by name.
 */
import { openRaw } from './raw.js';
import { type BigIntStats, fchownSync, fstatSync, constants as fs, lstatSync, openSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { AppshotError } from '../errors.js';
import { addon } from '../native.js';
import { timed } from '../snapshot/profile.js';
import { type Fd, FdKind, type InodeOwner, type Process, type Rlimit, verdictRef } from '../image/types.js';
import { type CallBatch, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type DumpContext, type RestoreContext, Transient, Unsupported } from './context.js';
import { inodeOwnerRefusal, ownCreds, strangeOwner } from './creds.js';
import { fsIdentity, identitiesFor, refusedAsProcess, reopenHeld } from './fsident.js';
import { isOwnSnapshot } from '../image/format.js';
import { openDeletedFile, removedDirectoryFd, saveDeletedContents, shownLinkFile } from './deleted.js';
import { dumpDevice, openDevice } from './devices.js';
import { dumpEpoll, dumpEpollParams, restoreEpolls } from './epoll.js';
import { dumpEventfd, restoreEventfd } from './eventfd.js';
import { dumpInotify, inotifyLastWd, refuseQueuedEvents, restoreInotify } from './inotify.js';
import { inotifyLastWdOf } from '../ptrace/windows.js';
import { dumpFanotify, restoreFanotify } from './fanotify.js';
import { dumpIoUring, restoreIoUring } from './iouring.js';
import { dumpPipe, openPipeEnd } from './pipes.js';
import { dumpSignalfd, restoreSignalfd } from './signalfd.js';
import { openConnection } from './tcp.js';
import { dumpTimerfd, restoreTimerfd } from './timerfd.js';
import { inheritedSocket, openSocket, socketKind, type SocketTable } from './sockets.js';
import { openUdp } from './udp.js';
import { openNetlink } from './netlink.js';
import { openUnixDgram } from './unixdgram.js';
import { openPtyEnd } from './ptys.js';
import { openUnconnected } from './unconnected.js';
import { dumpPidfd, openPidfd } from './pidfd.js';
import { dumpMessageQueue, isMessageQueue, openMessageQueue } from './mqueue.js';
import { dumpListingPosition, isMappingListing, positionInListing } from './listings.js';
import { dumpTextPosition, positionInText } from './proctext.js';
import { dumpProcVpid, PROC_PID, refuseOutsideApplication, restoredProcPath } from './procpaths.js';

const O_ACCMODE = 3;
const O_WRONLY = 1;
const O_CLOEXEC = 0o2000000;

function parseFdinfo(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0 && !out.has(line.slice(0, i))) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  (out as Map<string, string> & { raw?: string }).raw = text;
  return out;
}

/** The "lock:" lines of an fdinfo text, without their "lock:" (locks.ts). */
function lockLinesOf(text: string): string[] {
  if (!text.includes('\nlock:')) return [];
  return text
    .split('\n')
    .filter((l) => l.startsWith('lock:'))
    .map((l) => l.slice(5));
}

/** What the snapshot read of a frozen process before it injected any
 * call (all optional: what is missing is read now). */
export interface SeenBeforeCalls {
  /** Its descriptors, links and fdinfo (addon fdEntries): read once for
   * both the look for listings below and the dump, which it would
   * otherwise cost twice in the frozen window (a readlink is ~16 us). The
   * calls asked meanwhile open, close and move none of the application's
   * descriptors; the userfaultfd tracking makes later is not in it. */
  entries?: FdEntry[];
  /** The epoll sets of each process (system PID) that a set of the
   * application watches by edges, in it or in another that shares it by
   * fork (epoll.ts setsWatchedByEdges). */
  epollsWatched?: Map<number, Set<number>>;
  /** The start addresses of the mappings a frozen process of the
   * application had before appshot mapped anything in it, if known. */
  frozenMappings?: (pid: number) => Set<bigint> | undefined;
  /** The listings of mappings read then (for a descriptor reading one,
   * listings.ts). */
  listings?: Map<string, Buffer>;
}

export type FdEntry = ReturnType<ReturnType<typeof addon>['fdEntries']>[number];

/** Descriptors whose fdinfo moves while the application is frozen: a
 * timerfd's time left and expirations (time), an eventfd's count (a
 * process outside the application may write it). Read again at the
 * process's own turn, as the rest of its state is, not taken from the
 * list read before every process's calls: a timerfd of a process dumped
 * after a large one was otherwise recorded as of seconds before (kinds'
 * timerfd fixture: "alarm is due in 3597624 ms, not 3597464"). */
const MOVING_FDINFO = new Set(['anon_inode:[timerfd]', 'anon_inode:[eventfd]']);

/** Whether directory `dir` exists on device `dev`. */
function sameDevice(dir: string, dev: bigint): boolean {
  try {
    return statSync(dir, { bigint: true }).dev === dev;
  } catch {
    return false;
  }
}

function fdinfoNow(pid: number, fd: number, before: string): string {
  try {
    return readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
  } catch {
    return before; // closed meanwhile: impossible while frozen
  }
}

/** A file's extended attributes the program may have given it; [] where
 * they cannot be listed (a file system without them). An access ACL
 * counts (review r294: lost without a word), unless its directory `dir`
 * gives every file made in it one (a default ACL), as it gives the file
 * the restore makes there. */
function deletedXattrs(path: string, dir: string): string[] {
  let names: string[];
  try {
    names = addon().xattrNames(path);
  } catch {
    return [];
  }
  const aclOwn = (): boolean => {
    try {
      return !addon().xattrNames(dir).includes('system.posix_acl_default');
    } catch {
      return true;
    }
  };
  return names.filter((x) => /^(user|trusted)\./.test(x) || x === 'security.capability' || (x === 'system.posix_acl_access' && aclOwn()));
}

/** Inode flags (FS_IOC_GETFLAGS) a program may set with chattr, which a
 * deleted file made again from its bytes would not have: those its
 * directory, if still there, does not give every file made in it. */
const SETTABLE_INODE_FLAGS: [number, string][] = [
  [0x8, 'sync'],
  [0x10, 'immutable'],
  [0x20, 'append-only'],
  [0x40, 'nodump'],
  [0x80, 'noatime'],
];
function deletedInodeFlags(path: string, dir: string): string[] {
  const flags = addon().inodeFlags(path);
  if (flags <= 0) return [];
  let inherited = 0;
  try {
    inherited = Math.max(0, addon().inodeFlags(dir));
  } catch {
    /* its directory is gone too */
  }
  return SETTABLE_INODE_FLAGS.filter(([bit]) => flags & bit && !(inherited & bit)).map(([, name]) => name);
}

/** Refuses, by name (`what`), a deleted file (`target`, as /proc shows it;
 * `st`, its stat through `procPath`) that a restore could not make again
 * from its bytes alone: one still linked under another name, whose copy
 * no longer shares writes with the file those names reach (kernel-made
 * files, a memfd's or memfd_secret's, have a link and a name in no
 * directory of their file system: not those), and one with extended
 * attributes (user.*, trusted.*, file capabilities) or inode flags
 * (chattr) of its own, which the copy would not have. Labels a security
 * module gives every file are not its own. For a descriptor's file and
 * a process's executable (process.ts) alike. */
export function refuseDeletedFileOdds(procPath: string, target: string, st: BigIntStats, what: string): void {
  if (!st.isFile()) return;
  if (st.nlink > 0n && sameDevice(dirname(target), st.dev))
    throw new Unsupported(`${what}: ${target}: its name was removed but the file is still linked elsewhere (${st.nlink} link${st.nlink === 1n ? '' : 's'}), which cannot be captured yet`);
  const own = deletedXattrs(procPath, dirname(target));
  if (own.length) throw new Unsupported(`${what}: ${target}: a deleted file with extended attributes of its own (${own.join(', ')}), which cannot be captured yet`);
  const flags = deletedInodeFlags(procPath, dirname(target));
  if (flags.length) throw new Unsupported(`${what}: ${target}: a deleted file with inode flags of its own (${flags.join(', ')}: chattr), which cannot be captured yet`);
}

export function dumpFds(ctx: DumpContext, pid: number, what: string, sockets: SocketTable, seen: SeenBeforeCalls = {}): Fd[] {
  const fds: Fd[] = [];
  const { frozenMappings, listings: listingsBefore } = seen;
  // Closed meanwhile (impossible while frozen, but cheap to allow): left out.
  for (const entry of seen.entries ?? addon().fdEntries(pid)) {
    const n = entry.fd;
    const target = entry.target;
    const info = parseFdinfo(seen.entries && MOVING_FDINFO.has(target) ? fdinfoNow(pid, n, entry.info) : entry.info);
    if (target === 'anon_inode:[userfaultfd]' && ctx.trackingFds.includes(n)) continue; // appshot's own
    const lockLines = lockLinesOf((info as Map<string, string> & { raw: string }).raw);
    if (lockLines.length) ctx.fdLockLines.set(`${pid}:${n}`, lockLines);
    const flags = parseInt(info.get('flags') ?? '0', 8);
    const fd: Fd = {
      fd: n,
      cloexec: (flags & O_CLOEXEC) !== 0,
      flags: flags & ~O_CLOEXEC,
      pos: BigInt(info.get('pos') ?? '0'),
      kind: FdKind.FILE,
      path: target,
      file: -1,
      pipe: -1,
      writeEnd: (flags & O_ACCMODE) === O_WRONLY,
      eventfdCount: 0n,
      eventfdSemaphore: false,
      epoll: [],
      tty: false,
      description: 0,
      sigmask: 0n,
    };
    const bracket = /^(\w+):\[(\d+)\]$/.exec(target);
    const inherited = bracket?.[1] === 'socket' ? inheritedSocket(ctx, BigInt(bracket[2]), () => sockets.describe(pid, n, BigInt(bracket[2]), what, ctx.tables.sockets)) : undefined;
    const connection = bracket?.[1] === 'socket' && !inherited ? timed('tcp: connection', () => sockets.connection(pid, n, BigInt(bracket[2]))) : undefined;
    if (bracket && bracket[1] === 'pipe') {
      // A pipe is made again with the kernel's mode, 0600: one the program
      // changed (fchmod) would decide anew who may open it again through
      // /proc/PID/fd.
      if (entry.mode !== undefined && entry.mode !== 0o600)
        throw new Unsupported(`${what} fd ${n}: ${target}: a pipe whose mode the program changed (0${entry.mode.toString(8)}, not 0600), which cannot be captured yet`);
      fd.kind = FdKind.PIPE;
      fd.pipe = dumpPipe(ctx, pid, n, BigInt(bracket[2]), '', fd.flags, `${what} fd ${n}`);
    } else if (inherited) {
      fd.kind = FdKind.TCP_LISTEN;
      fd.socket = inherited;
    } else if (connection) {
      fd.kind = FdKind.TCP_ESTABLISHED;
      fd.tcp = timed('tcp: dump', () => ctx.tcp.dump(pid, n, BigInt(bracket![2]), connection, what, ctx.tables.sockets, sockets.takeDup(BigInt(bracket![2]))));
    } else if (bracket && bracket[1] === 'socket') {
      // Descriptors sent to a unix socket and not yet received (fdinfo's
      // scm_fds): its queue is read without them, so the message would
      // come back with its bytes and without its descriptors.
      const inFlight = Number(info.get('scm_fds') ?? '0');
      // A moment's state: the receiver takes them soon (tried again).
      if (inFlight > 0) throw new Transient(`${what} fd ${n}: a unix socket with ${inFlight} descriptor${inFlight === 1 ? '' : 's'} sent to it (SCM_RIGHTS) and not yet received, which cannot be captured yet`);
      fd.socket = sockets.describe(pid, n, BigInt(bracket[2]), what, ctx.tables.sockets);
      fd.kind = socketKind(fd.socket);
      // The peer's system PID (SO_PEERCRED) as the application sees it.
      if (fd.socket.peerCred) fd.socket.peerCred.pid = ctx.virtual('pid', fd.socket.peerCred.pid ?? 0);
      // Who sent its queued messages (SO_PASSCRED): made virtual once the
      // image is whole (checkUnixPeers), where a connection to a process
      // outside, whose queue its keeper holds, is known not to carry it.
    } else if (target === 'anon_inode:[eventfd]') {
      fd.kind = FdKind.EVENTFD;
      Object.assign(fd, dumpEventfd(info));
    } else if (target === 'anon_inode:[eventpoll]') {
      fd.kind = FdKind.EPOLL;
      fd.epoll = dumpEpoll(pid, n, (info as Map<string, string> & { raw: string }).raw, what);
      const params = dumpEpollParams(pid, n);
      if (params) fd.epollParams = params;
    } else if (target === 'anon_inode:[signalfd]') {
      fd.kind = FdKind.SIGNALFD;
      fd.sigmask = dumpSignalfd(info);
    } else if (target === 'anon_inode:[timerfd]') {
      fd.kind = FdKind.TIMERFD;
      fd.timerfd = dumpTimerfd(info);
    } else if (target === 'anon_inode:inotify') {
      fd.kind = FdKind.INOTIFY;
      refuseQueuedEvents(pid, n, 'inotify', `${what} fd ${n}`);
      fd.inotifyWatches = dumpInotify(pid, (info as Map<string, string> & { raw: string }).raw, `${what} fd ${n}`);
      const last = inotifyLastWd(fd.inotifyWatches, inotifyLastWdOf(pid, n));
      if (last !== undefined) fd.inotifyLastWd = last;
    } else if (target === 'anon_inode:[fanotify]') {
      fd.kind = FdKind.FANOTIFY;
      // Its queued events are not looked at (fanotify.ts): lost.
      fd.fanotify = dumpFanotify(pid, (info as Map<string, string> & { raw: string }).raw, `${what} fd ${n}`);
    } else if (target === 'anon_inode:[io_uring]') {
      fd.kind = FdKind.IO_URING;
      fd.ioUring = dumpIoUring(ctx, pid, n, (info as Map<string, string> & { raw: string }).raw, `${what} fd ${n}`);
    } else if (target === 'anon_inode:[pidfd]' || bracket?.[1] === 'pidfd') {
      fd.kind = FdKind.PIDFD;
      fd.procVpid = dumpPidfd(ctx, info, flags, `${what} fd ${n}`);
    } else if (target.startsWith('anon_inode:') || bracket) {
      const kind = target.replace(/^anon_inode:/, '').replace(/[[\]]/g, '');
      throw new Unsupported(`${what} fd ${n}: ${kind} cannot be captured yet`);
    } else {
      const st = statSync(`/proc/${pid}/fd/${n}`, { bigint: true });
      // Removed, or a file still there whose name ends so (deleted.ts).
      const { name, deleted } = shownLinkFile(target, st);
      if (target === '/secretmem (deleted)') throw new Unsupported(`${what} fd ${n}: memfd_secret memory (no other process may read it), which cannot be captured`);
      if (deleted) refuseDeletedFileOdds(`/proc/${pid}/fd/${n}`, target, st, `${what} fd ${n}`);
      if (st.isFIFO()) {
        fd.kind = FdKind.FIFO;
        fd.pipe = dumpPipe(ctx, pid, n, st.ino, target, fd.flags, `${what} fd ${n}`, { st, deleted });
      } else if (st.isCharacterDevice()) {
        fd.kind = FdKind.DEVICE;
        fd.tty = dumpDevice(target, `${what} fd ${n}`).tty;
      } else if (st.isFile() && isMessageQueue(ctx, st, `/proc/${pid}/fd/${n}`)) {
        fd.kind = FdKind.MQUEUE;
        fd.mqueue = dumpMessageQueue(ctx, st, `/proc/${pid}/fd/${n}`, target, `${what} fd ${n}`);
      } else if (st.isSymbolicLink() && deleted) {
        throw new Unsupported(`${what} fd ${n}: ${target}: a symbolic link held with O_PATH whose name was removed, which cannot be captured yet`);
      } else if (st.isSymbolicLink()) {
        // A symbolic link itself (open(link, O_PATH|O_NOFOLLOW)): opened
        // again by its name the same way, checked to say the same.
        fd.file = ctx.file(target, `/proc/${pid}/fd/${n}`, false, st);
        ctx.image.files[fd.file].linkTarget = symlinkText(target, st, `${what} fd ${n}`);
      } else if (st.isFile() || st.isDirectory()) {
        fd.file = ctx.file(name, `/proc/${pid}/fd/${n}`, deleted, st);
        // /proc/PID/... of a process of the application: it follows that
        // process to its restored PID.
        fd.procVpid = dumpProcVpid(ctx, target, `${what} fd ${n}`);
        // Read part way, a listing of mappings keeps its reader's place by
        // mapping: its bytes are another text after a restore.
        if (fd.procVpid && fd.pos > 0n && isMappingListing(target)) fd.listingPosition = dumpListingPosition(target, fd.pos, listingsBefore?.get(target), frozenMappings?.(Number(PROC_PID.exec(target)![1])));
        // Another /proc text read part way or to its end keeps its place
        // by line, for the same reason.
        else if (fd.pos > 0n && !deleted) fd.textPosition = dumpTextPosition(pid, n, fd.flags, fd.pos);
        // A directory since removed holds nothing: made again empty and
        // removed at restore (openFile), no contents kept.
        if (deleted && !st.isDirectory()) saveDeletedContents(ctx, pid, n, fd.file);
      } else {
        throw new Unsupported(`${what} fd ${n}: ${target} (a ${st.isSocket() ? 'socket' : st.isBlockDevice() ? 'block device' : 'special file'}) cannot be captured yet`);
      }
    }
    // A pipe's or socket's owner, which the restore, making it again,
    // gives it (restoreInodeOwner).
    if (entry.uid !== undefined && entry.gid !== undefined && fd.kind !== FdKind.FILE) fd.inodeOwner = { uid: entry.uid, gid: entry.gid };
    fds.push(fd);
  }
  return fds;
}

/** The text of symbolic link `path`, whose status `st` a descriptor holds:
 * read by its name, which must name that very link before and after (the
 * application's user may change the name meanwhile). */
function symlinkText(path: string, st: BigIntStats, where: string): string {
  const same = () => {
    try {
      const now = lstatSync(path, { bigint: true });
      return now.isSymbolicLink() && now.dev === st.dev && now.ino === st.ino;
    } catch {
      return false;
    }
  };
  if (!same()) throw new Unsupported(`${where}: the symbolic link it holds (O_PATH) is no longer at its name ${path}, which cannot be captured yet`);
  const text = readlinkSync(path, { encoding: 'buffer' });
  if (!same()) throw new Unsupported(`${where}: the symbolic link it holds (O_PATH) is no longer at its name ${path}, which cannot be captured yet`);
  return text.toString('latin1');
}

/* ---- restore ---------------------------------------------------------- */

/** Descriptors made in appshot's process and handed over, by kind: our
 * descriptor for image fd `fd` of process `p`. */
const MADE_HERE: Partial<Record<number, (h: RestoreContext, p: Process, fd: Fd) => number>> = {
  [FdKind.FILE]: openFile,
  [FdKind.DEVICE]: openDevice,
  [FdKind.PIPE]: openPipeEnd,
  [FdKind.FIFO]: openPipeEnd,
  [FdKind.TCP_LISTEN]: openSocket,
  [FdKind.UNIX_SOCKET]: openSocket,
  [FdKind.TCP_ESTABLISHED]: openConnection,
  [FdKind.UDP]: openUdp,
  [FdKind.NETLINK]: openNetlink,
  [FdKind.RAW]: openRaw,
  [FdKind.UNIX_DGRAM]: openUnixDgram,
  [FdKind.EVENTFD]: restoreEventfd,
  [FdKind.PTY]: openPtyEnd,
  [FdKind.UNCONNECTED_STREAM]: openUnconnected,
  [FdKind.PIDFD]: openPidfd,
  [FdKind.MQUEUE]: openMessageQueue,
};

/** Descriptors whose state lives in the process that made them (a
 * signalfd reads its reader's signals; timers and watches are charged to
 * their owner): made by system calls run inside the restored process. */
const MADE_INSIDE: Partial<Record<number, (r: RemoteProcess, fd: Fd) => number>> = {
  [FdKind.SIGNALFD]: restoreSignalfd,
  [FdKind.TIMERFD]: restoreTimerfd,
  [FdKind.INOTIFY]: restoreInotify,
  [FdKind.FANOTIFY]: restoreFanotify,
  [FdKind.IO_URING]: restoreIoUring,
};

const F_DUPFD_CLOEXEC = 1030;
const F_SETFD = 2;
const EPOLL_CLOEXEC = 0o2000000;

/**
 * Every descriptor at its number, with its offset, flags and
 * close-on-exec bit; epoll sets last, once their targets are in place.
 *
 * The hand-over costs about one injected call per descriptor, and the
 * calls run in batches (RemoteProcess.runCalls: one stop each). That
 * rests on the kernel giving a new descriptor the lowest free number,
 * which makes every number predictable here, the process's table being
 * empty after close_range: appshot's pidfd is opened once, at a number
 * the image does not use; the descriptors are taken with pidfd_getfd in
 * ascending order, each landing at its own number, the holes below them
 * held meanwhile by placeholders (copies of the pidfd); placeholders and
 * pidfd are closed at the end. A descriptor that cannot land at its number
 * (a hole left open because filling it would cost more) is taken where
 * it lands and moved (dup3, close). Every result is checked against its
 * prediction. `seedLimits`: the process's limits as they are now
 * (readLimits), for a descriptor number above them.
 */
export function restoreFds(r: RemoteProcess, p: Process, h: RestoreContext, seedLimits: Rlimit[]): void {
  const images = [...p.fds].sort((a, b) => a.fd - b.fd);
  const used = new Set(images.map((f) => f.fd));
  // The pidfd's number: the lowest the image does not use.
  let pidfd = 0;
  while (used.has(pidfd)) pidfd++;
  const restoreLimit = allowNumbersUpTo(r, Math.max(pidfd, ...images.map((f) => f.fd)), seedLimits);
  const table = new FdTable(r);
  table.add('closing the seed\'s descriptors', SYS.close_range, [0, 0xffffffff, 0]);
  // pidfd_open gives the lowest free number: 0, the table being empty.
  table.open('opening a pidfd of appshot', SYS.pidfd_open, [process.pid, 0]);
  if (pidfd !== 0) {
    table.open('moving the pidfd of appshot', SYS.fcntl, [0, F_DUPFD_CLOEXEC, pidfd], pidfd);
    table.close(0);
  }
  const placeholders: number[] = [];
  const place = (got: number, fd: Fd) => {
    if (got !== fd.fd) {
      r.call(`placing fd ${fd.fd}`, SYS.dup3, [got, fd.fd, fd.cloexec ? EPOLL_CLOEXEC : 0]);
      r.call('closing', SYS.close, [got]);
    } else if (!fd.cloexec) {
      r.call(`clearing close-on-exec of fd ${fd.fd}`, SYS.fcntl, [fd.fd, F_SETFD, 0]);
    }
  };
  let filling = true;
  images.forEach((fd, i) => {
    if (fd.kind === FdKind.EPOLL) return;
    // Holds the holes below fd.fd if that costs fewer calls than moving
    // every descriptor from here up (two calls a hole, two a move).
    if (filling && table.lowest() < fd.fd) {
      const holes = fd.fd - table.lowest() - [...table.taken].filter((n) => n > table.lowest() && n < fd.fd).length;
      if (holes > images.length - i) filling = false;
      else
        while (table.lowest() < fd.fd) {
          placeholders.push(table.lowest());
          table.open('holding a free number', SYS.fcntl, [pidfd, F_DUPFD_CLOEXEC, table.lowest()]);
        }
    }
    const makeInside = MADE_INSIDE[fd.kind];
    if (makeInside) {
      // Made by calls of its own: it lands where the kernel puts it.
      table.run();
      const got = makeInside(r, fd);
      place(got, fd);
      table.taken.add(fd.fd);
      return;
    }
    // pidfd_getfd's descriptor is close-on-exec.
    const got = table.open(`taking fd ${fd.fd}`, SYS.pidfd_getfd, [pidfd, openHere(h, p, fd), 0]);
    if (got !== fd.fd) {
      table.add(`placing fd ${fd.fd}`, SYS.dup3, [got, fd.fd, fd.cloexec ? EPOLL_CLOEXEC : 0]);
      table.taken.add(fd.fd);
      table.close(got);
    } else if (!fd.cloexec) table.add(`clearing close-on-exec of fd ${fd.fd}`, SYS.fcntl, [fd.fd, F_SETFD, 0]);
  });
  for (const n of placeholders) table.close(n);
  table.close(pidfd);
  // In the process's next stop (the driver's next batch for it), unless
  // a call of the epolls' or the limit's comes first.
  table.runLater();
  restoreEpolls(r, p, place);
  restoreLimit();
}

/**
 * The restored process's descriptor table as it will be once the calls
 * gathered so far have run: the numbers taken, so that the number each
 * new descriptor gets (the lowest free) is known before it runs.
 */
class FdTable {
  readonly taken = new Set<number>();
  private readonly batch: CallBatch;
  private readonly expected = new Map<number, number>();

  constructor(r: RemoteProcess) {
    this.batch = r.batch();
  }

  lowest(): number {
    let n = 0;
    while (this.taken.has(n)) n++;
    return n;
  }

  add(what: string, nr: number, args: (bigint | number)[]): number {
    return this.batch.add(what, nr, args);
  }

  /** A call that makes a descriptor at `at` (by default the lowest free
   * number); returns that number. */
  open(what: string, nr: number, args: (bigint | number)[], at = this.lowest()): number {
    this.expected.set(this.batch.add(what, nr, args), at);
    this.taken.add(at);
    return at;
  }

  close(n: number): void {
    this.batch.add('closing', SYS.close, [n]);
    this.taken.delete(n);
  }

  /** Runs what was gathered; a descriptor that did not land at its
   * predicted number fails the restore (nothing after it would be right). */
  run(): void {
    this.check(this.batch.run());
  }

  /** The same, at the start of the process's next stop (CallBatch.defer):
   * the check too. */
  runLater(): void {
    this.batch.defer((results) => this.check(results));
  }

  private check(results: bigint[]): void {
    for (const [i, at] of this.expected)
      if (Number(results[i]) !== at) throw new AppshotError(`restoring descriptors: a new descriptor landed at ${results[i]}, not at ${at}`);
    this.expected.clear();
  }
}

/** A descriptor of ours for image fd `fd` of process `p`: one per open
 * file description, which descriptors inherited or dup'd share. */
function openHere(h: RestoreContext, p: Process, fd: Fd): number {
  const make = MADE_HERE[fd.kind];
  const open = () => {
    if (!make) throw new AppshotError(`process ${p.vpid} fd ${fd.fd}: cannot restore a descriptor of kind ${fd.kind}`);
    return restoreInodeOwner(h, p, fd, make(h, p, fd));
  };
  return fd.description ? h.once(`description ${fd.description}`, open) : open();
}

/**
 * The inode owner a pipe or socket made here is given: the one it had, as
 * its maker in the application made it. The kernel goes by that owner: a
 * socket's (sk_uid) decides who may bind another SO_REUSEPORT socket
 * beside it (a nobody server restored by root could bind no second socket
 * to its port: EADDRINUSE), a pipe's who may open it again through
 * /proc/PID/fd (`cat /dev/stdin` of a nobody pipeline: EACCES).
 *
 * One this user cannot give (an ordinary user's restore of a pipe a root
 * shell made), or, from an image this node did not snapshot, one that no
 * thread of the image has, is not given: the holding process's own fsuid
 * and fsgid are, as it would make it now (else the restorer's stay), and
 * the restore says so (notKept). Undefined: leave it as made.
 */
export function ownerFor(h: RestoreContext, p: Process, fd: Fd): InodeOwner | undefined {
  const want = fd.inodeOwner;
  if (!want) return undefined;
  const own = ownCreds();
  const why = strangeOwner(h.image, want.uid, [want.gid]) ?? inodeOwnerRefusal(want, own);
  if (!why) return want;
  const c = p.threads[0]?.creds ?? p.creds;
  const holder = { uid: c.uid[3], gid: c.gid[3] };
  const give = inodeOwnerRefusal(holder, own) ? undefined : holder;
  h.notKept.push(`process ${p.vpid} fd ${fd.fd}: ${ownedThing(fd)} owned by uid ${want.uid} gid ${want.gid} is now ${give ? `uid ${give.uid} gid ${give.gid}'s, its process's` : "appshot's"} (${why})`);
  return give;
}

const ownedThing = (fd: Fd) => (fd.kind === FdKind.PIPE ? 'a pipe' : 'a socket');

/** A pipe or socket a maker made here and marked (RestoreContext.ownerAfter)
 * is given its owner (ownerFor) with fchown, which sets a socket's sk_uid
 * too. (A listener is made with its owner from the start: listenSocket.) */
function restoreInodeOwner(h: RestoreContext, p: Process, fd: Fd, ours: number): number {
  if (!h.ownerAfter.has(ours)) return ours;
  const give = ownerFor(h, p, fd);
  if (!give) return ours;
  const st = fstatSync(ours);
  if (st.uid === give.uid && st.gid === give.gid) return ours;
  try {
    fchownSync(ours, give.uid, give.gid);
  } catch (e) {
    // Root in a user namespace that does not map the id: EINVAL.
    h.notKept.push(`process ${p.vpid} fd ${fd.fd}: ${ownedThing(fd)} owned by uid ${give.uid} gid ${give.gid} is now appshot's (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  return ours;
}

/** A regular file or directory: the new application's table file for the
 * one each process keeps, the application's log for the old log, a
 * deleted file made again, or the file (a clone's own, see filePath) at
 * the offset it had. */
function openFile(h: RestoreContext, p: Process, fd: Fd): number {
  const plain = fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC);
  // The descriptor of the table file each process keeps (see
  // addon/preload/preload_fd.c): the new application's tables.
  if (fd.path === h.image.tablesPath) return h.keep(openSync(h.tablesPath, plain));
  let got: number;
  let path: string | undefined;
  // The new log is another file, which its writers append to: its
  // position is its own.
  if (h.image.logPath && fd.path === h.image.logPath) return h.log();
  const removedDir = h.image.files[fd.file]?.deleted === true && (h.image.files[fd.file].mode & 0o170000) === 0o040000;
  // A directory since removed, held open (not as the working directory):
  // one made beside where it was, opened, and removed again before the
  // application runs, as a removed working directory is; it lists nothing,
  // and nothing can be made in it. (Not a deleted file's stand-in: that
  // was a regular file where the program held a directory.)
  if (removedDir) got = removedDirectoryFd(h, fd.file, plain);
  else if (h.image.files[fd.file]?.deleted) got = openDeletedFile(h, fd);
  else if (fd.procVpid) {
    path = restoredProcPath(h, fd.path, fd.procVpid);
    // As its process would, as every other name: what /proc lets a
    // process open of another's (mem, environ: ptrace access by its
    // credentials) is the kernel's to say, not root's (the fuzzing had a
    // crafted image's nobody process hold /etc/shadow, or appshot-init's
    // memory read-write, through a descriptor that named it).
    got = h.keep(openAsProcess(h, p, fd, path, plain));
    // That very file of the restored process, opened as named.
    refuseOutsideApplication(got, fd.path, `process ${p.vpid} fd ${fd.fd}`, path);
    // A listing of mappings read part way: its place there is found once
    // the process's memory is as it will run (our descriptor shares the
    // offset with the application's).
    const at = fd.listingPosition;
    if (at && isMappingListing(path)) {
      const listing = got;
      h.whenProcessesAreFinal(() => positionInListing(listing, at));
      return got;
    }
  } else {
    path = filePath(h, p, fd);
    // The image's name is opened as its process would (fsident.ts): a
    // symlink planted on the way, or a file the process could not open,
    // gets the kernel's EACCES. So is a clone's own copy, which has the
    // owner and mode of what it copied (paths.ts privateCopy): a copy of
    // a root-only file reached through a symlink planted where the
    // template's file was is not handed to a process that could not read it.
    got = h.keep(openAsProcess(h, p, fd, path, plain));
    refuseOutsideApplication(got, path, `process ${p.vpid} fd ${fd.fd}`);
    const link = h.image.files[fd.file]?.linkTarget;
    if (link !== undefined) sameSymlink(got, path, link, `process ${p.vpid} fd ${fd.fd}`);
  }
  // O_APPEND too: writes go to the end whatever it is, but reads (O_RDWR)
  // start there and lseek(SEEK_CUR) tells it. As a bigint: a directory's
  // position on ext4 is a 64-bit hash, which a Number would round (the
  // listing would go on from another name, one lost or repeated).
  // (A removed directory lists nothing from anywhere: its place was in
  // names it no longer has.)
  if (fd.pos && !removedDir) addon().lseek(got, fd.pos);
  // Another /proc text: its place by line, once the processes it shows
  // are as they will run.
  const at = fd.textPosition;
  if (at && path !== undefined) {
    const text = got;
    const textPath = path;
    h.whenProcessesAreFinal(() => positionInText(text, textPath, plain, at));
  }
  return got;
}

/** A symbolic link the image held (O_PATH|O_NOFOLLOW), opened again as
 * `got` by its name `path`: refused unless it is one still, saying what it
 * said (`text`). Read by its name, which must name `got`'s link. */
function sameSymlink(got: number, path: string, text: string, where: string): void {
  const st = fstatSync(got, { bigint: true });
  if (!st.isSymbolicLink()) throw new AppshotError(`${where}: ${path} was a symbolic link (held with O_PATH) and is no longer one`);
  let now: string | undefined;
  try {
    const before = lstatSync(path, { bigint: true });
    const read = readlinkSync(path, { encoding: 'buffer' }).toString('latin1');
    const after = lstatSync(path, { bigint: true });
    if ([before, after].every((l) => l.dev === st.dev && l.ino === st.ino)) now = read;
  } catch {
    // Gone or changed meanwhile: not that link.
  }
  if (now === undefined) throw new AppshotError(`${where}: the symbolic link ${path} changed while it was opened`);
  if (now !== text) throw new AppshotError(`${where}: the symbolic link ${path} points to ${JSON.stringify(now)} now, not ${JSON.stringify(text)} as at the snapshot`);
}

/** Where a clone's file descriptor points: a REDIR PATH target, the
 * instance's private copy of a file it may write (copy-on-write,
 * duplicate), or the template's file itself (share). */
/** `path` opened as process `p` would (or, refused, another process of
 * the application: fsident.ts); what none of their credentials allow is
 * refused naming the descriptor and the process's fsuid, unless it is the
 * very file an image of our own snapshot says the process held, or a
 * clone's copy made now of that very file (reopenHeld: opened before
 * it dropped its privileges). */
function openAsProcess(h: RestoreContext, p: Process, fd: Fd, path: string, flags: number): number {
  try {
    return addon().openAs(path, flags, 0, identitiesFor(h.image, p));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const held = code === 'EACCES' || code === 'EPERM' ? h.image.files[fd.file] : undefined;
    const got = held && reopenHeld(held, isOwnSnapshot(h.image), path, flags, h.copiesMade.get(path));
    if (got !== undefined) return got;
    refusedAsProcess(e, `process ${p.vpid} fd ${fd.fd}: ${path}`, fsIdentity(p));
  }
}

function filePath(h: RestoreContext, p: Process, fd: Fd): string {
  const action = h.plan?.action(verdictRef.fd(p.vpid, fd));
  const writable = (fd.flags & O_ACCMODE) !== fs.O_RDONLY;
  return h.clonePath(fd.path, action === 'duplicate' || (action === 'copy-on-write' && writable), p, `process ${p.vpid} fd ${fd.fd}`, h.image.files[fd.file]);
}

const RLIMIT_NOFILE = 7;

/** A process may hold descriptors at or above its soft RLIMIT_NOFILE (it
 * lowered the limit after opening them; the preload library's descriptor
 * of the table file sits at 1000 in a program that set 777), even above
 * its hard one (lowered too), but dup3 refuses such numbers: the soft
 * limit is raised to the hard one while the descriptors are placed, and
 * the hard one to just past the highest number if it is below it (which
 * takes CAP_SYS_RESOURCE: limits.ts checkLimits refused the restore
 * before anything was made without it). Returns what sets them back (to
 * `limits`, the process's as they are now); restoreLimits sets the
 * image's after. */
function allowNumbersUpTo(r: RemoteProcess, highest: number, limits: Rlimit[]): () => void {
  const { cur: soft, max: hard } = limits.find((l) => l.resource === RLIMIT_NOFILE)!;
  if (BigInt(highest) < soft) return () => {};
  const set = (cur: bigint, max: bigint) => {
    r.reset();
    r.call('setting RLIMIT_NOFILE', SYS.prlimit64, [0, RLIMIT_NOFILE, r.put(r.u64s([cur, max])), 0]);
  };
  const top = BigInt(highest) < hard ? hard : BigInt(highest) + 1n;
  set(top, top);
  return () => set(soft, hard);
}

/**
 * Marks descriptors that are one open file description (a file opened
 * before a fork, a dup'd descriptor): kcmp(KCMP_FILE) asks the kernel,
 * among descriptors of the same file at the same offset with the same
 * status flags (which one description has, whoever holds it). They get
 * one description number, and a restore makes them one description
 * again, sharing its offset (a pipe end's, its status flags). Sockets are
 * shared by their inode. Within a group the descriptors are sorted by
 * kcmp's ordering (addon descriptionGroups), not compared pairwise: 2,000
 * descriptors opened apart on one file were 2 million kcmp calls, seconds
 * with the application frozen.
 */
export function markSharedDescriptions(procs: { pid: number; fds: Fd[] }[]): void {
  const groups = new Map<string, { pid: number; fd: Fd }[]>();
  for (const p of procs)
    for (const fd of p.fds) {
      if (fd.kind !== FdKind.FILE && fd.kind !== FdKind.DEVICE && fd.kind !== FdKind.EVENTFD && fd.kind !== FdKind.PIPE && fd.kind !== FdKind.FIFO && fd.kind !== FdKind.PIDFD && fd.kind !== FdKind.MQUEUE) continue;
      const key = `${fd.kind}:${fd.file}:${fd.path}:${fd.pos}:${fd.flags}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key)!.push({ pid: p.pid, fd });
    }
  let next = 1;
  for (const members of groups.values()) {
    if (members.length < 2) continue;
    const lowest = addon().descriptionGroups(
      members.map((m) => m.pid),
      members.map((m) => m.fd.fd),
    );
    // No kcmp: every descriptor its own description.
    if (!lowest) continue;
    members.forEach((m, i) => {
      const first = members[lowest[i]];
      if (first === m) return;
      first.fd.description ||= next++;
      m.fd.description = first.fd.description;
    });
  }
}
