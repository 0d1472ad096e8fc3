/**
 * The page file of a --leave-running snapshot with copy-on-write capture
 * (driver.ts): no zeros written ahead for memory read after the resume;
 * asked for, written with O_DIRECT when little is read frozen
 * (APPSHOT_PAGES_DIRECT=auto) or sent to the disk while the copies are
 * read (APPSHOT_PAGES_FLUSH_AHEAD=1, pw_flush_start). Every way of writing it ends in
 * an image that restores whole, and a file system full halfway fails the
 * snapshot with one line, nothing left on it, the application running on.
 * The chunk table the writer's threads hash (sixteen chunks side by side
 * where the CPU has AVX-512, sha256x16.c) holds each chunk's SHA-256, as a
 * restore that checks every chunk computes it.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { cli, fixture, Sandbox, usedBytes, withTmpfs } from './helpers.js';
import { scratchDir } from './scratch.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

describe('the page file of a --leave-running snapshot read from copies', () => {
  const dir = scratchDir('appshot-pagewrite-');
  // O_DIRECT and the flusher only when asked for (review 244: neither
  // shortened the wall at a low load).
  const ways = { direct: { APPSHOT_PAGES_DIRECT: 'auto' }, 'page cache': {}, 'page cache, flushed ahead': { APPSHOT_PAGES_FLUSH_AHEAD: '1' } } as Record<string, Record<string, string>>;
  const snapshot = (aid: string, out: string, env: Record<string, string>) =>
    spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', out, '--leave-running', '--json'], { env: { ...sb.env, APPSHOT_ENGINE: 'off', ...env }, encoding: 'utf8', timeout: 50_000 });

  for (const [way, env] of Object.entries(ways)) {
    it(`(${way}) fails on a full file system with one line and nothing left, the application untouched; with room, restores whole`, async () => {
      const aid = `pw-${way.replace(/[^a-z]/g, '')}`;
      // One process, 8 MiB of its own: read from a copy (above
      // CowCapture's 1 MiB), and more than the 4 MiB file system takes.
      sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '8']);
      await sb.checksPass(aid, 2);
      const small = join(dir, `${aid}-fs`);
      mkdirSync(small);
      await withTmpfs(small, 'size=4m,mode=0700', () => {
        const r = snapshot(aid, join(small, 'img'), env);
        expect(r.status, r.stderr).toBe(1);
        expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot snapshot '${aid}': .*No space left on device.*; the application was left running$`))]);
        expect(readdirSync(small)).toEqual([]);
        // Not even an unnamed file holds its blocks.
        expect(usedBytes(small)).toBe(0);
      });
      await sb.checksPass(aid, 3);
      expect(readFileSync(`/proc/${sb.systemPid(aid)}/status`, 'utf8')).toMatch(/^TracerPid:\s+0$/m);
      // Where there is room: read from its copy, and whole; written with
      // O_DIRECT, the page file left no page cache behind.
      const image = join(dir, `${aid}.img`);
      const ok = snapshot(aid, image, env);
      expect(ok.status, ok.stderr).toBe(0);
      expect((JSON.parse(ok.stdout) as Json).cowCapture).toEqual({ copied: 1, frozen: [] });
      const cached = spawnSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', join(image, 'pages.img')], { encoding: 'utf8' });
      expect(cached.status, cached.stderr).toBe(0);
      if (way === 'direct') expect(Number(cached.stdout.trim())).toBeLessThan(1 << 20);
      else expect(Number(cached.stdout.trim())).toBeGreaterThanOrEqual(8 << 20);
      sb.ok(['restore', image, '--aid', `${aid}-r`]);
      await sb.checksPass(`${aid}-r`, 3);
      await sb.checksPass(aid, 2);
      expect(sb.run(['rm', '-f', aid, `${aid}-r`]).code).toBe(0);
    });
  }
});

describe("the page file's chunk digests", () => {
  const dir = scratchDir('appshot-pagedigests-');
  it('are each chunk\'s SHA-256: a restore --verify, which checks every chunk, takes the image of a 16 MiB application', async () => {
    // 16 MiB of its own and a little more: sixteen whole chunks, hashed
    // side by side where the CPU has AVX-512, and a short one alone. A
    // restore from the state directory that wrote the image would trust
    // its table unchecked (written.ts): --verify checks each chunk.
    const aid = 'pw-digests';
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('cowcapture'), '16']);
    await sb.checksPass(aid, 2);
    const image = join(dir, `${aid}.img`);
    sb.ok(['snapshot', aid, '-o', image]);
    sb.ok(['restore', image, '--verify']);
    await sb.checksPass(aid, 3);
    expect(sb.run(['rm', '-f', aid]).code).toBe(0);
  });
});
