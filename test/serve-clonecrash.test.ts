/**
 * A clone made by serve (clone mode) whose server is killed right after
 * the clone resumed, before serve looked for the process to watch: the
 * kill is its crash (issue 15: "an instance that crashes ... the event
 * logged").
 *
 * The server, sharedlisten (test/fixtures/sharedlisten.c), has a forked
 * helper holding a copy of its listener, as a BGSAVE child or a worker
 * not yet started would: once the server is gone, connections to the
 * clone's port still succeed and wait there, never answered. Looked for
 * among the processes that hold the listener when serve gets to look,
 * the helper was taken for the server and watched instead, and the dead
 * clone kept its place. The process watched is now the one the
 * template's image says held the listener (server.ts
 * templateListenerHolder), found by its binding.
 *
 * serve stops itself (SIGSTOP, APPSHOT_TEST_STOP_AT) at 'serve: cloned',
 * right after each clone resumed: the kill comes in that window, which a
 * loaded machine opens by chance.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, fixture, processState, type Running, Sandbox, tcpExchange, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-clonecrash-'));
// Ports of their own, 32600-32699 (see Sandbox for the other files').
const base = 32600 + (process.pid % 50) * 2;
const APP = base;
const PUBLIC = base + 1;

let serve: Running | undefined;
/** A clone's init held stopped by the test, let go whatever happens. */
let stoppedInit: number | undefined;

afterAll(async () => {
  if (stoppedInit) process.kill(stoppedInit, 'SIGCONT');
  if (serve && serve.child.exitCode === null) {
    serve.child.kill('SIGTERM');
    serve.child.kill('SIGCONT');
  }
  await serve?.exited;
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** What one client gets for a ping: all it was told before the end. */
const asked = (port: number) => tcpExchange(port, 'ping\n', 30_000);

/** The processes (not init) of application `aid`, lowest virtual PID first. */
const processesOf = (aid: string) =>
  (sb.json<{ aid: string; processes: { vpid: number; pid: number; init: boolean }[] }[]>(['ps']).find((a) => a.aid === aid)?.processes ?? [])
    .filter((p) => !p.init)
    .sort((a, b) => a.vpid - b.vpid)
    .map((p) => p.pid);

/** The system PID of application `aid`'s init. */
const initOf = (aid: string) => sb.json<{ aid: string; processes: { pid: number; init: boolean }[] }[]>(['ps']).find((a) => a.aid === aid)!.processes.find((p) => p.init)!.pid;

describe('appshot serve, clone mode: a clone whose server is killed right after it resumed', () => {
  it('is a crash (its helper, still holding a copy of the listener, is not taken for it): the clone goes, and the next client is answered by a new one', async () => {
    const rules = join(out, 'crash.rules');
    writeFileSync(rules, `PORT ${APP} ALLOCATE\n`);
    const r = sb.run(['run', '-d', '--aid', 'cctpl', '--rules', rules, '--', fixture('sharedlisten'), String(APP)]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('cctpl').includes('LISTENING'), 10_000, 'the server to listen');
    const s = sb.run(['snapshot', 'cctpl', '-o', join(out, 'cc.img')]);
    expect(s.code, s.stderr).toBe(0);
    const t = sb.run(['template', 'create', join(out, 'cc.img'), '-o', join(out, 'cc.template')]);
    expect(t.code, t.stderr).toBe(0);
    const add = sb.run(['service', 'add', 'cc', '--mode', 'clone', '--from', join(out, 'cc.template'), '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--max', '2', '--idle', '1h']);
    expect(add.code, add.stderr).toBe(0);

    serve = sb.start(['serve'], { APPSHOT_TEST_STOP_AT: 'serve: cloned' });
    await serve.line(/^ready$/);
    const servePid = serve.child.pid!;
    const events = () => serve!.logged<{ event: string; service?: string; instance?: string }>().filter((e) => e.service === 'cc');

    // Forwarded to the server before its end, or to the helper's copy of
    // the listener and cut when the crashed clone is removed.
    const first = asked(PUBLIC).catch(() => '');
    await waitFor(() => processState(servePid) === 'T', 30_000, 'serve to stop after the clone resumed');
    const aid = sb.aids().find((a) => a.startsWith('cc-'));
    expect(aid, sb.aids().join(' ')).toBeDefined();
    const [server, ...others] = processesOf(aid!);
    expect(others.length).toBeGreaterThanOrEqual(1);
    // The clone's init held stopped: the server stays a zombie when serve
    // looks for it, as a loaded machine leaves it now and then (ci-44a).
    // A zombie has ended; taken for alive, nothing watched it.
    const init = (stoppedInit = initOf(aid!));
    process.kill(init, 'SIGSTOP');
    process.kill(server, 'SIGKILL');
    await waitFor(() => !alive(server), 10_000, 'the server to end');
    process.kill(servePid, 'SIGCONT');

    await waitFor(() => events().some((e) => e.event === 'crash' && e.instance === aid), 10_000, 'the crash to be seen').catch((e: Error) => {
      throw new Error(`${e.message}\n${serve!.stderr}`);
    });
    process.kill(init, 'SIGCONT');
    stoppedInit = undefined;
    // The crashed clone is removed: its helper goes with it.
    await waitFor(() => others.every((p) => !alive(p)), 10_000, "the crashed clone's other processes to end");
    await waitFor(() => !sb.aids().includes(aid!), 10_000, 'the crashed clone to be removed');

    // The next client: a new clone, which answers it.
    const next = asked(PUBLIC);
    await waitFor(() => processState(servePid) === 'T', 30_000, 'serve to stop after the second clone resumed');
    process.kill(servePid, 'SIGCONT');
    expect(await next).toBe('pong 1\n');
    expect(['pong 1\n', '']).toContain(await first);

    serve.child.kill('SIGTERM');
    expect((await serve.exited).code, `serve's log ends:\n${serve.stderr.slice(-3000)}`).toBe(0);
    // Clones go with serve: nothing of the service is left running.
    expect(sb.aids().filter((a) => a.startsWith('cc-'))).toEqual([]);
    sb.run(['rm', '--force', 'cctpl']);
  });
});
