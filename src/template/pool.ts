/**
 * Clones made ahead of time (the resident engine only): for each template
 * cloned recently without --aid, a few instances restored in full and
 * held at the point of resuming, so that `appshot clone T` served by the
 * engine only lets one go on and commits it (~1 ms) instead of making it
 * (~10-20 ms: every process and mapping made by injected calls).
 *
 * A held instance is made exactly as one made on demand (makeInstance:
 * the template's rules applied, ports allocated, SET ENV and REDIR PATH
 * evaluated for it, a fresh identity), by the same restore that `appshot
 * serve` holds its prepared instances with (RestoreOptions.hold): every
 * process made and stopped under our ptrace, its memory mapped
 * copy-on-write from the template's page file, nothing run, nothing
 * committed. Its IDENTITY hooks run once a clone has taken it and it runs,
 * as for one made then.
 *
 * Why it is registered while held: its AID is in much of what it is
 * made of, so it is made under the AID it will have, a generated one
 * (`NAME-xxxxxx`, as a clone without --aid gets). Binding an AID asked
 * for (--aid) to a held instance is not done, because it cannot be done
 * as one step that either happens or not: the AID is
 *  - the name of its state directory (apps/AID), which its init, running
 *    already, was given with the AID itself (its commit, log and
 *    release of the registration go by them), and of its tables
 *    (/dev/shm/appshot-…-AID-…, mapped and open in every process);
 *  - in its port claims (ports/N name their owner) and the directory of
 *    its private copies (instances/AID.…);
 *  - in what its rules evaluated with <APPL-ID>: SET ENV values in each
 *    process's environment block (written in its memory before the
 *    hold), REDIR PATH targets in its tables, made as directories, and
 *    possibly opened already as its descriptors, DUPLICATE copies.
 * Renaming would rewrite memory of every process (a block of another
 * size: an injected mmap), redo the redirections of descriptors already
 * open, and move files and directories in a dozen places while init
 * runs, with no state from which a crash half-way could be undone or
 * finished by either name's cleanup. Such clones are made on demand.
 * `ps -a` shows a held instance as it is, `restoring` (registered,
 * uncommitted, not run), as it shows serve's prepared ones; `ps` leaves
 * it out (its record says heldReady until a clone takes it): it is not
 * an application anyone made yet, and `engine status` counts them.
 *
 * How much: refilled after each clone served to the largest batch asked
 * for within the last minute, at most APPSHOT_CLONE_POOL (default 32; 0:
 * none), and no more than the engine has room for (room.ts: the pools
 * together take at most half of the engine's free descriptors and of the
 * user's, the cgroup's and the system's free processes); a clone that
 * needs room the held instances take has them given up first
 * (makeRoomFor), the fewest that make it.
 * Given up (its processes killed, its registration, ports and copies
 * removed, as after an interrupted restore) when the template changes or
 * goes (checked each second as a clone's open checks it: template cache),
 * after POOL_IDLE_MS (or APPSHOT_CLONE_POOL_IDLE_MS, as the last clone's
 * environment says) without a clone of it, when memory runs low, and when
 * the engine leaves. Nothing of it outlives the engine however it ends:
 * its processes are traced with PTRACE_O_EXITKILL until committed, and
 * its init kills what is left when its lifeline (ours) ends uncommitted.
 */
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { currentRequest, requestStorage, type RequestSetting } from '../engine/request.js';
import { withOwnSettings } from '../engine/settings.js';
import { currentHolder, harnessOf } from '../holder.js';
import type { LocalRegistry } from '../registry.js';
import { stillCached } from './cache.js';
import { isShortOfRoom, type Room, roomNow, roomToHold, roomToMake, tasksChanged } from './room.js';
import { generatedAid, makeInstance, type MadeInstance } from './clone.js';
import type { OpenedTemplate } from './template.js';

/** Most instances held per template (APPSHOT_CLONE_POOL). */
const DEFAULT_CAP = 32;
/** A template's pool is given up this long after its last clone
 * (APPSHOT_CLONE_POOL_IDLE_MS, for tests and benches: a loaded machine
 * may take longer than a minute between the clones a test makes). */
const POOL_IDLE_MS = 60_000;
/** Refilling stops, and what is held is given up, below this much
 * available memory (MemAvailable) or this share of all memory. */
const LOW_MEMORY_BYTES = 256 * 2 ** 20;
const LOW_MEMORY_SHARE = 0.05;
/** Instances that failed to be made in a row before a pool gives up. */
const MOST_FAILURES = 3;
/** How many instances' descriptors a pool's need is learnt from. */
const FD_SAMPLES = 5;

