/**
 * The harness (the specification's process_x, FIG. 10): registers the AID,
 * creates its tables and launches the command under the application's
 * supervisor, appshot-init, with the preload library in its environment.
 *
 *   appshot (this)  ── spawns ──>  appshot-init (virtual PID 1, subreaper)
 *                                       └── the command (virtual PID 2) ...
 *
 * init reports over a pipe (fd 3): S when the command was exec'd, E when it
 * could not be, X with the exit code of the first process, R (before X)
 * when a snapshot ended the application. The harness exits with that code,
 * like a foreground runner (0 after a snapshot); init stays as long as any
 * process of the application does (daemons) and then cleans up.
 */
import { currentHolder, harnessOf } from './holder.js';
import { killPoint } from './killpoint.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync, readlinkSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { createInterface } from 'node:readline';
import { isatty } from 'node:tty';
import { basename, join } from 'node:path';
import { hostname } from 'node:os';
import { AppshotError, ExitCode } from './errors.js';
import { addon, type InstanceConfig, paths } from './native.js';
import { type MadeDir, redirLeaves, removeWalked } from './resources/paths.js';
import { checkPrivateTmpRules, hasPrivateTmp, makePrivateTmp, newPrivateRoot, underTmp } from './template/privatetmp.js';
import { instanceConfig, loadRules, type RulesFile } from './template/rules.js';
import { descendantsOf, isSameProcess, readStat } from './procfs.js';
import { CAP, hasCap, ownCreds } from './resources/creds.js';
import { type AppRecord, type Registry, sameRegistration } from './registry.js';

export interface RunOptions {
  aid?: string;
  detach: boolean;
  /** A rules file (templates/README.md): its REDIR PATH and SET ENV apply
   * from the start, and snapshots classify resources by it. */
  rules?: string;
  /** A /tmp of its own (template/privatetmp.ts): /tmp redirected to a
   * directory made for it, removed with its record. */
  privateTmp?: boolean;
  /** Called once the command runs, with its record. */
  onStarted?: (record: AppRecord, vpid: number, pid: number) => void;
  /** Called when a snapshot to `image` ended the application (init reports
   * it): then `run` returns 0, the application having gone into its image
   * rather than failed. */
  onSnapshotted?: (record: AppRecord, image: string) => void;
}

/** Signals the harness passes on to the application. SIGINT and SIGQUIT from
 * a terminal reach the whole foreground process group, the application
 * included, so they are only passed on when there is no terminal. */
/** The shell's convention for a process killed by a signal: 128 + its number. */
export function exitCodeOf(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  return 128 + ((signal && (osConstants.signals as Record<string, number>)[signal]) || 0);
}

