/**
 * The rules language of snapshot virtual templates (FIG. 8, "application
 * configurator"): which resources of a template each clone shares, copies
 * or gets its own of, and how each instance's paths and environment are
 * personalized. templates/README.md is the reference; this file is the
 * parser, and the two lookups the drivers need (ruleFor, instanceConfig).
 *
 * Rules are kept as written (image.rules.text) and evaluated per instance:
 * a template must hold its references "in their pre-customized form,
 * rather than their evaluated form" (specification, section B).
 */
import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { basename, join, posix } from 'node:path';
import { AppshotError, ExitCode } from '../errors.js';
import type { Action } from '../image/types.js';

export type Property = 'application-id' | 'instance' | 'hostname' | 'template';
export type ResourceKind = 'file' | 'memory' | 'port' | 'semaphore' | 'shm' | 'msgqueue';
export type Access = 'any' | 'read' | 'write' | 'create';

export interface ResourceRule {
  kind: ResourceKind;
  /** FILE: an absolute path; MEMORY: "[heap]"-like name or absolute path;
   * PORT: the port; SysV kinds: the key (unsigned); '*': every one. */
  match: string | number | '*';
  access: Access;
  action: Action;
  line: number;
  column: number;
}

export interface RulesFile {
  /** The file's name, for messages ("fixture.rules:7"). */
  source: string;
  /** As written: what an image keeps. */
  text: string;
  /** Variable name (without the brackets, e.g. "APPL-ID") → property. */
  defines: Map<string, Property>;
  redirs: { from: string; to: string; line: number }[];
  envs: { name: string; value: string; line: number }[];
  resources: ResourceRule[];
  identity: IdentityRules;
}

/**
 * The IDENTITY section: what makes each clone unique where copying the
 * template's memory would not (DESIGN.md: a clone keeps its virtual PID,
 * so fork detection by getpid() never fires in it).
 */
export interface IdentityRules {
  /** IDENTITY RESEED LIBC (always) or IDENTITY KEEP LIBC (never); absent:
   * the default, reseed where the application seeded it (templates/README.md). */
  libc?: { reseed: 'always' | 'never'; line: number };
  /** Run once in each clone after it resumes, in the order written. */
  hooks: IdentityHook[];
}

export type IdentityHook =
  /** IDENTITY HOOK SIGNAL SIGUSR2: sent to the application's first process. */
  | { kind: 'signal'; signal: number; name: string; line: number }
  /** IDENTITY HOOK EXEC "/cmd" "arg"...: run inside the clone's virtual
   * view, as `appshot exec` does; its strings may hold variables. */
  | { kind: 'exec'; argv: string[]; line: number };

// What an instance's tables hold: the constants of the same names in
// addon/include/appshot_table.h (struct appshot_instance), which these must
// follow. Rules beyond them are refused when parsed (with FILE:LINE:COLUMN),
// values that grow beyond them when evaluated, not when the tables are
// written.

/** Entries of the instance's path table: one per REDIR PATH, FILE ...
 * COPY-ON-WRITE and FILE ... DUPLICATE rule. */
export const APPSHOT_REDIRS = 16;
/** Environment entries: SET ENV lines, and the two a clone's identity adds
 * (APPSHOT_CLONE_GENERATION, APPSHOT_INSTANCE; resources/identity.ts). */
export const APPSHOT_ENVS = 18;
export const IDENTITY_ENVS = 2;
/** SET ENV lines: what the table holds beside the identity variables. */
export const SET_ENVS = APPSHOT_ENVS - IDENTITY_ENVS;
/** IDENTITY HOOK lines: each runs in every clone, so they are kept few. */
export const IDENTITY_HOOKS = 8;
/** A path (`from` or `to`), including its terminating NUL. */
export const APPSHOT_PATH_MAX = 256;
/** One "NAME=value", including its terminating NUL. */
export const APPSHOT_ENV_LEN = 384;

export const PROPERTIES: readonly Property[] = ['application-id', 'instance', 'hostname', 'template'];
const ACCESSES: readonly Access[] = ['read', 'write', 'create', 'any'];
const STATEMENTS = ['DEFINE', 'REDIR', 'SET', 'FILE', 'MEMORY', 'PORT', 'SEMAPHORE', 'SHM', 'MSGQUEUE', 'IDENTITY'];
/** The random number generators IDENTITY RESEED and KEEP name. */
const GENERATORS = ['LIBC'];
const RESOURCE_KINDS: Record<string, ResourceKind> = {
  FILE: 'file',
  MEMORY: 'memory',
  PORT: 'port',
  SEMAPHORE: 'semaphore',
  SHM: 'shm',
  MSGQUEUE: 'msgqueue',
};
const ACTION_WORDS: Record<string, Action> = {
  SHARE: 'share',
  'COPY-ON-WRITE': 'copy-on-write',
  DUPLICATE: 'duplicate',
  VIRTUALIZE: 'virtualize',
  MULTIPLEX: 'multiplex',
  ALLOCATE: 'allocate',
};
/** The actions that make sense for each kind, as written. A TCP port is
 * reached from outside: it is multiplexed or a new one allocated, never
 * copied. A SysV object can only be "duplicated" by creating a new object
 * with the old one's contents and binding it to the old virtual id, which
 * is what virtualizing it means: DUPLICATE is accepted as a synonym. */
