/**
 * POSIX message queues (resources/mqueue.ts) through real snapshots and
 * restores of test/fixtures/mqueues.c, which checks its queues itself: a
 * named one, full, through two descriptions; an unlinked one holding a
 * full-size message; an empty unlinked one registered for notification
 * (SIGEV_NONE). Restored on the node it was taken on (the named queue
 * still exists, with its messages), as on another node (it does not: made
 * and filled), beside a queue of its name with other attributes
 * (refused), and under a RLIMIT_MSGQUEUE too small (one error, nothing
 * left). A registration with a signal is carried with its sigev_value
 * (noted by the preload library); one made by a raw system call, which the
 * library does not see, is refused by name and the queue left as it was.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { cli, fixture, Sandbox, snapshotKilledAt, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-mqueue-'));
const names: string[] = [];
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
  for (const n of names) gone(n);
});

/** A queue name of this test's own. */
function queueName(tag: string): string {
  const n = `/appshot-test-mq-${process.pid}-${tag}`;
  names.push(n);
  return n;
}

function gone(name: string): void {
  try {
    addon().mqUnlink(name);
  } catch {
    /* not there */
  }
}

function exists(name: string): boolean {
  try {
    const fd = addon().mqOpen(name, 0, 0, 0, 0);
    closeSync(fd);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

async function stopped(aid: string): Promise<void> {
  sb.ok(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

async function started(aid: string, args: string[]): Promise<void> {
  sb.ok(['run', '-d', '--aid', aid, '--', fixture('mqueues'), ...args]);
  await sb.checksPass(aid);
}

describe('POSIX message queues: named and unlinked, their messages, flags and a SIGEV_NONE registration, restored exactly', () => {
  it('snapshot (ends it) → restore where the named queue still is; --leave-running → restore --lazy beside it', async () => {
    const name = queueName('trip');
    await started('mq1', [name]);
    sb.ok(['snapshot', 'mq1', '-o', join(out, 'mq1')]);
    expect(exists(name)).toBe(true); // a queue outlives its processes
    sb.ok(['restore', join(out, 'mq1')]);
    await sb.checksPass('mq1');
    await sb.exercised('mq1', 'to use its queues');
    await sb.checksPass('mq1');
    await stopped('mq1');
    gone(name);

    await started('mq2', [name]);
    sb.ok(['snapshot', 'mq2', '-o', join(out, 'mq2'), '--leave-running']);
    await sb.checksPass('mq2');
    sb.ok(['restore', join(out, 'mq2'), '--aid', 'mq3', '--lazy']);
    await sb.checksPass('mq3');
    // The named queue is one, the original's and the copy's: the copy
    // alone uses it.
    await stopped('mq2');
    await sb.exercised('mq3', 'to use its queues');
    await sb.checksPass('mq3');
    await stopped('mq3');
    gone(name);
  });

  it('on a node without the named queue: made with its attributes and filled', async () => {
    const name = queueName('made');
    await started('mq4', [name]);
    sb.ok(['snapshot', 'mq4', '-o', join(out, 'mq4')]);
    gone(name);
    expect(sb.ok(['inspect', join(out, 'mq4')])).toMatch(new RegExp(`POSIX message queue ${name}, 5 of 5 messages \\(22 bytes, at most 64 each\\)`));
    sb.ok(['restore', join(out, 'mq4'), '--lazy']);
    await sb.checksPass('mq4');
    await sb.exercised('mq4', 'to use its queues');
    await stopped('mq4');
    expect(exists(name)).toBe(true);
    gone(name);
  });

  it('a queue of its name with other attributes: refused, naming both, nothing left', async () => {
    const name = queueName('other');
    await started('mq5', [name]);
    sb.ok(['snapshot', 'mq5', '-o', join(out, 'mq5')]);
    gone(name);
    const other = addon().mqOpen(name, 2 | 0o100 | 0o200, 0o600, 3, 32);
    try {
      const r = sb.run(['restore', join(out, 'mq5')]);
      expect(r.code, r.stderr).not.toBe(0);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain(`the POSIX message queue ${name} exists on this node with 3 messages of 32 bytes, the image's has 5 of 64: another queue took its name`);
      expect(sb.aids()).not.toContain('mq5');
      expect(addon().mqAttributes(other)).toEqual({ maxmsg: 3, msgsize: 32, curmsgs: 0 });
    } finally {
      closeSync(other);
      gone(name);
    }
  });

  it('queues the restorer\'s RLIMIT_MSGQUEUE cannot hold: one clear error, no queue left', async () => {
    const name = queueName('limit');
    await started('mq6', [name]);
    sb.ok(['snapshot', 'mq6', '-o', join(out, 'mq6')]);
    gone(name);
    // Room for the named queue (some 800 bytes), not for the unlinked one
    // (3 x 8192): the named one, made first, is removed again.
    const r = spawnSync('prlimit', ['--msgqueue=10000:', process.execPath, cli, 'restore', join(out, 'mq6')], { env: sb.env, encoding: 'utf8', timeout: 50_000 });
    expect(r.status, r.stderr).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/cannot make the POSIX message queue \S+( \(unlinked\))? \(\d+ messages of \d+ bytes\): EMFILE \(the restorer's RLIMIT_MSGQUEUE is used up\)/);
    expect(exists(name)).toBe(false);
    expect(sb.aids()).not.toContain('mq6');
  });

  it('a restore killed (kill -9) after making the named queue: the next command removes it, as it removes an abandoned restore\'s SysV objects', async () => {
    const name = queueName('killed');
    await started('mq8', [name]);
    sb.ok(['snapshot', 'mq8', '-o', join(out, 'mq8')]);
    gone(name);
    const r = spawnSync(process.execPath, [cli, 'restore', join(out, 'mq8')], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: 'restore: fds' }, encoding: 'utf8', timeout: 50_000 });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    expect(sb.run(['ps']).code).toBe(0);
    await waitFor(() => (sb.run(['ps']), !sb.aids().includes('mq8')), 10_000, 'the registration of mq8 to go');
    expect(exists(name)).toBe(false);
    // The image restores whole afterwards.
    sb.ok(['restore', join(out, 'mq8')]);
    await sb.checksPass('mq8');
    await stopped('mq8');
    gone(name);
  });

  it('a full queue a process outside the application waits to send to: the snapshot refused by name, its message not lost', async () => {
    const name = queueName('waiting');
    await started('mq9', [name]);
    // Full (5 of 5): the sender outside waits in mq_send.
    const sender = spawn(fixture('mqueues'), ['--send', name, 'outside'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const senderDone = new Promise<number | null>((resolve) => sender.on('exit', (code) => resolve(code)));
    await waitFor(() => {
      try {
        return readFileSync(`/proc/${sender.pid}/syscall`, 'utf8').startsWith('242 '); // mq_timedsend
      } catch {
        return false;
      }
    }, 10_000, 'the sender outside to wait for room');
    const r = sb.run(['snapshot', 'mq9', '-o', join(out, 'mq9'), '--leave-running']);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(`the POSIX message queue ${name} held 5 messages, 6 were read: a process outside the application was waiting to send to it`);
    // Receiving made room, which let its message in: its mq_send returned.
    expect(await senderDone).toBe(0);
    await sb.checksPass('mq9');
    await stopped('mq9');
    // The queue's five, and the one sent from outside, after them.
    const drained = spawnSync(fixture('mqueues'), ['--drain', name], { encoding: 'utf8', timeout: 10_000 });
    expect(drained.status, drained.stderr).toBe(0);
    expect(drained.stdout.trim().split('\n')).toEqual(['5 bravo', '3 ', '1 alpha', '1 charlie', '0 delta', '0 outside']);
    gone(name);
  });

  it('a template of unlinked queues: each clone its own, filled; a named queue is refused by template create, naming it', async () => {
    await started('mqt', ['-']);
    sb.ok(['snapshot', 'mqt', '-o', join(out, 'mqt')]);
    sb.ok(['template', 'create', join(out, 'mqt'), '-o', join(out, 'mqt.template')]);
    sb.ok(['clone', join(out, 'mqt.template'), '--aid', 'mqc', '--count', '2']);
    for (const aid of ['mqc-1', 'mqc-2']) await sb.checksPass(aid);
    // One uses its queues; the other's are its own, still as they were.
    await sb.exercised('mqc-1', 'to use its queues');
    await sb.checksPass('mqc-2');
    await sb.exercised('mqc-2', 'to use its queues');
    for (const aid of ['mqc-1', 'mqc-2']) await stopped(aid);

    const name = queueName('template');
    await started('mqn', [name]);
    sb.ok(['snapshot', 'mqn', '-o', join(out, 'mqn')]);
    const r = sb.run(['template', 'create', join(out, 'mqn'), '-o', join(out, 'mqn.template')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`a POSIX message queue named ${name} is a system-wide name and cannot be shared by clones`);
    gone(name);
  });

  it('a registration with a signal made by a raw system call (its sigev_value unseen): refused by name, the application and its queues as they were', async () => {
    const name = queueName('signal');
    await started('mq7', [name, '--notify-raw']);
    const r = sb.run(['snapshot', 'mq7', '-o', join(out, 'mq7')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(
      /process 2 \(mqueues\) fd \d+: the POSIX message queue \/mqueues-empty-\d+ \(unlinked\) is registered for notification \(mq_notify\) by process 2 with signal 10 \(SIGEV_SIGNAL\), whose sigev_value the kernel does not show and the preload library did not see given \(registered by a raw mq_notify system call, or by a program it is not loaded in\), which cannot be captured; the application was left running/,
    );
    expect(existsSync(join(out, 'mq7'))).toBe(false);
    const status = readFileSync(`/proc/${sb.systemPid('mq7')}/status`, 'utf8');
    expect(status).toMatch(/^TracerPid:\s+0$/m);
    // Its queues read before the refusal came are as they were: counts,
    // then every message in order.
    await sb.checksPass('mq7');
    await sb.exercised('mq7', 'to use its queues');
    await stopped('mq7');
    gone(name);
  });
});

// A SIGEV_SIGNAL registration: its sigev_value, which the queue's text
// does not show, is what the preload library noted when the fixture's
// mq_notify succeeded (all 64 bits of sival_ptr). After each restore a
// message sent to the empty queue delivers SIGUSR1 to the fixture's
// SA_SIGINFO handler with si_code SI_MESGQ and that si_value, which the
// fixture checks itself (exercise), and registers again.
describe('POSIX message queues: a SIGEV_SIGNAL registration with its sigev_value, restored exactly', () => {
  const value = `${0x5eed0000c0ffee01n}`;

  it('--leave-running → restore, whose own snapshot (the note written again by the restore) → restore --lazy; each delivers SI_MESGQ with its si_value', async () => {
    await started('mqs1', ['-', '--notify-signal']);
    sb.ok(['snapshot', 'mqs1', '-o', join(out, 'mqs1'), '--leave-running']);
    expect(sb.ok(['inspect', join(out, 'mqs1')])).toContain(`notifies process 2 with signal 10 (sigev_value ${value})`);
    await sb.checksPass('mqs1');
    // The note outlives the snapshot that saw the queue held.
    sb.ok(['snapshot', 'mqs1', '-o', join(out, 'mqs1b'), '--leave-running']);
    expect(sb.ok(['inspect', join(out, 'mqs1b')])).toContain(`notifies process 2 with signal 10 (sigev_value ${value})`);
    await sb.exercised('mqs1', 'to take its notification');
    await stopped('mqs1');

    // Restored (eager), then snapshot again (ending it) before anything
    // registers anew: carried by the note the restore wrote.
    sb.ok(['restore', join(out, 'mqs1'), '--aid', 'mqs2']);
    await sb.checksPass('mqs2');
    sb.ok(['snapshot', 'mqs2', '-o', join(out, 'mqs2')]);
    expect(sb.ok(['inspect', join(out, 'mqs2')])).toContain(`notifies process 2 with signal 10 (sigev_value ${value})`);
    sb.ok(['restore', join(out, 'mqs2'), '--aid', 'mqs3', '--lazy']);
    await sb.checksPass('mqs3');
    await sb.exercised('mqs3', 'to take its notification');
    await sb.checksPass('mqs3');
    // And registered again by the fixture after the restore: still carried.
    sb.ok(['snapshot', 'mqs3', '-o', join(out, 'mqs3')]);
    sb.ok(['restore', join(out, 'mqs3'), '--aid', 'mqs4']);
    await sb.checksPass('mqs4');
    await sb.exercised('mqs4', 'to take its notification');
    await stopped('mqs4');
  }, 180_000);

  it('a registration the preload library noted, then ended and made again where it did not see: refused by name, never carried with the old value', async () => {
    // Ended by mq_notify(NULL) (the note dropped), made again by a raw
    // call with the same signal: no note.
    await started('mqs6', ['-', '--notify-renewed']);
    let r = sb.run(['snapshot', 'mqs6', '-o', join(out, 'mqs6'), '--leave-running']);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/is registered for notification \(mq_notify\) by process 2 with signal 10 \(SIGEV_SIGNAL\), whose sigev_value the kernel does not show and the preload library did not see given/);
    expect(existsSync(join(out, 'mqs6'))).toBe(false);
    await sb.checksPass('mqs6');
    await sb.exercised('mqs6', 'to take its notification');
    await stopped('mqs6');
    // Ended and made again with SIGUSR2 by raw calls: the note left behind
    // is of signal 10.
    await started('mqs7', ['-', '--notify-resignal']);
    r = sb.run(['snapshot', 'mqs7', '-o', join(out, 'mqs7')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(
      /is registered for notification \(mq_notify\) by process 2 with signal 12 \(SIGEV_SIGNAL\), but the preload library noted a registration with signal 10: it was registered again where the preload library did not see \(a raw mq_notify system call\), so its sigev_value is not known, which cannot be captured; the application was left running/,
    );
    expect(existsSync(join(out, 'mqs7'))).toBe(false);
    await sb.checksPass('mqs7');
    await sb.exercised('mqs7', 'to take its notification');
    await stopped('mqs7');
  });

  /** Started in `mode`, snapshotted (which ends it) and restored: its
   * checks pass, it takes its notification, it is stopped. */
  async function endsAndComesBack(aid: string, mode: string): Promise<void> {
    await started(aid, ['-', mode]);
    sb.ok(['snapshot', aid, '-o', join(out, aid)]);
    sb.ok(['restore', join(out, aid)]);
    await sb.checksPass(aid);
    await sb.exercised(aid, 'to take its notification');
    await stopped(aid);
  }

  it("another process's mq_notify(NULL), which ends no registration of its own, leaves the owner's note: snapshot → restore delivers", async () => {
    await endsAndComesBack('mqs8', '--notify-foreign-null');
    // Format 4: an appshot of format 3 would restore the registration as
    // one for nothing (it ignores the signal fields), and refuses it.
    expect(sb.run(['inspect', join(out, 'mqs8')]).stdout).toMatch(/\(format 4\)/);
  });

  it('snapshot (ends it) → restore: the notification delivered; clones of a template each get their own', async () => {
    await endsAndComesBack('mqs5', '--notify-signal');

    sb.ok(['template', 'create', join(out, 'mqs5'), '-o', join(out, 'mqs5.template')]);
    sb.ok(['clone', join(out, 'mqs5.template'), '--aid', 'mqsc', '--count', '2']);
    for (const aid of ['mqsc-1', 'mqsc-2']) await sb.checksPass(aid);
    await sb.exercised('mqsc-1', 'to take its notification');
    await sb.checksPass('mqsc-2');
    await sb.exercised('mqsc-2', 'to take its notification');
    for (const aid of ['mqsc-1', 'mqsc-2']) await stopped(aid);
  }, 180_000);
});

// The messages of a queue can only be read by receiving them (the highest
// priority first), and a queue is a named object that outlives appshot: a
// snapshot killed (kill -9) while it holds them must not lose them. The
// test-only points: 'snapshot: mqueue taken' kills appshot once every
// message of the first queue with messages has been received, before any
// is sent back; 'snapshot: mqueue given back' once they are back. (The
// application is held in a job-control stop meanwhile: see
// snapshotKilledAt.)
describe('a snapshot killed (kill -9) while it reads a queue\'s messages', () => {
  for (const point of ['snapshot: mqueue taken', 'snapshot: mqueue given back']) {
    it(`at '${point}': every queue holds its messages, in order, with their priorities and bytes, and the application runs untraced`, async () => {
      const aid = point.endsWith('taken') ? 'mqk1' : 'mqk2';
      const name = queueName(aid);
      await started(aid, [name]);
      const pid = sb.systemPid(aid);
      await snapshotKilledAt(sb, aid, pid, join(out, aid), point);
      // The named queue, seen from here: all five.
      const q = addon().mqOpen(name, 0, 0, 0, 0);
      try {
        expect(addon().mqAttributes(q)).toEqual({ maxmsg: 5, msgsize: 64, curmsgs: 5 });
      } finally {
        closeSync(q);
      }
      expect(existsSync(join(out, aid))).toBe(false);
      process.kill(pid, 'SIGCONT');
      // Its own checks: each queue's message count; then each message
      // received in order with its priority and bytes, and sent back.
      await sb.checksPass(aid, 3);
      await sb.exercised(aid, 'to use its queues');
      await sb.checksPass(aid, 2);
      // The next snapshot is whole, and the named queue as it was.
      sb.ok(['snapshot', aid, '-o', join(out, aid)]);
      expect(sb.ok(['inspect', join(out, aid)])).toMatch(new RegExp(`POSIX message queue ${name}, 5 of 5 messages \\(22 bytes, at most 64 each\\)`));
      const drained = spawnSync(fixture('mqueues'), ['--drain', name], { encoding: 'utf8', timeout: 10_000 });
      expect(drained.status, drained.stderr).toBe(0);
      expect(drained.stdout.trim().split('\n')).toEqual(['5 bravo', '3 ', '1 alpha', '1 charlie', '0 delta']);
      gone(name);
    }, 180_000);
  }
});
