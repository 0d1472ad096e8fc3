/**
 * Stream sockets neither connected nor listening: a TCP socket made and
 * perhaps bound, given its options, not yet listening or connecting (a
 * server between socket() and listen(), a client that binds its source
 * port first), and a unix stream or seqpacket socket likewise, unnamed,
 * bound to a path or to an abstract name. Such a socket's whole state is
 * its name and its options: the restore makes a new one, sets the options
 * that decide the bind, binds it to its name, then sets the others; the
 * program goes on to listen or connect with it as it would have.
 *
 * Told apart from a connection that ended (which is in the same CLOSE
 * state, and is not this: its reads say end of file or reset) by what the
 * kernel counted: a TCP socket that never sent or received a segment
 * (TCP_INFO), a unix socket the kernel still calls unconnected
 * (SS_UNCONNECTED in /proc/net/unix, where one whose peer went stays
 * SS_CONNECTED). Those others are refused by name as before.
 *
 * A unix name bound without listening answers no connect, so a live
 * socket there is found in /proc/net/unix instead: one holding the name
 * now is a conflict (the original, after --leave-running); a socket file
 * no socket holds is the ended original's, removed before the bind.
 */
import { closeSync } from 'node:fs';
import { AppshotError, ExitCode } from '../errors.js';
import { type Fd, FdKind, type InodeOwner, type Process, type Socket } from '../image/types.js';
import { addon } from '../native.js';
import { type RestoreContext } from './context.js';
import { AF_INET, AF_INET6, AF_UNIX, makeSockaddr } from './sockaddr.js';
import { applyExtras, isCarriedExtra, type SockKind } from './sockopts.js';
import { clearSocketFile, restoreSocketFile } from './socketfile.js';
import { socketFileIdentities } from './fsident.js';
import { ownerFor } from './files.js';

const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SO_REUSEPORT = 15;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const IPPROTO_TCP = 6;
const TCP_INFO = 11;
/** struct tcp_info: tcpi_segs_out and tcpi_segs_in (u32 each). */
const TCPI_SEGS_OUT = 136;
const TCP_INFO_ROOM = 144;
const SS_UNCONNECTED = 1;
const SOCK_SEQPACKET = 5;
/** What the socket carries in its own fields, not among its options (as
 * a listener does). */
const OWN_FIELDS: [number, number][] = [
  [SOL_SOCKET, SO_REUSEADDR],
  [SOL_SOCKET, SO_REUSEPORT],
  [IPPROTO_IPV6, IPV6_V6ONLY],
];

/** The option catalogue's kind for it: what a socket not yet listening
 * may have set is what a listener may. */
export const optionKind = (family: number): SockKind => (family === AF_UNIX ? 'unix-listen' : 'listen');

/** Whether the TCP socket `dup` never sent nor received a segment. */
export function neverConnected(dup: number): boolean {
  const info = addon().getSockOptBytes(dup, IPPROTO_TCP, TCP_INFO, TCP_INFO_ROOM);
  if (info.length < TCPI_SEGS_OUT + 8) return false;
  return info.readUInt32LE(TCPI_SEGS_OUT) === 0 && info.readUInt32LE(TCPI_SEGS_OUT + 4) === 0;
}

/** Whether /proc/PID/net/unix calls the unix socket unconnected (its St
 * column, sock->state). */
export function unixUnconnected(state: number | undefined): boolean {
  return state === SS_UNCONNECTED;
}

/** Whether `s` (as describe() made it) is one of these. */
export function isUnconnected(s: Socket): boolean {
  return s.type !== 2 && !s.listening && !s.peerIno && !s.kept && !s.peerGone;
}

/** Its name as a message or `inspect` shows it. */
export function unconnectedName(s: Socket): string {
  const type = s.family === AF_UNIX ? `unix ${s.type === SOCK_SEQPACKET ? 'seqpacket' : 'stream'} socket` : 'TCP socket';
  if (s.family === AF_UNIX) return `${type}${s.address ? ` bound to ${s.address}` : ''}`;
  const at = s.address.includes(':') ? `[${s.address}]` : s.address;
  return `${type}${s.port ? ` bound to ${at}:${s.port}` : ''}`;
}

