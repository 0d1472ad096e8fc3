/**
 * System calls caught blocked with a system id of the old node in their
 * arguments: the preload library translated the program's virtual id and
 * the kernel was waiting on it (waitpid(vpid) as wait4(syspid),
 * waitpid(-vpgid), waitid(P_PID or P_PGID), clock_nanosleep on the CPU-time
 * clock of another process or thread). A restore restarts the call
 * with the registers the image holds, so the call would wait on whatever
 * has that number on the new node: ECHILD (which the library's retry
 * mends), or worse, another child or group that has it here. The restore
 * rewrites the argument to the new node's id of the same virtual id
 * before the thread resumes.
 *
 * msgsnd and msgrcv blocked on a queue are restarted too (a stop ends
 * them with ERESTARTNOHAND): their queue id is rewritten the same way,
 * else the call fails with EINVAL here, or waits on another application's
 * queue that has the old number. semop and semtimedop are never restarted
 * by the kernel (the freezer's interrupt makes them fail with EINTR at
 * once, as a stop signal does): caught so, with no handled signal behind
 * it, the restore makes them again (threads.ts, resumeRegisters), with
 * their semaphore set's id rewritten the same way.
 *
 * A clock_nanosleep until an absolute time is restarted as it was called
 * (ERESTARTNOHAND); one for a relative time restarts through the kernel's
 * own restart state, which a restore does not have: it is made again for
 * its time left, or its full request (threads.ts, resumeRegisters), and
 * its clock needs nothing.
 *
 * Only an id the image's tables map is rewritten (one the program got from
 * a raw system call, outside the library, is left as it was).
 */
import type { Image } from '../image/types.js';
import { addon, type Kind } from '../native.js';

/** Offsets in x86-64 struct user_regs_struct. */
const REG = { rax: 10 * 8, rsi: 13 * 8, rdi: 14 * 8, origRax: 15 * 8 } as const;
const ERESTART = new Set([-512n, -513n, -514n, -516n]);
const NR = { wait4: 61n, waitid: 247n, msgsnd: 69n, msgrcv: 70n, clock_nanosleep: 230n, semop: 65n, semtimedop: 220n } as const;
const EINTR = -4n;
const P_PID = 1n;
const P_PGID = 2n;

/** How the id sits in its argument: as it is, as -pgid (wait4's process
 * group), or inside a CPU-time clock (~id << 3 and three low bits, the
 * kernel's encoding; id 0 is the caller, low bits 3 a descriptor's clock). */
type Encoding = 'plain' | 'negated' | 'cpuclock';
const decode = (raw: number, how: Encoding) => (how === 'negated' ? -raw : how === 'cpuclock' ? ~(raw >> 3) : raw);
const encode = (id: number, raw: number, how: Encoding) => (how === 'negated' ? -id : how === 'cpuclock' ? (~id << 3) | (raw & 7) : id);

/** Where the call's id is, of which kind, and how encoded. */
function idArgument(regs: Buffer): { at: number; kind: Kind; how: Encoding } | undefined {
  const nr = regs.readBigInt64LE(REG.origRax);
  const a0 = BigInt.asIntN(32, regs.readBigInt64LE(REG.rdi));
  switch (nr) {
    case NR.wait4:
      if (a0 > 0n) return { at: REG.rdi, kind: 'pid', how: 'plain' };
      if (a0 < -1n) return { at: REG.rdi, kind: 'pid', how: 'negated' };
      return undefined;
    case NR.waitid: {
      const type = regs.readBigInt64LE(REG.rdi);
      return type === P_PID || type === P_PGID ? { at: REG.rsi, kind: 'pid', how: 'plain' } : undefined;
    }
    // msgsnd and msgrcv end with ERESTARTNOHAND on a stop: restarted.
    case NR.msgsnd:
    case NR.msgrcv:
      return a0 >= 0n ? { at: REG.rdi, kind: 'msgid', how: 'plain' } : undefined;
    // semop and semtimedop end with EINTR on a stop: made again.
    case NR.semop:
    case NR.semtimedop:
      return a0 >= 0n ? { at: REG.rdi, kind: 'semid', how: 'plain' } : undefined;
    case NR.clock_nanosleep:
      if (a0 < 0n && (a0 & 3n) !== 3n && decode(Number(a0), 'cpuclock') !== 0) return { at: REG.rdi, kind: 'pid', how: 'cpuclock' };
      return undefined;
  }
  return undefined;
}

/** This node's system id of the process (or SysV object) that had system
 * id `old` on the image's node: through the image's tables to the virtual
 * id, then through the new tables, read only once something asks. */
export class IdsAcrossRestore {
  private oldToVirtual?: Map<Kind, Map<number, number>>;
  private virtualToNew?: Map<Kind, Map<number, number>>;

  constructor(
    private readonly image: Image,
    private readonly tablesPath: string,
  ) {}

  /** undefined: the image's tables do not map `old` (not the
   * application's); else the new id (undefined too if none here). */
  now(kind: Kind, old: number): number | undefined {
    this.oldToVirtual ??= new Map(this.image.tables.map((t) => [t.kind as Kind, new Map(t.entries.map((e) => [e.system, e.virtual]))]));
    const vid = this.oldToVirtual.get(kind)?.get(old);
    if (vid === undefined) return undefined;
    if (!this.virtualToNew) {
      const tables = addon().readTables(this.tablesPath).tables;
      this.virtualToNew = new Map(Object.entries(tables).map(([k, entries]) => [k as Kind, new Map(entries.map((e) => [e.virtual, e.system]))]));
    }
    return this.virtualToNew.get(kind)?.get(vid);
  }
}

/** `regs` with a blocked call's id made this node's (a copy), or `regs`
 * itself when there is nothing to rewrite. */
export function retargetBlockedCall(regs: Buffer, ids: IdsAcrossRestore): Buffer {
  const rax = regs.readBigInt64LE(REG.rax);
  if (regs.readBigInt64LE(REG.origRax) < 0n || !(ERESTART.has(rax) || rax === EINTR)) return regs;
  const arg = idArgument(regs);
  if (!arg) return regs;
  const raw = Number(BigInt.asIntN(32, regs.readBigInt64LE(arg.at)));
  const old = decode(raw, arg.how);
  const now = ids.now(arg.kind, old);
  if (now === undefined || now === old) return regs;
  const out = Buffer.from(regs);
  out.writeBigInt64LE(BigInt(encode(now, raw, arg.how)), arg.at);
  return out;
}
