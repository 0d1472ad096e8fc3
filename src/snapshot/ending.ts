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
 * So the snapshot journals its ending, and the next appshot command of
 * any kind (the CLI's preAction, every call of the Node API:
 * settleKilledCommands) finishes what a dead one left, one way or the
 * other, never half:
 *  - "holding" (written just before the snapshot puts its first
 *    connection in TCP repair mode, a line naming each one added just
 *    before it enters it; with --leave-running and to a stream too: in
 *    repair mode a connection drops every packet, and only the snapshot
 *    could let it out): no image is in place, the application, let go by
 *    the kernel, runs on, and its connections still in repair mode are
 *    taken out of it (tcp.ts, releaseLeftInRepair). Most often its
 *    guardian (tcp.ts) did so already, at the instant appshot died.
 *    Also written before the freeze by a snapshot that ends its
 *    application, to name the witness it starts then (below): ended by
 *    the next command.
 *  - "placing" (written before the image is renamed into place, with the
 *    inode that will be there): the decision is not taken. An image found
 *    in place is removed (and a keeper handed its connections lets them
 *    go); the application was let go by the kernel and runs on, as after
 *    a failed snapshot; the connections the snapshot held in TCP repair
 *    mode, journaled with it, are taken out of it (tcp.ts,
 *    releaseLeftInRepair).
 *  - "ending" (written once the image is in place and any keeper holds
 *    the connections, with the image's processes by system PID and start
 *    time, before the threads are set to die with us): the image is the
 *    application if any of them was killed, as appshot's death kills each
 *    one whose threads were set to die with it. The entry names a witness
 *    (witness.ts), set to die with us just before the first thread: found
 *    alive and not dying, no thread was set to die, and it is rolled back
 *    as for "placing" (unless connections are in repair mode, below),
 *    whatever processes of it exited by themselves since. A witness found
 *    dead says nothing; then the application is looked at: the next command stops
 *    (ptrace) what is left: if every process of the image is there, the
 *    same one (its start time), and stops, none was dying (a process a
 *    SIGKILL was sent to never enters a ptrace stop again), so appshot
 *    died before it set any to die: rolled back as for "placing", the
 *    application runs on with all it did meanwhile; unless the snapshot
 *    left connections of it in TCP repair mode (the keeper holds them
 *    for the restore, which carries them on). Otherwise (one gone or
 *    dying, or connections in repair mode) what is left is killed and
 *    the registration released to the image, as the snapshot would have
 *    done; `ps -a` lists it as snapshotted into the image. One it cannot
 *    stop (another tracer, a thread that does not stop): nothing is
 *    decided, what it stopped goes on, and a later command tries again
 *    (one that only looks, such as ps, not before UNDECIDED_BACKOFF_MS
 *    unless what was in the way is gone: the entry notes when it was
 *    tried and what stood in the way).
 *  - "rolling-back" (a snapshot that failed past "ending", once its
 *    threads no longer die with it; or the next command, once it decided
 *    to roll back): as "placing". Such a snapshot first takes its
 *    connections out of repair mode and journals "ending" again with
 *    none in it, while its threads still die with it: killed anywhere in
 *    its undoing, the application is either dead (the image is it) or
 *    whole with nothing held (rolled back).
 * Each entry names the boot it was written in. One left by an earlier
 * boot, at any step, outlived an application that died with the system
 * (a power loss while it was held stopped, or once killed): nothing of
 * the above applies, and an image still in place, whole (made durable
 * before it was renamed there), is kept as the application, its
 * registration released to it (keptAfterRestart); removing it, as
 * "placing" would, would lose both. The entry "ending" is on disk
 * (fsync) before any thread is set to die with us.
 * The journal entry lives under $APPSHOT_HOME/tmp, named after its owner
 * (partial.ts's rules), and goes once the registration says released, or
 * once the image is removed.
 */
import { closeSync, existsSync, fsyncSync, lstatSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { printable } from '../errors.js';
import { currentHolder, holderAlive } from '../holder.js';
import { syncDir } from '../image/format.js';
import { OWNED, ownedName } from '../image/partial.js';
import { signalProcesses } from '../inspect.js';
import { killPoint } from '../killpoint.js';
import { addon } from '../native.js';
import { isSameProcess, readStat } from '../procfs.js';
import { Freezer } from '../ptrace/freezer.js';
import { endWitness, startWitness, type WitnessId, witnessDiesWithUs, witnessLivesOn, witnessUntouched } from '../ptrace/witness.js';
import { type AppRecord, defaultHome, isEnded, LocalRegistry } from '../registry.js';
import { dropKept } from '../resources/keeper.js';
import { type HeldSocket, releaseLeftInRepair } from '../resources/tcp.js';

/** A process of the image: its system PID and start time (a PID used
 * again by another process is not it). */
export interface ImageProcess {
  pid: number;
  startTime: number;
}

interface EndingEntry {
  step: 'holding' | 'placing' | 'ending' | 'rolling-back';
  /** The boot it was written in (/proc/sys/kernel/random/boot_id): one
   * of an earlier boot outlived its application, which died with the
   * system (a power loss), and its image is never removed (see
   * keptAfterRestart). Absent in entries of an older appshot. */
  boot?: string;
  aid: string;
  initPid: number;
  initStartTime: number;
  /** From step "placing" on: the image's path, and the identity of what
   * was renamed there. */
  output?: string;
  dev?: number;
  ino?: number;
  /** From step "ending" on: every process of the image. */
  processes?: ImageProcess[];
  /** From step "ending" on: how many of its connections are in TCP repair
   * mode, held for the restore by a keeper (an application rolled back
   * with them so could never use them again). */
  connectionsInRepair?: number;
  /** A process set to die with the snapshot just before the first thread
   * of the application (witness.ts): found alive and not dying, none of
   * the application was set to die. */
  witness?: WitnessId;
  /** The connections the snapshot held in repair mode (or was about to
   * put in it): an application rolled back gets them out of it again. */
  heldInRepair?: HeldSocket[];
  /** Step "ending": when a command last tried to decide it and could not
   * (ms since the epoch), and what it saw in the way then. */
  undecided?: { at: number; obstacles: Obstacle[] };
}

/** What keeps a command from stopping the application: one of its
 * processes traced by another (`tracer`), or a thread of it that sleeps
 * uninterruptibly (`tid`, state D). */
interface Obstacle {
  pid: number;
  startTime: number;
  tracer?: number;
  tid?: number;
}

/** How long a command that only looks (ps, ls, logs, the API's ps:
 * settleKilledCommands' lookOnly) leaves an "ending" entry alone once a
 * command could not decide it, unless what was in the way is gone: each
 * try may wait HOLD_TIMEOUT_MS and stops (ptrace) the application. A
 * command that acts tries every time. */
const UNDECIDED_BACKOFF_MS = 60_000;

/** How long the next command tries to stop what is left of the
 * application, to see whether all of it is there and none dying. */
const HOLD_TIMEOUT_MS = 5000;

/** Whole or not at all: a reader never sees half an entry. `durable`:
 * on disk (the file and its name) before this returns, to outlive a
 * power loss. */
function writeEntry(path: string, entry: EndingEntry, durable = false): void {
  if (!durable) {
    writeFileSync(`${path}.tmp`, JSON.stringify(entry), { mode: 0o600 });
    renameSync(`${path}.tmp`, path);
    return;
  }
  const fd = openSync(`${path}.tmp`, 'w', 0o600);
  try {
    writeSync(fd, JSON.stringify(entry));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(`${path}.tmp`, path);
  syncDir(dirname(path));
}

let bootRead: string | undefined;
/** This boot's identity, read once ('' where the kernel does not tell:
 * then every entry counts as of this boot, as before boot ids). */
function thisBoot(): string {
  if (bootRead === undefined)
    try {
      bootRead = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      bootRead = '';
    }
  return bootRead;
}

function isHeldSocket(s: unknown): s is HeldSocket {
  const h = s as HeldSocket | null;
  return typeof h === 'object' && h !== null && Number.isSafeInteger(h.pid) && h.pid > 0 && typeof h.ino === 'string' && /^\d+$/.test(h.ino);
}

/** An entry as written: one line, and at step "holding" one more line per
 * socket appended. A last line cut short (its writer killed) is of a
 * socket that never entered repair mode: left out. */
function parseEntry(text: string): EndingEntry {
  const [head, ...appended] = text.split('\n');
  const e = JSON.parse(head) as EndingEntry;
  const sockets: HeldSocket[] = [];
  for (const line of appended)
    try {
      sockets.push(JSON.parse(line) as HeldSocket);
    } catch {
      /* cut short */
    }
  // Only what names a socket the way the snapshot wrote it: anything else
  // (a file damaged by other means than a kill) would make the release
  // throw, and the entry be given back and tried again by every command.
  const held = [...(Array.isArray(e.heldInRepair) ? e.heldInRepair : []), ...sockets].filter(isHeldSocket);
  e.heldInRepair = held.length ? held : undefined;
  return e;
}

/** The journal of one snapshot's ending (see above), written from its
 * first step on: "holding" (the first connection put in repair mode) or
 * "placing". */
export class EndingJournal {
  private readonly path: string;
  private entry: EndingEntry;
  private written = false;
  /** Step "holding": the entry, open to append its sockets to. */
  private appending: number | undefined;

  constructor(home: string, record: AppRecord) {
    this.path = ownedName('ending', home);
    const boot = thisBoot();
    this.entry = { step: 'holding', ...(boot ? { boot } : {}), aid: record.aid, initPid: record.initPid ?? 0, initStartTime: record.initStartTime ?? 0 };
  }

  private write(entry: EndingEntry, durable = false): void {
    this.stopAppending();
    // Where a test has the write fail (APPSHOT_TEST_FAIL_AT), as a full,
    // read-only or failing $APPSHOT_HOME/tmp would.
    killPoint(`ending: writing step ${entry.step}`);
    writeEntry(this.path, entry, durable);
    this.entry = entry;
    this.written = true;
  }

  private stopAppending(): void {
    if (this.appending !== undefined) closeSync(this.appending);
    this.appending = undefined;
  }

  /** Step "holding": `socket` is about to be put in TCP repair mode:
   * killed from here until "placing", with no image in place, the
   * application runs on and the next command lets it out of it. One line
   * appended per socket (rewriting the entry each time would cost the
   * frozen application the square of its connections). */
  holding(socket: HeldSocket): void {
    if (this.entry.step !== 'holding') throw new Error(`the ending journal is at step ${this.entry.step}: no connection enters repair mode now`);
    if (this.appending === undefined) {
      this.write(this.entry);
      this.appending = openSync(this.path, 'a');
    }
    writeSync(this.appending, `\n${JSON.stringify(socket)}`);
  }

  /** Starts the witness of the ending (witness.ts), while the application
   * still runs: its spawn (posix_spawn holds the thread until the exec)
   * took 6-100 ms of the held window on a loaded machine when it was
   * started at "placing" (h449 F2). Journaled at once, at step "holding",
   * so that a command killed from here on leaves none sleeping out its
   * day: the next command ends it (recoverEndings). Ended by done(). To
   * be called before any connection is held (the entry is rewritten). */
  witnessed(): void {
    if (this.written) throw new Error('the witness of a snapshot is journaled before anything else of its ending');
    // Started just before the entry that names it: a command killed in
    // between leaves it sleeping out its day, nothing more.
    const witness = startWitness();
    if (!witness) return;
    // Owned by the entry before it is written: a write that fails (ENOSPC,
    // EROFS, EIO on $APPSHOT_HOME/tmp) fails the snapshot, whose done()
    // then ends it, as it would a journaled one (r465 F6).
    this.entry = { ...this.entry, witness };
    this.write(this.entry);
  }

  /** Journals step "placing" for `staged`, the directory or file about
   * to be renamed (or linked) to `output`. */
  placing(output: string, staged: string, heldInRepair: HeldSocket[] = []): void {
    const st = lstatSync(staged);
    // Started before the freeze (witnessed), else now; owned by the entry
    // before it is written, as there (done() ends it if the write fails).
    if (!this.entry.witness) {
      const witness = startWitness();
      if (witness) this.entry = { ...this.entry, witness };
    }
    const { heldInRepair: _before, ...rest } = this.entry;
    this.write({ ...rest, step: 'placing', output, dev: st.dev, ino: st.ino, ...(heldInRepair.length ? { heldInRepair } : {}) });
  }

  /** The image, of `processes`, is in place and is the application from
   * the first of them set to die with appshot on. On disk before any of
   * them is: a power loss once one was set to die ends the application
   * too, and the next boot must find the entry that names its image
   * (keptAfterRestart), not an older one, or none. */
  ending(processes: ImageProcess[], connectionsInRepair: number): void {
    this.write({ ...this.entry, step: 'ending', processes, connectionsInRepair }, true);
  }

  /** The witness dies with us from here, before any thread of the
   * application does (call it just before Freezer.dieWithUs, from the
   * same thread). */
  witnessDiesWithUs(): void {
    witnessDiesWithUs(this.entry.witness);
  }

  /** The witness no longer dies with us (after Freezer.liveOn: the last
   * to stop dying, as it was the first to start). */
  witnessLivesOn(): void {
    witnessLivesOn(this.entry.witness);
  }

  /** The snapshot, failing past "ending", took its connections out of
   * repair mode (the application still dies with it): killed from here
   * on, the next command finds nothing only the image could carry on. */
  connectionsReleased(): void {
    this.write({ ...this.entry, connectionsInRepair: 0, heldInRepair: undefined });
  }

  /** Undone by the snapshot, which failed past "ending": its application
   * no longer dies with it, and its image goes. */
  rollingBack(): void {
    this.write({ ...this.entry, step: 'rolling-back' });
  }

  /** Finished (released), or undone by the snapshot itself. */
  done(): void {
    this.stopAppending();
    endWitness(this.entry.witness);
    if (this.written) rmSync(this.path, { force: true });
  }
}

/** Whether `path` is still what the snapshot renamed there. */
function stillPlaced(e: EndingEntry): boolean {
  if (!e.output) return false;
  try {
    const st = lstatSync(e.output);
    return st.dev === e.dev && st.ino === e.ino;
  } catch {
    return false;
  }
}

/** What keeps the image's processes from being stopped now, as /proc
 * shows it (no ptrace): traced by another, or a thread in state D. */
function obstaclesOf(e: EndingEntry): Obstacle[] {
  const found: Obstacle[] = [];
  for (const p of e.processes ?? []) {
    if (!isSameProcess(p.pid, p.startTime)) continue;
    const tracer = tracerOf(p.pid);
    if (tracer && tracer !== process.pid) found.push({ ...p, tracer });
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${p.pid}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) if (readStat(Number(tid))?.state === 'D') found.push({ ...p, tid: Number(tid) });
  }
  return found;
}

function tracerOf(pid: number): number {
  try {
    return Number(/^TracerPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** Whether `o` is still in the way. */
function stillInTheWay(o: Obstacle): boolean {
  if (!isSameProcess(o.pid, o.startTime)) return false;
  if (o.tracer) return tracerOf(o.pid) === o.tracer;
  return o.tid !== undefined && readStat(o.tid)?.state === 'D';
}

/** An "ending" entry a command could not decide lately, and whose
 * obstacle (if one was seen) is still there: a command that only looks
 * leaves it for later, rather than wait and stop the application again. */
function decidedNotNow(e: EndingEntry): boolean {
  const u = e.undecided;
  if (e.step !== 'ending' || !u) return false;
  // A clock set back counts as the back-off over.
  const age = Date.now() - u.at;
  if (age < 0 || age >= UNDECIDED_BACKOFF_MS) return false;
  return u.obstacles.length === 0 || u.obstacles.some(stillInTheWay);
}

/** APPSHOT_DEBUG=1: what the settling of an entry does (tests count it). */
function debug(what: string): void {
  if (process.env.APPSHOT_DEBUG) process.stderr.write(`appshot: ${what}\n`);
}

export interface RecoverOptions {
  /** The command only looks (ps, ls, logs...): an entry tried lately and
   * left undecided is left for later (UNDECIDED_BACKOFF_MS). */
  lookOnly?: boolean;
}

/** Finishes the endings of snapshots whose owner is gone (see above). */
export async function recoverEndings(home = defaultHome(), opts: RecoverOptions = {}): Promise<void> {
  const dir = join(home, 'tmp');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  // Claims of recoverers that were killed themselves go back first, to be
  // taken again below (a claim's next version, cut short, goes).
  let taken = false;
  for (const name of names) {
    const r = CLAIM.exec(name);
    if (r && !isSameProcess(Number(r[2]), Number(r[3])))
      try {
        if (r[4]) rmSync(join(dir, name), { force: true });
        else renameSync(join(dir, name), join(dir, r[1]));
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
    const entry = join(dir, name);
    if (opts.lookOnly) {
      let seen: EndingEntry | undefined;
      try {
        seen = parseEntry(readFileSync(entry, 'utf8'));
      } catch {
        /* claimed by another meanwhile, or unreadable: as below */
      }
      if (seen && decidedNotNow(seen)) {
        debug(`the ending of '${seen.aid}' (a killed snapshot) is left undecided for now: tried ${Math.round((Date.now() - seen.undecided!.at) / 1000)} s ago; a command acting on it tries again`);
        continue;
      }
    }
    // Taken by one command only: two that start at once would both act.
    const claimed = join(dir, `.${name}.recovering-${me.pid}-${me.startTime}`);
    try {
      renameSync(entry, claimed);
    } catch {
      continue;
    }
    let e: EndingEntry;
    try {
      e = parseEntry(readFileSync(claimed, 'utf8'));
    } catch {
      // Cut short or not ours to read: nothing can be done with it.
      rmSync(claimed, { force: true });
      continue;
    }
    try {
      if (e.boot && thisBoot() && e.boot !== thisBoot()) keptAfterRestart(home, e);
      else if (e.step === 'holding') {
        // A witness started before the freeze (EndingJournal.witnessed):
        // no thread was set to die yet, it says nothing.
        endWitness(e.witness);
        releaseLeftInRepair(e.heldInRepair ?? []);
      }
      else if (e.step === 'placing' || e.step === 'rolling-back') rollBack(home, e);
      else if (e.step === 'ending') await finishEnding(home, e, claimed);
    } catch {
      // Half done (a full disk, an application that would not stop): given
      // back, for the next command to finish; every step above can be
      // taken again. Noted, with what was in the way, so that commands
      // that only look do not each wait and stop the application again.
      if (e.step === 'ending')
        try {
          writeEntry(claimed, { ...e, undecided: { at: Date.now(), obstacles: obstaclesOf(e) } });
        } catch {
          /* given back as it was */
        }
      renameSync(claimed, entry);
      continue;
    }
    rmSync(claimed, { force: true });
  }
}

/** A claim on an entry: its name, the claiming command's PID and start
 * time, and ".tmp" for its next version being written. */
const CLAIM = /^\.(.+)\.recovering-(\d+)-(\d+)(\.tmp)?$/;

/** Steps "placing" and "rolling-back": the image goes, the application
 * runs on. */
function rollBack(home: string, e: EndingEntry): void {
  endWitness(e.witness);
  // The application runs on: what the dead snapshot held in repair mode
  // leaves it (taken again from the application by pidfd_getfd).
  releaseLeftInRepair(e.heldInRepair ?? []);
  if (stillPlaced(e)) rmSync(e.output!, { recursive: true, force: true });
  try {
    dropKept(home, e.aid);
  } catch {
    /* no keeper was handed anything */
  }
}

/** An entry of an earlier boot, at any step: its application died with
 * the system (a power loss, a crash), whatever the snapshot was doing,
 * and its PIDs, witness and sockets name nothing of it now. An image
 * still in place is all that is left of the application: kept, never
 * removed (it was made durable before it was renamed there, so in place
 * it is whole), and the registration released to it as the snapshot
 * would have, so that `ps -a` lists it as snapshotted into the image and
 * its AID is free for the restore. Told once on standard error. Its
 * inode only is compared: device numbers may change from boot to boot. */
function keptAfterRestart(home: string, e: EndingEntry): void {
  if (!e.output) return;
  try {
    if (lstatSync(e.output).ino !== e.ino) return;
  } catch {
    return;
  }
  const reg = new LocalRegistry(home);
  const record = sameApplication(reg, e);
  if (record) {
    if (!existsSync(join(record.stateDir, 'released'))) reg.markReleased(record, e.output);
    reg.setAsideLog(record);
    reg.release(record);
  }
  process.stderr.write(`appshot: the snapshot of '${printable(e.aid)}' to ${printable(e.output)} was cut short by a restart of the system (a power loss?), which ended the application: its image is kept, and is the application now\n`);
}

/** The registration the entry names, if it still is that application's. */
function sameApplication(reg: LocalRegistry, e: EndingEntry): AppRecord | undefined {
  const record = reg.get(e.aid);
  if (!record || record.initPid !== e.initPid || (record.initStartTime ?? 0) !== e.initStartTime) return undefined;
  return record;
}

/** Stops (ptrace) what is left of the application; `whole`: every process
 * of the image is among what stopped, the same process. A process sent
 * SIGKILL (by appshot's death, its threads set to die with it) never
 * enters a ptrace stop again, whether the signal is still pending or it
 * is already exiting: stopped, it was not dying. And the SIGKILL was sent
 * before this looks: the kernel sends it as the dead tracer exits, before
 * it is seen gone (holderAlive). Throws (all let go) if it cannot stop
 * them (traced by another, a thread that does not stop). */
function holdApplication(reg: LocalRegistry, record: AppRecord, e: EndingEntry): { freezer?: Freezer; whole: boolean } {
  const initPid = reg.trustedInitPid(record);
  if (isEnded(record) || !initPid) return { whole: false };
  const image = e.processes ?? [];
  // Only processes that still are the application's (as the snapshot
  // chose them): its init's children are found by the freezer.
  const roots = image.filter((p) => isSameProcess(p.pid, p.startTime) && addon().pidBelongs(p.pid, initPid, record.tables)).map((p) => p.pid);
  const freezer = new Freezer(roots, initPid);
  debug(`the ending of '${e.aid}' (a killed snapshot): stopping the application to decide it`);
  try {
    freezer.freeze(HOLD_TIMEOUT_MS);
  } catch (err) {
    // Those it stopped before it failed (another tracer met) go on.
    freezer.resume();
    throw err;
  }
  const whole = image.length > 0 && image.every((p) => freezer.processes.has(p.pid) && readStat(p.pid)?.startTime === p.startTime);
  return { freezer, whole };
}

/** Step "ending": rolled back if the whole application is there and none
 * of it dying; else the image is the application, whose rest is ended and
 * whose registration is released to the image. */
async function finishEnding(home: string, e: EndingEntry, claimed: string): Promise<void> {
  const reg = new LocalRegistry(home);
  const record = stillPlaced(e) ? sameApplication(reg, e) : undefined;
  if (!record) {
    endWitness(e.witness);
    return;
  }
  // Released already (the snapshot, or a recovery, was killed just after).
  if (existsSync(join(record.stateDir, 'released'))) {
    endWitness(e.witness);
    return endIntoImage(reg, record, e);
  }
  // The witness alive and not dying: no thread of the application was set
  // to die, whatever processes of it exited by themselves since (hours
  // ago, maybe). Rolled back without looking at the application (ended
  // either way).
  if (witnessUntouched(e.witness, HOLD_TIMEOUT_MS) && !e.connectionsInRepair) {
    writeEntry(claimed, { ...e, step: 'rolling-back' });
    killPoint('ending: rolling back');
    rollBack(home, e);
    return;
  }
  const { freezer, whole } = holdApplication(reg, record, e);
  killPoint('ending: application stopped');
  // Connections left in repair mode by the dead snapshot are the keeper's,
  // held for the image's restore, from this step on: the image wins.
  if (whole && !e.connectionsInRepair) {
    // Journaled first (the claim, given back if this command is killed):
    // decided once, whatever the application does once let go.
    try {
      writeEntry(claimed, { ...e, step: 'rolling-back' });
      killPoint('ending: rolling back');
      rollBack(home, e);
    } finally {
      freezer!.resume();
    }
    return;
  }
  // In the snapshot's own order: dies with us, released, its log set
  // aside, then killed (killed first, its init could remove the
  // registration, log and all, as soon as it saw "released", before the
  // log was set aside). Held stopped meanwhile, so that it writes nothing
  // more.
  try {
    freezer?.dieWithUs();
    reg.markReleased(record, e.output!);
  } catch (err) {
    // Decided: what is left ends (the entry, given back, is finished by
    // the next command), never held stopped while this command goes on.
    freezer?.kill();
    throw err;
  }
  await endIntoImage(reg, record, e, freezer);
}

/** What is left of an application released to its image: its log set
 * aside (if it was not yet), its processes killed (those `held` first,
 * whose exits are taken so that its init sees them go), and its
 * registration gone. */
async function endIntoImage(reg: LocalRegistry, record: AppRecord, e: EndingEntry, held?: Freezer): Promise<void> {
  reg.setAsideLog(record);
  held?.kill();
  if (!isEnded(record)) signalProcesses(reg, record, 'SIGKILL');
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
