/**
 * The image's metadata as TypeScript sees it: one interface per message of
 * proto/image.proto (same names, camelCase fields). 64-bit fields are
 * bigint: addresses, masks, RLIM_INFINITY and nanosecond times do not fit a
 * double.
 */
export interface Manifest {
  magic: string;
  formatVersion: number;
  parts: Part[];
  imageId: string;
  /** Ed25519 over the manifest with this field empty (image/trust.ts). */
  signature: Buffer;
  /** Which key signed it: the first 16 hex digits of its public key's SHA-256. */
  keyId: string;
}

export interface Part {
  name: string;
  size: bigint;
  crc32c: number;
  /** Empty in images of appshot before signing, and for pages.img in
   * format 3 (chunkSha256 instead). */
  sha256: Buffer;
  /** Format 3, pages.img: the SHA-256 of each chunkSize bytes, one after
   * the other (32 bytes each); 0 and empty otherwise. */
  chunkSize: number;
  chunkSha256: Buffer;
}

export interface Image {
  aid: string;
  created: string;
  node: NodeInfo;
  parent?: Parent;
  processes: Process[];
  sharedMemory: SharedMemory[];
  semaphores: SemSet[];
  shmSegments: ShmSegment[];
  msgQueues: MsgQueue[];
  tables: Table[];
  pipes: Pipe[];
  files: FileIdentity[];
  stats: Stats;
  command: string[];
  logPath: string;
  tablesPath: string;
  /** The rules the application ran under (`run --rules`), if any. */
  rules?: Rules;
  /** Each resource's templating verdict (what a clone does with it, by a
   * rule or by the standard criteria), computed at snapshot. */
  verdicts: Verdict[];
  /** The instance section of its tables, as evaluated for it. */
  /** Pseudoterminals whose master the application holds (resources/ptys.ts);
   * absent in older images. */
  ptys?: PtyPair[];
  /** Wait calls in flight (resources/waits.ts); absent in older images. */
  waits?: WaitSlot[];
  /** POSIX message queues (resources/mqueue.ts); absent in older images. */
  posixQueues?: PosixQueue[];
  instance?: { redirs: { kind: 'path' | 'cow'; from: string; to: string }[]; env: string[]; privateRoot: string; identity?: Identity };
  /** Written by a snapshot (image.proto): its descriptors are the kernel's. */
  fromSnapshot?: boolean;
  /** The tables' count of semaphore SETVAL, SETALL and IPC_RMID
   * (appshot_table.h sem_generation); absent in older images. */
  semGeneration?: number;
}

/** A wait slot of the tables (appshot_table.h, struct appshot_wait_slot). */
export interface WaitSlot {
  slot: number;
  /** Virtual TID of the thread whose call it is. */
  holder: number;
  /** Restores since `carried` was written. */
  moved: number;
  out: Uint8Array;
  carried: Uint8Array;
}

/** What makes an instance itself: its tables' identity section, which a
 * restore gives back and a clone makes anew (native.ts Identity). */
export interface Identity {
  id: string;
  generation: number;
  reseedLibc: 'seeded' | 'always' | 'never';
  libcSeeded: boolean;
}

/** A snapshot virtual template: template.pb beside an image. */
export interface Template {
  magic: string;
  name: string;
  created: string;
  imageId: string;
  rules?: Rules;
  verdicts: Verdict[];
  signature: Buffer;
  keyId: string;
  /** Made by a template create that checks image.pb's fromSnapshot (image.proto). */
  snapshotWordChecked?: boolean;
}

export interface Rules {
  /** The rules file's name, for messages. */
  source: string;
  /** As written: <APPL-ID> and the like unevaluated. */
  text: string;
}

export type Action = 'share' | 'copy-on-write' | 'duplicate' | 'virtualize' | 'multiplex' | 'allocate' | 'recreate';

/** What cloning does with one resource. */
export interface Verdict {
  /** Which resource: "vma:VPID:START" (hex), "fd:VPID:FD", "port:N", "sem:VID", "shm:VID", "msg:VID", "pid:VPID", "pipe:INDEX", "env:NAME". */
  ref: string;
  kind: string;
  /** What a person calls it: a path, "tcp 0.0.0.0:7000", "semaphore key 0x5432". */
  name: string;
  action: Action;
  /** "rule fixture.rules:7", or the standard criteria that decided. */
  reason: string;
}

