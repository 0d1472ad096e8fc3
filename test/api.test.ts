/**
 * The package and its Node API as a CI user gets them: the tarball of
 * `npm pack` installed with `npm install` in a directory of its own, its
 * CLI and its API used from there; then the example's flow
 * (examples/vitest-redis: one loaded redis, a clone per test worker) run
 * in this process through the API.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { redisCli, startRedisClones, type RedisClones } from '../examples/vitest-redis/redis-clones.js';
import { fixture, root, Sandbox, TEST_PORTS, waitFor } from './helpers.js';

/** This file's scratch directory: made before its first test, not at
 * collection (a file whose tests a -t run filters out would leave it
 * behind: no hook runs then). */
let work = '';
const sb = new Sandbox();

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), 'appshot-api-'));
});

afterAll(async () => {
  // An `npm install -g` still running (its test filtered out, or failed
  // before it waited) writes under `work`.
  globalInstall?.kill();
  await globalInstall?.done;
  // The type-check started once the package was installed (its test
  // filtered out, or failed before it waited).
  typeCheck?.kill();
  await typeCheck?.done;
  await sb.dispose();
  if (work) rmSync(work, { recursive: true, force: true });
});

function sh(command: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; timeout?: number }) {
  const r = spawnSync(command, args, { encoding: 'utf8', env: opts.env ?? process.env, cwd: opts.cwd, timeout: opts.timeout ?? 50_000 });
  return { code: r.status, stdout: r.stdout ?? '', stderr: (r.stderr ?? '') + (r.error ? String(r.error) : '') };
}

/** Runs a command to its end without blocking this process: a worker
 * blocked in spawnSync for a minute (npm install builds the native parts)
 * misses vitest's RPC calls, which time out after 60 s. A command still
 * running after `timeout` ms is killed (SIGKILL) and reported as such. */
function shAsync(
  command: string,
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv = process.env,
  timeout = 170_000,
): Promise<ShResult> {
  return startSh(command, args, cwd, env, timeout).done;
}

type ShResult = { code: number | null; stdout: string; stderr: string; output: string };

/** shAsync(), with the child: a command started ahead of the test that
 * waits for it, which the file's afterAll ends if it still runs. */
function startSh(command: string, args: string[], cwd: string, env: NodeJS.ProcessEnv, timeout: number): { child: ChildProcess; done: Promise<ShResult>; kill: () => void } {
  // A group of its own: a kill ends what it started too (npm's node-gyp
  // and make, tsc), not npm alone.
  const child = spawn(command, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  // Once it has ended (its output closed: what it started that held it,
  // too), its PID may be another's group leader's: no kill then.
  let ended = false;
  const kill = () => {
    if (ended) return;
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      /* gone */
    }
  };
  const done = new Promise<ShResult>((resolve) => {
    let stdout = '';
    let stderr = '';
    let output = '';
    child.stdout.on('data', (d) => ((stdout += d), (output += d)));
    child.stderr.on('data', (d) => ((stderr += d), (output += d)));
    const timer = setTimeout(() => {
      stderr += `\n(killed after ${timeout} ms)`;
      output += `\n(killed after ${timeout} ms)`;
      kill();
    }, timeout);
    child.on('error', (e) => ((stderr += String(e)), (output += String(e))));
    child.on('close', (code) => {
      ended = true;
      clearTimeout(timer);
      resolve({ code, stdout, stderr, output });
    });
  });
  return { child, done, kill };
}

/** The environment of an `npm install` that builds the native parts:
 * node-gyp's make given a job per core (JOBS, node-gyp's own setting, as
 * a CI user sets it), not one, so that a build waits less for a core the
 * other test worker leaves idle. What is built is the same. */
const installEnv = (): NodeJS.ProcessEnv => ({ ...process.env, JOBS: 'max' });

/** The type-check of a TypeScript user of the API against the installed
 * declarations (tsc in the project the package was installed into),
 * started by the tarball's beforeAll as soon as the package is installed
 * and waited for by its test, the last of that block: it runs beside the
 * CLI's and the API's tests (which wait on applications most of the
 * time), not before them (~20 s of tsc at load 9). What it checks is the
 * same. */
