/**
 * appshot's Node API: `import { run, snapshot, clone, ... } from 'appshot'`.
 *
 * The same operations as the CLI, called in this process, for test suites
 * and CI scripts: start an application, snapshot it, make a template, stamp
 * clones from it, stop them. Each function takes an option object and
 * resolves with a plain result object (what the command's --json prints);
 * every failure a user can cause (an unknown AID, a corrupt image, a taken
 * name, a missing file) rejects with an AppshotError whose `exitCode` is the
 * CLI's exit status for it.
 *
 * Applications outlive the calling process: `run` starts them in the
 * background, like `appshot run -d`, and they end with `stop` (or when
 * their last process exits).
 */
import { AppshotError, errorText, ExitCode, isSystemCallError } from './errors.js';
import { resolve } from 'node:path';
import { defaultHome, homeScope, refuseUnsafeHome } from './home.js';
import { settleKilledCommands } from './image/partial.js';
import { execIn, run as runHarness } from './harness.js';
import { describeApplications, selectApplications, type ApplicationInfo } from './inspect.js';
import { pruneEnded, removeApp, requireSignallable, signalApp, signalName, stillRunning, stopApp, waitEnded } from './lifecycle.js';
import { checkAid, LocalRegistry } from './registry.js';
import { restore as restoreImage, RestoredWithError as RestoreFailedAfterCommit, type RestoreResult } from './restore/driver.js';
import { snapshot as snapshotApplication, SnapshottedWithError, type SnapshotResult } from './snapshot/driver.js';
import { clone as cloneTemplate, ClonedWithError as CloneFailedAfterCommit, type CloneResult, MAX_CLONES } from './template/clone.js';
import { createTemplate, type TemplateSummary } from './template/template.js';
import type { InheritedListener } from './resources/context.js';

export { AppshotError, ExitCode, SnapshottedWithError };
export type { ApplicationInfo, SnapshotResult, TemplateSummary };
export type { ApplicationState, ExitedApplicationInfo, ListeningPort, LiveApplicationInfo, ProcessRow, SnapshottedApplicationInfo } from './inspect.js';
export type { SnapshotPhases } from './snapshot/phases.js';
export type { PortBinding } from './registry.js';
export type { Action, Verdict } from './image/types.js';

/** Options every function takes. */
export interface CommonOptions {
  /** The state directory (registry) to use, as APPSHOT_HOME does for the
   * CLI. Default: $APPSHOT_HOME, else /var/lib/appshot for root and
   * ~/.local/state/appshot for others. A test suite that gives itself one
   * sees only its own applications. */
  home?: string;
}

export interface RunOptions extends CommonOptions {
  /** The AID to register (default: a generated one). */
  aid?: string;
  /** A rules file (templates/README.md): its REDIR PATH and SET ENV apply
   * from the start, and snapshots classify resources by it. */
  rules?: string;
  /** A /tmp of its own (`appshot run --private-tmp`). */
  privateTmp?: boolean;
}

export interface RunResult {
  aid: string;
  /** The command's virtual PID, as the application sees it (2: init is 1). */
  vpid: number;
  /** The command's system PID. */
  pid: number;
  /** Where its stdout and stderr go (`appshot logs AID`). */
  log: string;
}

export interface KillOptions extends CommonOptions {
  /** 'SIGTERM', 'TERM', 'KILL'... SIGKILL and SIGSTOP go to every
   * process; the others to the application's init, which passes them on. */
  signal?: string;
}

export interface StopOptions extends KillOptions {
  /** Milliseconds to wait for it to end after `signal` (default SIGTERM)
   * before SIGKILL; 10 000 by default, as `appshot stop -t 10`. */
  timeoutMs?: number;
  /** @deprecated Seconds, the name of the first API: use `timeoutMs`, as
   * every other call takes its time. Giving both is refused. */
  timeout?: number;
}

export interface PsOptions extends CommonOptions {
  /** Ended applications too, and those a snapshot ended (`appshot ps -a`). */
  all?: boolean;
}

