/** Small readers of /proc, for `ps` and for telling a live process from a
 * reused PID; and the frozen window's gather (below), through which the
 * resource modules read a frozen process's /proc. */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { addon } from './native.js';

/* ---- the frozen window's gather ----------------------------------------

A snapshot reads some 60 files of a frozen process's /proc, several of them
more than once (stat by four modules, status by three), each through a
Node call of its own (open, fstat, read, read, close): on a quiet machine
that, not the stops, was most of the tiny application's frozen window.
gatherProc reads a list of them in one native call and keeps what it read
until forgetGathered; meanwhile procText, procBytes, procLink and procDir
(what the modules read /proc with) answer from it, and read the ordinary
way whatever it does not hold (not in the list, or unreadable: the error
is then the one it always was). The modules keep the parsing.

What is gathered is read while the process is frozen, at the point of the
window where its readers read it (the driver gathers twice: before any
call is injected, and after its questions are answered, which change what
status shows of its memory), and forgotten when the process is done: never
kept across snapshots or processes. */

export type ProcKind = 'text' | 'bytes' | 'link' | 'dir' | 'smaps';
const KIND_CODE: Record<ProcKind, number> = { text: 0, bytes: 1, link: 2, dir: 3, smaps: 4 };

/** /proc/PID/smaps as the addon parses it (readProcFiles' kind 4): per
 * mapping, [start, end, pgoff, ino] in `addr`, [major, minor, perms bits
 * (r 1, w 2, x 4, s 8), kB anonymous, kB in swap] in `num`, its path, and
 * its VmFlags line as it is. */
export interface ParsedSmaps {
  addr: BigUint64Array;
  num: Float64Array;
  paths: string[];
  flags: (string | undefined)[];
}

/** By kind and path ('text:/proc/1/stat'). */
const gathered = new Map<string, string | Buffer | string[] | ParsedSmaps>();

/** Reads every [kind, path] of `wanted` in one call, kept until
 * forgetGathered (a path read again replaces what was kept). */
export function gatherProc(wanted: [ProcKind, string][]): void {
  const got = addon().readProcFiles(
    wanted.map(([, path]) => path),
    Uint8Array.from(wanted, ([kind]) => KIND_CODE[kind]),
  );
  wanted.forEach(([kind, path], i) => {
    const v = got[i];
    if (v === undefined) gathered.delete(`${kind}:${path}`);
    else gathered.set(`${kind}:${path}`, v);
    // A process's status is its main thread's, word for word (the kernel
    // prints both with one function of the same task): kept under both
    // names, so that the main thread's is not read again.
    const main = kind === 'text' && MAIN_STATUS.exec(path);
    if (main) {
      const alias = `text:/proc/${main[1]}/task/${main[1]}/status`;
      if (v === undefined) gathered.delete(alias);
      else gathered.set(alias, v);
    }
  });
}
const MAIN_STATUS = /^\/proc\/(\d+)\/status$/;

export function forgetGathered(): void {
  gathered.clear();
}

/** A /proc file as text: gathered, or read now. */
export function procText(path: string): string {
  const v = gathered.get(`text:${path}`);
  return typeof v === 'string' ? v : readFileSync(path, 'utf8');
}

/** A /proc file's bytes: gathered (a copy of its own), or read now. */
export function procBytes(path: string): Buffer {
  const v = gathered.get(`bytes:${path}`);
  return Buffer.isBuffer(v) ? Buffer.from(v) : readFileSync(path);
}

/** A /proc link's target: gathered, or read now. */
export function procLink(path: string): string {
  const v = gathered.get(`link:${path}`);
  return typeof v === 'string' ? v : readlinkSync(path);
}

/** A process's smaps, parsed: gathered, or read now (an error is the one
 * reading it the usual way gives). */
export function procSmaps(path: string): ParsedSmaps {
  const v = gathered.get(`smaps:${path}`) ?? addon().readProcFiles([path], Uint8Array.of(KIND_CODE.smaps))[0];
  if (v && typeof v === 'object' && 'addr' in v) return v;
  readFileSync(path);
  throw new Error(`${path} could not be read`);
}

/** Each open descriptor of process `pid` with what it points to (its
 * /proc/PID/fd link), read now: none if the process is gone, and one
 * closed between the listing and its link (ENOENT) left out.
 * `refusedThrows`: a process whose descriptors, or one of them, this one
 * may not read (EACCES, EPERM: the directory's owner, or the kernel's
 * ptrace check on each link, which a process holding capabilities the
 * reader lacks fails) throws, in one line naming the descriptor and why,
 * rather than looking like one that has none or has closed it. */
