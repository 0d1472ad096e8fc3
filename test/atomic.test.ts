/**
 * All or nothing under kill -9: `appshot restore` and `appshot clone
 * --count 4` are killed at every phase they go through (the test-only
 * APPSHOT_TEST_KILL_AT makes appshot SIGKILL itself there). Afterwards the
 * next command finds no process, SysV object, table, registration, port
 * claim, private copy or directory of the restore, the image is unchanged,
 * and the AID can be used at once. Killed after the commit, the
 * application is whole and runs.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli, command, describeIpc, fixture, Sandbox, seizedByAnotherTracer, spawnAsync, strayIpcIds, systemIpcIds, tcpExchange, templfixTemplate, usedBytes, waitFor, withTmpfs } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
const dir = scratchDir('appshot-atomic-');
const ROOT = join(dir, 'srv');
// Ports of their own (the map: helpers.ts, Sandbox).
const base = 22000 + ((process.pid * 3) % 800);
let ipcBefore = systemIpcIds();
/** The PID of the appshot last killed at a point, and the point: a stray
 * SysV object it made or last set is named as its. */
let killed: Record<number, string> = {};

afterAll(() => sb.dispose());

// One resident engine for the whole file, started first and kept (not
// gone after 60 s in which only commands with APPSHOT_ENGINE=off ran):
// every command a test runs to look or to set up (ps, rm, restore,
// snapshot; not run) is handed to it warm, not run by a Node started
// cold (~0.5 s of CPU each, several per test). The commands under
// test (killed, failed or interrupted at a point) run in their own
// process as before.
beforeAll(async () => {
  const r = await spawnAsync(command, ['engine', 'start'], { env: { ...sb.env, APPSHOT_ENGINE_IDLE: '1800' } });
  expect(r.status, r.stderr).toBe(0);
});

/** `appshot run -d --aid AID -- argv...` through the API in this process:
 * the same start (harness, init, preload), without a Node started cold
 * for it (run is a command the engine does not take). What is tested
 * here is what comes after. */
async function runDetached(aid: string, argv: string[]): Promise<void> {
  const api = await import('../src/api.js');
  await api.run(argv, { home: sb.home, aid });
}

/** appshot with APPSHOT_TEST_KILL_AT=point: it must die of SIGKILL there.
 * The SysV objects outside every application just before are the baseline
 * (other tests' objects come and go). */
function killedAt(point: string, args: string[]): void {
  ipcBefore = systemIpcIds();
  const r = spawnSync(process.execPath, [cli, ...args], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: point }, encoding: 'utf8', timeout: 50_000 });
  killed = r.pid ? { [r.pid]: `the appshot killed at '${point}'` } : {};
  expect(r.signal, `appshot ${args.join(' ')} was to be killed at '${point}': ${r.stderr}`).toBe('SIGKILL');
}

/** Every file of an image and its bytes' hash. */
function digest(path: string): Record<string, string> {
  return Object.fromEntries(readdirSync(path).sort().map((f) => [f, createHash('sha256').update(readFileSync(join(path, f))).digest('hex')]));
}

/** System PIDs whose command line or environment names any of `words`. */
function processesNaming(...words: string[]): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
      const env = readFileSync(`/proc/${name}/environ`, 'utf8').split('\0');
      if (words.some((word) => cmd.includes(word) || env.includes(word))) out.push(Number(name));
    } catch {
      /* gone, or not ours to read */
    }
  }
  return out;
}

/** What the next command must find of an AID that never committed: nothing.
 * Of several AIDs (a batch's instances), each looked at in the same pass:
 * one command, one walk of /proc, one look at the SysV objects for all. */
async function nothingLeftOf(aid: string | string[], imageAid: string): Promise<void> {
  const aids = typeof aid === 'string' ? [aid] : aid;
  const named = aids.join(', ');
  // The next command (any) releases what an abandoned restore left.
  expect(sb.run(['ps']).code).toBe(0);
  await waitFor(() => processesNaming(...aids, `APPSHOT_AID=${imageAid}`).length === 0, 10_000, `the processes of ${named} to be gone`);
  await waitFor(() => (sb.run(['ps']), !sb.aids().some((a) => aids.includes(a))), 10_000, `the registration of ${named} to go`);
  expect(sb.shmFiles().filter((f) => aids.some((a) => f.includes(`-${a}-`)))).toEqual([]);
  // Other tests' applications may be between making an object and binding
  // it in their tables: only what stays is ours.
  await waitFor(() => strayIpcIds(ipcBefore).length === 0, 10_000, 'no SysV object outside every application').catch(() => undefined);
  const strays = strayIpcIds(ipcBefore);
  expect(strays, describeIpc(strays, killed)).toEqual([]);
  const claims = existsSync(join(sb.home, 'ports')) ? readdirSync(join(sb.home, 'ports')).map((p) => readFileSync(join(sb.home, 'ports', p), 'utf8')) : [];
  expect(claims.filter((c) => aids.some((a) => c.includes(`"${a}"`)))).toEqual([]);
  const instances = existsSync(join(sb.home, 'instances')) ? readdirSync(join(sb.home, 'instances')) : [];
  expect(instances.filter((d) => aids.some((a) => d.startsWith(`${a}.`)))).toEqual([]);
}

