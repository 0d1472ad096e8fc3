/** Small readers of /proc, for `ps` and for telling a live process from a
 * reused PID. */
import { readdirSync, readFileSync } from 'node:fs';

export interface ProcStat {
  pid: number;
  comm: string;
  state: string;
  ppid: number;
  pgrp: number;
  session: number;
  threads: number;
  /** Clock ticks after boot: with the PID, names one process for good. */
  startTime: number;
  /** CPU time used, user and system, in clock ticks (USER_HZ, 100 a second). */
  cpuTicks: number;
}

export function readStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
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
    startTime: Number(f[19]),
    cpuTicks: Number(f[11]) + Number(f[12]),
  };
}

export function readCmdline(pid: number): string[] {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
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

/** The children of every thread of `pid` (the kernel lists a child under
 * the thread that made it). */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tasks) {
    try {
      const text = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
      if (text) out.push(...text.split(' ').map(Number));
    } catch {
      /* gone */
    }
  }
  return out;
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
