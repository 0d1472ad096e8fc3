/**
 * Character devices: those whose whole state is their name (/dev/null,
 * /dev/zero, /dev/urandom, ...), reopened by it, and terminals, which do
 * not travel: a restored process's terminal output goes to the
 * application's log, and its reads from one read nothing. A pseudoterminal
 * whose master the application holds is ptys.ts's (a master alone is
 * passed through here to it). Any other device is refused by name.
 */
import { constants as fs, fstatSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import type { Fd, Process } from '../image/types.js';
import { type RestoreContext, Unsupported } from './context.js';
import { isPtyMaster } from './ptys.js';
import { identitiesFor, refuseMagicLink } from './fsident.js';
import { addon } from '../native.js';
import { refuseOutsideApplication } from './procpaths.js';

const O_ACCMODE = 3;

/** Character devices whose state is only their name. */
const PLAIN_DEVICES = new Set(['/dev/null', '/dev/zero', '/dev/full', '/dev/random', '/dev/urandom', '/dev/tty', '/dev/console']);
const TTY = /^\/dev\/(pts\/\d+|tty\w*|console)$/;

/** Whether the device at `path` is a terminal; throws Unsupported for a
 * device that cannot be captured. `where` names the process and fd. */
export function dumpDevice(path: string, where: string): { tty: boolean } {
  const tty = TTY.test(path);
  // A pty master: ptys.ts takes it (and its slaves) once every process is seen.
  if (isPtyMaster(path)) return { tty: false };
  if (!PLAIN_DEVICES.has(path) && !tty) throw new Unsupported(`${where}: device ${path} cannot be captured yet`);
  return { tty };
}

/** What is wrong with a device descriptor's record, if anything: an image
 * may name any path, and only the devices a snapshot takes are opened
 * again (a terminal's output goes to the log). */
export function deviceFault(fd: Fd): string | undefined {
  if (fd.tty || PLAIN_DEVICES.has(fd.path) || isPtyMaster(fd.path)) return undefined;
  return `is device ${fd.path}, not one a snapshot takes`;
}

export function openDevice(h: RestoreContext, p: Process, fd: Fd): number {
  // A terminal does not travel: output goes to the log.
  if (fd.tty) return (fd.flags & O_ACCMODE) === fs.O_RDONLY ? h.devNull(fd.flags) : h.log();
  // As its process would open it (fsident.ts; which devices: deviceFault,
  // checked with the image), and what opened must be a character device:
  // not a file or a block device put at that name.
  let opened: number;
  try {
    opened = addon().openAs(fd.path, fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC), 0, identitiesFor(h.image, p));
  } catch (e) {
    // A name through /dev/fd/... (a symlink put there since): said as
    // every other such refusal is, exit 5, not as a loop of symlinks.
    refuseMagicLink(e, `process ${p.vpid} fd ${fd.fd}: ${fd.path}`);
    throw e;
  }
  const got = h.keep(opened);
  refuseOutsideApplication(got, fd.path, `process ${p.vpid} fd ${fd.fd}`);
  if (!fstatSync(got).isCharacterDevice()) throw new AppshotError(`process ${p.vpid} fd ${fd.fd}: ${fd.path} is not a character device here`);
  return got;
}
