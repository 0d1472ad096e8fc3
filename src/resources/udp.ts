/**
 * UDP sockets (IPv4 and IPv6): unbound, bound to an address and port,
 * connected to a peer; their options (SO_REUSEADDR, SO_REUSEPORT,
 * SO_BROADCAST, buffer sizes, IP_TOS and IP_TTL or their IPv6 twins,
 * IPV6_V6ONLY, packet-info delivery, UDP_CORK, the multicast TTL or hop
 * limit and loopback, IP_MULTICAST_ALL) and shutdown state; and the
 * datagrams queued for reading, whole and in order, each with its sender's
 * address and port.
 *
 * Dump: the receive queue is read without consuming it (SO_PEEK_OFF with
 * MSG_PEEK). The send queue of UDP is empty but for a corked socket
 * (UDP_CORK) holding a datagram it is still building: refused by name.
 *
 * Restore, in appshot's process, once per socket: made, options set, bound
 * to its address and port (a port something else holds fails the restore,
 * by name: the original still running beside its copy, say); its queued
 * datagrams sent to it again through a raw socket (CAP_NET_RAW) as built
 * by their original senders, so that recvfrom() sees who sent each (to
 * the socket's own address, or loopback when it is bound to any); then
 * connected. Multicast group memberships (multicast.ts) are joined again
 * once it is bound. A packet filter of the application's own, classic or
 * eBPF, is refused by name (unixdgram.ts, refuseOwnFilter).
 */
import { closeSync, fstatSync } from 'node:fs';
import { AppshotError, ExitCode } from '../errors.js';
import type { Fd, InodeOwner, Process, Socket } from '../image/types.js';
import { addon } from '../native.js';
import { type RestoreContext, Unsupported } from './context.js';
import { AF_INET, AF_INET6, isAddressOf, makeSockaddr, parseSockaddr } from './sockaddr.js';
import { joinMemberships, membershipsProblem, readMemberships } from './multicast.js';
import { queuedWithHeaders, readOptions, refuseOwnFilter, setOptions, shut } from './unixdgram.js';
import { applyExtras, applyMulticastIndex, extrasOf, IP_MULTICAST_IF_INDEX, isCarriedExtra, isMulticastIndex, noted, NOTHING_NOTED, type Notes, notesAgain, readExtras } from './sockopts.js';
import { ownerFor } from './files.js';

const SOCK_DGRAM = 2;
const SOL_SOCKET = 1;
const IPPROTO_IP = 0;
const IPPROTO_IPV6 = 41;
const IPPROTO_UDP = 17;
const UDP_CORK = 1;

/** Set before the bind: they decide whether it succeeds. */
const BEFORE_BIND: [number, number][] = [
  [SOL_SOCKET, 2], // SO_REUSEADDR
  [SOL_SOCKET, 15], // SO_REUSEPORT
];
const COMMON: [number, number][] = [
  [SOL_SOCKET, 7], // SO_SNDBUF
  [SOL_SOCKET, 8], // SO_RCVBUF
  [SOL_SOCKET, 6], // SO_BROADCAST
  [SOL_SOCKET, 42], // SO_PEEK_OFF
  [IPPROTO_UDP, UDP_CORK],
];
const V4: [number, number][] = [
  [IPPROTO_IP, 1], // IP_TOS
  [IPPROTO_IP, 2], // IP_TTL
  [IPPROTO_IP, 8], // IP_PKTINFO
  [IPPROTO_IP, 33], // IP_MULTICAST_TTL
  [IPPROTO_IP, 34], // IP_MULTICAST_LOOP
  [IPPROTO_IP, 49], // IP_MULTICAST_ALL
];
const V6: [number, number][] = [
  [IPPROTO_IPV6, 26], // IPV6_V6ONLY (before the bind too)
  [IPPROTO_IPV6, 16], // IPV6_UNICAST_HOPS
  [IPPROTO_IPV6, 67], // IPV6_TCLASS
  [IPPROTO_IPV6, 49], // IPV6_RECVPKTINFO
  [IPPROTO_IPV6, 18], // IPV6_MULTICAST_HOPS
  [IPPROTO_IPV6, 19], // IPV6_MULTICAST_LOOP
];
/** Options the kernel looks at as it queues a datagram (make). */
const PKTINFO: [number, number][] = [
  [IPPROTO_IP, 8], // IP_PKTINFO (an IPv6 socket's too, for IPv4 datagrams)
  [IPPROTO_IPV6, 49], // IPV6_RECVPKTINFO
];
const carried = (family: number) => [...BEFORE_BIND, ...COMMON, ...(family === AF_INET6 ? V6 : V4)];
const isBeforeBind = (level: number, name: number) => BEFORE_BIND.some(([l, n]) => l === level && n === name) || (level === IPPROTO_IPV6 && name === 26);

