/**
 * Pipes and FIFOs: both ends, with the data in flight (copied without
 * consuming it) and the pipe's capacity. A FIFO is a pipe with a path: it
 * is reopened by that path. Each open file description of a pipe comes
 * back with exactly its status flags (O_NONBLOCK, O_APPEND) and access
 * mode, a FIFO opened O_RDWR too. A write end whose reader was outside the
 * application writes to the application's log (see openPipeEnd).
 */
import { type BigIntStats, closeSync, constants as fs, existsSync, fstatSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { AppshotError } from '../errors.js';
import { type Fd, FdKind, type Pipe, type Process } from '../image/types.js';
import { addon } from '../native.js';
import { type DumpContext, type RestoreContext } from './context.js';
import { fsIdentity, identitiesFor, refusal, refusedAsProcess, reopenHeld } from './fsident.js';
import { isOwnSnapshot } from '../image/format.js';
import { refuseOutsideApplication } from './procpaths.js';

const O_ACCMODE = 3;
const O_DIRECT = 0o40000;
const DELETED = ' (deleted)';

/* ---- dump ------------------------------------------------------------- */

/** The image's pipe for `fd` of `pid` (inode `ino`), recorded the first
 * time one of its ends is seen; `flags` are the descriptor's status flags.
 * Data written in packet mode (O_DIRECT; the ends may have left it since)
 * is recorded with the length of each packet. (Bytes written outside
 * packet mode just before a last packet cannot be told from it, and come
 * back as part of it.) */
export function dumpPipe(ctx: DumpContext, pid: number, fd: number, ino: bigint, fifoPath: string, flags: number, where: string, named?: { st: BigIntStats; deleted: boolean }): number {
  const writeEnd = (flags & O_ACCMODE) === fs.O_WRONLY;
  const fifo = named?.st;
  // A named FIFO's identity, with `ino` (its stat): the very FIFO, for a
  // restore that opens it though its process's credentials no longer do
  // (fsident.ts reopenHeld). Not a removed one's: it is made anew. Which
  // it is, the caller decided once (files.ts, deleted.ts shownLinkFile:
  // the FIFO says, not its name's end; one still there may be named
  // "... (deleted)", and its identity tells the restore so, makePipe).
  const held = named && fifoPath && !named.deleted ? { fifoDev: named.st.dev, ...(named.st.birthtimeNs > 0n ? { fifoBtimeNs: named.st.birthtimeNs } : {}) } : {};
  return ctx.pipe(fifo ? `${fifo.dev}:${ino}` : `pipefs:${ino}`, () => {
    const dup = addon().getFd(pid, fd);
    try {
      // A write end can be read through /proc too, but the duplicate we
      // hold has the same access mode as the process's: reopen to read.
      let reader = dup;
      let reopened = -1;
      if (writeEnd) {
        try {
          reopened = openSync(`/proc/self/fd/${dup}`, 'r+');
        } catch {
          // A pipe someone else made (inherited from outside, another
          // user's): its data is its outside reader's, and a restore sends
          // this end to the log anyway.
          return { ino, data: Buffer.alloc(0), capacity: addon().pipeCapacity(dup), fifoPath, ...held };
        }
        reader = reopened;
      }
      try {
        const data = addon().peekPipe(reader);
        return { ino, data, capacity: addon().pipeCapacity(reader), fifoPath, ...held, ...(data.packets ? { packets: data.packets } : {}) };
      } finally {
        if (reopened >= 0) closeSync(reopened);
      }
    } finally {
      closeSync(dup);
    }
  });
}

/* ---- restore ---------------------------------------------------------- */

/** The pipe of one image index, made once: its anchor descriptors, which
 * the first open file description of each end becomes (a pipe end that
 * pipe() made has no O_LARGEFILE, one opened by path has). */
interface MadePipe {
  read: number;
  write: number;
  /** A FIFO's anchor: one O_RDWR description, which opens do not take. */
  fifo: boolean;
  readTaken: boolean;
  writeTaken: boolean;
}

/** Our descriptor for one open file description of a pipe or FIFO (the
 * driver asks once per description): the pipe made (and refilled) the
 * first time any of its descriptions is asked for, then this description
 * with exactly the status flags it had. */
export function openPipeEnd(h: RestoreContext, _p: Process, fd: Fd): number {
  const index = fd.pipe;
  const pipe = h.image.pipes[index];
  const mode = fd.flags & O_ACCMODE;
  const users = h.image.processes.flatMap((p) => p.fds.filter((f) => (f.kind === FdKind.PIPE || f.kind === FdKind.FIFO) && f.pipe === index));
  const reads = (f: Fd) => (f.flags & O_ACCMODE) !== fs.O_WRONLY;
  // A pipe whose reader was outside the application (the terminal's shell,
  // a test harness) has no one there any more: its writers write to the
  // application's log. A reader whose writers were outside, or closed,
  // gets the pipe with what was in flight and no writer (end of file once
  // read), as it would have.
  if (mode === fs.O_WRONLY && !users.some(reads)) return h.log();
  const made = h.once(`pipe ${index}`, () => makePipe(h, pipe, index));
  const plain = fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC);
  let end: number;
  if (!made.fifo && mode === fs.O_RDONLY && !made.readTaken) {
    made.readTaken = true;
    end = made.read;
  } else if (!made.fifo && mode === fs.O_WRONLY && !made.writeTaken) {
    made.writeTaken = true;
    end = made.write;
  } else {
    // Another description of the pipe (a FIFO's every open; a pipe end
    // reopened through /proc): opened anew. Never blocking: the anchors
    // are its reader and writer.
    end = h.keep(openSync(`/proc/self/fd/${mode === fs.O_WRONLY ? made.write : made.read}`, plain | fs.O_NONBLOCK));
  }
  addon().setStatusFlags(end, fd.flags);
  return end;
}