describe('a restore killed at any instant', () => {
  let image = '';
  let before: Record<string, string> = {};

  beforeAll(async () => {
    await runDetached('src', [fixture('snapfix'), String(base), '2']);
    await waitFor(() => /^CHECK 2$/m.test(readFileSync(join(sb.home, 'apps', 'src', 'log'), 'utf8')), 10_000, 'snapfix to start');
    image = join(dir, 'snap');
    const s = sb.run(['snapshot', 'src', '-o', image]);
    expect(s.code, s.stderr).toBe(0);
    await waitFor(() => !sb.aids().includes('src'), 10_000, 'the source to end');
    before = digest(image);
  });

  // 'sysv object made': inside the making of the first SysV object, once
  // the kernel has made it and before its id is in the tables (a point in
  // the addon's CreateBound): found by its key, which is bound first.
  const phases = ['registered', 'sysv object made', 'global state', 'init started', 'tree made', 'process 2', 'process 3', 'memory', 'fds', 'threads'];
  for (const phase of phases) {
    it(`leaves nothing when killed at '${phase}', and the AID is free at once`, async () => {
      killedAt(`restore: ${phase}`, ['restore', image, '--aid', 'atom']);
      await nothingLeftOf('atom', 'src');
      expect(digest(image)).toEqual(before);
      // The same AID at once, and the image restores whole.
      const again = sb.run(['restore', image, '--aid', 'atom']);
      expect(again.code, again.stderr).toBe(0);
      // An ended application keeps its AID until it is removed.
      expect(sb.run(['rm', '-f', 'atom']).code).toBe(0);
      await nothingLeftOf('atom', 'src');
    });
  }

  it('killed just after its commit, the application is whole and runs', async () => {
    killedAt('restore: committed', ['restore', image, '--aid', 'done']);
    const log = () => readFileSync(join(sb.home, 'apps', 'done', 'log'), 'utf8');
    const checks = () => (log().match(/^CHECK \d+$/gm) ?? []).length;
    const from = checks();
    await waitFor(() => checks() >= from + 5 || /FAIL/.test(log()), 15_000, 'the committed application to check itself');
    expect(log()).not.toMatch(/FAIL.*/);
    expect(sb.json<{ processes: unknown[] }[]>(['ps', 'done'])[0].processes).toHaveLength(3);
    expect(sb.run(['rm', '-f', 'done']).code).toBe(0);
  });

  // A step after the commit that fails (here made to, at the phase named
  // after the commit and before its processes are let go, and at the
  // last) does not undo it: the application is left running and
  // registered, and the failure said with an exit code of its own.
  const SAID = (aid: string, point: string, prefix = 'appshot: ') =>
    new RegExp(`^${prefix}restored .+ as '${aid}', which runs and is registered, but a step after its commit failed: failure injected at 'restore: ${point}'`);

  for (const point of ['committed', 'resumed']) {
    it(`failing just after '${point}': exit 6, one line, and the application runs`, async () => {
      const aid = `fail-${point}`;
      // Its AID on stdout as on success (with --json, the result and the
      // error): a script needs it, the application runs.
      const json = point === 'resumed';
      const r = spawnSync(process.execPath, [cli, 'restore', image, '--aid', aid, ...(json ? ['--json'] : [])], {
        env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: `restore: ${point}` },
        encoding: 'utf8',
        timeout: 50_000,
      });
      expect(r.status, r.stderr).toBe(6);
      expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(SAID(aid, point))]);
      if (json) expect(JSON.parse(r.stdout)).toMatchObject({ schema: 'appshot.restore/1', aid, error: expect.stringMatching(SAID(aid, point, '')) });
      else expect(r.stdout).toBe(`${aid}\n`);
      await sb.checksPass(aid, 3);
      const [app] = sb.json<{ state: string; image: string; processes: unknown[] }[]>(['ps', aid]);
      expect(app).toMatchObject({ state: 'running', image });
      expect(app.processes).toHaveLength(3);
      expect(sb.run(['rm', '-f', aid]).code).toBe(0);
      await nothingLeftOf(aid, 'src');
    });
  }

  it('failing just after its commit in a process that lives on (the API, as in the engine): its processes are let go, not left stopped', async () => {
    const api = await import('../src/api.js');
    process.env.APPSHOT_TEST_FAIL_AT = 'restore: committed';
    const failed = await api.restore(image, { home: sb.home, aid: 'fail-api' }).catch((e: unknown) => e);
    delete process.env.APPSHOT_TEST_FAIL_AT;
    expect(failed).toBeInstanceOf(api.RestoredWithError);
    expect(failed).toMatchObject({ exitCode: 6, message: expect.stringMatching(SAID('fail-api', 'committed', '')), restored: { aid: 'fail-api', processes: 2 } });
    // Still traced by this process, they would sit in a tracing stop
    // and check nothing.
    await sb.checksPass('fail-api', 3);
    const [app] = sb.json<{ state: string; processes: { pid: number; init: boolean }[] }[]>(['ps', 'fail-api']);
    expect(app.state).toBe('running');
    for (const p of app.processes.filter((p) => !p.init)) expect(stateOf(p.pid)).not.toBe('t');
    expect(sb.run(['rm', '-f', 'fail-api']).code).toBe(0);
    await nothingLeftOf('fail-api', 'src');
  });
});

/** The application checks itself (3 more times), is listed running, and
 * none of its processes is stopped or traced: a failed snapshot left it
 * as it was. */
