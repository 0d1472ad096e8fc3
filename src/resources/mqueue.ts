/**
 * POSIX message queues (mq_open). A queue's descriptor is a regular inode
 * of the mqueue file system, named "/NAME" (or "/NAME (deleted)" once
 * unlinked). Its state: the name, each descriptor's open flags (access
 * mode, O_NONBLOCK) and text offset, the queue's attributes (mq_maxmsg,
 * mq_msgsize), owner and mode, its messages with their priorities, and a
 * notification registration (mq_notify). The queue is kept once in the
 * image (Image.posixQueues), however many descriptors of however many
 * processes hold it.
 *
 * Messages: the kernel has no way to read one without removing it. While
 * the application is frozen, appshot opens a description of its own of the
 * queue (readable, writable, non-blocking: the application's descriptions
 * are not touched), receives every message and at once sends them back in
 * the order received, which is the queue's own order (priority, then
 * arrival), all in one native call (addon mqTakeAndGiveBack). The queue is
 * then as it was before anything else of the snapshot happens, so a
 * snapshot that fails later leaves it exactly as it was. The queue
 * outlives appshot, and while the messages are out of it only the process
 * holding them can put them back: that process is a fork of appshot's in
 * a session of its own, not appshot, so that appshot killed (kill -9)
 * right then loses none (it gives them back, then hands appshot the
 * copies through a pipe). (A queue shared
 * with a process outside the application could see that process act in the
 * instant between; such sharing is not detected. But a sender outside that
 * waits for room in a full queue is: the first receive lets its message in
 * (the kernel hands it over as soon as there is room), so more messages
 * are read than the queue held, and the snapshot is refused; those that no
 * longer fit are sent by a process of appshot's that waits for room as the
 * sender did, so that none is lost.)
 *
 * Notification: the queue's text ("QSIZE:.. NOTIFY:.. SIGNO:..
 * NOTIFY_PID:..") names the registered process and how it is notified,
 * but not a signal's sigev_value nor SIGEV_THREAD's cookie. A SIGEV_NONE
 * registration is made again inside the restored owner, through its own
 * descriptor. So is a SIGEV_SIGNAL one, with the sigev_value the preload
 * library noted when the application's mq_notify succeeded (a note by the
 * queue's inode, APPSHOT_NOTE_MQ_NOTIFY in appshot_table.h), which is
 * noted again for the queue made at restore. A signal registration
 * without that note (made by a raw system call, or the notes full), or
 * whose note is of another signal or another process (the note carries
 * the registering process, as the kernel's registration is its owner's),
 * is refused by name. (One case is not
 * seen: a registration the kernel ended by notifying, made again by a raw
 * system call with the same signal, would be carried with the earlier
 * call's value.) A thread registration is refused by name, and so is a
 * registration on a queue that holds messages (refilling an empty queue
 * would fire it and so end it), and a registration by a process outside
 * the application.
 *
 * Restore (each queue made once, in appshot's process, each description
 * then opened from it and handed over):
 * - a named queue that does not exist is created with the image's
 *   attributes, mode and owner, and filled with its messages. If the
 *   restore fails, it is removed again.
 * - a named queue that exists (restored on the node where it was taken:
 *   a queue outlives its processes) is the application's queue as it is
 *   now, opened by name with its messages as they are now, like a file on
 *   disk: it is neither emptied nor refilled. It must have the image's
 *   attributes (mq_maxmsg, mq_msgsize), or the restore fails naming both:
 *   another queue took the name.
 * - an unlinked queue is created under a temporary name, unlinked at once,
 *   and filled.
 * Creation is charged to the restorer's RLIMIT_MSGQUEUE and bounded by
 * /proc/sys/fs/mqueue (queues_max, msg_max, msgsize_max): a queue that
 * cannot be made fails the restore with one message naming it and what
 * bounds it, and nothing is left.
 *
 * Templates: an unlinked queue is each clone's own (duplicated); a named
 * one is one system-wide name, which clones cannot each have (refused).
 * (The preload library translates the notifier's PID a queue's text
 * shows: addon/preload/preload_ipc.c.)
 */
