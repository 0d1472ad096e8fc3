/**
 * Connections that outlive their application between a snapshot that
 * ends it and the restore that brings it back on this host.
 *
 * Some of what an application holds lives in the kernel between it and a
 * process outside it: an established TCP connection (tcp.ts), a unix
 * stream connection with a client outside (sockets.ts: a local psql
 * connected to PostgreSQL). Closed when the application ends, such a
 * connection is gone for its peer: a TCP peer that sends gets a reset, a
 * unix peer reads the end. So the snapshot hands a descriptor of each to
 * an appshot-keeper process (addon/keeper/appshot_keeper.c), which holds
 * them, and the restore of the same image takes the very sockets back. A
 * TCP connection waits in repair mode, dropping every packet (the peer,
 * hearing nothing, sends again later); a unix one simply queues what the
 * peer writes, for the restored application to read.
 *
 * The keeper listens on $APPSHOT_HOME/keep/AID.sock (the same user or
 * root only). The snapshot ends the application only once the keeper says
 * it holds every connection. A restore takes the sockets and the keeper
 * keeps its copies until the restore commits: one that fails or is
 * killed leaves them held for the next. One keeper per application: a
 * restore of another image of it, or the next snapshot that ends it, has
 * it drop what it holds first. It drops everything after `snapshot
 * --tcp-hold` (DEFAULT_HOLD_SECONDS), or when the state directory goes;
 * dropped, a TCP connection in repair mode closes without a word to its
 * peer, and a unix one closes.
 */
import { closeSync, fstatSync, lstatSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { FdKind, type Image } from '../image/types.js';
import { addon, paths } from '../native.js';

/** How long a keeper holds connections by default: about as long as a TCP
 * peer retransmits before giving up (Linux's tcp_retries2 = 15 is some
 * 924 s), after which there is nothing left to keep. */
export const DEFAULT_HOLD_SECONDS = 900;

/** Where and for how long an ended application's connections are kept. */
export interface Keeping {
  home: string;
  aid: string;
  imageId: string;
  holdSeconds: number;
}

const keeperPath = (home: string, aid: string) => join(home, 'keep', `${aid}.sock`);

/** Whether the keeper's socket for `aid` fits a unix socket address (108
 * bytes, with room for the temporary name it is bound under first). */
export function keeperPathFits(home: string, aid: string): boolean {
  return Buffer.byteLength(keeperPath(home, aid)) + 16 < 108;
}

/** An image id no image has: asked with it, a keeper drops what it holds. */
const NO_IMAGE = '-';

/** How long dropKept waits for a keeper's answer. A keeper answers at
 * once unless it is stopped (SIGSTOP) or starved; the callers (`rm`,
 * `prune`, a snapshot replacing what an older one left) must not wait
 * for it the 10 s a restore does, least of all inside the engine. */
const DROP_WAIT_MS = 1000;

/** Whatever a keeper holds for `aid` is dropped. One that does not answer
 * in time has its socket file removed: it leaves, dropping them, when it
 * next looks (about once a second while it runs), and no one can ask it
 * for them meanwhile. */
export function dropKept(home: string, aid: string): void {
  const path = keeperPath(home, aid);
  let taken: ReturnType<ReturnType<typeof addon>['takeConnections']>;
  try {
    taken = addon().takeConnections(path, NO_IMAGE, DROP_WAIT_MS);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
    rmSync(path, { force: true });
    return;
  }
  for (const fd of taken?.fds ?? []) closeSync(fd);
  if (taken && taken.control >= 0) closeSync(taken.control);
}

/** The keepers' directory, the user's own and no one else's (a socket
 * there hands over live connections). */
function keepDir(home: string): string {
  const dir = join(home, 'keep');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== process.geteuid!() || (st.mode & 0o077) !== 0)
    throw new Error(`${dir} must be a directory of the user's own that no one else may use (mode 0700)`);
  return dir;
}

/** Whether a keeper may hold sockets of `image`: a live TCP connection,
 * a socket recorded as kept, or a TCP listener (held when connections
 * waited in its queue: SocketsForKeeper.addListener). */
export function mayHaveKept(image: Image): boolean {
  return image.processes.some((p) => p.fds.some((f) => (f.tcp && !f.tcp.closed) || f.socket?.kept || (f.kind === FdKind.TCP_LISTEN && !f.socket?.inherited)));
}

/** Snapshot side: the sockets handed to a keeper when the application ends. */
export class SocketsForKeeper {
  /** The snapshot ends the application and a keeper may hold its
   * connections (not --leave-running, not --tcp-hold 0, a socket path
   * that fits). */
  keeping = false;
  /** Our descriptors by socket inode; `owned`: ours to close (the repair
   * mode ones are HeldConnections', which also lets them go if the
   * snapshot fails); `needed`: the image does not hold the connection's
   * state, only the keeper can give it back; `waiting`: a listener's,
   * the connections in its queue (takeWaitingListeners). */
  private readonly fds = new Map<bigint, { fd: number; owned: boolean; needed: boolean; waiting?: number }>();

  add(ino: bigint, fd: number, owned: boolean, needed: boolean): void {
    if (this.fds.has(ino)) {
      if (owned) closeSync(fd);
    } else this.fds.set(ino, { fd, owned, needed });
  }

