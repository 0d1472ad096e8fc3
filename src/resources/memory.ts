/**
 * Memory: the map of every process (each VMA with protection, flags,
 * backing object and offset) and its contents. Only pages that exist are
 * stored (/proc/PID/pagemap), and of a private file mapping only the pages
 * the process wrote. Shared anonymous memory (and memfd, and deleted files
 * mapped shared) is one object however many processes map it: stored once.
 * SysV segments are global state (sysv.ts); the VMA only names the segment.
 */
import { type BigIntStats, closeSync, openSync, readFileSync, readSync, statSync } from 'node:fs';
import { deviceName, mapFilesPath, mapsDeviceName, procSmaps, readStat } from '../procfs.js';
import { addon, PAGES_MODE, type PagesCheck, type ScannedPages } from '../native.js';
import { pagesCheckFailure } from '../image/format.js';
import { type Image, type Mempolicy, type Rlimit, type Vma, VmaKind } from '../image/types.js';
import { AppshotError, ExitCode } from '../errors.js';
import { CAP_IPC_LOCK, imageLimit, ownHardLimit, processMay, restorerMay, RLIMIT_MEMLOCK, vouchedFor } from './heldcaps.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';
import { type Injector, NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { mbindUsedOf } from '../ptrace/windows.js';
import { injected, lastCallInto, RemoteProcess, SYS, takeDescriptors } from '../ptrace/remote.js';
import { DELETED, deletedFileAnchor, memfdLike, memfdSeals, openWithoutAccessTime, shownFile } from './deleted.js';
import { killPoint } from '../killpoint.js';
import { refusedAsProcess } from './fsident.js';

const PAGE = 4096n;

export interface MapsLine {
  start: bigint;
  end: bigint;
  perms: string;
  pgoff: bigint;
  major: number;
  minor: number;
  ino: bigint;
  path: string;
  vmFlags: string[];
  /** From smaps only (readSmaps). */
  swapKb?: number;
  /** From smaps only: kB of anonymous pages (a private file mapping's
   * written ones), and whether its pages are raw frames (VM_PFNMAP), which
   * smaps counts nowhere. */
  anonKb?: number;
  pfnmap?: boolean;
  /** From smaps only: registered for userfaultfd write-protection (`uw`),
   * as dirty tracking registers what it tracks (snapshot/tracking.ts). */
  uffdWp?: boolean;
}

/**
 * The status of the file that mapping `l` of process `pid` maps. Its
 * name's, when the name still leads to it (the device and inode
 * /proc/PID/maps shows); else the mapping's own, through /proc/PID/map_files (root's, or
 * a snapshotter's with CAP_CHECKPOINT_RESTORE). The name is the
 * application's: its user may have put a symlink on the way since the
 * file was mapped, to a file only root may read, whose size (and then
 * checksum: snapshot/driver.ts checksumFiles) a root snapshot would
 * otherwise record as the mapped file's, and a restore's refusal print.
 * Without map_files, the name's as before: such a snapshotter stats it
 * with its own rights only.
 */
function mappedFileStat(pid: number, l: MapsLine): BigIntStats {
  let named: BigIntStats | undefined;
  let failed: unknown;
  try {
    named = statSync(l.path, { bigint: true });
    // By device and inode: an inode number alone is another file's on
    // another file system (a tmpfs numbers its files in turn).
    if (named.ino === l.ino && deviceName(named.dev) === mapsDeviceName(l.major, l.minor)) return named;
  } catch (e) {
    // (A name hidden under a mount since, say: the mapping still says.)
    failed = e;
  }
  try {
    return statSync(mapFilesPath(pid, l.start, l.end), { bigint: true });
  } catch {
    // Without map_files: the name's, as before (or its error).
    if (named) return named;
    throw failed;
  }
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$/;

/** One mapping's header line, as maps and smaps both print it. */
function mapsLine(m: RegExpExecArray): MapsLine {
  return {
    start: BigInt('0x' + m[1]),
    end: BigInt('0x' + m[2]),
    perms: m[3],
    pgoff: BigInt('0x' + m[4]),
    major: parseInt(m[5], 16),
    minor: parseInt(m[6], 16),
    ino: BigInt(m[7]),
    path: m[8],
    vmFlags: m[8] === '[stack]' ? ['gd'] : [],
  };
}

/** The memory map from /proc/PID/maps: cheap, unlike smaps, which counts
 * every mapping's pages. The only VmFlags bit it can tell (grows down) is
 * the stack's; a dump reads the rest with readSmaps. */
export function readMaps(pid: number): MapsLine[] {
  const out: MapsLine[] = [];
  for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = HEADER.exec(line);
    if (m) out.push(mapsLine(m));
  }
  return out;
}

/**
 * A restored process's /proc/PID/maps, read once per point at which it
 * can have changed: the lines last read are given again until a system
 * call has been injected into this process since (remote.ts counts them
 * per process: lastCallInto). Until it is let go, a process being
 * restored runs nothing but what appshot injects (stopped, every signal
 * blocked), and nothing from outside it changes its mappings (memory
 * written by process_vm_writev or /proc/PID/mem is not mapped or unmapped
 * by that; appshot registers no userfaultfd ranges from outside). Nor
 * does a call injected into another process of the restore: mmap,
 * munmap, mprotect, mremap, madvise and the rest act on the caller's own
 * memory, and no two processes of a restore share one (a snapshot refuses
 * CLONE_VM between processes, fdtable.ts, and a restore makes each its
 * own). A fork counts for the child it makes as well, whose PID may be
 * one a process gone had. So lines read with no call injected into the
 * process since are the file as it is now. (One thing outside it does
 * show: a file it maps, unlinked meanwhile, gets " (deleted)" after its
 * name - a race with whoever unlinks it that a read made a moment earlier
 * runs as well; its vDSO, free ranges and protections, most of what the
 * restore looks up here, do not depend on names.)
 *
 * For one restore (keyed by PID, which a process it traces keeps until
 * it is reaped), not kept across restores.
 */
export class LiveMaps {
  private lines: MapsLine[] | undefined;
  /** injected.calls when they were read. */
  private readAt = -1;

  /** Whether the lines read are still the file as it is. */
  private get current(): boolean {
    return this.lines !== undefined && lastCallInto(this.pid) <= this.readAt;
  }

  constructor(readonly pid: number) {}

  /** Its mappings as they are now: one array for every caller until read
   * again, frozen (a caller that sorted it in place would reorder it for
   * the others: it throws instead). */
  get(): MapsLine[] {
    if (!this.lines || !this.current) {
      this.lines = Object.freeze(readMaps(this.pid)) as MapsLine[];
      this.readAt = injected.calls;
    }
    return this.lines;
  }

  /** Its vDSO as it is now, if it has one: where RemoteProcess finds the
   * `syscall` instruction it injects calls from. */
  vdso(): MapsLine | undefined {
    return this.get().find((l) => l.path === '[vdso]');
  }

  /**
   * Runs `f`, which the caller knows injects into this process only calls
   * that leave its mappings as they are (setsid, setpgid, keyctl, fork:
   * its session, group and keyrings are not in its maps, and a fork
   * copies them for the child, leaving the parent's), and none that ran before and
   * were deferred to it (a RemoteProcess with nothing deferred); lines
   * current when it starts, or read while it runs (for the vDSO its
   * calls run from), stay current after it. A throw leaves them to be
   * read again.
   */
  keptAcross<T>(f: () => T): T {
    const before = injected.calls;
    const wasCurrent = this.current;
    const result = f();
    if (this.lines !== undefined && (wasCurrent || this.readAt >= before)) this.readAt = injected.calls;
    return result;
  }
}

/**
 * The VmFlags a snapshot keeps (Vma.vmFlags), each given back by a restore:
 * gd (grows down) with MAP_GROWSDOWN, dp (droppable) with MAP_DROPPABLE,
 * mw (may write) by the mode a shared file mapping's file is opened with,
 * lo (locked) and lf (locked on fault) with mlock2, sl (sealed) with
 * mseal, the others with madvise. wf and dc are also what makes a clone a fork (forkTreatment).
 */
const KEPT_VM_FLAGS: Record<string, number | undefined> = {
  gd: undefined,
  dp: undefined,
  mw: undefined,
  wf: 18, // MADV_WIPEONFORK
  dc: 10, // MADV_DONTFORK
  dd: 16, // MADV_DONTDUMP
  hg: 14, // MADV_HUGEPAGE
  nh: 15, // MADV_NOHUGEPAGE
  mg: 12, // MADV_MERGEABLE
  // Read-ahead hints: only performance, but a program that asked for them
  // (a database scanning a file, a random-access index) is slower without
  // them, and madvise gives them back as they were.
  sr: 2, // MADV_SEQUENTIAL
  rr: 1, // MADV_RANDOM
  lo: undefined,
  lf: undefined,
  sl: undefined,
};

const MLOCK_ONFAULT = 1;

/**
 * The privilege rule for locked memory, before anything is made: each
 * process's mappings the image says are locked (VmFlags lo) are locked
 * again from inside it while it is still the restorer's (root has no
 * RLIMIT_MEMLOCK), so they are weighed as the kernel weighed the process
 * itself (per holder, heldcaps.ts; this node's own snapshot taken at its
 * word): at most its own RLIMIT_MEMLOCK in
 * all, unless it held CAP_IPC_LOCK; mlockall(MCL_FUTURE) at all only
 * with a limit above 0 or the capability. And as the kernel weighs the
 * restorer: its CAP_IPC_LOCK, or its own hard limit. One line naming
 * the process and the bytes otherwise.
 */
export function checkLockedMemory(image: Image, capEff: bigint, own: Rlimit[]): void {
  const PAGE = 4096n;
  for (const p of image.processes) {
    const locked = p.vmas.filter((v) => v.vmFlags.includes('lo')).reduce((n, v) => n + ((v.end - v.start + PAGE - 1n) / PAGE) * PAGE, 0n);
    const future = p.attributes?.lockFuture === true;
    if (!locked && !future) continue;
    const limit = imageLimit(p, RLIMIT_MEMLOCK);
    const what = locked ? `${locked} bytes of memory locked (mlock)` : 'mlockall(MCL_FUTURE)';
    const within = (max: bigint) => (locked ? locked <= max : max > 0n);
    if (!vouchedFor(image) && !processMay(p, [CAP_IPC_LOCK]) && !within(limit))
      throw new AppshotError(`process ${p.vpid} (${p.comm}): ${what} needs CAP_IPC_LOCK or RLIMIT_MEMLOCK of as much, which the process did not have (its RLIMIT_MEMLOCK: ${limit} bytes): made by this restore, it would give the application more than it had`, ExitCode.denied);
    if (!restorerMay(capEff, [CAP_IPC_LOCK]) && !within(ownHardLimit(own, RLIMIT_MEMLOCK)))
      throw new AppshotError(`process ${p.vpid} (${p.comm}): ${what} needs CAP_IPC_LOCK or RLIMIT_MEMLOCK of as much, which this restore does not have`, ExitCode.denied);
  }
}

/**
 * A mapping's own NUMA policy (mbind; the thread's, set_mempolicy, is
 * attributes.ts's). /proc/PID/numa_maps shows it, but walks every page of
 * every mapping to count them (~13-20 ms for 1 GiB in 1,000 mappings,
 * ~40% of smaps's walk, which the snapshot already makes), so each
 * mapping is asked instead, among the process's batched questions, if
 * the process called mbind (the preload library marks it: a question per
 * mapping costs ~10-40 us of the frozen window, ~10-40 ms for a thousand
 * mappings; every mapping is asked where the mark cannot be read):
 * get_mempolicy(MPOL_F_ADDR) at its start answers the mapping's own
 * policy (for shared memory, the object's there), MPOL_DEFAULT where it
 * has none. The mode carries its flags (MPOL_F_STATIC_NODES...); the mask
 * is as many bits as this machine's node ids (whole words), which
 * get_mempolicy wants at least. The restore mbinds the range once it is
 * mapped (a lazily mapped one's page-file pieces too), before its pages
 * are written: they are placed by the policy.
 */
const NR_mbind = 237;
const NR_get_mempolicy = 239;
const MPOL_F_ADDR = 2;
const MPOL_LOCAL = 4;
const MPOL_MODES = 7; // MPOL_DEFAULT .. MPOL_WEIGHTED_INTERLEAVE
const MPOL_MODE_FLAGS = 0xe000; // MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING

let nodeIds: { possible: number; online?: Set<number> } | undefined;
/** This machine's node ids: how many are possible (nr_node_ids) and
 * which are online, from sysfs; where it does not say (no NUMA, or no
 * sysfs), as many as a snapshot asks a thread's policy with (1024) and
 * which are online not known: the kernel answers (ENOSYS without NUMA). */
function numaNodes(): { possible: number; online?: Set<number> } {
  if (nodeIds !== undefined) return nodeIds;
  const list = (path: string): number[] | undefined => {
    let text: string;
    try {
      text = readFileSync(path, 'utf8').trim();
    } catch {
      return undefined;
    }
    const out: number[] = [];
    for (const part of text.split(',').filter(Boolean)) {
      const [a, b] = part.split('-').map(Number);
      for (let n = a; n <= (b ?? a); n++) out.push(n);
    }
    return out;
  };
  const possible = list('/sys/devices/system/node/possible');
  const online = list('/sys/devices/system/node/online');
  nodeIds = possible && online ? { possible: Math.max(0, ...possible) + 1, online: new Set(online) } : { possible: 1024 };
  return nodeIds;
}

/** The nodes of a mask, as numbers. */
function maskNodes(nodes: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i < nodes.length * 8; i++) if (nodes[i >> 3] & (1 << (i & 7))) out.push(i);
  return out;
}

