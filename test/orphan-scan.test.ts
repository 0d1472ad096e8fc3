/**
 * A registration whose supervisor is gone (its init killed with SIGKILL)
 * lives on while a process of the application does: one that holds its
 * table file, or, of the registry's user, names it in its environment
 * (registry.ts TablesNamers). Not a process of another user that only
 * names it: the path is no secret (ls /dev/shm), and such a process kept
 * root's dead registrations running for ever, their SysV objects, ports
 * and AIDs never released (review r404 F4).
 *
 * And a registration released with a table file that is no table file any
 * more (truncated or overwritten for good, another version's) says, in one line, that
 * the SysV objects it made are left: nothing else says which they were.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readlinkSync, realpathSync, rmSync, symlinkSync, truncateSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { LocalRegistry } from '../src/registry.js';
import { alive, asNobody, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const started: ChildProcess[] = [];
const madeShm: number[] = [];
/** What a test put at a table file's path. */
const putAtTables: string[] = [];
/** Processes of applications a failing test may leave behind. */
const appPids: number[] = [];
afterAll(async () => {
  for (const pid of appPids) {
    let argv0 = '';
    try {
      argv0 = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0];
    } catch {
      /* gone */
    }
    // Still the test's (not a PID given to another since).
    if (argv0 === 'sleep' || argv0 === 'python3') process.kill(pid, 'SIGKILL');
  }
  for (const p of putAtTables) rmSync(p, { recursive: true, force: true });
  for (const c of started) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const id of madeShm) spawnSync('ipcrm', ['-m', String(id)]);
  await sb.dispose();
});

interface Listed {
  aid: string;
  state: string;
}

/** Whether SysV shared memory segment `id` exists (ipcs -i answers 0
 * for one that does not). */
const shmExists = (id: number) =>
  readFileSync('/proc/sysvipc/shm', 'utf8')
    .split('\n')
    .slice(1)
    .some((l) => l.trim().split(/\s+/)[1] === String(id));

const record = (aid: string) => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')) as { initPid: number; tables: string };

/** Waits for `run -d`'s record to name its supervisor; the record then. */
async function supervised(aid: string): Promise<ReturnType<typeof record>> {
  await waitFor(() => existsSync(join(sb.home, 'apps', aid, 'app.json')) && record(aid).initPid > 1, 10_000, `${aid} to be supervised`);
  return record(aid);
}

/** The path a descriptor of the table file at `tables` reads (its
 * directory's links resolved). */
const canonicalOf = (tables: string) => join(realpathSync(dirname(tables)), basename(tables));

/** `argv` started with only PATH and APPSHOT_TABLES=`tables` in its
 * environment, no descriptor of the table file, not preloaded; waits
 * until its environment is its own (exec done). */
async function naming(argv: string[], tables: string): Promise<ChildProcess> {
  const c = spawn(argv[0], argv.slice(1), { env: { PATH: process.env.PATH, APPSHOT_TABLES: tables }, stdio: 'ignore' });
  started.push(c);
  const pid = c.pid!;
  await waitFor(() => {
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0') && readFileSync(`/proc/${pid}/environ`, 'utf8').includes(`APPSHOT_TABLES=${tables}\0`);
    } catch {
      return false;
    }
  }, 10_000, `${argv.join(' ')} to run`);
  return c;
}

async function killed(c: ChildProcess): Promise<void> {
  c.kill('SIGKILL');
  await waitFor(() => c.exitCode !== null || c.signalCode !== null, 10_000, 'a process to die');
}

/** The application's init, then its process, killed: nothing wrote how it
 * ended, and only a look at the processes tells it is gone. */
async function orphaned(aid: string): Promise<void> {
  const app = sb.systemPid(aid);
  const { initPid } = record(aid);
  expect(initPid).toBeGreaterThan(1);
  process.kill(initPid, 'SIGKILL');
  await waitFor(() => !alive(initPid), 10_000, 'its init to die');
  process.kill(app, 'SIGKILL');
  await waitFor(() => !alive(app), 10_000, 'its process to die');
}

/** Waits until `pid` runs sleep (its shell's last exec done) with a
 * descriptor 7 whose link reads `path`. */
async function waitHoldingFd7(pid: number, path: string, what: string): Promise<void> {
  await waitFor(() => {
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0') && readlinkSync(`/proc/${pid}/fd/7`) === path;
    } catch {
      return false;
    }
  }, 10_000, what);
}

async function listed(): Promise<{ apps: Listed[]; stderr: string }> {
  const r = await sb.runAsync(['ps', '-a', '--json'], 60_000);
  expect(r.code, r.stderr).toBe(0);
  return { apps: JSON.parse(r.stdout) as Listed[], stderr: r.stderr };
}

