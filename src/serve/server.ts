/**
 * The front door of `appshot serve` (issue 15): for each service, a
 * listener on its public ports; each accepted connection goes to an
 * instance with capacity, or is held (paused, in our hands: not reset, not
 * lost) while one is restored or cloned, then forwarded.
 *
 * `ServeHost` owns services and nothing process-wide (no signal handlers,
 * no exit), so that the resident engine can host one (ServeOptions.shared,
 * commands/serve.ts hostInEngine); the CLI's `serve` command is a thin
 * shell around it.
 *
 * Forwarding (forwarder.ts) is a native thread that accepts and shuttles
 * the bytes of every forwarded connection; this module decides where each
 * goes (directly, or through a grant the thread uses until revoked: see
 * grant()) and hears when it opened, was refused or closed. That is clone
 * mode's path (several instances behind one port). Restore mode's one
 * instance takes over the public port instead (shared.ts): serve's
 * listener is installed in it at its restore and it accepts its clients
 * itself, no proxy and no copy; forwarding remains where that listener
 * cannot be shared (fallBack). bench/serve.js measures both.
 */
import { closeSync, existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import type { Server as HttpServer } from 'node:http';
import * as api from '../api.js';
import { imageIdentityOnDisk, type LoadedImage, sameFilesOnDisk, unchangedOnDisk } from '../image/format.js';
import { loadImageChain, restore as restoreImage, RESTORE_INTERRUPTED, RestoredWithError, type RestoreResult, seedCount } from '../restore/driver.js';
import { type ServeSettings, serveSettings } from './settings.js';
import { type HotCode, type HotPages, hotCode, populateCode, populateHeldMappings, type PopulatedMappings, prefaultCap, prefaultPages, prepareChain, recordAtSuspend } from '../restore/prepared.js';
import { enableStandbys, releaseStandbys, standbyPids, warmStandbys } from '../restore/standby.js';
import { addon, ENTRY_FLAGS } from '../native.js';
import { killPoint } from '../killpoint.js';
import { AppshotError, ExitCode } from '../errors.js';
import { keepChecksums } from '../restore/verify.js';
import { enableTemplateCache } from '../template/cache.js';
import { openTemplate } from '../template/template.js';
import { CLONE_INTERRUPTED } from '../template/clone.js';
import { type AppRecord, LocalRegistry, isEnded } from '../registry.js';
import { listProcesses } from '../inspect.js';
import { descendantsOf, descriptorLinks, isSameProcess, readStat } from '../procfs.js';
import { type ForwardEnds, Forwarder, type ListenerEnds, newListenerGroup } from './forwarder.js';
import { ownListenerHolder, SharedListener } from './shared.js';
import { CpuMeter } from './cpu.js';
import type { ServeMetrics } from './metrics.js';
import { type Action, BacklogAge, type Clock, Policy, systemClock } from './policy.js';
import { DEFAULT_MAX_HELD, DEFAULT_PREPARED, type InstanceStateName, type PortMap, type ServiceSpec, ServiceStore, type ServiceState, type Translation } from './spec.js';

/** One structured log line per decision. */
export type LogSink = (entry: Record<string, unknown>) => void;

export const stderrLog: LogSink = (entry) => process.stderr.write(JSON.stringify({ ts: new Date().toISOString(), ...entry }) + '\n');

export interface ServeOptions {
  home: string;
  clock?: Clock;
  log?: LogSink;
  metrics?: ServeMetrics;
  /** How often liveness and idleness are looked at (ms). */
  tickMs?: number;
  /** Restore-mode services kept prepared while suspended (see Prepared),
   * the most recently suspended: DEFAULT_PREPARED unless given;
   * APPSHOT_PREPARED=N overrides it (for comparison runs). */
  prepared?: number;
  /** Hosted by the resident engine (commands/serve.ts hostInEngine): the
   * process is not serve's own. Its standby supervisors are the engine's
   * (kept by it for every restore, and not ended when serve stops), and
   * its threads' malloc arenas are left as the engine has them. */
  shared?: boolean;
}

interface Instance {
  aid: string;
  state: InstanceStateName;
  active: number;
  lastActive: number;
  /** public port → the port the instance really listens on. */
  ports: Map<number, { app: number; system: number }>;
  /** The system PID of the process holding its listening socket
   * (listenerPid), whose end is the instance's crash: the forwarding
   * thread watches it while it holds a grant to the instance. */
  pid?: number;
  /** Its start time, where known (restoredHolder): a PID reused by
   * another process after it ended is not taken for it. */
  pidStart?: number;
  /** Cores its processes used over the last second, measured each tick
   * when the service has a CPU target or a busy-CPU share (cpu.ts). */
  cpu?: number;
  /** Kept from idling by its CPU alone (busyCpu), at the last window. */
  keptBusy?: boolean;
  /** Clock time of its last CPU sample, and the start of the window the
   * last measurement covered (policy.ts InstanceView.cpuFrom). */
  cpuAt?: number;
  cpuFrom?: number;
}

interface Held {
  socket: Socket;
  port: PortMap;
  since: bigint;
  /** The same instant on the policy's clock (maxWaitMs). */
  at: number;
  /** Forward attempts that found the instance refusing. */
  tries: number;
}

/** Of one restore: the virtual PID its image says held the listener on
 * the service's first port (shareWith), whose end is the instance's crash
 * (restoredHolder). One per restore, not the service's: a prepared
 * restore given up may still be reading its image while the next one
 * runs. */
interface ImageHolder {
  vpid?: number;
}

/**
 * A suspended service's next instance restored ahead of time up to the
 * point of resuming (RestoreOptions.hold): its processes made from the
 * image and held stopped under our ptrace, its memory mapped
 * copy-on-write from the page file (a lazy restore: nothing resident but
 * what the kernel and the restore itself need), its descriptors and
 * listening sockets made, nothing committed and nothing run. A connection
 * then only lets it go on (the commit and the resume, ~0.5 ms) instead of
 * restoring (~10 ms).
 *
 * What it costs and how it stays safe:
 * - memory: each held instance has processes (its init, redis with page
 *   tables, stacks, the pages the restore wrote), so only the K most
 *   recently suspended services are held (ServeOptions.prepared); the
 *   others' processes are gone as before;
 * - its listening sockets are bound while it is held (the port is the
 *   instance's anyway; a direct connection waits in the backlog until the
 *   resume), and a port it was allocated is claimed in the registry;
 * - the image it came from must still be the one the service resumes
 *   from, and its files the very ones it was restored from (stat calls at
 *   the release; the other checks of a preloaded image each second while
 *   it is held): if not, or if the release fails (a process of it killed
 *   meanwhile), it is given up and the image restored afresh;
 * - its timers (setitimer, POSIX timers, timerfd) are armed when it is
 *   made, so the time it is held counts toward them, as it does on its
 *   clocks; a restore at the connection arms them then;
 * - nothing of it outlives serve: it is given up at stop (what it made
 *   removed, as after a failed restore), and should serve die, its
 *   processes die with their tracer and init sees its lifeline end.
 */
interface Prepared {
  image: string;
  /** The preloaded chain it was restored from (its page files open). */
  chain: LoadedImage[];
  /** Resolves true once held, false if the restore failed before. */
  held: Promise<boolean>;
  /** Which process its image says held the listener (shareWith). */
  holder: ImageHolder;
  /** Lets the held restore go on (true) or gives it up (false). */
  decide: (go: boolean) => void;
  /** The restore: resolves once resumed; rejects once given up or failed,
   * with what it made removed. */
  done: Promise<RestoreResult>;
}

const O_RDWR = 2;
const O_NONBLOCK = 0o4000;

/** Longest parent chain of suspend images before a full snapshot: each
 * link is read at every restore. */
const MAX_CHAIN = 4;
/** Restores of a shared listener's instance that may fail in a row, a
 * second apart, their clients waiting in its accept queue, before the
 * forwarding front door takes the listener over (fallBack) and a further
 * failure closes them. */
const SHARED_FAILURES = 3;
/** CPU is measured once a second (measureCpu): a 200 ms tick holds
 * too few of /proc's clock ticks. */
const CPU_WINDOW_MS = 1000;
/** Translations kept for `service show`. */
const KEEP_TRANSLATIONS = 50;
/** Services whose next image is kept read and decoded (preload), the
 * most recently suspended: a decoded image is held in this process (redis
 * with 10,000 keys: ~0.5 MiB), and a hundred suspended services must cost
 * next to nothing. The others read theirs when a connection comes.
 * APPSHOT_PRELOADED=N overrides it (0: every image read when a connection
 * comes, as with more services than this). */
const PRELOAD_LIMIT = 8;
/** Memory freed by a burst of work (a restore, a suspend, an image
 * preloaded) goes back to the kernel this long after the last of it
 * (ServeHost.worked). */
const TRIM_AFTER_MS = 500;
/** ...and again this often while nothing is under way: an idle serve's
 * ticks (each service's, every 200 ms) allocate and free too, and what
 * they freed stayed on malloc's free lists until the next burst of work,
 * which a suspended service may not see for hours (bench/serve.js (e),
 * 100 suspended services: the serve process's [heap] 4.4 -> 6.6 MiB of
 * PSS within 31 s of settling; a malloc_trim then gave back 1.4 MiB). */
const IDLE_TRIM_MS = 30_000;
/** What follows a resume but its clients' forwards (the log line, the
 * process to watch, the registry's parent image) waits this long
 * (restoreInstance). */
const AFTER_RESUME_MS = 10;

/** APPSHOT_SERVE_MARKS=1: each `restore` log line carries `marks`, the
 * process.hrtime.bigint() clock (CLOCK_MONOTONIC, ns) at the resume's steps:
 * w the shared listener seen readable, r the restore begun, d the held
 * instance's release decided (its files checked), c committed, e the
 * restore returned; bench/serve.js (BENCH_MARKS=1) sets them beside its
 * connect() and first byte. */
const MARKS = process.env.APPSHOT_SERVE_MARKS === '1';
/** A standby taken by a resume is replaced this long after (standby.ts):
 * not while the resume and its first reply still want the CPU. */
const STANDBY_REFILL_MS = 100;

class Service {
  readonly policy: Policy;
  /** Instances' CPU, for the policy's CPU target. */
  private readonly cpu: CpuMeter;
  private readonly measured = new Set<string>();
  /** When CPU was last measured (performance.now()). */
  private cpuAt = -Infinity;
  readonly instances = new Map<string, Instance>();
  readonly held: Held[] = [];
  readonly listeners: Server[] = [];
  readonly translations: Translation[] = [];
  /** public port → the forwarding thread's listener (forwarder.ts). */
  private readonly grants = new Map<number, number>();
  /** public port → a descriptor of its forwarded listener (a duplicate of
   * the thread's) and the age of what waits in its backlog (policy.ts
   * BacklogAge): connections beyond --max-held wait there unaccepted,
   * and count as waiting. */
  private readonly backlogs = new Map<number, { fd: number; age: BacklogAge }>();
  /** The same for the shared listener while no instance accepts on it. */
  private readonly sharedAge = new BacklogAge();
  /** Connections in the listen backlogs at the last pump. */
  private backlog = 0;
  /** restore mode, one public port: the listener shared with the instance
   * (shared.ts) instead of forwarding, until fallBack. */
  private shared: SharedListener | undefined;
  /** performance.now() before which the shared listener is not watched
   * (after a failed restore: not one restore after another at once). */
  private watchAfter = 0;
  /** Restores that failed in a row while the listener was shared. */
  private sharedFailures = 0;
  /** Shared: the removal of a crashed instance's other processes
   * (crashed), awaited by the next restore. */
  private crashRemoval: Promise<void> | undefined;
  /** restore mode: the image the next restore starts from, and the chain
   * of suspend images it builds on (oldest first; `from` is never ours to
   * delete). */
  lastImage: string;
  chain: string[];
  /** restore mode, while suspended: `lastImage` and its parents read,
   * checked and decoded ahead of the next restore (preload), so that a
   * resume does not spend its first milliseconds on them. Metadata only:
   * the pages stay on disk. */
  private ready: LoadedImage[] | undefined;
  private preloading: Promise<void> | undefined;
  /** restore mode, while suspended: its next instance held ready to
   * resume (Prepared), if it is among the most recently suspended. */
  private prepared: Prepared | undefined;
  counters = { snapshots: 0, restores: 0, crashes: 0 };
  /** restore mode: the seeds its next restore's init starts with, once
   * known (from the preloaded image, or the last restore), so that a
   * standby with as many waits for it while it is suspended. */
  seeds: number | undefined;
  private seq = 0;
  private stateTimer: NodeJS.Timeout | undefined;
  /** close() began: it writes the last state itself. */
  private closing = false;

  constructor(
    readonly spec: ServiceSpec,
    private readonly host: ServeHost,
    /** The forwarding thread's group of this service's listeners. */
    private readonly group: number,
    /** Connections held at most (spec.maxHeld, or less if the descriptor
     * limit says so: ServeHost). */
    readonly maxHeld: number,
  ) {
    this.policy = new Policy(spec, host.clock);
    this.cpu = new CpuMeter();
    const saved = host.store.readState(spec.name);
    const usable = saved?.lastImage && existsSync(saved.lastImage) ? saved : undefined;
    this.lastImage = usable?.lastImage ?? spec.from;
    this.chain = usable ? (saved!.chain ?? [usable.lastImage!]) : [spec.from];
    if (usable) this.counters = { snapshots: saved!.snapshots, restores: saved!.restores, crashes: saved!.crashes };
    // An image is in place only whole (the snapshot renames it there).
    if (spec.mode === 'restore' && saved?.suspending && existsSync(saved.suspending.image)) this.interrupted = saved.suspending;
  }

  /** restore mode: what a suspend under way when the previous serve
   * wrote its state was writing (ServiceState.suspending), whole on
   * disk; adopt() decides whether it is the service's last image. */
  private interrupted: { image: string; chain: string[] } | undefined;
  /** restore mode, while a suspend is under way: its image and the chain
   * it ends (ServiceState.suspending). */
  private suspending: { image: string; chain: string[] } | undefined;

  get name(): string {
    return this.spec.name;
  }

  /** The seed count of a standby this service's next resume would take:
   * restore mode, suspended (or crashed), its count known. */
  standbyWanted(): number | undefined {
    if (this.spec.mode !== 'restore' || this.seeds === undefined) return undefined;
    const state = this.instances.get(this.name)?.state;
    return state === 'suspended' || state === 'crashed' ? this.seeds : undefined;
  }

  private log(event: string, fields: Record<string, unknown> = {}): void {
    this.host.log({ service: this.name, event, ...fields });
  }

  private get reg(): LocalRegistry {
    return new LocalRegistry(this.host.home);
  }

  /** Takes over what a previous `serve` left: restore mode's instance, if
   * it still runs. */
  adopt(): void {
    if (this.spec.mode !== 'restore') return;
    const rec = this.reg.get(this.name);
    const live = rec && !isEnded(rec) && this.reg.settle(rec);
    const interrupted = this.interrupted;
    this.interrupted = undefined;
    // The previous serve's suspend wrote its image whole and the instance
    // is gone: it ended into that image (past the snapshot's point of no
    // return), and the state that should have followed was never written
    // (that serve died, or its writes failed). The image holds every
    // write the instance made: it is the one to resume from, and pruning
    // keeps it. (Still running, the instance was resumed by its failed
    // snapshot, and the image is stale: the next suspend prunes it.)
    if (!live && interrupted) {
      this.lastImage = interrupted.image;
      this.chain = interrupted.chain;
      this.log('suspend-recovered', { instance: this.name, image: interrupted.image });
    }
    if (live) {
      const inst = this.newInstance(this.name, 'running');
      this.fillPorts(inst, live.ports ?? []);
      this.watchListener(inst, this.listenerPid(inst));
      this.log('adopt', { instance: inst.aid });
    } else {
      this.newInstance(this.name, 'suspended');
      // At start, only as many as are kept: the rest would be read to be
      // let go of at once.
      if (this.host.preloadRoom()) this.preload();
    }
  }

  /**
   * Reads and verifies `lastImage` (and its parents) now, while nothing
   * waits for it, and keeps the decoded result for the next restore.
   *
   * Why this is safe: what is kept is what loadImage verified (trusted
   * signature, every part's checksums, well-formed metadata), and the
   * restore uses it only if every part is still the very file that was
   * checked (unchangedOnDisk: device, inode, size, mtime and ctime, which
   * any write, truncate, chmod or replacement moves); otherwise it reads
   * the image again. loadImage also refused an image directory that
   * anyone but its owner (us) or root could change; the service's own
   * suspend images are under its work directory, made 0700. So no one
   * else can change an image between its check and its restore, and a
   * change of our own is noticed. What is not taken ahead of time: this
   * node and the files the image maps, checked at the restore (with the
   * checksums of unchanged libraries kept, see keepChecksums).
   */
  private preload(suspendedNow = false): void {
    if (this.spec.mode !== 'restore') return;
    const path = this.lastImage;
    const known = this.ready ?? [];
    this.host.preloading++;
    const loading = loadImageChain(path, known)
      .then((chain) => {
        // A newer image may have been taken meanwhile (each link holds
        // its page file open: what is not kept is let go of); or serve
        // stopped (close let go of what was read: a preload it did not
        // wait for would hold its page files in a hosting engine after).
        if (this.lastImage !== path || this.closing) {
          for (const l of chain) if (!known.includes(l)) l.dispose();
          return;
        }
        for (const l of known) if (!chain.includes(l)) l.dispose();
        this.ready = chain;
        this.readyCheckedAt = performance.now();
        this.seeds = seedCount(chain[0].image);
        this.ownOptions();
        // Where each inherited page is read from, while nothing waits.
        prepareChain(chain);
        this.host.preloaded(this);
        this.host.warmStandbys();
        this.prepare(suspendedNow);
      })
      .catch((e: Error) => {
        // The restore reads it again and says what is wrong with it.
        if (this.lastImage === path) this.forgetPreload();
        this.log('preload-failed', { image: path, error: e.message });
      })
      .finally(() => {
        this.host.preloading--;
        if (this.preloading === loading) this.preloading = undefined;
        this.host.worked();
      });
    this.preloading = loading;
  }

  private newInstance(aid: string, state: InstanceStateName): Instance {
    const inst: Instance = { aid, state, active: 0, lastActive: this.host.clock.now(), ports: new Map() };
    this.instances.set(aid, inst);
    return inst;
  }

  private fillPorts(inst: Instance, bindings: api.PortBinding[]): void {
    for (const p of this.spec.ports) {
      const b = bindings.find((x) => x.virtual === p.app && x.mode === 'allocate');
      // Shared: the instance listens on the public port itself.
      inst.ports.set(p.public, { app: p.app, system: this.shared ? p.public : b ? b.system : p.app });
    }
  }

  /** Whether the public listener is shared with the instance (shared.ts):
   * restore mode with one public port, unless APPSHOT_SHARE_LISTENER=0
   * (read as serve started: settings.ts). */
  private mayShare(): boolean {
    return this.spec.mode === 'restore' && this.spec.ports.length === 1 && this.host.settings.shareListener;
  }

  /** What the forwarding thread tells of a listener it took over. */
  private listenerEnds(p: PortMap): ListenerEnds {
    return {
      accepted: (socket) => this.accept(socket, p),
      forwarded: (port, client, at) => this.forwardedAtOnce(p, port, client, at),
      died: (port, pid) => this.died(pid),
    };
  }

  /** listen() is done (prepare waits for it). */
  private listened = false;

  async listen(): Promise<void> {
    for (const p of this.spec.ports) {
      // An instance adopted from a previous serve that shared its listener
      // still holds (and accepts on) it: that socket is the public one.
      // (Whatever APPSHOT_SHARE_LISTENER says now: that socket is the
      // public port, and only the instance may accept on it.)
      const adopted = this.spec.mode === 'restore' && this.spec.ports.length === 1 ? this.adoptedListener(p) : undefined;
      const running = this.instances.get(this.name);
      if (adopted !== undefined && running) {
        this.shared = this.sharedListener(adopted, p);
        for (const [pub, m] of running.ports) m.system = pub;
        this.watchListener(running, this.listenerPid(running));
        this.log('listen', { host: p.host, port: p.public, app: p.app, mode: this.spec.mode, shared: true, adopted: true });
        continue;
      }
      // One it forwarded to (a previous serve's, without sharing) listens
      // on its own port: forwarded to as before, for as long as it runs.
      const sharing = this.mayShare() && running?.state !== 'running';
      if (this.mayShare() && !sharing) this.log('share-fallback', { port: p.public, why: 'the running instance adopted listens on its own port', now: 'forwarding' });
      // Bound at once, before its image is read (preload: seconds per GiB,
      // one service after another): no client refused meanwhile. The
      // application's options are given to the listener when the preload
      // has decoded the image (ownOptions, there and below). A client that
      // connects before gets a connection the kernel made with serve's
      // options (Node sets none on a listener: the kernel's defaults, no
      // TCP_NODELAY, no keepalive), which it keeps: it waits in the queue,
      // and the restore it starts (which awaits the preload) gives the
      // application that connection as it is; those after it get the
      // application's options.
      const server = createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => this.accept(socket, p));
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ port: p.public, host: p.host, backlog: 4096 }, () => {
          server.off('error', reject);
          resolve();
        });
      });
      server.on('error', (e) => this.log('listener-error', { port: p.public, error: e.message }));
      if (sharing) {
        // Node's server only bound it: from here the socket is a
        // descriptor of ours, never accepted on (shared.ts).
        const fd = addon().dupFd((server as unknown as { _handle: { fd: number } })._handle.fd);
        server.close();
        this.shared = this.sharedListener(fd, p);
        // If the preload finished first (it has no listener to give them to).
        this.ownOptions();
        this.log('listen', { host: p.host, port: p.public, app: p.app, mode: this.spec.mode, shared: true });
        continue;
      }
      this.listeners.push(server);
      this.watchBacklog(p, (server as unknown as { _handle: { fd: number } })._handle.fd);
      const lid = this.host.forwarder.takeOver(server, this.listenerEnds(p), this.group, this.maxHeld);
      if (lid !== undefined) this.grants.set(p.public, lid);
      this.log('listen', { host: p.host, port: p.public, app: p.app, mode: this.spec.mode });
    }
    this.listened = true;
    this.prepare(false);
  }

  /**
   * Shared, no instance holding it: the listener given the options and
   * backlog of the application's own, as the preloaded image records it
   * (SharedListener.takeOwnOptions), before a client waits in its queue.
   * An image whose application cannot have it is left to the restore,
   * which falls back to forwarding (shareWith); one whose options cannot
   * be set is logged, and the restore says so again if it cannot either.
   */
  private ownOptions(): void {
    const s = this.shared;
    const state = this.instances.get(this.name)?.state;
    if (!s || !this.ready || (state !== 'suspended' && state !== 'crashed')) return;
    try {
      const stale = s.problem(this.ready[0].image) === undefined ? s.takeOwnOptions() : [];
      if (stale.length) this.log('listener-options-stale', { image: this.lastImage, stale });
    } catch (e) {
      this.log('listener-options-failed', { error: (e as Error).message });
    }
  }

  /** Shared, no instance holding it, its next image not read: every
   * option back to a fresh socket's (SharedListener.takeFreshOptions). */
  private freshOptions(): void {
    try {
      const stale = this.shared!.takeFreshOptions();
      if (stale.length) this.log('listener-options-stale', { image: this.lastImage, stale });
    } catch (e) {
      this.log('listener-options-failed', { error: (e as Error).message });
    }
  }

  /** Its backlog looked at from now on (a duplicate of `fd`: the thread's
   * own is its, and Node's server closes its own); without one, the
   * backlog's waiters are not counted, as before. */
  private watchBacklog(p: PortMap, fd: number): void {
    try {
      this.backlogs.set(p.public, { fd: addon().dupFd(fd), age: new BacklogAge(true) });
    } catch (e) {
      this.log('backlog-unknown', { port: p.public, error: (e as Error).message });
    }
  }

  /** Samples the listen backlogs (each pump): how many wait there (the
   * shared listener's apart), and since when the oldest of them (clock
   * time; undefined: none). */
  private sampleBacklogs(now: number): { count: number; shared: number; since: number | undefined } {
    let count = 0;
    let since: number | undefined;
    const look = (n: number, age: BacklogAge) => {
      age.sample(n, now);
      count += n;
      const at = age.oldest();
      if (at !== undefined && (since === undefined || at < since)) since = at;
    };
    for (const b of this.backlogs.values()) {
      let n = 0;
      try {
        n = addon().listenQueue(b.fd);
      } catch {
        // (not a TCP listener any more: nothing counted)
      }
      look(n, b.age);
    }
    const forwarded = count;
    // Shared: the instance accepts on it while it runs, unheard of here;
    // only while none does is what waits there dated.
    const shared = this.shared?.queued() ?? 0;
    if (this.shared) look(this.instances.get(this.name)?.state === 'running' ? 0 : shared, this.sharedAge);
    return { count: forwarded, shared, since };
  }

  /** A SharedListener of our descriptor `fd`, closed if it cannot be made. */
  private sharedListener(fd: number, p: PortMap): SharedListener {
    try {
      return new SharedListener(fd, p.public, p.app, () => this.connectionWaits());
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  /**
   * The listener cannot be shared with this image's application
   * (SharedListener.problem), or its restores keep failing (SHARED_FAILURES,
   * its clients waiting): from now on the front door forwards, as in
   * clone mode, for as long as this serve runs. Only ever while no
   * instance holds it (before a restore): what waits in its accept queue
   * is accepted by the forwarding thread and held for that restore.
   */
  private fallBack(why: string): void {
    const s = this.shared;
    if (!s) return;
    this.shared = undefined;
    const p = this.spec.ports[0];
    this.log('share-fallback', { port: p.public, why, now: 'forwarding' });
    // An instance given it before set its status flags to its own (one open
    // file): a blocking listener would block the forwarding thread's accept,
    // with its lock held (found hung so).
    addon().setStatusFlags(s.fd, O_RDWR | O_NONBLOCK);
    // Its clients held by the forwarder now: serve's queue length again.
    try {
      s.serveBacklog();
    } catch (e) {
      this.log('listener-backlog-failed', { port: p.public, error: (e as Error).message });
    }
    this.watchBacklog(p, s.fd);
    const lid = this.host.forwarder.takeOverFd(s.fd, this.listenerEnds(p), this.group, this.maxHeld);
    if (lid !== undefined) {
      this.grants.set(p.public, lid);
      s.close(true);
      return;
    }
    // No native thread: Node's server accepts on our descriptor.
    s.close(false);
    const server = createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) => this.accept(socket, p));
    server.on('error', (e) => this.log('listener-error', { port: p.public, error: e.message }));
    server.listen({ fd: s.fd });
    this.listeners.push(server);
  }

  /** The running instance's own descriptor of a listener on the public
   * port (one a previous serve installed in it), duplicated here; or
   * undefined if it has none. One it has that this serve cannot take
   * (pidfd_getfd, or /proc/PID/fd, refused: a serve with fewer privileges
   * than the instance, say) is the public port itself, which the instance
   * accepts on: serve can neither bind the port nor forward to it, and
   * says so in one line rather than failing to bind (EADDRINUSE). */
  private adoptedListener(p: PortMap): number | undefined {
    const inst = this.instances.get(this.name);
    if (inst?.state !== 'running') return undefined;
    let procs: ReturnType<typeof listProcesses>;
    let inodes: Set<string>;
    let refused: string | undefined;
    try {
      const reg = this.reg;
      const rec = reg.get(inst.aid);
      if (!rec) return undefined;
      procs = listProcesses(reg, [rec]).filter((x) => !x.init);
      if (!procs.length) return undefined;
      inodes = listeningInodes(procs[0].pid, p.public);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // Gone meanwhile: the public port is bound afresh.
      if (code !== 'EACCES' && code !== 'EPERM') return undefined;
      // Its network namespace cannot be told: if the port listens in
      // ours, it is the instance's (the bind would fail anyway).
      procs = [];
      inodes = new Set();
      for (const family of [2, 10]) for (const ino of addon().tcpListeningInodes(family, p.public)) inodes.add(`socket:[${ino}]`);
      if (inodes.size) refused = `its processes cannot be looked into: ${code}`;
    }
    if (!inodes.size) return undefined;
    for (const x of procs) {
      let links: { fd: string; link: string }[];
      try {
        // A process ended meanwhile has none; a descriptor closed while
        // read is left out, the others looked at.
        links = descriptorLinks(x.pid, true);
      } catch (e) {
        refused ??= (e as Error).message;
        continue;
      }
      for (const d of links) {
        if (!inodes.has(d.link)) continue;
        try {
          return addon().getFd(x.pid, Number(d.fd));
        } catch (e) {
          refused ??= `pidfd_getfd of its fd ${d.fd}: ${(e as Error).message}`;
        }
      }
    }
    if (refused === undefined) return undefined;
    throw new AppshotError(
      `service ${this.name}: its running instance ${inst.aid} holds the public port ${p.public} (the listener a previous serve gave it), and this serve cannot take it over (${refused}); run serve with the privileges of the one that started the instance, or end the instance (appshot rm --force ${inst.aid})`,
      ExitCode.conflict,
    );
  }

  /** Shared listener, instance running: what the instance accepted, from
   * the kernel (serve sees none of it): its connections' count (its
   * activity, for idleness) and a translation for each new one. */
  private sampleShared(inst: Instance): void {
    const s = this.shared;
    if (!s || inst.state !== 'running') return;
    let seen: ReturnType<SharedListener['connections']>;
    try {
      seen = s.connections();
    } catch (e) {
      this.log('connections-unknown', { error: (e as Error).message });
      return;
    }
    const waiting = s.queued();
    const before = inst.active;
    inst.active = seen.count;
    if (seen.count || waiting) inst.lastActive = this.host.clock.now();
    this.host.metrics?.active.set({ service: this.name }, seen.count);
    for (const c of seen.fresh) {
      this.host.metrics?.connections.inc({ service: this.name, outcome: 'shared' });
      this.translations.push({ at: new Date().toISOString(), client: `${c.remote}:${c.port}`, public: s.publicPort, instance: inst.aid, port: s.publicPort, heldMs: 0 });
      if (this.translations.length > KEEP_TRANSLATIONS) this.translations.shift();
    }
    if (seen.fresh.length || before !== seen.count) this.changed();
  }

  /** The restore's options for the shared listener, if this image's
   * application can be given it; otherwise the front door falls back to
   * forwarding (fallBack) and there are none. */
  private shareWith(image: LoadedImage['image'], holder: ImageHolder): ReturnType<SharedListener['restoreOptions']> | { ownListeners: ReadonlySet<string> } {
    const s = this.shared;
    const why = s?.problem(image);
    holder.vpid = s && !why ? s.holderVpid : ownListenerHolder(image, this.spec.ports[0].app);
    if (s && !why) return s.restoreOptions();
    if (why) this.fallBack(why);
    // Forwarding: an image taken while the listener was shared names it
    // by key; the application gets its own listener back, as it was.
    return { ownListeners: new Set(this.spec.ports.map((p) => SharedListener.keyOf(p.app))) };
  }

  private accept(socket: Socket, port: PortMap): void {
    socket.on('error', () => undefined); // a client that resets while held
    // Dated from when it was first seen in the backlog, if it was.
    const at = this.backlogs.get(port.public)?.age.accepted() ?? this.host.clock.now();
    this.held.push({ socket, port, since: process.hrtime.bigint(), at, tries: 0 });
    this.host.metrics?.held.set({ service: this.name }, this.held.length);
    this.pump();
  }

  /** Forwards what can be forwarded, then lets the policy start what the
   * rest waits for. */
  pump(): void {
    const forwarded = this.forwardHeld();
    // Shared: those waiting in the listener's accept queue are held too
    // (by the kernel), for the metrics and the policy alike; but for a
    // second after a failed restore (watchAfter) they ask for none, or
    // this pump (every tick's, the failure's own) would start the next
    // try at once: SHARED_FAILURES in a few milliseconds, the front door
    // given up on a passing failure.
    // Forwarded: those beyond --max-held wait in the listen backlog,
    // unaccepted, and count (and are dated) as waiting too, less those
    // a running instance's room will take as the thread accepts them.
    const now = this.host.clock.now();
    const backlog = this.sampleBacklogs(now);
    this.backlog = backlog.count + backlog.shared;
    let room = 0;
    for (const i of this.instances.values()) if (i.state === 'running') room += Math.max(0, this.spec.concurrency - i.active);
    const queued = backlog.shared + Math.max(0, backlog.count - room);
    const waiting = this.held.length + queued;
    this.host.metrics?.held.set({ service: this.name }, waiting);
    const asking = performance.now() < this.watchAfter ? this.held.length : waiting;
    let heldSince = this.held.reduce<number | undefined>((oldest, h) => (oldest === undefined || h.at < oldest ? h.at : oldest), undefined);
    if (queued && backlog.since !== undefined && (heldSince === undefined || backlog.since < heldSince)) heldSince = backlog.since;
    const actions = this.policy.decide([...this.instances.values()], asking, heldSince);
    const ending = (a: Action) => a.kind === 'suspend' || a.kind === 'drop';
    const applied = this.grant(actions.some(ending)) ? actions : actions.filter((a) => !ending(a));
    this.apply(applied);
    // Written only if something changed: every tick pumps every service,
    // and rewriting each one's state file five times a second was most
    // of an idle serve's CPU (100 suspended services: 500 files a second).
    if (forwarded || applied.length || this.held.length !== this.heldWritten) this.changed();
    this.watchShared();
  }

  /**
   * Shared: a connection came to the listener. No instance runs: the
   * policy restores it. One runs (and accepts it itself): it was active
   * now. Its connections are otherwise seen only at each tick, and a
   * stream of short ones (a client connecting for each request) would
   * look idle and be suspended under load; so while it runs the listener
   * is watched too, but once per tick (tick re-arms it): at most one
   * wake-up of this thread per tick, none per connection.
   */
  private connectionWaits(): void {
    // Called from the addon's poll callback: an exception here would end
    // serve with every service.
    try {
      const inst = this.instances.get(this.name);
      if (inst?.state === 'running') inst.lastActive = this.host.clock.now();
      else {
        if (MARKS) this.marks = { w: process.hrtime.bigint() };
        // Suspended with its next instance held prepared: what the policy
        // would decide (restore mode restores for anyone waiting while no
        // instance lives), decided here without the pump's sampling of
        // every backlog, the policy's look at every instance and the
        // grants, ~0.1-0.2 ms of this thread on this loaded VM with the
        // client waiting. The pump comes after the release, as it does.
        if (inst?.state === 'suspended' && this.prepared && !this.closing && performance.now() >= this.watchAfter) {
          // What the pump's look at the shared backlog would have done
          // (one ioctl): the held gauge shows who waits, and it is dated,
          // for a `waiting` report should the release be slow.
          const waiting = this.shared?.queued() ?? 0;
          this.sharedAge.sample(waiting, this.host.clock.now());
          this.host.metrics?.held.set({ service: this.name }, this.held.length + waiting);
          void this.restoreInstance();
          return;
        }
        this.pump();
      }
    } catch (e) {
      this.log('watch-failed', { error: (e as Error).message });
    }
  }

  /** Shared: the listener watched for a waiting connection while no
   * instance would accept it (suspended, crashed), so that one arriving
   * restores it at once. */
  private watchShared(): void {
    const state = this.instances.get(this.name)?.state;
    if (!this.shared || (state !== 'suspended' && state !== 'crashed') || this.closing) return;
    if (performance.now() < this.watchAfter) return;
    this.shared.watch();
  }

  /** Forwards the held connections the policy routes to an instance, in
   * order; whether it forwarded any. `reportLater`: what a connection's
   * connect reports (its record, the metrics) waits for a microtask (see
   * committedEarly). */
  private forwardHeld(reportLater = false): boolean {
    let forwarded = false;
    while (this.held.length) {
      const h = this.held[0];
      if (h.socket.destroyed) {
        this.held.shift();
        continue;
      }
      const route = this.policy.route([...this.instances.values()]);
      if (!('forward' in route)) break;
      this.held.shift();
      this.forward(h, this.instances.get(route.forward)!, reportLater);
      forwarded = true;
    }
    return forwarded;
  }

  /** held.length when changed() was last called. */
  private heldWritten = 0;

  private forward(h: Held, inst: Instance, reportLater = false): void {
    const target = inst.ports.get(h.port.public)!;
    inst.active++;
    inst.lastActive = this.host.clock.now();
    this.host.forwarder.forward(h.socket, target.system, this.ends(inst, target.system, h.port, h.since, () => `${h.socket.remoteAddress}:${h.socket.remotePort}`, h), reportLater);
  }

  /**
   * The forwarding thread's grant on each listener (forwarder.ts): the
   * instance the policy routes to now and how many more connections it
   * takes, forwarded without waiting for this event loop; none while
   * connections are held (they go first) or when `revoke` (an instance is
   * about to be suspended or dropped). Whether every connection forwarded
   * under a grant has been accounted for: if not, nothing is suspended or
   * dropped until it has (its report is on its way, with another pump).
   */
  private grant(revoke: boolean): boolean {
    let whole = true;
    for (const p of this.spec.ports) {
      const lid = this.grants.get(p.public);
      if (lid === undefined) continue;
      const route = revoke || this.held.length ? undefined : this.policy.route([...this.instances.values()]);
      const inst = route && 'forward' in route ? this.instances.get(route.forward) : undefined;
      const target = inst?.ports.get(p.public);
      const granted = this.host.forwarder.route(lid, target?.system ?? 0, inst && target ? this.spec.concurrency - inst.active : 0, inst?.pid);
      if (granted > 0) whole = false;
    }
    return whole;
  }

  /** A connection the thread forwarded under the grant, to `port`. */
  private forwardedAtOnce(p: PortMap, port: number, client: string, at: bigint): ForwardEnds {
    this.backlogs.get(p.public)?.age.accepted();
    const inst = [...this.instances.values()].find((i) => i.ports.get(p.public)?.system === port);
    if (inst) {
      inst.active++;
      inst.lastActive = this.host.clock.now();
      this.changed();
    }
    return this.ends(inst, port, p, at, () => client);
  }

  /** What becomes of a forwarded connection: records, counts, and a
   * refused one (only ever one this side forwarded: `held`) back in line. */
  private ends(inst: Instance | undefined, port: number, pub: PortMap, since: bigint, client: () => string, h?: Held): ForwardEnds {
    return {
      connected: (at) => {
        const heldMs = Number(at - since) / 1e6;
        this.host.metrics?.heldSeconds.observe({ service: this.name }, heldMs / 1000);
        this.host.metrics?.connections.inc({ service: this.name, outcome: 'forwarded' });
        this.host.metrics?.active.inc({ service: this.name });
        this.translations.push({
          at: new Date().toISOString(),
          client: client(),
          public: pub.public,
          instance: inst?.aid ?? '?',
          port,
          heldMs: Math.round(heldMs * 1000) / 1000,
        });
        if (this.translations.length > KEEP_TRANSLATIONS) this.translations.shift();
        this.changed();
      },
      closed: (bytes) => {
        if (inst) {
          inst.active--;
          inst.lastActive = this.host.clock.now();
          this.changed();
        }
        this.host.metrics?.active.dec({ service: this.name });
        this.host.metrics?.forwardedBytes.inc({ service: this.name, direction: 'to-instance' }, bytes.toInstance);
        this.host.metrics?.forwardedBytes.inc({ service: this.name, direction: 'to-client' }, bytes.toClient);
        this.pump();
      },
      refused: (code) => {
        if (!inst || !h) return;
        inst.active--;
        // Serve stops (drain ended it while it connected): nothing more
        // is held.
        if (this.closing) {
          h.socket.destroy();
          return;
        }
        // Refused: the instance died (crash) or is not listening yet. The
        // client has been told nothing: it goes back to the head of the line.
        h.tries++;
        const dead = !this.alive(inst);
        if (dead) this.crashed(inst, `connect: ${code}`);
        if (h.tries > 20) {
          this.log('give-up', { instance: inst.aid, port, error: code });
          this.host.metrics?.connections.inc({ service: this.name, outcome: 'failed' });
          h.socket.destroy();
          return;
        }
        this.held.unshift(h);
        if (dead) this.pump();
        else setTimeout(() => this.pump(), 20 * h.tries);
      },
    };
  }

  /** The forwarding thread saw the process of an instance it had a grant
   * for end (and revoked the grant): a crash, handled now rather than at
   * the next tick or refused connect. */
  private died(pid: number): void {
    const inst = [...this.instances.values()].find((i) => i.pid === pid);
    if (!inst) return;
    this.crashed(inst, `process ${pid} ended`);
    this.pump();
  }

  /**
   * The process the instance's life is judged by: the one (lowest virtual
   * PID) holding the socket that listens on its first port, which is not
   * virtual PID 2 for a server that daemonizes. If it ends the instance
   * has crashed, even if another process still holds a copy of the socket
   * (a forked helper): nothing may accept on it any more. undefined if
   * none is found (unwatched: the tick and refused connects find a crash).
   */
  private listenerPid(inst: Instance): number | undefined {
    try {
      const reg = this.reg;
      const rec = reg.get(inst.aid);
      const port = inst.ports.values().next().value?.system;
      if (!rec || !port) return undefined;
      const procs = listProcesses(reg, [rec])
        .filter((p) => !p.init)
        .sort((x, y) => x.vpid - y.vpid);
      if (!procs.length) return undefined;
      const inodes = listeningInodes(procs[0].pid, port);
      if (!inodes.size) return undefined;
      // One that ended meanwhile has none.
      for (const p of procs) if (descriptorLinks(p.pid).some((d) => inodes.has(d.link))) return p.pid;
    } catch {
      // No /proc, or the application ended meanwhile.
    }
    return undefined;
  }

  /**
   * The system PID of virtual PID `vpid` of a restored or cloned
   * instance, the process its image (or its template's) says held the
   * listener, as its tables bind
   * it: not looked for among the processes that hold the listener now
   * (listenerPid), since this runs after the clients were answered and a
   * kill meanwhile would leave a helper's copy to be taken for it. If it
   * has ended already (its binding gone once reaped), the instance has
   * crashed; a zombie's PID is returned and the tick sees it.
   */
  private restoredHolder(inst: Instance, vpid: number): number | undefined {
    const rec = this.reg.get(inst.aid);
    const tables = rec && this.reg.readTables(rec);
    // The application gone altogether: the tick finds it so (alive).
    if (!tables) return undefined;
    const e = tables.tables.pid.find((x) => x.virtual === vpid && !(x.flags & ENTRY_FLAGS.thread));
    // A zombie not yet reaped by its parent has ended: a crash now. Taken
    // for alive, it was watched by nothing in clone mode (no forwarding
    // grant for it yet), and the crash went unseen.
    const st = e && readStat(e.system);
    if (e && st && st.state !== 'Z') {
      inst.pidStart = st.startTime;
      return e.system;
    }
    this.crashed(inst, `virtual process ${vpid} ended`);
    return undefined;
  }

  /** After a restore or a clone, the process the instance is watched by:
   * the one its image says held the listener (`vpid`: restoredHolder), or
   * where the image says none, the one found holding it now
   * (listenerPid). Not for an instance suspended or crashed meanwhile. */
  private watchHolder(inst: Instance, vpid: number | undefined): void {
    if (inst.state !== 'running') return;
    if (vpid !== undefined) inst.pid = this.restoredHolder(inst, vpid);
    else this.watchListener(inst, this.listenerPid(inst));
  }

  /** The process found holding the instance's listener (listenerPid) is
   * the one watched, with its start time: a PID reused after it ended is
   * not taken for it. */
  private watchListener(inst: Instance, pid: number | undefined): void {
    inst.pid = pid;
    inst.pidStart = pid === undefined ? undefined : readStat(pid)?.startTime;
  }

  /** Whether the instance's application still runs. */
  private alive(inst: Instance): boolean {
    try {
      const reg = this.reg;
      const rec = reg.get(inst.aid);
      return !!rec && !isEnded(rec) && !!reg.settle(rec);
    } catch {
      return false;
    }
  }

  private crashed(inst: Instance, why: string): void {
    if (inst.state !== 'running') return;
    this.counters.crashes++;
    this.host.metrics?.crashes.inc({ service: this.name });
    // Its ended registration goes when it is restored (restoreInstance),
    // so that the AID can be taken again; a clone's goes now.
    if (this.spec.mode === 'restore') {
      inst.state = 'crashed';
      // Shared: its other processes (workers, forked helpers) hold the
      // public listener too and would go on accepting from its queue, a
      // half application serving while the restore never comes (its watch
      // never fires while they drain it). They go now.
      if (this.shared) this.crashRemoval = api.rm(inst.aid, { home: this.host.home, force: true }).then(() => undefined, () => undefined);
      // The listener has the options the instance left on it, which may
      // be some its image has not (set after it was taken): the image's
      // again, before the next client's connection is made with them and
      // waits for the restore from that image (logged after: a client
      // told of the crash finds them so). Not read yet: when it has been.
      if (this.shared && this.ready) this.ownOptions();
      else if (this.shared) {
        // Not read yet: until it is, a fresh socket's options, as before
        // serve's first read of an image (a client queued meanwhile gets
        // those, not what the crashed instance set).
        this.freshOptions();
        if (!this.preloading && this.host.preloadRoom()) this.preload();
      }
      this.host.warmStandbys();
    }
    else {
      // Not running any more for whoever still holds it (a clone being
      // judged after its clone: cloneInstance): judged once.
      inst.state = 'crashed';
      this.instances.delete(inst.aid);
      void api.rm(inst.aid, { home: this.host.home, force: true }).catch(() => undefined);
    }
    // The forwarding thread's grant to it goes now, before the crash is
    // told (the log line, the state file): a client that comes once it
    // is must be held for the restore, not sent at once by the thread to
    // what is left of the instance, whose helper's copy of the listener
    // takes the connect and never answers (nothing else then asks for a
    // restore). It went at the next pump, a window a loaded machine opens
    // (serve-listenopts.test.ts, forwarding). Granted elsewhere if
    // another instance runs.
    this.grant(false);
    this.log('crash', { instance: inst.aid, why, next: this.spec.mode === 'restore' ? `restore from ${this.lastImage}` : 'drop' });
    this.changed();
  }

  /** Whether an instance is being started, suspended or stopped. */
  busy(): boolean {
    for (const i of this.instances.values()) if (i.state === 'starting' || i.state === 'suspending' || i.state === 'stopping') return true;
    return false;
  }

  /** Every tick: dead instances noticed, the CPU of running ones measured
   * (with a CPU target), idle ones suspended or dropped. */
  tick(): void {
    this.checkPrepared();
    this.checkReady();
    for (const inst of this.instances.values()) this.sampleShared(inst);
    // Shared, no forwarding thread watches the process holding the
    // listener (listenerPid): its end is the instance's crash, looked for
    // here, even if a helper of it still holds a copy that nobody accepts
    // on (what waits in the queue then waits for the restore).
    // Not shared, the forwarding thread watches it only once it has a
    // connection for it: one that died before (right after its restore or
    // clone) is seen here too.
    for (const inst of this.instances.values())
      if (inst.state === 'running' && inst.pid && !isSameProcess(inst.pid, inst.pidStart)) this.crashed(inst, `process ${inst.pid} ended`);
    if (this.shared && this.instances.get(this.name)?.state === 'running') this.shared.watch();
    for (const inst of this.instances.values()) if (inst.state === 'running' && inst.active === 0 && !this.alive(inst)) this.crashed(inst, 'gone');
    if (this.spec.cpuTarget || this.spec.busyCpu) this.measureCpu();
    this.pump();
  }

  private measureCpu(): void {
    // Once a window, not every tick: the registry is read for each
    // instance, and a figure over less would be too coarse to judge by.
    const now = performance.now();
    if (now - this.cpuAt < CPU_WINDOW_MS) return;
    this.cpuAt = now;
    // Instances gone since (dropped, crashed): their series go too.
    for (const aid of this.measured)
      if (this.instances.get(aid)?.state !== 'running') {
        this.measured.delete(aid);
        this.cpu.forget(aid);
        this.host.metrics?.cpu.remove({ service: this.name, instance: aid });
        const inst = this.instances.get(aid);
        if (inst) inst.cpu = inst.cpuAt = inst.cpuFrom = undefined;
      }
    for (const inst of this.instances.values()) {
      const initPid = inst.state === 'running' ? this.reg.get(inst.aid)?.initPid : undefined;
      if (initPid === undefined) continue;
      this.measured.add(inst.aid);
      inst.cpu = this.cpu.sample(inst.aid, initPid, now);
      // The first sample covers no window (cpu.ts: 0 at the first).
      inst.cpuFrom = inst.cpuAt;
      inst.cpuAt = this.host.clock.now();
      this.keepIfBusy(inst);
      this.changed();
      this.host.metrics?.cpu.set({ service: this.name, instance: inst.aid }, inst.cpu);
    }
  }

  /** With a busy-CPU share: an instance that used at least that much over
   * the last window counts as active now (its idle time starts again), and
   * the start of such a stretch without connections is logged once. */
  private keepIfBusy(inst: Instance): void {
    const busyCpu = this.spec.busyCpu;
    if (!busyCpu || inst.cpu === undefined) return;
    const busy = inst.cpu >= busyCpu;
    if (busy) {
      inst.lastActive = this.host.clock.now();
      if (!inst.keptBusy && inst.active === 0) this.log('busy', { instance: inst.aid, cpu: Math.round(inst.cpu * 100) / 100, busyCpu });
    }
    inst.keptBusy = busy && inst.active === 0;
  }

  private apply(actions: Action[]): void {
    // Stopping: nothing more is started, suspended or dropped. A clone
    // started for `min` while close() stopped the others (a tick, a
    // finished clone pumping) was made after its list was taken, and
    // outlived serve.
    if (this.closing) return;
    for (const a of actions) {
      if (a.kind === 'start') {
        if (a.reason === 'wait') this.host.metrics?.waits.inc({ service: this.name, decision: 'start' });
        void (this.spec.mode === 'restore' ? this.restoreInstance() : this.cloneInstanceTracked(a.reason));
      } else if (a.kind === 'report') {
        // Nothing more can be started for them (restore mode, or at --max):
        // said, for whoever watches the log or the metrics.
        this.host.metrics?.waits.inc({ service: this.name, decision: 'report' });
        this.log('waiting', { waitedMs: Math.round(a.waitedMs), waiting: a.waiting, held: this.held.length, backlog: this.backlog, instances: [...this.instances.values()].map((i) => `${i.aid} ${i.state}`) });
      } else if (a.kind === 'suspend') void this.suspend(this.instances.get(a.aid)!, a.idleMs);
      else void this.drop(this.instances.get(a.aid)!, a.idleMs);
    }
  }

  /** Lets go of the preloaded image (ServeHost keeps preloadLimit). */
  forgetPreload(): void {
    if (!this.ready) return;
    const chain = this.ready;
    this.ready = undefined;
    const dispose = () => chain.forEach((l) => l.dispose());
    // A prepared restore reads their page files until it is held (and
    // maps them): they go once it has ended.
    const p = this.prepared;
    if (p?.chain === chain) {
      void this.dropPrepared('its image let go');
      void p.done.then(dispose, dispose);
    } else dispose();
  }

  /**
   * Restores the next instance ahead of time and holds it (Prepared), if
   * the service is suspended with its image preloaded and ServeHost has
   * room (the K most recently suspended: one suspended now gives up the
   * oldest's to make room; at serve's start, the first K preloaded are).
   * The restore runs now, while no connection waits; one that comes
   * meanwhile waits for it to be held, then lets it go on.
   */
  private prepare(suspendedNow: boolean): void {
    if (this.spec.mode !== 'restore' || this.prepared || this.closing) return;
    if (this.instances.get(this.name)?.state !== 'suspended') return;
    // Not before the public listener exists: it may be the instance's
    // (shared.ts). listen() prepares once it does.
    if (!this.listened) return;
    const chain = this.ready;
    if (!chain || chain[0].dir !== this.lastImage) return;
    // A registration of the AID (a crash's, ended) is removed by the
    // resume itself.
    if (this.reg.get(this.name)) return;
    if (!this.host.makePreparedRoom(this, suspendedNow)) return;
    let decide!: (go: boolean) => void;
    const decision = new Promise<boolean>((r) => (decide = r));
    let heldNow!: (held: boolean) => void;
    const held = new Promise<boolean>((r) => (heldNow = r));
    const t0 = process.hrtime.bigint();
    const lazy = !this.host.settings.preparedEager;
    const prefault = lazy ? prefaultPages(chain, this.host.prefaultCap, this.prefaulted) : undefined;
    // What a full image (no parent to compare with) goes by next.
    if (prefault) this.prefaulted = prefault.addresses;
    // Held with the public listener installed: connections wait in its
    // accept queue, and its release lets the instance accept them.
    const holder: ImageHolder = {};
    const done = restoreImage(this.reg, this.lastImage, {
      inheritFor: (image) => this.shareWith(image, holder),
      aid: this.name,
      // Its memory mapped from the page file, nothing copied (what it
      // holds while suspended: redis with 10,000 keys 1.1 MiB of PSS);
      // APPSHOT_PREPARED_EAGER=1 copies it in (3.5 MiB), which spares the
      // resumed application the copy-on-write faults of its first pages
      // (~0.7 ms of (c), README) and the next suspend storing it whole.
      lazy,
      // But for the pages its previous run wrote (up to 1 MiB), which it
      // is likely to write again at once: each a copy-on-write fault
      // after the release otherwise (prepared.ts prefaultPages).
      ...(prefault ? { prefault: prefault.pages } : {}),
      preloaded: chain,
      // No signal (ServeHost.hurrying): with one, the restore turns the
      // event loop before it registers the instance (its first point
      // where it looks), and `prepared` would be shown (state, service
      // show) of an instance not registered yet. A hurried stop gives it
      // up at its hold instead (dropPrepared, releasePrepared).
      // Committed after a release (the processes not let go yet): running
      // from here, and the held connections forwarded at once.
      committed: (record) => this.committedEarly(record),
      hold: (made) => {
        heldNow(true);
        this.host.worked();
        // The code its previous run executed mapped in (prepared.ts
        // populateCode), a slice at a time, while it stays held: each
        // page a fault after the release otherwise. Logged once done.
        // (Logged even if a resume let it go meanwhile: it was held.)
        if (this.prepared !== p) {
          // (but its suspend records what it touches, for the next one)
          if (this.host.settings.preparedPopulate) recordAtSuspend(made);
          return decision;
        }
        const held = process.hrtime.bigint();
        const logged = (code: number, populated?: PopulatedMappings) => this.log('prepared', { instance: this.name, image: p.image, ms: Math.round(Number(held - t0) / 1e4) / 100, prefaulted: prefault?.count ?? 0, code, codeMs: Math.round(Number(process.hrtime.bigint() - held) / 1e4) / 100, ...(populated ? { populated } : {}) });
        // And the pages of its page file, code and data its previous run
        // touched (prepared.ts populateHeldMappings), with
        // APPSHOT_PREPARED_POPULATE=1; its suspend records them.
        const populating = this.host.settings.preparedPopulate ? populateHeldMappings(made, () => this.prepared === p, prefault?.addresses).catch((e: Error): PopulatedMappings => ({ pages: 0, written: 0, failed: 1, error: e.message, ms: 0 })) : undefined;
        const code = this.hotCode ? this.populateHeld(this.hotCode, () => this.prepared === p) : 0;
        void Promise.all([code, populating]).then(([c, populated]) => logged(c, populated));
        return decision;
      },
    });
    const p: Prepared = { image: this.lastImage, chain, held, holder, decide, done };
    this.prepared = p;
    this.changed();
    done.catch((e: Error) => {
      heldNow(false);
      this.host.worked();
      if (this.prepared !== p) return; // given up on purpose, or released
      this.prepared = undefined;
      this.host.unprepared(this);
      this.changed();
      this.log('prepare-failed', { instance: this.name, image: p.image, error: e.message });
    });
  }

  /** The code pages the instance had mapped at its last suspend
   * (prepared.ts hotCode), for the next prepare to map in
   * (populateHeld); only with APPSHOT_PREPARED_CODE=1: it spares redis
   * ~40 faults and ~0.1-0.6 ms of CPU after its release, but (c) did not
   * come out faster in 5 runs on the loaded machine (README). */
  private hotCode: HotCode | undefined;

  /** The processes of the instance registered as this service's AID (its
   * init's descendants); none if it has no init. */
  private instanceProcesses(): number[] {
    const init = this.reg.get(this.name)?.initPid;
    return init ? descendantsOf(init) : [];
  }

  /** Maps `hot` into the held instance's processes while `keepOn`; the
   * pages mapped. */
  private async populateHeld(hot: HotCode, keepOn: () => boolean): Promise<number> {
    try {
      return await populateCode(this.instanceProcesses(), hot, keepOn);
    } catch {
      return 0; // a cost, never a failure: it faults them in itself
    }
  }

  /** The pages the last prepare copied in ahead, by process and address
   * (prepared.ts prefaultPages): the next prepare of a full image, which
   * has no parent to tell what its run wrote, copies in those it stores. */
  private prefaulted: HotPages | undefined;

  /** When the preloaded image (ready) was last checked in full: loaded,
   * or checkReady, or a resume's check. */
  private readyCheckedAt = -Infinity;

  /** Once a second, the checks of the preloaded image that are not stat
   * calls (unchangedOnDisk: who may change it, whether its signer is still
   * trusted), so that a resume within the second after makes only the
   * stat calls (sameFilesOnDisk), and its restore (preloadedTrusted) too,
   * where both made every check (a signature a link, twice: ~0.4-0.8 ms
   * with the client waiting on this machine). Failing, it is let go of,
   * and the next resume reads the image afresh. A prepared instance's
   * chain is checkPrepared's. */
  private checkReady(): void {
    const now = performance.now();
    if (!this.ready || this.prepared?.chain === this.ready || now - this.readyCheckedAt < 1000) return;
    if (this.ready.every(unchangedOnDisk)) this.readyCheckedAt = now;
    // A restore under way may be reading it (its page files, held open):
    // only no longer trusted then, and let go of at the next tick after.
    else if (this.instances.get(this.name)?.state === 'starting') this.readyCheckedAt = -Infinity;
    else this.forgetPreload();
  }

  /** When the held instance's image was last checked in full (checkPrepared). */
  private preparedCheckedAt = -Infinity;

  /** Once a second, the checks a restore makes of a preloaded image that
   * are not stat calls (unchangedOnDisk: who may change it, whether its
   * signer is still trusted), for the held instance, which the release
   * lets go on after stat calls alone: failing, it is given up. */
  private checkPrepared(): void {
    const p = this.prepared;
    const now = performance.now();
    if (!p || now - this.preparedCheckedAt < 1000) return;
    this.preparedCheckedAt = now;
    if (p.chain.every(unchangedOnDisk)) return;
    // The preloaded image, if it is the same: no resume trusts it on stat
    // calls any more (checkReady's second), it failed the check just now.
    if (p.chain === this.ready) this.readyCheckedAt = -Infinity;
    void this.dropPrepared('its image changed, or is no longer trusted');
  }

  /** Gives up the held instance (what it made removed); resolves once it
   * has been. */
  async dropPrepared(why: string): Promise<void> {
    const p = this.prepared;
    if (!p) return;
    this.prepared = undefined;
    this.host.unprepared(this);
    this.changed();
    p.decide(false);
    await p.done.catch(() => undefined);
    this.log('unprepared', { instance: this.name, why });
  }

  /** The held instance let go on, if it is held for the image the service
   * resumes from, unchanged; undefined if there is none or it could not
   * be (given up: the caller restores afresh). */
  private async releasePrepared(): Promise<{ restored: RestoreResult; chain: LoadedImage[]; holder: ImageHolder } | undefined> {
    const p = this.prepared;
    if (!p) return undefined;
    this.prepared = undefined;
    this.host.unprepared(this);
    // The very files it was restored from, unchanged: stat calls only.
    // Who may change them and whether their signer is still trusted are
    // checked each second while it is held (tick), not here with the
    // client waiting (~1 ms for a chain of 4: a signature each).
    // Hurried to stop meanwhile (the signal may have come after the
    // restore's last point where it looks): given up, not committed.
    const current = (await p.held) && !this.host.hurrying.signal.aborted && p.image === this.lastImage && p.chain.every(sameFilesOnDisk);
    this.mark('d');
    p.decide(current);
    try {
      return { restored: await p.done, chain: p.chain, holder: p.holder };
    } catch (e) {
      // Committed, then a step failed: it runs, and is the instance.
      if (e instanceof RestoredWithError) return { restored: this.incomplete(e), chain: p.chain, holder: p.holder };
      if (current) this.log('prepared-failed', { instance: this.name, error: (e as Error).message });
      return undefined;
    }
  }

  /** A restore that failed after its commit left the instance running and
   * registered (restore/driver.ts): it is served, the failure logged. */
  private incomplete(e: RestoredWithError): RestoreResult {
    this.log('restore-incomplete', { instance: this.name, error: e.message });
    return e.restored;
  }

  /** Set by committedEarly for the restore under way: how many held
   * connections it forwarded (the `restore` log line's `held`). */
  private early: { held: number } | undefined;

  /** APPSHOT_SERVE_MARKS: the resume under way's marks (MARKS). */
  private marks: Record<string, bigint> | undefined;
  private mark(step: string): void {
    if (MARKS) (this.marks ??= {})[step] = process.hrtime.bigint();
  }

  /**
   * A released prepared instance, committed, its processes about to be let
   * go (the driver's `committed`): made running and the held connections
   * forwarded now, not once the restore has returned and its registration
   * been read again. The forwarding thread connects to its listening
   * socket (the handshake completes in the backlog) and passes the
   * request on while this thread lets the processes go; they find it
   * waiting. The commit is made, so a connection forwarded now is the
   * instance's as if it had come a moment after the resume.
   */
  private committedEarly(record: AppRecord): void {
    this.mark('c');
    const inst = this.instances.get(this.name);
    if (!inst || inst.state !== 'starting' || this.closing) return;
    try {
      inst.ports.clear();
      this.fillPorts(inst, record.ports ?? []);
      inst.state = 'running';
      inst.lastActive = this.host.clock.now();
      this.early = { held: this.held.length };
      // Only the connects now. Their records and metrics, the state file,
      // the policy's next decisions and the thread's grant wait for a
      // microtask: the driver goes on from here to let the processes go
      // without returning to the event loop, and each of those is time
      // between the commit and the instance's first instruction, with its
      // clients waiting (a connection that comes meanwhile is held, and
      // forwarded by that pump).
      this.forwardHeld(true);
      queueMicrotask(() => {
        this.changed();
        this.pump();
      });
    } catch (e) {
      this.log('forward-failed', { instance: this.name, error: (e as Error).message });
    }
  }

  /** The restored instance running, bound to its ports. */
  private running(inst: Instance, ports: api.PortBinding[]): void {
    inst.ports.clear();
    this.fillPorts(inst, ports);
    inst.state = 'running';
    inst.lastActive = this.host.clock.now();
    this.changed();
  }

  /** The restore under way (restoreInstance), for close() to await. */
  private restoring: Promise<void> | undefined;

  private restoreInstance(): Promise<void> {
    const p = this.restoreInstanceNow();
    this.restoring = p;
    void p.finally(() => {
      if (this.restoring === p) this.restoring = undefined;
    });
    return p;
  }

  private async restoreInstanceNow(): Promise<void> {
    const inst = this.instances.get(this.name) ?? this.newInstance(this.name, 'suspended');
    const from = inst.state;
    inst.state = 'starting';
    inst.pid = undefined;
    inst.pidStart = undefined;
    this.changed();
    const t0 = process.hrtime.bigint();
    this.mark('r');
    const home = this.host.home;
    // Shared: those waiting in the listener's queue are the ones held.
    const queuedAtStart = this.shared?.queued() ?? 0;
    try {
      // Held ready (Prepared): let go on. Otherwise restored now.
      this.early = undefined;
      const prepared = await this.releasePrepared();
      if (!prepared && this.early) {
        // Made running by committedEarly, yet not handed back: since a
        // failure after the commit comes back as the instance
        // (RestoredWithError), only if the driver changes that. Then:
        // restored afresh below, as
        // 'starting', so that a forward refused meanwhile waits for it
        // (not a crash that starts a second restore beside this one), and
        // judged by its own registration, not by the dead one's commit.
        this.early = undefined;
        inst.state = 'starting';
        this.changed();
      }
      // The crash's removal of what was left of it (shared) ends before
      // anything is registered under its AID again.
      if (this.crashRemoval) await this.crashRemoval;
      this.crashRemoval = undefined;
      // A crashed instance's registration (ended, or half-released).
      const old = prepared ? undefined : this.reg.get(this.name);
      if (old) await api.rm(this.name, { home, force: true }).catch(() => undefined);
      // A preload under way is the reading the restore would do itself
      // (not waited out once hurried: it has no point to be given up at).
      if (!prepared && this.preloading) await untilAborted(this.preloading, this.host.hurrying.signal);
      // (A prepared one let go on has committed: it stands, hurried or not.)
      if (!prepared && this.host.hurrying.signal.aborted) throw new AppshotError(RESTORE_INTERRUPTED, ExitCode.interrupted);
      // Not the files it checked any more: read afresh by the restore, and
      // let go of (their page files are held open). A prepared one's were
      // checked by its release.
      // Checked in full within the last second (checkReady): stat calls.
      const recent = performance.now() - this.readyCheckedAt < 1000;
      const ready = prepared ? prepared.chain : this.ready?.[0]?.dir === this.lastImage && this.ready.every(recent ? sameFilesOnDisk : unchangedOnDisk) ? this.ready : undefined;
      if (!ready) this.forgetPreload();
      else if (!prepared && !recent) this.readyCheckedAt = performance.now();
      // The restore need not check again what was checked just now; a
      // retry (below, after awaits) only if nothing failed it meanwhile and
      // still within the second.
      // Whether the listener can be shared is decided on the image the
      // restore reads (shareWith).
      const holder: ImageHolder = prepared?.holder ?? {};
      const restoreNow = () => restoreImage(this.reg, this.lastImage, { inheritFor: (image) => this.shareWith(image, holder), aid: this.name, lazy: false, preloaded: ready, preloadedTrusted: performance.now() - this.readyCheckedAt < 1000, signal: this.host.hurrying.signal });
      const restored =
        prepared?.restored ??
        (await restoreNow().catch(async (e: Error) => {
          if (e instanceof RestoredWithError) return this.incomplete(e);
          // Another service's prepared instance may hold what this one
          // needs (its port: services of one image, run one at a time):
          // those are given up and the restore tried once more.
          if (!(await this.host.dropOthersPrepared(this))) throw e;
          this.log('retry', { instance: this.name, error: e.message, why: 'prepared instances of other services given up' });
          return restoreNow();
        }));
      this.seeds = restored.seeds;
      this.mark('e');
      const marks = this.marks;
      this.marks = undefined;
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      // Read, not settled: settling looks at its processes and tables
      // (~2 ms), and it was made just now. The ports it was bound to.
      // Set meanwhile by committedEarly (the driver called it).
      const early = this.early as { held: number } | undefined;
      this.early = undefined;
      let rec = early ? undefined : this.reg.get(this.name);
      if (!early && (!rec || isEnded(rec))) throw new Error('it ended as soon as it was resumed');
      if (!early) this.running(inst, rec!.ports ?? []);
      this.counters.restores++;
      const held = (early ? early.held : this.held.length) + queuedAtStart;
      // The held go first, even before the decision's log line and the
      // metric (their clients wait); then the thread's grant gets the
      // process to watch, and the record learns its parent image (read
      // again: ~10 ms), long before the next suspend needs it. Those wait
      // AFTER_RESUME_MS: the resumed application, the forwarding thread
      // and the clients answer their first requests meanwhile, and on two
      // cores this thread's /proc reads and file writes would compete with
      // them for the CPU.
      this.pump();
      killPoint('serve: resumed');
      await new Promise((r) => setTimeout(r, AFTER_RESUME_MS));
      this.host.metrics?.restoreSeconds.observe({ service: this.name }, ms / 1000);
      this.sharedFailures = 0;
      this.log('restore', { instance: this.name, image: this.lastImage, was: from, ms: Math.round(ms * 100) / 100, held, standby: restored.fromStandby, prepared: !!prepared, ...(marks ? { marks: Object.fromEntries(Object.entries(marks).map(([k, v]) => [k, String(v)])) } : {}) });
      // What the restore went on without (the CLI's warnings): never silent.
      if (restored.notKept.length) this.log('not-kept', { instance: this.name, image: this.lastImage, notKept: restored.notKept });
      this.watchHolder(inst, holder.vpid);
      // (restoredHolder may have found it crashed.)
      const still = (inst.state as InstanceStateName) === 'running';
      this.pump();
      if (still && early) rec = this.reg.get(this.name);
      if (still && rec && !isEnded(rec)) await this.trackFrom(rec, ready?.[0]).catch((e: Error) => this.log('track-failed', { instance: this.name, error: e.message }));
      // Another suspended service may want what this one took.
      this.host.warmStandbys();
    } catch (e) {
      inst.state = from === 'crashed' ? 'crashed' : 'suspended';
      this.changed();
      this.forgetPreload(); // the next try reads the image afresh
      // Given up as serve was hurried to stop (ServeHost.hurrying): what
      // it made is removed, its image as it was. Only that failure: any
      // other (one after its commit, a bad image) keeps its own name,
      // hurried or not.
      const interrupted = e instanceof AppshotError && e.message === RESTORE_INTERRUPTED;
      this.log(interrupted ? 'restore-interrupted' : 'restore-failed', { instance: this.name, image: this.lastImage, error: (e as Error).message });
      // Shared: those waiting in the accept queue wait on; the next try
      // in a second, not at once. After SHARED_FAILURES in a row, the
      // forwarding front door takes the listener (fallBack): it accepts
      // what waits and holds it for the next restore, whose failure closes
      // them, as below; clients are told, not left waiting for ever.
      if (this.closing) {
        // Stopping: no next try (the next serve restores it on demand).
      } else if (this.shared && ++this.sharedFailures >= SHARED_FAILURES) {
        this.fallBack(`${this.sharedFailures} restores in a row failed: ${(e as Error).message}`);
      } else if (this.shared) {
        this.watchAfter = performance.now() + 1000;
        setTimeout(() => this.pump(), 1000).unref();
      }
      // Those waiting would wait for ever: they are told by a close.
      for (const h of this.held.splice(0)) {
        this.host.metrics?.connections.inc({ service: this.name, outcome: 'failed' });
        h.socket.destroy();
      }
    }
    this.host.worked();
    this.pump();
  }

  /** The next snapshot of the restored instance builds on the image it
   * came from (pages compared with it), so a suspend writes only what
   * changed; every MAX_CHAIN links a full one keeps restores short. */
  private async trackFrom(rec: ReturnType<LocalRegistry['require']>, preloaded?: LoadedImage): Promise<void> {
    if (preloaded) {
      this.reg.update({ ...rec, lastImage: { path: this.lastImage, id: preloaded.manifest.imageId } });
      return;
    }
    const { loadImage } = await import('../image/format.js');
    const loaded = await loadImage(this.lastImage);
    try {
      this.reg.update({ ...rec, lastImage: { path: this.lastImage, id: loaded.manifest.imageId } });
    } finally {
      loaded.dispose();
    }
  }

  /** suspend() is reading what the application's own listener was. */
  private learning = false;
  /** What suspend() read of an adopted instance's image that did not tell
   * what the application's own listener was: the image, its chain's files
   * as they were then (chainOnDisk), and why. The same image, unchanged,
   * says the same: not read again each idle period (reading and verifying
   * a chain is a restore's reading, seconds for GiB). Another image, or
   * one changed on disk since (made readable again, replaced), is read
   * again. (A key trusted since is not noticed until then: serve's
   * restart reads it.) */
  private unlearnt: { image: string; onDisk: string; why: string } | undefined;

  /** The files of the service's chain as they are on disk now. */
  private chainOnDisk(): string {
    return [...new Set([...this.chain, this.lastImage])].map(imageIdentityOnDisk).join('\n');
  }

  private async suspend(inst: Instance, idleMs: number): Promise<void> {
    // Shared: a client may have connected since the last sample (the
    // instance accepted it, or it waits in the queue): not idle then.
    if (this.shared) {
      this.sampleShared(inst);
      if (inst.active || this.shared.queued()) {
        inst.lastActive = this.host.clock.now();
        return;
      }
      // Adopted from a previous serve: what the application's own
      // listener was is read from the image it was restored from.
      if (!this.shared.knowsOriginal) {
        if (this.learning) return; // (the policy asks again each tick)
        const image = this.lastImage;
        const onDisk = this.chainOnDisk();
        const known = this.unlearnt?.image === image && this.unlearnt.onDisk === onDisk ? this.unlearnt : undefined;
        let why: string | undefined = known?.why;
        if (!known) {
          this.learning = true;
          await loadImageChain(image)
            .then((chain) => {
              try {
                why = this.shared?.problem(chain[0].image);
              } finally {
                chain.forEach((l) => l.dispose());
              }
            })
            .catch((e: Error) => (why = e.message))
            .finally(() => (this.learning = false));
          this.unlearnt = this.shared && !this.shared.knowsOriginal ? { image, onDisk, why: why ?? 'its image names none' } : undefined;
        }
        if (inst.state !== 'running' || this.closing || !this.shared) return;
        // Still unknown: not suspended. Its image would record the
        // listener with nothing true to say of it, and a plain restore
        // makes the application's listener again from that record (a
        // guess would be the wildcard: an application that listened on
        // 127.0.0.1 back on every interface). It runs on, asked again
        // after another idle period.
        if (!this.shared.knowsOriginal) {
          inst.lastActive = this.host.clock.now();
          this.log('suspend-deferred', { instance: inst.aid, why: `what the application's own listener was is not known: ${why ?? 'its image names none'} (${this.lastImage})`, now: 'running' });
          return;
        }
      }
    }
    inst.state = 'suspending';
    this.changed();
    const dir = join(this.host.store.workDir(this.name), 'images');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const output = join(dir, `${Date.now()}-${++this.seq}`);
    const full = this.chain.length >= MAX_CHAIN;
    // Written before the snapshot may end the processes, so that a serve
    // that dies before writing what follows (or whose writes fail) is
    // followed by one that resumes from this image, not from the one
    // before it (losing every write since) while pruning this one. Not
    // written, no suspend: the instance keeps running.
    this.suspending = { image: output, chain: full ? [output] : [...this.chain, output] };
    try {
      if (this.stateTimer) clearTimeout(this.stateTimer);
      this.stateTimer = undefined;
      this.writeState(true);
    } catch (e) {
      this.suspending = undefined;
      inst.state = 'running';
      inst.lastActive = this.host.clock.now();
      this.changed();
      this.host.metrics?.snapshots.inc({ service: this.name, result: 'failed' });
      this.log('suspend-failed', { instance: inst.aid, error: `its state could not be written first: ${(e as Error).message}`, now: inst.state });
      this.pump();
      return;
    }
    // The code it has run, for the next prepare (hotCode): read while it
    // still runs, before the snapshot ends it.
    if (this.spec.mode === 'restore' && this.host.preparedLimit > 0 && this.host.settings.preparedCode) {
      try {
        this.hotCode = hotCode(this.instanceProcesses());
      } catch {
        this.hotCode = undefined;
      }
    }
    const t0 = process.hrtime.bigint();
    let r: { parent?: string };
    let incomplete = undefined as Error | undefined;
    try {
      // Nothing held by a keeper: a suspended service may sleep longer than
      // any hold, and a connection only a keeper could carry (to a process
      // outside, or without TCP repair) makes the suspend fail instead,
      // the instance left running.
      // The shared listener is serve's: recorded by key, not dumped, and
      // what comes meanwhile waits in its queue for the next restore.
      r = await api.snapshot(inst.aid, { home: this.host.home, output, full, tcpHoldSeconds: 0, inherited: this.shared?.snapshotOptions() }).catch((e: unknown) => {
        // Ended all the same, its image whole (the snapshot driver, past
        // its point of no return): suspended into it, the failure logged.
        if (!(e instanceof api.SnapshottedWithError)) throw e;
        incomplete = e;
        return { parent: e.parent };
      });
    } catch (e) {
      // The snapshot driver leaves the application running when it fails;
      // its partial output is no image of the service (lastImage and the
      // chain are still the previous ones).
      this.suspending = undefined;
      inst.state = this.alive(inst) ? 'running' : 'crashed';
      inst.lastActive = this.host.clock.now();
      this.changed();
      if (output !== this.lastImage && !this.chain.includes(output)) rmSync(output, { recursive: true, force: true });
      this.host.metrics?.snapshots.inc({ service: this.name, result: 'failed' });
      this.log('suspend-failed', { instance: inst.aid, error: (e as Error).message, now: inst.state });
      this.host.worked();
      this.pump();
      return;
    }
    // From here the image is the application (its processes ended into
    // it, with every write since the previous image): whatever fails next
    // is bookkeeping, logged, and the service stays suspended on it.
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    this.chain = r.parent && !full ? [...this.chain, output] : [output];
    this.lastImage = output;
    this.suspending = undefined;
    inst.state = 'suspended';
    inst.ports.clear();
    inst.pid = undefined;
    inst.pidStart = undefined;
    this.counters.snapshots++;
    const step = (name: string, fn: () => void): void => {
      try {
        fn();
      } catch (e) {
        try {
          this.log('suspend-bookkeeping-failed', { instance: inst.aid, image: output, step: name, error: (e as Error).message });
        } catch {
          // The log itself failing: nothing else to tell it to.
        }
      }
    };
    // The instance is gone: serve's queue length again, for the clients
    // that wait for the next restore (an application's own listen() on it
    // may have shortened it).
    step('backlog', () => this.shared?.serveBacklog());
    step('state', () => {
      killPoint('serve: suspend state');
      this.changed();
    });
    step('log', () => {
      if (incomplete) this.log('suspend-incomplete', { instance: inst.aid, error: incomplete.message });
      this.host.metrics?.snapshots.inc({ service: this.name, result: 'ok' });
      this.host.metrics?.snapshotSeconds.observe({ service: this.name }, ms / 1000);
      this.log('suspend', { instance: inst.aid, idleMs, image: output, incremental: !!r.parent, ms: Math.round(ms * 100) / 100 });
    });
    step('prune', () => {
      killPoint('serve: suspend pruning');
      this.prune(dir);
    });
    step('preload', () => this.preload(true));
    step('standbys', () => this.host.warmStandbys());
    step('pump', () => {
      this.host.worked();
      this.pump();
    });
  }

  /** Suspend images no longer in the chain of the last one. */
  private prune(dir: string): void {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (!this.chain.includes(path)) rmSync(path, { recursive: true, force: true });
    }
  }

  /** The clones being made (cloneInstance), by AID, for stopClones to
   * await. */
  private readonly cloning = new Map<string, Promise<void>>();

  private cloneInstanceTracked(reason: string): Promise<void> {
    let aid: string;
    do aid = `${this.name}-${++this.seq}`;
    while (this.instances.has(aid) || this.reg.get(aid));
    const p = this.cloneInstance(aid, reason);
    this.cloning.set(aid, p);
    void p.finally(() => this.cloning.delete(aid));
    return p;
  }

  private async cloneInstance(aid: string, reason: string): Promise<void> {
    const inst = this.newInstance(aid, 'starting');
    this.changed();
    const t0 = process.hrtime.bigint();
    try {
      // Hurried to stop: given up at its next safe point, what it made
      // removed (api.clone's signal: between instances, in an instance's
      // restore, before the batch's commit).
      const [made] = await api.clone(this.spec.from, { home: this.host.home, aid, signal: this.host.hurrying.signal }).catch((e: unknown) => {
        // Committed, then a step failed: the instance runs, and is this one.
        if (!(e instanceof api.ClonedWithError)) throw e;
        this.log('clone-incomplete', { instance: aid, error: e.message });
        return e.cloned;
      });
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      this.fillPorts(inst, made.ports);
      inst.state = 'running';
      inst.lastActive = this.host.clock.now();
      this.changed();
      const held = this.held.length;
      // As after a restore: the held go first; then the process to watch
      // is the one the template's image says held the listener, by its
      // binding (restoredHolder: a kill of it meanwhile is the crash, not
      // a forked helper's copy of the listener taken for it).
      this.pump();
      killPoint('serve: cloned');
      this.host.metrics?.cloneSeconds.observe({ service: this.name }, ms / 1000);
      this.log('clone', { instance: aid, reason, ms: Math.round(ms * 100) / 100, ports: [...inst.ports.values()], held, backlog: this.backlog });
      this.watchHolder(inst, await this.templateListenerHolder());
    } catch (e) {
      this.instances.delete(aid);
      this.changed();
      // Given up as serve was hurried to stop (ServeHost.hurrying): what
      // it made is removed. Only that failure; any other keeps its name.
      // (Its line may say how many instances made before it were removed.)
      const interrupted = e instanceof AppshotError && e.message.startsWith(CLONE_INTERRUPTED);
      this.log(interrupted ? 'clone-interrupted' : 'clone-failed', { instance: aid, error: (e as Error).message });
      if (![...this.instances.values()].some((i) => i.state === 'running' || i.state === 'starting'))
        for (const h of this.held.splice(0)) h.socket.destroy();
    }
    this.host.worked();
    this.pump();
  }

  /** Of the template a clone is stamped from: the virtual PID its image
   * says held the listener on the service's first port (ownListenerHolder),
   * read as a clone opens it (cached while unchanged: cache.ts, on in
   * serve). Undefined if unknown: the clone's watch is looked for then. */
  private async templateListenerHolder(): Promise<number | undefined> {
    try {
      const t = await openTemplate(this.spec.from, false);
      try {
        return ownListenerHolder(t.loaded.image, this.spec.ports[0].app);
      } finally {
        t.loaded.dispose();
      }
    } catch (e) {
      // The clone is then watched by the process found holding its
      // listener, which may be a forked helper's copy: said, not hidden.
      this.log('holder-unknown', { error: (e as Error).message });
      return undefined;
    }
  }

  private async drop(inst: Instance, idleMs: number): Promise<void> {
    inst.state = 'stopping';
    this.changed();
    try {
      await api.stop(inst.aid, { home: this.host.home, timeout: 2 });
      await api.rm(inst.aid, { home: this.host.home });
      this.log('drop', { instance: inst.aid, idleMs });
    } catch (e) {
      this.log('drop-failed', { instance: inst.aid, error: (e as Error).message });
    }
    this.instances.delete(inst.aid);
    this.changed();
    this.host.worked();
    this.pump();
  }

  /** After every change of an instance's state or a counter: the metrics
   * at once, the state file (what `service show` reads) within 100 ms.
   * A change without it would show until the next one, however long. */
  changed(): void {
    this.heldWritten = this.held.length;
    const counts: Partial<Record<InstanceStateName, number>> = {};
    for (const i of this.instances.values()) counts[i.state] = (counts[i.state] ?? 0) + 1;
    this.host.metrics?.setInstances(this.name, counts);
    // After close's own last write, a restore or clone still finishing
    // would write a stale state, or make a removed service's directory
    // again.
    if (this.stateTimer || this.closing) return;
    this.stateTimer = setTimeout(() => {
      this.stateTimer = undefined;
      this.writeState();
    }, 100);
  }

  /** Writes the state file; `strict`: a failure is thrown, not logged. */
  writeState(strict = false): void {
    const state: ServiceState = {
      service: this.name,
      spec: this.spec,
      // 0 once closed: a serve hosted by the engine leaves a process that
      // lives on, which would otherwise still look like serving it.
      servePid: this.closing ? 0 : process.pid,
      updatedAt: new Date().toISOString(),
      ...(this.spec.mode === 'restore' ? { lastImage: this.lastImage } : {}),
      chain: this.chain,
      ...(this.suspending ? { suspending: this.suspending } : {}),
      instances: [...this.instances.values()].map((i) => ({
        aid: i.aid,
        state: i.state,
        active: i.active,
        lastActive: i.lastActive,
        ports: [...i.ports].map(([pub, p]) => ({ public: pub, app: p.app, system: p.system })),
        ...(i.cpu !== undefined ? { cpu: Math.round(i.cpu * 100) / 100 } : {}),
        ...(i.state === 'suspended' && this.prepared ? { prepared: true } : {}),
      })),
      held: this.held.length,
      ...this.counters,
      connections: this.translations,
    };
    try {
      killPoint('serve: state write');
      this.host.store.writeState(state);
    } catch (e) {
      if (strict) throw e;
      this.log('state-write-failed', { error: (e as Error).message });
    }
  }

  /** The first step of stopping: nothing more is accepted, nothing held.
   * The connections forwarded already go on (ServeHost.stop drains them)
   * to the instances, which close() then stops or leaves. */
  stopAccepting(): void {
    if (this.closing) return;
    this.closing = true;
    if (this.stateTimer) clearTimeout(this.stateTimer);
    this.stateTimer = undefined;
    for (const s of this.listeners) s.close();
    // A running instance keeps its copy, and accepts on it; the next serve
    // takes that one over (adoptedListener).
    this.shared?.close(true);
    for (const lid of this.grants.values()) this.host.forwarder.release(lid);
    this.grants.clear();
    for (const b of this.backlogs.values()) closeSync(b.fd);
    this.backlogs.clear();
    // Held, never forwarded: closed in order (the client hears the end of
    // what it reads), what it sent read and dropped, so that its close
    // is not a reset for unread data. Closed fully in close(): a client
    // that keeps its end open would otherwise hold serve's end in
    // FIN-WAIT-2 (tcp_fin_timeout, a minute) once it was destroyed.
    for (const h of this.held.splice(0)) {
      const socket = h.socket;
      this.endingHeld.push(socket);
      socket.on('error', () => undefined);
      socket.once('end', () => socket.destroy());
      socket.resume();
      socket.end();
    }
    // A prepared instance holds a copy of the shared public listener: the
    // kernel would go on completing handshakes on it through the drain,
    // for clients reset when it is let go. It goes now (close awaits it).
    this.droppingPrepared = this.dropPrepared('serve stops');
  }

  /** stopAccepting's dropPrepared. */
  private droppingPrepared: Promise<void> | undefined;
  /** Held connections ended in order as serve stops (stopAccepting). */
  private readonly endingHeld: Socket[] = [];

  /** The held connections ended as serve stopped, given until `until`
   * (performance.now(): HELD_CLOSE_MS from the end of the drain, every
   * service's the same, ServeHost.stop) to close their end (each is
   * destroyed once it has), then reset: gone at once on serve's side,
   * not left in FIN-WAIT-2 by a client that keeps its end open. Without
   * the wait if serve is hurried. Logged ('held-closed') if there were
   * any: what each client did. */
  async closeHeld(until: number): Promise<void> {
    const ending = this.endingHeld.length;
    while (!this.host.hurried && this.endingHeld.some((s) => !s.destroyed) && performance.now() < until) await new Promise((r) => setTimeout(r, 10));
    let reset = 0;
    for (const s of this.endingHeld.splice(0))
      if (!s.destroyed) {
        s.resetAndDestroy();
        reset++;
      }
    if (ending) this.log('held-closed', { closed: ending - reset, reset });
  }

  /** The stop of each clone in progress (stopClones), by AID. */
  private readonly endingClones = new Map<string, Promise<void>>();

  /** Hurried while stopping (ServeHost.hurry): the clones being stopped
   * with their grace are killed now (their stops then end at once). The
   * restore or clone under way is given up by ServeHost.hurrying. */
  hurry(): void {
    if (!this.closing) return;
    for (const aid of this.endingClones.keys()) void api.kill(aid, { home: this.host.home, signal: 'SIGKILL' }).catch(() => undefined);
  }

  /** Stops and removes instance `i` (a clone, as serve stops): SIGTERM
   * and a grace of 2 s, SIGKILL at once if hurried. One stop per clone,
   * however often asked. */
  private endClone(i: Instance): Promise<void> {
    let ending = this.endingClones.get(i.aid);
    if (!ending) {
      const hurried = this.host.hurried;
      this.log('stop', { instance: i.aid, why: 'serve stops', ...(hurried ? { hurried } : {}) });
      // Shown as being stopped (state file, _instances), as drop() does.
      i.state = 'stopping';
      this.changed();
      ending = (async () => {
        await api.stop(i.aid, { home: this.host.home, ...(hurried ? { signal: 'SIGKILL' } : { timeout: 2 }) }).catch(() => undefined);
        await api.rm(i.aid, { home: this.host.home }).catch(() => undefined);
        this.instances.delete(i.aid);
        this.endingClones.delete(i.aid);
      })();
      this.endingClones.set(i.aid, ending);
    }
    return ending;
  }

  /** Every clone stopped and removed: one after another (each given its
   * grace), all at once once hurried. Until none is left: a clone
   * already being made when this began is waited for (its own promise),
   * then joins the list if it was made. Hurried, it is given up at its
   * next safe point (ServeHost.hurrying: its restore's, or the batch's
   * before its commit), what it made removed by the clone itself, and
   * waited for without a bound: leaving before would leave it half made
   * (its registration, port claims, private copies); the engine's third
   * signal leaves all the same. Not hurried, for CLONE_WAIT_MS at most
   * (then serve stop goes on without it). */
  private async stopClones(): Promise<void> {
    const until = performance.now() + CLONE_WAIT_MS;
    while (this.instances.size) {
      for (const i of [...this.instances.values()]) {
        if (i.state === 'starting') continue;
        if (this.host.hurried) void this.endClone(i);
        else await Promise.race([this.endClone(i), this.host.hurriedNow]);
      }
      await Promise.all(this.endingClones.values());
      const making = [...this.cloning.values()];
      if (!making.length) break;
      if (this.host.hurried) await Promise.all(making);
      else {
        const left = until - performance.now();
        if (left <= 0) break;
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([Promise.all(making), this.host.hurriedNow, new Promise((r) => (timer = setTimeout(r, left)))]);
        clearTimeout(timer);
      }
    }
  }

  async close(heldUntil: number = performance.now() + HELD_CLOSE_MS): Promise<void> {
    this.stopAccepting();
    await this.droppingPrepared;
    await this.closeHeld(heldUntil);
    this.forgetPreload();
    // Clones are interchangeable and go; restore mode's instance keeps
    // running (the next serve adopts it).
    if (this.spec.mode === 'clone') await this.stopClones();
    // Restore mode: a restore under way finishes first, so that the state
    // written last says what it made (a running instance, the next serve's
    // to adopt), not 'starting' for ever; and a serve of its own lets go of
    // its lock only then, so that the next one does not adopt it half made.
    // Bounded: serve stop waits 60 s in all. Hurried, it is given up at
    // its next safe point (ServeHost.hurrying), what it made removed, and
    // only that is waited for.
    const restoring = this.restoring;
    if (restoring) {
      const late = await Promise.race([restoring.then(() => false, () => false), new Promise<boolean>((r) => setTimeout(() => r(true), RESTORE_WAIT_MS).unref())]);
      if (late) this.log('restore-unfinished', { instance: this.name, waitedMs: RESTORE_WAIT_MS });
    }
    this.writeState();
  }
}

