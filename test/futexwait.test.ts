/**
 * Threads caught by a snapshot in a futex wait on memory that processes
 * share (PostgreSQL's backends sleep in sem_wait on semaphores in its shared
 * memory; servers share process-shared mutexes and condition variables),
 * restored, then woken by another process of the application: the waiter
 * restarts its futex call on the restored mapping, and the wake after the
 * restore must reach it. The fixture (futexwait.c) has two semaphores (one
 * waited for until an instant), a mutex, a robust mutex, a robust PI mutex
 * and a condition variable waited for in each of: the
 * process's own memory (threads of one process, the control), shared
 * anonymous memory, a SysV segment and a POSIX shm file in /dev/shm (forked
 * children waiting, the main process the holder and waker), each also with
 * the child waiting on a second mapping of the object at another address.
 */
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

const WAITS = ['sem', 'timed', 'mutex', 'robust', 'pi', 'cond'];

/** How many threads of `aid`'s processes are in a futex wait: futex (202),
 * or restart_syscall (219), where the kernel restarts a futex wait with a
 * timeout that a stop interrupted (the original after a --leave-running
 * snapshot). */
function inFutex(aid: string): number {
  let n = 0;
  for (const p of sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid])[0].processes) {
    if (p.init) continue;
    for (const t of readdirSync(`/proc/${p.pid}/task`))
      try {
        if (/^(202|219) /.test(readFileSync(`/proc/${p.pid}/task/${t}/syscall`, 'utf8'))) n++;
      } catch {
        /* gone */
      }
  }
  return n;
}

/** Releases `aid`'s waiters (SIGUSR1 to its main process) and checks that
 * every one wakes: ALL WOKE, else the waits whose WOKE line never came. */
async function released(aid: string, areas: string[]): Promise<void> {
  process.kill(sb.systemPid(aid), 'SIGUSR1');
  const done = () => /^(ALL WOKE|FAIL.*)$/m.test(sb.log(aid)) || !sb.aids().includes(aid);
  await waitFor(done, 30_000, `${aid}'s waiters to wake`).catch(() => undefined);
  const log = sb.log(aid);
  const missing = areas.flatMap((a) => WAITS.map((w) => `${a} ${w}`)).filter((w) => !log.includes(`WOKE ${w}\n`));
  expect(log.match(/^FAIL.*$/gm) ?? [], log).toEqual([]);
  expect(missing, `${aid}: waits that never woke`).toEqual([]);
  expect(log).toMatch(/^ALL WOKE$/m);
}

/** Waits until each of `aid`'s waiters is in its futex wait; fails on a
 * FAIL line (a waiter that fell out of its wait). */
async function waiting(aid: string, areas: string[]): Promise<void> {
  const all = areas.length * WAITS.length;
  await waitFor(() => inFutex(aid) === all || /^FAIL/m.test(sb.log(aid)), 10_000, `${aid}'s ${all} waiters to be in their futex waits`);
  expect(sb.log(aid).match(/^FAIL.*$/gm) ?? []).toEqual([]);
}

/** Starts the fixture on `areas` and waits until each of its waiters is in
 * its futex wait. */
async function started(aid: string, areas: string[], args: string[]): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('futexwait'), ...args]);
  expect(r.code, r.stderr).toBe(0);
  await waitFor(() => /^READY$/m.test(sb.log(aid)), 10_000, `${aid} to start`);
  await waiting(aid, areas);
}

/** The restore's warnings: one for each area's robust mutex waiter (README:
 * it takes the mutex under its old TID), none for its PI one (the kernel
 * hands that over under its TID now), nothing else. */
function expectWarnings(stderr: string, areas: string[]): void {
  const warnings = stderr.match(/^appshot: warning: .*$/gm) ?? [];
  const robust = /^appshot: warning: not kept: process \d+: thread \d+ was waiting for the robust mutex at 0x[0-9a-f]+: it takes it under its old TID \(its unlock is refused\)$/;
  expect(warnings.filter((l) => !robust.test(l))).toEqual([]);
  expect(warnings).toHaveLength(areas.length);
}