/** A FIFO whose path was removed while open: one made beside where it was
 * (or in the temporary directory), opened, and removed again: a FIFO with
 * no name, as it was (not a pipe, which fstat and /proc tell apart). */
function removedFifo(path: string): number {
  const dir = mkdtempSync(join(existsSync(dirname(path)) ? dirname(path) : tmpdir(), '.appshot-fifo-'));
  const at = join(dir, 'fifo');
  try {
    addon().mkfifo(at, 0o600);
    return openSync(at, fs.O_RDWR | fs.O_NONBLOCK);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A named FIFO, opened O_RDWR (never blocking) as its first holder would
 * open it (fsident.ts), or as any other process of the application; a
 * FIFO it opened as root before it dropped its privileges (in a directory
 * only root may enter), from an image of our own snapshot, is opened
 * again though none of them may: the very FIFO, by device, inode and
 * birth time, reached with no symlink on the way (reopenHeld).
 * Anything else refused is refused in one line naming the holder.
 */
function openFifo(h: RestoreContext, pipe: Pipe, index: number): number {
  const holder = h.image.processes.find((p) => p.fds.some((f) => (f.kind === FdKind.PIPE || f.kind === FdKind.FIFO) && f.pipe === index));
  const flags = fs.O_RDWR | fs.O_NONBLOCK;
  try {
    return addon().openAs(pipe.fifoPath, flags, 0, identitiesFor(h.image, holder));
  } catch (e) {
    const held = pipe.fifoDev === undefined ? undefined : { dev: pipe.fifoDev, ino: pipe.ino, mode: fs.S_IFIFO, deleted: false, btimeNs: pipe.fifoBtimeNs };
    const got = refusal(e) ? reopenHeld(held, isOwnSnapshot(h.image), pipe.fifoPath, flags) : undefined;
    if (got !== undefined) return got;
    refusedAsProcess(e, `${holder ? `process ${holder.vpid}: ` : ''}the named FIFO ${pipe.fifoPath}`, holder && fsIdentity(holder));
  }
}

function makePipe(h: RestoreContext, pipe: Pipe, index: number): MadePipe {
  let made: MadePipe;
  if (pipe.fifoPath) {
    // Removed: its name shows the kernel's suffix, and no identity was
    // recorded (one still there, whatever its name, has its device).
    const removed = pipe.fifoPath.endsWith(DELETED) && pipe.fifoDev === undefined;
    const rw = h.keep(removed ? removedFifo(pipe.fifoPath.slice(0, -DELETED.length)) : openFifo(h, pipe, index));
    // Not another process's pipe, reached through its /proc/PID/fd/N
    // (which fstat calls a FIFO too), nor a /proc file.
    if (!removed) refuseOutsideApplication(rw, pipe.fifoPath, `pipe ${index}`);
    // A FIFO, not whatever else was put at its name since (a file, a device).
    if (!fstatSync(rw).isFIFO()) throw new AppshotError(`the named FIFO ${pipe.fifoPath} is not a FIFO here`);
    // Bytes in it now: another process has it open (a FIFO's data goes
    // with its last descriptor), such as the original of a copy restored
    // beside it. Refused before anything is written or resized: the
    // image's bytes would mix with its, in its FIFO.
    const there = addon().bytesToRead(rw);
    if (there > 0 && pipe.data.length > 0) throw new AppshotError(`the named FIFO ${pipe.fifoPath} holds ${there} bytes here already: another process has it open (the original, still running?), so its own ${pipe.data.length} bytes in flight cannot be put back`);
    made = { read: rw, write: rw, fifo: true, readTaken: false, writeTaken: false };
  } else {
    const [r, w] = addon().pipe();
    // Made here: given the owner it had (files.ts restoreInodeOwner).
    h.ownerAfter.add(r).add(w);
    made = { read: h.keep(r), write: h.keep(w), fifo: false, readTaken: false, writeTaken: false };
  }
  // The capacity first: more than the default 64 KiB may be in flight.
  if (pipe.capacity) addon().pipeCapacity(made.write, Math.max(pipe.capacity, pipe.data.length));
  if (pipe.data.length) {
    // Through a non-blocking writer of our own: data that does not fit is
    // an error, not a hang.
    // Packets are written one by one in packet mode, each one write.
    const packets = pipe.packets ?? [];
    const filler = openSync(`/proc/self/fd/${made.write}`, fs.O_WRONLY | fs.O_NONBLOCK);
    try {
      // (open refuses O_DIRECT on a pipe; F_SETFL takes it)
      if (packets.length) addon().setStatusFlags(filler, fs.O_WRONLY | fs.O_NONBLOCK | O_DIRECT);
      let done = 0;
      for (const n of packets) {
        let wrote = 0;
        try {
          wrote = writeSync(filler, pipe.data, done, n);
        } catch {
          wrote = 0;
        }
        if (wrote !== n) throw new AppshotError(`pipe ${index}: its packet of ${n} bytes does not fit in it here (${done} bytes did)`);
        done += n;
      }
      while (done < pipe.data.length) {
        let n: number;
        try {
          n = writeSync(filler, pipe.data, done, pipe.data.length - done);
        } catch {
          n = 0;
        }
        if (n <= 0) throw new AppshotError(`pipe ${index}: its ${pipe.data.length} bytes in flight do not fit in it here (${done} did)`);
        done += n;
      }
    } finally {
      closeSync(filler);
    }
  }
  return made;
}
