/**
 * The kernel's SysV objects by key, and the system keys an application's
 * virtual keys map to: what the keyed-create tests (keyedkill, keyedrmid)
 * find an application's objects by, whether or not its tables name them,
 * and nobody else's (other test files make objects meanwhile).
 */
import { readFileSync } from 'node:fs';

export type SysvKind = 'sem' | 'shm' | 'msg';

/** /proc/sysvipc/KIND: each key's object ids. */
export function objectsByKey(kind: SysvKind): Map<number, number[]> {
  const byKey = new Map<number, number[]>();
  for (const line of readFileSync(`/proc/sysvipc/${kind}`, 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 3) continue;
    const key = Number(cols[0]) | 0; // printed as a signed int
    byKey.set(key, [...(byKey.get(key) ?? []), Number(cols[1])]);
  }
  return byKey;
}

/** appshot_system_key (appshot_table.c), written again here: the system
 * key of virtual key `vkey` at try `attempt`, for an application's salt. */
export function systemKey(salt: bigint, vkey: number, attempt: number): number {
  const M = (1n << 64n) - 1n;
  let x = (salt ^ (BigInt(vkey >>> 0) << 20n) ^ ((BigInt(attempt) * 0x9e3779b97f4a7c15n) & M)) & M;
  x ^= x >> 30n;
  x = (x * 0xbf58476d1ce4e5b9n) & M;
  x ^= x >> 27n;
  x = (x * 0x94d049bb133111ebn) & M;
  x ^= x >> 31n;
  const k = Number(BigInt.asIntN(32, x));
  return k === 0 || k === -1 ? 0x41505053 : k;
}
