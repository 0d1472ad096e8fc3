/**
 * The room the engine has for clones held ready (pool.ts): each held
 * instance keeps descriptors open in the engine (its page file, its log,
 * its tables, the pipes to its init and processes: ~6 for a one-process
 * app, more for one with listeners or connections to hand over) and
 * processes of the user alive (its init and every thread of every
 * process of the template). 32 per template, several templates, could
 * take the engine's RLIMIT_NOFILE or the user's RLIMIT_NPROC (or the
 * system's PIDs) from the commands it serves and from the user's own
 * programs. So the pools together keep to half of what is free of each,
 * counting what they hold as free (they give it up when asked: see
 * makeRoom), and a clone that needs more than is free has the pools give
 * up instances first rather than fail.
 *
 * Read from /proc when asked (once per refill, and before an instance
 * made on demand while instances are held): the engine's own descriptors
 * and limits, the tasks of the user (only when its RLIMIT_NPROC is
 * finite) and of the system.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';

export interface Room {
  /** Descriptors the engine may still open, and tasks the user and the
   * system may still start (Infinity: no limit). */
  fds: number;
  tasks: number;
}

/** The soft limit named `what` in /proc/self/limits (Infinity if
 * unlimited or unreadable). */
function softLimit(what: string): number {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith(what));
    const soft = line?.slice(what.length).trim().split(/\s+/)[0];
    return soft && /^\d+$/.test(soft) ? Number(soft) : Infinity;
  } catch {
    return Infinity;
  }
}

function readNumber(path: string): number {
  try {
    const n = Number(readFileSync(path, 'utf8').trim());
    return Number.isFinite(n) ? n : Infinity;
  } catch {
    return Infinity;
  }
}

/** The last count of a user's tasks, reused for a second: a scan of
 * /proc costs a few ms, and a batch made on demand asks before each
 * instance. */
let counted: { uid: number; at: number; n: number } | undefined;

/** Tasks (threads) of processes owned by `uid`: what RLIMIT_NPROC counts. */
function tasksOf(uid: number): number {
  if (counted && counted.uid === uid && Date.now() - counted.at < 1000) return counted.n;
  let n = 0;
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (statSync(`/proc/${name}`).uid !== uid) continue;
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      // num_threads: the 18th field after the command's closing parenthesis.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      n += Number(fields[17]) || 1;
    } catch {
      /* gone meanwhile */
    }
  }
  counted = { uid, at: Date.now(), n };
  return n;
}

/** Whether the engine has CAP_SYS_ADMIN or CAP_SYS_RESOURCE (bits 21
 * and 24), which exempt it from RLIMIT_NPROC. */
function exempt(): boolean {
  try {
    const hex = /^CapEff:\s+([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    if (!hex) return false;
    const caps = BigInt(`0x${hex}`);
    return ((caps >> 21n) & 1n) === 1n || ((caps >> 24n) & 1n) === 1n;
  } catch {
    return false;
  }
}

/** What is free now. */
export function roomNow(): Room {
  let fds = Infinity;
  const nofile = softLimit('Max open files');
  if (Number.isFinite(nofile)) {
    try {
      fds = nofile - readdirSync('/proc/self/fd').length;
    } catch {
      /* unreadable: no limit known */
    }
  }
  // The system's: PIDs and threads (loadavg's 4th field: running/all tasks).
  const all = Number(/^\S+ \S+ \S+ \d+\/(\d+)/.exec(readFileSync('/proc/loadavg', 'utf8'))?.[1]);
  let tasks = Math.min(readNumber('/proc/sys/kernel/pid_max'), readNumber('/proc/sys/kernel/threads-max')) - (Number.isFinite(all) ? all : 0);
  // The user's, where the kernel holds it to it: not for root, nor with
  // CAP_SYS_ADMIN or CAP_SYS_RESOURCE (a scan of /proc spared then).
  const nproc = softLimit('Max processes');
  if (Number.isFinite(nproc) && process.getuid && process.getuid() !== 0 && !exempt()) tasks = Math.min(tasks, nproc - tasksOf(process.getuid()));
  return { fds, tasks };
}

/** Whether one more instance needing `need` may be held, with `held`
 * already held by the pools: the pools keep to half of what the rest
 * leaves free. */
export function roomToHold(room: Room, held: Room, need: Room): boolean {
  const fits = (free: number, h: number, n: number) => !Number.isFinite(free) || h + n <= (free + h) / 2;
  return fits(room.fds, held.fds, need.fds) && fits(room.tasks, held.tasks, need.tasks);
}

/** Descriptors and tasks left free for whatever else the engine and the
 * user do while a clone makes an instance on demand. */
const SPARE: Room = { fds: 32, tasks: 16 };

/** Whether an instance needing `need` can be made now without taking
 * what is left for the rest. */
export function roomToMake(room: Room, need: Room): boolean {
  return room.fds >= need.fds + SPARE.fds && room.tasks >= need.tasks + SPARE.tasks;
}

/** A failure that more descriptors or processes would have avoided. */
export function isShortOfRoom(e: unknown): boolean {
  const err = e as NodeJS.ErrnoException | undefined;
  if (err?.code && ['EMFILE', 'ENFILE', 'EAGAIN'].includes(err.code)) return true;
  return /\b(EMFILE|ENFILE|EAGAIN)\b|too many open files|resource temporarily unavailable/i.test(String(err?.message ?? ''));
}
