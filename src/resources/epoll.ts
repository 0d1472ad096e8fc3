/**
 * epoll sets: each target's registered number, events and data, from
 * /proc/PID/fdinfo, whatever the target is: another epoll set (made
 * before or after this one), a file whose registered number was since
 * closed or reused (kcmp's KCMP_EPOLL_TFD finds the descriptor that holds
 * it now), edge-triggered, exclusive, or a one-shot that already fired.
 *
 * What a set reports next is kept too, for its edge-triggered (EPOLLET)
 * and armed one-shot targets, which a report takes off its ready list:
 * fdinfo does not show that list, and adding a target (EPOLL_CTL_ADD)
 * queues it whenever its file is ready, so an edge the program had taken
 * without draining its file would be reported again after a restore. At
 * snapshot, the frozen process's own epoll_wait(set, ..., 0), among its
 * other questions (askReadyLists), reads the ready list: each such target
 * is marked pending, or taken where its file is ready (a poll before the
 * wait), or neither (its file not ready: the restore must not drain an
 * edge the file makes before the program runs again, a timerfd that
 * expired while the image waited), and each it took is put back as soon as the
 * answers are in (putBackReadyLists: EPOLL_CTL_MOD under the same events
 * and data, which queues a target whose file is ready and re-arms a
 * one-shot), so that the application, left running or resumed after a
 * failed snapshot, reports exactly what it would have. Cost: no stop of
 * its own, one more only when a target was pending. Where that cannot
 * be exact the set is left unread (as before: a ready target is reported
 * once more after a restore): a target that EPOLL_CTL_MOD refuses
 * (EPOLLEXCLUSIVE), one whose registered number no longer holds it, two
 * targets with one data word (a report names its target only by its
 * data), and a set watched by another set edge-triggered or one-shot, in
 * its process or (a set shared by fork) in another (a put-back would be a
 * new edge of that set: setsWatchedByEdges).
 *
 * Restore, inside the restored process once every other descriptor is at
 * its number: every set is made and placed first, so that a set can watch
 * another whatever their numbers; then each set's targets are added in
 * the order the kernel lists them, a set watched by another before that
 * other. A target registered under a number that now holds another file
 * (or nothing) is added under that number: its file is put there for the
 * moment, the occupant set aside and put back. A one-shot that fired (its
 * events down to the flags) is added armed for everything and made to
 * fire at once, before any other target is in the set, which disarms it;
 * if its target is not ready to fire, the restore fails naming it. A set
 * with a target not pending is drained once its targets are in (an
 * epoll_wait with no timeout, which takes every edge the adds queued) and
 * the targets that were pending, or not known, modified as they are,
 * which queues them again if ready; an exclusive one among those (which
 * takes no EPOLL_CTL_MOD) is added after the drain instead. A target that
 * the process no longer holds at all (only another process does) is
 * refused at snapshot.
 */
import { closeSync, readdirSync, readlinkSync } from 'node:fs';
import { AppshotError, errnoName, ExitCode } from '../errors.js';
import { addon } from '../native.js';
import { type EpollParams, type EpollTarget, type Fd, FdKind, type Image, type Process } from '../image/types.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { nameProcess, Unsupported } from './context.js';

const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_MOD = 3;
const EPOLL_CLOEXEC = 0o2000000;
const F_DUPFD_CLOEXEC = 1030;
/** EPOLLWAKEUP, EPOLLONESHOT, EPOLLET, EPOLLEXCLUSIVE: what a fired
 * one-shot keeps. */
const PRIVATE_BITS = (1 << 29) | (1 << 30) | (1 << 31) | (1 << 28);
const ONESHOT = 1 << 30;
const EDGE = 1 << 31;
const EXCLUSIVE = 1 << 28;
/** Every event a target may be ready for (EPOLLIN..EPOLLMSG, EPOLLRDHUP). */
const ALL_EVENTS = 0x7ff | 0x2000;
const EVENT_BYTES = 12;
/** Events one wait of a snapshot takes at most: what the injector's
 * scratch below the stack holds where there are no batches (512 bytes),
 * and little of the batch area the process's other questions share. */
const SNAPSHOT_WAIT_EVENTS = 40;
/** Events one drain of a restore takes at most. */
const RESTORE_WAIT_EVENTS = 1024;
/** Files one poll of a snapshot asks at most (the same scratch). */
const SNAPSHOT_POLL_FDS = 60;
const POLLFD_BYTES = 8;