/** Verdict.ref of the resources a clone looks its plan up for:
 * classification writes them, the restore of a clone reads them. */
export const verdictRef = {
  vma: (vpid: number, v: Vma) => `vma:${vpid}:${v.start.toString(16)}`,
  fd: (vpid: number, fd: Fd) => `fd:${vpid}:${fd.fd}`,
  port: (port: number) => `port:${port}`,
};

/** A TCP port as the application asked for it: an instance with an
 * allocated port listens on another, bound to it in its port table. */
export function virtualPort(image: Image, port: number): number {
  return portTable(image).find((e) => e.system === port)?.virtual ?? port;
}

/** The image's port table (virtual: the port asked for; system: the one
 * the instance had). */
export const portTable = (image: Image): Table['entries'] => image.tables.find((t) => t.kind === 'port')?.entries ?? [];

export interface NodeInfo {
  hostname: string;
  arch: string;
  kernel: string;
  vdsoSize: bigint;
  vvarSize: bigint;
  pageSize: number;
  xstateSize: number;
}

export interface Parent {
  imageId: string;
  path: string;
}

export interface Stats {
  frozenUs: bigint;
  pages: bigint;
  pagesFromParent: bigint;
  dumpUs: bigint;
}

export interface Process {
  vpid: number;
  vppid: number;
  vpgid: number;
  vsid: number;
  pid: number;
  comm: string;
  argv: string[];
  creds: Creds;
  exe: string;
  cwd: string;
  root: string;
  umask: number;
  rlimits: Rlimit[];
  sigactions: SigAction[];
  sharedPending: Buffer;
  threads: Thread[];
  vmas: Vma[];
  mm: MmFields;
  fds: Fd[];
  groupStopped: boolean;
  personality: number;
  /** PR_GET_DUMPABLE: 0, 1 or 2. */
  dumpable: number;
  glibcTidOffset: number;
  /** Where its preload library keeps the TID moves (resources/mutexes.ts);
   * 0 or absent: no such library. */
  tidMovesAddress?: bigint;
  /** Its time namespace's clock offsets (resources/timens.ts). */
  timeOffsets?: TimeOffsets;
  itimers: ITimer[];
  /** Absent in older images: none. */
  posixTimers?: PosixTimer[];
  /** groupStopped: the signal that stopped it; 0 or absent: SIGSTOP. */
  stopSignal?: number;
  /** Its children stopped by job control whose stop report it had taken
   * (waitpid WUNTRACED), by virtual PID: a restore takes their new stop's
   * report in its stead (jobcontrol.ts). Absent in older images: none. */
  stopReportsTaken?: number[];
  /** Its children continued (SIGCONT) whose continued report it had not
   * taken (waitpid WCONTINUED), by virtual PID: a restore makes it again
   * (jobcontrol.ts). Absent in older images: none. */
  continuedReports?: number[];
  /** Its children that exited and were not waited for (zombies.ts). */
  zombies?: Zombie[];
  /** Its AIO contexts (resources/aio.ts); absent in older images. */
  aioRings?: AioRing[];
  attributes?: ProcessAttributes;
  /** 1 + its controlling terminal's index in Image.ptys; 0 or absent: none
   * in the image. */
  ctty?: number;
  /** Its cgroup v2 path (resources/cgroups.ts); '' or absent: not recorded. */
  cgroup?: string;
  /** The virtual TID of the parent's thread that forked it (process.ts,
   * dumpForkingThreads); 0 or absent: the parent's main thread. */
  parentVtid?: number;
  /** cwd under /proc/PID of one of the application's processes: its
   * virtual PID (resources/procpaths.ts); 0 or absent otherwise. */
  cwdProcVpid?: number;
  /** Its working directory's and root directory's identities: indexes in
   * Image.files (absent in older images, for one under /proc, and a root
   * of "/"). One removed (cwd or root "... (deleted)") is a deleted
   * directory there: its stand-in's mode and owner. */
  cwdFile?: number;
  rootFile?: number;
  /** Its executable deleted or replaced since it ran: its identity, an
   * index in Image.files (a deleted regular file with contents); absent
   * for one still at its name and in older images. */
  exeFile?: number;
  /** A session keyring of its own (resources/keyrings.ts); absent: its
   * user's default one. */
  sessionKeyring?: SessionKeyring;
  /** Its SEM_UNDO adjustments (resources/sysv.ts); absent in older images. */
  semUndo?: SemUndo[];
  /** The CPU time it had used as it saw it (resources/cputime.ts); absent:
   * not recorded. */
  cpuTimes?: CpuTimes;
}

