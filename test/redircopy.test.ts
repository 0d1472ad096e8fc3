/**
 * A clone's copies of its template's files at REDIR PATH targets, made by
 * a root clone for an application run as nobody (template/clone.ts,
 * resources/paths.ts privateCopy): what is copied is only what the
 * process itself could read, read from descriptors opened as the process
 * (review: root reopened the name it had checked, and copied a working
 * directory whole, files only root may read included). And a copy two
 * clones race for is removed by the one that fails only if it made it and
 * no other instance uses it.
 *
 * The application: a shell run as nobody, its working directory APP/work,
 * holding APP/pub open on descriptor 3.
 */
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import { asNobody, cli, fixture, root, NOBODY, Sandbox, stoppedAt, waitFor } from './helpers.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-redircopy-'));
// nobody walks to its own directory under here.
chmodSync(out, 0o755);
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start, attempt } = ownedTests(sb);

/** The one line a refused command printed (no stack, no second line). */
function refusal(stderr: string): string {
  const lines = stderr.trim().split('\n').filter((l) => l.trim() !== '');
  expect(lines, stderr).toHaveLength(1);
  return lines[0];
}

/** A file only root may read, beside the application's directory. */
const secret = join(out, 'root-only');
writeFileSync(secret, 'ROOT ONLY\n', { mode: 0o600 });

/** `name`'s application directory (nobody's): pub, work/note, and
 * work/link, a symlink to the root-only file (copied as a link, never
 * followed). */
function makeApp(name: string): string {
  const app = join(out, name);
  mkdirSync(join(app, 'work'), { recursive: true, mode: 0o755 });
  writeFileSync(join(app, 'pub'), 'public\n', { mode: 0o644 });
  writeFileSync(join(app, 'work', 'note'), 'note\n', { mode: 0o640 });
  symlinkSync(secret, join(app, 'work', 'link'));
  for (const p of [app, join(app, 'work'), join(app, 'pub'), join(app, 'work', 'note')]) chownSync(p, NOBODY, NOBODY);
  return app;
}

/** The application run as nobody, snapshotted, and made a template whose
 * rules are `rules`: the template's path. */
