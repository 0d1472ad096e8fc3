/**
 * When serve's public listener can be given to a restore-mode instance
 * (src/serve/shared.ts problem()), on a real listening socket of this
 * process, against images of the listeners an application may have.
 * (The end-to-end tests with redis: serve.test.ts.)
 */
import { closeSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { FdKind, type Image } from '../src/image/types.js';
import { SharedListener } from '../src/serve/shared.js';
import { optionLabel, readExtras, resetExtras } from '../src/resources/sockopts.js';

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

describe("the application's listener options, one image after another", () => {
  const SOL_SOCKET = 1;
  const IPPROTO_TCP = 6;
  const opt = (level: number, name: number, value: number) => ({ level, name, value });
  const TCP_NODELAY = [IPPROTO_TCP, 1] as const;
  const TCP_MAXSEG = [IPPROTO_TCP, 2] as const;
  const TCP_KEEPIDLE = [IPPROTO_TCP, 4] as const;
  const TCP_DEFER_ACCEPT = [IPPROTO_TCP, 9] as const;
  const SO_KEEPALIVE = [SOL_SOCKET, 9] as const;
  const SO_RCVBUF = [SOL_SOCKET, 8] as const;
  const SO_BUF_LOCK = [SOL_SOCKET, 72] as const;
  let pub: SharedListener;
  let acceptor: Server;
  /** Each connection accepted on the public listener, by the client's port. */
  const accepted = new Map<number, number>();

  beforeAll(async () => {
    const s = createServer();
    await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
    const own = addon().dupFd((s as unknown as { _handle: { fd: number } })._handle.fd);
    s.close();
    pub = new SharedListener(own, addon().tcpEndpoint(own).port, APP, () => undefined);
    // Accepts as the instance would, on a duplicate: the accepted
    // socket's options are the listener's when its handshake completed.
    acceptor = createServer((c) => {
      accepted.set(c.remotePort!, (c as unknown as { _handle: { fd: number } })._handle.fd);
      c.on('error', () => undefined);
    });
    acceptor.listen({ fd: addon().dupFd(own) });
  });

  afterAll(() => {
    acceptor?.close();
    pub?.close(true);
  });

  /** The options `names` of a connection made to the public listener now. */
  async function connection(names: (readonly [number, number])[]): Promise<number[]> {
    const c = connect(pub.publicPort, '127.0.0.1');
    await new Promise((resolve, reject) => c.once('connect', resolve).once('error', reject));
    // Data: past a TCP_DEFER_ACCEPT listener's wait.
    c.write('x');
    const until = Date.now() + 10_000;
    while (!accepted.has(c.localPort!) && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
    const fd = accepted.get(c.localPort!);
    if (fd === undefined) throw new Error('the connection was not accepted in 10 s');
    try {
      return names.map(([l, n]) => addon().getSockOpt(fd, l, n));
    } finally {
      c.destroy();
    }
  }

  /** An image whose application's listener on APP had `options`. */
  const imageWith = (options: ReturnType<typeof opt>[]) => {
    const l = listener(2, APP);
    Object.assign(l.socket, { address: '127.0.0.1', options });
    return imageOf(l);
  };

  it("gives back a fresh socket's value for each option the next image's listener has not (buffer size unlocked again), keeps and changes the others", async () => {
    const fresh = addon().sockOpen(2, 1);
    const freshly = (names: (readonly [number, number])[]) => names.map(([l, n]) => addon().getSockOpt(fresh, l, n));
    try {
      // Image 1: an application that set them all on its listener (as an
      // image records them: SO_RCVBUF as the kernel shows it, doubled,
      // with its lock bit).
      expect(pub.problem(imageWith([opt(...TCP_NODELAY, 1), opt(...TCP_MAXSEG, 1000), opt(...SO_KEEPALIVE, 1), opt(...TCP_KEEPIDLE, 77), opt(...TCP_DEFER_ACCEPT, 5), opt(...SO_RCVBUF, 100000), opt(...SO_BUF_LOCK, 2)]))).toBeUndefined();
      expect(pub.takeOwnOptions()).toEqual([]);
      const listenerOf = (names: (readonly [number, number])[]) => names.map(([l, n]) => addon().getSockOpt(pub.fd, l, n));
      expect(listenerOf([TCP_NODELAY, TCP_MAXSEG, TCP_DEFER_ACCEPT, SO_RCVBUF, SO_BUF_LOCK])).toEqual([1, 1000, expect.any(Number), 100000, 2]);
      expect(listenerOf([TCP_DEFER_ACCEPT])[0]).toBeGreaterThan(0);
      expect(await connection([TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, SO_BUF_LOCK])).toEqual([1, 1, 77, 2]);
      expect((await connection([TCP_MAXSEG]))[0]).toBeLessThanOrEqual(1000);

      // Image 2: keepalive only, another idle time; nothing else set.
      expect(pub.problem(imageWith([opt(...SO_KEEPALIVE, 1), opt(...TCP_KEEPIDLE, 30)]))).toBeUndefined();
      expect(pub.takeOwnOptions()).toEqual([]);
      const reset = [TCP_NODELAY, TCP_MAXSEG, TCP_DEFER_ACCEPT, SO_RCVBUF, SO_BUF_LOCK] as (readonly [number, number])[];
      expect(listenerOf(reset)).toEqual(freshly(reset));
      expect(listenerOf([SO_BUF_LOCK])).toEqual([0]);
      // What a connection queued now is made with: image 2's, the rest a
      // fresh socket's, its receive buffer not locked (autotuned).
      expect(await connection([TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, SO_BUF_LOCK])).toEqual([0, 1, 30, 0]);
      // No MSS clamp (image 1's 1000, or a fresh socket's 536 read back
      // and set, would be one): loopback's, far above both.
      expect((await connection([TCP_MAXSEG]))[0]).toBeGreaterThan(1000);

      // Handed to a restore of that very image: it need not read and give
      // them back again (RestoreOptions.inheritGiven); the instance may
      // change them, so the next restore must.
      expect(pub.restoreOptions().inheritGiven).toEqual(new Set([`serve:${APP}`]));
      expect(pub.restoreOptions().inheritGiven).toBeUndefined();

      // Image 3: nothing set at all.
      expect(pub.problem(imageWith([]))).toBeUndefined();
      expect(pub.takeOwnOptions()).toEqual([]);
      expect(await connection([TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, SO_BUF_LOCK])).toEqual(freshly([TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE, SO_BUF_LOCK]));
      // Another image than the one given (read again by the restore): not.
      expect(pub.problem(imageWith([]))).toBeUndefined();
      expect(pub.restoreOptions().inheritGiven).toBeUndefined();
    } finally {
      closeSync(fresh);
    }
  });
  it.each([
    ['IPv4', '127.0.0.1', 2],
    ['IPv6', '::1', 10],
  ] as const)("an %s listener given many options is a fresh socket's again for every one, but what the kernel cannot give back, which is said", async (_, host, family) => {
    const s = createServer();
    await new Promise<void>((resolve, reject) => s.once('error', reject).listen(0, host, () => resolve()));
    const sock = addon().dupFd((s as unknown as { _handle: { fd: number } })._handle.fd);
    s.close();
    const BASE: [number, number][] = [[1, 2], [1, 15], [41, 26]];
    const shown = () => readExtras(sock, 'listen', family, 1, BASE, 'the listener').map((o) => optionLabel(o.level, o.name));
    try {
      // SO_SNDBUF, SO_RCVBUF (locked), SO_KEEPALIVE, SO_PRIORITY, SO_RCVLOWAT;
      // IP_TOS, IP_TTL; TCP_NODELAY, TCP_MAXSEG, keepalive timers,
      // TCP_LINGER2, TCP_DEFER_ACCEPT, TCP_USER_TIMEOUT, TCP_FASTOPEN,
      // TCP_NOTSENT_LOWAT; IPv6: its hop limit and traffic class.
      const set = [[1, 7, 50000], [1, 8, 50000], [1, 9, 1], [1, 12, 3], [1, 18, 10], [0, 1, 16], [0, 2, 33], [6, 1, 1], [6, 2, 1000], [6, 4, 77], [6, 5, 11], [6, 6, 5], [6, 8, 30], [6, 9, 5], [6, 18, 5000], [6, 23, 5], [6, 25, 100]];
      if (family === 10) set.push([41, 16, 33], [41, 67, 8]);
      for (const [l, n, v] of set) addon().setSockOpt(sock, l, n, v);
      expect(shown().length).toBeGreaterThanOrEqual(set.length);
      // Those kept stay (with their lock bit); the others go.
      const keep = readExtras(sock, 'listen', family, 1, BASE, 'the listener').filter((o) => ['TCP_KEEPIDLE', 'SO_RCVBUF'].includes(optionLabel(o.level, o.name)));
      expect(resetExtras(sock, 'listen', family, 1, keep, BASE, 'the listener')).toEqual([]);
      expect(shown()).toEqual(['SO_RCVBUF', 'SO_BUF_LOCK', 'TCP_KEEPIDLE']);
      expect(addon().getSockOpt(sock, 1, 72)).toBe(2);
      expect(resetExtras(sock, 'listen', family, 1, [], BASE, 'the listener')).toEqual([]);
      expect(shown()).toEqual([]);
      // A listener's window clamp cannot go back to 0: said, not hidden.
      addon().setSockOpt(sock, 6, 10, 5000);
      expect(resetExtras(sock, 'listen', family, 1, [], BASE, 'the listener')).toEqual([expect.stringMatching(/^the listener: TCP_WINDOW_CLAMP cannot be given back a fresh socket's value: /)]);
    } finally {
      closeSync(sock);
    }
  });
});
