/**
 * One look for every command's help and errors, applied to the whole
 * command tree once it is built: commander's own errors ("error: unknown
 * command") come out as appshot's do (`appshot: ...`, one line, exit code
 * 2), words past a command's arguments are refused, boolean flags carry no
 * "(default: false)", and `appshot --help` ends with the exit codes.
 */
import { type Command, Help, type Option } from 'commander';
import { AppshotError, ExitCode } from '../errors.js';

/** What each exit code means, for `appshot --help`. */
const EXIT_MEANINGS: Record<keyof typeof ExitCode, string> = {
  ok: 'success',
  failure: 'the operation failed (nothing half-done is left); check: a core feature is missing',
  usage: 'bad command line: unknown command or option, a missing or malformed argument',
  notFound: 'no such application, image or directory',
  conflict: 'already exists: an AID in use, an output path taken',
  denied: 'the image asks for a credential or limit this user cannot grant',
  afterCommit: 'committed, then a step failed: restored/cloned, it runs; snapshotted, it ended, its image whole',
  internal: 'a bug in appshot (APPSHOT_DEBUG=1 shows the stack)',
  notExecutable: 'run/exec: the command could not be executed',
  commandNotFound: 'run/exec: the command was not found',
  interrupted: 'stopped by SIGINT (143: by SIGTERM)',
};

export function exitCodesHelp(): string {
  const rows = Object.entries(ExitCode).map(([k, code]) => `  ${String(code).padStart(3)}  ${EXIT_MEANINGS[k as keyof typeof ExitCode]}`);
  return (
    '\nExit status:\n' + rows.join('\n') + '\n' +
    "  run, exec and wait otherwise exit with the application's own status (128 + N if signal N ended it)."
  );
}

/** A boolean flag's default is its absence, and a repeatable option's is
 * none given: saying "(default: false)" or "(default: [])" on each is
 * noise. Values that matter (--signal SIGTERM) are still shown; a number
 * as one ("(default: 10)"), not as the string commander holds. */
function optionDescription(this: Help, option: Option): string {
  const empty = typeof option.defaultValue === 'boolean' || (Array.isArray(option.defaultValue) && option.defaultValue.length === 0);
  const numeric = typeof option.defaultValue === 'string' && /^\d+$/.test(option.defaultValue) && option.defaultValueDescription === undefined;
  if (!empty && !numeric) return Help.prototype.optionDescription.call(this, option);
  const shown = Object.create(option) as Option;
  if (empty) shown.defaultValue = undefined;
  else shown.defaultValueDescription = option.defaultValue as string;
  return Help.prototype.optionDescription.call(this, shown);
}

/** commander's message ("error: unknown command 'x'\n(Did you mean y?)")
 * as one appshot line. */
export function appshotErrorLine(message: string): string {
  return 'appshot: ' + message.trim().replace(/^error: /, '').replace(/\s*\n\s*/g, ' ') + '\n';
}

/** Edit distance between two words (insertions, deletions, substitutions,
 * and swaps of two neighbours: 'snapshto'). */
function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++)
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.length][b.length];
}

/** " (Did you mean X?)" as commander says it, for the names of `cmd`'s
 * subcommands close to `word`; '' when none is. */
function suggestion(cmd: Command, word: string): string {
  const names = cmd.commands.flatMap((c) => [c.name(), ...c.aliases()]).filter((n) => n !== 'help');
  const scored = names.map((n) => ({ n, d: distance(word, n) })).filter(({ n, d }) => d <= Math.max(1, Math.floor(n.length * 0.4)));
  const best = Math.min(...scored.map((x) => x.d));
  const close = scored.filter((x) => x.d === best).map((x) => x.n);
  return close.length ? ` (Did you mean ${close.join(' or ')}?)` : '';
}

/** `help [command...]` under `cmd` (a command with subcommands), instead of
 * commander's, which dumps the whole help on stderr for a command it does
 * not know and shows the group's help for `help template create`: the help
 * of the command the words name, or one line and exit code 2. */
function addHelpCommand(cmd: Command): void {
  cmd.helpCommand(false);
  cmd
    .command('help')
    .description('display help for command')
    .argument('[command...]', 'the command, and its subcommand')
    .addHelpText('after', '\nExamples:\n  appshot help snapshot\n  appshot help template create')
    .action((words: string[]) => {
      let target = cmd;
      for (const [i, word] of words.entries()) {
        const sub = target.commands.find((c) => c.name() !== 'help' && (c.name() === word || c.aliases().includes(word)));
        if (!sub) throw new AppshotError(`unknown command '${words.slice(0, i + 1).join(' ')}'${suggestion(target, word)}`, ExitCode.usage);
        target = sub;
      }
      target.help();
    });
}

function style(cmd: Command): void {
  cmd.configureHelp({ ...cmd.configureHelp(), optionDescription });
  cmd.configureOutput({ ...cmd.configureOutput(), outputError: (str, write) => write(appshotErrorLine(str)) });
  cmd.showHelpAfterError(false);
  // commander 12 drops words past a command's declared arguments without a
  // word (`appshot logs a b` showed a's log): a word appshot does not read
  // is a mistake to say, not to guess at.
  cmd.allowExcessArguments(false);
  cmd.exitOverride();
  const groups = cmd.commands.length > 0;
  for (const sub of cmd.commands) style(sub);
  if (groups) {
    addHelpCommand(cmd);
    const help = cmd.commands[cmd.commands.length - 1];
    help.configureOutput({ ...help.configureOutput(), outputError: (str, write) => write(appshotErrorLine(str)) });
    help.exitOverride();
  }
}

/** Applies the house style to `program` and every command under it; call
 * once every command is registered. */
export function applyHouseStyle(program: Command): void {
  style(program);
  program.addHelpText('after', exitCodesHelp());
}
