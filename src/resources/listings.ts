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
 * found in the listing as the frozen process has it (appshot's own
 * mappings of the moment left out). The restore puts the descriptor at the
 * same line of the same mapping's record in the restored listing, once
 * every process's memory is as it will run (RestoreContext.
 * whenProcessesAreFinal). The reader goes on with that mapping's remaining
 * lines as they are now, then the mappings after it: not byte for byte
 * what the original would have read (the counts are the restored
 * process's), but never another mapping's lines in its record.
 */
import { readFileSync } from 'node:fs';
import { type ListingPosition } from '../image/types.js';
import { addon } from '../native.js';

const LISTING = /^\/proc\/\d+(?:\/task\/\d+)?\/(?:maps|smaps|numa_maps)$/;

/** Whether `path` is a /proc listing of a process's mappings. */
export function isMappingListing(path: string): boolean {
  return LISTING.test(path);
}

/** One mapping's record: bytes [start, end) of the listing. */
interface ListingRecord {
  address: bigint;
  start: number;
  end: number;
}

const NL = 0x0a;
const isLowerHex = (c: number) => (c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66);

/** The records of a listing: each starts with a line that begins with its
 * mapping's address in lowercase hex, then '-' (maps, smaps: the range)
 * or ' ' (numa_maps). smaps's other lines begin with a capital. */
function records(text: Buffer): ListingRecord[] {
  const out: ListingRecord[] = [];
  for (let at = 0; at < text.length; ) {
    const nl = text.indexOf(NL, at);
    const next = nl < 0 ? text.length : nl + 1;
    let i = at;
    while (i < next && i - at <= 16 && isLowerHex(text[i])) i++;
    if (i > at && i < next && (text[i] === 0x2d || text[i] === 0x20)) {
      if (out.length) out[out.length - 1].end = at;
      out.push({ address: BigInt(`0x${text.toString('latin1', at, i)}`), start: at, end: text.length });
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
      let line = 0;
      let lineStart = r.start;
      for (let i = r.start; i < into; i++)
        if (text[i] === NL) {
          line++;
          lineStart = i + 1;
        }
      return { address: r.address, line, column: into - lineStart, atEnd: false };
    }
    seen += length;
  }
  return { address: 0n, line: 0, column: 0, atEnd: true };
}

/**
 * The byte of `text` (a listing) that is at `at`: in the record of the
 * same mapping, the same line and byte (at most the line's end, its
 * newline). A mapping no longer listed: the start of the next one's
 * record; a line its record no longer has: the next record. `at` comes
 * from an image: every number of it is only compared, never trusted as a
 * length.
 */
export function listingOffset(text: Buffer, at: ListingPosition): number {
  if (at.atEnd) return text.length;
  const r = records(text).find((rec) => rec.address >= at.address);
  if (!r) return text.length;
  if (r.address !== at.address) return r.start;
  let lineStart = r.start;
  for (let l = 0; l < at.line; l++) {
    const nl = text.indexOf(NL, lineStart);
    if (nl < 0 || nl + 1 >= r.end) return r.end;
    lineStart = nl + 1;
  }
  const nl = text.indexOf(NL, lineStart);
  const lineEnd = nl < 0 || nl >= r.end ? r.end : nl;
  return Math.min(lineStart + at.column, lineEnd);
}

/** At snapshot: where the reader of `path` (a listing of a frozen
 * process), at byte `pos`, is. `frozenStarts`: the start addresses of the
 * mappings that process had when frozen, if known; records of others
 * (appshot's scratch areas) are left out. */
export function dumpListingPosition(path: string, pos: bigint, frozenStarts?: Set<bigint>): ListingPosition {
  return listingPosition(readFileSync(path), Number(pos), frozenStarts && ((address) => !frozenStarts.has(address)));
}

/** At restore, once the listed process's memory is final: our descriptor
 * `fd` of `path` (the restored process's listing; the application's
 * descriptor shares its offset) put at `at`. */
export function positionInListing(fd: number, path: string, at: ListingPosition): void {
  addon().lseek(fd, listingOffset(readFileSync(path), at));
}
