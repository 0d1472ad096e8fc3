/**
 * Sockets: listening TCP (IPv4 and IPv6) and listening unix sockets with
 * their address, options and backlog; connected unix stream sockets whose
 * peer is in the application too (socketpair, or a connection between two
 * of its processes) with the data queued in them, read with MSG_PEEK.
 * Established TCP connections are tcp.ts's, unix datagram sockets
 * unixdgram.ts's, UDP sockets udp.ts's, netlink sockets netlink.ts's
 * (this module sends them there). A
 * unix SOCK_SEQPACKET pair's queued records are read whole (unixdgram.ts).
 * Each end keeps its shutdown state (UNIX_DIAG_SHUTDOWN). A unix stream
 * or seqpacket socket whose other end is outside the application (a local
 * client of a server) is held by a keeper until the restore on this host
 * (keeper.ts), or refused by name where it cannot be.
 *
 * Restore: each made in appshot's process and handed over, once however
 * many descriptors share it; a clone's TCP listener on its own port or on
 * the shared one (listenAddress). A unix connection's ends are made by
 * threads holding the credentials the kernel had recorded for each end's
 * peer (SO_PEERCRED, SO_PEERGROUPS; addon peercred.c), never the
 * restorer's: a server that decides by them what its peer may do sees
 * the peer it had. Where the kernel recorded a process of the application
 * as a pair's maker (or a listener's), that process made it (or listened)
 * before any of this ran (peermaker.ts), for SO_PEERCRED's pid: pairEnd,
 * loneEnd and unixdgram.ts take those ends.
 *
 * Inherited listeners: `appshot serve` installs its own public listener in
 * a restore-mode instance in place of the application's (serve/server.ts).
 * That socket is serve's, not the application's: a snapshot records the
 * key it was installed under with the application's listener it stands
 * for (address, port, and the backlog and options the socket has), and a
 * restore installs the very descriptor its caller hands it for that key,
 * given those options and backlog (the kernel copies a listener's options
 * into what it accepts), nothing made. A restore handed nothing (a plain
 * `appshot restore`) makes the application's own listener again from the
 * record. The connections waiting in its accept queue stay there meanwhile.
 */
import { dumpRaw, rawName, SOCK_RAW } from './raw.js';
import { unixNameProblem } from './sockaddr.js';
import { closeSync, fstatSync, readFileSync } from 'node:fs';
import { AppshotError, ExitCode } from '../errors.js';
import { addon } from '../native.js';
import { type Datagram, type Fd, FdKind, type Image, type PeerCred, type Process, type Socket, type SocketOption, verdictRef, virtualPort } from '../image/types.js';
import { type DumpContext, nameProcess, type RestoreContext, Transient, Unsupported, writeWhatFits } from './context.js';
import { connectionName, type SeenConnection } from './tcp.js';
import { dumpUdp, type SeenUdp } from './udp.js';
import { AF_NETLINK, boundPortId, dumpNetlink, netlinkPrivileges, netlinkTable } from './netlink.js';
import { clearSocketFile, dumpSocketFile, restoreSocketFile } from './socketfile.js';
import { socketFileIdentities } from './fsident.js';
import { ownerFor } from './files.js';
import { ownCreds, peerCredRefusal, strangeOwner } from './creds.js';
import { dumpUnixDgram, passesCredentials, queuedMessages, refuseOwnFilter, refusePassedPidfds, senderAsVirtual, sentAs, shut } from './unixdgram.js';
import { isUnconnected, neverConnected, optionKind, unconnectedName, unixUnconnected } from './unconnected.js';
import { dnotifyInos } from './fdowner.js';
import { heldQueueInos } from './mqueue.js';
import { applyExtras, earlyBytes, forgetClosed, type HeldSocket, isCarriedExtra, noted, NOTHING_NOTED, type Notes, optionPrivilege, readExtras, resetExtras, type SockKind } from './sockopts.js';
import { CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_NET_RAW, capNames, processMay, restorerMay, vouchedFor } from './heldcaps.js';
import type { NetlinkSeen, TablesSnapshot, UnixSocketInfo } from '../native.js';

/** A TCP socket as it told of itself (SocketTable.tcpSocket). */
type InetEntry = SeenConnection;

interface UnixEntry {
  flags: number;
  type: number;
  state: number;
  path: string;
  /** Its line was followed by one that is not a socket's, or another line
   * named its inode too: a name holding a newline, which the file prints
   * as it is (review r294: cut at it, or a crafted name forging another
   * socket's line). */
  ambiguous?: boolean;
}

const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const TCP_LISTEN = 0x0a;
const TCP_CLOSE = 0x07;
/** /proc/net/unix's St column (sock->state). */
const SS_CONNECTED = 3;
const SO_ACCEPTCON = 0x10000;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_SEQPACKET = 5;
/** The bytes queued on unix stream socket `dup`, left queued. An
 * out-of-band byte among them (send with MSG_OOB) is not carried: a peek
 * skips it, and the program that looks for it with MSG_OOB or
 * SIOCATMARK after a restore would find nothing. Refused for the moment:
 * the retry finds it read, as a program soon reads it.
 * On a socket that passes credentials (SO_PASSCRED) each writer's bytes
 * are shown with its own (SCM_CREDENTIALS), and the kernel gives a read
 * no more than one writer's run: the bytes are then read as those runs,
 * each with who wrote it (queuedMessages), carried as the socket's
 * records (`datagrams`, `queued` left empty), and written back so. */
function peekStream(dup: number, bytes: number, where: string, shutForReading = false): { queued: Buffer; datagrams?: Datagram[] } {
  if (addon().oobPending(dup)) throw new Transient(`${where} holds an out-of-band byte not yet read (MSG_OOB), which cannot be captured yet`);
  refusePassedPidfds(dup, where);
  if (!passesCredentials(dup)) {
    // A read stops at an out-of-band mark whose byte was read already, or
    // is to be read inline (SO_OOBINLINE): what lies past it would be
    // lost, and the mark with it (review r293). For a moment: the program
    // reads past it.
    const queued = addon().peekSocket(dup, bytes);
    if (queued.length < bytes) throw new Transient(`${where} holds ${bytes} bytes not yet read, of which a read gives only the first ${queued.length} (it stops at an out-of-band mark: MSG_OOB), which cannot be captured yet`);
    return { queued };
  }
  const runs = queuedMessages(dup, where, shutForReading);
  const read = runs.reduce((n, r) => n + r.data.length, 0);
  if (read !== bytes) throw new Transient(`${where} holds ${bytes} bytes not yet read, of which ${read} could be read with their writers' credentials (SO_PASSCRED): cannot be captured yet`);
  // Written back through the other end of a pair: no sender's name.
  return { queued: Buffer.alloc(0), datagrams: runs.map((r) => ({ ...r, from: '', fromPort: 0 })) };
}

/** What a listener carries in its own fields (reuseaddr, reuseport, v6only),
 * not among its options. */
const BASE_OPTIONS: [number, number][] = [
  [1, 2], // SO_REUSEADDR
  [1, 15], // SO_REUSEPORT
  [41, 26], // IPV6_V6ONLY
];

/** Who the kernel recorded as `dup`'s peer (SO_PEERCRED, SO_PEERGROUPS),
 * its pid the system's: dumpFds makes it the virtual one. */
export function peerCredOf(dup: number): PeerCred {
  return { ...addon().peerCred(dup), pid: addon().peerCredentials(dup).pid };
}

/** The descriptor kind of a socket describe() returned. */
export function socketKind(s: Socket): number {
  if (s.family === AF_NETLINK) return FdKind.NETLINK;
  if (s.type === SOCK_RAW) return FdKind.RAW;
  if (isUnconnected(s)) return FdKind.UNCONNECTED_STREAM;
  if (s.family === AF_UNIX) return s.type === SOCK_DGRAM ? FdKind.UNIX_DGRAM : FdKind.UNIX_SOCKET;
  return s.type === SOCK_DGRAM ? FdKind.UDP : FdKind.TCP_LISTEN;
}

/** What appshot needs to know of a process's sockets beyond the socket
 * itself. A TCP socket is asked of itself (tcpEndpoint), not looked up in
 * /proc/net/tcp: that file lists every socket of the network namespace
 * (thousands of TIME_WAIT on a busy server, ~24 ms to read in the frozen
 * window), this costs a few calls per socket of the application. Unix and
 * UDP sockets are still looked up in tables of the namespace, read when
 * the first socket of their kind is. */
