/**
 * Reading and writing images: protobuf metadata (proto/image.proto, through
 * the code generated from it at build time: schema.ts) plus the page file,
 * as a directory or a tar stream.
 *
 * A directory image is assembled under a hidden name next to its
 * destination and renamed into place only when every part is synced, so an
 * image either exists whole or not at all. The page file is written
 * unnamed (O_TMPFILE) until then, so a writer killed mid-dump leaves
 * nothing on disk.
 */
import { uniqueTag } from '../holder.js';
import { createHash, type Hash, randomBytes } from 'node:crypto';
import {
  closeSync,
  constants as fsc,
  createReadStream,
  createWriteStream,
  existsSync,
  ftruncateSync,
  linkSync,
  fstatSync,
  lstatSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readSync,
  renameSync,
  rmSync,
  statfsSync,
  statSync,
  writeSync,
  type BigIntStats,
} from 'node:fs';
import { constants as osConstants } from 'node:os';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { pipeline as pipelineCallback, type Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants as zlibConstants, createGunzip, createGzip } from 'node:zlib';
import { killPoint } from '../killpoint.js';
import { requireZstd, zstdCompressTo, zstdDecompressFrom } from './zstd.js';
import { makePartialDir, ownedName, removeStaleTemporaries, temporariesDir } from './partial.js';
import { AppshotError, errnoName, errorText, ExitCode, isSystemCallError } from '../errors.js';
import { addon, type FsyncGroup, type PageFileDigest, type PagesCheck, type PageWriter } from '../native.js';
import { type FieldSchema, type MessageSchema, messageType } from './schema.js';
import { checkSignature, imagesTrustedExplicitly, isOwnKey, type Signer, signWithSelf, untrustedHint } from './trust.js';
import type { Image, Manifest, Template } from './types.js';
import { checkWireCounts, validateImage } from './validate.js';
import { recordWritten, writtenHere, writtenIdentity } from './written.js';
import { onInterrupt } from '../engine/request.js';

export const MAGIC = 'appshot-image';
/** The format this appshot writes. 2: fields an older appshot would
 * ignore and so restore wrong (pages shared copy-on-write between a parent
 * and its children, file locks, datagram sockets, memfd seals): it refuses
 * them instead, by their version. 3: pages.img is vouched for by a SHA-256
 * per chunk (Part.chunkSha256), not one of the whole file, which an older
 * appshot would find missing. A manifest re-signed for parts whose page
 * file has no chunk table (a template of a format 2 image) stays 2. 4: a
 * message queue registered for a signal (chunkedFormatOf). 5: a pty in
 * exclusive mode, a thread with a personality of its own. 6: a SysV segment
 * removed while attached (ShmSegment.destroyed). */
export const FORMAT_VERSION = 6;
/** Formats this appshot reads: every change since 1 only added fields. */
export const READABLE_FORMATS: readonly number[] = [1, 2, 3, 4, 5, 6];
/** The format an image with chunk digests is written as: 6 where it holds
 * a SysV segment removed while attached (ShmSegment.destroyed), which an
 * older appshot would make again as a live segment that outlives its
 * last detach (a leak, its IPC_STAT without SHM_DEST); 5 where it holds
 * a pty in exclusive mode (PtyPair.masterExclusive, slaveExclusive) or a
 * thread whose personality is not its process's (ThreadAttributes.
 * personality), which an older appshot would restore without them; 4
 * where it holds a message queue registered for a signal
 * (PosixQueue.notifySigno and notifyValue), which an older appshot would
 * restore registered for nothing, without a word; 3 otherwise, which
 * every appshot since format 3 reads right. */
export function chunkedFormatOf(image: Image): number {
  if (image.shmSegments.some((s) => s.destroyed)) return 6;
  if (image.ptys?.some((p) => p.masterExclusive || p.slaveExclusive) || image.processes.some((p) => p.threads.some((t) => t.attributes?.personality !== undefined))) return 5;
  return image.posixQueues?.some((q) => q.notifySigno) ? 4 : 3;
}
/** The first format whose page file is checked by chunks. */
const CHUNKED_FORMAT = 3;
export const PARTS = { manifest: 'manifest.pb', image: 'image.pb', pages: 'pages.img' } as const;

const ImageType = messageType('appshot.image.Image');
const ManifestType = messageType('appshot.image.Manifest');
const TemplateType = messageType('appshot.image.Template');

/** bigint → decimal string, which protobufjs takes for 64-bit fields. */
function toWire(value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return value;
  if (Array.isArray(value)) return value.map(toWire);
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = toWire(v);
    return out;
  }
  return value;
}

/** Each message type's fields that hold messages: what fromWire walks. */
const messageFieldsOf = new Map<MessageSchema, FieldSchema[]>();

/** What toObject (longs as BigInt) leaves to do, guided by the schema:
 * absent messages undefined, not null. Only the message fields are
 * walked: 64-bit fields are bigint already, and the rest as they are. */
function fromWire(type: MessageSchema, obj: Record<string, unknown>): Record<string, unknown> {
  let fields = messageFieldsOf.get(type);
  if (!fields) messageFieldsOf.set(type, (fields = type.fieldsArray.filter((f) => f.resolvedType)));
  for (const field of fields) {
    const v = obj[field.name];
    if (v === null || v === undefined) {
      if (!field.repeated) obj[field.name] = undefined;
      continue;
    }
    if (field.repeated) for (const x of v as Record<string, unknown>[]) fromWire(field.resolvedType!, x);
    else fromWire(field.resolvedType!, v as Record<string, unknown>);
  }
  return obj;
}

/** The generated encoder takes the plain object as it is: toWire gives
 * every field the type it writes (numbers, enums as numbers, Buffers,
 * 64-bit values as decimal strings, which it parses as fromObject would),
 * so the message fromObject built first was a second copy of the whole
 * image for the same bytes (a tiny application's image: 3-8 ms in the
 * engine, where this code runs once per snapshot and never gets hot). */
function encode(type: MessageSchema, value: object): Buffer {
  return Buffer.from(type.codec.encode(toWire(value) as Record<string, unknown>).finish());
}

function decode<T>(type: MessageSchema, bytes: Buffer, what: string): T {
  try {
    const msg = type.codec.decode(bytes);
    // 64-bit fields straight to bigint (Long.toBigInt): not each through
    // Long.toString (a division per digit) and BigInt of that string,
    // the most of an image's decoding, and of the garbage a restore in
    // the engine collected.
    const obj = type.codec.toObject(msg, { longs: BigInt, defaults: true, arrays: true });
    return fromWire(type, obj) as T;
  } catch (e) {
    throw new AppshotError(`corrupt image: ${what} cannot be decoded (${(e as Error).message})`);
  }
}

export const encodeImage = (image: Image) => encode(ImageType, image);
export const encodeTemplate = (t: Template) => encode(TemplateType, t);
export const decodeTemplate = (bytes: Buffer) => decode<Template>(TemplateType, bytes, 'template.pb');

/** JSON for people and scripts: bigints as numbers when exact, else strings;
 * byte fields as their length and hex head. */
export function toJson(value: unknown): unknown {
  if (typeof value === 'bigint') return value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value.toString();
  if (Buffer.isBuffer(value)) return { bytes: value.length, hex: value.subarray(0, 32).toString('hex') };
  if (Array.isArray(value)) return value.map(toJson);
  if (value && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = toJson(v);
    return out;
  }
  return value;
}

/** Creates `path` with `data`, not synced yet: its descriptor goes into
 * `fds` (as soon as it is open), for the caller to sync (with others, at
 * once: commitImageDir) and close. */
function writeUnsynced(path: string, data: Buffer, fds: number[]): void {
  const fd = openSync(path, 'wx', 0o600);
  fds.push(fd);
  writeSync(fd, data);
}

/** A directory's entries on disk (made, renamed, removed): what a
 * rename or a link into it needs to outlive a power loss. */
