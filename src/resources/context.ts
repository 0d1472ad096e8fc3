/**
 * What the resource kinds share: while one snapshot is taken (DumpContext:
 * the image being filled, the tables, the files, pipes and shared memory
 * seen so far), and while one restore is made (RestoreContext: the
 * descriptors made in appshot's process and handed over, each made once
 * however many processes hold it, and where a clone's files are). The
 * drivers make one and pass it to every kind.
 */
import { type BigIntStats, closeSync, constants as fs, fchmodSync, fstatSync, lstatSync, mkdirSync, mkdtempSync, openSync, readSync, rmdirSync, type Stats, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AppshotError } from '../errors.js';
import { addon, type FsIdentities, type InstanceConfig, type Kind, type PagesCheck, type PageWriter, type TablesSnapshot } from '../native.js';
import { isOwnSnapshot, waitPagesChecked } from '../image/format.js';
import { type Action, type FileIdentity, type Image, type Pipe, type Process, type SharedMemory, type SocketOption, verdictRef, type Vma, VmaKind } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import type { ParentResolver } from '../snapshot/parent.js';
import { type CopiedFile, type CopySource, privateCopy, redirected, unredirected } from './paths.js';
import { fsIdentity, identitiesFor, refusal, refusedAsProcess, reopenHeld } from './fsident.js';
import { restoredProcPath } from './procpaths.js';
import { KeptSockets, SocketsForKeeper } from './keeper.js';
import { ConnectionMaker, HeldConnections } from './tcp.js';
import type { CowCapture } from '../snapshot/cowcapture.js';

const O_ACCMODE = 3;
const DELETED = ' (deleted)';

/** A listening socket the caller installed in the application and keeps
 * (`appshot serve`'s public listener): the image names it by `key`, with
 * the application's own listener it replaced (made again from these where
 * the caller does not hand it over: RestoreOptions.ownListeners). */
export interface InheritedListener {
  key: string;
  family: number;
  address: string;
  /** The application's (virtual) port. */
  port: number;
  backlog: number;
  reuseaddr: boolean;
  v6only: boolean;
  /** Its options that decide a bind (SO_BINDTODEVICE, IP_FREEBIND, ...),
   * as its image recorded them: the caller's socket, bound already, was
   * not given them (resources/sockets.ts bindOptions), yet a restore that
   * makes the application's listener again needs them. */
  bindOptions?: SocketOption[];
}

/** A resource the snapshot cannot capture yet: the whole snapshot is refused
 * rather than an image written that would not restore. */
export class Unsupported extends Error {}

/** A refusal of a moment's state, not of a kind of resource: a message
 * the kernel holds for the program to read, a connection changing state
 * while looked at, a request completing meanwhile. The snapshot, which
 * leaves the application running as it was when refused, is tried again
 * a moment later (snapshot/driver.ts, snapshot) before it gives up. */
export class Transient extends Unsupported {}

export class DumpContext {
  private readonly toVirtual = new Map<Kind, Map<number, number>>();
  private readonly fileIndex = new Map<string, number>();
  /** Pipes and FIFOs by `key` (pipe()). */
  readonly pipeIndex = new Map<string, number>();
  readonly sharedIndex = new Map<string, number>();
  /** Connections that outlive the application until its restore. */
  readonly keeper = new SocketsForKeeper();
  /** TCP connections held in repair mode while the application is frozen. */
  readonly tcp = new HeldConnections(this.keeper);
  /** The "lock:" lines of each descriptor's fdinfo, by "PID:FD", as
   * files.ts read them (only descriptors that show any): locks.ts needs
   * no second read, nor /proc/locks (whose every read can wait for an RCU
   * grace period of the whole machine, milliseconds while frozen). */
  readonly fdLockLines = new Map<string, string[]>();
  /** By a child's system PID: its parent's (virtual PID) thread that forked
   * it (virtual TID), where that is not the parent's main thread, as
   * process.ts read it from the parent's gathered children lists while the
   * parent was dumped; set on the children once all are dumped. */
  readonly forkingThreads = new Map<number, { vppid: number; vtid: number }>();
  /** Set when the dump itself wrote the tables (a thread given its virtual
   * TID): the driver reads them again for the image only then. */
  tablesWritten = false;
  /** CLOCK_MONOTONIC (process.hrtime) in ns just before the freeze began,
   * 0n if not known: a wait's time left is counted to it (threads.ts
   * timeLeftOfWaits). */
  freezeBegan = 0n;
  /** Sockets that are not the application's, by inode: recorded by key,
   * not dumped (SnapshotOptions.inherited, sockets.ts inheritedSocket). */
  inherited: ReadonlyMap<bigint, InheritedListener> = new Map();
  /** What tells the application's SysV objects from others' (registry
   * ipcOwnership): an object its tables name is dumped only if the kernel
   * says it is the application's. */
  ipcOwnership?: { salt: bigint; created: number; initPid: number };
  /** The application's supervisor as the registry knows it
   * (trustedInitPid: its record's PID, checked against its start time),
   * 0 if gone. Never the tables' init_pid: any process of the
   * application may write that (refuseOwnNamespaces in process.ts). */
  initPid = 0;
  /** The session keyring the application inherited from whoever ran it
   * (AppRecord.launchKeyring): the session's, not the application's. */
  launchKeyring?: number;
  /** --leave-running: each process's private memory read from a
   * copy-on-write copy of it once the application goes on, where it can
   * be (snapshot/cowcapture.ts). */
  cow?: CowCapture;

