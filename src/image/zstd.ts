/**
 * zstd for .tar.zst image files, through the zstd program. Node 20 has no
 * zstd of its own, and the npm bindings fetch prebuilt binaries at install
 * time; the Debian package `zstd` is one apt-get away and well kept. The
 * image's tar stream is piped through it: `zstd -q -T0` to write, `zstd
 * -dq` to read. Without the program, .tar.zst is refused by name.
 */
import { spawn } from 'node:child_process';
import { PassThrough, type Writable } from 'node:stream';
import { AppshotError, ExitCode } from '../errors.js';
import { programOnPath } from '../engine/request.js';

/** The zstd program on PATH, if there is one. */
export const zstdProgram = (): string | undefined => programOnPath('zstd');

/** The zstd program, or the one line that says how to get it. */
export function requireZstd(what: string): string {
  const program = zstdProgram();
  if (!program) throw new AppshotError(`${what} needs the zstd program, which is not installed here: install the zstd package (apt-get install zstd), or use .tar.gz`, ExitCode.usage);
  return program;
}

/** The first line zstd wrote on stderr, without its "zstd: /*stdin*\\ :"
 * prefix. */
const firstLine = (stderr: string) =>
  stderr.trim().split('\n')[0]?.replace(/^zstd: /, '').replace(/^\/\*stdin\*\\ ?: /, '') || 'no reason given';

/**
 * A compressor writing to the file descriptor `fd`: write the tar stream
 * into `input`, end it, then await `done`, which fails if zstd did.
 */
export function zstdCompressTo(fd: number, dest: string): { input: Writable; done: Promise<void> } {
  const child = spawn(requireZstd(dest), ['-q', '-T0', '-c'], { stdio: ['pipe', fd, 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (e) => reject(new Error(`zstd could not be started: ${e.message}`)));
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(`zstd failed: ${signal ?? firstLine(stderr)}`));
    });
  });
  // A zstd that died is reported by `done`; its stdin's EPIPE is not news.
  child.stdin!.on('error', () => {});
  return { input: child.stdin!, done };
}

/**
 * The uncompressed stream of the .tar.zst file open at `fd`. It ends only
 * once zstd has exited; if zstd fails (a corrupt or truncated file), it
 * fails with zstd's reason instead of ending, so that a reader never takes
 * a cut-short stream for a whole one.
 */
export function zstdDecompressFrom(source: number | NodeJS.ReadableStream, path: string): NodeJS.ReadableStream {
  const program = zstdProgram();
  if (!program) throw new AppshotError(`${path} is compressed with zstd, which needs the zstd program to read: install the zstd package (apt-get install zstd)`, ExitCode.usage);
  const child = spawn(program, ['-dq', '-c'], { stdio: [typeof source === 'number' ? source : 'pipe', 'pipe', 'pipe'] });
  if (typeof source !== 'number') {
    // A stream (standard input, its magic number read already): fed to
    // zstd, whose exit says what went wrong; a write after it left (EPIPE)
    // adds nothing to that.
    child.stdin!.on('error', () => {});
    source.on('error', (e: Error) => out.destroy(e));
    source.pipe(child.stdin!);
  }
  const out = new PassThrough();
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdout!.pipe(out, { end: false });
  child.on('error', (e) => out.destroy(new Error(`zstd could not be started: ${e.message}`)));
  child.on('close', (code, signal) => {
    if (code === 0) out.end();
    else out.destroy(new Error(`zstd: ${signal ?? firstLine(stderr)}`));
  });
  // zstd may fail before the reader is attached (it is set up after an
  // await): the failure stays on the stream (its errored state), which
  // the reader's pipeline reports; it must not end the process meanwhile.
  out.on('error', () => {});
  // The reader gave up (a bad entry): zstd is not left writing to no one.
  out.on('close', () => {
    if (typeof source !== 'number') (source as NodeJS.ReadableStream & { destroy(): void }).destroy();
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return out;
}
