/**
 * Copy-on-write capture of memory for `snapshot --leave-running`: while
 * the application is frozen, each process is forked once (a clone system
 * call injected into its main thread), and its private memory is read from
 * that copy after the application goes on, instead of being copied while
 * it waits. fork() copies page tables, not pages: 7 ms for 256 MiB where
 * the copy took 636 ms (bench/results/criu-2026-12-03-2.json).
 *
 * The copy never runs a single instruction of the application: the thread
 * that forks it is traced with PTRACE_O_TRACEFORK, so the copy is traced
 * by us from its birth and waited for in its first stop; it dies with us
 * (PTRACE_O_EXITKILL) and is killed once read. It keeps out of the
 * application's way as far as it can (it is still a process of the
 * application's process group and user, in /proc, counted against
 * RLIMIT_NPROC and the pids cgroup while it lives: the fork falls back to
 * a frozen read where those refuse it, and the application's own fork in
 * that time may fail with EAGAIN where it was at the limit; and the pages
 * the application writes before the copy is read are copied, charged to
 * its memory cgroup). It shares the descriptor table (CLONE_FILES), so it
 * holds no file open of its own. A plain fork would make it the process's child: its
 * exit a SIGCHLD, its zombie there for a waitpid(-1, __WALL) to find
 * (exit_signal 0 spares the signal but not the zombie). With CLONE_PARENT
 * it is the child of the process's parent instead, which for a process
 * whose parent is the application's appshot-init is a process that is not
 * the application's: init reaps any child it has (appshot_init.c: unknown
 * PIDs are forgotten from no table). The kernel refuses CLONE_PARENT only
 * to a PID namespace's init, which an application's process never is
 * (appshot gives virtual PIDs without namespaces). A process whose parent
 * is one of the application's own would be that parent's unknown child:
 * its memory is read frozen, as is all memory without this.
 *
 * What the copy does not have, or will not keep, is read from the process
 * while frozen whatever happens (resources/memory.ts dumpMemory): shared
 * mappings (the application goes on writing them), MADV_DONTFORK ranges
 * (absent in the copy), MADV_WIPEONFORK ranges (zero in it), droppable
 * ones, raw frames. Which pages were written since the parent image is
 * read from the process while frozen too, before protectTracked resets it for
 * the next snapshot (tracking.ts).
 */
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { errnoName } from '../errors.js';
import { addon } from '../native.js';
import { bytesFromCopy, type MapsLine, type PrivateCopy } from '../resources/memory.js';
import { timed } from './profile.js';
import { type ProcStat } from '../procfs.js';
import { isUserfaultfd } from './tracking.js';

const CLONE_PARENT = 0x8000;
/** The copy shares the process's descriptor table: with a table of its
 * own it would hold a reference to every open file, and what the
 * application closes meanwhile would not be (no FIN on a TCP socket, no
 * EOF on a pipe, no flock released, no space of a deleted file freed)
 * until the copy is read, seconds for a large one. */
const CLONE_FILES = 0x400;
const SIGCHLD = 17;

/**
 * Below this many bytes of private memory to read from a copy, the
 * process is read frozen: its fork (an injected call, its event and the
 * copy's first stop, several round trips with the tracee) costs the
 * frozen window more than copying. Measured with bench/cow-threshold.js
 * (VM, 2 cores shared, load 5-7; median frozenMs of 9, forked / copied):
 * memapp 0 MiB (~0.1 MiB of its own) 55 / 46 ms, 1 MiB 60 / 75, 2 MiB
 * 38 / 65, 4 MiB 29 / 45; 16 MiB 69 / 205.
 */
const DEFAULT_MIN_BYTES = 1 << 20;

/** APPSHOT_COW_MIN_BYTES (for measuring), else DEFAULT_MIN_BYTES. */
function cowMinBytes(): number {
  const set = Number(process.env.APPSHOT_COW_MIN_BYTES);
  return process.env.APPSHOT_COW_MIN_BYTES && Number.isFinite(set) && set >= 0 ? set : DEFAULT_MIN_BYTES;
}

/** Whether copy-on-write capture is wanted: not when APPSHOT_COW_CAPTURE=0
 * or --no-cow-capture says not. */
export function cowCaptureWanted(option: boolean | undefined): boolean {
  if (option === false) return false;
  return process.env.APPSHOT_COW_CAPTURE !== '0';
}

/** What became of each process of the image (SnapshotResult.cowCapture). */
export interface CowCaptureReport {
  /** Processes whose private memory was read from a copy. */
  copied: number;
  /** Processes read frozen, and why. */
  frozen: { process: string; why: string }[];
}

interface Copy {
  app: number;
  pid: number;
  reads: ((pagemapFd: number) => void)[];
}


export class CowCapture {
  private readonly copies: Copy[] = [];
  readonly report: CowCaptureReport = { copied: 0, frozen: [] };

  constructor(
    /** The application's appshot-init: the parent whose children can be copied. */
    private readonly initPid: number,
    private readonly minBytes = cowMinBytes(),
  ) {}

