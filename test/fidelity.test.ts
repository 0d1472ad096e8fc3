/**
 * Kernel state of many small kinds, several to a fixture, captured and
 * restored exactly (test/fixtures/procodds.c, fdodds.c, memodds.c): each
 * fixture checks every property it set up and prints a verdict, through a
 * snapshot that ends it restored eagerly, and a --leave-running one
 * restored --lazy beside the original; SIGHUP makes each use its state
 * once more. What cannot be exact is refused by name at snapshot, and the
 * application goes on.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor, withTmpfs } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
const out = scratchDir('appshot-fidelity-');
const dirs: string[] = [];
afterAll(async () => {
  await sb.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const run = (args: string[]) => sb.ok(args);
const scratch = () => {
  const d = mkdtempSync(join(tmpdir(), 'appshot-fidelity-dir-'));
  dirs.push(d);
  return d;
};

async function stopped(aid: string): Promise<void> {
  run(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

/** Both round trips of one fixture, in one test: a snapshot that ends it,
 * restored eagerly; a --leave-running one, restored --lazy beside the
 * original. `alone`: the original and the copy share a file they both
 * change; the original is stopped before the copy is exercised. */
function roundTrips(name: string, argv: () => string[], alone = false): void {
  it('comes back exactly: snapshot (ends it) → restore; --leave-running → restore --lazy beside it', async () => {
    const args = argv();
    const first = `${name}1`;
    run(['run', '-d', '--aid', first, '--', ...args]);
    await sb.checksPass(first);
    run(['snapshot', first, '-o', join(out, first)]);
    run(['restore', join(out, first)]);
    await sb.checksPass(first);
    await sb.exercised(first, 'to use its state');
    await sb.checksPass(first);
    await stopped(first);

    const original = `${name}2`;
    const copy = `${name}3`;
    run(['run', '-d', '--aid', original, '--', ...args]);
    await sb.checksPass(original);
    run(['snapshot', original, '-o', join(out, original), '--leave-running']);
    await sb.checksPass(original);
    run(['restore', join(out, original), '--aid', copy, '--lazy']);
    await sb.checksPass(copy);
    if (alone) await stopped(original);
    else await sb.exercised(original, 'to use its state');
    await sb.exercised(copy, 'to use its state');
    await sb.checksPass(copy);
    await stopped(copy);
    if (!alone) await stopped(original);
  });
}

/** A snapshot of `argv` is refused with `message`, and the application
 * goes on, untraced and not stopped. */
async function refused(aid: string, argv: string[], message: RegExp): Promise<void> {
  run(['run', '-d', '--aid', aid, '--', ...argv]);
  await sb.checksPass(aid);
  const r = sb.run(['snapshot', aid, '-o', join(out, aid)]);
  expect(r.code, r.stderr).toBe(1);
  expect(r.stderr.trim().split('\n')).toHaveLength(1);
  expect(r.stderr).toMatch(message);
  expect(r.stderr).toContain('the application was left running');
  expect(existsSync(join(out, aid))).toBe(false);
  const status = readFileSync(`/proc/${sb.systemPid(aid)}/status`, 'utf8');
  expect(status).toMatch(/^TracerPid:\s+0$/m);
  expect(status).not.toMatch(/^State:\s+[tT]/m);
  await sb.checksPass(aid);
  await stopped(aid);
}