  /** The application's TCP listeners (our descriptors, ours to close), by
   * inode. A connection the kernel completed and the application had not
   * yet accepted waits in its listener's queue; the listener closed, the
   * client is reset. So a listener with any waiting is handed over too
   * (handOver looks, the application stopped, as late as it can), and
   * the restore of the image on this host takes the very socket back,
   * queue and all (sockets.ts openSocket); elsewhere, or once the keeper
   * gave up, a new listener is made, as for any. One with none waiting
   * is not held: its port stays free for whatever the user runs next. */
  private readonly listeners = new Map<bigint, number>();

  /** `open`: our descriptor of it, asked for once per listener however
   * many processes share it (nginx's workers). */
  addListener(ino: bigint, open: () => number): void {
    if (!this.listeners.has(ino) && !this.fds.has(ino)) this.listeners.set(ino, open());
  }

  /** How many connections are held, how many of them the image needs the
   * keeper for, and how many wait in the listeners held. */
  counts(): { held: number; needed: number; waiting: number } {
    if (!this.handedOver) return { held: 0, needed: 0, waiting: 0 };
    const all = [...this.fds.values()];
    return {
      held: all.filter((e) => e.waiting === undefined).length,
      needed: all.filter((e) => e.needed).length,
      waiting: all.reduce((sum, e) => sum + (e.waiting ?? 0), 0),
    };
  }

  /** The listeners with connections waiting join the sockets handed over;
   * the others are closed. */
  private takeWaitingListeners(): void {
    for (const [ino, fd] of this.listeners) {
      let waiting = 0;
      try {
        waiting = addon().listenQueue(fd);
      } catch {
        /* not a TCP listener any more: nothing to keep */
      }
      if (waiting > 0 && !this.fds.has(ino)) this.fds.set(ino, { fd, owned: true, needed: false, waiting });
      else closeSync(fd);
    }
    this.listeners.clear();
  }

  /**
   * Before the application is ended: a keeper holds every connection (it
   * says so), or this throws if the image needs it for some, and the
   * snapshot fails with the application left running. A keeper missing for
   * repair-mode connections only is told, not thrown: their state is in
   * the image, only the wait until the restore is less safe.
   */
  handOver(keep: Keeping): void {
    this.takeWaitingListeners();
    if (!this.fds.size) return;
    try {
      keepDir(keep.home);
      dropKept(keep.home, keep.aid);
      addon().keepConnections(paths.keeper, keeperPath(keep.home, keep.aid), keep.imageId, keep.holdSeconds, [...this.fds.values()].map((e) => e.fd));
    } catch (e) {
      const needed = [...this.fds.values()].filter((c) => c.needed).length;
      if (needed) throw new Error(`${needed} connection${needed > 1 ? 's' : ''} only appshot-keeper can carry (taken without TCP repair, or to a process outside) could not be handed to it: ${(e as Error).message}`);
      process.stderr.write(`appshot: the TCP connections of '${keep.aid}' could not be held until its restore (${(e as Error).message}): a peer that sends meanwhile, or waits to be accepted, is reset\n`);
      // Nothing is held: the snapshot's summary must not say otherwise.
      this.handedOver = false;
      return;
    }
    this.handedOver = true;
  }

  /** Whether a keeper said it holds them (handOver). */
  private handedOver = false;

  /** Ours are closed (the keeper's copies, if any, stay). */
  close(): void {
    for (const e of this.fds.values()) if (e.owned) closeSync(e.fd);
    this.fds.clear();
    for (const fd of this.listeners.values()) closeSync(fd);
    this.listeners.clear();
  }
}

/** Restore side: the sockets a keeper held for this image, by inode. */
export class KeptSockets {
  private readonly byIno = new Map<bigint, number>();
  /** The connection to the keeper, told "done" once the restore commits;
   * closed without, the keeper holds the sockets again for the next. */
  private control = -1;

  /** Takes the sockets held since the snapshot that ended the application,
   * if it was this image's; a keeper holding another image's drops them
   * (they would clash with this image's). */
  adopt(keep: Keeping): void {
    const taken = addon().takeConnections(keeperPath(keep.home, keep.aid), keep.imageId);
    if (!taken) return;
    this.control = taken.control;
    for (const fd of taken.fds) {
      try {
        const st = fstatSync(fd, { bigint: true });
        if (st.isSocket()) {
          this.byIno.set(st.ino, fd);
          continue;
        }
      } catch {
        /* not ours to use */
      }
      closeSync(fd);
    }
  }

  /** Our descriptor of the kept socket `ino` (still ours to close), if held. */
  get(ino: bigint): number | undefined {
    return this.byIno.get(ino);
  }

  /** The restore committed: the processes hold their sockets, and the
   * keeper lets its copies go. */
  finish(): void {
    if (this.control >= 0) addon().keeperDone(this.control);
    this.control = -1;
  }

  /** Our descriptors are closed (the processes hold theirs); the keeper
   * still waits to hear finish() or abandon(). */
  close(): void {
    for (const fd of this.byIno.values()) closeSync(fd);
    this.byIno.clear();
  }

  /** The restore failed: the keeper holds its copies again, for the next. */
  abandon(): void {
    this.close();
    if (this.control >= 0) closeSync(this.control);
    this.control = -1;
  }
}
