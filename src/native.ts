/**
 * Where the native products live and the typed face of the addon.
 * All three are built by `npm install` (binding.gyp).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AppshotError } from './errors.js';
import type { Identity, InodeOwner, PeerCred, TcpConnection, WaitSlot } from './image/types.js';
import type { ParsedSmaps } from './procfs.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const release = join(root, 'build', 'Release');

/** addon processFacts: who a process is, and which files under a prefix it
 * holds open. */
export interface ProcessFacts {
  pid: number;
  start: number;
  /** Real, effective, saved, filesystem. */
  uids: [number, number, number, number];
  /** Each descriptor opened for reading and writing (not O_PATH: review
   * r435 N1), its target, and the file it is ("MAJOR:MINOR:INO", as
   * fileIdentity, of the file pinned while its flags were read): the
   * target's text alone does not say which file. `tied`: whether the
   * kernel's fdinfo tied the flags to that file by its inode (5.14 on);
   * before, a dup2 swap could pair one file with another's flags (review
   * r452 F2). */
  held: { path: string; identity: string; tied: boolean }[];
}

export const paths = {
  addon: join(release, 'appshot.node'),
  preload: join(release, 'appshot_preload.so'),
  init: join(release, 'appshot-init'),
  keeper: join(release, 'appshot-keeper'),
  guard: join(release, 'appshot-guard'),
};

/** The resource kinds of the translation tables, in the header's order. */
export const kinds = ['pid', 'semid', 'shmid', 'msgid', 'semkey', 'shmkey', 'msgkey', 'port'] as const;
export type Kind = (typeof kinds)[number];

/** A unix message's sender as SCM_CREDENTIALS names it. */
export interface MessageCreds {
  pid: number;
  uid: number;
  gid: number;
}

export interface TableEntry {
  virtual: number;
  system: number;
  flags: number;
  /** For a thread: the system PID of its process. */
  owner: number;
}

/** The instance section of the tables: path rewriting, SET ENV, identity. */
export interface InstanceConfig {
  redirs: { kind: 'path' | 'cow'; from: string; to: string }[];
  env: string[];
  /** Absent: that of an application `run` started (all zero, the default
   * reseeding). */
  identity?: Identity;
}

/** A table entry's flags (appshot_table.h, APPSHOT_F_*), one name each
 * for every module that reads them. */
export const ENTRY_FLAGS = {
  /** PID: the application's init (virtual PID 1). */
  init: 0x1,
  /** PID: a thread's entry, not a process's. */
  thread: 0x2,
  /** PID: this process has thread entries. */
  hasThreads: 0x4,
  /** A key reserved by a create in progress, or by one killed inside it
   * that no writer has settled yet: nothing translates through it. */
  reserved: 0x8,
  /** PID: the process, or one it descends from, restricted itself with
   * Landlock (the preload library saw it). */
  landlock: 0x10,
  /** PID: the process executed another program while holding SEM_UNDO
   * adjustments its new program's library cannot know. */
  semUndoExec: 0x20,
} as const;

export interface TablesSnapshot {
  aid: string;
  initPid: number;
  repairs: number;
  tables: Record<Kind, TableEntry[]>;
  instance: InstanceConfig & { tablesPath: string; identity: Identity };
  /** What the preload library noted of sockets (appshot_table.h); absent
   * from a registry's copy of older tables. */
  sockets?: SocketNotes;
  /** Wait calls in flight (appshot_table.h); absent from a registry's copy
   * of older tables. */
  waits?: WaitSlot[];
}

/** What the preload library noted of sockets, and what it could not
 * (`lost` notes, which may have been of the sockets and reuseport groups
 * `lostSeen` holds, a filter socketNoteLost reads; there when `lost`). */
/** A netlink socket as netlink_diag shows it (addon netlinkSockets). */
export interface NetlinkSeen {
  ino: number;
  protocol: number;
  type: number;
  /** NETLINK_CONNECTED (1): connect() gave it a destination. */
  state: number;
  portid: number;
  dstPortid: number;
  dstGroup: number;
  /** NDIAG_FLAG_*: a dump running, and the options the kernel shows. */
  flags: number;
  /** Bytes queued for reading, and being sent. */
  rmem: number;
  wmem: number;
  drops: number;
  /** The group numbers joined (1-based), every one, beyond 32 too. */
  groups: number[];
}

export interface SocketNotes {
  notes: SocketNote[];
  lost: number;
  lostSeen?: Buffer;
}

/** A socket option the kernel does not show, noted when it was set. */
/** A unix socket as sock_diag shows it; vfsIno/vfsDev: a named socket's
 * file (st_ino, st_dev), wherever it is now. */
export interface UnixSocketInfo {
  ino: number;
  peer: number;
  type: number;
  state: number;
  rqueue: number;
  wqueue: number;
  shutdown: number;
  vfsIno?: number;
  vfsDev?: number;
}

/** A file as stat(2) names it. */
/** What the kernel consults on a path (fsident.c, src/resources/fsident.ts). */
export interface FsIdentity {
  fsuid: number;
  fsgid: number;
  groups: number[];
  capEff: bigint;
}

/** Identities tried in order: refused as one (EACCES, EPERM), an
 * operation is tried as the next (fsident.c). */
export type FsIdentities = FsIdentity | FsIdentity[];

export interface FileId {
  ino: number;
  dev: number;
}

export interface SocketNote {
  ino: bigint;
  level: number;
  name: number;
  value: number;
  port: number;
  kind: 'tcp' | 'udp' | '';
  /** A dnotify watch's (NOTE_DNOTIFY): the virtual PID of the process that
   * made it, whose descriptor table owns it (0 for the others). */
  maker?: number;
}

/** What one wait on the tracees reported (addon/src/trace.h). */
export interface TraceReport {
  kind: 'stop' | 'group-stop' | 'signal' | 'event' | 'syscall' | 'exited';
  tid: number;
  sig: number;
  event: number;
  msg: number;
  status: number;
}

/** Pages of one mapping as stored: (first page, count) pairs. */
export interface DumpedPages {
  offset: number;
  runs: Uint32Array;
  same: Uint32Array;
  /** Pages still shared copy-on-write with the process given as forkedFrom. */
  shared: Uint32Array;
  pages: number;
}

