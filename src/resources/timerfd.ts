/**
 * timerfd: a descriptor that counts a clock's expirations. Its state, all
 * in /proc/PID/fdinfo: the clock, the flags it was set with, the time left
 * and the interval, and the expirations not read yet ("ticks"). It is made
 * again inside the restored process, set, and given its unread ticks back
 * (TFD_IOC_SET_TICKS, the kernel's checkpoint/restore ioctl).
 *
 * Time left is carried as such: a timer with 3 s to go fires 3 s after the
 * restore, however long the image waited. One exception: a CLOCK_REALTIME
 * timer set absolute (TFD_TIMER_ABSTIME) names a wall-clock instant, which
 * is what it keeps, so that it fires at that instant (at once if it passed).
 * A timer set absolute on another clock (CLOCK_MONOTONIC, CLOCK_BOOTTIME)
 * is set absolute again, its time left from the clock's now in the
 * restored process, so that its flags read back as they were.
 */
import { type Fd, FdKind, type Image, type Timerfd } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { AppshotError, ExitCode } from '../errors.js';
import { nameProcess } from './context.js';
import { CAP_WAKE_ALARM, processMay, restorerMay, vouchedFor } from './heldcaps.js';

const TFD_NONBLOCK = 0o4000; // = O_NONBLOCK, as fdinfo shows it
const TFD_CLOEXEC = 0o2000000;
const TFD_TIMER_ABSTIME = 1;
const CLOCK_REALTIME = 0;
const CLOCK_REALTIME_ALARM = 8;
/** _IOW('T', 0, u64) */
const TFD_IOC_SET_TICKS = 0x40085400;
const NS = 1_000_000_000n;

/** "(seconds, nanoseconds)" as fdinfo prints a timespec. */
function timespecNs(text: string | undefined, what: string): bigint {
  const m = /^\((\d+),\s*(\d+)\)$/.exec(text ?? '');
  if (!m) throw new Error(`timerfd without ${what} in its fdinfo`);
  return BigInt(m[1]) * NS + BigInt(m[2]);
}

/** Wall-clock now in nanoseconds (to the microsecond). */
function realtimeNowNs(): bigint {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
}

export function dumpTimerfd(fdinfo: Map<string, string>): Timerfd {
  const clockid = Number(fdinfo.get('clockid'));
  const ticks = fdinfo.get('ticks');
  const flags = fdinfo.get('settime flags');
  if (!Number.isInteger(clockid) || ticks === undefined || flags === undefined) throw new Error('timerfd with an fdinfo this kernel does not usually show');
  const valueNs = timespecNs(fdinfo.get('it_value'), 'it_value');
  const settimeFlags = parseInt(flags, 8);
  const absoluteWallClock = (clockid === CLOCK_REALTIME || clockid === CLOCK_REALTIME_ALARM) && (settimeFlags & TFD_TIMER_ABSTIME) !== 0 && valueNs !== 0n;
  return {
    clockid,
    ticks: BigInt(ticks),
    settimeFlags,
    valueNs,
    intervalNs: timespecNs(fdinfo.get('it_interval'), 'it_interval'),
    deadlineNs: absoluteWallClock ? realtimeNowNs() + valueNs : 0n,
  };
}

/** A new timerfd inside the restored process, set as it was and holding
 * its unread expirations; its number there (close-on-exec, as restoreFds
 * expects). */
