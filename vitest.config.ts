import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    // These tests start real process trees; two files at a time suits the
    // two cores CI has.
    maxWorkers: 2,
    minWorkers: 1,
  },
});
