/**
 * The resident engine: one long-lived appshot process per state directory
 * ($APPSHOT_HOME), serving the commands of the CLI's thin client
 * (client.ts) on a unix socket, so that they do not pay for a Node start,
 * module loading and compilation, the addon's loading and the opening of
 * templates every time.
 *
 * It runs exactly the CLI's code (cli.ts runCommand), several commands at
 * once: what a CLI process has once per process is the request's here
 * (request.ts: output, exit code, --trust-image, interruption). What is
 * truly process-wide and cannot be per request (the current directory, the
 * environment, the umask) is set for the request by a gate that lets only
 * commands with the same ones run together (ContextGate).
 *
 * Files, in $APPSHOT_HOME/engine/ (0700, this user's):
 *  - lock: flock'd for the engine's whole life; a second engine for the
 *    same directory finds it taken and refuses. The kernel drops it when
 *    the engine ends, however it ends: no stale pid file to guess about.
 *  - engine.sock (0600): the socket. Each connection's peer is checked
 *    with SO_PEERCRED: only this user's processes are served.
 *  - log: what the engine has to say outside any command.
 *  - leases/NAME: one per request being served, removed when it ends: what
 *    the request claims for itself is held while it exists (holder.ts).
 *    One more is made ahead for the next request, holding nothing.
 *  - spares/: state directories made ahead for registrations (registry.ts
 *    enableSpareStateDirs).
 */
import { appendFileSync, chmodSync, closeSync, existsSync, ftruncateSync, lstatSync, mkdirSync, realpathSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { enginePaths, makeHome, refuseUnsafeHome } from '../home.js';
import { ms as roundMs } from '../commands/json.js';
import { addon } from '../native.js';
import { AppshotError, ExitCode, printable } from '../errors.js';
import { buildId, Frame, frame, type Control, type Request } from './protocol.js';
import { currentRequest, requestStorage, type RequestContext } from './request.js';
import { enableTemplateCache, templateCacheStats } from '../template/cache.js';
import { leasesDir, newLeaseName } from '../holder.js';
import { contextDifference, ownContext } from './context.js';
import { keepChecksums } from '../restore/verify.js';
import { enableStandbys, standbyStats } from '../restore/standby.js';
import { clonePoolStats, enableClonePool, refillClonePools, releaseClonePools } from '../template/pool.js';
import { enableSpareStateDirs, LocalRegistry, refillSpareStateDirs, removeSpareStateDirs } from '../registry.js';
import { type HostedServe, hostedServe, hostedStatus, onHostedChange, SERVE_STOP_WHY, stopHosted } from './hosted.js';
import { isServeStop } from './client.js';
import { startedWithTestKnobs } from '../killpoint.js';
import { realEnvironment, scopedOf, scopeEnvironment, withSettings } from './settings.js';
import { SERVE_OWN_SETTINGS } from '../serve/settings.js';

/** How long the clone pool's refill waits for the requests being served
 * to end before it makes its next instance anyway (requestsQuiet). */
const QUIET_WAIT_MOST_MS = 250;
/** How long a leave hurried by a second signal waits, once the serve it
 * hosts has stopped, for its attached client's answer to go out and the
 * other requests to end: a bound (a third signal leaves at once). The
 * clone pool's release is waited for all the same (leaveHurried). */
const HURRIED_EXIT_MS = 1000;
/** How much longer, after HURRIED_EXIT_MS, a hurried leave waits for the
 * clone pool's release (an instance being made is given up only at its
 * hold, and a template's restore may be slow or stuck at a page check):
 * a bound all the same. Past it, what is left of an uncommitted instance
 * dies with its lifeline (init kills it), and its registration and port
 * claims are swept by the next command. */
const HURRIED_POOL_MOST_MS = 5000;

/** APPSHOT_* variables that say which engine, not how a command works.
 * APPSHOT_TEST_KNOBS counts only in a process's start environment
 * (startedWithTestKnobs): a serve hosted by an engine started for tests
 * need not carry it to be hosted. */
const ENGINE_OWN = new Set(['APPSHOT_HOME', 'APPSHOT_ENGINE', 'APPSHOT_ENGINE_IDLE', 'APPSHOT_TEST_KNOBS']);
const settings = (env: Record<string, string | undefined>): Map<string, string> =>
  new Map(Object.entries(env).filter((e): e is [string, string] => e[0].startsWith('APPSHOT_') && !ENGINE_OWN.has(e[0]) && e[1] !== undefined));
/** Test knobs (killpoint.ts; trace.c, the addon's restore and page check
 * read them too): a kill or stop point kills or stops the whole process
 * reaching it, and in the engine that is the process serving every other
 * command and a hosted serve, whatever command set it; a failure point
 * or a hold acts on whatever reaches it while the variable is set, a
 * hosted serve's resume or suspend too (while a command runs, its
 * APPSHOT_* variables are the engine's process.env). Honoured only by an
 * engine started with APPSHOT_TEST_KNOBS=1 (killpoint.ts
 * startedWithTestKnobs); any other refuses a request carrying one, whose
 * client then runs the command itself, the knob acting on the client,
 * and drops those it inherited at its start. By prefix, not a list: a
 * knob added later is covered. */
const isTestKnob = (name: string): boolean => name.startsWith('APPSHOT_TEST_');
// The measuring knobs (APPSHOT_PAGES_*, APPSHOT_SHA_LANES,
// APPSHOT_THREADS_AT_ONCE, APPSHOT_NO_BATCH, APPSHOT_COW_*) stay a
// client's: they choose how a page is written or checked, never what is
// written (their tests compare the results), so a hosted serve's work
// that runs under a command's setting is only as fast or slow as that.
// The clone pool's size and idle time (APPSHOT_CLONE_POOL*) are a
// client's by design: the pool is refilled in the context of the last
// command that asked (template/pool.ts demand), whose instances those are.
// The settings that shape what the engine keeps for everyone (ports,
// standbys, a suspend's reservation, debug output) are read by each
// reader as its own (settings.ts SCOPED_SETTINGS): a command's client's,
// a hosted serve's and the engine's upkeep the engine's own; a serve's
// own settings it reads once as it starts (serve/settings.ts).
const testKnobsIn = (env: Record<string, string | undefined>): string[] => Object.keys(env).filter((k) => isTestKnob(k) && env[k] !== '' && env[k] !== undefined);
/** The names of appshot's variables: all a client sends (client.ts). */
const VARIABLE_NAME = /^APPSHOT_[A-Z0-9_]+$/;

/**
 * A request's variables as process.env will hold them, on which every
 * check is made: Node's env setter cuts a name at a NUL byte, so a name
 * 'APPSHOT_TEST_KILL_AT\0x' passed a check of the exact name and then set
 * APPSHOT_TEST_KILL_AT (and 'APPSHOT_HOME\0' the state directory after
 * its pin; review r395 F1). A name or value with a NUL refuses the
 * request (no client's environment has one: it was made); a name not of
 * appshot's form (lower case, '=', not APPSHOT_) or a value not a string
 * is left out, as nothing of appshot's reads it.
 */
export function requestVariables(raw: unknown): { env: Record<string, string> } | { refused: string } {
  const env: Record<string, string> = {};
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return { env };
  for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
    if (k.includes('\0') || (typeof v === 'string' && v.includes('\0')))
      return { refused: `the client's variable ${JSON.stringify(k.slice(0, 64))} has a NUL byte in its name or value: it runs the command itself` };
    if (VARIABLE_NAME.test(k) && typeof v === 'string') env[k] = v;
  }
  return { env };
}

