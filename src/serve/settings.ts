/**
 * The APPSHOT_* settings that only a serve reads, and only for its own
 * work: read once, as the serve starts (ServeHost's constructor), from its
 * environment then. In a serve process of its own that is its
 * environment; hosted by the resident engine, the environment of the
 * `appshot serve` request, which the engine has set while the serve
 * starts. Never read again: while a hosted serve runs, process.env is
 * each client's command's in turn (engine/server.ts), and another
 * client's setting must not change what the serve does (review r404 F3).
 *
 * Because the serve has them for itself, a hosted serve may want other
 * values of these than the engine's own (engine/server.ts handle); every
 * other APPSHOT_* setting it must share with the engine. Kept apart from
 * serve/server.ts so that the engine can name them without loading the
 * front door. (APPSHOT_PREPARED_PREFAULT is read by restore/prepared.ts
 * prefaultCap, which ServeHost calls once too.)
 */
export const SERVE_OWN_SETTINGS: readonly string[] = [
  'APPSHOT_SHARE_LISTENER',
  'APPSHOT_PREPARED',
  'APPSHOT_PREPARED_CODE',
  'APPSHOT_PREPARED_EAGER',
  'APPSHOT_PREPARED_POPULATE',
  'APPSHOT_PREPARED_PREFAULT',
  'APPSHOT_PRELOADED',
];

export interface ServeSettings {
  /** Restore mode may share its public listener with the instance
   * (APPSHOT_SHARE_LISTENER=0: forwarded always, for comparisons). */
  shareListener: boolean;
  /** APPSHOT_PREPARED=N: prepared instances, overriding the option. */
  prepared?: number;
  /** APPSHOT_PREPARED_CODE=1: the code a suspended instance ran is read
   * for its next prepare. */
  preparedCode: boolean;
  /** APPSHOT_PREPARED_EAGER=1: a prepare copies all its memory in. */
  preparedEager: boolean;
  /** APPSHOT_PREPARED_POPULATE=1: a held instance gets the file pages its
   * previous run touched mapped in (restore/prepared.ts populateHeldMappings).
   * Off by default, as APPSHOT_PREPARED_CODE, which it covers: redis's
   * faults after its release 120 -> 17 and its CPU to its first byte ~0.9
   * -> 0.5 ms, but (c) was not shown faster on the loaded machine (README). */
  preparedPopulate: boolean;
  /** APPSHOT_PRELOADED=N: images kept read ahead. */
  preloaded?: number;
}

const count = (v: string | undefined): number | undefined => (v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined);

export function serveSettings(env: NodeJS.ProcessEnv = process.env): ServeSettings {
  return {
    shareListener: env.APPSHOT_SHARE_LISTENER !== '0',
    prepared: count(env.APPSHOT_PREPARED),
    preparedCode: env.APPSHOT_PREPARED_CODE === '1',
    preparedEager: env.APPSHOT_PREPARED_EAGER === '1',
    preparedPopulate: env.APPSHOT_PREPARED_POPULATE === '1',
    preloaded: count(env.APPSHOT_PRELOADED),
  };
}
