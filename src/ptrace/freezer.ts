/**
 * Quiescing an application (FIG. 5, steps 252–262): every thread of every
 * process is seized and interrupted with ptrace, including threads and
 * children that appear while the others are being stopped (the seize
 * options make the kernel seize those for us).
 *
 * A thread that does not stop (uninterruptible sleep, a vfork parent
 * waiting for its child) makes the attempt fail: everything stopped so far
 * is resumed exactly as it was, and the freezer tries again until the
 * deadline. A thread that never stopped stays seized with an interrupt
 * pending until this process exits, when the kernel lets it go; it is never
 * left stopped.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { AppshotError, ExitCode } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { addon, type TraceReport } from '../native.js';
import { childrenOf, readStat } from '../procfs.js';
import { closeGate, insideWindow, openGate, registersOf, tableLockHolder, threadPointer, waitsForTableLock, type Windows, windowsOf } from './windows.js';

/** How far ahead the freeze gate's deadline is set, each round it is
 * (re)closed: what a snapshot killed with the gate closed costs the
 * application at most; the rounds are milliseconds apart. */
const GATE_LEASE_MS = 1000;

export interface FrozenThread {
  tid: number;
  /** The thread group (process) it belongs to. */
  pid: number;
  stopped: boolean;
  /** A signal caught on its way in (signal-delivery-stop): given back on
   * resume, recorded as pending in the image; cleared once the snapshot
   * has queued it again for the thread (threads.ts, askThread). */
  signal: number;
  siginfo?: Buffer;
  groupStop: boolean;
  /** The signal that stopped it (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU). */
  stopSignal?: number;
  /** Interrupted in this attempt already: a second PTRACE_INTERRUPT would
   * stay pending and trap again later. */
  interrupted?: boolean;
  /** Registers to set before it resumes (after a system call was injected). */
  resumeRegs?: Buffer;
}

/** The PID tracing `tid`, or 0. */
/** Whether task `tid` (a thread's id too: kill(2) finds any task by it)
 * exists, a zombie included: kill with no signal answers ESRCH only for
 * none, EPERM for one this user may not signal. */
