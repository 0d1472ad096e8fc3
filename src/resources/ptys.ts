/**
 * Pseudoterminals inside the application: a pair whose master (/dev/ptmx)
 * the application holds, with its slave's termios settings, window size,
 * lock and packet mode, the bytes queued each way, and, for the processes
 * whose controlling terminal it is, that and its foreground process group.
 * A terminal whose master is outside the application (the user's) is
 * devices.ts's, as before: it does not travel.
 *
 * Dump (after every process's descriptors are read, so that a slave is
 * known to be the application's by its master): the queued bytes cannot
 * be peeked, so they are read (the slave switched to non-canonical mode
 * for a moment, which makes an unfinished line readable too) and written
 * back at once, as the restore writes them into a new pair: output with
 * output processing off, input with echo, signals and input mapping off,
 * and canonical mode as it was, so that complete lines and an unfinished
 * one are what they were.
 *
 * Restore: a new pair (its /dev/pts number is the kernel's choice: a
 * program that kept ptsname's answer finds another number there), made in
 * appshot's process and handed over. A session leader takes its terminal
 * right after its setsid, before its children are forked, so that they
 * inherit it; its foreground group is set once every group is made.
 * Exclusive mode (TIOCEXCL) last of all, once every process has every
 * descriptor of the pair it had (restoreExclusiveModes): from then on an
 * open of the slave is refused (EBUSY) to anyone without CAP_SYS_ADMIN,
 * an ordinary user's restore too.
 */
import { closeSync, constants as fs, openSync, readFileSync, readSync } from 'node:fs';
import { procText } from '../procfs.js';
import { AppshotError } from '../errors.js';
import { addon } from '../native.js';
import { type Fd, FdKind, type Image, type Process, type PtyPair } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type DumpContext, nameProcess, type RestoreContext, Unsupported, writeWhatFits } from './context.js';

const TCGETS = 0x5401;
const TCSETS = 0x5402;
const TIOCSCTTY = 0x540e;
const TIOCSPGRP = 0x5410;
const TIOCGWINSZ = 0x5413;
const TIOCSWINSZ = 0x5414;
const FIONREAD = 0x541b;
const TIOCPKT = 0x5420;
const TIOCGPTN = 0x80045430;
const TIOCSPTLCK = 0x40045431;
const TIOCGPKT = 0x80045438;
const TIOCGPTLCK = 0x80045439;
const TIOCGEXCL = 0x80045440;
const TIOCEXCL = 0x540c;
const TIOCGDEV = 0x80045432;
const O_ACCMODE = 3;

const TERMIOS_BYTES = 36;
const WINSIZE_BYTES = 8;
const PTS_MAJOR_FIRST = 136; // Unix98 pty slaves: majors 136-143
const MASTER = /^\/dev\/(pts\/)?ptmx$/;
const SLAVE = /^\/dev\/pts\/(\d+)$/;

// termios flags (asm-generic/termbits.h)
const IFLAG_MAPPING = 0o40 /* ISTRIP */ | 0o100 /* INLCR */ | 0o200 /* IGNCR */ | 0o400 /* ICRNL */ | 0o1000 /* IUCLC */ | 0o2000 /* IXON */;
const OPOST = 1;
const ICANON = 2;
const LFLAG_QUIET = 1 /* ISIG */ | 0o10 /* ECHO */ | 0o20 /* ECHOE */ | 0o40 /* ECHOK */ | 0o100 /* ECHONL */ | 0o100000 /* IEXTEN */;
const VTIME = 17 + 5;
const VMIN = 17 + 6;

/** Whether a device path is a pty master (devices.ts lets it through). */
export function isPtyMaster(path: string): boolean {
  return MASTER.test(path);
}

const int = () => Buffer.alloc(4);
const one = () => {
  const b = int();
  b.writeInt32LE(1, 0);
  return b;
};

function ioctlInt(fd: number, request: number): number {
  const b = int();
  addon().ioctl(fd, request, b);
  return b.readInt32LE(0);
}

/** Everything queued to be read on `fd` (a tty in non-canonical mode, or
 * a master), read. */
function readQueued(fd: number): Buffer {
  const n = ioctlInt(fd, FIONREAD);
  if (n <= 0) return Buffer.alloc(0);
  const buf = Buffer.alloc(n);
  let got = 0;
  while (got < n) {
    const r = readSync(fd, buf, got, n - got, null);
    if (r <= 0) break;
    got += r;
  }
  return buf.subarray(0, got);
}

