/**
 * Job control: a process stopped by SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU
 * when the snapshot was taken comes back stopped by the same signal, which
 * is what its parent's waitpid(WUNTRACED) and a shell's `jobs` report.
 *
 * The restore queues that signal before the processes are let go, so none
 * runs a single instruction; those stopped are let go first, and each is
 * back in its stop before the others run (a parent checking on a stopped
 * child must not find it running through the kernel on its way there).
 *
 * Whether the parent already took the stop's report (waitpid(WUNTRACED))
 * is the parent's to tell: asked of it with waitid(WNOWAIT), which leaves
 * the report where it is. The new stop reports itself afresh, so for a
 * stop whose report had been taken the restore takes it in the parent's
 * stead (waitid(WSTOPPED | WNOHANG) run in the parent, still held), before
 * the parent runs: it is not told the same stop twice.
 *
 * A child continued (SIGCONT) after a stop has that to report until its
 * parent takes it (waitpid(WCONTINUED)); the kernel keeps it in the child
 * (a flag of its signal state, which no file shows), so the parent is
 * asked too (waitid(WCONTINUED | WNOWAIT)), and the restore makes the
 * report again: the child, still held, is stopped (SIGSTOP, queued before
 * it is let go: it runs nothing of its own) and continued. The SIGCHLDs
 * that sends the parent are taken back unless the image had one pending.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { type Process } from '../image/types.js';
import { addon } from '../native.js';
import { readStat } from '../procfs.js';
import { Injector } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { Unsupported } from './context.js';
import { readMaps } from './memory.js';

const SIGSTOP = 19;
const SIG_DFL = 0n;

const STOP_SIGNALS = new Set([19, 20, 21, 22]);
const SIGINFO_BYTES = 128;

/** Sets `p.stopSignal`, and for a process stopped by job control leaves
 * out the stop signals it has pending: a stopped process dequeues nothing,
 * and the SIGCONT that ends its stop discards them; queued again in a
 * restored process they would be taken before the stop signal is, and
 * change the one it reports. */
export function dumpJobControl(p: Process, stopSignal: number | undefined, what: string): void {
  p.stopSignal = dumpStopSignal(stopSignal, p, what);
  if (!p.groupStopped) return;
  p.sharedPending = withoutStops(p.sharedPending);
  for (const t of p.threads) t.pending = withoutStops(t.pending);
}

function withoutStops(siginfos: Buffer): Buffer {
  const kept: Buffer[] = [];
  for (let at = 0; at + SIGINFO_BYTES <= siginfos.length; at += SIGINFO_BYTES)
    if (!STOP_SIGNALS.has(siginfos.readInt32LE(at))) kept.push(siginfos.subarray(at, at + SIGINFO_BYTES));
  return Buffer.concat(kept);
}

/** The signal that stopped the process (0 if it was not stopped). A stop
 * signal other than SIGSTOP stops a process only while its action is the
 * default and it is not blocked: if that no longer holds (changed while
 * stopped, by another process's ptrace), a restore could not stop it the
 * same way. */
function dumpStopSignal(stopSignal: number | undefined, p: Pick<Process, 'sigactions' | 'threads'>, what: string): number {
  if (!stopSignal) return 0;
  if (stopSignal === SIGSTOP) return stopSignal;
  const handled = p.sigactions.some((a) => a.signal === stopSignal && a.handler !== SIG_DFL);
  const bit = 1n << BigInt(stopSignal - 1);
  const blocked = p.threads.every((t) => (t.sigmask & bit) !== 0n);
  if (handled || blocked) throw new Unsupported(`${what}: stopped by signal ${stopSignal}, which it now ${handled ? 'handles' : 'blocks'}: it cannot be stopped again the same way`);
  return stopSignal;
}

const NR_waitid = 247;
const P_PID = 1;
const WNOHANG = 1;
const WSTOPPED = 2;
const WNOWAIT = 0x01000000;
/** siginfo_t's si_pid: 0 when waitid found nothing to report. */
const SI_PID_AT = 16;

/** Asks the process (through its questions) whether each of its children
 * stopped by job control (system PIDs) still has its stop to report. */
