/**
 * SysV IPC, the application's global state (FIG. 5, step 278): semaphore
 * sets with their values, shared memory segments with their contents and
 * message queues with their messages (read with MSG_COPY, so the queue
 * keeps them). Ids and keys are stored as the application sees them:
 * virtual.
 */
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, statfsSync, writeSync } from 'node:fs';
import { freemem } from 'node:os';
import { mapFilesPath } from '../procfs.js';
import { AppshotError, ExitCode } from '../errors.js';
import { CAP, hasCap, ownCreds, strangeOwner } from './creds.js';
import { processMay, restorerMay, vouchedFor } from './heldcaps.js';
import { addon, ENTRY_FLAGS, type PagesCheck } from '../native.js';
import { waitPagesChecked } from '../image/format.js';
import { type Image, type MsgQueue, type Process, type SemSet, type ShmSegment, type SigAltStack, VmaKind } from '../image/types.js';
import type { Kind, TablesSnapshot } from '../native.js';
import { type DumpContext, Transient, Unsupported } from './context.js';
import { registersOf, semUndoOf, threadPointer } from '../ptrace/windows.js';
import type { RemoteProcess } from '../ptrace/remote.js';
import type { MapsLine } from './memory.js';

/** statfs f_type of the filesystems SysV segments are files of. */
const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/** APPSHOT_F_RESERVED (appshot_table.h): a key reserved by a keyed create
 * in progress, or by a creator killed inside it that no locker has
 * settled yet. */
const RESERVED = 0x8;
const KEY_KINDS = ['semkey', 'shmkey', 'msgkey'] as const;

/**
 * The tables whose ids dumpSysv walks, with a dead creator's object in
 * them. A creator killed between making a keyed object and binding it
 * leaves the lock owner-dead and its key reserved: the object is in no id
 * entry until the next locker settles the reservation (adopts it), and
 * the application may not have taken the lock since (it is stopped now).
 * So the settling is done here, as that locker would, without waiting for
 * the lock (appshot_repair_if_dead): the image then holds the object and
 * tables that name it, as the application would have found them at its
 * next create. When the dump itself wrote the tables (a thread mapped:
 * threads.ts, whose lock may have been the one that settled), they are
 * read again too; the driver reads them again for the image then
 * (ctx.tablesWritten), so the image's tables and objects agree.
 */
function settledTables(ctx: DumpContext): TablesSnapshot {
  const a = addon();
  const { repaired, holder } = a.repairTablesIfDead(ctx.tablesPath);
  if (repaired) ctx.tablesWritten = true;
  if (!holder) return ctx.tablesWritten ? a.readTables(ctx.tablesPath) : ctx.tables;
  // Busy: a live thread holds the lock. Never one of the application's
  // stopped threads (the freezer lets a stopped holder run on until it
  // lets go: freezer.ts), so one the snapshot did not stop: appshot-init
  // or an appshot command writing PIDs (which make no SysV object), or a
  // process outside the application holding its file. Whoever took the
  // lock after a creator died took it with EOWNERDEAD and settles before
  // anything else, so a reservation seen now is that holder's create, or
  // one it is settling this instant: its object, made or about to be
  // adopted, may be the application's a moment later, and an image read
  // now would lose it. Refused as a moment's state (tried again).
  const now = a.readTables(ctx.tablesPath);
  const reserved = KEY_KINDS.flatMap((kind) => now.tables[kind].filter((e) => e.flags & RESERVED).map((e) => `${kind} 0x${(e.virtual >>> 0).toString(16)}`));
  if (reserved.length)
    throw new Transient(`a keyed SysV create of the application (${reserved.join(', ')}) is in progress or being settled by ${holder > 0 ? `system TID ${holder}` : 'a thread'}, which holds its tables' lock and is not stopped by the snapshot; try again`);
  // None reserved as of that read: every settling finished before it, so
  // a read after it has the adopted ids (one read could have walked the
  // id tables before an adoption and the key tables after it). What the
  // holder writes meanwhile is its own (PIDs), not an object.
  ctx.tablesWritten = true;
  return a.readTables(ctx.tablesPath);
}

export function dumpSysv(ctx: DumpContext): { semaphores: SemSet[]; shmSegments: ShmSegment[]; msgQueues: MsgQueue[]; semGeneration: number } {
  const a = addon();
  const tables = settledTables(ctx);
  const toVirtual = new Map<Kind, Map<number, number>>(KEY_KINDS.map((kind) => [kind, new Map(tables.tables[kind].map((e) => [e.system, e.virtual]))]));
  const vkey = (kind: 'semkey' | 'shmkey' | 'msgkey', key: number) => (key === 0 ? 0 : (toVirtual.get(kind)!.get(key) ?? 0));
  const vpid = (pid: number) => (pid ? ctx.virtual('pid', pid) : 0);
  // A PID field as the application sees it (preload_ipc.c ipc_pid_out):
  // its process's, or what a restore of it recorded while the kernel
  // still shows what that restore left there (its restorer, or nobody),
  // if that process is still the application's.
  const recorded = recordedPids(ctx.tablesPath);
  const live = new Set(tables.tables.pid.map((e) => e.virtual));
  const fieldVpid = (kind: IpcKind, sid: number, field: number, pid: number) => {
    const v = vpid(pid);
    if (v) return v;
    const r = recorded.get(pidKey(kind, sid, field, pid)) ?? 0;
    return r > 0 && live.has(r) ? r : 0;
  };
  const gone = (e: unknown) => ['EINVAL', 'EIDRM'].includes((e as NodeJS.ErrnoException).code ?? '');
  // Read with appshot's rights, which may be more than the application's
  // (a root snapshot): an id its tables name (the tables are its to
  // write) goes into the image only if the kernel says the object is the
  // application's, or another user's segment would reach whoever restores
  // the image. One that is not is left out and said, as the PIDs written
  // into the tables are passed over. Asked before it is read: a read is
  // an attach and a copy of all of a segment (a root snapshot faulted in
  // and copied root's 256 MiB segment, and set its shm_lpid and times),
  // a copy of every message of a queue (review r363 finding 2). One
  // removed meanwhile is passed over, as before: the kernel's answer for
  // an id it no longer has is "not the application's", so whether the id
  // still names an object decides whether that is said.
  const own = ctx.ipcOwnership;
  const isOwn = (kind: IpcKind, what: string, e: { system: number; virtual: number }): boolean => {
    if (!own || a.ipcOwned(ctx.tablesPath, kind, e.system, own.salt, own.created, own.initPid)) return true;
    if (ipcExists(kind, e.system))
      process.stderr.write(`appshot: left out ${what} ${e.system} (virtual id ${e.virtual}): the application's tables name it, but it is not the application's\n`);
    return false;
  };

  const semaphores: SemSet[] = [];
  for (const e of tables.tables.semid) {
    if (!isOwn('semid', 'semaphore set', e)) continue;
    try {
      const s = a.semRead(e.system);
      semaphores.push({ vid: e.virtual, vkey: vkey('semkey', s.perm.key), mode: s.perm.mode, uid: s.perm.uid, gid: s.perm.gid, values: s.values, vpids: s.pids.map((pid, n) => fieldVpid('semid', e.system, n, pid)) });
    } catch (err) {
      if (!gone(err)) throw err; // removed, its entry not yet forgotten
    }
  }
  const shmSegments: ShmSegment[] = [];
  const mapped = mappedSegments(ctx);
  let statuses: Map<number, SegmentStatus> | undefined;
  const wanted = () => new Set(tables.tables.shmid.map((e) => e.system));
  const status = () => (statuses ??= segmentStatuses(wanted()));
  // Removed while attached (SHM_DEST), and attached by no process of the
  // image: only processes outside the application keep it (it goes at
  // their last detach), and a restore would make one that nothing
  // attaches, which it refuses (validate.ts). Left out, said. Known from
  // its status line where it can be read, before any read of it: an
  // attach of appshot's own (attachSegment) would read all of it for
  // nothing, and set its shm_lpid, atime and dtime under the processes
  // that still use it.
  const leftOut = (e: { system: number; virtual: number }) =>
    process.stderr.write(`appshot: left out shared memory segment ${e.system} (virtual id ${e.virtual}): removed (IPC_RMID) while attached, and attached by no process of the application\n`);
  for (const e of tables.tables.shmid) {
    try {
      const at = mapped.get(e.virtual);
      if (!at?.length && status().get(e.system)?.destroyed) {
        if (isOwn('shmid', 'shared memory segment', e)) leftOut(e);
        continue;
      }
      if (!isOwn('shmid', 'shared memory segment', e)) continue;
      const streamed = streamSegment(ctx, e.system, at, status);
      if (!streamed) boundPagesMadeByAttach(e);
      const s = streamed ?? attachSegment(ctx, e.system);
      // Where its status line could not be read (its pages, written by
      // then, are left unnamed in the page file).
      if (s.destroyed && !at?.length) {
        leftOut(e);
        continue;
      }
      shmSegments.push({
        vid: e.virtual,
        vkey: vkey('shmkey', s.perm.key),
        // Its permission bits, and SHM_LOCKED as IPC_STAT gives it.
        mode: s.perm.mode | (s.locked ? SHM_LOCKED : 0),
        uid: s.perm.uid,
        gid: s.perm.gid,
        size: BigInt(s.size),
        cvpid: fieldVpid('shmid', e.system, IPC_FIELD.shmCpid, s.cpid),
        lvpid: fieldVpid('shmid', e.system, IPC_FIELD.shmLpid, s.lpid),
        contents: { offset: BigInt(s.offset), runs: s.runs, fromParent: [] },
        ...(s.destroyed ? { destroyed: true } : {}),
      });
    } catch (err) {
      if (!gone(err)) throw err;
    }
  }
  const msgQueues: MsgQueue[] = [];
  for (const e of tables.tables.msgid) {
    if (!isOwn('msgid', 'message queue', e)) continue;
    try {
      const q = a.msgRead(e.system);
      msgQueues.push({
        vid: e.virtual,
        vkey: vkey('msgkey', q.perm.key),
        mode: q.perm.mode,
        uid: q.perm.uid,
        gid: q.perm.gid,
        qbytes: BigInt(q.qbytes),
        messages: q.messages.map((m) => ({ type: BigInt(m.type), data: m.data })),
        lsvpid: fieldVpid('msgid', e.system, IPC_FIELD.msgLspid, q.lspid),
        lrvpid: fieldVpid('msgid', e.system, IPC_FIELD.msgLrpid, q.lrpid),
      });
    } catch (err) {
      if (!gone(err)) throw err;
    }
  }
  return { semaphores, shmSegments, msgQueues, semGeneration: semGeneration(ctx) };
}