/** CPU time in nanoseconds as the application saw it at the snapshot. */
export interface CpuTimes {
  /** Its CPU-time clock. */
  ns: bigint;
  /** getrusage's split. */
  userNs: bigint;
  systemNs: bigint;
  /** Its reaped children's (a process's only). */
  childUserNs: bigint;
  childSystemNs: bigint;
}

/** A SEM_UNDO adjustment: what the kernel adds to semaphore `semnum` of
 * set `vid` when the process exits. */
export interface SemUndo {
  vid: number;
  semnum: number;
  adj: number;
}

/** A session keyring and its keys (resources/keyrings.ts). */
export interface SessionKeyring {
  /** Its serial at snapshot: processes with the same one shared it. */
  serial: number;
  description: string;
  uid: number;
  gid: number;
  perm: number;
  keys: Key[];
}

export interface Key {
  type: string;
  description: string;
  uid: number;
  gid: number;
  perm: number;
  payload: Buffer;
}

export interface ProcessAttributes {
  oomScoreAdj: number;
  childSubreaper: boolean;
  thpDisabled: boolean;
  /** /proc/PID/loginuid; absent: not known (no audit, older image). */
  loginuid?: number;
  /** MEMBARRIER_CMD_GET_REGISTRATIONS; 0 or absent: none. */
  membarrierRegistrations?: number;
  /** /proc/PID/coredump_filter; absent: left as the seed's. */
  coredumpFilter?: number;
  /** PR_GET_MDWE flags; 0 or absent: none. */
  mdwe?: number;
  /** mlockall(MCL_FUTURE) in effect (as far as the snapshot could tell). */
  lockFuture?: boolean;
  /** PR_GET_MEMORY_MERGE: KSM may merge every mapping of the process. */
  memoryMerge?: boolean;
  /** /proc/PID/autogroup's nice (its session's); 0 or absent: default. */
  autogroupNice?: number;
}

export interface ThreadAttributes {
  nice: number;
  schedPolicy: number;
  schedPriority: number;
  pdeathsig: number;
  /** Absent in older images: left as the seed's. */
  cpuAffinity?: Buffer;
  ioprio?: number;
  /** PR_GET_TIMERSLACK; absent: left as the seed's; 0: not set. */
  timerSlackNs?: bigint;
  /** sched_getattr's utilization clamps, where the kernel has them
   * (CONFIG_UCLAMP_TASK); absent: not asked. */
  utilMin?: number;
  utilMax?: number;
  /** PR_GET_SPECULATION_CTRL of store bypass, indirect branch and L1D
   * flush, in that order (-errno: no such control); absent or empty in
   * older images. */
  speculationCtrl?: number[];
  /** A SCHED_DEADLINE thread's reservation; absent for other policies. */
  deadline?: SchedDeadline;
  /** PR_MCE_KILL_GET: 0 late, 1 early; absent: the system's default. */
  mceKill?: number;
  /** PR_GET_TSC is PR_TSC_SIGSEGV: rdtsc faults in this thread. */
  tscSigsegv?: boolean;
  /** get_mempolicy: the thread's NUMA policy; absent: MPOL_DEFAULT. */
  mempolicy?: Mempolicy;
  /** personality(2), the thread's own where it is not its process's;
   * absent: the process's. */
  personality?: number;
}

/** A NUMA memory policy (attributes.ts): the mode with its flags
 * (MPOL_F_*), and the node mask, whole 64-bit words, trailing zero words
 * left out. */
export interface Mempolicy {
  mode: number;
  nodes: Buffer;
}

/** sched_attr's deadline fields (attributes.ts). */
export interface SchedDeadline {
  runtimeNs: bigint;
  deadlineNs: bigint;
  periodNs: bigint;
  /** SCHED_FLAG_RESET_ON_FORK, SCHED_FLAG_RECLAIM, SCHED_FLAG_DL_OVERRUN. */
  flags: bigint;
}

