/**
 * Templates and clones (FIG. 7-9) on a real program: templfix holds fixed
 * IPC keys, a semaphore whose virtual id is 0, a file under a
 * copy-on-write rule, a redirected config directory, two listening ports
 * (one allocated per instance, one multiplexed) and a SET ENV variable. It
 * is run under rules, snapshotted, made a template and cloned 8 times; the
 * clones run at once, each answering for its own state.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, cpSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, readdirSync, renameSync, rmSync, statSync, truncateSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { elfSymbol, firstLoadVaddr } from '../src/elf.js';
import { cli, fixture, makeTemplfixWorld, runTemplfix, Sandbox, stoppedAt, strayIpcIds, systemIpcIds, tcpExchange, type TemplfixWorld, waitFor, type Entry } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-templ-'));
const ROOT = join(dir, 'srv');
const base = 28000 + ((process.pid * 7) % 1998);
const PORT_ALLOC = base;
const PORT_MUX = base + 1;
const CLONES = 8;
const ipcBefore = systemIpcIds();

/** templfix's files and rules, where this test runs it. */
const world: TemplfixWorld = { root: ROOT, rules: join(dir, 'templfix.rules'), portAlloc: PORT_ALLOC, portMux: PORT_MUX };

/** One command to templfix on `port`; its one-line answer. */
const ask = async (port: number, command: string) => (await tcpExchange(port, command + '\n')).trim();

