/**
 * The thin client: bin/appshot.js hands a command line to the resident
 * engine of this state directory when one runs, before loading the CLI.
 * Loads only node:net and two small modules, so that a command served by
 * the engine costs a bare Node start and one round trip.
 *
 * Run here, never sent (answer undefined):
 *  - commands that need this process's terminal, environment, stdin or
 *    signals: run, exec, logs -f, wait, check, engine;
 *  - serve --foreground, and a serve with a failure or kill point or
 *    debug output (SERVE_HERE: read from the process's environment while
 *    it runs, and the engine's is not the client's for long). Any other
 *    serve is hosted by the engine (commands/serve.ts), which, with
 *    APPSHOT_ENGINE=auto, is started for it if none runs;
 *  - any command line naming standard input or output ('-', /dev/...,
 *    /proc/self/...): the engine's are not the client's;
 *  - APPSHOT_TEST_KILL_AT (tests kill the process at a point: it must be
 *    this one, not the engine). A stop point (APPSHOT_TEST_STOP_AT) is
 *    sent: an engine started for tests (APPSHOT_TEST_KNOBS=1) stops
 *    there, any other refuses it and the command runs here (server.ts
 *    PROCESS_POINTS), which is also what keeps the engine safe from a
 *    client that sends a kill point itself.
 */
import { existsSync, readFileSync } from 'node:fs';
import { ciVariableSet } from './request.js';
import { connect, type Socket } from 'node:net';
import { enginePaths, defaultHome, refuseUnsafeHome } from '../home.js';
import { buildId, Frame, FrameReader, type Control, type Request } from './protocol.js';

const IN_PROCESS = new Set(['run', 'exec', 'wait', 'check', 'engine']);
/** A serve with one of these set runs here: a failure or kill point, or
 * debug output, aimed at this process (see the engine's settings rule,
 * server.ts handle). */
const SERVE_HERE = ['APPSHOT_TEST_FAIL_AT', 'APPSHOT_TEST_KILL_AT', 'APPSHOT_TEST_STOP_AT', 'APPSHOT_DEBUG'];
/** Commands that start an engine with APPSHOT_ENGINE=auto: those a warm
 * engine makes faster by more than its start costs. */
const STARTS_ENGINE = new Set(['clone', 'restore', 'snapshot']);

/** APPSHOT_ENGINE: `auto` (the default, also when unset), an engine is
 * started on demand; `manual`, one is used if it runs (`appshot engine
 * start`) but none is started; `off`, none is used (bin/appshot.js). */
function startsOnDemand(): boolean {
  return (process.env.APPSHOT_ENGINE || 'auto') === 'auto' && !insideApplication();
}

/** Whether this client runs inside an application (a process of one, its
 * preload library's identity in its environment): an engine it started
 * would inherit that identity (the library's exec puts it back whatever
 * the spawn's environment says), join the application's tables and be
 * stopped, snapshotted or kept alive with it (review r404 F2). Such a
 * client uses an engine that runs, never starts one. */
function insideApplication(): boolean {
  return !!(process.env.APPSHOT_AID || process.env.APPSHOT_TABLES || process.env.APPSHOT_TABLES_FD);
}

/** Whether an engine is starting (it holds its lock, whose file names it,
 * before it listens): a second one would only find the lock taken. */
function engineStarting(lock: string): boolean {
  try {
    const pid = Number(readFileSync(lock, 'utf8').trim());
    return pid > 0 && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('engine/main.js');
  } catch {
    return false;
  }
}

/** serve's options that take a value (its value is no subcommand). */
const SERVE_VALUE_OPTIONS = new Set(['--config', '--metrics', '--log', '--prepared']);

/** Whether `argv` (after `appshot`) is `serve stop`, which stops a serve
 * and hosts none: it never starts an engine, and the engine's rule for
 * what a hosted serve may want (server.ts handle) is not for it. */
export function isServeStop(argv: string[]): boolean {
  const at = argv.findIndex((a) => !a.startsWith('-'));
  if (argv[at] !== 'serve') return false;
  for (let i = at + 1; i < argv.length; i++) {
    if (SERVE_VALUE_OPTIONS.has(argv[i])) i++;
    else if (!argv[i].startsWith('-')) return argv[i] === 'stop';
  }
  return false;
}

/** Whether `argv` (after `appshot`) may be run by the engine. */
export function servedByEngine(argv: string[]): boolean {
  if (process.env.APPSHOT_TEST_KILL_AT) return false;
  const command = argv.find((a) => !a.startsWith('-'));
  if (command !== undefined && IN_PROCESS.has(command)) return false;
  if (command === 'serve' && !isServeStop(argv) && (argv.includes('--foreground') || SERVE_HERE.some((k) => process.env[k] !== undefined))) return false;
  if (command === 'logs' && argv.some((a) => a === '--follow' || /^-[a-zA-Z]*f/.test(a))) return false;
  return !argv.some((a) => a === '-' || a.startsWith('/dev/') || a.startsWith('/proc/self/') || /^--?[a-zA-Z-]+=(-|\/dev\/|\/proc\/self\/)/.test(a));
}

function openSocket(path: string): Promise<Socket | undefined> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    // ENOENT: none runs; ECONNREFUSED: one died without removing it.
    s.once('error', () => resolve(undefined));
  });
}