/** For `inspect`. */
export function describeUnconnected(s: Socket): string {
  return `${unconnectedName(s)}, neither connected nor listening`;
}

/** Why a template cannot have it, if it cannot: a bound name is the
 * node's, and every clone cannot bind it. */
export function templateProblem(s: Socket): string | undefined {
  if (s.port || (s.family === AF_UNIX && s.address && !/^@[0-9a-f]{5}$/.test(s.address)))
    return `a ${unconnectedName(s)} (not listening) cannot be bound by every clone`;
  return undefined;
}

/** The restore's descriptor for image fd `fd`: one socket per socket of
 * the image, however many descriptors share it. */
export function openUnconnected(h: RestoreContext, p: Process, fd: Fd): number {
  const s = fd.socket;
  const what = `process ${p.vpid} fd ${fd.fd}`;
  if (!s || fd.kind !== FdKind.UNCONNECTED_STREAM) throw new AppshotError(`corrupt image: ${what}: an unconnected socket without its state`);
  return h.once(`socket ${s.ino}`, () => {
    const sock = h.keep(make(h, s, `${what}: the ${unconnectedName(s)}`, ownerFor(h, p, fd)));
    addon().setStatusFlags(sock, fd.flags);
    return sock;
  });
}

/** `owner`: made with it (files.ts ownerFor), before any bind. */
function make(h: RestoreContext, s: Socket, where: string, owner: InodeOwner | undefined): number {
  const kind = optionKind(s.family);
  const options = s.options ?? [];
  for (const o of options)
    if (!isCarriedExtra(kind, s.family, OWN_FIELDS, o)) throw new AppshotError(`corrupt image: ${where} carries socket option ${o.level}/${o.name}, which appshot does not set`);
  if (s.family !== AF_UNIX && s.family !== AF_INET && s.family !== AF_INET6) throw new AppshotError(`corrupt image: ${where} is of address family ${s.family}`);
  const sock = addon().sockOpen(s.family, s.type, 0, owner);
  try {
    if (s.reuseaddr) addon().setSockOpt(sock, SOL_SOCKET, SO_REUSEADDR, 1);
    if (s.reuseport) addon().setSockOpt(sock, SOL_SOCKET, SO_REUSEPORT, 1);
    if (s.family === AF_INET6) addon().setSockOpt(sock, IPPROTO_IPV6, IPV6_V6ONLY, s.v6only ? 1 : 0);
    applyExtras(sock, options, OWN_FIELDS, true, where);
    if (s.family === AF_UNIX ? s.address !== '' : s.port !== 0 || boundAddressOnly(s)) bind(h, sock, s, where);
    applyExtras(sock, options, OWN_FIELDS, false, where);
    return sock;
  } catch (e) {
    closeSync(sock);
    throw e;
  }
}

/** A TCP socket bound to an address of its own with no port yet
 * (IP_BIND_ADDRESS_NO_PORT, set before the bind: its connect picks the
 * port), as a proxy binds its outgoing connections' source address:
 * bound again so, where an unbound one would connect from any address. */
function boundAddressOnly(s: Socket): boolean {
  return s.port === 0 && s.address !== '' && s.address !== '0.0.0.0' && s.address !== '::';
}

function bind(h: RestoreContext, sock: number, s: Socket, where: string): void {
  // A unix name is bound as its process would (fsident.ts).
  const who = s.family === AF_UNIX ? socketFileIdentities(h.image, s.ino, s.address, s.file?.base) : undefined;
  if (s.family === AF_UNIX) clearSocketFile(h, s.address, s.file, where, who);
  try {
    addon().sockBind(sock, makeSockaddr({ family: s.family, address: s.address || (s.family === AF_INET ? '0.0.0.0' : '::'), port: s.port }), s.file?.base || undefined, who);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new AppshotError(`${where}: cannot be bound again: ${err.message}`, err.code === 'EADDRINUSE' ? ExitCode.conflict : undefined);
  }
  if (s.family === AF_UNIX) restoreSocketFile(h, sock, s.address, s.file, where, who);
}
