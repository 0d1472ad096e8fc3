/**
 * AIO contexts (io_setup). A context is a ring the kernel maps into the
 * process ("/[aio] (deleted)" in its maps): a 32-byte header (id, nr,
 * head, tail, magic...) and `nr` completion events, whose address is the
 * context's id (aio_context_t). The kernel follows the ring when it is
 * moved (mremap), which is what a restore relies on, as CRIU's does
 * (criu/aio.c): io_setup in the restored process, the new ring's tail
 * brought where the old one was by requests that complete at once (a
 * write of a byte to /dev/null), its head set (user space may reap by
 * writing it, as libaio does), its events copied, and the ring moved to
 * the old address.
 *
 * io_setup is asked for the number of events that gives a ring of the
 * same size (the kernel makes room for max(n, 4 * CPUs) * 2 + 2 events,
 * rounded up to whole pages, and the ring tells only the result): the
 * restore fails, naming it, if this machine makes another size of it.
 *
 * Requests in flight (submitted, not completed) live only in the kernel:
 * such a context cannot be captured, and the ring does not show them. They
 * are found by counting the context's free request slots, while the
 * process is frozen: of the `nr - 1` slots a context has, each is free,
 * holds a completed event not yet reaped (head to tail), or is a request
 * in flight. Requests that complete at once (a read of no bytes from a
 * pipe or socket the process holds: probe(), quietDescriptor()) are
 * submitted inside the process until the kernel refuses one (EAGAIN),
 * on each CPU the thread may run on in turn, twice over (the kernel keeps
 * free slots per CPU); those it took are the free slots, but for the
 * `(nr - 1) mod req_batch` the kernel's shared count always keeps (it
 * hands slots to a CPU a batch of `req_batch` at a time, and its count
 * moves by whole batches from nr - 1). Fewer than `nr - 1 - unreaped`:
 * the context is refused by name, with the count.
 * (Slots a CPU the thread may not run on keeps would be counted as in
 * flight: refused too, never wrong.) The events the probe left are then
 * reaped by moving the head past them, the unreaped ones copied after
 * them in their order: the context holds the same events as before, in
 * the same order, its head and tail indices moved on by the probe's
 * count (what a process that reaped as many events would see). A
 * snapshot that fails leaves it so.
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { AppshotError } from '../errors.js';
import { killPoint } from '../killpoint.js';
import { addon } from '../native.js';
import type { AioRing, Process } from '../image/types.js';
import type { Injector } from '../ptrace/inject.js';
import { type RemoteProcess, SYS } from '../ptrace/remote.js';
import { Transient, Unsupported } from './context.js';

const HEADER = 32;
const EVENT = 32;
const PAGE = 4096;
const AIO_RING_MAGIC = 0xa10a10a1;
const NR = { open: 2, close: 3, io_submit: 209, sched_setaffinity: 203 };
const IOCB_CMD_PREAD = 0;
const IOCB_CMD_PWRITE = 1;
const O_WRONLY = 1;
const O_RDWR = 2;
const O_PATH = 0o10000000;
/** /dev/null and /dev/zero's device numbers (1:3, 1:5). */
const QUIET_DEVICES = [0x103, 0x105];
const EAGAIN = 11;
/** Contexts per process, and the largest ring (aio-max-nr's default is
 * 65536 events: 2 MiB), an image may ask for. */
export const AIO_LIMITS = { rings: 64, ringBytes: 4 << 20 };

interface Header {
  id: number;
  nr: number;
  head: number;
  tail: number;
  magic: number;
  compat: number;
  incompat: number;
  headerLength: number;
}

function header(b: Buffer): Header {
  return { id: b.readUInt32LE(0), nr: b.readUInt32LE(4), head: b.readUInt32LE(8), tail: b.readUInt32LE(12), magic: b.readUInt32LE(16), compat: b.readUInt32LE(20), incompat: b.readUInt32LE(24), headerLength: b.readUInt32LE(28) };
}

/** num_possible_cpus(), as the kernel sizes a context's batches by it. */
function possibleCpus(): number {
  let n = 0;
  for (const part of readFileSync('/sys/devices/system/cpu/possible', 'utf8').trim().split(',')) {
    const [a, b] = part.split('-').map(Number);
    n += b === undefined ? 1 : b - a + 1;
  }
  return n || 1;
}