const ACTIONS_FOR: Record<ResourceKind, string[]> = {
  file: ['SHARE', 'COPY-ON-WRITE', 'DUPLICATE'],
  memory: ['SHARE', 'COPY-ON-WRITE', 'DUPLICATE'],
  port: ['MULTIPLEX', 'ALLOCATE'],
  semaphore: ['VIRTUALIZE', 'DUPLICATE'],
  shm: ['VIRTUALIZE', 'DUPLICATE'],
  msgqueue: ['VIRTUALIZE', 'DUPLICATE'],
};
const SYSV_KINDS: ReadonlySet<ResourceKind> = new Set(['semaphore', 'shm', 'msgqueue']);
/** Only for these does a snapshot know how a resource is used (the fd's
 * open mode, the mapping's protection), so only they take ON. */
const KINDS_WITH_ACCESS: ReadonlySet<ResourceKind> = new Set(['file', 'memory']);

const NAME = '[A-Za-z_][A-Za-z0-9_-]*';
/** A variable reference inside a string. Anything else with '<' is literal. */
const VARIABLE_IN_STRING = new RegExp(`<(${NAME})>`, 'g');
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

// ---------------------------------------------------------------------------
// Lexer: one line at a time (a rule never spans lines).

type Token =
  | { type: 'word'; text: string; column: number }
  | { type: 'string'; text: string; raw: string; column: number; columns: number[] }
  | { type: 'number'; value: number; raw: string; column: number }
  | { type: 'variable'; name: string; raw: string; column: number }
  | { type: 'symbol'; text: '=' | '*'; column: number }
  | { type: 'end'; column: number };

/** Throws the one message a mistake gets: FILE:LINE:COLUMN: what; expected what. */
type Fail = (column: number, wrong: string, expected: string) => never;

function lexLine(line: string, fail: Fail): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  while (i < line.length) {
    const c = line[i];
    if (c === ' ' || c === '\t' || c === '\r') {
      i++;
    } else if (c === '#') {
      break;
    } else if (c === '"') {
      const t = lexString(line, i, fail);
      tokens.push(t.token);
      i = t.next;
    } else if (/[0-9]/.test(c)) {
      const raw = /^[0-9A-Za-z_-]+/.exec(line.slice(i))![0];
      if (!/^(0x[0-9a-f]+|[0-9]+)$/i.test(raw)) fail(i + 1, `invalid number '${raw}'`, 'a decimal or 0x hexadecimal number');
      tokens.push({ type: 'number', value: Number(raw), raw, column: i + 1 });
      i += raw.length;
    } else if (/[A-Za-z_]/.test(c)) {
      const text = new RegExp(`^${NAME}`).exec(line.slice(i))![0];
      tokens.push({ type: 'word', text, column: i + 1 });
      i += text.length;
    } else if (c === '<') {
      const m = new RegExp(`^<(${NAME})>`).exec(line.slice(i));
      if (!m) fail(i + 1, 'malformed variable', '<NAME> (letters, digits, _ and -)');
      tokens.push({ type: 'variable', name: m[1], raw: m[0], column: i + 1 });
      i += m[0].length;
    } else if (c === '=' || c === '*') {
      tokens.push({ type: 'symbol', text: c, column: i + 1 });
      i++;
    } else {
      fail(i + 1, `unexpected character '${c}'`, 'a keyword, a "string", a number, <NAME>, = or *');
    }
  }
  // "End of line" is pointed at just after the last token, before any comment.
  tokens.push({ type: 'end', column: line.slice(0, i).trimEnd().length + 1 });
  return tokens;
}

/** A double-quoted string with \" and \\; `columns` maps each character of
 * the value to its column, so a mistake inside it is pointed at exactly. */
function lexString(line: string, start: number, fail: Fail): { token: Token; next: number } {
  let text = '';
  const columns: number[] = [];
  let i = start + 1;
  for (;;) {
    if (i >= line.length) fail(start + 1, 'unterminated string', 'a closing "');
    const c = line[i];
    if (c === '"') break;
    // The instance's table holds C strings: a NUL would end the path or
    // value there, naming another than the one written (fuzz33 L5).
    if (c === '\0') fail(i + 1, 'a NUL character in a string', 'text without NUL characters');
    if (c === '\\') {
      const e = line[i + 1];
      if (e !== '"' && e !== '\\') fail(i + 1, `unknown escape '\\${e ?? ''}'`, '\\" or \\\\');
      columns.push(i + 1);
      text += e;
      i += 2;
      continue;
    }
    columns.push(i + 1);
    text += c;
    i++;
  }
  return { token: { type: 'string', text, raw: line.slice(start, i + 1), column: start + 1, columns }, next: i + 1 };
}

function describe(t: Token): string {
  switch (t.type) {
    case 'word':
      return `'${t.text}'`;
    case 'string':
    case 'number':
    case 'variable':
      return t.raw;
    case 'symbol':
      return `'${t.text}'`;
    case 'end':
      return 'end of line';
  }
}

// ---------------------------------------------------------------------------
// Parser: a cursor over one line's tokens, then one function per statement.

class Line {
  private pos = 0;
  constructor(
    private readonly tokens: Token[],
    readonly number: number,
    readonly fail: Fail,
  ) {}

  peek(): Token {
    return this.tokens[this.pos];
  }

