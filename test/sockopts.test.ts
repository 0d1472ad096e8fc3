/**
 * Socket options (issue 12, no silent failure): what a program set on its
 * sockets comes back after a restore, or the snapshot refuses by name.
 * test/fixtures/sockopts.c sets options of every socket kind away from
 * their defaults (an IPv4 multicast interface chosen by index, which the
 * kernel does not read back, checked by sending through it) and keeps
 * checking them; holder.c's reuseport kinds attach a steering program to a
 * reuseport group, which nothing can read back.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-sockopts-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const logOf = (aid: string) => sb.log(aid);
const systemPid = (aid: string, vpid = 2) => sb.systemPid(aid, vpid);

const run = (args: string[]) => sb.ok(args);

/** SIGHUP makes the fixture check once more and say so. */
const exercised = (aid: string) => sb.exercised(aid, 'to check');

describe('socket options of every kind come back as the application set them', () => {
  it('from a snapshot that ends it, an established connection too, eager', async () => {
    const aid = 'sopt1';
    run(['run', '-d', '--aid', aid, '--', fixture('sockopts'), '--alone']);
    await sb.checksPass(aid);
    // Not held (--tcp-hold 0): the connection is made anew by repair mode,
    // its options set on a new socket, not kept on the very one.
    run(['snapshot', aid, '-o', join(out, aid), '--tcp-hold', '0']);
    run(['restore', join(out, aid)]);
    await sb.checksPass(aid);
    await exercised(aid);
    // Noted again in the new tables: a second round trip keeps the
    // multicast interface the kernel does not show.
    run(['snapshot', aid, '-o', join(out, `${aid}b`)]);
    run(['restore', join(out, `${aid}b`), '--lazy']);
    await sb.checksPass(aid);
    await exercised(aid);
  });

  it('from a --leave-running snapshot, restored --lazy beside the original', async () => {
    const aid = 'sopt2';
    run(['run', '-d', '--aid', aid, '--', fixture('sockopts')]);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    await sb.checksPass(aid);
    run(['restore', join(out, aid), '--aid', 'sopt3', '--lazy']);
    await sb.checksPass('sopt3');
    await exercised(aid);
    await exercised('sopt3');
    await sb.checksPass('sopt3');
  });
});

describe('the notes of the preload library', () => {
  it('of sockets since closed leave the tables at a snapshot, so that closing and opening sockets does not use up their room', async () => {
    const aid = 'sopt4';
    run(['run', '-d', '--aid', aid, '--', fixture('sockopts'), '--churn']);
    await sb.checksPass(aid);
    // 48 notes of closed sockets, then 48 more: more than the 64 slots
    // unless the first snapshot freed them. Lost notes would make the
    // reuseport socket unknowable, and the second snapshot refuse it.
    run(['snapshot', aid, '-o', join(out, `${aid}a`), '--leave-running']);
    await exercised(aid);
    run(['snapshot', aid, '-o', join(out, `${aid}b`), '--leave-running']);
    await sb.checksPass(aid);
  });
});

describe('notes that found no room', () => {
  it('refuse the socket they may be of, by name, and are forgotten once it is closed: a reuseport socket is not refused for good', async () => {
    const aid = 'sopt5';
    run(['run', '-d', '--aid', aid, '--', fixture('sockopts'), '--overflow']);
    await sb.checksPass(aid);
    const fd = /UNNOTED fd=(\d+)/.exec(logOf(aid))![1];
    // 80 notes of closed sockets and one of an open one, for 64 slots:
    // the open one's sticky IPV6_PKTINFO is not known, its socket refused
    // (not the reuseport socket, whose group has no program).
    const r = sb.run(['snapshot', aid, '-o', join(out, `${aid}a`), '--leave-running']);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`process 2 \\(sockopts\\) fd ${fd}: the UDP socket \\(unbound\\) may have an option set that appshot cannot read back and could not note`));
    expect(existsSync(join(out, `${aid}a`))).toBe(false);
    await sb.checksPass(aid);
    // Closed: no socket the notes may be of is open, they are forgotten,
    // and the reuseport socket goes through this snapshot and the next.
    await exercised(aid);
    run(['snapshot', aid, '-o', join(out, `${aid}b`), '--leave-running']);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, `${aid}c`), '--leave-running']);
    run(['restore', join(out, `${aid}c`), '--aid', 'sopt6', '--lazy']);
    await sb.checksPass('sopt6');
  });
});

describe('a reuseport group with a steering program, or an option the kernel never shows, is refused by name, and the application goes on', () => {
  const refusals: [string, (fd: string) => RegExp][] = [
    [
      'reuseport-cbpf',
      (fd) => new RegExp(`process 2 \\(holder\\) fd ${fd}: the UDP socket 127\\.0\\.0\\.1:\\d+ is in a reuseport group with a steering program the application attached \\(SO_ATTACH_REUSEPORT_CBPF\\), which cannot be captured`),
    ],
    [
      'reuseport-ebpf',
      (fd) =>
        new RegExp(`process 2 \\(holder\\) fd ${fd}: the TCP socket listening at 127\\.0\\.0\\.1:\\d+ is in a reuseport group with a steering program the application attached \\(SO_ATTACH_REUSEPORT_EBPF, through another socket of the group\\), which cannot be captured`),
    ],
    ['ipv6-pktinfo', (fd) => new RegExp(`process 2 \\(holder\\) fd ${fd}: the UDP socket \\(unbound\\) has IPV6_PKTINFO \\(a sticky source address or interface\\) set, which the kernel does not give back`)],
    ['ipsec-policy', (fd) => new RegExp(`process 2 \\(holder\\) fd ${fd}: the UDP socket \\(unbound\\) has IP_XFRM_POLICY \\(a per-socket IPsec policy\\) set, which the kernel does not give back`)],
    ['tcp-md5', (fd) => new RegExp(`process 2 \\(holder\\) fd ${fd}: the TCP socket listening at 127\\.0\\.0\\.1:\\d+ has TCP_MD5SIG \\(an MD5 signature key\\) set, which the kernel does not give back`)],
  ];
  for (const [kind, message] of refusals)
    it(kind, async () => {
      const aid = `held-${kind}`;
      run(['run', '-d', '--aid', aid, '--', fixture('holder'), kind]);
      await waitFor(() => /READY fd=\d+/.test(logOf(aid)), 10_000, `${aid} to start`);
      const fd = /READY fd=(\d+)/.exec(logOf(aid))![1];
      const r = sb.run(['snapshot', aid, '-o', join(out, aid)]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(message(fd));
      expect(r.stderr).toContain('the application was left running');
      expect(existsSync(join(out, aid))).toBe(false);
      const status = readFileSync(`/proc/${systemPid(aid)}/status`, 'utf8');
      expect(status).toMatch(/^TracerPid:\s+0$/m);
      expect(status).not.toMatch(/^State:\s+[tT]/m);
    });
});
