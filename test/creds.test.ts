/**
 * Credentials and limits come back exactly, per thread, and a restore never
 * gives a process more than the image recorded or more than the restoring
 * user may grant: refused by name, with nothing left behind.
 *
 * Runs as root (CI), without CAP_SYS_RESOURCE; the ordinary user is uid
 * 65534 through setpriv, as in unprivileged.test.ts.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, chownSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import type { Creds } from '../src/image/types.js';
import { validateImage } from '../src/image/validate.js';
import { CAP, credentialRefusal, filtersToInstall, inodeOwnerRefusal, type OwnCreds, peerCredRefusal } from '../src/resources/creds.js';
import { limitRefusal, parseLimits, RLIM_INFINITY, RLIMIT_NOFILE } from '../src/resources/limits.js';
import { alive, cli, fixture, Sandbox, TEST_PORTS, waitFor } from './helpers.js';

const NOBODY = 65534;
const isRoot = process.getuid!() === 0;
const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-creds-'));
chmodSync(dir, 0o755);
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const log = (aid: string) => {
  try {
    return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const checks = (aid: string) => (log(aid).match(/^CHECK \d+$/gm) ?? []).length;

/** The application's process (not its init), by system PID. */
function appPid(aid: string): number {
  const ps = sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid]);
  return ps[0].processes.find((p) => !p.init)!.pid;
}

const CRED_FIELDS = ['Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp', 'Seccomp_filters'];

/** Every thread's credentials as /proc shows them, main thread first. */
function threadCreds(pid: number): string[] {
  const tids = readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => (a === pid ? -1 : b === pid ? 1 : a - b));
  return tids.map((tid) =>
    readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8')
      .split('\n')
      .filter((l) => CRED_FIELDS.includes(l.split(':')[0]))
      .join('; '),
  );
}

const limitsOf = (pid: number) => readFileSync(`/proc/${pid}/limits`, 'utf8');

/** Waits for `more` new CHECK lines (or a FAIL) and expects no FAIL. */
async function keepsChecking(aid: string, more = 5): Promise<void> {
  const before = checks(aid);
  await waitFor(() => checks(aid) >= before + more || /FAIL/.test(log(aid)), 15_000, `${aid} to check itself`);
  expect(log(aid)).not.toMatch(/FAIL/);
}

describe.runIf(isRoot)('a server that dropped privileges, per thread', () => {
  let before: string[];
  let limits: string;

  it('comes back with every thread as it was: uids, gids, groups, capabilities, bounding set, ambient, securebits, nnp, seccomp, dumpable, limits (eager)', async () => {
    const run = sb.run(['run', '-d', '--aid', 'pd', '--', fixture('privdrop')]);
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => checks('pd') >= 3 || /FAIL/.test(log('pd')), 10_000, 'privdrop to drop and check');
    expect(log('pd')).not.toMatch(/FAIL/);
    const pid = appPid('pd');
    before = threadCreds(pid);
    limits = limitsOf(pid);
    // What the fixture made, as the kernel shows it: not root, two threads
    // with different credentials, filters on both.
    expect(before).toHaveLength(2);
    expect(before[0]).toMatch(/Uid:\s+65534\s+65534\s+65534\s+65534/);
    expect(before[1]).toMatch(/Uid:\s+1000\s+1000\s+1000\s+1000/);
    expect(before[0]).toMatch(/Seccomp_filters:\s+2/);
    const snap = sb.run(['snapshot', 'pd', '-o', join(dir, 'pd-1')]);
    expect(snap.code, snap.stderr).toBe(0);
    const restored = sb.run(['restore', join(dir, 'pd-1')]);
    expect(restored.code, restored.stderr).toBe(0);
    await keepsChecking('pd');
    const now = appPid('pd');
    expect(now).not.toBe(pid);
    expect(threadCreds(now)).toEqual(before);
    expect(limitsOf(now)).toBe(limits);
  });

  it('is not snapshotted by a root without CAP_SYS_ADMIN, which cannot read its seccomp filters: refused by name, left running', async () => {
    const pid = appPid('pd');
    const r = spawnSync('setpriv', ['--bounding-set=-sys_admin', process.execPath, cli, 'snapshot', 'pd', '-o', join(dir, 'pd-refused')], { env: sb.env, encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/process 2 \(privdrop\): its seccomp filter cannot be captured .*CAP_SYS_ADMIN.*the application was left running/);
    expect(readdirSync(dir)).not.toContain('pd-refused');
    await keepsChecking('pd');
    expect(appPid('pd')).toBe(pid);
    expect(threadCreds(pid)).toEqual(before);
  });

  it('and again with --lazy, taken from the restored one', async () => {
    const snap = sb.run(['snapshot', 'pd', '-o', join(dir, 'pd-2')]);
    expect(snap.code, snap.stderr).toBe(0);
    const restored = sb.run(['restore', join(dir, 'pd-2'), '--lazy']);
    expect(restored.code, restored.stderr).toBe(0);
    await keepsChecking('pd');
    expect(threadCreds(appPid('pd'))).toEqual(before);
    expect(limitsOf(appPid('pd'))).toBe(limits);
  });

  it('and in a clone of a template made of it', async () => {
    const snap = sb.run(['snapshot', 'pd', '-o', join(dir, 'pd-3'), '--leave-running']);
    expect(snap.code, snap.stderr).toBe(0);
    // Left running, its filters apply again (they were suspended while
    // calls were injected into it).
    await keepsChecking('pd');
    const t = sb.run(['template', 'create', join(dir, 'pd-3'), '-o', join(dir, 'pd.template')]);
    expect(t.code, t.stderr).toBe(0);
    const c = sb.run(['clone', join(dir, 'pd.template'), '--aid', 'pdc', '--count', '1']);
    expect(c.code, c.stderr).toBe(0);
    await keepsChecking('pdc');
    expect(threadCreds(appPid('pdc'))).toEqual(before);
  });
});

