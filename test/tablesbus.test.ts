/**
 * An application that shrinks its table file while appshot reads or
 * writes it (review r363, finding 1). Every process of an application
 * holds the file open read-write, whatever uid it runs as; the engine and
 * the CLI reach it through a shared mapping, where a touch past a shorter
 * file's end is SIGBUS. Checked once a call, the size could change right
 * after: a process (nobody's, under a root engine) that truncated its
 * descriptor in a loop ended the engine within a few `appshot table`
 * reads, and every command of its user with it. Each touch of a table
 * mapping is now a step under a fault guard (addon/src/tablesguard.h):
 * the command fails with one line, the engine lives on.
 *
 * And a native binding given an argument of the wrong type throws, rather
 * than aborting the process that called it (finding 11).
 */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { controlEngine } from '../src/engine/client.js';
import { addon } from '../src/native.js';
import { alive, asNobody, cli, fixture, root, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-tablesbus-'));
let shrinker = 0;
afterAll(async () => {
  if (shrinker && alive(shrinker)) process.kill(shrinker, 'SIGKILL');
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const addonPath = join(root, 'build', 'Release', 'appshot.node');

/** Runs `body` (CommonJS, `a` the addon) in a Node process of its own: a
 * fault or an abort there is seen as its signal, not as the runner's. */
function inNode(body: string, timeout = 120_000): { stdout: string; stderr: string; signal: NodeJS.Signals | null; status: number | null } {
  const script = `const a = require(${JSON.stringify(addonPath)});\nconst fs = require('fs');\n${body}`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout });
  return { stdout: r.stdout, stderr: r.stderr, signal: r.signal, status: r.status };
}

describe('a table file shrunk under the addon', () => {
  it('reads and writes through the mapping fail with an error while a process empties and refills the file', () => {
    // The writer is the fixture an application runs, given the file as
    // its descriptor 3 (APPSHOT_TABLES_FD), here without appshot around
    // it: thousands of calls, each of which may meet the file short.
    const p = `/dev/shm/appshot-tablesbus-${process.pid}`;
    try {
      const r = inNode(`const { spawn } = require('child_process');
const p = ${JSON.stringify(p)};
a.createTables(p, 'victim', 1n);
for (let i = 1; i <= 40; i++) a.bind(p, 'pid', i, 100000 + i);
const fd = fs.openSync(p, 'r+');
const writer = spawn(${JSON.stringify(fixture('tablesbus'))}, ['20'], { stdio: ['ignore', 'pipe', 'ignore', fd], env: { ...process.env, APPSHOT_TABLES_FD: '3' } });
writer.stdout.once('data', () => {
  // shrunk: met the file short mid-call (the guard's error); refused:
  // every error, among them a file met short or zeroed as it was opened,
  // and whatever a zeroed file makes a writer say; multiline: errors of
  // more than one line (none may be).
  const seen = { read: 0, wrote: 0, refused: 0, shrunk: 0, multiline: 0 };
  const note = (e) => {
    seen.refused++;
    if (/changed size under us/.test(e.message)) seen.shrunk++;
    if (!(e instanceof Error) || e.message.includes(String.fromCharCode(10))) seen.multiline++;
  };
  for (let n = 0; n < 3000; n++) {
    try { a.readTables(p); seen.read++; } catch (e) { note(e); }
    try { a.unmapSystem(p, 'pid', 500000 + (n % 64)); a.mapSystem(p, 'pid', 500000 + (n % 64)); seen.wrote++; } catch (e) { note(e); }
  }
  writer.kill('SIGKILL');
  console.log(JSON.stringify(seen));
});`);
      expect({ signal: r.signal, status: r.status, stderr: r.stderr }).toEqual({ signal: null, status: 0, stderr: '' });
      const seen = JSON.parse(r.stdout) as { read: number; wrote: number; refused: number; shrunk: number; multiline: number };
      // Every call either went through or was refused with an error, and
      // the process lived through all of them.
      expect(seen.read + seen.wrote + seen.refused).toBeGreaterThanOrEqual(6000);
      expect(seen.multiline).toBe(0);
      expect(seen.read).toBeGreaterThan(0);
    } finally {
      rmSync(p, { force: true });
    }
  });
});

/** A C program built from addon/src/tablesguard.c and `main`, in `dir`. */
function guardProgram(dir: string, main: string): string {
  const src = join(dir, 'harness.c');
  const bin = join(dir, 'harness');
  writeFileSync(src, main);
  const cc = spawnSync('cc', ['-O1', '-Wall', '-I', join(root, 'addon', 'src'), '-o', bin, src, join(root, 'addon', 'src', 'tablesguard.c'), '-lpthread'], { encoding: 'utf8' });
  expect(cc.stderr).toBe('');
  expect(cc.status).toBe(0);
  return bin;
}

describe('the guard and a SIGBUS handler of the process', () => {
  // The handler there before the guard gets every SIGBUS the guard does
  // not take, as the kernel would have run it: its kind (SA_SIGINFO or
  // plain), its mask, SA_NODEFER, SA_RESETHAND. Each fault here is a real
  // one: a read of a shared mapping of a file made empty, which the
  // handler grows back so that the read, run again, goes through.
  const main = String.raw`#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "tablesguard.h"
static int fd;
static long page_size;
static volatile char *page;
static volatile int calls, with_info, bus_blocked, usr1_blocked;
static void note(void) {
  sigset_t now;
  pthread_sigmask(SIG_BLOCK, NULL, &now);
  bus_blocked = sigismember(&now, SIGBUS);
  usr1_blocked = sigismember(&now, SIGUSR1);
  calls++;
  if (ftruncate(fd, page_size)) _exit(3);
}
static void plain(int sig) { (void)sig; note(); }
static void informed(int sig, siginfo_t *si, void *uc) { (void)sig; (void)uc; with_info = si->si_addr == (void *)page; note(); }
static void read_page(void *arg) { (void)arg; (void)*page; }
static void fault(void) { if (ftruncate(fd, 0)) _exit(3); read_page(NULL); }
int main(int argc, char **argv) {
  const char *flags = argc > 1 ? argv[1] : "";
  page_size = sysconf(_SC_PAGESIZE);
  char path[] = "/dev/shm/appshot-guardchain-XXXXXX";
  fd = mkstemp(path);
  unlink(path);
  if (fd < 0 || ftruncate(fd, page_size)) return 3;
  page = mmap(NULL, page_size, PROT_READ, MAP_SHARED, fd, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  if (strstr(flags, "siginfo")) {
    sa.sa_sigaction = informed;
    sa.sa_flags |= SA_SIGINFO;
  } else sa.sa_handler = plain;
  if (strstr(flags, "nodefer")) sa.sa_flags |= SA_NODEFER;
  if (strstr(flags, "resethand")) sa.sa_flags |= SA_RESETHAND;
  if (strstr(flags, "mask")) sigaddset(&sa.sa_mask, SIGUSR1);
  if (!strstr(flags, "after")) sigaction(SIGBUS, &sa, NULL);
  if (tables_guard_install()) return 2;
  if (strstr(flags, "after")) {
    /* Set after the guard's (as Node's process.on('SIGBUS') would). */
    sigaction(SIGBUS, &sa, NULL);
    if (ftruncate(fd, 0)) return 3;
    errno = 0;
    int rc = tables_guard_run((const void *)page, page_size, read_page, NULL);
    printf("guarded %d %s calls %d\n", rc, strerrorname_np(errno), calls);
    return 0;
  }
  /* A fault inside the guarded range ends its step. */
  if (ftruncate(fd, 0)) return 3;
  int rc = tables_guard_run((const void *)page, page_size, read_page, NULL);
  if (ftruncate(fd, page_size)) return 3;
  /* Outside: the handler's. */
  fault();
  printf("guarded %d calls %d info %d bus-blocked %d usr1-blocked %d\n", rc, calls, with_info, bus_blocked, usr1_blocked);
  fflush(stdout);
  fault();
  printf("again calls %d\n", calls);
  return 0;
}
`;
  const runWith = (flags: string) => {
    const dir = mkdtempSync(join(tmpdir(), 'appshot-guardchain-'));
    try {
      const r = spawnSync(guardProgram(dir, main), [flags], { encoding: 'utf8', timeout: 20_000 });
      return { stdout: r.stdout, signal: r.signal, status: r.status };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  it('runs the previous handler as the kernel would have: its kind, its mask, SA_NODEFER, SA_RESETHAND', () => {
    expect(runWith('siginfo')).toEqual({ stdout: 'guarded 1 calls 1 info 1 bus-blocked 1 usr1-blocked 0\nagain calls 2\n', signal: null, status: 0 });
    expect(runWith('plain')).toEqual({ stdout: 'guarded 1 calls 1 info 0 bus-blocked 1 usr1-blocked 0\nagain calls 2\n', signal: null, status: 0 });
    expect(runWith('plain,mask')).toEqual({ stdout: 'guarded 1 calls 1 info 0 bus-blocked 1 usr1-blocked 1\nagain calls 2\n', signal: null, status: 0 });
    expect(runWith('siginfo,nodefer')).toEqual({ stdout: 'guarded 1 calls 1 info 1 bus-blocked 0 usr1-blocked 0\nagain calls 2\n', signal: null, status: 0 });
    // One-shot: the second fault meets the default action.
    expect(runWith('plain,resethand')).toEqual({ stdout: 'guarded 1 calls 1 info 0 bus-blocked 1 usr1-blocked 0\n', signal: 'SIGBUS', status: null });
  });

  it('refuses a step once a handler set after it replaced it, rather than run it unguarded', () => {
    expect(runWith('plain,after')).toEqual({ stdout: 'guarded -1 ENOTRECOVERABLE calls 0\n', signal: null, status: 0 });
  });
});

describe('a JS listener for SIGBUS', () => {
  it("takes the guard's place, and table calls are refused; the engine refuses the listener itself", () => {
    // As the engine runs: the addon loaded (its guard installed), then a
    // listener; without the engine's refusal, and with it.
    const script = (refuse: boolean) => `import { createRequire } from 'node:module';
const a = createRequire(import.meta.url)(${JSON.stringify(addonPath)});
${refuse ? `(await import(${JSON.stringify(join(root, 'dist', 'engine', 'server.js'))})).refuseSigbusListeners();` : ''}
const p = '/dev/shm/appshot-sigbus-listener-' + process.pid;
a.createTables(p, 'listener', 1n);
const seen = {};
try { process.on('SIGBUS', () => {}); seen.added = true; } catch (e) { seen.added = e.message; }
try { seen.read = a.readTables(p).tables.pid.length; } catch (e) { seen.read = e.code; seen.why = e.message; }
(await import('node:fs')).rmSync(p);
console.log(JSON.stringify(seen));
process.exit(0);`;
    const run = (refuse: boolean) => {
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', script(refuse)], { encoding: 'utf8', timeout: 60_000 });
      expect(r.stderr).toBe('');
      return JSON.parse(r.stdout) as { added: true | string; read: number | string; why?: string };
    };
    // Refused as the file is opened: its header is read under the guard
    // (addon.cc MapTables), which the step no longer has; said so, not
    // taken for a file that is no table file.
    expect(run(false)).toEqual({ added: true, read: 'ENOTRECOVERABLE', why: expect.stringMatching(/fault guard's SIGBUS handler was replaced/) });
    expect(run(true)).toEqual({ added: "a listener for SIGBUS would take SIGBUS from the tables' fault guard (addon/src/tablesguard.h): refused", read: 0 });
  });
});

describe('a table file on a full filesystem', () => {
  // The file is sparse: a write to a page never written before is a
  // SIGBUS on a full filesystem too, with the file still its full size
  // (review r371, findings 3 and 4). A tmpfs of its own, in a mount
  // namespace of its own: root only.
  it.skipIf(process.getuid?.() !== 0)('is refused as no space left, not as truncated, and the next writer repairs what the fault left', () => {
    const dir = mkdtempSync(join(tmpdir(), 'appshot-tablesfull-'));
    try {
      const script = `const a = require(${JSON.stringify(addonPath)});
const fs = require('fs');
const p = ${JSON.stringify(join(dir, 't'))}, filler = ${JSON.stringify(join(dir, 'filler'))};
a.createTables(p, 'full', 1n);
const fd = fs.openSync(filler, 'w');
const block = Buffer.alloc(4096, 1);
try { for (;;) fs.writeSync(fd, block); } catch (e) { if (e.code !== 'ENOSPC') throw e; }
let refusal = null;
try { a.bind(p, 'pid', 1, 100001); } catch (e) { refusal = { code: e.code, message: e.message }; }
fs.closeSync(fd);
fs.unlinkSync(filler);
a.bind(p, 'pid', 2, 100002);
const t = a.readTables(p);
console.log(JSON.stringify({ refusal, repairs: t.repairs, pid: t.tables.pid.map((e) => e.virtual) }));`;
      // 2 MiB: room for the whole table (1.2 MiB) once the filler is gone,
      // for the repair rewrites every index.
      const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `mount -t tmpfs -o size=2m tmpfs "$1" && exec "$2" -e "$3"`, 'sh', dir, process.execPath, script], { encoding: 'utf8', timeout: 60_000 });
      expect({ status: r.status, signal: r.signal, stderr: r.stderr }).toEqual({ status: 0, signal: null, stderr: '' });
      const seen = JSON.parse(r.stdout) as { refusal: { code: string; message: string } | null; repairs: number; pid: number[] };
      expect(seen.refusal?.code).toBe('ENOSPC');
      expect(seen.refusal?.message).toMatch(/no space left/);
      expect(seen.refusal?.message).not.toMatch(/truncated/);
      // The bind faulted holding the lock: let go as a dead holder's, so
      // the next bind rebuilt the indexes.
      expect(seen.repairs).toBe(1);
      expect(seen.pid).toEqual([2]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('an application that empties and refills its table file', () => {
  it('cannot end the resident engine: each command succeeds or fails with one line', async () => {
    const aid = 'tb-shrink';
    // An engine kept for the whole test (it would leave after a minute idle).
    const started = spawnSync(process.execPath, [cli, 'engine', 'start'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_ENGINE_IDLE: '1800' }, encoding: 'utf8' });
    expect(started.status, started.stderr).toBe(0);
    const engine = (await controlEngine('status', sb.home))?.pid as number;
    expect(engine).toBeGreaterThan(0);
    // As nobody under a root engine when the tests run as root: the file
    // is root's, the descriptor the application's.
    const asUser = process.getuid?.() === 0 ? asNobody : [];
    sb.ok(['run', '-d', '--aid', aid, '--', ...asUser, fixture('tablesbus'), '90']);
    await waitFor(() => /^FD \d+ SIZE \d+ PID \d+$/m.test(sb.log(aid)) || /FAIL/.test(sb.log(aid)), 20_000, `${aid} to read its tables`);
    expect(sb.log(aid)).not.toMatch(/FAIL/);
    // Stopped by its PID at the end, whatever became of the application
    // (its init maps the file too: a fault there left the application's
    // processes running unsupervised before init patched such pages).
    shrinker = Number(/^FD \d+ SIZE \d+ PID (\d+)$/m.exec(sb.log(aid))![1]);
    const outcomes: string[] = [];
    const commands: string[][] = [];
    for (let i = 0; i < 40; i++) {
      commands.push(['table', aid], ['ps'], ['table', aid, '--json']);
      if (i % 10 === 0) commands.push(['snapshot', aid, '--leave-running', '-o', join(out, `s${i}`)]);
    }
    for (const args of commands) {
      const r = await sb.runAsync(args, 60_000);
      const what = `appshot ${args.join(' ')}: ${r.code}/${r.signal} ${r.stderr.trim()}`;
      // The engine first: a command that ran into its death says so only
      // as "the engine went away".
      expect(alive(engine), what).toBe(true);
      expect(r.signal, what).toBeNull();
      if (r.code !== 0) expect(r.stderr.trim().split('\n'), what).toHaveLength(1);
      outcomes.push(r.code === 0 ? 'ok' : r.stderr.trim());
    }
    const tally = JSON.stringify(outcomes.reduce<Record<string, number>>((m, o) => ((m[o] = (m[o] ?? 0) + 1), m), {}));
    const status = await controlEngine('status', sb.home);
    expect(status?.pid, tally).toBe(engine);
    // Some go through: a refusal is a read that met the file short (or
    // zeroed: no table file then).
    expect(outcomes.filter((o) => o === 'ok').length, tally).toBeGreaterThan(0);
    // And the application is still appshot's: its init lived through the
    // same faults.
    expect(sb.aids(), tally).toContain(aid);
    sb.run(['rm', '-f', aid]);
  });
});

describe('an application without its supervisor that empties and refills its table file', () => {
  it("neither makes ps fail for everyone nor is released under its live process", async () => {
    // Its init killed (as SIGKILL of a foreground job's group may leave
    // a daemon), the registration is judged by its tables, which the
    // application keeps making unreadable: a read that failed took it
    // for dead and released it, its tables removed under it, and a
    // release that then failed made every `ps` fail (review r395 F3).
    const aid = 'tb-orphan';
    const asUser = process.getuid?.() === 0 ? asNobody : [];
    sb.ok(['run', '-d', '--aid', aid, '--', ...asUser, fixture('tablesbus'), '90']);
    await waitFor(() => /^FD \d+ SIZE \d+ PID \d+$/m.test(sb.log(aid)) || /FAIL/.test(sb.log(aid)), 20_000, `${aid} to read its tables`);
    expect(sb.log(aid)).not.toMatch(/FAIL/);
    const flipper = Number(/^FD \d+ SIZE \d+ PID (\d+)$/m.exec(sb.log(aid))![1]);
    const record = JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')) as { initPid: number; tables: string };
    expect(record.initPid).toBeGreaterThan(1);
    try {
      process.kill(record.initPid, 'SIGKILL');
      await waitFor(() => !alive(record.initPid), 10_000, 'its init to die');
      expect(alive(flipper)).toBe(true);
      const outcomes: string[] = [];
      for (let i = 0; i < 20; i++) {
        for (const args of [['ps', '-a', '--json'], ['ps']]) {
          const r = await sb.runAsync(args, 60_000);
          outcomes.push(`${args.join(' ')}: ${r.code} ${r.stderr.trim()}`);
          expect(r.code, outcomes.at(-1)).toBe(0);
          if (args[1] === '-a') expect((JSON.parse(r.stdout) as { aid: string }[]).map((a) => a.aid), outcomes.at(-1)).toContain(aid);
        }
        expect(existsSync(record.tables), outcomes.at(-1)).toBe(true);
      }
      expect(alive(flipper)).toBe(true);
    } finally {
      process.kill(flipper, 'SIGKILL');
      await waitFor(() => !alive(flipper), 10_000, 'the application to die');
    }
    // Gone, nothing of it runs: the next look releases it.
    const after = await sb.runAsync(['ps', '-a', '--json'], 60_000);
    expect(after.code, after.stderr).toBe(0);
    expect((JSON.parse(after.stdout) as { aid: string; state: string }[]).filter((a) => a.aid === aid && a.state === 'running')).toEqual([]);
    sb.run(['rm', '-f', aid]);
  });
});

describe('an application that truncates its table file for good', () => {
  it('is told so, in one line, by the commands that need its tables, in the engine or not', async () => {
    const aid = 'tb-cut';
    const asUser = process.getuid?.() === 0 ? asNobody : [];
    // 0 seconds of shrinking: it reads its file, says where it is, waits.
    sb.ok(['run', '-d', '--aid', aid, '--', ...asUser, fixture('tablesbus'), '0']);
    await waitFor(() => /^ROUNDS 0$/m.test(sb.log(aid)) || /FAIL/.test(sb.log(aid)), 20_000, `${aid} to read its tables`);
    const [, fd, , pid] = /^FD (\d+) SIZE (\d+) PID (\d+)$/m.exec(sb.log(aid))!;
    // Through the application's own descriptor, as it would.
    const file = `/proc/${pid}/fd/${fd}`;
    const started = spawnSync(process.execPath, [cli, 'engine', 'start'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_ENGINE_IDLE: '1800' }, encoding: 'utf8' });
    expect(started.status, started.stderr).toBe(0);
    const before = (await controlEngine('status', sb.home))?.commandsServed as number;
    const saysEverywhere = (how: string) => {
      const said = `appshot: the table file of '${aid}' ${how}: its tables cannot be read\n`;
      for (const env of [{}, { APPSHOT_ENGINE: 'off' }]) {
        for (const args of [['table', aid], ['snapshot', aid, '--leave-running', '-o', join(out, 'cut')]]) {
          const r = spawnSync(process.execPath, [cli, ...args], { env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 60_000 });
          expect({ env, args, code: r.status, stderr: r.stderr }).toEqual({ env, args, code: 1, stderr: said });
        }
      }
    };
    const { tableBytes, tableVersion } = addon();
    const app = '(by a process of the application, which holds it open read-write)';
    truncateSync(file, 0);
    saysEverywhere(`was truncated ${app}`);
    // Grown: its size not a table's either, said as such (review r395 F4).
    truncateSync(file, tableBytes + 4096);
    saysEverywhere(`grew ${app}`);
    // A table file of another layout (an application started by the
    // build before an upgrade): its header says so.
    truncateSync(file, 0);
    const header = Buffer.alloc(16);
    header.writeBigUInt64LE(0x5441505041n, 0);
    header.writeUInt32LE(tableVersion - 1, 8);
    const w = openSync(file, 'r+');
    writeSync(w, header, 0, 16, 0);
    closeSync(w);
    truncateSync(file, tableBytes);
    saysEverywhere(`was made by another version of appshot (table layout ${tableVersion - 1}, this appshot's ${tableVersion}: restart the application with this one)`);
    expect((await controlEngine('status', sb.home))?.commandsServed).toBe(before + 6);
    sb.run(['rm', '-f', aid]);
  });
});

describe('a native binding given an argument of the wrong type', () => {
  it('throws a JS error instead of aborting the process', () => {
    // Each call reads an argument with As<>() (which leaves an exception
    // pending on a wrong type) and then throws its own error: a second
    // throw was node-addon-api's fatal error, SIGABRT.
    const r = inNode(`for (const [name, args] of [['shmReadPieces', [undefined]], ['bind', [7, 'pid', 1, 2]], ['readTables', [{}]], ['mapSystem', ['/nonexistent', 'pid', 'x']], ['restoreSem', [1, 2, 3]]]) {
  try { a[name](...args); console.log(name, 'returned'); } catch (e) { console.log(name, 'threw', e instanceof Error); }
}`);
    expect({ signal: r.signal, status: r.status }).toEqual({ signal: null, status: 0 });
    expect(r.stdout.trim().split('\n')).toEqual(['shmReadPieces threw true', 'bind threw true', 'readTables threw true', 'mapSystem threw true', 'restoreSem threw true']);
  });
});