async function runsUntraced(aid: string): Promise<void> {
  await sb.checksPass(aid, 3);
  const listed = sb.json<{ aid: string; state: string; processes: { pid: number }[] }[]>(['ps', '-a']).filter((a) => a.aid === aid);
  expect(listed.map((a) => a.state)).toEqual(['running']);
  for (const p of listed[0].processes) {
    expect(stateOf(p.pid)).not.toBe('t');
    expect(readFileSync(`/proc/${p.pid}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
  }
}

/** A process's state letter (R, S, T for stopped...), '' once it is gone. */
function stateOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0];
  } catch {
    return '';
  }
}

/** appshot with APPSHOT_TEST_STOP_AT=point: once it has stopped itself
 * there, Ctrl-C (SIGINT) reaches it, and it is continued. Deterministic:
 * the signal lands at that point, however long the phases before took. */
async function interruptedAt(point: string, args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  ipcBefore = systemIpcIds();
  const child = spawn(process.execPath, [cli, ...args], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: point, ...env } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  await waitFor(() => stateOf(child.pid!) === 'T' || child.exitCode !== null, 60_000, `appshot ${args.join(' ')} to reach '${point}'`);
  expect(child.exitCode, `appshot ${args.join(' ')} ended before '${point}': ${stderr}`).toBeNull();
  child.kill('SIGINT');
  child.kill('SIGCONT');
  return { code: await exited, stdout, stderr };
}

describe('a restore interrupted by Ctrl-C', () => {
  // The phases' tests need a tree of processes, not bytes: a small image.
  // The big one (256 MiB of heap) only where Ctrl-C must land while its
  // page data are checked or copied, which takes a while.
  let small = '';
  let tarImage = '';
  let big = '';
  const before = new Map<string, Record<string, string>>();
  const tmpEntries = () => (existsSync(join(sb.home, 'tmp')) ? readdirSync(join(sb.home, 'tmp')) : []);

  /** An image of snapfix with `mib` MiB of heap, its source `aid` ended
   * (by a second snapshot, to `tar`, if given). */
  async function imageOf(aid: string, mib: number, tar?: string): Promise<string> {
    await runDetached(aid, [fixture('snapfix'), '-1', String(mib)]);
    await sb.checksPass(aid, 2);
    const image = join(dir, `${aid}.appshot`);
    const s1 = sb.run(['snapshot', aid, '-o', image, ...(tar ? ['--leave-running'] : [])]);
    expect(s1.code, s1.stderr).toBe(0);
    if (tar) {
      const s2 = sb.run(['snapshot', aid, '-o', tar]);
      expect(s2.code, s2.stderr).toBe(0);
    }
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
    before.set(image, digest(image));
    return image;
  }

  beforeAll(async () => {
    tarImage = join(dir, 'smallsrc.tar');
    small = await imageOf('smallsrc', 8, tarImage);
    big = await imageOf('bigsrc', 256);
  }, 120_000);

  /** Nothing of the restore (as `aid`, of `source`'s image) the moment
   * appshot has exited, before any other command could sweep up after it. */
  async function nothingLeftAtOnce(aid: string, source = 'smallsrc'): Promise<void> {
    expect(processesNaming(aid)).toEqual([]);
    expect(processesNaming(`APPSHOT_AID=${source}`)).toEqual([]);
    expect(sb.allAids()).not.toContain(aid);
    expect(sb.shmFiles().filter((f) => f.includes(`-${aid}-`))).toEqual([]);
    expect(tmpEntries()).toEqual([]);
    // Other tests' applications may be between making an object and
    // binding it in their tables: only what stays is ours.
    await waitFor(() => strayIpcIds(ipcBefore).length === 0, 10_000, 'no SysV object outside every application').catch(() => undefined);
    expect(strayIpcIds(ipcBefore)).toEqual([]);
  }

  const INTERRUPTED = 'appshot: interrupted: nothing was restored, the image is as it was';

  // 'process 2' comes just before its heap is copied (while the tree is
  // made: its child shares those pages), 'memory' just after; 'process 3'
  // is the last process's copy, after which only the commit was left.
  for (const phase of ['registered', 'init started', 'process 2', 'memory', 'tree made', 'fds', 'process 3']) {
    it(`at '${phase}': one line, exit 130, nothing left, the image as it was`, async () => {
      const aid = `intr-${phase.replace(' ', '-')}`;
      const r = await interruptedAt(`restore: ${phase}`, ['restore', small, '--aid', aid]);
      expect(r.stderr.trim().split('\n')).toEqual([INTERRUPTED]);
      expect(r.stdout).toBe('');
      expect(r.code).toBe(130);
      await nothingLeftAtOnce(aid);
      expect(digest(small)).toEqual(before.get(small));
    }, 120_000);
  }

  it('while its 256 MiB of page data are checked: at once, not once they all are', async () => {
    // Killed (SIGKILL, not exit 130) if it checked them all before
    // hearing Ctrl-C.
    // --verify: written by this node and unchanged, they would not be
    // checked at all (src/image/written.ts).
    const r = await interruptedAt('image: checking pages', ['restore', '--verify', big, '--aid', 'intr-check'], { APPSHOT_TEST_KILL_AT: 'image: pages checked' });
    expect(r.stderr.trim().split('\n')).toEqual([INTERRUPTED]);
    expect(r.code).toBe(130);
    await nothingLeftAtOnce('intr-check', 'bigsrc');
  }, 120_000);

  it("while one process's 256 MiB are copied: after the slice being copied, not once they all are", async () => {
    // Killed (SIGKILL, not exit 130) if the copy went on to its second
    // 32 MiB slice after Ctrl-C came during the first.
    const r = await interruptedAt('restore: process 2 slice 1', ['restore', big, '--aid', 'intr-copy'], { APPSHOT_TEST_KILL_AT: 'restore: process 2 slice 2' });
    expect(r.stderr.trim().split('\n')).toEqual([INTERRUPTED]);
    expect(r.code).toBe(130);
    await nothingLeftAtOnce('intr-copy', 'bigsrc');
    expect(digest(big)).toEqual(before.get(big));
  }, 120_000);

  it('template create, while the 256 MiB are checked: one line, exit 130, no template and nothing half-made', async () => {
    const out = join(dir, 'intr.template');
    const r = await interruptedAt('image: checking pages', ['template', 'create', big, '-o', out], { APPSHOT_TEST_KILL_AT: 'image: pages checked' });
    expect(r.stderr.trim().split('\n')).toEqual(['appshot: interrupted: no template was made, the snapshot is as it was']);
    expect(r.code).toBe(130);
    expect(readdirSync(dir).filter((f) => f.includes('intr.template'))).toEqual([]);
    expect(digest(big)).toEqual(before.get(big));
  }, 120_000);

  it('of a .tar image: its extraction is removed too', async () => {
    const r = await interruptedAt('restore: process 2', ['restore', tarImage, '--aid', 'intr-tar']);
    expect(r.stderr.trim().split('\n')).toEqual([INTERRUPTED]);
    expect(r.code).toBe(130);
    await nothingLeftAtOnce('intr-tar');
  }, 120_000);

  it('once every process is made, too late to undo: restored whole, and it runs', async () => {
    const r = await interruptedAt('restore: threads', ['restore', small, '--aid', 'late']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('late\n');
    await sb.checksPass('late', 3);
    expect(sb.run(['rm', '-f', 'late']).code).toBe(0);
    await nothingLeftOf('late', 'smallsrc');
  }, 120_000);
});

describe('a snapshot killed while it commits its image', () => {
  it('leaves its half-written directory only until the next command, and the application running', async () => {
    await runDetached('big', [fixture('snapfix'), '-1', '64']);
    const log = () => readFileSync(join(sb.home, 'apps', 'big', 'log'), 'utf8');
    await waitFor(() => /^CHECK 1$/m.test(log()), 10_000, 'snapfix to start');
    const out = join(dir, 'killed-snapshot');
    mkdirSync(out);
    killedAt('image: committing', ['snapshot', 'big', '-o', join(out, 'img')]);
    // The pages were written: a hidden directory holds them until...
    const partials = readdirSync(out);
    expect(partials).toEqual([expect.stringMatching(/^\.img\.partial-\d+-[0-9a-f]+$/)]);
    expect(readdirSync(join(out, partials[0]))).toContain('pages.img');
    // ...any next command.
    expect(sb.run(['ps']).code).toBe(0);
    expect(readdirSync(out)).toEqual([]);
    expect(readdirSync(join(sb.home, 'tmp')).filter((f) => f.startsWith('partial-'))).toEqual([]);
    // The application goes on, and snapshots as usual.
    const from = (log().match(/^CHECK \d+$/gm) ?? []).length;
    await waitFor(() => (log().match(/^CHECK \d+$/gm) ?? []).length >= from + 3 || /FAIL/.test(log()), 15_000, 'the application to go on');
    expect(log()).not.toMatch(/FAIL.*/);
    const s = sb.run(['snapshot', 'big', '-o', join(out, 'img')]);
    expect(s.code, s.stderr).toBe(0);
    expect(readdirSync(out)).toEqual(['img']);
  });
});

describe('a snapshot that fails or is killed at a step', () => {
  /** appshot snapshot AID -o OUT with the test-only point set in `env`
   * (APPSHOT_TEST_FAIL_AT or _KILL_AT), in the command's own process. */
  const snapshotWith = (aid: string, out: string, env: Record<string, string>) =>
    spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', out], { env: { ...sb.env, APPSHOT_ENGINE: 'off', ...env }, encoding: 'utf8', timeout: 50_000 });
  /** The snapshot after a failed or killed one, which must be whole: not
   * under test itself, so handed to the file's engine (its APPSHOT_*
   * settings, `env`, go with it), not run by a Node started cold (~1-2 s
   * on a loaded machine, fifteen times in this block). It finds what the
   * earlier try left as a command of its own process would: the journal
   * and the registry on disk. */
  const snapshotAgain = (aid: string, out: string, env: Record<string, string> = {}) =>
    spawnSync(command, ['snapshot', aid, '-o', out], { env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 50_000 });

  async function started(aid: string): Promise<void> {
    await runDetached(aid, [fixture('snapfix'), '-1', '1']);
    await sb.checksPass(aid, 2);
  }

  /** Its image is the application now: none of its processes is left, ps
   * -a lists it as snapshotted into `image`, and the image restores whole
   * under its AID, with the log it wrote before. */
  async function endedInto(aid: string, image: string): Promise<void> {
    await waitFor(() => processesNaming(`APPSHOT_AID=${aid}`).length === 0, 10_000, `the processes of ${aid} to be gone`);
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes(aid)), 10_000, `the registration of ${aid} to go`);
    expect(sb.json<{ aid: string; state: string; image?: string }[]>(['ps', '-a']).filter((a) => a.aid === aid)).toEqual([
      expect.objectContaining({ aid, state: 'snapshotted', image }),
    ]);
    const r = sb.run(['restore', image]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(aid);
    await sb.checksPass(aid, 3);
    expect(sb.log(aid)).toMatch(/^CHECK 1$/m);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
    await nothingLeftOf(aid, aid);
  }

  // Before its point of no return (the image in place, the application
  // not yet released to it): as if it had not been tried.
  for (const name of ['img', 'img.tar']) {
    it(`failing once its image (${name}) is in place, before it ends the application: exit 1, one line, no image, and the application runs untraced`, async () => {
      const aid = `sfail-${name.replace('.', '-')}`;
      await started(aid);
      const out = join(dir, `${aid}-out`);
      mkdirSync(out);
      const r = snapshotWith(aid, join(out, name), { APPSHOT_TEST_FAIL_AT: 'snapshot: image committed' });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toEqual([`appshot: cannot snapshot '${aid}': failure injected at 'snapshot: image committed' (APPSHOT_TEST_FAIL_AT); the application was left running`]);
      expect(readdirSync(out)).toEqual([]);
      await runsUntraced(aid);
      // Nothing of the failed try in the way of the next.
      const again = snapshotAgain(aid, join(out, name));
      expect(again.status, again.stderr).toBe(0);
      await endedInto(aid, join(out, name));
    });
  }

  // Failing once the image was renamed (or linked) into place, before
  // its directory entry is on disk (the parent's sync, the page file's
  // identity recorded): the image placed goes too, as when the commit
  // failed before it, and the snapshot says so. Was: left at -o while the
  // snapshot said the application was left running (two of it).
  for (const name of ['img', 'img.tar']) {
    it(`failing just after its image (${name}) was placed, before the commit was on disk: exit 1, one line, no image, and the application runs untraced`, async () => {
      const aid = `splaced-${name.replace('.', '-')}`;
      await started(aid);
      const out = join(dir, `${aid}-out`);
      mkdirSync(out);
      const r = snapshotWith(aid, join(out, name), { APPSHOT_TEST_FAIL_AT: 'image: placed' });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toEqual([`appshot: cannot snapshot '${aid}': failure injected at 'image: placed' (APPSHOT_TEST_FAIL_AT); the application was left running`]);
      expect(readdirSync(out)).toEqual([]);
      expect(readdirSync(join(sb.home, 'tmp')).filter((f) => f.includes('ending'))).toEqual([]);
      await runsUntraced(aid);
      expect(sb.run(['rm', '-f', aid]).code).toBe(0);
      await nothingLeftOf(aid, aid);
    });
  }

  // Killed once its image is in place (the journal says "placing"), then
  // the system goes down before any command looks (a power loss: the
  // application dies with it, the image, made durable before it was
  // placed, is on disk). After the restart the entry is of an earlier
  // boot: the image is all that is left of the application, and is kept
  // as it (registration released to it, the user told once), never
  // removed as "placing" would be in the same boot. A restart is played
  // here by the entry's boot id made another one and every process of the
  // application (its init and the witness too) killed.
  it('killed once its image is in place, then the system restarted before the next command: the image is kept and is the application', async () => {
    const aid = 'skill-restarted';
    await started(aid);
    const pids = sb.json<{ processes: { pid: number }[] }[]>(['ps', aid])[0].processes.map((p) => p.pid);
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: image committed' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    const [name] = readdirSync(join(sb.home, 'tmp')).filter((f) => f.includes('ending'));
    const path = join(sb.home, 'tmp', name);
    const entry = JSON.parse(readFileSync(path, 'utf8')) as { step: string; boot?: string; witness?: { pid: number } };
    expect(entry.step).toBe('placing');
    expect(entry.boot).toBe(readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim());
    writeFileSync(path, JSON.stringify({ ...entry, boot: '00000000-0000-4000-8000-000000000000' }));
    for (const pid of [...pids, ...(entry.witness ? [entry.witness.pid] : [])])
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone already */
      }
    const ps = spawnSync(process.execPath, [cli, 'ps'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8', timeout: 50_000 });
    expect(ps.status, ps.stderr).toBe(0);
    expect(ps.stderr.trim().split('\n')).toEqual([
      `appshot: the snapshot of '${aid}' to ${image} was cut short by a restart of the system (a power loss?), which ended the application: its image is kept, and is the application now`,
    ]);
    expect(readdirSync(join(sb.home, 'tmp')).filter((f) => f.includes('ending'))).toEqual([]);
    // Told once: the next command says nothing of it.
    expect(spawnSync(process.execPath, [cli, 'ps'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8', timeout: 50_000 }).stderr).toBe('');
    await endedInto(aid, image);
  });

  // The page file's file system full halfway: through write() (the
  // default: write says ENOSPC) and through the page file mapped
  // (APPSHOT_PAGES_MAP=1: its room allocated ahead, fallocate says ENOSPC,
  // never a SIGBUS), and with O_DIRECT (APPSHOT_PAGES_DIRECT=1: tmpfs
  // takes it from Linux 6.6; before, the writer falls back to write()).
  // A tmpfs of 4 MiB, an application of 8 MiB.
  const pathEnv = { mapped: { APPSHOT_PAGES_MAP: '1' }, written: {}, direct: { APPSHOT_PAGES_DIRECT: '1' } };
  for (const path of ['mapped', 'written', 'direct'] as const) {
    it(`its file system full while pages are copied (${path}): exit 1, one line, nothing left on it, and the application runs untraced`, async () => {
      const aid = `sfull-${path}`;
      await runDetached(aid, [fixture('snapfix'), '-1', '8']);
      await sb.checksPass(aid, 2);
      const small = join(dir, `${aid}-fs`);
      mkdirSync(small);
      await withTmpfs(small, 'size=4m,mode=0700', () => {
        const r = snapshotWith(aid, join(small, 'img'), pathEnv[path]);
        expect(r.status, r.stderr).toBe(1);
        expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot snapshot '${aid}': .*No space left on device.*; the application was left running$`))]);
        expect(readdirSync(small)).toEqual([]);
        // Not even an unnamed file holds its blocks: the file system is empty.
        expect(usedBytes(small)).toBe(0);
      });
      await runsUntraced(aid);
      // And its next snapshot, where there is room, is whole.
      const image = join(dir, `${aid}.appshot`);
      const again = snapshotAgain(aid, image, pathEnv[path]);
      expect(again.status, again.stderr).toBe(0);
      await endedInto(aid, image);
    });
  }

  it('failing once its image went whole to standard output, before it ends the application: exit 1, the application runs, and the line says the stream is whole', async () => {
    const aid = 'sfail-stream';
    await started(aid);
    const r = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', '-'], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'snapshot: image committed' },
      timeout: 50_000,
      maxBuffer: 256 << 20,
    });
    expect(r.status, String(r.stderr)).toBe(1);
    expect(String(r.stderr).trim().split('\n')).toEqual([
      `appshot: cannot snapshot '${aid}': failure injected at 'snapshot: image committed' (APPSHOT_TEST_FAIL_AT); the application was left running (the image it had sent on standard output is whole: a copy, as with --leave-running)`,
    ]);
    // A tar stream, ended (two zero blocks).
    expect(r.stdout.length).toBeGreaterThan(1024);
    expect(r.stdout.subarray(r.stdout.length - 1024).every((b) => b === 0)).toBe(true);
    await sb.checksPass(aid, 3);
    expect(sb.json<{ state: string }[]>(['ps', aid]).map((a) => a.state)).toEqual(['running']);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
    await nothingLeftOf(aid, aid);
  });

  // After it (the file "released" written): the image is the application,
  // which is ended, never resumed, and the failure says so, exit 6.
  for (const point of ['released', 'killing', 'killed', 'ended']) {
    it(`failing at '${point}', once it began to end the application: exit 6, one line, the application ended and its image complete`, async () => {
      const aid = `sfail-${point}`;
      await started(aid);
      const image = join(dir, `${aid}.appshot`);
      const r = snapshotWith(aid, image, { APPSHOT_TEST_FAIL_AT: `snapshot: ${point}` });
      expect(r.status, r.stderr).toBe(6);
      expect(r.stderr.trim().split('\n')).toEqual([
        `appshot: snapshot of '${aid}' written to ${image}, which is now the application (it was ended), but a step after its end began failed: failure injected at 'snapshot: ${point}' (APPSHOT_TEST_FAIL_AT)`,
      ]);
      await endedInto(aid, image);
    });
  }

  it("failing once it began to end the application, through the API: rejects with SnapshottedWithError naming the image, which restores", async () => {
    const api = await import('../src/api.js');
    const aid = 'sfail-api';
    await started(aid);
    const image = join(dir, `${aid}.appshot`);
    process.env.APPSHOT_TEST_FAIL_AT = 'snapshot: released';
    const failed = await api.snapshot(aid, { home: sb.home, output: image }).catch((e: unknown) => e);
    delete process.env.APPSHOT_TEST_FAIL_AT;
    expect(failed).toBeInstanceOf(api.SnapshottedWithError);
    expect(failed).toMatchObject({ exitCode: 6, image, imageId: expect.any(String) });
    await endedInto(aid, image);
  });

  // Killed (kill -9) between its image in place and the file "released":
  // the kernel lets the application go on as appshot dies (unless its
  // threads were already set to die with it), and the next command, any,
  // settles it one way: before the ending is journaled, as if the snapshot
  // had not been tried (no image, the application running untraced); from
  // then on, as if it had ended (the rest of the application killed, its
  // image the application).
  for (const name of ['img', 'img.tar']) {
    it(`killed once its image (${name}) is in place, before its ending is journaled: the next command removes the image, and the application runs untraced`, async () => {
      const aid = `skill-placed-${name.replace('.', '-')}`;
      await started(aid);
      const out = join(dir, `${aid}-out`);
      mkdirSync(out);
      const r = snapshotWith(aid, join(out, name), { APPSHOT_TEST_KILL_AT: 'snapshot: image committed' });
      expect(r.signal, r.stderr).toBe('SIGKILL');
      expect(sb.run(['ps']).code).toBe(0);
      expect(readdirSync(out)).toEqual([]);
      await runsUntraced(aid);
      expect(readdirSync(join(sb.home, 'tmp')).filter((f) => f.includes('ending'))).toEqual([]);
      const again = snapshotAgain(aid, join(out, name));
      expect(again.status, again.stderr).toBe(0);
      await endedInto(aid, join(out, name));
    });
  }

  /** The application's processes (init left out): system PIDs. */
  const processesOf = (aid: string) => sb.json<{ processes: { pid: number; init: boolean }[] }[]>(['ps', aid])[0].processes.filter((p) => !p.init).map((p) => p.pid);
  const endingEntries = () => readdirSync(join(sb.home, 'tmp')).filter((f) => f.includes('ending'));

  /** As if the snapshot had not been tried: no image, no journal entry,
   * and the application runs on untraced, with everything it did since
   * (its processes the same ones, its log going on); its next snapshot
   * is whole. */
  async function rolledBack(aid: string, image: string, pids: number[]): Promise<void> {
    expect(existsSync(image)).toBe(false);
    expect(endingEntries()).toEqual([]);
    await runsUntraced(aid);
    expect(processesOf(aid)).toEqual(pids);
    expect(sb.log(aid)).not.toMatch(/FAIL/);
    const again = snapshotAgain(aid, image);
    expect(again.status, again.stderr).toBe(0);
    await endedInto(aid, image);
  }

  // Killed once the ending is journaled but before any thread was set to
  // die with it: the kernel lets the whole application go on. The next
  // command (maybe much later) finds every process of the image alive and
  // none dying, and rolls back rather than kill an application that went
  // on working. Also when the command that rolls back is killed itself.
  for (const recoveryKilledAt of [undefined, 'ending: rolling back']) {
    const also = recoveryKilledAt ? `, and the command that rolls back killed at '${recoveryKilledAt}'` : '';
    it(`killed at 'ending journaled', before any thread was set to die with it${also}: the next command rolls back, the application runs on with what it did meanwhile`, async () => {
      const aid = `skill-journaled${recoveryKilledAt ? '-twice' : ''}`;
      await started(aid);
      const pids = processesOf(aid);
      const image = join(dir, `${aid}.appshot`);
      const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: ending journaled' });
      expect(r.signal, r.stderr).toBe('SIGKILL');
      // It goes on meanwhile, before any command looks.
      await sb.checksPass(aid, 3);
      if (recoveryKilledAt) {
        const recovering = spawnSync(process.execPath, [cli, 'ps'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: recoveryKilledAt }, encoding: 'utf8', timeout: 50_000 });
        expect(recovering.signal, recovering.stderr).toBe('SIGKILL');
      }
      expect(sb.run(['ps']).code).toBe(0);
      await rolledBack(aid, image, pids);
    });
  }

  // Killed at 'ending journaled', and one of its processes exits before the
  // next command looks (here its child, killed: to appshot, the same as an
  // exit of its own). The application was never set to die: the witness
  // that would have died first is alive and not dying, so the next command
  // rolls back, rather than give the registration to a stale image and
  // kill what runs on. The witness is ended too.
  it("killed at 'ending journaled', then a process of it exits by itself: the next command rolls back (its witness was never set to die), the rest runs on", async () => {
    const aid = 'skill-journaled-exited';
    await started(aid);
    const pids = processesOf(aid);
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: ending journaled' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    const [entry] = endingEntries();
    const witness = (JSON.parse(readFileSync(join(sb.home, 'tmp', entry), 'utf8')) as { witness?: { pid: number } }).witness;
    expect(witness, 'the entry names its witness').toBeDefined();
    expect(stateOf(witness!.pid)).not.toBe('');
    const child = pids.find((p) => pids.includes(Number(/^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1])))!;
    expect(child).toBeDefined();
    process.kill(child, 'SIGKILL');
    await waitFor(() => ['', 'Z'].includes(stateOf(child)), 10_000, 'the child to exit');
    expect(sb.run(['ps']).code).toBe(0);
    expect(existsSync(image)).toBe(false);
    expect(endingEntries()).toEqual([]);
    await waitFor(() => ['', 'Z'].includes(stateOf(witness!.pid)), 10_000, 'the witness to be ended');
    const rest = pids.filter((p) => p !== child);
    expect(sb.json<{ aid: string; state: string }[]>(['ps', '-a']).filter((a) => a.aid === aid).map((a) => a.state)).toEqual(['running']);
    for (const p of rest) expect(['', 'Z']).not.toContain(stateOf(p));
    sb.run(['stop', aid, '-s', 'KILL']);
  });

  /** Witnesses of this sandbox's snapshots that still run (witness.ts:
   * `sleep 86400`, started with this home in their environment). One
   * ended is not (a zombie's command line and environment read empty). */
  const witnessesRunning = () =>
    processesNaming(`APPSHOT_HOME=${sb.home}`).filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8') === 'sleep\u000086400\u0000';
      } catch {
        return false;
      }
    });

  // The witness of a default snapshot's ending is started before the
  // freeze (out of the window the application is held in) and journaled
  // at once: a snapshot that fails before its image is in place ends it,
  // and one killed there leaves it to the next command, which ends it.
  // None sleeps out its day.
  it('failing while it dumps, its witness started: exit 1, one line, no witness left, and the application runs untraced', async () => {
    const aid = 'sfail-witness';
    await started(aid);
    await waitFor(() => witnessesRunning().length === 0, 10_000, 'no witness of an earlier snapshot');
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_FAIL_AT: 'snapshot: dumping memory' });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot snapshot '${aid}': .*failure injected at 'snapshot: dumping memory' \\(APPSHOT_TEST_FAIL_AT\\).*; the application was left running$`))]);
    expect(existsSync(image)).toBe(false);
    expect(endingEntries()).toEqual([]);
    await waitFor(() => witnessesRunning().length === 0, 10_000, 'its witness to be ended');
    await runsUntraced(aid);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });

  // The entry that names the witness cannot be written (a full, read-only
  // or failing $APPSHOT_HOME/tmp; here the write is made to fail): the
  // snapshot fails before the freeze and ends the witness it started, as
  // nothing journaled names it for the next command (r465 F6).
  it('its first journal write failing, its witness started: exit 1, one line, no entry and no witness left, and the application runs untraced', async () => {
    const aid = 'sjournal-witness';
    await started(aid);
    // Witnesses another test of this file may have left are not this one's.
    const before = new Set(witnessesRunning());
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_FAIL_AT: 'ending: writing step holding' });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot snapshot '${aid}': .*failure injected at 'ending: writing step holding' \\(APPSHOT_TEST_FAIL_AT\\).*; the application was left running$`))]);
    expect(existsSync(image)).toBe(false);
    expect(endingEntries()).toEqual([]);
    await waitFor(() => witnessesRunning().every((pid) => before.has(pid)), 10_000, 'its witness to be ended');
    await runsUntraced(aid);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });

  it('killed while it dumps, its witness started: the entry names the witness, and the next command ends it; the application runs on', async () => {
    const aid = 'skill-witness';
    await started(aid);
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: dumping memory' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    const [entry] = endingEntries();
    expect(entry, 'the ending journaled before the freeze').toBeDefined();
    const e = JSON.parse(readFileSync(join(sb.home, 'tmp', entry), 'utf8')) as { step: string; witness?: { pid: number } };
    expect(e.step).toBe('holding');
    expect(e.witness, 'the entry names its witness').toBeDefined();
    expect(witnessesRunning()).toContain(e.witness!.pid);
    expect(sb.run(['ps']).code).toBe(0);
    expect(endingEntries()).toEqual([]);
    await waitFor(() => !witnessesRunning().includes(e.witness!.pid), 10_000, 'the witness to be ended');
    expect(existsSync(image)).toBe(false);
    await runsUntraced(aid);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });

  // From the first thread set to die with appshot on, its death killed
  // (some of) the application: the image is the application, what is
  // left of it is ended. With a process killed and one not (the first of
  // its two set to die), the image wins too: the application was being
  // ended for it. And when the command that finishes the ending is killed
  // too, once it stopped the application, the command after it finishes it.
  for (const [point, recoveryKilledAt] of [['dies with appshot, one process'], ['dies with appshot'], ['dies with appshot', 'ending: application stopped']]) {
    const also = recoveryKilledAt ? `, and the command that finishes the ending killed at '${recoveryKilledAt}'` : '';
    it(`killed at '${point}', before the file "released"${also}: the next command ends what is left of the application, and its image restores`, async () => {
      const aid = `skill-${point.includes('one') ? 'one' : 'dies'}${recoveryKilledAt ? '-twice' : ''}`;
      await started(aid);
      const pids = processesOf(aid);
      expect(pids).toHaveLength(2);
      const image = join(dir, `${aid}.appshot`);
      const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: `snapshot: ${point}` });
      expect(r.signal, r.stderr).toBe('SIGKILL');
      if (point.includes('one')) {
        // One process died with appshot, the other was let go: the case
        // where only some of the image's processes are dying. The one let
        // go may end by itself soon after (snapfix's child ends once its
        // parent is gone, and which process was set to die first is the
        // freezer's order): waited for is that at least one died.
        await waitFor(() => pids.some((p) => stateOf(p) === '' || stateOf(p) === 'Z'), 10_000, 'one of the two processes to die with appshot');
      }
      if (recoveryKilledAt) {
        const recovering = spawnSync(process.execPath, [cli, 'ps'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: recoveryKilledAt }, encoding: 'utf8', timeout: 50_000 });
        expect(recovering.signal, recovering.stderr).toBe('SIGKILL');
      }
      expect(sb.run(['ps']).code).toBe(0);
      expect(endingEntries()).toEqual([]);
      await endedInto(aid, image);
    });
  }

  // Failing once the ending is journaled, before the file "released":
  // the snapshot undoes itself (no image, the application left running).
  // Killed while it does, at any step of the undoing, the next command
  // finishes the undoing: it never kills the application it resumed.
  for (const killedAt of [undefined, 'failed, lives on without appshot', 'failed, rolling back', 'failed, application resumed']) {
    const also = killedAt ? `, and killed at '${killedAt}'` : '';
    it(`failing at 'dies with appshot'${also}: no image, the application runs on untraced`, async () => {
      const aid = `sfail-dies${killedAt ? `-${killedAt.split(' ').pop()}` : ''}`;
      await started(aid);
      const pids = processesOf(aid);
      const image = join(dir, `${aid}.appshot`);
      const r = snapshotWith(aid, image, { APPSHOT_TEST_FAIL_AT: 'snapshot: dies with appshot', ...(killedAt ? { APPSHOT_TEST_KILL_AT: `snapshot: ${killedAt}` } : {}) });
      if (killedAt) expect(r.signal, r.stderr).toBe('SIGKILL');
      else {
        expect(r.status, r.stderr).toBe(1);
        expect(r.stderr.trim().split('\n')).toEqual([`appshot: cannot snapshot '${aid}': failure injected at 'snapshot: dies with appshot' (APPSHOT_TEST_FAIL_AT); the application was left running`]);
      }
      await sb.checksPass(aid, 2);
      expect(sb.run(['ps']).code).toBe(0);
      await rolledBack(aid, image, pids);
    });
  }

  // The Node API settles what a killed command left as the CLI does,
  // before its operation: here ps() finds the application snapshotted.
  it("killed at 'dies with appshot', then the API's ps(): the API ends what is left, and lists it snapshotted into its image", async () => {
    const api = await import('../src/api.js');
    const aid = 'skill-api';
    await started(aid);
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: dies with appshot' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    expect(endingEntries()).toHaveLength(1);
    const listed = await api.ps(aid, { home: sb.home, all: true });
    expect(listed).toEqual([expect.objectContaining({ aid, state: 'snapshotted', image })]);
    expect(endingEntries()).toEqual([]);
    await endedInto(aid, image);
  });

  // The command that finishes the ending has no witness to go by (gone:
  // killed here) and cannot stop the application (a debugger, another
  // snapshot traces one of its processes): nothing is decided, the entry
  // waits for a later command, and what it had stopped is let go at once,
  // also in a process that lives on (the API).
  const ppidOf = (pid: number) => Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[1]);
  const tracerOf = (pid: number) => Number(/^TracerPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);

  /** A snapshot of `aid` killed at 'ending journaled', its witness killed
   * too, and the application's child (its parent, the first process, is
   * seized before it) seized by another tracer: an entry that no command
   * can decide while that tracer stays. */
  async function undecidable(aid: string) {
    await started(aid);
    const pids = processesOf(aid);
    const child = pids.find((p) => pids.includes(ppidOf(p)))!;
    const image = join(dir, `${aid}.appshot`);
    const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: 'snapshot: ending journaled' });
    expect(r.signal, r.stderr).toBe('SIGKILL');
    const [entry] = endingEntries();
    const witness = (JSON.parse(readFileSync(join(sb.home, 'tmp', entry), 'utf8')) as { witness: { pid: number } }).witness;
    process.kill(witness.pid, 'SIGKILL');
    await waitFor(() => ['', 'Z'].includes(stateOf(witness.pid)), 10_000, 'the witness to be gone');
    const tracer = await seizedByAnotherTracer(child);
    return { pids, child, parent: ppidOf(child), image, tracer };
  }

  it("killed at 'ending journaled', one of its processes traced by another: the API's ps() decides nothing and lets go what it stopped; once the tracer is gone, the next call rolls back", async () => {
    const api = await import('../src/api.js');
    const aid = 'skill-traced';
    const { pids, child, parent, image, tracer } = await undecidable(aid);
    try {
      expect(tracerOf(child)).toBe(tracer.pid);
      await api.ps(aid, { home: sb.home });
      expect(endingEntries()).toHaveLength(1);
      expect(existsSync(image)).toBe(true);
      await waitFor(() => tracerOf(parent) === 0, 5000, 'the process it had stopped to be let go');
      expect(stateOf(parent)).not.toBe('t');
      await sb.checksPass(aid, 2);
    } finally {
      tracer.kill('SIGKILL');
    }
    await waitFor(() => tracerOf(child) === 0, 10_000, 'the other tracer to let the child go');
    await api.ps(aid, { home: sb.home });
    await rolledBack(aid, image, pids);
  });

  // The same entry, that no command can decide while the tracer stays:
  // each try stops (ptrace) the application and may wait 5 s. A command
  // that only looks (the CLI's ps, the API's ps) tries it once, then
  // leaves it for later while what was in the way is still there; a
  // command that acts still tries each time; and once the tracer is gone,
  // the next ps tries at once and rolls back. (APPSHOT_DEBUG says each
  // time the application is stopped to decide it.)
  it("killed at 'ending journaled', one of its processes traced by another: ps after ps stops the application only the first time, a command that acts tries again, and once the tracer is gone ps rolls back", async () => {
    const api = await import('../src/api.js');
    const aid = 'skill-backoff';
    const { pids, child, image, tracer } = await undecidable(aid);
    const stopsToDecide = /stopping the application to decide it/;
    const debugged = (args: string[]) => spawnSync(process.execPath, [cli, ...args], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_DEBUG: '1' }, encoding: 'utf8', timeout: 50_000 });
    try {
      const first = debugged(['ps']);
      expect(first.status, first.stderr).toBe(0);
      expect(first.stderr).toMatch(stopsToDecide);
      expect(endingEntries()).toHaveLength(1);
      for (let i = 0; i < 3; i++) {
        const again = debugged(['ps', '--json']);
        expect(again.status, again.stderr).toBe(0);
        expect(again.stderr).not.toMatch(stopsToDecide);
        expect(again.stderr).toMatch(new RegExp(`the ending of '${aid}' \\(a killed snapshot\\) is left undecided for now`));
      }
      // The API's ps, in this process: what it writes on stderr is taken.
      const written: string[] = [];
      const write = process.stderr.write;
      process.env.APPSHOT_DEBUG = '1';
      process.stderr.write = ((chunk: string | Uint8Array) => written.push(String(chunk)) > 0) as typeof process.stderr.write;
      try {
        await api.ps(aid, { home: sb.home });
      } finally {
        process.stderr.write = write;
        delete process.env.APPSHOT_DEBUG;
      }
      expect(written.join('')).not.toMatch(stopsToDecide);
      expect(written.join('')).toMatch(/is left undecided for now/);
      // A command that acts (exec) tries again, and decides nothing either.
      const acting = debugged(['exec', aid, '--', 'true']);
      expect(acting.status, acting.stderr).toBe(0);
      expect(acting.stderr).toMatch(stopsToDecide);
      expect(endingEntries()).toHaveLength(1);
      expect(existsSync(image)).toBe(true);
      await sb.checksPass(aid, 2);
    } finally {
      tracer.kill('SIGKILL');
    }
    await waitFor(() => tracerOf(child) === 0, 10_000, 'the other tracer to let the child go');
    const last = debugged(['ps']);
    expect(last.status, last.stderr).toBe(0);
    expect(last.stderr).toMatch(stopsToDecide);
    await rolledBack(aid, image, pids);
  });

  // 'killing': its robust lists disarmed too, just before the kill.
  for (const point of ['released', 'killing'])
    it(`killed at '${point}', after it released the application, before it killed it: the application ends with appshot, and its image restores`, async () => {
      const aid = `skill-${point}`;
      await started(aid);
      const image = join(dir, `${aid}.appshot`);
      const r = snapshotWith(aid, image, { APPSHOT_TEST_KILL_AT: `snapshot: ${point}` });
      expect(r.signal, r.stderr).toBe('SIGKILL');
      await endedInto(aid, image);
    });
});

