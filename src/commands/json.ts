/**
 * How every command's --json looks (docs/json.md documents each):
 *  - an object whose first field is `schema`, "appshot.<command>/<version>"
 *    (the version changes only when a field changes meaning or goes);
 *  - a command that lists things (ps, clone, port, key ls, service ls)
 *    prints an array, each element carrying the schema, so that
 *    `jq '.[0]'` and existing scripts go on working;
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

/** Prints a command's JSON on stdout: an object with its schema, or an
 * array whose every element has it. */
export function printJson(command: string, value: object | object[]): void {
  const out = Array.isArray(value) ? value.map((v) => withSchema(command, v)) : withSchema(command, value);
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
}

/** The names of the bits set in `flags`, by `names` (bit -> name); bits
 * without a name come as "0x..". */
export function flagNames(flags: number, names: Record<number, string>): string[] {
  const out: string[] = [];
  for (let bit = 1; bit !== 0 && bit <= flags; bit = (bit << 1) >>> 0) if (flags & bit) out.push(names[bit] ?? `0x${bit.toString(16)}`);
  return out;
}
