/**
 * Round trips through snapshot and restore on real programs that check
 * their own state and print a verdict, and restores that must fail
 * cleanly. The fixture (snapfix.c) goes on checking itself after every
 * restore: its counter, threads, shared memory, SysV objects, signals, file
 * offsets and listening socket.
 */
import { createRequire } from 'node:module';
import { spawn, spawnSync } from 'node:child_process';
import { appendFileSync, copyFileSync, cpSync, existsSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadImageChain } from '../src/restore/driver.js';
import { prepareChain, preparedRuns } from '../src/restore/prepared.js';
import { inheritedCopyRuns } from '../src/resources/memory.js';
import { resolveProcess } from '../src/snapshot/parent.js';
import { alive, asNobody, command, fixture, processesWithArgument, root, Sandbox, stoppedAt, strayIpcIds, systemIpcIds, waitFor, tcpExchange } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-restore-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

const logOf = (aid: string) => {
  try {
    return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
  } catch {
    return '';
  }
};
const lastCheck = (aid: string) => Math.max(0, ...[...logOf(aid).matchAll(/^CHECK (\d+)$/gm)].map((m) => Number(m[1])));

async function checksPass(aid: string, n = 12): Promise<void> {
  const from = lastCheck(aid);
  await waitFor(() => lastCheck(aid) >= from + n || /FAIL/.test(logOf(aid)), 15_000, `${n} more self-checks of ${aid}`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
}

function start(aid: string, args: string[]): void {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...args]);
  if (r.code !== 0) throw new Error(r.stderr);
}

function pidOf(aid: string, vpid: number): number {
  return sb.json<Json>(['ps', aid])[0].processes.find((p: Json) => p.vpid === vpid).pid;
}

function snapshot(aid: string, name: string, extra: string[] = []): string {
  const dest = join(out, name);
  const r = sb.run(['snapshot', aid, '-o', dest, ...extra]);
  if (r.code !== 0) throw new Error(`snapshot failed: ${r.stderr}`);
  return dest;
}

