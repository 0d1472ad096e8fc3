/**
 * The engine's pool of clones held ready (src/template/pool.ts), on
 * templfix (test/fixtures/templfix: an allocated and a multiplexed port, a
 * home per AID by SET ENV, a redirected config directory, copy-on-write
 * data, a virtualized semaphore; CHECK answers its own verdict on all of
 * it): a clone without --aid served from the pool runs with the
 * template's state and is registered as one made on demand; the pool
 * refills to the last batch's size; nothing it holds outlives the engine
 * (stopped, or killed with SIGKILL) or the template.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, constants as fsConstants, existsSync, lstatSync, lutimesSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { constants } from 'node:os';
import { AppshotError, errorText } from '../src/errors.js';
import { SyscallError } from '../src/ptrace/remote.js';
import { isShortOfRoom } from '../src/template/room.js';
import { alive, cli, Sandbox, tcpExchange, templfixTemplate, type TemplfixWorld, waitFor } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-pool-'));
const base = 27000 + ((process.pid * 7) % 98);
const world: TemplfixWorld = { root: join(dir, 'srv'), rules: join(dir, 'templfix.rules'), portAlloc: base, portMux: base + 1 };
const tpl = join(dir, 'tpl.template');

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;
/** A pool lives a minute without a clone: on a loaded machine a test's
 * waits may take longer, and the pool it counts on would be given up.
 * Each test sizes the pool it uses with a clone of its own. */
