/**
 * The snapshot driver on real processes: what the image holds (read back
 * with `appshot inspect --json`), that --leave-running leaves the
 * application unharmed, and that every failure leaves it running and no
 * image behind.
 */
import { spawn } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lchownSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { alive, cli, fixture, Sandbox, stoppedAt, systemIpcIds, waitFor } from './helpers.js';

const sb = new Sandbox();
const out = mkdtempSync(join(tmpdir(), 'appshot-images-'));
afterAll(async () => {
  await sb.dispose();
  rmSync(out, { recursive: true, force: true });
});

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

function tracerOf(pid: number): number {
  return Number(/^TracerPid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

function threadStates(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((t) => readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8').split(') ')[1][0]);
}

function logOf(aid: string): string {
  return readFileSync(join(sb.home, 'apps', aid, 'log'), 'utf8');
}

/** Waits until the application's log shows `n` more CHECK lines than now. */
async function checksContinue(aid: string, n = 3): Promise<void> {
  const count = () => (logOf(aid).match(/^CHECK \d+$/gm) ?? []).length;
  const start = count();
  await waitFor(() => count() >= start + n, 10_000, `${n} more self-checks of ${aid}`);
  expect(logOf(aid)).not.toMatch(/FAIL/);
}

function startApp(aid: string, args: string[]): void {
  const r = sb.run(['run', '-d', '--aid', aid, '--', ...args]);
  if (r.code !== 0) throw new Error(`appshot run failed: ${r.stderr}`);
}

describe('snapshot of a program with one of each resource', () => {
  const aid = 'full';
  let image: Json;
  let ready: RegExpMatchArray;
  let first: Json;

  beforeAll(async () => {
    startApp(aid, [fixture('snapfix'), '0', '4']);
    await waitFor(() => /^CHECK 2$/m.test(logOf(aid)), 10_000, 'the fixture to settle');
    ready = /READY port=(\d+) child=(\d+) altstack=(0x[0-9a-f]+)/.exec(logOf(aid))!;
    first = sb.json(['snapshot', aid, '-o', join(out, 'full'), '--leave-running']);
    image = sb.json(['inspect', join(out, 'full')]);
  });

  it('reports what it wrote and leaves the application running', async () => {
    expect(first).toMatchObject({ aid, processes: 2, threads: 5, leftRunning: true });
    expect(first.frozenMs).toBeGreaterThan(0);
    await checksContinue(aid);
    const [main] = sb.json<Json>(['ps', aid])[0].processes.filter((p: Json) => p.vpid === 2);
    expect(tracerOf(main.pid)).toBe(0);
    expect(threadStates(main.pid).every((s) => s !== 't')).toBe(true);
  });

  it('places the processes in the tree by virtual PID', () => {
    const [parent, child] = image.processes;
    expect(parent).toMatchObject({ vpid: 2, vppid: 1, vpgid: 1, vsid: 1 });
    expect(child).toMatchObject({ vpid: Number(ready[2]), vppid: 2 });
    expect(parent.exe).toBe(fixture('snapfix'));
    expect(parent.argv).toEqual([fixture('snapfix'), '0', '4']);
  });

  it('captures process state: cwd, umask, rlimits, credentials, mm fields', () => {
    const p = image.processes[0];
    expect(p.cwd).toBe('/tmp');
    expect(p.umask).toBe(0o027);
    expect(p.rlimits.find((r: Json) => r.resource === 7).cur).toBe(777); // RLIMIT_NOFILE
    expect(p.creds.uid).toEqual([process.getuid!(), process.getuid!(), process.getuid!(), process.getuid!()]);
    expect(p.mm.brk).toBeGreaterThanOrEqual(p.mm.startBrk);
    expect(p.mm.argEnd).toBeGreaterThan(p.mm.argStart);
    expect(p.mm.auxv.bytes).toBeGreaterThan(0);
  });

  it('captures every thread, including those blocked in futex, read and nanosleep', () => {
    const threads = image.processes[0].threads;
    expect(threads).toHaveLength(4);
    expect(threads.map((t: Json) => t.syscall).sort()).toEqual(['clock_nanosleep', 'clock_nanosleep', 'futex', 'read']);
    for (const t of threads) {
      expect(t.regs.bytes).toBe(27 * 8);
      expect(t.xstate.bytes).toBeGreaterThanOrEqual(576);
      expect(t.tidAddress).toBeGreaterThan(0);
      expect(t.robustList).toBeGreaterThan(0);
      expect(t.rseq?.pointer ?? 0).toBeGreaterThan(0);
    }
    expect(new Set(threads.map((t: Json) => t.vtid)).size).toBe(4);
    expect(threads[0].vtid).toBe(2);
  });

  it('captures signal dispositions, masks, pending signals and the alternate stack', () => {
    const p = image.processes[0];
    const usr1 = p.sigactions.find((s: Json) => s.signal === 10);
    expect(usr1.handler).toBeGreaterThan(1);
    expect(usr1.flags & 0x10000000).toBeTruthy(); // SA_RESTART
    const main = p.threads[0];
    const bit = (sig: number) => 2 ** (sig - 1);
    expect(Math.floor(main.sigmask / bit(12)) % 2).toBe(1); // SIGUSR2 blocked
    // siginfo.si_signo is the first int of each 128-byte record.
    expect(main.pending.bytes).toBe(128);
    expect(parseInt(main.pending.hex.slice(0, 2), 16)).toBe(12);
    expect(p.sharedPending.bytes).toBe(128);
    expect(parseInt(p.sharedPending.hex.slice(0, 2), 16)).toBe(35); // SIGRTMIN+1
    expect(BigInt(main.altstack.sp)).toBe(BigInt(ready[3]));
    expect(main.altstack.size).toBe(65536);
  });

  it('captures the memory map and only the pages that exist', () => {
    const vmas = image.processes[0].vmas;
    for (const special of ['[heap]', '[stack]', '[vdso]', '[vvar]']) expect(vmas.some((v: Json) => v.path === special)).toBe(true);
    // The 4 MiB buffer: every page touched, all stored.
    const big = vmas.find((v: Json) => v.kindName === 'ANON' && v.size >= 4 << 20);
    expect(big.storedPages).toBeGreaterThanOrEqual(1024);
    // Library code is never stored: it is in the file.
    const code = vmas.filter((v: Json) => v.kindName === 'FILE_PRIVATE' && v.prot & 4);
    expect(code.length).toBeGreaterThan(0);
    for (const v of code) expect(v.storedPages).toBe(0);
    const libc = image.files.find((f: Json) => f.path.includes('libc.so'));
    expect(libc).toMatchObject({ deleted: false });
    expect(libc.size).toBeGreaterThan(0);
    expect(libc.crc32c).not.toBe(0);
  });

  it('stores anonymous shared memory once for both processes', () => {
    expect(image.sharedMemory).toHaveLength(1);
    const [parent, child] = image.processes;
    const idx = (p: Json) => p.vmas.filter((v: Json) => v.kindName === 'SHARED_ANON').map((v: Json) => v.sharedMemory);
    expect(idx(parent)).toEqual([0]);
    expect(idx(child)).toEqual([0]);
    const pages = readFileSync(join(out, 'full', 'pages.img'));
    const obj = image.sharedMemory[0];
    const at = (page: number) => {
      // Find the stored page among the runs.
      let offset = obj.pages.offset;
      for (let i = 0; i < obj.pages.runs.length; i += 2) {
        const [first, count] = [obj.pages.runs[i], obj.pages.runs[i + 1]];
        if (page >= first && page < first + count) return pages.subarray(offset + (page - first) * 4096, offset + (page - first) * 4096 + 16);
        offset += count * 4096;
      }
      return Buffer.alloc(0);
    };
    expect(at(0).toString('latin1')).toContain('parent-page');
    expect(at(3).toString('latin1')).toContain('child-page');
  });

  it('captures descriptors: files, deleted files, pipes with data in flight, sockets, eventfd, epoll', () => {
    const [parent, child] = image.processes;
    const fd = (p: Json, n: number) => p.fds.find((f: Json) => f.fd === n);
    expect(fd(parent, 0)).toMatchObject({ kindName: 'DEVICE', path: '/dev/null' });
    // stdout and stderr are one open file description, shared with the
    // child across fork: marked so, a restore keeps them one.
    expect(fd(parent, 1).description).toBeGreaterThan(0);
    expect(fd(parent, 2).description).toBe(fd(parent, 1).description);
    expect(fd(child, 1).description).toBe(fd(parent, 1).description);
    const deleted = fd(parent, 3);
    expect(deleted).toMatchObject({ kindName: 'FILE', pos: 7 });
    expect(image.files[deleted.file]).toMatchObject({ deleted: true, size: 21 });
    const contents = image.files[deleted.file].contents;
    const pages = readFileSync(join(out, 'full', 'pages.img'));
    expect(pages.subarray(contents.offset, contents.offset + 21).toString()).toBe('deleted-file-contents');
    expect(fd(parent, 5)).toMatchObject({ kindName: 'FILE', path: '/etc/hostname', pos: 1 });
    // The pipe between parent (write end) and child (read end): one pipe, its data copied.
    const w = fd(parent, 4);
    const r = fd(child, 3);
    expect(w).toMatchObject({ kindName: 'PIPE', writeEnd: true });
    expect(r).toMatchObject({ kindName: 'PIPE', writeEnd: false, pipe: w.pipe });
    expect(Buffer.from(image.pipes[w.pipe].data.hex, 'hex').toString()).toBe('in-flight-data');
    // A pipe enlarged past the default 64 KiB keeps all it holds.
    expect(image.pipes.some((p: Json) => p.data.bytes === 100000 && p.capacity === 256 * 1024)).toBe(true);
    const listen = fd(parent, 6);
    expect(listen).toMatchObject({ kindName: 'TCP_LISTEN', socket: { address: '127.0.0.1', port: Number(ready[1]), listening: true, reuseaddr: true } });
    // A unix socket pair inside the process, with its queued data.
    const ends = parent.fds.filter((f: Json) => f.kindName === 'UNIX_SOCKET');
    expect(ends).toHaveLength(2);
    expect(ends[0].socket.peerIno).toBe(ends[1].socket.ino);
    expect(ends.map((e: Json) => Buffer.from(e.socket.queued.hex, 'hex').toString()).sort()).toEqual(['', 'pair-data']);
    expect(listen.socket.backlog).toBe(16);
    expect(fd(parent, 7)).toMatchObject({ kindName: 'EVENTFD', eventfdCount: 5 });
    const ep = fd(parent, 8);
    expect(ep.kindName).toBe('EPOLL');
    expect(ep.epoll.map((t: Json) => [t.fd, t.data]).sort()).toEqual([[6, 0x1234], [7, 0x5678]]);
  });

  it('captures SysV objects by virtual id and key, without consuming messages', async () => {
    expect(image.semaphores).toEqual([expect.objectContaining({ vid: 0, vkey: 0x5151, mode: 0o600, values: [3, 7] })]);
    const [seg] = image.shmSegments;
    expect(seg).toMatchObject({ vid: 0, vkey: 0x5152, size: 8192, cvpid: 2 });
    const pages = readFileSync(join(out, 'full', 'pages.img'));
    const data = pages.subarray(seg.contents.offset, seg.contents.offset + 8192);
    expect(data.subarray(0, 12).toString()).toBe('shm-contents');
    expect(data.subarray(4096, 4108).toString()).toBe('shm-page-two');
    const [q] = image.msgQueues;
    expect(q).toMatchObject({ vid: 0, vkey: 0x5153, lsvpid: 2 });
    expect(q.messages.map((m: Json) => [m.type, Buffer.from(m.data.hex, 'hex').toString()])).toEqual([
      [1, 'first\0'],
      [2, 'second\0'],
    ]);
    // The fixture checks msg_qnum == 2 itself; its checks go on passing.
    await checksContinue(aid, 2);
  });

  it('includes the translation tables', () => {
    const kinds = Object.fromEntries(image.tables.map((t: Json) => [t.kind, t.entries]));
    expect(kinds.pid.map((e: Json) => e.virtual)).toEqual(expect.arrayContaining([1, 2, Number(ready[2])]));
    expect(kinds.semkey).toEqual([expect.objectContaining({ virtual: 0x5151 })]);
  });

  it('takes an incremental snapshot next: only pages written since, with a parent', async () => {
    const main = sb.json<Json>(['ps', aid])[0].processes.find((p: Json) => p.vpid === 2);
    const before = (logOf(aid).match(/^DIRTIED/gm) ?? []).length;
    process.kill(main.pid, 'SIGUSR1');
    await waitFor(() => (logOf(aid).match(/^DIRTIED/gm) ?? []).length > before, 5000, 'the fixture to dirty pages');
    const second = sb.json<Json>(['snapshot', aid, '-o', join(out, 'incr'), '--leave-running']);
    expect(second.parent).toBe(join(out, 'full'));
    const dirtied = Number(/^DIRTIED (\d+)/m.exec(logOf(aid))![1]);
    expect(second.pagesFromParent).toBeGreaterThan(1000);
    // The rewritten heap pages, plus the few the program touches anyway
    // (its stacks, stdio buffer, counters), and a few the kernel can
    // report written without a write (a page it dropped and faulted back
    // loses its write-protection: this machine runs DAMON's pageout): one
    // fresh-clone run counted 107 here. Still a small part of the whole.
    expect(second.pages).toBeGreaterThanOrEqual(dirtied);
    expect(second.pages, JSON.stringify({ dirtied, pages: second.pages, fromParent: second.pagesFromParent })).toBeLessThan(second.pagesFromParent / 4);
    const incr = sb.json<Json>(['inspect', join(out, 'incr')]);
    expect(incr.parent.path).toBe(join(out, 'full'));
    // Dirty tracking (userfaultfd write-protection, PAGEMAP_SCAN) keeps its
    // descriptor in the process, and out of every image.
    const tracking = readdirSync(`/proc/${main.pid}/fd`).filter((fd) => {
      try {
        return readlinkSync(`/proc/${main.pid}/fd/${fd}`) === 'anon_inode:[userfaultfd]';
      } catch {
        return false;
      }
    });
    expect(tracking).toHaveLength(1);
    expect(incr.processes[0].fds.map((f: Json) => f.fd)).not.toContain(Number(tracking[0]));
    await checksContinue(aid);
  });

  it('writes a tar stream with -o -, which inspect reads from a file or stdin', async () => {
    const tarPath = join(out, 'full.tar');
    const r = await new Promise<number>((resolve) => {
      const child = spawn(`${JSON.stringify(process.execPath)} ${JSON.stringify(cli)} snapshot ${aid} -o - --full --leave-running > ${JSON.stringify(tarPath)}`, { shell: true, env: sb.env, stdio: 'inherit' });
      child.on('close', (code) => resolve(code ?? -1));
    });
    expect(r).toBe(0);
    const fromFile = sb.json<Json>(['inspect', tarPath]);
    expect(fromFile.processes).toHaveLength(2);
    const viaStdin = sb.run(['inspect', '-', '--json'], readFileSync(tarPath));
    expect(viaStdin.code).toBe(0);
    await checksContinue(aid);
  });

  it('writes the whole tar stream with -o - to a pipe whose reader pauses, though the CLI made the pipe non-blocking', async () => {
    // Standard output is a pipe (a socket pair, as spawn makes it): the
    // CLI's process.stdout makes it O_NONBLOCK, so a write to the full
    // pipe gets EAGAIN. The reader stops once the stream has begun, long
    // enough for the pipe to fill, then takes the rest.
    const child = spawn(process.execPath, [cli, 'snapshot', aid, '-o', '-', '--full', '--leave-running'], { env: sb.env, stdio: ['ignore', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    child.stdout.once('data', () => {
      child.stdout.pause();
      setTimeout(() => child.stdout.resume(), 1000);
    });
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? -1)));
    expect(code, stderr).toBe(0);
    expect(stderr).toBe('');
    const tar = Buffer.concat(chunks);
    // More than the pipe and the reader's buffer hold, or nothing waited.
    expect(tar.length).toBeGreaterThan(4 << 20);
    const tarPath = join(out, 'paused.tar');
    writeFileSync(tarPath, tar);
    const fromFile = sb.json<Json>(['inspect', tarPath]);
    expect(fromFile.processes).toHaveLength(2);
    await checksContinue(aid);
  });

  it('fails with one line naming the errno when standard output cannot take the stream (-o - > /dev/full)', async () => {
    const r = await new Promise<{ code: number; stderr: string }>((resolve) => {
      const child = spawn(`${JSON.stringify(process.execPath)} ${JSON.stringify(cli)} snapshot ${aid} -o - --full --leave-running > /dev/full`, { shell: true, env: sb.env, stdio: ['ignore', 'inherit', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d));
      child.on('close', (code) => resolve({ code: code ?? -1, stderr }));
    });
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(new RegExp(`^appshot: cannot snapshot '${aid}': writing the image to standard output: ENOSPC\\b.*; the application was left running`))]);
    await checksContinue(aid);
  });

  it('refuses -o - that would end the application into /dev/null (or a closed standard output, which Node reopens so), before stopping anything', async () => {
    for (const redirect of ['> /dev/null', '>&-']) {
      const r = await new Promise<{ code: number; stderr: string }>((resolve) => {
        const child = spawn(`${JSON.stringify(process.execPath)} ${JSON.stringify(cli)} snapshot ${aid} -o - ${redirect}`, { shell: true, env: sb.env, stdio: ['ignore', 'inherit', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => (stderr += d));
        child.on('close', (code) => resolve({ code: code ?? -1, stderr }));
      });
      expect(r.code, redirect).toBe(2);
      expect(r.stderr).toBe('appshot: standard output is /dev/null or closed: the image would be lost, and the application ended with it; write it to a file or a pipe (or add --leave-running)\n');
      expect(sb.aids()).toContain(aid);
    }
    await checksContinue(aid);
  });

  it('refuses to write an image into a directory another user can change (a name swapped for a link there would redirect its writes)', async () => {
    const shared = join(out, 'shared');
    mkdirSync(shared);
    chmodSync(shared, 0o777);
    const r = sb.run(['snapshot', aid, '-o', join(shared, 'img'), '--leave-running']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^appshot: cannot write into ${shared}: it can be changed by another user \\(owner uid \\d+, group \\d+, mode 0777\\), who could swap a name there for a link while appshot writes; choose a directory only you (and root )?can change`));
    expect(readdirSync(shared)).toEqual([]);
    // Sticky (as /tmp): an entry's owner alone may rename it.
    chmodSync(shared, 0o1777);
    expect(sb.run(['snapshot', aid, '-o', join(shared, 'img'), '--leave-running']).code).toBe(0);
    // A link on the way, in a directory another user owns, to one of this
    // user's (review 242): that user could point the link elsewhere
    // between two steps; the real path alone looked safe.
    const theirs = join(out, 'theirs');
    const mine = join(out, 'mine');
    mkdirSync(theirs);
    mkdirSync(mine);
    symlinkSync(mine, join(theirs, 'out'));
    lchownSync(join(theirs, 'out'), 65534, 65534);
    chownSync(theirs, 65534, 65534);
    const linked = sb.run(['snapshot', aid, '-o', join(theirs, 'out', 'img'), '--leave-running']);
    expect(linked.code).toBe(1);
    expect(linked.stderr).toMatch(new RegExp(`^appshot: cannot write into ${join(theirs, 'out')}: ${theirs}, a directory above it, can be changed by another user \\(owner uid 65534, `));
    expect(readdirSync(mine)).toEqual([]);
    await checksContinue(aid);
  });

  it('ends the application by default, removing its SysV objects', async () => {
    const before = systemIpcIds();
    const ids = sb.json<Json>(['table', aid]).tables;
    const pids = sb.json<Json>(['ps', aid])[0].processes.map((p: Json) => p.pid);
    const r = sb.run(['snapshot', aid, '-o', join(out, 'final')]);
    expect(r.code, r.stderr).toBe(0);
    expect(existsSync(join(out, 'final', 'pages.img'))).toBe(true);
    for (const pid of pids) await waitFor(() => !alive(pid), 5000, `process ${pid} to end`);
    expect(sb.aids()).not.toContain(aid);
    const after = systemIpcIds();
    expect(after.sem).not.toContain(ids.semid[0].system);
    expect(after.shm).not.toContain(ids.shmid[0].system);
    expect(after.msg).not.toContain(ids.msgid[0].system);
    expect(before.sem).toContain(ids.semid[0].system);
  });
});

describe("a snapshot refused for a moment's state is tried again", () => {
  it('a netlink answer the program has not read yet: refused, tried again once it is read, and the image restores with the socket working', async () => {
    startApp('nlq', [fixture('nlqueued')]);
    await waitFor(() => /^QUEUED$/m.test(logOf('nlq')), 10_000, 'the answer to be queued');
    const vpid2 = () => sb.json<Json>(['ps', 'nlq'])[0].processes.find((x: Json) => x.vpid === 2).pid as number;
    const pid = vpid2();
    const snap = sb.start(['snapshot', 'nlq', '-o', join(out, 'nlq')]);
    // At the first refusal, and not before: the program reads its answer.
    let told = false;
    snap.child.stderr.on('data', () => {
      if (told || !/trying again in \d+ ms/.test(snap.stderr)) return;
      told = true;
      process.kill(pid, 'SIGUSR1');
    });
    const r = await snap.exited;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/cannot snapshot 'nlq': process 2 \(nlqueued\) fd 3: the NETLINK_ROUTE socket of port id \d+ has \d+ bytes of messages queued for reading .*: trying again in \d+ ms/);
    expect(sb.run(['restore', join(out, 'nlq')]).code).toBe(0);
    // Read before the image was taken: its log, carried in the image, says so.
    expect(logOf('nlq')).toMatch(/^READ$/m);
    process.kill(vpid2(), 'SIGUSR2');
    await waitFor(() => /^PASS$/m.test(logOf('nlq')) || /FAIL/.test(logOf('nlq')), 10_000, 'an answer through the restored socket');
    expect(logOf('nlq')).not.toMatch(/FAIL/);
  });

  it('gives up after a few tries when the state lasts, leaving the application running and no image', async () => {
    startApp('nlq2', [fixture('nlqueued')]);
    await waitFor(() => /^QUEUED$/m.test(logOf('nlq2')), 10_000, 'the answer to be queued');
    const r = sb.run(['snapshot', 'nlq2', '-o', join(out, 'nlq2')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/trying again in \d+ ms\n[\s\S]*\(tried 4 times, over 1\.3 s\)$/m);
    expect(existsSync(join(out, 'nlq2'))).toBe(false);
    const p = sb.json<Json>(['ps', 'nlq2'])[0].processes.find((x: Json) => x.vpid === 2).pid;
    expect(tracerOf(p)).toBe(0);
    process.kill(p, 'SIGUSR1');
    await waitFor(() => /^READ$/m.test(logOf('nlq2')), 10_000, 'the program to read its answer');
  });
});

describe('an incremental snapshot of processes whose writes are not tracked', () => {
  // A soft RLIMIT_NOFILE of 10 leaves no descriptor for dirty tracking:
  // every page is compared with the parent's bytes.
  const aid = 'untracked';
  beforeAll(async () => {
    startApp(aid, ['sh', '-c', `ulimit -n 10 && exec ${fixture('cowfork')}`]);
    await waitFor(() => /^CHECK 2$/m.test(logOf(aid)), 20_000, 'the fixture to settle');
  });

  it('compares with the parent page files it checked, not with what their paths name later', async () => {
    const first = sb.json<Json>(['snapshot', aid, '-o', join(out, 'untracked-1'), '--leave-running']);
    const dest = join(out, 'untracked-2');
    // Stopped once its parent is loaded and checked, before the page
    // writer compares with it.
    const stopped = await stoppedAt(sb, ['snapshot', aid, '-o', dest, '--leave-running'], 'snapshot: parent chain loaded', 'the snapshot to load its parent');
    // Another file at the parent's page path, empty: compared with it, no
    // page would be the parent's.
    const pages = join(out, 'untracked-1', 'pages.img');
    renameSync(pages, `${pages}.checked`);
    writeFileSync(pages, '');
    let r;
    try {
      r = await stopped.go();
    } finally {
      renameSync(`${pages}.checked`, pages);
    }
    expect(r.code, r.stderr).toBe(0);
    const second = sb.json<Json>(['inspect', dest]);
    expect(second.parent.path).toBe(join(out, 'untracked-1'));
    // All but the few pages the program wrote since (stacks, counters).
    expect(Number(second.stats.pagesFromParent)).toBeGreaterThan(Number(first.pages) - 64);
    await checksContinue(aid);
    sb.run(['rm', '-f', aid]);
  });
});

describe('the registration of an application whose processes come and go', () => {
  // Each --leave-running snapshot records where each process's dirty
  // tracking descriptor is (app.json's "tracking", by PID and start time).
  // The entries of processes gone stayed: a forking application's
  // registration grew by its children at every snapshot. Only their
  // descriptor numbers matter (a live process may have inherited one).
  it('keeps tracking entries of live processes, and of those gone one per descriptor number', async () => {
    const aid = 'comego';
    sb.ok(['run', '-d', '--aid', aid, '--', '/bin/sh', '-c', 'while :; do sleep 0.3 & sleep 0.3 & wait; done']);
    const tracking = () => JSON.parse(readFileSync(join(sb.home, 'apps', aid, 'app.json'), 'utf8')).tracking as Record<string, number>;
    const gone = (key: string) => {
      const [pid, start] = key.split(':').map(Number);
      try {
        return Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[19]) !== start;
      } catch {
        return true;
      }
    };
    const seen = new Set<string>();
    for (let i = 0; i < 6; i++) {
      const before = sb.json<{ processes: unknown[] }[]>(['ps', aid])[0].processes.length;
      expect(before).toBeGreaterThan(1);
      sb.ok(['snapshot', aid, '-o', join(out, `comego-${i}`), '--leave-running']);
      for (const key of Object.keys(tracking())) seen.add(key);
      // The sleeps of this round end: the next snapshot sees new ones.
      await new Promise((r) => setTimeout(r, 400));
    }
    // Kept whole, the map would hold every process any round saw.
    const now = Object.keys(tracking());
    expect(now.length, 'entries kept, of all the processes the rounds tracked').toBeLessThan(seen.size);
    expect(now.filter((key) => !gone(key)).length).toBeGreaterThan(0);
    sb.ok(['rm', '-f', aid]);
  });
});

describe('snapshot failures leave the application running and no image', () => {
  it('refuses a resource it cannot capture, naming the process, fd and kind', async () => {
    startApp('inot', [fixture('holder'), 'io_uring']);
    await waitFor(() => /READY fd=(\d+)/.test(logOf('inot')));
    const fd = /READY fd=(\d+)/.exec(logOf('inot'))![1];
    const r = sb.run(['snapshot', 'inot', '-o', join(out, 'inot')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain(`process 2 (holder) fd ${fd}: its io_uring has its rings not mapped`);
    expect(existsSync(join(out, 'inot'))).toBe(false);
    const [p] = sb.json<Json>(['ps', 'inot'])[0].processes.filter((x: Json) => x.vpid === 2);
    expect(tracerOf(p.pid)).toBe(0);
    expect(threadStates(p.pid)).not.toContain('t');
  });

  it('refuses a process in a user namespace of its own, whose capabilities there a restore would give it outside', async () => {
    startApp('userns', ['unshare', '--user', '--', 'sh', '-c', 'echo READY; exec sleep 100000']);
    await waitFor(() => /READY/.test(logOf('userns')), 10_000, 'the program to start');
    const r = sb.run(['snapshot', 'userns', '-o', join(out, 'userns')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/process 2 \(sleep\) is in a user namespace of its own \(user:\[\d+\]\), which cannot be captured yet; the application was left running/);
    expect(existsSync(join(out, 'userns'))).toBe(false);
    sb.run(['stop', 'userns', '-s', 'KILL']);
  });

  it('gives up on a process that never settles (a vfork in progress) after --timeout, resuming all', async () => {
    startApp('vfork', [fixture('vforker'), '60']);
    await waitFor(() => /CHILD/.test(logOf('vfork')));
    // The child may print before its parent is asleep in the vfork (on
    // its way there it is seized like any thread, and then can only be
    // let go once the vfork ends): the snapshot is asked once it sleeps.
    const parent = sb.json<Json>(['ps', 'vfork'])[0].processes.find((x: Json) => x.vpid === 2).pid;
    await waitFor(() => /\) D /.test(readFileSync(`/proc/${parent}/stat`, 'utf8')), 10_000, 'the vfork parent to sleep (D)');
    const started = Date.now();
    const r = sb.run(['snapshot', 'vfork', '-o', join(out, 'vfork'), '--timeout', '1']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/cannot stop the application within 1 s: process 2 \(vforker\) did not stop: uninterruptible sleep \(D\).*vfork/);
    expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
    expect(existsSync(join(out, 'vfork'))).toBe(false);
    const procs = sb.json<Json>(['ps', 'vfork'])[0].processes.filter((x: Json) => !x.init);
    expect(procs).toHaveLength(2);
    const child = procs.find((p: Json) => p.pid !== parent);
    // Let go at once if it had stopped; one seized whose stop was not yet
    // reported when the freezer gave up is let go at that stop, by the
    // engine's timer (freezer.ts, detachWhenStopped): soon, not before the
    // command returns.
    await waitFor(() => tracerOf(child.pid) === 0 && !threadStates(child.pid).includes('t'), 5_000, 'the vfork child to be let go');
    // The parent, seized but never stopped, can only be let go once the
    // vfork ends: at once by a snapshot that exits, and by the resident
    // engine (which took this snapshot unless APPSHOT_ENGINE=off) at the
    // stop it was asked for. The vfork ends with its child.
    process.kill(child.pid, 'SIGKILL');
    await waitFor(() => /^PARENT$/m.test(logOf('vfork')), 10_000, 'the vfork parent to go on');
    await waitFor(() => tracerOf(parent) === 0 && !threadStates(parent).includes('t'), 10_000, 'the vfork parent to be let go');
  });

  // Killed while it reads the application's memory, the longest part. (Not
  // while a system call is injected into a thread: that thread would go on
  // with the injected registers, a window the README names.)
  it('survives kill -9 of appshot in the middle of a snapshot', async () => {
    startApp('big', [fixture('snapfix'), '0', '768']);
    await waitFor(() => /^CHECK 1$/m.test(logOf('big')), 20_000, 'the fixture to start');
    const main = sb.json<Json>(['ps', 'big'])[0].processes.find((p: Json) => p.vpid === 2);
    const dest = join(out, 'killed');
    const snap = spawn(process.execPath, [cli, 'snapshot', 'big', '-o', dest], { env: { ...sb.env, APPSHOT_TEST_KILL_AT: 'snapshot: dumping memory' }, stdio: 'ignore' });
    await new Promise((r) => snap.on('close', r));
    expect(snap.signalCode).toBe('SIGKILL');
    await waitFor(() => tracerOf(main.pid) === 0, 5000, 'the kernel to release the tracees');
    expect(existsSync(dest)).toBe(false);
    expect(readdirSync(out).filter((n) => n.includes('killed'))).toEqual([]);
    await checksContinue('big');
  });

  it('refuses an application that a debugger (or another snapshot) is tracing', async () => {
    startApp('traced', [fixture('waiter')]);
    await waitFor(() => sb.json<Json>(['ps', 'traced'])[0].processes.length === 2, 5000);
    const main = sb.json<Json>(['ps', 'traced'])[0].processes.find((p: Json) => p.vpid === 2);
    const debuggerProc = spawn(fixture('tracer'), [String(main.pid)], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise((resolve) => debuggerProc.stdout.once('data', resolve));
      const r = sb.run(['snapshot', 'traced', '-o', join(out, 'traced')]);
      expect(r.code).toBe(4);
      expect(r.stderr).toContain(`process 2 is being traced by process ${debuggerProc.pid} (a debugger, or another snapshot)`);
      expect(existsSync(join(out, 'traced'))).toBe(false);
    } finally {
      debuggerProc.kill('SIGKILL');
    }
  });

  it('refuses an output that exists and an application that does not', () => {
    const exists = sb.run(['snapshot', 'big', '-o', out]);
    expect(exists.code).toBe(4);
    expect(exists.stderr).toContain('already exists');
    const none = sb.run(['snapshot', 'nosuch', '-o', join(out, 'x')]);
    expect(none.code).toBe(3);
    expect(none.stderr).toContain("no application with AID 'nosuch'");
    const usage = sb.run(['snapshot']);
    expect(usage.code).toBe(2);
  });

  it('refuses a dangling -o link and a -o under a file before the application is stopped (fuzz34 F6)', async () => {
    // Once found only when the image was placed: after the application
    // had been frozen and dumped (and, without --leave-running, ended).
    const nowhere = join(out, 'nowhere', 'img');
    for (const name of ['dangling', 'dangling.tar.zst']) {
      const link = join(out, name);
      symlinkSync(nowhere, link);
      const r = sb.run(['snapshot', 'big', '-o', link]);
      expect(r.stderr).toBe(`appshot: ${link} already exists: a symbolic link to nothing (${nowhere}); an image never replaces one\n`);
      expect(r.code).toBe(4);
      rmSync(link);
    }
    const file = join(out, 'a-file');
    writeFileSync(file, '');
    const under = sb.run(['snapshot', 'big', '-o', join(file, 'img')]);
    expect(under.stderr).toBe(`appshot: not a directory: ${file}\n`);
    expect(under.code).toBe(2);
    rmSync(file);
    expect(readdirSync(out).filter((n) => n.includes('partial'))).toEqual([]);
    expect(sb.aids()).toContain('big');
    await checksContinue('big');
  });
});
