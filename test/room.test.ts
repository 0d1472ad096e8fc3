/**
 * Where the engine reads its pids cgroup's limits (template/room.ts,
 * pidsCgroupDirs): from /proc/self/cgroup and the mounts of
 * /proc/self/mountinfo, never a directory outside a cgroup mount, v1's
 * pids controller and v2 found where they are mounted, any other v1
 * controller ignored. This machine's own files, and lines as a cgroup
 * namespace or another mount layout shows them.
 */
import { readFileSync } from 'node:fs';
import { expect, it } from 'vitest';
import { pidsCgroupDirs } from '../src/template/room.js';

const mountinfo = (...mounts: [root: string, at: string, type: string, options: string][]) =>
  mounts.map(([root, at, type, options], i) => `${30 + i} 22 0:${27 + i} ${root} ${at} rw,relatime - ${type} ${type} ${options}`).join('\n');

it("names this engine's pids cgroup and those above it, each under a pids or cgroup2 mount of this machine", () => {
  const cgroups = readFileSync('/proc/self/cgroup', 'utf8');
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8');
  const dirs = pidsCgroupDirs(cgroups, mounts);
  const points = mounts
    .split('\n')
    .filter((l) => / - cgroup2 /.test(l) || (/ - cgroup /.test(l) && /[ ,]pids(,|$)/.test(l.split(' - ')[1])))
    .map((l) => l.split(' ')[4]);
  for (const d of dirs) expect(points.some((p) => d === p || d.startsWith(`${p}/`)), d).toBe(true);
  // Each such mount holds one of them: its hierarchy's root at least.
  for (const p of points) expect(dirs.some((d) => d === p || d.startsWith(`${p}/`)), p).toBe(true);
});

it('finds a v1 pids cgroup where its hierarchy is mounted, up to the mount\'s root, and a v2 one', () => {
  const mounts = mountinfo(['/', '/mnt/pids', 'cgroup', 'rw,pids'], ['/', '/sys/fs/cgroup/memory', 'cgroup', 'rw,memory'], ['/ns', '/run/v2', 'cgroup2', 'rw']);
  expect(pidsCgroupDirs('4:memory:/a\n8:pids:/app/b\n', mounts)).toEqual(['/mnt/pids/app/b', '/mnt/pids/app', '/mnt/pids']);
  // A mount of the namespace's part of the hierarchy: paths from its root.
  expect(pidsCgroupDirs('0::/ns/app\n', mounts)).toEqual(['/run/v2/app', '/run/v2']);
  // A cgroup outside that mount's root is not under it.
  expect(pidsCgroupDirs('0::/other/app\n', mounts)).toEqual([]);
});

it('names nothing outside a mount for a cgroup path with ".." (a cgroup above its namespace\'s root), or a mount point with one', () => {
  const mounts = mountinfo(['/', '/sys/fs/cgroup/pids', 'cgroup', 'rw,pids'], ['/', '/sys/fs/cgroup/unified', 'cgroup2', 'rw']);
  expect(pidsCgroupDirs('8:pids:/../../etc\n0::/../sibling/app\n0::/a/./b\n', mounts)).toEqual([]);
  expect(pidsCgroupDirs('0::/app\n', mountinfo(['/', '/sys/fs/cgroup/../../etc', 'cgroup2', 'rw']))).toEqual([]);
  // An escaped space in a mount point is the space.
  expect(pidsCgroupDirs('0::/\n', mountinfo(['/', '/run/cgroup\\040two', 'cgroup2', 'rw']))).toEqual(['/run/cgroup two']);
});
