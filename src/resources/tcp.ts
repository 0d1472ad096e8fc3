/**
 * Established TCP connections, kept through a snapshot and a restore with
 * the kernel's repair mode (TCP_REPAIR, which needs CAP_NET_ADMIN), so
 * that the peer carries on without reconnecting and without a byte lost
 * or repeated.
 *
 * Dump: a duplicate of the application's socket (the same socket) is
 * given a socket filter that drops every packet (so that nothing the peer
 * sends is acknowledged and then missing from the image: the peer sends
 * it again), then put in repair mode (never in it without the filter: a
 * packet queued then would make the application's next read fail, were
 * it to run on before the socket is let out); then its sequence numbers, both queues
 * (read without consuming them), the options the handshake agreed, its
 * window and timestamp clock and its integer socket options are read. The socket
 * stays in repair mode while the application is frozen: ended after the
 * snapshot, its sockets close without a FIN or RST reaching the peer. Left
 * running (or if the snapshot fails), they leave repair mode again. Only
 * the snapshot's process can let them out: killed (kill -9) before, a
 * guardian it started lets them out at once (appshot-guard, tcp_repair.h),
 * and the journal (ending.ts) has the next command do it where the
 * guardian could not.
 *
 * Restore: a new socket in repair mode, bound and connected without a
 * handshake, its queues refilled; it leaves repair mode only once every
 * process is made, so that both ends of a connection inside the
 * application are in place before either sends a packet.
 *
 * A connection in CLOSE_WAIT (the peer closed its side, the application
 * has not read that far) is kept too: repair mode cannot queue the peer's
 * FIN, so the restore sends it again with a raw socket (CAP_NET_RAW) once
 * the socket is out of repair mode. One whose application shut its own
 * side down (shutdown(SHUT_WR): FIN_WAIT1, or FIN_WAIT2 once the peer
 * acknowledged) comes back with its FIN queued as sent behind every byte
 * (shutdown() in repair mode); the kernel sends it again when its timer
 * runs out, and the peer's acknowledgement makes it FIN_WAIT2. Both sides
 * closed (CLOSING, LAST_ACK) is refused by name.
 *
 * Between the end of the application and the restore the sockets are
 * held, still in repair mode and still dropping every packet, by an
 * appshot-keeper (keeper.ts): were they closed, whatever the peer sends
 * meanwhile (new data, or what the filter dropped, sent again) would meet
 * no socket and be answered with a reset. (CRIU drops such packets with
 * netfilter rules instead; a keeper needs no privilege beyond the repair
 * mode itself and touches nothing outside the connections.) A restore of
 * the same image on this host uses the very sockets, their queues as the
 * image recorded them; one elsewhere makes them anew from the image.
 *
 * Without repair (no CAP_NET_ADMIN), a snapshot that ends the application
 * hands the live socket itself to the keeper, recorded as kept without its
 * state: the kernel carries on with the connection meanwhile, and only a
 * restore on this host, while the keeper holds it, can have it back.
 * Or `snapshot --tcp-close` records a connection as closed,
 * and the restored application holds a socket whose connection was reset
 * (its next read says ECONNRESET). Otherwise such a snapshot is refused,
 * naming the connection.
 */
