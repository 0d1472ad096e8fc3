/**
 * A descriptor open on a /proc listing of mappings (/proc/PID/maps, smaps,
 * numa_maps: one record per mapping, in address order) of one of the
 * application's processes, read part way when it was snapshotted.
 *
 * The kernel goes on with such a reader by address: each read() resumes
 * after the last mapping it listed, so a reader never sees addresses go
 * backwards nor a mapping's record mixed with another's. A byte offset
 * does not carry that across a restore: the restored process's listing is
 * another text (a --lazy restore maps stored pages from the page file, so
 * one mapping is listed as two, with a path; sizes differ), and the same
 * offset there falls in another mapping's record. A reader that had read
 * a mapping's header then read the rest of another one: memattrs, frozen
 * in the middle of its dp region's record, read that region's flags
 * without "dp".
 *
 * So the snapshot keeps where the reader is by mapping: the record of the
 * mapping it is in, the line in that record and the byte in the line,
 * found in the listing as the frozen processes had it before appshot
 * injected any call (a page appshot maps may merge with the application's
 * mapping next to it into one record that starts at appshot's address).
 * The restore puts the descriptor at the same line of the record of the
 * mapping that holds that address in the restored listing (a restore may
 * map as one what were two adjacent mappings), once every process's
 * memory is as it will run (RestoreContext.whenProcessesAreFinal). The reader
 * goes on with that mapping's remaining lines as they are now, then the
 * mappings after it: not byte for byte what the original would have read
 * (the counts are the restored process's), but never another mapping's
 * lines in its record.
 */
import { readFileSync, readSync } from 'node:fs';
import { type ListingPosition } from '../image/types.js';
import { addon } from '../native.js';
import { lineOf, offsetOfLine } from './proctext.js';

const LISTING = /^\/proc\/\d+(?:\/task\/\d+)?\/(?:maps|smaps|numa_maps)$/;

/** Whether `path` is a /proc listing of a process's mappings. */
export function isMappingListing(path: string): boolean {
  return LISTING.test(path);
}

/** One mapping's record: bytes [start, end) of the listing; `address`:
 * the mapping's start, `last`: its end (maps, smaps: the header's range)
 * or undefined (numa_maps: its header has the start only). */
interface ListingRecord {
  address: bigint;
  last?: bigint;
  start: number;
  end: number;
}

const NL = 0x0a;
const isLowerHex = (c: number) => (c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66);

/** The records of a listing: each starts with a line that begins with its
 * mapping's address in lowercase hex, then '-' and the end (maps, smaps:
 * the range) or ' ' (numa_maps). smaps's other lines begin with a capital. */
function records(text: Buffer): ListingRecord[] {
  const out: ListingRecord[] = [];
  for (let at = 0; at < text.length; ) {
    const nl = text.indexOf(NL, at);
    const next = nl < 0 ? text.length : nl + 1;
    let i = at;
    while (i < next && i - at <= 16 && isLowerHex(text[i])) i++;
    if (i > at && i < next && (text[i] === 0x2d || text[i] === 0x20)) {
      if (out.length) out[out.length - 1].end = at;
      const rec: ListingRecord = { address: BigInt(`0x${text.toString('latin1', at, i)}`), start: at, end: text.length };
      if (text[i] === 0x2d) {
        let j = i + 1;
        while (j < next && j - i <= 17 && isLowerHex(text[j])) j++;
        if (j > i + 1) rec.last = BigInt(`0x${text.toString('latin1', i + 1, j)}`);
      }
      out.push(rec);
    }
    at = next;
  }
  return out;
}

/**
 * Where byte `pos` of a listing is, by mapping. `text`: the listing as
 * read now; `leaveOut`: records the reader never had (appshot's own
 * mappings, made while the process was frozen), whose bytes do not count.
 */
