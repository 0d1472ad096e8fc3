import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  resolve: {
    // The examples import the package by its name; in this repository's
    // tests that is the source of its API.
    alias: { appshot: fileURLToPath(new URL('./src/api.ts', import.meta.url)) },
  },
  test: {
    include: ['test/**/*.test.ts'],
    // A throwaway APPSHOT_HOME for whatever runs without a Sandbox's: never
    // the user's own (test/global-home.ts); kernel.msgmnb given back if a
    // killed test left it lowered (test/global-msgmnb.ts).
    globalSetup: ['test/global-home.ts', 'test/global-msgmnb.ts'],
    // A turn of each worker's event loop between tests (see the file).
    setupFiles: ['test/turn-between-tests.ts'],
    testTimeout: 60_000,
    // A file's afterAll stops every application it left and the engine
    // (Sandbox.dispose: up to ~100 s when the machine is loaded).
    hookTimeout: 120_000,
    pool: 'forks',
    // These tests start real process trees and spend much of their time
    // waiting on them (self-checks, servers, npm), so three files at a
    // time on CI's two cores: a fresh-clone run of the same commit on a
    // quiet machine took 878 s with three, 923 and 956 s with two, every
    // test passing either way (they must hold on a loaded machine).
    maxWorkers: 3,
    minWorkers: 1,
    // Tests of a file that runs its describe blocks beside each other
    // (kinds, pids: test/parallel.ts) start three at a time: most of their
    // time is spent waiting for self-checks, and more would only queue on
    // two cores. A test waits for its turn before its timeout starts.
    maxConcurrency: 3,
  },
});
