/**
 * `appshot serve` hosted by the resident engine (commands/serve.ts
 * hostInEngine, engine/hosted.ts), against serve in its own process:
 * - attached: the client prints what serve prints, the engine's process
 *   holds the front door (and /metrics), the engine does not idle out
 *   while it serves, `engine status` lists it; a second serve, hosted or
 *   not, is refused with one line and changes nothing; Ctrl-C stops it,
 *   the same engine then hosts the next serve, and idles out after it;
 * - `serve -d` returns the engine's PID; `engine stop` stops serving
 *   gracefully before the engine leaves;
 * - the engine killed with SIGKILL while it hosts a prepared instance:
 *   the next `appshot serve` takes everything over and answers;
 * - `serve --foreground` serves in its own process while an engine runs
 *   (the serve files run in that mode: helpers.ts Sandbox.start);
 * - `serve stop`: a hosted serve, attached or -d, stops and the engine
 *   stays (it answers, it hosts the next serve), nothing listens on the
 *   public port; a serve of its own is sent SIGTERM; nothing serving:
 *   one line, exit 3;
 * - the native client (build/Release/appshot-client) hands `serve` to
 *   the engine itself, attached (Ctrl-C stops serving) and -d, and runs
 *   Node for `serve --foreground`.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readlinkSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { alive, cli, root, Running, Sandbox, snapshotListener, tcpExchange, waitFor } from './helpers.js';

const sb = new Sandbox();
// The forwarding front door: these tests check that the public port closes
// with serve. A restore-mode instance given the shared listener (the
// default) keeps it, and answers on it, across serves (serve.test.ts).
Object.assign(sb.env, { APPSHOT_SHARE_LISTENER: '0' });
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-engine-'));
// Ports of their own, 16800-16999 (see Sandbox for the other files').
const base = 16800 + (process.pid % 50) * 4;
const APP = base;
const PUBLIC = base + 1;
const METRICS = base + 2;

const running: Running[] = [];

afterAll(async () => {
  for (const s of running) if (s.child.exitCode === null) s.child.kill('SIGKILL');
  await Promise.all(running.map((s) => s.exited));
  await sb.stopEngine();
  sb.run(['rm', '-f', 'db']);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

// A test that failed leaves no serve behind for the next (which would
// find the front door taken), nor its engine.
afterEach(async () => {
  for (const s of running) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill('SIGKILL');
  await Promise.all(running.map((s) => s.exited));
  await sb.stopEngine();
});

/** `appshot args...` with extra environment. */
const runWith = (args: string[], env: Record<string, string>) => spawnSync(process.execPath, [cli, ...args], { env: { ...sb.env, ...env }, encoding: 'utf8', timeout: 50_000 });

interface EngineStatus {
  running?: boolean;
  pid: number;
  commandsServed: number;
  serving: { services: string[]; attached: boolean; metrics?: string } | null;
}
const engineStatus = () => sb.json<EngineStatus>(['engine', 'status']);

/** An engine that leaves after 3 s (or `idle`) without a command (or a serve). */
function startEngine(idle = '3'): number {
  const r = runWith(['engine', 'start', '--json'], { APPSHOT_ENGINE_IDLE: idle });
  expect(r.status, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as { pid: number }).pid;
}

interface Shown {
  state: string;
  served: boolean;
  servePid: number | null;
  instances: { state: string; prepared?: boolean }[];
}
const show = () => sb.json<Shown>(['service', 'show', 'db']);

const lockHolder = () => readFileSync(join(sb.home, 'services', 'serve.lock'), 'utf8').trim();

const events = (s: Running) => s.logged();

const metrics = () =>
  new Promise<string>((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: METRICS, path: '/metrics', agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
    req.end();
  });

const refused = async (port: number) => {
  try {
    await tcpExchange(port, 'ping\n', 2000);
    return false;
  } catch (e) {
    return /ECONNREFUSED/.test((e as Error).message);
  }
};

