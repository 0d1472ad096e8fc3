/**
 * Process and thread attributes that a restore would otherwise leave as
 * the seed's (silently wrong): the OOM score adjustment, child-subreaper
 * status, transparent huge pages disabled, personality; and per thread,
 * nice value, scheduling policy and priority, CPU affinity, I/O priority
 * and parent-death signal.
 *
 * Read at snapshot from /proc, by the scheduling getters (which take any
 * TID) from appshot's process, and by calls injected into the frozen
 * process only for what the kernel tells the process alone (the prctl
 * getters act on the calling thread or process); set back by
 * calls injected into the restored process before its limits and
 * credentials, which may take away the right to (a lower nice value, a
 * real-time policy). What this user may not grant fails the restore,
 * naming the attribute.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import type { Process, ProcessAttributes, Thread, ThreadAttributes } from '../image/types.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Unsupported } from './context.js';
import { NR } from '../ptrace/inject.js';
import { type Answer, type CallQueue } from '../ptrace/queries.js';
import { addon } from '../native.js';

const PR_SET_PDEATHSIG = 1;
const PR_GET_PDEATHSIG = 2;
const PR_SET_CHILD_SUBREAPER = 36;
const PR_GET_CHILD_SUBREAPER = 37;
const PR_SET_THP_DISABLE = 41;
const PR_GET_THP_DISABLE = 42;
const NR_sched_getparam = 143;
const NR_sched_getscheduler = 145;
const NR_personality = 135;
const NR_sched_getaffinity = 204;
const NR_ioprio_get = 252;
const IOPRIO_WHO_PROCESS = 1;
/** Bytes of CPU mask asked for: 1024 CPUs. */
const AFFINITY_BYTES = 128;
const PRIO_PROCESS = 0;
const SCHED_DEADLINE = 6;
const SCHED_RESET_ON_FORK = 0x40000000;
const PERSONALITY_QUERY = 0xffffffff;

function check(ret: bigint, what: string): bigint {
  if (ret < 0n) throw new Error(`reading ${what}: errno ${-ret}`);
  return ret;
}

/** What only the process tells of its attributes (the prctl getters),
 * asked with the other kinds' questions: whether it is a child subreaper
 * and has THP disabled, and each thread's parent-death signal. */
export interface AttributesAsked {
  subreaper: Answer;
  thpDisabled: Answer;
  pdeathsig: Map<number, Answer>;
}

export function askAttributes(calls: CallQueue, tids: number[]): AttributesAsked {
  return {
    subreaper: calls.ask(NR.prctl, [PR_GET_CHILD_SUBREAPER, 'buf'], { outLength: 4 }),
    thpDisabled: calls.ask(NR.prctl, [PR_GET_THP_DISABLE, 0, 0, 0, 0]),
    // The parent-death signal is only told to the thread itself.
    pdeathsig: new Map(tids.map((tid) => [tid, calls.ask(NR.prctl, [PR_GET_PDEATHSIG, 'buf'], { tid, outLength: 4 })])),
  };
}

/** Fills `p`'s attributes and each of its threads'; `asked`: answered.
 * What a rare refusal leaves to be asked is asked through `calls` then. */
export function dumpAttributes(p: Process, pid: number, asked: AttributesAsked, calls: CallQueue, what: string): void {
  p.attributes = dumpProcessAttributes(pid, asked, what);
  p.personality = dumpPersonality(pid, calls, what);
  for (const t of p.threads) t.attributes = dumpThreadAttributes(pid, t.tid, asked.pdeathsig.get(t.tid)!, calls, what);
}

function dumpProcessAttributes(pid: number, asked: AttributesAsked, what: string): ProcessAttributes {
  check(asked.subreaper.ret, `whether ${what} is a child subreaper`);
  return {
    oomScoreAdj: Number(readFileSync(`/proc/${pid}/oom_score_adj`, 'utf8')),
    childSubreaper: asked.subreaper.out.readInt32LE() !== 0,
    thpDisabled: check(asked.thpDisabled.ret, `THP disable of ${what}`) !== 0n,
  };
}

/** The personality, as the process has it: from /proc/PID/personality,
 * or asked inside the process where that is unreadable to the snapshot's
 * user. */
function dumpPersonality(pid: number, calls: CallQueue, what: string): number {
  try {
    return parseInt(readFileSync(`/proc/${pid}/personality`, 'utf8'), 16);
  } catch {
    return Number(check(calls.askNow(NR_personality, [PERSONALITY_QUERY]).ret, `the personality of ${what}`));
  }
}

/** Policy, priority, affinity and I/O priority, which every thread's
 * getters give for any TID: asked from appshot's process (no stop of the
 * frozen thread), or inside it if that is refused (a security module). */
function schedAttributes(tid: number, calls: CallQueue, what: string): { policy: number; priority: number; affinity: Buffer; ioprio: number } {
  try {
    return addon().schedAttributes(tid);
  } catch {
    /* asked inside the thread below */
  }
  const param = calls.ask(NR_sched_getparam, [tid, 'buf'], { tid, outLength: 4 });
  const policyAsked = calls.ask(NR_sched_getscheduler, [tid], { tid });
  const affinity = calls.ask(NR_sched_getaffinity, [tid, AFFINITY_BYTES, 'buf'], { tid, outLength: AFFINITY_BYTES });
  const ioprio = calls.ask(NR_ioprio_get, [IOPRIO_WHO_PROCESS, tid], { tid });
  calls.run();
  check(param.ret, `the scheduling priority of ${what} thread ${tid}`);
  const policy = Number(check(policyAsked.ret, `the scheduling policy of ${what} thread ${tid}`));
  check(affinity.ret, `the CPU affinity of ${what} thread ${tid}`);
  return {
    policy,
    priority: param.out.readInt32LE(),
    // The kernel writes as many bytes as its CPU mask has.
    affinity: Buffer.from(affinity.out.subarray(0, Number(affinity.ret))),
    ioprio: Number(check(ioprio.ret, `the I/O priority of ${what} thread ${tid}`)),
  };
}

