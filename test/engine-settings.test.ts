/**
 * The engine's per-reader view of its scoped settings (src/engine/settings.ts)
 * where it cannot be seen through the engine itself:
 * native code reads the real environment, not the view: none of the
 * addon's C/C++ may read a scoped name (review r428 F7). (The clone pool's
 * upkeep running with the engine's own settings, r428 F5, has no test: no
 * tick reads a scoped setting today, so a running engine cannot show it,
 * and a test of the pool on made-up objects is not one of ours.)
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { SCOPED_SETTINGS } from '../src/engine/settings.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const addonDir = join(root, 'addon');

/** Every C/C++ source and header under `dir`. */
function sourcesUnder(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name);
    if (e.isDirectory()) return sourcesUnder(path);
    return /\.(c|cc|cpp|cxx|h|hh|hpp)$/.test(e.name) ? [path] : [];
  });
}

/** The string literals of C/C++ `text` with the line each begins on,
 * comments left out (a comment may name a setting; only code reads one). */
function stringLiterals(text: string): { line: number; value: string }[] {
  const found: { line: number; value: string }[] = [];
  let line = 1;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '\n') line++;
    else if (c === '/' && text[i + 1] === '/') {
      while (i < text.length && text[i] !== '\n') i++;
      line++;
    } else if (c === '/' && text[i + 1] === '*') {
      const end = text.indexOf('*/', i + 2);
      const stop = end < 0 ? text.length : end + 2;
      for (let j = i; j < stop; j++) if (text[j] === '\n') line++;
      i = stop - 1;
    } else if (c === '"' || c === "'") {
      const start = line;
      let value = '';
      for (i++; i < text.length && text[i] !== c; i++) {
        if (text[i] === '\\') value += text[i++];
        if (text[i] === '\n') line++;
        value += text[i];
      }
      if (c === '"') found.push({ line: start, value });
    }
  }
  return found;
}

/** Where `file`'s code names a scoped setting: getenv("APPSHOT_DEBUG"),
 * a test_knob() of one, a "NAME=" looked for in environ or
 * /proc/self/environ, a macro's value: any string literal naming one. */
function scopedNamesIn(file: string): string[] {
  const names = [...SCOPED_SETTINGS];
  return stringLiterals(readFileSync(file, 'utf8')).flatMap(({ line, value }) =>
    names.filter((n) => new RegExp(`\\b${n}\\b`).test(value)).map((n) => `${relative(root, file)}:${line}: ${n}`),
  );
}

describe('native code and the scoped settings (r428 F7)', () => {
  // The client binary runs in the client's own process: its environment
  // is the one the engine is sent (APPSHOT_DEBUG decides there whether a
  // serve runs in the engine). Everything else under addon/ runs in the
  // engine (the addon) or is started by it with the engine's real
  // environment (appshot-init, keeper, guard: posix_spawn with environ),
  // which is whichever command's context the gate set last, not the
  // reader's view.
  const ownProcess = join(addonDir, 'client');

  it('no C/C++ source the engine runs or starts reads a scoped setting', () => {
    const files = sourcesUnder(addonDir).filter((f) => !f.startsWith(ownProcess + '/'));
    // The walk sees the addon itself (a guard that scans nothing passes).
    expect(files).toContain(join(addonDir, 'src', 'pages.c'));
    expect(files.flatMap(scopedNamesIn)).toEqual([]);
  });

  it('the scan finds such a read where there is one (the client binary reads its own APPSHOT_DEBUG)', () => {
    const hits = sourcesUnder(ownProcess).flatMap(scopedNamesIn);
    expect(hits.some((h) => h.endsWith(': APPSHOT_DEBUG'))).toBe(true);
    // A comment naming one is not a read.
    expect(stringLiterals('/* "APPSHOT_DEBUG" */ // getenv("APPSHOT_PORTS")\nx = getenv("APPSHOT_STANDBYS");')).toEqual([{ line: 2, value: 'APPSHOT_STANDBYS' }]);
  });
});