/** Waits, up to PTY_SETTLE_MS, until `fd` has `n` bytes or more to read. */
function queuedAtLeast(fd: number, n: number): void {
  if (n <= 0) return;
  const until = Date.now() + PTY_SETTLE_MS;
  while (ioctlInt(fd, FIONREAD) < n && Date.now() < until) Atomics.wait(settleClock, 0, 0, 1);
}
const PTY_SETTLE_MS = 500;
const settleClock = new Int32Array(new SharedArrayBuffer(4));

/** Writes `bytes` into one end of a pty of ours without ever blocking: a
 * terminal takes some tens of KiB unread, and an image may say more; a
 * write that waited would hang the restorer (the resident engine, and
 * every command of its user: found by review). What does not fit is
 * refused in one line. */
function writeAll(fd: number, bytes: Buffer, what: string): void {
  // As the description had them after (at a snapshot it is the
  // application's own: fdinfo of our descriptor of it tells).
  const flags = parseInt(/^flags:\s*([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'latin1'))?.[1] ?? '2', 8) & ~0o2000000;
  addon().setStatusFlags(fd, flags | O_NONBLOCK);
  try {
    const done = writeWhatFits(fd, bytes);
    if (done < bytes.length) throw new AppshotError(`a terminal's ${bytes.length} bytes of ${what} do not fit in a terminal here (${done} did)`);
  } finally {
    addon().setStatusFlags(fd, flags);
  }
}
const O_NONBLOCK = 0o4000;

/** Writes `input` (for the slave's reader) and `output` (for the master's)
 * into a pair whose slave has `termios`, processed as they were already. */
function refill(master: number, slave: number, termios: Buffer, input: Buffer, output: Buffer): void {
  if (!input.length && !output.length) return;
  const quiet = Buffer.from(termios);
  quiet.writeUInt32LE(quiet.readUInt32LE(0) & ~IFLAG_MAPPING, 0);
  quiet.writeUInt32LE(quiet.readUInt32LE(4) & ~OPOST, 4);
  quiet.writeUInt32LE(quiet.readUInt32LE(12) & ~LFLAG_QUIET, 12);
  addon().ioctl(slave, TCSETS, quiet);
  try {
    if (output.length) writeAll(slave, output, 'output');
    if (input.length) writeAll(master, input, 'input');
    // What one end writes reaches the other's line discipline later, from
    // a kernel worker (the tty's flip buffer): until it has, the reader
    // finds nothing queued (a restored reader that looked at once saw 0 of
    // its 6 bytes), and the bytes would be taken in under the settings put
    // back below, not the quiet ones. Each end waits for them, a bounded
    // while (a canonical reader's unfinished line is not counted).
    queuedAtLeast(master, output.length);
    queuedAtLeast(slave, input.length);
  } finally {
    addon().ioctl(slave, TCSETS, Buffer.from(termios));
  }
}

/** The controlling terminal (device number) and its foreground group
 * (system PID) of a process, from /proc/PID/stat (fields 7 and 8). */
function controllingTerminal(pid: number): { dev: number; tpgid: number } {
  const text = procText(`/proc/${pid}/stat`);
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { dev: Number(f[4]), tpgid: Number(f[5]) };
}

/** The /dev/pts number of the terminal a process's /dev/tty descriptor
 * was opened as, asked of a copy of it (TIOCGDEV); undefined where it is
 * no pty slave, or hung up (its terminal gone: every request fails). */
function ttyIndex(pid: number, fd: number): number | undefined {
  const copy = addon().getFd(pid, fd);
  try {
    return ptsIndex(ioctlInt(copy, TIOCGDEV));
  } catch {
    return undefined;
  } finally {
    closeSync(copy);
  }
}

function ptsIndex(dev: number): number | undefined {
  const major = (dev >> 8) & 0xfff;
  const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
  return major >= PTS_MAJOR_FIRST && major < PTS_MAJOR_FIRST + 8 ? (major - PTS_MAJOR_FIRST) * 256 + minor : undefined;
}

/**
 * Once every process's descriptors are read: the pairs whose master the
 * application holds, each read once; their descriptors (read as devices)
 * become PTY ends, and each process whose controlling terminal one is
 * records it. A slave whose master is elsewhere stays a terminal that does
 * not travel.
 */
