/**
 * A restored process's environment, as getenv() and /proc/PID/environ
 * show it and as its children inherit it. Two sources of change:
 * - the variables naming the application (APPSHOT_AID, APPSHOT_TABLES,
 *   set by harness.ts and read by the preload library as each program
 *   starts): every restore makes a new table file, and a clone or a
 *   restore under --aid runs as another application. A process that kept
 *   the old ones would show them, and a program it executes past the
 *   preload library's exec wrapper (a raw execve) would start in the
 *   source's table file while it still exists, or in none;
 * - SET ENV rules (FIG. 8): a clone's processes were started as the
 *   template's, so their environment names the template.
 * getenv() reads glibc's `__environ`. Where the new values fit in the
 * places of the old ones (a restore under the same AID: the table path is
 * as long), they are written there, in the program's own array, which
 * stays: a program may own its environment (php-fpm frees every string
 * and the array at exit, and free() aborts on memory malloc did not give).
 * Otherwise a new array with the new values is written into the process
 * and `__environ` pointed at it. The startup strings go to a block of
 * their own and become what /proc/PID/environ shows (env_start and
 * env_end, moved by PR_SET_MM_MAP, which needs no privilege without a new
 * executable).
 *
 * Every restore changes APPSHOT_TABLES, so every restore of a glibc
 * process writes such a block; the one an earlier restore wrote is part of
 * the image's memory by then. A new mapping each time grew an application
 * restored over and over (serve's scale-to-zero) by a mapping a restore:
 * the block begins with a header (ENV_MAGIC, its mapping's length) by
 * which the next restore finds it, where env_start or `__environ` point,
 * and writes it again in place when the new one fits. Found in memory of
 * the image (untrusted), it is written only where the image and the live
 * process both have private writable memory: the process's own, which
 * anything the image holds could change as well. It is never unmapped: a
 * block that no longer fits is left as it is (what the program kept of
 * it stays readable), and the new one is mapped with room to grow, so
 * such blocks are few whatever the number of restores.
 */
import { AppshotError } from '../errors.js';
import { elfSymbol, firstLoadVaddr } from '../elf.js';
import { type Process, VmaKind } from '../image/types.js';
import { addon } from '../native.js';
import { type NamedCall, type RemoteProcess, SYS } from '../ptrace/remote.js';
import { type MapsLine, readMaps } from './memory.js';
import { ImageMemory } from './threads.js';

const LIBC = /\/libc(\.so\.6|-[\d.]+\.so)$/;
const MAX_VARS = 1 << 16;

/** Where `__environ` is in `p`'s memory, or undefined for a process without
 * glibc (a static binary: SET ENV cannot reach it). The executable comes
 * first: one that names `environ` holds the copy everyone uses (a copy
 * relocation), and libc's own then stays unused. */
export function environAddress(p: Process): bigint | undefined {
  const objects = [p.exe, p.vmas.find((v) => v.kind === VmaKind.FILE_PRIVATE && LIBC.test(v.path))?.path];
  for (const path of objects) {
    if (!path) continue;
    const base = p.vmas.find((v) => v.path === path && v.pgoff === 0n);
    if (!base) continue;
    const value = elfSymbol(path, '__environ') ?? elfSymbol(path, 'environ');
    if (value !== undefined) return base.start - firstLoadVaddr(path) + value;
  }
  return undefined;
}

/**
 * Reads a stopped process's memory a page at a time, each page once: the
 * environment's pointers and strings lie together on the stack, so its
 * few pages serve hundreds of small reads (one process_vm_readv each
 * before). A page is read only when asked for: the next may not be mapped.
 */
class PageReader {
  private readonly pages = new Map<bigint, Buffer>();

  constructor(private readonly pid: number) {}

  private page(at: bigint): Buffer {
    const base = at - (at % 4096n);
    let page = this.pages.get(base);
    if (!page) {
      page = addon().readMemory(this.pid, base, 4096);
      this.pages.set(base, page);
    }
    return page;
  }

  u64(at: bigint): bigint {
    const off = Number(at % 4096n);
    if (off <= 4096 - 8) return this.page(at).readBigUInt64LE(off);
    return Buffer.concat([this.page(at).subarray(off), this.page(at + 8n).subarray(0, off + 8 - 4096)]).readBigUInt64LE();
  }

  cString(addr: bigint): string {
    const parts: Buffer[] = [];
    for (let at = addr, total = 0; total < 1 << 20; ) {
      // Up to the end of the page: the next one may not be mapped.
      const off = Number(at % 4096n);
      const chunk = this.page(at).subarray(off);
      const nul = chunk.indexOf(0);
      if (nul >= 0) {
        parts.push(chunk.subarray(0, nul));
        return Buffer.concat(parts).toString('latin1');
      }
      parts.push(chunk);
      at += BigInt(chunk.length);
      total += chunk.length;
    }
    throw new AppshotError('an environment string of over 1 MiB');
  }
}