export interface EngineOptions {
  home: string;
  /** Leave after this long without a request. */
  idleSeconds: number;
  /** Started on demand by a command (APPSHOT_ENGINE=auto): the state
   * directory must exist already; an engine never makes one that was
   * removed meanwhile. */
  onDemand?: boolean;
}

/** Lets commands run together only if they want the same current
 * directory, APPSHOT_* environment and umask, which it then sets for them;
 * a command wanting others waits until those running have ended (and,
 * so that it is not starved, commands arriving after it wait too). */
class ContextGate {
  private current: string | undefined;
  private running = 0;
  private waiting: { key: string; apply: () => void; go: () => void }[] = [];

  /** No command runs or waits. */
  idle(): boolean {
    return this.running === 0 && this.waiting.length === 0;
  }

  async enter(key: string, apply: () => void): Promise<void> {
    if (this.running === 0 && this.waiting.length === 0) {
      // If it cannot be set (the directory is gone), the command fails
      // without having entered.
      this.current = undefined;
      apply();
      this.current = key;
      this.running = 1;
      return;
    }
    if (key === this.current && this.waiting.length === 0) {
      this.running++;
      return;
    }
    await new Promise<void>((go) => this.waiting.push({ key, apply, go }));
  }

  leave(): void {
    if (--this.running > 0) return;
    const next = this.waiting[0];
    if (!next) return;
    try {
      this.switchTo(next.key, next.apply);
    } catch {
      // Its directory is gone: it fails on its own when it runs.
      this.current = undefined;
      this.running = 1;
    }
    // It, and every waiter that wants the same context.
    const same = this.waiting.filter((w) => w.key === next.key);
    this.waiting = this.waiting.filter((w) => w.key !== next.key);
    this.running = same.length;
    for (const w of same) w.go();
  }

  private switchTo(key: string, apply: () => void): void {
    this.current = key;
    this.running = 1;
    apply();
  }
}

