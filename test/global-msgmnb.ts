/**
 * vitest globalSetup: kernel.msgmnb given back. hostile-sysv.test.ts
 * lowers it, the machine's, around one restore, and keeps the value it
 * had in MSGMNB_WAS meanwhile (review r399 L4). A worker killed in that
 * window would leave it lowered for good: this run's teardown gives it
 * back, and where the whole run was killed, the next run's setup does.
 */
import { existsSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** kernel.msgmnb as it was before a test lowered it; absent otherwise. */
export const MSGMNB_WAS = join(tmpdir(), 'appshot-test-msgmnb-was');

function giveBack(): void {
  if (!existsSync(MSGMNB_WAS)) return;
  const was = readFileSync(MSGMNB_WAS, 'utf8').trim();
  if (/^\d+$/.test(was)) writeFileSync('/proc/sys/kernel/msgmnb', was);
  unlinkSync(MSGMNB_WAS);
}

export default function setup(): () => void {
  giveBack();
  return giveBack;
}