export interface Zombie {
  vpid: number;
  /** As waitpid reports it. */
  status: number;
  comm: string;
  /** The virtual TID of the thread that forked it; 0 or absent: the main
   * thread. */
  parentVtid?: number;
}

export const PosixTimerNotify = { SIGNAL: 0, NONE: 1, THREAD: 2 } as const;

/** A timer_create timer (timers.ts). */
export interface PosixTimer {
  id: number;
  clockid: number;
  notify: number;
  signal: number;
  value: bigint;
  vtid: number;
  valueNs: bigint;
  intervalNs: bigint;
  overrun: number;
}

export interface ITimer {
  which: number;
  intervalUs: bigint;
  valueUs: bigint;
}

/** One thread's credentials (the process's are its main thread's). */
export interface Creds {
  /** Real, effective, saved, filesystem. */
  uid: number[];
  gid: number[];
  groups: number[];
  capEff: bigint;
  capPrm: bigint;
  capInh: bigint;
  capBnd: bigint;
  capAmb: bigint;
  securebits: number;
  noNewPrivs: boolean;
  /** Seccomp mode: 0 none, 1 strict, 2 filter. */
  seccomp: number;
  /** The filter chain, oldest first, past the context's (seccompContext). */
  seccompFilters: SeccompFilter[];
  /** How many filters began the chain that were those appshot itself ran
   * under when the image was taken (a container's profile): counted, not
   * recorded (the kernel shows them to no process under seccomp). */
  seccompContext?: number;
}

export interface SeccompFilter {
  /** struct sock_filter[]: 8 bytes an instruction. */
  program: Buffer;
  flags: bigint;
}

export interface Rlimit {
  resource: number;
  cur: bigint;
  max: bigint;
}

export interface SigAction {
  signal: number;
  handler: bigint;
  flags: bigint;
  restorer: bigint;
  mask: bigint;
}

export interface Thread {
  vtid: number;
  tid: number;
  regs: Buffer;
  xstate: Buffer;
  sigmask: bigint;
  pending: Buffer;
  tidAddress: bigint;
  robustList: bigint;
  robustListLen: bigint;
  rseq?: Rseq;
  altstack?: SigAltStack;
  state: string;
  inSyscall: bigint;
  wchan: string;
  comm: string;
  /** Absent in older images: the process's creds then. */
  creds?: Creds;
  attributes?: ThreadAttributes;
  /** The system TIDs it had before earlier restores, newest first, that
   * a mutex may still name (resources/mutexes.ts); absent in older
   * images: none. */
  earlierTids?: number[];
  /** Its own CPU time (resources/cputime.ts); absent: not recorded. */
  cpuTimes?: CpuTimes;
}

export interface Rseq {
  pointer: bigint;
  size: number;
  signature: number;
}

export interface SigAltStack {
  sp: bigint;
  size: bigint;
  flags: number;
}

export interface MmFields {
  startCode: bigint;
  endCode: bigint;
  startData: bigint;
  endData: bigint;
  startBrk: bigint;
  brk: bigint;
  startStack: bigint;
  argStart: bigint;
  argEnd: bigint;
  envStart: bigint;
  envEnd: bigint;
  auxv: Buffer;
}

export const VmaKind = {
  ANON: 0,
  FILE_PRIVATE: 1,
  FILE_SHARED: 2,
  SHARED_ANON: 3,
  SYSV_SHM: 4,
  VDSO: 5,
  VVAR: 6,
  VSYSCALL: 7,
} as const;
export const vmaKindName = Object.fromEntries(Object.entries(VmaKind).map(([k, v]) => [v, k]));

export interface Vma {
  start: bigint;
  end: bigint;
  prot: number;
  shared: boolean;
  pgoff: bigint;
  path: string;
  kind: number;
  special: string;
  file: number;
  sharedMemory: number;
  shmVid: number;
  vmFlags: string[];
  pages?: PageRef;
  /** mbind: the mapping's own NUMA policy; absent: none (memory.ts). */
  mempolicy?: Mempolicy;
}

export interface PageRef {
  offset: bigint;
  runs: number[];
  fromParent: number[];
  /** Pages shared copy-on-write with the parent process (image.proto). */
  cowShared?: number[];
}

