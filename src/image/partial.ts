/**
 * Directories being written under a hidden name beside their destination
 * (an image's `.NAME.partial-PID`, a pre-copy base, a template) until they
 * are renamed into place. A writer killed with SIGKILL cannot remove its
 * own, and the directory may hold a whole page file: each is journaled in
 * $APPSHOT_HOME/tmp before it is made, named after its writer (PID and
 * start time), and the next appshot command of any kind removes what a
 * writer that is gone left.
 */
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, isAbsolute, join, resolve } from 'node:path';
import { isSameProcess, readStat } from '../procfs.js';
import { defaultHome } from '../registry.js';

const JOURNALED = /^partial-(\d+)-(\d+)-[0-9a-f]+$/;
/** Only a name a writer makes is ever removed from a journal entry. */
const PARTIAL_NAME = /^\..+\.partial-\d+$|^\..+-base\.partial-\d+$/;

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
  const journal = join(home, 'tmp');
  mkdirSync(journal, { recursive: true, mode: 0o700 });
  const entry = join(journal, `partial-${process.pid}-${readStat(process.pid)?.startTime ?? 0}-${randomBytes(4).toString('hex')}`);
  writeFileSync(entry, full, { mode: 0o600 });
  try {
    mkdirSync(full);
  } catch (e) {
    rmSync(entry, { force: true });
    throw e;
  }
  return { path: full, done: () => rmSync(entry, { force: true }) };
}

/** Removes the partial directories of writers that are gone, and their
 * journal entries. */
export function removeStalePartials(home = defaultHome()): void {
  const journal = join(home, 'tmp');
  let names: string[];
  try {
    names = readdirSync(journal);
  } catch {
    return;
  }
  for (const name of names) {
    const m = JOURNALED.exec(name);
    if (!m || isSameProcess(Number(m[1]), Number(m[2]))) continue;
    try {
      const path = readFileSync(join(journal, name), 'utf8');
      if (isAbsolute(path) && PARTIAL_NAME.test(basename(path))) rmSync(path, { recursive: true, force: true });
    } catch {
      /* removed by another command meanwhile */
    }
    rmSync(join(journal, name), { force: true });
  }
}