export interface SnapshotOptions extends CommonOptions {
  /** The image directory to create; a .tar, .tar.gz or .tar.zst file (zstd: with the zstd program); or '-' for a tar stream on stdout. */
  output: string;
  /** Resume the application afterwards instead of ending it; the next
   * snapshot is incremental. Default false. */
  leaveRunning?: boolean;
  /** With leaveRunning: false copies all memory while the application is
   * frozen, rather than from a copy-on-write fork of each process made
   * then. Default true (APPSHOT_COW_CAPTURE=0: false). */
  cowCapture?: boolean;
  /** Do not build on the application's previous image. Default false. */
  full?: boolean;
  /** Copy memory while the application runs, then freeze it only for the
   * pages written meanwhile. Default false. */
  preCopy?: boolean;
  /** Give up if some thread cannot be stopped within this time. Default
   * 10 000 ms. */
  timeoutMs?: number;
  /** Record established TCP connections as closed (no CAP_NET_ADMIN
   * needed): the restored application sees them reset. Default false. */
  tcpClose?: boolean;
  /** How long appshot-keeper holds the ended application's connections
   * for a restore on this host; 0: not held (a connection only the keeper
   * could carry is then refused). Default 900. */
  tcpHoldSeconds?: number;
  /** Listening sockets of the application that are the caller's (by
   * inode): recorded by key, not dumped; the restore of the image must be
   * handed them (`appshot serve`'s public listener). */
  inherited?: ReadonlyMap<bigint, InheritedListener>;
}

export interface RestoreOptions extends CommonOptions {
  /** The AID to run it as (default: the image's own). */
  aid?: string;
  /** Map memory copy-on-write from the image's page file instead of
   * copying it; the image must then stay as long as the application runs. */
  lazy?: boolean;
}

/** A restored application. */
export type Restored = Omit<RestoreResult, 'createdDirs' | 'lifeline'>;

export interface TemplateOptions extends CommonOptions {
  /** Classify by this rules file instead of the rules the application ran
   * under. */
  rules?: string;
  /** The template's name (default: from the output path); clones are named
   * after it. */
  name?: string;
}

export interface CloneOptions extends CommonOptions {
  /** The AID; with count > 1, instances are AID-1 ... AID-N (default:
   * NAME-xxxxxx from the template's name). */
  aid?: string;
  /** How many instances. Default 1. All or nothing: if one fails, those
   * made before it are removed. */
  count?: number;
  /** Checksum the template's page data too. Default false. */
  verify?: boolean;
  /** Aborting stops the batch after the instance being made, and removes
   * every instance it made. */
  signal?: AbortSignal;
}

/** One cloned instance; `ports` holds the port each of its listening ports
 * really is on this node (`mode: 'allocate'`: its own). */
export type Clone = Omit<CloneResult, 'createdDirs'>;

/** How restore() rejects when it failed at a step after its commit
 * (exitCode 6, ExitCode.afterCommit; the message says which step): the
 * application was restored all the same, is registered and runs, and
 * `restored` is what restore() would have resolved with. Stop or rm it if
 * it is not wanted. */
export class RestoredWithError extends AppshotError {
  constructor(
    message: string,
    readonly restored: Restored,
  ) {
    super(message, ExitCode.afterCommit);
  }
}

/** How clone() rejects when its batch failed at a step after its commit
 * (exitCode 6): every instance of `cloned` exists, is registered and
 * runs, as clone() would have resolved. */
export class ClonedWithError extends AppshotError {
  constructor(
    message: string,
    readonly cloned: Clone[],
  ) {
    super(message, ExitCode.afterCommit);
  }
}

/** Runs `body` in the state directory `opts.home` names (homeScope: the
 * keys and temporaries too, not only the registry), after settling what
 * commands killed with SIGKILL left there, as every CLI command does
 * first (settleKilledCommands: a snapshot killed while it ended its
 * application is finished one way or the other); turning a system
 * call's failure (ENOENT on a path given, EACCES...) into an AppshotError
 * as the CLI reports it; any other error is a bug and goes through as it
 * is. `lookOnly`: the call only looks (ps), as settleKilledCommands takes
 * it. */