/** What /proc/net/udp{,6} and sock_diag say of one UDP socket. */
export interface SeenUdp {
  /** Bytes a corked socket holds unsent. */
  txQueue: number;
  shutdown: number;
}

/* ---- dump --------------------------------------------------------------- */

/** `notes`: what the preload library noted of the application's sockets,
 * and how many notes found no room (sockopts.ts). */
export function dumpUdp(pid: number, fd: number, ino: bigint, family: number, seen: SeenUdp | undefined, what: string, notes: Notes = NOTHING_NOTED): Socket {
  const dup = addon().getFd(pid, fd);
  try {
    const own = parseSockaddr(addon().sockName(dup));
    const peerRaw = addon().peerName(dup);
    const peer = peerRaw ? parseSockaddr(peerRaw) : undefined;
    const at = (a: string, p: number) => (a.includes(':') ? `[${a}]:${p}` : `${a}:${p}`);
    const where = `${what} fd ${fd}: the UDP socket ${own.port ? at(own.address, own.port) : '(unbound)'}`;
    refuseOwnFilter(dup, where);
    const options = readOptions(dup, carried(family));
    // The rest of what the application set (sockopts.ts), and what only
    // the preload library saw.
    const extras = readExtras(dup, 'udp', family, SOCK_DGRAM, carried(family), where);
    const reuseport = !!options.find((o) => o.level === SOL_SOCKET && o.name === 15)?.value;
    noted(notes, ino, 'udp', own.port, reuseport, extras, where);
    if (options.find((o) => o.level === IPPROTO_UDP && o.name === UDP_CORK)?.value && (seen?.txQueue ?? 0) > 0)
      throw new Unsupported(`${where} is corked (UDP_CORK) with part of a datagram not yet sent (${seen!.txQueue} bytes of its send buffer), which cannot be captured`);
    const queued = queuedWithHeaders(dup, where);
    const socket: Socket = {
      ino,
      family,
      type: SOCK_DGRAM,
      address: own.port ? own.address : '',
      port: own.port,
      listening: false,
      backlog: 0,
      peerIno: 0n,
      queued: Buffer.alloc(0),
      reuseaddr: !!options.find((o) => o.level === SOL_SOCKET && o.name === 2)?.value,
      reuseport: !!options.find((o) => o.level === SOL_SOCKET && o.name === 15)?.value,
      v6only: family === AF_INET6 && !!options.find((o) => o.level === IPPROTO_IPV6 && o.name === 26)?.value,
      peerAddress: peer?.address ?? '',
      peerPort: peer?.port ?? 0,
      datagrams: queued.map((q) => q.datagram),
      shutdown: seen?.shutdown ?? 0,
      options: [...options, ...extras],
      memberships: readMemberships(pid, dup, family, where),
    };
    refuseHeaderLoss(socket, queued, where);
    return socket;
  } finally {
    closeSync(dup);
  }
}

/* ---- restore ------------------------------------------------------------ */