  constructor(
    readonly image: Image,
    readonly tables: TablesSnapshot,
    /** The tables' file: threads never seen by name get a virtual TID here. */
    readonly tablesPath: string,
    readonly pages: PageWriter,
    readonly parent: ParentResolver | undefined,
    /** Descriptor numbers of the userfaultfds that dirty tracking put in
     * the processes: not the application's, never in an image. */
    readonly trackingFds: number[] = [],
    /** Processes (system PIDs) whose writes since `parent` are tracked;
     * the others' pages are compared with the parent's. */
    readonly trackedPids: Set<number> = new Set(),
  ) {
    for (const [kind, entries] of Object.entries(tables.tables))
      this.toVirtual.set(kind as Kind, new Map(entries.map((e) => [e.system, e.virtual])));
  }

  /** The virtual id of a system id, or 0 if the application has none. */
  virtual(kind: Kind, system: number): number {
    return this.toVirtual.get(kind)?.get(system) ?? 0;
  }

  /** Records (once) the identity of a file the image maps or holds open;
   * `stat`: statPath's, where the caller has it already (a descriptor's:
   * one stat of /proc/PID/fd/N each, not two). */
  file(path: string, statPath: string, deleted: boolean, stat?: BigIntStats): number {
    const st = stat ?? statSync(statPath, { bigint: true });
    const key = `${st.dev}:${st.ino}`;
    const known = this.fileIndex.get(key);
    if (known !== undefined) return known;
    const id: FileIdentity = {
      path,
      dev: st.dev,
      ino: st.ino,
      size: st.size,
      mtimeNs: st.mtimeNs,
      mode: Number(st.mode),
      deleted,
      crc32c: 0,
      ...(deleted ? { uid: Number(st.uid), gid: Number(st.gid) } : {}),
      ...(st.birthtimeNs > 0n ? { btimeNs: st.birthtimeNs } : {}),
    };
    this.image.files.push(id);
    this.fileIndex.set(key, this.image.files.length - 1);
    return this.image.files.length - 1;
  }

  /** The image's pipe `key` names (its device and inode: a FIFO's inode
   * number may be an anonymous pipe's too, or another file system's
   * FIFO's), made by `make` the first time. */
  pipe(key: string, make: () => Pipe): number {
    let i = this.pipeIndex.get(key);
    if (i === undefined) {
      this.image.pipes.push(make());
      i = this.image.pipes.length - 1;
      this.pipeIndex.set(key, i);
    }
    return i;
  }

  shared(key: string, make: () => SharedMemory): number {
    let i = this.sharedIndex.get(key);
    if (i === undefined) {
      this.image.sharedMemory.push(make());
      i = this.image.sharedMemory.length - 1;
      this.sharedIndex.set(key, i);
    }
    return i;
  }
}