export interface FileIdentity {
  path: string;
  dev: bigint;
  ino: bigint;
  size: bigint;
  mtimeNs: bigint;
  mode: number;
  deleted: boolean;
  contents?: PageRef;
  crc32c: number;
  /** A memfd's seals (F_GET_SEALS): F_SEAL_SEAL alone for one made
   * without MFD_ALLOW_SEALING. */
  seals?: number;
  /** Owner of a deleted file or memfd (absent: an older image), which a
   * restore gives the file it makes again: a server that hands a
   * temporary file to a worker of another user (gunicorn's heartbeat
   * files, fchown'ed to the worker, which then fchmods them) needs it. */
  uid?: number;
  gid?: number;
  /** Its birth time (statx btime), where the file system keeps one: with
   * dev and ino, the very file, not one later given its inode number. */
  btimeNs?: bigint;
  /** A symbolic link an O_PATH|O_NOFOLLOW descriptor holds: its text, which
   * the link a restore opens by its name must have (files.ts). */
  linkTarget?: string;
  /** A deleted file's or memfd's access time, given back with its
   * modification time (mtimeNs) when it is made again (absent: an older
   * image). Its change time cannot be given. */
  atimeNs?: bigint;
  /** A deleted file's blocks allocated past its saved data (fallocate,
   * also past its size with FALLOC_FL_KEEP_SIZE): [offset, length) byte
   * pairs, page-aligned, ascending, apart (deleted.ts allocatedPastData). */
  allocated?: bigint[];
}

export interface SharedMemory {
  dev: bigint;
  ino: bigint;
  size: bigint;
  path: string;
  pages?: PageRef;
  /** A memfd's seals, read through map_files. */
  seals?: number;
}

export const FdKind = {
  FILE: 0,
  DEVICE: 1,
  PIPE: 2,
  FIFO: 3,
  UNIX_SOCKET: 4,
  TCP_LISTEN: 5,
  EVENTFD: 6,
  EPOLL: 7,
  SIGNALFD: 8,
  TIMERFD: 9,
  INOTIFY: 10,
  TCP_ESTABLISHED: 11,
  UDP: 12,
  UNIX_DGRAM: 13,
  PTY: 14,
  UNCONNECTED_STREAM: 15,
  PIDFD: 16,
  MQUEUE: 17,
  FANOTIFY: 18,
  NETLINK: 19,
  IO_URING: 20,
  RAW: 21,
} as const;
export const fdKindName = Object.fromEntries(Object.entries(FdKind).map(([k, v]) => [v, k]));

export interface Fd {
  fd: number;
  cloexec: boolean;
  flags: number;
  pos: bigint;
  kind: number;
  path: string;
  file: number;
  pipe: number;
  writeEnd: boolean;
  socket?: Socket;
  eventfdCount: bigint;
  eventfdSemaphore: boolean;
  epoll: EpollTarget[];
  /** An epoll set's busy-poll parameters (EPIOCSPARAMS) where the program
   * set any; absent: the kernel's default (all 0). */
  epollParams?: EpollParams;
  tty: boolean;
  description: number;
  /** A signalfd's mask (bit N-1: signal N); 0 for other kinds. */
  sigmask: bigint;
  timerfd?: Timerfd;
  /** An established TCP connection (TCP_ESTABLISHED). */
  tcp?: TcpConnection;
  /** Absent for other kinds and in older images. */
  inotifyWatches?: InotifyWatch[];
  /** INOTIFY: the highest watch descriptor given on it, where above the
   * highest watch there; 0: none (and in older images). */
  inotifyLastWd?: number;
  /** File locks held through it (resources/locks.ts); absent in older images. */
  locks?: FileLock[];
  /** PTY: which pair, which end. */
  pty?: { pair: number; master: boolean };
  /** A file under /proc/PID of one of the application's processes: its
   * virtual PID; 0 or absent otherwise. */
  procVpid?: number;
  /** A descriptor's owner and signal (resources/fdowner.ts): of every
   * O_ASYNC one, and of any other with an owner or a signal set; absent
   * otherwise (and, for one not O_ASYNC, in older images). */
  owner?: FdOwner;
  /** MQUEUE: index into Image.posixQueues. */
  mqueue?: number;
  /** A /proc listing of mappings read part way: where its reader is, by
   * mapping (resources/listings.ts); absent otherwise and in older images. */
  listingPosition?: ListingPosition;
  /** Another /proc text read part way or to its end: where its reader is,
   * by line (resources/proctext.ts); absent otherwise and in older images. */
  textPosition?: TextPosition;
  /** FANOTIFY: the group and its marks; absent otherwise. */
  fanotify?: Fanotify;
  /** IO_URING: the ring; absent otherwise. */
  ioUring?: IoUring;
  /** A pipe's or socket's inode owner (its maker's fsuid and fsgid);
   * absent in older images and for other kinds. */
  inodeOwner?: InodeOwner;
}

