/**
 * Debian's servers in their ordinary configurations, which run as several
 * users: nginx (master as root, workers as nobody), memcached -u nobody,
 * haproxy (a chrooted worker as haproxy, unix sockets renamed into place),
 * Postfix (daemons chrooted to its queue directory, sockets bound by
 * relative names), OpenSSH (a login session on a pseudo-terminal) and
 * PostgreSQL started as the packaging starts it (runuser from root) or by
 * its own user. Each goes through snapshot and restore (and nginx and
 * memcached through templates and clones) and must come back serving, with
 * every process exactly the user it was: same uids, gids, groups,
 * capability sets, no_new_privs and seccomp mode. And dnsmasq, started as
 * root and running as nobody, which keeps a NETLINK_ROUTE socket to hear
 * of interfaces and addresses (resources/netlink.ts). And a Java HTTP
 * server, gunicorn, squid and vsftpd, each with a client session kept open across
 * the round trip (they skip where the package is not installed).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, request } from 'node:http';
import { connect } from 'node:net';
import { createSocket } from 'node:dgram';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeTemplate, encodeTemplate, signTemplate } from '../src/image/format.js';
import { cli, Sandbox, TEST_PORTS, waitFor, waitForAsync } from './helpers.js';

const NGINX = '/usr/sbin/nginx';
const MEMCACHED = '/usr/bin/memcached';
const HAPROXY = '/usr/sbin/haproxy';
const HAPROXY_CFG = '/etc/haproxy/haproxy.cfg';
const POSTFIX = '/usr/sbin/postfix';
const SSHD = '/usr/sbin/sshd';
/** The newest /usr/lib/postgresql/VERSION/bin/postgres (the
 * distribution's version: 15 on Debian 12, 17 on 13), as
 * test/prerequisites.sh looks for it. */
const PG_BIN = (() => {
  const versions = existsSync('/usr/lib/postgresql') ? readdirSync('/usr/lib/postgresql').filter((v) => existsSync(`/usr/lib/postgresql/${v}/bin/postgres`)) : [];
  return `/usr/lib/postgresql/${versions.sort((a, b) => Number(b) - Number(a))[0] ?? 'VERSION'}/bin`;
})();
const PSQL = '/usr/bin/psql';
const DNSMASQ = '/usr/sbin/dnsmasq';
const NOBODY = 65534;
const isRoot = process.getuid!() === 0;

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-servers-'));
chmodSync(dir, 0o755);
// Fixed ports of their own (see Sandbox for the other tests' ranges).
const base = 26000 + (process.pid % 100) * 5;

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

/** Who a process is, as /proc/PID/status says it. */
function identity(pid: number): Record<string, string> {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const out: Record<string, string> = {};
  for (const key of ['Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp'])
    out[key] = (new RegExp(`^${key}:[ \\t]*(.*)$`, 'm').exec(status)?.[1] ?? '').trim();
  return out;
}

/** An application's processes but its init: virtual PID → system PID. */
function processes(aid: string, s = sb): { vpid: number; pid: number; command: string }[] {
  return s.json<Json>(['ps', aid])[0].processes.filter((p: Json) => p.vpid !== 1);
}

/** Virtual PID → identity, for every process of the application. */
/** Each listed process's identity, by virtual PID; one that ended between
 * the listing and the read (a PostgreSQL backend whose client left) is
 * left out. */
function identities(aid: string, s = sb): Map<number, Record<string, string>> {
  const out = new Map<number, Record<string, string>>();
  for (const p of processes(aid, s)) {
    try {
      out.set(p.vpid, identity(p.pid));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT' && (e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
    }
  }
  return out;
}

/** The system PIDs of every descendant of `pid`. */
function descendants(pid: number): number[] {
  const children = (p: number) =>
    readFileSync(`/proc/${p}/task/${p}/children`, 'utf8').split(' ').filter(Boolean).map(Number);
  const out: number[] = [];
  const queue = children(pid);
  while (queue.length) {
    const p = queue.shift()!;
    out.push(p);
    try {
      queue.push(...children(p));
    } catch {
      /* gone */
    }
  }
  return out;
}

function run(args: string[], s = sb): void {
  const r = s.run(args);
  if (r.code !== 0) throw new Error(`appshot ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
}

function httpGet(port: number, path = '/'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.setTimeout(5000, () => req.destroy(new Error('no answer')));
    req.on('error', reject);
    req.end();
  });
}

async function answers(port: number): Promise<boolean> {
  return (await httpGet(port).catch(() => undefined))?.status === 200;
}

async function waitForHttp(port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await answers(port)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nothing answers HTTP on port ${port}`);
}

/** Established TCP connections whose local port is `port`, from
 * /proc/net/tcp (state 01). */
/** Whether a TCP socket listens on 127.0.0.1 or any address at `port`. */
function listening(port: number): boolean {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  return readFileSync('/proc/net/tcp', 'utf8')
    .split('\n')
    .slice(1)
    .some((l) => {
      const f = l.trim().split(/\s+/);
      return f[1]?.endsWith(`:${hex}`) && f[3] === '0A';
    });
}

function established(port: number): number {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  return readFileSync('/proc/net/tcp', 'utf8')
    .split('\n')
    .slice(1)
    .filter((l) => {
      const f = l.trim().split(/\s+/);
      return f[1]?.endsWith(`:${hex}`) && f[3] === '01';
    }).length;
}

/** One memcached text-protocol exchange: sends `text`, returns what came
 * back once it ends with `until`. */
function memcached(port: number, text: string, until = /(END|STORED|ERROR)\r\n$/): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    let got = '';
    s.setTimeout(5000, () => s.destroy(new Error('no answer')));
    s.on('data', (d) => {
      got += d.toString();
      if (until.test(got)) {
        s.end();
        resolve(got);
      }
    });
    s.on('error', reject);
    s.write(text);
  });
}

/** The IPv4 address a DNS server on 127.0.0.1:`port` answers for `name`
 * (type A), asked over UDP or TCP; undefined if it does not answer. */
function dnsA(port: number, name: string, tcp: boolean, timeoutMs = 5000): Promise<string | undefined> {
  const question = Buffer.concat([
    Buffer.from([0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]),
    ...name.split('.').map((label) => Buffer.concat([Buffer.from([label.length]), Buffer.from(label)])),
    Buffer.from([0, 0, 1, 0, 1]),
  ]);
  // The answer's last record is the A record: its last 4 bytes the address.
  const address = (reply: Buffer) => (reply.readUInt16BE(6) > 0 ? [...reply.subarray(reply.length - 4)].join('.') : undefined);
  return new Promise((resolve) => {
    if (tcp) {
      const s = connect(port, '127.0.0.1');
      let got = Buffer.alloc(0);
      s.setTimeout(timeoutMs, () => (s.destroy(), resolve(undefined)));
      s.on('data', (d) => {
        got = Buffer.concat([got, d]);
        if (got.length >= 2 && got.length >= 2 + got.readUInt16BE(0)) {
          s.end();
          resolve(address(got.subarray(2, 2 + got.readUInt16BE(0))));
        }
      });
      s.on('error', () => resolve(undefined));
      s.write(Buffer.concat([Buffer.from([question.length >> 8, question.length & 0xff]), question]));
      return;
    }
    const s = createSocket('udp4');
    const timer = setTimeout(() => (s.close(), resolve(undefined)), timeoutMs);
    s.on('error', () => (clearTimeout(timer), s.close(), resolve(undefined)));
    s.on('message', (reply) => {
      clearTimeout(timer);
      s.close();
      resolve(address(reply));
    });
    s.send(question, port, '127.0.0.1');
  });
}

/** An nginx configuration in its own directory `ngx` (made here), for
 * nginx run in the foreground by appshot: master as root, 2 workers as
 * nobody, every temporary path inside `ngx`, one server on 127.0.0.1:port
 * whose location does `answer`; `http` adds directives to its http block.
 * Returns the configuration file's path. */
function nginxConf(ngx: string, port: number, answer: string, http = ''): string {
  mkdirSync(ngx);
  const conf = join(ngx, 'nginx.conf');
  writeFileSync(
    conf,
    `user nobody nogroup;
worker_processes 2;
daemon off;
pid ${ngx}/nginx.pid;
error_log stderr;
events { worker_connections 64; }
http {
  access_log off;${http ? ` ${http}` : ''}
  client_body_temp_path ${ngx}/body; proxy_temp_path ${ngx}/proxy; fastcgi_temp_path ${ngx}/fcgi;
  uwsgi_temp_path ${ngx}/uwsgi; scgi_temp_path ${ngx}/scgi;
  server { listen 127.0.0.1:${port}; location / { ${answer} } }
}
`,
  );
  return conf;
}

