/**
 * A clone's calls through a symlink in a middle component of a path under a
 * copy-on-write rule (D/L/f, with L a symlink to an original directory)
 * change the clone's own copies, never the template's originals, which
 * every other clone shares: a write, a chmod, an unlink, a create and a
 * mkdir, through an absolute link, a relative one, a chain of two, a
 * relative one with "..", one the clone copied up, one it made itself, and
 * one that leads out of the rule to a directory whose own link leads back;
 * a loop of links is ELOOP (cowlink.c lists them).
 *
 * The kernel follows such a link itself, from the side in use: before
 * the preload library resolved middle components, a write through D/absl/f
 * wrote the template's D/real/f, and an unlink through it removed it.
 */
import {
  chmodSync,
  chownSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox, twoClones, waitFor } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-clonesymlink-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const data = join(dir, 'data'); // copy-on-write
const real = join(data, 'real');
const labels = ['absl', 'rell', 'chain', 'up', 'cpl', 'mine', 'out'];

/** 3 more self-checks of `aid` (the fixture's first FAIL line, if any). */
const checksPass = (aid: string) => sb.checksPass(aid, 3);

/** What the clone's calls may change in the originals, as seen from outside. */
function originals() {
  const self = lstatSync(real);
  return {
    // real itself (a trailing '/' through a link: chmod, utime)
    '.': { mode: self.mode, ino: self.ino, mtimeMs: self.mtimeMs },
    ...Object.fromEntries(
      readdirSync(real)
        .sort()
        .map((n) => {
          const s = lstatSync(join(real, n));
          return [n, { mode: s.mode, ino: s.ino, mtimeMs: s.mtimeMs, text: readFileSync(join(real, n), 'utf8') }];
        }),
    ),
  };
}

it('a clone\'s calls through a middle-component symlink change its own copies, never the template\'s', async () => {
  mkdirSync(real, { recursive: true });
  chmodSync(real, 0o755);
  for (const x of labels) {
    for (const op of ['w', 'u']) writeFileSync(join(real, `${op}-${x}`), `${op}\n`);
    writeFileSync(join(real, `c-${x}`), '');
    for (const op of ['w', 'c', 'u']) chmodSync(join(real, `${op}-${x}`), 0o644);
  }
  symlinkSync(real, join(data, 'absl'));
  symlinkSync('real', join(data, 'rell'));
  symlinkSync('hop', join(data, 'chain'));
  symlinkSync(real, join(data, 'hop'));
  mkdirSync(join(data, 'sub'));
  symlinkSync('../real', join(data, 'sub', 'up'));
  symlinkSync(real, join(data, 'cpl'));
  mkdirSync(join(dir, 'outdir'));
  symlinkSync(real, join(dir, 'outdir', 'back'));
  symlinkSync(`${data}/../outdir`, join(data, 'outmid'));
  symlinkSync('loopb', join(data, 'loopa'));
  symlinkSync('loopa', join(data, 'loopb'));
  const rules = join(dir, 'cowlink.rules');
  writeFileSync(rules, `FILE "${data}" COPY-ON-WRITE\n`);
  sb.ok(['run', '-d', '--aid', 'clt', '--rules', rules, '--', fixture('cowlink'), data]);
  await checksPass('clt');

  const clones = await twoClones(sb, 'clt', dir, 'clc');
  const before = originals();

  await sb.exercised('clc-1', 'to write through middle-component symlinks');
  await checksPass('clc-1');

  // The template's originals as they were: contents, modes, inodes, times,
  // and no name added or removed.
  expect(originals()).toEqual(before);
  for (const l of ['absl', 'rell', 'chain', 'hop', 'cpl']) expect(lstatSync(join(data, l)).isSymbolicLink()).toBe(true);

  // The clone's private side holds the changes, under the real directory's
  // name: no private directory made in a link's place.
  const priv = (p: string) => join(clones[0].privateRoot, p);
  for (const x of labels) {
    expect(readFileSync(priv(join(real, `w-${x}`)), 'utf8'), x).toBe('w\nclone\n');
    expect(statSync(priv(join(real, `c-${x}`))).mode & 0o7777, x).toBe(0o600);
    expect(readFileSync(priv(join(real, `n-${x}`)), 'utf8'), x).toBe('new\n');
    expect(statSync(priv(join(real, `d-${x}`))).isDirectory(), x).toBe(true);
    expect(existsSync(priv(join(real, `t-${x}`))), x).toBe(false);
    expect(existsSync(priv(join(real, `u-${x}`))), x).toBe(false);
  }
  // Changed through "mine/" and "absl/" with AT_SYMLINK_NOFOLLOW, which
  // the trailing '/' makes follow: the clone's real.
  expect(statSync(priv(real)).mode & 0o7777).toBe(0o700);
  expect(statSync(priv(real)).mtimeMs).toBe(978307200000);
  for (const l of ['absl', 'rell', 'chain', 'hop', 'sub/up', 'outmid']) expect(existsSync(priv(join(data, l))), l).toBe(false);
  expect(lstatSync(priv(join(data, 'mine'))).isSymbolicLink()).toBe(true);
  expect(lstatSync(priv(join(data, 'cpl'))).isSymbolicLink()).toBe(true);
  expect(existsSync(join(data, 'mine'))).toBe(false);

  // The other clone still sees the originals, and has no copies.
  await checksPass('clc-2');
  expect(existsSync(join(clones[1].privateRoot, real))).toBe(false);
});