/** A policy as a person reads it: "bind 0x2 on nodes 0,1". */
export function policyText(p: Mempolicy): string {
  const name = ['default', 'preferred', 'bind', 'interleave', 'local', 'preferred-many', 'weighted-interleave'][p.mode & 0x1fff] ?? `mode ${p.mode & 0x1fff}`;
  const flags = p.mode & MPOL_MODE_FLAGS ? ` (flags 0x${(p.mode & MPOL_MODE_FLAGS).toString(16)})` : '';
  const nodes = maskNodes(p.nodes);
  return `${name}${flags}${nodes.length ? ` on node${nodes.length > 1 ? 's' : ''} ${nodes.join(',')}` : ''}`;
}

/** The policy get_mempolicy wrote into `out` (the mode at its start, the
 * node mask 8 bytes in), its trailing zero words left out; undefined for
 * MPOL_DEFAULT (0), which is recorded as nothing. A thread's
 * (attributes.ts) and a mapping's alike. */
export function mempolicyFromAnswer(out: Buffer): Mempolicy | undefined {
  const mode = out.readInt32LE(0);
  if (mode === 0) return undefined;
  const nodes = out.subarray(8);
  let used = nodes.length;
  while (used > 0 && nodes[used - 1] === 0) used--;
  return { mode, nodes: Buffer.from(nodes.subarray(0, Math.ceil(used / 8) * 8)) };
}

/** A policy's mask as the kernel is given it (set_mempolicy, mbind):
 * padded to whole words and one more bit than it holds, with `maxnode`,
 * as both read maxnode - 1 bits. */
export function mempolicyMask(p: Mempolicy): { mask: Buffer; maxnode: number } {
  const mask = Buffer.alloc(Math.ceil((p.nodes.length + 1) / 8) * 8);
  p.nodes.copy(mask);
  return { mask, maxnode: p.nodes.length * 8 + 1 };
}

/** Why a recorded node mask is not one a restore takes, or undefined: whole
 * words of no more nodes than a snapshot asks (1024), which the restore
 * copies into its scratch memory (validate.ts). */
export function mempolicyNodesFault(nodes: Buffer): string | undefined {
  return nodes.length % 8 || nodes.length > 128 ? `${nodes.length} bytes (whole words, at most 128)` : undefined;
}

/** Whether `mode` is one the kernel's mbind takes (validate.ts). */
export function mempolicyModeValid(mode: number): boolean {
  return Number.isInteger(mode) && mode >= 0 && (mode & ~(0x1fff | MPOL_MODE_FLAGS)) === 0 && (mode & 0x1fff) < MPOL_MODES;
}

/** Each mapping's policy asked (see above), by start; none without
 * mbind. */
export function askMappingPolicies(calls: CallQueue, pid: number, maps: MapsLine[]): Map<bigint, Answer> {
  const numa = numaNodes();
  const out = new Map<bigint, Answer>();
  if (mbindUsedOf(pid, maps) === false) return out;
  const bits = Math.ceil(numa.possible / 64) * 64;
  for (const l of maps) {
    if (l.path === '[vsyscall]') continue; // not a mapping of the process's
    out.set(l.start, calls.ask(NR_get_mempolicy, ['buf', { bufAt: 8 }, bits, l.start, MPOL_F_ADDR], { outLength: 8 + bits / 8 }));
  }
  return out;
}

/** The policies asked, into the mappings dumped (MPOL_DEFAULT: none). */
export function noteMappingPolicies(vmas: Vma[], asked: Map<bigint, Answer>): void {
  for (const v of vmas) {
    const a = asked.get(v.start);
    if (!a?.answered || a.ret !== 0n) continue; // the kernel's answer or none: as before
    const policy = mempolicyFromAnswer(a.out);
    if (policy) v.mempolicy = policy;
  }
}

/** Refuses, before anything of the process is changed, a mapping whose
 * policy names a node this machine does not have online (where sysfs
 * does not say, mbind itself fails, naming the mapping and the policy).
 * Not so the nodes of a policy with MPOL_F_RELATIVE_NODES, which the
 * kernel folds onto the nodes it has, nor of one with
 * MPOL_F_STATIC_NODES, which uses those of them it has (the kernel keeps
 * and get_mempolicy shows the mask as the program gave it, nodes it
 * never had included: mbind(MPOL_INTERLEAVE | MPOL_F_RELATIVE_NODES,
 * nodes 0-1) is taken on a machine of one node, and was refused at the
 * restore on that very machine); one of whose nodes none is online is. */
const MPOL_F_STATIC_NODES = 0x8000;
const MPOL_F_RELATIVE_NODES = 0x4000;
function checkPolicyNodes(vmas: Vma[], vpid: number): void {
  const online = numaNodes().online;
  if (!online) return;
  for (const v of vmas) {
    if (!v.mempolicy || v.mempolicy.mode & MPOL_F_RELATIVE_NODES) continue;
    const nodes = maskNodes(v.mempolicy.nodes);
    const missing = nodes.filter((n) => !online.has(n));
    if (v.mempolicy.mode & MPOL_F_STATIC_NODES && missing.length < nodes.length) continue;
    if (missing.length) throw new AppshotError(`process ${vpid}: its mapping at 0x${v.start.toString(16)} has the NUMA policy ${policyText(v.mempolicy)} (mbind), but this machine has no node ${missing.join(',')} online (online: ${[...online].join(',')})`);
  }
}

/** Each mapping's kept VmFlags, by start address, from /proc/PID/smaps:
 * read once per process at dump time (smaps walks the page tables; maps
 * does not show the flags). */
export function readVmFlags(pid: number): Map<bigint, string[]> {
  const out = new Map<bigint, string[]>();
  for (const [start, value] of smapsField(pid, 'VmFlags'))
    out.set(start, value.split(/\s+/).filter((f) => Object.hasOwn(KEPT_VM_FLAGS, f)));
  return out;
}

/** Per distinct VmFlags line: the flags of it kept, and whether it says
 * pf (raw frames). A process has a few distinct lines for dozens of
 * mappings. */
const keptOfLine = new Map<string, { kept: string[]; pfnmap: boolean; uffdWp: boolean }>();

function keptVmFlags(line: string): { kept: string[]; pfnmap: boolean; uffdWp: boolean } {
  let k = keptOfLine.get(line);
  if (!k) {
    const flags = line.split(/\s+/);
    k = { kept: flags.filter((f) => Object.hasOwn(KEPT_VM_FLAGS, f)), pfnmap: flags.includes('pf'), uffdWp: flags.includes('uw') };
    if (keptOfLine.size >= 1024) keptOfLine.clear();
    keptOfLine.set(line, k);
  }
  return k;
}

const PERMS = Array.from({ length: 16 }, (_, b) => `${b & 1 ? 'r' : '-'}${b & 2 ? 'w' : '-'}${b & 4 ? 'x' : '-'}${b & 8 ? 's' : 'p'}`);

/**
 * The memory map with each mapping's kept VmFlags and its kB in swap, from
 * one read of /proc/PID/smaps: what a dump reads once per process (smaps
 * walks the page tables; it holds the maps lines too), for the driver, the
 * shared-object pages and the memory dump alike. Parsed by the addon
 * (procSmaps): in JS, its ~25 lines per mapping cost a tiny application's
 * frozen window 0.2 ms.
 */
export function readSmaps(pid: number): MapsLine[] {
  const { addr, num, paths, flags } = procSmaps(`/proc/${pid}/smaps`);
  const out: MapsLine[] = new Array(paths.length);
  for (let i = 0; i < paths.length; i++) {
    const path = paths[i];
    const line = flags[i];
    const k = line === undefined ? undefined : keptVmFlags(line);
    out[i] = {
      start: addr[i * 4],
      end: addr[i * 4 + 1],
      perms: PERMS[num[i * 5 + 2]],
      pgoff: addr[i * 4 + 2],
      major: num[i * 5],
      minor: num[i * 5 + 1],
      ino: addr[i * 4 + 3],
      path,
      // Copies: a mapping's flags are its own (the image keeps them).
      vmFlags: k ? [...k.kept] : path === '[stack]' ? ['gd'] : [],
      swapKb: num[i * 5 + 4],
      anonKb: num[i * 5 + 3],
      pfnmap: k ? k.pfnmap : false,
      uffdWp: k ? k.uffdWp : false,
    };
  }
  return out;
}

/** One field of every mapping in /proc/PID/smaps, by start address. */
function smapsField(pid: number, field: string): Map<bigint, string> {
  const out = new Map<bigint, string>();
  let start: bigint | undefined;
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = HEADER.exec(line);
    if (m) start = BigInt('0x' + m[1]);
    else if (start !== undefined && line.startsWith(`${field}:`)) out.set(start, line.slice(field.length + 1).trim());
  }
  return out;
}

/**
 * The clone face of memory: a clone is a fork of the template (DESIGN.md,
 * "A clone keeps its virtual PID"), so memory the application marked
 * MADV_WIPEONFORK (key material, a PRNG's state: OpenSSL and
 * libraries like it mark theirs) starts zeroed in every clone, and
 * MADV_DONTFORK memory is not there at all, exactly as in a fork child.
 * A plain restore is the same instance going on: it keeps both as they were.
 */
