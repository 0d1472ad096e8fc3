/**
 * File descriptors: each at its number, with its open flags, offset and
 * close-on-exec bit. Regular files (and a deleted file's contents),
 * character devices (/dev/null, /dev/zero, /dev/urandom, ttys), pipes and
 * FIFOs (both ends, with the data they hold, copied without consuming it),
 * listening sockets (sockets.ts), established TCP connections (tcp.ts),
 * eventfd, epoll, signalfd (signalfd.ts), timerfd (timerfd.ts) and inotify
 * (inotify.ts). Anything else is refused by name.
 */
import { closeSync, openSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { addon } from '../native.js';
import { type EpollTarget, type Fd, FdKind, type Process } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type DumpContext, Unsupported } from './context.js';
import { readLimits } from './limits.js';
import { dumpInotify, restoreInotify } from './inotify.js';
import { dumpSignalfd, restoreSignalfd } from './signalfd.js';
import { dumpTimerfd, restoreTimerfd } from './timerfd.js';
import type { SocketTable } from './sockets.js';

const O_ACCMODE = 3;
const O_WRONLY = 1;
const O_CLOEXEC = 0o2000000;

/** Character devices whose state is only their name. */
const PLAIN_DEVICES = new Set(['/dev/null', '/dev/zero', '/dev/full', '/dev/random', '/dev/urandom', '/dev/tty', '/dev/ptmx', '/dev/console']);
const TTY = /^\/dev\/(pts\/\d+|tty\w*|console)$/;

function fdinfo(pid: number, fd: number): Map<string, string> {
  const out = new Map<string, string>();
  const text = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0 && !out.has(line.slice(0, i))) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  (out as Map<string, string> & { raw?: string }).raw = text;
  return out;
}

function epollTargets(raw: string): EpollTarget[] {
  const out: EpollTarget[] = [];
  for (const m of raw.matchAll(/tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s+data:\s+([0-9a-f]+)/g))
    out.push({ fd: Number(m[1]), events: parseInt(m[2], 16), data: BigInt('0x' + m[3]) });
  return out;
}

function pipeOf(ctx: DumpContext, pid: number, fd: number, ino: bigint, fifoPath: string): number {
  return ctx.pipe(ino, () => {
    const dup = addon().getFd(pid, fd);
    try {
      // A write end can be read through /proc too, but the duplicate we
      // hold has the same access mode as the process's: reopen to read.
      let reader = dup;
      let reopened = -1;
      if ((fdinfoFlags(pid, fd) & O_ACCMODE) === O_WRONLY) {
        try {
          reopened = openSync(`/proc/self/fd/${dup}`, 'r+');
        } catch {
          // A pipe someone else made (inherited from outside, another
          // user's): its data is its outside reader's, and a restore sends
          // this end to the log anyway.
          return { ino, data: Buffer.alloc(0), capacity: addon().pipeCapacity(dup), fifoPath };
        }
        reader = reopened;
      }
      try {
        return { ino, data: addon().peekPipe(reader), capacity: addon().pipeCapacity(reader), fifoPath };
      } finally {
        if (reopened >= 0) closeSync(reopened);
      }
    } finally {
      closeSync(dup);
    }
  });
}

function fdinfoFlags(pid: number, fd: number): number {
  return parseInt(fdinfo(pid, fd).get('flags') ?? '0', 8);
}