describe('a thread snapshotted in a futex wait on shared memory wakes when another process wakes it after the restore', () => {
  it('from a snapshot that ends the application: its own memory, shared anonymous memory, a SysV segment and a /dev/shm file', async () => {
    // The file's robust mutex, held by the main process: the snapshot's
    // kill of the application ran the kernel's robust-list walk for the
    // thread holding it, which marked it owner-dead in the file (no TID,
    // FUTEX_OWNER_DIED), a file the image does not hold. Restored, its
    // waiter got EOWNERDEAD and its holder's unlock EPERM.
    // Not named appshot-*: the freezer takes a /dev/shm/appshot-* mapping
    // for translation tables, and a futex word in it for their lock.
    const name = `/futexwait-test-${randomBytes(6).toString('hex')}`;
    // alias-*: the child waits on a second mapping of the object, at
    // another address, and is woken through the first.
    const areas = ['private', 'anon', 'sysv', 'file', 'alias-anon', 'alias-sysv', 'alias-file'];
    const aid = 'fw';
    const image = join(sb.home, 'fw-img');
    try {
      await started(aid, areas, ['private', 'anon', 'sysv', `file:${name}`, 'alias-anon', 'alias-sysv', `alias-file:${name}-alias`]);
      const s = sb.run(['snapshot', aid, '-o', image]);
      expect(s.code, s.stderr).toBe(0);
      const r = sb.run(['restore', image]);
      expect(r.code, r.stderr).toBe(0);
      expectWarnings(r.stderr, areas);
      try {
        // Each waiter restarted its wait, none fell out of it.
        await waiting(aid, areas);
        await released(aid, areas);
      } finally {
        if (sb.aids().includes(aid)) expect(sb.run(['stop', aid, '--signal', 'KILL']).code).toBe(0);
      }
    } finally {
      if (sb.aids().includes(aid)) sb.run(['stop', aid, '--signal', 'KILL']);
      rmSync(image, { recursive: true, force: true });
      for (const file of [name, `${name}-alias`]) rmSync(`/dev/shm${file}`, { force: true });
    }
  });

  it('from a --leave-running snapshot restored under another AID beside the original, both woken', async () => {
    // Not the /dev/shm file: the original and its copy would both map the
    // one file, and each wake the other's waiters.
    const areas = ['private', 'anon', 'sysv', 'alias-anon', 'alias-sysv'];
    const image = join(sb.home, 'fwl-img');
    try {
      await started('fwl', areas, areas);
      const s = sb.run(['snapshot', 'fwl', '-o', image, '--leave-running']);
      expect(s.code, s.stderr).toBe(0);
      const r = sb.run(['restore', image, '--aid', 'fwl-r']);
      expect(r.code, r.stderr).toBe(0);
      expectWarnings(r.stderr, areas);
      await waiting('fwl-r', areas);
      // The copy first: waking it must not need (nor wake) the original.
      await released('fwl-r', areas);
      expect(inFutex('fwl')).toBe(areas.length * WAITS.length);
      await released('fwl', areas);
    } finally {
      for (const aid of ['fwl', 'fwl-r']) if (sb.aids().includes(aid)) sb.run(['stop', aid, '--signal', 'KILL']);
      rmSync(image, { recursive: true, force: true });
    }
  });
});

/**
 * Mutexes that are not robust, held across the restore (mutexown.c): a
 * recursive, an error-checking and a priority-inheritance one, whose owner
 * fields hold their holder's TID at the snapshot. The preload library
 * mends each when the program next passes it (preload_mutex.c), from the
 * moves the restore gave it; restored twice, from the moves of both.
 */
describe('mutexes that are not robust, held across a restore, work after it', () => {
  /** Runs the fixture under `aid`, takes it through `restores` (each the
   * restore's extra arguments: one snapshot and restore per entry, the
   * mutexes untouched in between), then lets it use them. */
  async function roundTrips(aid: string, restores: string[][]): Promise<void> {
    const image = join(sb.home, `${aid}-img`);
    try {
      const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('mutexown')]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(() => /^(HOLDING|FAIL.*)$/m.test(sb.log(aid)), 10_000, `${aid} to hold its mutexes`);
      for (const [i, extra] of restores.entries()) {
        const s = sb.run(['snapshot', aid, '-o', `${image}-${i}`]);
        expect(s.code, s.stderr).toBe(0);
        const t = sb.run(['restore', `${image}-${i}`, ...extra]);
        expect(t.code, t.stderr).toBe(0);
        expect(t.stderr.match(/^appshot: warning: .*$/gm) ?? []).toEqual([]);
      }
      process.kill(sb.systemPid(aid), 'SIGUSR1');
      // The fixture's own alarm ends a step that hangs with a FAIL line.
      await waitFor(() => /^(ALL OK|FAIL.*)$/m.test(sb.log(aid)) || !sb.aids().includes(aid), 60_000, `${aid}'s verdict`);
      const log = sb.log(aid);
      expect(log.match(/^FAIL.*$/gm) ?? [], log).toEqual([]);
      for (const check of ['recursive relock count 2', 'recursive unlocked twice', 'recursive trylock count 2, unlocked twice', 'errorcheck relock EDEADLK', 'errorcheck unlocked', 'pi unlocked', 'pi contender got it'])
        expect(log).toContain(`CHECK ${check}\n`);
      expect(log).toMatch(/^ALL OK$/m);
    } finally {
      if (sb.aids().includes(aid)) sb.run(['stop', aid, '--signal', 'KILL']);
      for (const i of restores.keys()) rmSync(`${image}-${i}`, { recursive: true, force: true });
    }
  }

  it('restored eagerly', () => roundTrips('mo', [[]]));
  it('restored with --lazy', () => roundTrips('mol', [['--lazy']]));
  it('restored twice, untouched in between: the first TIDs are mended too', () => roundTrips('mo2', [[], []]));
});

/**
 * A process-shared mutex held by another process's thread that has a TID
 * this process's moves name as old (mutexshared.c, which writes the moves
 * a restore would): the library leaves it to its holder.
 */
