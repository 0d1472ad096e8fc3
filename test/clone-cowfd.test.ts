/**
 * A clone's metadata calls on a descriptor open on a copy-on-write
 * original (fchmod, fchown, fchownat, fchmodat2 and utimensat with
 * AT_EMPTY_PATH, futimesat with a NULL path, futimens, futimes,
 * fsetxattr, fremovexattr, linkat AT_EMPTY_PATH, and through syscall():
 * cowfd.c lists them) change its private copy, and the
 * descriptor moves to the copy: the same contents at the same offset, its
 * fstat showing the change. A descriptor the template opened and the
 * clone was restored with is moved the same way. The template's original
 * stays as it was (mode, owner, times, ctime, xattrs, link count), and
 * another clone keeps seeing it. What the kernel would refuse (fchmod of
 * nobody's file without CAP_FOWNER, XATTR_REPLACE of a missing name)
 * copies nothing.
 *
 * None of these had a wrapper: a read-only descriptor of an original
 * reached the template's file, so one clone's fchmod changed it for the
 * template and every other clone.
 *
 * Also the copy a clone's first write makes of a sparse original keeps its
 * holes, and one of a preallocated original its blocks (the copy filled a
 * 64 MiB file with 4 bytes in it with zeros).
 */
import { chmodSync, chownSync, closeSync, existsSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox, twoClones } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-clonecowfd-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const data = join(dir, 'data'); // copy-on-write
const d = (n: string) => join(data, n);
const TEXT = '0123456789\n';
const MTIME = 1_000_000_000; // the fixture's futimens, futimes, utimensat
const GID_CHANGED = 4242; // the fixture's fchown and fchownat, as root
const root = process.getuid!() === 0;
const FILES = ['held', 'own', 'owat', 'tn', 'tv', 'ue', 'fs', 'xs', 'xr', 'xn', 'sys', 'sys2', 'c2', 'ln', 'su'];

/** 3 more self-checks of `aid` (the fixture's first FAIL line, if any). */
const checksPass = (aid: string) => sb.checksPass(aid, 3);

/** Everything a metadata call may change, as seen from outside. */
function meta(path: string) {
  const s = lstatSync(path);
  return { mode: s.mode, uid: s.uid, gid: s.gid, mtimeMs: s.mtimeMs, ctimeMs: s.ctimeMs, ino: s.ino, nlink: s.nlink };
}

/** An xattr of `path`, as the fixture reads it outside appshot. */
function xattr(path: string, name: string): string {
  const r = spawnSync(fixture('cowfd'), ['--getxattr', path, name], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`getxattr ${path} ${name}: ${r.stdout}${r.stderr}`);
  return r.stdout.trim();
}

/** The clones the first test makes, for the second. */
let made: { aid: string; privateRoot: string }[] = [];
const SPARSE_SIZE = 64 << 20; // 4 bytes of data at half of it
const PREALLOC_SIZE = 8 << 20; // fallocate'd: unwritten blocks, no data

