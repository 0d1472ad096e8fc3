/**
 * Identity and privileges. Servers change user and exec (setpriv, runuser,
 * nginx or memcached dropping to nobody): the new programs must stay in
 * their application, reaching its tables through the descriptor the
 * preload library keeps open across exec, while the table file stays
 * closed to other users. And every call that carries a PID is translated:
 * capget/capset (libcap-ng passes getpid()), ptrace, kcmp, ioprio,
 * get_robust_list, fcntl's owners and lock holders, prctl's PR_SET_PTRACER
 * and PR_SCHED_CORE (fixture pidcalls.c), the ioctls of a terminal's
 * group and session and a socket's owner (pidioctls.c),
 * peer credentials (peercreds.c).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { command, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-identity-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const NOBODY = 65534;
const asNobody = ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--'];

interface PsProcess {
  vpid: number;
  pid: number;
  vppid: number;
  init: boolean;
}

const logOf = (aid: string) => {
  try {
    return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const tablesOf = (aid: string): string => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).tables;
const processesOf = (aid: string): PsProcess[] => sb.json<{ processes: PsProcess[] }[]>(['ps', aid])[0].processes.filter((p) => !p.init);

/** The "P vpid vppid pid uid" lines of idtree (idtree.c). */
function reported(aid: string): { vpid: number; vppid: number; pid: number; uid: number }[] {
  return [...logOf(aid).matchAll(/^P (\d+) (\d+) (\d+) (\d+)$/gm)].map((m) => ({ vpid: +m[1], vppid: +m[2], pid: +m[3], uid: +m[4] }));
}

/** Starts idtree with `children` children under `prefix` (a change of
 * user), detached, and waits for its READY. */
async function startTree(aid: string, prefix: string[], children: number): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...prefix, fixture('idtree'), String(children)]);
  if (r.code !== 0) throw new Error(r.stderr);
  await waitFor(() => /READY/.test(logOf(aid)) || /FAIL/.test(logOf(aid)), 10_000, `${aid} READY`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
}

/** Every process idtree reported is in `appshot ps` with the virtual PID it
 * saw, runs as `uid`, and was translated (its parent is the root's vpid). */
function expectAllTranslated(aid: string, children: number, uid: number): void {
  const lines = reported(aid);
  expect(lines).toHaveLength(children + 1);
  const ps = processesOf(aid);
  const root = lines[0];
  for (const l of lines) {
    expect(l.uid).toBe(uid);
    expect(ps).toContainEqual(expect.objectContaining({ vpid: l.vpid, pid: l.pid }));
    if (l !== root) expect(l.vppid).toBe(root.vpid);
  }
  expect(new Set(lines.map((l) => l.vpid)).size).toBe(lines.length);
}

