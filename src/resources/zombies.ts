/**
 * Zombies: children that exited and that their parent has not waited for
 * yet. The parent will reap them (waitpid on their PID, or on any child)
 * and read their exit status, so they must be there after a restore: each
 * is a seed forked from the restored parent that dies at once the way the
 * child did (exit_group with its status, or the signal that killed it),
 * its virtual PID bound to the seed's PID.
 *
 * Not carried: the zombie's resource usage (wait4's rusage, the parent's
 * RUSAGE_CHILDREN) and the core-dumped bit of a child killed by a signal
 * that dumps core (the seed dies without a core).
 */
import { readFileSync } from 'node:fs';
import { type Thread, type Zombie } from '../image/types.js';
import { addon } from '../native.js';
import { childrenOfThread, readStat } from '../procfs.js';
import { RemoteProcess, SYS } from '../ptrace/remote.js';
import { freeAddress, readMaps } from './memory.js';
import type { DumpContext } from './context.js';

const SIGCHLD = 17;
const SIGKILL = 9;
const SIGSTOP = 19;
const SIG_DFL = 0n;
const RLIMIT_CORE = 4;
const PR_SET_NAME = 15;
const EAGAIN = 11;

/** The zombie children of `pid` (from each of its `threads`' children
 * list), with the status waitpid will report (field 52 of /proc/PID/stat)
 * and the thread that forked them, if not the main one (its parent in the
 * kernel: __WNOTHREAD waits reap it from there only). */
export function dumpZombies(ctx: DumpContext, pid: number, threads: Pick<Thread, 'tid' | 'vtid'>[]): Zombie[] {
  const out: Zombie[] = [];
  for (const t of threads) {
    for (const child of childrenOfThread(pid, t.tid)) {
      let stat: string;
      try {
        stat = readFileSync(`/proc/${child}/stat`, 'utf8');
      } catch {
        continue; // reaped meanwhile
      }
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // f[i] is field i + 3 of proc(5).
      if (f[0] !== 'Z') continue;
      const zombie: Zombie = { vpid: ctx.virtual('pid', child), status: Number(f[49]), comm: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) };
      if (t.tid !== pid) zombie.parentVtid = t.vtid;
      out.push(zombie);
    }
  }
  return out.sort((a, b) => a.vpid - b.vpid);
}

/**
 * Makes `p`'s zombies, while the tree is made: `forkFrom` forks a traced,
 * stopped seed from the parent's thread `tid`, `forkingTid` tells which
 * thread forks a zombie (the one that had forked it). Returns their
 * virtual -> system PIDs, to be bound in the tables. The SIGCHLD each
 * death sends the parent is taken back: it had them (or the image's
 * pending signals say so) already.
 */
export function restoreZombies(parent: RemoteProcess, zombies: Zombie[] | undefined, forkFrom: (pid: number, tid: number) => number, forkingTid: (z: Zombie) => number): Map<number, number> {
  const made = new Map<number, number>();
  for (const z of zombies ?? []) {
    const pid = forkFrom(parent.pid, forkingTid(z));
    made.set(z.vpid, pid);
    // One read of its maps for both its vDSO (the scratch area's mmap is
    // its first call) and a free place for the scratch area: nothing runs
    // in it between.
    const maps = readMaps(pid);
    const seed = new RemoteProcess(pid, maps.find((l) => l.path === '[vdso]'));
    const signal = z.status & 0x7f;
    seed.mapScratch(freeAddress(maps, BigInt(RemoteProcess.scratchSize)));
    // Named as it was (ps shows a zombie by its name).
    seed.call(`naming zombie ${z.vpid}`, SYS.prctl, [PR_SET_NAME, seed.str(z.comm.slice(0, 15))]);
    if (signal) {
      // Killed by a signal: its default action, unblocked, without a core.
      // SIGKILL's and SIGSTOP's action is the default always (setting it
      // is EINVAL).
      seed.reset();
      if (signal !== SIGKILL && signal !== SIGSTOP) {
        const action = seed.put(seed.u64s([SIG_DFL, 0n, 0n, 0n]));
        seed.call(`resetting signal ${signal} in zombie ${z.vpid}`, SYS.rt_sigaction, [signal, action, 0, 8]);
      }
      seed.call(`setting RLIMIT_CORE in zombie ${z.vpid}`, SYS.prlimit64, [0, RLIMIT_CORE, seed.put(seed.u64s([0n, 0n])), 0]);
      seed.unmapScratch();
      addon().setSigmask(pid, 0n);
      process.kill(pid, signal);
      // SIGKILL ends it at once, traced or not: its exit is ours to wait
      // for, which hands it on to its real parent as a zombie (as the
      // exit_group below); any other signal is let go with it.
      if (signal === SIGKILL) waitKilledSeed(pid, z);
      else addon().detach(pid, 0);
    } else {
      // Exited: the tracer's wait for its exit (inside the injection)
      // hands it on to its real parent as a zombie.
      try {
        seed.raw(SYS.exit_group, [(z.status >> 8) & 0xff]);
      } catch {
        /* it did not come back from exit_group: as intended */
      }
    }
    waitZombie(pid, z);
  }
  if (made.size) takeBackSigchld(parent);
  return made;
}

/** The traced seed of zombie `z`, sent SIGKILL: its exit waited for as its
 * tracer (reports before it, of a stop the kill overtook, passed over). */
function waitKilledSeed(pid: number, z: Zombie): void {
  const until = Date.now() + 10_000;
  for (;;) {
    const left = until - Date.now();
    const report = left > 0 ? addon().wait(pid, left) : null;
    if (report?.kind === 'exited') return;
    if (!report) throw new Error(`zombie ${z.vpid}: its seed did not end within 10 s of SIGKILL`);
  }
}

/** Waits (up to 2 s) for the seed to be a zombie with the child's status. */
function waitZombie(pid: number, z: Zombie): void {
  const until = Date.now() + 2000;
  while (Date.now() < until) {
    if (readStat(pid)?.state === 'Z') {
      const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const status = Number(text.slice(text.lastIndexOf(')') + 2).split(' ')[49]);
      if (status !== z.status) throw new Error(`zombie ${z.vpid} came back with status ${status}, not ${z.status}`);
      return;
    }
  }
  throw new Error(`zombie ${z.vpid} (${z.comm}) could not be made again`);
}

/** Consumes the parent's pending SIGCHLDs (every signal of a seed is
 * blocked, so they wait there). */
function takeBackSigchld(parent: RemoteProcess): void {
  parent.mapScratch(freeAddress(readMaps(parent.pid), BigInt(RemoteProcess.scratchSize)));
  try {
    for (;;) {
      parent.reset();
      const set = parent.put(parent.u64s([1n << BigInt(SIGCHLD - 1)]));
      const zero = parent.put(parent.u64s([0n, 0n]));
      const got = parent.raw(SYS.rt_sigtimedwait, [set, 0, zero, 8]);
      if (got === BigInt(-EAGAIN)) return;
      if (got < 0n) throw new Error(`taking back SIGCHLD failed (errno ${-got})`);
    }
  } finally {
    parent.unmapScratch();
  }
}
