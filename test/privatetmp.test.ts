/**
 * `appshot run --private-tmp` (src/template/privatetmp.ts): a /tmp of the
 * application's own. Every application's first process is virtual PID 2,
 * so programs that name their files in /tmp after their PID (a JVM's
 * hsperfdata and attach socket; the fixture pidtmp here) meet each
 * other's there without it. The preload also takes
 * /proc/<vpid>/root/tmp/... (how jcmd finds a JVM's socket) and AF_UNIX
 * socket names through the rules: bind, connect and the destinations of
 * sendto, sendmsg and sendmmsg, and the names the kernel answers
 * (getsockname, getpeername, a datagram's sender) shown as /tmp ones.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { asNobody, command, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
// Outside /tmp: the images and rules (a run's working directory under
// /tmp is refused with --private-tmp).
const dir = mkdtempSync('/var/tmp/appshot-privatetmp-');
// Unique on the node: the runs without the flag use the real /tmp.
const NAME = `appshot-pidtmp-${process.pid}`;
const shared = (suffix = '') => `/tmp/${NAME}.2${suffix}`;
afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
  for (const f of [shared(), shared('.sock'), shared('.dgram'), shared('.cli')]) rmSync(f, { force: true });
});

/** `appshot args...` from `cwd` (by default /, not under /tmp). */
function appshot(args: string[], cwd = '/') {
  const r = spawnSync(command, args, { env: sb.env, cwd, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
function ok(args: string[]): string {
  const r = appshot(args);
  if (r.code !== 0) throw new Error(`appshot ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const privateRoot = (aid: string) => sb.json<{ privateRoot?: string }[]>(['ps', aid])[0].privateRoot;
/** What pidtmp `read` prints inside `aid` of PID 2's files. */
const readIn = (aid: string) => ok(['exec', aid, '--', fixture('pidtmp'), 'read', NAME, '2']).trim();

async function holding(aid: string, tag: string, flags: string[], extra: string[] = []): Promise<void> {
  ok(['run', '-d', '--aid', aid, ...flags, '--', fixture('pidtmp'), 'hold', NAME, tag, ...extra]);
  await waitFor(() => /^(HOLDING|TAKEN|FAIL)/m.test(sb.log(aid)), 15_000, `${aid} to make its file`);
}

it('two applications with --private-tmp each have their own /tmp, also as /proc/2/root/tmp and for unix socket names; without it they collide', async () => {
  await holding('pta', 'A', ['--private-tmp']);
  await holding('ptb', 'B', ['--private-tmp']);
  // Read back through /proc/2/root/tmp/... by the process itself.
  expect(sb.log('pta')).toMatch(/^HOLDING 2 A$/m);
  expect(sb.log('ptb')).toMatch(/^HOLDING 2 B$/m);
  // Another process of each: the file, the same through /proc/2/root, and
  // the socket connected as jcmd connects.
  expect(readIn('pta')).toBe('READ file=A root=A sock=A');
  expect(readIn('ptb')).toBe('READ file=B root=B sock=B');
  expect(existsSync(shared())).toBe(false);
  const roots = ['pta', 'ptb'].map(privateRoot);
  expect(roots[0]).not.toBe(roots[1]);
  for (const [i, root] of roots.entries()) {
    expect(root).toMatch(new RegExp(`^${sb.home}/instances/pt[ab]\\.[0-9a-f]{8}$`));
    expect(lstatSync(root!).mode & 0o7777).toBe(0o711);
    expect(lstatSync(join(root!, 'tmp')).mode & 0o7777).toBe(0o1777);
    expect(readFileSync(join(root!, 'tmp', `${NAME}.2`), 'utf8')).toBe('AB'[i]);
    expect(lstatSync(join(root!, 'tmp', `${NAME}.2.sock`)).isSocket()).toBe(true);
  }

  // The same two without it: one /tmp, and the second finds the first's.
  await holding('ptc', 'C', []);
  await holding('ptd', 'D', []);
  expect(sb.log('ptc')).toMatch(/^HOLDING 2 C$/m);
  expect(sb.log('ptd')).toMatch(new RegExp(`^TAKEN ${shared()}$`, 'm'));
  expect(readFileSync(shared(), 'utf8')).toBe('C');
  ok(['stop', 'ptc']);
});

it('a unix datagram server and its client in /tmp with --private-tmp: sent to by name, and answered with the /tmp names', async () => {
  ok(['run', '-d', '--aid', 'ptg', '--private-tmp', '--', fixture('pidtmp'), 'dgram', NAME]);
  await waitFor(() => /^(DGRAM|FAIL)/m.test(sb.log('ptg')), 15_000, 'ptg to exchange its datagrams');
  // sendto, sendmsg and sendmmsg reached the server bound at the private
  // /tmp (they went to the real /tmp: ENOENT); the server answered the
  // client at the name recvfrom gave. getsockname, getpeername and the
  // senders' names are the /tmp ones, not the private directory's: a
  // test's state directory is itself under /tmp, where such a name sent
  // to again would be redirected a second time. An abstract name and an
  // address without a name go to the kernel as they are.
  const cli = shared('.cli'), srv = shared('.dgram');
  expect(sb.log('ptg')).toMatch(new RegExp(`^DGRAM sendto=one reply=two sendmsg=three mmsg=four from=${cli} msgfrom=${cli} sock=${srv} peer=${srv} abstract=five unnamed=EINVAL$`, 'm'));
  // It has exited: its private root by name (privatetmp.ts newPrivateRoot).
  const roots = readdirSync(join(sb.home, 'instances')).filter((n) => n.startsWith('ptg.'));
  expect(roots).toHaveLength(1);
  expect(lstatSync(join(sb.home, 'instances', roots[0], 'tmp', `${NAME}.2.dgram`)).isSocket()).toBe(true);
  expect(existsSync(srv)).toBe(false);
});

it('a snapshot and its restore keep the private /tmp; rm removes it', async () => {
  const root = privateRoot('pta')!;
  const image = join(dir, 'pta.img');
  ok(['snapshot', 'pta', '-o', image]);
  expect(existsSync(join(root, 'tmp', `${NAME}.2`))).toBe(true);
  ok(['restore', image]);
  expect(privateRoot('pta')).toBe(root);
  expect(readIn('pta')).toBe('READ file=A root=A sock=A');
  // Restored beside it under another AID, both would use one private /tmp
  // (review r250): refused, nothing registered.
  const beside = join(dir, 'pta-lr.img');
  ok(['snapshot', 'pta', '--leave-running', '-o', beside]);
  const twice = appshot(['restore', beside, '--aid', 'pta2']);
  expect(twice.stderr).toMatch(/^appshot: cannot restore \S+: the image's private \/tmp is that of 'pta', which is running: restored beside it, both would use it/);
  expect(twice.code).toBe(4);
  expect(sb.allAids()).not.toContain('pta2');
  const other = privateRoot('ptb')!;
  ok(['stop', 'pta', 'ptb']);
  await waitFor(() => !sb.aids().includes('pta') && !sb.aids().includes('ptb'), 15_000, 'pta and ptb to end');
  ok(['rm', 'pta', 'ptb']);
  expect(existsSync(root)).toBe(false);
  expect(existsSync(other)).toBe(false);
});

it('each clone of a template made with a private /tmp has its own copy of it', async () => {
  await holding('pte', 'E', ['--private-tmp'], ['nosock']);
  const image = join(dir, 'pte.img');
  const template = join(dir, 'pte.template');
  ok(['snapshot', 'pte', '-o', image]);
  ok(['template', 'create', image, '-o', template]);
  ok(['clone', template, '--aid', 'ptc', '-n', '2']);
  const roots = ['ptc-1', 'ptc-2'].map(privateRoot);
  expect(roots[0]).not.toBe(roots[1]);
  for (const aid of ['ptc-1', 'ptc-2']) expect(readIn(aid)).toBe('READ file=E root=E sock=-');
  ok(['exec', 'ptc-1', '--', 'sh', '-c', 'echo one > /tmp/only']);
  expect(appshot(['exec', 'ptc-2', '--', 'cat', '/tmp/only']).code).not.toBe(0);
  expect(readFileSync(join(roots[0]!, 'tmp', 'only'), 'utf8')).toBe('one\n');
  expect(existsSync('/tmp/only') && readFileSync('/tmp/only', 'utf8') === 'one\n').toBe(false);
});

it('refuses --private-tmp with rules that redirect /tmp, or from a working directory under /tmp (run, and exec in such an application)', async () => {
  const rules = join(dir, 'tmp.rules');
  writeFileSync(rules, `REDIR PATH "/tmp" TO "${dir}/elsewhere"\n`);
  const r = appshot(['run', '--private-tmp', '--rules', rules, '--', 'true']);
  expect(r.code).toBe(2);
  expect(r.stderr).toMatch(/--private-tmp and the rules' REDIR PATH "\/tmp" both redirect \/tmp/);
  const inTmp = mkdtempSync('/tmp/appshot-privatetmp-cwd-');
  try {
    const c = appshot(['run', '--private-tmp', '--', 'true'], inTmp);
    expect(c.code).toBe(2);
    expect(c.stderr).toMatch(/--private-tmp: the working directory \S+ is under \/tmp/);
    // exec would start the command in the real /tmp (review r250).
    await holding('ptx', 'X', ['--private-tmp'], ['nosock']);
    const e = appshot(['exec', 'ptx', '--', 'true'], inTmp);
    expect(e.stderr).toMatch(/^appshot: 'ptx' has a private \/tmp, and the working directory \S+ is under the real one/);
    expect(e.code).toBe(2);
    ok(['rm', '-f', 'ptx']);
  } finally {
    rmSync(inTmp, { recursive: true, force: true });
  }
  // Nothing was left registered or made.
  expect(sb.allAids().filter((a) => !/^pt/.test(a))).toEqual([]);
});

// Review r250: what the tests above do not reach.
describe('review r250', () => {
  /** A run of `args` in a state directory of its own (no engine), from `/`, under `umask`. */
  function inHome(home: string, args: string[], umask = '022') {
    const r = spawnSync('sh', ['-c', `umask ${umask}; exec "$0" "$@"`, command, ...args], { env: { ...sb.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' }, cwd: '/', encoding: 'utf8', timeout: 50_000 });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  }

  it('a template is made of an application whose private /tmp holds a FIFO (anyone may put one there: it is 01777)', async () => {
    await holding('ptf', 'F', ['--private-tmp'], ['nosock']);
    ok(['exec', 'ptf', '--', 'mkfifo', '/tmp/a-fifo']);
    // And the name a socket bound and closed leaves (a JVM's attach socket).
    ok(['exec', 'ptf', '--', '/usr/bin/python3', '-c', "import socket; socket.socket(socket.AF_UNIX).bind('/tmp/stale.sock')"]);
    ok(['exec', 'ptf', '--', 'test', '-S', '/tmp/stale.sock']);
    const image = join(dir, 'ptf.img');
    ok(['snapshot', 'ptf', '-o', image]);
    const t = appshot(['template', 'create', image, '-o', join(dir, 'ptf.template')]);
    expect(t.stderr).not.toMatch(/cannot copy/);
    expect(t.code, t.stderr).toBe(0);
    // Made anew in the template's copy, empty; the socket's stale name
    // left out.
    const copied = readdirSync(join(dir, 'ptf.template', 'private'), { recursive: true, withFileTypes: true });
    expect(copied.filter((e) => e.name === 'a-fifo').map((e) => e.isFIFO())).toEqual([true]);
    expect(copied.filter((e) => e.isSocket())).toEqual([]);
  });

  it("an application's processes of another user reach their private /tmp when root runs it under umask 077", () => {
    const home = mkdtempSync('/var/tmp/appshot-ptumask-');
    chmodSync(home, 0o755);
    try {
      const r = inHome(home, ['run', '--private-tmp', '--', ...asNobody, 'sh', '-c', 'echo x > /tmp/probe && cat /tmp/probe'], '077');
      expect(r.stderr).not.toMatch(/Permission denied/);
      expect(r.stdout).toBe('x\n');
    } finally {
      inHome(home, ['prune']);
      rmSync(home, { recursive: true, force: true });
    }
  });

  it('/proc//self/root/tmp/... (a path the kernel reads as /proc/self/root/tmp/...) is the private /tmp too', () => {
    const r = appshot(['run', '--aid', 'ptu', '--private-tmp', '--', 'sh', '-c', `echo a > /proc//self/root/tmp/${NAME}.unplain; cat /tmp/${NAME}.unplain`]);
    const leaked = existsSync(`/tmp/${NAME}.unplain`);
    rmSync(`/tmp/${NAME}.unplain`, { force: true });
    expect(leaked).toBe(false);
    expect(r.stdout).toBe('a\n');
  });

  it('with a state directory under /tmp, a path built from getcwd() in /tmp is not redirected twice', () => {
    const home = mkdtempSync('/tmp/appshot-pthome-');
    try {
      const r = inHome(home, ['run', '--private-tmp', '--', 'sh', '-c', 'cd /tmp && echo y > f && cat "$(pwd -P)/f"']);
      expect(r.stderr).not.toMatch(/No such file/);
      expect(r.stdout).toBe('y\n');
    } finally {
      inHome(home, ['prune']);
      rmSync(home, { recursive: true, force: true });
    }
  });
});
