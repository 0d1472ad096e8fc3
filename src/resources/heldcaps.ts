/**
 * What an image's own processes could do, as the privilege rule weighs
 * privileged state held by one of them (a socket option, a scheduling
 * policy, locked memory, an alarm clock): the capabilities its threads
 * hold, and the limits it ran under.
 *
 * Per holder. The state is restored only if the process (the thread, for
 * a thread's own state) that holds it in the image could have made it
 * itself: a capability in a thread's recorded effective or permitted set
 * (permitted: it may raise it at will), or, for state a limit governs
 * (RLIMIT_RTPRIO, RLIMIT_NICE, RLIMIT_MEMLOCK), within its own limit.
 * Stricter than "some process of the application could" (fanotify.ts,
 * sysv.ts mayLockShm): a crafted image may pair a root process with a
 * nobody one whose port 80 listener, SCHED_FIFO thread or locked memory
 * the root one never made; the nobody process would get it made by the
 * restorer, which no process of the image ever handed it. An honest
 * application whose root master binds the port holds the socket in the
 * master too (the holder rule counts every process that holds it).
 *
 * Except in this node's own snapshot (format.ts isOwnSnapshot: written by
 * a snapshot here, under this node's key), whose state is what the kernel
 * showed: servers make privileged state and then drop their privileges
 * (unbound binds port 53 as root, then runs as its user with no
 * capability; a real-time thread set up before the drop), and restoring
 * exactly that gives the application nothing it did not have. Whoever
 * could sign an image with this node's key could as well name its
 * processes root with every capability (creds.ts lets a root restore
 * grant that): the rule guards what an image from anywhere else says.
 * The restorer's own side (the kernel would refuse it, half-way) is
 * weighed for every image.
 */
import type { Creds, Image, Process, Rlimit, Thread } from '../image/types.js';
import { isOwnSnapshot } from '../image/format.js';

export const CAP_NET_BIND_SERVICE = 10;
export const CAP_NET_BROADCAST = 11;
export const CAP_NET_ADMIN = 12;
export const CAP_NET_RAW = 13;
export const CAP_IPC_LOCK = 14;
export const CAP_SYS_ADMIN = 21;
export const CAP_SYS_NICE = 23;
export const CAP_WAKE_ALARM = 35;
export const CAP_AUDIT_READ = 37;

const NAMES: Record<number, string> = {
  [CAP_NET_BIND_SERVICE]: 'CAP_NET_BIND_SERVICE',
  [CAP_NET_BROADCAST]: 'CAP_NET_BROADCAST',
  [CAP_NET_ADMIN]: 'CAP_NET_ADMIN',
  [CAP_NET_RAW]: 'CAP_NET_RAW',
  [CAP_IPC_LOCK]: 'CAP_IPC_LOCK',
  [CAP_SYS_ADMIN]: 'CAP_SYS_ADMIN',
  [CAP_SYS_NICE]: 'CAP_SYS_NICE',
  [CAP_WAKE_ALARM]: 'CAP_WAKE_ALARM',
  [CAP_AUDIT_READ]: 'CAP_AUDIT_READ',
};

/** "CAP_NET_RAW or CAP_NET_ADMIN". */
export const capNames = (caps: readonly number[]): string => caps.map((c) => NAMES[c] ?? `capability ${c}`).join(' or ');

const has = (set: bigint, caps: readonly number[]) => caps.some((c) => ((set >> BigInt(c)) & 1n) === 1n);

/** Whether what `image` says its processes held is taken as the kernel
 * showed it (this node's own snapshot), whatever their capabilities. */
export const vouchedFor = (image: Image): boolean => isOwnSnapshot(image);

/** Whether credentials `c` hold (or may raise) one of `caps`. */
export const credsMay = (c: Creds, caps: readonly number[]): boolean => has(c.capEff | c.capPrm, caps);

/** Whether thread `t` of `p` held one of `caps` (an older image: its process's creds). */
export const threadMay = (p: Process, t: Thread, caps: readonly number[]): boolean => credsMay(t.creds ?? p.creds, caps);

/** Whether any thread of `p` held one of `caps`: process-wide state (a
 * descriptor, a mapping) any of its threads could have made. */
export const processMay = (p: Process, caps: readonly number[]): boolean => credsMay(p.creds, caps) || p.threads.some((t) => threadMay(p, t, caps));

/** Whether the restoring process's effective set `capEff` holds one of `caps`. */
export const restorerMay = (capEff: bigint, caps: readonly number[]): boolean => has(capEff, caps);

/** The soft limit `resource` of `p` as the image recorded it (absent: 0,
 * what an unset RLIMIT_RTPRIO, RLIMIT_NICE is). */
export const imageLimit = (p: Process, resource: number): bigint => p.rlimits.find((r) => r.resource === resource)?.cur ?? 0n;

/** The restorer's own hard limit `resource` (it may raise its soft limit
 * to it, and its seeds run under it). */
export const ownHardLimit = (own: readonly Rlimit[], resource: number): bigint => own.find((r) => r.resource === resource)?.max ?? 0n;

export const RLIMIT_MEMLOCK = 8;
export const RLIMIT_NICE = 13;
export const RLIMIT_RTPRIO = 14;