export function forkTreatment(v: Vma): 'wipe' | 'absent' | undefined {
  if (v.vmFlags.includes('dc')) return 'absent';
  // The kernel only takes MADV_WIPEONFORK for private anonymous memory.
  if (v.vmFlags.includes('wf') && v.kind === VmaKind.ANON) return 'wipe';
  return undefined;
}

const SPECIAL: Record<string, number> = {
  '[vdso]': VmaKind.VDSO,
  '[vvar]': VmaKind.VVAR,
  '[vvar_vclock]': VmaKind.VVAR,
  '[vsyscall]': VmaKind.VSYSCALL,
};

function protOf(perms: string): number {
  return (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);
}

function pairs(a: Uint32Array): number[] {
  return Array.from(a);
}

/** The object behind a shared mapping, stored once for all its mappers.
 * It is read through /proc/PID/map_files, which sees holes (SEEK_DATA);
 * that needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and without it the
 * pages this process has present are read through its own mapping. */
function dumpSharedObject(ctx: DumpContext, pid: number, pagemapFd: number, l: MapsLine): number {
  const key = `${l.major}:${l.minor}:${l.ino}`;
  return ctx.shared(key, () => {
    let fd = -1;
    try {
      fd = openWithoutAccessTime(mapFilesPath(pid, l.start, l.end));
    } catch {
      /* unprivileged: fall back below */
    }
    if (fd >= 0) {
      try {
        const size = statSync(`/proc/self/fd/${fd}`).size;
        const seals = memfdSeals(l.path, fd);
        const { offset, runs } = ctx.pages.appendFd(fd, size);
        return { dev: BigInt((l.major << 8) | l.minor), ino: l.ino, size: BigInt(size), path: l.path, pages: { offset: BigInt(offset), runs: pairs(runs), fromParent: [] }, ...(seals ? { seals } : {}) };
      } finally {
        closeSync(fd);
      }
    }
    const d = ctx.pages.dump(pid, pagemapFd, l.start, l.end, PAGES_MODE.allPresent);
    const shift = Number(l.pgoff / PAGE);
    const runs = pairs(d.runs).map((v, i) => (i % 2 === 0 ? v + shift : v));
    return { dev: BigInt((l.major << 8) | l.minor), ino: l.ino, size: l.end - l.start + l.pgoff, path: l.path, pages: { offset: BigInt(d.offset), runs, fromParent: [] } };
  });
}

/** Whether this process's shared objects can be read through map_files
 * (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE). */
function mapFilesReadable(pid: number, l: MapsLine): boolean {
  try {
    closeSync(openSync(mapFilesPath(pid, l.start, l.end), 'r'));
    return true;
  } catch {
    return false;
  }
}

/**
 * Without map_files, dumpSharedObject reads a shared object through this
 * process's mapping, where only the pages present in its page tables show:
 * a page another process wrote (a PostgreSQL backend that has exited since,
 * filling shared buffers) is in the object but not mapped here, and would
 * come back as zeros. mincore, asked inside the process, tells which pages
 * the object holds; reading a byte of each such page that is not present
 * maps it (a read maps the object's page; it creates none), so the dump
 * sees it. Runs while the injector's scratch area is in use, before memory
 * is dumped.
 */
export function mapSharedObjectPages(pid: number, inj: Injector, what: string, maps: MapsLine[] = readSmaps(pid)): void {
  const lines = maps.filter((l) => l.perms[3] === 's' && isAnonShared(pid, l) && l.perms[0] === 'r');
  if (!lines.length || mapFilesReadable(pid, lines[0])) return;
  // mincore does not report a page that is in swap (and not in the swap
  // cache): it would come back as zeros. Refused rather than guessed.
  const swap = maps[0]?.swapKb === undefined ? smapsField(pid, 'Swap') : undefined;
  for (const l of lines) {
    const kb = swap ? parseInt(swap.get(l.start) ?? '0', 10) : l.swapKb!;
    if (kb > 0)
      throw new Unsupported(
        `${what}: shared memory at 0x${l.start.toString(16)} has ${kb} kB in swap, which cannot be told from holes without CAP_CHECKPOINT_RESTORE (map_files)`,
      );
  }
  const pagemap = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    // One byte of mincore's answer per page: as many pages a call as the
    // injector's scratch area holds bytes.
    const CHUNK = inj.scratchSize;
    const entry = Buffer.alloc(8);
    for (const l of lines) {
      const pages = Number((l.end - l.start) / PAGE);
      for (let first = 0; first < pages; first += CHUNK) {
        const n = Math.min(CHUNK, pages - first);
        const at = l.start + BigInt(first) * PAGE;
        const { ret, out } = inj.callOut(NR.mincore, [at, BigInt(n) * PAGE, 'out'], n);
        if (ret !== 0n) throw new Unsupported(`${what}: mincore of shared memory at 0x${at.toString(16)} failed (${-ret})`);
        for (let i = 0; i < n; i++) {
          if (!(out[i] & 1)) continue;
          const page = at + BigInt(i) * PAGE;
          readSync(pagemap, entry, 0, 8, Number(page / PAGE) * 8);
          if (!(entry.readBigUInt64LE() >> 63n)) addon().readMemory(pid, page, 1);
        }
      }
    }
  } finally {
    closeSync(pagemap);
  }
}

function isAnonShared(pid: number, l: MapsLine): boolean {
  return l.ino === 0n || l.path === '' || l.path.startsWith('/dev/zero') || l.path.startsWith('/memfd:') || mapsDeleted(pid, l);
}

const deletedLines = new WeakMap<MapsLine, boolean>();

/** Whether mapping `l` of process `pid` maps a deleted file: the
 * kernel's " (deleted)" on its name, unless the whole name is that very
 * file still (one named "x (deleted)": deleted.ts shownFile), which is
 * mapped again by that name, not stored as anonymous memory or a
 * stand-in. The very file is the mapping's own (/proc/PID/map_files, as
 * mappedFileStat), compared by stat's device and inode: the device maps
 * prints is not stat's on btrfs (a subvolume's) and some overlayfs, and
 * a live file taken for deleted came back a memfd. Without map_files,
 * maps' device and inode. Looked up once a line. */
export function mapsDeleted(pid: number, l: MapsLine): boolean {
  let deleted = deletedLines.get(l);
  if (deleted === undefined) {
    deleted = shownFile(l.path, (named) => {
      let mapped: BigIntStats | undefined;
      try {
        mapped = statSync(mapFilesPath(pid, l.start, l.end), { bigint: true });
      } catch {
        // No map_files (a snapshotter without CAP_CHECKPOINT_RESTORE).
      }
      if (mapped) return named.dev === mapped.dev && named.ino === mapped.ino;
      return named.ino === l.ino && deviceName(named.dev) === mapsDeviceName(l.major, l.minor);
    }).deleted;
    deletedLines.set(l, deleted);
  }
  return deleted;
}

/**
 * The process a process was forked from, as far as copy-on-write goes: its
 * private anonymous mappings, and its pagemap open. A mapping of the child
 * can share pages with it only if the parent has the very same mapping
 * (start, end, name, kept VmFlags): a restore forks the child from its
 * restored parent and keeps exactly those mappings. Memory wiped or left
 * out at fork (wf, dc) and droppable memory never qualify.
 */
interface ForkParent {
  pid: number;
  pagemapFd: number;
  anon: Map<bigint, { end: bigint; path: string; flags: string }>;
}

// A fork child's mappings are not locked, and locking a private writable
// mapping breaks its copy-on-write sharing (mlock writes every page in).
const NOT_INHERITED = ['wf', 'dc', 'dp', 'lo'];

function openForkParent(pid: number): ForkParent {
  const flags = readVmFlags(pid);
  const anon = new Map<bigint, { end: bigint; path: string; flags: string }>();
  for (const l of readMaps(pid))
    if (l.perms[3] === 'p' && l.ino === 0n && (l.path === '' || l.path === '[heap]' || l.path === '[stack]'))
      anon.set(l.start, { end: l.end, path: l.path, flags: (flags.get(l.start) ?? l.vmFlags).join(' ') });
  return { pid, pagemapFd: openSync(`/proc/${pid}/pagemap`, 'r'), anon };
}

function sharesWith(parent: ForkParent | undefined, v: Vma): boolean {
  if (!parent || v.kind !== VmaKind.ANON || v.vmFlags.some((f) => NOT_INHERITED.includes(f))) return false;
  const p = parent.anon.get(v.start);
  return p !== undefined && p.end === v.end && p.path === v.path && p.flags === v.vmFlags.join(' ');
}

/**
 * A copy-on-write copy of a process, made while it was frozen
 * (snapshot/cowcapture.ts): its private pages are read from `pid` at the
 * same addresses, by the reads given to `later`, which run once the
 * application goes on (with the copy's pagemap open).
 */
export interface PrivateCopy {
  pid: number;
  later(read: (pagemapFd: number) => void): void;
}

/** VmFlags of private memory a fork's child does not have as the parent
 * has it: MADV_DONTFORK (absent), MADV_WIPEONFORK (zero), droppable
 * (MAP_DROPPABLE, which the kernel may empty at any time). */
const NOT_AS_IN_FORK = ['dc', 'wf', 'dp'];

/** Whether mapping `l`'s private pages can be read from a copy made by
 * fork: not raw frames (VM_PFNMAP, which fork does not copy as memory),
 * nor what the child does not get as the parent had it. */
export function sameInCopy(l: MapsLine): boolean {
  return !l.pfnmap && !l.vmFlags.some((f) => NOT_AS_IN_FORK.includes(f));
}

/** An image's page file, mapped private by a lazy restore. */
const PAGE_FILE = /\/pages\.img( \(deleted\))?$/;

/** About how many bytes of mapping `l` dumpMemory reads from a copy:
 * its private pages (smaps, read while frozen), or the whole of a page
 * file's mapping, which is stored whole. */
export function bytesFromCopy(pid: number, l: MapsLine): number {
  if (l.perms[3] !== 'p' || !sameInCopy(l)) return 0;
  if (PAGE_FILE.test(l.path)) return Number(l.end - l.start);
  if (l.ino !== 0n && mapsDeleted(pid, l)) return 0;
  return ((l.anonKb ?? 0) + (l.swapKb ?? 0)) * 1024;
}

/**
 * @param forkedFrom the system PID of the process's parent, when that is a
 *   process of the image too and frozen with it: pages the two still share
 *   copy-on-write are recorded as such (PageRef.cowShared), not stored again.
 *   (Not while the application runs, as in a pre-copy: the parent could
 *   write the page between the two reads.)
 */
/** `maps`: the process's map as readSmaps read it, with the VmFlags (the
 * process still frozen since). `copy`: where its private pages are read
 * later (the rest is read now, the process frozen); never with
 * `forkedFrom`, whose pages would be compared as the parent has them
 * then, not at the freeze. */
