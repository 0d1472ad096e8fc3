/**
 * Unix datagram sockets (SOCK_DGRAM): unnamed, bound to a path, to an
 * abstract name, or autobound (the kernel's "@" and five hex digits, which
 * every Go program that logs to journald holds); connected to a socket of
 * the application, to a name outside it (/dev/log, the journal's socket),
 * or not at all; socketpair(AF_UNIX, SOCK_DGRAM); with the datagrams
 * queued for reading, whole and in order, their buffer sizes, SO_PASSCRED,
 * peek offset and shutdown state. (Unix SOCK_SEQPACKET pairs carry their
 * records the same way: sockets.ts, with queuedMessages here.)
 *
 * Dump: the queue is read without consuming it (SO_PEEK_OFF walks it with
 * MSG_PEEK, then the socket's own offset is put back).
 *
 * Restore, in appshot's process, once per socket:
 *  - a pair of unnamed sockets connected to each other is socketpair()ed;
 *  - otherwise the socket is made and bound to its name again. A path's
 *    file is made again by the bind (one left behind by the ended original
 *    is removed first; one a live socket holds is a conflict, by name). An
 *    autobound name is taken again when it is free; when it is not (the
 *    original still runs beside the restored copy) the kernel autobinds a
 *    new one, as it would have for a new socket; any other abstract name
 *    taken is a conflict, by name;
 *  - its queued datagrams are sent to it again before it is connected (a
 *    connected unix datagram socket takes datagrams from its peer only),
 *    each from its sender when the sender is the application's socket and
 *    already made, else from a temporary socket bound to the sender's name
 *    when that name is free, else from an unnamed one: the receiver then
 *    sees an unnamed sender (README: what is not carried);
 *  - then it is connected: to its peer in the application by the name that
 *    peer has now, or to its outside peer by name; an outside peer that
 *    cannot be reached fails the restore, naming it.
 */
import { closeSync } from 'node:fs';
import { join } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import type { Datagram, Fd, PeerCred, Process, Socket, SocketOption } from '../image/types.js';
import { addon, type FileId, type MessageCreds, type UnixSocketInfo } from '../native.js';
import { killPoint } from '../killpoint.js';
import { readStat } from '../procfs.js';
import { type RestoreContext, Transient, Unsupported } from './context.js';
import { AF_UNIX, makeSockaddr, parseSockaddr, unixNameFits, unixNameProblem } from './sockaddr.js';
import { clearSocketFile, dumpSocketFile, movedSocketFile, restoreSocketFile, socketFileForPeers, socketFilePlace } from './socketfile.js';
import { socketFileIdentities, socketHolderIdentities } from './fsident.js';
import { applyExtras, isCarriedExtra, readExtras } from './sockopts.js';
import { peerCredOf, peerFor } from './sockets.js';
import { strangeOwner } from './creds.js';

const SOCK_DGRAM = 2;
const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_PASSCRED = 16;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;
const SO_PEEK_OFF = 42;

/** The integer options a unix datagram socket carries over. */
export const UNIX_OPTIONS: [level: number, name: number][] = [
  [SOL_SOCKET, SO_SNDBUF],
  [SOL_SOCKET, SO_RCVBUF],
  [SOL_SOCKET, SO_PASSCRED],
  [SOL_SOCKET, SO_PEEK_OFF],
];

/** How much one socket's queue may hold in an image. */
export const QUEUE_LIMITS = { count: 100_000, bytes: 64 << 20, one: 8 << 20 };

/** An autobound name: the kernel's five hex digits. */
const AUTOBIND = /^@[0-9a-f]{5}$/;

/* ---- dump --------------------------------------------------------------- */

/** The messages queued for reading on a duplicate of the unix socket,
 * whole and in order, left queued; on a socket that passes credentials
 * (SO_PASSCRED), each with who sent it as the reader will be shown
 * (SCM_CREDENTIALS), its pid the system's (dumpFds makes it the
 * application's: senderAsVirtual). */
