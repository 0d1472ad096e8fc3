/**
 * Questions for a frozen process that only it can answer (its brk, its
 * TID address, its signal handlers...): asked first, answered together.
 *
 * A snapshot gathers every question of every resource kind, then runs
 * them in one stop per thread: the batch code (remote.ts, trace.c) in a
 * scratch mapping made for the snapshot with one injected call. Where that
 * cannot be had (APPSHOT_NO_BATCH=1, executable memory refused), each
 * question is one injected call through the Injector, as before. Either
 * way an answer is read only after run().
 */
import { type Injector } from './inject.js';
import { type RemoteProcess, SYS, SyscallError } from './remote.js';

/** A question's answer: the call's raw result (-errno on failure) and the
 * bytes of its buffer after the call. Filled by CallQueue.run(). */
export class Answer {
  private result?: { ret: bigint; out: Buffer };

  set(result: { ret: bigint; out: Buffer }): void {
    this.result = result;
  }

  /** Whether the question was answered (run() may have failed first). */
  get answered(): boolean {
    return this.result !== undefined;
  }

  private get done(): { ret: bigint; out: Buffer } {
    if (!this.result) throw new Error('a question was read before it was asked');
    return this.result;
  }

  get ret(): bigint {
    return this.done.ret;
  }

  get out(): Buffer {
    return this.done.out;
  }
}

/** An argument: a number, 'buf' (the question's buffer), { bufAt: n }
 * (the address n bytes into it: a call given two pointers), or the
 * answer of an earlier question for the same thread (one argument of a
 * question at most: a descriptor the queue made, say). */
export type QueryArg = bigint | number | 'buf' | BufAt | Answer;
export type BufAt = { bufAt: number };

interface Question {
  tid: number;
  nr: number;
  args: QueryArg[];
  buffer?: Buffer;
  answer: Answer;
}

export class CallQueue {
  private queued: Question[] = [];

  /** Undefined: not asked for yet (null: none to be had). */
  private batches: RemoteProcess | null | undefined;

  /** Pages a question mapped, to unmap by flush() (no batches). */
  private unmaps: { addr: bigint; length: number }[] = [];

  /** `openBatches`: the process with its batch scratch mapped, or
   * undefined (one call at a time through `inj`); called on the first
   * run() that has questions, once the process may take injected calls. */
  constructor(
    private readonly inj: Injector,
    private readonly openBatches: () => RemoteProcess | undefined,
  ) {}

  /**
   * Queues `nr(args)` for thread `tid` (the process's main thread by
   * default). 'buf' in `args` is the address of a buffer holding `input`
   * (or `outLength` zero bytes), whose bytes after the call are the
   * answer's `out`.
   */
  ask(nr: number, args: QueryArg[], opts: { tid?: number; input?: Buffer; outLength?: number } = {}): Answer {
    const answers = args.filter((a) => a instanceof Answer);
    if (answers.length > 1 || answers.some((a) => !this.queued.some((q) => q.answer === a && q.tid === (opts.tid ?? this.inj.tid))))
      throw new Error('one argument at most may be an answer, of a question queued before for the same thread');
    const answer = new Answer();
    const buffer = opts.input ?? (opts.outLength ? Buffer.alloc(opts.outLength) : undefined);
    this.queued.push({ tid: opts.tid ?? this.inj.tid, nr, args, buffer, answer });
    return answer;
  }

  /** Asks `nr(args)` at once (a question that depends on an answer). */
  askNow(nr: number, args: QueryArg[], opts: { tid?: number; input?: Buffer; outLength?: number } = {}): Answer {
    const a = this.ask(nr, args, opts);
    this.run();
    return a;
  }

  /** Has `length` bytes at `addr`, which a question mapped in the process,
   * unmapped when the frozen window ends: with the batches' scratch area
   * (RemoteProcess.unmapLater: one batch, or none if another stop comes
   * first), or where there are no batches, by flush(), a call of its own. */
  unmapLater(addr: bigint, length: number): void {
    if (this.batches) this.batches.unmapLater(addr, length);
    else this.unmaps.push({ addr, length });
  }

  /** Unmaps now what unmapLater left here (no batches): before the
   * Injector is closed. Throws on the first that fails. */
  flush(): void {
    for (const { addr, length } of this.unmaps.splice(0)) {
      const r = this.inj.call(SYS.munmap, [addr, length]);
      if (r < 0n && r > -4096n) throw new SyscallError('unmapping a page the snapshot mapped', Number(-r));
    }
  }

  /** Answers every question queued: one stop per thread asked. */
  run(): void {
    const queued = this.queued;
    this.queued = [];
    if (!queued.length) return;
    // A single question is one call either way: no mapping for it alone.
    if (this.batches === undefined && queued.length > 1) this.batches = this.openBatches() ?? null;
    if (!this.batches) {
      for (const q of queued) {
        const args = q.args.map((a) => (a instanceof Answer ? a.ret : a));
        const r = q.buffer ? this.inj.callWith(q.nr, args, q.buffer, q.tid) : { ret: this.inj.call(q.nr, args as (bigint | number)[], q.tid), out: Buffer.alloc(0) };
        q.answer.set(r);
      }
      return;
    }
    const tids = [...new Set(queued.map((q) => q.tid))];
    for (const tid of tids) {
      const mine = queued.filter((q) => q.tid === tid);
      const calls = mine.map((q) => {
        const arg = q.args.findIndex((a) => a instanceof Answer);
        if (arg < 0) return { ...q, args: q.args as (bigint | number | 'buf' | BufAt)[] };
        const from = mine.findIndex((o) => o.answer === q.args[arg]);
        return { ...q, args: q.args.map((a, i) => (i === arg ? 0 : a)) as (bigint | number | 'buf' | BufAt)[], argFrom: { call: from, arg } };
      });
      // Set batch by batch: a later batch's failure leaves the earlier
      // answers readable (Answer.answered) by the cleanup after it (a
      // userfaultfd made at another number than planned, say).
      this.batches.runQueries(calls, tid, (first, answers) => answers.forEach((a, i) => mine[first + i].answer.set(a)));
    }
  }
}