  next(): Token {
    const t = this.tokens[this.pos];
    if (t.type !== 'end') this.pos++;
    return t;
  }

  /** Fails on the token at hand: "unexpected X; expected Y". */
  unexpected(expected: string, t: Token = this.peek()): never {
    return this.fail(t.column, `unexpected ${describe(t)}`, expected);
  }

  isKeyword(word: string): boolean {
    const t = this.peek();
    return t.type === 'word' && t.text.toUpperCase() === word;
  }

  keyword(word: string): void {
    if (!this.isKeyword(word)) this.unexpected(word);
    this.next();
  }

  string(expected: string): Extract<Token, { type: 'string' }> {
    const t = this.next();
    if (t.type !== 'string') this.unexpected(expected, t);
    return t;
  }

  end(): void {
    const t = this.peek();
    if (t.type !== 'end') this.fail(t.column, `unexpected ${describe(t)} after the rule`, 'the end of the line');
  }
}

/**
 * `author`: the file is being written into an application or template now
 * (loadRules: `run --rules`, `template create --rules`), and the checks of
 * what its author surely did not mean apply too (a rule that never
 * applies, MEMORY ON create or ON write SHARE). Rules stored in a
 * template or a registration are read again without them: what was taken
 * when they were written stays usable (a template made before a check
 * came is still cloned, an application run under them still snapshotted).
 */
export function parseRules(text: string, source: string, { author = false } = {}): RulesFile {
  const rules: RulesFile = { source, text, defines: new Map(), redirs: [], envs: [], resources: [], identity: { hooks: [] } };
  if (author) authored.add(rules);
  text.split('\n').forEach((content, index) => {
    const number = index + 1;
    const fail: Fail = (column, wrong, expected) => {
      throw new AppshotError(`${source}:${number}:${column}: ${wrong}; expected ${expected}`, ExitCode.usage);
    };
    const line = new Line(lexLine(content, fail), number, fail);
    if (line.peek().type !== 'end') parseStatement(line, rules);
  });
  return rules;
}

/** Rules files being parsed with their author's checks (parseRules). */
const authored = new WeakSet<RulesFile>();

function parseStatement(line: Line, rules: RulesFile): void {
  const first = line.next();
  const word = first.type === 'word' ? first.text.toUpperCase() : '';
  if (word === 'DEFINE') parseDefine(line, rules);
  else if (word === 'REDIR') parseRedir(line, rules, first.column);
  else if (word === 'SET') parseSetEnv(line, rules, first.column);
  else if (word === 'IDENTITY') parseIdentity(line, rules, first.column);
  else if (Object.hasOwn(RESOURCE_KINDS, word)) parseResource(line, rules, RESOURCE_KINDS[word], first.column);
  else if (first.type === 'word') line.fail(first.column, `unknown keyword '${first.text}'`, `one of ${STATEMENTS.join(', ')}`);
  else line.unexpected(`a keyword: one of ${STATEMENTS.join(', ')}`, first);
  line.end();
}

/** DEFINE <NAME> AS PROPERTY property */
function parseDefine(line: Line, rules: RulesFile): void {
  const variable = line.next();
  if (variable.type !== 'variable') line.unexpected('a variable name like <APPL-ID>', variable);
  const earlier = rules.defines.has(variable.name);
  if (earlier) line.fail(variable.column, `variable <${variable.name}> is already defined`, 'a new name');
  line.keyword('AS');
  line.keyword('PROPERTY');
  const property = line.next();
  const name = property.type === 'word' ? property.text.toLowerCase() : '';
  if (!(PROPERTIES as string[]).includes(name)) {
    const wrong = property.type === 'word' ? `unknown property '${property.text}'` : `unexpected ${describe(property)}`;
    line.fail(property.column, wrong, `one of ${PROPERTIES.join(', ')}`);
  }
  rules.defines.set(variable.name, name as Property);
}

/** REDIR PATH "from" TO "to" */
function parseRedir(line: Line, rules: RulesFile, column: number): void {
  line.keyword('PATH');
  const fromToken = line.string('the "path" to redirect');
  const from = templatePath(line, rules, fromToken);
  if (from === '/') line.fail(fromToken.column, `${fromToken.raw} is the root directory: redirecting it would redirect every path`, 'a path below /');
  checkOnceRedirected(line, rules, fromToken, from);
  line.keyword('TO');
  const toToken = line.string('the "path" to redirect to');
  const to = templatePath(line, rules, toToken);
  // Every clone would be refused ("not a plain absolute path": the target
  // is made and later removed): said once, here (fuzz33 L5).
  if (to === '/') line.fail(toToken.column, `${toToken.raw} is the root directory: nothing can be redirected to it`, 'a path below /');
  checkPathRuleCount(line, rules, column);
  rules.redirs.push({ from, to, line: line.number });
}

/** A path becomes one entry of the instance's path table: at most once. */
function checkOnceRedirected(line: Line, rules: RulesFile, t: Extract<Token, { type: 'string' }>, path: string): void {
  const twice = pathRules(rules).find((r) => r.from === path);
  if (twice) line.fail(t.column, `${t.raw} is already redirected at line ${twice.line}`, 'each path redirected once (by one REDIR PATH, FILE ... COPY-ON-WRITE or FILE ... DUPLICATE)');
}

