/**
 * File locks held again by the same holders after a restore: the locks
 * fixture takes flock (shared, exclusive, and one on a description a
 * forked child shares), POSIX read and write ranges, OFD ranges and a
 * lease, and has a process waiting in F_SETLKW; a checker process it forks
 * keeps finding each lock held, by the right (virtual) PID. A restore whose
 * locks someone else holds now fails naming the lock, the file and the
 * process, and leaves nothing; a template whose clones would all share one
 * exclusive lock is refused by name, and clones whose files are their own
 * hold their own locks.
 */
import { constants, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-locks-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const logOf = (aid: string) => sb.log(aid);
const checksPass = (aid: string) => sb.checksPass(aid);
const systemPid = (aid: string, vpid = 2) => sb.systemPid(aid, vpid);

const run = (args: string[]) => sb.ok(args);

/** SIGHUP: the fixture releases `wait` to its waiter and checks its own
 * flocks are its own to convert. */
const exercised = (aid: string) => sb.exercised(aid, 'to use its locks');

/** A directory of lock files of its own for each application. */
function lockDir(name: string): string {
  const d = join(out, `${name}-files`);
  mkdirSync(d);
  return d;
}

const INSPECTED =
  /file locks: fd 3 exclusive flock; fd 4 shared flock; fd 5 POSIX read lock on bytes 0-9; fd 5 POSIX write lock on bytes 20-29; fd 5 POSIX read lock on bytes 40-49; fd 5 POSIX write lock from byte 100 to the end; fd 7 OFD write lock on bytes 0-4; fd 7 OFD read lock on bytes 10-19; fd 8 read lease; fd 9 exclusive flock; fd 10 POSIX write lock from byte 0 to the end\n/;

describe('file locks: flock, POSIX, OFD and leases, held by the same holders after a restore', () => {
  it('comes back from a snapshot that ends it, each lock held, its waiter still waiting', async () => {
    const aid = 'lk1';
    run(['run', '-d', '--aid', aid, '--', fixture('locks'), lockDir(aid)]);
    await checksPass(aid);
    expect(logOf(aid)).toMatch(/^LEASE on$/m);
    run(['snapshot', aid, '-o', join(out, aid)]);
    const inspected = run(['inspect', join(out, aid)]);
    expect(inspected).toMatch(INSPECTED);
    // The lock of the description process 3 shares is taken once.
    expect(inspected.match(/file locks: /g)).toHaveLength(1);
    run(['restore', join(out, aid)]);
    await checksPass(aid);
    await exercised(aid);
    await checksPass(aid);
  });

  it("a lease's break signal (F_SETSIG) is kept: the break comes as that signal, with its descriptor", async () => {
    const aid = 'lksig';
    const dir = lockDir(aid);
    run(['run', '-d', '--aid', aid, '--', fixture('leasesig'), dir]);
    await checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    expect(run(['inspect', join(out, aid)])).toMatch(/file locks: fd 3 read lease\n/);
    // Two read leases on one file coexist; a break breaks both, so the
    // original goes before the copy's lease is broken.
    run(['restore', join(out, aid), '--aid', 'lksig2', '--lazy']);
    await checksPass('lksig2');
    await checksPass(aid);
    run(['stop', aid]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
    await exercised('lksig2');
    await checksPass('lksig2');
    // Once more from a snapshot that ends it.
    run(['snapshot', 'lksig2', '-o', join(out, 'lksig2')]);
    run(['restore', join(out, 'lksig2')]);
    await checksPass('lksig2');
    await exercised('lksig2');
    await checksPass('lksig2');
  });

  it('a --leave-running snapshot: refused beside the original, whose locks it holds; restored --lazy once the original is gone', async () => {
    const aid = 'lk2';
    const dir = lockDir(aid);
    run(['run', '-d', '--aid', aid, '--', fixture('locks'), dir]);
    await checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    await checksPass(aid);
    const r = sb.run(['restore', join(out, aid), '--aid', 'lk3']);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(`process 2 (locks) fd 3: cannot take its exclusive flock on ${dir}/excl again: another process holds a conflicting lock on it now`);
    expect(sb.aids()).not.toContain('lk3');
    // The original never noticed.
    await checksPass(aid);
    run(['stop', aid, '--signal', 'KILL']); // its children outlive a SIGTERM to it
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
    run(['restore', join(out, aid), '--aid', 'lk3', '--lazy']);
    await checksPass('lk3');
    await exercised('lk3');
    await checksPass('lk3');
  });

  it('refuses at snapshot a lease being broken, naming it, and leaves the application running', async () => {
    const aid = 'lk6';
    const dir = lockDir(aid);
    run(['run', '-d', '--aid', aid, '--', fixture('locks'), dir, 'lease-only']);
    await waitFor(() => /READY fd=\d+/.test(logOf(aid)), 10_000, `${aid} to start`);
    const fd = /READY fd=(\d+)/.exec(logOf(aid))![1];
    // Opening the file to write it breaks the lease: it stays "being broken"
    // until its holder gives it up (this one never does) or the kernel's
    // lease-break-time passes.
    expect(() => openSync(join(dir, 'lease'), constants.O_WRONLY | constants.O_NONBLOCK)).toThrow(/EWOULDBLOCK|EAGAIN/);
    const r = sb.run(['snapshot', aid, '-o', join(out, aid)]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain(`process 2 (locks) fd ${fd} (${dir}/lease): a lease being broken (another process opened the file) cannot be captured yet; the application was left running`);
    expect(existsSync(join(out, aid))).toBe(false);
    const status = readFileSync(`/proc/${systemPid(aid)}/status`, 'utf8');
    expect(status).toMatch(/^TracerPid:\s+0$/m);
    expect(status).not.toMatch(/^State:\s+[tT]/m);
  });

  it('refuses a template whose clones would all take one exclusive lock, naming it', async () => {
    const aid = 'lk4';
    const dir = lockDir(aid);
    run(['run', '-d', '--aid', aid, '--', fixture('locks'), dir]);
    await checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid)]);
    const t = sb.run(['template', 'create', join(out, aid), '-o', join(out, `${aid}.template`)]);
    expect(t.code, t.stderr).not.toBe(0);
    expect(t.stderr).toContain(`process 2 (locks) fd 3: holds an exclusive flock on ${dir}/excl, a file every clone shares (share)`);
    expect(t.stderr).toContain(`process 2 (locks) fd 8: holds a read lease on ${dir}/lease, a file every clone shares (share)`);
    // Each named, on one line.
    expect(t.stderr.trim().split('\n')).toHaveLength(1);
    expect(t.stderr).toMatch(/cannot make a template of \S+: 2 resources: process 2 \(locks\) fd 3: .*; process 2 \(locks\) fd 8: /);
    expect(existsSync(join(out, `${aid}.template`))).toBe(false);
  });

  it('clones whose files are their own (REDIR PATH) each hold their own locks', async () => {
    const aid = 'lk5';
    const data = join(out, `${aid}-data`);
    mkdirSync(data);
    const rules = join(out, `${aid}.rules`);
    writeFileSync(rules, `DEFINE <APPL-ID> AS PROPERTY application-id\nREDIR PATH "${data}" TO "${join(out, `${aid}-inst`)}/<APPL-ID>"\n`);
    run(['run', '-d', '--aid', aid, '--rules', rules, '--', fixture('locks'), data]);
    await checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid)]);
    run(['template', 'create', join(out, aid), '-o', join(out, `${aid}.template`)]);
    run(['clone', join(out, `${aid}.template`), '--aid', 'lkc', '--count', '2']);
    for (const c of ['lkc-1', 'lkc-2']) {
      await checksPass(c);
      expect(existsSync(join(out, `${aid}-inst`, c, 'excl'))).toBe(true);
      await exercised(c);
      await checksPass(c);
    }
  });
});