export function dumpPtys(ctx: DumpContext): void {
  const image = ctx.image;
  const pairs: PtyPair[] = [];
  const byIndex = new Map<number, number>();
  const held = (p: Process, fd: Fd) => `${nameProcess(p.vpid, p.comm)} fd ${fd.fd}`;
  const dup = (p: Process, fd: Fd) => addon().getFd(p.pid, fd.fd);
  // Which slave each descriptor of one is: its /dev/pts number, or, for
  // /dev/tty held open, the terminal it was opened as (the kernel's
  // TIOCGDEV of a copy: exact, where the process's controlling terminal
  // now may be another or none).
  const slaveOf = new Map<Fd, number>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      if (fd.kind !== FdKind.DEVICE) continue;
      const index = fd.path === '/dev/tty' ? ttyIndex(p.pid, fd.fd) : SLAVE.exec(fd.path)?.[1];
      if (index !== undefined) slaveOf.set(fd, Number(index));
    }
  // A descriptor of the application's for each slave it holds, one open
  // for reading and writing first: a copy of it (pidfd_getfd) is how the
  // slave is read, never a new open, which exclusive mode refuses. A
  // slave held only as /dev/tty is read through that (a copy of it is the
  // slave's own file).
  const slavesHeld = new Map<number, { pid: number; fd: number; readWrite: boolean }>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      const index = slaveOf.get(fd);
      if (index === undefined) continue;
      const readWrite = (fd.flags & O_ACCMODE) === fs.O_RDWR;
      if (!slavesHeld.get(index)?.readWrite) slavesHeld.set(index, { pid: p.pid, fd: fd.fd, readWrite });
    }
  // Masters first: they say which pairs are the application's.
  for (const p of image.processes)
    for (const fd of p.fds) {
      if (fd.kind !== FdKind.DEVICE || !isPtyMaster(fd.path)) continue;
      const master = dup(p, fd);
      try {
        const index = ioctlInt(master, TIOCGPTN);
        let i = byIndex.get(index);
        if (i === undefined) {
          i = pairs.length;
          byIndex.set(index, i);
          pairs.push(readPair(master, index, slavesHeld.get(index), held(p, fd)));
        }
        fd.kind = FdKind.PTY;
        fd.tty = false;
        fd.pty = { pair: i, master: true };
      } finally {
        closeSync(master);
      }
    }
  // No pair is the application's: nothing below to mark, and no process's
  // stat to read again in the frozen window.
  if (!pairs.length) return;
  for (const p of image.processes) {
    // /dev/tty held open too: the new slave (its device number is the
    // slave's, not /dev/tty's 5:0).
    for (const fd of p.fds) {
      const pair = fd.kind === FdKind.DEVICE ? byIndex.get(slaveOf.get(fd) ?? -1) : undefined;
      if (pair === undefined) continue;
      fd.kind = FdKind.PTY;
      fd.tty = false;
      fd.pty = { pair, master: false };
    }
    const { dev, tpgid } = controllingTerminal(p.pid);
    const index = ptsIndex(dev);
    const pair = index === undefined ? undefined : byIndex.get(index);
    if (pair === undefined) continue;
    if (!image.processes.some((q) => q.vpid === p.vsid))
      throw new Unsupported(`${nameProcess(p.vpid, p.comm)}: its controlling terminal /dev/pts/${index} is the application's, but its session's leader is not: cannot be made again`);
    p.ctty = pair + 1;
    if (tpgid > 0) pairs[pair].foreground = ctx.virtual('pid', tpgid);
  }
  if (pairs.length) image.ptys = pairs;
}

/** A pair's settings and queued bytes, the bytes put back at once;
 * `slaveHeld`: a descriptor of the slave the application holds. */
