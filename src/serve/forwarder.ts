/**
 * How the front door moves a connection's bytes once it has chosen an
 * instance (the choice, the records and the retries stay in server.ts).
 *
 * The native path (addon/src/forward.c): a thread that moves bytes with
 * epoll, recv and send, and that also accepts on the listeners handed to
 * it (takeOver). While Node has granted a listener an instance and a
 * number of connections (route), the thread connects each new client to
 * it at once, before the client has even sent its request; otherwise it
 * hands the socket to Node, which holds it and later forwards it here
 * (forward: the descriptor is duplicated, the connect started at once).
 * This event loop hears only forwarded/accepted, connected, refused and
 * closed, one wake-up per batch; forwarded and closed, which only keep
 * counts, wait up to a millisecond for company (forward.c FWD_LAZY_MS),
 * so that this thread wakes once per connection and not between a
 * client's connect and its reply. The Node proxy it replaced woke this loop
 * for the accept, the connect and every chunk each way: bench/serve.js
 * (b) - (a) went from ~130-150 us to ~25-70 us at p50 (see the commits).
 * The Node proxy remains for a socket without a descriptor to hand over
 * and for when the thread is not ours (another worker thread of the
 * process has it).
 *
 * Handing the accepted socket itself to the instance (SCM_RIGHTS) would
 * save the copy too, but needs the instance's own accept() to return a
 * socket it did not accept: a channel into restored applications and an
 * accept the preload library fakes. Restore mode's one instance needs
 * neither: it is given the listening socket itself at its restore and
 * accepts on it (shared.ts); this path is clone mode's, and restore
 * mode's when that listener cannot be shared.
 */
import { closeSync } from 'node:fs';
import { connect, type Server, Socket } from 'node:net';
import { errnoName } from '../errors.js';
import { addon } from '../native.js';

/** What becomes of one forwarded connection. Exactly one of refused or
 * closed is called; connected comes before closed. */
export interface ForwardEnds {
  /** The instance accepted; at: process.hrtime.bigint()'s clock, in ns. */
  connected(at: bigint): void;
  /** The instance refused (or could not be reached): nothing was read from
   * or written to the client, whose socket is the caller's again. */
  refused(code: string): void;
  closed(bytes: { toInstance: number; toClient: number }): void;
}

/** What the thread does with the connections it accepts on a listener
 * it took over (takeOver). */
export interface ListenerEnds {
  /** Accepted and handed over, no grant: the caller holds it and decides,
   * as for a connection it accepted itself. Paused, never read. */
  accepted(socket: Socket): void;
  /** Accepted and already forwarded to `port` under the grant (route):
   * the caller accounts for it; connected comes right after. */
  forwarded(port: number, client: string, at: bigint): ForwardEnds;
  /** The process of the instance granted (route's pid) ended: the thread
   * has revoked the grant already, and hands every connection over until
   * the next route. */
  died(port: number, pid: number): void;
}

const FWD_CONNECTED = 1;
const FWD_REFUSED = 2;
const FWD_FORWARDED = 4;
const FWD_ACCEPTED = 5;
const FWD_DIED = 6;
/** Numbers per event in a batch (addon_forward.cc). */
const FIELDS = 12;


interface NativeForward {
  forwardInit(onEvents: (events: Float64Array) => void): void;
  forwardConnect(fd: number, port: number, id: number): number;
  forwardListen(fd: number, lid: number, group: number, maxHeld: number): number;
  forwardRoute(lid: number, port: number, capacity: number, seen: number, pid: number): number;
  forwardUnhold(lid: number, n: number): void;
  forwardUnlisten(lid: number): void;
  forwardShut(ids: Uint32Array, lids: Uint32Array, shut: boolean): number;
}

const fdOf = (handleOwner: Socket | Server) => (handleOwner as unknown as { _handle?: { fd?: number } })._handle?.fd;

/**
 * The forwarding thread is the process's one (addon_forward.cc), and so
 * is the callback its events come to: the first forwardInit's. A process
 * may have several Forwarders over its life (the resident engine hosts one
 * serve after another; tests make several), so what the events are
 * matched with (connections by id, listeners by id) is the process's too,
 * with ids never reused: a second Forwarder's events once went to the
 * first one's, whose listeners were gone, and every connection the thread
 * handed over was closed (found by serve.test.ts run hosted).
 */
