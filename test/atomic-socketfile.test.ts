/**
 * A restore killed (kill -9) while a socket file of the application is at
 * a name the application does not have (resources/socketfile.ts): moved
 * aside to `.appshot-bound-*` so that another socket of the application
 * can bind the same name (rebound), or bound at a name the application
 * removed its file from, until every process is final (rebound, sockfiles).
 * The names are written into the registration before the files are there;
 * the next command (any) removes each stale socket file there with the
 * registration, as it removes a killed restore's SysV objects and queues.
 * Afterwards the directory holds nothing the restore made, and the image
 * restores whole.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-atomsock-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start } = ownedTests(sb);

/** `appshot restore image` killed at `point`: it must die of SIGKILL there. */
function killedAt(point: string, image: string): void {
  const r = spawnSync(process.execPath, [cli, 'restore', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: point }, encoding: 'utf8', timeout: 50_000 });
  expect(r.signal, `appshot restore was to be killed at '${point}': ${r.stderr}`).toBe('SIGKILL');
}

/** `argv` run as `aid` in a new directory, snapshotted (which ends it),
 * the stale files of its ended sockets removed (what is in the directory
 * afterwards is the restore's), then a restore of it killed at `point`,
 * and any next command run. Its directory, and what it holds then. */
async function killedRestore(aid: string, argv: (dir: string) => string[], point: string): Promise<{ dir: string; image: string; left: string[] }> {
  const dir = mkdtempSync(join(out, 'dir-'));
  await start(aid, argv(dir));
  await sb.checksPass(aid, 3);
  const image = join(out, aid);
  await run(['snapshot', aid, '-o', image]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  for (const f of readdirSync(dir)) rmSync(join(dir, f));
  killedAt(point, image);
  // The next command (any) releases what the killed restore left.
  await waitFor(() => (sb.run(['ps']), !sb.aids().includes(aid)), 10_000, `the registration of ${aid} to go`);
  return { dir, image, left: readdirSync(dir).sort() };
}

/** The image restores whole after it: `names` in its directory, nothing else. */
async function restoresWhole(aid: string, image: string, dir: string, names: string[]): Promise<void> {
  await run(['restore', image]);
  await sb.checksPass(aid, 3);
  expect(readdirSync(dir).sort()).toEqual(names);
  await run(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

describe('a restore killed with a socket file at a name the application does not have', () => {
  const cases: [string, string, string[], string][] = [
    ['the live socket first: killed with its file moved aside for the removed one\'s bind', 'aks1', [], 'restore: socket file moved aside'],
    ['the removed socket first: killed with its file moved aside for the live one\'s bind', 'aks2', ['old-first'], 'restore: socket file moved aside'],
    ['the removed socket first: killed once every descriptor is made (its file aside until every process is final)', 'aks3', ['old-first'], 'restore: fds'],
  ];
  for (const [name, aid, more, point] of cases)
    it(`${name}: the next command removes it, nothing .appshot-bound-* is left, and the image restores whole`, async () => {
      const { dir, image, left } = await killedRestore(aid, (d) => [fixture('rebound'), d, ...more], point);
      expect(left.filter((n) => n.startsWith('.appshot-bound-'))).toEqual([]);
      // What may stay (a stale file, as the ended original's) is at the
      // names the application's live sockets have, which a restore clears.
      expect(left.filter((n) => n !== 'd.sock' && n !== 's.sock')).toEqual([]);
      await restoresWhole(aid, image, dir, ['d.sock', 's.sock']);
    });

  it('files the application removed or renamed (sockfiles), killed once every descriptor is made: none of those names is left', async () => {
    const { dir, image, left } = await killedRestore('aks4', (d) => [fixture('sockfiles'), d], 'restore: fds');
    // hidden.sock and gone.sock were removed by the application,
    // served.sock.tmp renamed to served.sock; what stays is at the names
    // the application's sockets have.
    expect(left.filter((n) => n.startsWith('.appshot-bound-') || ['hidden.sock', 'gone.sock', 'served.sock.tmp'].includes(n))).toEqual([]);
    await restoresWhole('aks4', image, dir, ['rel.sock', 'reldg.sock', 'relub.sock', 'served.sock']);
  });
});
