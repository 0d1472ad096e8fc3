/**
 * A snapshot that ends its application, killed (kill -9, the OOM killer)
 * between putting its image in place and ending the application.
 *
 * The kernel lets a dead tracer's tracees go on: killed after the image
 * is in place but before the threads were set to die with it
 * (Freezer.dieWithUs), appshot would leave the application running beside
 * an image of it; killed after, but before the registration says the
 * image is the application (markReleased), the application would end as
 * "killed" with its image on disk that nothing names. Either way the user
 * would hold two versions of one application, or lose track of one.
 *
 * So the snapshot journals its ending in two steps, and the next appshot
 * command of any kind (the CLI's preAction) finishes what a dead one
 * left, one way or the other, never half:
 *  - "placing" (written before the image is renamed into place, with the
 *    inode that will be there): the decision is not taken. An image found
 *    in place is removed (and a keeper handed its connections lets them
 *    go); the application was let go by the kernel and runs on, as after
 *    a failed snapshot.
 *  - "ending" (written once the image is in place and any keeper holds
 *    the connections, before the threads are set to die with us): the
 *    image is the application. What is left of the application is killed
 *    and its registration released to the image, as the snapshot would
 *    have done; `ps -a` lists it as snapshotted into the image.
 * The journal entry lives under $APPSHOT_HOME/tmp, named after its owner
 * (partial.ts's rules), and goes once the registration says released.
 */
