/**
 * A watch or mark a retry identity makes (fsident.ts openWatchedAs, addon
 * SameAsHeldStrictly): made only on what it shows it may make it on, and
 * told in one line where it cannot show it; an engine where openat2
 * itself is refused says so, not that a credential is missing.
 *
 * The application is a root master and its uid-65534 worker (a PHP-FPM
 * pool's layout, as hostile-paths.test.ts's r375 M1 case): the worker
 * holds the inotify instance or fanotify group, its own watch or mark is
 * refused (no read permission; no CAP_SYS_ADMIN for a mount mark), and
 * the master's identity is tried after it, which must reach the very
 * inode, on the very mount, by the image's name itself. Images crafted
 * from a real snapshot of that application, signed with the sandbox's
 * key, not saying they are this node's snapshot.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { addon } from '../src/native.js';
import { FdKind, FanotifyMarkKind, type Creds, type Fd, type Image } from '../src/image/types.js';
import { writeSignedImage } from './crafted.js';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';

const NOBODY = 65534;
const isRoot = process.geteuid?.() === 0;
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-watch-identity-'));
chmodSync(out, 0o755);
process.env.APPSHOT_HOME = sb.home;

/** The application's image and its worker's vpid. */
let app: { dir: string; image: Image };
let worker: number;
/** A tmpfs of the test's own, for a mount mark. */
const mnt = join(out, 'mnt');
let mounted = false;

/** Processes whose command line names the sandbox. */
const sandboxProcesses = () => spawnSync('pgrep', ['-f', sb.home], { encoding: 'utf8' }).stdout.trim();

beforeAll(async () => {
  if (!isRoot) return;
  const aid = 'twoids';
  const r = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', `chroot --userspec=${NOBODY}:${NOBODY} --groups= / sleep 1000 & exec sleep 1000`]);
  if (r.code !== 0) throw new Error(r.stderr);
  await waitFor(() => sb.json<{ processes: { argv?: string[] }[] }[]>(['ps', aid])[0].processes.filter((q) => q.argv?.[0] === 'sleep').length === 2, 10_000, `${aid} to start`);
  const dir = join(out, 'base');
  const s = sb.run(['snapshot', aid, '-o', dir]);
  if (s.code !== 0) throw new Error(s.stderr);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  const loaded = await loadImage(dir, { trust: 'report' });
  app = { dir, image: loaded.image };
  loaded.dispose();
  worker = app.image.processes.find((q) => q.creds.uid[3] === NOBODY)!.vpid;
  expect(app.image.processes.some((q) => q.creds.uid[3] === 0)).toBe(true);
  mkdirSync(mnt);
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'mode=0755,size=1m', 'appshot-watch-identity', mnt], { encoding: 'utf8' });
  if (m.status !== 0) throw new Error(`mount: ${m.stderr}`);
  mounted = true;
});

afterAll(async () => {
  await sb.dispose();
  if (mounted) spawnSync('umount', [mnt]);
  rmSync(out, { recursive: true, force: true });
});

/** The worker's image with `fd` (a copy of a FILE descriptor of the
 * image's, made `kind` by `make`) at number 911, under `name`. */
function withWorkerFd(name: string, make: (fd: Fd) => void, creds?: (c: Creds) => void): string {
  const i = structuredClone(app.image);
  i.fromSnapshot = false;
  const fd = structuredClone(i.processes.flatMap((q) => q.fds).find((f) => f.kind === FdKind.FILE)!);
  make(fd);
  const w = i.processes.find((q) => q.vpid === worker)!;
  w.fds.push(fd);
  // The process's and each thread's (an identity is its main thread's).
  if (creds) for (const c of [w.creds, ...w.threads.map((t) => t.creds)]) if (c) creds(c);
  return writeSignedImage(join(out, name), i, app.dir);
}

/** An inotify instance watching `path` (IN_MODIFY | IN_ACCESS, 0x3). */
const inotifyOn = (name: string, path: string, creds?: (c: Creds) => void) => withWorkerFd(name, (fd) => Object.assign(fd, inotifyFd(path)), creds);
const inotifyFd = (path: string) => ({ fd: 911, kind: FdKind.INOTIFY, flags: 0o4000, path: 'anon_inode:inotify', file: -1, description: 4911, pos: 0n, inotifyWatches: [{ wd: 1, path, mask: 0x3 }] });

/** The same instance held by the master too, at the same number, one
 * open file description (as made before the fork). */
