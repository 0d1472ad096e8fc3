/**
 * A clone's stat and access calls see the file its open reaches, by every
 * entry point (cowstat.c lists them): the template's file under a
 * copy-on-write rule until the clone writes it, its private copy after
 * (with the copy's size and mode), a file it created that the template
 * does not have, and the instance's side of a REDIR PATH rule. Also in a
 * clone snapshotted and restored, which then writes again.
 *
 * glibc's versioned stat calls (__xstat, __lxstat, __fxstatat and their 64
 * names, what programs built against glibc before 2.33 call for stat,
 * lstat and fstatat) and euidaccess/eaccess had no wrapper: they reached
 * the template's file.
 */
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-clonestat-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const data = join(dir, 'data'); // copy-on-write
const conf = join(dir, 'conf'); // REDIR PATH to inst/<APPL-ID>
const inst = join(dir, 'inst');
const cowFile = join(data, 'a');
const newFile = join(data, 'new');
const confFile = join(conf, 'app.conf');
const TEMPLATE_TEXT = 'template\n';
const LINE = 'written by the instance\n';

/** Every entry point the fixture asks, as its PASS lines name them. */
const ENTRIES = [
  'stat', 'stat64', 'lstat', 'lstat64', 'fstatat', 'fstatat64', 'fstatat(dirfd)', 'statx',
  '__xstat', '__xstat64', '__lxstat', '__lxstat64', '__fxstatat', '__fxstatat64',
  'syscall(SYS_stat)', 'syscall(SYS_lstat)', 'syscall(SYS_newfstatat)', 'syscall(SYS_statx)',
  'access', 'faccessat', 'faccessat(AT_EACCESS)', 'euidaccess', 'eaccess',
  'syscall(SYS_access)', 'syscall(SYS_faccessat)', 'syscall(SYS_faccessat2)',
];

/** The instance's side of the REDIR PATH rule: 0700 and longer, where the
 * original is 0600, so that an answer from the wrong side disagrees. */
function instanceConf(aid: string) {
  mkdirSync(join(inst, aid), { recursive: true });
  writeFileSync(join(inst, aid, 'app.conf'), `the configuration of ${aid}\n`);
  chmodSync(join(inst, aid, 'app.conf'), 0o700);
}

/** More self-checks of `aid`, failing with every FAIL line it printed. */
async function checksPass(aid: string) {
  await sb.checksPass(aid, 3).catch((e: Error) => {
    const fails = sb.log(aid).match(/^FAIL.*$/gm);
    throw fails ? new Error(`${aid}:\n${fails.join('\n')}`) : e;
  });
}

/** The PASS lines `aid` printed for its n-th exercise: its check after
 * the writes prints them (the paths' new state) before "EXERCISED". */
function passedAt(aid: string, n: number): string[] {
  const parts = sb.log(aid).split(/^EXERCISED$/m);
  return parts.length > n ? (parts[n - 1].match(/^PASS .*$/gm) ?? []) : [];
}

let privateRoot = '';

it('the template under its rules: every entry point sees the instance side of REDIR PATH', async () => {
  mkdirSync(data);
  mkdirSync(conf);
  writeFileSync(cowFile, TEMPLATE_TEXT);
  chmodSync(cowFile, 0o600);
  writeFileSync(confFile, 'the template configuration\n');
  chmodSync(confFile, 0o600);
  for (const aid of ['cst', 'csc-1', 'csc-2']) instanceConf(aid);
  const rules = join(dir, 'cowstat.rules');
  writeFileSync(rules, `DEFINE <APPL-ID> AS PROPERTY application-id\nREDIR PATH "${conf}" TO "${inst}/<APPL-ID>"\nFILE "${data}" COPY-ON-WRITE\n`);
  sb.ok(['run', '-d', '--aid', 'cst', '--rules', rules, '--', fixture('cowstat'), cowFile, newFile, confFile]);
  await checksPass('cst');
  for (const e of ENTRIES) expect(sb.log('cst')).toContain(`PASS ${e} ${confFile}\n`);
});

it("clones see the template's file until they write it, then their private copy, by every entry point", async () => {
  sb.ok(['snapshot', 'cst', '-o', join(dir, 'snap')]);
  sb.ok(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'tpl')]);
  const clones = sb.json<{ aid: string; privateRoot: string }[]>(['clone', join(dir, 'tpl'), '--aid', 'csc', '--count', '2']);
  expect(clones.map((c) => c.aid)).toEqual(['csc-1', 'csc-2']);
  for (const c of clones) await checksPass(c.aid);
  privateRoot = clones[0].privateRoot;

  // The write copies the file up and makes a file the template lacks.
  await sb.exercised('csc-1', 'to write its files');
  await checksPass('csc-1');
  const copy = join(privateRoot, cowFile);
  expect(readFileSync(copy, 'utf8')).toBe(TEMPLATE_TEXT + LINE);
  expect(statSync(copy).mode & 0o777).toBe(0o700);
  expect(readFileSync(join(privateRoot, newFile), 'utf8')).toBe(LINE);
  // Each entry point was asked about the copy and the new file, and agreed.
  const passed = passedAt('csc-1', 1);
  for (const e of ENTRIES) {
    expect(passed).toContain(`PASS ${e} ${cowFile}`);
    expect(passed).toContain(`PASS ${e} ${newFile}`);
  }
  // The template's file, and the other clone's view, are as they were.
  expect(readFileSync(cowFile, 'utf8')).toBe(TEMPLATE_TEXT);
  expect(statSync(cowFile).mode & 0o777).toBe(0o600);
  expect(existsSync(newFile)).toBe(false);
  await checksPass('csc-2');
  expect(existsSync(join(clones[1].privateRoot, cowFile))).toBe(false);
});

it('a clone snapshotted and restored sees its private copy, and writes to it again', async () => {
  sb.ok(['snapshot', 'csc-1', '-o', join(dir, 'clone.snap')]);
  sb.ok(['restore', join(dir, 'clone.snap')]);
  await checksPass('csc-1');
  await sb.exercised('csc-1', 'to write its files again');
  await checksPass('csc-1');
  expect(readFileSync(join(privateRoot, cowFile), 'utf8')).toBe(TEMPLATE_TEXT + LINE + LINE);
  const passed = passedAt('csc-1', 2);
  for (const e of ENTRIES) expect(passed).toContain(`PASS ${e} ${cowFile}`);
  expect(readFileSync(cowFile, 'utf8')).toBe(TEMPLATE_TEXT);
});