/** Events a ring of `length` bytes holds. */
function eventsIn(length: number): number {
  return Math.floor((length - HEADER) / EVENT);
}

/** What io_setup is asked for to make a ring of `nr` events again: the
 * kernel doubles the request and adds 2 (and rounds up to pages, which `nr`
 * shows already). */
function requestFor(nr: number): number {
  return Math.max(1, Math.floor((nr - 2) / 2));
}

/** One iocb of `bytes` bytes (`opcode`: a read or a write) on `fd` at
 * `buf`, and `count` pointers to it, laid out at `at`: [iocb][pointers]. */
function dummyRequests(at: bigint, fd: number, buf: bigint, count: number, opcode = IOCB_CMD_PWRITE, bytes = 1n): Buffer {
  const b = Buffer.alloc(64 + 8 * count);
  b.writeUInt16LE(opcode, 16);
  b.writeUInt32LE(fd, 20);
  b.writeBigUInt64LE(buf, 24);
  b.writeBigUInt64LE(bytes, 32);
  for (let i = 0; i < count; i++) b.writeBigUInt64LE(at, 64 + 8 * i);
  return b;
}

/** A descriptor process `pid` holds that a request of no bytes completes
 * on at once and touches nothing, so that the probe opens none of its own
 * (one left open if appshot died meanwhile): a readable pipe or socket
 * (their reads return before looking at any data when asked for none: a
 * datagram is not consumed), a readable /dev/null or /dev/zero, else a
 * write-only /dev/null. undefined if it holds none. */
