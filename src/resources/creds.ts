/**
 * Credentials: uids, gids, supplementary groups, the five capability sets,
 * securebits, no_new_privs and seccomp (mode and filter chain), which are
 * per thread in the kernel, and the process's dumpable flag (mm-wide).
 *
 * A restore never gives a process more than the image recorded, and never
 * more than the restoring user could grant: the rule is checked before
 * anything is made (credentialRefusal, a pure function), and the kernel's
 * EPERM stays the backstop. Nothing is silently downgraded or upgraded.
 *
 * Dump: /proc/PID/task/TID/status, plus what only the thread can tell
 * (securebits, dumpable: prctl injected) and the seccomp filters
 * (PTRACE_SECCOMP_GET_FILTER, which needs CAP_SYS_ADMIN: without it a
 * process under a filter is refused, and left running as it was).
 *
 * appshot itself may run under seccomp (a container runtime's default
 * profile, systemd's SystemCallFilter=): then the kernel lets it neither
 * read nor suspend any filter. The leading filters a process shares with
 * appshot's own context are the context's: counted, not read, and at a
 * restore the seeds' own (inherited from the restoring appshot, which must
 * run under as many); filters an application added on top are refused.
 *
 * Restore: the last thing before the registers are set, in each thread,
 * in an order the kernel accepts (prepareSeccomp writes the filters while
 * the process is surely ours to write, restoreCreds, then restoreSeccomp
 * once the scratch memory is gone).
 */
