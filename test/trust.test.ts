/**
 * The tables are untrusted input. Every process of an application holds a
 * read-write descriptor of its table file, a process that dropped to
 * another uid included, so any process of that uid that may ptrace it (its
 * uid, dumpable) can take the descriptor (pidfd_getfd) and write whatever
 * ids it likes. Root's `appshot stop`, the supervisor and the registry act
 * on those ids: they must hit only what really is the application's.
 *
 * The attacker (fixture tablethief.c, "steal"), as uid 65534 outside any
 * application, writes into an application's tables a root `sleep` of the
 * test's, -1, 0, and SysV objects the test made outside any application
 * (before the application started, and after it: keyed ones with key
 * entries that map to them, and a private segment whose creator lives),
 * and rewrites init_pid and key_salt in the header. Then each way
 * an application ends: `stop -s KILL` (the CLI signals), `stop` (SIGTERM
 * through init, the first process gone), and a supervisor killed with
 * SIGKILL (the registry releases it): the victim lives, the foreign
 * objects stay, the application's own processes and objects go.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, type Entry, fixture, root, Sandbox, systemIpcIds, waitFor } from './helpers.js';

const sb = new Sandbox();
const NOBODY = 65534;
const asNobody = ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--'];
const started: ChildProcess[] = [];
const foreign: { kind: string; id: number }[] = [];

afterAll(async () => {
  for (const c of started) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  removeForeign();
  await sb.dispose();
});

function removeForeign(): void {
  const flag: Record<string, string> = { sem: '-s', shm: '-m', msg: '-q' };
  for (const o of foreign.splice(0)) spawnSync('ipcrm', [flag[o.kind], String(o.id)]);
}

/** A root process outside any application, which nothing may kill. */
function victim(): ChildProcess {
  const c = spawn('sleep', ['1000'], { stdio: 'ignore' });
  started.push(c);
  return c;
}

/** SysV objects made by root outside any application (tablethief hold). */
async function hold(specs: string[]): Promise<Record<string, number>> {
  const c = spawn(fixture('tablethief'), ['hold', ...specs], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(c);
  const ids: Record<string, number> = {};
  const lines = createInterface({ input: c.stdout! });
  let n = 0;
  for await (const l of lines) {
    const m = l.match(/^ID (\w+) (\d+)$/);
    if (m) {
      ids[specs[n++]] = Number(m[2]);
      foreign.push({ kind: m[1], id: Number(m[2]) });
    }
    if (l === 'READY') break;
    if (l.startsWith('FAIL')) throw new Error(l);
  }
  return ids;
}

const record = (aid: string) => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')) as { tables: string; initPid: number };
const table = (aid: string) => sb.json<{ tables: Record<string, Entry[]> }>(['table', aid]).tables;

/** Starts `tablethief own` as uid 65534 in application `aid`; returns the
 * system PID of its child, the process that stays. */
async function startApp(aid: string): Promise<number> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...asNobody, fixture('tablethief'), 'own']);
  expect(r.code, r.stderr).toBe(0);
  let pid = 0;
  await waitFor(() => {
    const ps = sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid])[0]?.processes.filter((p) => !p.init) ?? [];
    const t = table(aid);
    if (ps.length !== 1 || t.semid.length !== 1 || t.shmid.length !== 1 || t.msgid.length !== 1) return false;
    pid = ps[0].pid;
    // The one listed may be the parent, exiting once it has forked the
    // child that stays (its /proc entry gone between ps and here).
    try {
      return /Uid:\s+65534/.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
    } catch {
      return false;
    }
  }, 10_000, `${aid}: its process as uid 65534 with its three objects`);
  return pid;
}

