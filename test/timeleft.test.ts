/**
 * A wait with a timeout caught by a snapshot waits, once restored, for the
 * time it had left, not its whole timeout again (issue 12: "poll across
 * the restore"). The preload library makes poll a ppoll and gives
 * nanosleep, usleep and a relative clock_nanosleep a `rem`
 * (addon/preload/preload_wait.c, preload_clock.c), where the kernel writes
 * the time left when a stop interrupts them; the restore makes the call
 * again with that (src/resources/threads.ts). An epoll wait writes
 * nothing back: the library notes the instant its timeout ends, and the
 * snapshot gives the call what was left when the freeze began
 * (threads.ts timeLeftOfWaits). The fixture (timeleft.c) has six threads
 * waiting 60 s each, over and over, in poll, usleep, nanosleep(req, NULL),
 * clock_nanosleep(..., NULL), epoll_wait and epoll_pwait; each checks its wait ends
 * normally and never early (not within this test: the restored waits end
 * after it). Here, each restored thread is read back in its call: the
 * timeout it waits with is what was left (less than 58 s, as more than
 * 2 s had gone by when it was frozen), not 60 s again.
 */
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-timeleft-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const WAIT_NS = 60_000_000_000n;
const THREADS = ['poll60', 'usleep60', 'nanosleep60', 'clocksleep60', 'epoll60', 'epollp60'];

/** Each named thread's system call and arguments (/proc/PID/task/TID/syscall),
 * or undefined while one is not in a call. */
function calls(pid: number): Map<string, bigint[]> | undefined {
  const found = new Map<string, bigint[]>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
    if (!THREADS.includes(name)) continue;
    const fields = readFileSync(`/proc/${pid}/task/${tid}/syscall`, 'utf8').trim().split(' ');
    if (!/^\d+$/.test(fields[0])) return undefined; // running
    found.set(name, fields.slice(0, 7).map((f) => BigInt(f)));
  }
  return found.size === THREADS.length ? found : undefined;
}

/** The timespec at `addr` in process `pid`, in ns. */
function timespecAt(pid: number, addr: bigint): bigint {
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  try {
    const b = Buffer.alloc(16);
    readSync(fd, b, 0, 16, addr);
    return b.readBigInt64LE(0) * 1_000_000_000n + b.readBigInt64LE(8);
  } finally {
    closeSync(fd);
  }
}

/** What each thread waits for in the call it is in: ppoll (271) its
 * timeout (arg 3), clock_nanosleep (230) its request (arg 3), poll (7)
 * its milliseconds (arg 3), epoll_wait (232) and epoll_pwait (281) theirs
 * (arg 4). */
function timeouts(pid: number): Record<string, { nr: number; ns: bigint }> {
  const seen = calls(pid)!;
  const outOf: Record<string, { nr: number; ns: bigint }> = {};
  for (const [name, c] of seen) {
    const nr = Number(c[0]);
    const ms = nr === 7 ? c[3] : nr === 232 || nr === 281 ? c[4] : undefined;
    outOf[name] = { nr, ns: ms !== undefined ? ms * 1_000_000n : timespecAt(pid, c[3]) };
  }
  return outOf;
}

describe('waits with a timeout across a snapshot and restore', () => {
  it.each([
    ['restored eagerly', 'tl', []],
    ['restored with --lazy', 'tll', ['--lazy']],
  ])('poll, usleep, nanosleep and clock_nanosleep without rem, epoll_wait and epoll_pwait wait for the time they had left, not their whole timeout again (%s)', async (_how, aid, extra) => {
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('timeleft')]);
    await sb.checksPass(aid, 2);
    let pid = sb.systemPid(aid);
    await waitFor(() => calls(pid) !== undefined, 10_000, 'every thread in its wait');
    // As run: each waits with 60 s, and is in the call it can say it in.
    const before = timeouts(pid);
    expect(Object.fromEntries(Object.entries(before).map(([n, t]) => [n, t.nr]))).toEqual({ poll60: 271, usleep60: 230, nanosleep60: 230, clocksleep60: 230, epoll60: 232, epollp60: 281 });
    for (const t of Object.values(before)) expect(t.ns).toBe(WAIT_NS);
    // More than 2 s into their first wait (each started before the
    // first CHECK line): at least 2 s are gone from what each has left.
    await new Promise((r) => setTimeout(r, 2500));
    sb.ok(['snapshot', aid, '-o', join(out, aid)]);
    sb.ok(['restore', join(out, aid), ...extra]);
    pid = sb.systemPid(aid);
    await waitFor(() => calls(pid) !== undefined, 10_000, 'every restored thread back in its wait');
    const after = timeouts(pid);
    for (const name of THREADS) {
      expect(after[name].nr, name).toBe(before[name].nr);
      // What was left when frozen (a thread that had finished its wait
      // meanwhile would be in its next, at 60 s, and fail this too).
      expect(after[name].ns, `${name} waits ${after[name].ns} ns`).toBeLessThan(WAIT_NS - 2_000_000_000n);
      expect(after[name].ns, name).toBeGreaterThan(0n);
    }
    // The restored fixture runs on, its checks passing (its waits end
    // after this test; it is removed with the sandbox).
    await sb.checksPass(aid, 2);
  });
});

/**
 * A note from before a restore is not taken for a call after it
 * (epollstale.c): the thread is held between the library's note of its
 * epoll wait and the call until it runs restored, the noted instant
 * passing meanwhile; once restored and in its call, a second snapshot
 * must leave the call its timeout (each restore counts up the library's
 * generation, and the snapshot takes only notes of the current one). Taken,
 * the stale note gave no time left, and the wait ended at once after the
 * second restore. The fixture checks it waited its whole timeout from the
 * instant it went on into the call.
 */
it('an epoll wait noted before a restore is not cut short by the next snapshot', async () => {
  const aid = 'tls';
  sb.ok(['run', '-d', '--aid', aid, '--', fixture('epollstale')]);
  await waitFor(() => /^(NOTED|FAIL.*)$/m.test(sb.log(aid)), 10_000, 'the wait noted');
  // The noted instant (5 s on) passes while the thread is held.
  await new Promise((r) => setTimeout(r, 5500));
  sb.ok(['snapshot', aid, '-o', join(out, `${aid}-1`)]);
  sb.ok(['restore', join(out, `${aid}-1`)]);
  let pid = sb.systemPid(aid);
  const inCall = () => {
    try {
      return readFileSync(`/proc/${pid}/task/${pid}/syscall`, 'utf8').split(' ')[0] === '232';
    } catch {
      return false;
    }
  };
  await waitFor(inCall, 10_000, 'the restored thread in its epoll_wait');
  sb.ok(['snapshot', aid, '-o', join(out, `${aid}-2`)]);
  sb.ok(['restore', join(out, `${aid}-2`)]);
  pid = sb.systemPid(aid);
  await waitFor(() => /^(ALL OK|FAIL.*)$/m.test(sb.log(aid)) || !sb.aids().includes(aid), 30_000, 'the verdict');
  const log = sb.log(aid);
  expect(log.match(/^FAIL.*$/gm) ?? [], log).toEqual([]);
  expect(log).toMatch(/^ALL OK$/m);
});
