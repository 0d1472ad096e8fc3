/**
 * `appshot images [DIR...]`: the images and templates in directories, as
 * `docker images` lists what a node holds. appshot keeps no store of its
 * own (an image is wherever `-o` put it), so the user names the
 * directories; each entry is read as `inspect` reads it (its manifest and
 * metadata, never its page data: of a stream file, only the start, where
 * appshot writes them), and one that is not a well-formed image
 * is listed with what is wrong with it rather than failing the listing.
 * An entry removed while the listing reads it (between the directory's
 * read and its own, or half-way through it) is not listed: it is no
 * longer there, whatever it was.
 */
import type { Command } from 'commander';
import { closeSync, constants, existsSync, lstatSync, openSync, readdirSync, statSync, type Stats } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { AppshotError, errorWords, ExitCode, isSystemCallError, printable } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { printJson } from './json.js';
import { duration } from '../words.js';

export interface ImageEntry {
  path: string;
  /** image: a directory; file: a .tar/.tar.gz/.tar.zst stream file (its
   * header only is read: the start of the stream, never its page data);
   * template: an image with template.pb. */
  type: 'image' | 'template' | 'file';
  /** The AID of the application it was taken of. */
  aid: string | null;
  /** @deprecated the same as `aid` (the name every other command uses);
   * goes with appshot.images/2. */
  app: string | null;
  /** When it was taken (templates: when made), ISO 8601. */
  createdAt: string | null;
  /** Bytes on disk, all parts (a file: its size). */
  bytes: number;
  processes: number | null;
  /** The image an incremental snapshot's memory builds on. */
  parent: string | null;
  /** Whether a key this node trusts signed it. */
  trusted: boolean | null;
  /** Why it could not be read; the other fields are then what the
   * directory entry says. */
  error?: string;
}

export interface ImagesResult {
  schema: 'appshot.images/1';
  images: ImageEntry[];
}

const STREAM_FILE = /\.(tar|tar\.gz|tgz|tar\.zst|tzst)$/i;

/** Bytes of every regular file under `dir` (an image's parts, a template's
 * private copies; `dir` is a directory's descriptor's /proc/self/fd/N),
 * without following links: each directory beneath it is opened with
 * O_NOFOLLOW through its parent's descriptor and read through its own,
 * so that one swapped for a link to / meanwhile is not walked (review
 * 242: a root listing walked the whole file system by path). Walked with
 * a stack, not by recursion, holding a descriptor per level: a directory
 * nested thousands deep (fuzz34 F3) ends in EMFILE, listed as the
 * entry's error, not in a stack overflow. */
function diskBytes(dir: string, stopAs?: string): number {
  let total = 0;
  const stack: { fd: number; names: string[]; next: number }[] = [];
  const enter = (path: string, follow: boolean) => {
    const level = { fd: openSync(path, constants.O_RDONLY | constants.O_DIRECTORY | (follow ? 0 : constants.O_NOFOLLOW)), names: [] as string[], next: 0 };
    stack.push(level);
    level.names = readdirSync(`/proc/self/fd/${level.fd}`);
  };
  try {
    enter(dir, true);
    // Where a test removes a part listed but not yet looked at (ENOENT).
    if (stopAs !== undefined) killPoint(`images: sizing ${stopAs}`);
    while (stack.length) {
      const top = stack[stack.length - 1];
      if (top.next === top.names.length) {
        closeSync(top.fd);
        stack.pop();
        continue;
      }
      const at = `/proc/self/fd/${top.fd}/${top.names[top.next++]}`;
      const st = lstatSync(at);
      if (st.isDirectory()) enter(at, false);
      else if (st.isFile()) total += st.size;
    }
  } finally {
    for (const level of stack) closeSync(level.fd);
  }
  return total;
}

/** The AID an image was taken of, under its name and its deprecated one. */
const takenOf = (aid: string) => ({ aid, app: aid });

