/** Numbers in words for people: "1 process", "2 processes". */

/** `n` and its noun, singular for exactly one; `many` when the plural is
 * not the noun with an s ("process" -> "processes"). */
export function plural(n: number | bigint, one: string, many = /(s|x|ch|sh)$/.test(one) ? `${one}es` : `${one}s`): string {
  return `${n} ${n == 1 ? one : many}`;
}

/** A span of time in one unit, rounded down: "4s", "12m", "3h", "2d" (the
 * largest unit of which it has at least one). */
export function duration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (!Number.isFinite(s)) return '-';
  // The largest unit it has one of: "59s", then "1m" (not "106s" beside
  // "6m" in one column).
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}
