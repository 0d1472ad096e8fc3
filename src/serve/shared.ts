/**
 * The public listener of a restore-mode service, shared with its instance
 * (the specification's port translation, done by the kernel): serve's own
 * listening socket is installed in the restored application in place of
 * the application's listener on APP_PORT (same descriptor number and
 * flags there, the same open file as serve's), and the instance accepts
 * its clients itself. No proxy, no copy: a connection costs what it costs
 * reaching the server directly (bench/serve.js (b) against (a)).
 *
 * serve never accepts on it. While no instance holds it (suspended,
 * crashed, being restored), serve watches it for readability (watch): a
 * connection waits in the kernel's accept queue meanwhile, not reset and
 * not lost, and the restored instance accepts it. A suspend records the
 * socket by key (Socket.inherited: the snapshot does not dump it) and the
 * next restore is handed serve's descriptor for that key, so a connection
 * that comes while the snapshot runs stays queued across it.
 *
 * What serve no longer sees it asks the kernel: the connections the
 * instance accepted (sock_diag, connections(): the established sockets on
 * the public port that have a file, i.e. were accepted; serve accepts
 * none, so each is the instance's; /proc/PID/net/tcp would walk and format
 * every socket of the namespace, 5-6 ms each here, where sock_diag answers
 * for established sockets only, unformatted), and those still waiting
 * (the accept queue, TCP_INFO of the listener: one call).
 *
 * Not shared (problem() says why, and serve falls back to forwarding):
 * clone mode, several public ports, an image whose listener on APP_PORT is
 * missing, only of the other address family, or not alone (another
 * listening port, two sockets of the family on it). A dual-stack server's
 * other-family listener on APP_PORT stays its own.
 */
import { closeSync, fstatSync } from 'node:fs';
import { addon } from '../native.js';
import { FdKind, type Image, type Socket, virtualPort } from '../image/types.js';
import type { InheritedListener } from '../resources/context.js';
import { applyListenerOptions, bindOptions, resetListenerOptions } from '../resources/sockets.js';

const AF_INET6 = 10;
const AF_INET = 2;
/** The public listener's backlog at the least, whatever the application's
 * (redis 511, python's http.server 5): while no instance accepts, every
 * client of a burst waits in its queue for the restore, and a SYN past the
 * backlog is dropped (the client retries after a second). */
export const SERVE_BACKLOG = 4096;

export class SharedListener {
  /** The key images name it by: one per service's application port. */
  readonly key: string;
  readonly family: number;
  readonly address: string;
  private readonly ino: bigint;
  private watchId: number | undefined;
  private watching = false;
  /** Accepted connections already recorded (by inode). */
  private readonly seen = new Set<number>();
  /** The application's own listener that this one replaces, as an image
   * of it said (problem()): recorded in each suspend image with the key,
   * so that a serve forwarding after all can give it back its own. */
  private original: { address: string; backlog: number; reuseaddr: boolean; v6only: boolean; bindOptions: NonNullable<Socket['options']> } | undefined;
  /** The image's record of that listener (problem()): its options and
   * backlog, which takeOwnOptions gives this socket. */
  private own: Socket | undefined;
  /** The record takeOwnOptions last gave this socket the options of,
   * until an instance is handed it (restoreOptions), which may change
   * them: a restore of that very record need not read and give them back
   * again (RestoreOptions.inheritGiven). */
  private given: Socket | undefined;
  /** The lowest virtual PID holding that listener in the image problem()
   * last accepted: after a restore of it, the process whose end is the
   * instance's crash (serve's restoreInstance). Known from the image, so
   * that it does not depend on which processes are still alive when serve
   * gets to look (a kill in between would make a helper holding a copy
   * look like the listener). */
  holderVpid: number | undefined;

  /** The key images name the listener of application port `appPort` by. */
  static keyOf(appPort: number): string {
    return `serve:${appPort}`;
  }

  constructor(
    /** serve's descriptor of the listening socket. */
    readonly fd: number,
    readonly publicPort: number,
    readonly appPort: number,
    onWaiting: () => void,
  ) {
    this.key = SharedListener.keyOf(appPort);
    const info = addon().sockInfo(fd);
    this.family = info.family;
    this.address = addon().tcpEndpoint(fd).address;
    this.ino = fstatSync(fd, { bigint: true }).ino;
    this.watchId = addon().watchReadable(fd, () => {
      this.watching = false;
      onWaiting();
    });
    this.watching = true;
  }