/** proto InodeOwner. */
export interface InodeOwner {
  uid: number;
  gid: number;
}

/** An idle io_uring instance (resources/iouring.ts). */
export interface IoUring {
  sqEntries: number;
  cqEntries: number;
  /** io_uring_setup flags: IORING_SETUP_CQSIZE, SQE128, CQE32. */
  flags: number;
  /** The kernel's SQ head and CQ tail. */
  sqHead: number;
  cqTail: number;
  mappings: IoUringMapping[];
  /** The ring region from its start, as far as the process mapped it. */
  rings: Buffer;
  /** The SQE array, as far as mapped. */
  sqes: Buffer;
}

export interface IoUringMapping {
  start: bigint;
  length: bigint;
  offset: bigint;
  prot: number;
  dontfork: boolean;
}

/** A fanotify group (resources/fanotify.ts). */
export interface Fanotify {
  /** fanotify_init's flags as fdinfo shows them. */
  flags: number;
  /** fanotify_init's event_f_flags. */
  eventFlags: number;
  /** Made without CAP_SYS_ADMIN: other processes' PIDs not reported. */
  unprivileged: boolean;
  marks: FanotifyMark[];
}

export const FanotifyMarkKind = { INODE: 0, MOUNT: 1, FILESYSTEM: 2 } as const;

export interface FanotifyMark {
  kind: number;
  path: string;
  /** FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE. */
  flags: number;
  mask: number;
  ignoredMask: number;
}

/** A place in a /proc text: its line `line` (from 0), byte `column` of
 * that line; or its end. */
export interface TextPosition {
  atEnd: boolean;
  line: number;
  column: number;
}

/** A place in a /proc listing of mappings: the record of the mapping that
 * starts at `address`, its line `line` (from 0), byte `column` of that
 * line; or the listing's end. */
export interface ListingPosition {
  address: bigint;
  line: number;
  column: number;
  atEnd: boolean;
}

/** An idle AIO context's ring (resources/aio.ts). */
export interface AioRing {
  address: bigint;
  length: bigint;
  nrEvents: number;
  id: number;
  nr: number;
  head: number;
  tail: number;
  events: Buffer;
}

/** A POSIX message queue (resources/mqueue.ts). */
export interface PosixQueue {
  /** "/NAME". */
  name: string;
  deleted: boolean;
  maxmsg: bigint;
  msgsize: bigint;
  mode: number;
  uid: number;
  gid: number;
  /** In the order mq_receive gives them. */
  messages: { priority: number; data: Buffer }[];
  /** The virtual PID registered with mq_notify; 0: none. */
  notifyVpid: number;
  /** Its signal (SIGEV_SIGNAL), or 0 (SIGEV_NONE). Older images have none. */
  notifySigno?: number;
  /** A SIGEV_SIGNAL registration's sigev_value, all 64 bits. */
  notifyValue?: bigint;
}

export interface FdOwner {
  /** F_OWNER_TID 0, F_OWNER_PID 1, F_OWNER_PGRP 2. */
  type: number;
  /** The virtual TID, PID or process group; 0: nobody. */
  vpid: number;
  /** F_GETSIG; 0: SIGIO. */
  signal: number;
  /** A directory's dnotify watch mask (F_NOTIFY, DN_MULTISHOT among it);
   * 0 or absent: none (and in older images). */
  dnotify?: number;
}