export function syncDir(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** What the manifest of a new image says of its parts: the metadata's
 * digests computed here, the page file's chunk digests as its writer
 * hashed them while it wrote (nothing is read back). */
function partDigests(imageBytes: Buffer, pagesPart: PageFileDigest): Map<string, PartDigest> {
  return new Map([
    [PARTS.image, digestBuffer(imageBytes)],
    [PARTS.pages, { size: pagesPart.size, crc: 0, sha256: Buffer.alloc(0), chunkSize: pagesPart.chunkSize, chunks: pagesPart.chunks }],
  ]);
}

export const newImageId = () => randomBytes(8).toString('hex');

/** Images loaded that a snapshot of this node wrote (image.pb says
 * `fromSnapshot`, under a manifest signed by this node's own key): what
 * they say of the application's descriptors is what the kernel showed that
 * snapshot, not what someone wrote into an image and had signed. Only a
 * snapshot sets the flag (commitImageDir, streamImageTar), and only this
 * node's key signs the manifests it trusts so; template create, which
 * signs whatever it is given (--trust-image), clears it in an image that
 * is not so (template.ts). In image.pb, not the manifest: an older
 * appshot reads the image as ever (it ignores a field it does not know in
 * image.pb, where one in the manifest would fail its signature). */
const ownSnapshots = new WeakSet<Image>();
export const isOwnSnapshot = (image: Image): boolean => ownSnapshots.has(image);
/** The image of a template made before template create took fromSnapshot
 * out of an image.pb whose word was not ours (template.ts): its word is
 * not taken (review32b L1). */
export const notOwnSnapshot = (image: Image): void => void ownSnapshots.delete(image);

/** Writes a directory image at `dest` from the finished page file.
 * `subdirs` (name → a directory already written) move inside it: a
 * pre-copy image carries its base this way. Returns how long the page
 * file's own fsync took when finish(true) left it running (0 otherwise).
 *
 * What is synced when. The rename into place is the commit: whatever it
 * publishes must be durable before it, and it must be durable itself
 * before the caller ends the application (never both lost). Before it:
 * the page file's data and final size (its fsync, started by finish(true)
 * once its size was cut to what was written, running since, beside the
 * last digests, the classification and the encoding and signing here),
 * image.pb's and the manifest's data (their fsyncs), and the staging
 * directory's entries naming the three (its fsync, started once the last
 * of them is made: a directory's fsync makes durable the entries it has
 * then). No one of these four makes another durable or needs another
 * done first, so they run at once (one thread each: the file system may
 * share one journal commit and one device flush among them, where one
 * after another each paid its own), the "placing" journal written
 * meanwhile (it is about kill -9, which syncs do not change: the page
 * cache outlives appshot); the rename waits for all four. Then the parent
 * directory's fsync, which must follow the rename (it is what makes the
 * rename durable), and precede the return. */
export function commitImageDir(dest: string, image: Image, pages: PageWriter, pagesPart: PageFileDigest, imageId: string, subdirs: Record<string, string> = {}, beforePlacing?: (staged: string) => void): number {
  const parent = dirname(resolve(dest));
  const partial = makePartialDir(join(parent, `.${basename(dest)}.partial-${uniqueTag()}`));
  const tmp = partial.path;
  const fds: number[] = [];
  let syncing: FsyncGroup | undefined;
  let placed = false;
  try {
    for (const [name, dir] of Object.entries(subdirs)) renameSync(dir, join(tmp, name));
    pages.link(join(tmp, PARTS.pages));
    // As named, in our staging directory: what a restore may find again
    // unchanged (written.ts), recorded once the image is in place.
    const written = writtenIdentity(join(tmp, PARTS.pages));
    const imageBytes = encodeImage({ ...image, fromSnapshot: true });
    const digests = partDigests(imageBytes, pagesPart);
    writeUnsynced(join(tmp, PARTS.image), imageBytes, fds);
    writeUnsynced(join(tmp, PARTS.manifest), encodeSignedManifest(imageId, digests, image), fds);
    fds.push(openSync(tmp, 'r'));
    syncing = addon().fsyncStart(fds);
    killPoint('image: committing');
    beforePlacing?.(tmp);
    const waiting = syncing;
    syncing = undefined;
    addon().fsyncWait(waiting, `syncing ${tmp}`);
    const pagesFsyncMs = pages.synced();
    placeNoReplace(tmp, dest);
    placed = true;
    partial.done();
    killPoint('image: placed');
    syncDir(parent);
    recordWritten(written, imageId, pagesPart.chunks);
    return pagesFsyncMs;
  } catch (e) {
    // The syncs still running use the descriptors closed below.
    if (syncing)
      try {
        addon().fsyncWait(syncing, `syncing ${tmp}`);
      } catch {
        /* the first failure is the one reported */
      }
    rmSync(tmp, { recursive: true, force: true });
    // Placed, but the commit failed: not committed, so the image goes too,
    // or a caller saying nothing was written would leave a whole image.
    if (placed) {
      rmSync(dest, { recursive: true, force: true });
      try {
        syncDir(parent);
      } catch {
        /* best effort */
      }
    }
    partial.done();
    throw e;
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}

/** Renames the staged directory `tmp` to `dest`, which must not exist:
 * checked before the snapshot began, an empty directory made there since
 * would be replaced by rename(2) without a word (review 242), so the
 * kernel is asked not to (RENAME_NOREPLACE), but on a file system that
 * cannot (EINVAL). */
function placeNoReplace(tmp: string, dest: string): void {
  try {
    addon().renameNoReplace(tmp, dest);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new AppshotError(`${dest} already exists: it appeared while the image was written; an image never replaces one`, ExitCode.conflict);
    if (code !== 'EINVAL') throw e;
    renameSync(tmp, dest);
  }
}

/** tar-stream, loaded by the commands that write or read a tar stream only
 * (it and its dependencies cost every image command ~15 ms to load). */
const loadTar = async () => (await import('tar-stream')).default;

/** Writes the image as a tar stream (manifest first) to `out`. */
export async function streamImageTar(out: NodeJS.WritableStream, image: Image, pages: PageWriter, pagesPart: PageFileDigest, imageId: string): Promise<void> {
  const imageBytes = encodeImage({ ...image, fromSnapshot: true });
  const pack = (await loadTar()).pack();
  const done = pipeline(pack, out as NodeJS.WritableStream);
  // The output may fail first (a full disk, a file size limit, a reader
  // gone): then the page data's own pipeline fails too, and the output's
  // failure, the cause, is the one reported (never left unhandled).
  let outputFailure: unknown;
  done.catch((e) => (outputFailure = e));
  try {
    pack.entry({ name: PARTS.manifest, mode: 0o600 }, encodeSignedManifest(imageId, partDigests(imageBytes, pagesPart), image));
    pack.entry({ name: PARTS.image, mode: 0o600 }, imageBytes);
    const entry = pack.entry({ name: PARTS.pages, mode: 0o600, size: pagesPart.size });
    await pipeline(createReadStream(`/proc/self/fd/${pages.fd()}`), entry);
    pack.finalize();
    await done;
  } catch (e) {
    pack.destroy();
    throw outputFailure ?? e;
  }
}

/** A failure to write an image file, as one line (a plain Error: the
 * snapshot driver adds that the application was left running). */
function writeFailure(dest: string, e: unknown): Error {
  if (e instanceof AppshotError) return e;
  const err = e as NodeJS.ErrnoException;
  const why = err.code === 'EFBIG' ? 'the file size limit was reached' : err.code === 'ENOSPC' ? 'no space left on the device' : err.message;
  return new Error(`writing ${dest}: ${why}`);
}

/**
 * What `-o PATH` asks for: a directory (no tar extension), a tar file, or
 * a compressed one: gzip (Node's zlib) or zstd (the zstd program, see
 * zstd.ts; refused by name, before anything is frozen, without it).
 */
export function imageFileKind(path: string): 'dir' | 'tar' | 'gzip' | 'zstd' {
  if (/\.(tar\.gz|tgz)$/i.test(path)) return 'gzip';
  if (/\.tar$/i.test(path)) return 'tar';
  if (/\.(tar\.zst|tzst)$/i.test(path)) {
    requireZstd(path);
    return 'zstd';
  }
  // An archive or compression name appshot does not write (x.tar.xz,
  // x.zip, x.gz): a directory of that name is never what was meant.
  const other = /(\.tar)?\.(xz|txz|bz2|tbz2?|lz4|lzma|tlz|zip|7z|rar|gz|zst|zstd)$/i.exec(path);
  if (other)
    throw new AppshotError(
      `${path}: appshot writes no ${other[0]} file; expected a directory name, or a file name ending in .tar, .tar.gz (.tgz) or .tar.zst (.tzst)`,
      ExitCode.usage,
    );
  return 'dir';
}

/** Writes the image as a tar file at `dest`, compressed if asked:
 * assembled under a hidden name beside it (journaled, see partial.ts),
 * synced, then linked into place, which never replaces a file that
 * appeared meanwhile. */
export async function commitImageFile(dest: string, compression: 'tar' | 'gzip' | 'zstd', image: Image, pages: PageWriter, pagesPart: PageFileDigest, imageId: string, beforePlacing?: (staged: string) => void): Promise<void> {
  const parent = dirname(resolve(dest));
  const partial = makePartialDir(join(parent, `.${basename(dest)}.partial-${uniqueTag()}`));
  const tmp = join(partial.path, 'image.tar');
  try {
    const fd = openSync(tmp, 'wx', 0o644);
    // The tar stream goes into `input`; `written` settles once the file
    // has all of it. Fastest gzip level: the application stays frozen
    // while its image is written (unless --leave-running); pages compress
    // well even so (zstd's default level is faster still).
    let input: NodeJS.WritableStream;
    let written: Promise<void> | undefined;
    if (compression === 'zstd') {
      ({ input, done: written } = zstdCompressTo(fd, dest));
    } else {
      const file = createWriteStream('', { fd, autoClose: false });
      const gzip = compression === 'gzip' ? createGzip({ level: zlibConstants.Z_BEST_SPEED }) : undefined;
      input = gzip ?? file;
      written = gzip ? pipeline(gzip, file) : undefined;
    }
    written?.catch(() => {}); // awaited below, reported by streamImageTar's failure first
    try {
      await streamImageTar(input, image, pages, pagesPart, imageId);
      await written;
      fsyncSync(fd);
    } catch (e) {
      // A failed stream closes zstd's input, and zstd exits: its own
      // failure (a full disk...) says more than the EPIPE it caused here.
      const zstdFailure = compression === 'zstd' ? await written!.then(() => undefined, (z: unknown) => z) : undefined;
      throw writeFailure(dest, zstdFailure ?? e);
    } finally {
      closeSync(fd);
    }
    killPoint('image: committing');
    beforePlacing?.(tmp);
    try {
      linkSync(tmp, dest);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new AppshotError(`${dest} already exists`, ExitCode.conflict);
      throw e;
    }
    try {
      killPoint('image: placed');
      syncDir(parent);
    } catch (e) {
      // Linked, but the commit failed: the link goes too (see commitImageDir).
      rmSync(dest, { force: true });
      try {
        syncDir(parent);
      } catch {
        /* best effort */
      }
      throw e;
    }
  } finally {
    rmSync(partial.path, { recursive: true, force: true });
    partial.done();
  }
}

export interface LoadedImage {
  /** The directory holding the parts (a temporary one for a tar). */
  dir: string;
  manifest: Manifest;
  image: Image;
  /** Who signed the manifest, and whether this node trusts that key. */
  signer: Signer;
  /** Each part's size, CRC-32C and SHA-256 as read now (the page file's
   * SHA-256 is empty when only its size was checked). */
  digests: Map<string, PartDigest>;
  /** Removes a temporary extraction; a no-op for a directory image. */
  dispose(): void;
  /** Each part's identity as the kernel tells it (device, inode, size,
   * mtime, ctime) of the very file that was read: see unchangedOnDisk. */
  identity: string;
  /** LoadOptions.holdPages: the page file that was checked, still open
   * (until dispose), for a restore to read instead of opening the path
   * again: what it reads is then the very file that was verified. */
  pagesFd?: number;
  /** LoadOptions.deferPagesCheck: the page file's check, still going on
   * (stopped by dispose), and its chunk size. */
  pagesCheck?: { check: PagesCheck; chunkSize: number };
  /** Its page file's chunks were not checked: this state directory wrote
   * it and it is unchanged since (LoadOptions.trustWritten, written.ts). */
  pagesAsWritten?: boolean;
}

const fileIdentity = (st: BigIntStats) => `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;

/** Whether every part of `loaded` is still the very file that was read
 * (device, inode, size, mtime, ctime: any write, truncate, chmod or
 * replacement moves one), and its held page file that same file: the
 * part of unchangedOnDisk that is only stat calls (~20 µs a link), for a
 * caller that makes the other checks apart (serve's prepared resume). */
export function sameFilesOnDisk(loaded: LoadedImage): boolean {
  try {
    const now = loaded.manifest.parts.map((part) => fileIdentity(lstatSync(join(loaded.dir, part.name), { bigint: true }))).join(' ');
    if (now !== loaded.identity) return false;
    // The page file held open is that same file, unchanged (the path may
    // name another by now: checked above, and the restore reads this one).
    if (loaded.pagesFd !== undefined) {
      const at = loaded.manifest.parts.findIndex((part) => part.name === PARTS.pages);
      if (fileIdentity(fstatSync(loaded.pagesFd, { bigint: true })) !== loaded.identity.split(' ')[at]) return false;
    }
    return true;
  } catch {
    return false;
  }
}

/** The identity of an image directory and of its parts on disk (device,
 * inode, size, mtime, ctime each; "-" for one missing), without reading
 * them: whether the image at `path` may read otherwise now than when this
 * was taken (written, replaced, chmod-ed). */
export function imageIdentityOnDisk(path: string): string {
  return [path, ...Object.values(PARTS).map((p) => join(path, p))]
    .map((f) => {
      try {
        return fileIdentity(lstatSync(f, { bigint: true }));
      } catch {
        return '-';
      }
    })
    .join(' ');
}

/** Whether every part of a loaded image is still the file that was read
 * and checked: any write, truncate, chmod, rename over or replacement
 * moves one of device, inode, size, mtime or ctime. A caller that keeps a
 * loaded image to restore it later (serve, while its service is
 * suspended) asks this first, and loads the image again if not. */
export function unchangedOnDisk(loaded: LoadedImage): boolean {
  try {
    if (!sameFilesOnDisk(loaded)) return false;
    // What else loading checked, and time may have changed: who may write
    // the directory and its parts, and whether the signer is still
    // trusted (a key removed meanwhile). Cheap; on any doubt, the caller
    // loads the image again, with every check.
    checkOnlyOwnerCanChange(loaded.dir);
    const signer = checkSignature(MANIFEST_DOMAIN, signedContent(ManifestType, loaded.manifest), loaded.manifest.signature, loaded.manifest.keyId);
    return !!signer.trusted || imagesTrustedExplicitly();
  } catch {
    return false;
  }
}

/** Opens the page file of `loaded` again by its path (an image loaded
 * without holdPages: a template a clone maps), refusing it unless it is
 * still the very file that was checked (device, inode, size, mtime,
 * ctime): its path may name another by now (a directory on the way
 * renamed, a symbolic link changed), one nobody checked. */
export function openPagesAsLoaded(loaded: LoadedImage): number {
  const path = join(loaded.dir, PARTS.pages);
  const at = loaded.manifest.parts.findIndex((part) => part.name === PARTS.pages);
  const fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  try {
    if (fileIdentity(fstatSync(fd, { bigint: true })) !== loaded.identity.split(' ')[at])
      throw new AppshotError(`${path} changed since it was checked (replaced, or written to): open it again`);
    return fd;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

export interface PartDigest {
  size: number;
  crc: number;
  sha256: Buffer;
  /** The SHA-256 of each chunkSize bytes (format 3's page file). */
  chunkSize?: number;
  chunks?: Buffer;
}

/** How many bytes of the page file each digest of its chunk table covers
 * (pages.c's PAGES_CHUNK): a MiB, so that a restore's threads share the
 * work finely and an eager copy waits for little. Readers accept another
 * power of two within CHUNK_LIMITS. */
export const PAGES_CHUNK = 1 << 20;
const SHA256_BYTES = 32;
const CHUNK_LIMITS = { min: 64 * 1024, max: 64 * 1024 * 1024 };

/** The largest part appshot accepts, by part. The metadata is decoded in
 * memory, so it is bounded tightly (and its message counts again by
 * checkWireCounts); the page file is only ever read in pieces. */
export const PART_CEILING: Record<string, number> = {
  // Its own fields, and the page file's chunk table: 32 bytes a MiB.
  [PARTS.manifest]: 64 * 1024 + (2 ** 40 / PAGES_CHUNK) * SHA256_BYTES,
  [PARTS.image]: 256 * 1024 * 1024,
  [PARTS.pages]: 2 ** 40,
};
const KNOWN_PARTS = new Set<string>(Object.values(PARTS));

/** Every part but the manifest, which the manifest lists. */
const LISTED_PARTS = Object.values(PARTS).filter((p) => p !== PARTS.manifest);

/** Opens a part of an image: never through a symlink, never a FIFO or a
 * device (which would block, or never end), only a regular file within its
 * ceiling. Returns the descriptor and the size. */
function openPart(dir: string, name: string, ceiling = PART_CEILING[name]): { fd: number; size: number } {
  let fd: number;
  try {
    fd = openSync(join(dir, name), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new AppshotError(`corrupt image: ${name} is missing`);
    if (code === 'ELOOP') throw new AppshotError(`corrupt image: ${name} is a symbolic link`);
    throw new AppshotError(`cannot read ${name} of the image: ${code}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new AppshotError(`corrupt image: ${name} is not a regular file`);
    if (st.size > ceiling) throw new AppshotError(`corrupt image: ${name} is ${st.size} bytes, more than appshot accepts (${ceiling})`);
    return { fd, size: st.size };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

const CHUNK = PAGES_CHUNK;

/** CRC-32C and SHA-256 of a part given in pieces of any size; with a
 * `chunkSize`, the SHA-256 of each chunkSize bytes too (format 3's chunk
 * table), each told to `onChunk` as it ends. `whole: false` (only with a
 * chunkSize): the chunk digests alone, the CRC-32C 0 and the SHA-256
 * empty, as a format 3 manifest lists its page file: for a check that
 * compares nothing else, which would otherwise hash every byte twice. */
class PartDigester {
  private readonly hash: Hash | undefined;
  private readonly chunks: Buffer[] = [];
  private chunk = createHash('sha256');
  private inChunk = 0;
  private crc = 0;
  private size = 0;
  constructor(
    private readonly chunkSize = 0,
    private readonly onChunk?: (index: number, digest: Buffer) => void,
    whole = true,
  ) {
    this.hash = whole || !chunkSize ? createHash('sha256') : undefined;
  }
  add(piece: Buffer): void {
    if (this.hash) {
      this.crc = addon().crc32c(piece, this.crc);
      this.hash.update(piece);
    }
    this.size += piece.length;
    if (!this.chunkSize) return;
    for (let at = 0; at < piece.length; ) {
      const n = Math.min(piece.length - at, this.chunkSize - this.inChunk);
      this.chunk.update(piece.subarray(at, at + n));
      this.inChunk += n;
      at += n;
      if (this.inChunk === this.chunkSize) this.endChunk();
    }
  }
  private endChunk(): void {
    const digest = this.chunk.digest();
    this.onChunk?.(this.chunks.length, digest);
    this.chunks.push(digest);
    this.chunk = createHash('sha256');
    this.inChunk = 0;
  }
  result(): PartDigest {
    if (this.inChunk) this.endChunk();
    const d: PartDigest = { size: this.size, crc: this.crc, sha256: this.hash ? this.hash.digest() : Buffer.alloc(0) };
    if (this.chunkSize) Object.assign(d, { chunkSize: this.chunkSize, chunks: Buffer.concat(this.chunks) });
    return d;
  }
}

/** A PartDigester fed from an open file's first `limit` bytes (a file that
 * grows while it is read is read no further), a chunk at a time; with
 * `chunked`, its chunk table of PAGES_CHUNK bytes too. */
class PartHasher {
  private readonly buf = Buffer.allocUnsafe(CHUNK);
  private readonly digester: PartDigester;
  private size = 0;
  constructor(
    private readonly fd: number,
    private readonly limit: number,
    private readonly onBytes?: (n: number) => void,
    chunked = false,
  ) {
    this.digester = new PartDigester(chunked ? PAGES_CHUNK : 0);
  }
  /** Reads and hashes the next piece; false once there is none. */
  step(): boolean {
    if (this.size >= this.limit) return false;
    // A whole chunk per piece: a short read is read on.
    let n = 0;
    const want = Math.min(CHUNK, this.limit - this.size);
    while (n < want) {
      const got = readSync(this.fd, this.buf, n, want - n, this.size + n);
      if (got === 0) break;
      n += got;
    }
    if (n === 0) return false;
    this.digester.add(this.buf.subarray(0, n));
    this.size += n;
    this.onBytes?.(n);
    return n === want;
  }
  result(): PartDigest {
    return this.digester.result();
  }
}

/** Why a part's whole-file digests `d` (formats 1 and 2) are not those
 * its manifest lists, in words after "corrupt image: ", or undefined: its
 * CRC-32C, and its SHA-256 where a trusted key signed the manifest.
 * `where`: " in STREAM" for a part checked as it was unpacked. */
function wholeDigestFault(part: Manifest['parts'][number], d: PartDigest, trusted: boolean, where = ''): string | undefined {
  if (d.crc !== part.crc32c) return `checksum of ${part.name}${where} does not match`;
  if (trusted && (part.sha256.length !== 32 || !d.sha256.equals(part.sha256))) return `SHA-256 of ${part.name}${where} does not match its signed manifest`;
  return undefined;
}

/** A part's digests as a manifest gives them, its chunk table included
 * (which only the page file's entry uses). */
export function digestFd(fd: number, limit = Number.MAX_SAFE_INTEGER, onBytes?: (n: number) => void): PartDigest {
  const hasher = new PartHasher(fd, limit, onBytes, true);
  while (hasher.step());
  return hasher.result();
}

/** Waits for a page file's check (native threads, PagesCheck), the event
 * loop turning every few milliseconds so that Ctrl-C is heard (once
 * `signal` is aborted, it gives up with the signal's reason) and progress
 * told; a chunk that fails is refused in one line. */
export async function awaitPagesCheck(check: PagesCheck, chunkSize: number, onBytes?: (n: number) => void, signal?: AbortSignal): Promise<void> {
  // The most bytes told so far: the count checked() gives falls when
  // the lanes are found wrong and their chunks are checked again, and
  // those bytes are not told twice (progress never passes the total).
  let told = 0;
  for (;;) {
    const verdict = check.wait(20);
    const done = check.checked();
    if (done > told) {
      onBytes?.(done - told);
      told = done;
    }
    if (verdict.state === 'good') return;
    if (verdict.state === 'bad') throw pagesCheckFailure(verdict.chunk, chunkSize, verdict.errno);
    await new Promise((resolve) => setImmediate(resolve));
    signal?.throwIfAborted();
  }
}

/** Blocks until the chunks of `range` of a page file whose check is still
 * going on (LoadedImage.pagesCheck) are checked: for what a restore reads
 * of the file itself (SysV segments, deleted files). */
export function waitPagesChecked(pagesCheck: { check: PagesCheck; chunkSize: number } | undefined, offset: number, length: number): void {
  if (!pagesCheck || length <= 0) return;
  const verdict = pagesCheck.check.wait(-1, offset, length);
  if (verdict.state === 'bad') throw pagesCheckFailure(verdict.chunk, pagesCheck.chunkSize, verdict.errno);
}

/** The one line that refuses a page file whose chunk `chunk` failed its
 * check: its bytes differ (errno 0), or it could not be read. */
export function pagesCheckFailure(chunk: number, chunkSize: number, errno: number): AppshotError {
  const from = chunk * chunkSize;
  const where = `chunk ${chunk}, bytes ${from}-${from + chunkSize - 1}`;
  if (!errno) return new AppshotError(`corrupt image: checksum of ${PARTS.pages} does not match its manifest (${where})`);
  const name = errnoName(errno);
  return new AppshotError(`corrupt image: ${PARTS.pages} cannot be read (${where}: ${name})`);
}

/** A format 3 manifest's chunk table for `part`: for pages.img, a chunk
 * size within bounds and exactly one digest per chunk of its size; none
 * for any other part. Checked before anything is read by it. */
function checkChunkTable(part: Manifest['parts'][number], formatVersion: number): void {
  const table = part.chunkSha256 ?? Buffer.alloc(0);
  const chunkSize = part.chunkSize ?? 0;
  if (formatVersion < CHUNKED_FORMAT) return; // not read: such a reader never had it
  if (part.name !== PARTS.pages) {
    if (chunkSize || table.length) throw new AppshotError(`corrupt image: its manifest gives ${part.name} a chunk table, which only ${PARTS.pages} has`);
    return;
  }
  if (chunkSize < CHUNK_LIMITS.min || chunkSize > CHUNK_LIMITS.max || (chunkSize & (chunkSize - 1)) !== 0)
    throw new AppshotError(`corrupt image: its manifest checks ${PARTS.pages} by chunks of ${chunkSize} bytes (appshot reads powers of two from ${CHUNK_LIMITS.min} to ${CHUNK_LIMITS.max})`);
  const chunks = (part.size + BigInt(chunkSize) - 1n) / BigInt(chunkSize);
  if (BigInt(table.length) !== chunks * BigInt(SHA256_BYTES))
    throw new AppshotError(`corrupt image: its manifest has ${table.length} bytes of chunk digests for ${PARTS.pages}; ${part.size} bytes in chunks of ${chunkSize} need ${chunks * BigInt(SHA256_BYTES)}`);
}

/** CRC-32C and SHA-256 of a whole part (formats 1 and 2), no chunk table. */
function wholeDigest(fd: number, limit: number, onBytes?: (n: number) => void): PartDigest {
  const hasher = new PartHasher(fd, limit, onBytes);
  while (hasher.step());
  return hasher.result();
}

/** Pieces hashed between two turns of the event loop (64 MiB). */
const PIECES_PER_TURN = 64;

/** digestFd, letting the event loop turn every 64 MiB so that Ctrl-C is
 * heard while a large page file is checked (seconds per GiB): once
 * `signal` is aborted, it gives up with the signal's reason. */
async function digestFdInterruptibly(fd: number, limit: number, onBytes: ((n: number) => void) | undefined, signal: AbortSignal): Promise<PartDigest> {
  const hasher = new PartHasher(fd, limit, onBytes);
  for (let pieces = 1; hasher.step(); pieces++) {
    if (pieces % PIECES_PER_TURN) continue;
    await new Promise((resolve) => setImmediate(resolve));
    signal.throwIfAborted();
  }
  return hasher.result();
}

export function digestBuffer(data: Buffer): PartDigest {
  return { size: data.length, crc: addon().crc32c(data), sha256: createHash('sha256').update(data).digest() };
}

function readWhole(fd: number, size: number): Buffer {
  const buf = Buffer.alloc(size);
  let at = 0;
  while (at < size) {
    const n = readSync(fd, buf, at, size - at, at);
    if (n === 0) break;
    at += n;
  }
  return buf.subarray(0, at);
}

/** A small file beside an image's parts (template.pb), read as a part is. */
export function readSmallPart(dir: string, name: string, ceiling: number): Buffer {
  const { fd, size } = openPart(dir, name, ceiling);
  try {
    return readWhole(fd, size);
  } finally {
    closeSync(fd);
  }
}

/** Encodes a manifest or template with its signature left out: what is
 * signed. Decoded and encoded again, so that what is checked is what
 * appshot will act on, whatever bytes carried it. */
function signedContent(type: MessageSchema, value: { signature: Buffer; keyId: string }): Buffer {
  return encode(type, { ...value, signature: Buffer.alloc(0) });
}

const MANIFEST_DOMAIN = 'appshot manifest v1';
const TEMPLATE_DOMAIN = 'appshot template v1';

/** A manifest as it is (signed or not), encoded. */
export const encodeManifest = (manifest: Manifest) => encode(ManifestType, manifest);

/** A manifest signed with this node's key, encoded. */
export function encodeSignedManifestOf(manifest: Manifest): Buffer {
  const { signature, keyId } = signWithSelf(MANIFEST_DOMAIN, (keyId) => signedContent(ManifestType, { ...manifest, keyId }));
  return encode(ManifestType, { ...manifest, signature, keyId });
}

/** The manifest of an image whose parts are as given, signed with this
 * node's key, encoded: format 3, 4, 5 or 6 (chunkedFormatOf), the page file
 * vouched for by its chunk table, if its digest has one; else format 2, by
 * its whole SHA-256. */
export function encodeSignedManifest(imageId: string, digests: Map<string, PartDigest>, image?: Image): Buffer {
  const chunked = digests.get(PARTS.pages)?.chunks !== undefined;
  return encodeSignedManifestOf({
    magic: MAGIC,
    // Not knowing what the image holds (its bytes written as they are):
    // the newest format, which no older appshot reads wrong.
    formatVersion: chunked ? (image ? chunkedFormatOf(image) : FORMAT_VERSION) : 2,
    imageId,
    parts: LISTED_PARTS.map((name) => {
      const d = digests.get(name)!;
      if (chunked && name === PARTS.pages)
        return { name, size: BigInt(d.size), crc32c: 0, sha256: Buffer.alloc(0), chunkSize: d.chunkSize!, chunkSha256: d.chunks! };
      return { name, size: BigInt(d.size), crc32c: d.crc, sha256: d.sha256, chunkSize: 0, chunkSha256: Buffer.alloc(0) };
    }),
    signature: Buffer.alloc(0),
    keyId: '',
  });
}

export function signTemplate(t: Template): Template {
  return { ...t, ...signWithSelf(TEMPLATE_DOMAIN, (keyId) => signedContent(TemplateType, { ...t, keyId })) };
}

export const templateSigner = (t: Template): Signer => checkSignature(TEMPLATE_DOMAIN, signedContent(TemplateType, t), t.signature, t.keyId);

// --- temporary extractions ---------------------------------------------------

/** Runs `body` with a directory of its own to unpack into, removed if it
 * fails, and also if the process gets SIGINT or SIGTERM meanwhile (which
 * then exits 130 or 143, as a shell would report it). */
async function withExtractionDir(body: (dir: string) => Promise<void>): Promise<string> {
  // Removed by the next command if we are killed (see partial.ts).
  const dir = ownedName('image');
  mkdirSync(dir, { mode: 0o700 });
  const onSignal = (sig: NodeJS.Signals) => {
    rmSync(dir, { recursive: true, force: true });
    process.stderr.write(`appshot: interrupted while reading the image\n`);
    process.exit(128 + osConstants.signals[sig]);
  };
  // Not in the engine: there a request is never ended midway, and the
  // catch below removes the directory if the body fails.
  const uninstall = onInterrupt('exit', onSignal);
  try {
    await body(dir);
    return dir;
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  } finally {
    uninstall();
  }
}

/** Unpacks an image's tar stream: regular files named as known parts, each
 * once, within its ceiling and the free space; anything else ends it. The
 * manifest comes first (appshot writes it so) and is checked, its signer
 * included, before another byte is written: each part after it must be
 * the size it lists, so a stream no trusted key signed, or one whose
 * small compressed bytes expand to terabytes, fills no disk (fuzz34 F1).
 * Reading ends once every part is in: zero blocks or anything else after
 * them, or a writer that keeps the stream open, is not waited for; and no
 * more than HEADER_SLACK bytes may pass between two parts (a stream of
 * zeros, which the parser would skip for ever: fuzz34 F2). */
async function extractTar(input: NodeJS.ReadableStream, what: string, trust: LoadOptions['trust']): Promise<Extracted> {
  try {
    return await extractTarInto(input, what, trust);
  } catch (e) {
    // Not read to its end: a decompressor behind it is stopped, not left
    // blocked on a full pipe that keeps this process alive (its extraction
    // directory could not be made, say).
    (input as NodeJS.ReadableStream & { destroy?(): void }).destroy?.();
    // A system call's failure (a file system full, out of inodes, over
    // quota, as the directory is made or a part written; a read error)
    // says nothing of the image: said as what it is, not as a corrupt
    // stream (fuzz34 F6).
    if (!(e instanceof AppshotError) && isSystemCallError(e)) {
      if (e.code === 'ENOSPC' || e.code === 'EDQUOT') throw new AppshotError(`no room to unpack ${what} in ${temporariesDir()}: ${errorText(e)}`);
      throw new AppshotError(`cannot unpack ${what}: ${errorText(e)}`);
    }
    throw e;
  }
}

/** Where a tar stream was unpacked; `pagesStreamed`: its page file was
 * checked as it went by and is there only as a hole of its size
 * (StreamedPagesCheck). */
interface Extracted {
  dir: string;
  pagesStreamed: boolean;
}

async function extractTarInto(input: NodeJS.ReadableStream, what: string, trust: LoadOptions['trust']): Promise<Extracted> {
  let pagesStreamed = false;
  const dir = await withExtractionDir(async (dir) => {
    const extract = (await loadTar()).extract();
    // Bytes read, and where the last part ended (or the stream began).
    let read = 0;
    let between = 0;
    let inPart = false;
    const counted = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        read += chunk.length;
        if (!inPart && read - between > HEADER_SLACK)
          done(new AppshotError(`corrupt image: ${what} holds more than ${HEADER_SLACK} bytes between its parts, which no image has (a stream of zeros?)`));
        else done(null, chunk);
      },
    });
    // Errors of the input and of the parser end the loop below.
    const feeding = pipeline(input, counted, extract).catch((e: Error) => e);
    const seen = new Set<string>();
    let listed: Map<string, number> | undefined;
    let checked: ReturnType<typeof checkManifest> | undefined;
    let failure: Error | undefined;
    try {
      for await (const entry of extract) {
        inPart = true;
        const { name, type, size = 0 } = entry.header;
        if (!KNOWN_PARTS.has(name)) throw new AppshotError(`not an appshot image: ${what} holds '${name}', which is not a part of an image`);
        if (type !== 'file') throw new AppshotError(`corrupt image: ${what} holds ${name} as a ${type}, not a regular file`);
        if (seen.has(name)) throw new AppshotError(`corrupt image: ${what} holds ${name} twice`);
        if (!listed && name !== PARTS.manifest) throw new AppshotError(`corrupt image: ${what} does not begin with its manifest (${PARTS.manifest}), as appshot writes it`);
        seen.add(name);
        if (size > PART_CEILING[name]) throw new AppshotError(`corrupt image: ${name} in ${what} is ${size} bytes, more than appshot accepts (${PART_CEILING[name]})`);
        if (listed && listed.get(name) !== size) throw new AppshotError(`corrupt image: ${name} in ${what} is ${size} bytes; its manifest says ${listed.get(name)}`);
        // Only looked at (inspect): the page file is checked as it goes
        // by, not written, so that a few KiB of compressed zeros claiming
        // gigabytes cost no disk (review 242), nor a large image's inspect
        // its size in temporary space. A hole of its size stands for it.
        const streamed = trust === 'report' && name === PARTS.pages && checked ? new StreamedPagesCheck(checked, what) : undefined;
        const fs = statfsSync(dir);
        if (!streamed && size > fs.bavail * fs.bsize) throw new AppshotError(`${name} in ${what} is ${size} bytes; ${dir} has room for ${fs.bavail * fs.bsize}`);
        const fd = openSync(join(dir, name), fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
        const kept: Buffer[] = [];
        try {
          for await (const chunk of entry) {
            if (streamed) streamed.update(chunk as Buffer);
            else writeSync(fd, chunk as Buffer);
            if (!listed) kept.push(chunk as Buffer);
          }
          if (streamed) {
            streamed.finish();
            ftruncateSync(fd, size);
            pagesStreamed = true;
          }
        } finally {
          closeSync(fd);
        }
        if (!listed) {
          checked = checkManifest(Buffer.concat(kept), what, trust);
          listed = new Map(checked.manifest.parts.map((p) => [p.name, Number(p.size)]));
        }
        inPart = false;
        between = read;
        if (LISTED_PARTS.every((p) => seen.has(p))) break;
      }
    } catch (e) {
      failure = e as Error;
    }
    // Every part is in, or it failed: nothing after is read.
    extract.destroy();
    counted.destroy();
    const fed = await feeding;
    if (failure instanceof AppshotError) throw failure;
    // The count's refusal, which the parser saw as its input's end.
    if (fed instanceof AppshotError) throw fed;
    // A system call's: extractTar says what it is.
    if (isSystemCallError(failure)) throw failure;
    if (failure) throw new AppshotError(`corrupt image: ${what} is not a complete tar stream (${failure.message})`);
    if (!LISTED_PARTS.every((p) => seen.has(p))) throw new AppshotError(`corrupt image: ${what} is not a complete tar stream${fed ? ` (${fed.message})` : ''}`);
  });
  return { dir, pagesStreamed };
}

