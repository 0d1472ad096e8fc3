/**
 * The process as a whole: its place in the tree (virtual PID, parent,
 * process group, session), executable, cwd, umask and the mm fields that
 * prctl(PR_SET_MM_MAP) restores. Credentials (creds.ts) and limits
 * (limits.ts) are resource kinds of their own.
 */
import { closeSync, openSync, statSync } from 'node:fs';
import { childrenOfThread, gatherProc, procBytes, procDir, procLink, type ProcKind, procText, readCmdline, readStat } from '../procfs.js';
import type { ITimer, MmFields, Process } from '../image/types.js';
import { addon } from '../native.js';
import { errnoName } from '../errors.js';
import { fsIdentity, identitiesFor, openDirectoryAs, refusedAsProcess, restoringProcess } from './fsident.js';
import type { DumpedCreds } from './creds.js';
import { dumpLimits } from './limits.js';
import { askSessionKeyring, dumpSessionKeyring, type KeyringAsked } from './keyrings.js';
import { bindsByName } from './socketfile.js';
import { dumpTimeOffsets } from './timens.js';
import { type DumpContext, nameProcess, type RestoreContext, Unsupported } from './context.js';
import { dumpProcVpid } from './procpaths.js';
import { DELETED, deletedExecutable, type RemadeExecutable, removedDirectoryToEnter, saveDeletedFrom, shownLinkFile } from './deleted.js';
import { refuseDeletedFileOdds } from './files.js';
import type { EnvRange } from './environ.js';
import { NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { type CallBatch, type NamedCall, type RemoteProcess, SYS, SyscallError, takeDescriptors } from '../ptrace/remote.js';

function statusFields(pid: number): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of procText(`/proc/${pid}/status`).split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  return out;
}

/** Fields 26–28 and 45–51 of /proc/PID/stat, plus the exact brk, which
 * only the process can tell (brk(0)). */
function mmFields(pid: number, brk: bigint): MmFields {
  const text = procText(`/proc/${pid}/stat`);
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  // f[i] is field i + 3 of proc(5).
  const field = (n: number) => BigInt(f[n - 3]);
  return {
    startCode: field(26),
    endCode: field(27),
    startStack: field(28),
    startData: field(45),
    endData: field(46),
    startBrk: field(47),
    brk,
    argStart: field(48),
    argEnd: field(49),
    envStart: field(50),
    envEnd: field(51),
    auxv: procBytes(`/proc/${pid}/auxv`),
  };
}

/** Interval timers (setitimer): asked of the process, as nothing else
 * shows them. POSIX timers (timer_create) are a kind of their own
 * (timers.ts). */
function dumpItimers(asked: Answer[]): ITimer[] {
  const out: ITimer[] = [];
  for (let which = 0; which < 3; which++) {
    const { ret, out: tv } = asked[which];
    if (ret !== 0n) continue;
    const us = (o: number) => tv.readBigInt64LE(o) * 1000000n + tv.readBigInt64LE(o + 8);
    const timer = { which, intervalUs: us(0), valueUs: us(16) };
    if (timer.intervalUs || timer.valueUs) out.push(timer);
  }
  return out;
}

const ITIMER_REAL = 0;

/** The value to set for a timer to show `t.valueUs` left: a CPU-time one
 * (ITIMER_VIRTUAL, ITIMER_PROF) less the kernel's tick, which
 * set_cpu_itimer adds to every value set (its interval it keeps as
 * given, and a rearm adds nothing): set as read, the timer came back a
 * tick later each round trip. The tick in whole microseconds, rounded
 * down: what is left is then the image's to the microsecond (getitimer's
 * unit), and at most a microsecond later, never sooner. One with a tick
 * or less left (the kernel shows a timer due but not yet fired as a
 * tick) is set to the least it can be, a microsecond (plus the tick):
 * it fires at the first tick it can, not sooner than it would have, and
 * is not lost. */
function itimerValueToSet(t: ITimer, tickNs: number): bigint {
  // A CPU-time timer with nothing left is disarmed (one due shows a
  // tick): recorded for its interval, it stays disarmed (review r294: it
  // came back armed, and its signal killed the process). Not ITIMER_REAL:
  // set with no value, its interval is dropped, so one showing an interval
  // and nothing left is one that fired, whose SIGALRM waits, and which the
  // kernel arms again when that signal is taken (dequeue_signal): set to
  // 0 it never fired again (ticker.c stopped ticking).
  if (t.valueUs === 0n && t.which !== ITIMER_REAL) return 0n;
  const tickUs = t.which === ITIMER_REAL ? 0n : BigInt(Math.floor(tickNs / 1000));
  const value = t.valueUs - tickUs;
  // A timer due at the snapshot fires at once, not never.
  return value > 0n ? value : 1n;
}