import { closeSync, fstatSync, readFileSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';
import { AppshotError, ExitCode } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { timed } from '../snapshot/profile.js';
import type { Fd, InodeOwner, Process, SocketOption, TcpConnection } from '../image/types.js';
import { addon, paths, type RepairedConnection } from '../native.js';
import { descriptorLinks } from '../procfs.js';
import { type RestoreContext, Transient, Unsupported } from './context.js';
import type { KeptSockets, SocketsForKeeper } from './keeper.js';
import { applyExtras, extrasOf, isCarriedExtra, noted, NOTHING_NOTED, type Notes, readExtras, refuseUlp } from './sockopts.js';
import { ownerFor } from './files.js';

const AF_INET = 2;
const AF_INET6 = 10;
const TCP_ESTABLISHED = 1;
const TCP_FIN_WAIT1 = 4;
const TCP_FIN_WAIT2 = 5;
const TCP_CLOSE_WAIT = 8;
const TCP_LISTEN = 10;
/** What is kept: an open connection, one whose peer has closed its side
 * (its FIN received) while the application's side is open, and one whose
 * application shut its side down while the peer's is open. */
const KEPT_STATES = new Set([TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT]);
const TCP_STATES = ['', 'ESTABLISHED', 'SYN_SENT', 'SYN_RECV', 'FIN_WAIT1', 'FIN_WAIT2', 'TIME_WAIT', 'CLOSE', 'CLOSE_WAIT', 'LAST_ACK', 'LISTEN', 'CLOSING'];

const SOL_SOCKET = 1;
const IPPROTO_TCP = 6;
const SOCK_STREAM = 1;
const SO_REUSEADDR = 2;
const SO_LOCK_FILTER = 44;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
/** The buffer sizes' lock bits (Linux 5.14): SOCK_SNDBUF_LOCK 1,
 * SOCK_RCVBUF_LOCK 2. */
const SO_BUF_LOCK = 72;
const SOCK_SNDBUF_LOCK = 1;
const SOCK_RCVBUF_LOCK = 2;
/** Read back, 1 while the socket is in repair mode. */
const TCP_REPAIR = 19;

/** The integer options a connection carries over: what the application
 * chose for it (Nagle, keep-alive and its timing, a user timeout). Buffer
 * sizes are left to the kernel's tuning (the restore raises them only to
 * hold the queued bytes). */
const SO_REUSEPORT = 15;

const CARRIED_OPTIONS: [level: number, name: number][] = [
  [SOL_SOCKET, SO_REUSEADDR],
  [SOL_SOCKET, 9], // SO_KEEPALIVE
  [SOL_SOCKET, 10], // SO_OOBINLINE
  // An accepted connection of a reuseport listener has it: set before the
  // bind at restore (tcp_repair.c), or new reuseport listeners on the
  // port are refused.
  [SOL_SOCKET, SO_REUSEPORT],
  [IPPROTO_TCP, 1], // TCP_NODELAY
  [IPPROTO_TCP, 3], // TCP_CORK
  [IPPROTO_TCP, 4], // TCP_KEEPIDLE
  [IPPROTO_TCP, 5], // TCP_KEEPINTVL
  [IPPROTO_TCP, 6], // TCP_KEEPCNT
  [IPPROTO_TCP, 18], // TCP_USER_TIMEOUT
];

/** SO_REUSEADDR as repair mode reads it back (2, "forced"), which images
 * written before it was read ahead of repair mode recorded whatever the
 * application had: not known, so left as the kernel makes it. */
const forcedReuse = (o: SocketOption) => o.level === SOL_SOCKET && o.name === SO_REUSEADDR && o.value === 2;

/** "127.0.0.1:6379 → 127.0.0.1:40112", as messages name a connection. */
export function connectionName(c: { localAddress: string; localPort: number; peerAddress: string; peerPort: number }): string {
  const at = (a: string, p: number) => (a.includes(':') ? `[${a}]:${p}` : `${a}:${p}`);
  return `${at(c.localAddress, c.localPort)} → ${at(c.peerAddress, c.peerPort)}`;
}

/** A connection as the socket itself told it (SocketTable: TCP_INFO, getsockname, getpeername), for messages and for --tcp-close. */
export interface SeenConnection {
  family: number;
  address: string;
  port: number;
  /** "address:port" */
  remote: string;
  state: number;
}

/* ---- dump --------------------------------------------------------------- */

/**
 * The application's connections held in repair mode while it is frozen:
 * one duplicate of each socket, in appshot's process, until the snapshot
 * ends the application (closeSilently) or lets it go on (release).
 */
export class HeldConnections {
  /** `snapshot --tcp-close`: record connections as closed, without repair. */
  closeConnections = false;
  private readonly held = new Map<bigint, { fd: number; options: SocketOption[]; locked: boolean; repaired: boolean; journal: HeldSocket }>();
  private readonly dumped = new Map<bigint, TcpConnection>();

  /** Told of each socket just before its filter is attached and it
   * enters repair mode: only this
   * process can let it out again, so the driver journals it (ending.ts),
   * and a command that finds this one killed lets it out
   * (releaseLeftInRepair). Throwing, it stops the dump before the socket
   * is touched. */
  onHold: ((socket: HeldSocket) => void) | undefined;
  /** The channel to the guardian (tcp_repair.h), started with the first
   * socket held: it lets each socket out of repair mode the moment this
   * process dies, without waiting for a next command; null if it could
   * not be started (the journal still covers it). */
  private guard: { fd: number; pid: number } | null | undefined;
  /** A hand-over to the guardian failed: no more are tried. */
  private guardFull = false;

  /** `keeper`: where a connection goes that repair mode cannot hold. */
  constructor(private readonly keeper: SocketsForKeeper) {}

  /** How many of the application's connections this dump put in repair
   * mode: they cannot move until let go (release), which only this
   * process can do. */
  get inRepair(): number {
    return this.held.size;
  }

  /** The connection behind `fd` of `pid` (socket inode `ino`). */
  /** `given`: a duplicate of the socket made already (SocketTable), now
   * this dump's: kept in repair mode, or closed. */
  dump(pid: number, fd: number, ino: bigint, seen: SeenConnection, what: string, notes: Notes = NOTHING_NOTED, given?: number): TcpConnection {
    let spare = given;
    const duplicate = () => {
      const d = spare ?? addon().getFd(pid, fd);
      spare = undefined;
      return d;
    };
    try {
      return this.dumpWith(pid, fd, ino, seen, what, notes, duplicate);
    } finally {
      if (spare !== undefined) closeSync(spare);
    }
  }

  private dumpWith(pid: number, fd: number, ino: bigint, seen: SeenConnection, what: string, notes: Notes, duplicate: () => number): TcpConnection {
    const known = this.dumped.get(ino);
    if (known) return known;
    const [peerAddress, peerPort] = splitRemote(seen.remote);
    const named = { localAddress: seen.address, localPort: seen.port, peerAddress, peerPort };
    const where = `${what} fd ${fd}: the TCP connection ${connectionName(named)}`;
    // A connection that ended (reset, refused, closed both ways) while the
    // application holds the socket: CLOSE, with no peer any more. (One
    // never connected is unconnected.ts's, not here.)
    if (TCP_STATES[seen.state] === 'CLOSE' && !peerPort)
      throw new Unsupported(`${what} fd ${fd}: a TCP socket whose connection has ended (CLOSE${seen.port ? `, bound to ${connectionName(named).split(' ')[0]}` : ''}) cannot be captured yet`);
    if (!KEPT_STATES.has(seen.state)) {
      // A connect in progress (SYN_SENT) has no peer for getpeername; the
      // kernel's table names where it goes.
      const peer = peerPort ? undefined : procNetPeer(pid, ino, seen.family);
      const whereTo = peer ? `${what} fd ${fd}: the TCP connection ${connectionName({ ...named, peerAddress: peer[0], peerPort: peer[1] })}` : where;
      throw new Unsupported(`${whereTo} is ${TCP_STATES[seen.state] ?? `in state ${seen.state}`}; only established and half-closed connections (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT) can be captured yet`);
    }
    // What the preload library saw set and nothing reads back (MD5 keys).
    noted(notes, ino, 'tcp', seen.port, false, [], where);
    if (this.closeConnections) return this.remember(ino, { ...emptyConnection(ino, seen.family, named), closed: true });
    const dup = timed('tcp: duplicate', duplicate);
    // Journaled before it enters repair mode (killed after, a command that
    // finds only the journal must be able to let it out), with what the
    // application had set: whether it has a filter of its own (then the
    // snapshot attaches none and none is detached), and its SO_REUSEADDR
    // (read in repair mode, it says "forced"; leaving repair mode clears it).
    let journal: HeldSocket;
    try {
      journal = timed('tcp: as held', () => socketAsHeld(dup, pid, ino));
      timed('tcp: journaled', () => this.onHold?.(journal));
    } catch (e) {
      closeSync(dup);
      throw e;
    }
    killPoint('snapshot: connection journaled');
    timed('tcp: guarded', () => this.guarded(dup, journal));
    // Without repair mode (EPERM: no CAP_NET_ADMIN, which a filter needs
    // too on some kernels), the socket is kept live, or refused.
    const withoutRepair = (e: NodeJS.ErrnoException, why = 'TCP repair, which needs CAP_NET_ADMIN'): TcpConnection => {
      if (e.code === 'EPERM' && this.keeper.keeping) {
        // Without repair mode, the very socket, live, waits for the
        // restore in a keeper: the kernel goes on with it meanwhile
        // (acknowledging what the peer sends, sending what the
        // application wrote), and the restored application finds it so.
        this.keeper.add(ino, dup, true, true);
        return this.remember(ino, { ...emptyConnection(ino, seen.family, named), state: seen.state, kept: true });
      }
      closeSync(dup);
      if (e.code === 'EPERM')
        throw new Unsupported(
          `${where} can be kept only with ${why}, or without it by a snapshot that ends the application, for a restore on this host (not --leave-running, --tcp-hold 0, or a state directory whose path is too long for a unix socket); appshot snapshot --tcp-close records it as closed instead: the restored application sees it reset`,
        );
      throw new Unsupported(`${where}: ${e.message}`);
    };
    // What the peer sends from now on is dropped, not acknowledged: it
    // would be missing from the image. The peer sends it again, to the
    // original (--leave-running) or, if the restore is quick enough, to
    // the restored connection (see the top of this file). Dropped before
    // repair mode, never after: a packet let in while the socket is in
    // repair mode is queued, and the application, run on if this process
    // dies before the guardian lets the socket out, is woken to read it
    // and gets EPERM (only a peek reads in repair mode), on which most
    // applications close the connection (memcached does).
    try {
      timed('tcp: lock', () => addon().tcpLock(dup, true));
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      // SO_LOCK_FILTER set by the application refuses any filter, to
      // root too: not a matter of privilege, though it looks the same.
      if (err.code === 'EPERM' && addon().getSockOpt(dup, SOL_SOCKET, SO_LOCK_FILTER))
        return withoutRepair(err, 'TCP repair, whose filter the application has locked out (SO_LOCK_FILTER)');
      if (err.code === 'EPERM') return withoutRepair(err);
      closeSync(dup);
      if (err.code === 'EEXIST')
        throw new Unsupported(`${where} has a packet filter the application attached (SO_ATTACH_FILTER), which the snapshot would have to replace`);
      // SO_GET_FILTER gives only classic filters back (unixdgram.ts).
      if (err.code === 'EACCES')
        throw new Unsupported(`${where} has an eBPF socket filter the application attached (SO_ATTACH_BPF), which cannot be captured`);
      throw new Unsupported(`${where}: ${err.message}`);
    }
    // Held from here: whatever fails next, release() lets it go (out of
    // repair mode if it went in, then the filter off), as the guardian
    // would if this process died.
    const held = { fd: dup, options: [] as SocketOption[], locked: true, repaired: false, journal };
    this.held.set(ino, held);
    killPoint('snapshot: connection locked');
    try {
      timed('tcp: repair', () => addon().tcpRepair(dup, 1));
    } catch (e) {
      // Not held: the filter goes again (the application is frozen: the
      // filter is the snapshot's). If that fails, it stays held, and
      // release() tries again as the snapshot fails.
      try {
        addon().tcpLock(dup, false);
      } catch (u) {
        throw new Unsupported(`${where}: ${(u as Error).message}`);
      }
      this.held.delete(ino);
      return withoutRepair(e as NodeJS.ErrnoException);
    }
    held.repaired = true;
    killPoint('snapshot: connection in repair mode');
    // SO_REUSEADDR as the application had it, read before repair mode
    // (which reads back 2, "forced", whatever it was).
    const options = (held.options = timed('tcp: options', () => CARRIED_OPTIONS.map(([level, name]) => ({
      level,
      name,
      value: level === SOL_SOCKET && name === SO_REUSEADDR ? journal.reuseAddr : addon().getSockOpt(dup, level, name),
    }))));
    // The rest of what the application set (sockopts.ts); kernel TLS and
    // other upper layers refused by name.
    timed('tcp: ulp', () => refuseUlp(dup, where));
    const extras = timed('tcp: extras', () => readExtras(dup, 'tcp', seen.family, SOCK_STREAM, CARRIED_OPTIONS, where));
    let c: RepairedConnection;
    try {
      c = timed('tcp: read', () => addon().tcpRead(dup));
    } catch (e) {
      throw new Unsupported(`${where}: ${(e as Error).message}`);
    }
    if (c.state !== seen.state) throw new Transient(`${where} became ${TCP_STATES[c.state] ?? c.state} while the application was frozen; try again`);
    return this.remember(ino, { ...c, ino, closed: false, socketOptions: [...options, ...extras] });
  }

  /** Hands `fd` to the guardian, started if need be. Best effort: without
   * it, a command after this one's death lets the socket out (journal). */
  private guarded(fd: number, journal: HeldSocket): void {
    if (this.guardFull) return;
    try {
      if (this.guard === undefined) this.guard = addon().tcpGuardStart(paths.guard);
    } catch {
      this.guard = null;
    }
    if (!this.guard) return;
    try {
      addon().tcpGuardAdd(this.guard.fd, fd, journal.locked, journal.reuseAddr);
    } catch {
      // This one and those after are the journal's alone; the guardian
      // stays armed for those it holds already (if it died, disarm()
      // reaps it).
      this.guardFull = true;
    }
  }

  /** The guardian lets go of the sockets untouched: from here, this
   * process's death must leave them in repair mode (the image carries
   * them on: call it before the ending is journaled), or they are out of
   * it already. */
  disarm(): void {
    const guard = this.guard;
    this.guard = undefined;
    this.guardFull = false;
    if (!guard) return;
    try {
      addon().tcpGuardDisarm(guard.fd, guard.pid);
    } catch {
      /* gone: it acts only on this process's death */
    }
  }

  private remember(ino: bigint, c: TcpConnection): TcpConnection {
    this.dumped.set(ino, c);
    return c;
  }

  /** The application goes on (--leave-running, or the snapshot failed):
   * its sockets leave repair mode as they were, without the window probe
   * leaving it otherwise sends, and get back the SO_REUSEADDR that
   * leaving it clears. */
  release(): void {
    // Every socket is let go even if one fails; the first failure is told.
    const held = [...this.held.values()];
    this.held.clear();
    let failure: Error | undefined;
    for (const { fd, locked, repaired, journal } of held) {
      // Each step tried whatever the one before did: a filter left on
      // drops every packet for good (review r307).
      const step = (what: () => void) => {
        try {
          what();
        } catch (e) {
          failure ??= e as Error;
        }
      };
      try {
        // Out of repair mode before the filter goes (see dumpWith), and
        // SO_REUSEADDR back at once (leaving repair mode cleared it), as
        // journaled before the filter went on (the options are read
        // later).
        if (repaired) step(() => addon().tcpRepair(fd, -1));
        if (repaired && journal.reuseAddr) step(() => addon().setSockOpt(fd, SOL_SOCKET, SO_REUSEADDR, journal.reuseAddr));
        if (locked) step(() => addon().tcpLock(fd, false));
      } finally {
        closeSync(fd);
      }
    }
    // Once they are out (killed before, the guardian lets them out).
    this.disarm();
    if (failure) throw failure;
  }

  /** What a command that finds this one killed needs to take the
   * connections out of repair mode in the application that ran on
   * (releaseLeftInRepair): journaled with the ending (ending.ts). */
  journaled(): HeldSocket[] {
    return [...this.held.values()].map((h) => h.journal);
  }

  /** Before the application is ended: our duplicates go to `keeper`
   * (keeper.ts) too, which hands them to a keeper process that holds them
   * in repair mode until the restore. Still ours: if that fails, release()
   * takes them out of repair mode for the application, which goes on. */
  handTo(keeper: SocketsForKeeper): void {
    for (const [ino, { fd }] of this.held) keeper.add(ino, fd, false, false);
  }

  /** The application was ended: our duplicates are closed, which in
   * repair mode tells the peers nothing (a keeper holds its own). */
  closeSilently(): void {
    this.disarm();
    for (const { fd } of this.held.values()) closeSync(fd);
    this.held.clear();
  }
}

/** A connection a snapshot held in repair mode, as journaled: the process
 * that held it (system PID), its socket inode, whether the snapshot's
 * filter may be attached (false: the application has one of its own,
 * which is never detached), and the application's SO_REUSEADDR, which
 * leaving repair mode clears. */
export interface HeldSocket {
  pid: number;
  ino: string;
  locked: boolean;
  reuseAddr: number;
}

/** `fd` (socket `ino` of `pid`), out of repair mode still, as journaled.
 * The application is frozen: no filter of its own can come meanwhile. */
function socketAsHeld(fd: number, pid: number, ino: bigint): HeldSocket {
  let ownFilter: boolean;
  try {
    ownFilter = addon().socketFilterLength(fd) > 0;
  } catch {
    // An eBPF filter (EACCES: it cannot be read back) is one of its own.
    ownFilter = true;
  }
  return { pid, ino: String(ino), locked: !ownFilter, reuseAddr: addon().getSockOpt(fd, SOL_SOCKET, SO_REUSEADDR) };
}

/** A snapshot killed while it held `sockets` in repair mode, its
 * application let go by the kernel and running on: each socket still in
 * one of `pids` (found by inode, whatever descriptor holds it now) and
 * still in repair mode leaves it as release() would have done it. Best
 * effort, socket by socket: one the application closed meanwhile is gone. */
export function releaseLeftInRepair(sockets: HeldSocket[]): void {
  const byPid = new Map<number, Set<string>>();
  for (const h of sockets) {
    if (!byPid.has(h.pid)) byPid.set(h.pid, new Set());
    byPid.get(h.pid)!.add(h.ino);
  }
  const done = new Set<string>();
  for (const [pid, inos] of byPid) {
    for (const { fd: n, link } of descriptorLinks(pid)) {
      const ino = /^socket:\[(\d+)\]$/.exec(link)?.[1];
      if (!ino || !inos.has(ino) || done.has(ino)) continue;
      const h = sockets.find((x) => x.ino === ino)!;
      let fd: number;
      try {
        fd = addon().getFd(pid, Number(n));
      } catch {
        continue;
      }
      try {
        // Replaced between the look and the copy: not it.
        if (String(fstatSync(fd).ino) !== ino) continue;
        // Out of repair mode: journaled just before it would have entered
        // it, or let out already; only the snapshot's filter may be left
        // (attached just before repair mode, taken away just after it).
        // Out of it before the filter goes (see HeldConnections.dumpWith).
        const repaired = addon().getSockOpt(fd, IPPROTO_TCP, TCP_REPAIR) === 1;
        if (repaired) addon().tcpRepair(fd, -1);
        if (h.locked)
          try {
            addon().tcpLock(fd, false);
          } catch (e) {
            // None, or the application's own since: not the snapshot's.
            if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
          }
        if (repaired && h.reuseAddr) addon().setSockOpt(fd, SOL_SOCKET, SO_REUSEADDR, h.reuseAddr);
        done.add(ino);
      } catch {
        /* one that cannot be let go stays as it is */
      } finally {
        closeSync(fd);
      }
    }
  }
}

/** The remote address and port /proc/PID/net/tcp(6) shows for socket
 * `ino`, where getpeername has none to give (a connect in progress). */
function procNetPeer(pid: number, ino: bigint, family: number): [string, number] | undefined {
  const v6 = family === AF_INET6;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/net/${v6 ? 'tcp6' : 'tcp'}`, 'utf8');
  } catch {
    return undefined;
  }
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || f[9] !== String(ino)) continue;
    const [hex, port] = f[2].split(':');
    // Each 32-bit word in the host's order (little-endian here).
    const bytes = Buffer.from(hex, 'hex');
    for (let i = 0; i < bytes.length; i += 4) bytes.subarray(i, i + 4).reverse();
    // A URL's host is the address written short ('::1').
    const address = v6 ? new URL(`http://[${(bytes.toString('hex').match(/.{4}/g) ?? []).join(':')}]`).hostname.slice(1, -1) : [...bytes].join('.');
    return [address, parseInt(port, 16)];
  }
  return undefined;
}