/**
 * A page file checked as its tar stream goes by, against its manifest, as
 * loadImage checks one on disk: by its chunk table (format 3: each chunk
 * as it ends), else by its whole-file digests (wholeDigestFault).
 */
class StreamedPagesCheck {
  private readonly part: Manifest['parts'][number];
  private readonly digester: PartDigester;
  constructor(
    private readonly checked: ReturnType<typeof checkManifest>,
    private readonly what: string,
  ) {
    const part = checked.manifest.parts.find((p) => p.name === PARTS.pages)!;
    this.part = part;
    const chunkSize = checked.manifest.formatVersion >= CHUNKED_FORMAT ? (part.chunkSize ?? 0) : 0;
    // By its chunk table, the chunks alone are hashed (finish compares
    // nothing else): one SHA-256 per byte, not that and a whole-file one.
    this.digester = new PartDigester(
      chunkSize,
      (i, digest) => {
        if (!digest.equals(part.chunkSha256.subarray(i * SHA256_BYTES, (i + 1) * SHA256_BYTES))) throw pagesCheckFailure(i, chunkSize, 0);
      },
      !chunkSize,
    );
  }
  update(data: Buffer): void {
    this.digester.add(data);
  }
  finish(): void {
    const d = this.digester.result();
    if (d.chunkSize) return; // each chunk checked as it ended
    const fault = wholeDigestFault(this.part, d, !!this.checked.signer.trusted, ` in ${this.what}`);
    if (fault) throw new AppshotError(`corrupt image: ${fault}`);
  }
}

