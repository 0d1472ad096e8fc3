/**
 * The AID registry (the specification's AID generator): which applications
 * exist on this node and where their tables and state live.
 *
 * `Registry` is the interface the rest of appshot uses; `LocalRegistry` keeps
 * it in a state directory, one directory per AID. Registration is atomic
 * because mkdir(2) is: of two `appshot run --aid X` at once, exactly one
 * creates apps/X. A farm-wide backend on a distributed store implements the
 * same interface later.
 */
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  fstatSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  realpathSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { type BigIntStats, constants as fsConstants, type Stats, utimes } from 'node:fs';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { AppshotError, ExitCode, printable } from './errors.js';
import { addon, type InstanceConfig, type ProcessFacts, type TablesSnapshot } from './native.js';
import { isSameProcess } from './procfs.js';
import { noteHeld, uniqueTag, currentHolder, formatHolder, holderAlive, parseHolder, type Holder } from './holder.js';
import { currentRequest } from './engine/request.js';
import { lexists, type MadeDir, overlaps, plainAbsolute, prepareRedirTargets, type RedirTargetsAs, removeRedirTargets, removeWalked } from './resources/paths.js';
import { logTimesPath } from './logtimes.js';
import { killPoint } from './killpoint.js';
import { plural } from './words.js';

export interface AppRecord {
  aid: string;
  /** Path of the translation tables in /dev/shm. */
  tables: string;
  /** This AID's directory in the state directory. */
  stateDir: string;
  command: string[];
  cwd: string;
  createdAt: string;
  detached: boolean;
  /** Output of a detached application. */
  logPath?: string;
  /** Set once the application has ended (from the file "exit" that its
   * init writes): the record stays, with its log, until `appshot rm` or
   * `appshot prune`, as docker keeps an exited container. */
  state?: 'exited';
  /** The exit code of virtual PID 2 (128 + N if killed by signal N);
   * absent if `lost`. */
  exitCode?: number;
  /** Ended without a word: its init was killed (SIGKILL) with the
   * application, so nobody wrote how it ended. Only an application with
   * data made for it alone (privateRoot, madeDirs) is kept so, for `rm`
   * to remove that data; any other is released at once (settle). */
  lost?: true;
  endedAt?: string;
  /** The image it was restored from (`appshot restore`). */
  image?: string;
  /** REDIR PATH target directories made for it by `run --rules`
   * (a clone's are in restore.madeDirs); `appshot rm` removes them,
   * unless an image was taken of it (imagedTo). */
  madeDirs?: MadeDir[];
  /** The last image taken of it with --leave-running ('-': a stream),
   * noted only if directories were made for it (madeDirs): the files it
   * wrote there are not in the image, whose restore needs them, so `rm`
   * keeps them and says so, as for a snapshot that ended it. */
  imagedTo?: string;
  /** The directories its REDIR PATH targets lead into, made for it or
   * not (paths.ts redirLeaves): while it is registered, no other's rm
   * removes one of them (releaseRedirTargets). */
  redirLeaves?: string[];
  /** The `appshot run` (or restore, or clone) that registered it, until
   * the supervisor is known; in the engine, also the request
   * (holder.ts), which ends long before the engine does. */
  harnessPid: number;
  harnessStartTime?: number;
  harnessRequest?: string;
  /** The application's supervisor, virtual PID 1. */
  initPid?: number;
  initStartTime?: number;
  /** The tables' key salt (hex) and when they were made (seconds since the
   * epoch), kept here because the table file is writable by every process
   * of the application, whatever its uid: what `release` removes is
   * checked against these (see appshot_ipc_owned). */
  keySalt?: string;
  tablesCreated?: number;
  /** The last image taken with --leave-running: the next snapshot is
   * incremental against it. */
  lastImage?: {
    path: string;
    id: string;
    /** Processes (system PID:start time) whose writes since this image are
     * tracked; the others are compared page by page. */
    tracked?: string[];
  };
  /** Where dirty tracking keeps a userfaultfd in each process (system
   * PID:start time → descriptor number); never part of an image. */
  tracking?: Record<string, number>;
  /** The rules it runs under (`run --rules`, or its template's). */
  rules?: { source: string; text: string };
  /** `run`: the serial of the session keyring its processes inherited
   * from whoever ran it (a login session's, pam_keyinit's): the
   * session's, not the application's (keyrings.ts dumpSessionKeyring). */
  launchKeyring?: number;
  /** A clone: the template it was stamped from and its number in the batch. */
  template?: { path: string; instance: number };
  /** A clone's private copies of files (copy-on-write, duplicate): kept
   * when it is snapshotted and restored. */
  privateRoot?: string;
  /** Held ready by the engine for a clone to come (template/pool.ts), not
   * yet taken: `ps` lists it only with -a. Gone once a clone takes it. */
  heldReady?: boolean;
  /** TCP ports it listens on that the registry knows of: `virtual` is the
   * port the application asks for, `system` the one it has. */
  ports?: PortBinding[];
  /** A restore or clone under way: the file whose existence commits it
   * (see appshot-init), and what it made outside its registry directory,
   * removed with the registration if it never committed. */
  restore?: {
    commitPath: string;
    /** Directories made for this instance and nothing else (a clone's
     * private copies), removed whole. */
    madePaths: string[];
    /** REDIR PATH target directories it made (see prepareRedirTargets). */
    madeDirs: MadeDir[];
    /** Named POSIX message queues it made (resources/mqueue.ts): a queue
     * outlives every process, so a restore killed before its commit would
     * leave it on the node, and the next restore would take it for the
     * application's. */
    madeQueues?: string[];
    /** Names it gave socket files that the application does not have
     * (resources/socketfile.ts: `.appshot-bound-*`, a name the
     * application renamed or removed its file from), written before the
     * file is there, with the identities it was made as: a restore killed
     * before its commit would leave a stale socket file there. */
    madeSocketFiles?: MadeSocketFile[];
    /** Names a deleted executable's copy was made at for an instant
     * (resources/deleted.ts madeAtItsName: the program's own name),
     * written before it is made, with the identities it was made as: a
     * restore killed in that instant would leave an empty file there. */
    madeExecutableNames?: MadeSocketFile[];
    /** REDIR PATH copies it was about to make (RestoreContext
     * recordRedirCopyPlanned), each written before it is made: removed
     * if the restore never commits, unless another application uses
     * them (releaseRedirCopies). */
    redirCopies?: string[];
    /** The names those copies were being made under (privateCopy's
     * `NAME.appshot-PID-XXXXXXXX`), written before each is made: this
     * restore's alone, removed if it never commits. */
    redirTemporaries?: string[];
    /** It took over the log its image's application left (see
     * adoptCarriedLog): given back if the restore never commits. */
    adoptedLog?: boolean;
    /** It took over the record of its AID's snapshot (adoptSnapshot):
     * given back likewise. */
    adoptedSnapshot?: boolean;
  };
}

/**
 * An application that a snapshot ended, as `ps -a` shows it until the
 * restore of its image under its AID takes its place (adoptSnapshot), or
 * `rm` or `prune` removes it: as docker keeps a checkpointed container.
 * Kept outside apps/ (snapshotted/AID.json), so that the AID's
 * registration is free at once for that restore, as it always was; only a
 * restore takes it over, `run` and `clone` under that AID are refused.
 */
export interface SnapshottedRecord {
  aid: string;
  state: 'snapshotted';
  /** The image it went into ('-': a stream on standard output). */
  image: string;
  snapshottedAt: string;
  command: string[];
  detached: boolean;
  /** When the application was run, restored or cloned. */
  createdAt: string;
  template?: { path: string; instance: number };
  /** A clone's private copies: its image needs them, so `rm` of this
   * record leaves them (the restored application's `rm` takes them). */
  privateRoot?: string;
  /** Its REDIR PATH directories (AppRecord's): its image needs them. */
  redirLeaves?: string[];
  /** Of those, the ones made for it (AppRecord madeDirs' leaves): `rm` of
   * this record keeps them and names them (keptForImage). */
  madeDirs?: string[];
}

/** A REDIR PATH directory kept for an image (Registry keepRedirLeaves),
 * with its identity then (a directory made anew in its place is not it). */
interface KeptLeaf {
  leaf: string;
  dev: string;
  ino: string;
}

/** How the marks of kept directories are named in redirs/, beside those
 * of directories kept for others (releaseRedirTargets). */
const KEPT_MARK = 'kept-';

/** The leaves of the REDIR PATH directories made for `record`. */
function madeLeaves(record: AppRecord): string[] {
  return [...new Set([...(record.restore?.madeDirs ?? []), ...(record.madeDirs ?? [])].map((m) => m.leaf))];
}

/** What `rm` says of the directories it keeps for an image (one line).
 * The paths are written printable: a REDIR PATH target comes from the
 * rules or from an image, which anyone may have written, and a newline
 * or an escape sequence in one would forge a line or drive the terminal
 * (the AID is of AID_PATTERN's characters only). */
export function keptForImage(aid: string, image: string, dirs: string[]): string {
  const where = image === '-' ? 'a stream on standard output' : printable(image);
  return `'${aid}': kept the REDIR PATH directories made for it, whose files its image ${where} needs and does not hold: ${dirs.map(printable).join(', ')} (rm -r them once that image is not to be restored)`;
}

export interface PortBinding {
  virtual: number;
  system: number;
  /** allocate: a port of its own from the registry; multiplex: the one
   * well-known port, shared with the other instances (SO_REUSEPORT). */
  mode: 'allocate' | 'multiplex';
}

/** Where allocated ports come from: APPSHOT_PORTS=FIRST-LAST. */
export function portRange(): [number, number] {
  const spec = process.env.APPSHOT_PORTS ?? '20000-29999';
  const m = /^(\d+)-(\d+)$/.exec(spec);
  const [lo, hi] = m ? [Number(m[1]), Number(m[2])] : [NaN, NaN];
  if (!(lo >= 1024 && hi <= 65535 && lo <= hi))
    throw new AppshotError(`APPSHOT_PORTS='${spec}': expected FIRST-LAST within 1024-65535`, ExitCode.usage);
  return [lo, hi];
}

/** Fills in a new registration, given where its state and tables go. */
export type RecordFill = (stateDir: string, tables: string) => Omit<AppRecord, 'aid' | 'stateDir' | 'tables'>;

export interface Registry {
  /** The state directory ($APPSHOT_HOME). */
  readonly home: string;
  /** Claims an AID; throws (ExitCode.conflict) if it is taken, or held by
   * the record of a snapshot, unless `restoring` (a restore takes that
   * record over: adoptSnapshot). */
  register(aid: string, fill: RecordFill, opts?: { restoring?: boolean }): AppRecord;
  /** Claims a fresh generated AID. */
  registerGenerated(fill: RecordFill): AppRecord;
  update(record: AppRecord): void;
  get(aid: string): AppRecord | undefined;
  /** Like get, but a missing or ended AID is an error naming it. */
  require(aid: string): AppRecord;
  /** Like require, but an ended application is returned too. */
  requireAny(aid: string): AppRecord;
  /** Running and ended applications. */
  list(): AppRecord[];
  /** Removes everything an application left: IPC objects, tables, state. */
  release(record: AppRecord): void;
  /** The record as it stands: released (undefined) only once nothing of
   * the application runs; throws when that cannot be told. */
  settle(record: AppRecord): AppRecord | undefined;
  /** `appshot rm`: removes an ended application's record and log, and what
   * was made for it alone (private copies, REDIR PATH directories). */
  remove(record: AppRecord): void;
  /** REDIR PATH target directories made for an instance (makeRedirTargets),
   * and let go (releaseRedirTargets) unless another still leads into them. */
  makeRedirTargets(redirs: InstanceConfig['redirs'], as?: RedirTargetsAs): MadeDir[];
  releaseRedirTargets(made: MadeDir[], going: Iterable<string>): void;
  /** REDIR PATH copies a failed instance made itself, removed unless
   * another application leads into them (releaseRedirCopies). */
  releaseRedirCopies(copies: string[], going: Iterable<string>): void;
}

const AID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/**
 * Whether `path` is a directory of a clone's private copies in state
 * directory `home`: `instances/AID.XXXXXXXX` (template/clone.ts), the only
 * kind of directory a record's privateRoot may name, and `rm` removes. A
 * record's privateRoot can come from an image, which anyone may have
 * written (the fuzzing found `rm` removing what an image named).
 */
export function isPrivateRoot(home: string, path: string): boolean {
  return dirname(path) === join(home, 'instances') && isPrivateRootName(path);
}

/** Whether `path` has the shape of a clone's private copies directory in
 * some state directory (`…/instances/AID.XXXXXXXX`, every component plain):
 * what a template's image may name (templates travel between nodes). */
