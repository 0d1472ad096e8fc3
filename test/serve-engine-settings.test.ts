/**
 * A serve hosted by the resident engine runs on while other clients'
 * commands run in the same process, each with its client's APPSHOT_*
 * variables in the engine's environment. The settings that shape what
 * the engine keeps for everyone (engine/settings.ts: the port range,
 * standbys, a suspend's reservation, debug output) are read by each
 * reader as its own: a client whose APPSHOT_PORTS is not a range, its
 * command running in the engine, does not make the hosted serve's clones
 * fail (review r404 F3: they threw "APPSHOT_PORTS='…': expected
 * FIRST-LAST" while that command ran).
 *
 * The client's command is `appshot stop -s WINCH -t 120` of an
 * application that ignores SIGWINCH: it waits in the engine, with the
 * client's variables set, until the test kills the application.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, command, fixture, Sandbox, tcpExchange, waitFor } from './helpers.js';
import { serveLockTaken } from '../src/serve/lock.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-engine-settings-'));
// Ports of their own, 32001-32099 (see Sandbox for the other files').
const base = 32002 + (process.pid % 40) * 2;
const APP = base;
const PUBLIC = base + 1;

interface EngineStatus {
  pid: number;
  commandsRunning: number;
  commandsServed: number;
  serving: { services: string[] } | null;
}
const engineStatus = () => sb.json<EngineStatus>(['engine', 'status']);

afterAll(async () => {
  sb.run(['serve', 'stop']);
  for (const aid of sb.aids()) sb.run(['rm', '--force', aid]);
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

describe('a client\'s settings do not act on the serve the engine hosts', () => {
  beforeAll(async () => {
    const rules = join(out, 'web.rules');
    writeFileSync(rules, `PORT ${APP} ALLOCATE\n`);
    const r = sb.run(['run', '-d', '--aid', 'webtpl', '--rules', rules, '--', fixture('sharedlisten'), String(APP)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('webtpl').includes('LISTENING'), 10_000, 'the server to listen');
    expect(sb.run(['snapshot', 'webtpl', '-o', join(out, 'web.img')]).code).toBe(0);
    const t = sb.run(['template', 'create', join(out, 'web.img'), '-o', join(out, 'web.template')]);
    expect(t.code, t.stderr).toBe(0);
    const add = sb.run(['service', 'add', 'web', '--mode', 'clone', '--from', join(out, 'web.template'), '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--max', '3', '--concurrency', '1', '--idle', '1h']);
    expect(add.code, add.stderr).toBe(0);
  }, 120_000);

  it('a client whose APPSHOT_PORTS is no range, its command running in the engine, does not break the hosted serve\'s clones', async () => {
    const r = sb.run(['run', '-d', '--aid', 'holder', '--', '/bin/sleep', '1000']);
    expect(r.code, r.stderr).toBe(0);
    // Read now: while the client's command runs, the test's own commands
    // (other variables) wait at the engine's context gate.
    const holderPid = sb.systemPid('holder');

    const d = sb.run(['serve', '-d']);
    expect(d.code, d.stderr).toBe(0);
    const engine = engineStatus();
    // Hosted: serve -d printed the engine's PID, and the engine says so.
    expect(Number(d.stdout.trim())).toBe(engine.pid);
    expect(engine.serving?.services).toEqual(['web']);

    const client = spawn(command, ['stop', '-s', 'WINCH', '-t', '120', 'holder'], { env: { ...sb.env, APPSHOT_PORTS: 'not-a-range' } });
    let clientErr = '';
    client.stderr.on('data', (b: Buffer) => (clientErr += b.toString()));
    const clientDone = new Promise<number | null>((resolve) => client.on('exit', (code) => resolve(code)));
    try {
      // Running in the engine (not in the client's own process): the
      // engine counts it (the -d serve's own request has ended).
      await waitFor(() => engineStatus().commandsRunning === 1, 20_000, 'the client\'s stop to run in the engine');
      // Three clients at once, one connection per clone: three clones, each
      // allocating its port while the client's APPSHOT_PORTS is set.
      const serveLog = () => readFileSync(join(sb.home, 'services', 'serve.log'), 'utf8');
      const clonesIn = (log: string) => log.split('\n').filter((l) => l.includes('"event":"clone"')).length;
      // Those made before the client's command ran are not counted; the
      // serve starts a clone only for a connection held waiting (policy.ts
      // 'held'), so those counted after were all begun while it ran.
      const clonesBefore = clonesIn(serveLog());
      const answers = await Promise.all([0, 1, 2].map(() => tcpExchange(PUBLIC, 'ping\n', 30_000))).catch((e: Error) => {
        throw new Error(`${e.message}; serve's log:\n${serveLog().slice(-3000)}`);
      });
      for (const a of answers) expect(a).toMatch(/^pong \d+/);
      expect(engineStatus().commandsRunning, 'the client\'s stop ended early').toBe(1);
      const log = serveLog();
      expect(log).not.toMatch(/APPSHOT_PORTS/);
      expect(clonesIn(log) - clonesBefore, 'clones made while the client\'s command ran').toBeGreaterThanOrEqual(1);
      // The other half of the view: a command of that client, run in the
      // engine alongside (the same context: it does not wait at the gate),
      // reads the client's APPSHOT_PORTS, not the engine's own.
      const served = engineStatus().commandsServed;
      const clone = spawnSync(command, ['clone', join(out, 'web.template')], { env: { ...sb.env, APPSHOT_PORTS: 'not-a-range' }, encoding: 'utf8' });
      expect(clone.stderr).toMatch(/APPSHOT_PORTS='not-a-range': expected FIRST-LAST/);
      expect(clone.status).toBe(2);
      expect(engineStatus().commandsServed, 'the clone ran in the engine').toBe(served + 1);
    } finally {
      process.kill(holderPid, 'SIGKILL');
    }
    // And the client's own command ran with its own settings, to its end.
    expect(await clientDone, clientErr).toBe(0);
  }, 180_000);

  it('a serve request waiting at the engine\'s gate when the engine is told to leave is stopped once it starts, and the engine leaves', async () => {
    sb.run(['serve', 'stop']);
    const r = sb.run(['run', '-d', '--aid', 'gateholder', '--', '/bin/sleep', '1000']);
    expect(r.code, r.stderr).toBe(0);
    const holderPid = sb.systemPid('gateholder');
    const engine = engineStatus().pid;
    // Another context (its own current directory) holds the gate while
    // its stop waits for an application that ignores SIGWINCH.
    const holder = spawn(command, ['stop', '-s', 'WINCH', '-t', '120', 'gateholder'], { env: sb.env, cwd: out });
    const holderDone = new Promise<number | null>((resolve) => holder.on('exit', (code) => resolve(code)));
    await waitFor(() => engineStatus().commandsRunning === 1, 20_000, 'the holder\'s stop to run in the engine');
    const serve = spawn(command, ['serve', '-d'], { env: sb.env });
    let serveErr = '';
    serve.stderr.on('data', (b: Buffer) => (serveErr += b.toString()));
    const serveDone = new Promise<number | null>((resolve) => serve.on('exit', (code) => resolve(code)));
    try {
      // Accepted, waiting at the gate: not hosted yet.
      await waitFor(() => engineStatus().commandsRunning === 2, 20_000, 'serve -d to wait at the engine\'s gate');
      expect(engineStatus().serving).toBeNull();
      process.kill(engine, 'SIGTERM');
      await waitFor(() => /SIGTERM: leaving/.test(readFileSync(join(sb.home, 'engine', 'log'), 'utf8')), 20_000, 'the engine to begin leaving');
      // The gate opens: the serve request runs, after the engine looked
      // for a serve to stop.
      process.kill(holderPid, 'SIGKILL');
      expect(await holderDone).toBe(0);
      await serveDone;
      expect(serveErr).toMatch(/serve stopped before it was ready: the engine is leaving/);
      await waitFor(() => !alive(engine), 30_000, `engine ${engine} to leave (a serve it hosted after its signal kept it)`);
      expect(serveLockTaken(sb.home)).toBeUndefined();
      expect(sb.aids().filter((a) => a.startsWith('web-'))).toEqual([]);
    } finally {
      if (alive(holderPid)) process.kill(holderPid, 'SIGKILL');
      // Left, failing: its second signal ends it.
      if (alive(engine)) process.kill(engine, 'SIGTERM');
    }
  }, 180_000);
});
