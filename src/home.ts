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

/** Why `path`, or a step on the way to it, can be changed by another user
 * (see refuseUnsafeHome, refuseUnsafeDirectory): the step and how it is
 * placed, or undefined if none can. Walked from / down, component by
 * component: each directory must be this user's or root's and writable by
 * no one else, a sticky one (/tmp) taken since only an entry's owner may
 * rename it there (`path` itself only if `stickyLast`); each link on the
 * way must be this user's or root's, and where it points is checked from /
 * up as well. A link that points nowhere is refused (what would be made
 * through it is not known). `missing`: a component not there yet is
 * 'judged' by those that are (it is made later beneath them, and checked
 * again then), or 'refused' (checked after making: something took its
 * place and went). A step this user cannot look at (EACCES, ENOTDIR,
 * ELOOP) is left to the command's own calls, which fail on it. */
function changeableStep(path: string, stickyLast: boolean, missing: 'judged' | 'refused'): { at: string; st?: Stats; what: string } | undefined {
  const full = resolve(path);
  // The directories from a real path `real` up to /, sticky ones taken
  // (`path` itself, where a link points, is checked apart).
  const upFrom = (real: string, what: string) => {
    for (let d = real; ; d = dirname(d)) {
      const st = statSync(d);
      if (othersMayChange(st, true)) return { at: d, st, what };
      if (d === '/') return undefined;
    }
  };
  try {
    const above = upFrom('/', 'a directory above it');
    if (above) return above;
    let at = '/';
    for (const name of full.split('/').filter(Boolean)) {
      const next = join(at, name);
      const last = next === full;
      let st: Stats;
      try {
        st = lstatSync(next);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
        return missing === 'judged' ? undefined : { at: next, what: 'made just now, is gone: another user may have put it there and taken it away' };
      }
      if (st.isSymbolicLink()) {
        if (othersMayChange(st, false)) return { at: next, st, what: 'a link on the way to it' };
        try {
          at = realpathSync(next);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { at: next, what: 'a link on the way to it, points nowhere: what would be made through it is not known' };
          throw e;
        }
        const up = upFrom(at, last ? 'where it links to' : 'a directory on the way to it');
        if (up) return up;
        if (last) {
          const target = statSync(at);
          if (othersMayChange(target, stickyLast)) return { at: next, st: target, what: 'where it links to' };
        }
      } else {
        if (othersMayChange(st, !last || stickyLast)) return { at: next, st, what: last ? 'itself' : 'a directory above it' };
        at = next;
      }
    }
    return undefined;
  } catch {
    return undefined; // EACCES, ENOTDIR, ELOOP...: left to the command's own calls
  }
}

/** Why changeableStep's step is refused: "it", or "STEP, WHAT,", can be
 * changed by another user (OWNERSHIP), then `tail` (who that user could
 * fool); or, for a step that is not there to look at, WHAT says it all. */
function stepWords(step: { at: string; st?: Stats; what: string }, tail: string): string {
  if (!step.st) return `${step.at}, ${step.what}`;
  const which = step.what === 'itself' ? 'it' : `${step.at}, ${step.what},`;
  return `${which} can be changed by another user (${ownership(step.st)}), ${tail}`;
}

const onlyYou = () => `only you${(process.geteuid?.() ?? 0) === 0 ? '' : ' and root'} can change`;

/**
 * Refuses a state directory that a user other than this one and root can
 * change (fuzz34 F8): root given APPSHOT_HOME=/home/eve/h would write its
 * registrations, keys, locks and temporaries there, and remove stale ones,
 * by name, step by step; eve could swap a name for a link between two
 * steps and have root write, chmod or remove a file elsewhere, or read a
 * key. So the directory, each directory above it, and each link on the
 * way (and the directories above where a link points) must be this
 * user's or root's and writable by no one else (changeableStep); the
 * state directory itself must not be sticky-writable (another user could
 * make `keys` or `tmp` in it first). A directory not there yet is judged
 * by the directories that are, unless `made` (makeHome: checked again
 * once made, when it must be there).
 */
export function refuseUnsafeHome(home: string, made = false): void {
  const step = changeableStep(home, false, made ? 'refused' : 'judged');
  if (step)
    throw new AppshotError(
      `refusing the state directory ${home}: ${stepWords(step, 'who could swap its files for links while appshot writes them')}; set APPSHOT_HOME to a directory ${onlyYou()}`,
    );
}

/**
 * An image, a template or a base is written into `dir` by name, step by
 * step (its partial directory made, given its mode, filled, renamed): a
 * user who may rename or remove entries of `dir`, of a directory above
 * it, or of a directory holding a link on the way to it, could swap a
 * name for a link between two steps and have appshot (root, say) change,
 * make or remove a file elsewhere (fuzz34 F0: root chmod'ed a root-only
 * file 0755 through a nobody-owned output directory; review 242: through
 * a link in a nobody-owned directory on the way to a root one, which a
 * check of the real path alone did not see). So the same walk as the
 * state directory's (changeableStep), `dir` itself taken when sticky
 * (/tmp: only an entry's owner may rename it). A `dir` not there is left
 * to the making of the partial directory, which fails on it.
 */
/** Whether no one but this user (or root) may change `dir`, or a step on
 * the way to it (a sticky directory above it excepted, as /tmp): nothing
 * there can have been swapped for a link (fsident.ts socketFileIdentities).
 * A step not there is no: under a sticky /tmp, another user may make it,
 * a link or a directory of theirs, between this look and the bind (review
 * r256); a socket's directory that is not there fails the bind anyway. */
export function onlyRestorerMayChange(dir: string): boolean {
  try {
    return !changeableStep(dir, false, 'refused');
  } catch {
    return false;
  }
}

export function refuseUnsafeDirectory(dir: string): void {
  const step = changeableStep(dir, true, 'judged');
  if (step)
    throw new AppshotError(
      `cannot write into ${dir}: ${stepWords(step, 'who could swap a name there for a link while appshot writes')}; choose a directory ${onlyYou()}`,
    );
}

/** The state directory `home`, made if need be (its parents too), once
 * refuseUnsafeHome takes it; checked again once there, whoever made it
 * (another user may have put a directory of theirs at its name in a
 * sticky directory, before or while it was made: review 242 saw one
 * returned unchecked because it was there at a second look). */
export function makeHome(home: string): void {
  refuseUnsafeHome(home);
  const notDirectory = () => new AppshotError(`refusing the state directory ${home}: not a directory`);
  try {
    mkdirSync(home, { recursive: true, mode: 0o755 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw notDirectory();
    throw e;
  }
  refuseUnsafeHome(home, true);
  if (!statSync(home).isDirectory()) throw notDirectory();
}
