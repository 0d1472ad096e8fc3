/**
 * Reading and writing images: protobuf metadata (proto/image.proto, loaded
 * with protobufjs) plus the page file, as a directory or a tar stream.
 *
 * A directory image is assembled under a hidden name next to its
 * destination and renamed into place only when every part is synced, so an
 * image either exists whole or not at all. The page file is written
 * unnamed (O_TMPFILE) until then, so a writer killed mid-dump leaves
 * nothing on disk.
 */
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  createReadStream,
  existsSync,
  fsyncSync,
  mkdtempSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import tar from 'tar-stream';
import { killPoint } from '../killpoint.js';
import { makePartialDir } from './partial.js';
import { AppshotError, ExitCode } from '../errors.js';
import { addon, type PageWriter } from '../native.js';
import type { Image, Manifest, Template } from './types.js';

export const MAGIC = 'appshot-image';
export const FORMAT_VERSION = 1;
export const PARTS = { manifest: 'manifest.pb', image: 'image.pb', pages: 'pages.img' } as const;

const protoPath = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'proto', 'image.proto');
const root = protobuf.loadSync(protoPath);
const ImageType = root.lookupType('appshot.image.Image');
const ManifestType = root.lookupType('appshot.image.Manifest');
const TemplateType = root.lookupType('appshot.image.Template');

const LONG_TYPES = new Set(['int64', 'uint64', 'sint64', 'fixed64', 'sfixed64']);

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

/** The reverse, guided by the schema: 64-bit fields become bigint, absent
 * messages undefined. */
function fromWire(type: protobuf.Type, obj: Record<string, unknown>): Record<string, unknown> {
  for (const field of type.fieldsArray) {
    const v = obj[field.name];
    if (v === null || v === undefined) {
      if (field.resolvedType instanceof protobuf.Type && !field.repeated) obj[field.name] = undefined;
      continue;
    }
    const conv = (x: unknown): unknown => {
      if (field.resolvedType instanceof protobuf.Type) return fromWire(field.resolvedType, x as Record<string, unknown>);
      if (LONG_TYPES.has(field.type)) return BigInt(x as string);
      return x;
    };
    obj[field.name] = field.repeated ? (v as unknown[]).map(conv) : conv(v);
  }
  return obj;
}

function encode(type: protobuf.Type, value: object): Buffer {
  return Buffer.from(type.encode(type.fromObject(toWire(value) as Record<string, unknown>)).finish());
}

