/**
 * AIO contexts (resources/aio.ts) through real snapshots and restores of
 * test/fixtures/aiorings.c, which checks its contexts itself: one holding
 * two completed events not reaped, one idle; after a restore both at
 * their addresses, the events reaped with their tags and results, new
 * requests served. A context with a request in flight (a poll on a pipe
 * nobody writes to) is refused by name, and left working.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, snapshotKilledAt, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-aio-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

async function stopped(aid: string): Promise<void> {
  sb.ok(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

describe('AIO contexts (io_setup): idle ones restored at their addresses with their completed events', () => {
  it('snapshot (ends it) → restore; --leave-running → restore --lazy beside it', async () => {
    sb.ok(['run', '-d', '--aid', 'aio1', '--', fixture('aiorings')]);
    await sb.checksPass('aio1');
    sb.ok(['snapshot', 'aio1', '-o', join(out, 'aio1')]);
    expect(sb.ok(['inspect', join(out, 'aio1')])).toMatch(/AIO contexts: 0x[0-9a-f]+ \(127 events, 2 completed not reaped\), 0x[0-9a-f]+ \(\d+ events, 0 completed not reaped\)/);
    sb.ok(['restore', join(out, 'aio1')]);
    await sb.checksPass('aio1');
    await sb.exercised('aio1', 'to use its contexts');
    await sb.checksPass('aio1');
    await stopped('aio1');

    sb.ok(['run', '-d', '--aid', 'aio2', '--', fixture('aiorings')]);
    await sb.checksPass('aio2');
    sb.ok(['snapshot', 'aio2', '-o', join(out, 'aio2'), '--leave-running']);
    // The original, probed for requests in flight, holds the same events.
    await sb.checksPass('aio2');
    sb.ok(['restore', join(out, 'aio2'), '--aid', 'aio3', '--lazy']);
    await sb.checksPass('aio3');
    await sb.exercised('aio2', 'to use its contexts');
    await sb.exercised('aio3', 'to use its contexts');
    await sb.checksPass('aio3');
    await stopped('aio2');
    await stopped('aio3');
  });

  it('a template: each clone its own contexts, at the same addresses, with the same events', async () => {
    sb.ok(['run', '-d', '--aid', 'aiot', '--', fixture('aiorings')]);
    await sb.checksPass('aiot');
    sb.ok(['snapshot', 'aiot', '-o', join(out, 'aiot')]);
    sb.ok(['template', 'create', join(out, 'aiot'), '-o', join(out, 'aiot.template')]);
    sb.ok(['clone', join(out, 'aiot.template'), '--aid', 'aioc', '--count', '2']);
    for (const aid of ['aioc-1', 'aioc-2']) await sb.checksPass(aid);
    await sb.exercised('aioc-1', 'to use its contexts');
    await sb.checksPass('aioc-2');
    await sb.exercised('aioc-2', 'to use its contexts');
    for (const aid of ['aioc-1', 'aioc-2']) await stopped(aid);
  });

  it('a context with a request in flight: refused by name, the application and its contexts left working', async () => {
    sb.ok(['run', '-d', '--aid', 'aio4', '--', fixture('aiorings'), '--in-flight']);
    await sb.checksPass('aio4');
    const r = sb.run(['snapshot', 'aio4', '-o', join(out, 'aio4')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(
      /process 2 \(aiorings\): the AIO context \(io_setup\) at 0x[0-9a-f]+ has 1 of its \d+ request slots neither free nor holding a completed event: requests in flight \(submitted, not completed\), which live only in the kernel and cannot be captured; the application was left running/,
    );
    expect(existsSync(join(out, 'aio4'))).toBe(false);
    expect(readFileSync(`/proc/${sb.systemPid('aio4')}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
    await sb.checksPass('aio4');
    // The poll still in flight completes, the events probed are gone.
    await sb.exercised('aio4', 'to use its contexts');
    await stopped('aio4');
  });
});

// The probe for requests in flight moves the frozen thread from CPU to CPU
// and submits requests into its contexts: a snapshot killed (kill -9)
// meanwhile lets the application go on at once, and must leave none of
// it behind. The test-only points: 'snapshot: aio pinned' kills appshot
// once the thread is on its first CPU, before any request;
// 'snapshot: aio put back' once the ring is put back, before the affinity.
// (The application is held in a job-control stop meanwhile: see
// snapshotKilledAt.)
describe('a snapshot killed (kill -9) while it probes a context for requests in flight', () => {
  for (const point of ['snapshot: aio pinned', 'snapshot: aio put back']) {
    it(`at '${point}': the thread's CPU affinity, the process's descriptors and its contexts as they were, and it runs untraced`, async () => {
      const aid = point.endsWith('pinned') ? 'aiok1' : 'aiok2';
      sb.ok(['run', '-d', '--aid', aid, '--', fixture('aiorings')]);
      await sb.checksPass(aid);
      const pid = sb.systemPid(aid);
      // Less the one its checks open for a moment (/proc/self/maps, read
      // every check): it may be there at one read and not the next, or
      // gone between the listing and its readlink (a failure of ci-49c).
      const descriptors = () =>
        readdirSync(`/proc/${pid}/fd`)
          .flatMap((fd) => {
            try {
              const to = readlinkSync(`/proc/${pid}/fd/${fd}`);
              return /^\/proc\/\d+\/maps$/.test(to) ? [] : [`${fd} ${to}`];
            } catch {
              return [];
            }
          })
          .sort();
      const cpus = () => /^Cpus_allowed_list:\s*(\S+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1];
      const [fdsBefore, cpusBefore] = [descriptors(), cpus()];
      const image = join(out, aid);
      await snapshotKilledAt(sb, aid, pid, image, point);
      expect(cpus()).toBe(cpusBefore);
      expect(descriptors()).toEqual(fdsBefore);
      expect(existsSync(image)).toBe(false);
      process.kill(pid, 'SIGCONT');
      // Its own checks: its affinity, each context's completed events not
      // reaped (2 and 0); then those reaped with their tags and results,
      // and new requests served.
      await sb.checksPass(aid, 3);
      await sb.exercised(aid, 'to use its contexts');
      await sb.checksPass(aid, 2);
      // The next snapshot is whole.
      sb.ok(['snapshot', aid, '-o', image]);
      sb.ok(['restore', image]);
      await sb.checksPass(aid);
      await sb.exercised(aid, 'to use its contexts');
      await stopped(aid);
    }, 180_000);
  }
});
