/**
 * `appshot service add|ls|show|rm` and `appshot serve` (issue 15): the
 * command-line face of src/serve/. Parsing and printing only; the front
 * door and the policy live in src/serve/server.ts and policy.ts.
 */
import type { Command } from 'commander';
import { appendFileSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { constants } from 'node:os';
import { currentRequest, requestStorage, type RequestContext } from '../engine/request.js';
import { withOwnSettings } from '../engine/settings.js';
import { AppshotError, ExitCode } from '../errors.js';
import type { ServiceSpec, ServiceState } from '../serve/spec.js';
import type { HostedServe } from '../engine/hosted.js';
import { jsonObjectOption, printJson, wantsJson } from './json.js';
import { plural } from '../words.js';
import { hostedHoldPoint, killPoint } from '../killpoint.js';


const collect = (v: string, prev: string[]) => [...prev, v];

async function alivePid(pid: number | undefined): Promise<boolean> {
  if (!pid) return false;
  // A serve process, or an engine, killed and not yet waited for by its
  // parent serves nothing.
  const { readStat } = await import('../procfs.js');
  const state = readStat(pid)?.state;
  if (state === 'Z' || state === 'X') return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A service as `service show --json` gives it: its spec, whether a serve
 * runs it, and what that serve last wrote. */
export interface ServiceView extends ServiceSpec {
  /** restore mode: running, suspended (starting, suspending...); clone
   * mode: the number of running instances as "N running". */
  state: string;
  served: boolean;
  servePid: number | null;
  lastImage: string | null;
  instances: ServiceState['instances'];
  held: number;
  snapshots: number;
  restores: number;
  crashes: number;
  connections: ServiceState['connections'];
}

async function view(spec: ServiceSpec, state: ServiceState | undefined): Promise<ServiceView> {
  const served = await alivePid(state?.servePid);
  let instances = state?.instances ?? [];
  if (!served) {
    // Nobody watches it: what the registry says now.
    const { LocalRegistry, isEnded } = await import('../registry.js');
    const reg = new LocalRegistry();
    instances = instances
      .map((i) => {
        const r = reg.get(i.aid);
        const live = r && !isEnded(r) && reg.settle(r);
        return { ...i, active: 0, state: live ? ('running' as const) : spec.mode === 'restore' ? ('suspended' as const) : ('crashed' as const) };
      })
      .filter((i) => spec.mode === 'restore' || i.state === 'running');
  }
  const running = instances.filter((i) => i.state === 'running').length;
  const state_ =
    spec.mode === 'restore' ? (instances[0]?.state ?? 'suspended') : `${running} running${instances.length > running ? `, ${instances.length - running} other` : ''}`;
  return {
    ...spec,
    state: state_,
    served,
    servePid: served ? state!.servePid : null,
    lastImage: spec.mode === 'restore' ? (state?.lastImage ?? spec.from) : null,
    instances,
    held: served ? (state?.held ?? 0) : 0,
    snapshots: state?.snapshots ?? 0,
    restores: state?.restores ?? 0,
    crashes: state?.crashes ?? 0,
    connections: state?.connections ?? [],
  };
}

export function registerServe(program: Command): void {
  const service = program
    .command('service')
    .description('services: applications restored or cloned on demand by `appshot serve` (add, ls, show, rm)')
    .addHelpText(
      'after',
      '\nExamples:\n  appshot service add db --from ./redis.img --port 6380:6379 --idle 30s\n' +
        '  appshot service add web --mode clone --from ./web.template --port 8080 --max 4 --min 1\n  appshot service ls\n  appshot service show db',
    );

  service
    .command('add')
    .description('define a service: where its instances come from and the public ports the front door listens on')
    .argument('<name>', 'the service name (restore mode: also the AID of its instance)')
    .requiredOption('--from <image>', 'a snapshot image (restore mode) or a template (clone mode)')
    .option('--port <[host:]port[:app_port]>', 'public port, and the port the application listens on inside (repeatable)', collect, [])
    .option('--mode <mode>', 'restore: one stateful instance, suspended when idle; clone: interchangeable clones of a template', 'restore')
    .option('--min <n>', 'clone mode: instances kept running however idle', '0')
    .option('--max <n>', 'clone mode: most instances at once (restore mode: 1)')
    .option('--idle <duration>', 'suspend (restore) or drop (clone) an instance after this long without a connection (500ms, 30s, 5m; 0: never)', '5m')
    .option('--concurrency <n>', 'connections one instance takes before another is started or connections wait', '100')
    .option('--max-held <n>', 'connections the front door holds while they wait; beyond, they wait unaccepted in the listen backlog', '1024')
    .option('--cpu-target <share>', 'clone mode: start another instance when every one serving uses this much of a core (0.8 or 80%; default: CPU not looked at)')
    .option('--max-wait <duration>', 'a connection waiting this long at the front door starts one more clone (clone mode, up to --max), or is reported (restore mode, or at --max) (2s; default: the number waiting alone decides)')
    .option('--busy-cpu <share>', 'an instance using this much of a core is not idle, connections or not: its idle time starts once it uses less (0.1 or 10%; default: idle means without connections)')
    .option('--json', 'print the service as JSON', false)
    .addHelpText('after', '\nExamples:\n  appshot service add db --from ./redis.img --port 6380:6379 --idle 30s\n  appshot service add db --from ./pg.img --port 5433:5432 --idle 1m --busy-cpu 10%\n  appshot service add web --mode clone --from ./web.template --port 0.0.0.0:8080 --max 4 --cpu-target 80%')
    .action(
      async (
        name: string,
        opts: {
          from: string;
          port: string[];
          mode: string;
          min: string;
          max?: string;
          idle: string;
          concurrency: string;
          maxHeld: string;
          cpuTarget?: string;
          busyCpu?: string;
          maxWait?: string;
          json: boolean;
        },
      ) => {
        const { makeSpec, ServiceStore, formatPortMap } = await import('../serve/spec.js');
        const spec = makeSpec({ name, from: opts.from, mode: opts.mode, ports: opts.port, min: opts.min, max: opts.max, idle: opts.idle, concurrency: opts.concurrency, maxHeld: opts.maxHeld, cpuTarget: opts.cpuTarget, busyCpu: opts.busyCpu, maxWait: opts.maxWait });
        new ServiceStore().add(spec);
        if (opts.json) printJson('service add', spec);
        else process.stdout.write(`${spec.name}: ${spec.mode} ${spec.from} on ${spec.ports.map(formatPortMap).join(', ')}\n`);
      },
    );

  service
    .command('ls')
    .description('list services and their state')
    .option('--json', 'machine-readable output', false)
    .option(...jsonObjectOption('service ls'))
    .addHelpText('after', '\nExamples:\n  appshot service ls\n  appshot service ls --json')
    .action(async (opts: { json: boolean; jsonObject: boolean }) => {
      const { ServiceStore, formatPortMap, formatDuration } = await import('../serve/spec.js');
      const store = new ServiceStore();
      const views = await Promise.all(store.listKnown().map((s) => view(s, store.readState(s.name))));
      if (wantsJson(opts)) return printJson('service ls', views, opts);
      const { printColumns } = await import('../inspect.js');
      printColumns(
        ['NAME', 'MODE', 'STATE', 'PORTS', 'IDLE', 'SERVED', 'FROM'],
        views.map((v) => [v.name, v.mode, v.state, v.ports.map(formatPortMap).join(','), formatDuration(v.idleMs), v.served ? `pid ${v.servePid}` : 'no', v.from]),
      );
    });

  service
    .command('show')
    .description("a service: its instances, their state and ports, and its recent connections' translations (public port -> instance -> its port)")
    .argument('<name>', 'the service')
    .option('--json', 'machine-readable output', false)
    .addHelpText('after', '\nExamples:\n  appshot service show db\n  appshot service show db --json')
    .action(async (name: string, opts: { json: boolean }) => {
      const { ServiceStore, formatPortMap, formatDuration, DEFAULT_MAX_HELD } = await import('../serve/spec.js');
      const store = new ServiceStore();
      const v = await view(store.require(name), store.readState(name));
      if (opts.json) return printJson('service show', v);
      const { printColumns } = await import('../inspect.js');
      const w = (s: string) => process.stdout.write(s);
      const prepared = v.instances[0]?.prepared ? ', its next instance prepared (restored ahead, held stopped)' : '';
      w(`service      ${v.name} (${v.mode})\nstate        ${v.state}${prepared}${v.held ? `, ${plural(v.held, 'connection')} held` : ''}\n`);
      const { serveLockHolder } = await import('../serve/lock.js');
      const holder = serveLockHolder(join(store.dir, '..'));
      const inEngine = v.served && holder?.engine === true && holder.pid === v.servePid;
      w(`served       ${v.served ? `by appshot serve${inEngine ? ' in the resident engine' : ''}, pid ${v.servePid}` : 'no (appshot serve is not running)'}\n`);
      w(`from         ${v.from}\n`);
      if (v.lastImage) w(`next restore ${v.lastImage}\n`);
      w(`ports        ${v.ports.map(formatPortMap).join(', ')}\n`);
      w(`policy       idle ${formatDuration(v.idleMs)}, min ${v.min}, max ${v.max}, concurrency ${v.concurrency}, max held ${v.maxHeld ?? DEFAULT_MAX_HELD}${v.cpuTarget ? `, cpu target ${Math.round(v.cpuTarget * 100)}%` : ''}${v.busyCpu ? `, busy at ${Math.round(v.busyCpu * 100)}% cpu` : ''}${v.maxWaitMs ? `, max wait ${formatDuration(v.maxWaitMs)}` : ''}\n`);
      w(`counts       ${plural(v.restores, 'restore')}, ${plural(v.snapshots, 'snapshot')}, ${plural(v.crashes, 'crash')}\n`);
      if (v.instances.length) {
        w('\n');
        const cpu = !!v.cpuTarget || !!v.busyCpu;
        printColumns(
          ['INSTANCE', 'STATE', 'CONNS', ...(cpu ? ['CPU'] : []), 'PORTS'],
          v.instances.map((i) => [
            i.aid,
            i.state,
            String(i.active),
            ...(cpu ? [i.cpu === undefined ? '-' : `${Math.round(i.cpu * 100)}%`] : []),
            i.ports.map((p) => `${p.public}->${p.system}`).join(', ') || '-',
          ]),
        );
      }
      if (v.connections.length) {
        w('\nrecent connections (public port -> instance -> its port):\n');
        printColumns(
          ['AT', 'CLIENT', 'PUBLIC', 'INSTANCE', 'PORT', 'HELD'],
          v.connections.slice(-10).map((c) => [c.at, c.client, String(c.public), c.instance, String(c.port), `${c.heldMs} ms`]),
        );
      }
    });

  service
    .command('rm')
    .description("remove a service, its suspend images and the snapshotted record (ps -a) naming one; its running instance is stopped")
    .argument('<name>', 'the service')
    .option('--json', 'print {removed: NAME} as JSON', false)
    .addHelpText('after', '\nExamples:\n  appshot service rm db')
    .action(async (name: string, opts: { json: boolean }) => {
      const { ServiceStore } = await import('../serve/spec.js');
      const store = new ServiceStore();
      store.require(name);
      const state = store.readState(name);
      if (await alivePid(state?.servePid))
        throw new AppshotError(`service '${name}' is being served by appshot serve (pid ${state!.servePid}): stop it first`, ExitCode.conflict);
      const api = await import('../api.js');
      for (const i of state?.instances ?? []) await api.rm(i.aid, { force: true }).catch(() => undefined);
      store.remove(name);
      // As `appshot rm` says each AID it removed.
      if (opts.json) printJson('service rm', { removed: name });
      else process.stdout.write(`${name}\n`);
    });

  const serve = program
    .command('serve')
    // `serve stpo` is a typo, not a serve: refused with one line
    // (Commander would otherwise hand it to serve's action and start one).
    .allowExcessArguments(false)
    .description('the front door: listen on every service\'s public ports, restore or clone instances on demand, suspend them when idle')
    .option('--config <file>', 'serve the services of this file ({"services": [...]}, see templates/services.json) instead of those added with `service add`')
    .option('--metrics <[host:]port>', 'answer GET /metrics (Prometheus text format) here')
    .option('-d, --detach', 'run in the background (in the resident engine, or a process of its own); print the PID serving; its log goes to $APPSHOT_HOME/services/serve.log (or --log)', false)
    .option('--foreground', 'serve in this process, not in the resident engine (as with APPSHOT_ENGINE=off)', false)
    .option('--log <file>', 'with -d: write the log here')
    .option('--prepared <k>', 'keep the next instance of the K most recently suspended restore-mode services restored ahead of time, held stopped, so that a connection only resumes it (0: none; default 2, or the config file\'s "prepared")')
    .addHelpText(
      'after',
      '\nExamples:\n  appshot serve\n  appshot serve --config templates/services.json --metrics 127.0.0.1:9464\n  appshot serve -d\n\n' +
        'One JSON line per decision (restore, suspend, clone, drop, crash) goes to stderr. SIGINT or SIGTERM\n' +
        'stops serving: clones are stopped, a restore-mode instance keeps running and the next serve takes it over.\n' +
        'With a resident engine (APPSHOT_ENGINE=auto starts one), the engine serves and this command stays\n' +
        'attached to it (its Ctrl-C stops serving) or, with -d, returns; `appshot engine status` shows it,\n' +
        '`appshot serve stop` stops it (the engine stays), `appshot engine stop` stops both.\n' +
        'One serve per state directory: a second is refused.',
    )
    .action(async (opts: { config?: string; metrics?: string; detach: boolean; foreground: boolean; log?: string; prepared?: string }) => {
      const { ServiceStore, loadConfig, parsePortMap, formatPortMap, parsePrepared } = await import('../serve/spec.js');
      const { defaultHome } = await import('../registry.js');
      const home = defaultHome();
      const store = new ServiceStore(home);
      const specs: ServiceSpec[] & { prepared?: number } = opts.config ? loadConfig(opts.config) : store.list();
      const prepared = opts.prepared !== undefined ? parsePrepared(opts.prepared) : specs.prepared;
      if (!specs.length) throw new AppshotError('no services to serve: add one with `appshot service add` or give --config FILE', ExitCode.usage);
      const metricsAt = opts.metrics ? parsePortMap(opts.metrics.includes(':') || !/^\d+$/.test(opts.metrics) ? opts.metrics : `127.0.0.1:${opts.metrics}`) : undefined;
      const metricsOn = metricsAt ? { host: metricsAt.host, port: metricsAt.public } : undefined;
      const banner = [
        ...specs.map((s) => `serving ${s.name} (${s.mode}) on ${s.ports.map(formatPortMap).join(', ')}\n`),
        ...(metricsAt ? [`metrics on http://${metricsAt.host}:${metricsAt.public}/metrics\n`] : []),
        'ready\n',
      ];
      // Run by the resident engine (the client sent it there): hosted.
      const request = currentRequest();
      if (request) return hostInEngine(request, { home, specs, prepared, metricsOn, detach: opts.detach, logPath: resolve(opts.log ?? join(store.dir, 'serve.log')), banner });
      if (opts.detach) {
        (await import('../home.js')).makeHome(home);
        return detach(store.dir, opts.log);
      }
      const { takeServeLock, releaseServeLock } = await import('../serve/lock.js');
      const lock = takeServeLock(home, false);
      // Listening from the moment the lock names this process: `serve stop`
      // may send SIGTERM as soon as it finds the lock held, and whoever
      // waits for "ready" as soon as it reads it; without a listener Node
      // dies by the signal, half started. One that comes while the host
      // starts is acted on once it has.
      // Listening for good (process.on, not once): a second signal while
      // it stops (two `serve stop`s, a retry, Ctrl-C then SIGTERM) is
      // ignored, instead of killing it with its lock file still naming it.
      let stopAsked = false;
      let end = () => void (stopAsked = true);
      const onSignal = () => {
        if (stopAsked) return;
        stopAsked = true;
        end();
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      killPoint('serve: locked');
      const { ServeHost } = await import('../serve/server.js');
      const { ServeMetrics } = await import('../serve/metrics.js');
      const host = new ServeHost(specs, { home, metrics: new ServeMetrics(), prepared });
      await host.start(metricsOn);
      const stopped = new Promise<void>(
        (resolve) =>
          (end = () => {
            const stopping = host.stop();
            killPoint('serve: stopping');
            void stopping.then(resolve);
          }),
      );
      if (stopAsked) end();
      else {
        for (const line of banner) process.stdout.write(line);
        host.log({ event: 'ready', services: specs.map((s) => s.name) });
      }
      await stopped;
      releaseServeLock(lock);
    });

  serve
    .command('stop')
    .description('stop serving, whether the resident engine hosts the serve (the engine stays) or it runs in a process of its own (sent SIGTERM)')
    .option('--json', 'print what was stopped as JSON', false)
    .addHelpText(
      'after',
      '\nExamples:\n  appshot serve -d && appshot serve stop\n  appshot serve stop --json\n\n' +
        'Returns once serving has stopped: its public ports and /metrics closed. Instances are left as\n' +
        'SIGTERM leaves them: a restore-mode instance running keeps running, a suspended one stays\n' +
        'suspended (its image kept), and the next serve takes either over; clones are stopped and\n' +
        'removed. An attached `appshot serve` then leaves with 0. Nothing serving: exit 3.',
    )
    .action(async (opts: { json: boolean }) => {
      const stopped = await stopServe();
      if (opts.json) printJson('serve stop', stopped);
      else
        process.stdout.write(
          // A serve of its own stopped before it wrote its state names no
          // service yet.
          stopped.services.length
            ? `stopped serving ${stopped.services.join(', ')} (${stopped.engine ? `hosted by the resident engine, pid ${stopped.pid}, which keeps running` : `pid ${stopped.pid}`})\n`
            : `stopped serve pid ${stopped.pid} (it was still starting)\n`,
        );
    });
}

/** How long a serve in its own process is given to stop after SIGTERM. */
const SERVE_STOP_WAIT_MS = 60_000;

/** `appshot serve stop`: whoever holds the front door (serve/lock.ts) stops
 * serving, as at SIGTERM; returns once it has. */
async function stopServe(): Promise<{ home: string; pid: number; engine: boolean; services: string[] }> {
  const { defaultHome } = await import('../registry.js');
  const home = resolve(defaultHome());
  const { serveLockTaken } = await import('../serve/lock.js');
  const holder = serveLockTaken(home);
  if (!holder) throw new AppshotError(`appshot serve is not running for ${home}`, ExitCode.notFound);
  if (holder.engine) {
    const { hostedServe, SERVE_STOP_WHY } = await import('../engine/hosted.js');
    const here = holder.pid === process.pid ? hostedServe() : undefined;
    if (here) {
      // Run by the engine that hosts it.
      await here.stop(SERVE_STOP_WHY);
      return { home, pid: holder.pid, engine: true, services: here.services };
    }
    const { controlEngine } = await import('../engine/client.js');
    const answer = await controlEngine('serve-stop', home);
    if (!answer) throw new AppshotError(`the resident engine that serves (pid ${holder.pid}) does not answer on its socket`, ExitCode.failure);
    if (answer.refused) throw new AppshotError(`the resident engine refused: ${String(answer.refused)}`, ExitCode.failure);
    if (typeof answer.failed === 'string') throw new AppshotError(`stopping the serve the engine hosts: ${answer.failed}`, ExitCode.failure);
    if (!Array.isArray(answer.stopped)) throw new AppshotError(`appshot serve is not running for ${home}`, ExitCode.notFound);
    return { home, pid: holder.pid, engine: true, services: answer.stopped as string[] };
  }
  // A serve of its own: SIGTERM is how it is stopped (commands/serve.ts
  // above), and it lets the lock go as it leaves.
  const { ServiceStore } = await import('../serve/spec.js');
  const store = new ServiceStore(home);
  const services = store
    .listKnown()
    .map((s) => s.name)
    .filter((n) => store.readState(n)?.servePid === holder.pid);
  // Signalled through a pidfd, and only while that process still holds
  // the lock file open: between finding it and signalling it, it may have
  // ended and its PID become someone else's.
  const { addon } = await import('../native.js');
  let pidfd = -1;
  try {
    pidfd = addon().pidfdOpen(holder.pid, 0);
    if (serveLockTaken(home)?.pid === holder.pid) addon().pidfdSendSignal(pidfd, constants.signals.SIGTERM);
  } catch (e) {
    // ESRCH: it has ended (and let the lock go) meanwhile.
    if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw new AppshotError(`cannot signal the serve process ${holder.pid}: ${(e as Error).message}`, ExitCode.failure);
  } finally {
    if (pidfd >= 0) closeSync(pidfd);
  }
  const deadline = Date.now() + SERVE_STOP_WAIT_MS;
  while (serveLockTaken(home)?.pid === holder.pid && (await alivePid(holder.pid))) {
    if (Date.now() > deadline) throw new AppshotError(`the serve process ${holder.pid} did not stop within ${SERVE_STOP_WAIT_MS / 1000} s of SIGTERM`, ExitCode.failure);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { home, pid: holder.pid, engine: false, services };
}

/**
 * `appshot serve` in the resident engine: the same front door (ServeHost)
 * in the engine's process instead of one of its own. It runs outside the
 * request that started it, under a context of its own (request.ts): its
 * output goes to its log file, and to the client while one is attached;
 * what it claims before an application owns it is held by a lease of its
 * own (holder.ts), removed when it stops, and by the engine's process
 * (a kill -9 of the engine frees it, as a kill -9 of a serve process
 * does); one serve per state directory (serve/lock.ts) holds in the
 * engine too. Attached (no -d), the request lets the engine's context
 * gate go and waits: the client's Ctrl-C, SIGTERM or going away stops
 * serving, as they stop a serve of its own; `appshot engine stop` stops
 * it too, and the client then leaves with 0 as well.
 */
async function hostInEngine(
  request: RequestContext,
  o: { home: string; specs: ServiceSpec[]; prepared?: number; metricsOn?: { host: string; port: number }; detach: boolean; logPath: string; banner: string[] },
): Promise<void> {
  const { takeServeLock, releaseServeLock } = await import('../serve/lock.js');
  const { leasesDir, newLeaseName } = await import('../holder.js');
  const { setHosted } = await import('../engine/hosted.js');
  const { ServeHost } = await import('../serve/server.js');
  const { ServeMetrics } = await import('../serve/metrics.js');
  const { LocalRegistry } = await import('../registry.js');
  const lock = takeServeLock(o.home, true);
  let attached: RequestContext | undefined = o.detach ? undefined : request;
  const toLog = (chunk: Buffer | string) => {
    try {
      appendFileSync(o.logPath, chunk, { mode: 0o600 });
    } catch {
      /* nowhere to say it */
    }
  };
  const lease = newLeaseName();
  const leaseFile = join(leasesDir(o.home), lease);
  const own: RequestContext = {
    write: (fd, chunk) => {
      toLog(chunk);
      if (attached && !attached.disconnected) attached.write(fd, chunk);
    },
    tty: { stdout: false, stderr: false },
    ci: request.ci,
    path: request.path,
    trustImages: request.trustImages,
    onDisconnect: new Set(),
    disconnected: false,
    lease,
    umask: request.umask,
  };
  let host: InstanceType<typeof ServeHost> | undefined;
  const letGo = () => {
    rmSync(leaseFile, { force: true });
    try {
      if (own.held) new LocalRegistry(o.home).releaseHeldBy(lease, own.held);
    } catch (e) {
      toLog(`appshot: releasing what serve held: ${(e as Error).message}\n`);
    }
    releaseServeLock(lock);
  };
  // Hosted from the moment the lock names the engine, before its front
  // door has started: `serve stop` or `engine stop`, which find the lock
  // held, then find this entry too. A stop asked while it starts is
  // acted on once the start has ended (stopped, or failed).
  let started!: (h: InstanceType<typeof ServeHost> | undefined) => void;
  const startEnded = new Promise<InstanceType<typeof ServeHost> | undefined>((r) => (started = r));
  let stopping: Promise<void> | undefined;
  let hurried = false;
  let stoppedBy = '';
  let ended!: () => void;
  const done = new Promise<void>((r) => (ended = r));
  const entry: HostedServe = {
    services: o.specs.map((s) => s.name),
    since: Date.now(),
    log: o.logPath,
    ...(o.metricsOn ? { metrics: `http://${o.metricsOn.host}:${o.metricsOn.port}/metrics` } : {}),
    attached: () => !!attached && !attached.disconnected,
    starting: () => !host,
    // One asked while the front door starts is passed on once it has.
    hurry: () => {
      hurried = true;
      host?.hurry();
    },
    stop: (why) =>
      (stopping ??= (async () => {
        stoppedBy = why;
        const served = await startEnded;
        // A start that failed has let everything go already.
        if (!served) return;
        served.log({ event: 'stopping', why });
        try {
          await requestStorage.run(own, () => withOwnSettings(() => served.stop()));
        } finally {
          letGo();
          setHosted(undefined);
          ended();
        }
      })()),
  };
  setHosted(entry);
  // Attached, the client's Ctrl-C, SIGTERM or going away stops serving
  // from the start on: one that leaves while the front door still starts
  // stops it once started, as a stop asked then does (else it would serve
  // on with nobody attached and no -d asked).
  const onGone = () => void entry.stop(request.disconnected ? 'its client went away' : 'interrupted');
  if (!o.detach) {
    request.onDisconnect.add(onGone);
    // Gone or interrupted already (while the request waited at the
    // engine's gate, or loaded the serve's code): the handlers ran then.
    if (request.disconnected || request.interrupted) onGone();
  }
  try {
    await hostedHoldPoint();
    writeFileSync(leaseFile, '', { mode: 0o600, flag: 'wx' });
    // The engine's own scoped settings (engine/settings.ts), explicitly:
    // its ticks and forwarding outlive this request, and hosting does not
    // rely on the client's being equal to them.
    host = await requestStorage.run(own, () => withOwnSettings(async () => {
      const h = new ServeHost(o.specs, {
        home: o.home,
        metrics: new ServeMetrics(),
        prepared: o.prepared,
        shared: true,
        log: (entry) => own.write(2, Buffer.from(JSON.stringify({ ts: new Date().toISOString(), ...entry }) + '\n')),
      });
      await h.start(o.metricsOn);
      return h;
    }));
  } catch (e) {
    request.onDisconnect.delete(onGone);
    letGo();
    setHosted(undefined);
    started(undefined);
    ended();
    throw e;
  }
  const served = host;
  if (hurried) served.hurry();
  started(served);
  if (stopping) {
    // Asked to stop while it started: never ready.
    await done;
    request.onDisconnect.delete(onGone);
    attached = undefined;
    process.stderr.write(`appshot: serve stopped before it was ready: ${stoppedBy}\n`);
    return;
  }
  // -d prints the serving PID alone, as a serve -d of its own does.
  for (const line of o.banner) {
    toLog(line);
    if (!o.detach) process.stdout.write(line);
  }
  served.log({ event: 'ready', services: o.specs.map((s) => s.name), engine: process.pid });
  if (o.detach) {
    process.stdout.write(`${process.pid}\n`);
    return;
  }
  // Nothing more of the current directory, environment or umask is read
  // for this request: other clients' commands need not wait for it.
  request.leaveGate?.();
  await done;
  request.onDisconnect.delete(onGone);
  attached = undefined;
  // Stopped from elsewhere (engine stop, serve stop): said, as it is not
  // this client's doing; its exit code is 0 all the same.
  if (stoppedBy !== 'interrupted' && stoppedBy !== 'its client went away') process.stderr.write(`appshot: serve stopped: ${stoppedBy}\n`);
}

/** Node's flags for a process that stays resident (serve -d, the engine):
 * a young generation of 1 MiB instead of up to 16, which a server that
 * mostly waits does not need (100 suspended services: 43 MiB of PSS for
 * the serve process instead of 54; bench/serve.js (e)). */
export const RESIDENT_NODE_FLAGS = ['--max-semi-space-size=1'];

/** The environment a resident process starts with: one malloc arena
 * (glibc) for all its threads, from the first allocation on. Node's and
 * V8's threads each take an arena of their own before any of our code
 * runs (ServeHost's mallocArenas then comes too late for them), and what
 * a burst of work (a restore, an image decoded) freed in those stays
 * resident: with it, the serve process of 100 suspended services has ~9
 * MiB less anonymous PSS (bench/serve.js (e), with the trim after work
 * that ServeHost does). The children serve starts (appshot-init) are
 * single-threaded: one arena is what they have anyway. A value the user
 * set is kept. */
export const residentEnv = (env: NodeJS.ProcessEnv): NodeJS.ProcessEnv => ({ MALLOC_ARENA_MAX: '1', ...env });

/** `serve -d`: the same command without -d, in its own session, its
 * output to a log; returns once it is ready (or says why not). */
async function detach(dir: string, logPath: string | undefined): Promise<void> {
  const { spawn } = await import('node:child_process');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const log = logPath ?? join(dir, 'serve.log');
  const fd = openSync(log, 'a', 0o600);
  const args = process.argv.slice(1).filter((a) => a !== '-d' && a !== '--detach');
  const startAt = existsSync(log) ? readFileSync(log).length : 0;
  const child = spawn(process.execPath, [...RESIDENT_NODE_FLAGS, ...args], { detached: true, stdio: ['ignore', fd, fd], env: residentEnv(process.env) });
  closeSync(fd);
  child.unref();
  const deadline = Date.now() + 60_000;
  for (;;) {
    const text = readFileSync(log).subarray(startAt).toString();
    if (/^ready$/m.test(text)) break;
    if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
      const why = /^appshot: .*$/m.exec(text)?.[0] ?? `it exited (see ${log})`;
      throw new AppshotError(`serve -d did not start: ${why.replace(/^appshot: /, '')}`, ExitCode.failure);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  process.stdout.write(`${child.pid}\n`);
}