export function queuedMessages(dup: number, what: string, shutForReading = false): Datagram[] {
  const creds = passesCredentials(dup);
  const queued = queuedWithHeaders(dup, what, shutForReading, creds);
  if (queued.length) refusePassedPidfds(dup, what);
  return queued.map((m) => {
    if (!creds) return m.datagram;
    const c = m.creds;
    // The kernel attached none: the message was sent while neither end
    // passed credentials (the program turned SO_PASSCRED on later); the
    // reader is shown pid 0 and the overflow ids. A message sent again
    // gets credentials of its own: refused while it waits to be read.
    if (!c || c.pid === 0)
      throw new Transient(`${what} passes credentials (SO_PASSCRED) and holds a message whose sender the kernel did not record (sent before SO_PASSCRED was set, or from outside the application's PID namespace), which a restore cannot queue so: cannot be captured yet`);
    return { ...m.datagram, credPid: c.pid, credUid: c.uid, credGid: c.gid };
  });
}

const SO_PASSPIDFD = 76;

/** A unix socket holding messages that shows its reader a pidfd of who
 * sent each one (SO_PASSPIDFD, Linux 6.5: SCM_PIDFD), which a restore
 * would queue without it (review r294: none came after a restore), is
 * refused for the moment: the program reads them soon. */
export function refusePassedPidfds(dup: number, what: string): void {
  let on = 0;
  try {
    on = addon().getSockOpt(dup, SOL_SOCKET, SO_PASSPIDFD);
  } catch {
    return; // not this kernel's
  }
  if (on) throw new Transient(`${what} shows its reader a pidfd of who sent each message (SO_PASSPIDFD) and holds messages, which a restore would queue without them: cannot be captured yet`);
}

/** Whether the unix socket shows its reader who sent each message
 * (SO_PASSCRED). */
export function passesCredentials(dup: number): boolean {
  return addon().getSockOpt(dup, SOL_SOCKET, SO_PASSCRED) !== 0;
}

/** The system PIDs of who sent `s`'s queued messages (queuedMessages)
 * made the application's virtual ones: `virtual` (DumpContext.virtual)
 * answers 0 for a process that is not the application's, and one that
 * has exited (a zombie, or gone: its PID may be another's by the restore)
 * has no process to name. Refused by name, as a moment's state: the
 * program reads the message soon. */
export function senderAsVirtual(s: Socket, virtual: (pid: number) => number, where: string): void {
  for (const d of s.datagrams ?? []) {
    if (d.credPid === undefined) continue;
    const st = readStat(d.credPid);
    const alive = st !== undefined && st.state !== 'Z' && st.state !== 'X';
    const vpid = alive ? virtual(d.credPid) : 0;
    if (!vpid)
      throw new Transient(`${where} holds a message sent by PID ${d.credPid} (SO_PASSCRED shows it), which ${alive ? 'is not a process of the application' : 'has exited'}: its credentials cannot be put back exactly, so it cannot be captured yet`);
    d.credPid = vpid;
  }
}

/** The same, each with what its IP header said that the socket asks to
 * be shown (udp.ts): the address it was sent to ('' if not shown), its
 * TOS or traffic class and TTL or hop limit (-1 if not shown). */
export function queuedWithHeaders(dup: number, what: string, shutForReading = false, creds = false): { datagram: Datagram; to: string; tos: number; ttl: number; creds: MessageCreds | null }[] {
  let got;
  try {
    got = addon().datagramQueue(dup, QUEUE_LIMITS.count, QUEUE_LIMITS.bytes, QUEUE_LIMITS.one, shutForReading, creds);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'E2BIG') throw new Unsupported(`${what}: more than ${QUEUE_LIMITS.count} datagrams or ${QUEUE_LIMITS.bytes >> 20} MiB queued`);
    if (code === 'EMSGSIZE') throw new Unsupported(`${what}: a queued datagram larger than ${QUEUE_LIMITS.one >> 20} MiB`);
    // Left unread: a peek would have consumed it, and the application left
    // running would never see it (a refused snapshot must change nothing).
    if (code === 'ERRPENDING')
      throw new Unsupported(`${what} holds an error the application has not read yet (the answer to an earlier send, such as an ICMP port unreachable, a peer gone with data unread, or an error queue: IP_RECVERR, MSG_ZEROCOPY completions), which cannot be captured`);
    throw new Unsupported(`${what}: ${(e as Error).message}`);
  }
  if (got.length && showsReceiveTimes(dup))
    throw new Transient(`${what} holds ${got.length} datagram${got.length > 1 ? 's' : ''} and shows the program when each was received (SO_TIMESTAMP, SO_TIMESTAMPNS or SO_TIMESTAMPING), which a restore would stamp anew: cannot be captured yet`);
  return got.map((m) => {
    const from = m.from ? parseSockaddr(m.from) : { address: '', port: 0 };
    return { datagram: { data: m.data, from: from.address, fromPort: from.port }, to: m.to ? parseSockaddr(m.to).address : '', tos: m.tos, ttl: m.ttl, creds: m.creds };
  });
}