import { procText } from '../procfs.js';
import { AppshotError, ExitCode } from '../errors.js';
import { isOwnSnapshot } from '../image/format.js';
import { type Creds, type Image, type InodeOwner, type PeerCred, type Process, type SeccompFilter, type Vma, VmaKind } from '../image/types.js';
import { addon, ENTRY_FLAGS } from '../native.js';
import { type CallBatch, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { nameProcess, Unsupported } from './context.js';
import { NR } from '../ptrace/inject.js';
import { type CallQueue } from '../ptrace/queries.js';
import { REG } from './threads.js';


/** Throws Unsupported if process `what` (its pid-table entry's `flags`)
 * may be inside a Landlock domain: the kernel shows a domain's rules
 * nowhere, so a restored process would come back without them, free to
 * reach what it was denied. Before anything is injected. (A domain made
 * by a raw system call, which the preload library does not see, is not
 * seen here either.) */
export function refuseLandlocked(flags: number | undefined, what: string): void {
  if ((flags ?? 0) & ENTRY_FLAGS.landlock) throw new Unsupported(`${what} is restricted by Landlock (landlock_restrict_self, its own or a parent's), whose rules the kernel does not show: it cannot be captured`);
}

/** Capability numbers (linux/capability.h) this module reasons about. */
export const CAP = { CHOWN: 0, SETGID: 6, SETUID: 7, SETPCAP: 8, SYS_ADMIN: 21, SYS_RESOURCE: 24, SYS_TIME: 25 } as const;
const CAP_NAMES = [
  'chown', 'dac_override', 'dac_read_search', 'fowner', 'fsetid', 'kill', 'setgid', 'setuid', 'setpcap', 'linux_immutable',
  'net_bind_service', 'net_broadcast', 'net_admin', 'net_raw', 'ipc_lock', 'ipc_owner', 'sys_module', 'sys_rawio', 'sys_chroot',
  'sys_ptrace', 'sys_pacct', 'sys_admin', 'sys_boot', 'sys_nice', 'sys_resource', 'sys_time', 'sys_tty_config', 'mknod', 'lease',
  'audit_write', 'audit_control', 'setfcap', 'mac_override', 'mac_admin', 'syslog', 'wake_alarm', 'block_suspend', 'audit_read',
  'perfmon', 'bpf', 'checkpoint_restore',
];
export const hasCap = (set: bigint, cap: number) => (set >> BigInt(cap)) & 1n ? true : false;
const capList = (set: bigint): number[] => [...Array(64).keys()].filter((c) => hasCap(set, c));
export const capName = (c: number) => `CAP_${(CAP_NAMES[c] ?? String(c)).toUpperCase()}`;

const PR = {
  GET_DUMPABLE: 3,
  SET_DUMPABLE: 4,
  SET_KEEPCAPS: 8,
  SET_SECCOMP: 22,
  CAPBSET_DROP: 24,
  GET_SECUREBITS: 27,
  SET_SECUREBITS: 28,
  SET_NO_NEW_PRIVS: 38,
  CAP_AMBIENT: 47,
} as const;
const PR_CAP_AMBIENT_RAISE = 2;
const PR_CAP_AMBIENT_LOWER = 3;
const SECBIT_NO_SETUID_FIXUP = 1 << 2;
const SECBIT_KEEP_CAPS = 1 << 4;
const SECBIT_KEEP_CAPS_LOCKED = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7;
/** Each securebit's lock is the bit above it. */
const SECBIT_LOCKS = 0b10101010;
const SECCOMP_MODE_STRICT = 1;
const SECCOMP_MODE_FILTER = 2;
const SECCOMP_SET_MODE_FILTER = 1;
/** Added to an installation, never recorded: an image's filters carry
 * SECCOMP_FILTER_FLAG_LOG at most (validateImage). */
const SECCOMP_FILTER_FLAG_TSYNC = 1n;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
const SYS_CREDS = { setgroups: 116, setresuid: 117, setresgid: 119, setfsuid: 122, setfsgid: 123, capset: 126, seccomp: 317 } as const;

/* ---- reading ---------------------------------------------------------- */

function statusFields(path: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of procText(path).split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  return out;
}

const nums = (s: string | undefined) => (s ? s.split(/\s+/).filter(Boolean).map(Number) : []);
const hex = (s: string | undefined) => BigInt('0x' + (s || '0'));

/** What /proc/…/status shows of a thread's credentials; securebits and the
 * filters themselves are not there. */
interface StatusCreds extends Omit<Creds, 'securebits' | 'seccompFilters'> {
  /** Seccomp_filters: how many filters the thread runs under. */
  filterCount: number;
}

function parseStatus(status: Map<string, string>): StatusCreds {
  return {
    uid: nums(status.get('Uid')),
    gid: nums(status.get('Gid')),
    groups: nums(status.get('Groups')),
    capEff: hex(status.get('CapEff')),
    capPrm: hex(status.get('CapPrm')),
    capInh: hex(status.get('CapInh')),
    capBnd: hex(status.get('CapBnd')),
    capAmb: hex(status.get('CapAmb')),
    noNewPrivs: status.get('NoNewPrivs') === '1',
    seccomp: Number(status.get('Seccomp') ?? 0),
    filterCount: Number(status.get('Seccomp_filters') ?? 0),
  };
}

/** A thread's credentials as its status file shows them. */
export const threadStatus = (pid: number, tid: number) => parseStatus(statusFields(`/proc/${pid}/task/${tid}/status`));

/** appshot's own credentials: what a restore can grant, since every seed
 * inherits them. */
export interface OwnCreds extends StatusCreds {
  securebits: number;
}

/** Read once for the life of the process (a serve restores many times):
 * no other process can change them (capset, setuid and securebits act on
 * the caller alone), and appshot never changes its own. Its limits are
 * not kept: another process of the same user may change them (prlimit). */
let ownCached: OwnCreds | undefined;
export function ownCreds(): OwnCreds {
  return (ownCached ??= { ...parseStatus(statusFields('/proc/thread-self/status')), securebits: addon().securebits() });
}

const ownStatus = () => parseStatus(statusFields('/proc/thread-self/status'));

/** Whether a thread's seccomp filters are no more than appshot's own
 * context: as many as appshot runs under. (They cannot be compared: the
 * kernel shows them to no process under seccomp. A process appshot runs
 * inherits them.) */
function inAppshotsContext(st: StatusCreds, own: StatusCreds): boolean {
  return own.seccomp === SECCOMP_MODE_FILTER && st.seccomp === SECCOMP_MODE_FILTER && st.filterCount === own.filterCount;
}

/* ---- dump ------------------------------------------------------------- */

export interface DumpedCreds {
  /** One per thread, in the order given. */
  threads: Creds[];
  dumpable: number;
}

/**
 * Reads every thread's credentials, and asks the process for what only it
 * tells (securebits, dumpable): the credentials are returned by the
 * function returned, once the questions were answered. Called before
 * anything else is injected into the process: a thread under seccomp is first exempted
 * from its filters (PTRACE_O_SUSPEND_SECCOMP), which could otherwise
 * refuse the injected calls or kill the process for them; a process whose
 * filters cannot be read or suspended (no CAP_SYS_ADMIN) is refused.
 */
export function dumpCreds(pid: number, tids: number[], calls: CallQueue, what: string): () => DumpedCreds {
  const statuses = tids.map((tid) => threadStatus(pid, tid));
  // appshot's own, read once (ownCreds): not a /proc read in the window.
  const own = ownCreds();
  const contexts = statuses.map((st) => (inAppshotsContext(st, own) ? st.filterCount : 0));
  const filters = statuses.map((st, i) => {
    if (st.seccomp === 0 || contexts[i]) return [];
    const where = tids[i] === pid ? what : `${what} thread ${tids[i]}`;
    if (own.seccomp !== 0) {
      const its = st.seccomp === SECCOMP_MODE_STRICT ? 'seccomp strict mode' : `${st.filterCount} seccomp filters (${own.seccomp === SECCOMP_MODE_FILTER ? own.filterCount : 'none'} of them appshot's own)`;
      throw new Unsupported(`${where}: its ${its} cannot be captured: appshot runs under seccomp, and the kernel lets a process under seccomp neither read nor suspend another's filters (run appshot outside that profile)`);
    }
    let chain: SeccompFilter[] = [];
    try {
      if (st.seccomp === SECCOMP_MODE_FILTER) chain = addon().seccompFilters(tids[i]);
      addon().suspendSeccomp(tids[i]);
    } catch (e) {
      const mode = st.seccomp === SECCOMP_MODE_STRICT ? 'seccomp strict mode' : 'seccomp filter';
      throw new Unsupported(`${where}: its ${mode} cannot be captured (${(e as Error).message}; reading and suspending seccomp needs CAP_SYS_ADMIN)`);
    }
    if (st.seccomp === SECCOMP_MODE_FILTER && chain.length !== st.filterCount)
      throw new Unsupported(`${where}: ${st.filterCount} seccomp filters, of which ${chain.length} could be read`);
    return chain;
  });
  // Asked now, answered with the other resource kinds' questions (the
  // caller runs them): the credentials once they are.
  const securebits = tids.map((tid) => calls.ask(NR.prctl, [PR.GET_SECUREBITS], { tid }));
  const dumpableAsked = calls.ask(NR.prctl, [PR.GET_DUMPABLE]);
  return () => {
    const threads = statuses.map(({ filterCount: _, ...st }, i) => {
      const bits = securebits[i].ret;
      if (bits < 0n) throw new Error(`reading the securebits of thread ${tids[i]}: errno ${-bits}`);
      return { ...st, securebits: Number(bits), seccompFilters: filters[i], ...(contexts[i] ? { seccompContext: contexts[i] } : {}) };
    });
    const dumpable = dumpableAsked.ret;
    if (dumpable < 0n) throw new Error(`reading whether ${what} is dumpable: errno ${-dumpable}`);
    return { threads, dumpable: Number(dumpable) };
  };
}

/** Exempts the threads of a process under seccomp from their filters for
 * as long as they are traced, so that calls can be injected (dirty
 * tracking does so outside a dump); false if that is not possible. */
export function exemptFromSeccomp(pid: number, tids: number[]): boolean {
  const own = ownCreds();
  for (const tid of tids) {
    const st = threadStatus(pid, tid);
    // Under appshot's own filters only: nothing to exempt it from that
    // appshot's calls are not under too (and it could not).
    if (st.seccomp === 0 || inAppshotsContext(st, own)) continue;
    try {
      addon().suspendSeccomp(tid);
    } catch {
      return false;
    }
  }
  return true;
}

/* ---- the privilege rule ------------------------------------------------ */

const sameSet = (a: number[], b: number[]) => a.length === b.length && [...a].sort().join() === [...b].sort().join();
const firstCap = (set: bigint) => capName(capList(set)[0]);

/**
 * Why a user with credentials `own` cannot give a thread the credentials
 * `want`, or undefined if it can: each credential is either one the user
 * has, or one its capabilities let it take, as the kernel decides
 * (setresuid, setgroups, capset, PR_CAPBSET_DROP, PR_SET_SECUREBITS,
 * seccomp). Pure, for the tests too.
 */
export function credentialRefusal(want: Creds, own: OwnCreds): string | undefined {
  const ids = [...want.uid, ...want.gid, ...want.groups];
  if (want.uid.length !== 4 || want.gid.length !== 4 || want.groups.length > 65536 || ids.some((id) => !Number.isInteger(id) || id < 0 || id >= 2 ** 32 - 1))
    return 'its recorded uids, gids or groups are malformed (corrupt image?)';
  const can = (cap: number) => hasCap(own.capEff, cap);
  const uidsHeld = own.uid.slice(0, 3);
  if (!can(CAP.SETUID)) {
    const other = want.uid.find((u) => !uidsHeld.includes(u));
    if (other !== undefined) return `uid ${other} cannot be taken without CAP_SETUID (this user is uid ${own.uid[0]})`;
  }
  if (!can(CAP.SETGID)) {
    const other = want.gid.find((g) => !own.gid.slice(0, 3).includes(g));
    if (other !== undefined) return `gid ${other} cannot be taken without CAP_SETGID (this user is gid ${own.gid[0]})`;
    if (!sameSet(want.groups, own.groups))
      return `supplementary groups [${want.groups.join(',')}] cannot be set without CAP_SETGID (this user has [${own.groups.join(',')}])`;
  }
  const extraPrm = want.capPrm & ~own.capPrm;
  if (extraPrm) return `capability ${firstCap(extraPrm)} (permitted) is not in this user's permitted set`;
  const extraInh = want.capInh & ~(own.capInh | own.capPrm);
  if (extraInh) return `capability ${firstCap(extraInh)} (inheritable) is neither inheritable nor permitted for this user`;
  // capset: a new inheritable capability must be in the bounding set too.
  const outOfBounds = want.capInh & ~(own.capInh | own.capBnd);
  if (outOfBounds) return `capability ${firstCap(outOfBounds)} (inheritable) is not in this user's bounding set`;
  if (want.capEff & ~want.capPrm || want.capAmb & ~(want.capPrm & want.capInh)) return 'its recorded capability sets are inconsistent (corrupt image?)';
  const extraBnd = want.capBnd & ~own.capBnd;
  if (extraBnd) return `bounding set holds ${firstCap(extraBnd)}, which this user's bounding set lacks`;
  if (want.capBnd !== own.capBnd && !can(CAP.SETPCAP)) return `bounding set without ${firstCap(own.capBnd & ~want.capBnd)} cannot be set without CAP_SETPCAP`;
  if (want.securebits !== own.securebits) {
    const locked = own.securebits & SECBIT_LOCKS;
    const fixed = locked | (locked >> 1);
    if ((want.securebits ^ own.securebits) & fixed) return `securebits 0x${want.securebits.toString(16)} cannot be set: this user's 0x${own.securebits.toString(16)} are locked`;
    if (!can(CAP.SETPCAP)) return `securebits 0x${want.securebits.toString(16)} cannot be set without CAP_SETPCAP`;
  }
  if (own.noNewPrivs && !want.noNewPrivs) return 'no_new_privs is set on appshot itself and cannot be cleared (the image recorded it clear)';
  if (own.seccomp !== 0 && want.seccomp !== own.seccomp) return `appshot itself runs under seccomp (mode ${own.seccomp}), which cannot be lifted (the image recorded mode ${want.seccomp})`;
  if (want.seccomp === SECCOMP_MODE_FILTER) {
    const context = want.seccompContext ?? 0;
    if (want.seccompFilters.length === 0 && !context) return 'its seccomp filter was not recorded (an older image)';
    // The kernel takes 1..BPF_MAXINSNS instructions of 8 bytes.
    if (want.seccompFilters.some((f) => !f.program.length || f.program.length % 8 || f.program.length > 4096 * 8)) return 'its seccomp filter is malformed (corrupt image?)';
    // The seeds run under appshot's filters; the image's first `context`
    // were those appshot ran under when it was taken (not recorded).
    if (own.filterCount !== context)
      return `appshot itself runs under ${own.filterCount} seccomp filters, ${own.filterCount > context ? 'more' : 'fewer'} than the image recorded as the context it was taken in (${context})`;
    // seccomp() asks for either, in the credentials the thread has then.
    if (want.seccompFilters.length > 0 && !want.noNewPrivs && !hasCap(want.capEff, CAP.SYS_ADMIN))
      return 'its seccomp filter cannot be installed again: it has neither no_new_privs nor CAP_SYS_ADMIN';
  }
  return undefined;
}

/**
 * Why this user cannot make a unix connection whose peer the kernel takes
 * for `peer` (sockets.ts checkPeerCredentials), or undefined if it can: the
 * restore makes it on a thread holding those effective ids and groups
 * (peercred.c), which the kernel grants as it grants setresuid,
 * setresgid and setgroups.
 */
export function peerCredRefusal(peer: PeerCred, own: OwnCreds): string | undefined {
  if (!hasCap(own.capEff, CAP.SETUID) && !own.uid.slice(0, 3).includes(peer.uid)) return `uid ${peer.uid} cannot be taken without CAP_SETUID (this user is uid ${own.uid[0]})`;
  if (!hasCap(own.capEff, CAP.SETGID)) {
    if (!own.gid.slice(0, 3).includes(peer.gid)) return `gid ${peer.gid} cannot be taken without CAP_SETGID (this user is gid ${own.gid[0]})`;
    if (!sameSet(peer.groups, own.groups)) return `supplementary groups [${peer.groups.join(',')}] cannot be set without CAP_SETGID (this user has [${own.groups.join(',')}])`;
  }
  return undefined;
}

/**
 * Why this user cannot make an object it makes for the application (a
 * pipe, a socket) owned by `owner`, or undefined if it can: fchown, as
 * the kernel grants it to the object's maker (files.ts checkInodeOwners).
 */
export function inodeOwnerRefusal(owner: InodeOwner, own: OwnCreds): string | undefined {
  if (hasCap(own.capEff, CAP.CHOWN)) return undefined;
  if (owner.uid !== own.uid[3]) return `owner uid ${owner.uid} cannot be given without CAP_CHOWN (this user is uid ${own.uid[3]})`;
  if (owner.gid !== own.gid[3] && !own.groups.includes(owner.gid)) return `group ${owner.gid} cannot be given without CAP_CHOWN (this user is not in it)`;
  return undefined;
}

const imageIds = new WeakMap<Image, { uids: Set<number>; gids: Set<number> }>();

/**
 * Every uid, and every gid and supplementary group, some thread of the
 * image has. An image this node did not snapshot may have the restore
 * vouch for no other identity than those: its unix connections' peers
 * (sockets.ts), its pipes' and sockets' owners (files.ts).
 */
export function idsOfImage(image: Image): { uids: Set<number>; gids: Set<number> } {
  let ids = imageIds.get(image);
  if (!ids) {
    const creds = image.processes.flatMap((p) => [p.creds, ...p.threads.map((t) => t.creds ?? p.creds)]);
    ids = { uids: new Set(creds.flatMap((c) => c.uid)), gids: new Set(creds.flatMap((c) => [...c.gid, ...c.groups])) };
    imageIds.set(image, ids);
  }
  return ids;
}

/** The first of `uid` and `gids` that no thread of the image has, named
 * ("uid 0", "gid 27"), or undefined. */
export function strangerId(image: Image, uid: number, gids: number[]): string | undefined {
  const { uids, gids: known } = idsOfImage(image);
  if (!uids.has(uid)) return `uid ${uid}`;
  const g = gids.find((x) => !known.has(x));
  return g === undefined ? undefined : `gid ${g}`;
}

/**
 * Why the restore of `image` must not vouch for uid `uid` and groups
 * `gids` in an object it makes for the application (its owner, or the
 * identity a unix peer sees), or undefined if it may. An image this node
 * snapshotted says what the kernel showed; any other may name no identity
 * that none of its own threads has: a root restore of a crafted image
 * would otherwise hand out root's (or anyone's) objects. Callers give
 * the holding process's own ids instead and say so (notKept).
 */
export function strangeOwner(image: Image, uid: number, gids: number[]): string | undefined {
  if (isOwnSnapshot(image)) return undefined;
  const stranger = strangerId(image, uid, gids);
  return stranger && `${stranger} is none of the image's processes'`;
}

/** Threads of a process with their creds (an older image: the process's). */
const threadCreds = (p: Process) => p.threads.map((t) => ({ vtid: t.vtid, creds: t.creds ?? p.creds }));

/** The rule over the whole image, before a restore makes anything: one
 * line naming the first process (and thread) and credential refused. */
export function checkCredentials(image: Image, own: OwnCreds): void {
  for (const p of image.processes)
    for (const t of threadCreds(p)) {
      const why = credentialRefusal(t.creds, own);
      if (why) throw new AppshotError(`${nameProcess(p.vpid, p.comm)}${t.vtid === p.vpid ? '' : ` thread ${t.vtid}`}: ${why}`, ExitCode.denied);
    }
}

/* ---- restore ----------------------------------------------------------- */

function capsetData(c: Pick<Creds, 'capEff' | 'capPrm' | 'capInh'>): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(LINUX_CAPABILITY_VERSION_3, 0);
  b.writeInt32LE(0, 4); // this thread
  const word = (v: bigint, i: number) => Number((v >> BigInt(32 * i)) & 0xffffffffn);
  for (let i = 0; i < 2; i++) {
    b.writeUInt32LE(word(c.capEff, i), 8 + i * 12);
    b.writeUInt32LE(word(c.capPrm, i), 12 + i * 12);
    b.writeUInt32LE(word(c.capInh, i), 16 + i * 12);
  }
  return b;
}

