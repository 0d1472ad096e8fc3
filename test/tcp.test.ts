/**
 * Established TCP connections through snapshot and restore (TCP repair):
 * the peers are the test's own sockets, which never reconnect, and any
 * reset they see fails the test.
 *
 * - tcpfix (test/fixtures/tcpfix.c): a server with a connection from the
 *   test and one from a process of its own (both ends inside), with bytes
 *   queued unread in both directions at the snapshot;
 * - redis-server with 50 clients in the middle of a pipelined workload;
 * - memcached with a client that stays connected.
 *
 * Ports 26600-26999 are this file's.
 */
import { spawn, spawnSync } from 'node:child_process';
import { connect, createServer, type Socket } from 'node:net';
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { addon } from '../src/native.js';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-tcp-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** Bigger than a send queue holds (tcp_wmem's 4 MiB), so that the handler
 * is still writing it, and has not read what came next, at the snapshot. */
const BIG = 16 << 20;
const isRoot = process.getuid?.() === 0;

const run = (args: string[]) => sb.ok(args);

const logOf = (aid: string) => {
  try {
    return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};

/** A client that takes note of everything: what it was sent, and whether
 * its connection ended or was reset. It reads nothing until read(). */
class Client {
  readonly socket: Socket;
  private chunks: Buffer[] = [];
  private length = 0;
  ended = false;
  error: Error | undefined;

  private constructor(port: number, host: string) {
    // Half-open allowed: a server that shuts its side down may still read.
    this.socket = connect({ port, host, allowHalfOpen: true });
    this.socket.on('error', (e) => (this.error = e));
    this.socket.on('end', () => (this.ended = true));
  }

  static async open(port: number, host = '127.0.0.1'): Promise<Client> {
    const c = new Client(port, host);
    await new Promise<void>((ok, fail) => {
      c.socket.once('connect', ok);
      c.socket.once('error', fail);
    });
    return c;
  }

  /** Waits until something can be read, without reading it. */
  readable(): Promise<void> {
    return new Promise((ok) => this.socket.once('readable', ok));
  }

  /** From now on, reads everything. */
  read(): void {
    this.socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.length += d.length;
    });
    this.socket.resume();
  }

  /** Reads nothing more until read(). */
  stop(): void {
    this.socket.pause();
    this.socket.removeAllListeners('data');
  }

  /** All that was read once `n` bytes are (or the connection failed). */
  async bytes(n: number, timeoutMs = 20_000): Promise<Buffer> {
    await waitFor(() => this.length >= n || this.ended || this.error !== undefined, timeoutMs, `${n} bytes (have ${this.length})`);
    return this.take();
  }

  take(): Buffer {
    const all = Buffer.concat(this.chunks);
    this.chunks = [];
    this.length = 0;
    return all;
  }

  /** Fails unless the connection is still whole: neither ended nor reset. */
  whole(): void {
    expect(this.error?.message).toBeUndefined();
    expect(this.ended).toBe(false);
  }
}

/** The row of the connection local:remote in /proc/net/tcp (tcp6 if
 * `v6`), split into its fields, or undefined: the one place that finds
 * it for the readers below. The ports are as the kernel prints them, hex
 * in capitals; local:remote picks one end of a connection on this host. */
function tcpRow(local: number, remote: number, v6 = false): string[] | undefined {
  const hex = (p: number) => `:${p.toString(16).toUpperCase().padStart(4, '0')}`;
  for (const line of readFileSync(v6 ? '/proc/net/tcp6' : '/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1]?.endsWith(hex(local)) && f[2]?.endsWith(hex(remote))) return f;
  }
  return undefined;
}

/** The state of the connection local:remote (5 is FIN_WAIT2), or
 * undefined. */
function tcpState(local: number, remote: number): number | undefined {
  const f = tcpRow(local, remote);
  return f && parseInt(f[3], 16);
}

/** Whether any socket, in any state, has local port `port`. */
function portInUse(port: number): boolean {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  return ['/proc/net/tcp', '/proc/net/tcp6'].some((f) =>
    readFileSync(f, 'utf8').split('\n').slice(1).some((line) => line.trim().split(/\s+/)[1]?.endsWith(hex)),
  );
}

/** How many times the connection local:remote sent the same segment
 * again (the retrnsmt column), or undefined. */
function retransmissions(local: number, remote: number): number | undefined {
  const f = tcpRow(local, remote);
  return f && parseInt(f[6], 16);
}

/** The server's end of the connection from `peer` to `port` (tcp6 for
 * ::1): its state (hex, 08: CLOSE_WAIT) and the bytes it has not read
 * (rx_queue; a FIN received counts as one); undefined if there is none. */
function serverEnd(port: number, peer: number, host = '127.0.0.1'): { state: string; unread: number } | undefined {
  const f = tcpRow(port, peer, host === '::1');
  return f && { state: f[3], unread: parseInt(f[4].split(':')[1], 16) };
}

/** Waits until the server's end of the connection from `peer` holds
 * `unread` bytes it has not read (and, with `state`, is in that state):
 * what the snapshot is to find there, waited for rather than given a
 * fixed time to arrive. */
async function serverHas(port: number, peer: number, unread: number, host = '127.0.0.1', state?: string): Promise<void> {
  let end: ReturnType<typeof serverEnd>;
  await waitFor(() => {
    end = serverEnd(port, peer, host);
    return end !== undefined && end.unread === unread && (state === undefined || end.state === state);
  }, 10_000, `the server's end of the connection from port ${peer} to hold ${unread} unread bytes${state ? ` in state ${state}` : ''}`).catch((e: Error) => {
    throw new Error(`${e.message} (last seen: ${JSON.stringify(end)})`);
  });
}

/** The appshot-keeper processes holding connections for `home`. */
function keepers(home: string): number[] {
  const found: number[] = [];
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0] === 'appshot-keeper' && argv[1]?.startsWith(home)) found.push(Number(pid));
    } catch {
      /* gone */
    }
  }
  return found;
}

/** The guardians (appshot-guard, tcp_repair.h) of snapshots of this
 * file's sandbox. */
function guardians(): number[] {
  return readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'appshot-guard' && readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`APPSHOT_HOME=${sb.home}`);
      } catch {
        return false;
      }
    });
}

/** The journal entries of killed snapshots' endings (ending.ts). */
function endingEntries(): string[] {
  const dir = join(sb.home, 'tmp');
  return (existsSync(dir) ? readdirSync(dir) : []).filter((name) => /^\.?ending-/.test(name));
}

/** A process's state letter (T: stopped), '' once it is gone. */
function stateOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[0];
  } catch {
    return '';
  }
}

/** byte i of BIG is i % 251; the first index where `b` differs, or -1. */
function firstBadByte(b: Buffer): number {
  for (let i = 0; i < b.length; i++) if (b[i] !== i % 251) return i;
  return -1;
}

/** tcpfix on `port` with a connection from the test in the middle of an
 * exchange: BIG asked for and not read, "ECHO hello" sent behind it. */
