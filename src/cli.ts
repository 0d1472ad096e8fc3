/**
 * appshot's command line. Each command is a thin layer over a module; this
 * file owns only argument parsing, output format and exit codes.
 */
import { Command, CommanderError, Option } from 'commander';
import { closeSync, existsSync, openSync, readSync, statSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppshotError, errorText, ExitCode, isSystemCallError, printable } from './errors.js';
import { type ApplicationInfo, describeApplications, ENTRY_FLAG_NAMES, formatId, listedAids, listProcesses, portsOf, portText, printColumns, processCommand, selectApplications, shellCommand, tableRows } from './inspect.js';
import { age, pruneEnded, removeApps, requireSignallable, signalApp, signalName, stillRunning, stopApp, waitEnded } from './lifecycle.js';
import { type AppRecord, LocalRegistry, checkAid, describeEnd, describeSnapshot, isEnded } from './registry.js';
import { appshotVersion, registerVersion } from './commands/version.js';
import { registerCheck } from './commands/check.js';
import { registerImages } from './commands/images.js';
import { registerServe } from './commands/serve.js';
import { standardOutput } from './stdout.js';
import { plural } from './words.js';
import { applyHouseStyle } from './commands/style.js';
import { registerCompletion } from './commands/completion.js';
import { flagNames, jsonObjectOption, ms as roundMs, printJson, wantsJson, withSchema } from './commands/json.js';
import type { TablesSnapshot } from './native.js';
import { registerEngine } from './engine/command.js';
import { currentRequest, onInterrupt, setExitCode } from './engine/request.js';
import { PROGRESS_HELP } from './progress.js';
import type { LogTimes } from './logtimes.js';

/** template create and show --json: the template's directory as `path`,
 * and as `template`, the name appshot.template-create/1 and -show/1 gave it
 * before the naming rules (docs/json.md), where `template` means
 * {path, instance}: deprecated, kept one more release. */
function templateJson<T extends { template: string }>(summary: T): { template: string; path: string } & Omit<T, 'template'> {
  const { template, ...rest } = summary;
  return { template, path: template, ...rest };
}

/** How many rules that match nothing `template create` names on stderr
 * before it counts the rest. */
const UNMATCHED_SHOWN = 20;
// Everything else a command needs (the drivers, the image format, the
// addon's users) is imported inside its action: `appshot --version`, --help
// and ps load none of it.

/** The whole command line, made anew for each command: commander keeps
 * what it parsed in the Command objects, and the engine parses many
 * commands, some at once. */