export interface PtyPair {
  /** /dev/pts/N at the snapshot; a restore's new pair has its own. */
  index: number;
  /** struct termios as TCGETS fills it (36 bytes). */
  termios: Buffer;
  /** struct winsize (8 bytes). */
  winsize: Buffer;
  /** Written to the master, not yet read from the slave. */
  input: Buffer;
  /** Written to the slave, not yet read from the master. */
  output: Buffer;
  locked: boolean;
  packet: boolean;
  /** Its foreground process group (virtual); 0: none. */
  foreground: number;
  /** TIOCGEXCL of the master and of the slave (exclusive mode). */
  masterExclusive?: boolean;
  slaveExclusive?: boolean;
}

export const LockKind = { FLOCK: 0, POSIX: 1, OFD: 2, LEASE: 3 } as const;

export interface FileLock {
  kind: number;
  /** Exclusive / F_WRLCK; else shared / F_RDLCK. */
  write: boolean;
  /** POSIX and OFD: the first byte and the last (inclusive) unless toEof. */
  start: bigint;
  end: bigint;
  toEof: boolean;
}

export interface Timerfd {
  clockid: number;
  ticks: bigint;
  settimeFlags: number;
  valueNs: bigint;
  intervalNs: bigint;
  deadlineNs: bigint;
}

export interface InotifyWatch {
  wd: number;
  path: string;
  mask: number;
}

/** An established TCP connection as repair mode reads it (resources/tcp.ts). */
export interface TcpConnection {
  ino: bigint;
  family: number;
  localAddress: string;
  localPort: number;
  peerAddress: string;
  peerPort: number;
  /** Not kept: restored as a socket whose connection was reset. */
  closed: boolean;
  /** Taken without TCP repair: the live socket, held by appshot-keeper (keeper.ts); no state here. */
  kept?: boolean;
  state: number;
  sendSeq: number;
  recvSeq: number;
  sendQueue: Buffer;
  unsent: number;
  recvQueue: Buffer;
  mssClamp: number;
  options: number;
  sndWscale: number;
  rcvWscale: number;
  timestamp: number;
  window?: TcpWindow;
  socketOptions: SocketOption[];
}

export interface TcpWindow {
  sndWl1: number;
  sndWnd: number;
  maxWindow: number;
  rcvWnd: number;
  rcvWup: number;
}

export interface SocketOption {
  level: number;
  name: number;
  value: number;
  /** A struct or string option, set as these bytes (absent: `value`). */
  raw?: Buffer;
  /** An interface, by name: its index here is what is set. */
  device?: string;
}

export interface Pipe {
  ino: bigint;
  data: Buffer;
  capacity: number;
  fifoPath: string;
  /** Data written in packet mode (O_DIRECT): each packet's length. */
  packets?: number[];
  /** A named FIFO's device and birth time (with `ino`: the very FIFO);
   * absent in older images and for a removed FIFO. */
  fifoDev?: bigint;
  fifoBtimeNs?: bigint;
}

export interface Socket {
  ino: bigint;
  family: number;
  type: number;
  address: string;
  port: number;
  listening: boolean;
  backlog: number;
  peerIno: bigint;
  queued: Buffer;
  reuseaddr: boolean;
  reuseport: boolean;
  v6only: boolean;
  /** Datagram and record sockets (absent in older images): a peer
   * outside the application, connected to again by name. */
  peerAddress?: string;
  peerPort?: number;
  /** Queued for reading, oldest first, each whole. */
  datagrams?: Datagram[];
  /** sk_shutdown: 1 reading shut down, 2 writing. */
  shutdown?: number;
  options?: SocketOption[];
  /** UDP: multicast groups joined (absent in older images: none). */
  memberships?: MulticastMembership[];
  /** Connected outside the application: held by appshot-keeper, not in the image (keeper.ts). */
  kept?: boolean;
  /** A unix stream/seqpacket socket whose peer closed; absent: not. */
  peerGone?: boolean;
  /** A TCP listener installed from outside (serve's public listener):
   * the key its restore is handed a descriptor under (the other fields:
   * the application's own listener it replaced); absent or "": not. */
  inherited?: string;
  /** A unix listener or datagram socket bound to a path: its file at the
   * snapshot (absent in older images). */
  file?: SocketFile;
  /** A netlink socket's own state (absent for every other family). */
  netlink?: NetlinkSocket;
  /** A raw IP socket's protocol (resources/raw.ts); 0 for every other kind. */
  protocol?: number;
  /** A raw ICMP or ICMPv6 socket's type filter, as getsockopt gave it. */
  rawFilter?: Buffer;
  /** A connected unix stream or seqpacket socket: who the kernel says its
   * peer is; a unix listener: whom it listened as, which its clients see;
   * an end of a datagram socketpair: its maker (absent in older images). */
  peerCred?: PeerCred;
}

