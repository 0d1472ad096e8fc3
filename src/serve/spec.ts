/**
 * Services (issue 15): what `appshot service add` records and `appshot
 * serve` runs. A service is a name, where its instances come from (a
 * snapshot image or a template), the public ports the front door listens
 * on and the port each maps to inside an instance, and the policy knobs.
 *
 * One format for all of it, JSON: `service add` writes one file per
 * service under $APPSHOT_HOME/services/NAME.json, and `serve --config FILE`
 * reads a file `{"services": [ ... ]}` of the same objects (see
 * templates/services.json). JSON because the rest of appshot's state is
 * JSON already and every language reads it; no second parser to keep.
 */
import { uniqueTag } from '../holder.js';
import { existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { checkAid, defaultHome, LocalRegistry } from '../registry.js';
import { makeHome } from '../home.js';

export type ServiceMode = 'restore' | 'clone';

export interface PortMap {
  /** Address the front door listens on (default 127.0.0.1). */
  host: string;
  /** The public (well-known) port: the front door's. */
  public: number;
  /** The port the application listens on inside an instance (its virtual
   * port; a clone's system port is found from its port bindings). */
  app: number;
}

export interface ServiceSpec {
  name: string;
  /** A snapshot image (restore mode) or a template (clone mode), absolute. */
  from: string;
  mode: ServiceMode;
  ports: PortMap[];
  /** Instances kept running however idle (clone mode). */
  min: number;
  /** Most instances at once (restore mode: always 1). */
  max: number;
  /** Milliseconds without a connection before an instance is suspended
   * (restore) or dropped (clone, above min). 0: never. */
  idleMs: number;
  /** Connections one instance takes before another is started (clone
   * mode) or before connections queue at the front door. */
  concurrency: number;
  /** Connections the front door holds at most (accepted, waiting for an
   * instance) before it stops accepting: the rest wait, unrefused, in the
   * kernel's listen backlog of the public port. Bounds the descriptors a
   * flood takes while an instance is restored. Absent in services added
   * before it: DEFAULT_MAX_HELD. */
  maxHeld?: number;
  /** Clone mode: a share of one core (0.8: 80%); when every running
   * instance serves connections and uses at least this much CPU, one more
   * is started (policy.ts). 0 or absent: CPU is not looked at. */
  cpuTarget?: number;
  /** Either mode: a share of one core; an instance that uses at least
   * this much is busy, not idle, with or without connections (its idle
   * time starts once it uses less): a database compacting or a worker
   * finishing a job is not suspended or dropped in the middle of it. 0 or
   * absent: idle means without connections alone. */
  busyCpu?: number;
  /** Milliseconds a connection may wait at the front door (held, or in a
   * listen backlog) before that wait decides (policy.ts): clone mode
   * starts one more instance for it, up to max (a start that hangs or
   * crawls does not keep its waiters waiting); restore mode, or clone mode
   * at max, reports it (a `waiting` log line, a metric). At most once per
   * such wait. 0 or absent: the number waiting alone decides. */
  maxWaitMs?: number;
}

/** The front door's hold per service unless `--max-held` says otherwise;
 * `serve` lowers it if the descriptor limit (RLIMIT_NOFILE) leaves less. */
export const DEFAULT_MAX_HELD = 1024;

/** Restore-mode services whose next instance `serve` keeps restored
 * ahead of time while they are suspended, held stopped (server.ts,
 * Prepared): the most recently suspended, unless `serve --prepared K` or
 * the config file's "prepared" says otherwise. Each costs a held
 * instance's processes (~1 MiB of PSS for redis, its memory mapped from
 * the page file, not copied). */
export const DEFAULT_PREPARED = 2;

/** A count of prepared services (0: none). */
export function parsePrepared(value: unknown, what = '--prepared'): number {
  return count(value, what, 0);
}

export const SERVICE_SCHEMA = 'appshot.service/1';

/** "1s", "500ms", "2m", "1h", or plain seconds. */
export function parseDuration(text: string, flag = '--idle'): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(String(text).trim());
  if (!m) throw new AppshotError(`${flag} '${text}': expected a duration such as 500ms, 30s, 5m or 1h`, ExitCode.usage);
  const n = Number(m[1]);
  const unit = m[2] ?? 's';
  return Math.round(n * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[unit]!);
}

export function formatDuration(ms: number): string {
  if (ms === 0) return 'never';
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

function port(text: string, what: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !(n >= 1 && n <= 65535)) throw new AppshotError(`--port '${what}': ${text} is not a port (1-65535)`, ExitCode.usage);
  return n;
}

