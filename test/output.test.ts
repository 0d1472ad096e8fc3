/**
 * What the long commands show as they work, and what scripts read: the
 * snapshot of a 1 GiB application seen on a pseudo-terminal (a bar moving
 * in bytes), as plain lines under CI, and nothing with --progress=none;
 * Ctrl-C's one line; a schema in every command's --json; completion
 * scripts that know every command.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cli, fixture, root, Sandbox, spawnAsync, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-output-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

/** snapfix with `mib` MiB of touched heap, detached, once it has checked
 * itself. */
async function bigApp(aid: string, mib: number): Promise<void> {
  const r = sb.run(['run', '-d', '--aid', aid, '--', fixture('snapfix'), '-1', String(mib)]);
  expect(r.code, r.stderr).toBe(0);
  await sb.checksPass(aid, 2);
}

/** "X/Y MiB" of each progress frame or line, in order. */
function amounts(text: string): { done: number; total: number; rate: number }[] {
  return [...text.matchAll(/(\d+\.\d)\/(\d+\.\d) MiB, (\d+) MiB\/s/g)].map((m) => ({ done: Number(m[1]), total: Number(m[2]), rate: Number(m[3]) }));
}

const hasScript = spawnSync('script', ['--version']).status === 0;

describe('progress', () => {
  it.skipIf(!hasScript)('on a terminal: a bar that moves in bytes while a 1 GiB application is snapshotted', async () => {
    await bigApp('tty', 1024);
    const image = join(out, 'tty.appshot');
    // script(1) gives the command a pseudo-terminal, as a person has.
    const command = [process.execPath, cli, 'snapshot', 'tty', '-o', image].map((a) => `'${a}'`).join(' ');
    const r = await spawnAsync('script', ['-q', '-e', '-c', command, '/dev/null'], { env: { ...sb.env, CI: '' }, timeout: 120_000 });
    expect(r.status, r.stdout).toBe(0);
    expect(existsSync(image)).toBe(true);
    // Frames are redrawn in place (cursor to column 1), each with a bar.
    const frames = r.stdout.split('\x1b[1G').filter((f) => f.includes('appshot: snapshot tty ['));
    expect(frames.length).toBeGreaterThan(2);
    for (const f of frames) expect(f).toMatch(/\[[#.]{30}\] \d+\.\d\/\d+\.\d MiB, \d+ MiB\/s/);
    const seen = amounts(frames.join('\n'));
    // In bytes: about a GiB in all, and seen part-way, never going back.
    expect(seen.at(-1)!.total).toBeGreaterThan(1000);
    expect(seen.some((a) => a.done > 0 && a.done < a.total)).toBe(true);
    for (let i = 1; i < seen.length; i++) expect(seen[i].done).toBeGreaterThanOrEqual(seen[i - 1].done);
    const filled = frames.map((f) => (/\[([#.]{30})\]/.exec(f)![1].match(/#/g) ?? []).length);
    expect(Math.max(...filled)).toBeGreaterThan(Math.min(...filled));
    // The summary, on its own line after the bar is cleared.
    expect(r.stdout).toMatch(/appshot: 2 processes, \d+ threads, 10\d\d\.\d MiB/);
  }, 180_000);

  it('under CI, off a terminal: plain lines in MiB, the last at the total', async () => {
    // Plain lines come per tenth of the work (or per second): as many for
    // 64 MiB as for more, and each of the five commands below moves a
    // quarter of what 256 MiB cost.
    await bigApp('ci', 64);
    const r = await spawnAsync(process.execPath, [cli, 'snapshot', 'ci', '-o', join(out, 'ci.appshot')], { env: { ...sb.env, CI: '1' }, timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stderr.split('\n').filter((l) => l.startsWith('appshot: snapshot ci: '));
    expect(lines.length).toBeGreaterThan(1);
    for (const l of lines) expect(l).toMatch(/^appshot: snapshot ci: \d+\.\d\/\d+\.\d MiB, \d+ MiB\/s(, \d+ (s|min) left)?$/);
    expect(r.stderr).not.toContain('\x1b');
    const last = amounts(lines.at(-1)!)[0];
    expect(last.done).toBe(last.total);
    expect(last.total).toBeGreaterThan(60);

    // The restore counts the page data copied (format 3: each chunk is
    // checked on other threads just before it is copied, not counted twice;
    // --verify: written here, they would not be checked at all).
    const back = await spawnAsync(process.execPath, [cli, 'restore', '--verify', join(out, 'ci.appshot'), '--progress=plain'], { env: sb.env, timeout: 120_000 });
    expect(back.status, back.stderr).toBe(0);
    const restoreLines = back.stderr.split('\n').filter((l) => l.startsWith(`appshot: restore ${join(out, 'ci.appshot')}: `));
    const lastRestore = amounts(restoreLines.at(-1)!)[0];
    expect(lastRestore.done).toBe(lastRestore.total);
    expect(lastRestore.total).toBeGreaterThan(60);
    await sb.checksPass('ci', 2);

    // template create counts the snapshot's page data checked; clone, the
    // data each instance is given.
    const lastPlain = async (args: string[], label: string) => {
      const r = await spawnAsync(process.execPath, [cli, ...args, '--progress=plain'], { env: sb.env, timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      const lines = r.stderr.split('\n').filter((l) => l.startsWith(`appshot: ${label}: `));
      expect(lines.length, r.stderr).toBeGreaterThan(0);
      for (const l of lines) expect(l).toMatch(/: \d+\.\d\/\d+\.\d MiB, \d+ MiB\/s(, \d+ (s|min) left)?$/);
      return amounts(lines.at(-1)!)[0];
    };
    const template = join(out, 'ci.template');
    const made = await lastPlain(['template', 'create', join(out, 'ci.appshot'), '-o', template], `template ${template}`);
    expect(made.done).toBe(made.total);
    expect(made.total).toBeGreaterThan(60);
    // Its bytes may all come in one report: the rate is then the average
    // since the command began (64 MiB in under the test's 120 s: >= 1).
    expect(made.rate).toBeGreaterThan(0);
    const cloned = await lastPlain(['clone', template, '--aid', 'ci-copy', '--count', '2'], `clone ${template}`);
    expect(cloned.done).toBe(cloned.total);
    // Both instances' data: one is some 65 MiB.
    expect(cloned.total).toBeGreaterThan(120);
    expect(sb.run(['rm', '-f', 'ci-copy-1', 'ci-copy-2']).code).toBe(0);
  }, 180_000);

  it('--progress=none prints nothing but the result, CI or not; nor does the default off a terminal', async () => {
    await bigApp('quiet', 64);
    const none = spawnSync(process.execPath, [cli, 'snapshot', 'quiet', '-o', join(out, 'quiet1'), '--leave-running', '--progress=none'], { env: { ...sb.env, CI: 'true' }, encoding: 'utf8' });
    expect(none.status, none.stderr).toBe(0);
    expect(none.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^appshot: 2 processes/)]);
    const plainDefault = spawnSync(process.execPath, [cli, 'snapshot', 'quiet', '-o', join(out, 'quiet2'), '--full', '--progress', 'auto'], { env: { ...sb.env, CI: '' }, encoding: 'utf8' });
    expect(plainDefault.status, plainDefault.stderr).toBe(0);
    expect(plainDefault.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^appshot: 2 processes/)]);
    const bad = sb.run(['snapshot', 'nobody', '--progress', 'loud']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^appshot: .*--progress '[^']*': expected auto, bar, plain or none/);
  }, 60_000);

  it('Ctrl-C during a snapshot: one line, the application running as it was, no image', async () => {
    await bigApp('intr', 1024);
    const image = join(out, 'intr.appshot');
    const child = spawn(process.execPath, [cli, 'snapshot', 'intr', '-o', image, '--progress=plain'], { env: sb.env });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    // The first line comes once every thread is frozen and before a byte is written.
    await waitFor(() => stderr.includes('appshot: snapshot intr: '), 60_000, 'the first progress line');
    child.kill('SIGINT');
    expect(await exited).toBe(130);
    expect(stderr).toContain('appshot: interrupted: the application was left running, nothing written\n');
    expect(existsSync(image)).toBe(false);
    expect(sb.aids()).toContain('intr');
    await sb.checksPass('intr', 3);
  }, 120_000);
});

/** The field each deprecated one stands beside (docs/json.md): read that. */
const CONSISTENT: Record<string, string> = { command: 'argv', template: 'path', uptimeSeconds: 'uptimeMs', idleSeconds: 'idleTimeoutMs', since: 'startedAt' };

/** Where `value` (an output, or a part of one at `at`) breaks docs/json.md's
 * naming rules: a time not in milliseconds named …Ms, an instant not named
 * …At, an argv that is not an argument vector, a template that is not
 * {path, instance}, a command that is one (argv's meaning). A field that
 * breaks them passes only where `text` (the schema's section) marks it
 * *deprecated* and the consistent field is beside it. */
function namingFaults(value: unknown, text: string, at = ''): string[] {
  if (Array.isArray(value)) return value.flatMap((v, i) => namingFaults(v, text, `${at}[${i}]`));
  if (typeof value !== 'object' || value === null) return [];
  const o = value as Record<string, unknown>;
  const faults: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    const where = `${at}.${k}`;
    const broken = /(Seconds|Secs|Sec|Us|Ns)$/.test(k)
      ? 'a time not in milliseconds named …Ms'
      : typeof v === 'string' && /^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(v) && !k.endsWith('At')
        ? 'an instant not named …At'
        : k.endsWith('Ms') && (typeof v !== 'number' || Math.abs(Math.round(v * 1000) - v * 1000) > 1e-6)
          ? '…Ms that is not milliseconds to the microsecond'
          : k === 'argv' && !(Array.isArray(v) && v.every((a) => typeof a === 'string'))
            ? 'argv that is not an argument vector'
            : k === 'template' && !(typeof v === 'object' && v !== null && typeof (v as { path?: unknown }).path === 'string')
              ? 'template that is not {path, instance}'
              : k === 'command' && Array.isArray(v)
                ? 'command that is an argument vector (argv)'
                : undefined;
    if (broken) {
      const deprecated = new RegExp(`\\b${k}\\b[^\\n]*\\*deprecated\\*`).test(text);
      const beside = CONSISTENT[k] !== undefined && CONSISTENT[k] in o;
      if (!deprecated || !beside) faults.push(`${where}: ${broken}${deprecated ? `, with no consistent ${CONSISTENT[k] ?? 'field'} beside it` : ', not marked *deprecated*'}`);
    }
    faults.push(...namingFaults(v, text, where));
  }
  return faults;
}

describe('--json', () => {
  it('every command gives its schema', async () => {
    const schema = async (args: string[]) => {
      const v = await sb.jsonAsync<Json>(args);
      return Array.isArray(v) ? v.map((e) => e.schema) : [v.schema];
    };
    const run = await sb.runAsync(['run', '-d', '--json', '--aid', 'js', '--', fixture('ticker')]);
    expect(JSON.parse(run.stdout).schema).toBe('appshot.run/1');
    await waitFor(() => sb.log('js').length > 0, 30_000, 'ticker output');
    expect(await schema(['ps'])).toContain('appshot.ps/1');
    expect(new Set(await schema(['ps', 'js']))).toEqual(new Set(['appshot.ps/1']));
    const table = await sb.jsonAsync<Json>(['table', 'js']);
    expect(table.schema).toBe('appshot.table/1');
    expect(table.tables.pid.find((e: Json) => e.virtual === 1).flags).toEqual(['init']);
    const snap = await sb.jsonAsync<Json>(['snapshot', 'js', '-o', join(out, 'js.appshot')]);
    expect(snap.schema).toBe('appshot.snapshot/1');
    // Milliseconds to the microsecond.
    for (const t of [snap.frozenMs, snap.totalMs]) expect(Math.round(t * 1000)).toBeCloseTo(t * 1000, 6);
    const inspect = await sb.jsonAsync<Json>(['inspect', join(out, 'js.appshot')]);
    expect(inspect.schema).toBe('appshot.inspect/1');
    expect(typeof inspect.createdAt).toBe('string');
    expect(inspect.stats.frozenMs).toBeGreaterThan(0);
    expect(inspect.stats.frozenUs).toBeUndefined();
    expect(inspect.created).toBeUndefined();
    // Table entries' flags by name, as table --json gives them.
    expect(inspect.tables.find((t: Json) => t.kind === 'pid').entries.find((e: Json) => e.virtual === 1).flags).toEqual(['init']);
    expect(await schema(['template', 'create', join(out, 'js.appshot'), '-o', join(out, 'js.template')])).toEqual(['appshot.template-create/1']);
    expect(await schema(['template', 'show', join(out, 'js.template')])).toEqual(['appshot.template-show/1']);
    const clones = await sb.jsonAsync<Json[]>(['clone', join(out, 'js.template'), '--aid', 'jc', '--count', '2']);
    expect(clones.map((c) => c.schema)).toEqual(['appshot.clone/1', 'appshot.clone/1']);
    expect(clones[0].createdDirs).toBeUndefined();
    const restored = await sb.jsonAsync<Json>(['restore', join(out, 'js.appshot'), '--aid', 'js2']);
    expect(restored.schema).toBe('appshot.restore/1');
    for (const internal of ['createdDirs', 'lifeline', 'credentialCalls']) expect(restored[internal]).toBeUndefined();
    expect(await schema(['port', 'js2'])).toEqual([]); // no ports: an empty list
    expect(new Set(await schema(['key', 'ls']))).toEqual(new Set(['appshot.key-ls/1']));
    const images = await sb.jsonAsync<Json>(['images', out]);
    expect(images.schema).toBe('appshot.images/1');
    expect(images.images.find((i: Json) => i.path === join(out, 'js.appshot')).createdAt).toBeTruthy();
    expect(await schema(['version'])).toEqual(['appshot.version/1']);
    expect(await schema(['engine', 'status'])).toEqual(['appshot.engine-status/1']);
    expect(await sb.jsonAsync<Json[]>(['service', 'ls'])).toEqual([]);
    const check = await sb.runAsync(['check', '--json']);
    expect(JSON.parse(check.stdout).schema).toBe('appshot.check/1');
    expect((await sb.runAsync(['run', '--aid', 'jw', '--', 'true'])).code).toBe(0);
    expect(await schema(['wait', 'jw'])).toEqual(['appshot.wait/1']);
    expect((await sb.runAsync(['rm', 'jw'])).code).toBe(0);
  }, 120_000);

  it('has every field it prints named in docs/json.md, and the README quotes them as printed', async () => {
    const docs = readFileSync(join(root, 'docs', 'json.md'), 'utf8');
    /** The section of docs/json.md whose heading names `schema`. */
    const section = (schema: string) => {
      const at = docs.search(new RegExp(`^## .*\`${schema.replace(/[./]/g, '\\$&')}\``, 'm'));
      expect(at, `docs/json.md documents ${schema}`).toBeGreaterThan(0);
      return docs.slice(docs.lastIndexOf('\n## ', at), docs.indexOf('\n## ', at) >>> 0);
    };
    const undocumented = (value: Json) => {
      const first = Array.isArray(value) ? value[0] : value;
      const text = section(first.schema);
      const top = Object.keys(first).filter((k) => k !== 'schema' && !new RegExp(`\\b${k}\\b`).test(text));
      // An object field documented as {a, b, ...}: each of its keys listed
      // there ({KIND: ...}: a map, its keys not names).
      const nested = Object.entries(first).flatMap(([k, v]) => {
        const listed = new RegExp(`^\\| ${k} \\| \\{([^}|]*)\\}`, 'm').exec(text);
        if (!listed || /^[A-Z_]+:/.test(listed[1]) || !v || typeof v !== 'object' || Array.isArray(v)) return [];
        const names = listed[1].split(',').map((n) => n.split(':')[0].trim().replace(/\?$/, ''));
        return Object.keys(v).filter((n) => !names.includes(n)).map((n) => `${k}.${n}`);
      });
      return [...top, ...nested];
    };
    const d = mkdtempSync(join(out, 'docs-'));
    expect((await sb.runAsync(['run', '-d', '--aid', 'doc', '--', fixture('ticker')])).code).toBe(0);
    await waitFor(() => sb.log('doc').length > 0, 30_000, 'ticker output');
    expect((await sb.runAsync(['run', '--aid', 'doc-ended', '--', 'true'])).code).toBe(0);
    const outputs: Json[] = [
      await sb.jsonAsync(['ps', 'doc']),
      await sb.jsonAsync(['table', 'doc']),
      await sb.jsonAsync(['snapshot', 'doc', '-o', join(d, 'doc.appshot')]),
      await sb.jsonAsync(['restore', join(d, 'doc.appshot')]),
      await sb.jsonAsync(['template', 'create', join(d, 'doc.appshot'), '-o', join(d, 'doc.template')]),
      await sb.jsonAsync(['template', 'show', join(d, 'doc.template')]),
      await sb.jsonAsync(['clone', join(d, 'doc.template'), '--aid', 'doc-clone']),
      await sb.jsonAsync(['images', d]),
      await sb.jsonAsync(['version']),
      await sb.jsonAsync(['check']),
      // One runs (started by the snapshot, APPSHOT_ENGINE=auto, or now):
      // its status has every field.
      await sb.runAsync(['engine', 'start']).then(() => sb.jsonAsync(['engine', 'status'])),
      await sb.jsonAsync(['wait', 'doc-ended']),
    ];
    for (const o of outputs) expect(undocumented(o), (Array.isArray(o) ? o[0] : o).schema).toEqual([]);
    // And each follows the naming rules, or marks where it does not
    // (*deprecated*) and gives the consistent field beside it.
    expect(outputs[10]).toMatchObject({ running: true, uptimeMs: expect.any(Number), idleTimeoutMs: expect.any(Number) });
    for (const o of outputs) {
      const schema = (Array.isArray(o) ? o[0] : o).schema;
      expect(namingFaults(o, section(schema)), schema).toEqual([]);
    }
    // The rule checker itself: what it is to catch, it catches.
    expect(namingFaults({ template: '/t', path: '/t', waitSeconds: 1, since: '2026-01-01T00:00:00.000Z', argv: 'x', tookMs: 1.0001 }, '| template | string | *deprecated*')).toEqual([
      '.waitSeconds: a time not in milliseconds named …Ms, not marked *deprecated*',
      '.since: an instant not named …At, not marked *deprecated*',
      '.argv: argv that is not an argument vector, not marked *deprecated*',
      '.tookMs: …Ms that is not milliseconds to the microsecond, not marked *deprecated*',
    ]);
    expect(namingFaults({ template: '/t' }, '| template | string | *deprecated*')).toEqual(['.template: template that is not {path, instance}, with no consistent path beside it']);
    // The README's own quotes of images --json and check --json.
    const readme = readFileSync(join(root, 'README.md'), 'utf8').replace(/\s+/g, ' ');
    const quotes = [
      `images: [{${Object.keys(outputs[7].images[0]).join(', ')}, error?}]`,
      `features: [{${Object.keys(outputs[9].features[0]).join(', ')}}]`,
      `{schema: "appshot.version/1", ${Object.keys(outputs[8]).slice(1).join(', ').replace('kernel', 'kernel: {release, machine}')}}`,
    ];
    for (const quote of quotes) expect(readme.includes(quote), `the README quotes ${quote}`).toBe(true);
    for (const aid of ['doc', 'doc-clone', 'doc-ended']) expect((await sb.runAsync(['rm', '-f', aid])).code).toBe(0);
  }, 120_000);
});

describe('completion', () => {
  /** Every command and subcommand, as `--help` lists them. */
  async function commands(args: string[] = []): Promise<string[]> {
    const help = (await sb.runAsync([...args, '--help'])).stdout;
    const section = (help.split(/^Commands:$/m)[1] ?? '').split('\n\n')[0];
    return [...section.matchAll(/^ {2}(\S+)/gm)].map((m) => m[1].replace(/\|.*/, '')).filter((c) => c !== 'help');
  }
  /** Each command with its subcommands: asked once for the three shells
   * (a --help per command, some 25 CLI starts). */
  const listed = new Map<string, string[]>();
  beforeAll(async () => {
    for (const c of await commands()) listed.set(c, await commands([c]));
    // An AID for the completion to offer: an ended application's.
    sb.ok(['run', '--aid', 'complx', '--', 'true']);
  });
  afterAll(() => {
    sb.run(['rm', 'complx']);
  });
  /** The shells run `appshot` (the command as typed) for the AIDs. */
  const shellEnv = () => ({ ...sb.env, PATH: `${join(root, 'bin')}:${sb.env.PATH ?? ''}` });

  it.each(['bash', 'zsh', 'fish'])('the %s script names every command and subcommand, and their options', (shell) => {
    const r = sb.run(['completion', shell]);
    expect(r.code, r.stderr).toBe(0);
    expect([...listed.keys()]).toEqual(expect.arrayContaining(['run', 'snapshot', 'restore', 'template', 'clone', 'completion']));
    for (const [c, subs] of listed) {
      expect(r.stdout).toMatch(new RegExp(`[ '"]${c}[ '"]`));
      for (const sub of subs) expect(r.stdout).toContain(`${c} ${sub}`);
    }
    // fish names a long option without its dashes (-l progress).
    expect(r.stdout).toMatch(/--progress|-l progress\b/);
    expect(r.stdout).toMatch(/--leave-running|-l leave-running\b/);
  });

  /** What a completion offers for each command line, one entry per line:
   * the offers sorted, or null if it offered nothing. */
  const offers = (out: string) => out.split('\n').slice(0, -1).map((l) => (l.trim() ? l.trim().split(/\s+/).sort() : null));
  // The last line offers files (each shell words them its own way).
  // An option's value, the shells, and AIDs (`appshot ps -aq`) where a
  // command takes one, past an option's value and another AID.
  const lines = ['appshot templ', 'appshot template ', 'appshot snapshot --pro', 'appshot template create --na', 'appshot stop -', 'appshot restore -o x --js',
    'appshot snapshot --progress ', 'appshot completion ', 'appshot stop -t 5 compl', 'appshot rm complx compl', 'appshot restore /tm'];
  const expected = [['template'], ['create', 'show'], ['--progress'], ['--name'], ['--help', '--json', '--json-object', '--signal', '--time', '-s', '-t'], ['--json'],
    ['auto', 'bar', 'none', 'plain'], ['bash', 'fish', 'zsh'], ['complx'], ['complx'], [expect.stringMatching(/^\/?tmp\/?$/)]];

  it('bash, loaded as the README says, completes subcommands and a command\'s options', () => {
    const q = (w: string) => `'${w}'`;
    // As bash calls the function `complete -p` names: the words, the
    // cursor's word, and $1..$3 (command, current word, previous word).
    const calls = lines.map((line) => {
      const words = line.split(' ');
      return `COMP_LINE=${q(line)}; COMP_POINT=${line.length}; COMP_WORDS=(${words.map(q).join(' ')}); COMP_CWORD=${words.length - 1}; COMPREPLY=(); ` +
        `"$fn" appshot ${q(words.at(-1)!)} ${q(words.at(-2)!)}; echo "\${COMPREPLY[*]}"`;
    });
    const script = [`source <(${q(process.execPath)} ${q(cli)} completion bash)`, 'spec=$(complete -p appshot) || exit 3', 'echo "$spec"', 'fn=${spec#*-F }; fn=${fn%% *}', ...calls].join('\n');
    const r = spawnSync('bash', ['--norc', '--noprofile', '-c', script], { env: shellEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const [spec, ...rest] = r.stdout.split('\n');
    expect(spec).toBe('complete -o filenames -F _appshot appshot');
    expect(offers(rest.join('\n'))).toEqual(expected);
  });

  it('zsh, autoloaded from $fpath or sourced after compinit, completes subcommands and a command\'s options', () => {
    const script = join(out, '_appshot');
    const r0 = sb.run(['completion', 'zsh']);
    expect(r0.code, r0.stderr).toBe(0);
    writeFileSync(script, r0.stdout);
    for (const how of ['fpath', 'source']) {
      // A real interactive zsh on a pseudo-terminal: TAB after each line.
      const r = spawnSync('zsh', ['-f', join(root, 'test', 'fixtures', 'complete.zsh'), how, script, ...lines], { env: shellEnv(), encoding: 'utf8', timeout: 60_000 });
      expect(r.status, `${how}: ${r.stderr}`).toBe(0);
      expect(offers(r.stdout), how).toEqual(expected);
    }
  });

  it('fish, sourced, completes subcommands and a command\'s options', () => {
    const script = join(out, 'appshot.fish');
    const r0 = sb.run(['completion', 'fish']);
    expect(r0.code, r0.stderr).toBe(0);
    writeFileSync(script, r0.stdout);
    // fish completes a command line it is given (complete -C) as it would
    // the one being typed.
    const q = (w: string) => `'${w.replace(/[\\']/g, '\\$&')}'`;
    const calls = lines.map((line) => `set -l c (complete -C ${q(line)} | string split -f1 \\t); echo "$c"`);
    const r = spawnSync('fish', ['--no-config', '-c', [`source ${q(script)}`, ...calls].join('\n')], { env: shellEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(offers(r.stdout)).toEqual(expected);
  });

  it('an unknown shell is a usage error', () => {
    const r = sb.run(['completion', 'tcsh']);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("appshot: completion for 'tcsh' is not made: bash, zsh or fish\n");
  });
});
