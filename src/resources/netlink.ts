/**
 * Netlink sockets (AF_NETLINK): a program's line to the kernel. dnsmasq
 * keeps a NETLINK_ROUTE socket to hear of interfaces and addresses coming
 * and going; udev's clients a NETLINK_KOBJECT_UEVENT one.
 *
 * What is carried: the protocol and socket type; the port id it is bound
 * to (nl_pid); every multicast group joined, beyond the first 32 too; the
 * destination connect() gave it (a port id, or a group); the netlink
 * options (NETLINK_PKTINFO, NETLINK_BROADCAST_ERROR, NETLINK_NO_ENOBUFS,
 * NETLINK_LISTEN_ALL_NSID, NETLINK_CAP_ACK, NETLINK_EXT_ACK,
 * NETLINK_GET_STRICT_CHK) and the generic socket options the catalogue
 * carries for it (sockopts.ts: buffer sizes the program fixed,
 * SO_PASSCRED, timeouts, ...). Read through netlink_diag (port id,
 * destination, queued bytes, a dump running) and getsockopt (the options,
 * and every group: NETLINK_LIST_MEMBERSHIPS).
 *
 * Protocols: only those whose whole state is the socket itself.
 * NETLINK_ROUTE (its only per-socket state is GET_STRICT_CHK, an option),
 * NETLINK_SOCK_DIAG (queries, and destroy notifications by group),
 * NETLINK_KOBJECT_UEVENT (uevents by group), and a client's NETLINK_AUDIT
 * socket (see refuseAuditState). The others keep state in the
 * kernel keyed by the socket or its port id that nothing reads back, and
 * are refused by name: NETLINK_NETFILTER (nfqueue/nflog bindings,
 * conntrack event subscriptions), NETLINK_GENERIC (families and their
 * group numbers are given out at run time; some families own objects by
 * socket: nl80211's interfaces, ...), NETLINK_CONNECTOR (the proc
 * connector's listen state), NETLINK_XFRM, NETLINK_SELINUX, NETLINK_ISCSI,
 * NETLINK_FIB_LOOKUP, NETLINK_SCSITRANSPORT, NETLINK_RDMA, NETLINK_CRYPTO,
 * NETLINK_SMC, NETLINK_USERSOCK and any other.
 *
 * The port id is restored exactly, whether the program chose it or the
 * kernel did (autobind: usually the process's TGID at the time). The
 * kernel answers a request at the requester's port id (nlmsg_pid of the
 * reply), and programs check it against what getsockname said once
 * (dnsmasq drops every answer that is not to its netlink_pid): a new port
 * id would have such a program ignore every answer, silently. A port id
 * something else holds in this network namespace (the original still
 * running, say) fails the restore, naming it. A restored port id that
 * equals some process's TGID does not keep that process from autobinding:
 * the kernel then picks another.
 *
 * What cannot be carried exactly, and refused at snapshot by name:
 * - messages queued for reading (answers to a request, or notifications of
 *   a group). A message's sender is part of it (nl_pid 0: the kernel), and
 *   user space cannot send as the kernel, and programs check that
 *   (dnsmasq, libnl, systemd ignore what is not from port 0): put back by
 *   another socket they would be dropped, or trusted wrongly; dropped, an
 *   answer the program waits for would never come. A notification queue
 *   drains as soon as the program runs again: the snapshot is retried.
 * - a dump in progress (NDIAG_FLAG_CB_RUNNING): the kernel holds where in
 *   its tables the dump is.
 * - bytes being sent (a transient state).
 * - a packet filter of the program's own (unixdgram.ts, refuseOwnFilter:
 *   udev's clients filter uevents so).
 *
 * Not carried, documented: notifications of what changes between the
 * snapshot and the restore (an interface that came or went meanwhile) are
 * not sent to the restored socket, as to any process that was not
 * running; the socket's drop counter (SK_MEMINFO_DROPS, SO_RXQ_OVFL's
 * number) starts at 0; an overrun error not yet reported (ENOBUFS, which
 * only a receive or SO_ERROR reads, and consumes) is not read, so not
 * carried — it follows a full queue, which is refused above.
 *
 * Restore: made in appshot's process and handed over, once however many
 * descriptors share it; options, then the bind to its port id, the
 * groups (NETLINK_ADD_MEMBERSHIP, each), the connect. The socket file is
 * appshot's: a netlink request that needs a capability checks both the
 * sender and the socket's opener (netlink_net_capable), so a restored
 * socket gives its process no privilege it did not have.
 */