/** "process 3 (server)": how messages name a process, by its virtual PID. */
/**
 * Writes `bytes` into non-blocking descriptor `fd` until they are all in or
 * it would block: how many went in. A restore fills a socket's or a
 * terminal's queue with what an image says it held, and a write that
 * waited would hang the restorer (the resident engine, and every command
 * of its user with it); the caller refuses what does not fit.
 */
export function writeWhatFits(fd: number, bytes: Buffer): number {
  let done = 0;
  while (done < bytes.length) {
    let n = 0;
    try {
      n = writeSync(fd, bytes, done, bytes.length - done);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
    }
    if (n <= 0) break;
    done += n;
  }
  return done;
}

export function nameProcess(vpid: number, comm: string): string {
  return `process ${vpid} (${comm})`;
}

/** How a clone differs from a plain restore, as far as the kinds see it. */
export interface ClonePlan {
  /** What to do with a resource of the image, by its Verdict.ref. */
  action(ref: string): Action | undefined;
  /** Virtual TCP port -> this instance's own (allocate). */
  ports: Map<number, number>;
  /** A file copied for the instance (copy-on-write, duplicate) goes to
   * join(privateRoot, its path). */
  privateRoot: string;
  /** REDIR PATH copies' originals, opened for reading as their process
   * before the restore (template/clone.ts checkRedirCopies), by target:
   * what the copy is read from. Each is closed and taken out once used;
   * the owner closes those left. */
  redirSources?: Map<string, number>;
  /** Told each REDIR PATH copy this restore made itself (of clones racing
   * for one target, the one that made it): only those are removed if
   * the instance fails. */
  redirCopyMade?(target: string): void;
}

/** Descriptors made here and handed to the restored processes. */
export class RestoreContext {
  private readonly mine: number[] = [];
  /** What waits until every process is as it will run
   * (whenProcessesAreFinal). */
  private readonly afterProcesses: (() => void)[] = [];
  /** Whether processesAreFinal has run. */
  private processesFinal = false;
  /** What was made once for the whole restore, by key: see once(). */
  private readonly made = new Map<string, unknown>();
  /** What undoes objects made outside the application (a named message
   * queue) if the restore fails: run by undo(), newest first. */
  private readonly undoing: (() => void)[] = [];
  /** Connections a keeper held since the snapshot (keeper.ts). */
  readonly kept = new KeptSockets();
  /** Descriptors of this process the caller hands over by key, for the
   * image's inherited sockets (RestoreOptions.inherit): installed as they
   * are, never closed here. */
  inherit: ReadonlyMap<string, number> = new Map();
  /** An ordinary TCP listener at this virtual port becomes the inherited
   * one of `key` (RestoreOptions.inheritAt). */
  inheritAt?: { port: number; family: number; key: string };
  /** Inherited listeners of these keys are made as the application's own
   * again (RestoreOptions.ownListeners). */
  ownListeners: ReadonlySet<string> = new Set();
  /** Handed descriptors that have this image's listener options already
   * (RestoreOptions.inheritGiven). */
  inheritGiven: ReadonlySet<string> = new Set();
  /** Established TCP connections, in repair mode until every process is made. */
  readonly tcp = new ConnectionMaker(this.kept);
  /** What a resource's restore could not carry and went on without, one
   * line each: the restore's result lists them (RestoreResult.notKept). */
  readonly notKept: string[] = [];
  /** Pipes and sockets made here that take their inode owner afterwards
   * (files.ts restoreInodeOwner): only those, never one that was
   * already someone's (the log, a keeper's socket, serve's listener, a
   * named FIFO). */
  readonly ownerAfter = new Set<number>();
  /** The page file's check, if it is still going on (format 3): what is
   * read of it here waits for its chunks. */
  pagesCheck?: { check: PagesCheck; chunkSize: number };
  /** A clone held by the engine until a clone command takes it
   * (template/pool.ts): its listeners on a multiplexed port are bound
   * now and listen only at listenHeld(), else the kernel would hand them
   * their share of the port's connections while nothing answers. */
  listenAtRelease = false;
  private readonly heldListeners: { fd: number; backlog: number; reuseaddr: boolean }[] = [];

  /** A bound listener of listenAtRelease, to listen at listenHeld(). */
  listenLater(fd: number, backlog: number, reuseaddr: boolean): void {
    this.heldListeners.push({ fd, backlog, reuseaddr });
  }

