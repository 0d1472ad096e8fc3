/**
 * The room the engine has for clones held ready (pool.ts): each held
 * instance keeps descriptors open in the engine (its page file, its log,
 * its tables, the pipes to its init and processes: ~6 for a one-process
 * app, more for one with listeners or connections to hand over) and
 * processes of the user alive (its init and every thread of every
 * process of the template). 32 per template, several templates, could
 * take the engine's RLIMIT_NOFILE, the user's RLIMIT_NPROC, the pids
 * limit of the engine's cgroup (a container's usual limit) or the
 * system's PIDs from the commands it serves and from the user's own
 * programs. So the pools together keep to half of what is free of each,
 * counting what they hold as free (they give it up when asked: see
 * makeRoomFor), and a clone that needs more than is free has the pools
 * give up instances first rather than fail.
 *
 * Read from /proc (and the cgroup's files) when asked: before each
 * instance a refill makes, and before each instance made on demand while
 * instances are held. The user's tasks are counted by a scan of /proc,
 * reused for a second and kept up to date meanwhile with what the pools
 * are known to have started or ended (tasksChanged).
 */
import { readdirSync, readFileSync } from 'node:fs';

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

/** The number in file `path`; `otherwise` if it holds none ('max') or
 * cannot be read. */
function readNumber(path: string, otherwise = Infinity): number {
  try {
    const text = readFileSync(path, 'utf8').trim();
    return /^\d+$/.test(text) ? Number(text) : otherwise;
  } catch {
    return otherwise;
  }
}

/** The last count of a user's tasks, reused for a second: a scan of
 * /proc costs a few ms, and a batch made on demand asks before each
 * instance. What the pools start and end meanwhile is added to it
 * (tasksChanged): read again within the second, it would say the same
 * and have a give-up free nothing, or a refill make one too many. */
let counted: { uid: number; at: number; n: number } | undefined;

/** `delta` tasks of the engine's user started (an instance made) or
 * ended (one given up) since the last count. */
export function tasksChanged(delta: number): void {
  if (counted) counted.n = Math.max(0, counted.n + delta);
}

/** The real UID of process `pid` (what RLIMIT_NPROC counts by: the
 * first of the four on the Uid: line), or undefined if it is gone. */
function realUid(pid: string): number | undefined {
  const line = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return line ? Number(line[1]) : undefined;
}

/** Tasks (threads) of processes whose real UID is `uid`: what
 * RLIMIT_NPROC counts. (/proc/PID's owner is the effective UID: a setuid
 * program's, or a daemon's that dropped only that, would be miscounted.) */
function tasksOf(uid: number): number {
  if (counted && counted.uid === uid && Date.now() - counted.at < 1000) return counted.n;
  let n = 0;
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (realUid(name) !== uid) continue;
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

/** A path field of /proc/PID/mountinfo, its octal escapes (\040 for a
 * space...) undone. */
const unescapeMountPath = (field: string) => field.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

/**
 * The directories whose pids.max (and pids.current) hold the engine to a
 * number of tasks: its pids cgroup and each above it, as far up as a mount
 * shows them, from /proc/self/cgroup (`cgroups`) and /proc/self/mountinfo
 * (`mounts`). cgroup v2 (the "0::" line, a mount of type cgroup2) and v1's
 * pids controller (a mount of type cgroup whose options name pids); any
 * other v1 controller says nothing of tasks and is ignored. A cgroup is
 * looked for only under a mount of its hierarchy whose root holds it
 * (/proc/self/cgroup names it from the cgroup namespace's root, mountinfo
 * each mount's root likewise): one outside every such mount (a path with
 * "..", which a cgroup namespace shows for a cgroup above its root) is
 * not under any, and is not looked for. No directory is ever named
 * outside a mount point.
 */
export function pidsCgroupDirs(cgroups: string, mounts: string): string[] {
  const v2: { root: string; at: string }[] = [];
  const v1: { root: string; at: string }[] = [];
  for (const line of mounts.split('\n')) {
    const [before, after] = line.split(' - ');
    if (after === undefined) continue;
    const f = before.split(' ');
    const [type, , options = ''] = after.split(' ');
    if (f.length < 5) continue;
    const mount = { root: unescapeMountPath(f[3]), at: unescapeMountPath(f[4]) };
    if (type === 'cgroup2') v2.push(mount);
    else if (type === 'cgroup' && options.split(',').includes('pids')) v1.push(mount);
  }
  const plain = (path: string) => path.startsWith('/') && !path.includes('\0') && !path.split('/').some((part) => part === '..' || part === '.');
  const dirs: string[] = [];
  for (const line of cgroups.split('\n')) {
    const m = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!m || !plain(m[2])) continue;
    const cgroup = m[2];
    const v1Pids = m[1].split(',').includes('pids');
    if (m[1] !== '' && !v1Pids) continue;
    for (const { root, at } of m[1] === '' ? v2 : v1) {
      if (!plain(root) || !plain(at)) continue;
      const within = root === '/' ? cgroup : cgroup === root ? '/' : cgroup.startsWith(`${root}/`) ? cgroup.slice(root.length) : undefined;
      if (within === undefined) continue;
      // The cgroup, then each above it, up to the mount's root (the
      // hierarchy's root has no pids.max; a container's namespace's has).
      const parts = within.split('/').filter(Boolean);
      for (let n = parts.length; n >= 0; n--) dirs.push([at === '/' ? '' : at, ...parts.slice(0, n)].join('/') || '/');
    }
  }
  return [...new Set(dirs)];
}