export function listingPosition(text: Buffer, pos: number, leaveOut?: (address: bigint) => boolean): ListingPosition {
  let seen = 0; // bytes of the records the reader has, before this one
  for (const r of records(text)) {
    if (leaveOut?.(r.address)) continue;
    const length = r.end - r.start;
    if (pos < seen + length) {
      const into = r.start + (pos - seen);
      const { line, lineStart } = lineOf(text, into, r.start);
      return { address: r.address, line, column: into - lineStart, atEnd: false };
    }
    seen += length;
  }
  return { address: 0n, line: 0, column: 0, atEnd: true };
}

/**
 * The byte of `text` (a listing) that is at `at`: in the record of the
 * mapping that holds the address now, the same line and byte (at most the
 * line's end, its newline). That mapping may have grown: a restore maps
 * as one what were two adjacent mappings (a block moved next to another
 * with mremap), and the reader goes on with the rest of that record,
 * never the next mapping's. Maps and smaps give the range: the record
 * whose range holds the address; numa_maps the start only: the record
 * with the greatest start at or below it. No mapping holds it any more:
 * the start of the next one's record; a line its record no longer has:
 * the next record. `at` comes from an image: every number of it is only
 * compared, never trusted as a length.
 */
export function listingOffset(text: Buffer, at: ListingPosition): number {
  if (at.atEnd) return text.length;
  const all = records(text);
  let r: ListingRecord | undefined;
  for (const rec of all) {
    if (rec.address > at.address) break;
    r = rec;
  }
  // numa_maps: no end to compare with, the greatest start at or below.
  if (r && r.last !== undefined && at.address >= r.last) r = undefined;
  if (!r) {
    const next = all.find((rec) => rec.address > at.address);
    return next ? next.start : text.length;
  }
  return offsetOfLine(text, at.line, at.column, r.start, r.end);
}

/**
 * At snapshot, before any call is injected into any of the frozen
 * processes `pids`: the listings of mappings that their descriptors are
 * open on, each as read now, by path. appshot's calls map pages in a
 * process (the lock probe, the batch scratch area) that may merge with
 * one of its own mappings, so that a listing read later has another
 * record there, starting at appshot's address; the reader's place is
 * found in these texts, which have only the application's mappings.
 * `targets`: the links of their descriptors (read once for this and for
 * their dump); a listing is read only where one is open on it.
 */
export function listingsBeforeCalls(targets: Iterable<string>): Map<string, Buffer> {
  const texts = new Map<string, Buffer>();
  for (const target of targets) {
    if (!isMappingListing(target) || texts.has(target)) continue;
    try {
      texts.set(target, readFileSync(target));
    } catch {
      /* its process is gone or not ours to read: the dump reads it then */
    }
  }
  return texts;
}

/** At snapshot: where the reader of `path` (a listing of a frozen
 * process), at byte `pos`, is. `before`: the listing as read before any
 * call was injected (listingsBeforeCalls), if it was; else it is read now
 * and the records of mappings that do not start where the frozen process
 * had one (`frozenStarts`, if known: appshot's scratch areas) are left
 * out. */
export function dumpListingPosition(path: string, pos: bigint, before?: Buffer, frozenStarts?: Set<bigint>): ListingPosition {
  if (before) return listingPosition(before, Number(pos));
  return listingPosition(readFileSync(path), Number(pos), frozenStarts && ((address) => !frozenStarts.has(address)));
}

/** The whole text of listing descriptor `fd`, read from its start with
 * pread (its offset, shared with the application's descriptor, moves
 * not). */
function readWhole(fd: number): Buffer {
  const chunks: Buffer[] = [];
  let at = 0;
  for (;;) {
    const chunk = Buffer.allocUnsafe(65536);
    const got = readSync(fd, chunk, 0, chunk.length, at);
    if (got === 0) break;
    chunks.push(chunk.subarray(0, got));
    at += got;
  }
  return Buffer.concat(chunks);
}

/** At restore, once the listed process's memory is final: our descriptor
 * `fd` of the restored process's listing (the application's descriptor
 * shares its offset) put at `at`. Read through `fd` itself: it sees the
 * memory it was opened on, with no second permission check after the
 * process's credentials are its own. */
export function positionInListing(fd: number, at: ListingPosition): void {
  addon().lseek(fd, listingOffset(readWhole(fd), at));
}
