/**
 * Raw IP sockets (SOCK_RAW): squid's pinger holds an ICMP and an ICMPv6
 * one from its start (Debian's squid runs it by default), ping-like
 * monitors and routing daemons hold others. Such a socket's state is its
 * protocol, the address it is bound to, and for ICMP its filter of message
 * types (ICMP_FILTER, ICMP6_FILTER); it holds no connection. A restore
 * makes a new one (CAP_NET_RAW: the restorer's, the process having dropped
 * it after it opened the socket, as pinger does), gives it the filter and
 * binds it. Made with the restorer's capability, it is restored only for
 * a socket some process holding it had CAP_NET_RAW in the image, or from
 * this node's own snapshot (sockets.ts checkSocketPrivileges): an image
 * from elsewhere could name any nobody process the holder of one.
 *
 * Only ICMP and ICMPv6 ones: one of another protocol, made again with the
 * restorer's CAP_NET_RAW, would see every packet of it on the host, or
 * write whole packets (IPPROTO_RAW), which is more than a process that
 * dropped its capability ever held of it by name. Refused by name too: a
 * connected one, IP_HDRINCL or IPV6_CHECKSUM set by the
 * program (headers it writes itself, which a new socket would not expect),
 * and bytes queued for reading (a reply read by nobody: take the snapshot
 * again). The options of the catalogue that other sockets carry
 * (sockopts.ts) are not read for these: the catalogue compares with a
 * fresh socket of the kind, which only CAP_NET_RAW can make.
 */
import { AppshotError } from '../errors.js';
import type { Fd, InodeOwner, Process, Socket } from '../image/types.js';
import { addon } from '../native.js';
import { type RestoreContext } from './context.js';
import { Unsupported } from './context.js';
import { AF_INET, AF_INET6, makeSockaddr, parseSockaddr } from './sockaddr.js';
import { ownerFor } from './files.js';

export const SOCK_RAW = 3;
const SOL_SOCKET = 1;
const SO_PROTOCOL = 38;
const IPPROTO_IP = 0;
const IP_HDRINCL = 3;
const IPPROTO_ICMP = 1;
const IPPROTO_IPV6 = 41;
const IPV6_CHECKSUM = 7;
const IPPROTO_ICMPV6 = 58;
const IPPROTO_RAW = 255;
const SOL_RAW = 255;
const ICMP_FILTER = 1;
const ICMP6_FILTER = 1;
const FIONREAD = 0x541b;

/** Where a raw socket of `family` and `protocol` keeps its type filter,
 * and its size; undefined for one that has none. */
export function filterOf(family: number, protocol: number): { level: number; name: number; size: number } | undefined {
  if (family === AF_INET && protocol === IPPROTO_ICMP) return { level: SOL_RAW, name: ICMP_FILTER, size: 4 };
  if (family === AF_INET6 && protocol === IPPROTO_ICMPV6) return { level: IPPROTO_ICMPV6, name: ICMP6_FILTER, size: 32 };
  return undefined;
}

const familyName = (family: number) => (family === AF_INET6 ? 'IPv6' : 'IPv4');

/** What names a raw socket in messages and listings. */
export function rawName(s: Pick<Socket, 'family' | 'protocol' | 'address'>): string {
  const proto = s.protocol === IPPROTO_ICMP ? 'ICMP' : s.protocol === IPPROTO_ICMPV6 ? 'ICMPv6' : `protocol ${s.protocol ?? 0}`;
  return `raw ${familyName(s.family)} ${proto} socket${s.address ? ` bound to ${s.address}` : ''}`;
}

/* ---- dump --------------------------------------------------------------- */

/** The raw socket `dup` (ours, of the application's socket): `base`, its
 * common fields; `where` names it. */
