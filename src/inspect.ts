/** What `appshot ps` and `appshot table` show: an application's processes
 * and translation tables, read from its tables and /proc; and the signals
 * sent to those processes (lifecycle.ts sequences them). The CLI and the
 * Node API (api.ts) both call these. */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { printable } from './errors.js';
import { addon, ENTRY_FLAGS, kinds, type Kind, type TablesSnapshot } from './native.js';
import { childrenOf, descendantsOf, isSameProcess, readCmdline, readStat } from './procfs.js';
import { type AppRecord, type LocalRegistry, type PortBinding, type SnapshottedRecord, isEnded, isRestoring } from './registry.js';

export interface ProcessRow {
  aid: string;
  vpid: number;
  pid: number;
  /** Virtual PID of the parent; 0 when the parent is outside the app. */
  vppid: number;
  state: string;
  threads: number;
  init: boolean;
  /** Its argv joined by spaces, as ps(1) shows it ('[appshot-init]' for
   * init, '[comm]' for a process without one). */
  command: string;
  /** Its argv as it is (empty for init and a process without one). */
  argv: string[];
}

const { init: INIT_FLAG, thread: THREAD_FLAG, reserved: RESERVED_FLAG } = ENTRY_FLAGS;
/** A table entry's flags by name (native.ts ENTRY_FLAGS): what `table
 * --json` and `inspect --json` print, never the bits. */
export const ENTRY_FLAG_NAMES: Record<number, string> = {
  [INIT_FLAG]: 'init',
  [THREAD_FLAG]: 'thread',
  [ENTRY_FLAGS.hasThreads]: 'has-threads',
  [RESERVED_FLAG]: 'reserved',
  [ENTRY_FLAGS.landlock]: 'landlock',
  [ENTRY_FLAGS.semUndoExec]: 'sem-undo-exec',
};

export function processesOf(record: AppRecord, tables: TablesSnapshot): ProcessRow[] {
  const toVirtual = new Map(tables.tables.pid.map((e) => [e.system, e.virtual]));
  // The application's init, if the process the record names still is it
  // (alive, same start time): never the tables' word, which any process
  // of the application may have rewritten.
  const initPid = record.initPid && record.initPid > 1 && record.initStartTime !== undefined && isSameProcess(record.initPid, record.initStartTime) ? record.initPid : 0;
  const rows: ProcessRow[] = [];
  for (const e of tables.tables.pid) {
    if (e.flags & THREAD_FLAG) continue;
    const st = readStat(e.system);
    if (!st) continue; // died a moment ago; its entry goes at the next reap
    const init = (e.flags & INIT_FLAG) !== 0;
    if (!listed(record, e.system, init, st, initPid)) continue;
    const argv = init ? [] : readCmdline(e.system);
    rows.push({
      aid: record.aid,
      vpid: e.virtual,
      pid: e.system,
      vppid: init ? 0 : (toVirtual.get(st.ppid) ?? 0),
      state: st.state,
      threads: st.threads,
      init,
      command: init ? '[appshot-init]' : argv.join(' ') || `[${st.comm}]`,
      argv,
    });
  }
  return rows.sort((a, b) => a.vpid - b.vpid);
}

/** Whether the process of a table entry is the application's, to list:
 * - its init, while the process the record names is it (same start time),
 *   a zombie too while the live `appshot run` that started it has not
 *   reaped it yet;
 * - while that init lives, a process below it (a zombie whose parent is in
 *   the application, with a table entry or not, as ps(1) shows it), or one
 *   holding the table file or, of its owner's uids, naming it in its
 *   environment (`appshot exec`; appshot_pid_belongs);
 * - once it is dead (kill -9 of a foreground run's process group, say), a
 *   live process holding or naming the tables so, never a zombie:
 *   whatever adopted it has not reaped it, and no init of the application
 *   will drop its entry.
 * A PID reused by another program since the entry was written is none of
 * these (appshot_pid_belongs), and not listed. */
function listed(record: AppRecord, pid: number, init: boolean, st: { state: string; startTime: number; ppid: number }, initPid: number): boolean {
  if (init) {
    // A record that names no init yet (a restore under way): as the tables say.
    if (!record.initPid || record.initStartTime === undefined) return st.state !== 'Z';
    if (pid !== record.initPid || st.startTime !== record.initStartTime) return false;
    // Its zombie, only while the `appshot run` that started it lives on
    // to reap it: once that is gone too, whatever adopted it has not.
    return st.state !== 'Z' || (st.ppid === record.harnessPid && record.harnessStartTime !== undefined && isSameProcess(record.harnessPid, record.harnessStartTime));
  }
  if (!initPid && st.state === 'Z') return false;
  return addon().pidBelongs(pid, initPid, record.tables);
}

