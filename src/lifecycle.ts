/**
 * The life of an application after it started, as docker's containers
 * have it: signal it (`kill`), end it with a grace period (`stop`), wait
 * for its end (`wait`), and remove what an ended one left (`rm`, `prune`).
 *
 * An application ends when its last process does: appshot-init then
 * removes what the kernel holds (SysV objects, tables) and writes the file
 * "exit" into its registration, which stays, with its log, until `rm`.
 * One that a snapshot ended leaves its registration at once, and a record
 * of the snapshot instead (registry.ts: SnapshottedRecord), until the
 * restore of its image under its AID, `rm` or `prune`.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { constants as osConstants } from 'node:os';
import { AppshotError, ExitCode } from './errors.js';
import { signalProcesses } from './inspect.js';
import { isSameProcess, readStat } from './procfs.js';
import { type AppRecord, type LocalRegistry, checkAid, isEnded } from './registry.js';
import { duration } from './words.js';

/** How often a waiter looks at the registration. */
const POLL_MS = 50;

/** "TERM", "sigterm", "SIGTERM", "15" → "SIGTERM"; refuses unknown ones
 * (`what`: the option, for the message), as kill(1) takes them. */
export function signalName(name: string, what = '--signal'): NodeJS.Signals {
  const signals = osConstants.signals as Record<string, number>;
  if (/^\d+$/.test(name.trim())) {
    const n = Number(name);
    const found = Object.keys(signals).find((s) => signals[s] === n);
    if (found) return found as NodeJS.Signals;
  } else {
    const upper = name.trim().toUpperCase();
    const sig = upper.startsWith('SIG') ? upper : `SIG${upper}`;
    if (sig in signals) return sig as NodeJS.Signals;
  }
  throw new AppshotError(`${what} '${name}': expected a signal name or number, such as TERM, SIGHUP or 9`, ExitCode.usage);
}

/** Sends one signal to an application: to its init, which passes it to the
 * first process, or to every process once the first has exited (daemons). */
export function signalApp(reg: LocalRegistry, record: AppRecord, sig: NodeJS.Signals): void {
  if (sig === 'SIGKILL' || sig === 'SIGSTOP') {
    // These cannot be caught, so init cannot pass them on: they would
    // stop init itself.
    signalProcesses(reg, record, sig);
    return;
  }
  // An application being restored has no supervisor yet: its processes
  // are signalled straight. Only the supervisor the registry recorded (and
  // which still is that process): the tables' init_pid may be anyone's.
  const initPid = reg.trustedInitPid(record);
  if (!initPid) {
    signalProcesses(reg, record, sig);
    return;
  }
  try {
    process.kill(initPid, sig);
  } catch (e) {
    throw new AppshotError(`cannot signal '${record.aid}': ${(e as NodeJS.ErrnoException).code}`);
  }
}

/**
 * Waits until the application `aid` has ended, at most `timeoutMs`.
 * Resolves with its ended record; with 'released' if its registration went
 * instead (a snapshot ended it, `rm` removed it, or it never committed);
 * with undefined if it still runs at the deadline.
 */
export async function waitEnded(reg: LocalRegistry, aid: string, timeoutMs = Infinity): Promise<AppRecord | 'released' | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = reg.get(aid);
    // Released too when its supervisor was killed: nobody wrote how it ended.
    const record = found && reg.settle(found);
    if (!record) return 'released';
    if (isEnded(record)) return record;
    if (Date.now() >= deadline) return undefined;
    await sleep(Math.min(POLL_MS, Math.max(1, deadline - Date.now())));
  }
}

/** How long SIGKILL is given to end every process before stop gives up. */
const KILL_WAIT_MS = 30_000;

/**
 * `appshot stop`: sends `sig`, waits up to `graceSeconds` for the
 * application to end, then kills every process with SIGKILL; returns once
 * it has ended (its record, or 'released').
 */
export async function stopApp(reg: LocalRegistry, record: AppRecord, sig: NodeJS.Signals, graceSeconds: number): Promise<AppRecord | 'released'> {
  // Its supervisor writes how the application ended a moment before it
  // exits itself: "returns once it has ended" means that one gone too.
  const initPid = reg.trustedInitPid(record);
  const initStart = initPid ? readStat(initPid)?.startTime : undefined;
  const gone = async (ended: AppRecord | 'released') => {
    const deadline = Date.now() + KILL_WAIT_MS;
    while (initPid && isSameProcess(initPid, initStart) && Date.now() < deadline) await sleep(POLL_MS);
    return ended;
  };
  signalApp(reg, record, sig);
  if (sig !== 'SIGKILL') {
    const ended = await waitEnded(reg, record.aid, graceSeconds * 1000);
    if (ended) return gone(ended);
    signalProcesses(reg, record, 'SIGKILL');
  }
  const ended = await waitEnded(reg, record.aid, KILL_WAIT_MS);
  if (!ended) throw new AppshotError(`'${record.aid}' did not end within ${KILL_WAIT_MS / 1000} s of SIGKILL`);
  return gone(ended);
}

/**
 * `appshot rm`: removes an ended application's record, log, private
 * copies, REDIR PATH directories and port claims. A running one is
 * refused unless `force`, which kills it first.
 */
export async function removeApp(reg: LocalRegistry, aid: string, force: boolean): Promise<void> {
  checkAid(aid);
  // Snapshotted and not restored since: its record and waiting log go.
  if (!reg.get(aid) && reg.removeSnapshotted(aid)) return;
  let record = reg.requireAny(aid);
  if (!isEnded(record)) {
    if (!force) throw new AppshotError(`'${aid}' is running: stop it first (appshot stop ${aid}), or 'appshot rm -f ${aid}'`, ExitCode.failure);
    const ended = await stopApp(reg, record, 'SIGKILL', 0);
    // Its registration went as it ended: a restore that never committed
    // (released with all it made), or a snapshot that ended it meanwhile
    // (its image may need its private copies).
    if (ended === 'released') return;
    record = ended;
  }
  reg.remove(record);
}

/** `appshot prune`: removes every ended application, and the records of
 * those a snapshot ended (their images stay); returns their AIDs. */
export function pruneEnded(reg: LocalRegistry): string[] {
  const ended = reg.list().filter(isEnded);
  for (const r of ended) reg.remove(r);
  const snapshotted = reg.listSnapshotted().filter((r) => reg.removeSnapshotted(r.aid));
  return [...ended, ...snapshotted].map((r) => r.aid).sort();
}

/** "4s", "12m", "3h", "2d": how long ago `iso` was. */
export function age(iso: string, now = Date.now()): string {
  return duration(now - Date.parse(iso));
}