export function askStopReports(calls: CallQueue, stoppedChildren: number[]): Map<number, Answer> {
  return new Map(stoppedChildren.map((child) => [child, calls.ask(NR_waitid, [P_PID, child, 'buf', WSTOPPED | WNOHANG | WNOWAIT, 0], { outLength: 128 })]));
}

const WCONTINUED = 8;
/** siginfo_t's si_code: CLD_CONTINUED for a continued child's report. */
const SI_CODE_AT = 8;
const CLD_CONTINUED = 6;

/** Asks the process whether each of its children running (system PIDs)
 * has a continued report it has not taken. WCONTINUED alone: a stop or an
 * exit to report is not what it answers. (A child has one of a stop or a
 * continued report at most: the kernel's SIGCONT ends the one, its next
 * stop the other.) */
export function askContinuedReports(calls: CallQueue, runningChildren: number[]): Map<number, Answer> {
  return new Map(runningChildren.map((child) => [child, calls.ask(NR_waitid, [P_PID, child, 'buf', WCONTINUED | WNOHANG | WNOWAIT, 0], { outLength: 128 })]));
}

/** The children (as `virtual` names them) whose continued report the
 * process has not taken. Any other answer records nothing. */
export function continuedReports(asked: Map<number, Answer>, virtual: (systemPid: number) => number): number[] {
  const pending: number[] = [];
  for (const [child, a] of asked) if (a.ret === 0n && a.out.readInt32LE(SI_PID_AT) === child && a.out.readInt32LE(SI_CODE_AT) === CLD_CONTINUED && virtual(child)) pending.push(virtual(child));
  return pending.sort((x, y) => x - y);
}

/** The children (as `virtual` names them) whose stop report the process
 * has taken already: waitid answered 0 with nothing to report. Any other
 * answer (not a child of it after all, a kernel error) records nothing:
 * the restored stop is reported, as before. */
export function stopReportsTaken(asked: Map<number, Answer>, virtual: (systemPid: number) => number): number[] {
  const taken: number[] = [];
  for (const [child, a] of asked) if (a.ret === 0n && a.out.readInt32LE(SI_PID_AT) === 0 && virtual(child)) taken.push(virtual(child));
  return taken.sort((x, y) => x - y);
}

interface Restored {
  proc: Process;
  pid: number;
  tids: number[];
}

/** Lets every restored thread go (PTRACE_DETACH), with those stopped by
 * job control stopped again first, and those whose parent had their
 * continued report to take stopped and continued. Returns the processes
 * whose stop signal did not take (a SIGTSTP to a process group with no
 * parent in its session outside it is discarded by the kernel): stopped
 * by SIGSTOP instead, for the caller to name.
 *
 * Parent by parent, deepest first: a parent's stopped and continued
 * children are let go while it is still held (the calls that take their
 * reports and signals back run in it), and once their own children are
 * (a child is a parent too, held for its own children's calls before it
 * is let go). The others go last, all at once. */
export function releaseRestored(made: Restored[]): Restored[] {
  const byVpid = new Map(made.map((m) => [m.proc.vpid, m]));
  const depth = (m: Restored) => {
    let d = 0;
    for (let q = byVpid.get(m.proc.vppid); q && d < made.length; q = byVpid.get(q.proc.vppid)) d++;
    return d;
  };
  const childrenOf = new Map<Restored, Restored[]>();
  for (const c of made) {
    const parent = byVpid.get(c.proc.vppid);
    if (!parent || parent === c) continue;
    const siblings = childrenOf.get(parent);
    if (siblings) siblings.push(c);
    else childrenOf.set(parent, [c]);
  }
  const letGo = new Set<Restored>();
  const missed: Restored[] = [];
  const parents = [...childrenOf.keys()].map((m) => ({ m, d: depth(m) })).sort((a, b) => b.d - a.d);
  for (const { m: parent } of parents) {
    const stopped = childrenOf.get(parent)!.filter((c) => c.proc.groupStopped);
    if (stopped.length) {
      missed.push(...stopAgain(stopped));
      for (const c of stopped) letGo.add(c);
      takeReportsAgain(parent, stopped);
    }
    if (parent.proc.continuedReports?.length) for (const c of continueAgain(parent, byVpid)) letGo.add(c);
  }
  // Stopped with no parent in the application.
  const stoppedRoots = made.filter((m) => m.proc.groupStopped && !letGo.has(m));
  missed.push(...stopAgain(stoppedRoots));
  for (const m of stoppedRoots) letGo.add(m);
  // One native call for all of them; one that fails (killed meanwhile:
  // ESRCH) is handled as detachRestored does, and the rest go on.
  const tids = made.filter((m) => !letGo.has(m)).flatMap((m) => m.tids);
  for (let at = 0; at < tids.length; ) {
    at += addon().detachAll(tids.slice(at));
    if (at < tids.length) detachRestored(tids[at++]);
  }
  return missed;
}