describe('a --leave-running snapshot killed while a thread runs an injected batch', () => {
  /** Per thread of each process of `aid`: its blocked, ignored and caught
   * signals (SigBlk, SigIgn, SigCgt of /proc/PID/task/TID/status). */
  function signalState(aid: string): Record<string, string> {
    const [app] = sb.json<{ processes: { pid: number }[] }[]>(['ps', aid]);
    const out: Record<string, string> = {};
    for (const { pid } of app.processes)
      for (const tid of readdirSync(`/proc/${pid}/task`)) {
        const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
        out[`${pid}/${tid}`] = ['SigBlk', 'SigIgn', 'SigCgt'].map((f) => new RegExp(`^${f}:\\s+(\\S+)$`, 'm').exec(status)?.[1]).join(' ');
      }
    return out;
  }

  // The thread runs the batch code with the batch's registers and every
  // signal but the end's blocked, and appshot dies (kill -9, the OOM
  // killer) before it takes the thread back: the thread must go back to
  // where it was on its own, not die of the batch's SIGTRAP.
  it("(native point 'batch: running'): the application goes on untraced, its checks pass, its threads' signal masks and dispositions as they were", async () => {
    const aid = 'skill-batch';
    await runDetached(aid, [fixture('snapfix'), '-1', '1']);
    await sb.checksPass(aid, 2);
    // Read while appshot-init sleeps in sigtimedwait: it keeps the signals
    // it waits for blocked at all other times, and its mask reads empty
    // only while it sleeps there; read otherwise, it is the waited set,
    // which the state after the killed batch (below) would not match.
    const init = sb.json<{ processes: { vpid: number; pid: number }[] }[]>(['ps', aid])[0].processes.find((p) => p.vpid === 1)!.pid;
    let before: Record<string, string> = {};
    await waitFor(() => (before = signalState(aid))[`${init}/${init}`]?.startsWith('0000000000000000 ') === true, 10_000, `${aid}'s init asleep in sigtimedwait`);
    const image = join(dir, `${aid}.appshot`);
    const r = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', image, '--leave-running'], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: 'batch: running' },
      encoding: 'utf8',
      timeout: 50_000,
    });
    expect(r.signal, `the snapshot was to be killed at 'batch: running': ${r.stderr}`).toBe('SIGKILL');
    await runsUntraced(aid);
    expect(sb.log(aid)).not.toMatch(/FAIL/);
    // Waited for, not read once: appshot-init's mask is the waited set
    // whenever it is not asleep in sigtimedwait (ci-48d read it then),
    // where a thread left with the batch's mask would keep that mask.
    await waitFor(() => JSON.stringify(signalState(aid)) === JSON.stringify(before), 10_000, `${aid}'s signal masks and dispositions as they were`).catch(() => undefined);
    expect(signalState(aid)).toEqual(before);
    // And the next snapshot of it is whole.
    const again = sb.run(['snapshot', aid, '-o', image, '--leave-running']);
    expect(again.code, again.stderr).toBe(0);
    await sb.checksPass(aid, 2);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});

