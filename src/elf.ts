/**
 * A small ELF64 (little-endian) reader: enough to find where a symbol of a
 * library or executable lives in a process that maps it, e.g. glibc's
 * `__environ` in a restored process.
 *
 *   address = base − firstLoadVaddr(file) + elfSymbol(file, name)
 *
 * where base is the start of the file's mapping at file offset 0 in
 * /proc/PID/maps. Only the headers and the sections needed are read, never
 * the whole file.
 *
 * Beware copy relocations: when an executable refers to a library's data
 * object (as a non-PIE or most PIE programs do with `environ`), the dynamic
 * linker copies it into the executable and every reference, the library's
 * own included, goes to that copy; the library's storage is then stale.
 * `symbolAddress` searches the objects in the order given, like the dynamic
 * linker does: put the executable first.
 */
import { closeSync, fstatSync, openSync, readSync, statSync, type BigIntStats } from 'node:fs';
import { AppshotError } from './errors.js';

const SHT_SYMTAB = 2;
const SHT_DYNSYM = 11;
const SHT_GNU_VERSYM = 0x6fffffff;
const SHN_UNDEF = 0;
const PT_LOAD = 1;
const EHDR_SIZE = 64;
const SHDR_SIZE = 64;
const PHDR_SIZE = 56;
const SYM_SIZE = 24;
const PAGE = 4096n;

interface Section {
  type: number;
  offset: number;
  size: number;
  link: number;
  entsize: number;
}

interface Header {
  type: number;
  phoff: number;
  phnum: number;
  phentsize: number;
  shoff: number;
  shnum: number;
  shentsize: number;
}

/** An open ELF file: reads by position, checked against the file's size. */
class ElfFile {
  private readonly fd: number;
  private readonly size: number;
  /** What the file was when opened (see Answers). */
  readonly identity: string;

  constructor(readonly path: string) {
    try {
      this.fd = openSync(path, 'r');
    } catch (e) {
      throw new AppshotError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    }
    try {
      const st = fstatSync(this.fd, { bigint: true });
      this.size = Number(st.size);
      this.identity = fileIdentity(st);
    } catch (e) {
      closeSync(this.fd);
      throw new AppshotError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    }
  }

  close(): void {
    closeSync(this.fd);
  }

  read(offset: number, length: number, what: string): Buffer {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new AppshotError(`${this.path}: truncated or corrupt ELF file (${what} at ${offset}, ${length} bytes, past its end)`);
    }
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(this.fd, buf, done, length - done, offset + done);
      if (n === 0) throw new AppshotError(`${this.path}: truncated ELF file (${what})`);
      done += n;
    }
    return buf;
  }

  header(): Header {
    if (this.size < EHDR_SIZE) throw new AppshotError(`${this.path} is not an ELF file (only ${this.size} bytes)`);
    const h = this.read(0, EHDR_SIZE, 'ELF header');
    if (h.readUInt32BE(0) !== 0x7f454c46) throw new AppshotError(`${this.path} is not an ELF file`);
    if (h[4] !== 2) throw new AppshotError(`${this.path} is not a 64-bit ELF file (class ${h[4]})`);
    if (h[5] !== 1) throw new AppshotError(`${this.path} is not a little-endian ELF file`);
    const hdr: Header = {
      type: h.readUInt16LE(16),
      phoff: offsetOf(h.readBigUInt64LE(0x20)),
      shoff: offsetOf(h.readBigUInt64LE(0x28)),
      phentsize: h.readUInt16LE(0x36),
      phnum: h.readUInt16LE(0x38),
      shentsize: h.readUInt16LE(0x3a),
      shnum: h.readUInt16LE(0x3c),
    };
    if (hdr.phnum > 0 && hdr.phentsize < PHDR_SIZE) throw new AppshotError(`${this.path}: bad program header size ${hdr.phentsize}`);
    if (hdr.shoff !== 0 && hdr.shentsize < SHDR_SIZE) throw new AppshotError(`${this.path}: bad section header size ${hdr.shentsize}`);
    return hdr;
  }

  sections(h: Header): Section[] {
    if (h.shoff === 0) return [];
    let count = h.shnum;
    // More than 0xff00 sections: the count is in section 0's sh_size.
    if (count === 0) count = offsetOf(this.read(h.shoff, SHDR_SIZE, 'section header 0').readBigUInt64LE(32));
    const table = this.read(h.shoff, count * h.shentsize, 'section headers');
    const out: Section[] = [];
    for (let i = 0; i < count; i++) {
      const o = i * h.shentsize;
      out.push({
        type: table.readUInt32LE(o + 4),
        offset: offsetOf(table.readBigUInt64LE(o + 24)),
        size: offsetOf(table.readBigUInt64LE(o + 32)),
        link: table.readUInt32LE(o + 40),
        entsize: offsetOf(table.readBigUInt64LE(o + 56)),
      });
    }
    return out;
  }
}