function checkPathRuleCount(line: Line, rules: RulesFile, column: number): void {
  const n = pathRules(rules).length;
  if (n >= APPSHOT_REDIRS)
    line.fail(column, `path rule ${n + 1} of this file`, `at most ${APPSHOT_REDIRS} REDIR PATH, FILE ... COPY-ON-WRITE and FILE ... DUPLICATE rules in all (what an instance's table holds)`);
}

/** The rules that each become one entry of the instance's path table. */
function pathRules(rules: RulesFile): { from: string; line: number }[] {
  const files = rules.resources.filter(isPathRule).map((r) => ({ from: r.match as string, line: r.line }));
  return [...rules.redirs, ...files];
}

export function isPathRule(r: ResourceRule): boolean {
  return r.kind === 'file' && (r.action === 'copy-on-write' || r.action === 'duplicate') && typeof r.match === 'string' && r.match !== '*';
}

/** Environment variables SET ENV may not set: what loads the preload
 * library and names the application's tables (fuzz33 M5: a clone set
 * LD_PRELOAD and escaped its virtual view). Also refused in an image's
 * instance section (image/validate.ts). */
export function unsettable(name: string): boolean {
  return /^(LD_PRELOAD|LD_LIBRARY_PATH|LD_AUDIT|APPSHOT_.*)$/.test(name) && !IDENTITY_VARIABLES.includes(name);
}

/** Environment variables SET ENV may not set because the dynamic loader
 * or a shell runs code they name, in every process the application
 * starts, root's included: every LD_ variable (LD_AUDIT, LD_LIBRARY_PATH,
 * LD_PRELOAD load libraries; the others are the loader's to read, never
 * an application's setting), GCONV_PATH (glibc loads conversion modules
 * from it), BASH_ENV and ENV (the file a non-interactive bash, an
 * interactive sh, runs first), SHELLOPTS and BASHOPTS (xtrace, with PS4,
 * runs code), PROMPT_COMMAND, and bash's exported functions (BASH_FUNC_).
 * A rules file has no need of them: it sets the application's own
 * variables. The preload library refuses the same in the instance
 * (preload_exec.c instance_env), and an image's instance section with
 * them is refused (image/validate.ts). */
export function runsCode(name: string): boolean {
  return /^(LD_\w*|GCONV_PATH|BASH_ENV|ENV|SHELLOPTS|BASHOPTS|PROMPT_COMMAND|BASH_FUNC_.*)$/.test(name);
}

/** SET ENV "NAME" = "value" */
function parseSetEnv(line: Line, rules: RulesFile, column: number): void {
  line.keyword('ENV');
  const name = line.string('the variable\'s "NAME"');
  if (!ENV_NAME.test(name.text))
    line.fail(name.column, `invalid environment variable name ${name.raw}`, 'letters, digits and _, not starting with a digit');
  if (unsettable(name.text))
    line.fail(name.column, `${name.text} is appshot's own (it loads the preload library or names the application's tables)`, 'a variable of the application');
  if (runsCode(name.text))
    line.fail(name.column, `${name.text} makes the dynamic loader or a shell run code in every process of the application`, 'a variable of the application');
  if (IDENTITY_VARIABLES.includes(name.text))
    line.fail(name.column, `${name.text} is a clone's identity, which appshot sets`, 'a variable of your own (IDENTITY statements change what makes a clone unique)');
  const twice = rules.envs.find((e) => e.name === name.text);
  if (twice) line.fail(name.column, `${name.text} is already set at line ${twice.line}`, 'each variable set once');
  const eq = line.next();
  if (eq.type !== 'symbol' || eq.text !== '=') line.unexpected('=', eq);
  const value = line.string('the "value"');
  checkVariables(line, rules, value);
  const bytes = Buffer.byteLength(`${name.text}=${value.text}`);
  if (bytes >= APPSHOT_ENV_LEN)
    line.fail(value.column, `${name.text}=value of ${bytes} bytes`, `at most ${APPSHOT_ENV_LEN - 1} bytes of NAME=value (what an instance's table holds)`);
  if (rules.envs.length >= SET_ENVS)
    line.fail(column, `SET ENV ${rules.envs.length + 1} of this file`, `at most ${SET_ENVS} SET ENV lines (what an instance's table holds)`);
  rules.envs.push({ name: name.text, value: value.text, line: line.number });
}

/** The variables that carry a clone's identity (resources/identity.ts). */
const IDENTITY_VARIABLES = ['APPSHOT_CLONE_GENERATION', 'APPSHOT_INSTANCE'];

/** IDENTITY RESEED|KEEP generator, IDENTITY HOOK SIGNAL name|number,
 * IDENTITY HOOK EXEC "/cmd" "arg"... */
function parseIdentity(line: Line, rules: RulesFile, column: number): void {
  const t = line.next();
  const word = t.type === 'word' ? t.text.toUpperCase() : '';
  if (word === 'RESEED' || word === 'KEEP') {
    const g = line.next();
    if (g.type !== 'word' || !GENERATORS.includes(g.text.toUpperCase()))
      line.fail(g.column, g.type === 'word' ? `unknown generator '${g.text}'` : `unexpected ${describe(g)}`, `one of ${GENERATORS.join(', ')}`);
    const earlier = rules.identity.libc;
    if (earlier) line.fail(t.column, `LIBC is already ${earlier.reseed === 'always' ? 'reseeded' : 'kept'} at line ${earlier.line}`, 'one IDENTITY RESEED or KEEP per generator');
    rules.identity.libc = { reseed: word === 'RESEED' ? 'always' : 'never', line: line.number };
  } else if (word === 'HOOK') {
    if (rules.identity.hooks.length >= IDENTITY_HOOKS) line.fail(column, `IDENTITY HOOK ${rules.identity.hooks.length + 1} of this file`, `at most ${IDENTITY_HOOKS} hooks`);
    rules.identity.hooks.push(parseHook(line, rules));
  } else {
    line.fail(t.column, t.type === 'word' ? `unknown IDENTITY statement '${t.text}'` : `unexpected ${describe(t)}`, 'RESEED, KEEP or HOOK');
  }
}

