/** What the resource dumpers share while one snapshot is taken. */
import { statSync } from 'node:fs';
import { type Kind, type PageWriter, type TablesSnapshot } from '../native.js';
import type { FileIdentity, Image, Pipe, SharedMemory } from '../image/types.js';
import type { ParentResolver } from '../snapshot/parent.js';
import { HeldConnections } from './tcp.js';

/** A resource the snapshot cannot capture yet: the whole snapshot is refused
 * rather than an image written that would not restore. */
export class Unsupported extends Error {}

export class DumpContext {
  private readonly toVirtual = new Map<Kind, Map<number, number>>();
  private readonly fileIndex = new Map<string, number>();
  readonly pipeIndex = new Map<bigint, number>();
  readonly sharedIndex = new Map<string, number>();
  /** TCP connections held in repair mode while the application is frozen. */
  readonly tcp = new HeldConnections();

  constructor(
    readonly image: Image,
    readonly tables: TablesSnapshot,
    /** The tables' file: threads never seen by name get a virtual TID here. */
    readonly tablesPath: string,
    readonly pages: PageWriter,
    readonly parent: ParentResolver | undefined,
    /** Descriptor numbers of the userfaultfds that dirty tracking put in
     * the processes: not the application's, never in an image. */
    readonly trackingFds: number[] = [],
    /** Processes (system PIDs) whose writes since `parent` are tracked;
     * the others' pages are compared with the parent's. */
    readonly trackedPids: Set<number> = new Set(),
  ) {
    for (const [kind, entries] of Object.entries(tables.tables))
      this.toVirtual.set(kind as Kind, new Map(entries.map((e) => [e.system, e.virtual])));
  }

  /** The virtual id of a system id, or 0 if the application has none. */
  virtual(kind: Kind, system: number): number {
    return this.toVirtual.get(kind)?.get(system) ?? 0;
  }

  /** Records (once) the identity of a file the image maps or holds open. */
  file(path: string, statPath: string, deleted: boolean): number {
    const st = statSync(statPath, { bigint: true });
    const key = `${st.dev}:${st.ino}`;
    const known = this.fileIndex.get(key);
    if (known !== undefined) return known;
    const id: FileIdentity = {
      path,
      dev: st.dev,
      ino: st.ino,
      size: st.size,
      mtimeNs: st.mtimeNs,
      mode: Number(st.mode),
      deleted,
      crc32c: 0,
    };
    this.image.files.push(id);
    this.fileIndex.set(key, this.image.files.length - 1);
    return this.image.files.length - 1;
  }

  pipe(ino: bigint, make: () => Pipe): number {
    let i = this.pipeIndex.get(ino);
    if (i === undefined) {
      this.image.pipes.push(make());
      i = this.image.pipes.length - 1;
      this.pipeIndex.set(ino, i);
    }
    return i;
  }

  shared(key: string, make: () => SharedMemory): number {
    let i = this.sharedIndex.get(key);
    if (i === undefined) {
      this.image.sharedMemory.push(make());
      i = this.image.sharedMemory.length - 1;
      this.sharedIndex.set(key, i);
    }
    return i;
  }
}

/** "process 3 (server)": how messages name a process, by its virtual PID. */
export function nameProcess(vpid: number, comm: string): string {
  return `process ${vpid} (${comm})`;
}
