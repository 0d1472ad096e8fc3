/**
 * The command line as a user meets it: version, check, help text, errors
 * in appshot's one style, and images as tar, tar.gz and tar.zst files, including
 * hostile ones, all through the real CLI.
 */
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lchownSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, closeSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { cli, command, fixture, root, Sandbox, spawnAsync, stoppedAt, waitFor } from './helpers.js';

// Tests of dozens of commands in a row: on a loaded machine each command
// takes seconds (its Node start alone), and the suite's minute is not
// enough. Only a bound on a hung test: nothing here is timed.
vi.setConfig({ testTimeout: 240_000 });

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-cli-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

/** `appshot COMMAND --help` (c: '' for the top level), asked once in this
 * file: the help crawl and the --json-object test read the same texts, a
 * Node start each. */
const helps = new Map<string, ReturnType<typeof sb.runAsync>>();
function helpOf(c: string): ReturnType<typeof sb.runAsync> {
  let r = helps.get(c);
  if (!r) helps.set(c, (r = sb.runAsync([...c.split(' ').filter(Boolean), '--help'])));
  return r;
}

const COMMANDS = ['run', 'ps', 'table', 'exec', 'logs', 'stop', 'kill', 'wait', 'rm', 'prune', 'snapshot', 'inspect', 'restore', 'template',
  'template create', 'template show', 'clone', 'key', 'key export', 'key import', 'key ls', 'port', 'version', 'check', 'images'];

describe('version and check', () => {
  it('version --json names appshot, node, kernel, image format and table layout', () => {
    const v = sb.json<Json>(['version']);
    expect(v.schema).toBe('appshot.version/1');
    expect(v.appshot).toBe(JSON.parse(readFileSync(join(__dirname, '..', 'package.json'), 'utf8')).version);
    expect(v.node).toBe(process.versions.node);
    expect(typeof v.kernel.release).toBe('string');
    expect(v.imageFormat).toBeGreaterThan(0);
    expect(v.tableVersion).toBeGreaterThan(0);
    expect(sb.run(['--version']).stdout.trim()).toBe(v.appshot);
  });

  it('check --json lists each feature with a boolean, and exits by the core', () => {
    const r = sb.run(['check', '--json']);
    const c = JSON.parse(r.stdout);
    expect(c.schema).toBe('appshot.check/1');
    const ids = c.features.map((f: Json) => f.id);
    for (const id of ['ptrace_scope', 'ptrace_seize', 'ptrace_interrupt', 'process_vm_readv', 'process_vm_writev', 'pidfd_getfd', 'seccomp_filters',
      'userfaultfd', 'pagemap_scan', 'tcp_repair', 'cap_sys_resource', 'cap_checkpoint_restore', 'memfd', 'dev_shm', 'sysv_ipc',
      'cap_setuid_setgid', 'cap_setpcap', 'cap_sys_nice', 'zstd'])
      expect(ids).toContain(id);
    for (const f of c.features) {
      expect(typeof f.present).toBe('boolean');
      expect(typeof f.core).toBe('boolean');
      expect(f.without.length).toBeGreaterThan(0);
    }
    expect(c.core).toBe(c.features.every((f: Json) => !f.core || f.present));
    expect(r.code).toBe(c.core ? 0 : 1);
    // The test suite itself snapshots and restores: here the core works.
    expect(c.features.filter((f: Json) => f.core && !f.present)).toEqual([]);
    // This container holds CAP_NET_ADMIN and not CAP_SYS_RESOURCE.
    expect(c.features.find((f: Json) => f.id === 'tcp_repair').present).toBe(true);
    expect(c.features.find((f: Json) => f.id === 'cap_sys_resource').present).toBe(false);
  });

  it('check as an ordinary user finds TCP repair missing, and the core there', () => {
    const r = spawnSync('setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', process.execPath, cli, 'check', '--json'],
      { env: { ...sb.env, APPSHOT_HOME: join(out, 'nobody') }, encoding: 'utf8' });
    const c = JSON.parse(r.stdout);
    expect(c.features.find((f: Json) => f.id === 'tcp_repair')).toMatchObject({ present: false, detail: 'EPERM' });
    expect(c.features.find((f: Json) => f.id === 'seccomp_filters').present).toBe(false);
    // What restoring other users' images and SCHED_DEADLINE need: not an
    // ordinary user's.
    for (const id of ['cap_setuid_setgid', 'cap_setpcap', 'cap_sys_nice']) expect(c.features.find((f: Json) => f.id === id), id).toMatchObject({ present: false });
    expect(c.features.find((f: Json) => f.id === 'cap_setuid_setgid').detail).toBe('not held: CAP_SETUID, CAP_SETGID');
    expect(c.core).toBe(true);
  });
});

describe("the test command's prerequisites (test/prerequisites.sh)", () => {
  // As an ordinary user it installs nothing: it names what is missing.
  // zstd is made missing for this one run: /dev/null (not executable) is
  // bound over it in a mount namespace of the run's own. The script is
  // given on stdin, opened before the user changes (the checkout may be
  // unreadable to nobody).
  const asNobody = (hide: string) =>
    spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `${hide}exec setpriv --reuid=65534 --regid=65534 --clear-groups bash -s < test/prerequisites.sh`], { cwd: root, encoding: 'utf8' });
  it.skipIf(process.getuid?.() !== 0)('as an ordinary user: one line naming the missing package and how to install it, exit 1; nothing missing: silent, 0', () => {
    const missing = asNobody('mount --bind /dev/null /usr/bin/zstd && ');
    expect(missing.stderr).toBe('test prerequisites missing: zstd (as root: bash test/prerequisites.sh, or apt-get install -y zstd)\n');
    expect(missing.status).toBe(1);
    const whole = asNobody('');
    expect(whole.stderr).toBe('');
    expect(whole.status).toBe(0);
  });
});

