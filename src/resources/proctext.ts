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
 * so, "t (tracing stop)" where the reader saw "R (running)", and names
 * its tracer in TracerPid, a longer text), and counters went on. So in a
 * status (only there: another text's reader may well stop inside a
 * line), an offset at most STATUS_MARKS bytes before a line's end is the
 * start of the next line (the reader had read that line whole, the marks
 * before it moved it back), and one inside the last line, past its
 * start, is the end. The same marks of the restore (the restored process
 * is traced while its descriptors are placed) are not taken out: a reader
 * placed by line after a status's State or TracerPid line lands a few
 * bytes away from its line's start once the tracer is gone.
 *
 * Only the texts of SAFE_TEXT are placed: reading them has no effect and
 * touches no memory of the (frozen) process. Any other file keeps its
 * byte offset: drivers' entries under /proc (a read may act), kmsg (a
 * read consumes, and blocks), cmdline, environ, auxv (read the process's
 * memory: a region registered with userfaultfd waits on the frozen
 * process forever), mem, pagemap, kcore. A file is classified by the
 * kernel's name of the open file (readlink of its descriptor), never by
 * the name an image gives, and its text is read through an open of our
 * own of that file (O_RDONLY | O_NONBLOCK), never through the
 * application's descriptor (its flags, its seq_file). Also left at their
 * byte offset: texts with a NUL byte, larger than TEXT_LIMIT, and
 * descriptors that cannot read.
 */
