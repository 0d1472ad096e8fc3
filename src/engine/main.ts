/**
 * The engine's process (spawn.ts starts it detached): serves
 * $APPSHOT_HOME until idle or SIGTERM. Exits 0 when it leaves, and with
 * a message on stderr and a non-zero code if it cannot start (another
 * engine holds the directory: ExitCode.conflict).
 */
import { AppshotError, ExitCode } from '../errors.js';
import { defaultHome } from '../home.js';
import { idleSecondsFromEnv, serveEngine } from './server.js';
import { resolve } from 'node:path';

try {
  // The lock first (serveEngine), then everything a command loads
  // (server.ts): an engine started while another starts or runs leaves
  // without compiling the CLI for nothing.
  const code = await serveEngine({ home: resolve(defaultHome()), idleSeconds: idleSecondsFromEnv(), onDemand: process.argv.includes('--on-demand') });
  process.exit(code);
} catch (e) {
  process.stderr.write(`appshot: engine: ${(e as Error).message}\n`);
  process.exit(e instanceof AppshotError ? e.exitCode : ExitCode.internal);
}
