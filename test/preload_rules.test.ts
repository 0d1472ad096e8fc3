/**
 * An instance's rules as the preload library applies them, on a real
 * program (redirfix.c): REDIR PATH, copy-on-write files, TCP ports, and
 * SET ENV with the application's own variables on exec (also after a
 * restore under another AID).
 *
 * `appshot run --rules FILE` applies a rules file's REDIR PATH and SET ENV,
 * but not copy-on-write redirections (those come with a clone), which these
 * tests need too: so the instance section is written straight into the
 * application's table file (addon.setInstance) while the program waits for
 * a marker file before doing anything.
 */
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, root, Sandbox, waitFor, type Entry, tcpExchange } from './helpers.js';

interface Redir {
  kind: 'path' | 'cow';
  from: string;
  to: string;
}
interface Addon {
  readTables(path: string): { aid: string; tables: Record<string, Entry[]>; instance: { tablesPath: string } };
  setInstance(path: string, config: { redirs: Redir[]; env: string[] }): void;
  bind(path: string, kind: string, virt: number, sys: number): void;
}
const addon = createRequire(import.meta.url)(join(root, 'build', 'Release', 'appshot.node')) as Addon;

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-rules-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

/** The table file of `aid` in /dev/shm, once it exists. */
async function tablesOf(aid: string): Promise<string> {
  let found = '';
  await waitFor(
    () => {
      for (const f of sb.shmFiles()) {
        try {
          if (addon.readTables(join('/dev/shm', f)).aid === aid) found = join('/dev/shm', f);
        } catch {
          /* being created or removed */
        }
      }
      return found !== '';
    },
    // A foreground run starts a Node of its own: seconds on a loaded machine.
    30_000,
    `the tables of ${aid}`,
  );
  return found;
}

/** Starts redirfix as `aid` (foreground), gives it rules, lets it go. */
async function withRules(
  aid: string,
  args: string[],
  rules: { redirs?: Redir[]; env?: string[]; ports?: [number, number][] },
) {
  const marker = join(dir, `${aid}.go`);
  const app = sb.start(['run', '--aid', aid, '--', fixture('redirfix'), 'wait', marker, ...args]);
  const tables = await tablesOf(aid);
  // `run` writes its own instance section (that of its --rules, here none)
  // after the table file appears and before it starts init: wait for init
  // to be in the table, so that ours is not overwritten.
  await waitFor(() => (addon.readTables(tables).tables.pid ?? []).length > 0, 30_000, `init of ${aid}`);
  addon.setInstance(tables, { redirs: rules.redirs ?? [], env: rules.env ?? [] });
  for (const [v, s] of rules.ports ?? []) addon.bind(tables, 'port', v, s);
  writeFileSync(marker, '');
  return { app, tables };
}

async function run(aid: string, args: string[], rules: { redirs?: Redir[]; env?: string[] }): Promise<string[]> {
  const { app } = await withRules(aid, args, rules);
  const r = await app.exited;
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const lines = r.stdout.split('\n');
  expect(lines.at(-1)).toBe('DONE');
  return lines;
}

const read = (p: string) => readFileSync(p, 'utf8');

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

const hello = (port: number) => tcpExchange(port);