/** Signals a hook may send: any the application can handle. */
const UNCATCHABLE = new Set(['SIGKILL', 'SIGSTOP']);

function parseHook(line: Line, rules: RulesFile): IdentityHook {
  const t = line.next();
  const word = t.type === 'word' ? t.text.toUpperCase() : '';
  if (word === 'SIGNAL') {
    const s = line.next();
    const expected = 'a signal the application can handle, by name (SIGUSR2, USR2) or number';
    if (s.type === 'number') {
      const name = Object.entries(osConstants.signals).find(([, n]) => n === s.value)?.[0] ?? (s.value >= 32 && s.value <= 64 ? `signal ${s.value}` : undefined);
      if (!name) line.fail(s.column, `${s.raw} is no signal`, expected);
      if (UNCATCHABLE.has(name)) line.fail(s.column, `${name} cannot be handled: it would end or stop every clone`, expected);
      return { kind: 'signal', signal: s.value, name, line: line.number };
    }
    if (s.type !== 'word') return line.unexpected(expected, s);
    const name = s.text.toUpperCase().startsWith('SIG') ? s.text.toUpperCase() : `SIG${s.text.toUpperCase()}`;
    const signal = (osConstants.signals as Record<string, number>)[name];
    if (signal === undefined) line.fail(s.column, `unknown signal '${s.text}'`, expected);
    if (UNCATCHABLE.has(name)) line.fail(s.column, `${name} cannot be handled: it would end or stop every clone`, expected);
    return { kind: 'signal', signal, name, line: line.number };
  }
  if (word === 'EXEC') {
    const cmd = line.string('the command\'s "/absolute/path"');
    if (!cmd.text.startsWith('/')) line.fail(cmd.column, `path ${cmd.raw} is not absolute`, 'a path starting with /');
    checkVariables(line, rules, cmd);
    const argv = [cmd.text];
    while (line.peek().type === 'string') {
      const arg = line.string('an "argument"');
      checkVariables(line, rules, arg);
      argv.push(arg.text);
    }
    if (line.peek().type !== 'end') line.unexpected('an "argument" in double quotes, or the end of the line');
    return { kind: 'exec', argv, line: line.number };
  }
  return t.type === 'word' ? line.fail(t.column, `unknown hook '${t.text}'`, 'SIGNAL or EXEC') : line.unexpected('SIGNAL or EXEC', t);
}

/** A REDIR path: absolute, its variables defined above; normalized. */
function templatePath(line: Line, rules: RulesFile, t: Extract<Token, { type: 'string' }>): string {
  if (!t.text.startsWith('/')) line.fail(t.column, `path ${t.raw} is not absolute`, 'a path starting with /');
  checkVariables(line, rules, t);
  return checkPathLength(line, t, normalizePath(t.text));
}

/**
 * The form the preload library compares paths in: lexically normalized
 * ("//" and "/./" collapsed, "x/.." dropped, without looking at symlinks),
 * without a trailing '/' (except "/" itself). A variable cannot be split
 * or made by this: its name holds neither '/' nor '.', and its value is
 * one path component (evaluatePath).
 */
function normalizePath(path: string): string {
  const n = posix.normalize(path);
  return n.length > 1 ? n.replace(/\/+$/, '') : n;
}

function checkPathLength(line: Line, t: Extract<Token, { type: 'string' }>, path: string): string {
  const bytes = Buffer.byteLength(path);
  if (bytes >= APPSHOT_PATH_MAX)
    line.fail(t.column, `a path of ${bytes} bytes`, `a path of at most ${APPSHOT_PATH_MAX - 1} bytes (what an instance's table holds)`);
  return path;
}

function checkVariables(line: Line, rules: RulesFile, t: Extract<Token, { type: 'string' }>): void {
  for (const m of t.text.matchAll(VARIABLE_IN_STRING)) {
    if (rules.defines.has(m[1])) continue;
    const known = [...rules.defines.keys()].map((k) => `<${k}>`);
    const expected = known.length ? `one defined above: ${known.join(', ')}` : `a DEFINE <${m[1]}> AS PROPERTY ... line above`;
    line.fail(t.columns[m.index!], `undefined variable <${m[1]}>`, expected);
  }
}