/** Each process let go with its stop signal queued, and waited for in its
 * stop; those whose stop signal did not take, stopped by SIGSTOP and
 * returned. */
function stopAgain(stopped: Restored[]): Restored[] {
  const missed: Restored[] = [];
  for (const m of stopped) {
    process.kill(m.pid, m.proc.stopSignal || SIGSTOP);
    for (const tid of m.tids) addon().detach(tid, 0);
  }
  for (const m of stopped)
    if (!backInStop(m.pid)) {
      process.kill(m.pid, SIGSTOP);
      missed.push(m);
    }
  return missed;
}

/** After a failure once the restore has committed (the application is
 * init's to keep then, whatever befalls us): every thread that is still
 * ours let go, as releaseRestored would, errors ignored. A thread let go
 * already answers ESRCH and has no report for us (wait() says ECHILD); one
 * still ours but killed meanwhile has its exit taken, as in
 * releaseRestored. A process stopped by job control gets its stop signal
 * again, which changes nothing if it is in that stop already. */
export function releaseWhatIsLeft(made: Restored[]): void {
  for (const m of made) {
    if (m.proc.groupStopped)
      try {
        process.kill(m.pid, m.proc.stopSignal || SIGSTOP);
      } catch {
        /* gone */
      }
    for (const tid of m.tids)
      try {
        detachRestored(tid);
      } catch {
        /* gone, or the tracing failed: nothing more to do for it */
      }
  }
}

/** PTRACE_DETACH of a restored thread. One already let go may have killed
 * it meanwhile (a parent that kills its child as soon as it runs): dying,
 * it has nothing left to let go, and the restore has succeeded; its exit
 * is taken here, as its tracer's, so that its parent can reap it (which
 * it could not while the tracer, perhaps a resident engine, held it). A
 * thread that is not ours any more (let go before) makes wait() answer
 * null at once. */
function detachRestored(tid: number): void {
  for (let tries = 0; tries < 8; tries++) {
    try {
      addon().detach(tid, 0);
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
    }
    const r = addon().wait(tid, 1000);
    if (!r || r.kind === 'exited') return;
  }
}

/** For each stopped child whose report its parent had taken before the
 * snapshot, the fresh report of its new stop is taken now, by the parent
 * itself (still held), which then never sees it. A call that fails leaves
 * the report to be seen, as without this.
 *
 * The new stop also sent the parent a SIGCHLD (unless it ignores SIGCHLD
 * or set SA_NOCLDSTOP). The one of the stop it had was in the image if
 * still pending, queued again (requeueSignals); else it had been taken,
 * and this one, which a parent blocking SIGCHLD (signalfd, sigwait) saw
 * pending with no report behind it, is taken back as the zombies' are.
 *
 * The parent's seccomp filters are back since the commit (keepOnExit): a
 * sandbox that kills it on waitid, a call it never makes (glibc's waitpid
 * is wait4), killed it here. Its threads are exempted for the calls
 * (PTRACE_O_SUSPEND_SECCOMP), and where appshot may not (no
 * CAP_SYS_ADMIN) the report and the signal are left to be seen.
 *
 * The report exists once the whole stop is made: the child's last thread
 * to enter it makes it, and the first one in shows 'T' already; waitid
 * asked before then found nothing, and the report came after. */
