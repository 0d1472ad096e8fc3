/**
 * Pipes are told apart by device and inode, not by inode alone: a FIFO's
 * inode number may be another file system's FIFO's too (each fresh tmpfs
 * numbers its first file alike), or an anonymous pipe's. Merged into one,
 * the restore gave a process the other's data, and its descriptor another
 * object (review33a L5).
 *
 * The application (python3): two FIFOs of the same inode number on two
 * tmpfs mounts and an anonymous pipe, each holding bytes of its own, read
 * back after the restore and checked by the program itself.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Sandbox, waitFor } from './helpers.js';

const sb = new Sandbox();
const dir = mkdtempSync(join(tmpdir(), 'appshot-fifokeys-'));
const mounts = [join(dir, 'm1'), join(dir, 'm2')];
/** Two fresh tmpfs mounts (root with CAP_SYS_ADMIN only). */
const mounted = process.getuid?.() === 0 && mounts.every((m) => {
  mkdirSync(m);
  return spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', m]).status === 0;
});
afterAll(async () => {
  await sb.dispose();
  for (const m of mounts) spawnSync('umount', ['-l', m]);
  rmSync(dir, { recursive: true, force: true });
});

const program = `
import os, sys, time
fifos = [os.open(p, os.O_RDWR | os.O_NONBLOCK) for p in sys.argv[1:3]]
r, w = os.pipe()
for fd, data in zip(fifos + [w], [b'AAAA', b'BBBB', b'CCCC']):
    os.write(fd, data)
print('READY', flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
def take(fd):
    try:
        return os.read(fd, 16)
    except OSError as e:
        return e.strerror
got = [take(fd) for fd in fifos + [r]]
print('OK' if got == [b'AAAA', b'BBBB', b'CCCC'] else 'FAIL ' + repr(got), flush=True)
time.sleep(600)
`;

describe.runIf(mounted)('FIFOs of one inode number on two file systems, beside an anonymous pipe', () => {
  it('each comes back with its own data', async () => {
    for (const m of mounts) spawnSync('mkfifo', [join(m, 'f')]);
    const [a, b] = mounts.map((m) => statSync(join(m, 'f')));
    // The collision this is about (tmpfs numbers its first file alike).
    expect(a.ino).toBe(b.ino);
    expect(a.dev).not.toBe(b.dev);
    const go = join(dir, 'go');
    const r = sb.run(['run', '-d', '--aid', 'fk', '--', '/usr/bin/python3', '-c', program, join(mounts[0], 'f'), join(mounts[1], 'f'), go]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(() => sb.log('fk').includes('READY'), 20_000, 'the FIFOs and the pipe to be filled');
    const s = sb.run(['snapshot', 'fk', '-o', join(dir, 'fk.img')]);
    expect(s.code, s.stderr).toBe(0);
    const back = sb.run(['restore', join(dir, 'fk.img')]);
    expect(back.code, back.stderr).toBe(0);
    writeFileSync(go, '');
    await waitFor(() => /^(OK|FAIL.*)$/m.test(sb.log('fk')), 20_000, 'the verdict');
    expect(/^(OK|FAIL.*)$/m.exec(sb.log('fk'))![0]).toBe('OK');
    sb.run(['stop', 'fk', '-s', 'KILL']);
  });
});
