/**
 * The engine's settings that shape what it keeps for everyone, scoped to
 * whoever reads them (review r404 F3).
 *
 * While a command runs in the engine, process.env holds its client's
 * APPSHOT_* variables (server.ts ContextGate), so that the command works
 * as it would in a process of its own. Work that is not that command's
 * runs meanwhile in the same process: a hosted serve allocating a clone's
 * port or suspending an instance, a standby being made. Read from
 * process.env, these settings would be the client's for that work too: a
 * client's `APPSHOT_PORTS=x` made a hosted serve's clone fail with a usage
 * error, `APPSHOT_PORTS=20000-20000` with "no free port".
 *
 * So in the engine, process.env answers for these names (SCOPED) from the
 * settings of the work reading them: a command's its client's (the
 * request's), a clone the engine makes ahead for a command's context
 * (template/pool.ts) that context's, and anything else (a hosted serve,
 * whose settings of these must be the engine's own to be hosted, and the
 * engine's own upkeep) the engine's own, as it was started. Writes go to
 * the real environment, which the context gate still sets for native
 * readers and child processes (a child spawned with process.env gets the
 * scoped values, as it enumerates them through the view). Native code
 * reads that real environment, the command's whose context the gate set
 * last, never the view: so no C/C++ of the addon, nor of what it starts
 * (appshot-init...), reads a SCOPED name (test/engine-settings.test.ts
 * fails if one does); such a setting is read here and passed to it.
 *
 * The measuring knobs, test knobs and the clone pool's size stay as they
 * are (server.ts says why); the serve's own settings are read once as it
 * starts (serve/settings.ts).
 */
import { AsyncLocalStorage } from 'node:async_hooks';

/** Read by shared code, outside the serve: registry.ts (ports),
 * restore/standby.ts, snapshot/driver.ts (a suspend's reservation), and
 * debug output anywhere. */
export const SCOPED_SETTINGS: ReadonlySet<string> = new Set(['APPSHOT_PORTS', 'APPSHOT_STANDBYS', 'APPSHOT_RESERVE_MAX', 'APPSHOT_DEBUG']);

const scope = new AsyncLocalStorage<ReadonlyMap<string, string>>();

/** The SCOPED settings of `env`. */
export function scopedOf(env: Record<string, string | undefined>): Map<string, string> {
  return new Map([...SCOPED_SETTINGS].flatMap((k) => (env[k] !== undefined ? [[k, env[k]!] as [string, string]] : [])));
}

/** Runs `f` (and everything it starts) with `settings` as its SCOPED
 * settings. */
export function withSettings<T>(settings: ReadonlyMap<string, string>, f: () => T): T {
  return scope.run(settings, f);
}

/** Runs `f`, and everything it starts (its timers, the promises it
 * chains), with the engine's own SCOPED settings, whichever command's
 * settings it was started under: work that outlives the command that
 * began it (a hosted serve) must not keep that command's settings, nor
 * have the engine's own only because they happen to be equal (r428 F5). */
export function withOwnSettings<T>(f: () => T): T {
  return scope.exit(f);
}

let real: NodeJS.ProcessEnv | undefined;

/** The environment itself, under the view: what the context gate clears
 * and sets (the view would hide a scoped name set there but not in the
 * reader's settings, and it would stay). */
export const realEnvironment = (): NodeJS.ProcessEnv => real ?? process.env;

/** Makes process.env answer SCOPED names from the reader's settings, or
 * `own` outside any (the engine, once, as it starts). */
export function scopeEnvironment(own: ReadonlyMap<string, string>): void {
  if (real) return;
  real = process.env;
  const view = () => scope.getStore() ?? own;
  const scoped = (k: string | symbol): k is string => typeof k === 'string' && SCOPED_SETTINGS.has(k);
  process.env = new Proxy(process.env, {
    get: (t, k) => (scoped(k) ? view().get(k) : Reflect.get(t, k)),
    // Straight to the real environment: Reflect.set through the view
    // would define the property with a partial descriptor, which
    // process.env refuses. A scoped name written (or deleted) so is in
    // the real environment only: reads still answer from the reader's
    // settings. Nothing writes one once the view is in place.
    set: (t, k, v) => {
      (t as Record<string | symbol, unknown>)[k] = v;
      return true;
    },
    deleteProperty: (t, k) => delete (t as Record<string | symbol, unknown>)[k],
    has: (t, k) => (scoped(k) ? view().has(k) : Reflect.has(t, k)),
    ownKeys: (t) => [...Reflect.ownKeys(t).filter((k) => !scoped(k)), ...view().keys()],
    getOwnPropertyDescriptor: (t, k) => {
      if (!scoped(k)) return Reflect.getOwnPropertyDescriptor(t, k);
      const v = view().get(k);
      return v === undefined ? undefined : { value: v, writable: true, enumerable: true, configurable: true };
    },
  });
}
