/**
 * A SysV shared memory segment removed (shmctl IPC_RMID) while attached:
 * the kernel keeps it until its last detach, marked SHM_DEST, its key
 * private. Carried as it was (resources/sysv.ts): made again, attached by
 * the restored processes, then removed again, so that it goes at their
 * last detach, and no key finds it (test/fixtures/shmdest.c checks each).
 * An image is untrusted: one whose removed segment no process attaches,
 * or that still has a key, is refused in one line, nothing made.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import type { Image } from '../src/image/types.js';
import { writeSignedImage } from './crafted.js';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-shmdest-'));
// This test process signs crafted images as the sandbox's node does.
process.env.APPSHOT_HOME = sb.home;
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/** The system id of an application's segment of virtual id `vid`. */
const systemShmid = (aid: string, vid: number) => sb.json<{ tables: { shmid: { virtual: number; system: number }[] } }>(['table', aid]).tables.shmid.find((e) => e.virtual === vid)?.system;
/** /proc/sysvipc/shm's line of system segment `id`, split, if it exists. */
const segmentLine = (id: number) =>
  readFileSync('/proc/sysvipc/shm', 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)).find((f) => Number(f[1]) === id);
/** The virtual id the fixture printed. */
const shmidOf = (aid: string) => Number(/^SHMID (\d+)$/m.exec(sb.log(aid))![1]);

/** A process's state letter (T stopped, Z zombie...), '' once it is gone. */
function stateOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0];
  } catch {
    return '';
  }
}
/** A process's start time (field 22 of its stat), '' once it is gone. */
function startOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[19];
  } catch {
    return '';
  }
}
/** The children of every thread of a process. */
const childrenOf = (pid: number) =>
  readdirSync(`/proc/${pid}/task`).flatMap((t) => readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number));
/** The system ids of the segments process `pid` created (/proc/sysvipc/shm's cpid). */
const madeBy = (pid: number) =>
  readFileSync('/proc/sysvipc/shm', 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)).filter((f) => f[4] === String(pid)).map((f) => f[1]);

