/**
 * The engine's wire format, on its unix socket. Imported by the client, so
 * it imports nothing but node:fs.
 *
 * The client sends one request, a line of JSON (Request, or Control for
 * `appshot engine status|stop` and `appshot serve stop`). The engine
 * answers with frames: a type byte, a 32-bit big-endian length, the
 * payload.
 *  - ACCEPTED: the engine runs the command. Before it, the client may fall
 *    back to running the command itself (the engine was leaving, or it
 *    refused); after it, never (the command may have done things).
 *  - REFUSED: not run (payload: why, one line).
 *  - STDOUT, STDERR: output of the command.
 *  - EXIT: the command's exit code (int32), the last frame.
 *  - STATUS: an answer to a Control (JSON), the last frame.
 */
import { statSync } from 'node:fs';

/**
 * Which build of appshot a process runs: this compiled file's inode and
 * modification time (every build rewrites it). A command request carries
 * the client's; an engine started from another build (one still resident
 * after an upgrade or a rebuild) refuses it, and the client runs the
 * command itself: an older engine could not know what the command means
 * now (one that predates `serve stop` would host a serve for it). The
 * native client (addon/client/appshot_client.c) sends the same, from
 * dist/engine/protocol.js beside it.
 */
export function buildId(): string {
  try {
    const st = statSync(new URL(import.meta.url), { bigint: true });
    return `${st.ino}:${st.mtimeNs}`;
  } catch {
    return 'unknown';
  }
}

export const Frame = {
  ACCEPTED: 0x41, // 'A'
  REFUSED: 0x52, // 'R'
  STDOUT: 0x4f, // 'O'
  STDERR: 0x45, // 'E'
  EXIT: 0x58, // 'X'
  STATUS: 0x53, // 'S'
} as const;

export interface Request {
  kind: 'command';
  /** The arguments after `appshot`. */
  argv: string[];
  cwd: string;
  /** The client's APPSHOT_* variables (APPSHOT_HOME is the engine's). */
  env: Record<string, string>;
  umask: number;
  tty: { stdout: boolean; stderr: boolean; columns?: number };
  /** Whether the client runs under CI (its CI variable is set): progress
   * comes as plain lines there. */
  ci?: boolean;
  /** The client's PATH: where the programs a command runs are looked for. */
  path?: string;
  /** The client's buildId(): an engine of another build refuses it. */
  build?: string;
}

export interface Control {
  /** serve-stop: stop the serve the engine hosts (answered once it has
   * stopped), the engine staying. */
  kind: 'status' | 'stop' | 'serve-stop';
}

export function frame(type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(5);
  head[0] = type;
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

/** Splits a byte stream into frames. */
export class FrameReader {
  private buffered: Buffer = Buffer.alloc(0);
  constructor(private readonly onFrame: (type: number, payload: Buffer) => void) {}
  push(data: Buffer): void {
    this.buffered = this.buffered.length ? Buffer.concat([this.buffered, data]) : data;
    while (this.buffered.length >= 5) {
      const len = this.buffered.readUInt32BE(1);
      if (this.buffered.length < 5 + len) break;
      const type = this.buffered[0];
      const payload = this.buffered.subarray(5, 5 + len);
      this.buffered = this.buffered.subarray(5 + len);
      this.onFrame(type, payload);
    }
  }
}
