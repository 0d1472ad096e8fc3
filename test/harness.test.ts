// `appshot run` as a foreground runner: ids, exit status, signals, detach,
// logs, daemons, exec.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

interface PsApp {
  aid: string;
  processes: { vpid: number; pid: number; vppid: number; init: boolean; command: string }[];
}

describe('appshot run', () => {
  it('shows the app virtual ids while the system sees system ids', () => {
    const r = sb.run(['run', '--aid', 'ids', '--', fixture('ids')]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const ids = JSON.parse(r.stdout);
    // The first process is virtual PID 2, child of the application's init (1).
    expect(ids.pid).toBe(2);
    expect(ids.ppid).toBe(1);
    expect(ids.tid).toBe(2);
    expect(ids.sys_pid).not.toBe(2);
    expect(ids.sys_pid).toBe(ids.sys_tid);
  });

  it('passes the exit status through, and 128+N for a signal', () => {
    expect(sb.run(['run', '--', 'sh', '-c', 'exit 7']).code).toBe(7);
    expect(sb.run(['run', '--', 'sh', '-c', 'kill -TERM $$']).code).toBe(128 + 15);
  });

  it('prints a generated AID on stderr when none is given', () => {
    const r = sb.run(['run', '--', 'true']);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/^appshot: running as AID app-[0-9a-f]{8}\n$/);
  });

  it('gives one clear message and 127/126 for a command that cannot run', () => {
    const missing = sb.run(['run', '--aid', 'missing', '--', '/nonexistent/program']);
    expect(missing.code).toBe(127);
    expect(missing.stderr).toBe("appshot: cannot run '/nonexistent/program': command not found\n");
    const plain = join(sb.home, 'not-executable');
    writeFileSync(plain, '#!/bin/sh\necho should not run\n', { mode: 0o644 });
    const notExec = sb.run(['run', '--', plain]);
    expect(notExec.code).toBe(126);
    expect(sb.aids()).toEqual([]);
  });

  it('passes stdin through and forwards SIGTERM to the app', async () => {
    const app = sb.start(['run', '--aid', 'fwd', '--', fixture('waiter')]);
    await app.line(/^READY 2$/);
    app.child.kill('SIGTERM');
    const r = await app.exited;
    expect(r.code).toBe(128 + 15);
    await waitFor(() => !sb.aids().includes('fwd'), 10_000, 'fwd to be cleaned up');
  });

  it('refuses bad usage with exit code 2', () => {
    expect(sb.run(['run', '--aid', 'bad/name', '--', 'true']).code).toBe(2);
    expect(sb.run(['run', '--aid', 'x']).code).toBe(2);
    expect(sb.run(['frobnicate']).code).toBe(2);
  });
});

describe('detached applications', () => {
  it('runs in the background, logs its output, and is listed by ps', async () => {
    const r = sb.run(['run', '-d', '--aid', 'bg', '--json', '--', fixture('waiter')]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ aid: 'bg', vpid: 2 });
    await waitFor(() => sb.run(['logs', 'bg']).stdout.includes('READY 2'), 10_000, 'log output');
    const ps = sb.json<PsApp[]>(['ps', 'bg']);
    expect(ps).toHaveLength(1);
    const procs = ps[0].processes;
    expect(procs.map((p) => p.vpid)).toEqual([1, 2]);
    expect(procs[0].init).toBe(true);
    expect(procs[1]).toMatchObject({ vpid: 2, vppid: 1 });
    expect(procs[1].command).toContain('waiter');
    expect(alive(procs[1].pid)).toBe(true);
    // kill by virtual PID from inside the application's view
    const k = sb.run(['exec', 'bg', '--', '/bin/kill', '-HUP', '2']);
    expect(k.code).toBe(0);
    await waitFor(() => sb.run(['logs', 'bg']).stdout.includes('HUP'), 10_000, 'HUP in the log');
    expect(sb.run(['stop', 'bg']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('bg'), 10_000, 'bg to be cleaned up');
  });

  it('keeps a daemonizing app inside the application after run returns', async () => {
    const file = join(sb.home, 'daemon.out');
    const r = sb.run(['run', '--aid', 'dmn', '--', fixture('daemon'), file]);
    expect(r.code).toBe(0);
    await waitFor(() => existsSync(file), 10_000, 'the daemon to write its ids');
    const [ppid, vpid, sysPid] = readFileSync(file, 'utf8').trim().split(' ').map(Number);
    // Reparented to the application's init, seen as PID 1 as in a container.
    expect(ppid).toBe(1);
    const ps = sb.json<PsApp[]>(['ps', 'dmn']);
    const daemon = ps[0].processes.find((p) => p.vpid === vpid);
    expect(daemon).toMatchObject({ pid: sysPid, vppid: 1 });
    expect(sb.run(['stop', 'dmn']).code).toBe(0);
    await waitFor(() => !alive(sysPid) && !sb.aids().includes('dmn'), 10_000, 'the daemon to stop');
  });

  it('says so when ps, table, logs, exec or stop name an unknown AID', () => {
    for (const args of [['ps', 'nope'], ['table', 'nope'], ['logs', 'nope'], ['exec', 'nope', '--', 'true'], ['stop', 'nope']]) {
      const r = sb.run(args);
      expect(r.code, args.join(' ')).toBe(3);
      expect(r.stderr).toBe("appshot: no application with AID 'nope'\n");
    }
  });
});