const open = new Map<number, { socket?: Socket; ends: ForwardEnds; owner?: Forwarder }>();
const listeners = new Map<number, { ends: ListenerEnds; seen: number; owner: Forwarder }>();
/** Of a listener released: its forwarder, for connections the thread
 * forwarded under its grant just before and reports after (a serve
 * releases its listeners as it stops, and forgets them once its drain is
 * over; ids are never reused). */
const releasedOwners = new Map<number, Forwarder>();
let seq = 0;
let lastLid = 0;
let lastGroup = 0;
let shared: NativeForward | undefined;
let initTried = false;

function nativeForward(): NativeForward | undefined {
  if (initTried) return shared;
  initTried = true;
  const a = addon() as unknown as Partial<NativeForward>;
  if (typeof a.forwardInit !== 'function' || typeof a.forwardConnect !== 'function') return undefined;
  try {
    a.forwardInit(dispatch);
    shared = a as NativeForward;
  } catch {
    // The thread is the process's one, and another worker thread has
    // it (or it could not start): the Node proxy does the work.
  }
  return shared;
}

/** A group id for forwardListen never used before in this process: the
 * thread keeps a group (its held count, its bound) for its whole life. */
export function newListenerGroup(): number {
  return ++lastGroup;
}

function connectedNow(c: { socket?: Socket; ends: ForwardEnds }, at: bigint): void {
  c.ends.connected(at);
  // The thread holds its own descriptor of the client's socket; ours goes
  // (a close of one descriptor is no shutdown: the client sees nothing).
  c.socket?.destroy();
}

function dispatch(events: Float64Array): void {
  const native = shared!;
  for (let i = 0; i < events.length; i += FIELDS) {
    const id = events[i];
    const kind = events[i + 1];
    if (kind === FWD_DIED) {
      listeners.get(events[i + 6])?.ends.died(events[i + 10], events[i + 11]);
      continue;
    }
    if (kind === FWD_FORWARDED || kind === FWD_ACCEPTED) {
      const lid = events[i + 6];
      const l = listeners.get(lid);
      if (kind === FWD_ACCEPTED) {
        const fd = events[i + 7];
        let socket: Socket;
        try {
          socket = new Socket({ fd, allowHalfOpen: true, pauseOnCreate: true } as ConstructorParameters<typeof Socket>[0]);
        } catch {
          closeSync(fd); // not a socket Node can take: the client sees a close
          native.forwardUnhold(lid, 1);
          continue;
        }
        // Held until its descriptor here is closed (forwarded, given
        // up or the client gone): then the thread may accept another.
        socket.once('close', () => native.forwardUnhold(lid, 1));
        if (l) l.ends.accepted(socket);
        else socket.destroy(); // released meanwhile: as a closed server would
        continue;
      }
      const ip = events[i + 8];
      const client = `${ip >>> 24}.${(ip >>> 16) & 255}.${(ip >>> 8) & 255}.${ip & 255}:${events[i + 9]}`;
      const at = BigInt(events[i + 5]);
      if (l) l.seen++;
      const ends = l?.ends.forwarded(events[i + 10], client, at) ?? uncounted;
      // Owned even if its listener was released meanwhile: a serve that
      // stops releases its listeners first, then ends what is still open.
      open.set(id, { ends, owner: l?.owner ?? releasedOwners.get(lid) });
      ends.connected(at);
      continue;
    }
    const c = open.get(id);
    if (!c) continue;
    if (kind === FWD_CONNECTED) {
      connectedNow(c, BigInt(events[i + 5]));
      continue;
    }
    open.delete(id);
    if (kind === FWD_REFUSED) c.ends.refused(errnoName(events[i + 2]));
    else c.ends.closed({ toInstance: events[i + 3], toClient: events[i + 4] });
  }
}

export class Forwarder {
  private readonly native: NativeForward | undefined = nativeForward();
  /** Which path moves the bytes (tests make sure it is the native one). */
  get path(): 'native' | 'node' {
    return this.native ? 'native' : 'node';
  }

