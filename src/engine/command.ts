/** `appshot engine start|stop|status`: the resident engine (server.ts). */
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import { defaultHome, enginePaths } from '../home.js';
import { setExitCode } from './request.js';
import { printJson } from '../commands/json.js';
import { duration, plural } from '../words.js';



/** `engine status`: the serve it hosts, if any. */
function servingLine(serving: unknown): string {
  const s = serving as { services: string[]; startedAt: string; attached: boolean; log: string; metrics?: string } | null | undefined;
  if (!s) return '';
  return (
    ` and not while it serves\nserving ${s.services.join(', ')} for ${duration(Date.now() - Date.parse(s.startedAt))}, since ${s.startedAt} (appshot serve${s.attached ? ', its client attached' : ' -d'}); log ${s.log}` +
    (s.metrics ? `; metrics ${s.metrics}` : '')
  );
}

export function registerEngine(program: Command): void {
  const engine = program
    .command('engine')
    .description('the resident engine: one process per state directory that serves the commands of the CLI, warm')
    .addHelpText(
      'after',
      '\nWhile an engine runs for $APPSHOT_HOME, appshot sends commands to it (except run, exec,\n' +
        'logs -f, wait, check and anything reading stdin or writing a stream to stdout) instead of\n' +
        'starting cold. By default (APPSHOT_ENGINE unset or auto), clone, restore and snapshot start\n' +
        'one when none runs; manual: use one that runs, start none; off: never use one.\n' +
        'It hosts `appshot serve` (see appshot serve --help).\n' +
        'It leaves after APPSHOT_ENGINE_IDLE seconds (default 60)\n' +
        'without a command (not while it serves), and on SIGTERM (stopping its serve first). See README, "The resident engine".\n\n' +
        'Examples:\n  appshot engine start\n  appshot engine status --json\n  appshot engine stop',
    );

  engine
    .command('start')
    .description('start an engine for $APPSHOT_HOME in the background (nothing if one runs)')
    .option('--foreground', 'serve in this process until idle or SIGTERM (refused if one runs)', false)
    .option('--json', 'print the status of the engine as JSON', false)
    .addHelpText('after', '\nExamples:\n  appshot engine start\n  APPSHOT_ENGINE_IDLE=600 appshot engine start --json\n  appshot engine start --foreground   # in a service manager')
    .action(async (opts: { foreground: boolean; json: boolean }) => {
      const home = resolve(defaultHome());
      const { controlEngine } = await import('./client.js');
      if (opts.foreground) {
        const { serveEngine, idleSecondsFromEnv } = await import('./server.js');
        setExitCode(await serveEngine({ home, idleSeconds: idleSecondsFromEnv() }));
        return;
      }
      let status = await controlEngine('status', home);
      if (!status || status.leaving) {
        const { startEngine } = await import('./spawn.js');
        const started = await startEngine(home, async () => {
          const s = await controlEngine('status', home);
          return !!s && !s.leaving;
        });
        if (!started.ok) throw new AppshotError(`the engine did not start: ${started.said.replace(/^appshot: engine: /, '') || 'it left without a word'}`, ExitCode.failure);
        status = await controlEngine('status', home);
      }
      if (!status) throw new AppshotError('the engine started and left at once (see ' + enginePaths(home).log + ')', ExitCode.failure);
      if (opts.json) printJson('engine start', status);
      else process.stdout.write(`engine ${status.pid} serving ${home}\n`);
    });

  engine
    .command('stop')
    .description('ask the engine to leave once its running commands have ended')
    .option('--json', 'print its last status as JSON', false)
    .addHelpText('after', '\nExample:\n  appshot engine stop')
    .action(async (opts: { json: boolean }) => {
      const home = resolve(defaultHome());
      const { controlEngine } = await import('./client.js');
      const status = await controlEngine('stop', home);
      if (opts.json) printJson('engine stop', status ?? { running: false, home });
      else if (!status) process.stdout.write(`no engine runs for ${home}\n`);
      else {
        const serving = status.serving as { services: string[] } | null | undefined;
        process.stdout.write(`engine ${status.pid} leaving${serving ? ` (it stops serving ${serving.services.join(', ')} first)` : ''}\n`);
      }
    });

  engine
    .command('status')
    .description('whether an engine runs for $APPSHOT_HOME, and what it does')
    .option('--json', 'machine-readable output', false)
    .addHelpText('after', '\nExamples:\n  appshot engine status\n  appshot engine status --json')
    .action(async (opts: { json: boolean }) => {
      const home = resolve(defaultHome());
      const { controlEngine } = await import('./client.js');
      const status = await controlEngine('status', home);
      if (opts.json) printJson('engine status', status ?? { running: false, home });
      else if (!status) process.stdout.write(`no engine runs for ${home}\n`);
      else
        process.stdout.write(
          `engine ${status.pid} serving ${home}: up ${duration(Number(status.uptimeMs))}, ${plural(Number(status.commandsServed), 'command')} served, ${status.commandsRunning} running` +
            `${status.leaving ? ', leaving' : ''}; leaves after ${duration(Number(status.idleTimeoutMs))} idle${servingLine(status.serving)}\n`,
        );
    });
}
