/**
 * `appshot completion bash|zsh|fish`: a completion script generated from the
 * command tree itself, so that a new command or option is completed
 * without anyone remembering to add it here.
 */
import type { Command } from 'commander';
import { AppshotError, ExitCode } from '../errors.js';

interface Node {
  /** "template create" for a subcommand; "" for appshot itself. */
  path: string;
  subcommands: string[];
  options: string[];
}

/** Every command of the tree, with its subcommands and option flags. */
function walk(cmd: Command, prefix: string, out: Node[]): Node[] {
  // A hidden option (restore -d: accepted, changes nothing) is not offered.
  const options = cmd.options.filter((o) => !o.hidden).flatMap((o) => [o.short, o.long].filter((f): f is string => !!f));
  options.push('--help');
  // `help` (commands/style.ts) is left out, as commander's own was.
  const subs = cmd.commands.filter((c) => !(c as unknown as { _hidden?: boolean })._hidden && c.name() !== 'help');
  out.push({ path: prefix, subcommands: subs.flatMap((c) => [c.name(), ...c.aliases()]), options });
  for (const c of subs) walk(c, prefix ? `${prefix} ${c.name()}` : c.name(), out);
  return out;
}

const quote = (words: string[]) => words.join(' ');

/** bash: the words so far (options skipped) name a command; complete its
 * subcommands, or its options after a dash, else files. */
function bashScript(nodes: Node[]): string {
  const cases = nodes
    .map((n) => `    '${n.path}') subs='${quote(n.subcommands)}'; opts='${quote(n.options)}' ;;`)
    .join('\n');
  return `# appshot completion for bash. Install:
#   appshot completion bash > /etc/bash_completion.d/appshot   (or: source <(appshot completion bash))
_appshot() {
  local cur cmd="" w subs opts
  cur="\${COMP_WORDS[COMP_CWORD]}"
  for w in "\${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    case "$w" in -*) continue ;; esac
    case "$(_appshot_words "\${cmd:+$cmd }$w")" in
      '') break ;;
      *) cmd="\${cmd:+$cmd }$w" ;;
    esac
  done
  case "$cmd" in
${cases}
    *) subs=''; opts='' ;;
  esac
  if [[ "$cur" == -* ]]; then
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
  elif [[ -n "$subs" ]]; then
    COMPREPLY=( $(compgen -W "$subs" -- "$cur") )
  else
    COMPREPLY=( $(compgen -f -- "$cur") )
  fi
}
# Prints the path if it names a command, nothing otherwise.
_appshot_words() {
  case "$1" in
${nodes.map((n) => `    '${n.path}') echo "$1" ;;`).join('\n')}
  esac
}
complete -o filenames -F _appshot appshot
`;
}

/** zsh: the same table, as an associative array per kind. */
function zshScript(nodes: Node[]): string {
  const entries = (pick: (n: Node) => string[]) => nodes.map((n) => `  ${JSON.stringify(n.path)} ${JSON.stringify(quote(pick(n)))}`).join('\n');
  return `#compdef appshot
# appshot completion for zsh. Install:
#   appshot completion zsh > "\${fpath[1]}/_appshot"   (or: source <(appshot completion zsh))
typeset -gA _appshot_subs _appshot_opts
_appshot_subs=(
${entries((n) => n.subcommands)}
)
_appshot_opts=(
${entries((n) => n.options)}
)
_appshot() {
  local cmd="" w
  for w in "\${(@)words[2,CURRENT-1]}"; do
    [[ "$w" == -* ]] && continue
    if (( \${+_appshot_subs[\${cmd:+$cmd }$w]} )); then cmd="\${cmd:+$cmd }$w"; else break; fi
  done
  if [[ "$PREFIX" == -* ]]; then
    compadd -- \${=_appshot_opts[$cmd]}
  elif [[ -n "\${_appshot_subs[$cmd]}" ]]; then
    compadd -- \${=_appshot_subs[$cmd]}
  else
    _files
  fi
}
# Autoloaded from $fpath (the file is then _appshot's body): complete now,
# as the first TAB asked; sourced: register with compinit.
if [[ "\${zsh_eval_context[-1]}" == loadautofunc ]]; then _appshot "$@"; else compdef _appshot appshot; fi
`;
}

/** fish: one `complete` line per command for its subcommands and per
 * option, each under the condition that the words so far name that
 * command (__appshot_at). */
function fishScript(nodes: Node[]): string {
  const q = (w: string) => `'${w.replace(/[\\']/g, '\\$&')}'`;
  const lines: string[] = [];
  for (const n of nodes) {
    const at = `-n ${q(`__appshot_at ${q(n.path)}`)}`;
    if (n.subcommands.length) lines.push(`complete -c appshot -f ${at} -a ${q(quote(n.subcommands))}`);
    for (const o of n.options) {
      if (o.startsWith('--')) lines.push(`complete -c appshot ${at} -l ${o.slice(2)}`);
      else lines.push(`complete -c appshot ${at} -s ${o.slice(1)}`);
    }
  }
  return `# appshot completion for fish. Install:
#   appshot completion fish > ~/.config/fish/completions/appshot.fish   (or: appshot completion fish | source)
set -g __appshot_commands ${nodes.filter((n) => n.path).map((n) => q(n.path)).join(' ')}
# Whether the words so far (options skipped) name the command $argv[1].
function __appshot_at
    set -l cmd ''
    for w in (commandline -opc)[2..-1]
        string match -q -- '-*' $w; and continue
        set -l next $w
        test -n "$cmd"; and set next "$cmd $w"
        contains -- $next $__appshot_commands; or break
        set cmd $next
    end
    test "$cmd" = "$argv[1]"
end
complete -c appshot -e
${lines.join('\n')}
`;
}

export function registerCompletion(program: Command): void {
  program
    .command('completion')
    .description('print a shell completion script (commands, subcommands, options) for bash, zsh or fish')
    .argument('<shell>', 'bash, zsh or fish')
    .addHelpText(
      'after',
      '\nExamples:\n  source <(appshot completion bash)              this shell\n' +
        '  appshot completion bash > /etc/bash_completion.d/appshot\n' +
        '  appshot completion zsh > "${fpath[1]}/_appshot"\n' +
        '  appshot completion fish > ~/.config/fish/completions/appshot.fish',
    )
    .action((shell: string) => {
      const nodes = walk(program, '', []);
      if (shell === 'bash') process.stdout.write(bashScript(nodes));
      else if (shell === 'zsh') process.stdout.write(zshScript(nodes));
      else if (shell === 'fish') process.stdout.write(fishScript(nodes));
      else throw new AppshotError(`completion for '${shell}' is not made: bash, zsh or fish`, ExitCode.usage);
    });
}
