/**
 * UDP sockets (IPv4 and IPv6): unbound, bound to an address and port,
 * connected to a peer; their options (SO_REUSEADDR, SO_REUSEPORT,
 * SO_BROADCAST, buffer sizes, IP_TOS and IP_TTL or their IPv6 twins,
 * IPV6_V6ONLY, packet-info delivery, UDP_CORK, the multicast TTL or hop
 * limit and loopback, IP_MULTICAST_ALL) and shutdown state; and the
 * datagrams queued for reading, whole and in order, each with its sender's
 * address and port, and what of its IP header the socket asks to be shown
 * (the address it was sent to, TOS or traffic class, TTL or hop limit).
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
 * the address each was sent to where the socket showed it the program,
 * else to the socket's own address, or loopback when it is bound to any;
 * with the TOS and TTL it showed, else 0 and 64); then connected. Multicast group memberships (multicast.ts) are joined again
 * once it is bound. A packet filter of the application's own, classic or
 * eBPF, is refused by name (unixdgram.ts, refuseOwnFilter).
 */
import { closeSync, fstatSync, readFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { AppshotError, ExitCode } from '../errors.js';
import type { Datagram, Fd, InodeOwner, Process, Socket } from '../image/types.js';
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
      datagrams: queued.map((q) => ({ ...q.datagram, ...(q.to ? { to: q.to } : {}), ...(q.tos >= 0 ? { tos: q.tos } : {}), ...(q.ttl >= 0 ? { ttl: q.ttl } : {}) })),
      shutdown: seen?.shutdown ?? 0,
      options: [...options, ...extras],
      memberships: readMemberships(pid, dup, family, where),
    };
    refuseUncarriedHeaders(socket, where);
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
  refuseOtherNodesAddresses(s, what);
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
  if (datagrams.length) refuseMisdelivery(sock, s, datagrams, `${what}: the UDP socket ${name}`);
  for (const d of datagrams) {
    const [from, to] = injectAddresses(s, d);
    try {
      addon().udpInject(makeSockaddr(from), makeSockaddr(to), d.data, d.tos ?? 0, d.ttl ?? 64);
    } catch (e) {
      const hint = (e as NodeJS.ErrnoException).code === 'EPERM' ? ' (putting back queued UDP datagrams needs CAP_NET_RAW)' : '';
      throw new AppshotError(`${what}: the UDP socket ${name}: a queued datagram from ${d.from}:${d.fromPort} cannot be put back: ${(e as Error).message}${hint}`);
    }
  }
  // Loopback delivers synchronously: every datagram is queued by now,
  // unless the kernel gave it to no socket (one bound to a device, say).
  if (datagrams.length) {
    const held = addon().datagramQueue(sock, datagrams.length + 1, Number.MAX_SAFE_INTEGER, 65536).length;
    if (held !== datagrams.length)
      throw new AppshotError(`${what}: the UDP socket ${name}: ${datagrams.length} queued datagrams were put back and it holds ${held} (bound to a device, or another socket took them): its queue cannot be restored`, ExitCode.conflict);
  }
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
 * address it was sent to where the socket showed it the program
 * (IP_PKTINFO, IPV6_RECVPKTINFO), else the socket's own address (loopback
 * when it is bound to any). An IPv4 sender of a dual-stack IPv6 socket
 * ("::ffff:a.b.c.d") is sent as IPv4. */
function injectAddresses(s: Socket, d: Datagram) {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(d.from);
  if (s.family === AF_INET6 && mapped) {
    const ownMapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(d.to || s.address);
    return [
      { family: AF_INET, address: mapped[1], port: d.fromPort },
      { family: AF_INET, address: ownMapped ? ownMapped[1] : '127.0.0.1', port: s.port },
    ];
  }
  const any = s.address === '0.0.0.0' || s.address === '::' || !s.address;
  const loopback = s.family === AF_INET ? '127.0.0.1' : '::1';
  return [
    { family: s.family, address: d.from, port: d.fromPort },
    { family: s.family, address: d.to || (any ? loopback : s.address), port: s.port },
  ];
}

/** The bytes of an IP address of `family`, an IPv4 one of an IPv6 socket
 * ("::ffff:a.b.c.d") as IPv4: to compare addresses however written. */
