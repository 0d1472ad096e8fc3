// node bench/cow-threshold.js: where copy-on-write capture starts to pay
// (src/snapshot/cowcapture.ts, DEFAULT_MIN_BYTES). For bench/bin/memapp of
// each size (BENCH_SIZES MiB, default 0,1,2,4,8,16), BENCH_RUNS rounds
// (default 7) of two `snapshot --leave-running --full` of the same app, in
// an order that alternates by round: one with every process forked
// whatever its size (APPSHOT_COW_MIN_BYTES=0), one with --no-cow-capture.
// Prints the median (min-max) frozenMs of each. In-process commands
// (APPSHOT_ENGINE=off): the variable is read by the command itself.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { read, summary, waitFor } from './measure.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'appshot.js');
const memapp = join(root, 'bench', 'bin', 'memapp');
const sizes = (process.env.BENCH_SIZES ?? '0,1,2,4,8,16').split(',').map(Number);
const runs = Number(process.env.BENCH_RUNS ?? 7);
const home = mkdtempSync(join(tmpdir(), 'appshot-bench-cow-'));
const work = mkdtempSync(join(tmpdir(), 'appshot-bench-cow-images-'));
const env = { ...process.env, APPSHOT_HOME: home, APPSHOT_ENGINE: 'off' };

function appshot(args, extra = {}) {
  const r = spawnSync(process.execPath, [cli, ...args], { env: { ...env, ...extra }, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`appshot ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const aids = new Set();

async function main() {
  const rows = [];
  for (const mib of sizes) {
    const aid = `m${mib}`;
    aids.add(aid);
    appshot(['run', '-d', '--aid', aid, '--', memapp, String(mib)]);
    await waitFor(`${aid} to be ready`, () => read(join(home, 'apps', aid, 'log')).includes('READY'));
    const cow = [];
    const frozen = [];
    let copied = 0;
    for (let round = 0; round < runs; round++) {
      const take = (withCow) => {
        const dir = join(work, `${aid}-${round}-${withCow ? 'cow' : 'frozen'}`);
        const out = JSON.parse(appshot(['snapshot', aid, '-o', dir, '--leave-running', '--full', '--json', ...(withCow ? [] : ['--no-cow-capture'])], withCow ? { APPSHOT_COW_MIN_BYTES: '0' } : {}));
        rmSync(dir, { recursive: true, force: true });
        (withCow ? cow : frozen).push(out.frozenMs);
        if (withCow) copied += out.cowCapture?.copied ?? 0;
      };
      take(round % 2 === 0);
      take(round % 2 !== 0);
    }
    appshot(['rm', '-f', aid]);
    aids.delete(aid);
    const c = summary(cow);
    const f = summary(frozen);
    rows.push(`| ${mib} MiB | ${c.median} (${c.min}–${c.max}) | ${f.median} (${f.min}–${f.max}) | ${copied}/${runs} |`);
  }
  process.stdout.write(`| memapp | frozen, forked (ms) | frozen, copied (ms) | forked |\n|---|---|---|---|\n${rows.join('\n')}\n`);
}

main()
  .catch((e) => {
    process.stderr.write(`bench/cow-threshold: ${e.message}\n`);
    process.exitCode = 1;
  })
  .finally(() => {
    if (aids.size) spawnSync(process.execPath, [cli, 'rm', '-f', ...aids], { env, stdio: 'ignore' });
    rmSync(work, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  });
