/**
 * signalfd: a descriptor that reads the signals of its mask instead of
 * their handlers running (every PostgreSQL >= 15 process holds one). Its
 * whole state is the mask and the non-blocking flag: the signals it would
 * read are the process's pending ones, which signals.ts carries, and a
 * signalfd reads whichever process reads it, not the one that made it.
 */
import { type Fd } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';

const SFD_NONBLOCK = 0o4000; // = O_NONBLOCK, as fdinfo shows it
const SFD_CLOEXEC = 0o2000000;
const SIGSET_BYTES = 8;

/** The mask from /proc/PID/fdinfo ("sigmask:" in hex, bit N-1 for signal
 * N, as in /proc/PID/status). */
export function dumpSignalfd(fdinfo: Map<string, string>): bigint {
  const mask = fdinfo.get('sigmask');
  if (mask === undefined || !/^[0-9a-f]+$/.test(mask)) throw new Error('signalfd without a mask in its fdinfo');
  return BigInt('0x' + mask);
}

/** A new signalfd inside the restored process; its number there, close-on-
 * exec like every descriptor restoreFds places (it clears the bit where the
 * image says so). */
export function restoreSignalfd(r: RemoteProcess, fd: Fd): number {
  r.reset();
  const mask = r.put(r.u64s([fd.sigmask]));
  return Number(r.call(`making signalfd ${fd.fd}`, SYS.signalfd4, [-1, mask, SIGSET_BYTES, (fd.flags & SFD_NONBLOCK) | SFD_CLOEXEC]));
}
