/**
 * The restore driver (FIG. 6): verify the image and this node, then
 * recreate global state (SysV objects, shared memory), then the process
 * tree, each process in isolation until all are ready, bind the virtual ids
 * to the new system ids, and resume everything together.
 *
 * Processes are made from seeds: appshot-init forks one per process whose
 * parent was init, and every other process is forked from its restored
 * parent's seed, so parents, process groups and sessions come out as they
 * were. Each seed is then emptied and refilled from the image with system
 * calls run inside it. A failure at any step before the commit kills
 * every process made so far; init then removes the tables, the SysV
 * objects and the registration. One after the commit leaves the
 * application running (RestoredWithError).
 */
import { restoreExclusiveModes, restoreForeground, takeTerminal } from '../resources/ptys.js';
import { letGoIfUnsettled } from '../ptrace/freezer.js';
import { currentHolder, harnessOf } from '../holder.js';
import { closeSync, constants as fs, fstatSync, openSync, readSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppshotError, errorText, ExitCode } from '../errors.js';
import { awaitPagesCheck, type LoadedImage, loadImage, openPagesAsLoaded, parentChainFault, parentPath, sameFilesOnDisk, unchangedOnDisk } from '../image/format.js';
import { portTable, type Process, type TimeOffsets, verdictRef, type Vma } from '../image/types.js';
import { addon, type InstanceConfig, paths } from '../native.js';
import { readStat } from '../procfs.js';
import { type AppRecord, checkAid, isPrivateRoot, type LocalRegistry, type PortBinding } from '../registry.js';
import { applicationIds, environBlock } from '../resources/environ.js';
import { timeNamespaceArgument, timeNamespaceFor } from '../resources/timens.js';
import { type MadeDir, type RedirTargetsAs, redirLeaves } from '../resources/paths.js';
import { hasPrivateTmp, privateTmpRemade } from '../template/privatetmp.js';
import { askSeedCreds, checkCredentials, ownCreds, prepareSeccomp, restoreCreds, restoreSeccomp, seedFilters } from '../resources/creds.js';
import { restoreFds } from '../resources/files.js';
import { makeUnixPairsInside, unixPairMakers } from '../resources/peermaker.js';
import { identitiesFor, openToMapAs } from '../resources/fsident.js';
import { checkEpollPrivileges } from '../resources/epoll.js';
import { checkFanotifyPrivileges } from '../resources/fanotify.js';
import { restoreQueueNotifications } from '../resources/mqueue.js';
import { restoreAioRings } from '../resources/aio.js';
import { ioUringRanges } from '../resources/iouring.js';
import { restoreFdOwners } from '../resources/fdowner.js';
import { releaseRestored, releaseWhatIsLeft } from '../resources/jobcontrol.js';
import { restoreLocks } from '../resources/locks.js';
import { fillSessionKeyring, joinNewSessionKeyring, joinsSessionKeyring, sessionKeyringJoinLater } from '../resources/keyrings.js';
import { type ClonePlan, RestoreContext } from '../resources/context.js';
import { DEFAULT_HOLD_SECONDS, mayHaveKept } from '../resources/keeper.js';
import { checkSocketPrivileges, requireInherited, requireKept } from '../resources/sockets.js';
import { checkLimits, readLimits, restoreLimits } from '../resources/limits.js';
import { residentBatchOf } from '../ptrace/windows.js';
import { checkLockedMemory, countPages, freeAddress, LiveMaps, restoreMemory, sealMemory, sharedMemoryFd } from '../resources/memory.js';
import { type ByteProgress, noProgress } from '../progress.js';
import { forkedByOtherThread, forkingTid, moveEnvironCall, restoreItimers, restoreProcessState, restoreRoot } from '../resources/process.js';
import { lateSigchldChild, requeueSignals, restoreLateSigchld, retargetSiginfos, sigactionCalls } from '../resources/signals.js';
import { checkCpuAffinities, checkSchedulingPrivileges, restoreAttributes, restoreParentDeathSignals, seedSlack } from '../resources/attributes.js';
import { checkAlarmClocks } from '../resources/timerfd.js';
import { closeCgroupJoins, type CgroupJoins, openCgroupJoins, restoreCgroup } from '../resources/cgroups.js';
import { removeDestroyedShm, restoreSemUndo, restoreSysv, settleSysvPids } from '../resources/sysv.js';
import { restoreWaits } from '../resources/waits.js';
import { IdsAcrossRestore, retargetBlockedCall } from '../resources/blocked.js';
import { restorePosixTimers } from '../resources/timers.js';
import { restoreZombies } from '../resources/zombies.js';
import { restoreTidMoves } from '../resources/mutexes.js';
import { restoreCpuTimes } from '../resources/cputime.js';
import { createThreads, firstHandledSignal, forgetTimedWaits, ImageMemory, restoreLoaderLockOwners, restorePiWaitWords, restoreRobustMutexOwners, RobustWordsRewritten, restoreThreadState, restoreThreadStates, resumeRegisters, unregisterRseq } from '../resources/threads.js';
import { resolveProcess } from '../snapshot/parent.js';
import { preparedRuns } from './prepared.js';
import { injected, type NamedCall, RemoteProcess, SYS } from '../ptrace/remote.js';
import { verifyImage } from './verify.js';
import { configure, letGo, refillAfterRestore, reserveStandby, type StartedInit } from './standby.js';
import { killPoint } from '../killpoint.js';

const THREAD_FLAG = 0x2;
const PAGE_SIZE = 4096;

export interface RestoreOptions {
  aid?: string;
  lazy: boolean;
  /** Check the page data even where this state directory wrote it and it
   * is unchanged since (LoadOptions.trustWritten false). */
  verifyPages?: boolean;
  /** Set when stamping a clone from a template (FIG. 9). */
  instance?: InstancePlan;
  /** An image loaded and verified already (clones of one template): not
   * read, checked or disposed of again. */
  loaded?: LoadedImage;
  /** The caller applied the privilege rule (checkPrivileges) to this
   * image already: a batch of clones, once for all its instances. */
  privilegesChecked?: boolean;
  /** The image chain read and verified by the caller ahead of time
   * (loadImageChain; serve, while its service is suspended), used if every
   * part of it is still the very file that was checked (unchangedOnDisk),
   * else read again. This node and the files the image maps are checked
   * anyway (verifyImage): they can change meanwhile. Not disposed of. */
  preloaded?: LoadedImage[];
  /** The caller made every check of unchangedOnDisk on `preloaded` that
   * is not a stat call (who may change it, whether its signer is still
   * trusted) within the last second, as serve does each second: the
   * restore makes only the stat calls (sameFilesOnDisk). */
  preloadedTrusted?: boolean;
  /** Part of a batch of clones that commits as one (see appshot-init):
   * the restore does not commit itself, and hands back its lifeline for
   * the batch to close once it has. */
  batchCommit?: string;
  /** Told the bytes checked and copied as they are (see progress.ts). */
  progress?: ByteProgress;
  /** Aborted (Ctrl-C, SIGTERM): the restore is given up at the next point
   * where that is safe, and what it made is removed, as after a failure. */
  signal?: AbortSignal;
  /** Awaited once every process is made, stopped and traced, before any
   * connection goes live and before the commit (`appshot serve`'s prepared
   * resume: restored ahead of the connection that wants it). true: the
   * restore goes on; false: it is given up as an interrupted one is, what
   * it made removed. Meanwhile nothing of the application runs; should
   * this process die, init sees its lifeline end and removes it all.
   * Told the processes made, by system PID and virtual PID (what the
   * image and a snapshot's records name each by). */
  hold?: (made: { pid: number; vpid: number }[]) => Promise<boolean>;
  /** With lazy: stored pages copied in all the same, by mapping (page
   * indexes, ascending; MemorySources.prefault): serve's prepared resume
   * copies in those the application is likely to write first. */
  prefault?: (vpid: number, v: Vma) => readonly number[] | undefined;
  /** Called once the restore is committed (init keeps the application
   * from here on, whatever becomes of this process), just before its
   * processes are let go, with its registration: what it is bound to is
   * known, and listening sockets take connections into their backlog
   * already (`appshot serve` forwards the connections it holds then, so
   * that the forwarding thread's connect and the client's request overlap
   * the processes' release and are waiting when they run). Not called
   * for a batch of clones (committed by its caller). It must not throw. */
  committed?: (record: AppRecord) => void;
  /** Where it came from, as `ps` shows it (AppRecord.image): written with
   * its registration, not in a write of its own after the restore. */
  recordImage?: string;
  /** Descriptors of this process installed in the application as they
   * are, by key: for each inherited socket the image names (`appshot
   * serve`'s public listener, resources/sockets.ts), given the options
   * and backlog the image recorded of the application's listener. With
   * some given, an image naming a key not given here (nor in ownListeners)
   * is refused before anything is made; with none (a plain restore), each
   * is made as the application's own listener again. The caller keeps
   * them (none is closed here). */
  inherit?: ReadonlyMap<string, number>;
  /** The image's ordinary TCP listener of this address family at this
   * virtual port is replaced by the descriptor given for `key` (serve's
   * first restore of an image whose listener it has not taken over yet). */
  inheritAt?: { port: number; family: number; key: string };
  /** Inherited listeners of these keys, when not handed over (inherit),
   * are made as the application's own listener they replaced (serve
   * forwarding to an instance whose image was taken while it shared). */
  ownListeners?: ReadonlySet<string>;
  /** Keys whose descriptor (inherit) the caller gave this image's listener
   * options already (serve: SharedListener.takeOwnOptions of this very
   * image, nothing holding it since): its options are set again as
   * before, not first read and given back a fresh socket's (resetExtras:
   * a read of every option, ~0.15 ms of the resume). */
  inheritGiven?: ReadonlySet<string>;
  /** Decides inherit, inheritAt and ownListeners from the image once it
   * is read and verified (serve: whether its listener can be shared with
   * this image's application); what it returns overrides those. */
  inheritFor?: (image: LoadedImage['image']) => Pick<RestoreOptions, 'inherit' | 'inheritAt' | 'ownListeners' | 'inheritGiven'>;
}