/** Interval timers, set late (they start ticking at once): added to
 * `calls`, the last batch of the main thread's before its credentials,
 * which its caller runs. */
export function restoreItimers(r: RemoteProcess, timers: ITimer[], calls: CallBatch): void {
  for (const t of timers) {
    const tv = Buffer.alloc(32);
    tv.writeBigInt64LE(t.intervalUs / 1000000n, 0);
    tv.writeBigInt64LE(t.intervalUs % 1000000n, 8);
    const value = itimerValueToSet(t, addon().tickNanoseconds);
    tv.writeBigInt64LE(value / 1000000n, 16);
    tv.writeBigInt64LE(value % 1000000n, 24);
    calls.add(`setting interval timer ${t.which}`, SYS.setitimer, [t.which, r.put(tv), 0]);
  }
}

/** What dumpProcess needs of the process itself: its exact brk and its
 * three interval timers, asked with the other kinds' questions. */
export interface ProcessAsked {
  brk: Answer;
  itimers: Answer[];
  sessionKeyring: KeyringAsked;
}

/** `tids`: the process's threads, the main one first. */
export function askProcess(calls: CallQueue, tids: readonly number[]): ProcessAsked {
  return {
    brk: calls.ask(NR.brk, [0]),
    itimers: [0, 1, 2].map((which) => calls.ask(NR.getitimer, [which, 'buf'], { outLength: 32 })),
    sessionKeyring: askSessionKeyring(calls, tids),
  };
}

/** `creds`: read first (dumpCreds), before any call was injected;
 * `asked`: askProcess's questions, answered. */
export function dumpProcess(ctx: DumpContext, pid: number, asked: ProcessAsked, groupStopped: boolean, creds: DumpedCreds): Process {
  const st = readStat(pid);
  if (!st) throw new Error(`process ${pid} vanished`);
  refuseOwnNamespaces(ctx, pid, nameProcess(ctx.virtual('pid', pid), st.comm));
  // A child made by clone() with an exit signal other than SIGCHLD (0,
  // SIGUSR1...): a restore forks it, with SIGCHLD, and its parent's
  // waits without __WCLONE, and the signal it is told of the exit by,
  // would see another child.
  if (st.exitSignal !== SIGCHLD_SIGNAL) throw new Unsupported(`${nameProcess(ctx.virtual('pid', pid), st.comm)} was made with exit signal ${st.exitSignal}, not SIGCHLD (clone), which cannot be captured yet`);
  const status = statusFields(pid);
  const who = nameProcess(ctx.virtual('pid', pid), st.comm);
  const exe = namedLink(pid, 'exe', who);
  const exeFile = dumpExecutable(ctx, pid, exe, who);
  const cwd = namedLink(pid, 'cwd', who);
  const root = namedLink(pid, 'root', who);
  refuseLiveDeletedName(pid, 'cwd', cwd, `${who}'s working directory`);
  refuseLiveDeletedName(pid, 'root', root, `${who}'s root directory`);
  const vpid = ctx.virtual('pid', pid);
  const cwdProcVpid = dumpProcVpid(ctx, cwd, `${nameProcess(vpid, st.comm)} working directory`);
  const sessionKeyring = dumpSessionKeyring(asked.sessionKeyring, nameProcess(vpid, st.comm), ctx.launchKeyring);
  return {
    vpid,
    vppid: ctx.virtual('pid', st.ppid),
    vpgid: ctx.virtual('pid', st.pgrp),
    vsid: ctx.virtual('pid', st.session),
    pid,
    comm: st.comm,
    argv: readCmdline(pid),
    creds: creds.threads[0],
    exe,
    cwd,
    // In a process's /proc directory: follows that process.
    cwdProcVpid,
    root,
    ...heldDirectories(ctx, pid, cwdProcVpid ? undefined : cwd, root),
    ...(exeFile === undefined ? {} : { exeFile }),
    umask: parseInt(status.get('Umask') ?? '22', 8),
    rlimits: dumpLimits(pid),
    timeOffsets: dumpTimeOffsets(pid, nameProcess(vpid, st.comm)),
    sigactions: [],
    sharedPending: Buffer.alloc(0),
    threads: [],
    vmas: [],
    mm: mmFields(pid, asked.brk.ret),
    fds: [],
    groupStopped,
    // Read by dumpAttributes (from /proc, or asked inside the process).
    personality: 0,
    dumpable: creds.dumpable,
    glibcTidOffset: 0,
    itimers: dumpItimers(asked.itimers),
    ...(sessionKeyring ? { sessionKeyring } : {}),
  };
}

const LINK_NAMES = { exe: 'executable', cwd: 'working directory', root: 'root directory' } as const;

/** The path of a process's executable, working or root directory
 * (/proc/PID/exe, cwd, root). One nested past PATH_MAX (4096 bytes) is
 * one the kernel cannot name (ENAMETOOLONG): a restore could not enter
 * it by name, nor the image say where it is. Refused by name. */