export class Engine {
  private readonly paths;
  private server?: Server;
  private lockFd = -1;
  private readonly connections = new Set<Socket>();
  private readonly requests = new Set<RequestContext>();
  private idleTimer?: NodeJS.Timeout;
  /** Its held clones given up (stop): it may leave. */
  private poolReleased = false;
  /** That release, under way since stop. */
  private poolReleasing: Promise<void> = Promise.resolve();
  private leaving = false;
  /** Gone (leave): done resolved. */
  private left = false;
  /** The exit code of a leave hurried by a second signal while a serve
   * it hosts drains (leaveHurried). */
  private hurriedCode?: number;
  /** Requests whose EXIT frame is written but not yet flushed (or their
   * client gone): a hurried leave waits for them, else an attached
   * `serve` client would find the engine gone and its outcome unknown. */
  private answering = 0;
  private served = 0;
  private readonly started = Date.now();
  /** The same, on the monotonic clock: uptimeMs is not moved by a change
   * of the wall clock. */
  private readonly startedMonotonic = performance.now();
  private readonly gate = new ContextGate();
  private readonly uid = process.geteuid?.() ?? -1;
  /** Started with APPSHOT_TEST_KNOBS=1: a client's test knobs
   * (isTestKnob) are honoured. */
  private readonly testKnobs = startedWithTestKnobs();
  /** The engine's own APPSHOT_* settings, as it was started: what the
   * environment is put back to between commands, and what a hosted serve
   * must want (handle). Without the test knobs, no test knob: an engine
   * started on demand inherits the environment of the command that
   * started it, whose knobs were that command's (start drops them from
   * process.env too). */
  private readonly ownSettings = new Map([...settings(process.env)].filter(([k]) => this.testKnobs || !isTestKnob(k)));
  /** Of those, the ones work outside any command reads (settings.ts). */
  private readonly ownScoped = scopedOf(Object.fromEntries(this.ownSettings));
  /** The build this engine runs (protocol.ts), as it was when it started. */
  private readonly build = buildId();
  /** A lease made ahead of the request that takes it (prepareLease). */
  private spareLease?: { name: string; ready: boolean };
  private resolveDone!: (code: number) => void;
  readonly done = new Promise<number>((r) => (this.resolveDone = r));

  constructor(private readonly opts: EngineOptions) {
    this.paths = enginePaths(opts.home);
  }

  log(line: string): void {
    try {
      appendFileSync(this.paths.log, `${new Date().toISOString()} [${process.pid}] ${line}\n`, { mode: 0o600 });
    } catch {
      /* nowhere to say it */
    }
  }

  /** Takes the lock and listens; throws an AppshotError if another engine
   * holds this directory. */
  async start(): Promise<void> {
    const dir = this.paths.dir;
    if (this.opts.onDemand && !existsSync(this.opts.home)) throw new AppshotError(`${this.opts.home} is gone: no engine for it`, ExitCode.notFound);
    // The state directory checked (and made) before anything is made in
    // it: the CLI's own check took one not there yet, which another user
    // may make first in a sticky directory (review 242).
    makeHome(this.opts.home);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const st = lstatSync(dir);
    if (!st.isDirectory() || st.uid !== this.uid)
      throw new AppshotError(`${dir} is not a directory of this user's: the engine will not put its socket there`, ExitCode.failure);
    chmodSync(dir, 0o700);
    this.lockFd = addon().tryLockFile(this.paths.lock);
    if (this.lockFd < 0) throw new AppshotError(`an engine already runs for ${this.opts.home}`, ExitCode.conflict);
    ftruncateSync(this.lockFd, 0);
    writeSync(this.lockFd, `${process.pid}\n`, 0);
    const inherited = this.testKnobs ? [] : testKnobsIn(process.env);
    for (const k of Object.keys(process.env)) if (!this.testKnobs && isTestKnob(k)) delete process.env[k];
    scopeEnvironment(this.ownScoped);
    // The lock is ours: any socket there is a dead engine's, and so are
    // any requests' leases (holder.ts): their requests ended with it.
    rmSync(this.paths.socket, { force: true });
    rmSync(leasesDir(this.opts.home), { recursive: true, force: true });
    mkdirSync(leasesDir(this.opts.home), { mode: 0o700 });
    removeSpareStateDirs(this.opts.home);
    this.prepareLease();
    const server = createServer((s) => this.accept(s));
    this.server = server;
    await new Promise<void>((ok, fail) => {
      server.once('error', fail);
      // umask for the bind: the socket is made 0600, never briefly wider.
      const old = process.umask(0o177);
      server.listen(this.paths.socket, () => {
        process.umask(old);
        server.off('error', fail);
        ok();
      });
    });
    server.on('error', (e) => this.log(`socket error: ${e.message}`));
    this.routeOutput();
    enableTemplateCache();
    keepChecksums();
    enableStandbys();
    enableClonePool(
      (line) => this.log(line),
      // Held clones are made in the context of the command that asked
      // for them, as it would have made them (ports, umask, rules' paths).
      async (setting, make) => {
        await this.gate.enter(setting.key, setting.apply);
        try {
          return await withSettings(setting.settings ?? this.ownScoped, make);
        } finally {
          this.gate.leave();
          this.ownEnvWhenIdle();
        }
      },
      () => this.requestsQuiet(),
    );
    enableSpareStateDirs(this.opts.home);
    onHostedChange(() => {
      // A serve request that waited at the gate, or loaded its code,
      // while the engine began to leave hosts one after stop() looked:
      // stopped as that one would have been (it stops once started),
      // else the engine, its socket gone, would stay for it.
      if (this.leaving && hostedServe()) this.stopHostedServe();
      this.armIdle();
      this.checkDone();
    });
    this.log(`serving ${this.opts.home} (idle timeout ${this.opts.idleSeconds} s)`);
    if (inherited.length) this.log(`${inherited.join(' and ')} of its start environment ignored: an engine honours test knobs only if started with APPSHOT_TEST_KNOBS=1`);
    this.armIdle();
    this.watchSocket();
  }