async function stopped(aid: string): Promise<void> {
  sb.ok(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

/** An ending snapshot of the fixture, made once. */
let base: Promise<string> | undefined;
const baseImage = () =>
  (base ??= (async () => {
    sb.ok(['run', '-d', '--aid', 'sdbase', '--', fixture('shmdest')]);
    await sb.checksPass('sdbase', 3);
    sb.ok(['snapshot', 'sdbase', '-o', join(out, 'base')]);
    await waitFor(() => !sb.aids().includes('sdbase'), 10_000, 'sdbase to end');
    return join(out, 'base');
  })());

describe('a SysV segment removed (IPC_RMID) while attached', () => {
  it('comes back removed (SHM_DEST, no key) beside the original left running, and goes at its last detach', async () => {
    sb.ok(['run', '-d', '--aid', 'sd1', '--', fixture('shmdest')]);
    await sb.checksPass('sd1', 3);
    sb.ok(['snapshot', 'sd1', '-o', join(out, 'sd1'), '--leave-running']);
    await sb.checksPass('sd1', 3);
    // Format 6: an older appshot would make it again as a live segment.
    const listing = sb.ok(['inspect', join(out, 'sd1')]);
    expect(listing).toMatch(/\(format 6\)/);
    expect(listing).toMatch(/^shm\s+\d+\s+0x0\s+1600\s+8192 bytes$/m);
    sb.ok(['restore', join(out, 'sd1'), '--aid', 'sd2']);
    // Checked by the copy: SHM_DEST, key private, two attaches, contents,
    // ENOENT by the old key (the original's key is its own, in its tables).
    await sb.checksPass('sd2', 3);
    const copy = systemShmid('sd2', shmidOf('sd1'))!;
    const original = systemShmid('sd1', shmidOf('sd1'))!;
    expect(copy).not.toBe(original);
    expect(segmentLine(copy)?.[2]).toBe('1600');
    // Its child killed, the copy detaches: the kernel frees the segment.
    await sb.exercised('sd2', 'to detach its removed segment');
    await sb.checksPass('sd2', 3);
    expect(segmentLine(copy)).toBeUndefined();
    // Init forgets its virtual id once it is gone.
    await waitFor(() => systemShmid('sd2', shmidOf('sd1')) === undefined, 10_000, "sd2's segment to leave its tables");
    // The original's is its own, untouched.
    await sb.checksPass('sd1', 3);
    await sb.exercised('sd1', 'to detach its removed segment');
    expect(segmentLine(original)).toBeUndefined();
    await stopped('sd1');
    await stopped('sd2');
  });

  // The application's tables name it still (the kernel keeps it for the
  // outside process), but a restore could only make it and see it go.
  it('is left out, named, where only a process outside the application still attaches it', async () => {
    sb.ok(['run', '-d', '--aid', 'sdo', '--', fixture('shmdest'), 'outside']);
    await sb.checksPass('sdo', 3);
    const vid = shmidOf('sdo');
    const system = systemShmid('sdo', vid)!;
    const holder = spawn(fixture('shmdest'), ['hold', String(system)], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.stdout.on('data', (b: Buffer) => /HELD/.test(b.toString()) && resolve());
        holder.on('exit', (code) => reject(new Error(`the holder exited (${code})`)));
      });
      await sb.exercised('sdo', 'to detach and remove its segment');
      expect(segmentLine(system)?.[2]).toBe('1600');
      // Its last attach or detach (lpid), atime and dtime: the snapshot
      // decides from its status line, never attaching it to read it.
      const touched = () => [5, 11, 12].map((f) => segmentLine(system)?.[f]);
      const before = touched();
      const r = sb.run(['snapshot', 'sdo', '-o', join(out, 'sdo')]);
      expect(r.code, r.stderr).toBe(0);
      expect(touched()).toEqual(before);
      expect(r.stderr).toMatch(new RegExp(`^appshot: left out shared memory segment ${system} \\(virtual id ${vid}\\): removed \\(IPC_RMID\\) while attached, and attached by no process of the application$`, 'm'));
      expect(sb.ok(['inspect', join(out, 'sdo')])).not.toMatch(/^shm\s/m);
      // The copy finds no segment by the id; the outside one is untouched.
      sb.ok(['restore', join(out, 'sdo')]);
      await sb.checksPass('sdo', 3);
      expect(segmentLine(system)?.[2]).toBe('1600');
    } finally {
      holder.kill('SIGKILL');
    }
    await waitFor(() => segmentLine(system) === undefined, 10_000, 'the segment to go with its holder');
    await stopped('sdo');
  });

  // SysV objects are virtualized for clones: each clone's processes hold
  // a segment of their own, removed as the template's was, which goes at
  // their last detach and never another clone's.
  it('gives each clone of a template its own removed segment', async () => {
    const from = await baseImage();
    sb.ok(['template', 'create', from, '-o', join(out, 'sd.template')]);
    sb.ok(['clone', join(out, 'sd.template'), '--aid', 'sdc', '--count', '2']);
    for (const aid of ['sdc-1', 'sdc-2']) await sb.checksPass(aid, 3);
    const vid = (await loadImage(from, { trust: 'report' })).image.shmSegments[0].vid;
    const [one, two] = ['sdc-1', 'sdc-2'].map((aid) => systemShmid(aid, vid)!);
    expect(one).not.toBe(two);
    await sb.exercised('sdc-1', 'to detach its removed segment');
    expect(segmentLine(one)).toBeUndefined();
    await sb.checksPass('sdc-2', 3);
    await sb.exercised('sdc-2', 'to detach its removed segment');
    expect(segmentLine(two)).toBeUndefined();
    for (const aid of ['sdc-1', 'sdc-2']) await stopped(aid);
  });

  /** The base image with a change to its metadata, signed again. */
  async function crafted(name: string, change: (image: Image) => void): Promise<string> {
    const from = await baseImage();
    const image = (await loadImage(from, { trust: 'report' })).image;
    change(image);
    return writeSignedImage(join(out, name), image, from, { copyPages: true });
  }

  // The restore makes the segment (private: removed, it has no key) in
  // its own process, then is killed (kill -9) before the commit. Its
  // parent does not reap it (a shell that became `sleep`): while it is a
  // zombie, its PID still names it, and init, reparented away from it,
  // cleans up. The segment is the application's all the same, made by the
  // process that started init: nothing of it may stay.
  it('goes with a restore killed (kill -9) before its commit, the restorer not reaped yet', async () => {
    const from = await baseImage();
    const env = { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: 'restore: mappings checked' };
    const shell = spawn('/bin/sh', ['-c', `"$0" "$@" >/dev/null & echo $!; exec sleep 1000000`, process.execPath, cli, 'restore', from, '--aid', 'sdkill'], { env, stdio: ['ignore', 'pipe', 'inherit'] });
    let restorer = 0;
    try {
      shell.stdout.on('data', (b: Buffer) => (restorer ||= Number(/^(\d+)$/m.exec(b.toString())?.[1] ?? 0)));
      await waitFor(() => restorer > 0 && stateOf(restorer) === 'T', 60_000, 'the restore to stop at its point');
      const init = childrenOf(restorer).find((pid) => readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'appshot-init')!;
      expect(init, 'the restore has started its init').toBeGreaterThan(0);
      const initStart = startOf(init);
      expect(madeBy(restorer).length, 'the restore has made its segment').toBeGreaterThan(0);
      process.kill(restorer, 'SIGKILL');
      await waitFor(() => stateOf(restorer) === 'Z', 10_000, 'the restorer to die');
      await waitFor(() => startOf(init) !== initStart || stateOf(init) === 'Z', 30_000, 'init to clean up and end');
      // Still a zombie: its PID is its own yet.
      expect(stateOf(restorer)).toBe('Z');
      expect(madeBy(restorer)).toEqual([]);
    } finally {
      if (restorer > 0) for (const id of madeBy(restorer)) spawnSync('ipcrm', ['-m', id]);
      shell.kill('SIGKILL');
    }
    // The next command releases its registration.
    await waitFor(() => (sb.run(['ps']), !sb.allAids().includes('sdkill')), 10_000, 'the registration of sdkill to go');
  });

  // In the shape of hostile.test.ts's crafted metadata: refused by inspect
  // and by restore in one line, exit 1, nothing made (the restore runs in
  // the process spawned: no engine, so no segment made by it).
  const cases: [string, (i: Image) => void, string][] = [
    ['a removed segment no process attaches', (i) => i.shmSegments.push({ vid: 77, vkey: 0, mode: 0o600, uid: 0, gid: 0, size: 8192n, cvpid: 2, lvpid: 2, destroyed: true }), 'SysV segment 77 was removed while attached \\(SHM_DEST\\), yet no process of the image attaches it'],
    ['a removed segment with a key', (i) => (i.shmSegments[0].vkey = 0x5de57), 'SysV segment \\d+ was removed while attached \\(SHM_DEST\\), yet carries key 0x5de57'],
  ];
  for (const [what, change, message] of cases)
    it(`refuses ${what}, nothing made`, async () => {
      const dir = await crafted(what.replace(/\W+/g, '-'), change);
      const aidsBefore = sb.aids();
      const shmBefore = sb.shmFiles();
      for (const command of ['inspect', 'restore']) {
        const r = spawnSync(process.execPath, [cli, command, dir], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8', timeout: 50_000 });
        expect(r.stderr).toMatch(new RegExp(`^appshot: [^\\n]*corrupt image: ${message}[^\\n]*\\n$`));
        expect(r.status).toBe(1);
        const madeBy = readFileSync('/proc/sysvipc/shm', 'utf8').split('\n').slice(1).filter((l) => l.trim().split(/\s+/)[4] === String(r.pid));
        expect(madeBy).toEqual([]);
      }
      expect(sb.aids()).toEqual(aidsBefore);
      expect(sb.shmFiles()).toEqual(shmBefore);
    });
});