export function buildProgram(): Command {
  const program = new Command();
  const registry = () => new LocalRegistry();
  const json = printJson;

  program
    .name('appshot')
    .description(
      'Run applications with virtual PIDs and SysV IPC ids, so that they can be snapshotted, ' +
        'restored on any node and cloned. State lives in $APPSHOT_HOME (see README).',
    )
    .version(appshotVersion())
    .exitOverride();

  program
    .command('run')
    .description('register an application id (AID) and run a command as that application')
    .option('--aid <name>', 'the AID to register (default: a generated one, printed)')
    .option('-d, --detach', 'run in the background; output goes to the log (appshot logs AID)', false)
    .option('--json', 'with --detach: print {aid, vpid, pid} as JSON', false)
    .option('--rules <file>', 'templating rules (templates/README.md): REDIR PATH and SET ENV apply now; snapshots classify resources by them')
    .option('--private-tmp', 'a /tmp of its own: /tmp redirected to a directory made for it (removed by appshot rm); its restores keep it, its clones get a copy each', false)
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .addHelpText(
      'after',
      '\nExamples:\n  appshot run --aid dbserver -- redis-server --port 7000\n  appshot run -d -- ./server\n' +
        '  appshot run -d --aid jvm1 --private-tmp -- java -jar app.jar\n\n' +
        'With --private-tmp, programs that name files in /tmp after their PID (a JVM\'s\n' +
        '/tmp/hsperfdata_USER/PID and /tmp/.java_pidPID) meet no other application\'s: every\n' +
        "application's first process is PID 2. /proc/PID/root/tmp/... of its own processes leads\n" +
        "there too (so `appshot exec jvm1 -- jcmd 2 VM.version` reaches jvm1's JVM).\n\n" +
        'The exit status is the command\'s own (128 + N if it was killed by signal N); 127 if it\n' +
        'was not found, 126 if it could not be executed. A command that daemonizes keeps running\n' +
        'inside the application after `appshot run` returns. If `appshot snapshot` ends the\n' +
        "application, `appshot run` says so on stderr (appshot: 'A' was snapshotted to IMAGE and\n" +
        'ended) and exits 0: the application went into its image, it did not fail.\n\n' +
        'An application that ends is kept, with its exit code and log (appshot ps -a, logs, wait),\n' +
        "until 'appshot rm A' or 'appshot prune'; until then its AID cannot be run again.",
    )
    .action(async (command: string[], opts: { aid?: string; detach: boolean; json: boolean; rules?: string; privateTmp: boolean }) => {
      // In the foreground stdout is the application's: no room for JSON.
      if (opts.json && !opts.detach) throw new AppshotError('--json goes with --detach (-d): in the foreground, stdout is the application\'s', ExitCode.usage);
      const { run } = await import('./harness.js');
      if (opts.aid !== undefined) checkAid(opts.aid);
      const code = await run(registry(), command, {
        aid: opts.aid,
        detach: opts.detach,
        rules: opts.rules,
        privateTmp: opts.privateTmp,
        onStarted: (record, vpid, pid) => {
          if (opts.detach) {
            if (opts.json) json('run', { aid: record.aid, vpid, pid });
            else process.stdout.write(record.aid + '\n');
          } else if (!opts.aid) {
            process.stderr.write(`appshot: running as AID ${record.aid}\n`);
          }
        },
        onSnapshotted: (record, image) => process.stderr.write(`appshot: '${record.aid}' was snapshotted to ${image} and ended\n`),
      });
      setExitCode(code);
    });

  /** Table entries with their flags by name (appshot_table.h). */
  function tableJson(tables: TablesSnapshot['tables']) {
    return Object.fromEntries(
      Object.entries(tables).map(([kind, entries]) => [
        kind,
        (entries as { virtual: number; system: number; flags: number; owner: number }[]).map((e) => ({ virtual: e.virtual, system: e.system, owner: e.owner, flags: flagNames(e.flags, ENTRY_FLAG_NAMES) })),
      ]),
    );
  }

  /** One AID a line, as docker prints the containers it acted on. */
  function printAids(done: { aid: string }[]): void {
    if (done.length) process.stdout.write(done.map((d) => d.aid).join('\n') + '\n');
  }

  /** STATE as `ps` prints it. */
  function stateText(a: ApplicationInfo): string {
    return a.state === 'exited'
      ? `exited (${a.lost ? 'lost' : a.exitCode}) ${age(a.endedAt)} ago`
      : a.state === 'snapshotted'
        ? `snapshotted ${age(a.snapshottedAt)} ago`
        : a.state;
  }

  program
    .command('ps')
    .description('list applications (state, age, image or template, ports), or the processes of one')
    .argument('[aid]', "only this application: its processes, virtual and system PIDs (like docker top)")
    .option('-a, --all', 'ended and snapshotted applications too (kept until appshot rm or prune, or the restore of a snapshotted one)', false)
    .option('-q, --quiet', 'only the AIDs, one a line', false)
    .option('--json', 'machine-readable output: every application with its processes', false)
    .option(...jsonObjectOption('ps'))
    .addHelpText(
      'after',
      '\nSTATE: running, restoring (a restore or clone under way), exited (CODE), or snapshotted (a\n' +
        'snapshot ended it: IMAGE is where it went; restoring that image under its AID takes its place).\n\n' +
        'Examples:\n  appshot ps                 running applications\n  appshot ps -a              ended and snapshotted ones too\n' +
        '  appshot ps -aq             every AID (appshot rm $(appshot ps -aq) removes them all)\n  appshot ps web             the processes of web',
    )
    .action((aid: string | undefined, opts: { all: boolean; quiet: boolean; json: boolean; jsonObject: boolean }) => {
      const reg = registry();
      // The Node API's ps() lists the same (inspect.ts).
      const listing = selectApplications(reg, aid, opts.all);
      if (opts.quiet) {
        const aids = listedAids(listing);
        if (aids.length) process.stdout.write(aids.join('\n') + '\n');
        return;
      }
      const apps = describeApplications(reg, listing);
      if (wantsJson(opts)) {
        json('ps', apps, opts);
        return;
      }
      if (aid) {
        const [one] = apps;
        if (one.state === 'snapshotted') process.stdout.write(`${aid}: ${stateText(one)} (${one.image})\n`);
        else if (one.state === 'exited') process.stdout.write(`${aid}: ${stateText(one)}\n`);
        else
          printColumns(
            ['AID', 'VPID', 'PID', 'VPPID', 'STAT', 'THREADS', 'COMMAND'],
            one.processes.map((p) => [p.aid, String(p.vpid), String(p.pid), String(p.vppid), p.state, String(p.threads), processCommand(p)]),
          );
        return;
      }
      printColumns(
        ['AID', 'STATE', 'AGE', 'PROCS', 'IMAGE', 'PORTS', 'COMMAND'],
        apps.map((a) => [
          a.aid,
          stateText(a),
          age(a.createdAt),
          String(a.processes.filter((p) => !p.init).length),
          a.template ? `${a.template.path} #${a.template.instance}` : (a.image ?? '-'),
          a.ports.map(portText).join(', ') || '-',
          shellCommand(a.command),
        ]),
      );
    });

  program
    .command('table')
    .description("print an application's translation tables (every resource kind, virtual <-> system)")
    .argument('<aid>', 'the application')
    .option('--json', 'machine-readable output', false)
    .addHelpText('after', '\nExamples:\n  appshot table web\n  appshot table web --json')
    .action((aid: string, opts: { json: boolean }) => {
      const reg = registry();
      const record = reg.require(aid);
      const { tables, why } = reg.readTablesWhy(record);
      if (why) throw new AppshotError(why, ExitCode.failure);
      if (!tables) throw new AppshotError(`the tables of '${aid}' are gone (it just ended?)`, ExitCode.notFound);
      const rows = tableRows(tables);
      if (opts.json) {
        json('table', { aid, tables: tableJson(tables.tables), repairs: tables.repairs });
        return;
      }
      printColumns(
        ['KIND', 'VIRTUAL', 'SYSTEM', 'NOTE'],
        rows.map((r) => [r.kind, formatId(r.kind, r.virtual), formatId(r.kind, r.system), r.note]),
      );
    });

  program
    .command('exec')
    .description("run a command inside an application's virtual view (e.g. kill -HUP <vpid>)")
    .argument('<aid>', 'the application')
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .addHelpText('after', '\nExamples:\n  appshot exec web -- kill -HUP 1        signal the first process by its virtual PID\n  appshot exec db -- ipcs -s             the SysV ids as the application sees them')
    .action(async (aid: string, command: string[]) => {
      const { execIn } = await import('./harness.js');
      setExitCode(await execIn(registry(), aid, command));
    });

  /** The last `lines` lines of a file: the offset where they start. Read
   * backwards a block at a time, so a large log costs only its tail. */
  function tailOffset(path: string, lines: number): number {
    const size = statSync(path).size;
    if (lines <= 0) return size;
    const fd = openSync(path, 'r');
    try {
      const block = Buffer.alloc(65536);
      let end = size;
      // A last line without its newline counts as a line too.
      let seen = 0;
      let first = true;
      while (end > 0) {
        const start = Math.max(0, end - block.length);
        const n = readSync(fd, block, 0, end - start, start);
        for (let i = n - 1; i >= 0; i--) {
          if (block[i] !== 0x0a) continue;
          if (first && start + i === size - 1) continue;
          if (++seen === lines) return start + i + 1;
        }
        first = false;
        end = start;
      }
      return 0;
    } finally {
      closeSync(fd);
    }
  }

  program
    .command('logs')
    .description('print the output of an application started with run --detach (or restored), running or ended')
    .argument('<aid>', 'the application')
    .option('-f, --follow', 'keep printing new output until the application ends', false)
    .option('-n, --tail <lines>', "only the last LINES lines ('all': every line)", 'all')
    .option('-t, --timestamps', 'begin each line with when it was written (UTC, to within 10 ms)', false)
    .addHelpText(
      'after',
      '\nThe log is kept when the application ends (until appshot rm), and across a snapshot and the\n' +
        'restore of its image under the same AID: the restored application appends to it.\n\n' +
        'The application writes its log file itself; its appshot-init notes when the file grows, and\n' +
        '--timestamps gives each line the first of those times that covers it.\n\n' +
        'Examples:\n  appshot logs web\n  appshot logs -f --tail 20 web\n  appshot logs -t --tail 5 web',
    )
    .action(async (aid: string, opts: { follow: boolean; tail: string; timestamps: boolean }) => {
      const tail = opts.tail === 'all' ? undefined : Number(opts.tail);
      if (tail !== undefined && !(Number.isInteger(tail) && tail >= 0)) throw new AppshotError(`--tail '${opts.tail}': expected a number of lines or 'all'`, ExitCode.usage);
      const reg = registry();
      let record: AppRecord;
      checkAid(aid);
      const carried = reg.carriedLogPath(aid);
      const snapshotted = reg.get(aid) ? undefined : reg.getSnapshotted(aid);
      if (snapshotted || (!reg.get(aid) && existsSync(carried))) {
        // Snapshotted and not restored yet: its log waits for the restore.
        if (existsSync(carried)) process.stderr.write(`appshot: '${aid}' was snapshotted and ended; its log waits for the restore of its image as '${aid}'\n`);
        record = { aid, ...(existsSync(carried) ? { logPath: carried } : {}) } as AppRecord;
        opts.follow = false;
      } else record = reg.requireAny(aid);
      // Not a usage error: the command and the AID are right, there is
      // only no log to show (exit 1, as docker logs of a container whose
      // output was not kept).
      if (!record.logPath)
        throw new AppshotError(`'${aid}' ran in the foreground: its output went to the terminal of 'appshot run', and no log was kept`, ExitCode.failure);
      const logPath = record.logPath;
      const { LogTimes: Times } = await import('./logtimes.js');
      if (opts.timestamps && existsSync(logPath) && !Times.read(logPath))
        throw new AppshotError(`--timestamps: no times were noted for the log of '${aid}' (started by an older appshot)`, ExitCode.failure);
      let offset = tail !== undefined && existsSync(logPath) ? tailOffset(logPath, tail) : 0;
      // --timestamps: what is printed goes line by line; the part of a line
      // not yet ended waits for its end, or for the last pump.
      let partial = Buffer.alloc(0);
      const stamp = (line: Buffer, end: number, times: LogTimes) => {
        process.stdout.write(`${times.timeOf(end).toISOString()} `);
        process.stdout.write(line);
      };
      const print = (chunk: Buffer, end: number, times: LogTimes | undefined) => {
        if (!times) return void process.stdout.write(chunk);
        const start = end - chunk.length;
        let from = 0;
        for (let nl = chunk.indexOf(10); nl >= 0; nl = chunk.indexOf(10, from)) {
          stamp(Buffer.concat([partial, chunk.subarray(from, nl + 1)]), start + nl + 1, times);
          partial = Buffer.alloc(0);
          from = nl + 1;
        }
        partial = Buffer.concat([partial, chunk.subarray(from)]);
      };
      const pump = (last: boolean) => {
        if (!existsSync(logPath)) return;
        const size = statSync(logPath).size;
        const times = opts.timestamps && (size > offset || (last && partial.length)) ? Times.read(logPath) : undefined;
        if (size > offset) {
          const fd = openSync(logPath, 'r');
          try {
            const chunk = Buffer.alloc(Math.min(size - offset, 1 << 20));
            while (offset < size) {
              const n = readSync(fd, chunk, 0, Math.min(chunk.length, size - offset), offset);
              if (n <= 0) break;
              offset += n;
              print(Buffer.from(chunk.subarray(0, n)), offset, times);
            }
          } finally {
            closeSync(fd);
          }
        }
        // Nothing more will come: the last line, without its newline.
        if (last && times && partial.length) stamp(partial, offset, times);
      };
      if (!opts.follow) return pump(true);
      for (;;) {
        const current = reg.get(aid);
        const running = current !== undefined && !isEnded(current) && !knownStale(reg, current);
        pump(!running);
        if (!running) return;
        await sleep(200);
      }
    });

  program
    .command('stop')
    .description('end an application: a signal (default SIGTERM), a grace period, then SIGKILL')
    .argument('<aid...>', 'the applications')
    .option('-s, --signal <signal>', 'signal to send first: a name (TERM, SIGINT) or a number', 'SIGTERM')
    .option('-t, --time <seconds>', 'how long to wait for it to end before SIGKILL', '10')
    .option('--json', 'print [{aid, exitCode}] as JSON', false)
    .option(...jsonObjectOption('stop'))
    .addHelpText(
      'after',
      '\nReturns once every process of the application has ended, and prints its AID; the ended\n' +
        'application is kept (appshot ps -a, logs) until appshot rm. The signal goes to the\n' +
        "application's init, which passes it to the first process, or to every process once the\n" +
        'first has exited.\n\n' +
        'Examples:\n  appshot stop web\n  appshot stop -t 30 db          give it 30 s to shut down\n  appshot stop -s INT -t 5 web',
    )
    .action(async (aids: string[], opts: { signal: string; time: string; json: boolean; jsonObject: boolean }) => {
      const reg = registry();
      const sig = signalName(opts.signal);
      const grace = Number(opts.time);
      if (!(grace >= 0)) throw new AppshotError(`--time '${opts.time}': expected a number of seconds`, ExitCode.usage);
      const found = await requireEach(reg, aids, 'stopped');
      const ended = await Promise.all(found.map((r) => stopApp(reg, r, sig, grace)));
      // A snapshot that ended it meanwhile left no exit code.
      const stopped = aids.map((aid, i) => {
        const end = ended[i];
        return { aid, ...(end !== 'released' ? { exitCode: end.exitCode } : {}) };
      });
      if (wantsJson(opts)) json('stop', stopped, opts);
      else printAids(stopped);
    });

  program
    .command('kill')
    .description('send one signal (default SIGKILL, as docker kill) to an application and return')
    .argument('<aid...>', 'the applications')
    .option('-s, --signal <signal>', 'signal to send: a name (KILL, SIGHUP) or a number', 'SIGKILL')
    .option('--json', 'print [{aid, signal}] as JSON', false)
    .option(...jsonObjectOption('kill'))
    .addHelpText(
      'after',
      '\nPrints the AID of each application signalled. Does not wait for the application to end\n' +
        '(appshot stop does; appshot wait waits).\n\n' +
        'Examples:\n  appshot kill web\n  appshot kill -s HUP web        reload its configuration\n  appshot kill -s 15 web',
    )
    .action(async (aids: string[], opts: { signal: string; json: boolean; jsonObject: boolean }) => {
      const reg = registry();
      const sig = signalName(opts.signal);
      const records = await requireEach(reg, aids, 'signalled', (aid, found) => stillRunning(reg, aid, found));
      for (const r of records) signalApp(reg, r, sig);
      const signalled = records.map((r) => ({ aid: r.aid, signal: sig }));
      if (wantsJson(opts)) json('kill', signalled, opts);
      else printAids(signalled);
    });

  program
    .command('wait')
    .description('wait until each application has ended and print its exit code (like docker wait)')
    .argument('<aid...>', 'the applications')
    .option('--json', 'print [{aid, exitCode, endedAt}] as JSON, once all have ended', false)
    .option(...jsonObjectOption('wait'))
    .addHelpText(
      'after',
      "\nPrints one exit code a line, in the order given; the exit status is the last one's.\n" +
        'An application that has already ended answers at once. A snapshot that ends it, or\n' +
        'appshot rm, leaves no exit code: that is an error.\n\n' +
        'Examples:\n  appshot wait web\n  appshot run -d --aid job -- ./batch && appshot wait job && appshot logs job',
    )
    .action(async (aids: string[], opts: { json: boolean; jsonObject: boolean }) => {
      const reg = registry();
      for (const aid of aids) reg.requireAny(aid);
      let status: number = ExitCode.ok;
      const waited: { aid: string; exitCode?: number; endedAt?: string }[] = [];
      for (const aid of aids) {
        const ended = await waitEnded(reg, aid);
        if (ended === 'released' || !ended) {
          const snapshotted = reg.getSnapshotted(aid);
          if (snapshotted) process.stderr.write(`appshot: '${aid}' was ${describeSnapshot(snapshotted)}: no exit code\n`);
          else process.stderr.write(`appshot: '${aid}' was released before it ended (a snapshot ended it, or it was removed): no exit code\n`);
          status = ExitCode.failure;
          waited.push({ aid });
          continue;
        }
        if (ended.lost) {
          process.stderr.write(`appshot: '${aid}' was ${describeEnd(ended)}\n`);
          status = ExitCode.failure;
          waited.push({ aid, endedAt: ended.endedAt });
          continue;
        }
        // Without --json, each code as soon as it is known (docker wait).
        if (!wantsJson(opts)) process.stdout.write(`${ended.exitCode}\n`);
        waited.push({ aid, exitCode: ended.exitCode, endedAt: ended.endedAt });
        status = ended.exitCode ?? ExitCode.failure;
      }
      if (wantsJson(opts)) json('wait', waited, opts);
      setExitCode(status);
    });

  program
    .command('rm')
    .description('remove ended applications: record, log, private copies, REDIR PATH directories, port claims')
    .argument('<aid...>', 'the applications')
    .option('-f, --force', 'kill a running application (SIGKILL) and remove it', false)
    .option('--json', 'print [{aid}] of those removed as JSON', false)
    .option(...jsonObjectOption('rm'))
    .addHelpText(
      'after',
      '\nPrints the AID of each application removed. A running application is refused without\n' +
        '--force. Removing a clone removes its private copies of files: an image taken of it with\n' +
        '--leave-running cannot be restored after. Removing a snapshotted application (ps -a)\n' +
        'removes its record and the log kept for its restore, and has appshot-keeper close the\n' +
        'connections it held for that restore (and free the port of a listener it held); its image,\n' +
        'and what the image needs, stay. The REDIR PATH directories made for an application of\n' +
        'which an image was taken (--leave-running or not) stay for that image, and are named.\n\n' +
        'Examples:\n  appshot rm web\n  appshot rm -f db-1 db-2',
    )
    .action(async (aids: string[], opts: { force: boolean; json: boolean; jsonObject: boolean }) => {
      // All of them together (lifecycle.ts removeApps): killed at once,
      // waited for at once, removed in one pass.
      const { removed, failed, kept } = await removeApps(registry(), aids, opts.force);
      for (const line of kept) process.stderr.write(`appshot: ${line}\n`);
      for (const { error } of failed) {
        process.stderr.write(`appshot: ${error.message}\n`);
        setExitCode(error.exitCode);
      }
      if (wantsJson(opts)) json('rm', removed.map((aid) => ({ aid })), opts);
      else if (removed.length) process.stdout.write(removed.map((aid) => `${aid}\n`).join(''));
    });

  program
    .command('prune')
    .description('remove every ended or snapshotted application (as appshot rm does each)')
    .option('--json', 'print [{aid}] of those removed as JSON', false)
    .option(...jsonObjectOption('prune'))
    .addHelpText('after', '\nPrints the AIDs it removed. Running applications are left alone.\n\nExample:\n  appshot prune')
    .action((opts: { json: boolean; jsonObject: boolean }) => {
      const removed = pruneEnded(registry(), (line) => process.stderr.write(`appshot: ${line}\n`)).map((aid) => ({ aid }));
      if (wantsJson(opts)) json('prune', removed, opts);
      else printAids(removed);
    });

  program
    .command('snapshot')
    .description("freeze every process of an application and write its image")
    .argument('[aid]', 'the application (or --aid)')
    .option('--aid <name>', 'the application')
    .option('-o, --output <path>', "image directory to create; a file if it ends in .tar, .tar.gz (gzip) or .tar.zst (zstd, with the zstd program); '-' for a tar stream on stdout (default: ./AID-TIME.appshot)")
    .option('--leave-running', 'resume the application afterwards instead of ending it; the next directory snapshot is incremental on this one', false)
    .option('--no-cow-capture', 'with --leave-running, copy all memory while the application is frozen rather than from a copy-on-write fork of each process made then (also APPSHOT_COW_CAPTURE=0)')
    .option('--full', 'do not build on the previous image (no incremental snapshot; .tar, .tar.gz, .tar.zst and - are always whole)', false)
    .option('--pre-copy', 'copy memory while the application runs, then freeze it only for the pages written meanwhile (the first copy goes in the image\'s base/)', false)
    .option('--timeout <seconds>', 'give up if some thread cannot be stopped within this time', '10')
    .option('--tcp-close', 'record established TCP connections as closed instead of keeping them (no CAP_NET_ADMIN needed): the restored application sees them reset', false)
    .option('--tcp-hold <duration>', "how long the ended application's connections are held on this host for its restore (0: not held)", '15m')
    .option('--json', 'print what was written as JSON', false)
    .option('--progress <how>', PROGRESS_HELP, 'auto')
    .addHelpText(
      'after',
      '\nBy default the application ends once its image is safely written, and its SysV objects are\n' +
        'removed. A snapshot that fails leaves the application running and no image, but once it has\n' +
        'begun to end it (exit 6): the image is whole and the application ended. Established TCP\n' +
        'connections are kept with TCP repair (CAP_NET_ADMIN): their peers carry on after the restore.\n' +
        'Until then a small appshot-keeper process holds them silent (--tcp-hold), so that a peer that\n' +
        'sends meanwhile is not reset. A resource that cannot be captured is refused by name, and\n' +
        'the application is left running.\n\n' +
        'Examples:\n  appshot snapshot dbserver -o db.appshot\n  appshot snapshot dbserver -o db.tar.gz       one compressed file\n  appshot snapshot dbserver --leave-running\n' +
        '  appshot snapshot dbserver -o - | ssh node2 appshot restore -',
    )
    .action(async (aidArg: string | undefined, opts: { aid?: string; output?: string; leaveRunning: boolean; cowCapture: boolean; full: boolean; preCopy: boolean; timeout: string; tcpClose: boolean; tcpHold: string; json: boolean; progress: string }) => {
      if (opts.aid !== undefined && aidArg !== undefined && opts.aid !== aidArg)
        throw new AppshotError(`two applications named: '${aidArg}' and --aid '${opts.aid}'; give one`, ExitCode.usage);
      const aid = opts.aid ?? aidArg;
      if (!aid) throw new AppshotError('which application? give its AID (appshot ps lists them)', ExitCode.usage);
      const timeout = Number(opts.timeout);
      if (!(timeout > 0)) throw new AppshotError(`--timeout '${opts.timeout}': expected a positive number of seconds`, ExitCode.usage);
      const { parseDuration, formatDuration } = await import('./serve/spec.js');
      const tcpHoldSeconds = Math.ceil(parseDuration(opts.tcpHold, '--tcp-hold') / 1000);
      const stamp = new Date().toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-');
      await compileEagerly();
      const [{ snapshot }, { ProgressDisplay, progressMode }] = await Promise.all([import('./snapshot/driver.js'), import('./progress.js')]);
      const display = new ProgressDisplay(`snapshot ${aid}`, progressMode(opts.progress));
      // Ctrl-C or SIGTERM: given up at the next safe point, the application
      // left running as it was (the driver's one line says so).
      const interrupt = new AbortController();
      const uninstall = onInterrupt('abort', () => interrupt.abort());
      let result;
      try {
        result = await snapshot(registry(), aid, {
          output: opts.output ?? `${aid}-${stamp}.appshot`,
          leaveRunning: opts.leaveRunning,
          cowCapture: opts.cowCapture,
          full: opts.full,
          preCopy: opts.preCopy,
          tcpClose: opts.tcpClose,
          tcpHoldSeconds,
          timeoutMs: timeout * 1000,
          progress: display,
          signal: interrupt.signal,
          onRetry: (reason, pauseMs) => process.stderr.write(`appshot: ${reason}: trying again in ${pauseMs} ms\n`),
        });
      } finally {
        uninstall();
        display.end();
      }
      if (opts.json) {
        const out = withSchema('snapshot', {
          ...result,
          frozenMs: roundMs(result.frozenMs),
          totalMs: roundMs(result.totalMs),
          ...(result.preCopyFrozenMs !== undefined ? { preCopyFrozenMs: roundMs(result.preCopyFrozenMs) } : {}),
        });
        // With -o -, stdout is the image.
        if (result.image === '-') process.stderr.write(JSON.stringify(out) + '\n');
        else json('snapshot', out);
      } else if (result.image !== '-') {
        process.stdout.write(result.image + '\n');
        process.stderr.write(
          `appshot: ${plural(result.processes, 'process')}, ${plural(result.threads, 'thread')}, ${(result.bytes / 1048576).toFixed(1)} MiB` +
            (result.parent ? ` (incremental on ${result.parent}: ${plural(result.pagesFromParent, 'page')} unchanged; --full for a whole image)` : '') +
            `; frozen ${result.frozenMs.toFixed(1)} ms` +
            (result.leftRunning ? '' : ` (kept stopped ${result.phases.heldMs.toFixed(0)} ms, until its image was on disk and it was ended)`) +
            `, ${result.totalMs.toFixed(0)} ms in all` +
            (result.leftRunning ? '; still running' : '; ended') + '\n',
        );
        if (result.keptConnections) {
          const k = result.keptConnections;
          const what = [
            ...(k.held ? [`${k.held} connection${k.held > 1 ? 's' : ''}`] : []),
            ...(k.waiting ? [`${k.waiting} connection${k.waiting > 1 ? 's' : ''} not yet accepted (in ${k.waiting > 1 ? 'their' : 'its'} listener's queue)`] : []),
          ].join(' and ');
          process.stderr.write(
            `appshot: ${what} held by appshot-keeper for a restore on this host within ${formatDuration(k.holdSeconds * 1000)}` +
              (k.needed ? ` (${k.needed} restorable only through it: the image holds no state for ${k.needed > 1 ? 'them' : 'it'})\n` : '\n'),
          );
        }
      }
      // The image stands (exit 0); what failed after its commit is said.
      for (const w of result.warnings ?? []) process.stderr.write(`appshot: warning: ${printable(w)}
`);
    });

  program
    .command('inspect')
    .description('show what an image holds: processes, threads, memory map, files, IPC objects, tables')
    .argument('<image>', "an image directory, a .tar, .tar.gz or .tar.zst file, or '-' for a tar stream on stdin")
    .option('--json', 'the whole image as JSON', false)
    .addHelpText('after', '\nAny image can be inspected, signed or not; the first line says who signed it.\n\nExamples:\n  appshot inspect db.appshot\n  appshot inspect db.tar.gz --json')
    .action(async (path: string, opts: { json: boolean }) => {
      const [{ loadImage }, { imageJson, printImage }] = await Promise.all([import('./image/format.js'), import('./image/show.js')]);
      const loaded = await loadImage(path, { trust: 'report' });
      try {
        if (opts.json) json('inspect', imageJson(loaded.manifest, loaded.image, loaded.signer) as object);
        else printImage(loaded.manifest, loaded.image, loaded.signer);
      } finally {
        loaded.dispose();
      }
    });

  program
    .command('restore')
    .description('bring an image back as a running application, here or on another node')
    .argument('<image>', "an image directory, a .tar, .tar.gz or .tar.zst file, or '-' for a tar stream on stdin")
    .option('--aid <name>', "the AID to run it as (default: the image's own)")
    // A restore always runs in the background and prints the AID, as
    // docker's -d does; -d is accepted, so that a script that gives it
    // (as to run) works, and not shown: a flag that changes nothing.
    .addOption(new Option('-d, --detach', 'the default, and the only way: a restore runs in the background').default(true).hideHelp())
    .option('--lazy', "map memory copy-on-write from the image's page file instead of copying it", false)
    .option('--verify', "checksum the page data even if this node's snapshot wrote it and it is unchanged since", false)
    .option('--json', 'print {aid, processes, threads, restoreMs, ...} as JSON', false)
    .option('--trust-image', 'run the image even if no key this node trusts signed it (you vouch for it)', false)
    .option('--progress <how>', PROGRESS_HELP, 'auto')
    .addHelpText(
      'after',
      "\nThe image is verified first (its signature, checksums, format and structure, this node's kernel\n" +
        'and the files it maps; the page data\'s checksums are skipped only for a page file this state\n' +
        'directory\'s snapshot wrote and nothing changed since: --verify checks them all the same).\n' +
        'Only images signed by this node\'s key or one it imported (appshot key)\n' +
        'are restored, unless --trust-image is given. A restore that fails leaves no process, SysV\n' +
        'object or table behind. The application runs in the background with the same virtual PIDs\n' +
        'and SysV ids; output that went to a terminal goes to its log. A --lazy restore needs the\n' +
        "image's pages.img for as long as it runs.\n\n" +
        'Examples:\n  appshot restore db.appshot\n  appshot restore db.appshot --aid db2\n  ssh node1 appshot snapshot db -o - | appshot restore -\n' +
        '  appshot restore --trust-image downloaded.appshot',
    )
    .action(async (image: string, opts: { aid?: string; lazy: boolean; verify: boolean; json: boolean; trustImage: boolean; progress: string }) => {
      if (opts.aid !== undefined) checkAid(opts.aid);
      await compileEagerly();
      const [{ trustImagesExplicitly }, { restore, RestoredWithError }, { ProgressDisplay, progressMode }] = await Promise.all([
        import('./image/trust.js'),
        import('./restore/driver.js'),
        import('./progress.js'),
      ]);
      if (opts.trustImage) trustImagesExplicitly();
      // Named as snapshot names it, by its absolute path, in --json and in
      // the registration ps shows: a relative one means nothing elsewhere.
      const imagePath = image === '-' ? image : resolve(image);
      const reg = registry();
      const display = new ProgressDisplay(`restore ${image === '-' ? 'stdin' : image}`, progressMode(opts.progress));
      // Ctrl-C or SIGTERM: what was made is removed, as after a failure.
      const interrupt = new AbortController();
      const uninstall = onInterrupt('abort', () => interrupt.abort());
      // What was made, on stdout as on success, also when a step after the
      // commit failed (exit 6): it runs, and a script needs its AID.
      const print = (result: Awaited<ReturnType<typeof restore>>, error?: string) => {
        if (opts.json)
          json('restore', {
            aid: result.aid,
            image: imagePath,
            processes: result.processes,
            threads: result.threads,
            initPid: result.initPid,
            restoreMs: roundMs(result.restoreMs),
            verifyMs: roundMs(result.verifyMs),
            pagesChecked: result.pagesChecked,
            lazy: result.lazy,
            injectedCalls: result.injectedCalls,
            notKept: result.notKept,
            ...(error ? { error } : {}),
          });
        else {
          process.stdout.write(result.aid + '\n');
          if (!error) process.stderr.write(`appshot: restored ${plural(result.processes, 'process')}, ${plural(result.threads, 'thread')} in ${result.restoreMs.toFixed(1)} ms\n`);
        }
      };
      let result;
      try {
        // Where it came from, for ps, in its registration (a stream has no
        // path to show).
        result = await restore(reg, image, { aid: opts.aid, lazy: opts.lazy, verifyPages: opts.verify, progress: display, signal: interrupt.signal, ...(image === '-' ? {} : { recordImage: imagePath }) });
      } catch (e) {
        // Committed, then a step failed: it runs all the same (exit 6).
        if (e instanceof RestoredWithError) print(e.restored, e.message);
        throw e;
      } finally {
        uninstall();
        display.end();
      }
      print(result);
      for (const n of result.notKept) process.stderr.write(`appshot: warning: not kept: ${printable(n)}\n`);
    });

  const template = program
    .command('template')
    .description('snapshot virtual templates: one warmed-up application, many clones')
    .addHelpText('after', '\nExample:\n  appshot template create db.appshot -o db.template && appshot clone db.template --count 4');

  template
    .command('create')
    .description('turn a snapshot into a template, classifying every resource for cloning')
    .argument('<snapshot>', 'a full snapshot image (directory, tar file, or - for stdin)')
    .requiredOption('-o, --output <path>', 'the template directory to create')
    .option('--rules <file>', 'classify by these rules instead of those the application ran under')
    .option('--name <name>', 'the template\'s name (default: from --output); clones are named after it')
    .option('--json', 'print the verdicts as JSON', false)
    .option('--trust-image', 'accept the snapshot even if no key this node trusts signed it (you vouch for it)', false)
    .option('--progress <how>', PROGRESS_HELP, 'auto')
    .addHelpText(
      'after',
      '\nEach resource gets a verdict: share, copy-on-write, duplicate, virtualize, multiplex, allocate\n' +
        '(or recreate), from a rule or from the standard criteria (shared? modifiable? large with an\n' +
        'underlying object? system-wide unique? exported to clients?). What cannot be templated (a unix\n' +
        'socket listening on a path, a FIFO, a writable shared file mapping) is refused by name, and\n' +
        'nothing is written. The snapshot\'s parts are hard-linked where possible. The snapshot must be\n' +
        'signed by a trusted key (or --trust-image); the template is signed with this node\'s key.\n\n' +
        'Example:\n  appshot run -d --aid db --rules templates/redis.rules -- redis-server --port 6379\n' +
        '  appshot snapshot db -o db.appshot && appshot template create db.appshot -o db.template',
    )
    .action(async (snapshotPath: string, opts: { output: string; rules?: string; name?: string; json: boolean; trustImage: boolean; progress: string }) => {
      if (opts.name !== undefined) checkAid(opts.name);
      await compileEagerly();
      const [{ trustImagesExplicitly }, { createTemplate }, { ProgressDisplay, progressMode }] = await Promise.all([
        import('./image/trust.js'),
        import('./template/template.js'),
        import('./progress.js'),
      ]);
      if (opts.trustImage) trustImagesExplicitly();
      const display = new ProgressDisplay(`template ${opts.output}`, progressMode(opts.progress));
      // Ctrl-C or SIGTERM: given up while the snapshot is checked, nothing
      // written (the driver's one line says so).
      const interrupt = new AbortController();
      const uninstall = onInterrupt('abort', () => interrupt.abort());
      let summary;
      try {
        summary = await createTemplate(snapshotPath, opts.output, { rules: opts.rules, name: opts.name, progress: display, signal: interrupt.signal });
      } finally {
        uninstall();
        display.end();
      }
      if (opts.json) json('template create', templateJson(summary));
      else {
        process.stdout.write(summary.template + '\n');
        const counts = Object.entries(summary.actions).map(([a, n]) => `${n} ${a}`).join(', ');
        process.stderr.write(`appshot: template '${printable(summary.name)}': ${plural(summary.verdicts.length, 'resource')} (${counts})\n`);
        // What the rules leave shared is worth a warning; the rest `show` lists.
        for (const s of summary.shared.filter((s) => !s.handled)) process.stderr.write(`appshot: warning: every clone will share this: ${printable(`${s.what}; ${s.fix}`)}\n`);
        // The first few, then how many more: a rules file of thousands of
        // idle rules printed a warning each (fuzz33 L6). --json has them all.
        const unmatched = summary.unmatched ?? [];
        for (const u of unmatched.slice(0, UNMATCHED_SHOWN)) process.stderr.write(`appshot: warning: rule ${printable(u.rule)} matches nothing in this snapshot: ${printable(u.text)}\n`);
        if (unmatched.length > UNMATCHED_SHOWN) process.stderr.write(`appshot: warning: ... and ${plural(unmatched.length - UNMATCHED_SHOWN, 'more rule')} that match nothing in this snapshot (all of them: template create --json)\n`);
        for (const h of summary.hooks) process.stderr.write(`appshot: every clone runs this IDENTITY hook: ${printable(h)}\n`);
      }
    });

  template
    .command('show')
    .description("a template's resources and what cloning does with each")
    .argument('<template>', 'the template directory')
    .option('--json', 'machine-readable output', false)
    .addHelpText('after', '\nExamples:\n  appshot template show db.template\n  appshot template show db.template --json')
    .action(async (path: string, opts: { json: boolean }) => {
      const [{ openTemplate, summarize }, { sharedState }] = await Promise.all([import('./template/template.js'), import('./resources/identity.js')]);
      const t = await openTemplate(path, true, 'report');
      try {
        const summary = summarize(t.path, t.template, sharedState(t.loaded.image, t.rules));
        if (opts.json) {
          json('template show', templateJson(summary));
          return;
        }
        // The template's own name, rules and findings: anyone may have written them.
        process.stdout.write(`template ${printable(summary.name)} (image ${summary.imageId})${summary.rules ? `, rules ${printable(summary.rules)}` : ''}\n`);
        printColumns(['ACTION', 'KIND', 'RESOURCE', 'WHY'], summary.verdicts.map((v) => [v.action, v.kind, v.name, v.reason]));
        if (summary.hooks.length) {
          process.stdout.write('\nIDENTITY hooks every clone runs once it resumed (an EXEC as its first process\'s user):\n');
          for (const h of summary.hooks) process.stdout.write(`  ${printable(h)}\n`);
        }
        if (summary.shared.length) {
          process.stdout.write('\nwhat every clone would share with the others and the template:\n');
          for (const s of summary.shared) process.stdout.write(`  ${(s.handled ? 'handled' : 'SHARED').padEnd(8)} ${printable(s.what)}\n           -> ${printable(s.fix)}\n`);
        }
      } finally {
        t.loaded.dispose();
      }
    });

  program
    .command('clone')
    .description('stamp new running instances from a template, each under its own AID')
    .argument('<template>', 'the template directory')
    .option('--aid <name>', 'the AID; with --count N, instances are AID-1 ... AID-N (default: NAME-xxxxxx)')
    .option('-n, --count <n>', 'how many instances', '1')
    .option('--verify', "checksum the template's page data too (checked when the template was made; its size always is)", false)
    .option('--json', 'print [{aid, ports, cloneMs, ...}] as JSON', false)
    .option(...jsonObjectOption('clone'))
    .option('--trust-image', 'clone the template even if no key this node trusts signed it (you vouch for it)', false)
    .option('--progress <how>', PROGRESS_HELP, 'auto')
    .option('--no-prepared', "make every instance now, none of those the engine holds ready (APPSHOT_CLONE_POOL=0: none held)")
    .addHelpText(
      'after',
      '\nMemory is mapped copy-on-write from the template (clones share its pages until they write),\n' +
        'files under copy-on-write rules are copied when an instance first writes them, PIDs and SysV\n' +
        'ids are the template\'s virtual ones bound to new objects, a multiplexed port is shared by all\n' +
        'instances, an allocated one is the instance\'s own (appshot port AID). All or nothing: if one\n' +
        'instance fails, the ones made before it are removed; once the batch has committed, a step that\n' +
        'fails leaves every instance running (exit 6, naming them).\n\n' +
        'Examples:\n  appshot clone db.template --aid db-a\n  appshot clone db.template --count 8 --json',
    )
    .action(async (path: string, opts: { aid?: string; count: string; verify: boolean; json: boolean; jsonObject: boolean; trustImage: boolean; progress: string; prepared: boolean }) => {
      await compileEagerly();
      const [{ trustImagesExplicitly }, { clone, ClonedWithError, MAX_CLONES }, { ProgressDisplay, progressMode }] = await Promise.all([
        import('./image/trust.js'),
        import('./template/clone.js'),
        import('./progress.js'),
      ]);
      if (opts.trustImage) trustImagesExplicitly();
      const count = Number(opts.count);
      if (!(Number.isInteger(count) && count >= 1 && count <= MAX_CLONES)) throw new AppshotError(`--count '${opts.count}': expected a whole number from 1 to ${MAX_CLONES}`, ExitCode.usage);
      if (opts.aid !== undefined) checkAid(opts.aid);
      const display = new ProgressDisplay(`clone ${path}`, progressMode(opts.progress));
      // Ctrl-C or SIGTERM: the batch stops after the instance being made, and
      // every instance it made goes (all or nothing, as for a failure).
      // In the engine, the client going away (its Ctrl-C) stands for it.
      const interrupt = new AbortController();
      const uninstall = onInterrupt('abort', () => interrupt.abort());
      // The instances on stdout, also when a step after the batch's commit
      // failed (exit 6): they run, and a script needs their AIDs.
      const print = (results: Awaited<ReturnType<typeof clone>>) => {
        if (wantsJson(opts)) return json('clone', results.map(({ createdDirs: _, cloneMs, ...r }) => ({ ...r, cloneMs: roundMs(cloneMs) })), opts);
        for (const r of results) {
          const ports = r.ports.map(portText).join(' ');
          process.stdout.write(`${r.aid}${ports ? `\t${ports}` : ''}\n`);
        }
      };
      let results;
      try {
        results = await clone(registry(), path, {
          aid: opts.aid,
          count,
          verify: opts.verify,
          signal: interrupt.signal,
          progress: display,
          noPrepared: !opts.prepared,
        });
      } catch (e) {
        if (e instanceof ClonedWithError) print(e.cloned);
        throw e;
      } finally {
        uninstall();
        display.end();
      }
      print(results);
      if (wantsJson(opts)) return;
      const ms = results.map((r) => r.cloneMs);
      process.stderr.write(`appshot: ${plural(results.length, 'instance')} in ${ms.reduce((a, b) => a + b, 0).toFixed(1)} ms (${Math.min(...ms).toFixed(1)} ms the fastest)\n`);
    });

  const key = program
    .command('key')
    .description("the keys images are signed with: this node's, and those of the nodes it trusts")
    .addHelpText(
      'after',
      '\nsnapshot signs each image with this node\'s key ($APPSHOT_HOME/keys/self.key, made at first use).\n' +
        'restore, clone and template create run only images signed by it or by an imported key.\n\n' +
        'Example (node2 trusts the images of node1):\n  node1$ appshot key export -o node1.pub\n  node2$ appshot key import node1.pub --name node1',
    );

  key
    .command('export')
    .description("print this node's public key (it lets another node check this node's images, not sign them)")
    .option('-o, --output <file>', 'write it to this file instead')
    .addHelpText('after', '\nExamples:\n  appshot key export -o node1.pub\n  appshot key export | ssh node2 appshot key import /dev/stdin --name node1')
    .action(async (opts: { output?: string }) => {
      const { exportKey } = await import('./image/trust.js');
      const pem = exportKey();
      if (opts.output) writeFileSync(opts.output, pem, { flag: 'wx', mode: 0o644 });
      else process.stdout.write(pem);
    });

  key
    .command('import')
    .description("trust the images signed by another node's key (a file appshot key export wrote)")
    .argument('<file>', 'the exported public key')
    .option('--name <name>', 'what to call it (default: its id)')
    .addHelpText('after', '\nExample:\n  appshot key import node1.pub --name node1')
    .action(async (file: string, opts: { name?: string }) => {
      const { importKey } = await import('./image/trust.js');
      const k = importKey(file, opts.name);
      process.stdout.write(`${k.id}\t${k.name}\n`);
    });

  key
    .command('ls')
    .description('list the keys this node trusts (its own first)')
    .option('--json', 'machine-readable output', false)
    .option(...jsonObjectOption('key ls'))
    .addHelpText('after', '\nExample:\n  appshot key ls')
    .action(async (opts: { json: boolean; jsonObject: boolean }) => {
      const { selfKey, trustedKeys } = await import('./image/trust.js');
      selfKey(); // made at first use, and listing is one
      const keys = trustedKeys().map((k) => ({ id: k.id, name: k.name, file: k.file }));
      if (wantsJson(opts)) json('key ls', keys, opts);
      else printColumns(['ID', 'NAME', 'FILE'], keys.map((k) => [k.id, k.name, k.file]));
    });

  program
    .command('port')
    .description('every TCP port an application listens on: as it asks for it and as it has it (like docker port)')
    .argument('<aid>', 'the application')
    .argument('[port]', 'only this port, as the application knows it: prints the port to connect to')
    .option('--json', 'machine-readable output', false)
    .option(...jsonObjectOption('port'))
    .addHelpText(
      'after',
      '\nMODE: allocate (a port of its own, translated), multiplex (one port shared by the clones of a\n' +
        'template), direct (no rule translates it: the port it asked for).\n\n' +
        'Examples:\n  appshot port db-1\n  redis-cli -p $(appshot port db-1 6379) ping',
    )
    .action((aid: string, port: string | undefined, opts: { json: boolean; jsonObject: boolean }) => {
      const reg = registry();
      const record = reg.require(aid);
      let rows = portsOf(record, listProcesses(reg, [record]));
      if (port !== undefined) {
        if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) throw new AppshotError(`'${port}' is not a TCP port (1-65535)`, ExitCode.usage);
        rows = rows.filter((p) => p.virtual === Number(port));
        if (!rows.length) throw new AppshotError(`'${aid}' does not listen on port ${port}`, ExitCode.notFound);
      }
      if (wantsJson(opts)) json('port', rows, opts);
      else if (port !== undefined) process.stdout.write(`${rows[0].system}\n`);
      else printColumns(['PORT', 'HOST PORT', 'MODE'], rows.map((p) => [String(p.virtual), String(p.system), p.mode]));
    });

  registerVersion(program);
  registerCheck(program);
  registerImages(program);
  registerServe(program);
  registerEngine(program);
  registerCompletion(program);
  applyHouseStyle(program);
  return program;
}

