/**
 * Many clones, made and removed as one: a batch of 32 clones of templfix
 * (test/fixtures/templfix: an allocated port, a home per AID, a
 * redirected config directory, copy-on-write data, a virtualized
 * semaphore) all run, each its own instance that answers its own verdict;
 * an `appshot rm` of some ended ones, an unknown AID and a running one
 * removes the ended ones and says each other in its line; then one
 * `appshot rm -f` of all the others (lifecycle.ts removeApps) kills every
 * one before it removes any, and leaves nothing of any: no process, table
 * file, registration, private copy, REDIR PATH directory, port claim or
 * SysV object.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, Sandbox, strayIpcIds, systemIpcIds, tcpExchange, templfixTemplate, type TemplfixWorld } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-clonemany-'));
// Fixed ports of its own (the template's virtual ones): 23710-23799.
const base = 23710 + ((process.pid * 3) % 88);
const world: TemplfixWorld = { root: join(dir, 'srv'), rules: join(dir, 'templfix.rules'), portAlloc: base, portMux: base + 1 };
const tpl = join(dir, 'tpl.template');
const COUNT = 32;

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

beforeAll(async () => {
  await templfixTemplate(sb, world, 'tf', join(dir, 'snap'), tpl);
}, 120_000);

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

const ask = async (port: number, command: string) => (await tcpExchange(port, command + '\n', 15_000)).trim();

describe('a batch of clones, removed by one rm -f', () => {
  it('32 clones run, each its own; rm of a few, some not removable, removes the others; rm -f of all the rest kills them all before removing any, and leaves nothing', async () => {
    const ipcBefore = systemIpcIds();
    const clones = sb.json<Json[]>(['clone', tpl, '--count', String(COUNT)]);
    expect(clones).toHaveLength(COUNT);
    const aids = clones.map((c) => c.aid as string);
    expect(new Set(aids).size).toBe(COUNT);
    const records = aids.map((aid) => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')) as Json);
    const ports = clones.map((c) => c.ports.find((p: Json) => p.virtual === world.portAlloc).system as number);
    expect(new Set(ports).size).toBe(COUNT);
    const privateRoots = records.map((r) => r.privateRoot as string);
    expect(privateRoots.every((p) => p && existsSync(p))).toBe(true);
    expect(new Set(privateRoots).size).toBe(COUNT);
    expect(records.every((r) => (r.restore?.madeDirs ?? []).length + (r.madeDirs ?? []).length > 0)).toBe(true);
    const madeDirs = records.flatMap((r) => [...(r.madeDirs ?? []), ...(r.restore?.madeDirs ?? [])].map((d: Json) => d.leaf as string));
    // Every one running, and answering for itself: the template's state,
    // its own home (its AID), its own verdict on all of it.
    const listed = sb.json<Json[]>(['ps']).filter((a) => aids.includes(a.aid));
    expect(listed.filter((a) => a.state === 'running')).toHaveLength(COUNT);
    const pids = [...listed.flatMap((a) => a.processes.map((p: Json) => p.pid as number)), ...records.map((r) => r.initPid as number)];
    expect(pids.length).toBeGreaterThanOrEqual(2 * COUNT);
    expect(pids.every(alive)).toBe(true);
    await Promise.all(
      clones.map(async (c, i) => {
        const info = await ask(ports[i], 'INFO');
        expect(info).toContain(`home=${join(world.root, 'home', c.aid)}`);
        expect(info).toContain('state=template');
        expect(await ask(ports[i], 'CHECK')).toBe('OK');
      }),
    );

    // An rm without -f that names, among three ended ones, an unknown AID
    // and a running one (twice): each of those two is said in one line in
    // the order named, the running one as often as it is named (as one rm
    // after the other would), the last one's exit code is the command's,
    // and the ended ones are removed all the same.
    const [stopped, runningOne] = [aids.slice(0, 3), aids[3]];
    sb.ok(['stop', '-t', '20', ...stopped]);
    const mixed = sb.run(['rm', stopped[0], runningOne, 'nosuch', stopped[1], runningOne, stopped[2]]);
    const runningLine = `appshot: '${runningOne}' is running: stop it first (appshot stop ${runningOne}), or 'appshot rm -f ${runningOne}'`;
    expect(mixed.stderr.trim().split('\n')).toEqual([runningLine, "appshot: no application with AID 'nosuch'", runningLine]);
    expect(mixed.code).toBe(1);
    expect(mixed.stdout.trim().split('\n')).toEqual(stopped);
    expect(sb.allAids().filter((aid) => stopped.includes(aid))).toEqual([]);
    expect(privateRoots.slice(0, 3).filter(existsSync)).toEqual([]);
    expect(ports.slice(0, 3).filter((p) => existsSync(join(sb.home, 'ports', String(p))))).toEqual([]);
    // The running one untouched: still its own instance.
    expect(await ask(ports[3], 'CHECK')).toBe('OK');
    // Named last, the unknown AID's code is the command's.
    const unknownLast = sb.run(['rm', runningOne, 'nosuch']);
    expect(unknownLast.stderr.trim().split('\n')).toEqual([runningLine, "appshot: no application with AID 'nosuch'"]);
    expect(unknownLast.code).toBe(3);
    const others = aids.slice(3);

    // One command for all of them; while it runs, the first registration
    // gone must find every process of every one gone already (killed
    // together, waited for together, then removed: one by one, the
    // others would still be running).
    const removing = sb.runAsync(['rm', '-f', ...others]);
    let finished = false;
    void removing.finally(() => (finished = true));
    let stillRunningAtFirstRemoval: number[] | undefined;
    const appsDir = join(sb.home, 'apps');
    while (!finished && stillRunningAtFirstRemoval === undefined) {
      const present = new Set(readdirSync(appsDir));
      if (others.some((aid) => !present.has(aid))) stillRunningAtFirstRemoval = pids.filter(alive);
      else await new Promise((r) => setTimeout(r, 2));
    }
    const r = await removing;
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual(others);
    expect(stillRunningAtFirstRemoval).toEqual([]);

    // Nothing left of any of them.
    expect(pids.filter(alive)).toEqual([]);
    const left = new Set(sb.allAids());
    expect(aids.filter((aid) => left.has(aid))).toEqual([]);
    expect(sb.json<Json[]>(['ps', '-a']).filter((a) => aids.includes(a.aid))).toEqual([]);
    expect(sb.shmFiles().filter((f) => aids.some((aid) => f.includes(`-${aid}-`)))).toEqual([]);
    expect(privateRoots.filter(existsSync)).toEqual([]);
    expect(madeDirs.filter(existsSync)).toEqual([]);
    expect(ports.filter((p) => existsSync(join(sb.home, 'ports', String(p))))).toEqual([]);
    expect(strayIpcIds(ipcBefore)).toEqual([]);
  }, 60_000);
});