interface Held {
  aid: string;
  /** The context (the engine's gate's key) it was made in. */
  key: string;
  instance: number;
  commitPath: string;
  /** Every process made and stopped (the hold reached). */
  isHeld: boolean;
  held: Promise<boolean>;
  decide: (go: boolean) => void;
  made: Promise<MadeInstance>;
}

export class Pool {
  /** By instance number: a batch's Nth instance is the Nth held (its
   * INSTANCE property and registration say which it is). */
  readonly slots = new Map<number, Held>();
  target = 0;
  lastUsed = Date.now();
  refilling = false;
  /** A clone served from it ended: refill once it has answered. */
  wanted = false;
  /** The context of the last clone that sized it: what it is refilled
   * in, and the only one its held instances are taken for. */
  setting: RequestSetting | undefined;
  failures = 0;
  constructor(
    readonly reg: LocalRegistry,
    readonly t: OpenedTemplate,
  ) {
    this.need = instanceNeed(t);
  }

  /** Instances held now. */
  heldCount(): number {
    let n = 0;
    for (const h of this.slots.values()) if (h.isHeld) n++;
    return n;
  }

  /** The highest number held (0: none). Numbers are not compact: a clone
   * takes 1..k, and k+1.. stay held (an instance's number is in what it
   * was made with: its INSTANCE property, its registration), so keeping
   * what is held means keeping up to this one. */
  highestHeld(): number {
    let top = 0;
    for (const [n, h] of this.slots) if (h.isHeld && n > top) top = n;
    return top;
  }

  /** The batch sizes asked for in the last idleMs, with when. */
  private readonly asked: { at: number; count: number }[] = [];
  /** How long it lives without a clone: the last clone's setting. */
  idleMs = POOL_IDLE_MS;
  /** How many it may hold: the last clone's APPSHOT_CLONE_POOL. Read when
   * it asks, in its context: the once-a-second check (watch) runs
   * outside any request, where the environment is the engine's own (or
   * another context's), and reading it there gave up what a client had
   * asked to be held whenever the engine was started with another
   * setting (a suite turning pools off for its other files). */
  limit = DEFAULT_CAP;
  /** Up to which number the engine had room for when it last refilled
   * (room.ts): the pool keeps none above it, whatever was asked. */
  roomFor = Infinity;
  /** The room last logged (noRoom): said once, not at each refill. */
  roomSaid: number | undefined;
  /** What one held instance takes: the engine's descriptors (learnt from
   * the instances made: see learnFds) and the user's tasks (its init and
   * every thread of the template). */
  readonly need: Room;
  /** Descriptors each of the last instances held was seen to take. */
  private readonly fdSamples: number[] = [];

  /** One more instance held, seen to take `fds` of the engine's
   * descriptors: what the engine opened or closed for anything else
   * meanwhile (a command it served) counts too, so the need is the
   * median of the last few seen, which one such spike, up or down, does
   * not move, and which follows a template whose instances take more. */
  learnFds(fds: number): void {
    this.fdSamples.push(Math.max(1, fds));
    if (this.fdSamples.length > FD_SAMPLES) this.fdSamples.shift();
    const sorted = [...this.fdSamples].sort((a, b) => a - b);
    this.need.fds = sorted[Math.floor(sorted.length / 2)];
  }

  /** A clone of `count` instances: kept from now on is the largest batch
   * asked for within the last POOL_IDLE_MS (a user who alternates single
   * clones and batches of 8 is served both), at most the cap. */
  demand(count: number): void {
    const setting = currentRequest()?.context;
    if (setting?.key !== this.setting?.key) {
      // Asked for in another context: what is held was made for the
      // last one (its ports from that APPSHOT_PORTS, files under that
      // umask) and goes; the pool is refilled for this one.
      for (const [n, h] of this.slots)
        if (h.isHeld) {
          this.slots.delete(n);
          h.decide(false);
        }
      this.setting = setting;
    }
    this.idleMs = idleLimit();
    this.limit = cap();
    this.lastUsed = Date.now();
    this.asked.push({ at: this.lastUsed, count });
    this.resize();
  }

  /** The target from the recent demand; held instances above it go. */
  resize(): void {
    const since = Date.now() - this.idleMs;
    while (this.asked.length && this.asked[0].at < since) this.asked.shift();
    this.target = Math.min(this.limit, this.roomFor, Math.max(0, ...this.asked.map((a) => a.count)));
    for (const [n, h] of this.slots)
      if (n > this.target && h.isHeld) {
        this.slots.delete(n);
        h.decide(false);
      }
  }