function addressBytes(family: number, address: string): Buffer {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return makeSockaddr({ family: AF_INET, address: mapped[1], port: 0 }).subarray(4, 8);
  return family === AF_INET ? makeSockaddr({ family, address, port: 0 }).subarray(4, 8) : makeSockaddr({ family, address, port: 0 }).subarray(8, 24);
}

/** Why a datagram sent to `address` cannot be put back on this machine as
 * sent there, or undefined: it must be an address of this machine (any
 * of 127.0.0.0/8, ::1, or one configured on an interface now, which the
 * kernel delivers to through loopback, keeping TOS and TTL), for the
 * datagram to reach the socket rather than another node or the network
 * (a multicast or broadcast address, one that only a route of type local
 * or a transparent proxy made this machine's). An IPv6 link-local one
 * would need its interface, which the socket saw only as an index. */
function notLocalBecause(family: number, address: string, local: LocalAddresses): string | undefined {
  const bytes = addressBytes(family, address);
  if (bytes.length === 4) {
    // (127.255.255.255 and 127.0.0.0: loopback's broadcast routes)
    if (bytes[0] === 127 && (bytes.readUInt32BE(0) & 0xffffff) % 0xffffff === 0) return 'a broadcast address';
    if (bytes[0] === 127) return undefined;
    if (bytes[0] >= 224) return bytes[0] < 240 ? 'a multicast address' : 'a broadcast or reserved address';
  } else {
    if (bytes.equals(addressBytes(AF_INET6, '::1'))) return undefined;
    if (bytes[0] === 0xff) return 'a multicast address';
    if (bytes[0] === 0xfe && (bytes[1] & 0xc0) === 0x80) return 'a link-local address, which names its interface only by the index the socket saw';
  }
  return local().has(bytes.toString('hex')) ? undefined : 'not an address of this machine';
}

/** The addresses configured on this machine's interfaces now, as the hex
 * of their bytes: read once per socket, however many datagrams it holds. */
type LocalAddresses = () => Set<string>;
function localAddresses(): LocalAddresses {
  let known: Set<string> | undefined;
  return () => {
    known ??= new Set(
      Object.values(networkInterfaces())
        .flatMap((list) => list ?? [])
        .map((a) => addressBytes(a.family === 'IPv4' ? AF_INET : AF_INET6, a.address).toString('hex')),
    );
    return known;
  };
}

/**
 * Before any queued datagram is put back, a raw packet from its sender
 * (any address an image names) to where injectAddresses sends it, an
 * address of this machine (refuseOtherNodesAddresses): that must be this
 * socket and no other (an image may come from anyone, and another
 * service's socket would take a forged datagram; an honest image's would
 * be lost to it). Refused unless an IPv4 one reaches an IPv6 socket only
 * if it takes IPv4 (IPV6_V6ONLY 0, bound to :: or ::ffff:), and no other
 * socket of this network namespace is bound to that port at that address
 * or at any (another service on the same port, the original of a copy
 * restored beside it in one SO_REUSEPORT group).
 */
function refuseMisdelivery(sock: number, s: Socket, datagrams: Datagram[], where: string): void {
  const ownIno = fstatSync(sock, { bigint: true }).ino.toString();
  let others: UdpBinding[] | undefined;
  for (const d of datagrams) {
    const to = injectAddresses(s, d)[1];
    if (s.family === AF_INET6 && to.family === AF_INET) {
      const any = !s.address || s.address === '::' || /^::ffff:/i.test(s.address);
      if (!any || addon().getSockOpt(sock, IPPROTO_IPV6, IPV6_V6ONLY) !== 0) throw new AppshotError(`corrupt image: ${where} holds an IPv4 datagram from ${d.from}, which the socket does not take (IPv6 only, or bound to an IPv6 address)`);
    }
    others ??= udpBindings(s.port).filter((b) => b.ino !== ownIno);
    const dest = addressBytes(to.family, to.address);
    const takes = (b: UdpBinding) => {
      if (b.address.length === 4) return to.family === AF_INET && (b.address.equals(dest) || b.address.readUInt32BE(0) === 0);
      if (to.family === AF_INET6) return b.address.equals(dest) || b.address.every((x) => x === 0);
      // An IPv6 socket at :: may take IPv4 (its IPV6_V6ONLY is not shown
      // here), one at ::ffff:a.b.c.d does.
      const mapped = b.address.subarray(0, 12).equals(Buffer.from('00000000000000000000ffff', 'hex'));
      return b.address.every((x) => x === 0) || (mapped && (b.address.subarray(12).equals(dest) || b.address.readUInt32BE(12) === 0));
    };
    const rival = others.find(takes);
    if (rival) throw new AppshotError(`${where}: another socket of this machine is bound to port ${s.port} at ${rival.shown}, which would take the datagrams put back as sent to ${to.address}: its queue cannot be restored here (is the original still running?)`, ExitCode.conflict);
  }
}

