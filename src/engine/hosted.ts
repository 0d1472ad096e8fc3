/**
 * `appshot serve` hosted by the resident engine (commands/serve.ts
 * hostInEngine): the engine's side of it. Small on purpose: the engine
 * imports it at start for its status, its idle timer and its stop; the
 * front door itself (serve/server.ts) is loaded only by a serve.
 *
 * At most one hosted serve per engine, as there is at most one serve per
 * state directory (serve/lock.ts): while it runs the engine does not idle
 * out; `appshot serve stop` stops it gracefully, as SIGTERM stops a serve
 * in its own process, and the engine stays; `appshot engine stop` (or
 * SIGTERM) does the same before the engine leaves.
 */
export interface HostedServe {
  services: string[];
  /** Date.now() at its start. */
  since: number;
  /** Where its decision log goes (always, attached or not). */
  log: string;
  metrics?: string;
  /** Whether a client waits on it (`appshot serve` without -d). */
  attached(): boolean;
  /** Whether its front door is still starting (the lock taken, its ports
   * not all listening yet): a stop asked now is acted on once it has. */
  starting(): boolean;
  /** Stops serving, as SIGTERM stops a serve of its own; resolves once
   * it has (the same promise for every caller). */
  stop(why: string): Promise<void>;
  /** A stop under way ends the connections it forwards now, without
   * what is left of its drain (the engine's second signal). */
  hurry(): void;
}

/** Why a serve stopped by `appshot serve stop` stopped (its log's
 * "stopping" event, and the line its attached client prints). */
export const SERVE_STOP_WHY = 'asked by appshot serve stop';

let hosted: HostedServe | undefined;
let onChange: () => void = () => {};

export const hostedServe = (): HostedServe | undefined => hosted;

/** The engine's hook: called when a serve starts or ends being hosted. */
export function onHostedChange(f: () => void): void {
  onChange = f;
}

export function setHosted(h: HostedServe | undefined): void {
  hosted = h;
  onChange();
}

/** What `appshot engine status --json` says of it (null: none). */
export function hostedStatus(): Record<string, unknown> | null {
  if (!hosted) return null;
  return {
    services: hosted.services,
    startedAt: new Date(hosted.since).toISOString(),
    // Deprecated (docs/json.md): an instant not named …At. Kept one more release.
    since: new Date(hosted.since).toISOString(),
    attached: hosted.attached(),
    ...(hosted.starting() ? { starting: true } : {}),
    log: hosted.log,
    ...(hosted.metrics ? { metrics: hosted.metrics } : {}),
  };
}

export function stopHosted(why: string): Promise<void> {
  return hosted ? hosted.stop(why) : Promise.resolve();
}
