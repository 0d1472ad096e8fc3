// Virtual PIDs: translation in both directions for real process trees.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, type Entry, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());


describe('virtual PIDs', () => {
  it('gives a tree of 65 concurrently forking processes unique ids and a consistent table', async () => {
    const app = sb.start(['run', '--aid', 'tree', '--', fixture('forktree'), '8', '7']);
    const ready = await app.line(/^READY (\d+)$/);
    const rootVpid = Number(ready[1]);
    const reports = app
      .output()
      .filter((l) => /^\d+ \d+ \d+$/.test(l))
      .map((l) => l.split(' ').map(Number));
    expect(reports).toHaveLength(64);
    const table = sb.json<{ tables: { pid: Entry[] } }>(['table', 'tree']).tables.pid;
    const byVirtual = new Map(table.map((e) => [e.virtual, e.system]));
    const vpids = new Set<number>();
    for (const [vpid, vppid, sysPid] of reports) {
      vpids.add(vpid);
      // What the process saw is what the table says, and the system agrees.
      expect(byVirtual.get(vpid)).toBe(sysPid);
      expect(alive(sysPid)).toBe(true);
      // Its parent is the root or one of the reported children.
      expect(vppid === rootVpid || reports.some((r) => r[0] === vppid)).toBe(true);
    }
    expect(vpids.size).toBe(64);
    // One to one: no system PID appears twice either.
    expect(new Set(table.map((e) => e.system)).size).toBe(table.length);
    app.send('go\n');
    const r = await app.exited;
    expect(r.stdout).toMatch(/\nOK$/);
    expect(r.code).toBe(0);
  });

  it('reaches the right processes with kill, waitpid, killpg, sigqueue, waitid, tgkill and /proc/<vpid>', () => {
    const r = sb.run(['run', '--', fixture('signals')]);
    expect(r.stdout).toBe('OK\n');
    expect(r.code).toBe(0);
  });

  it('reaches the right process with priority, affinity, rlimit, pidfd and group calls', () => {
    const r = sb.run(['run', '--', fixture('procctl')]);
    expect(r.stdout).toBe('OK\n');
    expect(r.code).toBe(0);
  });

  it('puts children of posix_spawn, vfork and system() in the application', () => {
    const r = sb.run(['run', '--', fixture('spawn'), fixture('ids')]);
    expect(r.stdout).toBe('OK\n');
    expect(r.code).toBe(0);
  });

  it('shows virtual PIDs in /proc/locks, /proc/PID/fdinfo and the cgroup lists read by the application (0 for a lock held outside it)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'appshot-pidview-'));
    const outside = join(dir, 'outside');
    writeFileSync(outside, '');
    // A process outside the application holds an flock on `outside`.
    const holder = spawn('flock', [outside, 'sleep', '60'], { stdio: 'ignore', detached: true });
    try {
      const ino = statSync(outside).ino;
      await waitFor(() => new RegExp(`:${ino} `).test(readFileSync('/proc/locks', 'utf8')), 10_000, 'the outside lock');
      const r = sb.run(['run', '--', fixture('pidview'), dir, outside, ...cgroupLists()]);
      expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
      expect(r.code).toBe(0);
    } finally {
      process.kill(-holder.pid!, 'SIGKILL'); // flock and its sleep
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** The lists of processes of the cgroups this process is in (and so its
 * children): cgroup.procs and cgroup.threads of cgroup v2, cgroup.procs and
 * tasks of cgroup v1's pids hierarchy, those that this node has. */
function cgroupLists(): string[] {
  const mounts = readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' '));
  const files: string[] = [];
  for (const line of readFileSync('/proc/self/cgroup', 'utf8').trim().split('\n')) {
    const [, controllers, path] = line.split(':');
    const mount =
      controllers === ''
        ? mounts.find((m) => m[2] === 'cgroup2')
        : controllers === 'pids'
          ? mounts.find((m) => m[2] === 'cgroup' && m[3]?.split(',').includes('pids'))
          : undefined;
    if (!mount) continue;
    const names = controllers === '' ? ['cgroup.procs', 'cgroup.threads'] : ['cgroup.procs', 'tasks'];
    for (const n of names) files.push(join(mount[1], path, n));
  }
  return files.filter((f) => existsSync(f));
}
