/**
 * The snapshot driver (FIG. 5): quiesce every thread of the application,
 * dump each resource kind through its module, write the image atomically,
 * then end the application (default) or let it go on (--leave-running).
 *
 * Nothing half-done: until the image is renamed into place there is no
 * image, and a failure before the application is released to its image
 * (markReleased, the point of no return of a snapshot that ends it)
 * resumes every thread where it was and removes the image. One after it
 * ends the application all the same: the image is the application then
 * (SnapshottedWithError, exit 6). appshot killed in between is settled by
 * the next command (ending.ts).
 */
import { uniqueTag } from '../holder.js';
import { closeSync, constants as fsConstants, existsSync, fstatSync, lstatSync, openSync, readFileSync, readlinkSync, renameSync, rmSync, statfsSync, statSync, type Stats } from 'node:fs';
import { hostname, release, tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppshotError, errorText, ExitCode, printable } from '../errors.js';
import { classify } from '../template/classify.js';
import { parseRules } from '../template/rules.js';
import { commitImageDir, commitImageFile, imageFileKind, type LoadedImage, loadImage, newImageId, parentChainFault, parentPath, PARTS, streamImageTar, syncDir } from '../image/format.js';
import { recordWritten, writtenIdentity } from '../image/written.js';
import { makePartialDir, type PartialDir } from '../image/partial.js';
import { refuseUnsafeDirectory } from '../home.js';
import { keyringTreeFault } from '../resources/keyrings.js';
import { fitInotifyNumbers } from '../resources/inotify.js';
import { EndingJournal } from './ending.js';
import { killPoint } from '../killpoint.js';
import { type Image, type Process, VmaKind } from '../image/types.js';
import { addon, ENTRY_FLAGS, kinds, type PageFileDigest, type PageWriter } from '../native.js';
import { type ByteProgress, noProgress } from '../progress.js';
import { descriptorWriter, standardOutput } from '../stdout.js';
import { type AppRecord, type LocalRegistry } from '../registry.js';
import { askAttributes, dumpAttributes, dumpLockFuture } from '../resources/attributes.js';
import { dumpCgroup } from '../resources/cgroups.js';
import { dumpWaits } from '../resources/waits.js';
import { dumpFds, type FdEntry, markSharedDescriptions, type SeenBeforeCalls } from '../resources/files.js';
import { listingsBeforeCalls } from '../resources/listings.js';
import { askFdOwners, checkDnotify, dumpFdOwners } from '../resources/fdowner.js';
import { dumpTidMoves } from '../resources/mutexes.js';
import { askMappingPolicies, countPages, dumpMemory, mapSharedObjectPages, type MapsLine, noteMappingPolicies, readMaps, readSmaps } from '../resources/memory.js';
import { dumpCreds, exemptFromSeccomp, refuseLandlocked } from '../resources/creds.js';
import { refuseOwnThreadTables, refuseSharedTables } from '../resources/fdtable.js';
import { checkOneTimeNamespace } from '../resources/timens.js';
import { askProcess, dumpForkingThreads, dumpProcess, noteForkingThreads, refuseChrootedSocketPaths } from '../resources/process.js';
import { askSigactions, dumpSharedPending, dumpSigactions } from '../resources/signals.js';
import { checkUnixPeers, forgetClosedSockets, offerListeners, SocketTable } from '../resources/sockets.js';
import { dumpPtys } from '../resources/ptys.js';
import { askContinuedReports, askStopReports, continuedReports, dumpJobControl, stopReportsTaken } from '../resources/jobcontrol.js';
import { dumpLocks } from '../resources/locks.js';
import { dumpSemUndo, dumpSysv } from '../resources/sysv.js';
import { askPosixTimers, dumpPosixTimers } from '../resources/timers.js';
import { dumpZombies } from '../resources/zombies.js';
import { dumpAioRings } from '../resources/aio.js';
import { askReadyLists, markPending, putBackReadyLists, setsWatchedByEdges } from '../resources/epoll.js';
import type { HeldConnections } from '../resources/tcp.js';
import { injected, RemoteProcess } from '../ptrace/remote.js';
import { CallQueue } from '../ptrace/queries.js';
import { DEFAULT_HOLD_SECONDS, dropKept, keeperPathFits, type SocketsForKeeper } from '../resources/keeper.js';
import { dumpCpuTimes, readKernelCpu } from '../resources/cputime.js';
import { askThread, disarmRobustLists, dumpThread, findGlibcTidOffset, firstHandledSignal, resumeRegisters, settleCaughtSignal, timeLeftOfWaits } from '../resources/threads.js';
import { DumpContext, type InheritedListener, nameProcess, Transient, Unsupported } from '../resources/context.js';
import { Freezer, type FrozenThread } from '../ptrace/freezer.js';
import { Injector } from '../ptrace/inject.js';
import { ParentResolver } from './parent.js';
import { residentBatchOf } from '../ptrace/windows.js';
import { childrenOf, forgetGathered, gatherProc, gatheredAfterCalls, gatheredBeforeCalls, type ProcKind, readStat } from '../procfs.js';
import { PhaseClock, type SnapshotPhases } from './phases.js';
import { armingAnswered, type ArmingAsked, armTracking, askArming, plannedTrackingFd, processKey, protectTracked } from './tracking.js';
import { estimateFrozenBytes, estimateImageBytes, ReportingPageWriter } from './progress.js';
import { reportProfile, timed, windowOpens } from './profile.js';
import { CowCapture, type CowCaptureReport, cowCaptureWanted } from './cowcapture.js';

const { init: INIT_FLAG, thread: THREAD_FLAG } = ENTRY_FLAGS;

export interface SnapshotOptions {
  /** A directory to create, or '-' for a tar stream on stdout. */
  output: string;
  leaveRunning: boolean;
  /** With leaveRunning: false reads every process's memory while it is
   * frozen, never from a copy-on-write copy (cowcapture.ts); also
   * APPSHOT_COW_CAPTURE=0. */
  cowCapture?: boolean;
  timeoutMs: number;
  /** Do not build on the application's previous image. */
  full: boolean;
  /** Copy memory while the application runs first; freeze it only for
   * the pages written meanwhile. */
  preCopy?: boolean;
  /** Record established TCP connections as closed instead of keeping them
   * (resources/tcp.ts): for want of CAP_NET_ADMIN, or on purpose. */
  tcpClose?: boolean;
  /** How long an appshot-keeper holds the connections of the ended
   * application for its restore (tcp.ts); 0: not at all. */
  tcpHoldSeconds?: number;
  /** Told the bytes written to the image as they are (see progress.ts). */
  progress?: ByteProgress;
  /** Aborted (Ctrl-C, SIGTERM): the snapshot is given up at the next
   * point where that is safe, the application left running as it was and
   * nothing written, unless the image is already being committed. */
  signal?: AbortSignal;
  /** Sockets of the application that are the caller's, by inode: recorded
   * by key, not dumped (`appshot serve`'s public listener, installed in
   * the instance; resources/sockets.ts). */
  inherited?: ReadonlyMap<bigint, InheritedListener>;
  /** Told each time a snapshot refused for a moment's state (Transient)
   * is about to be tried again, after `pauseMs`. */
  onRetry?: (reason: string, pauseMs: number) => void;
}

/** A snapshot that ended its application, then failed at a step after
 * its point of no return (markReleased): the image is complete and is the
 * application now, which was ended (see the snapshot's catch); its record
 * is `snapshotted` in ps({ all: true }). The API's snapshot() rejects
 * with it as it is (exitCode 6). */
export class SnapshottedWithError extends AppshotError {
  constructor(
    message: string,
    /** Where the image is, as `output` was given resolved ('-': it went
     * to standard output). */
    readonly image: string,
    readonly imageId: string,
    /** The image it is incremental on, as SnapshotResult.parent. */
    readonly parent?: string,
  ) {
    super(message, ExitCode.afterCommit);
  }
}

/** The one line an interrupted snapshot ends with. */
export const SNAPSHOT_INTERRUPTED = 'interrupted: the application was left running, nothing written';

class Interrupted extends Error {}

export interface SnapshotResult {
  aid: string;
  image: string;
  imageId: string;
  parent?: string;
  processes: number;
  threads: number;
  pages: number;
  pagesFromParent: number;
  bytes: number;
  /** How long the application stood still while its state was read
   * (phases.ts: with --leave-running, until it went on; without, it is
   * then kept stopped until its image is on disk: phases.heldMs). */
  frozenMs: number;
  phases: SnapshotPhases;
  /** --pre-copy: the application was also frozen this long at the start,
   * while dirty tracking was set up. */
  preCopyFrozenMs?: number;
  totalMs: number;
  leftRunning: boolean;
  /** --leave-running: which processes' memory was read from copy-on-write
   * copies, and why the others' was read frozen (cowcapture.ts). */
  cowCapture?: CowCaptureReport;
  /** System calls injected into the application (each a ptrace round
   * trip while it is frozen). */
  injectedCalls: number;
  /** Connections appshot-keeper holds for a restore on this host, for
   * holdSeconds; `needed`: those the image cannot restore without it;
   * `waiting`: those not yet accepted, in the listeners it holds. */
  keptConnections?: { held: number; needed: number; waiting: number; holdSeconds: number };
  /** Attempts refused for a moment's state before this one (Transient). */
  retries?: number;
  /** What went wrong after the image was committed without undoing it
   * (the CLI says each as `appshot: warning: ...`): a registration that
   * could not record a --leave-running image, and what that costs. */
  warnings?: string[];
}

/** A snapshot refused for a moment's state (a Transient resource), which
 * left the application running as it was: worth another try. */
class MomentRefused extends AppshotError {}

/** The pauses before each new try of a snapshot refused for a moment's
 * state: a message the program has not read yet, a connection changing
 * state. A second or two in all: a program reads what it asked for
 * within that, or it is not a moment's state. */