/**
 * The kernel's tables of sockets are read in pieces (a sock_diag dump, a
 * /proc/net file page by page), each piece resumed at a position in a
 * hash table: a socket of another program made or closed between two
 * pieces shifts the walk, and one of the application's, frozen and
 * unchanged, can be skipped (seen under load: a listener's socket file
 * went unrecorded, and its restore bound the name the application had
 * moved away from, without a word). A table missing one of them is read
 * again, at most this many times in a snapshot, before its absence is
 * believed (a socket of another network namespace, passed in, is in
 * neither table).
 */
const REREADS = 3;

const SO_PROTOCOL = 38;
const IPPROTO_UDP = 17;
/** IP datagram sockets of other protocols than UDP, by name. */
const DGRAM_PROTOCOLS: ReadonlyMap<number, string> = new Map([
  [1, 'a ping socket (ICMP datagrams)'],
  [58, 'a ping socket (ICMPv6 datagrams)'],
  [136, 'a UDP-Lite socket'],
]);

export class SocketTable {
  private tcp = new Map<bigint, InetEntry & { backlog: number; neverConnected: boolean }>();
  private unix = new Map<bigint, UnixEntry>();
  private diag = new Map<bigint, UnixSocketInfo>();
  /** Per UDP socket: its unsent bytes (/proc/net/udp's tx_queue) and its
   * shutdown state (sock_diag), from two tables read apart. */
  private udpTxQueue = new Map<bigint, number>();
  private udpShutdown = new Map<bigint, number>();
  /** Times each kind's tables were read again (REREADS at most, for the
   * whole snapshot: every entry of every read is kept, so one socket's
   * rereads serve the others missing from the first read, and sockets
   * rightly absent, many or not, cost no more than that). */
  private readonly rereads = { unix: 0, udp: 0, netlink: 0 };
  private unixLoaded = false;
  private udpLoaded = false;
  /** netlink_diag's table, read when the first netlink socket is. */
  private netlink?: ReturnType<typeof netlinkTable>;

  constructor(private readonly pid: number) {}

  private loadUnix(): void {
    if (this.unixLoaded) return;
    this.unixLoaded = true;
    this.readUnix(true, true);
  }