/** Why an image file could not be opened, in words. */
function openFailure(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'EACCES') return 'permission denied';
  if (code === 'ELOOP') return 'it is a symbolic link';
  if (code === 'ENOENT') return 'it is gone';
  return code ?? String(e);
}

/**
 * A tar file's stream, uncompressed if it is gzip or zstd (told by its
 * magic number, whatever its name). The file is opened once and read
 * through that descriptor, never blocking: what was a file when its
 * directory was read may be a FIFO by now, whose open would wait for a
 * writer forever. It must be a regular file; `follow: false` (a listing,
 * which looked at the entry itself) does not go through a symbolic link.
 * An open that fails is an AppshotError: one unreadable file is a line,
 * not a crash.
 */
function openImageFile(path: string, { follow = true } = {}): NodeJS.ReadableStream {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK | (follow ? 0 : fsc.O_NOFOLLOW));
  } catch (e) {
    throw new AppshotError(`cannot read ${path}: ${openFailure(e)}`);
  }
  let ours = true; // until the read stream takes it
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new AppshotError(`not an appshot image: ${path} is ${st.isFIFO() ? 'a FIFO' : st.isSocket() ? 'a socket' : 'a device'}, not a regular file`);
    const head = Buffer.alloc(4);
    const n = readSync(fd, head, 0, 4, 0);
    // zstd reads from its own copy of the descriptor, at offset 0 (the
    // read above does not move it).
    if (n >= 4 && head.readUInt32LE(0) === 0xfd2fb528) return zstdDecompressFrom(fd, path);
    const file = createReadStream(path, { fd, start: 0 });
    ours = false;
    if (!(n >= 2 && head[0] === 0x1f && head[1] === 0x8b)) return file;
    // Errors of either stream end the last one, which extractTar reports.
    return pipelineCallback(file, createGunzip(), () => {});
  } finally {
    if (ours) closeSync(fd);
  }
}

