/**
 * A command that read one registration of an AID and goes on with it late,
 * after that registration went and another was made under the AID, acts on
 * the first only: it never removes the new one's state directory nor writes
 * its own record over the new one's (review r451 F1, F2: the new
 * application then ran unregistered, its table file left in /dev/shm).
 *
 * The order is forced with the test-only stop points (src/killpoint.ts):
 * the late command stopped at its point while the test releases the first
 * registration and registers the AID again, then continued. Each step
 * waits on a condition, never on time.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { alive, processesWithArgument, Sandbox, stoppedAt, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

// Several commands in a row, each a Node start: seconds each on a loaded
// machine. Only a bound on a hung test: nothing here is timed.
vi.setConfig({ testTimeout: 240_000 });

const sb = new Sandbox();
const dir = scratchDir('appshot-rereg-');
/** What a failing test leaves of a second registration: its processes
 * (by the FIFO they name) and its table file, which nothing else removes
 * once its record is lost. */
const leftovers: { marker: string; tables: string }[] = [];
afterAll(async () => {
  for (const { marker, tables } of leftovers) {
    for (const pid of processesWithArgument(marker)) process.kill(pid, 'SIGKILL');
    rmSync(tables, { force: true });
  }
  await sb.dispose();
});

interface Record {
  tables: string;
  initPid?: number;
}

const recordOf = (aid: string): Record | undefined => {
  try {
    return JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')) as Record;
  } catch {
    return undefined;
  }
};

const stateOf = (aid: string) => sb.json<{ aid: string; state: string }[]>(['ps', '-a']).find((a) => a.aid === aid)?.state;

/** A FIFO in the test's directory: a shell waiting in its open names it,
 * and so does its init, which tells the test's processes from others'. */
function fifo(name: string): string {
  const path = join(dir, `${name}.fifo`);
  expect(spawnSync('mkfifo', [path]).status).toBe(0);
  return path;
}

/** `aid` registered, its supervisor and application then killed with
 * SIGKILL, init first: nobody wrote how it ended, and its registration is
 * stale, for the next look to release. */
async function staleRegistration(aid: string): Promise<Record> {
  const marker = fifo(`${aid}.first`);
  const r = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'read x < "$0"', marker]);
  expect(r.code, r.stderr).toBe(0);
  const first = recordOf(aid)!;
  expect(first.initPid).toBeGreaterThan(0);
  process.kill(first.initPid!, 'SIGKILL');
  await waitFor(() => !alive(first.initPid!), 30_000, `${aid}'s init to be gone`);
  const pids = processesWithArgument(marker);
  for (const pid of pids) process.kill(pid, 'SIGKILL');
  await waitFor(() => !pids.some(alive), 30_000, `${aid}'s shell to be gone`);
  expect(existsSync(first.tables), 'the stale registration keeps its table file').toBe(true);
  return first;
}

/** The AID registered again by a `run -d`, its application waiting. */
function registerAgain(aid: string): { record: Record; running: number[] } {
  const marker = fifo(`${aid}.second`);
  const r = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'read x < "$0"', marker]);
  expect(r.code, r.stderr).toBe(0);
  leftovers.push({ marker, tables: recordOf(aid)!.tables });
  const running = processesWithArgument(marker);
  expect(running.length, `${aid}'s second init and shell`).toBeGreaterThanOrEqual(2);
  return { record: recordOf(aid)!, running };
}

/** The second registration as it was made: its record, its table file,
 * its processes, running in `ps`; then removed. */
async function expectIntactThenRemove(aid: string, second: { record: Record; running: number[] }): Promise<void> {
  expect(recordOf(aid)).toMatchObject({ tables: second.record.tables, initPid: second.record.initPid });
  expect(existsSync(second.record.tables), "the second registration's table file").toBe(true);
  expect(second.running.filter(alive)).toEqual(second.running);
  expect(stateOf(aid)).toBe('running');
  const rm = sb.run(['rm', '-f', aid]);
  expect(rm.code, rm.stderr).toBe(0);
  await waitFor(() => !second.running.some(alive), 30_000, `${aid}'s second processes to be gone`);
  expect(existsSync(second.record.tables)).toBe(false);
}

