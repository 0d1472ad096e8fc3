/**
 * The privilege rule for state the restorer makes with its own rights
 * (review r344 items 1, 2 and 7): a socket bound to a privileged port or
 * given an option only a capability sets, a thread's real-time policy,
 * negative nice or real-time I/O class, locked memory, a timer on an
 * alarm clock. Each is restored only for a process of the image that
 * could have made it itself (heldcaps.ts): a crafted image of a uid-65534
 * process with none of it is refused in one line, exit 5 (or 1 for a
 * malformed record), before anything is made: no process, no port bound,
 * no registration, no tables. The same state made by a root application
 * that held the capabilities restores as it was.
 *
 * The crafted images are the nobody snapshot with one change, signed
 * again with another node's key and vouched for with --trust-image (as
 * test/hostile.test.ts does for what only this node's own snapshot is
 * believed about): only the change can be what is refused. This node's
 * own snapshot is what the kernel showed, and restores its state as it
 * was even where its process dropped the privileges that made it.
 *
 * Then the sockets the restore hands over rather than makes: a connection
 * appshot-keeper holds is given only as the image records it (its port
 * weighed as any), and only to processes that could have set the options
 * the socket itself has (a root server's SO_MARK, which the record need
 * not say); and netlink groups, whose rule is checked against
 * what the kernel lets a process without capabilities join.
 */
import { spawn, spawnSync } from 'node:child_process';
import { connect, type Socket as Client } from 'node:net';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { type Fd, FdKind, type Image, type Process, type Socket, type SocketOption, type TcpConnection } from '../src/image/types.js';
import { groupPrivilege } from '../src/resources/netlink.js';
import { expectRestoreRefused, writeSignedImage } from './crafted.js';
import { fixture, Sandbox, waitFor } from './helpers.js';

const isRoot = process.getuid?.() === 0;
const sb = new Sandbox();
/** Another node, whose key signs the crafted images. */
const other = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-hostile-priv-'));
process.env.APPSHOT_HOME = sb.home;
const TCP_PORT = 81;
const UDP_PORT = 82;
let nobody = '';
let nobodyImage: Image;
let rootPriv = '';
let dropped = '';

afterAll(async () => {
  await sb.dispose();
  await other.dispose();
  rmSync(out, { recursive: true, force: true });
});

const log = (aid: string) => readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
const checks = (aid: string) => (log(aid).match(/^CHECK \d+$/gm) ?? []).length;

async function snapshotOf(aid: string, args: string[], dest: string): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...args]);
  if (r.code !== 0) throw new Error(r.stderr);
  await waitFor(() => checks(aid) >= 2 || /FAIL/.test(log(aid)), 10_000, `${aid} to settle`);
  if (/FAIL/.test(log(aid))) throw new Error(log(aid));
  const s = sb.run(['snapshot', aid, '-o', dest]);
  if (s.code !== 0) throw new Error(s.stderr);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
}

beforeAll(async () => {
  if (!isRoot) return;
  nobody = join(out, 'nobody');
  // chroot --userspec: plain setresuid, no capability left (as creds.test.ts).
  await snapshotOf('nb', ['chroot', '--userspec=65534:65534', '--groups=', '/', fixture('privstate'), '0', '0', 'plain'], nobody);
  const loaded = await loadImage(nobody, { trust: 'report' });
  nobodyImage = loaded.image;
  rootPriv = join(out, 'rootpriv');
  await snapshotOf('rp', [fixture('privstate'), String(TCP_PORT), String(UDP_PORT), 'priv'], rootPriv);
  dropped = join(out, 'dropped');
  await snapshotOf('dp', [fixture('privstate'), String(TCP_PORT), String(UDP_PORT), 'drop'], dropped);
});

/** The nobody image (or `from`) with `change` made to its metadata,
 * signed again by the other node. */
function crafted(name: string, change: (image: Image, p: Process) => void, from = nobodyImage, pages = nobody): string {
  const image = structuredClone(from);
  change(image, image.processes.find((p) => p.fds.some((fd) => fd.kind === FdKind.TCP_LISTEN))!);
  return writeSignedImage(join(out, name), image, pages, { signer: other.home });
}

/** Processes running the fixture, by system PID. */
function fixtureProcesses(): number[] {
  const exe = fixture('privstate');
  return readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        return readlinkSync(`/proc/${d}/exe`) === exe;
      } catch {
        return false;
      }
    })
    .map(Number);
}

/** Whether anything listens on (TCP) or is bound to (UDP) 127.0.0.1:port. */
function bound(proto: 'tcp' | 'udp', port: number): boolean {
  const r = spawnSync('ss', ['-Hn', proto === 'tcp' ? '-lt' : '-lu', `sport = :${port}`], { encoding: 'utf8' });
  return r.stdout.trim() !== '';
}

/** The restore of `image` must be refused: one line matching `why`, exit
 * `code`, and nothing left of it. */
function refused(image: string, why: RegExp, code = 5): void {
  expectRestoreRefused(sb, image, why, code);
  expect(fixtureProcesses()).toEqual([]);
  expect(bound('tcp', TCP_PORT)).toBe(false);
  expect(bound('udp', 53)).toBe(false);
}

/** A crafted image's lie about a socket appshot-keeper holds, refused
 * (expectRestoreRefused: one line, the exit code, nothing left), and the
 * keeper holding it again for the real image. */
function refusedKeeperHolding(dir: string, why: RegExp, code: number, extra: string[] = []): void {
  expectRestoreRefused(sb, dir, why, code, extra);
  expect(keepers()).toHaveLength(1);
}

const listenerOf = (p: Process) => p.fds.find((fd) => fd.kind === FdKind.TCP_LISTEN)!;
const udpOf = (p: Process) => p.fds.find((fd) => fd.kind === FdKind.UDP)!;
const worker = (p: Process) => p.threads[1];
const NO_PROCESS_HAD = /which no process holding the socket had/;

