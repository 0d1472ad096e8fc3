/**
 * Supervisors started ahead of time: appshot-init standbys (see "A
 * standby" in addon/init/appshot_init.c), each with its seeds forked
 * already, kept by the resident engine so that a restore there (above all
 * each instance of a batch of clones) does not wait for a supervisor to be
 * spawned, linked and to fork its seeds. It takes one, gives it the rest
 * of its arguments (tables, state directory, AID, commit file, log), and
 * another is started in its place, which gets ready while the restore
 * goes on. Only in the engine and in `appshot serve` (enableStandbys),
 * which restore again and again: a CLI process restores once and has
 * nothing to gain.
 *
 * Nothing of a standby outlives the engine, however the engine ends (exit,
 * crash, kill -9): a standby's only channel is its lifeline, whose one
 * write end is the engine's (close-on-exec, so no other child holds it).
 * When the kernel closes it, the standby, still waiting for its arguments,
 * kills its seeds and exits without having touched anything; its seeds
 * carry a parent-death SIGKILL, so they go even if the standby itself is
 * killed first (the restore that takes them clears it: attributes.ts).
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import { addon, paths } from '../native.js';
import { readStat } from '../procfs.js';

/** A supervisor started: its status pipe (read end) and lifeline (write
 * end), both ours to close. */
export interface StartedInit {
  pid: number;
  statusFd: number;
  lifelineFd: number;
  /** A standby's start time (/proc/PID/stat), read as soon as it is up,
   * off the restore that takes it: what its registration names its init
   * by (with its PID). A restore uses it only once it has seen the
   * standby alive (its seeds still its children, seized): alive then, it
   * was alive when this was read, the same process. */
  startTime?: number;
}

/** Standbys kept per seed count (the processes a restore roots in init:
 * one for most applications) by default (the engine's batches of clones
 * take several at once); counts above the last are not kept. */
const KEPT = 2;
const MOST_SEEDS = 4;
const kept = new Map<number, { ready: StartedInit[]; starting: number }>();
let enabled = false;
let keep = KEPT;
let refillAfterMs = 0;

/**
 * From now on, a restore takes a standby, and `keepPerCount` are kept for
 * each seed count asked for (by a restore or warmStandbys). One taken is
 * replaced at once, or `refillAfterMs` later: `appshot serve` restores one
 * application at a time while a client waits, and a standby started
 * meanwhile (a spawn, an exec, a fork) competes with it for the CPU.
 */
export function enableStandbys(opts: { keepPerCount?: number; refillAfterMs?: number } = {}): void {
  enabled = true;
  keep = Math.max(1, opts.keepPerCount ?? KEPT);
  refillAfterMs = opts.refillAfterMs ?? 0;
}

/** Whether restores take standbys (enabled, and not APPSHOT_STANDBYS=0). */
export const standbysWanted = (): boolean => enabled && wanted();

/** Starts standbys for `count` seeds now, ahead of the first restore that
 * needs them (`appshot serve`: the seed counts of its suspended
 * services), and keeps them replenished from then on. */
export function warmStandbys(count: number): void {
  if (!standbysWanted() || count < 1 || count > MOST_SEEDS) return;
  if (!kept.has(count)) kept.set(count, { ready: [], starting: 0 });
  refill(count);
}

/**
 * Ends every standby kept, and any being started once it is (`appshot
 * serve` stopping: none outlives it, even in a process that goes on, as a
 * test's does); restores take none until enableStandbys again. The
 * standbys see their lifelines end, kill their seeds and exit; the
 * caller's reapDetached waits for them.
 */
export function releaseStandbys(): void {
  enabled = false;
  for (const k of kept.values()) for (const s of k.ready.splice(0)) letGo(s);
}

/** PIDs of the standbys kept now (not yet taken). */
export const standbyPids = (): number[] => [...kept.values()].flatMap((k) => k.ready.map((s) => s.pid));

