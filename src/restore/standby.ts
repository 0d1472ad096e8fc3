/**
 * Supervisors started ahead of time: appshot-init standbys (see "A
 * standby" in addon/init/appshot_init.c), each with its seeds forked
 * already, kept by the resident engine so that a restore there (above all
 * each instance of a batch of clones) does not wait for a supervisor to be
 * spawned, linked and to fork its seeds. It takes one, gives it the rest
 * of its arguments (tables, state directory, AID, commit file, log), and
 * another is started in its place, which gets ready while the restore
 * goes on. Only in the engine (enableStandbys): a CLI process restores once
 * and has nothing to gain.
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

/** A supervisor started: its status pipe (read end) and lifeline (write
 * end), both ours to close. */
export interface StartedInit {
  pid: number;
  statusFd: number;
  lifelineFd: number;
}

/** Standbys kept per seed count (the processes a restore roots in init:
 * one for most applications); counts above the last are not kept. */
const KEPT = 2;
const MOST_SEEDS = 4;
const kept = new Map<number, { ready: StartedInit[]; starting: number }>();
let enabled = false;

export function enableStandbys(): void {
  enabled = true;
}

/** APPSHOT_STANDBYS=0: none taken (for comparison), as outside the engine. */
const wanted = () => process.env.APPSHOT_STANDBYS !== '0';

/** Standbys kept now, by seed count (engine status). */
export const standbyStats = () => Object.fromEntries([...kept].map(([count, k]) => [count, k.ready.length]));

/** Starts standbys until `count`'s are KEPT, off this thread: posix_spawn
 * holds its caller until the exec, most of what a supervisor costs to
 * start, and a restore goes on meanwhile. */
function refill(count: number): void {
  const k = kept.get(count)!;
  while (k.ready.length + k.starting < KEPT) {
    k.starting++;
    const out = openSync('/dev/null', 'w');
    addon()
      .spawnDetachedAsync(paths.init, [paths.init, '--standby', '1', '--preload', paths.preload, '--status-fd', '3', '--seeds', String(count), '--lifeline', '4'], out)
      .then(
        (s) => k.ready.push(s),
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

function letGo(s: StartedInit): void {
  closeSync(s.statusFd);
  closeSync(s.lifelineFd);
}

/**
 * A supervisor for the application `args` describe, with `count` seeds,
 * from the standbys: given its arguments, it goes on as one started with
 * them; its status pipe then reports its seeds ("C") and its start ("S")
 * as a fresh one's does. undefined if none is kept (outside the engine,
 * the first restore of this many seeds, or one that died meanwhile): the
 * caller starts one itself. Another is started in its place either way.
 */
export function takeStandby(count: number, args: { tables: string; stateDir: string; aid: string; commitPath: string; logPath: string }): StartedInit | undefined {
  const fields = [args.tables, args.stateDir, args.aid, args.commitPath, args.logPath];
  if (!enabled || !wanted() || count < 1 || count > MOST_SEEDS || fields.some((f) => !f || f.includes('\0'))) return undefined;
  const message = Buffer.from(`${fields.join('\0')}\0\0`);
  let k = kept.get(count);
  if (!k) kept.set(count, (k = { ready: [], starting: 0 }));
  let taken: StartedInit | undefined;
  while (!taken && k.ready.length) {
    const s = k.ready.shift()!;
    try {
      // Far below a pipe's capacity: never blocks, never partial.
      if (writeSync(s.lifelineFd, message) !== message.length) throw new Error('not written');
      taken = s;
    } catch {
      // Gone (EPIPE): its seeds went with it.
      letGo(s);
    }
  }
  refill(count);
  return taken;
}