/** The 4 (AF_INET) or 16 (AF_INET6) bytes, network order, that an
 * address of `family` written as inet_pton reads it names; undefined if
 * it is not one of that family (a zone, '%eth0', is not: inet_pton takes
 * none). Any spelling ('0:0::1', '0:0:0:0:0:ffff:7f00:1') gives the one
 * value the kernel is handed. */
export function addressBytes(family: number, text: string): Buffer | undefined {
  if (typeof text !== 'string') return undefined;
  if (family === AF_INET) return isIPv4(text) ? Buffer.from(text.split('.').map(Number)) : undefined;
  if (family !== AF_INET6 || !isIPv6(text) || text.includes('%')) return undefined;
  // A dotted tail ('::ffff:127.0.0.1') is the last two 16-bit groups.
  const dotted = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  const b = dotted?.[2].split('.').map(Number);
  const hex = dotted && b ? `${dotted[1]}${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}` : text;
  const [head, tail] = hex.split('::');
  const groupsOf = (part: string) => (part === '' ? [] : part.split(':'));
  const before = groupsOf(head);
  const after = tail === undefined ? [] : groupsOf(tail);
  const groups = tail === undefined ? before : [...before, ...Array<string>(8 - before.length - after.length).fill('0'), ...after];
  if (groups.length !== 8) return undefined;
  const bytes = Buffer.alloc(16);
  groups.forEach((g, i) => bytes.writeUInt16BE(parseInt(g, 16), 2 * i));
  return bytes;
}