/**
 * Gives each restored thread its recorded credentials (but seccomp, see
 * restoreSeccomp) and the process its dumpable flag. Run after everything
 * else that needs privileges or scratch memory but its unmapping: after
 * these calls the process may no longer be ours to change. The order is
 * the kernel's, in each thread:
 *  1. groups and gids (and the fs gid), while CAP_SETGID is effective;
 *  2. the inheritable set, which must lie within the old inheritable set
 *     and the bounding set as it is before that is lowered;
 *  3. the bounding set, while CAP_SETPCAP is effective;
 *  4. the securebits, while CAP_SETPCAP is effective: a process may keep
 *     them with no capability left (SecureBits= with User=). KEEP_CAPS is
 *     added if leaving uid 0 would empty a permitted set still needed;
 *     what must wait (NO_CAP_AMBIENT_RAISE before the ambient raises, a
 *     KEEP_CAPS_LOCKED with KEEP_CAPS clear) waits;
 *  5. the uids; then, as the uid change cleared the effective set, a
 *     transitional capability set with what is still to be used
 *     (CAP_SETUID for an fs uid none of the others is, CAP_SETPCAP for
 *     the last securebits);
 *  6. the fs uid, the ambient set, the last securebits (KEEP_CAPS cleared
 *     again with PR_SET_KEEPCAPS, which needs no capability), the exact
 *     capability sets, no_new_privs.
 * Returns how many calls it injected (each ~16 µs): most are skipped where
 * the seed has the value already.
 */