  /** process.stdout/stderr.write of a command go to its client; outside
   * any command, to the log. */
  private routeOutput(): void {
    for (const [stream, fd] of [[process.stdout, 1], [process.stderr, 2]] as const) {
      stream.write = ((chunk: string | Uint8Array, encoding?: BufferEncoding | ((e?: Error) => void), cb?: (e?: Error) => void): boolean => {
        const callback = typeof encoding === 'function' ? encoding : cb;
        const bytes = typeof chunk === 'string' ? Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8') : Buffer.from(chunk);
        const r = currentRequest();
        if (r) r.write(fd, bytes);
        else this.log(bytes.toString().replace(/\n$/, ''));
        if (callback) process.nextTick(callback);
        return true;
      }) as typeof stream.write;
    }
  }

  /** Leaves as soon as its socket is no longer the one it bound (the state
   * directory was removed, as a test's is, or someone removed the socket):
   * no client can reach it any more, so waiting for the idle time would
   * only keep a process and its cache for nothing. */
  private watchSocket(): void {
    // Told by its whole inode number and device (bigint): a Number rounds
    // one above 2^53, and another file there could pass for it.
    const socketId = () => {
      const st = lstatSync(this.paths.socket, { bigint: true });
      return `${st.dev}:${st.ino}`;
    };
    const bound = socketId();
    const timer = setInterval(() => {
      // The appshot-init processes its restores started, once ended, are
      // its zombies until waited for.
      addon().reapDetached();
      // The page files' buffers kept warm between commands (pages.c): not
      // held through a quiet half minute.
      addon().releaseKeptBuffers(30);
      let now: string | undefined;
      try {
        now = socketId();
      } catch {
        /* gone */
      }
      if (now === bound && !this.leaving) return;
      clearInterval(timer);
      if (!this.leaving) {
        this.log('its socket is gone: leaving');
        void this.stop();
      }
    }, 1000);
    timer.unref();
  }

  private armIdle(): void {
    clearTimeout(this.idleTimer);
    // A hosted serve is work, with or without a client attached.
    if (this.leaving || this.connections.size > 0 || hostedServe()) return;
    this.idleTimer = setTimeout(() => {
      this.log(`idle for ${this.opts.idleSeconds} s: leaving`);
      void this.stop();
    }, this.opts.idleSeconds * 1000);
  }

  private accept(socket: Socket): void {
    clearTimeout(this.idleTimer);
    this.connections.add(socket);
    socket.on('close', () => {
      this.connections.delete(socket);
      this.armIdle();
      this.checkDone();
    });
    // A client that goes away is not the engine's problem (EPIPE, reset).
    socket.on('error', () => {});
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    let peer: { uid: number; pid: number } | undefined;
    try {
      if (typeof fd === 'number' && fd >= 0) peer = addon().peerCredentials(fd);
    } catch {
      /* refused below */
    }
    if (!peer || peer.uid !== this.uid) {
      this.log(`refused a client of uid ${peer?.uid ?? '?'} (pid ${peer?.pid ?? '?'})`);
      socket.end(frame(Frame.REFUSED, Buffer.from('this engine serves only its own user')));
      return;
    }
    let line = '';
    const onData = (d: Buffer) => {
      line += d.toString();
      const nl = line.indexOf('\n');
      if (nl < 0) {
        if (line.length > 1 << 20) socket.destroy();
        return;
      }
      socket.off('data', onData);
      let msg: Request | Control;
      try {
        msg = JSON.parse(line.slice(0, nl)) as Request | Control;
      } catch {
        socket.destroy();
        return;
      }
      void this.handle(socket, msg, peer!.pid);
    };
    socket.on('data', onData);
  }

  private status(): Record<string, unknown> {
    return {
      running: true,
      pid: process.pid,
      home: this.opts.home,
      socket: this.paths.socket,
      uptimeMs: roundMs(performance.now() - this.startedMonotonic),
      idleTimeoutMs: this.opts.idleSeconds * 1000,
      // Deprecated (docs/json.md): whole seconds, not …Ms; idleSeconds is
      // the timeout, not the time idle so far. Kept one more release.
      uptimeSeconds: Math.round((Date.now() - this.started) / 1000),
      idleSeconds: this.opts.idleSeconds,
      commandsServed: this.served,
      commandsRunning: this.requests.size,
      cpu: engineCpu(),
      leaving: this.leaving,
      templateCache: templateCacheStats(),
      standbys: standbyStats(),
      clonePool: clonePoolStats(),
      serving: hostedStatus(),
    };
  }