export function descriptorLinks(pid: number, refusedThrows = false): { fd: string; link: string }[] {
  const refused = (code: string | undefined) => code === 'EACCES' || code === 'EPERM';
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (refusedThrows && refused(code)) throw Object.assign(new Error(`process ${pid}'s descriptors cannot be listed (${code})`), { code });
    return [];
  }
  const out: { fd: string; link: string }[] = [];
  for (const fd of names)
    try {
      out.push({ fd, link: readlinkSync(`/proc/${pid}/fd/${fd}`) });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (refusedThrows && refused(code)) throw Object.assign(new Error(`process ${pid}'s fd ${fd} cannot be read (${code}: the kernel's access check on its target refused this process)`), { code });
      // Closed meanwhile, or (not asked to throw) not readable: left out.
    }
  return out;
}

/** A /proc directory's names, as readdirSync gives them: gathered, or read now. */
export function procDir(path: string): string[] {
  const v = gathered.get(`dir:${path}`);
  return Array.isArray(v) ? [...v] : readdirSync(path);
}

/** What a snapshot reads of frozen process `pid` (threads `tids`) before
 * any call is injected into it: its memory map (memory.ts), each thread's
 * status (creds.ts: credentials, before seccomp is suspended), the
 * process's status (signals.ts: the handled signals), its POSIX timers
 * (timers.ts) and descriptor numbers (fdowner.ts), and the CPU time it and
 * each thread used (cputime.ts: stat, and each thread's stat and
 * schedstat), which the calls would add to. */
export function gatheredBeforeCalls(pid: number, tids: number[]): [ProcKind, string][] {
  const p = `/proc/${pid}`;
  return [
    ['smaps', `${p}/smaps`],
    ['text', `${p}/status`],
    // The main thread's is the process's (gatherProc keeps it as both).
    ...tids.filter((tid) => tid !== pid).map((tid): [ProcKind, string] => ['text', `${p}/task/${tid}/status`]),
    ['text', `${p}/timers`],
    ['dir', `${p}/fd`],
    ['text', `${p}/stat`],
    ...tids.flatMap((tid): [ProcKind, string][] => [['text', `${p}/task/${tid}/stat`], ['text', `${p}/task/${tid}/schedstat`]]),
  ];
}

/** What a snapshot reads of frozen process `pid` once its questions are
 * answered: stat (process.ts, ptys.ts, the driver), status (process.ts:
 * umask), limits,
 * auxv, command line, executable, directories (process.ts, limits.ts),
 * attributes.ts's files, cgroups (cgroups.ts), and per thread its stat
 * (threads.ts, attributes.ts), wait channel (threads.ts) and children
 * (zombies.ts, process.ts: which thread forked each child). */
/** The namespace links of a process that a snapshot reads. */
const NAMESPACE_LINKS = ['user', 'pid', 'pid_for_children', 'net', 'ipc', 'time', 'time_for_children'];

export function gatheredAfterCalls(pid: number, tids: number[]): [ProcKind, string][] {
  const p = `/proc/${pid}`;
  const out: [ProcKind, string][] = [
    ['text', `${p}/stat`],
    ['text', `${p}/status`],
    ['text', `${p}/limits`],
    ['bytes', `${p}/auxv`],
    ['text', `${p}/cmdline`],
    ['link', `${p}/exe`],
    ['link', `${p}/cwd`],
    ['link', `${p}/root`],
    ['text', `${p}/oom_score_adj`],
    ['text', `${p}/coredump_filter`],
    ['text', `${p}/loginuid`],
    ['text', `${p}/personality`],
    ['text', `${p}/cgroup`],
    ['dir', `${p}/task`],
    // Its namespaces (process.ts refuses those of its own, timens.ts
    // carries its time namespace's offsets): each a Node call of its own
    // before, 0.1-0.2 ms of the tiny application's window.
    ...NAMESPACE_LINKS.map((ns): [ProcKind, string] => ['link', `${p}/ns/${ns}`]),
    ['text', `${p}/timens_offsets`],
  ];
  for (const tid of tids) {
    if (tid !== pid) out.push(['text', `/proc/${tid}/stat`], ['text', `${p}/task/${tid}/cgroup`]);
    out.push(['text', `${p}/task/${tid}/stat`], ['text', `${p}/task/${tid}/wchan`], ['text', `${p}/task/${tid}/children`]);
  }
  return out;
}