describe('a registration released late by a command that read it before it went', () => {
  it('found stale, its record read again after the AID was registered anew: the new one is not released', async () => {
    const aid = 'late-settle';
    const first = await staleRegistration(aid);
    // ps read the first record and found it stale; stopped before it
    // reads the record again (registry.ts settle).
    const late = await stoppedAt(sb, ['ps', '-a'], 'settle: found stale', `ps to stop at 'settle: found stale'`);
    // Another look releases it whole, and the AID is registered again.
    expect(sb.run(['ps', '-a']).code).toBe(0);
    expect(recordOf(aid)).toBeUndefined();
    expect(existsSync(first.tables)).toBe(false);
    const second = registerAgain(aid);
    const r = await late.go();
    expect(r.code, r.stderr).toBe(0);
    await expectIntactThenRemove(aid, second);
  });

  it('its state directory about to be removed when the AID is registered anew: the new one is put back, not removed', async () => {
    const aid = 'late-remove';
    await staleRegistration(aid);
    // ps releasing the first registration, its record checked and its
    // state directory not yet moved aside (registry.ts removeStateDirOf).
    const late = await stoppedAt(sb, ['ps', '-a'], 'release: state directory checked', `ps to stop at 'release: state directory checked'`);
    // Another look removes it meanwhile, and the AID is registered again:
    // the directory the late one moves aside is the second's.
    expect(sb.run(['ps', '-a']).code).toBe(0);
    expect(recordOf(aid)).toBeUndefined();
    const second = registerAgain(aid);
    const r = await late.go();
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    await expectIntactThenRemove(aid, second);
  });
});

describe('appshot run whose command cannot be executed', () => {
  it('does not write its record over a registration made under the AID after init removed its own', async () => {
    const aid = 'late-run';
    // Stopped once init runs, before the run writes init's PID in the
    // record; init fails to execute the command and removes the
    // registration meanwhile.
    const run = await stoppedAt(sb, ['run', '-d', '--aid', aid, '--', join(dir, 'no-such-command')], 'run: init spawned', `run to stop at 'run: init spawned'`);
    await waitFor(() => !existsSync(join(sb.home, 'apps', aid)), 30_000, `init to remove ${aid}'s registration`);
    const second = registerAgain(aid);
    const r = await run.go();
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain('no-such-command');
    await expectIntactThenRemove(aid, second);
  });
});

describe('stop and rm -f, their application ended after the signal and the AID registered again before they look', () => {
  it('take the one signalled as gone, print its AID and exit 0, and leave the new one as it is', async () => {
    // Stopped once the signal is sent (lifecycle.ts stopApp, removeApps);
    // meanwhile the application ends, its record is removed and the AID
    // registered again (review r451 F3: stop waited on the new one and
    // failed after 30 s; rm -f would remove it once ended).
    for (const [point, args] of [
      ['stop: signalled', ['stop', '-t', '1']],
      ['rm -f: killed', ['rm', '-f']],
    ] as const) {
      const aid = `late-${args[0]}`;
      const marker = fifo(`${aid}.first`);
      const r = sb.run(['run', '-d', '--aid', aid, '--', 'sh', '-c', 'read x < "$0"', marker]);
      expect(r.code, r.stderr).toBe(0);
      const pids = processesWithArgument(marker);
      expect(pids.length, `${aid}'s init and shell`).toBeGreaterThanOrEqual(2);
      const late = await stoppedAt(sb, [...args, aid], point, `${args.join(' ')} to stop at '${point}'`);
      await waitFor(() => !pids.some(alive), 30_000, `${aid}'s first processes to be gone`);
      // Ended (its record kept) or released (init killed with it): gone
      // either way once rm has looked.
      sb.run(['rm', aid]);
      expect(recordOf(aid)).toBeUndefined();
      const second = registerAgain(aid);
      const done = await late.go();
      expect(done.code, done.stderr).toBe(0);
      expect(done.stdout).toBe(`${aid}\n`);
      await expectIntactThenRemove(aid, second);
    }
  });
});
