/**
 * eventfd: its whole state is a 64-bit counter and the semaphore flag,
 * both shown in /proc/PID/fdinfo. Made in appshot's process and handed
 * over; descriptors that share one (dup'd, inherited) share it again.
 */
import { writeSync } from 'node:fs';
import type { Fd, Process } from '../image/types.js';
import { addon } from '../native.js';
import type { RestoreContext } from './context.js';

/** The counter ("eventfd-count:" in hex) and the semaphore flag. */
export function dumpEventfd(fdinfo: Map<string, string>): Pick<Fd, 'eventfdCount' | 'eventfdSemaphore'> {
  return {
    eventfdCount: BigInt('0x' + (fdinfo.get('eventfd-count') ?? '0')),
    eventfdSemaphore: fdinfo.get('eventfd-semaphore') === '1',
  };
}

export function restoreEventfd(h: RestoreContext, _p: Process, fd: Fd): number {
  // Made at 0 and written: the counter is 64 bits, eventfd()'s
  // initial value only 32.
  const e = h.keep(addon().eventfd(0, fd.eventfdSemaphore ? 1 : 0));
  if (fd.eventfdCount) {
    const count = Buffer.alloc(8);
    count.writeBigUInt64LE(fd.eventfdCount);
    writeSync(e, count);
  }
  addon().setStatusFlags(e, fd.flags);
  return e;
}