describe('REDIR PATH', () => {
  it('sends every path call under `from` to `to`, and leaves `from` alone', async () => {
    const from = join(dir, 'data');
    const to = join(dir, 'inst-data');
    mkdirSync(from);
    mkdirSync(to);
    writeFileSync(join(from, 'x.txt'), 'template-x');
    writeFileSync(join(to, 'x.txt'), 'instance-x');
    const lines = await run(
      'redir',
      [
        'cat', `${from}/x.txt`,
        'cat', `${dir}/./data/../data//x.txt`, // normalized before matching
        'write', `${from}/new.txt`, 'hello',
        'stat', `${from}/new.txt`,
        'fcat', `${from}/new.txt`,
        'mkdir', `${from}/sub`,
        'rename', `${from}/new.txt`, `${from}/sub/moved.txt`,
        'fappend', `${from}/sub/moved.txt`, '+more',
        'truncate', `${from}/x.txt`, '4',
        'cat', `${from}/x.txt`,
        'ls', from,
        'unlink', `${from}/sub/moved.txt`,
        'rmdir', `${from}/sub`,
        'stat', `${from}/sub`,
        'cat', `${dir}/datax/none`, // a sibling whose name starts the same: not under the rule
      ],
      { redirs: [{ kind: 'path', from, to }] },
    );
    expect(lines).toEqual([
      `cat ${from}/x.txt: instance-x`,
      `cat ${dir}/./data/../data//x.txt: instance-x`,
      `write ${from}/new.txt: ok`,
      `stat ${from}/new.txt: size 5 mode 644`,
      `fcat ${from}/new.txt: hello`,
      `mkdir ${from}/sub: ok`,
      `rename ${from}/new.txt: ok`,
      `fappend ${from}/sub/moved.txt: ok`,
      `truncate ${from}/x.txt: ok`,
      `cat ${from}/x.txt: inst`,
      `ls ${from}: sub,x.txt`,
      `unlink ${from}/sub/moved.txt: ok`,
      `rmdir ${from}/sub: ok`,
      `stat ${from}/sub: ERR ENOENT`,
      `cat ${dir}/datax/none: ERR ENOENT`,
      'DONE',
    ]);
    // The template's side was never touched.
    expect(read(join(from, 'x.txt'))).toBe('template-x');
    expect(existsSync(join(from, 'new.txt'))).toBe(false);
    expect(existsSync(join(from, 'sub'))).toBe(false);
    expect(read(join(to, 'x.txt'))).toBe('inst');
  });

  it("applies to posix_spawn's file actions: a chdir and an open that glibc's child makes past every wrapper", async () => {
    const from = join(dir, 'spdata');
    const to = join(dir, 'inst-spdata');
    mkdirSync(from);
    mkdirSync(to);
    writeFileSync(join(from, 'in.txt'), 'template-in');
    writeFileSync(join(to, 'in.txt'), 'instance-in');
    // cat reads in.txt relative to the directory the file action chose, and
    // writes to the file another file action opened as its stdout.
    const lines = await run('spawnfa', ['spcat', from, 'in.txt', `${from}/out.txt`], { redirs: [{ kind: 'path', from, to }] });
    expect(lines).toEqual([`spcat ${from} in.txt: status 0`, 'DONE']);
    expect(read(join(to, 'out.txt'))).toBe('instance-in');
    expect(existsSync(join(from, 'out.txt'))).toBe(false);
  });

  it('leaves an application without rules as it was', async () => {
    const lines = await run('norules', ['write', join(dir, 'plain.txt'), 'plain', 'cat', join(dir, 'plain.txt')], {});
    expect(lines).toEqual([`write ${dir}/plain.txt: ok`, `cat ${dir}/plain.txt: plain`, 'DONE']);
  });
});