/** SO_TIMESTAMP_OLD, SO_TIMESTAMPNS_OLD, SO_TIMESTAMP_NEW,
 * SO_TIMESTAMPNS_NEW: each reads 1 only in its own form; SO_TIMESTAMPING
 * (old and new read the same flags): software or hardware reports asked. */
const RECEIVE_TIME_OPTIONS = [29, 35, 63, 64];
const SO_TIMESTAMPING = 37;
const SO_DOMAIN = 39;
const SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3;
const SOF_TIMESTAMPING_SOFTWARE = 1 << 4;
const SOF_TIMESTAMPING_RAW_HARDWARE = 1 << 6;
const SOF_TIMESTAMPING_OPT_RX_FILTER = 1 << 17;

/** Whether the socket hands the program each datagram's receive time
 * (a control message the kernel stamps as it queues it): a datagram put
 * back at restore is stamped then, and the program would read a time
 * that is not when it arrived. */
function showsReceiveTimes(dup: number): boolean {
  const read = (name: number) => {
    try {
      return addon().getSockOpt(dup, SOL_SOCKET, name);
    } catch {
      return 0; // not this kernel's
    }
  };
  if (RECEIVE_TIME_OPTIONS.some((name) => read(name) !== 0)) return true;
  // A unix socket stamps what it queues only for the options above
  // (SOCK_RCVTSTAMP): SO_TIMESTAMPING alone shows its reader nothing
  // (review r293: such a socket was refused).
  if (read(SO_DOMAIN) === AF_UNIX) return false;
  // The kernel's rule (__sock_recv_timestamp): a software time is shown
  // where SOFTWARE is asked with RX_SOFTWARE, or without OPT_RX_FILTER; a
  // hardware one wherever RAW_HARDWARE is (kept strict: the datagram put
  // back has none).
  const flags = read(SO_TIMESTAMPING);
  const software = (flags & SOF_TIMESTAMPING_SOFTWARE) !== 0 && ((flags & SOF_TIMESTAMPING_RX_SOFTWARE) !== 0 || (flags & SOF_TIMESTAMPING_OPT_RX_FILTER) === 0);
  return software || (flags & SOF_TIMESTAMPING_RAW_HARDWARE) !== 0;
}

export function readOptions(dup: number, which: [number, number][]): SocketOption[] {
  return which.map(([level, name]) => ({ level, name, value: addon().getSockOpt(dup, level, name) }));
}

/** A packet filter the application attached is not carried (by this kind
 * or by UDP): refused by name rather than restored without it. A classic
 * one (SO_ATTACH_FILTER) shows its length through SO_GET_FILTER; an eBPF
 * one (SO_ATTACH_BPF) has no classic program to show, and the kernel
 * answers EACCES (nor does anything else give its program back). */
export function refuseOwnFilter(dup: number, where: string): void {
  let length;
  try {
    length = addon().socketFilterLength(dup);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EACCES')
      throw new Unsupported(`${where} has an eBPF socket filter the application attached (SO_ATTACH_BPF), which cannot be captured`);
    throw e;
  }
  if (length > 0)
    throw new Unsupported(`${where} has a packet filter the application attached (SO_ATTACH_FILTER), which cannot be captured yet`);
}

/** A socketpair's end: who made the pair, as the kernel says to either end
 * (SO_PEERCRED), which madePair makes it as again. Other datagram sockets
 * have no such record (ENODATA). */
function pairMaker(dup: number): { peerCred?: PeerCred } {
  try {
    return { peerCred: peerCredOf(dup) };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENODATA') return {};
    throw e;
  }
}

/** The unix datagram socket behind `fd` of `pid`; `diag` is what
 * sock_diag says of it. Whether its peer is in the application is known
 * only once every process is seen (sockets.ts, checkUnixPeers). */