export function restoreTimerfd(r: RemoteProcess, fd: Fd): number {
  const t = fd.timerfd;
  if (!t) throw new Error(`timerfd ${fd.fd} has no state in the image`);
  r.reset();
  const made = Number(r.call(`making timerfd ${fd.fd}`, SYS.timerfd_create, [t.clockid, (fd.flags & TFD_NONBLOCK) | TFD_CLOEXEC]));
  // A periodic timer that expired and was not read since shows no time
  // left (the kernel moves it on when it is read): it goes on a period on.
  const left = t.valueNs || t.intervalNs;
  if (left || t.deadlineNs) {
    const wallClock = t.deadlineNs !== 0n;
    const absolute = wallClock || (t.settimeFlags & TFD_TIMER_ABSTIME) !== 0;
    let value = wallClock ? t.deadlineNs : left;
    if (absolute && !wallClock) {
      const now = r.put(Buffer.alloc(16));
      r.call(`reading clock ${t.clockid} for timerfd ${fd.fd}`, SYS.clock_gettime, [t.clockid, now]);
      const ts = r.get(now, 16);
      value += ts.readBigInt64LE(0) * NS + ts.readBigInt64LE(8);
    }
    const spec = r.put(r.u64s([t.intervalNs / NS, t.intervalNs % NS, value / NS, value % NS]));
    // TFD_TIMER_CANCEL_ON_SET only goes with an absolute wall-clock time.
    r.call(`setting timerfd ${fd.fd}`, SYS.timerfd_settime, [made, absolute ? (wallClock ? t.settimeFlags : TFD_TIMER_ABSTIME) : 0, spec, 0]);
  }
  if (t.ticks) r.call(`giving timerfd ${fd.fd} its ${t.ticks} unread expirations`, SYS.ioctl, [made, TFD_IOC_SET_TICKS, r.put(r.u64s([t.ticks]))]);
  return made;
}

/** What `inspect` says of it. */
export function describeTimerfd(t: Timerfd | undefined): string {
  if (!t) return 'timerfd';
  const s = (ns: bigint) => `${(Number(ns) / 1e9).toFixed(3)}s`;
  const setting = t.deadlineNs ? `at ${new Date(Number(t.deadlineNs / 1_000_000n)).toISOString()}` : t.valueNs ? `in ${s(t.valueNs)}` : 'disarmed';
  return `timerfd clock ${t.clockid} ${setting}${t.intervalNs ? ` every ${s(t.intervalNs)}` : ''}, ${t.ticks} unread`;
}

/* ---- the privilege rule ------------------------------------------------ */

const CLOCK_BOOTTIME_ALARM = 9;
const ALARM_CLOCKS = new Set([CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM]);
const clockName = (c: number) => (c === CLOCK_REALTIME_ALARM ? 'CLOCK_REALTIME_ALARM' : 'CLOCK_BOOTTIME_ALARM');

/** The clocks timerfd_create takes: REALTIME, MONOTONIC, BOOTTIME and the
 * two alarm clocks (for validate.ts: any other fails the restore late). */
export const TIMERFD_CLOCKS: ReadonlySet<number> = new Set([0, 1, 7, 8, 9]);

/**
 * The privilege rule for the alarm clocks, before anything is made: a
 * timerfd or POSIX timer on CLOCK_REALTIME_ALARM or CLOCK_BOOTTIME_ALARM
 * (which wakes the node from suspend) takes CAP_WAKE_ALARM, and is made
 * inside the process while it is still the restorer's: only for a
 * process that held the capability itself (in its effective or permitted
 * set; per holder, heldcaps.ts; this node's own snapshot taken at its
 * word), and by a restore that has it.
 */
export function checkAlarmClocks(image: Image, capEff: bigint): void {
  for (const p of image.processes) {
    const alarms = [
      ...p.fds.filter((fd) => fd.kind === FdKind.TIMERFD && fd.timerfd && ALARM_CLOCKS.has(fd.timerfd.clockid)).map((fd) => ({ what: ` fd ${fd.fd}: a timerfd on ${clockName(fd.timerfd!.clockid)}` })),
      ...(p.posixTimers ?? []).filter((t) => ALARM_CLOCKS.has(t.clockid)).map((t) => ({ what: `: POSIX timer ${t.id} on ${clockName(t.clockid)}` })),
    ];
    for (const a of alarms) {
      const where = `${nameProcess(p.vpid, p.comm)}${a.what} needs CAP_WAKE_ALARM`;
      if (!vouchedFor(image) && !processMay(p, [CAP_WAKE_ALARM])) throw new AppshotError(`${where}, which the process did not have: made by this restore, it would give the application more than it had`, ExitCode.denied);
      if (!restorerMay(capEff, [CAP_WAKE_ALARM])) throw new AppshotError(`${where}, which this restore does not have`, ExitCode.denied);
    }
  }
}
