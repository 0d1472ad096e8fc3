/**
 * An ordinary user on their own processes: run, snapshot, restore, an
 * incremental snapshot, a template and its clones, a connected client kept,
 * with no capability at all. As root (CI) the test
 * drops to uid/gid 65534 with setpriv; as anyone else it is that already.
 */
import { spawnSync } from 'node:child_process';
import { connect } from 'node:net';
import { chmodSync, chownSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, TEST_PORTS, waitFor } from './helpers.js';

const NOBODY = 65534;
const root = process.getuid!() === 0;
const home = mkdtempSync(join(tmpdir(), 'appshot-user-'));
if (root) chownSync(home, NOBODY, NOBODY);
chmodSync(home, 0o755);

function appshot(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const env = { ...process.env, CI: '', APPSHOT_HOME: join(home, 'state'), APPSHOT_PORTS: TEST_PORTS };
  const argv = [process.execPath, cli, ...args];
  const r = root
    ? spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all', ...argv], { env, encoding: 'utf8', cwd: home })
    : spawnSync(argv[0], argv.slice(1), { env, encoding: 'utf8', cwd: home });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const log = (aid = 'mine') => {
  try {
    return readFileSync(join(home, 'state', 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const checks = (aid = 'mine') => (log(aid).match(/^CHECK \d+$/gm) ?? []).length;
const uidOf = (pid: number) => Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);

afterAll(async () => {
  for (const aid of ['mine', 'mc-1', 'mc-2']) {
    appshot('stop', aid, '-s', 'KILL');
    await waitFor(() => appshot('ps', aid).code !== 0, 10_000).catch(() => undefined);
  }
  rmSync(home, { recursive: true, force: true });
});

describe('without privileges', () => {
  it('snapshots and restores its own application, incrementally too', async () => {
    const run = appshot('run', '-d', '--aid', 'mine', '--', fixture('snapfix'), '-1', '2');
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => checks() >= 3, 10_000, 'the app to check itself');
    const first = appshot('snapshot', 'mine', '-o', join(home, 'one'), '--leave-running');
    expect(first.code, first.stderr).toBe(0);
    const second = appshot('snapshot', 'mine', '-o', join(home, 'two'), '--json');
    expect(second.code, second.stderr).toBe(0);
    expect(JSON.parse(second.stdout).parent).toBe(join(home, 'one'));
    const restored = appshot('restore', join(home, 'two'));
    expect(restored.code, restored.stderr).toBe(0);
    const before = checks();
    await waitFor(() => checks() >= before + 5 || /FAIL/.test(log()), 10_000, 'the restored app to check itself');
    expect(log()).not.toMatch(/FAIL/);
    const ps = JSON.parse(appshot('ps', 'mine', '--json').stdout)[0].processes;
    for (const p of ps) expect(uidOf(p.pid)).toBe(root ? NOBODY : process.getuid!());
  });

  it('makes a template of its own application and clones it', async () => {
    const full = appshot('snapshot', 'mine', '-o', join(home, 'full'), '--full');
    expect(full.code, full.stderr).toBe(0);
    const t = appshot('template', 'create', join(home, 'full'), '-o', join(home, 'mine.template'));
    expect(t.code, t.stderr).toBe(0);
    const c = appshot('clone', join(home, 'mine.template'), '--aid', 'mc', '--count', '2', '--json');
    expect(c.code, c.stderr).toBe(0);
    for (const aid of ['mc-1', 'mc-2']) {
      const before = checks(aid);
      await waitFor(() => checks(aid) >= before + 5 || /FAIL/.test(log(aid)), 10_000, `${aid} to check itself`);
      expect(log(aid)).not.toMatch(/FAIL/);
      const procs = JSON.parse(appshot('ps', aid, '--json').stdout)[0].processes;
      for (const p of procs) expect(uidOf(p.pid)).toBe(root ? NOBODY : process.getuid!());
    }
  });

  it('keeps a connected client through a snapshot and a restore on this host (no TCP repair: the keeper holds the live connection)', async () => {
    const port = 26690;
    const r = appshot('run', '-d', '--aid', 'web', '--', fixture('tcpfix'), String(port), join(home, 'never'), '1000');
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => /LISTENING|FAIL/.test(log('web')), 10_000, 'the server to listen');
    const client = connect({ port, host: '127.0.0.1' });
    let got = '';
    let failure: Error | undefined;
    client.on('data', (d: Buffer) => (got += d.toString()));
    client.on('error', (e) => (failure = e));
    const echo = async (text: string) => {
      got = '';
      client.write(`ECHO ${text}\n`);
      await waitFor(() => got === `${text}\n` || failure !== undefined, 10_000, `the echo of '${text}'`);
      expect(failure?.message).toBeUndefined();
    };
    try {
      await echo('before');
      const snap = appshot('snapshot', 'web', '-o', join(home, 'web'));
      expect(snap.code, snap.stderr).toBe(0);
      const restored = appshot('restore', join(home, 'web'));
      expect(restored.code, restored.stderr).toBe(0);
      await echo('after the restore');
    } finally {
      client.destroy();
      appshot('rm', '-f', 'web');
    }
  });
});