type IpcKind = 'semid' | 'shmid' | 'msgid';
/** enum appshot_kind's numbers of the IPC id kinds (appshot_table.h). */
const KIND_NUMBER: Record<IpcKind, number> = { semid: 1, shmid: 2, msgid: 3 };
/** appshot_ipc_pid.field: APPSHOT_IPC_* (a semaphore's is its number). */
const IPC_FIELD = { shmCpid: 0, shmLpid: 1, msgLspid: 0, msgLrpid: 1 } as const;
/** struct appshot_ipc_pids: count, pad, then entries of sid (int32), kind
 * and field (uint16 each), shown and vpid (int32 each). */
const IPC_PIDS_HEADER = 8;
const IPC_PID_ENTRY = 16;
const IPC_PID_SLOTS = 4096;
/** Semaphore numbers an entry's 16-bit field holds (0 to 65535). */
const IPC_SEM_FIELD_LIMIT = 0x10000;
const pidKey = (kind: IpcKind, sid: number, field: number, shown: number) => `${KIND_NUMBER[kind]}:${sid}:${field}:${shown}`;

/** What a restore wrote into tables file `path` of the PIDs its SysV
 * objects show (appshot_table.h, struct appshot_ipc_pids): the virtual
 * PID by object, field and the system PID the kernel shows. The
 * application may have written anything there: bounded, and a PID out of
 * the kernel's range is none. */
function recordedPids(path: string): Map<string, number> {
  const out = new Map<string, number>();
  const fd = openSync(path, 'r');
  try {
    const at = addon().tablesIpcPidsOffset;
    const head = Buffer.alloc(IPC_PIDS_HEADER);
    if (readSync(fd, head, 0, head.length, at) !== head.length) return out;
    const count = Math.min(head.readUInt32LE(0), IPC_PID_SLOTS);
    if (!count) return out;
    const b = Buffer.alloc(count * IPC_PID_ENTRY);
    const got = readSync(fd, b, 0, b.length, at + IPC_PIDS_HEADER);
    for (let i = 0; i + IPC_PID_ENTRY <= got; i += IPC_PID_ENTRY) {
      const vpid = b.readInt32LE(i + 12);
      if (vpid <= 0 || vpid > PID_MAX) continue;
      out.set(`${b.readUInt16LE(i + 4)}:${b.readInt32LE(i)}:${b.readUInt16LE(i + 6)}:${b.readInt32LE(i + 8)}`, vpid);
    }
  } finally {
    closeSync(fd);
  }
  return out;
}

/** PID_MAX_LIMIT - 1: the highest PID the kernel hands out. */
const PID_MAX = 4194303;

/**
 * After every restored process has attached its segments and been given
 * its SEM_UNDO adjustments, before any runs: each PID field of the
 * restored objects (shm_cpid, shm_lpid, msg_lspid, msg_lrpid, each
 * semaphore's sempid) shows the application the virtual PID the image
 * recorded. The kernel names whoever made or last used an object: here
 * the restorer (it made them), or a restored process (its attach, its
 * SEM_UNDO operation), or nobody (0). A field naming a process of the
 * application is made the restorer's (touchSysv) unless that process is
 * the one recorded; then, where the image recorded a process of its own,
 * the tables say "while the kernel shows this, report that"
 * (appshot_ipc_pids, which preload_ipc.c consults). The first use of the
 * object by a process of the application replaces the kernel's value,
 * and the translation of that process's PID applies, as before.
 * A recorded PID of no process of the image (the image is untrusted; a
 * snapshot records only processes of the application) is shown as 0, as
 * the library shows a PID of a process outside the application, rather
 * than refused: it names nothing the application could reach, and a
 * process given that virtual PID later would be named by it. Where a
 * field cannot be made the restorer's (the kernel refused this restorer
 * the attach or the operation), the restore says so (notKept).
 */