/** Sends `sig` to every process of the application but its init, straight
 * (SIGKILL and SIGSTOP cannot be passed on by init; init sees them go and
 * cleans up). The PIDs come from the tables, which any process of the
 * application may have rewritten, whatever its uid: only those that really
 * are the application's are signalled (descendants of its init, or started
 * by `appshot exec`; see appshot_signal_member), through a pidfd. */
export function signalProcesses(reg: LocalRegistry, record: AppRecord, sig: NodeJS.Signals, { settle = false } = {}): void {
  const t = reg.readTables(record);
  const initPid = reg.trustedInitPid(record);
  const signum = (osConstants.signals as Record<string, number>)[sig];
  // Each one tried once; those signalled (the application's, alive).
  const sent = new Set<number>();
  const signalled: number[] = [];
  const send = (pids: number[]) => {
    for (const p of pids) {
      if (sent.has(p)) continue;
      sent.add(p);
      if (addon().signalMember(p, signum, initPid, record.tables)) signalled.push(p);
    }
  };
  const listed = (t?.tables.pid ?? []).filter((e) => !(e.flags & (INIT_FLAG | THREAD_FLAG)) && e.system > 1 && e.system !== initPid).map((e) => e.system);
  // Processes no table names: children made with a raw fork or clone (Go
  // programs, static binaries). Below init, init waits for every one of
  // them. Below a process `appshot exec` started, they go to the node's
  // init once their parent dies, out of every walk: listed before it is
  // signalled.
  const belowInit = new Set(initPid ? descendantsOf(initPid) : []);
  const outside = listed.filter((p) => !belowInit.has(p)).flatMap((p) => descendantsOf(p));
  send(listed);
  send(outside);
  if (!initPid) return;
  // Init's tree again, for those forked meanwhile. A process whose parent
  // dies while a walk reads the tree moves to init (a subreaper) between
  // two reads, and no list read so far names it: init's own children,
  // read again after the walk, do.
  const walk = () => send([...descendantsOf(initPid), ...childrenOf(initPid)]);
  for (let pass = 0, before = -1; pass < 3 && sent.size !== before; pass++) {
    before = sent.size;
    walk();
  }
  if (sig !== 'SIGKILL' || !settle) return;
  // A killed process hands its children on as it exits, from thread to
  // thread of its group and then to init, and a list the kernel shows
  // while it changes can skip one: walked again until every process
  // signalled is a zombie or gone (it has handed its children on by
  // then), for a moment at most. `settle`: for a kill that nothing waits
  // for after it; stop and rm wait, and kill again while they do, with
  // every application killed at once.
  const deadline = Date.now() + KILL_SETTLE_MS;
  while (signalled.some((p) => isSameProcess(p, undefined)) && Date.now() < deadline) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 2);
    walk();
  }
  walk();
}

/** How long one SIGKILL of an application waits at most for what it
 * killed to exit, to find the children they leave (signalProcesses). */
const KILL_SETTLE_MS = 200;

export function listProcesses(registry: LocalRegistry, records: AppRecord[]): ProcessRow[] {
  return records.flatMap((r) => {
    const t = registry.readTables(r);
    return t ? processesOf(r, t) : [];
  });
}

/** A TCP port an application listens on, as `ps` and `port` show it:
 * `virtual` is the port it asked for, `system` the one it has. `direct`:
 * one no rule translates (the two are the same). */
export interface ListeningPort {
  virtual: number;
  system: number;
  mode: PortBinding['mode'] | 'direct';
}

/** The TCP listening sockets of one network namespace, socket inode ->
 * local port, from /proc/PID/net/tcp and tcp6 (state 0A is LISTEN). */
function listeningSockets(pid: number): Map<string, number> {
  const byInode = new Map<string, number>();
  for (const table of ['tcp', 'tcp6']) {
    let text: string;
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue; // gone, or no IPv6 in this kernel
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && f[3] === '0A') byInode.set(f[9], parseInt(f[1].slice(f[1].lastIndexOf(':') + 1), 16));
    }
  }
  return byInode;
}

/** The listening sockets of each network namespace (by its
 * /proc/PID/ns/net link), read once per `ps` however many applications
 * share it: the tables list every TCP socket of the namespace, and reading
 * them costs milliseconds on a busy machine. */
export type ListeningCache = Map<string, Map<string, number>>;

/** The socket inodes among the descriptors of `pid`. */
function socketInodes(pid: number): string[] {
  const inodes: string[] = [];
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m) inodes.push(m[1]);
  }
  return inodes;
}