const MOMENT_PAUSES_MS = [50, 250, 1000];

export async function snapshot(reg: LocalRegistry, aid: string, opts: SnapshotOptions): Promise<SnapshotResult> {
  for (let retries = 0; ; retries++) {
    try {
      const result = await snapshotOnce(reg, aid, opts);
      return retries ? { ...result, retries } : result;
    } catch (e) {
      if (!(e instanceof MomentRefused) || opts.signal?.aborted) throw e;
      const pause = MOMENT_PAUSES_MS[retries];
      if (pause === undefined) throw new AppshotError(`${e.message} (tried ${retries + 1} times, over ${MOMENT_PAUSES_MS.reduce((a, b) => a + b, 0) / 1000} s)`, e.exitCode);
      opts.onRetry?.(e.message, pause);
      try {
        await sleep(pause, undefined, opts.signal ? { signal: opts.signal } : undefined);
      } catch {
        // Interrupted while waiting to try again: the refusal stands.
        throw e;
      }
    }
  }
}

const now = () => Number(process.hrtime.bigint() / 1000n);

function nodeInfo(): Image['node'] {
  let vdso = 0n;
  let vvar = 0n;
  for (const l of readMaps(process.pid)) {
    if (l.path === '[vdso]') vdso += l.end - l.start;
    if (l.path === '[vvar]' || l.path === '[vvar_vclock]') vvar += l.end - l.start;
  }
  return { hostname: hostname(), arch: process.arch === 'x64' ? 'x86_64' : process.arch, kernel: release(), vdsoSize: vdso, vvarSize: vvar, pageSize: 4096, xstateSize: 0 };
}

/** The chain of images the next snapshot builds on, newest first, or
 * undefined (with the reason on stderr) if it cannot. */
async function parentChain(record: AppRecord): Promise<ParentResolver | undefined> {
  if (!record.lastImage) return undefined;
  const chain: LoadedImage[] = [];
  let path: string | undefined = record.lastImage.path;
  let expected = record.lastImage.id;
  // A chain that loops, or one as long as a restore follows (the new
  // image adds a link), is not built on: the snapshot is full.
  const seen = new Set<string>();
  try {
    while (path) {
      const fault = parentChainFault(seen, path, expected, chain.length + 1);
      if (fault) throw new Error(fault.replace(/^corrupt image: /, ''));
      const loaded = await loadImage(path, { asParent: true, holdPages: true });
      chain.push(loaded);
      if (loaded.manifest.imageId !== expected) throw new Error(`${path} is not the image it was`);
      path = loaded.image.parent ? parentPath(loaded.dir, loaded.image.parent.path) : undefined;
      expected = loaded.image.parent?.imageId ?? '';
    }
    const resolver = new ParentResolver(chain);
    killPoint('snapshot: parent chain loaded');
    return resolver;
  } catch (e) {
    for (const l of chain) l.dispose();
    process.stderr.write(`appshot: taking a full snapshot: the previous image cannot be used (${(e as Error).message})\n`);
    return undefined;
  }
}

function emptyImage(record: AppRecord): Image {
  return {
    aid: record.aid,
    created: new Date().toISOString(),
    node: nodeInfo(),
    processes: [],
    sharedMemory: [],
    semaphores: [],
    shmSegments: [],
    msgQueues: [],
    tables: [],
    pipes: [],
    files: [],
    stats: { frozenUs: 0n, pages: 0n, pagesFromParent: 0n, dumpUs: 0n },
    command: record.command,
    logPath: record.logPath ?? '',
    tablesPath: record.tables,
    rules: record.rules,
    verdicts: [],
  };
}

/**
 * Where batches of questions run in `pid`, recorded in `areas`: the batch
 * code and area the preload library has in every process of the
 * application (no stop), else a scratch area mapped for them (one
 * injected call, and one more to unmap it when the window ends);
 * undefined where batches cannot be had (then each question is a call of
 * its own). `maps`: the process's mappings, read while frozen.
 */
function openBatchArea(pid: number, vdso: { start: bigint; end: bigint }, maps: MapsLine[], areas: Map<number, RemoteProcess>): RemoteProcess | undefined {
  const remote = new RemoteProcess(pid, vdso);
  const resident = residentBatchOf(pid, maps);
  if (!(resident && remote.adoptResident(resident, maps)) && !remote.mapBatchScratch()) return undefined;
  areas.set(pid, remote);
  return remote;
}

/** Unmaps every batch scratch area (the processes are still stopped). A
 * process that is gone has none left to unmap. */
function closeBatchAreas(areas: Map<number, RemoteProcess>): void {
  for (const remote of areas.values()) {
    try {
      remote.unmapScratch();
    } catch {
      /* the process is gone */
    }
  }
  areas.clear();
}

/**
 * Dirty tracking armed in each process as it is dumped (a snapshot that
 * becomes the next one's parent): its calls go with the process's
 * questions, in the same stop, where they took one of their own after
 * the dump (armAll: 0.3-1 ms of a tiny application's --leave-running
 * window, 2 -> 1 injected calls); its pages are protected once its
 * memory is read. recordArming writes the registry after, if need be.
 */
interface ArmingInDump {
  /** Where prepareTracking planned each process's userfaultfd. */
  planned: Record<string, number>;
  /** Each process's key (processKey) by system PID, as prepareTracking
   * read it before the freeze: one that exited since and whose PID was
   * taken again is named by a key that names no process, whose tracking
   * the next snapshot does not trust (it compares). A process not listed
   * (forked since) is read in the window. */
  keys: Map<number, string>;
  strays: number[];
  /** Each process tracked: its key and userfaultfd. */
  tracking: Record<string, number>;
  /** Writes `tracking` into the registry now (recordTracking). */
  record: () => void;
}

/** One process of dumpAll, all its threads stopped; pushed to the image,
 * `systemPids` and `dumped`. Its /proc is gathered (procfs.ts) in two
 * reads: before any call is injected, and once its questions are answered;
 * the caller forgets both when it is done. */
