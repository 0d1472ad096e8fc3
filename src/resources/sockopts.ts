/**
 * Socket options that a program may set and read back, carried by every
 * socket kind (udp.ts, tcp.ts, unixdgram.ts, sockets.ts) beyond the few
 * each kind handles itself: one catalogue, which says for each option the
 * kinds it is carried for, its form (an integer, a struct or string, an
 * interface), and whether it must be set before the bind.
 *
 * Dump: each option of the socket's kind is read from the socket and from a
 * fresh socket of the same family and type; only one the application
 * changed (it differs from the fresh one's) goes in the image. An option
 * the kernel does not know (ENOPROTOOPT, EINVAL) cannot have been set.
 * An interface (IPV6_MULTICAST_IF, IP_UNICAST_IF, SO_BINDTODEVICE) is
 * recorded by name, and its index on the restoring node set.
 *
 * Restore: an option is set only where the new socket differs (a fresh
 * socket's defaults need no call, and one the restoring node sets itself,
 * by sysctl, is left to it); one that cannot be set fails the restore,
 * naming the socket and the option.
 *
 * What the kernel lets a program set but never shows (the steering program
 * of a reuseport group, an IPv4 multicast interface chosen by index only)
 * is noted by the preload library when the program sets it, and read here
 * from the application's tables (noted()).
 */
