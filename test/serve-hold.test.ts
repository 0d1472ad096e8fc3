/**
 * The front door's robustness (issue 15): what it holds, and an instance
 * that dies under it.
 *
 * - A bound on held connections: while Node's event loop is blocked (its
 *   main thread stopped with ptrace, as a long synchronous step would
 *   block it) and the instance is suspended, many more clients than
 *   `--max-held` connect at once. The forwarding thread accepts only that
 *   many (the serve process's descriptors say so); the others wait in the
 *   kernel's listen backlog. Once the loop runs again, every client gets
 *   its answer.
 * - An instance's process killed with SIGKILL under a load of repeated
 *   connects, while a helper process of the application still holds a
 *   copy of its listening socket (so the port still takes connections that
 *   nobody will ever accept): the thread notices the death itself (pidfd)
 *   and revokes its grant at once; every connection made after the death
 *   is held and answered by the restored instance.
 * - A preloaded image's page file: held open by the serve process from the
 *   preload on (the restore reads that file, not what the path names by
 *   then), and refused if the path was replaced meanwhile (the image is
 *   then read and checked afresh, and the held file let go of).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, fixture, type Running, Sandbox, seizedByAnotherTracer, snapshotListener, tcpExchange, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-hold-'));
// Ports of their own, 19000-19999 (see Sandbox for the other files').
const base = 19000 + (process.pid % 125) * 8;
const APP = base;
const PUBLIC = base + 1;
const APP2 = base + 2;
const PUBLIC2 = base + 3;
const APP3 = base + 4;
const PUBLIC3 = base + 5;
const APP4 = base + 6;
const PUBLIC4 = base + 7;
const MAX_HELD = 4;
const CLIENTS = 40;
/** Descriptors the serve process may open besides held connections while
 * its event loop is stopped (none expected: a margin, not a budget). */
const SLACK = 2;

let serve: Running | undefined;
let serve2: Running | undefined;
let serve3: Running | undefined;
let serve4: Running | undefined;
let otherTracer: ChildProcess | undefined;
let stopper: ChildProcess | undefined;

afterAll(async () => {
  stopper?.kill('SIGKILL');
  otherTracer?.kill('SIGKILL');
  for (const s of [serve, serve2, serve3, serve4]) if (s && s.child.exitCode === null) s.child.kill('SIGTERM');
  await Promise.all([serve?.exited, serve2?.exited, serve3?.exited, serve4?.exited]);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const fdCount = (pid: number) => readdirSync(`/proc/${pid}/fd`).length;

/** Connections waiting in the accept queue of the socket listening on
 * 127.0.0.1:port (/proc/net/tcp's rx_queue of a LISTEN socket). */
function acceptQueue(port: number): number {
  const hex = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === hex && f[3] === '0A') return parseInt(f[4].split(':')[1], 16);
  }
  return -1;
}

/** Stops one thread of a process (test/fixtures/threadstop.c) until
 * `release`. */
async function stopThread(tid: number): Promise<{ release: () => Promise<void> }> {
  const child = spawn(fixture('threadstop'), [String(tid)], { stdio: ['pipe', 'pipe', 'inherit'] });
  stopper = child;
  let text = '';
  child.stdout!.on('data', (d) => (text += d));
  const ended = new Promise<void>((r) => child.on('close', () => r()));
  await waitFor(() => text.includes('STOPPED') || child.exitCode !== null, 10_000, 'the thread to stop');
  expect(text).toContain('STOPPED');
  return {
    release: async () => {
      child.stdin!.end();
      await ended;
      expect(text).toContain('RELEASED');
      stopper = undefined;
    },
  };
}

/** A client that says "ping" once connected and resolves with all it was
 * told, or rejects if the connection fails or ends without an answer. */
