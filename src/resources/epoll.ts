/**
 * epoll sets: each target's descriptor number, events and data, from
 * /proc/PID/fdinfo. Made inside the restored process once every other
 * descriptor is at its number, since a target is added by its number.
 */
import type { EpollTarget, Fd } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';

const EPOLL_CTL_ADD = 1;
const EPOLL_CLOEXEC = 0o2000000;

/** The targets, from the fdinfo's "tfd:" lines. */
export function dumpEpoll(fdinfo: string): EpollTarget[] {
  const out: EpollTarget[] = [];
  for (const m of fdinfo.matchAll(/tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s+data:\s+([0-9a-f]+)/g))
    out.push({ fd: Number(m[1]), events: parseInt(m[2], 16), data: BigInt('0x' + m[3]) });
  return out;
}

/** A new epoll set inside the restored process, its targets added; its
 * number there (close-on-exec until restoreFds places it). */
export function restoreEpoll(r: RemoteProcess, fd: Fd): number {
  const ep = Number(r.call('epoll_create1', SYS.epoll_create1, [EPOLL_CLOEXEC]));
  for (const t of fd.epoll) {
    r.reset();
    const ev = Buffer.alloc(12);
    ev.writeUInt32LE(t.events, 0);
    ev.writeBigUInt64LE(t.data, 4);
    r.call(`adding fd ${t.fd} to epoll fd ${fd.fd}`, SYS.epoll_ctl, [ep, EPOLL_CTL_ADD, t.fd, r.put(ev)]);
  }
  return ep;
}