function restore(image: string, extra: string[] = []): Json {
  const r = sb.run(['restore', image, '--json', ...extra]);
  if (r.code !== 0) throw new Error(`restore failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

const hello = (port: number) => tcpExchange(port);

describe('snapshot → restore of a program with one of each resource', () => {
  const aid = 'rt';
  let port = 0;

  it('continues where it was: counter, threads, memory, SysV, signals, files', async () => {
    start(aid, [fixture('snapfix'), '0', '8']);
    await waitFor(() => lastCheck(aid) >= 12, 10_000);
    port = Number(/READY port=(\d+)/.exec(logOf(aid))![1]);
    const before = lastCheck(aid);
    const image = snapshot(aid, 'rt1');
    expect(sb.aids()).not.toContain(aid);
    // Its log waits for the restore under the same AID, which appends to it.
    const carried = readFileSync(join(sb.home, 'logs', aid), 'utf8');
    const r = restore(image);
    expect(r).toMatchObject({ aid, processes: 2, threads: 5 });
    await checksPass(aid);
    expect(logOf(aid).startsWith(carried)).toBe(true);
    // What the restored application writes goes on from the snapshot's
    // count, not from 1: the first check after the restore is the one
    // after the last the log had when it was frozen (how many ran
    // between reading `before` and the freeze depends on the machine's
    // load, so that is not the bound).
    const frozenAt = Math.max(...[...carried.matchAll(/^CHECK (\d+)$/gm)].map((m) => Number(m[1])));
    expect(frozenAt).toBeGreaterThanOrEqual(before);
    const resumed = Number(/^CHECK (\d+)$/m.exec(logOf(aid).slice(carried.length))![1]);
    expect(resumed).toBe(frozenAt + 1);
    const ps = sb.json<Json>(['ps', aid])[0].processes;
    expect(ps.map((p: Json) => p.vpid).sort()).toEqual([1, 2, 3]);
    expect(ps.find((p: Json) => p.vpid === 2).threads).toBe(4);
    // Parent and child share their stdout's open file description again.
    const native = createRequire(import.meta.url)(join(root, 'build', 'Release', 'appshot.node'));
    expect(native.sameDescription(pidOf(aid, 2), 1, pidOf(aid, 3), 1)).toBe(true);
    expect(native.sameDescription(pidOf(aid, 2), 1, pidOf(aid, 2), 2)).toBe(true);
    // Its name and command line are its own, not the seed's it was made from.
    expect(ps.find((p: Json) => p.vpid === 2).command).toBe(`${fixture('snapfix')} 0 8`);
    expect(readFileSync(`/proc/${pidOf(aid, 2)}/comm`, 'utf8').trim()).toBe('snapfix');
  });

  it('accepts connections on its listening socket again', async () => {
    expect(await hello(port)).toBe('hello\n');
  });

  it('pthread_kill, raise and the SysV objects work through the same ids', async () => {
    process.kill(pidOf(aid, 2), 'SIGHUP');
    await waitFor(() => /EXERCISED/.test(logOf(aid)) || /FAIL/.test(logOf(aid)), 5000, 'the exercise');
    expect(logOf(aid)).not.toMatch(/FAIL/);
    await checksPass(aid, 3);
  });

  it('delivers the data that was in flight in the pipe between the processes', async () => {
    process.kill(pidOf(aid, 3), 'SIGUSR1');
    await waitFor(() => /CHILD GOT/.test(logOf(aid)), 5000, 'the child to read');
    expect(logOf(aid)).toMatch(/^CHILD GOT in-flight-data$/m);
  });

  it('survives snapshot → restore five times in a row (eager and --lazy), and stays a normal application', async () => {
    for (let i = 0; i < 5; i++) {
      const r = restore(snapshot(aid, `rt-round-${i}`), i % 2 ? ['--lazy'] : []);
      expect(r.lazy).toBe(i % 2 === 1);
      await checksPass(aid, 3);
    }
    expect(await hello(port)).toBe('hello\n');
    await checksPass(aid, 10);
    // Incremental on top of a restored app, then restored.
    snapshot(aid, 'rt-base', ['--leave-running']);
    const incr = snapshot(aid, 'rt-incr');
    expect(sb.json<Json>(['inspect', incr]).parent.path).toBe(join(out, 'rt-base'));
    restore(incr);
    await checksPass(aid);
    // What serve works out ahead of a resume (prepared.ts) is what the
    // restore works out itself from the same chain: every inherited page's
    // copy, VMA by VMA, for every process. (Read here, in this process:
    // the sandbox's keys sign the images.)
    const home = process.env.APPSHOT_HOME;
    process.env.APPSHOT_HOME = sb.home;
    const chain = await loadImageChain(incr);
    try {
      expect(chain.length).toBe(2);
      prepareChain(chain);
      const prepared = preparedRuns(chain)!;
      expect(prepared).toBeDefined();
      const images = chain.map((l) => l.image);
      let compared = 0;
      for (const p of chain[0].image.processes) {
        const inherited = resolveProcess(images, p.vpid);
        for (const v of p.vmas.filter((x) => x.pages?.fromParent.length)) {
          expect(prepared(p.vpid, v)).toEqual(inheritedCopyRuns(v, inherited));
          compared++;
        }
      }
      expect(compared).toBeGreaterThan(0);
      // Another reading of the same chain is other objects: not prepared.
      const again = await loadImageChain(incr);
      expect(preparedRuns(again)).toBeUndefined();
      for (const l of again) l.dispose();
    } finally {
      for (const l of chain) l.dispose();
      if (home === undefined) delete process.env.APPSHOT_HOME;
      else process.env.APPSHOT_HOME = home;
    }
  });

  it('restores a --pre-copy image: memory copied while running, the rest frozen', async () => {
    const main = pidOf(aid, 2);
    process.kill(main, 'SIGUSR1'); // it rewrites heap pages meanwhile
    const r = sb.run(['snapshot', aid, '-o', join(out, 'rt-pre'), '--pre-copy', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.preCopyFrozenMs).toBeGreaterThan(0);
    // Most memory comes from the copy made while it ran (base/).
    expect(result.pagesFromParent).toBeGreaterThan(result.pages);
    expect(sb.json<Json>(['inspect', join(out, 'rt-pre')]).parent.path).toBe('base');
    // Both page files written here and unchanged since (src/image/written.ts):
    // the base's too, though it was renamed into place after it was named.
    expect(restore(join(out, 'rt-pre')).pagesChecked).toBe(false);
    await checksPass(aid);
    expect(await hello(port)).toBe('hello\n');
  });
});

describe('a program that is always receiving a signal', () => {
  it('is snapshotted and restored whatever signal is pending, and its timer goes on', async () => {
    start('ticker', [fixture('ticker')]);
    const ticks = () => Math.max(0, ...[...logOf('ticker').matchAll(/^TICKS (\d+)$/gm)].map((m) => Number(m[1])));
    await waitFor(() => ticks() >= 200, 10_000, 'ticks');
    for (let i = 0; i < 3; i++) snapshot('ticker', `ticker-live-${i}`, ['--leave-running']);
    restore(snapshot('ticker', 'ticker', ['--full']));
    const after = ticks();
    await waitFor(() => ticks() >= after + 300, 10_000, 'ticks after restore');
  });
});

describe('memory that dirty tracking must not get wrong', () => {
  it('restores a dropped private file page and a sparse region as they are', async () => {
    start('madv', [fixture('madvfix')]);
    await waitFor(() => lastCheck('madv') >= 2, 10_000);
    const file = /READY (\S+)/.exec(logOf('madv'))![1];
    snapshot('madv', 'madv-base', ['--leave-running']); // arms tracking
    // Markers that tracking leaves in untouched slots are not pages: a full
    // image of the sparse region stays small.
    const full = sb.json<Json>(['snapshot', 'madv', '-o', join(out, 'madv-full'), '--leave-running', '--full']);
    expect(full.pages).toBeLessThan(1000);
    process.kill(pidOf('madv', 2), 'SIGUSR1');
    await waitFor(() => /DROPPED/.test(logOf('madv')), 5000, 'the page to be dropped');
    restore(snapshot('madv', 'madv-incr'));
    await checksPass('madv', 5);
    rmSync(file, { force: true });
  });
});

describe('a process with a child it has not waited for', () => {
  it('is snapshotted and restored with the zombie, still there for its parent to reap (kinds.test.ts reaps them)', async () => {
    start('zombie', ['sh', '-c', 'sleep 0.1 & exec sleep 300']);
    await waitFor(() => sb.json<Json>(['ps', 'zombie'])[0].processes.some((p: Json) => p.state === 'Z'), 5000, 'a zombie');
    restore(snapshot('zombie', 'zombie'));
    const ps = sb.json<Json>(['ps', 'zombie'])[0].processes;
    expect(ps.map((p: Json) => [p.vpid, p.state === 'Z'])).toEqual([
      [1, false],
      [2, false],
      [3, true],
    ]);
  });
});

describe('a process stopped by job control with a signal pending', () => {
  it('comes back stopped, and when continued its pause() returns to take the signal', async () => {
    start('stopped', [fixture('waiter')]);
    await waitFor(() => /READY/.test(logOf('stopped')), 5000);
    const before = pidOf('stopped', 2);
    process.kill(before, 'SIGSTOP');
    // Stopped before the SIGHUP is sent: both pending at once, the kernel
    // takes the lower-numbered SIGHUP first, builds its handler's frame and
    // only then stops at the library's handler entry, before the stub
    // raised its mark, where the snapshot rightly refuses a job-control
    // stop (seen in ci-46b on a loaded machine).
    await waitFor(() => readFileSync(`/proc/${before}/stat`, 'utf8').split(') ')[1][0] === 'T', 5000, 'it to stop');
    process.kill(before, 'SIGHUP');
    restore(snapshot('stopped', 'stopped'));
    const pid = pidOf('stopped', 2);
    await waitFor(() => readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0] === 'T', 5000, 'it to be stopped');
    expect(logOf('stopped')).not.toMatch(/HUP/);
    process.kill(pid, 'SIGCONT');
    // The kernel would have failed pause() with EINTR for the handler:
    // restarted instead, it would wait for ever.
    await waitFor(() => /^HUP$/m.test(logOf('stopped')), 5000, 'the handler to run and pause() to return');
  });
});

describe('a double-forking daemon', () => {
  it('comes back in its own session and group, named after a process that is gone', async () => {
    start('daemon2', [fixture('daemon2')]);
    const daemonChecks = () => (logOf('daemon2').match(/^DAEMON \d+ CHECK \d+$/gm) ?? []).length;
    await waitFor(() => daemonChecks() >= 2, 10_000, 'the daemon');
    const image = snapshot('daemon2', 'daemon2');
    const [, daemon] = sb.json<Json>(['inspect', image]).processes;
    expect(daemon).toMatchObject({ vppid: 1 });
    expect(daemon.vsid).not.toBe(daemon.vpid);
    // Restored by the resident engine, which lives on after the restore
    // (its tracees are let go only by what it does, not by its exit).
    sb.ok(['engine', 'start']);
    restore(image);
    const before = daemonChecks();
    await waitFor(() => daemonChecks() >= before + 5 || /FAIL/.test(logOf('daemon2')), 10_000, 'the restored daemon');
    expect(logOf('daemon2')).not.toMatch(/FAIL/);
    expect(logOf('daemon2')).toContain(`DAEMON ${daemon.vsid} CHECK`);
    // No process of it is still traced: the session's placeholder leader,
    // killed once the daemon was forked from it, was, a zombie its parent
    // (init) could not reap while the engine held its exit, and the
    // application never ended (stop gave up after 30 s).
    for (const p of sb.json<Json>(['ps', 'daemon2'])[0].processes) {
      let status = '';
      try {
        status = readFileSync(`/proc/${p.pid}/status`, 'utf8');
      } catch {
        continue; // reaped meanwhile
      }
      expect(status, `process ${p.vpid} (${p.pid})`).toMatch(/^TracerPid:\s+0$/m);
    }
    const stop = sb.run(['stop', 'daemon2', '--signal', 'KILL']);
    expect(stop.code, stop.stderr).toBe(0);
    expect(sb.aids()).not.toContain('daemon2');
  });
});

describe('two restores of one image at once', () => {
  it('run independently under two AIDs with their own ids', async () => {
    start('twin', [fixture('snapfix'), '-1', '2']);
    await waitFor(() => lastCheck('twin') >= 3, 10_000);
    const image = snapshot('twin', 'twin', ['--leave-running']);
    // The original keeps its system PIDs and IPC ids: the copies get new ones.
    restore(image, ['--aid', 'twin-a']);
    restore(image, ['--aid', 'twin-b']);
    await Promise.all(['twin', 'twin-a', 'twin-b'].map((a) => checksPass(a, 5)));
    const tables = ['twin', 'twin-a', 'twin-b'].map((a) => sb.json<Json>(['table', a]).tables);
    const sems = tables.map((t) => t.semid[0]);
    expect(new Set(sems.map((s: Json) => s.virtual)).size).toBe(1);
    expect(new Set(sems.map((s: Json) => s.system)).size).toBe(3);
    const mains = tables.map((t) => t.pid.find((e: Json) => e.virtual === 2).system);
    expect(new Set(mains).size).toBe(3);
    // One copy's SysV exercise does not disturb the others' checks.
    process.kill(pidOf('twin-a', 2), 'SIGHUP');
    await waitFor(() => /EXERCISED/.test(logOf('twin-a')), 5000);
    await Promise.all(['twin', 'twin-a', 'twin-b'].map((a) => checksPass(a, 3)));
  });
});

describe('restores that fail leave nothing behind', () => {
  let image = '';

  const nothingLeft = async (aid: string, ipcBefore: ReturnType<typeof systemIpcIds>) => {
    await waitFor(() => !sb.aids().includes(aid), 5000, 'the registration to go');
    expect(sb.shmFiles().some((f) => f.endsWith(`-${aid}`))).toBe(false);
    expect(strayIpcIds(ipcBefore)).toEqual([]);
  };

  it('refuses a truncated image and one with a flipped byte, naming the part', async () => {
    start('bad', [fixture('snapfix'), '-1', '2']);
    await waitFor(() => lastCheck('bad') >= 2, 10_000);
    image = snapshot('bad', 'bad');
    const ipc = systemIpcIds();
    const truncated = join(out, 'bad-truncated');
    rmSync(truncated, { recursive: true, force: true });
    mkdirSync(truncated);
    for (const f of ['manifest.pb', 'image.pb', 'pages.img']) copyFileSync(join(image, f), join(truncated, f));
    truncateSync(join(truncated, 'pages.img'), 8192);
    const r1 = sb.run(['restore', truncated]);
    expect(r1.code).toBe(1);
    expect(r1.stderr).toMatch(/corrupt image: pages.img is 8192 bytes, expected \d+ \(truncated\?\)/);
    const flipped = join(out, 'bad-flipped');
    cpSync(image, flipped, { recursive: true });
    const pages = readFileSync(join(flipped, 'pages.img'));
    pages[pages.length >> 1] ^= 0x40;
    writeFileSync(join(flipped, 'pages.img'), pages);
    const r2 = sb.run(['restore', flipped]);
    expect(r2.code).toBe(1);
    expect(r2.stderr).toContain('corrupt image: checksum of pages.img does not match');
    const r3 = sb.run(['restore', join(out, 'no-such-image')]);
    expect(r3.code).toBe(3);
    await nothingLeft('bad', ipc);
  });

  it('refuses an image whose mapped file changed on this node, naming it', async () => {
    const exe = join(out, 'snapfix-copy');
    copyFileSync(fixture('snapfix'), exe);
    start('changed', [exe, '-1', '1']);
    await waitFor(() => lastCheck('changed') >= 2, 10_000);
    const img = snapshot('changed', 'changed');
    appendFileSync(exe, 'x');
    const ipc = systemIpcIds();
    const r = sb.run(['restore', img]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${exe} differs from the one the image mapped`);
    await nothingLeft('changed', ipc);
  });

  it('refuses an image whose mapped file changed under the name it is mapped by, though its first name (a hard link held open) is unchanged', async () => {
    // The file is recorded once, under the name first met (the held
    // descriptor's); the mapping is made by its own name, which is the
    // one to check.
    const dir = join(out, 'hardlinked-files');
    mkdirSync(dir, { recursive: true });
    const held = join(dir, 'held');
    const mappedName = join(dir, 'mapped');
    writeFileSync(held, Buffer.alloc(4096, 'p'));
    linkSync(held, mappedName);
    start('hardlinked', ['/bin/sh', '-c', `exec 3<${held}; exec ${fixture('privmap')} ${mappedName}`]);
    await checksPass('hardlinked', 2);
    const img = snapshot('hardlinked', 'hardlinked');
    await waitFor(() => !sb.aids().includes('hardlinked'), 10_000, 'hardlinked to end');
    // Another file of the same size under the mapped name only.
    rmSync(mappedName);
    writeFileSync(mappedName, Buffer.alloc(4096, 'q'));
    const ipc = systemIpcIds();
    const r = sb.run(['restore', img]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain(`${mappedName} differs from the one the image mapped (its contents changed)`);
    await nothingLeft('hardlinked', ipc);
  });

  it('brings back /dev/zero mapped private (anonymous memory the old way): a device the image maps is taken for a device, not refused as a changed file', async () => {
    // As nobody where we are root: the check then reaches the name as the
    // process would (restore/verify.ts).
    start('devzero', [...(process.getuid?.() === 0 ? asNobody : []), fixture('devzero')]);
    await checksPass('devzero', 2);
    const img = snapshot('devzero', 'devzero');
    await waitFor(() => !sb.aids().includes('devzero'), 10_000, 'devzero to end');
    restore(img);
    await checksPass('devzero', 3);
    expect(sb.run(['stop', 'devzero', '-s', 'KILL']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('devzero'), 10_000, 'devzero to stop');
  });

  it('refuses an AID that is taken, and a port that is taken, leaving the running one alone', async () => {
    start('taken', [fixture('snapfix'), '0', '1']);
    await waitFor(() => lastCheck('taken') >= 2, 10_000);
    const img = snapshot('taken', 'taken', ['--leave-running']);
    const ipc = systemIpcIds();
    const r = sb.run(['restore', img]);
    expect(r.code).toBe(4);
    expect(r.stderr).toContain("'taken'");
    // Under another AID it gets as far as the listening socket, which the
    // original still holds: everything made up to there is undone.
    const r2 = sb.run(['restore', img, '--aid', 'taken-2']);
    expect(r2.code).toBe(4);
    expect(r2.stderr).toMatch(/listening on 127\.0\.0\.1:\d+: Address already in use/);
    await nothingLeft('taken-2', ipc);
    expect(alive(pidOf('taken', 2))).toBe(true);
    await checksPass('taken', 3);
  });
});