import { closeSync, constants as fs, openSync, readlinkSync, readSync, statfsSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { type TextPosition } from '../image/types.js';
import { addon } from '../native.js';

const PROC_SUPER_MAGIC = 0x9fa0;
/** A text longer than this is left at its byte offset: no line-oriented
 * /proc file of a process comes near it, and reading it whole with the
 * application frozen would cost its freeze. */
const TEXT_LIMIT = 1 << 20;
const O_ACCMODE = 3;
const NL = 0x0a;

/** A status's lines that the snapshot's own marks lengthen (State, by 5
 * bytes; TracerPid, by the digits of our PID) end at most this many bytes
 * past where the reader's did. */
const STATUS_MARKS = 16;

/** The /proc texts placed by line, as the kernel names them: a process's
 * or thread's (/proc/PID[/task/TID]/...) and the system's. Their reads
 * act on nothing and read no memory of a process. */
const SAFE_TEXT = /^\/proc\/(?:\d+(?:\/task\/\d+)?\/(?:io|limits|oom_score|oom_score_adj|sched|schedstat|stat|statm|status|timers)|cpuinfo|loadavg|meminfo|stat|uptime|version|vmstat)$/;

/** The canonical name of the /proc text that `link` (/proc/PID/fd/N, or
 * our own descriptor's), open with `flags`, reads, if this module places
 * it; undefined otherwise. */
function placedText(link: string, flags: number): string | undefined {
  if ((flags & O_ACCMODE) === fs.O_WRONLY) return undefined;
  try {
    const path = readlinkSync(link);
    if (!SAFE_TEXT.test(path) || Number(statfsSync(link).type) !== PROC_SUPER_MAGIC) return undefined;
    return path;
  } catch {
    return undefined;
  }
}

/** The text of the file `link` names (what `placedText` named), through
 * an open of our own: the link itself, not the name, which is the file's
 * in its own mount of /proc (a restore's, of the restored PID namespace,
 * where our /proc shows another process under that PID). Undefined if
 * we may not open it. */
function readTextAt(link: string): Buffer | undefined {
  let fd: number;
  try {
    fd = openSync(link, fs.O_RDONLY | fs.O_NONBLOCK);
  } catch {
    return undefined; // not ours to read (a mode the process had, we have not): its byte offset
  }
  try {
    return readText(fd);
  } finally {
    closeSync(fd);
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

/** The line (from 0) of text[start...] that byte `pos` is in, and where
 * that line starts. Shared with listings.ts, which counts within one
 * mapping's record. */
export function lineOf(text: Buffer, pos: number, start = 0): { line: number; lineStart: number } {
  let line = 0;
  let lineStart = start;
  for (let i = text.indexOf(NL, start); i >= 0 && i < pos; i = text.indexOf(NL, i + 1)) {
    line++;
    lineStart = i + 1;
  }
  return { line, lineStart };
}

/** The byte at line `line`, byte `column` of text[start, end) (at most
 * that line's end, its newline); a line it does not have: `end`. The
 * numbers come from an image: only compared, never trusted as lengths.
 * Shared with listings.ts (one mapping's record). */
export function offsetOfLine(text: Buffer, line: number, column: number, start = 0, end = text.length): number {
  let lineStart = start;
  for (let l = 0; l < line; l++) {
    const nl = text.indexOf(NL, lineStart);
    if (nl < 0 || nl + 1 >= end) return end;
    lineStart = nl + 1;
  }
  const nl = text.indexOf(NL, lineStart);
  const lineEnd = nl < 0 || nl >= end ? end : nl;
  return Math.min(lineStart + column, lineEnd);
}

/** Where byte `pos` of `text` is, by line; `status`: the text is a
 * /proc/PID/status (its snapshot's marks, see above). */
export function textPosition(text: Buffer, pos: number, status = false): TextPosition {
  if (pos >= text.length) return { atEnd: true, line: 0, column: 0 };
  const { line, lineStart } = lineOf(text, pos);
  const nl = text.indexOf(NL, lineStart);
  if (status && pos > lineStart) {
    // Inside the last line: that line was read whole.
    if (nl < 0 || nl === text.length - 1) return { atEnd: true, line: 0, column: 0 };
    // Close to its end: that line was read whole, the marks before it
    // moved it back; the reader is at the next one's start.
    if (nl + 1 - pos <= STATUS_MARKS) return { atEnd: false, line: line + 1, column: 0 };
  }
  return { atEnd: false, line, column: pos - lineStart };
}

/**
 * The byte of `text` at `at`: the same line and byte in it (at most the
 * line's newline), a line the text no longer has its end. `at` comes from
 * an image: its numbers are only compared, never trusted as lengths.
 */
export function textOffset(text: Buffer, at: TextPosition): number {
  return at.atEnd ? text.length : offsetOfLine(text, at.line, at.column);
}

/** At snapshot: where the reader of descriptor `n` of frozen process
 * `pid` (open with `flags`, at byte `pos` > 0) is in its /proc text;
 * undefined if it is not one we place (it keeps its byte offset). */
export function dumpTextPosition(pid: number, n: number, flags: number, pos: bigint): TextPosition | undefined {
  const link = `/proc/${pid}/fd/${n}`;
  const path = pos > 0n ? placedText(link, flags) : undefined;
  if (!path) return undefined;
  try {
    const text = readTextAt(link);
  return text && textPosition(text, Number(pos), path.endsWith('/status'));
  } catch {
    return undefined;
  }
}

/** At restore, once the processes the text shows are as they will run:
 * our descriptor `fd` of `path` (the application's shares its offset),
 * opened with `flags`, put at `at` in its text. What it is comes from the
 * descriptor, not from `path` (the image's). */
export function positionInText(fd: number, path: string, flags: number, at: TextPosition): void {
  const link = `/proc/self/fd/${fd}`;
  if (!placedText(link, flags)) return;
  let text: Buffer | undefined;
  try {
    text = readTextAt(link);
  } catch (e) {
    throw new AppshotError(`reading ${path} to put its reader where it was: ${(e as Error).message}`);
  }
  // No longer a text we place (grown past the limit): its byte offset,
  // which it already has.
  if (!text) return;
  // Through 0 first: a seq_file seeked to the byte it already is at keeps
  // the record it had found there, and the first seek (at open, to the
  // image's byte offset) found it in the text as it was then (a timer
  // not yet made: the first record, read again from that byte).
  addon().lseek(fd, 0);
  addon().lseek(fd, textOffset(text, at));
}