  /** The held instance `n` let go on and resumed, uncommitted; undefined
   * if none is held (or it could not be let go: the clone makes it). */
  async take(n: number): Promise<(MadeInstance & { commitPath: string }) | undefined> {
    const h = this.slots.get(n);
    if (!h?.isHeld || h.key !== currentRequest()?.context?.key) return undefined;
    this.slots.delete(n);
    h.decide(true);
    try {
      return { ...(await h.made), commitPath: h.commitPath };
    } catch {
      await this.reg.forgetCommit(h.commitPath);
      return undefined;
    }
  }

  /** Its registration as if this command had made it (ps's CREATED, the
   * command that made it). */
  async adopt(aid: string): Promise<void> {
    const r = this.reg.get(aid);
    if (!r) return;
    // As registry.update writes it, off this thread: a batch's are written
    // at once (~1 ms each on a busy disk, one after another).
    const file = join(r.stateDir, 'app.json');
    const { heldReady: _held, ...taken } = r;
    await writeFile(`${file}.tmp`, JSON.stringify({ ...taken, createdAt: new Date().toISOString(), ...harnessOf(currentHolder()) }, null, 2));
    await rename(`${file}.tmp`, file);
  }

  done(): void {
    this.wanted = true;
  }
}

let enabled = false;
const pools = new Map<string, Pool>();
let timer: NodeJS.Timeout | undefined;
let log: (line: string) => void = () => {};

function idleLimit(): number {
  const v = process.env.APPSHOT_CLONE_POOL_IDLE_MS;
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : POOL_IDLE_MS;
}

function cap(): number {
  const v = process.env.APPSHOT_CLONE_POOL;
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : DEFAULT_CAP;
}

/** In the engine: clones without --aid take held instances, and
 * refillClonePools makes them. */
export function enableClonePool(logLine: (line: string) => void, inContext: InContext, quiet?: () => Promise<void>): void {
  enabled = true;
  log = logLine;
  runInContext = inContext;
  requestsQuiet = quiet;
}

/** Resolves once the engine serves no request (or has waited long
 * enough): what a refill waits for before each instance it makes. */
let requestsQuiet: (() => Promise<void>) | undefined;

/** Runs `make` once the engine has set `setting` (its context gate),
 * which stays set until it resolves. */
type InContext = <T>(setting: RequestSetting, make: () => Promise<T>) => Promise<T>;
let runInContext: InContext | undefined;

/** The pool of `t`'s template for this clone, made if there is none;
 * undefined outside the engine, with APPSHOT_CLONE_POOL=0, or while
 * memory is low. One of an earlier state of the template goes. */
export function clonePoolOf(reg: LocalRegistry, t: OpenedTemplate): Pool | undefined {
  if (!enabled || cap() < 1 || memoryLow()) return undefined;
  let p = pools.get(t.path);
  if (p && (p.t.template !== t.template || p.reg.home !== reg.home)) {
    void giveUp(p, 'its template changed');
    p = undefined;
  }
  if (!p) pools.set(t.path, (p = new Pool(reg, t)));
  watch();
  return p;
}

/** Called by the engine once a request has answered: each pool a clone
 * used is refilled, one instance at a time (each competes for the CPU
 * with whatever the client does next). */
export function refillClonePools(): void {
  for (const p of pools.values()) {
    if (!p.wanted) continue;
    p.wanted = false;
    // Outside the request: what the held instances claim is the
    // engine's (held while it lives), not the ended request's. In its
    // context all the same (refill).
    requestStorage.exit(() => void refill(p));
  }
}

