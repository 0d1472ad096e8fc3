/**
 * The scheduling policy of `appshot serve` on a clock the test advances:
 * routing by open connections, starting for held connections, suspending
 * or dropping after idle, min kept warm. No sleeps, no servers: this is the
 * decision table; test/serve.test.ts runs it for real.
 */
import { describe, expect, it } from 'vitest';
import { BacklogAge, FakeClock, type InstanceView, Policy } from '../src/serve/policy.js';

const restoreKnobs = { mode: 'restore' as const, min: 0, max: 1, idleMs: 1000, concurrency: 2 };
const cloneKnobs = { mode: 'clone' as const, min: 1, max: 4, idleMs: 1000, concurrency: 2 };

describe('serve policy', () => {
  it('routes to the running instance with the fewest connections, holds when every one is full', () => {
    const p = new Policy(cloneKnobs, new FakeClock());
    const i = (aid: string, active: number, state: InstanceView['state'] = 'running'): InstanceView => ({ aid, state, active, lastActive: 0 });
    expect(p.route([i('a', 1), i('b', 0)])).toEqual({ forward: 'b' });
    expect(p.route([i('a', 2), i('b', 1)])).toEqual({ forward: 'b' });
    expect(p.route([i('a', 2), i('b', 2)])).toEqual({ hold: true });
    expect(p.route([i('a', 0, 'starting'), i('b', 0, 'suspended')])).toEqual({ hold: true });
  });

  it('restore mode: restores when a connection waits, suspends after idle, not while connections are open or held', () => {
    const clock = new FakeClock(10_000);
    const p = new Policy(restoreKnobs, clock);
    const db: InstanceView = { aid: 'db', state: 'suspended', active: 0, lastActive: clock.now() };
    expect(p.decide([db], 0)).toEqual([]);
    expect(p.decide([db], 3)).toEqual([{ kind: 'start', reason: 'held' }]);
    // Being restored, or being suspended: the held wait, nothing more starts.
    expect(p.decide([{ ...db, state: 'starting' }], 3)).toEqual([]);
    expect(p.decide([{ ...db, state: 'suspending' }], 3)).toEqual([]);
    // A crashed instance is restored for the next connection.
    expect(p.decide([{ ...db, state: 'crashed' }], 1)).toEqual([{ kind: 'start', reason: 'held' }]);

    db.state = 'running';
    clock.advance(999);
    expect(p.decide([db], 0)).toEqual([]);
    clock.advance(1);
    expect(p.decide([db], 0)).toEqual([{ kind: 'suspend', aid: 'db', idleMs: 1000 }]);
    expect(p.decide([{ ...db, active: 1 }], 0)).toEqual([]);
    expect(p.decide([db], 1)).toEqual([]);
    // A connection that closed resets the idle time.
    db.lastActive = clock.now();
    clock.advance(500);
    expect(p.decide([db], 0)).toEqual([]);
  });

  it('busy CPU: an instance computing is not idle, connections or not; its idle time starts once it computes less', () => {
    const clock = new FakeClock(0);
    const p = new Policy({ ...restoreKnobs, idleMs: 500, busyCpu: 0.1 }, clock);
    const db: InstanceView = { aid: 'db', state: 'running', active: 0, lastActive: 0, cpu: 0.5, cpuFrom: 0 };
    clock.advance(10_000);
    // Measured busy (however long since its last connection): kept.
    expect(p.decide([db], 0)).toEqual([]);
    // Measured quiet, over a window that began at its last activity (the
    // server sets lastActive at each window that found it busy): idle by
    // its lastActive.
    db.cpu = 0.05;
    db.lastActive = clock.now();
    db.cpuFrom = clock.now();
    clock.advance(499);
    expect(p.decide([db], 0)).toEqual([]);
    clock.advance(1);
    expect(p.decide([db], 0)).toEqual([{ kind: 'suspend', aid: 'db', idleMs: 500 }]);
    // Quiet, but over a window that began before its last connection
    // closed (a job it started then shows in no window yet), or not
    // measured at all: kept until a window after it says so.
    expect(p.decide([{ ...db, cpuFrom: db.lastActive - 1 }], 0)).toEqual([]);
    expect(p.decide([{ ...db, cpuFrom: undefined }], 0)).toEqual([]);
    // Without busyCpu, CPU keeps nothing.
    const plain = new Policy({ ...restoreKnobs, idleMs: 500 }, clock);
    expect(plain.decide([{ ...db, cpu: 0.9 }], 0)).toEqual([{ kind: 'suspend', aid: 'db', idleMs: 500 }]);
  });

  it('restore mode with idle 0 never suspends', () => {
    const clock = new FakeClock();
    const p = new Policy({ ...restoreKnobs, idleMs: 0 }, clock);
    clock.advance(1e9);
    expect(p.decide([{ aid: 'db', state: 'running', active: 0, lastActive: 0 }], 0)).toEqual([]);
  });

  it('clone mode: keeps min warm, starts enough for the held up to max, drops idle ones down to min, oldest first', () => {
    const clock = new FakeClock(0);
    const p = new Policy(cloneKnobs, clock);
    expect(p.decide([], 0)).toEqual([{ kind: 'start', reason: 'min' }]);
    const run = (aid: string, active: number, lastActive = clock.now()): InstanceView => ({ aid, state: 'running', active, lastActive });
    // 7 held, one full instance, concurrency 2: three more (to max 4).
    expect(p.decide([run('w1', 2)], 7)).toEqual([
      { kind: 'start', reason: 'held' },
      { kind: 'start', reason: 'held' },
      { kind: 'start', reason: 'held' },
    ]);
    // Those starting count: 3 held, one starting (takes 2): one more.
    expect(p.decide([run('w1', 2), { aid: 'w2', state: 'starting', active: 0, lastActive: 0 }], 3)).toEqual([{ kind: 'start', reason: 'held' }]);
    // At max: the held wait.
    expect(p.decide(['a', 'b', 'c', 'd'].map((x) => run(x, 2)), 5)).toEqual([]);

    const fleet = [run('w1', 0, 100), run('w2', 0, 50), run('w3', 1, 0), run('w4', 0, 200)];
    clock.advance(1150);
    // w2 (idle 1100) goes; w1 (1050) too; w4 (950) not yet; w3 is busy.
    expect(p.decide(fleet, 0)).toEqual([
      { kind: 'drop', aid: 'w2', idleMs: 1100 },
      { kind: 'drop', aid: 'w1', idleMs: 1050 },
    ]);
    clock.advance(1000);
    fleet[2].active = 0;
    // All idle: down to min (1), the most recently used stays.
    expect(p.decide(fleet, 0).map((a) => a.kind === 'drop' && a.aid)).toEqual(['w3', 'w2', 'w1']);
  });
  it('clone mode with a CPU target: one more when every running instance is busy computing, none while one starts or at max', () => {
    const clock = new FakeClock(0);
    const p = new Policy({ ...cloneKnobs, cpuTarget: 0.8 }, clock);
    const run = (aid: string, active: number, cpu: number): InstanceView => ({ aid, state: 'running', active, lastActive: 0, cpu });
    // Below concurrency, nothing held: connections alone start nothing.
    expect(new Policy(cloneKnobs, clock).decide([run('w1', 1, 1.0)], 0)).toEqual([]);
    expect(p.decide([run('w1', 1, 1.0)], 0)).toEqual([{ kind: 'start', reason: 'cpu' }]);
    expect(p.decide([run('w1', 1, 0.9), run('w2', 1, 0.85)], 0)).toEqual([{ kind: 'start', reason: 'cpu' }]);
    // One of them has room to compute, or serves nothing: no.
    expect(p.decide([run('w1', 1, 0.9), run('w2', 1, 0.3)], 0)).toEqual([]);
    expect(p.decide([run('w1', 1, 0.9), run('w2', 0, 0.9)], 0)).toEqual([]);
    // One at a time: not while another starts; never beyond max.
    expect(p.decide([run('w1', 1, 1.0), { aid: 'w2', state: 'starting', active: 0, lastActive: 0 }], 0)).toEqual([]);
    expect(p.decide(['a', 'b', 'c', 'd'].map((x) => run(x, 1, 1.0)), 0)).toEqual([]);
    // Routing: of two with as many connections, the one computing less.
    expect(p.route([run('w1', 1, 0.9), run('w2', 1, 0.2)])).toEqual({ forward: 'w2' });
    expect(p.route([run('w1', 0, 0.9), run('w2', 1, 0.2)])).toEqual({ forward: 'w1' });
  });

  it('clone mode with a maximum wait: a connection waiting that long for a start that crawls starts one more, one per wait, up to max', () => {
    const clock = new FakeClock(0);
    const p = new Policy({ ...cloneKnobs, min: 0, concurrency: 1, maxWaitMs: 2000 }, clock);
    const starting = (aid: string): InstanceView => ({ aid, state: 'starting', active: 0, lastActive: 0 });
    // One held, one starting to take it: nothing more, until it has waited 2 s.
    const since = clock.now();
    expect(p.decide([starting('w1')], 1, since)).toEqual([]);
    clock.advance(1999);
    expect(p.decide([starting('w1')], 1, since)).toEqual([]);
    clock.advance(1);
    expect(p.decide([starting('w1')], 1, since)).toEqual([{ kind: 'start', reason: 'wait' }]);
    // Asked again at once (every tick asks): not another for the same wait.
    expect(p.decide([starting('w1'), starting('w2')], 1, since)).toEqual([]);
    clock.advance(2000);
    expect(p.decide([starting('w1'), starting('w2')], 1, since)).toEqual([{ kind: 'start', reason: 'wait' }]);
    // Never beyond max (4): said instead.
    clock.advance(2000);
    expect(p.decide([starting('w1'), starting('w2'), starting('w3'), starting('w4')], 1, since)).toEqual([{ kind: 'report', reason: 'wait', waitedMs: 6000, waiting: 1 }]);
    // Without the knob, the wait decides nothing; a fresh wait neither.
    const plain = new Policy({ ...cloneKnobs, min: 0, concurrency: 1 }, clock);
    expect(plain.decide([starting('w1')], 1, 0)).toEqual([]);
    expect(new Policy({ ...cloneKnobs, min: 0, concurrency: 1, maxWaitMs: 2000 }, clock).decide([starting('w1')], 1, clock.now() - 100)).toEqual([]);
  });

  it('clone mode with a maximum wait at max: the wait is reported instead, once per wait; not when this decision starts some', () => {
    const clock = new FakeClock(0);
    const p = new Policy({ ...cloneKnobs, min: 0, max: 2, concurrency: 1, maxWaitMs: 1000 }, clock);
    const run = (aid: string): InstanceView => ({ aid, state: 'running', active: 1, lastActive: 0 });
    const since = clock.now();
    clock.advance(999);
    expect(p.decide([run('w1'), run('w2')], 3, since)).toEqual([]);
    clock.advance(1);
    expect(p.decide([run('w1'), run('w2')], 3, since)).toEqual([{ kind: 'report', reason: 'wait', waitedMs: 1000, waiting: 3 }]);
    clock.advance(999);
    expect(p.decide([run('w1'), run('w2')], 3, since)).toEqual([]);
    clock.advance(1);
    expect(p.decide([run('w1'), run('w2')], 3, since)).toEqual([{ kind: 'report', reason: 'wait', waitedMs: 2000, waiting: 3 }]);
    // Below max, 2 held for one full instance: started for the number
    // held, and that answers the wait too.
    clock.advance(1000);
    expect(p.decide([run('w1')], 2, since)).toEqual([{ kind: 'start', reason: 'held' }]);
  });

  it('restore mode with a maximum wait: a restore that keeps its connections waiting that long is reported, once per wait', () => {
    const clock = new FakeClock(0);
    const p = new Policy({ ...restoreKnobs, maxWaitMs: 500 }, clock);
    const db: InstanceView = { aid: 'db', state: 'suspended', active: 0, lastActive: 0 };
    const since = clock.now();
    expect(p.decide([db], 4, since)).toEqual([{ kind: 'start', reason: 'held' }]);
    clock.advance(499);
    expect(p.decide([{ ...db, state: 'starting' }], 4, since)).toEqual([]);
    clock.advance(1);
    expect(p.decide([{ ...db, state: 'starting' }], 4, since)).toEqual([{ kind: 'report', reason: 'wait', waitedMs: 500, waiting: 4 }]);
    expect(p.decide([{ ...db, state: 'starting' }], 4, since)).toEqual([]);
    // Nothing waiting, or not yet for long: nothing reported.
    clock.advance(500);
    expect(p.decide([{ ...db, state: 'starting' }], 0, since)).toEqual([]);
    expect(p.decide([{ ...db, state: 'starting' }], 4, clock.now() - 100)).toEqual([]);
    // Without the knob, never.
    expect(new Policy(restoreKnobs, clock).decide([{ ...db, state: 'starting' }], 4, 0)).toEqual([]);
  });

  it('a forwarded listen backlog: accepts a sample saw first are not taken out again when heard of', () => {
    const b = new BacklogAge(true);
    b.sample(10, 0);
    b.sample(7, 100); // three accepted, not heard of yet
    expect([b.accepted(), b.accepted(), b.accepted()]).toEqual([0, 0, 0]);
    expect([b.count, b.oldest()]).toEqual([7, 0]);
    b.sample(7, 200);
    expect(b.count).toBe(7);
    // Then one accepted and heard of before any sample: taken out here.
    expect(b.accepted()).toBe(0);
    expect(b.count).toBe(6);
  });

  it('a listen backlog: each connection dated when first seen there, taken out oldest first as accepted, so its wait starts a clone too', () => {
    const clock = new FakeClock(0);
    const b = new BacklogAge();
    expect(b.oldest()).toBeUndefined();
    b.sample(3, clock.now()); // t 0: 3 wait
    clock.advance(200);
    b.sample(5, clock.now()); // t 200: 2 more
    expect([b.count, b.oldest()]).toEqual([5, 0]);
    // Three accepted: the three of t 0 (first in, first out).
    expect([b.accepted(), b.accepted(), b.accepted()]).toEqual([0, 0, 0]);
    expect([b.count, b.oldest()]).toEqual([2, 200]);
    // The kernel says 1: one was accepted unheard of (the oldest).
    clock.advance(200);
    b.sample(1, clock.now());
    expect([b.count, b.oldest()]).toEqual([1, 200]);
    // Accepts beyond those dated (came and went between samples): nothing
    // older is claimed.
    expect([b.accepted(), b.accepted()]).toEqual([200, undefined]);
    expect([b.count, b.oldest()]).toEqual([0, undefined]);
    clock.advance(200);
    b.sample(0, clock.now());
    b.sample(2, clock.now());
    expect(b.oldest()).toBe(600);

    // The policy, a clone crawling, one connection held since t 2000 (just
    // accepted, the --max-held room) and the backlog since t 600: the
    // backlog's age is the wait.
    const p = new Policy({ ...cloneKnobs, min: 0, concurrency: 1, maxWaitMs: 2000 }, clock);
    clock.advance(2000 - clock.now());
    const heldSince = Math.min(clock.now(), b.oldest()!);
    const starting: InstanceView = { aid: 'w1', state: 'starting', active: 0, lastActive: 0 };
    // 3 waiting, 1 starting to take one: the held rule starts 2 more.
    expect(p.decide([starting], 1 + b.count, heldSince)).toEqual([
      { kind: 'start', reason: 'held' },
      { kind: 'start', reason: 'held' },
    ]);
    const three = ['w1', 'w2', 'w3'].map((aid) => ({ ...starting, aid }));
    clock.advance(599);
    expect(p.decide(three, 1 + b.count, heldSince)).toEqual([]);
    clock.advance(1); // t 2600: the backlog's oldest has waited 2 s
    expect(p.decide(three, 1 + b.count, heldSince)).toEqual([{ kind: 'start', reason: 'wait' }]);
    // Held alone (the backlog not counted) it would have waited on.
    expect(new Policy({ ...cloneKnobs, min: 0, concurrency: 1, maxWaitMs: 2000 }, clock).decide(three, 1, 2000)).toEqual([]);
  });
});
