// SysV semaphores, shared memory and message queues through virtual ids
// and virtual keys.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../src/native.js';
import { loadImage } from '../src/image/format.js';
import type { Image } from '../src/image/types.js';
import { validateImage } from '../src/image/validate.js';
import { semUndoOf } from '../src/ptrace/windows.js';
import { readMaps } from '../src/resources/memory.js';
import { LocalRegistry } from '../src/registry.js';
import { writeSignedImage } from './crafted.js';
import { command, type Entry, FOREIGN_IPC_MODE, fixture, Sandbox, systemIpcIds, waitFor } from './helpers.js';

const sb = new Sandbox();
afterAll(() => sb.dispose());

type Tables = Record<'semid' | 'shmid' | 'msgid' | 'semkey' | 'shmkey' | 'msgkey', Entry[]>;

describe('SysV IPC', () => {
  it('lets two processes share a set, a segment and a queue by virtual id, with virtual PIDs in IPC_STAT and GETPID', async () => {
    const app = sb.start(['run', '--aid', 'ipc', '--', fixture('ipc'), 'hold']);
    await app.line(/^READY$/);
    const ids = JSON.parse(app.output().find((l) => l.startsWith('{'))!);
    const t = sb.json<{ tables: Tables }>(['table', 'ipc']).tables;
    const system = systemIpcIds();
    const check = (kind: 'semid' | 'shmid' | 'msgid', vid: number, live: number[]) => {
      expect(t[kind]).toHaveLength(1);
      expect(t[kind][0].virtual).toBe(vid);
      expect(live).toContain(t[kind][0].system);
    };
    check('semid', ids.semid, system.sem);
    check('shmid', ids.shmid, system.shm);
    check('msgid', ids.msqid, system.msg);
    // The keys the app used are virtual: the system objects carry others.
    expect(t.semkey).toEqual([{ virtual: 0x5432, system: expect.any(Number), flags: [], owner: 0 }]);
    expect(t.semkey[0].system).not.toBe(0x5432);
    expect(t.shmkey[0].virtual).toBe(0x5433);
    expect(t.msgkey[0].virtual).toBe(0x5434);
    app.child.stdin.end();
    const r = await app.exited;
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/\nOK\nREADY$/);
  });

  it('gives two applications that use the same key different system objects', async () => {
    const a = sb.start(['run', '--aid', 'ka', '--', fixture('ipc'), 'hold']);
    const b = sb.start(['run', '--aid', 'kb', '--', fixture('ipc'), 'hold']);
    await a.line(/^READY$/);
    await b.line(/^READY$/);
    const ta = sb.json<{ tables: Tables }>(['table', 'ka']).tables;
    const tb = sb.json<{ tables: Tables }>(['table', 'kb']).tables;
    // Both created key 0x5432 with IPC_EXCL and succeeded: no collision.
    expect(ta.semkey[0].virtual).toBe(tb.semkey[0].virtual);
    expect(ta.semkey[0].system).not.toBe(tb.semkey[0].system);
    expect(ta.semid[0].system).not.toBe(tb.semid[0].system);
    a.child.stdin.end();
    b.child.stdin.end();
    expect((await a.exited).code).toBe(0);
    expect((await b.exited).code).toBe(0);
  });
});

describe('/proc/sysvipc and /proc/locks as the application reads them', () => {
  // test/fixtures/sysvview.c: the application's own objects by the ids and
  // keys it knows, its lock by its own PID, whatever name opens the file.
  const sysvview = async (mode: string) => {
    const app = sb.start(['run', '--', fixture('sysvview'), mode]);
    const r = await app.exited;
    expect(r.stdout + r.stderr).toMatch(/VERDICT ok/);
    expect(r.code).toBe(0);
  };

  it('shows the view by every name of the files: ".." after a directory of /proc that is no process\'s, links to /proc, descriptors of /proc and /proc/sysvipc, /proc/self/fd, and read-write', async () => {
    await sysvview('paths');
  });

  it('finds the key, id and PID columns by the header\'s names, in whatever order a kernel prints them', async () => {
    await sysvview('columns');
  });

  it('counts the application\'s own objects in SHM_INFO, SEM_INFO and MSG_INFO (ipcs -u), not the system\'s', async () => {
    // Objects outside every application, so that the system's counts differ.
    const made: [string, string][] = [];
    try {
      for (const [make, remove] of [[['-M', '4096'], '-m'], [['-S', '2'], '-s'], [['-Q'], '-q']] as const) {
        const r = spawnSync('ipcmk', [...make, '-p', FOREIGN_IPC_MODE.toString(8)], { encoding: 'utf8' });
        const id = /id: (\d+)/.exec(r.stdout)?.[1];
        expect(id, r.stderr).toBeDefined();
        made.push([remove, id!]);
      }
      await sysvview('usage');
    } finally {
      for (const [flag, id] of made) spawnSync('ipcrm', [flag, id]);
    }
  });
});

