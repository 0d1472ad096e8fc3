import { existsSync, readFileSync, writeFileSync } from 'node:fs';

/**
 * Test-only points in the phases a restore or a clone batch goes through,
 * and a few elsewhere (APPSHOT_DEBUG=1 prints them as it reaches them):
 *
 * - APPSHOT_TEST_KILL_AT=NAME makes appshot kill itself with SIGKILL when
 *   it reaches the point NAME, so that tests can prove a command killed at
 *   any instant leaves nothing half-done;
 * - APPSHOT_TEST_STOP_AT=NAME makes it stop itself (SIGSTOP) there, so that
 *   a test can send it a signal at that exact point, deterministically, and
 *   then continue it (SIGCONT): Ctrl-C in the middle of a long phase
 *   without guessing how long the phase takes;
 * - APPSHOT_TEST_FAIL_AT=NAME makes the step there fail (an Error thrown),
 *   as a write that fails or a hook that throws would, so that tests can
 *   prove what an error at that point leaves.
 *
 * Some points are inside the addon, where no JavaScript runs between the
 * two steps they separate: 'restore: sysv object made' (addon_restore.cc,
 * CreateBound), once the kernel has made a keyed SysV object and before
 * its id is in the tables; 'batch: running' (trace.c, KILL_AT or STOP_AT),
 * a thread running one injected batch; 'batches: running at once' (the
 * same), every thread of a round let go into its batch (runAtOnce);
 * 'restore: executable made at its name' (exename.c, KILL_AT or STOP_AT),
 * a deleted executable's copy made at the program's own name and not yet
 * removed from it, where a test kills the restore (the next command must
 * remove the file: registry.ts madeExecutableNames) or, stopped, moves,
 * links or swaps what is in its directory (test/exe-deleted.test.ts).
 *
 * 'run: init spawned' (harness.ts): `appshot run`'s application started,
 * its supervisor's PID not yet in its record (FAIL_AT there: a start that
 * fails with the application running, which `run` ends, init included,
 * before it releases the registration: harness.ts endSpawned); 'signal:
 * waiting for the supervisor' (lifecycle.ts requireSignallable): kill,
 * stop or rm -f has read such a record as running, and is about to wait
 * for that PID (test/lifecycle2.test.ts); 'supervisor: reading the record
 * again' (registry.ts requireSupervised): such a command, or a snapshot,
 * at each pass of that wait before it reads the record again, where a
 * test replaces the registration under the same AID. 'settle: found
 * stale' (registry.ts settle): a registration looked at and found stale,
 * its record not read again yet; 'release: state directory checked'
 * (registry.ts removeStateDirOf): its record checked to be the one
 * released, the directory not yet moved aside. At both a test releases
 * the registration and registers the AID again (test/reregistered.test.ts).
 * 'stop: signalled' (lifecycle.ts stopApp) and 'rm -f: killed'
 * (lifecycle.ts removeApps): the signal sent, its end not yet waited for,
 * where a test removes the ended application and registers its AID again.
 *
 * 'restore: mappings checked' (memory.ts restoreMemory): each file a root
 * restore's process is to map opened as that process, before the process
 * maps any, where a test swaps a directory of a mapped file's path for a
 * symlink (test/mapcreds.test.ts).
 *
 * 'snapshot: main thread pending mask read', 'snapshot: thread pending
 * mask read' (another thread's) and 'snapshot: shared pending mask read'
 * (signals.ts readPending): a queue's pending mask read, its siginfos not
 * yet peeked (the first read of each queue only), where a test sends a
 * signal that job control makes discard a pending one
 * (test/sigpendbare.test.ts).
 *
 * KILL_AT and STOP_AT act on the whole process that reaches the point,
 * FAIL_AT on whatever reaches it while it is set. The resident engine
 * serves many commands (and a hosted serve) in one process, with each
 * command's APPSHOT_* settings set in its environment while it runs: a
 * client's would kill, stop or fail the engine's work for the others. So
 * the engine honours any APPSHOT_TEST_* variable only if it was itself
 * started with APPSHOT_TEST_KNOBS=1 (startedWithTestKnobs); otherwise it
 * refuses a request carrying one (the client then runs the command
 * itself, where the knob acts on the client) and drops those it
 * inherited at its start (engine/server.ts isTestKnob). The native points
 * (trace.c, the addon's restore) read the same environment, so that
 * covers them too.
 */
export function killPoint(name: string): void {
  if (process.env.APPSHOT_TEST_KILL_AT === name) process.kill(process.pid, 'SIGKILL');
  if (process.env.APPSHOT_TEST_STOP_AT === name) process.kill(process.pid, 'SIGSTOP');
  if (process.env.APPSHOT_TEST_HOLD_AT === name) holdHere(process.env.APPSHOT_TEST_HOLD_FILE);
  if (process.env.APPSHOT_TEST_FAIL_AT === name) throw new Error(`failure injected at '${name}' (APPSHOT_TEST_FAIL_AT)`);
}

/**
 * APPSHOT_TEST_HOLD_AT=NAME with APPSHOT_TEST_HOLD_FILE=FILE: a stop point
 * (APPSHOT_TEST_STOP_AT) for a serve the engine hosts, which a client
 * carrying a stop point never reaches (engine/client.ts SERVE_HERE runs
 * that serve itself; this knob, set for both the engine and the client,
 * does not). The thread reaching NAME makes FILE (a test waits for it:
 * the point is reached) and is blocked until FILE is removed, as a
 * stopped process is: its event loop turns no more, so signals sent
 * meanwhile are heard once it goes on, at the step's next turn of the
 * loop (each one: pending signals of one kind do not merge here, as they
 * do in a process stopped by SIGSTOP).
 */
function holdHere(file: string | undefined): void {
  if (!file) return;
  try {
    writeFileSync(file, String(process.pid), { flag: 'wx' });
  } catch {
    /* made already: held all the same until it goes */
  }
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  while (existsSync(file)) Atomics.wait(sleeper, 0, 0, 10);
}

/**
 * APPSHOT_TEST_HOSTED_HOLD=FILE: a serve hosted by the resident engine,
 * once it holds the front door's lock, waits while FILE exists before it
 * starts, so that a test can stop it in that window, then let it go on.
 * It waits without blocking the engine (which answers meanwhile), unlike
 * a stop point. A knob of its own because APPSHOT_TEST_STOP_AT makes a
 * client run serve itself (engine/client.ts SERVE_HERE); with this one
 * set for both the engine and the client, the engine hosts the serve.
 */
export async function hostedHoldPoint(): Promise<void> {
  const file = process.env.APPSHOT_TEST_HOSTED_HOLD;
  if (!file) return;
  while (existsSync(file)) await new Promise((r) => setTimeout(r, 20));
}

/** Whether this process was started with APPSHOT_TEST_KNOBS=1 in its own
 * environment: read from /proc/self/environ, the block the process was
 * started with, which a later change of process.env (the engine sets each
 * command's APPSHOT_* variables there) does not touch. As the addon's page
 * check reads it (pages.c test_knob). No /proc, or any failure: no. */
export function startedWithTestKnobs(): boolean {
  try {
    return readFileSync('/proc/self/environ', 'latin1').split('\0').includes('APPSHOT_TEST_KNOBS=1');
  } catch {
    return false;
  }
}