async function startFixture(aid: string, port: number, host = '127.0.0.1'): Promise<{ client: Client; go: string }> {
  const go = join(out, `${aid}.go`);
  run(['run', '-d', '--aid', aid, '--', fixture('tcpfix'), String(port), go, String(BIG), ...(host === '::1' ? ['6'] : [])]);
  await waitFor(() => /INSIDE WAITING|FAIL/.test(logOf(aid)), 10_000, `${aid} to start`);
  const client = await Client.open(port, host);
  client.socket.write('BIG\n');
  await client.readable();
  client.socket.write('ECHO hello\n');
  // The request reaches the server's receive queue; the handler, blocked
  // writing BIG, does not read it.
  await serverHas(port, client.socket.localPort!, 'ECHO hello\n'.length, host);
  return { client, go };
}

/** Reads BIG and the echo (and the echoes of what the client sent while
 * the application was away: `meanwhile`), then makes a new exchange. */
async function carriesOn(client: Client, meanwhile = ''): Promise<void> {
  client.read();
  const echoes = 'hello\n' + meanwhile;
  const got = await client.bytes(BIG + echoes.length);
  expect(got.length).toBe(BIG + echoes.length);
  expect(firstBadByte(got.subarray(0, BIG))).toBe(-1);
  expect(got.subarray(BIG).toString()).toBe(echoes);
  client.socket.write('ECHO after the restore\n');
  expect((await client.bytes('after the restore\n'.length)).toString()).toBe('after the restore\n');
  client.whole();
}

