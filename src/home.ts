/**
 * Where appshot keeps its state ($APPSHOT_HOME), and the engine's files in
 * it. Its own module, with nothing but node:os and node:path, because the
 * engine's client (bin/appshot.js) needs it before loading anything else.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { homedir } from 'node:os';
import { join } from 'node:path';

/** The state directory a Node API call was given (api.ts: `home`), for all
 * that call does, awaited steps included: the keys it signs and checks
 * with and the temporaries it makes are that directory's, not the
 * default's, though they are found far below the call (image/trust.ts,
 * image/partial.ts). A scope, not a global: two calls with two homes may
 * run at once. */
export const homeScope = new AsyncLocalStorage<string>();

export function defaultHome(): string {
  const scoped = homeScope.getStore();
  if (scoped) return scoped;
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
