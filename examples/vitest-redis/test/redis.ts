import { inject } from 'vitest';
import { redisCli } from '../redis-clones.js';

/** This worker's own redis: its port, and redis-cli on it. */
export const port = inject('redisPorts')[Number(process.env.VITEST_POOL_ID ?? 1) - 1];
export const redis = (...commands: string[]) => redisCli(port, commands);