/** APPSHOT_STANDBYS=0: none taken (for comparison), as outside the engine. */
const wanted = () => process.env.APPSHOT_STANDBYS !== '0';

/** Standbys kept now, by seed count (engine status). */
export const standbyStats = () => Object.fromEntries([...kept].map(([count, k]) => [count, k.ready.length]));

/** Starts standbys until `count`'s are KEPT, off this thread: posix_spawn
 * holds its caller until the exec, most of what a supervisor costs to
 * start, and a restore goes on meanwhile. */
function refill(count: number): void {
  const k = kept.get(count)!;
  while (k.ready.length + k.starting < keep) {
    k.starting++;
    const out = openSync('/dev/null', 'w');
    addon()
      .spawnDetachedAsync(paths.init, [paths.init, '--standby', '1', '--preload', paths.preload, '--status-fd', '3', '--seeds', String(count), '--lifeline', '4'], out)
      .then(
        (s) => {
          // Released while it started (releaseStandbys): it goes at once.
          if (enabled) k.ready.push({ ...s, startTime: readStat(s.pid)?.startTime });
          else letGo(s);
        },
        () => {
          /* none this time: a restore starts its own supervisor */
        },
      )
      .finally(() => {
        k.starting--;
        closeSync(out);
      });
  }
}

/** Ends a standby taken but not given its arguments: it sees its
 * lifeline end, kills its seeds and exits. */
export function letGo(s: StartedInit): void {
  closeSync(s.statusFd);
  closeSync(s.lifelineFd);
}

/**
 * A standby with `count` seeds, taken out of those kept (another is
 * started in its place), for configure(); undefined if none is ready
 * (outside the engine, the first restore of this many seeds): the restore
 * starts a supervisor itself. Taken before the application is registered,
 * so that its registration names its init from the start (one write of
 * it fewer); letGo() if the restore fails before configure().
 */
export function reserveStandby(count: number): StartedInit | undefined {
  if (!standbysWanted() || count < 1 || count > MOST_SEEDS) return undefined;
  let k = kept.get(count);
  if (!k) kept.set(count, (k = { ready: [], starting: 0 }));
  const s = k.ready.shift();
  if (refillAfterMs > 0) setTimeout(() => enabled && refill(count), refillAfterMs).unref();
  // Another is ready for the next restore: the replacement is started
  // once this restore has ended (refillAfterRestore). Started now, its
  // spawn, exec and seed forks ran on the second of this machine's two
  // cores while the restore's tracer and tracee take turns on the first,
  // and with anything else running the restore waited for a core. None
  // left (the instances of a batch of clones take one after another):
  // started at once, so that the next restore finds one.
  else if (s && k.ready.length > 0) refillLater.add(count);
  else refill(count);
  return s;
}

/** Seed counts whose standby taken is replaced once its restore ends. */
const refillLater = new Set<number>();

/** A restore that reserved a standby (reserveStandby) has ended, however:
 * the standby it took is replaced now if that was put off. */
export function refillAfterRestore(count: number): void {
  if (refillLater.delete(count) && enabled) refill(count);
}

/**
 * Gives a reserved standby the rest of its arguments: it goes on as a
 * supervisor started with them would, its status pipe reporting its seeds
 * ("C") and its start ("S"). false if it is gone (it took its seeds with
 * it; its descriptors are closed): the caller starts one itself.
 */
export function configure(s: StartedInit, args: { tables: string; stateDir: string; aid: string; commitPath: string; logPath: string }): boolean {
  const fields = [args.tables, args.stateDir, args.aid, args.commitPath, args.logPath];
  try {
    if (fields.some((f) => !f || f.includes('\0'))) throw new Error('not a field');
    const message = Buffer.from(`${fields.join('\0')}\0\0`);
    // Far below a pipe's capacity: never blocks, never partial.
    if (writeSync(s.lifelineFd, message) !== message.length) throw new Error('not written');
    return true;
  } catch {
    // Gone (EPIPE), or arguments it cannot take.
    letGo(s);
    return false;
  }
}
