/**
 * `appshot serve`'s prepared resume (server.ts, Prepared): while a
 * restore-mode service is suspended, its next instance is restored ahead
 * of time up to the point of resuming and held stopped; a connection only
 * lets it go on.
 *
 * With a real redis (Debian's redis-server) holding 2,000 keys:
 * - at serve's start the suspended service's next instance is prepared:
 *   its processes exist, every one stopped under serve's ptrace (state
 *   't'), and `appshot ps` says it is restoring;
 * - the first connection through the front door is answered by those very
 *   processes, with every key of the image; a write is made;
 * - after its idle suspend the old processes are gone, a new instance is
 *   prepared, and the next connection finds the write;
 * - a prepared instance whose image changed on disk (a part's ctime moved)
 *   is not let go on: the image is read afresh and restored, and the
 *   connection is answered all the same;
 * - serve stopped with a prepared instance held leaves nothing behind: no
 *   process, no registration, no table in /dev/shm, the instance's port
 *   free to bind; `service rm` then removes the service.
 * - serve killed with SIGKILL with a prepared instance held: its processes
 *   die with their tracer, init removes the registration and tables;
 *   `service rm` then removes the suspend images and the snapshotted
 *   record (`ps -a`) that named them;
 * - two services of one image, whose application listens on the same
 *   port: only one can be held (the other's prepare finds the port
 *   bound); resuming the other gives up the held one and restores;
 * - `--prepared 0`: none is prepared, the suspended service has no
 *   process at all, and it resumes as before.
 * - the held instance has the pages its previous run wrote (those of its
 *   image with bytes other than the parent image's, up to 256) resident,
 *   copied in, and every other page of its lazily mapped memory still
 *   mapped from the page file; the suspend after a prepared resume
 *   stores such a page again only if the application changed it.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, realpathSync, rmSync, utimesSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, type Running, Sandbox, waitFor, redisCli as redis, redisImage } from './helpers.js';
import type { LoadedImage } from '../src/image/format.js';
import { cpuTimesRange } from '../src/resources/cputime.js';
import { lazyMappable, readMaps } from '../src/resources/memory.js';
import { loadImageChain } from '../src/restore/driver.js';
import { resolveProcess } from '../src/snapshot/parent.js';

const REDIS = '/usr/bin/redis-server';
const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-serve-prepared-'));
// Ports of their own, 17000-17999 (see Sandbox for the other files').
const base = 17000 + (process.pid % 330) * 3;
const APP = base;
const PUBLIC = base + 1;
const PUBLIC2 = base + 2;
const KEYS = 2000;

let serve: Running | undefined;

afterAll(async () => {
  if (serve && serve.child.exitCode === null) serve.child.kill('SIGKILL');
  await serve?.exited;
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

const value = (i: number) => `value-${i}-${'y'.repeat(i % 30)}`;


interface ServiceJson {
  state: string;
  lastImage: string;
  snapshots: number;
  instances: { aid: string; state: string; prepared?: boolean }[];
}
const show = (name = 'db') => sb.json<ServiceJson>(['service', 'show', name]);
/** Waits for the service's `n`th suspend. Not 'suspended' alone: serve
 * writes its state file up to 100 ms after a change (longer when loaded),
 * so right after a resume the file can still say 'suspended' (and
 * prepared) from before it. */
/** Waits for the service's `n`th suspend; what serve said, if it does
 * not come, in the error. */
const suspended = async (n: number, what: string) => {
  try {
    await waitFor(() => {
      const s = show();
      return s.state === 'suspended' && s.snapshots >= n;
    }, 15_000, what);
  } catch (e) {
    throw new Error(`${(e as Error).message}; the service: ${JSON.stringify(show())}; serve's log ends:\n${serve?.stderr.slice(-4000)}`);
  }
};
const prepared = (name = 'db') => show(name).instances[0]?.prepared === true;

/** The processes of application `aid` (init too), from its tables: what
 * `appshot ps` lists. */
function pids(aid: string): number[] {
  const apps = sb.json<{ aid: string; processes: { pid: number }[] }[]>(['ps']);
  return apps.find((a) => a.aid === aid)?.processes.map((p) => p.pid) ?? [];
}

