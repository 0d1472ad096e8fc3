/**
 * The time namespace (time_namespaces(7)): CLOCK_MONOTONIC and
 * CLOCK_BOOTTIME as a process reads them are the node's plus its
 * namespace's offsets. A process restored into appshot's own namespace
 * with other offsets would see both clocks jump (by days, for a container
 * started with its boot time at zero): every timeout and interval it
 * computed from them wrong, and nothing would say so.
 *
 * At snapshot each process's offsets are recorded (/proc/PID/timens_offsets,
 * readable by anyone who may trace it). A restore whose node offsets differ
 * from the ones the application had makes a time namespace with them:
 * appshot-init unshares one before it forks the seeds (--timens), which the
 * whole tree is then forked into. The unshare needs CAP_SYS_ADMIN, the
 * writing of its offsets CAP_SYS_TIME too (a container given only
 * SYS_ADMIN has not), and the kernel takes only offsets that keep each
 * clock of this node between 0 and KTIME_SEC_MAX / 2 seconds (a boot
 * clock set back to zero on a node that has been up for less time than
 * the one it ran on cannot be had): without either, the restore is
 * refused by name before anything is made. Where they are the same (the
 * usual case: both in the node's namespace) nothing is done.
 */
import { readFileSync } from 'node:fs';
import { AppshotError, ExitCode } from '../errors.js';
import type { Image, TimeOffsets } from '../image/types.js';
import { nameProcess, Unsupported } from './context.js';
import { CAP, capName, hasCap, type OwnCreds } from './creds.js';
import { procLink, procText } from '../procfs.js';

const NS_PER_S = 1_000_000_000n;
/** The kernel's limit on a clock (KTIME_MAX in seconds): an offset's
 * seconds must lie within ±this, a clock with it within [0, this / 2]
 * (kernel/time/namespace.c, proc_timens_set_offset). */
const KTIME_SEC_MAX = 9_223_372_036n;

/** /proc/PID/timens_offsets: "monotonic S NS" and "boottime S NS" lines
 * (the clocks may be named by number on older kernels: 1 and 7). The
 * offsets of the namespace PID's children go into, which is PID's own but
 * after an unshare it has not forked from. Undefined on a kernel without
 * time namespaces. */