function namedLink(pid: number, link: keyof typeof LINK_NAMES, who: string): string {
  try {
    return procLink(`/proc/${pid}/${link}`);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENAMETOOLONG') throw e;
    throw new Unsupported(`${who}: its ${LINK_NAMES[link]} is nested too deep for the kernel to name (its path is longer than PATH_MAX, 4096 bytes), which cannot be captured`);
  }
}

/** The identity of the process's executable recorded (Image.files), and
 * its index where it was deleted or replaced since it ran (a package
 * upgrade under a running server: its name is another file's now, or
 * none's). Such a one's bytes go into the image, so that the restored
 * process's /proc/PID/exe is that file again (what it reads there),
 * never the one now at its name nor appshot's seed: refused by name
 * where a copy made from its bytes would not be that file (other links,
 * extended attributes or inode flags of its own: file capabilities would
 * be gone), as a deleted file held open is (files.ts). Its index is the
 * process's own (Process.exe_file): two processes whose executables were
 * two versions replaced at one name each get their own. */
function dumpExecutable(ctx: DumpContext, pid: number, exe: string, who: string): number | undefined {
  const st = statSync(`/proc/${pid}/exe`, { bigint: true });
  // Deleted as the file says, not its name's end: one still there may be
  // named "... (deleted)" (deleted.ts shownLinkFile), recorded under its
  // whole name, not deleted, which openExecutable opens again.
  const { name, deleted } = shownLinkFile(exe, st);
  if (deleted) refuseDeletedFileOdds(`/proc/${pid}/exe`, exe, st, `${who}'s executable`);
  const index = ctx.file(name, `/proc/${pid}/exe`, deleted, st);
  // Recorded earlier as a file still named (it was removed meanwhile): not
  // carried as a deleted one, as an older image's is not.
  if (!deleted || !ctx.image.files[index].deleted || !st.isFile()) return undefined;
  // One file recorded first under another name (two names, both removed):
  // the image keeps one name per file, and a restore checks the
  // executable's against it (validate.ts checkExeFile; review r307).
  const recorded = ctx.image.files[index].path;
  if (recorded !== name)
    throw new Unsupported(`${who}'s executable ${exe} is a file the image records under another name, ${recorded} (one file, two names), which a restore would take for another file`);
  saveDeletedFrom(ctx, `/proc/${pid}/exe`, index);
  return index;
}

/** Refuses, by name, a working or root directory still there whose name
 * ends in " (deleted)": an image says a directory was removed by that
 * suffix of its name (validate.ts, the restore's stand-in), so it would
 * come back as an empty stand-in, or the image be refused as corrupt.
 * (An executable, a descriptor or a mapping of such a file is carried:
 * deleted.ts shownFile.) */
function refuseLiveDeletedName(pid: number, link: string, shown: string, what: string): void {
  if (!shown.endsWith(DELETED)) return;
  let st;
  try {
    st = statSync(`/proc/${pid}/${link}`, { bigint: true });
  } catch {
    return; // gone: whatever reads it next says so
  }
  if (!shownLinkFile(shown, st).deleted) throw new Unsupported(`${what} ${shown} is a directory still there whose name ends in " (deleted)", which an image cannot tell from a removed one yet`);
}

/** The identities of a process's working and root directories (Image.files):
 * with them a restore from our own snapshot enters the very directories
 * though the process no longer reaches them by name (fsident.ts
 * reopenHeld). One removed (rmdir'd while the process was in it) is
 * recorded as a deleted file, with its mode and owner, which its
 * stand-in is given (deleted.ts removedDirectoryToEnter): it came back 0700
 * and the restorer's, and a worker of another uid could no longer use
 * "." (issue 12). Not for a root of "/" (never entered). One not read is
 * only not recorded: the restore then takes the process's word alone, as
 * for an older image. */
function heldDirectories(ctx: DumpContext, pid: number, cwd: string | undefined, root: string): Pick<Process, 'cwdFile' | 'rootFile'> {
  const held = (path: string | undefined, link: string) => {
    if (!path?.startsWith('/')) return undefined;
    const removed = path.endsWith(' (deleted)');
    try {
      const i = ctx.file(removed ? path.slice(0, -' (deleted)'.length) : path, `/proc/${pid}/${link}`, removed);
      // The very directory recorded already (by a descriptor, or another
      // process) as the other (removed between the two reads): the
      // image would say one thing of it twice, which validate.ts refuses.
      return ctx.image.files[i].deleted === removed ? i : undefined;
    } catch {
      return undefined;
    }
  };
  const cwdFile = held(cwd, 'cwd');
  const rootFile = root === '/' ? undefined : held(root, 'root');
  return { ...(cwdFile === undefined ? {} : { cwdFile }), ...(rootFile === undefined ? {} : { rootFile }) };
}