export function settleSysvPids(image: Image, shmIds: Map<number, number>, tables: string, notKept: string[]): void {
  if (!image.shmSegments.length && !image.semaphores.length && !image.msgQueues.length) return;
  const t = addon().readTables(tables).tables;
  const appVirtual = new Map(t.pid.map((e) => [e.system, e.virtual]));
  const imageVpids = new Set([...image.processes.map((p) => p.vpid), ...image.processes.flatMap((p) => (p.zombies ?? []).map((z) => z.vpid))]);
  const expected = (v: number) => (imageVpids.has(v) ? v : 0);
  const entries: { kind: IpcKind; sid: number; field: number; shown: number; vpid: number }[] = [];
  const left: string[] = [];
  /** One field: `shown` the kernel's PID there, `touch` makes it the
   * restorer's (undefined: cannot be touched, as shm_cpid). */
  const settle = (what: string, kind: IpcKind, sid: number, field: number, recordedVpid: number, shown: number, touch?: () => void) => {
    const want = expected(recordedVpid);
    const seen = appVirtual.get(shown);
    if (seen !== undefined && seen !== want && touch) {
      try {
        touch();
        shown = process.pid;
      } catch (e) {
        left.push(`${what}: shows process ${seen}, not ${want || 'none (0)'} as the image had it (${(e as Error).message})`);
        return;
      }
    } else if (seen !== undefined) {
      if (seen !== want) left.push(`${what}: shows process ${seen}, not ${want || 'none (0)'} as the image had it`);
      return;
    }
    if (want) entries.push({ kind, sid, field, shown, vpid: want });
  };
  const shmStatus = segmentStatuses(new Set(shmIds.values()));
  for (const s of image.shmSegments) {
    const sid = shmIds.get(s.vid);
    if (sid === undefined) continue;
    const st = shmStatus.get(sid);
    if (!st) {
      left.push(`shared memory segment ${s.vid}'s creator and last user (shm_cpid, shm_lpid): not found in /proc/sysvipc/shm, shown as the kernel has them`);
      continue;
    }
    settle(`shared memory segment ${s.vid}'s creator (shm_cpid)`, 'shmid', sid, IPC_FIELD.shmCpid, s.cvpid, st.cpid);
    settle(`shared memory segment ${s.vid}'s last user (shm_lpid)`, 'shmid', sid, IPC_FIELD.shmLpid, s.lvpid, st.lpid, () => addon().touchSysv('shmid', sid, 0));
  }
  if (image.semaphores.length || image.msgQueues.length) {
    const semIds = new Map(t.semid.map((e) => [e.virtual, e.system]));
    for (const set of image.semaphores) {
      const sid = semIds.get(set.vid);
      if (sid === undefined) continue;
      let pids: number[];
      try {
        // Needs read permission (IPC_STAT, GETPID): a set of mode 0200,
        // say, restored by its owner without CAP_IPC_OWNER is refused.
        pids = addon().semRead(sid).pids;
      } catch (e) {
        left.push(`semaphore set ${set.vid}'s last users (GETPID): ${(e as Error).message}, shown as the kernel has them`);
        continue;
      }
      // The table's field is 16 bits, as the kernel's sem_num is: a
      // semaphore beyond (SEMMSL raised past 65536) cannot be named.
      if (pids.length > IPC_SEM_FIELD_LIMIT)
        left.push(`semaphores ${IPC_SEM_FIELD_LIMIT} to ${pids.length - 1} of set ${set.vid}'s last users (GETPID): beyond the semaphore numbers the tables hold, shown as the kernel has them`);
      pids.slice(0, IPC_SEM_FIELD_LIMIT).forEach((pid, n) => settle(`semaphore ${n} of set ${set.vid}'s last user (GETPID)`, 'semid', sid, n, set.vpids[n] ?? 0, pid, () => addon().touchSysv('semid', sid, n)));
    }
    const msgIds = new Map(t.msgid.map((e) => [e.virtual, e.system]));
    const queuePids = image.msgQueues.length ? msgPids(new Set(msgIds.values())) : new Map<number, { lspid: number; lrpid: number }>();
    for (const q of image.msgQueues) {
      const sid = msgIds.get(q.vid);
      if (sid === undefined) continue;
      const m = queuePids.get(sid);
      if (!m) {
        left.push(`message queue ${q.vid}'s last sender and receiver (msg_lspid, msg_lrpid): not found in /proc/sysvipc/msg, shown as the kernel has them`);
        continue;
      }
      // Only the restorer sent (its refill) and nobody received: no
      // process of the application is named, nothing to touch.
      settle(`message queue ${q.vid}'s last sender (msg_lspid)`, 'msgid', sid, IPC_FIELD.msgLspid, q.lsvpid, m.lspid);
      settle(`message queue ${q.vid}'s last receiver (msg_lrpid)`, 'msgid', sid, IPC_FIELD.msgLrpid, q.lrvpid, m.lrpid);
    }
  }
  if (entries.length > IPC_PID_SLOTS) left.push(`${entries.length - IPC_PID_SLOTS} PIDs of SysV objects beyond the first ${IPC_PID_SLOTS}: shown as 0`);
  if (left.length) notKept.push(`SysV PIDs: ${left.join('; ')}`);
  if (!entries.length) return;
  const kept = entries.slice(0, IPC_PID_SLOTS);
  const b = Buffer.alloc(IPC_PIDS_HEADER + kept.length * IPC_PID_ENTRY);
  kept.forEach((e, i) => {
    const at = IPC_PIDS_HEADER + i * IPC_PID_ENTRY;
    b.writeInt32LE(e.sid, at);
    b.writeUInt16LE(KIND_NUMBER[e.kind], at + 4);
    b.writeUInt16LE(e.field, at + 6);
    b.writeInt32LE(e.shown, at + 8);
    b.writeInt32LE(e.vpid, at + 12);
  });
  b.writeUInt32LE(kept.length, 0);
  const fd = openSync(tables, 'r+');
  try {
    // The entries before the count that makes them seen (no process runs
    // yet: one write would do, but a reader bounds by the count).
    writeSync(fd, b, IPC_PIDS_HEADER, b.length - IPC_PIDS_HEADER, addon().tablesIpcPidsOffset + IPC_PIDS_HEADER);
    writeSync(fd, b, 0, IPC_PIDS_HEADER, addon().tablesIpcPidsOffset);
  } finally {
    closeSync(fd);
  }
}

/** The last sender's and receiver's PIDs of queues `wanted` (system ids),
 * from /proc/sysvipc/msg: read without copying their messages (msgRead
 * would, up to the queue's qbytes). Empty where it cannot be read. */
function msgPids(wanted: Set<number>): Map<number, { lspid: number; lrpid: number }> {
  const out = new Map<number, { lspid: number; lrpid: number }>();
  for (const [id, [lspid, lrpid]] of sysvipcRows('msg', 'msqid', ['lspid', 'lrpid'], wanted) ?? []) out.set(id, { lspid: Number(lspid), lrpid: Number(lrpid) });
  return out;
}

/**
 * The lines of /proc/sysvipc/`file` whose `idColumn` is one of `wanted`
 * (system ids), by id, each as the fields of `columns` (named as the
 * header names them), in that order. Only those lines are split (a host's
 * thousands of others are not, in the frozen window). Undefined where
 * the file cannot be read or lacks a column.
 */
function sysvipcRows(file: 'shm' | 'sem' | 'msg', idColumn: string, columns: string[], wanted: Set<number>): Map<number, string[]> | undefined {
  const out = new Map<number, string[]>();
  let text: string;
  try {
    text = readFileSync(`/proc/sysvipc/${file}`, 'latin1');
  } catch {
    return undefined;
  }
  const lines = text.split('\n');
  const head = lines[0].trim().split(/\s+/);
  const id = head.indexOf(idColumn);
  const at = columns.map((name) => head.indexOf(name));
  if (id < 0 || at.some((i) => i < 0)) return undefined;
  for (let l = 1; l < lines.length && out.size < wanted.size; l++) {
    if (!wanted.has(Number(fieldOf(lines[l], id)))) continue;
    const f = lines[l].trim().split(/\s+/);
    if (f.length < head.length) continue;
    out.set(Number(f[id]), at.map((i) => f[i]));
  }
  return out;
}

/** Whether SysV object `sid` of `kind` exists (its line in /proc/sysvipc,
 * read without using the object). True where that cannot be read. */
function ipcExists(kind: IpcKind, sid: number): boolean {
  const [file, column] = ({ semid: ['sem', 'semid'], shmid: ['shm', 'shmid'], msgid: ['msg', 'msqid'] } as const)[kind];
  return sysvipcRows(file, column, [], new Set([sid]))?.has(sid) ?? true;
}

/** Where each segment (by virtual id, 0 the first) is mapped by a process
 * of the image, dumped by now (a mapping of it: its system PID and range). */
function mappedSegments(ctx: DumpContext): Map<number, { pid: number; start: bigint; end: bigint }[]> {
  const out = new Map<number, { pid: number; start: bigint; end: bigint }[]>();
  for (const p of ctx.image.processes)
    for (const v of p.vmas)
      if (v.kind === VmaKind.SYSV_SHM) {
        let at = out.get(v.shmVid);
        if (!at) out.set(v.shmVid, (at = []));
        at.push({ pid: p.pid, start: v.start, end: v.end });
      }
  return out;
}

type SegmentStatus = { perm: { key: number; mode: number; uid: number; gid: number; cuid: number; cgid: number }; size: number; cpid: number; lpid: number; locked: boolean; destroyed: boolean; nattch: number };

/** The `n`th (0 the first) whitespace-separated field of `line`. */
function fieldOf(line: string, n: number): string {
  let at = 0;
  for (let i = 0; ; i++) {
    while (line.charCodeAt(at) === 32) at++;
    let end = at;
    while (end < line.length && line.charCodeAt(end) !== 32) end++;
    if (i === n || end >= line.length) return line.slice(at, end);
    at = end;
  }
}

/** What IPC_STAT tells of segments `wanted` (system ids), by id, from
 * their lines of /proc/sysvipc/shm: read without the segment being used
 * (the same namespaces' view as IPC_STAT's), once a snapshot. Empty where
 * it cannot be read. */
function segmentStatuses(wanted: Set<number>): Map<number, SegmentStatus> {
  const out = new Map<number, SegmentStatus>();
  const columns = ['key', 'perms', 'size', 'cpid', 'lpid', 'uid', 'gid', 'cuid', 'cgid', 'nattch'];
  for (const [id, [key, perms, size, cpid, lpid, uid, gid, cuid, cgid, nattch]] of sysvipcRows('shm', 'shmid', columns, wanted) ?? []) {
    const mode = parseInt(perms, 8);
    // The mode's permission bits, SHM_LOCKED and SHM_DEST apart, as
    // IPC_STAT gives them (the kernel prints the whole shm_perm.mode).
    out.set(id, {
      perm: { key: Number(key), mode: mode & 0o777, uid: Number(uid), gid: Number(gid), cuid: Number(cuid), cgid: Number(cgid) },
      size: Number(size),
      cpid: Number(cpid),
      lpid: Number(lpid),
      locked: (mode & SHM_LOCKED) !== 0,
      destroyed: (mode & SHM_DEST) !== 0,
      nattch: Number(nattch),
    });
  }
  return out;
}