/** What restoreCreds needs of the seed first, asked in a batch of the main
 * thread's run earlier (with other kinds' calls: no stop of its own): its
 * securebits, which its threads share, and its dumpable flag. Neither
 * changes until restoreCreds changes credentials. */
export interface SeedCredsAsked {
  securebits: number;
  dumpable: number;
}
export function askSeedCreds(calls: CallBatch): () => SeedCredsAsked {
  const securebits = calls.add('reading securebits', SYS.prctl, [PR.GET_SECUREBITS]);
  const dumpable = calls.add('reading dumpable', SYS.prctl, [PR.GET_DUMPABLE]);
  return () => ({ securebits: Number(calls.result(securebits)), dumpable: Number(calls.result(dumpable)) });
}

export function restoreCreds(r: RemoteProcess, p: Process, tids: number[], asked?: SeedCredsAsked): number {
  const calls = { n: 0 };
  // Whether a call changed the thread's credentials since its status was
  // last read: /proc's word is read again only then (reading it costs
  // more than most of the calls, and a thread whose credentials are the
  // seed's already needs none).
  let changed = false;
  // Whether any thread's credentials changed (which may reset dumpable).
  let anyChanged = false;
  const call = (what: string, nr: number, args: (bigint | number)[], tid: number) => {
    calls.n++;
    changed = true;
    anyChanged = true;
    return r.call(what, nr, args, tid);
  };
  const statusNow = (tid: number, last: StatusCreds): StatusCreds => {
    if (!changed) return last;
    changed = false;
    return threadStatus(r.pid, tid);
  };
  // All buffers first, while the scratch memory is surely writable.
  r.reset();
  const wanted = threadCreds(p);
  // The kernel's word on the main thread only: the other threads are its
  // clones (createThreads), made with a copy of its credentials, and
  // nothing injected since changes credentials (this is the first kind
  // that does), so theirs are the same. Each /proc status read costs
  // ~75 µs, more than most calls; a thread that takes a call is read
  // again all the same (statusNow).
  const mainSeed = threadStatus(r.pid, tids[0]);
  const seeds = tids.map(() => mainSeed);
  // A thread whose credentials and securebits are the wanted ones already
  // (a restore by the user the image was taken as) takes no call, so no
  // buffer either.
  const settled = (i: number) => asked !== undefined && asked.securebits === wanted[i].creds.securebits && differingCredential(wanted[i].creds, seeds[i]) === undefined;
  const buffers = wanted.map(({ creds: c }, i) => {
    if (settled(i)) return undefined;
    const seed = seeds[i];
    const extra = ((1n << BigInt(CAP.SETPCAP)) | (1n << BigInt(CAP.SETUID))) & seed.capPrm;
    return {
      groups: r.put(Buffer.from(new Uint32Array(c.groups).buffer)),
      inheritable: r.put(capsetData({ capEff: seed.capEff, capPrm: seed.capPrm, capInh: c.capInh })),
      transitional: r.put(capsetData({ capEff: c.capEff | extra, capPrm: c.capPrm | extra, capInh: c.capInh })),
      extra,
      exact: r.put(capsetData(c)),
    };
  });
  // The seed's securebits, which its threads share, and its dumpable
  // flag: asked once, in one stop, unless asked already.
  if (!asked) {
    calls.n++;
    const asking = r.batch();
    const answers = askSeedCreds(asking);
    asking.run();
    asked = answers();
  }
  const { securebits: seedBits, dumpable: seedDumpable } = asked;
  wanted.forEach(({ creds: want }, i) => {
    const tid = tids[i];
    const buf = buffers[i];
    // Settled: every step below would find nothing to do.
    if (!buf) return;
    let have = seeds[i];
    changed = false;
    let bits = seedBits;
    const setBits = (to: number) => {
      if (to === bits) return;
      if ((to ^ bits) === SECBIT_KEEP_CAPS) call(`${to & SECBIT_KEEP_CAPS ? 'setting' : 'clearing'} KEEP_CAPS`, SYS.prctl, [PR.SET_KEEPCAPS, to & SECBIT_KEEP_CAPS ? 1 : 0], tid);
      else call(`setting securebits 0x${to.toString(16)}`, SYS.prctl, [PR.SET_SECUREBITS, to], tid);
      bits = to;
    };
    // 1.
    if (!sameSet(want.groups, have.groups)) call('setgroups', SYS_CREDS.setgroups, [want.groups.length, buf.groups], tid);
    if (want.gid.slice(0, 3).join() !== have.gid.slice(0, 3).join()) call(`setresgid ${want.gid.slice(0, 3).join(' ')}`, SYS_CREDS.setresgid, want.gid.slice(0, 3), tid);
    // setresgid set the fs gid to the effective one.
    if (want.gid[3] !== (have = statusNow(tid, have)).gid[3]) call(`setfsgid ${want.gid[3]}`, SYS_CREDS.setfsgid, [want.gid[3]], tid);
    // 2.
    if (want.capInh !== have.capInh) call('capset (inheritable)', SYS_CREDS.capset, [buf.inheritable, buf.inheritable + 8n], tid);
    // 3.
    for (const cap of capList(have.capBnd & ~want.capBnd)) call(`dropping ${capName(cap)} from the bounding set`, SYS.prctl, [PR.CAPBSET_DROP, cap], tid);
    // 4.
    const uidChanges = want.uid.slice(0, 3).join() !== have.uid.slice(0, 3).join();
    const losesRoot = have.uid.slice(0, 3).includes(0) && !want.uid.slice(0, 3).includes(0);
    const fsuidNeedsCap = !want.uid.slice(0, 3).includes(want.uid[3]);
    let later = want.capAmb & ~have.capAmb ? want.securebits & (SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED) : 0;
    // Leaving uid 0 empties the permitted set, but with KEEP_CAPS (or
    // NO_SETUID_FIXUP, which the image may set).
    const keep = uidChanges && losesRoot && !(want.securebits & SECBIT_NO_SETUID_FIXUP) && (want.capPrm !== 0n || fsuidNeedsCap || later !== 0);
    if (keep && want.securebits & SECBIT_KEEP_CAPS_LOCKED && !(want.securebits & SECBIT_KEEP_CAPS)) later |= SECBIT_KEEP_CAPS_LOCKED;
    setBits((want.securebits & ~later) | (keep ? SECBIT_KEEP_CAPS : 0));
    // 5.
    if (uidChanges) call(`setresuid ${want.uid.slice(0, 3).join(' ')}`, SYS_CREDS.setresuid, want.uid.slice(0, 3), tid);
    have = statusNow(tid, have);
    const capsDiffer = () => have.capEff !== want.capEff || have.capPrm !== want.capPrm || have.capInh !== want.capInh;
    const lastBitsNeedSetpcap = want.securebits !== bits && (want.securebits ^ bits) !== SECBIT_KEEP_CAPS;
    const needed = (fsuidNeedsCap && want.uid[3] !== have.uid[3] ? 1n << BigInt(CAP.SETUID) : 0n) | (lastBitsNeedSetpcap ? 1n << BigInt(CAP.SETPCAP) : 0n);
    const transitional = needed & ~want.capEff & buf.extra & have.capPrm;
    if (transitional && !(want.capPrm & ~have.capPrm)) call('capset (transitional)', SYS_CREDS.capset, [buf.transitional, buf.transitional + 8n], tid);
    else if (capsDiffer()) call('capset', SYS_CREDS.capset, [buf.exact, buf.exact + 8n], tid);
    // 6.
    have = statusNow(tid, have);
    if (want.uid[3] !== have.uid[3]) call(`setfsuid ${want.uid[3]}`, SYS_CREDS.setfsuid, [want.uid[3]], tid);
    have = statusNow(tid, have);
    for (const cap of capList(want.capAmb & ~have.capAmb)) call(`raising ambient ${capName(cap)}`, SYS.prctl, [PR.CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0], tid);
    for (const cap of capList(have.capAmb & ~want.capAmb)) call(`lowering ambient ${capName(cap)}`, SYS.prctl, [PR.CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, cap, 0, 0], tid);
    setBits(want.securebits);
    have = statusNow(tid, have);
    if (capsDiffer()) call('capset', SYS_CREDS.capset, [buf.exact, buf.exact + 8n], tid);
    if (want.noNewPrivs && !have.noNewPrivs) call('setting no_new_privs', SYS.prctl, [PR.SET_NO_NEW_PRIVS, 1, 0, 0, 0], tid);
    // The kernel's word, not ours: setfsuid and setfsgid report no error,
    // and a set the kernel trimmed on a uid change must not go unnoticed.
    const wrong = differingCredential(want, statusNow(tid, have));
    if (wrong) throw new Error(`thread ${tid} did not take its recorded ${wrong}`);
  });
  // Mm-wide, and reset by the kernel whenever a thread's euid or fsuid
  // changed above: set after all of them.
  // Read again only if a call above may have reset it.
  if (anyChanged) calls.n++;
  const dumpable = anyChanged ? Number(r.call('reading dumpable', SYS.prctl, [PR.GET_DUMPABLE])) : seedDumpable;
  if (dumpable !== p.dumpable) {
    calls.n++;
    r.call(`setting dumpable ${p.dumpable}`, SYS.prctl, [PR.SET_DUMPABLE, p.dumpable]);
  }
  return calls.n;
}