let typeCheck: ReturnType<typeof startSh> | undefined;
function startTypeCheck(project: string): ReturnType<typeof startSh> {
  writeFileSync(
    join(project, 'check.ts'),
    `import { run, clone, ps, restore, AppshotError, RestoredWithError, ClonedWithError, SnapshottedWithError, type ApplicationInfo, type RunResult, type Clone, type Restored } from 'appshot';\n` +
      `const started: Promise<RunResult> = run(['redis-server'], { aid: 'db' });\n` +
      `const clones: Promise<Clone[]> = clone('db.template', { count: 2 });\n` +
      `const code: number = new AppshotError('x').exitCode;\n` +
      `// @ts-expect-error: count is a number\n` +
      `clone('db.template', { count: '2' });\n` +
      `const described: Promise<string[]> = ps(undefined, { all: true }).then((apps: ApplicationInfo[]) =>\n` +
      `  apps.map((a) => (a.state === 'snapshotted' ? a.image : a.state === 'exited' ? String(a.exitCode) : a.state)));\n` +
      `// @ts-expect-error: only an exited application has an exit code\n` +
      `ps().then((apps) => apps.map((a) => a.state === 'snapshotted' && a.exitCode));\n` +
      `// A failure after a commit says what stands, typed.\n` +
      `const kept: Promise<string> = restore('db.appshot').then((r: Restored) => r.aid, (e: unknown) => {\n` +
      `  if (e instanceof RestoredWithError) return e.restored.aid + e.exitCode;\n` +
      `  if (e instanceof ClonedWithError) return e.cloned.map((c: Clone) => c.aid).join(' ');\n` +
      `  if (e instanceof SnapshottedWithError) return e.image + e.imageId;\n` +
      `  throw e;\n` +
      `});\n` +
      `// @ts-expect-error: only a RestoredWithError carries what was restored\n` +
      `new AppshotError('x').restored;\n` +
      `export { started, clones, code, described, kept };\n`,
  );
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  return startSh(process.execPath, [tsc, '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--types', 'node', '--typeRoots', join(root, 'node_modules', '@types'), 'check.ts'], project, process.env, 240_000);
}

let tarball = '';

/** A copy of this checkout as git has it (tracked files and those not yet
 * added, none it ignores): no node_modules, dist or build. */
function copyCleanCheckout(dest: string): void {
  const listed = spawnSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: root, encoding: 'utf8' });
  expect(listed.status, listed.stderr).toBe(0);
  // node_modules as a symbolic link (a worktree sharing another's) is no
  // directory, so .gitignore's `node_modules/` does not match it: git lists
  // it as not yet added. Never part of a clean checkout.
  const files = listed.stdout.split('\0').filter((f) => f && f.split('/')[0] !== 'node_modules' && existsSync(join(root, f)));
  for (const f of files) cpSync(join(root, f), join(dest, f));
}

/** `npm install -g` of a clean checkout (tested below): started by the
 * tarball's beforeAll, so that it runs while that one packs and installs
 * (each waits on npm's cache and the disk a good part of the time), not
 * after; the test waits for it. */
let globalInstall: (ReturnType<typeof startSh> & { checkout: string; prefix: string }) | undefined;
function startGlobalInstall(): NonNullable<typeof globalInstall> {
  if (globalInstall) return globalInstall;
  // A checkout as git has it: no node_modules, dist or build. npm links a
  // checkout without installing its dependencies; prepare installs them.
  const checkout = join(work, 'checkout');
  copyCleanCheckout(checkout);
  expect(existsSync(join(checkout, 'node_modules'))).toBe(false);
  // Into a prefix of its own, not the machine's global one. The checkout
  // (whose prepare step installs, compiles and builds): the tarball's
  // install, its native build included, is the project's above, and a
  // global one differs only in where npm puts it (another native build:
  // ~40 s of CPU of the suite's time).
  const prefix = join(work, 'global');
  // --prefer-offline as the tarball's (the checkout's prepare step
  // installs its dependencies with npm's settings, this one too). Its
  // bound is on a hung install, beside the tarball's, not on a slow one:
  // 400 s was passed at load 22 (npm install of the dev dependencies,
  // tsc and node-gyp in turn).
  const install = startSh('npm', ['install', '-g', '--prefix', prefix, '--no-audit', '--no-fund', '--prefer-offline', checkout], work, installEnv(), 900_000);
  globalInstall = { ...install, checkout, prefix };
  return globalInstall;
}