/** A stream uncompressed if it is gzip or zstd, told by its magic number
 * as openImageFile tells a file's (fuzz34 F6: `appshot restore - <
 * x.tar.gz` was read as a tar and refused as corrupt): its first bytes
 * are read, then given back in front of the rest. */
async function decompressedStream(input: NodeJS.ReadableStream, what: string): Promise<NodeJS.ReadableStream> {
  const readable = input as Readable;
  const head: Buffer[] = [];
  let have = 0;
  try {
    while (have < 4) {
      const chunk = readable.read() as Buffer | null;
      if (chunk) {
        head.push(chunk);
        have += chunk.length;
        continue;
      }
      if (readable.readableEnded) break;
      const more = await new Promise<boolean>((resolve, reject) => {
        const settle = (how: () => void) => {
          readable.off('readable', onReadable).off('end', onEnd).off('error', onError);
          how();
        };
        const onReadable = () => settle(() => resolve(true));
        const onEnd = () => settle(() => resolve(false));
        const onError = (e: Error) => settle(() => reject(e));
        readable.on('readable', onReadable).on('end', onEnd).on('error', onError);
      });
      if (!more) break;
    }
  } catch (e) {
    throw new AppshotError(`cannot read ${what}: ${errorText(e)}`);
  }
  const start = Buffer.concat(head);
  // Given back: the reader (the tar parser, or a decompressor) reads the
  // stream from its first byte, and destroys it once it has what it needs.
  if (start.length) readable.unshift(start);
  if (start.length >= 4 && start.readUInt32LE(0) === 0xfd2fb528) return zstdDecompressFrom(readable, what);
  if (start.length >= 2 && start[0] === 0x1f && start[1] === 0x8b) return pipelineCallback(readable, createGunzip(), () => {});
  return readable;
}