/** Our network namespace, once read. */
let ownNetNs: string | undefined;

/**
 * The sockets listening on `port` in the network namespace of process
 * `pid`, as /proc/PID/fd links name them (`socket:[INODE]`). Asked of the
 * kernel with sock_diag when that namespace is ours: /proc/PID/net/tcp and
 * tcp6 are made by walking every bucket of the kernel's socket hash
 * tables, 5-6 ms each on this machine with a few hundred sockets (and this
 * runs right after each restore and clone, in the event loop).
 */
function listeningInodes(pid: number, port: number): Set<string> {
  const inodes = new Set<string>();
  ownNetNs ??= readlinkSync('/proc/self/ns/net');
  if (readlinkSync(`/proc/${pid}/ns/net`) === ownNetNs) {
    try {
      for (const family of [2, 10]) for (const ino of addon().tcpListeningInodes(family, port)) inodes.add(`socket:[${ino}]`);
      return inodes;
    } catch {
      // sock_diag refused (no NETLINK_SOCK_DIAG here): /proc says the same.
      inodes.clear();
    }
  }
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const table of ['tcp', 'tcp6'])
    for (const line of readFileSync(`/proc/${pid}/net/${table}`, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && f[3] === '0A' && f[1].endsWith(`:${hexPort}`)) inodes.add(`socket:[${f[9]}]`);
    }
  return inodes;
}