describe('the package installed from its tarball', () => {
  let project = '';
  let installed = '';
  let bin = '';
  const appshot = (args: string[]) => sh(bin, args, { cwd: project, env: sb.env });

  beforeAll(async () => {
    project = join(work, 'project');
    installed = join(project, 'node_modules', 'appshot');
    bin = join(project, 'node_modules', '.bin', 'appshot');
    startGlobalInstall();
    // Packed from a copy of the checkout as git has it, without dist/: npm
    // pack must build what the package runs (prepare). Its node_modules are
    // this checkout's, linked: compiling needs them, packing leaves them
    // out. (Not packed here: recompiling dist/ would rewrite files that
    // the tests running meanwhile load.)
    const packed = join(work, 'packed');
    copyCleanCheckout(packed);
    expect(existsSync(join(packed, 'dist'))).toBe(false);
    symlinkSync(join(root, 'node_modules'), join(packed, 'node_modules'));
    const pack = await shAsync('npm', ['pack', '--silent', '--pack-destination', work], packed, process.env, 400_000);
    expect(pack.code, pack.stderr).toBe(0);
    tarball = join(work, pack.stdout.trim().split('\n').pop()!);
    mkdirSync(project);
    // Its install scripts (the native build) approved as a user's project
    // approves them: npm 11 runs unapproved ones with a warning, and says a
    // later npm will not. A tarball is named by its absolute file: spec.
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'ci-project', private: true, type: 'module', allowScripts: { [`file:${tarball}`]: true } }));
    // From the registry, as a user's CI would; node-gyp builds the native
    // parts at install. --prefer-offline: packages npm's cache holds (the
    // suite's own `npm ci` put them there) are taken without asking the
    // registry whether each is still current, as a CI with a cache does:
    // seconds of round trips per install.
    const install = await shAsync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball], project, installEnv(), 600_000);
    expect(install.code, install.output).toBe(0);
    typeCheck = startTypeCheck(project);
    // npm pack (tsc) and npm install (a native build) take minutes on a
    // loaded machine: the hook's own limit, above the commands' own. Those
    // bound a hung npm, not a slow one (230 s killed the install at load
    // 13, 300 s at load 22).
  }, 1_100_000);

  it('was packed with every module bin/appshot loads, and their packages among its dependencies', () => {
    const unpacked = join(work, 'unpacked');
    mkdirSync(unpacked);
    const tar = sh('tar', ['-xzf', tarball, '-C', unpacked], { cwd: work });
    expect(tar.code, tar.stderr).toBe(0);
    const pkg = join(unpacked, 'package');
    const { dependencies } = JSON.parse(readFileSync(join(pkg, 'package.json'), 'utf8')) as { dependencies: Record<string, string> };
    // From the command's script, each module it imports, statically or
    // not, and each of theirs (a line that starts with import or export:
    // not the examples in doc comments).
    const seen = new Set<string>();
    const todo = ['bin/appshot.js'];
    const packages = new Set<string>();
    while (todo.length) {
      const file = todo.pop()!;
      if (seen.has(file)) continue;
      seen.add(file);
      expect(existsSync(join(pkg, file)), `${file} (imported by the command) is in the tarball`).toBe(true);
      const text = readFileSync(join(pkg, file), 'utf8');
      const specifiers = [...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s*'([^']+)'|^\s*import\s*'([^']+)'|\bimport\('([^']+)'\)/gm)].map((m) => m[1] ?? m[2] ?? m[3]);
      for (const spec of specifiers) {
        if (spec.startsWith('.')) todo.push(join(dirname(file), spec));
        else if (!spec.startsWith('node:')) packages.add(spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0]);
      }
    }
    expect(seen.has('dist/cli.js') && seen.has('proto/generated/image-proto.js'), [...seen].join(' ')).toBe(true);
    for (const name of packages) expect(Object.keys(dependencies), `${name} is a dependency, installed with the package`).toContain(name);
    // What the shell script runs: the client, built at install from the
    // sources binding.gyp names.
    expect(readFileSync(join(pkg, 'bin', 'appshot'), 'utf8')).toContain('build/Release/appshot-client');
    expect(existsSync(join(pkg, 'addon', 'client', 'appshot_client.c'))).toBe(true);
  });

  it('holds the compiled API with its types and the native parts built at install, and no tests', () => {
    for (const f of ['dist/api.js', 'dist/api.d.ts', 'dist/cli.js', 'bin/appshot.js', 'build/Release/appshot.node', 'build/Release/appshot_preload.so', 'build/Release/appshot-init'])
      expect(existsSync(join(installed, f)), f).toBe(true);
    expect(existsSync(join(installed, 'test'))).toBe(false);
    // What its READMEs link to is there (docs/json.md, the example).
    for (const readme of ['README.md', 'templates/README.md']) {
      const links = [...readFileSync(join(installed, readme), 'utf8').matchAll(/\]\(([^)#:]+)\)/g)].map((m) => join(dirname(readme), m[1]));
      expect(links.length, readme).toBeGreaterThan(0);
      for (const link of links) expect(existsSync(join(installed, link)), `${readme} links to ${link}`).toBe(true);
    }
  });

  it('runs, lists, snapshots and restores with its CLI, with its own preload library', async () => {
    const run = appshot(['run', '-d', '--json', '--aid', 'cli-tick', '--', fixture('ticker')]);
    expect(run.code, run.stderr).toBe(0);
    const { pid } = JSON.parse(run.stdout) as { aid: string; vpid: number; pid: number };
    // The application was started with the installed package's preload
    // library, found from where the package is, not from this checkout.
    // (Once the dynamic loader has mapped its libraries: `run -d` may
    // answer while it still runs, and a loaded machine shows it so.)
    const maps = () => readFileSync(`/proc/${pid}/maps`, 'utf8');
    await waitFor(() => /\/libc\.so/.test(maps()), 10_000, 'the loader to map the libraries');
    expect(maps()).toContain(join(installed, 'build', 'Release', 'appshot_preload.so'));
    const ps = JSON.parse(appshot(['ps', 'cli-tick', '--json']).stdout) as { processes: { vpid: number }[] }[];
    expect(ps[0].processes.map((p) => p.vpid)).toEqual([1, 2]);

    const image = join(work, 'cli-tick.appshot');
    const snap = appshot(['snapshot', 'cli-tick', '-o', image]);
    expect(snap.code, snap.stderr).toBe(0);
    const restore = appshot(['restore', image, '--json']);
    expect(restore.code, restore.stderr).toBe(0);
    expect(JSON.parse(restore.stdout)).toMatchObject({ aid: 'cli-tick', processes: 1 });
    // The ticker goes on ticking: new lines in its log after the restore.
    const log = join(sb.home, 'apps', 'cli-tick', 'log');
    const ticksNow = () => (existsSync(log) ? readFileSync(log, 'utf8').match(/TICKS/g)?.length ?? 0 : 0);
    const before = ticksNow();
    await waitFor(() => ticksNow() > before + 1, 10_000, 'the restored ticker to tick');
    expect(appshot(['stop', 'cli-tick', '-s', 'KILL']).code).toBe(0);
    await waitFor(() => !sb.aids().includes('cli-tick'), 10_000, 'cli-tick to end');
  });

  it("runs, snapshots, restores, clones and stops with its API, import('appshot') from a script", async () => {
    writeFileSync(
      join(project, 'ci.mjs'),
      `import { run, ps, snapshot, restore, templateCreate, clone, stop, wait, rm, prune, AppshotError } from 'appshot';
const [ticker, out] = process.argv.slice(2);
const report = {};
report.run = await run([ticker], { aid: 'api-tick' });
report.ps = (await ps('api-tick'))[0].processes.map((p) => p.vpid);
report.snapshot = await snapshot('api-tick', { output: out + '/api-tick.appshot' });
report.restore = await restore(report.snapshot.image, { aid: 'api-tick-2' });
report.template = await templateCreate(report.snapshot.image, out + '/api-tick.template');
report.clones = await clone(report.template.template, { aid: 'api-clone', count: 2 });
report.running = (await ps()).map((a) => a.aid).sort();
for (const aid of ['api-tick-2', 'api-clone-1', 'api-clone-2']) await stop(aid, { signal: 'KILL' });
await run(['/bin/sh', '-c', 'exit 3'], { aid: 'api-exit' });
report.waited = await wait('api-exit');
await rm('api-exit');
report.pruned = await prune();
report.left = (await ps(undefined, { all: true })).map((a) => a.aid).filter((aid) => aid.startsWith('api-'));
try {
  await stop('no-such-app');
} catch (e) {
  report.error = { isAppshotError: e instanceof AppshotError, exitCode: e.exitCode, message: e.message };
}
console.log(JSON.stringify(report));
`,
    );
    const r = await shAsync(process.execPath, ['ci.mjs', fixture('ticker'), work], project, sb.env, 110_000);
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.run).toMatchObject({ aid: 'api-tick', vpid: 2, pid: expect.any(Number), log: expect.stringContaining('api-tick') });
    expect(report.ps).toEqual([1, 2]);
    expect(report.snapshot).toMatchObject({ aid: 'api-tick', processes: 1, leftRunning: false });
    expect(report.restore).toMatchObject({ aid: 'api-tick-2', processes: 1 });
    expect(report.restore.createdDirs).toBeUndefined();
    expect(report.clones.map((c: { aid: string }) => c.aid)).toEqual(['api-clone-1', 'api-clone-2']);
    expect(report.running).toEqual(['api-clone-1', 'api-clone-2', 'api-tick-2']);
    // The lifecycle's calls from the package too: an ended app's exit
    // code, its removal, and prune of the snapshotted one and the stopped.
    expect(report.waited).toBe(3);
    expect(report.pruned).toEqual(expect.arrayContaining(['api-tick', 'api-tick-2', 'api-clone-1', 'api-clone-2']));
    expect(report.pruned).not.toContain('api-exit');
    expect(report.left).toEqual([]);
    expect(report.error).toEqual({ isAppshotError: true, exitCode: 3, message: "no application with AID 'no-such-app'" });
  }, 120_000);
  // Started by the beforeAll once the package was installed (startTypeCheck).
  it('type-checks a TypeScript user of the API against the installed declarations', async () => {
    expect(typeCheck, 'started by the beforeAll').toBeDefined();
    const r = await typeCheck!.done;
    expect(r.code, r.output).toBe(0);
  }, 120_000);
});