import { closeSync } from 'node:fs';
import { endianness } from 'node:os';
import { AppshotError, ExitCode } from '../errors.js';
import type { Fd, InodeOwner, NetlinkSocket, Process, Socket, SocketOption } from '../image/types.js';
import { addon, type NetlinkSeen } from '../native.js';
import { type RestoreContext, Transient, Unsupported } from './context.js';
import { refuseOwnFilter } from './unixdgram.js';
import { applyExtras, isCarriedExtra, readExtras } from './sockopts.js';
import { ownerFor } from './files.js';
import { CAP_AUDIT_READ, CAP_NET_ADMIN } from './heldcaps.js';

export const AF_NETLINK = 16;
const SOCK_DGRAM = 2;
const SOCK_RAW = 3;
const SOL_SOCKET = 1;
const SO_PROTOCOL = 38;
export const SOL_NETLINK = 270;
const NETLINK_ADD_MEMBERSHIP = 1;
const NETLINK_LIST_MEMBERSHIPS = 9;
/** NETLINK_CONNECTED, the state connect() leaves it in. */
const CONNECTED = 1;
const NDIAG_FLAG_CB_RUNNING = 0x1;
const NETLINK_AUDIT = 9;

/** The protocols whose whole state is the socket. */
const ACCEPTED: ReadonlyMap<number, string> = new Map([
  [0, 'NETLINK_ROUTE'],
  [4, 'NETLINK_SOCK_DIAG'],
  [NETLINK_AUDIT, 'NETLINK_AUDIT'],
  [15, 'NETLINK_KOBJECT_UEVENT'],
]);

/** Those refused, and why, by name. */
const REFUSED: ReadonlyMap<number, [string, string]> = new Map([
  [2, ['NETLINK_USERSOCK', 'its peers are other programs\' sockets, by port id']],
  [3, ['NETLINK_FIREWALL', 'a removed protocol']],
  [5, ['NETLINK_NFLOG', 'a removed protocol']],
  [6, ['NETLINK_XFRM', 'its security associations and policies are the node\'s, and its per-socket state is not shown']],
  [7, ['NETLINK_SELINUX', 'not carried yet']],
  [8, ['NETLINK_ISCSI', 'the iSCSI transport keeps state by port id']],
  [10, ['NETLINK_FIB_LOOKUP', 'not carried yet']],
  [11, ['NETLINK_CONNECTOR', 'a connector\'s listeners keep state in its kernel module (the proc connector\'s PROC_CN_MCAST_LISTEN)']],
  [12, ['NETLINK_NETFILTER', 'queue and log bindings and conntrack subscriptions are kept by port id in the kernel and not shown']],
  [13, ['NETLINK_IP6_FW', 'a removed protocol']],
  [14, ['NETLINK_DNRTMSG', 'a removed protocol']],
  [16, ['NETLINK_GENERIC', 'its families and their group numbers are given out at run time, and some families own objects by socket']],
  [18, ['NETLINK_SCSITRANSPORT', 'not carried yet']],
  [19, ['NETLINK_ECRYPTFS', 'not carried yet']],
  [20, ['NETLINK_RDMA', 'the RDMA core keeps state by port id']],
  [21, ['NETLINK_CRYPTO', 'not carried yet']],
  [22, ['NETLINK_SMC', 'not carried yet']],
]);

export function protocolName(protocol: number): string {
  return ACCEPTED.get(protocol) ?? REFUSED.get(protocol)?.[0] ?? `netlink protocol ${protocol}`;
}

/** The SOL_NETLINK options carried: each a flag (0 or 1). */
const OPTIONS: readonly (readonly [name: number, label: string])[] = [
  [3, 'NETLINK_PKTINFO'],
  [4, 'NETLINK_BROADCAST_ERROR'],
  [5, 'NETLINK_NO_ENOBUFS'],
  [8, 'NETLINK_LISTEN_ALL_NSID'],
  [10, 'NETLINK_CAP_ACK'],
  [11, 'NETLINK_EXT_ACK'],
  [12, 'NETLINK_GET_STRICT_CHK'],
];