async function refill(p: Pool): Promise<void> {
  if (p.refilling) return;
  p.refilling = true;
  // What the engine has room for is looked at again (something may have
  // freed some since the last refill).
  p.roomFor = Infinity;
  p.resize();
  try {
    while (enabled && pools.get(p.t.path) === p) {
      let n = 1;
      while (n <= p.target && p.slots.has(n)) n++;
      if (n > p.target) {
        // Filled: a shortage found again later is said again.
        p.roomSaid = undefined;
        break;
      }
      if (memoryLow()) {
        await giveUpAll('memory is low');
        break;
      }
      if (!roomToHold(roomNow(), heldNeeds(), p.need)) {
        // No more: what it holds is what it keeps until room is found
        // (at its next refill).
        noRoom(p, n);
        break;
      }
      // Each instance takes this thread for a while (its processes made
      // by injected calls): a refill of hundreds would answer nobody else
      // for as long. So each waits for the requests being served to end,
      // and for the event loop to turn (their I/O first).
      await new Promise<void>((r) => setImmediate(r));
      if (requestsQuiet) await requestsQuiet();
      if (!enabled || pools.get(p.t.path) !== p) break;
      const setting = p.setting;
      if (!setting || !runInContext) break;
      let held = false;
      const fdsBefore = openFds();
      let made: Held | undefined;
      try {
        // Made through the engine's gate, in the context of the command
        // that asked for it, while no command of another runs: held, it
        // has read what it needs of it.
        held = await runInContext(setting, () => (made = hold(p, n, setting.key)).held);
      } catch (e) {
        log(`clone pool: cannot set the context of ${p.t.path}'s clones: ${(e as Error).message}`);
      }
      // The descriptors it keeps open in the engine, as far as can be
      // seen (learnFds), and its tasks, which the user's count, reused for
      // a second, did not see start (room.ts).
      if (held) {
        p.learnFds(openFds() - fdsBefore);
        tasksChanged(p.need.tasks);
      } else if (made && (await made.made.then(() => false, isShortOfRoom))) {
        noRoom(p, n);
        break;
      }
      const h = p.slots.get(n);
      if (h && h.key !== p.setting?.key && h.isHeld) {
        // Asked for in another context meanwhile.
        p.slots.delete(n);
        h.decide(false);
      }
      if (held) p.failures = 0;
      else if (++p.failures >= MOST_FAILURES) {
        await giveUp(p, 'its instances cannot be made');
        break;
      }
    }
  } finally {
    p.refilling = false;
  }
}

/** `p` has no room for its instance `n` (the lowest number free): what
 * it holds is what it keeps, numbered above `n` as well (a clone took
 * those below), until its next refill finds room again. */
function noRoom(p: Pool, n: number): void {
  p.roomFor = Math.max(n - 1, p.highestHeld());
  const held = p.heldCount();
  if (p.roomSaid !== held)
    log(`clone pool of ${p.t.path}: room for ${held} held instance(s) only (the engine's descriptors, the user's, the cgroup's or the system's processes)`);
  p.roomSaid = held;
  p.resize();
}

/** Descriptors the engine has open. */
function openFds(): number {
  try {
    return readdirSync('/proc/self/fd').length;
  } catch {
    return 0;
  }
}

/** What one instance of `t` takes (a first guess at its descriptors,
 * learnt better once one is held). */
function instanceNeed(t: OpenedTemplate): Room {
  const threads = t.loaded.image.processes.reduce((n, p) => n + Math.max(1, p.threads.length), 0);
  return { fds: 8, tasks: threads + 1 };
}

/** What every pool holds, together. */
function heldNeeds(): Room {
  const total: Room = { fds: 0, tasks: 0 };
  for (const p of pools.values()) {
    const n = p.heldCount();
    total.fds += n * p.need.fds;
    total.tasks += n * p.need.tasks;
  }
  return total;
}

/**
 * Before a clone makes an instance of `t` on demand: if the engine's
 * descriptors or the user's processes are short of what it needs and
 * anything is held, held instances are given up until they are not
 * (shrinking the pools rather than failing the clone): other templates'
 * first, then those of `own` (the clone's pool) numbered above `keepUpTo`
 * (what the clone has left to take), the highest first.
 */
export async function makeRoomFor(t: OpenedTemplate, own: Pool | undefined, keepUpTo: number): Promise<void> {
  if (!anyHeld()) return;
  const need = own?.need ?? instanceNeed(t);
  const order: [Pool, number, Held][] = [];
  for (const p of pools.values()) if (p !== own) for (const [n, h] of p.slots) if (h.isHeld) order.push([p, n, h]);
  order.sort((a, b) => b[1] - a[1]);
  if (own) for (const [n, h] of [...own.slots].sort((a, b) => b[0] - a[0])) if (h.isHeld && n > keepUpTo) order.push([own, n, h]);
  let given = 0;
  // Read once: what each instance given up frees is added to it. (Read
  // again, the user's tasks would be the count of a moment ago, reused
  // for a second: no room seen freed, every held instance given up.)
  const room = roomNow();
  for (const [p, n, h] of order) {
    if (roomToMake(room, need)) break;
    if (p.slots.get(n) !== h) continue;
    p.slots.delete(n);
    // Kept smaller from now on, until it finds room again: what it still
    // holds, whatever numbers those have.
    p.roomFor = Math.min(p.roomFor, p.highestHeld());
    h.decide(false);
    await h.made.catch(() => undefined);
    room.fds += p.need.fds;
    room.tasks += p.need.tasks;
    tasksChanged(-p.need.tasks);
    given++;
  }
  if (given) log(`clone pool: ${given} held instance(s) given up to make room for a clone of ${t.path}`);
}