describe('servers that run as several users', () => {
  it('are installed (the CI installs Debian\'s nginx-light, memcached, haproxy, postfix, openssh-server and postgresql)', () => {
    for (const bin of [NGINX, MEMCACHED, HAPROXY, HAPROXY_CFG, POSTFIX, SSHD, '/usr/bin/ssh', `${PG_BIN}/postgres`, `${PG_BIN}/initdb`, PSQL, '/usr/sbin/runuser', '/usr/bin/setpriv'])
      expect(existsSync(bin), `${bin} is missing: run test/prerequisites.sh (or apt-get install nginx-light memcached haproxy postfix openssh-server postgresql)`).toBe(true);
  });

  it.runIf(isRoot)('nginx, master as root and 2 workers as nobody: restored as exactly those users, then cloned 3 times', async () => {
    const port = base;
    const ngx = join(dir, 'nginx');
    const conf = nginxConf(ngx, port, 'return 200 "hello from nginx\\n";');
    run(['run', '-d', '--aid', 'ngx', '--', NGINX, '-c', conf]);
    await waitForHttp(port);
    await waitFor(() => processes('ngx').length === 3, 10_000, 'the master and its 2 workers');
    const before = identities('ngx');
    const workers = processes('ngx').filter((p) => /worker process/.test(p.command));
    expect(workers).toHaveLength(2);
    for (const w of workers) expect(before.get(w.vpid)!.Uid).toBe(`${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`);

    run(['snapshot', 'ngx', '-o', join(dir, 'ngx.snap')]);
    run(['restore', join(dir, 'ngx.snap')]);
    await waitForHttp(port);
    expect((await httpGet(port)).body).toBe('hello from nginx\n');
    expect(identities('ngx')).toEqual(before);

    // Clones behind the one port: their workers are nobody too.
    run(['snapshot', 'ngx', '-o', join(dir, 'ngx.snap2')]);
    const rules = join(ngx, 'nginx.rules');
    writeFileSync(rules, `PORT ${port} MULTIPLEX\nMEMORY "*" COPY-ON-WRITE\n`);
    run(['template', 'create', join(dir, 'ngx.snap2'), '-o', join(dir, 'ngx.template'), '--rules', rules]);
    run(['clone', join(dir, 'ngx.template'), '--aid', 'ngc', '--count', '3']);
    for (const aid of ['ngc-1', 'ngc-2', 'ngc-3']) expect(identities(aid)).toEqual(before);
    for (let i = 0; i < 30; i++) expect((await httpGet(port)).body).toBe('hello from nginx\n');
    for (const aid of ['ngc-1', 'ngc-2', 'ngc-3']) run(['stop', aid, '-s', 'KILL']);
  });

  it.runIf(isRoot)('nginx with keep-alive connections open: each carries on after snapshot and restore, without reconnecting', async () => {
    const port = base + 5;
    const conf = nginxConf(join(dir, 'nginx-ka'), port, 'return 200 "kept $request_uri\\n";', 'keepalive_timeout 300s; keepalive_requests 1000;');
    run(['run', '-d', '--aid', 'ngka', '--', NGINX, '-c', conf]);
    await waitForHttp(port);
    // Five connections, each with a request answered and left open.
    const conns = await Promise.all(Array.from({ length: 5 }, () => KeepAlive.open(port)));
    for (const [i, c] of conns.entries()) expect(await c.get(`/before/${i}`)).toBe(`kept /before/${i}\n`);
    run(['snapshot', 'ngka', '-o', join(dir, 'ngka.snap')]);
    run(['restore', join(dir, 'ngka.snap')]);
    for (const [i, c] of conns.entries()) {
      expect(await c.get(`/after/${i}`)).toBe(`kept /after/${i}\n`);
      expect(c.connects).toBe(1);
      c.socket.destroy();
    }
    run(['stop', 'ngka', '-s', 'KILL']);
  });

  it.runIf(isRoot)('dnsmasq (root, then nobody) answers over UDP and TCP after a round trip, its NETLINK_ROUTE socket carried', async () => {
    expect(existsSync(DNSMASQ), `${DNSMASQ} is missing: run test/prerequisites.sh (or apt-get install dnsmasq-base)`).toBe(true);
    const port = base + 3;
    run(['run', '-d', '--aid', 'dm', '--', DNSMASQ, '-k', '-p', String(port), '--listen-address=127.0.0.1', '--bind-interfaces', '--no-resolv', '--no-hosts', '--address=/test.local/1.2.3.4']);
    try {
      await waitForAsync(async () => (await dnsA(port, 'test.local', false, 500)) === '1.2.3.4', 10_000, 'dnsmasq to answer');
      expect(await dnsA(port, 'test.local', true)).toBe('1.2.3.4');
      // dnsmasq forks a child for each TCP client, which ends with it.
      await waitFor(() => established(port) === 0 && processes('dm').length === 1, 10_000, 'dnsmasq to close its TCP client connection');
      const before = identities('dm');
      expect([...before.values()][0].Uid).toBe(`${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`);

      run(['snapshot', 'dm', '-o', join(dir, 'dm.snap')]);
      const shown = sb.run(['inspect', join(dir, 'dm.snap')]);
      expect(shown.stdout).toMatch(/NETLINK\s+netlink NETLINK_ROUTE socket, port id \d+, groups \d/);
      run(['restore', join(dir, 'dm.snap')]);
      expect(identities('dm')).toEqual(before);
      expect(await dnsA(port, 'test.local', false)).toBe('1.2.3.4');
      expect(await dnsA(port, 'test.local', true)).toBe('1.2.3.4');
      await waitFor(() => processes('dm').length === 1, 10_000, 'dnsmasq\'s TCP child to end');
      expect(identities('dm')).toEqual(before);
    } finally {
      sb.run(['stop', 'dm', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot)('memcached -u nobody keeps its items and its user through a round trip and in clones', async () => {
    const port = base + 1;
    run(['run', '-d', '--aid', 'mc', '--', MEMCACHED, '-u', 'nobody', '-p', String(port), '-U', '0', '-l', '127.0.0.1']);
    // Its one process exists before it listens: wait for the listener.
    await waitFor(() => processes('mc').length === 1 && listening(port), 10_000, 'memcached to listen');
    try {
      for (let i = 0; i < 20; i++) {
        const value = `value-${i}`;
        expect(await memcached(port, `set key${i} 0 0 ${value.length}\r\n${value}\r\n`).catch(() => '')).toBe('STORED\r\n');
      }
      const before = identities('mc');
      expect([...before.values()][0].Uid).toBe(`${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`);
      // Our clients are gone; memcached closes its ends when it reads their
      // EOF (a connection still open would be refused by name).
      await waitFor(() => established(port) === 0, 10_000, 'memcached to close its client connections');

      run(['snapshot', 'mc', '-o', join(dir, 'mc.snap')]);
      run(['restore', join(dir, 'mc.snap')]);
      expect(identities('mc')).toEqual(before);
      expect(await memcached(port, 'get key0 key19\r\n')).toBe('VALUE key0 0 7\r\nvalue-0\r\nVALUE key19 0 8\r\nvalue-19\r\nEND\r\n');

      // Two clones, each on a port of its own with every item.
      await waitFor(() => established(port) === 0, 10_000, 'memcached to close its client connections');
      run(['snapshot', 'mc', '-o', join(dir, 'mc.snap2')]);
      const rules = join(dir, 'mc.rules');
      writeFileSync(rules, `PORT ${port} ALLOCATE\nMEMORY "*" COPY-ON-WRITE\n`);
      run(['template', 'create', join(dir, 'mc.snap2'), '-o', join(dir, 'mc.template'), '--rules', rules]);
      const clones = sb.json<Json[]>(['clone', join(dir, 'mc.template'), '--aid', 'mcc', '--count', '2']);
      for (const c of clones) {
        const own = c.ports.find((p: Json) => p.virtual === port && p.mode === 'allocate').system;
        expect(identities(c.aid)).toEqual(before);
        expect(await memcached(own, 'get key7\r\n')).toBe('VALUE key7 0 7\r\nvalue-7\r\nEND\r\n');
        expect(await memcached(own, `set mine 0 0 ${c.aid.length}\r\n${c.aid}\r\n`)).toBe('STORED\r\n');
      }
      for (const c of clones) {
        const own = c.ports.find((p: Json) => p.virtual === port && p.mode === 'allocate').system;
        expect(await memcached(own, 'get mine\r\n')).toBe(`VALUE mine 0 ${c.aid.length}\r\n${c.aid}\r\nEND\r\n`);
        run(['stop', c.aid, '-s', 'KILL']);
      }
    } finally {
      // Left running by a failure, it would hold its port for a later test.
      sb.run(['stop', 'mc', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot)('haproxy in Debian\'s configuration (chroot, a worker as haproxy, stats and master sockets): a keep-alive client and both sockets carry on, and its own reload works after', async () => {
    // The packaged global section as it is but for the stats socket's
    // directory. The master binds each unix socket to NAME.PID.tmp, gives
    // it its mode and renames it to NAME; the worker then chroots to
    // /var/lib/haproxy. A restore that bound the kept name left clients a
    // stale NAME and a NAME.PID.tmp nobody uses; the chroot was refused.
    const port = base + 2;
    const hap = join(dir, 'haproxy');
    mkdirSync(hap);
    const conf = join(hap, 'haproxy.cfg');
    const packaged = readFileSync(HAPROXY_CFG, 'utf8');
    expect(packaged).toMatch(/^\s*chroot \/var\/lib\/haproxy$/m);
    writeFileSync(
      conf,
      `${packaged.replace(/^(\s*stats socket )\/run\/haproxy\/admin.sock/m, `$1${hap}/admin.sock`)}
frontend web
\tbind 127.0.0.1:${port}
\thttp-request return status 200 content-type text/plain lf-string "haproxy %[path]\\n"
`,
    );
    run(['run', '-d', '--aid', 'hap', '--', HAPROXY, '-Ws', '-f', conf, '-S', join(hap, 'master.sock')]);
    await waitForHttp(port);
    await waitFor(() => processes('hap').length === 2, 10_000, 'the master and its worker');
    const before = identities('hap');
    const admin = join(hap, 'admin.sock');
    await waitFor(() => existsSync(admin), 10_000, 'the stats socket');
    const file = lstatSync(admin);
    expect(file.mode & 0o777).toBe(0o660);
    const client = await KeepAlive.open(port);
    expect(await client.get('/before')).toBe('haproxy /before\n');
    expect(await unixExchange(admin, 'show info\n', /^Name: HAProxy$/m)).toBe(true);

    run(['snapshot', 'hap', '-o', join(dir, 'hap.snap')]);
    run(['restore', join(dir, 'hap.snap')]);
    expect(await client.get('/after')).toBe('haproxy /after\n');
    expect(client.connects).toBe(1);
    client.socket.destroy();
    expect(await unixExchange(admin, 'show info\n', /^Name: HAProxy$/m)).toBe(true);
    expect(await unixExchange(join(hap, 'master.sock'), 'show proc\n', /^\d+\s+master\s/m)).toBe(true);
    const after = lstatSync(admin);
    expect([after.mode & 0o7777, after.uid, after.gid]).toEqual([file.mode & 0o7777, file.uid, file.gid]);
    expect(readdirSync(hap).sort()).toEqual(['admin.sock', 'haproxy.cfg', 'master.sock']);
    expect(identities('hap')).toEqual(before);
    // Its own reload after the restore: the master executes itself again
    // (keeping its listeners, passed to the new worker over a socket
    // pair), and the old worker leaves.
    const [, oldWorker] = processes('hap').sort((a, b) => a.vpid - b.vpid);
    run(['exec', 'hap', '--', 'kill', '-USR2', '2']);
    await waitFor(() => {
      const ps = processes('hap');
      return ps.length === 2 && !ps.some((p) => p.vpid === oldWorker.vpid);
    }, 30_000, 'a new worker in place of the old one');
    expect((await httpGet(port, '/reloaded')).body).toBe('haproxy /reloaded\n');
    expect(await unixExchange(join(hap, 'master.sock'), 'show proc\n', /^\d+\s+master\s/m)).toBe(true);
    run(['stop', 'hap', '-s', 'KILL']);
  });

  it.runIf(isRoot)('Postfix, its daemons chrooted to the queue directory and its sockets bound by relative names: mail is accepted and delivered after a round trip', async () => {
    // An instance of its own (postfix -c): the packaged master.cf with its
    // chroot column as shipped, SMTP on a test port, every message
    // discarded once delivered. Postfix binds every unix socket by a
    // relative name from its queue directory (private/cleanup,
    // public/postlog), which the snapshot refused (datagram) or the
    // restore bound where appshot ran (listeners); its chrooted daemons'
    // sockets were refused.
    const port = base + 3;
    const pf = join(dir, 'postfix');
    const conf = join(pf, 'conf');
    mkdirSync(conf, { recursive: true });
    mkdirSync(join(pf, 'queue'));
    mkdirSync(join(pf, 'data'));
    chownSync(join(pf, 'data'), Number(spawnSync('id', ['-u', 'postfix'], { encoding: 'utf8' }).stdout), 0);
    const master = readFileSync('/etc/postfix/master.cf', 'utf8');
    expect(master).toMatch(/^smtp\s+inet\s+n\s+-\s+y\s/m);
    writeFileSync(join(conf, 'master.cf'), master.replace(/^smtp(\s+inet)/m, `127.0.0.1:${port}$1`));
    writeFileSync(
      join(conf, 'main.cf'),
      [
        'compatibility_level = 3.6',
        `queue_directory = ${join(pf, 'queue')}`,
        `data_directory = ${join(pf, 'data')}`,
        'inet_interfaces = loopback-only',
        'inet_protocols = ipv4',
        'myhostname = appshot.test',
        'mydestination = localhost',
        'alias_maps =',
        'alias_database =',
        'local_recipient_maps =',
        'local_transport = discard:',
        'default_transport = discard:',
        'maillog_file = /dev/stdout',
        '',
      ].join('\n'),
    );
    const check = spawnSync(POSTFIX, ['-c', conf, 'check'], { encoding: 'utf8' });
    expect(check.status, check.stderr).toBe(0);
    run(['run', '-d', '--aid', 'pfx', '--', POSTFIX, '-c', conf, 'start-fg']);
    await waitFor(() => /daemon started/.test(sb.log('pfx')), 30_000, 'postfix to start');
    const delivered = async (to: string) => {
      const id = await smtpSend(port, to);
      await waitFor(() => new RegExp(`${id}: to=<${to}>.*status=sent`).test(sb.log('pfx')), 30_000, `the message to ${to} delivered`);
    };
    await delivered('before@localhost');
    // The chrooted daemons (pickup, qmgr) and the ones started for the
    // message: the snapshot takes them all.
    await waitFor(() => processes('pfx').some((p) => /^qmgr/.test(p.command)), 10_000, 'qmgr');
    run(['snapshot', 'pfx', '-o', join(dir, 'pfx.snap')]);
    run(['restore', join(dir, 'pfx.snap')]);
    await delivered('after@localhost');
    expect(readdirSync(join(pf, 'queue', 'public')).sort()).toEqual(['cleanup', 'flush', 'pickup', 'postlog', 'qmgr', 'showq']);
    run(['stop', 'pfx', '-s', 'KILL']);
  });

  it.runIf(isRoot)('OpenSSH: a login session on its terminal carries on through a round trip, and a new login works after', async () => {
    // sshd as Debian ships it but for its files: privilege separation (a
    // monitor and the session's process), a pseudo-terminal, the shell.
    const port = base + 4;
    const d = join(dir, 'sshd');
    mkdirSync(d);
    mkdirSync('/run/sshd', { recursive: true });
    for (const key of ['host', 'user']) {
      const r = spawnSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(d, key)], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
    }
    writeFileSync(join(d, 'authorized_keys'), readFileSync(join(d, 'user.pub')), { mode: 0o600 });
    writeFileSync(
      join(d, 'sshd_config'),
      [`Port ${port}`, 'ListenAddress 127.0.0.1', `HostKey ${join(d, 'host')}`, `AuthorizedKeysFile ${join(d, 'authorized_keys')}`, 'PermitRootLogin prohibit-password', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'UsePAM no', 'StrictModes no', `PidFile ${join(d, 'sshd.pid')}`, ''].join('\n'),
    );
    const ssh = (command: string[]) => ['-tt', '-i', join(d, 'user'), '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR', '-p', String(port), 'root@127.0.0.1', ...command];
    run(['run', '-d', '--aid', 'sshd', '--', SSHD, '-D', '-e', '-f', join(d, 'sshd_config')]);
    await waitFor(() => listening(port), 10_000, 'sshd to listen');
    const session = spawn('ssh', ssh(['while read line; do echo "got $line on $(tty)"; done']), { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    session.stdout.on('data', (b: Buffer) => (out += b.toString()));
    try {
      session.stdin.write('one\n');
      await waitFor(() => /got one on \/dev\/pts\/\d+/.test(out), 30_000, 'the session to answer');
      const tty = /got one on (\/dev\/pts\/\d+)/.exec(out)![1];
      await waitFor(() => processes('sshd').some((p) => /^bash|^-bash|while read/.test(p.command)), 10_000, "the session's shell");
      run(['snapshot', 'sshd', '-o', join(dir, 'sshd.snap')]);
      run(['restore', join(dir, 'sshd.snap')]);
      session.stdin.write('two\n');
      await waitFor(() => out.includes(`got two on ${tty}`), 30_000, 'the same session, on the same terminal, to answer after the restore');
      const fresh = spawnSync('ssh', ssh(['echo fresh login']), { encoding: 'utf8', timeout: 30_000 });
      expect(fresh.stdout).toContain('fresh login');
    } finally {
      session.kill();
    }
    run(['stop', 'sshd', '-s', 'KILL']);
  });
});

/** One message through SMTP on `port` to `to`; the queue id it was given. */
function smtpSend(port: number, to: string): Promise<string> {
  const steps = ['EHLO appshot.test', 'MAIL FROM:<test@localhost>', `RCPT TO:<${to}>`, 'DATA', `Subject: ${to}\r\n\r\nhello\r\n.`, 'QUIT'];
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    let got = '';
    let sent = 0;
    s.setTimeout(20_000, () => s.destroy(new Error(`no answer from SMTP: ${JSON.stringify(got.slice(-300))}`)));
    s.on('data', (d) => {
      got += d.toString();
      // Each reply's last line is "NNN text" (a dash after NNN: more follow).
      const replies = got.split('\r\n').filter((l) => /^\d{3} /.test(l)).length;
      if (replies > sent && sent < steps.length) s.write(`${steps[sent++]}\r\n`);
    });
    s.on('close', () => {
      const id = /^250 2\.0\.0 Ok: queued as (\w+)/m.exec(got)?.[1];
      if (id) resolve(id);
      else reject(new Error(`SMTP did not queue the message: ${JSON.stringify(got.slice(-400))}`));
    });
    s.on('error', reject);
  });
}

/** Sends `text` on a new connection to the unix socket at `path`; true
 * once what came back matches `until`. */
function unixExchange(path: string, text: string, until: RegExp): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    let got = '';
    s.setTimeout(5000, () => s.destroy(new Error(`no answer from ${path}: ${JSON.stringify(got.slice(0, 200))}`)));
    s.on('data', (d) => {
      got += d.toString();
      if (until.test(got)) {
        s.destroy();
        resolve(true);
      }
    });
    s.on('error', reject);
    s.write(text);
  });
}

/** A new PostgreSQL cluster owned by postgres; its directory. */
/** One HTTP/1.1 connection kept open between requests. */
class KeepAlive {
  connects = 0;
  private data = Buffer.alloc(0);
  private waiter?: () => void;
  private constructor(readonly socket: import('node:net').Socket) {
    socket.on('data', (d: Buffer) => {
      this.data = Buffer.concat([this.data, d]);
      this.waiter?.();
    });
  }

  static open(port: number): Promise<KeepAlive> {
    return new Promise((resolve, reject) => {
      const s = connect(port, '127.0.0.1');
      const k = new KeepAlive(s);
      s.once('connect', () => {
        k.connects++;
        resolve(k);
      });
      s.once('error', reject);
    });
  }

  /** The body of GET path, read by its Content-Length. */
  async get(path: string): Promise<string> {
    this.socket.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
    for (;;) {
      const text = this.data.toString('latin1');
      const end = text.indexOf('\r\n\r\n');
      const length = /content-length: *(\d+)/i.exec(text)?.[1];
      if (end >= 0 && length !== undefined && this.data.length >= end + 4 + Number(length)) {
        const body = this.data.subarray(end + 4, end + 4 + Number(length)).toString();
        this.data = this.data.subarray(end + 4 + Number(length));
        return body;
      }
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no answer to GET ${path}`)), 10_000);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
        this.socket.once('close', () => reject(new Error(`connection closed before the answer to GET ${path}`)));
      });
    }
  }
}

/** A directory `name` of the postgres user's holding a new cluster (db):
 * initdb's once for the file, copied whole (owners, modes) for each test,
 * which gets a cluster of its own as initdb leaves it. */
function initdb(name: string): string {
  const data = join(dir, name);
  mkdirSync(data);
  const pw = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
  const uid = Number(pw.stdout);
  chownSync(data, uid, uid);
  const pristine = join(dir, 'pg-initdb', 'db');
  if (!existsSync(pristine)) {
    // Made aside and renamed: a failed initdb leaves no cluster to copy.
    mkdirSync(join(dir, 'pg-initdb'), { recursive: true });
    chownSync(join(dir, 'pg-initdb'), uid, uid);
    rmSync(`${pristine}.new`, { recursive: true, force: true });
    const r = spawnSync('runuser', ['-u', 'postgres', '--', `${PG_BIN}/initdb`, '-D', `${pristine}.new`, '-A', 'trust', '-U', 'postgres', '--no-sync'], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`initdb: ${r.stderr}`);
    renameSync(`${pristine}.new`, pristine);
  }
  const cp = spawnSync('cp', ['-a', pristine, join(data, 'db')], { encoding: 'utf8' });
  if (cp.status !== 0) throw new Error(`copying the cluster initdb made: ${cp.stderr}`);
  return data;
}

function psql(port: number, sql: string): string {
  // Bounded: a spawnSync blocks the worker's event loop, so a psql that
  // never hears back (another server on the port) would stop every
  // timeout of the file with it.
  const r = spawnSync(PSQL, ['-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-Atc', sql], { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) throw new Error(`psql: ${r.error ? r.error.message : r.stderr}`);
  return r.stdout.trim();
}

const pgReady = (port: number) => () => {
  try {
    return psql(port, 'select 1') === '1';
  } catch {
    return false;
  }
};

/** 10,000 rows, a snapshot (which ends the server), a restore, and the
 * rows counted and one more inserted. */
async function pgRoundTrip(port: number, aid: string, s: { run: (a: string[]) => { code: number | null; stderr: string } }, images: string): Promise<void> {
  psql(port, 'create table t as select g as id, md5(g::text) as v from generate_series(1, 10000) g');
  const snap = s.run(['snapshot', aid, '-o', join(images, `${aid}.snap`)]);
  expect(snap.code, snap.stderr).toBe(0);
  const rest = s.run(['restore', join(images, `${aid}.snap`)]);
  expect(rest.code, rest.stderr).toBe(0);
  await waitFor(pgReady(port), 20_000, 'the restored PostgreSQL to answer');
  expect(psql(port, 'select count(*), sum(id) from t')).toBe('10000|50005000');
  expect(psql(port, "insert into t values (10001, 'after') returning id")).toMatch(/^10001/);
  expect(psql(port, 'select count(*) from t')).toBe('10001');
}

/** Every file under `path` and its bytes' hash (a cluster's files as the
 * template left them). */
function treeDigest(path: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      else if (st.isFile()) out[p.slice(path.length)] = createHash('sha256').update(readFileSync(p)).digest('hex');
    }
  };
  walk(path);
  return out;
}

// initdb, a cluster's start and its round trips take a few seconds alone,
// and several times as long on a machine loaded by other test files (one
// psql session test took 50 s so): a limit for a hang, not a duration.
describe('PostgreSQL 15', { timeout: 180_000 }, () => {
  const shmBefore = new Set(readdirSync('/dev/shm'));
  // A PostgreSQL killed with SIGKILL (as a snapshot ends it) leaves its
  // dynamic shared memory files: they are its state, restored from them.
  afterAll(() => {
    for (const f of readdirSync('/dev/shm')) if (f.startsWith('PostgreSQL.') && !shmBefore.has(f)) rmSync(join('/dev/shm', f), { force: true });
  });

  it.runIf(isRoot)('a template of a loaded cluster and 3 clones: each its own database, the template\'s files untouched', async () => {
    const port = base + 4;
    const data = initdb('pg-tpl');
    // A clone's private copies live in the state directory, which the
    // users the application runs as must be able to pass through.
    chmodSync(sb.home, 0o711);
    const rules = join(data, 'pg.rules');
    writeFileSync(
      rules,
      [
        'DEFINE <APPL-ID> AS PROPERTY application-id',
        // The cluster's files: a clone reads the template's until it writes.
        `FILE "${join(data, 'db')}" COPY-ON-WRITE`,
        // Dynamic shared memory, opened by name by every backend.
        'FILE "/dev/shm" COPY-ON-WRITE',
        `PORT ${port} ALLOCATE`,
      ].join('\n') + '\n',
    );
    run(['run', '-d', '--aid', 'pgt', '--rules', rules, '--', 'runuser', '-u', 'postgres', '--', `${PG_BIN}/postgres`, '-D', join(data, 'db'), '-c', 'unix_socket_directories=', '-p', String(port), '-c', 'listen_addresses=127.0.0.1']);
    await waitFor(pgReady(port), 20_000, 'PostgreSQL to answer');
    psql(port, 'create table t as select g as id, md5(g::text) as v from generate_series(1, 10000) g');
    psql(port, 'checkpoint');
    run(['snapshot', 'pgt', '-o', `${data}.snap`]);
    run(['template', 'create', `${data}.snap`, '-o', `${data}.tpl`]);
    const before = treeDigest(join(data, 'db'));
    run(['clone', `${data}.tpl`, '--aid', 'pgc', '-n', '3']);
    const ports = ['pgc-1', 'pgc-2', 'pgc-3'].map((aid) => Number(sb.run(['port', aid, String(port)]).stdout.trim()));
    expect(new Set(ports).size).toBe(3);
    for (const p of ports) await waitFor(pgReady(p), 20_000, `clone on port ${p} to answer`);
    for (const p of ports) expect(psql(p, 'select count(*), sum(id) from t')).toBe('10000|50005000');
    // Writes in one are its own: rows, and a table.
    psql(ports[0], "insert into t values (20001, 'one')");
    psql(ports[0], 'create table only_one (x int)');
    psql(ports[1], "insert into t values (20002, 'two'), (20003, 'two')");
    expect(ports.map((p) => psql(p, "select count(*) || ':' || (select count(*) from pg_tables where tablename = 'only_one') from t"))).toEqual(['10001:1', '10002:0', '10000:0']);
    // Each clone ran as postgres, and the template's cluster is as it was.
    for (const aid of ['pgc-1', 'pgc-2', 'pgc-3'])
      for (const p of processes(aid).filter((x) => !x.command.startsWith('runuser'))) expect(identity(p.pid).Uid.split('\t')[0]).not.toBe('0');
    expect(treeDigest(join(data, 'db'))).toEqual(before);
    // A clean shutdown removes the cluster's SysV segment as postgres:
    // restored, it belongs to postgres as it did, not to root.
    run(['stop', 'pgc-3', '-t', '20']);
    expect(sb.run(['logs', 'pgc-3']).stdout).toMatch(/database system is shut down/);
    expect(sb.run(['logs', 'pgc-3']).stdout).not.toMatch(/shmctl.*failed/);
    for (const aid of ['pgc-1', 'pgc-2', 'pgc-3']) run(['rm', '-f', aid]);
    // Ended, they took nothing of the template with them: it clones again.
    expect(treeDigest(join(data, 'db'))).toEqual(before);
    run(['clone', `${data}.tpl`, '--aid', 'pgd']);
    const again = Number(sb.run(['port', 'pgd', String(port)]).stdout.trim());
    await waitFor(pgReady(again), 20_000, 'a new clone to answer');
    expect(psql(again, 'select count(*) from t')).toBe('10000');
    run(['rm', '-f', 'pgd']);
  });


  it.runIf(isRoot)('started as the packaging starts it (runuser from root): every process listed, restored as postgres', async () => {
    const port = base + 2;
    const data = initdb('pg-root');
    run(['run', '-d', '--aid', 'pg', '--', 'runuser', '-u', 'postgres', '--', `${PG_BIN}/postgres`, '-D', join(data, 'db'), '-k', data, '-p', String(port), '-c', 'listen_addresses=127.0.0.1']);
    await waitFor(pgReady(port), 20_000, 'PostgreSQL to answer');
    // The postmaster and every child it forked are in the application.
    const init = sb.json<Json>(['ps', 'pg'])[0].processes.find((p: Json) => p.vpid === 1).pid;
    await waitFor(() => descendants(init).length >= 6, 10_000, 'the postmaster\'s children');
    const listed = new Set(processes('pg').map((p) => p.pid));
    expect(descendants(init).filter((p) => !listed.has(p))).toEqual([]);
    const before = identities('pg');
    const postgresUid = readFileSync('/etc/passwd', 'utf8').match(/^postgres:[^:]*:(\d+):/m)![1];
    for (const p of processes('pg').filter((x) => !x.command.startsWith('runuser') && before.has(x.vpid))) expect(before.get(p.vpid)!.Uid.split('\t')[0]).toBe(postgresUid);

    await pgRoundTrip(port, 'pg', sb, dir);
    const after = identities('pg');
    for (const [vpid, id] of before) if (after.has(vpid)) expect(id).toEqual(after.get(vpid));
    run(['stop', 'pg', '-s', 'KILL']);
  });

  it.runIf(isRoot)('a psql session on the unix socket, in the middle of a transaction, carries on after a snapshot and a restore', async () => {
    const port = base + 1;
    const data = initdb('pg-session');
    run(['run', '-d', '--aid', 'pgs', '--', 'runuser', '-u', 'postgres', '--', `${PG_BIN}/postgres`, '-D', join(data, 'db'), '-k', data, '-p', String(port), '-c', 'listen_addresses=127.0.0.1']);
    await waitFor(pgReady(port), 20_000, 'PostgreSQL to answer');
    psql(port, 'create table t (id int)');
    // A client outside the application, as a user at a terminal: its
    // backend's socket is connected to it.
    const session = spawn(PSQL, ['-h', data, '-p', String(port), '-U', 'postgres', '-At', '-v', 'ON_ERROR_STOP=1'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let said = '';
    session.stdout.on('data', (d: Buffer) => (said += d.toString()));
    session.stderr.on('data', (d: Buffer) => (said += d.toString()));
    try {
      session.stdin.write("begin;\ninsert into t values (1);\n\\echo step 1\n");
      await waitFor(() => said.includes('step 1'), 10_000, 'the session to begin its transaction');
      run(['snapshot', 'pgs', '-o', `${data}.snap`]);
      expect(sb.run(['inspect', `${data}.snap`]).stdout).toMatch(/unix stream connection to a process outside, held by appshot-keeper/);
      // Asked while PostgreSQL is gone: the question waits in the socket.
      session.stdin.write("insert into t values (2);\nselect count(*) from t;\n\\echo step 2\n");
      run(['restore', `${data}.snap`]);
      await waitFor(() => said.includes('step 2'), 20_000, 'the session to be answered after the restore');
      session.stdin.write("commit;\n\\echo step 3\n");
      await waitFor(() => said.includes('step 3'), 10_000, 'the commit');
      expect(said).toBe('BEGIN\nINSERT 0 1\nstep 1\nINSERT 0 1\n2\nstep 2\nCOMMIT\nstep 3\n');
      // Committed in the restored cluster, seen by a new client.
      expect(psql(port, 'select count(*), sum(id) from t')).toBe('2|3');
    } finally {
      session.kill();
      sb.run(['stop', 'pgs', '-s', 'KILL']);
    }
  });

  // The cluster is made and run by the postgres user: root lends its
  // identity (runuser), as a service manager would.
  it.runIf(isRoot)('run by its own user, with no privilege at all: a round trip keeps every row', async () => {
    const port = base + 3;
    const data = initdb('pg-user');
    const home = join(data, 'appshot');
    const env = { ...process.env, CI: '', APPSHOT_HOME: home, APPSHOT_PORTS: TEST_PORTS };
    const asUser = (args: string[]) => {
      const r = spawnSync('runuser', ['-u', 'postgres', '--', process.execPath, cli, ...args], { env, encoding: 'utf8', cwd: data });
      return { code: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const r = asUser(['run', '-d', '--aid', 'pgu', '--', `${PG_BIN}/postgres`, '-D', join(data, 'db'), '-k', data, '-p', String(port), '-c', 'listen_addresses=127.0.0.1']);
    expect(r.code, r.stderr).toBe(0);
    try {
      await waitFor(pgReady(port), 20_000, 'PostgreSQL to answer');
      // A backend fills shared buffers and exits: its pages are in the
      // shared memory object but mapped by no process left.
      expect(psql(port, 'select count(*) from pg_database')).toBe('3');
      await pgRoundTrip(port, 'pgu', { run: asUser }, data);
    } finally {
      asUser(['stop', 'pgu', '-s', 'KILL']);
      await waitFor(() => asUser(['ps', 'pgu']).code !== 0, 10_000, 'pgu to end').catch(() => undefined);
    }
  });
});

// Ports of their own for the servers below (helpers.ts lists every file's).
const more = 32100 + (process.pid % 100) * 5;
const JAVAC = '/usr/bin/javac';
const GUNICORN = '/usr/bin/gunicorn';
const VSFTPD = '/usr/sbin/vsftpd';
const SQUID = '/usr/sbin/squid';
const LIGHTTPD = '/usr/sbin/lighttpd';
const APACHE2 = '/usr/sbin/apache2';
const DBUS_DAEMON = '/usr/bin/dbus-daemon';
const DBUS_SEND = '/usr/bin/dbus-send';
const DBUS_MONITOR = '/usr/bin/dbus-monitor';

/** A client in Python outside the application, on stdin and stdout: it
 * prints what it did, waits for a line on stdin, goes on on the same
 * session and prints the rest. */
class PyClient {
  said = '';
  private readonly child: import('node:child_process').ChildProcessWithoutNullStreams;
  constructor(script: string) {
    this.child = spawn('python3', ['-c', script], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdout.on('data', (d: Buffer) => (this.said += d.toString()));
    this.child.stderr.on('data', (d: Buffer) => (this.said += d.toString()));
  }
  go(): void {
    this.child.stdin.write('go\n');
  }
  kill(): void {
    this.child.kill();
  }
}

describe('more servers as Debian ships them', () => {
  it.runIf(isRoot && existsSync(DBUS_DAEMON))('dbus-daemon run by root (so holding a NETLINK_AUDIT socket, as the system bus does): a monitor connected across a round trip sees a signal sent after it, and the bus keeps its ID', async () => {
    const address = `unix:path=${join(dir, 'bus')}`;
    run(['run', '-d', '--aid', 'dbus', '--', DBUS_DAEMON, '--session', '--nofork', `--address=${address}`]);
    let monitor: ChildProcess | undefined;
    try {
      const busId = () => {
        const r = spawnSync(DBUS_SEND, [`--bus=${address}`, '--print-reply', '--dest=org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus.GetId'], { encoding: 'utf8', timeout: 10_000 });
        return r.status === 0 ? /string "(\w+)"/.exec(r.stdout)?.[1] : undefined;
      };
      await waitFor(() => busId() !== undefined, 10_000, 'the bus to answer');
      const id = busId();
      let seen = '';
      monitor = spawn(DBUS_MONITOR, ['--address', address, "type='signal',interface='test.appshot'"], { stdio: ['ignore', 'pipe', 'pipe'] });
      monitor.stdout!.on('data', (b: Buffer) => (seen += b.toString()));
      // It becomes a monitor: the bus takes its name back.
      await waitFor(() => seen.includes('member=NameLost'), 10_000, 'dbus-monitor to become a monitor');
      run(['snapshot', 'dbus', '-o', join(dir, 'dbus.snap')]);
      expect(sb.run(['inspect', join(dir, 'dbus.snap')]).stdout).toMatch(/NETLINK\s+netlink NETLINK_AUDIT socket/);
      run(['restore', join(dir, 'dbus.snap')]);
      expect(busId()).toBe(id);
      const sent = spawnSync(DBUS_SEND, [`--bus=${address}`, '--type=signal', '/test', 'test.appshot.Ping', 'string:after'], { encoding: 'utf8', timeout: 10_000 });
      expect(sent.status, sent.stderr).toBe(0);
      await waitFor(() => seen.includes('string "after"'), 10_000, 'the monitor to see the signal sent after the restore');
    } finally {
      monitor?.kill();
      sb.run(['stop', 'dbus', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot && existsSync(JAVAC))('a Java HTTP server (com.sun.net.httpserver, 4 worker threads, run as nobody): a keep-alive client and the heap carry on', async () => {
    // The JVM: some twenty threads (GC, JIT compilers, ...), its heap and
    // code cache, a perf-data file mapped shared in /tmp.
    const port = more;
    const d = join(dir, 'java');
    mkdirSync(d);
    writeFileSync(
      join(d, 'Hello.java'),
      `import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicLong;
public class Hello {
  static final ArrayList<byte[]> kept = new ArrayList<>();
  public static void main(String[] a) throws Exception {
    AtomicLong n = new AtomicLong();
    HttpServer s = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(a[0])), 0);
    s.createContext("/", ex -> {
      // Garbage and a little kept, so that the collector runs.
      for (int i = 0; i < 200; i++) { byte[] b = new byte[10000]; if (i == 0) synchronized (kept) { kept.add(b); } }
      if (ex.getRequestURI().getPath().equals("/gc")) System.gc();
      byte[] b = ("java " + ex.getRequestURI().getPath() + " " + n.incrementAndGet() + "\\n").getBytes();
      ex.sendResponseHeaders(200, b.length);
      try (var o = ex.getResponseBody()) { o.write(b); }
    });
    s.setExecutor(Executors.newFixedThreadPool(4));
    s.start();
  }
}
`,
    );
    const javac = spawnSync(JAVAC, ['-d', d, join(d, 'Hello.java')], { encoding: 'utf8' });
    expect(javac.status, javac.stderr).toBe(0);
    run(['run', '-d', '--aid', 'jv', '--', 'runuser', '-u', 'nobody', '--', 'java', '-Xmx64m', '-cp', d, 'Hello', String(port)]);
    try {
      await waitForHttp(port);
      const before = identities('jv');
      const client = await KeepAlive.open(port);
      for (let i = 0; i < 6; i++) await client.get(`/warm/${i}`);
      const served = Number(/ (\d+)\n$/.exec(await client.get('/before'))![1]);
      run(['snapshot', 'jv', '-o', join(dir, 'jv.snap')]);
      run(['restore', join(dir, 'jv.snap')]);
      expect(await client.get('/after')).toBe(`java /after ${served + 1}\n`);
      expect(await client.get('/gc')).toBe(`java /gc ${served + 2}\n`);
      expect(client.connects).toBe(1);
      client.socket.destroy();
      expect((await httpGet(port)).body).toBe(`java / ${served + 3}\n`);
      expect(identities('jv')).toEqual(before);
    } finally {
      sb.run(['stop', 'jv', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot && existsSync(GUNICORN))('gunicorn (a master as root, 2 gthread workers as nobody, each with a deleted heartbeat file it was given): a keep-alive client carries on and no worker dies', async () => {
    // Each worker's heartbeat is a temporary file made O_NOFOLLOW by its
    // master, given to nobody, deleted, and fchmod'ed by the worker: the
    // restore failed (ELOOP), then remade it as root and every worker died
    // of EPERM and was replaced.
    const port = more + 1;
    const d = join(dir, 'gunicorn');
    mkdirSync(d);
    writeFileSync(
      join(d, 'app.py'),
      `import os
n = 0
def app(env, start):
    global n
    n += 1
    b = ("gunicorn %s %d %d\\n" % (env["PATH_INFO"], os.getpid(), n)).encode()
    start("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(b)))])
    return [b]
`,
    );
    run(['run', '-d', '--aid', 'gu', '--', GUNICORN, '--chdir', d, '-w', '2', '-k', 'gthread', '--threads', '2', '--keep-alive', '300', '-b', `127.0.0.1:${port}`, '--user', 'nobody', '--group', 'nogroup', 'app:app']);
    try {
      await waitForHttp(port);
      // A worker is root from its fork until it has set itself up.
      const settled = () => [...identities('gu').values()].filter((i) => i.Uid === `${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`).length === 2 && processes('gu').length === 3;
      await waitFor(settled, 10_000, 'the master and its 2 workers, as nobody');
      const before = identities('gu');
      const client = await KeepAlive.open(port);
      const [, worker, count] = /^gunicorn \/before (\d+) (\d+)\n$/.exec(await client.get('/before'))!;
      run(['snapshot', 'gu', '-o', join(dir, 'gu.snap')]);
      run(['restore', join(dir, 'gu.snap')]);
      expect(await client.get('/after')).toBe(`gunicorn /after ${worker} ${Number(count) + 1}\n`);
      expect(client.connects).toBe(1);
      client.socket.destroy();
      for (let i = 0; i < 6; i++) expect((await httpGet(port)).status).toBe(200);
      expect(identities('gu')).toEqual(before);
      expect(sb.log('gu')).not.toMatch(/Operation not permitted|Worker exiting/);
    } finally {
      sb.run(['stop', 'gu', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot && existsSync(SQUID))('squid as Debian runs it (workers as proxy, its pinger holding raw ICMP and ICMPv6 sockets): a keep-alive client of the proxy carries on', async () => {
    // The pinger, on by default, made every snapshot of squid fail on its
    // raw sockets (resources/raw.ts).
    const port = more + 3;
    const d = join(dir, 'squid');
    mkdirSync(d);
    chownSync(d, Number(spawnSync('id', ['-u', 'proxy'], { encoding: 'utf8' }).stdout), 0);
    // The origin: a server of the test's own, outside the application.
    let served = 0;
    const origin = createServer((req, res) => {
      const body = `origin ${req.url} ${++served}\n`;
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length, 'Cache-Control': 'no-store' });
      res.end(body);
    });
    // squid keeps its connection to the origin for the next request: it
    // goes through the round trip too, so the origin must not time it out.
    origin.keepAliveTimeout = 300_000;
    await new Promise<void>((resolve) => origin.listen(0, '127.0.0.1', resolve));
    const originPort = (origin.address() as import('node:net').AddressInfo).port;
    writeFileSync(
      join(d, 'squid.conf'),
      [`http_port 127.0.0.1:${port}`, 'http_access allow localhost', 'http_access deny all', 'cache_effective_user proxy', `pid_filename ${d}/squid.pid`, `access_log none`, `cache_log ${d}/cache.log`, 'cache_store_log none', `coredump_dir ${d}`, 'cache_mem 8 MB', 'client_idle_pconn_timeout 300 seconds', ''].join('\n'),
    );
    run(['run', '-d', '--aid', 'sq', '--', SQUID, '-N', '-f', join(d, 'squid.conf')]);
    try {
      await waitFor(() => processes('sq').some((p) => /pinger/.test(p.command)) && listening(port), 20_000, 'squid and its pinger');
      const client = await KeepAlive.open(port);
      expect(await client.get(`http://127.0.0.1:${originPort}/before`)).toBe('origin /before 1\n');
      run(['snapshot', 'sq', '-o', join(dir, 'sq.snap')]);
      expect(sb.run(['inspect', join(dir, 'sq.snap')]).stdout).toMatch(/RAW\s+raw IPv4 ICMP socket[\s\S]*RAW\s+raw IPv6 ICMPv6 socket/);
      run(['restore', join(dir, 'sq.snap')]);
      expect(await client.get(`http://127.0.0.1:${originPort}/after`)).toBe('origin /after 2\n');
      expect(client.connects).toBe(1);
      client.socket.destroy();
      expect(processes('sq').some((p) => /pinger/.test(p.command))).toBe(true);
    } finally {
      sb.run(['stop', 'sq', '-s', 'KILL']);
      origin.close();
      // squid's shared memory (shm_open), which only its clean shutdown
      // removes: not left on the machine.
      await waitFor(() => !sb.aids().includes('sq'), 10_000, 'squid to end').catch(() => undefined);
      for (const f of readdirSync('/dev/shm')) if (f.startsWith('squid-cf__')) rmSync(join('/dev/shm', f), { force: true });
    }
  });

  it.runIf(isRoot && existsSync(VSFTPD))('vsftpd (isolate=YES, its default): an anonymous FTP session carries on through a round trip, a passive transfer after it', async () => {
    // vsftpd clones each session into new PID and IPC namespaces, and its
    // unprivileged half into a new network namespace, through syscall();
    // the preload library refuses them (EPERM) and vsftpd forks instead.
    // Before, the listener crashed on its first session's end.
    const port = more + 2;
    const d = join(dir, 'vsftpd');
    mkdirSync(join(d, 'root', 'pub'), { recursive: true });
    writeFileSync(join(d, 'root', 'pub', 'file.txt'), 'hello over ftp\n');
    chmodSync(join(d, 'root'), 0o555);
    mkdirSync('/var/run/vsftpd/empty', { recursive: true });
    writeFileSync(
      join(d, 'vsftpd.conf'),
      ['listen=YES', 'listen_ipv6=NO', 'listen_address=127.0.0.1', `listen_port=${port}`, 'background=NO', 'anonymous_enable=YES', `anon_root=${join(d, 'root')}`, 'no_anon_password=YES', 'local_enable=NO', 'write_enable=NO', 'secure_chroot_dir=/var/run/vsftpd/empty', `pasv_min_port=${more + 3}`, `pasv_max_port=${more + 4}`, 'xferlog_enable=NO', ''].join('\n'),
    );
    run(['run', '-d', '--aid', 'ftp', '--', VSFTPD, join(d, 'vsftpd.conf')]);
    const client = new PyClient(`import ftplib, io, sys
f = ftplib.FTP()
f.connect("127.0.0.1", ${port}, timeout=20)
print(f.login().split()[0], f.cwd("pub").split()[0], f.nlst(), flush=True)
sys.stdin.readline()
b = io.BytesIO()
f.retrbinary("RETR file.txt", b.write)
print(f.pwd(), b.getvalue().decode(), end="", flush=True)
print(f.quit().split()[0], flush=True)
`);
    try {
      await waitFor(() => client.said.includes('\n'), 10_000, 'the FTP session to log in');
      expect(client.said).toBe("230 250 ['file.txt']\n");
      await waitFor(() => processes('ftp').length === 3, 10_000, 'the listener and the session\'s two processes');
      run(['snapshot', 'ftp', '-o', join(dir, 'ftp.snap')]);
      run(['restore', join(dir, 'ftp.snap')]);
      client.go();
      await waitFor(() => /221\n$/.test(client.said), 20_000, 'the session to go on');
      expect(client.said).toBe("230 250 ['file.txt']\n/pub hello over ftp\n221\n");
      // The session ended; the listener, which looks it up by PID, serves.
      await waitFor(() => processes('ftp').length === 1, 10_000, 'the session to end');
      const again = spawnSync('python3', ['-c', `import ftplib; f = ftplib.FTP(); f.connect("127.0.0.1", ${port}, timeout=20); f.login(); print(f.nlst("pub"))`], { encoding: 'utf8' });
      expect(again.stdout + again.stderr).toBe("['pub/file.txt']\n");
    } finally {
      client.kill();
      sb.run(['stop', 'ftp', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot && existsSync(LIGHTTPD))('lighttpd as Debian configures it (started as root, then www-data, holding the PID file it opened as root): a keep-alive client carries on, and a clone holds its own copy', async () => {
    // Its PID file is in a directory only root may enter, as
    // /run/lighttpd.pid is a file only root may write: no identity of the
    // application may open it again, and every restore was refused. (Its
    // error log it opens as www-data, in a directory of www-data's.)
    const port = more;
    const d = join(dir, 'lighttpd');
    const www = Number(spawnSync('id', ['-u', 'www-data'], { encoding: 'utf8' }).stdout);
    mkdirSync(join(d, 'www'), { recursive: true });
    mkdirSync(join(d, 'root'), { mode: 0o700 });
    mkdirSync(join(d, 'log'));
    chownSync(join(d, 'log'), www, 0);
    writeFileSync(join(d, 'www', 'index.html'), 'lighttpd page\n');
    writeFileSync(
      join(d, 'lighttpd.conf'),
      [
        `server.document-root = "${join(d, 'www')}"`,
        `server.port = ${port}`,
        'server.bind = "127.0.0.1"',
        'server.username = "www-data"',
        'server.groupname = "www-data"',
        `server.pid-file = "${join(d, 'root', 'lighttpd.pid')}"`,
        `server.errorlog = "${join(d, 'log', 'error.log')}"`,
        'server.max-keep-alive-idle = 300',
        'server.modules = ( "mod_staticfile" )',
        'index-file.names = ( "index.html" )',
        '',
      ].join('\n'),
    );
    run(['run', '-d', '--aid', 'lt', '--', LIGHTTPD, '-D', '-f', join(d, 'lighttpd.conf')]);
    try {
      await waitForHttp(port);
      await waitFor(() => identities('lt').get(2)?.Uid === `${www}\t${www}\t${www}\t${www}`, 10_000, 'lighttpd to become www-data');
      const before = identities('lt');
      const client = await KeepAlive.open(port);
      expect(await client.get('/')).toBe('lighttpd page\n');
      run(['snapshot', 'lt', '-o', join(dir, 'lt.snap')]);
      run(['restore', join(dir, 'lt.snap')]);
      expect(await client.get('/')).toBe('lighttpd page\n');
      expect(client.connects).toBe(1);
      client.socket.destroy();
      expect((await httpGet(port)).body).toBe('lighttpd page\n');
      expect(identities('lt')).toEqual(before);
      // Its PID file is the very file it held (its inode), not another.
      const pid = processes('lt')[0].pid;
      const pidFile = join(d, 'root', 'lighttpd.pid');
      const fd = readdirSync(`/proc/${pid}/fd`).find((n) => readlinkSync(`/proc/${pid}/fd/${n}`) === pidFile);
      expect(fd, 'a descriptor of its PID file').toBeDefined();
      expect(statSync(`/proc/${pid}/fd/${fd}`).ino).toBe(statSync(pidFile).ino);

      // A clone on a port of its own, holding its own copy of the PID file.
      // (Its connections closed: the last client's may not be yet.)
      run(['snapshot', 'lt', '--tcp-close', '-o', join(dir, 'lt.snap2')]);
      const rules = join(dir, 'lt.rules');
      writeFileSync(rules, `PORT ${port} ALLOCATE\n`);
      run(['template', 'create', join(dir, 'lt.snap2'), '-o', join(dir, 'lt.template'), '--rules', rules]);
      // The word that its image is our snapshot's is in its signed
      // manifest, not in written/'s records (which keeps the last 512).
      for (const n of readdirSync(join(sb.home, 'written'))) rmSync(join(sb.home, 'written', n), { force: true });
      const [clone] = sb.json<Json[]>(['clone', join(dir, 'lt.template'), '--aid', 'ltc']);
      try {
        const own = clone.ports.find((p: Json) => p.virtual === port && p.mode === 'allocate').system;
        expect((await httpGet(own)).body).toBe('lighttpd page\n');
        expect(identities('ltc')).toEqual(before);
        const clonePid = processes('ltc')[0].pid;
        const copy = readlinkSync(`/proc/${clonePid}/fd/${fd}`);
        expect(copy).not.toBe(pidFile);
        expect(statSync(copy).ino).not.toBe(statSync(pidFile).ino);
        // As an older appshot made templates (template.pb not saying the
        // image's word was checked, re-signed here): its clones get only
        // what their credentials open (review32b L1).
        const part = join(dir, 'lt.template', 'template.pb');
        const { snapshotWordChecked, ...older } = decodeTemplate(readFileSync(part));
        expect(snapshotWordChecked).toBe(true);
        const home = process.env.APPSHOT_HOME;
        process.env.APPSHOT_HOME = sb.home;
        try {
          writeFileSync(part, encodeTemplate(signTemplate({ ...older, signature: Buffer.alloc(0), keyId: '' })));
        } finally {
          process.env.APPSHOT_HOME = home;
        }
        const r = sb.run(['clone', join(dir, 'lt.template'), '--aid', 'ltc2']);
        expect(r.code, r.stderr).toBe(5);
        expect(r.stderr).toMatch(/fd \d+: \S+\/lighttpd\.pid cannot be opened with the credentials of the process or the application's others \(fsuid \d+, fsgid \d+\): EACCES/);
      } finally {
        sb.run(['rm', '-f', 'ltc', 'ltc2']);
      }
    } finally {
      sb.run(['stop', 'lt', '-s', 'KILL']);
    }
  });

  it.runIf(isRoot && existsSync(APACHE2))("apache2 with Debian's modules (mpm_event; workers as www-data holding the error log root opened in a directory only root and adm may enter): a keep-alive client carries on", async () => {
    // The workers' error log was opened by the root master in a 0750
    // root:adm directory, as /var/log/apache2 is: the restore's look at
    // it as the application's root failed (EINVAL) and every apache2 was
    // refused.
    const port = more + 1;
    const d = join(dir, 'apache2');
    mkdirSync(join(d, 'www'), { recursive: true });
    mkdirSync(join(d, 'run'));
    mkdirSync(join(d, 'log'), { mode: 0o750 });
    chownSync(join(d, 'log'), 0, Number(spawnSync('getent', ['group', 'adm'], { encoding: 'utf8' }).stdout.split(':')[2]));
    writeFileSync(join(d, 'www', 'index.html'), 'apache2 page\n');
    writeFileSync(
      join(d, 'apache2.conf'),
      [
        'ServerRoot "/etc/apache2"',
        `DefaultRuntimeDir ${join(d, 'run')}`,
        `PidFile ${join(d, 'run', 'apache2.pid')}`,
        'KeepAlive On',
        'KeepAliveTimeout 300',
        'User www-data',
        'Group www-data',
        `ErrorLog ${join(d, 'log', 'error.log')}`,
        'LogLevel warn',
        'IncludeOptional mods-enabled/*.load',
        'IncludeOptional mods-enabled/*.conf',
        `Listen 127.0.0.1:${port}`,
        'ServerName localhost',
        `DocumentRoot ${join(d, 'www')}`,
        `<Directory ${join(d, 'www')}>`,
        '  Require all granted',
        '</Directory>',
        '',
      ].join('\n'),
    );
    run(['run', '-d', '--aid', 'ap2', '--', APACHE2, '-f', join(d, 'apache2.conf'), '-D', 'FOREGROUND']);
    try {
      await waitForHttp(port);
      await waitFor(() => processes('ap2').length >= 3, 10_000, 'the master and its workers');
      const before = identities('ap2');
      expect([...before.values()].filter((i) => i.Uid.split('\t')[0] !== '0').length, 'workers not root').toBeGreaterThanOrEqual(2);
      const client = await KeepAlive.open(port);
      expect(await client.get('/')).toBe('apache2 page\n');
      run(['snapshot', 'ap2', '-o', join(dir, 'ap2.snap')]);
      run(['restore', join(dir, 'ap2.snap')]);
      expect(await client.get('/')).toBe('apache2 page\n');
      expect(client.connects).toBe(1);
      client.socket.destroy();
      expect((await httpGet(port)).body).toBe('apache2 page\n');
      expect(identities('ap2')).toEqual(before);
    } finally {
      sb.run(['stop', 'ap2', '-s', 'KILL']);
    }
  });
});

// MariaDB 10.11 from Debian: InnoDB's asynchronous I/O through an io_uring
// (liburing), which a snapshot once refused (resources/iouring.ts). A
// private server (its own data directory and socket, no network), a client
// connected across the snapshot and restore (its connection held by the
// keeper), and the restored ring seen serving InnoDB's writes after.
const MARIADBD = '/usr/sbin/mariadbd';
describe('MariaDB 10.11 (InnoDB on io_uring)', { timeout: 180_000 }, () => {
  it.runIf(existsSync(MARIADBD) && isRoot)('a client connected across a snapshot and restore; the ring at its counters, serving InnoDB after', async () => {
    const data = join(dir, 'mariadb');
    const sock = join(data, 'sock');
    const install = spawnSync('mariadb-install-db', ['--no-defaults', '--user=root', `--datadir=${join(data, 'db')}`, '--auth-root-authentication-method=normal', '--skip-test-db'], { encoding: 'utf8', timeout: 120_000 });
    expect(install.status, install.stderr).toBe(0);
    run(['run', '-d', '--aid', 'mdb', '--', MARIADBD, '--no-defaults', '--user=root', `--datadir=${join(data, 'db')}`, `--socket=${sock}`, '--skip-networking', `--pid-file=${join(data, 'pid')}`, `--log-error=${join(data, 'err.log')}`, '--innodb-buffer-pool-size=32M']);
    const sql = (q: string) => spawnSync('mariadb', ['--no-defaults', '-uroot', '-S', sock, '-N', '-e', q], { encoding: 'utf8', timeout: 30_000 });
    await waitFor(() => sql('select 1').status === 0, 60_000, 'MariaDB to answer');
    expect(readFileSync(join(data, 'err.log'), 'utf8')).toMatch(/InnoDB: Using io_uring/);
    const server = () => processes('mdb').find((p) => p.command.includes('mariadbd'))!.pid;
    /** The server's ring: its fdinfo counters (SqHead, CqTail, ...). */
    const ring = () => {
      const pid = server();
      const fd = readdirSync(`/proc/${pid}/fd`).find((n) => readlinkSync(`/proc/${pid}/fd/${n}`) === 'anon_inode:[io_uring]');
      expect(fd, 'an io_uring descriptor').toBeDefined();
      const info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
      const get = (k: string) => Number(new RegExp(`^${k}:\\s*(\\d+)`, 'm').exec(info)![1]);
      return { fd, sqHead: get('SqHead'), cqTail: get('CqTail'), cached: get('CachedSqHead') };
    };
    expect(sql("create database t; create table t.k (id int primary key, v varchar(64)) engine=innodb; insert into t.k values (1, 'before')").status).toBe(0);
    // A client session kept open: its answers are read as they come.
    const client = spawn('mariadb', ['--no-defaults', '-uroot', '-S', sock, '-N', '-n', 't']);
    let answers = '';
    client.stdout.on('data', (b: Buffer) => (answers += b.toString()));
    client.stdin.write("select 'c1', v from k where id = 1;\n");
    await waitFor(() => /c1\tbefore/.test(answers), 20_000, 'the client\'s first answer');
    const before = ring();
    run(['snapshot', 'mdb', '-o', `${data}.snap`]);
    // The ring as the image holds it: InnoDB may have written meanwhile.
    const held = /(\d+)\s+IO_URING\s+io_uring (\d+)\/(\d+) entries, (\d+) SQEs consumed, 0 queued, 0 CQEs not reaped/.exec(sb.run(['inspect', `${data}.snap`]).stdout);
    expect(held, 'the ring in the image').not.toBeNull();
    expect(held![1]).toBe(before.fd);
    const consumed = Number(held![4]);
    expect(consumed).toBeGreaterThanOrEqual(before.sqHead);
    run(['restore', `${data}.snap`]);
    // Its counters where they were (or moved on by InnoDB since), the
    // kernel's and the mapping's one.
    const after = ring();
    expect(after.fd).toBe(before.fd);
    expect(after.sqHead).toBeGreaterThanOrEqual(consumed);
    expect(after.cached).toBeGreaterThanOrEqual(consumed);
    client.stdin.write("insert into k values (2, 'across'); select 'c2', count(*), max(v) from k;\n");
    await waitFor(() => /c2\t2\tbefore/.test(answers), 20_000, 'the client\'s answer after the restore');
    // Writes enough pages that InnoDB flushes them through the ring.
    expect(sql("use t; create table big (id int primary key auto_increment, pad char(200)) engine=innodb; insert into big (pad) select repeat('x', 200) from seq_1_to_20000; set global innodb_max_dirty_pages_pct = 0; set global innodb_max_dirty_pages_pct_lwm = 0").status).toBe(0);
    await waitFor(() => ring().sqHead > after.sqHead + 50, 60_000, 'InnoDB to write through the restored ring');
    expect(sql('select count(*) from t.big').stdout.trim()).toBe('20000');
    client.stdin.end();
    run(['stop', 'mdb', '-t', '30']);
    expect(readFileSync(join(data, 'err.log'), 'utf8')).not.toMatch(/\[ERROR\]/);
    run(['rm', '-f', 'mdb']);
  });
});
