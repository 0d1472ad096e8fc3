/**
 * Cloning (FIG. 9): new instances stamped from a template, each under its
 * own AID, each resource handled by its verdict:
 *  - copy-on-write: memory is mapped privately from the template's page
 *    file (every clone shares the template's pages in the page cache until
 *    it writes); a file is read where it is until the instance writes it,
 *    then from the instance's private copy (the preload library's
 *    composite view);
 *  - duplicate: the instance gets its own copy now;
 *  - virtualize: PIDs, SysV ids and keys get new system objects bound to
 *    the template's virtual ids (every restore does this);
 *  - multiplex: a TCP port is shared by all instances (SO_REUSEPORT);
 *  - allocate: a TCP port of its own from the registry, bound to the
 *    template's fixed one in the instance's port table;
 *  - REDIR PATH and SET ENV are evaluated for the instance;
 *  - and a clone is a new instance, not a copy: it gets an identity of its
 *    own, its IDENTITY hooks run once it resumed (resources/identity.ts),
 *    and memory is handled as a fork child's (resources/memory.ts).
 */
import { accessSync, closeSync, constants as fsConstants, existsSync, lstatSync, mkdirSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { copyPrivately, copyUnder } from './copies.js';
import { hostname } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomBytes } from 'node:crypto';
import { AppshotError, ExitCode } from '../errors.js';
import { PARTS } from '../image/format.js';
import { type Action, FdKind, type Image, type Process, VmaKind } from '../image/types.js';
import { addon, type InstanceConfig } from '../native.js';
import { signalProcesses } from '../inspect.js';
import { checkAid, isPrivateRootName, type LocalRegistry, type PortBinding } from '../registry.js';
import { applicationEnv } from '../harness.js';
import { cloneIdentity, runIdentityHooks, withIdentityEnv } from '../resources/identity.js';
import { checkPrivileges, type InstancePlan, restore, RESTORE_INTERRUPTED } from '../restore/driver.js';
import { verifyImage } from '../restore/verify.js';
import { rebasedRedirs } from './privatetmp.js';
import { lexists, type MadeDir, redirected, removeWalked, unredirected } from '../resources/paths.js';
import { fsIdentity, identitiesFor, refusal, refusedAsProcess } from '../resources/fsident.js';
import { identityHooks, instanceConfig, privateCopyPath, type Property } from './rules.js';
import { openTemplate, type OpenedTemplate, PRIVATE_DIR } from './template.js';
import { killPoint } from '../killpoint.js';
import type { ByteProgress } from '../progress.js';
import { anyHeld, clonePoolOf, giveUpAll, makeRoomFor } from './pool.js';
import { isShortOfRoom, tasksChanged } from './room.js';

export interface CloneOptions {
  /** The AID, or with count > 1 the prefix of AIDs AID-1 ... AID-N. */
  aid?: string;
  count: number;
  /** Checksum the template's page file too (it was when the template was
   * made; its size is always checked). */
  verify?: boolean;
  /** Aborted (Ctrl-C, SIGTERM): no more instances are made, and those made
   * go, as after a failure. */
  signal?: AbortSignal;
  /** Told after each instance the bytes of memory made so far: each
   * instance has the template's whole page data, mapped or copied. */
  progress?: ByteProgress;
  /** Made now, not taken from the engine's pool of instances held ready
   * (pool.ts): `clone --no-prepared`, APPSHOT_CLONE_POOL=0. */
  noPrepared?: boolean;
}

/** The one line an interrupted clone ends with (with how many instances
 * made before it were removed). */
export const CLONE_INTERRUPTED = 'interrupted: no instance was left';

export interface CloneResult {
  aid: string;
  instance: number;
  /** The template it was stamped from and its number, as ps shows it. */
  template: { path: string; instance: number };
  processes: number;
  threads: number;
  /** Time inside appshot for this instance: its plan, ports and restore. */
  cloneMs: number;
  /** Its restore's injected system calls and batches of them: each one
   * stop of the process, a round trip through the scheduler (see
   * RestoreResult.injectedCalls). */
  injectedCalls: number;
  ports: PortBinding[];
  /** Where its private copies of files go. */
  privateRoot: string;
  /** Directories made for its REDIR PATH targets. */
  createdDirs: MadeDir[];
  /** Made ahead of the clone and held ready by the engine (pool.ts): its
   * cloneMs is then the time from its release on (injectedCalls are still
   * those its making took, ahead of time). */
  prepared?: true;
}