  /** Reads sock_diag's table (`diag`) and the process's /proc/net/unix
   * (`names`) into the maps; entries read before are kept. */
  private readUnix(diag: boolean, names: boolean): void {
    // sock_diag answers for the caller's network namespace, which is the
    // application's (appshot does not move it into another).
    if (diag) for (const u of addon().unixSockets()) this.diag.set(BigInt(u.ino), u);
    if (!names) return;
    try {
      const seen = new Set<bigint>();
      let last: UnixEntry | undefined;
      for (const line of readFileSync(`/proc/${this.pid}/net/unix`, 'utf8').split('\n').slice(1)) {
        // The name is the rest of the line after one space, spaces and
        // all ("/run/my app/sock"): split on blanks, it was cut at the
        // first and the socket came back bound to another name.
        const f = /^\s*\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)(?: (.*))?$/.exec(line);
        if (!f) {
          if (last && line !== '') last.ambiguous = true;
          continue;
        }
        const ino = BigInt(f[4]);
        last = { flags: parseInt(f[1], 16), type: parseInt(f[2], 16), state: parseInt(f[3], 16), path: f[5] ?? '' };
        if (seen.has(ino)) last.ambiguous = true;
        seen.add(ino);
        this.unix.set(ino, last);
      }
    } catch {
      /* no unix sockets */
    }
  }

  /** What both tables say of unix socket `ino`: one missing from either
   * is read again (see REREADS) before its absence is believed. */
  private unixOf(ino: bigint): { u: UnixEntry | undefined; d: UnixSocketInfo | undefined } {
    this.loadUnix();
    this.readAgainWhile('unix', () => !(this.unix.has(ino) && this.diag.has(ino)), () => this.readUnix(!this.diag.has(ino), !this.unix.has(ino)));
    const u = this.unix.get(ino);
    if (u?.ambiguous)
      throw new Unsupported(`the unix socket of inode ${ino} (${JSON.stringify(u.path)}): its name shows in /proc/net/unix over more than one line, or another line names its inode too (a newline in a socket's name), so it cannot be read exactly: it cannot be captured yet`);
    return { u, d: this.diag.get(ino) };
  }

  private loadUdp(): void {
    if (this.udpLoaded) return;
    this.udpLoaded = true;
    this.readUdp();
  }

  /** Reads /proc/net/udp{,6} of the process and sock_diag's shutdown
   * states into the maps; entries read before are kept. */
  private readUdp(): void {
    for (const family of [AF_INET, AF_INET6]) {
      const file = family === AF_INET ? 'udp' : 'udp6';
      for (const u of addon().udpSockets(family)) this.udpShutdown.set(BigInt(u.ino), u.shutdown);
      let text = '';
      try {
        text = readFileSync(`/proc/${this.pid}/net/${file}`, 'utf8');
      } catch {
        continue;
      }
      for (const line of text.split('\n').slice(1)) {
        const f = line.trim().split(/\s+/);
        if (f.length < 10) continue;
        this.udpTxQueue.set(BigInt(f[9]), parseInt(f[4].split(':')[0], 16));
      }
    }
  }

  /** What the tables say of UDP socket `ino` (`dup`), read again while
   * missing from either (see REREADS) if it is bound: one never bound is
   * in neither. */
  private udpOf(dup: number, ino: bigint): SeenUdp | undefined {
    this.loadUdp();
    // sin_port and sin6_port, both at byte 2, in network order.
    const bound = () => {
      const a = addon().sockName(dup);
      return a.length >= 4 && a.readUInt16BE(2) !== 0;
    };
    this.readAgainWhile('udp', () => !(this.udpTxQueue.has(ino) && this.udpShutdown.has(ino)) && bound(), () => this.readUdp());
    const txQueue = this.udpTxQueue.get(ino);
    return txQueue === undefined ? undefined : { txQueue, shutdown: this.udpShutdown.get(ino) ?? 0 };
  }

  /** What netlink_diag says of netlink socket `ino` (`dup`), read again
   * while missing (see REREADS) if it is bound: one never bound is not
   * in the table. */
  private netlinkOf(dup: number, ino: bigint): NetlinkSeen | undefined {
    this.netlink ??= netlinkTable();
    const table = this.netlink;
    this.readAgainWhile('netlink', () => !table.has(ino) && boundPortId(dup) !== 0, () => {
      for (const [k, v] of netlinkTable()) if (!table.has(k)) table.set(k, v);
    });
    return table.get(ino);
  }

  /** `read` again while `missing`, as long as this snapshot's rereads of
   * that kind's tables are below REREADS. */
  private readAgainWhile(kind: keyof SocketTable['rereads'], missing: () => boolean, read: () => void): void {
    while (this.rereads[kind] < REREADS && missing()) {
      this.rereads[kind]++;
      read();
    }
  }

  /** The duplicate of each socket asked about (by inode), until the dump
   * of its kind takes it (takeDup) or the table is closed: one copy of the
   * descriptor per socket, not one per question. */
  private readonly dups = new Map<bigint, number>();

  /** The TCP socket behind `fd` of `pid`, asked once; undefined for a
   * socket of another kind. */
  private tcpSocket(pid: number, fd: number, ino: bigint): (InetEntry & { backlog: number; neverConnected: boolean }) | undefined {
    const known = this.tcp.get(ino);
    if (known) return known;
    const dup = this.dupOf(pid, fd, ino);
    const { family, type } = addon().sockInfo(dup);
    if ((family !== AF_INET && family !== AF_INET6) || type !== SOCK_STREAM) return undefined;
    const endpoint = addon().tcpEndpoint(dup);
    // CLOSE is also where a connection that ended stays (unconnected.ts).
    const e = { family, ...endpoint, neverConnected: endpoint.state === TCP_CLOSE && neverConnected(dup) };
    this.tcp.set(ino, e);
    return e;
  }

  private dupOf(pid: number, fd: number, ino: bigint): number {
    let dup = this.dups.get(ino);
    if (dup === undefined) this.dups.set(ino, (dup = addon().getFd(pid, fd)));
    return dup;
  }

  /** The duplicate of socket `ino` made while asking about it, now the
   * caller's to close; undefined if none was made. */
  takeDup(ino: bigint): number | undefined {
    const dup = this.dups.get(ino);
    this.dups.delete(ino);
    return dup;
  }

  /** Closes the duplicates no dump took. */
  close(): void {
    for (const dup of this.dups.values()) closeSync(dup);
    this.dups.clear();
  }

  /** A TCP socket that is not listening (tcp.ts captures it), or undefined. */
  connection(pid: number, fd: number, ino: bigint): InetEntry | undefined {
    const e = this.tcpSocket(pid, fd, ino);
    return e && e.state !== TCP_LISTEN && !e.neverConnected ? { family: e.family, address: e.address, port: e.port, remote: e.remote, state: e.state } : undefined;
  }

  /** The socket behind `fd` of `pid`; throws Unsupported for what cannot
   * be captured. */
  describe(pid: number, fd: number, ino: bigint, what: string, seen: Notes = NOTHING_NOTED): Socket {
    const dup = this.takeDup(ino) ?? addon().getFd(pid, fd);
    try {
      return this.describeDup(pid, fd, dup, ino, what, seen);
    } finally {
      closeSync(dup);
    }
  }

  private describeDup(pid: number, fd: number, dup: number, ino: bigint, what: string, seen: NonNullable<TablesSnapshot['sockets']>): Socket {
    const opts = addon().sockInfo(dup);
    const base: Socket = {
      ino,
      family: opts.family,
      type: opts.type,
      address: '',
      port: 0,
      listening: opts.listening,
      backlog: 0,
      peerIno: 0n,
      queued: Buffer.alloc(0),
      reuseaddr: opts.reuseaddr,
      reuseport: opts.reuseport,
      v6only: opts.v6only,
    };
    // Options the application set beyond those above (sockopts.ts), for
    // the stream and record kinds made here; a filter of its own refused.
    const extras = (kind: SockKind, where: string) => {
      refuseOwnFilter(dup, where);
      return readExtras(dup, kind, opts.family, opts.type, BASE_OPTIONS, where);
    };
    if (opts.family === AF_UNIX) {
      const { u, d } = this.unixOf(ino);
      if (u && u.flags & SO_ACCEPTCON) {
        const where = `${what} fd ${fd}: the unix socket listening at ${u.path || '(unnamed)'}`;
        // A listener's receive queue holds the connections not yet
        // accepted (sock_diag's rqueue counts them): each is a socket the
        // kernel made, which nothing can read without accepting it (the
        // original left running would lose it) and a restore cannot make
        // again: the listener would come back without them, and their
        // clients connected to nothing. Refused; the retry finds them
        // accepted, as a server soon does.
        if (d?.rqueue) throw new Transient(`${where} has ${d.rqueue} connection${d.rqueue > 1 ? 's' : ''} not yet accepted, which cannot be captured yet`);
        refuseUnrecordedName(dup, where);
        const file = dumpSocketFile(pid, u.path, d, `${what} fd ${fd}`);
        // Whom its clients see as the server: it listens as that again.
        return { ...base, address: u.path, listening: true, backlog: d?.wqueue ?? 0, options: extras('unix-listen', where), ...(file ? { file } : {}), peerCred: peerCredOf(dup) };
      }
      if (opts.type === SOCK_DGRAM) return dumpUnixDgram(pid, fd, ino, d, what);
      const typeName = opts.type === SOCK_STREAM ? 'stream' : opts.type === SOCK_SEQPACKET ? 'seqpacket' : `type ${opts.type}`;
      if (!d?.peer && !opts.listening && unixUnconnected(u?.state)) {
        refuseUnrecordedName(dup, `${what} fd ${fd}: the unix ${typeName} socket bound to ${u?.path || '(unnamed)'}`);
        const file = dumpSocketFile(pid, u?.path ?? '', d, `${what} fd ${fd}`);
        const own = { ...base, address: u?.path ?? '', ...(file ? { file } : {}) };
        return { ...own, options: extras(optionKind(AF_UNIX), `${what} fd ${fd}: the ${unconnectedName(own)}`) };
      }
      // Connected, and its peer closed since: what it has not read, then
      // the end (the peer's close shut it down both ways).
      if (d && !d.peer && !opts.listening && u?.state === SS_CONNECTED) {
        const where = `${what} fd ${fd}: a unix ${typeName} socket whose peer is gone`;
        const options = extras('unix-stream', where);
        // Who its peer was, still (the kernel keeps it past the close).
        const peerCred = peerCredOf(dup);
        if (opts.type === SOCK_SEQPACKET) return { ...base, address: u.path, peerGone: true, datagrams: queuedMessages(dup, where, true), shutdown: d.shutdown, options, peerCred };
        if (opts.type !== SOCK_STREAM) throw new Unsupported(`${what} fd ${fd}: a unix socket of ${typeName} cannot be captured yet`);
        return { ...base, address: u.path, peerGone: true, ...(d.rqueue ? peekStream(dup, d.rqueue, where, true) : { queued: Buffer.alloc(0) }), shutdown: d.shutdown, options, peerCred };
      }
      if (!d?.peer) throw new Unsupported(`${what} fd ${fd}: a unix ${typeName} socket not connected to anything cannot be captured yet`);
      const options = extras('unix-stream', `${what} fd ${fd}: a connected unix ${typeName} socket`);
      // Who the kernel says its peer is (a server may decide by it what
      // the peer may do): its connection is made again with it (pairEnd).
      const peerCred = peerCredOf(dup);
      if (opts.type === SOCK_SEQPACKET) {
        // RCV_SHUTDOWN (1): its peer shut its side down.
        const datagrams = queuedMessages(dup, `${what} fd ${fd}: a unix seqpacket socket`, (d.shutdown & 1) !== 0);
        return { ...base, address: u?.path ?? '', peerIno: BigInt(d.peer), datagrams, shutdown: d.shutdown, options, peerCred };
      }
      if (opts.type !== SOCK_STREAM) throw new Unsupported(`${what} fd ${fd}: a unix socket of ${typeName} cannot be captured yet`);
      const { queued, datagrams } = d.rqueue ? peekStream(dup, d.rqueue, `${what} fd ${fd}: a connected unix stream socket`, (d.shutdown & 1) !== 0) : { queued: Buffer.alloc(0), datagrams: undefined };
      // Whether the peer is in the application is known only when every
      // process has been seen: the driver checks (checkUnixPeers).
      // Its shutdown state too (sk_shutdown, which shutdown() on either end
      // sets on both, mirrored): pairEnd shuts the new pair down alike.
      return { ...base, address: u?.path ?? '', peerIno: BigInt(d.peer), queued, ...(datagrams ? { datagrams } : {}), shutdown: d.shutdown, options, peerCred };
    }
    if ((opts.family === AF_INET || opts.family === AF_INET6) && opts.type === SOCK_DGRAM) {
      // A datagram socket of another protocol than UDP: a ping socket
      // (IPPROTO_ICMP, ICMPV6), UDP-Lite.
      const protocol = addon().getSockOpt(dup, SOL_SOCKET, SO_PROTOCOL);
      if (protocol !== IPPROTO_UDP)
        throw new Unsupported(`${what} fd ${fd}: ${DGRAM_PROTOCOLS.get(protocol) ?? `a datagram socket of IP protocol ${protocol}`} cannot be captured yet`);
      return dumpUdp(pid, fd, ino, opts.family, this.udpOf(dup, ino), what, seen);
    }
    if ((opts.family === AF_INET || opts.family === AF_INET6) && opts.type === SOCK_RAW) return dumpRaw(dup, base, `${what} fd ${fd}`);
    if (opts.family === AF_INET || opts.family === AF_INET6) {
      const e = opts.type === SOCK_STREAM ? this.tcpSocket(pid, fd, ino) : undefined;
      if (e && e.state === TCP_LISTEN) {
        const where = `${what} fd ${fd}: the TCP socket listening at ${e.address.includes(':') ? `[${e.address}]` : e.address}:${e.port}`;
        const options = extras('listen', where);
        noted(seen, ino, 'listen', e.port, opts.reuseport, options, where);
        return { ...base, address: e.address, port: e.port, listening: true, backlog: e.backlog, options };
      }
      if (e?.neverConnected) {
        const own = { ...base, address: e.address, port: e.port };
        return { ...own, options: extras(optionKind(opts.family), `${what} fd ${fd}: the ${unconnectedName(own)}`) };
      }
      throw new Unsupported(`${what} fd ${fd}: a ${opts.type === SOCK_STREAM ? 'non-listening TCP' : `type ${opts.type} IP`} socket cannot be captured yet`);
    }
    if (opts.family === AF_NETLINK) {
      return dumpNetlink(pid, fd, dup, ino, opts.type, this.netlinkOf(dup, ino), what);
    }
    throw new Unsupported(`${what} fd ${fd}: a socket of address family ${opts.family} cannot be captured yet`);
  }
}