function decode<T>(type: protobuf.Type, bytes: Buffer, what: string): T {
  try {
    const msg = type.decode(bytes);
    const obj = type.toObject(msg, { longs: String, defaults: true, arrays: true });
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

function writeSynced(path: string, data: Buffer): void {
  const fd = openSync(path, 'wx', 0o600);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function syncDir(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function manifestFor(imageBytes: Buffer, pagesPart: { size: number; crc: number }, imageId: string): Manifest {
  return {
    magic: MAGIC,
    formatVersion: FORMAT_VERSION,
    imageId,
    parts: [
      { name: PARTS.image, size: BigInt(imageBytes.length), crc32c: addon().crc32c(imageBytes) },
      { name: PARTS.pages, size: BigInt(pagesPart.size), crc32c: pagesPart.crc },
    ],
  };
}

export const newImageId = () => randomBytes(8).toString('hex');

/** Writes a directory image at `dest` from the finished page file.
 * `subdirs` (name → a directory already written) move inside it: a
 * pre-copy image carries its base this way. */
export function commitImageDir(dest: string, image: Image, pages: PageWriter, pagesPart: { size: number; crc: number }, imageId: string, subdirs: Record<string, string> = {}): void {
  const parent = dirname(resolve(dest));
  const partial = makePartialDir(join(parent, `.${basename(dest)}.partial-${process.pid}`));
  const tmp = partial.path;
  try {
    for (const [name, dir] of Object.entries(subdirs)) renameSync(dir, join(tmp, name));
    pages.link(join(tmp, PARTS.pages));
    const imageBytes = encodeImage(image);
    writeSynced(join(tmp, PARTS.image), imageBytes);
    writeSynced(join(tmp, PARTS.manifest), encode(ManifestType, manifestFor(imageBytes, pagesPart, imageId)));
    syncDir(tmp);
    killPoint('image: committing');
    renameSync(tmp, dest);
    partial.done();
    syncDir(parent);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    partial.done();
    throw e;
  }
}

/** Writes the image as a tar stream (manifest first) to `out`. */
export async function streamImageTar(out: NodeJS.WritableStream, image: Image, pages: PageWriter, pagesPart: { size: number; crc: number }, imageId: string): Promise<void> {
  const imageBytes = encodeImage(image);
  const pack = tar.pack();
  const done = pipeline(pack, out as NodeJS.WritableStream);
  pack.entry({ name: PARTS.manifest, mode: 0o600 }, encode(ManifestType, manifestFor(imageBytes, pagesPart, imageId)));
  pack.entry({ name: PARTS.image, mode: 0o600 }, imageBytes);
  const entry = pack.entry({ name: PARTS.pages, mode: 0o600, size: pagesPart.size });
  await pipeline(createReadStream(`/proc/self/fd/${pages.fd()}`), entry);
  pack.finalize();
  await done;
}

export interface LoadedImage {
  /** The directory holding the parts (a temporary one for a tar). */
  dir: string;
  manifest: Manifest;
  image: Image;
  /** Removes a temporary extraction; a no-op for a directory image. */
  dispose(): void;
}

async function extractTar(input: NodeJS.ReadableStream, what: string): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'appshot-image-'));
  const extract = tar.extract();
  extract.on('entry', (header, stream, next) => {
    const name = header.name;
    if (!(Object.values(PARTS) as string[]).includes(name)) {
      stream.resume();
      stream.on('end', next);
      return;
    }
    const fd = openSync(join(dir, name), 'wx', 0o600);
    stream.on('data', (chunk: unknown) => writeSync(fd, chunk as Buffer));
    stream.on('end', () => {
      closeSync(fd);
      next();
    });
  });
  try {
    await pipeline(input, extract);
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw new AppshotError(`corrupt image: ${what} is not a complete tar stream (${(e as Error).message})`);
  }
  return dir;
}

/** Where an image's parent is: a relative path is inside the image (a
 * pre-copy image's base). */
export function parentPath(imageDir: string, path: string): string {
  return isAbsolute(path) ? path : join(imageDir, path);
}

/** Opens an image (directory, tar file or '-' for stdin) and verifies every
 * part's checksum and the format version before returning it. With
 * `sizeOnly`, the page file's size is checked but not its checksum (a
 * template, verified whole when it was made, is opened for every clone). */
export async function loadImage(path: string, opts: { sizeOnly?: boolean } = {}): Promise<LoadedImage> {
  let dir = path;
  let temporary = false;
  if (path === '-') {
    dir = await extractTar(process.stdin, 'standard input');
    temporary = true;
  } else {
    if (!existsSync(path)) throw new AppshotError(`no such image: ${path}`, ExitCode.notFound);
    if (!statSync(path).isDirectory()) {
      dir = await extractTar(createReadStream(path), path);
      temporary = true;
    }
  }
  const dispose = () => {
    if (temporary) rmSync(dir, { recursive: true, force: true });
  };
  try {
    const manifestPath = join(dir, PARTS.manifest);
    if (!existsSync(manifestPath)) throw new AppshotError(`not an appshot image: ${path} (no ${PARTS.manifest})`);
    const manifest = decode<Manifest>(ManifestType, readFileSync(manifestPath), PARTS.manifest);
    if (manifest.magic !== MAGIC) throw new AppshotError(`not an appshot image: ${path}`);
    if (manifest.formatVersion !== FORMAT_VERSION)
      throw new AppshotError(`image format ${manifest.formatVersion} is not supported (this appshot reads format ${FORMAT_VERSION})`);
    for (const part of manifest.parts) {
      const p = join(dir, part.name);
      if (!existsSync(p)) throw new AppshotError(`corrupt image: ${part.name} is missing`);
      const quick = opts.sizeOnly && part.name === PARTS.pages;
      const { size, crc } = quick ? { size: statSync(p).size, crc: part.crc32c } : addon().crc32cFile(p);
      if (BigInt(size) !== part.size)
        throw new AppshotError(`corrupt image: ${part.name} is ${size} bytes, expected ${part.size} (truncated?)`);
      if (crc !== part.crc32c) throw new AppshotError(`corrupt image: checksum of ${part.name} does not match`);
    }
    const image = decode<Image>(ImageType, readFileSync(join(dir, PARTS.image)), PARTS.image);
    return { dir, manifest, image, dispose };
  } catch (e) {
    dispose();
    throw e;
  }
}
