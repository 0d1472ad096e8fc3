/**
 * appshot's command line. Each command is a thin layer over a module; this
 * file owns only argument parsing, output format and exit codes.
 */
import { Command, CommanderError, Option } from 'commander';
import { createReadStream, existsSync, statSync, writeFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppshotError, ExitCode } from './errors.js';
import { execIn, run } from './harness.js';
import { formatId, listProcesses, printColumns, signalProcesses, tableRows } from './inspect.js';
import { LocalRegistry, checkAid } from './registry.js';
import { loadImage } from './image/format.js';
import { removeStaleTemporaries } from './image/partial.js';
import { imageJson, printImage } from './image/show.js';
import { exportKey, importKey, selfKey, trustedKeys, trustImagesExplicitly } from './image/trust.js';
import { snapshot } from './snapshot/driver.js';
import { restore } from './restore/driver.js';
import { Progress } from './progress.js';
import { clone } from './template/clone.js';
import { createTemplate, openTemplate, summarize } from './template/template.js';
import { sharedState } from './resources/identity.js';

const program = new Command();
const registry = () => new LocalRegistry();
const json = (value: unknown) => process.stdout.write(JSON.stringify(value, null, 2) + '\n');

program
  .name('appshot')
  .description(
    'Run applications with virtual PIDs and SysV IPC ids, so that they can be snapshotted,\n' +
      'restored on any node and cloned. State lives in $APPSHOT_HOME (see README).',
  )
  .version('0.1.0')
  .showHelpAfterError('(run with --help for usage)')
  .exitOverride();

program
  .command('run')
  .description('register an application id (AID) and run a command as that application')
  .option('--aid <name>', 'the AID to register (default: a generated one, printed)')
  .option('-d, --detach', 'run in the background; output goes to the log (appshot logs AID)', false)
  .option('--json', 'with --detach: print {aid, vpid, pid} as JSON', false)
  .option('--rules <file>', 'templating rules (templates/README.md): REDIR PATH and SET ENV apply now; snapshots classify resources by them')
  .argument('<command...>', 'the command and its arguments (put them after --)')
  .addHelpText(
    'after',
    '\nExamples:\n  appshot run --aid dbserver -- redis-server --port 7000\n  appshot run -d -- ./server\n\n' +
      'The exit status is the command\'s own (128 + N if it was killed by signal N); 127 if it\n' +
      'was not found, 126 if it could not be executed. A command that daemonizes keeps running\n' +
      'inside the application after `appshot run` returns.',
  )
  .action(async (command: string[], opts: { aid?: string; detach: boolean; json: boolean; rules?: string }) => {
    if (opts.aid !== undefined) checkAid(opts.aid);
    const code = await run(registry(), command, {
      aid: opts.aid,
      detach: opts.detach,
      rules: opts.rules,
      onStarted: (record, vpid, pid) => {
        if (opts.detach) {
          if (opts.json) json({ aid: record.aid, vpid, pid });
          else process.stdout.write(record.aid + '\n');
        } else if (!opts.aid) {
          process.stderr.write(`appshot: running as AID ${record.aid}\n`);
        }
      },
    });
    process.exitCode = code;
  });

program
  .command('ps')
  .description('list applications and their processes, with virtual and system PIDs')
  .argument('[aid]', 'only this application')
  .option('--json', 'machine-readable output', false)
  .action((aid: string | undefined, opts: { json: boolean }) => {
    const reg = registry();
    const records = aid ? [reg.require(aid)] : reg.list();
    const rows = listProcesses(reg, records);
    if (opts.json) {
      json(
        records.map((r) => ({
          aid: r.aid,
          command: r.command,
          detached: r.detached,
          createdAt: r.createdAt,
          ...(r.template ? { template: r.template } : {}),
          ...(r.privateRoot ? { privateRoot: r.privateRoot } : {}),
          ports: r.ports ?? [],
          processes: rows.filter((p) => p.aid === r.aid),
        })),
      );
      return;
    }
    printColumns(
      ['AID', 'VPID', 'PID', 'VPPID', 'STAT', 'THREADS', 'COMMAND'],
      rows.map((p) => [p.aid, String(p.vpid), String(p.pid), String(p.vppid), p.state, String(p.threads), p.command]),
    );
  });

