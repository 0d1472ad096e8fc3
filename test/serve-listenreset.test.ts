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
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, fixture, type Running, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
let out = '';
// Ports of their own, 27900-27999 (see Sandbox for the other files'):
// two for each case below.
const base = 27900 + (process.pid % 16) * 6;

const serves: Running[] = [];

beforeAll(() => {
  out = mkdtempSync(join(tmpdir(), 'appshot-serve-listenreset-'));
});

afterAll(async () => {
  for (const serve of serves) if (serve.child.exitCode === null) serve.child.kill('SIGTERM');
  await Promise.all(serves.map((s) => s.exited));
  for (const aid of ['resetapp', 'reset', 'resetapp0', 'reset0', 'resetappc', 'resetc']) sb.run(['rm', '--force', aid]);
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

/** The backlog of what listens on 127.0.0.1:`port` (ss's Send-Q for a
 * listener), -1 if nothing does. */
const backlogOf = (port: number): number => {
  const r = spawnSync('ss', ['-Hltn', `src 127.0.0.1:${port}`], { encoding: 'utf8' });
  const fields = r.stdout.trim().split(/\s+/);
  return fields.length >= 3 ? Number(fields[2]) : -1;
};

const events = (s: Running, name: string) => s.logged<{ event: string; service?: string; shared?: boolean; was?: string }>().filter((e) => e.service === name);

// Preloaded: serve has read the image before the crash, and gives the
// listener its options at once. Not preloaded (APPSHOT_PRELOADED=0, as
// with more suspended services than serve keeps read): the crash finds
// the image unread, and the listener gets a fresh socket's options until
// it is (the client queued meanwhile gets those); the restore sets the
// image's, and says what it could not (none here).
describe.each([
  { preloaded: true, app: base, pub: base + 1, name: 'reset', clamp: false },
  { preloaded: false, app: base + 2, pub: base + 3, name: 'reset0', clamp: false },
  // And one option the kernel cannot give back: said, at the crash and
  // by the restore, never silent.
  { preloaded: false, app: base + 4, pub: base + 5, name: 'resetc', clamp: true },
])("appshot serve: the shared listener is given back what the next instance's image had (image read ahead: $preloaded, one left: $clamp)", ({ preloaded, app: APP, pub: PUBLIC, name, clamp }) => {
  let serve: Running;
  beforeAll(async () => {
    const r = sb.run(['run', '-d', '--aid', `${name.replace('reset', 'resetapp')}`, '--', fixture('listenlater'), String(APP)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log(name.replace('reset', 'resetapp')).includes('LISTENING'), 10_000, 'listenlater to listen');
    // Reached directly: its listener as a fresh socket is.
    expect(await ask(APP, 'hello')).toBe('OK 1\n');
    const image = join(out, `${name}.img`);
    const s = sb.run(['snapshot', name.replace('reset', 'resetapp'), '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    const add = sb.run(['service', 'add', name, '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1h']);
    expect(add.code, add.stderr).toBe(0);
    // No instance restored ahead of time (prepared): each client's
    // connection is made in serve's listener before its restore. Each
    // case its own serve (one front door per state directory: one at a
    // time, the first stopped at its end).
    serve = sb.start(['serve'], { APPSHOT_PREPARED: '0', ...(preloaded ? {} : { APPSHOT_PRELOADED: '0' }) });
    serves.push(serve);
    await serve.line(/^ready$/, 60_000);
    expect(events(serve, name).find((e) => e.event === 'listen')).toMatchObject({ shared: true });
  });

  afterAll(async () => {
    if (serve.child.exitCode === null) serve.child.kill('SIGTERM');
    await serve.exited;
    sb.run(['service', 'rm', name]);
  });

  it('an instance that set options on its listener crashes: the next, restored from the image taken before, and the client that waited for it, have none of them', async () => {
    expect(await ask(PUBLIC, 'hello')).toBe('OK 2\n');
    // Set on its listener: serve's public one.
    expect(await ask(PUBLIC, 'set')).toBe('SET\n');
    expect(await ask(PUBLIC, 'hello')).toBe('OK 3\n');
    if (clamp) expect(await ask(PUBLIC, 'clamp')).toBe('CLAMPED\n');
    const pids = sb
      .json<{ aid: string; processes: { pid: number; init: boolean }[] }[]>(['ps'])
      .find((a) => a.aid === name)!
      .processes.filter((p) => !p.init)
      .map((p) => p.pid);
    expect(pids).toHaveLength(1);
    process.kill(pids[0], 'SIGKILL');
    await waitFor(() => events(serve, name).some((e) => e.event === 'crash'), 10_000, 'the crash to be seen').catch((e: Error) => {
      throw new Error(`${e.message}\n${serve.stderr}`);
    });
    expect(alive(pids[0])).toBe(false);
    // Its queue serve's again (the crashed one listened with 7), before a
    // client queues for the restore: a burst waits rather than losing SYNs.
    await waitFor(() => backlogOf(PUBLIC) >= 4096, 10_000, "the public listener's queue to be serve's again").catch((e: Error) => {
      throw new Error(`${e.message} (it is ${backlogOf(PUBLIC)})`);
    });
    // Connected now, queued until the restore from the image (its count
    // as the image had it); checked by the restored server.
    expect(await ask(PUBLIC, 'hello')).toBe('OK 2\n');
    expect(await ask(PUBLIC, 'hello')).toBe('OK 3\n');
    const leftNow = () => events(serve, name).filter((e) => e.event.startsWith('listener-options') || e.event === 'not-kept');
    // The restore's line follows its clients' first answers.
    await waitFor(() => events(serve, name).some((e) => e.event === 'restore' && e.was === 'crashed'), 10_000, 'the restore to be logged');
    if (clamp) await waitFor(() => leftNow().some((e) => e.event === 'not-kept'), 10_000, 'what the restore left to be logged').catch((e: Error) => {
      throw new Error(`${e.message}\n${serve.stderr}`);
    });
    const left = leftNow();
    if (!clamp) {
      // Nothing it could not give back, before the restore or in it.
      expect(left).toEqual([]);
      return;
    }
    // Named when the crash gave the listener a fresh socket's options, and
    // again by the restore that gave it the image's.
    expect(left.map((e) => e.event)).toEqual(['listener-options-stale', 'not-kept']);
    for (const e of left) expect(JSON.stringify(e)).toContain('TCP_WINDOW_CLAMP');
  });
});