async function template(aid: string, app: string, rules: string): Promise<string> {
  await start(aid, [...asNobody, 'sh', '-c', `cd ${app}/work && exec 3<${app}/pub; echo READY; while sleep 0.05; do :; done`]);
  await waitFor(() => /READY/.test(sb.log(aid)), 10_000, `${aid} to start`);
  const image = join(out, `${aid}.img`);
  await run(['snapshot', aid, '-o', image]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  const rulesFile = join(out, `${aid}.rules`);
  writeFileSync(rulesFile, rules);
  const tpl = join(out, `${aid}.template`);
  await run(['template', 'create', image, '-o', tpl, '--rules', rulesFile]);
  return tpl;
}

/** The shell of clone `aid` (its sleeps come and go). */
const shellOf = (aid: string) => sb.systemPid(aid);

describe.skipIf(process.getuid?.() !== 0)('a root clone copies to REDIR PATH targets only what its process run as nobody could read', () => {
  it('a working directory holding a file only root may read is refused (exit 5) in one line, a FIFO there (exit 1), no copy and no directory left; without them, the copy is the tree as nobody reads it, a symlink copied as a link', async () => {
    const app = makeApp('tree');
    const into = join(out, 'tree-into');
    const tpl = await template('rctree', app, `REDIR PATH "${app}" TO "${into}/app"\n`);
    // Put in the working directory after the snapshot, by root.
    writeFileSync(join(app, 'work', 'root-only'), 'ROOT ONLY\n', { mode: 0o600 });
    const r = await attempt(['clone', tpl, '--aid', 'rctree-refused']);
    expect(r.code, r.stderr).toBe(5);
    expect(refusal(r.stderr)).toMatch(new RegExp(`: process \\d+: working directory: ${app}/work/root-only, copied for the instance, cannot be read with the credentials of the process .*\\(fsuid ${NOBODY}, fsgid ${NOBODY}\\): EACCES$`));
    expect(sb.aids()).not.toContain('rctree-refused');
    expect(readdirSync(out)).not.toContain('tree-into');

    rmSync(join(app, 'work', 'root-only'));

    // A FIFO there (nobody's): no copy of one is made, nor is it opened
    // for reading (which would wait for a writer).
    const fifo = spawnSync(asNobody[0], [...asNobody.slice(1), 'mkfifo', join(app, 'work', 'fifo')], { encoding: 'utf8' });
    expect(fifo.status, fifo.stderr).toBe(0);
    const f = await attempt(['clone', tpl, '--aid', 'rctree-fifo']);
    expect(f.code, f.stderr).toBe(1);
    expect(refusal(f.stderr)).toMatch(new RegExp(`: ${app}/work/fifo is not a regular file, directory or symbolic link: no private copy of ${app}/work is made$`));
    expect(readdirSync(out)).not.toContain('tree-into');
    rmSync(join(app, 'work', 'fifo'));

    await run(['clone', tpl, '--aid', 'rctree-ok']);
    const pid = shellOf('rctree-ok');
    expect(readlinkSync(`/proc/${pid}/cwd`)).toBe(`${into}/app/work`);
    expect(readlinkSync(`/proc/${pid}/fd/3`)).toBe(`${into}/app/pub`);
    expect(readFileSync(`${into}/app/pub`, 'utf8')).toBe('public\n');
    expect(readFileSync(`${into}/app/work/note`, 'utf8')).toBe('note\n');
    for (const p of ['pub', 'work', 'work/note']) expect(lstatSync(join(into, 'app', p)).uid, p).toBe(NOBODY);
    expect(lstatSync(`${into}/app/work/note`).mode & 0o7777).toBe(0o640);
    expect(lstatSync(`${into}/app/work/link`).isSymbolicLink()).toBe(true);
    expect(readlinkSync(`${into}/app/work/link`)).toBe(secret);
    await run(['rm', '-f', 'rctree-ok']);
  });

  it('the file it holds, swapped by nobody for a symlink to a root-only file after the clone checked it: the copy is of the file checked, never the root-only one', async () => {
    const app = makeApp('swap');
    const into = join(out, 'swap-into');
    const tpl = await template('rcswap', app, `REDIR PATH "${app}/pub" TO "${into}/pub"\n`);
    const stopped = await stoppedAt(sb, ['clone', tpl, '--aid', 'rcswap-clone'], 'clone: redir copies checked', 'the clone to check its REDIR PATH copies');
    const swap = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', 'mv pub pub.real && ln -s "$1" pub', 'sh', secret], { cwd: app, encoding: 'utf8' });
    expect(swap.status, swap.stderr).toBe(0);
    const { code, stderr } = await stopped.go();
    expect(code, stderr).toBe(0);
    expect(readFileSync(`${into}/pub`, 'utf8')).toBe('public\n');
    expect(lstatSync(`${into}/pub`).uid).toBe(NOBODY);
    expect(readlinkSync(`/proc/${shellOf('rcswap-clone')}/fd/3`)).toBe(`${into}/pub`);
    await run(['rm', '-f', 'rcswap-clone']);
  });

  it('a symbolic link it holds itself (O_PATH|O_NOFOLLOW) is copied as a link, and its clone holds the copy', async () => {
    const app = join(out, 'lnk');
    mkdirSync(app, { mode: 0o755 });
    chownSync(app, NOBODY, NOBODY);
    await start('rclnk', [...asNobody, fixture('fdodds'), app, '--link-only']);
    await sb.checksPass('rclnk', 2);
    const image = join(out, 'rclnk.img');
    await run(['snapshot', 'rclnk', '-o', image]);
    await waitFor(() => !sb.aids().includes('rclnk'), 10_000, 'rclnk to end');
    const into = join(out, 'lnk-into');
    const rules = join(out, 'rclnk.rules');
    writeFileSync(rules, `REDIR PATH "${app}" TO "${into}/app"\n`);
    const tpl = join(out, 'rclnk.template');
    await run(['template', 'create', image, '-o', tpl, '--rules', rules]);
    await run(['clone', tpl, '--aid', 'rclnk-clone']);
    // The fixture checks its descriptor's flags and the link's text.
    await sb.checksPass('rclnk-clone', 3);
    expect(lstatSync(`${into}/app/link`).isSymbolicLink()).toBe(true);
    expect(readlinkSync(`${into}/app/link`)).toBe('fdodds-target');
    const pid = shellOf('rclnk-clone');
    expect(readdirSync(`/proc/${pid}/fd`).map((n) => readlinkSync(`/proc/${pid}/fd/${n}`))).toContain(`${into}/app/link`);
    await run(['rm', '-f', 'rclnk-clone']);
  });

  it("a copy-on-write file the process opened as root before it became nobody (lighttpd's PID file) is copied for its clone, the very file, and handed back as that copy", async () => {
    // A directory only root may enter: nobody can never open d/pid itself.
    const d = mkdtempSync(join(out, 'held-'));
    const f = join(d, 'pid');
    writeFileSync(f, 'held\n', { mode: 0o644 });
    await start('rcheld', ['sh', '-c', `exec 3>>${f}; exec ${asNobody.join(' ')} sh -c 'echo READY; while sleep 0.05; do :; done'`]);
    await waitFor(() => /READY/.test(sb.log('rcheld')), 10_000, 'rcheld to start');
    const image = join(out, 'rcheld.img');
    await run(['snapshot', 'rcheld', '-o', image]);
    await waitFor(() => !sb.aids().includes('rcheld'), 10_000, 'rcheld to end');
    const tpl = join(out, 'rcheld.template');
    await run(['template', 'create', image, '-o', tpl]);
    await run(['clone', tpl, '--aid', 'rcheld-clone']);
    const held = readlinkSync(`/proc/${shellOf('rcheld-clone')}/fd/3`);
    expect(held.startsWith(join(sb.home, 'instances') + '/'), held).toBe(true);
    expect(held.endsWith(f)).toBe(true);
    expect(readFileSync(held, 'utf8')).toBe('held\n');
    expect(lstatSync(held).uid).toBe(0);
    await run(['rm', '-f', 'rcheld-clone']);
  });

  it('a copy one clone made and another then took is left by the first when it fails; the second keeps reading it', async () => {
    const app = makeApp('race');
    const into = join(out, 'race-into');
    // No per-instance variable: every clone's target is the same file.
    const tpl = await template('rcrace', app, `REDIR PATH "${app}/pub" TO "${into}/pub"\n`);
    // The first made the copy and stops in its restore; the restore fails
    // once let go (APPSHOT_TEST_FAIL_AT at the same point).
    const first = await stoppedAt(sb, ['clone', tpl, '--aid', 'rcrace-1'], 'clone: redir copy made', 'the first clone to make its copy', { APPSHOT_TEST_FAIL_AT: 'clone: redir copy made' });
    expect(readFileSync(`${into}/pub`, 'utf8')).toBe('public\n');
    await run(['clone', tpl, '--aid', 'rcrace-2']);
    const second = shellOf('rcrace-2');
    expect(readlinkSync(`/proc/${second}/fd/3`)).toBe(`${into}/pub`);
    const failed = await first.go();
    expect(failed.code, failed.stderr).not.toBe(0);
    expect(failed.stderr).toMatch(/failure injected at 'clone: redir copy made'/);
    // Left: the second's descriptor is of the file at the target still.
    expect(readFileSync(`${into}/pub`, 'utf8')).toBe('public\n');
    expect(readlinkSync(`/proc/${second}/fd/3`)).toBe(`${into}/pub`);
    await run(['rm', '-f', 'rcrace-2']);

    // Alone, a failed clone removes the copy it made, and the directory
    // made for it.
    rmSync(into, { recursive: true, force: true });
    const alone = await stoppedAt(sb, ['clone', tpl, '--aid', 'rcrace-3'], 'clone: redir copy made', 'the clone to make its copy', { APPSHOT_TEST_FAIL_AT: 'clone: redir copy made' });
    expect(readFileSync(`${into}/pub`, 'utf8')).toBe('public\n');
    const gone = await alone.go();
    expect(gone.code, gone.stderr).not.toBe(0);
    expect(readdirSync(out)).not.toContain('race-into');
  });

  it('a clone killed (kill -9) just after it made a copy in a directory that was there: the next command removes the copy, and only it', async () => {
    const app = makeApp('killed');
    const into = join(out, 'killed-into');
    mkdirSync(into, { mode: 0o755 });
    writeFileSync(join(into, 'mine'), 'the user\'s\n');
    const tpl = await template('rckill', app, `REDIR PATH "${app}/pub" TO "${into}/pub"\n`);
    const r = spawnSync(process.execPath, [cli, 'clone', tpl, '--aid', 'rckill-1'], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: 'clone: redir copy made' }, encoding: 'utf8', timeout: 60_000 });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    expect(readFileSync(join(into, 'pub'), 'utf8')).toBe('public\n');
    // The next command (any) lets go what the killed clone left.
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes('rckill-1')), 20_000, 'the killed clone to be let go');
    expect(readdirSync(into)).toEqual(['mine']);
  });
});