/** [HOST:]PORT[:APP_PORT] — HOST may be an IPv4 address or [v6]. */
export function parsePortMap(text: string): PortMap {
  let rest = text;
  let host = '127.0.0.1';
  const v6 = /^\[([^\]]+)\]:(.*)$/.exec(rest);
  if (v6) {
    host = v6[1];
    rest = v6[2];
  }
  const parts = rest.split(':');
  if (!v6 && parts.length === 3) host = parts.shift()!;
  if (parts.length === 2 && /[^\d]/.test(parts[0])) host = parts.shift()!; // HOST:PORT
  if (parts.length < 1 || parts.length > 2 || !host) throw new AppshotError(`--port '${text}': expected [HOST:]PORT[:APP_PORT]`, ExitCode.usage);
  const pub = port(parts[0], text);
  return { host, public: pub, app: parts.length === 2 ? port(parts[1], text) : pub };
}

export function formatPortMap(p: PortMap): string {
  const host = p.host.includes(':') ? `[${p.host}]` : p.host;
  return `${host}:${p.public}->${p.app}`;
}

function count(value: unknown, what: string, min: number): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) throw new AppshotError(`${what} '${value}': expected a whole number of at least ${min}`, ExitCode.usage);
  return n;
}

/** A share of cores: 0.8, or 80%; at most 64 (cores). */
function share(value: unknown, what: string): number {
  const text = String(value).trim();
  const n = text.endsWith('%') ? Number(text.slice(0, -1)) / 100 : Number(text);
  if (!Number.isFinite(n) || n < 0 || n > 64 || text === '' || text === '%')
    throw new AppshotError(`${what} '${value}': expected a share of a core (0.8 or 80%)`, ExitCode.usage);
  return n;
}

/** Options as the command line or a config file gives them. */
export interface ServiceInput {
  name: string;
  from: string;
  mode?: string;
  ports: (string | PortMap)[];
  min?: number | string;
  max?: number | string;
  idle?: string | number;
  concurrency?: number | string;
  maxHeld?: number | string;
  cpuTarget?: number | string;
  busyCpu?: number | string;
  maxWait?: number | string;
}

/** Checks and completes a service; `base` resolves a relative `from`. */
export function makeSpec(input: ServiceInput, base = process.cwd()): ServiceSpec {
  if (typeof input.name !== 'string') throw new AppshotError('a service needs a name', ExitCode.usage);
  checkAid(input.name);
  const mode = (input.mode ?? 'restore') as ServiceMode;
  if (mode !== 'restore' && mode !== 'clone') throw new AppshotError(`--mode '${input.mode}': expected restore or clone`, ExitCode.usage);
  if (typeof input.from !== 'string' || !input.from) throw new AppshotError(`service '${input.name}': --from SNAPSHOT|TEMPLATE is required`, ExitCode.usage);
  const from = resolve(base, input.from);
  if (!existsSync(from) || !statSync(from).isDirectory())
    throw new AppshotError(`service '${input.name}': --from ${from}: no such image directory`, ExitCode.notFound);
  const isTemplate = existsSync(join(from, 'template.pb'));
  if (mode === 'clone' && !isTemplate)
    throw new AppshotError(`service '${input.name}': clone mode wants a template (appshot template create), and ${from} is not one`, ExitCode.usage);
  if (mode === 'restore' && isTemplate)
    throw new AppshotError(`service '${input.name}': restore mode wants a snapshot image, and ${from} is a template (use --mode clone)`, ExitCode.usage);
  if (!Array.isArray(input.ports) || input.ports.length === 0)
    throw new AppshotError(`service '${input.name}': at least one --port [HOST:]PORT[:APP_PORT] is required`, ExitCode.usage);
  const ports = input.ports.map((p) => (typeof p === 'string' ? parsePortMap(p) : parsePortMap(`${p.host ?? '127.0.0.1'}:${p.public}:${p.app ?? p.public}`)));
  if (mode === 'restore')
    for (const p of ports)
      if (p.public === p.app)
        throw new AppshotError(
          `service '${input.name}': the application itself listens on ${p.app}; give the front door another public port (--port PUBLIC:${p.app})`,
          ExitCode.usage,
        );
  const seen = new Set<string>();
  for (const p of ports) {
    const key = `${p.host}:${p.public}`;
    if (seen.has(key)) throw new AppshotError(`service '${input.name}': port ${key} given twice`, ExitCode.usage);
    seen.add(key);
  }
  const min = count(input.min ?? 0, '--min', 0);
  const max = mode === 'restore' ? 1 : count(input.max ?? 4, '--max', 1);
  if (mode === 'restore' && input.max !== undefined && Number(input.max) !== 1)
    throw new AppshotError(`service '${input.name}': restore mode runs one stateful instance; --max must be 1`, ExitCode.usage);
  if (min > max) throw new AppshotError(`service '${input.name}': --min ${min} is above --max ${max}`, ExitCode.usage);
  const idleMs = typeof input.idle === 'number' ? input.idle : parseDuration(input.idle ?? '5m');
  const concurrency = count(input.concurrency ?? 100, '--concurrency', 1);
  const maxHeld = count(input.maxHeld ?? DEFAULT_MAX_HELD, '--max-held', 1);
  const cpuTarget = share(input.cpuTarget ?? 0, '--cpu-target');
  if (cpuTarget && mode !== 'clone') throw new AppshotError(`service '${input.name}': --cpu-target starts clones, and restore mode runs one instance`, ExitCode.usage);
  const busyCpu = share(input.busyCpu ?? 0, '--busy-cpu');
  const maxWaitMs = typeof input.maxWait === 'number' ? input.maxWait : parseDuration(input.maxWait ?? '0', '--max-wait');
  if (!(maxWaitMs >= 0) || !Number.isFinite(maxWaitMs)) throw new AppshotError(`service '${input.name}': --max-wait ${input.maxWait}: expected a duration`, ExitCode.usage);
  return {
    name: input.name,
    from,
    mode,
    ports,
    min,
    max,
    idleMs,
    concurrency,
    maxHeld,
    ...(cpuTarget ? { cpuTarget } : {}),
    ...(busyCpu ? { busyCpu } : {}),
    ...(maxWaitMs ? { maxWaitMs } : {}),
  };
}

