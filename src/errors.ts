import { constants as osConstants } from 'node:os';
import { getSystemErrorMap } from 'node:util';

/**
 * Errors the CLI reports as one line and a meaningful exit code, never as a
 * stack trace. Anything else that escapes is a bug and is shown as such.
 */
export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  notFound: 3,
  conflict: 4,
  /** The image asks for a credential or limit this user cannot grant. */
  denied: 5,
  /** What the command committed stands, but a step after its commit
   * failed (the message says which): restore, the application was
   * restored, is registered and runs; clone, every instance of the batch
   * does; snapshot, the image is complete and the application was ended
   * (the image is the application now). */
  afterCommit: 6,
  /** A bug: an error appshot did not expect (reported in one line). */
  internal: 70,
  /** The command given to `run` or `exec` could not be executed (as in sh). */
  notExecutable: 126,
  commandNotFound: 127,
  /** Stopped by SIGINT or SIGTERM (as a shell reports 128 + SIGINT). */
  interrupted: 130,
} as const;

export class AppshotError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = ExitCode.failure,
  ) {
    super(message);
    this.name = 'AppshotError';
  }
}

const C_ESCAPES: Record<string, string> = { '\n': '\\n', '\t': '\\t', '\r': '\\r', '\x1b': '\\e' };

/**
 * `text` as one line a terminal shows as it is: control characters (C0,
 * DEL, C1) written as escapes (`\n`, `\e`, `\x07`), and the characters
 * that reorder text on screen (bidi embeddings, overrides and isolates)
 * as `\u{202e}`. An argv, a path or an error message may carry a name from
 * an application, an image or a stream, which anyone may have written: a
 * newline in one would forge a second `appshot:` line or a row of a
 * table, an escape sequence would drive the terminal, a right-to-left
 * override would show a name other than the one it is (found by fuzzing).
 */
export function printable(text: string): string {
  return text
    .replace(/[\x00-\x1f\x7f-\x9f]/g, (c) => C_ESCAPES[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)
    .replace(/[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u{${c.charCodeAt(0).toString(16)}}`);
}

/**
 * A system call's error (Node's, with `code` and `syscall`) as appshot
 * words it: `open /x: permission denied (EACCES)`, the call and its path
 * first, rather than Node's `EACCES: permission denied, open '/x'`; any
 * other error's message as it is.
 */
export function errorText(e: unknown): string {
  if (!isSystemCallError(e)) return (e as Error)?.message ?? String(e);
  const err = e as NodeJS.ErrnoException & { dest?: string };
  return `${err.syscall}${err.path ? ` ${err.path}` : ''}${err.dest ? ` → ${err.dest}` : ''}: ${errorWords(err)}`;
}

/** Whether `e` is a system call's error as Node throws it (a `code` and
 * the `syscall` that failed), not appshot's nor a parser's. */
export function isSystemCallError(e: unknown): e is NodeJS.ErrnoException {
  const err = e as NodeJS.ErrnoException | undefined;
  return !!err && typeof err.code === 'string' && !!err.syscall;
}

/** A positive errno's name ("EPERM"), or "errno N" for one this system
 * does not name: how messages give the result of a call made in another
 * process or in the addon. */
export function errnoName(errno: number): string {
  if (!errnoNames) {
    errnoNames = new Map();
    // Of two names for one number, the kernel's own (EAGAIN, not
    // EWOULDBLOCK; EOPNOTSUPP, not ENOTSUP), whatever Node's order.
    for (const [name, n] of Object.entries(osConstants.errno)) if (!errnoNames.has(n) || KERNEL_NAMES.has(name)) errnoNames.set(n, name);
  }
  return errnoNames.get(errno) ?? `errno ${errno}`;
}
let errnoNames: Map<number, string> | undefined;
const KERNEL_NAMES = new Set(['EAGAIN', 'EOPNOTSUPP']);

/** A system call's error without the call and its path: `permission
 * denied (EACCES)` (errorText's end). */
export function errorWords(err: NodeJS.ErrnoException): string {
  const what = (typeof err.errno === 'number' && getSystemErrorMap().get(err.errno)?.[1]) || err.message;
  return `${what} (${err.code})`;
}