// Review35b: a working directory copied into a directory the template's
// user owns (makeParents gives a made parent the original's owner): that
// user swaps the half-made copy (root's 0700 temporary name) for a symlink
// while root walks, and root's copies of the following entries land in a
// directory only root may write, nobody's bytes and nobody's owner.
describe.skipIf(process.getuid?.() !== 0)('review35b: the REDIR copy of a working directory, made in a directory nobody writes', () => {
  it('a symlink swapped in at the temporary name of the copy does not make root write elsewhere', async () => {
    const app = makeApp('deep');
    const deep = join(app, 'work', 'deep');
    mkdirSync(deep, { mode: 0o755 });
    chownSync(deep, NOBODY, NOBODY);
    const into = join(out, 'deep-into');
    // Only root may write here.
    const victim = join(out, 'victim');
    mkdirSync(victim, { mode: 0o755 });
    await start('rcdeep', [...asNobody, 'sh', '-c', `cd ${deep} && exec 3<${app}/pub; echo READY; while sleep 0.05; do :; done`]);
    await waitFor(() => /READY/.test(sb.log('rcdeep')), 10_000, 'rcdeep to start');
    const image = join(out, 'rcdeep.img');
    await run(['snapshot', 'rcdeep', '-o', image]);
    await waitFor(() => !sb.aids().includes('rcdeep'), 10_000, 'rcdeep to end');
    const rulesFile = join(out, 'rcdeep.rules');
    writeFileSync(rulesFile, `REDIR PATH "${app}" TO "${into}/app"\n`);
    const tpl = join(out, 'rcdeep.template');
    await run(['template', 'create', image, '-o', tpl, '--rules', rulesFile]);
    // Many entries (each opened as nobody: a thread switch), so that the
    // walk takes long enough for nobody's swap.
    const fill = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', 'for i in $(seq 1 3000); do echo x > f$i; done; echo evil > PWNED'], { cwd: deep, encoding: 'utf8' });
    expect(fill.status, fill.stderr).toBe(0);
    // nobody waits for root's temporary copy in INTO/app/work (nobody's:
    // made with APP/work's owner) and swaps it for a link to the victim.
    const swapper = spawn(asNobody[0], [...asNobody.slice(1), '/usr/bin/python3', join(root, 'test', 'fixtures', 'review35b-exchange.py'), `${into}/app/work`, victim], { stdio: 'ignore' });
    try {
      await attempt(['clone', tpl, '--aid', 'rcdeep-clone']);
    } finally {
      swapper.kill('SIGKILL');
    }
    // Found (review35b): every entry, nobody's bytes and owner, in a
    // directory only root may write (PWNED could as well be
    // /etc/ld.so.preload).
    expect(readdirSync(victim)).toEqual([]);
    await run(['rm', '-f', 'rcdeep-clone']).catch(() => undefined);
  }, 120_000);
});

