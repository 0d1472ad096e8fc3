// npm run bench, part four: what established TCP connections cost a
// snapshot and a restore (TCP repair, src/resources/tcp.ts). bench/connapp
// holds N idle connections from this process; each N is snapshotted (the
// application ends) and restored, and every connection then makes one
// round trip, so that a connection lost would show. The cost per
// connection is measured against the same application with none.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const app = join(root, 'bench', 'bin', 'connapp');
const cli = join(root, 'bin', 'appshot.js');
const runs = Number(process.env.BENCH_RUNS ?? 3);
const counts = (process.env.BENCH_CONNECTIONS ?? '0,1000').split(',').map(Number);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-tcp-'));
const env = { ...process.env, APPSHOT_HOME: home };
const port = 26900;

const appshot = (...args) => JSON.parse(execFileSync(process.execPath, [cli, ...args, '--json'], { encoding: 'utf8', env }));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function listening() {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((r) => {
      const s = connect(port, '127.0.0.1', () => (s.destroy(), r(true)));
      s.on('error', () => r(false));
    });
    if (ok) return;
    await sleep(25);
  }
  throw new Error('connapp did not listen');
}

function open(n) {
  return Promise.all(
    Array.from({ length: n }, () => new Promise((ok, fail) => {
      const s = connect(port, '127.0.0.1', () => ok(s));
      s.on('error', fail);
    })),
  );
}

/** One round trip on every connection; throws on any that fails. */
function roundTrips(sockets) {
  return Promise.all(
    sockets.map((s, i) => new Promise((ok, fail) => {
      const want = `ping ${i}\n`;
      let got = '';
      const onData = (d) => {
        got += d;
        if (got.length >= want.length) {
          s.off('data', onData);
          got === want ? ok() : fail(new Error(`connection ${i} answered ${JSON.stringify(got)}`));
        }
      };
      s.on('data', onData);
      s.once('error', fail);
      s.write(want);
    })),
  );
}

async function once(n, r) {
  const aid = `conn${n}-${r}`;
  execFileSync(process.execPath, [cli, 'run', '-d', '--aid', aid, '--', app, String(port)], { env });
  await listening();
  const sockets = await open(n);
  await roundTrips(sockets);
  await sleep(100 + n / 10); // every connection accepted
  const image = join(home, `${aid}.appshot`);
  const snap = appshot('snapshot', aid, '-o', image);
  const restored = appshot('restore', image);
  await roundTrips(sockets);
  for (const s of sockets) s.destroy();
  execFileSync(process.execPath, [cli, 'stop', aid, '-s', 'KILL'], { env });
  await sleep(200);
  rmSync(image, { recursive: true, force: true });
  return { frozen: snap.frozenMs, snapshot: snap.totalMs, restore: restored.restoreMs };
}

const results = new Map(counts.map((n) => [n, []]));
try {
  for (let r = 0; r < runs; r++) for (const n of counts) results.get(n).push(await once(n, r));
} finally {
  rmSync(home, { recursive: true, force: true });
}
const rows = counts.map((n) => {
  const m = (k) => +median(results.get(n).map((x) => x[k])).toFixed(1);
  return { connections: n, frozen_ms: m('frozen'), snapshot_ms: m('snapshot'), restore_ms: m('restore') };
});
const base = rows[0];
for (const row of rows.slice(1)) {
  const per = (k) => +(((row[k] - base[k]) / (row.connections - base.connections)) * 1000).toFixed(1);
  Object.assign(row, { frozen_us_per_conn: per('frozen_ms'), snapshot_us_per_conn: per('snapshot_ms'), restore_us_per_conn: per('restore_ms') });
}
if (process.argv.includes('--json')) console.log(JSON.stringify({ runs, rows }, null, 2));
else {
  console.log(`established TCP connections through snapshot and restore, median of ${runs}`);
  console.table(rows);
}