/** Tasks the engine's pids cgroup and each above it may still start: the
 * least of pids.max - pids.current along the way up (Infinity where it
 * says 'max', or where nothing can be read): see pidsCgroupDirs. */
function cgroupTasks(): number {
  let dirs: string[];
  try {
    dirs = pidsCgroupDirs(readFileSync('/proc/self/cgroup', 'utf8'), readFileSync('/proc/self/mountinfo', 'utf8'));
  } catch {
    return Infinity;
  }
  let free = Infinity;
  for (const dir of dirs) {
    const max = readNumber(`${dir}/pids.max`);
    if (Number.isFinite(max)) free = Math.min(free, max - readNumber(`${dir}/pids.current`, 0));
  }
  return free;
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
  let all = 0;
  try {
    all = Number(/^\S+ \S+ \S+ \d+\/(\d+)/.exec(readFileSync('/proc/loadavg', 'utf8'))?.[1]) || 0;
  } catch {
    /* unreadable: none counted */
  }
  let tasks = Math.min(readNumber('/proc/sys/kernel/pid_max'), readNumber('/proc/sys/kernel/threads-max')) - all;
  // The cgroup's (pids.max): the kernel holds root to it too.
  tasks = Math.min(tasks, cgroupTasks());
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

/**
 * A failure that more descriptors or processes would have avoided: one
 * held instances take room from. EMFILE of the engine's own calls (its
 * RLIMIT_NOFILE: Node's and the addon's errors, by code or by the text a
 * restore's error keeps of them: it says what failed in words, not the
 * code), ENFILE (the system's) from anything, and EAGAIN only from what
 * starts a process or thread (the user's RLIMIT_NPROC, the cgroup's
 * pids.max, the system's PIDs): the restore's injected fork and clone
 * ("fork failed: EAGAIN", "creating a thread failed: EAGAIN", or
 * EWOULDBLOCK, the same number's other name), the
 * addon's start of init or its forks ("starting ...", "fork (...)").
 * Not an EAGAIN of anything else (non-blocking I/O, sock_diag, a lock),
 * nor an EMFILE of a call injected into a restored process: its own
 * limit, which nothing held counts against.
 */
export function isShortOfRoom(e: unknown): boolean {
  const err = e as (NodeJS.ErrnoException & { call?: string }) | undefined;
  if (!err) return false;
  if (err.code === 'EMFILE' || err.code === 'ENFILE') return true;
  if (err.code === 'EAGAIN' && /^(spawn|fork|clone|vfork)/.test(err.syscall ?? '')) return true;
  const text = String(err.message ?? '');
  // Node's ("EMFILE: too many open files, open '...'", or as errors.ts
  // errorText words it, "open ...: too many open files (EMFILE)") and the
  // addon's ("opening tables ...: Too many open files"); an injected
  // call's failure reads "<call> failed: EMFILE" instead.
  if (/\bEMFILE: too many open files\b|: too many open files \(EMFILE\)|: Too many open files(?! in system)\b/.test(text)) return true;
  if (/\bENFILE\b|Too many open files in system/.test(text)) return true;
  return /\b(fork|creating a thread) failed: (EAGAIN|EWOULDBLOCK)\b|\b(starting \/\S+|fork \([^)]*\)): Resource temporarily unavailable\b/.test(text);
}
