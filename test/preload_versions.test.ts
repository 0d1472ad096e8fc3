/**
 * Functions the preload library wraps that glibc keeps under more than one
 * version (addon/preload/preload.map): a program bound to an older version
 * reaches the library's wrapper of that version, which translates its ids
 * and does what glibc's function of that version does (oldversions.c).
 * Unversioned, the library's wrappers took every version's references and
 * treated them as the current function: timer_create@GLIBC_2.2.5 handed
 * back a current timer id that the old timer_settime refused,
 * sched_getaffinity@GLIBC_2.3.3 read its mask's address as its size
 * (sched_setaffinity@GLIBC_2.3.3 too: EFAULT, or another mask),
 * realpath@GLIBC_2.2.5 allocated, posix_spawn@GLIBC_2.2.5 did not run a
 * script without #! by /bin/sh; pthread_cond_clockwait@GLIBC_2.30 passed
 * the library by.
 */
import { afterAll, expect, it } from 'vitest';
import { fixture, Sandbox } from './helpers.js';

const sb = new Sandbox();
afterAll(async () => {
  await sb.dispose();
});

it("a program bound to older glibc versions reaches the library's wrappers of those versions, its ids translated", () => {
  const r = sb.run(['run', '--', fixture('oldversions')]);
  expect(r.stdout, r.stderr).toMatch(/^ALL OK$/m);
  expect(r.code, r.stderr).toBe(0);
  // Its virtual PID is not the system's: each id it named was translated.
  const [, vpid, spid] = r.stdout.match(/^PIDS (\d+) (\d+)$/m)!;
  expect(vpid).not.toBe(spid);
  for (const step of ['timer_create@GLIBC_2.2.5', 'timer_create@GLIBC_2.3.3', 'sched_getaffinity@GLIBC_2.3.3', 'sched_setaffinity@GLIBC_2.3.3', 'realpath@GLIBC_2.2.5', 'posix_spawn@GLIBC_2.2.5', 'posix_spawnp@GLIBC_2.2.5', 'pthread_cond_clockwait@GLIBC_2.30', "every version is the library's"])
    expect(r.stdout).toContain(`CHECK ${step}\n`);
});