/** Where an image's parent is: a relative path is inside the image (a
 * pre-copy image's base), and stays inside it. */
export function parentPath(imageDir: string, path: string): string {
  // A snapshot names the previous image by its absolute path, or a
  // pre-copy's base inside it as 'base': never itself ('.', '', 'x/..'),
  // which would have a restore follow the image as its own parent for
  // ever (r344 #6).
  const parts = path.split('/').filter((c, i) => !(c === '' && i > 0));
  if (!path || parts.some((c) => c === '.' || c === '..')) throw new AppshotError(`corrupt image: its parent ${JSON.stringify(path)} is not a plain path to another image`);
  if (isAbsolute(path)) return path;
  return join(imageDir, path);
}

/** The most images a chain of incremental parents may hold, the image
 * itself included. Each link read holds its page file open and its
 * metadata decoded until the restore ends; serve makes a full image every
 * 4 links (server.ts MAX_CHAIN) and a snapshot every 64 (snapshot
 * driver's parentChain), so only a crafted chain is longer: refused in
 * one line before more is held, not followed until descriptors or memory
 * run out. 64 page files stay well under any descriptor limit a restore
 * runs with (1024 at least). */
export const MAX_PARENT_CHAIN = 64;

/** Where a chain of parents goes wrong, as one line, or undefined:
 * `seen` holds each image directory read (device:inode) and image id, so
 * that one met again (a loop through symlinks or paths that differ) is
 * caught at once; `length`: the images read so far. */