describe("ps({ all: true }): the records `appshot ps -a` shows, typed by state", () => {
  // A registry of its own: the package's tests above leave ended
  // applications in the file's.
  const own = new Sandbox();
  afterAll(() => own.dispose());

  it('lists the ended and the snapshotted applications as the CLI does, a snapshotted one with its image', async () => {
    const api = await import('../src/api.js');
    const home = own.home;
    await api.run([fixture('ticker')], { home, aid: 'ps-snap' });
    const image = join(work, 'ps-snap.appshot');
    await api.snapshot('ps-snap', { home, output: image });
    await api.run(['/bin/sh', '-c', 'exit 3'], { home, aid: 'ps-exit' });
    expect(await api.wait('ps-exit', { home })).toBe(3);
    await api.run([fixture('ticker')], { home, aid: 'ps-live' });
    // The snapshot's registration goes once its processes are gone; its
    // record is listed from then on.
    await waitFor(() => !own.allAids().includes('ps-snap'), 10_000, "the snapshotted application's registration to go");

    const listed = await api.ps(undefined, { home, all: true });
    expect(listed.map((a) => [a.aid, a.state])).toEqual([
      ['ps-exit', 'exited'],
      ['ps-live', 'running'],
      ['ps-snap', 'snapshotted'],
    ]);
    const [exited, live, snapped] = listed;
    expect(snapped).toMatchObject({ state: 'snapshotted', image, snapshottedAt: expect.any(String), command: [fixture('ticker')], processes: [], ports: [] });
    expect(exited).toMatchObject({ state: 'exited', exitCode: 3, endedAt: expect.any(String), processes: [] });
    expect(live.processes.map((p) => p.vpid)).toEqual([1, 2]);
    // Field for field what `ps -a --json` prints, but for its schema (the
    // running one's process states change from one look to the next).
    const cli = own.json<({ schema: string } & Record<string, unknown>)[]>(['ps', '-a']);
    expect(cli.map((a) => a.aid)).toEqual(listed.map((a) => a.aid));
    for (const i of [0, 2]) {
      const { schema, ...record } = cli[i];
      expect(schema).toBe('appshot.ps/1');
      expect(listed[i]).toEqual(record);
    }
    // One by AID, as `ps -a AID`; without all, the running ones only.
    expect(await api.ps('ps-snap', { home, all: true })).toEqual([snapped]);
    expect((await api.ps(undefined, { home })).map((a) => a.aid)).toEqual(['ps-live']);
    await expect(api.ps('ps-snap', { home })).rejects.toMatchObject({ exitCode: 1 });

    // rm takes the snapshotted record, as prune would.
    await api.rm('ps-snap', { home });
    await api.rm('ps-live', { home, force: true });
    await api.rm('ps-exit', { home });
    expect(await api.ps(undefined, { home, all: true })).toEqual([]);
    expect(existsSync(image), 'rm leaves the image').toBe(true);
  });
});

