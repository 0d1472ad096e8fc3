/**
 * Memory as the application arranged it: mappings keep what the kernel
 * lets their owner do with them (mprotect PROT_WRITE of a read-only file
 * mapping), their madvise state and MAP_DROPPABLE, and copy-on-write
 * sharing between a parent and its forked children. Each fixture checks
 * itself; each goes through a snapshot that ends it and a restore, and
 * through a --leave-running snapshot restored --lazy beside the original.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-memory-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

type Ps = { processes: { vpid: number; pid: number; init: boolean }[] }[];
const processes = (aid: string) => sb.json<Ps>(['ps', aid])[0].processes.filter((p) => !p.init);

const run = (args: string[]) => sb.ok(args);

/** SIGHUP makes the fixture use its memory once more. */
const exercised = (aid: string) => sb.exercised(aid, 'to use its memory');

function roundTrips(name: string, argv: string[], after?: (aid: string) => void | Promise<void>): void {
  it('comes back exactly from a snapshot that ends it', async () => {
    const aid = `${name}1`;
    run(['run', '-d', '--aid', aid, '--', ...argv]);
    await sb.checksPass(aid);
    await after?.(aid);
    run(['snapshot', aid, '-o', join(out, aid)]);
    run(['restore', join(out, aid)]);
    await sb.checksPass(aid);
    await after?.(aid);
    await exercised(aid);
    await sb.checksPass(aid);
  });

  it('comes back exactly from a --leave-running snapshot, restored --lazy beside the original', async () => {
    const aid = `${name}2`;
    run(['run', '-d', '--aid', aid, '--', ...argv]);
    await sb.checksPass(aid);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    await sb.checksPass(aid);
    // The snapshot itself leaves the original as it was.
    await after?.(aid);
    run(['restore', join(out, aid), '--aid', `${name}3`, '--lazy']);
    await sb.checksPass(`${name}3`);
    await after?.(`${name}3`);
    await exercised(aid);
    await exercised(`${name}3`);
    await sb.checksPass(`${name}3`);
  });
}

describe('mappings keep VM_MAYWRITE, their madvise state (dc wf dd hg nh mg sr rr) and MAP_DROPPABLE, with their data', () => {
  const dir = mkdtempSync(join(tmpdir(), 'appshot-memattrs-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  roundTrips('mattr', [fixture('memattrs'), dir]);
});

/** kB of memory that each process of `aid` holds alone (Private_Clean +
 * Private_Dirty of smaps_rollup), summed: pages shared between them count
 * in none. */
function privateKb(aid: string): number {
  let kb = 0;
  for (const p of processes(aid)) {
    const rollup = readFileSync(`/proc/${p.pid}/smaps_rollup`, 'utf8');
    for (const m of rollup.matchAll(/^Private_(?:Clean|Dirty):\s+(\d+) kB$/gm)) kb += Number(m[1]);
  }
  return kb;
}

describe('copy-on-write sharing: a parent and 4 forked workers sharing 64 MiB stay sharing it', () => {
  // Each worker holding its own copy would be 4 x 64 MiB more; sharing,
  // the five hold a few MiB alone (what each wrote after the fork).
  const SHARED_KB = 64 * 1024;
  const measured: string[] = [];
  afterAll(() => console.log(`private memory of parent + 4 workers (kB): ${measured.join('; ')}`));
  roundTrips('cow', [fixture('cowfork')], (aid) => {
    expect(processes(aid)).toHaveLength(5);
    const kb = privateKb(aid);
    measured.push(`${aid} ${kb}`);
    expect(kb).toBeLessThan(SHARED_KB);
  });
});