/**
 * Segment `shmid` written into the page file without attaching it,
 * through a mapping of it that a process of the application has (`at`):
 * its /proc/PID/map_files entry opens the segment's own file, whose data
 * is copied piece by piece (appendFd: a buffer of the writer's, never one
 * of the segment's size, so no bound but the page file's; a segment
 * above Node's largest buffer, 4 GiB, could not be snapshotted, and one of
 * 3 GiB cost 3 GiB of engine memory: review r376 finding 5), its holes
 * (pages never touched) skipped (SEEK_DATA) and none made. Its offset
 * there and the runs of pages stored. An attach of appshot's own
 * (attachSegment) sets the segment's shm_lpid (to appshot's PID, which the
 * application sees as 0), shm_atime and shm_dtime, in the segment the
 * application goes on using after a --leave-running snapshot (hunt h296:
 * ipcpids). Undefined where no process of the image maps it, or map_files
 * cannot be opened (a snapshotter without CAP_CHECKPOINT_RESTORE): then
 * it is attached, as before (README). The file is checked to be that
 * segment (its inode number is its id, its size the segment's, on tmpfs
 * or hugetlbfs) before anything of it is written.
 */
function streamSegment(ctx: DumpContext, shmid: number, at: { pid: number; start: bigint; end: bigint }[] | undefined, statuses: () => Map<number, SegmentStatus>): (SegmentStatus & { offset: number; runs: number[] }) | undefined {
  if (!at?.length) return undefined;
  const status = statuses().get(shmid);
  if (!status) return undefined;
  for (const m of at) {
    let fd: number;
    try {
      fd = openSync(mapFilesPath(m.pid, m.start, m.end), 'r');
    } catch {
      continue;
    }
    try {
      let theSegment = false;
      try {
        const st = fstatSync(fd);
        // And on the kernel's SysV shm filesystem: tmpfs (hugetlbfs for
        // SHM_HUGETLB), not a file of another that has that inode number
        // and size (the maps line named it SYSV, but the mapping may have
        // been replaced since it was read).
        const type = st.ino === shmid && st.size === status.size ? statfsSync(`/proc/self/fd/${fd}`).type : 0;
        theSegment = type === TMPFS_MAGIC || type === HUGETLBFS_MAGIC;
      } catch {
        /* not known to be it: the next mapping, or an attach */
      }
      if (!theSegment) continue;
      // A failure here (the page file's write) is the snapshot's, thrown.
      const { offset, runs } = ctx.pages.appendFd(fd, status.size);
      return { ...status, offset, runs: Array.from(runs) };
    } finally {
      closeSync(fd);
    }
  }
  return undefined;
}


/** The most of an attached segment copied at a time. */
const SEGMENT_PIECE = 16 << 20;

/**
 * Segment `shmid` written into the page file through an attach of
 * appshot's own, where no file of it can be read (streamSegment): its
 * pages that are not all zero, a run at a time through one buffer of
 * SEGMENT_PIECE bytes, never a buffer of its size (review r376 finding
 * 5: shmRead copied all of it, and one above 4 GiB could not be
 * snapshotted). The pages are runs of the image as appendFd's are,
 * stored one after another. The pages it never had are not read where
 * that can be told (shmReadPieces: mincore, no segment page in swap): a
 * read would make them; bounded before otherwise (boundPagesMadeByAttach).
 */
function attachSegment(ctx: DumpContext, shmid: number): SegmentStatus & { offset: number; runs: number[] } {
  const runs: number[] = [];
  let offset: number | undefined;
  let next = 0;
  const piece = Buffer.allocUnsafe(SEGMENT_PIECE);
  const status = addon().shmReadPieces(shmid, piece, (bytes, firstPage) => {
    const data = piece.subarray(0, bytes);
    const at = ctx.pages.append(data);
    // One after another: nothing else writes the page file meanwhile.
    if (offset !== undefined && at !== next) throw new AppshotError(`shared memory segment ${shmid}: its pages were not written one after another in the page file (at ${at}, not ${next})`);
    offset ??= at;
    const pages = Math.ceil(data.length / 4096);
    next = at + pages * 4096;
    const last = runs.length - 2;
    if (last >= 0 && runs[last] + runs[last + 1] === firstPage) runs[last + 1] += pages;
    else runs.push(firstPage, pages);
  });
  return { ...status, nattch: 0, offset: offset ?? ctx.pages.append(Buffer.alloc(0)), runs };
}

/**
 * An attach (attachSegment) reads every page of the segment, and a page
 * it never had is made by that read (a shared tmpfs mapping gets no zero
 * page), charged to the engine and kept by the segment: a 64 GiB segment
 * barely used, on a 16 GiB node, was an OOM (review r399 M2). Where no
 * segment page of this IPC namespace is in swap (the swap column of
 * /proc/sysvipc/shm, summed: SHM_INFO's shm_swp), the read skips the
 * pages the segment's file does not have in memory (shmReadPieces:
 * mincore), which are then exactly those never made; nothing to bound.
 * Where some are, a page not in memory may be one in swap, so all are
 * read: the pages never made (its size less its rss and swap) may then
 * be at most half of this node's available memory (MemAvailable); one
 * line otherwise, naming the segment. Where /proc/sysvipc/shm cannot be
 * read, nothing is known to bound by (shmReadPieces still skips with
 * mincore where SHM_INFO shows no swap).
 */
function boundPagesMadeByAttach(e: { system: number; virtual: number }): void {
  const rows = sysvipcRows('shm', 'shmid', ['size', 'rss', 'swap'], new Set([e.system]));
  const row = rows?.get(e.system);
  if (!row) return;
  const [size, rss, swap] = row.map(BigInt);
  const unmade = size - rss - swap;
  if (unmade <= 0n || namespaceSegmentSwap() === 0n) return;
  const available = BigInt(freemem());
  if (unmade <= available / 2n) return;
  throw new AppshotError(
    `shared memory segment ${e.system} (virtual id ${e.virtual}): ${unmade} of its ${size} bytes were never used, and would be made by reading it, more than half of this node's available memory (${available} bytes): no process of the application maps it, or its file cannot be opened without CAP_CHECKPOINT_RESTORE, so it is read through an attach, and segment pages are in swap here, so the pages never used cannot be told from those in swap`,
  );
}

/** The bytes of all SysV segments of this IPC namespace that are in swap
 * (the swap column of /proc/sysvipc/shm); -1 where it cannot be read. */
function namespaceSegmentSwap(): bigint {
  let text: string;
  try {
    text = readFileSync('/proc/sysvipc/shm', 'latin1');
  } catch {
    return -1n;
  }
  const lines = text.split('\n');
  const at = lines[0].trim().split(/\s+/).indexOf('swap');
  if (at < 0) return -1n;
  let total = 0n;
  for (let l = 1; l < lines.length; l++) {
    const f = fieldOf(lines[l], at);
    if (/^\d+$/.test(f)) total += BigInt(f);
  }
  return total;
}

/** The image's SysV objects made again under the new application's tables
 * (`tables`), at the virtual ids and keys they had; a segment's contents
 * read from the image's pages (`pagesFd`). Returns each segment's new
 * system id by its virtual one, for the processes that map it. */
