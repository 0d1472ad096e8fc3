/**
 * The owner (F_SETOWN, F_SETOWN_EX) and signal (F_SETSIG) of every
 * descriptor. Both belong to the open file description and nothing in
 * /proc shows them: the snapshot asks the frozen process (fcntl
 * F_GETOWN_EX, F_GETSIG for each descriptor, with the other kinds'
 * questions: no stop of their own). Without this a restored descriptor's
 * owner was nobody: F_GETOWN answered 0, and no SIGIO (O_ASYNC) or SIGURG
 * (a socket's urgent data, which goes to the owner whether or not the
 * descriptor is O_ASYNC) ever came (silently wrong). A descriptor with
 * neither an owner nor a signal records nothing.
 *
 * The owner is a process, a thread or a process group of the application
 * (recorded by virtual id; one outside it is refused by name); the
 * restore sets it again by the new system id, with calls run inside the
 * restored process once its threads exist. For an O_ASYNC descriptor,
 * O_ASYNC is cleared and set again there first: a description opened with
 * O_ASYNC in its flags (a tty, a file) has the bit without the driver's
 * fasync registration, which only F_SETFL makes, and F_SETFL does nothing
 * for a bit already set.
 *
 * A lease's break signal is this same signal (F_SETSIG on the lease's
 * descriptor; the lease made its taker the owner): kept with the others,
 * set after locks.ts took the lease again, which leaves it as it is (only
 * giving a lease up clears it). test/fixtures/leasesig.c.
 *
 * A directory's dnotify watch (F_NOTIFY) belongs to the description and
 * the process that made it, and the kernel shows it nowhere: the preload
 * library notes each F_NOTIFY call by the directory's inode, with the
 * mask, and drops the note when the descriptor it was made through (or a
 * copy) is closed, which ends the watch. A DN_MULTISHOT watch held through one descriptor of the whole
 * application is carried as the mask on that descriptor's owner record,
 * and made again at restore (F_NOTIFY before the owner, which F_NOTIFY
 * sets to its caller) and noted again. Refused by name: a one-shot watch
 * (the kernel drops it unseen when it fires: whether it is still there is
 * not known), and a noted directory held through more than one
 * descriptor (which of them holds the watch is not known).
 * test/fixtures/fdodds.c --dnotify, --dnotify-sigio, --dnotify-oneshot.
 */
