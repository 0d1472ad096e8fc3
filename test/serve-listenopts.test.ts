/**
 * `appshot serve` sharing its public listener with a restore-mode instance
 * (src/serve/shared.ts) keeps the application's own listener as it was:
 *
 * - The options the application set on its listener (TCP_NODELAY,
 *   SO_KEEPALIVE and its timers, a fixed receive buffer: copied by the
 *   kernel into every socket accepted; TCP_DEFER_ACCEPT: the listener's
 *   own) and its backlog are the shared listener's while the instance
 *   holds it, after the first restore (from the application's own image)
 *   and after a restore from a suspend image (which names serve's listener
 *   by key). test/fixtures/listenopts checks each socket it accepts itself.
 * - A plain `appshot restore` of a suspend image (outside serve, nothing
 *   handed) makes the application's listener again, on its own port, with
 *   those options and backlog.
 * - A serve that cannot take over the listener a previous serve left in a
 *   running instance (started without CAP_SYS_PTRACE, so that the kernel
 *   refuses it the instance's descriptors) says so in one line and exits,
 *   rather than failing to bind the port the instance holds; a serve that
 *   can adopts the instance as before.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, command, fixture, type Running, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-listenopts-'));
// Ports of their own, 26505-26599 (see Sandbox for the other files').
const base = 26505 + (process.pid % 23) * 4;
const APP = base;
const PUBLIC = base + 1;
const PUBLIC2 = base + 2;
/** listenopts's backlog (serve's own is 4096). */
const BACKLOG = 7;

let serve: Running | undefined;