/** The namespaces whose contents no image holds: a process in one of its
 * own (made by a raw system call: the preload library refuses them)
 * would come back in the restore's, its ids, sockets or SysV objects
 * those of another place, or its isolation lost. A user namespace of its
 * own (unshare --user, which the library lets through) is worse: the
 * capabilities the process holds inside it, all of them as its root,
 * would be given to it in the restore's, a root restore's being the
 * host's. A UTS namespace's names are not carried either. Time
 * namespaces are carried (timens.ts); mount and cgroup ones change no id
 * (a mount of its own is missed at restore, naming the file). */
const SIGCHLD_SIGNAL = 17;

const OWN_NAMESPACES: [string, string][] = [
  ['user', 'user'],
  ['pid', 'PID'],
  ['pid_for_children', 'PID (for its children)'],
  ['net', 'network'],
  ['ipc', 'IPC'],
  // Its host and domain names would come back as the restore's (the
  // host's), with both commands succeeding.
  ['uts', 'UTS'],
];
const initNamespaces = new WeakMap<DumpContext, Map<string, string | undefined>>();

/** Refuses, by name, a process in a PID, network or IPC namespace other
 * than the application's init's. The init is the registry's (ctx.initPid),
 * never the tables' init_pid: any process of the application may write
 * that, and pointed at a process elsewhere it would have every process
 * of the application refused, or, at a process of the application in a
 * namespace of its own, that process let through. */
function refuseOwnNamespaces(ctx: DumpContext, pid: number, what: string): void {
  let init = initNamespaces.get(ctx);
  if (!init) {
    const initPid = ctx.initPid;
    // Nothing to judge by: the snapshot would take a process whose
    // namespaces nobody compared (its init ended under it).
    if (initPid <= 0) throw new Unsupported(`${what}: the application's init is gone, so whether it is in namespaces of its own cannot be told`);
    // The init's links in one native call (read now, in the window, as
    // they were one by one): nsLink below answers from it.
    gatherProc(OWN_NAMESPACES.map(([ns]): [ProcKind, string] => ['link', `/proc/${initPid}/ns/${ns}`]));
    init = new Map(OWN_NAMESPACES.map(([ns]) => [ns, nsLink(initPid, ns)]));
    initNamespaces.set(ctx, init);
  }
  for (const [ns, label] of OWN_NAMESPACES) {
    const theirs = init.get(ns);
    const own = theirs === undefined ? undefined : nsLink(pid, ns);
    if (own !== undefined && own !== theirs) throw new Unsupported(`${what} is in a ${label} namespace of its own (${own}), which cannot be captured yet`);
  }
  // A thread may enter another network, IPC or children's PID namespace
  // by itself (setns or unshare by a raw system call: Go's netns idiom),
  // its sockets then of that namespace (/proc/PID/ns/ shows the leader's).
  let tids: string[] = [];
  try {
    // Gathered after its questions (procfs.ts), else read now.
    tids = procDir(`/proc/${pid}/task`).filter((t) => t !== String(pid));
  } catch {
    /* gone: the snapshot finds it so elsewhere */
  }
  for (const tid of tids)
    for (const [ns, label] of OWN_NAMESPACES) {
      if (!PER_THREAD_NAMESPACES.has(ns)) continue;
      const theirs = init.get(ns);
      const own = theirs === undefined ? undefined : nsLink(pid, ns, tid);
      if (own !== undefined && own !== theirs) throw new Unsupported(`${what}: thread ${tid} is in a ${label} namespace of its own (${own}), which cannot be captured yet`);
    }
}

/** Those a thread can be in apart from its process's others. */
const PER_THREAD_NAMESPACES = new Set(['net', 'ipc', 'pid_for_children', 'uts']);

/** /proc/PID/ns/NS's link (net:[4026531840]); undefined where it cannot
 * be read (a kernel without the namespace). */
function nsLink(pid: number, ns: string, tid?: string): string | undefined {
  try {
    return procLink(tid ? `/proc/${pid}/task/${tid}/ns/${ns}` : `/proc/${pid}/ns/${ns}`);
  } catch {
    return undefined;
  }
}

/**
 * Which thread of process `p` forked each of its children: in the kernel a
 * child's parent (real_parent) is that thread, not the process. Its
 * PR_SET_PDEATHSIG comes when that thread exits, and waitpid with
 * __WNOTHREAD finds it from that thread only. The kernel lists a child in
 * /proc/PID/task/TID/children of that thread (gathered with the process's
 * /proc: no read of its own); the children of threads other than the main
 * one are noted in `ctx`, for dumpForkingThreads.
 */