const IPV6_V6ONLY = 26;

/** The largest UDP payload of one IPv6 packet through loopback (MTU
 * 65,536, less the IPv6 and UDP headers). */
const IPV6_ONE_PACKET = 65536 - 40 - 8;

/** A UDP socket bound in this network namespace: its local address's
 * bytes, port and inode, from /proc/net/udp and udp6. */
interface UdpBinding {
  address: Buffer;
  shown: string;
  ino: string;
}
function udpBindings(port: number): UdpBinding[] {
  const out: UdpBinding[] = [];
  for (const table of ['udp', 'udp6']) {
    let text: string;
    try {
      text = readFileSync(`/proc/net/${table}`, 'utf8');
    } catch {
      continue; // no IPv6 in this kernel
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10) continue;
      const [hex, portHex] = f[1].split(':');
      if (parseInt(portHex, 16) !== port) continue;
      // Each 32-bit word as the kernel holds it, printed in this machine's
      // (little-endian) order.
      const address = Buffer.alloc(hex.length / 2);
      for (let w = 0; w < hex.length / 8; w++) address.writeUInt32LE(parseInt(hex.slice(w * 8, w * 8 + 8), 16), w * 4);
      const shown = address.length === 4 ? [...address].join('.') : `[${address.toString('hex').replace(/(.{4})(?!$)/g, '$1:')}]`;
      out.push({ address, shown, ino: f[9] });
    }
  }
  return out;
}

/** A datagram the socket was shown to be sent to an address a restore
 * cannot send it to again (notLocalBecause), or shown with TTL 0 (which
 * only a raw socket sends, and the image does not carry), is refused by
 * name at snapshot. Every other address, TOS (its ECN bits too) and TTL
 * is carried: the restore sends it so again. */
function refuseUncarriedHeaders(s: Socket, where: string): void {
  const v6 = s.family === AF_INET6;
  const local = localAddresses();
  for (const d of s.datagrams ?? []) {
    const from = d.from.includes(':') ? `[${d.from}]:${d.fromPort}` : `${d.from}:${d.fromPort}`;
    const why = d.to ? notLocalBecause(s.family, d.to, local) : undefined;
    if (why) throw new Unsupported(`${where} holds a datagram from ${from} sent to ${d.to}, which the socket shows the program (${v6 ? 'IPV6_RECVPKTINFO' : 'IP_PKTINFO'}), ${why}: a restore could not send it there again, which cannot be captured`);
    if (d.ttl === 0) throw new Unsupported(`${where} holds a datagram from ${from} with ${v6 ? 'hop limit' : 'TTL'} 0, which the socket shows the program (${v6 ? 'IPV6_RECVHOPLIMIT' : 'IP_RECVTTL'}) and a restore could not send again, which cannot be captured`);
    // Put back as one packet whose header the raw socket writes, which the
    // kernel does not fragment: an IPv6 one above loopback's MTU fails.
    const ipv6 = v6 && !/^::ffff:/i.test(d.from);
    if (ipv6 && d.data.length > IPV6_ONE_PACKET) throw new Unsupported(`${where} holds a datagram of ${d.data.length} bytes from ${from} over IPv6, which a restore cannot put back in one packet (at most ${IPV6_ONE_PACKET} bytes), which cannot be captured`);
  }
}

/** A datagram is put back by a raw packet from its sender (any address
 * an image names) to where injectAddresses sends it, which must be an
 * address of this machine where it is restored: else it would go to
 * another node or the network (a recorded destination from an image made
 * on another node; a socket bound with IP_FREEBIND to another address),
 * with a forged source. The restore is refused, before the socket is
 * made. */
