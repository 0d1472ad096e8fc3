/**
 * Who holds what a command claims before an application does: a port
 * claimed for an instance not yet registered with it (or whose
 * registration is gone), a registration whose supervisor has not started,
 * a temporary directory being written. Such a claim lives as long as its
 * holder does, and is taken back by the next command that looks once the
 * holder is gone.
 *
 * In a CLI process the holder is the process (PID and start time): killed,
 * it is gone. In the resident engine many commands run in one process that
 * outlives them all, so the holder is the request: the engine makes a
 * lease file, $APPSHOT_HOME/engine/leases/NAME, when a request starts and removes
 * it when the request ends, however it ends (server.ts). A request's claim
 * is held while the engine's process lives and the lease file exists.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { isSameProcess, readStat } from './procfs.js';
import { currentRequest } from './engine/request.js';

export interface Holder {
  pid: number;
  startTime: number;
  /** The engine's request (its lease's name), when run by the engine. */
  request?: string;
}

let selfStart: number | undefined;

/** The holder of what the running command claims now. */
export function currentHolder(): Holder {
  selfStart ??= readStat(process.pid)?.startTime ?? 0;
  const lease = currentRequest()?.lease;
  return { pid: process.pid, startTime: selfStart, ...(lease ? { request: lease } : {}) };
}

export const leasesDir = (home: string) => join(home, 'engine', 'leases');

/** A lease name, as the engine makes them (and only such names are looked
 * up: a claim file's text is not trusted to name a path). */
export const LEASE_NAME = /^[0-9a-f]{16}$/;

export function newLeaseName(): string {
  return randomBytes(8).toString('hex');
}

/** Whether `h` still holds its claims: its process lives and, for an
 * engine's request, the request has not ended. */
export function holderAlive(h: Holder, home: string): boolean {
  if (!isSameProcess(h.pid, h.startTime || undefined)) return false;
  if (h.request === undefined) return true;
  return LEASE_NAME.test(h.request) && existsSync(join(leasesDir(home), h.request));
}

/** A registration's fields naming the command that made it. */
export function harnessOf(h: Holder): { harnessPid: number; harnessStartTime: number; harnessRequest?: string } {
  return { harnessPid: h.pid, harnessStartTime: h.startTime, ...(h.request ? { harnessRequest: h.request } : {}) };
}

/** Notes, for an engine's request, an AID it registered or a port it
 * claimed, to be looked at when it ends. Nothing in a CLI process. */
export function noteHeld(kind: 'aid' | 'port', id: string | number): void {
  const r = currentRequest();
  if (!r?.lease) return;
  r.held ??= { aids: new Set(), ports: new Set() };
  if (kind === 'aid') r.held.aids.add(String(id));
  else r.held.ports.add(Number(id));
}

/** "PID START" or "PID START REQUEST", as claim files hold it. */
export function formatHolder(h: Holder): string {
  return h.request ? `${h.pid} ${h.startTime} ${h.request}` : `${h.pid} ${h.startTime}`;
}

export function parseHolder(words: string[]): Holder {
  const [pid, startTime, request] = words;
  return { pid: Number(pid), startTime: Number(startTime), ...(request ? { request } : {}) };
}

/** A part of a name that no other command, in this process or another,
 * uses at the same time: the PID alone is not, in the engine. */
export function uniqueTag(): string {
  return `${process.pid}-${randomBytes(4).toString('hex')}`;
}