export function parentChainFault(seen: Set<string>, dir: string, imageId: string, length: number): string | undefined {
  let key: string;
  try {
    const st = statSync(dir, { bigint: true });
    key = `${st.dev}:${st.ino}`;
  } catch {
    return undefined; // unreadable: loading it says why
  }
  if (seen.has(key) || seen.has(`id:${imageId}`)) return `corrupt image: its chain of parents comes back to ${dir} (image ${imageId}), an image already in it`;
  if (length >= MAX_PARENT_CHAIN) return `the image's chain of incremental parents is longer than ${MAX_PARENT_CHAIN} images, more than appshot follows`;
  seen.add(key);
  seen.add(`id:${imageId}`);
  return undefined;
}

/** An image that will run must stay as it was verified until the restore
 * has read it: the restore driver opens pages.img again by name, and a
 * --lazy restore or a clone maps it for as long as it runs (a clone checks
 * only its size). So its directory and parts may be changed by no one but
 * this user and root. */
function checkOnlyOwnerCanChange(dir: string): void {
  for (const path of [dir, ...Object.values(PARTS).map((p) => join(dir, p))]) {
    let st;
    try {
      st = lstatSync(path);
    } catch {
      continue; // a missing part is reported as such below
    }
    checkOwner(st, path);
  }
}

/** `st` (of `path`) belongs to this user or root, and no one else may
 * write it. */
function checkOwner(st: { uid: number; mode: number; isSymbolicLink(): boolean }, path: string): void {
  const uid = process.geteuid?.() ?? 0;
  if (st.uid !== uid && st.uid !== 0)
    throw new AppshotError(`${path} belongs to uid ${st.uid}, who could change it while it runs: copy the image to a directory of your own`);
  if (st.mode & 0o022 && !st.isSymbolicLink())
    throw new AppshotError(`${path} is writable by others, who could change it while it runs: chmod go-w ${path}`);
}

export interface LoadOptions {
  /** Check the page file's size, not its checksum (a template, verified
   * whole when it was made, is opened for every clone). */
  sizeOnly?: boolean;
  /** 'require' (the default): only an image signed by a trusted key, or
   * one the user trusts explicitly (--trust-image), is returned.
   * 'report': any well-formed image, with its signer (inspect). */
  trust?: 'require' | 'report';
  /** Read as the parent of another image, for its memory only. */
  asParent?: boolean;
  /** A directory only (the listing, `appshot images`): a file or anything
   * else at `path` is refused, never extracted as a tar stream, so that an
   * entry swapped for a link to a large tar after it was looked at costs
   * nothing (a stream file is read by readImageFileHeader, with ceilings). */
  directoryOnly?: boolean;
  /** Told of the page data's size once known, then of each piece of it
   * checked (a progress display: checking a large image takes seconds). */
  onPagesSize?: (size: number) => void;
  onBytes?: (n: number) => void;
  /** Aborted (Ctrl-C): checking the page data is given up, and loadImage
   * fails with the signal's reason. */
  signal?: AbortSignal;
  /** Keep the page file open once checked (LoadedImage.pagesFd): an image
   * kept for a later restore (serve's preload). */
  holdPages?: boolean;
  /** A format 3 page file's check is started, not waited for
   * (LoadedImage.pagesCheck): a restore overlaps it with its own work,
   * copies each chunk only once it is checked, and waits for all of it
   * before the application runs. */
  deferPagesCheck?: boolean;
  /** A format 3 page file this state directory wrote, unchanged since
   * (written.ts), is not checked again (a restore, unless --verify). */
  trustWritten?: boolean;
}

/** Decodes and checks an image's manifest: its magic, format and parts,
 * then who signed it, before anything else of the image is read (a
 * manifest no trusted key signed is refused unless `trust` is 'report'). */
function checkManifest(manifestBytes: Buffer, path: string, trust: LoadOptions['trust']): { manifest: Manifest; signer: Signer } {
  const manifest = decode<Manifest>(ManifestType, manifestBytes, PARTS.manifest);
  if (manifest.magic !== MAGIC) throw new AppshotError(`not an appshot image: ${path}`);
  if (!READABLE_FORMATS.includes(manifest.formatVersion))
    throw new AppshotError(`image format ${manifest.formatVersion} is not supported (this appshot reads formats ${READABLE_FORMATS.join(', ')})`);
  const listed = manifest.parts.map((p) => p.name);
  for (const name of listed)
    if (!LISTED_PARTS.includes(name as (typeof LISTED_PARTS)[number]))
      throw new AppshotError(`corrupt image: its manifest lists '${name}', which is not a part of an image`);
  for (const name of LISTED_PARTS) {
    const n = listed.filter((l) => l === name).length;
    if (n !== 1) throw new AppshotError(`corrupt image: its manifest lists ${name} ${n === 0 ? 'not at all' : `${n} times`}`);
  }
  for (const part of manifest.parts) checkChunkTable(part, manifest.formatVersion);
  const signer = checkSignature(MANIFEST_DOMAIN, signedContent(ManifestType, manifest), manifest.signature, manifest.keyId);
  if (!signer.trusted && trust !== 'report' && !imagesTrustedExplicitly())
    throw new AppshotError(`${path} is not an image this node trusts: ${signer.problem}; ${untrustedHint}`);
  return { manifest, signer };
}

const TAR_BLOCK = 512;
/** What a tar stream written by appshot holds before the end of its
 * image.pb besides the manifest's and image.pb's bytes: their headers and
 * padding (a KiB or two), and what the pipe from the decompressor and the
 * parser's own buffer hold ahead of the parser (tens of KiB). */
const HEADER_SLACK = 1 << 20;

/** The largest image.pb `appshot images` reads from a stream file:
 * metadata of thousands of processes is a few MiB; a larger one is
 * listed as too large rather than read into memory. */
const LISTED_METADATA_LIMIT = 32 * 1024 * 1024;

/** What an image file's header says: its manifest, who signed it, and
 * its metadata. */
export interface ImageFileHeader {
  manifest: Manifest;
  signer: Signer;
  image: Image;
}

/**
 * The header of an image file (.tar, .tar.gz, .tar.zst: `appshot images`),
 * checked as loadImage checks it but for the page data, which is neither
 * read nor uncompressed: appshot writes the manifest and the metadata
 * first (streamImageTar), so only the start of the stream is. Undefined
 * for a tar whose parts come in another order (rewritten by another
 * tool): its metadata might lie behind all of its page data.
 */
export async function readImageFileHeader(path: string): Promise<ImageFileHeader | undefined> {
  const extract = (await loadTar()).extract();
  const input = openImageFile(path, { follow: false });
  const wanted = [PARTS.manifest, PARTS.image];
  const parts: Buffer[] = [];
  let checked: { manifest: Manifest; signer: Signer } | undefined;
  // The parser passes over zero blocks and pax headers without end, and
  // a few KiB of zstd make gigabytes of them: what is fed to it is
  // counted, and the stream ends once it is more than the entries seen so
  // far plus HEADER_SLACK, which a file appshot wrote never is.
  let allowed = HEADER_SLACK;
  let fed = 0;
  const metered = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      fed += chunk.length;
      if (fed <= allowed) done(null, chunk);
      else done(new AppshotError(`corrupt image: ${path} does not start with its ${wanted[parts.length]}: ${fed} bytes of its tar stream read without it`));
    },
  });
  // Ended by the loop below once it has the two parts: that end of the
  // input is no failure.
  const feeding = pipeline(input, metered, extract).catch((e: Error) => e);
  let outOfOrder = false;
  try {
    for await (const entry of extract) {
      const { name, type, size = 0 } = entry.header;
      if (!KNOWN_PARTS.has(name)) throw new AppshotError(`not an appshot image: ${path} holds '${name}', which is not a part of an image`);
      if (name !== wanted[parts.length]) {
        outOfOrder = true;
        break;
      }
      if (type !== 'file') throw new AppshotError(`corrupt image: ${path} holds ${name} as a ${type}, not a regular file`);
      if (size > PART_CEILING[name]) throw new AppshotError(`corrupt image: ${name} in ${path} is ${size} bytes, more than appshot accepts (${PART_CEILING[name]})`);
      // The size a tar header claims is only a claim (fuzz34 F4: up to
      // image.pb's 256 MiB ceiling was allocated for a file of a few
      // KiB): image.pb must be the size its manifest, decoded already,
      // lists, and no more than a listing reads; the bytes are gathered
      // as they come, so memory follows what the stream really holds.
      if (checked) {
        const listedSize = checked.manifest.parts.find((p) => p.name === name)!.size;
        if (BigInt(size) !== listedSize) throw new AppshotError(`corrupt image: ${name} in ${path} is ${size} bytes; its manifest says ${listedSize}`);
        if (size > LISTED_METADATA_LIMIT) throw new AppshotError(`${path}: its ${name} is ${size} bytes, more than a listing reads (${LISTED_METADATA_LIMIT}); appshot inspect reads it`);
      }
      allowed += TAR_BLOCK + Math.ceil(size / TAR_BLOCK) * TAR_BLOCK;
      const pieces: Buffer[] = [];
      let at = 0;
      for await (const chunk of entry) {
        const c = chunk as Buffer;
        if (at + c.length > size) throw new AppshotError(`corrupt image: ${name} in ${path} is longer than its tar header says`);
        pieces.push(c);
        at += c.length;
      }
      if (at !== size) throw new AppshotError(`corrupt image: ${path} ends inside its ${name}`);
      parts.push(Buffer.concat(pieces, at));
      // Who signed it and what it lists, before another part is read.
      if (!checked) checked = checkManifest(parts[0], path, 'report');
      if (parts.length === wanted.length) break;
    }
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    throw new AppshotError(`corrupt image: ${path} is not a complete tar stream (${(e as Error).message})`);
  } finally {
    extract.destroy();
    await feeding;
  }
  if (outOfOrder) return undefined;
  if (parts.length < wanted.length) throw new AppshotError(`corrupt image: ${path} ends before its ${wanted[parts.length]}`);
  const imageBytes = parts[1];
  const { manifest, signer } = checked!;
  const listed = (name: string) => manifest.parts.find((p) => p.name === name)!;
  const imagePart = listed(PARTS.image);
  const d = digestBuffer(imageBytes);
  if (BigInt(d.size) !== imagePart.size) throw new AppshotError(`corrupt image: ${PARTS.image} is ${d.size} bytes, expected ${imagePart.size} (truncated?)`);
  if (d.crc !== imagePart.crc32c) throw new AppshotError(`corrupt image: checksum of ${PARTS.image} does not match`);
  if (signer.trusted && (imagePart.sha256.length !== 32 || !d.sha256.equals(imagePart.sha256)))
    throw new AppshotError(`corrupt image: SHA-256 of ${PARTS.image} does not match its signed manifest`);
  checkWireCounts(ImageType, imageBytes);
  const image = decode<Image>(ImageType, imageBytes, PARTS.image);
  validateImage(image, listed(PARTS.pages).size);
  return { manifest, signer, image };
}