export function dumpFds(ctx: DumpContext, pid: number, what: string, sockets: SocketTable): Fd[] {
  const fds: Fd[] = [];
  const numbers = readdirSync(`/proc/${pid}/fd`).map(Number).sort((a, b) => a - b);
  for (const n of numbers) {
    let target: string;
    let info: Map<string, string>;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${n}`);
      info = fdinfo(pid, n);
    } catch {
      continue; // closed meanwhile (impossible while frozen, but cheap to allow)
    }
    if (target === 'anon_inode:[userfaultfd]' && ctx.trackingFds.includes(n)) continue; // appshot's own
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
    const connection = bracket?.[1] === 'socket' ? sockets.connection(BigInt(bracket[2])) : undefined;
    if (bracket && bracket[1] === 'pipe') {
      fd.kind = FdKind.PIPE;
      fd.pipe = pipeOf(ctx, pid, n, BigInt(bracket[2]), '');
    } else if (connection) {
      fd.kind = FdKind.TCP_ESTABLISHED;
      fd.tcp = ctx.tcp.dump(pid, n, BigInt(bracket![2]), connection, what);
    } else if (bracket && bracket[1] === 'socket') {
      fd.kind = FdKind.TCP_LISTEN;
      fd.socket = sockets.describe(pid, n, BigInt(bracket[2]), what);
      if (fd.socket.family === 1) fd.kind = FdKind.UNIX_SOCKET;
    } else if (target === 'anon_inode:[eventfd]') {
      fd.kind = FdKind.EVENTFD;
      fd.eventfdCount = BigInt('0x' + (info.get('eventfd-count') ?? '0'));
      fd.eventfdSemaphore = info.get('eventfd-semaphore') === '1';
    } else if (target === 'anon_inode:[eventpoll]') {
      fd.kind = FdKind.EPOLL;
      fd.epoll = epollTargets((info as Map<string, string> & { raw: string }).raw);
    } else if (target === 'anon_inode:[signalfd]') {
      fd.kind = FdKind.SIGNALFD;
      fd.sigmask = dumpSignalfd(info);
    } else if (target === 'anon_inode:[timerfd]') {
      fd.kind = FdKind.TIMERFD;
      fd.timerfd = dumpTimerfd(info);
    } else if (target === 'anon_inode:inotify') {
      fd.kind = FdKind.INOTIFY;
      fd.inotifyWatches = dumpInotify(pid, (info as Map<string, string> & { raw: string }).raw, `${what} fd ${n}`);
    } else if (target.startsWith('anon_inode:') || bracket) {
      const kind = target.replace(/^anon_inode:/, '').replace(/[[\]]/g, '');
      throw new Unsupported(`${what} fd ${n}: ${kind} cannot be captured yet`);
    } else {
      const st = statSync(`/proc/${pid}/fd/${n}`);
      const deleted = target.endsWith(' (deleted)');
      if (st.isFIFO()) {
        fd.kind = FdKind.FIFO;
        fd.pipe = pipeOf(ctx, pid, n, BigInt(st.ino), target);
      } else if (st.isCharacterDevice()) {
        fd.kind = FdKind.DEVICE;
        fd.tty = TTY.test(target);
        if (!PLAIN_DEVICES.has(target) && !fd.tty) throw new Unsupported(`${what} fd ${n}: device ${target} cannot be captured yet`);
      } else if (st.isFile() || st.isDirectory()) {
        if (deleted && target.startsWith('/memfd:')) refuseSealedMemfd(pid, n, `${what} fd ${n}`);
        fd.file = ctx.file(target.replace(/ \(deleted\)$/, ''), `/proc/${pid}/fd/${n}`, deleted);
        if (deleted) saveDeletedContents(ctx, pid, n, fd.file);
      } else {
        throw new Unsupported(`${what} fd ${n}: ${target} (a ${st.isSocket() ? 'socket' : st.isBlockDevice() ? 'block device' : 'special file'}) cannot be captured yet`);
      }
    }
    fds.push(fd);
  }
  return fds;
}

/** A memfd comes back as a deleted file with its contents, which takes no
 * seals: one that holds seals (F_ADD_SEALS) would silently lose them. */
function refuseSealedMemfd(pid: number, fd: number, where: string): void {
  const dup = addon().getFd(pid, fd);
  try {
    const seals = addon().fileSeals(dup);
    if (seals > 0) throw new Unsupported(`${where}: a memfd with seals (F_ADD_SEALS 0x${seals.toString(16)}) cannot be captured yet`);
  } finally {
    closeSync(dup);
  }
}

/** A deleted file lives only as long as its last descriptor: the image
 * keeps its bytes. */
function saveDeletedContents(ctx: DumpContext, pid: number, fd: number, index: number): void {
  const id = ctx.image.files[index];
  if (id.contents) return;
  const f = openSync(`/proc/${pid}/fd/${fd}`, 'r');
  try {
    const { offset, runs } = ctx.pages.appendFd(f, Number(id.size));
    id.contents = { offset: BigInt(offset), runs: Array.from(runs), fromParent: [] };
  } finally {
    closeSync(f);
  }
}

/* ---- restore ---------------------------------------------------------- */

/** Descriptions the driver makes in its own process and hands over. */
export interface FileSources {
  /** A descriptor of this process for image fd `fd` of process `p`. */
  open(p: Process, fd: Fd): number;
  /** Gives `fd` of this process to the remote one; its number there. */
  transfer(r: RemoteProcess, fd: number): number;
}

/** Descriptors whose state lives in the process that made them (a
 * signalfd reads its reader's signals; timers and watches are charged to
 * their owner): made by system calls run inside the restored process. */
const MADE_INSIDE: Partial<Record<number, (r: RemoteProcess, fd: Fd) => number>> = {
  [FdKind.SIGNALFD]: restoreSignalfd,
  [FdKind.TIMERFD]: restoreTimerfd,
  [FdKind.INOTIFY]: restoreInotify,
};

const F_SETFD = 2;
const EPOLL_CTL_ADD = 1;
const EPOLL_CLOEXEC = 0o2000000;

/** Every descriptor at its number, with its offset, flags and
 * close-on-exec bit; epoll sets last, once their targets are in place. */
export function restoreFds(r: RemoteProcess, p: Process, src: FileSources): void {
  r.call('closing the seed\'s descriptors', SYS.close_range, [0, 0xffffffff, 0]);
  const restoreLimit = allowNumbersUpTo(r, Math.max(-1, ...p.fds.map((f) => f.fd)));
  const place = (got: number, fd: Fd) => {
    if (got !== fd.fd) {
      r.call(`placing fd ${fd.fd}`, SYS.dup3, [got, fd.fd, fd.cloexec ? EPOLL_CLOEXEC : 0]);
      r.call('closing', SYS.close, [got]);
    } else if (!fd.cloexec) {
      r.call(`clearing close-on-exec of fd ${fd.fd}`, SYS.fcntl, [fd.fd, F_SETFD, 0]);
    }
  };
  for (const fd of p.fds) {
    if (fd.kind === FdKind.EPOLL) continue;
    // Kinds made inside the process; the rest here, handed over.
    const makeInside = MADE_INSIDE[fd.kind];
    if (makeInside) place(makeInside(r, fd), fd);
    else place(src.transfer(r, src.open(p, fd)), fd);
  }
  for (const fd of p.fds) {
    if (fd.kind !== FdKind.EPOLL) continue;
    const ep = Number(r.call('epoll_create1', SYS.epoll_create1, [EPOLL_CLOEXEC]));
    for (const t of fd.epoll) {
      r.reset();
      const ev = Buffer.alloc(12);
      ev.writeUInt32LE(t.events, 0);
      ev.writeBigUInt64LE(t.data, 4);
      r.call(`adding fd ${t.fd} to epoll fd ${fd.fd}`, SYS.epoll_ctl, [ep, EPOLL_CTL_ADD, t.fd, r.put(ev)]);
    }
    place(ep, fd);
  }
  restoreLimit();
}

const RLIMIT_NOFILE = 7;

/** A process may hold descriptors at or above its soft RLIMIT_NOFILE (it
 * lowered the limit after opening them; the preload library's descriptor
 * of the table file sits at 1000 in a program that set 777), but dup3
 * refuses such numbers: the soft limit is raised to the hard one while the
 * descriptors are placed. Returns what sets it back. */
function allowNumbersUpTo(r: RemoteProcess, highest: number): () => void {
  const { cur: soft, max: hard } = readLimits(r.pid).find((l) => l.resource === RLIMIT_NOFILE)!;
  if (BigInt(highest) < soft) return () => {};
  const set = (cur: bigint) => {
    r.reset();
    r.call('setting RLIMIT_NOFILE', SYS.prlimit64, [0, RLIMIT_NOFILE, r.put(r.u64s([cur, hard])), 0]);
  };
  set(hard);
  return () => set(soft);
}

/**
 * Marks descriptors that are one open file description (a file opened
 * before a fork, a dup'd descriptor): kcmp(KCMP_FILE) asks the kernel,
 * among descriptors of the same file. They get one description number,
 * and a restore makes them one description again, sharing its offset.
 * Pipes and sockets are shared by their inode already.
 */
export function markSharedDescriptions(procs: { pid: number; fds: Fd[] }[]): void {
  const groups = new Map<string, { pid: number; fd: Fd }[]>();
  for (const p of procs)
    for (const fd of p.fds) {
      if (fd.kind !== FdKind.FILE && fd.kind !== FdKind.DEVICE && fd.kind !== FdKind.EVENTFD) continue;
      const key = `${fd.kind}:${fd.file}:${fd.path}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key)!.push({ pid: p.pid, fd });
    }
  let next = 1;
  for (const members of groups.values()) {
    if (members.length < 2) continue;
    for (let i = 0; i < members.length; i++) {
      if (members[i].fd.description) continue;
      for (let j = i + 1; j < members.length; j++) {
        if (members[j].fd.description) continue;
        if (addon().sameDescription(members[i].pid, members[i].fd.fd, members[j].pid, members[j].fd.fd)) {
          members[i].fd.description ||= next++;
          members[j].fd.description = members[i].fd.description;
        }
      }
    }
  }
}