/** The first credential in which a thread's status differs from `want`
 * (securebits and seccomp are not in the status). */
function differingCredential(want: Creds, got: StatusCreds): string | undefined {
  if (want.uid.join() !== got.uid.join()) return `uids ${want.uid.join(' ')} (has ${got.uid.join(' ')})`;
  if (want.gid.join() !== got.gid.join()) return `gids ${want.gid.join(' ')} (has ${got.gid.join(' ')})`;
  if (!sameSet(want.groups, got.groups)) return `groups ${want.groups.join(' ')} (has ${got.groups.join(' ')})`;
  for (const [name, a, b] of [['CapEff', want.capEff, got.capEff], ['CapPrm', want.capPrm, got.capPrm], ['CapInh', want.capInh, got.capInh], ['CapBnd', want.capBnd, got.capBnd], ['CapAmb', want.capAmb, got.capAmb]] as const)
    if (a !== b) return `${name} ${a.toString(16)} (has ${b.toString(16)})`;
  if (want.noNewPrivs !== got.noNewPrivs) return 'no_new_privs';
  return undefined;
}

/** How many seccomp filters a restore's seeds run under: appshot's own
 * context, which every thread inherits and which stands for the image's
 * first filters (counted at the snapshot, not recorded). */
export function seedFilters(seed: number): number {
  return threadStatus(seed, seed).filterCount;
}