  private async handle(socket: Socket, msg: Request | Control, peerPid: number): Promise<void> {
    if (msg.kind === 'status' || msg.kind === 'stop') {
      const stopping = msg.kind === 'stop';
      if (stopping) this.log(`asked to stop by pid ${peerPid}`);
      const answer = JSON.stringify({ ...this.status(), ...(stopping ? { leaving: true } : {}) });
      // Answered first: leaving closes every connection without a command.
      socket.end(frame(Frame.STATUS, Buffer.from(answer)), () => stopping && void this.stop());
      return;
    }
    if (msg.kind === 'serve-stop') {
      // Answered once serving has stopped (its ports closed), so that the
      // client can say so; the engine stays.
      const serving = hostedServe();
      let failed: string | undefined;
      if (serving) {
        this.log(`asked to stop the serve it hosts by pid ${peerPid}`);
        await stopHosted(SERVE_STOP_WHY).catch((e: Error) => (failed = e.message));
      }
      socket.end(frame(Frame.STATUS, Buffer.from(JSON.stringify({ ...this.status(), stopped: serving ? serving.services : null, ...(failed ? { failed } : {}) }))));
      return;
    }
    if (msg.kind !== 'command' || !Array.isArray(msg.argv) || typeof msg.cwd !== 'string') {
      socket.destroy();
      return;
    }
    if (this.leaving) {
      socket.end(frame(Frame.REFUSED, Buffer.from('the engine is leaving')));
      return;
    }
    // A client of another build (protocol.ts buildId) runs the command
    // itself: this engine's code may not mean what the client's does.
    if (msg.build !== this.build) {
      const why = `the client is of another build of appshot than the engine (${String(msg.build ?? 'none')}, the engine's ${this.build}): it runs the command itself`;
      this.log(why);
      socket.end(frame(Frame.REFUSED, Buffer.from(why)));
      return;
    }
    // Run here, the command would have the engine's capabilities, filters,
    // limits, namespaces and cgroup, not the client's: one that differs
    // runs it itself (context.ts).
    const difference = contextDifference(ownContext(), peerPid);
    if (difference) {
      socket.end(frame(Frame.REFUSED, Buffer.from(`the client runs in another context than the engine: ${difference}`)));
      return;
    }
    // The state directory the client named is this engine's, and one the
    // client's own check would take: a socket reached through a link (in
    // a directory another user can change) would otherwise have root's
    // command act on whichever of root's state directories that user
    // chose (review 242). Refused, the client runs the command itself,
    // which says why.
    const variables = requestVariables(msg.env);
    if ('refused' in variables) {
      this.log(variables.refused);
      socket.end(frame(Frame.REFUSED, Buffer.from(variables.refused)));
      return;
    }
    const requested = variables.env;
    const named = requested.APPSHOT_HOME || undefined;
    const otherHome = named !== undefined ? notThisHome(resolve(typeof msg.cwd === 'string' ? msg.cwd : '/', named), this.opts.home) : undefined;
    if (otherHome) {
      socket.end(frame(Frame.REFUSED, Buffer.from(otherHome)));
      return;
    }
    // A test knob would act on the engine, and with it on every command
    // it serves and its hosted serve: only an engine started for tests
    // honours one; the client of any other runs the command itself.
    const knobs = this.testKnobs ? [] : testKnobsIn(requested);
    if (knobs.length) {
      socket.end(frame(Frame.REFUSED, Buffer.from(`the client's ${knobs.join(' and ')} would act on the engine, which honours them only if started with APPSHOT_TEST_KNOBS=1: it runs the command itself`)));
      return;
    }
    // A hosted serve reads its APPSHOT_* settings (test knobs, measuring
    // knobs...) from process.env for as long as it runs, and that is each
    // command's in turn, and the engine's own between commands; the
    // scoped ones (settings.ts) are the engine's own for it: only a serve
    // that wants the engine's own is hosted. But for its own settings,
    // which it reads once as it starts (serve/settings.ts).
    if (msg.argv.find((a) => !a.startsWith('-')) === 'serve' && !isServeStop(msg.argv)) {
      const wanted = new Map([...settings(requested)].filter(([k]) => this.testKnobs || !isTestKnob(k)));
      const differs = [...new Set([...wanted.keys(), ...this.ownSettings.keys()])].filter((k) => !SERVE_OWN_SETTINGS.includes(k) && wanted.get(k) !== this.ownSettings.get(k));
      if (differs.length) {
        socket.end(frame(Frame.REFUSED, Buffer.from(`serve's ${differs.join(', ')} differ from the engine's own: it runs in its own process`)));
        return;
      }
    }
    const ctx: RequestContext = {
      write: (stream, chunk) => {
        if (!ctx.disconnected && chunk.length) socket.write(frame(stream === 1 ? Frame.STDOUT : Frame.STDERR, chunk));
      },
      tty: { stdout: !!msg.tty?.stdout, stderr: !!msg.tty?.stderr, columns: msg.tty?.columns },
      ci: msg.ci === true,
      path: typeof msg.path === 'string' ? msg.path : undefined,
      trustImages: false,
      onDisconnect: new Set(),
      disconnected: false,
      lease: newLeaseName(),
    };
    // What the command claims for itself (ports, a registration before its
    // supervisor runs, temporaries) is held while this file exists: until
    // the request ends, not the engine (holder.ts).
    // Made ahead while the engine waited, if it was (a new file costs
    // ~0.4 ms on a busy disk), and left empty: a lease is held by
    // existing, nothing reads what it says (one made now names its
    // client's PID, for whoever looks). Not written into while the
    // command runs: a write off this thread then competes with the
    // command's processes for a core.
    const spare = this.spareLease?.ready ? this.spareLease : undefined;
    if (spare) {
      this.spareLease = undefined;
      ctx.lease = spare.name;
    }
    const leaseFile = join(leasesDir(this.opts.home), ctx.lease!);
    try {
      if (!spare) writeFileSync(leaseFile, `${peerPid}\n`, { mode: 0o600, flag: 'wx' });
    } catch (e) {
      this.log(`cannot make the lease of a request: ${(e as Error).message}`);
      socket.end(frame(Frame.REFUSED, Buffer.from('the engine cannot hold a request now')));
      return;
    }
    const disconnected = () => {
      if (ctx.disconnected) return;
      ctx.disconnected = true;
      for (const h of [...ctx.onDisconnect]) h();
    };
    socket.on('close', disconnected);
    // Anything the client sends after its request is its Ctrl-C.
    socket.on('data', (d) => {
      if (!d.includes('interrupt') || ctx.disconnected) return;
      ctx.interrupted = true;
      for (const h of [...ctx.onDisconnect]) h();
    });
    this.requests.add(ctx);
    this.served++;
    socket.write(frame(Frame.ACCEPTED));
    // Empty test knobs too left out: an engine without them has none.
    const env = Object.fromEntries(Object.entries(requested).filter(([k]) => this.testKnobs || !isTestKnob(k)));
    env.APPSHOT_HOME = this.opts.home;
    delete env.APPSHOT_ENGINE;
    const umask = Number.isInteger(msg.umask) ? msg.umask & 0o777 : 0o022;
    ctx.umask = umask;
    const key = JSON.stringify([msg.cwd, Object.entries(env).sort(), umask]);
    // What it reads of the scoped settings (settings.ts), wherever it is
    // read: its own.
    const scoped = scopedOf(env);
    let entered = false;
    const apply = () => {
      const real = realEnvironment();
      for (const k of Object.keys(real)) if (k.startsWith('APPSHOT_') && k !== 'APPSHOT_ENGINE') delete real[k];
      Object.assign(real, env);
      process.umask(umask);
      process.chdir(msg.cwd);
    };
    ctx.context = { key, apply, settings: scoped };
    try {
      await this.gate.enter(key, apply);
      entered = true;
      ctx.leaveGate = () => {
        if (!entered) return;
        entered = false;
        this.gate.leave();
        this.ownEnvWhenIdle();
      };
      if (process.cwd() !== resolve(msg.cwd)) throw new AppshotError(`cannot change into ${msg.cwd} (the current directory of the command)`, ExitCode.failure);
      const { runCommand } = await import('../cli.js');
      await withSettings(scoped, () => requestStorage.run(ctx, () => runCommand([process.execPath, 'appshot', ...msg.argv])));
    } catch (e) {
      const { reportError } = await import('../cli.js');
      // Reported as the command's own failure would be: with its
      // client's settings (APPSHOT_DEBUG: whether the stack is shown).
      withSettings(scoped, () => requestStorage.run(ctx, () => reportError(e)));
    } finally {
      if (entered) this.gate.leave();
      entered = false;
      this.ownEnvWhenIdle();
      this.requests.delete(ctx);
      const code = Buffer.alloc(4);
      code.writeInt32BE(ctx.exitCode ?? 0);
      // The clones this request took from the pool are made again once
      // its answer is out (flushed to the socket, or the client gone),
      // not while it waits behind them: the answer of a batch that
      // emptied a large pool came ~40 s late, after the refill.
      let refilled = false;
      let answering = false;
      const refillPools = () => {
        if (refilled) return;
        refilled = true;
        if (answering) {
          this.answering--;
          this.checkDone();
        }
        if (!this.leaving) refillClonePools();
        this.noteQuiet();
      };
      if (!ctx.disconnected) {
        answering = true;
        this.answering++;
        socket.end(frame(Frame.EXIT, code), refillPools);
        socket.once('close', refillPools);
      } else setImmediate(refillPools);
      // The request has ended, however (done, failed, its client gone):
      // what it claimed and did not hand to an application goes now.
      rmSync(leaseFile, { force: true });
      try {
        if (ctx.held) new LocalRegistry(this.opts.home).releaseHeldBy(ctx.lease!, ctx.held);
      } catch (e) {
        this.log(`releasing what a request left: ${(e as Error).message}`);
      }
      this.checkDone();
      // The next request's lease, state directories and command line,
      // made now that this one has its answer (the clones it took from
      // the pool once the answer is flushed: refillPools above).
      this.prepareLease();
      if (!this.leaving) {
        try {
          refillSpareStateDirs(this.opts.home);
        } catch (e) {
          this.log(`making spare state directories: ${(e as Error).message}`);
        }
      }
      setImmediate(() => {
        if (this.leaving) return;
        void import('../cli.js').then(
          (cli) => {
            cli.prepareProgram();
            // The young generation emptied while nothing runs (1 MiB, see
            // spawn.ts): what this command left there is collected now,
            // not in the middle of the next (a restore's own allocations
            // fill it once; with the last command's garbage, twice).
            if (this.gate.idle() && typeof gc === 'function') gc({ type: 'minor' });
          },
          () => {},
        );
      });
    }
  }

