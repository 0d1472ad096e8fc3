/**
 * The scheduling policy of `appshot serve`, apart from everything it acts
 * on so that it can be tested with a clock that tests advance.
 *
 * The whole policy, from measurements the front door makes itself
 * (connections open per instance, connections waiting and how long the
 * oldest of them has, time since the last connection of each instance,
 * and each instance's CPU):
 *
 * - route: a new connection goes to the running instance with the fewest
 *   open connections (of two with as many, the one using less CPU), if it
 *   has fewer than `concurrency`; otherwise it is held. While connections
 *   are held and the instances being started cannot take them all, one
 *   more is started (restore mode: the one instance, if it is suspended or
 *   crashed; clone mode: a clone, up to `max`).
 * - busy (clone mode, with `cpuTarget`): when every running instance
 *   serves connections and uses at least `cpuTarget` of a core, and none is
 *   starting, one more is started, up to `max`: connections below
 *   `concurrency` can still saturate an instance that computes.
 * - wait (with `maxWaitMs`): when the connection waiting longest at the
 *   front door has waited that long, clone mode starts one more instance,
 *   up to `max` (a start that hangs or crawls, a slow disk, a clone
 *   failing and tried again, does not keep its waiters waiting on it
 *   alone). With `max` live, and always in restore mode (its one instance
 *   cannot be doubled), the wait is reported instead (a log line and a
 *   metric: the operator's sign that restores or clones are slower than
 *   the service can bear). Neither when this decision starts instances
 *   for the number held anyway; either at most once per `maxWaitMs`.
 *   "Waiting" counts both the connections serve holds and those still
 *   in a listen backlog, unaccepted (beyond --max-held, or on the shared
 *   listener while no instance accepts): the kernel counts the latter but
 *   does not date them, so BacklogAge dates each when a pump first sees
 *   it there (a wait is understated by up to the time between two pumps,
 *   never overstated) and takes them out oldest first as they are
 *   accepted.
 * - idle: an instance with no open connection for `idleMs` is suspended
 *   (restore mode: snapshotted, which ends it) or dropped (clone mode),
 *   never below `min` running; the one idle longest goes first. With
 *   `busyCpu`, an instance is idle only once a measurement over a window
 *   that began after its last activity found it using less than that,
 *   connections or not; a window that found it busy is activity
 *   (server.ts sets its lastActive).
 * - warm: clone mode keeps `min` instances running or starting.
 */
import type { InstanceStateName, ServiceSpec } from './spec.js';

/** Time as the policy sees it; the real one is Date.now. */
export interface Clock {
  now(): number;
}

export const systemClock: Clock = { now: () => Date.now() };

/** A test's clock: time moves only when the test says so. */
export class FakeClock implements Clock {
  constructor(private t = 0) {}
  now(): number {
    return this.t;
  }
  advance(ms: number): void {
    this.t += ms;
  }
}

/** What the policy needs to know of an instance. */
export interface InstanceView {
  aid: string;
  state: InstanceStateName;
  /** Open (forwarded) connections. */
  active: number;
  /** Clock time of the last connection's open or close. */
  lastActive: number;
  /** Cores the instance's processes used over the last measurement
   * (0.5: half of one core); 0 when not measured. */
  cpu?: number;
  /** Clock time the last measurement's window began (undefined: none
   * yet). With busyCpu, an instance is idle only once a window that began
   * at or after its last activity found it quiet. */
  cpuFrom?: number;
}

export type Route = { forward: string } | { hold: true };

export type Action =
  | { kind: 'start'; reason: 'held' | 'min' | 'cpu' | 'wait' }
  /** Nothing to start: a connection has waited `waitedMs` (maxWaitMs). */
  | { kind: 'report'; reason: 'wait'; waitedMs: number; waiting: number }
  | { kind: 'suspend'; aid: string; idleMs: number }
  | { kind: 'drop'; aid: string; idleMs: number };

type Knobs = Pick<ServiceSpec, 'mode' | 'min' | 'max' | 'idleMs' | 'concurrency'> & { cpuTarget?: number; busyCpu?: number; maxWaitMs?: number };

export class Policy {
  /** Clock time of the last start or report for a connection's wait
   * (maxWaitMs). */
  private lastWait = -Infinity;

  constructor(
    readonly spec: Knobs,
    readonly clock: Clock,
  ) {}

  /** Where a new connection goes. */
  route(instances: InstanceView[]): Route {
    let best: InstanceView | undefined;
    for (const i of instances)
      if (i.state === 'running' && i.active < this.spec.concurrency && (!best || i.active < best.active || (i.active === best.active && (i.cpu ?? 0) < (best.cpu ?? 0))))
        best = i;
    return best ? { forward: best.aid } : { hold: true };
  }