  /** The held clone is let go: its multiplexed listeners listen (our
   * descriptors of them are still open until close()). */
  listenHeld(): void {
    for (const l of this.heldListeners.splice(0)) addon().listenNow(l.fd, l.backlog, l.reuseaddr);
  }

  /** The system PID a process of the image (its virtual PID) has now,
   * once the restore made the tree (the driver sets it). */
  systemPid: (vpid: number) => number | undefined = () => undefined;

  constructor(
    readonly image: Image,
    private readonly pagesFd: number,
    private readonly logPath: string,
    readonly plan: ClonePlan | undefined,
    private readonly redirs: InstanceConfig['redirs'],
    /** The new application's table file. */
    readonly tablesPath: string,
  ) {}

  /** Where one of the image's files is for a clone (a plain restore leaves
   * every path where it was): the image records paths as the kernel saw
   * them, after the template's own REDIR PATH rules (and, for a template
   * made of a clone, in that clone's private copies). Taken back to the
   * path the application named, then: this instance's REDIR PATH target;
   * its own copy if `copy` (copy-on-write or duplicate), made now; else
   * the template's file. */
  clonePath(path: string, copy: boolean, p: Process, what: string, held?: FileIdentity): string {
    if (!this.plan) return path;
    const named = unredirected(this.image.instance?.redirs ?? [], path);
    const target = redirected(this.redirs, named);
    if (target !== undefined) {
      const sources = this.plan.redirSources;
      const fd = sources?.get(target);
      try {
        if (!lstatSync(target, { throwIfNoEntry: false })) this.recordRedirCopyPlanned?.(target);
        const link = held?.linkTarget !== undefined ? { link: true } : {};
        if (privateCopy(path, target, { ...this.copySource(p, what, undefined, fd), ...link }, undefined, (tmp) => this.recordRedirCopyPlanned?.(tmp, true))) this.plan.redirCopyMade?.(target);
      } finally {
        // Needed no more (the copy is there, or this restore fails): not
        // held while the instance waits in the engine's pool.
        if (fd !== undefined) {
          sources!.delete(target);
          closeSync(fd);
        }
      }
      return target;
    }
    if (!copy) return path;
    const own = join(this.plan.privateRoot, named);
    privateCopy(path, own, { ...this.copySource(p, what, held), ...(held?.linkTarget !== undefined ? { link: true } : {}) }, (c) => this.copiesMade.set(own, c));
    return own;
  }

  /** What a copy for process `p` is read as: that process (the
   * application's others after it, as any of its opens), so that root
   * copies for it only what it could read. `held`: the image's word on
   * the regular file the process held, which it may no longer open
   * (opened before a drop of privileges: fsident.ts reopenHeld): the
   * very one is copied, with its owner and mode, and only the copy of
   * that very file is given back to the process (files.ts). `fd`: the
   * original opened so already. `what`: what of the process the copy is
   * for (its descriptor, working directory, mapping), for a refusal's
   * line. */
  private copySource(p: Process, what: string, held?: FileIdentity, fd?: number): CopySource {
    return {
      ...(fd === undefined ? {} : { fd }),
      open: (shown, path, flags, dir) => {
        try {
          return addon().openAs(path, flags, 0, identitiesFor(this.image, p), dir);
        } catch (e) {
          // The original itself only, never an entry of a directory.
          const regular = held !== undefined && (held.mode & fs.S_IFMT) === fs.S_IFREG;
          const original = path === shown;
          const got = refusal(e) && regular && original ? reopenHeld(held, isOwnSnapshot(this.image), path, flags) : undefined;
          if (got !== undefined) return got;
          // The original, as the process's own open of it would be refused.
          if (original) refusedAsProcess(e, `${what}: ${shown}`, fsIdentity(p));
          refusedAsProcess(e, `${what}: ${shown}, copied for the instance,`, fsIdentity(p), 'read');
        }
      },
    };
  }

  /** The private copies clonePath made in this restore (not REDIR PATH
   * targets, which are the user's places), by path: what each was copied
   * from (files.ts: a file held past a drop of privileges). */
  readonly copiesMade = new Map<string, CopiedFile>();