/** The process a dumped process was forked from, for the pages they still
 * share copy-on-write (a mapping both have at the same address). */
export interface ForkedFrom {
  pid: number;
  pagemapFd: number;
}

export interface ParentPages {
  index: Uint32Array;
  file: Uint32Array;
  offset: BigUint64Array;
  /** Pages written since the parent, from dirty tracking: the others the
   * parent holds are not read at all. */
  written?: Uint32Array;
}

/** dumpScanned's result: per mapping where its pages start in the file
 * (`offsets`) and how many (first, count) pairs of `runs` are its
 * (`counts`), in order; `pages`: the pages stored in all. */
export interface ScannedPages {
  offsets: Float64Array;
  counts: Uint32Array;
  runs: Uint32Array;
  pages: number;
}

/** An image's page file, written unnamed (O_TMPFILE) and named at the end. */
/** Syncs running (fsyncStart), to be waited for (fsyncWait). */
export type FsyncGroup = { readonly __fsyncGroup: unique symbol };

export interface PageWriter {
  dump(pid: number, pagemapFd: number, start: bigint, end: bigint, mode: number, parent?: ParentPages, forkedFrom?: ForkedFrom): DumpedPages;
  /** What dump gives for each of several mappings of one process (no
   * parent, no process forked from; PAGES_MODE anon or privateFile),
   * `bounds` [start, end] each, in ascending order, in one call and one
   * PAGEMAP_SCAN; undefined where the kernel has no PAGEMAP_SCAN (dump
   * them one by one). A mapping that cannot be read throws, with `index`. */
  dumpScanned(pid: number, pagemapFd: number, bounds: BigUint64Array, modes: Uint8Array): ScannedPages | undefined;
  append(data: Buffer): number;
  appendFd(fd: number, length: number): { offset: number; runs: Uint32Array };
  /** Flushed and synced: the SHA-256 of each chunk, hashed by the writer
   * thread as it wrote, and how long waiting for that thread's queue and
   * then fsync took (the snapshot's phases). With `deferSync`, the fsync
   * is only started (fsyncMs 0), beside the last digests and whatever
   * comes next: synced() waits for it, before the file may be published. */
  finish(deferSync?: boolean): PageFileDigest & { drainMs: number; fsyncMs: number; hashMs: number };
  /** Waits for the fsync finish(true) started (throws its error): its
   * own milliseconds, 0 if none was pending. */
  synced(): number;
  /** Lets the chunk digests be computed from what is written so far: on
   * one thread (`all` false: beside the writer thread while it writes
   * what is queued) or on every core. Not called, they are all computed
   * by finish. */
  startHashing(all: boolean): void;
  /** Starts sending what is written to the disk as it goes, so that
   * finish's fsync finds little left: see pw_flush_start. */
  startFlushing(): void;
  /** Prepares the file's first `bytes` (page cache allocated and faulted
   * in) before the application is frozen: 0, or -errno (not prepared,
   * which is no failure). See pw_reserve. */
  reserve(bytes: number): number;
  /** Lets go of the file once it is linked or streamed (abort, which it
   * is, named for the path that succeeded): see PageWriter.Abort. */
  close(): void;
  link(path: string): void;
  fd(): number;
  /** Bytes in the file so far (the writer thread's, not what is queued). */
  written(): number;
  /** Queues the current buffer and waits up to `timeoutMs` for the writer
   * thread to catch up; throws its write error. */
  drain(timeoutMs: number): void;
  abort(): void;
}

/** What a finished page file is, for the image's manifest: its size and
 * the SHA-256 of each `chunkSize` bytes (the last chunk shorter). */
export interface PageFileDigest {
  size: number;
  chunkSize: number;
  chunks: Buffer;
}

/** A page file being checked against its chunk digests, on a thread per
 * core, first chunk first: by groups of up to sixteen hashed side by side
 * where the CPU has AVX-512 (pages.h, pages_check; addon_restore.cc). */
export interface PagesCheck {
  /** Waits up to `timeoutMs` (negative: for ever) for the chunks touching
   * [offset, offset + length) (default: all). `chunk`: the first that
   * failed; `errno`: 0 when its bytes differ, else why it was not read. */
  wait(timeoutMs: number, offset?: number, length?: number): { state: 'good' | 'pending' | 'bad'; chunk: number; errno: number };
  /** Bytes checked so far. */
  checked(): number;
  /** Chunks the sixteen-lane code found good (the others: OpenSSL's). */
  byLanes(): number;
  /** Stops the threads; the file's own descriptor is closed. */
  stop(): void;
}

/** pages_mode (addon pages.h); noScan is or'ed into one: every page map
 * entry read, none skipped by PAGEMAP_SCAN (a VM_PFNMAP mapping). */
export const PAGES_MODE = { anon: 0, privateFile: 1, allPresent: 2, all: 3, noScan: 8 } as const;

interface IpcPerm {
  key: number;
  uid: number;
  gid: number;
  cuid: number;
  cgid: number;
  mode: number;
}

