// The tables' writer lock lives in a file the application writes (the
// preload library maps it writable in each of its processes), and appshot's
// own processes take it: the CLI or engine in a snapshot
// (repairTablesIfDead, the threads it maps), appshot-init as it reaps. A
// lock that keeps list pointers beside its word (glibc's robust mutex
// does: its unlock writes through them) gave the application a write of
// its choosing in those processes. Driven by test/fixtures/tablelock.c:
// the application and an accomplice outside it (which a snapshot does not
// stop) write pointers into every byte of the lock area but the word,
// and keep marking the lock a dead holder's so that each locker holds it
// through a repair; snapshots of the application must go through, init
// and the application live on. And a holder killed with SIGKILL still
// leaves a lock the next locker repairs.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-tablelock-'));
const started: ChildProcess[] = [];
afterAll(async () => {
  for (const c of started) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const repairs = (aid: string) => sb.json<{ repairs: number }>(['table', aid]).repairs;

/** `tablelock accomplice`: outside the application, on its descriptor
 * `fd`; resolves once it writes. */
async function accomplice(pid: number, fd: number): Promise<{ child: ChildProcess; lines: string[] }> {
  const child = spawn(fixture('tablelock'), ['accomplice', String(pid), String(fd), '120'], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(child);
  const lines: string[] = [];
  createInterface({ input: child.stdout! }).on('line', (l) => lines.push(l));
  await waitFor(() => lines.includes('READY') || lines.some((l) => l.startsWith('FAIL')) || child.exitCode !== null, 10_000, 'the accomplice to map the tables');
  expect(lines).toContain('READY');
  return { child, lines };
}

describe('the tables lock, its area written by the application', () => {
  it('snapshots take it while the application and an accomplice write pointers beside its word: no crash, repaired each time', async () => {
    const aid = 'tl-scribble';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('tablelock'), 'app']);
    await waitFor(() => /^FD \d+$/m.test(sb.log(aid)) || /FAIL/.test(sb.log(aid)), 20_000, `${aid} to map its tables`);
    const fd = Number(/^FD (\d+)$/m.exec(sb.log(aid))![1]);
    const { child } = await accomplice(sb.systemPid(aid), fd);
    const before = repairs(aid);
    for (let i = 0; i < 5; i++) {
      const r = await sb.runAsync(['snapshot', aid, '--leave-running', '-o', join(out, `s${i}`)]);
      expect({ code: r.code, signal: r.signal, stderr: r.stderr }).toMatchObject({ code: 0, signal: null });
      // Its processes fork and reap under the lock, init reaps the
      // orphans under it: all still there and working.
      await sb.exercised(aid, 'to fork and reap after the snapshot');
    }
    // Each snapshot found the lock a dead holder's (the accomplice's
    // mark) and repaired it, with the pointers being written meanwhile.
    expect(repairs(aid)).toBeGreaterThan(before);
    expect(child.exitCode).toBeNull(); // still writing throughout
    child.kill('SIGKILL');
    expect(sb.aids()).toContain(aid);
    sb.ok(['rm', '-f', aid]);
  });
});

describe('a holder killed holding the lock', () => {
  it('leaves the word to the kernel to mark, and the next locker repairs it', async () => {
    const aid = 'tl-die';
    const app = sb.start(['run', '--aid', aid, '--', fixture('tablelock'), 'die']);
    const [line] = await app.line(/^(REPAIRED \S+|FAIL.*)$/, 30_000);
    expect(line).toMatch(/^REPAIRED (owner-died|repaired-already)$/);
  });
});

// The kernel marks a dead holder's word only if it gets to the pending
// entry: it walks the thread's whole robust list first and gives up at an
// entry it cannot read, and a thread with no list (a vfork child, a raw
// clone) has nothing for it to walk. The waiters then look at the holder
// themselves (appshot_table.c lock_word): the reap of the dead holder,
// which takes the lock, must get through and repair it, not wait for ever.
describe('a holder whose death the kernel does not mark', () => {
  // zombie: not reaped before the next locker comes (killed while its
  // parent is busy, or its parent the next locker itself).
  for (const how of ['nolist', 'badlist', 'zombie'])
    it(`(${how}) is found gone by the next locker, which repairs the lock`, async () => {
      const aid = `tl-unmarked-${how}`;
      const app = sb.start(['run', '--aid', aid, '--', fixture('tablelock'), 'unmarked', how]);
      const [line] = await app.line(/^(REPAIRED \S+|FAIL.*)$/, 15_000);
      expect(line).toBe('REPAIRED probe');
    });
});