/** The privilege rule: nothing the image recorded (credentials, limits)
 * beyond what this user may grant; an AppshotError naming it otherwise. */
export function checkPrivileges(image: LoadedImage['image']): void {
  const own = ownCreds();
  const ownLimits = readLimits('self');
  checkCredentials(image, own);
  checkLimits(image, ownLimits, own);
  checkSchedulingPrivileges(image, own.capEff, ownLimits);
  checkCpuAffinities(image);
  checkLockedMemory(image, own.capEff, ownLimits);
  checkAlarmClocks(image, own.capEff);
  checkSocketPrivileges(image, own.capEff);
  checkFanotifyPrivileges(image, own.capEff);
  checkEpollPrivileges(image, own.capEff);
  timeNamespaceFor(image, own);
}

/** The one line an interrupted restore ends with. */
export const RESTORE_INTERRUPTED = 'interrupted: nothing was restored, the image is as it was';


/** How a clone differs from a plain restore, resource by resource (what
 * the kinds see of it is the ClonePlan). */
export interface InstancePlan extends ClonePlan {
  /** The tables' instance section: REDIR PATH, copy-on-write paths, SET ENV. */
  config: InstanceConfig;
  /** Registry fields of the new application. */
  record: Pick<AppRecord, 'rules' | 'template' | 'privateRoot' | 'ports' | 'heldReady'>;
  /** Makes what the instance needs before it is restored (its private
   * copies in privateRoot): run once it is registered, so that a restore
   * killed at any instant after leaves them to be removed with it. */
  prepare(): void;
}

export interface RestoreResult {
  aid: string;
  image: string;
  processes: number;
  threads: number;
  initPid: number;
  /** The restore's own time: from the verified image to the resumed app. */
  restoreMs: number;
  verifyMs: number;
  /** Whether any page file of the image and its parents was checked;
   * false when this state directory wrote every one of them and each is
   * unchanged since (written.ts). */
  pagesChecked: boolean;
  lazy: boolean;
  /** Directories made for its REDIR PATH targets. */
  createdDirs: MadeDir[];
  /** With batchCommit: the write end of the instance's lifeline, for the
   * batch to close once committed (see appshot-init). */
  lifeline?: number;
  /** System calls injected to restore credentials and limits (each a
   * round trip through the scheduler, ~16 µs). */
  credentialCalls: number;
  /** Its seeds: the processes rooted in its init (standby.ts keeps
   * supervisors per seed count). */
  seeds: number;
  /** Whether its init was a standby started ahead of time (standby.ts). */
  fromStandby: boolean;
  /** System calls injected in all (each a ptrace round trip): the
   * restore's cost in stops (in the engine, with another command running
   * at once, its calls count too). */
  injectedCalls: number;
  /** What the restore could not carry and went on without, one line each
   * (the CLI prints them as warnings): never a privilege, never silent. */
  notKept: string[];
}

/** A restore that committed, then failed at a step after: the
 * application exists, is registered and runs (see the restore's catch).
 * `restored` is what the restore would have returned. */
export class RestoredWithError extends AppshotError {
  constructor(
    message: string,
    readonly restored: RestoreResult,
  ) {
    super(message, ExitCode.afterCommit);
  }
}

const now = () => Number(process.hrtime.bigint() / 1000n) / 1000;

/** Bytes done of bytes to do, for a ByteProgress: the image's page data
 * checked, then the memory copied into the processes. */
class ProgressMeter {
  done = 0;
  private checkTotal = 0;
  /** Until the image is read, the newest page file's size stands for it. */
  private copyTotal?: number;
  constructor(
    private readonly progress: ByteProgress,
    private readonly copies: boolean,
  ) {}
  private get total(): number {
    return this.checkTotal + (this.copyTotal ?? 0);
  }
  /** A page file to check, of `n` bytes. */
  toCheck(n: number): void {
    this.checkTotal += n;
    if (this.copies && this.copyTotal === undefined) this.copyTotal = n;
    this.progress.bytes(this.done, this.total);
  }
  toCopy(n: number): void {
    this.copyTotal = n;
    this.progress.bytes(this.done, Math.max(this.done, this.total));
  }
  add(n: number): void {
    this.done += n;
    this.progress.bytes(this.done, Math.max(this.done, this.total));
  }
}

/** The image and its parents, newest first. Ctrl-C while their page data
 * is checked (seconds per GiB) ends it at once. `known`: a chain loaded
 * already (the previous image of a service, still unchanged on disk),
 * taken as it is from the link where the new chain joins it. */
async function loadChain(path: string, meter: ProgressMeter, signal?: AbortSignal, known: LoadedImage[] = [], forLater = false, verifyPages = false): Promise<LoadedImage[]> {
  // Page files of format 3 are checked by chunks on threads of their own
  // while the restore goes on (LoadedImage.pagesCheck); one held for later
  // (serve's preload) is checked whole now. Either way the file checked
  // stays open, and is the one the restore copies or maps: its path may
  // name another file by then.
  const hooks = { onPagesSize: (n: number) => meter.toCheck(n), onBytes: (n: number) => meter.add(n), signal, holdPages: true, deferPagesCheck: !forLater, trustWritten: !verifyPages };
  const interrupted = (e: unknown) => {
    throw signal?.aborted ? new AppshotError(RESTORE_INTERRUPTED, ExitCode.interrupted) : e;
  };
  const chain = [await loadImage(path, hooks).catch(interrupted)];
  // Each image met (directory and id): a chain that loops, or runs past
  // MAX_PARENT_CHAIN, is refused before its next link is read.
  const seen = new Set<string>();
  try {
    parentChainFault(seen, chain[0].dir, chain[0].manifest.imageId, 0);
    for (;;) {
      const child = chain[chain.length - 1];
      const parent = child.image.parent;
      if (!parent) return chain;
      const at = resolve(parentPath(child.dir, parent.path));
      const fault = parentChainFault(seen, at, parent.imageId, chain.length);
      if (fault) throw new AppshotError(fault);
      const joinsAt = known.findIndex((k) => resolve(k.dir) === at && k.manifest.imageId === parent.imageId);
      if (joinsAt >= 0 && known.slice(joinsAt).every(unchangedOnDisk)) return [...chain, ...known.slice(joinsAt)];
      const loaded = await loadImage(parentPath(child.dir, parent.path), { asParent: true, ...hooks }).catch(interrupted).catch((e: Error) => {
        if (e instanceof AppshotError && e.message === RESTORE_INTERRUPTED) throw e;
        throw new AppshotError(`the image is incremental and its parent ${parent.path} cannot be read: ${e.message}`);
      });
      chain.push(loaded);
      if (loaded.manifest.imageId !== parent.imageId)
        throw new AppshotError(`the image's parent ${parent.path} is not the image it was taken against (it was replaced)`);
    }
  } catch (e) {
    for (const l of chain) l.dispose();
    throw e;
  }
}

/** An image and its parents, read and verified (manifest signature, every
 * part's checksums, metadata) ahead of a restore: what `serve` keeps of a
 * suspended service, so that its resume does not read them again (see
 * RestoreOptions.preloaded). Their page files stay open (pagesFd, until
 * dispose): the restore reads the files that were checked, not whatever
 * their paths name by then. `known` as for loadChain. */
export function loadImageChain(path: string, known: LoadedImage[] = []): Promise<LoadedImage[]> {
  return loadChain(path, new ProgressMeter(noProgress, false), undefined, known, true);
}

/** What an appshot-init reports on its status pipe (see its header),
 * read as far as needed. */
class InitReports {
  readonly seeds: number[] = [];
  /** Where the seeds have a scratch area of their own (appshot-init's
   * seed_scratch), if they do: 0n if not. */
  seedScratch = 0n;
  started = false;
  private open = true;
  private pending = '';
  private readonly buf = Buffer.alloc(4096);

  constructor(private readonly fd: number) {}

  /** Reads reports until `enough`; false if init died first. */
  readUntil(enough: () => boolean): boolean {
    while (!enough()) {
      if (!this.open) return false;
      const n = readSync(this.fd, this.buf);
      if (n === 0) return false;
      this.pending += this.buf.toString('latin1', 0, n);
      const lines = this.pending.split('\n');
      this.pending = lines.pop()!;
      for (const line of lines) {
        const [tag, a, b] = line.split(' ');
        if (tag === 'C') {
          this.seeds.push(Number(a));
          if (b && /^\d+$/.test(b)) this.seedScratch = BigInt(b);
        }
        if (tag === 'S') this.started = true;
      }
    }
    return true;
  }