/** How long connections forwarded when serve stops are given to end by
 * themselves before they are ended (ServeHost.stop): long enough for a
 * reply under way, short enough that SIGTERM means stop (systemd's
 * default stop timeout is 90 s; `serve stop` waits up to 60). */
const DRAIN_MS = 2000;
/** Then how long their closes are waited for (the thread reports them
 * within milliseconds; this bounds a thread that does not). */
const DRAIN_CLOSE_MS = 2000;

/** How long serve stop, not hurried, waits for the clones being made to
 * be made (and then stopped): the bound the earlier polling had. */
const CLONE_WAIT_MS = 5000;

/** `p` settled, or `signal` aborted, whichever comes first (then `p`
 * goes on unawaited: its failure is its own to report). */
function untilAborted(p: Promise<unknown>, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = () => {
      signal.removeEventListener('abort', done);
      resolve();
    };
    signal.addEventListener('abort', done);
    p.then(done, done);
  });
}

/** How long a held connection, ended as serve stops, is given to close
 * its end before it is reset (Service.closeHeld). Counted from the end of
 * the drain: the forwarded connections' time, which it has had too. */
const HELD_CLOSE_MS = 1000;

/** How long a stopping serve waits for a restore under way to finish
 * (Service.close). */
const RESTORE_WAIT_MS = 30_000;

