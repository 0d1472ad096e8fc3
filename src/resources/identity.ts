/**
 * Identity: what makes each clone an instance of its own rather than a copy
 * of its template (DESIGN.md: "A clone keeps its virtual PID"; Firecracker
 * calls shared randomness the main pitfall of cloning). Its faces:
 *
 *  - dump: the tables' identity section goes into the image
 *    (Image.instance.identity; snapshot driver) and a plain restore gives it
 *    back unchanged: the same instance, the same random numbers to come;
 *  - clone: a new identity (128 random bits, generation + 1), which the
 *    preload library notices on a process's next draw from glibc's
 *    generators and reseeds them (addon/preload/preload_identity.c); the
 *    variables APPSHOT_CLONE_GENERATION and APPSHOT_INSTANCE; then the
 *    rules' IDENTITY HOOKs, once, after the instance resumed;
 *  - classify: what every clone of a template would still share, with the
 *    rule that would fix it (sharedState), for `template create` and `show`.
 *
 * Memory marked MADV_WIPEONFORK or MADV_DONTFORK is memory's to handle
 * (memory.ts, forkTreatment).
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { AppshotError } from '../errors.js';
import { plural } from '../words.js';
import { FdKind, type Identity, type Image, virtualPort, VmaKind } from '../image/types.js';
import { addon } from '../native.js';
import type { AppRecord } from '../registry.js';
import type { IdentityHook, RulesFile } from '../template/rules.js';

/** The variables an instance's processes find their identity in. */
export const GENERATION_VAR = 'APPSHOT_CLONE_GENERATION';
export const INSTANCE_VAR = 'APPSHOT_INSTANCE';

/** An application `appshot run` started, or an image older than identities. */
export const ORIGINAL: Identity = { id: '0'.repeat(32), generation: 0, reseedLibc: 'seeded', libcSeeded: false };

/** The identity of a new clone of `image`, under `rules`. */
export function cloneIdentity(image: Image, rules: RulesFile | undefined): Identity {
  const template = image.instance?.identity ?? ORIGINAL;
  return {
    id: randomBytes(16).toString('hex'),
    generation: template.generation + 1,
    reseedLibc: rules?.identity.libc?.reseed ?? 'seeded',
    // The processes are the template's: what they seeded, they seeded.
    libcSeeded: template.libcSeeded,
  };
}

/** `env` (evaluated SET ENV) with the clone's identity variables, which no
 * rule may set otherwise: getenv() in the running processes sees them
 * (environBlock) and every exec inherits them (the tables' instance section). */
export function withIdentityEnv(env: string[], identity: Identity): string[] {
  const ours = (e: string) => e.startsWith(`${GENERATION_VAR}=`) || e.startsWith(`${INSTANCE_VAR}=`);
  return [...env.filter((e) => !ours(e)), `${GENERATION_VAR}=${identity.generation}`, `${INSTANCE_VAR}=${identity.id}`];
}

/** How long an IDENTITY HOOK EXEC may take before the clone is given up. */
const HOOK_TIMEOUT_MS = 30_000;

/**
 * Runs the IDENTITY hooks in a clone that has just resumed, in the order
 * written: SIGNAL to the application's first process (its system PID from
 * the tables), EXEC as `appshot exec` would run it, its output in the
 * instance's log. A hook that cannot run or fails fails the clone: an
 * instance whose identity was not renewed is not the unique one asked for.
 */
export async function runIdentityHooks(hooks: IdentityHook[], image: Image, record: AppRecord, env: NodeJS.ProcessEnv, source: string): Promise<void> {
  for (const hook of hooks) {
    const where = `IDENTITY HOOK at ${source}:${hook.line}`;
    if (hook.kind === 'signal') {
      const first = image.processes[0]?.vpid;
      const pid = addon().readTables(record.tables).tables.pid.find((e) => e.virtual === first)?.system;
      if (!pid) throw new AppshotError(`${where}: the application's first process (virtual PID ${first}) is gone`);
      // Through the check every signal from the tables goes through.
      if (!addon().signalMember(pid, hook.signal, record.initPid ?? 0, record.tables))
        throw new AppshotError(`${where}: cannot send ${hook.name} to process ${first}: it is not the application's`);
    } else {
      await execHook(hook.argv, record, env, where, hookIdentity(image));
    }
  }
}

/** Who an EXEC hook runs as: the application's first process's effective
 * uid and gid (no supplementary groups), when appshot runs as root. A
 * hook is the application's own step, written in its rules, which an
 * image or a template can carry: run as root, it had root's rights over
 * a nobody application's clone (fuzz33 H2). An ordinary user's hooks run
 * as that user, as its application does. */
function hookIdentity(image: Image): { uid: number; gid: number } | undefined {
  if (process.geteuid?.() !== 0) return undefined;
  const c = image.processes[0]?.threads[0]?.creds ?? image.processes[0]?.creds;
  return c ? { uid: c.uid[1], gid: c.gid[1] } : undefined;
}

