// Processes die at any instant, in the middle of a table write included:
// the application's table lock must never stay held.
import { readdirSync, readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

/** System PIDs of the children of a process, from /proc. */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(d));
    } catch {
      /* gone */
    }
  }
  return out;
}

describe('robustness', () => {
  it('keeps working when processes are SIGKILLed while they write the table', async () => {
    const app = sb.start(['run', '--aid', 'churn', '--', fixture('churn'), '4']);
    await app.line(/^READY$/);
    const root = sb.json<{ tables: { pid: { virtual: number; system: number }[] } }>(['table', 'churn']).tables.pid.find(
      (e) => e.virtual === 2,
    )!.system;
    let killed = 0;
    const until = Date.now() + 2_000;
    while (Date.now() < until) {
      const workers = childrenOf(root);
      if (workers.length) {
        try {
          process.kill(workers[Math.floor(Math.random() * workers.length)], 'SIGKILL');
          killed++;
        } catch {
          /* already gone */
        }
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(killed).toBeGreaterThan(50);
    // The application still forks, signals and reaps through its tables.
    const r = sb.run(['exec', 'churn', '--', fixture('signals')]);
    expect(r.stdout).toBe('OK\n');
    expect(r.code).toBe(0);
    // A process killed between the kernel's reap and its table update
    // leaves an entry for a dead PID; init sweeps those out every 2 s.
    // A table that lost track for good would keep them.
    await waitFor(
      () => sb.json<{ tables: { pid: unknown[] } }>(['table', 'churn']).tables.pid.length < 40,
      10_000,
      'dead entries to be swept',
    );
    expect(sb.run(['stop', 'churn', '--signal', 'KILL']).code).toBe(0);
    await app.exited;
    await waitFor(() => sb.aids().length === 0, 10_000, 'cleanup');
  });
});
