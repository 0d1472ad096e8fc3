/**
 * The engine's reads of an application's table file (addon readTables).
 * The file is the application's: it can write it, truncate it or replace
 * it at any time, and the engine that reads it (a resident serve among
 * them) must answer with an error, never die of it.
 */
import { spawnSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { root } from './helpers.js';

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