/** Where services and their runtime state live. */
export class ServiceStore {
  readonly dir: string;
  constructor(private readonly home = defaultHome()) {
    this.dir = join(home, 'services');
  }


  private file(name: string): string {
    return join(this.dir, `${name}.json`);
  }

  /** A service's working directory: its suspend images and state.json. */
  workDir(name: string): string {
    return join(this.dir, name);
  }

  add(spec: ServiceSpec): void {
    // The state directory checked (and made) before anything is made in
    // it (home.ts makeHome).
    makeHome(this.home);
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const file = this.file(spec.name);
    for (const other of this.list())
      for (const p of spec.ports)
        if (other.name !== spec.name && other.ports.some((q) => q.public === p.public && q.host === p.host))
          throw new AppshotError(`port ${p.host}:${p.public} is already service '${other.name}'s`, ExitCode.conflict);
    try {
      writeFileSync(file, JSON.stringify({ schema: SERVICE_SCHEMA, ...spec }, null, 2) + '\n', { flag: 'wx', mode: 0o600 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new AppshotError(`service '${spec.name}' exists ('appshot service rm ${spec.name}' removes it)`, ExitCode.conflict);
      throw e;
    }
  }

  get(name: string): ServiceSpec | undefined {
    checkAid(name);
    try {
      return readSpec(readFileSync(this.file(name), 'utf8'));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
  }

  /** A service added with `service add`, or one a `serve --config` runs
   * (known from its state.json). */
  require(name: string): ServiceSpec {
    const s = this.get(name) ?? this.readState(name)?.spec;
    if (!s) throw new AppshotError(`no service '${name}'`, ExitCode.notFound);
    return s;
  }

  /** Services added with `service add`. */
  list(): ServiceSpec[] {
    if (!existsSync(this.dir)) return [];
    return readdirSync(this.dir)
      .filter((f) => f.endsWith('.json'))
      .sort()
      .map((f) => readSpec(readFileSync(join(this.dir, f), 'utf8')));
  }

  /** Those added, and those a `serve --config` has run here. */
  listKnown(): ServiceSpec[] {
    const added = this.list();
    if (!existsSync(this.dir)) return added;
    const names = new Set(added.map((s) => s.name));
    const configured = readdirSync(this.dir)
      .filter((d) => !d.startsWith('.') && !d.endsWith('.json') && !names.has(d))
      .flatMap((d) => this.readState(d)?.spec ?? []);
    return [...added, ...configured].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Removes the service and its suspend images. A running instance is
   * the caller's to stop first.
   *
   * Serve's suspends are snapshots like any other: each leaves the record
   * of a snapshotted application (`ps -a`), which keeps the instance's AID
   * from another `run` and its log for the resume, and which the resume's
   * restore takes over. Removed with the images it names, else `ps -a`
   * would show an application whose image is gone. It can outlive serve's
   * own bookkeeping: an instance held prepared when serve was killed
   * gives the record back only when its registration is released, which
   * may be the caller's own stopping of the instances, just before this. */
  remove(name: string): void {
    this.require(name);
    checkAid(name);
    // Before the images go: killed in between, an image without a record
    // is left, never a record without its image.
    const reg = new LocalRegistry(this.home);
    const record = reg.getSnapshotted(name);
    if (record && isInside(record.image, this.workDir(name))) reg.removeSnapshotted(name);
    const doomed = join(this.dir, `.${name}.removed-${uniqueTag()}`);
    if (existsSync(this.workDir(name))) renameSync(this.workDir(name), doomed);
    rmSync(this.file(name), { force: true });
    rmSync(doomed, { recursive: true, force: true });
  }

  readState(name: string): ServiceState | undefined {
    try {
      return JSON.parse(readFileSync(join(this.workDir(name), 'state.json'), 'utf8')) as ServiceState;
    } catch {
      return undefined;
    }
  }

  writeState(state: ServiceState): void {
    // Only a serve writes it, which made and checked the state directory
    // when it took its lock (serve/lock.ts takeServeLock).
    const dir = this.workDir(state.service);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = join(dir, 'state.json');
    writeFileSync(`${file}.tmp`, JSON.stringify(state, null, 2) + '\n');
    renameSync(`${file}.tmp`, file);
  }
}

function readSpec(text: string): ServiceSpec {
  const { schema: _schema, ...spec } = JSON.parse(text) as ServiceSpec & { schema?: string };
  return spec;
}

/** A config file for `appshot serve --config FILE`: services as
 * `service add` takes them (paths relative to the file), and optionally
 * "prepared": how many suspended restore-mode services keep their next
 * instance prepared (DEFAULT_PREPARED). */
export function loadConfig(path: string): ServiceSpec[] & { prepared?: number } {
  let parsed: { services?: ServiceInput[]; prepared?: unknown };
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8')) as { services?: ServiceInput[]; prepared?: unknown };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new AppshotError(`--config ${path}: no such file`, ExitCode.notFound);
    throw new AppshotError(`--config ${path}: not valid JSON (${(e as Error).message})`, ExitCode.usage);
  }
  if (!parsed || !Array.isArray(parsed.services)) throw new AppshotError(`--config ${path}: expected {"services": [ ... ]}`, ExitCode.usage);
  const base = resolve(path, '..');
  const specs: ServiceSpec[] & { prepared?: number } = parsed.services.map((s) => makeSpec(s, base));
  if (parsed.prepared !== undefined) specs.prepared = parsePrepared(parsed.prepared, `--config ${path}: "prepared"`);
  const names = new Set<string>();
  for (const s of specs) {
    if (names.has(s.name)) throw new AppshotError(`--config ${path}: service '${s.name}' given twice`, ExitCode.usage);
    names.add(s.name);
  }
  return specs;
}

/** What a running `appshot serve` says about a service, for `service
 * show` and `ls` (state.json in the service's directory). */
export interface ServiceState {
  service: string;
  /** The service as this serve runs it (from `service add` or --config). */
  spec: ServiceSpec;
  /** The serve process and when it wrote this. */
  servePid: number;
  updatedAt: string;
  /** The image the next restore starts from (restore mode). */
  lastImage?: string;
  /** The suspend images lastImage builds on, oldest first, and it (restore
   * mode): what pruning keeps. */
  chain?: string[];
  /** Restore mode, while a suspend is under way: the image its snapshot
   * writes, and the chain it then ends, written before the snapshot may
   * end the instance's processes. A serve that finds it at its start with
   * that image whole on disk and the instance not running (the previous
   * serve died before it wrote what followed) resumes from it: it holds
   * every write the instance made. */
  suspending?: { image: string; chain: string[] };
  instances: InstanceState[];
  held: number;
  snapshots: number;
  restores: number;
  crashes: number;
  /** The most recent connections, newest last. */
  connections: Translation[];
}

export type InstanceStateName = 'starting' | 'running' | 'suspending' | 'suspended' | 'stopping' | 'crashed';

export interface InstanceState {
  aid: string;
  state: InstanceStateName;
  active: number;
  /** ms since the epoch of the last connection's open or close. */
  lastActive: number;
  /** public port → the instance's own port. */
  ports: { public: number; app: number; system: number }[];
  /** Cores its processes used over the last second (services with a CPU
   * target only). */
  cpu?: number;
  /** Suspended, its next instance restored ahead of time and held stopped
   * (server.ts, Prepared): a connection only lets it go on. */
  prepared?: boolean;
}

export interface Translation {
  at: string;
  client: string;
  public: number;
  instance: string;
  port: number;
  /** Time the connection was held at the front door before forwarding. */
  heldMs: number;
}

/** Whether `path` is in directory `dir`, as spelled or with symbolic
 * links resolved (serve names its images from $APPSHOT_HOME as it is
 * spelled; a later command may spell it otherwise). */
function isInside(path: string, dir: string): boolean {
  const spellings = (p: string) => {
    try {
      return [resolve(p), realpathSync(p)];
    } catch {
      return [resolve(p)];
    }
  };
  return spellings(dir).some((d) =>
    spellings(path).some((p) => {
      const rel = relative(d, p);
      return rel !== '' && !rel.startsWith('..') && !rel.startsWith('/');
    }),
  );
}