function taskExists(tid: number): boolean {
  try {
    process.kill(tid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

function tracerOf(tid: number): number {
  try {
    return Number(/^TracerPid:\s+(\d+)/m.exec(readFileSync(`/proc/${tid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}
const PTRACE_EVENT = { fork: 1, vfork: 2, clone: 3, exec: 4, vforkDone: 5 };

/** PF_IO_WORKER (include/linux/sched.h): a kernel thread of an io_uring
 * (io-wq's iou-wrk-N, SQPOLL's iou-sqp-N) that /proc lists among the
 * process's threads. It runs no user code: it is neither frozen nor
 * dumped, and a restored ring makes its own as it needs them
 * (resources/iouring.ts). */
const PF_IO_WORKER = 0x10;

/** Whether task `tid` of `pid` is an io_uring worker (PF_IO_WORKER). */
export function isIoWorker(pid: number, tid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[6]) & PF_IO_WORKER) !== 0;
  } catch {
    return false;
  }
}

function tasksOf(pid: number): number[] {
  try {
    return readdirSync(`/proc/${pid}/task`)
      .map(Number)
      .filter((tid) => !isIoWorker(pid, tid));
  } catch {
    return [];
  }
}

function tgidOf(tid: number): number {
  try {
    const m = /^Tgid:\s+(\d+)/m.exec(readFileSync(`/proc/${tid}/status`, 'utf8'));
    return m ? Number(m[1]) : tid;
  } catch {
    return tid;
  }
}

/** Why a thread would not stop, in words. */
export function describeUnstopped(pid: number, tid: number): string {
  const st = readStat(tid);
  let wchan = '';
  try {
    wchan = readFileSync(`/proc/${pid}/task/${tid}/wchan`, 'utf8').trim();
  } catch {
    /* not readable */
  }
  const state =
    st?.state === 'D'
      ? 'uninterruptible sleep (D)'
      : st?.state === 'Z'
        ? 'exiting'
        : `state ${st?.state ?? '?'}`;
  const where = wchan && wchan !== '0' ? ` in ${wchan}` : '';
  // A vfork parent waits in the clone call until its child execs or exits.
  const why = /vfork|kernel_clone/.test(wchan) ? ' (a vfork in progress)' : '';
  return `${state}${where}${why}`;
}

export class Freezer {
  readonly threads = new Map<number, FrozenThread>();
  /** Processes of the application, by system PID, excluding init. */
  readonly processes = new Set<number>();
  private readonly excluded: Set<number>;
  /** Threads not seized because they cannot stop now (a vfork parent). */
  private readonly unseizable = new Map<number, number>();

  /** The last attempt found a thread stopped by job control inside a
   * translation window: final, not retried. */
  private stoppedInWindow = false;

  /**
   * @param roots   the application's processes as its tables know them
   * @param initPid the application's init: never stopped, but its children
   *                are the application's too
   */
  constructor(
    private readonly roots: number[],
    private readonly initPid: number,
    /** How messages name a process: by its virtual PID. */
    private readonly vpidOf: (pid: number) => number = (pid) => pid,
  ) {
    this.excluded = new Set([initPid, process.pid]);
  }

  /** Stops everything, retrying until `timeoutMs`; throws (after resuming
   * all) if some thread never settles. Every freeze gate it closed is
   * open again when it returns or throws: the image must not hold one
   * closed, nor the application run on with one. */
  freeze(timeoutMs: number): void {
    const deadline = Date.now() + timeoutMs;
    let lastProblem = '';
    try {
      for (let attempt = 0; ; attempt++) {
        const settle = Math.min(Math.max(deadline - Date.now(), 0), 250 + attempt * 100);
        const problem = this.attempt(settle);
        if (!problem) {
          this.openGates();
          return;
        }
        lastProblem = problem;
        // Another attempt would only undo its job-control stop (the retry
        // resumes what it seized) and let it leave the window on its own.
        if (this.stoppedInWindow || Date.now() >= deadline) break;
        // Open while the application runs between attempts: a vfork
        // child waiting at its parent's gate (one memory) must get to its
        // exec for the parent to stop.
        this.openGates();
        // Threads that have not stopped stay seized for the next attempt.
        this.resume(false);
        // A vfork child must run to exec for its parent to settle.
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
      }
    } catch (e) {
      this.openGates();
      throw e;
    }
    this.openGates();
    this.resume();
    const within = this.stoppedInWindow ? '' : ` within ${timeoutMs / 1000} s`;
    throw new AppshotError(`cannot stop the application${within}: ${lastProblem}; it was left running`);
  }

  private track(tid: number, pid: number): FrozenThread | undefined {
    let t = this.threads.get(tid);
    if (t) return t;
    // A vfork parent cannot stop until its child execs or exits: not
    // seized while it waits (this attempt fails, naming it), since a
    // thread seized and never stopped cannot be let go until it stops;
    // only the exit of its tracer would, and the tracer may be the
    // resident engine.
    if (readStat(tid)?.state === 'D' && /vfork/.test(describeUnstopped(pid, tid))) {
      this.unseizable.set(tid, pid);
      return undefined;
    }
    this.unseizable.delete(tid);
    // Left seized by an earlier snapshot of this process that gave up
    // before it stopped (detachWhenStopped): ours already.
    if (unsettled.delete(tid)) {
      t = { tid, pid, stopped: false, signal: 0, groupStop: false };
      this.threads.set(tid, t);
      this.processes.add(pid);
      return t;
    }
    t = { tid, pid, stopped: false, signal: 0, groupStop: false };
    try {
      addon().seize(tid);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? '';
      if (code === 'ESRCH') return undefined; // exited
      // EPERM: gone too, or traced already (a debugger, another snapshot).
      const tracer = tracerOf(tid);
      // Or ours already: a child forked by a seized process (or a thread
      // it made) is attached to us by the kernel (PTRACE_O_TRACEFORK,
      // TRACECLONE) and can show in /proc before its stop or its creator's
      // event is reported. It is tracked like the others; its report marks
      // it stopped. Only then: this process (the engine) may trace others
      // for another operation, and those stay refused.
      const madeBySeized = tid !== pid ? this.processes.has(pid) : this.processes.has(readStat(pid)?.ppid ?? 0);
      if (code === 'EPERM' && tracer && tgidOf(tracer) === process.pid && madeBySeized) {
        this.threads.set(tid, t);
        this.processes.add(pid);
        return t;
      }
      if (code === 'EPERM' && tracer)
        throw new AppshotError(`process ${this.vpidOf(pid) || `(system PID ${pid})`} is being traced by process ${tracer} (a debugger, or another snapshot); the application was left running`, ExitCode.conflict);
      // The kernel refuses a task that has begun to exit (its exit state
      // set) with EPERM, not ESRCH: a zombie (exited, not yet waited for),
      // or one dead and being reaped ('X': a thread, or a child whose
      // parent takes no SIGCHLD), which a moment later is gone, so that
      // its /proc entry may vanish between two reads here (seen once in
      // a fork storm: there, then no stat). Neither has state but an exit
      // status: it is left out, and its parent's wait after a restore
      // finds no such child. A stat that cannot be read is "gone" only if
      // the kernel says there is no such task (ESRCH): /proc mounted with
      // hidepid=1, or a security module, hides a live process that this
      // user may not trace, which must fail the snapshot, not be left
      // out of it and left running (review35a).
      if (code === 'EPERM') {
        const state = readStat(tid)?.state;
        if (state === 'Z' || state === 'X' || (state === undefined && !taskExists(tid))) return undefined;
      }
      throw e;
    }
    this.threads.set(tid, t);
    this.processes.add(pid);
    return t;
  }

  /** Seizes every task not seized yet; returns how many were new. */
  private discover(): number {
    let found = 0;
    const seen = new Set<number>();
    const queue = [...this.roots, ...childrenOf(this.initPid), ...this.processes];
    while (queue.length) {
      const pid = queue.pop()!;
      if (seen.has(pid) || this.excluded.has(pid)) continue;
      seen.add(pid);
      for (const tid of tasksOf(pid)) {
        if (this.threads.has(tid)) continue;
        if (this.track(tid, pid)) found++;
      }
      queue.push(...childrenOf(pid));
    }
    return found;
  }

  private handle(r: TraceReport): void {
    // Another snapshot's thread, left to be let go (in the engine, where
    // snapshots share one tracer): not this application's.
    if (letGoIfUnsettled(r)) return;
    let t = this.threads.get(r.tid);
    if (!t) {
      // A task the kernel seized for us (a new thread or child) can report
      // before its creator's event does.
      t = { tid: r.tid, pid: tgidOf(r.tid), stopped: false, signal: 0, groupStop: false };
      this.threads.set(r.tid, t);
      this.processes.add(t.pid);
    }
    switch (r.kind) {
      case 'exited':
        this.threads.delete(r.tid);
        if (r.tid === t.pid) this.processes.delete(t.pid);
        return;
      case 'stop':
        t.stopped = true;
        return;
      case 'group-stop':
        t.stopped = true;
        t.groupStop = true;
        t.stopSignal = r.sig;
        return;
      case 'signal':
        t.stopped = true;
        t.signal = r.sig;
        t.siginfo = addon().getSiginfo(r.tid);
        return;
      case 'event': {
        // Mid-fork or mid-exec is no place to take a picture: let the call
        // finish; the interrupt stops it right after.
        if (r.event === PTRACE_EVENT.fork || r.event === PTRACE_EVENT.vfork || r.event === PTRACE_EVENT.clone) {
          const child = r.msg;
          if (!this.threads.has(child)) {
            // A clone may make a process too (clone3, another exit signal).
            const pid = r.event === PTRACE_EVENT.clone ? tgidOf(child) : child;
            this.threads.set(child, { tid: child, pid, stopped: false, signal: 0, groupStop: false });
            this.processes.add(pid);
          }
        } else if (r.event === PTRACE_EVENT.exec) {
          // Another program: its preload library (if any) is elsewhere,
          // with a gate of its own, open.
          this.windows.delete(t.pid);
          this.gated.delete(t.pid);
          // A thread other than the leader exec'd: it took the leader's TID
          // and its own is gone for good.
          if (r.msg !== r.tid) this.threads.delete(r.msg);
        }
        addon().cont(r.tid, 0);
        addon().interrupt(r.tid);
        t.interrupted = true;
        return;
      }
      case 'syscall':
        addon().cont(r.tid, 0);
        return;
    }
  }

  /** One attempt; returns what went wrong, or '' when all is stopped. */
  private attempt(settleMs: number): string {
    const until = Date.now() + settleMs;
    let windowRounds = 0;
    for (;;) {
      this.discover();
      // Stops that came by themselves first (a signal on its way in, an
      // event), while threads ran on: an interrupt sent to a thread in a
      // stop not yet reported stays pending and traps as soon as the
      // thread is let run again, before it moves. Let run on out of its
      // window, a thread taking a signal every round (SIGCHLD, in a storm
      // of forks) was stopped again where it was, round after round, and
      // the snapshot gave up.
      for (let r; (r = addon().waitAny([...this.threads.keys()], 0)); ) this.handle(r);
      for (const t of this.threads.values())
        if (!t.stopped && !t.interrupted)
          try {
            addon().interrupt(t.tid);
            t.interrupted = true;
          } catch {
            /* exited: reported below */
          }
      for (;;) {
        const pending = [...this.threads.values()].some((t) => !t.stopped);
        // Only our tracees: a resident engine's other children are Node's.
        const r = addon().waitAny([...this.threads.keys()], pending ? Math.max(until - Date.now(), 0) : 0);
        if (!r) break;
        this.handle(r);
      }
      // Those that cannot stop first: they are the cause. A seized thread
      // still running may only have been resumed for the last attempt,
      // whose window the deadline can make a few milliseconds long.
      const unstopped: FrozenThread[] = [];
      for (const [tid, pid] of this.unseizable) if (existsSync(`/proc/${tid}`)) unstopped.push({ tid, pid, stopped: false, signal: 0, groupStop: false });
      unstopped.push(...[...this.threads.values()].filter((t) => !t.stopped));
      if (unstopped.length) {
        const t = unstopped[0];
        return `${this.nameOf(t)} did not stop: ${describeUnstopped(t.pid, t.tid)}`;
      }
      // Everything is stopped; a last look for tasks created just before.
      if (this.discover() === 0) {
        const inside = this.insideWindows();
        if (!inside.length) return '';
        // One stopped by job control cannot be let run: refused, named,
        // rather than restored to use an old node's id.
        const stuck = inside.find((t) => t.groupStop);
        this.stoppedInWindow = !!stuck;
        if (stuck || Date.now() >= until) {
          return `${this.nameOf(stuck ?? inside[0])} stayed inside a translation of process ids (a wrapper of the preload library)${stuck ? ', stopped there by job control' : ''}`;
        }
        this.closeGates(inside);
        this.runOn(inside, windowRounds++);
        continue;
      }
      if (Date.now() >= until) return 'the application kept creating processes';
    }
  }

  /** "process V thread T (comm)", by virtual ids where the tables have
   * them: how messages name a thread. */
  private nameOf(t: FrozenThread): string {
    const thread = t.tid !== t.pid ? ` thread ${this.vpidOf(t.tid) || `(system TID ${t.tid})`}` : '';
    return `process ${this.vpidOf(t.pid) || `(system PID ${t.pid})`}${thread} (${readStat(t.tid)?.comm ?? '?'})`;
  }

  /** Where each process keeps its windows (windows.ts), read once per
   * freeze; null: it has none. */
  private readonly windows = new Map<number, Windows | null>();

  /** The stopped threads inside a translation window, not blocked in a
   * system call (windows.ts), those in a job-control stop among them. */
  private insideWindows(): FrozenThread[] {
    const stopped = [...this.threads.values()].filter((t) => t.stopped).map((t) => ({ t, regs: registersOf(t.tid) }));
    // Threads of one process on one thread pointer (a clone() without
    // CLONE_SETTLS) share one mark, which cannot say which is inside.
    const sharers = new Map<string, number>();
    const key = (pid: number, regs: Buffer) => `${pid}:${threadPointer(regs)}`;
    for (const { t, regs } of stopped) if (regs && threadPointer(regs)) sharers.set(key(t.pid, regs), (sharers.get(key(t.pid, regs)) ?? 0) + 1);
    const out: FrozenThread[] = [];
    for (const { t, regs } of stopped) {
      if (!regs) continue;
      let windows = this.windows.get(t.pid);
      if (windows === undefined) {
        try {
          windows = windowsOf(t.pid) ?? null;
        } catch (e) {
          const main = this.threads.get(t.pid) ?? t;
          throw new AppshotError(`cannot stop the application: ${this.nameOf(main)}: ${(e as Error).message}; it was left running`);
        }
        this.windows.set(t.pid, windows);
      }
      if (windows && (insideWindow(t.pid, regs, windows, (sharers.get(key(t.pid, regs)) ?? 0) > 1) || waitsForTableLock(regs, windows))) out.push(t);
    }
    // A thread stopped holding the tables' lock, inside a window or not,
    // runs on until it lets go: the snapshot itself takes the lock (to map
    // the threads it finds), and would wait for ever for a stopped holder;
    // a waiter let run on (insideWindow) would never get through. One look
    // per tables file.
    const looked = new Set<string>();
    for (const [pid, windows] of this.windows)
      for (const m of windows?.tables ?? []) {
        if (looked.has(m.inode)) continue;
        looked.add(m.inode);
        const holder = this.threads.get(tableLockHolder(pid, m));
        if (holder?.stopped && !out.includes(holder)) out.push(holder);
      }
    return out;
  }

  /** Processes whose freeze gate this freezer closed. */
  private readonly gated = new Set<number>();

  /** Closes the freeze gate (windows.ts) of each process with a thread
   * inside a window, and moves the deadline of those closed before on:
   * the thread let run on out of its window waits, outside any, in front
   * of its next one, where the next interrupt stops it (blocked in a
   * system call outside a window: fine to take). Without the gate, a
   * thread that forks or reaps without a pause is inside again nearly
   * every time it is stopped. A process without the gate (an older
   * library) is only let run on. */
  private closeGates(inside: FrozenThread[]): void {
    const first = this.gated.size === 0;
    for (const t of inside) this.gated.add(t.pid);
    for (const pid of this.gated) {
      const windows = this.windows.get(pid);
      if (!windows?.gate || !this.processes.has(pid)) {
        this.gated.delete(pid);
        continue;
      }
      try {
        closeGate(pid, windows, GATE_LEASE_MS);
      } catch {
        this.gated.delete(pid); // gone
      }
    }
    if (first && this.gated.size) killPoint('snapshot: freeze gate closed');
  }

  /** Opens every freeze gate of the application's processes that is
   * closed: those this freezer closed, and those a child inherited by
   * forking while it was (or that a snapshot killed with it closed left).
   * Only processes still ours: a process that exited is not reported gone
   * until we have seen it, so its PID cannot name another's memory. And
   * only where every thread we know is stopped, its reports read: a
   * thread let run could have exec'd another program, where the gate's
   * address is anything (an exec stops it, but the stop may not have
   * been read); a process skipped so (an attempt that failed on a thread
   * that would not stop) is held until the deadline at most. */
  private openGates(): void {
    try {
      for (let r; (r = addon().waitAny([...this.threads.keys()], 0)); ) this.handle(r);
    } catch {
      /* read again below, per thread */
    }
    const running = new Set([...this.threads.values()].filter((t) => !t.stopped).map((t) => t.pid));
    for (const pid of this.processes) {
      if (running.has(pid)) continue;
      let windows = this.windows.get(pid);
      if (windows === undefined)
        try {
          windows = windowsOf(pid) ?? null;
          this.windows.set(pid, windows);
        } catch {
          continue; // no gate to be found: none that we closed either
        }
      if (!windows?.gate) continue;
      try {
        openGate(pid, windows);
      } catch {
        /* gone */
      }
    }
    this.gated.clear();
  }

  /** Lets threads inside a window run a little (longer each round), to be
   * interrupted again by the attempt's loop. A signal a thread was stopped
   * on its way to is delivered now, as if it had not been stopped (kept
   * instead, it could be lost: a detach outside a signal-delivery-stop
   * may drop the signal it is given). */
  private runOn(threads: FrozenThread[], round: number): void {
    for (const t of threads)
      try {
        addon().cont(t.tid, t.signal);
        t.signal = 0;
        t.siginfo = undefined;
        t.stopped = false;
        t.interrupted = false;
      } catch {
        /* exited: reported by the attempt's loop */
      }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Math.min(1 << round, 50));
  }

  /** Lets every stopped thread go, exactly where it was (the signal it was
   * about to take is given back). Threads that never stopped (a vfork
   * parent, one in uninterruptible sleep) stay seized for the next attempt
   * while `final` is false; then they are let go when they stop
   * (detachWhenStopped): the process may be the resident engine, which
   * does not exit and so does not let them go by exiting. */
  resume(final = true): void {
    // Threads stopped by job control first: they go back to that stop, and
    // the processes that resume after them must not see them traced ('t').
    const order = [...this.threads.values()].sort((a, b) => Number(b.groupStop) - Number(a.groupStop));
    for (const t of order) {
      if (!t.stopped) continue;
      try {
        if (t.resumeRegs) addon().setRegs(t.tid, t.resumeRegs);
        addon().detach(t.tid, t.signal);
        if (t.groupStop) backInStop(t.tid);
      } catch {
        /* it died meanwhile */
      }
      this.threads.delete(t.tid);
    }
    if (final) {
      // One seized but not yet interrupted (an attempt that failed while
      // it seized, meeting another tracer) is interrupted now, to stop and
      // be let go at once rather than at its next signal.
      for (const t of this.threads.values()) {
        if (!t.interrupted)
          try {
            addon().interrupt(t.tid);
          } catch {
            /* exited */
          }
        detachWhenStopped(t.tid);
      }
      this.threads.clear();
    }
    for (const pid of [...this.processes]) if (![...this.threads.values()].some((t) => t.pid === pid)) this.processes.delete(pid);
  }

  /** From now on every stopped thread dies with us (PTRACE_O_EXITKILL),
   * as it would by kill(): an ending snapshot sets this before it releases
   * the application to its image, so that appshot killed between the two
   * cannot leave it running as well (a tracer's exit lets its tracees go
   * on). resume() clears it again with the detach. */
  dieWithUs(): void {
    let first = true;
    for (const threads of this.byProcess().values()) {
      for (const t of threads)
        if (t.stopped)
          try {
            addon().killOnExit(t.tid);
          } catch {
            /* it died meanwhile */
          }
      if (first) killPoint('snapshot: dies with appshot, one process');
      first = false;
    }
  }

  /** Undoes dieWithUs, the threads still stopped: appshot's death lets
   * them go on again (a snapshot that fails past its journaled ending
   * does this before it journals that it rolls back, so that the record
   * never says "rolled back" of an application that would die with it). */
  liveOn(): void {
    for (const t of this.threads.values())
      if (t.stopped)
        try {
          addon().keepOnExit(t.tid);
        } catch {
          /* it died meanwhile */
        }
  }

  /** Kills every process while it is still stopped (the snapshot's default
   * ending: the image is now the application). */
  kill(): void {
    for (const pid of this.processes)
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    for (const t of this.threads.values()) t.stopped = false;
    // Reap every tracee's exit report: until we do, its real parent (init)
    // is not told it exited, and init removes the application only once
    // it has seen its last process go. A large process takes a while to
    // die (its memory is freed first).
    const deadline = Date.now() + 10_000;
    while (this.threads.size && Date.now() < deadline) {
      const r = addon().waitAny([...this.threads.keys()], 100);
      if (r && letGoIfUnsettled(r)) continue;
      if (r?.kind === 'exited') this.threads.delete(r.tid);
      else if (!r) for (const tid of [...this.threads.keys()]) if (!existsSync(`/proc/${tid}`)) this.threads.delete(tid);
    }
    this.threads.clear();
    this.processes.clear();
  }

  /** Stopped threads by process, main thread first. */
  byProcess(): Map<number, FrozenThread[]> {
    const out = new Map<number, FrozenThread[]>();
    for (const t of this.threads.values()) {
      if (!out.has(t.pid)) out.set(t.pid, []);
      out.get(t.pid)!.push(t);
    }
    for (const list of out.values()) list.sort((a, b) => (a.tid === a.pid ? -1 : b.tid === b.pid ? 1 : a.tid - b.tid));
    return out;
  }
}

/** Waits (up to 100 ms) for a thread detached in a job-control stop to
 * enter it again: it runs through the kernel to get there ('R', then 'T'),
 * and its parent, resumed next, must find it stopped as it left it. */
function backInStop(tid: number): void {
  const until = Date.now() + 100;
  while (Date.now() < until) {
    const st = readStat(tid);
    if (!st || st.state === 'T') return;
  }
}

/** Seized threads that had not stopped when a freezer gave up: each is
 * let go at its first stop (the interrupt it was sent, once the vfork or
 * the uninterruptible sleep ends), exactly as it was; one that exits is
 * forgotten. Checked on a timer that does not keep a CLI process alive
 * (its exit lets them go anyway). */
const unsettled = new Set<number>();
let unsettledTimer: NodeJS.Timeout | undefined;

function detachWhenStopped(tid: number): void {
  unsettled.add(tid);
  if (unsettledTimer) return;
  unsettledTimer = setInterval(() => {
    for (const tid of unsettled) {
      let r: TraceReport | null;
      try {
        r = addon().wait(tid, 0);
      } catch {
        unsettled.delete(tid); // not ours any more (ECHILD): gone
        continue;
      }
      if (r) letGoIfUnsettled(r);
    }
    if (unsettled.size === 0) {
      clearInterval(unsettledTimer);
      unsettledTimer = undefined;
    }
  }, 50);
  unsettledTimer.unref();
}

/** If `r` (from a wait for any tracee) is about a thread left to be let
 * go, lets it go (or forgets it, if it exited) and says so: whoever waited
 * must not take it for one of its own. */
export function letGoIfUnsettled(r: TraceReport): boolean {
  if (!unsettled.delete(r.tid)) return false;
  if (r.kind === 'exited') return true;
  // It stopped at a fork: the kernel attached the new child to us as well,
  // and nobody else will let that one go.
  if (r.kind === 'event' && (r.event === PTRACE_EVENT.fork || r.event === PTRACE_EVENT.vfork || r.event === PTRACE_EVENT.clone)) detachWhenStopped(r.msg);
  try {
    // A signal it was about to take is given back; a job-control stop's
    // signal too, so that it stops as it would have.
    addon().detach(r.tid, r.kind === 'signal' || r.kind === 'group-stop' ? r.sig : 0);
  } catch {
    /* died meanwhile */
  }
  return true;
}
