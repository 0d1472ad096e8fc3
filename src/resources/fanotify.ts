/**
 * fanotify: a group and its marks. /proc/PID/fdinfo shows the group's
 * fanotify_init flags and event_f_flags, and each mark: an inode mark by
 * its inode's file handle (its path found from it at snapshot, as
 * inotify.ts finds a watch's), a mount mark by its mount id (its mount
 * point, from mountinfo), a filesystem mark by its device (a mount of
 * it); each with its mark flags, mask and ignored mask. The group is made
 * again inside the restored process (fanotify_init), which is what the
 * kernel charges its groups and marks to, and each mark added by path.
 *
 * Privileges. Without CAP_SYS_ADMIN a process may make only a
 * notification group reporting file handles (FAN_REPORT_FID and
 * friends), with inode marks and bounded queue and marks (Linux 5.13);
 * the kernel marks such a group unprivileged, and its events then carry
 * no PID but the listener's own. fdinfo does not show that mark: the
 * snapshot takes a group that could have been made unprivileged as such
 * when its process has no CAP_SYS_ADMIN in its effective set (a process
 * that made it with the capability and dropped it after comes back with
 * an unprivileged group: PIDs of other processes read as 0, never more
 * than it had). The restore makes an unprivileged group with
 * CAP_SYS_ADMIN out of the effective set for that one call, and refuses,
 * before anything is made, a group that needs the capability where the
 * restoring user lacks it (checkFanotifyPrivileges).
 *
 * Refused at snapshot, by name: a mark asking permission events (an
 * answer the application owes for an event it read cannot be seen, so it
 * cannot be carried; while frozen, every opener of the marked files
 * waits), a mount namespace mark, a mount hidden under another, an inode
 * with no name, and any flag, mark flag or event bit this module does not
 * know.
 *
 * Not carried: the events queued at the snapshot (lost). Unlike
 * inotify's, they are not refused: a group marking a mount or a
 * filesystem receives every process's events there, so some are always
 * queued while it is frozen on a busy system (kinds.test's fanotify
 * fixture was refused while other tests wrote on its filesystem), and
 * no snapshot of it would ever be taken. Nor:
 * FAN_ENABLE_AUDIT, which fdinfo does not show (it matters only to the
 * answers of permission events, refused above); a group held by two
 * descriptors (dup, fork) comes back as two groups, as inotify's does.
 * The PIDs events carry are system PIDs, before and after.
 */
import { closeSync, readFileSync, readlinkSync } from 'node:fs';
import { addon } from '../native.js';
import { fsIdentity, identitiesOfRestored, openWatchedAs, raisableIdentitiesFor, refusedAsProcess } from './fsident.js';
import { AppshotError, ExitCode } from '../errors.js';
import { type Fanotify, type FanotifyMark, FanotifyMarkKind, type Fd, FdKind, type Image } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { nameProcess, Unsupported } from './context.js';
import { markedInodePath } from './inotify.js';

/** fanotify_init flags (linux/fanotify.h, Linux 6.18). */
const FAN = {
  CLOEXEC: 0x1,
  NONBLOCK: 0x2,
  CLASS_CONTENT: 0x4,
  CLASS_PRE_CONTENT: 0x8,
  UNLIMITED_QUEUE: 0x10,
  UNLIMITED_MARKS: 0x20,
  REPORT_PIDFD: 0x80,
  REPORT_TID: 0x100,
  REPORT_FID: 0x200,
  REPORT_DIR_FID: 0x400,
  REPORT_NAME: 0x800,
  REPORT_TARGET_FID: 0x1000,
  REPORT_FD_ERROR: 0x2000,
  REPORT_MNT: 0x4000,
} as const;
const CLASS_BITS = FAN.CLASS_CONTENT | FAN.CLASS_PRE_CONTENT;
const FID_BITS = FAN.REPORT_FID | FAN.REPORT_DIR_FID | FAN.REPORT_NAME | FAN.REPORT_TARGET_FID;
const INIT_BITS = Object.values(FAN).reduce((a, b) => a | b, 0);
/** What fanotify_init refuses to a caller without CAP_SYS_ADMIN
 * (FANOTIFY_ADMIN_INIT_FLAGS). */
