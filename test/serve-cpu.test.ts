/**
 * The CPU an instance uses, as serve measures it for its policy
 * (src/serve/cpu.ts): real processes under a parent standing for an
 * instance's init, one computing and one asleep.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { CpuMeter } from '../src/serve/cpu.js';
import { descendantsOf, readStat } from '../src/procfs.js';
import { waitFor } from './helpers.js';

const started: ChildProcess[] = [];
/** A shell standing for an instance's init, with `script` run by a child of it. */
function instance(script: string): ChildProcess {
  const c = spawn('sh', ['-c', `sh -c '${script}' & wait`], { stdio: 'ignore' });
  started.push(c);
  return c;
}
afterAll(() => {
  for (const c of started) for (const pid of [...descendantsOf(c.pid!), c.pid!]) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
});

describe('CpuMeter', () => {
  it('sees the CPU of the processes under an instance, and none of one asleep', async () => {
    const busy = instance('while :; do :; done');
    const idle = instance('exec sleep 600');
    // The sleeper measured once it sleeps (its start costs CPU).
    await waitFor(() => descendantsOf(busy.pid!).length > 0 && descendantsOf(idle.pid!).some((p) => readStat(p)?.comm === 'sleep' && readStat(p)?.state === 'S'), 10_000, 'the children');
    const meter = new CpuMeter();
    expect(meter.sample('busy', busy.pid!)).toBe(0); // the first sample has nothing to compare with
    meter.sample('idle', idle.pid!);
    // A busy loop gets some CPU however loaded the machine; a sleep none.
    let used = 0;
    await waitFor(() => (used = meter.sample('busy', busy.pid!)) > 0, 10_000, 'the busy loop to be seen using CPU');
    expect(used).toBeGreaterThan(0);
    expect(meter.sample('idle', idle.pid!)).toBe(0);
    // Forgotten: the next sample starts afresh.
    meter.forget('busy');
    expect(meter.sample('busy', busy.pid!)).toBe(0);
  });
});