import { statSync } from 'node:fs';
import { procDir } from '../procfs.js';
import { type Fd, FdKind, type FdOwner, type Image, type Process } from '../image/types.js';
import { addon } from '../native.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { NR } from '../ptrace/inject.js';
import { type CallBatch, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';
import { NOTE_DNOTIFY } from './sockopts.js';

const O_ASYNC = 0o20000;
const O_PATH = 0o10000000;
const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const EBADF = 9n;
const F_SETFL = 4;
const F_SETSIG = 10;
const F_GETSIG = 11;
const F_SETOWN = 8;
const F_SETOWN_EX = 15;
const F_NOTIFY = 1026;
/** dnotify's event bits (DN_ACCESS .. DN_ATTRIB) and DN_MULTISHOT. */
const DN_EVENTS = 0x3f;
const DN_MULTISHOT = 0x80000000;
const F_GETOWN_EX = 16;
const OWNER_KINDS = ['thread', 'process', 'process group'];

/** Each descriptor's owner and signal, asked (F_GETOWN_EX, F_GETSIG)
 * with the other kinds' questions, by descriptor number: every one the
 * frozen process holds (its table does not change while it is frozen). */
export type FdOwnersAsked = Map<number, { owner: Answer; signal: Answer }>;

export function askFdOwners(calls: CallQueue, pid: number): FdOwnersAsked {
  const asked: FdOwnersAsked = new Map();
  for (const name of procDir(`/proc/${pid}/fd`)) {
    const fd = Number(name);
    asked.set(fd, { owner: calls.ask(NR.fcntl, [fd, F_GETOWN_EX, 'buf'], { outLength: 8 }), signal: calls.ask(NR.fcntl, [fd, F_GETSIG, 0]) });
  }
  return asked;
}

/** The dnotify watch the preload library noted on a directory with inode
 * number `ino` (its mask, as the kernel ORs it together), 'lost' if a
 * note may have found no room, or undefined. */
function dnotifyNoted(ctx: DumpContext, vpid: number, ino: bigint): number | 'lost' | undefined {
  const seen = ctx.tables.sockets;
  if (!seen) return undefined;
  // Made by this very process (whose descriptor table holds the watch):
  // the note of one made elsewhere on the same directory (a child that
  // watched it and exited, its descriptor closed by the kernel where the
  // preload library does not see) says nothing of this descriptor.
  const note = seen.notes.find((n) => n.level === NOTE_DNOTIFY && n.name === F_NOTIFY && n.ino === ino && n.maker === vpid);
  if (note) return note.value >>> 0;
  if (seen.lost > 0 && (seen.lostSeen === undefined || addon().socketNoteLost(seen.lostSeen, ino, 0, 'tcp'))) return 'lost';
  return undefined;
}

/** Fills `fd.owner` of each descriptor of `fds` that has an owner or a
 * signal; `asked`: answered. */
export function dumpFdOwners(ctx: DumpContext, processVpid: number, fds: Fd[], asked: FdOwnersAsked, what: string): void {
  for (const fd of fds) {
    const answers = asked.get(fd.fd);
    if (!answers) throw new Error(`${what} fd ${fd.fd}: its owner was not asked for`);
    const { owner: own, signal: sig } = answers;
    // An O_PATH descriptor takes no F_GETOWN_EX or F_GETSIG (EBADF): it
    // can have neither an owner nor a signal.
    if (fd.flags & O_PATH && own.ret === -EBADF && sig.ret === -EBADF) continue;
    if (own.ret < 0n) throw new Error(`reading the owner of ${what} fd ${fd.fd}: errno ${-own.ret}`);
    if (sig.ret < 0n) throw new Error(`reading the signal of ${what} fd ${fd.fd}: errno ${-sig.ret}`);
    // A directory's signal serves dnotify (F_NOTIFY; a lease, the other
    // user of F_SETSIG, cannot be taken on one). Its watch shows nowhere
    // (not in fdinfo): known only from the preload library's note of the
    // F_NOTIFY call, by the directory's inode number (one of another
    // filesystem with the same number is taken for it: checkDnotify
    // refuses a noted number held twice).
    const dir = fd.kind === FdKind.FILE && (Number(ctx.image.files[fd.file]?.mode ?? 0) & S_IFMT) === S_IFDIR ? ctx.image.files[fd.file] : undefined;
    const watch = dir ? dnotifyNoted(ctx, processVpid, dir.ino) : undefined;
    if (watch === 'lost')
      throw new Unsupported(`${what} fd ${fd.fd}: a directory (${dir!.path}) that may be watched with dnotify (F_NOTIFY): the room for the notes of such watches was full, so whether it is, and how, is not known`);
    // A signal with no watch noted: one made where the preload library
    // does not see (a raw system call instruction) would be lost.
    if (sig.ret > 0n && dir && watch === undefined)
      throw new Unsupported(`${what} fd ${fd.fd}: a directory given a signal (F_SETSIG ${sig.ret}), so watched with dnotify (F_NOTIFY), which the kernel does not show and cannot be captured yet`);
    if (watch !== undefined && !(watch & DN_MULTISHOT))
      throw new Unsupported(`${what} fd ${fd.fd}: a directory (${dir!.path}) watched with a one-shot dnotify watch (F_NOTIFY without DN_MULTISHOT), which the kernel drops unseen when it fires: whether it is still there is not known, so it cannot be captured`);
    const type = own.out.readInt32LE(0);
    const system = own.out.readInt32LE(4);
    const async = (fd.flags & O_ASYNC) !== 0;
    if (!system && !sig.ret && !async && watch === undefined) continue;
    if (type < 0 || type > 2) throw new Unsupported(`${what} fd ${fd.fd}: an owner of type ${type} cannot be captured yet`);
    const vpid = system ? ctx.virtual('pid', system) : 0;
    if (system && !vpid) throw new Unsupported(`${what} fd ${fd.fd}: ${async ? 'its signal-driven I/O (O_ASYNC) goes to' : 'its owner (F_SETOWN) is'} ${OWNER_KINDS[type]} ${system}, outside the application, which cannot be captured`);
    fd.owner = { type, vpid, signal: Number(sig.ret), ...(watch !== undefined ? { dnotify: watch } : {}) };
  }
}

/** Once every process is seen: a dnotify watch belongs to one description
 * and one process's table, and its note only names the directory's inode.
 * A noted directory held through any other descriptor of the application
 * (another description, a copy, another process's) is refused: which of
 * them holds the watch is not known. */
export function checkDnotify(image: Image): void {
  const holders = new Map<bigint, { p: Process; fd: Fd }[]>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      const file = fd.kind === FdKind.FILE ? image.files[fd.file] : undefined;
      if (!file || (Number(file.mode) & S_IFMT) !== S_IFDIR) continue;
      holders.set(file.ino, [...(holders.get(file.ino) ?? []), { p, fd }]);
    }
  for (const p of image.processes)
    for (const fd of p.fds) {
      if (!fd.owner?.dnotify) continue;
      const file = image.files[fd.file];
      const other = holders.get(file.ino)!.find((h) => h.fd !== fd);
      if (other)
        throw new Unsupported(`process ${p.vpid} (${p.comm}) fd ${fd.fd}: a directory (${file.path}) watched with dnotify (F_NOTIFY), also held as process ${other.p.vpid} fd ${other.fd.fd}: which of them holds the watch is not known, so it cannot be captured`);
    }
}

