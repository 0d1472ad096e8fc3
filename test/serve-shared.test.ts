/**
 * When serve's public listener can be given to a restore-mode instance
 * (src/serve/shared.ts problem()), on a real listening socket of this
 * process, against images of the listeners an application may have.
 * (The end-to-end tests with redis: serve.test.ts.)
 */
import { connect, createServer, type Server } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { FdKind, type Image } from '../src/image/types.js';
import { SharedListener } from '../src/serve/shared.js';

const APP = 6379;
let server: Server;
let fd = -1;
let shared: SharedListener;

beforeAll(async () => {
  server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  fd = addon().dupFd((server as unknown as { _handle: { fd: number } })._handle.fd);
  server.close();
  const port = (addon().tcpEndpoint(fd) as { port: number }).port;
  shared = new SharedListener(fd, port, APP, () => undefined);
});

afterAll(() => shared?.close(true));

let ino = 100n;
/** A listening TCP socket as an image records it. */
const listener = (family: number, port: number, inherited?: string) => ({
  fd: 3 + Number(ino % 50n),
  kind: FdKind.TCP_LISTEN,
  socket: { ino: ino++, family, type: 1, address: family === 2 ? '0.0.0.0' : '::', port, listening: true, backlog: 511, peerIno: 0n, queued: Buffer.alloc(0), reuseaddr: true, reuseport: false, v6only: family === 10, ...(inherited ? { inherited } : {}) },
});
const imageOf = (...fds: ReturnType<typeof listener>[]) => ({ tables: [], processes: [{ vpid: 2, fds }] }) as unknown as Image;

describe('sharing the public listener (IPv4, 127.0.0.1)', () => {
  it('is keyed by the application port, and knows its own socket', () => {
    expect(shared.key).toBe(`serve:${APP}`);
    expect(shared.family).toBe(2);
    expect(shared.queued()).toBe(0);
  });

  it("never makes up the application's own listener: unknown until an image it accepts tells it (a suspend would record a guess a plain restore binds)", () => {
    const fresh = new SharedListener(addon().dupFd(fd), shared.publicPort, APP, () => undefined);
    try {
      expect(fresh.knowsOriginal).toBe(false);
      expect(() => fresh.snapshotOptions()).toThrow(`what the application's own listener on port ${APP} was is not known`);
      // An image it cannot share with tells it nothing.
      expect(fresh.problem(imageOf(listener(2, APP, 'serve:9999')))).toBeDefined();
      expect(() => fresh.snapshotOptions()).toThrow(/is not known/);
      const own = listener(2, APP);
      Object.assign(own.socket, { address: '127.0.0.1', backlog: 5 });
      expect(fresh.problem(imageOf(own))).toBeUndefined();
      expect([...fresh.snapshotOptions().values()][0]).toMatchObject({ key: `serve:${APP}`, family: 2, port: APP, address: '127.0.0.1', backlog: 5 });
    } finally {
      fresh.close(true);
    }
  });

  it('shares with the one IPv4 listener on the port, and with a dual-stack pair (the IPv6 one stays its own)', () => {
    expect(shared.problem(imageOf(listener(2, APP)))).toBeUndefined();
    expect(shared.problem(imageOf(listener(2, APP), listener(10, APP)))).toBeUndefined();
  });

  it('shares with an image taken while shared (its listener named by key)', () => {
    expect(shared.problem(imageOf(listener(2, APP, `serve:${APP}`), listener(10, APP)))).toBeUndefined();
  });

  it('says why not: no listener on the port, only IPv6 there, two IPv4 ones, another port, a foreign key', () => {
    expect(shared.problem(imageOf())).toBe(`the image has no TCP socket listening on port ${APP}`);
    expect(shared.problem(imageOf(listener(10, APP)))).toBe(`the application's listener on port ${APP} is IPv6, the public one IPv4`);
    expect(shared.problem(imageOf(listener(2, APP), listener(2, APP)))).toBe(`the application listens on port ${APP} with 2 IPv4 sockets`);
    expect(shared.problem(imageOf(listener(2, APP), listener(2, 8080)))).toBe(`the application listens on several TCP ports (${APP}, 8080)`);
    expect(shared.problem(imageOf(listener(2, APP, 'serve:9999')))).toBe("the image names a listener inherited from 'serve:9999', not 'serve:6379'");
  });

  it('counts a connection waiting in the accept queue, and one accepted, from the kernel', async () => {
    const port = addon().tcpEndpoint(fd).port;
    const c = connect(port, '127.0.0.1');
    await new Promise((resolve, reject) => c.once('connect', resolve).once('error', reject));
    expect(shared.queued()).toBe(1);
    // Not accepted: no socket file yet, not a connection of the instance.
    expect(shared.connections().count).toBe(0);
    // Accepted on a duplicate, as the instance accepts on its own.
    const acceptor = createServer();
    const accepted = new Promise<void>((resolve) => acceptor.once('connection', () => resolve()));
    acceptor.listen({ fd: addon().dupFd(fd) });
    await accepted;
    expect(shared.queued()).toBe(0);
    const seen = shared.connections();
    expect(seen).toEqual({ count: 1, fresh: [{ remote: '127.0.0.1', port: c.localPort }] });
    // Seen once: not fresh the next time.
    expect(shared.connections()).toEqual({ count: 1, fresh: [] });
    c.destroy();
    acceptor.close();
  });

  it('does not count a connection on the same port to another local address (another listener there)', async () => {
    const port = addon().tcpEndpoint(fd).port;
    // 127.0.0.2 is loopback too: a listener of its own on the same port,
    // as another server bound to another address of the host may be.
    const other = createServer();
    await new Promise<void>((resolve, reject) => other.once('error', reject).listen(port, '127.0.0.2', () => resolve()));
    const accepted = new Promise<void>((resolve) => other.once('connection', () => resolve()));
    const c = connect(port, '127.0.0.2');
    await new Promise((resolve, reject) => c.once('connect', resolve).once('error', reject));
    await accepted;
    // Accepted (a socket file): counted if only the port were matched.
    expect(addon().tcpEstablished(2, port).filter((x) => x.ino !== 0).length).toBeGreaterThan(0);
    expect(shared.connections()).toEqual({ count: 0, fresh: [] });
    c.destroy();
    other.close();
  });
});