export function dumpMemory(ctx: DumpContext, pid: number, vpid: number, what: string, forkedFrom?: number, maps: MapsLine[] = readSmaps(pid), copy?: PrivateCopy): Vma[] {
  if (copy && forkedFrom !== undefined) throw new Error('a process forked from another of the image is read frozen');
  const vmas: Vma[] = [];
  const forkParent = forkedFrom !== undefined ? openForkParent(forkedFrom) : undefined;
  /** As `scanned`, read from the copy. */
  const scannedInCopy: Scanned[] = [];
  let pagemapFd = -1;
  // A file maps in several pieces (code, data, ...): stat once.
  const fileIds = new Map<string, number>();
  /** Mappings with nothing to compare with (no parent image, no process
   * forked from): their pages are read together at the end, in one call
   * and one PAGEMAP_SCAN (dumpScannedPages). */
  const scanned: Scanned[] = [];
  try {
    pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
    // Before any page is read: reading the page file's mappings (stored
    // whole) faults every page of them in.
    recordTouchedPages(pid, vpid, maps, pagemapFd);
    for (const l of maps) {
      const shared = l.perms[3] === 's';
      const vma: Vma = {
        start: l.start,
        end: l.end,
        prot: protOf(l.perms),
        shared,
        pgoff: l.pgoff,
        path: l.path,
        kind: VmaKind.ANON,
        special: l.path.startsWith('[') ? l.path : '',
        file: -1,
        sharedMemory: -1,
        shmVid: -1,
        vmFlags: l.vmFlags,
      };
      const special = SPECIAL[l.path];
      if (special !== undefined) {
        vma.kind = special;
      } else if (l.path === '/secretmem (deleted)') {
        // memfd_secret: pages no other process may read (EIO).
        throw new Unsupported(`${what}: the memory at 0x${l.start.toString(16)}-0x${l.end.toString(16)} is memfd_secret memory (no other process may read it), which cannot be captured`);
      } else if (l.path.startsWith('/SYSV')) {
        vma.kind = VmaKind.SYSV_SHM;
        // A SysV segment's inode number is its shmid.
        vma.shmVid = ctx.virtual('shmid', Number(l.ino));
        if (!vma.shmVid && !ctx.tables.tables.shmid.some((e) => e.system === Number(l.ino)))
          throw new Unsupported(`${what}: maps SysV segment ${l.ino}, which belongs to no application`);
      } else if (l.path === 'anon_inode:[io_uring]') {
        // An io_uring's rings and SQEs: iouring.ts's (Fd.ioUring).
        continue;
      } else if (l.path.startsWith('/[aio]')) {
        // The ring of an AIO context (io_setup): aio.ts's (Process.aioRings).
        continue;
      } else if (shared && isAnonShared(pid, l)) {
        vma.kind = VmaKind.SHARED_ANON;
        vma.sharedMemory = dumpSharedObject(ctx, pid, pagemapFd, l);
      } else if (!shared && (PAGE_FILE.test(l.path) || (l.ino !== 0n && mapsDeleted(pid, l)))) {
        // Memory a lazy restore mapped from an image's page file: the
        // application's own, stored whole so the next image stands alone.
        // So is a private mapping of a file deleted since (a library
        // replaced by a package upgrade, the code of a memfd that was
        // exec'd): no path names its bytes any more, and each page reads
        // as the process sees it (the file's, or its own copy). It comes
        // back as anonymous memory with the same bytes and protection: the
        // code runs the same, but /proc/PID/maps no longer names the file
        // and processes that shared its pages now each have their own.
        vma.kind = VmaKind.ANON;
        vma.path = '';
        const read = (from: number, fd: number) => {
          const d = unreadableNamed(what, l, fd, () => ctx.pages.dump(from, fd, l.start, l.end, PAGES_MODE.all));
          vma.pages = { offset: BigInt(d.offset), runs: pairs(d.runs), fromParent: [] };
        };
        // A page file is never written once committed: the copy reads its
        // pages the process has not touched as the process would have. A
        // deleted file may still be written through another descriptor.
        if (copy && sameInCopy(l) && PAGE_FILE.test(l.path)) copy.later((fd) => read(copy.pid, fd));
        else read(pid, pagemapFd);
        vmas.push(vma);
        continue;
      } else if (l.ino !== 0n && l.path.startsWith('/')) {
        vma.kind = shared ? VmaKind.FILE_SHARED : VmaKind.FILE_PRIVATE;
        // /proc/PID/maps shows a newline in a name as \012, and a name
        // holding a backslash and 012 just so: the name read may be
        // another file's (which a restore would map instead) or none's.
        if (l.path.includes('\\012')) throw new Unsupported(`${what}: maps ${l.path}, a name holding a newline or "\\012" (the two read alike in /proc/PID/maps: which file it is is not known), which cannot be captured yet`);
        let file = fileIds.get(l.path);
        if (file === undefined) fileIds.set(l.path, (file = ctx.file(l.path, l.path, false, mappedFileStat(pid, l))));
        vma.file = file;
      }
      if (vma.kind === VmaKind.FILE_PRIVATE && l.anonKb === 0 && l.swapKb === 0 && l.pfnmap === false) {
        // Nothing written (smaps, read while frozen, counts no anonymous
        // page and none swapped): all of it is the file's, and its page
        // map is not read (most of a process's mappings: the code and
        // read-only data of every library).
        vma.pages = { offset: 0n, runs: [], fromParent: [] };
      } else if (vma.kind === VmaKind.ANON && l.anonKb === 0 && l.swapKb === 0 && l.pfnmap === false && addon().scanAny(pagemapFd, l.start, l.end) === false) {
        // Never touched: address space reserved and not used (MariaDB
        // reserves 8 TiB PROT_NONE, every thread's malloc arena 64 MiB of
        // which it uses a few pages). smaps, read while frozen, counts no
        // page of it, and one PAGEMAP_SCAN confirms that none is there,
        // not even the zero page or a guard or uffd-wp marker (which the
        // reading below refuses or drops as it always has). Nothing is
        // read: reading its page map was 8 bytes per page, 16 GiB for
        // MariaDB's reservation, in 32 MiB slices (issue 14). Whether the
        // process or its copy (--leave-running) is read, the pages are
        // the same: the copy is a fork made while frozen.
        vma.pages = { offset: 0n, runs: [], fromParent: [] };
      } else if (vma.kind === VmaKind.ANON || vma.kind === VmaKind.FILE_PRIVATE) {
        refuseBeyondPageNumbers(what, l);
        // Raw frames (pf) are one by one, their page map read whole
        // (noScan): PAGEMAP_SCAN passes over a VM_PFNMAP mapping as if it
        // had no page, where pagemap shows them.
        const mode = (vma.kind === VmaKind.ANON ? PAGES_MODE.anon : PAGES_MODE.privateFile) | (l.pfnmap ? PAGES_MODE.noScan : 0);
        const forked = sharesWith(forkParent, vma) ? forkParent : undefined;
        const inCopy = copy !== undefined && sameInCopy(l);
        if (!ctx.parent && !forked && !l.pfnmap) {
          (inCopy ? scannedInCopy : scanned).push({ vma, l, mode });
          vmas.push(vma);
          continue;
        }
        // With dirty tracking, a page not written since the parent is the
        // parent's and is not even read; an untracked mapping (null) is
        // compared page by page with the parent's copy. Which pages were
        // written is the process's, read now: the copy has no tracking,
        // and protectTracked resets the process's before it goes on.
        // Only a mapping registered before this snapshot (`uw` in its
        // VmFlags, read before the questions, whose batch registers the
        // others; readMaps's lines do not say: compared): a range registered just now, or again after the
        // application dropped it (closed its userfaultfd, mremap), holds
        // no record of what was written since the parent, whatever a
        // kernel left of its write-protect bits (review24).
        const tracked = ctx.parent && ctx.trackedPids.has(pid) && l.uffdWp === true;
        const written = tracked ? addon().scanWritten(pagemapFd, l.start, l.end, false) : null;
        const parent = written
          ? { index: new Uint32Array(0), file: new Uint32Array(0), offset: new BigUint64Array(0), written }
          : ctx.parent?.pagesFor(vpid, l.start, l.end);
        const read = (from: number, fd: number) => {
          const d = unreadableNamed(what, l, fd, () => ctx.pages.dump(from, fd, l.start, l.end, mode, parent, forked));
          vma.pages = { offset: BigInt(d.offset), runs: pairs(d.runs), fromParent: pairs(d.same) };
          if (d.shared.length) vma.pages.cowShared = pairs(d.shared);
        };
        if (inCopy) copy.later((fd) => read(copy.pid, fd));
        else read(pid, pagemapFd);
      }
      vmas.push(vma);
    }
    dumpScannedPages(ctx, pid, what, pagemapFd, scanned);
    if (copy && scannedInCopy.length) copy.later((fd) => dumpScannedPages(ctx, copy.pid, what, fd, scannedInCopy));
  } finally {
    if (pagemapFd >= 0) closeSync(pagemapFd);
    if (forkParent) closeSync(forkParent.pagemapFd);
  }
  return vmas;
}

/**
 * The file pages a lazily restored process had in its page tables when it
 * was last dumped, by its layout (touchedLayoutKey): what its run since
 * its restore touched of its page file's mappings (the application's
 * memory, mapped from the image) and of its code and read-only data. The
 * next prepared restore of the same process maps those in before its
 * release (restore/prepared.ts populateHeldMappings), each a fault after
 * the release otherwise. A hint kept in this process only (serve takes
 * the suspend's snapshot and makes the next prepare), recorded only for
 * the processes serve asked it for (recordTouchedAtDump): never in an
 * image, never trusted for anything but which pages to read ahead.
 *
 * Only for a process that maps a page file (restored lazily: serve's
 * instances): a process run from its start has touched all its memory,
 * and its code pages say nothing of what a resume needs. Pages mapped in
 * by the prepare are present at the next dump too, so the set is the
 * union of what the runs touched, bounded by MAX_TOUCHED_PAGES.
 */
const touchedPages = new Map<string, { touched: [bigint, number][]; written: [bigint, number][] }>();
/** Pages recorded as written at most for one process (recordTouchedPages):
 * 1 MiB, copied in by the next prepare (anonymous memory it holds). */
const MAX_WRITTEN_PAGES = 256;
/** Layouts remembered at most (the oldest forgotten first). */
const MAX_TOUCHED_LAYOUTS = 64;
/** Pages recorded at most for one process: 32 MiB. */
const MAX_TOUCHED_PAGES = 8192;
/** Pages of pagemap scanned at most for one process (each mapping from
 * its first page present; the rest of its mappings left out past it):
 * 256 MiB of mappings, 512 KiB read. */
const MAX_TOUCHED_SCAN = 65536;

/** Which recorded touched pages are a process's: its virtual PID and where
 * its first executable file mapping is, and of which file (device and
 * inode: two non-PIE binaries at 0x400000 on two filesystems are two):
 * the same after a restore, which puts every mapping back at its address;
 * different for another application, its binary placed elsewhere by ASLR. */
export function touchedLayoutKey(vpid: number, maps: readonly MapsLine[]): string | undefined {
  const exe = maps.find((l) => l.perms === 'r-xp' && l.ino !== 0n);
  return exe ? `${vpid} ${exe.start.toString(16)} ${exe.major}:${exe.minor} ${exe.ino}` : undefined;
}

/** A mapping whose touched pages are recorded and read ahead: private,
 * readable, of a file; its page file's, or not writable (code, read-only
 * data), whose pages are the file's until written. */
export function touchedCandidate(l: MapsLine): boolean {
  return l.perms[0] === 'r' && l.perms[3] === 'p' && l.ino !== 0n && l.path.startsWith('/') && (PAGE_FILE.test(l.path) || l.perms[1] !== 'w');
}