describe.skipIf(process.getuid?.() !== 0)('review35b: a clone killed (kill -9) while it writes a REDIR PATH copy', () => {
  it('leaves no half-made copy under its temporary name once the next command ran', async () => {
    const app = makeApp('partial');
    const into = join(out, 'partial-into');
    mkdirSync(into, { mode: 0o755 });
    const tpl = await template('rcpartial', app, `REDIR PATH "${app}/pub" TO "${into}/pub"\n`);
    // Large enough that the copy is seen under way.
    const grow = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', 'head -c 300000000 /dev/zero >> pub'], { cwd: app, encoding: 'utf8' });
    expect(grow.status, grow.stderr).toBe(0);
    // In this process, not the engine's: the kill is of the clone itself.
    const c = spawn(process.execPath, [cli, 'clone', tpl, '--aid', 'rcpartial-1'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, stdio: 'ignore' });
    await waitFor(() => readdirSync(into).some((n) => n.startsWith('pub.appshot-')), 60_000, 'the copy to be under way');
    c.kill('SIGKILL');
    await new Promise((r) => c.once('exit', r));
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes('rcpartial-1')), 20_000, 'the killed clone to be let go');
    // Found (review35b): pub.appshot-<tag>, root's, 0600, with part of
    // nobody's bytes, left for good (only `pub` was recorded).
    expect(readdirSync(into)).toEqual([]);
  }, 120_000);
});