import { closeSync, readFileSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import type { SocketOption } from '../image/types.js';
import { addon, type SocketNotes } from '../native.js';
import { Unsupported } from './context.js';
import { AF_INET, AF_INET6 } from './sockaddr.js';
import { CAP_NET_ADMIN, CAP_NET_BROADCAST, CAP_NET_RAW } from './heldcaps.js';

export type SockKind = 'tcp' | 'listen' | 'udp' | 'unix-stream' | 'unix-listen' | 'unix-dgram' | 'netlink';

const SOL_SOCKET = 1;
const IPPROTO_IP = 0;
const IPPROTO_IPV6 = 41;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;
const SO_BINDTODEVICE = 25;
const IP_MULTICAST_IF = 32;
const TCP_ULP = 31;
const SO_ATTACH_REUSEPORT_CBPF = 51;
const SO_ATTACH_REUSEPORT_EBPF = 52;

/** How an option's value is given and read. */
type Form =
  | 'int'
  /** A struct or string of at most this many bytes. */
  | { bytes: number }
  /** An interface index, in host order (IPV6_MULTICAST_IF). */
  | 'ifindex'
  /** An interface index in network order (IP_UNICAST_IF, IPV6_UNICAST_IF). */
  | 'ifindex-be'
  /** An interface name (SO_BINDTODEVICE). */
  | 'ifname';

interface Spec {
  level: number;
  name: number;
  label: string;
  kinds: readonly SockKind[];
  form: Form;
  /** Decides what the bind may do: set between socket() and bind(). */
  early?: boolean;
  /** A buffer size, carried only when the application fixed it
   * (SO_BUF_LOCK's bit): otherwise the kernel tunes it. */
  lockBit?: number;
  /** Only for sockets of this family (IPPROTO_IPV6's are IPv6's). */
  family?: number;
  /** Not read back by getsockopt: the value is what the preload library
   * noted of option number `noted` (the spec's own number is one appshot
   * gives itself, NOTED + it), which the restore sets, and notes again. */
  noted?: number;
}

/** Where the numbers of options carried from the preload library's notes
 * start: apart from the kernel's, which read back otherwise. */
const NOTED = 0x10000;
/** The level of a note that is a directory's dnotify watch, not a socket
 * option (APPSHOT_NOTE_DNOTIFY, appshot_table.h; fdowner.ts reads it). */
export const NOTE_DNOTIFY = -1;
/** The level of a note that is a message queue's SIGEV_SIGNAL registration
 * (APPSHOT_NOTE_MQ_NOTIFY, appshot_table.h; mqueue.ts reads and writes
 * it), keyed by the queue's inode. */
export const NOTE_MQ_NOTIFY = -2;

const ALL: readonly SockKind[] = ['tcp', 'listen', 'udp', 'unix-stream', 'unix-listen', 'unix-dgram', 'netlink'];
const INET: readonly SockKind[] = ['tcp', 'listen', 'udp'];
const TCP: readonly SockKind[] = ['tcp', 'listen'];
const LISTEN: readonly SockKind[] = ['listen'];
const UDP: readonly SockKind[] = ['udp'];
const UNIX: readonly SockKind[] = ['unix-stream', 'unix-listen', 'unix-dgram'];
const STREAMS: readonly SockKind[] = ['tcp', 'listen', 'unix-stream', 'unix-listen'];
/** A netlink socket's buffer sizes, fixed by the program (a listener to
 * busy groups raises its receive buffer), carried as a stream's are. */
const SIZED: readonly SockKind[] = [...STREAMS, 'netlink'];

const spec = (level: number, name: number, label: string, kinds: readonly SockKind[], more: Partial<Spec> = {}): Spec => ({
  level,
  name,
  label,
  kinds,
  form: 'int',
  ...more,
  ...(level === IPPROTO_IPV6 ? { family: AF_INET6 } : {}),
});

/** Every option carried beyond a kind's own list. Options that need a
 * privilege to set (SO_MARK, IP_TRANSPARENT, SO_BUSY_POLL raised, SO_DEBUG)
 * are here too: carried if the application had it, and a restore without
 * the privilege says so. The audit of what is and is not carried, and why,
 * is in docs/socket-options.md. */
export const CATALOGUE: readonly Spec[] = [
  spec(SOL_SOCKET, 1, 'SO_DEBUG', ALL),
  spec(SOL_SOCKET, 5, 'SO_DONTROUTE', INET),
  spec(SOL_SOCKET, 6, 'SO_BROADCAST', INET),
  spec(SOL_SOCKET, SO_SNDBUF, 'SO_SNDBUF', SIZED, { lockBit: 1 }),
  spec(SOL_SOCKET, SO_RCVBUF, 'SO_RCVBUF', SIZED, { lockBit: 2 }),
  spec(SOL_SOCKET, 9, 'SO_KEEPALIVE', TCP),
  spec(SOL_SOCKET, 10, 'SO_OOBINLINE', STREAMS),
  spec(SOL_SOCKET, 11, 'SO_NO_CHECK', UDP),
  spec(SOL_SOCKET, 12, 'SO_PRIORITY', ALL),
  spec(SOL_SOCKET, 13, 'SO_LINGER', STREAMS, { form: { bytes: 8 } }),
  // A netlink socket's too: udev's clients check that a uevent's sender
  // is root by it.
  spec(SOL_SOCKET, 16, 'SO_PASSCRED', [...UNIX, 'netlink']),
  // Any socket keeps the number (only TCP acts on it), and shows it.
  spec(SOL_SOCKET, 18, 'SO_RCVLOWAT', ALL),
  spec(SOL_SOCKET, 20, 'SO_RCVTIMEO', ALL, { form: { bytes: 16 } }),
  spec(SOL_SOCKET, 21, 'SO_SNDTIMEO', ALL, { form: { bytes: 16 } }),
  spec(SOL_SOCKET, SO_BINDTODEVICE, 'SO_BINDTODEVICE', INET, { form: 'ifname', early: true }),
  spec(SOL_SOCKET, 29, 'SO_TIMESTAMP', ALL),
  spec(SOL_SOCKET, 34, 'SO_PASSSEC', UNIX),
  spec(SOL_SOCKET, 35, 'SO_TIMESTAMPNS', ALL),
  spec(SOL_SOCKET, 36, 'SO_MARK', INET),
  spec(SOL_SOCKET, 37, 'SO_TIMESTAMPING', ALL, { form: { bytes: 8 } }),
  spec(SOL_SOCKET, 40, 'SO_RXQ_OVFL', ALL),
  spec(SOL_SOCKET, 41, 'SO_WIFI_STATUS', ALL),
  spec(SOL_SOCKET, 42, 'SO_PEEK_OFF', ['tcp', 'unix-stream']),
  spec(SOL_SOCKET, 43, 'SO_NOFCS', ALL),
  spec(SOL_SOCKET, 44, 'SO_LOCK_FILTER', ALL),
  spec(SOL_SOCKET, 45, 'SO_SELECT_ERR_QUEUE', ALL),
  spec(SOL_SOCKET, 46, 'SO_BUSY_POLL', INET),
  spec(SOL_SOCKET, 47, 'SO_MAX_PACING_RATE', INET, { form: { bytes: 8 } }),
  // The kernel writes it itself only on a TCP connection and a connected
  // UDP socket, as packets arrive (from then on it overwrites the carried
  // number, as it would have); elsewhere only the application does. Any
  // number is taken, CPUs this node lacks too: such a socket is never the
  // CPU's choice of its reuseport group, the group falls back to the hash.
  spec(SOL_SOCKET, 49, 'SO_INCOMING_CPU', ALL),
  spec(SOL_SOCKET, 60, 'SO_ZEROCOPY', INET),
  spec(SOL_SOCKET, 61, 'SO_TXTIME', INET, { form: { bytes: 8 } }),
  spec(SOL_SOCKET, 63, 'SO_TIMESTAMP_NEW', ALL),
  spec(SOL_SOCKET, 64, 'SO_TIMESTAMPNS_NEW', ALL),
  // The same flags as SO_TIMESTAMPING, set so that timestamps come in the
  // 64-bit form: read through this number they show only then (else
  // zeros). After the old form and the other _NEW ones, which set or clear
  // the one bit all of them share, as the program's last call left it.
  spec(SOL_SOCKET, 65, 'SO_TIMESTAMPING_NEW', ALL, { form: { bytes: 8 } }),
  spec(SOL_SOCKET, 69, 'SO_PREFER_BUSY_POLL', INET),
  // After the buffer sizes, which lock what they set: the application's
  // own locks come back as they were.
  spec(SOL_SOCKET, 72, 'SO_BUF_LOCK', ALL),
  spec(SOL_SOCKET, 73, 'SO_RESERVE_MEM', INET),
  spec(SOL_SOCKET, 74, 'SO_TXREHASH', TCP),
  spec(SOL_SOCKET, 75, 'SO_RCVMARK', ALL),
  spec(SOL_SOCKET, 76, 'SO_PASSPIDFD', UNIX),
  spec(SOL_SOCKET, 82, 'SO_RCVPRIORITY', ALL),
  spec(SOL_SOCKET, 83, 'SO_PASSRIGHTS', UNIX),

  spec(IPPROTO_IP, 1, 'IP_TOS', INET),
  spec(IPPROTO_IP, 2, 'IP_TTL', INET),
  spec(IPPROTO_IP, 4, 'IP_OPTIONS', INET, { form: { bytes: 40 } }),
  spec(IPPROTO_IP, 6, 'IP_RECVOPTS', INET),
  spec(IPPROTO_IP, 7, 'IP_RETOPTS', INET),
  spec(IPPROTO_IP, 8, 'IP_PKTINFO', UDP),
  spec(IPPROTO_IP, 10, 'IP_MTU_DISCOVER', INET),
  spec(IPPROTO_IP, 11, 'IP_RECVERR', INET),
  spec(IPPROTO_IP, 12, 'IP_RECVTTL', UDP),
  spec(IPPROTO_IP, 13, 'IP_RECVTOS', INET),
  spec(IPPROTO_IP, 15, 'IP_FREEBIND', INET, { early: true }),
  spec(IPPROTO_IP, 18, 'IP_PASSSEC', UDP),
  spec(IPPROTO_IP, 19, 'IP_TRANSPARENT', INET, { early: true }),
  spec(IPPROTO_IP, 20, 'IP_RECVORIGDSTADDR', UDP),
  spec(IPPROTO_IP, 21, 'IP_MINTTL', INET),
  spec(IPPROTO_IP, 23, 'IP_CHECKSUM', UDP),
  spec(IPPROTO_IP, 24, 'IP_BIND_ADDRESS_NO_PORT', INET, { early: true }),
  spec(IPPROTO_IP, 25, 'IP_RECVFRAGSIZE', UDP),
  spec(IPPROTO_IP, 26, 'IP_RECVERR_RFC4884', INET),
  // By address; chosen by index only, the kernel shows 0.0.0.0: the
  // preload library notes the index (noted()).
  spec(IPPROTO_IP, IP_MULTICAST_IF, 'IP_MULTICAST_IF', UDP, { form: { bytes: 4 } }),
  spec(IPPROTO_IP, 33, 'IP_MULTICAST_TTL', UDP),
  spec(IPPROTO_IP, 34, 'IP_MULTICAST_LOOP', UDP),
  spec(IPPROTO_IP, 49, 'IP_MULTICAST_ALL', UDP),
  spec(IPPROTO_IP, 50, 'IP_UNICAST_IF', INET, { form: 'ifindex-be' }),
  spec(IPPROTO_IP, 51, 'IP_LOCAL_PORT_RANGE', INET, { early: true }),

  spec(IPPROTO_IPV6, 2, 'IPV6_2292PKTINFO', UDP),
  spec(IPPROTO_IPV6, 3, 'IPV6_2292HOPOPTS', UDP),
  spec(IPPROTO_IPV6, 4, 'IPV6_2292DSTOPTS', UDP),
  spec(IPPROTO_IPV6, 5, 'IPV6_2292RTHDR', UDP),
  spec(IPPROTO_IPV6, 8, 'IPV6_2292HOPLIMIT', UDP),
  spec(IPPROTO_IPV6, 11, 'IPV6_FLOWINFO', INET),
  spec(IPPROTO_IPV6, 16, 'IPV6_UNICAST_HOPS', INET),
  spec(IPPROTO_IPV6, 17, 'IPV6_MULTICAST_IF', UDP, { form: 'ifindex' }),
  spec(IPPROTO_IPV6, 23, 'IPV6_MTU_DISCOVER', INET),
  // The largest fragment a UDP socket sends; getsockopt gives the path's
  // MTU instead (TCP never fragments through it: not noted there).
  spec(IPPROTO_IPV6, NOTED + 24, 'IPV6_MTU', UDP, { noted: 24 }),
  spec(IPPROTO_IPV6, 25, 'IPV6_RECVERR', INET),
  spec(IPPROTO_IPV6, 29, 'IPV6_MULTICAST_ALL', UDP),
  spec(IPPROTO_IPV6, 30, 'IPV6_ROUTER_ALERT_ISOLATE', UDP),
  spec(IPPROTO_IPV6, 31, 'IPV6_RECVERR_RFC4884', INET),
  spec(IPPROTO_IPV6, 33, 'IPV6_FLOWINFO_SEND', INET),
  spec(IPPROTO_IPV6, 51, 'IPV6_RECVHOPLIMIT', UDP),
  spec(IPPROTO_IPV6, 53, 'IPV6_RECVHOPOPTS', UDP),
  spec(IPPROTO_IPV6, 54, 'IPV6_HOPOPTS', INET, { form: { bytes: 2048 } }),
  spec(IPPROTO_IPV6, 55, 'IPV6_RTHDRDSTOPTS', INET, { form: { bytes: 2048 } }),
  spec(IPPROTO_IPV6, 56, 'IPV6_RECVRTHDR', UDP),
  spec(IPPROTO_IPV6, 57, 'IPV6_RTHDR', INET, { form: { bytes: 2048 } }),
  spec(IPPROTO_IPV6, 58, 'IPV6_RECVDSTOPTS', UDP),
  spec(IPPROTO_IPV6, 59, 'IPV6_DSTOPTS', INET, { form: { bytes: 2048 } }),
  spec(IPPROTO_IPV6, 60, 'IPV6_RECVPATHMTU', UDP),
  spec(IPPROTO_IPV6, 62, 'IPV6_DONTFRAG', INET),
  spec(IPPROTO_IPV6, 66, 'IPV6_RECVTCLASS', INET),
  spec(IPPROTO_IPV6, 67, 'IPV6_TCLASS', INET),
  spec(IPPROTO_IPV6, 70, 'IPV6_AUTOFLOWLABEL', INET),
  spec(IPPROTO_IPV6, 72, 'IPV6_ADDR_PREFERENCES', INET),
  spec(IPPROTO_IPV6, 73, 'IPV6_MINHOPCOUNT', INET),
  spec(IPPROTO_IPV6, 74, 'IPV6_RECVORIGDSTADDR', UDP),
  spec(IPPROTO_IPV6, 75, 'IPV6_TRANSPARENT', INET, { early: true }),
  spec(IPPROTO_IPV6, 76, 'IPV6_UNICAST_IF', INET, { form: 'ifindex-be' }),
  spec(IPPROTO_IPV6, 77, 'IPV6_RECVFRAGSIZE', UDP),
  spec(IPPROTO_IPV6, 78, 'IPV6_FREEBIND', INET, { early: true }),

  spec(IPPROTO_TCP, 1, 'TCP_NODELAY', TCP),
  // A listener's is what the application asked for; a connection's is
  // the kernel's (repair mode carries its MSS clamp).
  spec(IPPROTO_TCP, 2, 'TCP_MAXSEG', LISTEN),
  spec(IPPROTO_TCP, 4, 'TCP_KEEPIDLE', TCP),
  spec(IPPROTO_TCP, 5, 'TCP_KEEPINTVL', TCP),
  spec(IPPROTO_TCP, 6, 'TCP_KEEPCNT', TCP),
  spec(IPPROTO_TCP, 7, 'TCP_SYNCNT', TCP),
  spec(IPPROTO_TCP, 8, 'TCP_LINGER2', TCP),
  spec(IPPROTO_TCP, 9, 'TCP_DEFER_ACCEPT', LISTEN),
  // A connection's is the kernel's own as much as the program's (the
  // kernel sets it at the handshake and raises it as it tunes the receive
  // buffer): either way what getsockopt shows, set again once the restored
  // connection is out of repair mode, where the kernel chose its own.
  spec(IPPROTO_TCP, 10, 'TCP_WINDOW_CLAMP', TCP),
  spec(IPPROTO_TCP, 13, 'TCP_CONGESTION', TCP, { form: { bytes: 16 } }),
  spec(IPPROTO_TCP, 16, 'TCP_THIN_LINEAR_TIMEOUTS', TCP),
  spec(IPPROTO_TCP, 17, 'TCP_THIN_DUPACK', TCP),
  spec(IPPROTO_TCP, 18, 'TCP_USER_TIMEOUT', TCP),
  spec(IPPROTO_TCP, 23, 'TCP_FASTOPEN', LISTEN),
  spec(IPPROTO_TCP, 25, 'TCP_NOTSENT_LOWAT', TCP),
  spec(IPPROTO_TCP, 27, 'TCP_SAVE_SYN', LISTEN),
  // A listener's own fast open keys (primary and backup, 16 bytes each).
  spec(IPPROTO_TCP, 33, 'TCP_FASTOPEN_KEY', LISTEN, { form: { bytes: 32 } }),
  spec(IPPROTO_TCP, 34, 'TCP_FASTOPEN_NO_COOKIE', TCP),
  spec(IPPROTO_TCP, 36, 'TCP_INQ', TCP),
  spec(IPPROTO_TCP, 37, 'TCP_TX_DELAY', TCP),
  spec(IPPROTO_TCP, 44, 'TCP_RTO_MAX_MS', TCP),
  spec(IPPROTO_TCP, 45, 'TCP_RTO_MIN_US', TCP),
  spec(IPPROTO_TCP, 46, 'TCP_DELACK_MAX_US', TCP),

  spec(IPPROTO_UDP, 100, 'UDP_ENCAP', UDP),
  spec(IPPROTO_UDP, 101, 'UDP_NO_CHECK6_TX', UDP),
  spec(IPPROTO_UDP, 102, 'UDP_NO_CHECK6_RX', UDP),
  spec(IPPROTO_UDP, 103, 'UDP_SEGMENT', UDP),
  spec(IPPROTO_UDP, 104, 'UDP_GRO', UDP),
];

/** Options named in messages. */
export function optionLabel(level: number, name: number): string {
  return CATALOGUE.find((s) => s.level === level && s.name === name)?.label ?? `option ${level}/${name}`;
}

type Pair = readonly [level: number, name: number];

/** The catalogue's options for a socket of `kind` and `family`, less
 * those its kind carries itself (`own`). */
const specsCache = new Map<string, Spec[]>();

function specsFor(kind: SockKind, family: number, own: readonly Pair[]): Spec[] {
  const key = `${kind}/${family}/${own.join(';')}`;
  let specs = specsCache.get(key);
  if (!specs) specsCache.set(key, (specs = filterSpecs(kind, family, own)));
  return specs;
}

function filterSpecs(kind: SockKind, family: number, own: readonly Pair[]): Spec[] {
  const inet = family === AF_INET || family === AF_INET6;
  return CATALOGUE.filter(
    (s) =>
      s.kinds.includes(kind) &&
      (s.family === undefined || s.family === family) &&
      (inet || s.level === SOL_SOCKET) &&
      s.noted === undefined &&
      !own.some(([l, n]) => l === s.level && n === s.name),
  );
}

/** The catalogue's option carried from a note, by its own number. */
function notedSpec(kind: SockKind, family: number, level: number, name: number): Spec | undefined {
  return CATALOGUE.find((s) => s.noted !== undefined && s.level === level && s.name === name && s.kinds.includes(kind) && (s.family === undefined || s.family === family));
}

function specOf(o: SocketOption): Spec | undefined {
  return CATALOGUE.find((s) => s.level === o.level && s.name === o.name);
}

/** Whether an image's option `o` is one the catalogue carries for this
 * kind (not one of the kind's own), and well formed. */
export function isCarriedExtra(kind: SockKind, family: number, own: readonly Pair[], o: SocketOption): boolean {
  const s = specsFor(kind, family, own).find((x) => x.level === o.level && x.name === o.name) ?? notedSpec(kind, family, o.level, o.name);
  if (!s) return false;
  if (s.noted !== undefined) return !o.raw?.length && !o.device && o.value > 0;
  if (typeof s.form === 'object') return !!o.raw && o.raw.length <= s.form.bytes && !o.device;
  if (s.form === 'int') return !o.raw?.length && !o.device;
  return !o.raw?.length && (o.device === '' || o.device === undefined || /^[^/\s:]{1,15}$/.test(o.device));
}

/** The options of `options` that are the catalogue's, not the kind's own. */
export function extrasOf(options: SocketOption[], own: readonly Pair[]): SocketOption[] {
  return options.filter((o) => !own.some(([l, n]) => l === o.level && n === o.name));
}

/** Errors that say the kernel has no such option for this socket:
 * ENOPROTOOPT, EINVAL, EOPNOTSUPP, ENOTCONN. */
const IGNORED = new Set([92, 22, 95, 107]);

/** How many bytes an option is read into. */
const roomOf = (s: Spec) => (typeof s.form === 'object' ? s.form.bytes : s.form === 'ifname' ? 16 : 4);

const triplesCache = new WeakMap<readonly Spec[], Int32Array>();

/** [level, name, room] of each, as getSockOptsBatch takes them. */
function triplesOf(specs: readonly Spec[]): Int32Array {
  let t = triplesCache.get(specs);
  if (!t) {
    t = new Int32Array(specs.length * 3);
    for (const [i, s] of specs.entries()) t.set([s.level, s.name, roomOf(s)], i * 3);
    triplesCache.set(specs, t);
  }
  return t;
}

/** Where each option's bytes start in a batch's data. */
const offsetsCache = new WeakMap<readonly Spec[], Int32Array>();
function offsetsOf(specs: readonly Spec[]): Int32Array {
  let o = offsetsCache.get(specs);
  if (!o) {
    o = new Int32Array(specs.length);
    let at = 0;
    for (const [i, s] of specs.entries()) {
      o[i] = at;
      at += roomOf(s);
    }
    offsetsCache.set(specs, o);
  }
  return o;
}

/** The raw answers for `specs`: one call to the kernel per option, one
 * crossing into the addon. */
type RawBatch = { data: Buffer; lengths: Int32Array | number[] };
const readRaw = (fd: number, specs: readonly Spec[]): RawBatch => addon().getSockOptsBatch(fd, triplesOf(specs));

/** Option i of a raw batch as the image records it; undefined for one the
 * kernel does not have for this socket. */
function decode(specs: readonly Spec[], raw: RawBatch, i: number): SocketOption | undefined {
  const s = specs[i];
  const { data, lengths } = raw;
  const from = offsetsOf(specs)[i];
  if (lengths[i] < 0) {
    if (IGNORED.has(-lengths[i])) return undefined;
    throw Object.assign(new Error(`getsockopt ${s.label}: errno ${-lengths[i]}`), { errno: -lengths[i] });
  }
  const got = data.subarray(from, from + lengths[i]);
  // A copy: the image keeps it, and `data` is one allocation for all.
  if (typeof s.form === 'object') return { level: s.level, name: s.name, value: 0, raw: Buffer.from(got) };
  if (s.form === 'ifname') {
    const end = got.indexOf(0);
    return { level: s.level, name: s.name, value: 0, device: got.subarray(0, end < 0 ? got.length : end).toString('utf8') };
  }
  const value = got.length >= 4 ? data.readInt32LE(from) : got.length ? got[0] : 0;
  if (s.form === 'int') return { level: s.level, name: s.name, value };
  return { level: s.level, name: s.name, value: s.form === 'ifindex-be' ? ntohl(value) : value, device: '' };
}

/** Whether option i reads back the same bytes in two batches. */
function sameRaw(specs: readonly Spec[], a: RawBatch, b: RawBatch, i: number): boolean {
  if (a.lengths[i] !== b.lengths[i]) return false;
  if (a.lengths[i] < 0) return true;
  const from = offsetsOf(specs)[i];
  return a.data.compare(b.data, from, from + a.lengths[i], from, from + a.lengths[i]) === 0;
}

/** One option read as the image records it; undefined for one the kernel
 * does not have for this socket. */
function readOne(fd: number, s: Spec): SocketOption | undefined {
  const specs = [s];
  return decode(specs, readRaw(fd, specs), 0);
}

function ntohl(v: number): number {
  const b = Buffer.alloc(4);
  b.writeInt32LE(v);
  return b.readInt32BE();
}

function same(a: SocketOption, b: SocketOption): boolean {
  if (a.raw?.length || b.raw?.length) return !!a.raw && !!b.raw && a.raw.equals(b.raw);
  return a.value === b.value && (a.device ?? '') === (b.device ?? '');
}

/**
 * The catalogue's options of the socket `dup` (a duplicate of the
 * application's) that the application changed: those that differ from a
 * fresh socket's. An interface is named; one that has no name (gone since)
 * cannot be carried and is refused, as is a notion the preload library
 * noted that nothing can carry (notes).
 */
export function readExtras(dup: number, kind: SockKind, family: number, type: number, own: readonly Pair[], where: string): SocketOption[] {
  const specs = specsFor(kind, family, own);
  const defaults = freshDefaults(kind, family, type, specs);
  const out: SocketOption[] = [];
  {
    let locks = 0;
    try {
      locks = addon().getSockOpt(dup, SOL_SOCKET, 72);
    } catch {
      /* a kernel without SO_BUF_LOCK: buffers set by setsockopt lock them anyway, not shown */
    }
    const raw = readRaw(dup, specs);
    for (const [i, s] of specs.entries()) {
      if (s.lockBit && !(locks & s.lockBit)) continue;
      // Most options are a fresh socket's: compared as bytes, not decoded.
      if (sameRaw(specs, raw, defaults.raw, i)) continue;
      const mine = decode(specs, raw, i);
      if (!mine) continue;
      const theirs = defaults.values.get(s);
      if (theirs && same(mine, theirs)) continue;
      // An interface index: by name, the index of that name on the
      // restoring node is set.
      const byName = named(mine);
      if (mine.device === '' && mine.value && !byName.device)
        throw new Unsupported(`${where} has ${s.label} set to interface index ${mine.value}, which no interface has now`);
      out.push(byName);
    }
  }
  return out;
}

/** A fresh socket's options, by kind, family and type: read once a second
 * at most (a snapshot of many sockets asks for them again and again; a
 * sysctl that changes a default is seen within the second). */
const FRESH_TTL_MS = 1000;
interface Fresh {
  values: Map<Spec, SocketOption | undefined>;
  raw: RawBatch;
}
const freshCache = new Map<string, { at: number; specs: Spec[] } & Fresh>();

function freshDefaults(kind: SockKind, family: number, type: number, specs: Spec[]): Fresh {
  const key = `${kind}/${family}/${type}`;
  const known = freshCache.get(key);
  const now = Date.now();
  if (known && now - known.at < FRESH_TTL_MS && known.specs === specs) return known;
  const fresh = addon().sockOpen(family, type);
  try {
    const raw = readRaw(fresh, specs);
    const values = new Map(specs.map((s, i) => [s, decode(specs, raw, i)] as const));
    const entry = { at: now, specs, values, raw };
    freshCache.set(key, entry);
    return entry;
  } finally {
    closeSync(fresh);
  }
}

/** An interface index read back, by name as the image has it. */
function named(o: SocketOption): SocketOption {
  if (o.device !== '') return o;
  return { ...o, value: 0, device: o.value ? addon().ifName(o.value) : '' };
}

/** The bytes setsockopt is given for `o` on this node. */
function bytesOf(o: SocketOption, s: Spec, where: string): Buffer {
  if (o.raw && o.raw.length) return o.raw;
  if (s.form === 'ifname') return Buffer.from(o.device ?? '', 'utf8');
  let value = o.value;
  if (s.form === 'ifindex' || s.form === 'ifindex-be') {
    value = 0;
    if (o.device) {
      value = addon().ifIndex(o.device);
      if (!value) throw new AppshotError(`${where} had ${s.label} set to interface ${o.device}, which this node does not have`);
    }
    if (s.form === 'ifindex-be') value = ntohl(value);
  }
  const b = Buffer.alloc(4);
  b.writeInt32LE(value);
  return b;
}

/** The options a listener's bind needs set first, as listenSocket takes them. */
export function earlyBytes(options: SocketOption[], own: readonly Pair[], where: string): { level: number; name: number; bytes: Buffer }[] {
  return extrasOf(options, own)
    .map((o) => ({ o, s: specOf(o) }))
    .filter(({ s }) => s?.early)
    .map(({ o, s }) => ({ level: o.level, name: o.name, bytes: bytesOf(o, s!, where) }));
}

/**
 * Sets the catalogue's options of `options` on `sock`, made by the
 * restore: those that decide the bind (`early`) or all the others. Each
 * only where the new socket differs. A buffer size is given as the kernel
 * takes it (half what it shows), beyond the node's limits where appshot
 * may (SO_*BUFFORCE).
 */
export function applyExtras(sock: number, options: SocketOption[], own: readonly Pair[], early: boolean, where: string): void {
  for (const o of extrasOf(options, own)) {
    const s = specOf(o);
    if (!s || !!s.early !== early) continue;
    const want = bytesOf(o, s, where);
    try {
      if (s.noted !== undefined) {
        // Nothing to compare with: the kernel does not show it.
        addon().setSockOptBytes(sock, s.level, s.noted, want);
        continue;
      }
      if (s.lockBit) {
        const half = Math.max(1, Math.floor(o.value / 2));
        if (addon().getSockOpt(sock, s.level, s.name) === o.value) continue;
        try {
          addon().setSockOpt(sock, SOL_SOCKET, s.name === SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE, half);
        } catch {
          addon().setSockOpt(sock, SOL_SOCKET, s.name, half);
        }
        continue;
      }
      const now = readOne(sock, s);
      if (now && same(named(now), o)) continue;
      addon().setSockOptBytes(sock, s.level, s.name, want);
    } catch (e) {
      if (e instanceof AppshotError) throw e;
      const shown = o.device ? `interface ${o.device}` : o.raw?.length ? `${o.raw.length} bytes` : String(o.value);
      throw new AppshotError(`${where}: ${s.label} (${shown}) cannot be set again: ${(e as Error).message}`);
    }
  }
}

/* ---- the privilege rule ------------------------------------------------- */

/** A sysctl of this node, as a number (or text); undefined if unreadable. */
function sysctlText(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * What option `o` of an image takes to be set again, as the kernel asks it
 * of the caller of setsockopt (net/core/sock.c, ipv4 and ipv6 sockglue),
 * or undefined if nothing: `caps` (any one of them) and what it is, for
 * the refusal's line. A restore by root would set any of them; made for
 * a process that could not have set it, it would be more than the image
 * had (sockets.ts checkSocketPrivileges). A buffer size is privileged
 * above what the node's sysctl lets anyone set (SO_*BUFFORCE): the
 * kernel shows twice what was set, at most twice wmem_max or rmem_max.
 */
export function optionPrivilege(o: SocketOption): { caps: number[]; what: string } | undefined {
  const raw = o.raw ?? Buffer.alloc(0);
  const either = [CAP_NET_RAW, CAP_NET_ADMIN];
  if (o.level === SOL_SOCKET) {
    switch (o.name) {
      case 1: // SO_DEBUG
        return o.value ? { caps: [CAP_NET_ADMIN], what: 'SO_DEBUG' } : undefined;
      case 12: // SO_PRIORITY: 0 to 6 (TC_PRIO_INTERACTIVE) for anyone
        return o.value < 0 || o.value > 6 ? { caps: either, what: `SO_PRIORITY ${o.value} (above 6)` } : undefined;
      case 36: // SO_MARK
        return o.value ? { caps: either, what: `SO_MARK ${o.value >>> 0}` } : undefined;
      case 69: // SO_PREFER_BUSY_POLL
        return o.value ? { caps: [CAP_NET_ADMIN], what: 'SO_PREFER_BUSY_POLL' } : undefined;
      case 61: // SO_TXTIME: a clock other than CLOCK_MONOTONIC
        return raw.length >= 4 && raw.readInt32LE(0) !== 1 ? { caps: [CAP_NET_ADMIN], what: `SO_TXTIME on clock ${raw.readInt32LE(0)}` } : undefined;
      case SO_SNDBUF:
      case SO_RCVBUF: {
        const max = Number(sysctlText(`/proc/sys/net/core/${o.name === SO_SNDBUF ? 'wmem_max' : 'rmem_max'}`) ?? 0);
        return o.value > 2 * max ? { caps: [CAP_NET_ADMIN], what: `${o.name === SO_SNDBUF ? 'SO_SNDBUF' : 'SO_RCVBUF'} ${o.value} (above twice net.core.${o.name === SO_SNDBUF ? 'wmem_max' : 'rmem_max'}, ${2 * max})` } : undefined;
      }
    }
    return undefined;
  }
  const SOL_NETLINK = 270;
  // netlink_setsockopt: hearing every network namespace's notifications.
  if (o.level === SOL_NETLINK && o.name === 8) return o.value ? { caps: [CAP_NET_BROADCAST], what: 'NETLINK_LISTEN_ALL_NSID' } : undefined;
  if (o.level === IPPROTO_IP && o.name === 19) return o.value ? { caps: either, what: 'IP_TRANSPARENT' } : undefined;
  if (o.level === IPPROTO_IPV6 && o.name === 75) return o.value ? { caps: either, what: 'IPV6_TRANSPARENT' } : undefined;
  // Hop-by-hop and destination options: the kernel's "privileged option".
  if (o.level === IPPROTO_IPV6 && (o.name === 54 || o.name === 55 || o.name === 59) && raw.length)
    return { caps: [CAP_NET_RAW], what: optionLabel(o.level, o.name) };
  if (o.level === IPPROTO_TCP && o.name === 13 && raw.length) {
    // A congestion control the node does not allow everyone.
    const end = raw.indexOf(0);
    const name = raw.subarray(0, end < 0 ? raw.length : end).toString('utf8');
    const allowed = new Set([...(sysctlText('/proc/sys/net/ipv4/tcp_allowed_congestion_control') ?? '').split(/\s+/), sysctlText('/proc/sys/net/ipv4/tcp_congestion_control')]);
    return name && !allowed.has(name) ? { caps: [CAP_NET_ADMIN], what: `TCP_CONGESTION ${JSON.stringify(name)} (not in net.ipv4.tcp_allowed_congestion_control)` } : undefined;
  }
  return undefined;
}

/** SO_BUF_LOCK: the buffer sizes' lock bits, read and set (Linux 5.14). */
const SO_BUF_LOCK = 72;

/** Options whose "not set" the kernel shows as a default it derives
 * (user_mss 0 reads as the default MSS, linger2 0 as tcp_fin_timeout, a
 * TTL or hop limit of -1 as the sysctl's): setting the value a fresh
 * socket shows would pin it (TCP_MAXSEG 536 clamps every connection's
 * MSS), this asks for "not set" again. */
const UNSET: readonly (readonly [level: number, name: number, value: number])[] = [
  [IPPROTO_TCP, 2, 0], // TCP_MAXSEG
  [IPPROTO_TCP, 8, 0], // TCP_LINGER2
  [IPPROTO_IP, 2, -1], // IP_TTL
  [IPPROTO_IPV6, 16, -1], // IPV6_UNICAST_HOPS
];

/**
 * Gives back to `sock` the value a fresh socket of its family and type
 * has for every catalogue option of `kind` that it has otherwise and
 * `keep` does not carry: for a caller's socket that an earlier image's
 * options were given (or its application set some on), before the next
 * image's are (applyExtras). Those that decide a bind are not touched
 * (the caller bound it where it chose). Returns what could not be given
 * back, one line each (the socket is left as it is for those):
 *
 * - A buffer size is set to a fresh socket's, and its lock bit (which
 *   that setsockopt sets, and which turns the kernel's autotuning of the
 *   connections accepted off) cleared through SO_BUF_LOCK (a kept size
 *   keeps its bit). A kernel
 *   without SO_BUF_LOCK (before 5.14) cannot clear it: no setsockopt
 *   does (SO_RCVBUF 0 sets the minimum size, locked); said so.
 * - TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and TCP_SYNCNT read as the
 *   sysctl's while never set, and cannot be unset (0 is refused): they
 *   get the sysctl's value of now, which a later change of the sysctl
 *   does not follow.
 * - TCP_WINDOW_CLAMP cannot go back to 0 on a listener (the kernel takes
 *   0 only before the socket is bound), nor a listener's own
 *   TCP_FASTOPEN_KEY be dropped: said so.
 */
export function resetExtras(sock: number, kind: SockKind, family: number, type: number, keep: SocketOption[], own: readonly Pair[], where: string): string[] {
  const specs = specsFor(kind, family, own);
  const fresh = freshDefaults(kind, family, type, specs);
  const kept = (s: Spec) => keep.some((o) => o.level === s.level && o.name === s.name);
  const stale: string[] = [];
  const freshBytes = (i: number) => fresh.raw.data.subarray(offsetsOf(specs)[i], offsetsOf(specs)[i] + fresh.raw.lengths[i]);
  const setBack = (s: Spec, i: number, now: RawBatch) => {
    if (kept(s) || s.early || sameRaw(specs, now, fresh.raw, i)) return;
    if (fresh.raw.lengths[i] < 0) return; // the kernel has none to give back
    try {
      const unset = UNSET.find(([l, n]) => l === s.level && n === s.name);
      if (unset) addon().setSockOpt(sock, s.level, s.name, unset[2]);
      else addon().setSockOptBytes(sock, s.level, s.name, Buffer.from(freshBytes(i)));
    } catch (e) {
      stale.push(`${where}: ${s.label} cannot be given back a fresh socket's value: ${(e as Error).message}`);
      return;
    }
    const after = readRaw(sock, [s]);
    const at = offsetsOf(specs)[i];
    const same = after.lengths[0] === fresh.raw.lengths[i] && after.data.subarray(0, after.lengths[0]).equals(fresh.raw.data.subarray(at, at + fresh.raw.lengths[i]));
    if (!same) stale.push(`${where}: ${s.label} is not a fresh socket's after it was given back (the kernel keeps its own)`);
  };
  const now = readRaw(sock, specs);
  const differs = (s: Spec, i: number) => !kept(s) && !sameRaw(specs, now, fresh.raw, i) && fresh.raw.lengths[i] >= 0;
  const isLock = (s: Spec) => s.level === SOL_SOCKET && s.name === SO_BUF_LOCK;
  // The others first; then the buffer sizes, whose setsockopt sets their
  // lock bits; then those bits, read again.
  for (const [i, s] of specs.entries()) if (!s.lockBit && !isLock(s)) setBack(s, i, now);
  const sized = specs.filter((s, i) => s.lockBit && differs(s, i));
  for (const s of sized) {
    const i = specs.indexOf(s);
    // As applyExtras gives one: half what the kernel shows.
    const half = Math.max(1, Math.floor(fresh.raw.data.readInt32LE(offsetsOf(specs)[i]) / 2));
    try {
      try {
        addon().setSockOpt(sock, SOL_SOCKET, s.name === SO_SNDBUF ? SO_SNDBUFFORCE : SO_RCVBUFFORCE, half);
      } catch {
        addon().setSockOpt(sock, SOL_SOCKET, s.name, half);
      }
    } catch (e) {
      stale.push(`${where}: ${s.label} cannot be given back a fresh socket's size: ${(e as Error).message}`);
    }
  }
  const lockAt = specs.findIndex(isLock);
  if (lockAt >= 0 && fresh.raw.lengths[lockAt] >= 0) {
    // A fresh socket's bits, and those of the sizes kept (set by the
    // application, which an image records with SO_BUF_LOCK anyway).
    const want = fresh.raw.data.readInt32LE(offsetsOf(specs)[lockAt]) | specs.filter((s) => s.lockBit && kept(s)).reduce((bits, s) => bits | s.lockBit!, 0);
    if (!kept(specs[lockAt])) {
      try {
        if (addon().getSockOpt(sock, SOL_SOCKET, SO_BUF_LOCK) !== want) addon().setSockOpt(sock, SOL_SOCKET, SO_BUF_LOCK, want);
      } catch (e) {
        stale.push(`${where}: its buffer sizes cannot be unlocked (SO_BUF_LOCK ${want}): ${(e as Error).message}`);
      }
    }
  } else
    for (const s of sized)
      stale.push(`${where}: ${s.label} is a fresh socket's size again, but stays locked (the connections it accepts are not autotuned): this kernel has no SO_BUF_LOCK to unlock it with`);
  return stale;
}

/* ---- what only the preload library saw ---------------------------------- */

/** What the preload library noted of the application's sockets, and what
 * it could not, from its tables (addon readTables). */
export type Notes = SocketNotes;
export const NOTHING_NOTED: Notes = { notes: [], lost: 0 };

/** Whether a note that found no room may have been of socket `ino`, or of
 * the reuseport group of `kind` on `port` (`group`). Lost notes without
 * the filter (a registry's copy of older tables): any socket may be. */
function maybeLost(seen: Notes, ino: bigint, port: number, kind: SockKind, group: boolean): boolean {
  if (!seen.lost) return false;
  if (!seen.lostSeen) return true;
  return addon().socketNoteLost(seen.lostSeen, group ? 0n : ino, group ? port : 0, kind === 'udp' ? 'udp' : 'tcp');
}

/**
 * What the preload library noted of socket `ino` (of `kind`, bound to
 * `port`): a reuseport steering program, which nothing can read back, is
 * refused by name; an IPv4 multicast interface chosen by index only (the
 * kernel shows 0.0.0.0 for it) is added to `options`, by name. `reuseport`:
 * whether the socket is in a reuseport group; a program attached through
 * another socket of its group, on the same port, is the group's.
 */
export function noted(seen: Notes, ino: bigint, kind: SockKind, port: number, reuseport: boolean, options: SocketOption[], where: string): void {
  // A note that found no room: refused, not guessed, while its socket (or
  // group) may be open.
  if (maybeLost(seen, ino, port, kind, false))
    throw new Unsupported(`${where} may have an option set that appshot cannot read back and could not note (the room for ${seen.lost} such notes was full): whether it has is not known`);
  for (const n of seen.notes) {
    // A directory's (fdowner.ts) or a message queue's (mqueue.ts),
    // whatever its number.
    if (n.level === NOTE_DNOTIFY || n.level === NOTE_MQ_NOTIFY) continue;
    const reuseportProgram = n.level === SOL_SOCKET && (n.name === SO_ATTACH_REUSEPORT_CBPF || n.name === SO_ATTACH_REUSEPORT_EBPF);
    const mine = n.ino === ino;
    const group = reuseportProgram && reuseport && port !== 0 && n.port === port && n.kind === (kind === 'udp' ? 'udp' : 'tcp');
    if (!mine && !group) continue;
    const setOnly = SET_ONLY.find(([l, nm]) => l === n.level && nm === n.name);
    if (setOnly) throw new Unsupported(`${where} has ${setOnly[2]} set, which the kernel does not give back and appshot cannot carry`);
    if (reuseportProgram)
      throw new Unsupported(
        `${where} is in a reuseport group with a steering program the application attached (${n.name === SO_ATTACH_REUSEPORT_CBPF ? 'SO_ATTACH_REUSEPORT_CBPF' : 'SO_ATTACH_REUSEPORT_EBPF'}${mine ? '' : ', through another socket of the group'}), which cannot be captured: the kernel does not give it back`,
      );
    const carried = CATALOGUE.find((s) => s.noted === n.name && s.level === n.level && s.kinds.includes(kind));
    if (carried) {
      const had = options.findIndex((o) => o.level === carried.level && o.name === carried.name);
      if (had >= 0) options.splice(had, 1);
      options.push({ level: carried.level, name: carried.name, value: n.value });
    }
    if (n.level === IPPROTO_IP && n.name === IP_MULTICAST_IF && kind === 'udp') {
      // The index with the address the kernel shows (0.0.0.0, or one given
      // beside the index), set together as a struct ip_mreqn.
      const chosen = options.find((o) => o.level === IPPROTO_IP && o.name === IP_MULTICAST_IF);
      const device = addon().ifName(n.value);
      if (!device) throw new Unsupported(`${where} has IP_MULTICAST_IF set to interface index ${n.value}, which no interface has now`);
      if (chosen) options.splice(options.indexOf(chosen), 1);
      options.push({ level: IPPROTO_IP, name: IP_MULTICAST_IF_INDEX, value: 0, device, raw: chosen?.raw?.length === 4 ? chosen.raw : Buffer.alloc(4) });
    }
  }
  if (reuseport && port !== 0 && maybeLost(seen, ino, port, kind, true))
    throw new Unsupported(`${where} is in a reuseport group, and the application set more options appshot cannot read back than it could note (${seen.lost} lost), one of them maybe a steering program of this group: whether it has one is not known`);
}

/** Set only, noted by the preload library, refused (preload_net.c). */
const SET_ONLY: readonly [number, number, string][] = [
  [IPPROTO_IPV6, 50, 'IPV6_PKTINFO (a sticky source address or interface)'],
  [IPPROTO_IPV6, 9, 'IPV6_NEXTHOP'],
  [IPPROTO_IPV6, 6, 'IPV6_2292PKTOPTIONS (sticky options)'],
  [IPPROTO_IPV6, 32, 'IPV6_FLOWLABEL_MGR (a flow label lease)'],
  [IPPROTO_IPV6, 27, 'IPV6_JOIN_ANYCAST (an anycast address)'],
  [IPPROTO_TCP, 14, 'TCP_MD5SIG (an MD5 signature key)'],
  [IPPROTO_TCP, 32, 'TCP_MD5SIG_EXT (an MD5 signature key)'],
  [IPPROTO_TCP, 38, 'TCP_AO_ADD_KEY (a TCP-AO key)'],
  [IPPROTO_IP, 16, 'IP_IPSEC_POLICY (a per-socket IPsec policy)'],
  [IPPROTO_IP, 17, 'IP_XFRM_POLICY (a per-socket IPsec policy)'],
  [IPPROTO_IPV6, 34, 'IPV6_IPSEC_POLICY (a per-socket IPsec policy)'],
  [IPPROTO_IPV6, 35, 'IPV6_XFRM_POLICY (a per-socket IPsec policy)'],
];

/** A socket of the image, as forgetClosed weighs it. */
export interface HeldSocket {
  ino: bigint;
  kind: SockKind;
  port: number;
  reuseport: boolean;
}

/** Once every process of the application is seen, all stopped: notes of
 * sockets none of them holds any more go, so that the room in the tables
 * is not used up by sockets long closed (nor by directories no longer
 * watched); and notes that found no room are
 * forgotten once no socket the application holds may have been theirs
 * (nor a reuseport group it is in), so that a full table once is not a
 * reuseport socket refused for good. (The application is stopped: nothing
 * notes meanwhile.) */
export function forgetClosed(tablesPath: string, seen: Notes, held: readonly HeldSocket[], watchedDirs: readonly bigint[] = [], heldQueues: readonly bigint[] = []): void {
  // The notes of directories' dnotify watches the image carries stay too
  // (fdowner.ts), keyed by the directory's inode.
  const inImage = new Set([...held.map((h) => h.ino), ...watchedDirs]);
  // Those of message queues held (mqueue.ts) stay too; a queue's note is
  // weighed by the queues alone, so a socket of the same number does not
  // keep it.
  const queues = new Set(heldQueues);
  const closed = seen.notes.filter((n) => (n.level === NOTE_MQ_NOTIFY ? !queues.has(n.ino) : !inImage.has(n.ino)));
  if (closed.length) addon().forgetSocketNotes(tablesPath, closed.map((n) => n.ino));
  if (!seen.lost || !seen.lostSeen) return;
  // Seen after the count, so holding every mark the count stands for.
  const open = held.some((h) => maybeLost(seen, h.ino, h.port, h.kind, false) || (h.reuseport && h.port !== 0 && maybeLost(seen, h.ino, h.port, h.kind, true)));
  if (!open) addon().forgetLostNotes(tablesPath);
}

/** IP_MULTICAST_IF chosen by interface index (struct ip_mreqn): how the
 * image records it, apart from the address form, which getsockopt shows.
 * Not a kernel option number: one appshot gives itself, set at restore as
 * IP_MULTICAST_IF with an ip_mreqn. */
export const IP_MULTICAST_IF_INDEX = NOTED + IP_MULTICAST_IF;

/** A socket of the restore: an IP_MULTICAST_IF chosen by index is set so
 * (struct ip_mreqn: address 0, then the index). */
export function applyMulticastIndex(sock: number, options: SocketOption[], where: string): void {
  const o = options.find((x) => x.level === IPPROTO_IP && x.name === IP_MULTICAST_IF_INDEX);
  if (!o) return;
  const index = o.device ? addon().ifIndex(o.device) : 0;
  if (!index) throw new AppshotError(`${where} had IP_MULTICAST_IF set to interface ${o.device}, which this node does not have`);
  const mreqn = Buffer.alloc(12);
  if (o.raw?.length === 4) o.raw.copy(mreqn, 4); // imr_address
  mreqn.writeInt32LE(index, 8);
  try {
    addon().setSockOptBytes(sock, IPPROTO_IP, IP_MULTICAST_IF, mreqn);
  } catch (e) {
    throw new AppshotError(`${where}: IP_MULTICAST_IF (interface ${o.device}) cannot be set again: ${(e as Error).message}`);
  }
}

/** What a socket the restore made gets noted again in the new tables, as
 * the preload library noted it of the original: the options of `options`
 * carried from notes. */
export function notesAgain(options: SocketOption[]): { level: number; name: number; value: number }[] {
  return options.flatMap((o) => {
    const s = CATALOGUE.find((x) => x.noted !== undefined && x.level === o.level && x.name === o.name);
    return s ? [{ level: s.level, name: s.noted!, value: o.value }] : [];
  });
}

/** Whether `o` is the image's IP_MULTICAST_IF by index, well formed. */
export function isMulticastIndex(o: SocketOption): boolean {
  return o.level === IPPROTO_IP && o.name === IP_MULTICAST_IF_INDEX && (o.raw?.length ?? 0) % 4 === 0 && (o.raw?.length ?? 0) <= 4 && /^[^/\s:]{1,15}$/.test(o.device ?? '');
}

/** A TCP connection with an upper layer protocol (TCP_ULP: kernel TLS,
 * whose keys and record state are not carried) is refused by name. */
export function refuseUlp(dup: number, where: string): void {
  let raw: Buffer;
  try {
    raw = addon().getSockOptBytes(dup, IPPROTO_TCP, TCP_ULP, 16);
  } catch {
    return;
  }
  const end = raw.indexOf(0);
  const name = raw.subarray(0, end < 0 ? raw.length : end).toString('utf8');
  if (name) throw new Unsupported(`${where} runs the upper layer protocol "${name}" (TCP_ULP), whose state cannot be captured`);
}