/** The processes whose next dump records their touched pages
 * (recordTouchedPages), by system PID, with their start time (a PID
 * reused by another process is not one of them): only the prepared
 * instances of `appshot serve` with APPSHOT_PREPARED_POPULATE=1, named by
 * serve's hold (restore/prepared.ts populateHeldMappings), whose next
 * suspend is serve's. No other snapshot the process (or the engine
 * hosting serve) takes, of a clone or of an application restored lazily
 * by the command line, spends time of its frozen window on a record that
 * nothing would read. */
const recordAtDump = new Map<number, { startTime: number; putThere?: ReadonlySet<number> }>();
/** Processes named at most (the oldest forgotten first): an instance
 * ended without a suspend is never dumped. */
const MAX_RECORDED_PROCESSES = 256;
/** `putThere`: the pages its prepare mapped or copied in (by page
 * number, address / 4096), present at its dump whether its run touched
 * them or not; recorded only in what the caps leave once the others are
 * (recordTouchedPages). */
export function recordTouchedAtDump(pid: number, startTime: number, putThere?: ReadonlySet<number>): void {
  recordAtDump.delete(pid);
  recordAtDump.set(pid, putThere ? { startTime, putThere } : { startTime });
  for (const oldest of recordAtDump.keys()) {
    if (recordAtDump.size <= MAX_RECORDED_PROCESSES) break;
    recordAtDump.delete(oldest);
  }
}

function recordTouchedPages(pid: number, vpid: number, maps: readonly MapsLine[], pagemapFd: number): void {
  const asked = recordAtDump.get(pid);
  if (asked === undefined) return;
  recordAtDump.delete(pid);
  if (readStat(pid)?.startTime !== asked.startTime || !maps.some((l) => PAGE_FILE.test(l.path))) return;
  const key = touchedLayoutKey(vpid, maps);
  if (!key) return;
  // The pages present, and of them those written, each split into those
  // its run brought in and those its prepare put there (asked.putThere:
  // present at this dump whether the run touched them or not, and a page
  // copied in no longer the file's, as if written). The first go first
  // into the caps: else the records, once full, would only ever repeat
  // the pages the last prepare put there, in address order, and never
  // learn what a run touches further on.
  // (By page number: a user address fits a double; no bigint per page.)
  const fresh: number[] = [];
  const carried: number[] = [];
  const freshWritten: number[] = [];
  const carriedWritten: number[] = [];
  let scanned = 0;
  for (const l of maps) {
    if (!touchedCandidate(l) || scanned >= MAX_TOUCHED_SCAN) continue;
    // From its first page present (one PAGEMAP_SCAN, where the kernel has
    // it): a mapping with none costs nothing of the scan's cap, and one
    // larger than what is left of it (a big heap) is scanned from there,
    // as far as the cap goes, not left out whole.
    let from = l.start;
    let got: number;
    let entries: Buffer;
    try {
      const first = addon().scanFirst(pagemapFd, l.start, l.end);
      if (first === false) continue;
      if (first !== null) from = first;
      entries = Buffer.alloc(Math.min(Number((l.end - from) / PAGE), MAX_TOUCHED_SCAN - scanned) * 8);
      got = readSync(pagemapFd, entries, 0, entries.length, Number((from / PAGE) * 8n));
    } catch {
      continue; // a hint only
    }
    const pages = entries.length / 8;
    scanned += pages;
    // Of a writable mapping of the page file, the pages present and not
    // the file's (bit 61 clear): copied on a write since the restore.
    const writable = PAGE_FILE.test(l.path) && l.perms[1] === 'w';
    for (let k = 0; k * 8 + 8 <= got; k++) {
      // Bit 63 of each entry (the top bit of its last byte): present.
      const last = entries[k * 8 + 7];
      if ((last & 0x80) === 0) continue;
      const at = Number(from / PAGE) + k;
      const put = asked.putThere?.has(at) ?? false;
      (put ? carried : fresh).push(at);
      if (writable && (last & 0x20) === 0) (put ? carriedWritten : freshWritten).push(at);
    }
  }
  const asRuns = (chosen: number[]) => {
    const runs: [number, number][] = [];
    for (const at of chosen.sort((a, b) => a - b)) {
      const last = runs.at(-1);
      if (last && last[0] + last[1] === at) last[1]++;
      else runs.push([at, 1]);
    }
    return runs.map(([at, n]): [bigint, number] => [BigInt(at) * PAGE, n]);
  };
  const written = asRuns([...freshWritten, ...carriedWritten].slice(0, MAX_WRITTEN_PAGES));
  const runs = asRuns([...fresh, ...carried].slice(0, MAX_TOUCHED_PAGES));
  touchedPages.delete(key);
  touchedPages.set(key, { touched: runs, written });
  for (const oldest of touchedPages.keys()) {
    if (touchedPages.size <= MAX_TOUCHED_LAYOUTS) break;
    touchedPages.delete(oldest);
  }
}

/** The pages recordTouchedPages recorded for the process of this layout
 * at its last dump, as [address, pages] runs: those present, and those of
 * its page file's writable mappings written since its restore; undefined
 * if none. */
export function recordedTouchedPages(vpid: number, maps: readonly MapsLine[]): { touched: readonly [bigint, number][]; written: readonly [bigint, number][] } | undefined {
  const key = touchedLayoutKey(vpid, maps);
  return key ? touchedPages.get(key) : undefined;
}

/** The image numbers a mapping's pages on 32 bits (PageRef runs): 16 TiB. */
const MAX_MAPPING_PAGES = 0xffffffffn;

/**
 * A mapping of 16 TiB or more with pages in it (AddressSanitizer's shadow
 * memory is 20 TiB read-write) cannot be numbered: its pages past 16 TiB
 * would be stored at the wrong place and restored there, with success
 * said (measured: a 20 TiB mapping came back with a written page lost).
 * Refused, naming it. One never touched is stored as nothing, before this.
 */
function refuseBeyondPageNumbers(what: string, l: MapsLine): void {
  if ((l.end - l.start) / PAGE <= MAX_MAPPING_PAGES) return;
  const tib = Number((l.end - l.start) >> 30n) / 1024;
  throw new Unsupported(`${what}: the memory at 0x${l.start.toString(16)}-0x${l.end.toString(16)} (${l.path || 'anonymous'}) is ${tib.toFixed(1)} TiB with pages in it; an image numbers a mapping's pages on 32 bits (16 TiB)`);
}

interface Scanned {
  vma: Vma;
  l: MapsLine;
  mode: number;
}

/** The pages of mappings `list` (in ascending order, none with a parent or
 * a process forked from) into their Vma: in one call and one PAGEMAP_SCAN
 * where the kernel has it (a tiny application's ~12 mappings cost a call
 * and a pagemap read each), else one by one. */
function dumpScannedPages(ctx: DumpContext, pid: number, what: string, pagemapFd: number, list: Scanned[]): void {
  if (!list.length) return;
  const bounds = new BigUint64Array(list.length * 2);
  const modes = new Uint8Array(list.length);
  list.forEach((s, i) => {
    bounds[2 * i] = s.l.start;
    bounds[2 * i + 1] = s.l.end;
    modes[i] = s.mode;
  });
  let d: ScannedPages | undefined;
  try {
    d = ctx.pages.dumpScanned(pid, pagemapFd, bounds, modes);
  } catch (e) {
    const i = (e as { index?: number }).index;
    // Named as a mapping read alone names it.
    if (i !== undefined && list[i]) unreadableNamed(what, list[i].l, pagemapFd, () => { throw e; });
    throw e;
  }
  if (!d) {
    for (const s of list) {
      const one = unreadableNamed(what, s.l, pagemapFd, () => ctx.pages.dump(pid, pagemapFd, s.l.start, s.l.end, s.mode));
      s.vma.pages = { offset: BigInt(one.offset), runs: pairs(one.runs), fromParent: [] };
    }
    return;
  }
  let at = 0;
  list.forEach((s, i) => {
    const n = d.counts[i] * 2;
    s.vma.pages = { offset: BigInt(d.offsets[i]), runs: Array.from(d.runs.subarray(at, at + n)), fromParent: [] };
    at += n;
  });
}

/** pagemap's bit for a guard page (PM_GUARD_REGION, Linux 6.15). */
const PM_GUARD_REGION = 1n << 58n;

/** The first guard page of mapping `l`, as pagemap shows it, if any. */
function guardPage(pagemapFd: number, l: MapsLine): bigint | undefined {
  const pages = Number((l.end - l.start) / 4096n);
  const buf = Buffer.alloc(Math.min(pages, 1 << 16) * 8);
  for (let at = 0; at < pages; at += buf.length / 8) {
    const n = readSync(pagemapFd, buf, 0, Math.min(buf.length, (pages - at) * 8), Number((l.start / 4096n + BigInt(at)) * 8n));
    for (let i = 0; i + 8 <= n; i += 8) if (buf.readBigUInt64LE(i) & PM_GUARD_REGION) return l.start + BigInt(at + i / 8) * 4096n;
    if (n <= 0) break;
  }
  return undefined;
}

/** Runs `read` (a copy of a mapping's pages); a page the kernel will not
 * read (EIO, EFAULT) refuses the snapshot naming the mapping, rather than
 * with the bare error. A private mapping of a deleted file reads so past
 * the file's end (truncated under the mapping): there the process would
 * take SIGBUS, which anonymous memory cannot give it back. */
function unreadableNamed<T>(what: string, l: MapsLine, pagemapFd: number, read: () => T): T {
  try {
    return read();
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EIO' && code !== 'EFAULT') throw e;
    let guard: bigint | undefined;
    try {
      guard = guardPage(pagemapFd, l);
    } catch {
      // only the message is the poorer
    }
    const why =
      guard !== undefined
        ? `: its page at 0x${guard.toString(16)} is a guard page (MADV_GUARD_INSTALL)`
        : (deletedLines.get(l) ?? l.path.endsWith(DELETED))
          ? ', past the end of the file (truncated under the mapping before it was deleted)'
          : '';
    throw new Unsupported(`${what}: the memory at 0x${l.start.toString(16)}-0x${l.end.toString(16)} (${l.path || 'anonymous'}) cannot be read${why}, which cannot be captured`);
  }
}

export function countPages(runs: number[]): number {
  let n = 0;
  for (let i = 1; i < runs.length; i += 2) n += runs[i];
  return n;
}

/* ---- restore ---------------------------------------------------------- */

const PROT_WRITE = 2;
const MAP = { SHARED: 0x01, PRIVATE: 0x02, DROPPABLE: 0x08, FIXED: 0x10, ANONYMOUS: 0x20, GROWSDOWN: 0x100, NORESERVE: 0x4000 } as const;
const O_RDONLY = 0;
const O_RDWR = 2;
const MREMAP_MAYMOVE = 1;
const MREMAP_FIXED = 2;

interface Range {
  start: bigint;
  end: bigint;
}

/** An address where `size` bytes overlap none of `used`. */
export function freeAddress(used: Range[], size: bigint): bigint {
  for (const base of [0x100000000000n, 0x200000000000n, 0x300000000000n, 0x10000000n, 0x600000000000n]) {
    const end = base + size;
    if (!used.some((u) => u.start < end && base < u.end)) return base;
  }
  throw new Error('no free address range for the restore');
}

