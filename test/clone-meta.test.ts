/**
 * A clone's calls that change a file's metadata, or make a new name, under
 * a copy-on-write rule change its private copy, never the template's
 * original, which every other clone sees: chmod, chown, utimensat,
 * setxattr, syscall(SYS_chmod), chmod of a directory, lutimes of a
 * symlink, and symlink, mkfifo and link (cowmeta.c lists them). Under a
 * REDIR PATH rule a chmod changes the instance's side.
 *
 * Also the review's cases (cowmeta.c lists them): a symlink the clone made
 * or copied up is followed by the wrappers, so a write or chmod through it
 * reaches the clone's copy, and a relative target is found beside the
 * link's own name; lchmod; what the kernel refuses (link of a directory,
 * removexattr of a missing name, lchmod of a symlink, chmod of another's
 * file without CAP_FOWNER) copies nothing; a copy made as root keeps the
 * original's owner and so never becomes a root-owned set-user-ID file.
 *
 * None of these had a wrapper: under a copy-on-write rule they reached the
 * original, so one clone's chmod changed the file for the template and
 * every other clone, and its new names appeared in the template's tree.
 */
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox, twoClones } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-clonemeta-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const data = join(dir, 'data'); // copy-on-write
const file = join(data, 'a');
const sysFile = join(data, 'b');
const sub = join(data, 'sub');
const link = join(data, 'alink');
const conf = join(dir, 'conf'); // REDIR PATH to inst/<APPL-ID>
const inst = join(dir, 'inst');
const confFile = join(conf, 'app.conf');
const MTIME = 1_000_000_000; // the fixture's utimensat and lutimes
const GID_CHANGED = 4242; // the fixture's chown, as root
const root = process.getuid!() === 0;

/** 3 more self-checks of `aid` (the fixture's first FAIL line, if any). */
const checksPass = (aid: string) => sb.checksPass(aid, 3);

/** What a metadata call may change, as seen from outside. */
function meta(path: string) {
  const s = lstatSync(path);
  return { mode: s.mode, uid: s.uid, gid: s.gid, mtimeMs: s.mtimeMs, ino: s.ino, nlink: s.nlink };
}

