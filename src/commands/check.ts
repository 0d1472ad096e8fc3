/**
 * `appshot check`: whether each kernel feature and privilege appshot uses
 * is there, found by trying it (as `criu check` does), never by the kernel
 * version: a container's seccomp profile, Yama, a missing capability or a
 * sysctl each take away what the version promises.
 *
 * The ptrace family is tried on a `sleep` that this command starts and
 * orphans, so that, as for a real snapshot, the tracee is not appshot's
 * descendant (Yama's ptrace_scope 1 allows only descendants). The rest is
 * tried on throwaway objects of this process (addon/src/probe.c).
 */
import type { Command } from 'commander';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { errnoName } from '../errors.js';
import { setExitCode } from '../engine/request.js';
import { printJson } from './json.js';

export interface Feature {
  /** Stable identifier (JSON, tests). */
  id: string;
  /** What was tried, in a few words. */
  what: string;
  /** Whether it works here. */
  present: boolean;
  /** Whether snapshot and restore cannot work at all without it. */
  core: boolean;
  /** The errno or value behind the answer. */
  detail: string;
  /** What appshot does without it. */
  without: string;
}

export interface CheckResult {
  schema: 'appshot.check/1';
  /** Every core feature is present: snapshot, restore, template and clone work. */
  core: boolean;
  features: Feature[];
}

const codeOf = (e: unknown) => String((e as NodeJS.ErrnoException)?.code ?? (e as Error)?.message ?? e);

function readSysctl(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** This process's effective capabilities, from /proc/self/status. */
function effectiveCaps(): bigint {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? BigInt('0x' + m[1]) : 0n;
}
const CAP_SETGID = 6;
const CAP_SETUID = 7;
const CAP_SETPCAP = 8;
const CAP_SYS_NICE = 23;
const CAP_SYS_PTRACE = 19;
const CAP_SYS_ADMIN = 21;
const CAP_SYS_RESOURCE = 24;
const CAP_CHECKPOINT_RESTORE = 40;
const has = (caps: bigint, cap: number) => ((caps >> BigInt(cap)) & 1n) === 1n;

/** A `sleep` whose parent has exited: not this process's descendant. */
function orphanSleep(): number | undefined {
  const r = spawnSync('/bin/sh', ['-c', 'sleep 30 </dev/null >/dev/null 2>&1 & echo $!'], { encoding: 'utf8', timeout: 10_000 });
  const pid = Number(r.stdout?.trim());
  if (!(Number.isInteger(pid) && pid > 0)) return undefined;
  // Probed once it is sleep, not the shell's fork still on its way there.
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep\0')) return pid;
    } catch {
      return undefined;
    }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
  }
  return pid;
}

/** The first mapping of `pid` with these permissions ('r-xp', 'rw-p'),
 * and if given this name ('[stack]'). */
function mappingOf(pid: number, perms: string, name?: string): bigint | undefined {
  for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const [range, p] = line.split(' ');
    if (p === perms && (name === undefined || line.trimEnd().endsWith(` ${name}`))) return BigInt('0x' + range.split('-')[0]);
  }
  return undefined;
}

type Outcome = { ok: boolean; detail: string };