/** An AID for an instance of `t` when none was asked for: the template's
 * name and a random part (also the pool's, pool.ts: its instances are
 * named as the ones made on demand). */
export function generatedAid(reg: LocalRegistry, t: OpenedTemplate, taken: Set<string> = new Set()): string {
  const base = t.template.name.replace(/[^A-Za-z0-9_.-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 50) || 'clone';
  for (;;) {
    const aid = `${base}-${randomBytes(3).toString('hex')}`;
    if (!taken.has(aid) && !reg.get(aid)) return aid;
  }
}

function instanceAids(reg: LocalRegistry, t: OpenedTemplate, opts: CloneOptions): string[] {
  const n = opts.count;
  if (opts.aid !== undefined) {
    const aids = n === 1 ? [opts.aid] : Array.from({ length: n }, (_, i) => `${opts.aid}-${i + 1}`);
    aids.forEach(checkAid);
    return aids;
  }
  const aids = new Set<string>();
  while (aids.size < n) aids.add(generatedAid(reg, t, aids));
  return [...aids];
}

/** A batch of clones that committed, then failed at a step after: every
 * instance of `cloned` exists, is registered and runs (see the clone's
 * catch). */
export class ClonedWithError extends AppshotError {
  constructor(
    message: string,
    readonly cloned: CloneResult[],
  ) {
    super(message, ExitCode.afterCommit);
  }
}

/** Nothing outside appshot listens on `port` (IPv4 wildcard). */
function portIsFree(port: number): boolean {
  try {
    const fd = addon().listenSocket({ family: 2, type: 1, address: '0.0.0.0', port, backlog: 1, reuseaddr: false, reuseport: false, v6only: false });
    closeSync(fd);
    return true;
  } catch {
    return false;
  }
}

/** The ports an instance listens on, per the template's verdicts. */
function planPorts(reg: LocalRegistry, aid: string, t: OpenedTemplate): { own: Map<number, number>; bindings: PortBinding[] } {
  const own = new Map<number, number>();
  const bindings: PortBinding[] = [];
  for (const v of t.template.verdicts) {
    if (!v.ref.startsWith('port:')) continue;
    const port = Number(v.ref.slice(5));
    if (v.action === 'allocate') {
      const system = reg.allocatePort(aid, portIsFree);
      own.set(port, system);
      bindings.push({ virtual: port, system, mode: 'allocate' });
    } else if (v.action === 'multiplex') {
      bindings.push({ virtual: port, system: port, mode: 'multiplex' });
    }
  }
  return { own, bindings };
}

/** The most instances one clone call makes (`clone --count`, the API's
 * count): beyond, an internal error rather than a refusal (fuzz33 L1). */
export const MAX_CLONES = 100_000;

/** FILE ... DUPLICATE (step 406): the instance's own copy of the file or
 * directory, made now, and the path redirected to it. */
function duplicateFiles(t: OpenedTemplate, privateRoot: string): InstanceConfig['redirs'] {
  const out: InstanceConfig['redirs'] = [];
  for (const rule of t.rules?.resources ?? []) {
    if (rule.kind !== 'file' || rule.action !== 'duplicate' || typeof rule.match !== 'string' || rule.match === '*') continue;
    const copy = privateCopyPath(t.rules!, rule, privateRoot);
    // Inherited from a template made of a clone, or copied now, as the
    // application's user has it (copies.ts).
    if (!lexists(copy) && lexists(rule.match)) copyUnder(privateRoot, rule.match, copy, 'the file of a FILE ... DUPLICATE rule');
    out.push({ kind: 'path', from: rule.match, to: copy });
  }
  return out;
}

/** A template made of a clone holds what that clone had written in its
 * private copies, not in the files they shadow (taken into the template
 * when it was made): each new instance starts with copies of those, and
 * reads the rest from the originals. */
function inheritPrivateCopies(t: OpenedTemplate, privateRoot: string): void {
  const layer = join(t.path, PRIVATE_DIR);
  // Not signed, and written by whoever could write the template's
  // directory: copied as copies.ts allows, never followed through a link.
  if (lexists(layer)) {
    if (!lstatSync(layer).isDirectory()) throw new AppshotError(`template ${t.path}: its private copies (${PRIVATE_DIR}) are not a directory`);
    mkdirSync(dirname(privateRoot), { recursive: true });
    copyPrivately(layer, privateRoot, "the template's private copy");
  }
}

const { O_RDONLY, O_RDWR, O_NONBLOCK, O_NOCTTY, O_DIRECTORY } = fsConstants;
const O_ACCMODE = 3;
const O_PATH = 0o10000000;
const O_CLOEXEC = 0o2000000;
const O_NOFOLLOW = 0o400000;

/** A file of the template that the restore will copy to a REDIR PATH
 * target of this instance (resources/context.ts clonePath), and how its
 * process will open the copy. */
interface RedirCopy {
  original: string;
  target: string;
  p: Process;
  flags: number;
  what: string;
}

/** The copies of the template's files that this instance's REDIR PATH
 * targets get from its restore: a descriptor's file, a shared writable
 * mapping's, a working directory, each redirected to a target that is not
 * there yet (one that is there is used as it is). */
function redirCopies(image: Image, redirs: InstanceConfig['redirs']): RedirCopy[] {
  const found = new Map<string, RedirCopy>();
  const add = (original: string, p: Process, flags: number, what: string) => {
    const target = redirected(redirs, unredirected(image.instance?.redirs ?? [], original));
    if (target !== undefined && !found.has(target) && !lexists(target)) found.set(target, { original, target, p, flags, what });
  };
  for (const p of image.processes) {
    for (const fd of p.fds)
      if (fd.kind === FdKind.FILE && fd.path && fd.path !== image.tablesPath && fd.path !== image.logPath && !image.files[fd.file]?.deleted && !fd.procVpid)
        // A symbolic link held itself: the link, not what it names.
        add(fd.path, p, image.files[fd.file]?.linkTarget !== undefined ? O_PATH | O_NOFOLLOW : fd.flags & O_ACCMODE, `process ${p.vpid} fd ${fd.fd}: ${fd.path}`);
    for (const v of p.vmas) if (v.kind === VmaKind.FILE_SHARED && v.prot & 2) add(v.path, p, O_RDWR, `process ${p.vpid} mapping of ${v.path}`);
    if (!p.cwdProcVpid && !p.cwd.endsWith(' (deleted)')) add(p.cwd, p, O_PATH | O_DIRECTORY, `process ${p.vpid}: working directory ${p.cwd}`);
  }
  return [...found.values()];
}

/** Root makes an instance's copies of the template's files at its REDIR
 * PATH targets: each original is first opened as its process will open
 * the copy, so that what the process may not open is refused before
 * anything was copied anywhere (fuzz33 M3: a root-only file was copied to
 * the target, then the process refused, and the copy left); then opened
 * for reading as the process, and that descriptor kept in `sources` (by
 * target) for the restore to copy from (resources/paths.ts privateCopy):
 * the name is never opened again, by root or anyone (review: a symlink to
 * a root-only file swapped in between the check and root's open had root
 * copy it where the process reads). The caller closes them. */
function checkRedirCopies(image: Image, copies: RedirCopy[], sources: Map<string, number>): void {
  for (const c of copies) {
    const who = identitiesFor(image, c.p);
    let fd: number;
    try {
      fd = addon().openAs(c.original, c.flags | O_NONBLOCK | O_CLOEXEC, 0, who);
    } catch (e) {
      // Missing or otherwise not opened: the restore says what it is.
      if (!refusal(e)) continue;
      refusedAsProcess(e, c.what, fsIdentity(c.p));
    }
    closeSync(fd);
    try {
      // A directory (a working directory) too: its entries are read
      // beneath it, as the process (paths.ts copyDirectory).
      // A symbolic link as the link (its text read by paths.ts copyLink).
      sources.set(c.target, addon().openAs(c.original, c.flags & O_NOFOLLOW ? c.flags | O_CLOEXEC : O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, 0, who));
    } catch (e) {
      if (!refusal(e)) continue;
      refusedAsProcess(e, `${c.what}, copied for the instance,`, fsIdentity(c.p), 'read');
    }
  }
}

/** The directories a REDIR PATH target leads into can be made by this
 * cloner (resources/paths.ts prepareRedirTargets makes them next): the
 * first that is there must be a directory it may write. Checked before
 * any is made, so that a target it cannot make is one line naming it, not
 * Node's "EACCES: permission denied, mkdir '...'" (fuzz33 L7), and no
 * other target's directory was made first. */
function checkRedirTargetsMakeable(redirs: InstanceConfig['redirs']): void {
  for (const r of redirs) {
    if (r.kind !== 'path') continue;
    let isDir = false;
    try {
      isDir = statSync(r.from).isDirectory();
    } catch {
      /* not there: only the target's parent is made */
    }
    const leaf = isDir ? r.to : dirname(r.to);
    let at = leaf;
    while (!lexists(at) && at !== dirname(at)) at = dirname(at);
    if (at === leaf) continue;
    const refused = (why: string) => new AppshotError(`cannot make REDIR PATH target ${leaf === r.to ? r.to : `${r.to}'s directory ${leaf}`}: ${why}`, ExitCode.denied);
    let st;
    try {
      st = statSync(at);
    } catch (e) {
      throw refused(`${at}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
    if (!st.isDirectory()) throw refused(`${at} is not a directory`);
    try {
      accessSync(at, fsConstants.W_OK | fsConstants.X_OK);
    } catch (e) {
      throw refused(`${at} is not a directory this user may write (${(e as NodeJS.ErrnoException).code ?? 'refused'})`);
    }
  }
}

/** The REDIR PATH copies each instance made (by its CloneResult): a batch
 * that fails after it was made removes them with it (discard). */
const redirCopiesOf = new WeakMap<CloneResult, string[]>();

/** Removes the REDIR PATH copies a failed instance `aid` made itself (its
 * restore made them, none was there: paths.ts privateCopy claims a
 * target only where nothing is), so that a refused clone leaves none
 * behind; but not one another instance leads into (a clone racing for
 * the same target that found this one's copy and uses it: registry.ts
 * releaseRedirCopies). */
function removeRedirCopies(reg: LocalRegistry, made: string[], aid: string): void {
  reg.releaseRedirCopies(made, [aid]);
}

/** Ends an instance this batch made: its processes are killed, init
 * removes its tables, SysV objects and registration, and its ports go back
 * to the registry. */
async function discard(reg: LocalRegistry, made: CloneResult): Promise<void> {
  const aid = made.aid;
  const record = reg.get(aid);
  if (record) signalProcesses(reg, record, 'SIGKILL');
  for (let i = 0; i < 200 && reg.get(aid); i++) {
    const r = reg.get(aid);
    if (r && reg.isStale(r)) reg.release(r);
    await sleep(25);
  }
  for (const p of made.ports) if (p.mode === 'allocate') reg.releasePort(p.system, aid);
  removeWalked(made.privateRoot);
  removeRedirCopies(reg, redirCopiesOf.get(made) ?? [], aid);
  reg.releaseRedirTargets(made.createdDirs, [aid]);
}

const now = () => Number(process.hrtime.bigint() / 1000n) / 1000;

/** One instance to make: its AID, its number in its batch, the commit
 * file its init waits for, and (the engine's pool, pool.ts) a hold. */
export interface InstanceStart {
  aid: string;
  instance: number;
  commitPath: string;
  /** Awaited once its processes are made and stopped, before any runs
   * (RestoreOptions.hold): the pool keeps it so until a clone takes it. */
  hold?: () => Promise<boolean>;
  /** Aborted (CloneOptions.signal): its restore is given up at its next
   * safe point, what it made removed (restore/driver.ts opts.signal). */
  signal?: AbortSignal;
}

/** An instance made and resumed, not yet committed: its lifeline is the
 * batch's to close once it has committed. */
export interface MadeInstance {
  made: CloneResult;
  lifeline: number;
  /** Its evaluated SET ENV and identity variables (for its IDENTITY hooks). */
  env: string[];
  props: Record<Property, string>;
}

/**
 * Makes one instance of `t` (rules applied: ports, REDIR PATH, SET ENV,
 * DUPLICATE copies, a fresh identity) and resumes it, uncommitted. What it
 * made goes if it fails. The same for an instance made on demand and for
 * one the engine holds ahead of a clone (pool.ts), so that the two cannot
 * differ.
 */
export async function makeInstance(reg: LocalRegistry, t: OpenedTemplate, s: InstanceStart): Promise<MadeInstance> {
  const started = now();
  const { aid } = s;
  const actions = new Map<string, Action>(t.template.verdicts.map((v) => [v.ref, v.action]));
  // A directory of this instance's own, even if an earlier instance had
  // its AID: a snapshot of that one still needs its copies.
  const privateRoot = join(reg.home, 'instances', `${aid}.${randomBytes(4).toString('hex')}`);
  let ports: ReturnType<typeof planPorts> | undefined;
  // Copies made at REDIR PATH targets outside the private root (by this
  // instance, not found made): removed if this instance fails.
  const copies: string[] = [];
  // The originals of those copies, opened as their processes.
  const sources = new Map<string, number>();
  const props: Record<Property, string> = { 'application-id': aid, instance: String(s.instance), hostname: hostname(), template: t.template.name };
  try {
    ports = planPorts(reg, aid, t);
    const evaluated = t.rules ? instanceConfig(t.rules, props, privateRoot) : { redirs: [], env: [] };
    // The template's application ran with a private /tmp: so does each
    // clone, on its own copy of it (inheritPrivateCopies).
    evaluated.redirs.push(...rebasedRedirs(t.loaded.image.instance, privateRoot, evaluated.redirs));
    const identity = cloneIdentity(t.loaded.image, t.rules);
    const config = { ...evaluated, env: withIdentityEnv(evaluated.env, identity), identity };
    const plan: InstancePlan = {
      action: (ref) => actions.get(ref),
      config,
      ports: ports.own,
      privateRoot,
      redirSources: sources,
      redirCopyMade: (target) => {
        copies.push(target);
        // Where a test has another clone take a copy this one made, then
        // this one's restore fail (test/redircopy.test.ts).
        killPoint('clone: redir copy made');
      },
      record: { rules: t.template.rules, template: { path: t.path, instance: s.instance }, privateRoot, ports: ports.bindings, ...(s.hold ? { heldReady: true } : {}) },
      prepare: () => {
        inheritPrivateCopies(t, privateRoot);
        config.redirs.push(...duplicateFiles(t, privateRoot));
        checkRedirTargetsMakeable(config.redirs);
        checkRedirCopies(t.loaded.image, redirCopies(t.loaded.image, config.redirs), sources);
        // Where a test swaps an original for a symlink to a file only
        // root may read (test/redircopy.test.ts): what is copied is what
        // was opened here.
        killPoint('clone: redir copies checked');
      },
    };
    // A held instance's time is from its release on: what a clone waited
    // for it.
    let released = started;
    const hold = s.hold;
    const r = await restore(reg, t.path, {
      aid,
      lazy: true,
      instance: plan,
      loaded: t.loaded,
      privilegesChecked: true,
      batchCommit: s.commitPath,
      ...(s.signal ? { signal: s.signal } : {}),
      ...(hold
        ? {
            hold: async () => {
              const go = await hold();
              released = now();
              return go;
            },
          }
        : {}),
    });
    // Its init and threads, which the user's task count (room.ts), reused
    // for a second, has not seen start (a held one's are counted by the
    // pool once held).
    if (!hold) tasksChanged(r.threads + 1);
    const made: CloneResult = {
      aid,
      instance: s.instance,
      template: { path: t.path, instance: s.instance },
      processes: r.processes,
      threads: r.threads,
      cloneMs: now() - released,
      injectedCalls: r.injectedCalls,
      ports: ports.bindings,
      privateRoot,
      createdDirs: r.createdDirs,
      ...(hold ? { prepared: true } : {}),
    };
    redirCopiesOf.set(made, copies);
    return { made, lifeline: r.lifeline!, env: config.env, props };
  } catch (e) {
    for (const p of ports?.bindings ?? []) if (p.mode === 'allocate') reg.releasePort(p.system, aid);
    rmSync(privateRoot, { recursive: true, force: true });
    removeRedirCopies(reg, copies, aid);
    throw e;
  } finally {
    for (const fd of sources.values()) closeSync(fd);
  }
}

export async function clone(reg: LocalRegistry, templatePath: string, opts: CloneOptions): Promise<CloneResult[]> {
  if (!(Number.isInteger(opts.count) && opts.count >= 1)) throw new AppshotError(`--count '${opts.count}': expected a whole number of at least 1`, ExitCode.usage);
  const opened = now();
  const t = await openTemplate(templatePath, opts.verify ?? false);
  const debug = (what: string, since: number) => process.env.APPSHOT_DEBUG && process.stderr.write(`clone: ${what} ${(now() - since).toFixed(2)} ms\n`);
  debug('template opened in', opened);
  const results: CloneResult[] = [];
  // The batch commits as one: until its file exists, each instance's init
  // kills it if we die (see appshot-init), and our lifelines to them stay
  // open. Made once an instance is made here (one taken from the pool
  // has a commit file of its own: see the commit below).
  let batchCommit: string | undefined;
  const commitPath = () => (batchCommit ??= reg.newCommitPath());
  // The commit files of the instances taken from the pool (pool.ts).
  const heldCommits: string[] = [];
  const lifelines: number[] = [];
  // Set by the batch's commit: from then on its instances are kept.
  let committed = false;
  // Instances of the engine's pool are named as generated AIDs are: only
  // a clone without --aid takes them.
  const pool = opts.aid === undefined && !opts.noPrepared ? clonePoolOf(reg, t) : undefined;
  try {
    // Checked once for the whole batch: the node, and the files it maps
    // (but for a clone's private copies, which the template carries).
    const layer = t.loaded.image.instance?.privateRoot;
    // (Only under a directory shaped as a clone's own: a crafted image's
    // "/" would have every mapped file go unchecked.)
    const carried = layer && isPrivateRootName(layer) && existsSync(join(t.path, PRIVATE_DIR)) ? (path: string) => path.startsWith(layer + '/') : undefined;
    const verifying = now();
    verifyImage(t.loaded.image, carried);
    debug('node and mapped files checked in', verifying);
    // Those of instances made here (one taken from the pool has its own).
    const aids = instanceAids(reg, t, opts);
    // The privilege rule too: the same image and user for every instance.
    try {
      checkPrivileges(t.loaded.image);
    } catch (e) {
      if (e instanceof AppshotError) throw new AppshotError(`cannot clone ${t.path} as '${aids[0]}': ${e.message}`, e.exitCode);
      throw e;
    }
    pool?.demand(opts.count);
    const perInstance = t.loaded.digests.get(PARTS.pages)?.size ?? 0;
    opts.progress?.bytes(0, opts.count * perInstance);
    for (let i = 0; i < opts.count; i++) {
      // A turn of the event loop, so that a signal that came in is seen.
      if (opts.signal) await new Promise((resolve) => setImmediate(resolve));
      if (opts.signal?.aborted) throw new AppshotError(CLONE_INTERRUPTED, ExitCode.interrupted);
      killPoint(`clone: instance ${i + 1}`);
      const started = now();
      // Held ready by the engine (pool.ts): let go on.
      const taken = pool ? await pool.take(i + 1) : undefined;
      let m: MadeInstance;
      if (taken) {
        m = taken;
        heldCommits.push(taken.commitPath);
        debug(`instance ${i + 1} taken from the pool in`, started);
      } else {
        const aid = aids[i];
        const existing = reg.get(aid);
        if (existing && !reg.isStale(existing)) throw new AppshotError(`AID '${aid}' is already registered`, ExitCode.conflict);
        // Held instances give up their room if this one needs it (the
        // pools shrink rather than the clone fail: pool.ts makeRoomFor),
        // and if it failed for want of descriptors or processes all the
        // same, every held instance goes and it is made once more: under
        // the same AID and batch commit file, so only once nothing of
        // the first attempt is left under that AID (the restore's failure
        // waits for its registration to be released, for a while: one
        // still there whose processes are all gone is released here, as
        // a stale one is before the first attempt; one that still runs,
        // or says how it ended, stands, and so does the failure). Its
        // ports and private copies went with it (makeInstance), and the
        // commit file, the batch's, was never its own to remove.
        await makeRoomFor(t, pool, opts.count);
        const start = { aid, instance: i + 1, commitPath: commitPath(), signal: opts.signal };
        try {
          m = await makeInstance(reg, t, start);
        } catch (e) {
          if (!isShortOfRoom(e) || !anyHeld()) throw e;
          const left = reg.get(aid);
          if (left && reg.settle(left) !== undefined) throw e;
          await giveUpAll('a clone ran short of descriptors or processes');
          m = await makeInstance(reg, t, start);
        }
        debug(`instance ${i + 1} made in`, started);
      }
      lifelines.push(m.lifeline);
      results.push(m.made);
      // Once it runs: a hook that fails fails the batch, and this instance
      // goes with the others made (it is in `results`).
      if (t.rules?.identity.hooks.length) {
        const record = reg.require(m.made.aid);
        const env = { ...applicationEnv(record), ...Object.fromEntries(m.env.map((e) => [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)])) };
        await runIdentityHooks(identityHooks(t.rules, m.props), t.loaded.image, record, env, t.rules.source);
      }
      opts.progress?.bytes((i + 1) * perInstance, opts.count * perInstance);
    }
    // One file commits the batch: the batch's own, or the first pool
    // instance's if every instance came from the pool. The other pool
    // instances' commit files become links to it (init follows them), so
    // that the batch still commits as one, by one rename.
    const committing = now();
    const target = batchCommit ?? heldCommits[0];
    for (const p of heldCommits) {
      if (p === target) continue;
      await reg.forgetCommit(p);
      symlinkSync(basename(target), p);
    }
    await reg.commitReady(target);
    // The last point where an interrupted batch is given up (as each
    // instance's restore is, at its own safe points): after it, kept.
    if (opts.signal?.aborted) throw new AppshotError(CLONE_INTERRUPTED, ExitCode.interrupted);
    killPoint('clone: committing');
    reg.commit(target);
    committed = true;
    killPoint('clone: committed');
    debug('committed in', committing);
    // Made ahead by the pool: registered when it was made, by the engine.
    // Now as one made by this command (ps's CREATED).
    const adopting = now();
    if (pool) await Promise.all(results.filter((r) => r.prepared).map((r) => pool.adopt(r.aid)));
    if (pool) debug('registrations of the pool instances updated in', adopting);
    return results;
  } catch (e) {
    // Committed, then a step failed: every instance exists, registered and
    // running, and init keeps it whatever befalls us (appshot killed here
    // leaves them all). Killing them would not undo the commit, only say
    // "removed" of instances that were whole; so they are kept, as a
    // restore failing after its commit keeps its application, and the
    // failure said apart (ExitCode.afterCommit) with the AIDs that exist.
    if (committed) {
      const aids = results.map((r) => r.aid);
      throw new ClonedWithError(
        `cloned ${t.path} as ${aids.map((a) => `'${a}'`).join(', ')}, ${aids.length === 1 ? 'which runs and is registered' : `all ${aids.length} running and registered`}, but a step after the batch's commit failed: ${(e as Error).message}`,
        results,
      );
    }
    // An instance's restore given up (opts.signal): the batch's line.
    if (e instanceof AppshotError && e.message === RESTORE_INTERRUPTED) e = new AppshotError(CLONE_INTERRUPTED, ExitCode.interrupted);
    // All or nothing: the instances this batch made go too. Their lifelines
    // end first: the batch will never commit, and each init, seeing that,
    // kills its instance and leaves its registration to be released.
    for (const fd of lifelines.splice(0)) closeSync(fd);
    if (batchCommit) await reg.forgetCommit(batchCommit);
    for (const p of heldCommits) {
      await reg.forgetCommit(p);
      rmSync(p, { force: true });
    }
    for (const made of results) await discard(reg, made);
    if (results.length && e instanceof AppshotError)
      throw new AppshotError(`${e.message} (${results.length === 1 ? 'the instance made before it was' : `the ${results.length} instances made before it were`} removed)`, e.exitCode);
    throw e;
  } finally {
    for (const fd of lifelines) closeSync(fd);
    t.loaded.dispose();
    // Refilled once the command has answered (pool.ts).
    pool?.done();
  }
}