export function dumpUnixDgram(pid: number, fd: number, ino: bigint, diag: UnixSocketInfo | undefined, what: string): Socket {
  const where = `${what} fd ${fd}: a unix datagram socket`;
  const dup = addon().getFd(pid, fd);
  try {
    refuseOwnFilter(dup, where);
    const raw = addon().sockName(dup);
    // A relative name is carried with the directory it was bound in
    // (socketfile.ts), a peer's is not: connected to by name, it was
    // resolved where the process was then, which nothing tells.
    const problem = unixNameProblem(raw, true);
    if (problem) throw new Unsupported(`${where}: ${problem}`);
    const name = parseSockaddr(raw).address;
    const peerRaw = addon().peerName(dup);
    // A peer's relative name: connected to again through the peer socket
    // itself when it is the application's (checkUnixPeers refuses one
    // outside it).
    if (peerRaw && unixNameProblem(peerRaw, true)) throw new Unsupported(`${where} connected to a peer whose name cannot be recorded: ${unixNameProblem(peerRaw, true)}`);
    const file = dumpSocketFile(pid, name, diag, `${what} fd ${fd}`);
    return {
      ino,
      family: AF_UNIX,
      type: SOCK_DGRAM,
      address: name,
      port: 0,
      listening: false,
      backlog: 0,
      peerIno: BigInt(diag?.peer ?? 0),
      queued: Buffer.alloc(0),
      reuseaddr: false,
      reuseport: false,
      v6only: false,
      peerAddress: peerRaw ? parseSockaddr(peerRaw).address : '',
      peerPort: 0,
      datagrams: queuedMessages(dup, where),
      shutdown: diag?.shutdown ?? 0,
      options: [...readOptions(dup, UNIX_OPTIONS), ...readExtras(dup, 'unix-dgram', AF_UNIX, SOCK_DGRAM, UNIX_OPTIONS, where)],
      ...(file ? { file } : {}),
      ...pairMaker(dup),
    };
  } finally {
    closeSync(dup);
  }
}

/* ---- restore ------------------------------------------------------------ */

