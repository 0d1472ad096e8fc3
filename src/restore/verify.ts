/**
 * Can this node run the image (step 1 of a restore, before anything is
 * touched)? The same architecture and vDSO layout, and every file the
 * image maps identical to the one it mapped: a library that differs would
 * run the restored code against the wrong bytes.
 *
 * A mapped file is opened, measured and read as the processes that map
 * it would open it where the restorer is root (fsident.ts): its name is
 * the application's, and a directory on it that the application's user
 * may write can have become a symlink to a place only root may read.
 * Read with root's rights, such a file would be checksummed and its size
 * printed in the refusal: what its user could not read, told to them one
 * measure at a time. A FIFO or a device put at the name would have held
 * the restorer (the resident engine, serve) in open() or read() for ever.
 */
import { closeSync, constants as fsc, fstatSync, type BigIntStats } from 'node:fs';
import { AppshotError } from '../errors.js';
import { FdKind, type Image, type Process, VmaKind } from '../image/types.js';
import { addon } from '../native.js';
import { fsIdentity, identitiesFor, openToMapKey, refusal, refusedAsProcess, refuseMagicLink } from '../resources/fsident.js';
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

/** The checksum of `fd`, file `path` whose status is `st`, read from its
 * start (just opened). */
function checksumOf(path: string, fd: number, st: BigIntStats): number {
  const key = `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
  const kept = checksums?.get(path);
  if (kept && kept.key === key) return kept.crc;
  const crc = addon().crc32cFile(fd).crc;
  if (checksums) {
    if (checksums.size >= CHECKSUMS_LIMIT) checksums.delete(checksums.keys().next().value!);
    // Kept only if nothing changed while it was read.
    const after = fstatSync(fd, { bigint: true });
    if (`${after.dev}:${after.ino}:${after.size}:${after.mtimeNs}:${after.ctimeNs}` === key) checksums.set(path, { key, crc });
  }
  return crc;
}

/** Errors of an open that say the name leads nowhere. */
const NOT_THERE = new Set(['ENOENT', 'ENOTDIR', 'ELOOP', 'ENAMETOOLONG']);

const restorerIsRoot = () => process.geteuid?.() === 0;

/** `path`, a name process `p` of `image` used, opened with `flags` as the
 * application's processes would open it (identitiesFor: `p`'s identity
 * first) where we are root, else as ourselves (whose credentials cover
 * the image's: creds.ts). Non-blocking, so that a FIFO or a line opens at
 * once. Undefined where the name leads nowhere; `refused` where their
 * credentials do not reach it (EACCES, EPERM) and the caller lets that
 * be decided later; else that refusal is one line naming `what` (exit 5),
 * and any other error one line naming it. */
function openNamed(image: Image, p: Process | undefined, path: string, flags: number, what: string, refused?: 'later'): number | 'refused' | undefined {
  try {
    return addon().openAs(path, flags | fsc.O_NONBLOCK, 0, restorerIsRoot() ? identitiesFor(image, p) : undefined);
  } catch (e) {
    // ELOOP too, but not a name that is missing: refused as such.
    refuseMagicLink(e, what);
    const code = (e as NodeJS.ErrnoException).code;
    if (code && NOT_THERE.has(code)) return undefined;
    if (refusal(e) && refused === 'later') return 'refused';
    if (refusal(e)) refusedAsProcess(e, what, p && restorerIsRoot() ? fsIdentity(p) : undefined);
    throw new AppshotError(`${what} cannot be opened on this node: ${code ?? (e as Error).message}`);
  }
}

/** One mapped file checked: there, of the type the image recorded, and
 * for `contents` (not the application's shared data) a regular file of
 * the very size and bytes the image saw. Anything but a regular file
 * read is reached O_PATH, which opens nothing: a private mapping of
 * /dev/zero (anonymous memory, the old way) is a device, not opened here. */
function checkMapped(image: Image, p: Process | undefined, f: Image['files'][number], contents: boolean, opened?: Map<string, number>): void {
  // (An image that recorded no type: a regular file, as it was taken for.)
  const type = Number(f.mode) & fsc.S_IFMT || fsc.S_IFREG;
  const read = contents && type === fsc.S_IFREG;
  const fd = openNamed(image, p, f.path, read ? fsc.O_RDONLY : O_PATH, `${f.path}, which the image maps,`);
  if (fd === undefined || fd === 'refused') throw new AppshotError(`${f.path}, which the image maps${contents ? '' : ' shared'}, is missing on this node`);
  let kept = false;
  try {
    const st = fstatSync(fd, { bigint: true });
    if ((Number(st.mode) & fsc.S_IFMT) !== type) throw new AppshotError(`${f.path}, which the image maps, is another kind of file on this node`);
    if (!read) return;
    if (st.size !== f.size) throw new AppshotError(`${f.path} differs from the one the image mapped (${st.size} bytes, not ${f.size})`);
    if (f.crc32c && checksumOf(f.path, fd, st) !== f.crc32c) throw new AppshotError(`${f.path} differs from the one the image mapped (its contents changed)`);
    // The very file checked, kept for the mapping (openToMapAs: the same
    // open, as the same process, with the same flags).
    const k = openToMapKey(p, f.path, fsc.O_RDONLY);
    if (opened && !opened.has(k)) {
      opened.set(k, fd);
      kept = true;
    }
  } finally {
    if (!kept) closeSync(fd);
  }
}

const O_PATH = 0o10000000;
const O_NOFOLLOW = 0o400000;

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
 * carries that clone's private copies), not looked for on this node.
 * `opened`, for a root restore: where the files checked are left open
 * for its mappings (driver.ts), under openToMapKey; the caller's to
 * close. */
export function verifyImage(image: Image, provided: (path: string) => boolean = () => false, opened?: Map<string, number>): void {
  const arch = process.arch === 'x64' ? 'x86_64' : process.arch;
  if (image.node.arch !== arch) throw new AppshotError(`the image is for ${image.node.arch}; this node is ${arch}`);
  const { vdso, vvar } = (ownVdso ??= vdsoLayout());
  if (vdso !== image.node.vdsoSize || vvar !== image.node.vvarSize)
    throw new AppshotError(
      `this kernel's vDSO layout (vdso ${vdso} bytes, vvar ${vvar}) differs from the image's (${image.node.vdsoSize}, ${image.node.vvarSize}): kernel ${image.node.kernel} is needed`,
    );

  // Each name a mapped file is mapped by (the mapping opens that name,
  // which may not be the name the file was first recorded under: a hard
  // link, a bind mount), with the first process that maps it so.
  const mapped = new Map<string, { i: number; p: Process; path: string }>();
  // A file mapped shared and writable is the application's data (a
  // database's, say): it changes as the application runs, and must only be
  // there. Code and read-only data must be the very bytes the image saw.
  const writable = new Set<number>();
  for (const p of image.processes)
    for (const v of p.vmas) {
      if (v.file < 0 || (v.kind !== VmaKind.FILE_PRIVATE && v.kind !== VmaKind.FILE_SHARED)) continue;
      const path = v.path || image.files[v.file]?.path;
      const k = `${v.file}\0${path}`;
      if (!mapped.has(k)) mapped.set(k, { i: v.file, p, path });
      if (v.kind === VmaKind.FILE_SHARED && v.prot & 2) writable.add(v.file);
    }
  for (const { i, p, path } of mapped.values()) {
    const f = image.files[i];
    // (A file the image does not have is validate.ts's to refuse.)
    if (!f || path === image.tablesPath || f.path === image.tablesPath || provided(path)) continue; // replaced by the new tables, or brought along
    checkMapped(image, p, { ...f, path }, !writable.has(i), opened);
  }
  for (const p of image.processes)
    for (const fd of p.fds) {
      // The log and the table file are the new application's (restore/driver.ts).
      // A /proc file of the application's own process: its restored one.
      if (fd.kind !== FdKind.FILE || fd.path === image.logPath || fd.path === image.tablesPath || fd.procVpid) continue;
      const f = image.files[fd.file];
      if (!f || f.deleted || provided(f.path)) continue;
      // Reached as the process (O_PATH: nothing opened): a name its
      // credentials do not reach is the descriptor's restore to decide
      // (a file it held past a drop of privileges, or a refusal there),
      // not told here as there or not by root's look.
      const what = `${f.path}, which process ${p.vpid} holds open as fd ${fd.fd},`;
      // A symbolic link held itself (O_PATH|O_NOFOLLOW): the link, not what it names.
      const at = openNamed(image, p, f.path, f.linkTarget !== undefined ? O_PATH | O_NOFOLLOW : O_PATH, what, 'later');
      if (at === undefined) throw new AppshotError(`${what} is missing on this node`);
      if (at !== 'refused') closeSync(at);
    }
}