function pinger(port: number): { connected: Promise<void>; answer: Promise<string>; socket: Socket } {
  const socket = connect(port, '127.0.0.1');
  const connected = new Promise<void>((r) => socket.once('connect', () => r()));
  const answer = new Promise<string>((resolve, reject) => {
    let data = '';
    socket.setTimeout(60_000, () => socket.destroy(new Error('no answer in 60 s')));
    socket.on('connect', () => socket.write('ping\n'));
    socket.on('data', (d) => (data += d));
    socket.on('error', reject);
    socket.on('close', () => (/^pong \d+\n$/.test(data) ? resolve(data) : reject(new Error(`closed with '${data}'`))));
  });
  return { connected, answer, socket };
}

interface ServiceJson {
  state: string;
  restores: number;
  crashes: number;
  maxHeld: number;
}
const show = () => sb.json<ServiceJson>(['service', 'show', 'hold']);

/** System PIDs of the application's processes by virtual PID. */
function vpids(aid: string): Map<number, number> {
  const apps = sb.json<{ aid: string; processes: { vpid: number; pid: number }[] }[]>(['ps']);
  return new Map((apps.find((a) => a.aid === aid)?.processes ?? []).map((p) => [p.vpid, p.pid]));
}

describe('appshot serve: bounded holding, an instance that dies', () => {
  beforeAll(async () => {
    const image = join(out, 'shared.img');
    await snapshotListener(sb, 'tpl', APP, image);
    const add = sb.run(['service', 'add', 'hold', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '0', '--max-held', String(MAX_HELD)]);
    expect(add.code, add.stderr).toBe(0);
    expect(show()).toMatchObject({ state: 'suspended', maxHeld: MAX_HELD });
    serve = sb.start(['serve']);
    await serve.line(/^ready$/);
  });

  it(`holds at most --max-held (${MAX_HELD}) of ${CLIENTS} clients while its event loop is stopped, the rest in the backlog; all answered after`, async () => {
    expect(show().state).toBe('suspended');
    const pid = serve!.child.pid!;
    // Node's event loop stops; the forwarding thread runs on.
    const stopped = await stopThread(pid);
    let answers: Promise<PromiseSettledResult<string>[]>;
    try {
      const before = fdCount(pid);
      const clients = Array.from({ length: CLIENTS }, () => pinger(PUBLIC));
      answers = Promise.allSettled(clients.map((c) => c.answer));
      // Every client's handshake is done (the backlog completes it too).
      await Promise.all(clients.map((c) => c.connected));
      // Every client is either taken by the thread (a descriptor of the
      // serve process) or waiting in the backlog; the most it ever took:
      let most = 0;
      await waitFor(
        () => {
          const held = fdCount(pid) - before;
          most = Math.max(most, held);
          return held + acceptQueue(PUBLIC) >= CLIENTS;
        },
        10_000,
        'every client to be held or in the backlog',
      );
      most = Math.max(most, fdCount(pid) - before);
      expect(most, `${most} descriptors taken for ${CLIENTS} clients`).toBeLessThanOrEqual(MAX_HELD + SLACK);
      expect(acceptQueue(PUBLIC)).toBeGreaterThanOrEqual(CLIENTS - MAX_HELD - SLACK);
    } finally {
      await stopped.release();
    }

    // The event loop runs again: the instance is restored, the held are
    // forwarded, and as they close the thread accepts the rest.
    const settled = await answers;
    const failed = settled.filter((x) => x.status === 'rejected').map((x) => String((x as PromiseRejectedResult).reason));
    expect(failed, failed.slice(0, 3).join('\n')).toEqual([]);
    expect(acceptQueue(PUBLIC)).toBe(0);
    await waitFor(() => show().restores === 1, 5000, 'the restore to be counted');
  });

  it('revokes the grant the moment the instance dies (kill -9, its socket still held by a helper): every later connection held and answered after the restore', async () => {
    // Running (restored by the first test, or by this connection).
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    const was = show();
    const procs = vpids('hold');
    const server = procs.get(2)!;
    const helper = procs.get(3)!;
    expect(server).toBeGreaterThan(0);
    expect(helper).toBeGreaterThan(0);
    // The grant is in place (connections go straight to the instance).
    expect(await tcpExchange(PUBLIC, 'ping\n')).toMatch(/^pong \d+\n$/);

    // A load of repeated connects, each recording when it started.
    let phase: 'before' | 'dying' | 'dead' = 'before';
    let running = true;
    const results: { phase: string; ok: boolean; what: string }[] = [];
    const loop = async () => {
      while (running) {
        const at = phase;
        try {
          const a = await tcpExchange(PUBLIC, 'ping\n', 30_000);
          results.push({ phase: at, ok: /^pong \d+\n$/.test(a), what: a });
        } catch (e) {
          results.push({ phase: at, ok: false, what: String(e) });
        }
      }
    };
    const loops = Array.from({ length: 4 }, loop);
    try {
      await waitFor(() => results.filter((x) => x.ok).length >= 20, 15_000, 'answers before the kill');
      phase = 'dying';
      process.kill(server, 'SIGKILL');
      await waitFor(() => !alive(server), 5000, 'the server to die');
      phase = 'dead';
      const answeredAfter = () => results.filter((x) => x.phase === 'dead' && x.ok).length;
      await waitFor(() => answeredAfter() >= 40, 30_000, 'answers from the restored instance');
    } finally {
      running = false;
      await Promise.all(loops);
    }

    const dead = results.filter((x) => x.phase === 'dead');
    const bad = dead.filter((x) => !x.ok).map((x) => x.what);
    expect(bad, bad.slice(0, 3).join('\n')).toEqual([]);
    // The instance was restored (its helper went with the old one).
    // (service show reads the state serve writes within 100 ms of a change.)
    await waitFor(() => show().restores > was.restores, 5000, 'the restore to be counted');
    const s = show();
    expect(s.crashes).toBe(was.crashes + 1);
    expect(s.restores).toBe(was.restores + 1);
    expect(alive(helper)).toBe(false);
    await waitFor(() => /"event":"crash"/.test(serve!.stderr), 5000, 'the crash to be logged');
    const crash = serve!.stderr.split('\n').find((l) => l.includes('"event":"crash"'))!;
    expect(JSON.parse(crash).why).toBe(`process ${server} ended`);
    // (Connections in flight at the kill may be lost with the process.)
    const dying = results.filter((x) => x.phase !== 'dead' && !x.ok).length;
    console.log(`connections lost in flight at the kill: ${dying} of ${results.length - dead.length}`);

    serve!.child.kill('SIGTERM');
    expect((await serve!.exited).code).toBe(0);
  });
});

