/**
 * Clones are unique where a fork would be, and where the rules say: uniqfix
 * seeds glibc's generator with srandom(time ^ getpid) at start, marks one
 * page MADV_WIPEONFORK ("SECRET") and one MADV_DONTFORK, listens on a port
 * and loads libssl. It is snapshotted, made a template under IDENTITY rules
 * (and another without, to be warned about) and cloned 8 times; each clone reports its next random() values, its
 * marked pages, the hook signals it got and its identity variables. A plain
 * restore of the same snapshot is the same instance going on: it must draw
 * exactly what the original would have and keep its marked pages.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-uniq-'));
const CLONES = 8;
// Beside the ranges other test files listen in (the map: helpers.ts, Sandbox).
const PORT = 26700 + (process.pid % 300);
const HOOKS = join(dir, 'hooks.txt');

interface Report {
  rand: string;
  wiped: string;
  secret: string;
  dontfork: string;
  hooks: string;
  generation: string;
  instance: string;
}

const log = (aid: string) => {
  const path = join(sb.home, 'apps', aid, 'log');
  return existsSync(path) ? readFileSync(path, 'utf8') : '';
};

/** The system PID of the application's fixture process. */
function pidOf(aid: string): number {
  const [app] = sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid]);
  return app.processes.find((p) => !p.init)!.pid;
}

/** Asks `aid`'s uniqfix for a report (SIGUSR1) and returns it. */
async function report(aid: string): Promise<Report> {
  const before = log(aid).split('\n').filter((l) => l.startsWith('REPORT ')).length;
  process.kill(pidOf(aid), 'SIGUSR1');
  let lines: string[] = [];
  await waitFor(() => (lines = log(aid).split('\n').filter((l) => l.startsWith('REPORT '))).length > before, 10_000, `a report from ${aid}`);
  const fields = lines[before].slice('REPORT '.length).split(' ');
  return Object.fromEntries(fields.map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)])) as unknown as Report;
}

let expected = '';
let clones: { aid: string }[] = [];

beforeAll(() => {
  writeFileSync(
    join(dir, 'uniq.rules'),
    [
      'DEFINE <AID> AS PROPERTY application-id',
      `PORT ${PORT} ALLOCATE`,
      'IDENTITY HOOK SIGNAL SIGUSR2',
      `IDENTITY HOOK EXEC "/bin/sh" "-c" "echo <AID> $APPSHOT_INSTANCE >> ${HOOKS}"`,
    ].join('\n'),
  );
});

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