/** Runs the ptrace-family probes on an orphaned sleep, then kills it. */
async function probeTracing(): Promise<Record<string, Outcome>> {
  const { addon } = await import('../native.js');
  const a = addon();
  const out: Record<string, Outcome> = {};
  const ids = ['ptrace_seize', 'ptrace_interrupt', 'ptrace_rseq', 'seccomp_filters', 'process_vm_readv', 'process_vm_writev', 'pidfd_getfd'];
  const pid = orphanSleep();
  if (!pid) {
    for (const id of ids) out[id] = { ok: false, detail: 'not tried: /bin/sh could not start a sleep to trace' };
    return out;
  }
  const attempt = (id: string, body: () => string | void) => {
    try {
      out[id] = { ok: true, detail: body() || 'works' };
    } catch (e) {
      out[id] = { ok: false, detail: codeOf(e) };
    }
  };
  try {
    // The memory and descriptor calls need ptrace access, not an attached
    // tracer: they are tried even if seizing fails.
    attempt('process_vm_readv', () => void a.readMemory(pid, mappingOf(pid, 'r-xp') ?? 0n, 16));
    attempt('process_vm_writev', () => {
      // The stack: the first writable mapping of the binary may be its
      // RELRO part, which the loader of a sleep just started makes
      // read-only at any moment (process_vm_writev then fails, EFAULT).
      const at = mappingOf(pid, 'rw-p', '[stack]') ?? mappingOf(pid, 'rw-p') ?? 0n;
      a.writeMemory(pid, at, a.readMemory(pid, at, 8)); // the same bytes back
    });
    attempt('pidfd_getfd', () => closeSync(a.getFd(pid, 0)));
    attempt('ptrace_seize', () => a.seize(pid, true));
    if (!out.ptrace_seize.ok) {
      for (const id of ['ptrace_interrupt', 'ptrace_rseq', 'seccomp_filters']) out[id] = { ok: false, detail: 'not tried: PTRACE_SEIZE failed' };
      return out;
    }
    attempt('ptrace_interrupt', () => {
      a.interrupt(pid);
      if (!a.wait(pid, 5000)) throw new Error('no stop within 5 s');
    });
    attempt('ptrace_rseq', () => void a.getRseq(pid));
    // The kernel checks the caller (CAP_SYS_ADMIN, not under seccomp)
    // before the tracee: EINVAL, 'it has no filter', means it let us ask.
    try {
      a.seccompFilters(pid);
      out.seccomp_filters = { ok: true, detail: 'works' };
    } catch (e) {
      const code = codeOf(e);
      out.seccomp_filters = code === 'EINVAL' ? { ok: true, detail: 'permitted (the tracee has no filter)' } : { ok: false, detail: code };
    }
    return out;
  } finally {
    // Seized with exit-kill, and killed anyway: it was started for this.
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
}

function probeDevShm(): Outcome {
  const path = `/dev/shm/appshot-check-${process.pid}`;
  try {
    const fd = openSync(path, 'wx', 0o600);
    writeSync(fd, 'x');
    closeSync(fd);
    return { ok: true, detail: 'writable' };
  } catch (e) {
    return { ok: false, detail: codeOf(e) };
  } finally {
    rmSync(path, { force: true });
  }
}

export async function check(): Promise<CheckResult> {
  const { addon } = await import('../native.js');
  const probe = (name: string): Outcome => {
    const e = addon().probeFeature(name);
    return e === 0 ? { ok: true, detail: 'works' } : { ok: false, detail: errnoName(e) };
  };
  const caps = effectiveCaps();
  const tracing = await probeTracing();
  const scope = readSysctl('/proc/sys/kernel/yama/ptrace_scope');
  const uffdSysctl = readSysctl('/proc/sys/vm/unprivileged_userfaultfd');
  const features: Feature[] = [];
  const add = (id: string, what: string, core: boolean, o: Outcome, without: string) =>
    features.push({ id, what, present: o.ok, core, detail: o.detail, without });

  // Yama: 0 lets a process trace any of its uid's; 1 and 2 only
  // descendants unless CAP_SYS_PTRACE; 3 nobody.
  const yamaOk = scope === undefined || scope === '0' || ((scope === '1' || scope === '2') && has(caps, CAP_SYS_PTRACE));
  add('ptrace_scope', 'Yama lets appshot trace processes that are not its children', true,
    { ok: yamaOk, detail: scope === undefined ? 'no Yama' : `kernel.yama.ptrace_scope=${scope}${has(caps, CAP_SYS_PTRACE) ? ', CAP_SYS_PTRACE' : ''}` },
    'nothing can be snapshotted: set kernel.yama.ptrace_scope=0, or run as root / with CAP_SYS_PTRACE');
  const noSnapshot = 'nothing can be snapshotted or restored';
  add('ptrace_seize', 'PTRACE_SEIZE of a process that is not a child', true, tracing.ptrace_seize, noSnapshot);
  add('ptrace_interrupt', 'PTRACE_INTERRUPT and the stop it reports', true, tracing.ptrace_interrupt, noSnapshot);
  add('ptrace_rseq', "PTRACE_GET_RSEQ_CONFIGURATION (each thread's rseq area)", true, tracing.ptrace_rseq, 'nothing can be snapshotted');
  add('process_vm_readv', 'process_vm_readv (reading memory)', true, tracing.process_vm_readv, 'nothing can be snapshotted');
  add('process_vm_writev', 'process_vm_writev (writing memory)', true, tracing.process_vm_writev, 'nothing can be restored');
  add('pidfd_getfd', "pidfd_open and pidfd_getfd (taking another process's descriptors)", true, tracing.pidfd_getfd, 'no descriptor can be captured or handed over: nothing can be snapshotted or restored');
  add('kcmp', 'kcmp KCMP_FILE (which descriptors share an open file)', true, probe('kcmp'), 'descriptors shared between processes cannot be told apart: snapshots would be wrong');
  add('memfd', 'memfd_create', true, probe('memfd'), 'shared anonymous memory cannot be restored');
  add('subreaper', "PR_SET_CHILD_SUBREAPER (an application's init adopts its orphans)", true, probe('subreaper'), 'no application can be run');
  add('dev_shm', '/dev/shm writable (the translation tables live there)', true, probeDevShm(), 'no application can be run');

  add('seccomp_filters', 'PTRACE_SECCOMP_GET_FILTER (needs CAP_SYS_ADMIN, and appshot itself not under seccomp)', false, tracing.seccomp_filters,
    'a process under a seccomp filter of its own is refused by name at snapshot (and left running)');
  const uffd = probe('userfaultfd');
  add('userfaultfd', 'userfaultfd, user-mode only, with asynchronous write protection (dirty tracking)', false,
    { ...uffd, detail: `${uffd.detail}${uffdSysctl !== undefined ? ` (vm.unprivileged_userfaultfd=${uffdSysctl}; user-mode-only needs no privilege)` : ''}` },
    'incremental and --pre-copy snapshots read all memory and compare it with the parent image (exact, slower)');
  add('pagemap_scan', 'PAGEMAP_SCAN ioctl on /proc/PID/pagemap' + (uffd.ok ? ', reading and re-arming write protection' : ''), false,
    probe(uffd.ok ? 'dirty_tracking' : 'pagemap_scan'),
    'incremental and --pre-copy snapshots read all memory and compare it with the parent image (exact, slower); a snapshot reads the page map of each mapping it stores on its own (a little slower)');
  add('tcp_repair', 'TCP_REPAIR on a socket (needs CAP_NET_ADMIN)', false, probe('tcp_repair'),
    'established TCP connections are refused by name; snapshot --tcp-close records them as closed');
  add('raw_socket', 'a raw IP socket (needs CAP_NET_RAW)', false, probe('raw_socket'),
    "a TCP connection in CLOSE_WAIT cannot be restored (the peer's FIN is sent again on a raw socket)");
  add('cap_sys_resource', 'CAP_SYS_RESOURCE in the effective set', false,
    { ok: has(caps, CAP_SYS_RESOURCE), detail: has(caps, CAP_SYS_RESOURCE) ? 'held' : 'not held' },
    "a hard limit above this user's own is refused at restore; the rest is restored");
  const ckpt = has(caps, CAP_CHECKPOINT_RESTORE) || has(caps, CAP_SYS_ADMIN);
  add('cap_checkpoint_restore', 'CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN in the effective set', false,
    { ok: ckpt, detail: has(caps, CAP_CHECKPOINT_RESTORE) ? 'CAP_CHECKPOINT_RESTORE held' : has(caps, CAP_SYS_ADMIN) ? 'CAP_SYS_ADMIN held' : 'neither held' },
    "a restored process's /proc/PID/exe names the seed; shared anonymous memory is read through the process's own mapping");
  const heldOrNot = (...wanted: [string, number][]) => {
    const missing = wanted.filter(([, c]) => !has(caps, c)).map(([n]) => n);
    return { ok: missing.length === 0, detail: missing.length ? `not held: ${missing.join(', ')}` : 'held' };
  };
  add('cap_setuid_setgid', 'CAP_SETUID and CAP_SETGID in the effective set', false, heldOrNot(['CAP_SETUID', CAP_SETUID], ['CAP_SETGID', CAP_SETGID]),
    "an image whose processes ran as another user, group or supplementary groups than this user's is refused at restore, naming the id; this user's own images restore");
  add('cap_setpcap', 'CAP_SETPCAP in the effective set', false, heldOrNot(['CAP_SETPCAP', CAP_SETPCAP]),
    "an image whose processes dropped capabilities from their bounding set, or set securebits, is refused at restore, naming them");
  add('cap_sys_nice', 'CAP_SYS_NICE in the effective set', false, heldOrNot(['CAP_SYS_NICE', CAP_SYS_NICE]),
    'a thread under SCHED_DEADLINE is refused at restore; the real-time policies and nice values within RLIMIT_RTPRIO and RLIMIT_NICE restore');
  const zstd = spawnSync('zstd', ['--version'], { encoding: 'utf8', timeout: 10_000 });
  add('zstd', 'the zstd program (on PATH)', false,
    { ok: zstd.status === 0, detail: zstd.status === 0 ? zstd.stdout.trim().replace(/^\*\*\* /, '').split(',')[0] : codeOf(zstd.error ?? `exit ${zstd.status}`) },
    '-o X.tar.zst and restoring a .tar.zst are refused, naming the program; .tar, .tar.gz and image directories work');
  const sysv = ['sysv_sem', 'sysv_shm', 'sysv_msg'].map((n) => [n.slice(5), probe(n)] as const);
  const sysvFailed = sysv.filter(([, o]) => !o.ok);
  add('sysv_ipc', 'SysV semaphores, shared memory and message queues (IPC_PRIVATE, then removed)', false,
    { ok: sysvFailed.length === 0, detail: sysvFailed.length ? sysvFailed.map(([n, o]) => `${n}: ${o.detail}`).join(', ') : 'works' },
    'applications that use SysV IPC fail at their own semget/shmget/msgget; the others run');
  return { schema: 'appshot.check/1', core: features.every((f) => !f.core || f.present), features };
}

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description('try each kernel feature and privilege appshot uses, and say what works without the missing ones')
    .option('--json', 'machine-readable output: {schema, core, features: [{id, what, present, core, detail, without}]}')
    .addHelpText(
      'after',
      '\nEach feature is tried for real (a sleep this command starts and orphans is traced, its memory\n' +
        'read and written back; a socket, a userfaultfd, SysV objects are made and removed), never\n' +
        "judged by the kernel's version. Nothing is left behind.\n\n" +
        'Exit status: 0 if every core feature works (snapshot, restore, template and clone can run);\n' +
        '1 if one is missing (it is marked CORE). A missing optional feature only takes away what its\n' +
        'line says.\n\nExamples:\n  appshot check\n  appshot check --json | jq \'.features[] | select(.present | not)\'',
    )
    .action(async (opts: { json?: boolean }) => {
      const result = await check();
      if (opts.json) printJson('check', result);
      else {
        const { printColumns } = await import('../inspect.js');
        printColumns(
          ['', 'FEATURE', 'WHAT', 'DETAIL'],
          result.features.map((f) => [f.present ? 'ok' : f.core ? 'MISSING' : 'missing', f.id, f.what, f.detail]),
        );
        const missing = result.features.filter((f) => !f.present);
        if (missing.length) process.stdout.write('\nwithout them:\n' + missing.map((f) => `  ${f.id}${f.core ? ' (CORE)' : ''}: ${f.without}\n`).join(''));
        process.stderr.write(
          result.core
            ? `appshot: the core works here${missing.length ? `; ${missing.length} optional feature${missing.length > 1 ? 's' : ''} missing` : ''}\n`
            : `appshot: missing for the core: ${missing.filter((f) => f.core).map((f) => f.id).join(', ')}\n`,
        );
      }
      if (!result.core) setExitCode(1);
    });
}
