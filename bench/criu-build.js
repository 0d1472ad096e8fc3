// CRIU for bench/criu.js: the one on PATH if it is 4.x, else CRIU_TAG
// (default v4.2) built from source into a cache directory. Debian 12's own
// package (3.17) does not work on recent kernels, so it is not used.
//
// The recipe, as root (an ordinary user gets the package list in one line):
//   apt-get install -y --no-install-recommends build-essential git pkg-config \
//     libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler \
//     python3-protobuf libcap-dev libnl-3-dev libnet1-dev uuid-dev libbsd-dev
//   git clone --depth 1 --branch v4.2 https://github.com/checkpoint-restore/criu \
//     ~/.cache/appshot-bench/criu-v4.2
//   make -C ~/.cache/appshot-bench/criu-v4.2 -j2 criu
// `make criu` builds the binary only: no documentation (asciidoc), no
// Python tools, no plugins. CRIU_GIT names another repository to clone
// (a local mirror, say); CRIU_BIN a criu binary to use as it is.
//
// Usable alone: `node bench/criu-build.js` builds (or finds) CRIU, runs
// `criu check` and prints the binary's path, or one line saying why not.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const CRIU_TAG = process.env.CRIU_TAG ?? 'v4.2';
const CRIU_GIT = process.env.CRIU_GIT ?? 'https://github.com/checkpoint-restore/criu';
const CACHE = join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'appshot-bench');
const BUILD_DEPS = [
  'build-essential', 'git', 'pkg-config', 'libprotobuf-dev', 'libprotobuf-c-dev', 'protobuf-c-compiler', 'protobuf-compiler',
  'python3-protobuf', 'libcap-dev', 'libnl-3-dev', 'libnet1-dev', 'uuid-dev', 'libbsd-dev',
];

/** "4.2" from `criu --version`, or undefined if it does not run. */
function versionOf(bin) {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? /Version:\s*([\d.]+)/.exec(r.stdout)?.[1] : undefined;
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 256 << 20, ...opts });
  if (r.status !== 0) {
    const tail = `${r.stderr ?? ''}${r.stdout ?? ''}`.trim().split('\n').slice(-3).join(' | ');
    throw new Error(`${cmd} ${args.slice(0, 4).join(' ')} failed (${r.error?.message ?? `exit ${r.status}`}): ${tail}`);
  }
  return r.stdout;
}

function missingDeps() {
  const r = spawnSync('dpkg-query', ['-W', '-f', '${Package} ${Status}\n', ...BUILD_DEPS], { encoding: 'utf8' });
  const installed = new Set((r.stdout ?? '').split('\n').filter((l) => l.endsWith(' installed')).map((l) => l.split(' ')[0]));
  return BUILD_DEPS.filter((p) => !installed.has(p));
}

/** Builds CRIU_TAG into the cache (once) and returns the binary's path. */
function build(log) {
  const src = join(CACHE, `criu-${CRIU_TAG}`);
  const bin = join(src, 'criu', 'criu');
  if (existsSync(bin) && versionOf(bin)) return bin;
  const missing = missingDeps();
  if (missing.length) {
    if (process.getuid?.() !== 0) throw new Error(`building CRIU needs these packages: apt-get install ${missing.join(' ')}`);
    log(`installing CRIU's build dependencies: ${missing.join(' ')}`);
    run('apt-get', ['install', '-y', '--no-install-recommends', ...missing], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  }
  if (!existsSync(join(src, 'Makefile'))) {
    rmSync(src, { recursive: true, force: true });
    mkdirSync(CACHE, { recursive: true });
    log(`cloning CRIU ${CRIU_TAG} from ${CRIU_GIT}`);
    run('git', ['clone', '--quiet', '--depth', '1', '--branch', CRIU_TAG, CRIU_GIT, src]);
  }
  log(`building CRIU ${CRIU_TAG} in ${src} (make -j2 criu, a few minutes)`);
  run('make', ['-C', src, '-j2', 'criu']);
  if (!versionOf(bin)) throw new Error(`${bin} was not built`);
  return bin;
}

/**
 * A CRIU 4.x that passes `criu check` on this kernel: { bin, version }, or
 * { why } in one line.
 */
export function findCriu(log = (s) => process.stderr.write(`bench/criu: ${s}\n`)) {
  let bin = process.env.CRIU_BIN;
  try {
    if (!bin) {
      const onPath = spawnSync('sh', ['-c', 'command -v criu'], { encoding: 'utf8' }).stdout.trim();
      bin = onPath && /^[4-9]\./.test(versionOf(onPath) ?? '') ? onPath : build(log);
    }
  } catch (e) {
    return { why: `CRIU could not be built: ${e.message}` };
  }
  const version = versionOf(bin);
  if (!version) return { why: `${bin} does not run` };
  const check = spawnSync(bin, ['check'], { encoding: 'utf8' });
  if (check.status !== 0) {
    const first = `${check.stderr}${check.stdout}`.split('\n').find((l) => /error|fail/i.test(l)) ?? `exit ${check.status}`;
    return { why: `CRIU ${version} cannot run on this kernel (criu check: ${first.trim()})` };
  }
  return { bin, version };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const found = findCriu();
  if (found.why) {
    process.stderr.write(`bench/criu: ${found.why}\n`);
    process.exit(1);
  }
  process.stdout.write(`${found.bin} (CRIU ${found.version})\n`);
  execFileSync(found.bin, ['--version'], { stdio: 'inherit' });
}
