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
 * restore that checks every chunk computes it. That check (pages_check)
 * hashes groups of up to sixteen chunks side by side too: a chunk changed
 * in the middle of a group of sixteen, or in a shorter group at the end,
 * is named and refused, the lanes used or not (APPSHOT_SHA_LANES=0).
 */
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { cli, fixture, root, Sandbox, usedBytes, withTmpfs } from './helpers.js';
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
  it('are each chunk\'s SHA-256: a restore --verify, which checks every chunk, takes the image of a 16 MiB application, and refuses it with a byte changed in one chunk, naming it, with the lanes and without', async () => {
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
    // A byte changed in the middle of the sixteen whole chunks, which the
    // lanes check side by side (one group, from the front or the back).
    const MiB = 1 << 20;
    const bad = 8;
    const fd = openSync(join(image, 'pages.img'), 'r+');
    try {
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, bad * MiB + 777);
      b[0] ^= 0x01;
      writeSync(fd, b, 0, 1, bad * MiB + 777);
    } finally {
      closeSync(fd);
    }
    for (const lanes of [{}, { APPSHOT_SHA_LANES: '0' }]) {
      const r = spawnSync(process.execPath, [cli, 'restore', image, '--verify', '--aid', `${aid}-bad`], { env: { ...sb.env, APPSHOT_ENGINE: 'off', ...lanes }, encoding: 'utf8', timeout: 50_000 });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot restore .*: corrupt image: checksum of pages.img does not match its manifest \\(chunk ${bad}, bytes ${bad * MiB}-${(bad + 1) * MiB - 1}\\)$`))]);
      expect(sb.aids()).not.toContain(`${aid}-bad`);
    }
  });
});

describe("a restore's check of the chunks, sixteen side by side", () => {
  const dir = scratchDir('appshot-pagecheck-');
  const MiB = 1 << 20;

  /** The check of `file` against `table` by `threads` threads, the lanes
   * allowed or not (the addon reads APPSHOT_SHA_LANES when a check
   * starts; `threads` 0: one per core): its verdict and how many chunks
   * the lanes found good. */
  function check(file: string, table: Buffer, threads: number, lanes: boolean) {
    const saved = process.env.APPSHOT_SHA_LANES;
    if (lanes) delete process.env.APPSHOT_SHA_LANES;
    else process.env.APPSHOT_SHA_LANES = '0';
    const fd = openSync(file, 'r');
    try {
      const c = new (addon().PagesCheck)(fd, statSync(file).size, MiB, table, threads || undefined);
      const verdict = c.wait(-1);
      const byLanes = c.byLanes();
      c.stop();
      return { ...verdict, byLanes };
    } finally {
      closeSync(fd);
      if (saved === undefined) delete process.env.APPSHOT_SHA_LANES;
      else process.env.APPSHOT_SHA_LANES = saved;
    }
  }

  // 26 whole chunks and a short one. One thread takes groups from the
  // first chunk: 0-15, then 16-25 (ten: a shorter group, still side by
  // side), then the short one alone.
  const bytes = randomBytes(26 * MiB + 4096);
  const table = Buffer.concat(Array.from({ length: 27 }, (_, i) => createHash('sha256').update(bytes.subarray(i * MiB, (i + 1) * MiB)).digest()));
  // Where the CPU has AVX-512 F and BW, and so runs the lanes (their
  // self-test against OpenSSL passes).
  const flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1].split(' ') ?? [];
  const lanesHere = flags.includes('avx512f') && flags.includes('avx512bw');

  it('names the one chunk changed, in the middle of a group of sixteen or in the shorter last group, with the lanes and without', () => {
    const file = join(dir, 'pages.img');
    writeFileSync(file, bytes);
    const good = check(file, table, 1, true);
    expect(good.state).toBe('good');
    // Every whole chunk by the lanes, where they run.
    expect(good.byLanes).toBe(lanesHere ? 26 : 0);
    expect(check(file, table, 1, false)).toEqual({ state: 'good', chunk: -1, errno: 0, byLanes: 0 });
    for (const bad of [7, 21]) {
      const changed = Buffer.from(bytes);
      changed[bad * MiB + 12345] ^= 0x10;
      writeFileSync(file, changed);
      for (const lanes of [true, false]) {
        // One thread (the groups as above) and one per core (the first
        // thread's groups from the front, the others' from the back).
        for (const threads of [1, 0]) expect(check(file, table, threads, lanes), `chunk ${bad}, lanes ${lanes}, threads ${threads}`).toMatchObject({ state: 'bad', chunk: bad, errno: 0 });
      }
    }
  });

  it('names the first chunk it cannot read, not the first of its group, with the lanes and without', () => {
    // The file as above, its size and table those of 27 whole chunks:
    // chunk 26, the last, ends early. Groups of one thread: 16-26; of one
    // per core: from 26 down.
    const file = join(dir, 'pages-short.img');
    writeFileSync(file, bytes);
    const longer = Buffer.concat([table.subarray(0, 26 * 32), createHash('sha256').update(Buffer.alloc(MiB)).digest()]);
    for (const lanes of [true, false])
      for (const threads of [1, 0]) {
        const saved = process.env.APPSHOT_SHA_LANES;
        if (lanes) delete process.env.APPSHOT_SHA_LANES;
        else process.env.APPSHOT_SHA_LANES = '0';
        const fd = openSync(file, 'r');
        try {
          const c = new (addon().PagesCheck)(fd, 27 * MiB, MiB, longer, threads || undefined);
          expect(c.wait(-1), `lanes ${lanes}, threads ${threads}`).toEqual({ state: 'bad', chunk: 26, errno: 5 /* EIO */ });
          c.stop();
        } finally {
          closeSync(fd);
          if (saved === undefined) delete process.env.APPSHOT_SHA_LANES;
          else process.env.APPSHOT_SHA_LANES = saved;
        }
      }
  });

  it('takes a chunk wholly in a hole of a sparse file as zeros: good where its digest is that of zeros, refused by name where it is not, with the lanes and without', () => {
    // Chunks 0 and 19 written, 1-18 a hole (not read: compared with the
    // digest of a chunk of zeros), a short last one written.
    const file = join(dir, 'pages-holes.img');
    const first = randomBytes(MiB);
    const last = randomBytes(MiB);
    const tail = randomBytes(4096);
    const fd = openSync(file, 'w');
    try {
      writeSync(fd, first, 0, MiB, 0);
      writeSync(fd, last, 0, MiB, 19 * MiB);
      writeSync(fd, tail, 0, 4096, 20 * MiB);
    } finally {
      closeSync(fd);
    }
    const sha = (b: Buffer) => createHash('sha256').update(b).digest();
    const zeros = sha(Buffer.alloc(MiB));
    const sparseTable = Buffer.concat([sha(first), ...Array.from({ length: 18 }, () => zeros), sha(last), sha(tail)]);
    const wrong = Buffer.from(sparseTable);
    wrong[9 * 32 + 5] ^= 0x01;
    for (const lanes of [true, false])
      for (const threads of [1, 0]) {
        expect(check(file, sparseTable, threads, lanes), `lanes ${lanes}, threads ${threads}`).toMatchObject({ state: 'good', chunk: -1, errno: 0 });
        expect(check(file, wrong, threads, lanes), `lanes ${lanes}, threads ${threads}`).toMatchObject({ state: 'bad', chunk: 9, errno: 0 });
      }
  });

  it.skipIf(!lanesHere)('takes OpenSSL\'s word over the lanes\': once they get a chunk wrong, every chunk they passed is checked again, none is refused on their word alone, and the process uses them no more', () => {
    // Faults of the lanes' made up (APPSHOT_TEST_LANES_*), in a process
    // of its own (once found wrong, the lanes are used there no more):
    // chunk 5, changed, passes them; chunk 3, whole, does not. Both are in
    // the first group: 3 is refused by neither, 5 by OpenSSL once the
    // lanes are found wrong.
    const bad = join(dir, 'pages-fault.img');
    const good = join(dir, 'pages-good.img');
    const changed = Buffer.from(bytes);
    changed[5 * MiB + 99] ^= 0x04;
    writeFileSync(bad, changed);
    writeFileSync(good, bytes);
    const script = `
      import { openSync } from 'node:fs';
      const { addon } = await import(${JSON.stringify(join(root, 'dist', 'native.js'))});
      const table = Buffer.from(process.argv[1], 'hex');
      const check = (file) => {
        const c = new (addon().PagesCheck)(openSync(file, 'r'), ${bytes.length}, ${MiB}, table, 1);
        const v = c.wait(-1);
        const r = { state: v.state, chunk: v.chunk, byLanes: c.byLanes() };
        c.stop();
        return r;
      };
      const first = check(${JSON.stringify(bad)});
      delete process.env.APPSHOT_TEST_LANES_WRONG;
      delete process.env.APPSHOT_TEST_LANES_PASS;
      console.log(JSON.stringify([first, check(${JSON.stringify(good)})]));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, table.toString('hex')], { env: { ...process.env, APPSHOT_SHA_LANES: '', APPSHOT_TEST_KNOBS: '1', APPSHOT_TEST_LANES_WRONG: '3', APPSHOT_TEST_LANES_PASS: '5' }, encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([
      { state: 'bad', chunk: 5, byLanes: 0 },
      // The faults gone, the lanes are not used again.
      { state: 'good', chunk: -1, byLanes: 0 },
    ]);
  });

  it.skipIf(!lanesHere)('tells a restore\'s progress each byte once, the chunks checked again after the lanes are found wrong not told twice', () => {
    // 64 MiB, one thread: four groups of sixteen; the lanes found wrong in
    // the last (APPSHOT_TEST_LANES_WRONG=60), once the first three were
    // counted, which are then checked again. Before, the bytes told came
    // to 83-111 MiB in four runs (equal only if the progress is never
    // looked at between the first group and the last).
    const n = 64;
    const big = randomBytes(n * MiB);
    const bigTable = Buffer.concat(Array.from({ length: n }, (_, i) => createHash('sha256').update(big.subarray(i * MiB, (i + 1) * MiB)).digest()));
    const file = join(dir, 'pages-progress.img');
    writeFileSync(file, big);
    const script = `
      import { openSync } from 'node:fs';
      const { addon } = await import(${JSON.stringify(join(root, 'dist', 'native.js'))});
      const { awaitPagesCheck } = await import(${JSON.stringify(join(root, 'dist', 'image', 'format.js'))});
      const c = new (addon().PagesCheck)(openSync(${JSON.stringify(file)}, 'r'), ${n * MiB}, ${MiB}, Buffer.from(process.argv[1], 'hex'), 1);
      let told = 0;
      await awaitPagesCheck(c, ${MiB}, (k) => { told += k; });
      c.stop();
      console.log(JSON.stringify({ told }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, bigTable.toString('hex')], { env: { ...process.env, APPSHOT_SHA_LANES: '', APPSHOT_TEST_KNOBS: '1', APPSHOT_TEST_LANES_WRONG: '60' }, encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ told: n * MiB });
  });

  it.skipIf(!lanesHere)('fails closed when APPSHOT_TEST_LANES_PASS made the lanes pass a chunk and they were not then found wrong, and ignores it in a process not started with test knobs on', () => {
    // The hook alone (no APPSHOT_TEST_LANES_WRONG, so the lanes are never
    // found wrong and this process may go on using them): chunk 3, changed,
    // passes the lanes; the check refuses, naming it, rather than say good.
    // In a process of its own: the knobs count only where the process was
    // started with APPSHOT_TEST_KNOBS=1 (review r372, finding 2: the
    // engine takes each client's APPSHOT_* variables into its environment).
    const file = join(dir, 'pages-pass.img');
    const changed = Buffer.from(bytes);
    changed[3 * MiB + 4321] ^= 0x01;
    writeFileSync(file, changed);
    const script = `
      import { openSync, statSync } from 'node:fs';
      const { addon } = await import(${JSON.stringify(join(root, 'dist', 'native.js'))});
      const table = Buffer.from(process.argv[1], 'hex');
      // Set after the start too, as the engine sets a command's variables.
      process.env.APPSHOT_TEST_LANES_PASS = '3';
      const c = new (addon().PagesCheck)(openSync(${JSON.stringify(file)}, 'r'), statSync(${JSON.stringify(file)}).size, ${MiB}, table, 1);
      const v = c.wait(-1);
      console.log(JSON.stringify({ ...v, byLanes: c.byLanes() }));
      c.stop();`;
    const run = (knobs: Record<string, string>) => {
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, table.toString('hex')], { env: { ...process.env, APPSHOT_SHA_LANES: '', APPSHOT_TEST_KNOBS: '', APPSHOT_TEST_LANES_PASS: '3', ...knobs }, encoding: 'utf8', timeout: 30_000 });
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { state: string; chunk: number; errno: number; byLanes: number };
    };
    expect(run({ APPSHOT_TEST_KNOBS: '1' })).toEqual({ state: 'bad', chunk: 3, errno: 131 /* ENOTRECOVERABLE */, byLanes: 26 });
    // Knobs off: the hook does nothing, and the lanes refuse chunk 3 on
    // their own comparison.
    expect(run({})).toMatchObject({ state: 'bad', chunk: 3, errno: 0 });
  });

  it.skipIf(!lanesHere)('once another check of the process finds the lanes wrong, a check whose threads had all ended with chunks on their word checks those chunks again before it calls them good', () => {
    // Check A, of a file with chunk 3 changed, the lanes made to pass it
    // (APPSHOT_TEST_LANES_PASS=3): its one thread ends with every whole
    // chunk by the lanes, before A is waited for. Check B, of the good
    // file, finds the lanes wrong (APPSHOT_TEST_LANES_WRONG=10). A, then
    // waited for, must not say good: chunk 3 checked with OpenSSL is bad.
    const bad = join(dir, 'pages-fault3.img');
    const good = join(dir, 'pages-good2.img');
    const changed = Buffer.from(bytes);
    changed[3 * MiB + 777] ^= 0x20;
    writeFileSync(bad, changed);
    writeFileSync(good, bytes);
    const script = `
      import { openSync } from 'node:fs';
      const { addon } = await import(${JSON.stringify(join(root, 'dist', 'native.js'))});
      const table = Buffer.from(process.argv[1], 'hex');
      const start = (file) => new (addon().PagesCheck)(openSync(file, 'r'), ${bytes.length}, ${MiB}, table, 1);
      /** A's verdict, waited for 20 ms at a time (as a restore does), for
       * at most 20 s: a check left with no thread would never end. */
      const verdict = (c) => {
        for (let t = 0; t < 1000; t++) {
          const v = c.wait(20);
          if (v.state !== 'pending') return { state: v.state, chunk: v.chunk };
        }
        return { state: 'pending' };
      };
      process.env.APPSHOT_TEST_LANES_PASS = '3';
      const a = start(${JSON.stringify(bad)});
      delete process.env.APPSHOT_TEST_LANES_PASS;
      // A's thread done with every chunk (checked() counts the bytes).
      while (a.checked() < ${bytes.length}) await new Promise((resolve) => setTimeout(resolve, 5));
      const aLanes = a.byLanes();
      process.env.APPSHOT_TEST_LANES_WRONG = '10';
      const b = start(${JSON.stringify(good)});
      delete process.env.APPSHOT_TEST_LANES_WRONG;
      const vb = verdict(b);
      b.stop();
      const va = verdict(a);
      a.stop();
      console.log(JSON.stringify({ aLanes, b: vb, a: va }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, table.toString('hex')], { env: { ...process.env, APPSHOT_SHA_LANES: '', APPSHOT_TEST_KNOBS: '1' }, encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ aLanes: 26, b: { state: 'good', chunk: -1 }, a: { state: 'bad', chunk: 3 } });
  });
});