/** The application processes (not init) of the registration `aid`: the
 * children of the init its app.json names. */
function appPids(aid: string): number[] {
  const init = JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).initPid as number;
  return spawnSync('ps', ['-o', 'pid=', '--ppid', String(init)], { encoding: 'utf8' })
    .stdout.split('\n')
    .filter((l) => l.trim())
    .map(Number);
}

/** The end of a test: serve stopped (SIGTERM, exit 0), the instance it
 * left running ended, its record removed (`rmChecked`: that must succeed;
 * not where a failed suspend may have left none), the service removed. */
async function endServeAndService({ rmChecked }: { rmChecked: boolean }): Promise<void> {
  serve!.child.kill('SIGTERM');
  expect((await serve!.exited).code, `serve's log ends:\n${serve!.stderr.slice(-3000)}`).toBe(0);
  sb.run(['stop', 'db', '--signal', 'KILL']);
  await waitFor(() => !sb.aids().includes('db'), 10_000, 'the instance to end');
  const rm = sb.run(['rm', 'db']);
  if (rmChecked) expect(rm.code).toBe(0);
  expect(sb.run(['service', 'rm', 'db']).code).toBe(0);
}

/** A process's state letter (/proc/PID/stat): 't' is a tracing stop. */
const stateOf = (pid: number) => {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
};

const events = () => serve!.logged<{ event: string; service?: string; image?: string; prepared?: boolean; why?: string; prefaulted?: number; code?: number; populated?: { pages: number; written: number; failed: number; error?: string } }>();

const PAGE = 4096;
/** What a prepared resume copies in ahead at most by default (prepared.ts). */
const PREFAULT_CAP = 256;

/** The chain of image `path` read as serve reads it (this process, the
 * sandbox's keys). */
async function chainOf(path: string): Promise<LoadedImage[]> {
  const home = process.env.APPSHOT_HOME;
  process.env.APPSHOT_HOME = sb.home;
  try {
    return await loadImageChain(path);
  } finally {
    if (home === undefined) delete process.env.APPSHOT_HOME;
    else process.env.APPSHOT_HOME = home;
  }
}

/** The 4 KiB page at `offset` of a chain link's page file. */
function pageOf(l: LoadedImage, offset: bigint): Buffer {
  const b = Buffer.alloc(PAGE);
  expect(readSync(l.pagesFd!, b, 0, PAGE, Number(offset))).toBe(PAGE);
  return b;
}

/** Each page stored in `chain`'s newest image in a mapping a lazy restore
 * maps from its page file (`all`: in any mapping), with its address and
 * whether its bytes differ from the parent's at that address or the
 * parent had none there (written in the run before that image), for
 * process `vpid`, in address order. */
function storedLazily(chain: LoadedImage[], vpid: number, all = false): { addr: bigint; written: boolean }[] {
  const before = resolveProcess(chain.map((l) => l.image), vpid, 1);
  const out: { addr: bigint; written: boolean }[] = [];
  for (const v of chain[0].image.processes.find((p) => p.vpid === vpid)!.vmas) {
    if (!v.pages?.runs.length || !(all || lazyMappable(v))) continue;
    let offset = v.pages.offset;
    for (let i = 0; i < v.pages.runs.length; i += 2)
      for (let pg = v.pages.runs[i]; pg < v.pages.runs[i] + v.pages.runs[i + 1]; pg++, offset += BigInt(PAGE)) {
        const addr = v.start + BigInt(pg * PAGE);
        const was = before.get(addr);
        out.push({ addr, written: !was || !pageOf(chain[0], offset).equals(pageOf(chain[was.file], was.offset)) });
      }
  }
  return out;
}

/** pagemap's bits: the page is present, and it is a file's (page cache)
 * rather than anonymous memory of the process. */
const PM_PRESENT = 1n << 63n;
const PM_FILE = 1n << 61n;
function pagemapOf(pid: number, addrs: bigint[]): bigint[] {
  const fd = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    const b = Buffer.alloc(8);
    return addrs.map((a) => {
      expect(readSync(fd, b, 0, 8, Number((a / BigInt(PAGE)) * 8n))).toBe(8);
      return b.readBigUInt64LE(0);
    });
  } finally {
    closeSync(fd);
  }
}

