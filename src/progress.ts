/**
 * Progress of the commands that move memory (snapshot, restore, template
 * create, clone), in bytes: done of total, MiB/s, time left.
 *
 * The drivers know only ByteProgress (one method, no drawing): they say
 * how many bytes are done and how many there will be. How that is shown is
 * chosen here, once per command, from --progress, whether stderr is a
 * terminal and whether CI is set:
 *  - bar: a one-line bar redrawn in place, drawn by cli-progress (a
 *    maintained, dependency-light library that already handles terminal
 *    width, throttled redraws during synchronous work and clearing up;
 *    hand-written escape codes were what we had before);
 *  - plain: whole lines for logs, one per tenth of the work or per second
 *    at most (`appshot: snapshot db: 512.0/1024.0 MiB, 210 MiB/s, 2 s left`);
 *  - none: nothing.
 * Output goes through process.stderr, which the engine routes to the
 * command's client (engine/request.ts).
 */
import type cliProgress from 'cli-progress';
import { createRequire } from 'node:module';
import { AppshotError, ExitCode } from './errors.js';
import { inCI, stderrColumns, stderrIsTerminal } from './engine/request.js';
import { isatty } from 'node:tty';

/** What a driver reports. `total` may change while the work goes on (a
 * snapshot's is an estimate until every process has been read). */
export interface ByteProgress {
  bytes(done: number, total: number): void;
}

export const noProgress: ByteProgress = { bytes: () => {} };

/** What --progress takes: the one list that progressMode accepts and
 * that completion (commands/completion.ts) offers, so the two cannot
 * drift apart. */
export const PROGRESS_VALUES = ['auto', 'bar', 'plain', 'none'] as const;

/** How progress is shown: --progress, `auto` decided. */
export type ProgressMode = Exclude<(typeof PROGRESS_VALUES)[number], 'auto'>;

/** The help of --progress, its values from PROGRESS_VALUES. */
export const PROGRESS_HELP = `progress in bytes on stderr: ${PROGRESS_VALUES[0]} (a bar on a terminal; lines if CI is set; else none), ${PROGRESS_VALUES.slice(1, -1).join(', ')} or ${PROGRESS_VALUES.at(-1)}`;

/** cli-progress, loaded with the first bar: cli.ts reads PROGRESS_HELP
 * for every command line, and `--help` or `ps` should not pay for a
 * library they never draw with. */
const loadCliProgress = (): typeof cliProgress => createRequire(import.meta.url)('cli-progress') as typeof cliProgress;

const isProgressValue = (option: string): option is (typeof PROGRESS_VALUES)[number] => (PROGRESS_VALUES as readonly string[]).includes(option);

/** The display --progress asks for (`auto` or absent: by the terminal). */
export function progressMode(option: string | undefined): ProgressMode {
  const how = option ?? 'auto';
  if (!isProgressValue(how)) throw new AppshotError(`--progress '${how}': expected ${PROGRESS_VALUES.slice(0, -1).join(', ')} or ${PROGRESS_VALUES.at(-1)}`, ExitCode.usage);
  if (how !== 'auto') return how;
  if (stderrIsTerminal(() => isatty(2))) return 'bar';
  return inCI() ? 'plain' : 'none';
}

const MiB = 1048576;
const mib = (n: number) => (n / MiB).toFixed(1);

/** Bytes per second over the last few seconds. */
class Rate {
  private readonly samples: [number, number][] = [];
  add(at: number, done: number): void {
    this.samples.push([at, done]);
    while (this.samples.length > 2 && at - this.samples[0][0] > 3000) this.samples.shift();
  }
  perSecond(): number {
    if (this.samples.length < 2) return 0;
    const [t0, d0] = this.samples[0];
    const [t1, d1] = this.samples[this.samples.length - 1];
    return t1 > t0 ? ((d1 - d0) * 1000) / (t1 - t0) : 0;
  }
}

function leftText(done: number, total: number, rate: number): string {
  if (done >= total) return '0 s left';
  if (rate <= 0) return '';
  const s = Math.ceil((total - done) / rate);
  return s >= 120 ? `${Math.round(s / 60)} min left` : `${s} s left`;
}

/** The display of one command's progress; `end()` once it is over (done
 * or failed), which clears the bar. */
export class ProgressDisplay implements ByteProgress {
  private readonly rate = new Rate();
  private bar?: cliProgress.SingleBar;
  private lastLine = 0;
  private lastTenth = -1;
  private ended = false;
  /** When the display was made: a job whose bytes all come in one report
   * has no recent rate, and is given its average since then. */
  private readonly started = Date.now();

  constructor(
    private readonly label: string,
    private readonly mode: ProgressMode,
  ) {}

  bytes(done: number, total: number): void {
    if (this.mode === 'none' || this.ended) return;
    total = Math.max(total, done);
    const now = Date.now();
    this.rate.add(now, done);
    const recent = this.rate.perSecond();
    const rate = recent > 0 || now <= this.started ? recent : (done * 1000) / (now - this.started);
    const left = leftText(done, total, rate);
    if (this.mode === 'plain') {
      // A line per tenth of the work, or per second at most, and the last.
      const tenth = total ? Math.floor((done / total) * 10) : 0;
      if (tenth === this.lastTenth && now - this.lastLine < 1000 && done < total) return;
      if (done >= total && this.lastTenth === 10) return;
      this.lastTenth = tenth;
      this.lastLine = now;
      process.stderr.write(`appshot: ${this.label}: ${mib(done)}/${mib(total)} MiB, ${Math.round(rate / MiB)} MiB/s${left ? `, ${left}` : ''}\n`);
      return;
    }
    const payload = { label: this.label, doneMiB: mib(done), totalMiB: mib(total), rate: Math.round(rate / MiB), left: left ? `, ${left}` : '' };
    if (!this.bar) {
      const cliProgress = loadCliProgress();
      this.bar = new cliProgress.SingleBar(
        {
          stream: terminalStream(),
          format: 'appshot: {label} [{bar}] {doneMiB}/{totalMiB} MiB, {rate} MiB/s{left}',
          barsize: 30,
          barCompleteChar: '#',
          barIncompleteChar: '.',
          clearOnComplete: true,
          hideCursor: false,
          linewrap: false,
          fps: 10,
        },
        cliProgress.Presets.legacy,
      );
      this.bar.start(total, done, payload);
      return;
    }
    this.bar.setTotal(total);
    this.bar.update(done, payload);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    // stop() clears the line (clearOnComplete) and its redraw timer.
    this.bar?.stop();
  }
}

/** stderr as cli-progress wants a terminal stream: writes go through
 * process.stderr (the client's, in the engine), and it is a terminal
 * because the mode says so. */
function terminalStream(): NodeJS.WritableStream {
  return {
    isTTY: true,
    columns: stderrColumns(() => process.stderr.columns),
    write: (chunk: string, cb?: () => void) => process.stderr.write(chunk, cb),
  } as unknown as NodeJS.WritableStream;
}