describe('stop({ timeoutMs }): milliseconds, as every other call takes its time', () => {
  const own = new Sandbox();
  afterAll(() => own.dispose());

  it('waits timeoutMs before SIGKILL; the seconds of the old `timeout` still work; both, or a bad value, are refused', async () => {
    const api = await import('../src/api.js');
    const home = own.home;
    // A shell that outlives SIGTERM, saying when it got one.
    const deaf = ['/bin/sh', '-c', 'trap "echo TERM" TERM; echo up; while :; do sleep 0.1; done'];
    const log = (aid: string) => own.log(aid);
    await api.run(deaf, { home, aid: 'deaf' });
    await waitFor(() => log('deaf').includes('up'), 10_000, 'the shell to start');
    // Refused before anything is sent: the shell says nothing of a TERM.
    await expect(api.stop('deaf', { home, timeoutMs: -1 })).rejects.toMatchObject({ exitCode: 2, message: 'timeoutMs -1: expected a number of milliseconds' });
    await expect(api.stop('deaf', { home, timeoutMs: 5, timeout: 1 })).rejects.toMatchObject({ exitCode: 2 });
    expect(log('deaf')).not.toContain('TERM');
    expect((await api.ps('deaf', { home }))[0].state).toBe('running');

    // SIGTERM changes nothing: SIGKILL ends it.
    await api.stop('deaf', { home, timeoutMs: 50 });
    expect((await api.ps('deaf', { home, all: true }))[0]).toMatchObject({ state: 'exited', exitCode: 137 });

    // timeoutMs: 0 is SIGKILL at once, not a default wait nor none.
    await api.run(deaf, { home, aid: 'deaf-0' });
    await waitFor(() => log('deaf-0').includes('up'), 10_000, 'the shell to start');
    await api.stop('deaf-0', { home, timeoutMs: 0 });
    expect((await api.ps('deaf-0', { home, all: true }))[0]).toMatchObject({ state: 'exited', exitCode: 137 });

    // A shell that ends by SIGTERM a second after it comes: a long wait
    // lets it (143); one cut a thousandfold short (timeoutMs read as
    // microseconds, `timeout` as milliseconds) kills it first (137).
    const slow = ['/bin/sh', '-c', 'trap "trap - TERM; echo TERM; sleep 1; kill -TERM $$" TERM; echo up; while :; do sleep 0.1; done'];
    // The two stopped at once: each waits the shell's second.
    const slows = [['slow', { timeoutMs: 30_000 }], ['slow-old', { timeout: 30 }]] as const;
    for (const [aid] of slows) await api.run(slow, { home, aid });
    for (const [aid] of slows) await waitFor(() => log(aid).includes('up'), 10_000, 'the shell to start');
    await Promise.all(slows.map(([aid, wait]) => api.stop(aid, { home, ...wait })));
    for (const [aid] of slows) {
      expect((await api.ps(aid, { home, all: true }))[0], aid).toMatchObject({ state: 'exited', exitCode: 143 });
      expect(log(aid)).toContain('TERM');
    }

    // The deprecated name, in seconds.
    await api.run(deaf, { home, aid: 'deaf-old' });
    await waitFor(() => log('deaf-old').includes('up'), 10_000, 'the shell to start');
    await api.stop('deaf-old', { home, timeout: 0.05 });
    expect((await api.ps('deaf-old', { home, all: true }))[0]).toMatchObject({ state: 'exited', exitCode: 137 });
    for (const aid of ['deaf', 'deaf-old', 'deaf-0', 'slow', 'slow-old']) await api.rm(aid, { home });
  });
});

