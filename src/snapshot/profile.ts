/**
 * Where the frozen window's milliseconds go, step by step (APPSHOT_PROFILE=1:
 * printed on stderr at the end of each snapshot). Off, a step is called
 * as it is, with nothing measured.
 */
import { readFileSync } from 'node:fs';
import { injected } from '../ptrace/remote.js';

const enabled = !!process.env.APPSHOT_PROFILE;
const spent = new Map<string, { ms: number; calls: number; injected: number }>();
const now = () => Number(process.hrtime.bigint()) / 1e6;
/** Steps running now, one inside another: only the outermost count
 * towards the time that no step took. */
let depth = 0;
/** Time taken by outermost steps since the window opened. */
let inSteps = 0;
/** When the window the next report is of opened (windowOpens). */
let openedAt = 0;
/** This thread's time on a CPU and waiting for one then (schedstat). */
let schedAt: [number, number] | undefined;

/** This thread's nanoseconds on a CPU and waiting in a run queue
 * (/proc/thread-self/schedstat), or undefined (a kernel without
 * CONFIG_SCHED_INFO). What a paired comparison on a loaded machine can
 * trust more than wall time: how much work the window was, apart from how
 * long it waited for a CPU. */
function schedstat(): [number, number] | undefined {
  try {
    const [onCpu, waiting] = readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ').map(Number);
    return [onCpu, waiting];
  } catch {
    return undefined;
  }
}

/** Runs `step`, counting its time under `name` when profiling. */
export function timed<T>(name: string, step: () => T): T {
  if (!enabled) return step();
  const t0 = now();
  const calls0 = injected.calls;
  depth++;
  try {
    return step();
  } finally {
    depth--;
    const ms = now() - t0;
    if (depth === 0) inSteps += ms;
    const s = spent.get(name) ?? { ms: 0, calls: 0, injected: 0 };
    s.ms += ms;
    s.calls++;
    s.injected += injected.calls - calls0;
    spent.set(name, s);
  }
}

/** What was counted before the window the next report is of opened
 * (windowOpens): printed apart, after it. */
let before: Map<string, { ms: number; calls: number; injected: number }> | undefined;

/** The window the next report is of opens now: what was counted so far
 * (the collection and page file prepared before the freeze, the freeze
 * itself) is not part of it, and is printed apart, so that it is not
 * taken for the window's. */
export function windowOpens(): void {
  if (!enabled) return;
  before = new Map(spent);
  spent.clear();
  inSteps = 0;
  schedAt = schedstat();
  openedAt = now();
}

/** Prints what was counted since the last report, most costly first; and
 * the time of the window that no step took (code between the steps, an
 * event loop turn, a collection of garbage), as "(between steps)". */
export function reportProfile(title: string): void {
  if (!enabled) return;
  const sched = schedAt && schedstat();
  const print = (rows: Map<string, { ms: number; calls: number; injected: number }>) => {
    for (const [name, s] of [...rows].sort((a, b) => b[1].ms - a[1].ms)) process.stderr.write(`  ${s.ms.toFixed(3).padStart(9)} ms  ${String(s.calls).padStart(4)}x  ${name}${s.injected ? ` (${s.injected} calls injected)` : ''}\n`);
  };
  if (openedAt) spent.set('(between steps)', { ms: now() - openedAt - inSteps, calls: 1, injected: 0 });
  // Apart from the steps (they overlap them): the whole window's time on
  // a CPU, and waiting for one, of the thread that runs it.
  if (sched && schedAt) {
    spent.set('(window: on a CPU)', { ms: (sched[0] - schedAt[0]) / 1e6, calls: 1, injected: 0 });
    spent.set('(window: waiting for a CPU)', { ms: (sched[1] - schedAt[1]) / 1e6, calls: 1, injected: 0 });
  }
  process.stderr.write(`appshot: profile of ${title}:\n`);
  print(spent);
  if (before?.size) {
    process.stderr.write(`appshot: profile of what came before it (not in it):\n`);
    print(before);
  }
  spent.clear();
  before = undefined;
  inSteps = 0;
  openedAt = 0;
  schedAt = undefined;
}
