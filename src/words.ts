/** Numbers in words for people: "1 process", "2 processes". */

/** `n` and its noun, singular for exactly one; `many` when the plural is
 * not the noun with an s ("process" -> "processes"). */
export function plural(n: number | bigint, one: string, many = /(s|x|ch|sh)$/.test(one) ? `${one}es` : `${one}s`): string {
  return `${n} ${n == 1 ? one : many}`;
}

/** A span of time in one unit, rounded down: "4s", "12m", "3h", "2d" (up
 * to two minutes in seconds, two hours in minutes, two days in hours). */
export function duration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (!Number.isFinite(s)) return '-';
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}
