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
  /** The options that take a value (the next word is theirs). */
  valued: string[];
  /** What its arguments are, for those completed by name: "aid" (the
   * first argument an AID), "aids" (every argument one), "shell"
   * (completion's), or "" (files). */
  args: '' | 'aid' | 'aids' | 'shell';
}

/** The shells a script is made for. */
const SHELLS = ['bash', 'zsh', 'fish'];

/** The values of each option that has a fixed set, by its flag: taken
 * from where they are checked (progress.ts PROGRESS_VALUES, what
 * progressMode accepts), so that completion offers what is accepted.
 * Loaded when a script is made: progress.ts loads cli-progress, which
 * every other command (ps, --help) does without. */
type OptionValues = Record<string, readonly string[]>;

async function optionValues(): Promise<OptionValues> {
  const { PROGRESS_VALUES } = await import('../progress.js');
  return { '--progress': PROGRESS_VALUES };
}

function argsOf(cmd: Command): Node['args'] {
  const first = cmd.registeredArguments[0];
  if (first?.name() === 'aid') return first.variadic ? 'aids' : 'aid';
  if (first?.name() === 'shell') return 'shell';
  return '';
}

/** Every command of the tree, with its subcommands and option flags. */
function walk(cmd: Command, prefix: string, out: Node[]): Node[] {
  // A hidden option (restore -d: accepted, changes nothing) is not offered.
  const shown = cmd.options.filter((o) => !o.hidden);
  const flags = (o: (typeof shown)[number]) => [o.short, o.long].filter((f): f is string => !!f);
  const options = shown.flatMap(flags);
  options.push('--help');
  // `help` (commands/style.ts) is left out, as commander's own was.
  const subs = cmd.commands.filter((c) => !(c as unknown as { _hidden?: boolean })._hidden && c.name() !== 'help');
  out.push({ path: prefix, subcommands: subs.flatMap((c) => [c.name(), ...c.aliases()]), options, valued: shown.filter((o) => o.required).flatMap(flags), args: argsOf(cmd) });
  for (const c of subs) walk(c, prefix ? `${prefix} ${c.name()}` : c.name(), out);
  return out;
}

const quote = (words: readonly string[]) => words.join(' ');

/**
 * bash: the words so far name a command (options and their values
 * skipped), then its arguments; complete an option's value after one that
 * takes it, the command's options after a dash, its subcommands, the AIDs
 * `appshot ps -aq` lists (or the shells) where an argument is one, else
 * files.
 */
function bashScript(nodes: Node[], optionValues: OptionValues): string {
  const cases = nodes
    .map((n) => `    '${n.path}') subs='${quote(n.subcommands)}'; opts='${quote(n.options)}'; valued=' ${quote(n.valued)} '; args='${n.args}' ;;`)
    .join('\n');
  const values = Object.entries(optionValues).map(([o, v]) => `      ${o}) COMPREPLY=( $(compgen -W '${quote(v)}' -- "$cur") ) ;;`).join('\n');
  return `# appshot completion for bash. Install:
#   appshot completion bash > /etc/bash_completion.d/appshot   (or: source <(appshot completion bash))
_appshot() {
  local cur prev cmd="" w n=0 skip="" subs opts valued args
  cur="\${COMP_WORDS[COMP_CWORD]}"
  prev="\${COMP_WORDS[COMP_CWORD-1]}"
  _appshot_node ""
  for w in "\${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    if [[ -n "$skip" ]]; then skip=""; continue; fi
    case "$w" in -*) [[ "$valued" == *" $w "* ]] && skip=1; continue ;; esac
    if (( n == 0 )) && [[ -n "$(_appshot_words "\${cmd:+$cmd }$w")" ]]; then
      cmd="\${cmd:+$cmd }$w"; _appshot_node "$cmd"
    else
      n=$((n + 1))
    fi
  done
  if [[ -n "$skip" ]]; then
    case "$prev" in
${values}
      *) COMPREPLY=( $(compgen -f -- "$cur") ) ;;
    esac
  elif [[ "$cur" == -* ]]; then
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
  elif [[ -n "$subs" ]] && (( n == 0 )); then
    COMPREPLY=( $(compgen -W "$subs" -- "$cur") )
  elif [[ "$args" == aids || ( "$args" == aid && $n -eq 0 ) ]]; then
    COMPREPLY=( $(compgen -W "$("\${COMP_WORDS[0]}" ps -aq 2>/dev/null)" -- "$cur") )
  elif [[ "$args" == shell && $n -eq 0 ]]; then
    COMPREPLY=( $(compgen -W '${quote(SHELLS)}' -- "$cur") )
  else
    COMPREPLY=( $(compgen -f -- "$cur") )
  fi
}
# Sets subs, opts, valued and args for the command path $1.
_appshot_node() {
  case "$1" in
${cases}
    *) subs=''; opts=''; valued=' '; args='' ;;
  esac
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
function zshScript(nodes: Node[], optionValues: OptionValues): string {
  const entries = (pick: (n: Node) => string) => nodes.map((n) => `  ${JSON.stringify(n.path)} ${JSON.stringify(pick(n))}`).join('\n');
  const values = Object.entries(optionValues).map(([o, v]) => `      ${o}) compadd -- ${quote(v)} ;;`).join('\n');
  return `#compdef appshot
