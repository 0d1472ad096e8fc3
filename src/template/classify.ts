/**
 * Classification of every resource of an image into what cloning does with
 * it: a rule decides when one matches (step 360); otherwise the
 * standard criteria do (steps 364-388), and each verdict's reason names
 * the criteria that decided, so `inspect` can say why.
 *
 * The criteria, in the specification's order: a shared resource is marked
 * shared (366); a modifiable one must be isolated from the template, by
 * copy-on-write when it is large with an underlying object (372, 374),
 * else by duplicating it (376); a system-wide unique id is multiplexed when
 * clients outside depend on it (380, 382), else virtualized (384); a
 * network-unique one is allocated (386, 388). Resources the kernel provides
 * anew on each node are recreated (step 402, at cloning).
 *
 * Some resources cannot be templated at all (a name that is unique on the
 * system and that clones cannot each have): classify gives them 'recreate',
 * which is what a plain restore does, and refusals() names them.
 */
import { rawName } from '../resources/raw.js';
import { type Action, type Fd, FdKind, type Image, type Process, type Verdict, verdictRef, virtualPort, type Vma, VmaKind } from '../image/types.js';
import { lockRefusal } from '../resources/locks.js';
import { forkTreatment } from '../resources/memory.js';
import { connectionName } from '../resources/tcp.js';
import { templateProblem, unconnectedName } from '../resources/unconnected.js';
import { unredirected } from '../resources/paths.js';
import { describeMessageQueue, queueRefusal } from '../resources/mqueue.js';
import { isPathRule, type ResourceRule, type RulesFile, ruleFor } from './rules.js';

type Decision = { action: Action; reason: string };
type Described = Decision & { kind: string; name: string };

const PROT_WRITE = 2;
const O_ACCMODE = 3;
const O_RDONLY = 0;

/** The standard criteria, worded once. */
const CRITERIA = {
  kernel: 'provided by the kernel of the node it runs on',
  readOnly: 'not modifiable',
  large: 'modifiable, large with an underlying object',
  small: 'modifiable, small and written at once',
  privateToInstance: 'modifiable, private to the instance',
  sharedInInstance: 'shared within the instance, modifiable: each clone gets its own',
  segment: 'an attached SysV segment: follows its segment',
  device: 'a device: nothing of it belongs to the instance',
  log: "the application's log: each instance writes its own",
  tables: "appshot's translation tables: each instance gets its own",
  deleted: 'a deleted file: no name to share, its saved contents are copied',
  sharedWritableFile: 'modifiable and shared through its file with every clone',
  fifo: 'a named pipe: its path is a system-wide name',
  unixListener: 'listens on a system-wide unique unix address',
  unique: 'system-wide unique, not exported',
  sysv: 'system-wide unique id and key, not exported: a new object gets a copy of the contents',
  exported: 'system-wide unique, exported to clients outside',
  wipeOnFork: 'marked MADV_WIPEONFORK: zero in every clone, as in a fork child',
  dontFork: 'marked MADV_DONTFORK: absent from every clone, as from a fork child',
  tcpConnection: 'an established TCP connection: it has one peer, which clones cannot each have',
  tcpClosed: 'a TCP connection recorded closed (snapshot --tcp-close): each clone sees it reset',
} as const;

const decide = (action: Action, reason: string): Decision => ({ action, reason });

function byRule(rules: RulesFile, rule: ResourceRule): Decision {
  return { action: rule.action, reason: `rule ${rules.source}:${rule.line}` };
}

export function classify(image: Image, rules: RulesFile | undefined): Verdict[] {
  return [
    ...image.processes.map(processVerdict),
    ...image.processes.flatMap((p) => p.vmas.map((v) => vmaVerdict(image, p, v, rules))),
    ...image.processes.flatMap((p) => p.fds.map((fd) => fdVerdict(image, p, fd, rules))),
    ...portVerdicts(image, rules),
    ...image.pipes.map(pipeVerdict),
    ...sysvVerdicts(image, rules),
    ...envVerdicts(rules),
  ];
}

/** A resource rule that decided nothing in the image it was applied to. */
export interface UnmatchedRule {
  /** "redis.rules:27" */
  rule: string;
  /** The line as written: "PORT 6379 ALLOCATE". */
  text: string;
}