export function restoreSysv(image: Image, tables: string, pagesFd: number, notKept: string[], pagesCheck?: { check: PagesCheck; chunkSize: number }): Map<number, number> {
  const shmIds = new Map<number, number>();
  // Before anything is made: a lock the image's processes could not
  // have taken is refused.
  mayLockShm(image);
  boundUnseenHoles(image, pagesFd);
  const queueSize = queueSizes(image, notKept);
  const ownerLocks = shmLockedByOwner(image);
  // The count the processes' SEM_UNDO sums were written at, before any
  // of them runs: a new count would make each sum unknown at its next
  // operation, and every later snapshot of the process refused.
  // What this call made is removed by it if a later one fails: made
  // before init starts, by this restorer, which the registration's
  // release may not take for the application's (appshot_ipc_owned: the
  // creator of a private segment lives and is not init's parent yet).
  const made: ['semid' | 'shmid' | 'msgid', number][] = [];
  const owned = (kind: 'semid' | 'shmid' | 'msgid', sid: number, o: IpcOwner, what: string) => {
    made.push([kind, sid]);
    return giveOwner(image, kind, sid, o, what, notKept);
  };
  try {
    if (image.semGeneration) writeSemGeneration(tables, image.semGeneration);
    for (const s of image.semaphores) owned('semid', addon().restoreSem(tables, s.vid, s.vkey, s.mode, s.values), s, 'semaphore set');
    for (const s of image.shmSegments) {
      // Its stored pages, read by restoreShm in pieces straight into the
      // segment (never a buffer of its size in the engine: review r363
      // findings 9, 10), once the page check has passed them.
      const runs = s.contents?.runs ?? [];
      const offset = Number(s.contents?.offset ?? 0n);
      let stored = 0;
      for (let i = 1; i < runs.length; i += 2) stored += runs[i] * 4096;
      waitPagesChecked(pagesCheck, offset, stored);
      // Locked below, as its owner, where this restorer's own lock would
      // have no limit.
      const asOwner = (s.mode & SHM_LOCKED) !== 0 && ownerLocks !== undefined;
      let sid: number;
      try {
        sid = addon().restoreShm(tables, s.vid, s.vkey, asOwner ? s.mode & ~SHM_LOCKED : s.mode, Number(s.size), pagesFd, offset, runs);
      } catch (e) {
        // The kernel refused this restorer the lock (no CAP_IPC_LOCK, its
        // RLIMIT_MEMLOCK short): a privilege, not a fault of the image.
        if (s.mode & SHM_LOCKED && /SHM_LOCK/.test((e as Error).message)) throw new AppshotError(`cannot lock shared memory segment ${s.vid} in memory as the image had it: ${(e as Error).message}`, ExitCode.denied);
        throw e;
      }
      const owner = owned('shmid', sid, s, 'shared memory segment');
      if (asOwner) {
        // The owner it has: the image's, or the first process's that
        // replaced a stranger (giveOwner), whose limit is then the one.
        const limit = ownerLocks.get(owner.uid) ?? ownerLocks.get(s.uid) ?? 0n;
        try {
          addon().lockShmAs(sid, owner.uid, owner.gid, Number(limit), hasCap(ownCreds().capEff, CAP.SYS_RESOURCE));
        } catch (e) {
          throw new AppshotError(`cannot lock shared memory segment ${s.vid} in memory as the image had it, as its owner: ${(e as Error).message}`, ExitCode.denied);
        }
      }
      shmIds.set(s.vid, sid);
    }
    for (const q of image.msgQueues)
      owned('msgid', addon().restoreMsg(tables, q.vid, q.vkey, q.mode, Number(queueSize.get(q.vid) ?? q.qbytes), q.messages.map((m) => ({ type: Number(m.type), data: m.data }))), q, 'message queue');
  } catch (e) {
    for (const [kind, sid] of made) addon().removeIpcObject(kind, sid);
    throw e;
  }
  return shmIds;
}

/** What the segments may store beyond the page file's bytes on disk
 * where its holes cannot be seen: bytes read and compared in the engine
 * for nothing (~0.2 s). */
const UNSEEN_HOLE_MARGIN = 64n << 20n;

/**
 * The segments' stored pages are read from the page file, a hole of it
 * skipped where SEEK_DATA shows it (FillSegment). Where it cannot (a file
 * system not known to show holes, or a page file the engine cannot open
 * again), a hole is read through, every byte in one synchronous call: a
 * crafted image of a few KiB, its segments' runs over a hole of up to
 * shmmax, bought an hour of engine CPU a TiB (review r376 finding 3,
 * r379 L3). The segments' pages stored together (they share no byte:
 * validate.ts) may then be no more than what the file has on disk plus a
 * margin; refused in one line otherwise, before any object is made.
 * Whether holes are shown is the file system's (pageFileHoles: statfs
 * f_type, a known list), not whether this file has one: a dense honest
 * file on ZFS has none yet shows its data, and a compressed one has fewer
 * bytes on disk than it holds (review r399 M3). The bound holds only as
 * far as the file system reports the bytes a file really has: one that
 * makes st_blocks up from the size (sshfs, many FUSE ones) is not bounded
 * by it.
 */
function boundUnseenHoles(image: Image, pagesFd: number): void {
  let stored = 0n;
  for (const s of image.shmSegments) {
    const runs = s.contents?.runs ?? [];
    for (let i = 1; i < runs.length; i += 2) stored += BigInt(runs[i]) * 4096n;
  }
  if (stored <= UNSEEN_HOLE_MARGIN) return;
  const file = addon().pageFileHoles(pagesFd);
  const allocated = BigInt(file.allocated);
  if (file.holesSeen || stored <= allocated + UNSEEN_HOLE_MARGIN) return;
  throw new AppshotError(
    `the image's SysV segments store ${stored} bytes in pages.img, which has ${allocated} bytes on disk of its ${file.size}, on a file system not known to show holes (SEEK_DATA): the rest would be read through as zeros, byte by byte; copy the image to one that does (tmpfs, ext4, xfs, btrfs, f2fs, zfs)`,
  );
}

/**
 * The image's segments that were removed (IPC_RMID) while attached,
 * removed again (`shmIds`: the system ids restoreSysv made them at), now
 * that every restored process has attached its mappings of them: the
 * kernel marks each SHM_DEST and frees it at its last detach, as it
 * would have the original. Their keys are private already (made without
 * one: validate.ts), so no key of the tables finds them; their virtual
 * ids stay bound while they are attached (the kernel lets a removed
 * segment be used by id), and init forgets each once it is gone. Each is
 * attached by then (validate.ts: a process of the image maps it), so
 * none goes at once.
 */
export function removeDestroyedShm(image: Image, shmIds: Map<number, number>): void {
  const destroyed = image.shmSegments.filter((s) => s.destroyed);
  if (!destroyed.length) return;
  const statuses = segmentStatuses(new Set(destroyed.map((s) => shmIds.get(s.vid)!)));
  for (const s of destroyed) {
    const sid = shmIds.get(s.vid);
    if (sid === undefined) throw new AppshotError(`shared memory segment ${s.vid} was not made again`);
    // Removed unattached, it would go at once: the processes' mappings of
    // it would be missing (never so: each attaches it in its memory).
    const nattch = statuses.get(sid)?.nattch;
    if (nattch === 0) throw new AppshotError(`shared memory segment ${s.vid}, removed while attached in the image, is attached by no restored process`);
    if (!addon().removeIpcObject('shmid', sid)) throw new AppshotError(`cannot remove shared memory segment ${s.vid} (system id ${sid}) as the image had it removed while attached`);
  }
}

/** shm_perm.mode's bit for a segment locked in memory (SHM_LOCK); the
 * dump records the mode as IPC_STAT gives it, this bit included. */
const SHM_LOCKED = 0o2000;
/** shm_perm.mode's bit for a segment removed (IPC_RMID) while attached:
 * recorded apart (ShmSegment.destroyed), not in the mode. */
const SHM_DEST = 0o1000;
const CAP_IPC_LOCK = 14n;
const RLIMIT_MEMLOCK = 8;
const PAGE = 4096n;

/**
 * Who locks a locked segment again. The kernel checks SHM_LOCK against
 * the caller and charges the pages to the caller's user: a restorer
 * without CAP_IPC_LOCK locks it itself, within its own RLIMIT_MEMLOCK
 * (undefined here). One with CAP_IPC_LOCK (root) would lock it with no
 * limit, charged to itself: that is what the image had only if one of its
 * processes held CAP_IPC_LOCK too (undefined again). Otherwise the owner
 * locks it (lockShmAs), as it did, within the largest RLIMIT_MEMLOCK the
 * image's processes of that user had, counted with whatever that user has
 * locked on this node: N restores of one image pin no more than the
 * owner may. Returns that limit by owner uid.
 */
function shmLockedByOwner(image: Image): Map<number, bigint> | undefined {
  const own = ownCreds();
  if (!hasCap(own.capEff, Number(CAP_IPC_LOCK)) || !hasCap(own.capEff, CAP.SETUID) || !hasCap(own.capEff, CAP.SETGID)) return undefined;
  if (image.processes.some((p) => credsOf(p).some((c) => ((c.capEff >> CAP_IPC_LOCK) & 1n) === 1n))) return undefined;
  const limits = new Map<number, bigint>();
  for (const p of image.processes) {
    const memlock = p.rlimits.find((r) => r.resource === RLIMIT_MEMLOCK)?.cur ?? 0n;
    for (const uid of new Set(credsOf(p).map((c) => c.uid[1]))) if (memlock > (limits.get(uid) ?? -1n)) limits.set(uid, memlock);
  }
  return limits;
}

const credsOf = (p: Process) => [p.creds, ...p.threads.map((t) => t.creds)].filter((c) => c !== undefined);

/** A locked segment is locked again only if a process of the image could
 * have locked it, by the kernel's rule for SHM_LOCK: CAP_IPC_LOCK, or the
 * segment's owner within its RLIMIT_MEMLOCK, which the kernel counts in
 * whole pages and over every segment that user has locked (a limit of
 * 5000 bytes locks no 5000-byte segment; one of 12 KiB locks one of two
 * 8 KiB segments, not both). A restore gives no more than the image had;
 * what this restorer may do, the kernel decides (restoreShm). Checked for
 * all of them before any is made. */
