/**
 * io_uring instances (resources/iouring.ts) through real snapshots and
 * restores of test/fixtures/iourings.c, which checks its rings itself:
 * one with counters past 1000, two CQEs not reaped and an SQE queued, one
 * idle (CQSIZE); after a restore both at their descriptors and addresses
 * with the same counters in the kernel and the mapping, the queued SQE
 * submitted and the CQEs reaped, new writes and reads served. A ring with
 * a request in flight (a read of an empty pipe) is refused by name, and
 * left working; so is one past the bound on what a restore replays.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-iouring-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

async function stopped(aid: string): Promise<void> {
  sb.ok(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

describe('io_uring: idle rings restored at their descriptors and addresses with their counters', () => {
  it('snapshot (ends it) → restore; --leave-running → restore --lazy beside it', async () => {
    sb.ok(['run', '-d', '--aid', 'iou1', '--', fixture('iourings')]);
    await sb.checksPass('iou1');
    sb.ok(['snapshot', 'iou1', '-o', join(out, 'iou1')]);
    expect(sb.ok(['inspect', join(out, 'iou1')])).toMatch(/io_uring 8\/16 entries, 1004 SQEs consumed, 1 queued, 2 CQEs not reaped/);
    sb.ok(['restore', join(out, 'iou1')]);
    await sb.checksPass('iou1');
    await sb.exercised('iou1', 'to use its rings');
    await sb.checksPass('iou1');
    await sb.exercised('iou1', 'to use its rings');
    await stopped('iou1');

    sb.ok(['run', '-d', '--aid', 'iou2', '--', fixture('iourings')]);
    await sb.checksPass('iou2');
    await sb.exercised('iou2', 'to use its rings');
    sb.ok(['snapshot', 'iou2', '-o', join(out, 'iou2'), '--leave-running']);
    await sb.checksPass('iou2');
    sb.ok(['restore', join(out, 'iou2'), '--aid', 'iou3', '--lazy']);
    await sb.checksPass('iou3');
    await sb.exercised('iou2', 'to use its rings');
    await sb.exercised('iou3', 'to use its rings');
    await sb.checksPass('iou3');
    await stopped('iou2');
    await stopped('iou3');
  });

  it('a template: each clone its own rings, at the same addresses, with the same counters', async () => {
    sb.ok(['run', '-d', '--aid', 'iout', '--', fixture('iourings')]);
    await sb.checksPass('iout');
    sb.ok(['snapshot', 'iout', '-o', join(out, 'iout')]);
    sb.ok(['template', 'create', join(out, 'iout'), '-o', join(out, 'iout.template')]);
    sb.ok(['clone', join(out, 'iout.template'), '--aid', 'iouc', '--count', '2']);
    for (const aid of ['iouc-1', 'iouc-2']) await sb.checksPass(aid);
    await sb.exercised('iouc-1', 'to use its rings');
    await sb.checksPass('iouc-2');
    await sb.exercised('iouc-2', 'to use its rings');
    for (const aid of ['iouc-1', 'iouc-2']) await stopped(aid);
  });

  it('a ring past the bound (more than 2^24 SQEs consumed, as many NOPs to restore): refused by name, left working', async () => {
    sb.ok(['run', '-d', '--aid', 'iou5', '--', fixture('iourings'), '--nops', String(2 ** 24 + 4)]);
    await sb.checksPass('iou5');
    const r = sb.run(['snapshot', 'iou5', '-o', join(out, 'iou5')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(`process 2 (iourings) fd 7: its io_uring has consumed ${2 ** 24 + 8} SQEs, more than the ${2 ** 24} a restore brings a new ring's counters to (by as many NOPs); the application was left running`);
    expect(existsSync(join(out, 'iou5'))).toBe(false);
    await sb.exercised('iou5', 'to use its rings');
    await stopped('iou5');
  });

  it('a ring with a request in flight: refused by name, the application and its rings left working', async () => {
    sb.ok(['run', '-d', '--aid', 'iou4', '--', fixture('iourings'), '--in-flight']);
    await sb.checksPass('iou4');
    const r = sb.run(['snapshot', 'iou4', '-o', join(out, 'iou4')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/process 2 \(iourings\) fd 9: its io_uring has 1 request\(s\) waiting on a poll \(op=22, task_works=0\): requests in flight \(submitted, not completed\), which live only in the kernel and cannot be captured; the application was left running/);
    expect(existsSync(join(out, 'iou4'))).toBe(false);
    expect(readFileSync(`/proc/${sb.systemPid('iou4')}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
    await sb.checksPass('iou4');
    await sb.exercised('iou4', 'to use its rings');
    await stopped('iou4');
  });
});