/** How many pages of `pid`'s executable file mappings (its code, the
 * libraries') are in its page tables. */
function codePagesPresent(pid: number): number {
  let n = 0;
  for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) r-xp \S+ \S+ [1-9]\d*\s+\//.exec(line);
    if (!m) continue;
    const start = BigInt(`0x${m[1]}`);
    const addrs = Array.from({ length: Number((BigInt(`0x${m[2]}`) - start) / BigInt(PAGE)) }, (_, k) => start + BigInt(k * PAGE));
    n += pagemapOf(pid, addrs).filter((e) => e & PM_PRESENT).length;
  }
  return n;
}

/** Whether `port` can be bound on 127.0.0.1 (nobody holds it). */
const bindable = (port: number) =>
  new Promise<boolean>((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });

/** Table files in /dev/shm of this sandbox's 'db' (registry.ts names
 * them appshot-TAG-AID-RANDOM, TAG from the state directory's path). */
const ourTables = () => {
  const tag = createHash('sha256').update(realpathSync(sb.home)).digest('hex').slice(0, 8);
  return readdirSync('/dev/shm').filter((f) => f.startsWith(`appshot-${tag}-db-`));
};

// A serve's start (it prepares its held instance before it says `ready`)
// took over 20 s once on a machine loaded by other test files: limits for
// a hang, not durations.
const READY_MS = 60_000;