function dumpProcessFrozen(ctx: DumpContext, pid: number, threads: FrozenThread[], what: string, inImage: Set<number>, batchAreas: Map<number, RemoteProcess>, systemPids: Map<number, number>, dumped: Map<number, MapsLine[]>, seen: SeenBeforeCalls, children: { stopped: number[]; running: number[] }, arming?: ArmingInDump): void {
  // Registers first: running system calls in the process (below) leaves
  // an interrupted call rewound, and the image keeps it as it was.
  const regs = timed('registers', () => new Map(threads.map((t) => [t.tid, addon().getRegs(t.tid)])));
  const tids = threads.map((t) => t.tid);
  // Its limits, where its userfaultfd is made below (askArming: the number
  // it gets is under the soft RLIMIT_NOFILE), with what is read before
  // the calls, and not again with what is read after (gatheredAfterCalls):
  // one read for that and the image, as no question sets a limit.
  const limitsEarly: [ProcKind, string][] = arming ? [['text', `/proc/${pid}/limits`]] : [];
  timed('gather (before calls)', () => gatherProc([...gatheredBeforeCalls(pid, tids), ...limitsEarly]));
  // Read once: the vDSO for the injector, the shared objects and the
  // memory dump below (the calls injected meanwhile map nothing).
  const maps = timed('smaps', () => readSmaps(pid));
  timed('time left of waits', () => timeLeftOfWaits(pid, maps, regs, ctx.freezeBegan));
  // Before any call is injected: those are the snapshot's CPU time, not
  // the application's.
  const kernelCpu = timed('cpu times', () => readKernelCpu(pid, tids, maps));
  const vdso = maps.find((l) => l.path === '[vdso]');
  let inj: Injector;
  /** The process's questions: what they mapped is unmapped on failure. */
  let queue: CallQueue | undefined;
  try {
    inj = timed('injector open', () => Injector.open(pid, pid, vdso));
  } catch (e) {
    throw new Unsupported(`${what}: ${(e as Error).message}`);
  }
  try {
    // Every question for the process is asked first and answered in one
    // stop per thread, from a scratch mapping made on the first answer
    // (batchAreas: unmapped when the frozen window ends).
    const calls = (queue = new CallQueue(inj, () => timed('batch scratch', () => openBatchArea(pid, vdso!, maps, batchAreas))));
    // Credentials before any call is injected: a thread under seccomp is
    // exempted from its filters first.
    const credsAsked = timed('creds', () => dumpCreds(pid, tids, calls, what));
    const asked = timed('questions asked', () => ({
      process: askProcess(calls, tids),
      threads: threads.map((t) => askThread(calls, t)),
      timers: askPosixTimers(pid, calls, what),
      attributes: askAttributes(calls, tids),
      sigactions: askSigactions(pid, calls),
      fdOwners: askFdOwners(calls, pid),
      readyLists: askReadyLists(calls, pid, seen.entries ?? addon().fdEntries(pid), seen.epollsWatched?.get(pid)),
      mappingPolicies: askMappingPolicies(calls, pid, maps),
      stopReports: askStopReports(calls, children.stopped),
      continuedReports: askContinuedReports(calls, children.running),
    }));
    // Last of the questions: its userfaultfd, made in this stop, is at a
    // high number no question uses. The batch scratch area, mapped on the
    // first answer if it is, is not in `maps` (read before), so nothing
    // leaves it out of what is registered.
    const key = arming ? (arming.keys.get(pid) ?? timed('track: key', () => processKey(pid))) : '';
    const armingAsked: ArmingAsked | undefined = arming && timed('track: asked', () => askArming(calls, pid, arming.planned[key], arming.strays, maps));
    timed('questions answered', () => {
      try {
        calls.run();
        // Where a test kills appshot once a caught real-time signal with
        // more of it waiting behind was queued again: it must find them
        // in the order sent, none lost.
        if (asked.threads.some((a) => a.behind)) killPoint('snapshot: real-time signal queued again');
      } finally {
        threads.forEach((t, i) => settleCaughtSignal(t, asked.threads[i]));
        // At once: the waits took edges the application has not seen.
        putBackReadyLists(calls, asked.readyLists, what);
      }
    });
    let trackingFd: number | undefined;
    if (armingAsked) {
      trackingFd = timed('track: answered', () => armingAnswered(calls, armingAsked));
      // Images leave it out from now on, whatever number it got (the one
      // planned, unless that was taken meanwhile): its descriptors are
      // dumped below.
      const made = trackingFd ?? (armingAsked.moved && armingAsked.moved.ret >= 0n ? Number(armingAsked.moved.ret) : undefined);
      if (made !== undefined && !ctx.trackingFds.includes(made)) ctx.trackingFds.push(made);
      if (trackingFd !== undefined) arming!.tracking[key] = trackingFd;
      // Not where planned (the number was taken since prepareTracking):
      // recorded at once, not after the whole dump, so that appshot killed
      // meanwhile leaves no userfaultfd at a number the registry does not
      // know, which every later snapshot of the process would refuse
      // (review24). The rare case only: the write is the window's dearest.
      if (trackingFd !== undefined && trackingFd !== arming!.planned[key]) arming!.record();
    }
    timed('gather (after calls)', () => gatherProc(gatheredAfterCalls(pid, tids).filter(([kind, path]) => !limitsEarly.some(([k, p]) => k === kind && p === path))));
    const creds = credsAsked();
    const proc: Process = timed('process', () => dumpProcess(ctx, pid, asked.process, threads.some((t) => t.groupStop), creds));
    const taken = stopReportsTaken(asked.stopReports, (child) => ctx.virtual('pid', child));
    if (taken.length) proc.stopReportsTaken = taken;
    const continued = continuedReports(asked.continuedReports, (child) => ctx.virtual('pid', child));
    if (continued.length) proc.continuedReports = continued;
    proc.threads = timed('threads', () => threads.map((t, i) => ({ ...dumpThread(ctx, t, regs.get(t.tid)!, asked.threads[i]), creds: creds.threads[i] })));
    dumpCpuTimes(pid, maps, kernelCpu, proc);
    proc.posixTimers = timed('timers', () => dumpPosixTimers(asked.timers, proc.threads, (spid) => (inImage.has(spid) ? ctx.virtual('pid', spid) || undefined : undefined), what));
    timed('attributes', () => {
      dumpAttributes(proc, pid, asked.attributes, calls, what);
      dumpLockFuture(proc, asked.attributes, what);
    });
    timed('cgroups', () => dumpCgroup(proc, pid, what));
    proc.glibcTidOffset = timed('glibc tid offset', () => findGlibcTidOffset(pid, threads.map((t) => ({ tid: t.tid, regs: regs.get(t.tid)! }))));
    timed('tid moves', () => dumpTidMoves(pid, maps, proc));
    timed('sem undo', () => dumpSemUndo(ctx, pid, maps, proc, what));
    proc.sigactions = timed('sigactions', () => dumpSigactions(asked.sigactions));
    proc.sharedPending = timed('shared pending', () => dumpSharedPending(pid));
    proc.zombies = timed('zombies', () => dumpZombies(ctx, pid, proc.threads));
    timed('children by thread', () => noteForkingThreads(ctx, proc));
    timed('job control', () => dumpJobControl(proc, threads.find((t) => t.groupStop)?.stopSignal, what));
    // With --leave-running, each thread goes on from here as the kernel
    // would have taken it on: a pending signal's handler may make an
    // interrupted call fail with EINTR rather than restart.
    threads.forEach((t, i) => {
      const th = proc.threads[i];
      t.resumeRegs = resumeRegisters(th.regs, firstHandledSignal(th, proc.sharedPending, proc.sigactions), true, proc.groupStopped);
    });
    proc.fds = timed('files', () => {
      const sockets = new SocketTable(pid);
      try {
        // Descriptors and listings of mappings as read before any call
        // was injected; a process's mappings as it had them then, for a
        // listing opened since.
        return dumpFds(ctx, pid, what, sockets, {
          ...seen,
          frozenMappings: (listed) => {
            const had = listed === pid ? maps : dumped.get(listed);
            return had && new Set(had.map((l) => l.start));
          },
        });
      } finally {
        sockets.close();
      }
    });
    timed('fd owners', () => dumpFdOwners(ctx, proc.vpid, proc.fds, asked.fdOwners, what));
    markPending(proc.fds, asked.readyLists);
    refuseChrootedSocketPaths(proc, what);
    timed('shared object pages', () => mapSharedObjectPages(pid, inj, what, maps));
    proc.aioRings = timed('aio', () => dumpAioRings(pid, inj, maps, what));
    timed('injector close', () => {
      calls.flush();
      inj.close();
    });
    killPoint('snapshot: dumping memory');
    // Memory last: the stack's scratch bytes used above are back as they
    // were, and the batch scratch mapping is not in `maps`.
    // Pages still shared with a parent of the image are recorded as such.
    const stat = timed('stat', () => readStat(pid));
    const ppid = stat?.ppid;
    // --leave-running: forked now, everything else of the process read,
    // so that its private pages are read from the copy once it goes on.
    const copy = ctx.cow?.copyOf(pid, tids, maps, inj.syscallInstruction, stat, what);
    proc.vmas = timed('memory', () => dumpMemory(ctx, pid, proc.vpid, what, ppid !== undefined && inImage.has(ppid) ? ppid : undefined, maps, copy));
    noteMappingPolicies(proc.vmas, asked.mappingPolicies);
    // The pages written since the parent read (dumpMemory), they are
    // protected: from here on, writes are tracked.
    if (trackingFd !== undefined) {
      const pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
      try {
        protectTracked(armingAsked!, pagemapFd);
      } finally {
        closeSync(pagemapFd);
      }
    }
    ctx.image.processes.push(proc);
    systemPids.set(proc.vpid, pid);
    dumped.set(pid, maps);
    if (!ctx.image.node.xstateSize && proc.threads.length) ctx.image.node.xstateSize = proc.threads[0].xstate.length;
  } catch (e) {
    try {
      queue?.flush();
    } catch {
      /* the process is gone */
    }
    try {
      inj.close();
    } catch {
      /* the process is gone */
    }
    throw e;
  }
}

/** A process's descriptors (addon fdEntries), or undefined if it cannot
 * be read now (its dump then reads them again, and says why). */
function fdEntriesOrUndefined(pid: number): FdEntry[] | undefined {
  try {
    return addon().fdEntries(pid);
  } catch {
    return undefined;
  }
}

/** `dumped`: filled with each process dumped, its mappings as read while
 * frozen (its threads exempted from seccomp by then). */
async function dumpAll(ctx: DumpContext, freezer: Freezer, interrupted: () => boolean, batchAreas: Map<number, RemoteProcess>, dumped: Map<number, MapsLine[]>, arming?: ArmingInDump): Promise<void> {
  const byProcess = [...freezer.byProcess()].sort(([a], [b]) => ctx.virtual('pid', a) - ctx.virtual('pid', b));
  // Before anything is injected into any of them.
  timed('fdtable', () => {
    // Not a process whose main thread has exited (refused as such below):
    // its descriptor table, fs and mm are gone, and kcmp finds two such
    // processes' absent ones equal (review r293).
    const leaders = byProcess.filter(([pid, threads]) => threads[0].tid === pid);
    refuseSharedTables(leaders.map(([pid]) => pid), (pid) => nameProcess(ctx.virtual('pid', pid), readComm(pid)));
    const pidFlags = new Map(ctx.tables.tables.pid.map((e) => [e.system, e.flags]));
    for (const [pid, threads] of byProcess) {
      const what = nameProcess(ctx.virtual('pid', pid), readComm(pid));
      refuseLandlocked(pidFlags.get(pid), what);
      // A process whose main thread has exited is refused as such below:
      // compared with it (its descriptor table and fs gone), every live
      // thread read as one with a table of its own (review r257).
      if (threads[0].tid === pid) refuseOwnThreadTables(pid, threads.map((t) => t.tid), what);
    }
  });
  const inImage = new Set(byProcess.map(([pid]) => pid));
  // Of a child stopped by job control, whether its parent took its stop
  // report, and of one running, whether its parent has a continued report
  // (SIGCONT) of it to take, is asked of the parent (jobcontrol.ts).
  const groupStopped = new Set(byProcess.filter(([, threads]) => threads.some((t) => t.groupStop)).map(([pid]) => pid));
  const jobChildren = (children: number[]) => ({ stopped: children.filter((c) => groupStopped.has(c)), running: children.filter((c) => inImage.has(c) && !groupStopped.has(c)) });
  // Before anything is injected into any of them too: calls map pages
  // that may merge with the application's in a listing (listings.ts).
  // Each process's descriptors are read once, here, for that look and
  // for its dump (a process gone meanwhile: its dump reads and says so).
  const fdsBefore = timed('descriptors', () => new Map(byProcess.map(([pid]) => [pid, fdEntriesOrUndefined(pid)])));
  const listingsBefore = timed('listings', () => listingsBeforeCalls([...fdsBefore.values()].flatMap((entries) => (entries ?? []).map((e) => e.target))));
  // Sets shared by fork that a set of another process watches by edges:
  // their ready lists are left unread (resources/epoll.ts).
  const epollsWatched = setsWatchedByEdges([...fdsBefore].map(([pid, entries]) => ({ pid, entries })));
  /** Each process of the image by its virtual PID. */
  const systemPids = new Map<number, number>();
  for (const [pid, threads] of byProcess) {
    const what = nameProcess(ctx.virtual('pid', pid), readComm(pid));
    // A refusal like any other: the application is left running, and the
    // message says so (an AppshotError here said nothing of it).
    if (threads[0].tid !== pid) throw new Unsupported(`${what}: its main thread has exited; a process in that state cannot be captured`);
    // Named by its system PID: it has no other. Unsupported, so the message
    // says what the catch below does: every thread resumes where it was.
    if (!ctx.virtual('pid', pid))
      throw new Unsupported(`system PID ${pid} (${readComm(pid)}) is not in the application's tables: it runs without the preload library (a static binary, a raw clone or fork system call, or it lost its tables)`);
    // A turn of the event loop before each process, so that Ctrl-C is
    // heard (each process is dumped in one go: its threads are all
    // stopped). Not skipped in a short window (frozen7 tried: no turn
    // before 20 ms): a one-process application's dump is then never
    // interrupted, and its Ctrl-C went unheard (output.test.ts).
    await new Promise((resolve) => setImmediate(resolve));
    if (interrupted()) throw new Interrupted();
    try {
      dumpProcessFrozen(ctx, pid, threads, what, inImage, batchAreas, systemPids, dumped, { entries: fdsBefore.get(pid), listings: listingsBefore, epollsWatched }, jobChildren(childrenOf(pid)), arming);
    } finally {
      // What was gathered of this process's /proc is of this moment only.
      forgetGathered();
    }
  }
  timed('shared descriptions', () => markSharedDescriptions(ctx.image.processes));
  checkDnotify(ctx.image);
  timed('forking threads', () => dumpForkingThreads(ctx, ctx.image.processes));
  checkOneTimeNamespace(ctx.image.processes);
  // Before anything ends the application: an image no restore takes.
  const ringTree = keyringTreeFault(ctx.image.processes);
  if (ringTree) throw new Unsupported(ringTree);
  fitInotifyNumbers(ctx.image.processes);
  timed('locks', () => dumpLocks(ctx.image, ctx.fdLockLines));
  timed('unix peers', () => checkUnixPeers(ctx, (vpid) => systemPids.get(vpid)!));
  timed('listeners', () => offerListeners(ctx, (vpid) => systemPids.get(vpid)!));
  timed('socket notes', () => forgetClosedSockets(ctx));
  timed('ptys', () => dumpPtys(ctx));
  timed('sysv', () => Object.assign(ctx.image, dumpSysv(ctx)));
  // Read again if threads never seen by name got their virtual TIDs above;
  // else they are as read at the start of the window (all frozen since).
  const tables = ctx.tablesWritten ? timed('tables', () => addon().readTables(ctx.tablesPath)) : ctx.tables;
  ctx.image.tables = kinds.map((kind) => ({ kind, entries: tables.tables[kind] }));
  ctx.image.waits = dumpWaits(ctx.image, tables);
}

