/**
 * Memory: the map of every process (each VMA with protection, flags,
 * backing object and offset) and its contents. Only pages that exist are
 * stored (/proc/PID/pagemap), and of a private file mapping only the pages
 * the process wrote. Shared anonymous memory (and memfd, and deleted files
 * mapped shared) is one object however many processes map it: stored once.
 * SysV segments are global state (sysv.ts); the VMA only names the segment.
 */
import { closeSync, openSync, readFileSync, statSync } from 'node:fs';
import { PAGES_MODE } from '../native.js';
import { type Vma, VmaKind } from '../image/types.js';
import { type DumpContext, Unsupported } from '../snapshot/context.js';

const PAGE = 4096n;

interface MapsLine {
  start: bigint;
  end: bigint;
  perms: string;
  pgoff: bigint;
  major: number;
  minor: number;
  ino: bigint;
  path: string;
  vmFlags: string[];
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$/;

export function readSmaps(pid: number): MapsLine[] {
  const out: MapsLine[] = [];
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = HEADER.exec(line);
    if (m) {
      out.push({
        start: BigInt('0x' + m[1]),
        end: BigInt('0x' + m[2]),
        perms: m[3],
        pgoff: BigInt('0x' + m[4]),
        major: parseInt(m[5], 16),
        minor: parseInt(m[6], 16),
        ino: BigInt(m[7]),
        path: m[8],
        vmFlags: [],
      });
    } else if (line.startsWith('VmFlags:') && out.length) {
      out[out.length - 1].vmFlags = line.slice(8).trim().split(/\s+/);
    }
  }
  return out;
}

const SPECIAL: Record<string, number> = {
  '[vdso]': VmaKind.VDSO,
  '[vvar]': VmaKind.VVAR,
  '[vvar_vclock]': VmaKind.VVAR,
  '[vsyscall]': VmaKind.VSYSCALL,
};

function protOf(perms: string): number {
  return (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);
}

function pairs(a: Uint32Array): number[] {
  return Array.from(a);
}

/** The object behind a shared mapping, stored once for all its mappers.
 * It is read through /proc/PID/map_files, which sees holes (SEEK_DATA);
 * that needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and without it the
 * pages this process has present are read through its own mapping. */
function dumpSharedObject(ctx: DumpContext, pid: number, pagemapFd: number, l: MapsLine): number {
  const key = `${l.major}:${l.minor}:${l.ino}`;
  return ctx.shared(key, () => {
    const range = `${l.start.toString(16)}-${l.end.toString(16)}`;
    let fd = -1;
    try {
      fd = openSync(`/proc/${pid}/map_files/${range}`, 'r');
    } catch {
      /* unprivileged: fall back below */
    }
    if (fd >= 0) {
      try {
        const size = statSync(`/proc/self/fd/${fd}`).size;
        const { offset, runs } = ctx.pages.appendFd(fd, size);
        return { dev: BigInt((l.major << 8) | l.minor), ino: l.ino, size: BigInt(size), path: l.path, pages: { offset: BigInt(offset), runs: pairs(runs), fromParent: [] } };
      } finally {
        closeSync(fd);
      }
    }
    const d = ctx.pages.dump(pid, pagemapFd, l.start, l.end, PAGES_MODE.allPresent);
    const shift = Number(l.pgoff / PAGE);
    const runs = pairs(d.runs).map((v, i) => (i % 2 === 0 ? v + shift : v));
    return { dev: BigInt((l.major << 8) | l.minor), ino: l.ino, size: l.end - l.start + l.pgoff, path: l.path, pages: { offset: BigInt(d.offset), runs, fromParent: [] } };
  });
}

function isAnonShared(l: MapsLine): boolean {
  return l.ino === 0n || l.path === '' || l.path.startsWith('/dev/zero') || l.path.startsWith('/memfd:') || l.path.endsWith(' (deleted)');
}

export function dumpMemory(ctx: DumpContext, pid: number, vpid: number, what: string): Vma[] {
  const vmas: Vma[] = [];
  const pagemapFd = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    for (const l of readSmaps(pid)) {
      const shared = l.perms[3] === 's';
      const vma: Vma = {
        start: l.start,
        end: l.end,
        prot: protOf(l.perms),
        shared,
        pgoff: l.pgoff,
        path: l.path,
        kind: VmaKind.ANON,
        special: l.path.startsWith('[') ? l.path : '',
        file: -1,
        sharedMemory: -1,
        shmVid: -1,
        vmFlags: l.vmFlags,
      };
      const special = SPECIAL[l.path];
      if (special !== undefined) {
        vma.kind = special;
      } else if (l.path.startsWith('/SYSV')) {
        vma.kind = VmaKind.SYSV_SHM;
        // A SysV segment's inode number is its shmid.
        vma.shmVid = ctx.virtual('shmid', Number(l.ino));
        if (!vma.shmVid && !ctx.tables.tables.shmid.some((e) => e.system === Number(l.ino)))
          throw new Unsupported(`${what}: maps SysV segment ${l.ino}, which belongs to no application`);
      } else if (shared && isAnonShared(l)) {
        vma.kind = VmaKind.SHARED_ANON;
        vma.sharedMemory = dumpSharedObject(ctx, pid, pagemapFd, l);
      } else if (l.ino !== 0n && l.path.startsWith('/')) {
        vma.kind = shared ? VmaKind.FILE_SHARED : VmaKind.FILE_PRIVATE;
        const deleted = l.path.endsWith(' (deleted)');
        if (deleted) throw new Unsupported(`${what}: maps deleted file ${l.path}`);
        vma.file = ctx.file(l.path, l.path, false);
      }
      if (vma.kind === VmaKind.ANON || vma.kind === VmaKind.FILE_PRIVATE) {
        const mode = vma.kind === VmaKind.ANON ? PAGES_MODE.anon : PAGES_MODE.privateFile;
        const parent = ctx.parent?.pagesFor(vpid, l.start, l.end);
        const d = ctx.pages.dump(pid, pagemapFd, l.start, l.end, mode, parent);
        vma.pages = { offset: BigInt(d.offset), runs: pairs(d.runs), fromParent: pairs(d.same) };
      }
      vmas.push(vma);
    }
  } finally {
    closeSync(pagemapFd);
  }
  return vmas;
}

export function countPages(runs: number[]): number {
  let n = 0;
  for (let i = 1; i < runs.length; i += 2) n += runs[i];
  return n;
}
