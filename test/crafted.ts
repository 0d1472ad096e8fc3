/**
 * Crafted images for the tests that restore what anyone could have
 * written: an image's metadata changed, its parts signed again by a node
 * of the test's choosing. Apart from helpers.ts, which every test file
 * loads, so that only these load the image format's code.
 */
import { closeSync, copyFileSync, linkSync, mkdirSync, openSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { expect } from 'vitest';
import { digestFd, encodeImage, encodeSignedManifest, type PartDigest } from '../src/image/format.js';
import type { Image } from '../src/image/types.js';
import { command as appshot, type Sandbox } from './helpers.js';

/** The digest of the file at `path`, as a manifest records it. */
export function digestOf(path: string): PartDigest {
  const fd = openSync(path, 'r');
  try {
    return digestFd(fd);
  } finally {
    closeSync(fd);
  }
}

/** Runs `fn` as the node whose state directory is `home` (the signing key
 * is read from $APPSHOT_HOME), which is put back after. */
export function asNode<T>(home: string, fn: () => T): T {
  const before = process.env.APPSHOT_HOME;
  process.env.APPSHOT_HOME = home;
  try {
    return fn();
  } finally {
    if (before === undefined) delete process.env.APPSHOT_HOME;
    else process.env.APPSHOT_HOME = before;
  }
}

/**
 * Directory image `dir`, made anew: `image` encoded as image.pb, the
 * pages.img of image directory `pagesFrom` (a hard link: for images whose
 * pages no test changes in place; `copyPages` for a copy of their own),
 * and a manifest signed as image `id` by the node `signer` (a state
 * directory; by default whatever $APPSHOT_HOME is). `formatOf`: the
 * manifest's format chosen for what the image holds, as a snapshot's is,
 * rather than the newest.
 */
export function writeSignedImage(
  dir: string,
  image: Image,
  pagesFrom: string,
  opts: { signer?: string; id?: string; copyPages?: boolean; formatOf?: boolean } = {},
): string {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir);
  writeFileSync(join(dir, 'image.pb'), encodeImage(image));
  if (opts.copyPages) copyFileSync(join(pagesFrom, 'pages.img'), join(dir, 'pages.img'));
  else linkSync(join(pagesFrom, 'pages.img'), join(dir, 'pages.img'));
  const digests = new Map(['image.pb', 'pages.img'].map((part) => [part, digestOf(join(dir, part))]));
  const sign = () => encodeSignedManifest(opts.id ?? 'feedfacefeedface', digests, opts.formatOf ? image : undefined);
  writeFileSync(join(dir, 'manifest.pb'), opts.signer === undefined ? sign() : asNode(opts.signer, sign));
  return dir;
}

/**
 * writeSignedImage for an image whose pages.img is a copy of `pagesFrom`'s
 * with `appended` bytes after it: `written` at their start, the rest a
 * hole (a sparse file: nothing on disk). `build` makes the image, given
 * where the appended bytes start (the former size, rounded up to a page).
 */
export function writeSignedImageWithPages(
  dir: string,
  pagesFrom: string,
  appended: bigint,
  written: Buffer,
  build: (at: bigint) => Image,
  opts: { signer?: string; id?: string; formatOf?: boolean } = {},
): string {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir);
  const pages = join(dir, 'pages.img');
  copyFileSync(join(pagesFrom, 'pages.img'), pages);
  const at = ((BigInt(statSync(pages).size) + 4095n) / 4096n) * 4096n;
  truncateSync(pages, Number(at + appended));
  if (written.length) {
    const fd = openSync(pages, 'r+');
    try {
      writeSync(fd, written, 0, written.length, Number(at));
    } finally {
      closeSync(fd);
    }
  }
  const image = build(at);
  writeFileSync(join(dir, 'image.pb'), encodeImage(image));
  const digests = new Map(['image.pb', 'pages.img'].map((part) => [part, digestOf(join(dir, part))]));
  const sign = () => encodeSignedManifest(opts.id ?? 'feedfacefeedface', digests, opts.formatOf ? image : undefined);
  writeFileSync(join(dir, 'manifest.pb'), opts.signer === undefined ? sign() : asNode(opts.signer, sign));
  return dir;
}

/** `appshot restore image --trust-image ...extra` in `sb`, refused: one
 * line matching `why`, exit `code`, and nothing of it left (no
 * registration, no tables in /dev/shm). */
export function expectRestoreRefused(sb: Sandbox, image: string, why: RegExp, code: number, extra: string[] = []): void {
  const aidsBefore = sb.aids();
  const shmBefore = sb.shmFiles();
  const r = spawnSync(appshot, ['restore', image, '--trust-image', ...extra], { env: sb.env, encoding: 'utf8', timeout: 50_000 });
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^appshot: /);
  expect(lines[0]).toMatch(why);
  expect(r.status, r.stderr).toBe(code);
  expect(sb.aids()).toEqual(aidsBefore);
  expect(sb.shmFiles()).toEqual(shmBefore);
}