describe('established TCP connections', () => {
  it('carry on after snapshot and restore: queued bytes both ways, a connection with both ends inside', async () => {
    const port = 26601;
    const { client, go } = await startFixture('tcp1', port);
    run(['snapshot', 'tcp1', '-o', join(out, 'tcp1')]);
    // The image holds the queues: "ECHO hello\n" unread by the handler,
    // the rest of BIG unsent.
    const shown = run(['inspect', join(out, 'tcp1')]);
    const ours = new RegExp(`TCP_ESTABLISHED\\s+tcp 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:${client.socket.localPort}, 11 bytes unread, (\\d+) unacknowledged`);
    expect(shown).toMatch(ours);
    expect(Number(ours.exec(shown)![1])).toBeGreaterThan(0);
    expect(shown.match(/TCP_ESTABLISHED/g)?.length).toBe(3); // ours, and both ends of the inside one
    // The application ended without a word to the client.
    await new Promise((r) => setTimeout(r, 300));
    client.whole();

    run(['restore', join(out, 'tcp1')]);
    writeFileSync(go, '');
    await carriesOn(client);
    await waitFor(() => /INSIDE OK|FAIL/.test(logOf('tcp1')), 20_000, 'the inside client to finish');
    expect(logOf('tcp1')).not.toMatch(/FAIL.*/);
    expect(logOf('tcp1')).toMatch(/^INSIDE OK$/m);
    client.socket.destroy();
    run(['stop', 'tcp1', '-s', 'KILL']);
  });

  it('a peer that sends between the snapshot and the restore is not reset: a keeper holds the connections', async () => {
    const port = 26608;
    const { client, go } = await startFixture('tcp8', port);
    run(['snapshot', 'tcp8', '-o', join(out, 'tcp8')]);
    // The application is gone. Its peer sends on, and sends again,
    // unanswered: a socket that had closed would answer with a reset.
    client.socket.write('ECHO while away\n');
    const sentAgain = () => retransmissions(client.socket.localPort!, port);
    await waitFor(() => (sentAgain() ?? 2) >= 2, 20_000, 'the client to send again, unanswered');
    expect(sentAgain(), 'the connection was reset').toBeGreaterThanOrEqual(2);
    client.whole();
    expect(keepers(sb.home)).toHaveLength(1);

    run(['restore', join(out, 'tcp8')]);
    // Told at the commit that the processes hold the connections now, the
    // keeper lets its copies go and ends: after the restore's return, as
    // it may (seen still there at that instant on a loaded machine).
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to let go and end');
    writeFileSync(go, '');
    await carriesOn(client, 'while away\n');
    await waitFor(() => /INSIDE OK|FAIL/.test(logOf('tcp8')), 20_000, 'the inside client to finish');
    expect(logOf('tcp8')).toMatch(/^INSIDE OK$/m);
    client.socket.destroy();
    run(['stop', 'tcp8', '-s', 'KILL']);
  });

  it("connections the kernel completed that the application had not accepted yet are not reset: the keeper holds their listener, queue and all, and the restore takes it back; with none waiting, the port is left free", async () => {
    const port = 26641;
    const go = join(out, 'late.go');
    run(['run', '-d', '--aid', 'late', '--', fixture('lateaccept'), String(port), go]);
    await waitFor(() => /READY/.test(logOf('late')), 10_000, 'lateaccept to listen');
    /** A client that says `line` and reads the answer to its end. */
    const ask = (line: string) => {
      const s = connect(port, '127.0.0.1');
      let got = '';
      s.on('data', (d) => (got += d));
      const connected = new Promise<void>((resolve, reject) => {
        s.once('connect', resolve);
        s.once('error', reject);
      });
      const answer = new Promise<string>((resolve, reject) => {
        s.on('end', () => resolve(got));
        s.on('error', reject);
      });
      s.write(line + '\n');
      return { connected, answer };
    };
    // Completed by the kernel, in the listener's queue: never accepted.
    const waiting = [ask('one'), ask('two')];
    await Promise.all(waiting.map((c) => c.connected));
    const snap = sb.run(['snapshot', 'late', '-o', join(out, 'late')]);
    expect(snap.code, snap.stderr).toBe(0);
    expect(snap.stderr).toMatch(/^appshot: 2 connections not yet accepted \(in their listener's queue\) held by appshot-keeper for a restore on this host within 15m$/m);
    expect(keepers(sb.home)).toHaveLength(1);
    // The application is gone; its listener is not: one more waits there.
    const meanwhile = ask('three');
    await meanwhile.connected;

    run(['restore', join(out, 'late')]);
    // The keeper ends once told at the commit, maybe just after the
    // restore returned (as in the test above).
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to let go and end');
    writeFileSync(go, '');
    expect(await Promise.all([...waiting, meanwhile].map((c) => c.answer))).toEqual(['ECHO one\n', 'ECHO two\n', 'ECHO three\n']);
    await waitFor(() => /ANSWERED 3/.test(logOf('late')), 10_000, 'the three answers');

    // Nothing waiting: no keeper, and the port is free once it ended.
    const again = sb.run(['snapshot', 'late', '-o', join(out, 'late2')]);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).not.toMatch(/keeper/);
    expect(keepers(sb.home)).toHaveLength(0);
    const other = createServer();
    await new Promise<void>((resolve, reject) => {
      other.once('error', reject);
      other.listen(port, '127.0.0.1', resolve);
    });
    await new Promise((resolve) => other.close(resolve));
    run(['restore', join(out, 'late2')]);
    expect(await ask('four').answer).toBe('ECHO four\n');
    run(['stop', 'late', '-s', 'KILL']);
  });

  it("the keeper drops what it holds when another image of the application is restored, or the hold ends", async () => {
    const port = 26609;
    const { client } = await startFixture('tcp9', port);
    run(['snapshot', 'tcp9', '--leave-running', '--full', '-o', join(out, 'tcp9-older')]);
    run(['snapshot', 'tcp9', '-o', join(out, 'tcp9-newer')]);
    expect(keepers(sb.home)).toHaveLength(1);
    // The older image's connections are the same ones, at other sequence
    // numbers: restored, they replace the held ones, which the peer
    // never hears of.
    run(['restore', join(out, 'tcp9-older')]);
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to drop the newer image and end');
    run(['stop', 'tcp9', '-s', 'KILL']);
    client.socket.destroy();

    const port2 = 26610;
    const second = await startFixture('tcp10', port2);
    run(['snapshot', 'tcp10', '--tcp-hold', '1s', '-o', join(out, 'tcp10')]);
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to give up after its hold');
    // Dropped silently: the peer learns only when it sends, by a reset
    // that ends its side (gone from /proc/net/tcp).
    const local = second.client.socket.localPort!;
    expect(tcpState(local, port2)).toBe(1);
    second.client.socket.write('ECHO anyone\n');
    await waitFor(() => tcpState(local, port2) === undefined, 10_000, 'the reset');
    second.client.socket.destroy();
    const bad = sb.run(['snapshot', 'tcp10', '--tcp-hold', 'soon']);
    expect(bad.code).not.toBe(0);

    // Removed (`rm` of the snapshotted application), it is not waited
    // for: the keeper drops the connection at once, not after its hold.
    const port3 = 26615;
    const third = await startFixture('tcp15', port3);
    run(['snapshot', 'tcp15', '-o', join(out, 'tcp15')]);
    const held = keepers(sb.home);
    expect(held).toHaveLength(1);
    // While a registration of the AID is being made (its state directory,
    // no record yet: a restore of the image), rm and prune leave the
    // record and what the keeper holds to it.
    const registering = join(sb.home, 'apps', 'tcp15');
    mkdirSync(registering);
    const busy = sb.run(['rm', 'tcp15']);
    expect(busy.code, busy.stderr).toBe(4);
    expect(busy.stderr).toMatch(/being registered right now/);
    expect(sb.run(['prune']).stdout).not.toMatch(/tcp15/);
    expect(keepers(sb.home)).toEqual(held);
    rmdirSync(registering);
    // The hold of an rm killed while it held the AID (its holder gone,
    // review r250) is taken away by the next rm at once, not after the
    // minute an orphan directory is left.
    mkdirSync(registering);
    writeFileSync(join(registering, '.held-by'), `${spawnSync('true').pid} 1`);
    // A keeper that does not answer (stopped) is not waited for: its
    // socket file goes, and it leaves, dropping the connection, once it
    // runs again.
    process.kill(held[0], 'SIGSTOP');
    try {
      expect(run(['rm', 'tcp15'])).toBe('tcp15\n');
      expect(existsSync(join(sb.home, 'keep', 'tcp15.sock'))).toBe(false);
    } finally {
      process.kill(held[0], 'SIGCONT');
    }
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to leave on rm');
    const local3 = third.client.socket.localPort!;
    third.client.socket.write('ECHO anyone\n');
    await waitFor(() => tcpState(local3, port3) === undefined, 10_000, 'the reset');
    third.client.socket.destroy();
  });

  it('a restore killed (SIGKILL) after taking the connections from the keeper leaves them held for the next restore', async () => {
    const port = 26613;
    const { client, go } = await startFixture('tcp13', port);
    run(['snapshot', 'tcp13', '-o', join(out, 'tcp13')]);
    const killed = spawnSync(process.execPath, [cli, 'restore', join(out, 'tcp13')], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: 'restore: global state' }, encoding: 'utf8' });
    expect(killed.signal).toBe('SIGKILL');
    expect(keepers(sb.home)).toHaveLength(1);
    client.socket.write('ECHO while away\n');
    run(['restore', join(out, 'tcp13')]);
    writeFileSync(go, '');
    client.read();
    const got = await client.bytes(BIG + 'hello\nwhile away\n'.length);
    expect(got.subarray(BIG).toString()).toBe('hello\nwhile away\n');
    client.whole();
    await waitFor(() => keepers(sb.home).length === 0, 10_000, 'the keeper to leave once the restore committed');
    client.socket.destroy();
    run(['stop', 'tcp13', '-s', 'KILL']);
  });

  it.runIf(isRoot)('without CAP_NET_ADMIN, a snapshot whose keeper cannot hold the connections fails, the application left running and no image', async () => {
    const port = 26614;
    const { client, go } = await startFixture('tcp14', port);
    // A keepers' directory others may use is refused: live connections
    // are not handed out through it.
    mkdirSync(join(sb.home, 'keep'), { recursive: true });
    chmodSync(join(sb.home, 'keep'), 0o755);
    try {
      const r = spawnSync('setpriv', ['--bounding-set=-net_admin', process.execPath, cli, 'snapshot', 'tcp14', '-o', join(out, 'tcp14')], { env: sb.env, encoding: 'utf8' });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/connections only appshot-keeper can carry .* could not be handed to it: .*keep must be a directory of the user's own.*; the application was left running/);
      expect(existsSync(join(out, 'tcp14'))).toBe(false);
      const denied = spawnSync('setpriv', ['--bounding-set=-net_admin', process.execPath, cli, 'snapshot', 'tcp14', '--tcp-hold', '0', '-o', join(out, 'tcp14')], { env: sb.env, encoding: 'utf8' });
      expect(denied.status).not.toBe(0);
      expect(denied.stderr).toMatch(/can be kept only with TCP repair, which needs CAP_NET_ADMIN, or without it by a snapshot that ends the application/);
    } finally {
      chmodSync(join(sb.home, 'keep'), 0o700);
    }
    writeFileSync(go, '');
    await carriesOn(client);
    client.socket.destroy();
    run(['stop', 'tcp14', '-s', 'KILL']);
  });

  it('refuse to be templated, naming the connection', () => {
    const r = sb.run(['template', 'create', join(out, 'tcp1'), '-o', join(out, 'tcp1.template')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/the established TCP connection 127\.0\.0\.1:26601 → 127\.0\.0\.1:\d+ has one peer/);
    expect(existsSync(join(out, 'tcp1.template'))).toBe(false);
  });

  it('--leave-running: the original keeps its connections; a restore beside it cannot have them', async () => {
    const port = 26602;
    const { client, go } = await startFixture('tcp2', port);
    run(['snapshot', 'tcp2', '--leave-running', '-o', join(out, 'tcp2')]);
    const beside = sb.run(['restore', join(out, 'tcp2'), '--aid', 'tcp2b']);
    expect(beside.code).not.toBe(0);
    expect(beside.stderr).toMatch(new RegExp(`listening on 127\\.0\\.0\\.1:${port}: Address already in use`));
    expect(sb.aids()).not.toContain('tcp2b');
    // The original, out of repair mode again, goes on.
    writeFileSync(go, '');
    await carriesOn(client);
    await waitFor(() => /INSIDE OK|FAIL/.test(logOf('tcp2')), 20_000, 'the inside client to finish');
    expect(logOf('tcp2')).toMatch(/^INSIDE OK$/m);
    client.socket.destroy();
    run(['stop', 'tcp2', '-s', 'KILL']);
  });

  it('--tcp-close: the connections are recorded closed, and the restored application sees them reset', async () => {
    const port = 26603;
    const { client, go } = await startFixture('tcp3', port);
    run(['snapshot', 'tcp3', '--tcp-close', '-o', join(out, 'tcp3')]);
    expect(run(['inspect', join(out, 'tcp3')]).match(/recorded closed/g)?.length).toBe(3);
    // Not in repair mode, the application's end closed as any exit does
    // (reading, the client hears of it).
    client.read();
    await waitFor(() => client.ended || client.error !== undefined, 5000, 'the client to see its connection end');
    client.socket.destroy();
    run(['restore', join(out, 'tcp3')]);
    writeFileSync(go, '');
    // The handlers, writing BIG, and the inside client, reading it, each
    // get ECONNRESET.
    await waitFor(() => /INSIDE OK/.test(logOf('tcp3')) || (logOf('tcp3').match(/^FAIL/gm) ?? []).length >= 3, 20_000, 'the inside client and both handlers to fail');
    expect(logOf('tcp3')).toMatch(/^FAIL: read: Connection reset by peer/m);
    expect(logOf('tcp3').match(/^FAIL: write: Connection reset by peer/gm)?.length).toBe(2);
    // A template of it is allowed: each clone sees the connections reset
    // (its inside client finds the go file there, and reads at once).
    run(['stop', 'tcp3', '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes('tcp3'), 10_000, 'tcp3 to end');
    run(['template', 'create', join(out, 'tcp3'), '-o', join(out, 'tcp3.template')]);
    run(['clone', join(out, 'tcp3.template'), '--aid', 'tcp3c']);
    await waitFor(() => (logOf('tcp3c').match(/^FAIL/gm) ?? []).length >= 3, 20_000, "the clone's inside client and handlers to fail");
    expect(logOf('tcp3c')).toMatch(/^FAIL: read: Connection reset by peer/m);
    run(['stop', 'tcp3c', '-s', 'KILL']);
  });

  it('a server that did not set SO_REUSEADDR gets its port back beside its kept connections, and keeps its choice', async () => {
    // A port nothing lingers on (TIME_WAIT of an earlier run): without
    // SO_REUSEADDR, the fixture itself could not listen there.
    const port = [...Array(60).keys()].map((i) => 26640 + i).find((p) => !portInUse(p))!;
    const go = join(out, 'tcp12.go');
    run(['run', '-d', '--aid', 'tcp12', '--', fixture('tcpfix'), String(port), go, '1000', 'noreuse']);
    await waitFor(() => /INSIDE WAITING|FAIL/.test(logOf('tcp12')), 10_000, 'tcp12 to start');
    const client = await Client.open(port);
    client.socket.write('ECHO before\n');
    client.read();
    expect((await client.bytes('before\n'.length)).toString()).toBe('before\n');
    // The keeper holds the connections on the server's port: a plain
    // bind() there, without SO_REUSEADDR, would be refused.
    run(['snapshot', 'tcp12', '-o', join(out, 'tcp12')]);
    run(['restore', join(out, 'tcp12')]);
    const again = await Client.open(port);
    again.socket.write('ECHO after\n');
    again.read();
    expect((await again.bytes('after\n'.length)).toString()).toBe('after\n');
    client.socket.write('ECHO still\n');
    expect((await client.bytes('still\n'.length)).toString()).toBe('still\n');
    expect(logOf('tcp12')).not.toMatch(/FAIL/);
    again.socket.destroy();
    client.socket.destroy();
    run(['stop', 'tcp12', '-s', 'KILL']);
  });

  it('a connection whose peer closed its side (CLOSE_WAIT) comes back with the unread bytes, then the end', async () => {
    const port = 26605;
    const { client } = await startFixture('tcp5', port);
    client.socket.end('ECHO bye\n'); // our FIN after it; we still read
    // Both requests and our FIN, which /proc counts as one byte more.
    await serverHas(port, client.socket.localPort!, 'ECHO hello\nECHO bye\n'.length + 1, '127.0.0.1', '08');
    run(['snapshot', 'tcp5', '-o', join(out, 'tcp5')]);
    expect(run(['inspect', join(out, 'tcp5')])).toMatch(
      new RegExp(`tcp 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:${client.socket.localPort} \\(CLOSE_WAIT: the peer closed its side\\), 20 bytes unread`),
    );
    run(['restore', join(out, 'tcp5')]);
    client.read();
    const got = await client.bytes(BIG + 'hello\nbye\n'.length);
    expect(firstBadByte(got.subarray(0, BIG))).toBe(-1);
    expect(got.subarray(BIG).toString()).toBe('hello\nbye\n');
    // The handler reads the end of its requests, and closes: a FIN, no reset.
    await waitFor(() => client.ended || client.error !== undefined, 10_000, 'the server to close');
    expect(client.error?.message).toBeUndefined();
    run(['stop', 'tcp5', '-s', 'KILL']);
  });

  it('a connection whose server shut its side down (FIN_WAIT2) still carries the client\'s bytes after the restore', async () => {
    const port = 26607;
    const go = join(out, 'tcp7.go');
    run(['run', '-d', '--aid', 'tcp7', '--', fixture('tcpfix'), String(port), go, '1000']);
    await waitFor(() => /INSIDE WAITING|FAIL/.test(logOf('tcp7')), 10_000, 'tcp7 to start');
    const client = await Client.open(port);
    client.read();
    client.socket.write('SHUT\n');
    await waitFor(() => client.ended, 5000, "the server's FIN");
    client.socket.write('SAY before\n');
    await waitFor(() => /^SAY before$/m.test(logOf('tcp7')), 5000, 'the server to read on');
    run(['snapshot', 'tcp7', '-o', join(out, 'tcp7')]);
    expect(run(['inspect', join(out, 'tcp7')])).toMatch(new RegExp(`tcp 127\\.0\\.0\\.1:${port} → 127\\.0\\.0\\.1:${client.socket.localPort} \\(FIN_WAIT2: the application shut its side down\\)`));
    run(['restore', join(out, 'tcp7')]);
    // The restored FIN, sent again and acknowledged: FIN_WAIT2 as before.
    await waitFor(() => tcpState(port, client.socket.localPort!) === 5, 10_000, 'the restored connection to be in FIN_WAIT2');
    client.socket.write('SAY after the restore\n');
    await waitFor(() => /^SAY after the restore$/m.test(logOf('tcp7')), 10_000, 'the restored server to read');
    expect(client.error?.message).toBeUndefined();
    // Our end: the handler sees it and exits, closing without a reset.
    client.socket.end();
    await new Promise((r) => setTimeout(r, 300));
    expect(client.error?.message).toBeUndefined();
    run(['stop', 'tcp7', '-s', 'KILL']);
  });

  it('over IPv6: a half-closed connection from the test and both ends of one inside', async () => {
    const port = 26606;
    const { client, go } = await startFixture('tcp6', port, '::1');
    client.socket.end('ECHO bye\n');
    // Both requests and our FIN, which /proc counts as one byte more.
    await serverHas(port, client.socket.localPort!, 'ECHO hello\nECHO bye\n'.length + 1, '::1', '08');
    run(['snapshot', 'tcp6', '-o', join(out, 'tcp6')]);
    expect(run(['inspect', join(out, 'tcp6')])).toMatch(new RegExp(`tcp \\[::1\\]:${port} → \\[::1\\]:${client.socket.localPort} \\(CLOSE_WAIT`));
    run(['restore', join(out, 'tcp6')]);
    writeFileSync(go, '');
    client.read();
    const got = await client.bytes(BIG + 'hello\nbye\n'.length);
    expect(firstBadByte(got.subarray(0, BIG))).toBe(-1);
    expect(got.subarray(BIG).toString()).toBe('hello\nbye\n');
    await waitFor(() => client.ended || client.error !== undefined, 10_000, 'the server to close');
    expect(client.error?.message).toBeUndefined();
    await waitFor(() => /INSIDE OK|FAIL/.test(logOf('tcp6')), 20_000, 'the inside client to finish');
    expect(logOf('tcp6')).toMatch(/^INSIDE OK$/m);
    run(['stop', 'tcp6', '-s', 'KILL']);
  });

  it.runIf(isRoot)('without CAP_NET_ADMIN: --leave-running is refused naming the connection; a snapshot that ends the application hands the live connections to the keeper, and a restore here carries on', async () => {
    const port = 26604;
    const { client, go } = await startFixture('tcp4', port);
    const withoutNetAdmin = (args: string[]) => spawnSync('setpriv', ['--bounding-set=-net_admin', process.execPath, cli, ...args], { env: sb.env, encoding: 'utf8' });
    const refused = withoutNetAdmin(['snapshot', 'tcp4', '--leave-running', '-o', join(out, 'tcp4-lr')]);
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toMatch(new RegExp(`the TCP connection 127\\.0\\.0\\.1:\\d+ → 127\\.0\\.0\\.1:\\d+ can be kept only with TCP repair, which needs CAP_NET_ADMIN, or without it by a snapshot that ends the application`));
    expect(existsSync(join(out, 'tcp4-lr'))).toBe(false);

    const taken = withoutNetAdmin(['snapshot', 'tcp4', '-o', join(out, 'tcp4')]);
    expect(taken.status, taken.stderr).toBe(0);
    expect(run(['inspect', join(out, 'tcp4')]).match(/taken without TCP repair: held live by appshot-keeper/g)).toHaveLength(3);
    // Live in the keeper, the connection goes on in the kernel: what the
    // client sends meanwhile is taken, and waits to be read.
    client.socket.write('ECHO while away\n');
    // (Restored by root in full: the application's own processes have
    // CAP_NET_ADMIN, which a restore without it may not grant.)
    run(['restore', join(out, 'tcp4')]);
    writeFileSync(go, '');
    await carriesOn(client, 'while away\n');
    await waitFor(() => /INSIDE OK|FAIL/.test(logOf('tcp4')), 20_000, 'the inside client to finish');
    expect(logOf('tcp4')).toMatch(/^INSIDE OK$/m);
    client.socket.destroy();
    run(['rm', '-f', 'tcp4']);

    // The image does not hold those connections: restored again, with no
    // keeper holding them, it is refused before anything is made.
    const again = sb.run(['restore', join(out, 'tcp4')]);
    expect(again.code).not.toBe(0);
    expect(again.stderr, again.stderr).toMatch(/the TCP connection 127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+, taken without TCP repair, was held by appshot-keeper on the host of the snapshot, and no keeper holds it now/);
    expect(sb.aids()).not.toContain('tcp4');
  });
});

// Listens on 127.0.0.1:argv[1], accepts two connections, fixes the first
// one's receive buffer (SO_RCVBUF: the application's own size, locked),
// leaves the second's to the kernel, and writes up to 1 MiB to each
// without blocking; reads nothing. Prints "ACCEPTED <first's peer port>".
const BUFFERS_SERVER = `
import socket, sys, time
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(4)
print("LISTENING", flush=True)
a, peer = l.accept()
a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 300000)
b, _ = l.accept()
for c in (a, b):
    c.setblocking(False)
    try:
        for _ in range(16): c.send(b"y" * 65536)
    except BlockingIOError:
        pass
print("ACCEPTED", peer[1], flush=True)
time.sleep(1000)
`;

/** Whether this kernel has SO_BUF_LOCK (Linux 5.14): without it a
 * snapshot records no buffer size (it cannot tell whose a size is) and the
 * restore cannot give a lock bit back. */
const hasBufLock = (() => {
  const fd = addon().tcpResetSocket(2);
  try {
    addon().getSockOpt(fd, 1, 72);
    return true;
  } catch {
    return false;
  } finally {
    closeSync(fd);
  }
})();

describe.runIf(isRoot && hasBufLock)('the buffers of a connection made anew in repair mode (SO_BUF_LOCK, Linux 5.14)', () => {
  it('are the application\'s own to a later snapshot: a size it fixed stays fixed, one the restore raised to hold a queue is the kernel\'s to tune', async () => {
    const port = [...Array(40).keys()].map((i) => 26900 + i).find((p) => !portInUse(p))!;
    run(['run', '-d', '--aid', 'tcpbuf', '--', '/usr/bin/python3', '-c', BUFFERS_SERVER, String(port)]);
    await waitFor(() => /LISTENING/.test(logOf('tcpbuf')), 10_000, 'tcpbuf to listen');
    // Accepted in the order they connected (the accept queue's).
    const fixed = await Client.open(port);
    const tuned = await Client.open(port);
    await waitFor(() => /ACCEPTED/.test(logOf('tcpbuf')), 10_000, 'both connections to be accepted');
    try {
      // Queues above what the restore makes room for (tcp_repair.c
      // make_room: 64 KiB received, 16 KiB to send), both ways, on both;
      // what the clients send fits in a fresh socket's receive buffer, so
      // that they have nothing left to send (and be reset for) while the
      // application is away.
      for (const c of [fixed, tuned]) c.socket.write(Buffer.alloc(100_000, 7));
      const queues = () =>
        spawnSync('ss', ['-Htn', 'state', 'established', `sport = :${port}`], { encoding: 'utf8' })
          .stdout.trim()
          .split('\n')
          .filter((l) => l !== '')
          .map((l) => l.trim().split(/\s+/).map(Number));
      await waitFor(() => queues().length === 2 && queues().every(([recv, send]) => recv > 65_536 && send > 16_384), 10_000, 'both queues to fill');
      const firstPeer = Number(/ACCEPTED (\d+)/.exec(logOf('tcpbuf'))![1]);
      expect(firstPeer).toBe(fixed.socket.localPort);
      // Not held by a keeper: the restore makes them anew in repair mode.
      run(['snapshot', 'tcpbuf', '--tcp-hold', '0', '-o', join(out, 'tcpbuf')]);
      await waitFor(() => !sb.aids().includes('tcpbuf'), 10_000, 'tcpbuf to end');
      run(['restore', join(out, 'tcpbuf')]);
      run(['snapshot', 'tcpbuf', '--leave-running', '-o', join(out, 'tcpbuf-later')]);
      // SO_SNDBUF, SO_RCVBUF, SO_BUF_LOCK as each snapshot recorded them.
      const buffers = async (dir: string) => {
        const { image } = await loadImage(dir, { trust: 'report' });
        const by = new Map<number, string[]>();
        for (const p of image.processes)
          for (const fd of p.fds)
            if (fd.tcp) by.set(fd.tcp.peerPort, fd.tcp.socketOptions.filter((o) => o.level === 1 && [7, 8, 72].includes(o.name)).map((o) => `${o.name}=${o.value}`).sort());
        return by;
      };
      const before = await buffers(join(out, 'tcpbuf'));
      const later = await buffers(join(out, 'tcpbuf-later'));
      // The application's own: its receive size, and the lock bit that
      // says it fixed it; nothing on the other.
      // SO_RCVBUF 300000 is capped at net.core.rmem_max, then doubled.
      const rmemMax = Number(readFileSync('/proc/sys/net/core/rmem_max', 'utf8'));
      expect(before.get(fixed.socket.localPort!)).toEqual(['72=2', `8=${2 * Math.min(300_000, rmemMax)}`]);
      expect(before.get(tuned.socket.localPort!)).toEqual([]);
      expect(later.get(fixed.socket.localPort!)).toEqual(before.get(fixed.socket.localPort!));
      expect(later.get(tuned.socket.localPort!)).toEqual([]);
      expect(fixed.error ?? tuned.error).toBeUndefined();
    } finally {
      fixed.socket.destroy();
      tuned.socket.destroy();
      sb.run(['stop', 'tcpbuf', '-s', 'KILL']);
    }
  });
});

// A unix connection (a socket pair) whose one end has written up to 4 MiB
// the other has not read, without blocking; prints "QUEUED", and waits.
const UNIX_QUEUED = `
import socket, time
a, b = socket.socketpair()
a.setblocking(False)
try:
    for _ in range(64): a.send(b"z" * 65536)
except BlockingIOError:
    pass
print("QUEUED", flush=True)
time.sleep(1000)
`;

describe.runIf(hasBufLock)('the send buffer of a unix socket whose queue the restore refilled (SO_BUF_LOCK, Linux 5.14)', () => {
  it('is not fixed to a later snapshot: the lock bit the refill\'s setsockopt set is given back (review r389 L4)', async () => {
    run(['run', '-d', '--aid', 'unixbuf', '--', '/usr/bin/python3', '-c', UNIX_QUEUED]);
    try {
      await waitFor(() => /QUEUED/.test(logOf('unixbuf')), 10_000, 'unixbuf to queue');
      run(['snapshot', 'unixbuf', '-o', join(out, 'unixbuf')]);
      await waitFor(() => !sb.aids().includes('unixbuf'), 10_000, 'unixbuf to end');
      run(['restore', join(out, 'unixbuf')]);
      run(['snapshot', 'unixbuf', '--leave-running', '-o', join(out, 'unixbuf-later')]);
      // SO_SNDBUF, SO_RCVBUF, SO_BUF_LOCK of each unix socket, by inode order.
      const buffers = async (dir: string) => {
        const { image } = await loadImage(dir, { trust: 'report' });
        const queued = image.processes.flatMap((p) => p.fds).filter((fd) => fd.socket?.family === 1);
        return queued.map((fd) => (fd.socket!.options ?? []).filter((o) => o.level === 1 && [7, 8, 72].includes(o.name)).map((o) => `${o.name}=${o.value}`).sort());
      };
      const before = await buffers(join(out, 'unixbuf'));
      expect(before).toEqual([[], []]);
      expect(await buffers(join(out, 'unixbuf-later'))).toEqual(before);
    } finally {
      sb.run(['stop', 'unixbuf', '-s', 'KILL']);
    }
  });
});

describe('the repair primitives', () => {
  it('a locked connection acknowledges nothing; unlocked, it gets what the peer sent meanwhile, sent again', async () => {
    const port = 26631;
    const accepted: Socket[] = [];
    const server = createServer((s) => accepted.push(s));
    await new Promise<void>((ok) => server.listen(port, '127.0.0.1', ok));
    try {
      const client = await Client.open(port);
      await waitFor(() => accepted.length === 1, 5000, 'the connection to be accepted');
      const fd = (client.socket as unknown as { _handle: { fd: number } })._handle.fd;
      const dup = addon().getFd(process.pid, fd); // the same socket
      try {
        addon().tcpRepair(dup, 1);
        addon().tcpLock(dup, true);
        const before = addon().tcpRead(dup);
        accepted[0].write('x'.repeat(1000));
        await new Promise((r) => setTimeout(r, 300));
        const during = addon().tcpRead(dup);
        expect(during.recvSeq).toBe(before.recvSeq);
        expect(during.recvQueue.length).toBe(0);
        // The same connection cannot be made twice on one node (the case of
        // a restore beside a --leave-running original, whose listener
        // usually refuses first).
        expect(() => addon().tcpMake(during)).toThrow(/the same connection exists on this node/);
        addon().tcpLock(dup, false);
        addon().tcpRepair(dup, -1);
      } finally {
        closeSync(dup);
      }
      client.read();
      expect((await client.bytes(1000, 10_000)).toString()).toBe('x'.repeat(1000));
      client.whole();
      client.socket.destroy();
    } finally {
      for (const s of accepted) s.destroy();
      server.close();
    }
  });
});

/* ---- redis ---------------------------------------------------------------- */

const REDIS = '/usr/bin/redis-server';

/** RESP for a command. */
const resp = (...args: string[]) => `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('');
const bulk = (s: string) => `$${Buffer.byteLength(s)}\r\n${s}\r\n`;

describe('redis-server with 50 clients in the middle of a pipelined workload', () => {
  it.runIf(existsSync(REDIS))('gives every client every reply, in order, once, and the clients go on', async () => {
    const port = 26611;
    run(['run', '-d', '--aid', 'tcpredis', '--', REDIS, '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
    const clients: Client[] = [];
    await waitFor(() => /Ready to accept connections/.test(logOf('tcpredis')), 10_000, 'redis to start');
    const CLIENTS = 50;
    const COMMANDS = 60;
    for (let c = 0; c < CLIENTS; c++) {
      const client = await Client.open(port);
      // Accepted by redis (not only by the kernel) before the snapshot.
      client.read();
      client.socket.write(resp('PING'));
      expect((await client.bytes(7)).toString()).toBe('+PONG\r\n');
      client.stop();
      clients.push(client);
    }
    // Each client sends 60 commands and reads nothing: their replies
    // (480 KB each, 24 MB in all) wait in the clients' receive queues, redis's send
    // queues and its output buffers, and some commands in its receive
    // queues, unread.
    const payload = (c: number, i: number) => `client ${c} reply ${i} `.padEnd(8000, 'x');
    const expected = clients.map((_, c) => Array.from({ length: COMMANDS }, (_, i) => bulk(payload(c, i))).join(''));
    // Snapshotted at once, while the commands are still on their way: what
    // the frozen redis drops, the clients send again, to the keeper's
    // silent sockets and then to the restored redis.
    clients.forEach((client, c) => client.socket.write(Array.from({ length: COMMANDS }, (_, i) => resp('ECHO', payload(c, i))).join('')));

    run(['snapshot', 'tcpredis', '-o', join(out, 'redis')]);
    for (const client of clients) client.whole();
    run(['restore', join(out, 'redis')]);

    for (const [c, client] of clients.entries()) {
      client.read();
      const got = await client.bytes(Buffer.byteLength(expected[c]));
      expect(got.length).toBe(Buffer.byteLength(expected[c]));
      expect(got.toString() === expected[c], `client ${c}'s replies differ`).toBe(true);
    }
    await new Promise((r) => setTimeout(r, 100));
    for (const [c, client] of clients.entries()) {
      expect(client.take().length, `client ${c} got more than it asked for`).toBe(0);
      client.socket.write(resp('SET', `after:${c}`, String(c)) + resp('GET', `after:${c}`));
      expect((await client.bytes(5 + 3 + 4)).toString()).toBe(`+OK\r\n${bulk(String(c))}`);
      client.whole();
      client.socket.destroy();
    }
    run(['stop', 'tcpredis', '-s', 'KILL']);
  });
});