function readPair(master: number, index: number, slaveHeld: { pid: number; fd: number; readWrite: boolean } | undefined, where: string): PtyPair {
  const termios = Buffer.alloc(TERMIOS_BYTES);
  const winsize = Buffer.alloc(WINSIZE_BYTES);
  // On a master, the termios requests act on its slave.
  addon().ioctl(master, TCGETS, termios);
  addon().ioctl(master, TIOCGWINSZ, winsize);
  const pair: PtyPair = {
    index,
    termios,
    winsize,
    input: Buffer.alloc(0),
    output: Buffer.alloc(0),
    locked: ioctlInt(master, TIOCGPTLCK) !== 0,
    packet: ioctlInt(master, TIOCGPKT) !== 0,
    foreground: 0,
  };
  if (pair.packet) throw new Unsupported(`${where}: a pty master in packet mode (TIOCPKT) cannot be captured yet`);
  // Exclusive mode (TIOCEXCL), each side its own flag: on the slave, no
  // more opens of it but by CAP_SYS_ADMIN (a master is never opened
  // again: /dev/ptmx makes a new pair). Asked of a copy of the
  // application's descriptor. A slave nobody holds is not asked (opening
  // it to ask would change the pair: its last close hangs the master up).
  pair.masterExclusive = ioctlInt(master, TIOCGEXCL) !== 0;
  const held = slaveHeld ? addon().getFd(slaveHeld.pid, slaveHeld.fd) : -1;
  let own = -1;
  try {
    pair.slaveExclusive = held >= 0 && ioctlInt(held, TIOCGEXCL) !== 0;
    if (pair.locked) return pair; // no slave opened yet: nothing queued to read
    // The slave's input queue, read only when the application holds the
    // slave (the last close of a slave hangs its master up): through that
    // copy where it reads and writes, else through an open of our own,
    // which exclusive mode refuses to a snapshot without CAP_SYS_ADMIN.
    if (held >= 0 && !slaveHeld!.readWrite) {
      try {
        own = openSync(`/dev/pts/${index}`, fs.O_RDWR | fs.O_NOCTTY);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EBUSY') throw e;
        throw new Unsupported(`${where}: a pty in exclusive mode (TIOCEXCL) whose slave the application holds only for reading or only for writing, which cannot be read without opening it again: cannot be captured yet`);
      }
    }
    readQueues(master, own >= 0 ? own : held, pair, where);
  } finally {
    if (own >= 0) closeSync(own);
    if (held >= 0) closeSync(held);
  }
  return pair;
}

/** The bytes queued each way, read and put back (`slave`: a descriptor of
 * the slave that reads and writes; -1 where the application holds none). */
function readQueues(master: number, slave: number, pair: PtyPair, where: string): void {
  pair.output = readQueued(master);
  if (slave >= 0) {
    const raw = Buffer.from(pair.termios);
    raw.writeUInt32LE(raw.readUInt32LE(12) & ~ICANON, 12);
    raw[VMIN] = 0;
    raw[VTIME] = 0;
    addon().ioctl(slave, TCSETS, raw);
    try {
      pair.input = readQueued(slave);
    } finally {
      addon().ioctl(slave, TCSETS, Buffer.from(pair.termios));
    }
    refill(master, slave, pair.termios, pair.input, pair.output);
  } else if (pair.output.length) {
    throw new Unsupported(`${where}: ${pair.output.length} bytes queued on a pty master whose slave nobody holds cannot be captured yet`);
  }
}

/* ---- restore ---------------------------------------------------------- */

interface MadePair {
  master: number;
  /** Our own descriptor of the slave, open until the restore ends. */
  slave: number;
  index: number;
}

/** The new pair for the image's pair `i`, made once: settings, window
 * size, queued bytes, lock and packet mode as they were. */
function madePair(h: RestoreContext, i: number): MadePair {
  return h.once(`pty ${i}`, () => {
    const pair = h.image.ptys?.[i];
    if (!pair) throw new AppshotError(`corrupt image: pty ${i} is not in it`);
    const master = h.keep(openSync('/dev/ptmx', fs.O_RDWR | fs.O_NOCTTY));
    addon().ioctl(master, TIOCSPTLCK, Buffer.alloc(4));
    const index = ioctlInt(master, TIOCGPTN);
    const slave = h.keep(openSync(`/dev/pts/${index}`, fs.O_RDWR | fs.O_NOCTTY));
    addon().ioctl(slave, TCSETS, Buffer.from(pair.termios));
    addon().ioctl(master, TIOCSWINSZ, Buffer.from(pair.winsize));
    refill(master, slave, pair.termios, pair.input, pair.output);
    if (pair.packet) addon().ioctl(master, TIOCPKT, one());
    if (pair.locked) addon().ioctl(master, TIOCSPTLCK, one());
    return { master, slave, index };
  });
}

/**
 * Exclusive mode where the image's pair had it, on each side as it was:
 * once every process of the restore holds every descriptor of the pair it
 * had (their slaves, the controlling terminals taken, the foreground
 * groups set: each a new open of the slave), for after TIOCEXCL the
 * kernel refuses a further open of the slave (EBUSY) to a caller without
 * CAP_SYS_ADMIN, which an ordinary user's restore is. Set through our own
 * descriptors of the new pair (the flag is the terminal's, whoever set
 * it). A clone's pair is its own, made and set by its own restore.
 */