  /** Forwards a paused, never-read client socket to 127.0.0.1:port;
   * `reportLater`: its connect reported in a microtask, not before this
   * returns. */
  forward(socket: Socket, port: number, ends: ForwardEnds, reportLater = false): void {
    const fd = fdOf(socket);
    if (!this.native || typeof fd !== 'number' || fd < 0) {
      const pair = forwardInNode(socket, port, {
        connected: (at) => ends.connected(at),
        refused: (code) => {
          this.inNode.delete(pair);
          ends.refused(code);
        },
        closed: (bytes) => {
          this.inNode.delete(pair);
          ends.closed(bytes);
        },
      });
      this.inNode.add(pair);
      return;
    }
    // (ids with the top bit set are the thread's own accepts)
    const id = (seq = (seq + 1) & 0x7fffffff);
    const rc = this.native.forwardConnect(fd, port, id);
    if (rc < 0) {
      // Told at once (no descriptor left, refused on the spot): told as the
      // thread would tell it, later, not inside the caller's loop.
      setImmediate(() => ends.refused(errnoName(-rc)));
      return;
    }
    open.set(id, { socket, ends, owner: this });
    // Over loopback the connect is usually done on return (forward.c).
    // reportLater: told in a microtask, the caller's synchronous work
    // first (a resume lets its processes go).
    if (rc === 1) {
      const at = process.hrtime.bigint();
      if (reportLater) queueMicrotask(() => connectedNow({ socket, ends }, at));
      else connectedNow({ socket, ends }, at);
    }
  }

  /**
   * The thread accepts on a listening server's socket from now on, and
   * Node's server stops (its descriptor closed; the thread's duplicate
   * keeps the socket listening, its backlog included). A connection then
   * reaches the instance without waiting for this event loop while a grant
   * (route) lasts. Listeners of one `group` hand over at most `maxHeld`
   * connections that are still open here (accepted(): from the thread's
   * accept to the close of that socket); beyond, the thread accepts
   * nothing and the kernel's listen backlog holds what comes. Returns
   * the listener's id, or undefined if the server stays as it was (no
   * native thread).
   */
  takeOver(server: Server, ends: ListenerEnds, group = 0, maxHeld = 0xffffffff): number | undefined {
    const fd = fdOf(server);
    if (!this.native || typeof fd !== 'number' || fd < 0) return undefined;
    const lid = ++lastLid;
    if (this.native.forwardListen(fd, lid, group >>> 0, Math.max(1, maxHeld) >>> 0) < 0) return undefined;
    listeners.set(lid, { ends, seen: 0, owner: this });
    server.close();
    return lid;
  }

  /** takeOver for a listening descriptor of ours rather than a Node
   * server's (serve's shared listener, when it cannot be shared after
   * all): the thread takes a duplicate, the caller closes its own. */
  takeOverFd(fd: number, ends: ListenerEnds, group = 0, maxHeld = 0xffffffff): number | undefined {
    if (!this.native) return undefined;
    const lid = ++lastLid;
    if (this.native.forwardListen(fd, lid, group >>> 0, Math.max(1, maxHeld) >>> 0) < 0) return undefined;
    listeners.set(lid, { ends, seen: 0, owner: this });
    return lid;
  }

  /** The grant of a listener: up to `capacity` connections open at once
   * to 127.0.0.1:port (port 0: none); `pid`, the instance's process, is
   * watched by the thread, which revokes the grant when it ends (died).
   * Returns how many it forwarded that this side has not heard of yet: 0
   * means the caller's counts are whole. */
  route(lid: number, port: number, capacity: number, pid = 0): number {
    const l = listeners.get(lid);
    if (!l || !this.native) return 0;
    return this.native.forwardRoute(lid, port, Math.max(0, capacity), l.seen >>> 0, pid > 0 ? pid : 0);
  }

  /** Connections of the Node proxy (forwardInNode) still open: both
   * sockets of each. */
  private readonly inNode = new Set<Socket[]>();

  /** How many connections this forwarder moves bytes for now (forwarded
   * by forward() or under a grant of its listeners, not yet closed). */
  openConnections(): number {
    let n = this.inNode.size;
    for (const c of open.values()) if (c.owner === this) n++;
    return n;
  }

  /** Listeners this forwarder released: the thread may have forwarded
   * connections under their grants that Node has not heard of yet. */
  private readonly released: number[] = [];

