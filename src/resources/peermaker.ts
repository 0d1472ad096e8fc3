/**
 * Unix pairs and connections made again by the application's process the
 * kernel recorded as their maker, for SO_PEERCRED's pid.
 *
 * The kernel records, with the credentials, the process (its thread group)
 * that made a unix pair: socketpair(2) gives both ends its maker; connect(2)
 * gives the accepted end the process that connected, and the connecting end
 * the one that listened. Under `appshot run` the preload library shows it
 * as that process's virtual PID. Made by the restorer (peercred.c), a
 * restored pair showed PID 0 instead, the restorer being no process of the
 * application: a server that asks who its peer is (to signal it, to read
 * its /proc) lost it silently. So each pair whose recorded maker is a
 * process of the image (Socket.peerCred.pid) is made by that process, by
 * system calls run inside it (the tree is made, no process runs its own
 * code yet): its main thread takes the credentials the pair was made with
 * (peerFor: those the image recorded, or the stand-in it names) for the
 * calls and gives them back after, its capabilities put back exactly as
 * they were (restoreCreds sets its own later); the ends are then taken
 * into appshot (pidfd_getfd) and closed in it, and sockets.ts and
 * unixdgram.ts go on with them as with ends made here (queues, options,
 * shutdown). A connection between two makers is a listener of the first
 * under an abstract name the kernel picks, a client of the second, and the
 * connection the first accepts from the second (by its PID: a stranger
 * who found the name and connected too is closed).
 *
 * Where a maker is outside the application or gone (pid 0), the restorer
 * makes the pair as before, and the application sees PID 0 as it did; one
 * the application still saw but the restore does not run (a zombie) is
 * made so too, and the restore says that PID is not kept. Where only one of a connection's two
 * makers is in the application, so is it made, and the restore says that
 * PID is not kept.
 */
import { closeSync } from 'node:fs';
import { type Fd, FdKind, type Image, type PeerCred, type Process, type Socket } from '../image/types.js';
import { addon } from '../native.js';
import { killPoint } from '../killpoint.js';
import { type RemoteProcess, SyscallError, SYS } from '../ptrace/remote.js';
import type { RestoreContext } from './context.js';
import { threadStatus } from './creds.js';
import { openSocket, peerFor } from './sockets.js';

/** A process of the application that calls can be run in now, with its
 * system PID: `remote` with a scratch area; `done` when no more are. */
export interface Maker {
  pid: number;
  remote: RemoteProcess;
  done(): void;
}

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_SEQPACKET = 5;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
const O_RDWR = 2;
const EAGAIN = 11;
const PR_GET_DUMPABLE = 3;
const PR_SET_DUMPABLE = 4;
/** The listener's queue: room for ours behind a few strangers'. */
const BACKLOG = 64;
const CAP_V3 = 0x20080522;
/** What listenSocket listens with for a backlog of 0 (the kernel caps it). */
const SOMAXCONN = 4096;

/** The pairs the kernel says a process of the application made, by the
 * virtual PIDs of their makers: what makeUnixPairsInside needs. */
export function unixPairMakers(image: Image): Set<number> {
  const vpids = new Set(image.processes.map((p) => p.vpid));
  const makers = new Set<number>();
  for (const { s, peer } of pairs(image, image.processes)) for (const c of [s.peerCred, peer?.peerCred]) if (c?.pid && vpids.has(c.pid)) makers.add(c.pid);
  for (const { s } of listeners(image.processes)) if (s.peerCred?.pid && vpids.has(s.peerCred.pid)) makers.add(s.peerCred.pid);
  return makers;
}

/** Every pair of the image made again (see above): [s's end, its peer's],
 * remembered under `made inside INO` of s for pairEnd, loneEnd and
 * madePair. `order`: the processes in the order of their restore (each
 * one's descriptors by number, as restoreFds takes them: a listener's
 * name found taken is named as it was). `inside`: the maker process of a
 * virtual PID, if it is one. */