  /** A clone's working directory: redirected, or in a copy-on-write
   * directory the instance's own copy of it (relative writes must not
   * reach the template's files, and relative reads find what they did).
   * One in a process's /proc directory: the restored process's. */
  workingDirectory(p: Process): string {
    // Removed: no name to walk; process.ts enters its stand-in by
    // descriptor (deleted.ts removedDirectoryToEnter). The name is for
    // messages.
    if (p.cwd.endsWith(DELETED)) return p.cwd;
    if (p.cwdProcVpid) return restoredProcPath(this, p.cwd, p.cwdProcVpid);
    if (!this.plan) return p.cwd;
    const named = unredirected(this.image.instance?.redirs ?? [], p.cwd);
    return this.clonePath(p.cwd, redirected(this.redirs, named, 'cow') !== undefined, p, `process ${p.vpid}: working directory`);
  }

  /** Our descriptor of a stand-in for a directory removed while a
   * process held it (its working or root directory, a descriptor of it:
   * deleted.ts), one per `key` (the image's file, else its path), kept
   * until close(). Its name is never used after it is made (review r300:
   * a name another user can reach, or one the image chooses, let them
   * plant files in it, make a directory anywhere as root, or swap it for
   * a link to / before a chroot): made 0700 in the temporary directory
   * (not beside where it was, a place the image names), opened with
   * O_NOFOLLOW and removed at once. Dead from then on: the kernel makes
   * nothing in it, it lists nothing, as a removed directory; and nothing
   * of it outlives a kill of the restore. Its owner and mode are
   * deleted.ts's to give, by this descriptor.
   *
   * Its ".." is a directory of ours, mode 0 and removed too (review
   * r305): a process chrooted in a directory of its own whose working
   * directory (or a descriptor), removed, was inside the jail, would
   * otherwise climb from the stand-in through $TMPDIR to the real /. Not
   * made inside the jail instead: a place the image names. (A process
   * with CAP_DAC_OVERRIDE passes a mode of 0, but such a process leaves
   * a chroot at will anyway.) */
  removedDirectory(key: string): number {
    return this.once(`removed directory ${key}`, () => {
      // Ours, made 0700 (a $TMPDIR that others may write, not sticky, or
      // one in a directory of another user's, would let them put one of
      // theirs, or a link, at a name meanwhile): the parent is reached by
      // our descriptor of it from the moment it is made, never its name
      // again but to remove it, and only if the name is still it (review
      // r307: a chmod by name followed a link put there).
      const mine = (st: Stats) => st.uid === process.geteuid?.() && (st.mode & 0o7077) === 0;
      const parent = mkdtempSync(join(tmpdir(), '.appshot-removed-'));
      const dir = openSync(parent, fs.O_RDONLY | fs.O_DIRECTORY | fs.O_NOFOLLOW);
      const made = `/proc/self/fd/${dir}/d`;
      let f = -1;
      let removed = false;
      try {
        const had = fstatSync(dir);
        if (!mine(had)) throw new AppshotError(`${parent}: the directory made for a removed one was replaced (uid ${had.uid}, mode 0${(had.mode & 0o7777).toString(8)}): is the temporary directory writable by others?`);
        mkdirSync(made, 0o700);
        f = this.keep(openSync(made, fs.O_RDONLY | fs.O_DIRECTORY | fs.O_NOFOLLOW));
        const st = fstatSync(f);
        if (!mine(st)) throw new AppshotError(`${parent}/d: the directory made for a removed one is not ours (uid ${st.uid}, mode 0${(st.mode & 0o7777).toString(8)})`);
        rmdirSync(made);
        removed = true;
        // What rmdir removed was ours: ours is dead now.
        if (fstatSync(f).nlink !== 0) throw new AppshotError(`${parent}/d: the directory made for a removed one was replaced before its removal`);
        // Mode 0, then gone: the dead stand-in's "..".
        fchmodSync(dir, 0);
        const now = lstatSync(parent);
        if (now.dev === had.dev && now.ino === had.ino) rmdirSync(parent);
      } catch (e) {
        // Nothing of ours left behind (only ours: by our descriptor).
        try {
          if (!removed && f < 0) rmdirSync(made);
        } catch {
          // Never made.
        }
        try {
          const had = fstatSync(dir);
          const now = lstatSync(parent);
          if (mine(had) && now.dev === had.dev && now.ino === had.ino) rmdirSync(parent);
        } catch {
          // Not ours, or not empty: said above.
        }
        throw e;
      } finally {
        closeSync(dir);
      }
      return f;
    });
  }