/** A snapshot that ends the application offers the keeper its TCP
 * listeners (not those serve installed: serve keeps its own), which keeps
 * those with connections waiting to be accepted (SocketsForKeeper
 * addListener). `systemPid`: a virtual PID's process. */
export function offerListeners(ctx: DumpContext, systemPid: (vpid: number) => number): void {
  // --tcp-close: the connections are the application's to close, those
  // waiting to be accepted too.
  if (!ctx.keeper.keeping || ctx.tcp.closeConnections) return;
  for (const p of ctx.image.processes)
    for (const f of p.fds)
      if (f.kind === FdKind.TCP_LISTEN && f.socket && !f.socket.inherited) ctx.keeper.addListener(f.socket.ino, () => addon().getFd(systemPid(p.vpid), f.fd));
}

/** Every connected unix stream or seqpacket socket of the image has its
 * peer in the image too, or, connected to a process outside (a local
 * client of a server), is held by a keeper until the restore (keeper.ts):
 * then its queue stays in it rather than in the image. A datagram socket
 * connected to a name outside it is connected to that name again at
 * restore (unixdgram.ts). `systemPid`: a virtual PID's process. */
export function checkUnixPeers(ctx: DumpContext, systemPid: (vpid: number) => number): void {
  const sockets = ctx.image.processes.flatMap((p) =>
    p.fds
      .filter((f) => f.socket && (f.kind === FdKind.UNIX_SOCKET || f.kind === FdKind.UNIX_DGRAM))
      .map((f) => ({ p, fd: f.fd, socket: f.socket!, dgram: f.kind === FdKind.UNIX_DGRAM, where: `${nameProcess(p.vpid, p.comm)} fd ${f.fd}` })),
  );
  const inImage = new Set(sockets.map((s) => s.socket.ino));
  for (const s of sockets) {
    if (!s.socket.peerIno || inImage.has(s.socket.peerIno)) continue;
    const peerName = s.socket.peerAddress ?? '';
    if (s.dgram && peerName && !peerName.startsWith('/') && !peerName.startsWith('@'))
      throw new Unsupported(`${s.where}: a unix datagram socket connected to ${peerName}, a relative name outside the application: where it was bound cannot be known`);
    if (s.dgram && peerName && !peerName.startsWith('@') && s.p.root && s.p.root !== '/')
      throw new Unsupported(`${s.where}: a unix socket that names ${peerName} in a process whose root directory is ${s.p.root} (chroot): the name is resolved in that root, which the restore does not do`);
    if (s.dgram && s.socket.peerAddress) s.socket.peerIno = 0n;
    else if (s.dgram) throw new Unsupported(`${s.where}: a unix datagram socket connected to an unnamed socket outside the application cannot be captured (nothing to connect to again by name)`);
    else if (!ctx.keeper.keeping)
      throw new Unsupported(
        `${s.where}: a unix socket connected to a process outside the application is carried only by a snapshot that ends the application, to a restore on this host (not with --leave-running, --tcp-hold 0, or a state directory whose path is too long for a unix socket)`,
      );
    else {
      ctx.keeper.add(s.socket.ino, addon().getFd(systemPid(s.p.vpid), s.fd), true, true);
      Object.assign(s.socket, { kept: true, peerIno: 0n, queued: Buffer.alloc(0), datagrams: [] });
    }
  }
  // Who sent the messages the image carries (SO_PASSCRED), as the
  // application names them; only now, once those of a kept connection are
  // left in its socket: checked before, a connection to a server outside
  // was refused for the server's messages it never carries (review r294).
  for (const s of sockets) senderAsVirtual(s.socket, (sys) => ctx.virtual('pid', sys), s.where);
}

/** Once every process is seen: the notes of sockets that none of them
 * holds (closed since the preload library noted them) leave the tables,
 * whose room for notes is small (sockopts.ts). */
export function forgetClosedSockets(ctx: DumpContext): void {
  const held = ctx.image.processes.flatMap((p) =>
    p.fds.flatMap((f): HeldSocket[] => {
      if (f.tcp) return [{ ino: f.tcp.ino, kind: 'tcp', port: f.tcp.localPort, reuseport: false }];
      const s = f.socket;
      if (!s || (s.family !== AF_INET && s.family !== AF_INET6)) return [];
      return [{ ino: s.ino, kind: s.type === SOCK_DGRAM ? 'udp' : 'listen', port: s.port, reuseport: !!s.reuseport }];
    }),
  );
  forgetClosed(ctx.tablesPath, ctx.tables.sockets ?? NOTHING_NOTED, held, dnotifyInos(ctx.image), heldQueueInos(ctx));
}

/** Before anything is made: every socket the image says a keeper held is
 * held, for this image (a restore on another host, or after the keeper
 * gave up, cannot have it); and what the keeper hands over gives no
 * process more than it held (checkHandedOverPrivileges). */
export function requireKept(h: RestoreContext): void {
  const { image, kept } = h;
  for (const p of image.processes)
    for (const f of p.fds) {
      const what = f.socket?.kept
        ? 'a unix connection to a process outside the application'
        : f.tcp?.kept
          ? `the TCP connection ${connectionName(f.tcp)}, taken without TCP repair,`
          : undefined;
      const ino = f.socket?.kept ? f.socket.ino : f.tcp?.ino;
      if (what && ino !== undefined && kept.get(ino) === undefined)
        throw new AppshotError(
          `${nameProcess(p.vpid, p.comm)} fd ${f.fd}: ${what} was held by appshot-keeper on the host of the snapshot, and no keeper holds it now (it gave up after --tcp-hold, another image was restored, or this is another host)`,
          ExitCode.conflict,
        );
    }
  checkHandedOverPrivileges(h);
}

/** Every descriptor of each socket or TCP connection of the image, with
 * its process, by socket (`socket INO`) or connection (`connection INO`):
 * the holders the privilege rules weigh (a socket is made once, from its
 * first descriptor's record). */
function socketHolders(image: Image): Map<string, { p: Process; fd: Fd }[]> {
  const holders = new Map<string, { p: Process; fd: Fd }[]>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      const key = fd.socket ? `socket ${fd.socket.ino}` : fd.tcp ? `connection ${fd.tcp.ino}` : undefined;
      if (!key) continue;
      const list = holders.get(key);
      if (list) list.push({ p, fd });
      else holders.set(key, [{ p, fd }]);
    }
  return holders;
}

/**
 * The privilege rule for the sockets a keeper hands over (a connection,
 * kept live or in repair mode; a unix connection to a process outside; a
 * listener with connections waiting), before anything is made: the very
 * socket, with whatever options it has, which the image's record need
 * not say. A record of a connection kept live carries none, and one in
 * repair mode only those its dump read; but the socket may have SO_MARK,
 * IP_TRANSPARENT, SO_PRIORITY above 6, SO_DEBUG, a forced buffer (set by
 * the root application this user snapshotted), and a crafted image (the
 * real one's id, another node's key, --trust-image) could give it to a
 * process with no capability. So the options each socket has now are
 * read from it and weighed as recorded ones are (sockopts.ts
 * optionPrivilege): each only for a socket some process holding it in
 * the image held the capability, per holder (heldcaps.ts); this node's
 * own snapshot is taken at its word. Not the restorer: it sets none of
 * them. Refused, the restore fails and the keeper holds them again.
 */
function checkHandedOverPrivileges(h: RestoreContext): void {
  const image = h.image;
  if (vouchedFor(image)) return;
  for (const held of socketHolders(image).values()) {
    const { p, fd } = held[0];
    const handed = handedOver(h, fd);
    if (!handed) continue;
    const where = `${nameProcess(p.vpid, p.comm)} fd ${fd.fd}`;
    // A unix connection is its creator to the peer: SO_PEERCRED (euid,
    // egid) and SO_PEERGROUPS, taken at connect, on the peer's accepted
    // socket, where this side cannot read them (unix_diag's
    // UDIAG_SHOW_UID is the same inode uid as fstat). The socket's inode
    // owner, its creator's fsuid and fsgid at socket(), stands for them:
    // one process or thread holding it must have that uid among its
    // real, effective, saved or fs uids and that gid among its gids or
    // groups, or the daemon at the other end (docker.sock, a root-only
    // D-Bus, a `<policy group="adm">`) would take a process of another
    // user, or one that gave the group up, for the one that connected
    // (review r376 finding 2, r379 M1). A proxy: the supplementary
    // groups of the connector cannot be seen, and one that changed its
    // fsuid or euid between socket() and connect() is weighed as
    // socket() saw it; an honest image whose every holder dropped the
    // creator's ids is refused too (the strict side: a crafted image can
    // claim any holder's ids, so only this node's own snapshot, vouched
    // for above, is taken at its word).
    if (handed.kind === 'unix-stream') {
      const { uid, gid } = fstatSync(handed.sock);
      const creds = held.flatMap((holder) => [holder.p.creds, ...holder.p.threads.map((t) => t.creds)]);
      if (!creds.some((c) => c && c.uid.includes(uid) && (c.gid.includes(gid) || c.groups.includes(gid))))
        throw new AppshotError(
          `${where}: ${handed.what} was created by uid ${uid} gid ${gid}, which no process holding it had both of: handed over by this restore, the process at the other end would take the application for uid ${uid} gid ${gid}`,
          ExitCode.denied,
        );
    }
    let live: SocketOption[];
    try {
      live = readExtras(handed.sock, handed.kind, handed.family, handed.type, [], `${where}: ${handed.what}`);
    } catch (e) {
      throw new AppshotError(`${where}: the options of ${handed.what} cannot be read: ${(e as Error).message}`);
    }
    for (const o of live) {
      const need = optionPrivilege(o);
      if (need && !held.some((holder) => processMay(holder.p, need.caps)))
        throw new AppshotError(
          `${where}: option ${need.what} of ${handed.what} needs ${capNames(need.caps)}, which no process holding the socket had: handed over by this restore, it would give the application more than it held`,
          ExitCode.denied,
        );
    }
  }
}