/** Whether `r`'s application is known to have ended with its supervisor
 * (isStale); false when the look at the processes failed (no descriptor
 * left, a refusal root should not get): followed on, as `ps` keeps it,
 * rather than `logs -f` failing on another's doing (review r435 N5). */
function knownStale(reg: LocalRegistry, r: AppRecord): boolean {
  try {
    return reg.isStale(r);
  } catch (e) {
    // Only a failed system call (the addon's errors carry its code); a
    // bug of appshot's is not followed on in silence (review r438 F7).
    if (!(e as NodeJS.ErrnoException)?.code) throw e;
    return false;
  }
}

/** Anything but an AppshotError is a bug of appshot's (a crafted image that
 * got past validation, say): one line, never a stack trace, unless asked. */
function reportInternalError(e: unknown): void {
  if (process.env.APPSHOT_DEBUG) process.stderr.write(`${(e as Error)?.stack ?? String(e)}\n`);
  const message = printable(String((e as Error)?.message ?? e).split('\n')[0]);
  process.stderr.write(`appshot: internal error: ${message}${process.env.APPSHOT_DEBUG ? '' : ' (APPSHOT_DEBUG=1 shows the stack)'}\n`);
  setExitCode(ExitCode.internal);
}

/** Reports an error that ended a command, as its one line and exit code. */
export function reportError(e: unknown): void {
  if (e instanceof CommanderError) {
    // Help and version end here too, with exit code 0.
    setExitCode(e.exitCode === 0 ? 0 : ExitCode.usage);
    return;
  }
  if (e instanceof AppshotError) {
    process.stderr.write(`appshot: ${printable(e.message)}\n`);
    setExitCode(e.exitCode);
    return;
  }
  if (isSystemCallError(e)) {
    process.stderr.write(`appshot: ${printable(errorText(e))}\n`);
    setExitCode(ExitCode.failure);
    return;
  }
  reportInternalError(e);
}

