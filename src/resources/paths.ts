/**
 * Paths of an instance (REDIR PATH and copy-on-write files), on appshot's
 * side: the preload library rewrites the paths a running process names;
 * these helpers place the descriptors a clone inherits from its template,
 * and make the directories the rewritten paths lead into.
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { InstanceConfig } from '../native.js';

/** The target of `path` under a REDIR PATH rule, or undefined. Matches whole
 * components, as the preload library does. */
export function redirected(redirs: InstanceConfig['redirs'], path: string): string | undefined {
  for (const r of redirs) {
    if (r.kind !== 'path') continue;
    if (path === r.from) return r.to;
    if (path.startsWith(r.from + '/')) return r.to + path.slice(r.from.length);
  }
  return undefined;
}

/** Makes `copy` the instance's own copy of `original`, unless it has one
 * already; returns `copy`. Written under a temporary name and renamed, so
 * that a copy is never seen half-made. */
export function privateCopy(original: string, copy: string): string {
  if (existsSync(copy)) return copy;
  mkdirSync(dirname(copy), { recursive: true });
  const tmp = `${copy}.appshot-${process.pid}`;
  if (existsSync(original)) {
    copyFileSync(original, tmp);
    chmodSync(tmp, statSync(original).mode & 0o7777);
  } else {
    writeFileSync(tmp, '');
  }
  renameSync(tmp, copy);
  return copy;
}

/** The directories that REDIR PATH targets lead into: a redirected
 * directory exists for the instance, as does a redirected file's parent. */
export function prepareRedirTargets(redirs: InstanceConfig['redirs']): void {
  for (const r of redirs) {
    if (r.kind !== 'path') continue;
    let isDir = false;
    try {
      isDir = statSync(r.from).isDirectory();
    } catch {
      /* not there: the target's parent is all we can make */
    }
    mkdirSync(isDir ? r.to : dirname(r.to), { recursive: true });
  }
}
