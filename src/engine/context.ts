/**
 * Whether a client runs in the same execution context as the engine: a
 * command the engine runs for it runs with the engine's rights, limits,
 * filters, cgroup and namespaces, not the client's. A client that differs
 * (it dropped capabilities, runs under a seccomp filter or lower limits,
 * in another namespace or cgroup, chrooted) runs its command itself: the
 * engine must never lend it more than it has, nor give it a different
 * result from what it would have had alone.
 *
 * Read from /proc of the peer's PID as SO_PEERCRED gives it: the client
 * stays connected while this is read, so the PID is still its.
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';

const STATUS_FIELDS = ['Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp', 'Seccomp_filters'];

function statusFields(pid: number | 'self'): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    const key = line.slice(0, colon);
    if (STATUS_FIELDS.includes(key) || key === 'TracerPid') out.set(key, line.slice(colon + 1).trim());
  }
  return out;
}

function namespaces(pid: number | 'self'): Map<string, string> {
  const out = new Map<string, string>();
  for (const ns of readdirSync(`/proc/${pid}/ns`)) {
    // pid_for_children and time_for_children follow unshare(), not the
    // process: a client that unshared has a different pid or time
    // namespace too, which `pid`/`time` do not show until it forks.
    out.set(ns, readlinkSync(`/proc/${pid}/ns/${ns}`));
  }
  return out;
}

function rootOf(pid: number | 'self'): string {
  const st = statSync(`/proc/${pid}/root/`);
  return `${st.dev}:${st.ino}`;
}

function lsmLabel(pid: number | 'self'): string {
  try {
    return readFileSync(`/proc/${pid}/attr/current`, 'utf8').replace(/\0/g, '').trim();
  } catch {
    return '';
  }
}

export interface Context {
  status: Map<string, string>;
  ns: Map<string, string>;
  cgroup: string;
  limits: string;
  root: string;
  lsm: string;
}

export function readContext(pid: number | 'self'): Context {
  return {
    status: statusFields(pid),
    ns: namespaces(pid),
    cgroup: readFileSync(`/proc/${pid}/cgroup`, 'utf8'),
    limits: readFileSync(`/proc/${pid}/limits`, 'utf8'),
    root: rootOf(pid),
    lsm: lsmLabel(pid),
  };
}

/** The parts of the engine's own context that only the engine itself
 * could change (its credentials, filters, namespaces, root, label: it
 * never does), read once; its cgroup and limits, which anyone with the
 * rights may change from outside (a move to another cgroup, prlimit),
 * read again for every request. */
let ownFixed: Omit<Context, 'cgroup' | 'limits'> | undefined;

export function ownContext(): Context {
  if (!ownFixed) {
    const { cgroup: _cgroup, limits: _limits, ...fixed } = readContext('self');
    ownFixed = fixed;
  }
  return { ...ownFixed, cgroup: readFileSync('/proc/self/cgroup', 'utf8'), limits: readFileSync('/proc/self/limits', 'utf8') };
}

/** What differs between the engine's context and the client's, in a few
 * words; undefined if nothing does (or the client's cannot be read: then
 * it differs, "unreadable"). */
export function contextDifference(engine: Context, clientPid: number): string | undefined {
  let client: Context;
  try {
    client = readContext(clientPid);
  } catch (e) {
    return `its context is unreadable (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`;
  }
  for (const key of STATUS_FIELDS) if (engine.status.get(key) !== client.status.get(key)) return `its ${key} differs`;
  // A traced client (strace, a debugger): whoever traces it wants to see
  // the command run, which it would not in the engine.
  if ((client.status.get('TracerPid') ?? '0') !== '0') return 'it is being traced';
  for (const [ns, link] of engine.ns) if (client.ns.get(ns) !== link) return `its ${ns} namespace differs`;
  if (engine.cgroup !== client.cgroup) return 'its cgroup differs';
  if (engine.limits !== client.limits) return 'its resource limits differ';
  if (engine.root !== client.root) return 'its root directory differs';
  if (engine.lsm !== client.lsm) return 'its security label differs';
  return undefined;
}
