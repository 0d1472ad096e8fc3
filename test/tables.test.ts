/**
 * The engine's reads of an application's table file (addon readTables).
 * The file is the application's: it can write it, truncate it or replace
 * it at any time, and the engine that reads it (a resident serve among
 * them) must answer with an error, never die of it.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, fixture, root, Sandbox, systemIpcIds, waitFor } from './helpers.js';

/** Runs `body` (CommonJS, with `a` the addon and `p` a table file's path
 * in /dev/shm, made first) in a process of its own: a fault there is seen
 * as its signal, not as the test runner's death. */
function withTables(body: string): { stdout: string; signal: NodeJS.Signals | null; status: number | null } {
  const p = `/dev/shm/appshot-tables-test-${process.pid}-${Math.random().toString(36).slice(2)}`;
  const script = `const a = require(${JSON.stringify(join(root, 'build', 'Release', 'appshot.node'))});
const fs = require('fs');
const p = ${JSON.stringify(p)};
a.createTables(p, 'victim', 1n);
${body}`;
  try {
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
    return { stdout: r.stdout, signal: r.signal, status: r.status };
  } finally {
    // And what a body made beside it (a writer's script, its stop file),
    // whatever became of the body.
    for (const f of [p, `${p}.writer.js`, `${p}.stop`]) rmSync(f, { force: true });
  }
}