const ADMIN_INIT_BITS = CLASS_BITS | FAN.UNLIMITED_QUEUE | FAN.UNLIMITED_MARKS | FAN.REPORT_PIDFD | FAN.REPORT_FD_ERROR | FAN.REPORT_MNT;

/** event_f_flags fanotify_init takes (FANOTIFY_INIT_ALL_EVENT_F_BITS):
 * O_ACCMODE, O_APPEND, O_NONBLOCK, O_DSYNC, __O_SYNC, O_LARGEFILE,
 * O_NOATIME, O_CLOEXEC. */
const EVENT_F_BITS = 0o3 | 0o2000 | 0o4000 | 0o10000 | 0o4000000 | 0o100000 | 0o1000000 | 0o2000000;

/** fanotify_mark flags. */
const MARK = {
  ADD: 0x1,
  DONT_FOLLOW: 0x4,
  MOUNT: 0x10,
  IGNORED_MASK: 0x20,
  IGNORED_SURV_MODIFY: 0x40,
  FILESYSTEM: 0x100,
  EVICTABLE: 0x200,
  IGNORE: 0x400,
} as const;
/** The mark flags fdinfo shows ("mflags"). */
const MARK_STATE_BITS = MARK.IGNORED_SURV_MODIFY | MARK.EVICTABLE | MARK.IGNORE;
const MARK_TYPE = { [FanotifyMarkKind.INODE]: 0, [FanotifyMarkKind.MOUNT]: MARK.MOUNT, [FanotifyMarkKind.FILESYSTEM]: MARK.FILESYSTEM } as Record<number, number>;

/** Event bits of a mask: FAN_ACCESS .. FAN_OPEN_EXEC, FAN_FS_ERROR,
 * FAN_MNT_ATTACH/DETACH, FAN_EVENT_ON_CHILD, FAN_RENAME, FAN_ONDIR. */
const EVENT_BITS = 0x1fff | 0x8000 | 0x1000000 | 0x2000000 | 0x8000000 | 0x10000000 | 0x40000000;
/** FAN_OPEN_PERM, FAN_ACCESS_PERM, FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS. */
const PERM_BITS = 0x10000 | 0x20000 | 0x40000 | 0x100000;

const O_NONBLOCK = 0o4000;
const F_SETFD = 2;
const F_SETFL = 4;
const FD_CLOEXEC = 1;
const CAP_SYS_ADMIN = 21;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;

/** The most marks an image may give one group (each is a call or two at
 * restore; the kernel's default for a user is 8192 per group unless
 * FAN_UNLIMITED_MARKS). */
export const FANOTIFY_MARKS_LIMIT = 65536;

const GROUP = /^fanotify flags:([0-9a-f]+) event-flags:([0-9a-f]+)\s*$/;
const HEX = '([0-9a-f]+)';
const STATE = `mflags:${HEX} mask:${HEX} ignored_mask:${HEX}`;
const INODE_MARK = new RegExp(`^fanotify ino:${HEX} sdev:${HEX} ${STATE}\\s*(?:fhandle-bytes:${HEX} fhandle-type:${HEX} f_handle:${HEX})?\\s*$`);
const MOUNT_MARK = new RegExp(`^fanotify mnt_id:${HEX} ${STATE}\\s*$`);
const FILESYSTEM_MARK = new RegExp(`^fanotify sdev:${HEX} ${STATE}\\s*$`);

const hex = (n: number) => `0x${n.toString(16)}`;

/** Whether making this group takes CAP_SYS_ADMIN: a flag only it may
 * ask, no file handles reported, or a mark on a mount or filesystem. */
function needsAdmin(flags: number, marks: Pick<FanotifyMark, 'kind'>[]): boolean {
  return (flags & ADMIN_INIT_BITS) !== 0 || (flags & FID_BITS) === 0 || marks.some((m) => m.kind !== FanotifyMarkKind.INODE);
}