describe.runIf(isRoot)('privileged socket state of an image whose processes had no capability', () => {
  it('a TCP listener on port 81 is refused (CAP_NET_BIND_SERVICE)', () => {
    const dir = crafted('tcp81', (_i, p) => void (listenerOf(p).socket!.port = TCP_PORT));
    refused(dir, new RegExp(`process \\d+ \\(privstate\\) fd ${listenerOf(nobodyImage.processes[0]).fd}: a TCP listener on port 81 needs CAP_NET_BIND_SERVICE, ${NO_PROCESS_HAD.source}`));
  });

  it('a UDP socket on port 53 is refused', () => {
    refused(crafted('udp53', (_i, p) => void (udpOf(p).socket!.port = 53)), /fd \d+: a UDP socket on port 53 needs CAP_NET_BIND_SERVICE, which no process holding the socket had/);
  });

  it('SO_MARK, IP_TRANSPARENT, SO_PRIORITY 7, SO_DEBUG and a forced buffer size are each refused', () => {
    const rmemMax = Number(readFileSync('/proc/sys/net/core/rmem_max', 'utf8'));
    const cases: [string, { level: number; name: number; value: number }, RegExp][] = [
      ['mark', { level: 1, name: 36, value: 4242 }, /option SO_MARK 4242 needs CAP_NET_RAW or CAP_NET_ADMIN/],
      ['transparent', { level: 0, name: 19, value: 1 }, /option IP_TRANSPARENT needs CAP_NET_RAW or CAP_NET_ADMIN/],
      ['priority', { level: 1, name: 12, value: 7 }, /option SO_PRIORITY 7 \(above 6\) needs CAP_NET_RAW or CAP_NET_ADMIN/],
      ['debug', { level: 1, name: 1, value: 1 }, /option SO_DEBUG needs CAP_NET_ADMIN/],
      ['rcvbuf', { level: 1, name: 8, value: 2 * rmemMax + 4096 }, /option SO_RCVBUF \d+ \(above twice net.core.rmem_max, \d+\) needs CAP_NET_ADMIN/],
    ];
    for (const [name, option, why] of cases) {
      const dir = crafted(`opt-${name}`, (_i, p) => {
        const s = udpOf(p).socket!;
        s.options = [...(s.options ?? []), option];
      });
      refused(dir, new RegExp(`fd \\d+: ${why.source}, ${NO_PROCESS_HAD.source}`));
    }
  });
});

/** Another descriptor `n` of `p` (fields as its UDP one's), of `kind`,
 * holding `record` (a socket, or a connection). */
function addFd(p: Process, n: number, kind: number, record: Pick<Fd, 'socket' | 'tcp'>): void {
  p.fds.push({ ...structuredClone(udpOf(p)), fd: n, kind, socket: undefined, tcp: undefined, ...record });
}

/** A socket record with none of the UDP socket's state but `fields`. */
const socketRecord = (p: Process, ino: bigint, fields: Partial<Socket>): Socket => ({
  ...structuredClone(udpOf(p).socket!), ino, address: '', port: 0, options: [], datagrams: [], memberships: [], peerAddress: undefined, peerPort: undefined, ...fields,
});

/** An established connection's record (made in repair mode: no peer needed). */
const connection = (ino: bigint, localPort: number, socketOptions: SocketOption[] = []): TcpConnection => ({
  ino, family: 2, localAddress: '127.0.0.1', localPort, peerAddress: '127.0.0.1', peerPort: 40999, closed: false, state: 1, sendSeq: 1000, recvSeq: 2000,
  sendQueue: Buffer.alloc(0), unsent: 0, recvQueue: Buffer.alloc(0), mssClamp: 1460, options: 0, sndWscale: 0, rcvWscale: 0, timestamp: 0, socketOptions,
});

/** A congestion control this node has but does not allow everyone (cubic where none is). */
function restrictedCongestion(): string {
  const list = (f: string) => readFileSync(`/proc/sys/net/ipv4/${f}`, 'utf8').trim().split(/\s+/);
  const open = new Set([...list('tcp_allowed_congestion_control'), ...list('tcp_congestion_control')]);
  return list('tcp_available_congestion_control').find((c) => !open.has(c)) ?? 'cubic';
}

describe.runIf(isRoot)('privileged sockets of every other kind the restore makes (review r353)', () => {
  it('a bound TCP socket not listening, a connection\'s port, a raw socket, netlink connects and groups, and a connection\'s options are each refused', () => {
    const cc = restrictedCongestion();
    const ccBytes = Buffer.alloc(16);
    ccBytes.write(cc);
    const netlink = (p: Process, n: Partial<NonNullable<Socket['netlink']>>, options: SocketOption[] = []) =>
      addFd(p, 40, FdKind.NETLINK, { socket: socketRecord(p, 9_000_040n, { family: 16, type: 3, options, netlink: { protocol: 0, portId: 0x7ead_0001, connected: false, dstPortId: 0, dstGroup: 0, groups: [], ...n } }) });
    const cases: [string, (p: Process) => void, RegExp][] = [
      ['unconnected81', (p) => addFd(p, 40, FdKind.UNCONNECTED_STREAM, { socket: socketRecord(p, 9_000_040n, { type: 1, address: '127.0.0.1', port: TCP_PORT }) }), /fd 40: a TCP socket \(bound, not listening\) on port 81 needs CAP_NET_BIND_SERVICE/],
      ['connection81', (p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: connection(9_000_040n, TCP_PORT) }), /fd 40: the TCP connection 127\.0\.0\.1:81 → 127\.0\.0\.1:40999 from port 81 needs CAP_NET_BIND_SERVICE/],
      ['connection-cc', (p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: connection(9_000_040n, 40998, [{ level: 6, name: 13, value: 0, raw: ccBytes }]) }), new RegExp(`fd 40: option TCP_CONGESTION "${cc}" \\(not in net.ipv4.tcp_allowed_congestion_control\\) needs CAP_NET_ADMIN`)],
      ['raw', (p) => addFd(p, 40, FdKind.RAW, { socket: socketRecord(p, 9_000_040n, { type: 3, protocol: 1, rawFilter: Buffer.alloc(0) }) }), /fd 40: a raw IPv4 ICMP socket needs CAP_NET_RAW/],
      ['netlink-connect', (p) => netlink(p, { connected: true, dstGroup: 1 }), /fd 40: a NETLINK_ROUTE socket connected to group 1 needs CAP_NET_ADMIN/],
      ['netlink-mroute', (p) => netlink(p, { groups: [30] }), /fd 40: a NETLINK_ROUTE socket in group 30 \(RTNLGRP_IPV4_MROUTE_R\) needs CAP_NET_ADMIN/],
      ['netlink-allnsid', (p) => netlink(p, {}, [{ level: 270, name: 8, value: 1 }]), /fd 40: option NETLINK_LISTEN_ALL_NSID needs CAP_NET_BROADCAST/],
      // Recorded as held live by a keeper: handed over, not bound, but the
      // nobody process would get a socket from port 81 all the same.
      ['kept81', (p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: { ...connection(9_000_040n, TCP_PORT), kept: true } }), /fd 40: the TCP connection 127\.0\.0\.1:81 → 127\.0\.0\.1:40999 from port 81 needs CAP_NET_BIND_SERVICE/],
    ];
    for (const [name, add, why] of cases) refused(crafted(name, (_i, p) => add(p)), new RegExp(`${why.source}, ${NO_PROCESS_HAD.source}`));
  });

  it('two descriptors of one socket whose records differ are refused as corrupt (the restore makes it from one)', () => {
    // The UDP socket again as fd 41, bound to port 53 there only.
    const dir = crafted('shared53', (_i, p) => {
      const udp = udpOf(p);
      p.fds.push({ ...structuredClone(udp), fd: 41, socket: { ...structuredClone(udp.socket!), port: 53 } });
    });
    refused(dir, /corrupt image: process \d+'s fd 41 and process \d+'s fd \d+ are one socket \(inode \d+\) but their records of it differ/, 1);
  });
});