/** Descriptors kept for everything but held connections: Node's own, a
 * restore's, the forwarded connections' (two each). */
const FD_RESERVE = 256;

/** The most connections each of `services` may hold, from the descriptor
 * limit (RLIMIT_NOFILE's soft limit, which Node raises to the hard one
 * at start): half of what is left after FD_RESERVE, shared out, so that
 * holding never makes accept (nor a restore) fail with EMFILE. */
function heldRoom(services: number): number {
  let soft = Infinity;
  try {
    const m = /^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m) soft = Number(m[1]);
  } catch {
    // No /proc: the spec's value stands.
  }
  return Math.max(1, Math.floor((soft - FD_RESERVE) / 2 / Math.max(1, services)));
}

/** The services of one state directory, served. */
export class ServeHost {
  readonly clock: Clock;
  readonly log: LogSink;
  readonly metrics?: ServeMetrics;
  readonly store: ServiceStore;
  readonly home: string;
  private readonly services: Service[] = [];
  /** Services holding a preloaded image, least recently loaded first. */
  private readonly holding: Service[] = [];
  /** Services whose next instance is held prepared, least recently
   * prepared first: at most `preparedLimit`. */
  private readonly preparedOnes: Service[] = [];
  readonly preparedLimit: number;
  /** Services whose next image is kept read (PRELOAD_LIMIT, or
   * APPSHOT_PRELOADED). */
  readonly preloadLimit: number;
  /** Preloads under way. */
  preloading = 0;
  /** When freed memory is next given back (trimMemory), if at all:
   * TRIM_AFTER_MS after the last work (performance.now()). */
  private trimAt: number | undefined;
  /** When freed memory was last given back (performance.now()). */
  private trimmedAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopping = false;
  private metricsServer: HttpServer | undefined;
  /** Moves the bytes of every forwarded connection (forwarder.ts). */
  readonly forwarder = new Forwarder();
  /** Whether resumes and clones take standby supervisors (standby.ts);
   * APPSHOT_STANDBYS=0: none, for comparison. */
  private readonly standbys = process.env.APPSHOT_STANDBYS !== '0';
  /** Its own settings (settings.ts), read once as it starts: a hosted
   * serve runs on while other clients' commands, with theirs, run. */
  readonly settings: ServeSettings = serveSettings();
  /** Pages a prepared resume copies in ahead (restore/prepared.ts). */
  readonly prefaultCap = prefaultCap();
  /** Whether the standbys are this serve's to start and end. */
  private readonly ownStandbys: boolean;