describe('clones are unique', () => {
  it('runs the application, which seeds its generator and marks its pages', async () => {
    const r = sb.run(['run', '-d', '--aid', 'orig', '--', fixture('uniqfix'), String(PORT), 'libssl.so.3']);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => log('orig').includes('READY'), 10_000, 'uniqfix READY');
    expected = /^EXPECT (\S+)$/m.exec(log('orig'))![1];
  });

  it('warns, making a template, about what every clone would share; `template show` lists it', () => {
    const snap = sb.run(['snapshot', 'orig', '-o', join(dir, 'snap')]);
    expect(snap.code, snap.stderr).toBe(0);
    // Rules that keep the generator shared and name no hook, nor the port.
    writeFileSync(join(dir, 'keep.rules'), 'IDENTITY KEEP LIBC\n');
    const keep = sb.run(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'keep.template'), '--rules', join(dir, 'keep.rules')]);
    expect(keep.code, keep.stderr).toBe(0);
    const warned = (what: string) => new RegExp(`warning: every clone will share this: ${what}`);
    expect(keep.stderr).toMatch(warned("glibc's random\\(\\)/rand\\(\\) generator was seeded by the application: every clone would draw the same numbers; remove IDENTITY KEEP LIBC"));
    expect(keep.stderr).toMatch(warned(`a socket listening on TCP port ${PORT}: .*; PORT ${PORT} ALLOCATE gives each clone a port of its own`));
    expect(keep.stderr).toMatch(warned('libssl is loaded: TLS session ticket keys .*; IDENTITY HOOK SIGNAL <sig>'));
    expect(keep.stderr).toMatch(warned("libcrypto is loaded: OpenSSL's random generator state"));

    // The IDENTITY rules see to all of it: nothing to warn about.
    const t = sb.run(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'uniq.template'), '--rules', join(dir, 'uniq.rules')]);
    expect(t.code, t.stderr).toBe(0);
    expect(t.stderr).not.toMatch(/warning/);
    const show = sb.run(['template', 'show', join(dir, 'uniq.template')]);
    expect(show.code, show.stderr).toBe(0);
    expect(show.stdout).toMatch(/handled +glibc's random\(\)\/rand\(\) generator was seeded by the application.*\n +-> reseeded in every clone \(the default\)/);
    expect(show.stdout).toMatch(/handled +libssl is loaded.*\n +-> the IDENTITY hooks \(uniq\.rules:3, 4\) are trusted to renew it/);
    expect(show.stdout).toMatch(/handled +1 mapping marked MADV_WIPEONFORK/);
    expect(show.stdout).toMatch(/recreate +memory +anonymous memory +marked MADV_WIPEONFORK: zero in every clone/);
    expect(show.stdout).toMatch(/recreate +memory +anonymous memory +marked MADV_DONTFORK: absent from every clone/);
    const json = sb.json<{ shared: { what: string; handled: boolean }[] }>(['template', 'show', join(dir, 'keep.template')]);
    expect(json.shared.filter((s) => !s.handled).map((s) => s.what.slice(0, 12))).toEqual(["glibc's rand", 'a socket lis', 'libssl is lo', 'libcrypto is']);
  });

  it(`clones ${CLONES} instances: each draws its own numbers, its wiped page is zero, its dontfork page absent, its hooks ran once`, async () => {
    const r = sb.run(['clone', join(dir, 'uniq.template'), '--aid', 'u', '--count', String(CLONES), '--json']);
    expect(r.code, r.stderr).toBe(0);
    clones = JSON.parse(r.stdout) as { aid: string }[];
    const reports = await Promise.all(clones.map((c) => report(c.aid)));
    const draws = reports.map((x) => x.rand);
    expect(new Set(draws).size, draws.join('\n')).toBe(CLONES);
    expect(draws).not.toContain(expected);
    for (const x of reports) {
      expect(x).toMatchObject({ wiped: '1', secret: '-', dontfork: 'absent', hooks: '1', generation: '1' });
      expect(x.instance).toMatch(/^[0-9a-f]{32}$/);
    }
    expect(new Set(reports.map((x) => x.instance)).size).toBe(CLONES);
    // The EXEC hook ran once in each clone, inside its view (its AID, its
    // identity variable).
    const hookLines = readFileSync(HOOKS, 'utf8').trim().split('\n').sort();
    expect(hookLines).toEqual(clones.map((c, i) => `${c.aid} ${reports[i].instance}`).sort());
    // Once: later draws go on from the clone's own seed, and no hook runs again.
    const again = await Promise.all(clones.map((c) => report(c.aid)));
    for (const [i, x] of again.entries()) expect(x).toMatchObject({ hooks: '1', instance: reports[i].instance });
    expect(new Set(again.map((x) => x.rand)).size).toBe(CLONES);
    expect(readFileSync(HOOKS, 'utf8').trim().split('\n')).toHaveLength(CLONES);
  });

  it.each([
    ['restores', 'orig', []],
    // Lazily too: memory marked MADV_WIPEONFORK is copied all the same, as
    // the kernel marks only anonymous memory.
    ['restores lazily', 'lazy', ['--lazy', '--aid', 'lazy']],
  ])('%s the snapshot as the same instance: the same numbers to come, its marked pages kept with their flags', async (_, aid, args) => {
    // One at a time: the application listens on its port alone.
    for (const other of ['orig', 'lazy'].filter((a) => a !== aid && sb.aids().includes(a))) {
      expect(sb.run(['stop', other, '--signal', 'KILL']).code).toBe(0);
      await waitFor(() => !sb.aids().includes(other), 10_000, `${other} gone`);
    }
    const r = sb.run(['restore', join(dir, 'snap'), ...args]);
    expect(r.code, r.stderr).toBe(0);
    const x = await report(aid);
    expect(x).toEqual({ rand: expected, wiped: '0', secret: 'SECRET', dontfork: 'mapped', hooks: '0', generation: '-', instance: '-' });
    const flags = readFileSync(`/proc/${pidOf(aid)}/smaps`, 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('VmFlags:'))
      .map((l) => l.split(/\s+/));
    expect(flags.filter((f) => f.includes('wf'))).toHaveLength(1);
    expect(flags.filter((f) => f.includes('dc'))).toHaveLength(1);
  });

  it('reseeds again in a clone of a clone, whose generation is 2', async () => {
    const parent = await report('u-1');
    const snap = sb.run(['snapshot', 'u-1', '-o', join(dir, 'snap2'), '--leave-running']);
    expect(snap.code, snap.stderr).toBe(0);
    const t = sb.run(['template', 'create', join(dir, 'snap2'), '-o', join(dir, 'second.template')]);
    expect(t.code, t.stderr).toBe(0);
    const r = sb.run(['clone', join(dir, 'second.template'), '--aid', 'g2', '--count', '2']);
    expect(r.code, r.stderr).toBe(0);
    const next = await report('u-1');
    const grandchildren = await Promise.all(['g2-1', 'g2-2'].map(report));
    expect(new Set([next.rand, ...grandchildren.map((x) => x.rand)]).size).toBe(3);
    for (const x of grandchildren) expect(x).toMatchObject({ generation: '2', wiped: '1', dontfork: 'absent' });
    expect(grandchildren.map((x) => x.instance)).not.toContain(parent.instance);
  });

  it('keeps the generator shared under IDENTITY KEEP LIBC: the clones draw what the template would have', async () => {
    // Its clones share the template's port, which the restored original holds alone.
    expect(sb.run(['stop', 'lazy', '--signal', 'KILL']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('lazy'), 10_000, 'lazy gone');
    const r = sb.run(['clone', join(dir, 'keep.template'), '--aid', 'k', '--count', '2']);
    expect(r.code, r.stderr).toBe(0);
    for (const aid of ['k-1', 'k-2']) expect(await report(aid)).toMatchObject({ rand: expected, wiped: '1', dontfork: 'absent', hooks: '0', generation: '1' });
  });

  it('fails the whole batch when an identity hook fails, leaving nothing behind', () => {
    writeFileSync(join(dir, 'failing.rules'), 'IDENTITY HOOK EXEC "/bin/sh" "-c" "exit 3"\n');
    const t = sb.run(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'failing.template'), '--rules', join(dir, 'failing.rules')]);
    expect(t.code, t.stderr).toBe(0);
    const before = sb.aids().sort();
    const r = sb.run(['clone', join(dir, 'failing.template'), '--aid', 'f', '--count', '2']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/IDENTITY HOOK at failing\.rules:1: \/bin\/sh exited with 3/);
    expect(sb.aids().sort()).toEqual(before);
  });

  it('a failed batch leaves no process, even one the tables never saw (a raw fork)', async () => {
    // The instance runs (uncommitted) when its hook starts it forking with
    // a raw system call, then the hook fails the batch.
    const go = join(dir, 'rawfork-go');
    const r = sb.run(['run', '-d', '--aid', 'rf', '--', '/bin/sh', '-c', `while [ ! -e ${go} ]; do sleep 0.05; done; exec ${fixture('rawfork')}`]);
    expect(r.code, r.stderr).toBe(0);
    expect(sb.run(['snapshot', 'rf', '-o', join(dir, 'rf.snap')]).code).toBe(0);
    writeFileSync(join(dir, 'rf.rules'), `IDENTITY HOOK EXEC "/bin/sh" "-c" "touch ${go}; sleep 1; exit 3"\n`);
    const t = sb.run(['template', 'create', join(dir, 'rf.snap'), '-o', join(dir, 'rf.template'), '--rules', join(dir, 'rf.rules')]);
    expect(t.code, t.stderr).toBe(0);
    const c = sb.run(['clone', join(dir, 'rf.template'), '--aid', 'rfc']);
    expect(c.code).not.toBe(0);
    expect(c.stderr).toMatch(/exited with 3/);
    rmSync(go, { force: true });
    // No process runs the fixture any more, and the AID is free.
    const running = () =>
      readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
        try {
          return readFileSync(`/proc/${p}/cmdline`, 'utf8').startsWith(fixture('rawfork')) && readFileSync(`/proc/${p}/environ`, 'utf8').split('\0').includes('APPSHOT_AID=rfc');
        } catch {
          return false;
        }
      });
    await waitFor(() => running().length === 0, 10_000, 'every rawfork process to be gone');
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes('rfc')), 10_000, 'the instance to be released');
  });
});
