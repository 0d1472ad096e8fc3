/**
 * vitest globalSetup: one loaded redis is made into a template and every
 * test worker gets its own clone of it (test/redis.ts finds it).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestProject } from 'vitest/node';
import { startRedisClones } from './redis-clones.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** The port of worker N's redis is at index N - 1 (VITEST_POOL_ID). */
    redisPorts: number[];
  }
}

export const KEYS = 10_000;

export default async function setup(project: TestProject) {
  const dir = mkdtempSync(join(tmpdir(), 'vitest-redis-'));
  const workers = project.globalConfig.maxWorkers;
  const redis = await startRedisClones({
    count: workers,
    dir,
    port: 6390,
    load: Array.from({ length: KEYS }, (_, i) => `SET user:${i} name-${i}`),
  });
  project.provide(
    'redisPorts',
    redis.clones.map((c) => c.port),
  );
  return async () => {
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  };
}