const sameFilter = (a: SeccompFilter, b: SeccompFilter) => a.flags === b.flags && a.program.equals(b.program);

/** The filters to install in a thread: the image's chain past the
 * `inherited` ones the seed has from appshot, which must be as many as the
 * image counted as the context it was taken in. */
export function filtersToInstall(want: Creds, inherited: number, where: string): SeccompFilter[] {
  if (want.seccomp !== SECCOMP_MODE_FILTER) {
    if (inherited) throw new AppshotError(`${where}: appshot runs under a seccomp filter the image did not record`, ExitCode.denied);
    return [];
  }
  const context = want.seccompContext ?? 0;
  if (context !== inherited)
    throw new AppshotError(`${where}: its seccomp filter chain began with ${context} filters of appshot's context, and appshot runs under ${inherited} here`, ExitCode.denied);
  return want.seccompFilters;
}

/** What restoreSeccomp does, its programs already in the threads' memory. */
export interface SeccompPlan {
  /** Per thread: strict mode, or filters (struct sock_fprog addresses) to
   * install, oldest first; TSYNC: installed once for every thread. */
  threads: { tid: number; where: string; strict: boolean; filters: { at: bigint; flags: bigint }[]; tsync: boolean }[];
}

/**
 * Writes every filter program a process's threads are to be installed
 * with below the thread's red zone, on its own stack (dead memory by the
 * ABI, and never read again once installed): done before the credentials,
 * after which an ordinary user may no longer write into a process that is
 * not dumpable. Threads whose chains are the same get them once, installed
 * with SECCOMP_FILTER_FLAG_TSYNC from one of them, so that they share them
 * as they did (a thread made after a filter shares it; the application's
 * own TSYNC later fails for threads whose chains are mere copies). The
 * installing thread's no_new_privs goes to the others with TSYNC: it is
 * one without, holding CAP_SYS_ADMIN, unless every thread has it.
 */