describe('help and errors', () => {
  it('every command has an example and no figure numbers or (default: false)', async () => {
    const top = await helpOf('');
    expect(top.stdout).toMatch(/Exit status:\n\s+0\s+success/);
    expect(top.stdout).toMatch(/^\s+2\s+bad command line/m);
    // Every command and subcommand, found from the help texts themselves
    // (their "Commands:" sections), so that a new one cannot be missed.
    // Three asked at a time: each is a Node start, mostly waiting on a
    // loaded machine.
    let free = 3;
    const waiting: (() => void)[] = [];
    const limited = async <T,>(f: () => Promise<T>): Promise<T> => {
      while (free === 0) await new Promise<void>((r) => waiting.push(r));
      free--;
      try {
        return await f();
      } finally {
        free++;
        waiting.shift()?.();
      }
    };
    const seen: string[] = [];
    const visit = async (c: string): Promise<void> => {
      seen.push(c);
      const r = await limited(() => helpOf(c));
      expect(r.code, c).toBe(0);
      expect(r.stdout, c).not.toMatch(/FIG/);
      expect(r.stdout, c).not.toMatch(/default: (false|true|\[\])/);
      // A number as a number: (default: 10), not (default: "10").
      expect(r.stdout, c).not.toMatch(/default: "\d+"/);
      if (c) expect(r.stdout, c).toMatch(/Example/);
      const listed = r.stdout.split(/^Commands:\n/m)[1]?.split(/\n\S/)[0] ?? '';
      const under = [...listed.matchAll(/^ {2}([a-z][a-z-]*)/gm)].map((m) => m[1]).filter((w) => w !== 'help');
      await Promise.all(under.map((w) => visit(`${c} ${w}`.trim())));
    };
    await visit('');
    expect(seen).toEqual(expect.arrayContaining(COMMANDS));
  });

  it("commander's errors come out as appshot's: one line, exit code 2", () => {
    for (const args of [['frobnicate'], ['snapshoot'], ['ps', '--bogus'], ['restore'], ['run', '--json', '--', 'true'], ['snapshot', 'one', '--aid', 'other']]) {
      const r = sb.run(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(/^appshot: [^\n]+\n$/);
      expect(r.stderr).not.toMatch(/error:/);
    }
  });

  it('a word past a command\'s arguments is refused, nothing done; variadic commands take all theirs', () => {
    // run's command, with its own arguments, as many as it has.
    for (const aid of ['xa', 'xb']) {
      const r = sb.run(['run', '--aid', aid, '--', 'sh', '-c', 'echo hi "$@"', 'sh', 'one', 'two']);
      expect([r.code, r.stdout], aid).toEqual([0, 'hi one two\n']);
    }
    for (const [args, line] of [
      [['version', 'extra'], "too many arguments for 'version'. Expected 0 arguments but got 1."],
      [['prune', 'extra'], "too many arguments for 'prune'. Expected 0 arguments but got 1."],
      [['logs', 'xa', 'xb'], "too many arguments for 'logs'. Expected 1 argument but got 2."],
      [['ps', '-a', 'x', 'y'], "too many arguments for 'ps'. Expected 1 argument but got 2."],
      [['key', 'ls', 'x'], "too many arguments for 'ls'. Expected 0 arguments but got 1."],
      [['engine', 'status', 'x'], "too many arguments for 'status'. Expected 0 arguments but got 1."],
    ]) {
      const r = sb.run(args);
      expect([r.code, r.stdout, r.stderr], args.join(' ')).toEqual([2, '', `appshot: ${line}\n`]);
    }
    // `prune extra` pruned nothing; rm takes every AID it is given.
    expect(sb.run(['ps', '-a', '-q']).stdout.split('\n')).toEqual(expect.arrayContaining(['xa', 'xb']));
    expect(sb.run(['rm', 'xa', 'xb'])).toMatchObject({ code: 0, stdout: 'xa\nxb\n' });
  });

  it('appshot alone, or a group alone, prints its help on stdout and exits 0, as docker does', () => {
    for (const [args, usage] of [[[], 'appshot'], [['template'], 'appshot template'], [['key'], 'appshot key']] as const) {
      const r = sb.run([...args]);
      expect([r.code, r.stderr], args.join(' ')).toEqual([0, '']);
      expect(r.stdout.split('\n')[0]).toMatch(new RegExp(`^Usage: ${usage} \\[options\\] \\[command\\]`));
    }
    expect(sb.run([]).stdout).toMatch(/Exit status:/);
  });

  it("a bad option value is said one way everywhere: OPTION 'VALUE': expected WHAT", () => {
    for (const [args, line] of [
      [['snapshot', 'x', '--timeout', 'soon'], "--timeout 'soon': expected a positive number of seconds"],
      [['snapshot', 'x', '--tcp-hold', 'long'], "--tcp-hold 'long': expected a duration such as 500ms, 30s, 5m or 1h"],
      [['stop', 'x', '--time', 'later'], "--time 'later': expected a number of seconds"],
      [['logs', 'x', '--tail', 'some'], "--tail 'some': expected a number of lines or 'all'"],
      [['clone', 'x.template', '--count', '0'], "--count '0': expected a whole number from 1 to 100000"],
      [['clone', 'x.template', '--count', '99999999999'], "--count '99999999999': expected a whole number from 1 to 100000"],
      [['snapshot', 'x', '--progress', 'loud'], "--progress 'loud': expected auto, bar, plain or none"],
      [['kill', 'x', '-s', '99'], "--signal '99': expected a signal name or number, such as TERM, SIGHUP or 9"],
      [['kill', 'x', '-s', 'SIGBOGUS'], "--signal 'SIGBOGUS': expected a signal name or number, such as TERM, SIGHUP or 9"],
    ]) {
      const r = sb.run(args as string[]);
      expect([r.code, r.stderr], (args as string[]).join(' ')).toEqual([2, `appshot: ${line}\n`]);
    }
  });

  it('restore -d is accepted (a restore always runs in the background, as docker -d does) and not shown as a flag that changes nothing', () => {
    const help = sb.run(['restore', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).not.toMatch(/--detach|-d,/);
    expect(sb.run(['completion', 'bash']).stdout).toMatch(/^ {4}'restore'\) subs=''; opts='(?!.*--detach)[^']*'/m);
    const missing = join(out, 'no-such.appshot');
    for (const args of [['restore', missing], ['restore', '-d', missing], ['restore', '--detach', missing]]) {
      const r = sb.run(args);
      expect([r.code, r.stderr], args.join(' ')).toEqual([3, `appshot: no such image: ${missing}\n`]);
    }
  });

  it('key import of a missing file names it, exit code 3', () => {
    const r = sb.run(['key', 'import', join(out, 'missing.pub')]);
    expect([r.code, r.stderr]).toEqual([3, `appshot: no such file: ${join(out, 'missing.pub')}\n`]);
  });

  it('help COMMAND shows that command\'s help; an unknown one is one line and exit code 2', () => {
    for (const [args, usage] of [[['help', 'ps'], 'appshot ps'], [['help', 'template', 'create'], 'appshot template create'], [['template', 'help', 'create'], 'appshot template create'], [['help'], 'appshot']]) {
      const r = sb.run(args);
      expect([r.code, r.stderr], args.join(' ')).toEqual([0, '']);
      expect(r.stdout.split('\n')[0], args.join(' ')).toMatch(new RegExp(`^Usage: ${usage} \\[options\\]`));
    }
    for (const [args, line] of [
      [['help', 'nosuch'], "appshot: unknown command 'nosuch'\n"],
      [['help', 'snapshto'], "appshot: unknown command 'snapshto' (Did you mean snapshot?)\n"],
      [['help', 'template', 'nosuch'], "appshot: unknown command 'template nosuch'\n"],
    ]) {
      const r = sb.run(args as string[]);
      expect([r.code, r.stdout, r.stderr], (args as string[]).join(' ')).toEqual([2, '', line]);
    }
  });
});

describe('human output', () => {
  it('counts in the singular for one: 1 process, 1 thread, 1 instance', async () => {
    expect(sb.run(['run', '-d', '--aid', 'single', '--', fixture('ticker')]).code).toBe(0);
    await waitFor(() => sb.log('single').length > 0, 30_000, 'ticker output');
    const image = join(out, 'single.appshot');
    const template = join(out, 'single.template');
    const said = [
      sb.run(['snapshot', 'single', '-o', image]),
      sb.run(['inspect', image]),
      sb.run(['restore', image]),
      sb.run(['template', 'create', image, '-o', template]),
      sb.run(['clone', template, '--aid', 'single-clone']),
    ].map((r) => {
      expect(r.code, r.stderr).toBe(0);
      return r.stdout + r.stderr;
    });
    expect(said[0]).toMatch(/^appshot: 1 process, 1 thread, /m);
    expect(said[1]).toMatch(/^1 process, \d+ pages stored/m);
    expect(said[2]).toMatch(/^appshot: restored 1 process, 1 thread in /m);
    expect(said[4]).toMatch(/^appshot: 1 instance in /m);
    for (const text of said) expect(text).not.toMatch(/(^|[^\d.])1 (processes|threads|instances|resources|pages|bytes|datagrams|records|messages|connections|commands|mappings)\b/);
    for (const aid of ['single', 'single-clone']) expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});

describe('JSON: one meaning per field name', () => {
  it("ps gives an application's command as argv, as its processes' argv; clone names its template as ps does; template create and show name its directory path", async () => {
    expect(sb.run(['run', '-d', '--aid', 'named', '--', fixture('ticker'), 'x y']).code).toBe(0);
    await waitFor(() => sb.log('named').length > 0, 30_000, 'ticker output');
    const [app] = sb.json<Json[]>(['ps', 'named']);
    // argv is an argument vector wherever it appears; command keeps what
    // appshot.ps/1 promised (the application's argv; a process's line).
    expect(app.schema).toBe('appshot.ps/1');
    expect(app.argv).toEqual([fixture('ticker'), 'x y']);
    expect(app.command).toEqual(app.argv);
    const ticker = app.processes.find((p: Json) => !p.init);
    expect(ticker.argv).toEqual(app.argv);
    expect(ticker.command).toBe(`${fixture('ticker')} x y`);

    const image = join(out, 'named.appshot');
    const template = join(out, 'named.template');
    expect(sb.run(['snapshot', 'named', '-o', image]).code).toBe(0);
    // template create and show name the template's directory `path`;
    // `template`, a string there, is deprecated (docs/json.md).
    const made = sb.json<Json>(['template', 'create', image, '-o', template]);
    const shown = sb.json<Json>(['template', 'show', template]);
    for (const t of [made, shown]) expect([t.path, t.template]).toEqual([template, template]);
    const clones = sb.json<Json[]>(['clone', template, '--aid', 'named-c', '--count', '2']);
    expect(clones.map((c) => [c.aid, c.instance, c.template])).toEqual([
      ['named-c-1', 1, { path: template, instance: 1 }],
      ['named-c-2', 2, { path: template, instance: 2 }],
    ]);
    for (const c of clones) expect(sb.json<Json[]>(['ps', '-a', c.aid])[0].template).toEqual(c.template);
    for (const aid of ['named', 'named-c-1', 'named-c-2']) expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});

describe('every --json output names its schema, an empty list too', () => {
  it('a list command gives its list in one object with --json-object (schema version 2), empty or not; --json stays an array', async () => {
    // A registry with nothing in it: the lists are empty.
    const empty = new Sandbox();
    try {
      expect((await empty.runAsync(['ps', '--json'])).stdout.trim()).toBe('[]'); // version 1, as scripts have it
      const asObject = async (args: string[], code = 0) => {
        const r = await empty.runAsync([...args, '--json-object']);
        expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(code);
        return JSON.parse(r.stdout) as Json;
      };
      expect(await asObject(['ps'])).toEqual({ schema: 'appshot.ps/2', apps: [] });
      expect(await asObject(['ps', '-a'])).toEqual({ schema: 'appshot.ps/2', apps: [] });
      expect(await asObject(['prune'])).toEqual({ schema: 'appshot.prune/2', apps: [] });
      expect(await asObject(['service', 'ls'])).toEqual({ schema: 'appshot.service-ls/2', services: [] });

      // An application that listens on nothing: port lists nothing.
      expect((await empty.runAsync(['run', '-d', '--aid', 'quiet', '--', fixture('ticker')])).code).toBe(0);
      expect(await asObject(['port', 'quiet'])).toEqual({ schema: 'appshot.port/2', ports: [] });
      // Not empty: the elements of version 1, without their schema.
      const [v1] = await empty.jsonAsync<Json[]>(['ps', '-a']);
      const v2 = await asObject(['ps', '-a']);
      const { schema, ...element } = v1;
      expect(schema).toBe('appshot.ps/1');
      expect(v2.apps.map((a: Json) => a.aid)).toEqual([element.aid]);
      // ...less the fields version 1 keeps only as deprecated (docs/json.md).
      expect(Object.keys(v2.apps[0])).toEqual(Object.keys(element).filter((k) => k !== 'command'));
      expect(element.command).toEqual(element.argv);
      expect((await asObject(['key', 'ls'])).schema).toBe('appshot.key-ls/2');
      expect(await asObject(['kill', 'quiet'])).toEqual({ schema: 'appshot.kill/2', apps: [{ aid: 'quiet', signal: 'SIGKILL' }] });
      expect(await asObject(['wait', 'quiet'], 137)).toMatchObject({ schema: 'appshot.wait/2', apps: [{ aid: 'quiet', exitCode: 137 }] });
      expect(await asObject(['rm', 'quiet'])).toEqual({ schema: 'appshot.rm/2', apps: [{ aid: 'quiet' }] });
      expect((await empty.runAsync(['run', '-d', '--aid', 'ended', '--', fixture('ticker')])).code).toBe(0);
      expect(await asObject(['stop', 'ended'])).toEqual({ schema: 'appshot.stop/2', apps: [{ aid: 'ended', exitCode: 143 }] });
      expect(await asObject(['prune'])).toEqual({ schema: 'appshot.prune/2', apps: [{ aid: 'ended' }] });
      // Each command that lists things offers it.
      for (const c of ['ps', 'stop', 'kill', 'wait', 'rm', 'prune', 'clone', 'port', 'key ls', 'service ls'])
        expect((await helpOf(c)).stdout, c).toMatch(new RegExp(`--json-object .*appshot\\.${c.replace(' ', '-')}/2`, 's'));
    } finally {
      await empty.dispose();
    }
  });
});

const logOf = (aid: string) => sb.log(aid);
const lastCheck = (aid: string) => Math.max(0, ...[...logOf(aid).matchAll(/^CHECK (\d+)$/gm)].map((m) => Number(m[1])));
async function checksPass(aid: string, n = 10): Promise<void> {
  const from = lastCheck(aid);
  await waitFor(() => lastCheck(aid) >= from + n || /FAIL/.test(logOf(aid)), 60_000, `${n} more self-checks of ${aid}`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
}
const magic = (path: string) => {
  const b = Buffer.alloc(4);
  const fd = openSync(path, 'r');
  readSync(fd, b, 0, 4, 0);
  closeSync(fd);
  return b;
};
const tmpLeft = () => (existsSync(join(sb.home, 'tmp')) ? readdirSync(join(sb.home, 'tmp')) : []);

describe('images as tar files', () => {
  it('round trips through .tar.gz and .tar files', async () => {
    const aid = 'tarred';
    expect(sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']).code).toBe(0);
    await waitFor(() => lastCheck(aid) >= 5, 30_000, 'snapfix to start');

    const gz = join(out, 'img.tar.gz');
    const s1 = sb.run(['snapshot', aid, '-o', gz]);
    expect(s1.code, s1.stderr).toBe(0);
    expect(s1.stdout.trim()).toBe(gz);
    expect(magic(gz).subarray(0, 2)).toEqual(Buffer.from([0x1f, 0x8b]));
    expect(readdirSync(out).filter((n) => n.startsWith('.'))).toEqual([]);
    const r1 = sb.run(['restore', gz, '--json']);
    expect(r1.code, r1.stderr).toBe(0);
    expect(JSON.parse(r1.stdout)).toMatchObject({ aid, processes: 2 });
    await checksPass(aid);

    const plain = join(out, 'img.tar');
    expect(sb.run(['snapshot', aid, '-o', plain]).code).toBe(0);
    // A plain ustar stream: "ustar" at offset 257 of its first header.
    expect(readFileSync(plain).subarray(257, 262).toString()).toBe('ustar');
    expect(sb.run(['inspect', plain, '--json']).code).toBe(0);
    const r2 = sb.run(['restore', plain]);
    expect(r2.code, r2.stderr).toBe(0);
    await checksPass(aid);
    expect(tmpLeft()).toEqual([]);

    // .tar.zst through the zstd program, and back.
    const zst = join(out, 'img.tar.zst');
    const s3 = sb.run(['snapshot', aid, '-o', zst]);
    expect(s3.code, s3.stderr).toBe(0);
    expect(magic(zst)).toEqual(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]));
    expect(readdirSync(out).filter((n) => n.startsWith('.'))).toEqual([]);
    expect(sb.json<Json>(['inspect', zst]).processes).toHaveLength(2);
    expect(sb.json<Json>(['images', out]).images.find((i: Json) => i.path.endsWith('img.tar.zst'))).toMatchObject({ type: 'file' });
    const r3 = sb.run(['restore', zst, '--json']);
    expect(r3.code, r3.stderr).toBe(0);
    expect(JSON.parse(r3.stdout)).toMatchObject({ aid, processes: 2 });
    await checksPass(aid);
    expect(tmpLeft()).toEqual([]);

    // Without the zstd program, refused by name in one line: a snapshot
    // before anything is frozen or written, a restore before anything is
    // unpacked.
    const noZstd = { ...sb.env, PATH: mkdtempSync(join(tmpdir(), 'appshot-nozstd-')) };
    const refused = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', join(out, 'img2.tar.zst')], { env: noZstd, encoding: 'utf8' });
    expect(refused.status).toBe(2);
    expect(refused.stderr).toMatch(/^appshot: [^\n]*install the zstd package[^\n]*\n$/);
    expect(existsSync(join(out, 'img2.tar.zst'))).toBe(false);
    expect(readdirSync(out).filter((n) => n.startsWith('.'))).toEqual([]);
    // An archive name appshot does not write: refused, not made a directory.
    for (const name of ['img.tar.xz', 'img.zip', 'img.gz']) {
      const other = sb.run(['snapshot', aid, '-o', join(out, name)]);
      expect(other.code, other.stderr).toBe(2);
      expect(other.stderr).toMatch(/^appshot: [^\n]*\.tar, \.tar\.gz \(\.tgz\) or \.tar\.zst[^\n]*\n$/);
      expect(existsSync(join(out, name))).toBe(false);
    }
    await checksPass(aid, 3);
    const unread = spawnSync(process.execPath, [cli, 'restore', zst, '--aid', 'nozstd'], { env: noZstd, encoding: 'utf8' });
    expect(unread.status).toBe(2);
    expect(unread.stderr).toMatch(/^appshot: [^\n]*compressed with zstd[^\n]*install the zstd package[^\n]*\n$/);
    expect(tmpLeft()).toEqual([]);
    expect(sb.allAids()).not.toContain('nozstd');
    rmSync(noZstd.PATH, { recursive: true });
    // A zstd whose writes the kernel refuses (a file size limit, as a full
    // disk would): the snapshot fails in one line naming zstd's end, the
    // file and every temporary are gone, the application runs on.
    const limited = mkdtempSync(join(tmpdir(), 'appshot-zstdlimit-'));
    const realZstd = spawnSync('sh', ['-c', 'command -v zstd'], { encoding: 'utf8' }).stdout.trim();
    writeFileSync(join(limited, 'zstd'), `#!/bin/sh\nulimit -f 4\nexec ${realZstd} "$@"\n`, { mode: 0o755 });
    const full = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', join(out, 'img3.tar.zst')], { env: { ...sb.env, PATH: `${limited}:${sb.env.PATH ?? process.env.PATH}` }, encoding: 'utf8' });
    expect(full.status, full.stderr).toBe(1);
    expect(full.stderr).toMatch(/^appshot: [^\n]*zstd failed: SIGXFSZ[^\n]*\n$/);
    expect(existsSync(join(out, 'img3.tar.zst'))).toBe(false);
    expect(readdirSync(out).filter((n) => n.startsWith('.'))).toEqual([]);
    expect(tmpLeft()).toEqual([]);
    await checksPass(aid, 4);
    rmSync(limited, { recursive: true });
    // An existing file is never replaced.
    const taken = sb.run(['snapshot', aid, '-o', plain]);
    expect(taken.code).toBe(4);
    await checksPass(aid, 3);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});

describe('the state directory of the tests', () => {
  it('is a throwaway one wherever no Sandbox gives one: never the user\'s (/var/lib/appshot for root)', () => {
    // What a test spawns with process.env, or calls in this process without
    // a home, gets this one (test/global-home.ts).
    const home = process.env.APPSHOT_HOME;
    expect(home).toBeDefined();
    expect(home!.startsWith(join(tmpdir(), 'appshot-test-default-home-'))).toBe(true);
    const r = spawnSync(process.execPath, [cli, 'snapshot', 'nobody-here'], { encoding: 'utf8' });
    expect(r.stderr).toBe("appshot: no application with AID 'nobody-here'\n");
    expect(existsSync(join(home!, 'apps'))).toBe(true);
  });

  it('is refused, before anything is written in it, when another user can change it; a new one under sticky /tmp is made', async () => {
    // fuzz34 F8: root writing its registrations, keys and temporaries by
    // name into a directory nobody owns, where nobody can swap a name
    // for a link between two steps.
    const foreign = mkdtempSync(join(tmpdir(), 'appshot-foreign-home-'));
    const link = `${foreign}-link`;
    try {
      chownSync(foreign, 65534, 65534);
      chmodSync(foreign, 0o755);
      symlinkSync('/tmp', link);
      lchownSync(link, 65534, 65534);
      const cases: [string, string][] = [
        [foreign, 'it'],
        [join(foreign, 'state'), `${foreign}, a directory above it,`],
        [join(link, 'state'), `${link}, a link on the way to it,`],
      ];
      for (const [home, who] of cases)
        for (const args of [['ps'], ['key', 'export'], ['images', out], ['snapshot', 'nobody-here', '-o', join(out, 'never')]]) {
          const r = spawnSync(command, args, { env: { ...sb.env, APPSHOT_HOME: home }, encoding: 'utf8' });
          expect(r.stderr, `${home} ${args}`).toMatch(
            new RegExp(`^appshot: refusing the state directory ${home}: ${who.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} can be changed by another user \\(owner uid 65534, group \\d+, mode 0\\d+\\), who could swap its files for links while appshot writes them; set APPSHOT_HOME to a directory only you can change\n$`),
          );
          expect(r.status).toBe(1);
        }
      // Nothing made in it, nor anything written anywhere else.
      expect(readdirSync(foreign)).toEqual([]);
      expect(existsSync(join(out, 'never'))).toBe(false);
      // A socket at its engine's name, served by nobody: the C client
      // (bin/appshot) tells it nothing (its peer is not this user), and
      // Node refuses the directory.
      mkdirSync(join(foreign, 'engine'));
      chownSync(join(foreign, 'engine'), 65534, 65534);
      const fake = spawn('runuser', ['-u', 'nobody', '--', 'python3', '-c', [
        'import socket',
        `s = socket.socket(socket.AF_UNIX); s.bind(${JSON.stringify(join(foreign, 'engine', 'engine.sock'))}); s.listen(1)`,
        'print("READY", flush=True)',
        'a, _ = s.accept(); got = b""',
        'while True:',
        '    d = a.recv(65536)',
        '    if not d: break',
        '    got += d',
        'print("GOT", len(got), flush=True)',
      ].join('\n')], { stdio: ['ignore', 'pipe', 'inherit'] });
      let said = '';
      fake.stdout.on('data', (d: Buffer) => (said += d));
      try {
        await waitFor(() => said.includes('READY'), 10_000, 'the fake engine to listen');
        const told = spawnSync(command, ['ps'], { env: { ...sb.env, APPSHOT_HOME: foreign }, encoding: 'utf8' });
        expect(told.stderr).toMatch(/^appshot: refusing the state directory /);
        expect(told.status).toBe(1);
        await waitFor(() => said.includes('GOT'), 10_000, 'the client to leave the fake engine');
        expect(said).toBe('READY\nGOT 0\n');
      } finally {
        fake.kill();
      }
      // Its engine's name a link to this user's own engine (review 242):
      // that engine serves only its own state directory, named by a path
      // the client's own check takes, and refuses this one; the client
      // then runs the command itself, which refuses the directory.
      rmSync(join(foreign, 'engine', 'engine.sock'), { force: true });
      expect(spawnSync(command, ['engine', 'start'], { env: sb.env, encoding: 'utf8' }).status).toBe(0);
      try {
        symlinkSync(join(sb.home, 'engine', 'engine.sock'), join(foreign, 'engine', 'engine.sock'));
        lchownSync(join(foreign, 'engine', 'engine.sock'), 65534, 65534);
        const steered = spawnSync(command, ['ps'], { env: { ...sb.env, APPSHOT_HOME: foreign, APPSHOT_DEBUG: '1' }, encoding: 'utf8' });
        expect(steered.stderr).toMatch(/appshot: the engine refused \(refusing the state directory [^\n]*\): running here\n/);
        expect(steered.stderr).toMatch(/^appshot: refusing the state directory /m);
        expect(steered.status).toBe(1);
      } finally {
        spawnSync(command, ['engine', 'stop'], { env: sb.env });
      }
      rmSync(join(foreign, 'engine'), { recursive: true, force: true });
      // A link that points nowhere on the way is refused too: what would
      // be made through it is not known.
      symlinkSync(join(foreign, 'nowhere'), join(foreign, 'dangling'));
      chownSync(foreign, 0, 0);
      const dangling = spawnSync(command, ['ps'], { env: { ...sb.env, APPSHOT_HOME: join(foreign, 'dangling', 'state') }, encoding: 'utf8' });
      expect(dangling.stderr).toBe(`appshot: refusing the state directory ${join(foreign, 'dangling', 'state')}: ${join(foreign, 'dangling')}, a link on the way to it, points nowhere: what would be made through it is not known; set APPSHOT_HOME to a directory only you can change\n`);
      expect(dangling.status).toBe(1);
      rmSync(join(foreign, 'dangling'));
      // A group- or world-writable one of root's is refused too, sticky or not.
      chownSync(foreign, 0, 0);
      chmodSync(foreign, 0o1777);
      const sticky = spawnSync(command, ['ps'], { env: { ...sb.env, APPSHOT_HOME: foreign }, encoding: 'utf8' });
      expect(sticky.stderr).toMatch(/^appshot: refusing the state directory .*: it can be changed by another user \(owner uid 0, group 0, mode 1777\)/);
      expect(readdirSync(foreign)).toEqual([]);
      // A new one in sticky /tmp (root's), and one of root's under it, are taken.
      chmodSync(foreign, 0o700);
      const fresh = join(foreign, 'new', 'state');
      const ok = spawnSync(command, ['ps'], { env: { ...sb.env, APPSHOT_HOME: fresh }, encoding: 'utf8' });
      expect(ok.stderr).toBe('');
      expect(ok.status).toBe(0);
      expect(existsSync(join(fresh, 'apps'))).toBe(true);
    } finally {
      rmSync(foreign, { recursive: true, force: true });
      rmSync(link, { force: true });
    }
  });
});

describe('stop, kill, rm and prune', () => {
  it('print the AIDs they acted on, one a line, or as JSON; kill takes signal numbers and names with or without SIG', async () => {
    const sleeper = ['sh', '-c', 'trap "exit 3" HUP; while :; do sleep 0.1; done'];
    for (const aid of ['sa', 'sb', 'ka', 'kb', 'kc']) expect((await sb.runAsync(['run', '-d', '--aid', aid, '--', ...sleeper])).code).toBe(0);
    const stop = await sb.runAsync(['stop', '-t', '0', 'sa', 'sb']);
    expect([stop.code, stop.stdout, stop.stderr]).toEqual([0, 'sa\nsb\n', '']);
    expect((await sb.runAsync(['kill', '-s', '1', 'ka'])).stdout).toBe('ka\n');
    expect((await sb.runAsync(['wait', 'ka'])).stdout).toBe('3\n');
    expect((await sb.runAsync(['kill', '-s', 'hup', 'kb'])).stdout).toBe('kb\n');
    expect((await sb.runAsync(['wait', 'kb'])).stdout).toBe('3\n');
    expect((await sb.jsonAsync<Json[]>(['kill', '-s', 'SIGHUP', 'kc']))).toEqual([{ schema: 'appshot.kill/1', aid: 'kc', signal: 'SIGHUP' }]);
    expect((await sb.runAsync(['wait', 'kc'])).stdout).toBe('3\n');
    expect((await sb.runAsync(['rm', 'sa'])).stdout).toBe('sa\n');
    expect((await sb.jsonAsync<Json[]>(['rm', 'sb']))).toEqual([{ schema: 'appshot.rm/1', aid: 'sb' }]);
    expect((await sb.runAsync(['prune'])).stdout.split('\n')).toEqual(expect.arrayContaining(['ka', 'kb', 'kc']));
    expect((await sb.jsonAsync<Json[]>(['prune']))).toEqual([]);
    expect((await sb.runAsync(['run', '-d', '--aid', 'sc', '--', ...sleeper])).code).toBe(0);
    expect((await sb.jsonAsync<Json[]>(['stop', '-s', '1', 'sc']))).toEqual([{ schema: 'appshot.stop/1', aid: 'sc', exitCode: 3 }]);
    expect((await sb.runAsync(['rm', 'sc'])).code).toBe(0);
  });
});

describe('an image that cannot be written', () => {
  it('to a directory that takes no files: the message names the -o path and why', async () => {
    const aid = 'nowhere';
    expect(sb.run(['run', '-d', '--aid', aid, '--', 'sleep', '60']).code).toBe(0);
    for (const [dest, dir] of [['/proc/x.appshot', '/proc'], ['/proc/x.tar.gz', '/proc']]) {
      const r = sb.run(['snapshot', aid, '-o', dest]);
      expect([r.code, r.stderr]).toEqual([1, `appshot: cannot snapshot '${aid}' to ${dest}: no file can be created in ${dir} (Operation not supported); the application was left running\n`]);
    }
    expect(sb.json<Json[]>(['ps', aid])[0].processes).toHaveLength(2);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });


  it('to a reader that goes away, or past a file size limit: one line, exit 1, the application goes on, nothing left', async () => {
    const aid = 'unwritten';
    expect(sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']).code).toBe(0);
    await waitFor(() => lastCheck(aid) >= 5, 30_000, 'snapfix to start');
    // `snapshot -o - | true`: the reader is gone before the image (it
    // takes a freeze and a dump) is written, so no pipe buffer absorbs it.
    const piped = spawnSync('sh', ['-c', `"${process.execPath}" "${cli}" snapshot ${aid} -o - | true`], { env: sb.env, encoding: 'utf8' });
    expect(piped.stderr).toMatch(/^appshot: cannot snapshot 'unwritten': the reader of standard output went away before the image was written; the application was left running\n$/);
    await checksPass(aid, 3);
    // A file size limit reached while the tar file is written.
    const tarPath = join(out, 'limited.tar');
    const limited = spawnSync('sh', ['-c', `ulimit -f 64; exec "${process.execPath}" "${cli}" snapshot ${aid} -o ${tarPath}`], { env: sb.env, encoding: 'utf8' });
    expect(limited.status).toBe(1);
    expect(limited.stderr).toMatch(/^appshot: cannot snapshot 'unwritten': .*(File too large|file size limit).*; the application was left running\n$/);
    expect(existsSync(tarPath)).toBe(false);
    expect(readdirSync(out).filter((n) => n.startsWith('.limited.tar'))).toEqual([]);
    expect(tmpLeft()).toEqual([]);
    await checksPass(aid, 3);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});

describe('appshot images', () => {
  it('lists images, incremental ones with their parent, templates, tar files, and what is wrong with the rest', async () => {
    const aid = 'listed';
    const dir = join(out, 'listing');
    mkdirSync(dir);
    expect(sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']).code).toBe(0);
    await waitFor(() => lastCheck(aid) >= 5, 30_000, 'snapfix to start');
    const full = sb.run(['snapshot', aid, '-o', join(dir, 'a'), '--leave-running']);
    expect(full.code, full.stderr).toBe(0);
    // The next directory image builds on it, and says so.
    const inc = sb.run(['snapshot', aid, '-o', join(dir, 'b'), '--leave-running']);
    expect(inc.code, inc.stderr).toBe(0);
    expect(inc.stderr).toContain(`incremental on ${join(dir, 'a')}`);
    // A file travels: it never needs a directory of this node.
    const file = sb.run(['snapshot', aid, '-o', join(dir, 'c.tar'), '--leave-running']);
    expect(file.code, file.stderr).toBe(0);
    expect(file.stderr).not.toContain('incremental');
    const inspected = sb.json<Json>(['inspect', join(dir, 'c.tar')]);
    expect(inspected.parent).toBeUndefined();
    // The same stream compressed, and one cut short in its page data: a
    // listing reads the header at the start, not what follows.
    const tar = readFileSync(join(dir, 'c.tar'));
    writeFileSync(join(dir, 'c.tar.gz'), gzipSync(tar));
    writeFileSync(join(dir, 'c.tar.zst'), zstdSync(tar));
    const pagesHeader = tar.indexOf(Buffer.from('pages.img\0'));
    expect(pagesHeader % 512).toBe(0);
    writeFileSync(join(dir, 'cut.tar'), tar.subarray(0, pagesHeader + 512 + 4096));
    expect(sb.run(['inspect', join(dir, 'cut.tar')]).code).not.toBe(0);
    // Image files that are not: listed with what is wrong, nothing else.
    writeFileSync(join(dir, 'foreign.tar'), tarOf(tarHeader('etc/passwd', 4), pad(Buffer.from('root'))));
    writeFileSync(join(dir, 'garbage.tar.gz'), Buffer.from([0x1f, 0x8b, 1, 2, 3, 4]));
    expect(sb.run(['template', 'create', join(dir, 'a'), '-o', join(dir, 't')]).code).toBe(0);
    mkdirSync(join(dir, 'junk'));
    writeFileSync(join(dir, 'junk', 'manifest.pb'), 'not a manifest');
    writeFileSync(join(dir, 'notes.txt'), 'not an image');

    const listed = sb.json<Json>(['images', dir]);
    expect(listed.schema).toBe('appshot.images/1');
    const byName = new Map<string, Json>(listed.images.map((i: Json) => [i.path.slice(dir.length + 1), i]));
    expect([...byName.keys()]).toEqual(['a', 'b', 'c.tar', 'c.tar.gz', 'c.tar.zst', 'cut.tar', 'foreign.tar', 'garbage.tar.gz', 'junk', 't']);
    expect(byName.get('foreign.tar')).toMatchObject({ type: 'file', aid: null, app: null, error: expect.stringContaining("holds 'etc/passwd', which is not a part of an image") });
    expect(byName.get('garbage.tar.gz')).toMatchObject({ type: 'file', aid: null, app: null, error: expect.stringMatching(/not a complete tar stream/) });
    expect(byName.get('a')).toMatchObject({ type: 'image', aid, app: aid, processes: 2, parent: null, trusted: true });
    expect(byName.get('b')).toMatchObject({ type: 'image', aid, app: aid, parent: join(dir, 'a') });
    expect(byName.get('b').bytes).toBeLessThan(byName.get('a').bytes);
    for (const file of ['c.tar', 'c.tar.gz', 'c.tar.zst', 'cut.tar'])
      expect(byName.get(file), file).toMatchObject({ type: 'file', aid, app: aid, createdAt: inspected.createdAt, processes: 2, parent: null, trusted: true });
    expect(byName.get('c.tar.gz').bytes).toBe(statSync(join(dir, 'c.tar.gz')).size);
    expect(byName.get('t')).toMatchObject({ type: 'template', aid, app: aid });
    expect(byName.get('junk').error).toMatch(/manifest|image/);
    // An image directory named by itself lists itself; the table form.
    expect(sb.json<Json>(['images', join(dir, 'b')]).images.map((i: Json) => i.path)).toEqual([join(dir, 'b')]);
    const table = sb.run(['images', dir]);
    expect(table.code).toBe(0);
    expect(table.stdout.split('\n')[0]).toMatch(/^PATH\s+TYPE\s+AID\s+CREATED\s+SIZE\s+PROCS\s+PARENT$/);
    expect(table.stdout).toMatch(/\/b\s+image\s+listed\s.*\/a\n/);
    expect(table.stdout).toMatch(/\/c\.tar\.zst\s+file\s+listed\s+\S+ ago\s+\S+ \S+\s+2\s+-\n/);
    const missing = sb.run(['images', join(out, 'nowhere')]);
    expect(missing.code).toBe(3);
    expect(missing.stderr).toMatch(/^appshot: no such directory: .*\n$/);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });

  it('lists an image file it cannot read with why, and goes on with the others', () => {
    // A FIFO where a file was (swapped after the directory was read, or
    // put there): opened without blocking, it is refused as not a regular
    // file; an unreadable file (another user's, mode 0600) takes the same
    // way, as a line of the listing rather than the end of it.
    const dir = mkdtempSync(join(out, 'unreadable-'));
    expect(spawnSync('mkfifo', [join(dir, 'x.tar')]).status).toBe(0);
    writeFileSync(join(dir, 'foreign.tar'), tarOf(tarHeader('etc/passwd', 4), pad(Buffer.from('root'))));
    const r = sb.run(['images', dir, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const byName = new Map<string, Json>(JSON.parse(r.stdout).images.map((i: Json) => [i.path.slice(dir.length + 1), i]));
    expect([...byName.keys()]).toEqual(['foreign.tar', 'x.tar']);
    expect(byName.get('x.tar')).toMatchObject({ type: 'file', aid: null, app: null, error: `not an appshot image: ${join(dir, 'x.tar')} is a FIFO, not a regular file` });
    expect(byName.get('foreign.tar').error).toContain("holds 'etc/passwd'");
  });

  it('leaves out an entry removed while it is read, lists one that lost a part with why, and never fails the listing', async () => {
    const aid = 'vanishing';
    const dir = mkdtempSync(join(out, 'vanishing-'));
    expect(sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']).code).toBe(0);
    await waitFor(() => lastCheck(aid) >= 3, 30_000, 'snapfix to start');
    for (const o of ['a', 'f.tar']) {
      const r = sb.run(['snapshot', aid, '-o', join(dir, o), '--leave-running', '--full']);
      expect(r.code, r.stderr).toBe(0);
    }
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
    const copies = () => {
      for (const c of ['b', 'c']) {
        rmSync(join(dir, c), { recursive: true, force: true });
        expect(spawnSync('cp', ['-a', join(dir, 'a'), join(dir, c)]).status).toBe(0);
      }
      writeFileSync(join(dir, 'g.tar'), readFileSync(join(dir, 'f.tar')));
    };
    const listedNames = (stdout: string) => (JSON.parse(stdout).images as Json[]).map((i) => [i.path.slice(dir.length + 1), i.error ?? null]);

    // Each stopped between the read of the directory and that of the entry:
    // the image directory b, the image file g.tar removed; c loses its
    // image.pb, a part read after the manifest. Then stopped once the
    // entry was looked at (a directory), b swapped for a link to an image
    // tar file or for such a file not named as one: neither is extracted
    // (nothing unpacked under APPSHOT_HOME/tmp, b not listed as the image
    // the tar holds) and, as a fresh listing would, both are left out.
    // Then c loses image.pb between the listing of its parts and their
    // sizes (ENOENT): listed with why. Last, stopped once c is open, c
    // removed (what is read through the open directory is then empty) and
    // replaced by an empty directory, listed with why, or by a file, left
    // out as a fresh listing would.
    const unpacked: string[] = [];
    const tmp = join(sb.env.APPSHOT_HOME!, 'tmp');
    const watch = setInterval(() => {
      try {
        unpacked.push(...readdirSync(tmp));
      } catch {
        /* not made yet */
      }
    }, 2);
    const swapB = (make: () => void) => () => {
      rmSync(join(dir, 'b'), { recursive: true });
      make();
    };
    const replaceC = (make: () => void) => () => {
      rmSync(join(dir, 'c'), { recursive: true });
      make();
    };
    const all = (but: string) => [['a', null], ['b', null], ['c', null], ['f.tar', null], ['g.tar', null]].filter(([n]) => n !== but);
    try {
      for (const [entry, point, change, expected] of [
        ['b', 'describing', () => rmSync(join(dir, 'b'), { recursive: true }), all('b')],
        ['g.tar', 'describing', () => rmSync(join(dir, 'g.tar')), all('g.tar')],
        ['c', 'describing', () => rmSync(join(dir, 'c', 'image.pb')), [['a', null], ['b', null], ['c', expect.stringContaining('image.pb')], ['f.tar', null], ['g.tar', null]]],
        ['b', 'looked at', swapB(() => symlinkSync(join(dir, 'f.tar'), join(dir, 'b'))), all('b')],
        ['b', 'looked at', swapB(() => writeFileSync(join(dir, 'b'), readFileSync(join(dir, 'f.tar')))), all('b')],
        ['c', 'sizing', () => rmSync(join(dir, 'c', 'image.pb')), [['a', null], ['b', null], ['c', 'a part of it was removed while it was read'], ['f.tar', null], ['g.tar', null]]],
        ['c', 'reading', replaceC(() => mkdirSync(join(dir, 'c'))), [['a', null], ['b', null], ['c', expect.stringMatching(/\(no manifest\.pb\)$/)], ['f.tar', null], ['g.tar', null]]],
        ['c', 'reading', replaceC(() => writeFileSync(join(dir, 'c'), 'x')), all('c')],
      ] as [string, string, () => void, unknown[]][]) {
        copies();
        const stopped = await stoppedAt(sb, ['images', dir, '--json'], `images: ${point} ${entry}`, `images to reach ${point} ${entry}`);
        change();
        const r = await stopped.go();
        expect(r.code, `${point} ${entry}: ${r.stderr}`).toBe(0);
        expect(listedNames(r.stdout), `${point} ${entry}`).toEqual(expected);
      }
    } finally {
      clearInterval(watch);
    }
    expect(unpacked).toEqual([]);

    // Removed and made again without end while listings run: each lists
    // what it found, none fails.
    copies();
    // In a process group of its own, killed as one: a cp -a left running
    // would race the removal of the sandbox.
    const churn = spawn('/bin/sh', ['-c', `while :; do rm -rf ${dir}/b ${dir}/g.tar; cp -a ${dir}/a ${dir}/b; cp ${dir}/f.tar ${dir}/g.tar; done`], { stdio: 'ignore', detached: true });
    const churnEnded = new Promise((resolve) => churn.on('exit', resolve));
    try {
      for (let i = 0; i < 6; i++) {
        const r = await spawnAsync(process.execPath, [cli, 'images', dir, '--json'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' } });
        expect(r.status, r.stderr).toBe(0);
        const names = listedNames(r.stdout).map(([n]) => n);
        expect(names).toEqual(expect.arrayContaining(['a', 'c', 'f.tar']));
      }
    } finally {
      process.kill(-churn.pid!, 'SIGKILL');
      await churnEnded;
      // The group's last members (a cp) gone too.
      await waitFor(() => !readdirSync('/proc').some((p) => /^\d+$/.test(p) && pgidOf(p) === churn.pid), 10_000, 'the churn group to end');
    }
  });

  it('lists the good entries beside an unreadable directory, one nested thousands deep, and a tar that claims more than it holds (fuzz34 F3, F4)', async () => {
    const aid = 'amid-hostile';
    // Reachable by nobody, who lists it below.
    const dir = mkdtempSync(join(tmpdir(), 'appshot-hostile-listing-'));
    const home = mkdtempSync(join(tmpdir(), 'appshot-hostile-listing-home-'));
    try {
      chmodSync(dir, 0o755);
      chownSync(home, 65534, 65534);
      expect(sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']).code).toBe(0);
      await waitFor(() => lastCheck(aid) >= 3, 30_000, 'snapfix to start');
      const snap = sb.run(['snapshot', aid, '-o', join(dir, 'good')]);
      expect(snap.code, snap.stderr).toBe(0);
      const manifest = readFileSync(join(dir, 'good', 'manifest.pb'));
      // Another user's directory (nobody lists it), an image directory
      // whose sizing walks past PATH_MAX, and a tar whose image.pb header
      // claims 200 MiB it does not hold, after a manifest that lists it
      // as the few KiB it is.
      mkdirSync(join(dir, 'foreign'), { mode: 0o700 });
      writeFileSync(join(dir, 'foreign', 'manifest.pb'), manifest);
      mkdirSync(join(dir, 'deep'));
      writeFileSync(join(dir, 'deep', 'manifest.pb'), manifest);
      // By a process of its own that goes down as it makes them (a
      // shell's mkdir, a process each, takes minutes at that depth).
      const nest = spawnSync('python3', ['-c', "import os\nfor _ in range(2100):\n    os.mkdir('x'); os.chdir('x')"], { cwd: join(dir, 'deep') });
      expect(nest.status, String(nest.stderr)).toBe(0);
      const claimed = 200 * 1024 * 1024;
      writeFileSync(join(dir, 'claims.tar'), tarOf(tarHeader('manifest.pb', manifest.length), pad(manifest), tarHeader('image.pb', claimed)));
      const listedImageSize = statSync(join(dir, 'good', 'image.pb')).size;
      // The claim is never allocated: under a data limit far below two
      // of it (an allocation of it fails), the listing says what is wrong.
      const r = spawnSync('prlimit', [`--data=${claimed}`, process.execPath, cli, 'images', dir, '--json'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      const byName = new Map<string, Json>(JSON.parse(r.stdout).images.map((i: Json) => [i.path.slice(dir.length + 1), i]));
      expect([...byName.keys()]).toEqual(['claims.tar', 'deep', 'foreign', 'good']);
      expect(byName.get('good')).toMatchObject({ type: 'image', app: aid });
      expect(byName.get('good').error).toBeUndefined();
      expect(byName.get('claims.tar')).toMatchObject({ type: 'file', error: `corrupt image: image.pb in ${join(dir, 'claims.tar')} is ${claimed} bytes; its manifest says ${listedImageSize}`.replace(/^corrupt image: /, '') });
      // Sized beneath descriptors, past PATH_MAX (review 242: by path, a
      // directory swapped for a link to / was walked): its one file.
      expect(byName.get('deep')).toMatchObject({ type: 'image', bytes: manifest.length });
      expect(byName.get('deep').error).toMatch(/image\.pb/);
      // As nobody: the directory of root's is the one line that says so.
      const asNobody = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cli, 'images', dir], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_HOME: home }, encoding: 'utf8' });
      expect(asNobody.status, asNobody.stderr).toBe(0);
      expect(asNobody.stderr).toBe('');
      const rows = asNobody.stdout.split('\n');
      expect(rows.find((l) => l.startsWith(join(dir, 'foreign ')))).toMatch(/\binvalid\b.*cannot read it: permission denied \(EACCES\)$/);
      // The others listed after it (an image's parts are root's 0600).
      expect(rows.filter((l) => l.startsWith(dir)).map((l) => l.split(' ')[0].slice(dir.length + 1))).toEqual(['claims.tar', 'deep', 'foreign', 'good']);
    } finally {
      sb.run(['rm', '-f', aid]);
      // Past PATH_MAX: rm walks it by descriptors, where rmSync would not.
      spawnSync('rm', ['-rf', dir, home]);
    }
  });

  it('lists a small file of a gigabyte of zeros as what it is, from its start alone', () => {
    // 33 KiB of zstd; the tar parser passes over zero blocks without end,
    // so only a limit on what it is fed stops it before the gigabyte.
    const dir = mkdtempSync(join(out, 'zeros-'));
    const made = spawnSync('/bin/sh', ['-c', `head -c ${2 ** 30} /dev/zero | zstd -q -c > zeros.tar.zst`], { cwd: dir });
    expect(made.status, String(made.stderr)).toBe(0);
    const r = sb.run(['images', dir, '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).images).toMatchObject([
      { path: join(dir, 'zeros.tar.zst'), type: 'file', app: null, error: expect.stringMatching(/ does not start with its manifest\.pb: \d+ bytes of its tar stream read without it$/) },
    ]);
  });
});

/** The process group of process `pid`, undefined once it is gone. */
function pgidOf(pid: string): number | undefined {
  try {
    return Number(readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')[2]);
  } catch {
    return undefined;
  }
}

/** One ustar header block for `name` of `type` ('0' file, '2' symlink). */
function tarHeader(name: string, size: number, type = '0', link = ''): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0);
  h.write('0000600\0', 100);
  h.write('0000000\0', 108);
  h.write('0000000\0', 116);
  h.write(size.toString(8).padStart(11, '0') + '\0', 124);
  h.write('00000000000\0', 136);
  h.write('        ', 148);
  h.write(type, 156);
  h.write(link, 157);
  h.write('ustar\0', 257);
  h.write('00', 263);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
  return h;
}
const pad = (data: Buffer) => Buffer.concat([data, Buffer.alloc((512 - (data.length % 512)) % 512)]);
const tarOf = (...blocks: Buffer[]) => Buffer.concat([...blocks, Buffer.alloc(1024)]);

/** `data` compressed by the zstd program. */
const zstdSync = (data: Buffer) => {
  const r = spawnSync('zstd', ['-q', '-c'], { input: data });
  if (r.status !== 0) throw new Error(`zstd: ${r.stderr}`);
  return r.stdout;
};

describe('hostile tar files', () => {
  const cases: [string, Buffer][] = [
    ['a path with ..', tarOf(tarHeader('../escaped', 5), pad(Buffer.from('evil\n')))],
    ['an absolute path', tarOf(tarHeader('/tmp/escaped', 5), pad(Buffer.from('evil\n')))],
    ['a symlink part', tarOf(tarHeader('pages.img', 0, '2', '/etc/passwd'))],
    ['an absurd size', tarOf(tarHeader('pages.img', 2 ** 33 - 1), Buffer.alloc(512))],
    ['a manifest above its ceiling', tarOf(tarHeader('manifest.pb', 1 << 20), Buffer.alloc(512))],
    ['a truncated stream', tarHeader('manifest.pb', 4096)],
  ];
  // Flipped in the middle (zstd's checksum, or its decoder, sees it; or,
  // if the bytes come out whole before zstd's verdict, the manifest they
  // make cannot be decoded) and cut short: refused, never a short tar
  // taken for a whole one. A manifest first: a stream that does not begin
  // with one is refused at its first entry.
  const pages = Buffer.alloc(1 << 20, 'appshot pages ');
  const zst = () => zstdSync(tarOf(tarHeader('manifest.pb', pages.length), pad(pages)));
  const flipped = () => {
    const z = zst();
    z[z.length >> 1] ^= 0xff;
    return z;
  };
  for (const [what, data] of [['a flipped byte', flipped], ['a cut-short file', () => zst().subarray(0, zst().length >> 1)]] as const)
    it(`a .tar.zst with ${what}: refused in one line, nothing left`, () => {
      const path = join(out, 'corrupt.tar.zst');
      writeFileSync(path, data());
      const r = sb.run(['restore', path, '--trust-image']);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(what === 'a flipped byte' ? /^appshot: corrupt image: [^\n]*(zstd|manifest\.pb cannot be decoded)[^\n]*\n$/ : /^appshot: corrupt image: [^\n]*zstd[^\n]*\n$/);
      expect(tmpLeft()).toEqual([]);
      expect(sb.aids()).toEqual([]);
      rmSync(path);
    });

  for (const [what, tar] of cases) {
    for (const compression of ['none', 'gzip', 'zstd'] as const) {
      it(`${what}${compression === 'none' ? '' : ` (${compression})`}: refused in one line, nothing left`, () => {
        const path = join(out, `hostile${{ none: '.tar', gzip: '.tar.gz', zstd: '.tar.zst' }[compression]}`);
        writeFileSync(path, { none: () => tar, gzip: () => gzipSync(tar), zstd: () => zstdSync(tar) }[compression]());
        const r = sb.run(['restore', path, '--trust-image']);
        expect(r.code).not.toBe(0);
        expect(r.code).not.toBe(70);
        expect(r.stderr).toMatch(/^appshot: [^\n]+\n$/);
        expect(tmpLeft()).toEqual([]);
        expect(existsSync(join(out, '..', 'escaped'))).toBe(false);
        expect(sb.aids()).toEqual([]);
        rmSync(path);
      });
    }
  }
});
