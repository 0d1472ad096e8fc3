// The ELF64 reader: symbols found in the files match what the processes that
// map them really hold, read back through /proc/PID/mem.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { elfSymbol, firstLoadVaddr, mappingBase, symbolAddress } from '../src/elf.js';
import { AppshotError } from '../src/errors.js';

const dir = mkdtempSync(join(tmpdir(), 'appshot-elf-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The mapped file named like re in a maps text. */
function mappedFile(maps: string, re: RegExp): string {
  const path = maps
    .split('\n')
    .map((l) => l.split(/\s+/)[5])
    .find((p) => p !== undefined && re.test(p));
  if (!path) throw new Error(`no file like ${re} in the maps`);
  return path;
}

/** Reads process memory through /proc/PID/mem. */
class Mem {
  private readonly fd: number;
  constructor(pid: number | 'self') {
    this.fd = openSync(`/proc/${pid}/mem`, 'r');
  }
  bytes(address: bigint, length: number): Buffer {
    const b = Buffer.alloc(length);
    expect(readSync(this.fd, b, 0, length, Number(address))).toBe(length);
    return b;
  }
  pointer(address: bigint): bigint {
    return this.bytes(address, 8).readBigUInt64LE(0);
  }
  /** A NUL-terminated string, read a byte at a time up to a page end so no
   * read crosses into an unmapped page. */
  string(address: bigint): string {
    const out: Buffer[] = [];
    for (let a = address; ; ) {
      const room = Number(4096n - (a % 4096n));
      const b = this.bytes(a, Math.min(room, 256));
      const nul = b.indexOf(0);
      if (nul >= 0) return Buffer.concat([...out, b.subarray(0, nul)]).toString('utf8');
      out.push(b);
      a += BigInt(b.length);
    }
  }
  /** The entries of a NULL-terminated array of strings (an environment). */
  strings(array: bigint): string[] {
    const out: string[] = [];
    for (let a = array; out.length < 10_000; a += 8n) {
      const p = this.pointer(a);
      if (p === 0n) return out;
      out.push(this.string(p));
    }
    throw new Error('no end to the array');
  }
  close(): void {
    closeSync(this.fd);
  }
}

describe('elfSymbol and firstLoadVaddr', () => {
  it("find the environment of Node's own process", () => {
    const maps = readFileSync('/proc/self/maps', 'utf8');
    const libc = mappedFile(maps, /\/libc(\.so\.6|-[0-9.]+\.so)$/);
    const exe = realpathSync(process.execPath);
    expect(elfSymbol(libc, '__environ')).toBeGreaterThan(0n);
    expect(mappingBase(maps, libc)).toBeDefined();

    // Where the executable refers to environ it holds a copy of it (a copy
    // relocation) and that copy is the live one: search it first.
    const found = symbolAddress(maps, [exe, libc], '__environ');
    expect(found).toBeDefined();
    expect(found!.path).toBe(elfSymbol(exe, '__environ') !== undefined ? exe : libc);
    const mem = new Mem('self');
    try {
      const environ = mem.pointer(found!.address);
      expect(environ).not.toBe(0n);
      const entries = mem.strings(environ);
      expect(entries.length).toBeGreaterThan(0);
      const first = entries[0];
      const eq = first.indexOf('=');
      expect(eq).toBeGreaterThan(0);
      expect(process.env[first.slice(0, eq)]).toBe(first.slice(eq + 1));
      if (found!.path === exe) {
        // The copy relocation left libc's own storage behind: it does not
        // point at the environment (null, or a stale array).
        const own = symbolAddress(maps, [libc], '__environ')!;
        expect(mem.pointer(own.address)).not.toBe(environ);
      }
    } finally {
      mem.close();
    }
  });

  it('find libc and .symtab symbols in a PIE program that does not refer to environ', async () => {
    // A static variable is only in .symtab; the program never names environ,
    // so libc's __environ is the live one.
    const src = join(dir, 'helper.c');
    const bin = join(dir, 'helper');
    writeFileSync(
      src,
      `#include <stdio.h>
static volatile unsigned elf_static_marker = 0x5eed1234u;
int main(void) {
  char line[16];
  printf("READY %u\\n", elf_static_marker);
  fflush(stdout);
  return fgets(line, sizeof line, stdin) ? 0 : 1; /* until the test is done */
}
`,
    );
    const cc = spawnSync('cc', ['-O0', '-g', '-fPIE', '-pie', '-o', bin, src], { encoding: 'utf8' });
    expect(cc.stderr).toBe('');
    expect(cc.status).toBe(0);
    expect(elfSymbol(bin, '__environ')).toBeUndefined();
    expect(elfSymbol(bin, 'elf_static_marker')).toBeGreaterThan(0n);
    expect(firstLoadVaddr(bin)).toBe(0n);

    const child = spawn(bin, [], { env: { ELFTEST_MARKER: 'found-it', OTHER: 'x' } });
    try {
      const lines = createInterface({ input: child.stdout });
      const ready = await new Promise<string>((resolve, reject) => {
        lines.once('line', resolve);
        child.once('exit', (code) => reject(new Error(`helper exited ${code}`)));
      });
      expect(ready).toBe(`READY ${0x5eed1234}`);
      const maps = readFileSync(`/proc/${child.pid}/maps`, 'utf8');
      const libc = mappedFile(maps, /\/libc(\.so\.6|-[0-9.]+\.so)$/);
      const exe = mappedFile(maps, /\/helper$/);
      const env = symbolAddress(maps, [exe, libc], '__environ')!;
      expect(env.path).toBe(libc);
      const marker = symbolAddress(maps, [exe, libc], 'elf_static_marker')!;
      expect(marker.path).toBe(exe);

      let mem: Mem;
      try {
        mem = new Mem(child.pid!);
      } catch (e) {
        // Only where ptrace rules forbid even a parent to read its child.
        console.warn(`cannot read /proc/${child.pid}/mem: ${(e as Error).message}`);
        return;
      }
      try {
        expect(mem.bytes(marker.address, 4).readUInt32LE(0)).toBe(0x5eed1234);
        const entries = mem.strings(mem.pointer(env.address));
        expect(entries.sort()).toEqual(['ELFTEST_MARKER=found-it', 'OTHER=x']);
      } finally {
        mem.close();
      }
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('answers undefined for a symbol the file does not define', () => {
    const maps = readFileSync('/proc/self/maps', 'utf8');
    const libc = mappedFile(maps, /\/libc(\.so\.6|-[0-9.]+\.so)$/);
    expect(elfSymbol(libc, 'no_such_symbol_anywhere')).toBeUndefined();
    // A tail of a real name is not a name.
    expect(elfSymbol(libc, 'viron')).toBeUndefined();
    // Defined under a default and an old version: the default one.
    expect(elfSymbol(libc, 'memcpy')).toBeGreaterThan(0n);
  });

  it('refuses what is not a 64-bit little-endian ELF file, by name', () => {
    const text = join(dir, 'text');
    writeFileSync(text, 'just some text, long enough to hold an ELF header if it were one......');
    const short = join(dir, 'short');
    writeFileSync(short, '\x7fELF');
    const elf32 = join(dir, 'elf32');
    const h = Buffer.alloc(52);
    h.write('\x7fELF', 0, 'latin1');
    h[4] = 1; // ELFCLASS32
    h[5] = 1;
    writeFileSync(elf32, Buffer.concat([h, Buffer.alloc(64)]));
    const bigEndian = join(dir, 'elf64be');
    const b = Buffer.alloc(64);
    b.write('\x7fELF', 0, 'latin1');
    b[4] = 2;
    b[5] = 2; // ELFDATA2MSB
    writeFileSync(bigEndian, b);
    // A real header whose tables are cut off.
    const truncated = join(dir, 'truncated');
    writeFileSync(truncated, readFileSync(realpathSync(process.execPath)).subarray(0, 64));

    const refused = (f: () => unknown, message: RegExp) => {
      expect(f).toThrow(AppshotError);
      expect(f).toThrow(message);
    };
    refused(() => elfSymbol(text, 'x'), /text is not an ELF file$/);
    refused(() => firstLoadVaddr(short), /short is not an ELF file \(only 4 bytes\)/);
    refused(() => elfSymbol(elf32, 'x'), /elf32 is not a 64-bit ELF file/);
    refused(() => firstLoadVaddr(bigEndian), /elf64be is not a little-endian ELF file/);
    refused(() => firstLoadVaddr(truncated), /truncated or corrupt ELF file \(program headers/);
    refused(() => elfSymbol(truncated, 'x'), /truncated or corrupt ELF file \(section headers/);
    refused(() => elfSymbol(join(dir, 'missing'), 'x'), /cannot read .*missing: ENOENT/);
  });
});