export function noteForkingThreads(ctx: DumpContext, p: Process): void {
  for (const t of p.threads) {
    if (t.tid === p.pid) continue;
    for (const child of childrenOfThread(p.pid, t.tid)) ctx.forkingThreads.set(child, { vppid: p.vpid, vtid: t.vtid });
  }
}

/** Each process's parentVtid, as noteForkingThreads found it while its
 * parent was dumped; 0 (none) for a child of a main thread. */
export function dumpForkingThreads(ctx: DumpContext, processes: Process[]): void {
  for (const p of processes) {
    const forked = ctx.forkingThreads.get(p.pid);
    if (forked && forked.vppid === p.vppid) p.parentVtid = forked.vtid;
  }
}

/* ---- restore ---------------------------------------------------------- */

/** Whether a child of `parent` (a process, or a zombie) was forked by a
 * thread other than its main one (`parentVtid`, as the image has it): that
 * thread must then be made before the child is forked from it. */
export function forkedByOtherThread(parent: Process, parentVtid: number | undefined): boolean {
  return !!parentVtid && parentVtid !== parent.threads[0]?.vtid;
}

/** The system TID of the thread of `parent` that forks a child of
 * `parentVtid` at restore, so that the kernel makes that thread its parent
 * again (dumpForkingThreads, dumpZombies). `tids`: the parent's threads as
 * made, in the image's order (its main thread alone until the others are). */
export function forkingTid(parent: Process, parentVtid: number | undefined, tids: number[]): number {
  if (!forkedByOtherThread(parent, parentVtid)) return tids[0];
  const i = parent.threads.findIndex((t) => t.vtid === parentVtid);
  // The image was validated: the thread is the parent's, and made.
  if (i < 0 || tids[i] === undefined) throw new Error(`process ${parent.vpid}'s thread ${parentVtid}, which forked a child, is not made`);
  return tids[i];
}

/**
 * A unix socket's path is the process's own, resolved in its root
 * directory: in a chrooted process, /s.sock is ROOT/s.sock to everyone
 * else. The restore binds and connects names as appshot's process sees
 * them, so it would bind the host's /s.sock (removing a stale socket file
 * there first). Refused by name until names are resolved under the root,
 * but for a socket whose file was found as appshot sees its name (bound
 * before the chroot, as servers that chroot themselves do: socketfile.ts).
 * Only the names the restore binds or sends from count here: an end of a
 * connection is made as a pair (the name it shows is its listener's), and
 * a datagram socket's peer is connected to through the peer socket when it
 * is the application's (one outside it: checkUnixPeers).
 */
export function refuseChrootedSocketPaths(p: Process, what: string): void {
  if (!p.root || p.root === '/') return;
  const named = (address: string | undefined) => !!address && !address.startsWith('@');
  for (const fd of p.fds) {
    const s = fd.socket;
    if (!s || s.family !== 1) continue; // AF_UNIX
    const own = bindsByName(fd) && !(s.file && !s.file.removed) ? s.address : undefined;
    const name = [own, ...(s.datagrams ?? []).map((d) => d.from)].find(named);
    if (name)
      throw new Unsupported(`${what} fd ${fd.fd}: a unix socket that names ${name} in a process whose root directory is ${p.root} (chroot): the name is resolved in that root, which the restore does not do`);
  }
}

/**
 * The root directory (chroot): last of what the process does by path,
 * since every path after it resolves inside it (its memory's files, its
 * working directory, its inotify watches, its login uid's /proc file are
 * done), and before its credentials, which may take CAP_SYS_CHROOT away.
 * `root` is as appshot's process sees it, as is every other path of the
 * image. Where it cannot be (no such directory, no CAP_SYS_CHROOT here)
 * the restore fails naming it. A process that chrooted as root and then
 * dropped its privileges may not reach its root by name any more: from
 * our own snapshot, the very directory is entered (fsident.ts
 * reopenHeld), as its working directory is. One removed while it was the
 * root (a sandbox that chroots into an empty directory and removes it) is
 * a stand-in of its mode and owner, as a removed working directory is
 * (deleted.ts removedDirectoryToEnter; the same one where it was the
 * working directory too): the image was taken, and its restore failed on
 * the name "... (deleted)".
 */
export function restoreRoot(r: RemoteProcess, p: Process, h: RestoreContext): void {
  if (!p.root || p.root === '/') return;
  // Walked as the process (as its working directory is, restoreProcessState),
  // handed over, and entered by descriptor: fchdir, chroot("."), and back
  // to the working directory, held meanwhile. One stop. A removed one:
  // its stand-in's descriptor, no name walked (removedDirectoryToEnter).
  const rootFd = p.root.endsWith(' (deleted)')
    ? removedDirectoryToEnter(h, p.root, p.rootFile)
    : openDirectoryAs(h.image, p, p.root, 'root directory', p.rootFile);
  try {
    enterRoot(r, p, rootFd);
  } finally {
    closeSync(rootFd);
  }
}

