/**
 * An image's structure, checked before anything acts on it. Checksums and
 * signatures say who wrote an image, not that it makes sense: a bug, an old
 * writer, or a hostile one with a trusted key (or --trust-image) can hand
 * over a tree with cycles, overlapping mappings, indexes past the end of an
 * array or a million processes. Every rule here is one the restore, clone
 * and inspect code relies on; each violation is reported as
 * `corrupt image: <what>`.
 *
 * Two stages: `checkWireCounts` runs on image.pb's bytes before the
 * generated code (schema.ts) decodes them (a few bytes on the wire can stand for a large object: an
 * empty message is two bytes), `validateImage` on the decoded image.
 */
import { rawProblem } from '../resources/raw.js';
import { deviceFault } from '../resources/devices.js';
import { readFileSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';
import { totalmem } from 'node:os';
import { isDeepStrictEqual } from 'node:util';
import { AppshotError } from '../errors.js';
import { checkWaits } from '../resources/waits.js';
import { dnotifyRecordFault } from '../resources/fdowner.js';
import { checkPosixQueues } from '../resources/mqueue.js';
import { fanotifyRecordFault } from '../resources/fanotify.js';
import { checkIoUringMappings, ioUringRecordFault } from '../resources/iouring.js';
import { checkAioRings } from '../resources/aio.js';
import { checkTidMoves } from '../resources/mutexes.js';
import { checkGlibcTidWrites } from '../resources/threads.js';
import { checkCpuTimes } from '../resources/cputime.js';
import { deletedFileRecordFault } from '../resources/deleted.js';
import { mempolicyModeValid, mempolicyNodesFault } from '../resources/memory.js';
import { cpuAffinityFault, PERSONALITY_BITS } from '../resources/attributes.js';
import { posixTimerClockFault } from '../resources/timers.js';
import { TIMERFD_CLOCKS } from '../resources/timerfd.js';
import { netlinkProblem } from '../resources/netlink.js';
import { udpHeadersProblem } from '../resources/udp.js';
import { connectionAddressFault } from '../resources/tcp.js';
import { socketFileRecordFault } from '../resources/socketfile.js';
import { keyringFault, keyringTreeFault } from '../resources/keyrings.js';
import type { MessageSchema } from './schema.js';
import { type Creds, type Fd, FdKind, type Image, LockKind, type PageRef, type Process, type SocketOption, VmaKind } from './types.js';
import { runsCode, unsettable } from '../template/rules.js';
import { plainAbsolute } from '../resources/paths.js';
import { resolverPathsFault } from '../resources/procpaths.js';
import { ptysRecordFault } from '../resources/ptys.js';

/** linux/seccomp.h */
const SECCOMP_FILTER_FLAG_LOG = 2n;

/** The ceilings, as the README states them. */
export const LIMITS = {
  processes: 1024,
  threads: 4096,
  vmasPerProcess: 65536,
  fdsPerProcess: 65536,
  /** Every message in image.pb (processes, threads, VMAs, fds, verdicts,
   * ...): decoded, each costs a few hundred bytes and a microsecond or
   * more. 400,000 is a few seconds and a few hundred MiB at worst. */
  messages: 400_000,
  /** Every other value (numbers, strings, byte fields). Decoded, 16
   * million packed numbers took 1.2 s and 970 MB: half of that at most. */
  values: 8_000_000,
  /** Fixed by the architecture: struct user_regs_struct on x86-64. */
  regsBytes: 27 * 8,
  /** The largest XSAVE area x86-64 has (with AMX) is about 11 KiB. */
  xstateBytes: 64 * 1024,
  /** Queued siginfos (128 bytes each) per thread or process. */
  pendingSignals: 4096,
  /** Per process, and the highest id (the kernel's default max_user_watches
   * is far above, but a restore makes each one). */
  posixTimers: 65536,
  inotifyWatches: 65536,
  /** The image's highest watch numbers and timer ids added up: each is a
   * call or two at restore. */
  countedIds: 65536,
  /** File locks in the whole image: each is a call at restore. */
  fileLocks: 200_000,
  /** Datagrams queued on one socket, and their bytes (each is sent again
   * at restore): what the snapshot takes (resources/unixdgram.ts). */
  queuedDatagrams: 100_000,
  queuedDatagramBytes: 64 << 20,
  /** Options carried per socket (each is a call or two at restore; the
   * kernel has some 120 that a socket of one kind may carry), and the bytes
   * of a struct one (IPv6's sticky extension headers go up to 2048). */
  socketOptions: 160,
  socketOptionBytes: 2048,
  /** A UDP socket's multicast memberships, and the sources of one (each
   * membership is a join at restore; the kernel's own defaults are 20 and
   * 10 for IPv4, 64 for IPv6's sources). */
  multicastMemberships: 4096,
  multicastSources: 1024,
};
/** The largest file offset (off_t). */
const OFF_MAX = (1n << 63n) - 1n;

const PAGE = 4096n;
/** The largest value of a SysV semaphore (semop(2)). */
const SEMVMX = 32767;
/** The top of x86-64 user space (47-bit addresses, less the guard page). */
const USER_TOP = 0x7ffffffff000n;
const VSYSCALL = { start: 0xffffffffff600000n, end: 0xffffffffff601000n };

function corrupt(what: string): never {
  throw new AppshotError(`corrupt image: ${what}`);
}

// --- before decoding ---------------------------------------------------------

/** Walks the protobuf wire format of `bytes` as `type` and refuses it if it
 * would decode to more messages or values than LIMITS allow, or to more
 * processes or threads. Nothing is allocated but counters. */
export function checkWireCounts(type: MessageSchema, bytes: Buffer): void {
  const counts = { messages: 0, values: 0, threads: 0 };
  const varint = (pos: number, end: number): [number, number] => {
    let value = 0;
    for (let shift = 0; shift < 64; shift += 7) {
      if (pos >= end) corrupt('image.pb ends inside a number');
      const b = bytes[pos++];
      if (shift < 49) value += (b & 0x7f) * 2 ** shift;
      if (!(b & 0x80)) return [value, pos];
    }
    corrupt('image.pb holds a number longer than 10 bytes');
  };
  /** The repeated fields whose count per message the limits bound. */
  const perMessage: Record<string, [number, string]> = {
    processes: [LIMITS.processes, 'processes'],
    'processes.vmas': [LIMITS.vmasPerProcess, 'memory mappings in one process'],
    'processes.fds': [LIMITS.fdsPerProcess, 'descriptors in one process'],
  };
  const walk = (t: MessageSchema, start: number, end: number, path: string) => {
    const repeats = new Map<string, number>();
    let pos = start;
    while (pos < end) {
      let key: number;
      [key, pos] = varint(pos, end);
      const field = t.fieldsById[Math.floor(key / 8)];
      const wire = key & 7;
      let len = 0;
      if (wire === 0) [, pos] = varint(pos, end);
      else if (wire === 1) len = 8;
      else if (wire === 5) len = 4;
      else if (wire === 2) [len, pos] = varint(pos, end);
      else corrupt(`image.pb uses wire type ${wire}, which appshot never writes`);
      if (pos + len > end) corrupt('image.pb is cut short inside a field');
      const sub = field?.resolvedType;
      if (wire === 2 && sub) {
        const name = path ? `${path}.${field.name}` : field.name;
        if (++counts.messages > LIMITS.messages) corrupt(`image.pb holds more than ${LIMITS.messages} messages`);
        const n = (repeats.get(name) ?? 0) + 1;
        repeats.set(name, n);
        if (perMessage[name] && n > perMessage[name][0]) corrupt(`more than ${perMessage[name][0]} ${perMessage[name][1]}`);
        if (name === 'processes.threads' && ++counts.threads > LIMITS.threads) corrupt(`more than ${LIMITS.threads} threads`);
        walk(sub, pos, pos + len, name);
      } else if (wire === 2 && field?.repeated && field.type !== 'string' && field.type !== 'bytes') {
        // Packed numbers: one value per byte without the continuation bit.
        for (let i = pos; i < pos + len; i++) if (!(bytes[i] & 0x80)) counts.values++;
      } else {
        counts.values++;
      }
      if (counts.values > LIMITS.values) corrupt(`image.pb holds more than ${LIMITS.values} values`);
      pos += len;
    }
  };
  walk(type, 0, bytes.length, '');
}

// --- after decoding ----------------------------------------------------------

/** A kernel setting, or `fallback` where /proc does not say. */
function sysctl(path: string, field = 0, fallback = Number.MAX_SAFE_INTEGER): number {
  try {
    const v = Number(readFileSync(path, 'utf8').trim().split(/\s+/)[field]);
    return Number.isFinite(v) && v > 0 ? Math.min(v, Number.MAX_SAFE_INTEGER) : fallback;
  } catch {
    return fallback;
  }
}

/** This machine's SysV and descriptor limits: an image that exceeds them
 * could not have come from a machine like it, and its sizes are allocated
 * whole at restore. Read again once they are a second old, not for every
 * image: nine /proc reads (~0.3 ms) per restore of the resident engine,
 * for settings an administrator changes once in a long while. */
function machineLimits(): ReturnType<typeof readMachineLimits> {
  const now = performance.now();
  if (!limitsRead || now - limitsRead.at > 1000) limitsRead = { at: now, limits: readMachineLimits() };
  return limitsRead.limits;
}
let limitsRead: { at: number; limits: ReturnType<typeof readMachineLimits> } | undefined;

function readMachineLimits() {
  return {
    nrOpen: sysctl('/proc/sys/fs/nr_open', 0, 1 << 20),
    pipeMaxSize: sysctl('/proc/sys/fs/pipe-max-size', 0, 1 << 20),
    shmmax: Math.min(sysctl('/proc/sys/kernel/shmmax'), totalmem()),
    shmmni: sysctl('/proc/sys/kernel/shmmni', 0, 4096),
    semmsl: sysctl('/proc/sys/kernel/sem', 0, 32000),
    semmni: sysctl('/proc/sys/kernel/sem', 3, 32000),
    msgmnb: sysctl('/proc/sys/kernel/msgmnb', 0, 16384),
    msgmax: sysctl('/proc/sys/kernel/msgmax', 0, 8192),
    msgmni: sysctl('/proc/sys/kernel/msgmni', 0, 32000),
  };
}

/** pages.img as the page references of one image use it: its size, and
 * the byte range each reference's stored pages take in it, gathered while
 * they are checked one by one (pageSpansFault weighs them together). */
interface PageFile {
  size: bigint;
  spans: { from: bigint; to: bigint; what: string }[];
}

/** Page runs (first page, count) inside an object of `pages` pages, and the
 * data they stand for inside the page file, noted in `file.spans`. */
function checkPageRef(ref: PageRef | undefined, pages: bigint, file: PageFile, what: string): void {
  if (!ref) return;
  for (const [list, name] of [[ref.runs, 'runs'], [ref.fromParent, 'pages from the parent'], [ref.cowShared ?? [], 'pages shared with the parent process']] as const) {
    if (list.length % 2) corrupt(`${what}: its ${name} are not (page, count) pairs`);
    for (let i = 0; i < list.length; i += 2)
      if (list[i + 1] === 0 || BigInt(list[i]) + BigInt(list[i + 1]) > pages) corrupt(`${what}: pages ${list[i]}+${list[i + 1]} lie outside it`);
  }
  let stored = 0n;
  for (let i = 1; i < ref.runs.length; i += 2) stored += BigInt(ref.runs[i]);
  if (!stored) return;
  if (ref.offset % PAGE) corrupt(`${what}: its pages start at ${ref.offset}, not on a page boundary of pages.img`);
  if (ref.offset + stored * PAGE > file.size) corrupt(`${what}: its pages lie beyond the end of pages.img (${file.size} bytes)`);
  file.spans.push({ from: ref.offset, to: ref.offset + stored * PAGE, what });
}

/**
 * No two page references share bytes of pages.img: a snapshot writes each
 * stored page once (pages of the parent image and pages shared with the
 * parent process are other lists, with no bytes here), so what a restore
 * writes from pages.img is at most its size in all. Shared, one region
 * (a hole of a sparse file costs nothing on disk) could be the contents of
 * every segment, shared memory object and deleted file of the image: a
 * 216 KiB image made 4 GiB of SysV shared memory, written by the engine
 * (review r363 finding 9). Checked before anything is made.
 */
function pageSpansFault(file: PageFile): string | undefined {
  const spans = [...file.spans].sort((a, b) => (a.from < b.from ? -1 : a.from > b.from ? 1 : 0));
  for (let i = 1; i < spans.length; i++)
    if (spans[i].from < spans[i - 1].to)
      return `the pages of ${spans[i - 1].what} and of ${spans[i].what} overlap in pages.img (bytes ${spans[i].from}-${(spans[i].to < spans[i - 1].to ? spans[i].to : spans[i - 1].to) - 1n}): a snapshot stores each page once`;
  return undefined;
}

const inRange = (i: number, array: unknown[]) => Number.isInteger(i) && i >= 0 && i < array.length;
const hex = (n: bigint) => '0x' + n.toString(16);

function checkProcess(image: Image, p: Process, pageFile: PageFile, limits: ReturnType<typeof machineLimits>, vtids: Set<number>, shmVids: Set<number>, memoryOnly: boolean): void {
  if (!memoryOnly) checkProcessState(p, vtids);
  checkMemory(image, p, pageFile, memoryOnly ? undefined : shmVids);
  if (!memoryOnly) checkFds(image, p, limits);
  if (!memoryOnly) checkAioRings(p, corrupt);
  if (!memoryOnly) checkIoUringMappings(p, corrupt);
  if (!memoryOnly) checkTidMoves(p, corrupt);
  if (!memoryOnly) checkGlibcTidWrites(p, corrupt);
  if (p.cgroup && (!p.cgroup.startsWith('/') || p.cgroup.split('/').some((part) => part === '..' || part === '.') || p.cgroup.includes('\0')))
    corrupt(`process ${p.vpid}'s cgroup ${JSON.stringify(p.cgroup)} is not a plain absolute path`);
  if (!memoryOnly && p.ctty && !inRange(p.ctty - 1, image.ptys ?? [])) corrupt(`process ${p.vpid}'s controlling terminal is pty ${p.ctty - 1}, which the image does not have`);
  for (const [what, path, i] of [['working directory', p.cwd, p.cwdFile], ['root directory', p.root, p.rootFile]] as const) {
    if (memoryOnly || i === undefined) continue;
    if (!inRange(i, image.files)) corrupt(`process ${p.vpid}'s ${what} is file ${i}, which the image does not have`);
    // One removed is a deleted directory, whose mode and owner its
    // stand-in is given (deleted.ts removedDirectoryToEnter); one still there
    // is not deleted (fsident.ts reopenHeld enters that very one).
    const f = image.files[i];
    const removed = path?.endsWith(' (deleted)') === true;
    if (f.deleted !== removed || (f.mode & 0o170000) !== 0o040000)
      corrupt(`process ${p.vpid}'s ${what} ${JSON.stringify(path)} is file ${i}, ${f.deleted ? 'deleted' : 'not deleted'} and of mode 0${f.mode.toString(8)}, not a${removed ? ' removed' : 'n existing'} directory`);
  }
  if (!memoryOnly && p.exeFile !== undefined) checkExeFile(image, p);
  if (!memoryOnly) checkSchedulingAndClocks(p);
}

/** A replaced executable's file (Process.exe_file) is what the restore
 * makes again as that process's /proc/PID/exe: a deleted regular file
 * with its bytes, under the very name the process's exe shows, never
 * another file of the image (another process's version, a setuid one). */
function checkExeFile(image: Image, p: Process): void {
  const i = p.exeFile!;
  if (!inRange(i, image.files)) corrupt(`process ${p.vpid}'s executable is file ${i}, which the image does not have`);
  const f = image.files[i];
  if (!p.exe.endsWith(' (deleted)') || f.path !== p.exe.replace(/ \(deleted\)$/, ''))
    corrupt(`process ${p.vpid}'s executable ${JSON.stringify(p.exe)} is file ${i} (${JSON.stringify(f.path)}), not the deleted file of its name`);
  if (!f.deleted || !f.contents || (f.mode & 0o170000) !== 0o100000)
    corrupt(`process ${p.vpid}'s executable is file ${i}, which is not a deleted regular file with its contents`);
}

/** Each pseudoterminal's settings are whole structures, its queues bounded
 * by what a terminal holds. */
function checkPtys(image: Image): void {
  for (const [i, t] of (image.ptys ?? []).entries())
    if (t.termios.length !== 36 || t.winsize.length !== 8 || t.input.length > 65536 || t.output.length > 1 << 20)
      corrupt(`pty ${i} has ${t.termios.length} bytes of termios, ${t.winsize.length} of window size, ${t.input.length} of input and ${t.output.length} of output`);
}

/** A filter keeps one flag, SECCOMP_FILTER_FLAG_LOG (all that
 * PTRACE_SECCOMP_GET_METADATA reports): the others act when a filter is
 * installed (TSYNC on every thread, NEW_LISTENER's descriptor, SPEC_ALLOW's
 * lifted mitigation) and no snapshot records them. */
function checkSeccompFlags(creds: Creds, who: string): void {
  for (const f of creds.seccompFilters) if (f.flags & ~SECCOMP_FILTER_FLAG_LOG) corrupt(`${who}'s seccomp filter flags 0x${f.flags.toString(16)} are not ones a filter keeps (only SECCOMP_FILTER_FLAG_LOG)`);
  // The kernel runs at most 32768 instructions over a chain, 4 more a filter.
  if (!(Number.isInteger(creds.seccompContext ?? 0) && (creds.seccompContext ?? 0) >= 0 && (creds.seccompContext ?? 0) <= 8192)) corrupt(`${who} counts ${creds.seccompContext} seccomp filters of appshot's context`);
}

/** Credentials whole: the four uids and gids (real, effective, saved,
 * filesystem) that every use reads, a group list the kernel would take
 * (NGROUPS_MAX), and seccomp as checkSeccompFlags says. A thread's too:
 * a root restore takes each thread's identity for its path operations
 * (resources/fsident.ts), and the addon reads uid[3] and gid[3]. */
function checkCreds(creds: Creds, who: string): void {
  if (creds.uid.length !== 4 || creds.gid.length !== 4) corrupt(`${who}'s credentials hold ${creds.uid.length} uids and ${creds.gid.length} gids, not 4 each`);
  if (creds.groups.length > NGROUPS_MAX) corrupt(`${who} is in ${creds.groups.length} groups (at most ${NGROUPS_MAX})`);
  // Modes 0 none, 1 strict, 2 filter; the securebits the kernel defines
  // (their locks included) fit in 12 bits.
  if (![0, 1, 2].includes(creds.seccomp)) corrupt(`${who} has seccomp mode ${creds.seccomp}`);
  if (!(Number.isInteger(creds.securebits) && creds.securebits >= 0 && creds.securebits <= 0xfff)) corrupt(`${who} has securebits ${creds.securebits}`);
  checkSeccompFlags(creds, who);
}

/** The kernel's bound on supplementary groups (setgroups: EINVAL beyond). */
const NGROUPS_MAX = 65536;

/** What makes a process run: its ids, credentials, signals and threads. */
function checkProcessState(p: Process, vtids: Set<number>): void {
  const who = `process ${p.vpid}`;
  // 0: outside the application (the terminal's session, for one run in
  // the foreground).
  if (!(p.vpgid >= 0) || !(p.vsid >= 0)) corrupt(`${who} has process group ${p.vpgid} and session ${p.vsid}; both must be 0 or above`);
  if (!p.creds || !p.mm) corrupt(`${who} has no ${p.creds ? 'memory layout' : 'credentials'}`);
  checkCreds(p.creds, who);
  if (p.sharedPending.length % 128 || p.sharedPending.length / 128 > LIMITS.pendingSignals) corrupt(`${who}'s pending signals are not whole siginfos, or too many`);
  // Never SIGKILL or SIGSTOP (sigaction refuses them), each signal once.
  for (const s of p.sigactions) if (!(s.signal >= 1 && s.signal <= 64) || s.signal === 9 || s.signal === 19) corrupt(`${who} has a handler for signal ${s.signal}`);
  if (new Set(p.sigactions.map((s) => s.signal)).size !== p.sigactions.length) corrupt(`${who} has two handlers for one signal`);
  for (const t of p.itimers) if (!(t.which >= 0 && t.which <= 2)) corrupt(`${who} has interval timer ${t.which}`);
  for (const r of p.rlimits) if (!(r.resource >= 0 && r.resource < 16)) corrupt(`${who} has resource limit ${r.resource}`);
  if (p.stopSignal && !(p.stopSignal >= 1 && p.stopSignal <= 64)) corrupt(`${who} was stopped by signal ${p.stopSignal}`);
  // personality(2) sets whatever it is given: only what the kernel
  // defines is taken from an image (a snapshot refuses other bits, but
  // one before format 5 took a process's as they were: not corrupt, only
  // what this appshot will not set).
  const personalityFault = (v: number) => !(Number.isInteger(v) && v >= 0 && (v & ~PERSONALITY_BITS) === 0);
  if (!(Number.isInteger(p.personality) && p.personality >= 0 && p.personality <= 0xffffffff)) corrupt(`${who} has personality ${p.personality}`);
  const undefinedBits = p.personality & ~PERSONALITY_BITS;
  if (undefinedBits)
    throw new AppshotError(`${who} has personality 0x${p.personality.toString(16)}, whose bits 0x${(undefinedBits >>> 0).toString(16)} no kernel defines, which this appshot cannot set (an older appshot's snapshot took them as they were): cannot be restored`);
  const timers = p.posixTimers ?? [];
  // Timer ids are made again in order (PR_TIMER_CREATE_RESTORE_IDS).
  if (timers.length > LIMITS.posixTimers || timers.some((t) => !(t.id >= 0 && t.id < LIMITS.posixTimers)))
    corrupt(`${who} has ${timers.length} POSIX timers or a timer id above ${LIMITS.posixTimers}`);
  if (new Set(timers.map((t) => t.id)).size !== timers.length) corrupt(`${who} has a POSIX timer id twice`);
  for (const t of timers) if (!(t.signal >= 0 && t.signal <= 64)) corrupt(`${who}'s timer ${t.id} sends signal ${t.signal}`);
  // Its owners and links against the rights of the process that makes it
  // at restore: keyringTreeFault, below.
  const ringFault = p.sessionKeyring && keyringFault(p.sessionKeyring);
  if (ringFault) corrupt(`${who} has ${ringFault}`);
  if ((p.zombies?.length ?? 0) > LIMITS.processes) corrupt(`${who} has ${p.zombies!.length} zombies (at most ${LIMITS.processes})`);

  if (!p.threads.length) corrupt(`${who} has no threads`);
  for (const t of p.threads) {
    if (!(t.vtid > 0)) corrupt(`${who} has a thread with virtual TID ${t.vtid}`);
    if (vtids.has(t.vtid)) corrupt(`virtual TID ${t.vtid} appears twice`);
    vtids.add(t.vtid);
    if (t.regs.length !== LIMITS.regsBytes) corrupt(`thread ${t.vtid}'s registers are ${t.regs.length} bytes, not ${LIMITS.regsBytes}`);
    if (t.xstate.length > LIMITS.xstateBytes) corrupt(`thread ${t.vtid}'s extended state is ${t.xstate.length} bytes`);
    if (t.pending.length % 128 || t.pending.length / 128 > LIMITS.pendingSignals) corrupt(`thread ${t.vtid}'s pending signals are not whole siginfos, or too many`);
    // A thread's own (its process's main thread's are the process's).
    if (t.creds) checkCreds(t.creds, `thread ${t.vtid}`);
    // PR_MCE_KILL_SET takes 0 (late) or 1 (early); the default (2) is
    // recorded as nothing (attributes.ts). Anything else failed the
    // restore late, at the thread's own prctl.
    const mce = t.attributes?.mceKill;
    if (mce !== undefined && mce !== 0 && mce !== 1) corrupt(`thread ${t.vtid} has machine-check kill policy ${mce} (0 late or 1 early)`);
    const personality = t.attributes?.personality;
    if (personality !== undefined && personalityFault(personality)) corrupt(`thread ${t.vtid} has personality 0x${personality.toString(16)}, with bits no kernel defines`);
    // The main thread's is its process's (a snapshot reads the process's
    // from it, and records none of its own): one of its own would be
    // ignored at restore (ownPersonality is the other threads').
    if (t === p.threads[0] && personality !== undefined && personality !== p.personality)
      corrupt(`thread ${t.vtid}, the main thread of ${who}, has personality 0x${personality.toString(16)}, not its process's 0x${p.personality.toString(16)}`);
    // Whole words, no more nodes than a snapshot asks of the kernel
    // (attributes.ts): the restore copies them into its scratch memory.
    const nodes = t.attributes?.mempolicy?.nodes;
    const nodesFault = nodes && mempolicyNodesFault(nodes);
    if (nodesFault) corrupt(`thread ${t.vtid}'s NUMA node mask is ${nodesFault}`);
  }
  // A nice value (setpriority(2)): the kernel would refuse another, late.
  const autogroup = p.attributes?.autogroupNice;
  if (autogroup !== undefined && (!Number.isInteger(autogroup) || autogroup < -20 || autogroup > 19)) corrupt(`${who} has autogroup nice ${autogroup} (-20 to 19)`);
  // The restore runs the first as the main thread (a snapshot lists it
  // first, and refuses a process whose main thread has exited).
  if (p.threads[0].vtid !== p.vpid) corrupt(`${who}'s first thread is ${p.threads[0].vtid}, not its main thread ${p.vpid}`);

}

/** `shmVids` undefined: an image read for its pages only, whose mappings'
 * objects (files, shared memory, SysV segments) are not looked up. */
function checkMemory(image: Image, p: Process, pageFile: PageFile, shmVids: Set<number> | undefined): void {
  const who = `process ${p.vpid}`;
  if (p.vmas.length > LIMITS.vmasPerProcess) corrupt(`${who} has ${p.vmas.length} memory mappings (at most ${LIMITS.vmasPerProcess})`);
  const vmas = [...p.vmas].sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  let lastEnd = 0n;
  for (const v of vmas) {
    const where = `${who}'s mapping ${hex(v.start)}-${hex(v.end)}`;
    if (v.start % PAGE || v.end % PAGE) corrupt(`${where} is not page-aligned`);
    if (v.start >= v.end) corrupt(`${where} ends before it starts`);
    const vsyscall = v.kind === VmaKind.VSYSCALL && v.start === VSYSCALL.start && v.end === VSYSCALL.end;
    if (v.end > USER_TOP && !vsyscall) corrupt(`${where} lies outside user space`);
    if (v.start < lastEnd) corrupt(`${where} overlaps the one before it`);
    lastEnd = v.end;
    if (!(v.kind >= VmaKind.ANON && v.kind <= VmaKind.VSYSCALL)) corrupt(`${where} is of unknown kind ${v.kind}`);
    if (v.pgoff % PAGE) corrupt(`${where} has an offset of ${v.pgoff}, not page-aligned`);
    checkPageRef(v.pages, (v.end - v.start) / PAGE, pageFile, where);
    // mbind's policy (memory.ts): a mode mbind takes, whole words of at
    // most as many nodes as a snapshot asks (the restore copies the mask
    // into its scratch memory).
    const policy = v.mempolicy;
    if (policy && !mempolicyModeValid(policy.mode)) corrupt(`${where} has NUMA policy mode 0x${policy.mode.toString(16)}, which mbind does not take`);
    const nodesFault = policy && mempolicyNodesFault(policy.nodes);
    if (nodesFault) corrupt(`${where}'s NUMA node mask is ${nodesFault}`);
    if (!shmVids) continue;
    if ((v.kind === VmaKind.FILE_PRIVATE || v.kind === VmaKind.FILE_SHARED) && !inRange(v.file, image.files)) corrupt(`${where} maps file ${v.file}, which the image does not have`);
    if (v.file !== -1 && !inRange(v.file, image.files)) corrupt(`${where} names file ${v.file}, which the image does not have`);
    if (v.kind === VmaKind.SHARED_ANON && !inRange(v.sharedMemory, image.sharedMemory)) corrupt(`${where} maps shared memory ${v.sharedMemory}, which the image does not have`);
    if (v.sharedMemory !== -1 && !inRange(v.sharedMemory, image.sharedMemory)) corrupt(`${where} names shared memory ${v.sharedMemory}, which the image does not have`);
    if (v.kind === VmaKind.SYSV_SHM && !shmVids.has(v.shmVid)) corrupt(`${where} attaches SysV segment ${v.shmVid}, which the image does not have`);
    // Pages shared copy-on-write are the parent process's: it must have the same mapping.
    if (v.pages?.cowShared?.length) {
      const parent = image.processes.find((q) => q.vpid === p.vppid);
      if (v.kind !== VmaKind.ANON || !parent?.vmas.some((u) => u.kind === VmaKind.ANON && u.start === v.start && u.end === v.end))
        corrupt(`${where} shares pages with its parent process, which has no such mapping`);
    }
  }
}

function checkFds(image: Image, p: Process, limits: ReturnType<typeof machineLimits>): void {
  const who = `process ${p.vpid}`;
  if (p.fds.length > LIMITS.fdsPerProcess) corrupt(`${who} has ${p.fds.length} descriptors (at most ${LIMITS.fdsPerProcess})`);
  const fdNumbers = new Set<number>();
  for (const fd of p.fds) {
    if (!(fd.fd >= 0 && fd.fd < limits.nrOpen)) corrupt(`${who} has descriptor ${fd.fd}, outside 0..${limits.nrOpen - 1}`);
    if (fdNumbers.has(fd.fd)) corrupt(`${who} has descriptor ${fd.fd} twice`);
    fdNumbers.add(fd.fd);
  }
  for (const fd of p.fds) {
    const where = `${who}'s fd ${fd.fd}`;
    if (!Object.values(FdKind).includes(fd.kind as never)) corrupt(`${where} is of unknown kind ${fd.kind}`);
    if (fd.kind === FdKind.FILE && !inRange(fd.file, image.files)) corrupt(`${where} is file ${fd.file}, which the image does not have`);
    if ((fd.kind === FdKind.PIPE || fd.kind === FdKind.FIFO) && !inRange(fd.pipe, image.pipes)) corrupt(`${where} is pipe ${fd.pipe}, which the image does not have`);
    const device = fd.kind === FdKind.DEVICE ? deviceFault(fd) : undefined;
    if (device) corrupt(`${where} ${device}`);
    const socketKinds: number[] = [FdKind.UNIX_SOCKET, FdKind.TCP_LISTEN, FdKind.UDP, FdKind.UNIX_DGRAM, FdKind.UNCONNECTED_STREAM, FdKind.NETLINK, FdKind.RAW];
    if (socketKinds.includes(fd.kind) && !fd.socket) corrupt(`${where} is a socket with no socket state`);
    // A netlink socket's protocol, port id, groups and options, each in
    // range (resources/netlink.ts); its state on no other kind.
    if (fd.kind !== FdKind.RAW && (fd.socket?.protocol || fd.socket?.rawFilter?.length)) corrupt(`${where} carries a raw socket's protocol or filter but is not a raw socket`);
    const raw = fd.kind === FdKind.RAW && fd.socket ? rawProblem(fd.socket) : undefined;
    if (raw) corrupt(`${where} ${raw}`);
    const owner = fd.inodeOwner;
    if (owner && !(fd.kind === FdKind.PIPE || fd.kind === FdKind.TCP_ESTABLISHED || socketKinds.includes(fd.kind))) corrupt(`${where} carries an inode owner but is neither a pipe nor a socket`);
    if (owner && fd.kind === FdKind.PIPE && image.pipes[fd.pipe]?.fifoPath) corrupt(`${where} carries an inode owner but is a named FIFO's, a file of the host`);
    if (owner && (owner.uid === 0xffffffff || owner.gid === 0xffffffff)) corrupt(`${where} is owned by uid ${owner.uid} gid ${owner.gid}: -1 is no one`);
    const peerCred = fd.socket?.peerCred;
    if (peerCred && fd.kind !== FdKind.UNIX_SOCKET && fd.kind !== FdKind.UNIX_DGRAM) corrupt(`${where} carries a unix connection's peer credentials but is not a unix socket`);
    // (uid_t)-1 is no one's: setresuid and setresgid take it as "unchanged".
    if (peerCred && (peerCred.groups.length > NGROUPS_MAX || [peerCred.uid, peerCred.gid, ...peerCred.groups].some((id) => id === 0xffffffff)))
      corrupt(`${where}'s peer credentials hold ${peerCred.groups.length} groups (at most ${NGROUPS_MAX}) or an id of -1`);
    if ((fd.kind === FdKind.NETLINK) !== !!fd.socket?.netlink) corrupt(`${where} has netlink state but is not a netlink socket, or is one without it`);
    const netlink = fd.kind === FdKind.NETLINK && fd.socket ? netlinkProblem(fd.socket) : undefined;
    if (netlink) corrupt(`${where} is a netlink socket ${netlink}`);
    // What a queued datagram's IP header said (resources/udp.ts): the
    // restore sends it to that address, with that TOS and TTL.
    if (fd.kind !== FdKind.UDP && fd.socket?.datagrams?.some((d) => d.to || d.tos !== undefined || d.ttl !== undefined)) corrupt(`${where} has a datagram with IP header fields but is not a UDP socket`);
    const udpHeaders = fd.kind === FdKind.UDP && fd.socket ? udpHeadersProblem(fd.socket) : undefined;
    if (udpHeaders) corrupt(`${where} ${udpHeaders}`);
    if (fd.socket) checkDatagrams(fd.socket, where);
    // Who sent a queued unix message (SCM_CREDENTIALS): a process of the
    // image, which the restore names as it is then; ids it may give.
    let vpids: Set<number> | undefined;
    for (const d of fd.socket?.datagrams ?? []) {
      const fields = [d.credPid, d.credUid, d.credGid].filter((v) => v !== undefined).length;
      if (!fields) continue;
      if (fields !== 3 || (fd.kind !== FdKind.UNIX_DGRAM && fd.kind !== FdKind.UNIX_SOCKET)) corrupt(`${where} has a message with part of its sender's credentials, or credentials on a socket not a unix one`);
      vpids ??= new Set(image.processes.map((q) => q.vpid));
      if (!vpids.has(d.credPid!)) corrupt(`${where} has a message sent by process ${d.credPid}, which the image does not have`);
      if (d.credUid === 0xffffffff || d.credGid === 0xffffffff) corrupt(`${where} has a message sent by uid ${d.credUid} gid ${d.credGid}: -1 is no one`);
    }
    if (fd.tcp) checkOptions(fd.tcp.socketOptions ?? [], where);
    if (fd.kind === FdKind.TCP_ESTABLISHED && !fd.tcp) corrupt(`${where} is a TCP connection with no connection state`);
    if (fd.tcp && (fd.tcp.localPort > 65535 || fd.tcp.peerPort > 65535 || fd.tcp.unsent > fd.tcp.sendQueue.length))
      corrupt(`${where} is a TCP connection with port ${fd.tcp.localPort} or ${fd.tcp.peerPort}, or more unsent bytes than queued`);
    const tcpAddresses = fd.tcp ? connectionAddressFault(fd.tcp) : undefined;
    if (tcpAddresses) corrupt(`${where} ${tcpAddresses}`);
    if (fd.socket && !(fd.socket.port >= 0 && fd.socket.port <= 65535)) corrupt(`${where} has port ${fd.socket.port}`);
    // Bound as recorded: an address that is not one of its family would
    // bind the wildcard (every interface) or, as IPv6, dual-stack.
    if (fd.kind === FdKind.TCP_LISTEN && fd.socket && !((fd.socket.family === 2 && isIPv4(fd.socket.address)) || (fd.socket.family === 10 && isIPv6(fd.socket.address) && !fd.socket.address.includes('%'))))
      corrupt(`${where} is a TCP listener of family ${fd.socket.family} at '${String(fd.socket.address).slice(0, 64)}', not an IPv4 (2) or IPv6 (10) address of its family`);
    const socketFile = socketFileRecordFault(fd);
    if (socketFile) corrupt(`${where} ${socketFile}`);
    // Only a connected unix stream or seqpacket socket is held by a keeper
    // as a socket record (sockets.ts checkUnixPeers): the keeper's TCP
    // connections and listeners are weighed as TCP records (review r369).
    if (fd.socket?.kept && (fd.kind !== FdKind.UNIX_SOCKET || fd.socket.family !== 1 || (fd.socket.type !== 1 && fd.socket.type !== 5) || fd.socket.listening))
      corrupt(`${where} is a socket held by appshot-keeper that is not a connected unix stream or seqpacket socket`);
    if (fd.socket?.inherited && (fd.kind !== FdKind.TCP_LISTEN || !INHERITED_KEY.test(fd.socket.inherited)))
      corrupt(`${where} is an inherited socket that is not a TCP listener, or whose key is not 1-64 of [A-Za-z0-9:._-]`);
    for (const t of fd.epoll) {
      const held = t.heldAt ? t.heldAt - 1 : t.fd;
      if (!fdNumbers.has(held) || !(t.fd >= 0 && t.fd < 1 << 20)) corrupt(`${where} watches fd ${held} (registered as ${t.fd}), which ${who} does not have`);
      // epoll_ctl refuses an epoll set watching itself (EINVAL).
      if (held === fd.fd) corrupt(`${where} is an epoll set watching itself`);
    }
    // EPIOCSPARAMS takes busy_poll_usecs up to S32_MAX and a u16 budget
    // (a larger one would be cut to another value); only an epoll set has them.
    const bp = fd.epollParams;
    if (bp && (fd.kind !== FdKind.EPOLL || !(Number.isInteger(bp.busyPollUsecs) && bp.busyPollUsecs >= 0 && bp.busyPollUsecs <= 0x7fffffff) || !(Number.isInteger(bp.busyPollBudget) && bp.busyPollBudget >= 0 && bp.busyPollBudget <= 0xffff) || typeof bp.preferBusyPoll !== 'boolean'))
      corrupt(`${where} has busy-poll parameters ${bp.busyPollUsecs}/${bp.busyPollBudget}/${bp.preferBusyPoll}, not those of an epoll set (usecs at most ${0x7fffffff}, budget at most ${0xffff})`);
    // A target is a file and the number it was registered under: both
    // twice is EEXIST. (One number may name two files: registered, closed,
    // reused and registered again; each is held elsewhere then.)
    if (new Set(fd.epoll.map((t) => `${t.fd}:${t.heldAt ? t.heldAt - 1 : t.fd}`)).size !== fd.epoll.length) corrupt(`${where} watches one registered fd twice`);
    // A file's position is an off_t; an eventfd's count stops one short
    // of 2^64 (a write of more is EINVAL).
    if (fd.pos > OFF_MAX) corrupt(`${where} is at position ${fd.pos}`);
    if (fd.kind === FdKind.EVENTFD && fd.eventfdCount > 0xfffffffffffffffen) corrupt(`${where} is an eventfd counting ${fd.eventfdCount}`);
    const watches = fd.inotifyWatches ?? [];
    // Watch numbers are made again in order, gaps filled: a huge one would
    // have the restore add and remove that many watches.
    if (watches.length > LIMITS.inotifyWatches || watches.some((w) => !(w.wd >= 1 && w.wd <= LIMITS.inotifyWatches)))
      corrupt(`${where} has ${watches.length} inotify watches or a watch number above ${LIMITS.inotifyWatches}`);
    if (new Set(watches.map((w) => w.wd)).size !== watches.length) corrupt(`${where} has an inotify watch number twice`);
    if (fd.inotifyLastWd !== undefined && !(Number.isInteger(fd.inotifyLastWd) && fd.inotifyLastWd >= 0 && fd.inotifyLastWd <= LIMITS.inotifyWatches))
      corrupt(`${where} has ${fd.inotifyLastWd} as its last inotify watch number (at most ${LIMITS.inotifyWatches})`);
    if (fd.timerfd && !(fd.timerfd.clockid >= 0 && fd.timerfd.clockid <= 11)) corrupt(`${where} is a timerfd on clock ${fd.timerfd.clockid}`);
    if (fd.kind === FdKind.PTY && !(fd.pty && inRange(fd.pty.pair, image.ptys ?? []))) corrupt(`${where} is an end of pty ${fd.pty?.pair}, which the image does not have`);
    const fanotify = fanotifyRecordFault(fd);
    if (fanotify) corrupt(`${where} ${fanotify}`);
    const ioUring = ioUringRecordFault(fd);
    if (ioUring) corrupt(`${where} ${ioUring}`);
    const dnotify = dnotifyRecordFault(image, fd);
    if (dnotify) corrupt(`${where} ${dnotify}`);
    checkLocks(fd, where);
  }
}

/** Descriptors of one socket (one inode: duplicated, inherited, passed)
 * carry one record of it, of one kind: the restore makes each socket
 * once, from the descriptor it reaches first, and the privilege rule
 * weighs one record for all its holders (sockets.ts
 * checkSocketPrivileges). Records that differ would have the rule weigh
 * one (a UDP socket on port 5001) and the restore make another (on 53). */
function checkSharedSockets(image: Image): void {
  const first = new Map<string, { where: string; fd: Fd; record: unknown }>();
  for (const p of image.processes)
    for (const fd of p.fds)
      for (const [name, record] of [['socket', fd.socket], ['connection', fd.tcp]] as const) {
        if (!record) continue;
        const key = `${name} ${record.ino}`;
        // A socket is either kind of record, never both: a keeper holds
        // each by its inode (review r369).
        const other = first.get(`${name === 'socket' ? 'connection' : 'socket'} ${record.ino}`);
        if (other) corrupt(`process ${p.vpid}'s fd ${fd.fd} and ${other.where} are one socket (inode ${record.ino}) but one records it as a socket and the other as a TCP connection`);
        const seen = first.get(key);
        if (!seen) first.set(key, { where: `process ${p.vpid}'s fd ${fd.fd}`, fd, record });
        else if (seen.fd.kind !== fd.kind || !isDeepStrictEqual(seen.record, record))
          corrupt(`process ${p.vpid}'s fd ${fd.fd} and ${seen.where} are one ${name} (inode ${record.ino}) but their records of it differ`);
      }
}

/** What an inherited socket's key may be (serve's are "serve:PORT"). */
export const INHERITED_KEY = /^[A-Za-z0-9:._-]{1,64}$/;

/** A socket's queued datagrams and options: bounded, each datagram in
 * range, its shutdown state a pair of bits. */
function checkDatagrams(s: NonNullable<Fd['socket']>, where: string): void {
  const datagrams = s.datagrams ?? [];
  const bytes = datagrams.reduce((n, d) => n + d.data.length, 0);
  if (datagrams.length > LIMITS.queuedDatagrams || bytes > LIMITS.queuedDatagramBytes)
    corrupt(`${where} has ${datagrams.length} datagrams (${bytes} bytes) queued (at most ${LIMITS.queuedDatagrams}, ${LIMITS.queuedDatagramBytes} bytes)`);
  checkOptions(s.options ?? [], where);
  const groups = s.memberships ?? [];
  if (groups.length > LIMITS.multicastMemberships || groups.some((m) => m.sources.length > LIMITS.multicastSources))
    corrupt(`${where} has ${groups.length} multicast memberships, or one with more than ${LIMITS.multicastSources} sources (at most ${LIMITS.multicastMemberships})`);
  if (!((s.shutdown ?? 0) >= 0 && (s.shutdown ?? 0) <= 3)) corrupt(`${where} has shutdown state ${s.shutdown}`);
  if (!((s.peerPort ?? 0) >= 0 && (s.peerPort ?? 0) <= 65535) || datagrams.some((d) => !(d.fromPort >= 0 && d.fromPort <= 65535)))
    corrupt(`${where} names a port above 65535`);
}

/** A socket's options: bounded in number and size (what each may be is
 * its kind's to check, resources/sockopts.ts). */
function checkOptions(options: SocketOption[], where: string): void {
  if (options.length > LIMITS.socketOptions) corrupt(`${where} carries ${options.length} socket options (at most ${LIMITS.socketOptions})`);
  if (options.some((o) => (o.raw?.length ?? 0) > LIMITS.socketOptionBytes || (o.device?.length ?? 0) > 15))
    corrupt(`${where} carries a socket option of more than ${LIMITS.socketOptionBytes} bytes, or an interface name longer than 15`);
}

/** A descriptor's file locks: of a kind the restore takes, on a file or a
 * device, with a range that is one. */
function checkLocks(fd: Fd, where: string): void {
  const locks = fd.locks ?? [];
  if (!locks.length) return;
  if (locks.length > LIMITS.fileLocks) corrupt(`${where} holds ${locks.length} file locks (at most ${LIMITS.fileLocks})`);
  if (fd.kind !== FdKind.FILE && fd.kind !== FdKind.DEVICE) corrupt(`${where} holds a file lock but is not a file`);
  for (const l of locks) {
    if (!Object.values(LockKind).includes(l.kind as never)) corrupt(`${where} holds a file lock of unknown kind ${l.kind}`);
    const ranged = l.kind === LockKind.POSIX || l.kind === LockKind.OFD;
    // fcntl takes a write lock on a descriptor open for writing only, a
    // read lock on one open for reading (EBADF).
    const access = fd.flags & 3;
    if (ranged && (l.write ? access === 0 : access === 1)) corrupt(`${where} holds a ${l.write ? 'write' : 'read'} lock but is open ${access === 0 ? 'read-only' : 'write-only'}`);
    const ok = ranged ? l.start >= 0n && l.start <= OFF_MAX && (l.toEof ? l.end === 0n : l.end >= l.start && l.end <= OFF_MAX) : l.start === 0n && l.end === 0n && !l.toEof;
    if (!ok) corrupt(`${where} holds a file lock on bytes ${l.start}-${l.toEof ? 'EOF' : l.end}`);
  }
}

/** Paths, names and arguments become C strings: a NUL would cut one short
 * (so that what is checked is not what is used), and Node refuses them. */
function checkStrings(image: Image): void {
  const visit = (value: unknown, where: string): void => {
    if (typeof value === 'string') {
      if (value.includes('\0')) corrupt(`${where} holds a NUL character`);
    } else if (Array.isArray(value)) {
      for (const v of value) visit(v, where);
    } else if (value && typeof value === 'object' && !Buffer.isBuffer(value)) {
      for (const [k, v] of Object.entries(value)) visit(v, k);
    }
  };
  visit(image, 'image');
}

/** Paths the restore resolves on the restoring node, as the kernel gave
 * them (d_path): absolute, with no "." or ".." in them. One with ".." could
 * lead a clone's private copy (joined under its private root) or a file
 * made beside another out of where it belongs. */
function checkPaths(image: Image): void {
  const check = (path: string | undefined, where: string) => {
    if (path?.startsWith('/') && path.split('/').some((part) => part === '.' || part === '..')) corrupt(`${where} names ${JSON.stringify(path)}, which is not a plain absolute path`);
  };
  // Names that are only ever absolute: a relative one would be resolved
  // against the restorer's working directory (the engine's), not the
  // application's (found by fuzzing).
  const absolute = (path: string | undefined, where: string) => {
    if (path && !path.startsWith('/')) corrupt(`${where} names ${JSON.stringify(path)}, which is not an absolute path`);
    check(path, where);
  };
  // Files and executables are named as /proc's links give them: from /.
  for (const [i, f] of image.files.entries()) absolute(f.path, `file ${i}`);
  for (const [i, pipe] of image.pipes.entries()) absolute(pipe.fifoPath, `pipe ${i}`);
  for (const p of image.processes) {
    const who = `process ${p.vpid}`;
    absolute(p.cwd, `${who}'s working directory`);
    if (p.root !== undefined && p.root !== '' && !p.root.startsWith('/')) corrupt(`${who}'s root directory ${JSON.stringify(p.root)} is not an absolute path`);
    check(p.root, `${who}'s root directory`);
    absolute(p.exe, `${who}'s executable`);
    for (const v of p.vmas) (v.kind === VmaKind.FILE_PRIVATE || v.kind === VmaKind.FILE_SHARED ? absolute : check)(v.path, `${who}'s mapping at 0x${v.start.toString(16)}`);
    for (const fd of p.fds) {
      const where = `${who} fd ${fd.fd}`;
      (fd.kind === FdKind.FILE ? absolute : check)(fd.path, where);
      check(fd.socket?.address, where);
      check(fd.socket?.file?.base, `${where}'s socket directory`);
      check(fd.socket?.peerAddress, where);
      for (const d of fd.socket?.datagrams ?? []) check(d.from, `${where}'s queued datagram`);
      for (const w of fd.inotifyWatches ?? []) absolute(w.path, `${where}'s inotify watch`);
      for (const m of fd.fanotify?.marks ?? []) check(m.path, `${where}'s fanotify mark`);
    }
  }
  // A clone's redirections: a path is taken back through them and joined
  // under the new clone's private copies, which a ".." would leave
  // (fuzz33 H3: root made a copy anywhere). Both sides are plain absolute
  // paths as the rules made them.
  for (const r of image.instance?.redirs ?? []) {
    for (const [side, path] of [['from', r.from], ['to', r.to]] as const)
      if (!plainAbsolute(path))
        corrupt(`a clone's REDIR ${r.kind === 'cow' ? 'COW' : 'PATH'} ${side} ${JSON.stringify(path)} is not a plain absolute path`);
  }
  for (const e of image.instance?.env ?? []) {
    const name = e.slice(0, e.indexOf('='));
    if (unsettable(name)) corrupt(`a clone's environment sets ${JSON.stringify(name)}, which is appshot's own`);
    if (runsCode(name)) corrupt(`a clone's environment sets ${JSON.stringify(name)}, which makes the dynamic loader or a shell run code`);
  }
}


/** Pseudoterminals bounded in number, each one the application holds
 * (ptys.ts ptysRecordFault). */
function checkPtyReferences(image: Image): void {
  const fault = ptysRecordFault(image);
  if (fault) corrupt(fault);
}

/** No name the restore resolves may lead to the engine's own /proc
 * directory or descriptors, or to a process outside the application
 * (procpaths.ts resolverPathsFault). */
function checkResolverPaths(image: Image): void {
  const fault = resolverPathsFault(image);
  if (fault) corrupt(fault);
}

/** Checks everything restore, clone and inspect take for granted.
 * `pagesFileSize`: the size of pages.img, which every page run must lie in,
 * no two of them sharing a byte of it.
 * `memoryOnly`: the image is read as the parent of another, for its pages
 * only (a --pre-copy base holds nothing else): its processes' memory is
 * checked, not what would make them run. */

/** Scheduling and clocks as the kernel takes them, before anything is
 * made (the privilege rule for them is restore/driver.ts checkPrivileges'):
 * each thread's CPU mask bounded and naming a CPU, its policy one the
 * kernel has, a real-time priority 1 to 99 (0 otherwise), nice -20 to 19,
 * an I/O priority of a known class; each timerfd's and POSIX timer's
 * clock one the kernel makes timers on. Any other failed the restore
 * late, after the processes were made (review r344 items 2 and 7). */
function checkSchedulingAndClocks(p: Process): void {
  for (const t of p.threads) {
    const a = t.attributes;
    if (!a) continue;
    const who = `process ${p.vpid} thread ${t.vtid}`;
    const mask = a.cpuAffinity && cpuAffinityFault(a.cpuAffinity);
    if (mask) corrupt(`${who}'s CPU affinity mask is ${mask}`);
    const policy = a.schedPolicy & ~0x40000000; // SCHED_RESET_ON_FORK
    if (![0, 1, 2, 3, 5, 6].includes(policy) || (a.schedPolicy & ~0x40000000) !== policy || a.schedPolicy < 0) corrupt(`${who} has scheduling policy ${a.schedPolicy}`);
    const realtime = policy === 1 || policy === 2;
    if (!Number.isInteger(a.schedPriority) || (realtime ? a.schedPriority < 1 || a.schedPriority > 99 : a.schedPriority !== 0)) corrupt(`${who} has scheduling priority ${a.schedPriority} under policy ${policy}`);
    if (!Number.isInteger(a.nice) || a.nice < -20 || a.nice > 19) corrupt(`${who} has nice ${a.nice} (-20 to 19)`);
    // IOPRIO_CLASS_NONE, RT, BE, IDLE in the top 3 of 16 bits.
    if (a.ioprio !== undefined && !(Number.isInteger(a.ioprio) && a.ioprio >= 0 && a.ioprio < 4 << 13)) corrupt(`${who} has I/O priority 0x${a.ioprio.toString(16)}`);
  }
  for (const t of p.posixTimers ?? []) {
    const fault = posixTimerClockFault(t);
    if (fault) corrupt(`process ${p.vpid}'s ${fault}`);
  }
  for (const fd of p.fds) if (fd.timerfd && !TIMERFD_CLOCKS.has(fd.timerfd.clockid)) corrupt(`process ${p.vpid} fd ${fd.fd} is a timerfd on clock ${fd.timerfd.clockid}, which timerfd_create does not take`);
}

/** Watch numbers and timer ids are reached by counting up to them: the
 * whole image's count is bounded (LIMITS.countedIds), not just each
 * descriptor's. A snapshot keeps its images within it (inotify.ts
 * fitInotifyNumbers). */
export function countedIds(processes: Pick<Process, 'posixTimers' | 'fds'>[]): number {
  let counted = 0;
  for (const p of processes) {
    counted += Math.max(0, ...(p.posixTimers ?? []).map((t) => t.id + 1));
    for (const fd of p.fds) counted += Math.max(fd.inotifyLastWd ?? 0, ...(fd.inotifyWatches ?? []).map((w) => w.wd));
  }
  return counted;
}

export function validateImage(image: Image, pagesFileSize: bigint, memoryOnly = false): void {
  if (!image.node) corrupt('it does not say which node it is for');
  // An AID names files in the state directory (its keeper's socket, say),
  // even when the restore is given another (--aid).
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(image.aid) && !memoryOnly) corrupt(`its AID '${image.aid.slice(0, 80)}' is not a valid AID`);
  if (!image.stats) corrupt('it has no statistics section');
  checkStrings(image);
  checkPaths(image);
  checkResolverPaths(image);
  checkSharedSockets(image);
  if (image.node.pageSize !== 4096) corrupt(`its page size is ${image.node.pageSize}; appshot knows 4096`);
  const limits = machineLimits();
  const pageFile: PageFile = { size: pagesFileSize, spans: [] };
  if (!image.processes.length && !memoryOnly) corrupt('it holds no process');
  if (image.processes.length > LIMITS.processes) corrupt(`it holds ${image.processes.length} processes (at most ${LIMITS.processes})`);
  const threads = image.processes.reduce((n, p) => n + p.threads.length, 0);
  if (threads > LIMITS.threads) corrupt(`it holds ${threads} threads (at most ${LIMITS.threads})`);

  // The tree: unique virtual PIDs above 0; a parent that is not in the image
  // is init or outside the application (the restore makes it a child of
  // init); no process is its own ancestor.
  const byVpid = new Map<number, Process>();
  for (const p of image.processes) {
    if (!(Number.isInteger(p.vpid) && p.vpid > 0)) corrupt(`a process has virtual PID ${p.vpid}`);
    if (byVpid.has(p.vpid)) corrupt(`virtual PID ${p.vpid} appears twice`);
    if (!(Number.isInteger(p.vppid) && p.vppid >= 0)) corrupt(`process ${p.vpid} has parent ${p.vppid}`);
    byVpid.set(p.vpid, p);
  }
  const rooted = new Set<number>();
  for (const p of image.processes) {
    const path = new Set<number>();
    for (let q: Process | undefined = p; q && !rooted.has(q.vpid); q = byVpid.get(q.vppid)) {
      if (path.has(q.vpid)) corrupt(`process ${q.vpid} is its own ancestor`);
      path.add(q.vpid);
    }
    for (const v of path) rooted.add(v);
  }
  // A stop report taken is of a child of its own, stopped by job control:
  // the restore takes the new one in the parent's stead (jobcontrol.ts).
  // Once each: a list repeating one (as long as the image) would have the
  // restore run a call in the parent for each.
  for (const p of image.processes) {
    const seen = new Set<number>();
    for (const v of p.stopReportsTaken ?? []) {
      const child = byVpid.get(v);
      if (!child || child.vppid !== p.vpid || !child.groupStopped) corrupt(`process ${p.vpid} took the stop report of ${v}, not a stopped child of its own`);
      if (seen.has(v)) corrupt(`process ${p.vpid} took the stop report of ${v} twice`);
      seen.add(v);
    }
  }
  // A continued report pending is of a running child of its own (a
  // stopped one has none: its stop ended it): the restore stops and
  // continues it again (jobcontrol.ts). Once each, as above.
  for (const p of image.processes) {
    const seen = new Set<number>();
    for (const v of p.continuedReports ?? []) {
      const child = byVpid.get(v);
      if (!child || child.vppid !== p.vpid || child.groupStopped) corrupt(`process ${p.vpid} has a continued report of ${v}, not a running child of its own`);
      if (seen.has(v)) corrupt(`process ${p.vpid} has the continued report of ${v} twice`);
      seen.add(v);
    }
  }
  // The thread that forked a process (its real_parent) is one of its
  // parent's: the restore forks it from that thread.
  for (const p of image.processes) {
    if (!p.parentVtid || memoryOnly) continue;
    const parent = byVpid.get(p.vppid);
    if (!parent?.threads.some((t) => t.vtid === p.parentVtid)) corrupt(`process ${p.vpid} was forked by thread ${p.parentVtid}, which is not a thread of its parent ${p.vppid}`);
  }
  // Zombies are bound in the PID table too: their ids are PIDs like any,
  // and each is a fork at restore.
  const zombies = image.processes.reduce((n, p) => n + (p.zombies?.length ?? 0), 0);
  if (image.processes.length + zombies > LIMITS.processes) corrupt(`it holds ${image.processes.length} processes and ${zombies} zombies (at most ${LIMITS.processes} in all)`);
  const counted = countedIds(image.processes);
  if (counted > LIMITS.countedIds) corrupt(`its inotify watch numbers and POSIX timer ids add up to ${counted} (at most ${LIMITS.countedIds})`);
  const locks = image.processes.reduce((n, p) => n + p.fds.reduce((m, fd) => m + (fd.locks?.length ?? 0), 0), 0);
  if (locks > LIMITS.fileLocks) corrupt(`it holds ${locks} file locks (at most ${LIMITS.fileLocks})`);
  const zombieVpids = new Set<number>();
  for (const p of image.processes)
    for (const z of p.zombies ?? []) {
      if (!(Number.isInteger(z.vpid) && z.vpid > 0) || byVpid.has(z.vpid) || zombieVpids.has(z.vpid)) corrupt(`process ${p.vpid} has a zombie child with virtual PID ${z.vpid}, which is taken or invalid`);
      zombieVpids.add(z.vpid);
      if (z.parentVtid && !p.threads.some((t) => t.vtid === z.parentVtid)) corrupt(`process ${p.vpid}'s zombie child ${z.vpid} was forked by thread ${z.parentVtid}, which is not one of its threads`);
    }

  // The PIDs SysV objects show (shm_cpid/lpid, msg_lspid/lrpid, GETPID):
  // virtual PIDs within the kernel's range, 0 for none. One of no process
  // of the image is shown as 0 (resources/sysv.ts settleSysvPids).
  const ipcPid = (v: number, what: string) => {
    if (!(Number.isInteger(v) && v >= 0 && v <= 4194303)) corrupt(`${what} is ${v}, not a PID`);
  };
  for (const s of image.shmSegments) {
    ipcPid(s.cvpid, `SysV segment ${s.vid}'s creator PID`);
    ipcPid(s.lvpid, `SysV segment ${s.vid}'s last user's PID`);
  }
  for (const s of image.semaphores) s.vpids.forEach((v, n) => ipcPid(v, `semaphore ${n} of set ${s.vid}'s last user's PID`));
  for (const q of image.msgQueues) {
    ipcPid(q.lsvpid, `message queue ${q.vid}'s last sender's PID`);
    ipcPid(q.lrvpid, `message queue ${q.vid}'s last receiver's PID`);
  }
  for (const s of image.shmSegments) {
    if (!(s.size > 0n && s.size <= BigInt(limits.shmmax))) corrupt(`SysV segment ${s.vid} is ${s.size} bytes (this machine allows 1..${limits.shmmax})`);
    checkPageRef(s.contents, (s.size + PAGE - 1n) / PAGE, pageFile, `SysV segment ${s.vid}`);
  }
  const shmVids = new Set(image.shmSegments.map((s) => s.vid));
  if (shmVids.size !== image.shmSegments.length || image.shmSegments.length > limits.shmmni) corrupt('SysV segments repeat an id, or exceed shmmni');
  // A segment removed (IPC_RMID) while attached lives only while attached,
  // and its key is private (the kernel's IPC_RMID makes it so): the
  // restore removes it again once the processes have attached it
  // (resources/sysv.ts), so one no process maps would be made and go at
  // once, and one with a key would have bound it for nothing.
  if (!memoryOnly) {
    const attached = new Set(image.processes.flatMap((p) => p.vmas.filter((v) => v.kind === VmaKind.SYSV_SHM).map((v) => v.shmVid)));
    for (const s of image.shmSegments) {
      if (!s.destroyed) continue;
      if (s.vkey !== 0) corrupt(`SysV segment ${s.vid} was removed while attached (SHM_DEST), yet carries key 0x${(s.vkey >>> 0).toString(16)} (a removed segment's key is private)`);
      if (!attached.has(s.vid)) corrupt(`SysV segment ${s.vid} was removed while attached (SHM_DEST), yet no process of the image attaches it`);
    }
  }
  for (const s of image.semaphores) {
    if (s.values.some((v) => v > SEMVMX)) corrupt(`semaphore set ${s.vid} holds a value above ${SEMVMX}`);
    if (!(s.values.length >= 1 && s.values.length <= limits.semmsl)) corrupt(`semaphore set ${s.vid} has ${s.values.length} semaphores (this machine allows 1..${limits.semmsl})`);
    if (s.vpids.length > s.values.length) corrupt(`semaphore set ${s.vid} has more PIDs than semaphores`);
  }
  if (new Set(image.semaphores.map((s) => s.vid)).size !== image.semaphores.length || image.semaphores.length > limits.semmni) corrupt('semaphore sets repeat an id, or exceed semmni');
  // SEM_UNDO adjustments (resources/sysv.ts restoreSemUndo): each of a
  // semaphore the image holds, once per process, within what the kernel
  // keeps: ipc/sem.c refuses an operation that would take semadj out of
  // -(SEMAEM + 1)..SEMAEM, SEMAEM being SEMVMX (a process that raised a
  // semaphore by 32768 in all, others lowering it meanwhile, holds -32768).
  const semSets = new Map(image.semaphores.map((s) => [s.vid, s.values.length]));
  for (const p of image.processes) {
    const seen = new Set<string>();
    // No more than the library's table holds (preload_ipc.c SEM_UNDO_MAX):
    // each is a system call injected at restore.
    if ((p.semUndo?.length ?? 0) > 64) corrupt(`process ${p.vpid} has ${p.semUndo!.length} SEM_UNDO adjustments (a snapshot takes at most 64)`);
    for (const u of p.semUndo ?? []) {
      const nsems = semSets.get(u.vid);
      if (nsems === undefined || !(Number.isInteger(u.semnum) && u.semnum >= 0 && u.semnum < nsems)) corrupt(`process ${p.vpid} has a SEM_UNDO adjustment of semaphore ${u.semnum} of set ${u.vid}, which the image does not hold`);
      if (!(Number.isInteger(u.adj) && u.adj !== 0 && u.adj >= -(SEMVMX + 1) && u.adj <= SEMVMX)) corrupt(`process ${p.vpid} has a SEM_UNDO adjustment of ${u.adj} on set ${u.vid} semaphore ${u.semnum} (the kernel keeps -${SEMVMX + 1}..${SEMVMX}, non-zero)`);
      const key = `${u.vid}:${u.semnum}`;
      if (seen.has(key)) corrupt(`process ${p.vpid} has two SEM_UNDO adjustments of set ${u.vid} semaphore ${u.semnum}`);
      seen.add(key);
    }
  }
  // CPU times (resources/cputime.ts): within what the library adds.
  for (const p of image.processes) {
    const bad = checkCpuTimes(`process ${p.vpid}`, p.cpuTimes) ?? p.threads.map((t) => checkCpuTimes(`process ${p.vpid} thread ${t.vtid}`, t.cpuTimes)).find((m) => m);
    if (bad) corrupt(bad);
  }
  for (const q of image.msgQueues) {
    let bytes = 0;
    for (const m of q.messages) {
      if (m.type <= 0n) corrupt(`message queue ${q.vid} holds a message of type ${m.type} (msgsnd takes types above 0)`);
      if (m.data.length > limits.msgmax) corrupt(`message queue ${q.vid} holds a message of ${m.data.length} bytes (msgmax is ${limits.msgmax})`);
      bytes += m.data.length;
    }
    // Root may raise a queue's size past msgmnb, but the kernel keeps it an int.
    if (q.qbytes > 0x7fffffffn) corrupt(`message queue ${q.vid} allows ${q.qbytes} bytes`);
    if (BigInt(bytes) > q.qbytes) corrupt(`message queue ${q.vid} holds ${bytes} bytes, more than its ${q.qbytes}`);
  }
  if (new Set(image.msgQueues.map((q) => q.vid)).size !== image.msgQueues.length || image.msgQueues.length > limits.msgmni) corrupt('message queues repeat an id, or exceed msgmni');
  for (const [i, m] of image.sharedMemory.entries()) {
    if (m.size > BigInt(totalmem())) corrupt(`shared memory ${i} is ${m.size} bytes, more than this machine has`);
    checkPageRef(m.pages, (m.size + PAGE - 1n) / PAGE, pageFile, `shared memory ${i}`);
  }
  // F_SEAL_SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC.
  const sealsKnown = 0x3f;
  // A deleted file is made again at its size (sparse where it had holes).
  for (const [i, f] of image.files.entries()) if (f.deleted && f.size > 1n << 40n) corrupt(`deleted file ${i} claims ${f.size} bytes`);
  // Its times and its blocks past its data (deleted.ts).
  for (const [i, f] of image.files.entries()) {
    const fault = deletedFileRecordFault(f, i);
    if (fault) corrupt(fault);
  }
  // memfd_create takes names of up to 249 bytes (MFD_NAME_MAX_LEN).
  for (const [i, f] of [...image.files, ...image.sharedMemory].entries())
    if (f.path.startsWith('/memfd:') && Buffer.byteLength(f.path.slice(7).replace(/ \(deleted\)$/, '')) > 249) corrupt(`memfd ${i}'s name is longer than memfd_create takes`);
  for (const [i, f] of image.files.entries()) if ((f.seals ?? 0) & ~sealsKnown || (f.seals && !f.deleted)) corrupt(`file ${i} carries seals 0x${(f.seals ?? 0).toString(16)}`);
  // An owner is a deleted file's only, and never (uid_t)-1, which fchown
  // reads as "leave it".
  for (const [i, f] of image.files.entries())
    for (const [what, v] of [['uid', f.uid], ['gid', f.gid]] as const)
      if (v !== undefined && (!f.deleted || v >= 0xffffffff)) corrupt(`file ${i} carries ${what} ${v}`);
  // A link's text is a symbolic link's only (S_IFLNK), at most PATH_MAX.
  for (const [i, f] of image.files.entries())
    if (f.linkTarget !== undefined && (f.deleted || (f.mode & 0o170000) !== 0o120000 || Buffer.byteLength(f.linkTarget, 'latin1') >= 4096)) corrupt(`file ${i} carries a symbolic link's text but is not a symbolic link`);
  for (const [i, s] of image.sharedMemory.entries()) if ((s.seals ?? 0) & ~sealsKnown) corrupt(`shared memory ${i} carries seals 0x${(s.seals ?? 0).toString(16)}`);
  for (const [i, f] of image.files.entries()) if (f.contents) checkPageRef(f.contents, (f.size + PAGE - 1n) / PAGE, pageFile, `the saved contents of ${f.path || `file ${i}`}`);
  for (const [i, p] of image.pipes.entries()) {
    if (p.capacity > limits.pipeMaxSize || p.data.length > Math.max(p.capacity, 65536)) corrupt(`pipe ${i} holds ${p.data.length} bytes in ${p.capacity} (pipe-max-size is ${limits.pipeMaxSize})`);
    // Each packet a pipe buffer's worth at most (a page), none empty, all
    // of the data.
    const packets = p.packets ?? [];
    if (packets.length && (packets.some((n) => n < 1 || n > 4096) || packets.reduce((a, n) => a + n, 0) !== p.data.length)) corrupt(`pipe ${i}'s packets do not make up its ${p.data.length} bytes`);
  }

  const vtids = new Set<number>();
  for (const p of image.processes) checkProcess(image, p, pageFile, limits, vtids, shmVids, memoryOnly);
  const ringTree = memoryOnly ? undefined : keyringTreeFault(image.processes);
  if (ringTree) corrupt(ringTree);
  if (!memoryOnly) checkPtys(image);
  if (!memoryOnly) checkPtyReferences(image);
  if (!memoryOnly) checkWaits(image, corrupt);
  if (!memoryOnly) checkPosixQueues(image, corrupt);
  // Last: a whole-image property, which a copied process (a crafted
  // image's) also breaks; what is wrong with one object is named first.
  const overlap = pageSpansFault(pageFile);
  if (overlap) corrupt(overlap);
}
