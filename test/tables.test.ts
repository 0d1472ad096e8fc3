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
    rmSync(p, { force: true });
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

  it('reads the new file when the path is another file now (same AID, new tables)', () => {
    const r = withTables(`console.log(a.readTables(p).aid);
fs.unlinkSync(p);
a.createTables(p, 'other', 2n);
console.log(a.readTables(p).aid);`);
    expect(r.signal).toBeNull();
    expect(r.stdout).toBe('victim\nother\n');
  });
});