function enterRoot(r: RemoteProcess, p: Process, rootFd: number): void {
  r.reset();
  const dot = r.str('.');
  const b = r.batch();
  const [root] = takeDescriptors(b, [{ what: `taking the root directory ${p.root}`, fd: rootFd }]);
  const here = b.add('holding the working directory', SYS.open, [dot, O_PATH | O_DIRECTORY | O_CLOEXEC, 0]);
  b.add(`entering the root directory ${p.root}`, SYS.fchdir, [0], { call: root, arg: 0 });
  b.add(`changing the root directory to ${p.root}`, SYS.chroot, [dot]);
  b.add('going back to the working directory', SYS.fchdir, [0], { call: here, arg: 0 });
  b.add('closing the working directory', SYS.close, [0], { call: here, arg: 0 });
  b.add('closing the root directory', SYS.close, [0], { call: root, arg: 0 });
  b.run();
}

const O_PATH = 0o10000000;
const O_DIRECTORY = 0o200000;

const PR_SET_MM = 35;
const PR_SET_MM_MAP = 14;
const O_CLOEXEC = 0o2000000;

/** The process-wide state: mm fields (brk, arg/env, auxv and, where
 * allowed, the executable), cwd and umask. `cwd`: where the process's
 * working directory is for this instance (a clone's redirected or private
 * directory), by default the image's. `more`: other kinds' calls for the
 * main thread, run after these in the same stop; their results are
 * returned. Scratch memory is the caller's to reset first (`more`'s
 * arguments may be there already). */
/** A struct prctl_mm_map of `mm` in `r`'s scratch memory, naming `exeFd`
 * (-1: the executable kept), its environment strings at `env` if given. */
function putMmMap(r: RemoteProcess, mm: Process['mm'], auxv: bigint, exeFd: number, env?: EnvRange): bigint {
  const map = Buffer.alloc(104);
  const fields = [mm.startCode, mm.endCode, mm.startData, mm.endData, mm.startBrk, mm.brk, mm.startStack, mm.argStart, mm.argEnd, env?.start ?? mm.envStart, env?.end ?? mm.envEnd, auxv];
  fields.forEach((v, i) => map.writeBigUInt64LE(v, i * 8));
  map.writeUInt32LE(mm.auxv.length, 96);
  map.writeInt32LE(exeFd, 100);
  return r.put(map);
}

/** The call that moves /proc/PID/environ to `env` (environ.ts's new
 * startup strings), every other mm field as restoreProcessState set it:
 * for a batch run after it. Its arguments are in scratch memory. */
export function moveEnvironCall(r: RemoteProcess, p: Process, env: EnvRange): NamedCall {
  const map = putMmMap(r, p.mm, r.put(p.mm.auxv), -1, env);
  return { what: 'moving the environment strings (PR_SET_MM_MAP)', nr: SYS.prctl, args: [PR_SET_MM, PR_SET_MM_MAP, map, 104, 0] };
}

/**
 * The process's names, its working directory and executable, are walked
 * by the restorer as the process (fsident.ts: its filesystem identity, the
 * application's others as fallbacks), never by the process itself before
 * its credentials come back: a root restore of an application run as
 * nobody would otherwise follow a symlink planted in place of its
 * directory into one only root may enter (issue 12). What was opened is
 * handed over (pidfd_getfd run inside it) and used by descriptor: fchdir,
 * and PR_SET_MM_MAP's exe_fd. One stop, as before.
 *
 * The working directory is opened O_PATH: the walk to it is checked, not
 * whether the process may search it, as a directory inherited from a
 * parent of other credentials (su from root's home) need not be; holding
 * it grants nothing, every lookup from it being checked. One in a /proc
 * directory of a restored process (cwdProcVpid) is entered by name still:
 * nothing can be planted there, and the process, root until its
 * credentials, may enter its own /proc directory where its identity
 * could not yet.
 *
 * A directory it entered as root before it dropped its privileges (a
 * daemon that chdirs into its root-only state directory, then becomes
 * nobody) is no longer reached by its credentials: from an image of our
 * own snapshot, the very directory it was in is entered all the same
 * (fsident.ts reopenHeld: same device, inode and birth time, no
 * symlink on the way), and nothing else.
 */
