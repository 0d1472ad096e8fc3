/** A one-line progress bar on stderr, drawn only when stderr is a terminal. */
import { isatty } from 'node:tty';
import { stderrIsTerminal } from './engine/request.js';

export class Progress {
  private readonly enabled = stderrIsTerminal(() => isatty(2));
  private last = 0;

  update(label: string, done: number, total: number): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (now - this.last < 100 && done < total) return;
    this.last = now;
    const width = 30;
    const filled = total ? Math.round((done / total) * width) : 0;
    process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${label}\x1b[K`);
  }

  done(): void {
    if (this.enabled) process.stderr.write('\r\x1b[K');
  }
}