/** KIND MATCH [ON access] ACTION */
function parseResource(line: Line, rules: RulesFile, kind: ResourceKind, column: number): void {
  const matchToken = kind === 'file' && line.peek().type === 'string' ? (line.peek() as Extract<Token, { type: 'string' }>) : undefined;
  const match = parseMatch(line, kind);
  let access: Access = 'any';
  if (line.isKeyword('ON')) {
    const on = line.next();
    if (!KINDS_WITH_ACCESS.has(kind)) line.fail(on.column, `ON does not apply to ${kind.toUpperCase()}`, actionList(kind));
    const accessToken = line.peek();
    access = parseAccess(line);
    // A snapshot's mappings were all made before it: none is "created".
    if (authored.has(rules) && kind === 'memory' && access === 'create') line.fail(accessToken.column, 'ON create does not apply to MEMORY (a mapping is never created by a clone)', 'ON read, ON write or ON any');
  }
  const actionToken = line.peek();
  const action = parseAction(line, kind);
  // By name ("[heap]", "*"): anonymous memory, which every clone would
  // write into. A file's shared mapping may be shared writable (classify
  // lets a FILE_SHARED one be), as `MEMORY "/path" SHARE` says it.
  if (authored.has(rules) && kind === 'memory' && access === 'write' && action === 'share' && !(typeof match === 'string' && match.startsWith('/')))
    line.fail(actionToken.column, 'MEMORY ... ON write SHARE would share a writable mapping among clones', `COPY-ON-WRITE or DUPLICATE (SHARE is for read-only mappings)`);
  const rule: ResourceRule = { kind, match, access, action, line: line.number, column };
  // The first rule that matches a resource decides it (ruleFor): one
  // whose every resource an earlier rule matches would never apply, and
  // says what the file's author did not get (fuzz33 L4: `PORT 41000
  // ALLOCATE` twice and `MULTIPLEX` once were taken, the first deciding).
  // A path rule is also the path's entry in the instance's table, which
  // the preload library acts on whatever rule decides the resource.
  const shadowing = authored.has(rules) ? earlierDeciding(rules, rule) : undefined;
  const earlier = isPathRule(rule) ? undefined : shadowing;
  if (earlier)
    line.fail(column, `this ${kind.toUpperCase()} rule never applies: line ${earlier.line} decides every resource it matches (the first rule that matches decides)`, 'one rule per resource, a narrower one before a broader one');
  if (isPathRule(rule)) {
    // It becomes an entry of the instance's path table (see instanceConfig).
    const t = matchToken!;
    const what = action === 'copy-on-write' ? 'copying it on write would copy' : 'duplicating it would copy';
    if (match === '/') line.fail(t.column, `${t.raw} is the root directory: ${what} the whole filesystem`, 'a path below /');
    checkPathLength(line, t, match as string);
    checkOnceRedirected(line, rules, t, match as string);
    checkPathRuleCount(line, rules, column);
  }
  rules.resources.push(rule);
}

/** Per rules file being parsed: its resource rules by kind, match and
 * access (the first of each), so that finding an earlier rule that
 * decides all a new one matches is a few lookups, not a scan (a rules
 * file of 50,000 PORT lines). */
const firstRules = new WeakMap<RulesFile, Map<string, ResourceRule>>();
const ruleKey = (kind: ResourceKind, match: ResourceRule['match'], access: Access) => `${kind}\0${access}\0${match}`;

/** An earlier rule that matches every resource `later` does, for each
 * access it applies to: `later` would never decide anything. A FILE rule
 * that copies (COPY-ON-WRITE, DUPLICATE) below a directory an earlier
 * rule decides is not dead: it is also the path's entry in the
 * instance's table, which the preload library acts on. Records `later`. */
function earlierDeciding(rules: RulesFile, later: ResourceRule): ResourceRule | undefined {
  let first = firstRules.get(rules);
  if (!first) firstRules.set(rules, (first = new Map()));
  const { kind, match, access } = later;
  const isPath = typeof match === 'string' && match.startsWith('/');
  // What can decide all of `later`: the same match; '*' (for MEMORY, only
  // of what is not a path); a directory above a path.
  const covering: ResourceRule['match'][] = [match];
  if (match !== '*' && (kind !== 'memory' || !isPath) && kind !== 'file') covering.push('*');
  if (isPath && !(kind === 'file' && isPathRule(later))) for (let d = posix.dirname(match); ; d = posix.dirname(d)) {
    covering.push(d);
    if (d === '/') break;
  }
  let found: ResourceRule | undefined;
  for (const m of covering)
    for (const a of access === 'any' ? (['any'] as Access[]) : (['any', access] as Access[])) {
      const r = first.get(ruleKey(kind, m, a));
      if (r && (!found || r.line < found.line)) found = r;
    }
  const key = ruleKey(kind, match, access);
  if (!found && !first.has(key)) first.set(key, later);
  return found;
}

function parseMatch(line: Line, kind: ResourceKind): ResourceRule['match'] {
  if (kind === 'file') return filePath(line, line.string('the file\'s "/absolute/path"'));
  if (kind === 'memory') return memoryMatch(line);
  if (kind === 'port') return numberOrAll(line, 'a port number (1 to 65535) or *', 1, 0xffff);
  line.keyword('KEY');
  return numberOrAll(line, 'an IPC key (a number) or *', 0, 0xffffffff);
}

/** A FILE path: absolute and literal (it names the template's files, which
 * exist before any instance does); normalized (normalizePath). */
function filePath(line: Line, t: Extract<Token, { type: 'string' }>): string {
  if (!t.text.startsWith('/')) line.fail(t.column, `path ${t.raw} is not absolute`, 'a path starting with /');
  const variable = /<([A-Za-z_][A-Za-z0-9_-]*)>/.exec(t.text);
  if (variable) line.fail(t.columns[variable.index], `variable ${variable[0]} in a resource's path`, 'a literal path (variables belong in REDIR PATH and SET ENV)');
  return normalizePath(t.text);
}