/** Runs appshot as uid 65534 with no capability, in a home of its own;
 * its hard RLIMIT_NOFILE at `opts.nofile` if given, and its bounding set
 * emptied unless `opts.keepBounding` (an image of a process that kept
 * root's needs root's). */
const userHome = mkdtempSync(join(tmpdir(), 'appshot-creds-user-'));
chownSync(userHome, NOBODY, NOBODY);
chmodSync(userHome, 0o755);
afterAll(() => rmSync(userHome, { recursive: true, force: true }));
function asNobody(args: string[], opts: { nofile?: number; keepBounding?: boolean } = {}): { code: number | null; stdout: string; stderr: string } {
  const env = { ...process.env, CI: '', APPSHOT_HOME: join(userHome, 'state'), APPSHOT_PORTS: TEST_PORTS };
  const bounding = opts.keepBounding ? [] : ['--bounding-set=-all'];
  const setpriv = ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', ...bounding, process.execPath, cli, ...args];
  const argv = opts.nofile ? ['sh', '-c', `ulimit -n ${opts.nofile} && exec "$@"`, 'sh', ...setpriv] : setpriv;
  const r = spawnSync(argv[0], argv.slice(1), { env, encoding: 'utf8', cwd: userHome });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Nothing of a refused restore is left: no registration, no tables. */
function nothingLeftOfNobody(): void {
  const ps = asNobody(['ps', '--json']);
  expect(ps.code, ps.stderr).toBe(0);
  expect(JSON.parse(ps.stdout)).toEqual([]);
  const apps = join(userHome, 'state', 'apps');
  expect(readdirSync(apps, { withFileTypes: true }).length, 'registrations left').toBe(0);
  // Table files are named by a hash of the registry's real path.
  const tag = createHash('sha256').update(realpathSync(join(userHome, 'state'))).digest('hex').slice(0, 8);
  expect(readdirSync('/dev/shm').filter((f) => f.startsWith(`appshot-${tag}-`))).toEqual([]);
  // No process of it: an init or seed would name the state directory.
  const procs = spawnSync('pgrep', ['-f', join(userHome, 'state')], { encoding: 'utf8' }).stdout.trim();
  expect(procs).toBe('');
}

/** The image readable by uid 65534 (it was written by root, mode 0600). */
function giveToNobody(path: string): void {
  spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, path]);
}