/** The command group that `words` name, if they name one and nothing
 * else: the program itself for no words. A command with subcommands that
 * does something itself (`serve`, whose one subcommand is `stop`) is not
 * a group here. */
function commandGroup(program: Command, words: string[]): Command | undefined {
  let target = program;
  for (const word of words) {
    const sub = target.commands.find((c) => c.name() === word || c.aliases().includes(word));
    if (!sub) return undefined;
    target = sub;
  }
  const acts = !!(target as unknown as { _actionHandler?: unknown })._actionHandler;
  return target.commands.length > 0 && !acts ? target : undefined;
}

/** A command line built ahead of the command that will parse it (the
 * engine builds the next one while it waits: prepareProgram). */
let spareProgram: Command | undefined;

/** Builds the command line the next runCommand takes, now rather than
 * while a client waits (~0.5 ms): it depends on nothing of the command
 * (its environment, directory and output are looked up when it runs). */
export function prepareProgram(): void {
  spareProgram ??= buildProgram();
}

/**
 * Has V8 compile each function of the code loaded from now on when it
 * loads, not when it is first called: the commands that freeze or start
 * an application (snapshot, restore, template create, clone) run most of
 * their code once per process, and a function compiled lazily is parsed
 * twice (once to skip it, once on its first call), inside the frozen
 * window for the dump's. Measured in-process (tiny memapp, `snapshot
 * --leave-running`, 10 pairs alternated, load ~3): frozen window median
 * 25.2 -> 17.3 ms, the whole command 111.5 -> 96.0 ms. Not for the other
 * commands, which load less than they would compile. The engine runs
 * with --no-lazy from its start (engine/spawn.ts).
 */