/**
 * The resource rules no verdict names: a PORT rule for a port the
 * application does not listen on (redis moved to another port: the clones
 * then share the one it has), a segment key it does not hold, a mapping it
 * does not map, or a rule every resource it could name met an earlier rule
 * first. Said by `template create`, because nothing else would: the
 * template is made either way. A FILE rule that copies or duplicates also
 * acts on files opened after the clone resumes (the instance's path
 * table), so it is never idle and is not listed.
 */
export function unmatchedRules(rules: RulesFile | undefined, verdicts: Verdict[]): UnmatchedRule[] {
  if (!rules) return [];
  const decided = new Set(verdicts.map((v) => v.reason));
  const lines = rules.text.split('\n');
  return rules.resources
    .filter((r) => !isPathRule(r) && !decided.has(byRule(rules, r).reason))
    .map((r) => ({ rule: `${rules.source}:${r.line}`, text: (lines[r.line - 1] ?? '').trim() }));
}

// --- processes --------------------------------------------------------------

function processVerdict(p: Process): Verdict {
  return { ref: `pid:${p.vpid}`, kind: 'process', name: `process ${p.vpid} (${p.comm})`, ...decide('virtualize', CRITERIA.unique) };
}

// --- memory -----------------------------------------------------------------

const writableVma = (v: Vma) => (v.prot & PROT_WRITE) !== 0;
const hasStoredPages = (v: Vma) => (v.pages?.runs.length ?? 0) > 0 || (v.pages?.fromParent.length ?? 0) > 0;
const isAnonymous = (v: Vma) => v.kind === VmaKind.ANON || v.kind === VmaKind.SHARED_ANON;

function vmaVerdict(image: Image, p: Process, v: Vma, rules: RulesFile | undefined): Verdict {
  return { ref: verdictRef.vma(p.vpid, v), kind: 'memory', name: vmaName(v), ...vmaDecision(image, v, rules) };
}

/** The tables file every process maps: appshot's, made anew by a restore. */
/** Rules name paths as the application does: the image has them where its
 * REDIR PATH rules (or, for a clone, its private copies) put them. */
const namedPath = (image: Image, path: string) => unredirected(image.instance?.redirs ?? [], path);

const isTables = (image: Image, v: Vma) => image.tablesPath !== '' && v.path === image.tablesPath;

function vmaName(v: Vma): string {
  if (v.kind === VmaKind.SYSV_SHM) return `SysV segment ${v.shmVid}`;
  return v.special || (isAnonymous(v) ? 'anonymous memory' : v.path);
}

function vmaDecision(image: Image, v: Vma, rules: RulesFile | undefined): Decision {
  // What the kernel or appshot provides, and what belongs to a SysV
  // segment, are not the mapping's to decide: no rule applies to them.
  if (v.kind === VmaKind.VDSO || v.kind === VmaKind.VVAR || v.kind === VmaKind.VSYSCALL) return decide('recreate', CRITERIA.kernel);
  if (isTables(image, v)) return decide('recreate', CRITERIA.tables);
  if (v.kind === VmaKind.SYSV_SHM) return decide('virtualize', CRITERIA.segment);
  // A clone is a fork: what the application asked of a fork is not the
  // rules' to undo (memory.ts, forkTreatment).
  const fork = forkTreatment(v);
  if (fork) return decide('recreate', fork === 'wipe' ? CRITERIA.wipeOnFork : CRITERIA.dontFork);
  const rule = memoryRule(image, v, rules);
  if (rule) return byRule(rules!, rule);
  switch (v.kind) {
    case VmaKind.FILE_SHARED:
      return writableVma(v) ? decide('recreate', CRITERIA.sharedWritableFile) : decide('share', CRITERIA.readOnly);
    case VmaKind.FILE_PRIVATE:
      // A read-only mapping whose pages were never written is the file's
      // pages; one written (even if read-only now, as RELRO) has pages of
      // its own in the template.
      return !writableVma(v) && !hasStoredPages(v) ? decide('share', CRITERIA.readOnly) : decide('copy-on-write', CRITERIA.large);
    case VmaKind.SHARED_ANON:
      return decide('duplicate', CRITERIA.sharedInInstance);
    default:
      return v.special === '[stack]' ? decide('duplicate', CRITERIA.small) : decide('copy-on-write', CRITERIA.large);
  }
}

