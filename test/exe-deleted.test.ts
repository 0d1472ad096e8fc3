/**
 * A process whose executable was deleted, or replaced, while it ran (a
 * package upgrade under a running server: dpkg renames the new file over
 * the old one, and /proc/PID/exe reads "... (deleted)"), snapshotted and
 * restored (test/fixtures/exedeleted.c checks its executable's name,
 * size, mode and bytes, and its code mapping's place, protection and
 * bytes, from before to after): it runs the old text, never the file now
 * at its name, and its /proc/PID/exe names what it named where the name
 * is free; where another file holds it, the restore says so.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, linkSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, NOBODY, Sandbox, stoppedAt, TEST_PORTS, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
const out = scratchDir('appshot-exedeleted-');
const dirs: string[] = [];
afterAll(async () => {
  await sb.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** `s` matched exactly in a RegExp. */
const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** The native point between the copy made at the executable's name and
 * its removal from it (addon/src/exename.c, src/killpoint.ts). */
const MADE_POINT = 'restore: executable made at its name';

const scratch = () => {
  const d = mkdtempSync(join(tmpdir(), 'appshot-exedeleted-dir-'));
  dirs.push(d);
  return d;
};

async function stopped(aid: string): Promise<void> {
  sb.ok(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

/** The restore's notKept lines about executables. */
function restored(args: string[]): string[] {
  const r = JSON.parse(sb.ok([...args, '--json'])) as { notKept?: string[] };
  return (r.notKept ?? []).filter((l) => /executable/.test(l));
}

/** The fixture started in `dir`, its executable changed under it (it
 * checks itself before READY's checks go on). */
async function started(aid: string, dir: string, how: 'deleted' | 'replaced'): Promise<void> {
  sb.ok(['run', '-d', '--aid', aid, '--', fixture('exedeleted'), dir, how]);
  await sb.checksPass(aid);
}

/** What is at the executable's old name once a restore is done: nothing
 * (`deleted`: the restore left no file there), or the new version, as the
 * fixture checks it. */
function nameAfter(dir: string, how: 'deleted' | 'replaced'): void {
  const at = join(dir, 'server');
  if (how === 'deleted') expect(existsSync(at), `a file left at ${at}`).toBe(false);
  else expect(readFileSync(at).length).toBeGreaterThan(0);
}

/** Where the name is free, nothing to say; where another file holds it,
 * that the executable has another name, and why. */
function saysWhatItSays(said: string[], dir: string, how: 'deleted' | 'replaced'): void {
  if (how === 'deleted') expect(said).toEqual([]);
  else
    expect(said.join('\n')).toMatch(
      new RegExp(`^process \\d+ \\(server\\): its executable ${esc(dir)}/server \\(deleted\\), made again from its bytes, is named ${esc(dir)}/\\.appshot-restored-[^ ]+ \\(deleted\\): another file was at its name when the copy was made \\(a new version of the program, or another restore of it making its copy there at that moment\\)$`, 'm'),
    );
}

describe.each(['deleted', 'replaced'] as const)('an executable %s under a running process', (how) => {
  it('comes back running the old text from the old bytes: snapshot (ends it) → restore; --leave-running → restore --lazy beside it; a second snapshot of the restored one', async () => {
    const dir = scratch();
    const first = `exe-${how}1`;
    await started(first, dir, how);
    sb.ok(['snapshot', first, '-o', join(out, first)]);
    const said = restored(['restore', join(out, first)]);
    nameAfter(dir, how);
    saysWhatItSays(said, dir, how);
    await sb.checksPass(first);
    await sb.exercised(first, 'to run its code');
    await sb.checksPass(first);

    // Snapshotted again as it came back: the same once more. Its
    // executable's name is now the one it came back with, free (a
    // replaced one's copy's too): nothing to say.
    sb.ok(['snapshot', first, '-o', join(out, `${first}-again`)]);
    expect(restored(['restore', join(out, `${first}-again`)])).toEqual([]);
    nameAfter(dir, how);
    await sb.checksPass(first);
    await sb.exercised(first, 'to run its code');
    await stopped(first);

    const original = `exe-${how}2`;
    const copy = `exe-${how}3`;
    const dir2 = scratch();
    await started(original, dir2, how);
    sb.ok(['snapshot', original, '-o', join(out, original), '--leave-running']);
    await sb.checksPass(original);
    saysWhatItSays(restored(['restore', join(out, original), '--aid', copy, '--lazy']), dir2, how);
    nameAfter(dir2, how);
    await sb.checksPass(copy);
    await sb.checksPass(original);
    await sb.exercised(copy, 'to run its code');
    await sb.exercised(original, 'to run its code');
    await stopped(copy);
    await stopped(original);
  });
});

// PR_SET_MM_MAP's exe_fd needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN),
// never CAP_SYS_RESOURCE: an ordinary user's restore cannot set it, and
// says so, rather than restore the process silently with another.
/** Whether this test runs as an ordinary user that still has
 * CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN (a CI container granting it):
 * then its restore can set the executable. */
function ordinaryButCapable(): boolean {
  if (process.getuid!() === 0) return false;
  const capEff = BigInt('0x' + (/^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0'));
  return (capEff & ((1n << 40n) | (1n << 21n))) !== 0n;
}

describe.skipIf(ordinaryButCapable())('an executable deleted under a process of an ordinary user, restored by that user', () => {
  const asRoot = process.getuid!() === 0;
  const home = mkdtempSync(join(tmpdir(), 'appshot-exedeleted-user-'));
  dirs.push(home);
  if (asRoot) chownSync(home, NOBODY, NOBODY);
  chmodSync(home, 0o755);
  const appshot = (...args: string[]) => {
    const env = { ...process.env, CI: '', APPSHOT_HOME: join(home, 'state'), APPSHOT_PORTS: TEST_PORTS };
    const argv = [process.execPath, cli, ...args];
    const r = asRoot
      ? spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', ...argv], { env, encoding: 'utf8', cwd: home })
      : spawnSync(argv[0], argv.slice(1), { env, encoding: 'utf8', cwd: home });
    expect(r.status, r.stderr).toBe(0);
    return r.stdout;
  };
  const log = () => {
    try {
      return readFileSync(join(home, 'state', 'apps', 'mine', 'log'), 'utf8');
    } catch {
      return '';
    }
  };
  const checks = () => (log().match(/^CHECK \d+$/gm) ?? []).length;
  afterAll(async () => {
    spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, cli, 'stop', 'mine', '-s', 'KILL'], { env: { ...process.env, APPSHOT_HOME: join(home, 'state') } });
  });

  it("keeps appshot's seed as its executable, and the restore says why", async () => {
    appshot('run', '-d', '--aid', 'mine', '--', fixture('exedeleted'), home, 'deleted');
    await waitFor(() => checks() >= 3 || /FAIL/.test(log()), 30_000, 'the app to check itself');
    expect(log()).not.toMatch(/FAIL/);
    appshot('snapshot', 'mine', '-o', join(home, 'img'));
    const said = (JSON.parse(appshot('restore', join(home, 'img'), '--json')) as { notKept: string[] }).notKept.join('\n');
    expect(said).toMatch(new RegExp(`^process \\d+ \\(server\\): its executable ${esc(home)}/server \\(deleted\\), made again from its bytes, could not be set \\(restoring the mm fields \\(PR_SET_MM_MAP\\): EPERM\\): /proc/PID/exe names appshot's seed$`, 'm'));
    // As said: the fixture sees the seed's name where its own was.
    await waitFor(() => /FAIL/.test(log()), 30_000, 'the restored app to check its executable');
    expect(log()).toMatch(/^FAIL: exe is '.*', not '.*\/server \(deleted\)'/m);
    expect(existsSync(join(home, 'server'))).toBe(false);
  });
});

// The copy made at the executable's name for an instant (deleted.ts
// madeAtItsName, addon/src/exename.c), stopped or killed in that instant
// (APPSHOT_TEST_STOP_AT / KILL_AT at MADE_POINT): deterministic, no sleeps.
describe("an executable's copy at its name, in the instant it is there", () => {
  /** The fixture run in a new directory `app` (deleted), snapshotted (which
   * ends it): the image, and the directory. */
  async function imaged(aid: string): Promise<{ image: string; base: string; dir: string }> {
    const base = scratch();
    const dir = join(base, 'app');
    mkdirSync(dir);
    await started(aid, dir, 'deleted');
    const image = join(out, aid);
    sb.ok(['snapshot', aid, '-o', image]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    return { image, base, dir };
  }

  /** `aid` ended: stopped, unless it ended already (its executable's name
   * is not what the fixture checks for, and it exits on that). */
  async function ended(aid: string): Promise<void> {
    sb.run(['stop', aid, '--signal', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  }

  /** A restore of `image` as `aid` stopped at MADE_POINT, `meanwhile` done,
   * then let go: what it said of executables. */
  async function restoredAround(image: string, aid: string, meanwhile: () => void): Promise<string[]> {
    const run = await stoppedAt(sb, ['restore', image, '--aid', aid, '--json'], MADE_POINT, 'the restore to stop with the copy at its name');
    meanwhile();
    const r = await run.go();
    expect(r.code, r.stderr).toBe(0);
    return ((JSON.parse(r.stdout) as { notKept?: string[] }).notKept ?? []).filter((l) => /executable/.test(l));
  }

  it('a restore killed there leaves nothing at the name once the next command has run; the image restores whole after', async () => {
    const aid = 'exe-killed';
    const { image, dir } = await imaged(aid);
    const at = join(dir, 'server');
    const r = spawnSync(process.execPath, [cli, 'restore', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: MADE_POINT }, encoding: 'utf8', timeout: 50_000 });
    expect(r.signal, `the restore was to be killed at '${MADE_POINT}': ${r.stderr}`).toBe('SIGKILL');
    // Killed in the instant: the copy is at the name, empty, 0600.
    const left = statSync(at);
    expect([left.size, left.mode & 0o7777]).toEqual([0, 0o600]);
    // The next command (any) releases what the killed restore left.
    await waitFor(() => (sb.run(['ps']), !sb.aids().includes(aid)), 10_000, `the registration of ${aid} to go`);
    expect(existsSync(at), `a file left at ${at}`).toBe(false);
    expect(restored(['restore', image])).toEqual([]);
    await sb.checksPass(aid);
    expect(readdirSync(dir)).toEqual([]);
    await stopped(aid);
  });

  it('a file like ours already at the name, the restore failed later: that file is still there (review r425 G1)', async () => {
    const aid = 'exe-lockfile';
    const { image, dir } = await imaged(aid);
    // Another program's empty 0600 lock file of the same user at the name:
    // what the clear of a killed restore's leftover would take for ours.
    const at = join(dir, 'server');
    writeFileSync(at, '');
    chmodSync(at, 0o600);
    const before = statSync(at);
    expect([before.size, before.mode & 0o7777, before.nlink]).toEqual([0, 0o600, 1]);
    const r = spawnSync(process.execPath, [cli, 'restore', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'restore: state and signals' }, encoding: 'utf8', timeout: 50_000 });
    expect(r.status, r.stderr).not.toBe(0);
    expect(r.stderr).toMatch(/failure injected at 'restore: state and signals'/);
    await waitFor(() => (sb.run(['ps']), !sb.aids().includes(aid)), 10_000, `the registration of ${aid} to go`);
    expect(existsSync(at), `the file that was at ${at} before the restore was removed`).toBe(true);
    expect(statSync(at).ino).toBe(before.ino);
    rmSync(at);
  });

  it('ours moved, or given another name, as it was made: made beside its name, said; the other name keeps an empty file, never the image\'s bytes', async () => {
    const { image, dir } = await imaged('exe-moved');
    const at = join(dir, 'server');
    const beside = `is named ${esc(dir)}/\\.appshot-restored-[^ ]+ \\(deleted\\)`;

    const moved = await restoredAround(image, 'exe-moved1', () => renameSync(at, join(dir, 'moved')));
    expect(moved.join('\n')).toMatch(new RegExp(`${beside}: the copy made at its name was moved elsewhere as it was made$`, 'm'));
    await ended('exe-moved1');
    expect(statSync(join(dir, 'moved')).size).toBe(0);
    rmSync(join(dir, 'moved'));

    const linked = await restoredAround(image, 'exe-moved2', () => linkSync(at, join(dir, 'linked')));
    expect(linked.join('\n')).toMatch(new RegExp(`${beside}: the copy made at its name was given another name as it was made$`, 'm'));
    await ended('exe-moved2');
    expect(existsSync(at)).toBe(false);
    expect(statSync(join(dir, 'linked')).size).toBe(0);
    rmSync(join(dir, 'linked'));
    expect(readdirSync(dir)).toEqual([]);
  });

  it("a directory of the name swapped for a symlink meanwhile: the removal stays in the directory the copy was made in, and another directory's file of that name is untouched (review r413 F1)", async () => {
    const { image, base, dir } = await imaged('exe-swapped');
    const victims = join(base, 'victims');
    mkdirSync(victims);
    writeFileSync(join(victims, 'server'), 'not the restore\'s to remove\n');
    const was = join(base, 'app.was');
    await restoredAround(image, 'exe-swapped1', () => {
      renameSync(dir, was);
      symlinkSync(victims, dir);
    });
    expect(readFileSync(join(victims, 'server'), 'utf8')).toBe('not the restore\'s to remove\n');
    expect(readdirSync(was)).toEqual([]);
    await ended('exe-swapped1');
  });
});

// The case review r413 F1 is about: root restoring an ordinary user's
// application, whose user writes the directories of the name.
describe.skipIf(process.getuid!() !== 0)("a root restore of an ordinary user's application whose executable was deleted", () => {
  it('makes the copy at its name as that user, removes it, and gives the name back', async () => {
    const base = scratch();
    chmodSync(base, 0o755);
    const dir = join(base, 'app');
    mkdirSync(dir);
    chownSync(dir, NOBODY, NOBODY);
    const aid = 'exe-nobody';
    sb.ok(['run', '-d', '--aid', aid, '--', 'setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--', fixture('exedeleted'), dir, 'deleted']);
    await sb.checksPass(aid);
    const image = join(out, aid);
    sb.ok(['snapshot', aid, '-o', image]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    const at = join(dir, 'server');
    const run = await stoppedAt(sb, ['restore', image, '--json'], MADE_POINT, 'the restore to stop with the copy at its name');
    // Made as the application's user, not as root.
    const made = statSync(at);
    expect([made.uid, made.gid, made.size, made.mode & 0o7777]).toEqual([NOBODY, NOBODY, 0, 0o600]);
    const r = await run.go();
    expect(r.code, r.stderr).toBe(0);
    expect(((JSON.parse(r.stdout) as { notKept?: string[] }).notKept ?? []).filter((l) => /executable/.test(l))).toEqual([]);
    expect(existsSync(at), `a file left at ${at}`).toBe(false);
    await sb.checksPass(aid);
    await stopped(aid);
  });
});