async function compileEagerly(): Promise<void> {
  (await import('node:v8')).setFlagsFromString('--no-lazy');
}

/** The modules of the commands that freeze or start applications, loaded
 * by the engine while it waits for its first of them. */
export async function loadCommandModules(): Promise<void> {
  await Promise.all([import('./snapshot/driver.js'), import('./restore/driver.js'), import('./template/template.js'), import('./template/clone.js'), import('./progress.js'), import('./image/trust.js')]);
}

/**
 * Runs one command line (argv as process.argv: node, script, args...) to
 * its end: its output goes to process.stdout/stderr, its exit code through
 * setExitCode. Never ends the process: the engine runs commands with this
 * too, in the context of a request (engine/request.ts).
 */
export async function runCommand(argv: string[]): Promise<void> {
  const program = spareProgram ?? buildProgram();
  spareProgram = undefined;
  const columns = currentRequest()?.tty.columns;
  if (currentRequest())
    program.configureOutput({ getOutHelpWidth: () => columns ?? 80, getErrHelpWidth: () => columns ?? 80 });
  // `appshot` alone, or a group alone (`appshot template`): its help on
  // stdout and exit 0, as docker and kubectl do. Nothing was asked that
  // could fail; commander would print it on stderr and exit 2.
  const group = commandGroup(program, argv.slice(2));
  if (group) {
    group.outputHelp();
    return;
  }
  try {
    // What a command killed with SIGKILL left half-written: removed before
    // every command's action (--help and --version have none), and the
    // ending of an application a killed snapshot left half-done finished.
    // A command that only looks leaves an ending tried lately and left
    // undecided for later (ending.ts): each try stops the application.
    program.hook('preAction', async (_program, action) => {
      // Before anything is read, removed or written there: a state
      // directory another user can change is refused (home.ts).
      const { defaultHome, refuseUnsafeHome } = await import('./home.js');
      refuseUnsafeHome(defaultHome());
      await (await import('./image/partial.js')).settleKilledCommands(undefined, { lookOnly: LOOK_ONLY.has(action.name()) });
    });
    await program.parseAsync(argv);
  } catch (e) {
    reportError(e);
  }
}