describe.skipIf(process.getuid?.() !== 0)('review35b: a failed clone removes the copy of a working directory it made', () => {
  it('by name, in a tree nobody owns: nobody cannot turn the removal on a directory only root may write', async () => {
    const app = makeApp('rmrace');
    const work = join(app, 'work');
    const n = 1000;
    const fill = spawnSync(asNobody[0], [...asNobody.slice(1), '/usr/bin/python3', '-c', `import os\nfor i in range(${n}):\n    os.mkdir(f's{i}'); open(f's{i}/x', 'w').write('a')`], { cwd: work, encoding: 'utf8' });
    expect(fill.status, fill.stderr).toBe(0);
    const into = join(out, 'rmrace-into');
    // Only root may write here; its x is root's.
    const victim = join(out, 'rmrace-victim');
    mkdirSync(victim, { mode: 0o755 });
    writeFileSync(join(victim, 'x'), 'root\n', { mode: 0o644 });
    // No descriptor: the working directory is the one copy.
    await start('rcrm', [...asNobody, 'sh', '-c', `cd ${work}; echo READY; while sleep 0.05; do :; done`]);
    await waitFor(() => /READY/.test(sb.log('rcrm')), 10_000, 'rcrm to start');
    const image = join(out, 'rcrm.img');
    await run(['snapshot', 'rcrm', '-o', image]);
    await waitFor(() => !sb.aids().includes('rcrm'), 10_000, 'rcrm to end');
    const rulesFile = join(out, 'rcrm.rules');
    writeFileSync(rulesFile, `REDIR PATH "${app}" TO "${into}/app"\n`);
    const tpl = join(out, 'rcrm.template');
    await run(['template', 'create', image, '-o', tpl, '--rules', rulesFile]);
    const stopped = await stoppedAt(sb, ['clone', tpl, '--aid', 'rcrm-1'], 'clone: redir copy made', 'the clone to copy the working directory', { APPSHOT_TEST_FAIL_AT: 'clone: redir copy made' });
    // The copy: nobody's, as its original.
    expect(lstatSync(`${into}/app/work`).uid).toBe(NOBODY);
    const toggler = spawn(asNobody[0], [...asNobody.slice(1), '/usr/bin/python3', join(root, 'test', 'fixtures', 'review35b-toggle.py'), `${into}/app/work`, victim, String(n)], { stdio: ['ignore', 'pipe', 'ignore'] });
    let said = '';
    toggler.stdout!.on('data', (d: Buffer) => (said += d.toString()));
    await waitFor(() => said.includes('READY'), 30_000, 'the toggler');
    try {
      const failed = await stopped.go();
      expect(failed.code, failed.stderr).not.toBe(0);
    } finally {
      toggler.kill('SIGKILL');
    }
    // Found (review35b): root's rm of the copy followed nobody's symlink
    // into the victim and removed root's x.
    expect(readdirSync(victim)).toEqual(['x']);
  }, 180_000);
});