/** APPSHOT_ENGINE=auto and none runs: `serve` starts one and waits for
 * it (the engine is where a front door lives: `serve -d` then leaves no
 * process of its own), or for one starting already; undefined if none
 * answers (serve then runs here). */
async function engineForServe(home: string): Promise<Socket | undefined> {
  const paths = enginePaths(home);
  if (!engineStarting(paths.lock)) {
    const { startEngine } = await import('./spawn.js');
    await startEngine(home, async () => {
      const s = await openSocket(paths.socket);
      s?.destroy();
      return !!s;
    });
  }
  for (let i = 0; i < 200; i++) {
    const s = await openSocket(paths.socket);
    if (s) return s;
    if (!engineStarting(paths.lock)) return undefined;
    await new Promise((r) => setTimeout(r, 50));
  }
  return undefined;
}

/** Sends `argv` to the engine and relays its output; the exit code, or
 * undefined if the command is to run in this process. */
export async function viaEngine(argv: string[]): Promise<number | undefined> {
  if (!servedByEngine(argv)) return undefined;
  const home = defaultHome();
  // One another user can change is neither talked to (its socket may be
  // theirs) nor given an engine: the CLI refuses it in one line.
  try {
    refuseUnsafeHome(home);
  } catch {
    return undefined;
  }
  const paths = enginePaths(home);
  let socket = await openSocket(paths.socket);
  const command = argv.find((a) => !a.startsWith('-'));
  if (!socket && command === 'serve' && !isServeStop(argv) && startsOnDemand() && existsSync(home)) socket = await engineForServe(home);
  if (!socket) {
    if (startsOnDemand() && command && STARTS_ENGINE.has(command) && existsSync(home) && !engineStarting(paths.lock)) {
      // For the next command: this one runs here, now.
      const { startEngineInBackground } = await import('./spawn.js');
      startEngineInBackground(home);
    }
    return undefined;
  }
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (k.startsWith('APPSHOT_') && v !== undefined) env[k] = v;
  const umask = process.umask();
  const request: Request = {
    kind: 'command',
    argv,
    cwd: process.cwd(),
    env,
    umask,
    tty: { stdout: !!process.stdout.isTTY, stderr: !!process.stderr.isTTY, columns: process.stdout.columns ?? process.stderr.columns },
    ci: ciVariableSet(process.env.CI),
    path: process.env.PATH,
    build: buildId(),
  };
  return new Promise((resolve) => {
    let accepted = false;
    let done = false;
    const finish = (code: number | undefined) => {
      if (done) return;
      done = true;
      socket.destroy();
      resolve(code);
    };
    const reader = new FrameReader((type, payload) => {
      if (type === Frame.ACCEPTED) accepted = true;
      else if (type === Frame.STDOUT) {
        if (!stdoutGone) process.stdout.write(payload);
      }
      else if (type === Frame.STDERR) process.stderr.write(payload);
      else if (type === Frame.EXIT) finish(payload.readInt32BE(0));
      else if (type === Frame.REFUSED) {
        if (process.env.APPSHOT_DEBUG) process.stderr.write(`appshot: the engine refused (${payload.toString()}): running here\n`);
        finish(undefined);
      }
    });
    socket.on('data', (d) => reader.push(d));
    // `appshot inspect IMAGE | head`: a reader that goes away ends the
    // listing, as in the CLI (cli.ts); commands whose standard output
    // carries an image never come here (servedByEngine).
    // The command goes on to its end and its exit code is the client's;
    // what it still prints goes nowhere.
    let stdoutGone = false;
    process.stdout.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code !== 'EPIPE' && !stdoutGone) process.stderr.write(`appshot: standard output: ${e.message}\n`);
      stdoutGone = true;
    });
    process.stderr.on('error', () => undefined);
    const lost = () => {
      if (done) return;
      // Before ACCEPTED the engine did nothing (it was leaving): run here.
      if (!accepted) return finish(undefined);
      process.stderr.write('appshot: the engine went away during the command: its outcome is unknown (see appshot ps)\n');
      finish(70);
    };
    socket.on('error', lost).on('close', lost);
    // Ctrl-C (or SIGTERM) is passed on as the command's interruption (clone
    // stops its batch and removes what it made, exit 130), and the client
    // waits for the outcome; a second one leaves at once.
    let interrupts = 0;
    const onSignal = (sig: NodeJS.Signals) => {
      if (++interrupts > 1) process.exit(sig === 'SIGINT' ? 130 : 143);
      socket.write('interrupt\n');
    };
    process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
    socket.write(JSON.stringify(request) + '\n');
  });
}

/** A control request (`appshot engine status|stop`, `appshot serve
 * stop`): the engine's answer, or undefined if none runs. */
export async function controlEngine(kind: Control['kind'], home = defaultHome()): Promise<Record<string, unknown> | undefined> {
  const socket = await openSocket(enginePaths(home).socket);
  if (!socket) return undefined;
  return new Promise((resolve) => {
    const reader = new FrameReader((type, payload) => {
      if (type === Frame.STATUS) {
        socket.destroy();
        resolve(JSON.parse(payload.toString()) as Record<string, unknown>);
      } else if (type === Frame.REFUSED) {
        socket.destroy();
        resolve({ refused: payload.toString() });
      }
    });
    socket.on('data', (d) => reader.push(d));
    socket.on('error', () => resolve(undefined)).on('close', () => resolve(undefined));
    socket.write(JSON.stringify({ kind } satisfies Control) + '\n');
  });
}