  /** Those waiting for no request to run (requestsQuiet). */
  private quietWaiters: (() => void)[] = [];

  /** Resolves once no request runs, or after QUIET_WAIT_MOST_MS: the
   * clone pool's refill makes its next instance then, so that a command
   * sent meanwhile is not answered after hundreds of them; bounded, so
   * that a long one (wait, a hosted serve's client) does not stop it. */
  private requestsQuiet(): Promise<void> {
    if (this.requests.size === 0) return Promise.resolve();
    return new Promise<void>((ok) => {
      const go = () => {
        clearTimeout(timer);
        this.quietWaiters = this.quietWaiters.filter((w) => w !== go);
        ok();
      };
      const timer = setTimeout(go, QUIET_WAIT_MOST_MS);
      this.quietWaiters.push(go);
    });
  }

  /** A request ended: those waiting for quiet go if it is. */
  private noteQuiet(): void {
    if (this.requests.size > 0) return;
    for (const go of [...this.quietWaiters]) go();
  }

  /** Between commands, the engine's own APPSHOT_* settings again, not
   * the last command's: a hosted serve works between commands too. */
  private ownEnvWhenIdle(): void {
    if (!this.gate.idle()) return;
    const real = realEnvironment();
    for (const k of Object.keys(real)) if (k.startsWith('APPSHOT_') && !ENGINE_OWN.has(k)) delete real[k];
    for (const [k, v] of this.ownSettings) real[k] = v;
  }