describe('an executable deleted under it whose copy may not be run (its directory remounted noexec)', () => {
  it("comes back running appshot's seed as its executable, and the restore says so", async () => {
    const dir = scratch();
    await withTmpfs(dir, 'size=8m,mode=0755', async () => {
      const exe = join(dir, 'cputime-copy');
      copyFileSync(fixture('cputime'), exe);
      chmodSync(exe, 0o755);
      const aid = 'noexec1';
      run(['run', '-d', '--aid', aid, '--', exe]);
      await sb.checksPass(aid);
      rmSync(exe);
      // The copy is made beside where it was (review r303: PR_SET_MM_MAP
      // refused it, and the seed's stayed without a word).
      expect(spawnSync('mount', ['-o', 'remount,noexec', dir], { encoding: 'utf8' }).status).toBe(0);
      run(['snapshot', aid, '-o', join(out, aid)]);
      const back = JSON.parse(run(['restore', join(out, aid), '--json'])) as { notKept: string[] };
      expect(back.notKept.join('\n')).toMatch(/^process \d+ \(cputime-copy\): its executable \/.*\/cputime-copy \(deleted\), made again from its bytes, could not be set \(restoring the mm fields \(PR_SET_MM_MAP\): EACCES\): \/proc\/PID\/exe names appshot's seed$/m);
      await sb.checksPass(aid);
      await stopped(aid);
    });
  });
});

describe("process and thread odds: an executable replaced under it, limits below their hard ones, umask, a long cwd, dumpable, no_new_privs, keepcaps, interval timers, dispositions, queued real-time signals with their values (process's and a thread's own), each thread's name, mask, altstack, timer slack and FPU control, relative and absolute clock_nanosleep, nanosleep without rem, sem_timedwait, poll, ppoll, select, pselect6, a relative FUTEX_WAIT, epoll_wait, epoll_pwait, sigtimedwait, semtimedop and recv, read and recvmsg on a socket with SO_RCVTIMEO across it, sigwaitinfo and semop waiting for good", () => {
  roundTrips('podds', () => [fixture('procodds'), scratch()]);
});

describe('descriptor odds: a semaphore eventfd, a file O_APPEND|O_NOATIME|O_DSYNC at its offset, one O_DIRECT, O_PATH, seqpacket records (an empty one too), an absolute CLOCK_BOOTTIME timerfd, pipes holding packets (O_DIRECT: in packet mode, and left)', () => {
  roundTrips('fodds', () => [fixture('fdodds'), scratch()], true);
});

describe('a directory watched with dnotify (F_NOTIFY DN_CREATE|DN_MULTISHOT, known from the preload library\'s note), with F_SETSIG (the signal carries si_fd) and on the default SIGIO: a file made in it after the restore brings the signal', () => {
  describe('with F_SETSIG', () => {
    roundTrips('fodds-dn', () => [fixture('fdodds'), scratch(), '--dnotify'], true);
  });

  describe('on the default SIGIO', () => {
    roundTrips('fodds-dnio', () => [fixture('fdodds'), scratch(), '--dnotify-sigio'], true);
  });

  it('carries the watch through a second snapshot of the restored copy (noted again in its tables)', async () => {
    const aid = 'fodds-dn-again';
    run(['run', '-d', '--aid', aid, '--', fixture('fdodds'), scratch(), '--dnotify']);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, `${aid}-1`)]);
    run(['restore', join(out, `${aid}-1`)]);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, `${aid}-2`)]);
    run(['restore', join(out, `${aid}-2`)]);
    await sb.checksPass(aid);
    await sb.exercised(aid, 'to use its state');
    await sb.checksPass(aid);
    await stopped(aid);
  });

  it('refuses a one-shot watch (no DN_MULTISHOT: the kernel drops it unseen when it fires), naming it, and leaves the application running', async () => {
    await refused('fodds-dnone', [fixture('fdodds'), scratch(), '--dnotify-oneshot'], /process 2 \(fdodds\) fd \d+: a directory \(\S*\/watched\) watched with a one-shot dnotify watch \(F_NOTIFY without DN_MULTISHOT\), which the kernel drops unseen when it fires: whether it is still there is not known, so it cannot be captured/);
  });

  it('carries no watch for a directory whose watched descriptor was closed and that was opened again (the close ended the watch, and its note)', async () => {
    await noWatch('fodds-dnreopen', '--dnotify-reopen');
  });

  it('carries no watch for a directory a child watched and exited (the kernel closed its descriptor unseen): its note is the child\'s, not this process\'s', async () => {
    await noWatch('fodds-dnchild', '--dnotify-child');
  });

  /** `mode` leaves a note of a watch its directory no longer has (closed,
   * across an exec, a child's) and holds the directory: the image carries
   * no watch, and a file made in the directory after the restore brings no
   * signal (a phantom watch's default SIGIO would be pending: the fixture
   * keeps it blocked and looks). */
  async function noWatch(aid: string, mode: string): Promise<void> {
    run(['run', '-d', '--aid', aid, '--', fixture('fdodds'), scratch(), mode]);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    const shown = run(['inspect', join(out, aid)]);
    expect(shown).toMatch(/\/watched /);
    expect(shown).not.toContain('watched with dnotify');
    await stopped(aid);
    const copy = `${aid}-copy`;
    run(['restore', join(out, aid), '--aid', copy]);
    await sb.checksPass(copy);
    await sb.exercised(copy, 'to use its state');
    await stopped(copy);
  }

  it('carries no watch for a directory whose watched descriptor had FD_CLOEXEC, after an exec (which closed it, ending the watch) and the directory opened again', async () => {
    await noWatch('fodds-dnexec-cloexec', '--dnotify-exec-cloexec');
  });

  it('carries no watch for a directory whose watched descriptor came through an exec and was closed by the new program, then opened again', async () => {
    await noWatch('fodds-dnexec-close', '--dnotify-exec-close');
  });

  /** `mode` keeps its watch across an exec of itself: the image carries
   * it, and a file made in the directory after the restore brings its
   * signal. */
  async function watchAfterExec(aid: string, mode: string): Promise<void> {
    run(['run', '-d', '--aid', aid, '--', fixture('fdodds'), scratch(), mode]);
    await sb.checksPass(aid);
    await sb.exercised(aid, 'to use its state');
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    expect(run(['inspect', join(out, aid)])).toContain('watched with dnotify');
    await stopped(aid);
    const copy = `${aid}-copy`;
    run(['restore', join(out, aid), '--aid', copy]);
    await sb.checksPass(copy);
    await sb.exercised(copy, 'to use its state');
    await sb.checksPass(copy);
    await stopped(copy);
  }

  it('carries a watch kept through an exec (no FD_CLOEXEC): a file made in the directory after the restore brings its signal', async () => {
    await watchAfterExec('fodds-dnexec-keep', '--dnotify-exec-keep');
  });

  it('carries a close-on-exec watch through an exec that failed (its note, dropped before the exec, comes back)', async () => {
    await watchAfterExec('fodds-dnexec-fails', '--dnotify-exec-fails');
  });

  it('refuses a watched directory held through a second descriptor too (which of them holds the watch is not known), naming it, and leaves the application running', async () => {
    await refused('fodds-dntwo', [fixture('fdodds'), scratch(), '--dnotify-twice'], /process 2 \(fdodds\) fd \d+: a directory \(\S*\/watched\) watched with dnotify \(F_NOTIFY\), also held as process 2 fd \d+: which of them holds the watch is not known, so it cannot be captured/);
  });
});