/** What a process's descriptors are open on. */
const openFiles = (pid: number) =>
  readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
    try {
      return [readlinkSync(`/proc/${pid}/fd/${fd}`)];
    } catch {
      return [];
    }
  });

describe('appshot serve: a preloaded image', () => {
  it('holds its page file open from the preload on, and reads the image afresh if the path was replaced meanwhile', async () => {
    const image = join(out, 'pre.img');
    await snapshotListener(sb, 'tpl2', APP2, image);
    const config = join(out, 'pre.json');
    // None prepared ("prepared": 0): each restore here is one that a
    // connection waits for (a prepared one given up for a replaced file:
    // serve-prepared.test.ts).
    writeFileSync(config, JSON.stringify({ prepared: 0, services: [{ name: 'pre', from: image, ports: [`127.0.0.1:${PUBLIC2}:${APP2}`], idle: '1s' }] }));
    // The restore's phases on stderr (whether it used the preload).
    (sb.env as Record<string, string>).APPSHOT_DEBUG = '1';
    serve2 = sb.start(['serve', '--config', config]);
    delete (sb.env as Record<string, string>).APPSHOT_DEBUG;
    await serve2.line(/^ready$/);
    const pid = serve2.child.pid!;
    const preloads = () => (serve2!.stderr.match(/read and checked ahead of time/g) ?? []).length;
    const freshReads = () => (serve2!.stderr.match(/image read and checked \(\d+ in its chain\)/g) ?? []).length;

    // Suspended: its image preloaded, the page file held; the restore
    // reads it.
    const first = join(realpathSync(image), 'pages.img');
    await waitFor(() => openFiles(pid).includes(first), 10_000, 'the preloaded page file to be held open');
    expect(await tcpExchange(PUBLIC2, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    expect([preloads(), freshReads()]).toEqual([1, 0]);

    // Idle: suspended to an image of its own, preloaded in turn.
    await waitFor(() => sb.json<{ state: string; snapshots: number }>(['service', 'show', 'pre']).snapshots === 1, 15_000, 'the suspend');
    const next = join(realpathSync(sb.json<{ lastImage: string }>(['service', 'show', 'pre']).lastImage), 'pages.img');
    await waitFor(() => openFiles(pid).includes(next), 10_000, 'the next page file to be held open');

    // The path now names another file (the same bytes, a new inode): the
    // held one is not what was checked there any more.
    copyFileSync(next, `${next}.new`);
    renameSync(`${next}.new`, next);
    expect(openFiles(pid)).toContain(`${next} (deleted)`);
    expect(await tcpExchange(PUBLIC2, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    expect([preloads(), freshReads()]).toEqual([1, 1]);
    expect(openFiles(pid)).not.toContain(`${next} (deleted)`);
    serve2.child.kill('SIGTERM');
    expect((await serve2.exited).code).toBe(0);
  });
});

describe('appshot serve: a suspend that fails', () => {
  it('leaves the instance running and answering from the same process, logs why, and suspends once what was in the way is gone', async () => {
    const image = join(out, 'fail.img');
    await snapshotListener(sb, 'tpl3', APP3, image);
    const config = join(out, 'fail.json');
    writeFileSync(config, JSON.stringify({ prepared: 0, services: [{ name: 'fail', from: image, ports: [`127.0.0.1:${PUBLIC3}:${APP3}`], idle: '1s' }] }));
    serve3 = sb.start(['serve', '--config', config]);
    await serve3.line(/^ready$/);
    const shown = () => sb.json<{ state: string; snapshots: number }>(['service', 'show', 'fail']);
    const pong = async () => Number(/^pong (\d+)\n$/.exec(await tcpExchange(PUBLIC3, 'ping\n', 30_000))?.[1]);
    const first = await pong();
    expect(first).toBeGreaterThan(0);
    const server = vpids('fail').get(2)!;
    expect(server).toBeGreaterThan(0);

    // A connection left open (the server, one client at a time, waits in
    // its read): no idle time runs while it is there. Meanwhile another
    // tracer seizes the server, which runs on (a seize does not stop it)
    // but which no snapshot can stop while it is traced.
    const open = connect(PUBLIC3, '127.0.0.1');
    await new Promise<void>((r, j) => open.once('connect', () => r()).once('error', j));
    otherTracer = await seizedByAnotherTracer(server);
    open.end('ping\n');
    await new Promise<void>((r) => open.once('close', () => r()).resume());

    const failures = () => serve3!.stderr.split('\n').filter((l) => l.includes('"event":"suspend-failed"'));
    await waitFor(() => failures().length > 0, 30_000, 'a suspend to fail');
    const failed = JSON.parse(failures()[0]) as { instance: string; error: string; now: string };
    expect(failed).toMatchObject({ instance: 'fail', now: 'running' });
    expect(failed.error).toMatch(new RegExp(`being traced by process ${otherTracer.pid}.*left running`));
    // Still the same process, still answering, its count going on.
    expect(alive(server)).toBe(true);
    expect(vpids('fail').get(2)).toBe(server);
    expect(shown()).toMatchObject({ snapshots: 0 });
    expect(['running', 'suspending']).toContain(shown().state);
    const during = await pong();
    expect(during).toBeGreaterThan(first + 1);

    // The tracer gone, the next idle suspend goes through: the process
    // ends into an image, and the next connection resumes it with its
    // count.
    otherTracer.kill('SIGKILL');
    otherTracer = undefined;
    await waitFor(() => shown().snapshots === 1 && shown().state === 'suspended', 30_000, 'the suspend once the tracer is gone');
    expect(alive(server)).toBe(false);
    expect(await pong()).toBe(during + 1);
    serve3.child.kill('SIGTERM');
    expect((await serve3.exited).code).toBe(0);
  });
});

describe('appshot serve: an instance busy computing without connections', () => {
  it('is not suspended while it uses --busy-cpu of a core, and is once it stops computing', async () => {
    // Answers "pong N"; "spin" starts a thread that computes until the
    // file `stop` exists, and the connection ends.
    const stop = join(out, 'busy-stop');
    const script = [
      'import os, socket, sys, threading',
      'def spin():',
      '    n = 0',
      '    while not os.path.exists(sys.argv[1]): n += 1',
      's = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)',
      `s.bind(("127.0.0.1", ${APP4})); s.listen(16); print("LISTENING", flush=True)`,
      'answered = 0',
      'while True:',
      '    c, _ = s.accept(); line = c.makefile().readline()',
      '    if line == "spin\\n": threading.Thread(target=spin, daemon=True).start(); c.sendall(b"spinning\\n")',
      '    else: answered += 1; c.sendall(b"pong %d\\n" % answered)',
      '    c.close()',
    ].join('\n');
    const r = sb.run(['run', '-d', '--aid', 'spintpl', '--', '/usr/bin/python3', '-c', script, stop]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('spintpl').includes('LISTENING'), 10_000, 'the server to listen');
    const image = join(out, 'spin.img');
    expect(sb.run(['snapshot', 'spintpl', '-o', image]).code).toBe(0);
    // 5% of a core: reached by a loop that computes on any machine, however loaded.
    const add = sb.run(['service', 'add', 'spin', '--from', image, '--port', `127.0.0.1:${PUBLIC4}:${APP4}`, '--idle', '1s', '--busy-cpu', '5%']);
    expect(add.code, add.stderr).toBe(0);
    const shown = () => sb.json<{ state: string; snapshots: number; busyCpu: number; instances: { cpu?: number }[] }>(['service', 'show', 'spin']);
    expect(shown().busyCpu).toBe(0.05);
    expect(sb.run(['service', 'show', 'spin']).stdout).toMatch(/busy at 5% cpu/);
    serve4 = sb.start(['serve', '--prepared', '0']);
    await serve4.line(/^ready$/);
    const events = () => serve4!.logged<{ event: string; instance?: string }>();
    expect(await tcpExchange(PUBLIC4, 'ping\n', 30_000)).toBe('pong 1\n');
    expect(await tcpExchange(PUBLIC4, 'spin\n', 30_000)).toBe('spinning\n');
    const server = vpids('spin').get(2)!;
    await waitFor(() => events().some((e) => e.event === 'busy' && e.instance === 'spin'), 30_000, 'the instance to be found busy');
    // Three times its idle time without a connection: still running, the
    // same process, never suspended (before --busy-cpu it was suspended
    // a second after the connection ended, computing or not).
    await new Promise((r) => setTimeout(r, 3000));
    expect(events().filter((e) => e.event === 'suspend' || e.event === 'suspend-failed')).toEqual([]);
    expect(shown()).toMatchObject({ state: 'running', snapshots: 0 });
    expect(alive(server)).toBe(true);
    // It stops computing: suspended after its idle time, and resumed
    // with its count by the next connection.
    writeFileSync(stop, '');
    await waitFor(() => shown().snapshots === 1 && shown().state === 'suspended', 30_000, 'the suspend once it stopped computing');
    expect(alive(server)).toBe(false);
    expect(await tcpExchange(PUBLIC4, 'ping\n', 30_000)).toBe('pong 2\n');
    serve4.child.kill('SIGTERM');
    expect((await serve4.exited).code).toBe(0);
  });
});