async function call<T>(opts: CommonOptions, body: () => Promise<T> | T, lookOnly = false): Promise<T> {
  const settled = async () => {
    refuseUnsafeHome(defaultHome());
    await settleKilledCommands(undefined, { lookOnly });
    return body();
  };
  try {
    return await (opts.home ? homeScope.run(opts.home, settled) : settled());
  } catch (e) {
    if (!(e instanceof AppshotError) && isSystemCallError(e)) {
      throw Object.assign(new AppshotError(errorText(e), ExitCode.failure), { cause: e });
    }
    throw e;
  }
}

const registry = (opts: CommonOptions) => new LocalRegistry(opts.home);

/** Starts `command` as a new application in the background (`appshot run
 * -d`) and resolves once it runs. Rejects with exitCode 127 if the command
 * is not found, 126 if it cannot be executed, 4 if the AID is taken. */
export function run(command: string[], opts: RunOptions = {}): Promise<RunResult> {
  return call(opts, async () => {
    let started: RunResult | undefined;
    await runHarness(registry(opts), command, {
      aid: opts.aid,
      detach: true,
      rules: opts.rules,
      privateTmp: opts.privateTmp,
      onStarted: (record, vpid, pid) => (started = { aid: record.aid, vpid, pid, log: record.logPath! }),
    });
    // A detached run returns once init has reported the command started
    // (or throws): never without onStarted having been called.
    if (!started) throw new Error('appshot: run returned without the application having started');
    return started;
  });
}

/** Runs `command` inside the application's virtual view (`appshot exec`),
 * with this process's stdin, stdout and stderr; resolves with its exit
 * status (128 + N if killed by signal N). */
export function exec(aid: string, command: string[], opts: CommonOptions = {}): Promise<number> {
  return call(opts, () => execIn(registry(opts), aid, command));
}

/** Ends the application (`appshot stop`): `signal`, then SIGKILL after
 * `timeoutMs`; resolves once every process is gone. The ended
 * application is kept (`ps({ all: true })`) until `rm`. */
export function stop(aid: string, opts: StopOptions = {}): Promise<void> {
  return call(opts, async () => {
    if (opts.timeoutMs !== undefined && opts.timeout !== undefined)
      throw new AppshotError('stop takes timeoutMs or timeout (seconds, deprecated), not both', ExitCode.usage);
    if (opts.timeout !== undefined && !(opts.timeout >= 0)) throw new AppshotError(`timeout ${opts.timeout}: expected a number of seconds`, ExitCode.usage);
    const timeoutMs = opts.timeoutMs ?? (opts.timeout !== undefined ? opts.timeout * 1000 : 10_000);
    if (!(timeoutMs >= 0)) throw new AppshotError(`timeoutMs ${timeoutMs}: expected a number of milliseconds`, ExitCode.usage);
    const reg = registry(opts);
    const sig = signalName(opts.signal ?? 'SIGTERM', 'signal');
    await stopApp(reg, await requireSignallable(reg, aid), sig, timeoutMs / 1000);
  });
}

/** Sends one signal (default SIGKILL) and resolves at once (`appshot
 * kill`). */
export function kill(aid: string, opts: KillOptions = {}): Promise<void> {
  return call(opts, async () => {
    const reg = registry(opts);
    const sig = signalName(opts.signal ?? 'SIGKILL', 'signal');
    signalApp(reg, stillRunning(reg, aid, await requireSignallable(reg, aid)), sig);
  });
}

/** Resolves with the exit code once the application has ended
 * (`appshot wait`); undefined if a snapshot ended it, or it was lost (its
 * init killed with it: no exit code). */
export function wait(aid: string, opts: CommonOptions = {}): Promise<number | undefined> {
  return call(opts, async () => {
    const ended = await waitEnded(registry(opts), aid);
    return ended && ended !== 'released' ? ended.exitCode : undefined;
  });
}

/** Removes an ended application, its log, private copies and directories
 * (`appshot rm`), or the record of one a snapshot ended; `force` ends a
 * running one first. */
export function rm(aid: string, opts: CommonOptions & { force?: boolean } = {}): Promise<void> {
  return call(opts, () => removeApp(registry(opts), aid, opts.force ?? false));
}

/** Removes every ended application, and the records of those a snapshot
 * ended (`appshot prune`); their AIDs. */
export function prune(opts: CommonOptions = {}): Promise<string[]> {
  return call(opts, () => pruneEnded(registry(opts)));
}