/** The mountinfo lines of a process, split into fields (a mount point's
 * space, tab, newline and backslash unescaped from the kernel's \\ooo). */
function mounts(pid: number): string[][] {
  return readFileSync(`/proc/${pid}/mountinfo`, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => l.split(' '))
    .map((f) => Object.assign(f, { 4: f[4].replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))) }));
}

/** Whether mount `at` (an index into `all`) is what its mount point shows:
 * no mount listed after it sits on the same point (mountinfo lists a
 * mount after the one it is mounted on). */
const onTop = (all: string[][], at: number) => !all.slice(at + 1).some((f) => f[4] === all[at][4]);

/** The group of fanotify descriptor `where` ("process 2 (app) fd 5"), from
 * its fdinfo text. */
export function dumpFanotify(pid: number, fdinfo: string, where: string): Fanotify {
  const lines = fdinfo.split('\n').filter((l) => l.startsWith('fanotify '));
  const group = GROUP.exec(lines[0] ?? '');
  if (!group) throw new Unsupported(`${where}: a fanotify group this kernel shows without its flags cannot be captured yet`);
  const flags = parseInt(group[1], 16);
  const eventFlags = parseInt(group[2], 16);
  if (flags & ~INIT_BITS || (flags & CLASS_BITS) === CLASS_BITS) throw new Unsupported(`${where}: a fanotify group with flags ${hex(flags)} (bits ${hex(flags & ~INIT_BITS)} unknown here) cannot be captured yet`);
  if (eventFlags & ~EVENT_F_BITS) throw new Unsupported(`${where}: a fanotify group with event flags 0o${eventFlags.toString(8)} cannot be captured yet`);
  const all = mounts(pid);
  // Mount points are shown under the process's root; the marks are made
  // before a restore changes its root (process.ts restoreRoot), so under
  // the root all processes have, as inode marks' paths are.
  const root = readlinkSync(`/proc/${pid}/root`);
  const underRoot = (at: string) => (root === '/' ? at : at === '/' ? root : `${root}${at}`);
  const marks: FanotifyMark[] = [];
  for (const line of lines.slice(1)) {
    let m: RegExpExecArray | null;
    let kind: number;
    let path: string;
    let state: string[];
    if ((m = INODE_MARK.exec(line))) {
      const [, ino, sdev, , , , , type, handle] = m;
      kind = FanotifyMarkKind.INODE;
      state = m.slice(3, 6);
      checkMask(state, where, `inode ${parseInt(ino, 16)}`);
      path = markedInodePath(pid, { ino, sdev, type, handle }, where, `the fanotify mark on inode ${parseInt(ino, 16)}`);
    } else if ((m = MOUNT_MARK.exec(line))) {
      kind = FanotifyMarkKind.MOUNT;
      state = m.slice(2, 5);
      const id = String(parseInt(m[1], 16));
      const at = all.findIndex((f) => f[0] === id);
      checkMask(state, where, `mount ${id}`);
      if (at < 0) throw new Unsupported(`${where}: a fanotify mark is on mount ${id}, which the process does not see`);
      if (!onTop(all, at)) throw new Unsupported(`${where}: a fanotify mark is on mount ${id} at ${all[at][4]}, hidden under another mount there: it cannot be marked again by path`);
      path = underRoot(all[at][4]);
    } else if ((m = FILESYSTEM_MARK.exec(line))) {
      kind = FanotifyMarkKind.FILESYSTEM;
      state = m.slice(2, 5);
      const sdev = parseInt(m[1], 16);
      const dev = `${sdev >>> 20}:${sdev & 0xfffff}`;
      checkMask(state, where, `filesystem ${dev}`);
      // A mount of it the process sees, one of its root preferred.
      const shown = all.map((f, i) => ({ f, i })).filter(({ f, i }) => f[2] === dev && onTop(all, i));
      const pick = shown.find(({ f }) => f[3] === '/') ?? shown[0];
      if (!pick) throw new Unsupported(`${where}: a fanotify mark is on filesystem ${dev}, which the process has no visible mount of`);
      path = underRoot(pick.f[4]);
    } else {
      throw new Unsupported(`${where}: a fanotify mark this kernel shows as '${line.trim()}' cannot be captured yet`);
    }
    const [mflags, mask, ignored] = state.map((s) => parseInt(s, 16));
    marks.push({ kind, path, flags: mflags, mask, ignoredMask: ignored });
  }
  // fdinfo lists the newest mark first: made again oldest first, they
  // list as they did.
  marks.reverse();
  return { flags, eventFlags, unprivileged: !needsAdmin(flags, marks) && !hasSysAdmin(pid), marks };
}