# appshot completion for zsh. Install:
#   appshot completion zsh > "\${fpath[1]}/_appshot"   (or: source <(appshot completion zsh))
typeset -gA _appshot_subs _appshot_opts _appshot_valued _appshot_args
_appshot_subs=(
${entries((n) => quote(n.subcommands))}
)
_appshot_opts=(
${entries((n) => quote(n.options))}
)
_appshot_valued=(
${entries((n) => ` ${quote(n.valued)} `)}
)
_appshot_args=(
${entries((n) => n.args)}
)
_appshot() {
  local cmd="" w skip="" n=0 args
  for w in "\${(@)words[2,CURRENT-1]}"; do
    if [[ -n "$skip" ]]; then skip=""; continue; fi
    if [[ "$w" == -* ]]; then [[ "\${_appshot_valued[$cmd]}" == *" $w "* ]] && skip=1; continue; fi
    if (( n == 0 )) && (( \${+_appshot_subs[\${cmd:+$cmd }$w]} )); then cmd="\${cmd:+$cmd }$w"; else (( n++ )); fi
  done
  args="\${_appshot_args[$cmd]}"
  if [[ -n "$skip" ]]; then
    case "\${words[CURRENT-1]}" in
${values}
      *) _files ;;
    esac
  elif [[ "$PREFIX" == -* ]]; then
    compadd -- \${=_appshot_opts[$cmd]}
  elif [[ -n "\${_appshot_subs[$cmd]}" ]] && (( n == 0 )); then
    compadd -- \${=_appshot_subs[$cmd]}
  elif [[ "$args" == aids || ( "$args" == aid && $n -eq 0 ) ]]; then
    compadd -- $("\${words[1]}" ps -aq 2>/dev/null)
  elif [[ "$args" == shell && $n -eq 0 ]]; then
    compadd -- ${quote(SHELLS)}
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
 * command (__appshot_at), its arguments' under the condition that the
 * word is one (__appshot_arg: the first, or any). */
function fishScript(nodes: Node[], optionValues: OptionValues): string {
  const q = (w: string) => `'${w.replace(/[\\']/g, '\\$&')}'`;
  const lines: string[] = [];
  for (const n of nodes) {
    const at = `-n ${q(`__appshot_at ${q(n.path)}`)}`;
    const arg = (which: string) => `-n ${q(`__appshot_arg ${q(n.path)} ${which}`)}`;
    if (n.subcommands.length) lines.push(`complete -c appshot -f ${arg('first')} -a ${q(quote(n.subcommands))}`);
    if (n.args === 'aid' || n.args === 'aids') lines.push(`complete -c appshot -f ${arg(n.args === 'aids' ? 'any' : 'first')} -a '(__appshot_aids)'`);
    if (n.args === 'shell') lines.push(`complete -c appshot -f ${arg('first')} -a ${q(quote(SHELLS))}`);
    for (const o of n.options) {
      const values = optionValues[o];
      const takes = values ? ` -x -a ${q(quote(values))}` : n.valued.includes(o) ? ' -r' : '';
      if (o.startsWith('--')) lines.push(`complete -c appshot ${at} -l ${o.slice(2)}${takes}`);
      else lines.push(`complete -c appshot ${at} -s ${o.slice(1)}${takes}`);
    }
  }
  const valued = nodes.filter((n) => n.valued.length).map((n) => `        case ${q(n.path)}\n            printf '%s\\n' ${n.valued.join(' ')}`).join('\n');
  return `# appshot completion for fish. Install:
#   appshot completion fish > ~/.config/fish/completions/appshot.fish   (or: appshot completion fish | source)
set -g __appshot_commands ${nodes.filter((n) => n.path).map((n) => q(n.path)).join(' ')}
# The options of command $argv[1] that take a value.
function __appshot_valued
    switch $argv[1]
${valued}
    end
end
# The words so far (options and their values skipped): the command they
# name, how many arguments follow it, whether the last word was an
# option that takes a value.
function __appshot_parse
    set -g __appshot_cmd ''
    set -g __appshot_n 0
    set -g __appshot_skip 0
    for w in (commandline -opc)[2..-1]
        if test $__appshot_skip = 1
            set __appshot_skip 0
            continue
        end
        if string match -q -- '-*' $w
            contains -- $w (__appshot_valued "$__appshot_cmd"); and set __appshot_skip 1
            continue
        end
        set -l next $w
        test -n "$__appshot_cmd"; and set next "$__appshot_cmd $w"
        if test $__appshot_n = 0; and contains -- $next $__appshot_commands
            set __appshot_cmd $next
        else
            set __appshot_n (math $__appshot_n + 1)
        end
    end
end
# Whether the words so far name the command $argv[1].
function __appshot_at
    __appshot_parse
    test "$__appshot_cmd" = "$argv[1]"
end
# Whether the word is an argument of command $argv[1]: its first (first)
# or any (any).
function __appshot_arg
    __appshot_parse
    test "$__appshot_cmd" = "$argv[1]" -a $__appshot_skip = 0; or return 1
    test "$argv[2]" = any -o $__appshot_n = 0
end
# The AIDs appshot ps -aq lists.
function __appshot_aids
    set -l appshot (commandline -opc)[1]
    $appshot ps -aq 2>/dev/null
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
    .action(async (shell: string) => {
      const nodes = walk(program, '', []);
      if (!SHELLS.includes(shell)) throw new AppshotError(`completion for '${shell}' is not made: ${SHELLS.join(', ').replace(/, (?=\w+$)/, ' or ')}`, ExitCode.usage);
      const values = await optionValues();
      if (shell === 'bash') process.stdout.write(bashScript(nodes, values));
      else if (shell === 'zsh') process.stdout.write(zshScript(nodes, values));
      else process.stdout.write(fishScript(nodes, values));
    });
}