const FORWARDED: NodeJS.Signals[] = ['SIGTERM', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH'];
const TERMINAL_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGQUIT'];

/** Passes signals sent to appshot on to `send`; returns the undo. */
function forwardSignals(send: (sig: NodeJS.Signals) => void): () => void {
  // Not process.stdin.isTTY: touching process.stdin opens fd 0 as a libuv
  // stream, which sets O_NONBLOCK on the file description the application
  // shares, and its blocking reads would then fail with EAGAIN.
  const terminal = isatty(0);
  const handlers = new Map<NodeJS.Signals, () => void>();
  for (const sig of [...FORWARDED, ...TERMINAL_SIGNALS]) {
    // Installed even when it does nothing: it stops Node's default of dying.
    const h = TERMINAL_SIGNALS.includes(sig) && terminal ? () => {} : () => send(sig);
    handlers.set(sig, h);
    process.on(sig, h);
  }
  return () => {
    for (const [sig, h] of handlers) process.off(sig, h);
  };
}

/** Environment variables that put a process inside an application. */
export function applicationEnv(record: AppRecord, base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const others = (base.LD_PRELOAD ?? '').split(/[ :]/).filter((p) => p && p !== paths.preload);
  return {
    ...base,
    LD_PRELOAD: [paths.preload, ...others].join(' '),
    APPSHOT_TABLES: record.tables,
    APPSHOT_AID: record.aid,
  };
}

/** The instance section of an application started by `run`: REDIR PATH and
 * SET ENV, evaluated for its AID. Copy-on-write rules do not apply to it:
 * what it writes is what its clones will start from. */
function runConfig(rules: RulesFile | undefined, aid: string): InstanceConfig {
  if (!rules) return { redirs: [], env: [] };
  const c = instanceConfig(rules, { 'application-id': aid, instance: '0', hostname: hostname(), template: '' }, '');
  return { redirs: c.redirs.filter((r) => r.kind === 'path'), env: c.env };
}

function withSetEnv(base: NodeJS.ProcessEnv, env: string[]): NodeJS.ProcessEnv {
  const out = { ...base };
  for (const e of env) out[e.slice(0, e.indexOf('='))] = e.slice(e.indexOf('=') + 1);
  return out;
}

function execFailure(command: string, errno: number): AppshotError {
  const reason = errno === 2 ? 'command not found' : errno === 13 ? 'permission denied' : `error ${errno}`;
  return new AppshotError(
    `cannot run '${command}': ${reason}`,
    errno === 2 ? ExitCode.commandNotFound : ExitCode.notExecutable,
  );
}

export async function run(registry: Registry, command: string[], opts: RunOptions): Promise<number> {
  if (command.length === 0) throw new AppshotError('no command given: appshot run [--aid A] -- cmd args...', ExitCode.usage);
  // A rules file with a mistake is refused before anything is registered.
  const rules: RulesFile | undefined = opts.rules ? loadRules(opts.rules) : undefined;
  // A working directory under /tmp would be the real one, where every
  // absolute path the application names under /tmp is its private one
  // (and a clone would copy the whole directory into its private /tmp).
  const cwd = process.cwd();
  if (opts.privateTmp && underTmp(cwd))
    throw new AppshotError(`--private-tmp: the working directory ${cwd} is under /tmp, which the application would not see as its own: start it from another directory`, ExitCode.usage);
  const fill = (stateDir: string) => ({
    ...(rules ? { rules: { source: basename(opts.rules!), text: rules.text } } : {}),
    command,
    cwd,
    createdAt: new Date().toISOString(),
    // Inherited by init from here, and by the application from init.
    launchKeyring: addon().sessionKeyringSerial(),
    detached: opts.detach,
    ...harnessOf(currentHolder()),
    ...(opts.detach ? { logPath: join(stateDir, 'log') } : {}),
  });
  const record = opts.aid ? registry.register(opts.aid, fill) : registry.registerGenerated(fill);

  let init: ChildProcess | undefined;
  let logFd: number | undefined;
  // Installed before init exists: the application may be up and reporting
  // before this function reaches its first await, and a signal that came in
  // the meantime must be passed on, not kill the harness.
  const stopForwarding = forwardSignals((sig) => {
    try {
      if (init?.pid) process.kill(init.pid, sig);
    } catch {
      /* init already gone */
    }
  });
  // Directories made for REDIR PATH targets: removed if the start fails.
  const madeDirs: MadeDir[] = [];
  // Its private /tmp's directory, made here: removed if the start fails.
  let privateRoot: string | undefined;
  const removePrivateRoot = () => {
    if (privateRoot) removeWalked(privateRoot);
  };
  try {
    const config = runConfig(rules, record.aid);
    if (opts.privateTmp) {
      checkPrivateTmpRules(config.redirs);
      privateRoot = newPrivateRoot(registry.home, record.aid);
      // Recorded before it is made: `appshot rm` of a run killed from
      // here on removes it (registry.ts removeMany).
      record.privateRoot = privateRoot;
      registry.update(record);
      config.redirs.push(makePrivateTmp(privateRoot));
    }
    // Before any is made: another instance's rm leaves what it made
    // while this one leads into it (registry.ts releaseRedirTargets).
    const leaves = redirLeaves(config.redirs);
    if (leaves.length) {
      record.redirLeaves = leaves;
      registry.update(record);
    }
    madeDirs.push(...registry.makeRedirTargets(config.redirs));
    if (madeDirs.length) {
      // For `appshot rm` to remove with the record.
      record.madeDirs = madeDirs;
      registry.update(record);
    }
    addon().setInstance(record.tables, config);
    if (record.logPath) logFd = openSync(record.logPath, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_APPEND, 0o600);
    const stdio = logFd === undefined ? (['inherit', 'inherit', 'inherit', 'pipe'] as const) : (['ignore', logFd, logFd, 'pipe'] as const);
    init = spawn(
      paths.init,
      ['--tables', record.tables, '--state-dir', record.stateDir, '--preload', paths.preload, '--aid', record.aid, '--status-fd', '3', '--', ...command],
      { stdio: [...stdio], detached: opts.detach, env: withSetEnv(process.env, config.env) },
    );
    if (init.pid === undefined) throw new AppshotError(`cannot start ${paths.init}`);
    // Test-only: the application runs, and may print, with no supervisor
    // on record yet (lifecycle.ts requireSignallable).
    killPoint('run: init spawned');
    record.initPid = init.pid;
    record.initStartTime = readStat(init.pid)?.startTime;
    // init removes the registration itself when the command cannot be
    // exec'd, and it may have done so already: its report says why. The
    // write is refused (ENOENT) unless the state directory is still this
    // registration's: another `run` may have registered the AID since, and
    // its record is not this one's to replace (registry.ts update; review
    // r451 F2).
    try {
      registry.update(record);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  } catch (e) {
    stopForwarding();
    // Spawned: init and the application run, and a registration released
    // under them would leave them running without tables, SysV objects or
    // REDIR PATH targets (review r436 A3). Ended first; if some process
    // will not end, init goes on and the registration is kept, its PID
    // recorded, for `appshot rm -f`.
    if (init?.pid !== undefined && !(await endSpawned(init, record.tables))) {
      record.initPid = init.pid;
      record.initStartTime = readStat(init.pid)?.startTime;
      let kept = `its processes did not all end: its registration is kept, for 'appshot rm -f ${record.aid}'`;
      try {
        registry.update(record);
      } catch (u) {
        kept += ` (but its supervisor's PID could not be recorded: ${(u as Error).message})`;
      }
      if (e instanceof Error) e.message += `; ${kept}`;
      throw e;
    }
    // A release that fails (tables unreadable for now: kept for a later
    // rm) must not hide why the start failed, nor skip the rest of the
    // cleanup (review r418 F5).
    let notReleased: Error | undefined;
    try {
      registry.release(record);
    } catch (r) {
      notReleased = r as Error;
    }
    registry.releaseRedirTargets(madeDirs, [record.aid]);
    removePrivateRoot();
    if (notReleased && e instanceof Error) e.message += `; and ${notReleased.message}`;
    throw e;
  } finally {
    if (logFd !== undefined) closeSync(logFd);
  }

  const exited = new Promise<number>((resolve) =>
    init.on('exit', (code, signal) => resolve(exitCodeOf(code, signal))),
  );

  const status = init.stdio[3] as NodeJS.ReadableStream;
  const lines = createInterface({ input: status });
  let snapshottedTo: string | undefined;
  for await (const line of lines) {
    const [tag, a, b] = line.split(' ');
    if (tag === 'R') snapshottedTo = line.slice(2);
    if (tag === 'E') {
      await exited;
      // init removed the registration: nothing names the directory now.
      removePrivateRoot();
      throw execFailure(command[0], Number(a));
    }
    if (tag === 'S') {
      opts.onStarted?.(record, Number(a), Number(b));
      if (opts.detach) {
        lines.close();
        status.removeAllListeners();
        (status as unknown as { destroy(): void }).destroy();
        init.unref();
        stopForwarding();
        return ExitCode.ok;
      }
    }
    if (tag === 'X') {
      // The first process ended. Daemons it left behind stay with init.
      lines.close();
      init.unref();
      stopForwarding();
      if (snapshottedTo !== undefined) {
        opts.onSnapshotted?.(record, snapshottedTo);
        return ExitCode.ok;
      }
      return Number(a);
    }
  }
  // The pipe closed without a verdict: init itself died (SIGKILL, say).
  const code = await exited;
  // Released only once nothing of it runs (settle): a process it started
  // may outlive its init (a daemon, or the first process itself, which
  // SIGKILL of init does not reach), and releasing here removed its SysV
  // objects and tables under it (review r418 F6). Until then it stays for
  // the look that releases an orphaned registration (ps, rm).
  const current = registry.get(record.aid);
  let notSettled = '';
  try {
    if (current && sameRegistration(current, record)) registry.settle(current);
  } catch (e) {
    notSettled = `; its registration is kept (${(e as Error).message})`;
  }
  stopForwarding();
  throw new AppshotError(`the supervisor of '${record.aid}' died (exit ${code})${notSettled}`, code || ExitCode.failure);
}

/** How long a start that failed tries to end what it started. */
const END_SPAWNED_MS = 5_000;

/**
 * Ends a just-spawned init and every process below it, for a start that
 * failed before init's PID was recorded: whether none is left. The
 * application does not die with init, nor init with the harness: init
 * launches the command without a parent-death signal, and without -d both
 * are in the harness's process group, the terminal's, which a group
 * signal would hit too. So
 * init is stopped, then its tree killed, walked again until no process in
 * it is alive: a stopped init cannot launch the command after a walk has
 * found nothing, nor reap what was killed; and as their subreaper it
 * receives the children of those that die, so none leaves the tree the
 * walk reads. Signalled through signalMember (a pidfd, and only a process
 * below init or of its tables): a PID reused meanwhile is not hit. init
 * is killed last and waited for, so that nothing of it races the release
 * that follows.
 */
async function endSpawned(init: ChildProcess, tables: string): Promise<boolean> {
  const pid = init.pid!;
  const gone = init.exitCode !== null || init.signalCode !== null;
  const exited = gone ? Promise.resolve() : new Promise<void>((resolve) => init.once('exit', () => resolve()));
  const SIGKILL = osConstants.signals.SIGKILL;
  const live = () => descendantsOf(pid).filter((p) => isSameProcess(p, undefined));
  try {
    process.kill(pid, 'SIGSTOP');
  } catch {
    /* gone */
  }
  const until = Date.now() + END_SPAWNED_MS;
  for (let left = live(); left.length; left = live()) {
    if (Date.now() > until) {
      try {
        process.kill(pid, 'SIGCONT');
      } catch {
        /* gone */
      }
      return false;
    }
    for (const p of left) addon().signalMember(p, SIGKILL, pid, tables);
    await new Promise((r) => setTimeout(r, 5));
  }
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    /* gone */
  }
  await exited;
  return true;
}

/** What `exec` runs the command under so that it reads the clocks A's
 * processes read: nothing, or nsenter into the time namespace A's init
 * forks them into (a restore made one with the offsets A had,
 * resources/timens.ts). A process outside it would see CLOCK_MONOTONIC
 * and CLOCK_BOOTTIME jump against its siblings', and every later snapshot
 * of A refuse it (one namespace per application). Entering needs
 * CAP_SYS_ADMIN, as making it did. */
function timeNamespaceEntry(record: AppRecord): string[] {
  if (!record.initPid) return [];
  let theirs: string;
  let ours: string;
  try {
    theirs = readlinkSync(`/proc/${record.initPid}/ns/time_for_children`);
    ours = readlinkSync('/proc/self/ns/time');
  } catch {
    return []; // no time namespaces here, or init gone (the exec fails on its own)
  }
  if (theirs === ours) return [];
  if (!hasCap(ownCreds().capEff, CAP.SYS_ADMIN))
    throw new AppshotError(`'${record.aid}' runs in a time namespace of its own (restored with the clock offsets it had): running a command in it needs CAP_SYS_ADMIN`, ExitCode.denied);
  return ['nsenter', `--time=/proc/${record.initPid}/ns/time_for_children`, '--'];
}

/** `appshot exec A -- cmd`: runs cmd inside A's virtual view. */
export async function execIn(registry: Registry, aid: string, command: string[]): Promise<number> {
  if (command.length === 0) throw new AppshotError('no command given: appshot exec A -- cmd args...', ExitCode.usage);
  const record = registry.require(aid);
  // As run refuses it: the command would start in the real /tmp (review
  // r250), while every absolute path it names there is the private one.
  const cwd = process.cwd();
  if (hasPrivateTmp(record) && underTmp(cwd))
    throw new AppshotError(`'${aid}' has a private /tmp, and the working directory ${cwd} is under the real one: run appshot exec from another directory`, ExitCode.usage);
  const env = applicationEnv(record);
  const entry = timeNamespaceEntry(record);
  // nsenter itself runs without the preload library, which would take the
  // system PID in its /proc path for a virtual one; `env` gives it back to
  // the command.
  const argv = entry.length ? [...entry, 'env', `LD_PRELOAD=${env.LD_PRELOAD}`, ...command] : command;
  const child = spawn(argv[0], argv.slice(1), { stdio: 'inherit', env: entry.length ? { ...env, LD_PRELOAD: process.env.LD_PRELOAD ?? '' } : env });
  const stopForwarding = forwardSignals((sig) => child.kill(sig));
  return await new Promise<number>((resolve, reject) => {
    child.on('error', (e: NodeJS.ErrnoException) =>
      reject(execFailure(command[0], e.code === 'ENOENT' ? 2 : e.code === 'EACCES' ? 13 : (e.errno ?? 0))),
    );
    child.on('exit', (code, signal) => {
      stopForwarding();
      resolve(exitCodeOf(code, signal));
    });
  });
}