/** Every TCP port the processes `pids` listen on (system ports): the
 * listening sockets of their network namespaces that one of their
 * descriptors holds. A process that holds no socket costs no read of the
 * namespace's tables. A process that ended meanwhile, or whose /proc we
 * may not read, counts for nothing. */
export function listeningPortsOf(pids: number[], cache: ListeningCache = new Map()): number[] {
  const ports = new Set<number>();
  for (const pid of pids) {
    try {
      const inodes = socketInodes(pid);
      if (!inodes.length) continue;
      const ns = readlinkSync(`/proc/${pid}/ns/net`);
      let listening = cache.get(ns);
      if (!listening) cache.set(ns, (listening = listeningSockets(pid)));
      for (const inode of inodes) {
        const port = listening.get(inode);
        if (port) ports.add(port);
      }
    } catch {
      // ended, or not ours to read
    }
  }
  return [...ports];
}

/** The ports of `record`: the translations the registry knows of and every
 * other port its processes listen on, by the port the application asked
 * for. An ended application has none. `cache`: shared by the applications
 * of one listing. */
export function portsOf(record: AppRecord, processes: ProcessRow[], cache: ListeningCache = new Map()): ListeningPort[] {
  if (isEnded(record)) return [];
  const bound: ListeningPort[] = [...(record.ports ?? [])];
  const known = new Set(bound.map((b) => b.system));
  const pids = processes.filter((p) => p.aid === record.aid && !p.init).map((p) => p.pid);
  for (const port of listeningPortsOf(pids, cache)) if (!known.has(port)) bound.push({ virtual: port, system: port, mode: 'direct' });
  return bound.sort((a, b) => a.virtual - b.virtual || a.system - b.system);
}

/** `6379->20001` (allocated), `6379 (shared)` (multiplexed), `8080`. */
export function portText(p: ListeningPort): string {
  return p.mode === 'allocate' ? `${p.virtual}->${p.system}` : p.mode === 'multiplex' ? `${p.virtual} (shared)` : String(p.virtual);
}

/** What every application `ps` lists has, whatever its state. */
interface ApplicationCommon {
  aid: string;
  /** The command it was run with, as `argv` (the name every output uses
   * for an argument vector: a process's `command` is a line of text). */
  argv: string[];
  /** @deprecated The same as argv: appshot.ps/1 has it. */
  command: string[];
  detached: boolean;
  /** When it was run, restored or cloned. */
  createdAt: string;
  /** A clone: the template it was stamped from and its number in the batch. */
  template?: { path: string; instance: number };
  /** A clone's private copies of files. */
  privateRoot?: string;
  /** Every TCP port it listens on, translated or not; none once ended. */
  ports: ListeningPort[];
  /** Its live processes; none once ended. */
  processes: ProcessRow[];
}

/** Running, or `restoring`: a restore or clone under way, not committed
 * yet. */
export interface LiveApplicationInfo extends ApplicationCommon {
  state: 'running' | 'restoring';
  /** Restored: the image it came from. */
  image?: string;
}

/** Ended, kept until `rm` or `prune` (`ps -a`). */
export interface ExitedApplicationInfo extends ApplicationCommon {
  state: 'exited';
  /** 128 + N if signal N ended it; absent if `lost`. */
  exitCode?: number;
  /** Its init was killed with it: nobody wrote how it ended; kept for
   * `rm` to remove the data made for it (a clone's private copies, REDIR
   * PATH directories). */
  lost?: true;
  endedAt: string;
  /** Restored: the image it came from. */
  image?: string;
}

/** Ended by a snapshot and not restored under its AID since (`ps -a`);
 * that restore takes its place, `rm` and `prune` remove its record. */
export interface SnapshottedApplicationInfo extends ApplicationCommon {
  state: 'snapshotted';
  /** The image it went into ('-': a stream on standard output). */
  image: string;
  snapshottedAt: string;
  ports: [];
  processes: [];
}

/** One application as `appshot ps --json` shows it (docs/json.md), by
 * its `state`. */
export type ApplicationInfo = LiveApplicationInfo | ExitedApplicationInfo | SnapshottedApplicationInfo;
export type ApplicationState = ApplicationInfo['state'];

/** The applications one `ps` lists: registrations, and the records of
 * those a snapshot ended. */
export interface Listing {
  records: AppRecord[];
  snapshotted: SnapshottedRecord[];
}

/** What `ps [AID] [-a]` lists: the running applications, with `all` the
 * ended ones and those a snapshot ended too; with `aid`, only that one (an
 * unknown AID, or without `all` one that is not running, throws as
 * require does). */