it('a descriptor open on an original: its metadata calls change the clone\'s copy, and it moves there', async () => {
  mkdirSync(data);
  // For the next test: in the template, copied by a clone's write.
  const fd = openSync(d('sparse'), 'wx', 0o644);
  writeSync(fd, 'data', 0, 'utf8');
  closeSync(fd);
  truncateSync(d('sparse'), SPARSE_SIZE);
  const sfd = openSync(d('sparse'), 'r+');
  writeSync(sfd, 'half', SPARSE_SIZE / 2, 'utf8');
  closeSync(sfd);
  expect(spawnSync('fallocate', ['-l', String(PREALLOC_SIZE), d('prealloc')]).status).toBe(0);
  for (const n of FILES) {
    writeFileSync(d(n), TEXT);
    chmodSync(d(n), n === 'su' ? 0o644 : 0o600);
  }
  if (root) chownSync(d('su'), 65534, 65534);
  mkdirSync(d('dir'));
  chmodSync(d('dir'), 0o755);
  writeFileSync(join(d('dir'), 'e'), 'e\n');
  expect(spawnSync('mkfifo', ['-m', '0644', d('fifo')]).status).toBe(0);
  const set = spawnSync(fixture('cowfd'), ['--setxattr', d('xr'), 'user.gone', 'x'], { encoding: 'utf8' });
  const xattrs = set.status === 0;
  if (!xattrs) expect(set.stdout.trim()).toBe('XATTR UNSUPPORTED');

  const rules = join(dir, 'cowfd.rules');
  writeFileSync(rules, `FILE "${data}" COPY-ON-WRITE\n`);
  sb.ok(['run', '-d', '--aid', 'cft', '--rules', rules, '--', fixture('cowfd'), data]);
  await checksPass('cft');
  const clones = await twoClones(sb, 'cft', dir, 'cfc');
  made = clones;

  const names = [...FILES, 'dir', 'fifo'];
  const before = Object.fromEntries(names.map((n) => [n, meta(d(n))]));
  const xattrsBefore = xattrs ? { xs: xattr(d('xs'), 'user.appshot'), xr: xattr(d('xr'), 'user.gone'), sys: xattr(d('sys'), 'user.appshot') } : {};
  if (xattrs) expect(xattrsBefore).toEqual({ xs: 'user.appshot absent', xr: 'user.gone=x', sys: 'user.appshot absent' });

  await sb.exercised('cfc-1', 'to change its files\' metadata through descriptors');
  await checksPass('cfc-1');
  const unsupported = /^XATTR UNSUPPORTED$/m.test(sb.log('cfc-1'));
  expect(unsupported).toBe(!xattrs);

  // The clone's private side holds the changes...
  const priv = (n: string) => join(clones[0].privateRoot, d(n));
  expect(statSync(priv('held')).mode & 0o7777).toBe(0o640);
  expect(statSync(priv('sys')).mode & 0o7777).toBe(0o640);
  expect(statSync(priv('c2')).mode & 0o7777).toBe(0o640);
  for (const n of ['tn', 'tv', 'ue', 'fs', 'sys2']) expect(statSync(priv(n)).mtimeMs, n).toBe(MTIME * 1000);
  if (root) for (const n of ['own', 'owat']) expect(statSync(priv(n)).gid, n).toBe(GID_CHANGED);
  if (xattrs) {
    expect(xattr(priv('xs'), 'user.appshot')).toBe('user.appshot=clone');
    expect(xattr(priv('sys'), 'user.appshot')).toBe('user.appshot=sys');
    expect(xattr(priv('xr'), 'user.gone')).toBe('user.gone absent');
  }
  // linkat's new name is a name of the clone's copy, made privately.
  expect(statSync(priv('ln.link')).ino).toBe(statSync(priv('ln')).ino);
  expect(statSync(priv('ln')).ino).not.toBe(before.ln.ino);
  expect(statSync(priv('dir')).isDirectory()).toBe(true);
  expect(statSync(priv('dir')).mode & 0o7777).toBe(0o700);
  expect(statSync(priv('fifo')).isFIFO()).toBe(true);
  expect(statSync(priv('fifo')).mode & 0o7777).toBe(0o600);
  // Refused calls copied nothing; copies left no temporary names.
  expect(existsSync(priv('xn'))).toBe(false);
  expect(existsSync(priv('su'))).toBe(false);
  expect(readdirSync(priv('.')).filter((n) => n.includes('.appshot-cow.'))).toEqual([]);

  // ...and the template's originals are as they were: no mode, owner,
  // times, ctime, link count or xattr changed, no new name beside them.
  for (const n of names) {
    // A write into a FIFO sets its times: the clone wrote into the
    // template's FIFO, used as it is; its metadata is what must not change.
    const keep = ({ mtimeMs, ctimeMs, ...m }: ReturnType<typeof meta>) => (n === 'fifo' ? m : { ...m, mtimeMs, ctimeMs });
    expect(keep(meta(d(n))), n).toEqual(keep(before[n]));
  }
  expect(existsSync(d('ln.link'))).toBe(false);
  if (xattrs) expect({ xs: xattr(d('xs'), 'user.appshot'), xr: xattr(d('xr'), 'user.gone'), sys: xattr(d('sys'), 'user.appshot') }).toEqual(xattrsBefore);

  // The other clone still sees the originals, through its restored
  // descriptor too.
  await checksPass('cfc-2');
  expect(existsSync(join(clones[1].privateRoot, data))).toBe(false);
});

it('a clone\'s first write copies a sparse original with its holes, and a preallocated one with its blocks', () => {
  const [sparse, prealloc] = [d('sparse'), d('prealloc')];
  const orig = [statSync(sparse), statSync(prealloc)];
  expect(orig[0].blocks * 512).toBeLessThan(1 << 20);
  expect(orig[1].blocks * 512).toBeGreaterThanOrEqual(PREALLOC_SIZE);
  sb.ok(['exec', made[0].aid, '--', 'sh', '-c', `printf x >> ${sparse} && printf x >> ${prealloc}`]);
  const priv = (n: string) => join(made[0].privateRoot, n);
  const s = statSync(priv(sparse));
  expect(s.size).toBe(SPARSE_SIZE + 1);
  expect(s.blocks * 512).toBeLessThan(1 << 20); // filled, it would be 64 MiB
  const at = (off: number) => {
    const b = Buffer.alloc(4);
    const f = openSync(priv(sparse), 'r');
    readSync(f, b, 0, 4, off);
    closeSync(f);
    return b.toString('utf8');
  };
  expect([at(0), at(SPARSE_SIZE / 2), at(SPARSE_SIZE - 3)]).toEqual(['data', 'half', '\0\0\0x']);
  const p = statSync(priv(prealloc));
  expect(p.size).toBe(PREALLOC_SIZE + 1);
  expect(p.blocks * 512).toBeGreaterThanOrEqual(PREALLOC_SIZE);
  // The originals are as they were.
  expect([statSync(sparse).size, statSync(prealloc).size]).toEqual([SPARSE_SIZE, PREALLOC_SIZE]);
});