/** The socket a keeper holds that the restore hands over for `fd` (the
 * first of its descriptors), as the restore decides it (tcp.ts
 * ConnectionMaker.open, openSocket): its kind and family as the catalogue
 * reads its options, and how messages name it. */
function handedOver(h: RestoreContext, fd: Fd): { sock: number; kind: SockKind; family: number; type: number; what: string } | undefined {
  const kept = h.kept;
  const c = fd.tcp;
  if (c && !c.closed) {
    const sock = kept.get(c.ino);
    return sock === undefined ? undefined : { sock, kind: 'tcp', family: c.family, type: SOCK_STREAM, what: `the socket appshot-keeper holds as the TCP connection ${connectionName(c)}` };
  }
  const s = fd.socket;
  if (!s) return undefined;
  const sock = kept.get(s.ino);
  if (sock === undefined) return undefined;
  if (s.kept) return { sock, kind: 'unix-stream', family: AF_UNIX, type: s.type, what: 'the unix connection to a process outside the application appshot-keeper holds' };
  const listener = heldListener(h, s, fd);
  if (listener !== undefined) return { sock: listener, kind: 'listen', family: s.family, type: SOCK_STREAM, what: `the TCP listener on port ${s.port} appshot-keeper holds` };
  return undefined;
}

/** The socket `ino`, if it is one the caller installed and keeps
 * (DumpContext.inherited): recorded by its key, as the application's own
 * listener it stands for (its address, port and backlog), with the
 * options the socket has now (`live`: describe() of it): those the
 * restore gave it from the application's image (inheritedEnd), and any
 * the application set on it since. A restore that makes the application's
 * listener again (a plain one, or serve forwarding) makes it so. */
export function inheritedSocket(ctx: DumpContext, ino: bigint, live: () => Socket): Socket | undefined {
  const l = ctx.inherited.get(ino);
  if (!l) return undefined;
  const now = live();
  return {
    ino,
    family: l.family,
    type: SOCK_STREAM,
    address: l.address,
    port: l.port,
    listening: true,
    // The application's, as recorded: the socket's own is the caller's
    // longer one (asApplicationListener).
    backlog: l.backlog,
    peerIno: 0n,
    queued: Buffer.alloc(0),
    reuseaddr: l.reuseaddr,
    reuseport: false,
    v6only: l.v6only,
    inherited: l.key,
    ...withBindOptions(now.options ?? [], l.bindOptions ?? []),
  };
}

/** The options of listener record `s` that decide its bind: those a
 * caller's socket, bound already, is not given (asApplicationListener),
 * kept by the caller to be recorded again (InheritedListener.bindOptions). */
export function bindOptions(s: Socket): Socket['options'] & object {
  const options = s.options ?? [];
  let early: { level: number; name: number }[];
  try {
    early = earlyBytes(options, BASE_OPTIONS, 'a listener');
  } catch {
    return [];
  }
  return options.filter((o) => early.some((e) => e.level === o.level && e.name === o.name));
}

/** `live`, the options a caller's socket has, with the application's
 * `bind` ones (which it could not be given) in place of any of the same. */
function withBindOptions(live: NonNullable<Socket['options']>, bind: NonNullable<Socket['options']>): Pick<Socket, 'options'> {
  const all = [...live.filter((o) => !bind.some((b) => b.level === o.level && b.name === o.name)), ...bind];
  return all.length ? { options: all } : {};
}

/** Before anything is made: every inherited socket of the image has a
 * descriptor handed for its key, or is to be made as the application's
 * own listener again (`ownAgain`, or every one when the caller hands none:
 * a plain restore of an image taken under `appshot serve` gets its own
 * listener back, bound to its port with its options). One naming a key a
 * caller that hands some was not given is refused (an image is untrusted:
 * whoever wrote it). */
export function requireInherited(image: Image, given: ReadonlyMap<string, number>, ownAgain: ReadonlySet<string>): void {
  if (!given.size) return;
  for (const p of image.processes)
    for (const f of p.fds) {
      const key = f.socket?.inherited;
      if (!key || given.has(key) || ownAgain.has(key)) continue;
      // (A key is well formed here: validate.ts refused any other.)
      throw new AppshotError(
        `${nameProcess(p.vpid, p.comm)} fd ${f.fd}: the image names the listener inherited from '${key}', which only the service that snapshotted it (appshot serve) can hand to its restore; this one was handed ${[...given.keys()].map((k) => `'${k}'`).join(', ')}, not it`,
        ExitCode.conflict,
      );
    }
}

/* ---- restore ---------------------------------------------------------- */

/** The key of the caller's listener this restore installs for the
 * listener `s` (inheritedEnd), if it installs one. Not for an inherited
 * record the caller hands nothing for (a plain restore) or whose listener
 * it has made as the application's own again: that one is made, or taken
 * from a keeper (heldListener), like any other. */
function callerListenerKey(h: RestoreContext, s: Socket, fd: Fd): string | undefined {
  if (fd.kind !== FdKind.TCP_LISTEN) return undefined;
  const at = h.inheritAt;
  const key = s.inherited || (at && !h.plan && s.family === at.family && virtualPort(h.image, s.port) === at.port ? at.key : undefined);
  if (!key || (!h.inherit.has(key) && (h.ownListeners.has(key) || !h.inherit.size))) return undefined;
  return key;
}

/** The listener a keeper holds that this restore takes for `s`
 * (openSocket), with the connections waiting in its queue: not when the
 * caller's is installed instead, and only if it is that listener (the
 * inode and the image's id are an image's word, review35a; the socket's
 * own state and port are not). The one answer both openSocket and the
 * privilege check (handedOver) use, so that what is handed over is what
 * was weighed, whatever the record says of itself (`inherited`). */
function heldListener(h: RestoreContext, s: Socket, fd: Fd): number | undefined {
  if (fd.kind !== FdKind.TCP_LISTEN || h.plan || callerListenerKey(h, s, fd) !== undefined) return undefined;
  const held = h.kept.get(s.ino);
  return held !== undefined && isListenerAt(held, s) ? held : undefined;
}

/** The caller's descriptor for this listener, if it is to be installed
 * rather than made: one the image names as inherited, or the ordinary
 * listener at the port the caller asked to put its own in place of
 * (RestoreContext.inheritAt). Never kept (closed) here: it is the
 * caller's. Its status flags are the open file's, shared with the caller:
 * set to the application's, which serve, not accepting on it while the
 * instance exists, does not mind. */
function inheritedEnd(h: RestoreContext, s: Socket, fd: Fd): number | undefined {
  const key = callerListenerKey(h, s, fd);
  if (key === undefined) return undefined;
  const given = h.inherit.get(key);
  if (given === undefined) throw new AppshotError(`fd ${fd.fd}: the listener inherited from '${key}' was not handed to the restore`, ExitCode.conflict);
  addon().setStatusFlags(given, fd.flags);
  asApplicationListener(h, given, s, `fd ${fd.fd}: the listener inherited from '${key}'`, !h.inheritGiven.has(key));
  return given;
}