/* ---- memcached ------------------------------------------------------------ */

const MEMCACHED = '/usr/bin/memcached';

/** memcached under appshot as `aid` on `port`, with a client connected
 * that stored "greeting" = "hello" (its answer read). */
async function memcachedWithClient(aid: string, port: number): Promise<Client> {
  run(['run', '-d', '--aid', aid, '--', MEMCACHED, '-u', 'nobody', '-p', String(port), '-U', '0', '-l', '127.0.0.1']);
  await waitFor(() => spawnSync('bash', ['-c', `exec 3<>/dev/tcp/127.0.0.1/${port}`]).status === 0, 10_000, 'memcached to listen');
  const client = await Client.open(port);
  client.read();
  client.socket.write('set greeting 0 0 5\r\nhello\r\n');
  expect((await client.bytes(8)).toString()).toBe('STORED\r\n');
  return client;
}

/** The client's next request, on the same connection, is answered with
 * what was stored before (memcachedWithClient). */
async function greeted(client: Client, meanwhile?: () => Promise<void>): Promise<void> {
  // `meanwhile`: once the request is with the kernel (on loopback, with
  // the server's socket too).
  await new Promise<void>((ok, fail) => client.socket.write('get greeting\r\n', (e) => (e ? fail(e) : ok())));
  await meanwhile?.();
  const answer = 'VALUE greeting 0 5\r\nhello\r\nEND\r\n';
  const got = (await client.bytes(answer.length)).toString();
  // Ended (FIN) or reset: the application closed the connection (a read
  // or write that failed), which waiting longer would not change.
  expect(got, `the client's connection ${client.error ? `failed: ${client.error.message}` : client.ended ? 'was ended by the application' : 'is whole'}`).toBe(answer);
}

