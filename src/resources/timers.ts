/**
 * POSIX timers (timer_create): per process, each known to the application
 * by the id the kernel gave it. /proc/PID/timers lists each timer's id,
 * clock, and whom it notifies how (a signal to the process or to one
 * thread, or nothing); the time left, the interval and the overrun only
 * the process can ask for (timer_gettime, timer_getoverrun, injected).
 *
 * A restore makes each timer again under its own id: the kernel takes the
 * id to use from timer_create's out-parameter while
 * prctl(PR_TIMER_CREATE_RESTORE_IDS) is on (Linux 6.16, for exactly this).
 * A timer that notifies one thread names that thread's new system TID.
 * Time left is carried as such, as for timerfds (timerfd.ts).
 *
 * A timer on a CPU-time clock is made again on the same clock of the
 * restored process: its own process's (CLOCK_PROCESS_CPUTIME_ID, and the
 * profiling and virtual variants), or the thread's that made it, which
 * /proc does not name: known only in a process of one thread. The time
 * left is CPU time still to be used, as it was; the CPU time the process
 * had used is not carried (clock_gettime on it starts again near 0).
 *
 * A clock that names its process or thread (clock_getcpuclockid,
 * pthread_getcpuclockid: the kernel keeps the clock as timer_create got
 * it, which the preload library made the system's, so /proc shows the
 * system PID or TID inside it) is recorded as the application holds it,
 * with the virtual PID or TID inside (an older appshot refuses such a
 * clock, never misreads it), and made again
 * on that process's or thread's new system id: a process of the image
 * (the kernel takes only a thread group's leader there), or a thread of
 * the timer's own process (the kernel takes no other). Refused by name: a
 * clock of a process outside the application, or of a thread that is gone.
 *
 * Not carried: the overrun count of the last expiry (no call sets it); a
 * timer's signal already queued comes back as an ordinary queued signal
 * (signals.ts), with its siginfo.
 */
import { procText } from '../procfs.js';
import { type PosixTimer, PosixTimerNotify } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Unsupported } from './context.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';

const NR_timer_gettime = 224;
const NR_timer_getoverrun = 225;
const PR_TIMER_CREATE_RESTORE_IDS = 77;
const RESTORE_IDS_OFF = 0;
const RESTORE_IDS_ON = 1;
const SIGEV_SIGNAL = 0;
const SIGEV_NONE = 1;
const SIGEV_THREAD_ID = 4;
/** The clocks a timer can be made on by number alone; the others (a
 * process's or thread's CPU clock) encode a PID. */
const PLAIN_CLOCKS = new Set([0, 1, 7, 8, 9, 11]); // REALTIME MONOTONIC BOOTTIME REALTIME_ALARM BOOTTIME_ALARM TAI
/** A CPU-time clock as the kernel encodes it (negative): ~pid << 3, the
 * per-thread bit (4), and which count (PROF 0, VIRT 1, SCHED 2). */
const cpuClockPid = (clock: number) => ~(clock >> 3);
const cpuClockMake = (id: number, low: number) => ((~id << 3) | low) >> 0;
const CPUCLOCK_LOW = 7;
const CPUCLOCK_PERTHREAD = 4;

/** The timer's CPU-time clock as the image keeps it (the id inside made
 * virtual), or why it cannot be made again. `threads`: the process's;
 * `processOf`: the virtual PID of a process of the image by system PID. */
function cpuClock(clock: number, threads: { tid: number; vtid: number }[], processOf: (pid: number) => number | undefined): number | string {
  if (clock >= 0 || (clock & 3) === 3) return `runs on clock ${clock}`;
  const id = cpuClockPid(clock);
  const perThread = (clock & CPUCLOCK_PERTHREAD) !== 0;
  if (id === 0) {
    if (perThread && threads.length > 1) return `runs on the CPU-time clock of the thread that made it (clock ${clock}), which /proc does not name in a process of ${threads.length} threads`;
    return clock;
  }
  if (perThread) {
    const thread = threads.find((t) => t.tid === id);
    if (!thread) return `runs on the CPU-time clock of system TID ${id} (pthread_getcpuclockid), which is no thread of the process any more`;
    return cpuClockMake(thread.vtid, clock & CPUCLOCK_LOW);
  }
  const vpid = processOf(id);
  if (!vpid) return `runs on the CPU-time clock of system PID ${id} (clock_getcpuclockid), a process outside the application`;
  return cpuClockMake(vpid, clock & CPUCLOCK_LOW);
}
const NS = 1_000_000_000n;

interface Listed {
  id: number;
  signal: number;
  value: bigint;
  how: string;
  target: 'pid' | 'tid';
  targetId: number;
  clockid: number;
}

/** /proc/PID/timers: "ID:", "signal: N/VALUE", "notify: HOW/pid.N" or
 * "HOW/tid.N", "ClockID:", one block per timer. */
