/**
 * The command being served, when appshot runs as the resident engine.
 *
 * In a CLI process there is one command per process and this is always
 * undefined: output goes to the process's stdout and stderr, the exit code
 * to process.exitCode, and signals end the process. The engine runs many
 * commands at once in one process, so what used to be process-wide (the
 * standard streams, the exit code, --trust-image, "were we interrupted")
 * belongs to the request, found through AsyncLocalStorage from wherever
 * the command's code runs (callbacks and promises included).
 *
 * This module is imported by the command path (cli.ts, trust.ts,
 * format.ts...), so it must stay tiny: no import but Node's own modules.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { accessSync, constants as fsc, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';

export interface RequestContext {
  /** Sends a chunk to the client's stdout (1) or stderr (2). */
  write(stream: 1 | 2, chunk: Buffer): void;
  exitCode?: number;
  /** Whether the client's stdout / stderr is a terminal, and its width. */
  tty: { stdout: boolean; stderr: boolean; columns?: number };
  /** Whether the client's CI variable is set (the engine's environment is
   * not the client's). */
  ci?: boolean;
  /** The client's PATH (the engine's is not the client's). */
  path?: string;
  /** --trust-image of this command. */
  trustImages: boolean;
  /** Called if the client goes away (Ctrl-C, killed) before the end. */
  onDisconnect: Set<() => void>;
  disconnected: boolean;
  /** The client sent its Ctrl-C (the handlers then in onDisconnect were
   * called): for a handler added later, which would miss it. */
  interrupted?: boolean;
  /** The request's lease ($APPSHOT_HOME/engine/leases/NAME, see holder.ts): what
   * it claims for itself is held while the file exists. */
  lease?: string;
  /** What it registered and the ports it claimed under its lease: looked
   * at again when it ends (registry.ts releaseHeldBy). */
  held?: { aids: Set<string>; ports: Set<number> };
  /** The umask the engine's gate set for it (the client's): what a spare
   * state directory's modes are compared with (registry.ts takeSpare).
   * Kept here because process.umask() cannot read the umask without
   * writing it (0, then back), which files the engine's other threads
   * create meanwhile would get. */
  umask?: number;
  /** Lets the engine's context gate go before the request ends (a serve
   * that stays attached to its client: what it needed of the current
   * directory, environment and umask it has read; the commands of other
   * clients must not wait for it to end). */
  leaveGate?: () => void;
  /** The context the engine's gate set for it (current directory,
   * APPSHOT_* environment, umask): `key` says which, `apply` sets it
   * again. What the engine makes for later commands of this context (its
   * pool of clones, template/pool.ts) is made under it, through the gate. */
  context?: RequestSetting;
}

export interface RequestSetting {
  key: string;
  apply: () => void;
  /** Its scoped settings (settings.ts): what what is made for it reads. */
  settings?: ReadonlyMap<string, string>;
}

export const requestStorage = new AsyncLocalStorage<RequestContext>();

export const currentRequest = (): RequestContext | undefined => requestStorage.getStore();

/** process.exitCode for the command being run (it cannot be redefined
 * per request: Node makes it a non-configurable accessor). */
export function setExitCode(code: number): void {
  const r = currentRequest();
  if (r) r.exitCode = code;
  else process.exitCode = code;
}

export function getExitCode(): number | undefined {
  const r = currentRequest();
  if (r) return r.exitCode;
  const c = process.exitCode;
  return c === undefined ? undefined : Number(c);
}

/** Whether the command's stderr is a terminal (the client's, in the engine). */
export function stderrIsTerminal(isattyFd2: () => boolean): boolean {
  const r = currentRequest();
  return r ? r.tty.stderr : isattyFd2();
}

/** The width of the command's terminal, if it has one. */
export function stderrColumns(own: () => number | undefined): number | undefined {
  const r = currentRequest();
  return r ? r.tty.columns : own();
}

/** CI=1, CI=true...: set and not "false" or "0". */
export function ciVariableSet(value: string | undefined): boolean {
  return value !== undefined && value !== '' && value !== '0' && value.toLowerCase() !== 'false';
}

/** Whether the command runs under CI (the client's CI variable). */
export function inCI(): boolean {
  const r = currentRequest();
  return r ? !!r.ci : ciVariableSet(process.env.CI);
}

/**
 * Ctrl-C or SIGTERM of the command. In a CLI process: the signal itself;
 * `handler` runs and the process carries on (or ends, if the handler ends
 * it). In the engine, the client going away stands for it, and only
 * handlers that undo work (`kind: 'abort'`) are installed: a handler that
 * would end the process (`kind: 'exit'`) is not, since the request runs to
 * its end anyway, its own `finally` cleaning up, and the engine must live
 * on. Returns the function that uninstalls it.
 */
export function onInterrupt(kind: 'abort' | 'exit', handler: (sig: NodeJS.Signals) => void): () => void {
  const r = currentRequest();
  if (r) {
    if (kind === 'exit') return () => {};
    const h = () => handler('SIGINT');
    r.onDisconnect.add(h);
    return () => r.onDisconnect.delete(h);
  }
  process.on('SIGINT', handler).on('SIGTERM', handler);
  return () => process.off('SIGINT', handler).off('SIGTERM', handler);
}

/** Where the command looks for the programs it runs (zstd): the client's
 * PATH, in the engine. */
export function commandPath(): string {
  const r = currentRequest();
  return (r ? r.path : process.env.PATH) ?? '';
}

/** The program `name` as `searchPath` (the command's PATH) finds it, if
 * it does. */
export function programOnPath(name: string, searchPath = commandPath()): string | undefined {
  for (const dir of searchPath.split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, fsc.X_OK);
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      /* not here */
    }
  }
  return undefined;
}