export function selectApplications(registry: LocalRegistry, aid: string | undefined, all: boolean): Listing {
  if (aid === undefined)
    // Clones the engine holds ready (template/pool.ts) only with -a.
    return { records: registry.list().filter((r) => all || (!isEnded(r) && !r.heldReady)), snapshotted: all ? registry.listSnapshotted() : [] };
  if (!all) return { records: [registry.require(aid)], snapshotted: [] };
  // A registration of the AID is the one shown (a restore of its image
  // under way, or one that ended since).
  const one = registry.get(aid) ? undefined : registry.getSnapshotted(aid);
  return one ? { records: [], snapshotted: [one] } : { records: [registry.requireAny(aid)], snapshotted: [] };
}

const byAid = (a: { aid: string }, b: { aid: string }) => (a.aid < b.aid ? -1 : a.aid > b.aid ? 1 : 0);

/** The AIDs of a listing, in order (`ps -q`). */
export function listedAids(listing: Listing): string[] {
  return [...listing.records, ...listing.snapshotted].sort(byAid).map((r) => r.aid);
}

/** The applications of `listing` with their live processes and ports, in
 * AID order: `ps --json` and the API's ps(). */
export function describeApplications(registry: LocalRegistry, listing: Listing): ApplicationInfo[] {
  const rows = listProcesses(registry, listing.records);
  const cache: ListeningCache = new Map();
  const registered = listing.records.map((r): ApplicationInfo => {
    const common = {
      argv: r.command,
      command: r.command,
      detached: r.detached,
      createdAt: r.createdAt,
      ...(r.image ? { image: r.image } : {}),
      ...(r.template ? { template: r.template } : {}),
      ...(r.privateRoot ? { privateRoot: r.privateRoot } : {}),
      ports: portsOf(r, rows, cache),
      processes: rows.filter((p) => p.aid === r.aid),
    };
    return isEnded(r)
      ? { aid: r.aid, state: 'exited', ...(r.lost ? { lost: true as const } : { exitCode: r.exitCode! }), endedAt: r.endedAt!, ...common }
      : { aid: r.aid, state: isRestoring(r) ? 'restoring' : 'running', ...common };
  });
  const snapshotted = listing.snapshotted.map(
    (r): SnapshottedApplicationInfo => ({
      aid: r.aid,
      state: 'snapshotted',
      image: r.image,
      snapshottedAt: r.snapshottedAt,
      argv: r.command,
      command: r.command,
      detached: r.detached,
      createdAt: r.createdAt,
      ...(r.template ? { template: r.template } : {}),
      ...(r.privateRoot ? { privateRoot: r.privateRoot } : {}),
      ports: [],
      processes: [],
    }),
  );
  return [...registered, ...snapshotted].sort(byAid);
}

const KEY_KINDS: Kind[] = ['semkey', 'shmkey', 'msgkey'];

/** IPC keys read best in hex, as ipcs prints them. */
export function formatId(kind: Kind, id: number): string {
  return KEY_KINDS.includes(kind) ? `0x${(id >>> 0).toString(16).padStart(8, '0')}` : String(id);
}

export function tableRows(tables: TablesSnapshot): { kind: Kind; virtual: number; system: number; note: string }[] {
  return kinds.flatMap((kind) =>
    [...tables.tables[kind]]
      .sort((a, b) => a.virtual - b.virtual)
      .map((e) => ({
        kind,
        virtual: e.virtual,
        system: e.system,
        note: e.flags & INIT_FLAG ? 'init' : e.flags & THREAD_FLAG ? `thread of ${e.owner}` : e.flags & RESERVED_FLAG ? 'reserved' : '',
      })),
  );
}

/** One argument as a shell needs it written to get it back: as it is if
 * nothing in it is special to a shell, else in single quotes (an empty
 * one too, which would vanish otherwise). */
export function shellWord(arg: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

/** An argv as one command line a shell would run as that argv. */
export function shellCommand(argv: string[]): string {
  return argv.map(shellWord).join(' ');
}

/** How ps's tables show a process's command: its argv quoted as a shell
 * would need it. */
export function processCommand(p: ProcessRow): string {
  return p.argv.length ? shellCommand(p.argv) : p.command;
}

/** Prints rows as aligned columns under a header, control characters
 * escaped. */
export function printColumns(header: string[], table: string[][], out: (s: string) => void = (s) => process.stdout.write(s)): void {
  const rows = table.map((r) => r.map(printable));
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ').trimEnd();
  out([line(header), ...rows.map(line)].join('\n') + '\n');
}