import { type BigIntStats, closeSync, fchmodSync, fchownSync, constants as fs, fstatSync, openSync, readSync, statfsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { AppshotError } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { addon } from '../native.js';
import { type Fd, FdKind, type Image, type PosixQueue, type Process } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';
import { NOTE_MQ_NOTIFY, type Notes } from './sockopts.js';
import { fsIdentity, identitiesFor, refusedAsProcess } from './fsident.js';
import { strangeOwner } from './creds.js';

/** statfs's f_type of the mqueue file system (linux/magic.h). */
const MQUEUE_MAGIC = 0x19800202;
const O_ACCMODE = 3;
const DELETED = ' (deleted)';
const SIGEV_SIGNAL = 0;
const SIGEV_NONE = 1;
/** The highest signal number (the kernel's _NSIG). */
const SIGRTMAX = 64;
/** The kernel's hard ceilings (ipc/mqueue.c, HARD_MSGMAX etc.) and
 * MQ_PRIO_MAX: what an image may ask for. */
export const MQ_LIMITS = { maxmsg: 65536, msgsize: 16 << 20, priority: 32768, nameBytes: 255 };

/** Per snapshot: whether each anonymous device seen is the mqueue file
 * system's (one statfs per device, not per descriptor), and each queue's
 * index in the image by its inode. */
const seen = new WeakMap<DumpContext, { devices: Map<bigint, boolean>; queues: Map<string, number> }>();

function seenBy(ctx: DumpContext) {
  let s = seen.get(ctx);
  if (!s) seen.set(ctx, (s = { devices: new Map(), queues: new Map() }));
  return s;
}

/** Whether the regular file `st` (stat of `procPath`, a descriptor's
 * /proc/PID/fd link) is a message queue. Only a file on an anonymous
 * device (major 0: tmpfs, mqueue and the like) is looked at; disks' files
 * cost nothing. */
export function isMessageQueue(ctx: DumpContext, st: BigIntStats, procPath: string): boolean {
  if ((st.dev >> 8n) & 0xfffn) return false;
  const { devices } = seenBy(ctx);
  let mqueue = devices.get(st.dev);
  if (mqueue === undefined) {
    mqueue = statfsSync(procPath).type === MQUEUE_MAGIC;
    devices.set(st.dev, mqueue);
  }
  return mqueue;
}

/** The inodes of the queues this snapshot read, each held by a process of
 * the application: their notes stay in the tables (sockopts.ts
 * forgetClosed), as the directories' of dnotify watches do. */
export function heldQueueInos(ctx: DumpContext): bigint[] {
  return [...seenBy(ctx).queues.keys()].map((key) => BigInt(key.slice(key.indexOf(':') + 1)));
}

/** The queue that descriptor `procPath` (/proc/PID/fd/N, whose link reads
 * `target`) is of: its index in image.posixQueues, read once. */
export function dumpMessageQueue(ctx: DumpContext, st: BigIntStats, procPath: string, target: string, where: string): number {
  const { queues } = seenBy(ctx);
  const key = `${st.dev}:${st.ino}`;
  const known = queues.get(key);
  if (known !== undefined) return known;
  // Unlinked as the queue says (no link left), not by its name's end: a
  // queue may be named "/q (deleted)" itself (deleted.ts shownFile).
  const deleted = target.endsWith(DELETED) && st.nlink === 0n;
  const name = deleted ? target.slice(0, -DELETED.length) : target;
  const named = `the POSIX message queue ${name}${deleted ? ' (unlinked)' : ''}`;
  let own: number;
  try {
    own = openSync(procPath, fs.O_RDWR | fs.O_NONBLOCK);
  } catch (e) {
    throw new Unsupported(`${where}: ${named} cannot be opened for reading and writing by appshot (${(e as NodeJS.ErrnoException).code}), which reading its messages needs`);
  }
  try {
    const text = Buffer.alloc(128);
    const status = text.toString('latin1', 0, readSync(own, text, 0, text.length, 0));
    const field = (f: string) => Number(new RegExp(`${f}:\\s*(-?\\d+)`).exec(status)?.[1] ?? NaN);
    const [notify, signo, notifyPid] = [field('NOTIFY'), field('SIGNO'), field('NOTIFY_PID')];
    if (![notify, signo, notifyPid].every(Number.isInteger)) throw new Error(`${where}: ${named} reads "${status.trim()}", not what this kernel usually shows`);
    const attrs = addon().mqAttributes(own);
    const notes = ctx.tables.sockets;
    let notifyVpid = 0;
    let notifySigno = 0;
    let notifyValue = 0n;
    if (notifyPid) {
      notifyVpid = ctx.virtual('pid', notifyPid);
      if (!notifyVpid) throw new Unsupported(`${where}: ${named} is registered for notification (mq_notify) by system process ${notifyPid}, outside the application, which cannot be captured`);
      if (notify === SIGEV_SIGNAL) {
        const registered = `${where}: ${named} is registered for notification (mq_notify) by process ${notifyVpid} with signal ${signo} (SIGEV_SIGNAL)`;
        if (signo === 0) throw new Unsupported(`${registered.replace(' with signal 0 (SIGEV_SIGNAL)', ' with signal 0 (SIGEV_SIGNAL: a registration that sends nothing)')}, which cannot be captured`);
        notifyValue = signalValue(notes, st.ino, signo, notifyVpid, registered);
        notifySigno = signo;
      } else if (notify !== SIGEV_NONE)
        throw new Unsupported(`${where}: ${named} is registered for notification (mq_notify) by process ${notifyVpid} with a thread (SIGEV_THREAD), whose sigev_value the kernel does not show, which cannot be captured yet`);
      if (attrs.curmsgs)
        throw new Unsupported(`${where}: ${named} is registered for notification (mq_notify) by process ${notifyVpid} and holds ${attrs.curmsgs} messages, which cannot be read without firing it (receiving them and sending them back would), which cannot be captured yet`);
    }
    const messages = attrs.curmsgs ? addon().mqTakeAndGiveBack(own, attrs.msgsize, process.env.APPSHOT_TEST_KILL_AT === 'snapshot: mqueue taken') : [];
    if (messages.length) killPoint('snapshot: mqueue given back');
    if (messages.length > attrs.curmsgs)
      throw new Unsupported(
        `${where}: ${named} held ${attrs.curmsgs} messages, ${messages.length} were read: a process outside the application was waiting to send to it (its message is in the queue, or will be once there is room), which cannot be captured`,
      );
    if (messages.length !== attrs.curmsgs) throw new Error(`${where}: ${named} held ${attrs.curmsgs} messages, ${messages.length} were read (another process outside the application uses it)`);
    const queue: PosixQueue = {
      name,
      deleted,
      maxmsg: BigInt(attrs.maxmsg),
      msgsize: BigInt(attrs.msgsize),
      mode: Number(st.mode) & 0o7777,
      uid: Number(st.uid),
      gid: Number(st.gid),
      messages,
      notifyVpid,
      notifySigno,
      notifyValue,
    };
    const all = (ctx.image.posixQueues ??= []);
    all.push(queue);
    queues.set(key, all.length - 1);
    return all.length - 1;
  } finally {
    closeSync(own);
  }
}

/** The sigev_value of the SIGEV_SIGNAL registration (signal `signo`, by
 * process `owner`) of queue `ino`, as the preload library noted it
 * (preload_ipc.c mq_notify). Without a note, or with one of another signal
 * or process (registered again where the preload library did not see), it
 * is not known: refused by name. */
function signalValue(seen: Notes | undefined, ino: bigint, signo: number, owner: number, registered: string): bigint {
  const note = seen?.notes.find((n) => n.level === NOTE_MQ_NOTIFY && n.ino === ino);
  if (!note) {
    const lost = seen?.lost && (seen.lostSeen === undefined || addon().socketNoteLost(seen.lostSeen, ino, 0, 'tcp'));
    throw new Unsupported(
      `${registered}, whose sigev_value the kernel does not show and ${
        lost
          ? `the preload library could not note (the room for ${seen!.lost} such notes was full)`
          : 'the preload library did not see given (registered by a raw mq_notify system call, or by a program it is not loaded in)'
      }, which cannot be captured`,
    );
  }
  if (note.port !== signo || note.maker !== owner)
    throw new Unsupported(
      `${registered}, but the preload library noted a registration ${note.port !== signo ? `with signal ${note.port}` : `by process ${note.maker}`}: it was registered again where the preload library did not see (a raw mq_notify system call), so its sigev_value is not known, which cannot be captured`,
    );
  return BigInt.asUintN(64, (BigInt(note.value >>> 0) << 32n) | BigInt(note.name >>> 0));
}

/* ---- restore ---------------------------------------------------------- */

/** What explains a failure to make a queue: the bound the kernel applied. */
function bound(code: string | undefined): string {
  switch (code) {
    case 'EMFILE':
      return ' (the restorer\'s RLIMIT_MSGQUEUE is used up)';
    case 'ENOSPC':
      return ' (/proc/sys/fs/mqueue/queues_max queues exist)';
    case 'EINVAL':
      return ' (above /proc/sys/fs/mqueue/msg_max or msgsize_max)';
    case 'ENOMEM':
      return ' (out of memory, or the queue\'s size is above RLIMIT_MSGQUEUE)';
    default:
      return '';
  }
}

/** The queue `i` of the image, made once for the whole restore: our
 * description of it (readable and writable) if it was made now, or
 * undefined if a queue of that name exists on this node (then each
 * description is opened by name). */
function makeQueue(h: RestoreContext, p: Process, q: PosixQueue): number | undefined {
  const what = `the POSIX message queue ${q.name}${q.deleted ? ' (unlinked)' : ''}`;
  const create = (name: string) => h.keep(addon().mqOpen(name, fs.O_RDWR | fs.O_CREAT | fs.O_EXCL, 0o600, Number(q.maxmsg), Number(q.msgsize)));
  // An unlinked queue is made under its own name if that is free (its
  // descriptors' links then read as they did), else a temporary one.
  let name = q.name;
  let fd: number;
  try {
    try {
      fd = create(name);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      if (!q.deleted) return undefined;
      fd = create((name = `/appshot-${process.pid}-${randomBytes(6).toString('hex')}`));
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new AppshotError(`cannot make ${what} (${q.maxmsg} messages of ${q.msgsize} bytes): ${code}${bound(code)}`);
  }
  // Made: gone again if anything fails, the unlinked one at once.
  if (q.deleted) addon().mqUnlink(name);
  else {
    h.undoOnFailure(() => addon().mqUnlink(name));
    h.recordQueueMade?.(name);
  }
  // From an image this node did not snapshot, an owner none of its
  // processes is is not given (a root restore would make a queue under
  // any user's name): the first holder's fsuid and fsgid are, as its
  // mq_open would have made it (creds.ts strangeOwner).
  let { uid, gid } = q;
  const stranger = strangeOwner(h.image, uid, [gid]);
  if (stranger) {
    const c = p.threads[0]?.creds ?? p.creds;
    [uid, gid] = [c.uid[3], c.gid[3]];
    h.notKept.push(`${what}: owned by uid ${q.uid} gid ${q.gid}, now uid ${uid} gid ${gid}'s, process ${p.vpid}'s (${stranger})`);
  }
  try {
    if (uid !== process.geteuid!() || gid !== process.getegid!()) fchownSync(fd, uid, gid);
    fchmodSync(fd, q.mode);
    addon().mqSend(fd, q.messages);
  } catch (e) {
    throw new AppshotError(`cannot fill ${what} with its ${q.messages.length} messages (owner ${uid}:${gid}, mode ${q.mode.toString(8)}): ${(e as Error).message}`);
  }
  return fd;
}

/** Our descriptor of the queue image fd `fd` of process `p` is of, opened
 * with its flags and at its offset. */
export function openMessageQueue(h: RestoreContext, p: Process, fd: Fd): number {
  const i = fd.mqueue ?? -1;
  const q = h.image.posixQueues?.[i];
  if (!q) throw new AppshotError(`process ${p.vpid} fd ${fd.fd}: a message queue the image does not hold`);
  const made = h.once(`mqueue ${i}`, () => makeQueue(h, p, q));
  const flags = fd.flags & (O_ACCMODE | fs.O_NONBLOCK);
  let got: number;
  if (made !== undefined) {
    got = h.keep(openSync(`/proc/self/fd/${made}`, flags));
  } else {
    // Opened as the process (fsident.ts): the queue's owner and mode
    // decide, as they did for the process's own mq_open, not a root
    // restorer's rights (issue 12).
    try {
      got = h.keep(addon().mqOpenAs(q.name, flags, identitiesFor(h.image, p)));
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EACCES' || code === 'EPERM') refusedAsProcess(e, `process ${p.vpid} fd ${fd.fd}: the POSIX message queue ${q.name}, which exists on this node,`, fsIdentity(p));
      throw new AppshotError(`process ${p.vpid} fd ${fd.fd}: cannot open the POSIX message queue ${q.name}, which exists on this node: ${(e as Error).message}`);
    }
    const a = addon().mqAttributes(got);
    if (BigInt(a.maxmsg) !== q.maxmsg || BigInt(a.msgsize) !== q.msgsize)
      throw new AppshotError(
        `the POSIX message queue ${q.name} exists on this node with ${a.maxmsg} messages of ${a.msgsize} bytes, the image's has ${q.maxmsg} of ${q.msgsize}: another queue took its name (remove it to restore the image's)`,
      );
  }
  if (fd.pos) addon().lseek(got, Number(fd.pos));
  if (q.notifySigno && q.notifyVpid === p.vpid) {
    // Noted again in the new tables, as the preload library noted the
    // original's registration, by the inode of the queue as restored (a
    // clone's is its own): a later snapshot carries it too. Written once
    // every process is as it will run, its registration made again by
    // then (restoreQueueNotifications).
    const ino = fstatSync(got, { bigint: true }).ino;
    const [signo, value] = [q.notifySigno, q.notifyValue ?? 0n];
    h.once(`mqueue note ${i}`, () =>
      h.whenProcessesAreFinal(() =>
        addon().noteQueueNotify(h.tablesPath, { ino, signo, value: BigInt.asUintN(64, value), owner: p.vpid }),
      ),
    );
  }
  return got;
}

/** The notification registrations (SIGEV_NONE, or SIGEV_SIGNAL with its
 * signal and sigev_value) of process `p`, made again inside it through its
 * own descriptor of each queue, once its descriptors are in place. */
export function restoreQueueNotifications(r: RemoteProcess, p: Process, image: Image): void {
  (image.posixQueues ?? []).forEach((q, i) => {
    if (q.notifyVpid !== p.vpid) return;
    const fd = p.fds.find((f) => f.kind === FdKind.MQUEUE && f.mqueue === i);
    if (!fd) throw new AppshotError(`process ${p.vpid} is registered for notification by the message queue ${q.name}, which it holds no descriptor of`);
    r.reset();
    // struct sigevent: sigev_value (8 bytes), sigev_signo, sigev_notify.
    const sigevent = Buffer.alloc(64);
    if (q.notifySigno) {
      sigevent.writeBigUInt64LE(q.notifyValue ?? 0n, 0);
      sigevent.writeInt32LE(q.notifySigno, 8);
      sigevent.writeInt32LE(SIGEV_SIGNAL, 12);
    } else sigevent.writeInt32LE(SIGEV_NONE, 12);
    const how = q.notifySigno ? ` with signal ${q.notifySigno}` : '';
    r.call(`registering process ${p.vpid} for notification by the message queue ${q.name}${how} (mq_notify)`, SYS.mq_notify, [fd.fd, r.put(sigevent)]);
  });
}

/** What `inspect` says of a descriptor of it. */
export function describeMessageQueue(image: Image, fd: Fd): string {
  const q = image.posixQueues?.[fd.mqueue ?? -1];
  if (!q) return 'POSIX message queue';
  const bytes = q.messages.reduce((n, m) => n + m.data.length, 0);
  return `POSIX message queue ${q.name}${q.deleted ? ' (unlinked)' : ''}, ${q.messages.length} of ${q.maxmsg} messages (${bytes} bytes, at most ${q.msgsize} each)${q.notifyVpid ? `, notifies process ${q.notifyVpid}${q.notifySigno ? ` with signal ${q.notifySigno} (sigev_value ${q.notifyValue ?? 0n})` : ''}` : ''}`;
}

/** Templates: whether clones can each have it. */
export function queueRefusal(image: Image, fd: Fd): string | undefined {
  const q = image.posixQueues?.[fd.mqueue ?? -1];
  if (q && !q.deleted) return `a POSIX message queue named ${q.name} is a system-wide name and cannot be shared by clones`;
  return undefined;
}

/** An image's queues, as the restore relies on them (image/validate.ts):
 * names mq_open takes, attributes and messages within the kernel's hard
 * ceilings and within each queue's own, every descriptor's queue in the
 * image, a notification by a process that holds the queue. */
export function checkPosixQueues(image: Image, corrupt: (what: string) => never): void {
  const queues = image.posixQueues ?? [];
  const held = new Map<number, Set<number>>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      if (fd.kind !== FdKind.MQUEUE) continue;
      const i = fd.mqueue ?? -1;
      if (!(Number.isInteger(i) && i >= 0 && i < queues.length)) corrupt(`process ${p.vpid}'s fd ${fd.fd} is message queue ${i}, which the image does not have`);
      if (!held.has(i)) held.set(i, new Set());
      held.get(i)!.add(p.vpid);
    }
  queues.forEach((q, i) => {
    const where = `message queue ${i}`;
    if (!/^\/[^/\0]+$/.test(q.name) || Buffer.byteLength(q.name) - 1 > MQ_LIMITS.nameBytes) corrupt(`${where} is named "${q.name.slice(0, 80)}", not a name mq_open takes`);
    if (!(q.maxmsg >= 1n && q.maxmsg <= BigInt(MQ_LIMITS.maxmsg) && q.msgsize >= 1n && q.msgsize <= BigInt(MQ_LIMITS.msgsize)))
      corrupt(`${where} holds ${q.maxmsg} messages of ${q.msgsize} bytes (the kernel's ceilings: ${MQ_LIMITS.maxmsg} of ${MQ_LIMITS.msgsize})`);
    if (q.mode > 0o777) corrupt(`${where} has mode ${q.mode.toString(8)}`);
    if (BigInt(q.messages.length) > q.maxmsg) corrupt(`${where} holds ${q.messages.length} messages, more than its ${q.maxmsg}`);
    for (const m of q.messages)
      if (BigInt(m.data.length) > q.msgsize || !(m.priority >= 0 && m.priority < MQ_LIMITS.priority))
        corrupt(`${where} holds a message of ${m.data.length} bytes (at most ${q.msgsize}) or of priority ${m.priority} (below ${MQ_LIMITS.priority})`);
    if (q.notifyVpid && !held.get(i)?.has(q.notifyVpid)) corrupt(`${where} notifies process ${q.notifyVpid}, which holds no descriptor of it`);
    const signo = q.notifySigno ?? 0;
    if (!(Number.isInteger(signo) && signo >= 0 && signo <= SIGRTMAX)) corrupt(`${where} notifies with signal ${signo}, which is no signal (1 to ${SIGRTMAX})`);
    if (signo && !q.notifyVpid) corrupt(`${where} notifies with signal ${signo}, but no process`);
    if (!signo && (q.notifyValue ?? 0n) !== 0n) corrupt(`${where} has a sigev_value without a signal`);
    if (signo && q.messages.length) corrupt(`${where} notifies with a signal and holds messages, which would have fired it`);
  });
}
