/**
 * When each line of an application's log was written, for `appshot logs
 * --timestamps`. The application writes its log file itself; appshot-init
 * watches the file and appends "MILLISECONDS SIZE" lines to a file beside
 * it (addon/init/appshot_init.c, note_log_time): at that wall-clock time
 * the log held SIZE bytes. A line is as old as the first record that
 * covers its end (to within appshot-init's 10 ms between records, 1 s
 * when it could not watch the log's directory; coarser in a long log, which init
 * thins); one written after the last record is as old as the log's
 * modification time.
 * The file travels with the log across a snapshot and the restore
 * (registry.ts, carryLog).
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

/** The times file of a log: hidden, so that beside a carried log
 * (logs/AID) it can never be another AID's log. */
export function logTimesPath(logPath: string): string {
  return join(dirname(logPath), `.${basename(logPath)}.times`);
}

export class LogTimes {
  private readonly ms: number[] = [];
  private readonly size: number[] = [];
  private readonly modified: number;
  private at = 0;

  /** undefined: the log was never watched (an application of an older
   * appshot, or one whose init could not watch it). */
  static read(logPath: string): LogTimes | undefined {
    const path = logTimesPath(logPath);
    if (!existsSync(path)) return undefined;
    return new LogTimes(readFileSync(path, 'latin1'), existsSync(logPath) ? statSync(logPath).mtimeMs : Date.now());
  }

  private constructor(text: string, modified: number) {
    for (const line of text.split('\n')) {
      const [ms, size] = line.split(' ').map(Number);
      // A half-written last line (init writes each with one write).
      if (!Number.isFinite(ms) || !Number.isFinite(size)) break;
      // The log shrank (truncated by the application or a user): what it
      // holds now was all written after, so the records before describe
      // bytes that are gone.
      if (this.size.length && size < this.size.at(-1)!) {
        this.ms.length = 0;
        this.size.length = 0;
      }
      this.ms.push(ms);
      this.size.push(size);
    }
    this.modified = modified;
  }

  /** The time of the line that ends at byte `end` of the log. Asked in
   * increasing order of `end`. */
  timeOf(end: number): Date {
    while (this.at < this.size.length && this.size[this.at] < end) this.at++;
    return new Date(this.at < this.ms.length ? this.ms[this.at] : this.modified);
  }
}