/**
 * Pre-copy, first half: a brief freeze arms dirty tracking, then every
 * process's memory is copied while the application runs, into a base image
 * of memory only (`.NAME-base.partial-PID-RANDOM` beside the output, moved inside
 * it at the end). The snapshot proper then freezes the application only to
 * copy what was written meanwhile.
 */
async function preCopy(reg: LocalRegistry, record: AppRecord, roots: number[], output: string, timeoutMs: number, vpidOf: (pid: number) => number, progress: ByteProgress): Promise<Base> {
  const freezer = new Freezer(roots, record.initPid!, vpidOf);
  let pids: number[];
  let frozenMs = 0;
  let tracked: Set<number>;
  const batchAreas = new Map<number, RemoteProcess>();
  try {
    const planned = prepareTracking(reg, record.aid, roots);
    freezer.freeze(timeoutMs);
    const t0 = now();
    pids = [...freezer.byProcess().keys()];
    tracked = armAll(reg, record.aid, freezer, planned, batchAreas);
    closeBatchAreas(batchAreas);
    frozenMs = (now() - t0) / 1000;
  } finally {
    closeBatchAreas(batchAreas);
    freezer.resume();
  }
  // Journaled (see image/partial.ts) until the image that will hold it
  // is renamed into place: a base is not removed by its own commit.
  const base = makePartialDir(join(dirname(output), `.${basename(output)}-base.partial-${uniqueTag()}`));
  const dir = base.path;
  let pages: PageWriter | undefined;
  try {
    pages = new (addon().PageWriter)(dir, []);
    const image = emptyImage(record);
    const tables = addon().readTables(record.tables);
    // The first copy, made while the application runs, is most of the work.
    const ctx = new DumpContext(image, tables, record.tables, new ReportingPageWriter(pages, progress, estimateImageBytes(pids)).writer(), undefined);
    for (const pid of pids) {
      const vpid = ctx.virtual('pid', pid);
      image.processes.push({ ...memoryOnly(vpid, pid), vmas: dumpMemory(ctx, pid, vpid, nameProcess(vpid, readComm(pid))) });
    }
    const part = pages.finish();
    const id = newImageId();
    const final = join(dir, 'image');
    commitImageDir(final, image, pages, part, id);
    // The base is the directory itself: its parts, not a nested one.
    for (const f of Object.values(PARTS)) renameSync(join(final, f), join(dir, f));
    // The rename moved the page file's ctime: recorded again as it is now
    // (written.ts), or every restore would check the base, most of the data.
    recordWritten(writtenIdentity(join(dir, PARTS.pages)), id, part.chunks);
    rmSync(final, { recursive: true });
    // The renames on disk too: the image that will carry the base is made
    // durable as a whole before it is placed (commitImageDir syncs its own
    // directory, not this one's entries). While the application runs.
    syncDir(dir);
    pages.close();
    return { dir, id, frozenMs, tracked, journal: base };
  } catch (e) {
    pages?.abort();
    rmSync(dir, { recursive: true, force: true });
    base.done();
    throw e;
  }
}

interface Base {
  dir: string;
  id: string;
  frozenMs: number;
  /** System PIDs whose writes since the base are tracked. */
  tracked: Set<number>;
  /** Until the image holding it is in place (see image/partial.ts). */
  journal: PartialDir;
}

/** A pre-copy's base that no image will hold. */
function discardBase(base: Base | undefined): void {
  if (!base) return;
  rmSync(base.dir, { recursive: true, force: true });
  base.journal.done();
}

/** A process of a base image: its memory only. */
function memoryOnly(vpid: number, pid: number): Process {
  const none = 0n;
  return {
    vpid, vppid: 0, vpgid: 0, vsid: 0, pid, comm: '', argv: [], exe: '', cwd: '', root: '', umask: 0,
    creds: { uid: [], gid: [], groups: [], capEff: none, capPrm: none, capInh: none, capBnd: none, capAmb: none, securebits: 0, noNewPrivs: false, seccomp: 0, seccompFilters: [] },
    rlimits: [], sigactions: [], sharedPending: Buffer.alloc(0), threads: [], vmas: [], fds: [],
    mm: { startCode: none, endCode: none, startData: none, endData: none, startBrk: none, brk: none, startStack: none, argStart: none, argEnd: none, envStart: none, envEnd: none, auxv: Buffer.alloc(0) },
    groupStopped: false, personality: 0, dumpable: 1, glibcTidOffset: 0, itimers: [],
  };
}

/** The most of a page file prepared before the freeze (see snapshot):
 * as much as may wait for the disk (writeQueueLimit), or
 * APPSHOT_RESERVE_MAX bytes (0: none; for measuring). Written with zeros
 * (pw_reserve), the page cache costs before the freeze what it would
 * cost inside it, and a little more (the zeros' copy): 256 MiB on this
 * VM, --leave-running frozen 948 -> 213 ms, the command's wall 1518 ->
 * 1586 ms (bench/frozen-profile, paired, medians of 5, load ~6). The page file mapped (APPSHOT_PAGES_MAP=1) is prepared by
 * faulting it in, whose cost only moves for its first 32 MiB (it was the
 * default for that path: all of 256 MiB took the command's CPU from 0.47
 * to 0.74 s and its wall from 1.0 to 1.5 s, paired, load 12-18). */
function reserveMax(): number {
  const set = Number(process.env.APPSHOT_RESERVE_MAX);
  if (process.env.APPSHOT_RESERVE_MAX && Number.isFinite(set) && set >= 0) return set;
  return process.env.APPSHOT_PAGES_MAP === '1' ? 32 << 20 : writeQueueLimit();
}

/** The most read frozen, about, for a --leave-running snapshot with
 * copy-on-write capture to write its page file with O_DIRECT: what the
 * page writer's queue holds (4 buffers of 2 MiB, pages.c), so that the
 * frozen reading never waits for the disk; and the least read from
 * copies for it to be worth it. */
const DIRECT_FROZEN_MAX = 8 << 20;

/** Zeros written ahead take the file system's space before the pages
 * do: never more than half of what is free in `dir`'s, so that a snapshot
 * on a nearly full disk does not fill it for the application and every
 * other writer meanwhile (its own writes past it still fail with ENOSPC,
 * as before). */
function reserveRoom(dir: string): number {
  try {
    const fs = statfsSync(dir);
    return Math.floor((Number(fs.bavail) * Number(fs.bsize)) / 2);
  } catch {
    return 0;
  }
}

/** How many bytes may wait for the disk while memory is read: a quarter
 * of what the machine has available (at least 64 MiB). */
function writeQueueLimit(): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return Math.max(64 << 20, m ? (Number(m[1]) * 1024) / 4 : 0);
}

/**
 * Arms dirty tracking in every process of a pre-copy's brief freeze (a
 * snapshot arms it with each process's dump: ArmingInDump), and returns the
 * system PIDs where it took (the others' pages will be compared).
 *
 * Order matters for a snapshot that fails: the previous image stops being
 * trusted as a parent before any process's record of written pages is
 * reset, and each userfaultfd is recorded as soon as it exists, so that
 * images leave it out whatever happens next: both done before the freeze
 * (prepareTracking, whose record is `previous`), but for a userfaultfd not
 * put where planned.
 */