function mayLockShm(image: Image): void {
  const locked = image.shmSegments.filter((s) => s.mode & SHM_LOCKED);
  if (!locked.length) return;
  if (image.processes.some((p) => credsOf(p).some((c) => ((c.capEff >> CAP_IPC_LOCK) & 1n) === 1n))) return;
  const pages = new Map<number, bigint>();
  for (const s of locked) pages.set(s.uid, (pages.get(s.uid) ?? 0n) + (s.size + PAGE - 1n) / PAGE);
  for (const s of locked) {
    const need = pages.get(s.uid)!;
    const could = image.processes.some((p) => {
      const memlock = p.rlimits.find((r) => r.resource === RLIMIT_MEMLOCK)?.cur ?? 0n;
      return memlock / PAGE >= need && credsOf(p).some((c) => c.uid[1] === s.uid);
    });
    if (!could)
      throw new AppshotError(
        `shared memory segment ${s.vid} is locked in memory (SHM_LOCK), which none of the image's processes could have done (no CAP_IPC_LOCK, and no RLIMIT_MEMLOCK of the ${need * PAGE} bytes, in whole pages, of the segments locked with its owner's uid ${s.uid})`,
        ExitCode.denied,
      );
  }
}

/** kernel.msgmnb of the restorer's IPC namespace: the size (msg_qbytes)
 * msgget gives a queue, and the most IPC_SET may give one without
 * CAP_SYS_RESOURCE. From msgctl(IPC_INFO), not /proc/sys, which may be
 * hidden: a default assumed there could be above the real limit and let a
 * restorer with the capability give a queue more than the image's
 * processes could have set (review r399 L1). */
const readMsgmnb = (): bigint => BigInt(addon().msgLimits().msgmnb);

/** The initial user namespace (its fixed inode, PROC_USER_INIT_INO): the
 * only one where a capability passes the kernel's capable(), which IPC_SET
 * of a queue's size above msgmnb asks for (ipc/msg.c). */
const INIT_USER_NS = 'user:[4026531837]';

/** Whether this restorer may give a queue a size above msgmnb:
 * CAP_SYS_RESOURCE, and in the initial user namespace. Root in a user
 * namespace (rootless podman, LXD, userns-remapped Docker) holds the
 * capability in its own, yet IPC_SET is refused with EPERM (review r399
 * M1); such a restorer lowers the queue as one without it. */
function restorerMayRaiseQueues(): boolean {
  if (!restorerMay(ownCreds().capEff, [CAP.SYS_RESOURCE])) return false;
  try {
    return readlinkSync('/proc/self/ns/user') === INIT_USER_NS;
  } catch {
    return false;
  }
}

/**
 * The size (msg_qbytes) each queue is made at, by virtual id: the image's,
 * or this node's msgmnb where the image's is above it and may not be
 * given. Above msgmnb takes CAP_SYS_RESOURCE (the kernel's rule for
 * IPC_SET), which this restorer must have (it sets it), and which a
 * process of the image must have had (this node's own snapshot taken at
 * its word, heldcaps.ts), so that no image gets unswappable kernel memory
 * beyond msgmnb through a root engine (review r363 finding 5). An honest
 * queue may be above it with neither: made on a node whose msgmnb was
 * larger (msgget gives msgmnb, no capability needed), or on this one
 * before msgmnb was lowered (review r376 finding 4; root in a container
 * has no CAP_SYS_RESOURCE). Such a queue is made at msgmnb where its
 * messages fit (the kernel's msgsnd rule: their bytes, and their count,
 * at most msg_qbytes), the lowering said (notKept); refused by name where
 * they do not, before any object is made (a refill would fail on a
 * message that does not say why). Never more than either side may grant.
 */
function queueSizes(image: Image, notKept: string[]): Map<number, bigint> {
  const sizes = new Map<number, bigint>();
  if (!image.msgQueues.length) return sizes;
  const msgmnb = readMsgmnb();
  const restorerMayRaise = restorerMayRaiseQueues();
  const imageMayRaise = vouchedFor(image) || image.processes.some((p) => processMay(p, [CAP.SYS_RESOURCE]));
  for (const q of image.msgQueues) {
    if (q.qbytes <= msgmnb || (restorerMayRaise && imageMayRaise)) {
      sizes.set(q.vid, q.qbytes);
      continue;
    }
    const why = !restorerMayRaise
      ? 'a size above it takes CAP_SYS_RESOURCE in the initial user namespace, which this restore does not have'
      : "a size above it takes CAP_SYS_RESOURCE, which none of the image's processes had (as where the queue was made on a node whose msgmnb was larger)";
    let bytes = 0n;
    for (const m of q.messages) bytes += BigInt(m.data.length);
    const count = BigInt(q.messages.length);
    if (bytes > msgmnb || count > msgmnb)
      throw new AppshotError(`message queue ${q.vid} holds ${bytes} bytes in ${count} messages, more than this node's msgmnb (${msgmnb}) lets it hold: its size (msg_qbytes) was ${q.qbytes}, and ${why}`, ExitCode.denied);
    sizes.set(q.vid, msgmnb);
    notKept.push(`message queue ${q.vid}: its size (msg_qbytes) is ${msgmnb} bytes, this node's msgmnb, not ${q.qbytes} as in the image (${why}); its ${count} messages (${bytes} bytes) are all in it`);
  }
  return sizes;
}

interface IpcOwner {
  vid: number;
  uid: number;
  gid: number;
  mode: number;
}

/** A restored object belongs to the user it belonged to (a PostgreSQL run
 * by root through runuser removes its segment as postgres at shutdown),
 * which only a restorer who may act for that user can give it: the same
 * user, or root (the kernel's rule for IPC_SET). The tables name it
 * already, so a failure here is undone with the rest of the restore.
 * From an image this node did not snapshot, an owner none of its
 * processes is is not given (a root restore would otherwise make a key
 * under the name of any user, squatting the key a service of theirs
 * uses): the application's first process's effective ids are, and the
 * restore says so (notKept). Returns the owner it has. */
function giveOwner(image: Image, kind: 'semid' | 'shmid' | 'msgid', sid: number, o: IpcOwner, what: string, notKept: string[]): { uid: number; gid: number } {
  let { uid, gid } = o;
  const stranger = strangeOwner(image, uid, [gid]);
  if (stranger) {
    const c = image.processes[0].threads[0]?.creds ?? image.processes[0].creds;
    [uid, gid] = [c.uid[1], c.gid[1]];
    notKept.push(`${what} ${o.vid}: owned by uid ${o.uid} gid ${o.gid}, now uid ${uid} gid ${gid}'s, the application's first process's (${stranger})`);
  }
  if (uid === process.geteuid!() && gid === process.getegid!()) return { uid, gid };
  try {
    addon().setIpcOwner(kind, sid, uid, gid, o.mode);
  } catch (e) {
    throw new AppshotError(`cannot give ${what} ${o.vid} to uid ${uid} gid ${gid}, ${stranger ? "the application's first process's ids" : 'its owner in the image'}: ${(e as Error).message}`, ExitCode.denied);
  }
  return { uid, gid };
}

/** struct appshot_sem_undo (addon/preload/preload_ipc.c): owner and
 * unknown (the halves of one word), capacity, reserved, then entries of
 * key and value (8 bytes each). */
const SEM_UNDO_HEADER = 16;
const SEM_UNDO_ENTRY = 16;
const SEM_UNDO_CAPACITY = 64;
/** In an entry's key: being merged into another entry of its semaphore. */
const SEM_UNDO_MOVING = 0x8000_0000;

/** One process's SEM_UNDO adjustments as its preload library summed them
 * (the kernel's semadj, which /proc does not show): by virtual set id and
 * semaphore number, non-zero ones only, each with the tables' generation
 * of SETVAL, SETALL and IPC_RMID it was written at. `unknown` says why
 * they cannot be known: the library could not follow them, its table was
 * being written when the process was stopped, or appshot cannot read it. */
