/** Numbers in words for people: "1 process", "2 processes". */

/** `n` and its noun, singular for exactly one; `many` when the plural is
 * not the noun with an s ("process" -> "processes"). */
export function plural(n: number | bigint, one: string, many = /(s|x|ch|sh)$/.test(one) ? `${one}es` : `${one}s`): string {
  return `${n} ${n == 1 ? one : many}`;
}
