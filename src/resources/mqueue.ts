/**
 * POSIX message queues (mq_open). Not captured yet: a queue's descriptor
 * is refused by name at snapshot. Before this, a queue's descriptor, a
 * regular inode of the mqueue file system named "/NAME" (or "/NAME
 * (deleted)" once unlinked), passed for a file: restored as an empty
 * deleted file in its place, on which mq_send and mq_receive fail (EBADF),
 * while the restore said it worked. (The preload library translates the
 * notifier's PID a queue's text shows: addon/preload/preload_ipc.c.)
 */
import { type BigIntStats, statfsSync } from 'node:fs';
import { type DumpContext, Unsupported } from './context.js';

/** statfs's f_type of the mqueue file system (linux/magic.h). */
const MQUEUE_MAGIC = 0x19800202;

/** Per snapshot: whether each anonymous device seen is the mqueue file
 * system's (one statfs per device, not per descriptor). */
const seen = new WeakMap<DumpContext, Map<bigint, boolean>>();

/** Throws Unsupported if the regular file `st` (stat of `procPath`, a
 * descriptor's /proc/PID/fd link, whose target is `target`) is a message
 * queue. Only a file on an anonymous device (major 0: tmpfs, mqueue and
 * the like) is looked at; disks' files cost nothing. */
export function refuseMessageQueue(ctx: DumpContext, st: BigIntStats, procPath: string, target: string, where: string): void {
  if ((st.dev >> 8n) & 0xfffn) return;
  let byDev = seen.get(ctx);
  if (!byDev) seen.set(ctx, (byDev = new Map()));
  let mqueue = byDev.get(st.dev);
  if (mqueue === undefined) {
    mqueue = statfsSync(procPath).type === MQUEUE_MAGIC;
    byDev.set(st.dev, mqueue);
  }
  if (mqueue) throw new Unsupported(`${where}: a POSIX message queue (${target.replace(/ \(deleted\)$/, '')}${target.endsWith(' (deleted)') ? ', unlinked' : ''}) cannot be captured yet`);
}