/** The ctime the kernel gave semaphore set `semid` (seconds), or undefined
 * once it is gone. */
function semCtime(semid: number): number | undefined {
  for (const line of readFileSync('/proc/sysvipc/sem', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (Number(cols[1]) === semid) return Number(cols[9]);
  }
  return undefined;
}

describe('signal handlers, every one through the library\'s entry', () => {
  // sigset() and __sysv_signal (signal() under -std=c99) are glibc's own
  // sigaction past the library's: they handed back its entry as the old
  // handler; a one-shot handler, reset, showed SA_SIGINFO (review r272).
  it('shows a program its own handlers and flags (sigset, __sysv_signal, a one-shot handler reset)', () => {
    const r = sb.run(['run', '--', fixture('sigviews'), 'views']);
    expect([r.code, r.stdout], r.stderr).toEqual([0, 'PASS\n']);
  });
});

describe('the ownership rule against the kernel\'s clock', () => {
  // The kernel stamps a SysV object with the time of its last tick, which
  // lags Date.now() by up to a tick (4 ms at HZ=250), and by tens of ms on a
  // loaded machine: an object made just after a second began can carry
  // the second before. Made then, right after its registration, it is the
  // application's all the same, and goes with it.
  it('removes an object made the instant after registration, even stamped with the second before it', async () => {
    const reg = new LocalRegistry(sb.home);
    let straddled = 0;
    for (let attempt = 0; attempt < 15 && straddled < 3; attempt++) {
      const second = Math.floor(Date.now() / 1000);
      while (Math.floor(Date.now() / 1000) === second) {
        /* to the start of the next second, where the two clocks differ */
      }
      const registered = Math.floor(Date.now() / 1000);
      const record = reg.register(`tick${attempt}`, () => ({ command: ['none'], cwd: '/', createdAt: new Date().toISOString(), detached: true, harnessPid: process.pid }));
      const semid = addon().restoreSem(record.tables, 1, 0x5151, 0o600, [1]);
      if (semCtime(semid)! < registered) straddled++;
      reg.release(record);
      expect(semCtime(semid), `semaphore set ${semid}, made in the application's tables right after it was registered`).toBeUndefined();
    }
  });
});

// Another process's private segment (IPC_CREAT, FOREIGN_IPC_MODE), made before the
// application and held while standard input is open; removed after.
const FOREIGN_SEGMENT = `
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
i = libc.shmget(0, 4096, 0o1000 | ${FOREIGN_IPC_MODE})
print(i, flush=True)
sys.stdin.read()
libc.shmctl(i, 0, None)
`;

describe('a snapshot reads only the application\'s own SysV objects', () => {
  it('leaves out, naming it, a segment of another process that the application wrote into its own tables (read with appshot\'s rights, it would go into the image), and takes its own', async () => {
    const holder = spawn('python3', ['-c', FOREIGN_SEGMENT], { stdio: ['pipe', 'pipe', 'inherit'] });
    const out = mkdtempSync(join(tmpdir(), 'appshot-sysvown-'));
    try {
      const [first] = await new Promise<string[]>((resolve) => createInterface({ input: holder.stdout! }).once('line', (l) => resolve([l])));
      const foreign = Number(first);
      expect(foreign, first).toBeGreaterThanOrEqual(0);
      // Its standard input a pipe of its own: nothing outside it held.
      sb.ok(['run', '-d', '--aid', 'sysvown', '--', 'sh', '-c', `sleep 1000 | ${fixture('ipc')} hold`]);
      await waitFor(() => /^READY$/m.test(sb.log('sysvown')), 10_000, 'sysvown to be ready');
      // Its own set, segment and queue pass the rule.
      sb.ok(['snapshot', 'sysvown', '--leave-running', '-o', join(out, 'own.img')]);
      const record = new LocalRegistry(sb.home).require('sysvown');
      const vid = addon().mapSystem(record.tables, 'shmid', foreign);
      const r = sb.run(['snapshot', 'sysvown', '--leave-running', '-o', join(out, 'taken.img')]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toContain(`appshot: left out shared memory segment ${foreign} (virtual id ${vid}): the application's tables name it, but it is not the application's\n`);
      // The image holds the application's own segment, not the other one.
      const { image } = await loadImage(join(out, 'taken.img'), { trust: 'report' });
      expect(image.shmSegments.map((g) => g.vid)).not.toContain(vid);
      expect(image.shmSegments).toHaveLength(1);
      expect(image.semaphores).toHaveLength(1);
      expect(image.msgQueues).toHaveLength(1);
      sb.ok(['rm', '-f', 'sysvown']);
    } finally {
      holder.stdin!.end();
      rmSync(out, { recursive: true, force: true });
    }
  });
});

describe('SEM_UNDO adjustments, which the kernel keeps per process and /proc does not show', () => {
  // test/fixtures/semundo.c: a child holds a semaphore taken with
  // SEM_UNDO, as an apache prefork child holds its accept mutex (`Mutex
  // sysvsem`); killed, the kernel gives the semaphore back. An image
  // without that adjustment hangs the restored application the first
  // time a holder dies.
  const semundo = async (aid: string, mode: string) => {
    sb.ok(['run', '-d', '--aid', aid, '--', fixture('semundo'), mode]);
    await sb.checksPass(aid, 2);
    return { set: Number(/^SET (\d+)$/m.exec(sb.log(aid))![1]), child: Number(/^CHILD (\d+)$/m.exec(sb.log(aid))![1]) };
  };
  // Made when a test of this block runs, not when the file is collected:
  // a run filtered with -t that skips the block never reaches its afterAll.
  let out = '';
  beforeAll(() => void (out = mkdtempSync(join(tmpdir(), 'appshot-semundo-'))));
  afterAll(() => void (out && rmSync(out, { recursive: true, force: true })));
  /** semundo `mode` (AID undoMODE) snapshotted, which ends it: its holder's
   * image carries the adjustment +1 on semaphore 0; restored, the holder
   * is killed and gives it back (the fixture's PASS). */
  const carriesHolderAdjustment = async (mode: string) => {
    const aid = `undo${mode}`;
    const { set, child } = await semundo(aid, mode);
    sb.ok(['snapshot', aid, '-o', join(out, `${mode}.img`)]);
    const { image } = await loadImage(join(out, `${mode}.img`), { trust: 'report' });
    expect(image.processes.find((p) => p.vpid === child)!.semUndo, mode).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    sb.ok(['restore', join(out, `${mode}.img`)]);
    await sb.checksPass(aid, 2);
    await sb.exercised(aid, 'to kill the holder');
    expect(sb.log(aid)).toMatch(/^PASS$/m);
    sb.ok(['rm', '-f', aid]);
  };

  it('gives back a held semaphore\'s adjustment at restore: the holder killed afterwards, the kernel gives the semaphore back', async () => {
    const { set, child } = await semundo('undohold', 'hold');
    sb.ok(['snapshot', 'undohold', '-o', join(out, 'hold.img')]);
    const { image } = await loadImage(join(out, 'hold.img'), { trust: 'report' });
    expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    sb.ok(['restore', join(out, 'hold.img')]);
    await sb.checksPass('undohold', 2);
    // Taken again: the restored tables carry the count of SETVAL the
    // adjustment was written at (a new count would refuse it as stale).
    sb.ok(['snapshot', 'undohold', '--leave-running', '-o', join(out, 'again.img')]);
    const again = (await loadImage(join(out, 'again.img'), { trust: 'report' })).image;
    expect(again.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    // Restored without it, the semaphore stayed at 0: FAIL.
    await sb.exercised('undohold', 'to kill the holder');
    expect(sb.log('undohold')).toMatch(/^PASS$/m);
    sb.ok(['rm', '-f', 'undohold']);
  });

  // A process that used more semaphores over its life than the library's
  // table holds (64) was refused at every snapshot, holding none: the
  // table never freed an entry.
  it('carries the adjustments of a holder that used more semaphores over its life than the table holds (entries back to 0, or of removed sets, freed)', async () => {
    const { set, child } = await semundo('undoreuse', 'reuse');
    sb.ok(['snapshot', 'undoreuse', '-o', join(out, 'reuse.img')]);
    const { image } = await loadImage(join(out, 'reuse.img'), { trust: 'report' });
    const held = [{ vid: set, semnum: 0, adj: 1 }, { vid: set, semnum: 70, adj: 1 }, { vid: set, semnum: 90, adj: -2 }];
    const bySemnum = (u: { semnum: number }[]) => [...u].sort((a, b) => a.semnum - b.semnum);
    expect(bySemnum(image.processes.find((p) => p.vpid === child)!.semUndo!)).toEqual(held);
    // ipc/sem.c keeps semadj in -(SEMAEM + 1)..SEMAEM (SEMAEM is SEMVMX):
    // -32768 is one a process can hold (an image with it was refused).
    const size = BigInt(statSync(join(out, 'reuse.img', 'pages.img')).size);
    const raised = image.processes.find((p) => p.vpid === child)!.semUndo!.find((u) => u.semnum === 90)!;
    raised.adj = -32768;
    expect(() => validateImage(image, size)).not.toThrow();
    raised.adj = -32769;
    expect(() => validateImage(image, size)).toThrow(/SEM_UNDO adjustment of -32769 on set \d+ semaphore 90 \(the kernel keeps -32768\.\.32767, non-zero\)/);
    sb.ok(['restore', join(out, 'reuse.img')]);
    await sb.checksPass('undoreuse', 2);
    // Killed after the restore, the holder gives all three back.
    await sb.exercised('undoreuse', 'to kill the holder');
    expect(sb.log('undoreuse')).toMatch(/^PASS$/m);
    sb.ok(['rm', '-f', 'undoreuse']);
  });

  // The table is lock-free: two threads, and a handler interrupting one
  // of them, claim and free its entries together (two claims of one
  // semaphore merged into one entry). Left counted twice, or in two
  // entries, the snapshot would be refused or carry a wrong adjustment.
  it('carries the adjustments of a holder whose two threads and a signal handler made SEM_UNDO operations on the same semaphores at once', async () => {
    const { set, child } = await semundo('undorace', 'race');
    sb.ok(['snapshot', 'undorace', '--leave-running', '-o', join(out, 'race.img')]);
    const { image } = await loadImage(join(out, 'race.img'), { trust: 'report' });
    const held = [{ vid: set, semnum: 0, adj: 1 }, { vid: set, semnum: 5, adj: -2 }, { vid: set, semnum: 70, adj: 1 }, { vid: set, semnum: 90, adj: -2 }];
    expect([...image.processes.find((p) => p.vpid === child)!.semUndo!].sort((a, b) => a.semnum - b.semnum)).toEqual(held);
    await sb.exercised('undorace', 'to kill the holder');
    expect(sb.log('undorace')).toMatch(/^PASS$/m);
    sb.ok(['rm', '-f', 'undorace']);
  });

  // A process stopped by the freeze in the middle of that merge (its
  // thread blocked in a system call there, as a signal handler that
  // blocks would leave it): one operation counted twice. Summed, the
  // image carried an adjustment the kernel never had.
  it('refuses by name a process stopped in the middle of merging two entries of one semaphore, and takes it once the merge is done', async () => {
    const { set, child } = await semundo('undomerge', 'merging');
    const r = sb.run(['snapshot', 'undomerge', '--leave-running', '-o', join(out, 'merging.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known: it was stopped while two of its threads were writing`);
    expect(r.stderr).toContain('the application was left running');
    await sb.exercised('undomerge', 'to let the merge end');
    await waitFor(() => /^MERGED$/m.test(sb.log('undomerge')), 10_000, 'the merge to end');
    sb.ok(['snapshot', 'undomerge', '--leave-running', '-o', join(out, 'merged.img')]);
    const { image } = await loadImage(join(out, 'merged.img'), { trust: 'report' });
    expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 5, adj: -2 }]);
    await sb.checksPass('undomerge', 2);
    sb.ok(['rm', '-f', 'undomerge']);
  });

  // A thread stopped between the kernel's semop and the library's write
  // of its adjustment, blocked in a system call there (as a signal handler
  // that blocks at that instant leaves it: the freeze takes a thread
  // blocked inside a window): the table looks whole but lacks it.
  it('never carries a table that lacks an operation the kernel made (a thread blocked before writing it)', async () => {
    const { set, child } = await semundo('undounrec', 'unrecorded');
    const r = sb.run(['snapshot', 'undounrec', '--leave-running', '-o', join(out, 'unrec.img')]);
    if (r.code === 0) {
      const { image } = await loadImage(join(out, 'unrec.img'), { trust: 'report' });
      expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    } else expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known`);
    sb.ok(['rm', '-f', 'undounrec']);
  });

  // A signal taken just as the kernel's semop made a SEM_UNDO operation
  // (at the call's return, or while the library writes it), whose handler
  // blocks: frozen there, the process was carried without the adjustment
  // (review r267). The library now holds such a handler back until the
  // table holds the adjustment; the fixture's handlers check that.
  it('carries the adjustment of a thread whose signal handler blocks as its semop returns (the handler held until the table holds it)', async () => {
    // A third thread of it waits in its own semop: taken, never refused.
    const { set, child } = await semundo('undohandler', 'handler');
    sb.ok(['snapshot', 'undohandler', '-o', join(out, 'handler.img')]);
    const { image } = await loadImage(join(out, 'handler.img'), { trust: 'report' });
    const held = [{ vid: set, semnum: 0, adj: 1 }, { vid: set, semnum: 1, adj: 1 }];
    expect([...image.processes.find((p) => p.vpid === child)!.semUndo!].sort((a, b) => a.semnum - b.semnum)).toEqual(held);
    sb.ok(['restore', join(out, 'handler.img')]);
    await sb.checksPass('undohandler', 2);
    // Killed after the restore, the holder gives both back (its waiting
    // semop, made again on the new set, took nothing).
    await sb.exercised('undohandler', 'to kill the holder');
    expect(sb.log('undohandler')).toMatch(/^PASS$/m);
    sb.ok(['rm', '-f', 'undohandler']);
  });

  // A handler the kernel resets as it takes it (SA_RESETHAND) cannot be
  // held back (queued again, the signal would meet the default action):
  // it runs at once, and the process is refused, never carried short.
  it('refuses by name a process whose one-shot handler ran between the kernel\'s semop and the table\'s write', async () => {
    const { child } = await semundo('undooneshot', 'oneshot');
    const r = sb.run(['snapshot', 'undooneshot', '--leave-running', '-o', join(out, 'oneshot.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known: `);
    expect(r.stderr).toContain('or took a signal whose handler could not wait while the library wrote one (a fault, a one-shot handler');
    await sb.checksPass('undooneshot', 2);
    sb.ok(['rm', '-f', 'undooneshot']);
  });

  // A handler the library does not wrap (a raw rt_sigaction) that
  // interrupts a semop and leaves by siglongjmp never let the semop end:
  // its thread's note stayed "made" and every later snapshot of the
  // process was refused. The jump now settles it: the waiter interrupted
  // took nothing; the one signalled as its operation was made holds the
  // semaphore, and its adjustment is written before the jump.
  it('carries the adjustments of threads that left their semop by siglongjmp from a handler the library does not wrap', async () => {
    await carriesHolderAdjustment('rawjump');
  });

  // The same handler blocking there: the snapshot tells from the signal
  // frame below the library's stub that the interrupted wait made
  // nothing, and takes the process (it was refused as "made, not written").
  it('takes a process whose thread blocks in a handler the library does not wrap that interrupted its waiting semop (nothing made), on its stack or a sigaltstack', async () => {
    for (const mode of ['rawblock', 'rawblockalt']) await carriesHolderAdjustment(mode);
  });

  // A handler the library wraps, run inside one it does not wrap that
  // interrupted a semop at its return (made, not written), ran with the
  // note put aside; leaving by siglongjmp, it left the adjustment in
  // neither place: the image lacked it (review r279).
  it('carries the adjustment of a semop left by a wrapped handler\'s siglongjmp from inside an unwrapped one', async () => {
    await carriesHolderAdjustment('rawnested');
  });

  // The same jump made by the unwrapped handler itself, run on the
  // thread's sigaltstack: the call's frame is on the other stack.
  it('carries the adjustment of a semop left by siglongjmp from an unwrapped handler on the sigaltstack', async () => {
    await carriesHolderAdjustment('rawalt');
  });

  // A note left stale by a jump the library does not see (setcontext out
  // of an unwrapped handler on the sigaltstack): a fork made from a
  // coroutine's stack searched 64 KiB below the call's stack pointer, into
  // the small thread stack's guard page, and the child died of SIGSEGV (as
  // did a siglongjmp from there back above the semop).
  it('survives a fork from a coroutine after a setcontext out of a semop (the frame search reads no unmapped page)', async () => {
    const { set, child } = await semundo('undorawstale', 'rawstale');
    // Then a siglongjmp back above the semop settled the note from the
    // frame on the sigaltstack, past the same guard page.
    sb.ok(['snapshot', 'undorawstale', '--leave-running', '-o', join(out, 'rawstale.img')]);
    const { image } = await loadImage(join(out, 'rawstale.img'), { trust: 'report' });
    expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    sb.ok(['rm', '-f', 'undorawstale']);
  });

  // A fork made by a handler the library does not wrap, which interrupted
  // a semop at its return: the kernel's adjustment is the parent's alone
  // (a fork inherits none), but the child, returning to the semop, wrote
  // it into its own table too: restored, both would give it back.
  it('carries a semop\'s adjustment in the process that made it, not in a child forked by a handler that interrupted it', async () => {
    const { set, child } = await semundo('undorawfork', 'rawfork');
    sb.ok(['snapshot', 'undorawfork', '-o', join(out, 'rawfork.img')]);
    const { image } = await loadImage(join(out, 'rawfork.img'), { trust: 'report' });
    expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    expect(image.processes.length).toBe(3);
    for (const p of image.processes.filter((q) => q.vpid !== child)) expect(p.semUndo ?? []).toEqual([]);
    sb.ok(['rm', '-f', 'undorawfork']);
  });

  // An exec made by a handler the library does not wrap, which interrupted
  // a semop at its return: the kernel keeps the adjustment across the
  // exec, the library had not written it, and the exec'd program's empty
  // table was read as "none" (the exec's mark looked at the table only).
  it('refuses by name, or carries, the adjustment of a holder exec\'d by a handler that interrupted its semop', async () => {
    const { set, child } = await semundo('undorawexec', 'rawexec');
    const r = sb.run(['snapshot', 'undorawexec', '--leave-running', '-o', join(out, 'rawexec.img')]);
    if (r.code === 0) {
      const { image } = await loadImage(join(out, 'rawexec.img'), { trust: 'report' });
      expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    } else {
      expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known`);
    }
    await sb.checksPass('undorawexec', 2);
    sb.ok(['rm', '-f', 'undorawexec']);
  });

  // A signal held during the write is blocked in the mask of every
  // context after it: released only at the semop's end, a handler that
  // ran in between (one that could not be held) and made a semop of its
  // own, or left by a siglongjmp, left it blocked for good (review r272).
  it('never leaves a signal held during the table\'s write blocked (a handler run there makes a semop, or jumps out)', () => {
    for (const mode of ['held', 'heldjump']) {
      const r = sb.run(['run', '--', fixture('sigviews'), mode]);
      expect([r.code, r.stdout], `${mode}: ${r.stderr}`).toEqual([0, 'PASS\n']);
    }
  });

  it('gives back the adjustment a second thread of the holder made (threads share theirs)', async () => {
    await carriesHolderAdjustment('thread');
  });

  // Review r257: the kernel keeps a process's semadj across exec, the
  // library's table (in the old program's memory) does not; the exec'd
  // program's empty table read as "none", the restore gave nothing back,
  // and the holder's death left the semaphore taken for ever.
  it('refuses by name, or carries, the adjustment of a holder that exec\'d since its SEM_UNDO operation', async () => {
    const { set, child } = await semundo('undoexec', 'exec');
    const r = sb.run(['snapshot', 'undoexec', '--leave-running', '-o', join(out, 'exec.img')]);
    if (r.code === 0) {
      const { image } = await loadImage(join(out, 'exec.img'), { trust: 'report' });
      expect(image.processes.find((p) => p.vpid === child)!.semUndo).toEqual([{ vid: set, semnum: 0, adj: 1 }]);
    } else {
      expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known`);
    }
    await sb.checksPass('undoexec', 2);
    sb.ok(['rm', '-f', 'undoexec']);
  });

  // Review r257: such a thread's adjustment, summed into the process's
  // table, was given back to the whole process at restore, and its exit
  // no longer released the semaphore.
  it('refuses by name a process with a thread made without CLONE_SYSVSEM (its adjustments its own in the kernel), and leaves the application running', async () => {
    const { child } = await semundo('undosplit', 'split');
    const r = sb.run(['snapshot', 'undosplit', '--leave-running', '-o', join(out, 'split.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known`);
    expect(r.stderr).toContain('without CLONE_SYSVSEM');
    expect(r.stderr).toContain('the application was left running');
    await sb.checksPass('undosplit', 2);
    sb.ok(['rm', '-f', 'undosplit']);
  });

  // A table of another layout (a program started under another version of
  // the library) was read as "none": the holder's adjustment was lost,
  // and killed after the restore it left its semaphore taken for ever.
  it('refuses by name a holder whose table the snapshot cannot read (another layout), and leaves the application running', async () => {
    const { child } = await semundo('undolayout', 'hold');
    const pid = sb.systemPid('undolayout', child);
    const table = semUndoOf(pid, readMaps(pid))!;
    const capacity = Buffer.alloc(4);
    capacity.writeInt32LE(128);
    addon().writeMemory(pid, table + 8n, capacity); // as another build's
    const r = sb.run(['snapshot', 'undolayout', '--leave-running', '-o', join(out, 'layout.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known: the library's table of them cannot be read`);
    expect(r.stderr).toContain('the application was left running');
    await sb.checksPass('undolayout', 2);
    sb.ok(['rm', '-f', 'undolayout']);
  });

  it('takes a process whose SEM_UNDO operations cancelled out', async () => {
    await semundo('undoreleased', 'released');
    sb.ok(['snapshot', 'undoreleased', '--leave-running', '-o', join(out, 'released.img')]);
    await sb.checksPass('undoreleased', 2);
    sb.ok(['rm', '-f', 'undoreleased']);
  });

  it('refuses by name a process whose SEM_UNDO adjustments the library could not follow (more semaphores than its table holds), and leaves the application running', async () => {
    const { child } = await semundo('undofull', 'overflow');
    const r = sb.run(['snapshot', 'undofull', '--leave-running', '-o', join(out, 'full.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known: it held adjustments of more than 64 semaphores at once`);
    expect(r.stderr).toContain('the application was left running');
    await sb.checksPass('undofull', 2);
    sb.ok(['rm', '-f', 'undofull']);
  });

  it('refuses by name a process whose adjustment a SETVAL may have zeroed since (the kernel zeroes it, the library cannot tell which semaphore), and leaves the application running', async () => {
    const { set, child } = await semundo('undoset', 'setval');
    const r = sb.run(['snapshot', 'undoset', '--leave-running', '-o', join(out, 'set.img')]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toContain(`process ${child} (semundo): its SysV semaphore undo adjustments (SEM_UNDO), which the kernel applies when it exits, cannot be known: a SETVAL, SETALL or IPC_RMID since its operation on set ${set} semaphore 0 may have zeroed them`);
    expect(r.stderr).toContain('the application was left running');
    await sb.checksPass('undoset', 2);
    sb.ok(['rm', '-f', 'undoset']);
  });
});

describe('the PIDs restored SysV objects show: those the image recorded, until a process of the application uses them', () => {
  // test/fixtures/ipcpids.c: a segment made by one child and last used by
  // the parent (which the restore attaches before another child), semaphores last used by each (one given back as a SEM_UNDO
  // adjustment at restore, which the kernel counts as a use), a queue
  // sent to by a child and received from by the parent, a segment whose
  // creator is gone. A restore makes the objects itself and attaches the
  // segment in the processes: IPC_STAT showed 0 (its restorer, no process
  // of the application) or the process the restore attached last. The
  // fixture's checks read /proc/sysvipc too: only its own objects there,
  // with the ids, keys and PIDs IPC_STAT gives, in the kernel's columns.
  let out = '';
  beforeAll(() => void (out = mkdtempSync(join(tmpdir(), 'appshot-ipcpids-'))));
  afterAll(() => void (out && rmSync(out, { recursive: true, force: true })));
  const stopped = async (aid: string) => {
    sb.ok(['rm', '-f', aid]);
    await waitFor(() => !sb.aids().includes(aid), 10_000, `${aid} to end`);
  };

  it('snapshot (ends it) → restore; its restored copy snapshotted → restore --lazy; then used: the kernel\'s own values', async () => {
    sb.ok(['run', '-d', '--aid', 'ipcp', '--', fixture('ipcpids')]);
    await sb.checksPass('ipcp');
    const [, parent, creator, user] = /^PIDS (\d+) (\d+) (\d+)$/m.exec(sb.log('ipcp'))!.map(Number);
    sb.ok(['snapshot', 'ipcp', '-o', join(out, 'p1')]);
    const { image } = await loadImage(join(out, 'p1'), { trust: 'report' });
    const shm = image.shmSegments.find((s) => s.cvpid !== 0)!;
    expect([shm.cvpid, shm.lvpid]).toEqual([creator, parent]);
    expect(image.semaphores[0].vpids).toEqual([creator, user]);
    expect([image.msgQueues[0].lsvpid, image.msgQueues[0].lrvpid]).toEqual([creator, parent]);
    sb.ok(['restore', join(out, 'p1')]);
    await sb.checksPass('ipcp');
    // A restored copy's snapshot reads what its restore recorded back.
    sb.ok(['snapshot', 'ipcp', '-o', join(out, 'p2')]);
    const again = (await loadImage(join(out, 'p2'), { trust: 'report' })).image;
    expect(again.shmSegments.map((s) => [s.cvpid, s.lvpid]).sort()).toEqual(image.shmSegments.map((s) => [s.cvpid, s.lvpid]).sort());
    expect(again.semaphores[0].vpids).toEqual([creator, user]);
    expect([again.msgQueues[0].lsvpid, again.msgQueues[0].lrvpid]).toEqual([creator, parent]);
    sb.ok(['restore', join(out, 'p2'), '--lazy']);
    await sb.checksPass('ipcp');
    await sb.exercised('ipcp', 'to use its objects');
    await sb.checksPass('ipcp');
    await stopped('ipcp');
  });

  it('--leave-running → restore beside it: both show the recorded PIDs, each its own once used', async () => {
    sb.ok(['run', '-d', '--aid', 'ipcq', '--', fixture('ipcpids')]);
    await sb.checksPass('ipcq');
    sb.ok(['snapshot', 'ipcq', '--leave-running', '-o', join(out, 'q')]);
    await sb.checksPass('ipcq');
    sb.ok(['restore', join(out, 'q'), '--aid', 'ipcr']);
    await sb.checksPass('ipcr');
    await sb.exercised('ipcr', 'to use its objects');
    await sb.checksPass('ipcq');
    await sb.exercised('ipcq', 'to use its objects');
    await sb.checksPass('ipcr');
    await stopped('ipcq');
    await stopped('ipcr');
  });

  /** The record of PIDs restored SysV objects show (appshot_ipc_pids) in
   * application `aid`'s tables file: [kind, system id, field, shown, vpid],
   * kind 1 a semaphore set, 2 a segment, 3 a queue (enum appshot_kind; a
   * forgotten entry's is 0). */
  const ipcPidRecord = (aid: string): number[][] => {
    const files = readdirSync('/dev/shm').filter((n) => n.startsWith('appshot-') && n.includes(`-${aid}-`));
    expect(files).toHaveLength(1);
    const fd = openSync(join('/dev/shm', files[0]), 'r');
    try {
      const at = addon().tablesIpcPidsOffset;
      const head = Buffer.alloc(8);
      readSync(fd, head, 0, 8, at);
      const b = Buffer.alloc(Math.min(head.readUInt32LE(0), 4096) * 16);
      readSync(fd, b, 0, b.length, at + 8);
      const out: number[][] = [];
      for (let i = 0; i < b.length; i += 16) out.push([b.readUInt16LE(i + 4), b.readInt32LE(i), b.readUInt16LE(i + 6), b.readInt32LE(i + 8), b.readInt32LE(i + 12)]);
      return out;
    } finally {
      closeSync(fd);
    }
  };

  it('a restored queue or set removed by the application: its recorded PIDs go with it, for no new object under its id to show', async () => {
    // After a restore a queue's msg_lrpid is 0 (nobody received), as a new
    // queue's is: a record (queue, id, lrpid, shown 0, V) kept after the
    // queue's IPC_RMID named V for the next queue the kernel gave that id.
    sb.ok(['run', '-d', '--aid', 'ipcrm', '--', fixture('ipcpids')]);
    await sb.checksPass('ipcrm');
    sb.ok(['snapshot', 'ipcrm', '-o', join(out, 'rm')]);
    sb.ok(['restore', join(out, 'rm')]);
    await sb.checksPass('ipcrm');
    const t = sb.json<{ tables: Record<string, Entry[]> }>(['table', 'ipcrm']).tables;
    const [queue] = t.msgid;
    const [set] = t.semid;
    const of = (kind: number, sid: number) => ipcPidRecord('ipcrm').filter(([k, s]) => k === kind && s === sid);
    // The queue's last receiver (shown 0) and the set's users are recorded.
    expect(of(3, queue.system).some(([, , field, shown]) => field === 1 && shown === 0)).toBe(true);
    expect(of(1, set.system).length).toBeGreaterThan(0);
    // Its processes stopped, for their checks not to end it when the
    // objects go (init, which keeps the tables, runs on).
    const stoppedPids = t.pid.filter((e) => e.virtual !== 1).map((e) => e.system);
    for (const pid of stoppedPids) process.kill(pid, 'SIGSTOP');
    sb.ok(['exec', 'ipcrm', '--', 'ipcrm', '-q', String(queue.virtual), '-s', String(set.virtual)]);
    expect(systemIpcIds().msg).not.toContain(queue.system);
    expect(of(3, queue.system)).toEqual([]);
    expect(of(1, set.system)).toEqual([]);
    await stopped('ipcrm');
  });

  /** Image `from` with `change` made to it, signed by this sandbox's node. */
  const crafted = (from: string, name: string, change: (i: Image) => void) => async () => {
    const { image } = await loadImage(join(out, from), { trust: 'report' });
    change(image);
    return writeSignedImage(join(out, name), image, join(out, from), { signer: sb.home, copyPages: true, formatOf: true });
  };

  it('an image whose recorded PID names no process of it: shown as 0; one out of the kernel\'s range: refused', async () => {
    sb.ok(['run', '-d', '--aid', 'ipcx', '--', fixture('ipcpids')]);
    await sb.checksPass('ipcx');
    const creator = Number(/^PIDS \d+ (\d+)/m.exec(sb.log('ipcx'))![1]);
    sb.ok(['snapshot', 'ipcx', '-o', join(out, 'x')]);
    const made = (i: Image) => i.shmSegments.find((s) => s.cvpid === creator)!;
    // A PID of no process of the image: the application sees 0, as it sees
    // a process outside it (its own check says so, and fails).
    const stranger = await crafted('x', 'x-stranger', (i) => void (made(i).cvpid = 4000))();
    sb.ok(['restore', stranger]);
    await waitFor(() => /^FAIL/m.test(sb.log('ipcx')), 15_000, 'ipcx to check its segment');
    expect(/^FAIL.*$/m.exec(sb.log('ipcx'))![0]).toContain(`the segment's shm_cpid is 0, not ${creator} (its creator)`);
    await stopped('ipcx');
    const outOfRange = await crafted('x', 'x-range', (i) => void (made(i).cvpid = 4194304))();
    const r = sb.run(['restore', outOfRange]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/SysV segment \d+'s creator PID is 4194304, not a PID/);
    expect(sb.aids()).not.toContain('ipcx');
  });

  it('a semaphore set the restorer may not read (mode 0200, no CAP_IPC_OWNER): restored, its PIDs said not kept', async () => {
    // semRead (IPC_STAT, GETPID) needs read permission, which write-only
    // denies its owner too: the settling of the PIDs failed the restore.
    // The application, the snapshot and the restore run without
    // CAP_IPC_OWNER (the restore grants no capability it lacks).
    const withoutIpcOwner = (args: string[]) => {
      const r = spawnSync('setpriv', ['--inh-caps=-ipc_owner', '--bounding-set=-ipc_owner', '--', command, ...args], { env: { ...sb.env, APPSHOT_ENGINE: 'off' }, encoding: 'utf8', timeout: 50_000 });
      return { code: r.status, stderr: r.stderr };
    };
    let r = withoutIpcOwner(['run', '-d', '--aid', 'ipcw', '--', fixture('ipcpids')]);
    expect(r.code, r.stderr).toBe(0);
    await sb.checksPass('ipcw');
    r = withoutIpcOwner(['snapshot', 'ipcw', '-o', join(out, 'w')]);
    expect(r.code, r.stderr).toBe(0);
    const writeOnly = await crafted('w', 'w-writeonly', (i) => void (i.semaphores[0].mode = 0o200))();
    r = withoutIpcOwner(['restore', writeOnly]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/not kept: SysV PIDs: .*semaphore set 0's last users \(GETPID\): .*Permission denied/);
    // Restored and running: its own check cannot read the set either.
    await waitFor(() => /^FAIL.*semaphore 0's GETPID is -1/m.test(sb.log('ipcw')), 15_000, 'ipcw to check its set');
    await stopped('ipcw');
  });
});
