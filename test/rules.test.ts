/**
 * The rules language (parser, messages, evaluation, lookups) and the
 * classification of a real image's resources (FIG. 8), with and without
 * rules.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { FdKind, type Image, type Verdict, VmaKind } from '../src/image/types.js';
import { classify, refusals } from '../src/template/classify.js';
import {
  APPSHOT_ENV_LEN,
  APPSHOT_ENVS,
  APPSHOT_PATH_MAX,
  APPSHOT_REDIRS,
  evaluate,
  identityHooks,
  instanceConfig,
  loadRules,
  parseRules,
  privateCopyPath,
  type Property,
  ruleFor,
  SET_ENVS,
} from '../src/template/rules.js';
import { fixture, root, Sandbox, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const templates = join(root, 'templates');
const props: Record<Property, string> = { 'application-id': 'web-3', instance: '3', hostname: 'node7', template: 'web' };

/** The message parsing `text` fails with, as its author writes it into an
 * application or template (loadRules). */
function mistake(text: string, source = 'fixture.rules'): string {
  try {
    parseRules(text, source, { author: true });
  } catch (e) {
    expect((e as { exitCode: number }).exitCode).toBe(2);
    return (e as Error).message;
  }
  throw new Error('parsed without complaint');
}

describe('the rules language', () => {
  it('parses every example in templates/', () => {
    const files = readdirSync(templates).filter((f) => f.endsWith('.rules'));
    expect(files).toEqual(expect.arrayContaining(['snapfix.rules', 'redis.rules', 'web.rules', 'templfix.rules']));
    for (const f of files) {
      const rules = loadRules(join(templates, f));
      expect(rules.source).toBe(f);
      expect(rules.resources.length).toBeGreaterThan(0);
    }
  });

  it('reads statements, case-insensitively, with comments, escapes and hex numbers', () => {
    const r = parseRules(
      [
        '# a comment',
        'define <APPL-ID> as property Application-ID   # trailing comment',
        'REDIR PATH "/srv/app/config" TO "/srv/app/<APPL-ID>/config"',
        'SET ENV "GREETING" = "say \\"hi\\" \\\\ <not a variable> # not a comment"',
        'FILE "/srv/app/data/" on Write copy-on-write',
        'MEMORY "*" DUPLICATE',
        'PORT 0x1f90 MULTIPLEX',
        'SEMAPHORE KEY 0x5432 DUPLICATE',
        'SHM KEY * VIRTUALIZE',
      ].join('\n'),
      'x.rules',
    );
    expect(r.defines).toEqual(new Map([['APPL-ID', 'application-id']]));
    expect(r.redirs).toEqual([{ from: '/srv/app/config', to: '/srv/app/<APPL-ID>/config', line: 3 }]);
    expect(r.envs).toEqual([{ name: 'GREETING', value: 'say "hi" \\ <not a variable> # not a comment', line: 4 }]);
    expect(r.resources).toEqual([
      { kind: 'file', match: '/srv/app/data', access: 'write', action: 'copy-on-write', line: 5, column: 1 },
      { kind: 'memory', match: '*', access: 'any', action: 'duplicate', line: 6, column: 1 },
      { kind: 'port', match: 8080, access: 'any', action: 'multiplex', line: 7, column: 1 },
      // DUPLICATE and VIRTUALIZE are one action for SysV objects.
      { kind: 'semaphore', match: 0x5432, access: 'any', action: 'virtualize', line: 8, column: 1 },
      { kind: 'shm', match: '*', access: 'any', action: 'virtualize', line: 9, column: 1 },
    ]);
  });

  describe('refuses each mistake with one FILE:LINE:COLUMN message', () => {
    const define = 'DEFINE <APPL-ID> AS PROPERTY application-id\n';
    const cases: [string, string, string][] = [
      ['an unknown keyword', 'FILES "/etc" SHARE', 'fixture.rules:1:1: unknown keyword \'FILES\'; expected one of DEFINE, REDIR, SET, FILE, MEMORY, PORT, SEMAPHORE, SHM, MSGQUEUE, IDENTITY'],
      ['an unknown action', '\n\nFILE "/srv/a" COPY-ON-WRTIE', "fixture.rules:3:15: unknown action 'COPY-ON-WRTIE'; expected one of SHARE, COPY-ON-WRITE, DUPLICATE for FILE"],
      ['an action the kind does not take', 'FILE "/srv/a" MULTIPLEX', 'fixture.rules:1:15: action MULTIPLEX does not apply to FILE; expected one of SHARE, COPY-ON-WRITE, DUPLICATE for FILE'],
      ['a copy action for a port', 'PORT 80 DUPLICATE', 'fixture.rules:1:9: action DUPLICATE does not apply to PORT; expected one of MULTIPLEX, ALLOCATE for PORT'],
      ['an unterminated string', 'SET ENV "HOME" = "/x', 'fixture.rules:1:18: unterminated string; expected a closing "'],
      ['an unknown escape', 'SET ENV "A" = "a\\nb"', "fixture.rules:1:17: unknown escape '\\n'; expected \\\" or \\\\"],
      ['an undefined variable', `${define}SET ENV "HOME" = "/srv/<APPLID>"`, 'fixture.rules:2:24: undefined variable <APPLID>; expected one defined above: <APPL-ID>'],
      ['a variable used before its DEFINE', 'REDIR PATH "/a" TO "/b/<ID>"\nDEFINE <ID> AS PROPERTY instance', 'fixture.rules:1:24: undefined variable <ID>; expected a DEFINE <ID> AS PROPERTY ... line above'],
      ['a relative path', 'REDIR PATH "srv/app" TO "/x"', 'fixture.rules:1:12: path "srv/app" is not absolute; expected a path starting with /'],
      ['a relative FILE path', 'FILE "data" SHARE', 'fixture.rules:1:6: path "data" is not absolute; expected a path starting with /'],
      ['a missing TO', 'REDIR PATH "/a" "/b"', 'fixture.rules:1:17: unexpected "/b"; expected TO'],
      ['a line that ends early', 'REDIR PATH "/a"', 'fixture.rules:1:16: unexpected end of line; expected TO'],
      ['a line that ends early, before a comment', 'REDIR PATH "/a"   # to nowhere', 'fixture.rules:1:16: unexpected end of line; expected TO'],
      ['trailing garbage', 'PORT 6379 ALLOCATE now', "fixture.rules:1:20: unexpected 'now' after the rule; expected the end of the line"],
      ['an unknown property', 'DEFINE <X> AS PROPERTY pid', "fixture.rules:1:24: unknown property 'pid'; expected one of application-id, instance, hostname, template"],
      ['a variable defined twice', `${define}DEFINE <APPL-ID> AS PROPERTY hostname`, 'fixture.rules:2:8: variable <APPL-ID> is already defined; expected a new name'],
      ['a port out of range', 'PORT 70000 ALLOCATE', 'fixture.rules:1:6: 70000 is out of range; expected a port number (1 to 65535) or *'],
      ['a SysV rule without KEY', 'SHM 0x10 VIRTUALIZE', 'fixture.rules:1:5: unexpected 0x10; expected KEY'],
      ['ON for a kind without access', 'PORT 80 ON read ALLOCATE', 'fixture.rules:1:9: ON does not apply to PORT; expected one of MULTIPLEX, ALLOCATE for PORT'],
      ['an unknown access', 'FILE "/a" ON append SHARE', "fixture.rules:1:14: unknown access 'append'; expected one of read, write, create, any"],
      ['a memory name that is none', 'MEMORY "heap" SHARE', 'fixture.rules:1:8: "heap" names no mapping; expected a mapping name like "[heap]", an absolute "/path", or "*"'],
      ['a variable in a resource path', `${define}FILE "/srv/<APPL-ID>" SHARE`, 'fixture.rules:2:12: variable <APPL-ID> in a resource\'s path; expected a literal path (variables belong in REDIR PATH and SET ENV)'],
      ['a bad environment name', 'SET ENV "1X" = "a"', 'fixture.rules:1:9: invalid environment variable name "1X"; expected letters, digits and _, not starting with a digit'],
      ['an environment variable set twice', 'SET ENV "A" = "1"\nSET ENV "A" = "2"', 'fixture.rules:2:9: A is already set at line 1; expected each variable set once'],
      ['a bad number', 'PORT 80x ALLOCATE', "fixture.rules:1:6: invalid number '80x'; expected a decimal or 0x hexadecimal number"],
      ['a stray character', 'PORT 80 ALLOCATE;', "fixture.rules:1:17: unexpected character ';'; expected a keyword, a \"string\", a number, <NAME>, = or *"],
      ['a missing =', 'SET ENV "A" "b"', 'fixture.rules:1:13: unexpected "b"; expected ='],
      ['a redirected root', 'REDIR PATH "/" TO "/x"', 'fixture.rules:1:12: "/" is the root directory: redirecting it would redirect every path; expected a path below /'],
      ['a redirected root, written otherwise', 'REDIR PATH "/srv/.." TO "/x"', 'fixture.rules:1:12: "/srv/.." is the root directory: redirecting it would redirect every path; expected a path below /'],
      ['a redirection to the root', 'REDIR PATH "/q" TO "/tmp/../"', 'fixture.rules:1:20: "/tmp/../" is the root directory: nothing can be redirected to it; expected a path below /'],
      ['a NUL in a path', 'REDIR PATH "/q\0x" TO "/x"', 'fixture.rules:1:15: a NUL character in a string; expected text without NUL characters'],
      ['a NUL in a FILE path', 'FILE "/data\0/x" DUPLICATE', 'fixture.rules:1:12: a NUL character in a string; expected text without NUL characters'],
      ['a NUL in a value', 'SET ENV "A" = "a\0b"', 'fixture.rules:1:17: a NUL character in a string; expected text without NUL characters'],
      ['a root copied on write', 'FILE "//" ON write COPY-ON-WRITE', 'fixture.rules:1:6: "//" is the root directory: copying it on write would copy the whole filesystem; expected a path below /'],
      ['a root duplicated', 'FILE "/./" DUPLICATE', 'fixture.rules:1:6: "/./" is the root directory: duplicating it would copy the whole filesystem; expected a path below /'],
      ['a path redirected twice, written otherwise', 'REDIR PATH "/data" TO "/x"\nREDIR PATH "//data/" TO "/y"', 'fixture.rules:2:12: "//data/" is already redirected at line 1; expected each path redirected once (by one REDIR PATH, FILE ... COPY-ON-WRITE or FILE ... DUPLICATE)'],
      ['a redirected path also copied on write', 'REDIR PATH "/data" TO "/x"\nFILE "/data/" COPY-ON-WRITE', 'fixture.rules:2:6: "/data/" is already redirected at line 1; expected each path redirected once (by one REDIR PATH, FILE ... COPY-ON-WRITE or FILE ... DUPLICATE)'],
      ['a duplicated path also redirected', 'FILE "/data" DUPLICATE\nREDIR PATH "/data" TO "/x"', 'fixture.rules:2:12: "/data" is already redirected at line 1; expected each path redirected once (by one REDIR PATH, FILE ... COPY-ON-WRITE or FILE ... DUPLICATE)'],
      ['an identity variable set', 'SET ENV "APPSHOT_INSTANCE" = "x"', "fixture.rules:1:9: APPSHOT_INSTANCE is a clone's identity, which appshot sets; expected a variable of your own (IDENTITY statements change what makes a clone unique)"],
      ['IDENTITY alone', 'IDENTITY', 'fixture.rules:1:9: unexpected end of line; expected RESEED, KEEP or HOOK'],
      ['an unknown IDENTITY statement', 'IDENTITY RENEW LIBC', "fixture.rules:1:10: unknown IDENTITY statement 'RENEW'; expected RESEED, KEEP or HOOK"],
      ['an unknown generator', 'IDENTITY RESEED OPENSSL', "fixture.rules:1:17: unknown generator 'OPENSSL'; expected one of LIBC"],
      ['a generator decided twice', 'IDENTITY KEEP LIBC\nidentity reseed libc', 'fixture.rules:2:10: LIBC is already kept at line 1; expected one IDENTITY RESEED or KEEP per generator'],
      ['an unknown hook', 'IDENTITY HOOK RUN "/bin/true"', "fixture.rules:1:15: unknown hook 'RUN'; expected SIGNAL or EXEC"],
      ['an unknown signal', 'IDENTITY HOOK SIGNAL SIGUSR3', "fixture.rules:1:22: unknown signal 'SIGUSR3'; expected a signal the application can handle, by name (SIGUSR2, USR2) or number"],
      ['a number that is no signal', 'IDENTITY HOOK SIGNAL 65', 'fixture.rules:1:22: 65 is no signal; expected a signal the application can handle, by name (SIGUSR2, USR2) or number'],
      ['a signal that ends every clone', 'IDENTITY HOOK SIGNAL KILL', 'fixture.rules:1:22: SIGKILL cannot be handled: it would end or stop every clone; expected a signal the application can handle, by name (SIGUSR2, USR2) or number'],
      ['a relative hook command', 'IDENTITY HOOK EXEC "rekey"', 'fixture.rules:1:20: path "rekey" is not absolute; expected a path starting with /'],
      ['a hook command missing', 'IDENTITY HOOK EXEC', 'fixture.rules:1:19: unexpected end of line; expected the command\'s "/absolute/path"'],
      ['a hook argument not a string', 'IDENTITY HOOK EXEC "/bin/kill" -USR2', "fixture.rules:1:32: unexpected character '-'; expected a keyword, a \"string\", a number, <NAME>, = or *"],
      ['a hook argument with an undefined variable', `${define}IDENTITY HOOK EXEC "/bin/echo" "<AID>"`, 'fixture.rules:2:33: undefined variable <AID>; expected one defined above: <APPL-ID>'],
      // A rule an earlier one shadows never applies (the first that matches decides): fuzz33 L4.
      ['a port decided twice', 'PORT 41000 ALLOCATE\nPORT 41000 MULTIPLEX', 'fixture.rules:2:1: this PORT rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a port after PORT *', 'PORT * MULTIPLEX\nPORT 80 ALLOCATE', 'fixture.rules:2:1: this PORT rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a key decided twice', 'SHM KEY 0x10 VIRTUALIZE\nSHM KEY 16 DUPLICATE', 'fixture.rules:2:1: this SHM rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a file decided twice', 'FILE "/srv/a" COPY-ON-WRITE\nFILE "/srv/a/" SHARE', 'fixture.rules:2:1: this FILE rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a file below one shared for any access', 'FILE "/srv" SHARE\nFILE "/srv/a" ON read SHARE', 'fixture.rules:2:1: this FILE rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a mapping name after MEMORY *', 'MEMORY "*" COPY-ON-WRITE\nMEMORY "[stack]" DUPLICATE', 'fixture.rules:2:1: this MEMORY rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a memory rule for writing after one for any access', 'MEMORY "[heap]" DUPLICATE\nMEMORY "[heap]" ON write COPY-ON-WRITE', 'fixture.rules:2:1: this MEMORY rule never applies: line 1 decides every resource it matches (the first rule that matches decides); expected one rule per resource, a narrower one before a broader one'],
      ['a memory rule ON create', 'MEMORY "[heap]" ON create DUPLICATE', 'fixture.rules:1:20: ON create does not apply to MEMORY (a mapping is never created by a clone); expected ON read, ON write or ON any'],
      ['writable memory shared', 'MEMORY "[heap]" ON write SHARE', 'fixture.rules:1:26: MEMORY ... ON write SHARE would share a writable mapping among clones; expected COPY-ON-WRITE or DUPLICATE (SHARE is for read-only mappings)'],
      ['too many hooks', 'IDENTITY HOOK SIGNAL USR2\n'.repeat(8) + 'IDENTITY HOOK SIGNAL USR1', 'fixture.rules:9:1: IDENTITY HOOK 9 of this file; expected at most 8 hooks'],
    ];
    it.each(cases)('%s', (_, text, message) => {
      expect(mistake(text)).toBe(message);
    });

    it('reads rules stored in a template or a registration without its author\'s checks: what was taken when they were written stays usable', () => {
      const authorOnly = cases.filter(([, , message]) => /never applies|ON create does not apply|ON write SHARE/.test(message));
      expect(authorOnly).toHaveLength(9);
      for (const [, text] of authorOnly) expect(() => parseRules(text, 'stored.rules')).not.toThrow();
    });

    it('takes a copy rule on a path an earlier rule decides (it is the path\'s entry in the instance\'s table), and a file\'s mapping shared writable', () => {
      expect(() => parseRules('FILE "/srv/a" ON read SHARE\nFILE "/srv/a" ON read COPY-ON-WRITE', 'fixture.rules', { author: true })).not.toThrow();
      expect(() => parseRules('MEMORY "/srv/shared.db" ON write SHARE', 'fixture.rules', { author: true })).not.toThrow();
    });
  });

  it('reads the IDENTITY section: a generator reseeded or kept, hooks in order, EXEC evaluated per instance', () => {
    const r = parseRules(
      [
        'DEFINE <APPL-ID> AS PROPERTY application-id',
        'IDENTITY RESEED LIBC   # also a generator the application never seeded',
        'identity hook signal usr2',
        'IDENTITY HOOK SIGNAL 10',
        'IDENTITY HOOK EXEC "/usr/local/bin/rekey" "--instance" "<APPL-ID>"',
      ].join('\n'),
      'id.rules',
    );
    expect(r.identity).toEqual({
      libc: { reseed: 'always', line: 2 },
      hooks: [
        { kind: 'signal', signal: 12, name: 'SIGUSR2', line: 3 },
        { kind: 'signal', signal: 10, name: 'SIGUSR1', line: 4 },
        { kind: 'exec', argv: ['/usr/local/bin/rekey', '--instance', '<APPL-ID>'], line: 5 },
      ],
    });
    expect(identityHooks(r, props)[2]).toMatchObject({ argv: ['/usr/local/bin/rekey', '--instance', 'web-3'] });
    expect(parseRules('IDENTITY KEEP LIBC', 'k.rules').identity).toEqual({ libc: { reseed: 'never', line: 1 }, hooks: [] });
    expect(parseRules('', 'empty.rules').identity).toEqual({ hooks: [] });
  });

  it('normalizes paths as the preload library compares them', () => {
    const r = parseRules(
      [
        'DEFINE <APPL-ID> AS PROPERTY application-id',
        'DEFINE <T> AS PROPERTY template',
        'REDIR PATH "/data/" TO "/x/./<APPL-ID>//"',
        'REDIR PATH "//srv/app/../conf" TO "/x/<T>/y"',
        'FILE "/srv//www/./cache/" COPY-ON-WRITE',
        'FILE "/srv/www/tmp/../logs/" DUPLICATE',
        'FILE "/" SHARE', // the whole filesystem shared: that is no entry of the instance
        'MEMORY "/usr//lib/" SHARE',
      ].join('\n'),
      'n.rules',
    );
    expect(r.redirs).toEqual([
      { from: '/data', to: '/x/<APPL-ID>', line: 3 },
      { from: '/srv/conf', to: '/x/<T>/y', line: 4 },
    ]);
    expect(r.resources.map((x) => x.match)).toEqual(['/srv/www/cache', '/srv/www/logs', '/', '/usr/lib']);
    expect(ruleFor(r, 'file', '/srv/www/cache/a', 'write')?.line).toBe(5);
    expect(ruleFor(r, 'memory', '/usr/lib/libc.so.6')?.line).toBe(8);
    // An empty value (run's <T>) leaves no "//".
    expect(instanceConfig(r, { ...props, template: '' }, '/p/').redirs).toEqual([
      { kind: 'path', from: '/data', to: '/x/web-3' },
      { kind: 'path', from: '/srv/conf', to: '/x/y' },
      { kind: 'cow', from: '/srv/www/cache', to: '/p/srv/www/cache' },
    ]);
    // ... nor a root redirected for one instance.
    const root = parseRules('DEFINE <T> AS PROPERTY template\nREDIR PATH "/<T>" TO "/x"', 'r.rules');
    expect(() => instanceConfig(root, { ...props, template: '' }, '/p')).toThrow('r.rules:2: REDIR PATH /<T> is the root directory for this instance, which cannot be redirected');
    // ... nor to a root (fuzz33 L5: every clone was refused at its start).
    const toRoot = parseRules('DEFINE <T> AS PROPERTY template\nREDIR PATH "/srv" TO "/<T>"', 't.rules');
    expect(() => instanceConfig(toRoot, { ...props, template: '' }, '/p')).toThrow("t.rules:2: REDIR PATH's TO /<T> is the root directory for this instance, which nothing can be redirected to");
  });

  describe('refuses what an instance cannot hold when parsing', () => {
    // appshot_table.h: the instance section's sizes.
    it('uses the sizes of addon/include/appshot_table.h', () => {
      const h = readFileSync(join(root, 'addon/include/appshot_table.h'), 'utf8');
      const size = (name: string) => Number(new RegExp(`#define ${name} (\\d+)`).exec(h)![1]);
      expect([APPSHOT_REDIRS, APPSHOT_ENVS, APPSHOT_PATH_MAX, APPSHOT_ENV_LEN]).toEqual(
        ['APPSHOT_REDIRS', 'APPSHOT_ENVS', 'APPSHOT_PATH_MAX', 'APPSHOT_ENV_LEN'].map(size),
      );
    });

    const redirs = (n: number) => Array.from({ length: n }, (_, i) => `REDIR PATH "/r${i}" TO "/x${i}"`);
    it(`${APPSHOT_REDIRS} path rules in all`, () => {
      const full = [...redirs(14), 'FILE "/c" COPY-ON-WRITE', 'FILE "/d" DUPLICATE', 'FILE "/s" SHARE', 'FILE "/w" ON write SHARE'];
      expect(parseRules(full.join('\n'), 'f.rules').redirs).toHaveLength(14);
      const expected = 'expected at most 16 REDIR PATH, FILE ... COPY-ON-WRITE and FILE ... DUPLICATE rules in all (what an instance\'s table holds)';
      expect(mistake([...full, '  REDIR PATH "/r" TO "/x"'].join('\n'))).toBe(`fixture.rules:19:3: path rule 17 of this file; ${expected}`);
      expect(mistake([...full, 'FILE "/e" ON write COPY-ON-WRITE'].join('\n'))).toBe(`fixture.rules:19:1: path rule 17 of this file; ${expected}`);
      expect(mistake([...full, 'FILE "/e" DUPLICATE'].join('\n'))).toBe(`fixture.rules:19:1: path rule 17 of this file; ${expected}`);
    });

    it(`${SET_ENVS} SET ENV lines (the table holds ${APPSHOT_ENVS}: two are a clone's identity)`, () => {
      const envs = Array.from({ length: 16 }, (_, i) => `SET ENV "V${i}" = "${i}"`);
      expect(parseRules(envs.join('\n'), 'e.rules').envs).toHaveLength(16);
      expect(mistake([...envs, 'SET ENV "V16" = "16"'].join('\n'))).toBe(
        "fixture.rules:17:1: SET ENV 17 of this file; expected at most 16 SET ENV lines (what an instance's table holds)",
      );
    });

    it('paths of 255 bytes', () => {
      const longest = `/${'a'.repeat(254)}`;
      const expected = "expected a path of at most 255 bytes (what an instance's table holds)";
      const r = parseRules(`REDIR PATH "${longest}" TO "${longest}"\nFILE "${longest}/../b" COPY-ON-WRITE`, 'p.rules');
      expect(r.redirs[0]).toMatchObject({ from: longest, to: longest });
      expect(mistake(`REDIR PATH "${longest}a" TO "/x"`)).toBe(`fixture.rules:1:12: a path of 256 bytes; ${expected}`);
      // Measured normalized, and in bytes: "é" is two.
      expect(mistake(`REDIR PATH "/x" TO "//${'é'.repeat(128)}/"`)).toBe(`fixture.rules:1:20: a path of 257 bytes; ${expected}`);
      expect(mistake(`FILE "${longest}b" DUPLICATE`)).toBe(`fixture.rules:1:6: a path of 256 bytes; ${expected}`);
      expect(mistake(`FILE "/data" ON write SHARE\nFILE "${longest}b" ON write COPY-ON-WRITE`)).toBe(`fixture.rules:2:6: a path of 256 bytes; ${expected}`);
      // A path that makes no entry of the instance is not limited.
      expect(parseRules(`FILE "${longest}b" SHARE`, 's.rules').resources).toHaveLength(1);
    });

    it('NAME=value of 383 bytes', () => {
      const value = 'v'.repeat(383 - 'NAME='.length);
      expect(parseRules(`SET ENV "NAME" = "${value}"`, 'e.rules').envs[0].value).toBe(value);
      expect(mistake(`SET ENV "NAME" = "${value}w"`)).toBe(
        "fixture.rules:1:18: NAME=value of 384 bytes; expected at most 383 bytes of NAME=value (what an instance's table holds)",
      );
    });
  });

  describe('refuses what grows beyond an instance when evaluated', () => {
    const aid = 'a'.repeat(64);
    const define = 'DEFINE <APPL-ID> AS PROPERTY application-id\n';

    it('a path', () => {
      const rules = parseRules(`${define}REDIR PATH "/in/<APPL-ID>" TO "/out/<APPL-ID>/${'b'.repeat(230)}"`, 'l.rules');
      expect(instanceConfig(rules, props, '/p').redirs[0].to).toBe(`/out/web-3/${'b'.repeat(230)}`);
      expect(() => instanceConfig(rules, { ...props, 'application-id': aid }, '/p')).toThrow(
        `l.rules:2: REDIR PATH's TO path is 300 bytes for this instance (/out/${'a'.repeat(52)}...); an instance's table holds at most 255`,
      );
      const from = parseRules(`${define}REDIR PATH "/in/<APPL-ID>/${'b'.repeat(230)}" TO "/x"`, 'l.rules');
      expect(() => instanceConfig(from, { ...props, 'application-id': aid }, '/p')).toThrow("l.rules:2: REDIR PATH's path is 299 bytes");
    });

    it('NAME=value', () => {
      const rules = parseRules(`${define}SET ENV "HOME" = "/home/<APPL-ID>/${'c'.repeat(350)}"`, 'l.rules');
      expect(instanceConfig(rules, props, '/p').env[0]).toBe(`HOME=/home/web-3/${'c'.repeat(350)}`);
      let error: unknown;
      try {
        instanceConfig(rules, { ...props, 'application-id': aid }, '/p');
      } catch (e) {
        error = e;
      }
      expect(error).toMatchObject({ name: 'AppshotError', exitCode: 2 });
      expect((error as Error).message).toMatch(/^l\.rules:2: SET ENV "HOME" is 426 bytes for this instance \(HOME=\/home\/a+\.\.\.\); an instance's table holds at most 383$/);
    });

    it('with evaluate() given a limit', () => {
      const rules = parseRules(define, 'v.rules');
      expect(evaluate('<APPL-ID>', rules, props, { bytes: 5, what: 'it' })).toBe('web-3');
      expect(() => evaluate('<APPL-ID>', rules, props, { bytes: 4, what: 'it', line: 9 })).toThrow(
        "v.rules:9: it is 5 bytes for this instance (web-3); an instance's table holds at most 4",
      );
    });

    it('a private copy under a deep private directory', () => {
      const rules = parseRules(`FILE "/${'d'.repeat(200)}" COPY-ON-WRITE\nFILE "/${'e'.repeat(200)}" DUPLICATE`, 'c.rules');
      expect(instanceConfig(rules, props, '/state/p').redirs[0].to).toBe(`/state/p/${'d'.repeat(200)}`);
      const deep = `/state/${'p'.repeat(60)}`;
      expect(() => instanceConfig(rules, props, deep)).toThrow(
        `c.rules:1: the private copy of FILE ... COPY-ON-WRITE is 268 bytes for this instance (${deep.slice(0, 57)}...); an instance's table holds at most 255`,
      );
      expect(() => privateCopyPath(rules, rules.resources[1], deep)).toThrow('c.rules:2: the private copy of FILE ... DUPLICATE is 268 bytes');
    });
  });

  it('refuses a missing rules file with one message', () => {
    expect(() => loadRules('/nonexistent/x.rules')).toThrow('cannot read rules file /nonexistent/x.rules: no such file');
  });

  it('evaluates variables per instance', () => {
    const rules = loadRules(join(templates, 'web.rules'));
    expect(evaluate('/srv/www/<APPL-ID>/<N>', rules, props)).toBe('/srv/www/web-3/3');
    const c = instanceConfig(rules, props, '/state/apps/web-3/private');
    expect(c.env).toEqual(['WEB_INSTANCE=web/3', 'WEB_HOME=/srv/www/web-3']);
    expect(c.redirs).toEqual([
      { kind: 'path', from: '/var/log/web/access.log', to: '/var/log/web/access-web-3.log' },
      { kind: 'cow', from: '/srv/www/cache', to: '/state/apps/web-3/private/srv/www/cache' },
    ]);
  });

  it('will not let a value leave its path component', () => {
    const rules = parseRules('DEFINE <H> AS PROPERTY hostname\nREDIR PATH "/a" TO "/b/<H>"', 'h.rules');
    expect(() => instanceConfig(rules, { ...props, hostname: '../etc' }, '/p')).toThrow("h.rules: <H> is '../etc', which cannot be part of a path");
  });

  it('finds the first rule that matches a resource', () => {
    const rules = parseRules(
      ['FILE "/srv/app/conf" ON read SHARE', 'FILE "/srv/app" COPY-ON-WRITE', 'MEMORY "[stack]" DUPLICATE', 'MEMORY "*" COPY-ON-WRITE', 'PORT 80 ALLOCATE', 'SHM KEY 0xdeadbeef DUPLICATE'].join('\n'),
      'r.rules',
    );
    expect(ruleFor(rules, 'file', '/srv/app/conf/a.ini', 'read')?.line).toBe(1);
    expect(ruleFor(rules, 'file', '/srv/app/conf/a.ini', 'write')?.line).toBe(2);
    expect(ruleFor(rules, 'file', '/srv/app', 'write')?.line).toBe(2);
    expect(ruleFor(rules, 'file', '/srv/application', 'write')).toBeUndefined();
    expect(ruleFor(rules, 'memory', '[stack]')?.line).toBe(3);
    expect(ruleFor(rules, 'memory', '')?.line).toBe(4);
    expect(ruleFor(rules, 'memory', '/usr/lib/libc.so.6')).toBeUndefined();
    expect(ruleFor(rules, 'port', 80)?.action).toBe('allocate');
    expect(ruleFor(rules, 'port', 81)).toBeUndefined();
    // Keys are int32 in an image: compared unsigned.
    expect(ruleFor(rules, 'shm', 0xdeadbeef | 0)?.line).toBe(6);
    expect(ruleFor(undefined, 'port', 80)).toBeUndefined();
  });

  it('takes rules that each decide something: other accesses, narrower first, a copy below a shared directory', () => {
    const rules = parseRules(
      ['FILE "/srv/a" ON read SHARE', 'FILE "/srv/a" ON write COPY-ON-WRITE', 'FILE "/srv" SHARE', 'FILE "/srv/b" DUPLICATE', 'MEMORY "[heap]" ON read SHARE', 'MEMORY "[heap]" COPY-ON-WRITE', 'PORT 80 ALLOCATE', 'PORT * MULTIPLEX', 'MSGQUEUE KEY 1 VIRTUALIZE', 'MSGQUEUE KEY * VIRTUALIZE'].join('\n'),
      'ok.rules',
    );
    expect(rules.resources).toHaveLength(10);
  });
});

describe('classification of a real image', () => {
  const sb = new Sandbox();
  const out = scratchDir('appshot-rules-');
  let image: Image;
  let port: number;
  afterAll(() => sb.dispose());

  beforeAll(async () => {
    const aid = 'tpl';
    const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '0', '4']);
    if (r.code !== 0) throw new Error(`appshot run failed: ${r.stderr}`);
    const log = () => readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
    await waitFor(() => /^CHECK 2$/m.test(log()), 10_000, 'the fixture to settle');
    port = Number(/READY port=(\d+)/.exec(log())![1]);
    const s = sb.run(['snapshot', aid, '-o', join(out, 'tpl')]);
    if (s.code !== 0) throw new Error(`appshot snapshot failed: ${s.stderr}`);
    // Signed with the sandbox's key, which this test process does not use.
    const loaded = await loadImage(join(out, 'tpl'), { trust: 'report' });
    image = loaded.image;
    loaded.dispose();
  });

  const by = (verdicts: Verdict[], ref: string) => {
    const v = verdicts.find((x) => x.ref === ref);
    if (!v) throw new Error(`no verdict for ${ref}`);
    return v;
  };
  const vmaRefs = (special: string) =>
    image.processes[0].vmas.filter((v) => v.special === special).map((v) => `vma:2:${v.start.toString(16)}`);

  it('gives every resource exactly one verdict', () => {
    const verdicts = classify(image, undefined);
    const refs = verdicts.map((v) => v.ref);
    expect(new Set(refs).size).toBe(refs.length);
    for (const p of image.processes) {
      expect(refs).toContain(`pid:${p.vpid}`);
      for (const v of p.vmas) expect(refs).toContain(`vma:${p.vpid}:${v.start.toString(16)}`);
      for (const fd of p.fds) expect(refs).toContain(`fd:${p.vpid}:${fd.fd}`);
    }
    image.pipes.forEach((_, i) => expect(refs).toContain(`pipe:${i}`));
    expect(refs.filter((r) => r.startsWith('port:'))).toEqual([`port:${port}`]);
    expect(refusals(image, verdicts, undefined)).toEqual([]);
  });

  it('decides by the standard criteria without rules', () => {
    const v = classify(image, undefined);
    expect(by(v, 'pid:2')).toMatchObject({ kind: 'process', name: 'process 2 (snapfix)', action: 'virtualize', reason: 'system-wide unique, not exported' });
    expect(by(v, `port:${port}`)).toMatchObject({ kind: 'port', name: `tcp 127.0.0.1:${port}`, action: 'multiplex', reason: 'system-wide unique, exported to clients outside' });
    expect(by(v, 'fd:2:6')).toMatchObject({ kind: 'socket', action: 'multiplex' });
    for (const ref of ['sem:0', 'shm:0', 'msg:0']) expect(by(v, ref).action).toBe('virtualize');
    expect(by(v, 'sem:0').name).toBe('semaphore set key 0x5151');
    for (const ref of vmaRefs('[heap]')) expect(by(v, ref)).toMatchObject({ action: 'copy-on-write', reason: 'modifiable, large with an underlying object' });
    for (const ref of vmaRefs('[stack]')) expect(by(v, ref).action).toBe('duplicate');
    for (const ref of vmaRefs('[vdso]')) expect(by(v, ref).action).toBe('recreate');
    const main = image.processes[0];
    const kindAction = (kind: number) => main.vmas.filter((m) => m.kind === kind).map((m) => by(v, `vma:2:${m.start.toString(16)}`).action);
    expect(new Set(kindAction(VmaKind.SHARED_ANON))).toEqual(new Set(['duplicate']));
    expect(new Set(kindAction(VmaKind.SYSV_SHM))).toEqual(new Set(['virtualize']));
    const code = main.vmas.find((m) => m.kind === VmaKind.FILE_PRIVATE && m.prot & 4 && m.path.includes('libc'))!;
    expect(by(v, `vma:2:${code.start.toString(16)}`)).toMatchObject({ action: 'share', reason: 'not modifiable' });
    const tables = main.vmas.find((m) => m.path === image.tablesPath)!;
    expect(by(v, `vma:2:${tables.start.toString(16)}`)).toMatchObject({ action: 'recreate', reason: "appshot's translation tables: each instance gets its own" });
    expect(by(v, 'fd:2:0')).toMatchObject({ kind: 'device', name: '/dev/null', action: 'share' });
    expect(by(v, 'fd:2:1')).toMatchObject({ kind: 'file', name: image.logPath, action: 'recreate' });
    expect(by(v, 'fd:2:3')).toMatchObject({ kind: 'file', action: 'duplicate' }); // deleted
    expect(by(v, 'fd:2:5')).toMatchObject({ name: '/etc/hostname', action: 'share', reason: 'not modifiable' });
    expect(by(v, 'fd:2:4')).toMatchObject({ kind: 'pipe', action: 'duplicate' });
    expect(by(v, 'fd:2:7')).toMatchObject({ kind: 'eventfd', action: 'duplicate' });
    expect(by(v, 'fd:2:8')).toMatchObject({ kind: 'epoll', action: 'duplicate' });
    const pair = main.fds.filter((f) => f.kind === FdKind.UNIX_SOCKET);
    for (const f of pair) expect(by(v, `fd:2:${f.fd}`)).toMatchObject({ name: 'unix socket pair', action: 'duplicate' });
    expect(new Set(image.pipes.map((_, i) => by(v, `pipe:${i}`).action))).toEqual(new Set(['duplicate']));
  });

  it('lets a rule decide, naming it', () => {
    const rules = parseRules(
      [
        `PORT ${port} ALLOCATE`,
        'FILE "/etc" ON write SHARE', // hostname is open read-only: not this one
        'FILE "/etc/hostname" COPY-ON-WRITE',
        'MEMORY "[heap]" DUPLICATE',
        'SHM KEY 0x5152 DUPLICATE',
      ].join('\n'),
      't.rules',
    );
    const v = classify(image, rules);
    expect(by(v, `port:${port}`)).toMatchObject({ action: 'allocate', reason: 'rule t.rules:1' });
    expect(by(v, 'fd:2:6')).toMatchObject({ action: 'allocate', reason: `listens on port ${port}: rule t.rules:1` });
    expect(by(v, 'fd:2:5')).toMatchObject({ action: 'copy-on-write', reason: 'rule t.rules:3' });
    for (const ref of vmaRefs('[heap]')) expect(by(v, ref)).toMatchObject({ action: 'duplicate', reason: 'rule t.rules:4' });
    expect(by(v, 'shm:0')).toMatchObject({ action: 'virtualize', reason: 'rule t.rules:5' });
    expect(by(v, 'sem:0').reason).not.toMatch(/^rule/);
    expect(refusals(image, v, rules)).toEqual([]);
  });

  it('applies templates/snapfix.rules', () => {
    const rules = loadRules(join(templates, 'snapfix.rules'));
    const v = classify(image, rules);
    const lineOf = (text: string) => rules.text.split('\n').findIndex((l) => l.startsWith(text)) + 1;
    expect(by(v, 'sem:0').reason).toBe(`rule snapfix.rules:${lineOf('SEMAPHORE KEY 0x5151')}`);
    expect(by(v, 'msg:0')).toMatchObject({ action: 'virtualize', reason: `rule snapfix.rules:${lineOf('MSGQUEUE')}` });
    expect(by(v, 'fd:2:5').reason).toBe(`rule snapfix.rules:${lineOf('FILE "/etc/hostname"')}`);
    expect(by(v, 'env:SNAPFIX_INSTANCE')).toMatchObject({ kind: 'env', name: 'SNAPFIX_INSTANCE=<APPL-ID>-<N>', action: 'duplicate' });
    expect(by(v, `port:${port}`).action).toBe('multiplex');
  });

  it('names what cannot be templated, and lets a rule allow a shared file', () => {
    const bad = structuredClone(image);
    const main = bad.processes[0];
    const fdBase = main.fds.find((f) => f.fd === 5)!;
    main.fds.push({ ...fdBase, fd: 40, kind: FdKind.FIFO, path: '/tmp/app.fifo' });
    main.fds.push({ ...fdBase, fd: 41, kind: FdKind.UNIX_SOCKET, path: 'socket:[1]', socket: { ...main.fds.find((f) => f.fd === 6)!.socket!, family: 1, address: '/tmp/x.sock', port: 0 } });
    const vmaBase = main.vmas.find((m) => m.kind === VmaKind.FILE_PRIVATE)!;
    main.vmas.push({ ...vmaBase, start: 0x10000000n, end: 0x10001000n, kind: VmaKind.FILE_SHARED, shared: true, prot: 3, path: '/srv/db/data.bin', pages: undefined });
    const none = classify(bad, undefined);
    expect(by(none, 'vma:2:10000000').action).toBe('recreate');
    expect(refusals(bad, none, undefined)).toEqual([
      'process 2 (snapfix) fd 40: a FIFO (named pipe) at /tmp/app.fifo is a system-wide name and cannot be shared by clones',
      'process 2 (snapfix) fd 41: a unix socket listening on /tmp/x.sock is system-wide unique and cannot be shared by clones',
      'process 2 (snapfix) memory 10000000-10001000: maps /srv/db/data.bin writable and shared: every clone would write into the same file; a FILE rule for it (SHARE, COPY-ON-WRITE or DUPLICATE) decides',
    ]);
    // A FILE rule decides the shared mapping; a MEMORY SHARE rule on
    // writable memory is refused.
    const rules = parseRules('FILE "/srv/db" SHARE\nMEMORY "[heap]" SHARE', 's.rules');
    const withRules = classify(bad, rules);
    expect(by(withRules, 'vma:2:10000000')).toMatchObject({ action: 'share', reason: 'rule s.rules:1' });
    const heap = vmaRefs('[heap]')[0].split(':')[2];
    expect(refusals(bad, withRules, rules).filter((m) => m.includes('memory'))).toEqual([
      expect.stringMatching(new RegExp(`^process 2 \\(snapfix\\) memory ${heap}-[0-9a-f]+: \\[heap\\] is writable: MEMORY \\.\\.\\. SHARE applies to read-only mappings only$`)),
    ]);
    // Without verdicts (an image from before templating), refusals classifies itself.
    expect(refusals(bad, [], rules)).toHaveLength(3);
  });
});
