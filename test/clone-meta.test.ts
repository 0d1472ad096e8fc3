/**
 * A clone's calls that change a file's metadata, or make a new name, under
 * a copy-on-write rule change its private copy, never the template's
 * original, which every other clone sees: chmod, chown, utimensat,
 * setxattr, syscall(SYS_chmod), chmod of a directory, lutimes of a
 * symlink, and symlink, mkfifo and link (cowmeta.c lists them). Under a
 * REDIR PATH rule a chmod changes the instance's side.
 *
 * None of these had a wrapper: under a copy-on-write rule they reached the
 * original, so one clone's chmod changed the file for the template and
 * every other clone, and its new names appeared in the template's tree.
 */
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox } from './helpers.js';

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

/** More self-checks of `aid`, failing with the FAIL line it printed. */
async function checksPass(aid: string) {
  await sb.checksPass(aid, 3).catch((e: Error) => {
    const fails = sb.log(aid).match(/^FAIL.*$/gm);
    throw fails ? new Error(`${aid}:\n${fails.join('\n')}`) : e;
  });
}

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

  sb.ok(['snapshot', 'cmt', '-o', join(dir, 'snap')]);
  sb.ok(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'tpl')]);
  const clones = sb.json<{ aid: string; privateRoot: string }[]>(['clone', join(dir, 'tpl'), '--aid', 'cmc', '--count', '2']);
  expect(clones.map((c) => c.aid)).toEqual(['cmc-1', 'cmc-2']);
  for (const c of clones) await checksPass(c.aid);
  const before = { file: meta(file), sysFile: meta(sysFile), sub: meta(sub), link: meta(link) };

  await sb.exercised('cmc-1', 'to change its files\' metadata');
  await checksPass('cmc-1');

  // The clone's private side holds the changes...
  const priv = (p: string) => join(clones[0].privateRoot, p);
  const copy = lstatSync(priv(file));
  expect(copy.mode & 0o7777).toBe(0o640);
  expect(copy.mtimeMs).toBe(MTIME * 1000);
  if (process.getuid!() === 0) expect(copy.gid).toBe(GID_CHANGED);
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

  // The other clone still sees the originals (mode, no xattr, no names).
  await checksPass('cmc-2');
  expect(existsSync(join(clones[1].privateRoot, file))).toBe(false);
});