describe('mapping odds: MAP_GROWSDOWN (also --lazy), MAP_NORESERVE, a PROT_NONE gap, a private file mapping whose unwritten pages stay the file\'s', () => {
  roundTrips('modds', () => [fixture('memodds'), scratch()], true);

  it('refuses a guard page (MADV_GUARD_INSTALL), naming it, and leaves the application running', async (t) => {
    const dir = scratch();
    run(['run', '-d', '--aid', 'modds-probe', '--', fixture('memodds'), dir, '--guard']);
    await waitFor(() => /^GUARD [01]$/m.test(sb.log('modds-probe')), 10_000, 'the fixture to start');
    const supported = /^GUARD 1$/m.test(sb.log('modds-probe'));
    await stopped('modds-probe');
    if (!supported) t.skip();
    await refused('modds-guard', [fixture('memodds'), dir, '--guard'], /process 2 \(memodds\): the memory at 0x[0-9a-f]+-0x[0-9a-f]+ \(anonymous\) cannot be read: its page at 0x[0-9a-f]+ is a guard page \(MADV_GUARD_INSTALL\), which cannot be captured/);
  });

  it('refuses a guard page in a mapping larger than a slice (32 MiB, read on its own), naming it, and leaves the application running', async (t) => {
    const dir = scratch();
    run(['run', '-d', '--aid', 'modds-bigprobe', '--', fixture('memodds'), dir, '--guard-big']);
    await waitFor(() => /^GUARD [01]$/m.test(sb.log('modds-bigprobe')), 10_000, 'the fixture to start');
    const supported = /^GUARD 1$/m.test(sb.log('modds-bigprobe'));
    await stopped('modds-bigprobe');
    if (!supported) t.skip();
    await refused('modds-bigguard', [fixture('memodds'), dir, '--guard-big'], /process 2 \(memodds\): the memory at 0x[0-9a-f]+-0x[0-9a-f]+ \(anonymous\) cannot be read: its page at 0x[0-9a-f]+ is a guard page \(MADV_GUARD_INSTALL\), which cannot be captured/);
  });
});