/** A mark's state as fdinfo gave it (mflags, mask, ignored mask): of bits
 * known here, asking no permission event, and one a restore can make. */
function checkMask([mflags, mask, ignored]: string[], where: string, on: string): void {
  const [f, m, i] = [mflags, mask, ignored].map((s) => parseInt(s, 16));
  if ((m | i) & PERM_BITS)
    throw new Unsupported(`${where}: the fanotify mark on ${on} asks permission events (mask ${hex(m)}, ignored ${hex(i)}): an answer owed to a process waiting on one cannot be seen, so it cannot be captured`);
  if (f & ~MARK_STATE_BITS || (m | i) & ~EVENT_BITS) throw new Unsupported(`${where}: the fanotify mark on ${on} has flags ${hex(f)}, mask ${hex(m)} or ignored mask ${hex(i)} with bits not known here, which cannot be captured yet`);
  if (f & MARK.IGNORED_SURV_MODIFY && !i) throw new Unsupported(`${where}: the fanotify mark on ${on} keeps its ignored mask on modification (FAN_MARK_IGNORED_SURV_MODIFY) with none set, which cannot be made again`);
}

/** The initial user namespace's inode number (PROC_USER_INIT_INO). */
const INIT_USER_NS = 'user:[4026531837]';

/** Whether process `pid` has CAP_SYS_ADMIN as fanotify_init asks it: in
 * its effective set, in the initial user namespace (a process in another
 * holds none there, whatever its status shows). */
function hasSysAdmin(pid: number): boolean {
  if (readlinkSync(`/proc/${pid}/ns/user`) !== INIT_USER_NS) return false;
  const eff = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return eff ? ((BigInt(`0x${eff[1]}`) >> BigInt(CAP_SYS_ADMIN)) & 1n) === 1n : false;
}

/* ---- the image as untrusted input ------------------------------------ */

/** What is wrong with a descriptor's fanotify record, if anything (for
 * validate.ts's "corrupt image" line): every flag, mark flag and event bit
 * one the kernel knows and the snapshot takes, no permission event, marks
 * bounded, each on an absolute path. */
export function fanotifyRecordFault(fd: Fd): string | undefined {
  const g = fd.fanotify;
  if (fd.kind !== FdKind.FANOTIFY) return g ? 'has a fanotify group but is not a fanotify descriptor' : undefined;
  if (!g) return 'is a fanotify descriptor with no group';
  if (g.flags & ~INIT_BITS || (g.flags & CLASS_BITS) === CLASS_BITS) return `is a fanotify group with flags ${hex(g.flags)}`;
  if (g.eventFlags & ~EVENT_F_BITS || (g.eventFlags & 3) === 3) return `is a fanotify group with event flags 0o${g.eventFlags.toString(8)}`;
  if (g.marks.length > FANOTIFY_MARKS_LIMIT) return `has ${g.marks.length} fanotify marks (at most ${FANOTIFY_MARKS_LIMIT})`;
  if (g.unprivileged && needsAdmin(g.flags, g.marks)) return 'is a fanotify group said to be unprivileged that only CAP_SYS_ADMIN can make';
  for (const m of g.marks) {
    if (!(m.kind in MARK_TYPE)) return `has a fanotify mark of unknown kind ${m.kind}`;
    if (!m.path.startsWith('/')) return `has a fanotify mark on ${JSON.stringify(m.path.slice(0, 64))}, not an absolute path`;
    if (m.flags & ~MARK_STATE_BITS || (m.mask | m.ignoredMask) & ~EVENT_BITS || (m.mask | m.ignoredMask) & PERM_BITS || !(m.mask | m.ignoredMask) || (m.flags & MARK.IGNORED_SURV_MODIFY && !m.ignoredMask))
      return `has a fanotify mark on ${m.path} with flags ${hex(m.flags)}, mask ${hex(m.mask)} and ignored mask ${hex(m.ignoredMask)}, not one a snapshot takes`;
  }
  return undefined;
}

