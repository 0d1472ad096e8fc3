/**
 * A real Go server: etcd 3.4 (Debian's etcd-server) started with `appshot
 * run`. Go holds what C servers rarely do: an autobound unix datagram
 * socket (its journald logger), many threads making raw system calls
 * that the preload library never sees, an epoll set, a pipe to wake it,
 * and a TCP connection to itself (its gRPC gateway). Keys put, snapshot
 * (which ends it), restore: every key is there, writes go on, and a
 * second round trip keeps them too.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Sandbox, waitFor } from './helpers.js';

const ETCD = '/usr/bin/etcd';
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-etcd-'));
// A range of its own, with the next port for its peers (the map: helpers.ts, Sandbox).
const port = 24000 + (process.pid % 1000) * 2;
const endpoint = `http://127.0.0.1:${port}`;
const KEYS = 200;

afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

function etcdctl(...args: string[]): { ok: boolean; out: string } {
  const r = spawnSync('etcdctl', ['--endpoints', endpoint, '--dial-timeout', '2s', '--command-timeout', '5s', ...args], { encoding: 'utf8' });
  return { ok: r.status === 0, out: r.stdout };
}

/** Puts every pair, 100 to a transaction (etcd takes up to 128 operations
 * in one): an etcdctl for each key cost the suite ~25 s on a loaded
 * machine. */
function putAll(pairs: [string, string][]): boolean {
  for (let i = 0; i < pairs.length; i += 100) {
    // No compares, the puts, no failure branch: each part ends with an empty line.
    const input = `\n${pairs.slice(i, i + 100).map(([k, v]) => `put ${k} ${v}\n`).join('')}\n\n`;
    const r = spawnSync('etcdctl', ['--endpoints', endpoint, '--dial-timeout', '2s', '--command-timeout', '5s', 'txn'], { input, encoding: 'utf8' });
    if (r.status !== 0 || !/^SUCCESS$/m.test(r.stdout)) return false;
  }
  return true;
}

const healthy = () => etcdctl('endpoint', 'health').ok;

function values(): string[] {
  return etcdctl('get', 'key:', '--prefix', '--print-value-only').out.trim().split('\n').filter(Boolean).sort();
}

describe('etcd 3.4', () => {
  it("is installed (the CI installs Debian's etcd-server and etcd-client)", () => {
    expect(existsSync(ETCD), `${ETCD} is missing: apt-get install etcd-server etcd-client`).toBe(true);
  });

  it('keeps every key through snapshot and restore, twice, and takes writes after each', async () => {
    const r = sb.run([
      'run', '-d', '--aid', 'etcd', '--', ETCD, '--data-dir', join(out, 'data'), '--name', 'one',
      '--listen-client-urls', endpoint, '--advertise-client-urls', endpoint,
      '--listen-peer-urls', `http://127.0.0.1:${port + 1}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${port + 1}`,
      '--initial-cluster', `one=http://127.0.0.1:${port + 1}`,
    ]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(healthy, 20_000, 'etcd to be healthy');
    const pairs = Array.from({ length: KEYS }, (_, i): [string, string] => [`key:${String(i).padStart(4, '0')}`, `value-${i}`]);
    expect(putAll(pairs)).toBe(true);
    const want = pairs.map(([, v]) => v);
    expect(values()).toEqual([...want].sort());
    for (const round of ['one', 'two']) {
      const snap = sb.run(['snapshot', 'etcd', '-o', join(out, round)]);
      expect(snap.code, snap.stderr).toBe(0);
      expect(sb.run(['inspect', join(out, round)]).stdout).toMatch(/UNIX_DGRAM\s+unix dgram @[0-9a-f]{5}/);
      expect(healthy()).toBe(false); // it ended with the snapshot
      const restored = sb.run(['restore', join(out, round)]);
      expect(restored.code, restored.stderr).toBe(0);
      await waitFor(healthy, 20_000, 'the restored etcd to be healthy');
      expect(values()).toEqual([...want].sort());
      expect(etcdctl('put', `key:after-${round}`, `written-after-${round}`).ok).toBe(true);
      want.push(`written-after-${round}`);
      expect(values()).toEqual([...want].sort());
    }
    expect(sb.log('etcd')).not.toMatch(/panic|fatal error/);
  });
});