describe('npm install -g', () => {
  it('installs a working appshot command from a clean checkout', async () => {
    const { checkout, prefix, done } = startGlobalInstall();
    const { code, output } = await done;
    expect(code, `npm install -g ${checkout}:\n${output}`).toBe(0);
    const version = sh(join(prefix, 'bin', 'appshot'), ['--version'], { cwd: work });
    expect(version.stdout.trim(), version.stderr).toBe('0.1.0');
    // A command that needs all three native parts (addon, init, preload
    // library), built at install and found from where they were: npm links
    // a checkout, so in the checkout.
    const env = { ...process.env, CI: '', APPSHOT_HOME: join(prefix, 'appshot-home') };
    const run = sh(join(prefix, 'bin', 'appshot'), ['run', '--', '/bin/sh', '-c', 'echo "$APPSHOT_AID $LD_PRELOAD"'], { cwd: work, env });
    expect(run.code, run.stderr).toBe(0);
    const [aid, preload] = run.stdout.trim().split(' ');
    expect(aid).toMatch(/^[\w.-]+$/);
    expect(preload).toBe(join(checkout, 'build', 'Release', 'appshot_preload.so'));
    // Run alone (-t), the install starts here: its own bound, and more.
  }, 960_000);
});

describe('examples/vitest-redis: a loaded redis, one clone per test worker', () => {
  const REDIS = '/usr/bin/redis-server';
  const KEYS = 2000;
  let redis: RedisClones | undefined;

  afterAll(async () => {
    await redis?.stop();
  });

  it('gives 3 workers each a clone with the loaded data on a port of its own, writes kept apart', async () => {
    expect(existsSync(REDIS), `${REDIS} is missing: bash test/prerequisites.sh`).toBe(true);
    // Clones' ports from the tests' range (see helpers.ts); the template
    // redis on a fixed port of this file's own.
    process.env.APPSHOT_PORTS = TEST_PORTS;
    const dir = mkdtempSync(join(work, 'redis-'));
    // Everything the calls keep is in the `home` they are given (the
    // example's dir/appshot), its signing key too, not in $APPSHOT_HOME.
    const envKeys = join(process.env.APPSHOT_HOME!, 'keys');
    const envKeysBefore = existsSync(envKeys);
    redis = await startRedisClones({
      count: 3,
      dir,
      port: 16000 + (process.pid % 800), // its range: see the map in helpers.ts
      redisServer: REDIS,
      load: Array.from({ length: KEYS }, (_, i) => `SET user:${i} name-${i}`),
    });
    const ports = redis.clones.map((c) => c.port);
    expect(new Set(ports).size).toBe(3);
    expect(existsSync(join(dir, 'appshot', 'keys', 'self.key'))).toBe(true);
    if (!envKeysBefore) expect(existsSync(envKeys)).toBe(false);

    for (const c of redis.clones) {
      expect(redisCli(c.port, ['DBSIZE', 'GET user:0', `GET user:${KEYS - 1}`])).toEqual([String(KEYS), 'name-0', `name-${KEYS - 1}`]);
      expect(redisCli(c.port, [`SET user:7 ${c.aid}`, `SET only:${c.aid} 1`])).toEqual(['OK', 'OK']);
    }
    for (const c of redis.clones) {
      const others = redis.clones.filter((o) => o !== c).map((o) => `EXISTS only:${o.aid}`);
      expect(redisCli(c.port, ['GET user:7', 'DBSIZE', ...others])).toEqual([c.aid, String(KEYS + 1), '0', '0']);
    }

    await redis.stop();
    redis = undefined;
    // stop() resolved once the registry was empty: no clone is left.
    expect(readdirSync(join(dir, 'appshot', 'apps')).filter((a) => !a.startsWith('.'))).toEqual([]);
  });

  it("runs as its README says: the example's own vitest, its globalSetup and test files", async () => {
    // A copy of the example with appshot (this checkout) and vitest where
    // its `npm install` would put them.
    const ex = mkdtempSync(join(work, 'example-'));
    cpSync(join(root, 'examples', 'vitest-redis'), ex, { recursive: true });
    mkdirSync(join(ex, 'node_modules'));
    symlinkSync(root, join(ex, 'node_modules', 'appshot'));
    symlinkSync(join(root, 'node_modules', 'vitest'), join(ex, 'node_modules', 'vitest'));
    const r = await shAsync(process.execPath, [join(ex, 'node_modules', 'vitest', 'vitest.mjs'), 'run'], ex, { ...process.env, APPSHOT_PORTS: TEST_PORTS, CI: 'true', FORCE_COLOR: '0', NO_COLOR: '1' }, 110_000);
    expect(r.code, r.output).toBe(0);
    // Its three tests in two files, over three workers each with a clone.
    expect(r.output).toMatch(/Test Files\s+2 passed \(2\)/);
    expect(r.output).toMatch(/Tests\s+3 passed \(3\)/);
  }, 120_000);
});