interface Addon {
  /** exitKill: the tracee dies with us until keepOnExit (restores). */
  seize(tid: number, exitKill?: boolean): void;
  keepOnExit(tid: number): void;
  /** keepOnExit of each, in one call; throws at the first that fails. */
  keepOnExitAll(tids: number[]): void;
  /** The options seize(tid, true) sets, set again. */
  killOnExit(tid: number): void;
  interrupt(tid: number): void;
  cont(tid: number, sig: number): void;
  detach(tid: number, sig: number): void;
  /** detach(tid, 0) of each in order, in one call, up to the first that
   * fails: how many were let go. */
  detachAll(tids: number[]): number;
  wait(tid: number, timeoutMs: number): TraceReport | null;
  /** The next report of one of `tids` (never another child of this process), or null after timeoutMs. */
  waitAny(tids: number[], timeoutMs: number): TraceReport | null;
  getRegs(tid: number): Buffer;
  setRegs(tid: number, regs: Buffer): void;
  rewind(regs: Buffer): Buffer | null;
  getXstate(tid: number): Buffer;
  setXstate(tid: number, xstate: Buffer): void;
  getSigmask(tid: number): bigint;
  setSigmask(tid: number, mask: bigint): void;
  getSiginfo(tid: number): Buffer;
  peekSiginfo(tid: number, shared: boolean): Buffer;
  getRseq(tid: number): { pointer: bigint; size: number; signature: number; flags: number };
  getRobustList(tid: number): { head: bigint; length: number };
  /** seed: the thread is a restore's seed, its signals all blocked (see
   * trace_inject_seed). */
  inject(tid: number, syscallInsn: bigint, nr: number, args: (bigint | number)[], seed?: boolean): bigint;
  /** clone(flags) run in the stopped thread `tid` (traced with PTRACE_O_TRACEFORK): its
   * child is traced from its birth, waited for in its first stop and set to die with us;
   * child 0 if there is none (ret: the call's result, -errno). */
  forkStopped(tid: number, syscallInsn: bigint, flags: bigint): { ret: bigint; child: number };
  /** Kills a child of forkStopped and waits for its death (its real parent reaps it). */
  endChild(pid: number): void;
  /** The code that runs a batch of system calls inside a thread, and the offset where it stops itself when done. */
  /** frameRoom: bytes injectBatch's frame needs (see injectBatch). */
  batchCode(): { code: Buffer; stoppedAt: number; frameRoom: number };
  /** Runs the batch whose table is at `table`, with that code copied at `code`, in one stop.
   * clones: a restore's batch of clone(CLONE_THREAD | CLONE_PTRACE) calls, whose threads
   * are traced from their creation without a clone event each (trace_inject_batch_clones).
   * frame: frameRoom bytes where the batch's signal frame goes, that takes the thread back
   * to where it was on its own if appshot dies while it runs the batch (trace_inject_batch_framed).
   * end: the thread's batch end as its last batch returned it (0: none yet), kept unless its
   * signal is pending now; returns the one this batch used (trace.c choose_batch_end). */
  injectBatch(tid: number, code: bigint, table: bigint, clones?: boolean, frame?: bigint, end?: number): number;
  /** Each [tid, table] job's batch, all from `code`, run at once (their
   * stops overlapping); each job's 0 or -errno, every thread put back.
   * end: as injectBatch returned it for a thread of the process. */
  injectBatches(code: bigint, jobs: [number, bigint][], end?: number): number[];
  /** The thread's seccomp filters, oldest first (needs CAP_SYS_ADMIN). */
  seccompFilters(tid: number): { program: Buffer; flags: bigint }[];
  /** Injected calls bypass the thread's seccomp filters until it is
   * let go (PTRACE_O_SUSPEND_SECCOMP; needs CAP_SYS_ADMIN). */
  /** exitKill: keep PTRACE_O_EXITKILL (a restore's tracees, until the commit). */
  suspendSeccomp(tid: number, exitKill?: boolean): void;
  /** This thread's PR_GET_SECUREBITS. */
  securebits(): number;
  /** Any thread's scheduling policy (with SCHED_RESET_ON_FORK), priority,
   * CPU affinity (as many bytes as the kernel's mask) and I/O priority,
   * asked from this process. */
  schedAttributes(tid: number): { policy: number; priority: number; affinity: Buffer; ioprio: number };
  /** sched_setaffinity of any thread, from here. */
  setAffinity(tid: number, mask: Buffer): void;
  /** A process of its own that puts `mask` back as thread `tid`'s CPU
   * affinity if appshot dies before releaseGuard (a probe that pins it). */
  guardAffinity(tid: number, mask: Buffer): { fd: number; pid: number };
  releaseGuard(guard: { fd: number; pid: number }): void;
  readMemory(pid: number, addr: bigint, length: number): Buffer;
  /** The CPU time process `pid` has used (all its threads, and those that
   * exited), in nanoseconds: its CLOCK_PROCESS_CPUTIME_ID. */
  processCpuTimeNs(pid: number): bigint;
  writeMemory(pid: number, addr: bigint, data: Buffer): void;
  /** A new io_uring's SQ head and CQ tail brought to `sqHead`, `cqTail`
   * by NOPs (addon/src/iouring.c): the io_uring_enter calls it made. */
  /** Whether ring `fd` of `pid` has an eventfd registered: 1, 0, or -errno
   * (addon/src/iouring.c; the ring left as it was). */
  ioUringHasEventfd(pid: number, fd: number): number;
  ioUringAdvance(a: { pid: number; fd: number; sqEntries: number; cqEntries: number; ringBytes: number; sqeBytes: number; arrayOffset: number; sqeSize: number; sqHead: number; cqTail: number }): number;
  sockInfo(fd: number): { family: number; type: number; listening: boolean; reuseaddr: boolean; reuseport: boolean; v6only: boolean };
  crc32c(data: Buffer, seed?: number): number;
  scanWritten(pagemapFd: number, start: bigint, end: bigint, reset: boolean): Uint32Array | null;
  /** Whether [start, end) holds any page present or swapped (the zero
   * page and guard or uffd-wp markers count), in one PAGEMAP_SCAN that
   * stops at the first; null where the kernel has none. */
  scanAny(pagemapFd: number, start: bigint, end: bigint): boolean | null;
  /** The address of the first page in [start, end) present or swapped,
   * false where there is none; null where the kernel has no PAGEMAP_SCAN. */
  scanFirst(pagemapFd: number, start: bigint, end: bigint): bigint | false | null;
  /** How many pages of [start, end) are present or swapped, counted up to
   * `limit`; null where the kernel has no PAGEMAP_SCAN. */
  scanCount(pagemapFd: number, start: bigint, end: bigint, limit: bigint): number | null;
  /** Of a descriptor: read from its offset, left open. */
  crc32cFile(pathOrFd: string | number): { size: number; crc: number };
  /** Unmaps the buffers kept warm between page files that lay unused
   * `unusedSeconds` or more (all of them with 0); how many. */
  releaseKeptBuffers(unusedSeconds: number): number;
  /** Every descriptor of `pid`: its /proc/PID/fd link and fdinfo text, ascending. */
  /** uid, gid: a pipe's or socket's inode owner. */
  fdEntries(pid: number): { fd: number; target: string; info: string; uid?: number; gid?: number; mode?: number }[];
  /** Many /proc files in one call (procfs.ts's gather): kinds[i] 0 text,
   * 1 bytes, 2 a link's target, 3 a directory's names (sorted as
   * readdirSync sorts them); undefined where one cannot be read. */
  readProcFiles(paths: string[], kinds: Uint8Array): (string | Buffer | string[] | ParsedSmaps | undefined)[];
  getFd(pid: number, fd: number): number;
  /** kcmp(KCMP_FILES): 0 if the processes share one descriptor table,
   * 1 or 2 ordering two tables, -1 if the kernel cannot compare them. */
  compareFileTables(pid1: number, pid2: number): number;
  /** kcmp(KCMP_FS): 0 if the tasks share one working directory, root and
   * umask, 1 or 2 ordering two, -1 if the kernel cannot compare them. */
  compareFsStructs(tid1: number, tid2: number): number;
  /** kcmp(KCMP_VM): 0 if the tasks share one memory (CLONE_VM), 1 or 2
   * ordering two, -1 if the kernel cannot compare them. */
  compareMms(pid1: number, pid2: number): number;
  /** The mode of a stopped (traced) thread's syscall user dispatch
   * (PR_SET_SYSCALL_USER_DISPATCH; 0: off), -errno where the kernel
   * cannot say (before 5.19). */
  syscallDispatchMode(tid: number): number;
  /** ioctl(FIONREAD): the bytes a read of `fd` would find queued, -errno
   * where it cannot say. */
  bytesToRead(fd: number): number;
  sameDescription(pid1: number, fd1: number, pid2: number, fd2: number): boolean;
  /** For each descriptor i (process pids[i], number fds[i]), the lowest
   * index of those that are one open file description with it (itself
   * where none is); null where the kernel has no kcmp. Sorts by kcmp's
   * ordering: n log n comparisons. */
  descriptionGroups(pids: number[], fds: number[]): number[] | null;
  /** Whether the `toff`th target of epoll `epfd` registered as `tfd` is
   * `fd`'s open file description (kcmp KCMP_EPOLL_TFD). */
  epollTargetIs(pid: number, epfd: number, tfd: number, toff: number, fd: number): boolean;
  /** `packets`: each packet's length, for data written in packet mode. */
  peekPipe(fd: number): Buffer & { packets?: number[] };
  semRead(semid: number): { perm: IpcPerm; values: number[]; pids: number[] };
  /** An attached segment's IPC_STAT, its pages that are not all zero
   * copied into `piece` a run at a time and handed to `onRun` (bytes,
   * first page): a segment of any size through one buffer. */
  shmReadPieces(shmid: number, piece: Buffer, onRun: (bytes: number, firstPage: number) => void): { perm: IpcPerm; size: number; cpid: number; lpid: number; locked: boolean; destroyed: boolean };
  /** A page file's size, its bytes on disk, and whether its file system
   * shows holes (SEEK_HOLE finds one before its end). */
  pageFileHoles(fd: number): { size: number; allocated: number; holesSeen: boolean };
  msgRead(msqid: number): {
    perm: IpcPerm;
    qbytes: number;
    lspid: number;
    lrpid: number;
    messages: { type: number; data: Buffer }[];
  };
  /** `direct`: written with O_DIRECT, no page cache made (see pw_open). */
  PageWriter: new (dir: string, parentFds: number[], queueLimit?: number, direct?: boolean) => PageWriter;
  /** `threads`: how many check (default: one per core). */
  PagesCheck: new (fd: number, size: number, chunkSize: number, table: Buffer, threads?: number) => PagesCheck;
  pipe(): [number, number];
  socketPair(type: number): [number, number];
  /** A connected unix pair whose ends see these peers (SO_PEERCRED,
   * SO_PEERGROUPS); null: appshot's own credentials (peercred.c). */
  socketPairAs(type: number, see0: PeerCred | null, see1: PeerCred | null): [number, number];
  /** Who a connected unix socket's peer is, as the kernel recorded it. */
  peerCred(fd: number): PeerCred;
  unixSockets(): UnixSocketInfo[];
  /** A TCP socket asked of itself: state, own address, peer ("address:port"), backlog when listening. */
  tcpEndpoint(fd: number): { state: number; address: string; port: number; remote: string; backlog: number };
  peekSocket(fd: number, max: number): Buffer;
  /** Whether a stream socket holds an out-of-band byte (MSG_OOB) not yet
   * read; left where it is. */
  oobPending(fd: number): boolean;
  pipeCapacity(fd: number, size?: number): number;
  spawnDetached(path: string, argv: string[], outFd: number): { pid: number; statusFd: number; lifelineFd: number };
  /** The same on a thread of the pool: this thread does not wait for the
   * program's exec. outFd stays open until it settles. */
  spawnDetachedAsync(path: string, argv: string[], outFd: number): Promise<{ pid: number; statusFd: number; lifelineFd: number }>;
  /** Starts a program in a session of its own, its standard descriptors
   * on /dev/null; its PID (reaped by reapDetached). */
  spawnQuiet(path: string, argv: string[]): number;
  /** Waits for those spawnDetached started that have ended; how many. */
  reapDetached(): number;
  /** Copies page data into a stopped process: runs of [index into fds,
   * file offset, address, length], each page file mapped once.
   * `checks[i]`: page file i's PagesCheck: no chunk is copied before it is
   * checked, and one that failed throws (code EBADMSG, or ECHECK when it
   * could not be read; `chunk` and `file` name it). */
  writePageRuns(pid: number, fds: number[], runs: Float64Array, checks?: (PagesCheck | undefined)[]): void;
  eventfd(count: number, flags: number): number;
  /** memfd_create(name, MFD_CLOEXEC | flags), ftruncate'd to `size`. */
  memfd(name: string, size: number, flags?: number): number;
  lseek(fd: number, offset: number): number;
  /** Exact: a directory's position can be a 64-bit cookie (ext4's hash). */
  lseek(fd: number, offset: bigint): bigint;
  setStatusFlags(fd: number, flags: number): void;
  /** ioctl(2): a Buffer argument by its address (read and written in
   * place), a number as it is. Throws on failure. */
  ioctl(fd: number, request: number, arg: Buffer | number): number;
  /** fallocate(FALLOC_FL_KEEP_SIZE) of each [offset, length] pair of
   * `ranges`, as the file's owner and never with CAP_SYS_RESOURCE (the
   * owner's quota and ext4's root reserve hold: addon_restore.cc): throws
   * with errno's code (EOPNOTSUPP, ENOSPC, EDQUOT), or, where the owner's
   * identity cannot be taken here (a user namespace), with
   * `ownerNotTaken` (no thread to take it on is an error of its own). */
  fallocateKeepSize(fd: number, ranges: bigint[]): void;
  /** A PageRef's data, from `offset` of `pagesFd` on, written into `fd`
   * run after run (`runs`: [page, count, ...]), all of it, on one thread
   * as fallocateKeepSize allocates (the owner's quota and ext4's root
   * reserve hold): true; false where the owner cannot be taken here and
   * the caller's ids without any capability wrote it. Throws with errno's
   * code (EDQUOT, ENOSPC), `endedEarly` where the page data ends before
   * the runs, `ownerNotTaken` where the caller's write failed. */
  copyPagesAsOwner(fd: number, pagesFd: number, offset: number, runs: number[]): boolean;
  /** futimens(2) to the nanosecond: times in nanoseconds since the epoch. */
  futimensNs(fd: number, atimeNs: bigint, mtimeNs: bigint): void;
  mkfifo(path: string, mode: number): void;
  /** The path of the inode a file handle names, opened on the filesystem
   * mounted at `mountPath` (needs CAP_DAC_READ_SEARCH). */
  fileHandlePath(mountPath: string, handleType: number, handleHex: string): string;
  /** listxattr(path), following it: the names of a file's extended
   * attributes ([] where its file system keeps none). */
  xattrNames(path: string): string[];
  /** FS_IOC_GETFLAGS of the file at `path` (opened read-only), -errno
   * where it cannot say. */
  inodeFlags(path: string): number;
  /** F_GET_SEALS: a memfd's seals; -1 for files that take none. */
  fileSeals(fd: number): number;
  /** F_ADD_SEALS. */
  addSeals(fd: number, seals: number): void;
  /** `early`: options set between socket() and bind(). */
  /** `dir`: where a relative unix name is resolved. `peerCred`: a unix
   * listener listens with those credentials (peercred.c). `owner`: the
   * socket is made with that fsuid and fsgid (its inode owner, sk_uid,
   * and its file's credentials, from the start). */
  listenSocket(s: { family: number; type: number; address: string; port: number; backlog: number; reuseaddr: boolean; reuseport: boolean; v6only: boolean; early?: { level: number; name: number; bytes: Buffer }[]; listen?: boolean; dir?: string; as?: FsIdentities; peerCred?: PeerCred | null; owner?: InodeOwner | null }): number;
  /** A socket listenSocket bound with `listen: false` listens now. */
  listenNow(fd: number, backlog: number, reuseaddr: boolean): void;
  /** TCP_REPAIR: 1 on, 0 off, -1 off without the window probe to the peer. */
  tcpRepair(fd: number, mode: 1 | 0 | -1): void;
  /** Every packet to the socket dropped (true), as if lost on the way,
   * or not; EEXIST for a socket with a filter of its own. */
  tcpLock(fd: number, on: boolean): void;
  /** A guardian of the sockets held in repair mode, which lets each out
   * of it the moment appshot is gone (appshot-guard, tcp_repair.h): the
   * channel to it, and its PID. */
  tcpGuardStart(binary: string): { fd: number; pid: number };
  /** Hands it a duplicate of socket `socket` (before it enters repair
   * mode): `locked`, the drop-all filter may be attached; `reuse`, the
   * application's SO_REUSEADDR. */
  tcpGuardAdd(fd: number, socket: number, locked: boolean, reuse: number): void;
  /** It lets go of the sockets untouched; `fd` is closed and it is reaped. */
  tcpGuardDisarm(fd: number, pid: number): void;
  /** An appshot-keeper holds `fds` at `path` for image `imageId`, at most `holdSeconds` (tcp.ts). */
  keepConnections(binary: string, path: string, imageId: string, holdSeconds: number, fds: number[]): void;
  /** The kept sockets of image `imageId` ([] if dropped for another image) and the connection to say keeperDone on, null if no keeper is at `path`; throws (EAGAIN) if the keeper has not answered within `waitMs` (10 s). */
  takeConnections(path: string, imageId: string, waitMs?: number): { fds: number[]; control: number } | null;
  /** The restore committed: the keeper lets its copies go (closes `control`). */
  keeperDone(control: number): void;
  /** The connection of a socket in repair mode (addon/src/tcp_repair.c). */
  tcpRead(fd: number): RepairedConnection;
  /** A socket in repair mode carrying `c` on; tcpRelease finishes it. */
  tcpMake(c: RepairedConnection): number;
  /** Repair mode off, then the never-sent bytes written. */
  tcpRelease(fd: number, unsent: Buffer): void;
  /** The peer's FIN of a connection in CLOSE_WAIT, sent to it again. */
  tcpRefin(c: RepairedConnection): void;
  /** tcpi_state */
  tcpState(fd: number): number;
  /** A connected TCP socket whose connection was reset. */
  tcpResetSocket(family: number): number;
  getSockOpt(fd: number, level: number, name: number): number;
  /** Raw struct sockaddr: getsockname; getpeername (null: not connected). */
  sockName(fd: number): Buffer;
  peerName(fd: number): Buffer | null;
  /** pidfd_open(pid, flags): flags 0 or PIDFD_NONBLOCK. */
  pidfdOpen(pid: number, flags: number): number;
  /** pidfd_send_signal(pidfd, signal): throws with code ESRCH if the
   * process it names has ended. */
  pidfdSendSignal(pidfd: number, signal: number): void;
  /** socket(family, type | SOCK_CLOEXEC, 0) */
  /** `owner`: made with that fsuid and fsgid (its inode owner, sk_uid and file credentials). */
  sockOpen(family: number, type: number, protocol?: number, owner?: InodeOwner): number;
  /** `dir`: where a relative unix name is resolved (the process's working directory if absent). */
  sockBind(fd: number, addr: Buffer, dir?: string, who?: FsIdentities): void;
  /** The file a unix socket's bind made (st_ino, st_dev); undefined for an abstract or unnamed one. */
  socketFileOf(fd: number): FileId | undefined;
  /** A socket file at `name` in `dir` no live socket holds is removed; true if a live one holds it. */
  socketFileClear(dir: string, name: string, who?: FsIdentities): boolean;
  /** The file `id` at `name` in `dir` given its owner and mode, then moved to `renamed` beside it. */
  socketFileFinish(dir: string, name: string, id: FileId, file: { uid: number; gid: number; mode: number; renamed?: string }, who?: FsIdentities): void;
  /** Removes `name` from `dir` if it is the file `id`; whether it did. */
  socketFileRemove(dir: string, name: string, id: FileId, who?: FsIdentities): boolean;
  /** The file `id` at `from` in `dir` moved to `to` there (nothing replaced). */
  socketFileMove(dir: string, from: string, to: string, id: FileId, who?: FsIdentities): void;
  /** An O_PATH descriptor of `name` in `dir` (opened as `who`), which must
   * be the file unix socket `sock`'s bind made (ESTALE otherwise): sent to
   * as /proc/self/fd/N, never by a name looked up again. */
  socketFileTarget(sock: number, dir: string, name: string, who?: FsIdentities): number;
  /** A new file at `name` in `dir` (O_EXCL, O_NOFOLLOW), removed from it
   * at once through one descriptor of `dir`, all as `who` (exename.c):
   * our read-write descriptor of it, with no name left. Error codes:
   * EEXIST (a file at the name), ESTALE (ours moved elsewhere as it was
   * made), EMLINK (given another name as it was made), else the errno of
   * the step that failed; the error's leftAtName is true when our empty
   * file may still be at the name (its removal refused). `aside`: `name`
   * is a random one beside the program's (no test point reached). */
  executableNameMake(dir: string, name: string, who?: FsIdentities, aside?: boolean): number;
  /** What a killed restore's executableNameMake left at `name` in `dir`
   * (a regular file, empty, mode 0600, one name, the identity's) removed
   * as `who`, through `dir`'s descriptor; whether it was. */
  executableNameClear(dir: string, name: string, who?: FsIdentities): boolean;
  /** `dir`: where a relative unix name is resolved. `peerCred`: a unix
   * listener listens with those credentials (peercred.c). */
  sockConnect(fd: number, addr: Buffer, dir?: string, who?: FsIdentities): void;
  /** open(2) (O_CLOEXEC added) as `who` (fsident.c): what that process
   * could open, never through a /proc magic link (throws ELOOP with
   * `magicLink` set: fsident.ts refuseMagicLink). `dir`: our descriptor
   * of a directory a relative `path` is walked from (openat). */
  openAs(path: string, flags: number, mode: number, who?: FsIdentities, dir?: number): number;
  /** An O_PATH descriptor of the regular file `path` if `who` reaches it
   * and may execute it (fsident's ExecOp): a process's executable. */
  openExecAs(path: string, who?: FsIdentities): number;
  /** mq_open(name, flags) of an existing queue as `who` (no O_CREAT). */
  mqOpenAs(name: string, flags: number, who?: FsIdentities): number;
  /** inotify_add_watch(fd, /proc/self/fd/`at`, mask) as `who`: its wd.
   * `at`: our O_PATH descriptor of what is watched (openAs, checked);
   * `shown`: its name, for the error's message, and walked again (no symlink followed) by a retry identity, which must reach the same inode. */
  inotifyAddWatchAs(fd: number, at: number, mask: number, who?: FsIdentities, shown?: string): number;
  /** Watch descriptors `next` .. `upTo - 1` of our descriptor of an
   * inotify instance spent (added and removed on `path`), their events
   * read out: the number the instance gives next. */
  inotifySkipWds(fd: number, path: string, next: number, upTo: number): number;
  /** fanotify_mark(fd, flags, mask, AT_FDCWD, /proc/self/fd/`at`) as
   * `who` (`at`, `shown`: as inotifyAddWatchAs's). */
  fanotifyMarkAs(fd: number, flags: number, mask: bigint, at: number, who?: FsIdentities, shown?: string): void;
  /** One message, whole, to `addr` or to the connected peer (null). */
  /** `creds`: sent with SCM_CREDENTIALS naming them. */
  sockSend(fd: number, data: Buffer, addr: Buffer | null, creds?: MessageCreds): void;
  sockShutdown(fd: number, how: number): void;
  /** Every message queued for reading, left queued (SO_PEEK_OFF). */
  /** `shutForReading`: a peek answering 0 ends the queue (dgram.h). */
  /** `to`, `tos`, `ttl`: the IP header fields an IP socket asks to be shown
   * (IP_PKTINFO, IP_RECVTOS, IP_RECVTTL, their IPv6 twins): null, -1 if not. */
  /** `creds` (a unix socket with SO_PASSCRED): each message's
   * SCM_CREDENTIALS as shown to this process (null: none shown). */
  datagramQueue(fd: number, maxCount: number, maxTotal: number, maxOne: number, shutForReading?: boolean, creds?: boolean): { data: Buffer; from: Buffer | null; to: Buffer | null; tos: number; ttl: number; creds: MessageCreds | null }[];
  /** A UDP datagram as if `from` had sent it to `to` (raw socket, CAP_NET_RAW),
   * with that TOS or traffic class (0-255) and TTL or hop limit (1-255). */
  udpInject(from: Buffer, to: Buffer, data: Buffer, tos: number, ttl: number): void;
  /** Every UDP socket of the family, with its sk_shutdown. */
  udpSockets(family: number): { ino: number; shutdown: number }[];
  /** Every netlink socket of this network namespace (netlink_diag):
   * flags are NDIAG_FLAG_*, groups the group numbers joined. */
  netlinkSockets(): NetlinkSeen[];
  /** The PID of the process the kernel has as its audit daemon (0: none),
   * by AUDIT_GET, which needs CAP_AUDIT_CONTROL; throws (code EPERM,
   * ECONNREFUSED: no audit here) otherwise. */
  auditDaemonPid(): number;
  /** Inodes of the TCP sockets of `family` (AF_INET 2, AF_INET6 10)
   * listening on `port` in this network namespace (sock_diag). */
  tcpListeningInodes(family: number, port: number): number[];
  /** The TCP sockets of `family` listening on `port` in this network
   * namespace (sock_diag), from one answer each: inode, its owner (uid),
   * bound address (4 bytes for AF_INET, 16 for AF_INET6, network order)
   * and, for AF_INET6, IPV6_V6ONLY. */
  tcpListeners(family: number, port: number): { ino: number; uid: number; address: Buffer; v6only?: boolean }[];
  /** Established TCP connections whose local port is `port` (sock_diag),
   * and whose local address is `local` if given and not a wildcard (a
   * listener's bound address); ino 0: still in a listener's accept queue. */
  tcpEstablished(family: number, port: number, local?: string): { ino: number; remote: string; port: number }[];
  /** callback(status) once the listener `fd` has a connection waiting, on
   * this event loop; not again until watchAgain. Returns its id. */
  watchReadable(fd: number, callback: (status: number) => void): number;
  watchAgain(id: number): void;
  unwatch(id: number): void;
  /** Connections waiting in the accept queue of listening TCP socket `fd`. */
  listenQueue(fd: number): number;
  dupFd(fd: number): number;
  /** The socket's source filter for a multicast group (a raw sockaddr) on
   * interface `ifindex`, at level IPPROTO_IP or IPPROTO_IPV6; null when it
   * is not a member. */
  multicastFilter(fd: number, level: number, ifindex: number, group: Buffer): { include: boolean; sources: Buffer[] } | null;
  /** Joins the group on the interface, then sets its source filter. */
  multicastJoin(fd: number, level: number, ifindex: number, group: Buffer, include: boolean, sources: Buffer[]): void;
  /** The interface of that name in our network namespace; 0 for none. */
  ifIndex(name: string): number;
  /** The name of interface `index`, "" when there is none. */
  ifName(index: number): string;
  /** A struct or string socket option, at most `room` bytes of it. */
  getSockOptBytes(fd: number, level: number, name: number, room: number): Buffer;
  setSockOptBytes(fd: number, level: number, name: number, value: Buffer): void;
  /** Options by [level, name, room] triples: option i's bytes at the sum
   * of the rooms before it in `data`, lengths[i] of them, or -errno. */
  getSockOptsBatch(fd: number, triples: Int32Array): { data: Buffer; lengths: Int32Array };
  setSockOpt(fd: number, level: number, name: number, value: number): void;
  restoreSem(tables: string, vid: number, vkey: number, mode: number, values: number[]): number;
  /** The segment filled from page file `pagesFd`: `runs` (first page, count) of its pages, stored one after another from `offset`. */
  restoreShm(tables: string, vid: number, vkey: number, mode: number, size: number, pagesFd: number, offset: number, runs: number[]): number;
  /** SHM_LOCK of a segment by a child as user `uid`/`gid`, without capabilities, with an RLIMIT_MEMLOCK of `memlock` bytes (Infinity: unlimited; at most this process's hard limit unless `mayRaise`), charged to that user. */
  lockShmAs(sid: number, uid: number, gid: number, memlock: number, mayRaise: boolean): void;
  /** POSIX message queues (resources/mqueue.ts); names "/NAME". */
  mqOpen(name: string, flags: number, mode: number, maxmsg: number, msgsize: number): number;
  mqUnlink(name: string): void;
  mqAttributes(fd: number): { maxmsg: number; msgsize: number; curmsgs: number };
  /** Every message received and sent back in the same order, by a fork
   * that gives them back even if appshot dies: the queue as it was. */
  mqTakeAndGiveBack(fd: number, msgsize: number, killWhenTaken?: boolean): { priority: number; data: Buffer }[];
  mqSend(fd: number, messages: { priority: number; data: Buffer }[]): void;
  /** Makes this restorer the last user of SysV segment `sid` (an attach
   * and detach: shm_lpid), or of semaphore `semnum` of set `sid` (an
   * operation that leaves its value: sempid). Throws with the errno. */
  touchSysv(kind: 'shmid' | 'semid', sid: number, semnum: number): void;
  restoreMsg(tables: string, vid: number, vkey: number, mode: number, qbytes: number, messages: { type: number; data: Buffer }[]): number;
  /** This IPC namespace's message queue limits (msgctl IPC_INFO): a new queue's size (msg_qbytes) and the most IPC_SET gives without CAP_SYS_RESOURCE, and the largest message. */
  msgLimits(): { msgmnb: number; msgmax: number };