  /** Watched again for a waiting connection (no instance holds it, or one
   * being restored will take what waits: told once more, harmlessly). */
  watch(): void {
    if (this.watching || this.watchId === undefined) return;
    this.watching = true;
    addon().watchAgain(this.watchId);
  }

  /** Connections waiting in its accept queue. */
  queued(): number {
    try {
      return addon().listenQueue(this.fd);
    } catch {
      return 0;
    }
  }

  /** The connections accepted on it (by the instance: serve accepts none),
   * and which of them were not seen by an earlier call. */
  connections(): { count: number; fresh: { remote: string; port: number }[] } {
    const now = addon()
      .tcpEstablished(this.family, this.publicPort, this.address)
      .filter((c) => c.ino !== 0);
    const fresh = now.filter((c) => !this.seen.has(c.ino));
    this.seen.clear();
    for (const c of now) this.seen.add(c.ino);
    return { count: now.length, fresh: fresh.map((c) => ({ remote: c.remote, port: c.port })) };
  }

  /** What the restore is handed (RestoreOptions.inherit, inheritAt, and
   * inheritGiven if takeOwnOptions gave it this very image's options). */
  restoreOptions(): { inherit: ReadonlyMap<string, number>; inheritAt: { port: number; family: number; key: string }; inheritGiven?: ReadonlySet<string> } {
    // Of the image problem() has just accepted (the restore's own).
    const given = this.given !== undefined && this.given === this.own;
    this.given = undefined;
    return { inherit: new Map([[this.key, this.fd]]), inheritAt: { port: this.appPort, family: this.family, key: this.key }, ...(given ? { inheritGiven: new Set([this.key]) } : {}) };
  }

  /** Whether an image has told what the application's own listener was
   * (problem() has seen one): snapshotOptions needs it. */
  get knowsOriginal(): boolean {
    return this.original !== undefined;
  }

  /** What the snapshot records by key (SnapshotOptions.inherited): the
   * application's own listener it stands for. Never made up: a plain
   * restore makes that listener again from the record, and a guessed
   * wildcard would open an application that listened on 127.0.0.1 on
   * every interface. Unknown (knowsOriginal false): throws, and the
   * caller does not suspend. */
  snapshotOptions(): ReadonlyMap<bigint, InheritedListener> {
    const own = this.original;
    if (!own) throw new Error(`what the application's own listener on port ${this.appPort} was is not known (no image of it has been read)`);
    return new Map([[this.ino, { key: this.key, family: this.family, port: this.appPort, ...own }]]);
  }

  /** Why the image's application cannot be given this listener, or
   * undefined if it can. */
  problem(image: Image): string | undefined {
    this.holderVpid = undefined;
    const listeners = new Map<bigint, { family: number; port: number; inherited?: string; own: NonNullable<SharedListener['original']>; socket: Socket }>();
    for (const p of image.processes)
      for (const f of p.fds) {
        const s = f.socket;
        if (f.kind === FdKind.TCP_LISTEN && s)
          listeners.set(s.ino, { family: s.family, port: virtualPort(image, s.port), inherited: s.inherited, own: { address: s.address, backlog: s.backlog, reuseaddr: s.reuseaddr, v6only: s.v6only, bindOptions: bindOptions(s) }, socket: s });
      }
    const all = [...listeners.values()];
    const foreign = all.find((l) => l.inherited && l.inherited !== this.key);
    if (foreign) return `the image names a listener inherited from '${foreign.inherited}', not '${this.key}'`;
    const elsewhere = all.filter((l) => !l.inherited && l.port !== this.appPort);
    if (elsewhere.length) return `the application listens on several TCP ports (${[this.appPort, ...new Set(elsewhere.map((l) => l.port))].join(', ')})`;
    const mine = all.find((l) => l.inherited === this.key);
    if (mine) {
      this.original = mine.own;
      this.own = mine.socket;
      this.holderVpid = lowestHolder(image, (s) => s.ino === mine.socket.ino);
      return undefined;
    }
    // Of a dual-stack server's two listeners on the port (redis's default:
    // 0.0.0.0 and ::), the one of the public listener's family is replaced;
    // the other stays the application's own.
    const same = all.filter((l) => l.port === this.appPort && l.family === this.family);
    if (!all.length) return `the image has no TCP socket listening on port ${this.appPort}`;
    if (!same.length) return `the application's listener on port ${this.appPort} is ${familyName(all[0].family)}, the public one ${familyName(this.family)}`;
    if (same.length > 1) return `the application listens on port ${this.appPort} with ${same.length} ${familyName(this.family)} sockets`;
    this.original = same[0].own;
    this.own = same[0].socket;
    this.holderVpid = lowestHolder(image, (s) => s.ino === same[0].socket.ino);
    return undefined;
  }