/**
 * The caller's listener given the application's own listener's options
 * and backlog, as the image recorded them: the kernel copies a listener's
 * options into every socket it accepts (TCP_NODELAY, SO_KEEPALIVE and its
 * timers, locked buffer sizes, ...), and a listener's own (TCP_DEFER_ACCEPT,
 * TCP_FASTOPEN, ...) decide what it accepts, so the application must find
 * its own there, not the caller's. Once per restore, however many
 * descriptors share it. Those that decide a bind (SO_BINDTODEVICE,
 * IP_FREEBIND, ...) are not set: the caller's socket is bound already,
 * where the caller chose (the caller keeps them, to be recorded again:
 * InheritedListener.bindOptions). listen() again only changes the backlog.
 */
function asApplicationListener(h: RestoreContext, sock: number, s: Socket, where: string, reset: boolean): void {
  h.once(`inherited ${s.ino}`, () => {
    // Never a shorter queue than the caller's: its clients wait there
    // while the restore runs (serve's 4096 against redis's 511, python's
    // 5), and a SYN past the backlog is dropped (retried after a second).
    // What cannot be given back a fresh socket's value is the same here as
    // when serve gave the image's options to it ahead of the restore
    // (SharedListener.takeOwnOptions), which logged it; given them just
    // so (`reset` false: RestoreContext.inheritGiven), nothing to give back.
    // Without that (serve had not read the image before the restore, or
    // the options moved since), the restore's result says so.
    h.notKept.push(...applyListenerOptions(sock, s, where, addon().tcpEndpoint(sock).backlog, reset));
    return sock;
  });
}

/** Gives the caller's listening socket `sock` the options and backlog of
 * the application's listener `s` (an image's record of it), as
 * asApplicationListener does: for `appshot serve`, which gives them its
 * public listener as soon as it has read the image, so that connections
 * waiting in its queue before a restore are made with them too (the
 * kernel copies a listener's options into a connection when its handshake
 * completes, not when it is accepted).
 *
 * The socket outlives the images it is given (serve's, one restore after
 * another): an option an earlier image gave it, or its application set on
 * it after its image was taken (then crashed, restored from that image),
 * that `s` does not carry goes back to a fresh socket's value first
 * (resetExtras), or the next application and every connection queued for
 * it would have it (`reset` false: the caller knows it has none). Returns
 * what could not be given back (resetExtras), one line each. */
export function applyListenerOptions(sock: number, s: Socket, where: string, minBacklog = 0, reset = true): string[] {
  check(s, 'listen', where);
  const stale = reset ? resetListenerOptions(sock, where, s.options ?? []) : [];
  applyExtras(sock, s.options ?? [], BASE_OPTIONS, false, where);
  const backlog = Math.max(s.backlog, minBacklog);
  try {
    if (backlog > 0) addon().listenNow(sock, backlog, true);
  } catch (e) {
    throw new AppshotError(`${where}: its backlog (${backlog}) cannot be set: ${(e as Error).message}`);
  }
  return stale;
}

/** Gives the caller's listening socket `sock` back a fresh socket's value
 * of every option it carries but those of `keep` (resetExtras):
 * applyListenerOptions first, and serve's listener whose next image is
 * not read yet (after the instance that held it crashed), keeping none.
 * Returns what cannot be, one line each. */
export function resetListenerOptions(sock: number, where: string, keep: SocketOption[] = []): string[] {
  const { family, type } = addon().sockInfo(sock);
  return resetExtras(sock, 'listen', family, type, keep, BASE_OPTIONS, where);
}

/** Our descriptor for a listening socket or an end of a unix socket pair.
 * `listenIn`: a unix listener is bound here and listens there (by the
 * process that had listened: peermaker.ts), not here with its peerCred. */
export function openSocket(h: RestoreContext, p: Process, fd: Fd, listenIn?: (sock: number) => void): number {
  const s = fd.socket!;
  if (s.kept) return keptEnd(h, s, fd);
  if (s.peerGone) return loneEnd(h, s, fd);
  if (!s.listening) return pairEnd(h, s, fd);
  const inherited = inheritedEnd(h, s, fd);
  if (inherited !== undefined) {
    if (fd.kind === FdKind.TCP_LISTEN) h.tcp.ownListener(inherited);
    return inherited;
  }
  return h.once(`socket ${s.ino}`, () => {
    // The very listener, with the connections that waited in its queue
    // when the application ended, if a keeper held it (keeper.ts
    // addListener): options, backlog and queue all as they were. Ours
    // is KeptSockets' to close.
    const held = heldListener(h, s, fd);
    if (held !== undefined) {
      addon().setStatusFlags(held, fd.flags);
      h.tcp.ownListener(held);
      return held;
    }
    const address = fd.kind === FdKind.TCP_LISTEN ? listenAddress(h, s) : s;
    // A unix listener's file is made as its process would (fsident.ts).
    const as = socketFileIdentities(h.image, s.ino, s.address, s.file?.base);
    // A unix listener's file left behind by the ended original goes; one
    // where a live socket listens (the original, still running) is a
    // conflict, named.
    if (fd.kind === FdKind.UNIX_SOCKET) clearSocketFile(h, s.address, s.file, `process ${p.vpid} fd ${fd.fd}`, as);
    const where = `process ${p.vpid} fd ${fd.fd}: the socket listening at ${s.address}${fd.kind === FdKind.TCP_LISTEN ? `:${address.port}` : ''}`;
    check(s, fd.kind === FdKind.TCP_LISTEN ? 'listen' : 'unix-listen', where);
    // A held clone's listener on the shared port listens once it is let go.
    const later = h.listenAtRelease && fd.kind === FdKind.TCP_LISTEN && address !== s && address.reuseport;
    let sock: number;
    try {
      const elsewhere = fd.kind === FdKind.UNIX_SOCKET && listenIn !== undefined;
      sock = h.keep(addon().listenSocket({ ...address, peerCred: fd.kind === FdKind.UNIX_SOCKET && !elsewhere ? peerFor(h, s) : null, owner: ownerFor(h, p, fd) ?? null, early: earlyBytes(s.options ?? [], BASE_OPTIONS, where), ...(later || elsewhere ? { listen: false } : {}), ...(s.file?.base ? { dir: s.file.base } : {}), ...(fd.kind === FdKind.UNIX_SOCKET ? { as } : {}) }));
      if (later) h.listenLater(sock, address.backlog, address.reuseaddr);
      if (elsewhere) listenIn(sock);
    } catch (e) {
      if (e instanceof AppshotError) throw e;
      // Shared only among sockets that all ask for it: the template's
      // own application, say, did not.
      const hint = h.plan && address.reuseport && address !== s ? " (a multiplexed port is shared only with instances of a template: something else holds it, the template's own application still running?)" : '';
      throw new AppshotError(`process ${p.vpid} fd ${fd.fd}: ${(e as Error).message}${hint}`, ExitCode.conflict);
    }
    if (fd.kind === FdKind.UNIX_SOCKET) restoreSocketFile(h, sock, s.address, s.file, `process ${p.vpid} fd ${fd.fd}`, as);
    // Its accepted connections, made later, may share its port (tcp.ts).
    else h.tcp.ownListener(sock);
    applyExtras(sock, s.options ?? [], BASE_OPTIONS, false, where);
    addon().setStatusFlags(sock, fd.flags);
    return sock;
  });
}

/** Whether `sock` is a TCP socket listening on `s`'s family and port. */
function isListenerAt(sock: number, s: Socket): boolean {
  try {
    const e = addon().tcpEndpoint(sock);
    return e.state === TCP_LISTEN_STATE && e.port === s.port && addon().sockInfo(sock).family === s.family;
  } catch {
    return false;
  }
}

/** TCP_LISTEN in TCP_INFO's tcpi_state. */
const TCP_LISTEN_STATE = 10;

/** A TCP listener of a clone: on its own allocated port, or on the
 * well-known one shared with the other instances (SO_REUSEPORT lets the
 * kernel spread connections among them: multiplexing). */
function listenAddress(h: RestoreContext, s: Socket): Socket {
  if (!h.plan) return s;
  const asked = virtualPort(h.image, s.port);
  const own = h.plan.ports.get(asked);
  if (own !== undefined) return { ...s, port: own };
  if (h.plan.action(verdictRef.port(asked)) === 'multiplex') return { ...s, port: asked, reuseport: true };
  return s;
}

/** A connection to a process outside the application: the very socket,
 * which a keeper held since the snapshot (requireKept checked it is).
 * Only if it is a connected unix socket of the recorded type: the inode
 * and the image's id that select it are an image's word, and a keeper
 * also holds TCP connections and listeners, which the privilege rule
 * weighs only as TCP records (checkSocketPrivileges): a crafted image
 * would otherwise hand a process without CAP_NET_BIND_SERVICE a socket
 * bound to a privileged port (review r369). The restore then fails, and
 * the keeper holds the socket again (KeptSockets.abandon). */