it('a process-shared mutex held under an old TID by another process is not taken over', () => {
  const r = sb.run(['run', '--', fixture('mutexshared')]);
  expect(r.stdout, r.stderr).toMatch(/^ALL OK$/m);
  expect(r.code, r.stderr).toBe(0);
});

/**
 * Condition waits on mutexes whose owner fields hold a TID (condwait.c):
 * glibc's pthread_cond_wait gives the mutex up and takes it again inside
 * itself, past the library's mutex calls, so the library's cond calls
 * mend the mutex (preload_mutex.c). A thread holding an error-checking, a
 * recursive and a PI error-checking mutex across the restore then waits
 * with each (unmended: EPERM at once, the mutex still held), and threads
 * caught in a condition wait are woken after it; each comes back holding
 * its mutex under its TID now.
 */
describe('condition waits on mutexes that keep a TID, across a restore', () => {
  async function roundTrip(aid: string, extra: string[]): Promise<void> {
    const image = join(sb.home, `${aid}-img`);
    try {
      const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('condwait')]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(() => /^(HOLDING|FAIL.*)$/m.test(sb.log(aid)), 10_000, `${aid} to hold its mutexes and wait`);
      const s = sb.run(['snapshot', aid, '-o', image]);
      expect(s.code, s.stderr).toBe(0);
      const t = sb.run(['restore', image, ...extra]);
      expect(t.code, t.stderr).toBe(0);
      expect(t.stderr.match(/^appshot: warning: .*$/gm) ?? []).toEqual([]);
      process.kill(sb.systemPid(aid), 'SIGUSR1');
      // The fixture's own alarm ends a step that hangs with a FAIL line.
      await waitFor(() => /^(ALL OK|FAIL.*)$/m.test(sb.log(aid)) || !sb.aids().includes(aid), 60_000, `${aid}'s verdict`);
      const log = sb.log(aid);
      expect(log.match(/^FAIL.*$/gm) ?? [], log).toEqual([]);
      for (const check of [
        'relocking pi woken, owner its TID now, relock EDEADLK, unlocked',
        'waiting errorcheck woken, owner its TID now, relock EDEADLK, unlocked',
        'waiting recursive woken, owner its TID now, relock count 2, unlocked twice',
        'held errorcheck timedwait ETIMEDOUT, relock EDEADLK',
        'held errorcheck wait woken, unlocked',
        'held recursive clockwait ETIMEDOUT, relock count 2, unlocked twice',
        'held pi timedwait ETIMEDOUT, relock EDEADLK, unlocked',
      ])
        expect(log).toContain(`CHECK ${check}\n`);
      expect(log).toMatch(/^ALL OK$/m);
    } finally {
      if (sb.aids().includes(aid)) sb.run(['stop', aid, '--signal', 'KILL']);
      rmSync(image, { recursive: true, force: true });
    }
  }

  it('restored eagerly', () => roundTrip('cw', []));
  it('restored with --lazy', () => roundTrip('cwl', ['--lazy']));
});

/**
 * A program bound to glibc's compatibility condition waits (GLIBC_2.2.5,
 * another pthread_cond_t layout: condcompat.c) passes the library's waits
 * by to glibc's own, which carry the current versions
 * (addon/preload/preload.map); unversioned, they took such references and
 * forwarded them to the current functions, a crash. The fixture also finds
 * the library's at the current versions, as programs linked since reach them.
 */
it('a program bound to the GLIBC_2.2.5 condition waits runs under appshot', () => {
  const r = sb.run(['run', '--', fixture('condcompat')]);
  expect(r.stdout, r.stderr).toContain('CHECK current versions are the library\'s\n');
  expect(r.stdout, r.stderr).toMatch(/^ALL OK$/m);
  expect(r.code, r.stderr).toBe(0);
});

/**
 * A thread blocked on a condition variable whose private PI mutex another
 * thread holds across the restore (condpi.c): glibc retakes the mutex with
 * FUTEX_LOCK_PI once the thread is woken, and its word must name the
 * holder's TID now (the library's condition wait notes the mutex; the
 * restore rewrites its word). Left naming the old TID: ESRCH, and glibc
 * waits forever (the fixture's alarm: FAIL).
 */
it('a condition waiter whose private PI mutex is held across the restore comes back holding it', async () => {
  const aid = 'cpi';
  const image = join(sb.home, `${aid}-img`);
  try {
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('condpi')]);
    await waitFor(() => /^(HOLDING|FAIL.*)$/m.test(sb.log(aid)), 10_000, `${aid} to hold its mutex`);
    sb.ok(['snapshot', aid, '-o', image]);
    const t = sb.run(['restore', image]);
    expect(t.code, t.stderr).toBe(0);
    await waitFor(() => /^(ALL OK|FAIL.*)$/m.test(sb.log(aid)) || !sb.aids().includes(aid), 30_000, `${aid}'s verdict`);
    const log = sb.log(aid);
    expect(log.match(/^FAIL.*$/gm) ?? [], log).toEqual([]);
    expect(log).toMatch(/^ALL OK$/m);
  } finally {
    if (sb.aids().includes(aid)) sb.run(['stop', aid, '--signal', 'KILL']);
    rmSync(image, { recursive: true, force: true });
  }
});