/** What memory restore needs from the driver. */
export interface MemorySources {
  /** Page files of the image chain, newest first, open in this process. */
  pageFds: number[];
  /** Their checks still going on (format 3, LoadedImage.pagesCheck), if
   * any: no chunk is copied before it is checked. */
  pageChecks?: ({ check: PagesCheck; chunkSize: number } | undefined)[];
  /** Their paths, for a lazy restore to map them into the process. */
  pagePaths: string[];
  lazy: boolean;
  /** With lazy: mappings that are copied all the same. */
  eager?: (vpid: number, v: Vma) => boolean;
  /** With lazy: the stored pages of a mapping mapped lazily that are
   * copied in all the same (page indexes in `v`, ascending): those the
   * application is likely to write as soon as it runs (serve's prepared
   * resume, prepared.ts prefaultPages), which would each cost it a
   * copy-on-write fault. */
  prefault?: (vpid: number, v: Vma) => readonly number[] | undefined;
  /** The file to map for a file mapping (a clone's own copy), by default
   * the image's. */
  mappedPath?: (vpid: number, v: Vma) => string;
  /** A root restore: `path` opened here with `flags` as process `vpid`
   * would open it (fsident.ts openToMapAs), a descriptor of ours kept
   * until the restore ends. The restored process runs with the
   * restorer's rights until its own come last: it is handed this
   * descriptor to map, never the name, which it would open as root
   * (review29 H3), and which the application's user could point
   * elsewhere between a check and that open. Throws what the process's
   * credentials do not allow. */
  openToMap?: (vpid: number, path: string, flags: number) => number;
  /** Per SharedMemory index: a memfd in this process holding it. */
  sharedFd(index: number): number;
  /** The new system shmid of a virtual one. */
  shmSystemId(vid: number): number;
  /** The application's old and new tables files. */
  tables: { old: string; new: string };
  /** Opens `fd` of this process inside the remote one; returns its number there. */
  transfer(r: RemoteProcess, fd: number): number;
  /** Pages of `vpid` inherited from the parent chain, by address. */
  inherited(vpid: number): Map<bigint, { file: number; offset: bigint }>;
  /** The copies of what `v` of `vpid` inherits, if worked out ahead of
   * time (inheritedCopyRuns over the same chain); otherwise they are
   * worked out here from inherited(). */
  inheritedRuns?(vpid: number, v: Vma): CopyRun[] | undefined;
  /** A clone: memory is given what a fork child gets (forkTreatment). */
  asFork?: boolean;
  /** The process `vpid` was forked from in this restore, when that one's
   * memory was filled before the fork: its mappings sharing pages with it
   * copy-on-write (PageRef.cowShared) are kept, not made again. */
  forkedFrom?(vpid: number): { vpid: number; vmas: Vma[] } | undefined;
  /** Told of each slice of page data copied (the restore driver's
   * progress). */
  copied?: (bytes: number) => void;
  /** Awaited between two slices of one process's copy: where the restore
   * driver hears Ctrl-C, which a copy of gigabytes would otherwise keep
   * waiting until its end. */
  betweenSlices?: () => Promise<void>;
}

/** Page data copied in one native call at most: progress moves between
 * slices, and process_vm_writev copies less than 2 GiB per call anyway. */
const COPY_SLICE = 32 << 20;

/** How long one look at a page file's check may hold the event loop. */
const CHECK_LOOK_MS = 10;

/**
 * The page data one process is given, gathered run by run ([page file
 * index, file offset, address, length]) into slices, then copied: one
 * native call per slice maps each page file once and writes hundreds of
 * runs with one process_vm_writev, where a call per run cost a mapping and
 * a copy each.
 */
class PageCopy {
  private readonly slices: number[][] = [];
  private runs: number[] = [];
  private bytes = 0;

  constructor(
    private readonly pid: number,
    private readonly vpid: number,
    private readonly src: MemorySources,
  ) {}

  add(file: number, offset: bigint, addr: bigint, len: bigint): void {
    for (let at = 0n; at < len; ) {
      const n = Math.min(COPY_SLICE - this.bytes, Number(len - at));
      this.runs.push(file, Number(offset + at), Number(addr + at), n);
      this.bytes += n;
      at += BigInt(n);
      if (this.bytes >= COPY_SLICE) this.close();
    }
  }

  private close(): void {
    if (this.runs.length) this.slices.push(this.runs);
    this.runs = [];
    this.bytes = 0;
  }

  async run(): Promise<void> {
    this.close();
    for (const [i, runs] of this.slices.entries()) {
      if (i > 0) await this.src.betweenSlices?.();
      const checks = this.src.pageChecks;
      await this.checked(runs);
      try {
        addon().writePageRuns(this.pid, this.src.pageFds, new Float64Array(runs), checks?.map((c) => c?.check));
      } catch (e) {
        const err = e as Error & { code?: string; chunk?: number; file?: number; errno?: number };
        if ((err.code === 'EBADMSG' || err.code === 'ECHECK') && err.file !== undefined && checks?.[err.file])
          throw pagesCheckFailure(err.chunk!, checks[err.file]!.chunkSize, err.errno ?? 0);
        throw e;
      }
      let bytes = 0;
      for (let j = 3; j < runs.length; j += 4) bytes += runs[j];
      this.src.copied?.(bytes);
      killPoint(`restore: process ${this.vpid} slice ${i + 1}`);
    }
  }

  /**
   * Until every chunk `runs` reads of a page file still being checked is
   * checked, the event loop turning: writePageRuns waits for them too, but
   * on the engine's only JavaScript thread, which then answers no client
   * (not even this restore's Ctrl-C) until the check gets there, however
   * long that takes (review r363 #7: a run in the middle of a page file
   * with a large hole held it for seconds). After this, its wait returns
   * at once. A chunk that failed is refused as writePageRuns would.
   */
  private async checked(runs: number[]): Promise<void> {
    const checks = this.src.pageChecks;
    if (!checks?.some((c) => c)) return;
    let told = false;
    for (let j = 0; j + 3 < runs.length; j += 4) {
      const c = checks[runs[j]];
      if (!c || runs[j + 3] <= 0) continue;
      for (;;) {
        const verdict = c.check.wait(CHECK_LOOK_MS, runs[j + 1], runs[j + 3]);
        if (verdict.state === 'good') break;
        if (verdict.state === 'bad') throw pagesCheckFailure(verdict.chunk, c.chunkSize, verdict.errno);
        if (!told && process.env.APPSHOT_DEBUG) process.stderr.write(`appshot: process ${this.vpid}: page data waits for the check of page file ${runs[j]} at ${runs[j + 1]}\n`);
        told = true;
        await new Promise((resolve) => setImmediate(resolve));
        await this.src.betweenSlices?.();
      }
    }
  }
}

/** Whether a mapping's stored pages are mapped from the page file
 * (copy-on-write, read when touched) rather than copied in. */
function mappedLazily(src: MemorySources, vpid: number, v: Vma): boolean {
  return src.lazy && !src.eager?.(vpid, v) && lazyMappable(v);
}

/** Whether a lazy restore maps a mapping's stored pages from the page file
 * (what it copies whatever the restore: mappedLazily). */
export function lazyMappable(v: Vma): boolean {
  // The stack stays anonymous even when lazy: /proc/PID/cmdline and
  // environ are read only from anonymous memory (FOLL_ANON).
  // Memory marked MADV_WIPEONFORK or made MAP_DROPPABLE is copied: the
  // kernel takes either only on anonymous memory, which pages mapped
  // from a file are not; nor is a mapping that grows down (MAP_GROWSDOWN)
  // one once pages of a file are mapped over it (VmFlags "gd" goes). Pages
  // from a parent image are copied too.
  return (
    v.kind === VmaKind.ANON &&
    v.special !== '[stack]' &&
    !(v.pages?.fromParent.length) &&
    !v.vmFlags.includes('wf') &&
    !v.vmFlags.includes('dp') &&
    !v.vmFlags.includes('gd')
  );
}