function takeReportsAgain(parent: Restored, children: Restored[]): void {
  const taken = new Set(parent.proc.stopReportsTaken ?? []);
  const dropSigchld = notifiedOfStops(parent.proc) && !hasSigchld(parent.proc);
  if (!dropSigchld && !children.some((c) => taken.has(c.proc.vpid))) return;
  const held = holdForCalls(parent);
  if (!held) return;
  try {
    let whole = true;
    for (const child of children) {
      if (!wholeStop(child.pid)) {
        whole = false;
        continue;
      }
      if (taken.has(child.proc.vpid)) held.inj.call(NR_waitid, [P_PID, child.pid, 0, WSTOPPED | WNOHANG, 0]);
    }
    if (dropSigchld && whole && sigchldArrived(parent.pid)) takeSigchld(held.inj);
  } catch {
    /* killed meanwhile, or its stack not writable there: the report and
     * the signal are left to be seen, and the others let go all the same */
  } finally {
    held.close();
  }
}

/** For each child whose continued report its parent (still held) had not
 * taken: the child, still held, stopped and continued, which makes that
 * report, and let go (returned).
 *
 * The child's SIGCONT handler would run for this SIGCONT, and a SIGCONT
 * its main thread blocks would stay pending; the SIGSTOP discards a
 * SIGCONT pending, and the SIGCONT a stop signal pending: such a child is
 * left to be let go as it is, its report left out.
 *
 * Each of the child's stop and continue sends the parent a SIGCHLD
 * (unless it ignores SIGCHLD or set SA_NOCLDSTOP); the child's first
 * thread to run again sends the continue's. Unless the image had one
 * pending (queued again: these merge into it), each is taken back in the
 * parent, as takeReportsAgain does, once it has come. */
function continueAgain(parent: Restored, byVpid: Map<number, Restored>): Restored[] {
  const children = (parent.proc.continuedReports ?? []).map((v) => byVpid.get(v)).filter((c): c is Restored => !!c && !c.proc.groupStopped && continuable(c.proc));
  if (!children.length) return [];
  const dropSigchld = notifiedOfStops(parent.proc) && !hasSigchld(parent.proc);
  const held = dropSigchld ? holdForCalls(parent) : undefined;
  const done: Restored[] = [];
  /** The SIGCHLD the child's stop or continue sent, taken back. A child
   * let go before (`done`) may have exited or stopped meanwhile: its
   * SIGCHLD merged into the one taken, and is queued again (the parent,
   * still held, keeps it pending), or the parent would never hear of it. */
  const takeBack = (stopping: Restored | undefined) => {
    if (!held || !sigchldArrived(parent.pid, 2000)) return;
    takeSigchld(held.inj);
    const changed = done.some((c) => c !== stopping && /^[ZXTt]?$/.test(readStat(c.pid)?.state ?? ''));
    if (changed) process.kill(parent.pid, SIGCHLD);
  };
  try {
    for (const child of children) {
      process.kill(child.pid, SIGSTOP);
      for (const tid of child.tids) addon().detach(tid, 0);
      done.push(child);
      try {
        // Before the stop is whole, a SIGCONT reports a continue all the
        // same; before the SIGSTOP is taken, it discards it.
        if (wholeStop(child.pid, 2000)) takeBack(child);
      } finally {
        // Whatever failed, the child is not left stopped.
        process.kill(child.pid, SIGCONT);
      }
      takeBack(undefined);
    }
  } catch {
    /* a child killed meanwhile, or the parent: the others let go all the
     * same, by the caller */
  } finally {
    held?.close();
  }
  return done;
}

const SIGCONT = 18;
const SIGCONT_BIT = 1n << BigInt(SIGCONT - 1);

/** Whether the restore's SIGSTOP and SIGCONT leave nothing of themselves
 * in the process (see continueAgain). */
function continuable(p: Process): boolean {
  const a = p.sigactions.find((x) => x.signal === SIGCONT);
  if (a && a.handler !== SIG_DFL && a.handler !== SIG_IGN) return false;
  if (!p.threads.length || (p.threads[0].sigmask & SIGCONT_BIT) !== 0n) return false;
  return ![p.sharedPending, ...p.threads.map((t) => t.pending)].some((q) => {
    for (let at = 0; at + SIGINFO_BYTES <= q.length; at += SIGINFO_BYTES) {
      const sig = q.readInt32LE(at);
      if (sig === SIGCONT || STOP_SIGNALS.has(sig)) return true;
    }
    return false;
  });
}

