// A keyed SysV object removed while another process makes it again, and a
// dead creator's witness of its own object (create_keyed, unbind_removed_key
// in preload_ipc.c; made_by_creator in appshot_table.c). Driven by
// test/fixtures/keyedrmid.c, which holds its children at the preload
// library's pause points; from outside, the tables and the kernel's list
// of objects.
import { spawnSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { LocalRegistry } from '../src/registry.js';
import { alive, type Entry, fixture, Sandbox, waitFor } from './helpers.js';
import { objectsByKey, systemKey, type SysvKind } from './sysvkeys.js';

const sb = new Sandbox();
/** Every object the test may leave if a check fails: the outside ones it
 * made, and whatever is under the applications' keys. */
const made: { kind: SysvKind; id: number }[] = [];
const apps: { salt: bigint; vkeys: number[] }[] = [];
afterAll(async () => {
  await sb.dispose();
  for (const { salt, vkeys } of apps.splice(0)) for (const o of objectsOf(salt, vkeys)) made.push(o);
  for (const o of made.splice(0)) spawnSync('ipcrm', [{ sem: '-s', shm: '-m', msg: '-q' }[o.kind], String(o.id)]);
});

type KeyKind = 'semkey' | 'shmkey' | 'msgkey';
type Tables = Record<'semid' | 'shmid' | 'msgid' | KeyKind, Entry[]>;
const tables = (aid: string) => sb.json<{ tables: Tables }>(['table', aid]).tables;

/** The kernel's objects under the system keys of virtual keys `vkeys`
 * (any attempt) for a salt: the application's, its tables or not. */
function objectsOf(salt: bigint, vkeys: number[]): { kind: SysvKind; vkey: number; key: number; id: number }[] {
  const found = [];
  for (const kind of ['sem', 'shm', 'msg'] as const) {
    const objects = objectsByKey(kind);
    for (const vkey of vkeys)
      for (let attempt = 0; attempt < 64; attempt++) {
        const key = systemKey(salt, vkey, attempt);
        for (const id of objects.get(key) ?? []) found.push({ kind, vkey, key, id });
      }
  }
  return found;
}

/** An application running keyedrmid `mode`, once its record is written
 * (ended too: a fixture that failed at once), with its salt; the objects
 * under its keys `vkeys` go after the tests whatever happens. */
async function started(aid: string, mode: string, vkeys: number[]) {
  const app = sb.start(['run', '--aid', aid, '--', fixture('keyedrmid'), mode]);
  const reg = new LocalRegistry(sb.home);
  await waitFor(() => reg.get(aid)?.keySalt !== undefined, 10_000, `${aid} to be registered`);
  const salt = BigInt(`0x${reg.get(aid)!.keySalt}`);
  apps.push({ salt, vkeys });
  return { app, salt };
}

/** Makes an object under system key `key` from outside any application. */
function outsideObject(kind: 'sem' | 'shm', key: number): number {
  const r = spawnSync(fixture('keyedrmid'), ['outside-make', kind, String(key)], { encoding: 'utf8' });
  expect(r.status, r.stderr + r.stdout).toBe(0);
  const id = Number(r.stdout.trim());
  made.push({ kind, id });
  return id;
}

async function removed(aid: string): Promise<void> {
  sb.ok(['rm', '-f', aid]);
  await waitFor(() => !sb.allAids().includes(aid), 10_000, `${aid} to be removed`);
}

const failures = (app: { output(): string[] }) => app.output().filter((l) => /^(FAIL|WITHOUT PAUSING)/.test(l));

describe('a keyed object removed while another process makes it again', () => {
  it('the key keeps the new object: found by its key, not made twice, removed with the application', async () => {
    const aid = 'kr-recreate';
    const vkeys = [0x7e300, 0x7e301, 0x7e302];
    const { app, salt } = await started(aid, 'recreate', vkeys);
    await app.line(/^(RECREATED|FAIL|WITHOUT PAUSING)/);
    expect(failures(app)).toEqual([]);
    // One object per key, bound, its id mapped.
    const t = tables(aid);
    const objects = objectsOf(salt, vkeys);
    expect(objects.map((o) => o.kind).sort()).toEqual(['msg', 'sem', 'shm']);
    for (const o of objects) {
      expect(t[`${o.kind}key`].find((e) => e.virtual === o.vkey)?.system).toBe(o.key);
      expect(t[`${o.kind}id`].map((e) => e.system)).toContain(o.id);
    }
    await removed(aid);
    expect(objectsOf(salt, vkeys)).toEqual([]);
  });
});

describe("a dead creator's own object, and another's under its key", () => {
  it('a creator whose euid changed after its reservation, killed after making its set: the set is adopted, and goes with the application', async () => {
    const aid = 'kr-setuid';
    const vkey = 0x7e310;
    const { app, salt } = await started(aid, 'setuid-aim', [vkey]);
    // Met as EEXIST at the first system key: the creator aims at the next.
    const outside = outsideObject('sem', systemKey(salt, vkey, 0));
    app.send('go\n');
    await app.line(/^(ADOPTED|FAIL|WITHOUT PAUSING)/);
    expect(failures(app)).toEqual([]);
    const [own] = objectsOf(salt, [vkey]).filter((o) => o.id !== outside);
    expect(own?.key).toBe(systemKey(salt, vkey, 1));
    const t = tables(aid);
    expect(t.semkey.find((e) => e.virtual === vkey)).toMatchObject({ system: own.key, flags: [] });
    expect(t.semid.map((e) => e.system)).toContain(own.id);
    await removed(aid);
    expect(objectsOf(salt, [vkey]).map((o) => o.id)).toEqual([outside]);
  });

  it("killed with its supervisor while a creator is held after meeting another's segment under its key: the removal leaves the segment alone", async () => {
    const aid = 'kr-taken';
    const vkey = 0x7e320;
    const { app, salt } = await started(aid, 'taken-held', [vkey]);
    const key = systemKey(salt, vkey, 0);
    const outside = outsideObject('shm', key);
    app.send('go\n');
    const creator = Number((await app.line(/^(?:HELD (\d+)|FAIL.*|WITHOUT PAUSING.*)$/))[1]);
    expect(failures(app)).toEqual([]);
    // The reservation aims at the outside segment's key, as the creator
    // left it when it met the segment there.
    expect(tables(aid).shmkey.find((e) => e.virtual === vkey)).toMatchObject({ system: key, flags: ['reserved'] });
    // Everything killed at once, its init first: no locker is left to
    // settle the reservation, and the removal reads the tables as they are.
    const record = new LocalRegistry(sb.home).require(aid);
    const processes = [record.initPid!, sb.systemPid(aid), creator];
    for (const pid of processes) process.kill(pid, 'SIGKILL');
    await waitFor(() => processes.every((pid) => !alive(pid)), 10_000, `the processes of ${aid} to go`);
    // Its `appshot run` finds it lost (nobody wrote how it ended) and
    // releases it, its SysV objects by the tables' entries, its tables,
    // if nothing of it ran when it looked; the processes are killed one
    // after the other, and a run that looks between two (or while one is
    // still exiting) keeps the registration for the next look (`ps`),
    // which releases it the same way (ci-49f: the run had kept it).
    await app.exited;
    sb.ok(['ps']);
    expect(sb.allAids()).not.toContain(aid);
    expect(objectsOf(salt, [vkey]).map((o) => o.id)).toEqual([outside]);
  });
});
