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
import { killPoint } from './killpoint.js';
import { isSameProcess, readStat } from './procfs.js';
import { dropKept } from './resources/keeper.js';
import { lexists } from './resources/paths.js';
import { type AppRecord, type LocalRegistry, checkAid, describeEnd, describeSnapshot, isEnded, keptForImage, registeringAlive, sameRegistration } from './registry.js';
import { duration } from './words.js';

/** How often a waiter looks at the registration. */
const POLL_MS = 50;

/** The pause before a waiter's look number `n` (from 0): short ones first,
 * doubling up to POLL_MS, as most ends come a few ms after the signal
 * (SIGKILL's always) and a first pause of POLL_MS made every stop, rm -f
 * and wait take that long at least. A long wait still looks every
 * POLL_MS. */
const pollPause = (n: number) => Math.min(POLL_MS, 2 << Math.min(n, 5));

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
 * first process, or to every process once the first has exited (daemons).
 * `settle`: a SIGKILL looks until it has reached every process (see
 * signalProcesses); those who wait for the end and kill again meanwhile
 * (stop, rm) kill many applications at once without it. */
export function signalApp(reg: LocalRegistry, record: AppRecord, sig: NodeJS.Signals, { settle = true } = {}): void {
  if (sig === 'SIGKILL' || sig === 'SIGSTOP') {
    // These cannot be caught, so init cannot pass them on: they would
    // stop init itself.
    signalProcesses(reg, record, sig, { settle });
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
 * The running application `aid`, for a command that signals it (kill,
 * stop, rm -f). `appshot run` records its supervisor's PID a moment after
 * starting it (harness.ts), and the application may print first, and be
 * acted on: without that PID a signal went straight to every process
 * instead of to the first through init, and stop and rm did not wait for
 * init's exit. While the registration is that young, its record is read
 * again (requireSupervised). A restore or clone is never waited for: its
 * record says so (`restore`), and until its init is recorded it is
 * signalled straight (signalApp).
 *
 * Read as running (`record`, if the caller has just read it), it may end
 * during that wait: then what it became is returned, as stopApp's wait
 * returns it: its ended record, or 'released' if its registration went (a
 * snapshot ended it, or its `run` died before naming a supervisor and
 * nothing of it is left). Each command says that as it says an end that
 * came after its signal (review r422 F2). Another application registered
 * under the AID meanwhile is refused, never acted on (requireSupervised).
 */
export async function requireSignallable(reg: LocalRegistry, aid: string, record = reg.require(aid)): Promise<AppRecord | 'released'> {
  if (record.initPid !== undefined || record.restore) return record;
  killPoint('signal: waiting for the supervisor');
  let now: AppRecord;
  try {
    now = await reg.requireSupervised(aid, record);
  } catch (e) {
    // Another registration under the AID is not what this one became
    // (review r436 A5): refused as requireSupervised refuses it.
    const found = reg.refuseIfReplaced(record);
    const settled = found && reg.settle(found);
    if (!settled) return 'released';
    if (isEnded(settled)) return settled;
    throw e;
  }
  if (now.initPid === undefined) {
    // Signalled without its supervisor: a process forked outside the
    // tables' view is not reached, and stop does not wait for init.
    const why = registeringAlive(now, reg.home)
      ? 'its appshot run has not recorded it within 10 s'
      : 'the appshot run that started it ended before recording it';
    process.stderr.write(`appshot: warning: '${aid}' has no supervisor on record (${why}): its processes are signalled directly\n`);
  }
  return now;
}

/** For a command that only sends a signal (kill): an application that
 * ended while requireSignallable waited is refused as one that had ended
 * before (`require`), exit 1 whichever way it went. */
export function stillRunning(reg: LocalRegistry, aid: string, found: AppRecord | 'released'): AppRecord {
  if (found !== 'released' && !isEnded(found)) return found;
  if (found !== 'released') throw new AppshotError(`'${aid}' is not running (${describeEnd(found)}; 'appshot rm ${aid}' removes it)`, ExitCode.failure);
  const snapshotted = reg.getSnapshotted(aid);
  if (snapshotted) throw new AppshotError(`'${aid}' is not running: it was ${describeSnapshot(snapshotted)} (restore the image, or 'appshot rm ${aid}' removes its record)`, ExitCode.failure);
  throw new AppshotError(`'${aid}' is not running: it ended before its appshot run recorded its supervisor, and its registration went with it`, ExitCode.failure);
}

/**
 * Waits until the application `aid` has ended, at most `timeoutMs`.
 * Resolves with its ended record; with 'released' if its registration went
 * instead (a snapshot ended it, `rm` removed it, or it never committed);
 * with undefined if it still runs at the deadline. Given the record of the
 * registration waited for (`of`: one signalled), another registered under
 * the AID since is that one's registration gone, 'released', never waited
 * for or returned as its end (review r451 F3).
 */
export async function waitEnded(reg: LocalRegistry, aid: string, timeoutMs = Infinity, of?: AppRecord): Promise<AppRecord | 'released' | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (let looks = 0; ; looks++) {
    const found = reg.get(aid);
    if (found && of && !sameRegistration(found, of)) return 'released';
    // Released too when its supervisor was killed: nobody wrote how it ended.
    const record = found && reg.settle(found);
    if (!record) return 'released';
    if (isEnded(record)) return record;
    if (Date.now() >= deadline) return undefined;
    await sleep(Math.min(pollPause(looks), Math.max(1, deadline - Date.now())));
  }
}

/** How long SIGKILL is given to end every process before stop gives up. */
const KILL_WAIT_MS = 30_000;

/** How often SIGKILL goes again, while waited for, to what is left of an
 * application: one pass over its tree can miss a process that moves in it
 * meanwhile (an orphan reparented to init, a child being forked), and init
 * waits for every one. */
const KILL_AGAIN_MS = 1_000;

/** Waits up to KILL_WAIT_MS for an application killed with SIGKILL to end,
 * killing again what is left of it every KILL_AGAIN_MS. */
async function waitKilled(reg: LocalRegistry, record: AppRecord): Promise<AppRecord | 'released' | undefined> {
  const deadline = Date.now() + KILL_WAIT_MS;
  for (;;) {
    const ended = await waitEnded(reg, record.aid, Math.min(KILL_AGAIN_MS, deadline - Date.now()), record);
    if (ended || Date.now() >= deadline) return ended;
    signalProcesses(reg, record, 'SIGKILL');
  }
}

/**
 * `appshot stop`: sends `sig`, waits up to `graceSeconds` for the
 * application to end, then kills every process with SIGKILL; returns once
 * it has ended (its record, or 'released'). `found`: requireSignallable's
 * answer, which may say it has ended already.
 */
export async function stopApp(reg: LocalRegistry, found: AppRecord | 'released', sig: NodeJS.Signals, graceSeconds: number): Promise<AppRecord | 'released'> {
  // Ended while its supervisor was waited for (requireSignallable): as if
  // after the signal.
  if (found === 'released') return found;
  const record = found;
  // Its supervisor writes how the application ended a moment before it
  // exits itself: "returns once it has ended" means that one gone too.
  const initPid = reg.trustedInitPid(record);
  const initStart = initPid ? readStat(initPid)?.startTime : undefined;
  const gone = async (ended: AppRecord | 'released') => {
    const deadline = Date.now() + KILL_WAIT_MS;
    for (let looks = 0; initPid && isSameProcess(initPid, initStart) && Date.now() < deadline; looks++) await sleep(pollPause(looks));
    return ended;
  };
  if (isEnded(record)) return gone(record);
  signalApp(reg, record, sig, { settle: false });
  // Test-only: signalled, its end not yet waited for (test/reregistered.test.ts).
  killPoint('stop: signalled');
  if (sig !== 'SIGKILL') {
    const ended = await waitEnded(reg, record.aid, graceSeconds * 1000, record);
    if (ended) return gone(ended);
    signalProcesses(reg, record, 'SIGKILL');
  }
  const ended = await waitKilled(reg, record);
  if (!ended) throw new AppshotError(`'${record.aid}' did not end within ${KILL_WAIT_MS / 1000} s of SIGKILL`);
  return gone(ended);
}

/**
 * `appshot rm` of one application (the API's rm): removeApps of one, so
 * that one AID and many go the same way (port claims first, then the
 * registration). A running one is refused unless `force`, which kills it
 * first; what stops it from going is thrown.
 */
export async function removeApp(reg: LocalRegistry, aid: string, force: boolean): Promise<void> {
  const { failed } = await removeApps(reg, [aid], force);
  if (failed.length) throw failed[0].error;
}

/** What `removeApps` did: the AIDs removed, in the order asked, and why
 * each of the others was not. */
export interface Removal {
  removed: string[];
  failed: { aid: string; error: AppshotError }[];
  /** What was kept of those removed for an image that needs it, one line
   * each (keptForImage), for standard error. */
  kept: string[];
}

/**
 * `appshot rm`: removes ended applications' records, logs, private
 * copies, REDIR PATH directories and port claims, all together. One by
 * one, each running one cost a SIGKILL, a wait polled every POLL_MS for
 * its end and for its supervisor's exit, and a removal that read every
 * other registration: ~54 s for 1,000 clones.
 * Here every running one is killed first, all are waited for in the same
 * polls, and the ended ones are removed in one pass (registry removeMany).
 * A running one is refused unless `force`, which kills it first; an AID
 * that cannot be removed (unknown, running without `force`, did not end)
 * is in `failed` with why, and the others still go.
 */
export async function removeApps(reg: LocalRegistry, aids: string[], force: boolean): Promise<Removal> {
  // Each failure with where its AID was named (its first time, but for
  // a repeat's own line): said in that order at the end.
  const failed: (Removal['failed'][number] & { at: number })[] = [];
  const removed = new Set<string>();
  // Whatever goes wrong with one is said of it, and the others go on:
  // thrown, it would leave those killed so far unremoved.
  const fail = (aid: string, e: unknown, at = aids.indexOf(aid)) => failed.push({ aid, error: removalError(aid, e), at });
  // AIDs named again, with where: each has its first time's outcome,
  // known only at the end.
  const repeats: { aid: string; at: number }[] = [];
  const ended: AppRecord[] = [];
  const killed: { record: AppRecord; initPid: number; initStart?: number }[] = [];
  const asked = new Set<string>();
  const kept: string[] = [];
  // The record of `aid`'s snapshot removed, if there is one; refused
  // while a restore of its image registers it.
  const snapshottedRemoved = (aid: string) => {
    const snapshotted = removeSnapshotted(reg, aid, (line) => kept.push(line));
    if (snapshotted === 'busy') throw new AppshotError(`'${aid}' is being registered right now (by a restore of its image?): try again once it is`, ExitCode.conflict);
    return snapshotted === 'removed';
  };
  for (const [at, aid] of aids.entries()) {
    if (asked.has(aid)) {
      repeats.push({ aid, at });
      continue;
    }
    asked.add(aid);
    try {
      checkAid(aid);
      if (!reg.get(aid) && snapshottedRemoved(aid)) {
        removed.add(aid);
        continue;
      }
      const read = reg.requireAny(aid);
      if (isEnded(read)) {
        ended.push(read);
        continue;
      }
      if (!force) throw new AppshotError(`'${aid}' is running: stop it first (appshot stop ${aid}), or 'appshot rm -f ${aid}'`, ExitCode.failure);
      // Its supervisor named, if `run` has just started it. Ended
      // meanwhile, it is removed as one that had. Released: a snapshot
      // that ended it meanwhile left its record, which goes as above
      // (review r422 F3); a `run` that died before naming a supervisor
      // left nothing to remove.
      const record = await requireSignallable(reg, aid, read);
      if (record === 'released') {
        snapshottedRemoved(aid);
        removed.add(aid);
        continue;
      }
      if (isEnded(record)) {
        ended.push(record);
        continue;
      }
      // Its supervisor as it is now: waited for below, as stopApp does.
      const initPid = reg.trustedInitPid(record);
      const initStart = initPid ? readStat(initPid)?.startTime : undefined;
      signalApp(reg, record, 'SIGKILL', { settle: false });
      killed.push({ record, initPid, initStart });
    } catch (e) {
      fail(aid, e);
    }
  }
  // Test-only: each killed, none waited for yet (test/reregistered.test.ts).
  if (killed.length) killPoint('rm -f: killed');
  // Every one killed is waited for in the same passes.
  const deadline = Date.now() + KILL_WAIT_MS;
  let killedAgain = Date.now();
  let waiting = killed;
  for (let looks = 0; waiting.length; looks++) {
    const still: typeof killed = [];
    for (const k of waiting) {
      try {
        const found = reg.get(k.record.aid);
        // Another registered under the AID since: the one killed went, and
        // this one, never read nor killed, is not removed (review r451 F3).
        const record = found && sameRegistration(found, k.record) ? reg.settle(found) : undefined;
        // Released as it ended (a restore that never committed, or a
        // snapshot that ended it meanwhile): nothing left to remove.
        if (!record) removed.add(k.record.aid);
        else if (isEnded(record)) ended.push(record);
        else still.push(k);
      } catch (e) {
        fail(k.record.aid, e);
      }
    }
    waiting = still;
    if (!waiting.length) break;
    if (Date.now() >= deadline) {
      for (const k of waiting) fail(k.record.aid, new AppshotError(`'${k.record.aid}' did not end within ${KILL_WAIT_MS / 1000} s of SIGKILL`));
      break;
    }
    // What one pass over a tree missed (waitKilled).
    if (Date.now() - killedAgain >= KILL_AGAIN_MS) {
      killedAgain = Date.now();
      for (const k of waiting) {
        try {
          signalProcesses(reg, k.record, 'SIGKILL');
        } catch {
          // Its first SIGKILL went: if this one cannot, the deadline says
          // what is left.
        }
      }
    }
    await sleep(pollPause(looks));
  }
  // Their supervisors write how the application ended a moment before
  // they exit themselves: gone too before what they leave is removed.
  const endedAids = new Set(ended.map((r) => r.aid));
  let inits = killed.filter((k) => k.initPid && endedAids.has(k.record.aid));
  for (let looks = 0; inits.length && Date.now() < deadline; looks++) {
    inits = inits.filter((k) => isSameProcess(k.initPid, k.initStart));
    if (inits.length) await sleep(pollPause(looks));
  }
  // One that cannot be removed whole is said of it; the others go.
  const unremoved = new Set<string>();
  for (const { record, error } of reg.removeMany(ended, (line) => kept.push(line))) {
    unremoved.add(record.aid);
    fail(record.aid, error);
  }
  for (const r of ended) if (!unremoved.has(r.aid)) removed.add(r.aid);
  // Named again, as one rm after the other would say: not found once
  // removed, else what its first time failed of again.
  for (const { aid, at } of repeats) {
    const first = failed.find((f) => f.aid === aid);
    fail(aid, first && !removed.has(aid) ? first.error : new AppshotError(`no application with AID '${aid}'`, ExitCode.notFound), at);
  }
  // Said in the order they were named, as one by one (the last one's exit
  // code is the command's).
  failed.sort((a, b) => a.at - b.at);
  return { removed: [...new Set(aids)].filter((aid) => removed.has(aid)), failed: failed.map(({ aid, error }) => ({ aid, error })), kept };
}

/** Why `aid` could not be removed, as one line an AppshotError carries. */
function removalError(aid: string, e: unknown): AppshotError {
  return e instanceof AppshotError ? e : new AppshotError(`cannot remove '${aid}': ${(e as Error)?.message ?? String(e)}`);
}

/** `appshot prune`: removes every ended application, and the records of
 * those a snapshot ended (their images stay); returns their AIDs. `kept`
 * hears what was kept for an image (as removeApps' Removal.kept). */
export function pruneEnded(reg: LocalRegistry, kept?: (line: string) => void): string[] {
  const ended = reg.list().filter(isEnded);
  const failures = reg.removeMany(ended, kept);
  const snapshotted = reg.listSnapshotted().filter((r) => removeSnapshotted(reg, r.aid, kept) === 'removed');
  // The others went; the first that could not is the command's error.
  if (failures.length) throw removalError(failures[0].record.aid, failures[0].error);
  return [...ended, ...snapshotted].map((r) => r.aid).sort();
}

/** The record of an application a snapshot ended is removed, and what a
 * keeper holds for it dropped, with its AID held (Registry.withAidHeld):
 * a restore of its image that registers meanwhile is either refused the
 * AID or found here as a registration, which is then left alone (never
 * its connections dropped under it). 'none' if there was no such record,
 * 'busy' if a registration has the AID (its record may not be written
 * yet). */
function removeSnapshotted(reg: LocalRegistry, aid: string, kept?: (line: string) => void): 'removed' | 'none' | 'busy' {
  if (!reg.getSnapshotted(aid)) return 'none';
  return (
    reg.withAidHeld(aid, () => {
      // Read with the AID held: the record that goes.
      const record = reg.getSnapshotted(aid);
      if (!record) return 'none' as const;
      // The directories made for it stay for its image (Registry
      // removeSnapshotted), and are marked kept before the record that
      // leads into them goes: no later removal takes them with another's
      // directory around them (keepRedirLeaves).
      reg.keepRedirLeaves(record.madeDirs ?? []);
      if (!reg.removeSnapshotted(aid)) return 'none' as const;
      dropKeptFor(reg, aid);
      // Said, as rm of one imaged and left running, of those still there.
      // Its private copies stay too, so a directory in them (a private
      // /tmp its restore made) is kept as well, unlike there (removeMany).
      const still = (record.madeDirs ?? []).filter(lexists);
      if (still.length) kept?.(keptForImage(aid, record.image, still));
      return 'removed' as const;
    }) ?? 'busy'
  );
}

/**
 * The application a snapshot ended is removed: what appshot-keeper holds
 * for its restore on this host (connections, a listener with connections
 * waiting) goes now rather than at the end of `--tcp-hold`, so that its
 * port is free and its peers are not kept waiting for a restore the user
 * said will not come. The image stays restorable; restored later, it has
 * those connections closed (as after the hold). Only reached with the
 * AID held (removeSnapshotted): a restore in progress, which may have
 * taken them, has it. A keeper that cannot be reached is left to its
 * hold, which ends it anyway; the record is already gone.
 */
function dropKeptFor(reg: LocalRegistry, aid: string): void {
  try {
    dropKept(reg.home, aid);
  } catch {
    // See above: the hold ends it.
  }
}

/** "4s", "12m", "3h", "2d": how long ago `iso` was. */
export function age(iso: string, now = Date.now()): string {
  return duration(now - Date.parse(iso));
}
