/**
 * Can this node run the image (step 1 of a restore, before anything is
 * touched)? The same architecture and vDSO layout, and every file the
 * image maps identical to the one it mapped: a library that differs would
 * run the restored code against the wrong bytes.
 */
import { type BigIntStats, existsSync, statSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { FdKind, type Image, VmaKind } from '../image/types.js';
import { addon } from '../native.js';
import { readMaps } from '../resources/memory.js';

/** Checksums of mapped files (libraries, the program) already read, kept
 * by the resident engine (keepChecksums) while the file is the same as
 * far as the kernel can tell: device, inode, size, mtime and ctime (which
 * any write, truncate, chmod or link moves). A CLI process reads each once
 * anyway. */
let checksums: Map<string, { key: string; crc: number }> | undefined;
const CHECKSUMS_LIMIT = 1024;

export function keepChecksums(): void {
  checksums ??= new Map();
}

function checksumOf(path: string, st: BigIntStats): number {
  const key = `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
  const kept = checksums?.get(path);
  if (kept && kept.key === key) return kept.crc;
  const crc = addon().crc32cFile(path).crc;
  if (checksums) {
    if (checksums.size >= CHECKSUMS_LIMIT) checksums.delete(checksums.keys().next().value!);
    // Kept only if nothing changed while it was read.
    const after = statSync(path, { bigint: true });
    if (`${after.dev}:${after.ino}:${after.size}:${after.mtimeNs}:${after.ctimeNs}` === key) checksums.set(path, { key, crc });
  }
  return crc;
}

/** A file's status, or undefined where existsSync would say it is not
 * there (missing, or not reachable): one stat where the two took two (a
 * restore asks it of every library the image maps). */
function statIfThere(path: string): BigIntStats | undefined {
  try {
    return statSync(path, { bigint: true, throwIfNoEntry: false });
  } catch {
    return undefined;
  }
}

/** The sizes of this process's vDSO and vvar: the kernel's, the same for
 * every process it runs, read once (appshot's own maps are a few hundred
 * lines long). */
let ownVdso: { vdso: bigint; vvar: bigint } | undefined;
function vdsoLayout(): { vdso: bigint; vvar: bigint } {
  let vdso = 0n;
  let vvar = 0n;
  for (const l of readMaps(process.pid)) {
    if (l.path === '[vdso]') vdso += l.end - l.start;
    if (l.path === '[vvar]' || l.path === '[vvar_vclock]') vvar += l.end - l.start;
  }
  return { vdso, vvar };
}

/** `provided`: files the caller brings itself (a template made of a clone
 * carries that clone's private copies), not looked for on this node. */
export function verifyImage(image: Image, provided: (path: string) => boolean = () => false): void {
  const arch = process.arch === 'x64' ? 'x86_64' : process.arch;
  if (image.node.arch !== arch) throw new AppshotError(`the image is for ${image.node.arch}; this node is ${arch}`);
  const { vdso, vvar } = (ownVdso ??= vdsoLayout());
  if (vdso !== image.node.vdsoSize || vvar !== image.node.vvarSize)
    throw new AppshotError(
      `this kernel's vDSO layout (vdso ${vdso} bytes, vvar ${vvar}) differs from the image's (${image.node.vdsoSize}, ${image.node.vvarSize}): kernel ${image.node.kernel} is needed`,
    );

  const mapped = new Set<number>();
  // A file mapped shared and writable is the application's data (a
  // database's, say): it changes as the application runs, and must only be
  // there. Code and read-only data must be the very bytes the image saw.
  const writable = new Set<number>();
  for (const p of image.processes)
    for (const v of p.vmas) {
      if (v.file < 0 || (v.kind !== VmaKind.FILE_PRIVATE && v.kind !== VmaKind.FILE_SHARED)) continue;
      mapped.add(v.file);
      if (v.kind === VmaKind.FILE_SHARED && v.prot & 2) writable.add(v.file);
    }
  for (const i of mapped) {
    const f = image.files[i];
    if (f.path === image.tablesPath || provided(f.path)) continue; // replaced by the new tables, or brought along
    if (writable.has(i)) {
      if (!existsSync(f.path)) throw new AppshotError(`${f.path}, which the image maps shared, is missing on this node`);
      continue;
    }
    const st = statIfThere(f.path);
    if (!st) throw new AppshotError(`${f.path}, which the image maps, is missing on this node`);
    if (st.size !== f.size) throw new AppshotError(`${f.path} differs from the one the image mapped (${st.size} bytes, not ${f.size})`);
    if (f.crc32c && checksumOf(f.path, st) !== f.crc32c)
      throw new AppshotError(`${f.path} differs from the one the image mapped (its contents changed)`);
  }
  for (const p of image.processes)
    for (const fd of p.fds) {
      // The log and the table file are the new application's (restore/driver.ts).
      // A /proc file of the application's own process: its restored one.
      if (fd.kind !== FdKind.FILE || fd.path === image.logPath || fd.path === image.tablesPath || fd.procVpid) continue;
      const f = image.files[fd.file];
      if (f && !f.deleted && !provided(f.path) && !existsSync(f.path)) throw new AppshotError(`${f.path}, which process ${p.vpid} holds open as fd ${fd.fd}, is missing on this node`);
    }
}
