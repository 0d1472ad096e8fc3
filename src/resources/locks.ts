/**
 * File locks: flock(2) locks, POSIX record locks (fcntl F_SETLK), open file
 * description locks (F_OFD_SETLK) and leases (F_SETLEASE).
 *
 * Who holds what, as the kernel keeps it:
 * - a POSIX lock belongs to the process (its descriptor table), whichever of
 *   its descriptors on the file it was taken through; closing any of them
 *   drops it, and a forked child does not inherit it;
 * - a flock lock, an OFD lock and a lease belong to the open file
 *   description: every descriptor on it, in every process that inherited or
 *   dup'd it, holds the one lock, and it goes with the description's last
 *   close.
 *
 * Dump: /proc/PID/fdinfo/FD lists, per descriptor, the locks of its
 * description and the POSIX locks its process took through it ("lock:"
 * lines, as in /proc/locks); files.ts reads every descriptor's fdinfo
 * anyway and keeps those lines (DumpContext.fdLockLines). /proc/locks is
 * not read for them: each read of it takes the kernel's file lock
 * semaphore for writing, which waits for an RCU grace period of the whole
 * machine (10-20 ms, with the application frozen). Each lock is
 * recorded once: a POSIX lock on the descriptor its process took it
 * through; a description's lock on one descriptor of the description
 * (files.ts's description numbers say which are one), preferably in the
 * process that took it.
 *
 * Restore: each lock is taken again by a call run inside its restored
 * process once its descriptors are in place (flock, fcntl F_SETLK or
 * F_OFD_SETLK with a struct flock in scratch memory, F_SETLEASE), never
 * waiting: a lock the kernel does not grant now (someone outside holds a
 * conflicting one) fails the restore with a line naming the file and the
 * process, and the restore undoes itself. A description's lock is taken
 * once, on the one description the restore makes of it (the driver shares
 * a description among its descriptors as the image says).
 *
 * A process asleep waiting for a lock (F_SETLKW, a blocking flock) is not a
 * lock: the freeze interrupts its call, which takes it off the lock's wait
 * list, and the call is rewound and runs again after the restore, waiting
 * again. /proc/locks is checked for waiters of the application all the
 * same when a thread was stopped in a call that can wait for a lock or a
 * lease (only there can one be listed): one still listed (the kernel did
 * not take it off) is refused.
 *
 * Templates: a clone's descriptors are its private copies where the rules
 * give it one (copy-on-write and written, duplicate), and its locks are
 * taken there by the same restore. A lock on a file every clone shares
 * (shared by rule, or read-only under copy-on-write) is fine when shared
 * (read locks coexist); an exclusive one or a lease would have the clones
 * fight for one lock, and `template create` refuses it by name.
 *
 * Not carried: a lock held through a description the application shares
 * with a process outside it (the outside process keeps holding it, and the
 * restore fails on the conflict, by name); the PIDs lock lines show in
 * /proc/locks and fdinfo are the system's (the preload library translates
 * F_GETLK's l_pid only).
 */
import { readFileSync, readlinkSync, statSync } from 'node:fs';
import { type Action, type Fd, FdKind, type FileLock, type Image, LockKind, type Process } from '../image/types.js';
import { type RemoteProcess, SYS, SyscallError } from '../ptrace/remote.js';
import { nameProcess, Unsupported } from './context.js';

const NR_flock = 73;
const LOCK_SH = 1;
const LOCK_EX = 2;
const LOCK_NB = 4;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_SETLK = 6;
const F_OFD_SETLK = 37;
const F_SETLEASE = 1024;
const SEEK_SET = 0;
const O_ACCMODE = 3;
const O_RDONLY = 0;

/** One "lock:" line of fdinfo, or a line of /proc/locks. */
interface LockLine {
  waiter: boolean;
  /** FLOCK, POSIX, OFDLCK, LEASE, DELEG, ACCESS... */
  cls: string;
  /** ADVISORY, or a lease's ACTIVE / BREAKING / BREAKER. */
  state: string;
  type: string;
  pid: number;
  ino: bigint;
  start: bigint;
  end: bigint | 'EOF';
  text: string;
}

