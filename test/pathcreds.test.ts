/**
 * A restore acts on the image's names as the image's process would
 * (resources/fsident.ts, addon fsident.c; review28 R3): a root restore of
 * an application that ran as nobody, or as root without CAP_DAC_OVERRIDE,
 * must not make a socket file anywhere that process could not. Before, the
 * bind (and every step after it) ran with the restorer's credentials: a
 * directory of the application swapped for a symlink to a directory only
 * root may write got the application's socket files.
 *
 * The application: sockfiles (test/fixtures/sockfiles.c), whose sockets
 * are bound by absolute and relative names in its directory.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, closeSync, copyFileSync, fchownSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, statSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import { digestFd, encodeSignedManifest } from '../src/image/format.js';
import { addon } from '../src/native.js';
import { asNobody, cli, fixture, NOBODY, Sandbox, TEST_PORTS, waitFor } from './helpers.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-pathcreds-'));
// nobody walks to its own directory under here.
chmodSync(out, 0o755);
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start, attempt } = ownedTests(sb);
const checksPass = (aid: string) => sb.checksPass(aid, 3);

// Root, without the capabilities that let root past a directory's mode.
const FILE_CAPS = '-dac_override,-dac_read_search,-fowner';
const asBoundRoot = ['setpriv', `--bounding-set=${FILE_CAPS}`, `--inh-caps=${FILE_CAPS}`, '--'];

/** The one line a refused restore printed (no stack, no second line). */
function refusal(stderr: string): string {
  const lines = stderr.trim().split('\n').filter((l) => l.trim() !== '');
  expect(lines, stderr).toHaveLength(1);
  return lines[0];
}