/** SO_PEERCRED's uid and gid and SO_PEERGROUPS of a unix connection (proto
 * PeerCred): the peer's effective ids and groups when it was made; and
 * SO_PEERCRED's pid, the virtual PID of the process that made it, if that
 * is a process of the application (0 or absent: another, one gone since,
 * or an older image). */
export interface PeerCred {
  uid: number;
  gid: number;
  groups: number[];
  pid?: number;
}

/** A netlink socket (proto NetlinkSocket, resources/netlink.ts). */
export interface NetlinkSocket {
  protocol: number;
  /** The nl_pid it is bound to (0: never bound). */
  portId: number;
  connected: boolean;
  dstPortId: number;
  dstGroup: number;
  /** Every multicast group joined, by number (1-based). */
  groups: number[];
}

/** The file of a unix listener's bind (proto SocketFile). */
export interface SocketFile {
  /** Its name now, in the bound name's directory; "": not renamed. */
  renamed: string;
  /** Unlinked, or moved out of that directory. */
  removed: boolean;
  mode: number;
  uid: number;
  gid: number;
  /** A relative name: the directory it was bound in; "" (or absent, in
   * older images) for an absolute one. */
  base?: string;
}

export interface MulticastMembership {
  /** IPv4 or IPv6 (an IPv6 socket may join either). */
  group: string;
  /** The interface's name. */
  device: string;
  /** Source filter mode: INCLUDE only `sources`, or EXCLUDE them. */
  include: boolean;
  sources: string[];
}

export interface Datagram {
  data: Buffer;
  /** The sender's name (unix path, "@" abstract) or IP; "" unnamed. */
  from: string;
  fromPort: number;
  /** UDP, as far as the socket asked to be shown them (IP_PKTINFO,
   * IP_RECVTOS, IP_RECVTTL, their IPv6 twins): the address it was sent
   * to ("" or absent: not shown), its TOS or traffic class and its TTL
   * or hop limit (absent: not shown). */
  to?: string;
  tos?: number;
  ttl?: number;
  /** A unix socket with SO_PASSCRED: who sent it, as SCM_CREDENTIALS
   * shows the reader: the sender's virtual PID (a process of the image;
   * the system's while the snapshot is taken, until dumpFds makes it
   * virtual), uid and gid. All three or none (not shown). */
  credPid?: number;
  credUid?: number;
  credGid?: number;
}

export interface EpollParams {
  busyPollUsecs: number;
  busyPollBudget: number;
  preferBusyPoll: boolean;
}

export interface EpollTarget {
  /** The number it was registered under. */
  fd: number;
  events: number;
  data: bigint;
  /** 1 + the process's descriptor that holds the target now, when `fd`
   * no longer does (closed, or reused); 0 or absent: `fd` itself. */
  heldAt?: number;
  /** An edge-triggered or armed one-shot target of a set whose ready
   * list was read at snapshot: whether its event waited there for the
   * next epoll_wait. Absent: not known (queued at restore if ready). */
  pending?: boolean;
}

export interface SemSet {
  vid: number;
  vkey: number;
  mode: number;
  uid: number;
  gid: number;
  values: number[];
  vpids: number[];
}

export interface ShmSegment {
  vid: number;
  vkey: number;
  mode: number;
  uid: number;
  gid: number;
  size: bigint;
  cvpid: number;
  lvpid: number;
  contents?: PageRef;
  /** Removed (IPC_RMID) while attached: SHM_DEST, its key private. */
  destroyed?: boolean;
}

export interface MsgQueue {
  vid: number;
  vkey: number;
  mode: number;
  uid: number;
  gid: number;
  qbytes: bigint;
  messages: { type: bigint; data: Buffer }[];
  lsvpid: number;
  lrvpid: number;
}

export interface Table {
  kind: string;
  entries: { virtual: number; system: number; flags: number; owner: number }[];
}

export interface TimeOffsets {
  monotonicNs: bigint;
  boottimeNs: bigint;
}
