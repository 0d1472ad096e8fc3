/**
 * Where appshot keeps its state ($APPSHOT_HOME), and the engine's files in
 * it. Its own module, with nothing but node:os and node:path, because the
 * engine's client (bin/appshot.js) needs it before loading anything else.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';

export function defaultHome(): string {
  if (process.env.APPSHOT_HOME) return process.env.APPSHOT_HOME;
  if (process.getuid?.() === 0) return '/var/lib/appshot';
  const state = process.env.XDG_STATE_HOME || join(homedir(), '.local', 'state');
  return join(state, 'appshot');
}

/** The resident engine's files (src/engine/server.ts). */
export const enginePaths = (home = defaultHome()) => ({
  dir: join(home, 'engine'),
  socket: join(home, 'engine', 'engine.sock'),
  lock: join(home, 'engine', 'lock'),
  log: join(home, 'engine', 'log'),
});
