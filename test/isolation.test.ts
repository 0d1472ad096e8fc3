// An application cannot reach another application's processes and IPC
// objects, nor the system's, by id.
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
