/**
 * Test helpers: run the real appshot CLI on real programs. Each test file
 * gets its own APPSHOT_HOME, so files can run in parallel and leave nothing
 * in the developer's registry.
 */
import { type ChildProcess, spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { connect } from 'node:net';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..');
export const cli = join(root, 'bin', 'appshot.js');
/** The command `appshot` as npm installs it (bin/appshot): the native
 * client, which hands a command to the resident engine without starting
 * Node and runs bin/appshot.js itself for whatever it does not hand over
 * (run, exec, stdin...; no engine running; APPSHOT_ENGINE=off). What users
 * run, and ~100-200 ms less per command than a Node start. */
export const command = join(root, 'bin', 'appshot');
export const fixture = (name: string) => join(root, 'test', 'fixtures', 'bin', name);

/** One row of `appshot table --json`. */
export interface Entry {
  virtual: number;
  system: number;
  /** By name: init, thread, has-threads, reserved (a keyed create under way). */
  flags: string[];
  owner: number;
}

export interface Result {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** The output of `appshot args... --json` (json, jsonAsync), which must
 * have succeeded. */
function parseJsonResult<T>(args: string[], r: Result): T {
  if (r.code !== 0) throw new Error(`appshot ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** The range clones in tests are allocated ports from. */
/** The nobody user, and a command prefix that runs the rest as nobody
 * (no groups, no inheritable capabilities): an unprivileged application
 * for a root restorer. */
export const NOBODY = 65534;
export const asNobody = ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', '--'];

export const TEST_PORTS = '30000-32000';

export class Sandbox {
  /** The state directory, made when first asked for: a file whose tests a
   * -t run filters out never makes it, where a mkdtempSync at collection
   * left it behind (the afterAll that removes it does not run then). */
  get home(): string {
    return (this.madeHome ??= mkdtempSync(join(tmpdir(), 'appshot-test-')));
  }
  private madeHome: string | undefined;
  /** Clones' ports come from a range of their own (30000-32000): the
   * tests listen on fixed ports below it, which an allocation from the
   * default range could take first. Each test file has its own range,
   * disjoint from the others' (files run at once):
   *   16000-16799 api              16800-16999 serve-engine
   *   17000-17999 serve-prepared
   *   18000-18999 serve-standby
   *   19000-19999 serve-hold       20000-20999 serve (its busy server 20000-20979 too)
   *   21000-21999 redis            22000-23702 atomic
   *   23710-23799 clone-many
   *   23800-23999 lifecycle2       24000-25999 etcd
   *   26000-26504 servers          26505-26599 serve-listenopts
   *   26600-26699 tcp, unprivileged (fixed)
   *   26700-26999 uniqueness       27100-27899 web
   *   27000-27099 engine-pool      27900-27999 serve-listenreset
   *   28000-29998 template         32100-32599 servers (more)
   *   32600-32699 serve-clonecrash 32700-32799 serve-sigterm
   *   62000-62099 serve-stop (above the ephemeral range)
   */
  // CI empty: the commands print what a person off a terminal sees (no
  // progress lines), whether or not the suite itself runs under CI;
  // test/output.test.ts sets it where it tests that.
  // APPSHOT_CLONE_POOL=0: no clones held ready by the engine. Each clone
  // served would otherwise be made again in the background (a batch of 8,
  // eight more restores) for a minute nobody clones; engine-pool.test.ts
  // tests the pool with it on. A clone is the same either way (its tests).
  get env(): NodeJS.ProcessEnv {
    return (this.builtEnv ??= { ...this.startEnv, CI: '', APPSHOT_HOME: this.home, APPSHOT_PORTS: TEST_PORTS, APPSHOT_CLONE_POOL: '0' });
  }
  private builtEnv: NodeJS.ProcessEnv | undefined;
  /** The environment as the sandbox was made (a test may set a variable
   * in process.env for an in-process call before the first command). */
  private readonly startEnv = { ...process.env };
  private readonly started: ChildProcessWithoutNullStreams[] = [];

  /** Runs `appshot args...` to completion (bin/appshot, as installed). */
  run(args: string[], input?: string | Buffer): Result {
    const r = spawnSync(command, args, { env: this.env, input, encoding: 'utf8', timeout: 50_000 });
    return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
  }

  json<T = unknown>(args: string[]): T {
    return parseJsonResult<T>(args, this.run([...args, '--json']));
  }

  /** An application's log ('' before it has one). */
  log(aid: string): string {
    try {
      return readFileSync(join(this.home, 'apps', aid, 'log'), 'utf8');
    } catch {
      return '';
    }
  }

  /** Waits for `n` more "CHECK" lines of a self-checking fixture, and
   * fails on a "FAIL" line. */
  async checksPass(aid: string, n = 5): Promise<void> {
    const checks = () => (this.log(aid).match(/^CHECK \d+$/gm) ?? []).length;
    const from = checks();
    // A bound on a hung fixture, not a rate: one that touches a gigabyte
    // before its first check takes tens of seconds on a loaded machine.
    await waitFor(() => checks() >= from + n || /FAIL/.test(this.log(aid)), 60_000, `${n} more self-checks of ${aid}`);
    const failed = /^FAIL.*$/m.exec(this.log(aid));
    if (failed) throw new Error(`${aid}: ${failed[0]}`);
  }

  /** json(), without blocking the event loop (runAsync). */
  async jsonAsync<T = unknown>(args: string[]): Promise<T> {
    return parseJsonResult<T>(args, await this.runAsync([...args, '--json']));
  }

  /** `appshot args...`, which must succeed: its standard output. */
  ok(args: string[]): string {
    const r = this.run(args);
    if (r.code !== 0) throw new Error(`appshot ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  }

  /** The system PID of an application's process, by virtual PID (2: the
   * first process under its init). */
  systemPid(aid: string, vpid = 2): number {
    return this.json<{ processes: { vpid: number; pid: number }[] }[]>(['ps', aid])[0].processes.find((p) => p.vpid === vpid)!.pid;
  }

  /** SIGHUP to a fixture's first process makes it use (and check) its
   * objects once more and print EXERCISED; fails on a "FAIL" line.
   * `what`: what it is waited for, in the timeout's message. */
  async exercised(aid: string, what: string): Promise<void> {
    const count = () => (this.log(aid).match(/^EXERCISED$/gm) ?? []).length;
    const before = count();
    process.kill(this.systemPid(aid), 'SIGHUP');
    await waitFor(() => count() > before || /FAIL/.test(this.log(aid)), 15_000, `${aid} ${what}`);
    const failed = /^FAIL.*$/m.exec(this.log(aid));
    if (failed) throw new Error(`${aid}: ${failed[0]}`);
  }

  /** `appshot args...` as run() does, without blocking the event loop;
   * killed after `timeoutMs`. */
  async runAsync(args: string[], timeoutMs = 50_000): Promise<Result> {
    const r = await spawnAsync(command, args, { env: this.env, timeout: timeoutMs });
    return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
  }

  /** Starts `appshot args...` and returns a handle to talk to it.
   * `appshot serve` runs in its own process (--foreground), as the serve
   * files were written for (they look at its process), unless
   * TEST_SERVE=hosted: then as the CLI runs it by default, hosted by the
   * resident engine (serve-engine.test.ts tests that mode itself). */
  start(args: string[], env: Record<string, string> = {}): Running {
    if (args[0] === 'serve' && (env.TEST_SERVE ?? process.env.TEST_SERVE) !== 'hosted' && !args.includes('--foreground')) args = [...args, '--foreground'];
    const child = spawn(process.execPath, [cli, ...args], { env: { ...this.env, ...env } });
    this.started.push(child);
    return new Running(child);
  }

  /** The AIDs of this sandbox's applications that have not ended: an
   * ended one keeps its registration (with the file "exit" that its init
   * wrote once nothing of it was left in the kernel) until `appshot rm`. */
  aids(): string[] {
    return this.allAids().filter((aid) => !existsSync(join(this.home, 'apps', aid, 'exit')));
  }

  /** Every AID registered in this sandbox, ended ones too. */
  allAids(): string[] {
    try {
      return readdirSync(join(this.home, 'apps')).filter((aid) => !aid.startsWith('.'));
    } catch {
      return [];
    }
  }

  /** Table files of this sandbox's registry still in /dev/shm (named by a
   * hash of the registry's real path, as the registry does). */
  shmFiles(): string[] {
    const tag = createHash('sha256').update(realpathSync(this.home)).digest('hex').slice(0, 8);
    return readdirSync('/dev/shm').filter((f) => f.startsWith(`appshot-${tag}-`));
  }

  async dispose(): Promise<void> {
    if (this.madeHome === undefined) return; // never used
    // One command for all: a file that leaves dozens running would spend
    // its hook's minute starting one CLI per application on a loaded
    // machine. One by one only if that fails (one of them went meanwhile).
    // Not spawnSync: a worker blocked for a minute misses its vitest RPC's
    // answer ("Timeout calling onTaskUpdate", which fails the run).
    const aids = this.aids();
    if (aids.length && (await this.runAsync(['stop', ...aids, '--signal', 'KILL'])).code !== 0)
      for (const aid of this.aids()) await this.runAsync(['stop', aid, '--signal', 'KILL']);
    for (const c of this.started) if (c.exitCode === null) c.kill('SIGKILL');
    await waitFor(() => this.aids().length === 0, 10_000).catch(() => undefined);
    await this.stopEngine();
    // Retried: an application's init may still be putting its last files
    // in place (its log's times, "exit" by rename) while the directory is
    // walked, and rmdir then finds it not empty (seen once in CI).
    rmSync(this.home, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  }

  /** Stops the resident engine of this sandbox's state directory, if one
   * runs (APPSHOT_ENGINE=auto starts one per sandbox), and waits until it
   * has left: it must not outlive its directory. */
  async stopEngine(): Promise<void> {
    if (!existsSync(join(this.home, 'engine', 'lock'))) return;
    const r = await this.runAsync(['engine', 'stop', '--json'], 20_000);
    let pid: number | undefined;
    try {
      pid = (JSON.parse(r.stdout) as { pid?: number }).pid;
    } catch {
      /* none answered */
    }
    if (pid) await waitFor(() => !alive(pid!), 20_000, `engine ${pid} to leave`).catch(() => undefined);
  }
}

export class Running {
  private readonly lines: string[] = [];
  private readonly waiters: (() => void)[] = [];
  private readonly out: Interface;
  stderr = '';
  readonly exited: Promise<Result>;

  /** The JSON lines of its standard error so far, parsed (serve's log:
   * one object a decision, an `event` in each). */
  logged<T extends { event: string }>(): T[] {
    return this.stderr
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as T);
  }

  constructor(readonly child: ChildProcessWithoutNullStreams) {
    this.out = createInterface({ input: child.stdout });
    this.out.on('line', (l) => {
      this.lines.push(l);
      for (const w of this.waiters.splice(0)) w();
    });
    child.stderr.on('data', (d) => (this.stderr += d));
    this.exited = new Promise((resolve) =>
      child.on('close', (code, signal) => resolve({ code, signal, stdout: this.lines.join('\n'), stderr: this.stderr })),
    );
  }

  /** Resolves with the first line matching `re` (already seen or to come). */
  async line(re: RegExp, timeoutMs = 20_000): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (const l of this.lines) {
        const m = l.match(re);
        if (m) return m;
      }
      const left = deadline - Date.now();
      if (left <= 0 || this.child.exitCode !== null)
        throw new Error(`no line matching ${re}; output so far:\n${this.lines.join('\n')}\nstderr: ${this.stderr}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  output(): string[] {
    return [...this.lines];
  }

  send(text: string): void {
    this.child.stdin.write(text);
  }
}

/**
 * spawnSync's answer (status, signal, stdout, stderr), without blocking
 * the worker: a vitest worker that does not turn its event loop for a
 * minute after one of its RPC calls misses the answer ("Timeout calling
 * onTaskUpdate", which fails the whole run). For any command that may take
 * long on a loaded machine. Killed (SIGKILL) after `timeout` ms.
 */
export function spawnAsync(
  command: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeout?: number; input?: string } = {},
): Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', (e) => (stderr += String(e)));
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeout ?? 50_000);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr });
    });
  });
}

export async function waitFor(cond: () => boolean, timeoutMs = 10_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let looks = 0; ; looks++) {
    const began = performance.now();
    if (cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollPause(looks, performance.now() - began)));
  }
}

/** The pause of a poll before its look number `looks` (from 0), whose
 * last look took `tookMs`: a cheap condition (a log or /proc read) is
 * looked at again after 2, 4, 8... ms, up to 50, as most conditions come
 * true within a few ms, where a first pause of 50 ms cost every wait that
 * long; a costly one (a CLI command each look) every 50 ms, as before. */
export function pollPause(looks: number, tookMs: number): number {
  return tookMs > 5 ? 50 : Math.min(50, 2 << Math.min(looks, 5));
}

/** waitFor() for a condition that must itself wait (a socket's answer). */
export async function waitForAsync(cond: () => Promise<boolean>, timeoutMs = 10_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let looks = 0; ; looks++) {
    const began = performance.now();
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollPause(looks, performance.now() - began)));
  }
}

/** Whether a system PID names a live (non-zombie) process. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // The state is the field after the command's closing parenthesis (the
  // command may hold spaces and parentheses itself). Read from /proc, not
  // `ps`: tests poll this every few ms and a process per poll adds up.
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return false;
  }
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
}

/** System ids of the SysV objects that exist now, by kind. */
/** Mode of the SysV objects a test makes outside every application on
 * purpose (trust.test.ts's and ipc.test.ts's foreign objects, the segment
 * hostile-sysv.test.ts keeps beside an application, keyedrmid's objects
 * under an application's keys): no other test counts them as stray. Test
 * files run at once, and a restore's check for strays (restore.test.ts)
 * counted hostile-sysv's segment, made by root under no application,
 * once in CI. */
export const FOREIGN_IPC_MODE = 0o604;

/** The SysV ids that exist, but those made foreign on purpose unless
 * `foreignToo`. */
export function systemIpcIds(foreignToo = false): { sem: number[]; shm: number[]; msg: number[] } {
  const read = (f: string) => {
    return readFileSync(`/proc/sysvipc/${f}`, 'utf8')
      .split('\n')
      .slice(1)
      .map((l: string) => l.trim().split(/\s+/))
      .filter((cols) => cols.length > 2 && (foreignToo || parseInt(cols[2], 8) !== FOREIGN_IPC_MODE))
      .map((cols) => Number(cols[1]));
  };
  return { sem: read('sem'), shm: read('shm'), msg: read('msg') };
}

/** The kernel's lines of the SysV objects (/proc/sysvipc), by kind and id:
 * their columns. */
function ipcColumns(): Record<'sem' | 'shm' | 'msg', Map<number, string[]>> {
  const read = (kind: string) =>
    new Map(
      readFileSync(`/proc/sysvipc/${kind}`, 'utf8')
        .split('\n')
        .slice(1)
        .map((l) => l.trim().split(/\s+/))
        .filter((cols) => cols.length > 2)
        .map((cols) => [Number(cols[1]), cols] as [number, string[]]),
    );
  return { sem: read('sem'), shm: read('shm'), msg: read('msg') };
}

/** Where /proc/sysvipc puts an object's creator's uid (cuid). */
const CUID_COLUMN = { sem: 6, shm: 9, msg: 9 } as const;

/** The segment ids that live `shmdest hold ID` processes hold (test
 * shmdest.test.ts's holder outside any application), all of them in one
 * walk of /proc. */
function shmdestHolders(): Set<number> {
  const ids = new Set<number>();
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv[0].endsWith('/shmdest') && argv[1] === 'hold') ids.add(Number(argv[2]));
    } catch {
      /* gone */
    }
  }
  return ids;
}

/** SysV ids that exist now, were not there `before`, belong to no
 * running application's tables (in any sandbox: test files run in
 * parallel and create objects of their own meanwhile), and were made by
 * this process's user: appshot, run by these tests, makes every object
 * of an application as that user (an object it gives to another, as a
 * restore does PostgreSQL's segment, keeps its creator's uid), while
 * PostgreSQL's initdb in servers.test.ts makes its own, for seconds, as
 * postgres, under no application. */
export function strayIpcIds(before: { sem: number[]; shm: number[]; msg: number[] }): number[] {
  const addon = createRequire(import.meta.url)(join(root, 'build', 'Release', 'appshot.node')) as {
    readTables(path: string): { tables: Record<string, Entry[]> };
  };
  const uid = String(process.geteuid?.() ?? 0);
  const once = (): number[] => {
    // The ids first, then the tables: an object another test's application
    // makes meanwhile is bound in its tables a moment after it is made.
    const now = systemIpcIds();
    const columns = ipcColumns();
    const owned = new Set<number>();
    for (const f of readdirSync('/dev/shm').filter((n) => n.startsWith('appshot-'))) {
      try {
        const t = addon.readTables(join('/dev/shm', f)).tables;
        for (const kind of ['semid', 'shmid', 'msgid']) for (const e of t[kind]) owned.add(e.system);
      } catch {
        /* removed meanwhile */
      }
    }
    // Gone between the two looks: not a stray.
    const ours = (k: 'sem' | 'shm' | 'msg', id: number) => columns[k].get(id)?.[CUID_COLUMN[k]] === uid;
    // shmdest.test.ts keeps a segment removed while attached (SHM_DEST,
    // 01000 in the perms column) held by `shmdest hold ID`, a process
    // outside any application, in no tables, for seconds: not a stray of
    // the file running beside it. Any other holder of a removed segment
    // (a restored process that got away, appshot's engine) still is.
    // Their holders are read in one walk of /proc per look, and only if
    // some segment is removed while attached: a walk per such segment
    // read every process's cmdline again for each.
    let holders: Set<number> | undefined;
    const heldByShmdest = (k: 'sem' | 'shm' | 'msg', id: number) =>
      k === 'shm' && (parseInt(columns.shm.get(id)?.[2] ?? '0', 8) & 0o1000) !== 0 && (holders ??= shmdestHolders()).has(id);
    return (['sem', 'shm', 'msg'] as const).flatMap((k) => now[k].filter((id) => !before[k].includes(id) && !owned.has(id) && ours(k, id) && !heldByShmdest(k, id)));
  };
  // Strays are what stays: one that another test's application was making
  // or removing at the first look is gone, or bound, at the second.
  const first = once();
  if (!first.length) return first;
  spawnSync('sleep', ['0.3']);
  const second = new Set(once());
  return first.filter((id) => second.has(id));
}

/** The kernel's lines (/proc/sysvipc) of SysV ids `ids`, with their kind:
 * what a failed check of strays shows of them (key, mode, creator, times),
 * and who made or last used each, as far as the kernel says: a segment's
 * creator, a queue's last sender, each semaphore's last operator (a
 * restore sets them all), with its command line if it lives, or the name
 * `known` gives its PID (the killed appshot's, say). */
export function describeIpc(ids: number[], known: Record<number, string> = {}): string {
  const addon = createRequire(import.meta.url)(join(root, 'build', 'Release', 'appshot.node')) as {
    semRead(semid: number): { pids: number[] };
  };
  const who = (pid: number) => {
    if (known[pid]) return `${pid} (${known[pid]})`;
    try {
      return `${pid} (${readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim().slice(0, 160)})`;
    } catch {
      return `${pid} (gone)`;
    }
  };
  const lines: string[] = [];
  const columns = ipcColumns();
  for (const kind of ['sem', 'shm', 'msg'] as const)
    for (const [id, cols] of columns[kind]) {
      if (!ids.includes(id)) continue;
      let pids: number[] = [];
      let role = '';
      if (kind === 'shm') [pids, role] = [[Number(cols[4])], 'made by'];
      else if (kind === 'msg') [pids, role] = [[Number(cols[5])], 'last sent to by'];
      else {
        try {
          [pids, role] = [[...new Set(addon.semRead(id).pids)], 'last set by'];
        } catch {
          /* gone meanwhile */
        }
      }
      const makers = pids.filter((p) => p > 0).map(who);
      lines.push(`${kind}: ${cols.join(' ')}${makers.length ? `; ${role} ${makers.join(', ')}` : ''}`);
    }
  return lines.join('\n');
}

/** Connects to 127.0.0.1:port, sends `text` if given, and resolves with
 * all the server says until it closes the connection. */
export function tcpExchange(port: number, text?: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    let data = '';
    s.setTimeout(timeoutMs, () => s.destroy(new Error(`no answer on port ${port}`)));
    if (text !== undefined) s.on('connect', () => s.write(text));
    s.on('data', (d) => (data += d));
    s.on('end', () => resolve(data));
    s.on('error', reject);
  });
}

/** Where templfix (the template fixture) keeps its files, and the two
 * ports its rules name: one ALLOCATEd per clone, one MULTIPLEXed. */
export interface TemplfixWorld {
  /** Its /srv/templfix: data/, config/, and what instances write. */
  root: string;
  /** templates/templfix.rules, rewritten to `root` and the ports. */
  rules: string;
  portAlloc: number;
  portMux: number;
}

/** Writes templfix's files under world.root (data/state.txt, a shared
 * page marked "template", config/app.conf) and its rules file. */
export function makeTemplfixWorld(world: TemplfixWorld): void {
  mkdirSync(join(world.root, 'data'), { recursive: true });
  mkdirSync(join(world.root, 'config'), { recursive: true });
  writeFileSync(join(world.root, 'data', 'state.txt'), 'template\n');
  const shared = Buffer.alloc(4096);
  shared.write('template');
  writeFileSync(join(world.root, 'data', 'shared.bin'), shared);
  writeFileSync(join(world.root, 'config', 'app.conf'), 'template-config\n');
  writeFileSync(
    world.rules,
    readFileSync(join(root, 'templates', 'templfix.rules'), 'utf8')
      .replaceAll('/srv/templfix', world.root)
      .replaceAll('7101', String(world.portAlloc))
      .replaceAll('7102', String(world.portMux)),
  );
}

/** Runs templfix under its rules as `aid` and waits for its READY line. */
export async function runTemplfix(sb: Sandbox, aid: string, world: TemplfixWorld): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--rules', world.rules, '--', fixture('templfix'), world.root, String(world.portAlloc), String(world.portMux)]);
  if (r.code !== 0) throw new Error(`templfix did not start: ${r.stderr}`);
  await waitFor(() => sb.log(aid).includes('READY'), 10_000, 'templfix READY');
}

/** A template of templfix at `template`: its world made, templfix run as
 * `aid`, snapshotted (which ends it) into `snapshot`, the template made. */
export async function templfixTemplate(sb: Sandbox, world: TemplfixWorld, aid: string, snapshot: string, template: string): Promise<void> {
  makeTemplfixWorld(world);
  await runTemplfix(sb, aid, world);
  const s = sb.run(['snapshot', aid, '-o', snapshot]);
  if (s.code !== 0) throw new Error(`snapshot of templfix failed: ${s.stderr}`);
  await waitFor(() => !sb.aids().includes(aid), 10_000, 'the snapshotted templfix to end');
  const t = sb.run(['template', 'create', snapshot, '-o', template]);
  if (t.code !== 0) throw new Error(`template create failed: ${t.stderr}`);
}

/** Snapshots `aid` (ending it) into `dir`/snap, makes the template
 * `dir`/tpl of it and two clones of that, `prefix`-1 and `prefix`-2, each
 * through 3 more of its own self-checks: how the clone tests begin. */
export async function twoClones(sb: Sandbox, aid: string, dir: string, prefix: string): Promise<{ aid: string; privateRoot: string }[]> {
  sb.ok(['snapshot', aid, '-o', join(dir, 'snap')]);
  sb.ok(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'tpl')]);
  const clones = sb.json<{ aid: string; privateRoot: string }[]>(['clone', join(dir, 'tpl'), '--aid', prefix, '--count', '2']);
  const aids = clones.map((c) => c.aid).join(' ');
  if (aids !== `${prefix}-1 ${prefix}-2`) throw new Error(`clones ${aids}, not ${prefix}-1 ${prefix}-2`);
  for (const c of clones) await sb.checksPass(c.aid, 3);
  return clones;
}

/** Runs test/fixtures/sharedlisten (a server on `port`) as `aid`, waits
 * for it to listen and snapshots it to `image` (which ends it): what a
 * serve test restores on demand. */
export async function snapshotListener(sb: Sandbox, aid: string, port: number, image: string): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('sharedlisten'), String(port)]);
  if (r.code !== 0) throw new Error(`run ${aid}: ${r.stderr}`);
  await waitFor(() => sb.log(aid).includes('LISTENING'), 10_000, `${aid} to listen`);
  const snap = sb.run(['snapshot', aid, '-o', image]);
  if (snap.code !== 0) throw new Error(`snapshot ${aid}: ${snap.stderr}`);
}

/** Another tracer than appshot: a process that seizes `pid` (PTRACE_SEIZE
 * does not stop it) and holds it until killed, so that no snapshot can
 * stop it meanwhile. Resolves once it has seized; killed if it does not
 * within 10 s. */
export async function seizedByAnotherTracer(pid: number): Promise<ChildProcess> {
  const addonPath = join(root, 'build', 'Release', 'appshot.node');
  const tracer = spawn(process.execPath, ['-e', `require(${JSON.stringify(addonPath)}).seize(${pid}); console.log('seized'); setInterval(() => {}, 1e6);`], { stdio: ['ignore', 'pipe', 'inherit'] });
  let said = '';
  tracer.stdout!.on('data', (d: Buffer) => (said += d.toString()));
  try {
    await waitFor(() => said.includes('seized'), 10_000, `another tracer to seize ${pid}`);
  } catch (e) {
    tracer.kill('SIGKILL');
    throw e;
  }
  return tracer;
}

/** Redis commands as one pipelined write through redis-cli; the replies as
 * it prints them. */
export function redisCli(port: number, commands: string[]): string[] {
  const r = spawnSync('redis-cli', ['-p', String(port)], { input: commands.join('\n') + '\n', encoding: 'utf8', timeout: 30_000, maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`redis-cli: ${r.stderr}`);
  return r.stdout.trim().split('\n');
}

/** Waits until the redis on `port` answers PING (a refused connection
 * or no answer yet: not yet). */
export async function redisAnswers(port: number, timeoutMs: number): Promise<void> {
  await waitFor(() => {
    try {
      return redisCli(port, ['PING'])[0] === 'PONG';
    } catch {
      return false;
    }
  }, timeoutMs, 'redis to answer');
}

/**
 * A snapshot of a real redis holding `keys` keys (key:I = value(I)): redis
 * started under AID 'loader' on `port`, filled, then snapshotted (which ends
 * it) into `image`. The serve tests start from this.
 */
export async function redisImage(sb: Sandbox, port: number, keys: number, value: (i: number) => string, image: string): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', 'loader', '--', '/usr/bin/redis-server', '--port', String(port), '--save', '', '--appendonly', 'no']);
  if (r.code !== 0) throw new Error(`appshot run redis: ${r.stderr}`);
  await redisAnswers(port, 10_000);
  const set = redisCli(port, Array.from({ length: keys }, (_, i) => `SET key:${i} ${value(i)}`));
  if (set.length !== keys || !set.every((l) => l === 'OK')) throw new Error(`redis SET answered ${set.find((l) => l !== 'OK')}`);
  const s = sb.run(['snapshot', 'loader', '-o', image]);
  if (s.code !== 0) throw new Error(`appshot snapshot loader: ${s.stderr}`);
}

/**
 * appshot run with APPSHOT_TEST_STOP_AT=`point` (the engine off): resolves
 * once it has stopped itself there (killpoint.ts raises SIGSTOP), so that a
 * test can change what it is about to use; `go()` lets it continue and
 * resolves with its exit code and what it wrote on stderr.
 */
export async function stoppedAt(sb: Sandbox, args: string[], point: string, what: string, env: NodeJS.ProcessEnv = {}): Promise<{ go(): Promise<{ code: number | null; stderr: string; stdout: string }> }> {
  const child = spawn(process.execPath, [cli, ...args], { env: { ...sb.env, ...env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_STOP_AT: point } });
  let stderr = '';
  let stdout = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const stopped = () => {
    try {
      return readFileSync(`/proc/${child.pid}/stat`, 'utf8').replace(/^.*\) /, '').startsWith('T');
    } catch {
      return false;
    }
  };
  await waitFor(() => stopped() || child.exitCode !== null, 50_000, what);
  if (child.exitCode !== null) throw new Error(`appshot ${args.join(' ')} ended (${child.exitCode}) before '${point}': ${stderr}`);
  return {
    go: async () => {
      child.kill('SIGCONT');
      const code = await exited;
      return { code, stderr, stdout };
    },
  };
}

/** A process's state letter (S, R, T for stopped...), '' once it is gone. */
export function processState(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0];
  } catch {
    return '';
  }
}

/** Processes whose command line has `word` as one of its arguments (the
 * processes a killed appshot forked keep its command line). */
export function processesWithArgument(word: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').includes(word)) out.push(Number(name));
    } catch {
      /* gone */
    }
  }
  return out;
}

/**
 * `appshot snapshot AID -o image` killed (kill -9) at the test-only point
 * `point` (APPSHOT_TEST_KILL_AT), the application (system PID `pid`) held
 * in a job-control stop meanwhile: the kernel lets it go as appshot dies,
 * and what appshot left to a process of its own to undo (a queue's
 * messages given back, a thread's affinity) is undone a moment later; the
 * stop keeps the application from looking in between, so that a test can
 * see the state left when all is over. Returns once the application is
 * let go (back in its stop, untraced) and no process of the killed
 * snapshot is left; the caller continues it (SIGCONT).
 */
export async function snapshotKilledAt(sb: Sandbox, aid: string, pid: number, image: string, point: string): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  await waitFor(() => processState(pid) === 'T', 10_000, `${aid} to stop`);
  const r = spawnSync(process.execPath, [cli, 'snapshot', aid, '-o', image], { env: { ...sb.env, APPSHOT_ENGINE: 'off', APPSHOT_TEST_KILL_AT: point }, encoding: 'utf8', timeout: 50_000 });
  if (r.signal !== 'SIGKILL') throw new Error(`appshot snapshot ${aid} was to be killed at '${point}', it ended with ${r.status}: ${r.stderr}`);
  await waitFor(() => processesWithArgument(image).length === 0, 10_000, 'no process of the killed snapshot');
  const untraced = () => {
    try {
      return /^TracerPid:\s+0$/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
    } catch {
      return true;
    }
  };
  await waitFor(untraced, 10_000, `${aid} to be let go`);
  // Let go, a thread the snapshot held is woken to enter the job-control
  // stop again: 'R' for as long as it waits for a CPU. Let go and run on,
  // it would not stop again by itself.
  try {
    await waitFor(() => processState(pid) === 'T', 10_000);
  } catch {
    throw new Error(`${aid} is not back in its stop once appshot died: state '${processState(pid) || 'gone'}': ${sb.log(aid).trim().split('\n').pop()}`);
  }
}

/** Runs `fn` with a tmpfs mounted at `dir` (an empty directory; the tests
 * run as root) with mount options `options` ("size=4m,mode=0700": a file
 * system to fill), unmounted after whatever happens. */
export async function withTmpfs<T>(dir: string, options: string, fn: () => T | Promise<T>): Promise<T> {
  const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir], { encoding: 'utf8' });
  if (mounted.status !== 0) throw new Error(`mounting a small tmpfs at ${dir} (the tests run as root): ${mounted.stderr}`);
  try {
    return await fn();
  } finally {
    spawnSync('umount', [dir]);
  }
}

/** Bytes the file system of `dir` has in use (df). */
export function usedBytes(dir: string): number {
  return Number(spawnSync('df', ['--output=used', '-B1', dir], { encoding: 'utf8' }).stdout.trim().split('\n')[1]);
}

/** Where the cgroup v2 hierarchy is mounted (this process's own cgroup in
 * it), if it is and we may make cgroups there: a probe made and removed. */
export function cgroupRoot(): string | undefined {
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [before, after] = line.split(' - ');
    if (!after?.startsWith('cgroup2 ')) continue;
    const mount = before.split(' ')[4];
    const mine = /^0::(.*)$/m.exec(readFileSync('/proc/self/cgroup', 'utf8'))?.[1] ?? '/';
    try {
      rmdirSync(mkdtempSync(join(mount, mine, 'appshot-probe-')));
      return join(mount, mine);
    } catch {
      return undefined;
    }
  }
  return undefined;
}