describe.skipIf(process.getuid?.() !== 0)('review35b: a later copy into a directory an earlier copy gave nobody', () => {
  it('is not made through a symlink nobody put there meanwhile', async () => {
    const app = makeApp('later');
    const work = join(app, 'work');
    const fill = spawnSync(asNobody[0], [...asNobody.slice(1), 'sh', '-c', 'echo a > a && mkdir sub && echo nobody-bytes > sub/b'], { cwd: work, encoding: 'utf8' });
    expect(fill.status, fill.stderr).toBe(0);
    const into = join(out, 'later-into');
    // Only root may write here.
    const victim = join(out, 'later-victim');
    mkdirSync(victim, { mode: 0o755 });
    await start('rclater', [...asNobody, 'sh', '-c', `cd /; exec 3<${work}/a 4<${work}/sub/b; echo READY; while sleep 0.05; do :; done`]);
    await waitFor(() => /READY/.test(sb.log('rclater')), 10_000, 'rclater to start');
    const image = join(out, 'rclater.img');
    await run(['snapshot', 'rclater', '-o', image]);
    await waitFor(() => !sb.aids().includes('rclater'), 10_000, 'rclater to end');
    const rulesFile = join(out, 'rclater.rules');
    writeFileSync(rulesFile, `REDIR PATH "${app}" TO "${into}/app"\n`);
    const tpl = join(out, 'rclater.template');
    await run(['template', 'create', image, '-o', tpl, '--rules', rulesFile]);
    const stopped = await stoppedAt(sb, ['clone', tpl, '--aid', 'rclater-1'], 'clone: redir copy made', 'the first copy');
    // INTO/app/work: made for the first copy, nobody's (as APP/work).
    expect(lstatSync(`${into}/app/work`).uid).toBe(NOBODY);
    const link = spawnSync(asNobody[0], [...asNobody.slice(1), 'ln', '-s', victim, `${into}/app/work/sub`], { encoding: 'utf8' });
    expect(link.status, link.stderr).toBe(0);
    // The second copy stops at the same point: let it go on too.
    const done = stopped.go();
    const conts = setInterval(() => {
      const pids = spawnSync('pgrep', ['-f', 'clone .*--aid rclater-1'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
      for (const pid of pids)
        try {
          process.kill(Number(pid), 'SIGCONT');
        } catch {
          /* gone */
        }
    }, 200);
    const refused = await done;
    clearInterval(conts);
    // Found (review35b): root made victim/b, nobody's bytes and owner.
    // The walk to the copy's directory meets nobody's link: refused,
    // nothing made through it, nothing left of the clone.
    expect(readdirSync(victim)).toEqual([]);
    expect(refused.code, refused.stderr).not.toBe(0);
    expect(refused.stderr).toMatch(/sub is a symbolic link of another user's \(uid 65534\): nothing is made or removed through it/);
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes('rclater-1')), 20_000, 'the refused clone to leave nothing');
  }, 120_000);
});