  createTables(path: string, aid: string, salt: bigint): void;
  readTables(path: string): TablesSnapshot;
  /** If the last holder of the tables' lock died holding it, the repair
   * its next locker would make, made now without waiting for the lock
   * (appshot_repair_if_dead): a dead creator's SysV object adopted.
   * `holder`: the system TID of a live holder (the lock was busy; -1 if
   * the word names none), else 0 (a lock no locker can recover counts as
   * free: the tables as they are stay so). */
  repairTablesIfDead(path: string): { repaired: boolean; holder: number };
  /** Offset in a tables file of its lock's futex word (its holder's TID,
   * with the kernel's waiters and owner-died bits). */
  readonly tablesLockOffset: number;
  /** Offset in a tables file of its struct appshot_ipc_pids: the PIDs
   * restored SysV objects show (appshot_table.h). */
  readonly tablesIpcPidsOffset: number;
  /** Before a restored process runs: the image's wait slots and the
   * previous node's PIDs into new tables (appshot_table.h). */
  carryWaits(path: string, waits: WaitSlot[], prior: { virtual: number; system: number }[]): void;
  noteSocket(path: string, note: SocketNote): void;
  /** A message queue's notification registration, as the preload library notes it. */
  noteQueueNotify(path: string, note: { ino: bigint; signo: number; value: bigint; owner: number }): void;
  /** Drops every note of these socket inodes. */
  forgetSocketNotes(path: string, inos: bigint[]): void;
  /** Whether a lost note may have been of socket `ino` (port 0), or of the
   * reuseport group of `kind` on `port` (ino 0n). */
  socketNoteLost(lostSeen: Buffer, ino: bigint, port: number, kind: 'tcp' | 'udp'): boolean;
  /** No lost note was of a socket still open: the count and filter go. */
  forgetLostNotes(path: string): void;
  setInstance(path: string, config: InstanceConfig): void;
  /** An exclusive flock on `path` (made if need be); close the fd to unlock. */
  lockFile(path: string): number;
  tryLockFile(path: string): number;
  /** rename(from, to) unless something is at `to` (renameat2
   * RENAME_NOREPLACE): throws with code EEXIST then, as mkdir would. */
  renameNoReplace(from: string, to: string): void;
  /** fsync of each descriptor at once, each on a thread of its own; the
   * descriptors must stay open until fsyncWait, which throws the first
   * error (errno's code) naming `what`. */
  fsyncStart(fds: number[]): FsyncGroup;
  fsyncWait(group: FsyncGroup, what: string): void;
  /** The regular file open at `inFd` copied into `outFd` (empty, open for writing), its holes left holes (addon/src/filecopy.c). */
  copyFileData(inFd: number, outFd: number): void;
  /** This process's session keyring's serial (its user's default if none of its own), 0 without keyrings. */
  sessionKeyringSerial(): number;
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
  /** At most `n` malloc arenas in this process from now on (M_ARENA_MAX):
   * for a resident process, whose threads would each keep what a burst
   * of work freed in an arena of its own. */
  mallocArenas(n: number): boolean;
  /** malloc_trim(0): the free pages of every arena back to the kernel;
   * whether any went. */
  trimMemory(): boolean;
  bind(path: string, kind: Kind, virtualId: number, systemId: number, flags?: number, owner?: number): void;
  mapSystem(path: string, kind: Kind, systemId: number, flags?: number, owner?: number): number;
  unmapSystem(path: string, kind: Kind, systemId: number): boolean;
  removeIpcObject(kind: Kind, systemId: number): boolean;
  /** Instructions in the classic packet filter a socket's owner attached
   * (SO_ATTACH_FILTER); 0 for none. */
  socketFilterLength(fd: number): number;
  /** IPC_SET of a restored SysV object's owner uid/gid and mode. */
  setIpcOwner(kind: Kind, systemId: number, uid: number, gid: number, mode: number): void;
  /** IPC_RMID on a system id from the tables, only if the kernel confirms
   * it is the application's (appshot_ipc_owned in appshot_table.c); salt
   * and created (seconds) are the registry's trusted copies. */
  removeIpcOwned(tables: string, kind: Kind, systemId: number, salt: bigint, created: number, initPid: number): boolean;
  /** Whether the kernel confirms system id `systemId` of the tables is the
   * application's (appshot_ipc_owned: removeIpcOwned's rule). */
  ipcOwned(tables: string, kind: Kind, systemId: number, salt: bigint, created: number, initPid: number): boolean;
  /** Now, in whole seconds, on the clock the kernel stamps a SysV object's
   * ctime with (the last tick's time: it lags Date.now() by up to a tick,
   * tens of ms under load). `created` above is read from it. */
  ipcClock(): number;
  /** Sends a signal (its number) through a pidfd, only if pid is a process
   * of the application (pidBelongs); false otherwise. */
  signalMember(pid: number, signal: number, initPid: number, tables: string): boolean;
  /** Whether pid is a process of the application: a descendant of
   * initPid; or one holding the table file `tables` opened read-write (the
   * file by its device and inode, pinned while its flags are read, not the
   * text its link reads; before Linux 5.14 only for a process whose uids
   * are all the file owner's); or one whose
   * uids are all the file owner's and whose environment names it
   * (appshot_pid_belongs). */
  pidBelongs(pid: number, initPid: number, tables: string): boolean;
  /** A process's start time (clock ticks since boot), its real,
   * effective, saved and filesystem uids, and the targets of its
   * descriptors that start with `prefix`, with the identity of each file
   * (addon/src/procscan.c: none of it reads the process's memory); null
   * for no such process, one not ours to read, or a kernel thread. Throws
   * when /proc cannot be read for another reason (no descriptor left). */
  processFacts(pid: number, prefix: string): ProcessFacts | null;
  /** processFacts of every process but this one and PID 1, in one pass;
   * throws as processFacts does. */
  processesFacts(prefix: string): ProcessFacts[];
  /** The device and inode number ("MAJOR:MINOR:INO", as in
   * ProcessFacts) of the file at `path`, its last component not followed;
   * null if there is none. */
  fileIdentity(path: string): string | null;
  /** `name`'s value in the environment of process `pid` started at
   * `start`; null if not there, unreadable, or the PID is another's now.
   * Takes the process's mmap lock (access_remote_vm): asked last. */
  environValue(pid: number, start: number, name: string): string | null;
  flags: { INIT: number; THREAD: number; THREADS: number };
  /** 0 if the named kernel feature works here, else the errno it answered
   * (addon/src/probe.c; appshot check). */
  probeFeature(name: string): number;
  /** APPSHOT_TABLE_VERSION: the layout of the translation tables. */
  tableVersion: number;
  /** The size of a table file of this layout (appshot_table_bytes). */
  tableBytes: number;
  /** The kernel's tick in ns (the coarse clocks' resolution), which it
   * adds to every CPU-time interval timer set; 0 if it did not say. */
  tickNanoseconds: number;
}

let loaded: Addon | undefined;

export function addon(): Addon {
  if (!loaded) {
    for (const p of Object.values(paths))
      if (!existsSync(p))
        // Where appshot is a dependency, npm may have skipped its install
        // script (npm 11's allowScripts: unapproved scripts are to be
        // blocked); approving it and rebuilding runs the build.
        throw new AppshotError(
          `native part missing: ${p}; where appshot is a dependency: 'npm approve-scripts appshot && npm rebuild appshot'; in its checkout: 'npm run build:native'`,
        );
    loaded = createRequire(import.meta.url)(paths.addon) as Addon;
  }
  return loaded;
}

/** What tcpRead returns and tcpMake takes: a connection as the image
 * records it, less what only the image knows; `owner` (tcpMake): its
 * socket made with that fsuid and fsgid; `reuseport`: SO_REUSEPORT set
 * before its bind. */
export type RepairedConnection = Omit<TcpConnection, 'ino' | 'closed' | 'socketOptions'> & { owner?: InodeOwner; reuseport?: boolean };
