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
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, NOBODY, Sandbox, TEST_PORTS, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
const out = scratchDir('appshot-exedeleted-');
const dirs: string[] = [];
afterAll(async () => {
  await sb.dispose();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

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

describe.each(['deleted', 'replaced'] as const)('an executable %s under a running process', (how) => {
  it('comes back running the old text from the old bytes: snapshot (ends it) → restore; --leave-running → restore --lazy beside it; a second snapshot of the restored one', async () => {
    const dir = scratch();
    const first = `exe-${how}1`;
    await started(first, dir, how);
    sb.ok(['snapshot', first, '-o', join(out, first)]);
    const said = restored(['restore', join(out, first)]);
    nameAfter(dir, how);
    // Where the name is free, nothing to say; where another file holds
    // it, that the executable has another name.
    if (how === 'deleted') expect(said).toEqual([]);
    else expect(said.join('\n')).toMatch(new RegExp(`^process \\d+ \\(server\\): its executable ${dir}/server \\(deleted\\), made again from its bytes, is named ${dir}/\\.appshot-restored-[^ ]+ \\(deleted\\): another file is at its name now$`, 'm'));
    await sb.checksPass(first);
    await sb.exercised(first, 'to run its code');
    await sb.checksPass(first);

    // Snapshotted again as it came back: the same once more.
    sb.ok(['snapshot', first, '-o', join(out, `${first}-again`)]);
    restored(['restore', join(out, `${first}-again`)]);
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
    restored(['restore', join(out, original), '--aid', copy, '--lazy']);
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
describe('an executable deleted under a process of an ordinary user, restored by that user', () => {
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
    expect(said).toMatch(new RegExp(`^process \\d+ \\(server\\): its executable ${home}/server \\(deleted\\), made again from its bytes, could not be set \\(restoring the mm fields \\(PR_SET_MM_MAP\\): EPERM\\): /proc/PID/exe names appshot's seed$`, 'm'));
    // As said: the fixture sees the seed's name where its own was.
    await waitFor(() => /FAIL/.test(log()), 30_000, 'the restored app to check its executable');
    expect(log()).toMatch(/^FAIL: exe is '.*', not '.*\/server \(deleted\)'/m);
    expect(existsSync(join(home, 'server'))).toBe(false);
  });
});
