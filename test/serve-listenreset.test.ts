/**
 * `appshot serve`'s public listener, shared with a restore-mode instance
 * (src/serve/shared.ts), outlives every instance it is given to: an
 * instance restored from an image taken while its application's listener
 * had no options sets some on it (the listener is the public one), and
 * crashes. The next instance is restored from that image, and must find
 * its listener as the image had it, and so must every connection queued
 * for it meanwhile (the kernel copies a listener's options into a
 * connection when its handshake completes): none of the options the
 * crashed one set, its receive buffer unlocked again (autotuned).
 * test/fixtures/listenlater checks its listener and each socket it
 * accepts itself. (Image after image on one socket, read by getsockopt:
 * serve-shared.test.ts.)
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, fixture, type Running, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
let out = '';
// Ports of their own, 27900-27999 (see Sandbox for the other files').
const base = 27900 + (process.pid % 50) * 2;
const APP = base;
const PUBLIC = base + 1;

let serve: Running | undefined;

beforeAll(() => {
  out = mkdtempSync(join(tmpdir(), 'appshot-serve-listenreset-'));
});

afterAll(async () => {
  if (serve && serve.child.exitCode === null) serve.child.kill('SIGTERM');
  await serve?.exited;
  sb.run(['rm', '--force', 'resetapp']);
  sb.run(['rm', '--force', 'reset']);
  await sb.dispose();
  if (out) rmSync(out, { recursive: true, force: true });
});

/** Says `line` to 127.0.0.1:`port`; all it was told before it closed. */
const ask = (port: number, line: string) =>
  new Promise<string>((resolve, reject) => {
    const c = connect(port, '127.0.0.1');
    let got = '';
    c.setTimeout(30_000, () => c.destroy(new Error('no answer in 30 s')));
    c.on('connect', () => c.write(`${line}\n`));
    c.on('data', (d) => (got += d));
    c.on('error', reject);
    c.on('close', () => resolve(got));
  });

const events = (s: Running, name: string) => s.logged<{ event: string; service?: string; shared?: boolean }>().filter((e) => e.service === name);

describe("appshot serve: the shared listener is given back what the next instance's image had", () => {
  beforeAll(async () => {
    const r = sb.run(['run', '-d', '--aid', 'resetapp', '--', fixture('listenlater'), String(APP)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('resetapp').includes('LISTENING'), 10_000, 'listenlater to listen');
    // Reached directly: its listener as a fresh socket is.
    expect(await ask(APP, 'hello')).toBe('OK 1\n');
    const image = join(out, 'later.img');
    const s = sb.run(['snapshot', 'resetapp', '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    const add = sb.run(['service', 'add', 'reset', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1h']);
    expect(add.code, add.stderr).toBe(0);
    // No instance restored ahead of time (prepared): each client's
    // connection is made in serve's listener before its restore.
    serve = sb.start(['serve'], { APPSHOT_PREPARED: '0' });
    await serve.line(/^ready$/, 60_000);
    expect(events(serve, 'reset').find((e) => e.event === 'listen')).toMatchObject({ shared: true });
  });

  it('an instance that set options on its listener crashes: the next, restored from the image taken before, and the client that waited for it, have none of them', async () => {
    expect(await ask(PUBLIC, 'hello')).toBe('OK 2\n');
    // Set on its listener: serve's public one.
    expect(await ask(PUBLIC, 'set')).toBe('SET\n');
    expect(await ask(PUBLIC, 'hello')).toBe('OK 3\n');
    const pids = sb
      .json<{ aid: string; processes: { pid: number; init: boolean }[] }[]>(['ps'])
      .find((a) => a.aid === 'reset')!
      .processes.filter((p) => !p.init)
      .map((p) => p.pid);
    expect(pids).toHaveLength(1);
    process.kill(pids[0], 'SIGKILL');
    await waitFor(() => events(serve!, 'reset').some((e) => e.event === 'crash'), 10_000, 'the crash to be seen').catch((e: Error) => {
      throw new Error(`${e.message}\n${serve!.stderr}`);
    });
    expect(alive(pids[0])).toBe(false);
    // Connected now, queued until the restore from the image (its count
    // as the image had it); checked by the restored server.
    expect(await ask(PUBLIC, 'hello')).toBe('OK 2\n');
    expect(await ask(PUBLIC, 'hello')).toBe('OK 3\n');
    // Nothing it could not give back.
    expect(events(serve!, 'reset').filter((e) => e.event.startsWith('listener-options'))).toEqual([]);
  });
});