/** The privilege rule, before anything is made: a group only
 * CAP_SYS_ADMIN makes is refused where the restoring user lacks it (made
 * without, it would be a lesser group: or fail half-way), and where no
 * process of the application holds it. */
export function checkFanotifyPrivileges(image: Image, capEff: bigint): void {
  // The capability counts in the initial user namespace only.
  const restorerHas = (capEff >> BigInt(CAP_SYS_ADMIN)) & 1n && readlinkSync('/proc/self/ns/user') === INIT_USER_NS;
  for (const p of image.processes)
    for (const fd of p.fds) {
      const g = fd.fanotify;
      if (fd.kind !== FdKind.FANOTIFY || !g || g.unprivileged) continue;
      if (!restorerHas) {
        const why = g.marks.some((m) => m.kind !== FanotifyMarkKind.INODE) ? 'marks a mount or filesystem' : needsAdmin(g.flags, []) ? `has flags ${hex(g.flags)}` : 'was made by a process with it (its events carry other processes\' PIDs)';
        throw new AppshotError(`${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: its fanotify group ${why}, which takes CAP_SYS_ADMIN, which this restore does not have`, ExitCode.denied);
      }
      // Made inside the process while it is still root: only for a
      // process that, or another of the application that could have
      // handed the group over, holds CAP_SYS_ADMIN (in its permitted set:
      // it may raise it). Else a nobody process would get a group whose
      // events carry descriptors of files it may not open (an event on a
      // child of a watched directory is opened for it without a
      // permission check).
      if (!raisableIdentitiesFor(image, p).some((i) => (i.capEff >> BigInt(CAP_SYS_ADMIN)) & 1n))
        throw new AppshotError(`${nameProcess(p.vpid, p.comm)} fd ${fd.fd}: its fanotify group takes CAP_SYS_ADMIN, which neither the process nor the application's others hold: made with it, it would give the application more than it holds`, ExitCode.denied);
    }
}

/* ---- restore --------------------------------------------------------- */

/** A new group inside the restored process, with every mark; its number
 * there (close-on-exec, as restoreFds expects). The record was checked
 * (fanotifyRecordFault) and its privileges (checkFanotifyPrivileges). */