/** Whether a target fired: a one-shot whose report disarmed it (its
 * events down to the flags). */
const fired = (t: EpollTarget) => (t.events & ~PRIVATE_BITS) === 0 && (t.events & ONESHOT) !== 0;

/** Whether a report takes target `t` off its set's ready list (it is
 * edge-triggered) or disarms it (a one-shot): what the next wait reports
 * depends on whether it was reported since its last edge. */
const takenByReport = (t: EpollTarget) => !fired(t) && (t.events & (EDGE | ONESHOT)) !== 0;

/** The number the process holds target `t` under now. */
const holderOf = (t: EpollTarget) => (t.heldAt ? t.heldAt - 1 : t.fd);

/** The targets, from the fdinfo's "tfd:" lines, each with where the
 * process holds it now if not under its registered number. */
export function dumpEpoll(pid: number, epfd: number, fdinfo: string, what: string): EpollTarget[] {
  const out: EpollTarget[] = [];
  const seen = new Map<number, number>();
  let numbers: number[] | undefined;
  for (const t of targetsOf(fdinfo)) {
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

/** struct epoll_params (Linux 6.9): busy_poll_usecs u32, busy_poll_budget
 * u16, prefer_busy_poll u8, a pad byte; EPIOCGPARAMS = _IOR(0x8A, 2, it),
 * EPIOCSPARAMS = _IOW(0x8A, 1, it). */
const EPOLL_PARAMS_BYTES = 8;
const EPIOCGPARAMS = 0x80088a02;
const EPIOCSPARAMS = 0x40088a01;

/** The busy-poll parameters the program gave set `epfd` of process `pid`
 * (EPIOCSPARAMS: a latency-tuned event loop's), read through a copy of
 * its descriptor; undefined where they are the kernel's default (all 0)
 * or the kernel has none (before 6.9: ENOTTY). A restore without them
 * would leave the set polling no more, which nothing would show but
 * EPIOCGPARAMS and the latency. */
export function dumpEpollParams(pid: number, epfd: number): EpollParams | undefined {
  const dup = addon().getFd(pid, epfd);
  try {
    const b = Buffer.alloc(EPOLL_PARAMS_BYTES);
    try {
      addon().ioctl(dup, EPIOCGPARAMS, b);
    } catch {
      return undefined;
    }
    const params = { busyPollUsecs: b.readUInt32LE(0), busyPollBudget: b.readUInt16LE(4), preferBusyPoll: b[6] !== 0 };
    return params.busyPollUsecs || params.busyPollBudget || params.preferBusyPoll ? params : undefined;
  } finally {
    closeSync(dup);
  }
}

/** The kernel's default busy-poll budget (NAPI_POLL_WEIGHT): a larger one
 * takes CAP_NET_ADMIN in the initial user namespace (capable()). */
const NAPI_POLL_WEIGHT = 64;
const CAP_NET_ADMIN = 12;
const INIT_USER_NS = 'user:[4026531837]';

/** Refuses, before anything is made, an image with an epoll set whose
 * busy-poll parameters this restore cannot set: on a kernel without
 * EPIOCSPARAMS (before 6.9, or without CONFIG_NET_RX_BUSY_POLL), or a
 * budget above NAPI_POLL_WEIGHT without CAP_NET_ADMIN (the restored
 * process sets them before its credentials are its own: the kernel asks
 * the restorer's). Asked of appshot's own event loop's epoll set. */
export function checkEpollPrivileges(image: Image, capEff: bigint): void {
  let supported: string | undefined;
  for (const p of image.processes)
    for (const fd of p.fds) {
      const bp = fd.kind === FdKind.EPOLL ? fd.epollParams : undefined;
      if (!bp) continue;
      supported ??= epollParamsSupport();
      if (supported) throw new AppshotError(`${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: its epoll set has busy-poll parameters, which this kernel cannot set (EPIOCSPARAMS: ${supported})`);
      if (bp.busyPollBudget > NAPI_POLL_WEIGHT && !((capEff >> BigInt(CAP_NET_ADMIN)) & 1n && readlinkSync('/proc/self/ns/user') === INIT_USER_NS))
        throw new AppshotError(`${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: its epoll set has a busy-poll budget of ${bp.busyPollBudget} (above ${NAPI_POLL_WEIGHT}), which takes CAP_NET_ADMIN, which this restore does not have`, ExitCode.denied);
    }
}

/** '' where this kernel has EPIOCGPARAMS/EPIOCSPARAMS, else the errno
 * name its EPIOCGPARAMS gives (ENOTTY before 6.9; EOPNOTSUPP without
 * CONFIG_NET_RX_BUSY_POLL), read on an epoll set of this process's own. */
function epollParamsSupport(): string {
  const own = readdirSync('/proc/self/fd').map(Number).find((n) => {
    try {
      return readlinkSync(`/proc/self/fd/${n}`) === 'anon_inode:[eventpoll]';
    } catch {
      return false;
    }
  });
  if (own === undefined) return 'no epoll set of appshot\'s own to ask';
  try {
    addon().ioctl(own, EPIOCGPARAMS, Buffer.alloc(EPOLL_PARAMS_BYTES));
    return '';
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? (e as Error).message;
  }
}

/** A set whose ready list is read (askReadyLists). */
export interface ReadyListAsked {
  epfd: number;
  /** Its targets, by data word (each one's own). */
  byData: Map<bigint, EpollTarget>;
  /** How many targets it has. */
  targets: number;
  /** Events its first wait could take, and that wait. */
  max: number;
  wait: Answer;
  /** A poll of its edge-triggered and armed one-shot targets' files,
   * asked before the wait, or undefined (too many to ask). */
  poll?: { targets: EpollTarget[]; answer: Answer };
  /** The data words of the targets that were pending, once known. */
  pending?: Set<bigint>;
  /** The data words of those of them whose file was ready (poll). */
  ready?: Set<bigint>;
}

/**
 * Asks a frozen process `pid` for the ready list of each of its epoll
 * sets that has edge-triggered targets: its own
 * epoll_wait(set, ..., 0), among the process's other questions (no stop
 * of its own), which takes those targets off the list. `entries`: its
 * descriptors with their fdinfo, read before any call. A set whose list
 * cannot be read exactly is not asked (see the head of this file).
 * putBackReadyLists must follow the answers at once.
 */
export function askReadyLists(calls: CallQueue, pid: number, entries: { fd: number; target: string; info: string }[], watchedElsewhere?: Set<number>): ReadyListAsked[] {
  const sets = entries.filter((e) => e.target === EVENTPOLL).map((e) => ({ epfd: e.fd, targets: targetsOf(e.info) }));
  const setNumbers = new Set(sets.map((s) => s.epfd));
  // Sets another set watches edge-triggered or one-shot (by the number
  // it was registered under: one moved since leaves its set unread too),
  // in this process or, through a set shared by fork, in another.
  const watchedByEdges = new Set(sets.flatMap((s) => s.targets.filter((t) => takenByReport(t) && setNumbers.has(t.fd)).map((t) => t.fd)));
  for (const n of watchedElsewhere ?? []) watchedByEdges.add(n);
  const asked: ReadyListAsked[] = [];
  for (const { epfd, targets } of sets) {
    // A set without edge-triggered targets costs nothing: an armed
    // one-shot whose file is ready waits on the list anyway (adding or
    // modifying it queued it, and only a report disarms it), as an add
    // at restore makes it again.
    if (!targets.some((t) => takenByReport(t) && t.events & EDGE) || watchedByEdges.has(epfd)) continue;
    const taken = targets.filter(takenByReport);
    const byData = new Map(targets.map((t) => [t.data, t]));
    if (byData.size < targets.length || taken.some((t) => t.events & EXCLUSIVE)) continue;
    // Put back under its registered number: that number must hold it
    // still (kcmp; the only target registered under it).
    if (new Set(targets.map((t) => t.fd)).size < targets.length || taken.some((t) => !addon().epollTargetIs(pid, epfd, t.fd, 0, t.fd))) continue;
    const max = Math.min(targets.length, SNAPSHOT_WAIT_EVENTS);
    // Whether each file is ready, before the wait: a target not pending
    // whose file is not ready had no edge to take, and the restore must
    // not drain one its file makes before the application runs (a
    // timerfd that expired while the image waited).
    let poll: ReadyListAsked['poll'];
    if (taken.length <= SNAPSHOT_POLL_FDS) {
      const fds = Buffer.alloc(POLLFD_BYTES * taken.length);
      taken.forEach((t, i) => {
        fds.writeInt32LE(t.fd, i * POLLFD_BYTES);
        fds.writeInt16LE(t.events & ALL_EVENTS, i * POLLFD_BYTES + 4);
      });
      poll = { targets: taken, answer: calls.ask(SYS.poll, ['buf', taken.length, 0], { input: fds }) };
    }
    asked.push({ epfd, byData, targets: targets.length, max, poll, wait: calls.ask(SYS.epoll_wait, [epfd, 'buf', max, 0], { outLength: EVENT_BYTES * max }) });
  }
  return asked;
}

const EVENTPOLL = 'anon_inode:[eventpoll]';

/**
 * The epoll sets, by process (system PID) and number, that a set of any
 * of `processes` (their descriptors with fdinfo, read before any call)
 * watches edge-triggered or one-shot: a set shared by fork is one file
 * in each process that holds it, and a put-back in one (a new item on
 * its ready list) is a new edge of a set that watches it in another
 * (review r265: the child's set reported the shared one again after a
 * --leave-running snapshot). kcmp finds the holders (descriptionGroups),
 * only when some set watches another; without kcmp every set of a
 * process counts as watched.
 */
export function setsWatchedByEdges(processes: { pid: number; entries?: { fd: number; target: string; info: string }[] }[]): Map<number, Set<number>> {
  const out = new Map<number, Set<number>>();
  const all: { pid: number; fd: number; watched: boolean }[] = [];
  for (const { pid, entries } of processes) {
    const sets = (entries ?? []).filter((e) => e.target === EVENTPOLL);
    const numbers = new Set(sets.map((e) => e.fd));
    const watched = new Set(sets.flatMap((e) => targetsOf(e.info).filter((t) => takenByReport(t) && numbers.has(t.fd)).map((t) => t.fd)));
    for (const e of sets) all.push({ pid, fd: e.fd, watched: watched.has(e.fd) });
  }
  if (!all.some((m) => m.watched) || new Set(all.map((m) => m.pid)).size < 2) return out;
  const lowest = addon().descriptionGroups(
    all.map((m) => m.pid),
    all.map((m) => m.fd),
  );
  const watchedGroups = new Set(all.flatMap((m, i) => (m.watched ? [lowest ? lowest[i] : -1] : [])));
  all.forEach((m, i) => {
    if (!watchedGroups.has(lowest ? lowest[i] : -1)) return;
    if (!out.has(m.pid)) out.set(m.pid, new Set());
    out.get(m.pid)!.add(m.fd);
  });
  return out;
}

/** The targets an epoll set's fdinfo lists. */
function targetsOf(fdinfo: string): EpollTarget[] {
  return [...fdinfo.matchAll(/tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s+data:\s+([0-9a-f]+)/g)].map((m) => ({ fd: Number(m[1]), events: parseInt(m[2], 16), data: BigInt('0x' + m[3]) }));
}

/**
 * Once askReadyLists's waits are answered: takes the rest of a list too
 * long for one wait, notes which targets were pending, and puts each one
 * taken back (EPOLL_CTL_MOD, the same events and data, all in one stop),
 * which queues it again, its file being ready, and re-arms a one-shot. A
 * set whose wait did not run (the questions failed) is left as it is; a
 * failure is thrown once every taken event that can be is put back.
 */
export function putBackReadyLists(calls: CallQueue, asked: ReadyListAsked[], what: string): void {
  const puts: { set: ReadyListAsked; fd: number; answer: Answer }[] = [];
  let failed: string | undefined;
  for (const set of asked) {
    // Not run: the questions failed before it, and the snapshot with them.
    if (!set.wait.answered) continue;
    const pending = new Set<bigint>();
    try {
      let wait = set.wait;
      for (let seen = 0; ; ) {
        if (wait.ret < 0n) throw new Error(`epoll_wait: ${errnoName(Number(-wait.ret))}`);
        const n = Number(wait.ret);
        for (let i = 0; i < n; i++) {
          const data = wait.out.readBigUInt64LE(i * EVENT_BYTES + 4);
          const t = set.byData.get(data);
          if (t && takenByReport(t)) pending.add(data);
        }
        seen += n;
        // A level-triggered target is queued again at the end of the
        // list: each target is seen once when as many were reported.
        if (n < set.max || seen >= set.targets) break;
        wait = calls.askNow(SYS.epoll_wait, [set.epfd, 'buf', set.max, 0], { outLength: EVENT_BYTES * set.max });
      }
      set.pending = pending;
      const poll = set.poll;
      if (poll?.answer.answered && poll.answer.ret >= 0n)
        set.ready = new Set(poll.targets.filter((_, i) => poll.answer.out.readInt16LE(i * POLLFD_BYTES + 6) !== 0).map((t) => t.data));
    } catch (e) {
      failed ??= `${what} fd ${set.epfd}: reading its epoll ready list: ${(e as Error).message}`;
    }
    for (const data of pending) {
      const t = set.byData.get(data)!;
      const ev = Buffer.alloc(EVENT_BYTES);
      ev.writeUInt32LE(t.events >>> 0, 0);
      ev.writeBigUInt64LE(data, 4);
      puts.push({ set, fd: t.fd, answer: calls.ask(SYS.epoll_ctl, [set.epfd, EPOLL_CTL_MOD, t.fd, 'buf'], { input: ev }) });
    }
  }
  calls.run();
  const unput = puts.find((p) => p.answer.ret < 0n);
  if (unput)
    throw new AppshotError(`${what} fd ${unput.set.epfd}: putting back the event of its epoll target fd ${unput.fd}, which reading the ready list took: epoll_ctl: ${errnoName(Number(-unput.answer.ret))}; the application may miss that event`);
  if (failed) throw new AppshotError(failed);
}

/** Marks each edge-triggered or armed one-shot target of the sets among
 * `fds` whose ready list was read (`asked`) pending, or not pending where
 * its file was ready (its edge taken: the restore drains it). One whose
 * file was not ready is left unknown: the restore queues it if its file
 * is ready then, a new edge (none was there to take). */
export function markPending(fds: Fd[], asked: ReadyListAsked[]): void {
  for (const set of asked) {
    const fd = fds.find((f) => f.fd === set.epfd && f.kind === FdKind.EPOLL);
    if (!fd || !set.pending) continue;
    for (const t of fd.epoll) {
      if (!takenByReport(t)) continue;
      if (set.pending.has(t.data)) t.pending = true;
      else if (set.ready?.has(t.data)) t.pending = false;
    }
  }
}

/** Every epoll set of `p`, each placed at its number by `place` (given
 * the number it was made at), then their targets added. */
export function restoreEpolls(r: RemoteProcess, p: Process, place: (got: number, fd: Fd) => void): void {
  const sets = p.fds.filter((f) => f.kind === FdKind.EPOLL);
  for (const fd of sets) place(Number(r.call('epoll_create1', SYS.epoll_create1, [EPOLL_CLOEXEC])), fd);
  // Its busy-poll parameters as the program set them (validated: in the
  // kernel's ranges). Set before the process's credentials are restored:
  // the kernel's CAP_NET_ADMIN check for a budget above NAPI_POLL_WEIGHT
  // is made of the restorer's, which checkEpollPrivileges asked up front.
  for (const fd of sets) {
    if (!fd.epollParams) continue;
    const b = Buffer.alloc(EPOLL_PARAMS_BYTES);
    b.writeUInt32LE(fd.epollParams.busyPollUsecs, 0);
    b.writeUInt16LE(fd.epollParams.busyPollBudget, 4);
    b[6] = fd.epollParams.preferBusyPoll ? 1 : 0;
    r.reset();
    r.call(`setting the busy-poll parameters of epoll fd ${fd.fd} (EPIOCSPARAMS)`, SYS.ioctl, [fd.fd, EPIOCSPARAMS, r.put(b)]);
  }
  const cloexec = new Map(p.fds.map((f) => [f.fd, f.cloexec]));
  for (const fd of watchedFirst(sets)) {
    const firedOnes = fd.epoll.filter(fired);
    // Fired one-shots first, alone in the set, so that firing them
    // consumes no other target's event.
    for (const t of firedOnes) ctl(r, fd.fd, EPOLL_CTL_ADD, t, t.events | ALL_EVENTS, cloexec);
    if (firedOnes.length) {
      r.reset();
      const n = Number(r.call(`firing the one-shot targets of epoll fd ${fd.fd}`, SYS.epoll_wait, [fd.fd, r.put(Buffer.alloc(EVENT_BYTES * firedOnes.length)), firedOnes.length, 0]));
      if (n !== firedOnes.length)
        throw new AppshotError(`epoll fd ${fd.fd}: ${firedOnes.length - n} of its one-shot targets (fd ${firedOnes.map((t) => t.fd).join(', ')}) had fired and are disarmed, which cannot be made again while their file is not ready`);
    }
    const rest = fd.epoll.filter((t) => !fired(t));
    // A target that was not pending: its add may queue it (its file is
    // ready), and only a drain takes that edge again, which takes the
    // others' too: those that were pending are queued again after it.
    const drained = rest.some((t) => t.pending === false);
    const afterDrain = drained ? rest.filter((t) => t.events & EXCLUSIVE && t.pending !== false) : [];
    for (const t of rest) if (!afterDrain.includes(t)) ctl(r, fd.fd, EPOLL_CTL_ADD, t, t.events, cloexec);
    if (drained) {
      drain(r, fd.fd, rest.length);
      for (const t of rest) if (takenByReport(t) && t.pending !== false && !afterDrain.includes(t)) ctl(r, fd.fd, EPOLL_CTL_MOD, t, t.events, cloexec);
    }
    for (const t of afterDrain) ctl(r, fd.fd, EPOLL_CTL_ADD, t, t.events, cloexec);
  }
}

/** `sets` ordered so that a set watched by another comes before it: a
 * set's ready list is as it will stay before another set adds it (a
 * drain of its own afterwards would leave the other's edge behind). */
function watchedFirst(sets: Fd[]): Fd[] {
  const byNumber = new Map(sets.map((s) => [s.fd, s]));
  const ordered: Fd[] = [];
  const seen = new Set<Fd>();
  const visit = (s: Fd) => {
    if (seen.has(s)) return;
    seen.add(s);
    for (const t of s.epoll) {
      const inner = byNumber.get(holderOf(t));
      if (inner) visit(inner);
    }
    ordered.push(s);
  };
  for (const s of sets) visit(s);
  return ordered;
}

/** Takes every event queued on set `ep` (of `targets` targets): waits
 * with no timeout until one returns less than it could hold, or as many
 * as there are targets (a level-triggered one is queued again at the
 * end of the list: each target is seen once by then). */
function drain(r: RemoteProcess, ep: number, targets: number): void {
  const max = Math.min(Math.max(targets, 1), RESTORE_WAIT_EVENTS);
  for (let taken = 0; taken < targets; ) {
    r.reset();
    const n = Number(r.call(`draining epoll fd ${ep}`, SYS.epoll_wait, [ep, r.put(Buffer.alloc(EVENT_BYTES * max)), max, 0]));
    taken += n;
    if (n < max) return;
  }
}

/** EPOLL_CTL_ADD or EPOLL_CTL_MOD of target `t` in set `ep` under its
 * registered number, its file put there for the moment if another
 * descriptor holds it now. */
function ctl(r: RemoteProcess, ep: number, op: number, t: EpollTarget, events: number, cloexec: Map<number, boolean>): void {
  const call = () => {
    r.reset();
    const ev = Buffer.alloc(EVENT_BYTES);
    ev.writeUInt32LE(events >>> 0, 0);
    ev.writeBigUInt64LE(t.data, 4);
    r.call(`${op === EPOLL_CTL_ADD ? 'adding' : 'modifying'} fd ${t.fd} ${op === EPOLL_CTL_ADD ? 'to' : 'in'} epoll fd ${ep}`, SYS.epoll_ctl, [ep, op, t.fd, r.put(ev)]);
  };
  if (!t.heldAt) return call();
  const holder = t.heldAt - 1;
  const occupied = cloexec.has(t.fd);
  const aside = occupied ? Number(r.call(`setting fd ${t.fd} aside`, SYS.fcntl, [t.fd, F_DUPFD_CLOEXEC, 0])) : -1;
  r.call(`putting fd ${holder} at ${t.fd} for its epoll registration`, SYS.dup3, [holder, t.fd, 0]);
  try {
    call();
  } finally {
    if (occupied) {
      r.call(`putting fd ${t.fd} back`, SYS.dup3, [aside, t.fd, cloexec.get(t.fd) ? EPOLL_CLOEXEC : 0]);
      r.call('closing', SYS.close, [aside]);
    } else {
      r.call('closing', SYS.close, [t.fd]);
    }
  }
}