async function stopped(aid: string): Promise<void> {
  await run(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

describe.skipIf(process.getuid?.() !== 0)('a root restore makes an application\'s socket files as the application would', () => {
  it('of an application run as nobody: its directory swapped for a symlink to a directory only root may write is refused (EACCES), nothing made there; put back, it comes back', async () => {
    const app = join(out, 'app1');
    mkdirSync(app, { mode: 0o755 });
    chownSync(app, NOBODY, NOBODY);
    await start('pcr1', [...asNobody, fixture('sockfiles'), app]);
    await checksPass('pcr1');
    const image = join(out, 'pcr1.img');
    await run(['snapshot', 'pcr1', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcr1'), 10_000, 'pcr1 to end');

    // Planted before the restore: the application's directory is now a
    // symlink to one that only root may write.
    const rootOnly = join(out, 'rootonly1');
    mkdirSync(rootOnly, { mode: 0o755 });
    renameSync(app, `${app}.real`);
    symlinkSync(rootOnly, app);
    const r = await attempt(['restore', image]);
    expect(r.code).not.toBe(0);
    expect(refusal(r.stderr)).toMatch(/: process 2 fd \d+: binding \S+\/served\.sock\.tmp: Permission denied$/);
    expect(readdirSync(rootOnly)).toEqual([]);
    expect(sb.aids()).not.toContain('pcr1');

    // Put back: the same image comes back, its files the application's.
    unlinkSync(app);
    renameSync(`${app}.real`, app);
    for (const f of readdirSync(app)) rmSync(join(app, f));
    await run(['restore', image]);
    await checksPass('pcr1');
    expect(readdirSync(app).sort()).toEqual(['rel.sock', 'reldg.sock', 'relub.sock', 'served.sock']);
    for (const f of readdirSync(app)) expect(lstatSync(join(app, f)).uid, f).toBe(NOBODY);
    await stopped('pcr1');
  });

  it('of an application run as root without CAP_DAC_OVERRIDE: its directory given to another user is refused (EACCES), nothing made; given back, it comes back', async () => {
    const app = join(out, 'app2');
    mkdirSync(app, { mode: 0o755 });
    await start('pcr2', [...asBoundRoot, fixture('sockfiles'), app]);
    await checksPass('pcr2');
    const image = join(out, 'pcr2.img');
    await run(['snapshot', 'pcr2', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcr2'), 10_000, 'pcr2 to end');
    for (const f of readdirSync(app)) rmSync(join(app, f));

    // The directory is nobody's now: root without CAP_DAC_OVERRIDE may not
    // write it (the restorer, with it, could).
    chownSync(app, NOBODY, NOBODY);
    const r = await attempt(['restore', image]);
    expect(r.code).not.toBe(0);
    expect(refusal(r.stderr)).toMatch(/: process 2 fd \d+: binding \S+\/served\.sock\.tmp: Permission denied$/);
    expect(readdirSync(app)).toEqual([]);
    expect(sb.aids()).not.toContain('pcr2');

    chownSync(app, 0, 0);
    await run(['restore', image]);
    await checksPass('pcr2');
    expect(readdirSync(app).sort()).toEqual(['rel.sock', 'reldg.sock', 'relub.sock', 'served.sock']);
    await stopped('pcr2');
  });

  it('a file mapped shared by a process run as nobody, swapped for a symlink to a root-only file, is not mapped (review29 H3)', async () => {
    const d = join(out, 'h3');
    mkdirSync(d, { mode: 0o755 });
    chownSync(d, NOBODY, NOBODY);
    const f = join(d, 'm');
    writeFileSync(f, Buffer.alloc(4096, 'p'), { mode: 0o644 });
    chownSync(f, NOBODY, NOBODY);
    const secret = join(out, 'h3-secret');
    writeFileSync(secret, Buffer.alloc(4096, 's'), { mode: 0o600 });
    await start('pch3', [...asNobody, fixture('sharedmap'), f]);
    await waitFor(() => /READY/.test(sb.log('pch3')), 10_000, 'the file to be mapped');
    const image = join(out, 'pch3.img');
    await run(['snapshot', 'pch3', '-o', image]);
    await waitFor(() => !sb.aids().includes('pch3'), 10_000, 'pch3 to end');
    unlinkSync(f);
    symlinkSync(secret, f);
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(/process 2: mapping \S+\/h3\/m at 0x[0-9a-f]+: cannot be opened with the credentials of the process or the application's others: EACCES/);
    expect(sb.aids()).not.toContain('pch3');
    // Put back, it comes back.
    unlinkSync(f);
    writeFileSync(f, Buffer.alloc(4096, 'p'), { mode: 0o644 });
    chownSync(f, NOBODY, NOBODY);
    const again = await attempt(['restore', image]);
    expect(again.code, again.stderr).toBe(0);
    await run(['stop', 'pch3', '-s', 'KILL']);
  });

  it('a named FIFO whose name is a regular file by the restore is refused, not opened as the pipe (review29 M4)', async () => {
    const d = join(out, 'm4');
    mkdirSync(d, { mode: 0o755 });
    const fifo = join(d, 'fifo');
    await start('pcm4', ['sh', '-c', `mkfifo ${fifo} && exec 3<>${fifo} && echo READY && exec sleep 100004`]);
    await waitFor(() => /READY/.test(sb.log('pcm4')), 10_000, 'the FIFO to be opened');
    const image = join(out, 'pcm4.img');
    await run(['snapshot', 'pcm4', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcm4'), 10_000, 'pcm4 to end');
    unlinkSync(fifo);
    writeFileSync(fifo, 'not a pipe\n');
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(refusal(r.stderr)).toMatch(/the named FIFO \S+\/m4\/fifo is not a FIFO here/);
    expect(sb.aids()).not.toContain('pcm4');
    expect(readFileSync(fifo, 'utf8')).toBe('not a pipe\n');
  });

  it("a file only a worker run as nobody holds, swapped for a symlink to a root-only file, is not opened as the application's root process either (review29 H2)", async () => {
    const d = join(out, 'h2');
    mkdirSync(d, { mode: 0o755 });
    chownSync(d, NOBODY, NOBODY);
    const f = join(d, 'f');
    writeFileSync(f, 'public\n', { mode: 0o644 });
    const secret = join(out, 'h2-secret');
    writeFileSync(secret, 'only root reads this\n', { mode: 0o600 });
    // A root parent; its child, run as nobody, alone holds fd 3 on d/f.
    await start('pch2', ['sh', '-c', `${asNobody.join(' ')} sh -c 'exec 3<${f}; echo READY; exec sleep 100002' & exec sleep 100003`]);
    await waitFor(() => /READY/.test(sb.log('pch2')), 10_000, 'the worker to open its file');
    const image = join(out, 'pch2.img');
    await run(['snapshot', 'pch2', '-o', image]);
    await waitFor(() => !sb.aids().includes('pch2'), 10_000, 'pch2 to end');
    unlinkSync(f);
    symlinkSync(secret, f);
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(/fd 3: \S+\/h2\/f cannot be opened with the credentials of the process or the application's others \(fsuid 65534, fsgid 65534\): EACCES/);
    expect(sb.aids()).not.toContain('pch2');
  });
});


/**
 * Moves directory `d` into a new one only root may enter and leaves a
 * symlink to it in its place (planted after a snapshot); returns what puts
 * it back.
 */
function hideUnderRootOnly(d: string): () => void {
  const vault = mkdtempSync(join(out, 'vault-')); // 0700, root's
  renameSync(d, join(vault, 'in'));
  symlinkSync(join(vault, 'in'), d);
  return () => {
    unlinkSync(d);
    renameSync(join(vault, 'in'), d);
    rmSync(vault, { recursive: true });
  };
}

/** A refused restore left nothing: no process, no registration. */
function leftNothing(aid: string): void {
  expect(sb.aids()).not.toContain(aid);
  expect(sb.allAids()).not.toContain(aid);
}

const REFUSED_AS_NOBODY = String.raw`with the credentials of the process or the application's others \(fsuid 65534, fsgid 65534\): EACCES$`;

/** Directory image `image` as another node would hand it over: its parts
 * as they are, its manifest signed by that node's key (a fresh one),
 * which this node does not trust: restored only with --trust-image, and
 * then not taken at its word on what its processes held. */
function underAnotherKey(image: string, name: string): string {
  const dir = join(out, name);
  mkdirSync(dir);
  const digests = new Map(
    ['image.pb', 'pages.img'].map((part) => {
      copyFileSync(join(image, part), join(dir, part));
      const fd = openSync(join(dir, part), 'r');
      try {
        return [part, digestFd(fd)] as const;
      } finally {
        closeSync(fd);
      }
    }),
  );
  const home = process.env.APPSHOT_HOME;
  process.env.APPSHOT_HOME = mkdtempSync(join(out, 'another-node-'));
  try {
    writeFileSync(join(dir, 'manifest.pb'), encodeSignedManifest('feedfacefeedface', digests));
  } finally {
    if (home === undefined) delete process.env.APPSHOT_HOME;
    else process.env.APPSHOT_HOME = home;
  }
  return dir;
}

/** What is put at a held name after the snapshot: another of its kind
 * (a new inode) renamed over it, or a symlink to the original, moved
 * aside (`aside`) in the same root-only directory. */
const planted: [string, (name: string, aside: string, make: (at: string) => void) => void][] = [
  [
    'another one renamed over it',
    (name, _aside, make) => {
      make(`${name}.new`);
      renameSync(`${name}.new`, name);
    },
  ],
  ['a symlink to it', (name, aside) => symlinkSync(aside, name)],
];

/** Moves `name` aside, plants something there; returns what puts it back. */
function plant(name: string, how: (name: string, aside: string, make: (at: string) => void) => void, make: (at: string) => void): () => void {
  const aside = `${name}.orig`;
  renameSync(name, aside);
  how(name, aside, make);
  return () => {
    rmSync(name, { recursive: true, force: true });
    renameSync(aside, name);
  };
}

/** Ends `aid` (restored), and its registration. */
async function ended(aid: string): Promise<void> {
  await run(['stop', aid, '-s', 'KILL']);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  await attempt(['rm', '-f', aid]);
}

/** The one line of a restore of `image` refused (exit 5), nothing left
 * of `aid`; `what`: the case, named when it fails. */
async function refusedRestore(what: string, aid: string, image: string, line: RegExp, ...more: string[]): Promise<void> {
  const r = await attempt(['restore', image, ...more]);
  expect(r.code, `${what}: ${r.stderr}`).toBe(5);
  expect(refusal(r.stderr)).toMatch(line);
  leftNothing(aid);
}

/** A shell script in `out` (nobody reads and runs it), with `body`. */
function script(name: string, body: string): string {
  const path = join(out, name);
  writeFileSync(path, `set -u\nfail() { echo "FAIL: $*"; exit 1; }\n${body}\n`, { mode: 0o755 });
  return path;
}

// What the restored process itself did by name before its credentials
// came back (issue 12): its working and root directories, its executable,
// its inotify watches. Each is walked by the restorer as the process now.
describe.skipIf(process.getuid?.() !== 0)('a root restore walks a process\'s own names as the process (issue 12)', () => {
  it('the working directory of a process run as nobody, its directory moved under one only root may enter and a symlink left in its place, is refused (EACCES), nothing left; put back, it comes back there', async () => {
    const d = join(out, 'cwd');
    mkdirSync(join(d, 'w'), { recursive: true, mode: 0o755 });
    chownSync(d, NOBODY, NOBODY);
    chownSync(join(d, 'w'), NOBODY, NOBODY);
    await start('pccwd', ['sh', '-c', `cd ${d}/w && echo READY && exec ${asNobody.join(' ')} sleep 100005`]);
    await waitFor(() => /READY/.test(sb.log('pccwd')) && readlinkSync(`/proc/${sb.systemPid('pccwd')}/exe`).endsWith('/sleep'), 10_000, 'sleep to run in its directory');
    const image = join(out, 'pccwd.img');
    await run(['snapshot', 'pccwd', '-o', image]);
    await waitFor(() => !sb.aids().includes('pccwd'), 10_000, 'pccwd to end');
    await run(['rm', 'pccwd']);

    // The very directory is at the end of the symlink, and the image is
    // our own snapshot's: refused still, since a directory held past a
    // drop of privileges is entered only by a name with no link on it.
    const putBack = hideUnderRootOnly(d);
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(new RegExp(String.raw`process 2: working directory \S+/cwd/w cannot be reached ` + REFUSED_AS_NOBODY));
    leftNothing('pccwd');

    putBack();
    await run(['restore', image]);
    expect(readlinkSync(`/proc/${sb.systemPid('pccwd')}/cwd`)).toBe(join(d, 'w'));
    await run(['stop', 'pccwd', '-s', 'KILL']);
  });

  it("a file a process opened as root before it became nobody (lighttpd's PID file) comes back as that very file from this node's own snapshot; another file renamed over it or a symlink to it is refused, nothing left", async () => {
    // A directory only root may enter: nobody can never open d/pid itself.
    const d = mkdtempSync(join(out, 'held-'));
    const f = join(d, 'pid');
    writeFileSync(f, '', { mode: 0o644 });
    // Opened by the root shell, which then becomes nobody and writes through it.
    await start('pcheld', ['sh', '-c', `exec 3>>${f}; exec ${asNobody.join(' ')} sh -c 'echo READY; while sleep 0.05; do echo tick >&3; done'`]);
    await waitFor(() => /READY/.test(sb.log('pcheld')) && statSync(f).size > 0, 10_000, 'the process to write through its descriptor');
    const image = join(out, 'pcheld.img');
    await run(['snapshot', 'pcheld', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcheld'), 10_000, 'pcheld to end');

    await run(['restore', image]);
    // The shell (exec'd as one process: its sleeps come and go).
    const writer = () => sb.systemPid('pcheld');
    const held = statSync(`/proc/${writer()}/fd/3`, { bigint: true });
    const file = statSync(f, { bigint: true });
    expect([held.dev, held.ino]).toEqual([file.dev, file.ino]);
    expect(readFileSync(`/proc/${writer()}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}$`, 'm'));
    const size = statSync(f).size;
    await waitFor(() => statSync(f).size > size, 10_000, 'the restored process to write through it again');
    await run(['snapshot', 'pcheld', '-o', image + '2']);
    await waitFor(() => !sb.aids().includes('pcheld'), 10_000, 'pcheld to end');

    // Another file at the name (a new inode): not the one the process
    // held. A symlink to the very file: a name root would follow that
    // its d_path never had (the link-free walk; it was followed before).
    const refused = new RegExp(String.raw`process \d+ fd 3: \S+/held-\w+/pid cannot be opened ` + REFUSED_AS_NOBODY);
    for (const [what, how] of planted) {
      const putBack = plant(f, how, (at) => writeFileSync(at, 'another file\n', { mode: 0o644 }));
      await refusedRestore(what, 'pcheld', image + '2', refused);
      putBack();
    }
    // Put back, the very file: it comes back.
    await run(['restore', image + '2']);
    expect(statSync(`/proc/${sb.systemPid('pcheld')}/fd/3`).ino).toBe(statSync(f).ino);
    await ended('pcheld');
  });

  it("a log a root master opened in a directory only root may enter, held by its worker run as nobody (apache2's error log): restored, the worker writing through it", async () => {
    // The worker's name is looked at as the worker (refused: it cannot
    // enter the directory), then as the application's other identity, the
    // root master, with O_PATH. That second look failed with EINVAL
    // (openat2 takes nothing beside O_PATH that open(2) drops), and every
    // apache2 in Debian's configuration with it.
    const d = mkdtempSync(join(out, 'master-log-'));
    const f = join(d, 'error.log');
    writeFileSync(f, '', { mode: 0o640 });
    await start('pcmaster', ['sh', '-c', `exec 3>>${f}; ${asNobody.join(' ')} sh -c 'echo READY; while sleep 0.05; do echo tick >&3; done' & exec sleep 100000`]);
    await waitFor(() => /READY/.test(sb.log('pcmaster')) && statSync(f).size > 0, 10_000, 'the worker to write through its descriptor');
    const image = join(out, 'pcmaster.img');
    await run(['snapshot', 'pcmaster', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcmaster'), 10_000, 'pcmaster to end');

    await run(['restore', image]);
    // The master is process 2 (the root sh, exec'd as sleep), the worker 3.
    const worker = sb.systemPid('pcmaster', 3);
    expect(readFileSync(`/proc/${worker}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}$`, 'm'));
    expect(readFileSync(`/proc/${sb.systemPid('pcmaster')}/status`, 'utf8')).toMatch(/^Uid:\t0\t0\t0\t0$/m);
    const held = statSync(`/proc/${worker}/fd/3`, { bigint: true });
    const file = statSync(f, { bigint: true });
    expect([held.dev, held.ino]).toEqual([file.dev, file.ino]);
    const size = statSync(f).size;
    await waitFor(() => statSync(f).size > size, 10_000, 'the restored worker to write through it again');
    await stopped('pcmaster');
  });

  it("a pipe and a unix socketpair a process made as root before it became nobody keep root as owner and peer from this node's own snapshot; under another node's key they are the process's own, and the restore says so", async () => {
    await start('pcowner', [fixture('inodeowner'), 'drop']);
    await checksPass('pcowner');
    const image = join(out, 'pcowner.img');
    await run(['snapshot', 'pcowner', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcowner'), 10_000, 'pcowner to end');
    // This node's snapshot: exactly as they were (the fixture checks).
    await run(['restore', image]);
    await checksPass('pcowner');
    await run(['snapshot', 'pcowner', '-o', image + '2']);
    await waitFor(() => !sb.aids().includes('pcowner'), 10_000, 'pcowner to end');
    // Another node's: uid 0 is none of its processes' (all nobody now),
    // so neither is vouched for as root here; nor is the restore refused.
    const r = await attempt(['restore', underAnotherKey(image + '2', 'pcowner-other.img'), '--trust-image', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const notKept = (JSON.parse(r.stdout) as { notKept: string[] }).notKept.join('\n');
    expect(notKept).toMatch(/^process \d+ fd \d+: a pipe owned by uid 0 gid 0 is now uid 65534 gid 65534's, its process's \(uid 0 is none of the image's processes'\)$/m);
    expect(notKept).toMatch(/^process \d+ fd \d+: a unix socket whose peer was uid 0 gid 0 is now uid 65534 gid 65534's, its process's \(uid 0 is none of the image's processes'\)$/m);
    // As the fixture sees it: its pipe is nobody's now.
    await waitFor(() => /FAIL: the pipe is owned by uid 65534 gid 65534, not uid 0 gid 0/.test(sb.log('pcowner')), 10_000, 'the fixture to see its pipe given to nobody');
    await run(['rm', '-f', 'pcowner']);
  });

  it("a named FIFO a process opened as root in a root-only directory before it became nobody comes back as that very FIFO, each descriptor with its access and the bytes in flight, from this node's own snapshot; another FIFO renamed over it, a symlink to it, or the image under another node's key is refused (EACCES), nothing left", async () => {
    const d = mkdtempSync(join(out, 'fifo-')); // 0700, root's
    const fifo = join(d, 'fifo');
    addon().mkfifo(fifo, 0o666);
    const go = join(out, 'fifo-go');
    // As nobody: once `go` is there (after the restore), its three
    // descriptors must be the FIFO it was given ($1: device:inode), read
    // and write, read, write, the line in flight still there to read, and
    // a line written through one end read through the other.
    const checks = script(
      'fifo-checks.sh',
      `echo READY
while [ ! -e ${go} ]; do sleep 0.05; done
for fd in 3 4 5; do [ "$(stat -L -c %d:%i /proc/self/fd/$fd)" = "$1" ] || fail "fd $fd is not the FIFO"; done
mode() { flags=$(sed -n 's/^flags:[[:space:]]*//p' /proc/self/fdinfo/$1); echo $((\${flags#"\${flags%?}"} & 3)); }
[ "$(mode 3)$(mode 4)$(mode 5)" = 201 ] || fail "access modes $(mode 3)$(mode 4)$(mode 5), not 201"
read -r line <&4 || fail "nothing in flight"
[ "$line" = "in flight" ] || fail "in flight: $line"
echo "round trip" >&5
read -r line <&4 && [ "$line" = "round trip" ] || fail "round trip: $line"
echo VERDICT ok
while sleep 1; do :; done`,
    );
    // As root: opens the FIFO three ways, writes a line into it, becomes nobody.
    const opens = script('fifo-opens.sh', `exec 3<>${fifo} 4<${fifo} 5>${fifo}\necho "in flight" >&5\nexec ${asNobody.join(' ')} sh ${checks} "$(stat -c %d:%i ${fifo})"`);
    await start('pcfifo', ['sh', opens]);
    await waitFor(() => /READY/.test(sb.log('pcfifo')), 10_000, 'the FIFO to be opened');
    const image = join(out, 'pcfifo.img');
    await run(['snapshot', 'pcfifo', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcfifo'), 10_000, 'pcfifo to end');
    await attempt(['rm', '-f', 'pcfifo']);

    await run(['restore', image]);
    writeFileSync(go, '');
    await waitFor(() => /VERDICT|FAIL/.test(sb.log('pcfifo')), 10_000, 'the restored process to check its FIFO');
    expect(sb.log('pcfifo')).not.toMatch(/FAIL/);
    expect(sb.log('pcfifo')).toMatch(/^VERDICT ok$/m);
    const held = statSync(`/proc/${sb.systemPid('pcfifo')}/fd/3`, { bigint: true });
    const file = statSync(fifo, { bigint: true });
    expect([held.dev, held.ino]).toEqual([file.dev, file.ino]);
    expect(readFileSync(`/proc/${sb.systemPid('pcfifo')}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}\\t${NOBODY}$`, 'm'));
    // Restored and snapshotted again: the same FIFO, recorded again.
    const again = join(out, 'pcfifo2.img');
    await run(['snapshot', 'pcfifo', '-o', again]);
    await waitFor(() => !sb.aids().includes('pcfifo'), 10_000, 'pcfifo to end');
    await attempt(['rm', '-f', 'pcfifo']);

    const refused = new RegExp(String.raw`process \d+: the named FIFO \S+/fifo-\w+/fifo cannot be opened ` + REFUSED_AS_NOBODY);
    for (const [what, how] of planted) {
      const putBack = plant(fifo, how, (at) => addon().mkfifo(at, 0o666));
      await refusedRestore(what, 'pcfifo', again, refused);
      putBack();
      expect([what, readdirSync(d)]).toEqual([what, ['fifo']]);
    }
    await refusedRestore('under another key', 'pcfifo', underAnotherKey(again, 'pcfifo-other.img'), refused, '--trust-image');

    // The very FIFO at its name again: it comes back.
    await run(['restore', again]);
    expect(statSync(`/proc/${sb.systemPid('pcfifo')}/fd/4`, { bigint: true }).ino).toBe(file.ino);
    await run(['stop', 'pcfifo', '-s', 'KILL']);
  });

  it("the working directory a process entered as root under a root-only directory before it became nobody comes back from this node's own snapshot; another directory renamed over it, a symlink to it, or the image under another node's key is refused (EACCES), nothing left", async () => {
    const vault = mkdtempSync(join(out, 'cwdheld-')); // 0700, root's
    const w = join(vault, 'w');
    mkdirSync(w, { mode: 0o755 });
    writeFileSync(join(w, 'marker'), 'here\n', { mode: 0o644 });
    const go = join(out, 'cwdheld-go');
    // As nobody: once `go` is there, its working directory must be the
    // one it was put in ($1: device:inode), its names found from there.
    const checks = script(
      'cwdheld-checks.sh',
      `echo READY
while [ ! -e ${go} ]; do sleep 0.05; done
[ "$(stat -c %d:%i .)" = "$1" ] || fail "the working directory is not the one it entered"
[ "$(cat marker)" = here ] || fail "marker not found from the working directory"
echo VERDICT ok
while sleep 1; do :; done`,
    );
    const enters = script('cwdheld-enters.sh', `cd ${w} || exit 1\nexec ${asNobody.join(' ')} sh ${checks} "$(stat -c %d:%i .)"`);
    await start('pccwdheld', ['sh', enters]);
    await waitFor(() => /READY/.test(sb.log('pccwdheld')), 10_000, 'the process to be in its directory');
    const image = join(out, 'pccwdheld.img');
    await run(['snapshot', 'pccwdheld', '-o', image]);
    await waitFor(() => !sb.aids().includes('pccwdheld'), 10_000, 'pccwdheld to end');
    await attempt(['rm', '-f', 'pccwdheld']);

    await run(['restore', image]);
    writeFileSync(go, '');
    await waitFor(() => /VERDICT|FAIL/.test(sb.log('pccwdheld')), 10_000, 'the restored process to check its working directory');
    expect(sb.log('pccwdheld')).not.toMatch(/FAIL/);
    expect(sb.log('pccwdheld')).toMatch(/^VERDICT ok$/m);
    expect(readlinkSync(`/proc/${sb.systemPid('pccwdheld')}/cwd`)).toBe(w);
    const again = join(out, 'pccwdheld2.img');
    await run(['snapshot', 'pccwdheld', '-o', again]);
    await waitFor(() => !sb.aids().includes('pccwdheld'), 10_000, 'pccwdheld to end');
    await attempt(['rm', '-f', 'pccwdheld']);

    const refused = new RegExp(String.raw`process \d+: working directory \S+/cwdheld-\w+/w cannot be reached ` + REFUSED_AS_NOBODY);
    for (const [what, how] of planted) {
      const putBack = plant(w, how, (at) => mkdirSync(at, { mode: 0o755 }));
      await refusedRestore(what, 'pccwdheld', again, refused);
      putBack();
      expect([what, readdirSync(vault), readdirSync(w)]).toEqual([what, ['w'], ['marker']]);
    }
    await refusedRestore('under another key', 'pccwdheld', underAnotherKey(again, 'pccwdheld-other.img'), refused, '--trust-image');

    await run(['restore', again]);
    expect(readlinkSync(`/proc/${sb.systemPid('pccwdheld')}/cwd`)).toBe(w);
    await run(['stop', 'pccwdheld', '-s', 'KILL']);
  });

  it('the inotify watches of a process run as nobody, their directory moved under one only root may enter, are refused (EACCES), nothing left; put back, they come back at their numbers', async () => {
    const d = join(out, 'inot');
    mkdirSync(d, { mode: 0o755 });
    chownSync(d, NOBODY, NOBODY);
    await start('pcinot', [...asNobody, fixture('inotifies'), d]);
    await checksPass('pcinot');
    const image = join(out, 'pcinot.img');
    await run(['snapshot', 'pcinot', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcinot'), 10_000, 'pcinot to end');
    await run(['rm', 'pcinot']);

    const putBack = hideUnderRootOnly(d);
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(new RegExp(String.raw`process 2 fd \d+: its inotify watch 1 on \S+/inot/a cannot be made ` + REFUSED_AS_NOBODY));
    leftNothing('pcinot');

    putBack();
    await run(['restore', image]);
    await checksPass('pcinot');
    await sb.exercised('pcinot', 'to use its watches');
    await run(['stop', 'pcinot', '-s', 'KILL']);
  });

  it("the root directory of a process that chrooted as root and became nobody, made unreachable to nobody, comes back chrooted from this node's own snapshot; another directory renamed over it, a symlink to it, or the image under another node's key is refused (EACCES), nothing left", async () => {
    const d = join(out, 'croot');
    const root = join(d, 'root');
    mkdirSync(root, { recursive: true, mode: 0o755 });
    chmodSync(d, 0o755);
    await start('pcroot', [fixture('chrootnobody'), root]);
    await checksPass('pcroot');
    const image = join(out, 'pcroot.img');
    await run(['snapshot', 'pcroot', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcroot'), 10_000, 'pcroot to end');
    await run(['rm', 'pcroot']);

    // Nobody no longer reaches it; the process held it all the same.
    chmodSync(d, 0o700);
    await run(['restore', image]);
    await checksPass('pcroot');
    await ended('pcroot');

    const refused = new RegExp(String.raw`process 2: root directory \S+/croot/root cannot be reached ` + REFUSED_AS_NOBODY);
    for (const [what, how] of planted) {
      const putBack = plant(root, how, (at) => mkdirSync(at, { mode: 0o755 }));
      await refusedRestore(what, 'pcroot', image, refused);
      putBack();
      expect([what, readdirSync(d).sort()]).toEqual([what, ['root']]);
    }
    await refusedRestore('under another key', 'pcroot', underAnotherKey(image, 'pcroot-other.img'), refused, '--trust-image');

    // Reachable again, it comes back as before (the process's own rights).
    chmodSync(d, 0o755);
    await run(['restore', image]);
    await checksPass('pcroot');
    await run(['stop', 'pcroot', '-s', 'KILL']);
  });

  it('the executable of a process run as nobody, no longer one nobody may execute, is refused (EACCES), nothing left; executable again, it is the process\'s again', async () => {
    const d = join(out, 'exe');
    mkdirSync(d, { mode: 0o755 });
    const exe = join(d, 'sleep');
    copyFileSync('/bin/sleep', exe);
    chmodSync(exe, 0o755);
    await start('pcexe', [...asNobody, exe, '100006']);
    await waitFor(() => readlinkSync(`/proc/${sb.systemPid('pcexe')}/exe`) === exe, 10_000, 'the copy of sleep to run');
    const image = join(out, 'pcexe.img');
    await run(['snapshot', 'pcexe', '-o', image]);
    await waitFor(() => !sb.aids().includes('pcexe'), 10_000, 'pcexe to end');
    await run(['rm', 'pcexe']);

    // Readable still (its text is mapped from it), executable by root only.
    chmodSync(exe, 0o744);
    const r = await attempt(['restore', image]);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(new RegExp(String.raw`process 2: its executable \S+/exe/sleep cannot be reached and run ` + REFUSED_AS_NOBODY));
    leftNothing('pcexe');

    chmodSync(exe, 0o755);
    await run(['restore', image]);
    expect(readlinkSync(`/proc/${sb.systemPid('pcexe')}/exe`)).toBe(exe);
    await run(['stop', 'pcexe', '-s', 'KILL']);
  });

  /** A directory on a file system of its own (tmpfs) for the fanotify
   * fixture, while `fn` runs. Its mount and filesystem marks (made with
   * CAP_SYS_ADMIN, which is what these tests are about) then see its own
   * files only. On /tmp the mount mark saw every test's writes: the
   * fixture reads each event's descriptor of the file and closes it at
   * once, and a snapshot between the two took another test's file, gone
   * by the restore (a run with four workers; kinds.test did the same
   * before it got its tmpfs). Unmounted lazily, not as withTmpfs does: a
   * test that failed leaves its application, with its files open there,
   * to ownedTests' removal after this. */
  async function onOwnTmpfs(prefix: string, fn: (d: string) => Promise<void>): Promise<void> {
    const d = mkdtempSync(join(out, prefix));
    const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m,mode=0755', 'appshot-pathcreds-fanotify', d], { encoding: 'utf8' });
    expect(m.status, m.stderr).toBe(0);
    try {
      await fn(d);
    } finally {
      spawnSync('umount', ['-l', d]);
      rmSync(d, { recursive: true, force: true });
    }
  }

  it('a fanotify group made with CAP_SYS_ADMIN by a process that then dropped it from every set is refused before anything is made', () =>
    onOwnTmpfs('fan-', async (d) => {
      await start('pcfan', [fixture('fanotify'), d, 'drop-admin']);
      await checksPass('pcfan');
      const image = join(out, 'pcfan.img');
      await run(['snapshot', 'pcfan', '-o', image]);
      await waitFor(() => !sb.aids().includes('pcfan'), 10_000, 'pcfan to end');
      await run(['rm', 'pcfan']);
      const r = await attempt(['restore', image]);
      expect(r.code, r.stderr).toBe(5);
      expect(refusal(r.stderr)).toMatch(/process 2 \(fanotify\) fd 3: its fanotify group takes CAP_SYS_ADMIN, which neither the process nor the application's others hold: made with it, it would give the application more than it holds$/);
      leftNothing('pcfan');
    }));

  it('a fanotify group whose maker dropped CAP_SYS_ADMIN from every set comes back where another process of the application may still raise it (an identity differing only in its permitted set is its own)', () =>
    onOwnTmpfs('fansib-', async (d) => {
      await start('pcfansib', [fixture('fanotify'), d, 'drop-admin-sibling']);
      await checksPass('pcfansib');
      const image = join(out, 'pcfansib.img');
      await run(['snapshot', 'pcfansib', '-o', image]);
      await waitFor(() => !sb.aids().includes('pcfansib'), 10_000, 'pcfansib to end');
      await run(['rm', 'pcfansib']);
      await run(['restore', image]);
      await checksPass('pcfansib');
      await run(['stop', 'pcfansib', '-s', 'KILL']);
    }));

  it('a POSIX message queue of a process run as nobody, given to root (mode 0640) after the snapshot, is refused (EACCES), nothing left; given back, it comes back', async () => {
    const name = `/appshot-pcmq-${process.pid}`;
    try {
      await start('pcmq', [...asNobody, fixture('mqueues'), name]);
      await checksPass('pcmq');
      const image = join(out, 'pcmq.img');
      await run(['snapshot', 'pcmq', '-o', image]);
      await waitFor(() => !sb.aids().includes('pcmq'), 10_000, 'pcmq to end');
      await run(['rm', 'pcmq']);

      // The queue outlives the application: root's now, nobody may not open it.
      const q = addon().mqOpen(name, 0, 0, 0, 0);
      try {
        fchownSync(q, 0, 0);
        const r = await attempt(['restore', image]);
        expect(r.code, r.stderr).toBe(5);
        expect(refusal(r.stderr)).toMatch(new RegExp(String.raw`process 2 fd \d+: the POSIX message queue ${name}, which exists on this node, cannot be opened ` + REFUSED_AS_NOBODY));
        leftNothing('pcmq');
        fchownSync(q, NOBODY, NOBODY);
      } finally {
        closeSync(q);
      }
      await run(['restore', image]);
      await checksPass('pcmq');
      await run(['stop', 'pcmq', '-s', 'KILL']);
    } finally {
      try {
        addon().mqUnlink(name);
      } catch {
        /* not made */
      }
    }
  });
});

describe('an unprivileged user restoring its own application', () => {
  // Its own identity is the application's: setfsuid and setfsgid to ids
  // it holds, its own groups, an effective set lowered or kept, none of
  // which asks for a privilege (fsident.c). As root (CI) it is nobody,
  // through setpriv, with no capability at all.
  const root = process.getuid?.() === 0;
  const home = join(out, 'user');
  mkdirSync(home, { mode: 0o755 });
  if (root) chownSync(home, NOBODY, NOBODY);
  const appshot = (...args: string[]) => {
    const env = { ...process.env, CI: '', APPSHOT_HOME: join(home, 'state'), APPSHOT_PORTS: TEST_PORTS };
    const argv = [process.execPath, cli, ...args];
    const r = root
      ? spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', ...argv], { env, encoding: 'utf8', cwd: home })
      : spawnSync(argv[0], argv.slice(1), { env, encoding: 'utf8', cwd: home });
    return { code: r.status, stderr: r.stderr, stdout: r.stdout };
  };
  const log = (aid = 'own') => {
    try {
      return readFileSync(join(home, 'state', 'apps', aid, 'log'), 'utf8');
    } catch {
      return '';
    }
  };
  const checks = (aid = 'own') => (log(aid).match(/^CHECK \d+$/gm) ?? []).length;
  afterAll(async () => {
    for (const aid of ['own', 'ownleft', 'ownf4']) {
      appshot('stop', aid, '-s', 'KILL');
      await waitFor(() => appshot('ps', aid).code !== 0, 10_000).catch(() => undefined);
    }
    // The user's engine too, before the directory goes (review r305: one
    // left running wrote its log into a state directory being removed).
    appshot('engine', 'stop');
  });

  it('gets its socket files back where they were, made by itself', async () => {
    const app = join(home, 'app');
    mkdirSync(app, { mode: 0o755 });
    if (root) chownSync(app, NOBODY, NOBODY);
    const started = appshot('run', '-d', '--aid', 'own', '--', fixture('sockfiles'), app);
    expect(started.code, started.stderr).toBe(0);
    await waitFor(() => checks() >= 3 || /FAIL/.test(log()), 10_000, 'the app to check itself');
    const snap = appshot('snapshot', 'own', '-o', join(home, 'own.img'));
    expect(snap.code, snap.stderr).toBe(0);
    await waitFor(() => appshot('ps', 'own').code !== 0, 10_000, 'own to end');
    const restored = appshot('restore', join(home, 'own.img'));
    expect(restored.code, restored.stderr).toBe(0);
    const before = checks();
    await waitFor(() => checks() >= before + 3 || /FAIL/.test(log()), 10_000, 'the restored app to check itself');
    expect(log()).not.toMatch(/FAIL/);
    expect(readdirSync(app).sort()).toEqual(['rel.sock', 'reldg.sock', 'relub.sock', 'served.sock']);
    for (const f of readdirSync(app)) expect(lstatSync(join(app, f)).uid, f).toBe(root ? NOBODY : process.getuid!());
  });

  it('gets its removed working directory back in the mode it had (03751), its own', async () => {
    // Before, the stand-in the restore makes was 0700: leftovers.c
    // checks the mode, uid and gid of "." (issue 12).
    const app = join(home, 'left');
    mkdirSync(app, { mode: 0o755 });
    if (root) chownSync(app, NOBODY, NOBODY);
    const started = appshot('run', '-d', '--aid', 'ownleft', '--', fixture('leftovers'), app);
    expect(started.code, started.stderr).toBe(0);
    await waitFor(() => checks('ownleft') >= 3 || /FAIL/.test(log('ownleft')), 10_000, 'the app to check itself');
    const snap = appshot('snapshot', 'ownleft', '-o', join(home, 'ownleft.img'));
    expect(snap.code, snap.stderr).toBe(0);
    await waitFor(() => appshot('ps', 'ownleft').code !== 0, 10_000, 'ownleft to end');
    const restored = appshot('restore', join(home, 'ownleft.img'));
    expect(restored.code, restored.stderr).toBe(0);
    const before = checks('ownleft');
    await waitFor(() => checks('ownleft') >= before + 3 || /FAIL/.test(log('ownleft')), 10_000, 'the restored app to check itself');
    expect(/^FAIL.*$/m.exec(log('ownleft'))?.[0]).toBeUndefined();
    appshot('stop', 'ownleft', '-s', 'KILL');
    await waitFor(() => appshot('ps', 'ownleft').code !== 0, 10_000, 'ownleft to stop');
  });

  it.skipIf(!root)("gets removed working directories back that it may not give their owner (root's) or mode (0) before it is in them", async () => {
    // Review r300 (F4): one root's, removed, was refused ('was owned by
    // 0:0, which this restore cannot give it: EPERM'); one of mode 0 made
    // the process's own fchdir fail (EACCES), its mode given first. Now:
    // the first stays the restorer's, and the restore says so; the
    // second gets its mode once the process is in it.
    const parent = join(home, 'f4');
    mkdirSync(parent, { mode: 0o755 });
    chownSync(parent, NOBODY, NOBODY);
    const roots = join(parent, 'roots');
    mkdirSync(roots, { mode: 0o755 });
    const zero = join(parent, 'zero');
    const script = `(cd ${roots} && rmdir ${roots} && exec sleep 600) & mkdir ${zero} && cd ${zero} && chmod 0 . && rmdir ${zero} && exec sleep 600`;
    const started = appshot('run', '-d', '--aid', 'ownf4', '--', 'sh', '-c', script);
    expect(started.code, started.stderr).toBe(0);
    // The two sleeps (its processes' PIDs, `appshot ps`), each in a
    // removed directory: their working directories' modes and links.
    const cwds = () =>
      [...appshot('ps', 'ownf4').stdout.matchAll(/^ownf4\s+\d+\s+(\d+)\s+\d+\s+\S+\s+\d+\s+sleep 600$/gm)]
        .map(([, pid]) => {
          try {
            const st = statSync(`/proc/${pid}/cwd`);
            return `${(st.mode & 0o7777).toString(8)} ${st.uid} ${st.nlink}`;
          } catch {
            return 'gone';
          }
        })
        .sort();
    await waitFor(() => cwds().join() === '0 65534 0,755 0 0', 10_000, 'both in their removed directories');
    const snap = appshot('snapshot', 'ownf4', '-o', join(home, 'ownf4.img'));
    expect(snap.code, snap.stderr).toBe(0);
    await waitFor(() => appshot('ps', 'ownf4').code !== 0, 10_000, 'ownf4 to end');
    const restored = appshot('restore', join(home, 'ownf4.img'));
    expect(restored.code, restored.stderr).toBe(0);
    expect(restored.stderr).toMatch(/not kept: removed directory \d+ \(.*\/f4\/roots\): owned by uid 0 gid 0, which this restore may not give \(EPERM\): now uid 65534 gid 65534's/);
    // The root's one is the restorer's now: mode and links as they were.
    await waitFor(() => cwds().length === 2, 10_000, 'the restored sleeps');
    expect(cwds()).toEqual(['0 65534 0', '755 65534 0']);
    // Their stand-ins were never made where the image says they were.
    expect(readdirSync(parent)).toEqual([]);
    appshot('stop', 'ownf4', '-s', 'KILL');
    await waitFor(() => appshot('ps', 'ownf4').code !== 0, 10_000, 'ownf4 to stop');
  });
});