/** "[heap]"-like names, an absolute path, or "*" (every anonymous mapping). */
function memoryMatch(line: Line): string {
  const t = line.next();
  if (t.type === 'symbol' && t.text === '*') return '*';
  const expected = 'a mapping name like "[heap]", an absolute "/path", or "*"';
  if (t.type !== 'string') return line.unexpected(expected, t);
  if (t.text === '*') return '*';
  if (/^\[[^\]]+\]$/.test(t.text)) return t.text;
  if (t.text.startsWith('/')) return filePath(line, t);
  return line.fail(t.column, `${t.raw} names no mapping`, expected);
}

function numberOrAll(line: Line, expected: string, min: number, max: number): number | '*' {
  const t = line.next();
  if (t.type === 'symbol' && t.text === '*') return '*';
  if (t.type !== 'number') return line.unexpected(expected, t);
  if (t.value < min || t.value > max) line.fail(t.column, `${t.raw} is out of range`, expected);
  return t.value;
}

function parseAccess(line: Line): Access {
  const t = line.next();
  const word = t.type === 'word' ? t.text.toLowerCase() : '';
  if (!(ACCESSES as string[]).includes(word)) {
    const wrong = t.type === 'word' ? `unknown access '${t.text}'` : `unexpected ${describe(t)}`;
    line.fail(t.column, wrong, `one of ${ACCESSES.join(', ')}`);
  }
  return word as Access;
}

function parseAction(line: Line, kind: ResourceKind): Action {
  const t = line.next();
  if (t.type !== 'word') return line.unexpected(actionList(kind), t);
  const word = t.text.toUpperCase();
  if (!Object.hasOwn(ACTION_WORDS, word)) line.fail(t.column, `unknown action '${t.text}'`, actionList(kind));
  if (!ACTIONS_FOR[kind].includes(word)) line.fail(t.column, `action ${word} does not apply to ${kind.toUpperCase()}`, actionList(kind));
  // For SysV objects the two words are one action (see ACTIONS_FOR).
  return SYSV_KINDS.has(kind) ? 'virtualize' : ACTION_WORDS[word];
}

function actionList(kind: ResourceKind): string {
  return `one of ${ACTIONS_FOR[kind].join(', ')} for ${kind.toUpperCase()}`;
}

/** Reads and parses a rules file; its name (not its directory) is what
 * messages and images call it. */