/** Our descriptor for the UDP socket `fd` holds. */
export function openUdp(h: RestoreContext, p: Process, fd: Fd): number {
  const what = `process ${p.vpid} fd ${fd.fd}`;
  const s = fd.socket;
  if (!s) throw new AppshotError(`corrupt image: ${what}: a UDP socket without its state`);
  const sock = h.once(`socket ${s.ino}`, () => make(h, s, what, ownerFor(h, p, fd)));
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

/** `owner`: made with it (files.ts ownerFor), before any bind. */
function make(h: RestoreContext, s: Socket, what: string, owner: InodeOwner | undefined): number {
  check(s, what);
  const sock = h.keep(addon().sockOpen(s.family, SOCK_DGRAM, 0, owner));
  const all = s.options ?? [];
  const extras = extrasOf(all, carried(s.family));
  const options = all.filter((o) => !extras.includes(o));
  const early = options.filter((o) => isBeforeBind(o.level, o.name));
  const late = options.filter((o) => !isBeforeBind(o.level, o.name) && !(o.level === IPPROTO_UDP && o.name === UDP_CORK));
  const own = { family: s.family, address: s.address || (s.family === AF_INET ? '0.0.0.0' : '::'), port: s.port };
  const name = `${own.address.includes(':') ? `[${own.address}]` : own.address}:${own.port}`;
  for (const o of early) addon().setSockOpt(sock, o.level, o.name, o.value);
  applyExtras(sock, extras, carried(s.family), true, `${what}: the UDP socket ${name}`);
  setOptions(sock, late, false); // buffer sizes, before the queue is filled
  if (s.port) {
    try {
      addon().sockBind(sock, makeSockaddr(own));
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new AppshotError(`${what}: the UDP socket cannot be bound to ${name}: ${err.message}`, err.code === 'EADDRINUSE' ? ExitCode.conflict : undefined);
    }
  }
  joinMemberships(sock, s.memberships ?? [], `${what}: the UDP socket ${name}`);
  const datagrams = s.datagrams ?? [];
  if (datagrams.length && !s.port) throw new AppshotError(`corrupt image: ${what}: datagrams queued on an unbound UDP socket`);
  // Asked to be shown where a datagram came in (IP_PKTINFO,
  // IPV6_RECVPKTINFO): set before the queue is filled, as the kernel notes
  // the interface and the local address (ipi_ifindex, ipi_spec_dst) when
  // it queues a datagram, for a socket that asks then: set after, an IPv4
  // datagram put back showed interface 0 and local address 0.0.0.0.
  if (datagrams.length)
    for (const o of all) if (PKTINFO.some(([l, n]) => o.level === l && o.name === n) && o.value) addon().setSockOpt(sock, o.level, o.name, o.value);
  for (const d of datagrams) {
    const [from, to] = injectAddresses(s, d.from, d.fromPort);
    try {
      addon().udpInject(makeSockaddr(from), makeSockaddr(to), d.data);
    } catch (e) {
      const hint = (e as NodeJS.ErrnoException).code === 'EPERM' ? ' (putting back queued UDP datagrams needs CAP_NET_RAW)' : '';
      throw new AppshotError(`${what}: the UDP socket ${name}: a queued datagram from ${d.from}:${d.fromPort} cannot be put back: ${(e as Error).message}${hint}`);
    }
  }
  // Loopback delivers synchronously: every datagram is queued by now.
  setOptions(sock, late, true);
  applyExtras(sock, extras, carried(s.family), false, `${what}: the UDP socket ${name}`);
  applyMulticastIndex(sock, extras, `${what}: the UDP socket ${name}`);
  if (extras.some(isMulticastIndex)) noteMulticastIndex(h, sock, s);
  const again = notesAgain(extras);
  if (again.length) {
    // Noted again for the new socket: a later snapshot carries them too.
    const ino = fstatSync(sock, { bigint: true }).ino;
    for (const n of again) addon().noteSocket(h.tablesPath, { ino, ...n, port: s.port, kind: 'udp' });
  }
  const cork = options.find((o) => o.level === IPPROTO_UDP && o.name === UDP_CORK);
  if (cork?.value) addon().setSockOpt(sock, IPPROTO_UDP, UDP_CORK, cork.value);
  if (s.peerAddress) {
    try {
      addon().sockConnect(sock, makeSockaddr({ family: s.family, address: s.peerAddress, port: s.peerPort ?? 0 }));
    } catch (e) {
      throw new AppshotError(`${what}: the UDP socket ${name} cannot be connected to ${s.peerAddress}:${s.peerPort}: ${(e as Error).message}`);
    }
  }
  shut(sock, s.shutdown ?? 0);
  return sock;
}

/** The restored socket's IPv4 multicast interface, chosen by index, is
 * noted in the new tables as the preload library noted the original's:
 * the kernel does not show it to the next snapshot either. */
function noteMulticastIndex(h: RestoreContext, sock: number, s: Socket): void {
  const o = (s.options ?? []).find((x) => x.level === IPPROTO_IP && x.name === IP_MULTICAST_IF_INDEX)!;
  const ino = fstatSync(sock, { bigint: true }).ino;
  addon().noteSocket(h.tablesPath, { ino, level: IPPROTO_IP, name: IP_MULTICAST_IF_INDEX - 0x10000, value: addon().ifIndex(o.device!), port: s.port, kind: 'udp' });
}

/** Where a queued datagram is sent from and to: its sender, and the
 * socket's own address (loopback when bound to any). An IPv4 sender of
 * a dual-stack IPv6 socket ("::ffff:a.b.c.d") is sent as IPv4. */
function injectAddresses(s: Socket, from: string, fromPort: number) {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(from);
  if (s.family === AF_INET6 && mapped) {
    const ownMapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(s.address);
    return [
      { family: AF_INET, address: mapped[1], port: fromPort },
      { family: AF_INET, address: ownMapped ? ownMapped[1] : '127.0.0.1', port: s.port },
    ];
  }
  const any = s.address === '0.0.0.0' || s.address === '::' || !s.address;
  const loopback = s.family === AF_INET ? '127.0.0.1' : '::1';
  return [
    { family: s.family, address: from, port: fromPort },
    { family: s.family, address: any ? loopback : s.address, port: s.port },
  ];
}

/** A restore puts a queued datagram back from its sender to the address
 * injectAddresses picks, with TOS 0 and TTL 64 (dgram.c udp_inject): a
 * socket that asks to be shown the address a datagram was sent to
 * (IP_PKTINFO: a server bound to every address answers from that one),
 * its TOS or its TTL, and holds one for which these differ (sent to
 * 127.0.0.2 while bound to 0.0.0.0, say), is refused by name rather than
 * shown other values after the restore. */
function refuseHeaderLoss(s: Socket, queued: { datagram: { from: string; fromPort: number }; to: string; tos: number; ttl: number }[], where: string): void {
  const v6 = s.family === AF_INET6;
  for (const q of queued) {
    const from = q.datagram.from.includes(':') ? `[${q.datagram.from}]:${q.datagram.fromPort}` : `${q.datagram.from}:${q.datagram.fromPort}`;
    const planned = injectAddresses(s, q.datagram.from, q.datagram.fromPort)[1];
    const plannedAs = v6 && planned.family === AF_INET ? `::ffff:${planned.address}` : planned.address;
    if (q.to && q.to !== plannedAs)
      throw new Unsupported(`${where} holds a datagram from ${from} sent to ${q.to}, which the socket shows the program (${v6 ? 'IPV6_RECVPKTINFO' : 'IP_PKTINFO'}), and a restore would put it back as sent to ${plannedAs}: cannot be captured yet`);
    if (q.tos > 0)
      throw new Unsupported(`${where} holds a datagram from ${from} with ${v6 ? 'traffic class' : 'TOS'} ${q.tos}, which the socket shows the program (${v6 ? 'IPV6_RECVTCLASS' : 'IP_RECVTOS'}), and a restore would put it back with 0: cannot be captured yet`);
    if (q.ttl >= 0 && q.ttl !== 64)
      throw new Unsupported(`${where} holds a datagram from ${from} with ${v6 ? 'hop limit' : 'TTL'} ${q.ttl}, which the socket shows the program (${v6 ? 'IPV6_RECVHOPLIMIT' : 'IP_RECVTTL'}), and a restore would put it back with 64: cannot be captured yet`);
  }
}

/** An image may come from anyone. */
function check(s: Socket, what: string): void {
  const bad = (why: string) => new AppshotError(`corrupt image: ${what}: a UDP socket ${why}`);
  if ((s.family !== AF_INET && s.family !== AF_INET6) || s.type !== SOCK_DGRAM) throw bad(`of family ${s.family} and type ${s.type}`);
  if (s.address && !isAddressOf(s.family, s.address)) throw bad(`bound to ${JSON.stringify(s.address)}`);
  if (s.peerAddress && !isAddressOf(s.family, s.peerAddress)) throw bad(`connected to ${JSON.stringify(s.peerAddress)}`);
  if (s.port > 65535 || (s.peerPort ?? 0) > 65535) throw bad('has a port above 65535');
  for (const d of s.datagrams ?? []) {
    const v4 = s.family === AF_INET6 && /^::ffff:\d+\.\d+\.\d+\.\d+$/.test(d.from);
    if (!v4 && !isAddressOf(s.family, d.from)) throw bad(`has a datagram from ${JSON.stringify(d.from)}`);
    if (d.fromPort > 65535 || d.data.length > 65507) throw bad('has a datagram larger than UDP carries, or from a port above 65535');
  }
  const memberships = membershipsProblem(s.family, s.memberships ?? []);
  if (memberships) throw bad(memberships);
  for (const o of s.options ?? [])
    if (!carried(s.family).some(([l, n]) => l === o.level && n === o.name) && !isCarriedExtra('udp', s.family, carried(s.family), o) && !isMulticastIndex(o))
      throw bad(`carries socket option ${o.level}/${o.name}, which appshot does not set`);
}