  /** Makes the next request's lease now, off this thread, so that a
   * request does not wait for a new file to be made: a spare lease holds
   * nothing (no claim names it until a request takes it), and goes with
   * the engine (stop, or the next engine's sweep of leases/). */
  private prepareLease(): void {
    if (this.spareLease || this.leaving) return;
    const spare = { name: newLeaseName(), ready: false };
    this.spareLease = spare;
    const path = join(leasesDir(this.opts.home), spare.name);
    writeFile(path, '', { mode: 0o600, flag: 'wx' }).then(
      () => {
        if (this.spareLease === spare && !this.leaving) spare.ready = true;
        else rmSync(path, { force: true });
      },
      () => {
        if (this.spareLease === spare) this.spareLease = undefined;
      },
    );
  }

  /** Stops listening (the socket goes first, so that new clients run
   * commands themselves), lets the commands running end, then leaves. */
  async stop(): Promise<void> {
    if (this.leaving) return;
    this.leaving = true;
    clearTimeout(this.idleTimer);
    rmSync(this.paths.socket, { force: true });
    this.server?.close();
    // The clones it holds go before it does (template/pool.ts).
    this.poolReleasing = releaseClonePools().then(
      () => {
        this.poolReleased = true;
        this.checkDone();
      },
      (e: Error) => {
        this.log(`giving up the clone pool: ${e.message}`);
        this.poolReleased = true;
        this.checkDone();
      },
    );
    // A hosted serve stops as a serve of its own stops at SIGTERM (its
    // attached client, if any, then gets its exit code): then the engine
    // leaves.
    if (hostedServe()) this.stopHostedServe();
    this.checkDone();
  }

  private stopHostedServe(): void {
    this.log('stopping the serve it hosts');
    void stopHosted('the engine is leaving').then(
      () => this.checkDone(),
      (e) => {
        this.log(`stopping the serve it hosts: ${(e as Error).message}`);
        this.checkDone();
      },
    );
  }

  /** The second signal while a serve it hosts stops: that serve ends the
   * connections it forwards now, skipping the rest of its drain, kills
   * its clones and gives up a restore under way, and finishes its stop;
   * the engine leaves once it has and its attached client has its answer
   * and the pool is given up, or HURRIED_EXIT_MS after the serve stopped,
   * whatever requests still run, but not before the pool is given up:
   * leaving in the middle of that would leave an instance being made or
   * given up half removed (its registration, port claims, tables). That
   * release, begun at the first signal, gives up held instances at once
   * and one being made at its hold (a restore of a template's: short),
   * and is waited for HURRIED_POOL_MOST_MS at most; a third signal leaves
   * at once all the same. */
  leaveHurried(serving: HostedServe, code: number): void {
    this.hurriedCode = code;
    serving.hurry();
    void serving.stop('the engine is leaving').finally(() => {
      setTimeout(() => {
        if (!this.poolReleased) this.log(`waiting for the clone pool to be given up before leaving (${HURRIED_POOL_MOST_MS / 1000} s at most)`);
        const poolLate = new Promise<void>((r) => setTimeout(r, HURRIED_POOL_MOST_MS));
        void Promise.race([this.poolReleasing, poolLate]).finally(() => {
          const pool = this.poolReleased ? '' : ' nor for the clone pool to be given up (what is left of it is swept by the next command)';
          this.leave(`left without waiting longer for ${this.requests.size + this.answering} request(s)${pool}`);
          // Now, whatever still runs (a foreground engine's caller would
          // wait for it).
          process.exit(code);
        });
      }, HURRIED_EXIT_MS);
      this.checkDone();
    });
  }