/** The process's environment as getenv() sees it now. */
export function readEnviron(pid: number, at: bigint): string[] {
  const mem = new PageReader(pid);
  let array = mem.u64(at);
  const out: string[] = [];
  for (let i = 0; array && i < MAX_VARS; i++, array += 8n) {
    const s = mem.u64(array);
    if (!s) break;
    out.push(mem.cString(s));
  }
  return out;
}

/** The environment each process of an image starts with, as read from
 * the first one restored: every clone of a template starts from the same
 * memory (its process record is the template's, kept while the template
 * is), so the others need not read it out of theirs again. */
const started = new WeakMap<Process, string[]>();

function environOf(p: Process, read: () => string[]): string[] {
  let env = started.get(p);
  if (!env) started.set(p, (env = read()));
  return env;
}

/** The same for the strings /proc/PID/environ shows (null: they are not
 * to be changed, see startupStrings). */
const startupEnv = new WeakMap<Process, string[] | null>();

function startedOf(p: Process, read: () => string[] | undefined): string[] | undefined {
  let env = startupEnv.get(p);
  if (env === undefined) startupEnv.set(p, (env = read() ?? null));
  return env ?? undefined;
}

const varName = (e: string) => e.slice(0, Math.max(0, e.indexOf('=')));

/** `env` with each "NAME=value" of `set` replacing its NAME or added. */
export function withValues(env: string[], set: string[]): string[] {
  const replaced = new Set(set.map(varName));
  return [...env.filter((e) => !replaced.has(varName(e))), ...set];
}

/** `env` with each "NAME=value" of `renamed` in the place of its NAME,
 * where `env` has it: a process that removed a variable is not given it. */
function withRenamed(env: string[], renamed: string[]): string[] {
  const values = new Map(renamed.map((e) => [varName(e), e]));
  return env.map((e) => values.get(varName(e)) ?? e);
}

/** The variables that put a process in the application `aid` whose table
 * file is `tables` (as harness.ts applicationEnv sets them). */
export function applicationIds(aid: string, tables: string): string[] {
  return [`APPSHOT_AID=${aid}`, `APPSHOT_TABLES=${tables}`];
}

/** Where an environment block's strings lie, for /proc/PID/environ. */
export interface EnvRange {
  start: bigint;
  end: bigint;
}

/** The strings /proc/PID/environ shows of process `pid` (those it started
 * with, between env_start and env_end): an exec's copy, which setenv()
 * does not change. The range is the image's (untrusted): read only where
 * one readable mapping of the image holds it, as the process now has it;
 * undefined otherwise, or if it cannot be read all the same (a file
 * mapping past its file's end): the strings are then left as they are,
 * and the restore goes on (every restore of such an image failed, once
 * its processes were made). */
function startupStrings(pid: number, p: Process): string[] | undefined {
  const mm = p.mm;
  const length = Number(mm.envEnd - mm.envStart);
  if (!mm.envStart || length <= 0) return [];
  if (length > 1 << 24 || !new ImageMemory(p.vmas).readable(mm.envStart, length)) return undefined;
  let text: string;
  try {
    text = addon().readMemory(pid, mm.envStart, length).toString('latin1');
  } catch {
    return undefined;
  }
  return text.split('\0').slice(0, text.endsWith('\0') ? -1 : undefined);
}

/** An environment block's header: ENV_MAGIC, then the length of the
 * mapping it begins (u64), then where its pointer array is (u64, from
 * the block's start); the startup strings follow at once. */
const ENV_MAGIC = Buffer.from('appshot environ\0', 'latin1');
const HEADER_BYTES = 32;
/** No block of ours is larger: the startup strings are read up to 16 MiB,
 * the pointer array and its strings are bounded the same way. */
const MAX_BLOCK = 1 << 26;

/** The environment block an earlier restore wrote into this process (its
 * start, its mapping's length and where its pointer array was), where env_start (its startup strings)
 * or `__environ` (its pointer array, when it had no startup strings)
 * points right past its header; undefined if neither does, or the header
 * is not one of ours, or its memory is not private writable memory of
 * both the image and the live process. */