it('a clone changes the metadata of its own copies, never the template\'s originals', async () => {
  mkdirSync(data);
  writeFileSync(file, 'template\n');
  chmodSync(file, 0o600);
  writeFileSync(sysFile, 'template\n');
  chmodSync(sysFile, 0o600);
  mkdirSync(sub);
  chmodSync(sub, 0o755);
  symlinkSync('a', link);
  // The review's cases (cowmeta.c).
  const d = (n: string) => join(data, n);
  const outside = join(dir, 'outside');
  writeFileSync(d('r'), 'r\n');
  chmodSync(d('r'), 0o644);
  symlinkSync('r', d('rl'));
  symlinkSync('r', d('nl'));
  writeFileSync(d('r2'), 'r2\n');
  chmodSync(d('r2'), 0o600);
  symlinkSync(d('r2'), d('abs'));
  writeFileSync(d('m'), 'm\n');
  chmodSync(d('m'), 0o644);
  mkdirSync(d('d2'));
  chmodSync(d('d2'), 0o755);
  writeFileSync(join(d('d2'), 'e'), 'e\n');
  writeFileSync(d('su'), 'su\n');
  if (root) chownSync(d('su'), 65534, 65534);
  chmodSync(d('su'), 0o4755);
  mkdirSync(outside);
  chmodSync(outside, 0o755);
  writeFileSync(join(outside, 'o'), 'o\n');
  symlinkSync(`${data}/../outside`, d('outl'));
  writeFileSync(d('nest'), 'n\n');
  chmodSync(d('nest'), 0o644);
  // The second review's (cowmeta.c): a trailing '/', a relative ".." link
  // reached through a symlinked directory, a chain out of the rule and back.
  mkdirSync(d('ts'));
  chmodSync(d('ts'), 0o755);
  writeFileSync(join(d('ts'), 'e'), 'e\n');
  mkdirSync(d('rv/bin'), { recursive: true });
  mkdirSync(d('rv/lib'));
  mkdirSync(d('lib'));
  writeFileSync(d('rv/lib/app'), 'app\n');
  writeFileSync(d('lib/app'), 'decoy\n');
  symlinkSync('rv/bin', d('bin'));
  symlinkSync('../lib/app', d('rv/bin/app'));
  writeFileSync(d('r3'), 'r3\n');
  chmodSync(d('r3'), 0o644);
  symlinkSync(d('r3'), join(dir, 'outback'));
  mkdirSync(d('l'.repeat(240)));
  chmodSync(d('l'.repeat(240)), 0o755);
  symlinkSync(data + '/'.repeat(4095 - data.length - 2) + '/r', d('t4095'));
  mkdirSync(conf);
  for (const f of [confFile, ...['cmt', 'cmc-1', 'cmc-2'].map((aid) => join(inst, aid, 'app.conf'))]) {
    mkdirSync(join(f, '..'), { recursive: true });
    writeFileSync(f, `${f}\n`);
    chmodSync(f, 0o600);
  }
  const rules = join(dir, 'cowmeta.rules');
  writeFileSync(rules, `DEFINE <APPL-ID> AS PROPERTY application-id\nREDIR PATH "${conf}" TO "${inst}/<APPL-ID>"\nFILE "${data}" COPY-ON-WRITE\n`);
  sb.ok(['run', '-d', '--aid', 'cmt', '--rules', rules, '--', fixture('cowmeta'), file, sysFile, sub, link, confFile]);
  await checksPass('cmt');

  const clones = await twoClones(sb, 'cmt', dir, 'cmc');
  const before = { file: meta(file), sysFile: meta(sysFile), sub: meta(sub), link: meta(link) };
  const review = ['r', 'rl', 'nl', 'r2', 'abs', 'm', 'd2', 'su', 'outl', 'nest', 'ts', 'rv/lib/app', 'lib/app', 'r3'];
  const beforeReview = Object.fromEntries(review.map((n) => [n, meta(d(n))]));

  await sb.exercised('cmc-1', 'to change its files\' metadata');
  await checksPass('cmc-1');

  // The clone's private side holds the changes...
  const priv = (p: string) => join(clones[0].privateRoot, p);
  const copy = lstatSync(priv(file));
  expect(copy.mode & 0o7777).toBe(0o640);
  expect(copy.mtimeMs).toBe(MTIME * 1000);
  if (root) expect(copy.gid).toBe(GID_CHANGED);
  expect(statSync(priv(sysFile)).mode & 0o7777).toBe(0o640);
  expect(statSync(priv(sub)).isDirectory()).toBe(true);
  expect(statSync(priv(sub)).mode & 0o7777).toBe(0o700);
  expect(lstatSync(priv(link)).isSymbolicLink()).toBe(true);
  expect(lstatSync(priv(link)).mtimeMs).toBe(MTIME * 1000);
  expect(lstatSync(priv(`${file}.sym`)).isSymbolicLink()).toBe(true);
  expect(lstatSync(priv(`${file}.fifo`)).isFIFO()).toBe(true);
  // The new name is the clone's copy, not a second name of the original.
  expect(lstatSync(priv(`${file}.link`)).ino).toBe(copy.ino);
  expect(copy.ino).not.toBe(before.file.ino);

  // ...and the template's originals are as they were: no mode, owner,
  // times or link count changed, no new name beside them.
  expect(meta(file)).toEqual(before.file);
  expect(meta(file).mode & 0o7777).toBe(0o600);
  expect(meta(sysFile)).toEqual(before.sysFile);
  expect(meta(sub)).toEqual(before.sub);
  expect(meta(sub).mode & 0o7777).toBe(0o755);
  expect(meta(link)).toEqual(before.link);
  for (const n of ['sym', 'fifo', 'link']) expect(existsSync(`${file}.${n}`)).toBe(false);

  // Under REDIR PATH the chmod reached the instance's file, and only it.
  expect(statSync(join(inst, 'cmc-1', 'app.conf')).mode & 0o7777).toBe(0o640);
  for (const f of [confFile, join(inst, 'cmc-2', 'app.conf')]) expect(statSync(f).mode & 0o7777).toBe(0o600);

  // The review's cases: the template's files as they were, and the
  // clone's private side as the kernel would have made it.
  expect(readFileSync(file, 'utf8')).toBe('template\n');
  expect(readFileSync(priv(file), 'utf8')).toBe('template\nclone\n');
  for (const n of review) expect(meta(d(n)), n).toEqual(beforeReview[n]);
  expect(meta(d('r2')).mode & 0o7777).toBe(0o600); // chmod through abs
  expect(statSync(priv(d('r2'))).mode & 0o7777).toBe(0o640);
  expect(lstatSync(priv(d('rl'))).isSymbolicLink()).toBe(true); // lchown
  expect(statSync(priv(d('m'))).mode & 0o7777).toBe(0o600); // lchmod
  // Refused calls copied nothing: no private nl, d2 (its listing kept).
  expect(existsSync(priv(d('nl')))).toBe(false);
  expect(existsSync(priv(d('d2')))).toBe(false);
  expect(existsSync(priv(d('d2.link'))) || existsSync(d('d2.link'))).toBe(false);
  expect(readdirSync(d('d2'))).toEqual(['e']);
  // chmod through outl: the outside directory itself, not a private one.
  expect(existsSync(priv(d('outl')))).toBe(false);
  expect(statSync(outside).mode & 0o7777).toBe(0o700);
  // syscall(SYS_symlink, s, s): the name made privately, its target as given.
  expect(lstatSync(d('selfl'), { throwIfNoEntry: false })).toBeUndefined();
  expect(lstatSync(priv(d('selfl'))).isSymbolicLink()).toBe(true);
  // A copy nested in another on the same thread (a signal handler's): one
  // copy, both calls on it.
  expect(readFileSync(priv(d('nest')), 'utf8')).toBe('n\ninner\n');
  expect(statSync(priv(d('nest'))).mode & 0o7777).toBe(0o640);
  // Copies are made under temporary names and renamed into place: none left.
  expect(readdirSync(priv(data)).filter((n) => n.includes('.appshot-cow.'))).toEqual([]);
  // utime of the set-user-ID file: a copy with the original's owner.
  const su = lstatSync(priv(d('su')));
  expect(su.mode & 0o7777).toBe(0o4755);
  if (root) expect([su.uid, su.gid]).toEqual([65534, 65534]);

  // The second review's: the copies are the clone's, the originals as they were.
  expect(statSync(priv(d('ts'))).mode & 0o7777).toBe(0o700);
  expect(readFileSync(d('rv/lib/app'), 'utf8')).toBe('app\n');
  expect(readFileSync(d('lib/app'), 'utf8')).toBe('decoy\n');
  expect(readFileSync(priv(d('rv/lib/app')), 'utf8')).toBe('app\nclone\n');
  expect(existsSync(priv(d('lib/app')))).toBe(false);
  expect(statSync(priv(d('r3'))).mode & 0o7777).toBe(0o600);
  expect(statSync(priv(d('l'.repeat(240)))).mode & 0o7777).toBe(0o700);
  expect(statSync(d('l'.repeat(240))).mode & 0o7777).toBe(0o755);
  expect(lstatSync(d('l2'), { throwIfNoEntry: false })).toBeUndefined();

  // The other clone still sees the originals (mode, no xattr, no names).
  await checksPass('cmc-2');
  expect(existsSync(join(clones[1].privateRoot, file))).toBe(false);
});
