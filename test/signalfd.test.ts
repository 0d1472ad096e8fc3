/**
 * signalfd (every PostgreSQL >= 15 process holds one): the fixture's two
 * signalfds keep their masks and flags through snapshot and restore, and a
 * signal queued before the snapshot is read through one after it.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-sigfd-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const logOf = (aid: string) => sb.log(aid);
const checksPass = (aid: string) => sb.checksPass(aid);

/** SIGHUP makes the fixture read the queued signal and raise two more. */
async function exercised(aid: string): Promise<void> {
  const pid = (sb.json<{ processes: { vpid: number; pid: number }[] }[]>(['ps', aid])[0].processes.find((p) => p.vpid === 2)!).pid;
  process.kill(pid, 'SIGHUP');
  await waitFor(() => /EXERCISED|FAIL/.test(logOf(aid)), 15_000, `${aid} to read its signals`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
  expect(logOf(aid)).toMatch(/^EXERCISED$/m);
}

function run(args: string[]): void {
  const r = sb.run(args);
  if (r.code !== 0) throw new Error(`appshot ${args.join(' ')}: ${r.stderr}`);
}

describe('signalfd', () => {
  it('comes back with its mask and flags; a queued signal is read after the restore', async () => {
    run(['run', '-d', '--aid', 'sigfd', '--', fixture('sigfd')]);
    await checksPass('sigfd');
    run(['snapshot', 'sigfd', '-o', join(out, 'sigfd')]);
    expect(sb.run(['inspect', join(out, 'sigfd')]).stdout).toMatch(/SIGNALFD\s+signalfd reading signals 12,36/);
    run(['restore', join(out, 'sigfd')]);
    await checksPass('sigfd');
    await exercised('sigfd');
  });

  it('from a --leave-running snapshot, restored --lazy beside the original', async () => {
    run(['run', '-d', '--aid', 'sigfd2', '--', fixture('sigfd')]);
    await checksPass('sigfd2');
    run(['snapshot', 'sigfd2', '-o', join(out, 'sigfd2'), '--leave-running']);
    await checksPass('sigfd2');
    run(['restore', join(out, 'sigfd2'), '--aid', 'sigfd3', '--lazy']);
    await checksPass('sigfd3');
    await exercised('sigfd3');
    await exercised('sigfd2');
  });

  // The preload library marks a signalfd's number to translate the PIDs
  // its reads return; a mark that outlived a close made without it
  // rewrote the reads of whatever took the number next (review33 L12).
  it("closed by a raw close, leaves the reads of the inotify descriptor that takes its number as the kernel wrote them", async () => {
    const dir = join(out, 'watched');
    mkdirSync(dir);
    run(['run', '-d', '--aid', 'sigfdreuse', '--', fixture('sigfdreuse'), dir]);
    await waitFor(() => /^(SIGFDREUSE OK|FAIL.*)$/m.test(logOf('sigfdreuse')), 15_000, 'the verdict of sigfdreuse');
    expect(/^(SIGFDREUSE OK|FAIL.*)$/m.exec(logOf('sigfdreuse'))![0]).toBe('SIGFDREUSE OK');
    run(['rm', '-f', 'sigfdreuse']);
  });
});