/** The commands that only look: ps, table, logs, inspect, template show,
 * key ls, port (settleKilledCommands' lookOnly). */
const LOOK_ONLY = new Set(['ps', 'table', 'logs', 'inspect', 'show', 'ls', 'port']);

/** Each AID's running application, every one checked before any is acted
 * on: one that cannot be (unknown, ended) refuses the whole command, and
 * with several the line says the others were left as they were. One that
 * ended while its supervisor was waited for is given as it ended
 * (requireSignallable), unless `running` refuses it. */
async function requireEach<T = AppRecord | 'released'>(reg: LocalRegistry, aids: string[], done: string, running = (_aid: string, found: AppRecord | 'released') => found as T): Promise<T[]> {
  const records: T[] = [];
  for (const aid of aids) {
    try {
      // Its supervisor named, if `run` has just started it (lifecycle.ts).
      records.push(running(aid, await requireSignallable(reg, aid)));
    } catch (e) {
      const others = aids.filter((a) => a !== aid);
      if (e instanceof AppshotError && others.length) throw new AppshotError(`${e.message}; none was ${done} (${others.map((a) => `'${a}'`).join(', ')} left as before)`, e.exitCode);
      throw e;
    }
  }
  return records;
}

/** The CLI process: one command, then the process ends. */
export async function main(): Promise<void> {
  // Errors outside the command's own promise (a stream's 'error' event, a
  // callback) are reported the same way.
  process.on('uncaughtException', (e) => {
    if (e instanceof AppshotError) {
      process.stderr.write(`appshot: ${e.message}\n`);
      process.exit(e.exitCode);
    }
    reportInternalError(e);
    process.exit(ExitCode.internal);
  });
  // `appshot inspect IMAGE | head`: a reader that goes away is not an error.
  // Unless standard output carries an image: its writer reports the failure.
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (standardOutput.carriesImage) return;
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw e;
  });
  await runCommand(process.argv);
}