describe('review r250', () => {
  it("leaves a path at or under a rule's `to` as it is (a `to` under a `from`: the kernel's answers name it so)", async () => {
    // The private side inside `from` itself, and a copy-on-write rule's
    // private side under that `from` too (a state directory under /tmp).
    const from = join(dir, 'tree');
    const to = join(from, '.inst');
    const cowFrom = join(dir, 'cowapp');
    const cowTo = join(from, '.cow', 'cowapp');
    mkdirSync(to, { recursive: true });
    mkdirSync(cowFrom);
    mkdirSync(cowTo, { recursive: true });
    writeFileSync(join(from, 'x.txt'), 'template-x');
    writeFileSync(join(to, 'x.txt'), 'instance-x');
    writeFileSync(join(cowFrom, 'y.txt'), 'original-y');
    writeFileSync(join(cowTo, 'y.txt'), 'private-y');
    const lines = await run(
      'underto',
      ['cat', `${from}/x.txt`, 'cat', `${to}/x.txt`, 'cat', `${to}/./x.txt`, 'write', `${to}/w.txt`, 'w', 'cat', `${cowFrom}/y.txt`, 'cat', `${cowTo}/y.txt`],
      { redirs: [{ kind: 'path', from, to }, { kind: 'cow', from: cowFrom, to: cowTo }] },
    );
    expect(lines).toEqual([
      `cat ${from}/x.txt: instance-x`,
      `cat ${to}/x.txt: instance-x`,
      `cat ${to}/./x.txt: instance-x`,
      `write ${to}/w.txt: ok`,
      `cat ${cowFrom}/y.txt: private-y`,
      `cat ${cowTo}/y.txt: private-y`,
      'DONE',
    ]);
    expect(read(join(to, 'w.txt'))).toBe('w');
    expect(existsSync(join(to, '.inst'))).toBe(false);
  });

  it('takes /proc/self/root/... with repeated slashes, "." or ".." components as its plain path does', async () => {
    const from = join(dir, 'rootdata');
    const to = join(dir, 'inst-rootdata');
    mkdirSync(from);
    mkdirSync(to);
    writeFileSync(join(from, 'x.txt'), 'template-x');
    writeFileSync(join(to, 'x.txt'), 'instance-x');
    const paths = [`/proc/self/./root${from}/x.txt`, `//proc/self/root${from}/x.txt`, `/proc/self/root/${from}/x.txt`, `/proc/self/fd/../root${from}/x.txt`];
    const lines = await run('rootunplain', [...paths.flatMap((p) => ['cat', p]), 'write', `/proc//self/root${from}/new.txt`, 'n'], {
      redirs: [{ kind: 'path', from, to }],
    });
    expect(lines).toEqual([...paths.map((p) => `cat ${p}: instance-x`), `write /proc//self/root${from}/new.txt: ok`, 'DONE']);
    expect(existsSync(join(from, 'new.txt'))).toBe(false);
    expect(read(join(to, 'new.txt'))).toBe('n');
  });

  // Review r388 H1: a ".." followed by a number was resolved on the real
  // side before the rules ran: ENOENT for a directory that exists only
  // privately, and a symbolic link on the shared side took the write out
  // of the private tree. The rules read such a path by its letters.
  it('reads a path with a ".." followed by a number by its letters: a private-only directory and a shared-side link before it do not matter', async () => {
    const from = join(dir, 'dotnum');
    const to = join(dir, 'inst-dotnum');
    const away = join(dir, 'dotnum-away');
    mkdirSync(from);
    mkdirSync(join(to, 'priv'), { recursive: true });
    mkdirSync(join(to, '1'));
    mkdirSync(join(to, 'proc', '1'), { recursive: true });
    mkdirSync(join(away, 'x', 'y'), { recursive: true });
    mkdirSync(join(away, 'x', '1'));
    symlinkSync(join(away, 'x', 'y'), join(from, 'link'));
    const writes = [`${from}/priv/../1/a.txt`, `${from}/link/../1/b.txt`, `${from}/priv/../proc/1/c.txt`];
    const lines = await run('dotnum', writes.flatMap((p) => ['write', p, 'w']), { redirs: [{ kind: 'path', from, to }] });
    expect(lines).toEqual([...writes.map((p) => `write ${p}: ok`), 'DONE']);
    expect(read(join(to, '1', 'a.txt'))).toBe('w');
    expect(read(join(to, '1', 'b.txt'))).toBe('w');
    expect(read(join(to, 'proc', '1', 'c.txt'))).toBe('w');
    expect(readdirSync(join(away, 'x', '1'))).toEqual([]);
  });

  it('hands socket calls with an address the kernel refuses to the kernel as they are: EFAULT, not SIGSEGV (but for sendto and sendmsg destinations, read as they are for speed); EINVAL for a length past a sockaddr_un', async () => {
    const from = join(dir, 'socks');
    const to = join(dir, 'inst-socks');
    mkdirSync(from);
    mkdirSync(to);
    const expected = [
      'connect bad address: ERR EFAULT',
      'bind bad address: ERR EFAULT',
      'bind long length: ERR EINVAL',
      'connect long length: ERR EINVAL',
      'sendto long length: ERR EINVAL',
      'getpeername bad length: ERR EFAULT',
      'accept bad length: ERR EFAULT',
      'accept4 bad length: ERR EFAULT',
      'recvfrom bad length: ERR EFAULT',
      'recvmsg bad header: ERR EFAULT',
      'DONE',
    ];
    // With a rule for the name, and without any.
    expect(await run('badaddr', ['sockaddrs', `${from}/s.sock`], { redirs: [{ kind: 'path', from, to }] })).toEqual(expected);
    expect(existsSync(join(to, 's.sock'))).toBe(false);
    expect(await run('badaddr0', ['sockaddrs', `${from}/s.sock`], {})).toEqual(expected);
    expect(existsSync(join(from, 's.sock'))).toBe(false);
  });
});

