/** `appshot inspect`: what an image holds, for people (like `crit show`)
 * and, with --json, for scripts. */
import { rawName } from '../resources/raw.js';
import { describeAttributes } from '../resources/attributes.js';
import { describeUnconnected } from '../resources/unconnected.js';
import { describePidfd } from '../resources/pidfd.js';
import { describeInotify } from '../resources/inotify.js';
import { describeFanotify } from '../resources/fanotify.js';
import { describeIoUring } from '../resources/iouring.js';
import { describeLocks } from '../resources/locks.js';
import { countPages } from '../resources/memory.js';
import { describeTimerfd } from '../resources/timerfd.js';
import { describeMessageQueue } from '../resources/mqueue.js';
import { describeAioRings } from '../resources/aio.js';
import { protocolName } from '../resources/netlink.js';
import { describePosixTimer } from '../resources/timers.js';
import { connectionName } from '../resources/tcp.js';
import { flagNames } from '../commands/json.js';
import { printable } from '../errors.js';
import { ENTRY_FLAG_NAMES, printColumns } from '../inspect.js';
import { plural } from '../words.js';
import { fdKindName, type Fd, type Image, type Manifest, type Process, vmaKindName } from './types.js';
import { toJson } from './format.js';
import type { Signer } from './trust.js';

/** Who signed an image, in words: "signed by key 1a2b… (this node's)". */
export function describeSigner(signer: Signer): string {
  if (signer.trusted) return `signed by key ${signer.keyId} (${signer.trusted.name === 'self' ? "this node's" : `trusted as ${signer.trusted.name}`})`;
  if (!signer.keyId) return 'not signed (restore runs it only with --trust-image)';
  return `not trusted here: ${signer.problem}`;
}

const SYSCALL_NAMES: Record<number, string> = { 0: 'read', 1: 'write', 7: 'poll', 23: 'select', 35: 'nanosleep', 61: 'wait4', 202: 'futex', 230: 'clock_nanosleep', 232: 'epoll_wait', 281: 'epoll_pwait', 43: 'accept', 288: 'accept4', 34: 'pause', 270: 'pselect6', 271: 'ppoll', 69: 'msgsnd', 70: 'msgrcv', 65: 'semop', 220: 'semtimedop', 247: 'waitid' };

export function syscallName(nr: bigint): string {
  if (nr < 0n) return '';
  return SYSCALL_NAMES[Number(nr)] ?? `syscall ${nr}`;
}

const size = (bytes: bigint | number) => {
  const b = Number(bytes);
  if (b >= 1 << 30) return `${(b / (1 << 30)).toFixed(1)}G`;
  if (b >= 1 << 20) return `${(b / (1 << 20)).toFixed(1)}M`;
  return `${Math.round(b / 1024)}K`;
};

/** "1,2,15" for a mask with bits 0, 1 and 14. */
function signalList(mask: bigint): string {
  const out: number[] = [];
  for (let n = 1; n <= 64; n++) if (mask & (1n << BigInt(n - 1))) out.push(n);
  return out.join(',') || 'none';
}

/** How inspect names a half-closed connection, by tcpi_state. */
const HALF_CLOSED: Record<number, string> = {
  4: ' (FIN_WAIT1: the application shut its side down)',
  5: ' (FIN_WAIT2: the application shut its side down)',
  8: ' (CLOSE_WAIT: the peer closed its side)',
};

/** A socket's sk_shutdown bits (1 reading, 2 writing), in words. */
const SHUT = ['', ', shut down for reading', ', shut down for writing', ', shut down'];

/** "udp 127.0.0.1:5353 → 10.0.0.1:53, 2 datagrams queued (40 bytes), shut down for writing" */
function describeDatagramSocket(fd: Fd): string {
  const s = fd.socket;
  if (!s) return 'socket';
  const at = (a: string, p: number) => (fd.kind === 12 ? (a.includes(':') ? `[${a}]:${p}` : `${a}:${p}`) : a);
  const own = s.address ? at(s.address, s.port) : fd.kind === 12 ? '(unbound)' : '(unnamed)';
  const peer = s.peerAddress ? ` → ${at(s.peerAddress, s.peerPort ?? 0)}` : s.peerIno ? ` → socket ${s.peerIno}` : '';
  const queued = s.datagrams ?? [];
  const shut = SHUT[s.shutdown ?? 0] ?? '';
  const groups = s.memberships?.length ? `, member of ${s.memberships.map((m) => `${m.group}%${m.device}`).join(' ')}` : '';
  return `${fd.kind === 12 ? 'udp' : 'unix dgram'} ${own}${peer}, ${plural(queued.length, 'datagram')} queued (${plural(queued.reduce((n, d) => n + d.data.length, 0), 'byte')})${shut}${groups}`;
}