describe('an application in a time namespace of its own (unshare --time)', () => {
  // unshare --time, and the namespace a restore makes, need CAP_SYS_ADMIN
  // and a kernel with time namespaces (5.6).
  const capEff = BigInt(`0x${/^CapEff:\s+([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]}`);
  const mayMake = ((capEff >> 21n) & 1n) === 1n && existsSync('/proc/self/timens_offsets');
  const OFFSET = '100000';
  /** timens run as `aid` in a namespace whose clocks are OFFSET seconds
   * ahead of the node's, by `appshot run` started there (`wrap`: what
   * runs appshot inside it). */
  async function startInNamespace(aid: string, wrap: string[] = []): Promise<void> {
    const r = spawnSync('unshare', ['--time', '--fork', '--monotonic', OFFSET, '--boottime', OFFSET, ...wrap, command, 'run', '-d', '--aid', aid, '--', fixture('timens')], { env: sb.env, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    await checksPass(aid, 3);
    expect(logOf(aid)).toMatch(new RegExp(`^OFFSETS monotonic\\s+${OFFSET}\\s+0;boottime\\s+${OFFSET}\\s+0;$`, 'm'));
  }

  it.skipIf(!mayMake)('comes back with its clock offsets: restored --lazy beside it, and from a snapshot that ends it', async () => {
    await startInNamespace('tns');
    const beside = snapshot('tns', 'tns-running', ['--leave-running']);
    expect(sb.run(['inspect', beside]).stdout).toMatch(new RegExp(`^process 2 \\(timens\\): .*, time namespace: monotonic \\+${OFFSET} s, boottime \\+${OFFSET} s$`, 'm'));
    restore(beside, ['--aid', 'tns2', '--lazy']);
    await checksPass('tns2', 3);
    await checksPass('tns', 3);
    restore(snapshot('tns', 'tns-ended'));
    await checksPass('tns', 3);
    // A command run in it reads its clocks, and does not keep it from
    // being snapshotted (one namespace per application).
    const inside = sb.start(['exec', 'tns', '--', 'sh', '-c', 'cat /proc/self/timens_offsets; exec sleep 60 </dev/null >/dev/null 2>&1']);
    await inside.line(new RegExp(`^monotonic\\s+${OFFSET}\\s+0$`));
    // Its standard descriptors are exec's pipes to us (unix sockets to a
    // process outside, which --leave-running refuses) until the shell has
    // put /dev/null in their place: wait for that, not for the line alone.
    await waitFor(() => {
      const p = sb.json<Json>(['ps', 'tns'])[0].processes.find((q: Json) => q.vpid === 3);
      try {
        return p !== undefined && [0, 1, 2].every((fd) => readlinkSync(`/proc/${p.pid}/fd/${fd}`) === '/dev/null');
      } catch {
        return false;
      }
    }, 10_000, 'the exec\'d command to have /dev/null as its standard descriptors');
    snapshot('tns', 'tns-with-exec', ['--leave-running']);
    inside.child.kill('SIGTERM');
    await inside.exited;
    // SIGHUP: the clocks read once more, by a handler.
    process.kill(pidOf('tns', 2), 'SIGHUP');
    await waitFor(() => /^EXERCISED$/m.test(logOf('tns')) || /FAIL/.test(logOf('tns')), 10_000, 'tns to read its clocks');
    await checksPass('tns', 3);
    sb.run(['stop', 'tns', '-s', 'KILL']);
    sb.run(['stop', 'tns2', '-s', 'KILL']);
  });

  // The unshare needs CAP_SYS_ADMIN, the writing of the offsets
  // CAP_SYS_TIME (a container may be given the one without the other).
  it.skipIf(!mayMake).each([['sys_admin', 'CAP_SYS_ADMIN'], ['sys_time', 'CAP_SYS_TIME']])('is refused by name, nothing made, where the restore may not make the namespace (no %s)', async (cap, name) => {
    // Neither the application nor the restore holds the capability: the
    // credentials are no reason to refuse, the namespace is. Without an
    // engine, which would restore with its own capabilities.
    const drop = ['setpriv', `--bounding-set=-${cap}`, `--inh-caps=-${cap}`];
    const aid = `tnsu-${cap}`;
    await startInNamespace(aid, drop);
    const image = snapshot(aid, aid, ['--leave-running']);
    const ipc = systemIpcIds();
    const r = spawnSync(drop[0], [...drop.slice(1), command, 'restore', image, '--aid', `${aid}-2`], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8' });
    expect(r.status).toBe(5);
    expect(r.stderr).toBe(
      `appshot: cannot restore ${image}: process 2 (timens) ran in a time namespace whose clocks differ from this restore's (CLOCK_MONOTONIC +${OFFSET} s, CLOCK_BOOTTIME +${OFFSET} s): making one with its offsets needs CAP_SYS_ADMIN and CAP_SYS_TIME (this restore lacks ${name})\n`,
    );
    expect(sb.aids()).not.toContain(`${aid}-2`);
    expect(sb.shmFiles().some((f) => f.includes(`-${aid}-2-`))).toBe(false);
    expect(strayIpcIds(ipc)).toEqual([]);
    await checksPass(aid, 3);
    sb.run(['stop', aid, '-s', 'KILL']);
  });
});

// glibc puts a thread's descriptor, its cached TID among it, at the top of
// a stack the program gives it (pthread_attr_setstack); in MAP_SHARED
// memory, the restore does not write the TID there (the memory is another
// process's too). Such an image is a program's ordinary one, which the
// snapshot takes: the restore called it corrupt.
describe('a thread on a stack of its own in shared memory (pthread_attr_setstack)', () => {
  it("restores it, saying glibc's cached TID there is not made the new one, and the thread goes on", async () => {
    const aid = 'sharedstack';
    start(aid, [fixture('sharedstack')]);
    await waitFor(() => /^(READY desc=in-shared-stack|FAIL.*)$/m.test(logOf(aid)), 10_000, 'the thread to run on its shared stack');
    expect(logOf(aid)).not.toMatch(/FAIL/);
    const image = snapshot(aid, 'sharedstack');
    const r = restore(image);
    expect(r.notKept.join('\n')).toMatch(/^process 2: thread \d+: glibc's cached TID at 0x[0-9a-f]+ is in shared memory/m);
    await waitFor(() => /^(SHAREDSTACK OK|FAIL.*)$/m.test(logOf(aid)), 15_000, 'the verdict of sharedstack');
    expect(/^(SHAREDSTACK OK|FAIL.*)$/m.exec(logOf(aid))![0]).toBe('SHAREDSTACK OK');
    sb.run(['stop', aid, '-s', 'KILL']);
  });
});

// A thread's entry in the PID table goes when the thread ends (the preload
// library's thread-exit hook). For a thread a restore brought back, that
// hook once dropped the entry of the TID it had on the node before the
// snapshot: its own entry stayed for good (review33 M4).
describe('threads that end after a restore', () => {
  it('leave no entry in the PID table, eager and --lazy', async () => {
    const aid = 'threadgone';
    const pidEntries = () => sb.json<Json>(['table', aid]).tables.pid.map((e: Json) => e.virtual).sort((a: number, b: number) => a - b);
    for (const lazy of [false, true]) {
      start(aid, [fixture('threadgone'), '6']);
      await waitFor(() => /^(READY tids=[\d,]+|FAIL.*)$/m.test(logOf(aid)), 10_000, 'the threads to run');
      const tids = /^READY tids=([\d,]+)$/m.exec(logOf(aid))![1].split(',').map(Number);
      expect(pidEntries()).toEqual([1, 2, ...tids].sort((a, b) => a - b));
      const image = snapshot(aid, `threadgone${lazy ? '-lazy' : ''}`);
      await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
      restore(image, lazy ? ['--lazy'] : []);
      process.kill(pidOf(aid, 2), 'SIGHUP');
      await waitFor(() => /^(ENDED|FAIL.*)$/m.test(logOf(aid)), 10_000, 'the threads to end');
      expect(logOf(aid)).not.toMatch(/FAIL/);
      await waitFor(() => pidEntries().length === 2, 10_000, "the ended threads' entries to go");
      expect(pidEntries()).toEqual([1, 2]);
      sb.run(['rm', '-f', aid]);
      await waitFor(() => !sb.allAids().includes(aid), 10_000, `${aid} to be removed`);
    }
  });
});

// The kernel records who is at the other end of a unix connection when it
// is made (SO_PEERCRED, SO_PEERGROUPS); a server decides by it what its
// peer may do. Made by the restorer, every connection inside the
// application named root after a root restore: a child that had made
// itself nobody was then taken for root by its parent (peercred.c says
// what a pair is made of; the fixture checks both processes' ends).
describe.skipIf(process.getuid?.() !== 0)("who made a pipe or a socket, and who is at a unix socket's other end", () => {
  it('a root restore, eager and --lazy, and a clone give each end the peer it had: a child that became nobody is not taken for root', async () => {
    const aid = 'peercred';
    start(aid, [fixture('peercred')]);
    await checksPass(aid, 2);
    restore(snapshot(aid, 'peercred-1'));
    await checksPass(aid, 3);
    restore(snapshot(aid, 'peercred-2'), ['--lazy']);
    await checksPass(aid, 3);
    // A template refuses the child's listener (an abstract name clones
    // could not share): one without it.
    start('peercred-t', [fixture('peercred'), 'no-listener']);
    await checksPass('peercred-t', 2);
    const tpl = join(out, 'peercred.template');
    const made = sb.run(['template', 'create', snapshot('peercred-t', 'peercred-t', ['--leave-running']), '-o', tpl]);
    expect(made.code, made.stderr).toBe(0);
    const cloned = sb.run(['clone', tpl, '--aid', 'peercred-clone']);
    expect(cloned.code, cloned.stderr).toBe(0);
    await checksPass('peercred-clone', 3);
    for (const a of [aid, 'peercred-t', 'peercred-clone']) sb.run(['stop', a, '-s', 'KILL']);
    await waitFor(() => !sb.aids().some((a) => a.startsWith('peercred')), 10_000, 'peercred to stop');
  });

  it("an application run as nobody, restored by root: its pipes and sockets are still nobody's (a second SO_REUSEPORT bind, /proc/self/fd of a pipe)", async () => {
    const aid = 'inodeowner';
    start(aid, [...asNobody, fixture('inodeowner')]);
    await checksPass(aid, 2);
    restore(snapshot(aid, 'inodeowner-1'));
    await checksPass(aid, 3);
    restore(snapshot(aid, 'inodeowner-2'), ['--lazy']);
    await checksPass(aid, 3);
    // A --leave-running image: its TCP connection (to itself) is made
    // again in repair mode, not handed back by the keeper.
    const left = snapshot(aid, 'inodeowner-3', ['--leave-running']);
    sb.run(['stop', aid, '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
    expect(sb.run(['rm', aid]).code).toBe(0);
    restore(left);
    await checksPass(aid, 3);
    sb.run(['stop', aid, '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
  });

  // A connection between two makers is made under a name the kernel
  // picks (autobind), which anyone on the host sees and may connect to:
  // a stranger who filled its queue before the restore's own connect made
  // the restore fail (EAGAIN). Another listener is tried, as peercred.c
  // tries.
  it("a connection whose private listener's queue a stranger fills is made under another name", async () => {
    const aid = 'peercred-flood';
    start(aid, [fixture('peercred')]);
    await checksPass(aid, 2);
    const image = snapshot(aid, 'peercred-flood');
    const stopped = await stoppedAt(sb, ['restore', image], "restore: a unix connection's first listener listens", 'the restore to stop at its listener');
    // The listener's name: an autobound one (@ and five hex digits) a
    // process of this restore holds.
    const restorers = new Set(processesWithArgument(image));
    const parentOf = (pid: string) => {
      try {
        return readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')[1];
      } catch {
        return '0';
      }
    };
    const ofRestore = (pid: string) => {
      for (let at = pid; at !== '0' && at !== '1'; at = parentOf(at)) if (restorers.has(Number(at))) return true;
      return false;
    };
    const held = new Set<string>();
    for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n) && ofRestore(n)))
      for (const fd of (() => {
        try {
          return readdirSync(`/proc/${pid}/fd`);
        } catch {
          return [];
        }
      })()) {
        try {
          held.add(readlinkSync(`/proc/${pid}/fd/${fd}`));
        } catch {
          /* closed meanwhile */
        }
      }
    const names = readFileSync('/proc/net/unix', 'utf8')
      .split('\n')
      .map((l) => l.trim().split(/\s+/))
      .filter((f) => f[3] === '00010000' && /^@[0-9a-f]{5}$/.test(f[7] ?? '') && held.has(`socket:[${f[6]}]`))
      .map((f) => f[7].slice(1));
    expect(names).toHaveLength(1);
    const fill = 'import socket,sys,time\nkept=[]\nwhile True:\n  s=socket.socket(socket.AF_UNIX)\n  s.setblocking(False)\n  try: s.connect(b"\\0"+sys.argv[1].encode())\n  except BlockingIOError: break\n  kept.append(s)\nprint(len(kept),flush=True)\ntime.sleep(60)';
    const stranger = spawn('python3', ['-c', fill, names[0]], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      let said = '';
      stranger.stdout!.on('data', (b: Buffer) => (said += b.toString()));
      await waitFor(() => /\d+\n/.test(said), 10_000, 'the stranger to fill the queue');
      expect(Number(said.trim())).toBeGreaterThan(0);
      const r = await stopped.go();
      expect(r.code, r.stderr).toBe(0);
    } finally {
      stranger.kill('SIGKILL');
    }
    await checksPass(aid, 3);
    sb.run(['stop', aid, '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
  });

  it('an application run as nobody, restored by root: its connections still see nobody', async () => {
    const aid = 'peercred-nobody';
    start(aid, [...asNobody, fixture('peercred')]);
    await checksPass(aid, 2);
    restore(snapshot(aid, 'peercred-nobody'));
    await checksPass(aid, 3);
    sb.run(['stop', aid, '-s', 'KILL']);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
  });
});
