// Medians of bench/frozen-ab.sh's lines: node bench/frozen-ab-summary.js results.txt
import { readFileSync } from 'node:fs';

const rows = readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => l.split(' ')).filter((r) => r[3] !== 'FAIL');
const groups = new Map();
for (const r of rows) {
  const k = `${r[1]} ${r[2]} ${r[0]}`;
  if (!groups.has(k)) groups.set(k, []);
  groups.get(k).push(r);
}
const median = (a) => {
  const s = [...a].sort((x, y) => x - y);
  const n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
};
console.log('engine kind build  n  frozenMs median [min-max]  dumpMs  trackMs  injected  load');
for (const [k, rs] of [...groups].sort()) {
  const f = rs.map((r) => +r[3]);
  console.log(
    k.padEnd(16),
    String(rs.length).padStart(2),
    `${median(f).toFixed(2)} [${Math.min(...f).toFixed(1)}-${Math.max(...f).toFixed(1)}]`.padStart(24),
    median(rs.map((r) => +r[4])).toFixed(2).padStart(7),
    median(rs.map((r) => +r[5])).toFixed(2).padStart(8),
    rs[0][6].padStart(9),
    median(rs.map((r) => +r[8])).toFixed(2).padStart(5),
  );
}