describe.runIf(isRoot)('the privilege rule', () => {
  it('root restoring a uid-65534 process keeps it 65534, with its limits; a process of another uid is snapshotted without CAP_SYS_RESOURCE', async () => {
    // chroot --userspec changes uid with plain setresuid (setpriv, through
    // libcap-ng, reads /proc/<getpid()>/status, which the virtual PID
    // misleads).
    const run = sb.run(['run', '-d', '--aid', 'nob', '--', 'chroot', `--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'sleep', '1000']);
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => /Uid:\s+65534/.test(readFileSync(`/proc/${appPid('nob')}/status`, 'utf8')), 10_000, 'sleep to run as 65534');
    const pid = appPid('nob');
    const creds = threadCreds(pid);
    const limits = limitsOf(pid);
    const snap = sb.run(['snapshot', 'nob', '-o', join(dir, 'nob')]);
    expect(snap.code, snap.stderr).toBe(0);
    const restored = sb.run(['restore', join(dir, 'nob')]);
    expect(restored.code, restored.stderr).toBe(0);
    const now = appPid('nob');
    expect(threadCreds(now)).toEqual(creds);
    expect(threadCreds(now)[0]).toMatch(/Uid:\s+65534\s+65534\s+65534\s+65534/);
    expect(limitsOf(now)).toBe(limits);
  });

  it('uid 65534 restoring an image of a uid-0 process is refused in one line naming process and credential, and nothing is left', async () => {
    const run = sb.run(['run', '-d', '--aid', 'rootapp', '--', 'sleep', '1000']);
    expect(run.code, run.stderr).toBe(0);
    const snap = sb.run(['snapshot', 'rootapp', '-o', join(dir, 'rootapp')]);
    expect(snap.code, snap.stderr).toBe(0);
    giveToNobody(join(dir, 'rootapp'));
    // Signed by root's key, which this user does not hold: it vouches for
    // the image itself (the privilege rule applies all the same).
    const r = asNobody(['restore', join(dir, 'rootapp'), '--trust-image']);
    expect(r.code).toBe(5);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/process 2 \(sleep\): uid 0 cannot be taken without CAP_SETUID/);
    nothingLeftOfNobody();
  });

  it('a hard limit above what the restoring user may set is refused by name', async () => {
    const hard = parseLimits(readFileSync('/proc/self/limits', 'utf8'))[RLIMIT_NOFILE].max;
    const lower = Number(hard > 4096n ? 4096n : hard - 1n);
    const run = sb.run(['run', '-d', '--aid', 'lim', '--', 'chroot', `--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'sleep', '1000']);
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => /Uid:\s+65534/.test(readFileSync(`/proc/${appPid('lim')}/status`, 'utf8')), 10_000, 'sleep to run as 65534');
    const snap = sb.run(['snapshot', 'lim', '-o', join(dir, 'lim')]);
    expect(snap.code, snap.stderr).toBe(0);
    giveToNobody(join(dir, 'lim'));
    const r = asNobody(['restore', join(dir, 'lim'), '--trust-image'], { nofile: lower, keepBounding: true });
    expect(r.code, r.stderr).toBe(5);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(`process 2 (sleep): hard limit RLIMIT_NOFILE ${hard} is above what this user may set (${lower})`);
    nothingLeftOfNobody();
    // With its own limit as high, the same user may restore it, as 65534.
    const ok = asNobody(['restore', join(dir, 'lim'), '--trust-image'], { keepBounding: true });
    expect(ok.code, ok.stderr).toBe(0);
    const ps = JSON.parse(asNobody(['ps', 'lim', '--json']).stdout)[0].processes.find((p: { init: boolean }) => !p.init);
    expect(threadCreds(ps.pid)[0]).toMatch(/Uid:\s+65534\s+65534\s+65534\s+65534/);
    asNobody(['stop', 'lim', '-s', 'KILL']);
    await waitFor(() => !alive(ps.pid), 10_000, 'the restored sleep to end');
  });
});

/** Runs credcase MODE under appshot as `aid` and waits for its checks. */
async function runCase(aid: string, mode: string): Promise<number> {
  const run = sb.run(['run', '-d', '--aid', aid, '--', fixture('credcase'), mode]);
  expect(run.code, run.stderr).toBe(0);
  await waitFor(() => checks(aid) >= 2 || /FAIL/.test(log(aid)), 10_000, `credcase ${mode} to settle`);
  expect(log(aid)).not.toMatch(/FAIL/);
  return appPid(aid);
}

/** Snapshot, restore (as root), and the same credentials in every thread. */
async function roundTrip(aid: string, mode: string): Promise<number> {
  const pid = await runCase(aid, mode);
  const before = threadCreds(pid);
  const snap = sb.run(['snapshot', aid, '-o', join(dir, aid)]);
  expect(snap.code, snap.stderr).toBe(0);
  const restored = sb.run(['restore', join(dir, aid)]);
  expect(restored.code, restored.stderr).toBe(0);
  await keepsChecking(aid, 3);
  const now = appPid(aid);
  expect(now).not.toBe(pid);
  expect(threadCreds(now)).toEqual(before);
  return now;
}