export function restoreProcessState(r: RemoteProcess, p: Process, h: RestoreContext, cwd = p.cwd, more: NamedCall[] = []): bigint[] {
  restoringProcess(r, h.image, p);
  // Ours, closed once the process holds its copies. A removed one's
  // stand-in is handed over by descriptor, not walked as the process:
  // it has no name (dead, made by this restore, given the owner the
  // process recorded for it), so there is no way to it to check and
  // nothing but it to reach (removedDirectoryToEnter).
  const cwdFd = p.cwdProcVpid
    ? -1
    : p.cwd.endsWith(' (deleted)')
      ? removedDirectoryToEnter(h, p.cwd, p.cwdFile)
      : openDirectoryAs(h.image, p, cwd, 'working directory', p.cwdFile);
  let exe: OpenedExecutable = { fd: -1, shared: false };
  try {
    exe = openExecutable(h, p);
    let set = exe.fd >= 0;
    const results = stateByDescriptors(r, p, cwd, more, cwdFd, exe.fd, (why) => {
      set = false;
      // The copy of an executable replaced since it ran, refused (made
      // where files may not be run: /tmp mounted noexec; no
      // CAP_CHECKPOINT_RESTORE): the seed's stays, which the restore says.
      if (exe.shared) h.notKept.push(`process ${p.vpid} (${p.comm}): its executable ${p.exe}, made again from its bytes, could not be set (${why}): /proc/PID/exe names appshot's seed`);
    });
    // Set, but under another name than it had (its name another file's:
    // the new version a package upgrade put there): the right bytes, and
    // a name a program reading /proc/self/exe would not find.
    if (set && exe.remade && exe.remade.shown !== p.exe) h.notKept.push(`process ${p.vpid} (${p.comm}): its executable ${p.exe}, made again from its bytes, is named ${exe.remade.shown}: ${exe.remade.otherName ?? 'its name was not given back'}`);
    return results;
  } finally {
    for (const fd of [cwdFd, exe.shared ? -1 : exe.fd]) if (fd >= 0) closeSync(fd);
  }
}

function stateByDescriptors(r: RemoteProcess, p: Process, cwd: string, more: NamedCall[], cwdFd: number, exeFd: number, exeRefused: (why: string) => void): bigint[] {
  const mm = p.mm;
  const auxv = r.put(mm.auxv);
  const mmMap = (exeFd: number): bigint => putMmMap(r, mm, auxv, exeFd);
  // Everything in one stop: the calls name earlier results (argFrom).
  const calls: NamedCall[] = [];
  const ours = [
    ...(cwdFd < 0 ? [] : [{ what: `taking the working directory ${cwd}`, fd: cwdFd }]),
    ...(exeFd < 0 ? [] : [{ what: 'taking the executable', fd: exeFd }]),
  ];
  const taken = ours.length ? takeDescriptors(calls, ours) : [];
  const cwdAt = cwdFd < 0 ? -1 : taken[0];
  const exeAt = exeFd < 0 ? -1 : taken[taken.length - 1];
  const pre = calls.length;
  // The executable moved to descriptor EXE_FD, so that the PR_SET_MM_MAP
  // record, written ahead, can name it. The seed's 0 (appshot-init's
  // /dev/null) is surely open, so nothing this batch opens lands there,
  // and it is replaced anyway with the process's own descriptors
  // (restoreFds, after this).
  const EXE_FD = 0;
  const exeCalls: NamedCall[] =
    exeAt < 0
      ? [{ what: 'restoring the mm fields (PR_SET_MM_MAP)', nr: SYS.prctl, args: [PR_SET_MM, PR_SET_MM_MAP, mmMap(-1), 104, 0] }]
      : [
          { what: 'placing the executable', nr: SYS.dup3, args: [0, EXE_FD, O_CLOEXEC], argFrom: { call: exeAt, arg: 0 } },
          { what: 'closing the executable', nr: SYS.close, args: [0], argFrom: { call: exeAt, arg: 0 } },
          { what: 'restoring the mm fields (PR_SET_MM_MAP)', nr: SYS.prctl, args: [PR_SET_MM, PR_SET_MM_MAP, mmMap(EXE_FD), 104, 0] },
          { what: 'closing the executable', nr: SYS.close, args: [EXE_FD] },
        ];
  // `dirFd`: the working directory's descriptor in the process, or a link
  // to the call that took it.
  const tail = (dirFd: number | { call: number; arg: number }): NamedCall[] => [
    ...(cwdAt < 0
      ? [{ what: `changing directory to ${cwd}`, nr: SYS.chdir, args: [r.str(cwd)] }]
      : typeof dirFd === 'number'
        ? [
            { what: `changing directory to ${cwd}`, nr: SYS.fchdir, args: [dirFd] },
            { what: 'closing the working directory', nr: SYS.close, args: [dirFd] },
          ]
        : [
            { what: `changing directory to ${cwd}`, nr: SYS.fchdir, args: [0], argFrom: dirFd },
            { what: 'closing the working directory', nr: SYS.close, args: [0], argFrom: dirFd },
          ]),
    { what: 'setting umask', nr: SYS.umask, args: [p.umask] },
    ...more,
  ];
  const all = [...calls, ...exeCalls, ...tail({ call: cwdAt, arg: 0 })];
  const results = r.runCalls(all);
  const last = results.length - 1;
  const failed = results[last] < 0n && results[last] > -4096n;
  if (!failed && results.length === all.length) return results.slice(all.length - more.length);
  // The executable could not be placed, or PR_SET_MM_MAP refused it
  // (replacing the executable needs CAP_CHECKPOINT_RESTORE or
  // CAP_SYS_ADMIN): what the batch opened is closed, and everything else
  // restored without it. Any other failure is the restore's.
  const inExe = exeAt >= 0 && last >= pre && last < pre + exeCalls.length;
  if (!inExe) {
    if (failed) throw new SyscallError(all[last].what, Number(-results[last]));
    throw new Error(`a batch of system calls stopped after ${results.length} of ${all.length}`);
  }
  exeRefused(failed ? `${all[last].what}: ${errnoName(Number(-results[last]))}` : 'a batch of system calls stopped');
  const again = r.batch();
  const step = last - pre;
  if (step === 0) again.add('closing the executable', SYS.close, [results[exeAt]]);
  if (step >= 1) again.add('closing the executable', SYS.close, [EXE_FD]);
  again.add('restoring the mm fields (PR_SET_MM_MAP)', SYS.prctl, [PR_SET_MM, PR_SET_MM_MAP, mmMap(-1), 104, 0]);
  const rest = tail(cwdAt < 0 ? -1 : Number(results[cwdAt]));
  for (const c of rest) again.add(c.what, c.nr, c.args);
  const got = again.run();
  return got.slice(got.length - more.length);
}