  /**
   * A copy-on-write copy of process `pid` (every thread of it stopped,
   * everything but its memory read, its injector closed: the bytes it
   * borrowed are back), made now, or undefined where its memory is to be
   * read frozen (said why, in the report and with APPSHOT_DEBUG).
   * `syscallInsn`: a syscall instruction in it (the injector's).
   */
  copyOf(pid: number, tids: number[], maps: MapsLine[], syscallInsn: bigint, stat: ProcStat | undefined, what: string): PrivateCopy | undefined {
    const why = this.whyFrozen(pid, tids, maps, stat);
    if (why) return this.frozen(what, why);
    let made: { ret: bigint; child: number };
    try {
      made = timed('cow: fork', () => addon().forkStopped(pid, syscallInsn, BigInt(CLONE_PARENT | CLONE_FILES | SIGCHLD)));
    } catch (e) {
      return this.frozen(what, `its fork failed: ${(e as Error).message}`);
    }
    // EAGAIN: RLIMIT_NPROC or the pids cgroup; ENOMEM: the memory the
    // copy would commit.
    if (!made.child) return this.frozen(what, `its fork failed (${made.ret < 0n ? errnoName(Number(-made.ret)) : 'no child'})`);
    const copy: Copy = { app: pid, pid: made.child, reads: [] };
    this.copies.push(copy);
    this.report.copied++;
    return { pid: copy.pid, later: (read) => copy.reads.push(read) };
  }

  /** Why `pid`'s memory is read frozen, or undefined if it can be copied. */
  private whyFrozen(pid: number, tids: number[], maps: MapsLine[], stat: ProcStat | undefined): string | undefined {
    if (stat?.ppid !== this.initPid) return "its parent is a process of the application, which would see the copy as its child";
    // The copy's exit signal is the process's (CLONE_PARENT): init reaps
    // only children that send SIGCHLD (its waitpid has no __WALL).
    if (stat.exitSignal !== SIGCHLD) return `its exit signal is ${stat.exitSignal}, not SIGCHLD: appshot-init would not reap the copy`;
    // From the mappings already read, before the checks that read /proc
    // files per thread (about 0.25 ms of a small process's frozen window,
    // which always ended here).
    let bytes = 0;
    for (const l of maps) bytes += bytesFromCopy(pid, l);
    if (bytes < this.minBytes) return `its private memory (${Math.round(bytes / 1024)} kB) is below ${Math.round(this.minBytes / 1024)} kB, where copying costs less than a fork`;
    // appshot injects no fork into a process with a seccomp filter: the
    // filter may refuse it, or kill the process for it.
    for (const tid of tids) if (seccompMode(pid, tid) !== 0) return 'it has a seccomp filter';
    // A fork waits until a userfaultfd told of forks has its event read:
    // by the application, frozen.
    if (forkAwaitedByUserfaultfd(pid)) return 'it has a userfaultfd told of forks (UFFD_FEATURE_EVENT_FORK), whose reader is frozen';
    return undefined;
  }

  private frozen(what: string, why: string): undefined {
    this.report.frozen.push({ process: what, why });
    if (process.env.APPSHOT_DEBUG) process.stderr.write(`appshot: ${what}: memory read frozen, not from a copy-on-write copy: ${why}\n`);
    return undefined;
  }

  /** Whether any process was copied (so that there is memory left to read). */
  get pending(): boolean {
    return this.copies.length > 0;
  }

  /** Reads every page deferred to the copies (the application runs), each
   * copy ended as soon as it is read. */
  readAll(): void {
    while (this.copies.length) {
      const copy = this.copies[0];
      const fd = openSync(`/proc/${copy.pid}/pagemap`, 'r');
      try {
        for (const read of copy.reads) read(fd);
      } finally {
        closeSync(fd);
      }
      this.end(copy);
    }
  }

  /** Ends every copy left (a snapshot that failed). */
  endAll(): void {
    while (this.copies.length) {
      try {
        this.end(this.copies[0]);
      } catch {
        /* gone already */
      }
    }
  }

  private end(copy: Copy): void {
    this.copies.splice(this.copies.indexOf(copy), 1);
    timed('cow: end copy', () => addon().endChild(copy.pid));
  }
}

const UFFD_FEATURE_EVENT_FORK = 0x2n;

/** Whether a userfaultfd of `pid` asked for fork events (fdinfo's "API:
 * api:features:ioctls" line, in hex). appshot's own (tracking.ts) does not. */
function forkAwaitedByUserfaultfd(pid: number): boolean {
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return false;
  }
  for (const fd of fds) {
    try {
      if (!isUserfaultfd(pid, Number(fd))) continue;
      const m = /^API:\s*[0-9a-f]+:([0-9a-f]+):/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
      // Unreadable: taken as told, which only costs a frozen copy.
      if (!m || BigInt('0x' + m[1]) & UFFD_FEATURE_EVENT_FORK) return true;
    } catch {
      /* closed meanwhile */
    }
  }
  return false;
}

/** The Seccomp field of a thread's status (0: none, 2: filter). */
function seccompMode(pid: number, tid: number): number {
  try {
    const m = /^Seccomp:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}