function refuseOtherNodesAddresses(s: Socket, what: string): void {
  const local = localAddresses();
  const own = s.address || (s.family === AF_INET ? '0.0.0.0' : '::');
  const where = `${what}: the UDP socket ${own.includes(':') ? `[${own}]` : own}:${s.port}`;
  for (const d of s.datagrams ?? []) {
    const to = injectAddresses(s, d)[1];
    const why = notLocalBecause(to.family, to.address, local);
    if (why && d.to) throw new AppshotError(`${where} holds a datagram sent to ${d.to}, which the program is shown, and here ${why}: it cannot be put back as sent there`);
    if (why) throw new AppshotError(`${where} holds a datagram from ${d.from}:${d.fromPort} that would be put back by sending it to ${to.address}, ${why}: refused`);
  }
}

/** What an image says of a UDP socket's queued datagrams' headers, or
 * undefined if it may be so: the address each was sent to, of the
 * socket's family (an IPv4 datagram of an IPv6 socket as ::ffff:a.b.c.d,
 * as its sender), one the socket receives at (its own, or any address of
 * that family when bound to any); TOS 0-255; TTL 1-255. (image/validate.ts) */
export function udpHeadersProblem(s: Socket): string | undefined {
  for (const d of s.datagrams ?? []) {
    if (d.tos !== undefined && !(Number.isInteger(d.tos) && d.tos >= 0 && d.tos <= 255)) return `has a datagram with TOS or traffic class ${d.tos}, not 0-255`;
    if (d.ttl !== undefined && !(Number.isInteger(d.ttl) && d.ttl >= 1 && d.ttl <= 255)) return `has a datagram with TTL or hop limit ${d.ttl}, not 1-255`;
    if (!d.to) continue;
    const v4 = (a: string) => /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(a);
    const family = s.family === AF_INET6 && v4(d.to) ? AF_INET : s.family;
    const bad = `has a datagram sent to ${JSON.stringify(d.to)}`;
    if (family === AF_INET ? !(s.family === AF_INET ? isAddressOf(AF_INET, d.to) : isAddressOf(AF_INET, d.to.slice(7))) : !isAddressOf(AF_INET6, d.to)) return `${bad}, not an address of its family`;
    if (s.family === AF_INET6 && v4(d.to) !== v4(d.from)) return `${bad} from ${JSON.stringify(d.from)}: one IPv4, the other not`;
    // (An IPv6 socket bound to ::ffff:0.0.0.0 takes every IPv4 address.)
    const any = !s.address || s.address === '0.0.0.0' || s.address === '::' || (family === AF_INET && /^::ffff:0\.0\.0\.0$/i.test(s.address));
    if (s.family === AF_INET6 && family === AF_INET && s.address === '::' && s.v6only) return `${bad}, an IPv4 address, but the socket takes IPv6 only`;
    if (!any && !addressBytes(s.family, s.address).equals(addressBytes(s.family, d.to))) return `${bad}, but the socket is bound to ${s.address}`;
  }
  return undefined;
}

/** An image may come from anyone. */
function check(s: Socket, what: string): void {
  const bad = (why: string) => new AppshotError(`corrupt image: ${what}: a UDP socket ${why}`);
  if ((s.family !== AF_INET && s.family !== AF_INET6) || s.type !== SOCK_DGRAM) throw bad(`of family ${s.family} and type ${s.type}`);
  if (s.address && !isAddressOf(s.family, s.address)) throw bad(`bound to ${JSON.stringify(s.address)}`);
  if (s.peerAddress && !isAddressOf(s.family, s.peerAddress)) throw bad(`connected to ${JSON.stringify(s.peerAddress)}`);
  if (s.port > 65535 || (s.peerPort ?? 0) > 65535) throw bad('has a port above 65535');
  for (const d of s.datagrams ?? []) {
    const v4 = s.family === AF_INET6 && /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(d.from);
    if (!v4 && !isAddressOf(s.family, d.from)) throw bad(`has a datagram from ${JSON.stringify(d.from)}`);
    if (d.fromPort > 65535 || d.data.length > 65507) throw bad('has a datagram larger than UDP carries, or from a port above 65535');
  }
  const headers = udpHeadersProblem(s);
  if (headers) throw bad(headers);
  const memberships = membershipsProblem(s.family, s.memberships ?? []);
  if (memberships) throw bad(memberships);
  for (const o of s.options ?? [])
    if (!carried(s.family).some(([l, n]) => l === o.level && n === o.name) && !isCarriedExtra('udp', s.family, carried(s.family), o) && !isMulticastIndex(o))
      throw bad(`carries socket option ${o.level}/${o.name}, which appshot does not set`);
}