function execHook(argv: string[], record: AppRecord, env: NodeJS.ProcessEnv, where: string, as: { uid: number; gid: number } | undefined): Promise<void> {
  const log = openSync(record.logPath!, 'a');
  return new Promise<void>((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', log, log], env, cwd: record.cwd, ...(as ?? {}) });
    const timer = setTimeout(() => child.kill('SIGKILL'), HOOK_TIMEOUT_MS);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new AppshotError(`${where}: cannot run ${argv[0]}: ${e.message}`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new AppshotError(`${where}: ${argv[0]} ${signal ? `was killed by ${signal}` : `exited with ${code}`}${signal === 'SIGKILL' ? ` (given ${HOOK_TIMEOUT_MS / 1000} s)` : ''}`));
    });
  }).finally(() => closeSync(log));
}

/* ---- classify: what every clone would share ------------------------------ */

/** Libraries whose mapped presence says the process holds secrets that a
 * copy of its memory would share, and what of theirs it would be. */
const SECRET_LIBRARIES: { match: RegExp; what: string }[] = [
  { match: /\/libssl\.so[^/]*$/, what: 'libssl is loaded: TLS session ticket keys and session caches would be the same in every clone' },
  { match: /\/libcrypto\.so[^/]*$/, what: "libcrypto is loaded: OpenSSL's random generator state would be the same in every clone (it reseeds after a fork, which a clone never went through)" },
  { match: /\/libgnutls\.so[^/]*$/, what: 'libgnutls is loaded: its random generator state and session ticket keys would be the same in every clone' },
  { match: /\/libsodium\.so[^/]*$/, what: "libsodium is loaded: keys it holds in memory would be the same in every clone" },
];

/** One piece of state every clone of a template would share. */
export interface SharedState {
  /** What is shared, and why it matters. */
  what: string;
  /** The rule (or action) that would make it each clone's own, if any. */
  fix: string;
  /** Whether the template's rules already see to it. */
  handled: boolean;
}

/**
 * What every clone of `image` would share with the others and with the
 * template, as far as the image tells cheaply: glibc's generator seeded by
 * the application, listening sockets, libraries known to hold secrets,
 * memory the kernel wipes or drops in a fork (handled: as fork does).
 */
export function sharedState(image: Image, rules: RulesFile | undefined): SharedState[] {
  const out: SharedState[] = [];
  const hooks = rules?.identity.hooks ?? [];
  const renewal = hooks.length
    ? `the IDENTITY hooks (${rules!.source}:${hooks.map((h) => h.line).join(', ')}) are trusted to renew it`
    : 'IDENTITY HOOK SIGNAL <sig> (or HOOK EXEC "/cmd") to have each clone renew it';
  const libc = rules?.identity.libc?.reseed ?? 'seeded';
  if (image.instance?.identity?.libcSeeded) {
    out.push({
      what: "glibc's random()/rand() generator was seeded by the application: every clone would draw the same numbers",
      fix: libc === 'never' ? 'remove IDENTITY KEEP LIBC (the default reseeds it), or IDENTITY RESEED LIBC' : `reseeded in every clone (${libc === 'always' ? 'IDENTITY RESEED LIBC' : 'the default'})`,
      handled: libc !== 'never',
    });
  } else if (libc === 'always') {
    out.push({ what: "glibc's random()/rand() generator, at its default seed", fix: 'reseeded in every clone (IDENTITY RESEED LIBC)', handled: true });
  }
  const ports = new Set<number>();
  for (const p of image.processes)
    for (const fd of p.fds)
      if (fd.kind === FdKind.TCP_LISTEN && fd.socket) ports.add(virtualPort(image, fd.socket.port));
  for (const port of ports)
    out.push({
      what: `a socket listening on TCP port ${port}: clients of one clone may reach another (one accept queue for a multiplexed port)`,
      fix: `PORT ${port} ALLOCATE gives each clone a port of its own`,
      handled: rules?.resources.some((r) => r.kind === 'port' && r.action === 'allocate' && (r.match === port || r.match === '*')) ?? false,
    });
  const libraries = new Set(image.processes.flatMap((p) => p.vmas.filter((v) => v.kind === VmaKind.FILE_PRIVATE).map((v) => v.path)));
  for (const lib of SECRET_LIBRARIES)
    if ([...libraries].some((path) => lib.match.test(path))) out.push({ what: lib.what, fix: renewal, handled: hooks.length > 0 });
  const marked = (flag: string) => image.processes.reduce((n, p) => n + p.vmas.filter((v) => v.vmFlags.includes(flag)).length, 0);
  if (marked('wf')) out.push({ what: `${plural(marked('wf'), 'mapping')} marked MADV_WIPEONFORK`, fix: 'zero in every clone, as in a fork child', handled: true });
  if (marked('dc')) out.push({ what: `${plural(marked('dc'), 'mapping')} marked MADV_DONTFORK`, fix: 'absent from every clone, as from a fork child', handled: true });
  return out;
}