describe('a batch of clones killed at any instant', () => {
  let template = '';
  const portAlloc = base + 901;
  const portMux = base + 902;

  beforeAll(async () => {
    template = join(dir, 'tpl');
    await templfixTemplate(sb, { root: ROOT, rules: join(dir, 'templfix.rules'), portAlloc, portMux }, 'tsrc', join(dir, 'tsnap'), template);
  });

  /** Every instance of `aids` runs, let go (not in a tracing stop), and
   * answers for itself on its own port (templfix's CHECK). */
  async function allRun(aids: string[]): Promise<void> {
    for (const aid of aids) {
      const [app] = sb.json<{ state: string; processes: { pid: number; init: boolean }[]; ports: { virtual: number; system: number; mode?: string }[] }[]>(['ps', aid]);
      expect(app.state).toBe('running');
      for (const p of app.processes.filter((p) => !p.init)) expect(readFileSync(`/proc/${p.pid}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
      const own = app.ports.find((p) => p.virtual === portAlloc && p.mode === 'allocate');
      expect(own, `${aid}: its own port`).toBeDefined();
      expect((await tcpExchange(own!.system, 'CHECK\n')).trim()).toBe('OK');
    }
  }

  /** `appshot rm -f` of the instances, all in one command (as a user
   * removes a batch: `appshot rm -f db-1 db-2`), and nothing of any left. */
  function rmForced(aids: string[]): void {
    const rm = sb.run(['rm', '-f', ...aids]);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout.split('\n').filter(Boolean).sort()).toEqual([...aids].sort());
  }

  async function removed(aids: string[]): Promise<void> {
    rmForced(aids);
    await nothingLeftOf(aids, 'tsrc');
    for (const aid of aids) expect(existsSync(join(ROOT, 'instances', aid))).toBe(false);
    for (const d of ['instances', 'home']) rmSync(join(ROOT, d), { recursive: true, force: true });
  }

  // Committed, the batch is done: a step that fails after it leaves every
  // instance running, and says which exist, exit 6 (as a restore does).
  it("failing just after the batch's commit: exit 6, one line naming every instance, and all 4 run", async () => {
    const aids = ['kc-1', 'kc-2', 'kc-3', 'kc-4'];
    const r = spawnSync(process.execPath, [cli, 'clone', template, '--aid', 'kc', '--count', '4'], {
      env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_FAIL_AT: 'clone: committed' },
      encoding: 'utf8',
      timeout: 50_000,
    });
    expect(r.status, r.stderr).toBe(6);
    expect(r.stderr.trim().split('\n')).toEqual([
      `appshot: cloned ${template} as 'kc-1', 'kc-2', 'kc-3', 'kc-4', all 4 running and registered, but a step after the batch's commit failed: failure injected at 'clone: committed' (APPSHOT_TEST_FAIL_AT)`,
    ]);
    // On stdout as on success: they run.
    expect(r.stdout.split('\n').filter(Boolean).map((l) => l.split('\t')[0])).toEqual(aids);
    await allRun(aids);
    await removed(aids);
  });

  it("failing just after the batch's commit, through the API: rejects with ClonedWithError listing the instances, which run", async () => {
    const api = await import('../src/api.js');
    process.env.APPSHOT_TEST_FAIL_AT = 'clone: committed';
    const failed = await api.clone(template, { home: sb.home, aid: 'kapi', count: 2 }).catch((e: unknown) => e);
    delete process.env.APPSHOT_TEST_FAIL_AT;
    expect(failed).toBeInstanceOf(api.ClonedWithError);
    expect(failed).toMatchObject({ exitCode: 6, cloned: [expect.objectContaining({ aid: 'kapi-1', instance: 1 }), expect.objectContaining({ aid: 'kapi-2', instance: 2 })] });
    expect((failed as InstanceType<typeof api.ClonedWithError>).cloned[0]).not.toHaveProperty('createdDirs');
    await allRun(['kapi-1', 'kapi-2']);
    await removed(['kapi-1', 'kapi-2']);
  });

  for (const point of ['clone: instance 1', 'restore: init started', 'restore: fds', 'clone: instance 3', 'clone: committing']) {
    it(`leaves no instance when killed at '${point}'`, async () => {
      const before = digest(template);
      killedAt(point, ['clone', template, '--aid', 'k', '--count', '4']);
      const aids = ['k-1', 'k-2', 'k-3', 'k-4'];
      await nothingLeftOf(aids, 'tsrc');
      for (const aid of aids) {
        // Its REDIR PATH directory (ROOT/instances/AID) was made for it.
        expect(existsSync(join(ROOT, 'instances', aid))).toBe(false);
        expect(existsSync(join(ROOT, 'home', aid))).toBe(false);
      }
      expect(digest(template)).toEqual(before);
      const again = sb.run(['clone', template, '--aid', 'k', '--count', '4']);
      expect(again.code, again.stderr).toBe(0);
      // rm -f kills each and removes what was made for it alone: the
      // next round starts from nothing.
      rmForced(aids);
      await nothingLeftOf(aids, 'tsrc');
      for (const aid of aids) {
        expect(sb.allAids()).not.toContain(aid);
        expect(existsSync(join(ROOT, 'instances', aid))).toBe(false);
      }
      expect(readdirSync(join(sb.home, 'instances'))).toEqual([]);
      // What the instances wrote beside their REDIR PATH directories.
      for (const d of ['instances', 'home']) rmSync(join(ROOT, d), { recursive: true, force: true });
    });
  }
});

