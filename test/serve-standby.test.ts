/**
 * `appshot serve` and standby supervisors (restore/standby.ts): while a
 * service is suspended, the serve process keeps an appshot-init started
 * ahead of time with its seeds forked (`--standby`); the next resume makes
 * that very process the instance's init instead of spawning one. None of
 * them outlives serve: stopped with SIGTERM, or killed with SIGKILL, every
 * standby and its seeds go. APPSHOT_STANDBYS=0: none is kept or taken.
 *
 * Served with --prepared 0: a prepared resume (serve-prepared.test.ts)
 * takes its standby when it prepares, not when a connection comes; this
 * is the resume of a service beyond the prepared ones.
 *
 * Observed from outside: a standby is a child of the serve process whose
 * command line says --standby and which no application names as its init;
 * the instance's registration names its init (app.json initPid).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, type Running, Sandbox, snapshotListener, tcpExchange, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-standby-'));
// Ports of their own, 18000-18999 (see Sandbox for the other files').
const base = 18000 + (process.pid % 500) * 2;
const APP = base;
const PUBLIC = base + 1;

let serve: Running | undefined;

afterAll(async () => {
  if (serve && serve.child.exitCode === null) serve.child.kill('SIGKILL');
  await serve?.exited;
  sb.run(['rm', '-f', 'db']);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const children = (pid: number): number[] =>
  spawnSync('ps', ['-o', 'pid=', '--ppid', String(pid)], { encoding: 'utf8' })
    .stdout.split('\n')
    .filter((l) => l.trim())
    .map(Number);

const cmdline = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return '';
  }
};

const isStandbyProcess = (pid: number) => cmdline(pid).includes('\0--standby\0');

/** The init the application `aid` is registered with, if registered. */
function initOf(aid: string): number | undefined {
  try {
    return JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).initPid as number;
  } catch {
    return undefined;
  }
}

/** Standbys of the serve process `pid` not (yet) given to an application,
 * each with its one seed forked. */
function standbys(pid: number): number[] {
  const taken = initOf('db');
  return children(pid).filter((c) => isStandbyProcess(c) && c !== taken);
}

const ready = (pid: number) => standbys(pid).length >= 1 && standbys(pid).every((s) => children(s).length === 1);

const state = () => sb.json<{ state: string; restores: number }>(['service', 'show', 'db']);

interface Logged {
  event: string;
  standby?: boolean;
}
const events = (s: Running) => s.logged<Logged>();

describe('appshot serve: standby supervisors', () => {
  beforeAll(async () => {
    const image = join(out, 'shared.img');
    await snapshotListener(sb, 'tpl', APP, image);
    const add = sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '500ms']);
    expect(add.code, add.stderr).toBe(0);
  });

  it('resumes a suspended service with the standby it kept, keeps one again while suspended, and none outlives serve (SIGTERM)', async () => {
    serve = sb.start(['serve', '--prepared', '0']);
    await serve.line(/^ready$/);
    const servePid = serve.child.pid!;
    // Suspended from the start: a standby waits for its resume.
    await waitFor(() => ready(servePid), 10_000, 'a standby with its seed');
    const [waiting] = standbys(servePid);
    const seed = children(waiting)[0];

    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    // That very process became the instance's init, its seed the server.
    expect(initOf('db')).toBe(waiting);
    const vpids = sb.json<{ aid: string; processes: { vpid: number; pid: number }[] }[]>(['ps']).find((a) => a.aid === 'db')!.processes;
    expect(vpids.find((p) => p.vpid === 2)?.pid).toBe(seed);
    await waitFor(() => events(serve!).some((e) => e.event === 'restore'), 30_000, 'the restore to be logged');
    expect(events(serve).find((e) => e.event === 'restore')).toMatchObject({ standby: true });

    // Idle: suspended, and a standby is kept again for the next resume,
    // which takes it too.
    await waitFor(() => state().state === 'suspended' && !alive(waiting), 15_000, 'the service to be suspended');
    await waitFor(() => ready(servePid), 10_000, 'a standby again');
    const [next] = standbys(servePid);
    expect(next).not.toBe(waiting);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    expect(initOf('db')).toBe(next);

    // Suspended again, a standby kept; serve stopped: it goes with its seed.
    // Judged by serve's own log: the state file is written up to 100 ms
    // after a change (longer on a loaded machine), so right after the
    // resume it can still say 'suspended' while the standby taken is
    // already replaced; SIGTERM then would leave the instance running for
    // the next test's serve to adopt (seen in CI).
    const suspends = () => events(serve!).filter((e) => e.event === 'suspend').length;
    await waitFor(() => suspends() >= 2 && state().state === 'suspended' && ready(servePid), 15_000, 'suspended with a standby');
    const doomed = standbys(servePid).flatMap((s) => [s, ...children(s)]);
    expect(doomed.length).toBe(2);
    serve.child.kill('SIGTERM');
    expect((await serve.exited).code).toBe(0);
    // Gone (and waited for by serve before it left: not even a zombie
    // handed to another parent).
    expect(doomed.filter((p) => alive(p) && isStandbyProcess(p))).toEqual([]);
    await waitFor(() => doomed.every((p) => !alive(p)), 30_000, 'the seed to die with its standby');
    expect(events(serve).filter((e) => e.event === 'restore').map((e) => e.standby)).toEqual([true, true]);
  });

  it('takes none with APPSHOT_STANDBYS=0, and a serve killed with SIGKILL leaves none behind', async () => {
    const plain = sb.start(['serve', '--prepared', '0'], { APPSHOT_STANDBYS: '0' });
    await plain.line(/^ready$/);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    // What serve said, if it never logs the restore (seen once in CI).
    await waitFor(() => events(plain).some((e) => e.event === 'restore'), 30_000, 'the restore to be logged').catch((e: Error) => {
      throw new Error(`${e.message}; serve said: ${plain.stderr.slice(-3000)}`);
    });
    expect(events(plain).find((e) => e.event === 'restore')).toMatchObject({ standby: false });
    expect(children(plain.child.pid!).filter(isStandbyProcess).filter((p) => p !== initOf('db'))).toEqual([]);
    await waitFor(() => state().state === 'suspended', 15_000, 'the service to be suspended');
    plain.child.kill('SIGTERM');
    await plain.exited;

    serve = sb.start(['serve', '--prepared', '0']);
    await serve.line(/^ready$/);
    const servePid = serve.child.pid!;
    await waitFor(() => ready(servePid), 10_000, 'a standby with its seed');
    const doomed = standbys(servePid).flatMap((s) => [s, ...children(s)]);
    expect(doomed.length).toBe(2);
    serve.child.kill('SIGKILL');
    await serve.exited;
    await waitFor(() => doomed.every((p) => !alive(p) || !isStandbyProcess(p)), 10_000, 'the standby and its seed to go with serve');
  });
});
