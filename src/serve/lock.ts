/**
 * One front door per state directory: `appshot serve`, in its own process
 * or hosted by the resident engine, holds an flock on
 * $APPSHOT_HOME/services/serve.lock for as long as it serves. A second
 * serve for the same directory finds it taken and refuses before it has
 * touched anything (no instance adopted, no state written, no port
 * bound), instead of half-starting and failing on the first port. The
 * kernel drops the lock however its holder ends (kill -9 included), so
 * the next serve never has a stale file to guess about.
 */
import { closeSync, ftruncateSync, mkdirSync, readFileSync, realpathSync, writeSync } from 'node:fs';
import { descriptorLinks } from '../procfs.js';
import { join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { addon } from '../native.js';
import { makeHome } from '../home.js';

export const serveLockPath = (home: string) => join(home, 'services', 'serve.lock');

/** Who holds the lock, as its file says: "PID engine" or "PID process". */
export function serveLockHolder(home: string): { pid: number; engine: boolean } | undefined {
  try {
    const [pid, where] = readFileSync(serveLockPath(home), 'utf8').trim().split(/\s+/);
    return Number(pid) > 0 ? { pid: Number(pid), engine: where === 'engine' } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Who serves now: the holder its file names, if that process has the
 * file open (it keeps it open for as long as it holds the lock). The file
 * alone could name a serve killed with SIGKILL, whose PID may be someone
 * else's by now; the lock cannot be tested without taking it, which would
 * make a serve starting at that instant refuse.
 */
export function serveLockTaken(home: string): { pid: number; engine: boolean } | undefined {
  const h = serveLockHolder(home);
  if (!h) return undefined;
  let file: string;
  try {
    file = realpathSync(serveLockPath(home));
  } catch {
    return undefined; // no such file
  }
  // A process gone holds nothing.
  return descriptorLinks(h.pid).some((d) => d.link === file) ? h : undefined;
}

/** Takes the lock (its descriptor: close it to let go), or throws the one
 * line a second serve is refused with. */
export function takeServeLock(home: string, engine: boolean): number {
  makeHome(home);
  mkdirSync(join(home, 'services'), { recursive: true, mode: 0o700 });
  const fd = addon().tryLockFile(serveLockPath(home));
  if (fd < 0) {
    const h = serveLockHolder(home);
    const who = h ? (h.engine ? `hosted by the resident engine, pid ${h.pid}` : `pid ${h.pid}`) : 'another process';
    throw new AppshotError(`appshot serve already runs for ${home} (${who}): one front door per state directory`, ExitCode.conflict);
  }
  ftruncateSync(fd, 0);
  writeSync(fd, `${process.pid} ${engine ? 'engine' : 'process'}\n`, 0);
  return fd;
}

export function releaseServeLock(fd: number): void {
  try {
    // Emptied first: a reader between the close and the next serve's
    // write finds no PID rather than ours.
    ftruncateSync(fd, 0);
  } catch {
    /* closing lets go anyway */
  }
  closeSync(fd);
}