/** A descriptor's owner and signal (resources/fdowner.ts). */
function describeOwner(fd: Fd): string {
  if (!fd.owner) return '';
  const who = fd.owner.vpid ? `${['thread', 'process', 'process group'][fd.owner.type]} ${fd.owner.vpid}` : 'nobody';
  const signal = fd.owner.signal ? ` by signal ${fd.owner.signal}` : '';
  const watch = fd.owner.dnotify ? `, watched with dnotify (mask 0x${(fd.owner.dnotify >>> 0).toString(16)})` : '';
  // O_ASYNC: 0o20000.
  return (fd.flags & 0o20000 ? `, O_ASYNC to ${who}${signal}` : `, owned by ${who}${signal}`) + watch;
}

function describeFd(image: Image, fd: Fd): string {
  switch (fdKindName[fd.kind]) {
    case 'FILE':
      return `${fd.path} pos=${fd.pos}`;
    case 'PIPE':
    case 'FIFO': {
      const p = image.pipes[fd.pipe];
      const end = (fd.flags & 3) === 2 ? 'read-write' : fd.writeEnd ? 'write' : 'read';
      return `${fd.path} ${end} end, ${plural(p?.data.length ?? 0, 'byte')} buffered, capacity ${p?.capacity ?? 0}`;
    }
    case 'TCP_LISTEN':
      return `listening ${fd.socket?.address}:${fd.socket?.port}${fd.socket?.inherited ? `, inherited from '${fd.socket.inherited}' (installed by the restore's caller)` : ''}`;
    case 'TCP_ESTABLISHED': {
      const c = fd.tcp;
      if (!c) return 'tcp connection';
      if (c.kept) return `tcp ${connectionName(c)}, taken without TCP repair: held live by appshot-keeper on the host of the snapshot`;
      return c.closed
        ? `tcp ${connectionName(c)}, recorded closed`
        : `tcp ${connectionName(c)}${HALF_CLOSED[c.state] ?? ''}, ${plural(c.recvQueue.length, 'byte')} unread, ${c.sendQueue.length} unacknowledged (${c.unsent} never sent)`;
    }
    case 'UNIX_SOCKET':
      if (fd.socket?.kept) return `unix ${fd.socket.type === 5 ? 'seqpacket' : 'stream'} connection to a process outside, held by appshot-keeper on the host of the snapshot`;
      if (fd.socket && !fd.socket.listening) return `unix ${fd.socket.type === 5 ? 'seqpacket' : 'stream'} pair end, ${fd.socket.datagrams?.length ? plural(fd.socket.datagrams.length, 'record') : plural(fd.socket.queued.length, 'byte')} queued${fd.socket.peerGone ? ', its peer gone' : SHUT[fd.socket.shutdown ?? 0] ?? ''}`;
      return `listening unix ${fd.socket?.address}`;
    case 'UNIX_DGRAM':
    case 'UDP':
      return describeDatagramSocket(fd);
    case 'PIDFD':
      return describePidfd(fd);
    case 'RAW':
      return fd.socket ? rawName(fd.socket) : 'raw socket';
    case 'NETLINK': {
      const n = fd.socket?.netlink;
      if (!n) return 'netlink socket';
      const to = n.connected ? `, connected to ${n.dstGroup ? `group ${n.dstGroup}` : `port id ${n.dstPortId}`}` : '';
      return `netlink ${protocolName(n.protocol)} socket, port id ${n.portId || 'none (unbound)'}${n.groups.length ? `, groups ${n.groups.join(',')}` : ''}${to}`;
    }
    case 'UNCONNECTED_STREAM':
      return fd.socket ? describeUnconnected(fd.socket) : 'unconnected socket';
    case 'EVENTFD':
      return `eventfd count=${fd.eventfdCount}`;
    case 'SIGNALFD':
      return `signalfd reading signals ${signalList(fd.sigmask)}`;
    case 'TIMERFD':
      return describeTimerfd(fd.timerfd);
    case 'INOTIFY':
      return describeInotify(fd.inotifyWatches);
    case 'FANOTIFY':
      return describeFanotify(fd.fanotify);
    case 'IO_URING':
      return describeIoUring(fd.ioUring);
    case 'MQUEUE':
      return describeMessageQueue(image, fd);
    case 'PTY': {
      const pair = image.ptys?.[fd.pty?.pair ?? -1];
      return `pty ${fd.pty?.master ? 'master' : 'slave'} of /dev/pts/${pair?.index}, ${plural(pair?.input.length ?? 0, 'byte')} of input and ${pair?.output.length ?? 0} of output queued${pair?.foreground ? `, foreground group ${pair.foreground}` : ''}${(fd.pty?.master ? pair?.masterExclusive : pair?.slaveExclusive) ? ', exclusive (TIOCEXCL)' : ''}`;
    }
    case 'EPOLL':
      return `epoll watching ${fd.epoll.map((t) => `${t.fd}${t.heldAt ? ` (now ${t.heldAt - 1})` : ''}${t.pending ? ' (pending)' : t.pending === false ? ' (taken)' : ''}`).join(',') || 'nothing'}`;
    default:
      return fd.path;
  }
}

/** The JSON form: the image itself, with derived sizes and names added. */
export function imageJson(manifest: Manifest, image: Image, signer: Signer): unknown {
  // The image's own fields (proto/image.proto), but times in ms as every
  // command gives them, the instant named as everywhere (createdAt), and
  // a mapping's protection by name beside its bits; a table entry's flags
  // by name, as `table --json` gives them.
  const { created, stats, ...rest } = image;
  const usToMs = (us: bigint) => Math.round(Number(us)) / 1000;
  return toJson({
    manifest,
    signer: { keyId: signer.keyId || null, trusted: !!signer.trusted, name: signer.trusted?.name ?? null, problem: signer.problem ?? null },
    createdAt: created,
    ...rest,
    stats: { pages: stats.pages, pagesFromParent: stats.pagesFromParent, frozenMs: usToMs(stats.frozenUs), dumpMs: usToMs(stats.dumpUs) },
    processes: image.processes.map((p) => ({
      ...p,
      threads: p.threads.map((t) => ({ ...t, syscall: syscallName(t.inSyscall) })),
      vmas: p.vmas.map((v) => ({
        ...v,
        perms: `${v.prot & 1 ? 'r' : '-'}${v.prot & 2 ? 'w' : '-'}${v.prot & 4 ? 'x' : '-'}${v.shared ? 's' : 'p'}`,
        kindName: vmaKindName[v.kind],
        size: v.end - v.start,
        storedPages: countPages(v.pages?.runs ?? []),
        parentPages: countPages(v.pages?.fromParent ?? []),
      })),
      fds: p.fds.map((f) => ({ ...f, kindName: fdKindName[f.kind] })),
    })),
    tables: image.tables.map((t) => ({ ...t, entries: t.entries.map((e) => ({ ...e, flags: flagNames(e.flags, ENTRY_FLAG_NAMES) })) })),
  });
}

export function printImage(manifest: Manifest, image: Image, signer: Signer, write: (s: string) => void = (s) => process.stdout.write(s)): void {
  // Every string here is the image's (an argv, a path, a hostname), which
  // anyone may have written: each line's text is printed with its control
  // and bidi characters escaped, a newline inside it too; only the line
  // breaks around it are ours. (printColumns escapes its cells itself.)
  const out = (text: string) => {
    const [, before, line, after] = /^(\n*)([\s\S]*?)(\n*)$/.exec(text)!;
    write(before + printable(line) + after);
  };
  const s = image.stats;
  out(`image ${manifest.imageId} (format ${manifest.formatVersion}) of '${image.aid}', taken ${image.created} on ${image.node.hostname} (${image.node.arch}, Linux ${image.node.kernel})\n`);
  out(`${describeSigner(signer)}\n`);
  if (image.parent) out(`incremental: parent ${image.parent.imageId} at ${image.parent.path}\n`);
  out(`${plural(image.processes.length, 'process')}, ${plural(s.pages, 'page')} stored (${size(s.pages * 4096n)}), ${s.pagesFromParent} from the parent; frozen ${Number(s.frozenUs) / 1000} ms\n`);
  out(`command: ${image.command.join(' ')}\n`);
  const actions = new Map<string, number>();
  for (const v of image.verdicts) actions.set(v.action, (actions.get(v.action) ?? 0) + 1);
  out(`templating: ${image.rules ? `rules ${image.rules.source}; ` : 'no rules; '}${[...actions].map(([a, n]) => `${n} ${a}`).join(', ') || 'no verdicts'} (--json lists each)\n`);
  out('\nprocesses:\n');
  printColumns(
    ['VPID', 'VPPID', 'VPGID', 'VSID', 'THREADS', 'FDS', 'MEMORY', 'COMMAND'],
    image.processes.map((p) => [String(p.vpid), String(p.vppid), String(p.vpgid), String(p.vsid), String(p.threads.length), String(p.fds.length), size(p.vmas.reduce((n, v) => n + countPages(v.pages?.runs ?? []) * 4096, 0)), p.argv.join(' ') || p.comm]),
    write,
  );
  for (const p of image.processes) {
    out(`\nprocess ${p.vpid} (${p.comm}): exe ${p.exe}, cwd ${p.cwd}${p.root && p.root !== '/' ? `, root ${p.root}` : ''}, uid ${p.creds.uid[0]}, umask ${p.umask.toString(8).padStart(4, '0')}, ${p.sigactions.length} signal handlers${p.groupStopped ? `, stopped by signal ${p.stopSignal || 19}` : ''}${p.parentVtid ? `, forked by thread ${p.parentVtid} of ${p.vppid}` : ''}${timeNamespaceText(p)}${keyringText(p)}\n`);
    printColumns(
      ['VTID', 'STATE', 'IN', 'RIP', 'SIGMASK', 'UIDS', 'GIDS', 'CAPEFF', 'SECCOMP'],
      p.threads.map((t) => {
        const c = t.creds ?? p.creds;
        const n = c.seccompFilters.length + (c.seccompContext ?? 0);
        const seccomp = c.seccomp === 2 ? `${n} filter${n === 1 ? '' : 's'}${c.seccompContext ? ` (${c.seccompContext} appshot's)` : ''}` : c.seccomp === 1 ? 'strict' : '-';
        return [String(t.vtid), t.state, syscallName(t.inSyscall) || '-', '0x' + t.regs.readBigUInt64LE(16 * 8).toString(16), '0x' + t.sigmask.toString(16), c.uid.join('/'), c.gid.join('/'), '0x' + c.capEff.toString(16), seccomp];
      }),
      write,
    );
    printColumns(
      ['START', 'END', 'PROT', 'KIND', 'SIZE', 'STORED', 'PATH'],
      p.vmas.map((v) => [v.start.toString(16), v.end.toString(16), (v.prot & 1 ? 'r' : '-') + (v.prot & 2 ? 'w' : '-') + (v.prot & 4 ? 'x' : '-') + (v.shared ? 's' : 'p'), vmaKindName[v.kind], size(v.end - v.start), size(countPages(v.pages?.runs ?? []) * 4096), v.path]),
      write,
    );
    printColumns(['FD', 'KIND', 'WHAT'], p.fds.map((f) => [String(f.fd), fdKindName[f.kind], describeFd(image, f) + describeOwner(f)]), write);
    if (describeAttributes(p)) out(`attributes: ${describeAttributes(p)}\n`);
    if (describeLocks(p)) out(`file locks: ${describeLocks(p)}\n`);
    if (describeAioRings(p)) out(`AIO contexts: ${describeAioRings(p)}\n`);
    if (p.zombies?.length) out(`zombie children: ${p.zombies.map((z) => `${z.vpid} (${z.status & 0x7f ? `killed by signal ${z.status & 0x7f}` : `exit status ${z.status >> 8}`}${z.parentVtid ? `, forked by thread ${z.parentVtid}` : ''})`).join(', ')}\n`);
    if (p.posixTimers?.length) out(`POSIX timers: ${p.posixTimers.map(describePosixTimer).join('; ')}\n`);
  }
  if (image.semaphores.length || image.shmSegments.length || image.msgQueues.length) {
    out('\nSysV IPC:\n');
    printColumns(
      ['KIND', 'VID', 'VKEY', 'MODE', 'CONTENTS'],
      [
        ...image.semaphores.map((x) => ['sem', String(x.vid), '0x' + x.vkey.toString(16), x.mode.toString(8), `values ${x.values.join(',')}`]),
        // The mode as the kernel lists it: SHM_DEST (0o1000) with it.
        ...image.shmSegments.map((x) => ['shm', String(x.vid), '0x' + x.vkey.toString(16), (x.mode | (x.destroyed ? 0o1000 : 0)).toString(8), plural(x.size, 'byte')]),
        ...image.msgQueues.map((x) => ['msg', String(x.vid), '0x' + x.vkey.toString(16), x.mode.toString(8), plural(x.messages.length, 'message')]),
      ],
      write,
    );
  }
  out('\ntables:\n');
  printColumns(['KIND', 'VIRTUAL', 'SYSTEM'], image.tables.flatMap((t) => t.entries.map((e) => [t.kind, String(e.virtual), String(e.system)])), write);
}

/** ", clocks offset monotonic +S s boottime +S s" for a process whose time
 * namespace is not the node's (resources/timens.ts). */
function timeNamespaceText(p: Process): string {
  const t = p.timeOffsets;
  if (!t || (t.monotonicNs === 0n && t.boottimeNs === 0n)) return '';
  const s = (ns: bigint) => `${ns >= 0n ? '+' : ''}${Number(ns) / 1e9} s`;
  return `, time namespace: monotonic ${s(t.monotonicNs)}, boottime ${s(t.boottimeNs)}`;
}

/** ", session keyring _ses (keyctl serial S at snapshot): 2 keys "a", "b"". */
function keyringText(p: Process): string {
  const ring = p.sessionKeyring;
  if (!ring) return '';
  const keys = ring.keys.map((k) => JSON.stringify(k.description)).join(', ');
  return `, session keyring ${ring.description} (serial ${ring.serial} at snapshot, perm ${ring.perm.toString(16).padStart(8, '0')}): ${ring.keys.length} ${ring.keys.length === 1 ? 'key' : 'keys'}${keys ? ` ${keys}` : ''}`;
}
