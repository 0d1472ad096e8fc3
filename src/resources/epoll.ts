/**
 * epoll sets: each target's registered number, events and data, from
 * /proc/PID/fdinfo, whatever the target is: another epoll set (made
 * before or after this one), a file whose registered number was since
 * closed or reused (kcmp's KCMP_EPOLL_TFD finds the descriptor that holds
 * it now), edge-triggered, exclusive, or a one-shot that already fired.
 *
 * Restore, inside the restored process once every other descriptor is at
 * its number: every set is made and placed first, so that a set can watch
 * another whatever their numbers; then each set's targets are added in
 * the order the kernel lists them. A target registered under a number that
 * now holds another file (or nothing) is added under that number: its
 * file is put there for the moment, the occupant set aside and put back.
 * A one-shot that fired (its events down to the flags) is added armed for
 * everything and made to fire at once, before any other target is in the
 * set, which disarms it; if its target is not ready to fire, the restore
 * fails naming it. A target that the process no longer holds at all (only
 * another process does) is refused at snapshot.
 */
import { readdirSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { addon } from '../native.js';
import { type EpollTarget, type Fd, FdKind, type Process } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Unsupported } from './context.js';

const EPOLL_CTL_ADD = 1;
const EPOLL_CLOEXEC = 0o2000000;
const F_DUPFD_CLOEXEC = 1030;
/** EPOLLWAKEUP, EPOLLONESHOT, EPOLLET, EPOLLEXCLUSIVE: what a fired
 * one-shot keeps. */
const PRIVATE_BITS = (1 << 29) | (1 << 30) | (1 << 31) | (1 << 28);
const ONESHOT = 1 << 30;
/** Every event a target may be ready for (EPOLLIN..EPOLLMSG, EPOLLRDHUP). */
const ALL_EVENTS = 0x7ff | 0x2000;
const EVENT_BYTES = 12;

/** The targets, from the fdinfo's "tfd:" lines, each with where the
 * process holds it now if not under its registered number. */
export function dumpEpoll(pid: number, epfd: number, fdinfo: string, what: string): EpollTarget[] {
  const out: EpollTarget[] = [];
  const seen = new Map<number, number>();
  let numbers: number[] | undefined;
  for (const m of fdinfo.matchAll(/tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s+data:\s+([0-9a-f]+)/g)) {
    const t: EpollTarget = { fd: Number(m[1]), events: parseInt(m[2], 16), data: BigInt('0x' + m[3]) };
    // The nth target registered under this number (KCMP_EPOLL_TFD's toff).
    const toff = seen.get(t.fd) ?? 0;
    seen.set(t.fd, toff + 1);
    if (!addon().epollTargetIs(pid, epfd, t.fd, toff, t.fd)) {
      numbers ??= readdirSync(`/proc/${pid}/fd`).map(Number).sort((a, b) => a - b);
      const holder = numbers.find((n) => n !== t.fd && addon().epollTargetIs(pid, epfd, t.fd, toff, n));
      if (holder === undefined)
        throw new Unsupported(`${what} fd ${epfd}: an epoll target registered as fd ${t.fd} is no longer held by this process (only another holds it), which cannot be captured yet`);
      t.heldAt = holder + 1;
    }
    out.push(t);
  }
  return out;
}

/** Every epoll set of `p`, each placed at its number by `place` (given
 * the number it was made at), then their targets added. */
export function restoreEpolls(r: RemoteProcess, p: Process, place: (got: number, fd: Fd) => void): void {
  const sets = p.fds.filter((f) => f.kind === FdKind.EPOLL);
  for (const fd of sets) place(Number(r.call('epoll_create1', SYS.epoll_create1, [EPOLL_CLOEXEC])), fd);
  const cloexec = new Map(p.fds.map((f) => [f.fd, f.cloexec]));
  for (const fd of sets) {
    const fired = fd.epoll.filter((t) => (t.events & ~PRIVATE_BITS) === 0 && t.events & ONESHOT);
    // Fired one-shots first, alone in the set, so that firing them
    // consumes no other target's event.
    for (const t of fired) add(r, fd.fd, t, t.events | ALL_EVENTS, cloexec);
    if (fired.length) {
      r.reset();
      const n = Number(r.call(`firing the one-shot targets of epoll fd ${fd.fd}`, SYS.epoll_wait, [fd.fd, r.put(Buffer.alloc(EVENT_BYTES * fired.length)), fired.length, 0]));
      if (n !== fired.length)
        throw new AppshotError(`epoll fd ${fd.fd}: ${fired.length - n} of its one-shot targets (fd ${fired.map((t) => t.fd).join(', ')}) had fired and are disarmed, which cannot be made again while their file is not ready`);
    }
    for (const t of fd.epoll) if (!fired.includes(t)) add(r, fd.fd, t, t.events, cloexec);
  }
}

/** Adds target `t` to set `ep` under its registered number, its file put
 * there for the moment if another descriptor holds it now. */
function add(r: RemoteProcess, ep: number, t: EpollTarget, events: number, cloexec: Map<number, boolean>): void {
  const ctl = () => {
    r.reset();
    const ev = Buffer.alloc(EVENT_BYTES);
    ev.writeUInt32LE(events >>> 0, 0);
    ev.writeBigUInt64LE(t.data, 4);
    r.call(`adding fd ${t.fd} to epoll fd ${ep}`, SYS.epoll_ctl, [ep, EPOLL_CTL_ADD, t.fd, r.put(ev)]);
  };
  if (!t.heldAt) return ctl();
  const holder = t.heldAt - 1;
  const occupied = cloexec.has(t.fd);
  const aside = occupied ? Number(r.call(`setting fd ${t.fd} aside`, SYS.fcntl, [t.fd, F_DUPFD_CLOEXEC, 0])) : -1;
  r.call(`putting fd ${holder} at ${t.fd} for its epoll registration`, SYS.dup3, [holder, t.fd, 0]);
  try {
    ctl();
  } finally {
    if (occupied) {
      r.call(`putting fd ${t.fd} back`, SYS.dup3, [aside, t.fd, cloexec.get(t.fd) ? EPOLL_CLOEXEC : 0]);
      r.call('closing', SYS.close, [aside]);
    } else {
      r.call('closing', SYS.close, [t.fd]);
    }
  }
}
