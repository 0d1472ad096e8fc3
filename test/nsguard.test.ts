/**
 * Namespaces an application process may not enter: setns(2) into a PID,
 * network or IPC namespace other than the application's is refused with
 * EPERM by the preload library, as unshare and clone into new ones are
 * (identity.test.ts, newns): a process there has ids and objects the
 * tables and a snapshot do not see. The fixture needs root, with which
 * the kernel lets every call through: run without appshot first, it shows
 * that; under appshot, each EPERM is then the library's.
 */
import { spawnSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { fixture, Sandbox } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

describe('setns into a namespace of another application', () => {
  it.skipIf(process.geteuid?.() !== 0)('is refused (by namespace descriptor, with its kind or 0, by pidfd, through setns() and syscall()); going back to the application\'s own is not', () => {
    const native = spawnSync(fixture('nsguard'), ['allowed'], { encoding: 'utf8', timeout: 30_000 });
    expect(native.stdout + native.stderr).toMatch(/VERDICT ok/);
    expect(native.status).toBe(0);
    const r = sb.run(['run', '--', fixture('nsguard'), 'refused']);
    expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
    expect(r.code).toBe(0);
  });
});