export function dumpRaw(dup: number, base: Socket, where: string): Socket {
  const protocol = addon().getSockOpt(dup, SOL_SOCKET, SO_PROTOCOL);
  const what = `${where}: the ${rawName({ family: base.family, protocol, address: '' })}`;
  // Made again with appshot's CAP_NET_RAW, a raw socket of another
  // protocol would hand the process every packet of it on the host (TCP,
  // UDP) or the writing of whole packets (IPPROTO_RAW): only the ICMP
  // ones, which ping-like programs hold, are carried (review29 M2).
  if (!filterOf(base.family, protocol)) throw new Unsupported(`${what} cannot be captured (only ICMP and ICMPv6 raw sockets are)`);
  if (addon().peerName(dup)) throw new Unsupported(`${what} is connected, which cannot be captured yet`);
  if (base.family === AF_INET && protocol !== IPPROTO_RAW && addon().getSockOpt(dup, IPPROTO_IP, IP_HDRINCL))
    throw new Unsupported(`${what} has IP_HDRINCL set, which cannot be captured yet`);
  if (base.family === AF_INET6 && protocol !== IPPROTO_ICMPV6 && addon().getSockOpt(dup, IPPROTO_IPV6, IPV6_CHECKSUM) !== -1)
    throw new Unsupported(`${what} has IPV6_CHECKSUM set, which cannot be captured yet`);
  const inq = Buffer.alloc(4);
  addon().ioctl(dup, FIONREAD, inq);
  if (inq.readInt32LE(0) > 0) throw new Unsupported(`${what} has ${inq.readInt32LE(0)} bytes queued for reading, which cannot be captured yet (take the snapshot again)`);
  const name = parseSockaddr(addon().sockName(dup));
  const any = name.address === '0.0.0.0' || name.address === '::' || name.address === '';
  const f = filterOf(base.family, protocol);
  const rawFilter = f ? addon().getSockOptBytes(dup, f.level, f.name, f.size) : Buffer.alloc(0);
  return { ...base, address: any ? '' : name.address, port: 0, protocol, rawFilter };
}

/* ---- image -------------------------------------------------------------- */

/** What is wrong with a raw socket's record, or undefined. */
export function rawProblem(s: Socket): string | undefined {
  if (s.type !== SOCK_RAW || (s.family !== AF_INET && s.family !== AF_INET6)) return 'is a raw socket record of another family or type';
  const protocol = s.protocol ?? 0;
  const f = filterOf(s.family, protocol);
  if (!f) return `is a raw socket of protocol ${protocol} (only ICMP and ICMPv6 ones are restored)`;
  const filter = s.rawFilter?.length ?? 0;
  if (filter !== 0 && filter !== f?.size) return `is a raw socket carrying a ${filter}-byte filter`;
  if (s.port || s.listening || s.peerIno || s.queued?.length || s.datagrams?.length || s.netlink || s.options?.length) return "is a raw socket carrying another kind's state";
  return undefined;
}

/* ---- restore ------------------------------------------------------------ */

/** Our descriptor for the raw socket `fd` holds. */
export function openRaw(h: RestoreContext, p: Process, fd: Fd): number {
  const what = `process ${p.vpid} fd ${fd.fd}`;
  const s = fd.socket;
  if (!s) throw new AppshotError(`corrupt image: ${what}: a raw socket without its state`);
  const sock = h.once(`socket ${s.ino}`, () => make(h, s, `${what}: the ${rawName(s)}`, ownerFor(h, p, fd)));
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

/** `owner`: made with it (files.ts ownerFor). */
function make(h: RestoreContext, s: Socket, what: string, owner: InodeOwner | undefined): number {
  let sock: number;
  try {
    sock = h.keep(addon().sockOpen(s.family, SOCK_RAW, s.protocol ?? 0, owner));
  } catch (e) {
    const hint = (e as NodeJS.ErrnoException).code === 'EPERM' ? ' (a raw socket is made with CAP_NET_RAW)' : '';
    throw new AppshotError(`${what} cannot be made again: ${(e as Error).message}${hint}`);
  }
  const f = filterOf(s.family, s.protocol ?? 0);
  if (f && s.rawFilter?.length) addon().setSockOptBytes(sock, f.level, f.name, s.rawFilter);
  if (s.address) {
    try {
      addon().sockBind(sock, makeSockaddr({ family: s.family, address: s.address, port: 0 }));
    } catch (e) {
      throw new AppshotError(`${what} cannot be bound again: ${(e as Error).message}`);
    }
  }
  return sock;
}
