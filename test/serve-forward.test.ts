/**
 * The front door's native forwarding path (addon/src/forward.c through
 * src/serve/forwarder.ts) on real loopback sockets: bulk both ways with a
 * reader slower than the writer (the EAGAIN / EPOLLOUT path), a half-close
 * passed on, a refusal that leaves the client's socket usable for a second
 * try (what the front door does while an instance starts), a reset, and
 * a listener the thread accepts on: forwarded at once within Node's grant,
 * handed to Node beyond it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { type ForwardEnds, Forwarder, type ListenerEnds } from '../src/serve/forwarder.js';

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