/** privateCopy's source opened as the restorer itself (a clone's
 * opens it as the process: test/redircopy.test.ts). */
const asRestorer = { open: (_shown: string, path: string, flags: number) => openSync(path, flags) };

it("a clone's private copy of a file reached through a symlink has the owner and mode of the file copied, not the symlink's (a root-only file is not handed to the symlink's owner)", async () => {
  const { privateCopy } = await import('../src/resources/paths.js');
  const secret = join(dir, 'secret');
  writeFileSync(secret, 'only root reads this\n', { mode: 0o600 });
  chmodSync(secret, 0o600);
  const mine = mkdtempSync(join(dir, 'nobody-'));
  chownSync(mine, 65534, 65534);
  const link = join(mine, 'conf');
  symlinkSync(secret, link);
  lchownSync(link, 65534, 65534);
  const copy = join(dir, 'private', 'conf');
  expect(privateCopy(link, copy, asRestorer)).toBe(true);
  const st = lstatSync(copy);
  expect(st.isFile()).toBe(true);
  expect(readFileSync(copy, 'utf8')).toBe('only root reads this\n');
  expect({ uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 }).toEqual({ uid: 0, gid: 0, mode: 0o600 });
});

it('a clone of an application run as nobody is refused a root-only file put, through a symlink, where the template\'s copy-on-write file was, and leaves nothing', async () => {
  // Reached by nobody: the scratch directories are mkdtemp's 0700.
  chmodSync(dir, 0o755);
  const own = mkdtempSync(join(dir, 'leak-'));
  chmodSync(own, 0o755);
  const data = join(own, 'data');
  mkdirSync(data);
  chownSync(data, 65534, 65534);
  const f = join(data, 'f');
  writeFileSync(f, 'mine\n');
  chownSync(f, 65534, 65534);
  const secret = join(own, 'secret');
  writeFileSync(secret, 'only root reads this\n', { mode: 0o600 });
  chmodSync(secret, 0o600);
  const r = sb.run(['run', '-d', '--aid', 'leak', '--', 'setpriv', '--reuid', '65534', '--regid', '65534', '--clear-groups', 'sh', '-c', `exec 3<>${f}; echo READY; exec sleep 100000`]);
  expect(r.code, r.stderr).toBe(0);
  await waitFor(() => /READY/.test(sb.log('leak')), 10_000, 'the holder to open its file');
  sb.ok(['snapshot', 'leak', '-o', join(own, 'snap')]);
  sb.ok(['template', 'create', join(own, 'snap'), '-o', join(own, 'tpl')]);
  // The template's own file, opened for writing: copy-on-write.
  expect(sb.run(['template', 'show', join(own, 'tpl')]).stdout).toMatch(new RegExp(`copy-on-write\\s+file\\s+${f}`));
  rmSync(f);
  symlinkSync(secret, f);
  lchownSync(f, 65534, 65534);
  const clone = sb.run(['clone', join(own, 'tpl'), '--aid', 'leakc']);
  expect(clone.code, clone.stderr).toBe(5);
  // Refused where the copy is read, as the process (paths.ts privateCopy).
  expect(clone.stderr).toMatch(/process 2 fd 3: \S+\/data\/f cannot be opened with the credentials of the process or the application's others \(fsuid 65534, fsgid 65534\): EACCES/);
  expect(sb.allAids()).not.toContain('leakc');
  expect(existsSync(join(sb.home, 'instances')) ? readdirSync(join(sb.home, 'instances')).filter((n) => n.startsWith('leakc')) : []).toEqual([]);
});

it("a clone's private copy of a set-user-ID file keeps its owner and every mode bit, and a FIFO put in a file's place is refused, not waited on", async () => {
  const { privateCopy } = await import('../src/resources/paths.js');
  const suid = join(dir, 'suid-prog');
  writeFileSync(suid, '#!/bin/sh\n');
  chownSync(suid, 65534, 65534);
  chmodSync(suid, 0o4755);
  const copy = join(dir, 'private', 'suid-prog');
  expect(privateCopy(suid, copy, asRestorer)).toBe(true);
  const st = lstatSync(copy);
  expect({ uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 }).toEqual({ uid: 65534, gid: 65534, mode: 0o4755 });
  const fifo = join(dir, 'fifo');
  spawnSync('mkfifo', [fifo]);
  expect(() => privateCopy(fifo, join(dir, 'private', 'fifo'), asRestorer)).toThrow(/is not a regular file/);
  expect(readdirSync(join(dir, 'private')).filter((n) => n.startsWith('fifo'))).toEqual([]);
});
