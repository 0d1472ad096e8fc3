/**
 * A real application: redis-server (Debian's package) started with
 * `appshot run`, loaded with keys, snapshotted (which ends it), restored,
 * and asked for every key; then it takes writes, and goes through a second
 * round trip with them.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Sandbox, waitFor } from './helpers.js';

const REDIS = '/usr/bin/redis-server';
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-redis-'));
const port = 21000 + (process.pid % 5000);
const KEYS = 2000;

afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** Runs commands through redis-cli, one per line; returns its answers. */
function cli(commands: string[]): string[] {
  const r = spawnSync('redis-cli', ['-p', String(port)], { input: commands.join('\n') + '\n', encoding: 'utf8' });
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
});