/** Carried as fields or options of their own, not the catalogue's. */
const OWN: [number, number][] = OPTIONS.map(([name]) => [SOL_NETLINK, name]);

/** The most groups a protocol has (NETLINK_ROUTE has some 40; a group
 * number above what the protocol has fails the join at restore anyway):
 * bounds what an image may ask the restore to join. */
export const MAX_GROUP = 1024;

/* ---- dump --------------------------------------------------------------- */

/** Every netlink socket of this network namespace, by inode (a socket
 * may be listed twice by the kernel: bound, and among its groups'
 * listeners). Read once per snapshot, when the first netlink socket is. */
export function netlinkTable(): Map<bigint, NetlinkSeen> {
  const table = new Map<bigint, NetlinkSeen>();
  for (const s of addon().netlinkSockets()) if (!table.has(BigInt(s.ino))) table.set(BigInt(s.ino), s);
  return table;
}

/** The netlink socket `dup` (a duplicate of `fd` of the process named
 * `what`); `seen`: what netlink_diag said of it. A socket never bound
 * and in no group is not in netlink_diag's tables: all its state is its
 * protocol, type and options. */
export function dumpNetlink(pid: number, fd: number, dup: number, ino: bigint, type: number, seen: NetlinkSeen | undefined, what: string): Socket {
  const protocol = seen?.protocol ?? addon().getSockOpt(dup, SOL_SOCKET, SO_PROTOCOL);
  const name = protocolName(protocol);
  const refused = REFUSED.get(protocol);
  if (!ACCEPTED.has(protocol))
    throw new Unsupported(`${what} fd ${fd}: a ${name} socket cannot be captured${refused ? `: ${refused[1]}` : ' (only NETLINK_ROUTE, NETLINK_SOCK_DIAG and NETLINK_KOBJECT_UEVENT are)'}`);
  const portId = seen?.portid ?? boundPortId(dup);
  const where = `${what} fd ${fd}: the ${name} socket${portId ? ` of port id ${portId}` : ' (unbound)'}`;
  const groups = memberships(dup);
  if (protocol === NETLINK_AUDIT) refuseAuditState(pid, groups, where);
  // Made again in appshot's network namespace, and asked of in it
  // (netlink_diag lists that namespace's sockets): one of another namespace
  // would talk to the wrong kernel tables. Told by its namespace's cookie
  // (Linux 5.14); on an older kernel, one bound or in a group that
  // netlink_diag does not list is another namespace's.
  if (!sameNetns(dup) || (!seen && (portId || groups.length)))
    throw new Unsupported(`${where} is not among the netlink sockets of appshot's network namespace (it belongs to another one), which cannot be captured yet`);
  if (seen && seen.flags & NDIAG_FLAG_CB_RUNNING)
    throw new Transient(`${where} is in the middle of a dump (the kernel holds where in its tables the dump is, which cannot be captured): snapshot again once the program has read it`);
  if (seen && seen.rmem > 0)
    throw new Transient(
      `${where} has ${seen.rmem} bytes of messages queued for reading (answers or notifications), which cannot be put back as the kernel sent them (nothing can send as port 0): snapshot again once the program has read them`,
    );
  if (seen && seen.wmem > 0) throw new Transient(`${where} is sending a message (${seen.wmem} bytes): snapshot again`);
  refuseOwnFilter(dup, where);
  const options: SocketOption[] = [];
  for (const [n] of OPTIONS) {
    const value = addon().getSockOpt(dup, SOL_NETLINK, n);
    if (value) options.push({ level: SOL_NETLINK, name: n, value: 1 });
  }
  options.push(...readExtras(dup, 'netlink', AF_NETLINK, type, OWN, where));
  const netlink: NetlinkSocket = {
    protocol,
    portId,
    connected: seen?.state === CONNECTED,
    dstPortId: seen?.dstPortid ?? 0,
    dstGroup: seen?.dstGroup ?? 0,
    groups,
  };
  return {
    ino,
    family: AF_NETLINK,
    type,
    address: '',
    port: 0,
    listening: false,
    backlog: 0,
    peerIno: 0n,
    queued: Buffer.alloc(0),
    reuseaddr: false,
    reuseport: false,
    v6only: false,
    options,
    netlink,
  };
}

