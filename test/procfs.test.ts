/**
 * descriptorLinks (src/procfs.ts) tells a descriptor it may not read from
 * one closed meanwhile: the kernel lets a process of the same user list
 * another's /proc/PID/fd, but refuses it each link's target (its ptrace
 * check) where the other holds capabilities it lacks. Taken for closed,
 * such a process looked like one with no descriptors at all (serve took
 * an instance holding its port for one that did not).
 */
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { root, waitFor } from './helpers.js';

const NOBODY = '65534';

it('names the descriptor it is refused and why, in one line, rather than taking it for closed', async (ctx) => {
  // Two processes of one user, the target with a capability the reader
  // lacks: only root can make them.
  if (process.getuid?.() !== 0) ctx.skip();
  const target = spawn('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=+net_bind_service', '--ambient-caps=+net_bind_service', 'sleep', '60'], { stdio: ['ignore', 'ignore', 'inherit'] });
  try {
    const pid = target.pid!;
    // setpriv execs sleep in the same process once it has its user and capability.
    await waitFor(() => {
      try {
        const s = readFileSync(`/proc/${pid}/status`, 'utf8');
        return new RegExp(`^Uid:\\s+${NOBODY}\\s`, 'm').test(s) && /^CapEff:\s+0*400$/m.test(s) && readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'sleep';
      } catch {
        return false;
      }
    }, 10_000, 'the target to run as nobody with its capability');
    const reader = `
      import { descriptorLinks } from ${JSON.stringify(join(root, 'dist', 'procfs.js'))};
      let thrown;
      try { descriptorLinks(${pid}, true); } catch (e) { thrown = { message: e.message, code: e.code }; }
      console.log(JSON.stringify({ thrown, unasked: descriptorLinks(${pid}) }));`;
    const r = spawnSync('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--inh-caps=-all', process.execPath, '--input-type=module', '-e', reader], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { thrown?: { message: string; code: string }; unasked: unknown[] };
    expect(out.thrown, r.stdout).toBeDefined();
    expect(out.thrown!.code).toBe('EACCES');
    expect(out.thrown!.message).toMatch(new RegExp(`^process ${pid}'s fd \\d+ cannot be read \\(EACCES: `));
    expect(out.thrown!.message).not.toContain('\n');
    // Not asked to throw: its descriptors are left out, as before.
    expect(out.unasked).toEqual([]);
  } finally {
    target.kill('SIGKILL');
  }
});