afterAll(async () => {
  if (serve && serve.child.exitCode === null) serve.child.kill('SIGTERM');
  await serve?.exited;
  for (const aid of ['opts', 'adopted', 'outside']) sb.run(['rm', '--force', aid]);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** Says a line to 127.0.0.1:`port`; all it was told before it closed. */
const ask = (port: number) =>
  new Promise<string>((resolve, reject) => {
    const c = connect(port, '127.0.0.1');
    let got = '';
    c.setTimeout(30_000, () => c.destroy(new Error('no answer in 30 s')));
    c.on('connect', () => c.write('hello\n'));
    c.on('data', (d) => (got += d));
    c.on('error', reject);
    c.on('close', () => resolve(got));
  });

/** The backlog of the socket listening on 127.0.0.1:`port` (ss's Send-Q
 * of a listener: sock_diag's idiag_wqueue), or -1 if none listens. */
function backlogAt(port: number): number {
  const r = spawnSync('ss', ['-Hltn', `src 127.0.0.1:${port}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ss: ${r.stderr}`);
  const f = r.stdout.trim().split(/\s+/);
  return f.length >= 3 && f[0] === 'LISTEN' ? Number(f[2]) : -1;
}

interface ServiceJson {
  state: string;
  snapshots: number;
  restores: number;
  lastImage: string;
  instances: { state: string }[];
}
const show = (name: string) => sb.json<ServiceJson>(['service', 'show', name]);

/** The JSON log lines of `name` so far. */
const events = (s: Running, name: string) =>
  s.stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { event: string; service?: string; shared?: boolean; adopted?: boolean })
    .filter((e) => e.service === name);

describe("appshot serve: the shared listener is the application's own", () => {
  beforeAll(async () => {
    const r = sb.run(['run', '-d', '--aid', 'optsapp', '--', fixture('listenopts'), String(APP)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('optsapp').includes('LISTENING'), 10_000, 'listenopts to listen');
    // Reached directly, its own listener: the baseline the checks hold to.
    expect(await ask(APP)).toBe('OK 1\n');
    expect(backlogAt(APP)).toBe(BACKLOG);
    const s = sb.run(['snapshot', 'optsapp', '-o', join(out, 'opts.img')]);
    expect(s.code, s.stderr).toBe(0);
    await waitFor(() => backlogAt(APP) === -1, 10_000, 'the snapshotted server to end');
    for (const [name, port, idle] of [['opts', PUBLIC, '1s'], ['adopted', PUBLIC2, '1h']] as const) {
      const add = sb.run(['service', 'add', name, '--from', join(out, 'opts.img'), '--port', `127.0.0.1:${port}:${APP}`, '--idle', idle]);
      expect(add.code, add.stderr).toBe(0);
    }
    // No instance restored ahead of time (prepared): the first client's
    // connection is made (its handshake completed) in serve's listener
    // before the restore, and must have the application's options too.
    serve = sb.start(['serve'], { APPSHOT_PREPARED: '0' });
    await serve.line(/^ready$/);
    expect(events(serve, 'opts').find((e) => e.event === 'listen')).toMatchObject({ shared: true });
  });

  it('accepted sockets have the options of the application\'s listener, and the listener its backlog, after a restore from its image and from a suspend image', async () => {
    // The first restore: from the application's own image.
    expect(await ask(PUBLIC)).toBe('OK 2\n');
    expect(backlogAt(PUBLIC)).toBe(BACKLOG);
    expect(backlogAt(APP), 'the instance listens on the public port only').toBe(-1);
    // Idle 1 s: suspended, its image naming serve's listener by key.
    await waitFor(() => show('opts').state === 'suspended' && show('opts').snapshots >= 1, 30_000, 'the suspend');
    const image = show('opts').lastImage;
    expect(sb.run(['inspect', image]).stdout).toMatch(new RegExp(`TCP_LISTEN\\s+listening 127\\.0\\.0\\.1:${APP}, inherited from 'serve:${APP}'`));
    // The next restore: from that image.
    expect(await ask(PUBLIC)).toBe('OK 3\n');
    expect(backlogAt(PUBLIC)).toBe(BACKLOG);
    expect(show('opts').restores).toBe(2);
  });

  it('a plain restore of a suspend image makes the application its own listener again, with its options and backlog', async () => {
    await waitFor(() => show('opts').state === 'suspended' && show('opts').snapshots >= 2, 30_000, 'the second suspend');
    const image = show('opts').lastImage;
    const r = sb.run(['restore', image, '--aid', 'outside']);
    expect(r.code, r.stderr).toBe(0);
    try {
      expect(await ask(APP)).toBe('OK 4\n');
      expect(backlogAt(APP)).toBe(BACKLOG);
    } finally {
      sb.run(['rm', '--force', 'outside']);
    }
    await waitFor(() => backlogAt(APP) === -1, 10_000, 'the plain restore to end');
  });

  it('a serve that cannot take over a running instance\'s listener says so in one line; one that can adopts it', async () => {
    // An instance that outlives its serve, holding the public listener.
    expect(await ask(PUBLIC2)).toBe('OK 2\n');
    serve!.child.kill('SIGTERM');
    expect((await serve!.exited).code).toBe(0);
    const pids = sb.json<{ aid: string; processes: { pid: number }[] }[]>(['ps']).find((a) => a.aid === 'adopted')!.processes.map((p) => p.pid);
    expect(pids.filter(alive)).toEqual(pids);
    expect(backlogAt(PUBLIC2)).toBe(BACKLOG);

    // Without CAP_SYS_PTRACE (the instance has it): the kernel refuses
    // this serve the instance's descriptors.
    const refused = spawnSync('setpriv', ['--bounding-set', '-sys_ptrace', '--inh-caps', '-sys_ptrace', command, 'serve', '--foreground'], { env: sb.env, encoding: 'utf8', timeout: 60_000 });
    expect(refused.status, refused.stderr).toBe(4);
    const said = refused.stderr.split('\n').filter((l) => l && !l.startsWith('{'));
    expect(said).toHaveLength(1);
    expect(said[0]).toMatch(new RegExp(`service adopted: its running instance adopted holds the public port ${PUBLIC2} .*, and this serve cannot take it over \\(.+\\); run serve with the privileges`));
    expect(refused.stderr).not.toMatch(/EADDRINUSE/);
    // Nothing of it touched: the instance answers on.
    expect(pids.filter(alive)).toEqual(pids);
    expect(await ask(PUBLIC2)).toBe('OK 3\n');

    serve = sb.start(['serve'], { APPSHOT_PREPARED: '0' });
    await serve.line(/^ready$/);
    expect(events(serve, 'adopted').find((e) => e.event === 'listen')).toMatchObject({ shared: true, adopted: true });
    expect(await ask(PUBLIC2)).toBe('OK 4\n');
    expect(await ask(PUBLIC)).toMatch(/^OK \d+\n$/);
  });
});