/** (first page, count) pair lists, merged into sorted [first, end) intervals. */
function intervals(...lists: number[][]): [number, number][] {
  const all: [number, number][] = [];
  for (const l of lists) for (let i = 0; i < l.length; i += 2) all.push([l[i], l[i] + l[i + 1]]);
  all.sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [];
  for (const [a, b] of all) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** The intervals of `a` not in `b` (both sorted and merged). */
function subtract(a: [number, number][], b: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  let j = 0;
  for (const [first, end] of a) {
    let s = first;
    while (j < b.length && b[j][1] <= s) j++;
    for (let k = j; s < end; k++) {
      if (k >= b.length || b[k][0] >= end) {
        out.push([s, end]);
        break;
      }
      if (b[k][0] > s) out.push([s, b[k][0]]);
      s = Math.max(s, b[k][1]);
    }
  }
  return out;
}

const pagesHeld = (v: Vma) => intervals(v.pages?.runs ?? [], v.pages?.fromParent ?? [], v.pages?.cowShared ?? []);

/** A descriptor of ours holding SharedMemory `index` of the image, made
 * and filled the first time a process maps it: every mapping of it maps
 * the same memory again. A deleted file or memfd that a descriptor holds
 * too is that descriptor's file (one object, as it was); a memfd mapped
 * only is a memfd of its name and seals; anything else a memfd of ours. */
export function sharedMemoryFd(h: RestoreContext, index: number): number {
  return h.once(`shared memory ${index}`, () => {
    const obj = h.image.sharedMemory[index];
    const held = h.image.files.findIndex((f) => f.deleted && f.ino === obj.ino && f.dev === obj.dev && obj.path === `${f.path} (deleted)`);
    if (held >= 0) return deletedFileAnchor(h, held);
    if (obj.path.startsWith('/memfd:')) return memfdLike(h, obj, obj.size, (fd) => h.copyPages(fd, obj.pages));
    const fd = h.keep(addon().memfd(`appshot-shared-${index}`, Number(obj.size)));
    h.copyPages(fd, obj.pages);
    return fd;
  });
}

/** Runs of stored pages as [address, file offset, length] triples. */
function storedRuns(vma: Vma): [bigint, bigint, bigint][] {
  const out: [bigint, bigint, bigint][] = [];
  const ref = vma.pages;
  if (!ref) return out;
  let at = ref.offset;
  for (let i = 0; i < ref.runs.length; i += 2) {
    const len = BigInt(ref.runs[i + 1]) * PAGE;
    out.push([vma.start + BigInt(ref.runs[i]) * PAGE, at, len]);
    at += len;
  }
  return out;
}

/**
 * Replaces the whole address space of the remote process (a seed) with the
 * image's: everything of its own is unmapped but the vDSO, which is moved
 * to where the image had it, then each VMA is mapped and filled.
 */
export async function restoreMemory(r: RemoteProcess, vmas: Vma[], vpid: number, src: MemorySources, seedMaps?: MapsLine[]): Promise<void> {
  const MADV_DONTNEED = 4;
  checkPolicyNodes(vmas, vpid);
  // The seed's mappings (`seedMaps`: read by the caller since its last
  // change but for the scratch area, which is kept by its address).
  const current = seedMaps ?? readMaps(r.pid);
  // Mappings that share pages copy-on-write with the parent this process
  // was just forked from: inherited as they are, with the parent's pages.
  const forker = src.forkedFrom?.(vpid);
  const inheritedFrom = new Map<Vma, Vma>();
  for (const v of vmas) {
    if (!v.pages?.cowShared?.length) continue;
    const pv = forker?.vmas.find((u) => u.kind === VmaKind.ANON && u.start === v.start && u.end === v.end);
    if (!pv) throw new Error(`the mapping at 0x${v.start.toString(16)} shares pages with a parent that was not restored before it`);
    inheritedFrom.set(v, pv);
  }
  // Everything of the seed's goes but the vDSO, its data pages, our
  // scratch area and what is inherited: one munmap per gap between those,
  // not one per mapping.
  const keep = [
    ...current.filter((m) => ['[vdso]', '[vvar]', '[vvar_vclock]'].includes(m.path)),
    ...(r.scratchRange ? [r.scratchRange] : []),
    ...[...inheritedFrom.keys()].map((v) => ({ start: v.start, end: v.end })),
  ].sort((a, b) => (a.start < b.start ? -1 : 1));
  const TASK_SIZE = 0x7ffffffff000n;
  let from = 0x10000n; // mmap_min_addr
  const unmapping = r.batch();
  for (const k of [...keep, { start: TASK_SIZE, end: TASK_SIZE }]) {
    if (k.start > from) unmapping.add('unmapping the seed\'s memory', SYS.munmap, [from, k.start - from]);
    from = k.end;
  }
  // With the batch code, the moves below go in the same stop.
  if (!r.batched) unmapping.run();

  // The vDSO and its data pages move together, keeping their layout.
  let vdsoAt: Range | undefined;
  const moves = current.filter((m) => m.path === '[vdso]' || m.path === '[vvar]' || m.path === '[vvar_vclock]');
  const targets = moves.map((m) => vmas.find((v) => v.path === m.path));
  if (moves.some((m, i) => targets[i] && targets[i]!.start !== m.start)) {
    const used: Range[] = [...vmas, ...current, { start: r.scratch, end: r.scratch + BigInt(RemoteProcess.scratchSize) }];
    let temp = freeAddress(used, 0x100000n) + 0x10000n;
    // Parked out of the way, then each to its place (MREMAP_FIXED puts it
    // exactly there). From the batch code, whose own `syscall` does not
    // move, all in one stop; one at a time otherwise, following the vDSO,
    // whose `syscall` instruction injected calls run from.
    const moving = r.batched ? unmapping : undefined;
    const move = (what: string, from: bigint, len: bigint, to: bigint, vdso: boolean) => {
      if (moving) moving.add(`moving ${what}`, SYS.mremap, [from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to]);
      else {
        r.call(`moving ${what}`, SYS.mremap, [from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to]);
        if (vdso) r.findSyscall({ start: to, end: to + len });
      }
    };
    // Straight to their places when no place overlaps where any of them
    // is now (as a rule: the seed's are wherever its kernel put them,
    // apart from the image's): three moves, not six (each ~50 us of the
    // seed's first stop).
    const clear = targets.every((t) => t && moves.every((m) => !(t.start < m.end && m.start < t.end)));
    const parked = moves.map((m) => {
      const len = m.end - m.start;
      if (clear) return { path: m.path, start: m.start, len };
      move(m.path, m.start, len, temp, m.path === '[vdso]');
      temp += len;
      return { path: m.path, start: temp - len, len };
    });
    parked.forEach((p, i) => {
      const t = targets[i];
      if (p.path === '[vdso]') vdsoAt = { start: t ? t.start : p.start, end: (t ? t.start : p.start) + p.len };
      if (!t) return;
      if (t.end - t.start !== p.len) throw new Error(`${p.path} is ${p.len} bytes here but ${t.end - t.start} in the image`);
      move(p.path, p.start, p.len, t.start, p.path === '[vdso]');
    });
  }

  // The files to map opened, every mapping made (writable where pages go
  // in), the page data written from here, then each mapping given its own
  // protection and advice and the files closed (finishing, below). With
  // the batch code, if it all fits the scratch area, the seed's memory
  // goes, the files are opened and everything is mapped in one stop (each
  // mmap taking its descriptor from the result of the open before it);
  // else a batch for the seed's memory, as many for the files as their
  // paths take, and one for the mappings.
  /** `ours`: opened here as the process (openToMap), handed over; else
   * opened by the process by name. */
  const opens: { path: string; flags: number; ours?: number }[] = [];
  const openIndex = new Map<string, number>();
  const openInProcess = (path: string, flags: number): number => {
    const key = `${flags}:${path}`;
    let i = openIndex.get(key);
    if (i === undefined) {
      i = opens.push({ path, flags }) - 1;
      openIndex.set(key, i);
    }
    return i;
  };
  const mapped = vmas.filter((v) => v.kind !== VmaKind.VDSO && v.kind !== VmaKind.VVAR && v.kind !== VmaKind.VSYSCALL && (!src.asFork || forkTreatment(v) !== 'absent'));
  const plans = mapped.map((v) => planVma(v, vpid, src, inheritedFrom, openInProcess));
  // Each file the process is to map, opened here as its credentials find
  // it now (not appshot's own: the new tables, the page files of a lazy
  // restore; each opened once a restore: openToMap remembers), and handed
  // over: what is mapped is the very file so opened.
  if (src.openToMap)
    for (const p of plans) {
      const o = p.file === undefined ? undefined : opens[p.file];
      if (!o || o.path === src.tables.new || o.ours !== undefined) continue;
      try {
        o.ours = src.openToMap(vpid, o.path, o.flags);
      } catch (e) {
        refusedAsProcess(e, `process ${vpid}: ${p.what}:`);
      }
    }
  killPoint('restore: mappings checked');
  /** The mapping calls; `fd`: the descriptor argument (4) is that of open
   * `fd.open`, or the shared memory handed over for plan `fd.shared`. */
  type MapCall = { what: string; nr: number; args: (bigint | number)[]; fd?: { open: number } | { shared: number }; mask?: Buffer };
  const mapCalls: MapCall[] = [];
  const add = (what: string, nr: number, args: (bigint | number)[], fd?: MapCall['fd']) => mapCalls.push(fd ? { what, nr, args, fd } : { what, nr, args });
  /** A call with `mask` put in the scratch area as its argument 3 (mbind's
   * node mask): put when the batch that makes it is built. */
  const withMask = (c: MapCall): (bigint | number)[] => (c.mask ? c.args.map((a, j) => (j === 3 ? r.put(c.mask!) : a)) : c.args);
  plans.forEach((p, i) => {
    const { v, len, prot, what, parentVma } = p;
    if (parentVma) {
      // Inherited with the parent's pages: what this process did not have
      // of them goes (zeros again, as the parent's restore made them from
      // anonymous memory or, lazily, from the page file); its own pages
      // are written or mapped below, each breaking the sharing of one page.
      add(what, SYS.mprotect, [v.start, len, prot]);
      const parentLazy = mappedLazily(src, forker!.vpid, parentVma);
      for (const [first, end] of subtract(pagesHeld(parentVma), pagesHeld(v))) {
        const at = v.start + BigInt(first) * PAGE;
        const n = BigInt(end - first) * PAGE;
        if (parentLazy) add(what, SYS.mmap, [at, n, prot, MAP.PRIVATE | MAP.FIXED | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0]);
        else add(what, SYS.madvise, [at, n, MADV_DONTNEED]);
      }
    } else switch (v.kind) {
      case VmaKind.ANON:
        add(what, SYS.mmap, [v.start, len, prot, (p.droppable ? MAP.DROPPABLE : MAP.PRIVATE) | MAP.FIXED | MAP.ANONYMOUS | p.growsdown | MAP.NORESERVE, -1, 0]);
        break;
      case VmaKind.FILE_PRIVATE:
      case VmaKind.FILE_SHARED:
        add(what, SYS.mmap, [v.start, len, prot, (v.kind === VmaKind.FILE_SHARED ? MAP.SHARED : MAP.PRIVATE) | MAP.FIXED, -1, v.pgoff], { open: p.file! });
        break;
      case VmaKind.SHARED_ANON:
        add(what, SYS.mmap, [v.start, len, prot, MAP.SHARED | MAP.FIXED, -1, v.pgoff], { shared: i });
        add('closing', SYS.close, [-1], { shared: i });
        break;
      case VmaKind.SYSV_SHM: {
        const SHM_RDONLY = 0o10000;
        add(what, SYS.shmat, [src.shmSystemId(v.shmVid), v.start, v.prot & PROT_WRITE ? 0 : SHM_RDONLY]);
        break;
      }
    }
    // Copy-on-write from the page file: nothing is read until touched.
    if (p.lazy) for (const [addr, off, n] of p.own) add(what, SYS.mmap, [addr, n, v.prot, MAP.PRIVATE | MAP.FIXED, -1, off], { open: p.pageFile! });
    // Its NUMA policy, over all of it once mapped (an mmap over a part
    // would drop it there), before any page is written. A mapping
    // inherited from the parent has the
    // parent's policy: none (MPOL_DEFAULT) where this process's has none
    // (the parent's own, given after the fork, is not the child's;
    // undefined is none here: a process not asked has never called
    // mbind, nor had a parent that did before forking it).
    const policy = v.mempolicy ?? (parentVma?.mempolicy ? { mode: 0, nodes: Buffer.alloc(0) } : undefined);
    if (policy) {
      const empty = !policy.nodes.some((b) => b !== 0) || (policy.mode & 0x1fff) === MPOL_LOCAL;
      const { mask, maxnode } = mempolicyMask(policy);
      mapCalls.push({ what: `${what}: its NUMA policy ${policyText(policy)} (mbind)`, nr: NR_mbind, args: [v.start, len, policy.mode, 0, empty ? 0 : maxnode, 0], ...(empty ? {} : { mask }) });
    }
  });
  const shared = plans.flatMap((p, i) => (p.v.kind === VmaKind.SHARED_ANON && !p.parentVma ? [i] : []));
  /** The opens whose descriptor is ours, handed over (openToMap). */
  const handedOpens = opens.flatMap((o, i) => (o.ours === undefined ? [] : [i]));
  const pathRoom = opens.reduce((n, o) => n + (o.ours === undefined ? (Buffer.byteLength(o.path) + 1 + 15) & ~15 : 0), 0) +
    mapCalls.reduce((n, c) => n + (c.mask ? (c.mask.length + 15) & ~15 : 0), 0);
  const entries = unmapping.length + opens.length + 2 * shared.length + 2 + mapCalls.length;
  const fds: number[] = [];
  if (r.batched && pathRoom + 64 * (entries + 1) + 4096 < r.room()) {
    const making = unmapping;
    const opened = opens.map((o) => (o.ours === undefined ? making.add(`opening ${o.path}`, SYS.open, [r.str(o.path), o.flags | 0o2000000, 0]) : -1));
    // Files opened here as the process, and shared anonymous memory: our
    // descriptors taken by pidfd_getfd (takeDescriptors) with one pidfd,
    // mapped, then closed there.
    const taken = new Map<number, number>();
    if (shared.length || handedOpens.length) {
      const got = takeDescriptors(making, [
        ...handedOpens.map((i) => ({ what: `taking ${opens[i].path} (pidfd_getfd)`, fd: opens[i].ours! })),
        ...shared.map((i) => ({ what: 'taking shared memory (pidfd_getfd)', fd: src.sharedFd(plans[i].v.sharedMemory) })),
      ]);
      handedOpens.forEach((i, n) => (opened[i] = got[n]));
      shared.forEach((i, n) => taken.set(i, got[handedOpens.length + n]));
    }
    for (const c of mapCalls) {
      if (!c.fd) making.add(c.what, c.nr, withMask(c));
      else making.add(c.what, c.nr, c.args, 'open' in c.fd ? { call: opened[c.fd.open], arg: 4 } : { call: taken.get(c.fd.shared)!, arg: c.nr === SYS.close ? 0 : 4 });
    }
    const results = making.run();
    if (vdsoAt) r.findSyscall(vdsoAt);
    fds.push(...opened.map((i) => Number(results[i])));
  } else {
    if (r.batched) {
      unmapping.run();
      if (vdsoAt) r.findSyscall(vdsoAt);
    }
    // As many paths a batch as the scratch area holds with room for the
    // table (a process may map thousands of files).
    const byName = opens.flatMap((o, i) => (o.ours === undefined ? [i] : []));
    for (let n = 0; n < byName.length; ) {
      r.reset();
      const opening = r.batch();
      const batched: number[] = [];
      while (n < byName.length && (opening.length === 0 || r.room() > Buffer.byteLength(opens[byName[n]].path) + 1 + 65536)) {
        const o = opens[byName[n]];
        opening.add(`opening ${o.path}`, SYS.open, [r.str(o.path), o.flags | 0o2000000, 0]);
        batched.push(byName[n++]);
      }
      opening.run().forEach((fd, j) => (fds[batched[j]] = Number(fd)));
    }
    // Files opened here as the process: handed over a thousand a stop
    // (one pidfd each), well within the scratch area's table, not three
    // stops a file as transfer() would take.
    for (let n = 0; n < handedOpens.length; n += 1000) {
      r.reset();
      const taking = r.batch();
      const chunk = handedOpens.slice(n, n + 1000);
      const got = takeDescriptors(taking, chunk.map((i) => ({ what: `taking ${opens[i].path} (pidfd_getfd)`, fd: opens[i].ours! })));
      const results = taking.run();
      chunk.forEach((i, j) => (fds[i] = Number(results[got[j]])));
    }
    // Descriptors of shared anonymous memory, handed over one by one.
    const sharedFds = new Map(shared.map((i) => [i, src.transfer(r, src.sharedFd(plans[i].v.sharedMemory))]));
    let mapping = r.batch();
    let pending = 0;
    for (const c of mapCalls) {
      // Each NUMA mask is put in scratch memory, beside the batch's table
      // (64 bytes a call): a batch that would not hold the next mask with
      // its table runs first (thousands of mbind'ed mappings may be why
      // this path was taken).
      if (c.mask && pending && r.room() < ((c.mask.length + 15) & ~15) + 64 * (pending + 2) + 4096) {
        mapping.run();
        r.reset();
        mapping = r.batch();
        pending = 0;
      }
      pending++;
      const fd = !c.fd ? undefined : 'open' in c.fd ? fds[c.fd.open] : sharedFds.get(c.fd.shared)!;
      mapping.add(c.what, c.nr, fd === undefined ? withMask(c) : c.nr === SYS.close ? [fd] : c.args.map((a, j) => (j === 4 ? fd : a)));
    }
    mapping.run();
  }

  let inherited: Map<bigint, { file: number; offset: bigint }> | undefined;
  const copy = new PageCopy(r.pid, vpid, src);
  for (const p of plans) {
    const { v } = p;
    if (!p.lazy) for (const [addr, off, n] of p.own) copy.add(0, off, addr, n);
    for (const [addr, off, n] of p.prefaulted) copy.add(0, off, addr, n);
    if (p.hasInherited) {
      const runs = src.inheritedRuns?.(vpid, v) ?? inheritedCopyRuns(v, (inherited ??= src.inherited(vpid)));
      for (const run of runs) copy.add(run.file, run.offset, run.addr, run.len);
    }
  }
  await copy.run();

  const finishing = r.batch();
  for (const { v, len, prot, what, parentVma } of plans) {
    if (prot !== v.prot || parentVma) finishing.add(what, SYS.mprotect, [v.start, len, v.prot]);
    for (const flag of v.vmFlags) {
      const advice = Object.hasOwn(KEPT_VM_FLAGS, flag) ? KEPT_VM_FLAGS[flag] : undefined;
      if (advice !== undefined) finishing.add(`${what}: madvise ${flag}`, SYS.madvise, [v.start, len, advice]);
    }
    // Locked last, once its data is in: mlock faults every page in (all of
    // a --lazy mapping's too, as they were resident when it was locked);
    // RLIMIT_MEMLOCK is the seed's here, the restoring user's (none for
    // root): what the process could lock was weighed before anything was
    // made (checkLockedMemory).
    if (v.vmFlags.includes('lo')) finishing.add(`${what}: mlock${v.vmFlags.includes('lf') ? ' (on fault)' : ''}`, SYS.mlock2, [v.start, len, v.vmFlags.includes('lf') ? MLOCK_ONFAULT : 0]);
  }
  for (const fd of new Set(fds)) finishing.add('closing', SYS.close, [fd]);
  // In the process's next stop: nothing looks at its protections or its
  // descriptors from outside before (the driver's next calls do, after).
  finishing.defer();
}

/**
 * Seals the mappings the image has sealed (mseal, VmFlags sl): apart from
 * restoreMemory and late, once every child that is forked from this
 * process during the restore has been (a fork child inherits the seal,
 * and could then not unmap what it must), and nothing else will change
 * the mapping (mseal refuses mprotect, munmap, mremap and a discarding
 * madvise on it).
 */
export function sealMemory(r: RemoteProcess, vmas: Vma[]): void {
  const sealed = vmas.filter((v) => v.vmFlags.includes('sl') && v.kind !== VmaKind.VDSO && v.kind !== VmaKind.VVAR && v.kind !== VmaKind.VSYSCALL);
  if (!sealed.length) return;
  const calls = r.batch();
  for (const v of sealed) calls.add(`sealing the mapping at 0x${v.start.toString(16)} (mseal)`, SYS.mseal, [v.start, v.end - v.start, 0]);
  calls.run();
}

/** One copy of page data: `len` bytes at `offset` of page file `file`
 * (an index into the chain) to `addr`. */
export interface CopyRun {
  file: number;
  offset: bigint;
  addr: bigint;
  len: bigint;
}

/**
 * Where each page a VMA inherits from the parent chain (pages.fromParent)
 * is read from, as copies: pages next to each other in memory and in one
 * page file go in one. A page no image of the chain holds was only ever
 * read (dirty tracking vouches it was not written): zeros, as mapped, so
 * no copy. `inherited`: the process's pages in the chain, by address
 * (resolveProcess). Depends on the chain's images alone: worked out ahead
 * of a restore, it is the same (MemorySources.inheritedRuns).
 */
export function inheritedCopyRuns(v: Vma, inherited: Map<bigint, { file: number; offset: bigint }>): CopyRun[] {
  const out: CopyRun[] = [];
  let run: CopyRun | undefined;
  const flush = () => {
    if (run) out.push(run);
    run = undefined;
  };
  const from = v.pages?.fromParent ?? [];
  for (let i = 0; i < from.length; i += 2)
    for (let pg = 0; pg < from[i + 1]; pg++) {
      const addr = v.start + BigInt(from[i] + pg) * PAGE;
      const loc = inherited.get(addr);
      if (!loc) {
        flush();
        continue;
      }
      if (run && run.file === loc.file && run.addr + run.len === addr && run.offset + run.len === loc.offset) run.len += PAGE;
      else {
        flush();
        run = { addr, file: loc.file, offset: loc.offset, len: PAGE };
      }
    }
  flush();
  return out;
}

/** How one VMA of the image is mapped (restoreMemory): `file`, `pageFile`:
 * indexes of the descriptors opened for it in the process. */
interface VmaPlan {
  v: Vma;
  len: bigint;
  prot: number;
  what: string;
  /** Stored runs: copied in, or mapped from the page file (lazy). */
  own: [bigint, bigint, bigint][];
  /** With lazy: the stored runs copied in all the same (prefault), not
   * in `own`. */
  prefaulted: [bigint, bigint, bigint][];
  hasInherited: boolean;
  droppable: boolean;
  growsdown: number;
  lazy: boolean;
  parentVma: Vma | undefined;
  file?: number;
  pageFile?: number;
}

function planVma(v: Vma, vpid: number, src: MemorySources, inheritedFrom: Map<Vma, Vma>, open: (path: string, flags: number) => number): VmaPlan {
  const fork = src.asFork ? forkTreatment(v) : undefined;
  // Wiped: mapped anonymous and left as it comes, zero.
  const stored = fork === 'wipe' ? [] : storedRuns(v);
  const hasInherited = fork !== 'wipe' && (v.pages?.fromParent.length ?? 0) > 0;
  const lazy = mappedLazily(src, vpid, v);
  const hot = lazy ? src.prefault?.(vpid, v) : undefined;
  const { own, prefaulted } = hot?.length ? splitRuns(v, stored, hot) : { own: stored, prefaulted: [] };
  const needsWrite = (own.length > 0 && !lazy) || prefaulted.length > 0 || hasInherited;
  const plan: VmaPlan = {
    v,
    len: v.end - v.start,
    prot: v.prot | (needsWrite ? PROT_WRITE : 0),
    what: `mapping ${v.path || 'anonymous memory'} at 0x${v.start.toString(16)}`,
    own,
    prefaulted,
    hasInherited,
    droppable: v.vmFlags.includes('dp'),
    growsdown: v.vmFlags.includes('gd') ? MAP.GROWSDOWN : 0,
    lazy,
    parentVma: inheritedFrom.get(v),
  };
  if (!plan.parentVma && (v.kind === VmaKind.FILE_PRIVATE || v.kind === VmaKind.FILE_SHARED)) {
    const shared = v.kind === VmaKind.FILE_SHARED;
    const path = v.path === src.tables.old ? src.tables.new : (src.mappedPath?.(vpid, v) ?? v.path);
    // A shared mapping of a file opened for writing may be made
    // writable later (mprotect) even when it is read-only now: the
    // kernel decides by the mode of the file it was mapped from (mw;
    // an image without VmFlags has only the protection to go by).
    plan.file = open(path, shared && (v.prot & PROT_WRITE || v.vmFlags.includes('mw')) ? O_RDWR : O_RDONLY);
  }
  if (lazy && own.length) plan.pageFile = open(src.pagePaths[0], O_RDONLY);
  return plan;
}

/** Stored runs ([address, file offset, length]) of `v` split into those
 * of the pages `hot` (page indexes in `v`, ascending) and the rest. */
function splitRuns(v: Vma, runs: [bigint, bigint, bigint][], hot: readonly number[]): { own: [bigint, bigint, bigint][]; prefaulted: [bigint, bigint, bigint][] } {
  const own: [bigint, bigint, bigint][] = [];
  const prefaulted: [bigint, bigint, bigint][] = [];
  let h = 0;
  for (const [addr, off, len] of runs) {
    const first = Number((addr - v.start) / PAGE);
    const end = first + Number(len / PAGE);
    let at = first;
    while (h < hot.length && hot[h] < first) h++;
    // Alternately a stretch not hot, then one hot, to the run's end.
    while (at < end) {
      let next = h < hot.length && hot[h] < end ? hot[h] : end;
      const into = (list: typeof own, from: number, to: number) => {
        if (to > from) list.push([v.start + BigInt(from) * PAGE, off + BigInt(from - first) * PAGE, BigInt(to - from) * PAGE]);
      };
      into(own, at, next);
      at = next;
      while (h < hot.length && hot[h] === next && next < end) {
        h++;
        next++;
      }
      into(prefaulted, at, next);
      at = next;
    }
  }
  return { own, prefaulted };
}