export function makeUnixPairsInside(h: RestoreContext, order: Process[], inside: (vpid: number) => Maker | undefined): void {
  const makers = new Map<number, Maker | undefined>();
  const makerOf = (c: PeerCred | undefined) => {
    if (!c?.pid) return undefined;
    if (!makers.has(c.pid)) makers.set(c.pid, inside(c.pid));
    return makers.get(c.pid);
  };
  // A maker the application saw (a virtual PID) that the restore does not
  // run (one that had exited, a zombie): the end sees 0 now, said so.
  const notRun = (c: PeerCred | undefined, where: string) => {
    if (c?.pid && !makerOf(c)) h.notKept.push(`${where}: a unix socket whose peer was process ${c.pid}, which had exited (the restore runs none such), now sees PID 0`);
  };
  try {
    for (const { s, peer, where } of pairs(h.image, order)) {
      const ms = makerOf(s.peerCred);
      if (!peer) {
        // Its peer gone: a pair of its maker's, the other end closed.
        if (ms) remember(h, s, undefined, socketPairIn(ms, s.type, peerFor(h, s)));
        else notRun(s.peerCred, where);
        continue;
      }
      const mp = makerOf(peer.peerCred);
      if (!ms && !mp) {
        notRun(s.peerCred, where);
        notRun(peer.peerCred, where);
        continue;
      }
      if (!ms || !mp) {
        const [inApp, out] = ms ? [s.peerCred!, peer.peerCred] : [peer.peerCred!, s.peerCred];
        h.notKept.push(`${where}: a unix ${s.type === SOCK_DGRAM ? 'socket pair' : 'connection'} one of whose ends saw process ${inApp.pid} as its peer now sees PID 0 (the other end's peer${out?.pid ? `, PID ${out.pid},` : ''} is not a process of the application)`);
        continue;
      }
      // A datagram pair has one maker, as unixdgram.ts makes it.
      const cs = peerFor(h, s);
      const cp = s.type === SOCK_DGRAM ? cs : peerFor(h, peer);
      // One maker for both ends: its socketpair; else a connection.
      if (s.type === SOCK_DGRAM || (ms === mp && sameCreds(cs, cp))) remember(h, s, peer, socketPairIn(ms, s.type, cs));
      else remember(h, s, peer, connectionIn(ms, cs, mp, cp, s.type));
    }
    // A unix listener: bound here as ever (sockets.ts), listening there.
    for (const { p, fd, s } of listeners(order)) {
      const m = makerOf(s.peerCred);
      if (m) openSocket(h, p, fd, (sock) => listenIn(m, peerFor(h, s), sock, s.backlog));
      else notRun(s.peerCred, `process ${p.vpid} fd ${fd.fd}`);
    }
  } finally {
    for (const m of makers.values()) m?.done();
  }
}

/** `ends` ([s's, its peer's]) for whichever end is restored first. */
function remember(h: RestoreContext, s: Socket, peer: Socket | undefined, ends: [number, number]): void {
  h.keep(ends[0]);
  h.keep(ends[1]);
  h.remember(`made inside ${s.ino}`, ends);
  if (peer) h.remember(`made inside ${peer.ino}`, [ends[1], ends[0]]);
}

/** The image's unix pairs, each once: connected stream and seqpacket
 * sockets with their peer, those whose peer is gone (peer undefined), and
 * datagram socketpairs. */
function* pairs(image: Image, order: Process[]): Generator<{ s: Socket; peer?: Socket; where: string }> {
  const byIno = new Map<bigint, Socket>();
  for (const p of image.processes) for (const f of p.fds) if (f.socket) byIno.set(f.socket.ino, f.socket);
  const seen = new Set<bigint>();
  for (const p of order)
    for (const f of byNumber(p)) {
      const s = f.socket;
      if (!s || seen.has(s.ino) || !s.peerCred || s.listening || s.kept || s.inherited) continue;
      seen.add(s.ino);
      const where = `process ${p.vpid} fd ${f.fd}`;
      if (f.kind === FdKind.UNIX_SOCKET && (s.type === SOCK_STREAM || s.type === SOCK_SEQPACKET)) {
        if (s.peerGone) yield { s, where };
        else {
          const peer = byIno.get(s.peerIno);
          if (!peer) continue; // pairEnd names it
          seen.add(peer.ino);
          yield { s, peer, where };
        }
      } else if (f.kind === FdKind.UNIX_DGRAM && s.type === SOCK_DGRAM && s.peerIno) {
        // A socketpair's (unixdgram.ts made): neither bound, each the other's peer.
        const peer = byIno.get(s.peerIno);
        if (!peer || s.address || peer.address || peer.peerIno !== s.ino) continue;
        seen.add(peer.ino);
        yield { s, peer, where };
      }
    }
}

/** `p`'s descriptors in the order restoreFds takes them. */
function byNumber(p: Process): Fd[] {
  return [...p.fds].sort((a, b) => a.fd - b.fd);
}