export function restoreExclusiveModes(h: RestoreContext): void {
  (h.image.ptys ?? []).forEach((pair, i) => {
    if (!pair.masterExclusive && !pair.slaveExclusive) return;
    const made = madePair(h, i);
    if (pair.masterExclusive) addon().ioctl(made.master, TIOCEXCL, 0);
    if (pair.slaveExclusive) addon().ioctl(made.slave, TIOCEXCL, 0);
  });
}

/** Our descriptor for a PTY end: the master (one open description), or a
 * new open of the new slave (one per description the image recorded). */
export function openPtyEnd(h: RestoreContext, _p: Process, fd: Fd): number {
  const made = madePair(h, fd.pty!.pair);
  let got: number;
  if (fd.pty!.master) got = made.master;
  else got = h.keep(openSync(`/dev/pts/${made.index}`, (fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC)) | fs.O_NOCTTY));
  addon().setStatusFlags(got, fd.flags);
  return got;
}

/** A session leader takes its controlling terminal back: right after its
 * setsid, before it forks the rest of its session, which inherit it. */
export function takeTerminal(r: RemoteProcess, h: RestoreContext, p: Process): void {
  if (!p.ctty) return;
  const made = madePair(h, p.ctty - 1);
  const slave = h.keep(openSync(`/dev/pts/${made.index}`, fs.O_RDWR | fs.O_NOCTTY));
  const there = h.transfer(r, slave);
  try {
    r.call('taking its controlling terminal (TIOCSCTTY)', SYS.ioctl, [there, TIOCSCTTY, 0]);
  } finally {
    r.call('closing', SYS.close, [there]);
  }
}

/** A session leader's terminal gets its foreground process group back,
 * once every group is made (`systemGroup`: a virtual PGID's system one).
 * Asked by the leader itself (TIOCSPGRP wants the caller's own terminal),
 * with every signal blocked, so that SIGTTOU does not stop it. */
export function restoreForeground(r: RemoteProcess, h: RestoreContext, p: Process, systemGroup: (vpgid: number) => number | undefined): void {
  if (!p.ctty || p.vsid !== p.vpid) return;
  const pair = h.image.ptys?.[p.ctty - 1];
  const group = pair?.foreground ? systemGroup(pair.foreground) : undefined;
  if (group === undefined) return;
  const made = madePair(h, p.ctty - 1);
  const there = h.transfer(r, h.keep(openSync(`/dev/pts/${made.index}`, fs.O_RDWR | fs.O_NOCTTY)));
  try {
    r.reset();
    const b = int();
    b.writeInt32LE(group, 0);
    r.call(`setting the foreground process group of its terminal to ${pair!.foreground}`, SYS.ioctl, [there, TIOCSPGRP, r.put(b)]);
  } finally {
    r.call('closing', SYS.close, [there]);
  }
}

/** The most pseudoterminal pairs an image may hold: each is a pair made
 * by the restore (two descriptors of ours, and one of the machine's
 * kernel.pty.max, 4096 by default, for the whole machine), more than an
 * application holds (a tmux server with a thousand panes). */
export const MAX_PTYS = 1024;

/** Why the image's pseudoterminals cannot be made, or undefined: too
 * many, or one that no descriptor and no controlling terminal names. A
 * snapshot records a pair only for a master some process holds, so an
 * unreferenced one is written by hand, and would cost a pair made for
 * nothing (restoreExclusiveModes makes every exclusive one). */
export function ptysRecordFault(image: Image): string | undefined {
  const ptys = image.ptys ?? [];
  if (ptys.length > MAX_PTYS) return `it holds ${ptys.length} pseudoterminals (at most ${MAX_PTYS})`;
  if (!ptys.length) return undefined;
  const named = new Set<number>();
  for (const p of image.processes) {
    if (p.ctty) named.add(p.ctty - 1);
    for (const fd of p.fds) if (fd.kind === FdKind.PTY && fd.pty) named.add(fd.pty.pair);
  }
  const unnamed = ptys.findIndex((_, i) => !named.has(i));
  return unnamed < 0 ? undefined : `pty ${unnamed} is held by no descriptor and is no process's terminal`;
}