function earlierBlock(pid: number, p: Process, environArray: bigint, liveMaps: () => MapsLine[]): { base: bigint; length: number; arrayAt: number } | undefined {
  const image = new ImageMemory(p.vmas);
  let live: ImageMemory | undefined;
  for (const base of new Set([p.mm.envStart - BigInt(HEADER_BYTES), environArray - BigInt(HEADER_BYTES)])) {
    if (base <= 0n || base % 4096n || !image.readable(base, HEADER_BYTES)) continue;
    let header: Buffer;
    try {
      header = addon().readMemory(pid, base, HEADER_BYTES);
    } catch {
      continue;
    }
    if (!header.subarray(0, ENV_MAGIC.length).equals(ENV_MAGIC)) continue;
    const length = header.readBigUInt64LE(16);
    if (length % 4096n || length < 4096n || length > BigInt(MAX_BLOCK)) continue;
    live ??= new ImageMemory(p.vmas, liveMaps());
    if (live.writablePrivate(base, Number(length))) return { base, length: Number(length), arrayAt: Number(header.readBigUInt64LE(24)) };
  }
  return undefined;
}

const same = (a: string[], b: string[]) => a.length === b.length && a.every((e, i) => e === b[i]);

/** Whether the new block's pointer array (at `arrayAt`) and its strings
 * `strings` would put every string where the earlier block `earlier` has
 * one, and as many: a program may keep what getenv() returned, a pointer
 * into that block, and must find the same variable there after the
 * rewrite (a value of another length, another AID's table path, would
 * move every string after it: a new block is mapped instead, the earlier
 * one left as it is). */
function keepsItsPlaces(pid: number, earlier: { base: bigint; arrayAt: number }, arrayAt: number, strings: Buffer[]): boolean {
  if (earlier.arrayAt !== arrayAt) return false;
  const { base } = earlier;
  try {
    const array = addon().readMemory(pid, base + BigInt(arrayAt), (strings.length + 1) * 8);
    let off = arrayAt + (strings.length + 1) * 8;
    for (let i = 0; i < strings.length; i++) {
      if (array.readBigUInt64LE(i * 8) !== base + BigInt(off)) return false;
      off += strings[i].length;
    }
    return array.readBigUInt64LE(strings.length * 8) === 0n;
  } catch {
    return false;
  }
}

/**
 * The writes that change process `pid`'s environment from `had` to `env`
 * in place: each changed string over the old one, in the array `array`
 * that `__environ` points at, which stays. Undefined (a new block is
 * written instead) unless both have the same variables in the same order
 * (nothing added) and every new string fits where the old one is, in
 * private writable memory of both the image and the live process (the
 * image's pointers are untrusted: never memory another process shares).
 * A program may own its environment: php-fpm's master copies it into
 * strings and an array of malloc's, and frees each at exit; pointed at
 * anything else, free() aborts it.
 */
function stringsInPlace(pid: number, p: Process, array: bigint, had: string[], env: string[], liveMaps: () => MapsLine[]): (() => void) | undefined {
  if (!array || env.length !== had.length) return undefined;
  const changed = env.flatMap((e, i) => (e === had[i] ? [] : [i]));
  if (!changed.length) return undefined;
  let pointers: Buffer;
  try {
    pointers = addon().readMemory(pid, array, had.length * 8);
  } catch {
    return undefined;
  }
  const live = new ImageMemory(p.vmas, liveMaps());
  const writes: { at: bigint; bytes: Buffer }[] = [];
  for (const i of changed) {
    if (varName(env[i]) !== varName(had[i])) return undefined;
    const bytes = Buffer.from(env[i] + '\0', 'latin1');
    const room = Buffer.byteLength(had[i], 'latin1') + 1;
    const at = pointers.readBigUInt64LE(i * 8);
    if (bytes.length > room || !live.writablePrivate(at, room)) return undefined;
    writes.push({ at, bytes });
  }
  return () => {
    for (const w of writes) addon().writeMemory(pid, w.at, w.bytes);
  };
}

/** Gives the stopped, restored process `r` its environment with the
 * variables of `renamed` replaced where it has them (the application's
 * identity) and the values of `set` (SET ENV) replaced or added, both as
 * getenv() and its children see it (the array `__environ` points at) and
 * as /proc/PID/environ shows it (the strings the process started with):
 * a block written in place of the one an earlier restore left, where it
 * fits, else mapped for it by `call`, which the caller runs in a batch of
 * its own; then `fill` with that call's result (the new block's address;
 * nothing without a call), which writes the block, points the process's
 * environ at it and returns where the new startup strings are, if they
 * changed, for PR_SET_MM_MAP's env_start and env_end. Undefined if
 * nothing changes, or for a process without glibc (whose environ appshot
 * cannot find). `liveMaps`: the process's mappings as they are now (a
 * restore's LiveMaps). */
