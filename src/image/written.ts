/**
 * Page files this state directory wrote itself, still unchanged: their
 * chunk checks need not be done again.
 *
 * A restore checks every chunk of an image's page file against the signed
 * chunk table before the application may read it (format.ts, PagesCheck):
 * the file is not covered by the signature, and anyone who can write it
 * could change what the application runs. That costs reading and hashing
 * the whole file (~0.5 ms per MiB here), and a lazy restore cannot resume
 * before it ends: the application would read chunks not checked yet.
 *
 * When `snapshot` has just written a page file, it records here, under the
 * image's id, the file's identity as the kernel has it right after the
 * file got its name (device, inode, size, mtime and ctime to the
 * nanosecond) and the SHA-256 of its chunk table. A restore from this
 * state directory skips the check of a page file that
 *  - belongs to an image signed by this node's own key (self),
 *  - sits in a directory only its owner can change (loadImage's check),
 *  - and is, by that identity, the very file recorded, with the same
 *    chunk table: any write, truncation, chmod or replacement since moves
 *    its ctime (a new inode, its number), which no one but root can set
 *    back. Since Linux 6.13 (multigrain timestamps: ext4, xfs, btrfs,
 *    tmpfs) a change after the stat that made the record gets a ctime of
 *    its own even within the same clock tick; before, a change made by
 *    the owner within that tick (a few ms) would go unseen.
 * What it does not catch: corruption below the file system (a bad disk
 * block) that changes no timestamp. `appshot restore --verify` checks
 * every chunk all the same. Only on file systems whose timestamps the
 * local kernel keeps (LOCAL_TIMES).
 *
 *   $APPSHOT_HOME/written/<image id>   {"dev","ino","size","mtimeNs","ctimeNs","chunks"}
 *
 * The directory is the owner's only (0700); records are written whole
 * (temporary name, rename) and at most KEEP are kept, the oldest going
 * first.
 */
import { createHash } from 'node:crypto';
import { type BigIntStats, closeSync, constants as fsc, fstatSync, lstatSync, mkdirSync, openSync, readdirSync, readSync, renameSync, rmSync, statfsSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultHome, makeHome } from '../home.js';
import { uniqueTag } from '../holder.js';

/** File systems whose inode numbers and timestamps this kernel keeps
 * itself: ext4, xfs, btrfs, tmpfs. On FUSE, NFS, CIFS, 9p... a server
 * reports them (sshfs: ctime follows mtime, which the owner can set), so
 * a page file there is always checked. */
const LOCAL_TIMES = new Set([0xef53, 0x58465342, 0x9123683e, 0x01021994]);

/** Records kept: a few hundred bytes each. */
const KEEP = 512;
const IMAGE_ID = /^[0-9a-f]{16}$/;
/** A record is ~150 bytes: anything larger is not one. */
const MAX_RECORD = 1024;

const writtenDir = (home: string) => join(home, 'written');

interface Record {
  dev: string;
  ino: string;
  size: string;
  mtimeNs: string;
  ctimeNs: string;
  chunks: string;
}

const chunkTableDigest = (chunks: Buffer) => createHash('sha256').update(chunks).digest('hex');

function identityOf(st: BigIntStats, chunks: Buffer): Record {
  return { dev: String(st.dev), ino: String(st.ino), size: String(st.size), mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs), chunks: chunkTableDigest(chunks) };
}

/**
 * The identity to record of a page file just named (stat it at once:
 * `st`), to be recorded by recordWritten once its image is committed.
 */
export function writtenIdentity(path: string): BigIntStats | undefined {
  try {
    return statSync(path, { bigint: true });
  } catch {
    return undefined;
  }
}

/**
 * Records the page file whose identity is `st` (writtenIdentity, taken
 * when it got its name in the image's private staging directory) as
 * written by this state directory for image `imageId`. Best effort: a
 * record that cannot be written only means the next restore checks it.
 */
export function recordWritten(st: BigIntStats | undefined, imageId: string, chunks: Buffer, home = defaultHome()): void {
  if (!st || !IMAGE_ID.test(imageId)) return;
  try {
    const dir = writtenDir(home);
    makeHome(home);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    if (!privateDir(dir)) return;
    const tmp = join(dir, `.${imageId}.${uniqueTag()}`);
    writeFileSync(tmp, JSON.stringify(identityOf(st, chunks)), { mode: 0o600, flag: 'wx' });
    renameSync(tmp, join(dir, imageId));
    prune(dir);
  } catch {
    // the next restore checks the file: nothing lost
  }
}

/**
 * Whether the page file open as `fd` is, unchanged, the one this state
 * directory recorded for image `imageId` with chunk table `chunks`. The
 * caller has checked that the manifest is signed by this node's own key.
 */
export function writtenHere(fd: number, imageId: string, chunks: Buffer, home = defaultHome()): boolean {
  if (!IMAGE_ID.test(imageId)) return false;
  const dir = writtenDir(home);
  let rfd: number | undefined;
  try {
    if (!privateDir(dir)) return false;
    rfd = openSync(join(dir, imageId), fsc.O_RDONLY | fsc.O_NOFOLLOW);
    const st = fstatSync(rfd);
    if (!st.isFile() || st.uid !== process.geteuid?.() || st.size > MAX_RECORD) return false;
    const buf = Buffer.alloc(st.size);
    if (readSync(rfd, buf, 0, st.size, 0) !== st.size) return false;
    if (!LOCAL_TIMES.has(statfsSync(`/proc/self/fd/${fd}`).type)) return false;
    const recorded = JSON.parse(buf.toString('utf8')) as Partial<Record>;
    const now = identityOf(fstatSync(fd, { bigint: true }), chunks);
    return (Object.keys(now) as (keyof Record)[]).every((k) => recorded[k] === now[k]);
  } catch {
    return false;
  } finally {
    if (rfd !== undefined) closeSync(rfd);
  }
}

/** Ours, a directory, and no one else may write in it. */
function privateDir(dir: string): boolean {
  const st = lstatSync(dir);
  return st.isDirectory() && st.uid === process.geteuid?.() && (st.mode & 0o022) === 0;
}

/** At most KEEP records, the oldest (by mtime) removed first; and the
 * temporary name of one whose writer was killed before its rename (older
 * than a minute: a writer that lives writes and renames in microseconds). */
function prune(dir: string): void {
  const all = readdirSync(dir);
  for (const n of all.filter((n) => n.startsWith('.'))) {
    try {
      if (Date.now() - lstatSync(join(dir, n)).mtimeMs > 60_000) rmSync(join(dir, n), { force: true });
    } catch {
      // gone meanwhile
    }
  }
  const names = all.filter((n) => IMAGE_ID.test(n));
  if (names.length <= KEEP) return;
  const aged = names.map((n) => {
    try {
      return { n, t: lstatSync(join(dir, n)).mtimeMs };
    } catch {
      return { n, t: 0 };
    }
  });
  aged.sort((a, b) => a.t - b.t);
  for (const { n } of aged.slice(0, aged.length - KEEP)) rmSync(join(dir, n), { force: true });
}