async function describe(path: string): Promise<ImageEntry | undefined> {
  const st = lstatSync(path);
  const entry = (type: ImageEntry['type'], bytes: number): ImageEntry => ({
    path,
    type,
    aid: null,
    app: null,
    createdAt: null,
    bytes,
    processes: null,
    parent: null,
    trusted: null,
  });
  const { PARTS, loadImage, readImageFileHeader } = await import('../image/format.js');
  // Anything but a directory or a link named as a stream file is read as
  // one: a FIFO or a device is listed with what is wrong with it.
  if (!st.isDirectory() && !st.isSymbolicLink() && STREAM_FILE.test(path)) {
    const e = { ...entry('file', st.size), createdAt: st.mtime.toISOString() };
    try {
      const header = await readImageFileHeader(path);
      if (!header) return e; // parts in another order: its metadata may come last
      const { image, signer } = header;
      return { ...e, ...takenOf(image.aid), createdAt: image.created, processes: image.processes.length, parent: image.parent?.path ?? null, trusted: signer.trusted !== undefined };
    } catch (err) {
      if (!(err instanceof AppshotError)) throw err;
      return { ...e, error: err.message.replace(/^corrupt image: /, '') };
    }
  }
  if (!st.isDirectory()) return undefined;
  // Where a test swaps the entry (for a link to a tar, a file) after it
  // was looked at.
  killPoint(`images: looked at ${basename(path)}`);
  // The directory looked at, opened once without following a link: its
  // parts are read through the descriptor (/proc/self/fd/N), so an entry
  // swapped meanwhile for a link to a tar file is never extracted (nor its
  // page data read), and one swapped for a file fails the open (ELOOP,
  // ENOTDIR), which describeEntry takes as a change while read.
  const fd = openSync(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  try {
    const at = `/proc/self/fd/${fd}`;
    if (!existsSync(join(at, PARTS.manifest))) return undefined;
    const { TEMPLATE_PART, openTemplate } = await import('../template/template.js');
    // Where a test replaces the entry once it is open: what is read
    // through the descriptor then is a removed directory (ENOENT).
    killPoint(`images: reading ${basename(path)}`);
    const isTemplate = existsSync(join(at, TEMPLATE_PART));
    const e = entry(isTemplate ? 'template' : 'image', diskBytes(at, basename(path)));
    try {
      if (isTemplate) {
        const t = await openTemplate(at, false, 'report');
        try {
          const { image } = t.loaded;
          return { ...e, ...takenOf(image.aid), createdAt: t.template.created, processes: image.processes.length, trusted: t.loaded.signer.trusted !== undefined };
        } finally {
          t.loaded.dispose();
        }
      }
      const loaded = await loadImage(at, { sizeOnly: true, trust: 'report', directoryOnly: true });
      try {
        const { image } = loaded;
        return { ...e, ...takenOf(image.aid), createdAt: image.created, processes: image.processes.length, parent: image.parent?.path ?? null, trusted: loaded.signer.trusted !== undefined };
      } finally {
        loaded.dispose();
      }
    } catch (err) {
      if (!(err instanceof AppshotError)) throw err;
      // Said of the entry, not of the descriptor it was read through.
      return { ...e, error: err.message.split(at).join(path).replace(/^corrupt image: /, '') };
    }
  } finally {
    closeSync(fd);
  }
}

/** An error that says a file or directory went away while being read:
 * what a removal in the middle of the listing gives (a directory gone,
 * or one of its parts; a path whose directory became something else). */
function vanishedError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  // ELOOP: a directory looked at, then swapped for a link (opened with
  // O_NOFOLLOW).
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP';
}

/** describe, for an entry that may be removed meanwhile: one gone by the
 * end is left out (whatever reading it found, such as a part missing),
 * one that is still there but lost a part as it was read is listed with
 * that; only other failures end the listing. */
async function describeEntry(path: string): Promise<ImageEntry | undefined> {
  let found: ImageEntry | undefined;
  try {
    found = await describe(path);
  } catch (err) {
    // A system call's failure on the entry or a part of it (EACCES:
    // another user's directory; ENAMETOOLONG: one nested thousands deep;
    // EIO...) is that entry's line, as an image that does not parse is:
    // one hostile entry does not end the listing of the others (fuzz34 F3).
    if (!isSystemCallError(err)) throw err;
    const st = listableNow(path);
    if (!st) return undefined;
    // Without its path, which, read through /proc/self/fd, is not the entry's.
    const why = !vanishedError(err) ? `cannot read it: ${errorWords(err)}` : err.code === 'ENOENT' ? 'a part of it was removed while it was read' : 'it changed while it was read';
    return { path, type: st.isDirectory() ? 'image' : 'file', aid: null, app: null, createdAt: null, bytes: st.isFile() ? st.size : 0, processes: null, parent: null, trusted: null, error: why };
  }
  if (found?.error === undefined) return found;
  // What is wrong may be that it changed as it was read: a directory
  // now gone, or now something a fresh listing would leave out or list
  // as another type, is listed as a fresh listing would.
  const st = listableNow(path);
  if (!st) return undefined;
  if (st.isDirectory() !== (found.type !== 'file')) return { ...found, type: st.isDirectory() ? 'image' : 'file', bytes: st.isFile() ? st.size : 0, error: 'it changed while it was read' };
  return found;
}