  close(): void {
    if (this.open) closeSync(this.fd);
    this.open = false;
  }

  /** Its pipe was closed by someone else (standby.ts letGo). */
  forget(): void {
    this.open = false;
  }
}

/** A standby taken for a restore (standby.ts), with its reports read as
 * far as its seeds. */
interface ReservedStandby {
  init: StartedInit;
  reports: InitReports;
}

/** The application's init, started: its PID, its seeds, the write end of
 * its lifeline (see startInit), and its status pipe until confirmed. */
interface Supervisor {
  initPid: number;
  seeds: number[];
  /** Where its seeds have a scratch area of their own (0n: none). */
  seedScratch: bigint;
  lifeline: number;
  /** Waits for init's report that it runs as this application's (a
   * standby may still be taking its arguments); throws if it died. */
  confirm(): void;
  /** Lets go of its status pipe (after a failure). */
  close(): void;
}

/** The last line appshot-init wrote to the log at or after byte `from`
 * ("appshot-init: WHAT: ERROR", what it says before it dies), without its
 * prefix; undefined if none. At most the last 4 KiB are read. */
function lastInitWords(logPath: string, from: number): string | undefined {
  let fd: number;
  try {
    fd = openSync(logPath, fs.O_RDONLY);
  } catch {
    return undefined;
  }
  try {
    const size = fstatSync(fd).size;
    const start = Math.max(from, size - 4096);
    const buf = Buffer.alloc(Math.max(0, size - start));
    const n = buf.length ? readSync(fd, buf, 0, buf.length, start) : 0;
    const lines = buf.subarray(0, n).toString('utf8').split('\n').filter((l) => l.startsWith('appshot-init: '));
    return lines.length ? lines[lines.length - 1].slice('appshot-init: '.length).slice(0, 300) : undefined;
  } finally {
    closeSync(fd);
  }
}

/** Starts the application's init with `count` seeds, or has a reserved
 * standby become it (standby.ts); returns their PIDs and the write end of
 * its lifeline: until `commitPath` exists, init kills the application if
 * that closes (this process died). Its reports are read synchronously:
 * nothing else happens meanwhile. A standby's seeds exist already: the
 * restore goes on while it takes its arguments, and confirm() waits for
 * it. */
function startInit(record: AppRecord, count: number, commitPath: string, reserved?: ReservedStandby, timeNamespace?: TimeOffsets): Supervisor {
  let init: StartedInit | undefined;
  let reports: InitReports | undefined;
  if (reserved) {
    if (configure(reserved.init, { tables: record.tables, stateDir: record.stateDir, aid: record.aid, commitPath, logPath: record.logPath! })) ({ init, reports } = reserved);
    else reserved.reports.forget();
  }
  // Where what this init says begins in the log: the line it dies with,
  // should it (appshot-init: WHAT: ERROR), is the reason.
  let saidFrom = -1;
  if (!init) {
    const log = openSync(record.logPath!, fs.O_WRONLY | fs.O_CREAT | fs.O_APPEND, 0o600);
    try {
      saidFrom = fstatSync(log).size;
      const args = ['--tables', record.tables, '--state-dir', record.stateDir, '--preload', paths.preload, '--aid', record.aid];
      if (timeNamespace) args.push('--timens', timeNamespaceArgument(timeNamespace));
      init = addon().spawnDetached(paths.init, [paths.init, ...args, '--status-fd', '3', '--seeds', String(count), '--lifeline', '4', '--commit', commitPath], log);
    } finally {
      closeSync(log);
    }
  }
  const { pid, lifelineFd } = init;
  const status = reports ?? new InitReports(init.statusFd);
  const fromStandby = reports !== undefined;
  const died = () => {
    const last = saidFrom >= 0 ? lastInitWords(record.logPath!, saidFrom) : undefined;
    return new AppshotError(`the application supervisor died while starting${last ? ` (${last})` : ''}`);
  };
  let ok = false;
  try {
    ok = status.readUntil(() => status.started || (fromStandby && status.seeds.length >= count));
  } finally {
    if (!ok) {
      status.close();
      closeSync(lifelineFd);
    }
  }
  if (!ok) throw died();
  if (status.started) status.close();
  return {
    initPid: pid,
    seeds: status.seeds,
    seedScratch: status.seedScratch,
    lifeline: lifelineFd,
    confirm: () => {
      const up = status.readUntil(() => status.started);
      status.close();
      if (!up) throw died();
    },
    close: () => status.close(),
  };
}

interface Made {
  proc: Process;
  pid: number;
  tids: number[];
  /** Where it has a scratch area with room for the batch code, if it
   * has one (a seed's own, or inherited from the process it was forked
   * from): used if no mapping of the image is in its way. */
  scratch?: bigint;
  /** Set once its memory is filled (fillMemory). */
  remote?: RemoteProcess;
  /** Calls for the first stop of its memory's fill (fillMemory), not a
   * stop of their own before it: its session keyring joined. */
  firstCalls?: NamedCall[];
}

/** Whether the process leaves SIGTRAP to its default action (neither a
 * handler of its own nor ignored). */
const trapIsDefault = (p: Process) => !p.sigactions.some((a) => a.signal === 5 && a.handler !== 0n);

/** Whether a process has a scratch area of ours at `at` (anonymous,
 * readable, writable and executable, of the scratch area's size, as
 * appshot-init maps it) and no mapping of the image is in its way. */
function scratchLeftFree(at: bigint, seedMaps: { start: bigint; end: bigint; perms: string; path: string }[], vmas: { start: bigint; end: bigint }[]): boolean {
  const end = at + BigInt(RemoteProcess.scratchSize);
  return seedMaps.some((l) => l.start === at && l.end === end && l.perms === 'rwxp' && !l.path) && !vmas.some((v) => v.start < end && at < v.end);
}

/** Whether a process shares pages copy-on-write with its parent: the
 * parent's memory is then filled before the process is forked from it. */
const sharesWithParent = (p: Process) => p.vmas.some((v) => (v.pages?.cowShared?.length ?? 0) > 0);

/** REDIR PATH targets made as the image's processes would make them
 * (paths.ts makeDirectoriesAs), each written into the registration
 * `record` (with `update`) before its first directory is made: a restore
 * killed in between leaves the record its cleanup removes them by.
 * `image`: the image whose word the targets are (a plain restore's); a
 * clone's come from its rules, the restorer's to make (undefined). */
function redirTargetsAs(image: LoadedImage['image'] | undefined, record: AppRecord, update: (r: AppRecord) => void): RedirTargetsAs {
  return {
    ...(image ? { who: identitiesFor(image, undefined) } : {}),
    willMake: (made) => {
      record.restore!.madeDirs = made;
      update(record);
    },
  };
}

/** The tree's roots: the processes whose parent was init (or is gone),
 * each started from one of init's seeds. */
function rootProcesses(image: LoadedImage['image']): LoadedImage['image']['processes'] {
  const vpids = new Set(image.processes.map((p) => p.vpid));
  return image.processes.filter((p) => !vpids.has(p.vppid));
}

/** How many seeds a restore of `image` starts its init with. */
export const seedCount = (image: LoadedImage['image']): number => rootProcesses(image).length;