export interface ProcStat {
  pid: number;
  comm: string;
  state: string;
  ppid: number;
  pgrp: number;
  session: number;
  threads: number;
  /** Clock ticks after boot, as the node's own boot clock counts them
   * (bootClockTicksAhead): with the PID, names one process for good. */
  startTime: number;
  /** CPU time used, user and system, in clock ticks (USER_HZ, 100 a second). */
  cpuTicks: number;
  /** The signal its parent gets at its exit (SIGCHLD for a fork). */
  exitSignal: number;
}

/** /proc/PID/map_files/START-END: the very file the mapping at START-END
 * maps, whatever its name leads to now (opening or stating it needs
 * CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE). */
export const mapFilesPath = (pid: number, start: bigint, end: bigint) => `/proc/${pid}/map_files/${start.toString(16)}-${end.toString(16)}`;

/** "major:minor" in hex, as /proc/PID/maps names a device, of its numbers. */
export const mapsDeviceName = (major: bigint | number, minor: bigint | number) => `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}`;

/** The same of a stat's dev_t (glibc's major() and minor()). */
export const deviceName = (dev: bigint) => mapsDeviceName(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn), (dev & 0xffn) | ((dev >> 12n) & ~0xffn));

/**
 * How many clock ticks this process's boot clock is ahead of the node's:
 * the boottime offset of its time namespace (/proc/self/timens_offsets),
 * 0 outside one. The kernel writes a process's start time in
 * /proc/PID/stat on the reader's boot clock, so an `appshot run` started
 * in a time namespace (`unshare --time --boottime N`) recorded its
 * init's start N s later than the engine, outside it, reads it: the init
 * was taken for another process and the application for one whose init
 * is gone. Every start time appshot keeps or compares is on the node's
 * clock (readStat subtracts this). Read once: a process's time namespace
 * does not change after it runs (setns into one applies to its children).
 */
let ticksAhead: number | undefined;
export function bootClockTicksAhead(): number {
  if (ticksAhead !== undefined) return ticksAhead;
  ticksAhead = 0;
  try {
    const m = /^boottime\s+(-?\d+)\s+(\d+)$/m.exec(readFileSync('/proc/self/timens_offsets', 'utf8'));
    // USER_HZ, 100 a second, as /proc/PID/stat counts.
    if (m) ticksAhead = Number(m[1]) * 100 + Math.floor(Number(m[2]) / 10_000_000);
  } catch {
    /* a kernel without time namespaces (before 5.6): none */
  }
  return ticksAhead;
}

export function readStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = procText(`/proc/${pid}/stat`);
  } catch {
    return undefined;
  }
  // comm may hold spaces and parentheses: it ends at the last ')'.
  const close = text.lastIndexOf(')');
  const comm = text.slice(text.indexOf('(') + 1, close);
  const f = text.slice(close + 2).split(' ');
  // f[0] is field 3 (state) of proc(5).
  return {
    pid,
    comm,
    state: f[0],
    ppid: Number(f[1]),
    pgrp: Number(f[2]),
    session: Number(f[3]),
    threads: Number(f[17]),
    startTime: Number(f[19]) - bootClockTicksAhead(),
    cpuTicks: Number(f[11]) + Number(f[12]),
    exitSignal: Number(f[35]),
  };
}

export function readCmdline(pid: number): string[] {
  try {
    const raw = procText(`/proc/${pid}/cmdline`);
    return raw.split('\0').filter((s, i, a) => s !== '' || i < a.length - 1);
  } catch {
    return [];
  }
}

/** Whether `pid` still names the process that started at `startTime`. */
export function isSameProcess(pid: number, startTime: number | undefined): boolean {
  const st = readStat(pid);
  if (!st || st.state === 'Z') return false;
  return startTime === undefined || st.startTime === startTime;
}

/** The children of thread `tid` of `pid`: those whose parent in the kernel
 * (real_parent) is that thread, the one that forked them. None if the
 * thread is gone. */
export function childrenOfThread(pid: number, tid: number | string): number[] {
  try {
    const text = procText(`/proc/${pid}/task/${tid}/children`).trim();
    return text ? text.split(' ').map(Number) : [];
  } catch {
    return []; // gone
  }
}

/** The children of every thread of `pid` (the kernel lists a child under
 * the thread that made it). */
export function childrenOf(pid: number): number[] {
  let tasks: string[];
  try {
    tasks = procDir(`/proc/${pid}/task`);
  } catch {
    return [];
  }
  return tasks.flatMap((tid) => childrenOfThread(pid, tid));
}

/** Every descendant of `pid`, parents before their children. */
export function descendantsOf(pid: number): number[] {
  const out: number[] = [];
  for (let queue = childrenOf(pid); queue.length; ) {
    const p = queue.shift()!;
    out.push(p);
    queue.push(...childrenOf(p));
  }
  return out;
}