function inotifyOfBoth(name: string, path: string): string {
  const i = structuredClone(app.image);
  i.fromSnapshot = false;
  const file = i.processes.flatMap((q) => q.fds).find((f) => f.kind === FdKind.FILE)!;
  for (const q of i.processes) q.fds.push(Object.assign(structuredClone(file), inotifyFd(path)));
  return writeSignedImage(join(out, name), i, app.dir);
}

/** A fanotify group (privileged, FAN_CLOEXEC | FAN_NONBLOCK) with a mount
 * mark (FAN_MODIFY) on `path`. */
const mountMarkOn = (name: string, path: string) =>
  withWorkerFd(name, (fd) =>
    Object.assign(fd, {
      fd: 911,
      kind: FdKind.FANOTIFY,
      flags: 0o4002,
      path: 'anon_inode:[fanotify]',
      file: -1,
      description: 4911,
      pos: 0n,
      fanotify: { flags: 0x3, eventFlags: 0o100000, unprivileged: false, marks: [{ kind: FanotifyMarkKind.MOUNT, path, flags: 0, mask: 0x2, ignoredMask: 0 }] },
    }),
  );

/** `appshot restore` run by this process's child with no engine (the
 * restorer is that child: a test knob counts only in a process started
 * with APPSHOT_TEST_KNOBS=1), under `wrap` (a command its argv is given
 * to) if any. */
function restore(dir: string, aid: string | undefined, env: NodeJS.ProcessEnv = {}, wrap: string[] = []) {
  const argv = [process.execPath, cli, 'restore', dir, ...(aid ? ['--aid', aid] : [])];
  const r = spawnSync(wrap[0] ?? argv[0], [...wrap.slice(1), ...(wrap.length ? argv : argv.slice(1))], { env: { ...sb.env, APPSHOT_ENGINE: 'off', ...env }, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, stderr: r.stderr ?? '' };
}

/** A restore refused in one line matching `line`, exit `code`, with
 * nothing left. */
function refused(r: { code: number | null; stderr: string }, line: RegExp, code: number): void {
  // Restored after all (what the test is there to catch): removed, so
  // that the next test's restore of the same application is not refused
  // as already registered.
  if (r.code === 0) for (const aid of sb.aids()) for (const verb of ['kill', 'rm']) sb.run([verb, aid]);
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^appshot: /);
  expect(lines[0]).not.toMatch(/internal error/);
  expect(lines[0]).toMatch(line);
  expect(r.code, r.stderr).toBe(code);
  expect(sb.aids()).toEqual([]);
  expect(sandboxProcesses()).toBe('');
}

