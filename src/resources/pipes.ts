/**
 * Pipes and FIFOs: both ends, with the data in flight (copied without
 * consuming it) and the pipe's capacity. A FIFO is a pipe with a path: it
 * is reopened by that path. An end whose other end was outside the
 * application is not brought back as a pipe (see openPipeEnd).
 */
import { closeSync, constants as fs, openSync, writeSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { type Fd, FdKind, type Process } from '../image/types.js';
import { addon } from '../native.js';
import type { DumpContext, RestoreContext } from './context.js';

/* ---- dump ------------------------------------------------------------- */

/** The image's pipe for `fd` of `pid` (inode `ino`), recorded the first
 * time one of its ends is seen; `writeEnd` if the process holds it
 * write-only. */
export function dumpPipe(ctx: DumpContext, pid: number, fd: number, ino: bigint, fifoPath: string, writeEnd: boolean): number {
  return ctx.pipe(ino, () => {
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

/* ---- restore ---------------------------------------------------------- */

/** Our descriptor for the end of a pipe or FIFO that `fd` holds: the pipe
 * made (and refilled) the first time either of its ends is asked for. */
export function openPipeEnd(h: RestoreContext, _p: Process, fd: Fd): number {
  const index = fd.pipe;
  const users = h.image.processes.flatMap((p) => p.fds.filter((f) => (f.kind === FdKind.PIPE || f.kind === FdKind.FIFO) && f.pipe === index));
  // A pipe whose other end was outside the application (the terminal's
  // shell, a test harness) has no one there any more: its writers write
  // to the application's log, its readers read nothing.
  if (fd.writeEnd && !users.some((f) => !f.writeEnd)) return h.log();
  if (!fd.writeEnd && !users.some((f) => f.writeEnd)) return h.devNull(fd.flags);
  const p = h.once(`pipe ${index}`, () => {
    const pipe = h.image.pipes[index];
    let p: { read: number; write: number };
    if (pipe.fifoPath) {
      const rw = h.keep(openSync(pipe.fifoPath, fs.O_RDWR | fs.O_NONBLOCK));
      p = { read: h.keep(openSync(`/proc/self/fd/${rw}`, fs.O_RDONLY | fs.O_NONBLOCK)), write: h.keep(openSync(`/proc/self/fd/${rw}`, fs.O_WRONLY | fs.O_NONBLOCK)) };
    } else {
      const [r, w] = addon().pipe();
      p = { read: h.keep(r), write: h.keep(w) };
    }
    // The capacity first: more than the default 64 KiB may be in flight.
    // The refill never blocks: data that does not fit is an error.
    if (pipe.capacity) addon().pipeCapacity(p.write, Math.max(pipe.capacity, pipe.data.length));
    addon().setStatusFlags(p.write, fs.O_WRONLY | fs.O_NONBLOCK);
    if (pipe.data.length && writeSync(p.write, pipe.data) !== pipe.data.length)
      throw new AppshotError(`a pipe's ${pipe.data.length} bytes in flight do not fit in it here`);
    return p;
  });
  const end = fd.writeEnd ? p.write : p.read;
  addon().setStatusFlags(end, fd.flags);
  return end;
}