function listTimers(pid: number, what: string): Listed[] {
  let text: string;
  try {
    text = procText(`/proc/${pid}/timers`);
  } catch {
    return []; // a kernel without CONFIG_CHECKPOINT_RESTORE: none can be seen
  }
  const out: Listed[] = [];
  for (const block of text.split(/(?=^ID:)/m)) {
    if (!block.trim()) continue;
    const m = /^ID: (-?\d+)\nsignal: (\d+)\/([0-9a-f]+)\nnotify: (\w+)\/(pid|tid)\.(\d+)\nClockID: (-?\d+)/.exec(block);
    if (!m) throw new Unsupported(`${what}: a POSIX timer this kernel lists as '${block.trim().replace(/\n/g, ' ')}' cannot be captured yet`);
    out.push({ id: Number(m[1]), signal: Number(m[2]), value: BigInt('0x' + m[3]), how: m[4], target: m[5] as 'pid' | 'tid', targetId: Number(m[6]), clockid: Number(m[7]) });
  }
  return out.sort((a, b) => a.id - b.id);
}

/** The process's timers as /proc lists them, each with its time and
 * overrun asked (with the other kinds' questions). */
export interface TimersAsked {
  timers: Listed[];
  time: Answer[];
  overrun: Answer[];
}

export function askPosixTimers(pid: number, calls: CallQueue, what: string): TimersAsked {
  const timers = listTimers(pid, what);
  return {
    timers,
    time: timers.map((t) => calls.ask(NR_timer_gettime, [t.id, 'buf'], { outLength: 32 })),
    overrun: timers.map((t) => calls.ask(NR_timer_getoverrun, [t.id])),
  };
}

/** The process's timers, in id order; `threads`: its threads as dumped;
 * `asked`: askPosixTimers's questions, answered; `processOf`: the virtual
 * PID of a process of the image by its system PID, undefined for one
 * outside it. */
export function dumpPosixTimers(asked: TimersAsked, threads: { tid: number; vtid: number }[], processOf: (pid: number) => number | undefined, what: string): PosixTimer[] {
  return asked.timers.map((t, i) => {
    const name = `${what}: POSIX timer ${t.id}`;
    const clockid = PLAIN_CLOCKS.has(t.clockid) ? t.clockid : cpuClock(t.clockid, threads, processOf);
    if (typeof clockid === 'string') throw new Unsupported(`${name} ${clockid}, which cannot be captured yet`);
    let notify: number;
    let vtid = 0;
    if (t.target === 'tid') {
      const thread = threads.find((th) => th.tid === t.targetId);
      if (t.how !== 'signal' || !thread) throw new Unsupported(`${name} notifies thread ${t.targetId} as '${t.how}', which cannot be captured yet`);
      notify = PosixTimerNotify.THREAD;
      vtid = thread.vtid;
    } else if (t.how === 'signal') {
      notify = PosixTimerNotify.SIGNAL;
    } else if (t.how === 'none') {
      notify = PosixTimerNotify.NONE;
    } else {
      throw new Unsupported(`${name} notifies as '${t.how}', which cannot be captured yet`);
    }
    const { ret, out } = asked.time[i];
    if (ret !== 0n) throw new Error(`${name}: timer_gettime failed (${-ret})`);
    const ns = (o: number) => out.readBigInt64LE(o) * NS + out.readBigInt64LE(o + 8);
    const overrun = asked.overrun[i].ret;
    return { id: t.id, clockid, notify, signal: t.signal, value: t.value, vtid, intervalNs: ns(0), valueNs: ns(16), overrun: overrun < 0n ? 0 : Number(overrun) };
  });
}

/** struct sigevent (64 bytes): value, signo, notify, then the thread id. */
function sigevent(t: PosixTimer, tid: number): Buffer {
  const ev = Buffer.alloc(64);
  ev.writeBigUInt64LE(t.value, 0);
  ev.writeInt32LE(t.signal, 8);
  const how = { [PosixTimerNotify.SIGNAL]: SIGEV_SIGNAL, [PosixTimerNotify.NONE]: SIGEV_NONE, [PosixTimerNotify.THREAD]: SIGEV_SIGNAL | SIGEV_THREAD_ID }[t.notify];
  if (how === undefined) throw new Error(`POSIX timer ${t.id}: unknown notification ${t.notify}`);
  ev.writeInt32LE(how, 12);
  ev.writeInt32LE(tid, 16);
  return ev;
}

/** What is wrong with POSIX timer `t`'s clock, if anything (for
 * validate.ts's "corrupt image" line, before anything is made): one of
 * the plain clocks timer_create takes, or a CPU-time clock of a process
 * or thread (its own, id 0, or one named by virtual id above 0), as a
 * snapshot records them (clockNow makes it again). */
