/**
 * Where appshot keeps its state ($APPSHOT_HOME), and the engine's files in
 * it. Its own module, with nothing but node:os and node:path, because the
 * engine's client (bin/appshot.js) needs it before loading anything else
 * (and node:fs with errors.ts, for refuseUnsafeHome).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { lstatSync, mkdirSync, realpathSync, statSync, type Stats } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { AppshotError } from './errors.js';

/** The state directory a Node API call was given (api.ts: `home`), for all
 * that call does, awaited steps included: the keys it signs and checks
 * with and the temporaries it makes are that directory's, not the
 * default's, though they are found far below the call (image/trust.ts,
 * image/partial.ts). A scope, not a global: two calls with two homes may
 * run at once. */
export const homeScope = new AsyncLocalStorage<string>();

export function defaultHome(): string {
  const scoped = homeScope.getStore();
  if (scoped) return scoped;
  if (process.env.APPSHOT_HOME) return process.env.APPSHOT_HOME;
  if (process.getuid?.() === 0) return '/var/lib/appshot';
  const state = process.env.XDG_STATE_HOME || join(homedir(), '.local', 'state');
  return join(state, 'appshot');
}

/** The resident engine's files (src/engine/server.ts). */
export const enginePaths = (home = defaultHome()) => ({
  dir: join(home, 'engine'),
  socket: join(home, 'engine', 'engine.sock'),
  lock: join(home, 'engine', 'lock'),
  log: join(home, 'engine', 'log'),
});

/** A user other than this one and root who can change `st`: its owner, or
 * those who may write into it (group-writable is taken when the group is
 * this user's own, a user private group). A sticky directory's writers
 * may rename only their own entries: excused when `stickyExcuses`. */
export function othersMayChange(st: Stats, stickyExcuses: boolean): boolean {
  const uid = process.geteuid?.() ?? 0;
  const gid = process.getegid?.() ?? 0;
  if (st.uid !== uid && st.uid !== 0) return true;
  if (st.isSymbolicLink()) return false; // a link's mode means nothing
  const othersWrite = (st.mode & 0o002) !== 0 || ((st.mode & 0o020) !== 0 && st.gid !== gid);
  return othersWrite && !(stickyExcuses && (st.mode & 0o1000) !== 0);
}

/** `st`'s owner, group and mode, as a refusal by othersMayChange names
 * them. */
export function ownership(st: Stats): string {
  return `owner uid ${st.uid}, group ${st.gid}, mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}`;
}

/**
 * Refuses a state directory that a user other than this one and root can
 * change (fuzz34 F8): root given APPSHOT_HOME=/home/eve/h would write its
 * registrations, keys, locks and temporaries there, and remove stale ones,
 * by name, step by step; eve could swap a name for a link between two
 * steps and have root write, chmod or remove a file elsewhere, or read a
 * key. So the directory, each directory above it, and each link on the
 * way (and the directories above where a link points) must be this
 * user's or root's and writable by no one else: above the state directory
 * a sticky one (/tmp) is taken, since there only an entry's owner may
 * rename it; the state directory itself must not be sticky-writable
 * (another user could make `keys` or `tmp` in it first). A directory not
 * there yet is judged by the directories that are: makeHome checks again
 * once it made it. A path this user cannot look at is left to the
 * command's own calls, which fail on it.
 */
export function refuseUnsafeHome(home: string): void {
  const full = resolve(home);
  const refuse = (d: string, st: Stats, what: string): never => {
    throw new AppshotError(
      `refusing the state directory ${home}: ${d === full ? 'it' : `${d}, ${what},`} can be changed by another user (${ownership(st)}), who could swap its files for links while appshot writes them; set APPSHOT_HOME to a directory only you${(process.geteuid?.() ?? 0) === 0 ? '' : ' and root'} can change`,
    );
  };
  // The directories from a real path `real` up to /, sticky ones taken
  // (the state directory itself, where a link points, is checked apart).
  const checkUpFrom = (real: string, what: string) => {
    for (let d = real; ; d = dirname(d)) {
      const st = statSync(d);
      if (othersMayChange(st, true)) refuse(d, st, what);
      if (d === '/') break;
    }
  };
  try {
    checkUpFrom('/', 'a directory above it');
    let at = '/';
    for (const name of full.split('/').filter(Boolean)) {
      const next = join(at, name);
      let st: Stats;
      try {
        st = lstatSync(next);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return; // made later, under what was checked
        throw e;
      }
      if (st.isSymbolicLink()) {
        if (othersMayChange(st, false)) refuse(next, st, 'a link on the way to it');
        at = realpathSync(next);
        checkUpFrom(at, next === full ? 'where it links to' : 'a directory on the way to it');
        if (next === full) {
          const target = statSync(at);
          if (othersMayChange(target, false)) refuse(next, target, 'where it links to');
        }
      } else {
        if (othersMayChange(st, next !== full)) refuse(next, st, 'a directory above it');
        at = next;
      }
    }
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    // EACCES, ENOTDIR, ELOOP...: left to the command's own calls.
  }
}

/** The state directory `home`, made if need be (its parents too), once
 * refuseUnsafeHome takes it: checked again after it is made, since
 * another user may have made it first in a sticky directory. */
export function makeHome(home: string): void {
  refuseUnsafeHome(home);
  try {
    lstatSync(home);
    return;
  } catch {
    /* not there yet */
  }
  mkdirSync(home, { recursive: true, mode: 0o755 });
  refuseUnsafeHome(home);
}
