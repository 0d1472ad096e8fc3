/**
 * Files still open after they were deleted (and memfds, which are such
 * files from the start): a deleted file lives only as long as its last
 * descriptor, so the image keeps its bytes, and a restore makes a new
 * file with them, opens it and deletes it again. A memfd that holds seals
 * is refused: the file made at restore would take none.
 */
import { closeSync, constants as fs, openSync, unlinkSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Fd } from '../image/types.js';
import { addon } from '../native.js';
import { type DumpContext, type RestoreContext, Unsupported } from './context.js';

/* ---- dump ------------------------------------------------------------- */

/** A memfd comes back as a deleted file with its contents, which takes no
 * seals: one that holds seals (F_ADD_SEALS) would silently lose them. */
export function refuseSealedMemfd(pid: number, fd: number, where: string): void {
  const dup = addon().getFd(pid, fd);
  try {
    const seals = addon().fileSeals(dup);
    if (seals > 0) throw new Unsupported(`${where}: a memfd with seals (F_ADD_SEALS 0x${seals.toString(16)}) cannot be captured yet`);
  } finally {
    closeSync(dup);
  }
}

/** The deleted file's bytes into the image, once per file. */
export function saveDeletedContents(ctx: DumpContext, pid: number, fd: number, index: number): void {
  const id = ctx.image.files[index];
  if (id.contents) return;
  const f = openSync(`/proc/${pid}/fd/${fd}`, 'r');
  try {
    const { offset, runs } = ctx.pages.appendFd(f, Number(id.size));
    id.contents = { offset: BigInt(offset), runs: Array.from(runs), fromParent: [] };
  } finally {
    closeSync(f);
  }
}

/* ---- restore ---------------------------------------------------------- */

/** Our descriptor for a deleted file: made beside where it was (or in
 * /tmp), filled, opened with the image's flags and deleted again. */
export function openDeletedFile(h: RestoreContext, fd: Fd): number {
  const id = h.image.files[fd.file];
  const dir = dirname(id.path);
  let path = join(dir, `.appshot-restored-${process.pid}-${fd.fd}`);
  let tmp: number;
  try {
    tmp = openSync(path, fs.O_RDWR | fs.O_CREAT | fs.O_EXCL, id.mode & 0o777);
  } catch {
    path = join('/tmp', `.appshot-restored-${process.pid}-${fd.fd}`);
    tmp = openSync(path, fs.O_RDWR | fs.O_CREAT | fs.O_EXCL, id.mode & 0o777);
  }
  try {
    h.copyPages(tmp, id.contents);
    const f = h.keep(openSync(path, fd.flags & ~(fs.O_CREAT | fs.O_EXCL | fs.O_TRUNC)));
    addon().lseek(f, 0);
    return f;
  } finally {
    closeSync(tmp);
    unlinkSync(path);
  }
}