describe('copy-on-write files', () => {
  it('reads the original until the first write, which copies it to the private side', async () => {
    const from = join(dir, 'tmpl');
    const to = join(dir, 'clone', 'priv'); // its parent does not exist yet
    mkdirSync(join(from, 'sub'), { recursive: true });
    writeFileSync(join(from, 'a.txt'), '0123456789');
    chmodSync(join(from, 'a.txt'), 0o640);
    writeFileSync(join(from, 'sub', 'b.txt'), 'bee');
    chmodSync(join(from, 'sub'), 0o750);
    writeFileSync(join(from, 'c.txt'), 'abcdef');
    writeFileSync(join(from, 'e.txt'), 'e');
    const lines = await run(
      'cow',
      [
        'cat', `${from}/a.txt`,
        'ls', from,
        'pwrite', `${from}/a.txt`, '2', 'XY',
        'cat', `${from}/a.txt`,
        'stat', `${from}/a.txt`,
        'fappend', `${from}/sub/b.txt`, '+',
        'fcat', `${from}/sub/b.txt`,
        'truncate', `${from}/c.txt`, '3',
        'cat', `${from}/c.txt`,
        'write', `${from}/new.txt`, 'fresh',
        'cat', `${from}/new.txt`,
        'write', `${from}/nodir/x.txt`, 'x',
        'mkdir', `${from}/sub`,
        'mkdir', `${from}/newdir`,
        'excl', `${from}/e.txt`,
        'excl', `${from}/newdir/e.txt`,
        'write', `${from}/t.tmp`, 'replaced',
        'rename', `${from}/t.tmp`, `${from}/sub/b.txt`,
        'cat', `${from}/sub/b.txt`,
        'unlink', `${from}/new.txt`,
        'stat', `${from}/new.txt`,
        'unlink', `${from}/a.txt`,
        'rename', `${from}/c.txt`, `${from}/d.txt`,
        'rmdir', `${from}/newdir`,
        'unlink', `${from}/newdir/e.txt`,
        'rmdir', `${from}/newdir`,
      ],
      { redirs: [{ kind: 'cow', from, to }] },
    );
    expect(lines).toEqual([
      `cat ${from}/a.txt: 0123456789`,
      `ls ${from}: a.txt,c.txt,e.txt,sub`,
      `pwrite ${from}/a.txt: ok`,
      `cat ${from}/a.txt: 01XY456789`,
      `stat ${from}/a.txt: size 10 mode 640`,
      `fappend ${from}/sub/b.txt: ok`,
      `fcat ${from}/sub/b.txt: bee+`,
      `truncate ${from}/c.txt: ok`,
      `cat ${from}/c.txt: abc`,
      `write ${from}/new.txt: ok`,
      `cat ${from}/new.txt: fresh`,
      `write ${from}/nodir/x.txt: ERR ENOENT`, // a parent on neither side
      `mkdir ${from}/sub: ERR EEXIST`,
      `mkdir ${from}/newdir: ok`,
      `excl ${from}/e.txt: ERR EEXIST`, // and not copied to find that out
      `excl ${from}/newdir/e.txt: ok`,
      `write ${from}/t.tmp: ok`,
      `rename ${from}/t.tmp: ok`,
      `cat ${from}/sub/b.txt: replaced`,
      `unlink ${from}/new.txt: ok`, // only on the private side
      `stat ${from}/new.txt: ERR ENOENT`,
      `unlink ${from}/a.txt: ERR EROFS`, // the original would show through
      `rename ${from}/c.txt: ERR EROFS`,
      `rmdir ${from}/newdir: ERR ENOTEMPTY`,
      `unlink ${from}/newdir/e.txt: ok`,
      `rmdir ${from}/newdir: ok`,
      'DONE',
    ]);
    // The originals are as they were; the private side holds the writes,
    // with the original's modes.
    expect(read(join(from, 'a.txt'))).toBe('0123456789');
    expect(read(join(from, 'sub', 'b.txt'))).toBe('bee');
    expect(read(join(from, 'c.txt'))).toBe('abcdef');
    expect(existsSync(join(from, 'new.txt'))).toBe(false);
    expect(existsSync(join(from, 'newdir'))).toBe(false);
    expect(read(join(to, 'a.txt'))).toBe('01XY456789');
    expect(statSync(join(to, 'a.txt')).mode & 0o7777).toBe(0o640);
    expect(statSync(join(to, 'sub')).mode & 0o7777).toBe(0o750);
    expect(read(join(to, 'sub', 'b.txt'))).toBe('replaced');
    expect(read(join(to, 'c.txt'))).toBe('abc');
    expect(existsSync(join(to, 'nodir'))).toBe(false);
    expect(existsSync(join(to, 'e.txt'))).toBe(false);
    // No temporary copy is left behind.
    expect(readdirSync(to).filter((f) => f.includes('appshot-cow'))).toEqual([]);

    // A second instance of the same rule starts from what the first left.
    const again = await run('cow2', ['cat', `${from}/a.txt`, 'cat', `${from}/c.txt`], {
      redirs: [{ kind: 'cow', from, to }],
    });
    expect(again).toEqual([`cat ${from}/a.txt: 01XY456789`, `cat ${from}/c.txt: abc`, 'DONE']);
  });

  it('gives two processes that write at once one whole copy', async () => {
    const from = join(dir, 'race');
    const to = join(dir, 'race-priv');
    mkdirSync(from);
    const big = 'z'.repeat(4 << 20);
    writeFileSync(join(from, 'big'), big);
    const f = `${from}/big`;
    const lines = await run(
      'race',
      [
        'spawn', 'tag', 'p1', 'pwrite', f, '0', 'A', ';',
        'spawn', 'tag', 'p2', 'pwrite', f, '1', 'B', ';',
        'spawn', 'tag', 'p3', 'stat', f, ';',
        'reap',
      ],
      { redirs: [{ kind: 'cow', from, to }] },
    );
    expect(lines).toContain(`p1 pwrite ${f}: ok`);
    expect(lines).toContain(`p2 pwrite ${f}: ok`);
    expect(lines).toContain(`p3 stat ${f}: size ${big.length} mode 644`);
    const priv = readFileSync(join(to, 'big'), 'utf8');
    expect(priv.length).toBe(big.length);
    expect(priv.slice(2)).toBe(big.slice(2));
    // Both wrote into the one copy that won.
    expect(priv.slice(0, 2)).toBe('AB');
    expect(read(join(from, 'big'))).toBe(big);
    // The copy that lost was removed, not left beside the winner.
    expect(readdirSync(to).filter((f) => f.includes('.appshot-cow.'))).toEqual([]);
  });

  it('fails fopen "wx" with EEXIST on a path the original has, without copying it', async () => {
    const from = join(dir, 'wx');
    const to = join(dir, 'wx-priv');
    mkdirSync(from);
    writeFileSync(join(from, 'have.txt'), 'template');
    const lines = await run(
      'wx',
      [
        'fexcl', `${from}/have.txt`, 'clobbered',
        'cat', `${from}/have.txt`,
        'fexcl', `${from}/none.txt`, 'mine',
        'cat', `${from}/none.txt`,
        'fexcl', `${from}/none.txt`, 'again', // now the private side has it
      ],
      { redirs: [{ kind: 'cow', from, to }] },
    );
    expect(lines).toEqual([
      `fexcl ${from}/have.txt: ERR EEXIST`,
      `cat ${from}/have.txt: template`,
      `fexcl ${from}/none.txt: ok`,
      `cat ${from}/none.txt: mine`,
      `fexcl ${from}/none.txt: ERR EEXIST`,
      'DONE',
    ]);
    // Nothing copied for the first, the second created privately only.
    expect(existsSync(join(to, 'have.txt'))).toBe(false);
    expect(read(join(from, 'have.txt'))).toBe('template');
    expect(existsSync(join(from, 'none.txt'))).toBe(false);
    expect(read(join(to, 'none.txt'))).toBe('mine');
  });
});