describe('appshot serve hosted by the resident engine', () => {
  beforeAll(async () => {
    const image = join(out, 'db.img');
    await snapshotListener(sb, 'tpl', APP, image);
    sb.ok(['rm', '-f', 'tpl']);
    const add = sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '500ms']);
    expect(add.code, add.stderr).toBe(0);
    // The engine the snapshot started (default idle time) goes: each test
    // starts its own.
    await sb.stopEngine();
  });

  it('serves from the engine while a client is attached, never idles out meanwhile, refuses a second serve, and stops at Ctrl-C', async () => {
    const engine = startEngine();
    const serve = sb.start(['serve', '--metrics', String(METRICS)], { TEST_SERVE: 'hosted' });
    running.push(serve);
    await serve.line(/^ready$/);
    // The engine holds the front door, not the client.
    expect(lockHolder()).toBe(`${engine} engine`);
    expect(show()).toMatchObject({ served: true, servePid: engine });
    expect(engineStatus().serving).toMatchObject({ services: ['db'], attached: true, metrics: `http://127.0.0.1:${METRICS}/metrics` });
    expect(sb.ok(['service', 'show', 'db'])).toMatch(new RegExp(`^served +by appshot serve in the resident engine, pid ${engine}$`, 'm'));
    expect(sb.ok(['engine', 'status'])).toMatch(/^serving db for \d+[smhd], since .* \(appshot serve, its client attached\); log .*serve\.log; metrics http:/m);

    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    // Suspended after 500 ms idle, resumed again, all well past the
    // engine's 3 s idle time: it stays.
    await waitFor(() => events(serve).some((e) => e.event === 'suspend'), 30_000, 'the suspend, in the log the client relays');
    await new Promise((r) => setTimeout(r, 4000));
    expect(alive(engine)).toBe(true);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    expect(events(serve).filter((e) => e.event === 'restore').length).toBeGreaterThanOrEqual(1);
    expect(await metrics()).toMatch(/^appshot_serve_restore_seconds_count\{service="db"\} [1-9]/m);
    // Its log goes to services/serve.log too.
    expect(readFileSync(join(sb.home, 'services', 'serve.log'), 'utf8')).toMatch(/"event":"ready"/);

    // A second serve, hosted or in its own process: one line, nothing done.
    for (const args of [['serve'], ['serve', '--foreground']]) {
      const second = sb.run(args);
      expect(second.code, second.stderr).toBe(4);
      expect(second.stderr.trim()).toBe(`appshot: appshot serve already runs for ${sb.home} (hosted by the resident engine, pid ${engine}): one front door per state directory`);
    }
    expect(show()).toMatchObject({ served: true, servePid: engine });
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);

    // Ctrl-C: serving stops (the instance keeps running, as ever), the
    // client leaves with 0, and the engine, idle now, leaves too.
    serve.child.kill('SIGINT');
    expect((await serve.exited).code).toBe(0);
    expect(events(serve).map((e) => e.event)).toContain('stopping');
    expect(show()).toMatchObject({ served: false });
    expect(await refused(PUBLIC)).toBe(true);

    // The same engine hosts the next serve as well (its forwarding thread,
    // the process's one, now reports to that serve).
    const again = sb.start(['serve', '--prepared', '0'], { TEST_SERVE: 'hosted' });
    running.push(again);
    await again.line(/^ready$/);
    expect(lockHolder()).toBe(`${engine} engine`);
    // Suspended first, so that the connections are held and resumed (the
    // thread hands each over to this serve), not only forwarded.
    await waitFor(() => events(again).some((e) => e.event === 'suspend'), 30_000, 'the next serve to suspend the instance it took over');
    const pongs = await Promise.all(Array.from({ length: 20 }, () => tcpExchange(PUBLIC, 'ping\n', 30_000)));
    expect(pongs.filter((p) => !/^pong \d+\n$/.test(p))).toEqual([]);
    again.child.kill('SIGINT');
    expect((await again.exited).code).toBe(0);
    await waitFor(() => !alive(engine), 20_000, 'the engine to idle out once it serves nothing');
  });

  it('serve -d returns the engine\'s PID; engine stop stops serving gracefully, then leaves', async () => {
    const engine = startEngine();
    const r = runWith(['serve', '-d', '--prepared', '0'], {});
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${engine}\n`);
    expect(engineStatus().serving).toMatchObject({ services: ['db'], attached: false });
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    await new Promise((r) => setTimeout(r, 4000));
    expect(alive(engine)).toBe(true);

    const stop = sb.run(['engine', 'stop']);
    expect(stop.stdout).toBe(`engine ${engine} leaving (it stops serving db first)\n`);
    await waitFor(() => !alive(engine), 20_000, 'the engine to leave');
    expect(show()).toMatchObject({ served: false });
    expect(await refused(PUBLIC)).toBe(true);
    expect(readFileSync(join(sb.home, 'services', 'serve.log'), 'utf8')).toMatch(/"event":"stopping","why":"the engine is leaving"/);
  });

  it('the engine killed with SIGKILL while it hosts a prepared instance leaves nothing the next serve cannot take over', async () => {
    const engine = startEngine();
    const r = runWith(['serve', '-d'], {});
    expect(r.status, r.stderr).toBe(0);
    // Suspended and its next instance prepared: processes held stopped
    // under the engine's ptrace, its port claimed.
    await waitFor(() => show().instances[0]?.state === 'suspended' && show().instances[0]?.prepared === true, 30_000, 'a prepared instance');
    const held = sb.json<{ aid: string; processes: { pid: number }[] }[]>(['ps']).find((a) => a.aid === 'db')!.processes.map((p) => p.pid);
    expect(held.length).toBeGreaterThan(0);
    process.kill(engine, 'SIGKILL');
    await waitFor(() => !alive(engine), 10_000, 'the engine to die');
    await waitFor(() => held.every((p) => !alive(p)), 10_000, 'the held processes to die with their tracer');
    expect(show()).toMatchObject({ served: false });

    // The next serve (a new engine, started for it): everything taken over.
    const next = sb.start(['serve'], { TEST_SERVE: 'hosted' });
    running.push(next);
    await next.line(/^ready$/);
    const second = engineStatus().pid;
    expect(second).not.toBe(engine);
    expect(lockHolder()).toBe(`${second} engine`);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    // Answered is what shows it ran; by the time show() looks, a loaded
    // machine may have let the service's idle time pass (suspended again).
    expect(show()).toMatchObject({ served: true, servePid: second });
    next.child.kill('SIGTERM');
    expect((await next.exited).code).toBe(0);
    await sb.stopEngine();
  });

  it('serve --foreground serves in its own process while an engine runs, and the engine then refuses to host a second', async () => {
    // Not the 3 s idle time: serving nothing, the engine must not leave
    // while a loaded machine starts the serve beside it.
    const engine = startEngine('120');
    const serve = sb.start(['serve', '--foreground']);
    running.push(serve);
    await serve.line(/^ready$/);
    expect(lockHolder()).toBe(`${serve.child.pid} process`);
    expect(show()).toMatchObject({ served: true, servePid: serve.child.pid });
    expect(engineStatus().serving).toBe(null);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(/^pong \d+\n$/);
    const second = sb.run(['serve']);
    expect(second.code).toBe(4);
    expect(second.stderr.trim()).toBe(`appshot: appshot serve already runs for ${sb.home} (pid ${serve.child.pid}): one front door per state directory`);
    serve.child.kill('SIGTERM');
    expect((await serve.exited).code).toBe(0);
    expect(show()).toMatchObject({ served: false });
    await sb.stopEngine();
    expect(alive(engine)).toBe(false);
  });

  it('serve stop stops a hosted serve, attached or -d, and the engine stays; stops a serve of its own; says so when nothing serves', async () => {
    // Long enough an idle time that the engine cannot idle out between
    // the stop and the checks that it stayed.
    const engine = startEngine('120');
    const pong = /^pong \d+\n$/;

    // Attached, stopped by a `serve stop` the engine runs itself.
    const serve = sb.start(['serve', '--prepared', '0', '--metrics', String(METRICS)], { TEST_SERVE: 'hosted' });
    running.push(serve);
    await serve.line(/^ready$/);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    const stop = sb.run(['serve', 'stop']);
    expect({ code: stop.code, stdout: stop.stdout, stderr: stop.stderr }).toEqual({
      code: 0,
      stdout: `stopped serving db (hosted by the resident engine, pid ${engine}, which keeps running)\n`,
      stderr: '',
    });
    // Returned once stopped: nothing listens on the public port or
    // /metrics, the attached client left with 0 and said why.
    expect(await refused(PUBLIC)).toBe(true);
    expect(await refused(METRICS)).toBe(true);
    const ended = await serve.exited;
    expect(ended.code).toBe(0);
    expect(serve.stderr).toMatch(/^appshot: serve stopped: asked by appshot serve stop$/m);
    expect(events(serve)).toContainEqual(expect.objectContaining({ event: 'stopping', why: 'asked by appshot serve stop' }));
    // The engine stays and answers, serving nothing.
    expect(alive(engine)).toBe(true);
    expect(engineStatus()).toMatchObject({ running: true, pid: engine, serving: null });
    // The instance as SIGTERM leaves it: running (it answers on its own
    // port), or suspended if its 500 ms idle time passed first.
    const after = show();
    expect(after.served).toBe(false);
    expect(['running', 'suspended']).toContain(after.state);
    if (after.state === 'running') expect(await tcpExchange(APP, 'ping\n', 30_000)).toMatch(pong);

    // A new serve starts in the same engine (-d), takes the instance
    // over, and is stopped by a client that does not use the engine
    // (APPSHOT_ENGINE=off): the engine's control request.
    const d = runWith(['serve', '-d', '--prepared', '0'], {});
    expect(d.status, d.stderr).toBe(0);
    expect(d.stdout).toBe(`${engine}\n`);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    const stopJson = runWith(['serve', 'stop', '--json'], { APPSHOT_ENGINE: 'off' });
    expect(stopJson.status, stopJson.stderr).toBe(0);
    const stopped = JSON.parse(stopJson.stdout) as Record<string, unknown>;
    expect(stopped).toEqual({ schema: 'appshot.serve-stop/1', home: sb.home, pid: engine, engine: true, services: ['db'] });
    const docs = readFileSync(join(root, 'docs', 'json.md'), 'utf8');
    const section = docs.slice(docs.search(/^## .*`appshot\.serve-stop\/1`/m)).split('\n## ')[0];
    expect(Object.keys(stopped).filter((k) => k !== 'schema' && !new RegExp(`\\b${k}\\b`).test(section))).toEqual([]);
    expect(await refused(PUBLIC)).toBe(true);
    expect(engineStatus()).toMatchObject({ pid: engine, serving: null });
    expect(readFileSync(join(sb.home, 'services', 'serve.log'), 'utf8')).toMatch(/"event":"stopping","why":"asked by appshot serve stop"/);

    // Nothing serving: one line, exit 3, with or without the engine.
    for (const env of [{}, { APPSHOT_ENGINE: 'off' }]) {
      for (const args of [['serve', 'stop'], ['serve', 'stop', '--json']]) {
        const none = runWith(args, env);
        expect({ env, args, code: none.status, stdout: none.stdout, stderr: none.stderr }).toEqual({ env, args, code: 3, stdout: '', stderr: `appshot: appshot serve is not running for ${sb.home}\n` });
      }
    }

    // A serve of its own: sent SIGTERM, waited for.
    const own = sb.start(['serve', '--foreground', '--prepared', '0']);
    running.push(own);
    await own.line(/^ready$/);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    const stopOwn = sb.run(['serve', 'stop']);
    expect({ code: stopOwn.code, stdout: stopOwn.stdout, stderr: stopOwn.stderr }).toEqual({ code: 0, stdout: `stopped serving db (pid ${own.child.pid})\n`, stderr: '' });
    expect((await own.exited).code).toBe(0);
    expect(await refused(PUBLIC)).toBe(true);
    expect(show()).toMatchObject({ served: false });
    expect(engineStatus()).toMatchObject({ pid: engine, serving: null });
    await sb.stopEngine();
  });

  it('serve stop, or engine stop, while a hosted serve starts waits for it and stops it; the serve never comes up', async () => {
    // The hosted serve waits, once it holds the front door's lock and
    // before its ports listen, while this file exists: the window a stop
    // once missed (it said "not running", and the serve came up).
    const hold = join(out, 'hold');
    const knob = { APPSHOT_TEST_HOSTED_HOLD: hold };
    const engineLog = () => readFileSync(join(sb.home, 'engine', 'log'), 'utf8');
    /** An engine whose serve -d is starting, held in that window. */
    const starting = async () => {
      writeFileSync(hold, '');
      // Started for tests: any other engine drops the knob and refuses
      // the serve -d that carries it (server.ts isTestKnob).
      const r = runWith(['engine', 'start', '--json'], { APPSHOT_ENGINE_IDLE: '120', APPSHOT_TEST_KNOBS: '1', ...knob });
      expect(r.status, r.stderr).toBe(0);
      const pid = (JSON.parse(r.stdout) as { pid: number }).pid;
      const d = new Running(spawn(process.execPath, [cli, 'serve', '-d', '--prepared', '0'], { env: { ...sb.env, ...knob } }));
      running.push(d);
      await waitFor(() => existsSync(join(sb.home, 'services', 'serve.lock')) && lockHolder() === `${pid} engine`, 30_000, 'the hosted serve to take the lock');
      expect(engineStatus().serving).toMatchObject({ services: ['db'], starting: true });
      return { pid, d };
    };
    /** The serve -d stopped before it was ready: it says so, and nothing serves. */
    const neverReady = async (d: Running, why: string) => {
      const started = await d.exited;
      expect({ code: started.code, stdout: started.stdout }).toEqual({ code: 0, stdout: '' });
      expect(started.stderr).toMatch(new RegExp(`^appshot: serve stopped before it was ready: ${why}$`, 'm'));
      expect(await refused(PUBLIC)).toBe(true);
      expect(show()).toMatchObject({ served: false });
    };
    try {
      // serve stop (the engine's control request): it waits for the
      // start, then stops it; the engine stays.
      const first = await starting();
      const stop = new Running(spawn(process.execPath, [cli, 'serve', 'stop'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' } }));
      running.push(stop);
      await waitFor(
        () => stop.child.exitCode !== null || engineLog().includes(`asked to stop the serve it hosts by pid ${stop.child.pid}`),
        30_000,
        'the control request to reach the engine',
      );
      rmSync(hold);
      const stopped = await stop.exited;
      expect({ code: stopped.code, stdout: stopped.stdout, stderr: stopped.stderr }).toEqual({
        code: 0,
        stdout: `stopped serving db (hosted by the resident engine, pid ${first.pid}, which keeps running)`,
        stderr: '',
      });
      await neverReady(first.d, 'asked by appshot serve stop');
      expect(engineStatus()).toMatchObject({ pid: first.pid, serving: null });
      await sb.stopEngine();

      // engine stop: the same, and the engine then leaves.
      const second = await starting();
      const leave = sb.run(['engine', 'stop']);
      expect(leave.stdout).toBe(`engine ${second.pid} leaving (it stops serving db first)\n`);
      rmSync(hold);
      await neverReady(second.d, 'the engine is leaving');
      await waitFor(() => !alive(second.pid), 20_000, 'the engine to leave');

      // An attached serve whose client is killed while it starts: it
      // stops once started, as the client's going away stops a ready one
      // (it served on, with nobody attached, before).
      writeFileSync(hold, '');
      const third = runWith(['engine', 'start', '--json'], { APPSHOT_ENGINE_IDLE: '120', APPSHOT_TEST_KNOBS: '1', ...knob });
      expect(third.status, third.stderr).toBe(0);
      const thirdPid = (JSON.parse(third.stdout) as { pid: number }).pid;
      const client = new Running(spawn(process.execPath, [cli, 'serve', '--prepared', '0'], { env: { ...sb.env, ...knob } }));
      running.push(client);
      await waitFor(() => existsSync(join(sb.home, 'services', 'serve.lock')) && lockHolder() === `${thirdPid} engine`, 30_000, 'the hosted serve to take the lock');
      expect(engineStatus().serving).toMatchObject({ services: ['db'], starting: true, attached: true });
      client.child.kill('SIGKILL');
      await client.exited;
      rmSync(hold);
      await waitFor(() => engineStatus().serving === null, 30_000, 'the hosted serve to stop');
      expect(await refused(PUBLIC)).toBe(true);
      expect(show()).toMatchObject({ served: false });
      expect(readFileSync(join(sb.home, 'services', 'serve.log'), 'utf8')).toMatch(/"event":"stopping","why":"its client went away"/);
      expect(engineStatus()).toMatchObject({ pid: thirdPid });
      await sb.stopEngine();
    } finally {
      rmSync(hold, { force: true });
    }
  });

  it('serve stop of a serve of its own that is still starting says so', async () => {
    // Stopped (SIGSTOP) once it holds the lock, before it has written any
    // state: serve stop finds it by the lock and sends SIGTERM, which it
    // acts on once continued.
    const own = new Running(spawn(process.execPath, [cli, 'serve', '--foreground', '--prepared', '0'], { env: { ...sb.env, APPSHOT_TEST_STOP_AT: 'serve: locked' } }));
    running.push(own);
    const pid = own.child.pid!;
    const status = () => readFileSync(`/proc/${pid}/status`, 'utf8');
    await waitFor(() => /^State:\s+T/m.test(status()), 30_000, 'the serve to stop at its stop point');
    expect(lockHolder()).toBe(`${pid} process`);
    const stop = new Running(spawn(process.execPath, [cli, 'serve', 'stop'], { env: sb.env }));
    running.push(stop);
    try {
      // SIGTERM (15: bit 14) pending for the stopped process.
      const pending = () => status().split('\n').filter((l) => /^(ShdPnd|SigPnd):/.test(l)).some((l) => (BigInt(`0x${l.split(/\s+/)[1]}`) >> 14n) & 1n);
      await waitFor(() => stop.child.exitCode !== null || pending(), 30_000, 'serve stop to send SIGTERM');
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    const stopped = await stop.exited;
    expect({ code: stopped.code, stdout: stopped.stdout, stderr: stopped.stderr }).toEqual({ code: 0, stdout: `stopped serve pid ${pid} (it was still starting)`, stderr: '' });
    const ended = await own.exited;
    expect({ code: ended.code, stdout: ended.stdout }).toEqual({ code: 0, stdout: '' });
    expect(await refused(PUBLIC)).toBe(true);
    expect(show()).toMatchObject({ served: false });
  });

  it('a serve of its own ignores SIGTERM and SIGINT that come while it stops: it stops once, exits 0 and lets the lock go', async () => {
    // Stopped (SIGSTOP) in the middle of its graceful stop, so that the
    // next signals come exactly then.
    const own = new Running(spawn(process.execPath, [cli, 'serve', '--foreground', '--prepared', '0'], { env: { ...sb.env, APPSHOT_TEST_STOP_AT: 'serve: stopping' } }));
    running.push(own);
    await own.line(/^ready$/);
    const pid = own.child.pid!;
    const status = () => readFileSync(`/proc/${pid}/status`, 'utf8');
    own.child.kill('SIGTERM');
    await waitFor(() => /^State:\s+T/m.test(status()), 30_000, 'the serve to stop in the middle of its stop');
    own.child.kill('SIGTERM');
    own.child.kill('SIGINT');
    try {
      // Both pending (SIGINT 2: bit 1, SIGTERM 15: bit 14).
      const pending = () => status().split('\n').filter((l) => /^(ShdPnd|SigPnd):/.test(l)).reduce((m, l) => m | BigInt(`0x${l.split(/\s+/)[1]}`), 0n);
      await waitFor(() => (pending() & ((1n << 14n) | (1n << 1n))) === ((1n << 14n) | (1n << 1n)), 30_000, 'SIGTERM and SIGINT to be pending');
    } finally {
      own.child.kill('SIGCONT');
    }
    const ended = await own.exited;
    expect({ code: ended.code, signal: ended.signal }).toEqual({ code: 0, signal: null });
    // Let go: the lock file names no one, nothing listens.
    expect(lockHolder()).toBe('');
    expect(await refused(PUBLIC)).toBe(true);
    expect(show()).toMatchObject({ served: false });
  });

  it('the engine refuses a command from a client of another build with one line; serve with a stray argument (serve stpo) is refused', async () => {
    const engine = startEngine('120');
    // A request as a client of another build sends it.
    const answer = await new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      const s = connect(join(sb.home, 'engine', 'engine.sock'), () =>
        s.write(JSON.stringify({ kind: 'command', argv: ['serve', 'stop'], cwd: process.cwd(), env: {}, umask: 0o22, tty: { stdout: false, stderr: false }, build: '1:2' }) + '\n'),
      );
      s.on('data', (d) => chunks.push(d));
      s.on('end', () => resolve(Buffer.concat(chunks)));
      s.on('error', reject);
    });
    const why = `the client is of another build of appshot than the engine (1:2, the engine's `;
    expect(String.fromCharCode(answer[0])).toBe('R');
    expect(answer.subarray(5).toString()).toMatch(new RegExp(`^${why.replace(/[()]/g, '\\$&')}\\d+:\\d+\\): it runs the command itself$`));
    expect(readFileSync(join(sb.home, 'engine', 'log'), 'utf8')).toContain(why);
    // Both clients of this build are served by it.
    const before = engineStatus().commandsServed;
    sb.ok(['ps']);
    const native = spawnSync(join(root, 'build', 'Release', 'appshot-client'), ['ps'], { env: sb.env, encoding: 'utf8' });
    expect(native.status, native.stderr).toBe(0);
    expect(engineStatus().commandsServed).toBe(before + 2);

    // A typo of a subcommand is no serve: one line, exit 2, nothing
    // serves (with the engine or without).
    for (const env of [{}, { APPSHOT_ENGINE: 'off' }]) {
      const typo = runWith(['serve', 'stpo'], env);
      expect({ env, code: typo.status, stderr: typo.stderr }).toEqual({ env, code: 2, stderr: "appshot: too many arguments for 'serve'. Expected 0 arguments but got 1.\n" });
    }
    expect(engineStatus()).toMatchObject({ pid: engine, serving: null });
    expect(await refused(PUBLIC)).toBe(true);
    await sb.stopEngine();
  });

  it('the native client hands serve to the engine itself: attached until Ctrl-C, -d; serve --foreground goes to Node', async () => {
    const nativeClient = join(root, 'build', 'Release', 'appshot-client');
    const engine = startEngine('120');
    const native = (args: string[]) => spawnSync(nativeClient, args, { env: sb.env, encoding: 'utf8', timeout: 50_000 });
    const exe = (pid: number) => readlinkSync(`/proc/${pid}/exe`);
    const pong = /^pong \d+\n$/;

    const before = engineStatus().commandsServed;
    const attached = new Running(spawn(nativeClient, ['serve', '--prepared', '0'], { env: sb.env }));
    running.push(attached);
    await attached.line(/^ready$/);
    // The client attached is the native one (Node's would be node), and
    // the engine serves.
    expect(exe(attached.child.pid!)).toBe(realpathSync(nativeClient));
    expect(engineStatus().commandsServed).toBeGreaterThan(before);
    expect(lockHolder()).toBe(`${engine} engine`);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    // Its log is streamed (one JSON line per event, on stderr).
    await waitFor(() => events(attached).some((e) => e.event === 'listen'), 30_000, 'the listen event in the relayed log');
    attached.child.kill('SIGINT');
    expect((await attached.exited).code).toBe(0);
    expect(events(attached).map((e) => e.event)).toContain('stopping');
    expect(await refused(PUBLIC)).toBe(true);
    expect(engineStatus()).toMatchObject({ pid: engine, serving: null });

    // -d: the engine's PID, as Node's client prints it.
    const d = native(['serve', '-d', '--prepared', '0']);
    expect({ code: d.status, stdout: d.stdout }).toEqual({ code: 0, stdout: `${engine}\n` });
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    const stop = native(['serve', 'stop']);
    expect({ code: stop.status, stdout: stop.stdout }).toEqual({ code: 0, stdout: `stopped serving db (hosted by the resident engine, pid ${engine}, which keeps running)\n` });
    expect(await refused(PUBLIC)).toBe(true);

    // --foreground: Node runs it, in the client's own process.
    const own = new Running(spawn(nativeClient, ['serve', '--foreground', '--prepared', '0'], { env: sb.env }));
    running.push(own);
    await own.line(/^ready$/);
    expect(exe(own.child.pid!)).toBe(realpathSync(process.execPath));
    expect(lockHolder()).toBe(`${own.child.pid} process`);
    expect(await tcpExchange(PUBLIC, 'ping\n', 30_000)).toMatch(pong);
    own.child.kill('SIGTERM');
    const ownEnd = await own.exited;
    expect({ code: ownEnd.code, signal: ownEnd.signal, stderr: ownEnd.stderr }).toEqual({ code: 0, signal: null, stderr: expect.anything() });
    expect(engineStatus()).toMatchObject({ pid: engine, serving: null });
    await sb.stopEngine();
  });
});