export function restoreFanotify(r: RemoteProcess, fd: Fd): number {
  const g = fd.fanotify;
  if (!g) throw new Error(`fanotify fd ${fd.fd} has no group in the image`);
  // Who the marks are made as (issue 12). Each identity's permitted
  // capabilities count: a process that made a mount mark with
  // CAP_SYS_ADMIN and then lowered it from its effective set only may
  // raise it and make the mark again by itself; one that dropped it from
  // every set may not by itself, but another process of the application
  // that may raise it may (the application holds what the mark takes:
  // checkFanotifyPrivileges asks the same).
  const as = identitiesOfRestored(r, true);
  r.reset();
  const made = Number(withoutSysAdmin(r, g.unprivileged, () => r.call(`making fanotify group fd ${fd.fd}`, SYS.fanotify_init, [g.flags, g.eventFlags])));
  // The marks are added by the restorer, to the group taken from the
  // process, on a thread with the process's filesystem identity and
  // capabilities (fsident.ts): the kernel walks to the name and checks
  // read permission as the caller, and for a mount or filesystem mark
  // CAP_SYS_ADMIN of the caller, which must be the process's, not a root
  // restorer's before its credentials are back.
  const ours = g.marks.length ? addon().getFd(r.pid, made) : -1;
  const kinds = ['', 'mount ', 'filesystem '];
  try {
    for (const m of g.marks) {
      // An inode mark is on the inode the path names, a symlink there
      // itself (O_NOFOLLOW: what FAN_MARK_DONT_FOLLOW asked); a mount or
      // filesystem mark on whatever the path leads to. The name is walked
      // once, as the process, and what it leads to checked
      // (openWatchedAs); both marks are made on that very one (`m.path`
      // walked again, without symlinks, by a retry identity).
      const base = MARK.ADD | MARK_TYPE[m.kind] | (m.flags & MARK.EVICTABLE);
      const what = `process ${as.p.vpid} fd ${fd.fd}: its fanotify ${kinds[m.kind] ?? ''}mark`;
      const at = openWatchedAs(m.path, m.kind === FanotifyMarkKind.INODE, as.who, as.p, what);
      const mark = (flags: number, mask: number) => {
        try {
          addon().fanotifyMarkAs(ours, flags, BigInt(mask), at, as.who, m.path);
        } catch (e) {
          refusedAsProcess(e, `${what} on ${m.path}`, fsIdentity(as.p), 'made');
        }
      };
      try {
        if (m.mask) mark(base, m.mask);
        if (m.ignoredMask) mark(base | (m.flags & MARK.IGNORE ? MARK.IGNORE : MARK.IGNORED_MASK) | (m.flags & MARK.IGNORED_SURV_MODIFY), m.ignoredMask);
      } finally {
        closeSync(at);
      }
    }
  } finally {
    if (ours >= 0) closeSync(ours);
  }
  // Made with the flags it was made with (fdinfo shows them); the
  // descriptor's own bits as they were at the snapshot.
  if (!(g.flags & FAN.CLOEXEC)) r.call(`setting close-on-exec of fanotify fd ${fd.fd}`, SYS.fcntl, [made, F_SETFD, FD_CLOEXEC]);
  if ((fd.flags & O_NONBLOCK) !== (g.flags & FAN.NONBLOCK ? O_NONBLOCK : 0)) r.call(`setting the status flags of fanotify fd ${fd.fd}`, SYS.fcntl, [made, F_SETFL, fd.flags]);
  return made;
}

/** Runs `make` with CAP_SYS_ADMIN out of the process's effective set if
 * `drop` (and it is in it), then puts it back: the group fanotify_init
 * makes is then unprivileged, as the image's was. */
function withoutSysAdmin(r: RemoteProcess, drop: boolean, make: () => bigint): bigint {
  if (!drop) return make();
  const header = r.put(Buffer.from(new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]).buffer));
  const data = r.put(Buffer.alloc(24));
  r.call('reading capabilities', SYS.capget, [header, data]);
  const sets = r.get(data, 24);
  const bit = 1 << CAP_SYS_ADMIN; // in the low word
  if (!(sets.readUInt32LE(0) & bit)) return make();
  const lowered = Buffer.from(sets);
  lowered.writeUInt32LE((sets.readUInt32LE(0) & ~bit) >>> 0, 0);
  r.call('lowering CAP_SYS_ADMIN for an unprivileged fanotify group', SYS.capset, [header, r.put(lowered)]);
  let made: bigint;
  try {
    made = make();
  } finally {
    r.call('raising CAP_SYS_ADMIN again', SYS.capset, [header, r.put(sets)]);
  }
  return made;
}

export function describeFanotify(g: Fanotify | undefined): string {
  if (!g) return 'fanotify';
  const cls = g.flags & FAN.CLASS_PRE_CONTENT ? 'pre-content' : g.flags & FAN.CLASS_CONTENT ? 'content' : 'notif';
  const kinds = ['inode', 'mount', 'filesystem'];
  const marks = g.marks.map((m) => `${kinds[m.kind]} ${m.path} ${hex(m.mask)}${m.ignoredMask ? ` ignoring ${hex(m.ignoredMask)}` : ''}`);
  return `fanotify ${cls} flags ${hex(g.flags)}${g.unprivileged ? ' unprivileged' : ''} marking ${marks.join(', ') || 'nothing'}`;
}