  constructor(
    specs: ServiceSpec[],
    readonly opts: ServeOptions,
  ) {
    this.home = opts.home;
    this.clock = opts.clock ?? systemClock;
    this.log = opts.log ?? stderrLog;
    this.metrics = opts.metrics;
    this.store = new ServiceStore(opts.home);
    this.preparedLimit = this.settings.prepared ?? opts.prepared ?? DEFAULT_PREPARED;
    this.preloadLimit = this.settings.preloaded ?? PRELOAD_LIMIT;
    // Restores check the files an image maps (libraries, the program)
    // against the image's checksums: a serve restores the same ones again
    // and again, and reads each once while it is unchanged.
    keepChecksums();
    // Clone mode clones the same templates again and again: each opened
    // once (decoded, signatures and checksums verified, rules parsed) and
    // kept while its files stay the same, as the engine does
    // (template/cache.ts checks them at every use).
    enableTemplateCache();
    // A supervisor with its seeds forked, waiting for each seed count a
    // suspended service needs (one each: resumes come one at a time),
    // so that a resume takes one instead of spawning it (standby.ts).
    // Clone mode's is started by its first clone, and replaced as it is
    // taken. Released by stop(); and should this process die, each sees
    // its lifeline end and goes with its seeds.
    // In the engine, its own are used: enabled for all its restores.
    this.ownStandbys = this.standbys && !opts.shared;
    if (this.ownStandbys) enableStandbys({ keepPerCount: 1, refillAfterMs: STANDBY_REFILL_MS });
    // One malloc arena for the threads that have not taken one yet
    // (libuv's pool, the tracer and forwarding threads): serve works in
    // bursts, and what a thread's burst freed in an arena of its own
    // stays resident, partly beyond what a trim (worked()) gives back.
    // Node's and V8's own threads have theirs before this runs: `serve
    // -d` starts with MALLOC_ARENA_MAX=1 for them (commands/serve.ts).
    if (!opts.shared) addon().mallocArenas(1);
    const maxHeld = heldRoom(specs.length);
    for (const spec of specs) {
      const wanted = spec.maxHeld ?? DEFAULT_MAX_HELD;
      if (wanted > maxHeld) this.log({ service: spec.name, event: 'max-held', wanted, allowed: maxHeld, why: 'RLIMIT_NOFILE' });
      this.services.push(new Service(spec, this, newListenerGroup(), Math.min(wanted, maxHeld)));
    }
  }