describe('ports and SET ENV', () => {
  it('binds the virtual port to the system one, and execs children in the application with SET ENV', async () => {
    const sys = await freePort();
    const marker = join(dir, 'net.child');
    const { app } = await withRules(
      'net',
      [
        'listen', '7100',
        'accept',
        'getenv', 'SETME',
        'spawn', 'tag', 'child', 'getenv', 'SETME', 'pid', 'wait', marker, ';',
        'spawn-env', 'tag', 'clean', 'getenv', 'SETME', 'getenv', 'PATH', 'getenv', 'OTHER', 'pid', ';',
        'reap',
      ],
      { env: ['SETME=fromrule', 'OTHER=x=y'], ports: [[7100, sys]] },
    );
    // getsockname shows the port asked for; the socket listens on its own.
    await app.line(/^listen 7100: 7100$/);
    expect(await hello(sys)).toBe('hello\n');
    const [, v, s] = await app.line(/^child pid (\d+) (\d+)$/);
    expect(Number(v)).not.toBe(Number(s));
    const table = sb.json<{ tables: Record<string, Entry[]> }>(['table', 'net']);
    expect(table.tables.pid).toContainEqual(expect.objectContaining({ virtual: Number(v), system: Number(s) }));
    expect(table.tables.port).toEqual([expect.objectContaining({ virtual: 7100, system: sys })]);
    writeFileSync(marker, '');
    const r = await app.exited;
    expect(r.code).toBe(0);
    const lines = r.stdout.split('\n');
    // The first process started before the rule: its own environment is its own.
    expect(lines).toContain('getenv SETME: (unset)');
    expect(lines).toContain('child getenv SETME: fromrule');
    // Forced over an environment the program built itself, replacing its value.
    expect(lines).toContain('clean getenv SETME: fromrule');
    expect(lines).toContain('clean getenv OTHER: x=y');
    expect(lines).toContain('clean getenv PATH: /bin:/usr/bin');
    const clean = lines.find((l) => l.startsWith('clean pid '))!.split(' ').map(Number);
    expect(clean[2]).not.toBe(clean[3]);
    expect(clean[2]).toBeLessThan(100);
  });
});