export function prepareSeccomp(p: Process, tids: number[], inherited: number): SeccompPlan {
  const wanted = threadCreds(p);
  const threads = wanted.map(({ vtid, creds: want }, i) => {
    const where = `${nameProcess(p.vpid, p.comm)}${vtid === p.vpid ? '' : ` thread ${vtid}`}`;
    const strict = want.seccomp === SECCOMP_MODE_STRICT;
    return { tid: tids[i], where, strict, chain: strict ? [] : filtersToInstall(want, inherited, where), filters: [] as { at: bigint; flags: bigint }[], tsync: false };
  });
  let installers = threads.map((_, i) => i);
  const first = threads[0].chain;
  const shared = threads.length > 1 && first.length > 0 && threads.every((t) => !t.strict && t.chain.length === first.length && t.chain.every((f, k) => sameFilter(f, first[k])));
  if (shared) {
    const caller = wanted.every((w) => w.creds.noNewPrivs) ? 0 : wanted.findIndex((w) => !w.creds.noNewPrivs && hasCap(w.creds.capEff, CAP.SYS_ADMIN));
    if (caller >= 0) {
      installers = [caller];
      threads[caller].tsync = true;
    }
  }
  for (const i of installers) {
    const t = threads[i];
    let below = p.threads[i].regs.readBigUInt64LE(REG.rsp) - 128n;
    for (const f of t.chain) {
      // struct sock_fprog (len, pad, pointer) and the program after it.
      const size = 16 + f.program.length;
      const at = (below - BigInt(size)) & ~15n;
      if (!writableStack(p.vmas, at, size)) throw new AppshotError(`${t.where}: no room on its stack below the red zone for its seccomp filters (${size} bytes more)`);
      const fprog = Buffer.alloc(16);
      fprog.writeUInt16LE(f.program.length / 8, 0);
      fprog.writeBigUInt64LE(at + 16n, 8);
      addon().writeMemory(tids[0], at, Buffer.concat([fprog, f.program]));
      t.filters.push({ at, flags: f.flags | (t.tsync ? SECCOMP_FILTER_FLAG_TSYNC : 0n) });
      below = at;
    }
  }
  return { threads: threads.map(({ chain: _, ...t }) => t) };
}

