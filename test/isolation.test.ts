// An application cannot reach another application's processes and IPC
// objects, nor the system's, by id.
import { createHash } from 'node:crypto';
import { chownSync, mkdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type Entry, fixture, Sandbox } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());


describe('isolation between applications', () => {
  it('refuses ids that are not in the caller application', async () => {
    const b = sb.start(['run', '--aid', 'victim', '--', fixture('ipc'), 'hold']);
    await b.line(/^READY$/);
    const t = sb.json<{ tables: Record<string, Entry[]> }>(['table', 'victim']).tables;
    const victim = t.pid.find((e) => e.virtual === 2)!;
    const sem = t.semid[0];
    const shm = t.shmid[0];
    const msg = t.msgid[0];
    const probe = (op: string, ids: number[]) => {
      const r = sb.run(['run', '--', fixture('probe'), op, ...ids.map(String)]);
      expect(r.code).toBe(0);
      return r.stdout.trim().split('\n');
    };
    // The victim's system PID, this test's own PID and the system's init are
    // not in the prober's table: as if they did not exist.
    expect(probe('kill', [victim.system, process.pid, 1234567])).toEqual(['ESRCH', 'ESRCH', 'ESRCH']);
    // Virtual PID 1 is the prober's own init: it exists.
    expect(probe('kill', [1])).toEqual(['0']);
    expect(probe('open-proc', [victim.system])).toEqual(['ENOENT']);
    // Neither the victim's virtual nor its system IPC ids reach its objects.
    expect(probe('semop', [sem.virtual, sem.system])).toEqual(['EINVAL', 'EINVAL']);
    expect(probe('shmat', [shm.virtual, shm.system])).toEqual(['EINVAL', 'EINVAL']);
    expect(probe('msgsnd', [msg.virtual, msg.system])).toEqual(['EINVAL', 'EINVAL']);
    // Nor does its key, virtual or system.
    expect(probe('semget-key', [0x5432, t.semkey[0].system])).toEqual(['ENOENT', 'ENOENT']);
    b.child.stdin.end();
    expect((await b.exited).code).toBe(0);
  });
});

describe('names in shared directories', () => {
  it('an AID cannot be blocked by a name pre-created in /dev/shm; its tables are the owner\'s only', async () => {
    // What another local user could create, knowing the registry's tag
    // (a hash of its path) and the AID: a file and a directory.
    const tag = createHash('sha256').update(realpathSync(sb.home)).digest('hex').slice(0, 8);
    const squatFile = `/dev/shm/appshot-${tag}-squatted`;
    const squatDir = `/dev/shm/appshot-${tag}-squatted2`;
    writeFileSync(squatFile, 'not tables');
    mkdirSync(squatDir);
    if (process.getuid!() === 0) {
      chownSync(squatFile, 65534, 65534);
      chownSync(squatDir, 65534, 65534);
    }
    try {
      for (const aid of ['squatted', 'squatted2']) {
        const r = sb.run(['run', '--aid', aid, '--', 'true']);
        expect(r.stderr).toBe('');
        expect(r.code).toBe(0);
        // Ended, it keeps its AID until removed.
        expect(sb.run(['rm', aid]).code).toBe(0);
      }
      const b = sb.start(['run', '--aid', 'squatted', '--', fixture('ipc'), 'hold']);
      await b.line(/^READY$/);
      const tables = sb.shmFiles().filter((f) => f.startsWith(`appshot-${tag}-squatted-`));
      expect(tables).toHaveLength(1);
      const st = statSync(join('/dev/shm', tables[0]));
      expect(st.mode & 0o777).toBe(0o600);
      expect(st.uid).toBe(process.getuid!());
      expect(readFileSync(squatFile, 'utf8')).toBe('not tables');
      expect(sb.run(['stop', 'squatted', '-s', 'KILL']).code).toBe(0);
    } finally {
      rmSync(squatFile, { force: true });
      rmSync(squatDir, { recursive: true, force: true });
    }
  });
});
