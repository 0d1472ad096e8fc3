/**
 * Where a snapshot's time goes (`snapshot --json`, `phases`), in
 * milliseconds, each phase timed on its own. APPSHOT_DEBUG=1 prints them
 * on stderr as they end.
 *
 * Two figures say how long the application waited, and they differ in the
 * default mode (README, "Frozen time"):
 * - frozen: while appshot read its state, the part of the snapshot that
 *   needs it to stand still (freezeMs is before it: stopping the threads);
 * - held: how long it was kept stopped in all. With --leave-running it is
 *   the frozen time: it goes on at once. Without, it stays stopped, not
 *   running and not ended, until its image is committed and on disk, so
 *   that a failure to write the image gives it back alive; then it is
 *   ended. It never runs again either way when all goes well.
 * CRIU's "Frozen time" is the held time in both modes: its clock stops
 * once the tasks are resumed, or killed and waited for (cr-dump.c
 * cr_dump_finish), its images written meanwhile (not synced). Compared
 * with CRIU, a default snapshot's figure is heldMs, not frozenMs.
 */
export interface SnapshotPhases {
  /** Stopping every thread (before the frozen window). */
  freezeMs: number;
  /** Reading every process's state and memory: the frozen window. */
  dumpMs: number;
  /** --leave-running: what is left of arming dirty tracking for the next
   * snapshot once every process is dumped (still frozen, part of the
   * frozen window): the registry's write, where a userfaultfd could not be
   * put where planned. The arming itself goes with each process's dump
   * (its calls with the process's questions, the protection after its
   * memory): in dumpMs. */
  trackMs: number;
  /** --leave-running: letting every thread go on (the last part of the
   * frozen window). */
  resumeMs: number;
  /** --leave-running: reading the private memory of the copies made by
   * fork while frozen (cowcapture.ts), the application running. */
  copyMs: number;
  /** Waiting for the page writer's thread to write what it still held. */
  drainMs: number;
  /** fsync of the page file. A directory image's runs beside hashMs,
   * checksumMs and commitMs (started by finish, waited for just before
   * the rename): then its own length, which overlaps those phases, not a
   * slice of heldMs of its own. */
  fsyncMs: number;
  /** After the fsync, waiting for the last of the page file's chunk
   * digests (hashed by the writer's threads as it wrote, and during the
   * fsync). */
  hashMs: number;
  /** Classifying the resources, checksums of the files mapped. */
  checksumMs: number;
  /** The image's metadata and manifest written and signed, synced,
   * renamed into place. */
  commitMs: number;
  /** Ending the application and seeing it gone (default mode). */
  endMs: number;
  /** From the end of freezing until the application went on
   * (--leave-running), or was killed and every process of it gone: the
   * span CRIU's dump reports as "Frozen time" in both modes. */
  heldMs: number;
}

type Timed = Exclude<keyof SnapshotPhases, 'heldMs'>;

const now = () => Number(process.hrtime.bigint() / 1000n);

export class PhaseClock {
  readonly phases: SnapshotPhases = { freezeMs: 0, dumpMs: 0, trackMs: 0, resumeMs: 0, copyMs: 0, drainMs: 0, fsyncMs: 0, hashMs: 0, checksumMs: 0, commitMs: 0, endMs: 0, heldMs: 0 };
  private last = now();
  private frozenAt = 0;

  /** Ends `phase` now: its time is since the previous phase ended. */
  end(phase: Timed): void {
    const t = now();
    this.record(phase, (t - this.last) / 1000);
    this.last = t;
    if (phase === 'freezeMs') this.frozenAt = t;
  }

  /** The next phase begins now: what ran since the last is no phase's
   * (the preparation before the freeze). */
  startingNow(): void {
    this.last = now();
  }

  /** Runs `step`, whose time is no phase's (the collection before the
   * freeze: totalMs has it, freezeMs does not). */
  outside<T>(step: () => T): T {
    const t0 = now();
    try {
      return step();
    } finally {
      this.last += now() - t0;
    }
  }

  /** The page writer's own measure of its two phases, which end now. */
  endPageFile(part: { drainMs: number; fsyncMs: number; hashMs: number }): void {
    this.record('drainMs', part.drainMs);
    this.record('fsyncMs', part.fsyncMs);
    this.record('hashMs', part.hashMs);
    this.last = now();
  }

  /** `ms` of `phase`, which ran beside the others (the clock of the
   * phases that follow one another not moved). */
  overlapped(phase: Timed, ms: number): void {
    this.record(phase, ms);
  }

  /** The application went on, or was killed and is gone, now. */
  released(): void {
    this.phases.heldMs = this.frozenAt ? (now() - this.frozenAt) / 1000 : 0;
  }

  /** Milliseconds since the end of freezing. */
  sinceFrozen(): number {
    return this.frozenAt ? (now() - this.frozenAt) / 1000 : 0;
  }

  /** Every phase rounded to 0.01 ms, for the result. */
  rounded(): SnapshotPhases {
    const out = { ...this.phases };
    for (const k of Object.keys(out) as (keyof SnapshotPhases)[]) out[k] = Math.round(out[k] * 100) / 100;
    return out;
  }

  private record(phase: Timed, ms: number): void {
    this.phases[phase] += ms;
    if (process.env.APPSHOT_DEBUG) process.stderr.write(`appshot: snapshot phase ${phase.replace(/Ms$/, '')}: ${ms.toFixed(2)} ms\n`);
  }
}