const O_RDONLY = 0;

/** A descriptor of ours for the executable (-1: none), `shared` where it
 * is the restore's (a deleted executable's copy, closed at its end), not
 * the caller's to close. */
interface OpenedExecutable {
  fd: number;
  shared: boolean;
  /** A deleted one made again: its name, and why it is not the image's. */
  remade?: RemadeExecutable;
}

/**
 * The image's executable as the process reaches it and may execute it,
 * reopened for reading (PR_SET_MM_MAP's exe_fd goes through fdget, which
 * takes no O_PATH descriptor; the reopen walks no name), the caller's to
 * close; or, deleted since it ran, the copy made from its bytes
 * (deletedExecutable), the restore's. None (-1: the seed's is kept) for
 * one the restorer itself may not read, and for a deleted one whose bytes
 * the image does not hold (an older appshot's), which the restore says.
 * Refused by name where the process's identity cannot reach it.
 */
function openExecutable(h: RestoreContext, p: Process): OpenedExecutable {
  // Its bytes saved (exeFile), or shown deleted: unless the image records
  // a file still there under the whole name, suffix and all (a live file
  // named "... (deleted)", as dumpExecutable recorded it). Any such file
  // of the image, not this process's own: the image records which file
  // is the executable only for a deleted one (exe_file). A process whose
  // executable "x" was removed without its bytes saved (removed between
  // two reads of the dump) beside a live "x (deleted)" another process
  // holds is then given the file at that name, as a live executable is.
  // Tying it to the process needs an image field (the executable's file
  // index for every process, review r315): not made yet.
  const shownDeleted = p.exe.endsWith(DELETED) && !h.image.files.some((f) => !f.deleted && f.path === p.exe);
  const deleted = p.exeFile !== undefined || shownDeleted;
  const exe = deleted ? p.exe.slice(0, -DELETED.length) : p.exe;
  // A deleted one is made again from the bytes the image saved for this
  // very process (never the file now at its name, another program; nor
  // another process's version once at that name): once for every process
  // that ran it. An older image recorded none: the seed's is kept, and
  // the file now at the name never taken (another program).
  if (deleted) {
    if (p.exeFile === undefined) {
      h.notKept.push(`process ${p.vpid} (${p.comm}): its executable ${p.exe}, deleted or replaced since it ran, has no bytes in this image (an older appshot's): /proc/PID/exe names appshot's seed`);
      return { fd: -1, shared: false };
    }
    const remade = deletedExecutable(h, p.exeFile);
    return { fd: remade.fd, shared: true, remade };
  }
  let path: number;
  try {
    path = addon().openExecAs(exe, identitiesFor(h.image, p));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // Through a magic link (the engine's own /proc/self/exe): refused, not
    // passed over as a name that is missing.
    if (code === 'EACCES' || code === 'EPERM' || code === 'ENOSYS' || (e as { magicLink?: boolean }).magicLink) refusedAsProcess(e, `process ${p.vpid}: its executable ${exe}`, fsIdentity(p), 'reached and run');
    return { fd: -1, shared: false };
  }
  try {
    return { fd: openSync(`/proc/self/fd/${path}`, O_RDONLY | O_CLOEXEC), shared: false };
  } catch {
    return { fd: -1, shared: false };
  } finally {
    closeSync(path);
  }
}