export function readSemUndo(pid: number, vpid: number, maps: MapsLine[]): { unknown?: 'notFollowed' | 'busy' | 'unreadable'; entries: { vid: number; semnum: number; adj: number; generation: number }[] } {
  const address = semUndoOf(pid, maps);
  // No library (a static program: not followed).
  if (address === undefined) return { entries: [] };
  let header: Buffer;
  try {
    header = addon().readMemory(pid, address, SEM_UNDO_HEADER);
  } catch {
    // Not mapped yet: an exec's library that has not run, so has written
    // nothing; what the process held before the exec is marked in the
    // tables (dumpSemUndo).
    return { entries: [] };
  }
  // Owner -1: being emptied, which a thread does inside a translation
  // window (the freezer lets it finish), so a fork's copy of a table
  // another thread was emptying: unknown once an operation found it so.
  const owner = header.readInt32LE(0);
  const notFollowed = header.readInt32LE(4) !== 0;
  if (owner === -1 && notFollowed) return { unknown: 'notFollowed', entries: [] };
  // Another process's (the parent's, copied by a fork), or none written:
  // this one has none.
  if (owner !== vpid) return { entries: [] };
  if (notFollowed) return { unknown: 'notFollowed', entries: [] };
  // Written by this process, by a library of another layout (a program
  // started before appshot was changed): none is not known.
  if (header.readInt32LE(8) !== SEM_UNDO_CAPACITY) return { unknown: 'unreadable', entries: [] };
  let table: Buffer;
  try {
    table = addon().readMemory(pid, address, SEM_UNDO_HEADER + SEM_UNDO_CAPACITY * SEM_UNDO_ENTRY);
  } catch {
    return { unknown: 'unreadable', entries: [] };
  }
  const entries = [];
  const seen = new Set<string>();
  for (let i = 0; i < SEM_UNDO_CAPACITY; i++) {
    const at = SEM_UNDO_HEADER + i * SEM_UNDO_ENTRY;
    const semnum = table.readUInt32LE(at);
    const vid = table.readInt32LE(at + 4);
    const adj = table.readInt32LE(at + 8);
    const generation = table.readUInt32LE(at + 12);
    if (semnum === 0 || adj === 0) continue;
    // A merge under way (two threads claimed an entry each for one
    // semaphore): the table counts the moved adjustment twice, or holds
    // two parts of it. Summed, it would be wrong.
    const key = `${vid}:${semnum}`;
    if (semnum & SEM_UNDO_MOVING || seen.has(key)) return { unknown: 'busy', entries: [] };
    seen.add(key);
    entries.push({ vid, semnum: semnum - 1, adj, generation });
  }
  return { entries };
}

/** After the entries, in a table of layout 1 (the word at offset 12):
 * where each thread's semop in flight is from its thread pointer (0: no
 * semop yet), and the address its system call returns to. */
const SEM_UNDO_FLIGHT_TPOFF = SEM_UNDO_HEADER + SEM_UNDO_CAPACITY * SEM_UNDO_ENTRY;
/** struct appshot_semop_flight (addon/preload/preload.h); `sp` in a
 * table of layout 2 on. */
const FLIGHT = { state: 0, result: 8, ops: 16, nops: 24, sp: 40, size: 48 } as const;
const SEMOP_ISSUED = 1;
const SEMOP_RECORDING = 2;
/** Offsets in x86-64 struct user_regs_struct. */
const REG = { origRax: 15 * 8, rip: 16 * 8, rsp: 19 * 8 } as const;
const SYS_SEMTIMEDOP = 220n;
/** More operations than a semop takes (SEMOPM, 500 by default). */
const FLIGHT_OPS_READ = 4096;

/**
 * The system TID of a thread of `pid` (stopped) that has a semop with
 * SEM_UNDO made by the kernel and not yet written in the library's table
 * (addon/preload/preload_ipc.c, "A semop in flight"), or undefined. The
 * library holds back the handlers it wraps until the write ends, so such
 * a thread was blocked in a handler it does not wrap (installed before
 * the library, or by a raw system call), or at a test pause.
 * A thread blocked in its semop (its instruction pointer at the call's
 * return address, the call semtimedop), or not yet in it, is not one:
 * the kernel made nothing yet, and the call is made again at restore.
 * Nor is one whose handler interrupted the call before the library saw
 * its result where the signal frame says nothing was made (an
 * interrupted wait: semopFrameSays).
 */
export function unwrittenSemop(pid: number, maps: MapsLine[], altstackOf: (tid: number) => SigAltStack | undefined = () => undefined): number | undefined {
  const address = semUndoOf(pid, maps);
  if (address === undefined) return undefined;
  let tpoff: bigint;
  let returned: bigint;
  let layout: number;
  try {
    const header = addon().readMemory(pid, address, SEM_UNDO_HEADER);
    layout = header.readInt32LE(12);
    if (layout < 1) return undefined; // an older library: no notes
    const flight = addon().readMemory(pid, address + BigInt(SEM_UNDO_FLIGHT_TPOFF), 16);
    tpoff = flight.readBigInt64LE(0);
    returned = flight.readBigUInt64LE(8); // semop_returned, the next word
  } catch {
    return undefined;
  }
  if (tpoff === 0n) return undefined; // no semop made by this program yet
  let tids: number[];
  try {
    tids = readdirSync(`/proc/${pid}/task`).map(Number);
  } catch {
    return undefined;
  }
  for (const tid of tids) {
    const regs = registersOf(tid);
    const tp = regs && threadPointer(regs);
    if (!regs || !tp) continue;
    let note: Buffer;
    try {
      note = addon().readMemory(pid, BigInt.asUintN(64, tp + tpoff), layout >= 2 ? FLIGHT.size : FLIGHT.sp);
    } catch {
      continue;
    }
    const state = note.readInt32LE(FLIGHT.state);
    const result = note.readBigInt64LE(FLIGHT.result);
    if (state === SEMOP_RECORDING) return tid;
    if (state !== SEMOP_ISSUED || result < 0n) continue;
    // Not returned: in the call (blocked, or let run on to it), or before it.
    if (result === 1n && regs.readBigInt64LE(REG.origRax) === SYS_SEMTIMEDOP && regs.readBigUInt64LE(REG.rip) === returned) continue;
    // Made, or maybe made (stopped in a handler that interrupted the call
    // at its return, or before it: the instruction pointer there is in
    // the signal frame): only a SEM_UNDO operation changes the table.
    if (result !== 0n && result !== 1n) continue;
    // Not seen by the library: the signal frame on the thread's stack
    // tells (an interrupted wait, or a signal before the call: nothing
    // made), if it is there.
    if (result === 1n && layout >= 2 && semopFrameSays(pid, maps, note.readBigUInt64LE(FLIGHT.sp), regs.readBigUInt64LE(REG.rsp), returned, altstackOf(tid)) === false) continue;
    const n = Number(note.readBigUInt64LE(FLIGHT.nops));
    if (n > FLIGHT_OPS_READ) return tid;
    try {
      const ops = addon().readMemory(pid, note.readBigUInt64LE(FLIGHT.ops), 6 * n);
      let undo = false;
      for (let i = 0; i < n && !undo; i++) undo = (ops.readInt16LE(6 * i + 4) & SEM_UNDO) !== 0 && ops.readInt16LE(6 * i + 2) !== 0;
      if (undo) return tid;
    } catch {
      return tid;
    }
  }
  return undefined;
}

/** How far below the stub's red zone its signal frame may be: past the
 * extended state (~11 KiB with AMX) and the frame itself. */
const FRAME_REACH = 64n << 10n;
/** The stub's instructions before its system call (preload_ipc.c's
 * semop_syscall: fewer than 64 bytes). */
const STUB_BEFORE = 64n;

/**
 * Whether the kernel made the semop of a thread stopped in a signal
 * handler that interrupted the library's stub (stack pointer `sp` there)
 * before the stub saw its result: the frame the kernel built below the
 * stub's red zone holds the interrupted registers (rsp `sp` and rip in
 * the stub, consecutive words, rcx and rax the two before): before the
 * call, nothing made; at its return, made if rax is 0 (the syscall
 * instruction loads rcx with the return address: checked). Looked for
 * between the thread's stack pointer `rsp` and the stub's, and on the
 * thread's sigaltstack `alt` (the stub off it); undefined where no such
 * frame is found, as the library's jump wrappers do (preload_ipc.c, "A
 * jump out of a semop").
 */