/** A MEMORY rule for the mapping's name or file; for a shared file mapping,
 * whose contents are the file, a FILE rule for the file too. */
function memoryRule(image: Image, v: Vma, rules: RulesFile | undefined): ResourceRule | undefined {
  const access = writableVma(v) ? 'write' : 'read';
  const subject = isAnonymous(v) ? v.special : namedPath(image, v.path);
  return ruleFor(rules, 'memory', subject, access) ?? (v.kind === VmaKind.FILE_SHARED ? ruleFor(rules, 'file', namedPath(image, v.path), access) : undefined);
}

function vmaRefusal(image: Image, v: Vma, action: Action): string | undefined {
  if (forkTreatment(v) === 'absent') return undefined;
  if (v.kind === VmaKind.FILE_SHARED && writableVma(v) && action === 'recreate' && !isTables(image, v))
    return `maps ${v.path} writable and shared: every clone would write into the same file; a FILE rule for it (SHARE, COPY-ON-WRITE or DUPLICATE) decides`;
  if (action === 'share' && writableVma(v) && v.kind !== VmaKind.FILE_SHARED)
    return `${vmaName(v)} is writable: MEMORY ... SHARE applies to read-only mappings only`;
  return undefined;
}

// --- descriptors --------------------------------------------------------------

function fdVerdict(image: Image, p: Process, fd: Fd, rules: RulesFile | undefined): Verdict {
  return { ref: verdictRef.fd(p.vpid, fd), ...fdDecision(image, fd, rules) };
}

