/**
 * One look for every command's help and errors, applied to the whole
 * command tree once it is built: commander's own errors ("error: unknown
 * command") come out as appshot's do (`appshot: ...`, one line, exit code
 * 2), boolean flags carry no "(default: false)", and `appshot --help` ends
 * with the exit codes.
 */
import { type Command, Help, type Option } from 'commander';
import { ExitCode } from '../errors.js';

/** What each exit code means, for `appshot --help`. */
const EXIT_MEANINGS: Record<keyof typeof ExitCode, string> = {
  ok: 'success',
  failure: 'the operation failed (nothing half-done is left); check: a core feature is missing',
  usage: 'bad command line: unknown command or option, a missing or malformed argument',
  notFound: 'no such application, image or directory',
  conflict: 'already exists: an AID in use, an output path taken',
  denied: 'the image asks for a credential or limit this user cannot grant',
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

/** A boolean flag's default is its absence: saying "(default: false)" on
 * each is noise. Values that matter (--signal SIGTERM) are still shown. */
function optionDescription(this: Help, option: Option): string {
  if (typeof option.defaultValue !== 'boolean') return Help.prototype.optionDescription.call(this, option);
  const shown = Object.create(option) as Option;
  shown.defaultValue = undefined;
  return Help.prototype.optionDescription.call(this, shown);
}

/** commander's message ("error: unknown command 'x'\n(Did you mean y?)")
 * as one appshot line. */
export function appshotErrorLine(message: string): string {
  return 'appshot: ' + message.trim().replace(/^error: /, '').replace(/\s*\n\s*/g, ' ') + '\n';
}

function style(cmd: Command): void {
  cmd.configureHelp({ ...cmd.configureHelp(), optionDescription });
  cmd.configureOutput({ ...cmd.configureOutput(), outputError: (str, write) => write(appshotErrorLine(str)) });
  cmd.showHelpAfterError(false);
  cmd.exitOverride();
  for (const sub of cmd.commands) style(sub);
}

/** Applies the house style to `program` and every command under it; call
 * once every command is registered. */
export function applyHouseStyle(program: Command): void {
  style(program);
  program.addHelpText('after', exitCodesHelp());
}