/** The inode of the descriptor of the table file that process `pid` holds. */
function tablesFdInode(pid: number, tables: string): bigint | undefined {
  for (const n of spawnSync('ls', [`/proc/${pid}/fd`], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${n}`) === tables) return statSync(`/proc/${pid}/fd/${n}`, { bigint: true }).ino;
    } catch {
      /* closed meanwhile */
    }
  }
  return undefined;
}

describe('an application that changes user', () => {
  it('setpriv to nobody, then exec: every process has its virtual PID, the tables stay private', async () => {
    await startTree('nob', asNobody, 3);
    expectAllTranslated('nob', 3, NOBODY);
    const tables = tablesOf('nob');
    const st = statSync(tables);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(process.getuid!());
    // Another user cannot open the file by its path (idtree checked the
    // same from inside, after dropping to nobody).
    const peek = spawnSync(asNobody[0], [...asNobody.slice(1), 'cat', tables], { encoding: 'utf8' });
    expect(peek.status).not.toBe(0);
    expect(peek.stderr).toMatch(/Permission denied/);
  });

  it('snapshot and restore it: every process back in its tables, holding the new table file', async () => {
    const image = join(out, 'nob');
    const before = reported('nob').map((l) => l.vpid).sort((a, b) => a - b);
    const snap = sb.run(['snapshot', 'nob', '-o', image]);
    expect(snap.code, snap.stderr).toBe(0);
    expect(snap.stderr).toMatch(/4 processes/);
    const r = sb.run(['restore', image, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const ps = processesOf('nob');
    expect(ps.map((p) => p.vpid).sort((a, b) => a - b)).toEqual(before);
    const tables = statSync(tablesOf('nob'), { bigint: true }).ino;
    for (const p of ps) expect(tablesFdInode(p.pid, tablesOf('nob'))).toBe(tables);
    // The restored processes are in the tables, so a second snapshot
    // finds none it cannot name.
    const again = sb.run(['snapshot', 'nob', '-o', join(out, 'nob2'), '--leave-running']);
    expect(again.code, again.stderr).toBe(0);
    sb.run(['stop', 'nob', '--signal', 'KILL']);
  });

  it('runuser -u nobody: the same', async () => {
    await startTree('ru', ['runuser', '-u', 'nobody', '--'], 2);
    expectAllTranslated('ru', 2, NOBODY);
    sb.run(['stop', 'ru', '--signal', 'KILL']);
  });

  it('setpriv -- id runs (capget/capset of getpid() reach the process itself)', () => {
    const r = sb.run(['run', '--', ...asNobody, 'id', '-u']);
    expect(r.stderr).not.toMatch(/setpriv/);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(String(NOBODY));
  });
});

describe('calls that carry a PID', () => {
  it('capget/capset, ptrace, kcmp, ioprio_get, get_robust_list, fcntl owners and locks, prctl PR_SET_PTRACER and PR_SCHED_CORE by virtual PID; another application is out of reach', async () => {
    // Another application with more processes than pidcalls will have: its
    // highest virtual PID names nothing in pidcalls's tables.
    await startTree('other', [], 5);
    const other = processesOf('other').sort((a, b) => b.vpid - a.vpid)[0];
    expect(other.vpid).toBeGreaterThanOrEqual(5);
    for (const prefix of [[], asNobody]) {
      const r = sb.run(['run', '--', ...prefix, fixture('pidcalls'), String(other.pid), String(other.vpid)]);
      expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
      expect(r.code).toBe(0);
    }
    sb.run(['stop', 'other', '--signal', 'KILL']);
  });

  it('ioctls: TIOCGSID, TIOCGPGRP and TIOCSPGRP of a terminal, FIOSETOWN, SIOCSPGRP, FIOGETOWN and SIOCGPGRP of a socket, PIDFD_GET_INFO of a pidfd by virtual ids; another application is out of reach', async () => {
    // Before, each handed the kernel the virtual number or gave back the
    // system one (ioctl was not wrapped, only tcgetpgrp & co.).
    await startTree('other2', [], 5);
    const other = processesOf('other2').sort((a, b) => b.vpid - a.vpid)[0];
    for (const prefix of [[], asNobody]) {
      const r = sb.run(['run', '--', ...prefix, fixture('pidioctls'), String(other.pid), String(other.vpid)]);
      expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
      expect(r.code).toBe(0);
    }
    sb.run(['stop', 'other2', '--signal', 'KILL']);
  });

  it('SO_PEERCRED and SCM_CREDENTIALS (received, and sent with sendmsg or sendmmsg) carry virtual PIDs', () => {
    // As nobody the kernel takes sent credentials only with the sender's real PID.
    for (const prefix of [[], asNobody]) {
      const r = sb.run(['run', '--', ...prefix, fixture('peercreds')]);
      expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
      expect(r.code).toBe(0);
    }
  });
});

describe('namespaces of its own', () => {
  it('a new PID, network or IPC namespace is refused with EPERM by every way of asking, and the fork a program falls back to (vsftpd\'s) is one the tables know', () => {
    for (const prefix of [[], asNobody]) {
      const r = sb.run(['run', '--', ...prefix, fixture('newns')]);
      expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
      expect(r.code).toBe(0);
    }
  });
});

describe('a process the tables do not know', () => {
  it('makes the snapshot refuse, naming it by system PID and command, and leaves the application running', async () => {
    const r = sb.run(['run', '-d', '--aid', 'raw', '--', fixture('rawfork')]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => /CHILD \d+/.test(logOf('raw')), 10_000, 'rawfork CHILD');
    const child = Number(/CHILD (\d+)/.exec(logOf('raw'))![1]);
    const snap = sb.run(['snapshot', 'raw', '-o', join(out, 'raw')]);
    expect(snap.code).not.toBe(0);
    expect(snap.stderr).toContain(`system PID ${child} (rawfork) is not in the application's tables`);
    expect(snap.stderr).toMatch(/the application was left running/);
    // It was: the parent is still in the tables, neither is stopped.
    const ps = processesOf('raw');
    expect(ps).toHaveLength(1);
    for (const pid of [ps[0].pid, child]) expect(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0]).toBe('S');
    // stop -s KILL reaches it too: a descendant of the application's init.
    const stop = sb.run(['stop', 'raw', '--signal', 'KILL']);
    expect(stop.code, stop.stderr).toBe(0);
    expect(existsSync(`/proc/${child}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${child}/status`, 'utf8'))).toBe(false);
    await waitFor(() => !sb.aids().includes('raw'), 10_000, 'raw to end');
  });

  it('made by a process `appshot exec` started: stop -s KILL ends it too, though init is not its ancestor', async () => {
    const r = sb.run(['run', '-d', '--aid', 'rawx', '--', 'sleep', '1000']);
    expect(r.code, r.stderr).toBe(0);
    const exec = spawn(command, ['exec', 'rawx', '--', fixture('rawfork')], { env: sb.env, stdio: ['ignore', 'pipe', 'inherit'] });
    let said = '';
    exec.stdout.on('data', (d: Buffer) => (said += d.toString()));
    let child = 0;
    try {
      await waitFor(() => /CHILD \d+/.test(said), 10_000, 'rawfork CHILD');
      child = Number(/CHILD (\d+)/.exec(said)![1]);
      // Its parent killed first, it would be the node's init's child, out
      // of every walk: listed before its parent is signalled.
      const stop = sb.run(['stop', 'rawx', '--signal', 'KILL']);
      expect(stop.code, stop.stderr).toBe(0);
      await waitFor(() => !existsSync(`/proc/${child}`) || /^State:\s+Z/m.test(readFileSync(`/proc/${child}/status`, 'utf8')), 10_000, `raw child ${child} to end`);
    } finally {
      exec.kill('SIGKILL');
      // Not left behind when the test fails.
      if (child) spawnSync('kill', ['-KILL', String(child)]);
    }
  });
});