/** The descriptor of the table file that process `pid` holds. */
function tablesFd(pid: number, tables: string): number {
  for (const n of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${n}`) === tables) return Number(n);
    } catch {
      /* closed meanwhile */
    }
  }
  throw new Error(`process ${pid} holds no descriptor of ${tables}`);
}

const randomKey = () => (0x7a000000 + Math.floor(Math.random() * 0xffffff)).toString(16);

interface Attack {
  victim: ChildProcess;
  foreign: { sem: number[]; shm: number[]; msg: number[] };
  own: { sem: number[]; shm: number[]; msg: number[] };
  app: number;
  init: number;
}

/** Foreign objects made before the application, the application, foreign
 * objects made since, and the attack on its tables. */
async function attack(aid: string): Promise<Attack> {
  const before = await hold(['sem', 'msg']);
  // Whole seconds apart: the kernel's times are in seconds.
  await new Promise((r) => setTimeout(r, 1100));
  const app = await startApp(aid);
  const semKey = randomKey();
  const msgKey = randomKey();
  const since = await hold([`sem:${semKey}`, `msg:${msgKey}`, 'shm']);
  const t = table(aid);
  const own = { sem: t.semid.map((e) => e.system), shm: t.shmid.map((e) => e.system), msg: t.msgid.map((e) => e.system) };
  const v = victim();
  const { tables, initPid } = record(aid);
  const steal = spawnSync(
    asNobody[0],
    [
      ...asNobody.slice(1),
      fixture('tablethief'),
      'steal',
      String(app),
      String(tablesFd(app, tables)),
      String(v.pid),
      `sem:${before.sem}`,
      `msg:${before.msg}`,
      `sem:${since[`sem:${semKey}`]}:${semKey}`,
      `msg:${since[`msg:${msgKey}`]}:${msgKey}`,
      `shm:${since.shm}`,
    ],
    { encoding: 'utf8' },
  );
  expect(steal.stdout + steal.stderr).toMatch(/STOLEN/);
  // The attack landed: the tables name the victim and the foreign objects.
  const after = table(aid);
  expect(after.pid.map((e) => e.system)).toEqual(expect.arrayContaining([v.pid, -1, 0]));
  expect(after.semid.map((e) => e.system)).toEqual(expect.arrayContaining([before.sem, since[`sem:${semKey}`]]));
  return {
    victim: v,
    foreign: { sem: [before.sem, since[`sem:${semKey}`]], shm: [since.shm], msg: [before.msg, since[`msg:${msgKey}`]] },
    own,
    app,
    init: initPid,
  };
}

/** Whether `pid` lives and was sent neither SIGKILL nor SIGTERM: a
 * signal sent but not yet taken leaves a process that kill(0) still finds
 * (review r452 F8); it waits in its thread's or its group's pending set
 * (/proc/PID/status SigPnd, ShdPnd: signal N is bit N-1) until then. */
function untouched(pid: number): boolean {
  if (!alive(pid)) return false;
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  for (const set of ['SigPnd', 'ShdPnd']) {
    const m = new RegExp(`\\n${set}:\\s*([0-9a-f]+)\\n`).exec(status);
    expect(m, `${set} of ${pid}`).not.toBeNull();
    const pending = BigInt(`0x${m![1]}`);
    if ((pending >> 8n) & 1n || (pending >> 14n) & 1n) return false;
  }
  return true;
}

/** The application is gone with its own objects; the victim and the
 * foreign objects are not. */
async function expectOnlyOwnGone(aid: string, a: Attack): Promise<void> {
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  // Init writes the exit file (which ends the AID) before it exits.
  await waitFor(() => !alive(a.app) && !alive(a.init), 10_000, `${aid}'s processes to go`);
  expect(untouched(a.victim.pid!)).toBe(true);
  const now = systemIpcIds(true);
  for (const k of ['sem', 'shm', 'msg'] as const) {
    for (const id of a.foreign[k]) expect(now[k], `foreign ${k} ${id}`).toContain(id);
    for (const id of a.own[k]) expect(now[k], `own ${k} ${id}`).not.toContain(id);
  }
  expect(sb.shmFiles()).toEqual([]);
  a.victim.kill('SIGKILL');
  removeForeign();
}

describe('tables rewritten by a process of another uid', () => {
  it('stop -s KILL kills the application, not the PIDs written into its tables; its end removes its own SysV objects only', async () => {
    const a = await attack('drop2');
    const r = sb.run(['stop', 'drop2', '-s', 'KILL']);
    expect(r.code, r.stderr).toBe(0);
    await expectOnlyOwnGone('drop2', a);
  });

  it('stop (SIGTERM through init, the first process gone): the same', async () => {
    const a = await attack('drop3');
    const r = sb.run(['stop', 'drop3']);
    expect(r.code, r.stderr).toBe(0);
    await expectOnlyOwnGone('drop3', a);
  });

  it('a supervisor killed with SIGKILL: the registry releases the application, its own objects only', async () => {
    const a = await attack('drop4');
    process.kill(a.init, 'SIGKILL');
    process.kill(a.app, 'SIGKILL');
    await waitFor(() => !alive(a.app) && !alive(a.init), 5000, 'drop4 to die');
    const ls = sb.run(['ps']);
    expect(ls.code, ls.stderr).toBe(0);
    await expectOnlyOwnGone('drop4', a);
  });

  it('snapshot freezes, dumps and ends the application only, not the PIDs written into its tables', async () => {
    const a = await attack('drop5');
    const image = join(tmpdir(), `appshot-trust-${process.pid}.snap`);
    try {
      const r = sb.run(['snapshot', 'drop5', '-o', image]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/1 process\b/);
      await expectOnlyOwnGone('drop5', a);
    } finally {
      rmSync(image, { recursive: true, force: true });
    }
  });

  // The writer puts in a process of its own uid that would pass for one of
  // the application's (reviews r404 F4, r418 F1): frozen and dumped into
  // root's image with it (and, restored, given a read-write descriptor of
  // root's tables), signalled with it by `stop -s KILL`, or taken by init
  // for a process of the application outside its tree (`appshot exec`'s),
  // which it waits for before it ends the application.
  const passingFor: [string, string, 'snapshot' | 'stop' | 'exit', (tables: string) => string[], (pid: number, tables: string) => boolean][] = [
    [
      'names the tables in its environment',
      'drop6',
      'snapshot',
      (tables) => [...asNobody, 'env', `APPSHOT_TABLES=${tables}`, 'sleep', '1000'],
      (pid, tables) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0') && readFileSync(`/proc/${pid}/environ`, 'utf8').includes(`APPSHOT_TABLES=${tables}\0`),
    ],
    [
      'names the tables in its environment',
      'drop8',
      'exit',
      (tables) => [...asNobody, 'env', `APPSHOT_TABLES=${tables}`, 'sleep', '1000'],
      (pid, tables) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0') && readFileSync(`/proc/${pid}/environ`, 'utf8').includes(`APPSHOT_TABLES=${tables}\0`),
    ],
    // Not snapshot: the writer's init_pid, set to this process, makes the
    // snapshot take its user namespace for the application's and refuse
    // the application (the namespace check reads the header's init_pid).
    [
      'holds a file of the same path on a tmpfs of its own mount namespace',
      'drop7',
      'stop',
      (tables) => [...asNobody, 'unshare', '-Urm', 'sh', '-c', `mount -t tmpfs x /dev/shm && : > ${tables} && exec 7<>${tables} && exec sleep 1000`],
      (pid, tables) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0') && readlinkSync(`/proc/${pid}/fd/7`) === tables,
    ],
  ];
  for (const [how, aid, ending, argv, ready] of passingFor)
    it(`${{ snapshot: 'snapshot freezes and dumps', stop: 'stop -s KILL signals', exit: 'init, once its last process exits, ends' }[ending]} the application only, not a process of the writer's uid whose PID it wrote there and that ${how}`, async () => {
      const app = await startApp(aid);
      const { tables } = record(aid);
      const c = spawn(argv(tables)[0], argv(tables).slice(1), { stdio: 'ignore' });
      started.push(c);
      await waitFor(() => {
        try {
          return ready(c.pid!, tables);
        } catch {
          return c.exitCode !== null;
        }
      }, 10_000, `the process that ${how} to be ready`);
      expect(c.exitCode).toBeNull();
      const steal = spawnSync(asNobody[0], [...asNobody.slice(1), fixture('tablethief'), 'steal', String(app), String(tablesFd(app, tables)), String(c.pid)], { encoding: 'utf8' });
      expect(steal.stdout + steal.stderr).toMatch(/STOLEN/);
      expect(table(aid).pid.map((e) => e.system)).toContain(c.pid);
      const image = join(tmpdir(), `appshot-trust-${process.pid}-${aid}.snap`);
      try {
        if (ending === 'exit') process.kill(app, 'SIGKILL');
        else {
          const r = sb.run(ending === 'snapshot' ? ['snapshot', aid, '-o', image] : ['stop', aid, '-s', 'KILL']);
          expect(r.code, r.stderr).toBe(0);
          if (ending === 'snapshot') expect(r.stderr).toMatch(/1 process\b/);
        }
        await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
        await waitFor(() => !alive(app), 10_000, `${aid}'s process to go`);
        expect(untouched(c.pid!)).toBe(true);
      } finally {
        rmSync(image, { recursive: true, force: true });
        c.kill('SIGKILL');
      }
    });

  // Init judges the processes of its tables by the table file it holds,
  // not by whatever is at the path now. If the file is unlinked under it
  // and another user makes one of the same name (/dev/shm is anyone's),
  // the application's process outside init's tree (`appshot exec`'s),
  // which holds the old file, still counts: init neither ends the
  // application under it once its first process is gone, nor stops
  // passing signals on to it (review r452 F5).
  it("init, its table file's name taken by another user's file, still counts the application's `appshot exec` process", async () => {
    const aid = 'drop9';
    const r = sb.run(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    expect(r.code, r.stderr).toBe(0);
    const { tables, initPid } = record(aid);
    const parentOf = (pid: number) => Number(/\nPPid:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
    let first = 0;
    await waitFor(() => {
      for (const n of readdirSync('/proc')) {
        if (!/^\d+$/.test(n)) continue;
        try {
          if (parentOf(Number(n)) === initPid && readFileSync(`/proc/${n}/cmdline`, 'utf8').startsWith('sleep\0')) first = Number(n);
        } catch {
          // gone
        }
      }
      return first > 0;
    }, 10_000, `${aid}'s first process`);
    const mark = join(tmpdir(), `appshot-trust-${process.pid}-${aid}`);
    rmSync(`${mark}.ready`, { force: true });
    rmSync(`${mark}.got`, { force: true });
    // One process, no children: a child started after the swap would be
    // given the other user's file by path.
    const script = 'import os, signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *a: open(sys.argv[1] + ".got", "w").write("got"))\nopen(sys.argv[1] + ".ready", "w").write("ready")\nwhile True: time.sleep(1)';
    const ex = sb.start(['exec', aid, '--', '/usr/bin/python3', '-c', script, mark]);
    try {
      // Its system PID (getpid() in it says its virtual one).
      let execPid = 0;
      await waitFor(() => {
        if (!existsSync(`${mark}.ready`)) return false;
        for (const n of readdirSync('/proc')) {
          try {
            if (/^\d+$/.test(n) && readFileSync(`/proc/${n}/cmdline`, 'utf8').endsWith(`\0${mark}\0`) && readFileSync(`/proc/${n}/cmdline`, 'utf8').startsWith('/usr/bin/python3\0')) execPid = Number(n);
          } catch {
            // gone
          }
        }
        return execPid > 0;
      }, 10_000, 'the exec process to start');
      expect(parentOf(execPid)).not.toBe(initPid);
      expect(readdirSync(`/proc/${execPid}/fd`).some((n) => readlinkSync(`/proc/${execPid}/fd/${n}`) === tables)).toBe(true);
      rmSync(tables);
      const made = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', `: > ${tables}`], { encoding: 'utf8' });
      expect(made.status, made.stderr).toBe(0);
      process.kill(first, 'SIGKILL');
      // Reaped by init: its look at the rest is made right then.
      await waitFor(() => !existsSync(`/proc/${first}`), 10_000, `${aid}'s first process to be reaped`);
      // A signal to init, with its first process gone, goes on to the
      // application's processes: the exec process only if init still
      // lives and counts it.
      try {
        process.kill(initPid, 'SIGUSR1');
      } catch {
        // init ended: the wait below fails
      }
      await waitFor(() => existsSync(`${mark}.got`), 10_000, 'init to pass SIGUSR1 on to the exec process');
      expect(alive(initPid)).toBe(true);
    } finally {
      ex.child.kill('SIGKILL');
      for (const n of readdirSync('/proc'))
        try {
          if (/^\d+$/.test(n) && readFileSync(`/proc/${n}/cmdline`, 'utf8').endsWith(`\0${mark}\0`)) process.kill(Number(n), 'SIGKILL');
        } catch {
          // gone
        }
      rmSync(`${mark}.ready`, { force: true });
      rmSync(`${mark}.got`, { force: true });
    }
    await waitFor(() => !sb.aids().includes(aid) && !alive(initPid), 10_000, `${aid} to end`);
    rmSync(tables, { force: true });
  });

  it('a descriptor in APPSHOT_TABLES_FD that is not the file APPSHOT_TABLES names (a copy) is not used', async () => {
    await startApp('copy');
    const { tables } = record('copy');
    const copy = join(tmpdir(), `appshot-tables-copy-${process.pid}`);
    copyFileSync(tables, copy);
    try {
      // The launcher runs without the library: it only puts the copy at a
      // number and names it, as a process that kept a stale or forged
      // descriptor would.
      const c = spawn('bash', ['-c', `exec 900<>"$COPY"; LD_PRELOAD="$LIB" APPSHOT_TABLES_FD=900 exec sleep 30`], {
        stdio: 'ignore',
        env: { ...process.env, COPY: copy, LIB: join(root, 'build', 'Release', 'appshot_preload.so'), APPSHOT_TABLES: tables, APPSHOT_AID: 'copy' },
      });
      started.push(c);
      // It joined the real tables (by path: root may open them), not the copy.
      await waitFor(() => sb.json<{ processes: { pid: number }[] }[]>(['ps', 'copy'])[0].processes.some((p) => p.pid === c.pid), 5000, 'sleep in the tables');
      const links = readdirSync(`/proc/${c.pid}/fd`).map((n) => readlinkSync(`/proc/${c.pid}/fd/${n}`));
      expect(links).toContain(tables);
      c.kill('SIGKILL');
    } finally {
      rmSync(copy, { force: true });
    }
    expect(sb.run(['stop', 'copy', '-s', 'KILL']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('copy'), 10_000, 'copy to end');
  });
});

/** The user namespace /proc/PID/ns/user names, '' once gone. */
function userNs(pid: number): string {
  try {
    return readlinkSync(`/proc/${pid}/ns/user`);
  } catch {
    return '';
  }
}

// Whether uid 65534 may make a user namespace here (kernels and
// distributions may forbid it: unprivileged_userns_clone, AppArmor).
const nobodyUserNs = spawnSync(asNobody[0], [...asNobody.slice(1), 'unshare', '-Ur', 'true']).status === 0;

describe("init_pid written by a process of the application (the header is the application's to write)", () => {
  it.skipIf(!nobodyUserNs)("naming a process in another user namespace: the snapshot still takes the application, judged against its real init's namespaces", async () => {
    // Not the application's: uid 65534 in a user namespace of its own.
    const other = spawn(asNobody[0], [...asNobody.slice(1), 'unshare', '-Ur', 'sleep', '1000'], { stdio: 'ignore' });
    started.push(other);
    const pid = other.pid!;
    await waitFor(() => {
      const ns = userNs(pid);
      return ns !== '' && ns !== userNs(process.pid) && readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'sleep';
    }, 10_000, 'sleep in a user namespace of its own');
    const r = sb.run(['run', '-d', '--aid', 'pointed', '--', fixture('tablethief'), 'point', String(pid)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('pointed').includes(`POINTED ${pid}`) || /FAIL/.test(sb.log('pointed')), 10_000, 'init_pid rewritten');
    expect(sb.log('pointed')).toContain(`POINTED ${pid}`);
    const image = join(tmpdir(), `appshot-trust-pointed-${process.pid}.snap`);
    try {
      const s = sb.run(['snapshot', 'pointed', '-o', image]);
      expect(s.code, s.stderr).toBe(0);
      expect(s.stderr).toMatch(/1 process\b/);
      await waitFor(() => !sb.aids().includes('pointed'), 10_000, 'pointed to end');
      expect(alive(pid)).toBe(true);
    } finally {
      rmSync(image, { recursive: true, force: true });
      other.kill('SIGKILL');
    }
  });

  it("naming the very process in a user namespace of its own: that process is still refused", async () => {
    // Root's unshare --user: the process's capabilities inside it would be
    // a root restore's outside. Were init_pid believed, the namespaces it
    // is compared with would be its own.
    const r = sb.run(['run', '-d', '--aid', 'selfns', '--', 'unshare', '--user', '--', fixture('tablethief'), 'point', 'self']);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => /POINTED \d+/.test(sb.log('selfns')) || /FAIL/.test(sb.log('selfns')), 10_000, 'init_pid rewritten');
    const pid = Number(/POINTED (\d+)/.exec(sb.log('selfns'))?.[1]);
    expect(userNs(pid)).not.toBe(userNs(process.pid));
    const image = join(tmpdir(), `appshot-trust-selfns-${process.pid}.snap`);
    try {
      const s = sb.run(['snapshot', 'selfns', '-o', image]);
      expect(s.code, s.stderr).toBe(1);
      expect(s.stderr).toMatch(/process 2 \(tablethief\) is in a user namespace of its own \(user:\[\d+\]\), which cannot be captured yet; the application was left running/);
      expect(existsSync(image)).toBe(false);
    } finally {
      rmSync(image, { recursive: true, force: true });
      sb.run(['stop', 'selfns', '-s', 'KILL']);
    }
    await waitFor(() => !sb.aids().includes('selfns'), 10_000, 'selfns to end');
  });
});