function quietDescriptor(pid: number): { fd: number; opcode: number } | undefined {
  let writeOnly: { fd: number; opcode: number } | undefined;
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const name of names) {
    const fd = Number(name);
    let flags: number;
    let target: string;
    let device = false;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${name}`);
      flags = parseInt(/^flags:\s*([0-7]+)$/m.exec(readFileSync(`/proc/${pid}/fdinfo/${name}`, 'utf8'))?.[1] ?? 'x', 8);
      if (target.startsWith('/')) {
        const st = statSync(`/proc/${pid}/fd/${name}`);
        device = st.isCharacterDevice() && QUIET_DEVICES.includes(st.rdev);
      }
    } catch {
      continue;
    }
    if (!Number.isInteger(flags) || flags & O_PATH) continue;
    const mode = flags & 3;
    if ((mode === 0 || mode === O_RDWR) && (/^(pipe|socket):\[\d+\]$/.test(target) || device)) return { fd, opcode: IOCB_CMD_PREAD };
    if (mode === O_WRONLY && device && (writeOnly === undefined || fd < writeOnly.fd)) writeOnly = { fd, opcode: IOCB_CMD_PWRITE };
  }
  return writeOnly;
}

/**
 * The AIO contexts of process `pid` (from its maps, read while frozen),
 * each checked idle by counting its free slots through `inj` (see above).
 */
export function dumpAioRings(pid: number, inj: Injector, maps: { start: bigint; end: bigint; perms: string; path: string }[], what: string): AioRing[] {
  const lines = maps.filter((l) => l.path.startsWith('/[aio]'));
  if (!lines.length) return [];
  const rings: AioRing[] = [];
  const where = (l: { start?: bigint; address?: bigint }) => `${what}: the AIO context (io_setup) at 0x${(l.start ?? l.address ?? 0n).toString(16)}`;
  for (const l of lines) {
    const length = Number(l.end - l.start);
    if (l.perms !== 'rw-s') throw new Unsupported(`${where(l)} is mapped ${l.perms}, not as the kernel maps it, which cannot be captured yet`);
    const h = header(addon().readMemory(pid, l.start, HEADER));
    if (h.magic !== AIO_RING_MAGIC || h.headerLength !== HEADER || h.nr !== eventsIn(length) || h.head >= h.nr || h.tail >= h.nr)
      throw new Unsupported(`${where(l)} has a ring header this kernel does not usually write (nr ${h.nr}, head ${h.head}, tail ${h.tail}), which cannot be captured`);
    rings.push({ address: l.start, length: BigInt(length), nrEvents: requestFor(h.nr), id: h.id, nr: h.nr, head: h.head, tail: h.tail, events: Buffer.alloc(0) });
  }
  rings.sort((a, b) => a.id - b.id);
  // Made again in this order, each takes the lowest free index: the
  // indices must be 0, 1, ... as they are.
  rings.forEach((r, i) => {
    if (r.id !== i) throw new Unsupported(`${what}: its AIO contexts have indices ${rings.map((x) => x.id).join(', ')} (one was destroyed before them), which a restore cannot give them again`);
  });
  for (const ring of rings) {
    const before = addon().readMemory(pid, ring.address, Number(ring.length));
    const unreaped = (ring.tail - ring.head + ring.nr) % ring.nr;
    const { taken, completed } = probe(pid, inj, ring, unreaped);
    if (completed)
      throw new Transient(`${where(ring)} had requests in flight: ${completed} completed while it was looked at, which cannot be captured`);
    // The kernel hands slots from the context's shared count to a CPU's
    // only `req_batch` at a time, and gives them back so: what is left
    // there below one batch can never be taken, and is the same amount
    // always (the count starts at nr - 1 and moves by whole batches).
    const batch = Math.max(1, Math.floor((ring.nr - 1) / (possibleCpus() * 4)));
    const inFlight = ring.nr - 1 - unreaped - taken - ((ring.nr - 1) % batch);
    if (inFlight > 0)
      throw new Unsupported(
        `${where(ring)} has ${inFlight} of its ${ring.nr - 1} request slots neither free nor holding a completed event: requests in flight (submitted, not completed), which live only in the kernel and cannot be captured`,
      );
    ring.events = before.subarray(HEADER);
  }
  return rings;
}

/**
 * Submits requests that complete at once into `ring` until the kernel
 * takes no more, on each CPU the thread may run on, twice over; then puts
 * the ring back (putBack) and the thread's CPU affinity. How many it took,
 * and how many of the application's own requests completed meanwhile.
 *
 * What it changes in the process is undone even if appshot is killed
 * (kill -9) meanwhile, which lets the process go on at once: the thread is
 * moved from CPU to CPU from here (not by calls injected into it), under a
 * guard, a process of appshot's that puts its affinity back if appshot
 * dies first (addon guardAffinity); the requests are made on a descriptor
 * the process holds already (quietDescriptor: nothing opened in it, so
 * nothing left open), and the ring is put back before the affinity. What
 * is not covered: appshot killed between the first request and putBack
 * leaves the probe's completed events in the ring for the application to
 * reap (putting the ring back takes copies only a live tracer, or code of
 * appshot's run inside the process, can make), and one killed inside an
 * injected call lets that thread go on in the call's registers (the
 * kernel resumes a tracee as its tracer dies, PTRACE_O_EXITKILL being set
 * only once a snapshot ends the application). A process with no such
 * descriptor gets a /dev/null of its own for the probe, left open if
 * appshot dies before it is closed.
 */
function probe(pid: number, inj: Injector, ring: AioRing, unreaped: number): { taken: number; completed: number } {
  const scratch = inj.scratchAddress;
  const tid = inj.tid;
  const quiet = quietDescriptor(pid);
  let fd: number;
  if (quiet) fd = quiet.fd;
  else {
    addon().writeMemory(pid, scratch, Buffer.from('/dev/null\0'));
    fd = Number(inj.call(NR.open, [scratch, O_WRONLY]));
    if (fd < 0) throw new Error(`opening /dev/null in the process to count the free slots of its AIO context: errno ${-fd}`);
  }
  const [opcode, bytes] = quiet?.opcode === IOCB_CMD_PREAD ? [IOCB_CMD_PREAD, 0n] : [IOCB_CMD_PWRITE, quiet ? 0n : 1n];
  // The kernel's own size of a mask (its result).
  const allowed = addon().schedAttributes(tid).affinity;
  const cpus: number[] = [];
  for (let c = 0; c < allowed.length * 8; c++) if (allowed[c >> 3] & (1 << (c & 7))) cpus.push(c);
  const per = Math.floor((inj.scratchSize - 64) / 8);
  // From here when this appshot may (a thread of another owner, appshot
  // without CAP_SYS_NICE: then neither may its guard), else inside.
  const pin = (mask: Buffer): boolean => {
    try {
      addon().setAffinity(tid, mask);
      return true;
    } catch {
      addon().writeMemory(pid, scratch, mask);
      return inj.call(NR.sched_setaffinity, [0, mask.length, scratch]) >= 0n;
    }
  };
  const guard = addon().guardAffinity(tid, allowed);
  let taken = 0;
  let completed = 0;
  try {
    try {
      for (let pass = 0; pass < 2; pass++)
        for (const cpu of cpus) {
          const one = Buffer.alloc(allowed.length);
          one[cpu >> 3] |= 1 << (cpu & 7);
          if (!pin(one)) continue;
          killPoint('snapshot: aio pinned');
          for (;;) {
            addon().writeMemory(pid, scratch, dummyRequests(scratch, fd, scratch, per, opcode, bytes));
            const got = inj.call(NR.io_submit, [ring.address, per, scratch + 64n]);
            if (got === BigInt(-EAGAIN) || got === 0n) break;
            if (got < 0n) throw new Error(`io_submit into the AIO context at 0x${ring.address.toString(16)}: errno ${-got}`);
            taken += Number(got);
            if (got < BigInt(per)) break;
          }
        }
    } finally {
      // However the probe ended (a failed call, a request of the
      // application's completing meanwhile): none of its events is left
      // for the application to reap.
      completed = putBack(pid, ring, unreaped, scratch);
      killPoint('snapshot: aio put back');
    }
  } finally {
    // The guard goes however the affinity's restore ends: kept, it would
    // act later on a TID that may be another thread's by then.
    try {
      pin(allowed);
    } finally {
      addon().releaseGuard(guard);
    }
    if (!quiet) inj.call(NR.close, [fd]);
  }
  return { taken, completed };
}

/** After the probe: the ring's events from its head to its tail now are
 * its `unreaped` ones, then the probe's (their iocb: `probeIocb`), mixed
 * with completions of the application's own requests if any were in
 * flight. The probe's are reaped: the others are written again in their
 * order so that they end at the tail, and the head moved to the first of
 * them. Returns how many of the application's own completed meanwhile. */
function putBack(pid: number, ring: AioRing, unreaped: number, probeIocb: bigint): number {
  const now = addon().readMemory(pid, ring.address, Number(ring.length));
  const tail = header(now).tail;
  if (tail >= ring.nr) throw new Error(`the AIO context at 0x${ring.address.toString(16)}: its tail became ${tail} of ${ring.nr} while it was probed`);
  const count = (tail - ring.head + ring.nr) % ring.nr;
  const kept: Buffer[] = [];
  let completed = 0;
  for (let i = 0; i < count; i++) {
    const at = HEADER + ((ring.head + i) % ring.nr) * EVENT;
    const event = now.subarray(at, at + EVENT);
    if (i >= unreaped) {
      if (event.readBigUInt64LE(8) === probeIocb) continue;
      completed++;
    }
    kept.push(event);
  }
  if (kept.length === count) return completed;
  const head = (tail - kept.length + ring.nr) % ring.nr;
  kept.forEach((event, i) => addon().writeMemory(pid, ring.address + BigInt(HEADER + ((head + i) % ring.nr) * EVENT), Buffer.from(event)));
  const h = Buffer.alloc(4);
  h.writeUInt32LE(head);
  addon().writeMemory(pid, ring.address + 8n, h);
  return completed;
}

/* ---- restore ---------------------------------------------------------- */

/** The process's AIO contexts, made again inside it at their addresses,
 * with their head, tail and unreaped events. After its memory (the
 * addresses are free: the image maps nothing there) and descriptors (a
 * /dev/null is opened and closed meanwhile). */
export function restoreAioRings(r: RemoteProcess, p: Process): void {
  for (const ring of p.aioRings ?? []) {
    const where = `process ${p.vpid}: the AIO context at 0x${ring.address.toString(16)}`;
    r.reset();
    const ctxp = r.put(Buffer.alloc(8));
    r.call(`${where}: io_setup(${ring.nrEvents})`, SYS.io_setup, [ring.nrEvents, ctxp]);
    const made = r.get(ctxp, 8).readBigUInt64LE(0);
    const h = header(addon().readMemory(r.pid, made, HEADER));
    if (h.nr !== ring.nr || h.id !== ring.id)
      throw new AppshotError(`${where}: io_setup(${ring.nrEvents}) made a ring of ${h.nr} events here (index ${h.id}), the image's has ${ring.nr} (index ${ring.id}): this machine's CPU count sizes rings differently`);
    const count = ring.tail >= ring.head ? ring.tail : ring.nr + ring.tail;
    if (count) {
      const fd = Number(r.call(`${where}: opening /dev/null`, SYS.open, [r.str('/dev/null'), O_WRONLY]));
      const per = Math.min(count, 256);
      const at = r.put(Buffer.alloc(64 + 8 * per));
      addon().writeMemory(r.pid, at, dummyRequests(at, fd, at, per));

      let done = 0;
      while (done < count) {
        const got = r.raw(SYS.io_submit, [made, Math.min(per, count - done), at + 64n]);
        if (got <= 0n) {
          // Slots come back as events are reaped: the head is moved on
          // below; no slot left with nothing to reap is a failure.
          throw new AppshotError(`${where}: bringing its tail to ${ring.tail} took ${done} requests of ${count}, then io_submit gave ${got}`);
        }
        done += Number(got);
        const head = Buffer.alloc(4);
        head.writeUInt32LE(Math.min(done, ring.head));
        addon().writeMemory(r.pid, made + 8n, head);
      }
      r.call(`${where}: closing /dev/null`, SYS.close, [fd]);
    }
    addon().writeMemory(r.pid, made + BigInt(HEADER), ring.events);
    const head = Buffer.alloc(4);
    head.writeUInt32LE(ring.head);
    addon().writeMemory(r.pid, made + 8n, head);
    const now = header(addon().readMemory(r.pid, made, HEADER));
    if (now.tail !== ring.tail) throw new AppshotError(`${where}: its tail is ${now.tail}, not ${ring.tail}`);
    const MREMAP_MAYMOVE = 1;
    const MREMAP_FIXED = 2;
    const moved = r.call(`${where}: moving its ring there`, SYS.mremap, [made, ring.length, ring.length, MREMAP_MAYMOVE | MREMAP_FIXED, ring.address]);
    if (moved !== ring.address) throw new AppshotError(`${where}: its ring moved to 0x${moved.toString(16)}`);
  }
}

/** An image's rings, as the restore relies on them (image/validate.ts). */
export function checkAioRings(p: Process, corrupt: (what: string) => never): void {
  const rings = p.aioRings ?? [];
  if (rings.length > AIO_LIMITS.rings) corrupt(`process ${p.vpid} has ${rings.length} AIO contexts (at most ${AIO_LIMITS.rings})`);
  rings.forEach((ring, i) => {
    const where = `process ${p.vpid}'s AIO context ${i}`;
    const length = Number(ring.length);
    if (!(length >= PAGE && length <= AIO_LIMITS.ringBytes && length % PAGE === 0) || ring.address % BigInt(PAGE) !== 0n || ring.address + ring.length > 0x7ffffffff000n || ring.address < BigInt(PAGE))
      corrupt(`${where} is ${ring.length} bytes at 0x${ring.address.toString(16)}`);
    if (ring.nr !== eventsIn(length) || ring.events.length !== length - HEADER || ring.head >= ring.nr || ring.tail >= ring.nr || ring.id !== i || ring.nrEvents !== requestFor(ring.nr))
      corrupt(`${where} has ${ring.nr} events, head ${ring.head}, tail ${ring.tail}, index ${ring.id}, ${ring.events.length} bytes of events, for a ring of ${length} bytes`);
    for (const v of p.vmas) if (v.start < ring.address + ring.length && ring.address < v.end) corrupt(`${where} overlaps a mapping`);
    // Each ring is moved onto its address with MREMAP_FIXED, which unmaps
    // whatever is there: an earlier ring too.
    rings.slice(0, i).forEach((other, j) => {
      if (other.address < ring.address + ring.length && ring.address < other.address + other.length) corrupt(`${where} overlaps its AIO context ${j}`);
    });
  });
}

/** What `inspect` says of them. */
export function describeAioRings(p: Process): string {
  return (p.aioRings ?? []).map((r) => `0x${r.address.toString(16)} (${r.nr} events, ${(r.tail - r.head + r.nr) % r.nr} completed not reaped)`).join(', ');
}