export function isPrivateRootName(path: string): boolean {
  const name = basename(path);
  return (
    path.startsWith('/') &&
    path.slice(1).split('/').every((c) => c !== '' && c !== '.' && c !== '..') &&
    basename(dirname(path)) === 'instances' &&
    /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.[0-9a-f]{8}$/.test(name) &&
    !name.includes('..')
  );
}

export function checkAid(aid: string): void {
  if (!AID_PATTERN.test(aid))
    throw new AppshotError(
      `invalid AID '${aid}': use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit`,
      ExitCode.usage,
    );
}

/** Removes an AID's directory so that no one ever sees it half-removed:
 * renamed first (atomic) to a hidden name that is no AID, then deleted. A
 * remover killed in between leaves only the hidden name, which the next
 * listing sweeps away. appshot-init removes it the same way. */
/** An AID's state directory made, as a registration or a hold claims it
 * (mkdir: nothing there before); false if something is there already. */
function makeStateDir(stateDir: string): boolean {
  try {
    mkdirSync(stateDir, { mode: 0o700 });
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

function removeDir(dir: string): void {
  const doomed = join(dirname(dir), `.${basename(dir)}.removed-${uniqueTag()}`);
  try {
    renameSync(dir, doomed);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  rmSync(doomed, { recursive: true, force: true });
}

/** A record written whole over DIR/app.json (written aside, renamed). */
function writeRecordFile(dir: string, record: AppRecord): void {
  const file = join(dir, 'app.json');
  writeFileSync(`${file}.tmp`, JSON.stringify(record, null, 2));
  renameSync(`${file}.tmp`, file);
}

/** The refusal of a write or removal for a registration that has gone
 * (another, or none, under its AID now): ENOENT, as for a state directory
 * removed meanwhile. */
function registrationGone(record: AppRecord): NodeJS.ErrnoException {
  const e: NodeJS.ErrnoException = new Error(`'${record.aid}': its registration has gone (removed, or another made under its AID since)`);
  e.code = 'ENOENT';
  return e;
}

/** The registration whose record is DIR/app.json, read; undefined if
 * there is none to read (a directory claimed and not yet written). */
function recordIn(dir: string): AppRecord | undefined {
  try {
    return JSON.parse(readFileSync(join(dir, 'app.json'), 'utf8')) as AppRecord;
  } catch {
    return undefined;
  }
}

/**
 * removeDir of `record`'s state directory, only if it still is that
 * registration's (review r451 F1: a release of a record read before its
 * registration went removed the next registration's directory, whose
 * application then ran unregistered). Node has no unlinkat, so the
 * directory cannot be removed through a descriptor; it is renamed aside
 * first (atomic: from then on no one can register the AID into it or
 * make it anyone else's), and only then is the record in it checked. Not
 * the registration's, or no record in it: put back where it was
 * (RENAME_NOREPLACE: never over a directory claimed meanwhile). The record is checked before the
 * rename too, so that the usual case (another registration there
 * already) never moves it at all: only one made between that check and
 * the rename is moved and put back, unseen for that instant. Should the
 * AID have been claimed in that instant too, it cannot be put back: it
 * is left under a hidden name the listing does not sweep, and said.
 */
function removeStateDirOf(record: AppRecord): void {
  const dir = record.stateDir;
  const before = recordIn(dir);
  if (before && !sameRegistration(before, record)) return;
  // Test-only: where a test registers the AID again, to be moved aside
  // and put back (test/reregistered.test.ts).
  killPoint('release: state directory checked');
  const doomed = join(dirname(dir), `.${basename(dir)}.removed-${uniqueTag()}`);
  try {
    renameSync(dir, doomed);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  // No record to read is no proof either: a registration that has
  // claimed the directory and not yet written its first record (the one
  // released had one: it was read).
  const inside = recordIn(doomed);
  if (inside && sameRegistration(inside, record)) {
    rmSync(doomed, { recursive: true, force: true });
    return;
  }
  try {
    try {
      addon().renameNoReplace(doomed, dir);
    } catch (e) {
      // A file system without RENAME_NOREPLACE (as claim falls back):
      // put back unless something is there, with only that check.
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL' || lexists(dir)) throw e;
      renameSync(doomed, dir);
    }
  } catch (e) {
    const kept = join(dirname(dir), `.${basename(dir)}${DISPLACED}${uniqueTag()}`);
    renameSync(doomed, kept);
    process.stderr.write(
      `appshot: warning: ${printable(`'${record.aid}': another registration's state directory was moved aside and cannot be put back (${(e as Error).message}): it is left at ${kept}`)}\n`,
    );
  }
}

/** The mark of a state directory removeStateDirOf could not put back. */
const DISPLACED = '.displaced-';

/** Whether an application has ended (its record kept until `appshot rm`). */
export function isEnded(record: AppRecord): boolean {
  return record.state === 'exited';
}

/** Whether an application is still being restored: registered by a
 * restore that has not committed (its processes made, none of them run;
 * `appshot serve` holds a prepared instance so until a connection comes). */
export function isRestoring(record: AppRecord): boolean {
  const r = record.restore;
  return !isEnded(record) && !!r && !existsSync(join(record.stateDir, 'committed')) && !existsSync(r.commitPath);
}

/** Whether the command that registered `record` (its `appshot run`, or
 * the engine request that ran it) still lives: until it has written the
 * supervisor's PID, the registration is that command's to finish. */
export function registeringAlive(record: AppRecord, home: string): boolean {
  return holderAlive({ pid: record.harnessPid, startTime: record.harnessStartTime ?? 0, request: record.harnessRequest }, home);
}

/** Whether `a` and `b` are records of one registration, not of two made
 * under one AID one after the other: each registration has a table file
 * of its own, its name random and the file made exclusively
 * (finishRegistration), and keeps it. Not the harness's PID and start
 * time (an API user's one process may register an AID again), nor
 * createdAt (milliseconds). */
export function sameRegistration(a: AppRecord, b: AppRecord): boolean {
  return a.tables === b.tables;
}

/** The refusal of a command that read `aid` as one application, waited
 * for its supervisor, and found another registered under that AID. */
export function replacedWhileWaiting(aid: string): AppshotError {
  return new AppshotError(
    `'${aid}' went while this command waited for its supervisor, and another application has been registered as '${aid}' since: that one was left as it is (run the command again to act on it)`,
    ExitCode.failure,
  );
}

/** "exited with code 0 at 2026-11-30T12:00:00.000Z" */
export function describeEnd(record: AppRecord): string {
  if (record.lost) return `lost: its init was killed, no exit code; found ended at ${record.endedAt}`;
  return `exited with code ${record.exitCode} at ${record.endedAt}`;
}

/** Whether `record` has data made for it alone on disk (a clone's private
 * copies, the REDIR PATH directories made for it) that only `rm` of its
 * record removes: a restore that never committed has none (release
 * removes what it made). */
function holdsMadeData(record: AppRecord): boolean {
  const r = record.restore;
  if (r && !existsSync(join(record.stateDir, 'committed')) && !existsSync(r.commitPath)) return false;
  return !!record.privateRoot || !!record.madeDirs?.length || !!r?.madeDirs.length;
}

/** "snapshotted to /x/db.appshot at 2026-11-30T12:00:00.000Z" */
export function describeSnapshot(record: SnapshottedRecord): string {
  return `snapshotted to ${record.image === '-' ? 'a stream on standard output' : record.image} at ${record.snapshottedAt}`;
}

/** The file appshot-init writes when the last process of an application
 * ends: "CODE MILLISECONDS". */
function readExitFile(stateDir: string): { exitCode: number; endedAt: string } | undefined {
  let text: string;
  try {
    text = readFileSync(join(stateDir, 'exit'), 'utf8');
  } catch {
    return undefined;
  }
  const [code, ms] = text.trim().split(' ').map(Number);
  if (!Number.isInteger(code) || !Number.isFinite(ms)) return undefined;
  return { exitCode: code, endedAt: new Date(ms).toISOString() };
}

export { defaultHome } from './home.js';
import { defaultHome, makeHome } from './home.js';

/** A commit file outlives its driver by this long at least: every init of
 * its batch has seen it by then. */
const COMMIT_KEPT_MS = 60_000;
/** How often a process sweeps the commit files (newCommitPath). */
const COMMIT_SWEEP_MS = 30_000;
/** When this process last swept each commits directory. */
const commitsSwept = new Map<string, number>();
/** What a commit file is made as ahead of its commit (newCommitPath). */
const PENDING = '.pending';
/** In an AID's state directory held without a registration
 * (Registry.withAidHeld): who holds it, "PID START [REQUEST]". */
const HELD_BY = '.held-by';
/** Commit files being made ahead: whether made (ready), and whether
 * their restore is over (done: committed or given up), after which one
 * made late is removed. */
const pendingCommits = new Map<string, { ready: boolean; done: boolean; made: Promise<void> }>();

/**
 * State directories made ahead of the registrations that take them, in
 * the resident engine (enableSpareStateDirs): each an empty directory with
 * an empty app.json, in $APPSHOT_HOME/engine/spares, made off the event
 * loop while the engine waits. A registration renames one to apps/AID
 * (renameat2 RENAME_NOREPLACE: atomic, and refused if the name is taken,
 * as mkdir is), and writes its record into that app.json: on a busy disk
 * a new directory, a new file and a rename cost ~0.3-0.7 ms each, most of
 * a registration. An app.json that is empty or being written reads as no
 * record, as a state directory without one does: "being registered right
 * now" (get, dropOrphanDir); every later write replaces the file whole
 * (update). A spare holds nothing and names nothing: killed at any
 * instant, what was taken is a registration killed after its mkdir
 * (dropOrphanDir), what was not is removed by the next engine
 * (removeSpareStateDirs).
 */
const SPARES_KEPT = 2;
const spareStateDirs = new Map<string, { ready: { path: string; dirMode: number; fileMode: number }[]; making: number }>();
let sparesEnabled = false;

const sparesDir = (home: string) => join(home, 'engine', 'spares');

/** From now on, registrations in this process take state directories made
 * ahead of time (the engine's; a CLI process registers once). */
export function enableSpareStateDirs(home: string): void {
  sparesEnabled = true;
  refillSpares(realpathSync(home));
}

/** Makes spare state directories of `home` until SPARES_KEPT are ready
 * or being made (the engine, after each request). */
export function refillSpareStateDirs(home: string): void {
  refillSpares(realpathSync(home));
}

/** Removes every spare state directory of `home` (the engine starting,
 * with its lock: any there are a dead engine's; or leaving). */
export function removeSpareStateDirs(home: string): void {
  sparesEnabled = false;
  spareStateDirs.delete(realpathSync(home));
  rmSync(sparesDir(home), { recursive: true, force: true });
}

function refillSpares(home: string): void {
  if (!sparesEnabled) return;
  let kept = spareStateDirs.get(home);
  if (!kept) spareStateDirs.set(home, (kept = { ready: [], making: 0 }));
  const k = kept;
  while (k.ready.length + k.making < SPARES_KEPT) {
    k.making++;
    const path = join(sparesDir(home), `${process.pid}-${randomBytes(6).toString('hex')}`);
    const file = join(path, 'app.json');
    // Made with the modes mkdir and writeFileSync give them now; a
    // registration takes it only if its own umask gives the same.
    mkdir(sparesDir(home), { recursive: true, mode: 0o700 })
      .then(() => mkdir(path, { mode: 0o700 }))
      .then(() => writeFile(file, '', { flag: 'wx' }))
      .then(() => Promise.all([stat(path), stat(file)]))
      .then(
        ([d, f]) => {
          if (spareStateDirs.get(home) === k && sparesEnabled) k.ready.push({ path, dirMode: d.mode & 0o7777, fileMode: f.mode & 0o7777 });
          else rmSync(path, { recursive: true, force: true });
        },
        () => rmSync(path, { recursive: true, force: true }),
      )
      .finally(() => k.making--);
  }
}

/** A spare state directory of `home` whose modes are those a new one would
 * have now, taken; undefined if none. Replaced by refillSpareStateDirs,
 * once the command that took it is over: made meanwhile, its files would
 * compete with the command's own for the disk. The umask is the one the
 * engine set for the request (RequestContext.umask), never read with
 * process.umask(), which sets it to 0 and back: a file the engine's file
 * system pool creates in between (a spare's own, a lease, a concurrent
 * command's) would be made without it, writable by everyone. Outside a
 * request, none is taken. */
function takeSpare(home: string): string | undefined {
  const k = sparesEnabled ? spareStateDirs.get(home) : undefined;
  if (!k?.ready.length) return undefined;
  const umask = currentRequest()?.umask;
  if (umask === undefined) return undefined;
  const i = k.ready.findIndex((s) => s.dirMode === (0o700 & ~umask) && s.fileMode === (0o666 & ~umask));
  return i >= 0 ? k.ready.splice(i, 1)[0].path : undefined;
}

export class LocalRegistry implements Registry {
  readonly home: string;
  private readonly appsDir: string;
  /** Distinguishes this registry's tables in /dev/shm from another's
   * (root's and each user's, or a test's private APPSHOT_HOME). */
  private readonly tag: string;

  private readonly portsDir: string;

  constructor(home = defaultHome()) {
    this.appsDir = join(home, 'apps');
    this.portsDir = join(home, 'ports');
    // Refused if another user could change it (home.ts).
    makeHome(home);
    mkdirSync(this.appsDir, { recursive: true, mode: 0o755 });
    this.home = realpathSync(home);
    this.tag = createHash('sha256').update(this.home).digest('hex').slice(0, 8);
  }

  /** A new name for an application's tables: /dev/shm is writable by
   * everyone, so the name has a random part that no other user can guess
   * and pre-create; the registration records it. */
  private newTablesPath(aid: string): string {
    return `/dev/shm/appshot-${this.tag}-${aid}-${randomBytes(8).toString('hex')}`;
  }

  /** Table files of `aid` that a registration killed before it wrote its
   * record left in /dev/shm: ours (by owner), whatever their random part. */
  private removeLostTables(aid: string): void {
    const name = new RegExp(`^appshot-${this.tag}-${aid.replace(/[.]/g, '\\.')}-[0-9a-f]{16}$`);
    for (const f of readdirSync('/dev/shm')) {
      if (!name.test(f)) continue;
      const path = join('/dev/shm', f);
      try {
        if (lstatSync(path).uid === process.getuid?.()) rmSync(path, { force: true });
      } catch {
        /* gone meanwhile */
      }
    }
  }

  register(aid: string, fill: RecordFill, opts: { restoring?: boolean } = {}): AppRecord {
    checkAid(aid);
    const stateDir = join(this.appsDir, aid);
    if (!this.claim(stateDir) && !(this.dropDeadHold(stateDir) && this.claim(stateDir))) {
      const existing = this.get(aid);
      // A registration whose supervisor and processes are all gone (it was
      // killed with SIGKILL) is reclaimed rather than blocking the name.
      const settled = existing && this.settle(existing);
      if (settled && isEnded(settled))
        throw new AppshotError(`AID '${aid}' is in use by an application that has ended (${describeEnd(settled)}): 'appshot rm ${aid}' removes it`, ExitCode.conflict);
      if (!(existing && !settled && this.claim(stateDir))) throw new AppshotError(`AID '${aid}' is already registered`, ExitCode.conflict);
    }
    // Checked once the AID is held: a snapshot of it cannot write its
    // record meanwhile (it needs the AID registered to run).
    const snapshotted = opts.restoring ? undefined : this.getSnapshotted(aid);
    if (snapshotted) {
      this.claimedSpares.delete(stateDir);
      removeDir(stateDir);
      throw new AppshotError(`AID '${aid}' is in use by an application that was ${describeSnapshot(snapshotted)}: restore the image, or 'appshot rm ${aid}' removes its record`, ExitCode.conflict);
    }
    return this.finishRegistration(aid, stateDir, fill);
  }

  registerGenerated(fill: RecordFill): AppRecord {
    for (;;) {
      const aid = `app-${randomBytes(4).toString('hex')}`;
      const stateDir = join(this.appsDir, aid);
      if (existsSync(this.snapshottedPath(aid))) continue;
      if (this.claim(stateDir)) return this.finishRegistration(aid, stateDir, fill);
    }
  }

  /** State directories claimed from a spare, whose app.json exists and is
   * empty: the first record is written into it (finishRegistration). */
  private readonly claimedSpares = new Set<string>();

  private claim(stateDir: string): boolean {
    const spare = takeSpare(this.home);
    if (spare) {
      try {
        addon().renameNoReplace(spare, stateDir);
        this.claimedSpares.add(stateDir);
        return true;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EEXIST' || code === 'ENOTEMPTY') {
          rmSync(spare, { recursive: true, force: true });
          return false;
        }
        // Another file system (EXDEV), or one without RENAME_NOREPLACE
        // (EINVAL): made here as without spares.
        rmSync(spare, { recursive: true, force: true });
      }
    }
    return makeStateDir(stateDir);
  }

  private finishRegistration(aid: string, stateDir: string, fill: RecordFill): AppRecord {
    const tables = this.newTablesPath(aid);
    try {
      const salt = randomBytes(8).readBigUInt64LE();
      const record: AppRecord = {
        aid,
        stateDir,
        tables,
        ...fill(stateDir, tables),
        keySalt: salt.toString(16),
        // An object is the application's only if the kernel stamped it no
        // earlier than this: read from the kernel's own SysV clock, never
        // Date.now(), which runs ahead of it. Just after a second began,
        // Date.now() says the new second while an object the restore makes
        // a millisecond later still gets the one before (the clock ticks
        // every 4 ms, later under load), and would be kept for ever.
        tablesCreated: addon().ipcClock(),
      };
      // Created exclusively (O_EXCL): a name that exists is never used.
      addon().createTables(tables, aid, salt);
      if (this.claimedSpares.delete(stateDir)) writeFileSync(join(stateDir, 'app.json'), JSON.stringify(record, null, 2), { flag: 'r+' });
      else writeRecordFile(stateDir, record);
      noteHeld('aid', aid);
      return record;
    } catch (e) {
      this.claimedSpares.delete(stateDir);
      removeDir(stateDir);
      rmSync(tables, { force: true });
      throw e;
    }
  }

  /**
   * Writes `record` over its registration's app.json, and only over its
   * own: never over another registration made under the AID since this
   * one went (review r451 F1, F2: a `run` whose init had removed the
   * registration wrote its record over the next one's, whose application
   * then ran unregistered). The state directory is opened once, the
   * record in it checked to be this registration's (sameRegistration),
   * and the new one written and renamed into place through that
   * descriptor (/proc/self/fd/N/, which resolves to the directory itself
   * wherever it is now): what the check saw is what is written to, with
   * no window between them. If the directory was moved aside for removal
   * meanwhile, the write lands there and goes with it; once removed, the
   * kernel refuses new files in it (ENOENT). Another registration there,
   * or none, is refused with ENOENT, as a removed one is: callers that
   * tolerate "removed meanwhile" tolerate it. The first record of a
   * registration is written by finishRegistration, not here.
   */
  update(record: AppRecord): void {
    let fd: number;
    try {
      fd = openSync(record.stateDir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOTDIR' || (e as NodeJS.ErrnoException).code === 'ELOOP') throw registrationGone(record);
      throw e;
    }
    try {
      const dir = `/proc/self/fd/${fd}`;
      let current: AppRecord | undefined;
      try {
        current = JSON.parse(readFileSync(join(dir, 'app.json'), 'utf8')) as AppRecord;
      } catch {
        current = undefined;
      }
      if (!current || !sameRegistration(current, record)) throw registrationGone(record);
      writeRecordFile(dir, record);
    } finally {
      closeSync(fd);
    }
  }

  /** `aid`'s app.json as written, nothing settled; undefined if it cannot
   * be read. */
  private readRecordFile(aid: string): AppRecord | undefined {
    try {
      return JSON.parse(readFileSync(join(this.appsDir, aid, 'app.json'), 'utf8')) as AppRecord;
    } catch {
      return undefined;
    }
  }

  get(aid: string): AppRecord | undefined {
    if (!AID_PATTERN.test(aid)) return undefined;
    const stateDir = join(this.appsDir, aid);
    const record = this.readRecordFile(aid);
    // Registered this instant but not written yet, or half-removed by a
    // supervisor that is cleaning up: either way, not an app to act on.
    if (!record) return undefined;
    // The file init wrote when the last process ended is the truth, even
    // over an app.json written after it (a harness that was slow to note
    // its init's PID).
    const end = readExitFile(stateDir);
    if (end && (record.state !== 'exited' || record.endedAt !== end.endedAt)) {
      // Its port claims are stale from now on (portClaimIsStale): taken
      // back by the next sweep or claim. Not here: get is called under the
      // ports lock.
      Object.assign(record, { state: 'exited', ...end });
      try {
        this.update(record);
      } catch {
        /* removed meanwhile, or another reader wrote the same */
      }
    }
    return record;
  }

  require(aid: string): AppRecord {
    const record = this.requireAny(aid);
    if (isEnded(record))
      throw new AppshotError(`'${aid}' is not running (${describeEnd(record)}; 'appshot rm ${aid}' removes it)`, ExitCode.failure);
    return record;
  }

  /** require, for a command that needs the application's supervisor:
   * `appshot run` writes its PID into the record just after starting it,
   * and the command it runs may print (and a person or a test act on
   * that) before then. While the registration is that young (its
   * supervisor not yet named, the command that made it alive), the record
   * is read again, for at most `waitMs`; at once if that command is gone.
   * `first`: the record as the caller read it, if it has (the wait is for
   * that registration).
   *
   * Another registration found under the AID meanwhile (the first
   * released, and a new `run --aid` of the same name) is refused in one
   * line, exit 1, nothing done (review r436 A5). Not taken as the one
   * meant: the command would kill, stop, remove or snapshot (and so end)
   * an application started after it read the AID, which it never saw and
   * would not have reached without this wait; whoever restarts the
   * application under its name may be doing so that instant. Nor taken as
   * the first one's end ('released': stop and rm -f would print the AID,
   * exit 0, while `ps` lists it running). The user names it again if
   * that one is meant. */
  async requireSupervised(aid: string, first = this.require(aid), waitMs = 10_000): Promise<AppRecord> {
    const until = Date.now() + waitMs;
    let record = first;
    let pause = 5;
    // How many times the record was read again, and whether the wait ended
    // because the run was gone: APPSHOT_DEBUG says both when the wait ends
    // with no supervisor on record, and nothing when one was found (a test
    // counts the reads: one, when that run was gone before the wait began).
    let reads = 0;
    let registering = true;
    // `run` writes the PID with no await after starting init: once the
    // command that registered it is gone, it never will (review r422 F1).
    while (!record.initPid && Date.now() < until) {
      // Test-only: where a test replaces the registration (review r436 A5).
      killPoint('supervisor: reading the record again');
      // Whether it lives, looked at before the record is read again: a run
      // that wrote the PID and then left is seen by that read (review r438
      // F8: read first, it could be found gone with the PID unseen).
      registering = registeringAlive(record, this.home);
      record = this.requireSame(first);
      reads++;
      if (record.initPid || !registering) break;
      // From 5 ms up to 50: the wait is for a process that wants the CPU.
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 50);
    }
    if (!record.initPid && process.env.APPSHOT_DEBUG) {
      const why = registering ? `none was recorded within ${waitMs / 1000} s` : 'the appshot run that registered it is gone';
      process.stderr.write(`appshot: '${aid}': no supervisor in the registration's record after reading it again ${plural(reads, 'time')}: ${why}\n`);
    }
    return record;
  }

  /** require, of the registration `first` is a record of: another made
   * under its AID since is refused (requireSupervised), and so is its end
   * (not the first one's). */
  private requireSame(first: AppRecord): AppRecord {
    let record: AppRecord;
    try {
      record = this.require(first.aid);
    } catch (e) {
      this.refuseIfReplaced(first);
      throw e;
    }
    if (!sameRegistration(record, first)) throw replacedWhileWaiting(first.aid);
    return record;
  }

  /** The record under `first`'s AID now (undefined if none), unless it is
   * another registration's: then the refusal a command that waited on
   * `first` gives (replacedWhileWaiting). One rule for the wait
   * (requireSame) and for whoever reads the record again after it threw
   * (lifecycle.ts requireSignallable). */
  refuseIfReplaced(first: AppRecord): AppRecord | undefined {
    const now = this.get(first.aid);
    if (now && !sameRegistration(now, first)) throw replacedWhileWaiting(first.aid);
    return now;
  }

  requireAny(aid: string): AppRecord {
    checkAid(aid);
    const found = this.get(aid);
    const record = found && this.settle(found);
    if (!record) {
      const snapshotted = this.getSnapshotted(aid);
      if (snapshotted)
        throw new AppshotError(`'${aid}' is not running: it was ${describeSnapshot(snapshotted)} (restore the image, or 'appshot rm ${aid}' removes its record)`, ExitCode.failure);
      throw new AppshotError(`no application with AID '${aid}'`, ExitCode.notFound);
    }
    return record;
  }

  list(): AppRecord[] {
    return this.withOneProcessLook(() => {
      this.sweepPorts();
      const out: AppRecord[] = [];
      for (const aid of readdirSync(this.appsDir).sort()) {
        if (aid.startsWith('.')) {
          // Another registration's, kept as said (removeStateDirOf).
          if (aid.includes(DISPLACED)) continue;
          // A removal that was killed half-way (see removeDir).
          rmSync(join(this.appsDir, aid), { recursive: true, force: true });
          continue;
        }
        const record = this.get(aid);
        if (!record) {
          this.dropOrphanDir(aid);
          continue;
        }
        const settled = this.settleOrKeep(record);
        if (settled) out.push(settled);
      }
      return out;
    });
  }

  /** Where a restore (or a batch of clones) will commit: a file created
   * once everything is made (see appshot-init). Files of drivers long
   * gone are swept: by then every init has seen them. The sweep runs at
   * most once per COMMIT_SWEEP_MS in a process, and looks at a file's
   * holder only once the file is old enough to go: an engine commits
   * every clone command, and every commit file of the last minute is
   * still there, so sweeping them all each time cost each command more
   * the more it had made (~1.5 ms after 40 clones in a row). */
  newCommitPath(): string {
    const dir = join(this.home, 'commits');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const now = Date.now();
    if (now - (commitsSwept.get(dir) ?? -Infinity) >= COMMIT_SWEEP_MS) {
      commitsSwept.set(dir, now);
      for (const name of readdirSync(dir)) {
        // PID.START.REQUEST.RANDOM (REQUEST '-' outside the engine), or
        // PID.RANDOM as older versions named them.
        const w = (name.endsWith(PENDING) ? name.slice(0, -PENDING.length) : name).split('.');
        const holder: Holder = w.length === 4 ? { pid: Number(w[0]), startTime: Number(w[1]), ...(w[2] !== '-' ? { request: w[2] } : {}) } : { pid: Number(w[0]), startTime: 0 };
        try {
          // The file itself, not what a link points at: a batch's held
          // clones (template/pool.ts) commit through links to one file,
          // and once that is swept, a link followed throws and would be
          // kept forever. A link whose file is gone is of no use to any
          // init (each looks at its own once, at its commit).
          const path = join(dir, name);
          const st = lstatSync(path);
          if (now - st.mtimeMs <= COMMIT_KEPT_MS) continue;
          if ((st.isSymbolicLink() && !existsSync(path)) || !holderAlive(holder, this.home)) rmSync(path, { force: true });
        } catch {
          /* swept by another */
        }
      }
    }
    const h = currentHolder();
    const path = join(dir, `${h.pid}.${h.startTime}.${h.request ?? '-'}.${randomBytes(6).toString('hex')}`);
    // Made now, under another name, off this thread (a file made on a
    // busy disk costs ~0.5-1 ms, as long as the rest of a clone's own
    // work): the commit then only renames it. Never the name init looks
    // for before the commit.
    const state = { ready: false, done: false, made: Promise.resolve() };
    state.made = writeFile(path + PENDING, '', { flag: 'wx', mode: 0o600 }).then(
      () => {
        if (state.done) rmSync(path + PENDING, { force: true });
        else state.ready = true;
      },
      () => {
        /* made at the commit */
      },
    );
    pendingCommits.set(path, state);
    return path;
  }

  /** Commits: from now on, the restore's processes are the application's
   * even if this process dies. */
  commit(commitPath: string, opts: { ageLater?: boolean } = {}): void {
    const pending = pendingCommits.get(commitPath);
    pendingCommits.delete(commitPath);
    if (pending) pending.done = true;
    if (pending?.ready) {
      let renamed = false;
      try {
        renameSync(commitPath + PENDING, commitPath);
        renamed = true;
      } catch {
        /* removed meanwhile: made below */
      }
      if (renamed || existsSync(commitPath)) {
        if (!opts.ageLater) this.ageCommit(commitPath);
        return;
      }
    }
    closeSync(openSync(commitPath, 'wx', 0o600));
  }

  /** A commit file made ahead (newCommitPath) aged from the commit, not
   * from when it was made: the sweep keeps it a minute from now (a batch
   * may have taken longer). commit() does it, unless told `ageLater` (a
   * restore does it once its processes are let go, a client waiting on
   * them). Off this thread: the commit is the file's existence, and until
   * this lands the sweep leaves it all the same, its holder (this command)
   * being alive; died before, its inits see it at once, as their
   * lifelines end. */
  ageCommit(commitPath: string): void {
    const now = new Date();
    utimes(commitPath, now, now, () => {
      /* committed all the same */
    });
  }

  /** Waits until the file newCommitPath started making for `commitPath`
   * is made (it is long since, as a rule: what is left is a turn of the
   * event loop, where making it at the commit costs a file's creation). */
  async commitReady(commitPath: string): Promise<void> {
    await pendingCommits.get(commitPath)?.made;
  }

  /** A restore that got a commit path will not commit: what was made
   * ahead for it goes, once made. */
  async forgetCommit(commitPath: string): Promise<void> {
    const pending = pendingCommits.get(commitPath);
    pendingCommits.delete(commitPath);
    if (!pending) return;
    pending.done = true;
    if (pending.ready) rmSync(commitPath + PENDING, { force: true });
    else await pending.made;
  }

  /** Reads an application's tables, or undefined if they are gone. */
  readTables(record: AppRecord): TablesSnapshot | undefined {
    return this.readTablesWhy(record).tables;
  }

  /** readTables, and, when they cannot be read, why, in one line: a
   * command that needs the tables says that rather than "gone" or "not
   * running". `gone`: the file is not there (ENOENT), the one failure
   * that says the application has no tables any more; those that only
   * look (ps, staleness) take any other as "cannot tell" (isStale). */
  readTablesWhy(record: AppRecord): { tables?: TablesSnapshot; why?: string; gone?: boolean; lasting?: boolean } {
    try {
      return { tables: addon().readTables(record.tables) };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return { gone: true };
      // Not a table file (EPROTO), or not a regular file, which readTables
      // opens without following (ELOOP), or finds a directory (EISDIR) or a
      // socket (ENXIO): judged by what is there (review r418 F5).
      const notTables = code === 'EPROTO' || code === 'ELOOP' || code === 'EISDIR' || code === 'ENXIO';
      const found = notTables ? notATableFile(record.tables, (e as Error).message) : { why: tablesUnreadable(code, (e as Error).message), lasting: false };
      return found === undefined ? { gone: true } : { why: `the table file of '${record.aid}' ${found.why}: its tables cannot be read`, lasting: found.lasting };
    }
  }

  /** Dead when it has ended, or when its supervisor is gone and no
   * process of its table lives (a registration nobody cleaned up: init was
   * killed with SIGKILL, or a restore was abandoned).
   * The supervisor's PID is in the tables as soon as it runs, and in
   * app.json a moment later: a harness killed in between must not leave a
   * registration that looks alive. */
  isStale(record: AppRecord): boolean {
    if (isEnded(record)) return true;
    // Its supervisor, as app.json names it, alive: nothing else to look at.
    // Checked before the tables are read (~1.6 ms each: `ps` of 64
    // applications read them all).
    if (record.initPid !== undefined && isSameProcess(record.initPid, record.initStartTime)) return false;
    const read = this.readTablesWhy(record);
    const t = read.tables;
    const initPid = record.initPid ?? (t && t.initPid > 0 ? t.initPid : undefined);
    if (initPid === undefined) {
      // No supervisor yet: alive while the command that registered it is.
      return !registeringAlive(record, this.home);
    }
    // The tables' init_pid (no supervisor in the record yet) counts only
    // if that process really is the application's: any process of it may
    // write the header, and one pointed at PID 1 kept the registration,
    // its tables and SysV objects from ever being released (h453's audit).
    if (initPid !== record.initPid && isSameProcess(initPid, undefined) && this.namers().namedBy(initPid, record.tables)) return false;
    // A live process of its table counts only if it really is one of the
    // application's (it holds the file, or, of the registry's user, its
    // environment names it: TablesNamers): anyone holding the table file
    // may have written any PID there.
    // Tables there but unreadable (a process of the application truncating
    // its file, a full filesystem, no descriptor left...): only a file gone
    // says nothing of it runs; otherwise a live process naming the tables
    // does (review r395 F3: such a registration was released under its
    // live processes, their SysV objects and tables removed).
    if (!t) return read.gone === true || !this.namers().any(record.tables);
    // Read whole but none of its processes found: the tables are the
    // application's to write, and one that rewrites its file may have been
    // read half-written (no process in it yet). Looked for among all
    // processes before it is released: once per walk (withOneProcessLook).
    // Those it names first: the one alive answers at once.
    const namers = this.namers();
    return t.tables.pid.every((e) => e.system <= 1 || e.system === initPid || !isSameProcess(e.system, undefined) || !namers.namedBy(e.system, record.tables)) && !namers.any(record.tables);
  }

  /** The look at processes (TablesNamers) of the walk under way, if one
   * is: every registration and port claim a walk judges shares one. */
  private walkNamers: TablesNamers | undefined;

  private namers(): TablesNamers {
    return this.walkNamers ?? new TablesNamers(this.tablesPrefix());
  }

  /** Runs `fn` (a walk over registrations or port claims, all of it
   * synchronous) with one look at the processes for all it judges: before
   * (review r404 F4 b), each dead registration looked at every process
   * once more, N+1 times in a `ps` when one process named its tables. */
  private withOneProcessLook<T>(fn: () => T): T {
    if (this.walkNamers) return fn();
    this.walkNamers = new TablesNamers(this.tablesPrefix());
    try {
      return fn();
    } finally {
      this.walkNamers = undefined;
    }
  }

  /** Where this registry's table files are, as an open descriptor's
   * target reads (newTablesPath). */
  private tablesPrefix(): string {
    return canonicalTablesPath(`/dev/shm/appshot-${this.tag}-`);
  }

  /** The application's supervisor, if the process the record names still
   * is it; 0 otherwise. Never the tables' init_pid: anyone holding the
   * table file's descriptor may have written that. */
  trustedInitPid(record: AppRecord): number {
    const pid = record.initPid;
    return pid && pid > 1 && record.initStartTime !== undefined && isSameProcess(pid, record.initStartTime) ? pid : 0;
  }

  /** A record as it stands: the same while it runs or once it has ended;
   * undefined, once released, if all its processes are gone and nobody
   * wrote how it ended (its init was killed, or its restore abandoned). */
  settle(record: AppRecord): AppRecord | undefined {
    if (isEnded(record) || !this.isStale(record)) return record;
    // Test-only: a registration looked at and found stale, its record
    // not read again yet (test/reregistered.test.ts).
    killPoint('settle: found stale');
    // It may have ended between reading its record and looking at its
    // processes: init writes the file "exit" before it exits.
    const now = this.get(record.aid);
    // Released by someone else meanwhile, perhaps with the AID registered
    // again since: that one is not this one's to release (review r451 F1).
    if (!now || !sameRegistration(now, record)) return undefined;
    if (isEnded(now)) return now;
    if (!holdsMadeData(record)) {
      this.release(record);
      return undefined;
    }
    // Kept as ended, its live parts released: released whole, its private
    // copies and REDIR PATH directories would stay on disk with no record
    // left for `rm` to name them by.
    this.release(record, { keepRecord: true });
    const lost: AppRecord = { ...record, state: 'exited', lost: true, endedAt: new Date().toISOString() };
    delete lost.exitCode;
    try {
      this.update(lost);
    } catch {
      /* removed meanwhile (rm of the same record) */
    }
    return lost;
  }

  /** settle, for a walk over every record (list, runningWith): a record
   * that cannot be settled now is kept as it is, and said, rather than
   * fail the walk for every other application (review r395 F3). */
  private settleOrKeep(record: AppRecord): AppRecord | undefined {
    try {
      return this.settle(record);
    } catch (e) {
      process.stderr.write(`appshot: warning: ${printable(`'${record.aid}' left as it was: ${(e as Error).message}`)}\n`);
      return record;
    }
  }

  /** What tells the application's SysV objects from anyone else's
   * (appshot_ipc_owned): the salt of its keys, when its tables were made
   * (no object of its is older), its supervisor. The registry's copies:
   * the tables are the application's to write. */
  ipcOwnership(record: AppRecord): { salt: bigint; created: number; initPid: number } {
    const created = record.tablesCreated ?? Math.floor(Date.parse(record.createdAt) / 1000);
    return {
      salt: record.keySalt ? BigInt(`0x${record.keySalt}`) : 0n,
      created: Number.isFinite(created) ? created : 2 ** 40,
      initPid: this.trustedInitPid(record),
    };
  }

  /** Removes what an application holds on the node: its SysV objects,
   * tables and port claims (and what an uncommitted restore made for it),
   * then its registration, unless `keepRecord` (settle keeps a lost one's
   * for `rm`). `portsReleased`: the caller let its port claims go
   * already (removeMany). */
  release(record: AppRecord, opts: { keepRecord?: boolean; portsReleased?: boolean } = {}): void {
    const read = this.readTablesWhy(record);
    const t = read.tables;
    if (!t && read.why !== undefined) {
      // Its tables are the only record of which SysV objects were the
      // application's, and nothing can stand in for them: its system keys
      // derive from its salt and each virtual key (appshot_system_key), a
      // 32-bit mix that some virtual key maps any key to, so the salt alone
      // tells none of its objects from another's; a private object has no
      // key at all, and its creator's uid and time are those of any other
      // process of that user since. Unreadable for good (truncated, grown,
      // another version's: an application started before an upgrade), the
      // release goes on without them, and says what it leaves; unreadable
      // for now (a read error, no permission, a file whole again), it is
      // kept for a later rm or prune (review r404 F1).
      if (!read.lasting) throw new AppshotError(printable(`'${record.aid}': ${read.why}; its SysV objects, tables and registration are kept for a later rm or prune`));
      process.stderr.write(`appshot: warning: ${printable(`${read.why}; SysV objects it made, if any, are left: nothing else says which were its (ipcs lists them)`)}\n`);
    }
    if (t) {
      // Only objects the kernel confirms are the application's: the ids in
      // the tables may have been written by anyone of any of its uids.
      const native = addon();
      const { salt, created, initPid } = this.ipcOwnership(record);
      // The id tables, then the key tables: a keyed object whose restore
      // was killed between making it and binding its id is found by its
      // key, bound first (CreateBound), under the same rule.
      // Each on its own: one the kernel or the tables' guard refuses (a
      // process of the application truncating its file meanwhile) does
      // not keep the rest from going. But the tables are the only record
      // of what is left: with one failed, they and the registration stay
      // (for a later rm or prune) and the release fails in one line;
      // `ps` settles each record on its own (list), so this one failing
      // fails no one else's.
      const left: string[] = [];
      for (const kind of ['semid', 'shmid', 'msgid', 'semkey', 'shmkey', 'msgkey'] as const)
        for (const e of t.tables[kind])
          try {
            native.removeIpcOwned(record.tables, kind, e.system, salt, created, initPid);
          } catch (err) {
            left.push(`${kind} ${e.system}: ${(err as Error).message}`);
          }
      if (left.length) throw new AppshotError(printable(`'${record.aid}': ${left.length} SysV object${left.length > 1 ? 's' : ''} not removed (${left.join('; ')}); its tables and registration are kept for a later rm or prune`));
    }
    try {
      rmSync(record.tables, { force: true });
    } catch {
      // A directory (notATableFile): removed if empty; what is in it is
      // its maker's, and stays.
      try {
        rmdirSync(record.tables);
      } catch {
        /* left */
      }
    }
    // Unless the caller let them go already, with others', under one lock
    // (removeMany).
    if (!opts.portsReleased) for (const p of record.ports ?? []) if (p.mode === 'allocate') this.releasePort(p.system, record.aid);
    // A restore that never committed (its appshot was killed): what it made
    // for the instance goes with it, and the log it took over goes back.
    const r = record.restore;
    if (r && !existsSync(join(record.stateDir, 'committed')) && !existsSync(r.commitPath)) {
      for (const path of r.madePaths) removeWalked(path);
      this.releaseRedirCopies(r.redirCopies ?? [], [record.aid]);
      // Only names of that shape, as a record may be anyone's word.
      for (const t of r.redirTemporaries ?? []) if (/\.appshot-\d+-[0-9a-f]{8}$/.test(t)) removeWalked(t);
      this.releaseRedirTargets(r.madeDirs, [record.aid]);
      for (const name of r.madeQueues ?? [])
        try {
          addon().mqUnlink(name);
        } catch {
          /* removed already (the failed restore undid it) */
        }
      for (const f of r.madeSocketFiles ?? []) removeStaleSocketFile(f);
      for (const f of r.madeExecutableNames ?? []) removeLeftExecutableName(f);
      if (r.adoptedLog) this.carryLog(record);
      if (r.adoptedSnapshot) this.giveBackSnapshot(record);
      // And the commit file made ahead for it (a held clone of an engine
      // killed with SIGKILL): named after its maker, it would otherwise
      // wait for a sweep. A batch still under way makes it again at its
      // commit.
      if (dirname(r.commitPath) === join(this.home, 'commits')) rmSync(r.commitPath + PENDING, { force: true });
    }
    if (!opts.keepRecord) removeStateDirOf(record);
  }

  remove(record: AppRecord): void {
    const [failure] = this.removeMany([record]);
    if (failure) throw failure.error;
  }

  /**
   * remove() of many ended applications at once (`rm` of a batch,
   * `prune`): the same parts go, but what remove() does once per record
   * and that grows with the registry is done once for all of them. Each
   * remove() looks at every other registration to know whether its commit
   * file is still someone's, and takes the ports' lock for each claim:
   * for 1,000 clones of one batch that was a million record reads and a
   * thousand lock round trips. Here: the port claims are let go under one
   * lock, and the registrations left are read once to know which of the
   * removed ones' commit files nobody needs any more. Returns those that
   * could not be removed whole, with why.
   */
  removeMany(records: AppRecord[], kept?: (line: string) => void): { record: AppRecord; error: unknown }[] {
    // The port claims first, all under one lock. A claim outlives its
    // registration only while its claimer lives, and the claimer of a
    // clone of the engine's pool or of serve goes on living: let go after
    // the registrations, an rm killed halfway (or one record that cannot
    // be removed) would leave ports taken that no AID names any more.
    this.releasePorts(records.flatMap((r) => (r.ports ?? []).filter((p) => p.mode === 'allocate').map((p) => ({ port: p.system, aid: r.aid }))));
    // Each record on its own: one that cannot be removed whole is
    // reported, and the others still go.
    const failures: { record: AppRecord; error: unknown }[] = [];
    const commitPaths = new Set<string>();
    const commits = join(this.home, 'commits');
    const removed = new Set<string>();
    // Each directory of private copies, with the records it was for.
    const copies = new Map<string, AppRecord[]>();
    const madeDirs: MadeDir[] = [];
    // The REDIR PATH directories kept for an image, said once the private
    // copies that go with this rm are gone (below).
    const keptDirs: { aid: string; image: string; leaves: string[] }[] = [];
    // Unless an image was taken of it: its restore needs the files written
    // there, as after a snapshot that ended it (markReleased). Marked kept
    // before the registrations that lead into them go, all under one lock;
    // if they cannot be, those records stay.
    const imaged = records.filter((r) => r.imagedTo && madeLeaves(r).length);
    const unkept = new Set<AppRecord>();
    try {
      this.keepRedirLeaves(imaged.flatMap(madeLeaves));
    } catch (error) {
      for (const record of imaged) {
        failures.push({ record, error });
        unkept.add(record);
      }
    }
    for (const record of records) {
      if (unkept.has(record)) continue;
      try {
        const leaves = record.imagedTo ? madeLeaves(record) : [];
        this.release(record, { portsReleased: true });
        // Only a clone's own directory of private copies: a record's path
        // came from an image (a hostile one could name any directory).
        if (record.privateRoot && isPrivateRoot(this.home, record.privateRoot)) copies.set(record.privateRoot, [...(copies.get(record.privateRoot) ?? []), record]);
        if (record.imagedTo) {
          if (leaves.length) keptDirs.push({ aid: record.aid, image: record.imagedTo, leaves });
        } else madeDirs.push(...(record.restore?.madeDirs ?? []), ...(record.madeDirs ?? []));
        removed.add(record.aid);
        const commitPath = record.restore?.commitPath;
        if (commitPath && dirname(commitPath) === commits) commitPaths.add(commitPath);
      } catch (error) {
        failures.push({ record, error });
      }
    }
    // Nor one another application still runs on (a clone's snapshot
    // restored under two AIDs names one directory in both): looked for
    // once these records are gone, so that of two rm's at once the later
    // sees neither.
    const stillNamed = this.privateRootsStillNamed([...copies.keys()]);
    for (const [root, owners] of copies) {
      if (stillNamed.has(root)) continue;
      try {
        // Its copies are the application's users' (removeWalked).
        removeWalked(root);
        rmSync(this.sharedCopiesMark(root), { force: true });
      } catch (error) {
        // Not removed whole (EBUSY, EACCES): said of the records it was
        // for, and the rest goes on, the kept lines below included.
        for (const record of owners) failures.push({ record, error });
      }
    }
    // Only what is still there: a directory in private copies that went
    // just now (a restored application's private /tmp, made anew by its
    // restore) was not kept, whatever its image needs, and named it would
    // be a false word; one in copies that could not all go is.
    for (const { aid, image, leaves } of keptDirs) {
      const still = leaves.filter(lexists);
      if (still.length) kept?.(keptForImage(aid, image, still));
    }
    this.releaseRedirTargets(madeDirs, removed);
    if (!commitPaths.size) return failures;
    // The commit file of the restore or clone batch each came from goes
    // once no registration left names it: only an init whose lifeline is
    // still open looks at it (restore_committed), and each of those is
    // registered (those removed are gone from apps/ now; one that failed,
    // or one not written yet, is read as any other). With it, the file
    // made ahead for it, if it never committed (a held clone of the
    // engine's pool whose engine was killed).
    for (const aid of readdirSync(this.appsDir)) {
      if (removed.has(aid) || aid.startsWith('.')) continue;
      const still = this.readRecordFile(aid)?.restore?.commitPath;
      if (still) commitPaths.delete(still);
      if (!commitPaths.size) return failures;
    }
    for (const commitPath of commitPaths) {
      rmSync(commitPath, { force: true });
      rmSync(commitPath + PENDING, { force: true });
    }
    return failures;
  }

  /**
   * The REDIR PATH directories `made` for applications now going (`going`:
   * their AIDs, whose registrations no longer count), and every one kept
   * for others before: each goes unless an application still registered,
   * or snapshotted, leads into it (or into a directory in it, or one
   * holding it). Rules whose target names no per-instance property give
   * every clone of a batch one directory, made by the first: its rm, or
   * its failed restore, took the others' data (fuzz33 M6). One kept is
   * marked in redirs/ for whichever removal finds it unused to remove:
   * every removal looks at every mark (there are few), whatever it
   * removes, so a last user that goes another way than rm (a held
   * instance given up) leaves it only until the next. Under the lock that
   * a directory's making takes too (makeRedirTargets): a registration
   * read too late to be seen finds the directory gone and makes its own.
   */
  releaseRedirTargets(made: MadeDir[], going: Iterable<string>): void {
    const marks = this.redirsDir;
    if (!made.length && !existsSync(marks)) return;
    this.withRedirsLocked(() => {
      const markOf = (leaf: string) => join(marks, createHash('sha256').update(leaf).digest('hex').slice(0, 40));
      const candidates = new Map<string, MadeDir>();
      for (const name of readdirSync(marks)) {
        if (name.startsWith('.') || name.startsWith(KEPT_MARK)) continue;
        try {
          const m = JSON.parse(readFileSync(join(marks, name), 'utf8')) as MadeDir;
          if (typeof m?.leaf === 'string' && typeof m.top === 'string') candidates.set(markOf(m.leaf), m);
        } catch {
          /* one half written (.tmp), or gone meanwhile */
        }
      }
      for (const m of made) candidates.set(markOf(m.leaf), m);
      if (!candidates.size) return;
      const inUse = this.redirLeavesInUse(going);
      for (const [mark, m] of candidates) {
        if (inUse.some((l) => overlaps(l, m.leaf))) {
          if (existsSync(mark)) continue;
          writeFileSync(`${mark}.tmp`, JSON.stringify(m));
          renameSync(`${mark}.tmp`, mark);
        } else {
          removeRedirTargets([m]);
          rmSync(mark, { force: true });
        }
      }
    });
  }

  /** The REDIR PATH directories applications registered or snapshotted
   * lead into, but for those `going`, and those kept for an image of one
   * removed (keepRedirLeaves). Read under withRedirsLocked. */
  private redirLeavesInUse(going: Iterable<string>): string[] {
    const gone = new Set(going);
    return [
      ...readdirSync(this.appsDir).filter((aid) => !aid.startsWith('.') && !gone.has(aid)).flatMap((aid) => this.readRecordFile(aid)?.redirLeaves ?? []),
      ...this.listSnapshotted().flatMap((r) => r.redirLeaves ?? []),
      ...this.keptRedirLeaves(),
    ];
  }

  /**
   * The REDIR PATH directories `leaves` made for an application whose
   * record goes now while an image of it needs them (imagedTo, or the
   * record of a snapshot that ended it): they stay (keptForImage), and a
   * mark in redirs/ has each count as used (redirLeavesInUse) for as long
   * as it is the directory it is now. Without it, the mark of another
   * application's directory that holds one (or is in one), kept while
   * this record led into it, was swept by the next removal, and the kept
   * files with it (review r345). Written before the record goes, under
   * the lock of releaseRedirTargets: a removal at the same time sees the
   * one or the other. The user's rm -r of one, as the kept line says,
   * ends its mark (keptRedirLeaves).
   */
  keepRedirLeaves(leaves: string[]): void {
    if (!leaves.length) return;
    this.withRedirsLocked(() => {
      for (const leaf of leaves) {
        let st: BigIntStats | undefined;
        try {
          st = plainAbsolute(leaf) ? lstatSync(leaf, { bigint: true, throwIfNoEntry: false }) : undefined;
        } catch {
          /* not a directory on the way (ENOTDIR): nothing there to keep */
        }
        if (!st?.isDirectory()) continue;
        const mark = join(this.redirsDir, `${KEPT_MARK}${createHash('sha256').update(leaf).digest('hex').slice(0, 40)}`);
        const kept: KeptLeaf = { leaf, dev: String(st.dev), ino: String(st.ino) };
        writeFileSync(`${mark}.tmp`, JSON.stringify(kept));
        renameSync(`${mark}.tmp`, mark);
      }
    });
  }

  /** The directories kept for images (keepRedirLeaves) that are still the
   * ones kept; the mark of one removed or put in another's place since
   * goes. Under withRedirsLocked. */
  private keptRedirLeaves(): string[] {
    const leaves: string[] = [];
    for (const name of readdirSync(this.redirsDir)) {
      if (!name.startsWith(KEPT_MARK) || name.endsWith('.tmp')) continue;
      const mark = join(this.redirsDir, name);
      let kept: KeptLeaf;
      try {
        kept = JSON.parse(readFileSync(mark, 'utf8')) as KeptLeaf;
      } catch {
        continue;
      }
      if (typeof kept?.leaf !== 'string') continue;
      let st: BigIntStats | undefined;
      try {
        st = lstatSync(kept.leaf, { bigint: true, throwIfNoEntry: false });
      } catch (e) {
        // Not to be looked at (EACCES): still in use, for all we know.
        if ((e as NodeJS.ErrnoException).code !== 'ENOTDIR') {
          leaves.push(kept.leaf);
          continue;
        }
      }
      if (st?.isDirectory() && String(st.dev) === kept.dev && String(st.ino) === kept.ino) leaves.push(kept.leaf);
      else rmSync(mark, { force: true });
    }
    return leaves;
  }

  /**
   * The REDIR PATH copies of the template's files a failed clone made
   * (`copies`: targets it made itself, no other's: paths.ts privateCopy
   * claims a target only where nothing is), each removed unless an
   * application still registered or snapshotted, but for those `going`,
   * leads into it (its registration's redirLeaves: written before its
   * restore looks at a target, so a clone racing for the same shared
   * target that found this copy and uses it is seen here). A copy kept is
   * that application's now, as any file at its target. Under the lock of
   * releaseRedirTargets, so that none of those directories goes meanwhile.
   */
  releaseRedirCopies(copies: string[], going: Iterable<string>): void {
    if (!copies.length) return;
    this.withRedirsLocked(() => {
      const inUse = this.redirLeavesInUse(going);
      for (const copy of copies) {
        // Only a plain path, removed by descriptors (removeWalked): the
        // copy may be another user's tree, changed while it goes.
        if (!plainAbsolute(copy) || inUse.some((l) => overlaps(l, copy))) continue;
        removeWalked(copy);
      }
    });
  }

  /** prepareRedirTargets (resources/paths.ts) under the lock of
   * releaseRedirTargets: a directory is not made, or found made, while a
   * removal decides whether anyone uses it. The registration that leads
   * into them is written before. */
  makeRedirTargets(redirs: InstanceConfig['redirs'], as?: RedirTargetsAs): MadeDir[] {
    if (!redirs.some((r) => r.kind === 'path')) return [];
    return this.withRedirsLocked(() => prepareRedirTargets(redirs, as));
  }

  /** The marks of REDIR PATH directories kept for others, and their lock. */
  private get redirsDir(): string {
    return join(this.home, 'redirs');
  }

  private withRedirsLocked<T>(fn: () => T): T {
    mkdirSync(this.redirsDir, { recursive: true, mode: 0o700 });
    const lock = addon().lockFile(join(this.redirsDir, '.lock'));
    try {
      return fn();
    } finally {
      closeSync(lock);
    }
  }

  /** A clone's private copies, `instances/AID.XXXXXXXX`, are named by
   * that clone's record alone unless a snapshot of it is restored under
   * another AID: the restore leaves this mark (markSharedCopies), and only
   * then does rm look through the other records for the directory. */
  private sharedCopiesMark(root: string): string {
    return join(this.home, 'instances', '.shared', basename(root));
  }

  /** Called by a restore that records private copies `root` under `aid`
   * before its registration is written: a mark left by a restore killed
   * after it costs rm a look through the records, nothing more. */
  markSharedCopies(aid: string, root: string): void {
    if (basename(root).startsWith(`${aid}.`)) return;
    mkdirSync(dirname(this.sharedCopiesMark(root)), { recursive: true, mode: 0o700 });
    writeFileSync(this.sharedCopiesMark(root), '');
  }

  /** Of the private-copies directories `roots`, those a registration or a
   * snapshot's record still names (its image needs them: removeSnapshotted
   * keeps them). Only marked ones are looked for. */
  private privateRootsStillNamed(roots: string[]): Set<string> {
    const named = new Set<string>();
    const marked = new Set(roots.filter((r) => existsSync(this.sharedCopiesMark(r))));
    if (!marked.size) return named;
    const others = [
      ...readdirSync(this.appsDir).filter((aid) => !aid.startsWith('.')).map((aid) => this.readRecordFile(aid)?.privateRoot),
      ...this.listSnapshotted().map((r) => r.privateRoot),
    ];
    for (const root of others) if (root && marked.has(root)) named.add(root);
    return named;
  }

  /** Where the log of an application a snapshot ended waits for the
   * restore of its image under the same AID (see adoptCarriedLog). */
  carriedLogPath(aid: string): string {
    return join(this.home, 'logs', aid);
  }

  /** A snapshot is about to end the application: its registration is
   * released rather than kept as ended (the AID is free at once for the
   * image's restore; appshot-init removes the directory when it sees the
   * file "released", which names the image for a foreground `appshot
   * run`). All or nothing: the file "released" is the snapshot's point of
   * no return, and if it cannot be written, the record written before it
   * goes. The log is set aside next (setAsideLog). */
  markReleased(record: AppRecord, image: string): void {
    // Its record first: from the file "released" on, init removes the
    // registration as soon as the processes are gone.
    const snapshotted: SnapshottedRecord = {
      aid: record.aid,
      state: 'snapshotted',
      image,
      snapshottedAt: new Date().toISOString(),
      command: record.command,
      detached: record.detached,
      createdAt: record.createdAt,
      ...(record.template ? { template: record.template } : {}),
      ...(record.privateRoot ? { privateRoot: record.privateRoot } : {}),
      ...(record.redirLeaves?.length ? { redirLeaves: record.redirLeaves } : {}),
      ...(madeLeaves(record).length ? { madeDirs: madeLeaves(record) } : {}),
    };
    mkdirSync(join(this.home, 'snapshotted'), { recursive: true, mode: 0o700 });
    const file = this.snapshottedPath(record.aid);
    writeFileSync(`${file}.tmp`, JSON.stringify(snapshotted, null, 2));
    renameSync(`${file}.tmp`, file);
    try {
      writeFileSync(join(record.stateDir, 'released'), `${image === '-' ? 'a stream on standard output' : image}\n`);
    } catch (e) {
      rmSync(file, { force: true });
      throw e;
    }
  }

  /** Released by a snapshot (markReleased): its log waits for the image's
   * restore (adoptCarriedLog). Before its processes go: init removes the
   * directory that holds it once they are gone. */
  setAsideLog(record: AppRecord): void {
    this.carryLog(record);
  }

  /** Where the record of an application a snapshot ended is kept. */
  private snapshottedPath(aid: string): string {
    return join(this.home, 'snapshotted', `${aid}.json`);
  }

  /** The record of the snapshot that ended `aid`, if it is kept. */
  getSnapshotted(aid: string): SnapshottedRecord | undefined {
    if (!AID_PATTERN.test(aid)) return undefined;
    try {
      const r = JSON.parse(readFileSync(this.snapshottedPath(aid), 'utf8')) as SnapshottedRecord;
      return r.aid === aid && r.state === 'snapshotted' ? r : undefined;
    } catch {
      return undefined;
    }
  }

  /** Every application a snapshot ended whose AID is not registered again
   * (between a snapshot's record and the end of its processes, the
   * registration is the one shown). */
  listSnapshotted(): SnapshottedRecord[] {
    let names: string[];
    try {
      names = readdirSync(join(this.home, 'snapshotted'));
    } catch {
      return [];
    }
    const out: SnapshottedRecord[] = [];
    for (const name of names.sort()) {
      if (!name.endsWith('.json')) continue;
      const r = this.getSnapshotted(name.slice(0, -5));
      if (r && !this.get(r.aid)) out.push(r);
    }
    return out;
  }

  /**
   * Runs `fn` with `aid` held as a registration holds it (its state
   * directory made, still empty), so that no restore registers under the
   * AID and takes what a keeper holds for it meanwhile; the directory goes
   * again after. Undefined, `fn` not run, when a registration has the AID
   * (one being made has its directory before its record). The directory
   * names its holder (HELD_BY): killed while holding it, the holder
   * leaves a hold that the next registration, hold or list() takes away
   * at once (dropDeadHold), not an orphan that blocks the AID for a
   * minute (review r250).
   */
  withAidHeld<T>(aid: string, fn: () => T): T | undefined {
    checkAid(aid);
    const stateDir = join(this.appsDir, aid);
    if (!makeStateDir(stateDir) && !(this.dropDeadHold(stateDir) && makeStateDir(stateDir))) return undefined;
    try {
      writeFileSync(join(stateDir, HELD_BY), formatHolder(currentHolder()));
      return fn();
    } finally {
      rmSync(join(stateDir, HELD_BY), { force: true });
      rmdirSync(stateDir);
    }
  }

  /** The AID of a running application, other than `except`, whose private
   * copies are `privateRoot`, if any. Reads every registration: for the
   * restores that need to know (a private /tmp's, restore/driver.ts). */
  runningWith(privateRoot: string, except: string): string | undefined {
    return this.withOneProcessLook(() => {
      for (const aid of readdirSync(this.appsDir)) {
        if (aid === except || aid.startsWith('.')) continue;
        const r = this.get(aid);
        if (r?.privateRoot !== privateRoot) continue;
        const settled = this.settleOrKeep(r);
        if (settled && !isEnded(settled)) return aid;
      }
      return undefined;
    });
  }

  /** Removes `stateDir` if it is a hold (withAidHeld) whose holder is
   * gone; true if it did, or it is gone already. */
  private dropDeadHold(stateDir: string): boolean {
    let text: string;
    try {
      text = readFileSync(join(stateDir, HELD_BY), 'utf8');
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'ENOENT' && !existsSync(stateDir);
    }
    if (holderAlive(parseHolder(text.trim().split(' ')), this.home)) return false;
    // Taken away by one caller only: its note renamed first, which one
    // rename does. Two that both read it, each removing the directory by
    // name, had the second remove the one the first's registration had
    // made there meanwhile, still empty (review r256).
    const taken = join(stateDir, `${HELD_BY}.gone-${uniqueTag()}`);
    try {
      renameSync(join(stateDir, HELD_BY), taken);
    } catch (e) {
      // Another is taking it away (ENOENT): the caller's claim finds
      // the name free or taken.
      return (e as NodeJS.ErrnoException).code === 'ENOENT';
    }
    try {
      rmSync(taken, { force: true });
      rmdirSync(stateDir);
    } catch (e) {
      // It is no hold (ENOTEMPTY).
      return (e as NodeJS.ErrnoException).code === 'ENOENT';
    }
    return true;
  }

  /** `appshot rm` of a snapshotted application: its record and the log
   * that waited for its restore. Its image, and what the image needs (a
   * clone's private copies, the REDIR PATH directories made for it), stay.
   * False if there was none. */
  removeSnapshotted(aid: string): boolean {
    const file = this.snapshottedPath(aid);
    if (!existsSync(file)) return false;
    const carried = this.carriedLogPath(aid);
    rmSync(carried, { force: true });
    rmSync(logTimesPath(carried), { force: true });
    rmSync(file, { force: true });
    return true;
  }

  /** A restore under the AID of an application a snapshot ended takes its
   * place: that record moves into the new registration (given back by
   * release if the restore never commits), as its log does (see
   * adoptCarriedLog). */
  private adoptSnapshot(record: AppRecord): void {
    if (!record.restore?.adoptedSnapshot || record.template) return;
    try {
      renameSync(this.snapshottedPath(record.aid), join(record.stateDir, 'snapshotted.json'));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      // Removed since it was seen (`appshot rm` of it): nothing to take
      // over, and nothing for release to give back.
      delete record.restore.adoptedSnapshot;
    }
  }

  private giveBackSnapshot(record: AppRecord): void {
    const kept = join(record.stateDir, 'snapshotted.json');
    if (!existsSync(kept)) return;
    mkdirSync(join(this.home, 'snapshotted'), { recursive: true, mode: 0o700 });
    renameSync(kept, this.snapshottedPath(record.aid));
  }

  /** Moves an application's log aside, to carriedLogPath. The processes
   * writing it keep writing to the same file: a rename moves no data. */
  private carryLog(record: AppRecord): void {
    if (!record.logPath || !existsSync(record.logPath)) return;
    mkdirSync(join(this.home, 'logs'), { recursive: true, mode: 0o700 });
    renameSync(record.logPath, this.carriedLogPath(record.aid));
    // When its lines came (appshot-init's log.times), if it was watched.
    if (existsSync(logTimesPath(record.logPath))) renameSync(logTimesPath(record.logPath), logTimesPath(this.carriedLogPath(record.aid)));
  }

  /**
   * What a restore under `aid` will take over (adoptCarriedLog) of the
   * application a snapshot of that AID ended: its record, its log. Asked
   * while registering, once the AID is held (RecordFill: no snapshot of it
   * can write them meanwhile), so that the registration's first write
   * already says so: a restore killed from then on gives back whatever of
   * them it took (release; what it did not take yet is where it was, and
   * release's give-back finds nothing of it to move), and the takeover
   * itself is renames alone, with no rewrite of the record (it was two,
   * ~1.5 ms of each restore on a loaded machine).
   */
  carriedOver(aid: string, logPath: string | undefined): { adoptedSnapshot?: true; adoptedLog?: true } {
    return {
      ...(existsSync(this.snapshottedPath(aid)) ? { adoptedSnapshot: true as const } : {}),
      ...(logPath && existsSync(this.carriedLogPath(aid)) ? { adoptedLog: true as const } : {}),
    };
  }

  /** A restore takes over the record (adoptSnapshot) and the log that the
   * snapshot of its AID set aside (markReleased), so the restored
   * application appends to the output it wrote before. Noted in the record
   * first, when it was registered (carriedOver): a restore that never
   * commits gives them back (release). A clone (record.template) is a new
   * instance with a log of its own, even under the AID of one that was
   * snapshotted. */
  adoptCarriedLog(record: AppRecord): void {
    this.adoptSnapshot(record);
    if (!record.logPath || !record.restore?.adoptedLog || record.template) return;
    const carried = this.carriedLogPath(record.aid);
    try {
      renameSync(carried, record.logPath);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      // Removed since it was seen (`appshot rm`): the restore starts a log
      // of its own, which is not one to carry back should it fail.
      delete record.restore.adoptedLog;
      this.update(record);
      return;
    }
    // When its lines came (appshot-init's log.times), if it was watched.
    try {
      renameSync(logTimesPath(carried), logTimesPath(record.logPath));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }

  /**
   * Takes a TCP port for `aid` from the registry's range (step 424: a
   * network-unique resource is assigned by the registry). `usable` checks
   * that nothing outside appshot holds the port.
   */
  allocatePort(aid: string, usable: (port: number) => boolean): number {
    const [lo, hi] = portRange();
    const span = hi - lo + 1;
    const start = Math.floor(Math.random() * span);
    // One look at the processes for every claim met on the way.
    const port = this.withOneProcessLook(() => {
      for (let i = 0; i < span; i++) {
        const port = lo + ((start + i) % span);
        if (!this.claimPort(aid, port, { fresh: true })) continue;
        if (usable(port)) return port;
        // Held by something outside appshot: let the claim go, try the next.
        this.releasePort(port, aid);
      }
      return undefined;
    });
    if (port !== undefined) return port;
    throw new AppshotError(`no free port left in ${lo}-${hi} (set APPSHOT_PORTS)`, ExitCode.conflict);
  }

  /** Port claims are files, ports/PORT, holding "AID PID START": the AID,
   * and the process that claimed it (until the application is registered
   * with the port, the claim lives as long as its claimer does). Every
   * change to them is made under one flock, which no dead process can
   * hold: of two takers of a stale claim only one wins, and a reader never
   * sees half an owner (written aside, renamed into place). */
  private withPortsLocked<T>(fn: () => T): T {
    mkdirSync(this.portsDir, { recursive: true, mode: 0o755 });
    const lock = addon().lockFile(join(this.portsDir, '.lock'));
    try {
      return fn();
    } finally {
      closeSync(lock);
    }
  }

  /** Claims one given port for `aid` (a restored instance takes back the
   * port it had; the caller holds the AID's registration, so a claim in
   * its name is its own); false when another live application holds it.
   * `fresh`: false also when `aid` holds it already (allocatePort: an
   * instance given a port it had claimed a moment before for another of
   * its ports bound both to one, and failed: fuzz33 L11). */
  claimPort(aid: string, port: number, { fresh = false } = {}): boolean {
    const file = join(this.portsDir, String(port));
    // For a fresh port, a claim whose staleness cannot be told (the look
    // at the processes failed: no descriptor left, a refusal root should
    // not get) is another's, and the next port is tried: kept, never
    // taken, and the look's failure is not every allocation's (review r435 N5).
    const judged = (text: string) => {
      if (!fresh) return this.portClaimIsStale(port, text);
      try {
        return this.portClaimIsStale(port, text);
      } catch {
        return false;
      }
    };
    const takeable = (text: string | undefined) => text === undefined || (!fresh && text.split(' ')[0] === aid) || judged(text);
    return this.withOneProcessLook(() => {
      // Judged before the lock is taken: whether a claim is stale may take
      // a look at every process (isStale), which no other claimer should
      // wait for (review r404 F4 b). Under the lock, the very claim that
      // was judged (the same file, held open since, so its inode is no
      // other's: every claim is written anew and renamed) is judged so
      // still: a claim's staleness does not come back (its holder, its
      // application dead stay dead). The same text is not enough: a claim
      // let go and made again by the same holder reads the same, and is
      // live (review r418 F4).
      const seen = this.openPortClaim(port);
      try {
        if (!takeable(seen?.text)) return false;
        return this.withPortsLocked(() => {
          if (!this.isPortClaim(port, seen)) {
            const now = this.openPortClaim(port);
            try {
              if (!takeable(now?.text)) return false;
            } finally {
              if (now) closeSync(now.fd);
            }
          }
          writeFileSync(`${file}.tmp`, `${aid} ${formatHolder(currentHolder())}`);
          renameSync(`${file}.tmp`, file);
          noteHeld('port', port);
          return true;
        });
      } finally {
        if (seen) closeSync(seen.fd);
      }
    });
  }

  /** A port's claim file, open, and its text; undefined if there is none. */
  private openPortClaim(port: number): { fd: number; text: string } | undefined {
    let fd: number;
    try {
      fd = openSync(join(this.portsDir, String(port)), fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW);
    } catch {
      return undefined;
    }
    try {
      return { fd, text: readFileSync(fd, 'utf8') };
    } catch {
      closeSync(fd);
      return undefined;
    }
  }

  /** Whether `port`'s claim is still the file `seen` (openPortClaim), or
   * there is still none if `seen` is undefined. */
  private isPortClaim(port: number, seen: { fd: number } | undefined): boolean {
    let ino: bigint | undefined;
    try {
      ino = statSync(join(this.portsDir, String(port)), { bigint: true }).ino;
    } catch {
      /* none */
    }
    if (!seen || ino === undefined) return !seen && ino === undefined;
    const was = fstatSync(seen.fd, { bigint: true });
    return was.ino === ino && was.nlink > 0n;
  }

  /** The AID holding an allocated port, if any. */
  portOwner(port: number): string | undefined {
    return this.portClaim(port)?.aid;
  }

  private portClaim(port: number): { aid: string; holder: Holder } | undefined {
    const text = this.portClaimText(port);
    return text === undefined ? undefined : parsePortClaim(text);
  }

  /** A port claim's file as written ("AID PID START [REQUEST]"), if any. */
  private portClaimText(port: number): string | undefined {
    try {
      return readFileSync(join(this.portsDir, String(port)), 'utf8');
    } catch {
      return undefined;
    }
  }

  /** Takes back the ports of applications that are gone. */
  sweepPorts(): void {
    if (!existsSync(this.portsDir)) return;
    this.withOneProcessLook(() => {
      const ports = readdirSync(this.portsDir)
        .filter((p) => /^\d+$/.test(p))
        .map(Number);
      this.dropStaleClaims(ports);
    });
  }

  /** Removes the claims of `ports` that are stale (portClaimIsStale),
   * judged outside the ports lock (claimPort says why), each removed under
   * it only if still as judged. */
  private dropStaleClaims(ports: number[], which: (port: number) => boolean = () => true): void {
    const stale = new Map<number, { fd: number; text: string }>();
    try {
      for (const port of ports) {
        const claim = this.openPortClaim(port);
        if (!claim) continue;
        let isStale = false;
        try {
          isStale = which(port) && this.portClaimIsStale(port, claim.text);
        } catch {
          // The processes could not be looked at (no descriptor left): kept,
          // and judged again at the next look, rather than fail the sweep
          // of every claim (`ps` of every application; review r418 F5).
        }
        if (isStale) stale.set(port, claim);
        else closeSync(claim.fd);
      }
      if (!stale.size) return;
      // Only the claim judged (the same file: claimPort says why).
      this.withPortsLocked(() => {
        for (const [port, claim] of stale) if (this.isPortClaim(port, claim)) rmSync(join(this.portsDir, String(port)), { force: true });
      });
    } finally {
      for (const { fd } of stale.values()) closeSync(fd);
    }
  }

  /** Lets a port go, if `aid` holds it. */
  releasePort(port: number, aid: string): void {
    this.releasePorts([{ port, aid }]);
  }

  /** releasePort of each, under one lock (removeMany: a thousand clones'). */
  releasePorts(claims: { port: number; aid: string }[]): void {
    if (!claims.length) return;
    this.withPortsLocked(() => {
      for (const { port, aid } of claims) if (this.portOwner(port) === aid) rmSync(join(this.portsDir, String(port)), { force: true });
    });
  }

  /** A claim is taken back once its application, registered with the
   * port, is gone; until it is registered with it, and once its
   * registration is gone (a snapshot released it, init removed it), once
   * the command that claimed it has ended (holder.ts: in the resident
   * engine, the request, not the engine's process, which outlives it).
   * Judges `text`, the claim of `port` as read (review r418 F4: judging a
   * fresh read stored a verdict on another text). */
  private portClaimIsStale(port: number, text: string): boolean {
    const claim = parsePortClaim(text);
    const record = this.get(claim.aid);
    if (record && (record.ports ?? []).some((p) => p.system === port && p.mode === 'allocate')) return this.isStale(record);
    return !holderAlive(claim.holder, this.home);
  }

  /** An engine's request has ended (its lease is gone): what it claimed
   * for itself and left is taken back now rather than at the next look:
   * port claims no application is registered with, and registrations
   * whose supervisor never started. */
  releaseHeldBy(request: string, held: { aids: Iterable<string>; ports: Iterable<number> }): void {
    for (const aid of held.aids) {
      const record = this.get(aid);
      if (record && record.harnessRequest === request && record.initPid === undefined) this.settle(record);
    }
    const ports = [...held.ports];
    if (ports.length) this.withOneProcessLook(() => this.dropStaleClaims(ports, (port) => this.portClaim(port)?.holder.request === request));
  }

  private dropOrphanDir(aid: string): void {
    // A directory without app.json: being registered right now (leave it),
    // or left by a registration killed before it wrote app.json; or a hold
    // whose holder was killed.
    const dir = join(this.appsDir, aid);
    if (this.dropDeadHold(dir)) return;
    try {
      // Its change time: a spare state directory renamed into place
      // (enableSpareStateDirs) keeps the modification time of when it was
      // made, and the rename sets the change time.
      const st = statSync(dir);
      if (Date.now() - Math.max(st.mtimeMs, st.ctimeMs) > 60_000) {
        removeDir(dir);
        this.removeLostTables(aid);
      }
    } catch {
      /* already gone */
    }
  }
}

/** A socket file's name a restore wrote into its registration
 * (restore.madeSocketFiles); `who` as fsident.ts gives it, capEff in text. */
export interface MadeSocketFile {
  dir: string;
  name: string;
  who?: { fsuid: number; fsgid: number; groups: number[]; capEff: string }[];
}

/** The socket file a killed restore made at `f`, removed if it is still
 * there and stale: through its directory, as the identities it was made
 * as, never through a symlink at its name, only a socket, only one no
 * live socket holds (addon socketFileClear, sockfile.c clear_at). A
 * record it cannot read is left alone. */
function removeStaleSocketFile(f: MadeSocketFile): void {
  try {
    const who = f.who?.map((i) => ({ fsuid: i.fsuid, fsgid: i.fsgid, groups: i.groups, capEff: BigInt(i.capEff) }));
    addon().socketFileClear(f.dir, f.name, who);
  } catch {
    /* gone meanwhile, or not ours to reach */
  }
}

/** The empty file a killed restore may have left at a deleted
 * executable's name (restore.madeExecutableNames) removed: through its
 * directory, as the identities it was made as, only a regular file,
 * empty, mode 0600, with no other name, the identity's own (addon
 * executableNameClear, exename.c). A record it cannot read, or without
 * identities, is left alone. */
function removeLeftExecutableName(f: MadeSocketFile): void {
  // Never as the restorer itself (fsident_run with no identity), which
  // may be root, at a path the image named (review r425 G5): the driver
  // always records them, so a record without is not ours to act on.
  if (!f.who?.length) return;
  try {
    const who = f.who?.map((i) => ({ fsuid: i.fsuid, fsgid: i.fsgid, groups: i.groups, capEff: BigInt(i.capEff) }));
    addon().executableNameClear(f.dir, f.name, who);
  } catch {
    /* gone meanwhile, or not ours to reach */
  }
}

/** Why a file that readTables refused (EPROTO) is no table file of this
 * appshot's, told by looking at it again: its kind, its header's version,
 * its size (review r395 F4). `lasting`: as it stands now, it is no table
 * file of this appshot's (its size, its layout, its kind), which no later
 * look would change unless a process of the application rewrote it;
 * otherwise (whole now, or not opened) a later look may read it.
 * undefined: it is gone now. */
function notATableFile(path: string, message: string): { why: string; lasting: boolean } | undefined {
  let fd: number;
  try {
    // Not blocking, nor following a link: whatever is there now.
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    // A symbolic link (ELOOP), a socket (ENXIO)...: what it is, not what
    // it points at. Only the application's owner can have put it there,
    // and no later look would find it otherwise: kept, it was kept for
    // ever, every rm failing the same way.
    let st: Stats | undefined;
    try {
      st = lstatSync(path);
    } catch {
      /* gone meanwhile, or no telling: as the open said */
    }
    return st && !st.isFile() ? { why: `is not a regular file (${fileKind(st)})`, lasting: true } : { why: tablesUnreadable(code, (e as Error).message), lasting: false };
  }
  const lasting = (why: string) => ({ why, lasting: true });
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return lasting(`is not a regular file (${fileKind(st)})`);
    const header = Buffer.alloc(16);
    const got = readSync(fd, header, 0, 16, 0);
    const a = addon();
    if (got === 16 && header.readBigUInt64LE(0) === TABLE_MAGIC && header.readUInt32LE(8) !== a.tableVersion)
      return lasting(`was made by another version of appshot (table layout ${header.readUInt32LE(8)}, this appshot's ${a.tableVersion}: restart the application with this one)`);
    if (st.size < a.tableBytes) return lasting('was truncated (by a process of the application, which holds it open read-write)');
    if (st.size > a.tableBytes) return lasting('grew (by a process of the application, which holds it open read-write)');
    // Its size right, its header not a table file's (the magic, or the
    // size it says, which readTables checks too): overwritten.
    const overwritten = got < 16 || header.readBigUInt64LE(0) !== TABLE_MAGIC || header.readUInt32LE(12) !== a.tableBytes;
    if (/changed size under us/.test(message)) return { why: 'was truncated while appshot read it (by a process of the application, which holds it open read-write)', lasting: overwritten };
    // Whole now: what made it no table file then (short, or zeroed, as
    // it was opened) has been undone since, unless its header is still
    // no table file's.
    return { why: 'was truncated or overwritten (by a process of the application, which holds it open read-write)', lasting: overwritten };
  } catch (e) {
    return { why: tablesUnreadable((e as NodeJS.ErrnoException).code, (e as Error).message), lasting: false };
  } finally {
    closeSync(fd);
  }
}

/** What a file that is not a regular one is, in words. */
function fileKind(st: Stats): string {
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isDirectory()) return 'a directory';
  if (st.isSocket()) return 'a socket';
  if (st.isFIFO()) return 'a FIFO';
  return 'a device';
}

/** Why tables there could not be read, other than their not being a table
 * file: the guard replaced (ENOTRECOVERABLE) keeps the addon's words. */
function tablesUnreadable(code: string | undefined, message: string): string {
  if (code === 'EACCES' || code === 'EPERM') return 'may not be opened by this user (permission denied: restore its mode 0600, or remove the file)';
  return `could not be read (${message})`;
}

/** A port claim's text ("AID PID START [REQUEST]"), parsed. */
function parsePortClaim(text: string): { aid: string; holder: Holder } {
  const [aid, ...holder] = text.trim().split(' ');
  return { aid, holder: parseHolder(holder) };
}

/** "APPAT", the first field of every table file's header (appshot_table.h). */
const TABLE_MAGIC = 0x5441505041n;

/**
 * Who holds or names table files, for the look at a registration whose
 * supervisor is gone (isStale): one of the application's processes may
 * outlive it (a daemon its SIGKILL did not reach), and the registration
 * is not released under that process. A process counts when
 *  - it holds a descriptor of the table file opened for reading and
 *    writing: every process of the application keeps one (preload_fd.c),
 *    whatever uid it runs as, and such a descriptor is a capability: the
 *    file is 0600, only a process given one by the application (or one of
 *    its owner's) can have it. Not an O_PATH one, which anyone who may
 *    search /dev/shm opens (procscan.c, review r435 N1). The file
 *    is known by its device and inode, pinned while /proc/PID/fdinfo
 *    gives its flags, not by the path its descriptor's link reads, which
 *    a file of another mount namespace can read too (isTheFile);
 *  - or its environment names the file (APPSHOT_TABLES), as a process of
 *    the application that closed or never got the descriptor does (a
 *    static program that closes every descriptor), but only when every uid
 *    of it (real, effective, saved, filesystem) is the registry's user's.
 *    Anyone may put any words in their environment, and the path is no
 *    secret (ls /dev/shm): a local user's `env APPSHOT_TABLES=... sleep
 *    inf` kept root's dead registrations running for ever, their SysV
 *    objects, ports and AIDs never released (review r404 F4). A setuid
 *    program is left out by its real uid; one that makes all its uids root
 *    while keeping its caller's environment (sudo, once authenticated) is
 *    run by a user root trusts already.
 * A process holding a table file of this registry is known by that one
 * alone: its environment may name another's (a clone's static program,
 * which environ.ts cannot rewrite, names its source's: review r404 F4 e).
 * The identity and the descriptors come first: /proc/PID/status, stat and
 * fd take no lock of the process's memory. An environment is read only
 * of a process they left undecided, and only once in a walk: reading one
 * takes the process's mmap lock (access_remote_vm), which a process stuck
 * in a page fault (a hung NFS or FUSE mapping) holds, as procps `ps`
 * reading its command line would wait too.
 * What cannot be seen counts as not naming: for a user other than root,
 * a process of the application that became undumpable (it ran a setuid
 * program) shows neither descriptors nor environment, and the
 * registration of an application whose last process it is is released
 * under it (review r404 F4 d).
 */
class TablesNamers {
  private procs?: ProcessFacts[];
  /** Who holds a descriptor whose target reads each path, and the file it is. */
  private held?: Map<string, { p: ProcessFacts; held: ProcessFacts['held'][number] }[]>;
  private named?: Set<string>;
  /** Each table file's identity as first asked (fileIdentity). */
  private readonly identities = new Map<string, string | null>();
  private readonly owner = process.geteuid?.() ?? 0;
  /** `prefix`: where every table file of this registry's lies, as
   * readlink says it (symbolic links resolved). */
  constructor(private readonly prefix: string) {}

  /** Whether any process (but this one, and PID 1) holds or names the
   * table file at `tables`. Every process is looked at once, then each
   * question is answered from what was seen. */
  any(tables: string): boolean {
    const canonical = canonicalTablesPath(tables);
    // One not where this registry makes them (not made by it): on its own.
    if (!canonical.startsWith(this.prefix)) return new TablesNamers(canonical).any(tables);
    this.procs ??= addon().processesFacts(this.prefix);
    if (!this.held) {
      this.held = new Map();
      for (const p of this.procs)
        for (const h of p.held) {
          const holders = this.held.get(h.path) ?? [];
          holders.push({ p, held: h });
          this.held.set(h.path, holders);
        }
    }
    if ((this.held.get(canonical) ?? []).some((h) => this.isTheFile(canonical, h.p, h.held))) return true;
    if (!this.named) {
      this.named = new Set();
      for (const p of this.procs) {
        if (p.held.some((h) => this.isTheFile(h.path, p, h)) || !this.trusted(p)) continue;
        const v = addon().environValue(p.pid, p.start, 'APPSHOT_TABLES');
        if (v) this.named.add(v);
      }
    }
    return this.named.has(tables) || this.named.has(canonical);
  }

  /** Whether process `pid` holds or names `tables`, by the same rule. */
  namedBy(pid: number, tables: string): boolean {
    const canonical = canonicalTablesPath(tables);
    const p = pid > 1 && pid !== process.pid ? addon().processFacts(pid, canonical) : null;
    if (!p) return false;
    if (p.held.some((h) => h.path === canonical && this.isTheFile(canonical, p, h))) return true;
    if (!this.trusted(p)) return false;
    const v = addon().environValue(p.pid, p.start, 'APPSHOT_TABLES');
    return v === tables || v === canonical;
  }

  /** Whether a descriptor `h` (of process `p`) whose target reads `path`,
   * the path of a table file of this registry, is that file: the device
   * and inode of the file it held while its flags were read (procscan.c
   * pinned_file) the table file's. One file system numbers its inodes
   * once, so that is the file on any mount of it (a process of the
   * application that opened it by path in a mount namespace of its own).
   * The text alone is anyone's: in a user and mount namespace of its own,
   * a local user mounts a tmpfs on /dev/shm and opens a file of the same
   * name, and root's readlink of that descriptor reads the table file's
   * path (review r418 F1: it kept root's dead registrations running). A
   * mount id looked up in the process's mountinfo after the scan was no
   * better: ids are given again at once, and a bind of /dev/shm took the
   * id of the user's tmpfs (review r452 F1).
   * On a kernel whose fdinfo says no inode (before 5.14) nothing ties the
   * descriptor's flags to the file pinned: a user's dup2 swap of an O_PATH
   * descriptor of the table file with a read-write one of its own file
   * passed (review r452 F2). There only a process whose uids are all the
   * registry's user's counts by it.
   * Only a path the registry asked about, or one under its prefix that a
   * process of its user's holds, is looked up (`path` itself, never a
   * descriptor's text resolved): a descriptor's text is its holder's
   * words, and a user's "/dev/shm/appshot-TAG-x/f (deleted)", its
   * directory replaced by a file, made the lookup fail (ENOTDIR) and
   * every dead registration's look throw (review r435 N2). A lookup that
   * fails for want of such a file says it is none of ours. */
  private isTheFile(path: string, p: ProcessFacts, h: ProcessFacts['held'][number]): boolean {
    if (!isTablesName(path, this.prefix)) return false;
    let id = this.identities.get(path);
    if (id === undefined) this.identities.set(path, (id = addon().fileIdentity(path)));
    return id !== null && h.identity === id && (h.tied || this.trusted(p));
  }

  /** Whether a process's environment is one to believe: all its uids the
   * registry's user's. */
  private trusted(p: ProcessFacts): boolean {
    return p.uids.every((u) => u === this.owner);
  }
}

/** Whether `path` (a descriptor's target) may be looked up as a table file
 * of the registry whose files start with `prefix`: the prefix itself, or
 * one name more in its directory (/dev/shm), never a path of more
 * components, whose directories are its holder's to choose (review r435
 * N2: a lookup through them as root failed, or could wait on a FUSE
 * server). */
function isTablesName(path: string, prefix: string): boolean {
  return path === prefix || (path.startsWith(prefix) && !path.slice(prefix.length).includes('/'));
}

/** A table file's path with its directory's symbolic links resolved, as
 * the kernel names an open file (/dev/shm may be a link to /run/shm). */
function canonicalTablesPath(tables: string): string {
  try {
    return join(realpathSync(dirname(tables)), basename(tables));
  } catch {
    return tables;
  }
}