describe('appshot serve: a suspended service\'s next instance prepared, held stopped', { timeout: 120_000 }, () => {
  it('resumes the held instance with its data, prepares again after each suspend, and leaves nothing when stopped', async () => {
    expect(existsSync(REDIS), `${REDIS} is missing: apt-get install redis-server`).toBe(true);
    const image = join(out, 'redis.img');
    await redisImage(sb, APP, KEYS, value, image);
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);

    // (With the code of its previous run mapped in ahead: APPSHOT_PREPARED_CODE.)
    // (And the pages its previous run touched of its page file, code and
    // data: APPSHOT_PREPARED_POPULATE, off by default.)
    serve = sb.start(['serve'], { APPSHOT_PREPARED_CODE: '1', APPSHOT_PREPARED_POPULATE: '1' });
    await serve.line(/^ready$/, READY_MS);
    // Prepared at start: its processes exist, every one held in a tracing
    // stop, so nothing of redis runs.
    // `show` says prepared from the prepare's start; the processes are all
    // held only once the prepare is logged (a step of the restore may still
    // be running before), so wait for that line first.
    await waitFor(() => prepared(), 15_000, 'the next instance to be prepared');
    await waitFor(() => events().some((e) => e.event === 'prepared'), 15_000, 'the prepare to be logged');
    expect(events().find((e) => e.event === 'prepared')?.code).toBe(0);
    const held = appPids('db');
    expect(held.length).toBeGreaterThan(0);
    for (const pid of held) expect(stateOf(pid)).toBe('t');
    // No run of it seen yet: none of its code mapped in ahead (but what
    // the restore itself maps: a few pages).
    const codeBefore = codePagesPresent(held[0]);
    expect(show().state).toBe('suspended');
    // `ps` says what it is: a restore not committed.
    const psState = () => sb.json<{ aid: string; state: string }[]>(['ps']).find((a) => a.aid === 'db')?.state;
    expect(psState()).toBe('restoring');

    // The first connection lets those very processes go on: every key.
    const got = redis(PUBLIC, ['SET before kept!', 'DBSIZE', ...Array.from({ length: KEYS }, (_, i) => `GET key:${i}`)]);
    expect(got.slice(0, 2)).toEqual(['OK', String(KEYS + 1)]);
    expect(got.slice(2).every((v, i) => v === value(i))).toBe(true);
    expect(appPids('db')).toEqual(held);
    for (const pid of held) expect(stateOf(pid)).not.toBe('t');
    expect(psState()).toBe('running');
    await waitFor(() => events().some((e) => e.event === 'restore' && e.service === 'db'), 5000, 'the restore to be logged');
    expect(events().find((e) => e.event === 'restore')).toMatchObject({ prepared: true });

    // Suspended after 1 s idle: those processes gone, a new instance
    // prepared from the suspend's image, which the next connection resumes.
    await suspended(1, 'the service to be suspended');
    await waitFor(() => held.every((p) => !alive(p)), 5000, 'the old processes to end');
    await waitFor(() => prepared(), 15_000, 'the next instance to be prepared again');
    const held2 = appPids('db');
    expect(held2.some((p) => held.includes(p))).toBe(false);
    // Its previous run's touched pages mapped in (it read every key),
    // some of them copied in (it wrote), before it was let go: logged
    // once done, whatever failed said.
    const second = show().lastImage;
    const preparedFrom2 = () => events().find((e) => e.event === 'prepared' && e.image === second);
    await waitFor(() => preparedFrom2(), 15_000, 'the second prepare to be logged');
    const populated = preparedFrom2()!.populated!;
    expect(populated, JSON.stringify(populated)).toMatchObject({ failed: 0 });
    expect(populated.pages).toBeGreaterThan(0);
    expect(populated.written).toBeGreaterThan(0);
    // Resumed, the very pages written back hold what they held: every key.
    const got2 = redis(PUBLIC, ['GET before', 'DBSIZE', ...Array.from({ length: KEYS }, (_, i) => `GET key:${i}`)]);
    expect(got2.slice(0, 2)).toEqual(['kept!', String(KEYS + 1)]);
    expect(got2.slice(2).every((v, i) => v === value(i))).toBe(true);
    expect(appPids('db')).toEqual(held2);
    await waitFor(() => events().filter((e) => e.event === 'restore').length === 2, 5000, 'the second restore to be logged');
    expect(events().filter((e) => e.event === 'restore').at(-1)).toMatchObject({ prepared: true });

    // Suspended again and prepared; then its image changes on disk (a
    // part's times moved: its ctime with them). Not let go on: the image
    // is read afresh and restored.
    await suspended(2, 'the second suspend');
    await waitFor(() => prepared(), 15_000, 'the third prepare');
    await waitFor(() => events().filter((e) => e.event === 'prepared').length >= 3, 15_000, 'the third prepare to be logged');
    const held3 = appPids('db');
    {
      // Held from an image with a parent: the pages its previous run
      // wrote are copied in (resident, anonymous), the rest still mapped
      // from the page file, untouched.
      const chain = await chainOf(show().lastImage);
      try {
        expect(chain.length).toBeGreaterThan(1);
        expect(chain[0].image.processes).toHaveLength(1);
        expect(held3).toHaveLength(1);
        const stored = storedLazily(chain, chain[0].image.processes[0].vpid);
        const hot = stored.filter((p) => p.written).slice(0, PREFAULT_CAP).map((p) => p.addr);
        const cold = stored.filter((p) => !hot.includes(p.addr)).map((p) => p.addr);
        expect(hot.length).toBeGreaterThan(0);
        expect(cold.length).toBeGreaterThan(hot.length);
        for (const [i, e] of pagemapOf(held3[0], hot).entries()) expect({ page: hot[i], present: !!(e & PM_PRESENT), file: !!(e & PM_FILE) }).toEqual({ page: hot[i], present: true, file: false });
        const maps = readMaps(held3[0]);
        const fromPageFile = (a: bigint) => /\/pages\.img$/.test(maps.find((l) => l.start <= a && a < l.end)?.path ?? '');
        expect(hot.filter(fromPageFile)).toEqual([]);
        expect(cold.filter((a) => !fromPageFile(a))).toEqual([]);
        // (but the page of the library's CPU-time offsets, which the
        // restore writes: never the application's own)
        const offsets = cpuTimesRange(held3[0], maps)!;
        expect(offsets).toBeDefined();
        const untouched = cold.filter((a) => a + 4096n <= offsets.start || a >= offsets.end);
        expect(untouched.length).toBeGreaterThan(cold.length - 3);
        // Copied in besides: at most the pages the run before wrote
        // (present and copied at its suspend, with the same bytes or not:
        // restore/prepared.ts populateHeldMappings, at most 256), not the
        // rest of its memory.
        const copied = pagemapOf(held3[0], untouched).filter((e) => e & PM_PRESENT && !(e & PM_FILE)).length;
        expect(copied).toBeLessThanOrEqual(256);
        expect(copied).toBeLessThan(untouched.length / 2);
        // What the runs before touched of it (the first read every key)
        // is mapped in while it is held, as the file's pages, read-only
        // (restore/prepared.ts populateHeldMappings): no fault for those
        // once let go.
        await waitFor(() => pagemapOf(held3[0], untouched).filter((e) => e & PM_PRESENT && e & PM_FILE).length > untouched.length / 2, 10_000, 'the touched pages of the page file to be mapped in');
        expect(stateOf(held3[0])).toBe('t');
        // (its log says how many)
        expect(events().filter((e) => e.event === 'prepared').at(-1)!.prefaulted).toBe(hot.length);
        // The code its previous run executed is in its page tables before
        // it runs (serve read it from that run at the suspend), held all
        // the while: no fault for those pages once let go.
        const code = events().filter((e) => e.event === 'prepared').at(-1)!.code!;
        expect(code).toBeGreaterThan(0);
        expect(code).toBeGreaterThan(codeBefore);
        expect(codePagesPresent(held3[0])).toBeGreaterThanOrEqual(code);
        expect(stateOf(held3[0])).toBe('t');
        // The suspend after the second (prepared) resume compared what
        // that prepare copied in with its image: such a page is stored
        // again only with other bytes (written since), as an eager
        // restore's memory; one mapped from the page file is stored whole.
        const prev = chain.slice(1);
        const copiedBefore = storedLazily(prev, prev[0].image.processes[0].vpid).filter((p) => p.written).slice(0, PREFAULT_CAP);
        expect(copiedBefore.length).toBeGreaterThan(0);
        const now = new Map(storedLazily(chain, chain[0].image.processes[0].vpid, true).map((p) => [p.addr, p.written]));
        const storedSame = copiedBefore.filter((p) => now.get(p.addr) === false).map((p) => p.addr);
        expect(storedSame).toEqual([]);
      } finally {
        for (const l of chain) l.dispose();
      }
    }
    utimesSync(join(show().lastImage, 'image.pb'), new Date(), new Date());
    expect(redis(PUBLIC, ['GET before', 'DBSIZE'])).toEqual(['kept!', String(KEYS + 1)]);
    await waitFor(() => events().filter((e) => e.event === 'restore').length === 3, 5000, 'the third restore to be logged');
    expect(events().filter((e) => e.event === 'restore').at(-1)).toMatchObject({ prepared: false });
    expect(held3.filter(alive)).toEqual([]);

    // Suspended and prepared once more, then serve stops: nothing of the
    // held instance is left.
    await suspended(3, 'the third suspend');
    await waitFor(() => prepared(), 15_000, 'the fourth prepare');
    const held4 = pids('db');
    expect(held4.length).toBeGreaterThan(0);
    expect(ourTables()).toHaveLength(1);
    serve.child.kill('SIGTERM');
    expect((await serve!.exited).code, `serve's log ends:\n${serve!.stderr.slice(-3000)}`).toBe(0);
    expect(held4.filter(alive)).toEqual([]);
    expect(sb.allAids()).not.toContain('db');
    expect(ourTables()).toEqual([]);
    expect(await bindable(APP)).toBe(true);
    expect(show().instances[0]?.prepared).toBeUndefined();
    const rm = sb.run(['service', 'rm', 'db']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(rm.stdout).toBe('db\n');
    expect(sb.json<unknown[]>(['service', 'ls'])).toEqual([]);
  });

  it('a serve killed with SIGKILL while it holds a prepared instance leaves nothing behind', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    serve = sb.start(['serve']);
    await serve.line(/^ready$/, READY_MS);
    await waitFor(() => prepared(), 15_000, 'the next instance to be prepared');
    const held = pids('db');
    expect(held.length).toBeGreaterThan(0);
    serve.child.kill('SIGKILL');
    await serve.exited;
    // Its processes die with their tracer; init sees its lifeline end,
    // kills what is left, removes the tables and ends, leaving the
    // registration of a restore that never committed for the next appshot
    // command to release (appshot-init's header): `ps` does, and it does
    // not list it.
    await waitFor(() => held.every((p) => !alive(p)), 10_000, 'the held processes and init to die with serve');
    await waitFor(() => ourTables().length === 0, 10_000, 'init to remove the tables');
    expect(sb.json<{ aid: string }[]>(['ps', '-a']).map((a) => a.aid)).not.toContain('db');
    expect(sb.allAids()).not.toContain('db');
    expect(await bindable(APP)).toBe(true);
    // The next serve resumes the service from the same image.
    serve = sb.start(['serve']);
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['DBSIZE'])).toEqual([String(KEYS)]);
    // (the instance it resumed keeps running across serves: ended here)
    await endServeAndService({ rmChecked: true });
  });

  it("service rm after a serve killed while holding a prepared instance takes the snapshotted record of the images it removes", async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    serve = sb.start(['serve']);
    await serve.line(/^ready$/, READY_MS);
    // One resume and one idle suspend: the service's state is in its own
    // suspend image, which the snapshot's record (ps -a) names; the
    // instance prepared from it has taken that record over.
    expect(redis(PUBLIC, ['DBSIZE'])).toEqual([String(KEYS)]);
    await suspended(1, 'the service to be suspended');
    await waitFor(() => prepared(), 15_000, 'the next instance to be prepared');
    const suspendImage = show().lastImage;
    expect(suspendImage.startsWith(join(sb.home, 'services', 'db') + '/')).toBe(true);
    // Without APPSHOT_PREPARED_POPULATE (the default), the held instance
    // has nothing copied in but the pages its previous run wrote
    // (prepared.ts prefaultPages): the rest of its memory is the page
    // file's, untouched.
    const preparedFrom = () => events().find((e) => e.event === 'prepared' && e.image === suspendImage);
    await waitFor(() => preparedFrom(), 15_000, 'the prepare from the suspend image to be logged');
    expect(preparedFrom()!.populated).toBeUndefined();
    {
      const [app] = appPids('db');
      const chain = await chainOf(suspendImage);
      try {
        expect(chain.length).toBeGreaterThan(1);
        const stored = storedLazily(chain, chain[0].image.processes[0].vpid);
        const hot = stored.filter((p) => p.written).slice(0, PREFAULT_CAP).map((p) => p.addr);
        const offsets = cpuTimesRange(app, readMaps(app))!;
        expect(offsets).toBeDefined();
        const untouched = stored.map((p) => p.addr).filter((a) => !hot.includes(a) && (a + 4096n <= offsets.start || a >= offsets.end));
        expect(untouched.length).toBeGreaterThan(hot.length);
        expect(pagemapOf(app, untouched).filter((e) => e & PM_PRESENT && !(e & PM_FILE))).toEqual([]);
        expect(stateOf(app)).toBe('t');
      } finally {
        for (const l of chain) l.dispose();
      }
    }
    const held = pids('db');
    serve.child.kill('SIGKILL');
    await serve.exited;
    // No appshot command in between (one would release the held
    // instance's registration first): service rm's own stopping of the
    // instance does, giving the record back just before the images go.
    await waitFor(() => held.every((p) => !alive(p)), 10_000, 'the held processes and init to die with serve');
    const rm = sb.run(['service', 'rm', 'db']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(existsSync(suspendImage)).toBe(false);
    expect(sb.json<{ aid: string }[]>(['ps', '-a']).map((a) => a.aid)).not.toContain('db');
    expect(existsSync(join(sb.home, 'snapshotted', 'db.json'))).toBe(false);
    // Its log, which waited for the resume, went with the record.
    expect(existsSync(join(sb.home, 'logs', 'db'))).toBe(false);
  });

  it('two services of one image on one port inside: resuming the one not held gives up the held one', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    expect(sb.run(['service', 'add', 'db2', '--from', image, '--port', `127.0.0.1:${PUBLIC2}:${APP}`, '--idle', '1s']).code).toBe(0);
    serve = sb.start(['serve']);
    await serve.line(/^ready$/, READY_MS);
    // One is held; the other's prepare found the port bound.
    await waitFor(() => prepared('db') || prepared('db2'), 15_000, 'one of them to be prepared');
    await waitFor(() => events().some((e) => e.event === 'prepare-failed'), 15_000, "the other's prepare to fail");
    const [held, other] = prepared('db') ? ['db', 'db2'] : ['db2', 'db'];
    const otherPublic = other === 'db' ? PUBLIC : PUBLIC2;
    expect(redis(otherPublic, ['DBSIZE'])).toEqual([String(KEYS)]);
    // (stderr reaches this process a moment after the decisions are made)
    await waitFor(() => events().some((e) => e.event === 'retry' && e.service === other), 5000, 'the retry to be logged');
    await waitFor(() => events().some((e) => e.event === 'unprepared' && e.service === held), 5000, 'the held one given up to be logged');
    // (its state is written a moment after: serve's changed())
    await waitFor(() => !prepared(held), 5000, 'the held one to be shown given up');
    serve.child.kill('SIGTERM');
    expect((await serve!.exited).code, `serve's log ends:\n${serve!.stderr.slice(-3000)}`).toBe(0);
    // The one resumed keeps running across serves: ended here.
    sb.run(['stop', other, '--signal', 'KILL']);
    await waitFor(() => !sb.aids().includes(other), 10_000, 'the instance to end');
    expect(sb.run(['rm', other]).code).toBe(0);
    expect(sb.allAids()).toEqual([]);
    for (const name of ['db', 'db2']) expect(sb.run(['service', 'rm', name]).code).toBe(0);
  });

  it('a resume that fails after its commit serves the instance it made (it runs), and says so', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    // Every restore of this serve fails at the step after its commit.
    serve = sb.start(['serve'], { APPSHOT_TEST_FAIL_AT: 'restore: committed' });
    await serve.line(/^ready$/, READY_MS);
    await waitFor(() => prepared(), 15_000, 'the next instance to be prepared');
    const held = appPids('db');
    // Answered by the instance the failed step left running: not a
    // second restore (which would fail the same way), nor a refusal.
    expect(redis(PUBLIC, ['DBSIZE'])).toEqual([String(KEYS)]);
    expect(appPids('db')).toEqual(held);
    await waitFor(() => events().some((e) => e.event === 'restore'), 5000, 'the restore to be logged');
    expect(events().filter((e) => e.event === 'restore-incomplete')).toHaveLength(1);
    expect(events().filter((e) => e.event === 'restore-failed')).toEqual([]);
    await endServeAndService({ rmChecked: true });
  });

  it('a suspend that fails once the instance is ending keeps its image, which the next connection resumes, with the write made before', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    // Every suspend of this serve fails at the last step of its snapshot,
    // past its point of no return: the instance ended, its image whole.
    serve = sb.start(['serve'], { APPSHOT_TEST_FAIL_AT: 'snapshot: ended' });
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['SET during written', 'DBSIZE'])).toEqual(['OK', String(KEYS + 1)]);
    await waitFor(() => events().some((e) => e.event === 'suspend'), 15_000, 'the suspend to be logged');
    expect(events().filter((e) => e.event.startsWith('suspend')).map((e) => e.event)).toEqual(['suspend-incomplete', 'suspend']);
    // Its state file follows the event up to 100 ms later (see suspended()
    // above): a `service show` that answers at once (the native client,
    // served by the engine in a few ms) can still read 'suspending'.
    await waitFor(() => show().state !== 'suspending', 5000, 'the suspend to be over');
    expect(show().state).toBe('suspended');
    // Resumed from the image that suspend wrote (not thrown away as a
    // failed one's, nor the instance given up as crashed): the write is there.
    expect(redis(PUBLIC, ['GET during', 'DBSIZE'])).toEqual(['written', String(KEYS + 1)]);
    await endServeAndService({ rmChecked: false });
  });

  it('a suspend whose bookkeeping fails after the snapshot stays suspended on its image, which the next connection resumes, with the write made before', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    // Every suspend of this serve fails in its bookkeeping (the pruning of
    // older images), after the snapshot returned: the instance ended into
    // its image, which is now the only copy of what it had.
    serve = sb.start(['serve'], { APPSHOT_TEST_FAIL_AT: 'serve: suspend pruning' });
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['SET during written', 'DBSIZE'])).toEqual(['OK', String(KEYS + 1)]);
    const failed = () => events().filter((e) => ['suspend-bookkeeping-failed', 'suspend-failed'].includes(e.event));
    await waitFor(() => failed().length > 0, 15_000, 'the failure to be logged');
    await waitFor(() => show().state !== 'suspending', 5000, 'the suspend to be over');
    const { state, lastImage: suspendImage } = show();
    // Resumed from the image that suspend wrote (not removed as a failed
    // suspend's, nor the instance given up as crashed): the write is there.
    expect(redis(PUBLIC, ['GET during', 'DBSIZE'])).toEqual(['written', String(KEYS + 1)]);
    expect(state).toBe('suspended');
    expect(suspendImage).not.toBe(image);
    expect(existsSync(suspendImage)).toBe(true);
    expect(events().filter((e) => e.event.startsWith('suspend')).map((e) => e.event)).toEqual(['suspend', 'suspend-bookkeeping-failed']);
    expect(events().filter((e) => e.event === 'suspend-failed' || e.event === 'restore-failed')).toEqual([]);
    await endServeAndService({ rmChecked: false });
  });

  it('a serve killed once its suspend has ended the instance, before the state after it is written, is followed by one that resumes from that image and keeps it', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    // Killed right after its first suspend's snapshot returned: the
    // instance ended into the new image, the state after it not written.
    serve = sb.start(['serve'], { APPSHOT_TEST_KILL_AT: 'serve: suspend state' });
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['SET during written', 'DBSIZE'])).toEqual(['OK', String(KEYS + 1)]);
    expect((await serve.exited).signal).toBe('SIGKILL');
    expect(sb.aids()).not.toContain('db');
    // The next serve resumes from that image (not from the one before it,
    // without the write), and its own next suspend builds on it.
    serve = sb.start(['serve']);
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['GET during', 'DBSIZE'])).toEqual(['written', String(KEYS + 1)]);
    expect(events().filter((e) => e.event === 'suspend-recovered')).toHaveLength(1);
    const recovered = show().lastImage;
    await waitFor(() => events().some((e) => e.event === 'suspend'), 15_000, 'the next suspend');
    // The state file names the new image up to 100 ms after the event.
    await waitFor(() => show().lastImage !== recovered, 5000, "the next suspend's image in the service's state");
    expect(redis(PUBLIC, ['GET during', 'DBSIZE'])).toEqual(['written', String(KEYS + 1)]);
    await endServeAndService({ rmChecked: false });
  });

  it('a suspend whose state cannot be written first does not begin: the instance keeps running', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    serve = sb.start(['serve'], { APPSHOT_TEST_FAIL_AT: 'serve: state write' });
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['SET during written', 'DBSIZE'])).toEqual(['OK', String(KEYS + 1)]);
    const running = appPids('db');
    await waitFor(() => events().some((e) => e.event === 'suspend-failed'), 15_000, 'the suspend to fail');
    expect(events().filter((e) => e.event === 'suspend')).toEqual([]);
    expect(running.every(alive)).toBe(true);
    expect(redis(PUBLIC, ['GET during', 'DBSIZE'])).toEqual(['written', String(KEYS + 1)]);
    await endServeAndService({ rmChecked: false });
  });

  it('--prepared 0: a suspended service has no process, and resumes as before', async () => {
    const image = join(out, 'redis.img');
    expect(sb.run(['service', 'add', 'db', '--from', image, '--port', `127.0.0.1:${PUBLIC}:${APP}`, '--idle', '1s']).code).toBe(0);
    serve = sb.start(['serve', '--prepared', '0']);
    await serve.line(/^ready$/, READY_MS);
    expect(redis(PUBLIC, ['DBSIZE'])).toEqual([String(KEYS)]);
    await suspended(1, 'the service to be suspended');
    // A prepare would have followed the suspend within ~50 ms: half a
    // second's grace before looking (a negative check, not a timing one).
    await new Promise((r) => setTimeout(r, 500));
    expect(show().instances[0]?.prepared).toBeUndefined();
    expect(sb.aids()).not.toContain('db');
    expect(redis(PUBLIC, ['DBSIZE'])).toEqual([String(KEYS)]);
    expect(events().filter((e) => e.event === 'prepared')).toEqual([]);
    serve.child.kill('SIGTERM');
    expect((await serve!.exited).code, `serve's log ends:\n${serve!.stderr.slice(-3000)}`).toBe(0);
    expect(sb.run(['service', 'rm', 'db']).code).toBe(0);
  });
});