  private checkDone(): void {
    if (!this.leaving || this.requests.size > 0 || hostedServe() || !this.poolReleased) return;
    // Hurried, the process exits as done resolves: the answers written
    // go out first.
    if (this.hurriedCode !== undefined && this.answering > 0) return;
    this.leave('left');
  }

  /** What the engine made for itself goes (its spare lease and state
   * dirs, its lock); `done` resolves, and the process exits with it. */
  private leave(why: string): void {
    if (this.left) return;
    this.left = true;
    // Connections that never sent a request (or only read their answer);
    // hurried, those still running a command (HURRIED_EXIT_MS).
    for (const s of this.connections) s.destroy();
    if (this.spareLease) rmSync(join(leasesDir(this.opts.home), this.spareLease.name), { force: true });
    this.spareLease = undefined;
    try {
      removeSpareStateDirs(this.opts.home);
    } catch {
      /* the next engine's */
    }
    if (this.lockFd >= 0) closeSync(this.lockFd);
    this.lockFd = -1;
    this.log(why);
    this.resolveDone(this.hurriedCode ?? 0);
  }
}

/** The addon's fault guard of table mappings (addon/src/tablesguard.h)
 * must stay SIGBUS's handler: a JS listener for SIGBUS has libuv install
 * its own over it, which only notes the signal and returns to the fault,
 * and every table call is then refused. In the engine, whose table calls
 * serve every command, such a listener is refused where it is added: this
 * listener comes before Node's own (which starts listening to a signal
 * once a listener of it is added), and its throw stops the adding. */
export function refuseSigbusListeners(): void {
  (process as NodeJS.EventEmitter).prependListener('newListener', (event: string | symbol) => {
    if (event === 'SIGBUS') throw new Error("a listener for SIGBUS would take SIGBUS from the tables' fault guard (addon/src/tablesguard.h): refused");
  });
}

/** Runs the engine in this process until it leaves; its exit code. */
export async function serveEngine(opts: EngineOptions): Promise<number> {
  refuseSigbusListeners();
  const engine = new Engine(opts);
  await engine.start();
  // Everything a command loads, loaded now rather than by the first one.
  void import('../cli.js')
    .then(async (cli) => {
      cli.prepareProgram();
      await cli.loadCommandModules();
    })
    .catch((e) => engine.log(`loading the CLI: ${(e as Error).message}`));
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    engine.log(`${sig}: leaving once the running commands end`);
    const code = 128 + (sig === 'SIGINT' ? 2 : 15);
    signals++;
    // A second one: now. But a serve it hosts (stopping since the first)
    // ends its forwarded connections at once, skipping the rest of its
    // drain, and finishes its stop first: leaving mid-drain would leave
    // its clones running and registered, and its state naming it (a
    // serve of its own ignores a second signal). A third: now.
    const serving = hostedServe();
    if (signals === 2 && serving) {
      engine.log('second signal: leaving once the serve it hosts has stopped (its connections ended now)');
      engine.leaveHurried(serving, code);
      return;
    }
    if (signals > 1) engine.log(`${signals === 2 ? 'second' : 'third'} signal: leaving now`);
    if (signals > 1) process.exit(code);
    void engine.stop();
  };
  process.on('SIGTERM', onSignal).on('SIGINT', onSignal);
  process.on('SIGHUP', () => {});
  // A bug in a command must not take the others down: its request gets the
  // error as a command's failure would, the engine lives on.
  process.on('uncaughtException', (e) => {
    const r = currentRequest();
    engine.log(`uncaught: ${(e as Error)?.stack ?? e}`);
    if (r && !r.disconnected) {
      const msg = printable(e instanceof AppshotError ? e.message : `internal error: ${String((e as Error)?.message ?? e).split('\n')[0]}`);
      r.write(2, Buffer.from(`appshot: ${msg}\n`));
      r.exitCode = e instanceof AppshotError ? e.exitCode : ExitCode.internal;
    }
  });
  process.on('unhandledRejection', (e) => engine.log(`unhandled rejection: ${(e as Error)?.stack ?? e}`));
  return engine.done;
}

/** APPSHOT_ENGINE_IDLE, in seconds (default 60). */
/**
 * The CPU time the engine's process has used since it started, to the
 * microsecond (getrusage: every thread, exited ones too; not its
 * children's). A benchmark reads it before and after a command to charge
 * the command what the engine spent on it: /proc/PID/stat counts in clock
 * ticks (10 ms), as much as a whole warm command costs.
 */
function engineCpu(): { userMs: number; systemMs: number } {
  const used = process.cpuUsage();
  return { userMs: used.user / 1000, systemMs: used.system / 1000 };
}

export function idleSecondsFromEnv(): number {
  const v = Number(process.env.APPSHOT_ENGINE_IDLE ?? 60);
  return Number.isFinite(v) && v > 0 ? v : 60;
}

/** Why the state directory a client named, `named`, is not to be served
 * by the engine of `home`: another user can change it or a step on the
 * way (home.ts refuseUnsafeHome), or it is another directory. */
function notThisHome(named: string, home: string): string | undefined {
  try {
    refuseUnsafeHome(named);
    if (realpathSync(named) !== realpathSync(home)) return `the client's state directory ${named} is not the engine's (${home})`;
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}