describe.runIf(isRoot)('credentials the kernel lets a restore make only in its order', () => {
  it('securebits kept after every capability is gone (SecureBits=noroot with User=)', async () => {
    const pid = await roundTrip('cc-noroot', 'noroot');
    expect(threadCreds(pid)[0]).toMatch(/Uid:\s+1000\s+1000\s+1000\s+1000.*CapPrm:\s+0+;/);
  });

  it('an inheritable capability the bounding set no longer holds (capsh --inh=cap_net_raw --drop=cap_net_raw)', async () => {
    const pid = await roundTrip('cc-inhbnd', 'inhbnd');
    expect(threadCreds(pid)[0]).toMatch(/CapInh:\s+0+2000;/);
  });

  it('an fsuid none of the other uids is, set under KEEP_CAPS before every capability went', async () => {
    const pid = await roundTrip('cc-fsuid', 'fsuid');
    expect(threadCreds(pid)[0]).toMatch(/Uid:\s+1000\s+1000\s+1000\s+2000/);
  });

  it('a filter that denies seccomp(2) itself, with a second one installed after it', async () => {
    const pid = await roundTrip('cc-nested', 'nested');
    expect(threadCreds(pid)[0]).toMatch(/Seccomp_filters:\s+2/);
  });

  it('threads that share one filter chain still share it: the application can add one with TSYNC', async () => {
    const pid = await roundTrip('cc-tsync', 'tsync');
    expect(threadCreds(pid)).toHaveLength(2);
    process.kill(pid, 'SIGUSR1');
    await waitFor(() => /^TSYNC /m.test(log('cc-tsync')), 10_000, 'the TSYNC attempt');
    expect(log('cc-tsync')).toMatch(/^TSYNC 0$/m);
    await keepsChecking('cc-tsync', 2);
  });

  it("a thread that took uid, gids and groups of its own (raw setresuid & co.) while in its root main thread's session keyring", async () => {
    // The thread keeps the process's session keyring (root's default,
    // `_uid_ses.0`, where the process has none other), which is not its
    // own uid's default: once refused as a keyring of its own (hunt 313).
    // The fixture checks that it shares the main thread's keyring still.
    const pid = await roundTrip('cc-uidthr', 'uidthread');
    // The thread fails once a mismatch outlasts three of the main
    // thread's looks: six more are past that.
    await keepsChecking('cc-uidthr', 6);
    const creds = threadCreds(pid);
    expect(creds[0]).toMatch(/Uid:\s+0\s+0\s+0\s+0; Gid:\s+0\s+0\s+0\s+0; Groups:\s*;/);
    expect(creds[1]).toMatch(/Uid:\s+1234\s+1234\s+1234\s+1234; Gid:\s+2345\s+2345\s+2345\s+2345; Groups:\s+2345\s*;/);
  });

  it('an image whose filter flags a filter never keeps (TSYNC, NEW_LISTENER, SPEC_ALLOW) is corrupt', async () => {
    await runCase('cc-flags', 'nested');
    const snap = sb.run(['snapshot', 'cc-flags', '-o', join(dir, 'cc-flags'), '--leave-running']);
    expect(snap.code, snap.stderr).toBe(0);
    const { image } = await loadImage(join(dir, 'cc-flags'), { trust: 'report' });
    const size = BigInt(statSync(join(dir, 'cc-flags', 'pages.img')).size);
    expect(() => validateImage(image, size)).not.toThrow();
    // A copy as a decoded image is: structuredClone turns its Buffers
    // (registers, which validation reads) into plain Uint8Arrays.
    const copy = () => {
      const c = structuredClone(image);
      for (const p of c.processes) for (const t of p.threads) t.regs = Buffer.from(t.regs);
      return c;
    };
    for (const flags of [1n, 4n, 8n, 16n]) {
      const bad = copy();
      bad.processes.find((p) => p.threads[0].creds?.seccompFilters.length)!.threads[0].creds!.seccompFilters[1].flags = flags;
      expect(() => validateImage(bad, size)).toThrow(/^corrupt image: .*seccomp filter flags/);
    }
    const logged = copy();
    logged.processes.find((p) => p.threads[0].creds?.seccompFilters.length)!.threads[0].creds!.seccompFilters[1].flags = 2n;
    expect(() => validateImage(logged, size)).not.toThrow();
  });
});