function fdDecision(image: Image, fd: Fd, rules: RulesFile | undefined): Described {
  switch (fd.kind) {
    case FdKind.FILE:
      return { kind: 'file', name: fd.path, ...fileDecision(image, fd, rules) };
    case FdKind.DEVICE:
      return { kind: 'device', name: fd.path, ...decide('share', CRITERIA.device) };
    case FdKind.PIPE:
      return { kind: 'pipe', name: `pipe ${fd.pipe} (${fd.writeEnd ? 'write' : 'read'} end)`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.FIFO:
      return { kind: 'fifo', name: fd.path, ...decide('recreate', CRITERIA.fifo) };
    case FdKind.UNIX_SOCKET:
      return fd.socket?.listening
        ? { kind: 'socket', name: `unix ${fd.socket.address}`, ...decide('recreate', CRITERIA.unixListener) }
        : { kind: 'socket', name: 'unix socket pair', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.TCP_LISTEN: {
      const port = virtualPort(image, fd.socket?.port ?? 0);
      const d = portDecision(port, rules);
      return { kind: 'socket', name: tcpName(fd), action: d.action, reason: `listens on port ${port}: ${d.reason}` };
    }
    case FdKind.PIDFD:
      return { kind: 'pidfd', name: `pidfd of process ${fd.procVpid ?? 0}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.UNCONNECTED_STREAM:
      return { kind: 'socket', name: fd.socket ? unconnectedName(fd.socket) : 'unconnected socket', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.UDP:
      return { kind: 'socket', name: `udp ${fd.socket?.address || '(unbound)'}:${fd.socket?.port ?? 0}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.RAW:
      return { kind: 'socket', name: fd.socket ? rawName(fd.socket) : 'raw socket', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.NETLINK:
      return { kind: 'socket', name: `netlink port id ${fd.socket?.netlink?.portId || '(unbound)'}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.UNIX_DGRAM:
      return { kind: 'socket', name: `unix dgram ${fd.socket?.address || '(unnamed)'}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.TCP_ESTABLISHED:
      return { kind: 'socket', name: `tcp ${fd.tcp ? connectionName(fd.tcp) : ''}`, ...decide('recreate', fd.tcp?.closed ? CRITERIA.tcpClosed : CRITERIA.tcpConnection) };
    case FdKind.EVENTFD:
      return { kind: 'eventfd', name: 'eventfd', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.SIGNALFD:
      return { kind: 'signalfd', name: 'signalfd', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.TIMERFD:
      return { kind: 'timerfd', name: 'timerfd', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.INOTIFY:
      // The watches follow paths by name: a clone's REDIR PATH rules do
      // not move them (README: not covered yet).
      return { kind: 'inotify', name: `inotify on ${(fd.inotifyWatches ?? []).map((w) => w.path).join(', ') || 'nothing'}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.FANOTIFY:
      // Marks follow paths by name, as inotify's watches do.
      return { kind: 'fanotify', name: `fanotify on ${(fd.fanotify?.marks ?? []).map((m) => m.path).join(', ') || 'nothing'}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.IO_URING:
      // Each clone makes its own ring, as a restore does.
      return { kind: 'io_uring', name: 'io_uring', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.MQUEUE:
      return { kind: 'mqueue', name: describeMessageQueue(image, fd), ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.EPOLL:
      return { kind: 'epoll', name: 'epoll', ...decide('duplicate', CRITERIA.privateToInstance) };
    case FdKind.PTY:
      // Each clone makes its own pair, as a restore does.
      return { kind: 'pty', name: `pty ${fd.pty?.master ? 'master' : 'slave'}`, ...decide('duplicate', CRITERIA.privateToInstance) };
    default:
      return { kind: 'unknown', name: fd.path, ...decide('recreate', 'not a kind classification knows') };
  }
}

function fileDecision(image: Image, fd: Fd, rules: RulesFile | undefined): Decision {
  if (image.logPath && fd.path === image.logPath) return decide('recreate', CRITERIA.log);
  if (image.tablesPath && fd.path === image.tablesPath) return decide('recreate', CRITERIA.tables);
  // Deleted as the image's file says: a file still there may be named
  // "x (deleted)" (resources/deleted.ts shownFile). The name's end only
  // where the image names no file.
  const file = image.files[fd.file];
  if (file ? file.deleted : fd.path.endsWith(' (deleted)')) return decide('duplicate', CRITERIA.deleted);
  const readOnly = (fd.flags & O_ACCMODE) === O_RDONLY;
  const rule = ruleFor(rules, 'file', namedPath(image, fd.path), readOnly ? 'read' : 'write');
  if (rule) return byRule(rules!, rule);
  return readOnly ? decide('share', CRITERIA.readOnly) : decide('copy-on-write', CRITERIA.large);
}

function fdRefusal(fd: Fd): string | undefined {
  // A clone cannot take over the template's connection (its peer talks to
  // one socket); recorded closed, each clone gets it reset.
  if (fd.kind === FdKind.TCP_ESTABLISHED && fd.tcp && !fd.tcp.closed)
    return `the established TCP connection ${connectionName(fd.tcp)} has one peer, which clones cannot each have (take the snapshot with --tcp-close: every clone then sees it reset)`;
  if (fd.socket?.kept) return 'a unix connection to a process outside the application has one peer, which clones cannot each have';
  // Ports and names are system-wide: every clone cannot bind the same one
  // (port rules cover TCP listeners only, so far).
  if (fd.kind === FdKind.UDP && fd.socket?.port) return `a UDP socket bound to port ${fd.socket.port} cannot be bound by every clone (PORT rules apply to TCP listeners only, so far)`;
  // A port id is unique in the network namespace, and a clone given
  // another would have its program ignore the kernel's answers, which come
  // to the port id it read once (resources/netlink.ts).
  if (fd.kind === FdKind.NETLINK && fd.socket?.netlink?.portId)
    return `a netlink socket bound to port id ${fd.socket.netlink.portId} cannot be bound by every clone (a port id is unique in its network namespace, and the program expects the kernel's answers at the one it has)`;
  if (fd.kind === FdKind.UNIX_DGRAM && fd.socket?.address && !/^@[0-9a-f]{5}$/.test(fd.socket.address))
    return `a unix datagram socket bound to ${fd.socket.address} is system-wide unique and cannot be shared by clones`;
  if (fd.kind === FdKind.UNCONNECTED_STREAM && fd.socket) {
    const problem = templateProblem(fd.socket);
    if (problem) return problem;
  }
  if (fd.kind === FdKind.FIFO) return `a FIFO (named pipe) at ${fd.path} is a system-wide name and cannot be shared by clones`;
  if (fd.kind === FdKind.UNIX_SOCKET && fd.socket?.listening) {
    const where = fd.socket.address.startsWith('@') ? `the abstract address ${fd.socket.address}` : fd.socket.address;
    return `a unix socket listening on ${where} is system-wide unique and cannot be shared by clones`;
  }
  return undefined;
}

// --- ports ------------------------------------------------------------------

const tcpName = (fd: Fd) => `tcp ${fd.socket?.address ?? ''}:${fd.socket?.port ?? 0}`;

/** A TCP port is the application's interface to clients outside: by
 * default every clone answers on it, multiplexed (step 382); a PORT rule
 * may give each clone a port of its own instead (ALLOCATE). */
function portDecision(port: number, rules: RulesFile | undefined): Decision {
  const rule = ruleFor(rules, 'port', port);
  return rule ? byRule(rules!, rule) : decide('multiplex', CRITERIA.exported);
}

/** One verdict per distinct port, whichever processes and addresses listen on it. */
function portVerdicts(image: Image, rules: RulesFile | undefined): Verdict[] {
  const first = new Map<number, Fd>();
  for (const p of image.processes)
    for (const fd of p.fds) {
      const port = fd.kind === FdKind.TCP_LISTEN && fd.socket ? virtualPort(image, fd.socket.port) : undefined;
      if (port !== undefined && !first.has(port)) first.set(port, fd);
    }
  return [...first].map(([port, fd]) => ({ ref: verdictRef.port(port), kind: 'port', name: tcpName(fd), ...portDecision(port, rules) }));
}

// --- pipes, SysV, environment ------------------------------------------------

function pipeVerdict(pipe: Image['pipes'][number], index: number): Verdict {
  return pipe.fifoPath
    ? { ref: `pipe:${index}`, kind: 'fifo', name: pipe.fifoPath, ...decide('recreate', CRITERIA.fifo) }
    : { ref: `pipe:${index}`, kind: 'pipe', name: `pipe ${index}`, ...decide('duplicate', CRITERIA.privateToInstance) };
}

const keyName = (what: string, vkey: number) => (vkey ? `${what} key 0x${(vkey >>> 0).toString(16)}` : `${what} (private)`);

function sysvVerdicts(image: Image, rules: RulesFile | undefined): Verdict[] {
  const one = (ref: string, kind: 'semaphore' | 'shm' | 'msgqueue', what: string, vkey: number): Verdict => {
    const rule = ruleFor(rules, kind, vkey >>> 0);
    return { ref, kind, name: keyName(what, vkey), ...(rule ? byRule(rules!, rule) : decide('virtualize', CRITERIA.sysv)) };
  };
  return [
    ...image.semaphores.map((s) => one(`sem:${s.vid}`, 'semaphore', 'semaphore set', s.vkey)),
    ...image.shmSegments.map((s) => one(`shm:${s.vid}`, 'shm', 'shared memory', s.vkey)),
    ...image.msgQueues.map((q) => one(`msg:${q.vid}`, 'msgqueue', 'message queue', q.vkey)),
  ];
}

/** SET ENV: each instance gets its own value, customized on duplication. */
function envVerdicts(rules: RulesFile | undefined): Verdict[] {
  return (rules?.envs ?? []).map((e) => ({
    ref: `env:${e.name}`,
    kind: 'env',
    name: `${e.name}=${e.value}`,
    action: 'duplicate',
    reason: `rule ${rules!.source}:${e.line}`,
  }));
}

// --- refusals ---------------------------------------------------------------

/**
 * The resources that keep the image from being a template, each named by
 * its process and descriptor or mapping, with why. A resource without a
 * verdict in `verdicts` (an image older than templating) is classified
 * here with `rules`.
 */
export function refusals(image: Image, verdicts: Verdict[], rules: RulesFile | undefined): string[] {
  const byRef = new Map(verdicts.map((v) => [v.ref, v]));
  const out: string[] = [];
  for (const p of image.processes) {
    const owner = `process ${p.vpid} (${p.comm})`;
    for (const fd of p.fds) {
      const why = fdRefusal(fd) ?? queueRefusal(image, fd) ?? lockRefusal(image, fd, byRef.get(verdictRef.fd(p.vpid, fd))?.action ?? fdDecision(image, fd, rules).action);
      if (why) out.push(`${owner} fd ${fd.fd}: ${why}`);
    }
    for (const v of p.vmas) {
      const action = byRef.get(verdictRef.vma(p.vpid, v))?.action ?? vmaDecision(image, v, rules).action;
      const why = vmaRefusal(image, v, action);
      if (why) out.push(`${owner} memory ${v.start.toString(16)}-${v.end.toString(16)}: ${why}`);
    }
  }
  return out;
}
