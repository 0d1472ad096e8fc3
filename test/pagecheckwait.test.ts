/**
 * A restore copies a chunk of the page file only once its check
 * (pages_check, format 3) has found it good, and waits for that check
 * without holding the resident engine's only JavaScript thread: the engine
 * answers its other clients meanwhile (review r363 #7: a crafted image
 * with its stored pages in the middle of a large hole held every client,
 * `engine status` too, until the check got there). The check is held
 * here by a test knob (APPSHOT_TEST_CHECK_HOLD: no chunk is taken while
 * its file exists), so that the order of events, not a duration, says
 * the engine answered while the restore waited.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, mkdirSync, openSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadImage } from '../src/image/format.js';
import { writeSignedImage } from './crafted.js';
import { cli, fixture, Sandbox, waitFor } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

/** Bytes of the hole the page file is given (a sparse file: no disk). */
const HOLE = 256 << 20;

describe('a restore waiting for the check of its page data', () => {
  const dir = scratchDir('appshot-pagecheckwait-');
  let restore: ChildProcess | undefined;
  afterAll(() => {
    if (restore?.exitCode === null) restore.kill('SIGKILL');
  });

  it('an image whose page file has a large hole, its stored pages in the middle of it: `engine status` answers while the restore waits for their check, and the restore then ends with the application whole', async () => {
    const aid = 'pcw';
    // Test knobs count only in an engine started with them on (pages.c
    // test_knob): each command's APPSHOT_* variables reach its environment.
    const started = spawnSync(process.execPath, [cli, 'engine', 'start'], { env: { ...sb.env, APPSHOT_TEST_KNOBS: '1' }, encoding: 'utf8', timeout: 50_000 });
    expect(started.status, started.stderr).toBe(0);
    // Mappings that check their bytes over and over, none shared: the
    // pages of shared memory are copied another way (context.ts
    // copyPages), which still waits for their check on the event loop.
    const files = join(dir, 'files');
    mkdirSync(files);
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('memodds'), files]);
    await sb.checksPass(aid, 2);
    const taken = join(dir, 'taken');
    sb.ok(['snapshot', aid, '-o', taken]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);

    // Its largest run of stored pages moved past a hole of HOLE bytes,
    // into the middle of the page file; the image signed again.
    const loaded = await loadImage(taken, { trust: 'report' });
    const image = loaded.image;
    loaded.dispose();
    const stored = (v: { pages?: { runs: number[] } }) => (v.pages?.runs ?? []).reduce((sum, x, k) => (k % 2 ? sum + x : sum), 0) * 4096;
    const vma = image.processes.flatMap((p) => p.vmas).reduce((a, b) => (stored(b) > stored(a) ? b : a));
    const bytes = stored(vma);
    expect(bytes).toBeGreaterThan(0);
    const pagesDir = join(dir, 'pages');
    mkdirSync(pagesDir);
    const pages = join(pagesDir, 'pages.img');
    copyFileSync(join(taken, 'pages.img'), pages);
    const before = statSync(pages).size;
    const at = Math.ceil(before / 4096) * 4096 + HOLE / 2;
    truncateSync(pages, at + HOLE / 2);
    const data = Buffer.alloc(bytes);
    const from = openSync(join(taken, 'pages.img'), 'r');
    const to = openSync(pages, 'r+');
    try {
      expect(readSync(from, data, 0, bytes, Number(vma.pages!.offset))).toBe(bytes);
      expect(writeSync(to, data, 0, bytes, at)).toBe(bytes);
    } finally {
      closeSync(from);
      closeSync(to);
    }
    vma.pages!.offset = BigInt(at);
    const crafted = writeSignedImage(join(dir, 'crafted'), image, pagesDir, { signer: sb.home });

    // Held: the restore (served by the engine) must wait for the check.
    const hold = join(dir, 'hold');
    writeFileSync(hold, '');
    restore = spawn(process.execPath, [cli, 'restore', crafted, '--verify'], { env: { ...sb.env, APPSHOT_TEST_CHECK_HOLD: hold, APPSHOT_DEBUG: '1' } });
    let stderr = '';
    restore.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number | null>((resolve) => restore!.on('close', (code) => resolve(code)));
    await waitFor(() => /page data waits for the check of page file 0/.test(stderr) || restore!.exitCode !== null, 50_000, 'the restore to wait for the check of its page data').catch((e: Error) => {
      throw new Error(`${e.message}; its stderr: ${stderr}`);
    });
    expect(restore.exitCode, stderr).toBe(null);

    // The engine answers, running the restore still waiting: the check
    // is held, so the restore cannot have ended.
    const status = await sb.runAsync(['engine', 'status', '--json']);
    expect(status.code, status.stderr).toBe(0);
    expect((JSON.parse(status.stdout) as { commandsRunning: number }).commandsRunning).toBeGreaterThanOrEqual(1);
    expect(restore.exitCode).toBe(null);

    rmSync(hold);
    expect(await exited, stderr).toBe(0);
    await sb.checksPass(aid, 3);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});