/** The image's unix listeners, each once, with a process holding it. */
function* listeners(order: Process[]): Generator<{ p: Process; fd: Fd; s: Socket }> {
  const seen = new Set<bigint>();
  for (const p of order)
    for (const fd of byNumber(p)) {
      const s = fd.socket;
      if (fd.kind !== FdKind.UNIX_SOCKET || !s?.listening || s.kept || s.inherited || seen.has(s.ino)) continue;
      seen.add(s.ino);
      yield { p, fd, s };
    }
}

/** Our listener `sock` listening by `m` holding `as` (which the kernel
 * records for every client that connects to see): taken into `m` for the
 * call (pidfd_getfd of appshot) and closed there after. */
function listenIn(m: Maker, as: PeerCred | null, sock: number, backlog: number): void {
  const r = m.remote;
  const pidfd = Number(r.call('a pidfd of appshot', SYS.pidfd_open, [process.pid, 0]));
  try {
    const fd = Number(r.call('taking a unix listener it listened on', SYS.pidfd_getfd, [pidfd, sock, 0]));
    try {
      holding(m, as, () => r.call('listening as it had', SYS.listen, [fd, backlog > 0 ? backlog : SOMAXCONN]));
    } finally {
      r.raw(SYS.close, [fd]);
    }
  } finally {
    r.raw(SYS.close, [pidfd]);
  }
}

function sameCreds(a: PeerCred | null, b: PeerCred | null): boolean {
  if (!a || !b) return a === b;
  return a.uid === b.uid && a.gid === b.gid && a.groups.length === b.groups.length && a.groups.every((g, i) => g === b.groups[i]);
}

/** socketpair(2) by `m` holding `as`: both ends, in appshot. */
function socketPairIn(m: Maker, type: number, as: PeerCred | null): [number, number] {
  const r = m.remote;
  const sv = r.put(Buffer.alloc(8));
  holding(m, as, () => r.call('socketpair for a unix pair it made', SYS.socketpair, [AF_UNIX, type | SOCK_CLOEXEC, 0, sv]));
  const fds = r.get(sv, 8);
  let first: number;
  try {
    first = taken(m, fds.readInt32LE(0));
  } catch (e) {
    r.raw(SYS.close, [fds.readInt32LE(4)]);
    throw e;
  }
  return [first, closingOnError(first, () => taken(m, fds.readInt32LE(4)))];
}