/** The parent, still held, made ready for calls run in it: its threads
 * exempted from their seccomp filters meanwhile (see takeReportsAgain).
 * Undefined where that fails. */
function holdForCalls(parent: Restored): { inj: Injector; close: () => void } | undefined {
  const tid = parent.tids[0];
  const filtered = [parent.proc.creds, parent.proc.threads[0]?.creds].some((c) => c && c.seccomp !== 0);
  try {
    if (filtered) addon().suspendSeccomp(tid, false);
    const inj = Injector.open(parent.pid, tid, readMaps(parent.pid).find((l) => l.path === '[vdso]'));
    return {
      inj,
      close: () => {
        try {
          inj.close();
        } catch {
          /* gone */
        }
        if (filtered) putSeccompBack(tid);
      },
    };
  } catch {
    if (filtered) putSeccompBack(tid);
    return undefined;
  }
}

/** rt_sigtimedwait({SIGCHLD}, NULL, {0, 0}) run in the process: its
 * pending SIGCHLD dequeued, not delivered. */
function takeSigchld(inj: Injector): void {
  const input = Buffer.alloc(24);
  input.writeBigUInt64LE(SIGCHLD_BIT, 0);
  inj.callWith(NR_rt_sigtimedwait, ['buf', 0, { bufAt: 8 }, 8], input);
}

const SIGCHLD = 17;
const SIGCHLD_BIT = 1n << BigInt(SIGCHLD - 1);
const NR_rt_sigtimedwait = 128;
const SIG_IGN = 1n;
const SA_NOCLDSTOP = 1n;

/** Whether a child's stop sends the process a SIGCHLD. */
function notifiedOfStops(p: Process): boolean {
  const a = p.sigactions.find((x) => x.signal === SIGCHLD);
  return !a || (a.handler !== SIG_IGN && (a.flags & SA_NOCLDSTOP) === 0n);
}

/** Whether the image has a SIGCHLD pending in the process (any thread). */
function hasSigchld(p: Process): boolean {
  return [p.sharedPending, ...p.threads.map((t) => t.pending)].some((q) => {
    for (let at = 0; at + SIGINFO_BYTES <= q.length; at += SIGINFO_BYTES) if (q.readInt32LE(at) === SIGCHLD) return true;
    return false;
  });
}

/** Waits (up to `ms`) for the SIGCHLD of a child's stop, sent just after
 * the stop is whole, or of its continue, to be pending in the process. */
function sigchldArrived(pid: number, ms = 200): boolean {
  const until = Date.now() + ms;
  do {
    try {
      const line = readFileSync(`/proc/${pid}/status`, 'latin1').split('\n').find((l) => l.startsWith('ShdPnd:'));
      if (line && (BigInt(`0x${line.slice(7).trim()}`) & SIGCHLD_BIT) !== 0n) return true;
    } catch {
      return false;
    }
  } while (Date.now() < until);
  return false;
}

/** The thread's filters apply again (the options of keepOnExit). */
function putSeccompBack(tid: number): void {
  try {
    addon().keepOnExit(tid);
  } catch {
    /* gone */
  }
}

/** Waits (up to `ms`) for every thread of a process to be in its stop
 * ('T'): its stop is whole then, and reported. */
function wholeStop(pid: number, ms = 200): boolean {
  const until = Date.now() + ms;
  do {
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${pid}/task`);
    } catch {
      return false; // gone
    }
    if (tids.every((tid) => readStat(Number(tid))?.state === 'T')) return true;
  } while (Date.now() < until);
  return false;
}

/** Waits (up to 200 ms) for a process let go with its stop signal queued
 * to enter the stop ('T'). */
function backInStop(pid: number): boolean {
  const until = Date.now() + 200;
  while (Date.now() < until) {
    const st = readStat(pid);
    if (!st || st.state === 'T') return true;
  }
  return false;
}