/** The client read every byte it was sent, then goes, and so does the
 * application. */
function hangUp(client: Client, aid: string): void {
  client.whole();
  client.socket.destroy();
  run(['stop', aid, '-s', 'KILL']);
}

describe('memcached with a client that stays connected', () => {
  it.runIf(existsSync(MEMCACHED) && isRoot)('answers the client\'s pipelined and new requests after the restore', async () => {
    const port = 26621;
    const client = await memcachedWithClient('tcpmc', port);
    client.stop();
    // 100 requests whose answers the client has not read at the snapshot.
    client.socket.write('get greeting\r\n'.repeat(100));
    await new Promise((r) => setTimeout(r, 100));
    const answer = 'VALUE greeting 0 5\r\nhello\r\nEND\r\n';

    run(['snapshot', 'tcpmc', '-o', join(out, 'mc')]);
    client.whole();
    run(['restore', join(out, 'mc')]);

    client.read();
    expect((await client.bytes(answer.length * 100)).toString()).toBe(answer.repeat(100));
    client.socket.write('set after 0 0 7\r\nrestore\r\nget after\r\n');
    expect((await client.bytes(8 + 'VALUE after 0 7\r\nrestore\r\nEND\r\n'.length)).toString()).toBe('STORED\r\nVALUE after 0 7\r\nrestore\r\nEND\r\n');
    client.whole();
    client.socket.destroy();
    run(['stop', 'tcpmc', '-s', 'KILL']);
  });

  // Killed once its ending is journaled, before any thread was set to die
  // with it: the application is whole, but its connections are in repair
  // mode (dropping every packet), held for the restore by a keeper, and
  // only the dead snapshot could have let them go. Rolled back, it would
  // run on with connections that never move again (an idle one: nothing
  // tells it); so the image wins, and the restore carries them on.
  it.runIf(existsSync(MEMCACHED) && isRoot)("a snapshot killed at 'ending journaled' with a connection in repair mode: the next command ends the application into its image, and after the restore the client's connection carries on", async () => {
    const port = 26622;
    const client = await memcachedWithClient('tcpmck', port);
    const image = join(out, 'mck');
    const killed = spawnSync(process.execPath, [cli, 'snapshot', 'tcpmck', '-o', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: 'snapshot: ending journaled' }, encoding: 'utf8' });
    expect(killed.signal, killed.stderr).toBe('SIGKILL');
    run(['ps']);
    expect(existsSync(image)).toBe(true);
    await waitFor(() => !sb.aids().includes('tcpmck'), 10_000, 'the application to end into its image');
    expect(keepers(sb.home)).toHaveLength(1);
    run(['restore', image]);
    await greeted(client);
    hangUp(client, 'tcpmck');
  });

  // Killed once its image is in place (its first journal step), before the
  // keeper's hand-over: the application, let go by the kernel, runs on, and
  // the next command takes the connections the snapshot held out of repair
  // mode (pidfd_getfd), so that the client's connection carries on.
  it.runIf(existsSync(MEMCACHED) && isRoot)("a snapshot killed at 'image committed' with a connection in repair mode: the next command rolls back, and the application answers on the client's connection", async () => {
    const port = 26629;
    const aid = 'tcpmcp';
    const client = await memcachedWithClient(aid, port);
    const image = join(out, aid);
    const killed = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: 'snapshot: image committed' }, encoding: 'utf8' });
    expect(killed.signal, killed.stderr).toBe('SIGKILL');
    run(['ps']);
    expect(existsSync(image)).toBe(false);
    expect(sb.aids()).toContain(aid);
    await greeted(client);
    hangUp(client, aid);
  });

  // Killed while its dump holds the client's connection in repair mode,
  // before any image is in place (the default snapshot, and
  // --leave-running), or once its image is in place: a guardian the
  // snapshot forked (appshot-guard, handed each socket just before the
  // snapshot's filter and repair mode) lets the connection out of repair
  // mode, filter and all, the moment appshot dies: the client's next
  // request on it is answered before any other command runs (were it let
  // into the socket while still in repair mode, memcached, running again,
  // would read it, get EPERM, and close the connection). The next command
  // finds it out of repair mode already, and its journal entry goes. One
  // killed just after the journal, before the connection entered repair
  // mode, leaves it as it is; one killed with the filter attached but the
  // connection not yet in repair mode ('connection locked') has its filter
  // taken away (left, the connection would drop every packet for good).
  // Killed at 'connection in repair mode', the guardian is slow to act (it
  // is stopped until the client's request has come and memcached, running
  // again, has had time to read it): the request must not get into the
  // socket while it is in repair mode, as it did when the filter came
  // after repair mode (a CI flake on a loaded machine).
  const killedHolding: [point: string, leaveRunning: boolean, port: number, slowGuardian: boolean][] = [
    ['connection in repair mode', false, 26634, true],
    ['dumping memory', false, 26635, false],
    ['dumping memory', true, 26636, false],
    ['connection journaled', false, 26637, false],
    ['image committed', false, 26638, false],
    ['connection locked', false, 26623, false],
  ];
  for (const [n, [point, leaveRunning, port, slowGuardian]] of killedHolding.entries()) {
    it.runIf(existsSync(MEMCACHED) && isRoot)(`a snapshot${leaveRunning ? ' --leave-running' : ''} killed at '${point}'${slowGuardian ? ', its guardian slow to act' : ''}: its guardian lets the connection out of repair mode at once, and the application answers on the client's connection before any command`, async () => {
      const aid = `tcpmcd${n}`;
      const client = await memcachedWithClient(aid, port);
      const image = join(out, aid);
      const args = [cli, 'snapshot', aid, '-o', image, ...(leaveRunning ? ['--leave-running'] : [])];
      if (slowGuardian) {
        const snapshot = spawn(process.execPath, args, { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: `snapshot: ${point}` }, stdio: 'ignore' });
        const ended = new Promise((r) => snapshot.once('exit', r));
        await waitFor(() => stateOf(snapshot.pid!) === 'T', 20_000, 'the snapshot to stop at the point');
        const [guardian] = guardians();
        expect(guardian).toBeDefined();
        process.kill(guardian, 'SIGSTOP');
        await waitFor(() => stateOf(guardian) === 'T', 10_000, 'the guardian to stop');
        snapshot.kill('SIGKILL');
        await ended;
        await greeted(client, async () => {
          await new Promise((r) => setTimeout(r, 300));
          process.kill(guardian, 'SIGCONT');
        });
      } else {
        const killed = spawnSync(process.execPath, args, {
          env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: `snapshot: ${point}` },
          encoding: 'utf8',
        });
        expect(killed.signal, killed.stderr).toBe('SIGKILL');
        await greeted(client);
      }
      await waitFor(() => guardians().length === 0, 10_000, 'the guardian to end');
      run(['ps']);
      expect(existsSync(image)).toBe(false);
      expect(sb.aids()).toContain(aid);
      expect(endingEntries()).toEqual([]);
      await greeted(client);
      hangUp(client, aid);
    });
  }

  // Where the guardian cannot act, the journal does: killed once the
  // guardian was disarmed, just before the ending is journaled (the image
  // in place: "placing"), or with the guardian itself killed first, while
  // dumping ("holding"), the snapshot leaves the connection in repair mode,
  // and the next command lets it out (pidfd_getfd), filter and all; killed
  // at 'connection locked' with the guardian killed first, the connection
  // is not in repair mode, and the next command takes the filter away.
  const journaledHolding: [point: string, guardianKilled: boolean, port: number][] = [
    ['guardian disarmed', false, 26639],
    ['dumping memory', true, 26709],
    ['connection locked', true, 26624],
  ];
  for (const [n, [point, guardianKilled, port]] of journaledHolding.entries()) {
    it.runIf(existsSync(MEMCACHED) && isRoot)(`a snapshot killed at '${point}'${guardianKilled ? ' with its guardian killed first' : ''}: the next command lets the connection out of repair mode, and the application answers on the client's connection`, async () => {
      const aid = `tcpmcj${n}`;
      const client = await memcachedWithClient(aid, port);
      const image = join(out, aid);
      const env = { ...sb.env, APPSHOT_ENGINE: 'off', [guardianKilled ? 'APPSHOT_TEST_STOP_AT' : 'APPSHOT_TEST_KILL_AT']: `snapshot: ${point}` };
      if (guardianKilled) {
        const snapshot = spawn(process.execPath, [cli, 'snapshot', aid, '-o', image], { env, stdio: 'ignore' });
        const ended = new Promise((r) => snapshot.once('exit', r));
        await waitFor(() => stateOf(snapshot.pid!) === 'T', 20_000, 'the snapshot to stop at the point');
        const [guardian] = guardians();
        expect(guardian).toBeDefined();
        process.kill(guardian, 'SIGKILL');
        await waitFor(() => !guardians().includes(guardian), 10_000, 'the guardian to be gone');
        snapshot.kill('SIGKILL');
        await ended;
      } else {
        const killed = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', image], { env, encoding: 'utf8' });
        expect(killed.signal, killed.stderr).toBe('SIGKILL');
      }
      expect(endingEntries()).toHaveLength(1);
      run(['ps']);
      expect(existsSync(image)).toBe(false);
      expect(sb.aids()).toContain(aid);
      expect(endingEntries()).toEqual([]);
      await greeted(client);
      hangUp(client, aid);
    });
  }

  // Failing (not killed) with its filter attached, the connection not yet
  // in repair mode: the snapshot's own clean-up takes the filter away
  // (review r301: it was not yet held there, so it stayed, the connection
  // dropped every packet for good, and the next snapshot took it for a
  // filter of the application's own).
  it.runIf(existsSync(MEMCACHED) && isRoot)("a snapshot --leave-running failing at 'connection locked' takes its filter away: the application answers on the client's connection, and the next snapshot takes it", async () => {
    const port = 26625;
    const aid = 'tcpmcf';
    const client = await memcachedWithClient(aid, port);
    const failed = spawnSync(process.execPath, [cli, 'snapshot', aid, '--leave-running', '-o', join(out, aid)], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: connection locked' },
      encoding: 'utf8',
    });
    expect(failed.status, failed.stderr).not.toBe(0);
    await greeted(client);
    run(['snapshot', aid, '--leave-running', '-o', join(out, `${aid}-2`)]);
    await greeted(client);
    hangUp(client, aid);
  });

  // Failing once its ending is journaled (the connections held in repair
  // mode by the snapshot and handed to a keeper), and killed at each step
  // of the undoing: the connections leave repair mode while the threads
  // still die with the snapshot, and the entry says so before they stop
  // dying with it. Killed while they still do, the application dies and
  // its image is it (restored, the client carries on); killed after, the
  // next command rolls back and the application, run on, answers on the
  // very connection (in repair mode still, it would drop every packet).
  const undoing: [string, 'image' | 'rolled back'][] = [
    ['connections released', 'image'],
    ['nothing in repair mode', 'image'],
    ['lives on without appshot', 'rolled back'],
    ['rolling back', 'rolled back'],
  ];
  for (const [n, [point, outcome]] of undoing.entries()) {
    it.runIf(existsSync(MEMCACHED) && isRoot)(`failing at 'dies with appshot' with a connection in repair mode, killed at 'failed, ${point}': ${outcome === 'image' ? 'the image is the application and the client carries on after the restore' : 'the application runs on and answers on the client\'s connection'}`, async () => {
      const port = 26630 + n;
      const aid = `tcpmcu${n}`;
      const client = await memcachedWithClient(aid, port);
      const image = join(out, aid);
      const killed = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', image], {
        env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: dies with appshot', APPSHOT_TEST_KILL_AT: `snapshot: failed, ${point}` },
        encoding: 'utf8',
      });
      expect(killed.signal, killed.stderr).toBe('SIGKILL');
      run(['ps']);
      if (outcome === 'image') {
        expect(existsSync(image)).toBe(true);
        await waitFor(() => !sb.aids().includes(aid), 10_000, 'the application to end into its image');
        run(['restore', image]);
      } else {
        expect(existsSync(image)).toBe(false);
        expect(sb.aids()).toContain(aid);
        const keeps = (pid: number) => {
          try {
            return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[1] === join(sb.home, 'keep', `${aid}.sock`);
          } catch {
            return false;
          }
        };
        await waitFor(() => !keepers(sb.home).some(keeps), 10_000, 'the keeper to let the connections go');
      }
      await greeted(client);
      hangUp(client, aid);
    });
  }
});