describe('readTables', () => {
  it('refuses a table file truncated since an earlier read, without a fault', () => {
    const r = withTables(`console.log(a.readTables(p).aid);
fs.truncateSync(p, 0);
try { a.readTables(p); console.log('read'); } catch (e) { console.log('refused', e.code || e.message); }`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toMatch(/^victim\nrefused /);
  });

  it('refuses a table file zeroed in place since an earlier read (its magic gone)', () => {
    const r = withTables(`console.log(a.readTables(p).aid);
const size = fs.statSync(p).size;
fs.truncateSync(p, 0);
fs.truncateSync(p, size);
try { console.log('read', JSON.stringify(a.readTables(p).aid)); } catch (e) { console.log('refused', e.code || e.message); }`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toMatch(/^victim\nrefused /);
  });

  it('reads every entry without touching the free tail of the file', () => {
    // Read through a shared mapping, each page of a tmpfs hole it touches
    // is allocated: a read of all 22,528 slots made every application's
    // 1.2 MiB file take ~460 KiB of memory at its first `ps`.
    const r = withTables(`for (let i = 1; i <= 40; i++) a.bind(p, 'pid', i, 100000 + i);
a.bind(p, 'semid', 7, 70);
const before = fs.statSync(p);
const t = a.readTables(p).tables;
const after = fs.statSync(p);
console.log(JSON.stringify({ pids: t.pid.map((e) => e.virtual), semids: t.semid.map((e) => e.system), size: after.size, grew: (after.blocks - before.blocks) * 512 }));`);
    expect(r.signal).toBeNull();
    const out = JSON.parse(r.stdout);
    expect(out.pids.sort((x: number, y: number) => x - y)).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
    expect(out.semids).toEqual([70]);
    expect(out.grew).toBeLessThan(out.size / 8);
  });

  it('finds every entry whatever the count in the file says', () => {
    // The count is the application's to write, and a writer stopped or
    // dead inside its change may have stored an entry before counting it:
    // the used slots are what the reader goes by. Made here by taking one
    // off the PID table's count (found as the table's first words: kind 0,
    // capacity, index size, live).
    const r = withTables(`for (let i = 1; i <= 3; i++) a.bind(p, 'pid', i, 200 + i);
const buf = fs.readFileSync(p);
let at = -1;
for (let o = 0; o + 16 <= buf.length && at < 0; o += 4)
  if (buf.readUInt32LE(o) === 0 && buf.readUInt32LE(o + 4) === 8192 && buf.readUInt32LE(o + 8) === 16384 && buf.readUInt32LE(o + 12) === 3) at = o + 12;
const fd = fs.openSync(p, 'r+');
const word = Buffer.alloc(4);
word.writeUInt32LE(2);
fs.writeSync(fd, word, 0, 4, at);
console.log('uncounted', a.readTables(p).tables.pid.length);
word.writeUInt32LE(0);
fs.writeSync(fd, word, 0, 4, at);
console.log('none counted', a.readTables(p).tables.pid.length);`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toBe('uncounted 3\nnone counted 3\n');
  });

  it('finds an entry that stays put while another process adds and removes entries before it', () => {
    // A read that stops after the count it saw at its start would count an
    // entry added ahead of it meanwhile and stop before this one (~0.5% of
    // reads missed it so).
    const r = withTables(`const { spawn } = require('child_process');
for (let i = 0; i < 8191; i++) a.bind(p, 'pid', 10 + i, 100000 + i);
a.bind(p, 'pid', 4000000, 777777);
for (let i = 0; i < 8191; i++) a.unmapSystem(p, 'pid', 100000 + i);
const stop = p + '.stop';
const writerJs = p + '.writer.js';
fs.writeFileSync(writerJs, [
  'const [addonPath, p, stop] = process.argv.slice(2);',
  'const a = require(addonPath);',
  'const fs = require("fs");',
  'process.stdout.write("go");',
  'for (let i = 0; !fs.existsSync(stop); i++) {',
  '  a.bind(p, "pid", 300000 + (i % 1000), 500000 + (i % 1000));',
  '  a.unmapSystem(p, "pid", 500000 + (i % 1000));',
  '}',
].join('\\n'));
const writer = spawn(process.execPath, [writerJs, ${JSON.stringify(join(root, 'build', 'Release', 'appshot.node'))}, p, stop], { stdio: ['ignore', 'pipe', 'inherit'] });
writer.stdout.once('data', () => {
  let missed = 0;
  for (let n = 0; n < 20000; n++) if (!a.readTables(p).tables.pid.some((e) => e.system === 777777)) missed++;
  fs.writeFileSync(stop, '');
  writer.on('exit', (code) => {
    fs.rmSync(stop, { force: true });
    fs.rmSync(writerJs, { force: true });
    console.log('writer', code, 'missed', missed);
  });
});`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toBe('writer 0 missed 0\n');
  });

  it('a table file whose tables name other places and sizes is read and written where the layout says', () => {
    // Each table's kind, capacity, index size and offsets are in the file,
    // which the application can write: followed, they had the engine read
    // 2^40 bytes past the mapping (SIGSEGV) or divide by a capacity of 0.
    const r = withTables(`for (let i = 1; i <= 3; i++) a.bind(p, 'pid', i, 200 + i);
a.bind(p, 'semid', 5, 50);
const fd = fs.openSync(p, 'r+');
const buf = fs.readFileSync(p);
let base = -1;
for (let o = 0; o + 16 <= buf.length && base < 0; o += 8)
  if (buf.readUInt32LE(o) === 0 && buf.readUInt32LE(o + 4) === 8192 && buf.readUInt32LE(o + 8) === 16384) base = o;
const bad = Buffer.alloc(80);
for (let k = 0; k < 8; k++) {
  fs.readSync(fd, bad, 0, 80, base + k * 80);
  bad.writeUInt32LE(0xffffffff, 0);
  bad.writeUInt32LE(k % 2 ? 0 : 0xffffffff, 4);
  bad.writeUInt32LE(k % 2 ? 0xffffffff : 0, 8);
  for (let w = 40; w < 80; w += 8) bad.writeBigUInt64LE(1n << 40n, w);
  fs.writeSync(fd, bad, 0, 80, base + k * 80);
}
a.bind(p, 'pid', 4, 204);
a.unmapSystem(p, 'pid', 201);
console.log(a.mapSystem(p, 'pid', 205) > 0, JSON.stringify(a.readTables(p).tables.pid.map((e) => e.system).sort()), JSON.stringify(a.readTables(p).tables.semid.map((e) => e.system)));`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toBe('true [202,203,204,205] [50]\n');
  });

  it('gives up on a lock the application holds for ever, in one clear error, and takes it again once free', () => {
    // The lock lives in the file, which the application can write: a lock
    // word naming a thread that never lets go hung the engine (a snapshot
    // maps the threads it finds under this lock, with the application
    // frozen) and appshot-init for ever.
    const r = withTables(`const word = Buffer.alloc(4);
word.writeInt32LE(1);
const fd = fs.openSync(p, 'r+');
fs.writeSync(fd, word, 0, 4, a.tablesLockOffset);
let err = '';
try { a.mapSystem(p, 'pid', 4242); } catch (e) { err = e.code + ' ' + e.message; }
console.log(err);
fs.writeSync(fd, Buffer.alloc(4), 0, 4, a.tablesLockOffset);
console.log(a.mapSystem(p, 'pid', 4242) > 0, a.readTables(p).tables.pid.map((e) => e.system).join());`);
    expect(r.signal).toBeNull();
    const [err, after] = r.stdout.split('\n');
    expect(err).toMatch(/^ETIMEDOUT mapping 4242: the table file \/dev\/shm\/\S+ stayed locked for 2 s by a thread that does not let go/);
    expect(after).toBe('true 4242');
  });

  it('reads the new file when the path is another file now (same AID, new tables)', () => {
    const r = withTables(`console.log(a.readTables(p).aid);
fs.unlinkSync(p);
a.createTables(p, 'other', 2n);
console.log(a.readTables(p).aid);`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toBe('victim\nother\n');
  });
});

/**
 * The walks that must reach every entry (a process not signalled, an IPC
 * object not removed, is a bug) find the used slots without reading the
 * file's holes through the shared mapping, which allocated them: 128 KiB
 * of memory per application for the PID table, 32 KiB per IPC kind, for
 * as long as it runs. Each test looks at the entry arrays' allocated bytes
 * (tableholes: lseek SEEK_DATA, which allocates nothing) through a
 * descriptor it holds, which outlives the file's unlink at the end.
 */
describe('walks of every entry leave the holes of the table file alone', () => {
  const sb = new Sandbox();
  afterAll(() => sb.dispose());
  // A few live entries fill at most the page or two the array starts in.
  const SMALL = 8192;

  /** The application's table file, held open: what tableholes reads. */
  function holdTables(aid: string): { holes(): Record<string, number>; systemIpcIds(): number[]; close(): void } {
    const name = sb.shmFiles().find((f) => f.includes(`-${aid}-`));
    if (!name) throw new Error(`no table file of ${aid} among ${sb.shmFiles().join(' ')}`);
    const fd = openSync(`/dev/shm/${name}`, 'r');
    return {
      /** The system SysV ids the application's tables bind (its own:
       * test files run in parallel and make objects of theirs meanwhile). */
      systemIpcIds() {
        const addon = createRequire(import.meta.url)(join(root, 'build', 'Release', 'appshot.node')) as {
          readTables(path: string): { tables: Record<string, { system: number }[]> };
        };
        const t = addon.readTables(`/dev/shm/${name}`).tables;
        return ['semid', 'shmid', 'msgid'].flatMap((k) => t[k].map((e) => e.system));
      },
      holes() {
        const r = spawnSync(fixture('tableholes'), [`/proc/${process.pid}/fd/${fd}`], { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`tableholes: ${r.stdout}${r.stderr}`);
        const out: Record<string, number> = {};
        for (const [, k, v] of r.stdout.matchAll(/(\w+) (\d+)/g)) out[k] = Number(v);
        return out;
      },
      close: () => closeSync(fd),
    };
  }

  /** An application whose first process (`sh -c 'read x'`) has ended while
   * an `appshot exec` process (`execArgs`) remains: init then looks for
   * the latter every 2 s (others_alive) and passes signals to it. */
  async function outlivedByExec(aid: string, execArgs: string[]) {
    const app = sb.start(['run', '--aid', aid, '--', 'sh', '-c', 'echo UP; read x; true']);
    await app.line(/^UP$/);
    const tables = holdTables(aid);
    const first = sb.systemPid(aid);
    const other = sb.start(['exec', aid, '--', ...execArgs]);
    await other.line(/^UP$/);
    app.child.stdin.end();
    await waitFor(() => !alive(first), 10_000, 'the first process to end');
    return { app, other, tables };
  }

  it('the walk of the used slots finds an entry that stays put while another process stores and removes entries (usedwalk, on tables of its own)', () => {
    const r = spawnSync(fixture('usedwalk'), [], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stdout + r.stderr).toMatch(/^PASS walks \d+ missed 0\n$/);
    expect(r.status).toBe(0);
  });

  it("init's look for `appshot exec` processes: the application lives on while one does, and ends with it", async () => {
    const { app, other, tables } = await outlivedByExec('walkalive', ['sh', '-c', 'echo UP; exec sleep 1000']);
    try {
      const sleeper = sb.systemPid('walkalive', 3);
      expect(sb.aids()).toContain('walkalive');
      process.kill(sleeper, 'SIGKILL');
      await other.exited;
      // Its last look (nothing left) reads the whole table: the end.
      await waitFor(() => !sb.aids().includes('walkalive'), 20_000, 'the application to end');
      await app.exited;
      expect(tables.holes().pid).toBeLessThanOrEqual(SMALL);
    } finally {
      tables.close();
    }
  });

  it('a signal init passes on reaches the `appshot exec` process, twice', async () => {
    const script = 'trap "echo GOT" USR1; echo UP; while :; do sleep 0.1; done';
    const { other, tables } = await outlivedByExec('walksig', ['sh', '-c', script]);
    try {
      sb.ok(['kill', '-s', 'USR1', 'walksig']);
      await other.line(/^GOT$/);
      // The second passing starts after the first walk ended.
      sb.ok(['kill', '-s', 'USR1', 'walksig']);
      await waitFor(() => other.output().filter((l) => l === 'GOT').length >= 2, 10_000, 'the second USR1');
      expect(tables.holes().pid).toBeLessThanOrEqual(SMALL);
      sb.ok(['kill', '-s', 'TERM', 'walksig']);
      expect((await other.exited).code).not.toBe(0);
    } finally {
      tables.close();
    }
  });

  it("the application's SysV objects go at its end", async () => {
    const app = sb.start(['run', '--aid', 'walkipc', '--', fixture('ipc'), 'hold', 'keep']);
    await app.line(/^READY$/);
    const tables = holdTables('walkipc');
    try {
      const made = tables.systemIpcIds();
      expect(made.length).toBe(3);
      const held = systemIpcIds();
      expect([...held.sem, ...held.shm, ...held.msg].filter((i) => made.includes(i)).sort()).toEqual([...made].sort());
      app.child.stdin.end();
      expect((await app.exited).code).toBe(0);
      const after = systemIpcIds();
      const left = [...after.sem, ...after.shm, ...after.msg].filter((i) => made.includes(i));
      expect(left).toEqual([]);
      const holes = tables.holes();
      for (const kind of ['semid', 'shmid', 'msgid']) expect(holes[kind], kind).toBeLessThanOrEqual(SMALL);
    } finally {
      tables.close();
    }
  });

  it('kill(-1) through the preload library reaches every process of the application', async () => {
    const app = sb.start(['run', '--aid', 'walkkill', '--', fixture('walks'), 'kill', '5']);
    await app.line(/^REACHED 5$/);
    await app.line(/^READY$/);
    const tables = holdTables('walkkill');
    try {
      expect(tables.holes().pid).toBeLessThanOrEqual(SMALL);
      app.child.stdin.end();
      expect((await app.exited).code).toBe(0);
    } finally {
      tables.close();
    }
  });

  it('a listing of /proc/self/task maps a quiet thread after dropping the ended ones', async () => {
    const app = sb.start(['run', '--aid', 'walktasks', '--', fixture('walks'), 'tasks']);
    const [, a] = await app.line(/^LISTED (\d+) (\d+)$/);
    await app.line(/^READY$/);
    const tables = holdTables('walktasks');
    try {
      const pids = sb.json<{ tables: { pid: { virtual: number }[] } }>(['table', 'walktasks']).tables.pid.map((e) => e.virtual);
      expect(pids).not.toContain(Number(a));
      expect(tables.holes().pid).toBeLessThanOrEqual(SMALL);
      app.child.stdin.end();
      expect((await app.exited).code).toBe(0);
    } finally {
      tables.close();
    }
  });
});