  /** `s` has just preloaded its image: the one that did longest ago lets
   * go of its own, if more than preloadLimit hold one. */
  preloaded(s: Service): void {
    const at = this.holding.indexOf(s);
    if (at >= 0) this.holding.splice(at, 1);
    this.holding.push(s);
    while (this.holding.length > this.preloadLimit) this.holding.shift()!.forgetPreload();
  }

  /** Room for one more prepared service (`s`): given if the limit allows,
   * or (`displace`: `s` was suspended just now) by giving up the least
   * recently prepared one's. */
  makePreparedRoom(s: Service, displace: boolean): boolean {
    if (this.preparedLimit < 1 || this.stopping) return false;
    if (!displace && this.preparedOnes.length >= this.preparedLimit) return false;
    while (this.preparedOnes.length >= this.preparedLimit) void this.preparedOnes[0].dropPrepared('displaced by a more recently suspended service');
    this.preparedOnes.push(s);
    return true;
  }

  /** Gives up every prepared instance but `s`'s; whether there was any. */
  async dropOthersPrepared(s: Service): Promise<boolean> {
    const others = this.preparedOnes.filter((o) => o !== s);
    await Promise.all(others.map((o) => o.dropPrepared("another service's restore failed, and may need what it holds")));
    return others.length > 0;
  }