function semopFrameSays(pid: number, maps: MapsLine[], sp: bigint, rsp: bigint, returned: bigint, alt?: SigAltStack): boolean | undefined {
  if (sp === 0n) return undefined;
  const SS_DISABLE = 2;
  const altOn = alt && !(alt.flags & SS_DISABLE) && alt.size > 0n ? alt : undefined;
  const onAlt = (a: bigint) => altOn !== undefined && a >= altOn.sp && a < altOn.sp + altOn.size;
  const scan = (lo: bigint, hi: bigint): boolean | undefined => {
    if (hi - lo < 24n) return undefined;
    let stack: Buffer;
    try {
      stack = addon().readMemory(pid, lo, Number(hi - lo));
    } catch {
      return undefined;
    }
    for (let at = (stack.length - 16) & ~7; at >= 16; at -= 8) {
      if (stack.readBigUInt64LE(at) !== sp) continue;
      const rip = stack.readBigUInt64LE(at + 8);
      if (rip < returned - STUB_BEFORE || rip > returned) continue;
      if (rip < returned) return false;
      if (stack.readBigUInt64LE(at - 8) === returned) return stack.readBigUInt64LE(at - 16) === 0n;
    }
    return undefined;
  };
  const hi = sp - 128n;
  // Below the stub's stack pointer only where the thread runs on that
  // same stack: a handler on a stack the sigaltstack does not show (an
  // SS_AUTODISARM one, reset while it runs) is below it too, and the
  // stub's stack there may hold a stale frame of an earlier signal that
  // would answer "not made" (review r280).
  const mappingOf = (a: bigint) => maps.find((m) => a >= m.start && a < m.end);
  const sameStack = mappingOf(rsp) !== undefined && mappingOf(rsp) === mappingOf(sp);
  let says: boolean | undefined;
  if (rsp < hi && sameStack && onAlt(rsp) === onAlt(sp)) says = scan(hi - rsp > FRAME_REACH ? hi - FRAME_REACH : rsp, hi);
  if (says === undefined && altOn && !onAlt(sp)) {
    const top = altOn.sp + altOn.size;
    const lo = onAlt(rsp) ? rsp : altOn.sp;
    says = scan(top - lo > FRAME_REACH ? top - FRAME_REACH : lo, top);
  }
  return says;
}

/** Where sem_generation is in the tables file (appshot_table.h: the
 * word after the lock). */
const semGenerationAt = () => addon().tablesLockOffset + 4;

/** The tables' count of semaphore SETVAL, SETALL and IPC_RMID, read once
 * per snapshot (the application is stopped: nothing of it changes it). */
const semGenerations = new WeakMap<DumpContext, number>();
function semGeneration(ctx: DumpContext): number {
  let g = semGenerations.get(ctx);
  if (g === undefined) {
    const b = Buffer.alloc(4);
    const fd = openSync(ctx.tablesPath, 'r');
    try {
      if (readSync(fd, b, 0, 4, semGenerationAt()) !== 4) throw new Error(`${ctx.tablesPath} is too short`);
    } finally {
      closeSync(fd);
    }
    semGenerations.set(ctx, (g = b.readUInt32LE(0)));
  }
  return g;
}

function writeSemGeneration(tables: string, generation: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(generation >>> 0);
  const fd = openSync(tables, 'r+');
  try {
    writeSync(fd, b, 0, 4, semGenerationAt());
  } finally {
    closeSync(fd);
  }
}

/**
 * At snapshot, process `pid` (stopped; `what` names it): its SEM_UNDO
 * adjustments, which the kernel applies when it exits (a holder killed
 * gives its semaphore back: apache's accept mutex), for the restore to
 * give back. An adjustment of a set removed since went with it. Refused
 * if the library could not follow them, or if one was written before a
 * SETVAL, SETALL or IPC_RMID (that may have zeroed it or not): restored
 * wrong, a semaphore taken for ever would hang the application, which
 * reported success.
 */
export function dumpSemUndo(ctx: DumpContext, pid: number, maps: MapsLine[], proc: Process, what: string): void {
  const { unknown, entries } = readSemUndo(pid, ctx.virtual('pid', pid), maps);
  const unknowable = `${what}: its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known`;
  // The kernel keeps them across exec; the program's table, in its
  // memory, does not (review r257: read as none, they were lost).
  const flags = ctx.tables.tables.pid.find((e) => e.system === pid)?.flags ?? 0;
  if (flags & ENTRY_FLAGS.semUndoExec) throw new Unsupported(`${unknowable}: it executed another program since an operation with SEM_UNDO, and the new program's library does not know them`);
  if (unknown === 'notFollowed')
    throw new Unsupported(`${unknowable}: it held adjustments of more than ${SEM_UNDO_CAPACITY} semaphores at once, or made operations while a SETVAL, SETALL or IPC_RMID changed them, or shares its memory with another process, or has a thread made without CLONE_SYSVSEM (its adjustments its own), or took a signal whose handler could not wait while the library wrote one (a fault, a one-shot handler, a full real-time signal queue)`);
  if (unknown === 'busy') throw new Unsupported(`${unknowable}: it was stopped while two of its threads were writing the library's table of them (try again)`);
  if (unknown) throw new Unsupported(`${unknowable}: the library's table of them cannot be read (another version of appshot's library?)`);
  const unwritten = unwrittenSemop(pid, maps, (tid) => proc.threads.find((t) => t.tid === tid)?.altstack);
  if (unwritten !== undefined)
    throw new Unsupported(`${unknowable}: its thread ${ctx.virtual('pid', unwritten) || unwritten} was stopped after the kernel made a semop with SEM_UNDO and before the library wrote its adjustment, blocked in a system call there (a signal handler the library does not wrap: one installed by a raw system call, or before the library started) (try again)`);
  const sets = new Set(ctx.tables.tables.semid.map((e) => e.virtual));
  const held = entries.filter((e) => sets.has(e.vid));
  const now = semGeneration(ctx);
  const stale = held.filter((e) => e.generation !== now);
  if (stale.length)
    throw new Unsupported(`${unknowable}: a SETVAL, SETALL or IPC_RMID since its operation on ${stale.map((e) => `set ${e.vid} semaphore ${e.semnum}`).join(', ')} may have zeroed them`);
  if (held.length) proc.semUndo = held.map(({ vid, semnum, adj }) => ({ vid, semnum, adj }));
}

/** semop(2) on x86-64. */
const SYS_SEMOP = 65;
const SEM_UNDO = 0x1000;
const IPC_NOWAIT = 0x800;
const SEMVMX = 32767;

/**
 * At restore, process `p` (its sets made again, under the new tables
 * `tables`; `r` its remote, before it runs): its SEM_UNDO adjustments
 * given back, with operations that leave each semaphore's value as it is:
 * an operation with SEM_UNDO and its opposite without, in one semop (the
 * kernel makes both or neither), on the side with more room (no wait,
 * never above SEMVMX): the raise first for a value up to half SEMVMX,
 * else the lowering first. An adjustment larger than that room is given
 * back in parts (at most three). The
 * values are the image's: the processes have not run since the sets were
 * made, and each process's operations leave them as they were.
 */
export function restoreSemUndo(r: RemoteProcess, p: Process, image: Image, tables: string): void {
  if (!p.semUndo?.length) return;
  const system = new Map(addon().readTables(tables).tables.semid.map((e) => [e.virtual, e.system]));
  const sembuf = (ops: [number, number, number][]) => {
    const b = Buffer.alloc(6 * ops.length);
    ops.forEach(([num, op, flags], i) => {
      b.writeUInt16LE(num, i * 6);
      b.writeInt16LE(op, i * 6 + 2);
      b.writeInt16LE(flags, i * 6 + 4);
    });
    return b;
  };
  for (const u of p.semUndo) {
    const sid = system.get(u.vid);
    const value = image.semaphores.find((s) => s.vid === u.vid)?.values[u.semnum];
    if (sid === undefined || value === undefined) throw new AppshotError(`process ${p.vpid}: its SEM_UNDO adjustment names semaphore ${u.semnum} of set ${u.vid}, which the image does not hold`);
    // semadj is minus the sum of the SEM_UNDO operations: an adjustment
    // above 0 is given by lowering with SEM_UNDO.
    const undoLowers = u.adj > 0;
    for (let left = Math.abs(u.adj); left > 0; ) {
      // The side with more room: a value near SEMVMX raised first left
      // room for one unit per call, and an image may ask for SEMVMX of
      // them (each a call injected into the process). Either side has
      // room for at least half of SEMVMX: at most three calls.
      const raiseFirst = SEMVMX - value >= value;
      const c = Math.min(left, raiseFirst ? SEMVMX - value : value);
      const raise: [number, number, number] = [u.semnum, c, IPC_NOWAIT | (undoLowers ? 0 : SEM_UNDO)];
      const lower: [number, number, number] = [u.semnum, -c, IPC_NOWAIT | (undoLowers ? SEM_UNDO : 0)];
      r.call(`semop giving process ${p.vpid} its SEM_UNDO adjustment ${u.adj} of semaphore ${u.semnum} of set ${u.vid}`, SYS_SEMOP, [sid, r.put(sembuf(raiseFirst ? [raise, lower] : [lower, raise])), 2]);
      left -= c;
    }
  }
}
