/**
 * Multicast group memberships of a UDP socket (IP_ADD_MEMBERSHIP,
 * IPV6_JOIN_GROUP, MCAST_JOIN_GROUP, source-specific joins and blocked
 * sources), a part of the UDP kind (udp.ts).
 *
 * Dump: the kernel lists no socket's memberships, only each interface's
 * groups, counted (/proc/PID/net/igmp and igmp6, in the application's
 * network namespace). Every membership of a socket is one of those; for
 * each (interface, group) there, getsockopt(MCAST_MSFILTER) on the socket
 * answers EADDRNOTAVAIL unless it is a member, and otherwise gives the
 * source filter (mode and sources). An IPv6 socket may also hold IPv4
 * memberships (level IPPROTO_IP), so it is asked both.
 *
 * Restore: each group joined again (MCAST_JOIN_GROUP) on the interface of
 * the same name, then its source filter set. An interface this node does
 * not have fails the restore, naming the socket, the group and the
 * interface.
 */
import { readFileSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import type { MulticastMembership } from '../image/types.js';
import { addon } from '../native.js';
import { Unsupported } from './context.js';
import { AF_INET, AF_INET6, isAddressOf, makeSockaddr, parseSockaddr } from './sockaddr.js';

const IPPROTO_IP = 0;
const IPPROTO_IPV6 = 41;

/** Bounds on what an image may ask a restore to join (as validate.ts). */
const MULTICAST_LIMITS = { memberships: 4096, sources: 1024 };

interface InterfaceGroup {
  ifindex: number;
  device: string;
  family: number;
  group: string;
}

/** Every (interface, group) of /proc/PID/net/igmp: device lines
 * "IDX\tNAME : ..." followed by group lines "\t\t\t\tHEX ...", the group's
 * network-order bytes printed as a host (little-endian) word. */
function igmpGroups(pid: number): InterfaceGroup[] {
  const out: InterfaceGroup[] = [];
  let dev: { ifindex: number; device: string } | undefined;
  for (const line of readOr(`/proc/${pid}/net/igmp`).split('\n')) {
    const d = /^(\d+)\t(\S+)\s*:/.exec(line);
    if (d) {
      dev = { ifindex: Number(d[1]), device: d[2] };
      continue;
    }
    const g = /^\t+([0-9A-Fa-f]{8})\s/.exec(line);
    if (g && dev) {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(parseInt(g[1], 16));
      out.push({ ...dev, family: AF_INET, group: [...b].join('.') });
    }
  }
  return out;
}

/** Every (interface, group) of /proc/PID/net/igmp6: "IDX NAME HEX32 ...". */
function igmp6Groups(pid: number): InterfaceGroup[] {
  const out: InterfaceGroup[] = [];
  for (const line of readOr(`/proc/${pid}/net/igmp6`).split('\n')) {
    const m = /^(\d+)\s+(\S+)\s+([0-9a-f]{32})\s/.exec(line);
    if (!m) continue;
    const raw = Buffer.alloc(28);
    raw.writeUInt16LE(AF_INET6, 0);
    Buffer.from(m[3], 'hex').copy(raw, 8);
    out.push({ ifindex: Number(m[1]), device: m[2], family: AF_INET6, group: parseSockaddr(raw).address });
  }
  return out;
}

/** A kernel without IPv6 (or IGMP) has no such file: no groups there. */
function readOr(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return '';
    throw e;
  }
}

/** The memberships of the socket `dup` (our duplicate of a socket of
 * `pid`, of `family`). */
export function readMemberships(pid: number, dup: number, family: number, where: string): MulticastMembership[] {
  const candidates = [...igmpGroups(pid), ...(family === AF_INET6 ? igmp6Groups(pid) : [])];
  const out: MulticastMembership[] = [];
  for (const c of candidates) {
    let filter;
    try {
      filter = addon().multicastFilter(dup, c.family === AF_INET ? IPPROTO_IP : IPPROTO_IPV6, c.ifindex, makeSockaddr({ family: c.family, address: c.group, port: 0 }));
    } catch (e) {
      throw new Unsupported(`${where}: its membership of multicast group ${c.group} on ${c.device} cannot be read: ${(e as Error).message}`);
    }
    if (filter) out.push({ group: c.group, device: c.device, include: filter.include, sources: filter.sources.map((s) => parseSockaddr(s).address) });
  }
  return out;
}

/** Joins them again on `sock`, made by the restore. */
export function joinMemberships(sock: number, memberships: MulticastMembership[], where: string): void {
  for (const m of memberships) {
    const family = m.group.includes(':') ? AF_INET6 : AF_INET;
    const ifindex = addon().ifIndex(m.device);
    const what = `${where} was a member of multicast group ${m.group} on ${m.device}`;
    if (!ifindex) throw new AppshotError(`${what}, an interface this node does not have`);
    try {
      addon().multicastJoin(
        sock,
        family === AF_INET ? IPPROTO_IP : IPPROTO_IPV6,
        ifindex,
        makeSockaddr({ family, address: m.group, port: 0 }),
        m.include,
        m.sources.map((s) => makeSockaddr({ family, address: s, port: 0 })),
      );
    } catch (e) {
      throw new AppshotError(`${what}, which cannot be joined again: ${(e as Error).message}`);
    }
  }
}

/** What an image says of a socket's memberships, before use; the reason
 * it cannot be, or undefined. */
export function membershipsProblem(socketFamily: number, memberships: MulticastMembership[]): string | undefined {
  if (memberships.length > MULTICAST_LIMITS.memberships) return `has ${memberships.length} multicast memberships`;
  for (const m of memberships) {
    const family = m.group.includes(':') ? AF_INET6 : AF_INET;
    if (!isAddressOf(family, m.group) || (family === AF_INET6 && socketFamily !== AF_INET6)) return `is a member of multicast group ${JSON.stringify(m.group)}`;
    if (!/^[^/\s:]{1,15}$/.test(m.device) || m.device === '.' || m.device === '..') return `has a multicast membership on interface ${JSON.stringify(m.device)}`;
    if (m.sources.length > MULTICAST_LIMITS.sources || m.sources.some((s) => !isAddressOf(family, s))) return `has a multicast membership of ${m.group} with bad sources`;
  }
  return undefined;
}
