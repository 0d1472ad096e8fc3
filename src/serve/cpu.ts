/**
 * How much CPU an instance uses, for the serve policy (policy.ts): at each
 * sample, the CPU time every process under the instance's init used since
 * the previous sample, over the wall time between them, in cores (0.5 is
 * half of one core). From /proc/PID/stat, which any user may read of their
 * own processes. A process that ended between two samples takes its time
 * with it, so the figure errs low, never high.
 */
import { readFileSync } from 'node:fs';
import { descendantsOf, readStat } from '../procfs.js';

/** /proc's clock ticks a second (USER_HZ: 100 on every Linux ABI). */
const TICKS_PER_SECOND = 100;

export class CpuMeter {
  private readonly last = new Map<string, { atMs: number; atTicks: number; ticks: Map<number, number> }>();

  /** Cores used by the processes under `initPid` since the last sample of
   * `key`; 0 at the first. */
  sample(key: string, initPid: number, nowMs = performance.now()): number {
    const before = this.last.get(key);
    const ticks = new Map<number, number>();
    const started = new Map<number, number>();
    for (const pid of descendantsOf(initPid)) {
      const st = readStat(pid);
      if (st) {
        ticks.set(pid, st.cpuTicks);
        started.set(pid, st.startTime);
      }
    }
    const atTicks = uptimeTicks();
    let cores = 0;
    if (before && nowMs > before.atMs) {
      let used = 0;
      // A process new since the last sample: all its time falls between
      // the two if it started after the last one; one that was there and
      // not seen (/proc's children lists miss a process being reparented)
      // is left out rather than counted with its whole life's time.
      for (const [pid, t] of ticks) {
        const was = before.ticks.get(pid);
        if (was !== undefined) used += Math.max(0, t - was);
        else if (started.get(pid)! >= before.atTicks) used += t;
      }
      cores = used / TICKS_PER_SECOND / ((nowMs - before.atMs) / 1000);
    }
    this.last.set(key, { atMs: nowMs, atTicks, ticks });
    return cores;
  }

  forget(key: string): void {
    this.last.delete(key);
  }
}

/** Clock ticks since boot, as /proc/PID/stat's start times count them. */
function uptimeTicks(): number {
  return Math.floor(Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * TICKS_PER_SECOND);
}