export function posixTimerClockFault(t: Pick<PosixTimer, 'id' | 'clockid'>): string | undefined {
  if (!Number.isInteger(t.clockid)) return `POSIX timer ${t.id} on clock ${t.clockid}`;
  if (PLAIN_CLOCKS.has(t.clockid)) return undefined;
  // CPUCLOCK_PROF, _VIRT, _SCHED; 3 is no clock.
  if (t.clockid >= 0 || (t.clockid & 3) === 3) return `POSIX timer ${t.id} on clock ${t.clockid}, which timer_create does not take`;
  if (cpuClockPid(t.clockid) < 0) return `POSIX timer ${t.id} on clock ${t.clockid}, which names id ${cpuClockPid(t.clockid)}`;
  return undefined;
}

/** The clock to make timer `t` on, with the id of its process or thread
 * on this node. */
function clockNow(t: PosixTimer, systemTid: (vtid: number) => number | undefined, systemPid: (vpid: number) => number | undefined): number {
  if (PLAIN_CLOCKS.has(t.clockid)) return t.clockid;
  if (t.clockid >= 0 || (t.clockid & 3) === 3)
    throw new Error(`corrupt image: POSIX timer ${t.id} on clock ${t.clockid}, which a snapshot never records`);
  const vid = cpuClockPid(t.clockid);
  if (!vid) return t.clockid;
  if (vid < 0) throw new Error(`corrupt image: POSIX timer ${t.id} on clock ${t.clockid} names id ${vid}`);
  const thread = (t.clockid & CPUCLOCK_PERTHREAD) !== 0;
  const id = thread ? systemTid(vid) : systemPid(vid);
  if (!id) throw new Error(`corrupt image: POSIX timer ${t.id} runs on the CPU-time clock of ${thread ? 'thread' : 'process'} ${vid}, which the image does not hold${thread ? ' in its process' : ''}`);
  return cpuClockMake(id, t.clockid & CPUCLOCK_LOW);
}

/** Every timer under its id, set as it was; `systemTid(vtid)`: a restored
 * thread's TID (of this process), `systemPid(vpid)`: a restored process's
 * PID, both undefined for an id the image does not hold. Run once the
 * threads exist (and every process of the image), and last of all: timers
 * start at once. */
export function restorePosixTimers(r: RemoteProcess, timers: PosixTimer[] | undefined, systemTid: (vtid: number) => number | undefined, systemPid: (vpid: number) => number | undefined): void {
  if (!timers?.length) return;
  // Before anything is made: a corrupt image leaves nothing half done.
  const clocks = timers.map((t) => clockNow(t, systemTid, systemPid));
  if (r.raw(SYS.prctl, [PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0]) !== 0n)
    throw new Error(`this kernel cannot make a POSIX timer under a given id (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.16): timer ${timers[0].id} cannot be restored`);
  try {
    for (const [i, t] of timers.entries()) {
      r.reset();
      const id = Buffer.alloc(4);
      id.writeInt32LE(t.id);
      const idAt = r.put(id);
      const tid = t.notify === PosixTimerNotify.THREAD ? systemTid(t.vtid) ?? 0 : 0;
      r.call(`making POSIX timer ${t.id}`, SYS.timer_create, [clocks[i], r.put(sigevent(t, tid)), idAt]);
      const got = r.get(idAt, 4).readInt32LE();
      if (got !== t.id) throw new Error(`POSIX timer ${t.id} came back as ${got}`);
    }
  } finally {
    r.call('leaving timer id restore mode', SYS.prctl, [PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0]);
  }
  for (const t of timers) {
    // A periodic timer whose expiry is being signalled shows no time
    // left: it goes on a period on.
    const left = t.valueNs || t.intervalNs;
    if (!left) continue;
    r.reset();
    const spec = r.put(r.u64s([t.intervalNs / NS, t.intervalNs % NS, left / NS, left % NS]));
    r.call(`setting POSIX timer ${t.id}`, SYS.timer_settime, [t.id, 0, spec, 0]);
  }
}

/** What `inspect` says of one. */
export function describePosixTimer(t: PosixTimer): string {
  const s = (ns: bigint) => `${(Number(ns) / 1e9).toFixed(3)}s`;
  const to = t.notify === PosixTimerNotify.NONE ? 'no signal' : `signal ${t.signal}${t.notify === PosixTimerNotify.THREAD ? ` to thread ${t.vtid}` : ''}`;
  const when = t.valueNs ? `in ${s(t.valueNs)}` : 'disarmed';
  const vid = t.clockid < 0 && (t.clockid & 3) !== 3 ? cpuClockPid(t.clockid) : 0;
  const clock = vid ? `the CPU-time clock ${t.clockid} of ${t.clockid & CPUCLOCK_PERTHREAD ? 'thread' : 'process'} ${vid}` : `clock ${t.clockid}`;
  return `${t.id} ${clock}, ${to}, ${when}${t.intervalNs ? ` every ${s(t.intervalNs)}` : ''}`;
}