// The pool on (the sandbox has it off for every other file) at its
// default size.
const poolEnv = { APPSHOT_CLONE_POOL: '32', APPSHOT_CLONE_POOL_IDLE_MS: '600000' };
const inProcess = (args: string[], env: Record<string, string> = {}) => {
  const r = spawnSync(process.execPath, [cli, ...args], { env: { ...sb.env, ...poolEnv, APPSHOT_ENGINE: 'off', ...env }, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
};
const status = (): Json => JSON.parse(inProcess(['engine', 'status', '--json']).stdout);
/** Instances held for the template now (0 without a pool). */
const held = (): number => status().clonePool?.[tpl]?.held ?? 0;
const cloneJson = (args: string[] = [], env: Record<string, string> = {}): Json[] => {
  const r = spawnSync(process.execPath, [cli, 'clone', tpl, '--json', ...args], { env: { ...sb.env, ...poolEnv, ...env }, encoding: 'utf8', timeout: 50_000 });
  if (r.status !== 0) throw new Error(`clone failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout);
};
const ps = (): Json[] => JSON.parse(inProcess(['ps', '--json']).stdout);
/** ps -a: held instances too (plain ps leaves them out). */
const psAll = (): Json[] => JSON.parse(inProcess(['ps', '--json', '-a']).stdout);
const record = (aid: string): Json => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8'));
/** Every process of the instances held now (their inits too), from the
 * registry: what must not outlive the pool. */
const heldProcesses = (): number[] =>
  psAll()
    .filter((a) => a.state === 'restoring')
    .flatMap((a) => [record(a.aid).initPid as number, ...a.processes.map((p: Json) => p.pid as number)]);
const gone = (pids: number[]) => pids.every((pid) => !alive(pid) || !existsSync(`/proc/${pid}`) || /^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8')));
const ownPort = (c: Json) => c.ports.find((p: Json) => p.virtual === world.portAlloc).system as number;
const ask = async (port: number, command: string) => (await tcpExchange(port, command + '\n')).trim();
async function info(port: number): Promise<Record<string, string>> {
  const line = await ask(port, 'INFO');
  return Object.fromEntries(line.split(' ').map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
}
/** The instance answers for the template's state, with its own AID where
 * the rules put it, and its own verdict on all of it is OK. */
async function isTemplateInstance(c: Json): Promise<void> {
  expect(await info(ownPort(c))).toMatchObject({ home: join(world.root, 'home', c.aid), semid: '0', sem: '7', shm: 'template', msgs: '1', state: 'template', config: '-', mapped: 'template', heap: 'ok' });
  expect(await ask(ownPort(c), 'CHECK')).toBe('OK');
}
/** What a registration says that is not the instance's own (its AID,
 * ports, paths, times and processes are). */
function shape(own: Json): Json {
  // Paths made for it carry its AID.
  const r = JSON.parse(JSON.stringify(own).replaceAll(own.aid, 'AID'));
  const { aid: _a, stateDir: _s, tables: _t, logPath: _l, createdAt, keySalt: _k, tablesCreated: _tc, initPid: _i, initStartTime: _is, harnessPid, harnessStartTime: _hs, harnessRequest, privateRoot: _p, restore, ports, ...rest } = r;
  return {
    ...rest,
    keys: Object.keys(r).sort(),
    createdRecently: Date.now() - Date.parse(createdAt) < 30_000,
    harnessPid: typeof harnessPid,
    harnessRequest: typeof harnessRequest,
    restore: { ...restore, commitPath: typeof restore?.commitPath, madePaths: restore?.madePaths?.length },
    ports: ports.map((p: Json) => ({ ...p, system: p.mode === 'allocate' ? 'own' : p.system })),
  };
}
/** ps --json of an application, but for what is its own. */
const psShape = (own: Json) => {
  const a = JSON.parse(JSON.stringify(own).replaceAll(own.aid, 'AID'));
  return { ...a, createdAt: undefined, privateRoot: undefined, ports: a.ports.length, processes: a.processes.map((p: Json) => ({ ...p, pid: undefined, ppid: undefined, pgid: undefined, sid: undefined, startTime: undefined })) };
};

/** A command under a lower RLIMIT_NOFILE (soft and hard: Node raises
 * its soft limit to the hard one, the engine's and the client's alike,
 * and a client whose limits differ from the engine's runs its command
 * itself). Without the descriptors numbered 80 and above the test
 * runner may have been given (a program holding one above its limit
 * cannot be restored: its number cannot be placed). */
const limited = (nofile: number, args: string[], env: Record<string, string> = {}) => {
  const closeRest = 'for f in /proc/$$/fd/*; do n=${f##*/}; if [ "$n" -ge 80 ]; then eval "exec $n>&-"; fi; done 2>/dev/null';
  const r = spawnSync('bash', ['-c', `${closeRest}; ulimit -n ${nofile} && exec "$0" "$@"`, process.execPath, cli, ...args], { env: { ...sb.env, ...poolEnv, ...env }, encoding: 'utf8', timeout: 50_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
};
/** A template of a program that ran under the lowest of the limits the
 * tests give (a clone may not be given a higher hard limit than its
 * client has): `sleep`, an init and one process per instance. */
const low = join(dir, 'lowfd.template');
function lowTemplate(): string {
  if (existsSync(low)) return low;
  const off = { APPSHOT_ENGINE: 'off' };
  expect(limited(80, ['run', '-d', '--aid', 'lowfd', '--', 'sleep', '100000'], off).code).toBe(0);
  expect(limited(80, ['snapshot', 'lowfd', '-o', join(dir, 'lowfd.appshot')], off).code).toBe(0);
  expect(limited(80, ['template', 'create', join(dir, 'lowfd.appshot'), '-o', low], off).code).toBe(0);
  return low;
}
const lowPool = () => status().clonePool?.[low] ?? { held: 0, target: 0 };
const engineLog = () => readFileSync(join(sb.home, 'engine', 'log'), 'utf8');
/** No engine running (one a test before left stopped and gone). */
async function noEngine(): Promise<void> {
  const engine = status();
  if (engine.running) {
    expect(inProcess(['engine', 'stop']).code).toBe(0);
    await waitFor(() => !alive(engine.pid), 20_000, 'the engine to leave');
  }
}

beforeAll(async () => {
  await templfixTemplate(sb, world, 'tf', join(dir, 'snap'), tpl);
}, 120_000);

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

describe('the engine keeps clones ready', () => {
  it('serves a clone from its pool: the template state, its own verdict OK, registered as one made on demand; then refills', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    // The first clone of the template is made on demand, and asks for one.
    const [made] = cloneJson();
    expect(made.prepared).toBeUndefined();
    await waitFor(() => held() === 1, 30_000, 'an instance held');
    // Held: registered under the AID it will have, uncommitted, every
    // process stopped and traced by the engine.
    const [waiting] = psAll().filter((a) => a.state === 'restoring');
    // Not an application anyone made yet: plain ps leaves it out.
    expect(ps().map((a) => a.aid)).toEqual([made.aid]);
    expect(waiting.aid).toMatch(/^[A-Za-z0-9_.-]+-[0-9a-f]{6}$/);
    const app = waiting.processes.filter((p: Json) => p.pid !== record(waiting.aid).initPid);
    expect(app.length).toBeGreaterThan(0);
    for (const p of app) expect(readFileSync(`/proc/${p.pid}/status`, 'utf8')).toMatch(new RegExp(`^TracerPid:\\s+${status().pid}$`, 'm'));
    const [taken] = cloneJson();
    expect(taken).toMatchObject({ aid: waiting.aid, instance: 1, prepared: true });
    await isTemplateInstance(made);
    await isTemplateInstance(taken);
    // The same registration and listing as the one made on demand.
    expect(shape(record(taken.aid))).toEqual(shape(record(made.aid)));
    const listed = ps();
    const [a, b] = [made.aid, taken.aid].map((aid) => listed.find((x) => x.aid === aid));
    expect(b.state).toBe('running');
    expect(psShape(b)).toEqual(psShape(a));
    // Its own identity: a multiplexed port shared, an allocated one its own.
    expect(ownPort(taken)).not.toBe(ownPort(made));
    // Refilled, with another instance.
    await waitFor(() => held() === 1, 30_000, 'the pool refilled');
    expect(psAll().find((x) => x.state === 'restoring').aid).not.toBe(taken.aid);
    // The held one does not listen on the multiplexed port yet: each
    // connection there is answered, by one of the two that run (one held
    // listening would get about a third of them, and leave them waiting).
    const homes = new Set<string>();
    for (let i = 0; i < 24; i++) {
      const line = (await tcpExchange(world.portMux, 'INFO\n', 3000)).trim();
      homes.add(/home=(\S+)/.exec(line)![1]);
    }
    expect([...homes].sort()).toEqual([made.aid, taken.aid].map((aid) => join(world.root, 'home', aid)).sort());
    // Writes stay its own.
    expect(await ask(ownPort(taken), 'SET mine')).toBe('OK');
    expect(await info(ownPort(taken))).toMatchObject({ state: 'mine', mapped: 'mine' });
    expect(await info(ownPort(made))).toMatchObject({ state: 'template', mapped: 'template' });
  }, 240_000);

  it('refills to the largest recent batch, whose instances it serves in order; --no-prepared and APPSHOT_CLONE_POOL=0 make them now', async () => {
    // An engine, and one held, whatever the test before left.
    expect(inProcess(['engine', 'start']).code).toBe(0);
    cloneJson();
    await waitFor(() => held() === 1, 60_000, 'one instance held');
    const first = cloneJson(['-n', '3']);
    expect(first.map((c) => !!c.prepared)).toEqual([true, false, false]);
    await waitFor(() => held() === 3, 60_000, 'three instances held');
    const batch = cloneJson(['-n', '3']);
    expect(batch.map((c) => [c.instance, c.prepared])).toEqual([
      [1, true],
      [2, true],
      [3, true],
    ]);
    for (const c of batch) await isTemplateInstance(c);
    // The batch committed as one: each init saw it committed.
    for (const c of batch) await waitFor(() => existsSync(join(sb.home, 'apps', c.aid, 'committed')), 10_000, `${c.aid} committed`);
    await waitFor(() => held() === 3, 60_000, 'three held again');
    // One held instance killed while it waits: the batch makes that one
    // now, and nothing of the dead one is left.
    const victim = psAll().find((a) => a.state === 'restoring' && a.processes.length > 1);
    const victimPids = victim.processes.filter((p: Json) => p.pid !== record(victim.aid).initPid).map((p: Json) => p.pid as number);
    for (const pid of victimPids) process.kill(pid, 'SIGKILL');
    const mended = cloneJson(['-n', '3']);
    expect(mended.filter((c) => c.prepared).length).toBe(2);
    expect(mended.map((c) => c.aid)).not.toContain(victim.aid);
    for (const c of mended) await isTemplateInstance(c);
    await waitFor(() => !psAll().some((a) => a.aid === victim.aid), 10_000, 'the killed held instance to be released');
    await waitFor(() => held() === 3, 60_000, 'three held again');
    expect(cloneJson(['--no-prepared'])[0].prepared).toBeUndefined();
    expect(cloneJson([], { APPSHOT_CLONE_POOL: '0' })[0].prepared).toBeUndefined();
    // An AID asked for is never a held one's.
    const named = cloneJson(['--aid', 'named']);
    expect(named[0]).toMatchObject({ aid: 'named' });
    expect(named[0].prepared).toBeUndefined();
    await isTemplateInstance(named[0]);
  }, 240_000);

  it('holds clones for the context that asked for them: another APPSHOT_PORTS gets its own ports, made now, then held for it', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    cloneJson();
    await waitFor(() => held() >= 1, 60_000, 'an instance held');
    const heldAids = psAll().filter((a) => a.state === 'restoring').map((a) => a.aid);
    // Ten ports of this file's range (27000-27099) that its fixed ones are not.
    const from = base - 27000 >= 10 ? 27000 : 27090;
    const inRange = (port: number) => port >= from && port <= from + 9;
    const env = { APPSHOT_PORTS: `${from}-${from + 9}` };
    const [own] = cloneJson([], env);
    expect(own.prepared).toBeUndefined();
    expect(heldAids).not.toContain(own.aid);
    expect(inRange(ownPort(own))).toBe(true);
    await isTemplateInstance(own);
    // Refilled in its context: what is held now has ports of its range,
    // and is what its next clone takes.
    await waitFor(() => held() >= 1 && psAll().some((a) => a.state === 'restoring' && !heldAids.includes(a.aid)), 60_000, 'the pool refilled');
    const [next] = cloneJson([], env);
    expect(next.prepared).toBe(true);
    expect(inRange(ownPort(next))).toBe(true);
    await isTemplateInstance(next);
  }, 240_000);

  it('gives the pool up once its template is removed', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    cloneJson(['-n', '3']);
    await waitFor(() => held() === 3, 60_000, 'three held');
    const pids = heldProcesses();
    expect(pids.length).toBeGreaterThanOrEqual(6);
    const aside = `${tpl}.aside`;
    renameSync(tpl, aside);
    await waitFor(() => gone(pids), 20_000, 'the held instances to go with their template');
    await waitFor(() => psAll().every((a) => a.state !== 'restoring'), 10_000, 'their registrations to go');
    expect(status().clonePool[tpl]).toBeUndefined();
    renameSync(aside, tpl);
  }, 240_000);

  it('leaves nothing held behind when the engine stops', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    cloneJson(['-n', '2']);
    await waitFor(() => held() === 2, 60_000, 'two held');
    const pids = heldProcesses();
    expect(pids.length).toBeGreaterThanOrEqual(4);
    const engine = status().pid as number;
    expect(inProcess(['engine', 'stop']).code).toBe(0);
    await waitFor(() => !alive(engine), 20_000, 'the engine to leave');
    expect(gone(pids)).toBe(true);
    expect(psAll().filter((a) => a.state === 'restoring')).toEqual([]);
  }, 240_000);

  it('leaves nothing held behind when the engine is killed with SIGKILL', async () => {
    expect(inProcess(['engine', 'start']).code).toBe(0);
    cloneJson(['-n', '2']);
    await waitFor(() => held() === 2, 60_000, 'two held');
    const pids = heldProcesses();
    expect(pids.length).toBeGreaterThanOrEqual(4);
    const aids = psAll().filter((a) => a.state === 'restoring').map((a) => a.aid);
    const running = ps().filter((a) => a.state === 'running').map((a) => a.aid);
    // What each held instance has besides its processes.
    const records = aids.map(record);
    const roots = records.map((r) => r.privateRoot as string).filter(Boolean);
    const commits = records.map((r) => r.restore.commitPath as string);
    expect(roots.length).toBe(aids.length);
    expect(commits.every((c) => typeof c === 'string')).toBe(true);
    const claimed = () => readdirSync(join(sb.home, 'ports')).filter((p) => aids.includes(readFileSync(join(sb.home, 'ports', p), 'utf8').split(' ')[0]));
    expect(claimed().length).toBeGreaterThan(0);
    process.kill(status().pid, 'SIGKILL');
    await waitFor(() => gone(pids), 20_000, 'the held instances to go with the engine');
    // Their registrations are taken back; the clones it made run on.
    await waitFor(() => !psAll().some((a) => aids.includes(a.aid)), 10_000, 'their registrations to go');
    expect(ps().filter((a) => a.state === 'running').map((a) => a.aid)).toEqual(running);
    // Nor their private roots, port claims and commit files.
    expect(roots.filter((r) => existsSync(r))).toEqual([]);
    expect(claimed()).toEqual([]);
    expect(readdirSync(join(sb.home, 'commits')).filter((f) => commits.some((c) => c.endsWith(f.replace(/\.pending$/, ''))))).toEqual([]);
  }, 240_000);

  it("keeps what a client's APPSHOT_CLONE_POOL asked for, whatever the engine's own environment says", async () => {
    // An engine started with the pool off in its own environment (as a
    // suite that turns pools off for its other files would start it),
    // serving clients that did not turn it off. Between commands the
    // engine's environment is its own again: the pool's once-a-second
    // check must not read its size from that (it did: it then gave up
    // what it held, and the next clone made its instance on demand).
    const engine = status();
    if (engine.running) {
      expect(inProcess(['engine', 'stop']).code).toBe(0);
      await waitFor(() => !alive(engine.pid), 20_000, 'the engine to leave');
    }
    expect(inProcess(['engine', 'start'], { APPSHOT_CLONE_POOL: '0' }).code).toBe(0);
    const [made] = cloneJson();
    expect(made.prepared).toBeUndefined();
    await waitFor(() => held() === 1, 60_000, 'an instance held');
    // The check runs each second: a few of them, with the engine idle.
    await new Promise((r) => setTimeout(r, 3000));
    expect(held()).toBe(1);
    const [taken] = cloneJson();
    expect(taken.prepared).toBe(true);
    await isTemplateInstance(taken);
    // The engine's own setting still holds for a client of its own context.
    expect(cloneJson([], { APPSHOT_CLONE_POOL: '0' })[0].prepared).toBeUndefined();
    expect(inProcess(['engine', 'stop']).code).toBe(0);
  }, 240_000);

  it("holds no more clones than the engine has descriptors for, and gives held ones up rather than fail a clone", async () => {
    // A command under a lower RLIMIT_NOFILE (soft and hard: Node raises
    // its soft limit to the hard one, the engine's and the client's alike,
    // and a client whose limits differ from the engine's runs its command
    // itself). Without the descriptors numbered 80 and above the test
    // runner may have been given (a program holding one above its limit
    // cannot be restored: its number cannot be placed).
    await noEngine();
    lowTemplate();
    const pool = lowPool;
    expect(limited(200, ['engine', 'start']).code).toBe(0);
    const pid = status().pid as number;
    try {
      const fds = () => readdirSync(`/proc/${pid}/fd`).length;
      const first = limited(200, ['clone', low, '-n', '32', '--json']);
      expect(first.stderr).toBe('');
      expect(first.code).toBe(0);
      expect(JSON.parse(first.stdout).length).toBe(32);
      // Asked for 32, it holds what half of the engine's free descriptors
      // allow, and says so by its target.
      await waitFor(() => pool().held === pool().target && pool().target > 0 && pool().target < 32, 60_000, 'the pool to fill to what the engine has room for');
      const before = pool().held;
      expect(fds()).toBeLessThan(200 - 32);
      // The engine's limit lowered to a few more than it has open (and the
      // client's to match): a clone made on demand now needs the held
      // clones' room (what the engine keeps free for the commands it
      // serves), and gets it.
      const lowered = Math.max(80, fds() + 4);
      expect(spawnSync('prlimit', ['--pid', String(pid), `--nofile=${lowered}:${lowered}`]).status).toBe(0);
      const made = limited(lowered, ['clone', low, '--no-prepared', '--json']);
      expect(made.stderr).toBe('');
      expect(made.code).toBe(0);
      const [c] = JSON.parse(made.stdout);
      expect(ps().find((a: Json) => a.aid === c.aid)?.state).toBe('running');
      expect(pool().held).toBeLessThan(before);
      expect(engineLog()).toMatch(/held instance\(s\) given up to make room for a clone/);
    } finally {
      // Not left to the next test with the limit it was given here.
      expect(inProcess(['engine', 'stop']).code).toBe(0);
      await waitFor(() => !alive(pid), 20_000, 'the engine to leave');
    }
  }, 240_000);

  it('keeps what it holds when it finds no room to refill, whatever numbers a clone left it (a batch takes 1..k)', async () => {
    await noEngine();
    lowTemplate();
    expect(limited(200, ['engine', 'start']).code).toBe(0);
    const pid = status().pid as number;
    try {
      const fds = () => readdirSync(`/proc/${pid}/fd`).length;
      const clone = (nofile: number, n: number) => {
        const r = limited(nofile, ['clone', low, '-n', String(n), '--json']);
        expect(r.stderr).toBe('');
        expect(r.code).toBe(0);
        return JSON.parse(r.stdout) as Json[];
      };
      // Enough held that the engine has over 80 descriptors open (the
      // template's hard limit: the engine's is not lowered below it).
      clone(200, 12);
      await waitFor(() => lowPool().held === lowPool().target && lowPool().target >= 10, 60_000, 'the pool filled');
      const before = lowPool().held;
      // The engine's limit lowered to a little more than it has open: a
      // batch of 2 takes instances 1 and 2 (the client's limit matched),
      // and no room is found to make 1 and 2 again. 3 and above are held
      // still, and kept: what it holds is what it keeps.
      const lowered = fds() + 12;
      expect(lowered).toBeGreaterThanOrEqual(80);
      expect(spawnSync('prlimit', ['--pid', String(pid), `--nofile=${lowered}:${lowered}`]).status).toBe(0);
      expect(clone(lowered, 2).map((c) => [c.instance, c.prepared])).toEqual([
        [1, true],
        [2, true],
      ]);
      await waitFor(() => /room for \d+ held instance\(s\) only/.test(engineLog()), 30_000, 'the refill to find no room');
      // The pool is resized each second by its target: a few of them.
      await new Promise((r) => setTimeout(r, 3000));
      expect(lowPool().held).toBeGreaterThanOrEqual(before - 2);
      expect(engineLog()).toMatch(new RegExp(`room for ${lowPool().held} held instance\\(s\\) only`));
    } finally {
      expect(inProcess(['engine', 'stop']).code).toBe(0);
      await waitFor(() => !alive(pid), 20_000, 'the engine to leave');
    }
  }, 240_000);

  it("holds no more clones than the engine's pids cgroup has room for (pids.max)", async (ctx) => {
    // A pids cgroup of its own (v1's controller, or v2's where it is on).
    const v1 = '/sys/fs/cgroup/pids';
    const v2 = '/sys/fs/cgroup';
    const root = existsSync(`${v1}/cgroup.procs`) ? v1 : existsSync(`${v2}/cgroup.controllers`) && /\bpids\b/.test(readFileSync(`${v2}/cgroup.subtree_control`, 'utf8')) ? v2 : undefined;
    const group = root && join(root, `appshot-pool-${process.pid}`);
    try {
      if (group) mkdirSync(group);
    } catch {
      /* not ours to make */
    }
    if (!group || !existsSync(`${group}/pids.max`)) return ctx.skip();
    await noEngine();
    lowTemplate();
    expect(inProcess(['engine', 'start']).code).toBe(0);
    const pid = status().pid as number;
    try {
      writeFileSync(`${group}/cgroup.procs`, String(pid));
      const current = () => Number(readFileSync(`${group}/pids.current`, 'utf8'));
      const clone = () => {
        // In the engine's cgroup: one in another runs its command itself.
        const r = spawnSync('sh', ['-c', `echo $$ > ${group}/cgroup.procs && exec "$0" "$@"`, process.execPath, cli, 'clone', low, '-n', '8', '--json'], { env: { ...sb.env, ...poolEnv }, encoding: 'utf8', timeout: 50_000 });
        expect(r.stderr).toBe('');
        expect(r.status).toBe(0);
      };
      // Unlimited, 8 held; then 26 tasks more than it has (the client's
      // threads and the engine's to come among them): the 8 taken go on
      // running, and a
      // pool that keeps to half of what is free holds a few instances (an
      // init and a sleep each), not 8, without the kernel having refused
      // it a single process (pids.events: the forks pids.max failed).
      clone();
      await waitFor(() => lowPool().held === 8, 60_000, 'eight held');
      const refused = () => Number(/^max (\d+)/m.exec(readFileSync(`${group}/pids.events`, 'utf8'))?.[1] ?? 0);
      writeFileSync(`${group}/pids.max`, String(current() + 26));
      clone();
      await waitFor(() => lowPool().held === lowPool().target && lowPool().target > 0 && lowPool().target < 8, 60_000, 'the pool to fill to what the cgroup has room for');
      expect(engineLog()).toMatch(/room for \d+ held instance\(s\) only .*the cgroup's/);
      expect(refused()).toBe(0);
    } finally {
      expect(inProcess(['engine', 'stop']).code).toBe(0);
      await waitFor(() => !alive(pid), 20_000, 'the engine to leave');
      // What runs in it (the clones made) back where the test runs.
      const home = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => (root === v1 ? /^\d+:[^:]*\bpids\b[^:]*:/ : /^0::/).test(l))!.replace(/^[^:]*:[^:]*:/, '');
      for (const p of readFileSync(`${group}/cgroup.procs`, 'utf8').split('\n').filter(Boolean)) {
        try {
          writeFileSync(join(root!, home, 'cgroup.procs'), p);
        } catch {
          /* gone */
        }
      }
      await waitFor(() => readFileSync(`${group}/cgroup.procs`, 'utf8').trim() === '', 10_000, 'the cgroup to empty');
      rmdirSync(group);
    }
  }, 240_000);

  it('counts as short of room what held instances take room from, not any EAGAIN', () => {
    // A real EAGAIN of non-blocking I/O (an empty FIFO read): nothing
    // held frees anything for it.
    const fifo = join(dir, 'fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    const fd = openSync(fifo, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    let again: unknown;
    try {
      readSync(fd, Buffer.alloc(1));
    } catch (e) {
      again = e;
    } finally {
      closeSync(fd);
    }
    expect((again as NodeJS.ErrnoException).code).toBe('EAGAIN');
    expect(isShortOfRoom(again)).toBe(false);
    // As a restore reports what its injected calls got: a fork or a
    // thread the user's (or cgroup's) processes had no room for is; a
    // descriptor the restored process had no room for (its own limit) is
    // not, nor an EAGAIN of another call.
    const wrapped = (e: Error) => new AppshotError(`cannot clone t as 'a': ${e.message}; nothing was left behind`);
    expect(isShortOfRoom(wrapped(new SyscallError('fork', constants.errno.EAGAIN)))).toBe(true);
    expect(isShortOfRoom(wrapped(new SyscallError('creating a thread', constants.errno.EAGAIN)))).toBe(true);
    expect(isShortOfRoom(wrapped(new SyscallError('dup2', constants.errno.EMFILE)))).toBe(false);
    expect(isShortOfRoom(wrapped(new SyscallError('flock', constants.errno.EAGAIN)))).toBe(false);
    expect(isShortOfRoom(wrapped(new Error('sock_diag: Resource temporarily unavailable')))).toBe(false);
    expect(isShortOfRoom(wrapped(new Error('starting /x/appshot-init: Resource temporarily unavailable')))).toBe(true);
    // The engine's own descriptors, and the system's.
    expect(isShortOfRoom(wrapped(new Error("EMFILE: too many open files, open '/x'")))).toBe(true);
    // As the restore words a Node error of its own (errors.ts errorText).
    const emfile = Object.assign(new Error("EMFILE: too many open files, open '/x'"), { code: 'EMFILE', errno: -constants.errno.EMFILE, syscall: 'open', path: '/x' });
    expect(errorText(emfile)).toBe('open /x: too many open files (EMFILE)');
    expect(isShortOfRoom(new AppshotError(`cannot clone t as 'a': ${errorText(emfile)}; nothing was left behind`))).toBe(true);
    expect(isShortOfRoom(wrapped(new SyscallError('socket', constants.errno.ENFILE)))).toBe(true);
  });

  it('sweeps a commit link whose file is gone (a batch of held clones commits through links)', () => {
    const link = join(sb.home, 'commits', `${2 ** 22 + 1}.0.-.0123456789ab`);
    mkdirSync(join(sb.home, 'commits'), { recursive: true });
    symlinkSync('gone', link);
    const old = new Date(Date.now() - 5 * 60_000);
    lutimesSync(link, old, old);
    // A command of its own (not the engine's, which may have swept just now).
    const made = inProcess(['clone', tpl, '--json']);
    expect(made.code).toBe(0);
    expect(() => lstatSync(link)).toThrow(/ENOENT/);
  }, 120_000);
});