export function loadRules(path: string): RulesFile {
  let text: string;
  let fd: number | undefined;
  try {
    // A regular file of a bounded size, opened without waiting: a FIFO
    // hung the resident engine (and every command of its user) for good,
    // /dev/zero filled its memory (fuzz33 M7).
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
    const st = fstatSync(fd);
    if (!st.isFile()) throw new AppshotError(`cannot read rules file ${path}: ${st.isDirectory() ? 'it is a directory' : 'it is not a regular file'}`, ExitCode.usage);
    if (st.size > RULES_MAX_BYTES) throw new AppshotError(`cannot read rules file ${path}: it is ${st.size} bytes (at most ${RULES_MAX_BYTES})`, ExitCode.usage);
    const buf = Buffer.alloc(Number(st.size));
    let got = 0;
    for (let n; got < buf.length && (n = readSync(fd, buf, got, buf.length - got, got)) > 0; ) got += n;
    text = buf.subarray(0, got).toString('utf8');
  } catch (e) {
    if (e instanceof AppshotError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'it is a directory' : (e as Error).message;
    throw new AppshotError(`cannot read rules file ${path}: ${why}`, ExitCode.usage);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
  return parseRules(text, basename(path), { author: true });
}

/** The largest rules file read: rules are a page or two of text. */
const RULES_MAX_BYTES = 1 << 20;

// ---------------------------------------------------------------------------
// Evaluation: one instance's view of the rules.

/** At most how many bytes an evaluated string may have, and what to call
 * it (with its line) when it has more. */
export interface Limit {
  bytes: number;
  what: string;
  line?: number;
}

/** Substitutes every <VARIABLE> of `s` with the property it was DEFINEd as;
 * with a limit, refuses a result longer than it. */
export function evaluate(s: string, rules: RulesFile, props: Record<Property, string>, limit?: Limit): string {
  const value = s.replace(VARIABLE_IN_STRING, (_, name: string) => {
    const property = rules.defines.get(name);
    if (!property) throw new AppshotError(`${rules.source}: undefined variable <${name}>`, ExitCode.usage);
    const value = props[property];
    if (value === undefined) throw new AppshotError(`${rules.source}: no value for property ${property} of <${name}>`, ExitCode.usage);
    return value;
  });
  if (limit) checkLimit(rules, value, limit);
  return value;
}

function checkLimit(rules: RulesFile, value: string, limit: Limit): void {
  const bytes = Buffer.byteLength(value);
  if (bytes <= limit.bytes) return;
  const where = limit.line === undefined ? rules.source : `${rules.source}:${limit.line}`;
  const shown = value.length > 60 ? `${value.slice(0, 57)}...` : value;
  throw new AppshotError(`${where}: ${limit.what} is ${bytes} bytes for this instance (${shown}); an instance's table holds at most ${limit.bytes}`, ExitCode.usage);
}

/** As evaluate, for a path: a value must stay one path component, or an
 * instance could be redirected outside the directory the rule meant. The
 * result is normalized (an empty value leaves "//"). */
function evaluatePath(s: string, rules: RulesFile, props: Record<Property, string>, limit: Limit): string {
  for (const m of s.matchAll(VARIABLE_IN_STRING)) {
    const property = rules.defines.get(m[1]);
    const value = property ? props[property] : undefined;
    if (value !== undefined && (value.includes('/') || value.includes('\0') || value === '.' || value === '..'))
      throw new AppshotError(`${rules.source}: <${m[1]}> is '${value}', which cannot be part of a path`, ExitCode.usage);
  }
  const path = normalizePath(evaluate(s, rules, props));
  checkLimit(rules, path, limit);
  return path;
}

const PATH_BYTES = APPSHOT_PATH_MAX - 1;

/** Where an instance keeps its own copy of a FILE ... COPY-ON-WRITE or
 * DUPLICATE rule's path: the same path under its private directory. */
export function privateCopyPath(rules: RulesFile, rule: ResourceRule, privateRoot: string): string {
  const to = join(privateRoot, rule.match as string);
  checkLimit(rules, to, { bytes: PATH_BYTES, what: `the private copy of FILE ... ${rule.action.toUpperCase()}`, line: rule.line });
  return to;
}

/**
 * The instance section for one instance: REDIR PATH rules evaluated, plus
 * one {kind:'cow'} redir per FILE ... COPY-ON-WRITE rule whose match is a
 * path (from = the path, to = join(privateRoot, the path)), and SET ENV
 * evaluated as "NAME=value". Refuses a value longer than the instance's
 * table holds (APPSHOT_PATH_MAX, APPSHOT_ENV_LEN).
 */
export function instanceConfig(
  rules: RulesFile,
  props: Record<Property, string>,
  privateRoot: string,
): { redirs: { kind: 'path' | 'cow'; from: string; to: string }[]; env: string[] } {
  const paths = rules.redirs.map((r) => {
    const from = evaluatePath(r.from, rules, props, { bytes: PATH_BYTES, what: "REDIR PATH's path", line: r.line });
    if (from === '/') throw new AppshotError(`${rules.source}:${r.line}: REDIR PATH ${r.from} is the root directory for this instance, which cannot be redirected`, ExitCode.usage);
    const to = evaluatePath(r.to, rules, props, { bytes: PATH_BYTES, what: "REDIR PATH's TO path", line: r.line });
    if (to === '/') throw new AppshotError(`${rules.source}:${r.line}: REDIR PATH's TO ${r.to} is the root directory for this instance, which nothing can be redirected to`, ExitCode.usage);
    return { kind: 'path' as const, from, to };
  });
  const cows = rules.resources
    .filter((r) => isPathRule(r) && r.action === 'copy-on-write')
    .map((r) => ({ kind: 'cow' as const, from: r.match as string, to: privateCopyPath(rules, r, privateRoot) }));
  // An environment name has no variables: "NAME=value" evaluates as a whole.
  const env = rules.envs.map((e) => evaluate(`${e.name}=${e.value}`, rules, props, { bytes: APPSHOT_ENV_LEN - 1, what: `SET ENV "${e.name}"`, line: e.line }));
  return { redirs: [...paths, ...cows], env };
}

/** The IDENTITY hooks for one instance: EXEC's strings evaluated. */
export function identityHooks(rules: RulesFile | undefined, props: Record<Property, string>): IdentityHook[] {
  return (rules?.identity.hooks ?? []).map((h) => (h.kind === 'exec' ? { ...h, argv: h.argv.map((a) => evaluate(a, rules!, props)) } : h));
}

/**
 * The rule that decides a resource: the first of the file that matches
 * (the specification's step 360). `subject` is a path for FILE (matched by a rule for
 * it or for a directory above it); for MEMORY a mapping's special name
 * ("[heap]"), its file's path, or '' for unnamed anonymous memory ('*'
 * matches every subject that is not a path); a port number; an IPC key.
 * A rule ON read/write/create matches only that access; with `access`
 * omitted (not known), only rules for any access match.
 */
export function ruleFor(
  rules: RulesFile | undefined,
  kind: ResourceKind,
  subject: string | number,
  access?: 'read' | 'write' | 'create',
): ResourceRule | undefined {
  return rules?.resources.find((r) => r.kind === kind && (r.access === 'any' || r.access === access) && matches(r, subject));
}

function matches(rule: ResourceRule, subject: string | number): boolean {
  switch (rule.kind) {
    case 'file':
      return typeof subject === 'string' && pathCovers(rule.match as string, subject);
    case 'memory':
      if (typeof subject !== 'string') return false;
      if (rule.match === '*') return !subject.startsWith('/');
      return (rule.match as string).startsWith('/') ? pathCovers(rule.match as string, subject) : rule.match === subject;
    default:
      // Keys are compared unsigned: the image keeps them as int32.
      return rule.match === '*' || rule.match === Number(subject) >>> 0;
  }
}

/** Whether `path` is `dir` or below it. */
function pathCovers(dir: string, path: string): boolean {
  return path === dir || path.startsWith(dir === '/' ? '/' : `${dir}/`);
}