/** Whether any pool holds an instance. */
export function anyHeld(): boolean {
  for (const p of pools.values()) if (p.heldCount() > 0) return true;
  return false;
}

/** Starts making instance `n` of `p` to be held. */
function hold(p: Pool, n: number, key: string): Held {
  let decide!: (go: boolean) => void;
  const decision = new Promise<boolean>((r) => (decide = r));
  let heldNow!: (held: boolean) => void;
  const held = new Promise<boolean>((r) => (heldNow = r));
  const aid = generatedAid(p.reg, p.t);
  const commitPath = p.reg.newCommitPath();
  const h: Held = { aid, key, instance: n, commitPath, isHeld: false, held, decide, made: undefined as unknown as Promise<MadeInstance> };
  p.slots.set(n, h);
  h.made = makeInstance(p.reg, p.t, {
    aid,
    instance: n,
    commitPath,
    hold: () => {
      h.isHeld = true;
      heldNow(true);
      return decision;
    },
  });
  h.made.catch((e: Error) => {
    heldNow(false);
    if (p.slots.get(n) === h) p.slots.delete(n);
    // Given up (the decision false) or failed: its commit file goes, and
    // whatever stands under its name (only a clone that took it links it).
    void p.reg.forgetCommit(commitPath).then(() => rmSync(commitPath, { force: true }));
    if (h.isHeld === false) log(`clone pool: instance of ${p.t.path} not made: ${e.message}`);
  });
  return h;
}

/** Gives up `p`: its held instances go (what they made removed). */
async function giveUp(p: Pool, why: string): Promise<void> {
  if (pools.get(p.t.path) === p) pools.delete(p.t.path);
  const held = [...p.slots.values()];
  p.slots.clear();
  if (held.length) log(`clone pool of ${p.t.path} given up (${held.length} held): ${why}`);
  for (const h of held) h.decide(false);
  await Promise.all(held.map((h) => h.made.catch(() => undefined)));
  if (!pools.size && timer) {
    clearInterval(timer);
    timer = undefined;
  }
}

/** Every pool given up: the engine leaving, memory low. Resolves once
 * every held instance is gone. */
export async function giveUpAll(why: string): Promise<void> {
  await Promise.all([...pools.values()].map((p) => giveUp(p, why)));
}

/** The engine leaves: nothing more is held or made. */
export async function releaseClonePools(): Promise<void> {
  enabled = false;
  await giveUpAll('the engine is leaving');
}

/** Per template: instances held, and how many are kept (engine status). */
export const clonePoolStats = () => Object.fromEntries([...pools].map(([path, p]) => [path, { held: [...p.slots.values()].filter((h) => h.isHeld).length, target: p.target }]));

/** Once a second while any pool exists: each is given up if its template
 * changed or went, if it was not used for its idleMs, or if memory is
 * low. */
function watch(): void {
  if (timer) return;
  // Made by the first clone that wanted a pool, but the engine's upkeep,
  // not that command's: a timer keeps the async context it was made in,
  // so made there every tick, and whatever it starts (giving pools up),
  // would read that client's scoped settings (its APPSHOT_DEBUG...) and
  // write to its long-ended request for as long as the engine lives
  // (review r428 F5). Made outside any request, with the engine's own.
  timer = requestStorage.exit(() => withOwnSettings(() => setInterval(watchTick, 1000)));
  timer.unref();
}

function watchTick(): void {
  if (memoryLow()) {
    void giveUpAll('memory is low');
    return;
  }
  for (const p of pools.values()) {
    if (Date.now() - p.lastUsed > p.idleMs) void giveUp(p, `not used for ${p.idleMs / 1000} s`);
    else if (!stillCached(p.t)) void giveUp(p, 'its template changed or was removed');
    else p.resize();
  }
}

function memoryLow(): boolean {
  try {
    const m = readFileSync('/proc/meminfo', 'utf8');
    const avail = Number(/^MemAvailable:\s+(\d+) kB/m.exec(m)?.[1]) * 1024;
    const total = Number(/^MemTotal:\s+(\d+) kB/m.exec(m)?.[1]) * 1024;
    if (!Number.isFinite(avail) || !Number.isFinite(total)) return false;
    return avail < LOW_MEMORY_BYTES || avail < total * LOW_MEMORY_SHARE;
  } catch {
    return false;
  }
}
