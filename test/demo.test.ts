/**
 * `npm run demo` (demo/demo.sh), the README's first command after the
 * install: run as a user runs it, it must work, and show what it says it
 * shows: the restored counter goes on from where the snapshot ended it,
 * with the same virtual PID, and three clones count on their own.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { root, spawnAsync } from './helpers.js';

describe('npm run demo', () => {
  it('snapshots, restores and clones the counter, which goes on counting', async () => {
    // APPSHOT_ENGINE=off: an engine the demo started would outlive its
    // temporary state directory by its idle time.
    const r = await spawnAsync('bash', [join(root, 'demo', 'demo.sh')], { cwd: root, env: { ...process.env, APPSHOT_ENGINE: 'off', CI: 'true' }, timeout: 120_000 });
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    const out = r.stdout;
    // Before the snapshot, then the same log after the restore: the count
    // goes on past the last one seen, from the same virtual PID.
    const counts = [...out.matchAll(/^count (\d+) \(pid (\d+) as the app sees it\)$/gm)].map((m) => ({ n: Number(m[1]), pid: Number(m[2]) }));
    const restore = out.indexOf('== appshot restore');
    const clone = out.indexOf('== appshot clone');
    expect(restore).toBeGreaterThan(0);
    expect(clone).toBeGreaterThan(restore);
    const at = (from: number, to: number) => [...out.slice(from, to).matchAll(/^count (\d+) \(pid (\d+)/gm)].map((m) => ({ n: Number(m[1]), pid: Number(m[2]) }));
    const before = at(0, restore);
    const after = at(restore, clone);
    expect(before.length).toBeGreaterThan(0);
    expect(after.length).toBeGreaterThan(0);
    expect(after.at(-1)!.n).toBeGreaterThan(before.at(-1)!.n);
    expect(new Set([...before, ...after].map((c) => c.pid)).size).toBe(1);
    // Each clone's log: counting on from the template's count.
    for (const aid of ['copy-1', 'copy-2', 'copy-3']) {
      const own = out.slice(out.indexOf(`-- ${aid}`)).split('\n').slice(1, 3);
      expect(own.every((l) => /^count \d+ /.test(l)), `${aid}: ${own.join(' | ')}`).toBe(true);
    }
    expect(counts.length).toBeGreaterThan(6);
  }, 150_000);
});