function offsetOf(v: bigint): number {
  // Offsets and sizes inside a file: anything past 2^53 is corrupt anyway.
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

function withElf<T>(path: string, f: (elf: ElfFile, h: Header) => T): T {
  const elf = new ElfFile(path);
  try {
    return f(elf, elf.header());
  } finally {
    elf.close();
  }
}

const fileIdentity = (st: BigIntStats) => `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;

/**
 * Answers already found in a file, while it is the same file: every clone
 * of a template looks up the same symbols of the same libc (`__environ`
 * for SET ENV), and reading its symbol table costs more than the rest of
 * setting the environment. An answer is used only while a stat of the
 * path shows the very file it came from (device, inode, size, mtime and
 * ctime: any write or replacement moves one of them).
 */
const answers = new Map<string, { identity: string; found: Map<string, bigint | undefined> }>();
const ANSWERED_FILES = 64;

function answered<T extends bigint | undefined>(path: string, question: string, find: (elf: ElfFile, h: Header) => T): T {
  let identity: string | undefined;
  try {
    identity = fileIdentity(statSync(path, { bigint: true }));
  } catch {
    /* withElf says why */
  }
  const entry = answers.get(path);
  if (entry && entry.identity === identity && entry.found.has(question)) return entry.found.get(question) as T;
  return withElf(path, (elf, h) => {
    const value = find(elf, h);
    let mine = answers.get(path);
    if (!mine || mine.identity !== elf.identity) {
      answers.delete(path);
      mine = { identity: elf.identity, found: new Map() };
      answers.set(path, mine);
      while (answers.size > ANSWERED_FILES) answers.delete(answers.keys().next().value!);
    }
    mine.found.set(question, value);
    return value;
  });
}

interface Candidate {
  value: bigint;
  rank: number;
}

/** The defined symbol `name` in one symbol table, or undefined. */
function lookup(elf: ElfFile, sections: Section[], index: number, name: string): bigint | undefined {
  const symtab = sections[index];
  const strtab = sections[symtab.link];
  if (!strtab || symtab.size === 0) return undefined;
  if (symtab.entsize !== 0 && symtab.entsize !== SYM_SIZE) {
    throw new AppshotError(`${elf.path}: unexpected symbol size ${symtab.entsize}`);
  }
  // Names may share their tails ("environ" inside "__environ"): every place
  // the string table holds `name\0` is a possible st_name.
  const strings = elf.read(strtab.offset, strtab.size, 'string table');
  const needle = Buffer.from(`${name}\0`, 'utf8');
  const offsets = new Set<number>();
  for (let at = strings.indexOf(needle); at >= 0; at = strings.indexOf(needle, at + 1)) offsets.add(at);
  if (offsets.size === 0) return undefined;

  // .dynsym has a version per symbol: a hidden one (bit 15) is an old
  // version kept for binaries linked against it, not the default.
  const versym = symtab.type === SHT_DYNSYM
    ? sections.find((s) => s.type === SHT_GNU_VERSYM && s.link === index)
    : undefined;
  const count = Math.floor(symtab.size / SYM_SIZE);
  const versions = versym ? elf.read(versym.offset, Math.min(versym.size, count * 2), 'symbol versions') : undefined;

  let best: Candidate | undefined;
  const CHUNK = 8192; // symbols per read
  for (let first = 0; first < count; first += CHUNK) {
    const n = Math.min(CHUNK, count - first);
    const syms = elf.read(symtab.offset + first * SYM_SIZE, n * SYM_SIZE, 'symbol table');
    for (let i = 0; i < n; i++) {
      const o = i * SYM_SIZE;
      if (!offsets.has(syms.readUInt32LE(o))) continue;
      const shndx = syms.readUInt16LE(o + 6);
      if (shndx === SHN_UNDEF) continue; // a reference, not a definition
      const bind = syms[o + 4] >> 4; // 0 local, 1 global, 2 weak
      const hidden = versions && (first + i) * 2 + 2 <= versions.length
        ? (versions.readUInt16LE((first + i) * 2) & 0x8000) !== 0
        : false;
      const rank = (hidden ? 0 : 4) + (bind === 1 ? 2 : bind === 2 ? 1 : 0);
      if (!best || rank > best.rank) best = { value: syms.readBigUInt64LE(o + 8), rank };
    }
  }
  return best?.value;
}

/**
 * st_value of the symbol `name` defined in the ELF64 file at path: from
 * .dynsym, else from .symtab; undefined if neither defines it (or the file
 * has no symbol tables). Where several versions are defined, the default one.
 * For a TLS symbol this is its offset in the TLS block, not an address.
 */
export function elfSymbol(path: string, name: string): bigint | undefined {
  return answered(path, `symbol ${name}`, (elf, h) => {
    const sections = elf.sections(h);
    for (const type of [SHT_DYNSYM, SHT_SYMTAB]) {
      const index = sections.findIndex((s) => s.type === type);
      if (index < 0) continue;
      const value = lookup(elf, sections, index, name);
      if (value !== undefined) return value;
    }
    return undefined;
  });
}

/** The lowest PT_LOAD p_vaddr of the ELF64 file at path, rounded down to the
 * page: what the file's mapping at offset 0 stands for. */
export function firstLoadVaddr(path: string): bigint {
  return answered(path, 'first load', (elf, h) => {
    const table = elf.read(h.phoff, h.phnum * h.phentsize, 'program headers');
    let lowest: bigint | undefined;
    for (let i = 0; i < h.phnum; i++) {
      const o = i * h.phentsize;
      if (table.readUInt32LE(o) !== PT_LOAD) continue;
      const vaddr = table.readBigUInt64LE(o + 16);
      if (lowest === undefined || vaddr < lowest) lowest = vaddr;
    }
    if (lowest === undefined) throw new AppshotError(`${path}: no PT_LOAD segment`);
    return lowest - (lowest % PAGE);
  });
}

/** The start of the mapping of `path` at file offset 0 in a maps text
 * (/proc/PID/maps), or undefined if the file is not mapped there. */
export function mappingBase(maps: string, path: string): bigint | undefined {
  let base: bigint | undefined;
  for (const line of maps.split('\n')) {
    // start-end perms offset dev inode   path
    const m = /^([0-9a-f]+)-[0-9a-f]+ \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$/.exec(line);
    if (!m || m[3] !== path || BigInt(`0x${m[2]}`) !== 0n) continue;
    const start = BigInt(`0x${m[1]}`);
    if (base === undefined || start < base) base = start;
  }
  return base;
}

/**
 * Where the symbol `name` lives in the process whose maps text is given,
 * searching the mapped ELF files in `objects` in that order (the executable
 * first, as the dynamic linker does, so that a copy relocation wins): the
 * first that is mapped and defines it. undefined if none does.
 */
export function symbolAddress(maps: string, objects: string[], name: string): { path: string; address: bigint } | undefined {
  for (const path of objects) {
    const base = mappingBase(maps, path);
    if (base === undefined) continue;
    const value = elfSymbol(path, name);
    if (value === undefined) continue;
    return { path, address: base - firstLoadVaddr(path) + value };
  }
  return undefined;
}