/** The running applications of the registry, or only `aid`, with their
 * processes (`appshot ps --json`, without the schema field); with `all`,
 * as `ps -a`: the ended ones too (`state: 'exited'`, with exitCode) and
 * those a snapshot ended (`state: 'snapshotted'`, with the image it went
 * into), in AID order. */
export function ps(aid?: string, opts: PsOptions = {}): Promise<ApplicationInfo[]> {
  return call(opts, () => {
    const reg = registry(opts);
    return describeApplications(reg, selectApplications(reg, aid, opts.all ?? false));
  }, true);
}

/** Freezes every process of the application and writes its image
 * (`appshot snapshot`). The application ends once the image is written,
 * unless `leaveRunning`; a snapshot that fails leaves it running and no
 * image behind, but for one that fails once it has begun to end the
 * application (SnapshottedWithError, exitCode 6): the image is complete
 * and the application ended. */
export function snapshot(aid: string, opts: SnapshotOptions): Promise<SnapshotResult> {
  return call(opts, () => {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    if (!(timeoutMs > 0)) throw new AppshotError(`timeoutMs ${timeoutMs}: expected a positive number`, ExitCode.usage);
    return snapshotApplication(registry(opts), aid, {
      output: opts.output,
      leaveRunning: opts.leaveRunning ?? false,
      cowCapture: opts.cowCapture,
      full: opts.full ?? false,
      preCopy: opts.preCopy ?? false,
      tcpClose: opts.tcpClose,
      tcpHoldSeconds: opts.tcpHoldSeconds,
      timeoutMs,
      inherited: opts.inherited,
    });
  });
}

/** Brings an image back as a running application in the background
 * (`appshot restore`). A restore that fails leaves nothing behind, but
 * for one that fails after its commit (RestoredWithError, exitCode 6):
 * the application then runs and is registered, and the error's
 * `restored` says what was restored. */
export function restore(image: string, opts: RestoreOptions = {}): Promise<Restored> {
  // Named by its absolute path, as snapshot() names it and as ps shows it
  // ('-', a tar stream on stdin, has none).
  const imagePath = image === '-' ? image : resolve(image);
  const shown = ({ createdDirs: _dirs, lifeline: _lifeline, ...restored }: RestoreResult): Restored => ({ ...restored, image: imagePath });
  return call(opts, async () => {
    if (opts.aid !== undefined) checkAid(opts.aid);
    try {
      return shown(await restoreImage(registry(opts), image, { aid: opts.aid, lazy: opts.lazy ?? false, ...(image === '-' ? {} : { recordImage: imagePath }) }));
    } catch (e) {
      if (e instanceof RestoreFailedAfterCommit) throw new RestoredWithError(e.message, shown(e.restored));
      throw e;
    }
  });
}

/** Turns a snapshot into a template at `output` (`appshot template create`),
 * classifying every resource for cloning. */
export function templateCreate(snapshotImage: string, output: string, opts: TemplateOptions = {}): Promise<TemplateSummary> {
  return call(opts, () => {
    if (opts.name !== undefined) checkAid(opts.name);
    return createTemplate(snapshotImage, output, { rules: opts.rules, name: opts.name });
  });
}

/** Stamps running instances from a template (`appshot clone`), each under
 * its own AID, in milliseconds each. All or nothing, but for a batch that
 * fails after its commit (ClonedWithError, exitCode 6): its instances
 * all run then, listed in the error's `cloned`. */
export function clone(template: string, opts: CloneOptions = {}): Promise<Clone[]> {
  return call(opts, async () => {
    const count = opts.count ?? 1;
    if (!(Number.isInteger(count) && count >= 1 && count <= MAX_CLONES))
      throw new AppshotError(`count ${count}: expected a whole number from 1 to ${MAX_CLONES}`, ExitCode.usage);
    const shown = (made: CloneResult[]): Clone[] => made.map(({ createdDirs: _dirs, ...instance }) => instance);
    try {
      return shown(await cloneTemplate(registry(opts), template, { aid: opts.aid, count, verify: opts.verify, signal: opts.signal }));
    } catch (e) {
      if (e instanceof CloneFailedAfterCommit) throw new ClonedWithError(e.message, shown(e.cloned));
      throw e;
    }
  });
}