  /** A file mapped shared and writable that a rule copies for each clone
   * (FILE ... COPY-ON-WRITE or DUPLICATE): the instance's copy is mapped. */
  mappedPath(vpid: number, v: Vma): string {
    if (!this.plan || v.kind !== VmaKind.FILE_SHARED || !(v.prot & 2)) return v.path;
    const action = this.plan.action(verdictRef.vma(vpid, v));
    const p = this.image.processes.find((q) => q.vpid === vpid)!;
    return this.clonePath(v.path, action === 'copy-on-write' || action === 'duplicate', p, `process ${vpid} mapping`, this.image.files[v.file]);
  }

  /** A descriptor of ours, closed at the end (the processes hold theirs). */
  keep(fd: number): number {
    this.mine.push(fd);
    return fd;
  }

  /** Kept descriptors closed now, before the end (and not again then). */
  release(fds: Iterable<number>): void {
    for (const fd of fds) {
      const i = this.mine.indexOf(fd);
      if (i < 0) continue;
      this.mine.splice(i, 1);
      closeSync(fd);
    }
  }

  /** What `make` makes, made once for the whole restore under `key` (a
   * pipe by its index, a socket by its inode, an open file description by
   * its number): every descriptor that shares it is handed the same. */
  once<T>(key: string, make: () => T): T {
    if (this.made.has(key)) return this.made.get(key) as T;
    const got = make();
    this.made.set(key, got);
    return got;
  }

  /** What was made for `key` so far, without making it. */
  peek<T>(key: string): T | undefined {
    return this.made.get(key) as T | undefined;
  }

  /** Records what was made for `key` along with another (a socket pair's
   * second end). */
  remember<T>(key: string, value: T): void {
    this.made.set(key, value);
  }

  /** Bytes of a PageRef's runs, each written at its page in `fd`. */
  copyPages(fd: number, ref: { offset: bigint; runs: number[] } | undefined): void {
    if (!ref) return;
    let at = Number(ref.offset);
    let total = 0;
    for (let i = 1; i < ref.runs.length; i += 2) total += ref.runs[i] * 4096;
    waitPagesChecked(this.pagesCheck, at, total);
    const buf = Buffer.alloc(1 << 20);
    for (let i = 0; i < ref.runs.length; i += 2) {
      let pos = ref.runs[i] * 4096;
      let left = ref.runs[i + 1] * 4096;
      while (left > 0) {
        const n = readSync(this.pagesFd, buf, 0, Math.min(left, buf.length), at);
        if (n <= 0) throw new AppshotError('corrupt image: page data ends early');
        writeSync(fd, buf, 0, n, pos);
        at += n;
        pos += n;
        left -= n;
      }
    }
  }

  /** copyPages as the file's owner would write (the addon's
   * copyPagesAsOwner: its quota and ext4's root reserve hold), the whole
   * copy on one thread of the owner's identity, however many runs: true;
   * false where the owner cannot be taken here and the restorer's ids
   * without capabilities wrote it. */
  copyPagesAsOwner(fd: number, ref: { offset: bigint; runs: number[] } | undefined): boolean {
    if (!ref) return true;
    const at = Number(ref.offset);
    let total = 0;
    for (let i = 1; i < ref.runs.length; i += 2) total += ref.runs[i] * 4096;
    waitPagesChecked(this.pagesCheck, at, total);
    try {
      return addon().copyPagesAsOwner(fd, this.pagesFd, at, ref.runs);
    } catch (e) {
      if ((e as { endedEarly?: boolean }).endedEarly) throw new AppshotError('corrupt image: page data ends early');
      throw e;
    }
  }

  /** The application's log, for what wrote to a terminal or to a reader
   * that stayed behind. */
  log(): number {
    return this.keep(openSync(this.logPath, fs.O_WRONLY | fs.O_APPEND | fs.O_CREAT, 0o600));
  }

