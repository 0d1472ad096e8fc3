/* The resident engine's spare state directories (registry.ts
 * enableSpareStateDirs), against what the engine's other threads do
 * meanwhile: whether a registration takes a spare depends on the umask,
 * and reading it must not change it. */
import { Worker } from 'node:worker_threads';
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { enableSpareStateDirs, LocalRegistry, removeSpareStateDirs } from '../src/registry.js';
import { type RequestContext, requestStorage } from '../src/engine/request.js';
import { Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

/** A request of the engine's, as its gate runs a command: under `umask`. */
const request = (umask: number): RequestContext => ({
  write: () => {},
  tty: { stdout: false, stderr: false },
  trustImages: false,
  onDisconnect: new Set(),
  disconnected: false,
  umask,
});

describe('spare state directories', () => {
  // process.umask() without an argument sets the umask to 0 and back (Node
  // has no other way to read it): a file another thread creates in
  // between (the engine's file system pool: spares, leases, commit files,
  // a concurrent command's image) gets the mode it asked for, unmasked,
  // writable by everyone.
  it('are chosen by the umask without the umask being written: files other threads create meanwhile keep it', async () => {
    const before = process.umask(0o077);
    const made = mkdtempSync(join(sb.home, 'made-'));
    const reg = new LocalRegistry(sb.home);
    const sparesDir = join(sb.home, 'engine', 'spares');
    const stop = new Int32Array(new SharedArrayBuffer(4));
    // Creates files (asking 0666) until told to stop; counts those that
    // came out writable by group or others.
    const worker = new Worker(
      `const { openSync, fstatSync, closeSync, unlinkSync } = require('node:fs');
       const { workerData, parentPort } = require('node:worker_threads');
       const stop = new Int32Array(workerData.stop);
       let made = 0, wide = 0;
       while (!Atomics.load(stop, 0)) {
         const path = workerData.dir + '/f' + (made % 64);
         const fd = openSync(path, 'w', 0o666);
         if (fstatSync(fd).mode & 0o022) wide++;
         closeSync(fd);
         unlinkSync(path);
         made++;
       }
       parentPort.postMessage({ made, wide });`,
      { eval: true, workerData: { dir: made, stop: stop.buffer } },
    );
    const result = new Promise<{ made: number; wide: number }>((ok, fail) => {
      worker.once('message', ok);
      worker.once('error', fail);
    });
    try {
      // Spares made under umask 077 (0700 and 0600): a registration under
      // 022 looks at them (its umask read), takes none, and they stay.
      enableSpareStateDirs(sb.home);
      await waitFor(() => existsSync(sparesDir) && readdirSync(sparesDir).filter((n) => existsSync(join(sparesDir, n, 'app.json'))).length >= 2, 10_000, 'two spare state directories');
      await new Promise((r) => setTimeout(r, 50));
      process.umask(0o022);
      const fill = () => ({ command: ['none'], cwd: '/', createdAt: new Date().toISOString(), detached: true, harnessPid: process.pid });
      const held = requestStorage.run(request(0o022), () => reg.register('held', fill));
      // Each refused registration of a taken AID looks at the spares first.
      let tries = 0;
      for (const until = Date.now() + 4000; Date.now() < until; tries++)
        expect(() => requestStorage.run(request(0o022), () => reg.register('held', fill))).toThrow(/already registered/);
      reg.remove(held);
      // Not taken (their modes are not 022's), so looked at on every try.
      expect(readdirSync(sparesDir)).toHaveLength(2);
      Atomics.store(stop, 0, 1);
      const { made: files, wide } = await result;
      expect(tries).toBeGreaterThan(100);
      expect(files).toBeGreaterThan(100);
      expect(wide, `files made with umask 022 by another thread, of ${files}, during ${tries} registrations`).toBe(0);
    } finally {
      Atomics.store(stop, 0, 1);
      await worker.terminate();
      removeSpareStateDirs(sb.home);
      process.umask(before);
    }
  });
});
