// The registry and the end of an application: one AID at a time, and
// nothing left behind however the application ends.
import { spawn } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, cli, type Entry, fixture, Sandbox, systemIpcIds, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());



async function startIpcApp(aid: string) {
  const app = sb.start(['run', '--aid', aid, '--', fixture('ipc'), 'hold', 'keep']);
  await app.line(/^READY$/);
  const t = sb.json<{ tables: Record<string, Entry[]> }>(['table', aid]).tables;
  return { app, t };
}

function expectGone(t: Record<string, Entry[]>) {
  const live = systemIpcIds();
  for (const e of t.semid) expect(live.sem).not.toContain(e.system);
  for (const e of t.shmid) expect(live.shm).not.toContain(e.system);
  for (const e of t.msgid) expect(live.msg).not.toContain(e.system);
  for (const e of t.pid) expect(alive(e.system)).toBe(false);
}

describe('registry', () => {
  it('refuses an AID that is taken', async () => {
    const a = sb.start(['run', '--aid', 'dup', '--', fixture('waiter')]);
    await a.line(/READY/);
    const r = sb.run(['run', '--aid', 'dup', '--', 'true']);
    expect(r.code).toBe(4);
    expect(r.stderr).toBe("appshot: AID 'dup' is already registered\n");
    a.child.kill('SIGTERM');
    await a.exited;
  });

  it('lets exactly one of many simultaneous runs of one AID win', async () => {
    const runs = Array.from({ length: 6 }, () =>
      new Promise<number>((resolve) => {
        const c = spawn(process.execPath, [cli, 'run', '--aid', 'race', '--', 'sleep', '1'], { env: sb.env, stdio: 'ignore' });
        c.on('exit', (code) => resolve(code ?? -1));
      }),
    );
    const codes = await Promise.all(runs);
    expect(codes.filter((c) => c === 0)).toHaveLength(1);
    expect(codes.filter((c) => c === 4)).toHaveLength(5);
  });
});

describe('the end of an application', () => {
  it('removes tables, registration and IPC objects when the app exits', async () => {
    const { app, t } = await startIpcApp('ends');
    expect(sb.shmFiles()).toHaveLength(1);
    app.child.stdin.end();
    expect((await app.exited).code).toBe(0);
    await waitFor(() => sb.aids().length === 0 && sb.shmFiles().length === 0, 10_000, 'cleanup');
    expectGone(t);
  });

  it('cleans up after kill -9 of every process of the app', async () => {
    const { app, t } = await startIpcApp('killed');
    for (const e of t.pid) if (!e.flags.includes('init')) process.kill(e.system, 'SIGKILL');
    const r = await app.exited;
    expect(r.code).toBe(128 + 9);
    await waitFor(() => !sb.aids().includes('killed') && sb.shmFiles().length === 0, 10_000, 'cleanup');
    expectGone(t);
  });

  it('cleans up after kill -9 of the whole tree, supervisor and harness included', async () => {
    const { app, t } = await startIpcApp('massacre');
    for (const e of t.pid) process.kill(e.system, 'SIGKILL');
    app.child.kill('SIGKILL');
    await app.exited;
    // Nobody was left to clean up: the next appshot command finds the
    // registration dead and removes it.
    await waitFor(() => t.pid.every((e) => !alive(e.system)), 5_000, 'the tree to die');
    expect(sb.run(['ps']).code).toBe(0);
    expect(sb.aids()).not.toContain('massacre');
    expect(sb.shmFiles()).toHaveLength(0);
    expectGone(t);
  });
});