function armAll(reg: LocalRegistry, aid: string, freezer: Freezer, previous: Record<string, number>, batchAreas: Map<number, RemoteProcess>): Set<number> {
  const strays = [...new Set(Object.values(previous))];
  const tracking: Record<string, number> = {};
  const tracked = new Set<number>();
  try {
    for (const [pid, threads] of freezer.byProcess()) {
      const key = timed('track: key', () => processKey(pid));
      // The userfaultfd calls below must not meet the process's filters.
      if (!timed('track: seccomp', () => exemptFromSeccomp(pid, threads.map((t) => t.tid)))) continue;
      const maps = timed('track: maps', () => readMaps(pid));
      const vdso = maps.find((l) => l.path === '[vdso]');
      const inj = Injector.open(pid, pid, vdso);
      // A scratch area for batches, left out of what is tracked.
      const calls = new CallQueue(inj, () => batchAreas.get(pid) ?? openBatchArea(pid, vdso!, maps, batchAreas));
      const pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
      try {
        const fd = timed('track: arm', () => armTracking(calls, pid, pagemapFd, previous[key], strays, maps, batchAreas.get(pid)?.scratchRange));
        if (fd !== undefined) {
          tracking[key] = fd;
          tracked.add(pid);
        }
      } finally {
        closeSync(pagemapFd);
        inj.close();
      }
    }
  } finally {
    recordTracking(reg, aid, previous, tracking);
  }
  return tracked;
}

/** Each userfaultfd armed (`tracking`, by process key) recorded with the
 * application, where it is not where prepareTracking recorded it
 * (`previous`): processes that are gone keep no entry; their numbers stay
 * known as long as a live process might have inherited one. Written only
 * then: the registry's write is the dearest step of the frozen window. */
function recordTracking(reg: LocalRegistry, aid: string, previous: Record<string, number>, tracking: Record<string, number>): void {
  const changed = Object.entries(tracking).some(([key, fd]) => previous[key] !== fd);
  const current = changed ? reg.get(aid) : undefined;
  if (current) timed('track: registry', () => reg.update({ ...current, tracking: { ...previous, ...tracking } }));
}

/**
 * Before the freeze of a snapshot that arms dirty tracking (ArmingInDump, armAll), so
 * that the registry's write (its dearest step) is not part of the frozen
 * window: the application's previous image is no longer trusted as a
 * parent, as the arming is about to reset the record of pages written since
 * it (the parent chain, if any, is loaded by then; a snapshot that fails
 * after this makes the next one whole, which is only slower); and where
 * each process of `pids` will have its userfaultfd is recorded now, as
 * images must leave it out whatever happens once it exists. The arming writes
 * the registry again only if one could not be put where planned. `keys`:
 * told each process's key, read now rather than in the frozen window.
 */
function prepareTracking(reg: LocalRegistry, aid: string, pids: number[], keys?: Map<number, string>): Record<string, number> {
  const before = reg.get(aid);
  if (!before) throw new AppshotError(`'${aid}' is not running`, ExitCode.notFound);
  const tracking = keptTracking(before.tracking ?? {});
  for (const pid of pids) {
    const key = processKey(pid);
    // Not frozen yet: a short-lived child the tables list may be gone
    // already (no start time: a key that names no process) or go during
    // its plan (plannedTrackingFd); either way it has no plan.
    if (key.endsWith(':0')) continue;
    keys?.set(pid, key);
    const fd = plannedTrackingFd(pid, tracking[key]);
    if (fd !== undefined) tracking[key] = fd;
  }
  reg.update({ ...before, lastImage: undefined, tracking });
  return tracking;
}

/**
 * The registry's tracking entries worth keeping: every live process's, and
 * of those of processes gone, one per descriptor number no kept entry has
 * (a live process may have inherited that descriptor, which images must
 * leave out: only the numbers matter). Kept whole, the map grew by each
 * process of a forking application at every snapshot, and with it every
 * write of the registration.
 */
function keptTracking(previous: Record<string, number>): Record<string, number> {
  const kept: Record<string, number> = {};
  const numbers = new Set<number>();
  const gone: [string, number][] = [];
  for (const [key, fd] of Object.entries(previous)) {
    if (processKey(Number(key.split(':')[0])) === key) {
      kept[key] = fd;
      numbers.add(fd);
    } else gone.push([key, fd]);
  }
  for (const [key, fd] of gone)
    if (!numbers.has(fd)) {
      kept[key] = fd;
      numbers.add(fd);
    }
  return kept;
}

function readComm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '?';
  }
}

/** Identity of every file beyond stat: a checksum of its contents (the
 * first MiB and the last page of a big one). Run after the application
 * was let go: it is not part of the frozen time. */
function checksumFiles(image: Image): void {
  // Only what a restore checks: files mapped, but not shared and writable
  // (the application's data, which changes), and never the tables.
  const checked = new Set<number>();
  for (const p of image.processes)
    for (const v of p.vmas)
      if (v.file >= 0 && (v.kind === VmaKind.FILE_PRIVATE || (v.kind === VmaKind.FILE_SHARED && !(v.prot & 2)))) checked.add(v.file);
  for (const i of checked) {
    const f = image.files[i];
    if (f.deleted || (Number(f.mode) & 0o170000) !== 0o100000) continue;
    f.crc32c = checksumOfMapped(f.path, f.dev, f.ino) ?? 0;
  }
}

/** The checksum of the file at `path` if it is still the one the
 * application mapped (device `dev`, inode `ino`). The name is the
 * application's, and since it mapped the file its user may have put a
 * symlink on the way to one only root may read: a root snapshot would
 * have read that one into the image. Reached O_PATH first, which opens
 * nothing (a device put there is not opened, a FIFO does not block), and
 * read through that descriptor once it is known to be the same file. */
function checksumOfMapped(path: string, dev: bigint, ino: bigint): number | undefined {
  let at: number | undefined;
  let fd: number | undefined;
  try {
    at = openSync(path, O_PATH);
    const st = fstatSync(at, { bigint: true });
    if (st.dev !== dev || st.ino !== ino || !st.isFile()) return undefined;
    fd = openSync(`/proc/self/fd/${at}`, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
    return addon().crc32cFile(fd).crc;
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) closeSync(fd);
    if (at !== undefined) closeSync(at);
  }
}
const O_PATH = 0o10000000;

/**
 * Empties the young generation of our heap while the application still
 * runs, where the process runs with gc exposed (the engine: spawn.ts), so
 * that no collection falls in the frozen window: the window allocates
 * less than the engine's young generation (1 MiB) holds. Measured (tiny
 * application, engine at real-time priority, load 10-15): a scavenge of
 * 0.5-0.85 ms fell in 8 of 31 windows; with this, in none of 31.
 */
function collectBeforeFreeze(): void {
  const gc = (globalThis as { gc?: (options?: { type: 'minor' | 'major' }) => void }).gc;
  if (typeof gc === 'function') timed('young generation collected', () => gc({ type: 'minor' }));
}

/** Waits (up to about 5 s) until init has removed the ended
 * application's registration. A small application is gone within a
 * millisecond or two of its kill: looked at again after 1 ms, then twice
 * as long each time up to 25 ms, not after a whole 25 ms first. */
async function waitReleased(reg: LocalRegistry, aid: string): Promise<void> {
  const until = Date.now() + 5000;
  for (let nap = 1; ; nap = Math.min(nap * 2, 25)) {
    const r = reg.get(aid);
    if (!r || Date.now() > until) return;
    try {
      if (reg.isStale(r)) return;
    } catch {
      // The look at the processes failed: init's removal of the
      // registration is still waited for, up to the deadline (review r438
      // F6: a run or restore of the same AID right after would be refused).
    }
    await sleep(nap);
  }
}

/** /dev/null's device number (1, 3). */
const DEV_NULL_RDEV = (1 << 8) | 3;

/** Everything that would make the image's placing fail, found before
 * the application is stopped rather than after it was frozen and dumped
 * (fuzz34 F6): a name already taken, by a link too (a dangling one, which
 * existsSync follows to nothing: the final rename or link then failed); a
 * directory to put it in that is not one; one another user could change
 * (makePartialDir refuses it too, but only once the image is written). */
function checkOutputPlace(output: string, given: string): void {
  let taken: Stats | undefined;
  try {
    taken = lstatSync(output);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // ENOTDIR: its directory is a file, said below.
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw new AppshotError(`cannot write the image to ${given}: ${errorText(e)}`);
  }
  if (taken?.isSymbolicLink())
    throw new AppshotError(`${given} already exists: a symbolic link${existsSync(output) ? '' : ' to nothing'} (${printable(readlinkSync(output))}); an image never replaces one`, ExitCode.conflict);
  if (taken) throw new AppshotError(`${given} already exists`, ExitCode.conflict);
  let parent: Stats;
  try {
    parent = statSync(dirname(output));
  } catch {
    throw new AppshotError(`no such directory: ${dirname(given)}`, ExitCode.notFound);
  }
  if (!parent.isDirectory()) throw new AppshotError(`not a directory: ${dirname(given)}`, ExitCode.usage);
  refuseUnsafeDirectory(dirname(output));
}

/**
 * A snapshot to standard output that ends the application: the image is
 * the application from then on, so one written to /dev/null is the
 * application lost. Node reopens a closed standard output as /dev/null,
 * so `appshot snapshot app -o - >&-` ended the application and exited 0
 * (fuzz34 F5). Refused before anything is stopped; with --leave-running
 * the application stays, and /dev/null is the user's choice.
 */
function refuseLostOutput(): void {
  let st;
  try {
    st = fstatSync(1);
  } catch {
    st = undefined;
  }
  if (!st || (st.isCharacterDevice() && st.rdev === DEV_NULL_RDEV))
    throw new AppshotError('standard output is /dev/null or closed: the image would be lost, and the application ended with it; write it to a file or a pipe (or add --leave-running)', ExitCode.usage);
}

