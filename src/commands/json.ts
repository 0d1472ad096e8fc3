/**
 * How every command's --json looks (docs/json.md documents each):
 *  - an object whose first field is `schema`, "appshot.<command>/<version>"
 *    (the version changes only when a field changes meaning or goes);
 *  - a command that lists things (ps, clone, port, key ls, service ls)
 *    prints an array, each element carrying the schema, so that
 *    `jq '.[0]'` and existing scripts go on working; with --json-object,
 *    version 2 of its schema, one object {schema, LIST: [...]}, which names
 *    its schema also when the list is empty (an empty array cannot);
 *  - times in milliseconds named ...Ms, rounded to the microsecond;
 *    instants as ISO 8601 strings named ...At;
 *  - flags by name, never as raw bits; nothing internal.
 */

/** The schema name of a command's output (`template create` ->
 * appshot.template-create/1). */
export function schemaOf(command: string, version = 1): string {
  return `appshot.${command.trim().replace(/\s+/g, '-')}/${version}`;
}

/** Milliseconds rounded to the microsecond. */
export function ms(value: number): number {
  return Math.round(value * 1000) / 1000;
}

/** `value` with its schema first. */
export function withSchema<T extends object>(command: string, value: T): { schema: string } & T {
  return { schema: schemaOf(command), ...value };
}

/** The commands that list things, with the name of their list in
 * version 2 of their schema (--json-object). */
const LISTS: Record<string, string> = {
  ps: 'apps',
  stop: 'apps',
  kill: 'apps',
  wait: 'apps',
  rm: 'apps',
  prune: 'apps',
  clone: 'clones',
  port: 'ports',
  'key ls': 'keys',
  'service ls': 'services',
};

/** Fields that version 1 of a list's schema keeps for the scripts that
 * read it, marked *deprecated* in docs/json.md beside the consistent
 * field; version 2 (--json-object) leaves them out, as the doc's rule
 * says. */
const DEPRECATED_IN_V1: Record<string, string[]> = {
  ps: ['command'],
};

/** `value` without the fields named in `fields`. */
function without(value: object, fields: string[]): object {
  if (!fields.length) return value;
  return Object.fromEntries(Object.entries(value).filter(([k]) => !fields.includes(k)));
}

/** What a list command's options ask for: version 1 (--json, an array)
 * or 2 (--json-object). */
export interface ListJsonOptions {
  json: boolean;
  jsonObject?: boolean;
}

/** Whether a command was asked for JSON, in either form. */
export const wantsJson = (opts: ListJsonOptions): boolean => opts.json || opts.jsonObject === true;

/** The --json-object option of a list command: its flags and help. */
export function jsonObjectOption(command: string): [string, string, boolean] {
  return ['--json-object', `as --json, but one object {schema, ${LISTS[command]}: [...]} (${schemaOf(command, 2)}), which names its schema even when the list is empty`, false];
}

/** Prints a command's JSON on stdout: an object with its schema, or an
 * array whose every element has it; with `opts.jsonObject`, a list in one
 * object, version 2 of its schema. */
export function printJson(command: string, value: object | object[], opts?: ListJsonOptions): void {
  let out: object;
  if (!Array.isArray(value)) out = withSchema(command, value);
  else if (opts?.jsonObject) {
    if (!LISTS[command]) throw new Error(`appshot: ${command} has no list form`);
    out = { schema: schemaOf(command, 2), [LISTS[command]]: value.map((v) => without(v, DEPRECATED_IN_V1[command] ?? [])) };
  } else out = value.map((v) => withSchema(command, v));
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
}

/** The names of the bits set in `flags`, by `names` (bit -> name); bits
 * without a name come as "0x..". */
export function flagNames(flags: number, names: Record<number, string>): string[] {
  const out: string[] = [];
  for (let bit = 1; bit !== 0 && bit <= flags; bit = (bit << 1) >>> 0) if (flags & bit) out.push(names[bit] ?? `0x${bit.toString(16)}`);
  return out;
}