describe('exec after a restore under another AID', () => {
  it('starts the child in the new application, with its SET ENV', async () => {
    const go = join(dir, 'moved.go');
    const done = join(dir, 'moved.done');
    const r0 = sb.run(['run', '-d', '--aid', 'before', '--', fixture('redirfix'), 'wait', go,
      'spawn', 'tag', 'child', 'getenv', 'SETME', 'pid', 'wait', done, ';', 'reap']);
    expect(r0.code).toBe(0);
    await tablesOf('before');
    const image = join(dir, 'moved.appshot');
    const snap = sb.run(['snapshot', 'before', '-o', image]);
    expect(snap.code, snap.stderr).toBe(0);
    const rest = sb.run(['restore', image, '--aid', 'after']);
    expect(rest.code, rest.stderr).toBe(0);
    const tables = await tablesOf('after');
    expect(addon.readTables(tables).instance.tablesPath).toBe(tables);
    addon.setInstance(tables, { redirs: [], env: ['SETME=after'] });
    writeFileSync(go, '');
    const log = () => sb.run(['logs', 'after']).stdout;
    await waitFor(() => /child pid \d+ \d+/.test(log()), 10_000, 'the child to start');
    const [, v, s] = log().match(/child pid (\d+) (\d+)/)!;
    expect(Number(v)).not.toBe(Number(s));
    const table = sb.json<{ tables: Record<string, Entry[]> }>(['table', 'after']);
    expect(table.tables.pid).toContainEqual(expect.objectContaining({ virtual: Number(v), system: Number(s) }));
    expect(log()).toContain('child getenv SETME: after');
    writeFileSync(done, '');
    await waitFor(() => !sb.aids().includes('after'), 10_000, 'after to end');
  });
});