/**
 * A NETLINK_AUDIT socket is carried when it is a client's, as PAM's,
 * sshd's, cron's and dbus-daemon's are: messages sent to the kernel
 * (AUDIT_USER_*, which the kernel lets through only if both the sender and
 * the socket's opener hold CAP_AUDIT_WRITE, so the restored socket gives
 * nothing more) and the kernel's answers to its port id: the socket is all
 * of it. Refused by name:
 * - the audit daemon's: the kernel keeps the daemon's registration (its
 *   PID and port id) apart and sends it every record; a restored socket
 *   would not be registered, and auditing would stop without a word. Told
 *   by AUDIT_GET (CAP_AUDIT_CONTROL): without it, nothing tells.
 * - one in the audit log's multicast group (journald's reader), which
 *   needs CAP_AUDIT_READ: not carried yet.
 */
function refuseAuditState(pid: number, groups: number[], where: string): void {
  if (groups.length) throw new Unsupported(`${where} is in the audit log's multicast group (${groups.join(', ')}), which cannot be captured yet`);
  let daemon: number;
  try {
    daemon = addon().auditDaemonPid();
  } catch (e) {
    // No audit in this network or user namespace: nobody is its daemon.
    if ((e as NodeJS.ErrnoException).code === 'ECONNREFUSED') return;
    throw new Unsupported(`${where}: whether its process is the audit daemon cannot be told (${(e as Error).message}: AUDIT_GET needs CAP_AUDIT_CONTROL)`);
  }
  if (daemon !== 0 && daemon === pid) throw new Unsupported(`${where} is held by the audit daemon (the kernel registers the daemon by its PID and port id and sends it every record, which cannot be captured)`);
}

/** The port id netlink socket `fd` is bound to (its sockaddr_nl's
 * nl_pid), 0 if never bound. */
export function boundPortId(fd: number): number {
  return new DataView(addon().sockName(fd).buffer).getUint32(4, true);
}

const SO_NETNS_COOKIE = 71;
let ownCookie: Buffer | null | undefined;

/** Whether socket `dup` belongs to appshot's network namespace (true if
 * the kernel does not say: SO_NETNS_COOKIE is Linux 5.14's). */
function sameNetns(dup: number): boolean {
  const cookie = (fd: number): Buffer | null => {
    try {
      return addon().getSockOptBytes(fd, SOL_SOCKET, SO_NETNS_COOKIE, 8);
    } catch {
      return null;
    }
  };
  if (ownCookie === undefined) {
    const mine = addon().sockOpen(AF_NETLINK, SOCK_RAW, 0);
    try {
      ownCookie = cookie(mine);
    } finally {
      closeSync(mine);
    }
  }
  const theirs = cookie(dup);
  return !ownCookie || !theirs || ownCookie.equals(theirs);
}

/** Every group `dup` joined, by number (NETLINK_LIST_MEMBERSHIPS: words of
 * 32 groups in host order, as many as the protocol's groups need). */
function memberships(dup: number): number[] {
  const words = addon().getSockOptBytes(dup, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, MAX_GROUP / 8);
  const read = endianness() === 'LE' ? (at: number) => words.readUInt32LE(at) : (at: number) => words.readUInt32BE(at);
  const out: number[] = [];
  for (let w = 0; w + 4 <= words.length; w += 4) {
    const bits = read(w);
    for (let b = 0; b < 32; b++) if ((bits >>> b) & 1) out.push(w * 8 + b + 1);
  }
  return out;
}

/* ---- restore ------------------------------------------------------------ */

