/**
 * Where the native products live and the typed face of the addon.
 * All three are built by `npm install` (binding.gyp).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AppshotError } from './errors.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const release = join(root, 'build', 'Release');

export const paths = {
  addon: join(release, 'appshot.node'),
  preload: join(release, 'appshot_preload.so'),
  init: join(release, 'appshot-init'),
};

/** The resource kinds of the translation tables, in the header's order. */
export const kinds = ['pid', 'semid', 'shmid', 'msgid', 'semkey', 'shmkey', 'msgkey'] as const;
export type Kind = (typeof kinds)[number];

export interface TableEntry {
  virtual: number;
  system: number;
  flags: number;
  /** For a thread: the system PID of its process. */
  owner: number;
}

export interface TablesSnapshot {
  aid: string;
  initPid: number;
  repairs: number;
  tables: Record<Kind, TableEntry[]>;
}

interface Addon {
  createTables(path: string, aid: string, salt: bigint): void;
  readTables(path: string): TablesSnapshot;
  bind(path: string, kind: Kind, virtualId: number, systemId: number, flags?: number): void;
  mapSystem(path: string, kind: Kind, systemId: number): number;
  unmapSystem(path: string, kind: Kind, systemId: number): boolean;
  removeIpcObject(kind: Kind, systemId: number): boolean;
  flags: { INIT: number; THREAD: number; THREADS: number };
}

let loaded: Addon | undefined;

export function addon(): Addon {
  if (!loaded) {
    for (const p of Object.values(paths))
      if (!existsSync(p))
        throw new AppshotError(`native part missing: ${p}; run 'npm install' (or 'npm run build:native')`);
    loaded = createRequire(import.meta.url)(paths.addon) as Addon;
  }
  return loaded;
}