/** What is at `path` now, if a fresh listing would list it: a directory,
 * or anything but a link named as a stream file; undefined when it is gone
 * or would be left out (a link, a file not named as a stream file). */
function listableNow(path: string): Stats | undefined {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return undefined;
  }
  return st.isDirectory() || (!st.isSymbolicLink() && STREAM_FILE.test(path)) ? st : undefined;
}

export async function listImages(dirs: string[]): Promise<ImagesResult> {
  const images: ImageEntry[] = [];
  for (const d of dirs) {
    const dir = resolve(d);
    let st;
    try {
      st = statSync(dir);
    } catch {
      throw new AppshotError(`no such directory: ${d}`, ExitCode.notFound);
    }
    // A directory that is itself an image is listed as one.
    const self = st.isDirectory() ? await describeEntry(dir) : undefined;
    if (self) {
      images.push(self);
      continue;
    }
    if (!st.isDirectory()) throw new AppshotError(`not a directory: ${d}`, ExitCode.usage);
    let names: string[];
    try {
      names = readdirSync(dir).sort();
    } catch (err) {
      // Removed since it was looked at: as if it had not been there.
      if ((err as NodeJS.ErrnoException).code === 'ENOTDIR') throw new AppshotError(`not a directory: ${d}`, ExitCode.usage);
      if (vanishedError(err)) throw new AppshotError(`no such directory: ${d}`, ExitCode.notFound);
      throw new AppshotError(`cannot list ${d}: ${errorWords(err as NodeJS.ErrnoException)}`);
    }
    for (const name of names) {
      if (name.startsWith('.')) continue; // half-written images (.NAME.partial-PID-RANDOM) and the like
      // Where a test removes an entry between the directory's read and its own.
      killPoint(`images: describing ${name}`);
      const found = await describeEntry(join(dir, name));
      if (found) images.push(found);
    }
  }
  return { schema: 'appshot.images/1', images };
}

function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) (v /= 1024), u++;
  return u === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

function age(iso: string | null): string {
  if (!iso) return '-';
  const d = duration(Date.now() - Date.parse(iso));
  return d === '-' ? d : `${d} ago`;
}

export function registerImages(program: Command): void {
  program
    .command('images')
    .description('list the images and templates in directories')
    .argument('[dir...]', 'directories to look in (default: the current one); an image directory lists itself')
    .option('--json', 'machine-readable output')
    .option('-q, --quiet', 'only the paths')
    .addHelpText(
      'after',
      '\nEach directory entry that is an image, a template or a .tar/.tar.gz/.tar.zst image file is listed with\n' +
        'the application it was taken of, when, its size on disk, and the image an incremental one builds\n' +
        'on. Of a stream file only the header at its start is read, never its page data. An entry that is\n' +
        'not a well-formed image is listed with what is wrong with it.\n\nExamples:\n  appshot images\n  appshot images ~/snapshots /srv/templates --json',
    )
    .action(async (dirs: string[], opts: { json?: boolean; quiet?: boolean }) => {
      const result = await listImages(dirs.length ? dirs : ['.']);
      if (opts.json) {
        printJson('images', result);
        return;
      }
      if (opts.quiet) {
        // A file name or an image's fields may hold anything: escaped.
        for (const i of result.images) process.stdout.write(`${printable(i.path)}\n`);
        return;
      }
      const rows = [['PATH', 'TYPE', 'AID', 'CREATED', 'SIZE', 'PROCS', 'PARENT']];
      for (const i of result.images)
        rows.push([
          i.path,
          i.error ? 'invalid' : i.type + (i.trusted === false ? ' (untrusted)' : ''),
          i.aid ?? '-',
          age(i.createdAt),
          human(i.bytes),
          i.processes === null ? '-' : String(i.processes),
          i.error ?? i.parent ?? '-',
        ]);
      for (const r of rows) r.forEach((cell, c) => (r[c] = printable(cell)));
      const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
      for (const r of rows) process.stdout.write(r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]))).join('  ') + '\n');
    });
}