/**
 * Seccomp last of all, in each thread, once the scratch memory is
 * unmapped: a filter applies to every call the thread makes after it, our
 * injected ones included, and the installation of the next filter first
 * of all. Where appshot may (CAP_SYS_ADMIN, under no seccomp itself) the
 * threads are exempted while it installs (PTRACE_O_SUSPEND_SECCOMP, with
 * PTRACE_O_EXITKILL kept: cleared at the commit by keepOnExit). Strict
 * mode needs no memory. Returns how many calls it injected.
 */
export function restoreSeccomp(r: RemoteProcess, plan: SeccompPlan): number {
  const calls = { n: 0 };
  if (plan.threads.some((t) => t.strict || t.filters.length)) {
    const own = ownStatus();
    if (hasCap(own.capEff, CAP.SYS_ADMIN) && own.seccomp === 0)
      for (const t of plan.threads) {
        try {
          addon().suspendSeccomp(t.tid, true);
        } catch {
          /* a kernel without CONFIG_CHECKPOINT_RESTORE: the filters apply */
        }
      }
  }
  for (const t of plan.threads) {
    if (t.strict) {
      calls.n++;
      r.call('entering seccomp strict mode', SYS.prctl, [PR.SET_SECCOMP, SECCOMP_MODE_STRICT], t.tid);
      continue;
    }
    for (const f of t.filters) {
      calls.n++;
      const ret = r.call(`installing a seccomp filter${f.flags & SECCOMP_FILTER_FLAG_TSYNC ? ' for every thread' : ''}`, SYS_CREDS.seccomp, [SECCOMP_SET_MODE_FILTER, f.flags, f.at], t.tid);
      if (ret > 0n) throw new AppshotError(`${t.where}: thread ${ret} could not share its seccomp filters (TSYNC)`);
    }
  }
  return calls.n;
}

/** Memory the filter programs may go to: the thread's own, never a
 * mapping another process sees (MAP_SHARED, SysV). */
function writableStack(vmas: Vma[], at: bigint, size: number): boolean {
  return vmas.some((v) => v.start <= at && at + BigInt(size) <= v.end && v.prot & 2 && !v.shared && (v.kind === VmaKind.ANON || v.kind === VmaKind.FILE_PRIVATE));
}
