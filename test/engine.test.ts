/**
 * The resident engine (src/engine/): started on demand, serving several
 * clients at once without mixing their output, surviving a client killed
 * mid-command, leaving when idle, one per state directory, and giving the
 * same output and exit codes as the CLI in-process.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { connect } from 'node:net';
import { controlEngine } from '../src/engine/client.js';
import { FrameReader } from '../src/engine/protocol.js';
import { alive, cli, fixture, root, Sandbox, spawnAsync, waitFor, waitForAsync, type Result } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-engine-'));
// Commands run in `out` (relative paths resolve against the client's cwd).
const run = (args: string[], env: Record<string, string> = {}): Result => {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: out, env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
};
const inProcess = (args: string[]) => run(args, { APPSHOT_ENGINE: 'off' });
/** run() without blocking this worker: a test of dozens of commands, each
 * a Node start of seconds on a loaded machine, would hold it past the
 * minute vitest's RPC answers wait. */
const runAsync = async (args: string[], env: Record<string, string> = {}): Promise<Result> => {
  const r = await spawnAsync(process.execPath, [cli, ...args], { cwd: out, env: { ...sb.env, ...env }, timeout: 50_000 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
};
/** `appshot` as npm installs it: bin/appshot, which runs the native client. */
const bin = join(root, 'bin', 'appshot');
const nativeClient = join(root, 'build', 'Release', 'appshot-client');
const native = (args: string[], env: Record<string, string> = {}): Result => {
  const r = spawnSync(bin, args, { cwd: out, env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
};
/** The same command, started without waiting. */
const start = (args: string[], env: Record<string, string> = {}) => {
  const child = spawn(process.execPath, [cli, ...args], { cwd: out, env: { ...sb.env, ...env } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const done = new Promise<Result>((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
  return { child, done, stderr: () => stderr };
};

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;
/** What `appshot engine status --json` prints, asked of the engine's
 * socket from this process as that command asks it: the tests look at the
 * engine dozens of times, and a Node start for each look was most of this
 * file's time. */
const status = async (): Promise<Json> => (await controlEngine('status', sb.home)) ?? { running: false, home: sb.home };
const stopEngine = async () => {
  const s = await status();
  if (!s.running) return;
  await controlEngine('stop', sb.home);
  await waitFor(() => !alive(s.pid), 20_000, 'the engine to leave');
};
const served = async (): Promise<number> => (await status()).commandsServed;
/** An engine that stays for the whole test: one that had served nothing
 * for its default 60 s leaves while the test's own in-process commands
 * (a snapshot, a template create: seconds each on a loaded machine) run,
 * and the command the test means it to serve then runs in its client. */
const engineKeptThroughout = async () => {
  await stopEngine();
  expect(run(['engine', 'start'], { APPSHOT_ENGINE: 'off', APPSHOT_ENGINE_IDLE: '1800' }).code).toBe(0);
};
const leftovers = () => [
  ...readdirSync(out).filter((n) => n.startsWith('.')),
  ...(existsSync(join(sb.home, 'tmp')) ? readdirSync(join(sb.home, 'tmp')) : []),
];
const logOf = (aid: string) => sb.log(aid);
const lastCheck = (aid: string) => Math.max(0, ...[...logOf(aid).matchAll(/^CHECK (\d+)$/gm)].map((m) => Number(m[1])));
async function checksPass(aid: string, n = 5): Promise<void> {
  const from = lastCheck(aid);
  await waitFor(() => lastCheck(aid) >= from + n || /FAIL/.test(logOf(aid)), 15_000, `${n} more self-checks of ${aid}`);
  expect(logOf(aid)).not.toMatch(/FAIL.*/);
}
async function startApp(aid: string): Promise<void> {
  const r = inProcess(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', '4']);
  expect(r.code, r.stderr).toBe(0);
  // A limit for a hang: in-process commands and the fixture's set-up
  // (a child, pipes, SysV objects, 4 MiB touched) took over 10 s once on
  // a machine loaded by other test files.
  await waitFor(() => lastCheck(aid) >= 3, 30_000, `${aid} to start`);
}

afterAll(async () => {
  await stopEngine().catch(() => undefined);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** A process (sleep, in a session of its own) with the given PID, made
 * through ns_last_pid where this user may write it (root with
 * CAP_SYS_ADMIN in its namespace), as the kernel would hand a freed PID to
 * anyone; undefined if it could not be had (others took it first, or no
 * right). Forked by a program already running, so that nothing else of
 * ours takes the PID first. */
function takePid(pid: number): number | undefined {
  const forker = `
import os, sys
want = int(sys.argv[1])
for attempt in range(200):
    try:
        with open('/proc/sys/kernel/ns_last_pid', 'w') as f: f.write(str(want - 1))
    except OSError:
        break
    child = os.fork()
    if child == 0:
        os.setsid()
        quiet = os.open('/dev/null', os.O_RDWR)
        for fd in (0, 1, 2): os.dup2(quiet, fd)
        os.execvp('sleep', ['sleep', '1000'])
    if child == want:
        print(child)
        break
    os.kill(child, 9)
    os.waitpid(child, 0)
`;
  // (The sleep's output is not the pipe spawnSync waits to see closed.)
  const r = spawnSync('python3', ['-c', forker, String(pid)], { encoding: 'utf8', timeout: 20_000 });
  return r.stdout.trim() ? Number(r.stdout.trim()) : undefined;
}

describe('the resident engine', () => {
  it('is started on demand by a snapshot (APPSHOT_ENGINE=auto), and then serves the restore', async () => {
    expect((await status()).running).toBe(false);
    await startApp('auto');
    const snap = run(['snapshot', 'auto', '-o', 'auto.appshot'], { APPSHOT_ENGINE: 'auto' });
    expect(snap.code, snap.stderr).toBe(0);
    expect(snap.stdout).toBe(`${join(out, 'auto.appshot')}\n`);
    // That first command ran in its own process; the engine comes up beside it.
    await waitForAsync(async () => (await status()).running === true, 20_000, 'the engine to start');
    const s = await status();
    expect(s.commandsServed).toBe(0);
    // The socket is the owner's only, in a directory of the owner's only.
    expect(spawnSync('stat', ['-c', '%a', join(sb.home, 'engine')], { encoding: 'utf8' }).stdout.trim()).toBe('700');
    expect(spawnSync('stat', ['-c', '%a %F', s.socket], { encoding: 'utf8' }).stdout.trim()).toBe('600 socket');

    const restored = run(['restore', 'auto.appshot', '--json'], { APPSHOT_ENGINE: 'auto' });
    expect(restored.code, restored.stderr).toBe(0);
    expect(JSON.parse(restored.stdout)).toMatchObject({ aid: 'auto', processes: 2 });
    expect(await served()).toBe(1);
    // The CPU it reports of itself (what bench/criu.js charges a command)
    // is reported and live. Only that: the status requests' own handling
    // moves it too (r465 F10), so this does not show how much the restore
    // cost, which is bench/'s to measure.
    const cpuMs = (x: Json) => x.cpu.userMs + x.cpu.systemMs;
    expect(cpuMs(await status())).toBeGreaterThan(cpuMs(s));
    await checksPass('auto');
    // The appshot-init it started is its child: once that application
    // ends, the engine waits for it rather than keep a zombie.
    const initPid = JSON.parse(restored.stdout).initPid as number;
    expect(Number(readFileSync(`/proc/${initPid}/stat`, 'utf8').split(') ')[1].split(' ')[1])).toBe(s.pid);
    const other = run(['restore', 'auto.appshot', '--aid', 'auto2', '--json']);
    expect(other.code, other.stderr).toBe(0);
    const otherInit = JSON.parse(other.stdout).initPid as number;
    expect(run(['rm', '-f', 'auto2']).code).toBe(0);
    await waitFor(() => !existsSync(`/proc/${otherInit}`), 10_000, "the ended application's appshot-init to be waited for");
    // The restored application is not the engine's to keep: it outlives it.
    await stopEngine();
    await checksPass('auto', 3);
    expect(inProcess(['rm', '-f', 'auto']).code).toBe(0);
  });

  it('is not started on demand by a command run inside an application, which would make it one of its processes', async () => {
    // r404 F2: the engine inherits its starter's environment, and the
    // preload library's exec gives it the application's identity back
    // whatever the spawn's environment says. (A command inside an
    // application sees its virtual view: a snapshot of an application
    // by name finds none there; what matters is what it starts.)
    await stopEngine();
    const r = inProcess(['run', '-d', '--aid', 'inapp', '--', 'sh', '-c', `APPSHOT_HOME=${JSON.stringify(sb.home)} APPSHOT_ENGINE=auto ${JSON.stringify(process.execPath)} ${JSON.stringify(cli)} snapshot nosuch -o ${JSON.stringify(join(out, 'nosuch.appshot'))}; echo "SNAPSHOT $?"; exec sleep 600`]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => /^SNAPSHOT \d+$/m.test(logOf('inapp')), 60_000, 'the snapshot run inside inapp');
    expect(logOf('inapp')).toMatch(/no application with AID 'nosuch'[^]*^SNAPSHOT 3$/m);
    // An engine started on demand is spawned before the command runs, so
    // one would exist by now: none of this sandbox's is anywhere.
    const engines = readdirSync('/proc').filter((p) => {
      if (!/^\d+$/.test(p)) return false;
      try {
        return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('engine/main.js') && readFileSync(`/proc/${p}/environ`, 'utf8').split('\0').includes(`APPSHOT_HOME=${sb.home}`);
      } catch {
        return false;
      }
    });
    expect(engines).toEqual([]);
    expect((await status()).running).toBe(false);
    expect(inProcess(['rm', '-f', 'inapp']).code).toBe(0);
  });

  it('gives the same output and exit code as the CLI in-process', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    await startApp('same');
    expect(inProcess(['snapshot', 'same', '--leave-running', '-o', 'same.appshot']).code).toBe(0);
    const cases = [
      ['ps', '--json'],
      ['ps', '-q'],
      ['ps', 'same', '--json'],
      ['inspect', 'same.appshot'],
      ['inspect', 'same.appshot', '--json'],
      ['table', 'same', '--json'],
      ['--version'],
      ['version', '--json'],
      // Failing ones: their message and exit code.
      ['inspect', 'no-such.appshot'],
      ['snapshot'],
      ['ps', 'nobody'],
      ['clone', 'same.appshot'],
      ['restore', 'same.appshot', '--aid', 'bad/aid'],
      ['frobnicate'],
      ['snapshot', 'same', '--timeout', 'x'],
    ];
    for (const args of cases) {
      const before = await served();
      const viaEngine = await runAsync(args);
      expect(await served(), `appshot ${args.join(' ')} served by the engine`).toBe(before + 1);
      const here = await runAsync(args, { APPSHOT_ENGINE: 'off' });
      // A process's state (R, S) is the moment's: not compared.
      const steady = (stdout: string) => (args[0] === 'ps' && args.includes('--json') ? stdout.replace(/"state": "[A-Z]"/g, '"state": _') : stdout);
      expect({ args, code: viaEngine.code, stdout: steady(viaEngine.stdout), stderr: viaEngine.stderr }).toEqual({ args, code: here.code, stdout: steady(here.stdout), stderr: here.stderr });
    }
    // A reader that goes away (`| head -1`) ends a listing quietly, as in
    // the CLI, served or not.
    for (const env of [{}, { APPSHOT_ENGINE: 'off' }]) {
      const piped = spawnSync('bash', ['-c', `"${process.execPath}" "${cli}" inspect same.appshot | head -1; exit \${PIPESTATUS[0]}`], { cwd: out, env: { ...sb.env, ...env }, encoding: 'utf8' });
      expect({ env, code: piped.status, stderr: piped.stderr }).toEqual({ env, code: 0, stderr: '' });
      expect(piped.stdout).toMatch(/^image [0-9a-f]+ /);
    }
    // Never sent: commands that need the client's terminal, stdin or
    // environment.
    const before = await served();
    expect(run(['exec', 'same', '--', 'true']).code).toBe(0);
    expect(run(['inspect', '-'], {}).code).not.toBe(0);
    expect(await served()).toBe(before);
    expect(inProcess(['rm', '-f', 'same']).code).toBe(0);
    // Some 30 commands, a Node start each: minutes on a loaded machine.
  }, 300_000);

  it('is reached by the native client (bin/appshot) with the same output and exit code, which runs Node itself otherwise', async () => {
    expect(existsSync(nativeClient), 'build/Release/appshot-client (npm install builds it)').toBe(true);
    expect(inProcess(['engine', 'start']).code).toBe(0);
    await startApp('nat');
    expect(inProcess(['snapshot', 'nat', '--leave-running', '-o', 'nat.appshot']).code).toBe(0);
    const cases = [['ps', '--json'], ['ps', '-q'], ['inspect', 'nat.appshot', '--json'], ['--version'], ['inspect', 'no-such.appshot'], ['frobnicate'], ['ps', 'nat', '--json']];
    const steady = (args: string[], stdout: string) => (args[0] === 'ps' && args.includes('--json') ? stdout.replace(/"state": "[A-Z]"/g, '"state": _') : stdout);
    for (const args of cases) {
      const before = await served();
      const viaClient = native(args);
      // --version alone the client answers itself (package.json's).
      const byClient = args.length === 1 && args[0] === '--version';
      expect(await served(), `appshot ${args.join(' ')} served through the native client`).toBe(before + (byClient ? 0 : 1));
      const here = inProcess(args);
      expect({ args, code: viaClient.code, stdout: steady(args, viaClient.stdout), stderr: viaClient.stderr }).toEqual({ args, code: here.code, stdout: steady(args, here.stdout), stderr: here.stderr });
    }
    // A reader that goes away ends a listing quietly.
    const piped = spawnSync('bash', ['-c', `"${bin}" inspect nat.appshot | head -1; exit \${PIPESTATUS[0]}`], { cwd: out, env: sb.env, encoding: 'utf8' });
    expect({ code: piped.status, stderr: piped.stderr }).toEqual({ code: 0, stderr: '' });
    expect(piped.stdout).toMatch(/^image [0-9a-f]+ /);
    // Commands that must run in the client's process, and APPSHOT_ENGINE=off,
    // go to Node: the engine serves none of them, and they work.
    const before = await served();
    expect(native(['exec', 'nat', '--', 'true']).code).toBe(0);
    expect(native(['inspect', '-']).code).not.toBe(0);
    const off = native(['ps', '-q'], { APPSHOT_ENGINE: 'off' });
    expect({ code: off.code, stdout: off.stdout }).toEqual({ code: 0, stdout: 'nat\n' });
    expect(await served()).toBe(before);
    // A shell's lower soft limit on descriptors: Node raises it to the hard
    // one as it starts, and so does the client, or the engine would refuse
    // it as a client in another context.
    const hard = spawnSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).stdout.trim();
    if (hard !== 'unlimited' && Number(hard) > 256) {
      const served0 = await served();
      const low = spawnSync('prlimit', [`--nofile=256:${hard}`, bin, 'ps', '-q'], { cwd: out, env: sb.env, encoding: 'utf8' });
      expect({ code: low.status, stdout: low.stdout, stderr: low.stderr }).toEqual({ code: 0, stdout: 'nat\n', stderr: '' });
      expect(await served()).toBe(served0 + 1);
    }
    // A request the engine will not read (over 1 MiB) is closed on the
    // client before it is accepted: the command runs in Node, with Node's
    // answer, not a client killed by SIGPIPE.
    const huge = ['ps', ...Array.from({ length: 12 }, () => 'x'.repeat(100_000))];
    const bigHere = inProcess(huge);
    const bigNative = native(huge);
    expect({ code: bigNative.code, signal: bigNative.signal, stderr: bigNative.stderr }).toEqual({ code: bigHere.code, signal: null, stderr: bigHere.stderr });
    // No engine: Node runs the command.
    await stopEngine();
    const alone = native(['ps', '-q'], { APPSHOT_ENGINE: 'manual' });
    expect({ code: alone.code, stdout: alone.stdout, stderr: alone.stderr }).toEqual({ code: 0, stdout: 'nat\n', stderr: '' });
    expect(inProcess(['rm', '-f', 'nat']).code).toBe(0);
    // Some 20 commands, a Node start for most: past a minute on a loaded
    // machine.
  }, 180_000);

  it('passes Ctrl-C from the native client on as the command\'s interruption: a clone batch stops and removes what it made', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    await startApp('natc');
    expect(inProcess(['snapshot', 'natc', '-o', 'natc.appshot']).code).toBe(0);
    expect(inProcess(['template', 'create', 'natc.appshot', '-o', 'natc.template']).code).toBe(0);
    const child = spawn(bin, ['clone', 'natc.template', '--count', '400', '--aid', 'natc-x'], { cwd: out, env: sb.env });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    // Once the batch has made its first instance.
    await waitFor(() => sb.allAids().some((a) => a.startsWith('natc-x')) || child.exitCode !== null, 60_000, 'the first clone');
    expect(child.exitCode, stderr).toBeNull();
    child.kill('SIGINT');
    expect(await exited, stderr).toBe(130);
    await waitFor(() => !sb.allAids().some((a) => a.startsWith('natc-x')), 20_000, 'the batch to be removed');
    expect(leftovers()).toEqual([]);
  });

  it('is started on demand (auto), serves only clients in its own context, and leaves no lease behind', async () => {
    await stopEngine();
    await startApp('ctx');
    const env = { ...sb.env, APPSHOT_ENGINE: 'auto' };
    const plain = (args: string[], prefix: string[] = []) => {
      const r = spawnSync(prefix[0] ?? process.execPath, [...prefix.slice(1), ...(prefix.length ? [process.execPath] : []), cli, ...args], { cwd: out, env, encoding: 'utf8', timeout: 50_000 });
      return { code: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const first = plain(['snapshot', 'ctx', '--leave-running', '-o', 'ctx.appshot']);
    expect(first.code, first.stderr).toBe(0);
    await waitForAsync(async () => (await status()).running === true, 20_000, 'the engine to start');
    const before = await served();
    expect(plain(['inspect', 'ctx.appshot']).code).toBe(0);
    expect(await served()).toBe(before + 1);
    // Without CAP_SYS_ADMIN in its bounding set, or with a lower limit, or
    // traced: the command runs in the client, with the client's rights,
    // and gives what it gives there.
    const noAdmin = plain(['inspect', 'ctx.appshot'], ['setpriv', '--bounding-set=-sys_admin']);
    expect(noAdmin.code, noAdmin.stderr).toBe(0);
    const lowLimit = plain(['inspect', 'ctx.appshot'], ['prlimit', '--nofile=512:512']);
    expect(lowLimit.code, lowLimit.stderr).toBe(0);
    expect(await served()).toBe(before + 1);
    // No request's lease is left: at most the one made ahead for the next
    // request, which holds nothing (empty: a request's names its client).
    const leases = readdirSync(join(sb.home, 'engine', 'leases'));
    expect(leases.length).toBeLessThanOrEqual(1);
    for (const l of leases) expect(readFileSync(join(sb.home, 'engine', 'leases', l), 'utf8')).toBe('');
    expect(inProcess(['rm', '-f', 'ctx']).code).toBe(0);
  });

  it('serves two clients at once without mixing their output', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    await startApp('pair');
    // A .tar.gz is unpacked with many awaits: two inspects of it interleave.
    expect(inProcess(['snapshot', 'pair', '--leave-running', '-o', 'pair.tar.gz']).code).toBe(0);
    expect(inProcess(['snapshot', 'pair', '--leave-running', '--full', '-o', 'pair2.tar']).code).toBe(0);
    const jobs = [
      ['inspect', 'pair.tar.gz', '--json'],
      ['inspect', 'pair2.tar'],
      ['inspect', 'pair.tar.gz'],
      ['inspect', 'pair2.tar', '--json'],
      ['ps', '--json'],
      ['inspect', 'missing.tar'],
    ];
    const expected = jobs.map((args) => inProcess(args));
    const before = await served();
    const results = await Promise.all(jobs.map((args) => start(args).done));
    expect(await served()).toBe(before + jobs.length);
    // A process's state letter (R or S) is of the instant ps looked: not
    // part of what the two ways of running must agree on.
    const stateless = (out: string) => out.replace(/"state": "[A-Za-z]+"/g, '"state": "?"');
    results.forEach((r, i) => expect({ args: jobs[i], code: r.code, stdout: stateless(r.stdout), stderr: r.stderr }).toEqual({ args: jobs[i], code: expected[i].code, stdout: stateless(expected[i].stdout), stderr: expected[i].stderr }));
    expect(leftovers()).toEqual([]);
    expect(inProcess(['rm', '-f', 'pair']).code).toBe(0);
  });

  it('survives a client killed during a snapshot: the snapshot is whole or left nothing', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    const engine = (await status()).pid;
    await startApp('victim');
    // APPSHOT_DEBUG makes the snapshot say when the application is frozen:
    // the client is killed then, in the middle of it.
    const client = start(['snapshot', 'victim', '-o', 'victim.appshot'], { APPSHOT_DEBUG: '1' });
    await waitFor(() => /snapshot phase freeze:/.test(client.stderr()), 20_000, 'the snapshot to freeze the application');
    client.child.kill('SIGKILL');
    const killed = await client.done;
    // On a busy machine the snapshot may finish between its message and
    // the kill: then it ended well, and the image below must be whole.
    if (killed.signal !== 'SIGKILL') expect(killed.code, client.stderr()).toBe(0);
    // The engine lives on, answers, and finishes (or undoes) the snapshot.
    await waitForAsync(async () => (await status()).commandsRunning === 0, 20_000, 'the snapshot to end in the engine');
    expect((await status()).pid).toBe(engine);
    const ps = run(['ps', '--json']);
    expect(ps.code).toBe(0);
    if (existsSync(join(out, 'victim.appshot'))) {
      // Whole: it verifies and restores, and the application it ended
      // comes back.
      expect(run(['inspect', 'victim.appshot']).code).toBe(0);
      await waitFor(() => !sb.aids().includes('victim'), 10_000, 'the snapshotted application to end');
      const r = run(['restore', 'victim.appshot']);
      expect(r.code, r.stderr).toBe(0);
    } else {
      expect(JSON.parse(ps.stdout).map((a: Json) => a.aid)).toContain('victim');
    }
    await checksPass('victim');
    expect(leftovers()).toEqual([]);
    expect(inProcess(['rm', '-f', 'victim']).code).toBe(0);
  });

  it('holds nothing of an image once its snapshot is done: an image removed frees its disk at once', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    const engine = (await status()).pid;
    await startApp('held');
    const before = await served();
    const lr = run(['snapshot', 'held', '--leave-running', '--full', '-o', 'held-lr.appshot']);
    expect(lr.code, lr.stderr).toBe(0);
    const ended = run(['snapshot', 'held', '-o', 'held.appshot']);
    expect(ended.code, ended.stderr).toBe(0);
    expect(await served()).toBe(before + 2);
    // Not a descriptor of the engine's names a file under `out` (the page
    // files, linked into the images, or unnamed and never linked).
    const openUnderOut = () =>
      readdirSync(`/proc/${engine}/fd`)
        .map((fd) => {
          try {
            return readlinkSync(`/proc/${engine}/fd/${fd}`);
          } catch {
            return '';
          }
        })
        .filter((target) => target.startsWith(`${out}/`));
    expect(openUnderOut()).toEqual([]);
    rmSync(join(out, 'held-lr.appshot'), { recursive: true });
    rmSync(join(out, 'held.appshot'), { recursive: true });
    expect(openUnderOut()).toEqual([]);
    expect(leftovers()).toEqual([]);
  });

  it('keeps opened templates, and opens one again once it changed', async () => {
    await engineKeptThroughout();
    await startApp('tpl');
    expect(inProcess(['snapshot', 'tpl', '-o', 'tpl.appshot']).code).toBe(0);
    expect(inProcess(['template', 'create', 'tpl.appshot', '-o', 'tpl.template']).code).toBe(0);
    const cache = async () => (await status()).templateCache;
    const first = await cache();
    for (const aid of ['tpl-a', 'tpl-b']) {
      const r = run(['clone', 'tpl.template', '--aid', aid]);
      expect(r.code, r.stderr).toBe(0);
      await checksPass(aid, 3);
    }
    expect(await cache()).toMatchObject({ hits: first.hits + 1, misses: first.misses + 1 });
    // Writable by others now: refused as in-process, not served from the cache.
    spawnSync('chmod', ['o+w', join(out, 'tpl.template')]);
    const refused = run(['clone', 'tpl.template', '--aid', 'tpl-c']);
    expect({ code: refused.code, stderr: refused.stderr }).toEqual({ code: 1, stderr: `appshot: tpl.template is writable by others, who could change it while it runs: chmod go-w tpl.template\n` });
    spawnSync('chmod', ['o-w', join(out, 'tpl.template')]);
    expect((await cache()).misses).toBe(first.misses + 2);
    expect(inProcess(['rm', '-f', 'tpl-a', 'tpl-b']).code).toBe(0);
  });

  it('checks the files an image maps again once they changed, though it keeps their checksums', async () => {
    await engineKeptThroughout();
    const exe = join(out, 'snapfix-copy');
    copyFileSync(fixture('snapfix'), exe);
    const r = inProcess(['run', '-d', '--aid', 'lib', '--', exe, '-1', '4']);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => lastCheck('lib') >= 3, 30_000, 'lib to start');
    expect(inProcess(['snapshot', 'lib', '-o', 'lib.appshot']).code).toBe(0);
    const before = await served();
    const first = run(['restore', 'lib.appshot']);
    expect(first.code, first.stderr).toBe(0);
    expect(inProcess(['rm', '-f', 'lib']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('lib'), 10_000, 'lib to go');
    // One byte changed in place: same size, another checksum.
    const fd = openSync(exe, 'r+');
    const byte = Buffer.alloc(1);
    readSync(fd, byte, 0, 1, 200);
    writeSync(fd, Buffer.from([byte[0] ^ 0xff]), 0, 1, 200);
    closeSync(fd);
    const second = run(['restore', 'lib.appshot']);
    expect(await served()).toBe(before + 2);
    expect({ code: second.code, stderr: second.stderr }).toEqual({ code: 1, stderr: `appshot: cannot restore lib.appshot: ${exe} differs from the one the image mapped (its contents changed)\n` });
  });

  it('keeps standby supervisors for clones, none of which outlives it, even killed with SIGKILL', async () => {
    await stopEngine();
    expect(inProcess(['engine', 'start']).code).toBe(0);
    const engine = (await status()).pid as number;
    await startApp('sby');
    expect(inProcess(['snapshot', 'sby', '-o', 'sby.appshot']).code).toBe(0);
    expect(inProcess(['template', 'create', 'sby.appshot', '-o', 'sby.template']).code).toBe(0);
    const children = (pid: number): number[] => {
      const r = spawnSync('ps', ['-o', 'pid=', '--ppid', String(pid)], { encoding: 'utf8' });
      return r.stdout.split('\n').filter((l) => l.trim()).map(Number);
    };
    const cmdline = (pid: number) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        return '';
      }
    };
    // Supervisors started as standbys, not (yet) given to an application.
    const supervisorsNow = () => new Set(sb.aids().map((aid) => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).initPid as number));
    const standbys = () => {
      const taken = supervisorsNow();
      return children(engine).filter((pid) => cmdline(pid).includes('\0--standby\0') && !taken.has(pid));
    };
    // The first clone starts them; the next ones take them.
    const first = run(['clone', 'sby.template', '--aid', 'sby-a', '-n', '2']);
    expect(first.code, first.stderr).toBe(0);
    await waitFor(() => standbys().length >= 2 && standbys().every((pid) => children(pid).length === 1), 10_000, 'two standbys with a seed each');
    const waiting = standbys();
    const second = run(['clone', 'sby.template', '--aid', 'sby-b', '-n', '3']);
    expect(second.code, second.stderr).toBe(0);
    const made = JSON.parse(run(['ps', '--json']).stdout).filter((a: Json) => a.aid.startsWith('sby-'));
    expect(made.length).toBe(5);
    // Taken ones became the supervisors of clones (and their seeds the clones).
    const supervisors = made.map((a: Json) => JSON.parse(readFileSync(join(sb.home, 'apps', a.aid, 'app.json'), 'utf8')).initPid);
    expect(waiting.every((pid) => supervisors.includes(pid))).toBe(true);
    for (const aid of ['sby-a-1', 'sby-a-2', 'sby-b-1', 'sby-b-2', 'sby-b-3']) await checksPass(aid, 2);
    // A clone made from a standby's seed does not die with its supervisor
    // (the seed's parent-death signal was cleared), as no restored process does.
    const b1 = made.find((a: Json) => a.aid === 'sby-b-1');
    const b1Init = supervisors[made.indexOf(b1)] as number;
    expect(waiting).toContain(b1Init);
    process.kill(b1Init, 'SIGKILL');
    await waitFor(() => !alive(b1Init), 10_000, "sby-b-1's supervisor to die");
    await checksPass('sby-b-1', 2);
    // A standby killed on its own takes its seed with it, and is passed over.
    await waitFor(() => standbys().length >= 2 && standbys().every((pid) => children(pid).length === 1), 10_000, 'two standbys again');
    const [lone] = standbys();
    const loneSeed = children(lone)[0];
    process.kill(lone, 'SIGKILL');
    await waitFor(() => !alive(loneSeed), 10_000, "the killed standby's seed to die");
    // Its report names the seed still: a stranger given that PID (as a
    // reused PID would be) must be left alone, not seized by the clone.
    // (Once the seed is reaped: a zombie keeps its PID, and who reaps it,
    // the namespace's init, may take its time or never come.)
    const reaped = await waitFor(() => !existsSync(`/proc/${loneSeed}`), 5000, 'the seed to be reaped').then(() => true, () => false);
    const stranger = reaped ? takePid(loneSeed) : undefined;
    const third = run(['clone', 'sby.template', '--aid', 'sby-c', '-n', '2']);
    expect(third.code, third.stderr).toBe(0);
    await checksPass('sby-c-2', 2);
    if (stranger) {
      expect(readFileSync(`/proc/${stranger}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
      expect(readFileSync(`/proc/${stranger}/stat`, 'utf8').split(') ')[1][0]).toBe('S');
      process.kill(stranger, 'SIGKILL');
    }
    // The engine killed: every standby and seed goes; the clones stay.
    await waitFor(() => standbys().length >= 2 && standbys().every((pid) => children(pid).length === 1), 10_000, 'two standbys again');
    const doomed = standbys().flatMap((pid) => [pid, ...children(pid)]);
    expect(doomed.length).toBe(4);
    process.kill(engine, 'SIGKILL');
    await waitFor(() => doomed.every((pid) => !alive(pid) || !cmdline(pid).includes('\0--standby\0')), 10_000, 'the standbys and their seeds to go with the engine');
    await checksPass('sby-b-3', 2);
    expect(inProcess(['rm', '-f', 'sby-a-1', 'sby-a-2', 'sby-b-1', 'sby-b-2', 'sby-b-3', 'sby-c-1', 'sby-c-2']).code).toBe(0);
  });

  it('registers restores in state directories it made ahead, as mkdir would: the same modes under any umask, a taken AID refused, none left once it leaves', async () => {
    await stopEngine();
    expect(inProcess(['engine', 'start']).code).toBe(0);
    await startApp('spare');
    expect(inProcess(['snapshot', 'spare', '-o', 'spare.appshot']).code).toBe(0);
    const sparesDir = join(sb.home, 'engine', 'spares');
    const spares = () => (existsSync(sparesDir) ? readdirSync(sparesDir) : []);
    await waitFor(() => spares().length >= 1, 10_000, 'a spare state directory');
    const modes = (aid: string) => [statSync(join(sb.home, 'apps', aid)).mode & 0o7777, statSync(join(sb.home, 'apps', aid, 'app.json')).mode & 0o7777];
    const withUmask = (umask: string, args: string[], env: Record<string, string> = {}) => {
      const r = spawnSync('sh', ['-c', `umask ${umask}; exec "$@"`, 'sh', process.execPath, cli, ...args], { cwd: out, env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 50_000 });
      return { code: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    for (const [i, umask] of ['022', '077', '002'].entries()) {
      const before = await served();
      const taken = spares();
      const engine = withUmask(umask, ['restore', 'spare.appshot', '--aid', `spare-e${i}`]);
      expect(engine.code, engine.stderr).toBe(0);
      expect(await served()).toBe(before + 1);
      const alone = withUmask(umask, ['restore', 'spare.appshot', '--aid', `spare-c${i}`], { APPSHOT_ENGINE: 'off' });
      expect(alone.code, alone.stderr).toBe(0);
      expect(modes(`spare-e${i}`)).toEqual(modes(`spare-c${i}`));
      // Under the engine's own umask a spare was taken (it is no longer
      // there); the others made their directory as the CLI does.
      if (umask === '022') expect(taken.filter((n) => !spares().includes(n)).length).toBe(1);
      // Its record written and renamed into place, as always.
      expect(existsSync(join(sb.home, 'apps', `spare-e${i}`, 'app.json.tmp'))).toBe(false);
    }
    // An AID taken is refused as without spares, and the application
    // holding it is untouched.
    await waitFor(() => spares().length >= 1, 10_000, 'a spare state directory');
    const again = run(['restore', 'spare.appshot', '--aid', 'spare-e0']);
    const againAlone = inProcess(['restore', 'spare.appshot', '--aid', 'spare-e0']);
    expect([again.code, again.stderr]).toEqual([againAlone.code, againAlone.stderr]);
    expect(again.code).toBe(4);
    await checksPass('spare-e0', 2);
    expect(inProcess(['rm', '-f', ...[0, 1, 2].flatMap((i) => [`spare-e${i}`, `spare-c${i}`])]).code).toBe(0);
    await stopEngine();
    expect(existsSync(sparesDir)).toBe(false);
    expect(readdirSync(join(sb.home, 'engine', 'leases'))).toEqual([]);
  });

  it("honours a client's kill or stop point only if started with APPSHOT_TEST_KNOBS=1: any other engine refuses it and lives on, its client running the command itself", async () => {
    await stopEngine();
    await startApp('knobs');
    expect(inProcess(['snapshot', 'knobs', '--leave-running', '-o', 'knobs.appshot']).code).toBe(0);
    // A point `inspect` reaches (loadImage), in the engine if it runs it.
    const point = 'image: owners checked';
    const stateOf = (pid: number) => readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0];
    // A request as any program of this user's may send it (bin/appshot.js
    // never sends a kill point, but the engine must not rely on that):
    // the frames answered, once the engine ends the connection.
    const build = (() => {
      const st = statSync(join(root, 'dist', 'engine', 'protocol.js'), { bigint: true });
      return `${st.ino}:${st.mtimeNs}`;
    })();
    const request = (env: Record<string, string>) => {
      const frames: { type: string; payload: string }[] = [];
      const s = connect(join(sb.home, 'engine', 'engine.sock'));
      const reader = new FrameReader((type, payload) => frames.push({ type: String.fromCharCode(type), payload: payload.toString() }));
      s.on('data', (d) => reader.push(d));
      const appshotEnv = Object.fromEntries(Object.entries(sb.env).filter(([k]) => k.startsWith('APPSHOT_'))) as Record<string, string>;
      s.write(JSON.stringify({ kind: 'command', argv: ['inspect', 'knobs.appshot'], cwd: out, env: { ...appshotEnv, ...env }, umask: 0o22, tty: { stdout: false, stderr: false }, build }) + '\n');
      const ended = new Promise<typeof frames>((resolve, reject) => {
        s.on('close', () => resolve(frames));
        s.on('error', reject);
      });
      return { frames, ended };
    };

    // Started with both points in its own environment, as an engine
    // started on demand by a client that has them (spawn.ts passes the
    // client's environment on): dropped.
    expect(run(['engine', 'start'], { APPSHOT_ENGINE_IDLE: '1800', APPSHOT_TEST_KILL_AT: point, APPSHOT_TEST_STOP_AT: point, APPSHOT_TEST_FAIL_AT: 'serve: resumed' }).code).toBe(0);
    const engine = (await status()).pid;
    expect(readFileSync(join(sb.home, 'engine', 'log'), 'utf8')).toContain(
      'APPSHOT_TEST_KILL_AT and APPSHOT_TEST_STOP_AT and APPSHOT_TEST_FAIL_AT of its start environment ignored: an engine honours test knobs only if started with APPSHOT_TEST_KNOBS=1',
    );
    const before = await served();
    for (const k of ['APPSHOT_TEST_KILL_AT', 'APPSHOT_TEST_STOP_AT']) {
      const frames = await request({ [k]: point }).ended;
      expect(frames).toEqual([{ type: 'R', payload: `the client's ${k} would act on the engine, which honours them only if started with APPSHOT_TEST_KNOBS=1: it runs the command itself` }]);
      expect(stateOf(engine)).not.toBe('T');
    }
    // Any other test knob too: a failure point would fail the engine's
    // work (a hosted serve's resume) while the command runs.
    expect(await request({ APPSHOT_TEST_FAIL_AT: 'serve: resumed' }).ended).toEqual([
      { type: 'R', payload: "the client's APPSHOT_TEST_FAIL_AT would act on the engine, which honours them only if started with APPSHOT_TEST_KNOBS=1: it runs the command itself" },
    ]);
    // A NUL byte in a name: Node's env setter would cut the name there
    // and set the point itself; in a value, any check of it is unsound.
    // Refused, the engine neither stopped nor killed.
    for (const env of [{ 'APPSHOT_TEST_KILL_AT\u0000x': point }, { 'APPSHOT_TEST_STOP_AT\u0000': point }, { APPSHOT_HOME: sb.home, 'APPSHOT_HOME\u0000': join(out, 'other') }, { APPSHOT_DEBUG: '1\u0000' }]) {
      const frames = await request(env).ended;
      expect(frames).toHaveLength(1);
      expect(frames[0].type).toBe('R');
      expect(frames[0].payload).toMatch(/has a NUL byte in its name or value: it runs the command itself$/);
      expect(stateOf(engine)).not.toBe('T');
    }
    // A client with a stop point runs the command itself and stops there,
    // the engine answering meanwhile.
    const stopped = start(['inspect', 'knobs.appshot'], { APPSHOT_TEST_STOP_AT: point });
    await waitFor(() => stateOf(stopped.child.pid!) === 'T', 20_000, 'the client to stop at its point');
    const meanwhile = await runAsync(['inspect', 'knobs.appshot']);
    expect(meanwhile.code, meanwhile.stderr).toBe(0);
    stopped.child.kill('SIGCONT');
    const resumed = await stopped.done;
    expect({ code: resumed.code, stdout: resumed.stdout }).toEqual({ code: 0, stdout: meanwhile.stdout });
    // The engine served the one command without a point, and lives on.
    expect((await status()).pid).toBe(engine);
    expect(await served()).toBe(before + 1);

    // Started with APPSHOT_TEST_KNOBS=1 (a test's engine): the point is
    // the engine's, which stops there until continued.
    await stopEngine();
    expect(run(['engine', 'start'], { APPSHOT_ENGINE_IDLE: '1800', APPSHOT_TEST_KNOBS: '1' }).code).toBe(0);
    const knobbed = (await status()).pid;
    const asked = request({ APPSHOT_TEST_STOP_AT: point });
    await waitFor(() => stateOf(knobbed) === 'T', 20_000, 'the engine to stop at the point');
    process.kill(knobbed, 'SIGCONT');
    const frames = await asked.ended;
    expect([frames[0].type, frames.at(-1)!.type]).toEqual(['A', 'X']);
    expect(frames.filter((f) => f.type === 'O').map((f) => f.payload).join('')).toBe(meanwhile.stdout);
    await stopEngine();
    expect(inProcess(['rm', '-f', 'knobs']).code).toBe(0);
  });

  it('refuses a second engine for the same state directory', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    const first = (await status()).pid;
    const second = inProcess(['engine', 'start', '--foreground']);
    expect(second.code).toBe(4);
    expect(second.stderr).toBe(`appshot: an engine already runs for ${sb.home}\n`);
    // Started as its own process (as APPSHOT_ENGINE=auto does): the same.
    const direct = spawnSync(process.execPath, [join(root, 'dist', 'engine', 'main.js')], { env: sb.env, encoding: 'utf8', timeout: 20_000 });
    expect(direct.status).toBe(4);
    expect(direct.stderr).toMatch(/an engine already runs/);
    // `engine start` with one running is no error: it says which one.
    const again = inProcess(['engine', 'start', '--json']);
    expect(again.code).toBe(0);
    expect(JSON.parse(again.stdout).pid).toBe(first);
    expect((await status()).pid).toBe(first);
    // What a person reads: its age and idle timeout in one unit each, from
    // uptimeMs and idleTimeoutMs (not the deprecated whole seconds).
    const human = inProcess(['engine', 'status']);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(new RegExp(`^engine ${first} serving ${sb.home}: up \\d+[smhd], \\d+ commands? served, \\d+ running; leaves after \\d+[smhd] idle\n$`));
  });

  it('leaves when idle, removing its socket', async () => {
    await stopEngine();
    // What start printed: on a loaded machine the engine may have left
    // before a status request could ask it.
    const started = run(['engine', 'start', '--json'], { APPSHOT_ENGINE_IDLE: '1' });
    expect(started.code).toBe(0);
    const s = JSON.parse(started.stdout) as Json;
    expect(s.idleSeconds).toBe(1);
    await waitFor(() => !alive(s.pid), 20_000, 'the idle engine to leave');
    expect(existsSync(s.socket)).toBe(false);
    expect((await status()).running).toBe(false);
    // Without it, the CLI works as ever.
    expect(run(['ps']).code).toBe(0);
  });
});
