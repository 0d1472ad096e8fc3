/**
 * A descriptor open on a /proc text file (/proc/PID/io, status, timers,
 * limits, /proc/meminfo, ...: the kernel writes its text at each read),
 * read part way or to its end when it was snapshotted. The listings of
 * mappings (maps, smaps, numa_maps) have a module of their own
 * (listings.ts): their reader is placed by mapping.
 *
 * The restore reopens such a file (a process's, under its restored PID)
 * and the byte offset the reader had means nothing there: the text is the
 * restored process's, with its PIDs, counters and sizes, whose digits are
 * not the original's. At the same byte a reader that had read whole lines
 * goes on in the middle of a line, and one that had read the whole text
 * reads more of it (a PID in /proc/self/timers that gained a digit)
 * where it would have read its end.
 *
 * So the snapshot keeps where the reader is by line: its end, or the line
 * (from 0) and the byte in that line, found in the text as the frozen
 * process has it, read through the process's own descriptor (the file it
 * opened, whoever reads: /proc/self is the process's PID there). The
 * restore puts the descriptor at the same line and byte of the restored
 * text (the byte at most the line's newline; a line the text no longer
 * has, its end), or at its end, once every process is as it will run
 * (RestoreContext.whenProcessesAreFinal): the reader goes on with the
 * lines it had not read as they are now, not byte for byte what the
 * original would have read, but never the middle of another line.
 *
 * The text the snapshot reads is not quite the one the reader had: the
 * snapshot itself shows in it (a traced, stopped process's status says
 * so and names its tracer, a longer text), and counters went on. A reader
 * whose offset falls inside the last line, past its start, had read that
 * line whole (line-oriented readers read whole lines; what grew is the
 * snapshot's own mark): it is at the end. The same marks of the restore
 * (the restored process is traced while its descriptors are placed) are
 * not taken out: a reader placed by line after a status's TracerPid line
 * lands a few bytes late once the tracer is gone.
 *
 * Files left at their byte offset: those that are not text (a NUL byte in
 * them), that are indexed by address or record (mem, pagemap, kpage*,
 * kcore), whose read consumes (kmsg), larger than TEXT_LIMIT, and
 * descriptors that cannot read.
 */
import { closeSync, constants as fs, openSync, readSync, statfsSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { type TextPosition } from '../image/types.js';
import { addon } from '../native.js';
import { isMappingListing } from './listings.js';

const PROC_SUPER_MAGIC = 0x9fa0;
/** A text longer than this is left at its byte offset: no line-oriented
 * /proc file of a process comes near it, and reading it whole with the
 * application frozen would cost its freeze. */
const TEXT_LIMIT = 1 << 20;
const O_ACCMODE = 3;
const NL = 0x0a;

/** /proc files that are not text read line by line: indexed by address
 * or page frame, or read destructively. */
const NOT_TEXT = /^\/proc\/(?:kmsg|kcore|kpagecount|kpageflags|kpagecgroup|(?:\d+|self|thread-self)(?:\/task\/\d+)?\/(?:mem|pagemap))$/;

/** Whether the descriptor (open with `flags` on `target`) reads a /proc
 * text this module places: `link` names it (/proc/PID/fd/N, or our own
 * descriptor's). */
function placesText(link: string, target: string, flags: number): boolean {
  if ((flags & O_ACCMODE) === fs.O_WRONLY) return false;
  if (!target.startsWith('/proc/') || NOT_TEXT.test(target) || isMappingListing(target)) return false;
  try {
    return Number(statfsSync(link).type) === PROC_SUPER_MAGIC;
  } catch {
    return false;
  }
}

/** The text of `fd` from its start, by pread (its offset stays where it
 * is); undefined if longer than TEXT_LIMIT or not text. */
function readText(fd: number): Buffer | undefined {
  const chunks: Buffer[] = [];
  let total = 0;
  for (;;) {
    const chunk = Buffer.allocUnsafe(64 * 1024);
    const n = readSync(fd, chunk, 0, chunk.length, total);
    if (n === 0) break;
    chunks.push(chunk.subarray(0, n));
    total += n;
    if (total > TEXT_LIMIT) return undefined;
  }
  const text = Buffer.concat(chunks, total);
  return text.includes(0) ? undefined : text;
}

/** Where byte `pos` of `text` is, by line. */
export function textPosition(text: Buffer, pos: number): TextPosition {
  if (pos >= text.length) return { atEnd: true, line: 0, column: 0 };
  let line = 0;
  let lineStart = 0;
  for (let i = text.indexOf(NL); i >= 0 && i < pos; i = text.indexOf(NL, i + 1)) {
    line++;
    lineStart = i + 1;
  }
  // Inside the last line, past its start: that line was read whole, and
  // the text grew since (see above).
  const nl = text.indexOf(NL, lineStart);
  const last = nl < 0 || nl === text.length - 1;
  if (last && pos > lineStart) return { atEnd: true, line: 0, column: 0 };
  return { atEnd: false, line, column: pos - lineStart };
}

/**
 * The byte of `text` at `at`: the same line and byte in it (at most the
 * line's newline), a line the text no longer has its end. `at` comes from
 * an image: its numbers are only compared, never trusted as lengths.
 */
export function textOffset(text: Buffer, at: TextPosition): number {
  if (at.atEnd) return text.length;
  let lineStart = 0;
  for (let l = 0; l < at.line; l++) {
    const nl = text.indexOf(NL, lineStart);
    if (nl < 0 || nl + 1 >= text.length) return text.length;
    lineStart = nl + 1;
  }
  const nl = text.indexOf(NL, lineStart);
  const lineEnd = nl < 0 ? text.length : nl;
  return Math.min(lineStart + at.column, lineEnd);
}

/** At snapshot: where the reader of descriptor `n` of frozen process
 * `pid` (open with `flags` on `target`, at byte `pos` > 0) is in its
 * /proc text; undefined if it is not one (it keeps its byte offset). */
export function dumpTextPosition(pid: number, n: number, target: string, flags: number, pos: bigint): TextPosition | undefined {
  const link = `/proc/${pid}/fd/${n}`;
  if (pos <= 0n || !placesText(link, target, flags)) return undefined;
  let fd: number;
  try {
    fd = openSync(link, fs.O_RDONLY | fs.O_NONBLOCK);
  } catch {
    return undefined; // not ours to read (a mode the process had, we have not): its byte offset
  }
  try {
    const text = readText(fd);
    return text && textPosition(text, Number(pos));
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** At restore, once the processes the text shows are as they will run:
 * our descriptor `fd` of `path` (the application's shares its offset),
 * opened with `flags`, put at `at` in its text. */
export function positionInText(fd: number, path: string, flags: number, at: TextPosition): void {
  if (!placesText(`/proc/self/fd/${fd}`, path, flags)) return;
  let text: Buffer | undefined;
  try {
    text = readText(fd);
  } catch (e) {
    throw new AppshotError(`reading ${path} to put its reader where it was: ${(e as Error).message}`);
  }
  // No longer a text we place (grown past the limit): its byte offset,
  // which it already has.
  if (text) addon().lseek(fd, textOffset(text, at));
}
