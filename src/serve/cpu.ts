/**
 * How much CPU an instance uses, for the serve policy (policy.ts): at each
 * sample, the CPU time every process under the instance's init used since
 * the previous sample, over the wall time between them, in cores (0.5 is
 * half of one core). From /proc/PID/stat, which any user may read of their
 * own processes. A process that ended between two samples takes its time
 * with it, so the figure errs low, never high.
 */
import { descendantsOf, readStat } from '../procfs.js';

/** /proc's clock ticks a second (USER_HZ: 100 on every Linux ABI). */
const TICKS_PER_SECOND = 100;

export class CpuMeter {
  private readonly last = new Map<string, { atMs: number; ticks: Map<number, number> }>();

  /** Cores used by the processes under `initPid` since the last sample of
   * `key`; 0 at the first. */
  sample(key: string, initPid: number, nowMs = performance.now()): number {
    const ticks = new Map<number, number>();
    for (const pid of descendantsOf(initPid)) {
      const st = readStat(pid);
      if (st) ticks.set(pid, st.cpuTicks);
    }
    const prev = this.last.get(key);
    this.last.set(key, { atMs: nowMs, ticks });
    if (!prev || nowMs <= prev.atMs) return 0;
    let used = 0;
    // A process new since the last sample started after it: all its time
    // falls between the two.
    for (const [pid, t] of ticks) used += Math.max(0, t - (prev.ticks.get(pid) ?? 0));
    return used / TICKS_PER_SECOND / ((nowMs - prev.atMs) / 1000);
  }

  forget(key: string): void {
    this.last.delete(key);
  }
}