  /** How many of this forwarder's connections the thread still has open
   * (its own count: one forwarded under a released listener counts before
   * its report reaches Node), plus the Node proxy's; with `shut`, the
   * thread's are ended as well (each once; their closes are reported as
   * any other). */
  private stillOpen(shut: boolean): number {
    let n = this.inNode.size;
    if (!this.native) return n;
    const ids: number[] = [];
    for (const [id, c] of open) if (c.owner === this) ids.push(id);
    n += this.native.forwardShut(Uint32Array.from(ids), Uint32Array.from(this.released), shut);
    return n;
  }

  /**
   * For a serve that stops, once its listeners are released: the
   * connections still open get up to `drainMs` to end by themselves (a
   * reply on its way finishes), then each is ended (both sockets shut
   * down: the client hears a close) and their closes awaited, up to
   * `closeMs`. What is open is the thread's to say, not Node's: a
   * connection it forwarded under a grant just before the release is
   * reported to Node a moment later (or FWD_LAZY_MS later), and would
   * otherwise be neither waited for nor ended. A client that neither
   * sends nor closes, or an instance that never answers, would otherwise
   * hold serve (and the event loop) for ever. Returns how many ended by
   * themselves, how many were ended, and how many were still open after
   * that.
   */
  async drain(drainMs: number, closeMs: number): Promise<{ drained: number; ended: number; left: number }> {
    const pause = () => new Promise((r) => setTimeout(r, 10));
    try {
      const at = this.stillOpen(false);
      const drainUntil = performance.now() + drainMs;
      while (!this.hurried && this.stillOpen(false) > 0 && performance.now() < drainUntil) await pause();
      const stuck = this.stillOpen(true);
      for (const pair of this.inNode) for (const s of pair) s.destroy();
      // Ended again at each look: one the thread linked only after the
      // first (accepted before the release, connected after) is ended too.
      // Then until Node has heard of every close (the reports come in
      // order: each connection's FORWARDED before its CLOSED), so that
      // what each close updates is done before the instances are stopped.
      const closeUntil = performance.now() + closeMs;
      let left = stuck;
      while (((left = this.stillOpen(true)) > 0 || this.openConnections() > 0) && performance.now() < closeUntil) await pause();
      return { drained: Math.max(0, at - stuck), ended: stuck, left };
    } finally {
      for (const lid of this.released) releasedOwners.delete(lid);
    }
  }

  /** Told to hurry (hurry): a drain ends what is open at once. */
  private hurried = false;

  /** A drain under way, or to come, ends the connections still open now
   * instead of giving them the rest of its time to end by themselves
   * (the resident engine's second signal while its serve stops). */
  hurry(): void {
    this.hurried = true;
  }

  /** The thread stops accepting on the listener. */
  release(lid: number): void {
    if (!listeners.delete(lid)) return;
    releasedOwners.set(lid, this);
    this.released.push(lid);
    this.native?.forwardUnlisten(lid);
  }
}

/** For a connection whose listener was released before it was heard of. */
const uncounted: ForwardEnds = { connected: () => undefined, refused: () => undefined, closed: () => undefined };

/** Two Node sockets piped both ways (pipe gives backpressure); returns
 * both, for drain to end. */
function forwardInNode(socket: Socket, port: number, ends: ForwardEnds): Socket[] {
  const up = connect({ port, host: '127.0.0.1', allowHalfOpen: true, noDelay: true });
  let connected = false;
  let closed = 0;
  const done = () => {
    if (++closed === 2) ends.closed({ toInstance: up.bytesWritten, toClient: up.bytesRead });
  };
  up.once('connect', () => {
    connected = true;
    ends.connected(process.hrtime.bigint());
    socket.setNoDelay(true);
    socket.pipe(up);
    up.pipe(socket);
    socket.on('close', done);
    up.on('close', done);
    socket.on('error', () => up.destroy());
    up.on('error', () => socket.destroy());
    socket.resume();
  });
  up.once('error', (e: NodeJS.ErrnoException) => {
    if (!connected) ends.refused(e.code ?? e.message);
  });
  // Destroyed before it connected (drain): told as a refusal, which is
  // what it is to the caller (nothing was moved).
  up.once('close', () => {
    if (!connected && !up.errored) ends.refused('ECONNABORTED');
  });
  return [socket, up];
}