/** Our descriptor for the unix datagram socket `fd` holds. */
export function openUnixDgram(h: RestoreContext, p: Process, fd: Fd): number {
  const what = `process ${p.vpid} fd ${fd.fd}`;
  const s = fd.socket;
  if (!s) throw new AppshotError(`corrupt image: ${what}: a unix datagram socket without its state`);
  const sock = made(h, s, what);
  h.once(`connected ${s.ino}`, () => connect(h, s, sock, what));
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

function socketOf(h: RestoreContext, ino: bigint): Socket | undefined {
  for (const p of h.image.processes) for (const f of p.fds) if (f.socket?.ino === ino) return f.socket;
  return undefined;
}

/** Made, bound, options set and queue filled; not yet connected. */
function made(h: RestoreContext, s: Socket, what: string): number {
  return h.once(`socket ${s.ino}`, () => {
    check(s, what);
    const peer = s.peerIno ? socketOf(h, s.peerIno) : undefined;
    if (s.peerIno && !peer) throw new AppshotError(`corrupt image: ${what}: the image lacks the peer of a unix datagram socket`);
    if (peer && !s.address && !peer.address && peer.peerIno === s.ino) {
      check(peer, what);
      return madePair(h, s, peer, what);
    }
    const sock = h.keep(addon().sockOpen(AF_UNIX, SOCK_DGRAM));
    h.ownerAfter.add(sock);
    setOptions(sock, ownOptions(s), false);
    if (s.address) bindName(h, sock, s, what);
    if (s.datagrams?.length) {
      const target = queueTarget(h, sock, s, what);
      try {
        for (const d of s.datagrams) requeue(h, target.to, s, d, what);
      } finally {
        if (target.fd !== undefined) closeSync(target.fd);
      }
    }
    setOptions(sock, ownOptions(s), true);
    applyExtras(sock, s.options ?? [], UNIX_OPTIONS, false, `${what}: a unix datagram socket`);
    return sock;
  });
}

/** socketpair(): both ends, each with what was queued for it sent by the other. */
function madePair(h: RestoreContext, s: Socket, peer: Socket, what: string): number {
  // Made by whom it was (older images: the restorer), so that either end
  // still says who made it (SO_PEERCRED).
  // One maker for both ends, as socketpair(2) made them: if the recorded
  // one is not given (peerFor), its stand-in is both ends' peer.
  // Made by that very process if it is the application's (peermaker.ts).
  const inside = h.peek<[number, number]>(`made inside ${s.ino}`);
  const maker = inside ? null : peerFor(h, s);
  const [a, b] = inside ?? addon().socketPairAs(SOCK_DGRAM, maker, maker);
  if (!inside) {
    h.keep(a);
    h.keep(b);
  }
  h.ownerAfter.add(a).add(b);
  h.remember(`socket ${peer.ino}`, b);
  for (const [end, other, sock] of [
    [s, b, a],
    [peer, a, b],
  ] as const) {
    setOptions(sock, ownOptions(end), false);
    for (const d of end.datagrams ?? []) sentAs(h, d, `${what}: a unix datagram socket pair`, (creds) => addon().sockSend(other, d.data, null, creds));
  }
  for (const [end, sock] of [
    [s, a],
    [peer, b],
  ] as const) {
    setOptions(sock, ownOptions(end), true);
    applyExtras(sock, end.options ?? [], UNIX_OPTIONS, false, 'a unix datagram socket pair');
    h.remember(`connected ${end.ino}`, true);
    shut(sock, end.shutdown ?? 0);
  }
  return a;
}

/** Bound to its name (a relative one where it was bound, socketfile.ts),
 * its file then given its place, mode and owner. */
function bindName(h: RestoreContext, sock: number, s: Socket, what: string): void {
  const address = s.address;
  const name = makeSockaddr({ family: AF_UNIX, address, port: 0 });
  // As its process would (fsident.ts).
  const who = socketFileIdentities(h.image, s.ino, address, s.file?.base);
  clearSocketFile(h, address, s.file, what, who);
  try {
    addon().sockBind(sock, name, s.file?.base || undefined, who);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    // The kernel chose this name; a new one is what a new socket gets.
    if (err.code === 'EADDRINUSE' && AUTOBIND.test(address)) return addon().sockBind(sock, Buffer.from([AF_UNIX, 0]));
    throw new AppshotError(`${what}: a unix datagram socket cannot be bound to ${address}: ${err.message}`, err.code === 'EADDRINUSE' ? ExitCode.conflict : undefined);
  }
  restoreSocketFile(h, sock, address, s.file, what, who);
}

/** Sends `d` by `send`, with SCM_CREDENTIALS naming who sent it (its
 * process as it is now, its uid and gid) if the image recorded them
 * (queuedMessages). The restorer names a process not its own only with
 * CAP_SYS_ADMIN, a uid or gid not its own with CAP_SETUID or CAP_SETGID:
 * without them the restore fails, naming the message's sender, rather
 * than queue it shown as sent by someone else. */
export function sentAs(h: RestoreContext, d: Datagram, what: string, send: (creds?: MessageCreds) => void): void {
  if (d.credPid === undefined) return send();
  const pid = h.systemPid(d.credPid);
  if (pid === undefined) throw new AppshotError(`corrupt image: ${what}: a queued message sent by process ${d.credPid}, which the restore did not make`);
  // Ids the image's processes have (an image of another node's may name
  // any: the restorer would grant them).
  const stranger = strangeOwner(h.image, d.credUid!, [d.credGid!]);
  if (stranger) throw new AppshotError(`${what}: a queued message shown as sent by uid ${d.credUid} gid ${d.credGid}: ${stranger}`, ExitCode.denied);
  try {
    send({ pid, uid: d.credUid!, gid: d.credGid! });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EPERM' || code === 'EINVAL')
      throw new AppshotError(`${what}: a queued message sent by process ${d.credPid} as uid ${d.credUid} gid ${d.credGid} (SO_PASSCRED shows who sent it) cannot be put back with those credentials: naming another process takes CAP_SYS_ADMIN, another uid or gid CAP_SETUID or CAP_SETGID (${(e as Error).message})`);
    throw e;
  }
}

/**
 * Where the datagrams queued on `sock` (bound, its file in place) are sent
 * to put them back: an abstract name as it is (`sock` holds it: nothing
 * else can answer to it); a path through a descriptor of its file
 * (/proc/self/fd/N: `fd`, for the caller to close), opened where the file
 * is now as its process would and checked to be the file `sock`'s bind
 * made. Not by its name, which the send would look up again, following a
 * symlink put there since by anyone who may change its directory, and
 * send as the restorer (root: any socket file's permissions pass) with the
 * image's datagrams and the credentials they name (review r363 #6).
 */
function queueTarget(h: RestoreContext, sock: number, s: Socket, what: string): { to: Buffer; fd?: number } {
  const to = addon().sockName(sock);
  if (to.length <= 2) throw new AppshotError(`corrupt image: ${what}: datagrams queued on an unnamed, unconnected unix socket`);
  if (s.address.startsWith('@')) return { to };
  // Where its file is while the restore goes on (moved aside, renamed),
  // as connect() finds it.
  const place = movedSocketFile(h, sock) ?? socketFileForPeers(s.address, s.file);
  if (!place) throw new AppshotError(`corrupt image: ${what}: datagrams queued on a unix socket bound to ${s.address}, whose file cannot be found`);
  killPoint('restore: unix datagram socket file made, its queue to be sent');
  let fd: number;
  try {
    fd = addon().socketFileTarget(sock, place.dir, place.name, socketFileIdentities(h.image, s.ino, s.address, s.file?.base));
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const why = err.code === 'ESTALE' ? 'it is not the file its bind made (its directory changed meanwhile?)' : err.message;
    throw new AppshotError(`${what}: the queued datagrams of the unix datagram socket ${s.address} cannot be put back: ${join(place.dir, place.name)}: ${why}`);
  }
  return { to: makeSockaddr({ family: AF_UNIX, address: `/proc/self/fd/${fd}`, port: 0 }), fd };
}

/** One queued datagram sent to `to` (queueTarget) again, from its sender
 * if possible. */
function requeue(h: RestoreContext, to: Buffer, s: Socket, d: Datagram, what: string): void {
  sentAs(h, d, what, (creds) => requeueFrom(h, to, s, d, what, creds));
}

function requeueFrom(h: RestoreContext, to: Buffer, s: Socket, d: Datagram, what: string, creds: MessageCreds | undefined): void {
  if (d.from) {
    // The application's socket of that name, made already (and able to send).
    for (const p of h.image.processes)
      for (const f of p.fds) {
        const other = f.socket;
        if (!other || other.family !== AF_UNIX || other.type !== SOCK_DGRAM || other.address !== d.from) continue;
        const mine = h.peek<number>(`socket ${other.ino}`);
        if (mine === undefined) continue;
        try {
          addon().sockSend(mine, d.data, to, creds);
          return;
        } catch {
          /* shut down, or its name changed: another sender below */
        }
      }
  }
  const temp = addon().sockOpen(AF_UNIX, SOCK_DGRAM);
  try {
    // A relative sender's name would be resolved here, not where it was:
    // sent from an unnamed socket instead.
    if (d.from && unixNameFits(d.from) && (d.from.startsWith('/') || d.from.startsWith('@'))) {
      // The name is the image's: a file there is removed only if it is a
      // socket file no live socket holds, and the temporary socket's own
      // file goes by its inode (a directory on the way may change under
      // us: socketfile.ts).
      const place = d.from.startsWith('@') ? undefined : socketFilePlace(d.from, undefined);
      // As the receiving socket's process (fsident.ts): the name is the
      // image's, its directory anyone's.
      const who = socketHolderIdentities(h.image, s.ino);
      let made: FileId | undefined;
      try {
        if (place && addon().socketFileClear(place.dir, place.name, who)) throw new Error('held');
        addon().sockBind(temp, makeSockaddr({ family: AF_UNIX, address: d.from, port: 0 }), undefined, who);
        if (place) made = addon().socketFileOf(temp);
        addon().sockSend(temp, d.data, to, creds);
        return;
      } catch {
        /* the name is taken: from an unnamed socket instead */
      } finally {
        if (place && made) addon().socketFileRemove(place.dir, place.name, made, who);
      }
    }
    const unnamed = addon().sockOpen(AF_UNIX, SOCK_DGRAM);
    try {
      addon().sockSend(unnamed, d.data, to, creds);
    } finally {
      closeSync(unnamed);
    }
  } catch (e) {
    // Its credentials refused: said so by sentAs.
    if (creds && ['EPERM', 'EINVAL'].includes((e as NodeJS.ErrnoException).code ?? '')) throw e;
    throw new AppshotError(`${what}: a queued datagram cannot be put back: ${(e as Error).message}`);
  } finally {
    closeSync(temp);
  }
}

function connect(h: RestoreContext, s: Socket, sock: number, what: string): boolean {
  // A connect by path as its process would (fsident.ts): write permission
  // on the file, search on the directories.
  const who = socketHolderIdentities(h.image, s.ino);
  if (s.peerIno) {
    const peer = socketOf(h, s.peerIno)!;
    const peerFd = made(h, peer, what);
    // Through its file's directory (a relative name where it was bound, a
    // file moved where it went, a path too long for a sockaddr); by its
    // own name for an abstract one.
    const file = movedSocketFile(h, peerFd) ?? socketFileForPeers(peer.address, peer.file);
    const name = file ? makeSockaddr({ family: AF_UNIX, address: file.name, port: 0 }) : addon().sockName(peerFd);
    if (name.length <= 2) throw new AppshotError(`corrupt image: ${what}: a unix datagram socket connected to an unnamed socket that is not its pair`);
    try {
      addon().sockConnect(sock, name, file?.dir, who);
    } catch (e) {
      throw new AppshotError(`${what}: a unix datagram socket cannot be connected again to the application's socket ${peer.address}${peer.file?.removed ? ', whose file the application removed' : ''}: ${(e as Error).message}`);
    }
  } else if (s.peerAddress) {
    try {
      addon().sockConnect(sock, makeSockaddr({ family: AF_UNIX, address: s.peerAddress, port: 0 }), undefined, s.peerAddress.startsWith('@') ? undefined : who);
    } catch (e) {
      throw new AppshotError(`${what}: the unix datagram socket's peer ${s.peerAddress} cannot be reached: ${(e as Error).message}`, ExitCode.conflict);
    }
  }
  shut(sock, s.shutdown ?? 0);
  return true;
}

/** sk_shutdown bits (1 receive, 2 send) as shutdown(2)'s how. */
export function shut(sock: number, bits: number): void {
  if (!(bits & 3)) return;
  try {
    addon().sockShutdown(sock, (bits & 3) - 1);
  } catch (e) {
    // An unconnected UDP socket: the kernel shuts it down all the same,
    // and says ENOTCONN (inet_shutdown), as it said to the application.
    if ((e as NodeJS.ErrnoException).code !== 'ENOTCONN') throw e;
  }
}

/** Buffer sizes before anything is queued (the queue must fit), the rest
 * after (a peek offset set before would have the queue skip bytes). */
export function setOptions(sock: number, options: SocketOption[], late: boolean): void {
  for (const o of options) {
    const isBuffer = o.level === SOL_SOCKET && (o.name === SO_SNDBUF || o.name === SO_RCVBUF);
    if (isBuffer === late) continue;
    if (o.level === SOL_SOCKET && o.name === SO_PEEK_OFF && o.value < 0) continue;
    if (isBuffer) {
      // The kernel doubles what it is given, and reports the double.
      const half = Math.max(1, Math.floor(o.value / 2));
      try {
        addon().setSockOpt(sock, SOL_SOCKET, o.name === SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE, half);
      } catch {
        addon().setSockOpt(sock, SOL_SOCKET, o.name, half);
      }
    } else addon().setSockOpt(sock, o.level, o.name, o.value);
  }
}

/** The options this kind sets itself (the others are sockopts.ts's). */
function ownOptions(s: Socket): SocketOption[] {
  return (s.options ?? []).filter((o) => UNIX_OPTIONS.some(([l, n]) => l === o.level && n === o.name));
}

/** An image may come from anyone. */
function check(s: Socket, what: string): void {
  const bad = (why: string) => new AppshotError(`corrupt image: ${what}: a unix datagram socket ${why}`);
  if (s.family !== AF_UNIX || s.type !== SOCK_DGRAM) throw bad(`of family ${s.family} and type ${s.type}`);
  // Its own name may be relative, bound where the image says (socketfile.ts).
  for (const [name, relativeOk] of [
    [s.address, !!s.file?.base],
    [s.peerAddress ?? '', !!s.peerIno],
  ] as const)
    if (name && (!unixNameFits(name) || (!name.startsWith('@') && !name.startsWith('/') && !relativeOk))) throw bad(`names ${JSON.stringify(name)}`);
  for (const o of s.options ?? [])
    if (!UNIX_OPTIONS.some(([l, n]) => l === o.level && n === o.name) && !isCarriedExtra('unix-dgram', AF_UNIX, UNIX_OPTIONS, o))
      throw bad(`carries socket option ${o.level}/${o.name}, which appshot does not set`);
}
