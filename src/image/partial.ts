/**
 * Temporaries that a command killed with SIGKILL cannot remove itself,
 * all under $APPSHOT_HOME/tmp and named after their owner (PID and start
 * time), so that the next appshot command of any kind removes those of
 * owners that are gone:
 *  - `image-OWNER-*`: a directory a tar stream is unpacked into (format.ts);
 *  - `partial-OWNER-*`: the journal entry of a directory being written
 *    under a hidden name beside its destination (an image's
 *    `.NAME.partial-PID-RANDOM`, a pre-copy base, a template) until it is renamed
 *    into place; it may hold a whole page file;
 *  - `ending-OWNER-*`: a snapshot's journal of the ending of its
 *    application, which the next command finishes (snapshot/ending.ts),
 *    not removes.
 */
import { chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { currentHolder, holderAlive } from '../holder.js';
import { defaultHome } from '../registry.js';
import { makeHome, refuseUnsafeDirectory } from '../home.js';

/** KIND-PID-START-RANDOM, or KIND-PID-START-rLEASE-RANDOM for a request
 * of the engine (holder.ts): owned by the request, not the process. */
export const OWNED = /^(image|partial|ending)-(\d+)-(\d+)-(?:r([0-9a-f]{16})-)?[0-9a-f]+$/;

/** $APPSHOT_HOME/tmp, made if need be. */
export function temporariesDir(home = defaultHome()): string {
  const dir = join(home, 'tmp');
  makeHome(home);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  return dir;
}

/** A new name under temporariesDir owned by this command. */
export function ownedName(kind: 'image' | 'partial' | 'ending', home = defaultHome()): string {
  const h = currentHolder();
  return join(temporariesDir(home), `${kind}-${h.pid}-${h.startTime}-${h.request ? `r${h.request}-` : ''}${randomBytes(4).toString('hex')}`);
}
/** Only a name a writer makes is ever removed from a journal entry. The
 * output's own name may hold any character but '/' (a newline made it an
 * internal error: fuzz33 L1): `s`, so that '.' takes it too. */
const PARTIAL_NAME = /^\..+\.partial-\d+(-[0-9a-f]+)?$|^\..+-base\.partial-\d+(-[0-9a-f]+)?$/s;

export interface PartialDir {
  path: string;
  /** The directory was renamed into place, or removed: forget it. */
  done(): void;
}

/** Journals, then makes, the hidden directory `path` (its name one that
 * PARTIAL_NAME accepts). */
export function makePartialDir(path: string, home = defaultHome()): PartialDir {
  const full = resolve(path);
  if (!PARTIAL_NAME.test(basename(full))) throw new Error(`not a partial directory's name: ${full}`);
  refuseUnsafeDirectory(dirname(full));
  const entry = ownedName('partial', home);
  writeFileSync(entry, full, { mode: 0o600 });
  try {
    mkdirSync(full);
    // Whatever the umask: an image or template others can write is
    // refused by restore and clone (see checkOnlyOwnerCanChange).
    chmodSync(full, 0o755);
  } catch (e) {
    rmSync(entry, { force: true });
    throw e;
  }
  return { path: full, done: () => rmSync(entry, { force: true }) };
}

/** Removes the temporaries of owners that are gone: unpacked images, and
 * partial directories with their journal entries. Returns whether a
 * snapshot's ending journal is there (snapshot/ending.ts recovers it). */
export function removeStaleTemporaries(home = defaultHome()): boolean {
  const dir = join(home, 'tmp');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return false;
  }
  for (const name of names) {
    const m = OWNED.exec(name);
    if (!m || m[1] === 'ending' || holderAlive({ pid: Number(m[2]), startTime: Number(m[3]), ...(m[4] ? { request: m[4] } : {}) }, home)) continue;
    if (m[1] === 'partial') {
      try {
        const path = readFileSync(join(dir, name), 'utf8');
        if (isAbsolute(path) && PARTIAL_NAME.test(basename(path))) rmSync(path, { recursive: true, force: true });
      } catch {
        /* removed by another command meanwhile */
      }
    }
    rmSync(join(dir, name), { recursive: true, force: true });
  }
  // An entry, or a claim on one (whose claimant may have been killed).
  return names.some((n) => n.startsWith('ending-') || n.startsWith('.ending-'));
}

/** What commands killed with SIGKILL left: their temporaries removed, and
 * the ending of an application a killed snapshot left half-done finished
 * (snapshot/ending.ts, loaded only then). Before every command of the CLI
 * (its preAction) and every call of the Node API (api.ts): one function,
 * so that both settle the same things. `lookOnly`: the command only looks
 * (ps, ls, logs...): an ending tried lately and left undecided (another
 * tracer, a thread in state D) is left for a later command rather than
 * tried again each time (ending.ts). */
export async function settleKilledCommands(home = defaultHome(), opts: { lookOnly?: boolean } = {}): Promise<void> {
  if (removeStaleTemporaries(home)) await (await import('../snapshot/ending.js')).recoverEndings(home, opts);
}