/** `make()`, with `fd` (ours) closed if it throws. */
function closingOnError(fd: number, make: () => number): number {
  try {
    return make();
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** Listeners tried before giving up on a queue strangers keep full (as
 * peercred.c tries). */
const PAIR_TRIES = 8;

/** A connection whose end 0 sees listener `l` (holding `ls`) and end 1
 * connector `c` (holding `cs`): [end 0, end 1], in appshot. Anyone on the
 * host may see the listener's name and fill its queue before `c`
 * connects (EAGAIN): then another listener, another name. */
function connectionIn(l: Maker, ls: PeerCred | null, c: Maker, cs: PeerCred | null, type: number): [number, number] {
  for (let tries = 1; ; tries++) {
    const made = connectionTry(l, ls, c, cs, type, tries);
    if (made) return made;
  }
}

/** Try number `tries` of connectionIn: undefined if the listener's queue
 * was full (unless it is the last: then that is the error). */
function connectionTry(l: Maker, ls: PeerCred | null, c: Maker, cs: PeerCred | null, type: number, tries: number): [number, number] | undefined {
  const lr = l.remote;
  const cr = c.remote;
  // The listener, under an abstract name the kernel picks (a bind with
  // the family alone), which no one else can have taken.
  const family = lr.put(Buffer.from([AF_UNIX, 0]));
  const name = lr.put(Buffer.alloc(110));
  const nameLength = lr.put(Buffer.from([110, 0, 0, 0]));
  const listener = holding(l, ls, () => {
    const fd = Number(lr.call('a listener for a unix connection it made', SYS.socket, [AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0]));
    try {
      lr.call('binding it', SYS.bind, [fd, family, 2]);
      lr.call('listening', SYS.listen, [fd, BACKLOG]);
      lr.call('its name', SYS.getsockname, [fd, name, nameLength]);
      if (tries === 1) killPoint("restore: a unix connection's first listener listens");
    } catch (e) {
      lr.raw(SYS.close, [fd]);
      throw e;
    }
    return fd;
  });
  try {
    const length = lr.get(nameLength, 4).readUInt32LE(0);
    const address = lr.get(name, length);
    const to = cr.put(address);
    const client = holding(c, cs, () => {
      const fd = Number(cr.call('a socket for a unix connection it made', SYS.socket, [AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0]));
      const got = cr.raw(SYS.connect, [fd, to, length]);
      if (got < 0n && got > -4096n) {
        cr.raw(SYS.close, [fd]);
        if (got === -BigInt(EAGAIN) && tries < PAIR_TRIES) return undefined;
        throw new SyscallError('connecting it', Number(-got));
      }
      return fd;
    });
    if (client === undefined) return undefined;
    const end0 = taken(c, client);
    const end1 = closingOnError(end0, () => taken(l, acceptFrom(l, listener, c.pid)));
    for (const end of [end0, end1]) addon().setStatusFlags(end, O_RDWR);
    return [end0, end1];
  } finally {
    lr.raw(SYS.close, [listener]);
  }
}

/** The connection of process `pid` from `listener`'s queue (in `l`): anyone
 * on the host may find the name and connect too, and is closed. */
function acceptFrom(l: Maker, listener: number, pid: number): number {
  const r = l.remote;
  const cred = r.put(Buffer.alloc(12));
  const length = r.put(Buffer.alloc(4));
  for (let strangers = 0; strangers <= BACKLOG; strangers++) {
    const got = r.raw(SYS.accept4, [listener, 0, 0, SOCK_CLOEXEC]);
    if (got === -BigInt(EAGAIN)) break;
    if (got < 0n && got > -4096n) throw new SyscallError('accepting the connection it made', Number(-got));
    const fd = Number(got);
    addon().writeMemory(l.pid, length, Buffer.from(u32(12)));
    r.call('its peer', SYS.getsockopt, [fd, SOL_SOCKET, SO_PEERCRED, cred, length]);
    if (r.get(cred, 4).readInt32LE(0) === pid) return fd;
    r.raw(SYS.close, [fd]);
  }
  throw new Error('the connection it made is not in its listener\'s queue');
}

/** `fd` of `m` taken into appshot, and closed in `m`. */
function taken(m: Maker, fd: number): number {
  try {
    return addon().getFd(m.pid, fd);
  } finally {
    m.remote.raw(SYS.close, [fd]);
  }
}

interface Ids {
  euid: number;
  egid: number;
  groups: number[];
}

/** The effective ids and groups of process `pid`'s main thread. */
function idsOf(pid: number): Ids {
  const { uid, gid, groups } = threadStatus(pid, pid);
  return { euid: uid[1], egid: gid[1], groups };
}

/**
 * `op()` run with `m`'s main thread holding `as`'s effective ids and
 * groups (null: as it is), then given back its own, its capabilities
 * exactly as they were (an effective uid that leaves 0 and comes back
 * sets the effective set to the permitted one) and its dumpable flag as
 * it was. Raw system calls: they
 * change the calling thread only, as peercred.c's do.
 */
function holding<T>(m: Maker, as: PeerCred | null, op: () => T): T {
  const r = m.remote;
  const own = idsOf(m.pid);
  const groupsDiffer = !!as && (as.groups.length !== own.groups.length || as.groups.some((g, i) => g !== own.groups[i]));
  if (!as || (as.uid === own.euid && as.gid === own.egid && !groupsDiffer)) return op();
  const header = r.put(Buffer.from([...u32(CAP_V3), 0, 0, 0, 0]));
  const caps = r.put(Buffer.alloc(24));
  r.call('reading its capabilities', SYS.capget, [header, caps]);
  // A change of effective ids resets the dumpable flag, which decides who
  // may trace the process (the restorer, unprivileged): put back too.
  const dumpable = r.call('reading whether it is dumpable', SYS.prctl, [PR_GET_DUMPABLE]);
  const u32s = (ids: number[]) => (ids.length ? r.put(Buffer.from(ids.flatMap(u32))) : 0n);
  try {
    if (groupsDiffer) r.call('taking the groups a unix pair was made with', SYS.setgroups, [as.groups.length, u32s(as.groups)]);
    if (as.gid !== own.egid) r.call('taking the gid a unix pair was made with', SYS.setresgid, [-1, as.gid, -1]);
    if (as.uid !== own.euid) r.call('taking the uid a unix pair was made with', SYS.setresuid, [-1, as.uid, -1]);
    return op();
  } finally {
    r.call('giving its uid back', SYS.setresuid, [-1, own.euid, -1]);
    r.call('giving its gid back', SYS.setresgid, [-1, own.egid, -1]);
    if (groupsDiffer) r.call('giving its groups back', SYS.setgroups, [own.groups.length, u32s(own.groups)]);
    r.call('giving its capabilities back', SYS.capset, [header, caps]);
    r.call('making it dumpable as it was', SYS.prctl, [PR_SET_DUMPABLE, dumpable]);
  }
}

function u32(n: number): number[] {
  return [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
}