/** INFO's "k=v k=v" as an object. */
async function info(port: number): Promise<Record<string, string>> {
  const line = await ask(port, 'INFO');
  return Object.fromEntries(line.split(' ').map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
}

async function answers(port: number): Promise<boolean> {
  try {
    return (await ask(port, 'CHECK')).length > 0;
  } catch {
    return false;
  }
}

interface Clone {
  aid: string;
  instance: number;
  cloneMs: number;
  injectedCalls: number;
  ports: { virtual: number; system: number; mode: string }[];
  privateRoot: string;
}

let clones: Clone[] = [];
const ownPort = (c: Clone) => c.ports.find((p) => p.virtual === PORT_ALLOC)!.system;

beforeAll(() => makeTemplfixWorld(world));

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

describe('templates and clones', () => {
  it('runs the template application under rules: REDIR PATH and SET ENV apply from the start', async () => {
    await runTemplfix(sb, 'tpl', world);
    const i = await info(PORT_ALLOC);
    expect(i.home).toBe(join(ROOT, 'home', 'tpl'));
    expect(i.semid).toBe('0');
    expect(i.sem).toBe('7');
    expect(i.shm).toBe('template');
    expect(i.state).toBe('template');
    expect(i.mapped).toBe('template');
    // ROOT/config is redirected to ROOT/instances/tpl/config, empty so far.
    expect(i.config).toBe('-');
    expect(await ask(PORT_ALLOC, 'CHECK')).toBe('OK');
  });

  it('classifies every resource at snapshot, and makes a template that says what cloning does', () => {
    const snap = sb.run(['snapshot', 'tpl', '-o', join(dir, 'snap')]);
    expect(snap.code, snap.stderr).toBe(0);
    const t = sb.run(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'tpl.template'), '--json']);
    expect(t.code, t.stderr).toBe(0);
    const summary = JSON.parse(t.stdout) as { verdicts: { ref: string; kind: string; action: string; reason: string; name: string }[] };
    const by = (ref: string) => summary.verdicts.find((v) => v.ref === ref);
    expect(by(`port:${PORT_ALLOC}`)?.action).toBe('allocate');
    expect(by(`port:${PORT_ALLOC}`)?.reason).toMatch(/^rule templfix\.rules:\d+$/);
    expect(by(`port:${PORT_MUX}`)?.action).toBe('multiplex');
    expect(summary.verdicts.filter((v) => v.ref.startsWith('sem:')).map((v) => v.action)).toEqual(['virtualize']);
    const journal = summary.verdicts.find((v) => v.kind === 'file' && v.name.endsWith('journal.log'));
    expect(journal?.action).toBe('copy-on-write');
    // A file mapped shared and writable: refused without a rule, copied
    // for each clone under this one.
    const mapping = summary.verdicts.find((v) => v.kind === 'memory' && v.name.endsWith('shared.bin'));
    expect(mapping).toMatchObject({ action: 'copy-on-write', reason: expect.stringMatching(/^rule templfix\.rules:\d+$/) });
    expect(summary.verdicts.some((v) => v.kind === 'memory' && v.action === 'copy-on-write')).toBe(true);
    // The template is an image still, and the snapshot's parts are shared.
    expect(readdirSync(join(dir, 'tpl.template')).sort()).toEqual(['image.pb', 'manifest.pb', 'pages.img', 'template.pb']);
  });

  it('says which resource rules match nothing in the snapshot (a PORT rule for a port the application moved from)', () => {
    // The rules it ran with, and three more: a port it does not listen on,
    // a file it does not hold, and a copy-on-write path, which also acts on
    // files opened later (never idle, so not listed).
    const rules = join(dir, 'more.rules');
    const base = readFileSync(world.rules, 'utf8');
    writeFileSync(rules, `${base}\nPORT 6379 ALLOCATE\nFILE "/nowhere/at/all" SHARE\nFILE "/nowhere/else" ON write COPY-ON-WRITE\n`);
    const n = base.split('\n').length;
    const out = join(dir, 'more.template');
    const t = sb.run(['template', 'create', join(dir, 'snap'), '-o', out, '--rules', rules, '--json']);
    expect(t.code, t.stderr).toBe(0);
    const summary = JSON.parse(t.stdout) as { unmatched: { rule: string; text: string }[] };
    expect(summary.unmatched).toEqual([
      { rule: `more.rules:${n + 1}`, text: 'PORT 6379 ALLOCATE' },
      { rule: `more.rules:${n + 2}`, text: 'FILE "/nowhere/at/all" SHARE' },
    ]);
    rmSync(out, { recursive: true, force: true });
    // As a person sees it: a warning each, and the template is made.
    const plain = sb.run(['template', 'create', join(dir, 'snap'), '-o', out, '--rules', rules]);
    expect(plain.code, plain.stderr).toBe(0);
    expect(plain.stderr).toContain(`appshot: warning: rule more.rules:${n + 1} matches nothing in this snapshot: PORT 6379 ALLOCATE\n`);
    expect(plain.stderr).not.toContain('/nowhere/else');
    rmSync(out, { recursive: true, force: true });
  });

  it('names the first 20 rules that match nothing, then counts the rest; --json lists them all (fuzz33 L6)', () => {
    const rules = join(dir, 'idle.rules');
    const idle = Array.from({ length: 1000 }, (_, i) => `PORT ${60000 + i} ALLOCATE`);
    writeFileSync(rules, `${readFileSync(world.rules, 'utf8')}\n${idle.join('\n')}\n`);
    const out = join(dir, 'idle.template');
    const plain = sb.run(['template', 'create', join(dir, 'snap'), '-o', out, '--rules', rules]);
    expect(plain.code, plain.stderr).toBe(0);
    const warnings = plain.stderr.split('\n').filter((l) => l.includes('match'));
    expect(warnings).toHaveLength(21);
    expect(warnings[19]).toMatch(/^appshot: warning: rule idle\.rules:\d+ matches nothing in this snapshot: PORT 60019 ALLOCATE$/);
    expect(warnings[20]).toBe('appshot: warning: ... and 980 more rules that match nothing in this snapshot (all of them: template create --json)');
    rmSync(out, { recursive: true, force: true });
    const json = sb.run(['template', 'create', join(dir, 'snap'), '-o', out, '--rules', rules, '--json']);
    expect(json.code, json.stderr).toBe(0);
    expect((JSON.parse(json.stdout) as { unmatched: unknown[] }).unmatched).toHaveLength(1000);
    rmSync(out, { recursive: true, force: true });
  });

  it(`clones ${CLONES} instances at once, each with its own state, ports, paths and environment`, async () => {
    const r = sb.run(['clone', join(dir, 'tpl.template'), '--aid', 'c', '--count', String(CLONES), '--json']);
    expect(r.code, r.stderr).toBe(0);
    clones = JSON.parse(r.stdout) as Clone[];
    expect(clones.map((c) => c.aid)).toEqual(Array.from({ length: CLONES }, (_, i) => `c-${i + 1}`));
    const own = clones.map(ownPort);
    expect(new Set(own).size).toBe(CLONES);
    for (const c of clones) expect(c.ports.find((p) => p.virtual === PORT_MUX)).toMatchObject({ system: PORT_MUX, mode: 'multiplex' });
    // What each cost in stops of its process (injected calls and batches).
    for (const c of clones) expect(c.injectedCalls).toBeGreaterThan(0);

    for (const c of clones) {
      const i = await info(ownPort(c));
      // Everything the template had, with the instance's own AID where the
      // rules put it.
      expect(i).toMatchObject({ home: join(ROOT, 'home', c.aid), semid: '0', sem: '7', shm: 'template', msgs: '1', state: 'template', config: '-', mapped: 'template', heap: 'ok' });
      expect(await ask(ownPort(c), 'CHECK')).toBe('OK');
    }
    // `appshot port` answers which instance has which port.
    const p = sb.run(['port', 'c-3', String(PORT_ALLOC)]);
    expect(p.code, p.stderr).toBe(0);
    expect(Number(p.stdout.trim())).toBe(ownPort(clones[2]));
  });

  it("runs each clone's last batches from its own preload library, whose table names the clone's process, and leaves no scratch area", () => {
    // Where the library keeps its batch area: a table a batch ran from
    // (16-byte aligned, somewhere in it) starts with its count, then the
    // process and thread it ran in (remote.ts runCalls). A clone's names
    // its own process only if its main thread's batch ran there
    // (moveToResident); otherwise it holds what the template's snapshot
    // left, naming the template's process.
    const lib = fileURLToPath(new URL('../build/Release/appshot_preload.so', import.meta.url));
    const areaOffset = elfSymbol(lib, 'appshot_batch_area')! - firstLoadVaddr(lib);
    const AREA = 256 << 10;
    for (const c of clones) {
      const withLib = sb.json<{ processes: { vpid: number; pid: number }[] }[]>(['ps', c.aid])[0].processes.filter((p) => readFileSync(`/proc/${p.pid}/maps`, 'utf8').includes(lib));
      expect(withLib.length, c.aid).toBeGreaterThan(0);
      for (const { pid } of withLib) {
        const maps = readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n');
        const first = maps.find((l) => l.endsWith(lib) && l.split(/\s+/)[2] === '00000000')!;
        const area = BigInt(`0x${first.split('-')[0]}`) + areaOffset;
        const bytes = Buffer.alloc(AREA);
        const fd = openSync(`/proc/${pid}/mem`, 'r');
        try {
          readSync(fd, bytes, 0, AREA, area);
        } finally {
          closeSync(fd);
        }
        const tables = [];
        for (let at = 0; at + 24 <= AREA; at += 16) {
          const count = bytes.readBigUInt64LE(at);
          if (count > 0n && count < 4096n && bytes.readBigUInt64LE(at + 8) === BigInt(pid) && bytes.readBigUInt64LE(at + 16) === BigInt(pid)) tables.push(at);
        }
        expect(tables.length, `${c.aid}: process ${pid}: a table of its own in its library's batch area`).toBeGreaterThan(0);
        // The scratch area (anonymous, readable, writable and executable)
        // is gone.
        expect(maps.filter((l) => /^\S+ rwxp 00000000 00:00 0\s*$/.test(l)), `${c.aid}: process ${pid}`).toEqual([]);
      }
    }
  });

  it('keeps a write in one clone invisible to the others and to the template', async () => {
    for (const c of clones) expect(await ask(ownPort(c), `SET w${c.instance}`)).toBe('OK');
    for (const c of clones) {
      const i = await info(ownPort(c));
      expect(i).toMatchObject({ sem: String(`w${c.instance}`.length), shm: `w${c.instance}`, msgs: '2', state: `w${c.instance}`, config: `w${c.instance}`, mapped: `w${c.instance}`, heap: 'ok' });
      expect(readFileSync(join(c.privateRoot, ROOT, 'data', 'shared.bin')).subarray(0, 3).toString()).toBe(`w${c.instance}`.padEnd(3, '\0'));
      // The redirected path carries the instance's AID on disk, and so
      // does its working directory (the template's was redirected too).
      expect(readFileSync(join(ROOT, 'instances', c.aid, 'config', 'app.conf'), 'utf8')).toBe(`w${c.instance}\n`);
      expect(readFileSync(join(ROOT, 'instances', c.aid, 'config', 'note.txt'), 'utf8')).toBe(`w${c.instance}\n`);
      // Its journal (open when the template was taken) is its own copy.
      const journal = readFileSync(join(c.privateRoot, ROOT, 'data', 'journal.log'), 'utf8');
      expect(journal).toBe(`start\nset w${c.instance}\n`);
    }
    // The template's files are as they were.
    expect(readFileSync(join(ROOT, 'data', 'state.txt'), 'utf8')).toBe('template\n');
    expect(readFileSync(join(ROOT, 'data', 'journal.log'), 'utf8')).toBe('start\n');
    expect(readFileSync(join(ROOT, 'data', 'shared.bin')).subarray(0, 9).toString()).toBe('template\0');
    expect(readFileSync(join(ROOT, 'config', 'app.conf'), 'utf8')).toBe('template-config\n');
    expect(existsSync(join(ROOT, 'instances', 'tpl', 'config', 'note.txt'))).toBe(false);
    expect(existsSync(join(ROOT, 'config', 'note.txt'))).toBe(false);
    // Same virtual semaphore id, different system objects.
    const semids = clones.map((c) => sb.json<{ tables: Record<string, Entry[]> }>(['table', c.aid]).tables.semid.find((e) => e.virtual === 0)!.system);
    expect(new Set(semids).size).toBe(CLONES);
  });

  it('restores a snapshot of a clone as the same instance: its port, private copies and paths', async () => {
    const c = clones[0];
    const snap = sb.run(['snapshot', c.aid, '-o', join(dir, 'clone.snap')]);
    expect(snap.code, snap.stderr).toBe(0);
    expect(await answers(ownPort(c))).toBe(false);
    const r = sb.run(['restore', join(dir, 'clone.snap')]);
    expect(r.code, r.stderr).toBe(0);
    expect(await info(ownPort(c))).toMatchObject({ home: join(ROOT, 'home', c.aid), sem: '2', state: 'w1', config: 'w1', msgs: '2', heap: 'ok' });
    expect(await ask(ownPort(c), 'SET again')).toBe('OK');
    expect(readFileSync(join(c.privateRoot, ROOT, 'data', 'state.txt'), 'utf8')).toBe('again\n');
    expect(readFileSync(join(ROOT, 'data', 'state.txt'), 'utf8')).toBe('template\n');
    expect(sb.run(['port', c.aid, String(PORT_ALLOC)]).stdout.trim()).toBe(String(ownPort(c)));
  });

  it('spreads connections to the multiplexed port over the instances', async () => {
    const homes = new Set<string>();
    for (let i = 0; i < 48 && homes.size < 3; i++) homes.add((await info(PORT_MUX)).home);
    expect(homes.size).toBeGreaterThan(1);
    for (const h of homes) expect(clones.map((c) => join(ROOT, 'home', c.aid))).toContain(h);
  });

  it('makes a template of a clone: its clones start from what that clone had written', async () => {
    const c = clones[0];
    // A sparse file among its private copies (1 GiB, 4 bytes of data in
    // the middle): copied as root into the template and into every clone,
    // it stays sparse, never written out in full.
    const sparse = join(c.privateRoot, ROOT, 'data', 'sparse.bin');
    const fd = openSync(sparse, 'wx', 0o644);
    writeSync(fd, 'mark', 512 << 20);
    closeSync(fd);
    truncateSync(sparse, 1 << 30);
    // And one preallocated (fallocate: unwritten blocks, which SEEK_DATA
    // takes for a hole): its copies have their blocks too.
    const allocated = join(c.privateRoot, ROOT, 'data', 'allocated.bin');
    expect(spawnSync('fallocate', ['-l', '8M', allocated]).status).toBe(0);
    expect(sb.run(['snapshot', c.aid, '-o', join(dir, 'clone2.snap')]).code).toBe(0);
    const t = sb.run(['template', 'create', join(dir, 'clone2.snap'), '-o', join(dir, 'second.template')]);
    expect(t.code, t.stderr).toBe(0);
    // The template took c-1's private copies as they were: the clones
    // need them no more, even open and mapped ones.
    rmSync(c.privateRoot, { recursive: true, force: true });
    const r = sb.run(['clone', join(dir, 'second.template'), '--aid', 'cc', '--count', '2', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const second = JSON.parse(r.stdout) as Clone[];
    for (const x of second) {
      expect(ownPort(x)).not.toBe(ownPort(c));
      // c-1's memory, SysV objects and private copies; a redirected
      // directory of its own (empty, as every new instance's).
      expect(await info(ownPort(x))).toMatchObject({ home: join(ROOT, 'home', x.aid), sem: '5', shm: 'again', msgs: '3', state: 'again', mapped: 'again', config: '-', heap: 'ok' });
    }
    expect(await ask(ownPort(second[0]), 'SET third')).toBe('OK');
    expect(await info(ownPort(second[0]))).toMatchObject({ state: 'third', mapped: 'third' });
    expect(await info(ownPort(second[1]))).toMatchObject({ state: 'again', mapped: 'again' });
    expect(readFileSync(join(second[0].privateRoot, ROOT, 'data', 'journal.log'), 'utf8')).toBe('start\nset w1\nset again\nset third\n');
    for (const copy of [join(dir, 'second.template', 'private', ROOT, 'data', 'sparse.bin'), join(second[1].privateRoot, ROOT, 'data', 'sparse.bin')]) {
      const st = statSync(copy);
      expect(st.size).toBe(1 << 30);
      expect(st.blocks * 512, `${copy} takes ${st.blocks * 512} bytes`).toBeLessThan(1 << 20);
      const mark = Buffer.alloc(8);
      const f = openSync(copy, 'r');
      readSync(f, mark, 0, 8, (512 << 20) - 2);
      closeSync(f);
      expect(mark).toEqual(Buffer.from('\0\0mark\0\0'));
      const pre = statSync(join(dirname(copy), 'allocated.bin'));
      expect(pre.size).toBe(8 << 20);
      expect(pre.blocks * 512).toBeGreaterThanOrEqual(8 << 20);
    }
    expect(readFileSync(join(ROOT, 'data', 'state.txt'), 'utf8')).toBe('template\n');
    for (const x of second) expect(await ask(ownPort(x), 'CHECK')).toBe('OK');
  });

  it('leaves nothing behind when the clones end: processes, SysV objects, tables, ports', async () => {
    for (const aid of sb.aids()) expect(sb.run(['stop', aid]).code).toBe(0);
    await waitFor(() => sb.aids().length === 0, 10_000, 'the clones to end');
    expect(sb.shmFiles()).toEqual([]);
    expect(strayIpcIds(ipcBefore)).toEqual([]);
    for (const c of clones) expect(await answers(ownPort(c))).toBe(false);
    // Their ports go back to the registry (taken back when it lists).
    expect(sb.run(['ps']).code).toBe(0);
    expect(readdirSync(join(sb.home, 'ports')).filter((p) => /^\d+$/.test(p))).toEqual([]);
  });

  it('sweeps the commit files of drivers long gone, and keeps those of the last minute', async () => {
    // Named as a driver's (PID.START.REQUEST.RANDOM), of a PID above any
    // pid_max: its holder is surely gone.
    const commits = join(sb.home, 'commits');
    const stale = join(commits, '999999999.1.-.0123456789ab');
    const recent = join(commits, '999999999.1.-.ba9876543210');
    writeFileSync(stale, '');
    writeFileSync(recent, '');
    const twoMinutesAgo = new Date(Date.now() - 120_000);
    utimesSync(stale, twoMinutesAgo, twoMinutesAgo);
    // In a process of its own: its first commit sweeps.
    const r = spawnSync(process.execPath, [cli, 'clone', join(dir, 'tpl.template'), '--aid', 'sweeper'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(stale)).toBe(false);
    expect(existsSync(recent)).toBe(true);
    // A batch that fails (its AID is taken) leaves no commit file made
    // ahead for it (made as NAME.pending, renamed at the commit).
    const taken = spawnSync(process.execPath, [cli, 'clone', join(dir, 'tpl.template'), '--aid', 'sweeper'], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8' });
    expect(taken.status).toBe(4);
    expect(readdirSync(commits).filter((n) => n.endsWith('.pending'))).toEqual([]);
    expect(sb.run(['stop', 'sweeper']).code).toBe(0);
    await waitFor(() => sb.aids().length === 0, 10_000, 'the clone to end');
  });
});

describe('templating refusals', () => {
  it('refuses a rules file with a mistake, naming its line and column, and registers nothing', () => {
    const bad = join(dir, 'bad.rules');
    writeFileSync(bad, 'DEFINE <APPL-ID> AS PROPERTY application-id\nPORT 7000 ALLOCATE\nFILE "/srv/x" COPY-ON-WRTIE\n');
    const r = sb.run(['run', '--aid', 'bad', '--rules', bad, '--', '/bin/true']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/bad\.rules:3:15: .*COPY-ON-WRTIE/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(sb.aids()).toEqual([]);
  });

  it('refuses to template what clones cannot share (a FIFO), naming it, and writes nothing', async () => {
    const fifo = join(dir, 'queue.fifo');
    spawnSync('mkfifo', [fifo]);
    const r = sb.run(['run', '-d', '--aid', 'fifo', '--', '/bin/sh', '-c', `exec 3<>${fifo}; echo READY; exec sleep 1000`]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => readFileSync(join(sb.home, 'apps', 'fifo', 'log'), 'utf8').includes('READY'), 10_000, 'the shell');
    expect(sb.run(['snapshot', 'fifo', '-o', join(dir, 'fifo.snap')]).code).toBe(0);
    const t = sb.run(['template', 'create', join(dir, 'fifo.snap'), '-o', join(dir, 'fifo.template')]);
    expect(t.code).toBe(1);
    expect(t.stderr).toContain(fifo);
    expect(existsSync(join(dir, 'fifo.template'))).toBe(false);
    expect(readdirSync(dir).filter((n) => n.includes('partial'))).toEqual([]);
  });

  it('refuses a template whose page data was cut short, and with --verify one whose bytes changed', () => {
    const bad = join(dir, 'bad.template');
    cpSync(join(dir, 'tpl.template'), bad, { recursive: true });
    const pages = join(bad, 'pages.img');
    const size = statSync(pages).size;
    truncateSync(pages, size - 4096);
    const cut = sb.run(['clone', bad, '--aid', 'cut']);
    expect(cut.code).toBe(1);
    expect(cut.stderr).toMatch(/pages\.img is \d+ bytes, expected \d+/);
    truncateSync(pages, size);
    const fd = openSync(pages, 'r+');
    writeSync(fd, Buffer.from([0x5a]), 0, 1, 8192);
    closeSync(fd);
    const flipped = sb.run(['clone', bad, '--aid', 'flipped', '--verify']);
    expect(flipped.code).toBe(1);
    expect(flipped.stderr).toMatch(/checksum of pages\.img does not match/);
    expect(sb.aids().filter((a) => a === 'cut' || a === 'flipped')).toEqual([]);
  });

  it("refuses a clone when the template's page file was replaced after it was opened: the clone maps only the file checked", async () => {
    const switched = join(dir, 'switched.template');
    cpSync(join(dir, 'tpl.template'), switched, { recursive: true });
    const pages = join(switched, 'pages.img');
    // Stopped once the template is opened (its page file checked by its
    // size and owner), before the clone maps it.
    const stopped = await stoppedAt(sb, ['clone', switched, '--aid', 'switched'], 'restore: image read and checked (1 in its chain)', 'the clone to open the template');
    // Another file at its path (here the same bytes, a new inode: what
    // it holds was never looked at).
    copyFileSync(pages, `${pages}.new`);
    renameSync(`${pages}.new`, pages);
    const { code, stderr } = await stopped.go();
    if (sb.aids().includes('switched')) sb.run(['rm', '-f', 'switched']);
    expect(stderr).toMatch(/pages\.img changed since it was checked/);
    expect(code).toBe(1);
    expect(sb.aids().filter((a) => a === 'switched')).toEqual([]);
  });

  it("makes no template of an image whose page file was replaced once it was checked: the template gets the file checked", async () => {
    const snap = join(dir, 'switched.snap');
    cpSync(join(dir, 'snap'), snap, { recursive: true });
    const pages = join(snap, 'pages.img');
    const tpl = join(dir, 'switched-snap.template');
    const stopped = await stoppedAt(sb, ['template', 'create', snap, '-o', tpl], 'image: pages checked', 'the page file to be checked');
    // Another file at its path, one byte changed.
    copyFileSync(pages, `${pages}.new`);
    const fd = openSync(`${pages}.new`, 'r+');
    writeSync(fd, Buffer.from([0x5a]), 0, 1, 8192);
    closeSync(fd);
    renameSync(`${pages}.new`, pages);
    const { code, stderr } = await stopped.go();
    expect(stderr).toMatch(/pages\.img changed since it was checked/);
    expect(code).toBe(1);
    expect(existsSync(tpl)).toBe(false);
  });

  it('stops a batch at Ctrl-C, removing the instances it made (exit 130)', async () => {
    const batch = sb.start(['clone', join(dir, 'tpl.template'), '--aid', 'int', '--count', '100']);
    await waitFor(() => sb.aids().filter((a) => a.startsWith('int-')).length >= 2, 20_000, 'the first instances');
    batch.child.kill('SIGINT');
    const r = await batch.exited;
    expect(r.code, r.stderr).toBe(130);
    // The one being made as Ctrl-C came is given up in its restore, not
    // counted: those made before it, one or more.
    expect(r.stderr).toMatch(/^appshot: interrupted: no instance was left \((the instance made before it was|the \d+ instances made before it were) removed\)$/m);
    await waitFor(() => !sb.aids().some((a) => a.startsWith('int-')), 10_000, 'the instances to go');
    expect(readdirSync(join(sb.home, 'instances')).filter((d) => d.startsWith('int-'))).toEqual([]);
  });

  it('refuses a clone whose AID is taken, leaving no instance of the batch', async () => {
    const r = sb.run(['run', '-d', '--aid', 'taken-2', '--', '/bin/sleep', '1000']);
    expect(r.code, r.stderr).toBe(0);
    const c = sb.run(['clone', join(dir, 'tpl.template'), '--aid', 'taken', '--count', '3']);
    expect(c.code).toBe(4);
    expect(c.stderr).toMatch(/taken-2/);
    await waitFor(() => !sb.aids().includes('taken-1'), 10_000, 'the first instance to be removed');
    expect(sb.aids().filter((a) => a.startsWith('taken-'))).toEqual(['taken-2']);
    // Nothing of taken-1 is left: private copies, redirected directories,
    // port claims.
    expect(readdirSync(join(sb.home, 'instances')).filter((d) => d.startsWith('taken-'))).toEqual([]);
    expect(existsSync(join(ROOT, 'instances', 'taken-1'))).toBe(false);
    const owners = readdirSync(join(sb.home, 'ports'))
      .filter((p) => /^\d+$/.test(p))
      .map((p) => readFileSync(join(sb.home, 'ports', p), 'utf8').split(' ')[0]);
    expect(owners.filter((a) => a.startsWith('taken-'))).toEqual([]);
    sb.run(['stop', 'taken-2', '-s', 'KILL']);
  });
});

describe("a restored or cloned application's environment names it", () => {
  // A sandbox of its own: the applications above are counted by AID.
  const own = new Sandbox();
  afterAll(() => own.dispose());

  /** envids's verdict in `aid`'s log, and its two children (one started
   * by execv, one by a raw execve system call) among `aid`'s processes. */
  async function namesItself(aid: string): Promise<void> {
    await waitFor(() => /^(ENVIDS OK|FAIL)/m.test(own.log(aid)), 15_000, `${aid} to check its environment`);
    const verdict = /^ENVIDS OK aid=(\S+) libc=(\d+) raw=(\d+)$/m.exec(own.log(aid));
    expect(verdict, own.log(aid)).not.toBeNull();
    expect(verdict![1]).toBe(aid);
    const [ps] = own.json<{ processes: { vpid: number; command: string }[] }[]>(['ps', aid, '--json']);
    const children = ps.processes.filter((p) => p.command.endsWith(' child 4')).map((p) => p.vpid);
    expect(children.sort()).toEqual([Number(verdict![2]), Number(verdict![3])].sort());
  }

  it('after a restore under another AID and in each clone: getenv, /proc/PID/environ and the programs it executes', async () => {
    const out = mkdtempSync(join(dir, 'envids-'));
    expect(own.run(['run', '-d', '--aid', 'envsrc', '--', fixture('envids')]).code).toBe(0);
    await waitFor(() => own.log('envsrc').includes('READY aid=envsrc'), 10_000, 'envids to start');
    const snap = own.run(['snapshot', 'envsrc', '-o', join(out, 'snap'), '--leave-running']);
    expect(snap.code, snap.stderr).toBe(0);
    // Beside the source, whose table file still exists: a child started
    // with the old variables would join it.
    const r = own.run(['restore', join(out, 'snap'), '--aid', 'envcopy']);
    expect(r.code, r.stderr).toBe(0);
    await namesItself('envcopy');
    expect(own.log('envsrc')).not.toMatch(/ENVIDS|FAIL/);
    const t = own.run(['template', 'create', join(out, 'snap'), '-o', join(out, 'tpl')]);
    expect(t.code, t.stderr).toBe(0);
    const c = own.run(['clone', join(out, 'tpl'), '--aid', 'envclone', '--count', '2']);
    expect(c.code, c.stderr).toBe(0);
    for (const aid of ['envclone-1', 'envclone-2']) await namesItself(aid);
    const [src] = own.json<{ processes: unknown[] }[]>(['ps', 'envsrc', '--json']);
    expect(src.processes).toHaveLength(2); // its init and envids: no child joined it
    for (const aid of own.aids()) own.run(['stop', aid, '-s', 'KILL']);
  });

  // Each restore gives a new table file, so each rewrites the environment
  // block (environ.ts): one made by an earlier restore, part of the image
  // now, is written again in place, not left behind for a new mapping (an
  // application restored over and over, as serve's scale-to-zero does,
  // grew by one mapping a restore).
  it('restored again and again: getenv and /proc/PID/environ name the new table file, and the mappings stay as many', async () => {
    const out = mkdtempSync(join(dir, 'envagain-'));
    expect(own.run(['run', '-d', '--aid', 'envagain', '--', fixture('envids'), 'again']).code).toBe(0);
    await waitFor(() => own.log('envagain').includes('READY aid=envagain'), 10_000, 'envids to start');
    const counts: number[] = [];
    for (let n = 1; n <= 4; n++) {
      const image = join(out, `snap${n}`);
      const snap = own.run(['snapshot', 'envagain', '-o', image]);
      expect(snap.code, snap.stderr).toBe(0);
      const r = own.run(['restore', image]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(() => new RegExp(`^(AGAIN ${n} OK|FAIL)`, 'm').test(own.log('envagain')), 15_000, `envids to check restore ${n}`);
      const line = new RegExp(`^AGAIN ${n} OK maps=(\\d+)$`, 'm').exec(own.log('envagain'));
      expect(line, own.log('envagain')).not.toBeNull();
      counts.push(Number(line![1]));
    }
    // The first restore maps the block; the later ones add nothing.
    expect(counts.slice(1), `mappings after each restore: ${counts.join(' ')}`).toEqual(counts.slice(1).map(() => counts[0]));
    own.run(['stop', 'envagain', '-s', 'KILL']);
  });

  // A program that owns its environment (php-fpm's master: strings and an
  // array of malloc's, each given back with free() at exit) keeps them:
  // the restore changes its strings where they are. Pointed at a block of
  // appshot's, the restored php-fpm aborted when stopped ("free(): invalid
  // pointer", exit 134).
  it('a program that made its environment its own (malloc) still frees it after a restore, and it names the application', async () => {
    const out = mkdtempSync(join(dir, 'ownenv-'));
    expect(own.run(['run', '-d', '--aid', 'ownenv', '--', fixture('ownenv')]).code).toBe(0);
    await waitFor(() => own.log('ownenv').includes('READY aid=ownenv'), 10_000, 'ownenv to start');
    const snap = own.run(['snapshot', 'ownenv', '-o', join(out, 'snap'), '--leave-running']);
    expect(snap.code, snap.stderr).toBe(0);
    own.run(['stop', 'ownenv', '-s', 'KILL']);
    own.run(['rm', '-f', 'ownenv']);
    // Its own AID (the table path as long as it was), then a shorter one.
    for (const aid of ['ownenv', 'own2']) {
      const r = own.run(['restore', join(out, 'snap'), '--aid', aid]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(() => /^(OWNENV OK|FAIL)/m.test(own.log(aid)), 15_000, `${aid} to check and free its environment`);
      // Its exit status: 0 once it freed all, 134 had free() aborted it.
      const w = own.run(['wait', aid]);
      expect(`${w.stdout.trim()} ${own.log(aid)}`).toMatch(new RegExp(`^0 [^]*OWNENV OK aid=${aid}$`, 'm'));
    }
  });
});
