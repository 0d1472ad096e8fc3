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
 * root only). One per application: a restore of another image of it, or
 * the next snapshot that ends it, has it drop what it holds first. It
 * drops everything after `snapshot --tcp-hold` (DEFAULT_HOLD_SECONDS), or
 * when the state directory goes; dropped, a TCP connection in repair mode
 * closes without a word to its peer, and a unix one closes.
 */
import { closeSync, fstatSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Image } from '../image/types.js';
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

/** An image id no image has: asked with it, a keeper drops what it holds. */
const NO_IMAGE = '-';

/** Whatever a keeper holds for `aid` is dropped. */
export function dropKept(home: string, aid: string): void {
  for (const fd of addon().takeConnections(keeperPath(home, aid), NO_IMAGE) ?? []) closeSync(fd);
}

/** A keeper for `fds` (they stay ours too). A failure is told, not thrown:
 * the image is committed and the application gone, so the snapshot
 * stands; only the wait until the restore is less safe. */
function startKeeper(keep: Keeping, fds: number[]): void {
  try {
    mkdirSync(join(keep.home, 'keep'), { recursive: true, mode: 0o700 });
    dropKept(keep.home, keep.aid);
    addon().keepConnections(paths.keeper, keeperPath(keep.home, keep.aid), keep.imageId, keep.holdSeconds, fds);
  } catch (e) {
    process.stderr.write(`appshot: the connections of '${keep.aid}' could not be held until its restore (${(e as Error).message}): their peers see them end\n`);
  }
}

/** Whether a keeper may hold connections of `image`: a live TCP
 * connection, or a socket recorded as kept. */
export function mayHaveKept(image: Image): boolean {
  return image.processes.some((p) => p.fds.some((f) => (f.tcp && !f.tcp.closed) || f.socket?.kept));
}

/** Snapshot side: the sockets handed to a keeper if the application ends. */
export class SocketsForKeeper {
  /** The snapshot ends the application and a keeper may hold its
   * connections (not --leave-running, not --tcp-hold 0). */
  keeping = false;
  private readonly fds = new Map<bigint, number>();

  /** Our duplicate `fd` of socket `ino`, now this object's to close. */
  add(ino: bigint, fd: number): void {
    if (this.fds.has(ino)) closeSync(fd);
    else this.fds.set(ino, fd);
  }

  /** The application was ended: its connections go to a keeper, or, with
   * none, are closed with our duplicates. */
  endWithApplication(keep: Keeping | undefined): void {
    const fds = [...this.fds.values()];
    this.fds.clear();
    try {
      if (keep && fds.length) startKeeper(keep, fds);
    } finally {
      for (const fd of fds) closeSync(fd);
    }
  }

  /** The application goes on (or the snapshot failed): ours are closed. */
  close(): void {
    this.endWithApplication(undefined);
  }
}

/** Restore side: the sockets a keeper held for this image, by inode. */
export class KeptSockets {
  private keep: Keeping | undefined;
  private readonly byIno = new Map<bigint, number>();
  private finished = false;

  /** Takes the sockets held since the snapshot that ended the application,
   * if it was this image's; a keeper holding another image's drops them
   * (they would clash with this image's). */
  adopt(keep: Keeping): void {
    const fds = addon().takeConnections(keeperPath(keep.home, keep.aid), keep.imageId);
    if (!fds?.length) return;
    this.keep = keep;
    for (const fd of fds) this.byIno.set(fstatSync(fd, { bigint: true }).ino, fd);
  }

  /** Our descriptor of the kept socket `ino` (still ours to close), if held. */
  get(ino: bigint): number | undefined {
    return this.byIno.get(ino);
  }

  /** The restore is done: the processes hold their sockets. */
  finish(): void {
    this.finished = true;
  }

  /** Ours are closed. A restore that failed gives every kept socket back
   * to a keeper first, for the next attempt. */
  close(): void {
    const fds = [...this.byIno.values()];
    this.byIno.clear();
    if (!this.finished && this.keep && fds.length) startKeeper(this.keep, fds);
    for (const fd of fds) closeSync(fd);
  }
}
