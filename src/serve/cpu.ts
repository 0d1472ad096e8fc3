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
  private readonly last = new Map<string, { atMs: number; ticks: Map<number, number>; cores: number }>();

  /** @param windowMs the shortest time a figure is measured over: asked
   * sooner, the meter gives its last figure again (a tick of 200 ms holds
   * 20 clock ticks of CPU, too few to judge by). */
  constructor(private readonly windowMs = 0) {}

  /** Cores used by the processes under `initPid` since the last sample of
   * `key`; 0 at the first. */
  sample(key: string, initPid: number, nowMs = performance.now()): number {
    const before = this.last.get(key);
    if (before && nowMs - before.atMs < this.windowMs) return before.cores;
    const ticks = new Map<number, number>();
    for (const pid of descendantsOf(initPid)) {
      const st = readStat(pid);
      if (st) ticks.set(pid, st.cpuTicks);
    }
    let cores = 0;
    if (before && nowMs > before.atMs) {
      let used = 0;
      // A process new since the last sample started after it: all its
      // time falls between the two.
      for (const [pid, t] of ticks) used += Math.max(0, t - (before.ticks.get(pid) ?? 0));
      cores = used / TICKS_PER_SECOND / ((nowMs - before.atMs) / 1000);
    }
    this.last.set(key, { atMs: nowMs, ticks, cores });
    return cores;
  }

  forget(key: string): void {
    this.last.delete(key);
  }
}