describe('npm install on a machine without a compiler', () => {
  it('stops before node-gyp with one line naming what to install', async () => {
    // The package's install step, as npm runs it, in a copy of what it
    // needs (node-gyp, if it ran, would rebuild the copy's build/, not
    // this checkout's), with a PATH that has node, sh (npm runs scripts
    // with it), make and python3 but no compiler: a bare Debian machine
    // with Node.
    const pkg = mkdtempSync(join(work, 'nocc-'));
    for (const f of ['package.json', 'binding.gyp', 'scripts']) cpSync(join(root, f), join(pkg, f), { recursive: true });
    const bin = join(pkg, 'path');
    mkdirSync(bin);
    const which = (p: string) => sh('/bin/sh', ['-c', `command -v ${p}`], { cwd: pkg }).stdout.trim();
    symlinkSync(process.execPath, join(bin, 'node'));
    for (const p of ['sh', 'make']) symlinkSync(which(p), join(bin, p));
    // The interpreter itself: a python3 on PATH may be a shim (pyenv) that
    // needs the PATH taken away here to find it, and the check runs it.
    const python3 = sh('python3', ['-c', 'import sys; print(sys.executable)'], { cwd: pkg }).stdout.trim();
    symlinkSync(python3, join(bin, 'python3'));
    // npm's own script (`npm` is a link to it), run by this node.
    const npmCli = realpathSync(which('npm'));
    const env = { ...process.env, PATH: bin, CC: '', CXX: '' };
    delete env.PYTHON;
    delete env.npm_config_python;
    // The install step below with the stripped PATH, and the check of
    // build-tools.js under each setting after it, all at once: each is a
    // Node of its own (with a python3 and a cc), independent of the others
    // (~2-4 s each at load 9, one after another before). What each proves
    // is said where its result is looked at.
    const machine = { ...process.env };
    for (const k of ['PYTHON', 'npm_config_python', 'NODE_GYP_FORCE_PYTHON', 'CC', 'CXX']) delete machine[k];
    const check = (env: NodeJS.ProcessEnv) => shAsync(process.execPath, [join(root, 'scripts', 'build-tools.js')], pkg, { ...machine, ...env }, 50_000);
    const launchers = join(pkg, 'launchers');
    mkdirSync(launchers);
    writeFileSync(join(launchers, 'ccache'), '#!/bin/sh\ncase "$1" in -*) echo "ccache: invalid option -- $1" >&2; exit 1;; esac\nexec "$@"\n', { mode: 0o755 });
    const gone = join(pkg, 'gone', 'python3');
    // The stripped PATH with g++ on it too (a directory of its own: the
    // install step's must have none).
    const withGxx = join(pkg, 'path-gxx');
    mkdirSync(withGxx);
    for (const name of readdirSync(bin)) symlinkSync(readlinkSync(join(bin, name)), join(withGxx, name));
    symlinkSync(which('g++'), join(withGxx, 'g++'));
    const [r, ok, launched, pythonGone, npmPythonGone, forced, clang] = await Promise.all([
      shAsync(process.execPath, [npmCli, 'run-script', '--silent', 'install'], pkg, env, 60_000),
      check({}),
      check({ PATH: `${launchers}:${process.env.PATH}`, CC: 'ccache gcc' }),
      check({ PYTHON: gone }),
      check({ npm_config_python: gone }),
      check({ NODE_GYP_FORCE_PYTHON: gone, PYTHON: python3 }),
      check({ PATH: withGxx, CC: 'clang' }),
    ]);
    expect(r.code, r.output).not.toBe(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.output).toEqual(['appshot: building the native addon needs g++, make and python3 (not found: g++, cc): apt-get install -y g++ make python3']);
    expect(existsSync(join(pkg, 'build')), 'node-gyp did not start').toBe(false);

    // With the machine's PATH, the check says nothing and lets node-gyp go.
    expect(ok, ok.stderr).toMatchObject({ code: 0, stderr: '' });

    // A compiler launcher in CC runs the compiler it is given, and takes an
    // option before it as its own (ccache: "invalid option"): the check
    // asks `ccache gcc`, not `ccache`, where libc.a is.
    expect(launched, launched.stderr).toMatchObject({ code: 0, stderr: '' });

    // node-gyp passes over a Python setting that names nothing (python3
    // and python are next), but NODE_GYP_FORCE_PYTHON is the only one it
    // tries.
    for (const [env, r] of [[{ PYTHON: gone }, pythonGone], [{ npm_config_python: gone }, npmPythonGone]] as const)
      expect(r, `${JSON.stringify(env)}: ${r.stderr}`).toMatchObject({ code: 0, stderr: '' });
    expect(forced.code).toBe(1);
    expect(forced.stderr).toBe(`appshot: NODE_GYP_FORCE_PYTHON=${gone} not found: install it or unset NODE_GYP_FORCE_PYTHON\n`);

    // A compiler named in CC that is not there is the user's to install or
    // unset; Debian's g++ package would not bring it. (g++ on the stripped
    // PATH, no clang.)
    expect(clang.code).toBe(1);
    expect(clang.stderr).toBe('appshot: CC=clang not found: install it or unset CC\n');
  }, 120_000);
});