export function environBlock(
  r: RemoteProcess,
  p: Process,
  set: string[],
  renamed: string[] = [],
  liveMaps: () => MapsLine[] = () => readMaps(r.pid),
): { call?: NamedCall; fill(mapped?: bigint): EnvRange | undefined } | undefined {
  if (!set.length && !renamed.length) return undefined;
  const at = environAddress(p);
  if (at === undefined) return undefined;
  // The array and its strings are the image's (untrusted): where they
  // cannot be read, the environment is left as it is, as a process
  // without glibc's is, rather than the restore failing.
  let had: string[];
  try {
    had = environOf(p, () => readEnviron(r.pid, at));
  } catch {
    return undefined;
  }
  const env = withValues(withRenamed(had, renamed), set);
  const startedWith = startedOf(p, () => startupStrings(r.pid, p));
  const startup = startedWith && withValues(withRenamed(startedWith, renamed), set);
  const startupChanged = !!startedWith && !same(startup!, startedWith);
  if (same(env, had) && !startupChanged) return undefined;
  const environArray = addon().readMemory(r.pid, at, 8).readBigUInt64LE();
  // Both checks look at the mappings as they are now, with no call run
  // in the process between them: one read serves both.
  let maps: MapsLine[] | undefined;
  const mapsNow = () => (maps ??= liveMaps());
  const earlier = earlierBlock(r.pid, p, environArray, mapsNow);
  const inEarlier = !!earlier && environArray >= earlier.base && environArray < earlier.base + BigInt(earlier.length);
  // The program's own array (the exec's, or one it made): its strings are
  // changed where they are, when each new one fits in the old one's place.
  const inPlace = !inEarlier && stringsInPlace(r.pid, p, environArray, had, env, mapsNow);
  if (inPlace && !startupChanged)
    return {
      fill: () => {
        inPlace();
        return undefined;
      },
    };
  // The startup strings an earlier block holds (env_start points into it)
  // are written again with it, as they are, not overwritten.
  const startupInEarlier = !!earlier && !!startup && p.mm.envStart >= earlier.base && p.mm.envStart < earlier.base + BigInt(earlier.length);
  const withStartup = startupChanged || startupInEarlier;
  // The header, the startup strings (/proc/PID/environ reads them as one
  // range, right past the header, where the next restore looks for it),
  // then the pointer array and the strings it points at.
  const startupBlock = withStartup ? Buffer.from(startup!.map((e) => e + '\0').join(''), 'latin1') : Buffer.alloc(0);
  const strings = env.map((e) => Buffer.from(e + '\0', 'latin1'));
  const arrayAt = (HEADER_BYTES + startupBlock.length + 7) & ~7;
  const arrayBytes = (env.length + 1) * 8;
  const size = arrayAt + arrayBytes + strings.reduce((n, b) => n + b.length, 0);
  const write = (base: bigint, length: number): EnvRange | undefined => {
    const block = Buffer.alloc(length);
    ENV_MAGIC.copy(block);
    block.writeBigUInt64LE(BigInt(length), 16);
    block.writeBigUInt64LE(BigInt(arrayAt), 24);
    startupBlock.copy(block, HEADER_BYTES);
    let off = arrayAt + arrayBytes;
    strings.forEach((s, i) => {
      block.writeBigUInt64LE(base + BigInt(off), arrayAt + i * 8);
      s.copy(block, off);
      off += s.length;
    });
    addon().writeMemory(r.pid, base, block);
    // Strings changed in place stay where the program has them: the block
    // is for /proc/PID/environ's startup strings only.
    if (inPlace) inPlace();
    else {
      const pointer = Buffer.alloc(8);
      pointer.writeBigUInt64LE(base + BigInt(arrayAt));
      addon().writeMemory(r.pid, at, pointer);
    }
    return withStartup ? { start: base + BigInt(HEADER_BYTES), end: base + BigInt(HEADER_BYTES + startupBlock.length) } : undefined;
  };
  // Not over startup strings that env_start keeps pointing at.
  const overStartup = !!earlier && !withStartup && p.mm.envStart >= earlier.base && p.mm.envStart < earlier.base + BigInt(earlier.length);
  if (earlier && size <= earlier.length && !overStartup && keepsItsPlaces(r.pid, earlier, arrayAt, strings)) return { fill: () => write(earlier.base, earlier.length) };
  // Room to grow by half: a block that keeps outgrowing the last is
  // mapped again only as often as its size doubles.
  const pages = (n: number) => Math.ceil(n / 4096) * 4096;
  const length = Math.max(pages(size), Math.min(MAX_BLOCK, pages(size * 1.5)));
  const PROT_RW = 3;
  const MAP_PRIVATE_ANON = 0x02 | 0x20;
  return {
    call: { what: 'mapping the environment', nr: SYS.mmap, args: [0, length, PROT_RW, MAP_PRIVATE_ANON, -1, 0] },
    fill: (mapped?: bigint) => write(mapped!, length),
  };
}
