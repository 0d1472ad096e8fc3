/**
 * Filesystem identity: a restore does every path operation on a name an
 * image gives (a socket's file, a file to open again) as the image's
 * process would, never as the restorer.
 *
 * A root restore of an application that ran as uid 1000 would otherwise
 * follow a symlink planted in the application's directory to a place
 * only root may write, bind or open there, and hand the application what
 * it never could reach (review28 R3). The kernel decides a path operation
 * by the calling thread's fsuid, fsgid, supplementary groups and effective
 * capabilities: the addon takes those of the image's process on a thread
 * of its own for the one operation (addon fsident.c), and the kernel's
 * EACCES is the answer, as it would have been the application's.
 *
 * Which process: the one the restore makes the descriptor for (for a
 * socket, the first process of the image that holds it: a server's master
 * before its workers). Its main thread's credentials (an older image: the
 * process's). An unprivileged restorer holds those already or is refused
 * before anything is made (creds.ts, credentialRefusal): the calls it
 * makes on its thread need no privilege.
 */
import { type Creds, type Image, type Process } from '../image/types.js';
import type { FsIdentity } from '../native.js';

/** The filesystem identity of credentials `c` (uid[3], gid[3]: fsuid, fsgid). */
export function fsIdentityOfCreds(c: Creds): FsIdentity {
  return { fsuid: c.uid[3], fsgid: c.gid[3], groups: c.groups, capEff: c.capEff };
}

/** The filesystem identity of process `p` of an image. */
export function fsIdentity(p: Process): FsIdentity {
  const main = p.threads.find((t) => t.vtid === p.vpid)?.creds;
  return fsIdentityOfCreds(main ?? p.creds);
}

/** The identity of the first process of `image` that holds `holds`
 * (a descriptor or mapping of a file, a pipe): the one whose open it was,
 * as far as an image can tell; its first process if none does. */
export function firstHolderIdentity(image: Image, holds: (p: Process) => boolean): FsIdentity | undefined {
  const p = image.processes.find(holds) ?? image.processes[0];
  return p && fsIdentity(p);
}

/** Per image: each socket's first holder (by inode). */
const holders = new WeakMap<Image, Map<bigint, Process>>();

/** The identity of the first process of `image` holding socket `ino`:
 * whose bind it was, as far as an image can tell. Undefined if none holds
 * it (a validated image has none such). */
export function socketHolderIdentity(image: Image, ino: bigint): FsIdentity | undefined {
  let byIno = holders.get(image);
  if (!byIno) {
    byIno = new Map();
    for (const p of image.processes) for (const fd of p.fds) if (fd.socket && !byIno.has(fd.socket.ino)) byIno.set(fd.socket.ino, p);
    holders.set(image, byIno);
  }
  const p = byIno.get(ino);
  return p && fsIdentity(p);
}