  unprepared(s: Service): void {
    const at = this.preparedOnes.indexOf(s);
    if (at >= 0) this.preparedOnes.splice(at, 1);
  }

  /** Starts the standbys suspended services wait for, one per distinct
   * seed count; those kept already stay. */
  warmStandbys(): void {
    if (!this.standbys || this.stopping) return;
    for (const count of new Set(this.services.map((s) => s.standbyWanted()))) if (count !== undefined) warmStandbys(count);
  }

  /** Work was done (a restore, a suspend, a clone or a drop ended, an
   * image preloaded, an instance prepared): once there has been none for
   * TRIM_AFTER_MS and none is under way, what it freed goes back to the
   * kernel (tick). A restore or a suspend frees megabytes that malloc
   * keeps on its free lists, resident for as long as the service
   * sleeps: with 100 suspended services and one prepared, ~5 MiB of the
   * serve process's PSS (bench/serve.js (e)). */
  worked(): void {
    this.trimAt = performance.now() + TRIM_AFTER_MS;
  }

  private trimWhenSettled(): void {
    const now = performance.now();
    const due = this.trimAt !== undefined ? now >= this.trimAt : now - this.trimmedAt >= IDLE_TRIM_MS;
    if (!due || this.preloading) return;
    if (this.services.some((s) => s.busy())) return;
    this.trimAt = undefined;
    this.trimmedAt = now;
    addon().trimMemory();
  }

