// A test's temporary directory, made and removed by vitest's hooks. Apart
// from helpers.ts, which the global setup imports (where vitest's hooks
// cannot be).
import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll } from 'vitest';

/** A temporary directory for the describe block (or file) it is called
 * in: made before the block's first test and removed after its last, so
 * that a run which filters the block out (-t) leaves nothing behind, as a
 * mkdtempSync at collection, whose afterAll never runs then, did. */
export function scratchDir(prefix: string): string {
  const path = join(tmpdir(), `${prefix}${process.pid}-${randomBytes(4).toString('hex')}`);
  beforeAll(() => mkdirSync(path, { mode: 0o700 }));
  afterAll(() => rmSync(path, { recursive: true, force: true }));
  return path;
}