/** "1: POSIX  ADVISORY  WRITE 16390 fe:00:2146608 20 EOF", or with "-> "
 * after the number for a waiter (in /proc/locks only). */
function parseLockLine(text: string): LockLine | undefined {
  const m = /^\s*\d+:\s+(->\s+)?(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+(?:[0-9a-f]+:[0-9a-f]+:(\d+)|<none>:0)\s+(-?\d+)\s+(-?\d+|EOF)\s*$/.exec(text);
  if (!m) return undefined;
  return { waiter: !!m[1], cls: m[2], state: m[3], type: m[4], pid: Number(m[5]), ino: BigInt(m[6] ?? -1), start: BigInt(m[7]), end: m[8] === 'EOF' ? 'EOF' : BigInt(m[8]), text: text.trim() };
}

/** The inode of a descriptor, to match it with /proc/locks. */
function inodeOf(image: Image, pid: number, fd: Fd): bigint | undefined {
  if (fd.kind === FdKind.FILE && fd.file >= 0 && image.files[fd.file]) return image.files[fd.file].ino;
  const bracket = /^\w+:\[(\d+)\]$/.exec(fd.path);
  if (bracket) return BigInt(bracket[1]);
  try {
    return statSync(`/proc/${pid}/fd/${fd.fd}`, { bigint: true }).ino;
  } catch {
    return undefined;
  }
}

const KIND_BY_CLASS: Record<string, number> = { FLOCK: LockKind.FLOCK, POSIX: LockKind.POSIX, OFDLCK: LockKind.OFD, LEASE: LockKind.LEASE };

/** How messages and inspect name a lock: "exclusive flock", "POSIX write
 * lock on bytes 20-29", "read lease". */
export function describeLock(l: FileLock): string {
  const range = l.toEof ? `from byte ${l.start} to the end` : `on bytes ${l.start}-${l.end}`;
  switch (l.kind) {
    case LockKind.FLOCK:
      return `${l.write ? 'exclusive' : 'shared'} flock`;
    case LockKind.POSIX:
      return `POSIX ${l.write ? 'write' : 'read'} lock ${range}`;
    case LockKind.OFD:
      return `OFD ${l.write ? 'write' : 'read'} lock ${range}`;
    default:
      return `${l.write ? 'write' : 'read'} lease`;
  }
}

/**
 * System calls (x86-64) in which a thread can wait for a file lock, a lease
 * or a delegation to be broken: fcntl F_SETLKW / F_OFD_SETLKW, flock, and
 * the opens (an exec's too), truncates and namespace changes that break
 * leases and delegations. A waiter in /proc/locks is a thread inside one of them.
 */
const MAY_WAIT_FOR_LOCK = new Set([
  2 /* open */, 59 /* execve */, 72 /* fcntl */, 73 /* flock */, 76 /* truncate */, 77 /* ftruncate */, 82 /* rename */, 85 /* creat */,
  86 /* link */, 87 /* unlink */, 90 /* chmod */, 92 /* chown */, 94 /* lchown */, 132 /* utime */, 235 /* utimes */,
  257 /* openat */, 260 /* fchownat */, 261 /* futimesat */, 263 /* unlinkat */, 264 /* renameat */, 265 /* linkat */,
  268 /* fchmodat */, 280 /* utimensat */, 304 /* open_by_handle_at */, 316 /* renameat2 */, 322 /* execveat */,
  437 /* openat2 */, 452 /* fchmodat2 */,
]);

/** Refuses a process of the image that /proc/locks shows waiting for a
 * lock. Read only if a thread was stopped where it could be waiting. */
function refuseWaiters(procs: Process[]): void {
  if (!procs.some((p) => p.threads.some((t) => MAY_WAIT_FOR_LOCK.has(Number(t.inSyscall))))) return;
  const byPid = new Map(procs.map((p) => [p.pid, p]));
  for (const l of readFileSync('/proc/locks', 'utf8').split('\n').map(parseLockLine)) {
    const waiter = l?.waiter ? byPid.get(l.pid) : undefined;
    if (waiter)
      throw new Unsupported(`${nameProcess(waiter.vpid, waiter.comm)} is waiting for a ${l!.cls} lock on inode ${l!.ino} that the freeze did not interrupt, which cannot be captured yet`);
  }
}

/**
 * Records every lock of the application's processes on the descriptor it
 * is restored through (Fd.locks), from the fdinfo lock lines files.ts kept
 * (`fdLockLines`, by "PID:FD"). Run with the processes frozen and dumped,
 * after files.ts has marked shared descriptions. Throws Unsupported for a
 * lock that cannot be brought back exactly.
 */
export function dumpLocks(image: Image, fdLockLines: Map<string, string[]>): void {
  const procs = image.processes;
  refuseWaiters(procs);
  if (!fdLockLines.size) return;
  // A description's lock: recorded once, on the descriptor found first,
  // or on one in the process that took it.
  const described = new Map<string, { fd: Fd; lock: FileLock; taker: boolean }>();
  for (const p of procs) {
    const who = nameProcess(p.vpid, p.comm);
    const posix = new Set<string>();
    for (const fd of p.fds) {
      const lines = fdLockLines.get(`${p.pid}:${fd.fd}`);
      if (!lines) continue;
      const ino = inodeOf(image, p.pid, fd) ?? -1n;
      for (const text of lines) {
        const where = `${who} fd ${fd.fd} (${fd.path})`;
        const l = parseLockLine(text);
        const kind = l ? KIND_BY_CLASS[l.cls] : undefined;
        // A lease being broken shows the type it is being broken to.
        if (kind === LockKind.LEASE && l!.state === 'BREAKING')
          throw new Unsupported(`${where}: a lease being broken (another process opened the file) cannot be captured yet`);
        if (!l || kind === undefined || (kind === LockKind.LEASE && l.state !== 'ACTIVE') || (l.type !== 'READ' && l.type !== 'WRITE'))
          throw new Unsupported(`${where}: a file lock this kernel shows as '${text.trim()}' cannot be captured yet`);
        if (fd.kind !== FdKind.FILE && fd.kind !== FdKind.DEVICE)
          throw new Unsupported(`${where}: a file lock on a descriptor of this kind cannot be captured yet`);
        const lock: FileLock = { kind, write: l.type === 'WRITE', start: 0n, end: 0n, toEof: false };
        if (kind === LockKind.POSIX || kind === LockKind.OFD) {
          lock.start = l.start;
          lock.toEof = l.end === 'EOF';
          lock.end = l.end === 'EOF' ? 0n : l.end;
        }
        const key = `${ino}:${kind}:${l.type}:${lock.start}:${l.end}`;
        if (kind === LockKind.POSIX) {
          // Shown on every descriptor of the file it was taken through.
          if (l.pid !== p.pid)
            throw new Unsupported(`${where}: a POSIX lock of system process ${l.pid}, which shares this descriptor table, cannot be captured yet`);
          if (posix.has(key)) continue;
          posix.add(key);
          (fd.locks ??= []).push(lock);
          continue;
        }
        const description = fd.description ? `d${fd.description}` : `p${p.pid}:${fd.fd}`;
        const taker = l.pid === p.pid;
        const seen = described.get(`${description}:${key}`);
        if (seen && (seen.taker || !taker)) continue;
        described.set(`${description}:${key}`, { fd, lock, taker });
      }
    }
  }
  for (const { fd, lock } of described.values()) (fd.locks ??= []).push(lock);
}

/** struct flock (x86-64): l_type, l_whence, l_start, l_len, l_pid. */
function structFlock(l: FileLock): Buffer {
  const b = Buffer.alloc(32);
  b.writeInt16LE(l.write ? F_WRLCK : F_RDLCK, 0);
  b.writeInt16LE(SEEK_SET, 2);
  b.writeBigInt64LE(l.start, 8);
  b.writeBigInt64LE(l.toEof ? 0n : l.end - l.start + 1n, 16);
  return b;
}

/** The path a restored descriptor is open on (a clone's private copy, a
 * REDIR PATH target), for messages. */
function pathOf(r: RemoteProcess, fd: Fd): string {
  try {
    return readlinkSync(`/proc/${r.pid}/fd/${fd.fd}`);
  } catch {
    return fd.path;
  }
}

/**
 * Takes every lock of process `p` again, inside it (`r`), through the
 * descriptors the image recorded them on. Run once its descriptors are in
 * place and before anything closes one (closing drops POSIX locks).
 */
export function restoreLocks(r: RemoteProcess, p: Process): void {
  for (const fd of p.fds) {
    for (const lock of fd.locks ?? []) {
      r.reset();
      let ret: bigint;
      if (lock.kind === LockKind.FLOCK) ret = r.raw(NR_flock, [fd.fd, (lock.write ? LOCK_EX : LOCK_SH) | LOCK_NB]);
      else if (lock.kind === LockKind.LEASE) ret = r.raw(SYS.fcntl, [fd.fd, F_SETLEASE, lock.write ? F_WRLCK : F_RDLCK]);
      else ret = r.raw(SYS.fcntl, [fd.fd, lock.kind === LockKind.OFD ? F_OFD_SETLK : F_SETLK, r.put(structFlock(lock))]);
      if (ret >= 0n || ret <= -4096n) continue;
      const errno = Number(-ret);
      const what = `${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: cannot take its ${describeLock(lock)} on ${pathOf(r, fd)} again`;
      // EAGAIN, or EACCES for a POSIX lock: a conflicting lock is held.
      if (errno === 11 || errno === 13) throw new Error(`${what}: another process holds a conflicting lock on it now`);
      throw new Error(`${what}: ${new SyscallError(lock.kind === LockKind.FLOCK ? 'flock' : 'fcntl', errno).message}`);
    }
  }
}

/**
 * Template face: why a lock of `fd` keeps the image from being a template,
 * if it does. `action`: what cloning does with the descriptor's file. A
 * clone's file is its own (as the restore decides, driver.ts clonePath and
 * filePath) under a REDIR PATH rule (its target names the instance, as
 * with <APPL-ID>; one that does not makes the clones' restores fail on
 * the lock, by name), for duplicate, for copy-on-write when the descriptor
 * may write, and when the file is not a file of the template's (the log,
 * the tables, a deleted file: recreated or duplicated per instance).
 * Shared locks on a shared file coexist, as they did.
 */
export function lockRefusal(image: Image, fd: Fd, action: Action | undefined): string | undefined {
  const exclusive = (fd.locks ?? []).find((l) => l.write || l.kind === LockKind.LEASE);
  if (!exclusive) return undefined;
  const writable = (fd.flags & O_ACCMODE) !== O_RDONLY;
  const redirected = (image.instance?.redirs ?? []).some((r) => r.kind === 'path' && (fd.path === r.to || fd.path.startsWith(r.to + '/')));
  const own = redirected || action === 'duplicate' || action === 'recreate' || (action === 'copy-on-write' && writable);
  if (own) return undefined;
  const lock = describeLock(exclusive);
  return `holds ${/^[aeiouOR]/.test(lock) ? 'an' : 'a'} ${lock} on ${fd.path}, a file every clone shares (${action ?? 'share'}): the clones would all take the one lock; a FILE ... DUPLICATE rule gives each clone its own copy`;
}

/** What `inspect` says of a process's locks, or '' if it holds none. */
export function describeLocks(p: Process): string {
  return p.fds
    .flatMap((fd) => (fd.locks ?? []).map((l) => `fd ${fd.fd} ${describeLock(l)}`))
    .join('; ');
}
