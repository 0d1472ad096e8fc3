/**
 * Address space reserved and hardly used (issue 14: MariaDB reserves
 * 8 TiB PROT_NONE, and each thread's malloc arena is 64 MiB of which a few
 * pages are written): the image holds the pages written and no other, and
 * every mapping comes back at its place with its protection, its written
 * pages, and none of the others there (test/fixtures/reserved.c checks it
 * with mincore). A guard page in a mapping nothing else of which was
 * touched is still seen, and refused, as elsewhere.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
const out = scratchDir('appshot-reserved-');
afterAll(async () => {
  await sb.dispose();
});

const run = (args: string[]) => sb.ok(args);

async function stopped(aid: string): Promise<void> {
  run(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

/** A snapshot's --json result: how many pages its image holds. */
function pagesOf(args: string[]): number {
  const r = JSON.parse(run([...args, '--json'])) as { pages: number };
  expect(typeof r.pages).toBe('number');
  return r.pages;
}

describe('a 64 TiB PROT_NONE reservation, a 4 GiB arena with 3 pages written, 64 MiB never touched', { timeout: 120_000 }, () => {
  it('the image holds the written pages only; each mapping comes back with no other page there (snapshot that ends it; --leave-running, restored --lazy beside; incremental, restored beside)', async () => {
    const first = 'resv1';
    run(['run', '-d', '--aid', first, '--', fixture('reserved')]);
    await sb.checksPass(first);
    // The arena's 3 pages, and the program's own (its stack, libc's data,
    // stdout's buffer): far fewer than one of the 64 MiB untouched, let
    // alone the arena's million.
    const ended = pagesOf(['snapshot', first, '-o', join(out, first)]);
    expect(ended).toBeGreaterThanOrEqual(3);
    expect(ended).toBeLessThan(512);
    run(['restore', join(out, first)]);
    await sb.checksPass(first);
    await sb.exercised(first, 'to use its reservation');
    await sb.checksPass(first);
    await stopped(first);

    const original = 'resv2';
    const copy = 'resv3';
    run(['run', '-d', '--aid', original, '--', fixture('reserved')]);
    await sb.checksPass(original);
    // Its page tables before dirty tracking is armed (by this snapshot).
    const pte = () => Number(/^VmPTE:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${sb.systemPid(original)}/status`, 'utf8'))![1]);
    const before = pte();
    const left = pagesOf(['snapshot', original, '-o', join(out, original), '--leave-running']);
    expect(left).toBeGreaterThanOrEqual(3);
    expect(left).toBeLessThan(512);
    await sb.checksPass(original);
    run(['restore', join(out, original), '--aid', copy, '--lazy']);
    await sb.checksPass(copy);
    await sb.exercised(original, 'to use its reservation');
    await sb.exercised(copy, 'to use its reservation');
    await sb.checksPass(copy);
    await sb.checksPass(original);
    await stopped(copy);

    // Incremental on the first (--leave-running again): the arena's new
    // page is stored, the untouched mapping's too, and the 4 GiB arena,
    // too sparse to track, cost the application no page table for each
    // of its pages (write protection of a range never touched puts a
    // marker in each: 8 MiB of page tables for it).
    const second = pagesOf(['snapshot', original, '-o', join(out, `${original}-2`), '--leave-running']);
    expect(second).toBeGreaterThanOrEqual(3);
    expect(second).toBeLessThan(512);
    expect(pte() - before).toBeLessThan(2048);
    await sb.checksPass(original);
    const again = 'resv4';
    run(['restore', join(out, `${original}-2`), '--aid', again]);
    await sb.checksPass(again);
    await stopped(again);
    await stopped(original);
  });

  /** Runs reserved with `flag`, which prints `MARK 1` (or `MARK 0` where
   * the kernel cannot: the test is skipped), and checks that a snapshot
   * is refused in one line matching `why`, leaving the application running
   * as it was, traced by no one, and no image. */
  async function refusedAtSnapshot(t: { skip: () => void }, aid: string, flag: string, mark: string, why: RegExp): Promise<void> {
    run(['run', '-d', '--aid', aid, '--', fixture('reserved'), flag]);
    await waitFor(() => new RegExp(`^${mark} [01]$`, 'm').test(sb.log(aid)), 10_000, 'the fixture to start');
    if (!new RegExp(`^${mark} 1$`, 'm').test(sb.log(aid))) {
      await stopped(aid);
      t.skip();
    }
    await sb.checksPass(aid);
    const r = sb.run(['snapshot', aid, '-o', join(out, aid)]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(why);
    expect(r.stderr).toContain('the application was left running');
    expect(existsSync(join(out, aid))).toBe(false);
    const status = readFileSync(`/proc/${sb.systemPid(aid)}/status`, 'utf8');
    expect(status).toMatch(/^TracerPid:\s+0$/m);
    await sb.checksPass(aid);
    await stopped(aid);
  }

  it('refuses a mapping of 20 TiB with a page written past 16 TiB (an image numbers pages on 32 bits), naming it, and leaves the application running', async (t) => {
    await refusedAtSnapshot(t, 'resv-huge', '--huge', 'HUGE', /process 2 \(reserved\): the memory at 0x[0-9a-f]+-0x[0-9a-f]+ \(anonymous\) is 20\.0 TiB with pages in it; an image numbers a mapping's pages on 32 bits \(16 TiB\)/);
  });

  it('refuses a guard page (MADV_GUARD_INSTALL) in a mapping nothing else of which was touched, naming it, and leaves the application running', async (t) => {
    await refusedAtSnapshot(t, 'resv-guard', '--guard', 'GUARD', /process 2 \(reserved\): the memory at 0x[0-9a-f]+-0x[0-9a-f]+ \(anonymous\) cannot be read: its page at 0x[0-9a-f]+ is a guard page \(MADV_GUARD_INSTALL\), which cannot be captured/);
  });
});