export async function restore(reg: LocalRegistry, imagePath: string, opts: RestoreOptions): Promise<RestoreResult> {
  const started = now();
  const injectedBefore = injected.calls;
  const phase = (what: string) => {
    if (process.env.APPSHOT_DEBUG) process.stderr.write(`${(now() - started).toFixed(2)} ms, ${injected.calls - injectedBefore} calls injected: ${what}\n`);
    killPoint(`restore: ${what}`);
  };
  const meter = new ProgressMeter(opts.progress ?? noProgress, !opts.lazy && !opts.instance);
  const preloaded = opts.preloaded?.length && resolve(opts.preloaded[0].dir) === resolve(imagePath) && opts.preloaded.every(opts.preloadedTrusted ? sameFilesOnDisk : unchangedOnDisk) ? opts.preloaded : undefined;
  const chain = opts.loaded ? [opts.loaded] : (preloaded ?? (await loadChain(imagePath, meter, opts.signal, [], false, opts.verifyPages)));
  phase(`image ${preloaded ? 'read and checked ahead of time' : 'read and checked'} (${chain.length} in its chain)`);
  const { image } = chain[0];
  let record: AppRecord | undefined;
  const made: Made[] = [];
  const seeds: number[] = [];
  const forked: number[] = [];
  // A preloaded link's page file is the one it checked, held open since
  // (unchangedOnDisk made sure it is unchanged and still at its path);
  // the others are opened now, and closed at the end.
  const pageFds: number[] = [];
  try {
    for (const l of chain) pageFds.push(l.pagesFd ?? openPagesAsLoaded(l));
  } catch (e) {
    for (const [i, fd] of pageFds.entries()) if (chain[i].pagesFd !== fd) closeSync(fd);
    if (!opts.loaded && !preloaded) for (const l of chain) l.dispose();
    throw new AppshotError(`${opts.instance ? `cannot clone ${imagePath} as '${opts.aid}'` : `cannot restore ${imagePath}`}: ${(e as Error).message}`);
  }
  // Checks of the page files still going on (format 3): a chunk is read
  // only once checked, and all are waited for before anything runs.
  const pageChecks = chain.map((l) => l.pagesCheck);
  const ownPageFd = (i: number) => chain[i].pagesFd !== pageFds[i];
  // Ports an instance was allocated are its own again (the registry's
  // claim is taken back, or the restore is refused if a live application
  // holds one).
  const ownPorts: PortBinding[] = opts.instance
    ? []
    : portTable(image).map((e) => ({ virtual: e.virtual, system: e.system, mode: 'allocate' as const }));
  const claimed: number[] = [];
  let credentialCalls = 0;
  const notKept: string[] = [];
  // Directories made for REDIR PATH targets: removed if the restore fails.
  const madeDirs: MadeDir[] = [];
  // Made once the application's log exists: descriptors that pointed at
  // a terminal or at the old log go there.
  let handover: RestoreContext | undefined;
  // Closed (by us, or by our death) before the commit: init kills what
  // was made. The batch a clone belongs to closes it after its commit.
  let lifeline = -1;
  let supervisor: Supervisor | undefined;
  // Reserved, until startInit gives it its arguments.
  let standby: ReservedStandby | undefined;
  // Its seeds, seized already.
  const preSeized = new Set<number>();
  // The seed count of the standby asked for, replaced once this ends.
  let standbyCount: number | undefined;
  const commitPath = opts.batchCommit ?? reg.newCommitPath();
  // Time spent held (opts.hold): not the restore's own.
  let heldMs = 0;
  // Set by the commit: what the restore made, as it would return it.
  let committedResult: (() => RestoreResult) | undefined;
  // Ours until the restore's context keeps them (mapOpened, below).
  const verifiedOpens = new Map<string, number>();
  // Each process's cgroup.procs, opened for its move before anything is made.
  let cgroupJoins: CgroupJoins = new Map();
  try {
    // Ctrl-C is heard only between the steps that run synchronously (a
    // page file checked, 32 MiB of a process's memory copied): at each of
    // these points, a turn of the event loop lets its handler run.
    const heardInterrupt = async () => {
      if (!opts.signal) return;
      await new Promise((resolve) => setImmediate(resolve));
      if (opts.signal.aborted) throw new AppshotError(RESTORE_INTERRUPTED, ExitCode.interrupted);
    };
    await heardInterrupt();
    // A root restore's processes map what the check opened as them:
    // the very files checked, not opened again by name (openToMapAs).
    if (!opts.loaded) verifyImage(image, undefined, process.geteuid?.() === 0 ? verifiedOpens : undefined);
    // The privilege rule, before anything is made: nothing the image
    // recorded beyond what this user may grant (a batch of clones applies
    // it once: privilegesChecked).
    if (!opts.privilegesChecked) checkPrivileges(image);
    // Whether its processes may enter their cgroups, as they would: a
    // refusal before anything is made (cgroups.ts).
    cgroupJoins = openCgroupJoins(image, sharesWithParent);
    if (opts.inheritFor) opts = { ...opts, ...opts.inheritFor(image) };
    requireInherited(image, opts.inherit ?? new Map(), opts.ownListeners ?? new Set());
    const verified = now();
    phase('node verified');
    const aid = opts.aid ?? image.aid;
    checkAid(aid);
    const vpids = new Set(image.processes.map((p) => p.vpid));
    const roots = rootProcesses(image);
    // A supervisor the engine started ahead of time, if it keeps one: named
    // in the registration from the start.
    // The clock offsets of a time namespace of its own, where its own
    // differ from ours (timens.ts): made by a supervisor started for it,
    // before its seeds (a standby's were forked in ours).
    const timeNamespace = timeNamespaceFor(image, ownCreds());
    if (!timeNamespace) standbyCount = roots.length;
    const taken = timeNamespace ? undefined : reserveStandby(roots.length);
    if (taken) {
      // Its seeds seized now (dying with us from here), so that each has
      // stopped by the time the tree is made: the registration's writes
      // overlap their wake-ups.
      const reports = new InitReports(taken.statusFd);
      standby = { init: taken, reports };
      const seized: number[] = [];
      try {
        if (!reports.readUntil(() => reports.seeds.length >= roots.length)) throw new Error('gone');
        // A report outlives the standby that wrote it: dead, its seeds
        // died too and their PIDs may be anyone's now, and so may the
        // standby's own (the engine reaps a dead standby: server.ts
        // reapDetached). A seed must still be the standby's child:
        // checked before seizing, and again after, when the process can
        // no longer go and be replaced unseen. Only a reused parent and
        // child pair of PIDs could pass, which is negligible (review r369).
        const ours = (pid: number) => readStat(pid)?.ppid === taken.pid;
        for (const pid of reports.seeds) {
          if (!ours(pid)) throw new Error('gone');
          addon().seize(pid, true);
          if (!ours(pid)) {
            // Someone else's: let go as it was (a detach needs it stopped).
            try {
              addon().interrupt(pid);
              addon().wait(pid, 1000);
              addon().detach(pid, 0);
            } catch {
              /* gone */
            }
            throw new Error('gone');
          }
          seized.push(pid);
          addon().interrupt(pid);
        }
        seized.forEach((pid) => preSeized.add(pid));
      } catch {
        // Gone meanwhile (killed, with its seeds): let go, and a
        // supervisor is started as without standbys. What was seized of
        // it is ended and its report taken.
        for (const pid of seized) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            /* gone */
          }
          addon().wait(pid, 1000);
        }
        reports.forget();
        letGo(taken);
        standby = undefined;
      }
    }
    if (taken) phase(standby ? 'standby taken' : 'standby gone');
    // Read when it was started (standby.ts), not now.
    const standbyStart = standby && (standby.init.startTime ?? readStat(standby.init.pid)?.startTime);
    const copies = image.instance?.privateRoot && isPrivateRoot(reg.home, image.instance.privateRoot) ? image.instance.privateRoot : undefined;
    const leaves = redirLeaves(opts.instance?.config.redirs ?? image.instance?.redirs ?? []);
    // A private /tmp is one application's (privatetmp.ts): restored under
    // another AID while that one runs (a --leave-running snapshot, an
    // image restored twice), both would use it, and meet each other's
    // PID-named files there again (review r250). A template's clones each
    // get a copy of their own.
    const sharing = !opts.instance && copies && hasPrivateTmp({ privateRoot: copies, redirLeaves: leaves }) ? reg.runningWith(copies, aid) : undefined;
    if (sharing)
      throw new AppshotError(`the image's private /tmp is that of '${sharing}', which is running: restored beside it, both would use it (stop '${sharing}' first, or make a template of the image, whose clones each get their own)`, ExitCode.conflict);
    if (copies && !opts.instance) reg.markSharedCopies(aid, copies);
    record = reg.register(aid, (stateDir) => ({
      command: image.command,
      cwd: image.processes[0]?.cwd ?? '/',
      createdAt: new Date().toISOString(),
      detached: true,
      ...harnessOf(currentHolder()),
      logPath: join(stateDir, 'log'),
      ...(image.rules ? { rules: image.rules } : {}),
      ...(ownPorts.length ? { ports: ownPorts } : {}),
      // A clone's private copies, only if the image names this node's own
      // directory of them (rm removes it): no other path an image gives
      // is recorded.
      ...(copies ? { privateRoot: copies } : {}),
      // Known to another instance's rm from the first write on: one made
      // for that instance is left while this one leads into it.
      ...(leaves.length ? { redirLeaves: leaves } : {}),
      ...(opts.recordImage !== undefined ? { image: opts.recordImage } : {}),
      ...opts.instance?.record,
      // What it takes over of the snapshot that ended its AID, said in
      // this first write (adoptCarriedLog below moves them).
      restore: { commitPath, madePaths: opts.instance ? [opts.instance.privateRoot] : [], madeDirs: [], ...(opts.instance ? {} : reg.carriedOver(aid, join(stateDir, 'log'))) },
      ...(standby && standbyStart !== undefined ? { initPid: standby.init.pid, initStartTime: standbyStart } : {}),
    }), { restoring: !opts.instance });
    phase('registered');
    // It takes the place of the snapshot that ended its AID's application
    // (ps -a's record), and its log goes on where that left it.
    reg.adoptCarriedLog(record);
    opts.instance?.prepare();
    // After registering: a stale registration of the same AID, released
    // by register, takes its port claims with it.
    for (const p of ownPorts) {
      if (!reg.claimPort(aid, p.system)) throw new AppshotError(`port ${p.system}, which the instance was allocated, is held by '${reg.portOwner(p.system)}'`, ExitCode.conflict);
      claimed.push(p.system);
    }
    const tables = record.tables;
    // The tables are new: their instance section (path rewriting, SET ENV)
    // is filled before any process runs. A plain restore brings back the
    // same instance, with its paths as they were; a clone brings its own.
    const config: InstanceConfig = opts.instance?.config ?? { redirs: image.instance?.redirs ?? [], env: image.instance?.env ?? [], identity: image.instance?.identity };
    madeDirs.push(...reg.makeRedirTargets(config.redirs, redirTargetsAs(opts.instance ? undefined : image, record, (r) => reg.update(r))));
    privateTmpRemade(config.redirs, madeDirs, copies);
    // Written before anything else is made, so that a restore killed from
    // here on has them removed; none made, the record registered holds it.
    if (madeDirs.length) {
      record.restore!.madeDirs = madeDirs;
      reg.update(record);
    }
    addon().setInstance(tables, config);
    restoreWaits(image, tables);
    const handed = (handover = new RestoreContext(image, pageFds[0], record.logPath!, opts.instance, config.redirs, tables));
    handed.pagesCheck = pageChecks[0];
    // A clone held for the engine's pool (template/pool.ts).
    handed.listenAtRelease = !!opts.hold && !!opts.instance;
    if (opts.inherit) handed.inherit = opts.inherit;
    handed.inheritAt = opts.inheritAt;
    if (opts.ownListeners) handed.ownListeners = opts.ownListeners;
    if (opts.inheritGiven) handed.inheritGiven = opts.inheritGiven;
    // A queue made is written into the registration before anything else
    // is done with it, as madeDirs above.
    const registered = record;
    handed.recordQueueMade = (name) => {
      (registered.restore!.madeQueues ??= []).push(name);
      reg.update(registered);
    };
    handed.recordRedirCopyPlanned = (target, temporary) => {
      (temporary ? (registered.restore!.redirTemporaries ??= []) : (registered.restore!.redirCopies ??= [])).push(target);
      reg.update(registered);
    };
    // A socket file's name likewise (JSON has no bigint: capEff as text).
    handed.recordSocketFileMade = (dir, name, who) => {
      const as = who === undefined ? undefined : (Array.isArray(who) ? who : [who]).map((i) => ({ fsuid: i.fsuid, fsgid: i.fsgid, groups: i.groups, capEff: i.capEff.toString() }));
      (registered.restore!.madeSocketFiles ??= []).push({ dir, name, ...(as ? { who: as } : {}) });
      reg.update(registered);
    };
    // A deleted executable's copy at its own name likewise.
    handed.recordExecutableNameMade = (dir, name, who) => {
      const as = who === undefined ? undefined : (Array.isArray(who) ? who : [who]).map((i) => ({ fsuid: i.fsuid, fsgid: i.fsgid, groups: i.groups, capEff: i.capEff.toString() }));
      (registered.restore!.madeExecutableNames ??= []).push({ dir, name, ...(as ? { who: as } : {}) });
      reg.update(registered);
    };
    // And taken back once nothing of ours is at it (the last such entry:
    // made one at a time).
    handed.recordExecutableNameDone = (dir, name) => {
      const names = registered.restore!.madeExecutableNames ?? [];
      for (let i = names.length - 1; i >= 0; i--)
        if (names[i].dir === dir && names[i].name === name) {
          names.splice(i, 1);
          reg.update(registered);
          return;
        }
    };
    // The connections an appshot-keeper held since the snapshot that
    // ended the application (keeper.ts); a clone has none of its own.
    if (!opts.instance && mayHaveKept(image)) {
      const keep = { home: reg.home, aid: image.aid, imageId: chain[0].manifest.imageId, holdSeconds: DEFAULT_HOLD_SECONDS };
      // Under another AID, the image's own is held while they are taken,
      // as `rm` and `prune` hold it to drop them (lifecycle.ts
      // removeSnapshotted); one registered meanwhile took them already.
      if (aid === image.aid) handed.kept.adopt(keep);
      else reg.withAidHeld(image.aid, () => handed.kept.adopt(keep));
      requireKept(handed);
    }
    for (const p of ownPorts) addon().bind(tables, 'port', p.virtual, p.system);
    for (const [asked, own] of opts.instance?.ports ?? []) addon().bind(tables, 'port', asked, own);

    // Global state first (step 308).
    const shmIds = restoreSysv(image, tables, pageFds[0], handed.notKept, pageChecks[0]);

    phase('global state');
    const reserved = standby;
    standby = undefined;
    const fromStandby = reserved !== undefined;
    const started2 = (supervisor = startInit(record, roots.length, commitPath, reserved, timeNamespace));
    lifeline = started2.lifeline;
    phase('init started');
    seeds.push(...started2.seeds);
    if (record.initPid !== started2.initPid) {
      record.initPid = started2.initPid;
      record.initStartTime = readStat(started2.initPid)?.startTime;
      reg.update(record);
    }

    const seize = (pid: number) => {
      if (!preSeized.has(pid)) {
        addon().seize(pid, true); // dies with us until committed
        addon().interrupt(pid);
      }
      const r = addon().wait(pid, 10_000);
      if (!r || r.kind !== 'stop') throw new AppshotError(`seed ${pid} did not stop (${r?.kind ?? 'timeout'})`);
      // Every signal blocked until the end (RemoteProcess relies on it);
      // the processes forked from it inherit the mask.
      addon().setSigmask(pid, ~0n);
    };
    const chainImages = chain.map((l) => l.image);
    const lazyRestore = opts.lazy || opts.instance !== undefined;
    // What will be copied (a lazy restore maps it instead).
    if (!lazyRestore)
      meter.toCopy(image.processes.reduce((n, p) => n + p.vmas.reduce((m, v) => m + countPages(v.pages?.runs ?? []) + countPages(v.pages?.fromParent ?? []), 0), 0) * PAGE_SIZE);
    // The files this restore opened for its processes to map, as them
    // (fsident.ts openToMapAs), held until every process has mapped them.
    const mapOpened = new Map<string, number>();
    for (const [k, fd] of verifiedOpens) mapOpened.set(k, handed.keep(fd));
    verifiedOpens.clear();
    const memory = {
      pageFds,
      pageChecks,
      // Opened inside the restored process (a lazy restore maps them): a
      // held descriptor by appshot's /proc entry, not /proc/self. Whole
      // paths: the seed's directory is its supervisor's, which need not be
      // ours (a standby's is /).
      // The descriptor, never the path again: it is the file checked.
      pagePaths: pageFds.map((fd) => `/proc/${process.pid}/fd/${fd}`),
      lazy: lazyRestore,
      // A clone maps the template's pages copy-on-write, but for memory
      // whose rule says it is duplicated.
      eager: (vpid: number, v: Vma) => opts.instance?.action(verdictRef.vma(vpid, v)) === 'duplicate',
      prefault: opts.prefault,
      mappedPath: (vpid: number, v: Vma) => handed.mappedPath(vpid, v),
      // Unprivileged, the restorer's rights are the process's own.
      ...(process.geteuid?.() === 0 ? { openToMap: (vpid: number, path: string, flags: number) => openToMapAs(image, vpid, path, flags, mapOpened, (fd) => handed.keep(fd)) } : {}),
      sharedFd: (i: number) => sharedMemoryFd(handed, i),
      shmSystemId: (vid: number) => {
        const sid = shmIds.get(vid);
        if (sid === undefined) throw new AppshotError(`the image maps SysV segment ${vid}, which it does not hold`);
        return sid;
      },
      tables: { old: image.tablesPath, new: tables },
      transfer: (r: RemoteProcess, fd: number) => handed.transfer(r, fd),
      inherited: (vpid: number) => resolveProcess(chainImages, vpid),
      // Worked out while the image waited (serve's preload), if it was.
      inheritedRuns: preparedRuns(chain),
      asFork: opts.instance !== undefined,
      forkedFrom: (vpid: number) => forkedWithMemory.get(vpid),
      copied: (bytes: number) => meter.add(bytes),
      betweenSlices: heardInterrupt,
    };
    // Processes forked from a parent whose memory was filled already.
    const forkedWithMemory = new Map<number, { vpid: number; vmas: Vma[] }>();
    // Each process's /proc/PID/maps, read once per point at which it can
    // have changed (LiveMaps): a process's calls while the tree is made
    // (its setsid, setpgid, the forks of its children) find its vDSO from
    // one read, which its memory's fill then starts from.
    const liveMaps = new Map<number, LiveMaps>();
    const mapsOf = (pid: number): LiveMaps => {
      let l = liveMaps.get(pid);
      if (!l) liveMaps.set(pid, (l = new LiveMaps(pid)));
      return l;
    };
    /** Memory first of every process: emptied and filled from the image. */
    const fillMemory = async (m: Made): Promise<RemoteProcess> => {
      if (m.remote) return m.remote;
      // Into its cgroup before its memory is made, which is charged there.
      restoreCgroup(image, m.proc, m.pid, cgroupJoins);
      // Its maps: for the vDSO, a free place for the scratch area, and
      // what is to be unmapped (the scratch area is kept apart); those the
      // tree's making read for its calls there, if no call since could
      // have changed them (LiveMaps).
      const seedMaps = mapsOf(m.pid).get();
      const r = (m.remote = new RemoteProcess(m.pid, seedMaps.find((l) => l.path === '[vdso]')));
      unregisterRseq(r, m.pid);
      // AIO rings are moved to their addresses later, io_uring rings
      // mapped there later: kept free.
      const rings = [...(m.proc.aioRings ?? []).map((a) => ({ start: a.address, end: a.address + a.length })), ...ioUringRanges(m.proc)];
      const used = [...m.proc.vmas, ...seedMaps, ...rings];
      // The scratch area it has already, if the image leaves it where it
      // is (one stop fewer); else one mapped where the image has nothing.
      if (!(m.scratch !== undefined && scratchLeftFree(m.scratch, seedMaps, [...m.proc.vmas, ...rings]) && r.adoptScratch(m.scratch)))
        r.mapScratch(freeAddress(used, BigInt(RemoteProcess.scratchSize)));
      if (m.firstCalls) r.defer(m.firstCalls.splice(0));
      phase(`process ${m.proc.vpid}`);
      await restoreMemory(r, m.proc.vmas, m.proc.vpid, memory, seedMaps);
      phase('memory');
      return r;
    };
    const queue: Made[] = roots.map((proc, i) => ({ proc, pid: seeds[i], tids: [], scratch: started2.seedScratch || undefined }));
    for (const m of queue) seize(m.pid);
    // Every seed runs under appshot's own seccomp filters, if any.
    const inheritedFilters = seedFilters(queue[0].pid);
    const xstate = addon().getXstate(queue[0].pid).length;
    if (image.node.xstateSize && xstate !== image.node.xstateSize)
      throw new AppshotError(`this CPU's FPU state is ${xstate} bytes, the image's ${image.node.xstateSize}: a different CPU model`);
    const sysPid = new Map<number, number>();
    handed.systemPid = (vpid) => sysPid.get(vpid);
    // Sessions and process groups whose leader is not in the image (a
    // daemon whose first fork exited, a pipeline whose leader ended) are
    // made by placeholders: a seed that becomes the leader, forks the
    // member, and is killed once the tree is made (init, the subreaper,
    // adopts the member, as it had). vsid/vpgid -> placeholder's PID.
    const placeholders = new Map<number, number>();
    const byVpid = new Map(image.processes.map((p) => [p.vpid, p]));
    const restorer = { uid: process.geteuid!(), gid: process.getegid!(), realUid: process.getuid!() };
    // A fork leaves the parent's mappings as they were (the child's are a
    // copy): the parent's maps read before it are still current after.
    const forkFrom = (parent: number, tid = parent): number => {
      const from = mapsOf(parent);
      const pid = Number(from.keptAcross(() => new RemoteProcess(parent, from.vdso()).call('fork', SYS.fork, [], tid)));
      forked.push(pid); // killed on failure, whatever happens next
      const rep = addon().wait(pid, 10_000);
      if (!rep || rep.kind !== 'stop') throw new AppshotError(`new process ${pid} did not stop`);
      return pid;
    };
    /** Its threads, in the image's order, made once: while the tree is
     * made where one of them forked a child or zombie, else with the rest
     * of the process's state. Every signal of theirs blocked, as the main
     * thread's is (seize). */
    const makeThreads = (m: Made, r: RemoteProcess): void => {
      if (m.tids.length) return;
      m.tids = [m.pid];
      createThreads(r, m.proc.threads.length - 1, m.tids);
    };
    // 0: a session or group outside the application (the terminal's, for
    // an application run in the foreground): a terminal does not travel,
    // and the process stays in init's, as a detached one is.
    const orphanLeader = (id: number) => id > 1 && !vpids.has(id);
    while (queue.length) {
      const m = queue.shift()!;
      const root = !vpids.has(m.proc.vppid);
      if (root && orphanLeader(m.proc.vsid) && m.proc.vsid !== m.proc.vpid) {
        // The seed becomes the session's leader and forks the member.
        let leader = placeholders.get(m.proc.vsid);
        if (leader === undefined) {
          leader = m.pid;
          new RemoteProcess(leader).call('setsid for a session whose leader is gone', SYS.setsid, []);
          placeholders.set(m.proc.vsid, leader);
          addon().bind(tables, 'pid', m.proc.vsid, leader);
        } else {
          endTracee(m.pid);
        }
        m.pid = forkFrom(leader);
      }
      if (orphanLeader(m.proc.vpgid) && m.proc.vpgid !== m.proc.vpid && m.proc.vpgid !== m.proc.vsid && !placeholders.has(m.proc.vpgid)) {
        // A group leader of the same session: forked from the member.
        const leader = forkFrom(m.pid);
        new RemoteProcess(leader).call('setpgid for a group whose leader is gone', SYS.setpgid, [0, 0]);
        placeholders.set(m.proc.vpgid, leader);
        addon().bind(tables, 'pid', m.proc.vpgid, leader);
      }
      made.push(m);
      sysPid.set(m.proc.vpid, m.pid);
      addon().bind(tables, 'pid', m.proc.vpid, m.pid);
      // Made at its first call (none for a process that joins its
      // parent's session and group and forks nothing), its vDSO found from
      // the maps its memory's fill reads too. setsid, setpgid and keyctl
      // change no mapping: the maps read for them are still current after
      // (keptAcross).
      const ownMaps = mapsOf(m.pid);
      let handle: RemoteProcess | undefined;
      const treeRemote = () => (handle ??= new RemoteProcess(m.pid, ownMaps.vdso()));
      const groupOf = (id: number) => sysPid.get(id) ?? placeholders.get(id);
      if (m.proc.vsid === m.proc.vpid) {
        ownMaps.keptAcross(() => treeRemote().call('setsid', SYS.setsid, []));
        takeTerminal(treeRemote(), handed, m.proc);
      }
      else if (m.proc.vpgid === m.proc.vpid) ownMaps.keptAcross(() => treeRemote().call('setpgid', SYS.setpgid, [0, 0]));
      else if (groupOf(m.proc.vpgid) !== undefined) ownMaps.keptAcross(() => treeRemote().call('setpgid', SYS.setpgid, [0, groupOf(m.proc.vpgid)!]));
      // Its own session keyring before its threads are made and its
      // children forked (the keyring is the calling thread's credentials):
      // those that shared it inherit the new one.
      // A root of the tree with none of its own gets a new, empty one too:
      // a seed inherits appshot-init's, the restorer's (review 245: root
      // restoring from a login session handed its keys, and its user
      // keyring, to the restored process). Its children inherit it.
      // Without children or zombies to fork, nothing inherits it before
      // its memory's first stop, where it goes (one stop fewer).
      const children = image.processes.filter((p) => p.vppid === m.proc.vpid);
      const ownRing = joinsSessionKeyring(m.proc, byVpid.get(m.proc.vppid));
      if (ownRing || root) {
        const later = children.length || m.proc.zombies?.length ? undefined : sessionKeyringJoinLater(ownRing, m.proc.creds, { uid: restorer.realUid, gid: process.getgid!() });
        if (later) m.firstCalls = later;
        // keyctl calls only: its credentials, not its mappings.
        else ownMaps.keptAcross(() => joinNewSessionKeyring(treeRemote(), ownRing, m.proc.creds));
      }
      // Children that share pages copy-on-write with it are forked once its
      // memory is filled: they inherit its pages, shared as they were.
      if (children.some(sharesWithParent)) {
        // Its memory as it will be, before a child inherits it: the calls
        // restoreMemory left for the next stop (protections, descriptors
        // closed) run now.
        (await fillMemory(m)).runDeferred();
        handle?.findSyscall(ownMaps.vdso()); // the vDSO has moved to the image's address
      }
      // A child (or zombie) that another of its threads forked is forked
      // from that thread (the kernel's parent of it: its death signal,
      // __WNOTHREAD waits): the threads are made first, with the seed's
      // scratch area for their batch if its memory is not filled yet.
      if ([...children, ...(m.proc.zombies ?? [])].some((c) => forkedByOtherThread(m.proc, c.parentVtid))) {
        let remote = m.remote;
        if (!remote) {
          remote = new RemoteProcess(m.pid);
          if (m.scratch !== undefined) remote.adoptScratch(m.scratch);
        }
        makeThreads(m, remote);
      }
      const madeTids = m.tids.length ? m.tids : [m.pid];
      for (const child of children) {
        if (m.remote) forkedWithMemory.set(child.vpid, { vpid: m.proc.vpid, vmas: m.proc.vmas });
        // Forked with its parent's scratch area (its memory filled, the
        // one it uses now; else the seed's it has still).
        const scratch = m.remote ? (m.remote.batched ? m.remote.scratch : undefined) : m.scratch;
        queue.push({ proc: child, pid: forkFrom(m.pid, forkingTid(m.proc, child.parentVtid, madeTids)), tids: [], scratch });
      }
      if (m.proc.zombies?.length) for (const [vpid, pid] of restoreZombies(treeRemote(), m.proc.zombies, forkFrom, (z) => forkingTid(m.proc, z.parentVtid, madeTids))) addon().bind(tables, 'pid', vpid, pid);
    }
    // The placeholders' work is done: their ids live on in their groups.
    for (const pid of placeholders.values()) endTracee(pid);

    phase('tree made');
    // Unix pairs the kernel says a process of the application made (their
    // SO_PEERCRED pid), made by that process again, its credentials not
    // yet its own (peermaker.ts): from a scratch area of its own where it
    // is a seed still, else from the one it fills its memory with.
    if (unixPairMakers(image).size)
      makeUnixPairsInside(handed, made.map((m) => m.proc), (vpid) => {
        const m = made.find((x) => x.proc.vpid === vpid);
        if (!m) return undefined;
        if (m.remote) return { pid: m.pid, remote: m.remote, done: () => {} };
        const seedMaps = mapsOf(m.pid).get();
        const r = new RemoteProcess(m.pid, seedMaps.find((l) => l.path === '[vdso]'));
        const rings = [...(m.proc.aioRings ?? []).map((a) => ({ start: a.address, end: a.address + a.length })), ...ioUringRanges(m.proc)];
        r.mapScratch(freeAddress([...m.proc.vmas, ...seedMaps, ...rings], BigInt(RemoteProcess.scratchSize)));
        return { pid: m.pid, remote: r, done: () => r.unmapScratch() };
      });
    // System ids of the image's node, made this node's: in calls blocked
    // on them, restarted here, and in the siginfo of pending signals.
    const ids = new IdsAcrossRestore(image, tables);
    // Robust futex words in memory the processes share, rewritten by one
    // process's walk, are compared by the next as the image had them.
    const robustWords = new RobustWordsRewritten();
    for (const m of made) {
      const p = m.proc;
      await heardInterrupt();
      const r = await fillMemory(m);
      // A large copy takes seconds: not to be continued if Ctrl-C came.
      await heardInterrupt();
      // From the signal handlers on, a single-step's trap would reset a
      // SIGTRAP handler the process has, or its ignoring SIGTRAP, to the
      // default (see RemoteProcess.singleStep): harmless only while its
      // own disposition is the default. Until the thread's signals are
      // blocked again below, then, when it is. (Batches end with a SIGTRAP
      // the thread sends itself, not forced, no trap: this is for calls
      // made one at a time.)
      r.singleStep = trapIsDefault(p);
      // The process-wide state, its environment block (naming the
      // application it is now, with a clone's SET ENV values) and the
      // signal handlers: one batch, one stop.
      r.reset();
      const environ = environBlock(r, p, opts.instance?.config.env ?? [], applicationIds(aid, tables), () => mapsOf(m.pid).get());
      const handlers = sigactionCalls(r, p.sigactions);
      phase('environment and handlers worked out');
      const results = restoreProcessState(r, p, handed, handed.workingDirectory(p), [...(environ?.call ? [environ.call] : []), ...handlers]);
      const environStrings = environ?.fill(environ.call ? results[0] : undefined);
      phase('state and signals');
      // The seed's limits, read once for both that need them: the
      // descriptors' placing raises RLIMIT_NOFILE for the while and sets
      // it back to these, and nothing else injected before restoreLimits
      // sets a limit (the process runs nothing of its own).
      const seedLimits = readLimits(m.pid);
      restoreFds(r, p, handed, seedLimits);
      restoreQueueNotifications(r, p, image);
      restoreAioRings(r, p);
      restoreForeground(r, handed, p, (vpgid) => sysPid.get(vpgid) ?? placeholders.get(vpgid));
      restoreLocks(r, p);
      phase('fds');
      // Every signal blocked until the registers are the thread's own;
      // no more traps from here, as the signals it had pending are
      // queued again (requeueSignals) and would be taken by one.
      r.singleStep = false;
      addon().setSigmask(m.pid, ~0n);
      // They inherit the main thread's mask: every signal blocked. Made
      // already where a child was forked by one of them.
      makeThreads(m, r);
      phase('threads made');
      // Each thread's own state in a batch of its own, all the threads'
      // at once (their stops overlapping), but the main thread's: its
      // calls go in one batch with the descriptors' owners, the
      // credentials' first questions, the attributes and the interval
      // timers (one stop where there were three or more).
      // Signals queued again after every thread's state (the order in
      // which the threads' queues are filled is no matter: each is its own).
      const mapsNow = mapsOf(m.pid).get();
      const threadMemory = new ImageMemory(p.vmas, mapsNow);
      p.threads.forEach((t, i) => {
        if (i > 0) addon().bind(tables, 'pid', t.vtid, m.tids[i], THREAD_FLAG, m.pid);
      });
      const others = p.threads.slice(1).map((t, i) => ({ t, tid: m.tids[i + 1] }));
      // The main thread's timer slack (/proc/PID/timerslack_ns), read once,
      // if at all, for its threads' (made with it) and its own: only its
      // own PR_SET_TIMERSLACK, in its batch below, which runs after both
      // have looked, changes it; the other threads' act on themselves.
      let slackRead: { slack: bigint | undefined } | undefined;
      const seedsSlack = () => (slackRead ??= { slack: seedSlack(m.pid) }).slack;
      for (const note of restoreThreadStates(r, others, p.glibcTidOffset, threadMemory, p.personality, seedsSlack)) notKept.push(`process ${p.vpid}: ${note}`);
      phase("threads' own state");
      p.threads.forEach((t, i) => requeueSignals(r, retargetSiginfos(t.pending, (old) => ids.now('pid', old)), m.tids[i]));
      requeueSignals(r, retargetSiginfos(p.sharedPending, (old) => ids.now('pid', old)), 0);
      // Its SEM_UNDO adjustments, its threads made (they share them).
      restoreSemUndo(r, p, image, tables);
      r.reset();
      const mainCalls = r.batch();
      // From here on, batches run from the preload library's copy of the
      // batch code (the process's memory is in place), and this one
      // unmaps the scratch area: no stop of its own for that.
      const resident = residentBatchOf(m.pid, mapsNow);
      if (resident) r.moveToResident(resident, mapsNow, mainCalls);
      // /proc/PID/environ moved to the environment's new strings.
      if (environStrings) {
        const c = moveEnvironCall(r, p, environStrings);
        mainCalls.add(c.what, c.nr, c.args);
      }
      const mainNote = restoreThreadState(r, p.threads[0], m.pid, p.glibcTidOffset, threadMemory, mainCalls);
      if (mainNote) notKept.push(`process ${p.vpid}: ${mainNote}`);
      // With the cached TIDs: the loader's locks a thread held, and the
      // robust mutexes in the threads' robust lists.
      restoreLoaderLockOwners(m.pid, p, m.tids);
      // Mutexes that are not robust: mended by the preload library where
      // the program next uses them, from the moves written here.
      // The maps read above serve them: nothing since has mapped or
      // unmapped anything (the main thread's batch has not run).
      for (const note of restoreTidMoves(m.pid, p, m.tids, mapsNow)) notKept.push(`process ${p.vpid}: ${note}`);
      // A SIGCHLD of a child reaped before the snapshot, queued again
      // with si_pid 0: named by the library from the pairs it kept.
      const lateChild = lateSigchldChild([p.sharedPending, ...p.threads.map((t) => t.pending)], (old) => ids.now('pid', old));
      if (lateChild !== undefined) restoreLateSigchld(m.pid, mapsNow, lateChild, p.pid);
      forgetTimedWaits(m.pid, p, () => mapsNow);
      const cpuNote = restoreCpuTimes(m.pid, p, m.tids, mapsNow);
      if (cpuNote) notKept.push(`process ${p.vpid}: ${cpuNote}`);
      // The maps read above if no call has run since (LiveMaps: the other
      // threads' batches and signals queued again may have run some).
      for (const note of restoreRobustMutexOwners(m.pid, p, m.tids, robustWords, () => mapsOf(m.pid).get())) notKept.push(`process ${p.vpid}: ${note}`);
      restorePiWaitWords(m.pid, p, m.tids, () => mapsOf(m.pid).get());
      restoreFdOwners(r, p, handed, mainCalls);
      const seedCreds = askSeedCreds(mainCalls);
      restoreItimers(r, p.itimers, mainCalls);
      for (const note of restoreAttributes(r, p, m.tids, mainCalls, seedsSlack)) notKept.push(`process ${p.vpid}: ${note}`);
      phase('main thread\'s batch');
      restorePosixTimers(r, p.posixTimers, (vtid) => m.tids[p.threads.findIndex((t) => t.vtid === vtid)], (vpid) => sysPid.get(vpid));
      restoreRoot(r, p, handed);
      sealMemory(r, p.vmas);
      // Its session keyring's keys, owners and permissions while appshot
      // may still give them away (KEYCTL_CHOWN).
      if (p.sessionKeyring && joinsSessionKeyring(p, byVpid.get(p.vppid))) fillSessionKeyring(r, p.sessionKeyring, restorer);
      // Limits late, so that a low RLIMIT_NOFILE, NPROC or SIGPENDING
      // does not stop the restore's own descriptors, threads and signals,
      // but before the credentials, which may give up the capability that
      // raising one needs.
      credentialCalls += restoreLimits(r, p.rlimits, seedLimits);
      // Seccomp programs written while the process is surely ours to write.
      const seccomp = prepareSeccomp(p, m.tids, inheritedFilters);
      // Credentials last: after them the process may not be ours to change.
      credentialCalls += restoreCreds(r, p, m.tids, seedCreds());
      restoreParentDeathSignals(r, p, m.tids);
      phase('limits and credentials');
      // Unmapped by the main thread's batch if that ran from the preload
      // library's batch code; else now, not in a batch: the batch code is
      // in the scratch area. Nor single-stepped: the thread would be left
      // in the step's SIGTRAP stop, and a tracer that dies after the
      // commit lets it go with that signal, which kills the application.
      r.unmapScratch();
      phase('scratch unmapped');
      credentialCalls += restoreSeccomp(r, seccomp);
      p.threads.forEach((t, i) => {
        addon().setSigmask(m.tids[i], t.sigmask);
        addon().setRegs(m.tids[i], resumeRegisters(retargetBlockedCall(t.regs, ids), firstHandledSignal(t, p.sharedPending, p.sigactions), false, p.groupStopped));
      });
    }
    // Every process has attached its SysV segments and made its SEM_UNDO
    // operations: the objects' PIDs shown as the image recorded them.
    settleSysvPids(image, shmIds, tables, handed.notKept);
    // Those the image had removed while attached are removed again (they
    // go at their last detach, as they would have).
    removeDestroyedShm(image, shmIds);
    // Every process has mapped the files opened here for it (openToMap):
    // not held while the restore may wait (a held instance: serve's
    // prepared one, the engine's pool of clones), which would take
    // descriptors from the restorer's limit and keep replaced files on
    // disk.
    handed.release(mapOpened.values());
    mapOpened.clear();
    // Every descriptor of every pty the processes hold is open: exclusive
    // mode now, which refuses further opens of a slave (ptys.ts).
    restoreExclusiveModes(handed);
    // Every process as it will run: descriptors reading a /proc text of
    // one (a listing of its mappings, its status, timers...) are put at
    // their place in it (listings.ts, proctext.ts).
    handed.processesAreFinal();
    // Every chunk of every page file checked (a --lazy restore maps them
    // unread; an eager one has copied only checked chunks, the rest are
    // checked all the same), before anything of the image may run.
    for (const c of pageChecks) if (c) await awaitPagesCheck(c.check, c.chunkSize, undefined, opts.signal).catch((e) => {
      throw opts.signal?.aborted ? new AppshotError(RESTORE_INTERRUPTED, ExitCode.interrupted) : e;
    });
    if (pageChecks.some((c) => c)) killPoint('image: pages checked');
    phase('page data checked');
    // The last point where an interrupted restore is given up: after it,
    // connections go live and the commit keeps the application.
    await heardInterrupt();
    if (opts.hold) {
      // What the commit waits for (the commit file made ahead, init
      // running as this application's), waited for now: the release does
      // not, with a client waiting.
      if (!opts.batchCommit) await reg.commitReady(commitPath);
      supervisor.confirm();
      // Held (serve's prepared resume): every process made and stopped,
      // nothing of it live, nothing committed; what is left is ~0.5 ms.
      phase('held');
      const heldAt = now();
      const go = await opts.hold(made.map((m) => ({ pid: m.pid, vpid: m.proc.vpid })));
      heldMs = now() - heldAt;
      if (!go) throw new AppshotError(RESTORE_INTERRUPTED, ExitCode.interrupted);
    }
    handed.tcp.release();
    handed.listenHeld();
    handed.close();
    phase('threads');

    // The commit. Every process is made: they no longer die with us, and
    // once the commit file exists init keeps them if we die; before it,
    // init kills them. (Killed between the two, they may run for the
    // moment init takes to hear of it.) A batch of clones commits all its
    // instances at once, after the last.
    // Its init runs as this application's (a standby has taken its
    // arguments meanwhile) before anything of it may run.
    if (!opts.hold) {
      if (!opts.batchCommit) await reg.commitReady(commitPath);
      supervisor.confirm();
    }
    addon().keepOnExitAll(made.flatMap((m) => m.tids));
    const result = (): RestoreResult => ({
      aid,
      image: imagePath,
      processes: made.length,
      threads: made.reduce((n, m) => n + m.tids.length, 0),
      initPid: record!.initPid!,
      restoreMs: now() - verified - heldMs,
      verifyMs: verified - started,
      pagesChecked: chain.some((l) => !l.pagesAsWritten),
      lazy: opts.lazy,
      createdDirs: madeDirs,
      ...(opts.batchCommit ? { lifeline } : {}),
      credentialCalls,
      seeds: roots.length,
      fromStandby: fromStandby && record!.initPid === reserved!.init.pid,
      injectedCalls: injected.calls - injectedBefore,
      notKept: [...(handover?.notKept ?? []), ...notKept],
    });
    if (!opts.batchCommit) {
      // Its age (what the sweep goes by) set once the processes go.
      reg.commit(commitPath, { ageLater: true });
      committedResult = result;
      // Committed: the keeper lets its copies of the connections go.
      handed.kept.finish();
      phase('committed');
      opts.committed?.(record);
    }
    // Synchronized resume (steps 330–332): nothing of the restore remains
    // in the processes; all go at once.
    // Stopped by job control when it was taken: stopped again by the same
    // signal (jobcontrol.ts).
    for (const m of releaseRestored(made))
      process.stderr.write(`appshot: process ${m.proc.vpid} (${m.proc.comm}) could not be stopped by signal ${m.proc.stopSignal} again (its process group is orphaned here): stopped by SIGSTOP\n`);
    if (!opts.batchCommit) {
      reg.ageCommit(commitPath);
      closeSync(lifeline);
      lifeline = -1;
    }
    phase('resumed');
    return result();
  } catch (e) {
    if (process.env.APPSHOT_DEBUG) process.stderr.write(`${(e as Error).stack}\n`);
    // Committed, then a step failed (letting the processes go, the
    // progress output, the caller's `committed` hook): the application is
    // not killed. From the commit on it exists: its registration says so,
    // init keeps its processes, and appshot killed there leaves it running
    // whole (atomic.test.ts). Killing it now would not undo the commit:
    // the snapshot record and log it took over (adoptCarriedLog) are its
    // own once committed, and went with it, under "nothing was left
    // behind" (`ps -a` then listed nothing of the snapshotted application)
    // - a worse state than the one a kill -9 of appshot leaves. So it is
    // left running and registered, whatever of it is still ours let go,
    // and the failure said apart (ExitCode.afterCommit).
    if (committedResult) {
      releaseWhatIsLeft(made);
      try {
        handover?.kept.finish();
      } catch {
        /* the keeper's copies go when its hold ends */
      }
      try {
        if (lifeline >= 0) closeSync(lifeline);
      } catch {
        /* closed already */
      }
      lifeline = -1;
      const restored = committedResult();
      throw new RestoredWithError(
        `restored ${imagePath} as '${restored.aid}', which runs and is registered, but a step after its commit failed: ${(e as Error).message}`,
        restored,
      );
    }
    handover?.close();
    handover?.undo();
    // Removed already: the registration no longer names them, so that its
    // release cannot remove a queue of that name made since (by another
    // restore of the image).
    if (record?.restore?.madeQueues?.length) {
      record.restore.madeQueues = [];
      try {
        reg.update(record);
      } catch {
        /* its directory is gone: nothing to release either */
      }
    }
    handover?.kept.abandon();
    for (const m of made) try {
      process.kill(m.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    for (const pid of [...seeds, ...forked]) try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    supervisor?.close();
    if (standby) {
      standby.reports.forget();
      letGo(standby.init);
    }
    if (lifeline >= 0) closeSync(lifeline);
    if (record) await waitGone(reg, record, [...made.flatMap((m) => [m.pid, ...m.tids]), ...seeds, ...forked, ...preSeized]);
    else
      // A standby's seeds, seized before there was a record: killed by
      // the standby let go, but we trace them, so only our wait lets them
      // go (else each failed restore left a zombie for the engine's life).
      for (const pid of preSeized) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
        addon().wait(pid, 1000);
      }
    for (const port of claimed) reg.releasePort(port, opts.aid ?? image.aid);
    if (!opts.batchCommit) await reg.forgetCommit(commitPath);
    reg.releaseRedirTargets(madeDirs, [opts.aid ?? image.aid]);
    if (e instanceof AppshotError && e.message === RESTORE_INTERRUPTED) throw e;
    const what = opts.instance ? `cannot clone ${imagePath} as '${opts.aid}'` : `cannot restore ${imagePath}`;
    if (e instanceof AppshotError) throw new AppshotError(`${what}: ${e.message}`, e.exitCode);
    throw new AppshotError(`${what}: ${errorText(e)}; nothing was left behind`);
  } finally {
    closeCgroupJoins(cgroupJoins);
    for (const fd of verifiedOpens.values()) closeSync(fd);
    for (const [i, fd] of pageFds.entries()) if (ownPageFd(i)) closeSync(fd);
    if (!opts.loaded && !preloaded) for (const l of chain) l.dispose();
    if (standbyCount !== undefined) refillAfterRestore(standbyCount);
  }
}