import { existsSync, lstatSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { currentHolder, holderAlive } from '../holder.js';
import { OWNED, ownedName } from '../image/partial.js';
import { signalProcesses } from '../inspect.js';
import { killPoint } from '../killpoint.js';
import { isSameProcess } from '../procfs.js';
import { type AppRecord, defaultHome, isEnded, LocalRegistry } from '../registry.js';
import { dropKept } from '../resources/keeper.js';

interface EndingEntry {
  step: 'placing' | 'ending';
  aid: string;
  initPid: number;
  initStartTime: number;
  /** The image's path, and the identity of what was renamed there. */
  output: string;
  dev: number;
  ino: number;
}

/** The journal of one snapshot's ending (see above). */
export class EndingJournal {
  private readonly path: string;
  private entry: EndingEntry;

  /** Journals step "placing" for `staged`, the directory or file about
   * to be renamed (or linked) to `output`. */
  constructor(home: string, record: AppRecord, output: string, staged: string) {
    const st = lstatSync(staged);
    this.entry = { step: 'placing', aid: record.aid, initPid: record.initPid ?? 0, initStartTime: record.initStartTime ?? 0, output, dev: st.dev, ino: st.ino };
    this.path = ownedName('ending', home);
    this.write();
  }

  /** The image is in place and is the application from now on. */
  ending(): void {
    this.entry = { ...this.entry, step: 'ending' };
    this.write();
  }

  /** Finished (released), or undone by the snapshot itself. */
  done(): void {
    rmSync(this.path, { force: true });
  }

  private write(): void {
    // Whole or not at all: a reader never sees half an entry.
    writeFileSync(`${this.path}.tmp`, JSON.stringify(this.entry), { mode: 0o600 });
    renameSync(`${this.path}.tmp`, this.path);
  }
}

/** Whether `path` is still what the snapshot renamed there. */
function stillPlaced(e: EndingEntry): boolean {
  try {
    const st = lstatSync(e.output);
    return st.dev === e.dev && st.ino === e.ino;
  } catch {
    return false;
  }
}

/** Finishes the endings of snapshots whose owner is gone (see above). */
export async function recoverEndings(home = defaultHome()): Promise<void> {
  const dir = join(home, 'tmp');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  // Claims of recoverers that were killed themselves go back first, to be
  // taken again below.
  let taken = false;
  for (const name of names) {
    const r = CLAIM.exec(name);
    if (r && !isSameProcess(Number(r[2]), Number(r[3])))
      try {
        renameSync(join(dir, name), join(dir, r[1]));
        taken = true;
      } catch {
        /* taken back by another */
      }
  }
  if (taken) names = readdirSync(dir);
  const me = currentHolder();
  for (const name of names) {
    // An entry's next version, cut short with its writer.
    const tmp = /^(.+)\.tmp$/.exec(name);
    const m = OWNED.exec(tmp ? tmp[1] : name);
    if (!m || m[1] !== 'ending' || holderAlive({ pid: Number(m[2]), startTime: Number(m[3]), ...(m[4] ? { request: m[4] } : {}) }, home)) continue;
    if (tmp) {
      rmSync(join(dir, name), { force: true });
      continue;
    }
    // Taken by one command only: two that start at once would both act.
    const entry = join(dir, name);
    const claimed = join(dir, `.${name}.recovering-${me.pid}-${me.startTime}`);
    try {
      renameSync(entry, claimed);
    } catch {
      continue;
    }
    let e: EndingEntry;
    try {
      e = JSON.parse(readFileSync(claimed, 'utf8')) as EndingEntry;
    } catch {
      // Cut short or not ours to read: nothing can be done with it.
      rmSync(claimed, { force: true });
      continue;
    }
    try {
      if (e.step === 'placing') undoPlacing(home, e);
      else if (e.step === 'ending') await finishEnding(home, e);
    } catch {
      // Half done (a full disk, say): given back, for the next command to
      // finish; every step above can be taken again.
      renameSync(claimed, entry);
      continue;
    }
    rmSync(claimed, { force: true });
  }
}

/** A claim on an entry: its name, and the claiming command's PID and
 * start time. */
const CLAIM = /^\.(.+)\.recovering-(\d+)-(\d+)$/;

/** Step "placing": the image goes, the application runs on. */
function undoPlacing(home: string, e: EndingEntry): void {
  if (stillPlaced(e)) rmSync(e.output, { recursive: true, force: true });
  try {
    dropKept(home, e.aid);
  } catch {
    /* no keeper was handed anything */
  }
}

/** The registration the entry names, if it still is that application's. */
function sameApplication(reg: LocalRegistry, e: EndingEntry): AppRecord | undefined {
  const record = reg.get(e.aid);
  if (!record || record.initPid !== e.initPid || (record.initStartTime ?? 0) !== e.initStartTime) return undefined;
  return record;
}

/** Step "ending": the image is the application, whose rest is ended and
 * whose registration is released to the image. */
async function finishEnding(home: string, e: EndingEntry): Promise<void> {
  if (!stillPlaced(e)) return;
  const reg = new LocalRegistry(home);
  const record = sameApplication(reg, e);
  if (!record) return;
  // Released already (the snapshot, or a recovery, was killed just after):
  // what is left of it (held stopped by a killed recovery) is killed, and
  // its init removes the registration.
  if (existsSync(join(record.stateDir, 'released'))) {
    reg.setAsideLog(record); // if it was not yet
    if (!isEnded(record)) signalProcesses(reg, record, 'SIGKILL');
    return;
  }
  // In the snapshot's own order: released, its log set aside, then
  // killed (killed first, its init could remove the registration, log and
  // all, as soon as it saw "released", before the log was set aside). Held
  // stopped meanwhile, so that it writes nothing more.
  const running = !isEnded(record);
  if (running) signalProcesses(reg, record, 'SIGSTOP');
  killPoint('ending: application stopped');
  reg.markReleased(record, e.output);
  reg.setAsideLog(record);
  if (running) signalProcesses(reg, record, 'SIGKILL');
  // Its init removes the registration once the processes are gone; one
  // that had already ended (or ends before it sees "released") wrote the
  // file "exit" instead, and the registration is released here.
  const until = Date.now() + 10_000;
  for (;;) {
    const now = sameApplication(reg, e);
    if (!now) return;
    if (isEnded(now) || !isSameProcess(e.initPid, e.initStartTime || undefined) || Date.now() > until) {
      reg.release(now);
      return;
    }
    await sleep(10);
  }
}