  /** What to start, suspend, drop or report now, given `held` connections
   * waiting at the front door (held by serve or in a listen backlog), the
   * oldest of them waiting since clock time `heldSince`. */
  decide(instances: InstanceView[], held: number, heldSince?: number): Action[] {
    const now = this.clock.now();
    const actions: Action[] = [];
    const count = (...states: InstanceStateName[]) => instances.filter((i) => states.includes(i.state)).length;
    const starting = count('starting');
    // Instances that will exist once those starting have started.
    const live = count('running', 'starting', 'suspending', 'stopping');
    const wait = this.spec.maxWaitMs ?? 0;
    const waitedMs = heldSince === undefined ? 0 : now - heldSince;
    const overdue = wait > 0 && held > 0 && heldSince !== undefined && waitedMs >= wait && now - this.lastWait >= wait;
    if (this.spec.mode === 'restore') {
      // One instance: restored when someone waits for it. While it is being
      // suspended, the waiters wait for the suspend to end, then restore.
      if (held > 0 && live === 0) actions.push({ kind: 'start', reason: 'held' });
      if (overdue) {
        actions.push({ kind: 'report', reason: 'wait', waitedMs, waiting: held });
        this.lastWait = now;
      }
    } else {
      // Held connections beyond what starting instances will take: start
      // as many more as they need, up to max.
      let room = this.spec.max - live;
      let unserved = held - starting * this.spec.concurrency;
      while (unserved > 0 && room > 0) {
        actions.push({ kind: 'start', reason: 'held' });
        unserved -= this.spec.concurrency;
        room--;
      }
      // Every running instance busy computing: one more, one at a time.
      const running = instances.filter((i) => i.state === 'running');
      const target = this.spec.cpuTarget ?? 0;
      if (target > 0 && !actions.length && starting === 0 && room > 0 && running.length && running.every((i) => i.active > 0 && (i.cpu ?? 0) >= target)) {
        actions.push({ kind: 'start', reason: 'cpu' });
        room--;
      }
      // Waited too long for instances that were to take it: one more, or
      // if none can be started, said so.
      if (overdue && !actions.length) {
        actions.push(room > 0 ? { kind: 'start', reason: 'wait' } : { kind: 'report', reason: 'wait', waitedMs, waiting: held });
        this.lastWait = now;
        if (room > 0) room--;
      }
      let warm = count('running', 'starting') + actions.filter((a) => a.kind === 'start').length;
      while (warm < this.spec.min && room > 0) {
        actions.push({ kind: 'start', reason: 'min' });
        warm++;
        room--;
      }
    }
    if (this.spec.idleMs > 0 && held === 0) {
      const idle = instances
        .filter((i) => i.state === 'running' && i.active === 0 && now - i.lastActive >= this.spec.idleMs && !this.computing(i))
        .sort((a, b) => a.lastActive - b.lastActive);
      // Clone mode keeps min running; restore mode's one instance may go
      // to zero (it comes back with everything it had).
      const keep = this.spec.mode === 'clone' ? this.spec.min : 0;
      let running = count('running');
      for (const i of idle) {
        if (running <= keep) break;
        actions.push({ kind: this.spec.mode === 'restore' ? 'suspend' : 'drop', aid: i.aid, idleMs: now - i.lastActive });
        running--;
      }
    }
    return actions;
  }

  /** Busy by its CPU (busyCpu): not idle until a measurement over a
   * window that began at or after its last activity found it computing
   * less, however short `idleMs` is next to the window (a job started just
   * before its connection closed shows in no earlier window). */
  private computing(i: InstanceView): boolean {
    const busy = this.spec.busyCpu ?? 0;
    if (busy <= 0) return false;
    return (i.cpu ?? 0) >= busy || i.cpuFrom === undefined || i.cpuFrom < i.lastActive;
  }
}

/**
 * How long the connections in a listen backlog have waited. The kernel
 * counts them (a listening socket's accept queue, TCP_INFO) but does not
 * date them; its queue is first in, first out. So each connection is
 * dated when a sample (every pump: each accept and each tick) first
 * finds it there, and taken out, oldest first, as each accept is heard
 * of. After a sample the count is the kernel's; between samples a
 * connection that came and was accepted takes out nothing dated (none
 * dated is older than it). The dates are never earlier than the
 * connections came: a wait is understated by at most one pump, never
 * overstated.
 *
 * `acceptsHeard`: every accept from this backlog is heard of (a forwarded
 * listener: serve's own accept, or the forwarding thread's, reported after
 * the fact). A sample that finds fewer than dated takes them out then, and
 * the accepts heard of later are those same connections, not more (review30
 * L2: they were taken out twice, and waits understated). Without it (the
 * shared listener, where the instance accepts), what a sample finds gone
 * is gone.
 */
export class BacklogAge {
  /** Oldest first: when first seen, and how many of those still wait. */
  private cohorts: { at: number; n: number }[] = [];
  private dated = 0;
  /** Taken out by a sample, their accepts not heard of yet, oldest first. */
  private ahead: { at: number; n: number }[] = [];

  constructor(private readonly acceptsHeard = false) {}

  /** The backlog holds `count` now. */
  sample(count: number, now: number): void {
    // Fewer than dated: accepted, the oldest first, before it was heard of
    // (or never to be: the instance's own accept on a shared listener).
    if (count < this.dated) {
      const taken = this.take(this.dated - count);
      if (this.acceptsHeard) this.ahead.push(...taken);
    }
    if (count > this.dated) {
      this.cohorts.push({ at: now, n: count - this.dated });
      this.dated = count;
    }
  }

  /** One connection accepted from it: when the oldest one waiting was
   * first seen (the one accepted, or one that came before it), or
   * undefined if none was dated. */
  accepted(): number | undefined {
    const early = this.ahead[0];
    if (early) {
      if (!--early.n) this.ahead.shift();
      return early.at;
    }
    const at = this.cohorts[0]?.at;
    this.take(1);
    return at;
  }

  /** When the oldest still waiting was first seen; undefined: none. */
  oldest(): number | undefined {
    return this.cohorts[0]?.at;
  }

  /** How many wait, as of the last sample and the accepts since. */
  get count(): number {
    return this.dated;
  }

  /** Takes out the `n` oldest; returns them by date. */
  private take(n: number): { at: number; n: number }[] {
    const taken: { at: number; n: number }[] = [];
    while (n > 0 && this.cohorts.length) {
      const c = this.cohorts[0];
      const k = Math.min(n, c.n);
      c.n -= k;
      n -= k;
      this.dated -= k;
      taken.push({ at: c.at, n: k });
      if (!c.n) this.cohorts.shift();
    }
    return taken;
  }
}
