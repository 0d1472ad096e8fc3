/**
 * Opened templates kept by the resident engine (src/engine/), so that a
 * clone of a template does not read, check and decode it again: its
 * template.pb and image metadata decoded, its signatures and checksums
 * verified, its rules parsed.
 *
 * Only in the engine (a CLI process opens a template once), and only for
 * what a plain clone opens (page data checked by size; --verify always
 * reads everything). An entry is used only while nothing it was made from
 * has changed, as far as the kernel can tell: the template directory and
 * every file in it (inode, size, mtime, ctime, mode, owner: ctime moves on
 * any write, chmod, chown or link), the manifest's bytes (SHA-256), the
 * keys this node trusts (the same for its keys directory), and the trust
 * asked for. Anything else is a miss, and the template is opened afresh.
 */
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync, realpathSync } from 'node:fs';
import { join } from 'node:path';
import type { OpenedTemplate } from './template.js';
import { keysDir } from '../image/trust.js';

const LIMIT = 32;
let enabled = false;
const entries = new Map<string, { key: string; opened: OpenedTemplate; manifest: string; trust: string }>();
let hits = 0;
let misses = 0;

export function enableTemplateCache(): void {
  enabled = true;
}

export const templateCacheStats = () => ({ entries: entries.size, hits, misses });

function describeDir(dir: string): string {
  const parts: string[] = [];
  const st = lstatSync(dir, { bigint: true });
  parts.push(`.:${st.ino}:${st.mtimeNs}:${st.ctimeNs}:${st.mode}:${st.uid}`);
  for (const name of readdirSync(dir).sort()) {
    const s = lstatSync(join(dir, name), { bigint: true });
    parts.push(`${name}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}:${s.mode}:${s.uid}`);
  }
  return parts.join('|');
}

/** What the entry of `path` must match; undefined when it cannot be
 * described (then nothing is cached). */
function stateOf(path: string, manifest: string, trust: string): { where: string; key: string } | undefined {
  try {
    const where = realpathSync(path);
    let keys = '';
    try {
      keys = describeDir(keysDir());
    } catch {
      /* no keys yet */
    }
    const digest = createHash('sha256').update(readFileSync(join(where, manifest))).digest('hex');
    return { where, key: `${trust}\n${digest}\n${describeDir(where)}\n${keys}` };
  } catch {
    return undefined;
  }
}

/** Opens `path` through the cache when it is on; `open` does the work. */
export async function cachedTemplate(
  path: string,
  manifest: string,
  trust: string,
  open: () => Promise<OpenedTemplate>,
): Promise<OpenedTemplate> {
  if (!enabled) return open();
  const before = stateOf(path, manifest, trust);
  if (!before) return open();
  const entry = entries.get(before.where);
  if (entry && entry.key === before.key) {
    hits++;
    // Most recently used last.
    entries.delete(before.where);
    entries.set(before.where, entry);
    // A directory's LoadedImage has nothing to dispose of.
    return { ...entry.opened, loaded: { ...entry.opened.loaded, dispose: () => {} } };
  }
  misses++;
  const opened = await open();
  // Kept only if nothing changed while it was being opened.
  const after = stateOf(path, manifest, trust);
  if (after && after.key === before.key) {
    entries.delete(before.where);
    entries.set(before.where, { key: before.key, opened, manifest, trust });
    while (entries.size > LIMIT) entries.delete(entries.keys().next().value!);
  }
  return opened;
}

/** Whether the template `opened` was decoded from (its `template` object,
 * as every hit hands it out) is still the cached one, and nothing it was
 * made from has changed since, by the same checks as a clone's open:
 * what the engine holds made from it (pool.ts) is checked so while it is
 * held. */
export function stillCached(opened: Pick<OpenedTemplate, 'path' | 'template'>): boolean {
  for (const [where, e] of entries) {
    if (e.opened.template !== opened.template) continue;
    const now = stateOf(where, e.manifest, e.trust);
    return !!now && now.where === where && now.key === e.key;
  }
  return false;
}