/** A restore that succeeds; `check` given the worker's pid; removed after. */
function restored(r: { code: number | null; stderr: string }, aid: string, check: (pid: number) => void): void {
  expect(r.code, r.stderr).toBe(0);
  try {
    const pid = sb.systemPid(aid, worker);
    expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\t${NOBODY}\\t`, 'm'));
    check(pid);
  } finally {
    sb.run(['kill', aid]);
    sb.run(['rm', aid]);
  }
}

/** The mount id of `path` (a mount point), as mountinfo gives it. */
function mountIdOf(path: string): number {
  const line = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l.split(' ')[4] === path)
    .at(-1);
  if (!line) throw new Error(`${path} is not a mount point`);
  return Number(line.split(' ')[0]);
}

const knobs = (mntId: string) => ({ APPSHOT_TEST_KNOBS: '1', APPSHOT_TEST_MNT_ID: mntId });

describe.runIf(isRoot)("a mount mark a retry identity makes: on the very mount, shown by statx's mount id or fdinfo's, refused where neither tells (r379 L1)", () => {
  const marked = (pid: number) => expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^fanotify mnt_id:${mountIdOf(mnt).toString(16)} `, 'm'));

  it("restores the worker's mount mark, made as the master, on the tmpfs it names (statx)", () => {
    restored(restore(mountMarkOn('mark-statx', mnt), 'markstatx'), 'markstatx', marked);
  });

  it("restores it where the retry's mount id is read from /proc/self/fdinfo, checked against statx's of the holder's walk", () => {
    restored(restore(mountMarkOn('mark-fdinfo', mnt), 'markfdinfo', knobs('fdinfo')), 'markfdinfo', marked);
  });

  it('refuses it in one line, exit 5, where neither tells a mount id, and leaves nothing', () => {
    const r = restore(mountMarkOn('mark-none', mnt), undefined, knobs('none'));
    refused(r, new RegExp(`process ${worker} fd 911: its fanotify mount mark on ${mnt} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EPERM \\(another identity reaches it, but this kernel tells no mount id \\(statx STATX_MNT_ID, Linux 5\\.8, nor /proc/self/fdinfo\\) by which to show the mark would be on the very mount\\)$`), 5);
  });

  it('ignores the knob in a process not started with APPSHOT_TEST_KNOBS=1', () => {
    restored(restore(mountMarkOn('mark-noknobs', mnt), 'marknoknobs', { APPSHOT_TEST_KNOBS: '', APPSHOT_TEST_MNT_ID: 'none' }), 'marknoknobs', marked);
  });

  it("still restores an inotify watch made as the master under APPSHOT_TEST_MNT_ID=none: the knob refuses marks of a mount, never an inode's watch, whose mount statx's ids still compare", () => {
    const secret = join(out, 'inode-secret');
    writeFileSync(secret, 'root only\n', { mode: 0o600 });
    const ino = statSync(secret).ino.toString(16);
    restored(restore(inotifyOn('inotify-none', secret), 'inotifynone', knobs('none')), 'inotifynone', (pid) => {
      expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${ino} `, 'm'));
    });
  });
});

describe.runIf(isRoot)('a watch a retry identity makes on a file of more than one hard link: only one the holder owns or may read (r379 L2)', () => {
  const knob = '/proc/sys/fs/protected_hardlinks';
  let tree: string;
  beforeAll(() => {
    tree = mkdtempSync(join(out, 'links-'));
    chmodSync(tree, 0o755);
    mkdirSync(join(tree, 'hidden'), { mode: 0o711 });
    chmodSync(join(tree, 'hidden'), 0o711);
    writeFileSync(join(tree, 'hidden', 'secret'), 'root only\n', { mode: 0o600 });
    mkdirSync(join(tree, 'w'));
    chownSync(join(tree, 'w'), NOBODY, NOBODY);
  });

  /** `target` hard-linked at `link` by the worker's user, as
   * fs.protected_hardlinks=0 lets them; false where that knob cannot be
   * written here. The knob is the host's: flipped for the one `ln` and
   * put back in `finally` (a test killed in between would leave it 0). */
  function linkAsWorker(target: string, link: string): boolean {
    let before: string;
    try {
      before = readFileSync(knob, 'utf8').trim();
      writeFileSync(knob, '0');
    } catch {
      return false;
    }
    try {
      const ln = spawnSync('chroot', [`--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'ln', target, link], { encoding: 'utf8' });
      expect(ln.status, ln.stderr).toBe(0);
    } finally {
      writeFileSync(knob, before);
    }
    expect(statSync(link).nlink).toBe(2);
    return true;
  }
  const noKnob = `${knob} cannot be written here: the worker's user could not make the link`;

  it("refuses the worker's watch on a root-only file its user hard-linked into its own directory, in one line, and leaves nothing", (ctx) => {
    const link = join(tree, 'w', 'mine');
    if (!linkAsWorker(join(tree, 'hidden', 'secret'), link)) return ctx.skip(noKnob);
    const r = restore(inotifyOn('hardlink-planted', link), undefined);
    refused(r, new RegExp(`process ${worker} fd 911: its inotify watch 1 on ${link} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EACCES \\(another identity reaches it, but it is a file of 2 hard links, of uid 0, which the holder neither owns nor may read: a link its user may have made\\)$`), 5);
  });

  it("refuses it on a file others may read by its mode but an ACL refuses the worker (user:65534:---), hard-linked by the worker's user (r392 F1)", (ctx) => {
    if (spawnSync('setfacl', ['--version']).error) return ctx.skip('setfacl is not installed (Debian package acl: bash test/prerequisites.sh)');
    const target = join(tree, 'hidden', 'acl-secret');
    writeFileSync(target, 'not for nobody\n', { mode: 0o644 });
    chmodSync(target, 0o644);
    const acl = spawnSync('setfacl', ['-m', `u:${NOBODY}:---`, target], { encoding: 'utf8' });
    if (acl.status !== 0) return ctx.skip(`${tmpdir()} keeps no POSIX ACL here: ${acl.stderr.trim()}`);
    // Its mode bits still say others may read it: only the ACL refuses.
    expect(statSync(target).mode & 0o777).toBe(0o644);
    const link = join(tree, 'w', 'acl-mine');
    if (!linkAsWorker(target, link)) return ctx.skip(noKnob);
    const r = restore(inotifyOn('hardlink-acl', link), undefined);
    refused(r, new RegExp(`process ${worker} fd 911: its inotify watch 1 on ${link} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EACCES \\(another identity reaches it, but it is a file of 2 hard links, of uid 0, which the holder does not own, and whose access ACL \\(or a filesystem that could not show it has none\\) may refuse the holder what its mode bits grant: a link its user may have made\\)$`), 5);
  });

  // The link count is not all: one link, and still a name the worker's
  // user gave a file they may not read. The retry is refused where a
  // directory on the way is theirs to change (addon MayHavePlaced).
  const placed = (path: string, dir: string, kind: 'file' | 'directory' = 'file') =>
    new RegExp(
      `process ${worker} fd 911: its inotify watch 1 on ${path} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EACCES \\(another identity reaches it, but it is a ${kind} of uid 0, which the holder is not shown to own or read, under ${dir}, a directory its user may change: a name its user may have given it \\(${kind === 'file' ? 'a file renamed there, or linked there and its first name removed' : 'a directory renamed there'}\\)\\)$`,
    );

  /** `from` renamed to `to` by the worker's user (no groups). */
  function mvAsWorker(from: string, to: string): void {
    const mv = spawnSync('chroot', [`--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'mv', from, to], { encoding: 'utf8' });
    expect(mv.status, mv.stderr).toBe(0);
  }

  // A directory cannot be hard-linked but can be renamed, and a rename
  // within one parent asks no right on the directory moved: a root
  // watch on it would report the names made in it (r415 F1).
  it("refuses the worker's watch on a root 0700 directory its user renamed within a directory it may write (r415 F1)", () => {
    const shared = join(tree, 'dshared');
    mkdirSync(shared);
    chmodSync(shared, 0o777);
    const own = join(shared, 'private');
    mkdirSync(own);
    chmodSync(own, 0o700);
    const watched = join(shared, 'watched');
    mvAsWorker(own, watched);
    expect(statSync(watched)).toMatchObject({ uid: 0, mode: 0o40700 });
    refused(restore(inotifyOn('dir-renamed', watched), undefined), placed(watched, shared, 'directory'), 5);
  });

  it("refuses the worker's watch on a root-only file its user renamed into its own directory, of one link (r392 F6)", () => {
    const shared = join(tree, 'shared');
    mkdirSync(shared);
    chmodSync(shared, 0o777);
    const target = join(shared, 'root-file');
    writeFileSync(target, 'root only\n', { mode: 0o600 });
    const moved = join(tree, 'w', 'renamed');
    const mv = spawnSync('chroot', [`--userspec=${NOBODY}:${NOBODY}`, '--groups=', '/', 'mv', target, moved], { encoding: 'utf8' });
    expect(mv.status, mv.stderr).toBe(0);
    expect(statSync(moved)).toMatchObject({ nlink: 1, uid: 0 });
    refused(restore(inotifyOn('renamed-planted', moved), undefined), placed(moved, join(tree, 'w')), 5);
  });

  it("refuses it on a root-only file its user hard-linked into its own directory, whose first name was removed since (r392 F6)", (ctx) => {
    const target = join(tree, 'hidden', 'secret-gone');
    writeFileSync(target, 'root only\n', { mode: 0o600 });
    const link = join(tree, 'w', 'orphan');
    if (!linkAsWorker(target, link)) return ctx.skip(noKnob);
    rmSync(target);
    expect(statSync(link).nlink).toBe(1);
    refused(restore(inotifyOn('orphan-planted', link), undefined), placed(link, join(tree, 'w')), 5);
  });

  /** A root 0600 file `tree/<dir>/<...>/secret` under directories made
   * by `make` (each [name, mode]), root's. */
  function secretUnder(dirs: [string, number][]): string {
    let at = tree;
    for (const [name, mode] of dirs) {
      at = join(at, name);
      mkdirSync(at);
      chmodSync(at, mode);
    }
    const secret = join(at, 'secret');
    writeFileSync(secret, 'root only\n', { mode: 0o600 });
    return secret;
  }
  const watchedIno = (path: string) => (pid: number) => expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${statSync(path).ino.toString(16)} `, 'm'));
  const noAcl = (ctx: { skip: (why: string) => void }, dir: string, entry: string): boolean => {
    if (spawnSync('setfacl', ['--version']).error) return ctx.skip('setfacl is not installed (Debian package acl: bash test/prerequisites.sh)'), true;
    const acl = spawnSync('setfacl', ['-m', entry, dir], { encoding: 'utf8' });
    if (acl.status !== 0) return ctx.skip(`${tmpdir()} keeps no POSIX ACL here: ${acl.stderr.trim()}`), true;
    return false;
  };

  // A sticky directory further up that is not the worker's: there its
  // user renames only what is theirs (check_sticky), so it counts for
  // nothing. Not left to /tmp's being sticky (TMPDIR may be elsewhere).
  it("restores the worker's watch, made as the master, on a root-only file under a sticky 1777 directory further up (r392 F6)", () => {
    const secret = secretUnder([['sticky', 0o1777], ['closed', 0o755]]);
    restored(restore(inotifyOn('sticky-up', secret), 'stickyup'), 'stickyup', watchedIno(secret));
  });

  // With CAP_FOWNER the sticky bit binds nothing (8de0e1c7), nor is any
  // directory kept from it (it may chmod one): refused at the first, "/".
  it('refuses it, through the same sticky directory, for a worker with CAP_FOWNER (8de0e1c7)', () => {
    const secret = secretUnder([['sticky-fowner', 0o1777], ['closed', 0o755]]);
    const fowner = 1n << 3n;
    const r = restore(inotifyOn('sticky-fowner', secret, (c) => Object.assign(c, { capEff: c.capEff | fowner, capPrm: c.capPrm | fowner })), undefined);
    refused(r, placed(secret, '/'), 5);
  });

  // A directory the worker may change through a supplementary group of
  // its own (the process's ids, as the image recorded them).
  it("refuses it under a root:4242 0770 directory for a worker in group 4242", () => {
    const secret = secretUnder([['grouped', 0o770]]);
    chownSync(join(tree, 'grouped'), 0, 4242);
    const r = restore(inotifyOn('grouped', secret, (c) => Object.assign(c, { groups: [4242] })), undefined);
    refused(r, placed(secret, join(tree, 'grouped')), 5);
  });

  // An access ACL is evaluated, not refused on sight (r415 F3): one that
  // grants another user alone leaves the directory closed to the worker.
  it("restores it under a root 0755 directory whose access ACL grants another user only (r415 F3)", (ctx) => {
    const secret = secretUnder([['acl-other', 0o755]]);
    if (noAcl(ctx, join(tree, 'acl-other'), 'u:1234:rwx')) return;
    restored(restore(inotifyOn('acl-other', secret), 'aclother'), 'aclother', watchedIno(secret));
  });

  it("refuses it under a root 0755 directory whose access ACL lets the worker's user change it, and says so (r415 F3)", (ctx) => {
    const secret = secretUnder([['acl-worker', 0o755]]);
    const dir = join(tree, 'acl-worker');
    if (noAcl(ctx, dir, `u:${NOBODY}:rwx`)) return;
    const r = restore(inotifyOn('acl-worker', secret), undefined);
    refused(r, new RegExp(`EACCES \\(another identity reaches it, but it is a file of uid 0, which the holder is not shown to own or read, under ${dir}, a directory whose access ACL lets its user change it: a name its user may have given it \\(a file renamed there, or linked there and its first name removed\\)\\)$`), 5);
  });

  // The mode's group bits are the ACL's mask, and where they are empty
  // the kernel reads no ACL at all (acl_permission_check's
  // `mode & S_IRWXG`): a named user not in the owning group gets the
  // others' bits. Here they grant the worker's user the directory, whose
  // ACL entry for it is masked to nothing (r426 F1).
  it("refuses it under a root 0707 directory whose ACL names the worker's user but whose mask (group bits) is empty (r426 F1)", (ctx) => {
    const dir = join(tree, 'acl-masked');
    mkdirSync(dir);
    chmodSync(dir, 0o707);
    if (noAcl(ctx, dir, `u:${NOBODY}:rwx`)) return;
    chmodSync(dir, 0o707);
    const getfacl = spawnSync('getfacl', ['-cnp', dir], { encoding: 'utf8' });
    expect(getfacl.stdout).toMatch(new RegExp(`^user:${NOBODY}:rwx\\s+#effective:---$`, 'm'));
    expect(getfacl.stdout).toMatch(/^mask::---$/m);
    const orig = join(dir, 'orig');
    writeFileSync(orig, 'root only\n', { mode: 0o600 });
    const watched = join(dir, 'watched');
    mvAsWorker(orig, watched);
    expect(statSync(watched)).toMatchObject({ uid: 0, mode: 0o100600 });
    refused(restore(inotifyOn('acl-masked', watched), undefined), placed(watched, dir), 5);
  });

  // A filesystem that keeps no ACL answers EOPNOTSUPP for one: sysfs,
  // procfs, squashfs are judged by their modes, not refused on sight
  // (r415 F3). /sys and /sys/kernel are root's 0555 and 0755.
  it("restores it on a root-only sysfs file, whose directories on the way keep no ACL (r415 F3)", (ctx) => {
    const slab = '/sys/kernel/slab';
    const dir = (() => {
      try {
        return readdirSync(slab).find((n) => lstatSync(join(slab, n)).isDirectory() && (statSync(join(slab, n, 'align')).mode & 0o777) === 0o400);
      } catch {
        return undefined;
      }
    })();
    if (!dir) return ctx.skip(`no ${slab}/*/align of mode 0400 here`);
    const file = join(slab, dir, 'align');
    restored(restore(inotifyOn('sysfs-file', file), 'sysfsfile'), 'sysfsfile', watchedIno(file));
  });

  // An instance made before the fork, held by the master and the worker:
  // each process's descriptor comes back as an instance of its own, its
  // watches made with its own identity first, so the worker's is held to
  // a retry's rules however the master's was made (r392 F12: the
  // master's walk, which follows a symlink the worker's user put on the
  // way, makes a watch whose events reach the master alone).
  it("restores an instance the master and the worker both held as two, each watching the master's root-only file (r392 F12)", () => {
    // One of its own: `secret` has the worker's link (the first test).
    const secret = join(tree, 'hidden', 'both-secret');
    writeFileSync(secret, 'root only\n', { mode: 0o600 });
    restored(restore(inotifyOfBoth('both-hold', secret), 'bothhold'), 'bothhold', (pid) => {
      const ino = statSync(secret).ino.toString(16);
      const master = sb.systemPid('bothhold', app.image.processes.find((q) => q.vpid !== worker)!.vpid);
      for (const q of [master, pid]) expect(readFileSync(`/proc/${q}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${ino} `, 'm'));
      expect(addon().descriptionGroups([master, pid], [911, 911])).toEqual([0, 1]);
    });
  });

  it("refuses the worker's watch of such an instance through a symlink its user put on the way, which the master's own walk follows (r392 F12)", () => {
    const dirlink = join(tree, 'w', 'dirlink');
    symlinkSync(join(tree, 'hidden'), dirlink);
    const path = join(dirlink, 'secret');
    refused(restore(inotifyOfBoth('both-symlink', path), undefined), new RegExp(`process ${worker} fd 911: its inotify watch 1 on ${path} cannot be made with the credentials of the process or the application's others \\(fsuid 65534, fsgid 65534\\): EACCES$`), 5);
  });

  it("still restores the worker's watch, made as the master, on a file of two links the worker owns but may not read", () => {
    const own = join(tree, 'w', 'own');
    writeFileSync(own, 'write only\n');
    chownSync(own, NOBODY, NOBODY);
    chmodSync(own, 0o200);
    spawnSync('ln', [own, join(tree, 'w', 'own2')]);
    const st = statSync(own);
    expect(st.nlink).toBe(2);
    restored(restore(inotifyOn('hardlink-own', own), 'hardlinkown'), 'hardlinkown', (pid) => {
      expect(readFileSync(`/proc/${pid}/fdinfo/911`, 'utf8')).toMatch(new RegExp(`^inotify wd:1 ino:${st.ino.toString(16)} `, 'm'));
    });
  });
});

describe.runIf(isRoot && process.arch === 'x64')('a restorer whose openat2 a seccomp filter refuses (r375 L1)', () => {
  for (const err of ['EPERM', 'ENOSYS'])
    it(`says so in one line, not as a credential refused, when openat2 answers ${err}, and leaves nothing`, () => {
      const dir = inotifyOn(`seccomp-${err}`, out);
      const r = { ...restore(dir, undefined, {}, [fixture('noopenat2'), err]), dir };
      const how = err === 'EPERM' ? 'openat2 is blocked on this system \\(seccomp\\?\\)' : 'openat2 is missing or blocked on this system \\(Linux < 5\\.6, or seccomp\\?\\)';
      // The first of the image's names opened: a file it maps.
      refused(r, new RegExp(`^appshot: cannot restore ${r.dir}: ${how}: /\\S+, which the image maps, cannot be restored safely without it \\(a restore opens an image's names only through openat2\\)$`), 1);
    });
});