describe.runIf(isRoot)('privileged scheduling, locked memory and alarm clocks of an image whose processes had none', () => {
  it('SCHED_FIFO 99 beyond the thread\'s RLIMIT_RTPRIO is refused', () => {
    const dir = crafted('fifo99', (_i, p) => Object.assign(worker(p).attributes!, { schedPolicy: 1, schedPriority: 99 }));
    refused(dir, /process \d+ \(privstate\) thread \d+: SCHED_FIFO priority 99 needs CAP_SYS_NICE or RLIMIT_RTPRIO 99 \(the image's is 0\), which the thread could not set itself/);
  });

  it('nice -20 beyond RLIMIT_NICE is refused', () => {
    refused(crafted('nice', (_i, p) => void (worker(p).attributes!.nice = -20)), /thread \d+: nice -20 needs CAP_SYS_NICE or RLIMIT_NICE 40 \(the image's is 0\), which the thread could not set itself/);
  });

  it('the real-time I/O class is refused', () => {
    refused(crafted('ioprio', (_i, p) => void (worker(p).attributes!.ioprio = (1 << 13) | 4)), /thread \d+: the real-time I\/O class \(ioprio 0x2004\) needs CAP_SYS_NICE or CAP_SYS_ADMIN, which the thread could not set itself/);
  });

  it('locked memory beyond the process\'s RLIMIT_MEMLOCK is refused', () => {
    // Its one locked page, with its limit 0 (the process could lock none).
    const dir = crafted('mlock', (_i, p) => void (p.rlimits.find((r) => r.resource === 8)!.cur = 0n));
    refused(dir, /process \d+ \(privstate\): 4096 bytes of memory locked \(mlock\) needs CAP_IPC_LOCK or RLIMIT_MEMLOCK of as much, which the process did not have \(its RLIMIT_MEMLOCK: 0 bytes\)/);
  });

  it('a timerfd on CLOCK_BOOTTIME_ALARM and a POSIX timer on CLOCK_REALTIME_ALARM are refused (CAP_WAKE_ALARM)', () => {
    const tfd = crafted('alarmfd', (_i, p) => void (p.fds.find((fd) => fd.kind === FdKind.TIMERFD)!.timerfd!.clockid = 9));
    refused(tfd, /fd \d+: a timerfd on CLOCK_BOOTTIME_ALARM needs CAP_WAKE_ALARM, which the process did not have/);
    const timer = crafted('alarmtimer', (_i, p) => void (p.posixTimers![0].clockid = 8));
    refused(timer, /process \d+ \(privstate\): POSIX timer \d+ on CLOCK_REALTIME_ALARM needs CAP_WAKE_ALARM, which the process did not have/);
  });

  it('a POSIX timer on a clock timer_create does not take, and a CPU mask unbounded or empty, are corrupt', () => {
    refused(crafted('badclock', (_i, p) => void (p.posixTimers![0].clockid = 5)), /corrupt image: process \d+'s POSIX timer \d+ on clock 5, which timer_create does not take/, 1);
    refused(crafted('hugemask', (_i, p) => void (worker(p).attributes!.cpuAffinity = Buffer.alloc(1 << 20, 0xff))), /corrupt image: process \d+ thread \d+'s CPU affinity mask is 1048576 bytes/, 1);
    refused(crafted('emptymask', (_i, p) => void (worker(p).attributes!.cpuAffinity = Buffer.alloc(8))), /corrupt image: process \d+ thread \d+'s CPU affinity mask is empty/, 1);
  });
});

describe.runIf(isRoot)('the same state made by a root application that held the capabilities', () => {
  it('restores as it was: listening on port 81, UDP on 82 with SO_MARK, SCHED_FIFO 10, nice -5, its locked memory', async () => {
    const r = sb.run(['restore', rootPriv]);
    expect(r.code, r.stderr).toBe(0);
    try {
      const before = checks('rp');
      await waitFor(() => checks('rp') >= before + 3 || /FAIL/.test(log('rp')), 10_000, 'the restored fixture to check itself');
      expect(log('rp')).not.toMatch(/FAIL/);
      expect(bound('tcp', TCP_PORT)).toBe(true);
      expect(bound('udp', UDP_PORT)).toBe(true);
      // ss -e shows a socket's mark (0x1092: 4242).
      expect(spawnSync('ss', ['-Hnuae', `sport = :${UDP_PORT}`], { encoding: 'utf8' }).stdout).toMatch(/fwmark:0x1092/);
      const [pid] = fixtureProcesses();
      const tids = readdirSync(`/proc/${pid}/task`).map(Number).filter((t) => t !== pid);
      expect(tids).toHaveLength(1);
      // proc(5) stat: nice is field 19, rt_priority 40, policy 41.
      const stat = readFileSync(`/proc/${pid}/task/${tids[0]}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      expect([fields[16], fields[37], fields[38]]).toEqual(['-5', '10', '1']);
      expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/VmLck:\s+68 kB/);
    } finally {
      sb.run(['stop', 'rp', '--signal', 'KILL']);
      await waitFor(() => !sb.aids().includes('rp'), 10_000, 'rp to end');
    }
  });

  it('this node\'s own snapshot of a server that made it as root, then dropped to uid 65534, restores it; the same image under another node\'s key is refused', async () => {
    const r = sb.run(['restore', dropped]);
    expect(r.code, r.stderr).toBe(0);
    try {
      const before = checks('dp');
      await waitFor(() => checks('dp') >= before + 3 || /FAIL/.test(log('dp')), 10_000, 'the restored fixture to check itself');
      expect(log('dp')).not.toMatch(/FAIL/);
      expect(bound('tcp', TCP_PORT)).toBe(true);
      const [pid] = fixtureProcesses();
      expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/Uid:\s+65534\s+65534\s+65534\s+65534[\s\S]*CapEff:\s+0+\n/);
    } finally {
      sb.run(['stop', 'dp', '--signal', 'KILL']);
      await waitFor(() => !sb.aids().includes('dp'), 10_000, 'dp to end');
    }
    const image = (await loadImage(dropped, { trust: 'report' })).image;
    // Its real-time thread the first of what it no longer could make.
    refused(crafted('dropped-foreign', () => undefined, image, dropped), /thread \d+: SCHED_FIFO priority 10 needs CAP_SYS_NICE or RLIMIT_RTPRIO 10 \(the image's is 0\), which the thread could not set itself/);
    refused(
      crafted(
        'dropped-foreign-sockets',
        (_i, p) => {
          for (const t of p.threads) if (t.attributes) Object.assign(t.attributes, { schedPolicy: 0, schedPriority: 0, nice: 0, ioprio: 0 });
          p.fds.find((fd) => fd.kind === FdKind.TIMERFD)!.timerfd!.clockid = 1;
        },
        image,
        dropped,
      ),
      /fd \d+: a TCP listener on port 81 needs CAP_NET_BIND_SERVICE, which no process holding the socket had/,
    );
  });
});

/** The appshot-keeper processes holding connections for the sandbox. */
function keepers(): number[] {
  return readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((pid) => {
      try {
        const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
        return argv[0] === 'appshot-keeper' && argv[1]?.startsWith(sb.home);
      } catch {
        return false;
      }
    })
    .map(Number);
}

/** What a test of a connection appshot-keeper holds has to craft its lies
 * from: the real image (its directory, and loaded), and the test's end of
 * the connection. */
interface Held {
  image: string;
  loaded: Awaited<ReturnType<typeof loadImage>>;
  client: Client;
}

/**
 * Application `aid`, `server` (a fixture) on `port` with `args` after its
 * go file, given a connection from this test and snapshotted, so that
 * appshot-keeper holds the connection: tcpfix accepts it and a handler
 * answers its ECHO lines; lateaccept leaves it waiting in its listener's
 * queue, a line sent on it. `lies` refuses crafted images (the keeper
 * holding it again after each). Then the real image restores and the
 * connection carries on, the peer none the wiser: an ECHO answered and
 * no reset (tcpfix), or the waiting line answered once the go file lets
 * lateaccept accept; `restored` checks more then. The application and
 * its keeper end after, whatever happened.
 */
async function keeperHolds(
  aid: string,
  server: 'tcpfix' | 'lateaccept',
  port: number,
  args: string[],
  lies: (held: Held) => void | Promise<void>,
  restored?: (held: Held) => void,
): Promise<void> {
  const go = join(out, `${aid}.go`);
  const r = sb.run(['run', '-d', '--aid', aid, '--', fixture(server), String(port), go, ...args]);
  expect(r.code, r.stderr).toBe(0);
  if (server === 'tcpfix') await waitFor(() => /INSIDE WAITING|FAIL/.test(log(aid)), 10_000, 'tcpfix to start');
  else await waitFor(() => /READY|FAIL/.test(log(aid)), 10_000, 'lateaccept to listen');
  const client = connect({ port, host: '127.0.0.1' });
  await new Promise<void>((ok, fail) => client.once('connect', ok).once('error', fail));
  let reset: Error | undefined;
  let got = '';
  if (server === 'tcpfix') client.on('error', (e) => (reset = e));
  else {
    client.on('data', (d) => (got += d));
    client.on('error', () => {});
    client.write('one\n');
  }
  try {
    const image = join(out, aid);
    const s = sb.run(['snapshot', aid, '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    expect(keepers()).toHaveLength(1);
    const held = { image, loaded: await loadImage(image, { trust: 'report' }), client };
    await lies(held);
    const good = sb.run(['restore', image]);
    expect(good.code, good.stderr).toBe(0);
    if (server === 'tcpfix') {
      const echoed = new Promise<string>((ok) => client.once('data', (d: Buffer) => ok(d.toString())));
      client.write('ECHO still here\n');
      expect(await echoed).toBe('still here\n');
      expect(reset).toBeUndefined();
    } else {
      writeFileSync(go, '');
      await waitFor(() => got === 'ECHO one\n', 10_000, 'the waiting connection to be answered');
    }
    restored?.(held);
  } finally {
    client.destroy();
    sb.run(['stop', aid, '--signal', 'KILL']);
  }
  await waitFor(() => !sb.aids().includes(aid) && keepers().length === 0, 10_000, `${aid} and its keeper to end`);
}

describe.runIf(isRoot)('a connection appshot-keeper holds is handed over only as the image recorded it', () => {
  it('an image naming a held socket with another port is refused, and the keeper holds it for the real image', async () => {
    // tcpfix's server on a privileged port, a connection from the test
    // accepted and held by a handler process.
    const port = 83;
    await keeperHolds('kp', 'tcpfix', port, ['1000'], ({ image, loaded, client }) => {
      // The same image under the other node's key, its id the snapshot's
      // (what the keeper holds it for), the connection's port said to be
      // an unprivileged one: the privilege rule would weigh that port,
      // and the socket handed over is bound to 83.
      const lie = structuredClone(loaded.image);
      const conn = lie.processes.flatMap((p) => p.fds).find((fd) => fd.tcp?.peerPort === client.localPort)!.tcp!;
      expect(conn.localPort).toBe(port);
      conn.localPort = 40083;
      const dir = writeSignedImage(join(out, 'kp-lie'), lie, image, { signer: other.home, id: loaded.manifest.imageId });
      // Held again, and the real image has it back, the peer none the wiser.
      refusedKeeperHolding(dir, new RegExp(`^appshot: cannot restore ${dir}: process \\d+ fd \\d+: the socket appshot-keeper holds as the TCP connection 127\\.0\\.0\\.1:40083 → 127\\.0\\.0\\.1:${client.localPort} \\(inode \\d+\\) is 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:${client.localPort}: the image's record of it is not the socket$`), 1);
    });
  });

  it('an image naming a held TCP connection as a kept unix socket is refused, and the keeper holds it for the real image (review r369)', async () => {
    // The same server and connection; the lie now records the connection
    // as a unix socket a keeper held, which the privilege rule weighs as
    // no port, in processes with no capability and no listener on 83
    // (which would let them hold a connection accepted from it).
    const port = 83;
    await keeperHolds('ku', 'tcpfix', port, ['1000'], ({ image, loaded, client }) => {
      const ino = loaded.image.processes.flatMap((p) => p.fds).find((fd) => fd.tcp?.peerPort === client.localPort)!.tcp!.ino;
      const unixSocket = (fd: Fd): Socket => ({
        ...structuredClone(fd.socket ?? loaded.image.processes.flatMap((p) => p.fds).find((f) => f.kind === FdKind.TCP_LISTEN)!.socket!),
        ino, family: 1, type: 1, address: '', port: 0, listening: false, backlog: 0, peerIno: 0n, queued: Buffer.alloc(0), datagrams: [], options: [], kept: true,
      });
      /** The image with the connection's descriptors recorded as `record`
       * gives (`which`: each of them, or another one of their process's,
       * the connection's left as it is). */
      const lieWith = (name: string, which: 'each' | 'another', record: (fd: Fd) => Pick<Fd, 'kind' | 'socket' | 'tcp'>): string => {
        const lie = structuredClone(loaded.image);
        for (const fd of lie.processes.flatMap((p) => p.fds)) if (fd.kind === FdKind.TCP_LISTEN) fd.socket!.port = 40083;
        for (const p of lie.processes) {
          if (!p.fds.some((fd) => fd.tcp?.ino === ino)) continue;
          p.fds = p.fds.filter((fd) => fd.kind !== FdKind.TCP_LISTEN);
          for (const fd of p.fds.filter((f) => f.tcp?.ino === ino)) {
            const another = { ...structuredClone(fd), fd: Math.max(...p.fds.map((f) => f.fd)) + 1 };
            if (which === 'another') p.fds.push(another);
            Object.assign(which === 'another' ? another : fd, record(fd));
          }
          for (const c of [p.creds, ...p.threads.map((t) => t.creds)]) if (c) Object.assign(c, { capEff: 0n, capPrm: 0n, capInh: 0n, capAmb: 0n });
        }
        return writeSignedImage(join(out, name), lie, image, { signer: other.home, id: loaded.manifest.imageId });
      };
      const refusedHere = (dir: string, why: RegExp) => refusedKeeperHolding(dir, why, 1, ['--aid', 'ku']);
      // Every holder's descriptor a kept unix socket: the socket held is
      // a TCP one, bound to 83.
      const unix = lieWith('ku-unix', 'each', (fd) => ({ kind: FdKind.UNIX_SOCKET, tcp: undefined, socket: unixSocket(fd) }));
      refusedHere(unix, new RegExp(`^appshot: cannot restore ${unix}: .*fd \\d+: the socket appshot-keeper holds as a unix connection \\(inode ${ino}\\) is a socket of family 2 and type 1: the image's record of it is not the socket$`));
      // Another descriptor of it a kept unix socket, beside the TCP connection's.
      const both = lieWith('ku-both', 'another', (fd) => ({ kind: FdKind.UNIX_SOCKET, tcp: undefined, socket: unixSocket(fd) }));
      refusedHere(both, /^appshot: .*corrupt image: .*are one socket \(inode \d+\) but one records it as a socket and the other as a TCP connection$/);
      // A kept TCP listener record, on an unprivileged port.
      const listener = lieWith('ku-listener', 'each', (fd) => ({ kind: FdKind.TCP_LISTEN, tcp: undefined, socket: { ...unixSocket(fd), family: 2, address: '127.0.0.1', port: 40083 } }));
      refusedHere(listener, /^appshot: .*corrupt image: .*is a socket held by appshot-keeper that is not a connected unix stream or seqpacket socket$/);
      // No handler of tcpfix is left of them, and the real image has the
      // connection back, the peer none the wiser (keeperHolds).
    });
  });

  it('an image naming a held listener as a kept TCP connection is refused, and the keeper holds it for the real image (review r369)', async () => {
    // A listener with connections waiting in its queue, which the keeper
    // holds (keeper.ts addListener): it has no peer, as a connection reset
    // meanwhile has none, but is no connection.
    const port = 40085;
    await keeperHolds('kl', 'lateaccept', port, [], ({ image, loaded }) => {
      const lie = structuredClone(loaded.image);
      const fd = lie.processes.flatMap((p) => p.fds).find((f) => f.kind === FdKind.TCP_LISTEN)!;
      Object.assign(fd, { kind: FdKind.TCP_ESTABLISHED, socket: undefined, tcp: { ...connection(fd.socket!.ino, port), kept: true } });
      const dir = writeSignedImage(join(out, 'kl-lie'), lie, image, { signer: other.home, id: loaded.manifest.imageId });
      // Held again, and the real image has the listener back, the waiting
      // connection with it.
      refusedKeeperHolding(dir, new RegExp(`^appshot: cannot restore ${dir}: process \\d+ fd \\d+: the socket appshot-keeper holds as the TCP connection 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:40999 \\(inode \\d+\\) is a listener on 127\\.0\\.0\\.1:${port}: the image's record of it is not the socket$`), 1, ['--aid', 'kl']);
    });
  });
});

const NETLINK_ROUTE = 0;
const NETLINK_SOCK_DIAG = 4;
const NETLINK_AUDIT = 9;
const NETLINK_NETFILTER = 12;
const NETLINK_KOBJECT_UEVENT = 15;

describe.runIf(isRoot)('netlink groups of every protocol: only those the process could have joined', () => {
  it('the rule says of each group what the kernel does: a process without capabilities joins exactly those it lets through', () => {
    // Each protocol the restore makes, and one it does not (NETLINK_NETFILTER,
    // which has no NL_CFG_F_NONROOT_RECV): its groups need CAP_NET_ADMIN.
    const asked: [number, number][] = [
      [NETLINK_ROUTE, 1],
      [NETLINK_ROUTE, 30],
      [NETLINK_ROUTE, 31],
      [NETLINK_SOCK_DIAG, 1],
      [NETLINK_SOCK_DIAG, 5],
      [NETLINK_AUDIT, 1],
      [NETLINK_KOBJECT_UEVENT, 1],
      [NETLINK_KOBJECT_UEVENT, 2],
      [NETLINK_NETFILTER, 1],
    ];
    const script = [
      'import errno, socket, sys',
      'for pair in sys.argv[1:]:',
      '    proto, group = map(int, pair.split(":"))',
      '    try:',
      '        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)',
      '    except OSError as e:',
      '        print("nosocket"); continue',
      '    try:',
      '        s.setsockopt(270, 1, group); print("ok")',
      '    except OSError as e:',
      '        print(errno.errorcode[e.errno])',
      '    s.close()',
    ].join('\n');
    // Root with no capability at all (an empty bounding set), as a
    // process of an image recorded without any.
    const r = spawnSync('setpriv', ['--inh-caps=-all', '--bounding-set=-all', '/usr/bin/python3', '-c', script, ...asked.map(([p, g]) => `${p}:${g}`)], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const got = r.stdout.trim().split('\n');
    expect(got).toHaveLength(asked.length);
    asked.forEach(([protocol, group], i) => {
      if (got[i] === 'nosocket') return; // not in this kernel
      const need = groupPrivilege(protocol, group);
      expect(`${protocol}:${group} ${got[i]}`).toBe(`${protocol}:${group} ${need ? 'EPERM' : 'ok'}`);
    });
  });

  it('a uevent listener and a socket-destroy listener of a process with no capability restore; a group only CAP_NET_ADMIN joins is refused', async () => {
    // Bound, as such programs are (to a port id of their own, or the
    // kernel's choice): /proc/net/netlink lists bound sockets.
    const add = (p: Process, n: number, protocol: number, groups: number[]) =>
      addFd(p, n, FdKind.NETLINK, { socket: socketRecord(p, BigInt(9_000_000 + n), { family: 16, type: n === 42 ? 2 : 3, netlink: { protocol, portId: 0x7ead_0000 + n, connected: false, dstPortId: 0, dstGroup: 0, groups } }) });
    // udev's clients (libudev's monitor: group 2, udev's own) and udevadm
    // monitor --kernel (group 1), run as a user; ss -E's destroy events.
    const legit = crafted('netlink-user', (_i, p) => {
      add(p, 40, NETLINK_KOBJECT_UEVENT, [1]);
      add(p, 41, NETLINK_KOBJECT_UEVENT, [2]);
      add(p, 42, NETLINK_SOCK_DIAG, [1, 2, 3, 4]);
    });
    const r = sb.run(['restore', legit, '--trust-image', '--aid', 'nlu']);
    try {
      expect(r.code, r.stderr).toBe(0);
      const [pid] = fixtureProcesses();
      // /proc/net/netlink: its inode, protocol and first 32 groups.
      const table = readFileSync(`/proc/${pid}/net/netlink`, 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/));
      const groupsOf = (fd: number) => {
        const ino = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))![1];
        const row = table.find((f) => f[9] === ino)!;
        return `${row[1]} ${row[3]}`;
      };
      expect([groupsOf(40), groupsOf(41), groupsOf(42)]).toEqual([`${NETLINK_KOBJECT_UEVENT} 00000001`, `${NETLINK_KOBJECT_UEVENT} 00000002`, `${NETLINK_SOCK_DIAG} 0000000f`]);
    } finally {
      sb.run(['stop', 'nlu', '--signal', 'KILL']);
      await waitFor(() => !sb.aids().includes('nlu') && fixtureProcesses().length === 0, 10_000, 'nlu to end');
    }
    refused(
      crafted('netlink-mroute6', (_i, p) => add(p, 40, NETLINK_ROUTE, [1, 31])),
      new RegExp(`fd 40: a NETLINK_ROUTE socket in group 31 \\(RTNLGRP_IPV6_MROUTE_R\\) needs CAP_NET_ADMIN, ${NO_PROCESS_HAD.source}`),
    );
  });
});

describe.runIf(isRoot)('the options of a socket appshot-keeper holds are weighed as recorded ones', () => {
  it('a root server\'s connections with SO_MARK, given to uid 65534 by an image that does not record it (or records them kept live), are refused; the real image restores them', async () => {
    // tcpfix as root, each connection it accepts marked (SO_MARK 4242):
    // the test's and its inside client's, held by handler processes.
    const port = 40184;
    await keeperHolds(
      'km',
      'tcpfix',
      port,
      ['1000', 'mark'],
      ({ image, loaded, client }) => {
        const ours = (i: Image) => i.processes.flatMap((p) => p.fds).find((fd) => fd.tcp?.peerPort === client.localPort)!.tcp!;
        expect(ours(loaded.image).socketOptions).toContainEqual(expect.objectContaining({ level: 1, name: 36, value: 4242 }));
        // Processes made the nobody fixture's (uid 65534, no capability):
        // every one, or (`only`) those holding the test's connection.
        const asNobody = (only: boolean, change: (c: TcpConnection) => void): Image => {
          const lie = structuredClone(loaded.image);
          const creds = nobodyImage.processes[0].creds;
          for (const p of lie.processes) {
            if (only && !p.fds.some((fd) => fd.tcp?.peerPort === client.localPort)) continue;
            p.creds = structuredClone(creds);
            for (const t of p.threads) t.creds = structuredClone(creds);
          }
          for (const fd of lie.processes.flatMap((p) => p.fds)) if (fd.tcp && fd.tcp.peerPort === client.localPort) change(fd.tcp);
          return lie;
        };
        const refusedHeld = (name: string, lie: Image) => {
          const dir = writeSignedImage(join(out, name), lie, image, { signer: other.home, id: loaded.manifest.imageId });
          // Held again for the real image.
          refusedKeeperHolding(
            dir,
            new RegExp(
              `^appshot: cannot restore ${dir}: process \\d+ \\(tcpfix\\) fd \\d+: option SO_MARK 4242 of the socket appshot-keeper holds as the TCP connection 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:\\d+ needs CAP_NET_RAW or CAP_NET_ADMIN, ${NO_PROCESS_HAD.source}: handed over by this restore, it would give the application more than it held$`,
            ),
            5,
          );
        };
        // Every process nobody's, no record saying SO_MARK: only the
        // sockets the keeper holds have it.
        const lie = asNobody(false, () => undefined);
        for (const fd of lie.processes.flatMap((p) => p.fds)) if (fd.tcp) fd.tcp.socketOptions = fd.tcp.socketOptions.filter((o) => !(o.level === 1 && o.name === 36));
        refusedHeld('km-nomark', lie);
        // Its handler only nobody's, and the test's connection recorded as
        // kept live (taken without repair): a record with no options at all.
        refusedHeld('km-kept', asNobody(true, (c) => Object.assign(c, { kept: true, socketOptions: [], sendQueue: Buffer.alloc(0), recvQueue: Buffer.alloc(0), unsent: 0 })));
      },
      ({ client }) => {
        expect(spawnSync('ss', ['-Hntae', `sport = :${port}`, `dport = :${client.localPort}`], { encoding: 'utf8' }).stdout).toMatch(/fwmark:0x1092/);
      },
    );
  });

  it('a root server\'s listener with SO_MARK and a connection waiting, recorded as inherited and given to uid 65534, is refused in a plain restore (which takes it from the keeper all the same); the real image restores it', async () => {
    // lateaccept as root, its listener marked (SO_MARK 4242): the
    // connection waiting in its queue keeps the keeper holding it.
    const port = 40186;
    await keeperHolds('klm', 'lateaccept', port, ['mark'], ({ image, loaded }) => {
      const lie = structuredClone(loaded.image);
      const creds = nobodyImage.processes[0].creds;
      for (const p of lie.processes) {
        p.creds = structuredClone(creds);
        for (const t of p.threads) t.creds = structuredClone(creds);
      }
      const p = lie.processes.find((q) => q.fds.some((f) => f.kind === FdKind.TCP_LISTEN))!;
      const fd = p.fds.find((f) => f.kind === FdKind.TCP_LISTEN)!;
      expect(fd.socket!.options).toContainEqual(expect.objectContaining({ level: 1, name: 36, value: 4242 }));
      // Recorded as a listener the caller hands over (no --inherit: a
      // plain restore makes or takes it as its own), without its mark;
      // and another, plain, listener so that the keeper is asked at all.
      Object.assign(fd.socket!, { inherited: 'x', options: fd.socket!.options!.filter((o) => !(o.level === 1 && o.name === 36)) });
      p.fds.push({ ...structuredClone(fd), fd: 40, socket: { ...structuredClone(fd.socket!), ino: 9_000_186n, port: port + 1, inherited: undefined } });
      const dir = writeSignedImage(join(out, 'klm-lie'), lie, image, { signer: other.home, id: loaded.manifest.imageId });
      // Held again, and the real image has the listener back, the waiting
      // connection with it.
      refusedKeeperHolding(
        dir,
        new RegExp(
          `^appshot: cannot restore ${dir}: process \\d+ \\(lateaccept\\) fd ${fd.fd}: option SO_MARK 4242 of the TCP listener on port ${port} appshot-keeper holds needs CAP_NET_RAW or CAP_NET_ADMIN, ${NO_PROCESS_HAD.source}: handed over by this restore, it would give the application more than it held$`,
        ),
        5,
      );
    });
  });

  /** A root application (python3 UNIX_CLIENT with `clientArgs`) holding
   * a unix connection to a process outside, snapshotted (the keeper holds
   * the connection); its image, changed by `lie` and signed by another
   * node, is refused in one line matching `why`, exit 5, the keeper
   * holding it again; the real image restores it and it carries on. */
  async function keptUnixConnectionRefused(aid: string, clientArgs: string[], lie: (image: Image) => void, why: (dir: string) => RegExp): Promise<void> {
    // The process outside: a unix server that answers each line.
    const path = join(out, `${aid}.sock`);
    const server = spawn('python3', ['-c', UNIX_ECHO, path], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((ok) => server.stdout!.once('data', () => ok()));
      // The application, root: connected to it, holding the connection.
      const r = sb.run(['run', '-d', '--aid', aid, '--', '/usr/bin/python3', '-c', UNIX_CLIENT, path, ...clientArgs]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(() => /CONNECTED/.test(log(aid)), 10_000, 'the client to connect');
      const image = join(out, aid);
      const s = sb.run(['snapshot', aid, '-o', image]);
      expect(s.code, s.stderr).toBe(0);
      await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
      expect(keepers()).toHaveLength(1);
      const loaded = await loadImage(image, { trust: 'report' });
      const changed = structuredClone(loaded.image);
      lie(changed);
      expect(changed.processes.flatMap((p) => p.fds).some((fd) => fd.socket?.kept)).toBe(true);
      const dir = writeSignedImage(join(out, `${aid}-lie`), changed, image, { signer: other.home, id: loaded.manifest.imageId });
      refusedKeeperHolding(dir, why(dir), 5);
      const good = sb.run(['restore', image]);
      expect(good.code, good.stderr).toBe(0);
      writeFileSync(`${path}.go`, '');
      await waitFor(() => /ANSWERED/.test(log(aid)), 10_000, 'the connection to carry on');
    } finally {
      sb.run(['stop', aid, '--signal', 'KILL']);
      server.kill('SIGKILL');
    }
    await waitFor(() => !sb.aids().includes(aid) && keepers().length === 0, 10_000, `${aid} and its keeper to end`);
  }

  it('a root application\'s unix connection to a process outside, given to uid 65534 by an image from elsewhere, is refused (the peer would take them for root); the real image restores it', async () => {
    await keptUnixConnectionRefused(
      'kuc',
      [],
      (lie) => {
        const creds = nobodyImage.processes[0].creds;
        for (const p of lie.processes) {
          p.creds = structuredClone(creds);
          for (const t of p.threads) t.creds = structuredClone(creds);
        }
      },
      (dir) =>
        new RegExp(
          `^appshot: cannot restore ${dir}: process \\d+ \\(python3\\) fd \\d+: the unix connection to a process outside the application appshot-keeper holds was created by uid 0 gid 0, which no process holding it had both of: handed over by this restore, the process at the other end would take the application for uid 0 gid 0$`,
        ),
    );
  });

  it('a unix connection made as root by a process that then gave up gid 0 and its groups (keeping uid 0) is refused from an image from elsewhere (the peer would take it for gid 0); this node\'s own snapshot restores it', async () => {
    // No change to the image: its process really holds uid 0 and gid
    // 65534 only, and the socket is uid 0 gid 0's. Only this node's word
    // for its own snapshot lets that through.
    await keptUnixConnectionRefused(
      'kug',
      ['dropgroups'],
      (image) => {
        for (const p of image.processes) expect(p.creds.gid).toEqual([65534, 65534, 65534, 65534]);
      },
      (dir) =>
        new RegExp(
          `^appshot: cannot restore ${dir}: process \\d+ \\(python3\\) fd \\d+: the unix connection to a process outside the application appshot-keeper holds was created by uid 0 gid 0, which no process holding it had both of: handed over by this restore, the process at the other end would take the application for uid 0 gid 0$`,
        ),
    );
  });
});

// A unix stream server at argv[1] that prints "READY" and answers each
// line of each connection with "ECHO <line>".
const UNIX_ECHO = `
import os, socket, sys, threading
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(sys.argv[1]); l.listen(4)
print("READY", flush=True)
def serve(c):
    f = c.makefile("rb")
    for line in f: c.sendall(b"ECHO " + line)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
`;

// Connects to argv[1] (then, with argv[2] "dropgroups", gives up its
// groups and gid 0 for 65534, keeping uid 0) and prints "CONNECTED"; once
// the file argv[1].go exists, asks one line and prints "ANSWERED" when
// answered.
const UNIX_CLIENT = `
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
if sys.argv[2:] == ["dropgroups"]:
    os.setgroups([]); os.setresgid(65534, 65534, 65534)
print("CONNECTED", flush=True)
while not os.path.exists(sys.argv[1] + ".go"): time.sleep(0.05)
s.sendall(b"hi\\n")
if s.recv(64).startswith(b"ECHO"): print("ANSWERED", flush=True)
time.sleep(1000)
`;

/** The largest buffer of a TCP socket without CAP_NET_ADMIN (`which`:
 * rmem or wmem), as the kernel tunes or is asked for one. */
function unprivilegedBuffer(which: 'rmem' | 'wmem'): number {
  const tuned = Number(readFileSync(`/proc/sys/net/ipv4/tcp_${which}`, 'utf8').trim().split(/\s+/)[2]);
  return Math.max(tuned, 2 * Number(readFileSync(`/proc/sys/net/core/${which}_max`, 'utf8')));
}

describe.runIf(isRoot)('a connection\'s queues larger than any buffer of a process without CAP_NET_ADMIN', () => {
  it('are refused for a process that had none (the restore would force its buffers up to hold them)', () => {
    const rmax = unprivilegedBuffer('rmem');
    const wmax = unprivilegedBuffer('wmem');
    const cases: [string, Partial<TcpConnection>, RegExp][] = [
      ['recvq', { recvQueue: Buffer.alloc(rmax + 1) }, new RegExp(`'s receive queue of ${rmax + 1} bytes \\(more than a buffer without CAP_NET_ADMIN holds: ${rmax}, [^)]*\\)`)],
      ['sendq', { sendQueue: Buffer.alloc(wmax + 1) }, new RegExp(`'s send queue of ${wmax + 1} bytes \\(more than a buffer without CAP_NET_ADMIN holds: ${wmax}, [^)]*\\)`)],
    ];
    for (const [name, queues, why] of cases)
      refused(
        crafted(name, (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: { ...connection(9_000_040n, 40997), ...queues } })),
        new RegExp(`fd 40: the TCP connection 127\\.0\\.0\\.1:40997 → 127\\.0\\.0\\.1:40999${why.source} needs CAP_NET_ADMIN, ${NO_PROCESS_HAD.source}: made by this restore`),
      );
  });

  it('a queue as large as the kernel\'s tuning gives anyone restores for a process that had no capability', async () => {
    const bytes = unprivilegedBuffer('rmem');
    const legit = crafted('recvq-max', (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: { ...connection(9_000_040n, 40996), recvQueue: Buffer.alloc(bytes, 7) } }));
    const r = sb.run(['restore', legit, '--trust-image', '--aid', 'qok']);
    try {
      expect(r.code, r.stderr).toBe(0);
      const [pid] = fixtureProcesses();
      // Made and handed over (its peer, which never was, resets it once
      // it is let go: it is not looked at further).
      expect(readlinkSync(`/proc/${pid}/fd/40`)).toMatch(/^socket:\[\d+\]$/);
      expect(readFileSync(`/proc/${pid}/status`, 'utf8')).toMatch(/Uid:\s+65534\s/);
    } finally {
      sb.run(['stop', 'qok', '--signal', 'KILL']);
      await waitFor(() => !sb.aids().includes('qok') && fixtureProcesses().length === 0, 10_000, 'qok to end');
    }
  });
});

// Listens as argv[1] ("4": IPv4, "6": IPv6, taking IPv4 too) at address
// argv[2] (by default 127.0.0.1, [::]) and a port the kernel picks,
// prints the port, and waits.
const TCP_LISTENER = `
import socket, sys, time
six = sys.argv[1] == "6"
l = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
if six:
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind((sys.argv[2] if len(sys.argv) > 2 else "::" if six else "127.0.0.1", 0))
l.listen(4)
print(l.getsockname()[1], flush=True)
time.sleep(1000)
`;

/** A TCP listener of another application (`as`: setpriv's arguments for
 * its user, none for root), with its port; killed by the caller. */
async function otherListener(family: '4' | '6', as: string[] = [], address?: string): Promise<{ port: number; kill: () => void }> {
  const args = ['-c', TCP_LISTENER, family, ...(address ? [address] : [])];
  const cmd = as.length ? ['setpriv', [...as, '/usr/bin/python3', ...args]] as const : ['python3', args] as const;
  const child = spawn(cmd[0], [...cmd[1]], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((ok, fail) => {
    child.stdout!.once('data', (d: Buffer) => ok(Number(d.toString().trim())));
    child.once('exit', (code) => fail(new Error(`the listener ended (${code})`)));
  });
  return { port, kill: () => child.kill('SIGKILL') };
}

describe.runIf(isRoot)('a connection made in repair mode on a port another application listens on', () => {
  // Repair mode binds with SK_FORCE_REUSE: the kernel would give the
  // connection the port next to any listener (tcp.ts refuseForeignListener).
  it('is refused when the listener is another user\'s, at the same address or the wildcard of either family (one line, exit 4, nothing left)', async () => {
    for (const family of ['4', '6'] as const) {
      const root = await otherListener(family);
      try {
        const dir = crafted(`foreign-${family}`, (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: connection(9_000_050n, root.port) }));
        const at = family === '6' ? '\\[::\\]' : '127\\.0\\.0\\.1';
        refused(
          dir,
          new RegExp(`^appshot: cannot restore ${dir}: process \\d+ fd 40: the TCP connection 127\\.0\\.0\\.1:${root.port} → 127\\.0\\.0\\.1:40999: port ${root.port} is another application's \\(a listener at ${at}:${root.port}, uid 0, inode \\d+\\): made here in repair mode, the connection would take it over from that listener$`),
          4,
        );
      } finally {
        root.kill();
      }
    }
  });

  it('is refused from an unspecified local address as a corrupt image (bound so, the connect would take the route\'s address unchecked)', async () => {
    const root = await otherListener('4');
    try {
      for (const [name, family, localAddress, peerAddress] of [
        ['any4', 2, '0.0.0.0', '127.0.0.1'],
        ['any6', 10, '::', '::1'],
        ['any6mapped', 10, '0::ffff:0.0.0.0', '::ffff:127.0.0.1'],
      ] as const) {
        const dir = crafted(`foreign-${name}`, (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: { ...connection(9_000_052n, root.port), family, localAddress, peerAddress } }));
        refused(dir, new RegExp(`^appshot: corrupt image: process \\d+'s fd 40 is a TCP connection from the unspecified address '${localAddress.replace(/\./g, '\\.')}', which no connection has$`), 1);
      }
    } finally {
      root.kill();
    }
  });

  it('is refused however the image spells its local address, and next to an IPv4 wildcard listener of an IPv6 socket (review r389 H1, M1)', async () => {
    // [listener family, its address, how the refusal writes it, the
    // connection's family, local and peer address as the image spells them]
    const cases = [
      ['4', '0.0.0.0', '0\\.0\\.0\\.0', 10, '0:0:0:0:0:ffff:7f00:1', '::ffff:127.0.0.1'],
      ['4', '127.0.0.1', '127\\.0\\.0\\.1', 10, '::ffff:127.0.0.1', '::ffff:127.0.0.1'],
      ['6', '::1', '\\[::1\\]', 10, '0:0::1', '::1'],
      ['6', '::ffff:0.0.0.0', '\\[::ffff:0\\.0\\.0\\.0\\]', 2, '127.0.0.1', '127.0.0.1'],
    ] as const;
    for (const [i, [family, address, at, cFamily, localAddress, peerAddress]] of cases.entries()) {
      const root = await otherListener(family, [], address);
      try {
        const dir = crafted(`foreign-spelled-${i}`, (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: { ...connection(9_000_053n, root.port), family: cFamily, localAddress, peerAddress } }));
        refused(dir, new RegExp(`^appshot: cannot restore ${dir}: process \\d+ fd 40: the TCP connection .*:${root.port} → .*:40999: port ${root.port} is another application's \\(a listener at ${at}:${root.port}, uid 0, inode \\d+\\): made here in repair mode, the connection would take it over from that listener$`), 4);
      } finally {
        root.kill();
      }
    }
  });

  it('is made when the listener is its own user\'s (who could stop it anyway)', async () => {
    const nobodys = await otherListener('4', ['--reuid=65534', '--regid=65534', '--clear-groups']);
    try {
      const dir = crafted('foreign-own-uid', (_i, p) => addFd(p, 40, FdKind.TCP_ESTABLISHED, { tcp: connection(9_000_051n, nobodys.port) }));
      const r = sb.run(['restore', dir, '--trust-image', '--aid', 'fown']);
      try {
        expect(r.code, r.stderr).toBe(0);
        const [pid] = fixtureProcesses();
        expect(readlinkSync(`/proc/${pid}/fd/40`)).toMatch(/^socket:\[\d+\]$/);
      } finally {
        sb.run(['stop', 'fown', '--signal', 'KILL']);
        await waitFor(() => !sb.aids().includes('fown') && fixtureProcesses().length === 0, 10_000, 'fown to end');
      }
    } finally {
      nobodys.kill();
    }
  });
});