  /**
   * Gives this socket the options and backlog of the application's
   * listener that the last image problem() accepted recorded (none if it
   * accepted none). Only while no instance holds it (the instance's own
   * changes to it stay), and before a restore installs it: connections
   * that wait in its queue meanwhile are made with the application's
   * options (the kernel copies a listener's into each when its handshake
   * completes, not when it is accepted), not serve's. The restore sets
   * them again (resources/sockets.ts): the same, nothing to do.
   *
   * Options it has that this image's listener has not (an earlier
   * image's, or set by an instance after its image was taken, which then
   * crashed) go back to a fresh socket's first (applyListenerOptions).
   * Returns those that cannot, one line each.
   */
  takeOwnOptions(): string[] {
    this.given = undefined;
    if (!this.own) return [];
    const stale = applyListenerOptions(this.fd, this.own, `the public listener on port ${this.publicPort}, given the options of the application's on port ${this.appPort}`, SERVE_BACKLOG);
    this.given = this.own;
    return stale;
  }

  /**
   * Every option back to a fresh socket's, none of an image's: after the
   * instance that held it crashed, while its image is not read yet, so
   * that a connection queued meanwhile gets none of what the crashed
   * instance set (takeOwnOptions once it is read; the restore sets them
   * again in any case). Returns those that cannot, one line each.
   */
  takeFreshOptions(): string[] {
    this.given = undefined;
    const stale = resetListenerOptions(this.fd, `the public listener on port ${this.publicPort}, given a fresh socket's options until the next image is read`);
    // And serve's queue: the crashed instance's listen() may have made it
    // as short as its own, and a burst waiting for the restore would lose
    // SYNs (retried a second or three later).
    this.serveBacklog();
    return stale;
  }

  /** Its queue serve's length again (SERVE_BACKLOG, or the application's
   * if longer): after a suspend, or when the forwarding front door takes
   * it, an application's own listen() on it may have shortened it. */
  serveBacklog(): void {
    addon().listenNow(this.fd, Math.max(this.original?.backlog ?? 0, SERVE_BACKLOG), true);
  }

  /** Stops watching; `closeFd`: its descriptor closed too (the forwarder
   * took a duplicate of its own, or serve stops). */
  close(closeFd: boolean): void {
    if (this.watchId !== undefined) addon().unwatch(this.watchId);
    this.watchId = undefined;
    this.watching = false;
    if (closeFd) closeSync(this.fd);
  }
}

const familyName = (f: number) => (f === AF_INET ? 'IPv4' : f === AF_INET6 ? 'IPv6' : `family ${f}`);

/** The lowest virtual PID of the image's processes holding a socket
 * `which` picks. */
function lowestHolder(image: Image, which: (s: Socket, kind: number) => boolean): number | undefined {
  let lowest: number | undefined;
  for (const p of image.processes)
    if ((lowest === undefined || p.vpid < lowest) && p.fds.some((f) => f.socket && which(f.socket, f.kind))) lowest = p.vpid;
  return lowest;
}

/** Of an image restored with its own listener on `appPort` (forwarded to,
 * not shared), the lowest virtual PID holding it: that listener as the
 * application made it, or the shared one an earlier suspend recorded by
 * key, which the restore gives back as its own (serve's restoreInstance). */
export function ownListenerHolder(image: Image, appPort: number): number | undefined {
  const key = SharedListener.keyOf(appPort);
  return lowestHolder(image, (s, kind) => kind === FdKind.TCP_LISTEN && (s.inherited ? s.inherited === key : virtualPort(image, s.port) === appPort));
}