/** Kills a process this restore traces and takes its exit report, ours
 * as its tracer: only then is its parent (init) told that it exited, and
 * reaps it. A CLI's exit lets its tracees go anyway; the engine lives on,
 * and a placeholder killed and not waited for stayed a zombie for the
 * engine's life, its application never ending (stop gave up after 30 s). */
function endTracee(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return; // gone
  }
  // A report taken before (a stop) may come first; SIGKILL's is the exit.
  for (let i = 0; i < 10; i++) {
    const r = addon().wait(pid, 1000);
    if (!r || r.kind === 'exited') return;
  }
}

/** After a failure: init sees its last process go and removes the tables,
 * SysV objects and registration; if init never started, do it here. */
async function waitGone(reg: LocalRegistry, record: AppRecord, tracees: number[]): Promise<void> {
  const ours = [...new Set(tracees)];
  for (let i = 0; i < 200; i++) {
    // Reap our tracees' exit reports (only theirs: in the engine, other
    // children are Node's).
    for (let r = addon().waitAny(ours, 0); r; r = addon().waitAny(ours, 0)) letGoIfUnsettled(r);
    const r = reg.get(record.aid);
    if (!r) return;
    let stale = false;
    try {
      stale = !r.initPid || reg.isStale(r);
    } catch {
      // The look at the processes failed: not released on it, and the
      // restore's own error, not this one, is what its caller says
      // (review r435 N5); looked at again, as the tracees must still be
      // reaped here (review r438 F5).
    }
    if (stale) {
      reg.release(r);
      return;
    }
    await sleep(25);
  }
}