export function readTimeOffsets(pid: number | 'self'): TimeOffsets | undefined {
  let text: string;
  try {
    // Gathered with the rest of a frozen process's /proc (procfs.ts), else
    // read now.
    text = procText(`/proc/${pid}/timens_offsets`);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const out: TimeOffsets = { monotonicNs: 0n, boottimeNs: 0n };
  for (const line of text.split('\n')) {
    const [clock, s, ns] = line.trim().split(/\s+/);
    if (!clock || s === undefined || ns === undefined) continue;
    const total = BigInt(s) * NS_PER_S + BigInt(ns);
    if (clock === 'monotonic' || clock === '1') out.monotonicNs = total;
    else if (clock === 'boottime' || clock === '7') out.boottimeNs = total;
  }
  return out;
}

const nsLink = (pid: number, which: string): string | undefined => {
  try {
    return procLink(`/proc/${pid}/ns/${which}`);
  } catch {
    return undefined;
  }
};

/** Process `pid`'s offsets, for the image; a process that unshared a time
 * namespace it has not entered (its children would run in another one
 * than its own) is refused: one namespace is made at restore. */
export function dumpTimeOffsets(pid: number, where: string): TimeOffsets | undefined {
  const own = nsLink(pid, 'time');
  if (own === undefined) return undefined;
  if (own !== nsLink(pid, 'time_for_children'))
    throw new Unsupported(`${where} made a time namespace for its children that it is not in itself, which cannot be captured`);
  return readTimeOffsets(pid);
}

const seconds = (ns: bigint) => {
  const s = Number(ns) / 1e9;
  return `${s >= 0 ? '+' : ''}${Number.isInteger(s) ? s : s.toFixed(3)} s`;
};

const same = (a: TimeOffsets, b: TimeOffsets) => a.monotonicNs === b.monotonicNs && a.boottimeNs === b.boottimeNs;

/** At snapshot: every process of one application in namespaces with the
 * same offsets (a restore makes one). */
export function checkOneTimeNamespace(processes: { vpid: number; comm: string; timeOffsets?: TimeOffsets }[]): void {
  const first = processes.find((p) => p.timeOffsets);
  if (!first) return;
  const other = processes.find((p) => p.timeOffsets && !same(p.timeOffsets, first.timeOffsets!));
  if (other)
    throw new Unsupported(`${nameProcess(other.vpid, other.comm)} runs in a time namespace with other clock offsets than ${nameProcess(first.vpid, first.comm)}'s, which cannot be captured`);
}

/**
 * Before a restore makes anything: the offsets the application's time
 * namespace must have, or undefined where the restore's own (the seeds')
 * are those already, or the image does not say (taken by an appshot that
 * did not record them). An application restored with CAP_SYS_ADMIN gets
 * a namespace of its own; without, the restore is refused, naming the
 * offsets.
 */
export function timeNamespaceFor(image: Image, creds: Pick<OwnCreds, 'capEff'>, own = readTimeOffsets('self')): TimeOffsets | undefined {
  const recorded = image.processes.filter((p) => p.timeOffsets);
  if (!recorded.length) return undefined;
  const want = recorded[0].timeOffsets!;
  const other = recorded.find((p) => !same(p.timeOffsets!, want));
  if (other) throw new AppshotError(`corrupt image: ${nameProcess(other.vpid, other.comm)} has other time namespace offsets than ${nameProcess(recorded[0].vpid, recorded[0].comm)}`);
  const here = own ?? { monotonicNs: 0n, boottimeNs: 0n };
  if (same(want, here)) return undefined;
  const what = `${nameProcess(recorded[0].vpid, recorded[0].comm)} ran in a time namespace whose clocks differ from this restore's (CLOCK_MONOTONIC ${seconds(want.monotonicNs - here.monotonicNs)}, CLOCK_BOOTTIME ${seconds(want.boottimeNs - here.boottimeNs)})`;
  if (!own) throw new AppshotError(`${what}, and this kernel has no time namespaces`, ExitCode.denied);
  const missing = [CAP.SYS_ADMIN, CAP.SYS_TIME].filter((c) => !hasCap(creds.capEff, c));
  if (missing.length)
    throw new AppshotError(`${what}: making one with its offsets needs CAP_SYS_ADMIN and CAP_SYS_TIME (this restore lacks ${missing.map(capName).join(' and ')})`, ExitCode.denied);
  const clocks = nodeClocks(here);
  for (const [name, offset, node] of [['CLOCK_MONOTONIC', want.monotonicNs, clocks.monotonicNs], ['CLOCK_BOOTTIME', want.boottimeNs, clocks.boottimeNs]] as const) {
    const s = offset / NS_PER_S;
    const at = (node + offset) / NS_PER_S;
    if (s > KTIME_SEC_MAX || s < -KTIME_SEC_MAX || node + offset < 0n || at > KTIME_SEC_MAX / 2n)
      throw new AppshotError(`${what}: this node's ${name} with that offset would read ${seconds(node + offset).replace(/^\+/, '')}, outside what the kernel allows (0 to ${KTIME_SEC_MAX / 2n} s)`, ExitCode.denied);
  }
  return want;
}

/** This node's CLOCK_MONOTONIC and CLOCK_BOOTTIME (outside any time
 * namespace), as the kernel checks offsets against them: ours less the
 * offsets of the namespace we run in (`own`). Boot time from /proc/uptime
 * (namespaced as well; to 10 ms, enough for a range check). */
function nodeClocks(own: TimeOffsets): TimeOffsets {
  const monotonic = process.hrtime.bigint();
  const [up] = readFileSync('/proc/uptime', 'utf8').split(' ');
  const [whole, frac = '0'] = up.split('.');
  const boottime = BigInt(whole) * NS_PER_S + BigInt(frac.padEnd(9, '0').slice(0, 9));
  return { monotonicNs: monotonic - own.monotonicNs, boottimeNs: boottime - own.boottimeNs };
}

/** appshot-init's --timens value: "MONOTONIC_NS,BOOTTIME_NS". */
export const timeNamespaceArgument = (t: TimeOffsets): string => `${t.monotonicNs},${t.boottimeNs}`;
