/**
 * A witness of whether a dead appshot had set any thread to die with it.
 *
 * When a tracer thread exits, the kernel's exit_ptrace (kernel/ptrace.c,
 * called from exit_notify with tasklist_lock held for writing) walks all
 * of that thread's tracees in one pass, sending SIGKILL to each that has
 * PTRACE_O_EXITKILL, and detaches them. So a process appshot traces from
 * the same thread, set to die with it before any thread of the
 * application is, is sent SIGKILL whenever any of them is: found alive
 * and not dying once appshot is gone, none of the application was set to
 * die, whatever processes of it exited by themselves since. Found dead,
 * it says nothing (it may have died first, alone), and the application
 * itself has to be looked at.
 *
 * The witness is `sleep`, started by the snapshot before it freezes the
 * application and journaled at once (ending.ts, EndingJournal.witnessed),
 * so that the next command ends it if the snapshot is killed; it sleeps a
 * day at most, so that one whose entry was never written (appshot killed
 * in between) does not stay.
 */
import { isSameProcess, readStat } from '../procfs.js';
import { addon } from '../native.js';
import { programOnPath } from '../engine/request.js';

/** How long a witness lives if nothing ends it: a witness that exited
 * by itself only sends the next command back to looking at the
 * application. */
const WITNESS_SECONDS = 86_400;

/** A witness, by system PID and start time. */
export interface WitnessId {
  pid: number;
  startTime: number;
}

/** `sleep` as this process found it, once: the engine starts a witness per
 * snapshot, and each search of PATH cost ~9 access() calls. Looked up
 * again if starting it fails (moved, removed). */
let sleepProgram: string | undefined;

/** Starts a witness; undefined if it cannot be (no `sleep`): the next
 * command then looks at the application only. Through posix_spawn
 * (spawnQuiet), not child_process.spawn, whose fork of the whole process
 * cost 5-11 ms; still, posix_spawn holds this thread until the exec, so
 * it is started before the freeze (EndingJournal.witnessed). */
export function startWitness(): WitnessId | undefined {
  try {
    // This process's PATH, not a client's (the engine's command may come
    // with a minimal one): the witness is appshot's, not the command's.
    const sleep = (sleepProgram ??= programOnPath('sleep', `${process.env.PATH ?? ''}:/usr/bin:/bin`));
    if (!sleep) return undefined;
    let pid: number;
    try {
      pid = addon().spawnQuiet(sleep, ['sleep', String(WITNESS_SECONDS)]);
    } catch (e) {
      sleepProgram = undefined;
      throw e;
    }
    const startTime = readStat(pid)?.startTime;
    if (startTime === undefined) return undefined;
    return { pid, startTime };
  } catch {
    return undefined;
  }
}

/** Traced from here, and set to die with this thread (the one that sets
 * the application's threads to die with us, after this). Best effort: a
 * witness that cannot be traced is one found dead. */
export function witnessDiesWithUs(w: WitnessId | undefined): void {
  if (!w || !isSameProcess(w.pid, w.startTime)) return;
  try {
    addon().seize(w.pid, true);
  } catch {
    /* gone, or not ours: says nothing */
  }
}

/** Undoes witnessDiesWithUs. */
export function witnessLivesOn(w: WitnessId | undefined): void {
  if (!w) return;
  try {
    // Its options change only in a ptrace stop; it stays there until it
    // is ended (or let go by our death).
    addon().interrupt(w.pid);
    for (let r; (r = addon().wait(w.pid, 1000)); ) if (r.kind !== 'syscall') break;
    addon().keepOnExit(w.pid);
  } catch {
    /* not traced (gone, or never seized): says nothing either way */
  }
}

/** Ends the witness (reaped by its parent, the engine's reapDetached, or
 * by init once the command's process has left). */
export function endWitness(w: WitnessId | undefined): void {
  if (!w || !isSameProcess(w.pid, w.startTime)) return;
  try {
    process.kill(w.pid, 'SIGKILL');
  } catch {
    return;
  }
}

/** Whether `w`, left by a dead appshot, is alive and was not sent
 * SIGKILL: it enters a ptrace stop (a process sent SIGKILL never does).
 * Ended if it is the witness, either way. */
export function witnessUntouched(w: WitnessId | undefined, timeoutMs: number): boolean {
  if (!w || !isSameProcess(w.pid, w.startTime)) return false;
  try {
    addon().seize(w.pid, false);
  } catch {
    // Gone, dying (exiting), or traced by another: says nothing.
    return false;
  }
  let stopped = false;
  try {
    addon().interrupt(w.pid);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = addon().wait(w.pid, Math.max(deadline - Date.now(), 0));
      if (!r || r.kind === 'exited') break;
      if (r.kind !== 'syscall') {
        stopped = true;
        break;
      }
    }
  } catch {
    /* gone meanwhile */
  }
  // Stopped and held: a PID used again by another process is let go as it
  // was; the witness is ended (its exit, ours to take as its tracer, taken
  // so that its parent can reap it).
  if (readStat(w.pid)?.startTime !== w.startTime) {
    try {
      if (stopped) addon().detach(w.pid, 0);
    } catch {
      /* gone */
    }
    return false;
  }
  try {
    process.kill(w.pid, 'SIGKILL');
    addon().wait(w.pid, 1000);
  } catch {
    /* gone */
  }
  return stopped;
}