async function snapshotOnce(reg: LocalRegistry, aid: string, opts: SnapshotOptions): Promise<SnapshotResult> {
  const started = now();
  const injectedBefore = injected.calls;
  const record = await reg.requireSupervised(aid);
  const { tables, why } = reg.readTablesWhy(record);
  if (why) throw new AppshotError(why, ExitCode.failure);
  if (!tables || !record.initPid) throw new AppshotError(`'${aid}' is not running`, ExitCode.notFound);
  const toStream = opts.output === '-';
  if (toStream && !opts.leaveRunning) refuseLostOutput();
  const output = toStream ? '-' : resolve(opts.output);
  // -o x.tar / x.tar.gz / x.tar.zst: a file holding the stream, not a directory.
  const fileKind = toStream ? 'dir' : imageFileKind(output);
  const toFile = fileKind !== 'dir';
  const commit = async (image: Image, pages: PageWriter, part: PageFileDigest, imageId: string, base?: Base): Promise<number | undefined> => {
    if (toStream) {
      standardOutput.carriesImage = true;
      try {
        // Written to descriptor 1 directly, not through process.stdout: a
        // pipe's socket reports a reader gone as an 'error' event of its
        // own, which the tar stream may trigger after it has failed. And
        // not with fs.createWriteStream, which gives up on a full
        // non-blocking pipe (see descriptorWriter).
        await streamImageTar(descriptorWriter(1), image, pages, part, imageId);
      } catch (e) {
        // Plain errors: the catch below says the application was left running.
        if ((e as NodeJS.ErrnoException).code === 'EPIPE') throw new Error('the reader of standard output went away before the image was written');
        throw e instanceof AppshotError ? e : new Error(`writing the image to standard output: ${(e as Error).message}`);
      } finally {
        standardOutput.carriesImage = false;
      }
      return undefined;
    }
    // An image that ends its application: its ending journaled from the
    // instant before the image is in place (ending.ts).
    const journal = opts.leaveRunning
      ? undefined
      : (staged: string) => {
          ending = endingJournal ??= new EndingJournal(reg.home, record);
          ending.placing(output, staged, connections?.journaled());
        };
    if (toFile) {
      await commitImageFile(output, fileKind, image, pages, part, imageId, journal);
      return undefined;
    }
    return commitImageDir(output, image, pages, part, imageId, base ? { base: base.dir } : {}, journal);
  };
  /** The commit waits for the page file's fsync (finish(true)): a
   * directory image's (commitImageDir). */
  const syncInCommit = !toStream && !toFile;
  /** The journal of the snapshot's ending, from its first connection
   * put in TCP repair mode, or its image's placing, on. */
  let endingJournal: EndingJournal | undefined;
  /** The same, once it journaled the image's placing (a snapshot that
   * ends its application, to a directory or file). */
  let ending: EndingJournal | undefined;
  if (!toStream) checkOutputPlace(output, opts.output);
  // Only processes that really are the application's: anyone holding the
  // table file may have written another user's PID there, which would be
  // frozen, dumped into the image and killed with the application.
  const initPid = reg.trustedInitPid(record);
  const roots = tables.tables.pid
    .filter((e) => !(e.flags & (THREAD_FLAG | INIT_FLAG)) && e.system > 1 && addon().pidBelongs(e.system, initPid, record.tables))
    .map((e) => e.system);
  const vpidOf = (pid: number) => addon().readTables(record.tables).tables.pid.find((e) => e.system === pid)?.virtual ?? 0;
  if (opts.preCopy && (toStream || toFile)) throw new AppshotError('--pre-copy writes a directory image (its first copy goes in base/): give -o a directory path', ExitCode.usage);
  let base: Base | undefined;
  let parent: ParentResolver | undefined;
  // Processes whose writes since the parent are tracked (PID and start
  // time, as recorded with the parent image, must still match).
  let trackedPids = new Set<number>();
  try {
    if (opts.preCopy) {
      base = await preCopy(reg, record, roots, output, opts.timeoutMs, vpidOf, opts.progress ?? noProgress);
      parent = await parentChain({ ...record, lastImage: { path: base.dir, id: base.id } });
      trackedPids = base.tracked;
    } else if (!opts.full && !toStream && !toFile) {
      // A stream or a single file is made to travel: it must not need a
      // directory of this node to be restored, so it is always whole.
      parent = await parentChain(record);
      for (const key of parent ? (record.lastImage?.tracked ?? []) : []) {
        const pid = Number(key.split(':')[0]);
        if (processKey(pid) === key) trackedPids.add(pid);
      }
    }
  } catch (e) {
    discardBase(base);
    if (e instanceof AppshotError) throw e;
    throw new AppshotError(`cannot snapshot '${aid}': ${(e as Error).message}; the application was left running`);
  }
  // Pages are written by a thread of the page writer's while memory is
  // read, so the application waits for the disk only when a quarter of
  // the machine's available memory is queued for it.
  /** Left running, it goes on once copies of its memory are made: what
   * is still read frozen, about (the rest is read once it runs again). */
  // Not for a snapshot that ends the application: it is held stopped until
  // its image is on disk whatever its memory is read from, and copies only
  // moved that reading from frozenMs into the held time, which grew
  // (tried: default snapshots with copies against without, 16 MiB held
  // 106 -> 145 ms, 256 MiB 775 -> 863 ms, while frozenMs fell 51 -> 31 and
  // 360 -> 65 ms; paired, 5 rounds, load ~9;
  // bench/results/cowheld-ab-2026-12-06.txt).
  const copying = opts.leaveRunning && cowCaptureWanted(opts.cowCapture);
  const split = copying ? timed('size estimated (read frozen)', () => estimateFrozenBytes(roots, (pid) => readStat(pid)?.ppid === record.initPid)) : undefined;
  const frozenBytes = split?.frozen;
  // Read from copies, the memory can be written at the disk's pace: with
  // O_DIRECT (no page cache made for the page file, whose first touches
  // were most of what the command cost on this VM, and the digests taken
  // from the writer's buffers: 256 MiB, wall 1164 -> 660 ms and CPU 790
  // -> 388 ms, frozen 53 -> 60 ms within its spread; bench/snapwall-ab,
  // paired, 5 rounds, load 8-10). Not when more is read frozen than the
  // writer's queue holds (the reading would wait for the disk), nor for
  // an image streamed or put in a file (the page file read back), nor
  // when less than that is read from copies (a tiny application, read
  // frozen whole: wall 79 -> 106 ms and CPU 39 -> 57 ms with O_DIRECT,
  // the page cache's cost there nothing to save).
  // Only asked for (APPSHOT_PAGES_DIRECT=auto; =1 for every page file):
  // a reviewer's paired runs at a lower load (review 244, 256 MiB, load
  // 2.5-4.1) found the wall longer (373 -> 475 ms: the writes one at a
  // time at the disk's pace), and an image restored at once is then read
  // from the disk; its CPU was lower (408 -> 338 ms).
  const direct =
    process.env.APPSHOT_PAGES_DIRECT === 'auto' && split !== undefined && split.frozen <= DIRECT_FROZEN_MAX && split.copied >= DIRECT_FROZEN_MAX && !toStream && !toFile;
  let pages: PageWriter;
  try {
    pages = timed('page writer opened', () => new (addon().PageWriter)(toStream ? tmpdir() : dirname(output), parent?.fds ?? [], writeQueueLimit(), direct));
  } catch (e) {
    discardBase(base);
    for (const l of parent?.chain ?? []) l.dispose();
    // The first file made where the image goes: a directory that takes no
    // files (/proc, a read-only mount, no write permission) is named with
    // the -o it came from, not only as the page writer saw it.
    const why = (e as Error).message.replace(/^creating [^:]*: /, '');
    if (!toStream) throw new AppshotError(`cannot snapshot '${aid}' to ${opts.output}: no file can be created in ${dirname(output)} (${why}); the application was left running`);
    throw new AppshotError(`cannot snapshot '${aid}': ${(e as Error).message}; the application was left running`);
  }
  const vpids = new Map(tables.tables.pid.map((e) => [e.system, e.virtual]));
  const freezer = new Freezer(roots, record.initPid, (pid) => vpids.get(pid) ?? vpidOf(pid));
  const progress = opts.progress ?? noProgress;
  const interrupted = () => opts.signal?.aborted === true;
  const image = emptyImage(record);
  const imageId = newImageId();
  const clock = new PhaseClock();
  let armed: string[] | undefined;
  let connections: HeldConnections | undefined;
  let keeper: SocketsForKeeper | undefined;
  let held: { held: number; needed: number; waiting: number } | undefined;
  /** Scratch areas mapped for batches of injected calls, by process. */
  const batchAreas = new Map<number, RemoteProcess>();
  const cow = copying ? new CowCapture(record.initPid) : undefined;
  const holdSeconds = opts.tcpHoldSeconds ?? DEFAULT_HOLD_SECONDS;
  // The image in place (renamed there, or sent whole); the connections
  // handed to a keeper; the application released to its image (the point
  // of no return of a snapshot that ends it).
  let committed = false;
  let handedOver = false;
  let journaledEnding = false;
  let released = false;
  // After the commit, what failed without undoing it (SnapshotResult).
  const warnings: string[] = [];
  try {
    // Written only by a snapshot's arming, of which this one's dump adds
    // each userfaultfd it makes (ArmingInDump).
    const trackingFds = [...new Set(Object.values(reg.get(aid)?.tracking ?? {}))];
    // For the progress shown only, so read before the freeze (smaps_rollup
    // walks every mapping): the processes in the tables now.
    // Also what a whole image's page file is prepared for (page cache
    // allocated and faulted in) while the application still runs: first
    // touches of memory are most of what copying it costs (measured, VM
    // with free page reporting, load ~10: 16 MiB touched first 50-440 ms,
    // again 0.7 ms), and they are not the frozen window's to pay. Not for
    // an incremental one, which holds only what changed. At most
    // reserveMax(): written with zeros (pw_reserve), all of 256 MiB took
    // the frozen window (--leave-running) from 0.95 to 0.21 s, the
    // command's wall unchanged (1.52 -> 1.59 s; paired, load ~6).
    const whole = !parent && !base;
    // (Left running with copy-on-write capture, the frozen and copied
    // parts read above add up to it: the same smaps_rollup of each.)
    const estimate = progress === noProgress && !whole ? 0 : split ? split.frozen + split.copied : timed('size estimated', () => estimateImageBytes(roots));
    // Left running with copy-on-write capture, only for what is read
    // frozen: page cache made ahead for memory read after the resume
    // shortens no frozen window and costs writing the file twice (256
    // MiB: zeros 0.1-1.3 s before the freeze, on this VM). All of it
    // with APPSHOT_RESERVE_MAX set (for measuring: as before).
    const reserved = frozenBytes === undefined || process.env.APPSHOT_RESERVE_MAX ? estimate : frozenBytes;
    if (whole) timed('page file prepared', () => pages.reserve(Math.min(reserved, reserveMax(), reserveRoom(toStream ? tmpdir() : dirname(output)))));
    // This image becomes the next one's parent: writes are tracked from
    // the freeze on (ArmingInDump). Not a tar: its page file is not on disk for
    // the next one to compare.
    const becomesParent = opts.leaveRunning && !toStream && !toFile;
    const keys = new Map<number, string>();
    const planned = becomesParent ? timed('tracking prepared', () => prepareTracking(reg, aid, roots, keys)) : {};
    // The witness of an ending (ending.ts) started while the application
    // runs, not in the window it is held stopped in.
    if (!opts.leaveRunning && !toStream) timed('witness started', () => (endingJournal ??= new EndingJournal(reg.home, record)).witnessed());
    clock.outside(collectBeforeFreeze);
    // freezeMs is the stopping of the threads alone: what came before (the
    // estimate, the page file prepared while the application runs,
    // tracking prepared) is totalMs's, not the freeze's.
    clock.startingNow();
    const freezeBegan = process.hrtime.bigint();
    timed('freeze', () => freezer.freeze(opts.timeoutMs));
    clock.end('freezeMs');
    windowOpens();
    // Ended by this snapshot, the application stays stopped until its
    // image is on disk whatever the order: the chunks are hashed (one
    // thread) and sent to the disk (sync_file_range) as they are read, on
    // the other core, so that the fsync finds little left (measured, load
    // 9-10 on 2 cores: the fsync of 256 MiB 240 -> 40 ms). Left running, it
    // waits only for the reading, which the hashing would slow (measured
    // likewise: 256 MiB frozen 0.47 -> 1.36 s): hashed once it runs again.
    // Not sent to the disk ahead here (pages.startFlushing): in the
    // window both cores are busy, and the flushes slowed the reading.
    // 256 MiB, bench/snapwall-ab, paired: written back and flushed as
    // written, the window 107 -> 189 ms for an fsync 191 -> 89 ms (7
    // rounds, load ~4.4); only the device's cache flushed behind the
    // hashing, frozen +58 ms paired (lower in 3 of 9, load 3.4-5.8) for an
    // fsync 159 -> 127 ms, the held time no shorter. The hashing's
    // writing back of each chunk is as far as it goes in the window:
    // started by the writer thread as each buffer is written instead
    // (sync_file_range WRITE, no flush), 256 MiB paired, 7 rounds, load
    // ~7, the state read +40 ms (worse in 6 of 7) for the fsync -23 and
    // the digests' wait -62, the held time +66 ms (lower in 2 of 7;
    // bench/results/snapwall-ab-2026-12-06-h317-writeback.txt).
    if (!opts.leaveRunning) pages.startHashing(false);
    const reporting = new ReportingPageWriter(pages, progress, estimate);
    reporting.report();
    // Processes created while we were stopping the others mapped themselves.
    const ctx = timed('context (tables)', () => new DumpContext(image, reg.readTables(record) ?? tables, record.tables, reporting.writer(), parent, trackingFds, trackedPids));
    ctx.freezeBegan = freezeBegan;
    ctx.ipcOwnership = reg.ipcOwnership(record);
    ctx.initPid = initPid;
    ctx.launchKeyring = record.launchKeyring;
    if (cow) ctx.cow = cow;
    if (opts.inherited) ctx.inherited = opts.inherited;
    connections = ctx.tcp;
    connections.closeConnections = opts.tcpClose ?? false;
    // Only this process can let a connection out of repair mode: killed
    // while it holds one (whatever the kind of snapshot), the next command
    // does, from the journal (ending.ts).
    connections.onHold = (socket) => (endingJournal ??= new EndingJournal(reg.home, record)).holding(socket);
    keeper = ctx.keeper;
    keeper.keeping = !opts.leaveRunning && holdSeconds > 0 && keeperPathFits(reg.home, aid);
    if (base) image.parent = { imageId: base.id, path: 'base' };
    else if (parent) image.parent = { imageId: parent.head.manifest.imageId, path: record.lastImage!.path };
    const dumped = new Map<number, MapsLine[]>();
    const tracking: Record<string, number> = {};
    const arming: ArmingInDump | undefined = becomesParent
      ? { planned, keys, strays: [...new Set(Object.values(planned))], tracking, record: () => recordTracking(reg, aid, planned, tracking) }
      : undefined;
    try {
      await dumpAll(ctx, freezer, interrupted, batchAreas, dumped, arming);
    } catch (e) {
      // Whatever became of the dump, each userfaultfd made is recorded
      // (images must leave it out).
      arming?.record();
      throw e;
    }
    clock.end('dumpMs');
    image.stats.dumpUs = BigInt(Math.round(clock.sinceFrozen() * 1000));
    if (arming) {
      arming.record();
      armed = Object.keys(arming.tracking);
    }
    clock.end('trackMs');
    if (opts.leaveRunning) {
      timed('batch scratch unmapped', () => closeBatchAreas(batchAreas));
      connections.release();
      keeper.close();
      timed('resume', () => freezer.resume());
      clock.released();
      clock.end('resumeMs');
      // What the copies give from now on is hashed (one thread) and goes
      // to the disk as it is written, beside their reading rather than
      // after it: the final fsync and hashing wait for less. With nothing
      // left to read (no copy), the flusher would only do the fsync's work
      // beside it and slow the rest of the queue (256 MiB --no-cow-capture:
      // drain 2 -> 54 ms, 5 rounds, load 4.4-6.3).
      if (cow?.pending) {
        pages.startHashing(false);
        pages.startFlushing(); // only with APPSHOT_PAGES_FLUSH_AHEAD=1 (pages.c)
      }
      reportProfile('the frozen window');
    }
    // The frozen window ends here: nothing below reads the application,
    // which goes on now (--leave-running) or stays stopped, held for its
    // end until the image is on disk (phases.ts). Taken before the
    // hashing starts: that time is drainMs's (timed from trackMs's end),
    // and counted in both the held time would look shorter than its parts.
    image.stats.frozenUs = BigInt(Math.round((opts.leaveRunning ? clock.phases.heldMs : clock.sinceFrozen()) * 1000));
    // Printed once the window is timed: writing the report is not part of it.
    if (!opts.leaveRunning) reportProfile('the frozen window');
    // The memory the copies hold, read now that the application runs
    // (before the hashing starts: the reading has both cores).
    if (cow?.pending) {
      killPoint('snapshot: reading the copies');
      timed('cow: read copies', () => cow.readAll());
      reportProfile('the reading of the copies');
    }
    clock.end('copyMs');
    // The page file's chunk digests are hashed as its chunks are complete
    // in the file, from now on with --leave-running (from the freeze on
    // otherwise, above): one thread while what is queued is written (the
    // buffered path), every core once it is done (finish).
    pages.startHashing(false);
    // Held until its end, the application needs its scratch areas no
    // more, but goes on with them if the snapshot fails or appshot dies:
    // unmapped now (its held time, not the reading of its state).
    closeBatchAreas(batchAreas);
    // What is still queued for the disk, shown as it is written (the rest
    // of the queue is drained by finish, which times it too).
    await reporting.drain(interrupted);
    clock.end('drainMs');
    if (interrupted()) throw new Interrupted();
    // A directory image's page file fsync is started here and waited for
    // by the commit, just before its rename: meanwhile the last digests,
    // the classification, the checksums, the metadata encoded and signed,
    // and the other syncs (commitImageDir says why that order is enough).
    const part = pages.finish(syncInCommit);
    clock.endPageFile(part);
    let stored = 0;
    let inherited = 0;
    for (const p of image.processes)
      for (const v of p.vmas) {
        stored += countPages(v.pages?.runs ?? []);
        inherited += countPages(v.pages?.fromParent ?? []);
      }
    image.stats.pages = BigInt(stored);
    image.stats.pagesFromParent = BigInt(inherited);
    // FIG. 8: each resource classified, by the rules the application runs
    // under or by the standard criteria; the verdicts travel in the image.
    // The header's instance section is the application's to write (every
    // process holds the file read-write): what it says of redirections,
    // environment and identity only goes into the image, as an image
    // written by hand could say it, and a restore takes the image as
    // untrusted input (validate.ts; REDIR PATH targets made as the image's
    // users; a clone keeps only a private /tmp under its own copies,
    // rebasedRedirs). privateRoot, which `rm` removes, is the registry's.
    image.instance = { redirs: tables.instance.redirs, env: tables.instance.env, privateRoot: record.privateRoot ?? '', identity: tables.instance.identity };
    image.verdicts = classify(image, record.rules ? parseRules(record.rules.text, record.rules.source) : undefined);
    checksumFiles(image);
    clock.end('checksumMs');
    // Without --leave-running, the application is still stopped: the
    // image is committed before anything is killed, so that if writing it
    // fails, the application is given back alive (the catch below).
    const pagesFsyncMs = await commit(image, pages, part, imageId, base);
    committed = true;
    clock.end('commitMs');
    // The page file's fsync, run beside hashMs, checksumMs and commitMs
    // (not after drainMs as otherwise): its own length, not a slice of
    // the held time.
    if (pagesFsyncMs) clock.overlapped('fsyncMs', pagesFsyncMs);
    killPoint('snapshot: image committed');
    if (!opts.leaveRunning) {
      // Before the application ends, a keeper holds its connections until
      // the restore (keeper.ts); if it cannot and the image needs it, the
      // snapshot fails here, the application left running, no image.
      if (keeper.keeping) {
        connections.handTo(keeper);
        try {
          keeper.handOver({ home: reg.home, aid, imageId, holdSeconds });
        } catch (e) {
          throw new AppshotError(`cannot snapshot '${aid}': ${(e as Error).message}; the application was left running`);
        }
        handedOver = true;
        held = keeper.counts();
      }
      // The point of no return: journaled first, with the image's
      // processes, so that the next command ends what is left of the
      // application if appshot is killed once any of them was set to die
      // with it (ending.ts; before, or with all of them whole and none of
      // its connections in repair mode, it removes the image). Then its threads die with us, so that appshot killed
      // before the file "released" cannot leave it running beside its
      // image, and the file says the image is it.
      // The guardian that would let the connections out of repair mode at
      // our death is disarmed first: from the ending on, the image carries
      // them on (killed in between, the journal says "placing": rolled
      // back, and the next command lets them out).
      connections.disarm();
      killPoint('snapshot: guardian disarmed');
      ending?.ending(
        [...freezer.processes].map((pid) => ({ pid, startTime: readStat(pid)?.startTime ?? 0 })),
        connections.inRepair,
      );
      journaledEnding = !!ending;
      killPoint('snapshot: ending journaled');
      ending?.witnessDiesWithUs();
      killPoint('snapshot: witness dies with appshot');
      freezer.dieWithUs();
      killPoint('snapshot: dies with appshot');
      // Ended by appshot, not by itself: the AID is released for the
      // image's restore rather than kept as an ended application.
      reg.markReleased(record, toStream ? '-' : output);
      released = true;
      reg.setAsideLog(record);
      killPoint('snapshot: released');
      // The application moves into its image rather than dying: the
      // kernel's robust-list walk at its kill must not mark the mutexes it
      // holds in files mapped shared owner-dead (threads.ts).
      disarmRobustLists(image);
      killPoint('snapshot: killing');
      freezer.kill();
      // Held until every process of it is gone (killed, each exit seen):
      // where CRIU's dump stops its "Frozen time" clock when it ends the
      // application (cr-dump.c cr_dump_finish: the tasks switched to
      // TASK_DEAD, which kills and waits for them, then TIME_FROZEN
      // stopped), so that the two figures span the same.
      clock.released();
      killPoint('snapshot: killed');
      connections.closeSilently();
      keeper.close();
      await waitReleased(reg, aid);
      clock.end('endMs');
      killPoint('snapshot: ended');
    } else {
      // The REDIR PATH directories made for it hold files this image does
      // not: noted, so that its rm keeps them for the image (Registry
      // removeMany), as markReleased does for a snapshot that ends it.
      const keepsDirs = !!(record.madeDirs?.length || record.restore?.madeDirs.length);
      if (becomesParent || keepsDirs) {
        // The image is committed and whole, and the application runs on:
        // a registration that cannot be written now takes nothing from
        // either. Thrown, it would reach the catch below, which removes
        // the image and says the snapshot failed; said instead as what it
        // costs.
        try {
          killPoint('snapshot: recording the image');
          const current = reg.get(aid);
          if (current)
            reg.update({
              ...current,
              ...(becomesParent ? { lastImage: { path: output, id: imageId, tracked: armed } } : {}),
              ...(keepsDirs ? { imagedTo: output } : {}),
            });
        } catch (e) {
          const costs = [
            ...(becomesParent ? ['its next snapshot will be whole, not incremental on this image'] : []),
            // Kept anyway for an earlier image (imagedTo, never cleared):
            // its rm keeps them, in that image's name.
            ...(keepsDirs && !record.imagedTo ? ['its rm will remove the REDIR PATH directories made for it, whose files this image needs and does not hold (copy them first, to restore it)'] : []),
            ...(keepsDirs && record.imagedTo ? [`its rm will keep the REDIR PATH directories made for it, which this image needs, but name as their image the earlier ${record.imagedTo === '-' ? 'one sent on standard output' : record.imagedTo}`] : []),
          ];
          warnings.push(`the image ${toStream ? 'sent on standard output' : output} is whole, but the registration of '${aid}' could not record it (${errorText(e)}): ${costs.join('; ')}`);
        }
      }
    }
    return {
      aid,
      image: output,
      imageId,
      parent: image.parent?.path,
      processes: image.processes.length,
      threads: image.processes.reduce((n, p) => n + p.threads.length, 0),
      pages: stored,
      pagesFromParent: inherited,
      bytes: part.size,
      frozenMs: Number(image.stats.frozenUs) / 1000,
      phases: clock.rounded(),
      ...(base ? { preCopyFrozenMs: base.frozenMs } : {}),
      totalMs: (now() - started) / 1000,
      leftRunning: opts.leaveRunning,
      ...(cow ? { cowCapture: cow.report } : {}),
      injectedCalls: injected.calls - injectedBefore,
      ...(held?.held || held?.waiting ? { keptConnections: { ...held, holdSeconds } } : {}),
      ...(warnings.length ? { warnings } : {}),
    };
  } catch (e) {
    if (process.env.APPSHOT_DEBUG) process.stderr.write(`${(e as Error).stack}\n`);
    cow?.endAll();
    pages.abort();
    closeBatchAreas(batchAreas);
    // Past the point of no return (markReleased): the image is complete
    // and is the application now, whose registration says it ended and
    // whose init removes it once its processes are gone. Resuming them
    // would leave it running beside its image, released; so whatever is
    // left of the ending is done, and the failure said apart
    // (ExitCode.afterCommit), never as "left running".
    if (released) {
      try {
        disarmRobustLists(image);
      } catch {
        /* best effort: the ending goes on */
      }
      freezer.kill();
      try {
        connections?.closeSilently();
        keeper?.close();
        await waitReleased(reg, aid);
      } catch {
        /* the connections' keeper holds its own copies; init removes the registration */
      }
      const where = toStream ? 'standard output' : output;
      throw new SnapshottedWithError(
        `snapshot of '${aid}' written to ${where}, which is now the application (it was ended), but a step after its end began failed: ${(e as Error).message}`,
        toStream ? '-' : output,
        imageId,
        image.parent?.path,
      );
    }
    // Past its journaled ending, the record must say what is true at
    // every step, so that a kill anywhere leaves one consistent way out:
    // first, while the threads still die with us, the connections leave
    // repair mode and the entry says none is left in it (killed before,
    // the application dies and its image is it; after, the next command
    // finds it whole with nothing only the image could carry on); then
    // the threads no longer die with us (killed now, the application runs
    // on whole and the next command, finding it so, rolls back); then the
    // entry says rolled back, before the application is let go and the
    // image removed (killed then, the next command removes the image,
    // never ends the application).
    if (journaledEnding) {
      let letGo = true;
      try {
        connections?.release();
      } catch {
        // One that would not leave repair mode: the entry keeps its count
        // (killed before the end of the undoing, the image carries it on).
        letGo = false;
      }
      killPoint('snapshot: failed, connections released');
      if (letGo)
        try {
          ending?.connectionsReleased();
        } catch {
          /* still counted in repair mode: killed now, the image wins, as it would have */
        }
      killPoint('snapshot: failed, nothing in repair mode');
      freezer.liveOn();
      ending?.witnessLivesOn();
      killPoint('snapshot: failed, lives on without appshot');
      try {
        ending?.rollingBack();
      } catch {
        /* still "ending", of an application whole and not dying: rolled back too */
      }
      killPoint('snapshot: failed, rolling back');
    }
    connections?.release();
    keeper?.close();
    freezer.resume();
    killPoint('snapshot: failed, application resumed');
    // Before it, a failure leaves no image: one committed (a directory or
    // a file) goes, and a keeper handed the connections lets them go.
    // A stream sent whole on standard output cannot be taken back.
    if (committed && !toStream) rmSync(output, { recursive: true, force: true });
    if (handedOver)
      try {
        dropKept(reg.home, aid);
      } catch {
        /* no keeper left to drop */
      }
    // prepareTracking already stopped trusting the previous image before
    // anything was reset; the base of a failed pre-copy goes.
    discardBase(base);
    if (e instanceof Interrupted) throw new AppshotError(SNAPSHOT_INTERRUPTED, ExitCode.interrupted);
    // Whoever read the stream has the whole image, of an application that
    // runs on: said, as what it is.
    const sent = committed && toStream ? ' (the image it had sent on standard output is whole: a copy, as with --leave-running)' : '';
    if (e instanceof Unsupported) {
      const message = `cannot snapshot '${aid}': ${e.message}; the application was left running${sent}`;
      throw e instanceof Transient && !sent ? new MomentRefused(message, ExitCode.failure) : new AppshotError(message, ExitCode.failure);
    }
    if (e instanceof AppshotError) throw sent ? new AppshotError(e.message + sent, e.exitCode) : e;
    throw new AppshotError(`cannot snapshot '${aid}': ${(e as Error).message}; the application was left running${sent}`);
  } finally {
    // Linked or streamed, or aborted above: nothing of it stays open (a
    // resident engine would keep it until collected).
    pages.close();
    for (const l of parent?.chain ?? []) l.dispose();
    // Inside the committed image now, or discarded above.
    base?.journal.done();
    // Done, or undone above: nothing is left for the next command, nor
    // for the guardian (disarmed already but where a step threw first).
    connections?.disarm();
    endingJournal?.done();
    // Read, or the snapshot failed: none outlives it.
    cow?.endAll();
  }
}

export { VmaKind };