describe.runIf(isRoot)('an ordinary user restoring a non-dumpable process under a filter', () => {
  it('writes the filter while it may still write the process: same credentials, filter and dumpable flag', async () => {
    const pid = await runCase('cc-nobody', 'nobody');
    const before = threadCreds(pid);
    const snap = sb.run(['snapshot', 'cc-nobody', '-o', join(dir, 'cc-nobody')]);
    expect(snap.code, snap.stderr).toBe(0);
    giveToNobody(join(dir, 'cc-nobody'));
    const r = asNobody(['restore', join(dir, 'cc-nobody'), '--trust-image'], { keepBounding: true });
    expect(r.code, r.stderr).toBe(0);
    const ps = JSON.parse(asNobody(['ps', 'cc-nobody', '--json']).stdout)[0].processes.find((p: { init: boolean }) => !p.init);
    expect(threadCreds(ps.pid)).toEqual(before);
    const nlog = () => readFileSync(join(userHome, 'state', 'apps', 'cc-nobody', 'log'), 'utf8');
    const n = (nlog().match(/^CHECK \d+$/gm) ?? []).length;
    await waitFor(() => (nlog().match(/^CHECK \d+$/gm) ?? []).length >= n + 3 || /FAIL/.test(nlog()), 15_000, 'the restored credcase to check itself');
    expect(nlog()).not.toMatch(/FAIL/);
    asNobody(['stop', 'cc-nobody', '-s', 'KILL']);
    await waitFor(() => !alive(ps.pid), 10_000, 'the restored credcase to end');
  });
});

describe.runIf(isRoot)('appshot itself under a seccomp filter (a container runtime\'s profile, SystemCallFilter=)', () => {
  const wrapped = (args: string[]) => {
    const r = spawnSync(fixture('seccompwrap'), [process.execPath, cli, ...args], { env: sb.env, encoding: 'utf8', timeout: 50_000 });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };

  it('takes the filters it shares with the application as its context: snapshot and restore as they were', async () => {
    const run = wrapped(['run', '-d', '--aid', 'wrapped', '--', fixture('credcase'), 'inhbnd']);
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => checks('wrapped') >= 2 || /FAIL/.test(log('wrapped')), 10_000, 'credcase to settle');
    const pid = appPid('wrapped');
    const before = threadCreds(pid);
    expect(before[0]).toMatch(/NoNewPrivs:\s+1.*Seccomp:\s+2.*Seccomp_filters:\s+1/);
    const snap = wrapped(['snapshot', 'wrapped', '-o', join(dir, 'wrapped')]);
    expect(snap.code, snap.stderr).toBe(0);
    const restored = wrapped(['restore', join(dir, 'wrapped')]);
    expect(restored.code, restored.stderr).toBe(0);
    await keepsChecking('wrapped', 3);
    expect(threadCreds(appPid('wrapped'))).toEqual(before);
    // Restored outside that context, it would lose a filter: refused.
    const outside = sb.run(['restore', join(dir, 'wrapped'), '--aid', 'unwrapped']);
    expect(outside.code).not.toBe(0);
    expect(outside.stderr).toMatch(/process 2 \(credcase\): appshot itself runs under 0 seccomp filters, fewer than the image recorded/);
  });

  it('refuses, by that name, an application that added filters of its own, and leaves it running', async () => {
    const run = wrapped(['run', '-d', '--aid', 'wrapped-pd', '--', fixture('privdrop')]);
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => checks('wrapped-pd') >= 2 || /FAIL/.test(log('wrapped-pd')), 10_000, 'privdrop to settle');
    const pid = appPid('wrapped-pd');
    const snap = wrapped(['snapshot', 'wrapped-pd', '-o', join(dir, 'wrapped-pd')]);
    expect(snap.code).not.toBe(0);
    expect(snap.stderr).toMatch(/process 2 \(privdrop\).*appshot runs under seccomp/);
    expect(snap.stderr).not.toMatch(/CAP_SYS_ADMIN/);
    await keepsChecking('wrapped-pd', 3);
    expect(appPid('wrapped-pd')).toBe(pid);
  });
});

/* ---- the rule itself, as a pure function ------------------------------- */