function dumpThreadAttributes(pid: number, tid: number, pdeathsig: Answer, calls: CallQueue, what: string): ThreadAttributes {
  const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
  // Field 19 of proc(5): nice.
  const nice = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
  check(pdeathsig.ret, `the parent-death signal of ${what} thread ${tid}`);
  const sched = schedAttributes(tid, calls, what);
  if ((sched.policy & ~SCHED_RESET_ON_FORK) === SCHED_DEADLINE)
    throw new Unsupported(`${what} thread ${tid}: SCHED_DEADLINE (its runtime, deadline and period) cannot be captured yet`);
  return {
    nice,
    schedPolicy: sched.policy,
    schedPriority: sched.priority,
    pdeathsig: pdeathsig.out.readInt32LE(),
    cpuAffinity: sched.affinity,
    ioprio: sched.ioprio,
  };
}

/* ---- restore ---------------------------------------------------------- */

/** `tids[i]`: the restored TID of p.threads[i]. */
export function restoreAttributes(r: RemoteProcess, p: Process, tids: number[]): void {
  const a = p.attributes;
  if (a) {
    const path = `/proc/${r.pid}/oom_score_adj`;
    if (Number(readFileSync(path, 'utf8')) !== a.oomScoreAdj) {
      try {
        writeFileSync(path, String(a.oomScoreAdj));
      } catch (e) {
        throw new Error(`setting oom_score_adj ${a.oomScoreAdj}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
    }
  }
  // One batch (remote.ts): each call names the thread it acts on.
  r.reset();
  const calls = r.batch();
  if (a?.childSubreaper) calls.add('becoming a child subreaper', SYS.prctl, [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0]);
  if (a?.thpDisabled) calls.add('disabling transparent huge pages', SYS.prctl, [PR_SET_THP_DISABLE, 1, 0, 0, 0]);
  calls.add(`setting personality 0x${p.personality.toString(16)}`, SYS.personality, [p.personality]);
  // A standby's seed carries a parent-death SIGKILL (restore/standby.ts);
  // the process's own, if any, is set after the credentials.
  calls.add('clearing the seed\'s parent-death signal', SYS.prctl, [PR_SET_PDEATHSIG, 0, 0, 0, 0]);
  p.threads.forEach((t: Thread, i) => {
    const ta = t.attributes;
    if (!ta) return;
    const tid = tids[i];
    calls.add(`setting nice ${ta.nice} of thread ${t.vtid}`, SYS.setpriority, [PRIO_PROCESS, tid, ta.nice]);
    const param = Buffer.alloc(4);
    param.writeInt32LE(ta.schedPriority);
    calls.add(`setting scheduling policy ${ta.schedPolicy} of thread ${t.vtid}`, SYS.sched_setscheduler, [tid, ta.schedPolicy, r.put(param)]);
    // A mask naming CPUs this node lacks is cut to those it has; one
    // naming none of them fails.
    if (ta.cpuAffinity?.length) calls.add(`setting the CPU affinity of thread ${t.vtid}`, SYS.sched_setaffinity, [tid, ta.cpuAffinity.length, r.put(ta.cpuAffinity)]);
    if (ta.ioprio !== undefined) calls.add(`setting I/O priority 0x${ta.ioprio.toString(16)} of thread ${t.vtid}`, SYS.ioprio_set, [IOPRIO_WHO_PROCESS, tid, ta.ioprio]);
  });
  calls.run();
}

/** The parent-death signal, after the credentials: the kernel clears it
 * whenever a thread's uids, gids or capabilities change (commit_creds),
 * and before a seccomp filter may refuse prctl. Each acts on the calling
 * thread: run in that thread. */
export function restoreParentDeathSignals(r: RemoteProcess, p: Process, tids: number[]): void {
  p.threads.forEach((t: Thread, i) => {
    const sig = t.attributes?.pdeathsig;
    if (sig) r.call(`setting parent-death signal ${sig} of thread ${t.vtid}`, SYS.prctl, [PR_SET_PDEATHSIG, sig, 0, 0, 0], tids[i]);
  });
}

/** For `inspect`. */
export function describeAttributes(p: Process): string {
  const a = p.attributes;
  const parts = a ? [`oom_score_adj ${a.oomScoreAdj}`, ...(a.childSubreaper ? ['child subreaper'] : []), ...(a.thpDisabled ? ['THP disabled'] : [])] : [];
  if (p.personality) parts.push(`personality 0x${p.personality.toString(16)}`);
  const cpus = (mask: Buffer) => [...mask].flatMap((byte, i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((b) => byte & (1 << b)).map((b) => i * 8 + b));
  const t = p.threads.map((th) => {
    const a = th.attributes;
    if (!a) return undefined;
    const affinity = a.cpuAffinity?.length ? ` cpus ${cpus(a.cpuAffinity).join(',')}` : '';
    return `${th.vtid}: nice ${a.nice} policy ${a.schedPolicy}/${a.schedPriority}${a.pdeathsig ? ` pdeathsig ${a.pdeathsig}` : ''}${affinity} ioprio 0x${(a.ioprio ?? 0).toString(16)}`;
  });
  return [...parts, ...t.filter(Boolean)].join(', ');
}
