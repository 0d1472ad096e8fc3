/**
 * Memory as the application arranged it: mappings keep what the kernel
 * lets their owner do with them (mprotect PROT_WRITE of a read-only file
 * mapping), their madvise state and MAP_DROPPABLE, and copy-on-write
 * sharing between a parent and its forked children. Each fixture checks
 * itself; each goes through a snapshot that ends it and a restore, and
 * through a --leave-running snapshot restored --lazy beside the original.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';
import { addon, PAGES_MODE } from '../src/native.js';
import { readSmaps } from '../src/resources/memory.js';

const sb = new Sandbox();
const out = scratchDir('appshot-memory-');
afterAll(() => sb.dispose());
// Each test's applications are stopped as it ends: the fixtures keep
// checking their memory (cowfork's five processes 64 MiB each, over and
// over), and left running to the file's end they took the CPU of the
// tests after theirs. Nothing looks at them after their test.
afterEach(async () => {
  const aids = sb.aids();
  if (aids.length) await sb.runAsync(['stop', ...aids, '--signal', 'KILL']);
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
  const dir = scratchDir('appshot-memattrs-');
  roundTrips('mattr', [fixture('memattrs'), dir]);
});

describe('a program snapshotted while it reads /proc/self/smaps and maps goes on in the mapping it was in', () => {
  // The restored process's listings are other texts (a --lazy restore
  // lists the page file where there was anonymous memory, one mapping as
  // two): at the same byte offset, the fixture read on in another
  // mapping's record (memattrs once read its dp region's flags without
  // "dp", frozen in the middle of that region's record).
  roundTrips('lst', [fixture('listreader')]);

  // /proc/PID/task/TID/... of a thread other than the main one (what
  // /proc/thread-self/... is there): a restore places descriptors before
  // it makes the other threads, and the old TID is another process's or
  // none by then.
  it("refuses, in one line, a descriptor of another thread's /proc directory, and leaves the program running", async () => {
    const aid = 'lstt';
    run(['run', '-d', '--aid', aid, '--', fixture('listreader'), '--other-thread']);
    await sb.checksPass(aid);
    const r = sb.run(['snapshot', aid, '-o', join(out, aid)]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/process 2 \(listreader\) fd \d+: \/proc\/\d+\/task\/\d+\/maps is of thread \d+, not its process's main thread; another thread's \/proc files cannot be captured yet; the application was left running/);
    await sb.checksPass(aid);
    await exercised(aid);
  });
});

describe('a program snapshotted while it reads its /proc texts goes on at the same line, or at their end', () => {
  // The restored process's /proc/self/io, limits, status and timers are
  // other texts (its own counts and PIDs): at the same byte offset, the
  // fixture read io's second line from its middle (its first, the bytes
  // read, has nine digits in the original and one in the restored
  // process: "io goes on with "", not with its wchar line"), and a text
  // read to its end whose PID gained a digit gave the end of a line again.
  // A status read up to its fourth line went on in the middle of that line
  // ("status goes on with "6075", not with its Ngid line": the snapshot's
  // "t (tracing stop)" is longer than "R (running)"), and a /proc/self/stat
  // read 20 bytes counted as read to its end ("stat read 20 bytes gives 0
  // bytes more").
  roundTrips('prd', [fixture('procreader')]);
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

describe('20,000 mappings each with its own NUMA policy (mbind)', () => {
  // Their masks did not fit the restore's scratch memory at once: the
  // restore failed ("scratch memory exhausted"); its mapping calls now
  // run in as many batches as they need.
  it('come back from a snapshot that ends it, every policy in place', async () => {
    const aid = 'mbindmany';
    run(['run', '-d', '--aid', aid, '--', fixture('mbindmany'), '20000']);
    await sb.checksPass(aid, 2);
    run(['snapshot', aid, '-o', join(out, aid)]);
    run(['restore', join(out, aid)]);
    await sb.checksPass(aid, 2);
    await exercised(aid);
    await sb.checksPass(aid, 2);
  }, 120_000);

  // A --leave-running snapshot arms dirty tracking: a userfaultfd, then
  // each writable mapping registered with it, questions of some 100 bytes
  // each, 400 kB for 4,000, more than the scratch memory holds at once:
  // the later batches use the first's answer (the userfaultfd), and were
  // refused ("questions that use earlier answers do not fit the scratch
  // memory together", hunt h296: manyvmas, 12,000 mappings), the
  // application left running. A JVM holds as many. (4,000, not 20,000:
  // as many batches is all it takes, at a fifth of the time.)
  it('4,000 of them are snapshotted --leave-running, and restored beside the original', async () => {
    const aid = 'mbindlr';
    run(['run', '-d', '--aid', aid, '--', fixture('mbindmany'), '4000']);
    await sb.checksPass(aid, 2);
    run(['snapshot', aid, '-o', join(out, aid), '--leave-running']);
    // Each of them registered with the one userfaultfd (VmFlags uw), the
    // later batches' too: a registration given another descriptor fails
    // on its own, unseen (the snapshot succeeds, the mapping compared
    // instead of tracked).
    const registered = processes(aid).reduce((n, p) => n + readSmaps(p.pid).filter((l) => l.uffdWp).length, 0);
    expect(registered).toBeGreaterThanOrEqual(4000);
    await sb.checksPass(aid, 2);
    run(['restore', join(out, aid), '--aid', `${aid}2`, '--lazy']);
    await sb.checksPass(`${aid}2`, 2);
  }, 120_000);
});

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

describe('the pages a snapshot stores, found with one PAGEMAP_SCAN, are those a pagemap read per mapping finds', () => {
  // A whole image's private mappings are read in one call (dumpScanned);
  // mappings with a parent image or a process forked from, and kernels
  // without PAGEMAP_SCAN, one by one (dump). Both must store the same
  // pages with the same bytes: checked on memodds (anonymous pages of its
  // own letters, a private file mapping with one page written and two
  // only read) and on a Node process (hundreds of mappings, pages never
  // written, the zero page).
  for (const [name, argv] of [
    ['memodds', () => [fixture('memodds'), mkdtempSync(join(out, 'modds-'))]],
    ['node', () => [process.execPath, '-e', 'const keep = [Buffer.alloc(1 << 20), new Uint8Array(4 << 20)]; keep[1][12345] = 1; console.log("READY"); setInterval(() => keep.length, 1000)']],
  ] as const)
    it(`${name}`, async (t) => {
      const [cmd, ...args] = argv();
      const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
      let said = '';
      child.stdout!.on('data', (b: Buffer) => (said += b.toString()));
      const writers: string[] = [mkdtempSync(join(out, 'one-')), mkdtempSync(join(out, 'all-'))];
      try {
        await waitFor(() => said.includes('READY'), 10_000);
        process.kill(child.pid!, 'SIGSTOP');
        await waitFor(() => / T /.test(readFileSync(`/proc/${child.pid}/stat`, 'utf8').replace(/^.*\)/, ')')), 5_000);
        const pid = child.pid!;
        const maps = readSmaps(pid).filter((l) => l.perms[3] === 'p' && (!l.path.startsWith('[') || l.path === '[heap]' || l.path === '[stack]'));
        const modes = Uint8Array.from(maps, (l) => (l.ino === 0n ? PAGES_MODE.anon : PAGES_MODE.privateFile));
        const pagemap = openSync(`/proc/${pid}/pagemap`, 'r');
        const one = new (addon().PageWriter)(writers[0], []);
        const all = new (addon().PageWriter)(writers[1], []);
        try {
          const each = maps.map((l, i) => one.dump(pid, pagemap, l.start, l.end, modes[i]));
          const bounds = BigUint64Array.from(maps.flatMap((l) => [l.start, l.end]));
          const together = all.dumpScanned(pid, pagemap, bounds, modes);
          if (!together) return t.skip('this kernel has no PAGEMAP_SCAN');
          let at = 0;
          each.forEach((d, i) => {
            const runs = Array.from(together.runs.subarray(at, at + together.counts[i] * 2));
            at += together.counts[i] * 2;
            expect({ mapping: maps[i].start.toString(16), offset: together.offsets[i], runs }).toEqual({ mapping: maps[i].start.toString(16), offset: d.offset, runs: Array.from(d.runs) });
          });
          expect(together.pages).toBe(each.reduce((n, d) => n + d.pages, 0));
          // Something of each kind was stored: the comparison is not of nothing.
          expect(together.pages).toBeGreaterThan(0);
          one.finish();
          all.finish();
          one.link(join(writers[0], 'pages'));
          all.link(join(writers[1], 'pages'));
          const stored = readFileSync(join(writers[0], 'pages'));
          expect(readFileSync(join(writers[1], 'pages')).equals(stored)).toBe(true);
          // The buffers those two wrote through are kept for the next page
          // file of this process (pages.c), full of these pages: a third
          // writer reusing them stores the same bytes, nothing of theirs.
          one.close();
          all.close();
          writers.push(mkdtempSync(join(out, 'again-')));
          const again = new (addon().PageWriter)(writers[2], []);
          try {
            again.dumpScanned(pid, pagemap, bounds, modes);
            again.finish();
            again.link(join(writers[2], 'pages'));
          } finally {
            again.close();
          }
          expect(readFileSync(join(writers[2], 'pages')).equals(stored)).toBe(true);
          // (And buffers were kept: this is not three writers with fresh ones.)
          expect(addon().releaseKeptBuffers(0)).toBeGreaterThan(0);
          // And a file's checksum read through a kept buffer, twice, is its bytes'.
          const crc = addon().crc32c(stored);
          expect([addon().crc32cFile(join(writers[2], 'pages')), addon().crc32cFile(join(writers[0], 'pages'))]).toEqual([
            { size: stored.length, crc },
            { size: stored.length, crc },
          ]);
        } finally {
          closeSync(pagemap);
          one.close();
          all.close();
        }
      } finally {
        child.kill('SIGKILL');
        for (const w of writers) rmSync(w, { recursive: true, force: true });
      }
    });
});
