// A keyed SysV create (semget, shmget, msgget of a key with IPC_CREAT)
// reserves its key in the application's tables before the object is made
// and binds it once the object exists (create_keyed, preload_ipc.c). A
// creator killed at any instant leaves an object its tables know or none
// (and never adopts another's found under its key), and processes racing
// for one key end with one object. Driven by
// test/fixtures/keyedkill.c and keyedrace.c, which kill for real (SIGKILL)
// and check what they can see from inside; from outside, the tables and
// the kernel's list of objects.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { LocalRegistry } from '../src/registry.js';
import { type Entry, fixture, Sandbox, waitFor } from './helpers.js';
import { objectsByKey, systemKey } from './sysvkeys.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-keyedkill-'));
/** Objects the test made outside any application (keyedkill outsider-make). */
const outsiders: { kind: 'sem' | 'shm' | 'msg'; id: number }[] = [];
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
  for (const o of outsiders.splice(0)) spawnSync('ipcrm', [{ sem: '-s', shm: '-m', msg: '-q' }[o.kind], String(o.id)]);
});

type IpcKind = 'semid' | 'shmid' | 'msgid' | 'semkey' | 'shmkey' | 'msgkey';
type Tables = Record<IpcKind, Entry[]>;
type KeyKind = 'semkey' | 'shmkey' | 'msgkey';
const KEY_KINDS = ['semkey', 'shmkey', 'msgkey'] as const;
const ID_OF = { semkey: 'semid', shmkey: 'shmid', msgkey: 'msgid' } as const;
const SYSVIPC = { semkey: 'sem', shmkey: 'shm', msgkey: 'msg' } as const;

const tables = (aid: string) => sb.json<{ tables: Tables }>(['table', aid]).tables;

