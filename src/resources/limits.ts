/**
 * Resource limits (RLIMIT_*), per process.
 *
 * Read from /proc/PID/limits, never with prlimit64(pid) from outside: that
 * needs CAP_SYS_RESOURCE for a process of another uid, which root in a
 * container usually lacks (DESIGN.md), while /proc/PID/limits is readable
 * by anyone who may trace the process. Restored inside the process
 * (prlimit64(0, ...) injected): a hard limit can be raised only up to what
 * the restoring user has, unless it holds CAP_SYS_RESOURCE, and a limit it
 * cannot set is a refusal by name, never a silent cap.
 */
import { procText, readStat } from '../procfs.js';
import { AppshotError, ExitCode } from '../errors.js';
import type { Image, Rlimit } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { nameProcess } from './context.js';
import { CAP, hasCap, type OwnCreds } from './creds.js';

/** RLIMIT_* 0..15, in the order /proc/PID/limits lists them. */
export const LIMIT_NAMES = [
  'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_DATA', 'RLIMIT_STACK', 'RLIMIT_CORE', 'RLIMIT_RSS', 'RLIMIT_NPROC', 'RLIMIT_NOFILE',
  'RLIMIT_MEMLOCK', 'RLIMIT_AS', 'RLIMIT_LOCKS', 'RLIMIT_SIGPENDING', 'RLIMIT_MSGQUEUE', 'RLIMIT_NICE', 'RLIMIT_RTPRIO', 'RLIMIT_RTTIME',
] as const;
export const RLIMIT_NOFILE = 7;
export const RLIM_INFINITY = (1n << 64n) - 1n;

/**
 * Parses /proc/PID/limits. The kernel prints each limit's raw value, in
 * the unit setrlimit takes (the Units column only says which: seconds for
 * RLIMIT_CPU, us for RLIMIT_RTTIME, bytes for the sizes), or "unlimited"
 * for RLIM_INFINITY. The name column is 25 characters wide and its names
 * hold spaces: the values are what follows it.
 */
export function parseLimits(text: string): Rlimit[] {
  const lines = text.split('\n').filter((l) => l.trim());
  const rows = lines.slice(1);
  if (!lines[0]?.startsWith('Limit') || rows.length < LIMIT_NAMES.length) throw new Error('unexpected /proc/PID/limits format');
  const value = (s: string) => (s === 'unlimited' ? RLIM_INFINITY : BigInt(s));
  return rows.slice(0, LIMIT_NAMES.length).map((row, resource) => {
    const [soft, hard] = row.slice(26).trim().split(/\s+/);
    return { resource, cur: value(soft), max: value(hard) };
  });
}

/** `pid` may be 'self'. */
export function readLimits(pid: number | 'self'): Rlimit[] {
  const text = procText(`/proc/${pid}/limits`);
  // The kernel gives an empty text for a task whose signal state is gone
  // (past its exit): said with the task's state, which a frozen member of
  // the application should never be in (seen once, under load, in
  // pids.test.ts's forkstorm; the cause is not found yet).
  if (text === '' && pid !== 'self') throw new Error(`/proc/${pid}/limits is empty: process ${pid} is ${describeState(readStat(pid)?.state)}`);
  return parseLimits(text);
}

const describeState = (state: string | undefined) =>
  state === undefined ? 'gone' : state === 'Z' ? 'a zombie (exited, not yet waited for)' : state === 'X' ? 'dead' : `in state ${state}`;

export const dumpLimits = (pid: number): Rlimit[] => readLimits(pid);

const show = (v: bigint) => (v === RLIM_INFINITY ? 'unlimited' : String(v));

/**
 * The privilege rule for limits, before anything is made: a hard limit
 * above the restoring user's own needs CAP_SYS_RESOURCE. `own`: the
 * limits the seeds will inherit (appshot's).
 */
export function limitRefusal(limits: Rlimit[], own: Rlimit[], creds: Pick<OwnCreds, 'capEff'>): string | undefined {
  if (hasCap(creds.capEff, CAP.SYS_RESOURCE)) return undefined;
  for (const lim of limits) {
    const mine = own.find((l) => l.resource === lim.resource);
    if (mine && lim.max > mine.max) return `hard limit ${LIMIT_NAMES[lim.resource] ?? `resource ${lim.resource}`} ${show(lim.max)} is above what this user may set (${show(mine.max)})`;
  }
  return undefined;
}

/** The same for a process's descriptors: one numbered at or above the
 * hard RLIMIT_NOFILE the seeds inherit (`own`) can be placed only by
 * raising that limit for the while (files.ts allowNumbersUpTo), which
 * needs CAP_SYS_RESOURCE. `fds`: the process's descriptor numbers. */
export function descriptorRefusal(fds: number[], own: Rlimit[], creds: Pick<OwnCreds, 'capEff'>): string | undefined {
  if (hasCap(creds.capEff, CAP.SYS_RESOURCE) || !fds.length) return undefined;
  const hard = own.find((l) => l.resource === RLIMIT_NOFILE)?.max;
  const highest = fds.reduce((a, b) => Math.max(a, b));
  if (hard === undefined || BigInt(highest) < hard) return undefined;
  return `it holds descriptor ${highest}, not below the hard RLIMIT_NOFILE this restore runs with (${show(hard)}), which only CAP_SYS_RESOURCE may raise`;
}

export function checkLimits(image: Image, own: Rlimit[], creds: Pick<OwnCreds, 'capEff'>): void {
  for (const p of image.processes) {
    const why = limitRefusal(p.rlimits, own, creds) ?? descriptorRefusal(p.fds.map((f) => f.fd), own, creds);
    if (why) throw new AppshotError(`${nameProcess(p.vpid, p.comm)}: ${why}`, ExitCode.denied);
  }
}

/** Sets the process's limits from inside it; the ones the seed has already
 * (`seed`: its limits as they are now, read once for the whole restore of
 * the process, see the driver) cost nothing: most, as it inherited them
 * from the same kind of shell. Returns how many calls it injected. */
export function restoreLimits(r: RemoteProcess, limits: Rlimit[], seed: Rlimit[]): number {
  r.reset();
  const calls = r.batch();
  for (const lim of limits) {
    const had = seed.find((l) => l.resource === lim.resource);
    if (had && had.cur === lim.cur && had.max === lim.max) continue;
    calls.add(`setting ${LIMIT_NAMES[lim.resource] ?? `resource ${lim.resource}`} to ${show(lim.cur)}/${show(lim.max)}`, SYS.prlimit64, [0, lim.resource, r.put(r.u64s([lim.cur, lim.max])), 0]);
  }
  const n = calls.length;
  calls.run();
  return n;
}
