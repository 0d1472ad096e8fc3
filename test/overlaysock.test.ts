/**
 * Socket files on an overlay whose layers are on other file systems
 * (without xino: review28 R4, resources/socketfile.ts). There stat gives a
 * socket file its layer's device and sock_diag the overlay's: the file was
 * not recognised (recorded as removed at snapshot: after a restore the
 * application's names were gone). An overlay of two tmpfs made here, as
 * container runtimes make theirs (root only: mount).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-overlaysock-'));
const [lower, upper, merged] = ['lower', 'upper', 'merged'].map((d) => join(out, d));
const mounted: string[] = [];
const sh = (...argv: string[]) => spawnSync(argv[0], argv.slice(1), { encoding: 'utf8' });
const root = process.getuid?.() === 0;
beforeAll(() => {
  if (!root) return;
  for (const d of [lower, upper, merged]) mkdirSync(d);
  for (const d of [lower, upper]) {
    const r = sh('mount', '-t', 'tmpfs', 'tmpfs', d);
    expect(r.status, r.stderr).toBe(0);
    mounted.unshift(d);
  }
  mkdirSync(join(upper, 'up'));
  mkdirSync(join(upper, 'work'));
  const r = sh('mount', '-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${join(upper, 'up')},workdir=${join(upper, 'work')},xino=off`, merged);
  expect(r.status, r.stderr).toBe(0);
  mounted.unshift(merged);
});
afterAll(async () => {
  await sb.dispose();
  for (const d of mounted) sh('umount', d);
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start } = ownedTests(sb);

describe.skipIf(!root)('unix sockets bound on an overlay without xino', () => {
  it('come back with their files where the application left them, renamed and with their mode', async () => {
    const dir = join(merged, 'app');
    mkdirSync(dir);
    await start('ovl1', [fixture('sockfiles'), dir]);
    await sb.checksPass('ovl1', 3);
    await run(['snapshot', 'ovl1', '-o', join(out, 'ovl1.img')]);
    await waitFor(() => !sb.aids().includes('ovl1'), 10_000, 'ovl1 to end');
    await run(['restore', join(out, 'ovl1.img')]);
    await sb.checksPass('ovl1', 3);
    expect(readdirSync(dir).sort()).toEqual(['rel.sock', 'reldg.sock', 'relub.sock', 'served.sock']);
    await run(['stop', 'ovl1']);
    await waitFor(() => !sb.aids().includes('ovl1'), 10_000, 'ovl1 to stop');
  });
});