const ALL = (1n << 41n) - 1n;
const bit = (c: number) => 1n << BigInt(c);
const rootCreds = (over: Partial<OwnCreds> = {}): OwnCreds => ({
  uid: [0, 0, 0, 0], gid: [0, 0, 0, 0], groups: [], capEff: ALL, capPrm: ALL, capInh: 0n, capBnd: ALL, capAmb: 0n,
  securebits: 0, noNewPrivs: false, seccomp: 0, filterCount: 0, ...over,
});
const nobody = (over: Partial<OwnCreds> = {}): OwnCreds =>
  rootCreds({ uid: [NOBODY, NOBODY, NOBODY, NOBODY], gid: [NOBODY, NOBODY, NOBODY, NOBODY], capEff: 0n, capPrm: 0n, capBnd: 0n, ...over });
const image = (own: OwnCreds, over: Partial<Creds> = {}): Creds => {
  const { filterCount: _, ...c } = own;
  return { ...c, seccompFilters: [], ...over };
};
const filter = { program: Buffer.alloc(8), flags: 0n };

describe('the parent-death signal', () => {
  it('comes back for a process that changed user (the kernel clears it when credentials change)', async () => {
    const r = sb.run(['run', '-d', '--aid', 'pdeath', '--', fixture('pdeath')]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('pdeath').includes('READY'), 10_000, 'pdeath to drop its privileges');
    const first = join(dir, 'pdeath-1');
    expect(sb.run(['snapshot', 'pdeath', '-o', first]).code).toBe(0);
    expect(sb.run(['inspect', first]).stdout).toMatch(/pdeathsig 10\b/);
    const back = sb.run(['restore', first]);
    expect(back.code, back.stderr).toBe(0);
    const second = join(dir, 'pdeath-2');
    expect(sb.run(['snapshot', 'pdeath', '-o', second, '--leave-running']).code).toBe(0);
    expect(sb.run(['inspect', second]).stdout).toMatch(/pdeathsig 10\b/);
    expect(sb.run(['rm', '-f', 'pdeath']).code).toBe(0);
  });
});

