/**
 * A real application: redis-server (Debian's package) started with
 * `appshot run`, loaded with keys, snapshotted (which ends it), restored,
 * and asked for every key; then it takes writes, and goes through a second
 * round trip with them. Then a template of a loaded redis, cloned 8 times.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { root, Sandbox, waitFor } from './helpers.js';

const REDIS = '/usr/bin/redis-server';
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-redis-'));
// A range of its own (the map: helpers.ts, Sandbox).
const port = 21000 + (process.pid % 1000);
const KEYS = 2000;

afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** Runs commands through redis-cli, one per line; returns its answers. */
function cli(commands: string[], on = port): string[] {
  const r = spawnSync('redis-cli', ['-p', String(on)], { input: commands.join('\n') + '\n', encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`redis-cli: ${r.stderr}`);
  return r.stdout.trim().split('\n');
}

const ping = () => {
  try {
    return cli(['PING'])[0] === 'PONG';
  } catch {
    return false;
  }
};

describe('redis-server', () => {
  it('is installed (the CI installs Debian\'s redis-server)', () => {
    expect(existsSync(REDIS), `${REDIS} is missing: apt-get install redis-server`).toBe(true);
  });

  it('answers GET for every key after snapshot and restore, and accepts writes', async () => {
    const r = sb.run(['run', '-d', '--aid', 'redis', '--', REDIS, '--port', String(port), '--save', '', '--appendonly', 'no']);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(ping, 10_000, 'redis to answer');
    const keys = Array.from({ length: KEYS }, (_, i) => i);
    expect(cli(keys.map((i) => `SET key:${i} value-${i}-${'x'.repeat(i % 50)}`)).every((l) => l === 'OK')).toBe(true);

    const snap = sb.run(['snapshot', 'redis', '-o', join(out, 'one')]);
    expect(snap.code, snap.stderr).toBe(0);
    expect(ping()).toBe(false); // it ended with the snapshot

    const restored = sb.run(['restore', join(out, 'one')]);
    expect(restored.code, restored.stderr).toBe(0);
    await waitFor(ping, 5000, 'the restored redis to answer');
    const values = cli(keys.map((i) => `GET key:${i}`));
    expect(values).toEqual(keys.map((i) => `value-${i}-${'x'.repeat(i % 50)}`));
    expect(cli(['SET after restore', 'GET after', 'DBSIZE'])).toEqual(['OK', 'restore', String(KEYS + 1)]);

    // Again, with the write made after the first restore.
    expect(sb.run(['snapshot', 'redis', '-o', join(out, 'two')]).code).toBe(0);
    expect(sb.run(['restore', join(out, 'two')]).code).toBe(0);
    await waitFor(ping, 5000, 'the twice-restored redis to answer');
    expect(cli(['GET after', 'GET key:1999', 'DBSIZE'])).toEqual(['restore', `value-1999-${'x'.repeat(1999 % 50)}`, String(KEYS + 1)]);
  });

  it('clones a loaded redis template 8 times: each on its own port with the whole dataset, writes kept apart', async () => {
    const tport = port + 1;
    // templates/redis.rules, with its paths and port where this test runs.
    const rules = join(out, 'redis.rules');
    writeFileSync(
      rules,
      readFileSync(join(root, 'templates', 'redis.rules'), 'utf8')
        .replaceAll('/var/lib/redis', join(out, 'lib'))
        .replaceAll('/run/redis', join(out, 'run'))
        .replaceAll('6379', String(tport)),
    );
    const r = sb.run(['run', '-d', '--aid', 'rtpl', '--rules', rules, '--', REDIS, '--port', String(tport), '--save', '', '--appendonly', 'no']);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => cli(['PING'], tport)[0] === 'PONG', 10_000, 'the template redis to answer');
    const keys = Array.from({ length: KEYS }, (_, i) => i);
    expect(cli(keys.map((i) => `SET key:${i} v${i}`), tport).every((l) => l === 'OK')).toBe(true);
    expect(sb.run(['snapshot', 'rtpl', '-o', join(out, 'rsnap')]).code).toBe(0);
    const t = sb.run(['template', 'create', join(out, 'rsnap'), '-o', join(out, 'redis.template')]);
    expect(t.code, t.stderr).toBe(0);
    // Every rule of the shipped file does something for a running redis.
    expect(t.stderr).not.toContain('matches nothing');

    const c = sb.run(['clone', join(out, 'redis.template'), '--aid', 'rc', '--count', '8', '--json']);
    expect(c.code, c.stderr).toBe(0);
    const clones = (JSON.parse(c.stdout) as { aid: string; ports: { virtual: number; system: number; mode: string }[] }[]).map((x) => ({
      aid: x.aid,
      port: x.ports.find((p) => p.virtual === tport && p.mode === 'allocate')!.system,
    }));
    expect(new Set(clones.map((x) => x.port)).size).toBe(8);
    for (const x of clones) {
      expect(cli(['DBSIZE', 'GET key:0', `GET key:${KEYS - 1}`], x.port)).toEqual([String(KEYS), 'v0', `v${KEYS - 1}`]);
      expect(cli([`SET mine ${x.aid}`, `SET key:7 ${x.aid}`], x.port)).toEqual(['OK', 'OK']);
    }
    for (const x of clones) {
      expect(cli(['GET mine', 'GET key:7', 'DBSIZE'], x.port)).toEqual([x.aid, x.aid, String(KEYS + 1)]);
    }
    for (const x of clones) expect(sb.run(['stop', x.aid]).code).toBe(0);
    await waitFor(() => sb.aids().every((a) => !a.startsWith('rc-')), 10_000, 'the clones to end');
  });
});