  devNull(flags: number): number {
    return this.keep(openSync('/dev/null', flags & O_ACCMODE));
  }

  /** Gives our `fd` to the remote process: pidfd_getfd run inside it.
   * Three calls of their own, not a batch (takeDescriptors): a batch of
   * the main thread takes the calls deferred to its next stop along
   * (memory's closes and protections, the descriptor table's), and where
   * they run among a restore's steps is theirs to say, not a hand-over's. */
  transfer(r: RemoteProcess, fd: number): number {
    const pidfd = Number(r.call('pidfd_open', SYS.pidfd_open, [process.pid, 0]));
    try {
      return Number(r.call('pidfd_getfd', SYS.pidfd_getfd, [pidfd, fd, 0]));
    } finally {
      r.call('closing', SYS.close, [pidfd]);
    }
  }

  /** Registers what removes an object this restore made in the system
   * (not in a process, which dies with a failed restore). */
  undoOnFailure(undo: () => void): void {
    this.undoing.push(undo);
  }

  /** Told the name of each named message queue made in the system, at
   * once: the driver writes it into the registration, so that a restore
   * killed (kill -9) before its commit has it removed by the next command,
   * as its SysV objects are. */
  recordQueueMade?: (name: string) => void;

  /** Told, before it is made, each REDIR PATH copy of a clone's that is
   * not there yet (clonePath): written into the registration, so that a
   * clone killed while it makes the copy, or before its commit, has it
   * removed by the next command, unless another instance uses it
   * (registry.ts releaseRedirCopies). A copy in a directory made for the
   * instance goes with the directory already; one in a directory that
   * was there would stay. `temporary`: the name it is made under first
   * (privateCopy), this restore's alone, removed whatever else uses the
   * target's directory. */
  recordRedirCopyPlanned?: (target: string, temporary?: boolean) => void;

  /** Told, before it is made, each name a socket file of this restore
   * takes that the application does not have (resources/socketfile.ts:
   * `.appshot-bound-*`, a name the application renamed or removed its
   * file from), with the identities it is made as: written into the
   * registration, so that a restore killed before its commit has a stale
   * socket file there removed by the next command. */
  recordSocketFileMade?: (dir: string, name: string, who: FsIdentities | undefined) => void;

  /** Told, before it is made, the name a deleted executable's copy is
   * made at for an instant (deleted.ts madeAtItsName: the program's own
   * name), with the identities it is made as: written into the
   * registration, so that a restore killed in that instant has the empty
   * file it left there removed by the next command (review r413 F2). */
  recordExecutableNameMade?: (dir: string, name: string, who: FsIdentities | undefined) => void;

  /** Told, as soon as it is done, that the copy recordExecutableNameMade
   * named left nothing of ours at that name (made and removed, or never
   * made: EEXIST): the name taken out of the registration again, so that
   * a release never removes a file there that the restore did not make
   * (review r425 G1: another program's empty 0600 lock file). */
  recordExecutableNameDone?: (dir: string, name: string) => void;

  /** The restore failed: what it made in the system is removed. */
  undo(): void {
    for (const undo of this.undoing.splice(0).reverse())
      try {
        undo();
      } catch {
        /* removed meanwhile */
      }
  }

  /** Runs `step` once every process is as it will run: its memory
   * filled, its protections and advice given, the restore's scratch areas
   * unmapped; its threads, timers, limits and credentials restored (what
   * reads a process's own /proc text: its listing of its mappings,
   * listings.ts; its status, timers, io, proctext.ts). Asked once they
   * are (a step added after processesAreFinal), it runs at once: never
   * left waiting for a moment that has passed (review r393: a deleted
   * file's times would silently never be given). */
  whenProcessesAreFinal(step: () => void): void {
    if (this.processesFinal) step();
    else this.afterProcesses.push(step);
  }

  /** Every process is as it will run: what waited for it runs. */
  processesAreFinal(): void {
    this.processesFinal = true;
    for (const step of this.afterProcesses.splice(0)) step();
  }

  close(): void {
    this.tcp.close();
    this.kept.close();
    for (const fd of this.mine.splice(0))
      try {
        closeSync(fd);
      } catch {
        /* closed already */
      }
  }
}