/** A semaphore set's ctime (seconds): the last column of /proc/sysvipc/sem. */
function semCtime(id: number): number {
  for (const line of readFileSync('/proc/sysvipc/sem', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (Number(cols[1]) === id) return Number(cols[cols.length - 1]);
  }
  throw new Error(`no semaphore set ${id}`);
}

/** Makes an object under system key `key` from outside any application,
 * as the fixture's creates do; its id. */
function outsiderObject(kind: 'sem' | 'shm', key: number): number {
  const r = spawnSync(fixture('keyedkill'), ['outsider-make', kind, String(key)], { encoding: 'utf8' });
  expect(r.status, r.stderr + r.stdout).toBe(0);
  const id = Number(r.stdout.trim());
  outsiders.push({ kind, id });
  return id;
}

interface AppObject {
  keyKind: KeyKind;
  vkey: number;
  key: number;
  id: number;
}

/** The kernel's objects under an application's system keys of the virtual
 * keys `vkeys` (any attempt): what it made, its tables or not. */
function objectsOf(salt: bigint, vkeys: number[]): AppObject[] {
  const found: AppObject[] = [];
  for (const keyKind of KEY_KINDS) {
    const objects = objectsByKey(SYSVIPC[keyKind]);
    for (const vkey of vkeys)
      for (let attempt = 0; attempt < 64; attempt++) {
        const key = systemKey(salt, vkey, attempt);
        for (const id of objects.get(key) ?? []) found.push({ keyKind, vkey, key, id });
      }
  }
  return found;
}

const saltOf = (aid: string) => BigInt(`0x${new LocalRegistry(sb.home).require(aid).keySalt}`);
const named = (o: AppObject) => `${SYSVIPC[o.keyKind]} ${o.id} (key 0x${o.vkey.toString(16)}, system key ${o.key})`;
const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

/** Nothing half-done in an application's tables: no key still reserved;
 * each bound key names at most one object of the kernel, whose id the id
 * table maps; and each object under the application's keys is one of
 * those. (A bound key may name none: a creator killed in IPC_RMID after
 * the kernel removed the object and before the key was unbound. The key
 * then finds nothing, as the kernel would answer, and a create under it
 * makes the object again.) */
function expectWhole(t: Tables, objects: AppObject[]): void {
  for (const keyKind of KEY_KINDS) {
    const byKey = objectsByKey(SYSVIPC[keyKind]);
    for (const e of t[keyKind]) {
      expect(e.flags, `${keyKind} 0x${e.virtual.toString(16)}`).not.toContain('reserved');
      const ids = byKey.get(e.system) ?? [];
      expect(ids.length, `objects of ${keyKind} 0x${e.virtual.toString(16)} (system key ${e.system})`).toBeLessThanOrEqual(1);
      if (ids.length) expect(t[ID_OF[keyKind]].map((i) => i.system)).toContain(ids[0]);
    }
  }
  const unknown = objects.filter((o) => !t[o.keyKind].some((e) => e.system === o.key) || !t[ID_OF[o.keyKind]].some((e) => e.system === o.id));
  expect(unknown.map(named), 'objects of the application its tables do not name').toEqual([]);
}

/** `rm -f` of the application, then no object under its keys left. */
async function removedWithNothingLeft(aid: string, salt: bigint, vkeys: number[]): Promise<void> {
  sb.ok(['rm', '-f', aid]);
  await waitFor(() => !sb.allAids().includes(aid), 10_000, `${aid} to be removed`);
  expect(objectsOf(salt, vkeys).map(named), `objects of ${aid} left after rm -f`).toEqual([]);
}

describe('a keyed create killed part-way', () => {
  it('killed at 200 varied instants of creating and removing: every object of it named by its tables, none left after rm -f', async () => {
    const app = sb.start(['run', '--aid', 'kk-loop', '--', fixture('keyedkill'), 'loop', '200']);
    await app.line(/^(DONE|FAIL)/, 60_000);
    expect(app.output().filter((l) => l.startsWith('FAIL'))).toEqual([]);
    const salt = saltOf('kk-loop');
    const vkeys = [...range(0x6b000, 8), 0x6bfff];
    expectWhole(tables('kk-loop'), objectsOf(salt, vkeys));
    await removedWithNothingLeft('kk-loop', salt, vkeys);
  });

  it('killed at each step, for each kind: the next writer adopts an object made, drops a key only reserved; the adopted ones snapshot and restore', async () => {
    sb.ok(['run', '-d', '--aid', 'kk-points', '--', fixture('keyedkill'), 'points']);
    await sb.checksPass('kk-points', 2);
    const vkeys = [...range(0x7e000, 2), ...range(0x7e010, 2), ...range(0x7e020, 2), 0x7efff];
    const ranSalt = saltOf('kk-points');
    expectWhole(tables('kk-points'), objectsOf(ranSalt, vkeys));
    sb.ok(['snapshot', 'kk-points', '-o', join(out, 'points')]);
    // The snapshot ended it: its objects went with it, the adopted ones too.
    await waitFor(() => objectsOf(ranSalt, vkeys).length === 0, 10_000, 'the objects of the snapshotted kk-points to go');
    sb.ok(['restore', join(out, 'points')]);
    await sb.checksPass('kk-points', 2);
    await sb.exercised('kk-points', 'to use the adopted objects');
    const salt = saltOf('kk-points');
    expectWhole(tables('kk-points'), objectsOf(salt, vkeys));
    await removedWithNothingLeft('kk-points', salt, vkeys);
  });

  for (const kind of ['sem', 'shm', 'msg'] as const)
    it(`${kind}: killed after making the object, before binding it, and removed at once: the reserved key finds the object`, async () => {
      const aid = `kk-pause-${kind}`;
      const app = sb.start(['run', '--aid', aid, '--', fixture('keyedkill'), 'pause', kind]);
      const pid = Number((await app.line(/^(?:PAUSED (\d+)|CREATED WITHOUT PAUSING.*|FAIL.*)$/))[1]);
      expect(app.output().filter((l) => /^(FAIL|CREATED)/.test(l))).toEqual([]);
      // Held between the two: the key reserved (in no index: nobody
      // translates through it), the object in no id table yet.
      const keyKind = `${kind}key` as const;
      const t = tables(aid);
      const reserved = t[keyKind].find((e) => e.virtual === 0x7e57)!;
      expect(reserved.flags).toEqual(['reserved']);
      const reg = new LocalRegistry(sb.home);
      const record = reg.require(aid);
      const salt = BigInt(`0x${record.keySalt}`);
      const made = objectsOf(salt, [0x7e57]);
      expect(made.map((o) => [o.keyKind, o.key])).toEqual([[keyKind, reserved.system]]);
      expect(t[ID_OF[keyKind]].map((e) => e.system)).not.toContain(made[0].id);
      process.kill(pid, 'SIGKILL');
      if (kind === 'sem') {
        // What stop, rm and init's end walk find it by, straight (no
        // writer has settled the reservation): the reserved key, under
        // the ownership rule, with the registry's salt and time.
        expect(addon().removeIpcOwned(record.tables, keyKind, reserved.system, salt, record.tablesCreated!, reg.trustedInitPid(record))).toBe(true);
      }
      await removedWithNothingLeft(aid, salt, [0x7e57]);
    });
});

describe('a snapshot after a keyed create was killed part-way', () => {
  for (const kind of ['sem', 'shm', 'msg'] as const)
    it(`${kind}: killed after making the object, before binding it, then snapshotted before the application took the lock again: the object is in the image, and comes back by its key with its contents`, async () => {
      const aid = `kk-snap-${kind}`;
      const keyKind = `${kind}key` as const;
      sb.ok(['run', '-d', '--aid', aid, '--', fixture('keyedkill'), 'snapped', kind]);
      await waitFor(() => /^(PAUSED \d+|CREATED|FAIL)/m.test(sb.log(aid)), 10_000, `the creator of ${aid} to stop`);
      const pid = Number(/^PAUSED (\d+)$/m.exec(sb.log(aid))?.[1]);
      expect(sb.log(aid)).not.toMatch(/^(FAIL|CREATED)/m);
      const ranSalt = saltOf(aid);
      const [made] = objectsOf(ranSalt, [0x7e59]);
      expect(made?.keyKind).toBe(keyKind);
      process.kill(pid, 'SIGKILL');
      // Dead and reaped, with nobody of the application to settle (the
      // reap keeps its PID entry, which names a live group: no lock): the
      // object is in no id entry, its key only reserved.
      await waitFor(() => /^(REAPED|FAIL)/m.test(sb.log(aid)), 10_000, 'the creator to be reaped');
      expect(sb.log(aid)).not.toMatch(/^FAIL/m);
      let t = tables(aid);
      expect(t[keyKind].find((e) => e.virtual === 0x7e59)?.flags).toEqual(['reserved']);
      expect(t[ID_OF[keyKind]].map((e) => e.system)).not.toContain(made.id);
      // Contents only the image can carry: put there by its id, from outside.
      const poked = spawnSync(fixture('keyedkill'), ['poke', kind, String(made.id)], { encoding: 'utf8' });
      expect(poked.status, poked.stderr + poked.stdout).toBe(0);
      sb.ok(['snapshot', aid, '-o', join(out, aid)]);
      await waitFor(() => objectsOf(ranSalt, [0x7e59]).length === 0, 10_000, `the objects of the snapshotted ${aid} to go`);
      sb.ok(['restore', join(out, aid)]);
      await sb.exercised(aid, 'to find the object its killed creator made');
      const salt = saltOf(aid);
      t = tables(aid);
      const key = t[keyKind].find((e) => e.virtual === 0x7e59);
      expect(key?.flags).toEqual([]);
      const restored = objectsOf(salt, [0x7e59]);
      expect(restored.map((o) => [o.keyKind, o.key])).toEqual([[keyKind, key!.system]]);
      expect(t[ID_OF[keyKind]].map((e) => e.system)).toContain(restored[0].id);
      await removedWithNothingLeft(aid, salt, [0x7e59]);
    });
});

describe('the edges of a keyed create', () => {
  it('a key left bound to a removed object, then its create killed before the id was mapped: the next writer maps the object, which a snapshot would otherwise miss', async () => {
    const app = sb.start(['run', '--aid', 'kk-rebind', '--', fixture('keyedkill'), 'rebind']);
    await app.line(/^(REBOUND|FAIL|CREATED|REMOVED)/);
    expect(app.output().filter((l) => /^(FAIL|CREATED|REMOVED)/.test(l))).toEqual([]);
    const salt = saltOf('kk-rebind');
    const vkeys = range(0x7e100, 3);
    // Before anything gets the keys again: the tables name every object
    // the killed creates made (the id tables are what a snapshot dumps).
    const objects = objectsOf(salt, vkeys);
    expect(objects.map((o) => o.keyKind).sort()).toEqual([...KEY_KINDS].sort());
    expectWhole(tables('kk-rebind'), objects);
    app.send('go\n');
    await app.line(/^(DONE|FAIL)/);
    expect(app.output().filter((l) => l.startsWith('FAIL'))).toEqual([]);
    await removedWithNothingLeft('kk-rebind', salt, vkeys);
  });

  it("a creator killed with someone else's object under its reserved key (met as EEXIST, or made there after it aimed): the object is not adopted, and outlives the application", async () => {
    const aid = 'kk-outsider';
    const app = sb.start(['run', '--aid', aid, '--', fixture('keyedkill'), 'outsider']);
    await app.line(/^(READY|FAIL)/);
    const salt = saltOf(aid);
    const semKey = systemKey(salt, 0x7e200, 0);
    const sem = outsiderObject('sem', semKey);
    // A set made in an earlier second than the creator's aim: its ctime
    // alone tells it from one the creator made (a set records no creator).
    // The kernel stamps ctime from the coarse clock, up to a tick behind.
    const made = semCtime(sem);
    await waitFor(() => Date.now() >= (made + 1) * 1000 + 50, 5_000, 'the next second');
    app.send('go\n');
    await app.line(/^(AIMED|FAIL)/);
    expect(app.output().filter((l) => /^(FAIL|CREATED)/.test(l))).toEqual([]);
    const reserved = tables(aid).shmkey.find((e) => e.virtual === 0x7e201)!;
    expect(reserved.flags).toEqual(['reserved']);
    expect(reserved.system).toBe(systemKey(salt, 0x7e201, 0));
    const shm = outsiderObject('shm', reserved.system);
    app.send('go\n');
    await app.line(/^(DONE|FAIL)/);
    expect(app.output().filter((l) => /^(FAIL|CREATED)/.test(l))).toEqual([]);
    // The application's tables name its own objects, not the outsiders'.
    const t = tables(aid);
    expect(t.semid.map((e) => e.system)).not.toContain(sem);
    expect(t.shmid.map((e) => e.system)).not.toContain(shm);
    expect(t.semkey.find((e) => e.virtual === 0x7e200)?.system).not.toBe(semKey);
    expect(t.shmkey.find((e) => e.virtual === 0x7e201)?.system).not.toBe(reserved.system);
    const vkeys = [0x7e200, 0x7e201];
    const own = objectsOf(salt, vkeys).filter((o) => o.id !== (o.keyKind === 'semkey' ? sem : o.keyKind === 'shmkey' ? shm : -1));
    expect(own).toHaveLength(2);
    expectWhole(t, own);
    sb.ok(['rm', '-f', aid]);
    await waitFor(() => !sb.allAids().includes(aid), 10_000, `${aid} to be removed`);
    expect(objectsOf(salt, vkeys).map((o) => o.id).sort()).toEqual([sem, shm].sort());
  });

  it('killed binding the key, after its flag was cleared and before it was indexed, and removed at once: the key entry finds the object', async () => {
    const aid = 'kk-indexing';
    const app = sb.start(['run', '--aid', aid, '--', fixture('keyedkill'), 'pause', 'sem', 'keyed-commit-indexing']);
    const pid = Number((await app.line(/^(?:PAUSED (\d+)|CREATED WITHOUT PAUSING.*|FAIL.*)$/))[1]);
    expect(app.output().filter((l) => /^(FAIL|CREATED)/.test(l))).toEqual([]);
    const entry = tables(aid).semkey.find((e) => e.virtual === 0x7e57)!;
    expect(entry.flags).toEqual([]); // bound, in no index yet
    const reg = new LocalRegistry(sb.home);
    const record = reg.require(aid);
    const salt = BigInt(`0x${record.keySalt}`);
    const [made] = objectsOf(salt, [0x7e57]);
    expect(tables(aid).semid.map((e) => e.system)).toContain(made.id);
    process.kill(pid, 'SIGKILL');
    // No writer has repaired the index: what stop, rm and init's end walk
    // find it by (its id, its key) must prove it the application's.
    expect(addon().removeIpcOwned(record.tables, 'semid', made.id, salt, record.tablesCreated!, reg.trustedInitPid(record))).toBe(true);
    await removedWithNothingLeft(aid, salt, [0x7e57]);
  });
});

describe('processes racing to create one key', () => {
  it('all get the same object, by the same virtual id, also when the one making it is killed in between', async () => {
    const app = sb.start(['run', '--aid', 'kk-race', '--', fixture('keyedrace'), '6', '6']);
    await app.line(/^(DONE|FAIL)/, 60_000);
    expect(app.output().filter((l) => l.startsWith('FAIL'))).toEqual([]);
    const salt = saltOf('kk-race');
    const vkeys = range(0x4ace0, 6);
    const t = tables('kk-race');
    const objects = objectsOf(salt, vkeys);
    expectWhole(t, objects);
    // One key and one object per round and kind.
    for (const keyKind of KEY_KINDS) {
      expect(t[keyKind]).toHaveLength(6);
      expect(objects.filter((o) => o.keyKind === keyKind)).toHaveLength(6);
    }
    // The virtual id each round's racers agreed on is the one the tables
    // map that round's key's object to.
    const rounds = [...app.output().join('\n').matchAll(/^ROUND \d+ semkey=(\d+) vid=(\d+)$/gm)];
    expect(rounds).toHaveLength(6);
    for (const m of rounds) {
      const sid = objects.find((o) => o.keyKind === 'semkey' && o.vkey === Number(m[1]))!.id;
      expect(t.semid.find((e) => e.system === sid)?.virtual).toBe(Number(m[2]));
    }
    await removedWithNothingLeft('kk-race', salt, vkeys);
  });
});
