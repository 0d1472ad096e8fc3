// The registry and the end of an application: one AID at a time, and
// nothing left behind however the application ends.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, cli, type Entry, fixture, Running, Sandbox, systemIpcIds, waitFor } from './helpers.js';

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

describe('kill -9 of the process group of a foreground run: appshot and the supervisor at once', () => {
  interface PsApp {
    aid: string;
    state: string;
    processes: { pid: number }[];
  }
  const psAll = () => sb.json<PsApp[]>(['ps', '-a']);
  const tablesOf = (aid: string) => sb.shmFiles().filter((f) => f.includes(`-${aid}-`));

  /** `appshot run` as a shell runs a foreground job: in a process group of
   * its own, which holds its init and the application's processes. */
  async function startInGroup(aid: string, script: string) {
    const child = spawn(process.execPath, [cli, 'run', '--aid', aid, '--', 'sh', '-c', script], { env: sb.env, detached: true });
    const app = new Running(child);
    await app.line(/^READY$/);
    const t = sb.json<{ tables: Record<string, Entry[]> }>(['table', aid]).tables;
    return { app, t, group: child.pid! };
  }

  it('with every process in the group: the next command finds nothing of it, and nothing is left', async () => {
    const { app, t, group } = await startInGroup('grp', `exec ${fixture('ipc')} hold keep`);
    process.kill(-group, 'SIGKILL');
    await app.exited;
    await waitFor(() => t.pid.every((e) => !alive(e.system)), 10_000, 'the group to die');
    // Nobody wrote how it ended: its registration goes, with all it held.
    expect(psAll().map((a) => a.aid)).not.toContain('grp');
    expect(sb.allAids()).not.toContain('grp');
    expect(tablesOf('grp')).toEqual([]);
    expectGone(t);
  });

  it('with a daemon that left the group: shown running with it alone; once it is stopped, nothing is left', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'appshot-group-'));
    try {
      const file = join(dir, 'daemon');
      const { app, t, group } = await startInGroup('grpd', `${fixture('daemon')} ${file}; exec ${fixture('ipc')} hold keep`);
      await waitFor(() => existsSync(file), 10_000, 'the daemon to start');
      // "PPID PID" as it sees them, then its system PID.
      const daemon = Number(readFileSync(file, 'utf8').trim().split(' ')[2]);
      expect(alive(daemon)).toBe(true);
      process.kill(-group, 'SIGKILL');
      await app.exited;
      await waitFor(() => t.pid.every((e) => e.system === daemon || !alive(e.system)), 10_000, 'the group to die');
      // The truth: it runs, as its daemon, without a supervisor; its
      // objects and tables stay, in use.
      const listed = psAll().find((a) => a.aid === 'grpd');
      expect(listed).toMatchObject({ state: 'running', processes: [{ pid: daemon }] });
      expect(tablesOf('grpd')).toHaveLength(1);
      expect(systemIpcIds().sem).toEqual(expect.arrayContaining(t.semid.map((e) => e.system)));
      // Stopped without its supervisor: signalled straight, waited for,
      // and then nothing of it is left.
      const stop = await sb.runAsync(['stop', '-t', '30', 'grpd']);
      expect(stop.code, stop.stderr).toBe(0);
      expect(alive(daemon)).toBe(false);
      expect(psAll().map((a) => a.aid)).not.toContain('grpd');
      expect(sb.allAids()).not.toContain('grpd');
      expect(tablesOf('grpd')).toEqual([]);
      expectGone(t);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
