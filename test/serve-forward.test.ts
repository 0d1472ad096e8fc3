/**
 * The front door's native forwarding path (addon/src/forward.c through
 * src/serve/forwarder.ts) on real loopback sockets: bulk both ways with a
 * reader slower than the writer (the EAGAIN / EPOLLOUT path), a half-close
 * passed on, a refusal that leaves the client's socket usable for a second
 * try (what the front door does while an instance starts), a reset, and
 * a listener the thread accepts on: forwarded at once within Node's grant,
 * handed to Node beyond it; at most maxHeld handed over at once (the rest
 * left in the listen backlog), a grant revoked by the thread itself when
 * the instance's process ends, and accept resumed after EMFILE.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync, readSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { type ForwardEnds, Forwarder, type ListenerEnds } from '../src/serve/forwarder.js';
import { waitFor } from './helpers.js';

const forwarder = new Forwarder();
const servers: Server[] = [];
afterAll(() => servers.forEach((s) => s.close()));

async function listen(onSocket: (s: Socket) => void, opts = {}): Promise<number> {
  const server = createServer({ allowHalfOpen: true, ...opts }, onSocket);
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return (server.address() as AddressInfo).port;
}

/** What one forwarded connection reported, in order. */
function recorder() {
  const events: string[] = [];
  let bytes = { toInstance: -1, toClient: -1 };
  let closed!: () => void;
  const done = new Promise<void>((r) => (closed = r));
  const ends: ForwardEnds = {
    connected: () => events.push('connected'),
    refused: (code) => {
      events.push(`refused ${code}`);
      closed();
    },
    closed: (b) => {
      events.push('closed');
      bytes = b;
      closed();
    },
  };
  return { events, ends, done, bytes: () => bytes };
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A front door: each accepted socket forwarded by `route`. */
const door = (route: (s: Socket) => void) => listen(route, { pauseOnConnect: true });

describe('native forwarding', () => {
  it('is the path in use', () => {
    expect(forwarder.path).toBe('native');
  });

  it('moves megabytes both ways past a slow reader and passes a half-close on', async () => {
    const up = randomBytes(8 << 20);
    const down = randomBytes(32 << 20);
    let backendGot!: (b: Buffer) => void;
    const received = new Promise<Buffer>((r) => (backendGot = r));
    let backpressure!: () => void;
    const full = new Promise<void>((r) => (backpressure = r));
    const backend = await listen((s) => {
      const chunks: Buffer[] = [];
      s.on('data', (d) => chunks.push(d));
      // The reply only after the client's end: the half-close went through.
      s.on('end', () => {
        backendGot(Buffer.concat(chunks));
        for (let off = 0; off < down.length; off += 1 << 20) if (!s.write(down.subarray(off, off + (1 << 20)))) backpressure();
        s.end();
      });
    });
    const rec = recorder();
    const front = await door((s) => forwarder.forward(s, backend, rec.ends));
    const client = connect({ port: front, host: '127.0.0.1', allowHalfOpen: true });
    client.pause();
    const got: Buffer[] = [];
    const clientDone = new Promise<void>((r) => client.on('end', r));
    client.on('data', (d) => got.push(d));
    client.end(up);
    expect(sha(await received)).toBe(sha(up));
    // The client reads nothing until the backend has found the way full.
    await full;
    client.resume();
    await clientDone;
    expect(sha(Buffer.concat(got))).toBe(sha(down));
    await rec.done;
    expect(rec.events).toEqual(['connected', 'closed']);
    expect(rec.bytes()).toEqual({ toInstance: up.length, toClient: down.length });
    client.destroy();
  });

  it('leaves a refused client socket untouched, for a second try that delivers what it had sent', async () => {
    // A port nobody listens on: one taken, then closed.
    const gone = await listen(() => undefined);
    await new Promise<void>((r) => servers.pop()!.close(() => r()));
    const echo = await listen((s) => s.pipe(s));
    const first = recorder();
    const second = recorder();
    const front = await door((s) => {
      forwarder.forward(s, gone, first.ends);
      void first.done.then(() => forwarder.forward(s, echo, second.ends));
    });
    const client = connect({ port: front, host: '127.0.0.1' });
    const answer = new Promise<string>((r) => {
      let text = '';
      client.on('data', (d) => {
        text += d;
        if (text.length >= 11) r(text);
      });
    });
    client.write('hello door\n');
    expect(await answer).toBe('hello door\n');
    expect(first.events).toEqual(['refused ECONNREFUSED']);
    expect(second.events).toEqual(['connected']);
    client.end();
    await second.done;
    expect(second.events).toEqual(['connected', 'closed']);
    expect(second.bytes()).toEqual({ toInstance: 11, toClient: 11 });
  });

  it('closes the client when the instance resets, and says so once', async () => {
    const backend = await listen((s) => s.once('data', () => s.resetAndDestroy()));
    const rec = recorder();
    const front = await door((s) => forwarder.forward(s, backend, rec.ends));
    const client = connect({ port: front, host: '127.0.0.1' });
    client.on('error', () => undefined);
    const ended = new Promise<void>((r) => client.on('close', () => r()));
    client.write('x');
    await ended;
    await rec.done;
    expect(rec.events).toEqual(['connected', 'closed']);
  });

  it('accepts on a listener it took over: at once within the grant, handed to Node beyond it', async () => {
    const echo = await listen((s) => s.pipe(s));
    const forwarded: { port: number; client: string; rec: ReturnType<typeof recorder> }[] = [];
    const handed: Socket[] = [];
    let arrived!: () => void;
    let next = new Promise<void>((r) => (arrived = r));
    const ends: ListenerEnds = {
      forwarded: (port, client) => {
        const rec = recorder();
        forwarded.push({ port, client, rec });
        arrived();
        return rec.ends;
      },
      accepted: (socket) => {
        handed.push(socket);
        arrived();
      },
      died: () => undefined,
    };
    const server = createServer({ pauseOnConnect: true, allowHalfOpen: true }, () => {
      throw new Error('Node accepted a connection the thread should have');
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as AddressInfo).port;
    const lid = forwarder.takeOver(server, ends)!;
    expect(lid).toBeGreaterThan(0);
    // One connection granted.
    expect(forwarder.route(lid, echo, 1)).toBe(0);
    const talk = async (s: Socket, text: string) => {
      const answer = new Promise<string>((r) => s.once('data', (d) => r(String(d))));
      s.write(text);
      return answer;
    };
    const a = connect({ port, host: '127.0.0.1' });
    await next;
    next = new Promise<void>((r) => (arrived = r));
    expect(await talk(a, 'first')).toBe('first');
    expect(forwarded).toHaveLength(1);
    expect(forwarded[0].port).toBe(echo);
    expect(forwarded[0].client).toBe(`127.0.0.1:${a.localPort}`);
    // The grant is used up while a is open: the next one is Node's.
    const b = connect({ port, host: '127.0.0.1' });
    await next;
    expect(handed).toHaveLength(1);
    expect(handed[0].remotePort).toBe(b.localPort);
    const rec = recorder();
    forwarder.forward(handed[0], echo, rec.ends);
    expect(await talk(b, 'second')).toBe('second');
    // Revoked: nothing forwarded under it is unheard of.
    expect(forwarder.route(lid, 0, 0)).toBe(0);
    a.end();
    b.end();
    await Promise.all([forwarded[0].rec.done, rec.done]);
    expect(forwarded[0].rec.events).toEqual(['connected', 'closed']);
    expect(forwarded[0].rec.bytes()).toEqual({ toInstance: 5, toClient: 5 });
    forwarder.release(lid);
    // Released: nobody listens on the port any more.
    const refused = await new Promise<string>((r) => connect({ port, host: '127.0.0.1' }).on('error', (e: NodeJS.ErrnoException) => r(e.code ?? '')));
    expect(refused).toBe('ECONNREFUSED');
  });
});

/** Connections waiting in the accept queue of the socket listening on
 * 127.0.0.1:port (/proc/net/tcp's rx_queue of a LISTEN socket). */
function acceptQueue(port: number, tableFd?: number): number {
  const hex = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  let table: string;
  if (tableFd === undefined) table = readFileSync('/proc/net/tcp', 'utf8');
  else {
    // Read again from the start through a descriptor opened before: for
    // when this process has none to spare.
    const buf = Buffer.alloc(1 << 20);
    let n = 0;
    for (let got; (got = readSync(tableFd, buf, n, buf.length - n, n)) > 0; ) n += got;
    table = buf.subarray(0, n).toString();
  }
  for (const line of table.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === hex && f[3] === '0A') return parseInt(f[4].split(':')[1], 16);
  }
  return -1;
}

/** A listening server handed to the thread at once; what it hands over
 * and what it reports. */
async function takenOver(maxHeld?: number, group = 0) {
  const server = createServer({ pauseOnConnect: true, allowHalfOpen: true }, () => {
    throw new Error('Node accepted a connection the thread should have');
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const handed: Socket[] = [];
  const forwarded: number[] = [];
  const died: { port: number; pid: number }[] = [];
  const ends: ListenerEnds = {
    accepted: (s) => handed.push(s),
    forwarded: (to) => {
      forwarded.push(to);
      return recorder().ends;
    },
    died: (to, pid) => died.push({ port: to, pid }),
  };
  const lid = forwarder.takeOver(server, ends, group, maxHeld)!;
  expect(lid).toBeGreaterThan(0);
  return { port, lid, handed, forwarded, died };
}

describe('the thread on a listener: bounds and deaths', () => {
  it('hands over at most maxHeld connections still open in Node; the rest wait in the backlog, taken as those close', async () => {
    const l = await takenOver(3, 71);
    const clients = Array.from({ length: 10 }, () => connect(l.port, '127.0.0.1'));
    await Promise.all(clients.map((c) => new Promise((r) => c.once('connect', r))));
    await waitFor(() => l.handed.length === 3 && acceptQueue(l.port) === 7, 10_000, '3 handed over, 7 in the backlog');
    // One let go of (closed here): one more comes.
    l.handed[0].destroy();
    await waitFor(() => l.handed.length === 4 && acceptQueue(l.port) === 6, 10_000, 'a fourth handed over');
    // All let go of as they come: every client is handed over in the end.
    const drained = waitFor(
      () => {
        for (const s of l.handed) s.destroy();
        return l.handed.length === 10;
      },
      10_000,
      'every client handed over',
    );
    await drained;
    expect(acceptQueue(l.port)).toBe(0);
    // Every client's connection was held, then closed by us: none reset.
    for (const c of clients) c.destroy();
    forwarder.release(l.lid);
  });

  it("revokes the grant itself when the instance's process ends, and refuses a grant naming it again", async () => {
    const echo = await listen((s) => s.pipe(s));
    const l = await takenOver();
    const instance = spawn('sleep', ['600']);
    await new Promise((r) => instance.once('spawn', r));
    expect(forwarder.route(l.lid, echo, 10, instance.pid)).toBe(0);
    const first = connect(l.port, '127.0.0.1');
    await waitFor(() => l.forwarded.length === 1, 10_000, 'the first connection forwarded under the grant');
    instance.kill('SIGKILL');
    await waitFor(() => l.died.length === 1, 10_000, 'the death to be reported');
    expect(l.died[0]).toEqual({ port: echo, pid: instance.pid });
    // Revoked: the next one is Node's.
    const second = connect(l.port, '127.0.0.1');
    await waitFor(() => l.handed.length === 1, 10_000, 'the second connection handed over');
    // A grant naming the dead process again (Node had not heard yet)
    // is no grant.
    await new Promise((r) => (instance.exitCode === null && instance.signalCode === null ? instance.once('exit', r) : r(undefined)));
    expect(forwarder.route(l.lid, echo, 10, instance.pid)).toBe(0);
    const third = connect(l.port, '127.0.0.1');
    await waitFor(() => l.handed.length === 2, 10_000, 'the third connection handed over');
    expect(l.forwarded).toHaveLength(1);
    // A live process: granted again.
    forwarder.route(l.lid, echo, 10, process.pid);
    const fourth = connect(l.port, '127.0.0.1');
    await waitFor(() => l.forwarded.length === 2, 10_000, 'the fourth connection forwarded');
    for (const s of [first, second, third, fourth, ...l.handed]) s.destroy();
    forwarder.route(l.lid, 0, 0);
    forwarder.release(l.lid);
  });

  it('pauses accepting on EMFILE instead of spinning, and takes every connection once descriptors are back', async () => {
    const l = await takenOver();
    const CLIENTS = 30;
    // The clients in a process of their own (its descriptors are not ours).
    const clients = spawn(
      process.execPath,
      [
        '-e',
        `const net = require('net'); let n = 0; const all = [];
         for (let i = 0; i < ${CLIENTS}; i++) { const s = net.connect(${l.port}, '127.0.0.1', () => { if (++n === ${CLIENTS}) console.log('connected'); }); s.on('error', (e) => console.log('error ' + e.code)); s.on('close', () => console.log('closed')); all.push(s); }
         process.stdin.on('end', () => all.forEach((s) => s.destroy())); process.stdin.resume();`,
      ],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    let said = '';
    clients.stdout!.on('data', (d) => (said += d));
    const limits = () => readFileSync('/proc/self/limits', 'utf8');
    const hard = /^Max open files\s+\d+\s+(\d+)/m.exec(limits())![1];
    // Room for 5 more descriptors in this process (the lowest free
    // numbers are taken first; those in use above the limit stay).
    // What raises the limit again is started now: starting a process
    // takes descriptors, which there will not be.
    const raiser = spawn('sh', ['-c', `read go; exec prlimit --pid ${process.pid} --nofile=${hard}:${hard}`], { stdio: ['pipe', 'inherit', 'inherit'] });
    const raised = new Promise<number | null>((r) => raiser.once('exit', (code) => r(code)));
    await new Promise((r) => raiser.once('spawn', r));
    const tcpTable = openSync('/proc/net/tcp', 'r');
    const used = readdirSync('/proc/self/fd').length;
    const lowered = spawnSync('prlimit', ['--pid', String(process.pid), `--nofile=${used + 5}:${hard}`]);
    expect(lowered.status, String(lowered.stderr)).toBe(0);
    try {
      await waitFor(() => said.includes('connected'), 10_000, 'the clients to connect');
      // Some taken, then accept said EMFILE: the rest wait in the backlog.
      await waitFor(() => l.handed.length > 0 && l.handed.length + acceptQueue(l.port, tcpTable) === CLIENTS, 10_000, 'the descriptors to run out');
      expect(l.handed.length).toBeLessThan(CLIENTS);
    } finally {
      raiser.stdin!.end('go\n');
      expect(await raised).toBe(0);
      closeSync(tcpTable);
    }
    // Room again: the paused listener comes back by itself.
    await waitFor(() => l.handed.length === CLIENTS, 10_000, 'every client handed over');
    expect(said).not.toMatch(/error|closed/);
    clients.stdin!.end();
    await new Promise((r) => clients.once('close', r));
    for (const s of l.handed) s.destroy();
    forwarder.release(l.lid);
  });
});