/** The IPv4 address an IPv4-mapped IPv6 one (::ffff:a.b.c.d) is. */
function mappedV4(bytes: Buffer): Buffer | undefined {
  return bytes.length === 16 && bytes.subarray(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff ? bytes.subarray(12) : undefined;
}

const unspecified = (bytes: Buffer) => bytes.every((b) => b === 0);

/** An address's bytes written one way: dotted, IPv6 short ('::1'), an
 * IPv4-mapped one with its IPv4 dotted. */
function addressText(bytes: Buffer): string {
  if (bytes.length === 4) return [...bytes].join('.');
  const v4 = mappedV4(bytes);
  if (v4) return `::ffff:${[...v4].join('.')}`;
  return new URL(`http://[${(bytes.toString('hex').match(/.{4}/g) ?? []).join(':')}]`).hostname.slice(1, -1);
}

/** Why connection `c`'s addresses cannot be the ones it has (validate.ts),
 * or undefined: each one of its family; the local one not unspecified
 * (0.0.0.0, ::, ::ffff:0.0.0.0), which an established connection never
 * has, and which bound in repair mode takes whatever the route gives at
 * the connect, unseen by refuseForeignListener. A closed one is made as a
 * reset socket, its addresses unused. */
export function connectionAddressFault(c: TcpConnection): string | undefined {
  if (c.closed) return undefined;
  const local = addressBytes(c.family, c.localAddress);
  const peer = addressBytes(c.family, c.peerAddress);
  const shown = (a: unknown) => `'${String(a).slice(0, 64)}'`;
  if (!local || !peer) return `is a TCP connection of family ${c.family} from ${shown(c.localAddress)} to ${shown(c.peerAddress)}, not two addresses of its family`;
  if (unspecified(local) || unspecified(mappedV4(local) ?? local)) return `is a TCP connection from the unspecified address ${shown(c.localAddress)}, which no connection has`;
  return undefined;
}

/** Which destinations a socket bound to `bytes` (of `family`) receives
 * for, as the kernel weighs two bound addresses (inet_rcv_saddr_equal):
 * IPv4 and IPv6 each a wildcard, one address, or none. An IPv4-mapped
 * address is its IPv4 one (::ffff:0.0.0.0 the IPv4 wildcard); the IPv6
 * wildcard takes IPv4 too unless IPV6_V6ONLY (taken so when not known). */
interface Reach {
  v4?: Buffer | 'any';
  v6?: Buffer | 'any';
}

function reachOf(family: number, bytes: Buffer, v6only?: boolean): Reach {
  if (family === AF_INET) return { v4: unspecified(bytes) ? 'any' : bytes };
  const v4 = mappedV4(bytes);
  if (v4) return { v4: unspecified(v4) ? 'any' : v4 };
  if (unspecified(bytes)) return v6only ? { v6: 'any' } : { v4: 'any', v6: 'any' };
  return { v6: bytes };
}

function overlaps(a: Reach, b: Reach): boolean {
  const one = (x: Buffer | 'any' | undefined, y: Buffer | 'any' | undefined) => x !== undefined && y !== undefined && (x === 'any' || y === 'any' || x.equals(y));
  return one(a.v4, b.v4) || one(a.v6, b.v6);
}

function splitRemote(remote: string): [string, number] {
  const i = remote.lastIndexOf(':');
  return [remote.slice(0, i), Number(remote.slice(i + 1))];
}

function emptyConnection(ino: bigint, family: number, named: Pick<TcpConnection, 'localAddress' | 'localPort' | 'peerAddress' | 'peerPort'>): TcpConnection {
  return {
    ino, family, ...named, closed: false, state: 0, sendSeq: 0, recvSeq: 0, sendQueue: Buffer.alloc(0), unsent: 0,
    recvQueue: Buffer.alloc(0), mssClamp: 0, options: 0, sndWscale: 0, rcvWscale: 0, timestamp: 0, socketOptions: [],
  };
}

/* ---- restore ------------------------------------------------------------ */

/**
 * The image's connections made in appshot's process (and handed over like
 * the other descriptors made here), one socket per connection however many
 * descriptors share it. Each stays in repair mode until release().
 */
export class ConnectionMaker {
  private readonly made = new Map<bigint, { fd: number; c: TcpConnection; repaired: boolean; kept: boolean }>();
  /** Inodes of the listeners this restore made or was handed for the
   * application (sockets.ts openSocket tells them: ownListener), and of
   * the connections it made: the sockets a connection made here may share
   * its port with (refuseForeignListener). */
  private readonly own = new Set<bigint>();
  /** Local addresses and ports refuseForeignListener found free of
   * another application's listener: not looked at again (a server's
   * accepted connections share one; each look is a sock_diag dump per
   * family, about 40 µs). */
  private readonly portsSeen = new Set<string>();

  /** `kept`: the sockets a keeper held since the snapshot that ended the
   * application (keeper.ts): the very connections, used as they are. */
  constructor(private readonly kept: KeptSockets) {}

  /** A TCP listener the restore made, or was handed (by a keeper, by the
   * caller), as one of the application's. */
  ownListener(sock: number): void {
    this.own.add(fstatSync(sock, { bigint: true }).ino);
  }

  /** Our descriptor for connection `c`; `what` names its process and fd.
   * `owner`: asked only for a socket made here, which is made with it
   * (files.ts ownerFor). `holders`: the uids of the processes holding it
   * in the image, and the sockets the caller hands the restore
   * (RestoreContext.inherit), for refuseForeignListener. */
  open(c: TcpConnection | undefined, what: string, owner?: () => InodeOwner | undefined, holders?: { uids: ReadonlySet<number>; handed: Iterable<number> }): number {
    if (!c) throw new AppshotError(`corrupt image: ${what}: a TCP connection without its state`);
    const known = this.made.get(c.ino);
    if (known) return known.fd;
    if (c.kept) {
      // Live, not in repair mode: nothing to release (requireKept checked
      // it is held).
      const live = this.kept.get(c.ino);
      if (live === undefined) throw new AppshotError(`${what}: the TCP connection ${connectionName(c)} is not held by appshot-keeper`);
      requireHeldAs(live, c, what);
      this.made.set(c.ino, { fd: live, c, repaired: false, kept: true });
      return live;
    }
    check(c, what);
    const kept = c.closed ? undefined : this.kept.get(c.ino);
    if (kept !== undefined) {
      requireHeldAs(kept, c, what);
      this.made.set(c.ino, { fd: kept, c, repaired: true, kept: true });
      return kept;
    }
    // Bound as the addresses' bytes written one way: what the check
    // weighed is what the kernel is handed, however the image spelled it.
    const local = c.closed ? undefined : this.refuseForeignListener(c, what, holders?.uids ?? new Set(), holders?.handed ?? []);
    let fd: number;
    try {
      const given = c.closed ? undefined : owner?.();
      // SO_REUSEPORT before the bind (tcp_repair.c), the rest after.
      const reuseport = c.socketOptions.some((o) => o.level === SOL_SOCKET && o.name === SO_REUSEPORT && o.value !== 0);
      fd = !local ? addon().tcpResetSocket(c.family) : addon().tcpMake({ ...c, localAddress: addressText(local), reuseport, ...(given ? { owner: given } : {}) });
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const hint = err.code === 'EPERM' ? ' (TCP repair needs CAP_NET_ADMIN; a snapshot taken with --tcp-close restores without it)' : '';
      throw new AppshotError(`${what}: the TCP connection ${connectionName(c)}: ${err.message}${hint}`);
    }
    this.made.set(c.ino, { fd, c, repaired: !c.closed, kept: false });
    if (!c.closed) this.own.add(fstatSync(fd, { bigint: true }).ino);
    return fd;
  }

  /**
   * A connection is made in repair mode, where the kernel binds it with
   * SK_FORCE_REUSE: inet_csk_get_port takes the port whatever holds it,
   * without the conflict check a plain bind gets (EADDRINUSE next to any
   * listener but a SO_REUSEPORT one of the same uid). Made next to another
   * application's listener, the connection would take that listener's
   * packets from its peer's address and port (an established socket is
   * looked up before a listener), and keep the port from it once it is
   * closed and bound again; from a crafted image (another node's key,
   * --trust-image) that is any port on this node, whoever listens there.
   * So a TCP listener on the connection's local port whose address
   * overlaps the connection's as the kernel weighs them (reachOf: bytes,
   * not spellings; a wildcard on either side; IPV6_V6ONLY as sock_diag
   * says) must be one of the application's: made or handed by this
   * restore, held by its keeper, or owned (its inode's uid: the fsuid
   * that created it, as SO_REUSEPORT's own rule weighs it, not whoever
   * holds it now) by a uid a process holding the connection has, which
   * could signal or trace that creator's processes anyway: no more than
   * the image had (serve's front door falling back to forwarding; the
   * original of a --leave-running snapshot). An image with a root process
   * is so not kept off listeners root created. The connection's own local
   * address is never a wildcard (connectionAddressFault). Returns its
   * bytes, to be bound as they are. Connections sharing the port are not
   * weighed: connect() shares a local port among any connections of
   * distinct peers, and the kernel refuses the very same pair at our
   * connect (EADDRNOTAVAIL). A socket bound and not (yet) listening is not
   * seen (sock_diag shows those from Linux 6.5, with a request this module
   * does not make); nor one bound between this look and the bind (or the
   * bind of a later connection at the same address and port).
   */
  private refuseForeignListener(c: TcpConnection, what: string, uids: ReadonlySet<number>, handed: Iterable<number>): Buffer {
    // validate.ts refused these already (connectionAddressFault).
    const fault = connectionAddressFault(c);
    if (fault) throw new AppshotError(`corrupt image: ${what} ${fault}`);
    const local = addressBytes(c.family, c.localAddress)!;
    const reach = reachOf(c.family, local);
    const at = `${local.toString('hex')} ${c.localPort} ${[...uids].sort().join(',')}`;
    if (this.portsSeen.has(at)) return local;
    // Address, owner and IPV6_V6ONLY from the one sock_diag answer that
    // names the listener: a failure to ask is a refusal, not a pass.
    let listening: { family: number; ino: bigint; uid: number; address: Buffer; v6only?: boolean }[];
    try {
      listening = [AF_INET, AF_INET6].flatMap((family) => addon().tcpListeners(family, c.localPort).map((l) => ({ ...l, family, ino: BigInt(l.ino) })));
    } catch (e) {
      throw new AppshotError(`${what}: the TCP connection ${connectionName(c)}: cannot tell which listeners share port ${c.localPort} (${(e as Error).message}), so cannot make it in repair mode without perhaps taking one over`);
    }
    const foreign = listening.filter((l) => !this.own.has(l.ino) && this.kept.get(l.ino) === undefined && overlaps(reach, reachOf(l.family, l.address, l.v6only)));
    if (foreign.length) {
      const handedInodes = new Set<bigint>();
      for (const fd of handed)
        try {
          handedInodes.add(fstatSync(fd, { bigint: true }).ino);
        } catch {
          /* not one the restore can use either */
        }
      for (const l of foreign) {
        if (handedInodes.has(l.ino) || uids.has(l.uid)) continue;
        const address = addressText(l.address);
        throw new AppshotError(
          `${what}: the TCP connection ${connectionName(c)}: port ${c.localPort} is another application's (a listener at ${l.family === AF_INET6 ? `[${address}]` : address}:${c.localPort}, uid ${l.uid}, inode ${l.ino}): made here in repair mode, the connection would take it over from that listener`,
          ExitCode.conflict,
        );
      }
    }
    this.portsSeen.add(at);
    return local;
  }

  /** Every process is made: the connections leave repair mode, write
   * what they had never sent, and get their options back; one in
   * CLOSE_WAIT is sent its peer's FIN again. A kept one is the
   * original: its queues and its peer's FIN are in it already. */
  release(): void {
    for (const m of this.made.values()) {
      if (!m.repaired) continue;
      if (m.kept) {
        // A restore killed after this step left them out of repair mode
        // already, held again by the keeper: nothing to undo then.
        // The filter goes before repair mode here, the reverse of a
        // snapshot's order: no restored process runs yet (each is let go
        // after this), so a packet let in meanwhile waits in the queue for
        // a reader that can read it, and none is dropped to be sent again.
        try {
          addon().tcpLock(m.fd, false);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
        }
        addon().tcpRepair(m.fd, -1);
      } else addon().tcpRelease(m.fd, neverSent(m.c));
      m.repaired = false;
      const extras = extrasOf(m.c.socketOptions, CARRIED_OPTIONS);
      for (const o of m.c.socketOptions) if (!extras.includes(o) && !forcedReuse(o)) addon().setSockOpt(m.fd, o.level, o.name, o.value);
      if (!m.kept) {
        // A kept socket is the original, its options its own already.
        const where = `the TCP connection ${connectionName(m.c)}`;
        applyExtras(m.fd, extras, CARRIED_OPTIONS, true, where);
        applyExtras(m.fd, extras, CARRIED_OPTIONS, false, where);
        ownBufferLocks(m.fd, m.c);
      }
      if (!m.kept && m.c.state === TCP_CLOSE_WAIT) refin(m.fd, m.c);
    }
  }

  /** Our descriptors go (the processes hold theirs). Before release(),
   * that is a failed restore: still in repair mode, the sockets close
   * without a word to the peers, who may be given a later restore. (Kept
   * ones are KeptSockets' to close, or to give back to a keeper.) */
  close(): void {
    for (const m of this.made.values())
      if (!m.kept)
        try {
          closeSync(m.fd);
        } catch {
          /* closed already */
        }
    this.made.clear();
  }
}

/** Our descriptor for the connection `fd` holds: made (in repair mode)
 * the first time one of its descriptors is asked for. */
export function openConnection(h: RestoreContext, p: Process, fd: Fd): number {
  const ino = fd.tcp?.ino;
  const uids = new Set<number>();
  for (const q of h.image.processes)
    if (q.fds.some((f) => f.tcp?.ino === ino)) for (const c of [q.creds, ...q.threads.map((t) => t.creds)]) for (const uid of c?.uid ?? []) uids.add(uid);
  const sock = h.tcp.open(fd.tcp, `process ${p.vpid} fd ${fd.fd}`, () => ownerFor(h, p, fd), { uids, handed: h.inherit.values() });
  addon().setStatusFlags(sock, fd.flags);
  return sock;
}

/**
 * A buffer the restore raised to hold a queue (tcp_repair.c make_room,
 * SO_*BUFFORCE) is locked by that setsockopt, as if the application had
 * fixed its size: the kernel would tune it no more, and a later snapshot
 * would record that size as the application's (SO_BUF_LOCK's bit says
 * which sizes are), to be forced again at the next restore, and weighed
 * as needing CAP_NET_ADMIN where it is above twice net.core.*mem_max.
 * Once the queues are refilled and the application's own sizes set again
 * (applyExtras, locked), the lock bits go back to the application's: the
 * raised size stays, to hold what is queued, and is the kernel's to tune
 * (or shrink under memory pressure) from there. A kernel without
 * SO_BUF_LOCK (before 5.14) cannot clear a bit: left as it is.
 */
function ownBufferLocks(fd: number, c: TcpConnection): void {
  let own = 0;
  for (const o of c.socketOptions)
    if (o.level === SOL_SOCKET)
      if (o.name === SO_BUF_LOCK) own |= o.value & (SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK);
      // An image from before SO_BUF_LOCK was read: a size it records was
      // the application's (recorded only when locked).
      else if (o.name === SO_SNDBUF) own |= SOCK_SNDBUF_LOCK;
      else if (o.name === SO_RCVBUF) own |= SOCK_RCVBUF_LOCK;
  let now: number;
  try {
    now = addon().getSockOpt(fd, SOL_SOCKET, SO_BUF_LOCK);
  } catch {
    return;
  }
  if (now !== own) addon().setSockOpt(fd, SOL_SOCKET, SO_BUF_LOCK, own);
}

/** The bytes written to a made connection once it is out of repair mode:
 * those never sent, but where the application's FIN follows them, which
 * the restore queues behind them as sent (tcp_repair.c). */
function neverSent(c: TcpConnection): Buffer {
  if (c.state === TCP_FIN_WAIT1 || c.state === TCP_FIN_WAIT2) return Buffer.alloc(0);
  return c.sendQueue.subarray(c.sendQueue.length - c.unsent);
}

/** Repair mode cannot queue a FIN: the peer's is sent again, and taken
 * (on loopback, by the time sendto returns; a few ms are allowed). */
function refin(fd: number, c: TcpConnection): void {
  addon().tcpRefin(c);
  for (let i = 0; i < 200 && addon().tcpState(fd) !== TCP_CLOSE_WAIT; i++) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
  const state = addon().tcpState(fd);
  if (state !== TCP_CLOSE_WAIT) throw new AppshotError(`the TCP connection ${connectionName(c)}: its peer's FIN, sent again, was not taken (${TCP_STATES[state] ?? state})`);
}

/**
 * The socket a keeper held as connection `c` must be that connection:
 * its family, local address and port, and (while it has one) its peer as
 * the image records them. The inode and the image's id that select it
 * are an image's word (as for a listener: sockets.ts isListenerAt), and
 * the privilege rule (sockets.ts checkSocketPrivileges) weighs the port
 * the record names: a crafted image would otherwise hand a process that
 * lacked CAP_NET_BIND_SERVICE a socket bound to a port it could not bind,
 * which an application this user snapshotted made. The restore then
 * fails, and the keeper holds the socket again.
 */
function requireHeldAs(sock: number, c: TcpConnection, what: string): void {
  let family: number;
  let live: { state: number; address: string; port: number; remote: string };
  try {
    family = addon().sockInfo(sock).family;
    live = addon().tcpEndpoint(sock);
  } catch (e) {
    throw new AppshotError(`${what}: the socket appshot-keeper holds as the TCP connection ${connectionName(c)} cannot be read: ${(e as Error).message}`);
  }
  const [peerAddress, peerPort] = splitRemote(live.remote);
  // No peer any more (reset meanwhile): its own end is still known.
  const samePeer = peerPort === 0 || (peerAddress === c.peerAddress && peerPort === c.peerPort);
  // A listener (keeper.ts addListener) has no peer either, and is not a
  // connection (review r369).
  const listening = live.state === TCP_LISTEN;
  if (family !== c.family || live.address !== c.localAddress || live.port !== c.localPort || !samePeer || listening)
    throw new AppshotError(
      `${what}: the socket appshot-keeper holds as the TCP connection ${connectionName(c)} (inode ${c.ino}) is ${listening ? `a listener on ${live.address}:${live.port}` : connectionName({ localAddress: live.address, localPort: live.port, peerAddress, peerPort })}: the image's record of it is not the socket`,
    );
}

/** An image may come from anyone: what the kernel is told must make sense. */
function check(c: TcpConnection, what: string): void {
  const bad = (why: string) => new AppshotError(`corrupt image: ${what}: the TCP connection ${why}`);
  if (c.family !== AF_INET && c.family !== AF_INET6) throw bad(`has address family ${c.family}`);
  if (c.closed) return;
  if (!KEPT_STATES.has(c.state)) throw bad(`is in state ${c.state}`);
  if (c.unsent > c.sendQueue.length) throw bad('has more unsent bytes than its send queue holds');
  for (const o of c.socketOptions)
    if (!CARRIED_OPTIONS.some(([level, name]) => level === o.level && name === o.name) && !isCarriedExtra('tcp', c.family, CARRIED_OPTIONS, o))
      throw bad(`carries socket option ${o.level}/${o.name}, which appshot does not set`);
}
