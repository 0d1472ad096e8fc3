/**
 * Sockets of an application bound to one name one after another (review27
 * L1, resources/socketfile.ts): a listener and a datagram socket whose
 * files the application removed, and the ones it bound to the same names
 * since, at lower descriptors. The restore makes sockets in descriptor
 * order: before, the later one's bind took the name and the removed one's
 * bind found it held ("a live socket holds").
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import { fixture, Sandbox, waitFor } from './helpers.js';
import { ownedTests } from './parallel.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-rebound-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});
const { test: it, ok: run, start } = ownedTests(sb);

/** `rebound` run as `aid`, through a snapshot that ends it and a restore. */
async function comesBack(aid: string, more: string[]): Promise<void> {
  const dir = mkdtempSync(join(out, 'dir-'));
  await start(aid, [fixture('rebound'), dir, ...more]);
  await sb.checksPass(aid, 3);
  await run(['snapshot', aid, '-o', join(out, aid)]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  for (const f of readdirSync(dir)) rmSync(join(dir, f));
  await run(['restore', join(out, aid)]);
  await sb.checksPass(aid, 3);
  expect(readdirSync(dir).sort()).toEqual(['d.sock', 's.sock']);
  await run(['stop', aid]);
  await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to stop`);
}

describe('sockets bound to a name whose earlier socket\'s file was removed', () => {
  it('at lower descriptors than the removed ones: come back, each with its name, the files where the application left them, nothing else', () => comesBack('rb1', []));
  it('at higher descriptors than the removed ones: likewise', () => comesBack('rb2', ['old-first']));
});
