/**
 * Wait calls in flight: a thread that called wait4(-1), waitid(P_ALL) and
 * the like, whose call may have reaped a child on this node by the time the
 * snapshot froze it, before the preload library translated the child's
 * system PID. Restored, that PID is one of the old node's: the thread must
 * translate it through the old node's PIDs, not this node's tables (where
 * it names nothing, or another process). How the thread tells the cases
 * apart is in addon/include/appshot_table.h ("Wait calls across a
 * restore"); here the image carries the tables' wait slots, and a restore
 * (or a clone) writes them, with the image's PIDs as the previous node's,
 * into the new tables before any restored process runs.
 */
import type { Image, WaitSlot } from '../image/types.js';
import { addon, type TablesSnapshot } from '../native.js';

const THREAD_FLAG = 0x2;
/** APPSHOT_WAIT_SLOTS and APPSHOT_WAIT_OUT (appshot_table.h). */
export const WAIT_SLOTS = 128;
export const WAIT_OUT = 144;

/** The slots held by threads of the image (a thread killed in its call
 * leaves its slot behind until the preload library takes it back). */
export function dumpWaits(image: Image, tables: TablesSnapshot): WaitSlot[] {
  const vtids = new Set(image.processes.flatMap((p) => [p.vpid, ...p.threads.map((t) => t.vtid)]));
  return (tables.waits ?? [])
    .filter((w) => vtids.has(w.holder))
    .map((w) => ({ slot: w.slot, holder: w.holder, moved: w.moved, out: Buffer.from(w.out), carried: Buffer.from(w.carried) }));
}

/** Into the new tables at `tablesPath`: the image's slots, and its
 * processes' PIDs as the previous node's. Nothing when no call was in
 * flight. */
export function restoreWaits(image: Image, tablesPath: string): void {
  const waits = image.waits ?? [];
  if (!waits.length) return;
  const prior = (image.tables.find((t) => t.kind === 'pid')?.entries ?? [])
    .filter((e) => !(e.flags & THREAD_FLAG))
    .map((e) => ({ virtual: e.virtual, system: e.system }));
  addon().carryWaits(
    tablesPath,
    waits.map((w) => ({ ...w, out: Buffer.from(w.out), carried: Buffer.from(w.carried) })),
    prior,
  );
}

/** What validate.ts checks of an image's slots: the restore writes them
 * into the tables that every restored process maps. */
export function checkWaits(image: Image, corrupt: (why: string) => never): void {
  const waits = image.waits ?? [];
  const vtids = new Set(image.processes.flatMap((p) => [p.vpid, ...p.threads.map((t) => t.vtid)]));
  const slots = new Set<number>();
  for (const w of waits) {
    if (!(Number.isInteger(w.slot) && w.slot >= 0 && w.slot < WAIT_SLOTS) || slots.has(w.slot)) corrupt(`wait slot ${w.slot} is out of range or repeated`);
    slots.add(w.slot);
    if (!vtids.has(w.holder)) corrupt(`wait slot ${w.slot} is held by ${w.holder}, no thread of the image`);
    if (w.out.length !== WAIT_OUT || w.carried.length !== WAIT_OUT) corrupt(`wait slot ${w.slot} is not ${WAIT_OUT} bytes`);
  }
}