/** The directory inode numbers of the image's dnotify watches, whose notes
 * a snapshot keeps (sockopts.ts forgetClosed). */
export function dnotifyInos(image: Image): bigint[] {
  return image.processes.flatMap((p) => p.fds.filter((fd) => fd.owner?.dnotify).map((fd) => image.files[fd.file].ino));
}

/** A hostile image: a dnotify mask with bits the kernel does not know, no
 * event, or no DN_MULTISHOT (never recorded), or on a descriptor that is
 * not a directory, is refused before anything is made. */
export function dnotifyRecordFault(image: Image, fd: Fd): string | undefined {
  const mask = fd.owner?.dnotify;
  if (!mask) return undefined;
  if (mask & ~(DN_EVENTS | DN_MULTISHOT) || !(mask & DN_EVENTS) || !(mask & DN_MULTISHOT)) return `has a dnotify watch of mask 0x${(mask >>> 0).toString(16)}, not one of events (0x3f) with DN_MULTISHOT`;
  const file = fd.kind === FdKind.FILE ? image.files[fd.file] : undefined;
  if (!file || (Number(file.mode) & S_IFMT) !== S_IFDIR) return 'has a dnotify watch but is not a directory';
  return undefined;
}

/** Sets each descriptor's owner and signal again (an O_ASYNC one's
 * fasync registration too); after the process's threads are made (an
 * owner may be one of them). The calls are
 * added to `calls`, a batch of the main thread's that its caller runs
 * (with other kinds' calls: one stop for all). */
export function restoreFdOwners(r: RemoteProcess, p: Process, h: RestoreContext, calls: CallBatch): void {
  const owned = p.fds.filter((fd): fd is Fd & { owner: FdOwner } => fd.owner !== undefined);
  if (!owned.length) return;
  const pids = addon().readTables(h.tablesPath).tables.pid ?? [];
  for (const fd of owned) {
    const where = `process ${p.vpid} fd ${fd.fd}`;
    // The watch first: F_NOTIFY makes its caller the owner, which the
    // recorded one then replaces.
    if (fd.owner.dnotify) {
      calls.add(`${where}: watching its directory with dnotify (mask 0x${(fd.owner.dnotify >>> 0).toString(16)})`, SYS.fcntl, [fd.fd, F_NOTIFY, fd.owner.dnotify >>> 0]);
      // Noted again, as the preload library noted the original's (made by
      // this process: a program it execs finds the watch by it): a later
      // snapshot carries it too. By the inode of what the descriptor is
      // once placed (a clone's may be its own copy), when it is.
      const mask = fd.owner.dnotify | 0;
      h.whenProcessesAreFinal(() => {
        const ino = statSync(`/proc/${r.pid}/fd/${fd.fd}`, { bigint: true }).ino;
        addon().noteSocket(h.tablesPath, { ino, level: NOTE_DNOTIFY, name: F_NOTIFY, value: mask, port: 0, kind: '', maker: p.vpid });
      });
    }
    if (fd.flags & O_ASYNC) {
      calls.add(`${where}: clearing O_ASYNC`, SYS.fcntl, [fd.fd, F_SETFL, fd.flags & ~O_ASYNC]);
      calls.add(`${where}: setting O_ASYNC`, SYS.fcntl, [fd.fd, F_SETFL, fd.flags]);
    }
    if (fd.owner.vpid) {
      const system = pids.find((e) => e.virtual === fd.owner.vpid)?.system;
      if (system === undefined) throw new Error(`${where}: its owner, ${OWNER_KINDS[fd.owner.type]} ${fd.owner.vpid}, was not restored`);
      const owner = Buffer.alloc(8);
      owner.writeInt32LE(fd.owner.type, 0);
      owner.writeInt32LE(system, 4);
      calls.add(`${where}: setting its owner, ${OWNER_KINDS[fd.owner.type]} ${fd.owner.vpid}`, SYS.fcntl, [fd.fd, F_SETOWN_EX, r.put(owner)]);
    } else if (fd.owner.dnotify) {
      // None recorded: F_NOTIFY above made this process the owner, which
      // the original's descriptor was not (its owner set to 0 since).
      calls.add(`${where}: clearing the owner F_NOTIFY gave it`, SYS.fcntl, [fd.fd, F_SETOWN, 0]);
    }
    if (fd.owner.signal) calls.add(`${where}: setting its signal ${fd.owner.signal}`, SYS.fcntl, [fd.fd, F_SETSIG, fd.owner.signal]);
  }
}