  /** Whether one more preloaded image would be kept. */
  preloadRoom(): boolean {
    return this.holding.length + this.preloading < this.preloadLimit;
  }

  async start(metricsAt?: { host: string; port: number }): Promise<void> {
    try {
      for (const s of this.services) {
        s.adopt();
        await s.listen();
      }
      if (metricsAt && this.metrics) {
        this.metricsServer = await this.metrics.listen(metricsAt.host, metricsAt.port);
        this.log({ event: 'metrics', host: metricsAt.host, port: metricsAt.port });
      }
    } catch (e) {
      await this.stop();
      throw e;
    }
    for (const s of this.services) {
      s.writeState();
      s.pump();
    }
    this.timer = setInterval(() => {
      // The supervisors this process started (the instances' appshot-init,
      // standbys let go), once ended, are its zombies until waited for.
      addon().reapDetached();
      // The page files' buffers kept warm between restores and snapshots
      // (pages.c): not held through a quiet half minute.
      addon().releaseKeptBuffers(30);
      // One service's failure is logged, not the end of the others' ticks.
      for (const s of this.services)
        try {
          s.tick();
        } catch (e) {
          this.log({ service: s.name, event: 'tick-failed', error: (e as Error).message });
        }
      this.trimWhenSettled();
    }, this.opts.tickMs ?? 200);
  }

  /** Stops serving; resolves once it has. Every caller gets the same
   * stop (a second one, as from SIGINT then SIGTERM, must not close each
   * service again while the first closes it). */
  stop(): Promise<void> {
    return (this.stopped ??= (async () => {
      this.stopping = true;
      if (this.timer) clearInterval(this.timer);
      this.metricsServer?.close();
      for (const s of this.services) s.stopAccepting();
      // Connections forwarded already get a short drain (a reply under way
      // finishes), then are ended: a client that neither sends nor closes,
      // or an instance that never answers, would keep serve from ever
      // ending (the forwarding thread keeps the event loop alive while it
      // has connections). Before the clones are stopped: those connections
      // are theirs.
      // Always: whether any is open is the forwarding thread's to say (one
      // it forwarded just now may not have been reported yet).
      const d = await this.forwarder.drain(DRAIN_MS, DRAIN_CLOSE_MS);
      // hurried: its end was cut short (the engine's second signal).
      if (d.drained + d.ended + d.left > 0) this.log({ event: 'drain', ...d, drainMs: DRAIN_MS, ...(this.hurried ? { hurried: true } : {}) });
      // Held connections' one wait for all services, one deadline from
      // the end of the drain: not one after each earlier service's clones
      // stopped (close() then finds none).
      const heldUntil = performance.now() + HELD_CLOSE_MS;
      await Promise.all(this.services.map((s) => s.closeHeld(heldUntil)));
      // One service after another (each clone given its SIGTERM grace);
      // once hurried, the services not yet closed all at once.
      const closing: Promise<void>[] = [];
      for (const s of this.services) {
        const c = s.close(heldUntil);
        closing.push(c);
        // (A failure is rethrown below, once the others are closed too.)
        if (!this.hurried) await Promise.race([c.catch(() => undefined), this.hurriedNow]);
      }
      // Every close ended before stop resolves (and the serve lock is let
      // go): not the first failure while the others still kill clones.
      const failed = (await Promise.allSettled(closing)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      if (this.ownStandbys) await this.endStandbys();
    })());
  }
  private stopped?: Promise<void>;

  /** A stop under way (or to come) ends the connections it forwards at
   * once, without what is left of their drain; gives up the restores and
   * clones under way (hurrying); kills its clones rather than giving them
   * their grace, every service's at once; and waits for no held client. */
  hurry(): void {
    if (this.hurried) return;
    this.hurried = true;
    this.forwarder.hurry();
    this.hurrying.abort();
    this.hurriedNowResolve();
    for (const s of this.services) s.hurry();
  }
  /** Told to hurry (hurry). */
  hurried = false;
  /** Aborted by hurry: a restore or clone under way is given up at its
   * next point where that is safe, what it made removed as after a
   * failure (restore/driver.ts opts.signal), not waited out. */
  readonly hurrying = new AbortController();
  private hurriedNowResolve!: () => void;
  /** Resolves when hurried. */
  readonly hurriedNow = new Promise<void>((r) => (this.hurriedNowResolve = r));

  /** Lets go of every standby, and waits (a second at most) until each
   * has ended with its seeds and been waited for: none outlives serve. */
  private async endStandbys(): Promise<void> {
    const pids = standbyPids();
    releaseStandbys();
    const alive = (pid: number) => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    for (let i = 0; i < 100; i++) {
      addon().reapDetached();
      if (!pids.some(alive)) return;
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}