/** Opens an image (directory, tar file or '-' for stdin) and verifies it
 * before returning it: the manifest lists every part with its size and
 * checksums and is signed by a trusted key, every part matches, and the
 * metadata is well formed (validate.ts). */
export async function loadImage(path: string, opts: LoadOptions = {}): Promise<LoadedImage> {
  removeStaleTemporaries();
  let dir = path;
  let temporary = false;
  // Checked as it was unpacked (inspect of a tar stream): only its size
  // is looked at here.
  let pagesStreamed = false;
  if (path === '-') {
    ({ dir, pagesStreamed } = await extractTar(await decompressedStream(process.stdin, 'standard input'), 'standard input', opts.trust));
    temporary = true;
  } else {
    let st;
    try {
      st = statSync(path);
    } catch {
      throw new AppshotError(`no such image: ${path}`, ExitCode.notFound);
    }
    if (opts.directoryOnly && !st.isDirectory()) {
      throw new AppshotError(`not an appshot image: ${path} is not a directory`);
    } else if (st.isFile()) {
      ({ dir, pagesStreamed } = await extractTar(openImageFile(path), path, opts.trust));
      temporary = true;
    } else if (!st.isDirectory()) {
      throw new AppshotError(`not an appshot image: ${path} is neither a directory nor a tar file`);
    }
  }
  let pagesFd: number | undefined;
  let pagesCheck: PagesCheck | undefined;
  let pagesAsWritten = false;
  const dispose = () => {
    pagesCheck?.stop();
    pagesCheck = undefined;
    if (pagesFd !== undefined) closeSync(pagesFd);
    pagesFd = undefined;
    if (temporary) rmSync(dir, { recursive: true, force: true });
  };
  try {
    if (!existsSync(join(dir, PARTS.manifest))) throw new AppshotError(`not an appshot image: ${path} (no ${PARTS.manifest})`);
    const { manifest, signer } = checkManifest(readSmallPart(dir, PARTS.manifest, PART_CEILING[PARTS.manifest]), path, opts.trust);
    const chunked = manifest.formatVersion >= CHUNKED_FORMAT;

    const mustBeOwned = opts.trust !== 'report' && !temporary;
    if (mustBeOwned) checkOnlyOwnerCanChange(dir);
    killPoint('image: owners checked');
    const digests = new Map<string, PartDigest>();
    // image.pb is read once, into the buffer that is checked and decoded:
    // no one can change it between the two.
    let imageBytes: Buffer = Buffer.alloc(0);
    const identity: string[] = [];
    for (const part of manifest.parts) {
      const { fd, size } = openPart(dir, part.name);
      try {
        // The very file opened, which is the one checked and then read,
        // copied or mapped: the paths checked above may name another by
        // now (a directory on the way renamed, a symbolic link changed),
        // one that someone else could rewrite once its check is done.
        if (mustBeOwned) checkOwner(fstatSync(fd), join(dir, part.name));
        identity.push(fileIdentity(fstatSync(fd, { bigint: true })));
        if (BigInt(size) !== part.size) throw new AppshotError(`corrupt image: ${part.name} is ${size} bytes, expected ${part.size} (truncated?)`);
        const quick = (opts.sizeOnly || pagesStreamed) && part.name === PARTS.pages;
        const byChunks = chunked && part.name === PARTS.pages;
        let d: PartDigest;
        if (byChunks) {
          // Vouched for by its chunk table (checked against the file on a
          // thread per core), not by a CRC or a digest of the whole.
          d = { size, crc: part.crc32c, sha256: part.sha256, chunkSize: part.chunkSize, chunks: part.chunkSha256 };
          // Written by this state directory and unchanged since: checked
          // as it was written (written.ts), unless asked again.
          pagesAsWritten = !quick && !!opts.trustWritten && mustBeOwned && !!signer.trusted && isOwnKey(signer.trusted) && writtenHere(fd, manifest.imageId, part.chunkSha256);
          if (!quick && !pagesAsWritten) {
            killPoint('image: checking pages');
            pagesCheck = new (addon().PagesCheck)(fd, size, part.chunkSize, part.chunkSha256);
            if (!opts.deferPagesCheck) {
              opts.onPagesSize?.(size);
              await awaitPagesCheck(pagesCheck, part.chunkSize, opts.onBytes, opts.signal);
              pagesCheck.stop();
              pagesCheck = undefined;
              killPoint('image: pages checked');
            }
          }
        } else if (quick) d = { size, crc: part.crc32c, sha256: Buffer.alloc(0) };
        else if (part.name === PARTS.image) d = digestBuffer((imageBytes = readWhole(fd, size)));
        else {
          const pages = part.name === PARTS.pages;
          if (pages) opts.onPagesSize?.(size);
          if (pages) killPoint('image: checking pages');
          d = opts.signal && pages ? await digestFdInterruptibly(fd, size, opts.onBytes, opts.signal) : wholeDigest(fd, size, pages ? opts.onBytes : undefined);
          if (pages) killPoint('image: pages checked');
        }
        if (d.size !== size) throw new AppshotError(`corrupt image: ${part.name} changed while it was read`);
        // A signed manifest vouches for the parts through their SHA-256.
        const fault = wholeDigestFault(part, d, !!signer.trusted && !quick && !byChunks);
        if (fault) throw new AppshotError(`corrupt image: ${fault}`);
        digests.set(part.name, d);
        if (opts.holdPages && part.name === PARTS.pages) pagesFd = fd;
      } finally {
        if (fd !== pagesFd) closeSync(fd);
      }
    }
    checkWireCounts(ImageType, imageBytes);
    const image = decode<Image>(ImageType, imageBytes, PARTS.image);
    validateImage(image, BigInt(digests.get(PARTS.pages)!.size), opts.asParent);
    if (signer.trusted && isOwnKey(signer.trusted) && image.fromSnapshot) ownSnapshots.add(image);
    const loaded: LoadedImage = { dir, manifest, image, signer, digests, dispose, identity: identity.join(' '), ...(pagesAsWritten ? { pagesAsWritten } : {}) };
    // (getters: dispose closes and stops them)
    Object.defineProperty(loaded, 'pagesFd', { get: () => pagesFd, enumerable: true });
    const chunkSize = digests.get(PARTS.pages)?.chunkSize ?? 0;
    Object.defineProperty(loaded, 'pagesCheck', { get: () => (pagesCheck ? { check: pagesCheck, chunkSize } : undefined), enumerable: true });
    return loaded;
  } catch (e) {
    dispose();
    throw e;
  }
}
