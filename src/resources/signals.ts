/**
 * Signals of a process: its handlers (read with rt_sigaction run inside the
 * process: /proc shows only which are caught) and the process-wide queue of
 * pending signals. Masks and per-thread queues are the threads' (threads.ts).
 */
import { readFileSync } from 'node:fs';
import { addon } from '../native.js';
import type { SigAction } from '../image/types.js';
import { type Injector, NR } from '../snapshot/inject.js';

const SIGKILL = 9;
const SIGSTOP = 19;
const NSIG = 64;

/** Signals whose disposition is not the default (SigCgt | SigIgn): only
 * those are asked for, one injected call each. */
function nonDefault(pid: number): bigint {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => BigInt('0x' + (new RegExp(`^${name}:\\s+([0-9a-f]+)`, 'm').exec(status)?.[1] ?? '0'));
  return field('SigCgt') | field('SigIgn');
}

export function dumpSigactions(pid: number, inj: Injector): SigAction[] {
  const out: SigAction[] = [];
  const wanted = nonDefault(pid);
  for (let sig = 1; sig <= NSIG; sig++) {
    if (sig === SIGKILL || sig === SIGSTOP || !(wanted & (1n << BigInt(sig - 1)))) continue;
    const { ret, out: act } = inj.callOut(NR.rt_sigaction, [sig, 0, 'out', 8], 32);
    if (ret !== 0n) continue; // 32 and 33 belong to glibc and may refuse
    const handler = act.readBigUInt64LE(0);
    const flags = act.readBigUInt64LE(8);
    const mask = act.readBigUInt64LE(24);
    // SIG_DFL with nothing else set is what a restore starts with anyway.
    if (handler === 0n && flags === 0n && mask === 0n) continue;
    out.push({ signal: sig, handler, flags, restorer: act.readBigUInt64LE(16), mask });
  }
  return out;
}

export function dumpSharedPending(tid: number): Buffer {
  return addon().peekSiginfo(tid, true);
}