describe('a registration whose supervisor and processes are gone', () => {
  it("is kept while a process of the registry's user names its tables, not while only another user's does", async () => {
    expect(process.getuid?.(), 'run as root: a process of another uid is made with setpriv').toBe(0);
    const aid = 'orphan-env';
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    // Of the registry's user (root): one of the application's, as far as
    // anyone can tell (a static program that closed its descriptors).
    const own = await naming(['sleep', '1000'], tables);
    // Of nobody: anyone's words.
    const other = await naming([...asNobody, 'sleep', '1000'], tables);
    await orphaned(aid);
    const running = (apps: Listed[]) => apps.filter((a) => a.aid === aid && a.state === 'running');
    expect(running((await listed()).apps)).toHaveLength(1);
    await killed(own);
    // Only nobody's process names its tables now.
    expect(alive(other.pid!)).toBe(true);
    expect(running((await listed()).apps)).toEqual([]);
    expect(existsSync(tables)).toBe(false);
    await killed(other);
  });
});

describe('a registration whose supervisor is gone', () => {
  it('is kept while a process of the application of another uid holds its table file, and released after', async () => {
    expect(process.getuid?.(), 'run as root: the process is made nobody with setpriv').toBe(0);
    const aid = 'orphan-held';
    sb.ok(['run', '-d', '--aid', aid, '--', ...asNobody, 'sleep', '1000']);
    await supervised(aid);
    const app = sb.systemPid(aid);
    await waitFor(() => {
      try {
        return readFileSync(`/proc/${app}/cmdline`, 'utf8').startsWith('sleep\0');
      } catch {
        return false;
      }
    }, 10_000, 'its sleep to run');
    const { initPid, tables } = record(aid);
    process.kill(initPid, 'SIGKILL');
    await waitFor(() => !alive(initPid), 10_000, 'its init to die');
    const running = (apps: Listed[]) => apps.filter((a) => a.aid === aid && a.state === 'running');
    expect(running((await listed()).apps)).toHaveLength(1);
    expect(existsSync(tables)).toBe(true);
    process.kill(app, 'SIGKILL');
    await waitFor(() => !alive(app), 10_000, 'its process to die');
    expect((await listed()).apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(existsSync(tables)).toBe(false);
  });
});

describe('a registration whose supervisor is gone, and whose process has only its main thread gone', () => {
  it('is kept while the process runs: its descriptors are a live thread\'s to show (review r418 F2)', async () => {
    const aid = 'orphan-threads';
    // The main thread ends (pthread_exit: its leader a zombie, /proc/PID/fd
    // empty), another runs on.
    const py = 'import ctypes, threading, time; threading.Thread(target=time.sleep, args=(1000,)).start(); ctypes.CDLL(None).pthread_exit(None)';
    sb.ok(['run', '-d', '--aid', aid, '--', 'python3', '-c', py]);
    await supervised(aid);
    const app = sb.systemPid(aid);
    appPids.push(app);
    const leaderGone = () => {
      try {
        const stat = readFileSync(`/proc/${app}/stat`, 'utf8');
        const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        return fields[0] === 'Z' && Number(fields[17]) > 1;
      } catch {
        return false;
      }
    };
    await waitFor(leaderGone, 20_000, 'its main thread to end');
    const { initPid, tables } = record(aid);
    process.kill(initPid, 'SIGKILL');
    await waitFor(() => !alive(initPid), 10_000, 'its init to die');
    const running = (apps: Listed[]) => apps.filter((a) => a.aid === aid && a.state === 'running');
    expect(running((await listed()).apps)).toHaveLength(1);
    expect(existsSync(tables)).toBe(true);
    process.kill(app, 'SIGKILL');
    await waitFor(() => !existsSync(`/proc/${app}`), 10_000, 'its process to die');
    expect((await listed()).apps.filter((a) => a.aid === aid)).toEqual([]);
  });
});

describe('a foreground run whose supervisor is killed', () => {
  it('leaves the registration, tables and SysV objects to the processes of the application still running (review r418 F6)', async () => {
    const aid = 'orphan-fg';
    // The sleep holds none of the CLI's pipes: its ending is seen.
    const run = sb.start(['run', '--aid', aid, '--', 'sh', '-c', 'ipcmk -M 4096 && exec sleep 1000 >/dev/null 2>&1']);
    await run.line(/Shared memory id: \d+/);
    const { initPid, tables } = await supervised(aid);
    // The system's id (ipcmk prints the application's).
    const [shmid] = addon().readTables(tables).tables.shmid.map((e) => e.system);
    madeShm.push(shmid);
    expect(shmExists(shmid)).toBe(true);
    const app = sb.systemPid(aid);
    appPids.push(app);
    await waitFor(() => {
      try {
        return readFileSync(`/proc/${app}/cmdline`, 'utf8').startsWith('sleep\0');
      } catch {
        return false;
      }
    }, 10_000, 'its sleep to run');
    process.kill(initPid, 'SIGKILL');
    const r = await run.exited;
    expect(r.stderr).toMatch(/the supervisor of 'orphan-fg' died/);
    expect(alive(app)).toBe(true);
    expect(existsSync(join(sb.home, 'apps', aid, 'app.json'))).toBe(true);
    expect(existsSync(tables)).toBe(true);
    expect(shmExists(shmid)).toBe(true);
    process.kill(app, 'SIGKILL');
    await waitFor(() => !alive(app), 10_000, 'its process to die');
    expect((await listed()).apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(existsSync(tables)).toBe(false);
    expect(shmExists(shmid)).toBe(false);
  });
});

describe('a registration released with something other than a regular file at its tables', () => {
  const kinds: [string, string, (tables: string) => void][] = [
    ['a directory', 'orphan-dir', (tables) => mkdirSync(tables)],
    ['a symbolic link', 'orphan-link', (tables) => symlinkSync('/dev/null', tables)],
  ];
  it.each(kinds)('%s: for good, said in one line, not kept for ever (review r418 F5)', async (kind, aid, put) => {
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    await orphaned(aid);
    rmSync(tables);
    putAtTables.push(tables);
    put(tables);
    const { apps, stderr } = await listed();
    expect(apps.map((a) => a.aid)).not.toContain(aid);
    expect(stderr).toBe(
      `appshot: warning: the table file of '${aid}' is not a regular file (${kind}): its tables cannot be read; SysV objects it made, if any, are left: nothing else says which were its (ipcs lists them)\n`,
    );
    expect(existsSync(join(sb.home, 'apps', aid))).toBe(false);
  });
});

describe('the look at every process', () => {
  it('fails when a process cannot be read for want of a descriptor, rather than count it absent (review r418 F2)', () => {
    // A look from a process with one descriptor left: /proc opens, no
    // process's files do (EMFILE). It said "no process" before.
    const script = `
      import { closeSync, openSync } from 'node:fs';
      import { addon } from ${JSON.stringify(join(process.cwd(), 'dist/native.js'))};
      const a = addon();
      const fds = [];
      for (;;) try { fds.push(openSync('/dev/null', 'r')); } catch { break; }
      closeSync(fds.pop());
      try {
        const seen = a.processesFacts('/dev/null');
        process.stdout.write('seen ' + seen.length);
      } catch (e) {
        process.stdout.write('threw ' + e.code);
      }`;
    const r = spawnSync('prlimit', ['--nofile=64', '--', process.execPath, '-e', script], { encoding: 'utf8' });
    expect(r.stdout, r.stderr).toBe('threw EMFILE');
  });
});

describe('a registration whose supervisor and processes are gone, and a file of its tables\' name held elsewhere', () => {
  it("is released: a descriptor counts by the file it is, not the path its link reads (review r418 F1)", async () => {
    expect(process.getuid?.(), 'run as root: the forger is nobody').toBe(0);
    const aid = 'orphan-spoof';
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    const canonical = canonicalOf(tables);
    // Nobody, in a user and mount namespace of its own, holding a file
    // of the same path on a tmpfs of its own: from here, its descriptor's
    // link reads the table file's path.
    const forger = spawn(asNobody[0], [...asNobody.slice(1), 'unshare', '-Urm', 'sh', '-c', `mount -t tmpfs x ${dirname(canonical)} && : > ${canonical} && exec 7<>${canonical} && exec sleep 1000`], { stdio: 'ignore' });
    started.push(forger);
    const forgerPid = forger.pid!;
    await waitHoldingFd7(forgerPid, canonical, 'the forger to hold its file');
    await orphaned(aid);
    expect(alive(forgerPid)).toBe(true);
    expect((await listed()).apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(existsSync(tables)).toBe(false);
    await killed(forger);
  });
});

describe('a registration whose supervisor and processes are gone, and a process of its owner holding its table file', () => {
  it('is kept while that process holds it, opened by path in a mount namespace of its own (another mount, the same file)', async () => {
    expect(process.getuid?.(), 'run as root: unshare -m').toBe(0);
    const aid = 'orphan-ns-held';
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    const canonical = canonicalOf(tables);
    // Its mounts are copies of ours, with ids of their own; no
    // APPSHOT_TABLES in its environment.
    const holder = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `exec 7<>${canonical} && exec sleep 1000`], { stdio: 'ignore', env: { PATH: process.env.PATH } });
    started.push(holder);
    const holderPid = holder.pid!;
    await waitHoldingFd7(holderPid, canonical, 'the holder to hold the table file');
    await orphaned(aid);
    const running = (apps: Listed[]) => apps.filter((a) => a.aid === aid && a.state === 'running');
    expect(running((await listed()).apps)).toHaveLength(1);
    await killed(holder);
    expect((await listed()).apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(existsSync(tables)).toBe(false);
  });
});

describe('a registration released with a table file that is none for good', () => {
  const damages: [string, string, string, (tables: string) => void][] = [
    ['truncated', 'orphan-cut', 'was truncated', (tables) => truncateSync(tables, 0)],
    [
      'whose header was overwritten',
      'orphan-overwritten',
      'was truncated or overwritten',
      (tables) => {
        // Its size field (header offset 12): the file's size still right.
        const fd = openSync(tables, 'r+');
        writeSync(fd, Buffer.from([1, 0, 0, 0]), 0, 4, 12);
        closeSync(fd);
      },
    ],
  ];
  it.each(damages)('%s: says, in one line, that the SysV objects it made are left', async (_name, aid, how, damage) => {
    sb.ok(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'ipcmk -M 4096 && exec sleep 1000']);
    await waitFor(() => /Shared memory id: \d+/.test(sb.log(aid)), 20_000, `${aid} to make its segment`);
    const { tables } = record(aid);
    const shm = addon().readTables(tables).tables.shmid.map((e) => e.system);
    expect(shm).toHaveLength(1);
    madeShm.push(shm[0]);
    await orphaned(aid);
    damage(tables);
    const { apps, stderr } = await listed();
    expect(apps.map((a) => a.aid)).not.toContain(aid);
    expect(stderr).toBe(
      `appshot: warning: the table file of '${aid}' ${how} (by a process of the application, which holds it open read-write): its tables cannot be read; SysV objects it made, if any, are left: nothing else says which were its (ipcs lists them)\n`,
    );
    // Left, as said.
    expect(spawnSync('ipcs', ['-m', '-i', String(shm[0])]).status).toBe(0);
    expect(existsSync(tables)).toBe(false);
  });
});

describe('a port claim judged outside the ports lock', () => {
  it('is not taken when, while judged, its holder let it go and claimed it again (the same text, a live claim: review r418 F4)', () => {
    const home = mkdtempSync(join(tmpdir(), 'appshot-h421-ports-'));
    try {
      const holder = new LocalRegistry(home);
      const claimer = new LocalRegistry(home);
      const port = 31999;
      expect(holder.claimPort('held', port)).toBe(true);
      // While the claimer judges the claim it read, the holder lets the
      // port go and claims it again: the same AID and holder, so the same
      // text, and a live claim.
      const judged = claimer as unknown as { portClaimIsStale: (...args: unknown[]) => boolean };
      const judge = judged.portClaimIsStale.bind(claimer);
      judged.portClaimIsStale = (...args: unknown[]) => {
        holder.releasePort(port, 'held');
        const verdict = judge(...args);
        expect(holder.claimPort('held', port)).toBe(true);
        return verdict;
      };
      expect(claimer.claimPort('other', port)).toBe(false);
      expect(holder.portOwner(port)).toBe('held');
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});


/** `script`, a python3 program that prints "ready" once it holds what it
 * holds, then sleeps, run as nobody (/usr/bin's: nobody may not run
 * root's pyenv shims); waits for "ready". */
async function holdingAsNobody(script: string, ...args: string[]): Promise<ChildProcess> {
  const c = spawn(asNobody[0], [...asNobody.slice(1), '/usr/bin/python3', '-c', script, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(c);
  let out = '';
  c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  await waitFor(() => out.includes('ready') || c.exitCode !== null, 10_000, 'the holder to hold its descriptor');
  expect(out).toContain('ready');
  return c;
}

describe('a registration whose supervisor and processes are gone, and its table file held by another user with O_PATH', () => {
  it('is released: such a descriptor takes no permission of the file, only a search of /dev/shm (review r435 N1)', async () => {
    expect(process.getuid?.(), 'run as root: the holder is nobody').toBe(0);
    const aid = 'orphan-opath';
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    const canonical = canonicalOf(tables);
    // Root's 0600 file, the same mount and inode, opened by nobody.
    const holder = await holdingAsNobody('import os, sys, time; fd = os.open(sys.argv[1], os.O_PATH); print("ready", flush=True); time.sleep(1000)', canonical);
    await orphaned(aid);
    expect(alive(holder.pid!)).toBe(true);
    const { apps, stderr } = await listed();
    expect(apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(stderr).toBe('');
    expect(existsSync(tables)).toBe(false);
    await killed(holder);
  });
});

describe('a registration whose supervisor and processes are gone, and another user holding a descriptor whose text is a path under a table file\'s name', () => {
  it('is released, and the look says nothing: the text is never looked up (review r435 N2)', async () => {
    expect(process.getuid?.(), 'run as root: the holder is nobody').toBe(0);
    const aid = 'orphan-deleted-dir';
    sb.ok(['run', '-d', '--aid', aid, '--', 'sleep', '1000']);
    const { tables } = await supervised(aid);
    const canonical = canonicalOf(tables);
    // "/dev/shm/appshot-TAG-": the table file's name without "AID-HEX".
    const prefix = canonical.slice(0, canonical.length - aid.length - 1 - 16);
    const dir = `${prefix}h437x${process.pid}`;
    putAtTables.push(dir);
    // A descriptor of dir/f, then f and dir removed, and a file named dir
    // made: its link reads "DIR/f (deleted)", and DIR is no directory.
    const script = [
      'import os, sys, time',
      'd = sys.argv[1]; os.mkdir(d); fd = os.open(d + "/f", os.O_RDWR | os.O_CREAT, 0o600)',
      'os.unlink(d + "/f"); os.rmdir(d); os.close(os.open(d, os.O_WRONLY | os.O_CREAT, 0o600))',
      'print("ready", flush=True); time.sleep(1000)',
    ].join('\n');
    const holder = await holdingAsNobody(script, dir);
    const fds = spawnSync('ls', ['-l', `/proc/${holder.pid}/fd`], { encoding: 'utf8' }).stdout;
    expect(fds).toContain(`${dir}/f (deleted)`);
    await orphaned(aid);
    expect(alive(holder.pid!)).toBe(true);
    const { apps, stderr } = await listed();
    expect(apps.filter((a) => a.aid === aid)).toEqual([]);
    expect(stderr).toBe('');
    expect(existsSync(tables)).toBe(false);
    await killed(holder);
  });
});

describe('a fresh port whose claim cannot be judged', () => {
  it('is skipped, not the allocation failed: the look at the processes may fail on another\'s doing (review r435 N5)', () => {
    const home = mkdtempSync(join(tmpdir(), 'appshot-h437-ports-'));
    try {
      const holder = new LocalRegistry(home);
      const claimer = new LocalRegistry(home);
      const port = 31998;
      expect(holder.claimPort('held', port)).toBe(true);
      const judged = claimer as unknown as { portClaimIsStale: (...args: unknown[]) => boolean };
      judged.portClaimIsStale = () => {
        throw new Error('EMFILE reading the descriptors of /proc/1234');
      };
      expect(claimer.claimPort('other', port, { fresh: true })).toBe(false);
      expect(holder.portOwner(port)).toBe('held');
      // A port asked for by number says why it cannot be told.
      expect(() => claimer.claimPort('other', port)).toThrow(/EMFILE/);
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});

describe('pidBelongs by a held table file', () => {
  it('counts a descriptor opened read-write, not an O_PATH one of the same file (review r435 N1, holds_tables)', async () => {
    expect(process.getuid?.(), 'run as root: the O_PATH holder is nobody').toBe(0);
    const file = `/dev/shm/appshot-h437-belongs-${process.pid}`;
    putAtTables.push(file);
    closeSync(openSync(file, 'w', 0o600));
    const hold = (flags: string) => `import os, sys, time; fd = os.open(sys.argv[1], ${flags}); print("ready", flush=True); time.sleep(1000)`;
    const byPath = await holdingAsNobody(hold('os.O_PATH'), file);
    expect(addon().pidBelongs(byPath.pid!, 0, file)).toBe(false);
    await killed(byPath);
    // Root's own, as the preload opens it.
    const c = spawn('/usr/bin/python3', ['-c', hold('os.O_RDWR'), file], { stdio: ['ignore', 'pipe', 'inherit'], env: { PATH: process.env.PATH } });
    started.push(c);
    let out = '';
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await waitFor(() => out.includes('ready') || c.exitCode !== null, 10_000, 'the holder to hold the file');
    expect(addon().pidBelongs(c.pid!, 0, file)).toBe(true);
    await killed(c);
  });
});