describe('the privilege rule, case by case', () => {
  it('lets anyone restore what they are, and root restore anyone', () => {
    expect(credentialRefusal(image(nobody()), nobody())).toBeUndefined();
    expect(credentialRefusal(image(nobody({ groups: [5, 6], capBnd: ALL & ~bit(CAP.SYS_ADMIN) })), rootCreds())).toBeUndefined();
    expect(credentialRefusal(image(rootCreds({ securebits: 0x10, capAmb: 0n })), rootCreds())).toBeUndefined();
  });

  it('refuses each credential an ordinary user cannot take, naming it', () => {
    const me = nobody();
    expect(credentialRefusal(image(rootCreds()), me)).toMatch(/^uid 0 cannot be taken without CAP_SETUID/);
    expect(credentialRefusal(image(me, { gid: [0, 0, 0, 0] }), me)).toMatch(/^gid 0 .*CAP_SETGID/);
    expect(credentialRefusal(image(me, { groups: [27] }), me)).toMatch(/^supplementary groups \[27\] .*CAP_SETGID/);
    expect(credentialRefusal(image(me, { capPrm: bit(10), capEff: bit(10) }), me)).toMatch(/CAP_NET_BIND_SERVICE \(permitted\)/);
    expect(credentialRefusal(image(me, { capInh: bit(10) }), me)).toMatch(/CAP_NET_BIND_SERVICE \(inheritable\)/);
    expect(credentialRefusal(image(me, { securebits: 0x10 }), me)).toMatch(/securebits 0x10 .*CAP_SETPCAP/);
  });

  it("gives a unix connection's peer only ids this user can take (resources/sockets.ts)", () => {
    const me = nobody();
    expect(peerCredRefusal({ uid: 65534, gid: 65534, groups: me.groups }, me)).toBeUndefined();
    expect(peerCredRefusal({ uid: 0, gid: 0, groups: [0, 27] }, rootCreds())).toBeUndefined();
    expect(peerCredRefusal({ uid: 0, gid: 65534, groups: me.groups }, me)).toMatch(/^uid 0 cannot be taken without CAP_SETUID/);
    expect(peerCredRefusal({ uid: 65534, gid: 0, groups: me.groups }, me)).toMatch(/^gid 0 cannot be taken without CAP_SETGID/);
    expect(peerCredRefusal({ uid: 65534, gid: 65534, groups: [...me.groups, 27] }, me)).toMatch(/^supplementary groups \[.*27\] cannot be set without CAP_SETGID/);
  });

  it('gives a pipe or a socket only an owner this user can give (fchown; resources/files.ts)', () => {
    const me = nobody();
    expect(inodeOwnerRefusal({ uid: 65534, gid: 65534 }, me)).toBeUndefined();
    expect(inodeOwnerRefusal({ uid: 33, gid: 33 }, rootCreds())).toBeUndefined();
    expect(inodeOwnerRefusal({ uid: 0, gid: 65534 }, me)).toMatch(/^owner uid 0 cannot be given without CAP_CHOWN/);
    expect(inodeOwnerRefusal({ uid: 65534, gid: 0 }, me)).toMatch(/^group 0 cannot be given without CAP_CHOWN/);
  });

  it('refuses malformed credentials rather than pass them to the kernel', () => {
    expect(credentialRefusal(image(rootCreds(), { uid: [0, 0] }), rootCreds())).toMatch(/malformed/);
    expect(credentialRefusal(image(rootCreds(), { groups: [-1] }), rootCreds())).toMatch(/malformed/);
    expect(credentialRefusal(image(rootCreds(), { seccomp: 2, seccompFilters: [{ program: Buffer.alloc(12), flags: 0n }] }), rootCreds())).toMatch(/seccomp filter is malformed/);
  });

  it('never raises the bounding set, and lowers it only with CAP_SETPCAP', () => {
    expect(credentialRefusal(image(rootCreds({ capBnd: ALL })), rootCreds({ capBnd: ALL & ~bit(CAP.SYS_RESOURCE) }))).toMatch(/bounding set holds CAP_SYS_RESOURCE/);
    const noSetpcap = rootCreds({ capEff: ALL & ~bit(CAP.SETPCAP) });
    expect(credentialRefusal(image(rootCreds({ capBnd: ALL & ~bit(16) })), noSetpcap)).toMatch(/without CAP_SYS_MODULE cannot be set without CAP_SETPCAP/);
  });

  it('cannot clear no_new_privs or lift seccomp that appshot itself runs under', () => {
    expect(credentialRefusal(image(nobody()), nobody({ noNewPrivs: true }))).toMatch(/no_new_privs is set on appshot itself/);
    expect(credentialRefusal(image(nobody({ noNewPrivs: true })), nobody({ noNewPrivs: true }))).toBeUndefined();
    expect(credentialRefusal(image(nobody()), nobody({ seccomp: 2, filterCount: 1 }))).toMatch(/runs under seccomp/);
    expect(credentialRefusal(image(nobody(), { seccomp: 2, seccompFilters: [filter], noNewPrivs: true }), nobody({ seccomp: 2, filterCount: 2 }))).toMatch(/2 seccomp filters, more than/);
  });

  it('installs a filter only where the kernel would: no_new_privs or CAP_SYS_ADMIN in the restored thread', () => {
    const filtered = { seccomp: 2, seccompFilters: [filter] };
    expect(credentialRefusal(image(nobody(), filtered), nobody())).toMatch(/neither no_new_privs nor CAP_SYS_ADMIN/);
    expect(credentialRefusal(image(nobody(), { ...filtered, noNewPrivs: true }), nobody())).toBeUndefined();
    expect(credentialRefusal(image(rootCreds(), filtered), rootCreds())).toBeUndefined();
    expect(credentialRefusal(image(nobody(), { seccomp: 2 }), rootCreds())).toMatch(/was not recorded/);
  });

  it('installs only the filters past the ones the seeds inherit from appshot, as many as the image counted as its context', () => {
    const a = { program: Buffer.alloc(8, 1), flags: 0n };
    const b = { program: Buffer.alloc(8, 2), flags: 0n };
    const want = image(nobody(), { seccomp: 2, seccompFilters: [a, b], noNewPrivs: true });
    expect(filtersToInstall(want, 0, 'p')).toEqual([a, b]);
    expect(filtersToInstall({ ...want, seccompContext: 1 }, 1, 'p')).toEqual([a, b]);
    expect(() => filtersToInstall(want, 1, 'p')).toThrow(/began with 0 filters of appshot's context, and appshot runs under 1 here/);
    expect(() => filtersToInstall(image(nobody()), 1, 'p')).toThrow(/did not record/);
    // The rule says so first, by name.
    const context = image(nobody(), { seccomp: 2, seccompFilters: [], seccompContext: 1, noNewPrivs: true });
    expect(credentialRefusal(context, nobody({ seccomp: 2, filterCount: 1, noNewPrivs: true }))).toBeUndefined();
    expect(credentialRefusal(context, nobody())).toMatch(/appshot itself runs under 0 seccomp filters, fewer than the image recorded as the context it was taken in \(1\)/);
  });

  it('an inheritable capability must be in the bounding set too', () => {
    expect(credentialRefusal(image(rootCreds({ capInh: bit(13) })), rootCreds({ capBnd: ALL & ~bit(13) }))).toMatch(/CAP_NET_RAW \(inheritable\) is not in this user's bounding set/);
    expect(credentialRefusal(image(rootCreds({ capInh: bit(13), capBnd: ALL & ~bit(13) })), rootCreds({ capInh: bit(13), capBnd: ALL & ~bit(13) }))).toBeUndefined();
  });

  it('limits: a hard limit above the user\'s own needs CAP_SYS_RESOURCE', () => {
    const own = [{ resource: RLIMIT_NOFILE, cur: 1024n, max: 4096n }];
    const want = [{ resource: RLIMIT_NOFILE, cur: 1024n, max: RLIM_INFINITY }];
    expect(limitRefusal(want, own, nobody())).toBe('hard limit RLIMIT_NOFILE unlimited is above what this user may set (4096)');
    expect(limitRefusal(want, own, rootCreds())).toBeUndefined();
    expect(limitRefusal([{ resource: RLIMIT_NOFILE, cur: 10n, max: 4096n }], own, nobody())).toBeUndefined();
  });

  it('parses /proc/PID/limits: 16 limits in RLIMIT order, unlimited as RLIM_INFINITY', () => {
    const mine = parseLimits(readFileSync('/proc/self/limits', 'utf8'));
    expect(mine).toHaveLength(16);
    expect(mine.map((l) => l.resource)).toEqual([...Array(16).keys()]);
    const nofile = spawnSync('sh', ['-c', 'ulimit -Sn; ulimit -Hn'], { encoding: 'utf8' }).stdout.trim().split('\n');
    const val = (s: string) => (s === 'unlimited' ? RLIM_INFINITY : BigInt(s));
    expect([mine[RLIMIT_NOFILE].cur, mine[RLIMIT_NOFILE].max]).toEqual(nofile.map(val));
    expect(mine[0].max).toBe(RLIM_INFINITY); // RLIMIT_CPU, unlimited here as almost everywhere
  });
});

describe('the audit login uid', () => {
  // Run from a login session (loginuid 1000) and restored from another
  // (1001), neither with CAP_AUDIT_CONTROL: as `sudo -u app appshot
  // restore`, or an image from a container restored over ssh. Setting a
  // login uid once set needs the capability; who audit says the process
  // acts for is no privilege of it, so the restore goes on and says so.
  const session = (uid: number, args: string[]) =>
    spawnSync('sh', ['-c', `echo ${uid} > /proc/self/loginuid && exec setpriv --bounding-set -audit_control "$@"`, 'sh', process.execPath, cli, ...args], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off' },
      encoding: 'utf8',
    });
  it('is kept where the restoring session may set it, and otherwise named in a warning, the restore going on', async () => {
    const run = session(1000, ['run', '-d', '--aid', 'login', '--', fixture('waiter')]);
    if (run.status !== 0 && /loginuid|Operation not permitted/.test(run.stderr)) return; // no login uid to set here
    expect(run.status, run.stderr).toBe(0);
    await waitFor(() => /READY/.test(sb.log('login')), 10_000, 'the waiter');
    expect(readFileSync(`/proc/${sb.systemPid('login')}/loginuid`, 'utf8')).toBe('1000');
    const image = join(dir, 'login.appshot');
    expect(sb.run(['snapshot', 'login', '-o', image]).code).toBe(0);
    const r = session(1001, ['restore', image]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^appshot: warning: not kept: process 2: audit login uid 1000 not set, it is 1001 \(the restoring session's\): changing it needs CAP_AUDIT_CONTROL$/m);
    expect(readFileSync(`/proc/${sb.systemPid('login')}/loginuid`, 'utf8')).toBe('1001');
    expect(sb.run(['snapshot', 'login', '-o', join(dir, 'login2.appshot')]).code).toBe(0);
    // A session that may set it (root with the capability) does.
    const back = sb.run(['restore', image, '--json']);
    expect(back.code, back.stderr).toBe(0);
    expect(JSON.parse(back.stdout).notKept).toEqual([]);
    expect(readFileSync(`/proc/${sb.systemPid('login')}/loginuid`, 'utf8')).toBe('1000');
    expect(sb.run(['rm', '-f', 'login']).code).toBe(0);
  });
});