describe('letting go what is left after a failure past the commit', () => {
  it('a thread still ours but killed meanwhile has its exit taken, so that its parent can reap it', async () => {
    // In a process that lives on (the engine, the API), an exit report left
    // with the tracer keeps the dead child from its parent for good. The
    // parent here is a shell waiting for its child; the child is stopped
    // under this process's ptrace, as a restored one is, and killed, as by
    // a process of the application let go before it.
    const { releaseWhatIsLeft } = await import('../src/resources/jobcontrol.js');
    const { addon } = await import('../src/native.js');
    const sh = spawn('sh', ['-c', 'sleep 1000 & echo $!; wait $!; echo "reaped $?"'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    sh.stdout.on('data', (d: Buffer) => (out += d.toString()));
    try {
      await waitFor(() => /^\d+\n/.test(out), 10_000, 'the child');
      const child = Number(out.split('\n')[0]);
      addon().seize(child, false);
      addon().interrupt(child);
      expect(addon().wait(child, 10_000)?.kind).toBe('stop');
      process.kill(child, 'SIGKILL');
      const made = [{ proc: { groupStopped: false, stopSignal: 0 }, pid: child, tids: [child] }];
      releaseWhatIsLeft(made as unknown as Parameters<typeof releaseWhatIsLeft>[0]);
      await waitFor(() => out.includes('reaped 137'), 10_000, 'the shell to reap its killed child');
    } finally {
      sh.kill('SIGKILL');
    }
  });
});

describe("a killed snapshot's journal left by an earlier boot", () => {
  // A "placing" entry of a snapshot that is gone (a PID above any
  // pid_max), next to the image it placed: of this boot, the image goes
  // (the application was let go and runs on); of an earlier boot (a power
  // loss ended the application), it stays, all that is left of it.
  for (const [boot, kept] of [['00000000-0000-4000-8000-000000000000', true], [readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(), false]] as const) {
    it(kept ? 'of an earlier boot: the image stays' : 'of this boot: the image goes', () => {
      const tmp = join(sb.home, 'tmp');
      mkdirSync(tmp, { recursive: true });
      const image = join(dir, `restarted-${kept}.appshot`);
      mkdirSync(image);
      writeFileSync(join(image, 'image.pb'), 'x');
      const st = statSync(image);
      const name = `ending-2147483646-1-${kept ? '0badb007' : '0dedb007'}`;
      writeFileSync(join(tmp, name), JSON.stringify({ step: 'placing', boot, aid: 'gone', initPid: 0, initStartTime: 0, output: image, dev: st.dev, ino: st.ino }));
      const ps = spawnSync(process.execPath, [cli, 'ps'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8', timeout: 50_000 });
      expect(ps.status, ps.stderr).toBe(0);
      expect(readdirSync(tmp).filter((f) => f.includes(name))).toEqual([]);
      expect(existsSync(image)).toBe(kept);
      expect(ps.stderr).toBe(kept ? `appshot: the snapshot of 'gone' to ${image} was cut short by a restart of the system (a power loss?), which ended the application: its image is kept, and is the application now\n` : '');
      rmSync(image, { recursive: true, force: true });
    });
  }
});

describe("a killed snapshot's journal damaged by other means than a kill", () => {
  it('is settled by the next command, not given back for ever: a line that names no socket is left out', () => {
    // A "holding" entry of a snapshot that is gone (a PID above any
    // pid_max), with lines no snapshot writes: null, a number, a socket
    // without its inode, and a last line cut short (as a kill leaves it).
    const dir = join(sb.home, 'tmp');
    mkdirSync(dir, { recursive: true });
    const name = 'ending-2147483646-1-0badc0de';
    const head = { step: 'holding', aid: 'gone', initPid: 0, initStartTime: 0, output: join(dir, 'nowhere'), dev: 0, ino: 0 };
    writeFileSync(join(dir, name), [JSON.stringify(head), 'null', '7', '{"pid":1}', '{"pid":1,"ino":"12'].join('\n'));
    expect(sb.run(['ps']).code).toBe(0);
    expect(readdirSync(dir).filter((f) => f.includes('0badc0de'))).toEqual([]);
  });
});