/** Our descriptor for the netlink socket `fd` holds. */
export function openNetlink(h: RestoreContext, p: Process, fd: Fd): number {
  const what = `process ${p.vpid} fd ${fd.fd}`;
  const s = fd.socket;
  const problem = s ? netlinkProblem(s) : 'has no socket state';
  if (problem) throw new AppshotError(`corrupt image: ${what}: a netlink socket ${problem}`);
  const sock = h.once(`socket ${s!.ino}`, () => make(h, s!, what, ownerFor(h, p, fd)));
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

function nlAddress(portId: number, groups: number): Buffer {
  const a = Buffer.alloc(12);
  a.writeUInt16LE(AF_NETLINK, 0);
  a.writeUInt32LE(portId >>> 0, 4);
  a.writeUInt32LE(groups >>> 0, 8);
  return a;
}

/** `owner`: made with it (files.ts ownerFor). */
function make(h: RestoreContext, s: Socket, what: string, owner: InodeOwner | undefined): number {
  const n = s.netlink!;
  const where = `${what}: the ${protocolName(n.protocol)} socket${n.portId ? ` of port id ${n.portId}` : ' (unbound)'}`;
  const sock = h.keep(addon().sockOpen(AF_NETLINK, s.type, n.protocol, owner));
  // Buffer sizes first: notifications may come as soon as it has joined.
  applyExtras(sock, s.options ?? [], OWN, false, where);
  for (const o of s.options ?? []) {
    if (o.level !== SOL_NETLINK) continue;
    try {
      addon().setSockOpt(sock, SOL_NETLINK, o.name, o.value);
    } catch (e) {
      const label = OPTIONS.find(([x]) => x === o.name)![1];
      // NETLINK_LISTEN_ALL_NSID needs CAP_NET_BROADCAST.
      throw new AppshotError(`${where}: ${label} cannot be set again: ${(e as Error).message}`);
    }
  }
  if (n.portId) {
    try {
      addon().sockBind(sock, nlAddress(n.portId, 0));
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const taken = err.code === 'EADDRINUSE';
      throw new AppshotError(
        `${where}: ${taken ? `port id ${n.portId} is taken by another netlink socket of this network namespace (the original still running?)` : `cannot be bound to port id ${n.portId}: ${err.message}`}`,
        taken ? ExitCode.conflict : undefined,
      );
    }
    const bound = boundPortId(sock);
    if (bound !== n.portId) throw new AppshotError(`${where}: bound to port id ${bound} instead`);
  }
  for (const g of n.groups) {
    try {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(g);
      addon().setSockOptBytes(sock, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, b);
    } catch (e) {
      throw new AppshotError(`${where}: multicast group ${g} cannot be joined again: ${(e as Error).message}`);
    }
  }
  if (n.connected) {
    try {
      addon().sockConnect(sock, nlAddress(n.dstPortId, n.dstGroup ? 2 ** (n.dstGroup - 1) : 0));
    } catch (e) {
      throw new AppshotError(`${where}: cannot be connected to ${n.dstGroup ? `group ${n.dstGroup}` : `port id ${n.dstPortId}`} again: ${(e as Error).message}`);
    }
  }
  return sock;
}

const NETLINK_ROUTE = 0;
const NETLINK_SOCK_DIAG = 4;
const NETLINK_KOBJECT_UEVENT = 15;

/**
 * Who may join a protocol's multicast groups, as the kernel decides it
 * for the caller of bind() or NETLINK_ADD_MEMBERSHIP (af_netlink.c
 * netlink_allowed): any process if the protocol's kernel socket was made
 * with NL_CFG_F_NONROOT_RECV, else only one with CAP_NET_ADMIN; then the
 * protocol's own bind hook, which may ask a capability for some groups.
 * NETLINK_ROUTE (rtnetlink_net_init), NETLINK_SOCK_DIAG (diag_net_init:
 * sock_diag_bind only loads a module), NETLINK_AUDIT (audit_net_init:
 * audit_multicast_bind asks CAP_AUDIT_READ for the log's group) and
 * NETLINK_KOBJECT_UEVENT (uevent_net_init: udev's and its clients'
 * uevents, which programs running as a user listen to) set it. A protocol
 * not here is taken as the kernel's default: every group needs
 * CAP_NET_ADMIN (NETLINK_NETFILTER's, NETLINK_XFRM's, the connector's).
 * None of these has NL_CFG_F_NONROOT_SEND (only NETLINK_USERSOCK has):
 * a connect to a port id or a group needs CAP_NET_ADMIN (netlink_connect).
 */
const GROUP_RULES: ReadonlyMap<number, ReadonlyMap<number, { caps: number[]; name: string }>> = new Map([
  [
    NETLINK_ROUTE,
    new Map([
      // rtnetlink_bind: the multicast routing cache reports.
      [30, { caps: [CAP_NET_ADMIN], name: 'RTNLGRP_IPV4_MROUTE_R' }],
      [31, { caps: [CAP_NET_ADMIN], name: 'RTNLGRP_IPV6_MROUTE_R' }],
    ]),
  ],
  [NETLINK_SOCK_DIAG, new Map()],
  // audit_multicast_bind: the audit log's readers (netlinkProblem refuses
  // the group anyway: the restore may hold CAP_AUDIT_READ where the process
  // does not, and which daemon reads it is not carried).
  [NETLINK_AUDIT, new Map([[1, { caps: [CAP_AUDIT_READ], name: 'AUDIT_NLGRP_READLOG' }]])],
  [NETLINK_KOBJECT_UEVENT, new Map()],
]);

/** What joining group `group` of `protocol` asks of its caller: nothing,
 * or one of `caps` (and the group's name, if it has one worth saying). */
export function groupPrivilege(protocol: number, group: number): { caps: number[]; name?: string } | undefined {
  const rules = GROUP_RULES.get(protocol);
  if (!rules) return { caps: [CAP_NET_ADMIN] };
  return rules.get(group);
}

/** What the restore does to netlink socket `n` with its own rights that
 * the kernel lets only a capability do (sockets.ts checkSocketPrivileges):
 * a connect to a port id or a group (netlink_connect: no accepted
 * protocol has NL_CFG_F_NONROOT_SEND), and joining a group only a
 * capability joins (groupPrivilege): of a protocol without
 * NL_CFG_F_NONROOT_RECV, any; of NETLINK_ROUTE, those of multicast
 * routing. The socket's opener is appshot, but connect and bind weigh
 * their caller's rights, the restorer's. */
export function netlinkPrivileges(n: NetlinkSocket): { caps: number[]; what: string }[] {
  const needs: { caps: number[]; what: string }[] = [];
  const name = protocolName(n.protocol);
  if (n.connected && (n.dstPortId || n.dstGroup)) needs.push({ caps: [CAP_NET_ADMIN], what: `a ${name} socket connected to ${n.dstGroup ? `group ${n.dstGroup}` : `port id ${n.dstPortId}`}` });
  for (const g of n.groups) {
    const need = groupPrivilege(n.protocol, g);
    if (need) needs.push({ caps: need.caps, what: `a ${name} socket in group ${g}${need.name ? ` (${need.name})` : ''}` });
  }
  return needs;
}

/** What is wrong with an image's netlink socket, or undefined: an image
 * may come from anyone (validate.ts asks too). */
export function netlinkProblem(s: Socket): string | undefined {
  const n = s.netlink;
  if (s.family !== AF_NETLINK || !n) return `of family ${s.family}, or without its netlink state`;
  if (s.type !== SOCK_RAW && s.type !== SOCK_DGRAM) return `of type ${s.type} (netlink sockets are SOCK_RAW or SOCK_DGRAM)`;
  if (!ACCEPTED.has(n.protocol)) return `of ${protocolName(n.protocol)}, which appshot does not restore`;
  // Joined by the restore, which may hold CAP_AUDIT_READ where the
  // process does not (refuseAuditState).
  if (n.protocol === NETLINK_AUDIT && n.groups.length) return 'of NETLINK_AUDIT in the audit log\'s multicast group, which appshot does not restore';
  if (!Number.isInteger(n.portId) || n.portId < 0 || n.portId > 0xffffffff) return `with port id ${n.portId}`;
  if (n.connected && !n.portId) return 'connected but not bound (connect binds it)';
  if (!n.connected && (n.dstPortId || n.dstGroup)) return 'with a destination but not connected';
  if (n.dstGroup > 32 || n.dstGroup < 0) return `connected to group ${n.dstGroup} (connect names a group among the first 32)`;
  if (n.groups.length > MAX_GROUP || n.groups.some((g) => !Number.isInteger(g) || g < 1 || g > MAX_GROUP)) return `with ${n.groups.length} groups, or a group outside 1..${MAX_GROUP}`;
  if (new Set(n.groups).size !== n.groups.length) return 'joining a group twice';
  if (s.listening || s.address || s.port || s.peerIno || s.queued.length || s.datagrams?.length || s.peerAddress || s.memberships?.length || s.inherited || s.file)
    return 'carrying another kind\'s state (an address, a peer, queued data)';
  for (const o of s.options ?? []) {
    if (o.level === SOL_NETLINK) {
      if (!OPTIONS.some(([x]) => x === o.name) || o.value !== 1 || o.raw?.length || o.device) return `carrying netlink option ${o.name} = ${o.value}, which appshot does not set`;
    } else if (!isCarriedExtra('netlink', AF_NETLINK, OWN, o)) return `carrying socket option ${o.level}/${o.name}, which appshot does not set`;
  }
  return undefined;
}
