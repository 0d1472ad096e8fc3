/**
 * A web-like server as a template: Python's http.server (Debian's python3)
 * run under templates/web.rules, snapshotted, made a template and cloned 3
 * times. The clones are interchangeable: all answer on the one multiplexed
 * port, each serving part of the requests.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { root, Sandbox, waitFor } from './helpers.js';

const PYTHON = '/usr/bin/python3';
const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-web-'));
const port = 27100 + (process.pid % 800);

afterAll(async () => {
  await sb.dispose();
  rmSync(dir, { recursive: true, force: true });
});

function get(path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.setTimeout(5000, () => req.destroy(new Error('no answer')));
    req.on('error', reject);
    req.end();
  });
}

/** Until the server answers (Python takes a moment to start). */
async function waitForAnswer(): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if ((await get('/index.html').catch(() => undefined))?.status === 200) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nothing answers on port ${port}`);
}

const served = (aid: string) => (readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8').match(/"GET \/index\.html/g) ?? []).length;

describe('a web-like server cloned from a template', () => {
  it('is installed (the CI installs Debian\'s python3)', () => {
    expect(existsSync(PYTHON), `${PYTHON} is missing: apt-get install python3`).toBe(true);
  });

  it('clones http.server 3 times behind its one multiplexed port', async () => {
    const www = join(dir, 'www');
    mkdirSync(join(www, 'htdocs'), { recursive: true });
    writeFileSync(join(www, 'htdocs', 'index.html'), 'hello from the template\n');
    const rules = join(dir, 'web.rules');
    writeFileSync(
      rules,
      readFileSync(join(root, 'templates', 'web.rules'), 'utf8')
        .replaceAll('/srv/www', www)
        .replaceAll('/var/log/web', join(dir, 'log'))
        .replaceAll('8080', String(port)),
    );
    const r = sb.run(['run', '-d', '--aid', 'web', '--rules', rules, '--', PYTHON, '-m', 'http.server', String(port), '--bind', '127.0.0.1', '--directory', join(www, 'htdocs')]);
    expect(r.code, r.stderr).toBe(0);
    await waitForAnswer();

    expect(sb.run(['snapshot', 'web', '-o', join(dir, 'snap')]).code).toBe(0);
    const t = sb.run(['template', 'create', join(dir, 'snap'), '-o', join(dir, 'web.template'), '--json']);
    expect(t.code, t.stderr).toBe(0);
    const verdicts = (JSON.parse(t.stdout) as { verdicts: { ref: string; action: string }[] }).verdicts;
    expect(verdicts.find((v) => v.ref === `port:${port}`)?.action).toBe('multiplex');

    const c = sb.run(['clone', join(dir, 'web.template'), '--aid', 'w', '--count', '3']);
    expect(c.code, c.stderr).toBe(0);
    for (let i = 0; i < 30; i++) expect(await get('/index.html')).toEqual({ status: 200, body: 'hello from the template\n' });
    // The kernel spread the connections: more than one clone served some.
    await waitFor(() => ['w-1', 'w-2', 'w-3'].reduce((n, a) => n + served(a), 0) === 30, 5000, 'the clones to log every request');
    expect(['w-1', 'w-2', 'w-3'].filter((a) => served(a) > 0).length).toBeGreaterThan(1);
    for (const a of ['w-1', 'w-2', 'w-3']) expect(sb.run(['stop', a]).code).toBe(0);
  });
});