function keptEnd(h: RestoreContext, s: Socket, fd: Fd): number {
  const sock = h.kept.get(s.ino);
  if (sock === undefined) throw new AppshotError(`fd ${fd.fd}: a unix connection held by appshot-keeper is not held`);
  let live: { family: number; type: number; listening: boolean } | undefined;
  try {
    live = addon().sockInfo(sock);
  } catch {
    /* unreadable: not the socket */
  }
  if (!live || live.family !== AF_UNIX || live.type !== s.type || live.listening)
    throw new AppshotError(
      `fd ${fd.fd}: the socket appshot-keeper holds as a unix connection (inode ${s.ino}) is ${live ? `a ${live.listening ? 'listening ' : ''}socket of family ${live.family} and type ${live.type}` : 'unreadable'}: the image's record of it is not the socket`,
    );
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

/**
 * The credentials a socket's end is made with (peercred.c): those the
 * kernel had recorded for its peer, if this user may take them and, from
 * an image this node did not snapshot, some thread of the image has them
 * (the kernel would vouch for that identity to whoever is handed the
 * end). Else the holding process's effective ids and groups, if this user
 * may take those, else appshot's own (null), and the restore says so
 * (notKept). Older images recorded none: null, as before.
 */
export function peerFor(h: RestoreContext, s: Socket): PeerCred | null {
  const c = s.peerCred;
  if (!c) return null;
  const own = ownCreds();
  const why = strangeOwner(h.image, c.uid, [c.gid, ...c.groups]) ?? peerCredRefusal(c, own);
  if (!why) return c;
  // The first process that holds it, and its descriptor, for the message.
  const p = h.image.processes.find((q) => q.fds.some((f) => f.socket?.ino === s.ino));
  const fd = p?.fds.find((f) => f.socket?.ino === s.ino);
  const k = p ? (p.threads[0]?.creds ?? p.creds) : undefined;
  const holder = k ? { uid: k.uid[1], gid: k.gid[1], groups: k.groups } : undefined;
  const instead = holder && !peerCredRefusal(holder, own) ? holder : null;
  const what = s.listening ? 'a unix listener that listened as' : 'a unix socket whose peer was';
  h.notKept.push(`process ${p?.vpid ?? '?'} fd ${fd?.fd ?? '?'}: ${what} uid ${c.uid} gid ${c.gid} is now ${instead ? `uid ${instead.uid} gid ${instead.gid}'s, its process's` : "appshot's"} (${why})`);
  return instead;
}

/** One end of a unix socket pair (or of a connection between two of the
 * application's processes), made with its peer the first time either is
 * asked for. What was queued for an end is written into the other. */
function pairEnd(h: RestoreContext, s: Socket, fd: Fd): number {
  const end = h.once(`socket ${s.ino}`, () => {
    const peer = h.image.processes.flatMap((p) => p.fds).find((f) => f.socket?.ino === s.peerIno)?.socket;
    if (!peer) throw new AppshotError(`fd ${fd.fd}: the image lacks the other end of a unix socket`);
    // Each end sees the peer it saw (peerFor), made by the process it saw
    // if that is one of the application's (peermaker.ts).
    const inside = h.peek<[number, number]>(`made inside ${s.ino}`);
    const [a, b] = inside ?? addon().socketPairAs(s.type, peerFor(h, s), peerFor(h, peer));
    if (!inside) {
      h.keep(a);
      h.keep(b);
    }
    h.ownerAfter.add(a).add(b);
    if (s.queued.length) fillQueue(b, s.queued, `fd ${fd.fd}: a connected unix socket`);
    if (peer.queued.length) fillQueue(a, peer.queued, `fd ${fd.fd}: a connected unix socket's peer`);
    // Seqpacket records, each whole, and a stream's runs, each from who
    // sent it (sentAs).
    fillRecords(h, b, s, `fd ${fd.fd}: a connected unix socket`);
    fillRecords(h, a, peer, `fd ${fd.fd}: a connected unix socket's peer`);
    // After the queues: a peek offset set before would skip bytes, a
    // small buffer would not take them.
    check(s, 'unix-stream', `fd ${fd.fd}: a connected unix socket`);
    check(peer, 'unix-stream', `fd ${fd.fd}: a connected unix socket's peer`);
    applyExtras(a, s.options ?? [], BASE_OPTIONS, false, `fd ${fd.fd}: a connected unix socket`);
    applyExtras(b, peer.options ?? [], BASE_OPTIONS, false, `fd ${fd.fd}: a connected unix socket's peer`);
    shut(a, s.shutdown ?? 0);
    shut(b, peer.shutdown ?? 0);
    h.remember(`socket ${peer.ino}`, b);
    return a;
  });
  addon().setStatusFlags(end, fd.flags);
  return end;
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_SNDBUFFORCE = 32;
/** The buffer sizes' lock bits (Linux 5.14): which sizes are fixed. */
const SO_BUF_LOCK = 72;
const O_RDWR = 0o2;
const O_NONBLOCK = 0o4000;

/**
 * Writes what was queued for an end into it through `sock`, the other end
 * of ours, without ever blocking: an image may say any size, and a write
 * the socket does not take would hang the restorer (the resident engine,
 * and every command of its user with it: found by fuzzing). The sender's
 * buffer is made room for first (what the application had in flight fit
 * its own), then put back; what still does not fit is refused in one line.
 */
/** What was queued for `s` as messages (a seqpacket's records; a stream
 * that passes credentials: its writers' runs), written to it through
 * `sock`, its other end, each as its sender sent it (sentAs). A stream's
 * runs with the room fillQueue makes for bytes (a send must not stop
 * part way). */
function fillRecords(h: RestoreContext, sock: number, s: Socket, where: string): void {
  const records = s.datagrams ?? [];
  if (!records.length) return;
  const send = () => {
    for (const d of records) sentAs(h, d, where, (creds) => addon().sockSend(sock, d.data, null, creds));
  };
  if (s.type === SOCK_STREAM) withRoom(sock, records.reduce((n, d) => n + d.data.length, 0), send);
  else send();
}

function fillQueue(sock: number, bytes: Buffer, where: string): void {
  withRoom(sock, bytes.length, () => {
    const done = writeWhatFits(sock, bytes);
    if (done < bytes.length) throw new AppshotError(`${where}: ${bytes.length} bytes were queued in it, more than it takes here (${done} did)`);
  });
}

/** `write` run with `sock`'s send buffer made room for `length` bytes,
 * non-blocking; its buffer size put back after, and its lock bits: the
 * setsockopt that puts the size back fixes it too, as the application's
 * own would, and a later snapshot would record SO_BUF_LOCK the
 * application never set (tcp.ts ownBufferLocks, for the same reason). */
function withRoom(sock: number, length: number, write: () => void): void {
  const before = addon().getSockOpt(sock, SOL_SOCKET, SO_SNDBUF);
  let locksBefore: number | undefined;
  try {
    locksBefore = addon().getSockOpt(sock, SOL_SOCKET, SO_BUF_LOCK);
  } catch {
    /* before Linux 5.14: a bit cannot be given back, left set */
  }
  // The kernel doubles what it is asked, and counts its own overhead.
  const room = Math.min(length * 2 + 65536, 0x3fffffff);
  try {
    addon().setSockOpt(sock, SOL_SOCKET, SO_SNDBUFFORCE, room);
  } catch {
    addon().setSockOpt(sock, SOL_SOCKET, SO_SNDBUF, room); // capped by wmem_max without CAP_NET_ADMIN
  }
  addon().setStatusFlags(sock, O_RDWR | O_NONBLOCK);
  write();
  addon().setStatusFlags(sock, O_RDWR);
  // Put back: the kernel reports twice what was set.
  try {
    addon().setSockOpt(sock, SOL_SOCKET, SO_SNDBUFFORCE, Math.floor(before / 2));
  } catch {
    addon().setSockOpt(sock, SOL_SOCKET, SO_SNDBUF, Math.floor(before / 2));
  }
  if (locksBefore !== undefined) addon().setSockOpt(sock, SOL_SOCKET, SO_BUF_LOCK, locksBefore);
}

/** A unix socket whose peer is gone: one end of a new pair, given what
 * it had not read through the other end, which is then closed, as its
 * peer was (the close shuts it down both ways, as before). */
function loneEnd(h: RestoreContext, s: Socket, fd: Fd): number {
  const end = h.once(`socket ${s.ino}`, () => {
    const where = `fd ${fd.fd}: a unix socket whose peer is gone`;
    check(s, 'unix-stream', where);
    const inside = h.peek<[number, number]>(`made inside ${s.ino}`);
    const [a, b] = inside ?? addon().socketPairAs(s.type, peerFor(h, s), null);
    if (!inside) h.keep(a);
    h.ownerAfter.add(a);
    try {
      if (s.queued.length) fillQueue(b, s.queued, where);
      fillRecords(h, b, s, where);
    } finally {
      if (inside) h.release([b]);
      else closeSync(b);
    }
    applyExtras(a, s.options ?? [], BASE_OPTIONS, false, where);
    shut(a, s.shutdown ?? 0);
    return a;
  });
  addon().setStatusFlags(end, fd.flags);
  return end;
}

/** An image may come from anyone: only the catalogue's options, well formed. */
function check(s: Socket, kind: SockKind, where: string): void {
  for (const o of s.options ?? [])
    if (!isCarriedExtra(kind, s.family, BASE_OPTIONS, o)) throw new AppshotError(`corrupt image: ${where} carries socket option ${o.level}/${o.name}, which appshot does not set`);
}

/** A unix name /proc/net/unix cannot show as it is (a NUL inside an
 * abstract name shows as "@", bytes that are not UTF-8), which a restore
 * would bind as another name: refused, by what getsockname answers. */
function refuseUnrecordedName(dup: number, where: string): void {
  const problem = unixNameProblem(addon().sockName(dup), true);
  if (problem) throw new Unsupported(`${where}: ${problem}, which cannot be captured yet`);
}

/* ---- the privilege rule ------------------------------------------------- */

/** The lowest port anyone may bind (net.ipv4.ip_unprivileged_port_start,
 * per network namespace: the restorer's, where the sockets are made). */
function unprivilegedPortStart(): number {
  try {
    return Number(readFileSync('/proc/sys/net/ipv4/ip_unprivileged_port_start', 'utf8').trim());
  } catch {
    return 1024;
  }
}

/**
 * The largest buffer the kernel gives a TCP socket of a process without
 * CAP_NET_ADMIN, receiving (`rmem`) or sending (`wmem`): what its own
 * tuning grows one to (net.ipv4.tcp_rmem's or tcp_wmem's maximum), or
 * twice what setsockopt lets anyone ask for (net.core.rmem_max or
 * wmem_max), whichever is larger; a queue is held within its buffer.
 * Read from the restorer's network namespace, where the sockets are made.
 */
function unprivilegedBuffer(which: 'rmem' | 'wmem'): { bytes: number; why: string } {
  const read = (path: string) => {
    try {
      return readFileSync(path, 'utf8').trim().split(/\s+/).map(Number);
    } catch {
      return [0];
    }
  };
  const tuned = read(`/proc/sys/net/ipv4/tcp_${which}`)[2] ?? 0;
  const asked = 2 * (read(`/proc/sys/net/core/${which}_max`)[0] ?? 0);
  return tuned >= asked ? { bytes: tuned, why: `net.ipv4.tcp_${which}'s maximum` } : { bytes: asked, why: `twice net.core.${which}_max` };
}

/**
 * The privilege rule for sockets, before anything is made. What the
 * restorer (its engine, root) makes with its own rights and the kernel
 * lets only a capability make: a socket bound to a port below
 * net.ipv4.ip_unprivileged_port_start (CAP_NET_BIND_SERVICE) — a TCP
 * listener, a UDP socket, a TCP socket bound and not listening, an
 * established connection's local port (bound in repair mode: a
 * privileged source port, which peers may trust) unless a listener of
 * the image has that address and port (accepted from it: the listener
 * is weighed), and so a live one a keeper holds (kept), whose holders
 * only are weighed: the restore hands over the very socket, which must
 * be bound as recorded (tcp.ts requireHeldAs), and binds nothing;
 * a raw socket (CAP_NET_RAW); a netlink socket connected to a port id or
 * group, or in a group only CAP_NET_ADMIN joins (netlink.ts
 * netlinkPrivileges); each option only a capability sets (sockopts.ts
 * optionPrivilege: SO_MARK, IP_TRANSPARENT, SO_PRIORITY above 6,
 * SO_DEBUG, a buffer size beyond the sysctl's, a congestion control not
 * allowed everyone, NETLINK_LISTEN_ALL_NSID), a connection's too; a
 * connection's queue larger than any buffer of a socket without
 * CAP_NET_ADMIN holds (unprivilegedBuffer: the restore raises its
 * buffers to hold it with SO_*BUFFORCE, as for the option). Each
 * only for a socket some process holding it in the image held the
 * capability (in its effective or permitted set: heldcaps.ts, per
 * holder; this node's own snapshot is taken at its word), and only by a
 * restore that has it (else the kernel would refuse it half-way).
 * Every descriptor of a socket carries the same record of it
 * (validate.ts checkSharedSockets): the first is the one made.
 * `capEff`: the restorer's effective set.
 */
export function checkSocketPrivileges(image: Image, capEff: bigint): void {
  const holders = socketHolders(image);
  const listeners = image.processes.flatMap((p) => p.fds.flatMap((fd) => (fd.kind === FdKind.TCP_LISTEN && fd.socket ? [fd.socket] : [])));
  const lowest = unprivilegedPortStart();
  const vouched = vouchedFor(image);
  for (const held of holders.values()) {
    const { p, fd } = held[0];
    // `held`: a socket a keeper holds (tcp.ts requireHeldAs: as recorded),
    // which the restore binds nothing for: only its holders are weighed.
    const needs: { caps: number[]; what: string; held?: boolean }[] = [];
    const port = (what: string, n: number) => {
      if (n > 0 && n < lowest) needs.push({ caps: [CAP_NET_BIND_SERVICE], what: `${what} on port ${n}` });
    };
    const options = (list: readonly SocketOption[]) => {
      for (const o of list) {
        const need = optionPrivilege(o);
        if (need) needs.push({ caps: need.caps, what: `option ${need.what}` });
      }
    };
    const s = fd.socket;
    if (s) {
      if (fd.kind === FdKind.TCP_LISTEN) port('a TCP listener', s.port);
      else if (fd.kind === FdKind.UDP) port('a UDP socket', s.port);
      else if (fd.kind === FdKind.UNCONNECTED_STREAM && s.family !== AF_UNIX) port('a TCP socket (bound, not listening)', s.port);
      else if (fd.kind === FdKind.RAW) needs.push({ caps: [CAP_NET_RAW], what: `a ${rawName(s)}` });
      else if (fd.kind === FdKind.NETLINK && s.netlink) needs.push(...netlinkPrivileges(s.netlink));
      options(s.options ?? []);
    } else if (fd.tcp && !fd.tcp.closed) {
      const c = fd.tcp;
      const accepted = listeners.some((l) => l.port === c.localPort && (l.address === c.localAddress || l.address === '0.0.0.0' || l.address === '::'));
      if (!accepted && c.localPort > 0 && c.localPort < lowest)
        needs.push({ caps: [CAP_NET_BIND_SERVICE], what: `the TCP connection ${connectionName(c)} from port ${c.localPort}`, held: c.kept });
      options(c.socketOptions ?? []);
      // Its queues are refilled into buffers raised to hold them
      // (tcp_repair.c make_room, SO_*BUFFORCE): a queue no buffer of a
      // socket without CAP_NET_ADMIN holds is one the image's process
      // could only have had with it. (A kept one is handed over, queues
      // and all, and its record has none.)
      if (!c.kept)
        for (const q of [
          { name: 'receive', bytes: c.recvQueue.length, max: unprivilegedBuffer('rmem') },
          { name: 'send', bytes: c.sendQueue.length, max: unprivilegedBuffer('wmem') },
        ])
          if (q.bytes > q.max.bytes)
            needs.push({ caps: [CAP_NET_ADMIN], what: `the TCP connection ${connectionName(c)}'s ${q.name} queue of ${q.bytes} bytes (more than a buffer without CAP_NET_ADMIN holds: ${q.max.bytes}, ${q.max.why})` });
    }
    for (const need of needs) {
      const where = `${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: ${need.what} needs ${capNames(need.caps)}`;
      if (!vouched && !held.some((h) => processMay(h.p, need.caps)))
        throw new AppshotError(
          `${where}, which no process holding the socket had: ${need.held ? 'handed over by this restore' : 'made by this restore'}, it would give the application more than it held`,
          ExitCode.denied,
        );
      if (!need.held && !restorerMay(capEff, need.caps)) throw new AppshotError(`${where}, which this restore does not have`, ExitCode.denied);
    }
  }
}