program
  .command('table')
  .description("print an application's translation tables (every resource kind, virtual <-> system)")
  .argument('<aid>', 'the application')
  .option('--json', 'machine-readable output', false)
  .action((aid: string, opts: { json: boolean }) => {
    const reg = registry();
    const record = reg.require(aid);
    const tables = reg.readTables(record);
    if (!tables) throw new AppshotError(`the tables of '${aid}' are gone (it just ended?)`, ExitCode.notFound);
    const rows = tableRows(tables);
    if (opts.json) {
      json({ aid, tables: tables.tables, repairs: tables.repairs });
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
  .action(async (aid: string, command: string[]) => {
    process.exitCode = await execIn(registry(), aid, command);
  });

program
  .command('logs')
  .description('print the output of an application started with run --detach')
  .argument('<aid>', 'the application')
  .option('-f, --follow', 'keep printing new output until the application ends', false)
  .action(async (aid: string, opts: { follow: boolean }) => {
    const record = registry().require(aid);
    if (!record.logPath)
      throw new AppshotError(`'${aid}' runs in the foreground: its output goes to the terminal of 'appshot run'`, ExitCode.usage);
    let offset = 0;
    const pump = async () => {
      if (!existsSync(record.logPath!)) return false;
      const size = statSync(record.logPath!).size;
      if (size > offset) {
        await new Promise<void>((resolve, reject) =>
          createReadStream(record.logPath!, { start: offset, end: size - 1 })
            .on('end', resolve)
            .on('error', reject)
            .pipe(process.stdout, { end: false }),
        );
        offset = size;
      }
      return true;
    };
    await pump();
    while (opts.follow && (await pump())) await sleep(200);
  });

program
  .command('stop')
  .description('send a signal (default SIGTERM) to every process of an application')
  .argument('<aid>', 'the application')
  .addOption(new Option('-s, --signal <name>', 'signal to send').default('SIGTERM'))
  .action((aid: string, opts: { signal: string }) => {
    const reg = registry();
    const record = reg.require(aid);
    const upper = opts.signal.toUpperCase();
    const sig = (upper.startsWith('SIG') ? upper : `SIG${upper}`) as NodeJS.Signals;
    if (!(sig in osConstants.signals)) throw new AppshotError(`unknown signal '${opts.signal}'`, ExitCode.usage);
    if (sig === 'SIGKILL' || sig === 'SIGSTOP') {
      // These cannot be caught, so init cannot pass them on: they would
      // stop init itself.
      signalProcesses(reg, record, sig);
      return;
    }
    // An application being restored has no supervisor yet: its processes
    // are signalled straight. Only the supervisor the registry recorded (and
    // which still is that process): the tables' init_pid may be anyone's.
    const initPid = reg.trustedInitPid(record);
    if (!initPid) {
      signalProcesses(reg, record, sig);
      return;
    }
    try {
      // init passes it to the first process, or to all once that is gone.
      process.kill(initPid, sig);
    } catch (e) {
      throw new AppshotError(`cannot signal '${aid}': ${(e as NodeJS.ErrnoException).code}`);
    }
  });

program
  .command('snapshot')
  .description("freeze every process of an application and write its image (FIG. 5)")
  .argument('[aid]', 'the application (or --aid)')
  .option('--aid <name>', 'the application')
  .option('-o, --output <path>', "image directory to create, or '-' for a tar stream on stdout (default: ./AID-TIME.appshot)")
  .option('--leave-running', 'resume the application afterwards instead of ending it; the next snapshot is incremental', false)
  .option('--full', 'do not build on the previous image (no incremental snapshot)', false)
  .option('--pre-copy', 'copy memory while the application runs, then freeze it only for the pages written meanwhile (the first copy goes in the image\'s base/)', false)
  .option('--timeout <seconds>', 'give up if some thread cannot be stopped within this time', '10')
  .option('--json', 'print what was written as JSON', false)
  .addHelpText(
    'after',
    '\nBy default the application ends once its image is safely written, and its SysV objects are\n' +
      'removed. A snapshot that fails leaves the application running and no image. Resources that\n' +
      'cannot be captured yet (an established TCP connection, inotify...) are refused by name.\n\n' +
      'Examples:\n  appshot snapshot dbserver -o db.appshot\n  appshot snapshot dbserver --leave-running\n' +
      '  appshot snapshot dbserver -o - | ssh node2 appshot restore -',
  )
  .action(async (aidArg: string | undefined, opts: { aid?: string; output?: string; leaveRunning: boolean; full: boolean; preCopy: boolean; timeout: string; json: boolean }) => {
    const aid = opts.aid ?? aidArg;
    if (!aid) throw new AppshotError('which application? give its AID (appshot ps lists them)', ExitCode.usage);
    const timeout = Number(opts.timeout);
    if (!(timeout > 0)) throw new AppshotError(`--timeout wants a positive number of seconds, not '${opts.timeout}'`, ExitCode.usage);
    const stamp = new Date().toISOString().replace(/[-:]/g, '').replace(/\..*/, '').replace('T', '-');
    const result = await snapshot(registry(), aid, {
      output: opts.output ?? `${aid}-${stamp}.appshot`,
      leaveRunning: opts.leaveRunning,
      full: opts.full,
      preCopy: opts.preCopy,
      timeoutMs: timeout * 1000,
    });
    if (opts.json) {
      if (result.image === '-') process.stderr.write(JSON.stringify(result) + '\n');
      else json(result);
    } else if (result.image !== '-') {
      process.stdout.write(result.image + '\n');
      process.stderr.write(
        `appshot: ${result.processes} processes, ${result.threads} threads, ${(result.bytes / 1048576).toFixed(1)} MiB` +
          (result.parent ? ` (incremental: ${result.pagesFromParent} pages unchanged)` : '') +
          `; frozen ${result.frozenMs.toFixed(1)} ms, ${result.totalMs.toFixed(0)} ms in all` +
          (result.leftRunning ? '; still running' : '; ended') + '\n',
      );
    }
  });

program
  .command('inspect')
  .description('show what an image holds: processes, threads, memory map, files, IPC objects, tables')
  .argument('<image>', "an image directory, a tar file, or '-' for a tar stream on stdin")
  .option('--json', 'the whole image as JSON', false)
  .addHelpText('after', '\nAny image can be inspected, signed or not; the first line says who signed it.')
  .action(async (path: string, opts: { json: boolean }) => {
    const loaded = await loadImage(path, { trust: 'report' });
    try {
      if (opts.json) json(imageJson(loaded.manifest, loaded.image, loaded.signer));
      else printImage(loaded.manifest, loaded.image, loaded.signer);
    } finally {
      loaded.dispose();
    }
  });

program
  .command('restore')
  .description('bring an image back as a running application, here or on another node (FIG. 6)')
  .argument('<image>', "an image directory, a tar file, or '-' for a tar stream on stdin")
  .option('--aid <name>', "the AID to run it as (default: the image's own)")
  .option('-d, --detach', 'run in the background (the default: see appshot logs AID)', true)
  .option('--lazy', "map memory copy-on-write from the image's page file instead of copying it", false)
  .option('--json', 'print {aid, processes, threads, restoreMs, ...} as JSON', false)
  .option('--trust-image', 'run the image even if no key this node trusts signed it (you vouch for it)', false)
  .addHelpText(
    'after',
    "\nThe image is verified first (its signature, checksums, format and structure, this node's kernel\n" +
      'and the files it maps). Only images signed by this node\'s key or one it imported (appshot key)\n' +
      'are restored, unless --trust-image is given. A restore that fails leaves no process, SysV\n' +
      'object or table behind. The application runs\n' +
      'in the background with the same virtual PIDs and SysV ids; output that went to a terminal\n' +
      "goes to its log. A --lazy restore needs the image's pages.img for as long as it runs.\n\n" +
      'Examples:\n  appshot restore db.appshot\n  appshot restore db.appshot --aid db2\n  ssh node1 appshot snapshot db -o - | appshot restore -\n' +
      '  appshot restore --trust-image downloaded.appshot',
  )
  .action(async (image: string, opts: { aid?: string; lazy: boolean; json: boolean; trustImage: boolean }) => {
    if (opts.aid !== undefined) checkAid(opts.aid);
    if (opts.trustImage) trustImagesExplicitly();
    const result = await restore(registry(), image, { aid: opts.aid, lazy: opts.lazy });
    if (opts.json) json(result);
    else {
      process.stdout.write(result.aid + '\n');
      process.stderr.write(`appshot: restored ${result.processes} processes, ${result.threads} threads in ${result.restoreMs.toFixed(1)} ms\n`);
    }
  });

const template = program.command('template').description('snapshot virtual templates: one warmed-up application, many clones (FIG. 7-9)');

template
  .command('create')
  .description('turn a snapshot into a template, classifying every resource for cloning')
  .argument('<snapshot>', 'a full snapshot image (directory, tar file, or - for stdin)')
  .requiredOption('-o, --output <path>', 'the template directory to create')
  .option('--rules <file>', 'classify by these rules instead of those the application ran under')
  .option('--name <name>', 'the template\'s name (default: from --output); clones are named after it')
  .option('--json', 'print the verdicts as JSON', false)
  .option('--trust-image', 'accept the snapshot even if no key this node trusts signed it (you vouch for it)', false)
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
  .action(async (snapshotPath: string, opts: { output: string; rules?: string; name?: string; json: boolean; trustImage: boolean }) => {
    if (opts.name !== undefined) checkAid(opts.name);
    if (opts.trustImage) trustImagesExplicitly();
    const summary = await createTemplate(snapshotPath, opts.output, { rules: opts.rules, name: opts.name });
    if (opts.json) json(summary);
    else {
      process.stdout.write(summary.template + '\n');
      const counts = Object.entries(summary.actions).map(([a, n]) => `${n} ${a}`).join(', ');
      process.stderr.write(`appshot: template '${summary.name}': ${summary.verdicts.length} resources (${counts})\n`);
      // What the rules leave shared is worth a warning; the rest `show` lists.
      for (const s of summary.shared.filter((s) => !s.handled)) process.stderr.write(`appshot: warning: every clone will share this: ${s.what}; ${s.fix}\n`);
    }
  });

template
  .command('show')
  .description("a template's resources and what cloning does with each")
  .argument('<template>', 'the template directory')
  .option('--json', 'machine-readable output', false)
  .action(async (path: string, opts: { json: boolean }) => {
    const t = await openTemplate(path, true, 'report');
    try {
      const summary = summarize(t.path, t.template, sharedState(t.loaded.image, t.rules));
      if (opts.json) {
        json(summary);
        return;
      }
      process.stdout.write(`template ${summary.name} (image ${summary.imageId})${summary.rules ? `, rules ${summary.rules}` : ''}\n`);
      printColumns(['ACTION', 'KIND', 'RESOURCE', 'WHY'], summary.verdicts.map((v) => [v.action, v.kind, v.name, v.reason]));
      if (summary.shared.length) {
        process.stdout.write('\nwhat every clone would share with the others and the template:\n');
        for (const s of summary.shared) process.stdout.write(`  ${(s.handled ? 'handled' : 'SHARED').padEnd(8)} ${s.what}\n           -> ${s.fix}\n`);
      }
    } finally {
      t.loaded.dispose();
    }
  });

program
  .command('clone')
  .description('stamp new running instances from a template, each under its own AID (FIG. 9)')
  .argument('<template>', 'the template directory')
  .option('--aid <name>', 'the AID; with --count N, instances are AID-1 ... AID-N (default: NAME-xxxxxx)')
  .option('-n, --count <n>', 'how many instances', '1')
  .option('--verify', "checksum the template's page data too (checked when the template was made; its size always is)", false)
  .option('--json', 'print [{aid, ports, cloneMs, ...}] as JSON', false)
  .option('--trust-image', 'clone the template even if no key this node trusts signed it (you vouch for it)', false)
  .addHelpText(
    'after',
    '\nMemory is mapped copy-on-write from the template (clones share its pages until they write),\n' +
      'files under copy-on-write rules are copied when an instance first writes them, PIDs and SysV\n' +
      'ids are the template\'s virtual ones bound to new objects, a multiplexed port is shared by all\n' +
      'instances, an allocated one is the instance\'s own (appshot port AID). All or nothing: if one\n' +
      'instance fails, the ones made before it are removed.\n\n' +
      'Examples:\n  appshot clone db.template --aid db-a\n  appshot clone db.template --count 8 --json',
  )
  .action(async (path: string, opts: { aid?: string; count: string; verify: boolean; json: boolean; trustImage: boolean }) => {
    if (opts.trustImage) trustImagesExplicitly();
    const count = Number(opts.count);
    if (!(Number.isInteger(count) && count >= 1)) throw new AppshotError(`--count wants a whole number of at least 1, not '${opts.count}'`, ExitCode.usage);
    if (opts.aid !== undefined) checkAid(opts.aid);
    const progress = new Progress();
    // Ctrl-C or SIGTERM: the batch stops after the instance being made, and
    // every instance it made goes (all or nothing, as for a failure).
    const interrupt = new AbortController();
    const stop = () => interrupt.abort();
    process.once('SIGINT', stop).once('SIGTERM', stop);
    const results = await clone(registry(), path, {
      aid: opts.aid,
      count,
      verify: opts.verify,
      signal: interrupt.signal,
      progress: (done, total, aid) => progress.update(`${aid} (${done}/${total})`, done, total),
    });
    progress.done();
    if (opts.json) {
      json(results.map(({ createdDirs: _, ...r }) => r));
      return;
    }
    for (const r of results) {
      const ports = r.ports.map((p) => (p.mode === 'allocate' ? `${p.virtual}->${p.system}` : `${p.virtual} (shared)`)).join(' ');
      process.stdout.write(`${r.aid}${ports ? `\t${ports}` : ''}\n`);
    }
    const ms = results.map((r) => r.cloneMs);
    process.stderr.write(`appshot: ${results.length} instance${results.length > 1 ? 's' : ''} in ${ms.reduce((a, b) => a + b, 0).toFixed(1)} ms (${Math.min(...ms).toFixed(1)} ms the fastest)\n`);
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
  .action((opts: { output?: string }) => {
    const pem = exportKey();
    if (opts.output) writeFileSync(opts.output, pem, { flag: 'wx', mode: 0o644 });
    else process.stdout.write(pem);
  });

key
  .command('import')
  .description("trust the images signed by another node's key (a file appshot key export wrote)")
  .argument('<file>', 'the exported public key')
  .option('--name <name>', 'what to call it (default: its id)')
  .action((file: string, opts: { name?: string }) => {
    const k = importKey(file, opts.name);
    process.stdout.write(`${k.id}\t${k.name}\n`);
  });

key
  .command('ls')
  .description('list the keys this node trusts (its own first)')
  .option('--json', 'machine-readable output', false)
  .action((opts: { json: boolean }) => {
    selfKey(); // made at first use, and listing is one
    const keys = trustedKeys().map((k) => ({ id: k.id, name: k.name, file: k.file }));
    if (opts.json) json(keys);
    else printColumns(['ID', 'NAME', 'FILE'], keys.map((k) => [k.id, k.name, k.file]));
  });

program
  .command('port')
  .description('the TCP ports an application listens on, as it asks for them and as it has them (like docker port)')
  .argument('<aid>', 'the application')
  .argument('[port]', 'only this port, as the application knows it: prints the port to connect to')
  .option('--json', 'machine-readable output', false)
  .action((aid: string, port: string | undefined, opts: { json: boolean }) => {
    const record = registry().require(aid);
    let rows = record.ports ?? [];
    if (port !== undefined) {
      rows = rows.filter((p) => p.virtual === Number(port));
      if (!rows.length) throw new AppshotError(`'${aid}' has no port ${port} that the registry knows of`, ExitCode.notFound);
    }
    if (opts.json) json(rows);
    else if (port !== undefined) process.stdout.write(`${rows[0].system}\n`);
    else
    printColumns(['PORT', 'HOST PORT', 'MODE'], rows.map((p) => [String(p.virtual), String(p.system), p.mode]));
  });

/** Anything but an AppshotError is a bug of appshot's (a crafted image that
 * got past validation, say): one line, never a stack trace, unless asked. */
function reportInternalError(e: unknown): void {
  if (process.env.APPSHOT_DEBUG) process.stderr.write(`${(e as Error)?.stack ?? String(e)}\n`);
  const message = String((e as Error)?.message ?? e).split('\n')[0];
  process.stderr.write(`appshot: internal error: ${message}${process.env.APPSHOT_DEBUG ? '' : ' (APPSHOT_DEBUG=1 shows the stack)'}\n`);
  process.exitCode = ExitCode.internal;
}

async function main(): Promise<void> {
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
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw e;
  });
  try {
    // What a command killed with SIGKILL left half-written.
    removeStaleTemporaries();
    await program.parseAsync(process.argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version end here too, with exit code 0.
      process.exitCode = e.exitCode === 0 ? 0 : ExitCode.usage;
      return;
    }
    if (e instanceof AppshotError) {
      process.stderr.write(`appshot: ${e.message}\n`);
      process.exitCode = e.exitCode;
      return;
    }
    const err = e as NodeJS.ErrnoException;
    if (err && typeof err.code === 'string' && err.syscall) {
      process.stderr.write(`appshot: ${err.message}\n`);
      process.exitCode = ExitCode.failure;
      return;
    }
    reportInternalError(e);
  }
}

await main();
